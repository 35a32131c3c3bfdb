"""LRPETHook's schedule, driven by a stub runner in milliseconds: when it projects, what
validation sees, what checkpoints hold, what a resume restores."""
import itertools
from typing import List, Optional

import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.runner import EpochBasedTrainLoop
from torch import nn

from lrpet_mm.engine import LRPETHook
from lrpet_mm.lowrank import bn_folded_matrix, numerical_rank

_ids = itertools.count()


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 16, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.norm1_name, self.norm2_name = 'bn1', 'bn2'  # mmdet ResNet-style pairing


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = Backbone()
        self.head = nn.Conv2d(32, 2, 1)


class StubRunner:
    """What LRPETHook reads from an mmengine Runner, and nothing else."""

    def __init__(self, max_iters: int, epoch_based: bool = False):
        self.model = Model()
        self.hooks: List = []
        self.cfg = None
        self.iter = 0
        self.epoch = 0
        self.max_iters = max_iters
        self.message_hub = MessageHub.get_instance(f'stub-{next(_ids)}')
        self.train_loop = object.__new__(EpochBasedTrainLoop) if epoch_based else object()


def make(max_iters: int, epoch_based: bool = False, **settings):
    runner = StubRunner(max_iters, epoch_based)
    hook = LRPETHook(**{'rank_ratio': 0.5, **settings})
    runner.hooks.append(hook)
    projections: List[int] = []
    original = hook.project

    def spy(runner_, step):
        projections.append(step)
        return original(runner_, step)

    hook.project = spy
    hook.before_train(runner)
    return runner, hook, projections


def sgd_step(runner: StubRunner) -> None:
    """A stand-in for a training step: move every weight (full rank again)."""
    with torch.no_grad():
        for p in runner.model.parameters():
            p.add_(0.01 * torch.randn_like(p))


def train_iters(runner, hook, count: int, iters_per_epoch: Optional[int] = None) -> None:
    for _ in range(count):
        sgd_step(runner)
        hook.after_train_iter(runner, runner.iter)
        runner.iter += 1
        if iters_per_epoch and runner.iter % iters_per_epoch == 0:
            hook.after_train_epoch(runner)
            runner.epoch += 1


def low_rank(hook: LRPETHook) -> bool:
    return all(numerical_rank(bn_folded_matrix(t.layer.weight, t.norm)) <= hook.plan.rank_of(t.name)
               for t in hook.projector.targets)


def test_iteration_schedule_projects_every_interval_and_at_the_last_iteration():
    runner, hook, projections = make(8, interval=3)
    assert hook.by_epoch is False and len(hook.plan) == 2
    train_iters(runner, hook, 8)
    hook.after_train(runner)
    assert projections == [3, 6, 8]
    assert low_rank(hook) and hook.num_projections == 3 and hook.last_projected_step == 8
    assert runner.message_hub.get_scalar('train/lrpet_layers').current() == 2


def test_epoch_schedule_projects_every_interval_epochs_and_at_the_end():
    runner, hook, projections = make(12, epoch_based=True, interval=2)
    assert hook.by_epoch is True
    train_iters(runner, hook, 12, iters_per_epoch=4)
    hook.after_train(runner)
    assert projections == [8, 12]  # after epoch 2, then the last iteration (epoch 3)


def test_a_loop_that_stops_early_still_ends_low_rank():
    runner, hook, projections = make(100, interval=50)
    train_iters(runner, hook, 7)
    assert not low_rank(hook)
    hook.after_train(runner)
    assert projections == [7] and low_rank(hook)


def test_validation_between_projections_sees_projected_weights_then_training_ones():
    runner, hook, projections = make(10, interval=4)
    train_iters(runner, hook, 5)  # projected at 4, trained once more
    training = {n: w.detach().clone() for n, w in hook.projector.weights().items()}
    hook.before_val_epoch(runner)
    assert low_rank(hook) and projections == [4]  # validation-time projections are not counted
    hook.after_val(runner)
    assert all(torch.equal(w, training[n]) for n, w in hook.projector.weights().items())
    assert hook.num_projections == 1


def test_validation_right_after_a_projection_projects_nothing_more():
    runner, hook, _ = make(10, interval=4)
    train_iters(runner, hook, 4)
    before = {n: w.detach().clone() for n, w in hook.projector.weights().items()}
    hook.before_val_epoch(runner)
    assert hook._val_backup is None
    assert all(torch.equal(w, before[n]) for n, w in hook.projector.weights().items())


def test_project_before_val_off_validates_the_training_weights():
    runner, hook, _ = make(10, interval=4, project_before_val=False)
    train_iters(runner, hook, 5)
    hook.before_val_epoch(runner)
    assert not low_rank(hook)


def state_dict_of(runner) -> dict:
    return {k: v.detach().clone() for k, v in runner.model.state_dict().items()}


