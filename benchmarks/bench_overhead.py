"""Share of training wall time spent in LRPET projections (issue: target P2 <= 0.5 %).

Two measurements, both real ``Runner.train()`` runs on the built-in VOC-layout data:

1. **toy**: the toy Faster R-CNN LRPET config (R18, small images) at its own interval
   (one projection per epoch) for ``--toy-epochs`` epochs. Share = Σ projection time /
   training wall time (validation included), measured directly.
2. **paper setting**: the ResNet-50 Faster R-CNN LRPET config (VOC07+12, input 1000×600,
   −50 % backbone FLOPs) trained for a few iterations at batch ``--batch`` (ImageNet init
   switched off: no downloads), projecting every 2 iterations so that several projections
   after real SGD steps are timed (each is one exact SVD per layer, all cost alike). The
   paper's interval is one projection per epoch of VOC07+12 trainval (16 551 images) at batch
   16 = 1 035 iterations; the iteration time at batch 16 is extrapolated linearly from the
   measured per-image time (CPU compute is linear in the batch).
   Share = t_projection / (1 035 · t_iteration@16 + t_projection).

Prints a Markdown table and writes JSON (+ .md) atomically.

    python benchmarks/bench_overhead.py
    python benchmarks/bench_overhead.py --quick     # toy only, 2 epochs
"""
import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import lrpet_mm  # noqa: F401
from benchlib.common import machine_info, write_results
from benchlib.config_data_root import set_data_root
from lrpet_mm.datasets import generate_synthetic_voc
from lrpet_mm.engine import LRPETHook

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results'
TOY = REPO / 'configs' / 'lrpet' / '_toy_' / 'faster-rcnn_r18_fpn_lrpet_toy_voc.py'
R50 = REPO / 'configs' / 'lrpet' / 'faster-rcnn_r50_fpn_lrpet_1x_voc0712.py'
VOC0712_TRAINVAL = 16551  # VOC2007 trainval (5 011) + VOC2012 trainval (11 540)


@HOOKS.register_module(force=True)
class IterationTimer(Hook):
    """Records each training iteration's wall time, projection included (benchmark only)."""
    priority = 'LOWEST'

    def __init__(self):
        self.times: List[float] = []
        self._start = 0.0

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._start = time.perf_counter()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.times.append(time.perf_counter() - self._start)


@HOOKS.register_module(force=True)
class ProjectionRecorder(Hook):
    """Wraps LRPETHook.project to record each projection's seconds."""
    priority = 'LOWEST'

    def __init__(self):
        self.records: List[dict] = []

    def before_train(self, runner):
        hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
        original = hook.project

        def project(runner_, step):
            stats = original(runner_, step)
            self.records.append(dict(step=step, seconds=stats.seconds,
                                     layers=stats.num_layers))
            return stats
        hook.project = project


def common(cfg: Config, voc_root: Path, work_dir: Path, name: str) -> Config:
    set_data_root(cfg, voc_root)
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = name
    cfg.model.backbone.init_cfg = None
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10 ** 6)
    cfg.default_hooks.pop('visualization', None)
    cfg.visualizer = dict(type='Visualizer', name=f'vis_{name}')
    cfg.custom_hooks = list(cfg.custom_hooks) + [dict(type='IterationTimer'),
                                                 dict(type='ProjectionRecorder')]
    return cfg


def hooks_of(runner):
    timer = next(h for h in runner.hooks if isinstance(h, IterationTimer))
    recorder = next(h for h in runner.hooks if isinstance(h, ProjectionRecorder))
    return timer, recorder


def toy_overhead(voc_root: Path, work_dir: Path, epochs: int) -> dict:
    cfg = common(Config.fromfile(str(TOY)), voc_root, work_dir / 'toy', 'bench_overhead_toy')
    cfg.train_cfg.max_epochs = epochs
    runner = Runner.from_cfg(cfg)
    start = time.perf_counter()
    runner.train()
    wall = time.perf_counter() - start
    timer, recorder = hooks_of(runner)
    projections = recorder.records
    projection_s = sum(r['seconds'] for r in projections)
    iters_per_epoch = len(timer.times) // epochs
    return dict(setting=f'toy Faster R-CNN R18 ({TOY.name}), interval 1 epoch '
                        f'({iters_per_epoch} iterations at batch '
                        f'{cfg.train_dataloader.batch_size}), {epochs} epochs',
                iterations_per_epoch=iters_per_epoch,
                train_wall_s=wall, iterations=len(timer.times),
                median_iteration_s=statistics.median(timer.times),
                projections=projections, projection_total_s=projection_s,
                median_projection_s=statistics.median(r['seconds'] for r in projections),
                share=projection_s / wall)


