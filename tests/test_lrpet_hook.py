"""LRPETHook on the real mmdet / mmseg runners, trained on the generated VOC-layout data."""
from typing import Dict, List

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import lrpet_mm  # noqa: F401  (registers LRPETHook)
from helpers import load_toy_config
from lrpet_mm.engine import LRPETHook
from lrpet_mm.lowrank import LowRankProjector, ProjectionError, bn_folded_matrix, numerical_rank

DET_CONFIG = 'faster-rcnn_r18_fpn_toy_voc'
SEG_CONFIG = 'pspnet_r18-d8_toy_voc12aug'


def folded_matrix(target) -> torch.Tensor:
    """The matrix whose rank LRPET controls: BN-folded weight where BNR is on."""
    return bn_folded_matrix(target.layer.weight.double(), target.norm if target.rectify else None)


def assert_low_rank(hook: LRPETHook) -> None:
    for target in hook.projector.targets:
        k = hook.plan.rank_of(target.name)
        assert numerical_rank(folded_matrix(target)) <= k, target.name


@HOOKS.register_module(force=True)
class ValWeightsProbe(Hook):
    """Test probe: sees the weights validation runs with and the metrics it returns."""
    priority = 'LOW'  # after LRPETHook (NORMAL) in every stage

    def __init__(self):
        self.records: List[dict] = []

    def before_train(self, runner):
        # after the Runner initialized the weights (Runner.train does it, not the constructor)
        self.weights_at_start = {k: v.detach().clone()
                                 for k, v in runner.model.state_dict().items()}

    def before_val_epoch(self, runner):
        hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
        ranks_ok = all(numerical_rank(folded_matrix(t)) <= hook.plan.rank_of(t.name)
                       for t in hook.projector.targets)
        self.records.append(dict(iter=runner.iter, low_rank_during_val=ranks_ok))

    def after_val_epoch(self, runner, metrics=None):
        self.records[-1]['metrics'] = dict(metrics or {})

    def after_val(self, runner):
        hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
        self.records[-1]['weights_after_val'] = {
            name: w.detach().clone() for name, w in hook.projector.weights().items()}


@pytest.fixture
def projection_log(monkeypatch):
    """Wrap every projection: record which parameters it changed."""
    log: List[Dict] = []
    original = LowRankProjector.project

    def recording_project(self, *args, **kwargs):
        root = recording_project.root
        before = {k: v.detach().clone() for k, v in root.state_dict().items()}
        stats = original(self, *args, **kwargs)
        after = root.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        log.append(dict(changed=changed, where=kwargs.get('where', args[0] if args else ''),
                        targets={t.name + '.weight' for t in self.targets}))
        return stats

    recording_project.root = None
    monkeypatch.setattr(LowRankProjector, 'project', recording_project)
    return recording_project, log


