#!/usr/bin/env python
"""The prepared GPU check: run the tests marked `cuda` (tests/test_cuda.py: projection on CUDA
against the float64 CPU reference, LRPETHook through an mmengine Runner on CUDA with AMP,
LRPETDDP with NCCL in a 1-process group), then time the projection of each ResNet-50 conv
on the GPU; print a table and write JSON.

Needs torch, mmengine and pytest; imports no mmcv / mmdet / mmseg (the device image has none).
Without a CUDA device every part is reported skipped ("needs a CUDA device") and it exits 0; it
exits 1 if a test fails. The device image's torch (2.11) is outside the supported range, so
LRPET_ALLOW_UNSUPPORTED_VERSIONS=1 is set for the run (versions are then only warned about).
How to run it on the lent device machine: docs/install.md#the-gpu-check.

example:
    python tools/gpu_check.py --out gpu_check.json
    python tools/gpu_check.py --out $OUT/gpu_check.json --repeats 5
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from lrpet_mm.lowrank import (
    LowRankProjector,
    plan_ranks,
    project_low_rank,
    rank_for_ratio,
    select_targets,
)
from lrpet_mm.utils.atomic import atomic_path
from lrpet_mm.utils.environment import ALLOW_UNSUPPORTED_ENV, environment_problems

REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = REPO_ROOT / 'tests' / 'test_cuda.py'
NEEDS_CUDA = 'needs a CUDA device'
RANK_RATIO = 0.5
"""Rank pruning ratio of the timed ResNet-50 projection (k = floor(min(m, n) / 2))."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    paragraphs = __doc__.strip().split('\n\n', 1)
    parser = argparse.ArgumentParser(description=' '.join(paragraphs[0].split()),
                                     epilog=paragraphs[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='JSON file written (atomically)')
    parser.add_argument('--repeats', type=int, default=5,
                        help='timed projections per layer after one warm-up (median kept)')
    parser.add_argument('--skip-tests', action='store_true', help='only the timing')
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f'--repeats must be >= 1, got {args.repeats}')
    return args


def resnet50_conv_shapes() -> List[Tuple[str, Tuple[int, int, int, int]]]:
    """``[(name, (out, in, kh, kw))]`` of the 53 convs of a torchvision / mmdet ResNet-50
    (stem, 16 bottlenecks with their 4 downsample convs), in model order."""
    shapes = [('conv1', (64, 3, 7, 7))]
    channels = 64
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), 1):
        for block in range(blocks):
            name = f'layer{stage}.{block}'
            shapes += [(f'{name}.conv1', (planes, channels, 1, 1)),
                       (f'{name}.conv2', (planes, planes, 3, 3)),
                       (f'{name}.conv3', (planes * 4, planes, 1, 1))]
            if block == 0:
                shapes.append((f'{name}.downsample.0', (planes * 4, channels, 1, 1)))
            channels = planes * 4
    return shapes


