"""Which versions lrpet_mm supports, and whether this environment can train (or build mmcv)
on the device it has.

:data:`SUPPORTED_VERSIONS` is the one definition of the supported version ranges;
``pyproject.toml`` declares the same ranges (``tests/test_environment.py`` checks that they
agree). :func:`environment_problems` lists what stops training on a device, each problem with
its fix; :func:`check_training_environment` raises them; ``tools/collect_env.py`` prints them.
:func:`mmcv_build_settings` decides how ``make install`` compiles mmcv's ops
(``tools/install_mmcv.py``).

Only the standard library, torch and ``packaging`` are imported here: ``make install`` runs
this module before mmengine is installed.
"""
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

SUPPORTED_VERSIONS: Dict[str, str] = {
    # each floor and ceiling was exercised by a test run: torch 2.1.2 (`make test-compat`) and
    # 2.5.1 (`make test`); torch >= 2.6 breaks resume with mmengine 0.10.7 (torch.load's
    # weights_only default); mmdet 3.3.0 itself asserts mmcv < 2.2.0
    'torch': '>=2.1.2,<2.6',
    'mmengine': '>=0.10.7,<0.11',
    'mmcv': '>=2.1.0,<2.2.0',
    'mmdet': '>=3.3.0,<3.4',
    'mmsegmentation': '>=1.2.2,<1.3',
    # extras: deploy (mmdeploy itself is installed with --no-deps, see docs/install.md), bench
    'mmdeploy': '>=1.3.1,<1.4',
    'onnx': '>=1.23.2,<2',
    'onnxruntime': '>=1.32.0,<2',
    'torch-pruning': '>=1.6.1,<1.7',
}
"""``{distribution: 'floor,ceiling'}``: the versions lrpet_mm supports (pyproject.toml mirrors
it)."""

TRAINING_PACKAGES = ('torch', 'mmengine', 'mmcv', 'mmdet', 'mmsegmentation')
"""Distributions whose version decides whether training works (the others are extras)."""

REPORTED_PACKAGES = TRAINING_PACKAGES + ('mmdeploy', 'onnx', 'onnxruntime', 'torch-pruning',
                                         'numpy', 'lrpet_mm')
"""Distributions whose versions :func:`collect_environment` records."""

ALLOW_UNSUPPORTED_ENV = 'LRPET_ALLOW_UNSUPPORTED_VERSIONS'
"""Set to 1 to turn out-of-range versions into warnings (e.g. the GPU check on an image whose
torch is newer than the supported range); the mmcv-ops problems stay errors."""

MMCV_VERSION = '2.1.0'
"""The mmcv release ``make install`` builds and the fixes name."""

_VERSION_FIXES = {
    'torch': ("install a torch in that range, then an mmcv built against it (`mim install "
              f"mmcv=={MMCV_VERSION}` for torch 2.1, or `make install`)"),
    'mmcv': f'`pip uninstall mmcv` and `mim install mmcv=={MMCV_VERSION}`',
}


# ---------------------------------------------------------------- versions

def release(version: str) -> Tuple[int, ...]:
    """The numeric release of a version string: ``'2.5.1+cu124'`` → (2, 5, 1). A ValueError
    naming it if it is not a version."""
    try:
        return Version(version).release
    except InvalidVersion:
        raise ValueError(f'cannot read version {version!r}') from None


