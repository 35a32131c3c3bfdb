"""Pure-PyTorch core of LRPET: projection, energy transfer, BN rectification, rank planning,
target discovery. Nothing here imports OpenMMLab packages."""
from .batchnorm import BNR_EPS, bn_scale, fold_bn_scale, is_batch_norm, unfold_bn_scale
from .projection import (PROJECTION_METHODS, LowRankProjection, ProjectionError,
                         conv_weight_as_matrix,
                         numerical_rank, project_low_rank, truncated_svd)
from .projector import LowRankProjector, ProjectionStats
from .ranks import (LayerRank, RankPlan, check_rank_multiple, check_rank_ratio, factorization_pays, plan_ranks,
                    rank_for_ratio)
from .targets import (ConvTarget, TargetSelection, find_conv_norm_pairs, get_scope_module,
                      select_targets)

__all__ = [
    'BNR_EPS', 'bn_scale', 'fold_bn_scale', 'is_batch_norm', 'unfold_bn_scale',
    'PROJECTION_METHODS', 'LowRankProjection', 'ProjectionError', 'conv_weight_as_matrix', 'numerical_rank',
    'project_low_rank', 'truncated_svd', 'LowRankProjector', 'ProjectionStats', 'LayerRank',
    'RankPlan', 'check_rank_multiple', 'check_rank_ratio', 'factorization_pays', 'plan_ranks', 'rank_for_ratio',
    'ConvTarget', 'TargetSelection', 'find_conv_norm_pairs', 'get_scope_module', 'select_targets'
]

from .factorize import (ConvFactorization, FoldedConv, LowRankConv2d,  # noqa: E402
                        factorize_conv, factorize_conv_checked, fold_conv_bn,
                        relative_rank_k_error)

__all__ += ['ConvFactorization', 'factorize_conv_checked', 'FoldedConv', 'LowRankConv2d', 'factorize_conv', 'fold_conv_bn',
            'relative_rank_k_error']
