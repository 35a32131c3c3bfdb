#!/usr/bin/env python
"""Where eager PyTorch spends a ResNet-50 backbone's CPU time, original vs factorized, in NCHW
(``contiguous``) and ``channels_last``: why the compact backbone's eager NCHW speedup falls
short of its FLOPs ratio (issue target P3) while channels_last meets it.

Builds the R50 Faster R-CNN config's backbone with random weights, factorizes it at the
config's budget (as ``bench_inference.py``), folds every BN, then per input size and layout:
the median latency of ``--repeats`` interleaved runs, and one ``torch.profiler`` pass whose
self CPU time is split into convolutions (oneDNN's ``mkldnn_convolution``, which includes
its layout reorders), max-pooling, element-wise ops (residual add, ReLU) and the rest.
Batch 1, freed memory retained (``benchlib.cpu_allocator.retain_freed_memory``). Prints a Markdown
table and writes benchmarks/results/eager_profile.{json,md}.

    python benchmarks/bench_eager_profile.py [--threads 2]     # under 2 min
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from benchlib.common import machine_info, write_results
from benchlib.cpu_allocator import retain_freed_memory
from benchlib.fold import fold_batchnorms
from lrpet_mm.deploy import (
    MEMORY_FORMATS,
    check_memory_format,
    interleaved_median_ms,
    torch_threads,
)
from lrpet_mm.engine.flops import count_flops

REPO = Path(__file__).resolve().parents[1]

CONFIG = REPO / 'configs' / 'lrpet' / 'faster-rcnn_r50_fpn_lrpet_1x_voc0712.py'
#: Profiler categories of self CPU time, matched in this order on the op name.
CATEGORIES = (('convolution', ('conv',)), ('max-pool', ('max_pool',)),
              ('element-wise', ('add', 'clamp', 'relu')))


def category_of(op_name: str) -> str:
    """The :data:`CATEGORIES` entry an ATen op name falls in, else ``'other'``."""
    for category, keys in CATEGORIES:
        if any(key in op_name for key in keys):
            return category
    return 'other'


def profile_ms(model: nn.Module, x: torch.Tensor) -> Dict[str, float]:
    """Self CPU time (ms) of one forward, by category (plus ``'total'``)."""
    totals: Dict[str, float] = defaultdict(float)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    for event in prof.key_averages():
        totals[category_of(event.key)] += event.self_cpu_time_total / 1e3
    totals['total'] = sum(totals.values())
    return {name: totals.get(name, 0.0)
            for name in [c for c, _ in CATEGORIES] + ['other', 'total']}


def backbones(config: Path, plan_shape: Optional[Sequence[int]] = None) -> Dict[str, nn.Module]:
    """``{'original', 'factorized'}`` BN-folded R50 backbones (random weights, eval mode)."""
    from benchlib.synthetic import random_init_config, synthetic_compact_model
    synthetic = synthetic_compact_model(random_init_config(config), flops_input_shape=plan_shape)
    return {'original': fold_batchnorms(synthetic.original.backbone)[0],
            'factorized': fold_batchnorms(synthetic.compact.model.backbone)[0]}


def measure(models: Dict[str, nn.Module], shape: Sequence[int], layout: str, repeats: int,
            warmup: int) -> dict:
    """One row: latency, FLOPs and profiled categories of both models at ``shape``."""
    memory_format = check_memory_format(layout)
    x = torch.randn(1, *shape).contiguous(memory_format=memory_format)
    for model in models.values():
        model.to(memory_format=memory_format)
    names = list(models)
    latency = interleaved_median_ms([lambda m=models[n]: m(x) for n in names], repeats, warmup)
    row = dict(input='x'.join(map(str, shape)), layout=layout)
    for name, ms in zip(names, latency):
        row[name] = dict(ms=ms, flops=count_flops(models[name], shape),
                         convs=sum(isinstance(m, nn.Conv2d) for m in models[name].modules()),
                         profile_ms=profile_ms(models[name], x))
    original, factorized = row['original'], row['factorized']
    row['flops_ratio'] = original['flops'] / factorized['flops']
    row['speedup'] = original['ms'] / factorized['ms']
    conv = [m['profile_ms']['convolution'] for m in (original, factorized)]
    row['convolution_speedup'] = conv[0] / conv[1]
    return row


def markdown(rows: List[dict], info: dict) -> str:
    lines = ['| input | layout | original ms | factorized ms | speedup / FLOPs ratio | '
             'convolutions: layers, ms (orig → fact.) | convolution speedup / FLOPs ratio | '
             'max-pool ms (orig → fact.) | element-wise ms | other ms |',
             '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        o, f = r['original']['profile_ms'], r['factorized']['profile_ms']
        pair = lambda key: f'{o[key]:.1f} → {f[key]:.1f}'  # noqa: E731
        lines.append(
            f"| {r['input']} | {r['layout']} | {r['original']['ms']:.1f} | "
            f"{r['factorized']['ms']:.1f} | {r['speedup'] / r['flops_ratio']:.2f} | "
            f"{r['original']['convs']}, {o['convolution']:.1f} → {r['factorized']['convs']}, "
            f"{f['convolution']:.1f} | {r['convolution_speedup'] / r['flops_ratio']:.2f} | "
            f"{pair('max-pool')} | {pair('element-wise')} | {pair('other')} |")
    lines += ['', f"ResNet-50 backbone of {CONFIG.name} (random weights, BN folded), factorized "
              f"at the config's budget (FLOPs ratio {rows[0]['flops_ratio']:.2f}); batch 1, "
              f"median of {info['repeats']} interleaved runs after {info['warmup']} warm-up; "
              f"category times: self CPU time of one torch.profiler pass. CPU: {info['cpu']}, "
              f"{info['threads']} threads, torch {info['torch']}."]
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--inputs', nargs='+', default=['512x512', '800x1333'],
                        help='HxW sizes (3 channels)')
    parser.add_argument('--layouts', nargs='+', default=list(MEMORY_FORMATS),
                        choices=list(MEMORY_FORMATS))
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help='default: all cores')
    parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'results' /
                                             'eager_profile.json'))
    args = parser.parse_args(argv)
    try:
        shapes = [(3, *map(int, text.lower().split('x'))) for text in args.inputs]
    except ValueError:
        parser.error(f'--inputs must be HxW sizes like 512x512, got {args.inputs}')
    if any(len(s) != 3 or min(s[1:]) < 32 for s in shapes):
        parser.error(f'--inputs must be HxW sizes of at least 32x32, got {args.inputs}')
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f'--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, '
                     f'{args.warmup}')
    retain_freed_memory()
    rows = []
    with torch_threads(args.threads) as threads, torch.no_grad():
        models = backbones(CONFIG, None)  # planned at the config's input size
        for shape in shapes:
            for layout in args.layouts:
                rows.append(measure(models, shape, layout, args.repeats, args.warmup))
                print(f"{rows[-1]['input']} {layout}: {rows[-1]['speedup']:.2f}x "
                      f"(FLOPs {rows[-1]['flops_ratio']:.2f}x)", file=sys.stderr, flush=True)
        info = dict(machine_info(), threads=threads, repeats=args.repeats, warmup=args.warmup)
    table = markdown(rows, info)
    print(table, end='')
    write_results(args.out, dict(settings=info, rows=rows), table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