@pytest.mark.slow
def test_faster_rcnn_trains_with_lrpet_by_epoch(voc_root, tmp_path, projection_log):
    recorder, log = projection_log
    cfg = load_toy_config(DET_CONFIG, voc_root, tmp_path)
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=2, val_interval=1)
    cfg.model.backbone.frozen_stages = 1  # frozen stem + stage 1 are left alone by default
    cfg.custom_hooks = [dict(type='LRPETHook', rank_ratio=0.5), dict(type='ValWeightsProbe')]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1)
    runner = Runner.from_cfg(cfg)
    recorder.root = runner.model
    runner.train()

    hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
    untouched_before = next(h for h in runner.hooks
                            if isinstance(h, ValWeightsProbe)).weights_at_start
    iters_per_epoch = len(runner.train_dataloader)
    assert hook.by_epoch is True
    assert hook.num_projections == 2
    assert hook.last_projected_step == 2 * iters_per_epoch
    assert [entry['where'] for entry in log] == [
        f'iteration {iters_per_epoch} (epoch 0)', f'iteration {2 * iters_per_epoch} (epoch 1)']
    # projections touched only targeted conv weights
    for entry in log:
        assert entry['changed'] and entry['changed'] <= entry['targets']
    # the ResNet-18 backbone is targeted except the frozen stem and stage 1 (5 convs)
    assert len(hook.plan) == 15
    frozen = ['backbone.conv1'] + [f'backbone.layer1.{b}.conv{c}' for b in (0, 1) for c in (1, 2)]
    for name in frozen:
        assert name not in hook.plan and hook.plan.skipped[name].startswith('frozen'), name
        # ... and untouched: neither projected nor trained
        assert torch.equal(untouched_before[f'{name}.weight'],
                           runner.model.state_dict()[f'{name}.weight']), name
    assert runner.model.backbone.conv1.weight.requires_grad is False  # frozen_stages=1
    assert_low_rank(hook)
    # ... while untargeted parameters were trained (the neck is not frozen)
    neck_key = 'neck.lateral_convs.0.conv.weight'
    assert not torch.equal(untouched_before[neck_key], runner.model.state_dict()[neck_key])

    probe = next(h for h in runner.hooks if isinstance(h, ValWeightsProbe))
    assert [r['low_rank_during_val'] for r in probe.records] == [True, True]
    assert all('pascal_voc/mAP' in r['metrics'] for r in probe.records)

    hub = runner.message_hub
    assert hub.get_scalar('train/lrpet_layers').current() == 15
    assert 0.0 < hub.get_scalar('train/lrpet_energy_kept').current() <= 1.0

    ckpt = torch.load(tmp_path / 'epoch_2.pth', map_location='cpu', weights_only=False)
    state = ckpt['meta']['lrpet']
    assert state['last_projected_step'] == 2 * iters_per_epoch
    assert state['num_projections'] == 2
    assert len(state['plan']['layers']) == 15
    assert state['weights'] == 'training'
    assert state['settings']['frozen'] == 'skip' and state['settings']['bn_recovery'] == 'in_span'
    layer = next(d for d in state['plan']['layers'] if d['name'] == 'backbone.layer2.0.conv2')
    assert layer['rank'] == 64  # 3x3 128->128: min(128, 1152) = 128, half kept
    saved = ckpt['state_dict']['backbone.layer2.0.conv2.weight'].reshape(128, -1).double()
    bn = runner.model.backbone.layer2[0].bn2
    assert numerical_rank(bn_folded_matrix(saved, bn)) <= 64


@pytest.mark.slow
def test_pspnet_trains_with_lrpet_by_iteration_and_validates_projected_weights(
        voc_root, tmp_path, projection_log):
    recorder, log = projection_log
    cfg = load_toy_config(SEG_CONFIG, voc_root, tmp_path)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=6, val_interval=3)
    cfg.custom_hooks = [dict(type='LRPETHook', rank_ratio=0.6, interval=2),
                        dict(type='ValWeightsProbe')]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=3, by_epoch=False)
    runner = Runner.from_cfg(cfg)
    recorder.root = runner.model
    runner.train()

    hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
    assert hook.by_epoch is False
    wheres = [entry['where'] for entry in log]
    assert wheres == ['iteration 2 (epoch 0)', 'validation at iteration 3', 'iteration 4 (epoch 0)',
                      'iteration 6 (epoch 0)']
    for entry in log:
        assert entry['changed'] and entry['changed'] <= entry['targets']
    assert len(hook.plan) == 22  # ResNetV1c-18: deep stem 3 + blocks 16 + downsample 3
    assert_low_rank(hook)

    probe = next(h for h in runner.hooks if isinstance(h, ValWeightsProbe))
    assert [r['iter'] for r in probe.records] == [3, 6]
    assert [r['low_rank_during_val'] for r in probe.records] == [True, True]
    assert all('mIoU' in r['metrics'] for r in probe.records)
    # after the mid-schedule validation the training (not projected) weights were restored
    first_val_weights = probe.records[0]['weights_after_val']
    assert any(numerical_rank(w.reshape(w.shape[0], -1)) > hook.plan.rank_of(name)
               for name, w in first_val_weights.items())


