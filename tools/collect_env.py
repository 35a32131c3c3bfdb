#!/usr/bin/env python
"""Print the versions that matter to lrpet_mm (mmdet's collect_env convention: mmengine's
environment report, then torch's CUDA, mmcv and its compiled ops, mmdet, mmseg, mmdeploy,
onnxruntime, lrpet_mm) and check that this environment can train on the device it has.

Exits 1, naming the fix of each problem, when it cannot: a GPU visible but mmcv's ops compiled
without CUDA (or for another CUDA major), mmcv without compiled ops, a version outside the
supported range (lrpet_mm.utils.environment.SUPPORTED_VERSIONS, as pyproject.toml declares),
numpy 2 under torch < 2.3. With LRPET_ALLOW_UNSUPPORTED_VERSIONS=1 out-of-range versions are
only warned about. Versions of the extras (mmdeploy, onnx, ...) out of range are notes.

example:
    python tools/collect_env.py                # the report, then the check
    python tools/collect_env.py --check        # the check alone (silent when all is well)
    python tools/collect_env.py --device cpu   # check for CPU training though a GPU is visible
"""
import argparse
import sys
from typing import Dict, List, Optional

import torch

from lrpet_mm.utils.environment import (
    ALLOW_UNSUPPORTED_ENV,
    SUPPORTED_VERSIONS,
    TRAINING_PACKAGES,
    Environment,
    allow_unsupported_versions,
    collect_environment,
    environment_problems,
    version_in_range,
    version_problems,
)

LABELS = {'mmcv': 'MMCV', 'mmdet': 'MMDetection', 'mmsegmentation': 'MMSegmentation',
          'mmdeploy': 'MMDeploy', 'onnx': 'ONNX', 'onnxruntime': 'ONNX Runtime',
          'torch-pruning': 'Torch-Pruning', 'numpy': 'NumPy', 'lrpet_mm': 'lrpet_mm'}
"""Report label of each distribution (mmengine's report already has PyTorch and MMEngine)."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    paragraphs = __doc__.strip().split('\n\n', 1)
    parser = argparse.ArgumentParser(description=' '.join(paragraphs[0].split()),
                                     epilog=paragraphs[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto',
                        help='the device to check training on (auto: cuda when torch sees a '
                             'GPU, else cpu)')
    parser.add_argument('--check', action='store_true',
                        help='print only problems and warnings; exit 1 on a problem')
    return parser.parse_args(argv)


def base_report() -> Dict[str, object]:
    """mmengine's ``collect_env()`` (Python, GCC, CUDA, GPUs, PyTorch and its build, ...), or
    the basics if mmengine cannot give it."""
    try:
        from mmengine.utils.dl_utils import collect_env
        return dict(collect_env())
    except Exception as e:  # noqa: BLE001  (a broken mmengine must not hide the rest)
        return {'sys.platform': sys.platform, 'Python': sys.version.replace('\n', ''),
                'CUDA available': torch.cuda.is_available(), 'PyTorch': torch.__version__,
                'MMEngine': f'n/a ({type(e).__name__}: {e})'}


def version_text(name: str, version: Optional[str]) -> str:
    """``version``, marked when outside the supported range; ``'not installed'`` for None."""
    if version is None:
        return 'not installed'
    spec = SUPPORTED_VERSIONS.get(name)
    if spec and not version_in_range(version, spec):
        return f'{version} (outside the supported {spec})'
    return version


def package_report(env: Environment) -> Dict[str, object]:
    """Our lines: torch's CUDA, mmcv's ops, and the versions of the packages that matter."""
    report: Dict[str, object] = {'PyTorch CUDA': env.torch_cuda or 'none (CPU build)'}
    report['MMCV'] = version_text('mmcv', env.versions.get('mmcv'))
    if env.has_mmcv:
        if env.mmcv_ops_error is not None:
            report['MMCV ops'] = f'not usable ({env.mmcv_ops_error})'
        else:
            report['MMCV Compiler'] = env.mmcv_ops_compiler
            report['MMCV CUDA Compiler'] = env.mmcv_ops_cuda or 'not available (CPU-only ops)'
    for name, label in LABELS.items():
        if name != 'mmcv':
            report[label] = version_text(name, env.versions.get(name))
    return report


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    env = collect_environment()
    device = torch.device(args.device if args.device != 'auto'
                          else 'cuda' if env.gpu_visible else 'cpu')
    allow = allow_unsupported_versions()
    problems = environment_problems(device, env, check_versions=not allow)
    warnings = [f'{text} ({ALLOW_UNSUPPORTED_ENV} is set)'
                for text in (version_problems(env.versions) if allow else [])]
    warnings += version_problems(env.versions, tuple(
        name for name in SUPPORTED_VERSIONS if name not in TRAINING_PACKAGES))
    if not args.check:
        report = base_report()
        report.update(package_report(env))
        for key, value in report.items():
            print(f'{key}: {value}')
        print(f'training check ({device}): ' + ('OK' if not problems else
                                                f'{len(problems)} problem(s)'))
    for text in warnings:
        print(f'warning: {text}', file=sys.stderr)
    for text in problems:
        print(f'error: {text}', file=sys.stderr)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
