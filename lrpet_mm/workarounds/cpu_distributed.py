"""Workarounds for distributed training on machines without a GPU (gloo process groups).

* mmengine 0.10's ``--launcher pytorch`` (``mmengine.dist.init_dist``) calls
  ``torch.cuda.set_device(LOCAL_RANK)`` before ``init_process_group``, which raises without an
  NVIDIA driver: :func:`init_cpu_process_group` creates the gloo group first (the Runner skips
  ``init_dist`` when a group exists). Opt in with the ``mmengine_cpu_dist`` module.
* mmengine's ``Runner.wrap_model`` passes ``device_ids=[LOCAL_RANK]``, which torch DDP accepts
  only for CUDA modules: :func:`drop_cpu_device_ids`.
* A gloo group still alive at interpreter shutdown can abort a finished process:
  :func:`destroy_process_group_at_exit`.
"""
import atexit
import gc
import os

import torch
import torch.distributed as torch_dist
from mmengine.logging import print_log
from torch import nn


def init_cpu_process_group(backend: str = 'gloo', **kwargs) -> bool:
    """Initialize the default process group for CPU-only distributed training.

    Does nothing unless launched by ``torch.distributed.run`` (``WORLD_SIZE`` set), without
    CUDA, and not yet initialized.

    Args:
        backend: process group backend. Defaults to 'gloo'.
        **kwargs: passed to ``torch.distributed.init_process_group``.

    Returns:
        True if it initialized the process group.
    """
    if ('WORLD_SIZE' not in os.environ or torch.cuda.is_available()
            or not torch_dist.is_available() or torch_dist.is_initialized()):
        return False
    torch_dist.init_process_group(backend=backend, **kwargs)
    atexit.register(destroy_process_group_at_exit)
    return True


def destroy_process_group_at_exit() -> None:
    """Free what still uses the default process group, then destroy it (registered at exit by
    :func:`init_cpu_process_group`): seen about once in 20 CPU runs of
    tests/test_distributed.py with torch 2.5.1, a finished rank aborted at shutdown
    ("terminate called without an active exception", exit code -6). mmengine destroys
    neither the group nor the Runner: the Runner and its DDP-wrapped model live in reference
    cycles, so without a collection here they would be freed during interpreter finalization,
    when gloo's threads can no longer take the GIL."""
    gc.collect()
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def drop_cpu_device_ids(module: nn.Module, ddp_kwargs: dict) -> dict:
    """``ddp_kwargs`` without ``device_ids`` / ``output_device`` when ``module`` is on the
    CPU (logged), unchanged otherwise."""
    on_cpu = all(p.device.type == 'cpu' for p in module.parameters())
    if not on_cpu or ddp_kwargs.get('device_ids') is None:
        return ddp_kwargs
    print_log(f'LRPETDDP: the model is on CPU; ignoring device_ids={ddp_kwargs["device_ids"]}',
              logger='current')
    kwargs = dict(ddp_kwargs, device_ids=None)
    kwargs.pop('output_device', None)
    return kwargs
