#!/usr/bin/env python
"""Dead conv channels after LRPET training from scratch: BN recovery by the paper's eq. 16
against the default in-span recovery.

A new user's setting: the toy Faster R-CNN (2 epochs, ``LRPETHook(rank_ratio=0.5)``) and PSPNet
(40 iterations, ``LRPETHook(rank_ratio=0.3)``, other hook arguments at their defaults) trained
from scratch on the built-in data with mmdet / mmseg's default zero-initialized last BN of each
residual block, without the hook, with ``bn_recovery='eq16'`` and with the default
(``'in_span'``). A *dead row* is a backbone conv output channel whose weight row has a norm
below 1 % of its layer's median row norm, counted on the final checkpoint. Writes
benchmarks/results/dead_channels.{json,md}.

    python benchmarks/bench_dead_channels.py           # ~4 min on 2 CPU cores
    python benchmarks/bench_dead_channels.py --quick   # smoke test, ~30 s
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

from mmengine.config import Config
from mmengine.runner import Runner
from torch import nn

import lrpet_mm  # noqa: F401  (registers LRPETHook)
from benchlib.common import machine_info, write_results
from benchlib.config_data_root import set_data_root
from lrpet_mm.datasets import generate_synthetic_voc

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / 'configs' / 'lrpet' / '_toy_'
#: (task, toy config, train_cfg, hook arguments besides bn_recovery)
TASKS = (
    ('detection', 'faster-rcnn_r18_fpn_toy_voc.py',
     dict(type='EpochBasedTrainLoop', max_epochs=2, val_interval=100), dict(rank_ratio=0.5)),
    ('segmentation', 'pspnet_r18-d8_toy_voc12aug.py',
     dict(type='IterBasedTrainLoop', max_iters=40, val_interval=1000), dict(rank_ratio=0.3)),
)
ROWS = (('no hook', None), ("bn_recovery='eq16' (paper)", 'eq16'),
        ("bn_recovery='in_span' (default)", 'in_span'))
DEAD_FRACTION = 0.01


def dead_rows(backbone: nn.Module, fraction: float = DEAD_FRACTION) -> Dict[str, int]:
    """``{conv name: rows with norm < fraction × the layer's median row norm}`` (only convs
    with at least one such row)."""
    found = {}
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d):
            norms = module.weight.detach().reshape(module.out_channels, -1).norm(dim=1)
            count = int((norms < fraction * norms.median()).sum())
            if count:
                found[name] = count
    return found


def train(config: Path, voc_root: Path, work_dir: Path, train_cfg: dict,
          hook: Optional[dict], quick: bool) -> nn.Module:
    cfg = Config.fromfile(str(config))
    set_data_root(cfg, str(voc_root))
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = work_dir.name
    cfg.visualizer = dict(type='Visualizer', name=f'vis_{work_dir.name}')
    cfg.train_cfg = dict(train_cfg)
    if quick:
        key = 'max_epochs' if 'max_epochs' in train_cfg else 'max_iters'
        cfg.train_cfg[key] = 1 if key == 'max_epochs' else 3
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.param_scheduler = [s for s in cfg.param_scheduler if s['type'] != 'MultiStepLR']
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10 ** 6)
    cfg.custom_hooks = [] if hook is None else [dict(type='LRPETHook', **hook)]
    cfg.randomness = dict(seed=0)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner.model.backbone


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].replace('\n', ' '))
    parser.add_argument('--quick', action='store_true',
                        help='smoke test: 2 train images, 1 epoch / 3 iterations')
    parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'results' /
                                             'dead_channels.json'), help='output .json file')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix='bench_dead_') as tmp:
        tmp = Path(tmp)
        voc_root = generate_synthetic_voc(tmp / 'VOCdevkit', num_train=2 if args.quick else 16,
                                          num_val=2, img_size=(160, 128), seed=0)
        for task, config, train_cfg, hook_args in TASKS:
            for label, recovery in ROWS:
                hook = None if recovery is None else dict(hook_args, bn_recovery=recovery)
                work = tmp / f'{task}_{recovery or "none"}'
                backbone = train(TOY / config, voc_root, work, train_cfg, hook, args.quick)
                dead = dead_rows(backbone)
                rows.append(dict(task=task, row=label, bn_recovery=recovery, hook=hook,
                                 dead_rows=sum(dead.values()), layers_with_dead_rows=len(dead),
                                 by_layer=dead))
                print(f'{task:12s} {label:34s} dead rows {sum(dead.values()):5d} '
                      f'in {len(dead)} layers', flush=True)
    lines = [f'Dead backbone conv rows (norm < {DEAD_FRACTION:.0%} of the layer median) after '
             'training from scratch, final weights.', '',
             '| task | run | dead rows | layers with dead rows |', '|---|---|---:|---:|']
    lines += [f'| {r["task"]} | {r["row"]} | {r["dead_rows"]} | {r["layers_with_dead_rows"]} |'
              for r in rows]
    table = '\n'.join(lines) + '\n'
    print(table)
    write_results(args.out, dict(benchmark='dead channels', quick=args.quick,
                                 machine=machine_info(), tasks=[
                                     dict(task=t, config=c, train_cfg=tc, hook=h)
                                     for t, c, tc, h in TASKS],
                                 wall_seconds=round(time.perf_counter() - start, 1),
                                 rows=rows), table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
