#!/usr/bin/env python
"""Quality at small scale: LRPET vs LRP / +ET / +BNR, LRA (SVD + fine-tune) and from scratch.

Trains the toy Faster R-CNN (−50 % backbone FLOPs) and PSPNet (−30 %) on the built-in hard
synthetic VOC data on CPU, with the same iterations, data and seeds for every row, evaluates each
compact (factorized) model with the upstream VOC mAP / mIoU, and writes ``quality.json`` and
``quality.md`` (mean ± std over seeds, per-seed values, FLOPs, params, settings, machine).

    python benchmarks/bench_quality.py            # full run: 2 seeds, both tasks (≤ 45 min
                                                  # on 2 CPU cores)
    python benchmarks/bench_quality.py --quick    # smoke test, tiny budgets (≤ 3 min)

The logic is in ``benchlib.quality``. Exit status 1 if any row failed (the other
rows' results are kept), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from benchlib.quality import ROW_KEYS, default_settings, run_benchmark

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='smoke test: 4 train / 4 test images, 4 iterations per row, 1 seed')
    parser.add_argument('--seeds', type=int, default=None, metavar='N',
                        help='number of seeds (0 .. N-1); default 2 (full) or 1 (--quick)')
    parser.add_argument('--det-epochs', type=int, default=None, metavar='E',
                        help='detection epochs of 24 iterations (default 4; --quick: 2 of 2)')
    parser.add_argument('--seg-iters', type=int, default=None, metavar='N',
                        help='segmentation iterations (default 192; --quick: 4); a projection '
                        'every N/6')
    parser.add_argument('--tasks', nargs='+', choices=('det', 'seg'), default=['det', 'seg'],
                        help='tasks to run (default: both)')
    parser.add_argument('--rows', nargs='+', choices=ROW_KEYS, default=list(ROW_KEYS),
                        metavar='ROW', help=f'rows to run (default: all of {", ".join(ROW_KEYS)}'
                        '; lra also trains the baseline)')
    parser.add_argument('--out-dir', default=None,
                        help='where quality.json / quality.md go (default: benchmarks/results, '
                        'or work_dirs/bench_quality/quick/results with --quick)')
    parser.add_argument('--work-dir', default=None,
                        help='data, training runs and logs (default: work_dirs/bench_quality)')
    parser.add_argument('--keep-checkpoints', action='store_true',
                        help='keep the training and compact checkpoints (deleted by default)')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        settings = default_settings(quick=args.quick, seeds=args.seeds, tasks=args.tasks,
                                    det_epochs=args.det_epochs, seg_iters=args.seg_iters)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    work_dir = Path(args.work_dir) if args.work_dir else REPO / 'work_dirs' / 'bench_quality'
    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif args.quick:
        out_dir = work_dir / 'quick' / 'results'
    else:
        out_dir = REPO / 'benchmarks' / 'results'
    command = ' '.join(['python', 'benchmarks/bench_quality.py'] +
                       [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    code, _ = run_benchmark(settings, work_dir, out_dir, rows=args.rows,
                            keep_checkpoints=args.keep_checkpoints,
                            log=lambda m: print(m, flush=True), command=command)
    return code


if __name__ == '__main__':
    sys.exit(main())