def version_in_range(version: str, specifier: str) -> bool:
    """Whether ``version`` satisfies ``specifier`` (PEP 440, e.g. ``'>=2.1.2,<2.6'``; a
    pre-release of 2.6 is not below 2.6). A ValueError naming what cannot be read."""
    try:
        spec = SpecifierSet(specifier)
    except InvalidSpecifier:
        raise ValueError(f'cannot read version specifier {specifier!r}') from None
    release(version)  # readable?
    return spec.contains(Version(version), prereleases=True)


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of ``distribution`` (``torch.__version__`` for torch), or None."""
    if distribution == 'torch':
        return str(torch.__version__)
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_major(version: Optional[str]) -> Optional[int]:
    """The major number of a CUDA version string (``'12.4'`` → 12), None for None."""
    return None if version is None else release(version)[0]


# ---------------------------------------------------------------- the environment

@dataclass
class Environment:
    """What decides whether this environment can train (see :func:`collect_environment`).

    Attributes:
        versions: ``{distribution: version or None (not installed)}``.
        torch_cuda: the CUDA version torch was built with (``torch.version.cuda``), or None.
        gpu_visible: ``torch.cuda.is_available()``.
        gpus: names of the visible GPUs.
        mmcv_ops_error: why ``import mmcv.ops`` failed (mmcv-lite, a broken build), or None.
        mmcv_ops_cuda: the CUDA version mmcv's ops were compiled with, None without CUDA
            kernels (or without mmcv / its ops).
        mmcv_ops_compiler: the C++ compiler of mmcv's ops, or None.
    """
    versions: Dict[str, Optional[str]] = field(default_factory=dict)
    torch_cuda: Optional[str] = None
    gpu_visible: bool = False
    gpus: List[str] = field(default_factory=list)
    mmcv_ops_error: Optional[str] = None
    mmcv_ops_cuda: Optional[str] = None
    mmcv_ops_compiler: Optional[str] = None

    @property
    def has_mmcv(self) -> bool:
        return self.versions.get('mmcv') is not None


def mmcv_ops_info() -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """``(import error, CUDA version of the ops or None, compiler)`` of the installed mmcv's
    compiled ops; ``(None, None, None)`` without mmcv."""
    if installed_version('mmcv') is None:
        return None, None, None
    try:
        ops = importlib.import_module('mmcv.ops')
        cuda = str(ops.get_compiling_cuda_version())
        compiler = str(ops.get_compiler_version())
    except Exception as e:  # noqa: BLE001  (any failure means: no usable ops)
        return f'{type(e).__name__}: {e}', None, None
    return None, (None if cuda == 'not available' else cuda), compiler


def collect_environment() -> Environment:
    """The facts of this Python environment that decide whether it can train."""
    versions = {name: installed_version(name) for name in REPORTED_PACKAGES}
    gpu_visible = torch.cuda.is_available()
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if gpu_visible else [])
    error, ops_cuda, compiler = mmcv_ops_info()
    return Environment(versions=versions, torch_cuda=torch.version.cuda,
                       gpu_visible=gpu_visible, gpus=gpus, mmcv_ops_error=error,
                       mmcv_ops_cuda=ops_cuda, mmcv_ops_compiler=compiler)


def version_problems(versions: Mapping[str, Optional[str]],
                     packages: Tuple[str, ...] = TRAINING_PACKAGES) -> List[str]:
    """One message (with its fix) per installed distribution of ``packages`` whose version is
    outside :data:`SUPPORTED_VERSIONS`, and for a missing mmengine."""
    problems = []
    for name in packages:
        version = versions.get(name)
        spec = SUPPORTED_VERSIONS[name]
        if version is None:
            if name == 'mmengine':
                problems.append(f"mmengine is not installed: pip install 'mmengine{spec}'")
            continue
        if not version_in_range(version, spec):
            fix = _VERSION_FIXES.get(name, f"pip install '{name}{spec}'")
            problems.append(f'{name} {version} is outside the supported range {spec}: {fix}')
    return problems


def mmcv_problems(env: Environment, device: torch.device) -> List[str]:
    """What is wrong with mmcv's compiled ops for training on ``device``."""
    if not env.has_mmcv:
        return []
    version = env.versions['mmcv']
    if env.mmcv_ops_error is not None:
        return [f'mmcv {version} has no usable compiled ops (import mmcv.ops: '
                f'{env.mmcv_ops_error}); mmdet / mmseg need them: `pip uninstall mmcv` and '
                f'`mim install mmcv=={MMCV_VERSION}` (prebuilt, torch <= 2.1), or '
                '`python tools/install_mmcv.py` (compiles them, docs/install.md)']
    if device.type != 'cuda':
        return []
    if env.mmcv_ops_cuda is None:
        cuda = env.torch_cuda or 'of your torch'
        return [f'mmcv {version} was compiled without CUDA ops, but the model is on {device}: '
                'detectors would fail at the first NMS with "nms_impl: implementation for '
                f'device cuda:0 not found". Fix: `pip uninstall mmcv`, then `mim install '
                f'mmcv=={MMCV_VERSION}` (prebuilt CUDA wheels, torch <= 2.1) or `python '
                f'tools/install_mmcv.py` with the nvcc of CUDA {cuda} installed '
                '(docs/install.md)']
    if cuda_major(env.mmcv_ops_cuda) != cuda_major(env.torch_cuda):
        return [f'mmcv {version} ops were compiled with CUDA {env.mmcv_ops_cuda}, torch with '
                f'CUDA {env.torch_cuda}: the majors differ. Fix: reinstall mmcv built for this '
                f'torch (`mim install mmcv=={MMCV_VERSION}` or `python tools/install_mmcv.py`)']
    return []


