"""Test-only probe for the distributed LRPET tests (``tests/test_distributed.py``).

The test's config lists this module in ``custom_imports``; ``tools/train.py`` imports it (in
``Config.fromfile``) in every rank before the Runner is built. Importing it

* initializes the gloo process group on a CPU-only machine (``init_cpu_process_group``;
  mmengine's ``--launcher pytorch`` would call ``torch.cuda.set_device`` and fail),
* wraps ``LowRankProjector.project`` to record which layers this rank projected and how long
  it took,
* registers ``DistProbeHook`` (root ``HOOKS``): after every projection (priority LOW, i.e. after
  ``LRPETHook``) it records the sha256 of this rank's projected weights and of all model
  parameters, whether each layer is low-rank with this rank's BatchNorm, and the logged stats,
  and writes ``dist_probe_rank{RANK}.json`` into the work_dir.
"""
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Dict, List

from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

import lrpet_mm.workarounds.mmengine_cpu_dist  # noqa: F401  (creates the gloo group)
from lrpet_mm.engine import LRPETHook
from lrpet_mm.engine.lrpet_ddp import projection_cost
from lrpet_mm.lowrank import LowRankProjector, bn_folded_matrix, numerical_rank

#: one entry per ``LowRankProjector.project`` call in this process
PROJECT_CALLS: List[Dict] = []
_original_project = LowRankProjector.project


def _recording_project(self, *args, **kwargs):
    start = time.perf_counter()
    stats = _original_project(self, *args, **kwargs)
    PROJECT_CALLS.append(dict(where=kwargs.get('where', args[0] if args else ''),
                              layers=list(stats.energy_kept),
                              seconds=time.perf_counter() - start))
    return stats


LowRankProjector.project = _recording_project


def _sha256(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@HOOKS.register_module(force=True)
class DistProbeHook(Hook):
    priority = 'LOW'  # after LRPETHook (NORMAL)

    def __init__(self) -> None:
        self.seen = 0
        self.records: List[Dict] = []

    def _check(self, runner, stage: str) -> None:
        if len(PROJECT_CALLS) == self.seen:
            return
        calls, self.seen = PROJECT_CALLS[self.seen:], len(PROJECT_CALLS)
        hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        weights = hook.projector.weights()
        low_rank = True
        for target in hook.projector.targets:
            matrix = bn_folded_matrix(target.layer.weight.double(),
                                      target.norm if target.rectify else None)
            low_rank &= numerical_rank(matrix) <= hook.plan.rank_of(target.name)
        hub = runner.message_hub
        self.records.append(dict(
            stage=stage, iter=runner.iter, where=[c['where'] for c in calls],
            layers=[name for c in calls for name in c['layers']],
            seconds=sum(c['seconds'] for c in calls),
            hash_projected=_sha256(weights[name] for name in sorted(weights)),
            hash_params=_sha256(p for _, p in sorted(model.named_parameters())),
            low_rank=bool(low_rank),
            hub_layers=float(hub.get_scalar('train/lrpet_layers').current())
            if 'train/lrpet_layers' in hub.log_scalars else None,
            hub_energy=float(hub.get_scalar('train/lrpet_energy_kept').current())
            if 'train/lrpet_energy_kept' in hub.log_scalars else None))
        out = dict(rank=get_rank(), world_size=get_world_size(),
                   wrapper=type(runner.model).__name__,
                   planned=[t.name for t in hook.projector.targets],
                   costs={t.name: projection_cost(t) for t in hook.projector.targets},
                   records=self.records)
        path = Path(runner.work_dir) / f'dist_probe_rank{get_rank()}.json'
        tmp = path.with_suffix(f'.tmp{os.getpid()}')
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(path)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._check(runner, 'train')

    def before_val_epoch(self, runner) -> None:
        self._check(runner, 'val')

    def after_train(self, runner) -> None:
        self._check(runner, 'after_train')
