"""Shared plumbing of the ``benchmarks/`` scripts: one machine description and atomic output."""
import contextlib
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from lrpet_mm.utils.atomic import atomic_path
from lrpet_mm.utils.values import finite_or_none

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository (benchmarks run from a checkout, configs are read from ``configs/``)."""


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.lower().startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine() or 'unknown CPU'


def git_state() -> Tuple[Optional[str], Optional[bool]]:
    """``(commit, dirty)`` of the repository, ``(None, None)`` outside a git checkout."""
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=REPO_ROOT, check=True, capture_output=True, text=True,
                               timeout=10).stdout.strip() != ''
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - informational only
        return None


def machine_info(device: Optional[torch.device] = None) -> dict:
    """The machine a benchmark ran on (one schema for every script): CPU model, cores, torch
    threads, platform and library versions, load average, git commit, and the GPU for a CUDA
    ``device``."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    info = dict(cpu=cpu_model(), cores=os.cpu_count(), usable_cores=usable,
                threads=torch.get_num_threads(), platform=platform.platform(),
                python=platform.python_version(), device=str(device or 'cpu'))
    for name in ('torch', 'numpy', 'mmengine', 'mmcv', 'mmdet', 'mmseg', 'onnx',
                 'onnxruntime'):
        info[name] = _version(name)
    if device is not None and torch.device(device).type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, AttributeError):
        info['load_average'] = [round(v, 2) for v in os.getloadavg()]
    info['git_commit'], info['git_dirty'] = git_state()
    return info


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def write_results(out: Union[str, os.PathLike], data: dict, table: str) -> Path:
    """Write ``data`` as JSON to ``out`` (non-finite floats as null) and ``table`` to ``out``
    with suffix ``.md``, each atomically (temporary file, then rename). Returns the JSON path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(finite_or_none(data), indent=2) + '\n')
    with atomic_path(out.with_suffix('.md')) as tmp:
        Path(tmp).write_text(table)
    print(f'wrote {out} and {out.with_suffix(".md")}')
    return out
