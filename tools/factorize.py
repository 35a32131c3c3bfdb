#!/usr/bin/env python
"""Factorize an LRPET-trained checkpoint into a compact model for the upstream tools.

    python tools/factorize.py CONFIG CHECKPOINT --out-dir DIR

writes DIR/<config name>_lowrank.py and DIR/<config name>_lowrank.pth; evaluate them with the
upstream ``tools/test.py`` of mmdet / mmseg.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrpet_mm.models import NotLowRankError, factorize_checkpoint  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('config', help='the training config (with LRPETHook)')
    parser.add_argument('checkpoint', help='checkpoint saved by the LRPET training run')
    parser.add_argument('--out-dir', required=True, help='where the compact files go')
    parser.add_argument('--name', help='output file stem (default: the config file stem)')
    parser.add_argument('--rank-ratio', type=float, default=None,
                        help='plan ranks like the hook with this ratio instead of reading the '
                             "plan stored in the checkpoint's meta")
    parser.add_argument('--flops-reduction', type=float, default=None,
                        help='plan ranks to remove this share of the scope FLOPs instead')
    parser.add_argument('--input-shape', type=int, nargs=3, default=None,
                        metavar=('C', 'H', 'W'), help='input shape for FLOPs counting '
                        '(default: from the config)')
    parser.add_argument('--tol', type=float, default=1e-3,
                        help='largest accepted relative rank-k error per layer (default 1e-3)')
    parser.add_argument('--force', action='store_true',
                        help='factorize even if the weights are not low-rank at the plan')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = factorize_checkpoint(args.config, args.checkpoint, args.out_dir, tol=args.tol,
                                   force=args.force, rank_ratio=args.rank_ratio,
                                   flops_reduction=args.flops_reduction,
                                   flops_input_shape=args.input_shape, name=args.name)
    except (FileNotFoundError, PermissionError, ValueError, KeyError) as e:
        kind = 'refused' if isinstance(e, NotLowRankError) else 'error'
        print(f'{kind}: {e}', file=sys.stderr)
        return 2
    layers = out.compact.layers
    before = sum(p.numel() for p in out.original.parameters())
    after = sum(p.numel() for p in out.compact.model.parameters())
    print(f'factorized {len(layers)} convs (max relative rank-k error '
          f'{max(layer.relative_error for layer in layers):.2e}); model parameters '
          f'{before} -> {after} ({100 * (1 - after / before):.1f} % fewer)')
    print(f'config:     {out.config_path}')
    print(f'checkpoint: {out.checkpoint_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
