"""Shared plumbing of the ``benchmarks/`` scripts: machine description and atomic output."""
import json
import os
import platform
from pathlib import Path
from typing import Optional, Union

import torch

from .atomic import atomic_path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def machine_info(device: Optional[torch.device] = None) -> dict:
    """CPU model, cores, torch threads and versions (and the GPU for a CUDA ``device``)."""
    info = dict(cpu=cpu_model(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                device=str(device or 'cpu'))
    if device is not None and torch.device(device).type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def write_results(out: Union[str, os.PathLike], data: dict, table: str) -> Path:
    """Write ``data`` as JSON to ``out`` and ``table`` to ``out`` with suffix ``.md``, each
    atomically (temporary file, then rename). Returns the JSON path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2))
    with atomic_path(out.with_suffix('.md')) as tmp:
        Path(tmp).write_text(table)
    print(f'wrote {out} and {out.with_suffix(".md")}')
    return out
