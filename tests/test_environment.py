"""The environment checks (lrpet_mm.utils.environment, tools/collect_env.py) and the mmcv build
decision of `make install` (tools/install_mmcv.py), with a GPU, CPU-only mmcv ops, nvcc and
out-of-range versions simulated on CPU."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from helpers import REPO_ROOT, load_repo_script
from lrpet_mm.utils import environment
from lrpet_mm.utils.environment import (
    ALLOW_UNSUPPORTED_ENV,
    SUPPORTED_VERSIONS,
    BuildEnvironmentError,
    Environment,
    check_training_environment,
    environment_problems,
    find_nvcc,
    installed_mmcv_problem,
    mmcv_build_settings,
    release,
    version_in_range,
)

GOOD_VERSIONS = {'torch': '2.1.2+cu121', 'mmengine': '0.10.7', 'mmcv': '2.1.0',
                 'mmdet': '3.3.0', 'mmsegmentation': '1.2.2', 'numpy': '1.26.4'}


def make_env(versions: Optional[Dict[str, Optional[str]]] = None, ops_cuda: Optional[str] = '12.1',
             torch_cuda: Optional[str] = '12.1', gpu: bool = True,
             ops_error: Optional[str] = None) -> Environment:
    """An Environment as collect_environment would report it (defaults: everything fits)."""
    return Environment(versions={**GOOD_VERSIONS, **(versions or {})}, torch_cuda=torch_cuda,
                       gpu_visible=gpu, gpus=['Simulated GPU'] if gpu else [],
                       mmcv_ops_error=ops_error, mmcv_ops_cuda=None if ops_error else ops_cuda,
                       mmcv_ops_compiler='GCC 9.3')


# ---------------------------------------------------------------- the declared ranges

def declared_requirements() -> Dict[str, List[str]]:
    """``{name: [specifier, ...]}`` of every requirement pyproject.toml declares (dependencies
    and all extras), specifiers without spaces."""
    tomllib = pytest.importorskip('tomllib')  # Python >= 3.11
    project = tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['project']
    lines = list(project['dependencies'])
    for extra in project['optional-dependencies'].values():
        lines += extra
    found: Dict[str, List[str]] = {}
    for line in lines:
        match = re.fullmatch(r'([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*([^;]*)', line.strip())
        assert match, f'cannot read requirement {line!r}'
        found.setdefault(match.group(1).lower(), []).append(match.group(3).replace(' ', ''))
    return found


def test_pyproject_declares_exactly_the_supported_ranges():
    declared = declared_requirements()
    for name, spec in SUPPORTED_VERSIONS.items():
        if name == 'mmdeploy':  # installed with --no-deps (protobuf pin conflict), not declared
            continue
        assert declared.get(name), f'{name} is not declared in pyproject.toml'
        assert set(declared[name]) == {spec}, (name, declared[name], spec)
    linter = {'ruff'}  # an exact pin for reproducible linting, not a supported range
    unlisted = [name for name, specs in declared.items()
                if any(specs) and name not in SUPPORTED_VERSIONS and name not in linter]
    assert not unlisted, f'ranges declared only in pyproject.toml: {unlisted}'


def test_pyproject_keeps_training_only_installs_free_of_deploy_and_bench_packages():
    tomllib = pytest.importorskip('tomllib')
    project = tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['project']
    required = ' '.join(project['dependencies'])
    for optional in ('mmdet', 'mmsegmentation', 'mmcv', 'onnx', 'onnxruntime', 'torch-pruning',
                     'mmdeploy'):
        assert optional not in re.findall(r'[A-Za-z0-9_.-]+', required), optional
    assert {'det', 'seg', 'deploy', 'bench', 'test'} <= set(project['optional-dependencies'])


@pytest.mark.parametrize('version, spec, inside', [
    ('2.5.1+cu124', '>=2.1.2,<2.6', True),
    ('2.1.2', '>=2.1.2,<2.6', True),
    ('2.1.0', '>=2.1.2,<2.6', False),
    ('2.6.0', '>=2.1.2,<2.6', False),
    ('2.6.0a0+git1234', '>=2.1.2,<2.6', False),  # a pre-release of 2.6 is 2.6
    ('2.11.0+cu130', '>=2.1.2,<2.6', False),
    ('0.10.7', '>=0.10.7,<0.11', True),
    ('1.3', '==1.3.0', True),
])
def test_version_in_range(version, spec, inside):
    assert version_in_range(version, spec) is inside


def test_unreadable_versions_are_refused_by_name():
    with pytest.raises(ValueError, match='unknown'):
        release('unknown')
    with pytest.raises(ValueError, match="specifier '~2.1'"):
        version_in_range('2.1.2', '~2.1')


# ---------------------------------------------------------------- training checks

def test_all_good_environment_has_no_problem():
    assert environment_problems('cuda', make_env()) == []
    assert environment_problems('cpu', make_env(gpu=False, ops_cuda=None)) == []
    check_training_environment('cuda', make_env())  # does not raise


def test_gpu_with_cpu_only_mmcv_ops_names_the_fix():
    env = make_env(ops_cuda=None)
    problems = environment_problems(torch.device('cuda', 0), env)
    assert len(problems) == 1
    assert 'compiled without CUDA ops' in problems[0]
    assert 'nms_impl' in problems[0] and 'mim install mmcv==2.1.0' in problems[0]
    assert 'CUDA 12.1' in problems[0]  # the nvcc to install for tools/install_mmcv.py
    with pytest.raises(RuntimeError, match='cannot train on cuda:0'):
        check_training_environment('cuda:0', env)
    assert environment_problems('cpu', env) == []  # CPU training needs no CUDA ops


def test_mmcv_ops_for_another_cuda_major_are_a_problem():
    problems = environment_problems('cuda', make_env(ops_cuda='11.8', torch_cuda='12.1'))
    assert len(problems) == 1 and 'CUDA 11.8' in problems[0] and 'CUDA 12.1' in problems[0]


def test_mmcv_without_compiled_ops_is_a_problem_on_any_device():
    env = make_env(ops_error="ModuleNotFoundError: No module named 'mmcv._ext'")
    for device in ('cpu', 'cuda'):
        (problem, ) = environment_problems(device, env)
        assert 'no usable compiled ops' in problem and 'mmcv._ext' in problem


def test_no_mmcv_is_no_problem_for_the_pure_torch_hook():
    env = make_env({'mmcv': None, 'mmdet': None, 'mmsegmentation': None}, ops_cuda=None)
    assert environment_problems('cuda', env) == []


@pytest.mark.parametrize('name, version, fix', [
    ('torch', '2.6.0', 'mim install mmcv==2.1.0'),
    ('torch', '2.0.1', 'mim install mmcv==2.1.0'),
    ('mmengine', '0.9.1', "pip install 'mmengine>=0.10.7,<0.11'"),
    ('mmcv', '2.2.0', 'mim install mmcv==2.1.0'),
    ('mmdet', '3.2.0', "pip install 'mmdet>=3.3.0,<3.4'"),
    ('mmsegmentation', '1.1.2', "pip install 'mmsegmentation>=1.2.2,<1.3'"),
])
def test_out_of_range_version_is_named_with_range_and_fix(name, version, fix):
    (problem, ) = environment_problems('cuda', make_env({name: version}))
    assert problem.startswith(f'{name} {version} is outside the supported range '
                              f'{SUPPORTED_VERSIONS[name]}')
    assert fix in problem


def test_missing_mmengine_and_numpy_2_under_torch_2_1_are_problems():
    (problem, ) = environment_problems('cpu', make_env({'mmengine': None}))
    assert 'mmengine is not installed' in problem
    (problem, ) = environment_problems('cpu', make_env({'numpy': '2.0.0'}))
    assert "numpy<2" in problem
    assert environment_problems('cpu', make_env({'torch': '2.5.1', 'numpy': '2.4.6'})) == []


def test_allow_unsupported_versions_warns_but_keeps_mmcv_problems(monkeypatch):
    monkeypatch.setenv(ALLOW_UNSUPPORTED_ENV, '1')
    with pytest.warns(UserWarning, match='torch 2.11.0'):
        check_training_environment('cuda', make_env({'torch': '2.11.0'}))
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match='without CUDA ops'):
        check_training_environment('cuda', make_env({'torch': '2.11.0'}, ops_cuda=None))
    monkeypatch.setenv(ALLOW_UNSUPPORTED_ENV, '0')
    with pytest.raises(RuntimeError, match='torch 2.11.0 is outside'):
        check_training_environment('cuda', make_env({'torch': '2.11.0'}))


def simulate_gpu(monkeypatch, cuda: str = '12.4') -> None:
    """torch sees one GPU (CUDA ``cuda``); nothing runs on it."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda i=0: 'Simulated GPU')
    monkeypatch.setattr(torch.version, 'cuda', cuda)


