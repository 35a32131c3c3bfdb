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


@pytest.mark.slow
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
    result = plan_ranks_for_flops(model, 'backbone', selection, reduction, shape,
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
        plan_ranks_for_flops(model, 'backbone', only_layer1, 0.5, (3, 64, 64))


def test_budget_the_trainable_layers_cannot_reach_is_refused_with_the_maximum():
    """Frozen stages are not targets but their FLOPs still count: a budget only reachable by
    factorizing them is refused before training, naming the reachable maximum."""
    from mmdet.models.backbones import ResNet
    model = Holder(ResNet(depth=50, frozen_stages=3, init_cfg=None)).eval()
    selection = select_targets(model)  # frozen='skip': only layer4 is trainable
    assert all(t.name.startswith('backbone.layer4.') for t in selection.targets)
    with pytest.raises(ValueError, match=r'removes at most (\d+\.\d) % .*layers left alone '
                                         r'still count') as info:
        plan_ranks_for_flops(model, 'backbone', selection, 0.6, (3, 64, 64))
    reachable = float(info.value.args[0].split('removes at most ')[1].split(' %')[0])
    assert 0 < reachable < 60


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


def test_hook_and_factorize_tool_plan_a_flops_budget_alike(voc_root, tmp_path):
    """The hook plans at its own flops_input_shape (not the config's crop size); the factorize
    tool, re-planning the same budget from the config, must plan exactly the same."""
    from lrpet_mm.models import factorize_checkpoint

    cfg = load_toy_config('pspnet_r18-d8_toy_voc12aug', voc_root, tmp_path)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=100)
    cfg.custom_hooks = [dict(type='LRPETHook', flops_reduction=0.3, interval=1,
                             flops_input_shape=(3, 64, 160), rank_multiple=8)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=2, by_epoch=False)
    config = tmp_path / 'seg.py'
    cfg.dump(str(config))
    runner = Runner.from_cfg(cfg)
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
    info = hook.flops_info
    assert info['input_shape'] == [3, 64, 160]  # not the toy config's crop_size (128, 128)
    assert abs(info['flops_after'] - 0.7 * info['flops_before']) <= 0.01 * 0.7 * info[
        'flops_before']
    ckpt = torch.load(tmp_path / 'iter_2.pth', map_location='cpu', weights_only=False)
    assert ckpt['meta']['lrpet']['flops'] == info
    compact = factorize_model(runner.model, hook.plan)
    assert count_flops(compact.model.backbone, (3, 64, 160)) == info['flops_after']

    out = factorize_checkpoint(config, tmp_path / 'iter_2.pth', tmp_path / 'compact',
                               flops_reduction=0.3)
    assert out.flops == info
    assert {layer.name: layer.rank for layer in out.compact.layers} == {
        name: layer.rank for name, layer in hook.plan.layers.items()}
