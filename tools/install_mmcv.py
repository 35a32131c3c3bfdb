#!/usr/bin/env python
"""Install mmcv 2.1.0 with compiled ops into this Python's environment, built for the device
torch sees (what `make install` and `make test-compat` run).

Nothing is done if the installed mmcv already fits: version in range, compiled ops, and CUDA
ops when torch sees a GPU. Otherwise mmcv's ops are compiled against the installed torch: the
CPU ops on a machine without GPU; with a GPU visible, the CUDA ops, after checking (before any
compile) that an nvcc of torch's CUDA major version is there, else it stops and names what to
install. Parallel compile jobs: $MAX_JOBS, else the cores. pip's wheel cache is never used for
mmcv (it reuses a build made against another torch, or a CPU-only one on a GPU machine): a CPU
build is kept in its own cache per torch version ($LRPET_MMCV_CACHE, default
~/.cache/lrpet_mm/mmcv), a CUDA build is not kept. Afterwards the installed mmcv is checked
again in a fresh interpreter.

example:
    PYTHONPATH=. .venv/bin/python tools/install_mmcv.py             # check, build if needed
    PYTHONPATH=. .venv/bin/python tools/install_mmcv.py --dry-run   # say what it would do
    PYTHONPATH=. .venv/bin/python tools/install_mmcv.py --check     # exit 1 unless it fits

(PYTHONPATH=. because `make install` runs it before lrpet_mm itself is installed.)
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from lrpet_mm.utils.environment import (
    MMCV_VERSION,
    BuildEnvironmentError,
    installed_mmcv_problem,
    installed_version,
    mmcv_build_settings,
    mmcv_wheel_cache,
)

PIP = [sys.executable, '-m', 'pip']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    paragraphs = __doc__.strip().split('\n\n', 1)
    parser = argparse.ArgumentParser(description=' '.join(paragraphs[0].split()),
                                     epilog=paragraphs[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument('--check', action='store_true',
                        help='only check the installed mmcv: exit 0 if it fits, else 1')
    action.add_argument('--dry-run', action='store_true',
                        help='print the build settings (or the reason none works), install '
                             'nothing')
    return parser.parse_args(argv)


def cached_wheel(cache: Optional[str]) -> Optional[Path]:
    """The mmcv wheel kept in ``cache``, if any."""
    wheels = sorted(Path(cache).glob(f'mmcv-{MMCV_VERSION}-*.whl')) if cache else []
    return wheels[-1] if wheels else None


def build_wheel(settings: Dict[str, str], cache: Optional[str]) -> Optional[Path]:
    """Compile mmcv into a wheel (kept in ``cache`` if given, else in a temporary directory);
    None if pip failed."""
    out = Path(tempfile.mkdtemp(prefix='mmcv-wheel-'))
    command = PIP + ['wheel', '--no-build-isolation', '--no-deps', '--no-cache-dir',
                     '-w', str(out), f'mmcv=={MMCV_VERSION}']
    if subprocess.run(command, env={**os.environ, **settings}, check=False).returncode != 0:
        return None
    wheel = cached_wheel(str(out))
    if wheel is None or cache is None:
        return wheel
    Path(cache).mkdir(parents=True, exist_ok=True)
    kept = Path(cache) / wheel.name
    shutil.move(str(wheel), str(kept) + '.tmp')
    os.replace(str(kept) + '.tmp', kept)
    return kept


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    problem = installed_mmcv_problem()
    if args.check:
        print(f'mmcv: {problem}' if problem else 'mmcv: installed and fits this machine',
              file=sys.stderr if problem else sys.stdout)
        return 1 if problem else 0
    if problem is None:
        print('mmcv: installed and fits this machine, nothing to build')
        return 0
    try:
        settings = mmcv_build_settings()
    except BuildEnvironmentError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    cache = mmcv_wheel_cache(settings)
    wheel = cached_wheel(cache)
    words = ' '.join(f'{k}={v}' for k, v in settings.items())
    plan = (f'installing the mmcv {MMCV_VERSION} built earlier for this torch: {wheel}' if wheel
            else f'compiling mmcv {MMCV_VERSION} with {words}')
    print(f'mmcv: {problem}; {plan}', flush=True)
    if args.dry_run:
        return 0
    if installed_version('mmcv') is not None:  # else pip would call it already satisfied
        subprocess.run(PIP + ['uninstall', '-q', '-y', 'mmcv'], check=False)
    if wheel is None:
        wheel = build_wheel(settings, cache)
        if wheel is None:
            print(f'error: compiling mmcv {MMCV_VERSION} failed; see the compile log above',
                  file=sys.stderr)
            return 1
    if subprocess.run(PIP + ['install', str(wheel)], check=False).returncode != 0:
        print(f'error: installing {wheel} failed', file=sys.stderr)
        return 1
    # a fresh interpreter: this one may have imported an older mmcv
    done = subprocess.run([sys.executable, os.path.abspath(__file__), '--check'], check=False)
    if done.returncode != 0 and cache is not None:
        print(f'error: the installed mmcv does not work; remove {cache} and run this again',
              file=sys.stderr)
    return done.returncode


if __name__ == '__main__':
    sys.exit(main())