def numpy_problems(versions: Mapping[str, Optional[str]]) -> List[str]:
    """torch < 2.3 wheels are built against numpy 1.x and cannot convert numpy 2 arrays."""
    torch_version, numpy_version = versions.get('torch'), versions.get('numpy')
    if (torch_version and numpy_version and release(torch_version) < (2, 3)
            and release(numpy_version)[0] >= 2):
        return [f'numpy {numpy_version} with torch {torch_version}: torch < 2.3 is built '
                "against numpy 1.x (torch.from_numpy fails): pip install 'numpy<2'"]
    return []


def environment_problems(device: Union[str, torch.device] = 'cpu',
                         env: Optional[Environment] = None,
                         check_versions: bool = True) -> List[str]:
    """Everything that stops this environment from training on ``device``, one message per
    problem, each naming its fix (empty: nothing known wrong).

    Args:
        device: where the model trains.
        env: the facts (default: :func:`collect_environment`).
        check_versions: include versions outside :data:`SUPPORTED_VERSIONS`.
    """
    device = torch.device(device)
    env = collect_environment() if env is None else env
    problems = version_problems(env.versions) if check_versions else []
    return problems + mmcv_problems(env, device) + numpy_problems(env.versions)


def allow_unsupported_versions(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether ``LRPET_ALLOW_UNSUPPORTED_VERSIONS`` is set (to anything but '' or '0')."""
    environ = os.environ if environ is None else environ
    return environ.get(ALLOW_UNSUPPORTED_ENV, '') not in ('', '0')


def check_training_environment(device: Union[str, torch.device],
                               env: Optional[Environment] = None) -> None:
    """Raise a RuntimeError naming each problem and its fix if this environment cannot train
    on ``device`` (:func:`environment_problems`). With the environment variable
    ``LRPET_ALLOW_UNSUPPORTED_VERSIONS=1`` versions outside the supported range are only
    warned about."""
    env = collect_environment() if env is None else env
    allow = allow_unsupported_versions()
    if allow:
        for problem in version_problems(env.versions):
            warnings.warn(f'{problem} ({ALLOW_UNSUPPORTED_ENV} is set: going on)')
    problems = environment_problems(device, env, check_versions=not allow)
    if problems:
        lines = '\n'.join(f'  - {p}' for p in problems)
        raise RuntimeError(f'this environment cannot train on {torch.device(device)} '
                           f'(run `python tools/collect_env.py` for the details):\n{lines}')


# ---------------------------------------------------------------- building mmcv

class BuildEnvironmentError(RuntimeError):
    """mmcv's ops cannot be compiled here for the device torch sees."""


def find_nvcc(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The nvcc that torch's extension builder (and so mmcv's setup.py) uses: under
    ``$CUDA_HOME`` / ``$CUDA_PATH``, else the one on ``PATH``, else
    ``/usr/local/cuda/bin/nvcc``; None if there is none."""
    environ = os.environ if environ is None else environ
    home = environ.get('CUDA_HOME') or environ.get('CUDA_PATH')
    if home:
        candidates = [os.path.join(home, 'bin', 'nvcc')]
    else:
        candidates = [shutil.which('nvcc', path=environ.get('PATH')) or '',
                      '/usr/local/cuda/bin/nvcc']
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def nvcc_version(nvcc: str) -> Optional[str]:
    """The CUDA release ``nvcc --version`` reports (``'12.4'``), or None if it does not run or
    says none."""
    try:
        out = subprocess.run([nvcc, '--version'], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'release (\d+\.\d+)', out.stdout)
    return match.group(1) if match else None


def build_jobs(environ: Optional[Mapping[str, str]] = None) -> int:
    """Parallel compile jobs: ``$MAX_JOBS`` if set, else the cores this process may use."""
    environ = os.environ if environ is None else environ
    if environ.get('MAX_JOBS', '').isdigit() and int(environ['MAX_JOBS']) > 0:
        return int(environ['MAX_JOBS'])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def mmcv_build_settings(gpu_visible: Optional[bool] = None, torch_cuda: Optional[str] = None,
                        environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment variables for compiling mmcv's ops against the installed torch.

    CPU machine (torch sees no GPU): the CPU ops, as ``make install`` always built them.
    GPU visible: mmcv's setup.py then compiles CUDA ops whatever ``FORCE_CUDA`` says, which
    needs an nvcc of torch's CUDA major version; it is checked here, before any compile. Which
    builds are reused: :func:`mmcv_wheel_cache`.

    Args:
        gpu_visible: default ``torch.cuda.is_available()``.
        torch_cuda: default ``torch.version.cuda``.
        environ: default ``os.environ`` (``CUDA_HOME``, ``PATH``, ``MAX_JOBS``).

    Raises:
        BuildEnvironmentError: a GPU is visible and there is no nvcc of torch's CUDA major
            version (or torch has no CUDA build); the message names what to install.
    """
    environ = os.environ if environ is None else environ
    gpu_visible = torch.cuda.is_available() if gpu_visible is None else gpu_visible
    torch_cuda = torch.version.cuda if torch_cuda is None and gpu_visible else torch_cuda
    settings = {'MMCV_WITH_OPS': '1', 'FORCE_CUDA': '0', 'MAX_JOBS': str(build_jobs(environ))}
    if not gpu_visible:
        return settings
    existing = (f'or use an existing OpenMMLab environment (torch <= 2.1): `pip install -U '
                f'openmim && mim install mmcv=={MMCV_VERSION}`, then `pip install -e .` '
                '(docs/install.md)')
    if torch_cuda is None:
        raise BuildEnvironmentError(
            f'torch {torch.__version__} sees a GPU but has no CUDA build (ROCm?), so mmcv\'s '
            f'ops cannot be compiled for it here: {existing}')
    nvcc = find_nvcc(environ)
    found = nvcc_version(nvcc) if nvcc else None
    if cuda_major(found) != cuda_major(torch_cuda):
        have = (f'the nvcc at {nvcc} is CUDA {found}' if found
                else f'{nvcc} does not report a CUDA release' if nvcc
                else 'no nvcc was found ($CUDA_HOME/bin, PATH, /usr/local/cuda/bin)')
        raise BuildEnvironmentError(
            f'torch {torch.__version__} (CUDA {torch_cuda}) sees a GPU, so mmcv '
            f"{MMCV_VERSION}'s ops must be compiled with CUDA, but {have}. Install the CUDA "
            f"toolkit {torch_cuda}'s nvcc (any CUDA {cuda_major(torch_cuda)}.x) and point "
            f'CUDA_HOME at it, {existing}')
    # torch's extension builder finds the same nvcc (same search order): CUDA_HOME stays unset
    settings.update(FORCE_CUDA='1')
    return settings


def mmcv_wheel_cache(settings: Mapping[str, str],
                     environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The directory where a CPU build of mmcv is kept for reuse, one per torch version and
    Python (``$LRPET_MMCV_CACHE``, default ``~/.cache/lrpet_mm/mmcv``); None for a CUDA build,
    which is never reused (it depends on the nvcc and the GPUs of the machine that built it).

    pip's own wheel cache is not used for mmcv: it keys a built wheel by the sdist alone, so it
    hands a CPU-only build to a GPU machine, or a wheel built against another torch (seen here:
    ``undefined symbol: _ZNK3c105Error4whatEv`` when the torch 2.5.1 build went to torch 2.1.2).
    """
    if settings.get('FORCE_CUDA') == '1':
        return None
    environ = os.environ if environ is None else environ
    root = environ.get('LRPET_MMCV_CACHE') or os.path.join(
        environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
        'lrpet_mm', 'mmcv')
    python = f'cp{sys.version_info[0]}{sys.version_info[1]}'
    return os.path.join(root, f'mmcv-{MMCV_VERSION}-torch-{torch.__version__}-{python}-cpu')


def installed_mmcv_problem(gpu_visible: Optional[bool] = None,
                           env: Optional[Environment] = None) -> Optional[str]:
    """Why the installed mmcv does not do for this machine (None: it does): not installed,
    outside the supported range, no compiled ops, or CPU-only ops while torch sees a GPU."""
    env = collect_environment() if env is None else env
    gpu_visible = env.gpu_visible if gpu_visible is None else gpu_visible
    if not env.has_mmcv:
        return 'mmcv is not installed'
    problems = version_problems(env.versions, ('mmcv', ))
    problems += mmcv_problems(env, torch.device('cuda' if gpu_visible else 'cpu'))
    return problems[0] if problems else None
