"""Resuming an LRPET run continues the projection schedule exactly."""
import pytest
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import lrpet_mm  # noqa: F401
from helpers import lrpet_train_config
from lrpet_mm.engine import LRPETHook
from lrpet_mm.engine.checkpoint_meta import BASES_KEY

SEG = 'pspnet_r18-d8_toy_voc12aug'


def deterministic_seg_config(voc_root, work_dir, max_iters: int):
    """Toy PSPNet without random ops: fixed resize, no crop/flip/photometric, no dropout."""
    cfg = lrpet_train_config(SEG, voc_root, work_dir,
                             dict(type='IterBasedTrainLoop', max_iters=max_iters,
                                  val_interval=100), checkpoint_interval=3)
    pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                dict(type='Resize', scale=(128, 128), keep_ratio=False),
                dict(type='PackSegInputs')]
    for dataset in cfg.train_dataloader.dataset.datasets:
        dataset.pipeline = pipeline
    cfg.model.decode_head.dropout_ratio = 0.0
    cfg.model.auxiliary_head.dropout_ratio = 0.0
    cfg.param_scheduler = []  # constant LR: the schedule length must not matter
    cfg.randomness = dict(seed=0, deterministic=True)
    return cfg


class SimulatedInterrupt(Exception):
    pass


@HOOKS.register_module(force=True)
class InterruptAfter(Hook):
    """Test fault: the job dies right after an iteration's checkpoint was written."""
    priority = 'LOWEST'

    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            raise SimulatedInterrupt(f'killed after iteration {self.iteration}')


def projections_of(runner):
    hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
    return hook


def test_resume_continues_the_schedule_exactly(voc_root, tmp_path, monkeypatch):
    steps, warm = [], []
    original = LRPETHook.project

    def spy(self, runner, step):
        steps.append(step)
        stats = original(self, runner, step)
        warm.append(stats.num_warm)
        return stats

    monkeypatch.setattr(LRPETHook, 'project', spy)

    straight = Runner.from_cfg(deterministic_seg_config(voc_root, tmp_path / 'straight', 6))
    straight.train()
    straight_steps, steps[:] = list(steps), []
    assert straight_steps == [2, 4, 6]
    # The later projections start from the saved subspace bases (so the bit-for-bit check
    # below covers warm starts): projection #1 is exact, #2 and #3 mostly warm.
    assert warm[0] == 0 and min(warm[1:]) > 0, warm

    cfg = deterministic_seg_config(voc_root, tmp_path / 'split', 6)
    cfg.custom_hooks.append(dict(type='InterruptAfter', iteration=3))
    with pytest.raises(SimulatedInterrupt):
        Runner.from_cfg(cfg).train()  # killed right after iteration 3 was checkpointed
    assert steps == [2]
    steps[:] = []
    saved = torch.load(tmp_path / 'split' / 'iter_3.pth', map_location='cpu', weights_only=False)
    assert set(saved[BASES_KEY]) == {d['name'] for d in saved['meta']['lrpet']['plan']['layers']}
    cfg = deterministic_seg_config(voc_root, tmp_path / 'split', 6)
    cfg.resume = True
    cfg.load_from = str(tmp_path / 'split' / 'iter_3.pth')
    second = Runner.from_cfg(cfg)
    second.train()
    assert steps == [4, 6]
    hook = projections_of(second)
    assert hook.num_projections == 3 and hook.last_projected_step == 6  # 2 (before), 4, 6
    for key, value in straight.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], value), key


def test_load_from_plain_checkpoint_is_a_warm_start(voc_root, tmp_path):
    cfg = deterministic_seg_config(voc_root, tmp_path / 'plain', 2)
    cfg.custom_hooks = []
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=2)
    Runner.from_cfg(cfg).train()
    plain = torch.load(tmp_path / 'plain' / 'iter_2.pth', map_location='cpu', weights_only=False)
    assert 'lrpet' not in plain['meta']

    cfg = deterministic_seg_config(voc_root, tmp_path / 'warm', 2)
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
    hook = projections_of(runner)
    assert hook.num_projections == 1 and hook.last_projected_step == 2
