#!/usr/bin/env python
"""Evidence benchmark: LRPET vs decompose-then-finetune and channel pruning, paired seeds.

Fine-tunes Faster R-CNN (−50 % backbone FLOPs) or PSPNet (−30 %) from a ResNet-18 deep-stem
backbone the package pretrains on a synthetic classification task (built once, cached), with
the same seeds, data order and test set for every row; evaluates every compressed row as its
deployed model and writes ``quality_<task>.json`` / ``.md`` (per-seed numbers, mean ± std,
paired differences to LRPET with 95 % intervals, training time, FLOPs, params, ONNX Runtime
latency of each deployed backbone, settings, machine). One task per run:

    python benchmarks/bench_quality.py --tasks det      # main run (≤ 90 min on 2 cores)
    python benchmarks/bench_quality.py --tasks seg
    python benchmarks/bench_quality.py --tasks det --ablation   # paper-exact, LRA pretrained
    python benchmarks/bench_quality.py --quick          # smoke test, tiny budgets
    python benchmarks/bench_quality.py --pilot --tasks det   # baseline-only pilot: T and n
    python benchmarks/bench_quality.py --tasks det --data-root /data/VOCdevkit

``--pilot`` trains only the baseline, for each candidate T and 4 seeds of its own, and fixes
the protocol's T and number of seeds by a rule written before it runs
(``benchlib.quality.pilot``; ``pilot_<task>.{json,md}``).

The logic is in ``benchlib.quality`` (rows and configs, statistics, tables, the run). Exit
status 1 if any row failed (the other rows' results are kept), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from benchlib.common import REPO_ROOT
from benchlib.quality.configs import ABLATION_ROWS, MAIN_ROWS, ROW_KEYS, default_settings
from benchlib.quality.orchestration import run_benchmark


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='smoke test: 8 train / 4 test images, T = 4, 2 seeds, a tiny '
                        'pretraining')
    parser.add_argument('--tasks', nargs='+', choices=('det', 'seg'), default=['det'],
                        help='task(s) to run (default: det); one per run keeps a run ≤ 90 min')
    parser.add_argument('--seeds', type=int, default=None, metavar='N',
                        help='number of paired seeds (0 .. N-1); default the pilot\'s decision '
                        '(configs.PROTOCOL: det 4, seg 6; --quick: 2)')
    parser.add_argument('--det-iters', type=int, default=None, metavar='T',
                        help='detection training iterations T, even (default 640, the pilot\'s)')
    parser.add_argument('--seg-iters', type=int, default=None, metavar='T',
                        help='segmentation training iterations T, even (default 640, the '
                        'pilot\'s)')
    rows = parser.add_mutually_exclusive_group()
    rows.add_argument('--rows', nargs='+', choices=ROW_KEYS, default=None, metavar='ROW',
                      help=f'rows to run, of {", ".join(ROW_KEYS)} (default: the main run\'s '
                      f'{", ".join(MAIN_ROWS)}; the half rows also train the baseline, prune '
                      'also LRPET)')
    rows.add_argument('--ablation', action='store_true',
                      help=f'the ablation run instead: {", ".join(ABLATION_ROWS)} (results in '
                      'quality_<task>_ablation.*)')
    parser.add_argument('--data-root', default=None, metavar='DIR',
                        help='a VOCdevkit directory to run the protocol on (default: the '
                        'built-in synthetic data, generated under --work-dir)')
    parser.add_argument('--cache-dir', default=None, metavar='DIR',
                        help='where the pretrained backbone is cached (default: '
                        '$LRPET_MM_CACHE or ~/.cache/lrpet_mm)')
    parser.add_argument('--out-dir', default=None,
                        help='where the results go (default: benchmarks/results, or '
                        '<work-dir>/quick/results with --quick)')
    parser.add_argument('--work-dir', default=None,
                        help='data, training runs and logs (default: work_dirs/bench_quality)')
    parser.add_argument('--pilot', action='store_true',
                        help='baseline-only pilot: every candidate T (det and seg: 160, 320, '
                        '640) with seeds 1000.. (default 4, --seeds N) on 400 test images, '
                        'then the rule of benchlib.quality.pilot picks T and n (default out: '
                        'benchmarks/results/pilot)')
    parser.add_argument('--redecide', action='store_true',
                        help='with --pilot: apply the rule again to the pilot_<task>.json '
                        'already in the output directory (no training)')
    parser.add_argument('--resume', action='store_true',
                        help='continue the run whose results are in the output directory: its '
                        'finished seeds are kept, a seed left half done runs again whole '
                        '(refused if that run had other settings or rows)')
    parser.add_argument('--keep-checkpoints', action='store_true',
                        help='keep the training and compact checkpoints (deleted by default)')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        settings = default_settings(quick=args.quick, seeds=args.seeds, tasks=args.tasks,
                                    det_iters=args.det_iters, seg_iters=args.seg_iters)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.data_root and not Path(args.data_root).is_dir():
        print(f'error: --data-root {args.data_root} is not a directory', file=sys.stderr)
        return 2
    work_dir = Path(args.work_dir) if args.work_dir else REPO_ROOT / 'work_dirs' / 'bench_quality'
    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif args.quick:
        out_dir = work_dir / 'quick' / 'results'
    else:
        out_dir = REPO_ROOT / 'benchmarks' / 'results'
    if args.pilot and not args.out_dir:
        out_dir = out_dir.parent / 'pilot' if args.quick else out_dir / 'pilot'
    args.out_dir = out_dir
    command = ' '.join(['python', 'benchmarks/bench_quality.py'] +
                       [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    if args.pilot:
        return pilot(args, settings, work_dir, command)
    rows = ABLATION_ROWS if args.ablation else (args.rows or MAIN_ROWS)
    try:
        code, _ = run_benchmark(settings, work_dir, args.out_dir, rows=rows,
                                variant='ablation' if args.ablation else None,
                                resume=args.resume,
                                data_root=args.data_root, cache_dir=args.cache_dir,
                                keep_checkpoints=args.keep_checkpoints,
                                log=lambda m: print(m, flush=True), command=command)
    except ValueError as e:  # --resume of another protocol's results
        print(f'error: {e}', file=sys.stderr)
        return 2
    return code


def pilot(args: argparse.Namespace, settings, work_dir: Path, command: str) -> int:
    """The baseline-only pilot of ``settings.tasks`` (``--pilot``)."""
    from benchlib.quality import pilot as p

    if args.data_root:
        print('error: --pilot runs on the built-in data only', file=sys.stderr)
        return 2
    seeds = None
    if args.seeds is not None:
        seeds = range(p.PILOT_SEEDS[0], p.PILOT_SEEDS[0] + args.seeds)
    if args.quick:
        rules = {t.key: p.QUICK_RULE for t in settings.tasks}
    else:
        rules = {'det': p.DET_RULE, 'seg': p.SEG_RULE}
    if args.redecide:
        for task in settings.tasks:
            path = Path(args.out_dir) / f'pilot_{task.key}.json'
            if not path.is_file():
                print(f'error: --redecide: {path} does not exist', file=sys.stderr)
                return 2
            p.redecide(path, rules[task.key])
        return 0
    code, _ = p.run_pilot(p.pilot_settings(settings, seeds), rules, work_dir, args.out_dir,
                          cache_dir=args.cache_dir, log=lambda m: print(m, flush=True),
                          command=command)
    return code


if __name__ == '__main__':
    sys.exit(main())
