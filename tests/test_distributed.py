"""Distributed training with LRPETHook: 2 processes, gloo, CPU, launched the OpenMMLab way.

``python -m torch.distributed.run --nproc_per_node 2 <mmdet>/.mim/tools/train.py CONFIG
--launcher pytorch`` trains the toy Faster R-CNN on the generated VOC data, once with the plain
``MMDistributedDataParallel`` and once with ``LRPETDDP``. What mmengine 0.10 + gloo + CPU needs
(see docs/distributed_and_resume.md):

* ``env_cfg.dist_cfg.backend='gloo'``;
* the process group initialized before the Runner, because mmengine's pytorch launcher calls
  ``torch.cuda.set_device(LOCAL_RANK)``, which fails without a GPU (the Runner skips
  ``init_dist`` when a group exists): ``lrpet_mm.engine.init_cpu_process_group()`` called from
  a module in ``custom_imports`` (here ``tests/dist_probe.py``);
* ``model_wrapper_cfg``: mmengine's default wrap passes ``device_ids=[LOCAL_RANK]``, which torch
  DDP rejects for a CPU module; ``dict(type='MMDistributedDataParallel', device_ids=None)``
  works, and ``LRPETDDP`` drops the CPU ``device_ids`` itself.

``tests/dist_probe.py`` records, after every projection and on every rank, the hashes of the
projected weights and of all parameters and which layers that rank projected.
"""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from helpers import DET_TOY, REPO_ROOT, load_toy_config
from lrpet_mm.engine import assign_layers
from lrpet_mm.utils import upstream_tool

pytestmark = pytest.mark.slow  # drives a runner, a training, a tool or a benchmark

TESTS_DIR = Path(__file__).resolve().parent
WORLD_SIZE = 2
#: mmengine's default wrap (``broadcast_buffers=False``) except for the CPU ``device_ids``
PLAIN_WRAPPER = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False)
LRPET_WRAPPER = dict(type='LRPETDDP', broadcast_buffers=False)
# 8 train images, 2 ranks x batch 2 -> 2 iterations per epoch, 2 epochs; a projection every 3
# iterations (+ the final one at 4); validation after each epoch: at iteration 2 it runs on a
# projected copy (val swap), at iteration 4 on the freshly projected weights.
EXPECTED_WHERE = ['validation at iteration 2', 'iteration 3 (epoch 1)', 'iteration 4 (epoch 1)']


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _write_config(voc_root: Path, work_dir: Path, wrapper: dict) -> Path:
    cfg = load_toy_config(DET_TOY, voc_root, work_dir)
    cfg.custom_imports = dict(imports=['dist_probe', 'lrpet_mm'], allow_failed_imports=False)
    cfg.env_cfg = dict(cudnn_benchmark=False,
                       mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
                       dist_cfg=dict(backend='gloo'))
    cfg.model_wrapper_cfg = dict(wrapper)
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=2, val_interval=1)
    cfg.custom_hooks = [dict(type='LRPETHook', rank_ratio=0.5, interval=3, by_epoch=False),
                        dict(type='DistProbeHook')]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=-1, save_last=False)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    path = work_dir / 'config.py'
    cfg.dump(str(path))
    return path


def _launch(config: Path, work_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='',
               PYTHONPATH=os.pathsep.join(
                   [str(TESTS_DIR), str(REPO_ROOT)] +
                   ([env['PYTHONPATH']] if env.get('PYTHONPATH') else [])))
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node',
               str(WORLD_SIZE), '--master_addr', '127.0.0.1', '--master_port',
               str(_free_port()), str(upstream_tool('mmdet', 'train.py')), str(config),
               '--launcher', 'pytorch']
    return subprocess.run(command, cwd=work_dir, env=env, capture_output=True, text=True,
                          timeout=240)


def _rank0_log(work_dir: Path) -> str:
    logs = sorted(work_dir.glob('*/*.log'))
    return logs[-1].read_text() if logs else ''


def _aborted_after_finishing(proc: subprocess.CompletedProcess, work_dir: Path) -> bool:
    """The one failure that is retried: every rank wrote its final probe, then one aborted at
    interpreter shutdown ("terminate called without an active exception", a torch 2.5 gloo
    teardown race seen in CI about once in 20 runs although the group is destroyed at exit;
    see lrpet_mm/workarounds/cpu_distributed.py). Any other failure fails the test."""
    if proc.returncode == 0 or 'terminate called without an active exception' not in proc.stderr:
        return False
    probes = [work_dir / f'dist_probe_rank{r}.json' for r in range(WORLD_SIZE)]
    if not all(p.is_file() for p in probes):
        return False
    records = [json.loads(p.read_text())['records'] for p in probes]
    return all(len(r) == len(EXPECTED_WHERE) for r in records)