def test_checkpoints_during_validation_hold_training_or_validated_weights():
    runner, hook, _ = make(10, interval=4)
    train_iters(runner, hook, 5)
    training = state_dict_of(runner)
    hook.before_val_epoch(runner)
    projected = state_dict_of(runner)
    resumable = dict(state_dict=state_dict_of(runner), optimizer={}, meta={})
    best = dict(state_dict=state_dict_of(runner), meta={})
    hook.before_save_checkpoint(runner, resumable)
    hook.before_save_checkpoint(runner, best)
    hook.after_val(runner)
    key = 'backbone.conv1.weight'
    assert resumable['meta']['lrpet']['weights'] == 'training'
    assert torch.equal(resumable['state_dict'][key], training[key])
    assert best['meta']['lrpet']['weights'] == 'projected'
    assert torch.equal(best['state_dict'][key], projected[key])
    assert not torch.equal(projected[key], training[key])
    state = resumable['meta']['lrpet']
    assert state['last_projected_step'] == 4 and state['num_projections'] == 1
    assert state['settings']['rank_ratio'] == 0.5 and state['settings']['interval'] == 4
    assert [d['name'] for d in state['plan']['layers']] == ['backbone.conv1', 'backbone.conv2']
    assert 'lrpet_bases' not in resumable


def test_resume_restores_the_schedule_and_the_stored_plan():
    runner, hook, _ = make(10, interval=4)
    train_iters(runner, hook, 5)
    checkpoint = dict(state_dict=state_dict_of(runner), optimizer={}, meta={})
    hook.before_save_checkpoint(runner, checkpoint)
    checkpoint['meta']['lrpet']['plan']['layers'][0]['rank'] = 3  # the stored plan wins

    resumed = StubRunner(10)
    resumed.model.load_state_dict(checkpoint['state_dict'])
    resumed.iter = 5
    new = LRPETHook(rank_ratio=0.5, interval=4)
    resumed.hooks.append(new)
    new.after_load_checkpoint(resumed, checkpoint)
    new.before_train(resumed)
    assert new.last_projected_step == 4 and new.num_projections == 1
    assert new.plan.rank_of('backbone.conv1') == 3
    train_iters(resumed, new, 5)
    assert new.num_projections == 3 and new.last_projected_step == 10


def test_load_from_at_iteration_zero_plans_from_the_loaded_weights():
    runner, hook, _ = make(10, interval=4)
    train_iters(runner, hook, 5)
    checkpoint = dict(state_dict=state_dict_of(runner), meta={})
    hook.before_save_checkpoint(runner, checkpoint)
    checkpoint['meta']['lrpet']['plan']['layers'][0]['rank'] = 3
    fresh = StubRunner(10)  # runner.iter == 0: `load_from`, not a resume
    new = LRPETHook(rank_ratio=0.5)
    fresh.hooks.append(new)
    new.after_load_checkpoint(fresh, checkpoint)
    new.before_train(fresh)
    assert new.num_projections == 0 and new.plan.rank_of('backbone.conv1') != 3


def test_changed_settings_on_resume_are_logged_and_legacy_bases_ignored(monkeypatch):
    import lrpet_mm.engine.lrpet_hook as hook_module
    logged: List[str] = []
    monkeypatch.setattr(hook_module, 'print_log', lambda msg, **kwargs: logged.append(msg))
    runner, hook, _ = make(10, interval=4)
    train_iters(runner, hook, 5)
    checkpoint = dict(state_dict=state_dict_of(runner), optimizer={}, meta={})
    hook.before_save_checkpoint(runner, checkpoint)
    checkpoint['lrpet_bases'] = {'backbone.conv1': torch.zeros(16, 8)}  # an older version's
    stored = checkpoint['meta']['lrpet']['settings']
    stored.update(warm_start=True, layer_ratios={}, include='conv')  # as older versions wrote
    resumed = StubRunner(10)
    resumed.iter = 5
    new = LRPETHook(rank_ratio=0.5, interval=2, include=['conv'])  # same, canonically
    resumed.hooks.append(new)
    new.after_load_checkpoint(resumed, checkpoint)
    new.before_train(resumed)
    out = '\n'.join(logged)
    assert "ignoring 'lrpet_bases' in the checkpoint" in out
    assert "settings differ from the resumed checkpoint ({'interval': (4, 2)})" in out


def test_unsupported_state_version_is_refused():
    runner, hook, _ = make(10)
    checkpoint = dict(meta={})
    hook.before_save_checkpoint(runner, checkpoint)
    checkpoint['meta']['lrpet']['version'] = 99
    with pytest.raises(ValueError, match='LRPET state version 99 in the checkpoint is not '
                                         r'supported \(expected 1\)'):
        LRPETHook(rank_ratio=0.5).after_load_checkpoint(runner, checkpoint)


class OnCuda(Model):
    """Reports its parameters on cuda:0 (a CPU machine cannot hold CUDA tensors)."""

    def parameters(self, recurse=True):
        yield type('FakeParameter', (), {'device': torch.device('cuda', 0)})()


def test_a_model_on_cuda_gets_the_environment_check_before_training():
    """Here mmcv's ops are compiled for CPU only: the hook refuses before the first iteration
    with the fix instead of mmcv's 'nms_impl: implementation for device cuda:0 not found'."""
    runner = StubRunner(4)
    runner.model = OnCuda()
    hook = LRPETHook(rank_ratio=0.5)
    runner.hooks.append(hook)
    with pytest.raises(RuntimeError, match=r'(?s)cannot train on cuda:0.*mmcv 2\.1\.0 was compiled '
                                           r'without CUDA ops.*Fix: `pip uninstall mmcv`'):
        hook.before_train(runner)
    assert hook.plan is None  # nothing planned, nothing projected


def test_a_model_on_cpu_is_not_checked(monkeypatch):
    import lrpet_mm.engine.lrpet_hook as hook_module
    calls = []
    monkeypatch.setattr(hook_module, 'check_training_environment', calls.append)
    make(4)
    assert calls == []
