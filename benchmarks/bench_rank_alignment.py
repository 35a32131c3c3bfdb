#!/usr/bin/env python
"""Eager CPU latency of a factorized conv pair (k-filter conv, then 1x1 conv) by inner width k:
why the R50 configs use ``rank_multiple=8``.

Layers of the ResNet-50 backbone at 800x1333 with the planner's unaligned rank (e.g. 26) and the
nearest multiples of 8, plus the unfactorized conv; channels_last (oneDNN's fast path), batch 1,
random weights, median of 9 runs after 2 warm-ups, all variants of one layer timed interleaved.
Prints a Markdown table and writes benchmarks/results/rank_alignment.{json,md}.

    python benchmarks/bench_rank_alignment.py [--threads 2]   # ~30 s
    python benchmarks/bench_rank_alignment.py --quick         # activations 1/8 the size, 1 s
"""
import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from benchlib.common import machine_info, write_results
from lrpet_mm.deploy import interleaved_median_ms, torch_threads

REPO = Path(__file__).resolve().parents[1]

# (layer, in channels, out channels, kernel, H, W, ranks: unaligned first)
LAYERS = (('layer1.x.conv2', 64, 64, 3, 200, 334, (26, 24, 32)),
          ('layer1.x.conv3', 64, 256, 1, 200, 334, (26, 24, 32)),
          ('layer2.x.conv2', 128, 128, 3, 100, 167, (52, 48, 56)),
          ('layer3.x.conv2', 256, 256, 3, 50, 84, (105, 104, 112)))


def pair(n_in: int, rank: int, n_out: int, kernel: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(n_in, rank, kernel, padding=kernel // 2, bias=False),
                         nn.Conv2d(rank, n_out, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=None, help='default: all cores')
    parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'results' /
                                             'rank_alignment.json'))
    parser.add_argument('--quick', action='store_true',
                        help='smoke test: activations scaled down 8x per side, 3 runs')
    args = parser.parse_args(argv)
    shrink, repeats, warmup = (8, 3, 1) if args.quick else (1, 9, 2)
    torch.manual_seed(0)
    rows = []
    with torch_threads(args.threads) as threads, torch.no_grad():
        for name, n_in, n_out, kernel, h, w, ranks in LAYERS:
            h, w = max(1, h // shrink), max(1, w // shrink)
            modules = [pair(n_in, k, n_out, kernel) for k in ranks]
            modules.append(nn.Conv2d(n_in, n_out, kernel, padding=kernel // 2))
            for module in modules:
                module.eval().to(memory_format=torch.channels_last)
            x = torch.randn(1, n_in, h, w).contiguous(memory_format=torch.channels_last)
            times = interleaved_median_ms([lambda m=m: m(x) for m in modules], repeats, warmup)
            rows.append(dict(layer=name, shape=f'{n_in}->{n_out}, {kernel}x{kernel}, {h}x{w}',
                             ranks=list(ranks), ms=times[:-1], unfactorized_ms=times[-1]))
        info = dict(machine_info(), threads=threads)
    lines = ['| layer | conv | ' + ' | '.join(['unaligned k', 'ms', 'k', 'ms', 'k', 'ms'])
             + ' | unfactorized ms |', '|---|---|' + '---:|' * 7]
    for r in rows:
        cells = ' | '.join(f'{k} | {ms:.2f}' for k, ms in zip(r['ranks'], r['ms']))
        lines.append(f'| {r["layer"]} | {r["shape"]} | {cells} | {r["unfactorized_ms"]:.2f} |')
    table = '\n'.join(lines) + (f'\n\n{info["cpu"]}, {info["threads"]} threads, torch '
                                f'{info["torch"]}; channels_last, batch 1, median of {repeats} '
                                f'runs after {warmup} warm-ups, variants of a layer timed '
                                'interleaved.\n')
    print(table, end='')
    write_results(args.out, dict(benchmark='rank alignment', machine=info, rows=rows), table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