def test_collect_environment_reads_this_machine_and_a_simulated_gpu(monkeypatch):
    env = environment.collect_environment()
    assert env.versions['torch'] == torch.__version__
    if not env.has_mmcv:
        pytest.skip('mmcv is not installed here')
    assert env.mmcv_ops_error is None, env.mmcv_ops_error
    simulate_gpu(monkeypatch)
    env = environment.collect_environment()
    assert env.gpu_visible and env.gpus == ['Simulated GPU']
    if env.mmcv_ops_cuda is None:  # this machine's mmcv was built without CUDA
        problems = environment_problems('cuda', env)
        assert any('compiled without CUDA ops' in p for p in problems), problems
        assert 'without CUDA' in installed_mmcv_problem(env=env)


# ---------------------------------------------------------------- tools/collect_env.py

@pytest.fixture(scope='module')
def collect_env_tool():
    return load_repo_script('tools/collect_env.py', 'collect_env_tool')


def test_collect_env_exit_codes(collect_env_tool, monkeypatch, capsys):
    monkeypatch.delenv(ALLOW_UNSUPPORTED_ENV, raising=False)
    monkeypatch.setattr(collect_env_tool, 'collect_environment', lambda: make_env())
    assert collect_env_tool.main(['--check']) == 0
    assert capsys.readouterr().err == ''

    monkeypatch.setattr(collect_env_tool, 'collect_environment',
                        lambda: make_env(ops_cuda=None))
    assert collect_env_tool.main(['--check']) == 1
    assert 'error: mmcv 2.1.0 was compiled without CUDA ops' in capsys.readouterr().err
    assert collect_env_tool.main(['--check', '--device', 'cpu']) == 0

    monkeypatch.setattr(collect_env_tool, 'collect_environment',
                        lambda: make_env({'mmdet': '3.1.0', 'onnx': '1.14.0'}))
    assert collect_env_tool.main(['--check']) == 1
    err = capsys.readouterr().err
    assert "error: mmdet 3.1.0 is outside the supported range >=3.3.0,<3.4" in err
    assert 'warning: onnx 1.14.0 is outside' in err  # an extra: a note, not an error
    monkeypatch.setenv(ALLOW_UNSUPPORTED_ENV, '1')
    assert collect_env_tool.main(['--check']) == 0
    assert 'warning: mmdet 3.1.0 is outside' in capsys.readouterr().err


