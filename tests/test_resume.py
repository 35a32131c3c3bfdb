"""Resuming an LRPET run in a fresh process continues it bit for bit.

The real case: the upstream ``tools/train.py`` trains; a second run is killed with SIGKILL right
after a checkpoint written between two projections (and before the validation that follows
it), and a new process resumes from that checkpoint with ``--resume``. Its final weights must
equal those of the uninterrupted run exactly.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO_ROOT, SEG_TOY, lrpet_train_config
from lrpet_mm.utils.upstream import upstream_tool

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
MAX_ITERS = 6
CHECKPOINT_AT = 3  # between the projections at iterations 2 and 4; validation follows it


def deterministic_seg_config(voc_root, work_dir: Path, kill_at: int = 0) -> Path:
    """Toy PSPNet without random ops (fixed resize, no crop/flip/photometric, no dropout),
    LRPET every 2 iterations with the default validation-time projection, a checkpoint and a
    validation every 3 iterations; dumped to ``work_dir/seg.py``. With ``kill_at`` the process
    kills itself right after that iteration's checkpoint."""
    cfg = lrpet_train_config(SEG_TOY, voc_root, work_dir,
                             dict(type='IterBasedTrainLoop', max_iters=MAX_ITERS,
                                  val_interval=CHECKPOINT_AT),
                             hook=dict(rank_ratio=0.3, interval=2),
                             checkpoint_interval=CHECKPOINT_AT)
    pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                dict(type='Resize', scale=(128, 128), keep_ratio=False),
                dict(type='PackSegInputs')]
    for dataset in cfg.train_dataloader.dataset.datasets:
        dataset.pipeline = pipeline
    cfg.model.decode_head.dropout_ratio = 0.0
    cfg.model.auxiliary_head.dropout_ratio = 0.0
    cfg.randomness = dict(seed=0, deterministic=True)
    if kill_at:
        cfg.custom_imports.imports.append('kill_probe')
        cfg.custom_hooks.append(dict(type='KillAfterCheckpoint', iteration=kill_at))
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / 'seg.py'
    cfg.dump(str(path))
    return path


