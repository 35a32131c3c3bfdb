"""Training-time glue: the settings, the hook, the distributed projection (model wrapper), FLOPs
counting and rank planning, the checkpoint meta the hook writes."""
from .checkpoint_meta import (
    LEGACY_BASES_KEY,
    META_KEY,
    LayerRankCheck,
    check_checkpoint_ranks,
    load_checkpoint_file,
    rank_plan_from_checkpoint,
)
from .flops import count_flops, count_params, flops_by_module
from .input_shape import check_input_shape, infer_input_shape, resolve_input_shape
from .lrpet_ddp import LRPETDDP, DistributedProjectionStats, assign_layers
from .lrpet_hook import LRPETHook
from .planning import FlopsPlanResult, factorized_copy, plan_ranks_for_flops, plan_targets
from .settings import LRPETSettings, check_flops_reduction

__all__ = [
    'LEGACY_BASES_KEY', 'META_KEY', 'LayerRankCheck', 'check_checkpoint_ranks',
    'load_checkpoint_file', 'rank_plan_from_checkpoint', 'count_flops', 'count_params',
    'flops_by_module', 'check_input_shape', 'infer_input_shape', 'resolve_input_shape',
    'LRPETDDP', 'DistributedProjectionStats', 'assign_layers', 'LRPETHook', 'FlopsPlanResult',
    'factorized_copy', 'plan_ranks_for_flops', 'plan_targets', 'LRPETSettings',
    'check_flops_reduction'
]