def resnet50_conv_bn_model(device: torch.device) -> torch.nn.Module:
    """The ResNet-50 convs, each followed by its BatchNorm (He-initialized weights, BN scales
    in [0.5, 1.5]), as a flat module the projector pairs by structure."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleDict()
    for name, (out, cin, kh, kw) in resnet50_conv_shapes():
        conv = torch.nn.Conv2d(cin, out, (kh, kw), bias=False)
        torch.nn.init.kaiming_normal_(conv.weight)
        bn = torch.nn.BatchNorm2d(out)
        bn.weight.data.uniform_(0.5, 1.5)
        blocks[name.replace('.', '_')] = torch.nn.Sequential(conv, bn)
    return blocks.to(device)


def cuda_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` on the GPU in ms (synchronized), after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def time_resnet50(repeats: int) -> Dict[str, object]:
    """Per-layer projection time of the ResNet-50 convs (float32, BN rectification in the
    kept subspace and energy transfer, as the hook's defaults) on the GPU, the same on the
    CPU once for reference, and one whole LowRankProjector pass on the GPU."""
    if not torch.cuda.is_available():
        return dict(skipped=NEEDS_CUDA)
    cuda = torch.device('cuda')
    model = resnet50_conv_bn_model(cuda)
    layers = []
    for (name, shape), block in zip(resnet50_conv_shapes(), model.values()):
        conv, bn = block
        matrix = conv.weight.detach().reshape(shape[0], -1)
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        rank = rank_for_ratio(*matrix.shape, RANK_RATIO)
        gpu = cuda_ms(lambda: project_low_rank(matrix, rank, row_scale=scale, in_span=True),
                      repeats)
        matrix_cpu, scale_cpu = matrix.cpu(), scale.cpu()
        start = time.perf_counter()
        project_low_rank(matrix_cpu, rank, row_scale=scale_cpu, in_span=True)
        cpu = 1e3 * (time.perf_counter() - start)
        layers.append(dict(name=name, shape=list(matrix.shape), rank=rank, cuda_ms=gpu,
                           cpu_ms=cpu))
    selection = select_targets(model, scope='')
    plan = plan_ranks({t.name: t.matrix_shape for t in selection.targets}, RANK_RATIO)
    projector = LowRankProjector(selection.targets, plan, energy_transfer=True,
                                 bn_recovery='in_span')
    passes = [projector.project(where='timing').seconds for _ in range(3)]
    torch.cuda.synchronize()
    return dict(layers=layers, cuda_total_ms=sum(r['cuda_ms'] for r in layers),
                cpu_total_ms=sum(r['cpu_ms'] for r in layers), repeats=repeats,
                projector_layers=len(plan.layers), projector_pass_ms=[1e3 * s for s in passes],
                cpu_threads=torch.get_num_threads())


class _Collector:
    """pytest plugin: one record per test (outcome, seconds, skip reason or failure text)."""

    def __init__(self) -> None:
        self.records: List[Dict[str, object]] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == 'call' or (report.when == 'setup' and not report.passed):
            message = ''
            if report.skipped and isinstance(report.longrepr, tuple):
                message = str(report.longrepr[2]).replace('Skipped: ', '')
            elif report.failed:
                message = str(report.longrepr)[-3000:]
            outcome = 'error' if report.failed and report.when == 'setup' else report.outcome
            self.records.append(dict(name=report.nodeid.split('::', 1)[-1], outcome=outcome,
                                     seconds=round(report.duration, 3), message=message))

    def pytest_collectreport(self, report) -> None:
        if report.failed:  # e.g. the test module does not import
            self.records.append(dict(name=f'collecting {report.nodeid}', outcome='error',
                                     seconds=0.0, message=str(report.longrepr)[-3000:]))


def run_cuda_tests() -> Tuple[int, List[Dict[str, object]]]:
    """pytest's exit code and the records of ``tests/test_cuda.py -m cuda``, run in-process."""
    import pytest

    collector = _Collector()
    code = pytest.main([str(CUDA_TESTS), '-m', 'cuda', '-q', '-p', 'no:cacheprovider',
                        f'--rootdir={REPO_ROOT}'], plugins=[collector])
    return int(code), collector.records


def machine_info() -> Dict[str, object]:
    info: Dict[str, object] = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        python=platform.python_version(), torch=torch.__version__,
        torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
        cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(0)
    # mmengine's Runner logs collect_env(), which imports distutils (setuptools' shim on 3.12)
    info['distutils'] = importlib.util.find_spec('distutils') is not None
    try:
        import mmengine
        info['mmengine'] = mmengine.__version__
    except ImportError as e:
        info['mmengine'] = f'not importable: {e}'
    return info


def write_json(path: Path, result: Dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + '\n')


def print_tables(result: Dict[str, object]) -> None:
    print(f"\n{'test':<80} {'outcome':<8} {'s':>7}  note")
    for r in result['tests']:
        note = str(r['message']).splitlines()[-1][:60] if r['message'] else ''
        print(f"{str(r['name'])[:80]:<80} {r['outcome']:<8} {r['seconds']:>7.2f}  {note}")
    timing = result['resnet50']
    if 'layers' not in timing:
        print(f'\nResNet-50 projection timing: {timing}')
        return
    print(f"\n{'ResNet-50 conv':<24} {'m x n':>12} {'k':>5} {'CUDA ms':>9} {'CPU ms':>9}")
    for r in timing['layers']:
        m, n = r['shape']
        print(f"{r['name']:<24} {f'{m} x {n}':>12} {r['rank']:>5} {r['cuda_ms']:>9.2f} "
              f"{r['cpu_ms']:>9.2f}")
    print(f"{'total (53 convs)':<24} {'':>12} {'':>5} {timing['cuda_total_ms']:>9.1f} "
          f"{timing['cpu_total_ms']:>9.1f}")
    passes = ', '.join(f'{ms:.1f}' for ms in timing['projector_pass_ms'])
    print(f"LowRankProjector pass over {timing['projector_layers']} layers on the GPU: "
          f'{passes} ms')


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault(ALLOW_UNSUPPORTED_ENV, '1')
    out = Path(args.out)
    start = time.perf_counter()
    result: Dict[str, object] = dict(machine=machine_info(),
                                     environment_problems=environment_problems(
                                         'cuda' if torch.cuda.is_available() else 'cpu'),
                                     tests=[], resnet50=dict(skipped='not run yet'))
    code = 0
    if not args.skip_tests:
        code, result['tests'] = run_cuda_tests()  # 0 also when every test was skipped
    counts: Dict[str, int] = {}
    for r in result['tests']:
        counts[str(r['outcome'])] = counts.get(str(r['outcome']), 0) + 1
    result['test_counts'] = counts
    write_json(out, result)  # the tests' results survive a time-out in the timing
    try:
        result['resnet50'] = time_resnet50(args.repeats)
    except Exception as e:  # noqa: BLE001  (reported in the JSON and the exit code)
        result['resnet50'] = dict(error=f'{type(e).__name__}: {e}')
    result['seconds'] = round(time.perf_counter() - start, 1)
    failed = counts.get('failed', 0) + counts.get('error', 0)
    ok = code == 0 and not failed and 'error' not in result['resnet50']
    result['exit_code'] = exit_code = 0 if ok else 1
    write_json(out, result)
    print_tables(result)
    print(f"\ntests: {', '.join(f'{v} {k}' for k, v in sorted(counts.items())) or 'none'}; "
          f"{result['seconds']} s; JSON: {out}")
    return exit_code


if __name__ == '__main__':
    sys.exit(main())