def test_hook_is_found_under_mmdet_and_mmseg_default_scopes():
    from mmdet.registry import HOOKS as MMDET_HOOKS
    from mmengine.registry import DefaultScope
    from mmseg.registry import HOOKS as MMSEG_HOOKS
    for scope, registry in (('mmdet', MMDET_HOOKS), ('mmseg', MMSEG_HOOKS)):
        with DefaultScope.overwrite_default_scope(scope):
            hook = registry.build(dict(type='LRPETHook', rank_ratio=0.25))
        assert isinstance(hook, LRPETHook) and hook.settings.rank_ratio == 0.25


@pytest.mark.parametrize('kwargs,message', [
    (dict(rank_ratio=1.0), r'rank_ratio must be a number in \[0, 1\), got 1.0'),
    (dict(rank_ratio=-0.2), r'rank_ratio must be a number in \[0, 1\), got -0.2'),
    (dict(rank_ratio=0.5, interval=0), r'interval must be an int >= 1, got 0'),
    (dict(rank_ratio=0.5, unpaired='ignore'), r"unpaired must be one of .*got 'ignore'"),
    (dict(rank_ratio=0.5, layer_ratios={'layer1': 1.2}), r"layer_ratios\['layer1'\] must be a "
                                                         r'number in \[0, 1\), got 1.2'),
    (dict(rank_ratio=0.5, layer_ratios={'(': 0.2}), r"layer_ratios: invalid regular expression"),
    (dict(rank_ratio=0.5, include='layer[1'), r"include: invalid regular expression 'layer\[1'"),
    (dict(rank_ratio=0.5, bnr_eps=0.0), r'bnr_eps must be > 0, got 0.0'),
    (dict(rank_ratio=0.5, by_epoch='yes'), r"by_epoch must be one of \(None, True, False\), "
                                           r"got 'yes'"),
    (dict(rank_ratio=0.5, min_rank=0), r'min_rank must be an int >= 1, got 0'),
    (dict(), r'give exactly one of rank_ratio and flops_reduction, got rank_ratio=None'),
    (dict(rank_ratio=0.5, flops_reduction=0.5), r'give exactly one of rank_ratio and '),
    (dict(flops_reduction=1.0), r'flops_reduction must be a number in \(0, 1\), got 1.0'),
    (dict(flops_reduction=0.0), r'flops_reduction must be a number in \(0, 1\), got 0.0'),
    (dict(flops_reduction=0.5, flops_input_shape=(3, 512)), r'flops_input_shape must be '),
    (dict(flops_reduction=0.5, rank_multiple=0), r'rank_multiple must be an int >= 1, got 0'),
    (dict(rank_ratio=0.5, frozen='train'), r"frozen must be one of \('skip', 'project'\), got "
                                           r"'train'"),
    (dict(rank_ratio=0.5, bn_recovery='eq15'), r"bn_recovery must be one of .*got 'eq15'"),
])
def test_bad_hook_arguments_are_rejected_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRPETHook(**kwargs)


def test_unknown_hook_argument_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'rank'"):
        LRPETHook(rank=3)
    # arguments of older versions are no longer accepted either
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'rank_allocation'"):
        LRPETHook(flops_reduction=0.5, rank_allocation='energy')


@pytest.mark.slow
@pytest.mark.parametrize('hook_kwargs,message', [
    (dict(scope='backbone.layer9'), r"scope 'backbone.layer9' does not exist"),
    (dict(include=['layer7']), r"include pattern 'layer7' matches no conv"),
    (dict(exclude=r'decode_head'), r"exclude pattern 'decode_head' matches no conv"),
])
def test_scope_or_pattern_that_matches_nothing_fails_before_training(voc_root, tmp_path,
                                                                     hook_kwargs, message):
    cfg = load_toy_config(SEG_CONFIG, voc_root, tmp_path)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=100)
    cfg.custom_hooks = [dict(type='LRPETHook', rank_ratio=0.5, **hook_kwargs)]
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match=message):
        runner.train()
    assert runner.iter == 0


