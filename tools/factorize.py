#!/usr/bin/env python
"""Factorize an LRPET-trained checkpoint into a compact model that the upstream mmdet / mmseg
tools load: every projected conv becomes two cascaded convs, every projected linear layer two
cascaded linear layers.

example:
    python tools/factorize.py CONFIG CHECKPOINT --work-dir DIR

writes DIR/<config name>_lowrank.py and DIR/<config name>_lowrank.pth; evaluate them with the
upstream tools/test.py of mmdet / mmseg.
"""
import sys

from lrpet_mm.models import NotLowRankError, describe_layers, factorize_checkpoint
from lrpet_mm.utils.cli import add_cfg_options, add_input_shape, run_tool, tool_parser


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument('config', help='the training config (with LRPETHook)')
    parser.add_argument('checkpoint', help='checkpoint saved by the LRPET training run')
    parser.add_argument('--work-dir', required=True,
                        help='directory the compact config and checkpoint are written to')
    parser.add_argument('--name', help='output file stem (default: the config file stem)')
    parser.add_argument('--rank-ratio', type=float, default=None,
                        help='plan ranks like the hook with this ratio instead of reading the '
                             "plan stored in the checkpoint's meta")
    parser.add_argument('--flops-reduction', type=float, default=None,
                        help='plan ranks to remove this share of the scope FLOPs instead')
    add_input_shape(parser, 'input shape for FLOPs counting with --flops-reduction '
                    '(default: from the config, as the hook does)')
    parser.add_argument('--tol', type=float, default=1e-3,
                        help='largest accepted relative rank-k error per layer (default 1e-3)')
    parser.add_argument('--force', action='store_true',
                        help='factorize even if the weights are not low-rank at the plan')
    add_cfg_options(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def factorize() -> int:
        out = factorize_checkpoint(args.config, args.checkpoint, args.work_dir, tol=args.tol,
                                   force=args.force, rank_ratio=args.rank_ratio,
                                   flops_reduction=args.flops_reduction,
                                   flops_input_shape=args.input_shape, name=args.name,
                                   cfg_options=args.cfg_options)
        layers = out.compact.layers
        before = sum(p.numel() for p in out.original.parameters())
        after = sum(p.numel() for p in out.compact.model.parameters())
        print(f'factorized {describe_layers(layers)} (max relative rank-k error '
              f'{max(layer.relative_error for layer in layers):.2e}); model parameters '
              f'{before} -> {after} ({100 * (1 - after / before):.1f} % fewer)')
        if out.flops is not None:
            flops = out.flops
            print(f'planned FLOPs of {flops.get("counted", "the scope")} at input '
                  f'{tuple(flops["input_shape"])}: '
                  f'{flops["flops_before"]} -> {flops["flops_after"]} '
                  f'({100 * flops["reduction"]:.1f} % fewer)')
        print(f'config:     {out.config_path}')
        print(f'checkpoint: {out.checkpoint_path}')
        return 0

    return run_tool(factorize, refused=(NotLowRankError, ))


if __name__ == '__main__':
    sys.exit(main())
