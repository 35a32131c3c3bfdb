#!/usr/bin/env python
"""Export the backbone of a compact (or original) model to ONNX (latency studies) and check
it against PyTorch in onnxruntime.

example:
    python tools/export_onnx.py CONFIG CHECKPOINT --out FILE.onnx \
        [--input-shape C H W] [--no-latency-aware] [--no-check]

CONFIG/CHECKPOINT: tools/factorize.py's *_lowrank.py / *_lowrank.pth, or an original pair.
Only the backbone is exported. Deploy the whole detector / segmentor (post-processing
included) with tools/deploy.py (mmdeploy).
By default low-rank layers measured slower (onnxruntime, this machine, this input size) than
their merged single conv (or linear layer) are merged back first (--no-latency-aware keeps all
factorized).
"""
import sys

from lrpet_mm.deploy import (
    OnnxMismatchError,
    check_onnx_path,
    export_onnx,
    format_size,
    load_model,
)
from lrpet_mm.engine.input_shape import check_input_shape, resolve_input_shape
from lrpet_mm.utils.cli import add_cfg_options, add_input_shape, run_tool, tool_parser


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument('config', help='model config (e.g. tools/factorize.py\'s *_lowrank.py)')
    parser.add_argument('checkpoint', help='checkpoint matching the config')
    parser.add_argument('--out', required=True, help='output .onnx file')
    add_input_shape(parser, 'fixed input shape of the graph (batch 1); default from the '
                    'config (mmseg crop_size, else the test Resize scale)')
    parser.add_argument('--no-latency-aware', action='store_true',
                        help='keep every low-rank layer factorized (no timing, no merge)')
    parser.add_argument('--merge-runtime', choices=('onnxruntime', 'torch'),
                        default='onnxruntime', help='where layers are timed for the merge')
    parser.add_argument('--merge-margin', type=float, default=0.05,
                        help='merge a layer when factorized > (1 + margin) x merged time')
    parser.add_argument('--merge-repeats', type=int, default=10,
                        help='timed runs per layer (median; after 2 warm-up runs)')
    parser.add_argument('--no-check', action='store_true', help='skip the onnxruntime check')
    parser.add_argument('--tol', type=float, default=1e-4,
                        help='largest max|onnx-torch|/max|torch| per output (default 1e-4)')
    parser.add_argument('--opset', type=int, default=17, help='ONNX opset (default 17)')
    parser.add_argument('--threads', type=int, default=None,
                        help='threads for onnxruntime and timing (default: all cores)')
    add_cfg_options(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: export(args), refused=(OnnxMismatchError, ),
                    errors=(FileNotFoundError, PermissionError, ValueError, KeyError,
                            ImportError))


def export(args) -> int:
    check_onnx_path(args.out)  # cheap checks before building the model
    if args.input_shape is not None:
        check_input_shape(args.input_shape)
    model, cfg = load_model(args.config, args.checkpoint, args.cfg_options)
    shape = resolve_input_shape(cfg, args.input_shape)
    result = export_onnx(model, shape, args.out, opset=args.opset,
                         check=not args.no_check, tol=args.tol,
                         latency_aware=not args.no_latency_aware,
                         merge_runtime=args.merge_runtime, merge_repeats=args.merge_repeats,
                         merge_margin=args.merge_margin, threads=args.threads)
    c, h, w = result.input_shape
    print(f'exported the backbone at 1x{c}x{h}x{w} to {result.path}')
    print(f'ONNX file size: {format_size(result.size_bytes)}')
    print(f'low-rank layers in the graph: {result.low_rank_layers}')
    if result.merge is not None:
        print(result.merge.summary())
    print(result.check.summary() if result.check is not None else 'onnxruntime check skipped')
    return 0


if __name__ == '__main__':
    sys.exit(main())
