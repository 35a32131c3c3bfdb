#!/usr/bin/env python
"""Report FLOPs, parameters and the task metric of an LRPET model: the projected model
beside its compact factorization.

example:
    python tools/report.py CONFIG CHECKPOINT --work-dir DIR \
        [--lowrank-config C --lowrank-checkpoint K] [--input-shape C H W]

writes DIR/report.md, DIR/report.json and DIR/ranks.png and prints the Markdown table. Without
--lowrank-*, the checkpoint is factorized first (as tools/factorize.py, into DIR). The metric
(VOC mAP / mIoU) comes from the config's test loop run on both models (work dirs in DIR/eval).
"""
import sys

from lrpet_mm.models import NotLowRankError
from lrpet_mm.report import EvaluationError, generate_report
from lrpet_mm.report.markdown import markdown_table
from lrpet_mm.utils.cli import add_cfg_options, add_input_shape, run_tool, tool_parser


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument('config', help='the training config (with LRPETHook)')
    parser.add_argument('checkpoint', help='checkpoint saved by the LRPET training run')
    parser.add_argument('--work-dir', required=True, help='directory the report is written to')
    parser.add_argument('--lowrank-config', help="tools/factorize.py's config (*_lowrank.py)")
    parser.add_argument('--lowrank-checkpoint',
                        help="tools/factorize.py's checkpoint (*_lowrank.pth)")
    add_input_shape(parser, 'input shape for FLOPs (default: from the config, the shape the '
                    "hook's planner uses: mmseg crop_size, else the test Resize scale)")
    parser.add_argument('--no-eval', action='store_true',
                        help='skip the test loops (no metric): FLOPs, params and ranks only')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    parser.add_argument('--verbose', action='store_true',
                        help="show the test runners' full console log")
    add_cfg_options(parser)
    args = parser.parse_args(argv)
    if (args.lowrank_config is None) != (args.lowrank_checkpoint is None):
        parser.error('give both --lowrank-config and --lowrank-checkpoint, or neither')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def report() -> int:
        result = generate_report(args.config, args.checkpoint, args.work_dir,
                                 lowrank_config=args.lowrank_config,
                                 lowrank_checkpoint=args.lowrank_checkpoint,
                                 input_shape=args.input_shape, evaluate=not args.no_eval,
                                 progress=not args.no_progress, verbose=args.verbose,
                                 cfg_options=args.cfg_options)
        for warning in result['warnings']:
            print(f'warning: {warning}', file=sys.stderr)
        print(markdown_table(result), end='')
        for name, path in result['files'].items():
            print(f'{name}: {path}')
        return 0

    return run_tool(report, refused=(NotLowRankError, ),
                    errors=(FileNotFoundError, PermissionError, ValueError, KeyError,
                            EvaluationError))


if __name__ == '__main__':
    sys.exit(main())