@HOOKS.register_module(force=True)
class PoisonWeightHook(Hook):
    """Test fault injection: writes a NaN into one conv weight after a given iteration."""
    priority = 'HIGH'  # runs before LRPETHook

    def __init__(self, at_iter: int, layer: str):
        self.at_iter, self.layer = at_iter, layer

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.at_iter:
            with torch.no_grad():
                runner.model.get_submodule(self.layer).weight[0, 0, 0, 0] = float('nan')


@pytest.mark.slow
def test_nan_weight_at_projection_time_names_layer_and_iteration(voc_root, tmp_path):
    cfg = load_toy_config(SEG_CONFIG, voc_root, tmp_path)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=4, val_interval=100)
    cfg.custom_hooks = [dict(type='LRPETHook', rank_ratio=0.5, interval=2),
                        dict(type='PoisonWeightHook', at_iter=2, layer='backbone.layer3.0.conv1')]
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ProjectionError, match=r"layer 'backbone.layer3.0.conv1' has 1 non-finite "
                                              r'weight value\(s\) at iteration 2'):
        runner.train()


@pytest.mark.slow
def test_best_checkpoint_holds_the_validated_projected_weights_and_factorizes(voc_root,
                                                                            tmp_path):
    """Validation between two projections runs on projected weights; the best checkpoint saved
    right after it must hold those (low-rank) weights, the regular one the training weights."""
    from lrpet_mm.engine import check_checkpoint_ranks, load_checkpoint_file
    from lrpet_mm.models import factorize_checkpoint

    cfg = load_toy_config(SEG_CONFIG, voc_root, tmp_path)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=12, val_interval=10)
    cfg.custom_hooks = [dict(type='LRPETHook', rank_ratio=0.5, interval=7)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=10,
                                        save_best='mIoU', rule='greater')
    config = tmp_path / 'seg.py'
    cfg.dump(str(config))
    runner = Runner.from_cfg(cfg)
    runner.train()

    best = load_checkpoint_file(tmp_path / 'best_mIoU_iter_10.pth')
    regular = load_checkpoint_file(tmp_path / 'iter_10.pth')
    assert best['meta']['lrpet']['weights'] == 'projected'
    assert regular['meta']['lrpet']['weights'] == 'training'
    plan = next(h for h in runner.hooks if isinstance(h, LRPETHook)).plan
    assert all(c.numerical_rank <= c.planned_rank for c in check_checkpoint_ranks(best, plan))
    assert any(c.numerical_rank > c.planned_rank for c in check_checkpoint_ranks(regular, plan))
    # the best checkpoint factorizes like a final one
    out = factorize_checkpoint(config, tmp_path / 'best_mIoU_iter_10.pth', tmp_path / 'compact')
    assert len(out.compact.layers) == len(plan)


@pytest.mark.slow
def test_ema_hook_is_refused_with_a_clear_error(voc_root, tmp_path):
    cfg = load_toy_config(SEG_CONFIG, voc_root, tmp_path)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=100)
    cfg.custom_hooks = [dict(type='EMAHook'), dict(type='LRPETHook', rank_ratio=0.5)]
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match=r'LRPETHook cannot be combined with EMAHook: the '
                                         r'averaged weights'):
        runner.train()
    assert runner.iter == 0


@pytest.mark.slow
def test_frozen_project_projects_frozen_stages(voc_root, tmp_path):
    cfg = load_toy_config(DET_CONFIG, voc_root, tmp_path)
    cfg.model.backbone.frozen_stages = 1
    runner = Runner.from_cfg(cfg)
    hook = LRPETHook(rank_ratio=0.5, frozen='project')
    hook.build_plan(runner.model, cfg)
    assert len(hook.plan) == 20 and 'backbone.conv1' in hook.plan
