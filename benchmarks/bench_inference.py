#!/usr/bin/env python
"""Inference latency, original vs compact (factorized) model: CPU, batch 1, eager and ORT.

ResNet-50 backbone and whole Faster R-CNN (configs/lrpet/faster-rcnn_r50_fpn_lrpet_1x_voc0712.py,
−50 % backbone FLOPs) and whole PSPNet R50-D8 (configs/lrpet/pspnet_*.py, −30 %), random weights
made exactly low-rank at the planner's ranks; original / factorized / latency-merged, timed
interleaved; median of N runs after warm-up; freed memory retained by the allocator unless
--allocator default. At 3x512x512 and 3x800x1333: the backbone in PyTorch eager (NCHW and
channels_last) and onnxruntime, the whole models' eager tensor forward. At each config's test
size: the whole deployed model, mmdeploy's end-to-end ONNX (NMS / RoI head in the graph) in
ONNX Runtime, as tools/deploy.py writes it, for these configs and, beside them, the
whole-model configs (configs/lrpet/*_lrpet-model_*.py: −50 % whole-model FLOPs, neck and heads
factorized too; --no-whole-model skips them, --deployed-only runs the deployed rows alone).
Prints a Markdown table and writes benchmarks/results/inference.{json,md}.

    python benchmarks/bench_inference.py --threads 2   # full run (~30 min on the 2-core dev
                                                       # machine)
    python benchmarks/bench_inference.py --quick       # toy R-18 configs at 3x128x128 (~1-2
                                                       # min); writes
                                                       # work_dirs/bench_inference/quick/

The logic is in ``benchlib.inference``. Exit status 2 on bad arguments.
"""
import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

from benchlib.inference import default_settings, markdown, run_benchmark

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--quick', action='store_true',
                        help='toy R-18 configs, one input (3x128x128), NCHW only, 2 repeats')
    parser.add_argument('--threads', type=int, default=None,
                        help='intra-op threads for PyTorch and onnxruntime (default: all cores)')
    parser.add_argument('--repeats', type=int, default=None,
                        help='timed runs per measurement (default 5; 2 with --quick)')
    parser.add_argument('--warmup', type=int, default=None, help='untimed runs first (default 1)')
    parser.add_argument('--merge-repeats', type=int, default=None,
                        help='timed runs per layer in the latency-aware merge (default 5; 2 '
                             'with --quick)')
    parser.add_argument('--merge-margin', type=float, default=None,
                        help='merge a layer when factorized > (1 + margin) x merged time '
                             '(default 0.05)')
    parser.add_argument('--inputs', nargs='+', default=None, metavar='HxW',
                        help='input sizes of the eager and backbone rows (default 512x512 '
                             '800x1333; --quick: 128x128); the deployed rows run at the '
                             "configs' test sizes")
    parser.add_argument('--no-onnx', action='store_true', help='eager PyTorch only')
    parser.add_argument('--no-deploy', action='store_true',
                        help='skip the mmdeploy end-to-end rows of the whole models')
    parser.add_argument('--no-segmentor', action='store_true', help='skip PSPNet')
    parser.add_argument('--no-whole-model', action='store_true',
                        help='skip the deployed whole-model LRPET configs')
    parser.add_argument('--deployed-only', action='store_true',
                        help='only the mmdeploy end-to-end rows (no eager / backbone rows)')
    parser.add_argument('--layouts', nargs='+', default=None,
                        choices=('contiguous', 'channels_last'),
                        help='eager memory formats timed (default: both)')
    parser.add_argument('--allocator', default=None, choices=('retain', 'default'),
                        help="'retain' (default): keep freed memory in the process "
                             "(benchlib.cpu_allocator.retain_freed_memory) so eager PyTorch does "
                             "not page-fault its activations in on every forward; 'default': "
                             'glibc as it is')
    parser.add_argument('--out', default=None,
                        help='output stem (default benchmarks/results/inference, '
                             'benchmarks/results/inference_deployed with --deployed-only, or '
                             'work_dirs/bench_inference/quick/inference with --quick)')
    return parser.parse_args(argv)


def parse_sizes(texts: List[str]) -> tuple:
    shapes = []
    for text in texts:
        parts = text.lower().split('x')
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f'--inputs takes sizes like 512x512, got {text!r}')
        shapes.append((3, int(parts[0]), int(parts[1])))
    return tuple(shapes)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        settings = default_settings(
            quick=args.quick, threads=args.threads, repeats=args.repeats, warmup=args.warmup,
            merge_repeats=args.merge_repeats, merge_margin=args.merge_margin,
            shapes=parse_sizes(args.inputs) if args.inputs else None,
            onnx=False if args.no_onnx else None,
            deploy=False if args.no_deploy else None,
            segmentor=False if args.no_segmentor else None,
            whole_model=False if args.no_whole_model else None,
            deployed_only=True if args.deployed_only else None,
            layouts=tuple(args.layouts) if args.layouts else None, allocator=args.allocator)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
    elif args.quick:
        out = REPO / 'work_dirs' / 'bench_inference' / 'quick' / 'inference'
    elif args.deployed_only:  # not the full run's file
        out = REPO / 'benchmarks' / 'results' / 'inference_deployed'
    else:
        out = REPO / 'benchmarks' / 'results' / 'inference'
    command = ' '.join(['python', 'benchmarks/bench_inference.py'] +
                       [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])

    def log(message: str) -> None:
        print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)

    result = run_benchmark(settings, out, log=log, command=command)
    print(markdown(result), end='')
    p3 = result['p3']
    print(f'P3 (backbone rows): {p3["passed"]} of {p3["rows"]} pass; wall '
          f'{result["wall_seconds"]:.0f} s; wrote {" and ".join(result["files"])}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