def test_collect_env_report_names_the_versions_that_matter(collect_env_tool, monkeypatch,
                                                           capsys):
    monkeypatch.delenv(ALLOW_UNSUPPORTED_ENV, raising=False)
    monkeypatch.setattr(collect_env_tool, 'base_report', lambda: {'Python': '3.x'})
    monkeypatch.setattr(collect_env_tool, 'collect_environment',
                        lambda: make_env({'torch': '2.6.0', 'lrpet_mm': '0.1.0'}, ops_cuda=None))
    assert collect_env_tool.main([]) == 1
    out = capsys.readouterr().out
    for line in ('PyTorch CUDA: 12.1', 'MMCV: 2.1.0', 'MMCV CUDA Compiler: not available',
                 'MMDetection: 3.3.0', 'MMSegmentation: 1.2.2', 'MMDeploy: not installed',
                 'ONNX Runtime: not installed', 'lrpet_mm: 0.1.0',
                 'training check (cuda): 2 problem(s)'):
        assert line in out, (line, out)


@pytest.mark.slow
def test_collect_env_runs_as_a_command():
    out = subprocess.run([sys.executable, 'tools/collect_env.py', '--device', 'cpu'],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert 'PyTorch:' in out.stdout and 'lrpet_mm:' in out.stdout, out.stderr
    assert 'training check (cpu)' in out.stdout
    # 0 in this checkout's own stacks (make install / make test-compat): they are in range
    expected = 1 if environment_problems('cpu') else 0
    assert out.returncode == expected, out.stdout[-2000:] + out.stderr


# ---------------------------------------------------------------- building mmcv (make install)

def fake_nvcc(cuda_home: Path, release_text: str) -> Path:
    """An executable ``cuda_home/bin/nvcc`` printing ``release_text`` for --version."""
    nvcc = cuda_home / 'bin' / 'nvcc'
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f'#!/bin/sh\necho "nvcc: NVIDIA (R) Cuda compiler driver"\n'
                    f'echo "Cuda compilation tools, {release_text}"\n')
    nvcc.chmod(0o755)
    return nvcc


