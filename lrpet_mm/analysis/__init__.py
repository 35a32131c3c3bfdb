from .checkpoint_summary import (LayerRankCheck, check_checkpoint_ranks, load_checkpoint_file,
                                 rank_plan_from_checkpoint)

__all__ = ['LayerRankCheck', 'check_checkpoint_ranks', 'load_checkpoint_file',
           'rank_plan_from_checkpoint']
