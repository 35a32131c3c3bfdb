from .lrpet_ddp import (LRPETDDP, DistributedProjectionStats, assign_layers,
                        init_cpu_process_group)
from .lrpet_hook import LRPETHook

__all__ = ['LRPETHook', 'LRPETDDP', 'DistributedProjectionStats', 'assign_layers',
           'init_cpu_process_group']
