from .checkpoint_summary import (LayerRankCheck, check_checkpoint_ranks, load_checkpoint_file,
                                 rank_plan_from_checkpoint)
from .input_shape import infer_input_shape
from .flops import (FlopsPlanResult, check_flops_reduction, count_flops, count_params,
                    factorized_copy, flops_by_module, plan_ranks_for_flops)

__all__ = ['LayerRankCheck', 'check_checkpoint_ranks', 'load_checkpoint_file',
           'rank_plan_from_checkpoint', 'FlopsPlanResult', 'check_flops_reduction',
           'count_flops', 'count_params', 'factorized_copy', 'flops_by_module',
           'plan_ranks_for_flops', 'infer_input_shape']
