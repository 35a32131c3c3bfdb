"""Rank planning for a FLOPs budget, checked against mmengine's counter on the compact model."""
import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from torch import nn

import lrpet_mm  # noqa: F401
from helpers import load_toy_config
from lrpet_mm.engine import LRPETHook, count_flops, infer_input_shape, plan_ranks_for_flops
from lrpet_mm.lowrank import LowRankProjector, select_targets
from lrpet_mm.models import factorize_model


class Holder(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def resnet50_mmdet():
    from mmdet.models.backbones import ResNet
    return Holder(ResNet(depth=50, init_cfg=None)).eval()


def resnet_v1c50_mmseg():
    from mmseg.models.backbones import ResNetV1c
    return Holder(ResNetV1c(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                            contract_dilation=True, init_cfg=None)).eval()


@pytest.mark.parametrize('make_model,reduction,shape,multiple', [
    (resnet50_mmdet, 0.5, (3, 192, 320), 1),
    (resnet50_mmdet, 0.5, (3, 192, 320), 8),
    (resnet_v1c50_mmseg, 0.3, (3, 128, 128), 1),
])
def test_flops_budget_lands_within_one_percent_on_the_compact_model(make_model, reduction,
                                                                    shape, multiple):
    torch.manual_seed(0)
    model = make_model()
    selection = select_targets(model)
    result = plan_ranks_for_flops(model.backbone, 'backbone', selection, reduction, shape,
                                  rank_multiple=multiple)
    ranks = [layer.rank for layer in result.plan.layers.values()]
    assert len(ranks) == 53
    if multiple > 1:
        assert all(k % multiple == 0 for k in ranks), ranks
    else:  # the unaligned plan of this budget has ranks like 26 and 105
        assert any(k % 8 for k in ranks), ranks
    before = count_flops(model.backbone, shape)
    assert result.flops_before == before
    # the compact model really built from projected weights, counted by mmengine.analysis
    LowRankProjector(selection.targets, result.plan).project()
    compact = factorize_model(model, result.plan)
    after = count_flops(compact.model.backbone, shape)
    assert after == result.flops_after
    target = (1 - reduction) * before
    assert abs(after - target) <= 0.01 * target, (after, target)


def test_unreachable_flops_budget_is_an_error():
    model = resnet50_mmdet()
    only_layer1 = select_targets(model, include=r'layer1\.')
    with pytest.raises(ValueError, match=r"flops_reduction 0.5 cannot be reached in scope "
                                         r"'backbone': factorizing every target at its smallest "
                                         r'rank removes at most \d+\.\d %'):
        plan_ranks_for_flops(model.backbone, 'backbone', only_layer1, 0.5, (3, 64, 64))


def test_budget_the_trainable_layers_cannot_reach_is_refused_with_the_maximum():
    """Frozen stages are not targets but their FLOPs still count: a budget only reachable by
    factorizing them is refused before training, naming the reachable maximum."""
    from mmdet.models.backbones import ResNet
    model = Holder(ResNet(depth=50, frozen_stages=3, init_cfg=None)).eval()
    selection = select_targets(model)  # frozen='skip': only layer4 is trainable
    assert all(t.name.startswith('backbone.layer4.') for t in selection.targets)
    with pytest.raises(ValueError, match=r'removes at most (\d+\.\d) % .*convs left alone '
                                         r'still count') as info:
        plan_ranks_for_flops(model.backbone, 'backbone', selection, 0.6, (3, 64, 64))
    reachable = float(info.value.args[0].split('removes at most ')[1].split(' %')[0])
    assert 0 < reachable < 60


@pytest.mark.parametrize('multiple', [1, 8])
def test_energy_allocation_meets_the_budget_and_keeps_more_energy_than_uniform(multiple):
    from lrpet_mm.engine.planning import folded_weight
    from lrpet_mm.lowrank import LayerSpectrum, normalized_energy_kept

    torch.manual_seed(0)
    model = resnet50_mmdet()
    with torch.no_grad():  # layers with very different spectra: some nearly low-rank
        for i, module in enumerate(model.backbone.modules()):
            if isinstance(module, nn.Conv2d) and i % 3 == 0:
                w = module.weight.reshape(module.out_channels, -1)
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                s = s * torch.logspace(0, -3, s.numel())
                module.weight.copy_((u * s @ vh).reshape_as(module.weight))
    selection = select_targets(model)
    shape = (3, 192, 320)
    results = {how: plan_ranks_for_flops(model.backbone, 'backbone', selection, 0.5, shape,
                                         rank_multiple=multiple, rank_allocation=how)
               for how in ('uniform', 'energy')}
    spectra = {t.name: LayerSpectrum.from_weight(folded_weight(t), 1.0)
               for t in selection.targets}
    kept = {how: normalized_energy_kept(spectra, {n: layer.rank for n, layer
                                                  in r.plan.layers.items()})
            for how, r in results.items()}
    target = 0.5 * results['energy'].flops_before
    for how, result in results.items():
        assert abs(result.flops_after - target) <= 0.01 * target, how
        assert result.rank_allocation == how
    assert results['energy'].rank_ratio is None
    assert kept['energy'] > kept['uniform'] + 1.0, kept
    if multiple > 1:
        assert all(layer.rank % multiple == 0
                   for layer in results['energy'].plan.layers.values())
    # the plan factorizes to exactly the counted FLOPs
    LowRankProjector(selection.targets, results['energy'].plan).project()
    compact = factorize_model(model, results['energy'].plan)
    assert count_flops(compact.model.backbone, shape) == results['energy'].flops_after


def test_input_shape_inferred_from_upstream_configs():
    det = Config.fromstring("_base_ = 'mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py'\n",
                            file_format='.py')
    seg = Config.fromstring(
        "_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb4-20k_voc12aug-512x512.py'\n",
        file_format='.py')
    assert infer_input_shape(det) == (3, 600, 1000)
    assert infer_input_shape(seg) == (3, 512, 512)
    with pytest.raises(ValueError, match='cannot infer the input shape'):
        infer_input_shape(Config(dict(model=dict())))


def test_hook_plans_ranks_for_a_flops_budget(voc_root, tmp_path):
    cfg = load_toy_config('pspnet_r18-d8_toy_voc12aug', voc_root, tmp_path)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=100)
    cfg.custom_hooks = [dict(type='LRPETHook', flops_reduction=0.3, interval=1)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=2, by_epoch=False)
    runner = Runner.from_cfg(cfg)
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
    info = hook.flops_info
    assert info['input_shape'] == [3, 128, 128]  # the toy config's crop_size
    assert abs(info['flops_after'] - 0.7 * info['flops_before']) <= 0.01 * 0.7 * info[
        'flops_before']
    ckpt = torch.load(tmp_path / 'iter_2.pth', map_location='cpu', weights_only=False)
    assert ckpt['meta']['lrpet']['flops'] == info
    compact = factorize_model(runner.model, hook.plan)
    assert count_flops(compact.model.backbone, (3, 128, 128)) == info['flops_after']
