#!/usr/bin/env python
"""Report FLOPs, parameters and the task metric of an LRPET model: projected vs compact.

    python tools/report.py CONFIG CHECKPOINT --out DIR \
        [--lowrank-config C --lowrank-checkpoint K] [--input-shape C H W]

writes DIR/report.md, DIR/report.json and DIR/ranks.png and prints the Markdown table. Without
--lowrank-*, the checkpoint is factorized first (as tools/factorize.py, into DIR). The metric
(VOC mAP / mIoU) comes from the config's test loop run on both models (work dirs in DIR/eval).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrpet_mm.analysis.report import (EvaluationError, generate_report,  # noqa: E402
                                      markdown_table)
from lrpet_mm.models import NotLowRankError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='the training config (with LRPETHook)')
    parser.add_argument('checkpoint', help='checkpoint saved by the LRPET training run')
    parser.add_argument('--out', required=True, help='output directory of the report')
    parser.add_argument('--lowrank-config', help="tools/factorize.py's config (*_lowrank.py)")
    parser.add_argument('--lowrank-checkpoint',
                        help="tools/factorize.py's checkpoint (*_lowrank.pth)")
    parser.add_argument('--input-shape', type=int, nargs=3, default=None,
                        metavar=('C', 'H', 'W'),
                        help='input shape for FLOPs (default: 3 600 1000 for mmdet configs, '
                             '3 512 512 for mmseg configs)')
    parser.add_argument('--no-eval', action='store_true',
                        help='skip the test loops (no metric): FLOPs, params and ranks only')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    parser.add_argument('--verbose', action='store_true',
                        help="show the test runners' full console log")
    args = parser.parse_args(argv)
    if (args.lowrank_config is None) != (args.lowrank_checkpoint is None):
        parser.error('give both --lowrank-config and --lowrank-checkpoint, or neither')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = generate_report(args.config, args.checkpoint, args.out,
                                 lowrank_config=args.lowrank_config,
                                 lowrank_checkpoint=args.lowrank_checkpoint,
                                 input_shape=args.input_shape, evaluate=not args.no_eval,
                                 progress=not args.no_progress, verbose=args.verbose)
    except (FileNotFoundError, PermissionError, ValueError, KeyError, EvaluationError) as e:
        kind = 'refused' if isinstance(e, NotLowRankError) else 'error'
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f'{kind}: {message}', file=sys.stderr)
        return 2
    for warning in report['warnings']:
        print(f'warning: {warning}', file=sys.stderr)
    print(markdown_table(report), end='')
    for name, path in report['files'].items():
        print(f'{name}: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
