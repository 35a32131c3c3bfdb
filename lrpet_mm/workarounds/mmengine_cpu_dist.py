"""Workaround: mmengine 0.10's ``--launcher pytorch`` cannot start on a machine without a GPU.

``mmengine.dist.init_dist`` calls ``torch.cuda.set_device(LOCAL_RANK)`` before creating the
process group, which raises without an NVIDIA driver. The Runner skips ``init_dist`` when a
process group already exists, so importing this module (listed in the config's
``custom_imports``, which ``tools/train.py`` imports before building the Runner) creates the
gloo group first::

    custom_imports = dict(imports=['lrpet_mm', 'lrpet_mm.workarounds.mmengine_cpu_dist'],
                          allow_failed_imports=False)

It does nothing unless started by ``torch.distributed.run`` (``WORLD_SIZE`` set) on a machine
without CUDA.
"""
from .cpu_distributed import init_cpu_process_group

PROCESS_GROUP_CREATED = init_cpu_process_group()