class _Runs:
    """Trains once per wrapper, on first use: ``runs['plain']`` / ``runs['lrpetddp']`` give
    ``{'probes': [rank 0 probe, rank 1 probe], 'log': rank 0's log text}``."""

    WRAPPERS = {'plain': PLAIN_WRAPPER, 'lrpetddp': LRPET_WRAPPER}

    def __init__(self, voc_root: Path, tmp_path_factory) -> None:
        self.voc_root, self.tmp_path_factory = voc_root, tmp_path_factory
        self.results: Dict[str, dict] = {}

    def __getitem__(self, key: str) -> dict:
        if key not in self.results:
            work_dir = self.tmp_path_factory.mktemp(f'dist_{key}')
            config = _write_config(self.voc_root, work_dir, self.WRAPPERS[key])
            proc = _launch(config, work_dir)
            if _aborted_after_finishing(proc, work_dir):  # once, in a fresh work dir
                work_dir = self.tmp_path_factory.mktemp(f'dist_{key}_again')
                config = _write_config(self.voc_root, work_dir, self.WRAPPERS[key])
                proc = _launch(config, work_dir)
            if proc.returncode != 0:  # remembered: the other tests of this run fail at once
                self.results[key] = (f'{key} run failed (rc {proc.returncode}):\n'
                                     f'{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
            else:
                probes = [json.loads((work_dir / f'dist_probe_rank{r}.json').read_text())
                          for r in range(WORLD_SIZE)]
                self.results[key] = dict(probes=probes, log=_rank0_log(work_dir))
        if isinstance(self.results[key], str):
            pytest.fail(self.results[key])
        return self.results[key]


@pytest.fixture(scope='module')
def runs(voc_root, tmp_path_factory) -> _Runs:
    return _Runs(voc_root, tmp_path_factory)


def _assert_identical_across_ranks(probes: List[dict], wrapper: str) -> None:
    assert [p['rank'] for p in probes] == list(range(WORLD_SIZE))
    for probe in probes:
        assert probe['world_size'] == WORLD_SIZE and probe['wrapper'] == wrapper
        assert [r['where'] for r in probe['records']] == [[w] for w in EXPECTED_WHERE]
        assert all(r['low_rank'] for r in probe['records'])  # with this rank's own BN
    planned = probes[0]['planned']
    assert len(planned) == 20 and all(p['planned'] == planned for p in probes)
    for records in zip(*(p['records'] for p in probes)):
        assert len({r['hash_projected'] for r in records}) == 1, records
        assert len({r['hash_params'] for r in records}) == 1, records
        # logged stats cover all layers and agree across ranks (train-time projections)
        if records[0]['stage'] == 'train':
            assert all(r['hub_layers'] == len(planned) for r in records)
            assert len({r['hub_energy'] for r in records}) == 1


def test_plain_ddp_every_rank_projects_all_layers_and_ends_identical(runs):
    probes = runs['plain']['probes']
    _assert_identical_across_ranks(probes, 'MMDistributedDataParallel')
    for probe in probes:
        for record in probe['records']:
            assert record['layers'] == probe['planned']
    assert 'split over' not in runs['plain']['log']
    assert len(re.findall(r'LRPET projection #\d+ at iteration', runs['plain']['log'])) == 2


def test_lrpetddp_splits_layers_across_ranks_and_ends_identical(runs):
    probes = runs['lrpetddp']['probes']
    _assert_identical_across_ranks(probes, 'LRPETDDP')
    planned, costs = probes[0]['planned'], probes[0]['costs']
    for records in zip(*(p['records'] for p in probes)):
        shares = [set(r['layers']) for r in records]
        assert all(shares), 'every rank projects a non-empty share'
        assert not shares[0] & shares[1]
        assert set.union(*shares) == set(planned)
        assert sum(len(s) for s in shares) == len(planned)
        loads = [sum(costs[name] for name in s) for s in shares]
        assert max(loads) - min(loads) <= max(costs.values())  # greedy balance
    log = runs['lrpetddp']['log']
    lines = re.findall(r'LRPET projection #\d+ at iteration.*', log)
    assert len(lines) == 2 and all('split over 2 ranks by LRPETDDP' in line for line in lines)
    assert 'validating with projected weights (20 layers' in log


def test_lrpetddp_gives_the_same_weights_as_plain_ddp(runs):
    """Same seed, same data: splitting the work changes nothing, bit for bit (every owner
    projects with rank 0's BatchNorm statistics, as every rank does with the plain wrapper)."""
    plain, split = runs['plain']['probes'][0], runs['lrpetddp']['probes'][0]
    assert ([r['hash_projected'] for r in split['records']] ==
            [r['hash_projected'] for r in plain['records']])
    assert ([r['hash_params'] for r in split['records']] ==
            [r['hash_params'] for r in plain['records']])


def test_assign_layers_is_deterministic_disjoint_and_balanced():
    class Target:  # the two attributes assign_layers uses
        def __init__(self, name, shape):
            self.name, self.matrix_shape = name, shape

    targets = [Target(f'l{i}', (64 * (1 + i % 4), 9 * 64 * (1 + i % 3))) for i in range(13)]
    cost = {t.name: t.matrix_shape[0] * t.matrix_shape[1] * min(t.matrix_shape) for t in targets}
    for world_size in (1, 2, 3, 16):
        owners = assign_layers(targets, world_size)
        assert owners == assign_layers(list(reversed(targets)), world_size)
        assert set(owners) == {t.name for t in targets}
        assert set(owners.values()) == set(range(min(world_size, len(targets))))
        loads = [sum(cost[n] for n, r in owners.items() if r == rank)
                 for rank in range(world_size)]
        if world_size <= len(targets):
            assert max(loads) - min(loads) <= max(cost.values())
    with pytest.raises(ValueError, match='world_size'):
        assign_layers(targets, 0)