def test_cpu_machine_builds_cpu_ops_with_all_cores():
    settings = mmcv_build_settings(gpu_visible=False, environ={})
    assert settings == {'MMCV_WITH_OPS': '1', 'FORCE_CUDA': '0',
                        'MAX_JOBS': str(environment.build_jobs({}))}
    assert int(settings['MAX_JOBS']) >= 1
    assert mmcv_build_settings(gpu_visible=False, environ={'MAX_JOBS': '3'})['MAX_JOBS'] == '3'


def test_gpu_without_nvcc_stops_before_compiling(monkeypatch, tmp_path):
    simulate_gpu(monkeypatch, '12.4')
    environ = {'CUDA_HOME': str(tmp_path / 'no-toolkit')}
    assert find_nvcc(environ) is None
    with pytest.raises(BuildEnvironmentError) as info:
        mmcv_build_settings(environ=environ)
    message = str(info.value)
    assert 'no nvcc was found' in message
    assert "CUDA toolkit 12.4's nvcc" in message
    assert 'mim install mmcv==2.1.0' in message and 'pip install -e .' in message


def test_gpu_with_nvcc_of_another_major_stops(monkeypatch, tmp_path):
    simulate_gpu(monkeypatch, '12.4')
    nvcc = fake_nvcc(tmp_path, 'release 11.8, V11.8.89')
    with pytest.raises(BuildEnvironmentError, match=f'the nvcc at {nvcc} is CUDA 11.8'):
        mmcv_build_settings(environ={'CUDA_HOME': str(tmp_path)})


def test_gpu_with_matching_nvcc_builds_cuda_ops(monkeypatch, tmp_path):
    simulate_gpu(monkeypatch, '12.4')
    fake_nvcc(tmp_path, 'release 12.1, V12.1.105')  # any 12.x is accepted, as torch does
    settings = mmcv_build_settings(environ={'CUDA_HOME': str(tmp_path), 'MAX_JOBS': '16'})
    assert settings == {'MMCV_WITH_OPS': '1', 'FORCE_CUDA': '1', 'MAX_JOBS': '16'}
    # an nvcc on PATH is found when CUDA_HOME is not set, as torch's extension builder does
    assert find_nvcc({'PATH': str(tmp_path / 'bin')}) == str(tmp_path / 'bin' / 'nvcc')


def test_gpu_with_a_torch_without_cuda_stops(monkeypatch):
    simulate_gpu(monkeypatch, None)
    with pytest.raises(BuildEnvironmentError, match='has no CUDA build'):
        mmcv_build_settings(environ={})


def test_installed_mmcv_problem_cases():
    assert installed_mmcv_problem(env=make_env({'mmcv': None})) == 'mmcv is not installed'
    assert installed_mmcv_problem(env=make_env()) is None
    assert installed_mmcv_problem(gpu_visible=False, env=make_env(gpu=False, ops_cuda=None)) \
        is None
    assert 'without CUDA' in installed_mmcv_problem(env=make_env(ops_cuda=None))
    assert 'outside' in installed_mmcv_problem(env=make_env({'mmcv': '2.2.0'}))


@pytest.fixture(scope='module')
def install_mmcv_tool():
    return load_repo_script('tools/install_mmcv.py', 'install_mmcv_tool')


@pytest.fixture
def no_pip(monkeypatch):
    """subprocess.run refuses pip (nvcc --version still runs)."""
    real_run = subprocess.run

    def run(command, *args, **kwargs):
        if 'pip' in command or any(str(word).endswith('.py') for word in command):
            raise AssertionError(f'nothing may be installed here: {command}')
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, 'run', run)


def test_install_mmcv_stops_with_the_message_and_compiles_nothing(install_mmcv_tool, no_pip,
                                                                  monkeypatch, capsys, tmp_path):
    simulate_gpu(monkeypatch, '12.4')
    monkeypatch.setenv('CUDA_HOME', str(tmp_path))  # no nvcc there
    monkeypatch.setattr(install_mmcv_tool, 'installed_mmcv_problem',
                        lambda: 'mmcv is not installed')
    assert install_mmcv_tool.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: torch') and 'no nvcc was found' in err


