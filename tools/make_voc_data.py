#!/usr/bin/env python
"""Write the built-in synthetic data set in Pascal VOC layout (for the toy configs).

example:
    python tools/make_voc_data.py --data-root data/VOCdevkit --num-train 16 --num-val 8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from lrpet_mm.datasets.synthetic_voc import (
    DEFAULT_CLASSES,
    VOC_CLASSES,
    generate_synthetic_voc,
    read_stamp,
)
from lrpet_mm.utils.cli import tool_parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    parser.add_argument('--data-root', default='data/VOCdevkit',
                        help='VOCdevkit directory to create (default: %(default)s)')
    parser.add_argument('--num-train', type=int, default=16,
                        help='VOC2007 trainval / VOC2012 train images (default: %(default)s)')
    parser.add_argument('--num-val', type=int, default=8,
                        help='VOC2007 test / VOC2012 val images (default: %(default)s)')
    parser.add_argument('--size', type=int, nargs=2, default=(160, 128), metavar=('W', 'H'),
                        help='image width and height in pixels (default: 160 128)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default: 0)')
    parser.add_argument('--classes', nargs='+', default=list(DEFAULT_CLASSES),
                        choices=VOC_CLASSES, metavar='NAME',
                        help='VOC classes to draw (default: %(default)s)')
    parser.add_argument('--hard', action='store_true',
                        help='textured backgrounds, wider scale range, overlapping objects')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace a synthetic data set made with other arguments')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.data_root)
    reused = read_stamp(out) is not None and not args.overwrite
    try:
        root = generate_synthetic_voc(out, num_train=args.num_train, num_val=args.num_val,
                                      img_size=tuple(args.size), seed=args.seed,
                                      overwrite=args.overwrite, classes=args.classes,
                                      hard=args.hard)
    except (ValueError, FileExistsError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    n_files = sum(1 for p in root.rglob('*') if p.is_file())
    print(f'{"reused" if reused else "wrote"} {root} ({n_files} files)')
    print(f'  detection   : {root}/VOC2007  trainval={args.num_train}  test={args.num_val}  '
          f'(+ VOC2012 trainval={args.num_train + args.num_val})')
    print(f'  segmentation: {root}/VOC2012  train={args.num_train}  val={args.num_val}  '
          f'aug={args.num_train}')
    print(f'  images {args.size[0]}x{args.size[1]}, classes {", ".join(args.classes)}, '
          f'seed {args.seed}{", hard" if args.hard else ""}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