def paper_overhead(voc_root: Path, work_dir: Path, batch: int, iters: int) -> dict:
    cfg = common(Config.fromfile(str(R50)), voc_root, work_dir / 'r50', 'bench_overhead_r50')
    cfg.train_dataloader.batch_size = batch
    cfg.train_dataloader.dataset.times = 1
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=10 ** 6)
    cfg.val_cfg = cfg.test_cfg = cfg.val_dataloader = cfg.test_dataloader = None
    cfg.val_evaluator = cfg.test_evaluator = None
    hook = next(h for h in cfg.custom_hooks if h['type'] == 'LRPETHook')
    hook.update(interval=2, by_epoch=False)
    runner = Runner.from_cfg(cfg)
    runner.train()
    timer, recorder = hooks_of(runner)
    steps = {r['step'] for r in recorder.records}
    plain = [t for i, t in enumerate(timer.times, start=1) if i not in steps and i > 1]
    t_iter = statistics.median(plain)
    t_iter16 = t_iter * 16 / batch
    iters_per_epoch = math.ceil(VOC0712_TRAINVAL / 16)
    t_proj = statistics.median(r['seconds'] for r in recorder.records)
    return dict(setting=f'Faster R-CNN R50 ({R50.name}), 1000×600, interval 1 epoch of '
                        f'VOC07+12 = {iters_per_epoch} iterations at batch 16',
                measured_batch=batch, measured_iterations=len(timer.times),
                median_iteration_s=t_iter, iteration_s_at_batch16=t_iter16,
                projections=recorder.records, median_projection_s=t_proj,
                epoch_s=iters_per_epoch * t_iter16,
                share=t_proj / (iters_per_epoch * t_iter16 + t_proj))


def markdown(results: dict) -> str:
    lines = ['| setting | projection (s) | training between projections (s) | share |',
             '|---|---|---|---|']
    toy = results.get('toy')
    if toy:
        lines.append(f"| {toy['setting']}: measured, all projections | "
                     f"{toy['projection_total_s']:.3f} total | {toy['train_wall_s']:.1f} wall | "
                     f"{100 * toy['share']:.2f} % |")
    paper = results.get('paper')
    if paper:
        lines.append(f"| {paper['setting']}: one projection (median) | "
                     f"{paper['median_projection_s']:.3f} | "
                     f"{paper['epoch_s']:.0f} ({paper['iteration_s_at_batch16']:.2f} s/iter, "
                     f"measured at batch {paper['measured_batch']}) | "
                     f"{100 * paper['share']:.4f} % |")
    m = results['machine']
    lines += ['', f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}."]
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--toy-epochs', type=int, default=3)
    parser.add_argument('--batch', type=int, default=2, help='R50 measurement batch size')
    parser.add_argument('--iters', type=int, default=6, help='R50 measured iterations')
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--out', default=str(RESULTS / 'overhead.json'))
    parser.add_argument('--quick', action='store_true', help='toy only, 2 epochs')
    args = parser.parse_args(argv)
    if args.quick:
        args.toy_epochs = 2
    for name in ('toy_epochs', 'batch', 'iters'):
        if getattr(args, name) < (2 if name != 'batch' else 1):
            parser.error(f'--{name.replace("_", "-")} too small: {getattr(args, name)}')
    torch.set_num_threads(args.threads or os.cpu_count())
    results = dict(machine=machine_info())
    with tempfile.TemporaryDirectory(prefix='lrpet_overhead_') as tmp:
        voc = generate_synthetic_voc(Path(tmp) / 'VOCdevkit', num_train=16, num_val=4)
        results['toy'] = toy_overhead(voc, Path(tmp), args.toy_epochs)
        print(markdown(results), flush=True)
        if not args.quick:
            results['paper'] = paper_overhead(voc, Path(tmp), args.batch, args.iters)
    results['targets'] = dict(P2_share_le_0_5pct=(results['paper']['share'] <= 0.005
                                                   if 'paper' in results else None))
    table = markdown(results)
    print(table)
    print('targets:', results['targets'])
    write_results(args.out, results, table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
