"""Rank planning for a FLOPs budget, checked against mmengine's counter on the compact model."""
import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from torch import nn

import lrpet_mm  # noqa: F401
from lrpet_mm.analysis import count_flops, infer_input_shape, plan_ranks_for_flops
from lrpet_mm.engine import LRPETHook
from lrpet_mm.lowrank import LowRankProjector, select_targets
from lrpet_mm.models import factorize_model
from helpers import load_toy_config


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
    with pytest.raises(ValueError, match=r'flops_reduction 0.5 cannot be reached in scope '
                                         r"'backbone': factorizing every target at the highest"):
        plan_ranks_for_flops(model.backbone, 'backbone', only_layer1, 0.5, (3, 64, 64))


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
