"""Pure-PyTorch core of LRPET: projection, energy transfer, BN rectification, rank planning,
target discovery (convs and linear layers), factorization into cascaded convs / linear layers.
Nothing here imports OpenMMLab packages."""
from .batchnorm import BN_RECOVERIES, BNR_EPS, bn_folded_matrix, bn_scale, is_batch_norm
from .factorize import (
    LOW_RANK_TYPES,
    ConvFactorization,
    FoldedConv,
    LowRankConv2d,
    LowRankLinear,
    factorize_conv,
    factorize_conv_checked,
    factorize_layer_checked,
    factorize_linear,
    factorize_linear_checked,
    fold_conv_bn,
    relative_rank_k_error,
)
from .projection import (
    LowRankProjection,
    ProjectionError,
    conv_weight_as_matrix,
    numerical_rank,
    project_low_rank,
    truncated_svd,
)
from .projector import LowRankProjector, ProjectionStats
from .ranks import (
    LayerRank,
    RankPlan,
    check_rank_multiple,
    check_rank_ratio,
    factorization_pays,
    plan_ranks,
    rank_for_ratio,
)
from .targets import (
    LayerTarget,
    TargetSelection,
    find_conv_norm_pairs,
    get_scope_module,
    is_predictor,
    scope_components,
    select_targets,
)

__all__ = [
    'BN_RECOVERIES', 'BNR_EPS', 'bn_folded_matrix', 'bn_scale', 'is_batch_norm',
    'ConvFactorization', 'FoldedConv', 'LOW_RANK_TYPES', 'LowRankConv2d', 'LowRankLinear',
    'factorize_conv', 'factorize_conv_checked', 'factorize_layer_checked', 'factorize_linear',
    'factorize_linear_checked', 'fold_conv_bn', 'relative_rank_k_error', 'LowRankProjection',
    'ProjectionError', 'conv_weight_as_matrix', 'numerical_rank', 'project_low_rank',
    'truncated_svd', 'LowRankProjector', 'ProjectionStats', 'LayerRank', 'RankPlan',
    'check_rank_multiple', 'check_rank_ratio', 'factorization_pays', 'plan_ranks',
    'rank_for_ratio', 'LayerTarget', 'TargetSelection', 'find_conv_norm_pairs',
    'get_scope_module', 'is_predictor', 'scope_components', 'select_targets'
]