def train(config: Path, *args: str) -> subprocess.CompletedProcess:
    """The upstream mmseg ``tools/train.py`` in a new process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(TESTS_DIR), str(REPO_ROOT)] + ([os.environ['PYTHONPATH']]
                                            if os.environ.get('PYTHONPATH') else [])))
    return subprocess.run([sys.executable, str(upstream_tool('mmseg', 'train.py')), str(config),
                           *args], cwd=config.parent, env=env, capture_output=True, text=True,
                          timeout=600)


def final_weights(work_dir: Path) -> dict:
    checkpoint = torch.load(work_dir / f'iter_{MAX_ITERS}.pth', map_location='cpu',
                            weights_only=False)
    return checkpoint['state_dict']


def assert_ran(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope='module')
def killed_checkpoint(voc_root, tmp_path_factory) -> Path:
    """The checkpoint a run killed with SIGKILL right after iteration 3 left behind."""
    work_dir = tmp_path_factory.mktemp('killed')
    result = train(deterministic_seg_config(voc_root, work_dir, kill_at=CHECKPOINT_AT))
    assert result.returncode == -9, result.stderr[-3000:]  # SIGKILL
    assert sorted(p.name for p in work_dir.glob('iter_*.pth')) == [f'iter_{CHECKPOINT_AT}.pth']
    return work_dir / f'iter_{CHECKPOINT_AT}.pth'


def resumable_work_dir(voc_root, work_dir: Path, checkpoint: dict) -> Path:
    """A fresh work dir holding ``checkpoint`` as its last checkpoint (what ``--resume``
    reads), and the config without the fault."""
    config = deterministic_seg_config(voc_root, work_dir)
    torch.save(checkpoint, work_dir / f'iter_{CHECKPOINT_AT}.pth')
    (work_dir / 'last_checkpoint').write_text(str(work_dir / f'iter_{CHECKPOINT_AT}.pth'))
    return config


def test_fresh_process_resumes_a_killed_run_bit_for_bit(voc_root, tmp_path, killed_checkpoint):
    straight = deterministic_seg_config(voc_root, tmp_path / 'straight')
    assert_ran(train(straight))

    saved = torch.load(killed_checkpoint, map_location='cpu', weights_only=False)
    state = saved['meta']['lrpet']
    assert state['last_projected_step'] == 2 and state['num_projections'] == 1
    assert 'lrpet_bases' not in saved  # no projection state besides the schedule

    # a new process, without the fault, resumes from the killed run's checkpoint
    result = train(resumable_work_dir(voc_root, tmp_path / 'split', saved), '--resume')
    assert_ran(result)
    assert f'resumed epoch: 0, iter: {CHECKPOINT_AT}' in result.stdout + result.stderr
    expected, actual = final_weights(tmp_path / 'straight'), final_weights(tmp_path / 'split')
    assert set(actual) == set(expected)
    different = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:5]}'
    final = torch.load(tmp_path / 'split' / f'iter_{MAX_ITERS}.pth', map_location='cpu',
                       weights_only=False)['meta']['lrpet']
    assert final['num_projections'] == 3 and final['last_projected_step'] == MAX_ITERS


def test_checkpoint_of_an_older_version_with_subspace_bases_still_resumes(voc_root, tmp_path,
                                                                           killed_checkpoint):
    """lrpet_mm before 2026-12 saved warm-start bases under 'lrpet_bases' (and stored settings
    that no longer exist); such a checkpoint resumes, the bases ignored with a log line."""
    checkpoint = torch.load(killed_checkpoint, map_location='cpu', weights_only=False)
    layers = checkpoint['meta']['lrpet']['plan']['layers']
    checkpoint['lrpet_bases'] = {d['name']: torch.zeros(min(d['out_features'], d['in_features']),
                                                        d['rank']) for d in layers}
    checkpoint['meta']['lrpet']['settings'].update(rank_allocation='uniform', warm_start=True)
    result = train(resumable_work_dir(voc_root, tmp_path / 'old', checkpoint), '--resume')
    assert_ran(result)
    log = result.stdout + result.stderr
    assert "ignoring 'lrpet_bases' in the checkpoint" in log
    assert 'settings differ' not in log
    final = torch.load(tmp_path / 'old' / f'iter_{MAX_ITERS}.pth', map_location='cpu',
                       weights_only=False)['meta']['lrpet']
    assert final['num_projections'] == 3


def test_load_from_plain_checkpoint_plans_from_the_loaded_weights(voc_root, tmp_path):
    from mmengine.runner import Runner

    from lrpet_mm.engine import LRPETHook

    cfg = lrpet_train_config(SEG_TOY, voc_root, tmp_path / 'plain',
                             dict(type='IterBasedTrainLoop', max_iters=2, val_interval=100))
    cfg.custom_hooks = []
    Runner.from_cfg(cfg).train()
    plain = torch.load(tmp_path / 'plain' / 'iter_2.pth', map_location='cpu', weights_only=False)
    assert 'lrpet' not in plain['meta']

    cfg = lrpet_train_config(SEG_TOY, voc_root, tmp_path / 'warm',
                             dict(type='IterBasedTrainLoop', max_iters=2, val_interval=100))
    cfg.load_from = str(tmp_path / 'plain' / 'iter_2.pth')
    runner = Runner.from_cfg(cfg)
    seen = {}
    original = LRPETHook.build_plan

    def spy(self, model, cfg=None):
        seen['weights'] = model.backbone.layer2[0].conv1.weight.detach().clone()
        return original(self, model, cfg)

    LRPETHook.build_plan = spy
    try:
        runner.train()
    finally:
        LRPETHook.build_plan = original
    assert torch.equal(seen['weights'], plain['state_dict']['backbone.layer2.0.conv1.weight'])
    hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
    assert hook.num_projections == 1 and hook.last_projected_step == 2