def test_install_mmcv_dry_run_and_nothing_to_do(install_mmcv_tool, no_pip, monkeypatch, capsys,
                                                 tmp_path):
    simulate_gpu(monkeypatch, '12.4')
    fake_nvcc(tmp_path, 'release 12.4, V12.4.131')
    monkeypatch.setenv('CUDA_HOME', str(tmp_path))
    monkeypatch.setattr(install_mmcv_tool, 'installed_mmcv_problem',
                        lambda: 'mmcv 2.1.0 was compiled without CUDA ops, but ...')
    assert install_mmcv_tool.main(['--dry-run']) == 0
    assert 'FORCE_CUDA=1' in capsys.readouterr().out
    monkeypatch.setattr(install_mmcv_tool, 'installed_mmcv_problem', lambda: None)
    assert install_mmcv_tool.main([]) == 0
    assert 'nothing to build' in capsys.readouterr().out
    assert install_mmcv_tool.main(['--check']) == 0


def test_install_mmcv_rebuilds_an_unfit_mmcv_keeps_the_cpu_wheel_and_checks_it(
        install_mmcv_tool, monkeypatch, tmp_path):
    calls = []

    def run(command, **kwargs):
        calls.append((command[1:], kwargs.get('env', {}).get('FORCE_CUDA')))
        if command[3:4] == ['wheel']:  # pip wheel ... -w DIR: "build" one
            out = Path(command[command.index('-w') + 1])
            (out / 'mmcv-2.1.0-cp311-cp311-linux_x86_64.whl').write_bytes(b'')
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setenv('LRPET_MMCV_CACHE', str(tmp_path))
    monkeypatch.setattr(install_mmcv_tool.subprocess, 'run', run)
    monkeypatch.setattr(install_mmcv_tool, 'installed_mmcv_problem',
                        lambda: 'mmcv 2.1.0 has no usable compiled ops')
    monkeypatch.setattr(install_mmcv_tool, 'installed_version', lambda name: '2.1.0')
    monkeypatch.setattr(install_mmcv_tool, 'mmcv_build_settings',
                        lambda: {'MMCV_WITH_OPS': '1', 'FORCE_CUDA': '0', 'MAX_JOBS': '2'})
    assert install_mmcv_tool.main([]) == 0
    commands = [' '.join(command) for command, _ in calls]
    assert commands[0] == '-m pip uninstall -q -y mmcv'
    assert commands[1].startswith('-m pip wheel --no-build-isolation --no-deps --no-cache-dir')
    assert commands[1].endswith('mmcv==2.1.0') and calls[1][1] == '0'
    kept = Path(environment.mmcv_wheel_cache({'FORCE_CUDA': '0'}))
    assert kept.parent == tmp_path and torch.__version__ in kept.name
    assert commands[2] == f'-m pip install {kept}/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl'
    assert commands[3].endswith('install_mmcv.py --check')  # verified in a fresh interpreter

    calls.clear()  # again: the kept CPU wheel is installed, nothing is compiled
    assert install_mmcv_tool.main([]) == 0
    commands = [' '.join(command) for command, _ in calls]
    assert commands[1] == f'-m pip install {kept}/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl'
    assert len(commands) == 3 and not any(' wheel ' in c for c in commands)


def test_cuda_builds_are_never_reused():
    assert environment.mmcv_wheel_cache({'FORCE_CUDA': '1'}) is None
    assert environment.mmcv_wheel_cache({'FORCE_CUDA': '0'}, {'LRPET_MMCV_CACHE': '/c'}) == (
        f'/c/mmcv-2.1.0-torch-{torch.__version__}-cp{sys.version_info[0]}'
        f'{sys.version_info[1]}-cpu')


@pytest.mark.slow
def test_install_mmcv_check_on_this_machine():
    out = subprocess.run([sys.executable, 'tools/install_mmcv.py', '--check'], cwd=REPO_ROOT,
                         capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': '.'})
    if 'mmcv is not installed' in out.stderr:
        pytest.skip('mmcv is not installed here')
    assert out.returncode == 0, out.stderr  # this machine's mmcv fits it (CPU ops, no GPU)
