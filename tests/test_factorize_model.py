"""Factorizing projected mmdet / mmseg models: the compact model reproduces the projected one."""
import copy

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData

import lrpet_mm  # noqa: F401
from lrpet_mm.lowrank import LowRankConv2d, LowRankProjector, plan_ranks, select_targets
from lrpet_mm.lowrank.factorize import apply_factorized_structure
from lrpet_mm.models import NotLowRankError, factorize_model, measure_rank_errors

pytestmark = pytest.mark.slow  # drives a runner, a training, a tool or a benchmark


def randomize_bn_stats(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial statistics so BN folding is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def project(model: torch.nn.Module, ratio: float):
    # frozen stages projected too: the factorization must reproduce every kind of layer
    selection = select_targets(model, frozen='project')
    plan = plan_ranks(selection.shapes(), ratio)
    LowRankProjector(selection.targets, plan).project()
    return plan


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def build(cfg_dict: dict, scope: str):
    init_default_scope(scope)
    from mmengine.registry import MODELS
    return MODELS.build(cfg_dict).eval()


def detector_cfg() -> dict:
    cfg = Config.fromstring(
        "_base_ = 'mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py'\n"
        'model = dict(backbone=dict(init_cfg=None))\n', file_format='.py')
    return cfg.model


def segmentor_cfg() -> dict:
    cfg = Config.fromstring(
        "_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb4-20k_voc12aug-512x512.py'\n"
        "norm_cfg = dict(type='BN', requires_grad=True)\n"
        'model = dict(pretrained=None, data_preprocessor=dict(size=(64, 64)),\n'
        '    backbone=dict(norm_cfg=norm_cfg, init_cfg=None),\n'
        '    decode_head=dict(norm_cfg=norm_cfg), auxiliary_head=dict(norm_cfg=norm_cfg))\n',
        file_format='.py')
    return cfg.model


def test_faster_rcnn_r50_compact_model_reproduces_projected_model():
    torch.manual_seed(0)
    model = build(detector_cfg(), 'mmdet')
    randomize_bn_stats(model)
    plan = project(model, 0.5)
    # 1x1 64->64 at half rank would not save parameters: left alone
    assert len(plan) == 52 and 'backbone.layer1.0.conv1' in plan.skipped
    compact = factorize_model(model, plan)
    assert max(layer.relative_error for layer in compact.layers) < 1e-5
    assert isinstance(compact.model.backbone.layer3[2].conv2, LowRankConv2d)
    assert isinstance(compact.model.backbone.layer3[2].bn2, torch.nn.Identity)
    assert sum(p.numel() for p in compact.model.backbone.parameters()) < \
        0.75 * sum(p.numel() for p in model.backbone.parameters())

    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for got, expected in zip(compact.model.extract_feat(x), model.extract_feat(x)):
            assert rel(got, expected) < 1e-4
        # detector scores / boxes on the same proposals (NMS-free, so no tie-breaking noise)
        feats, feats_c = model.extract_feat(x), compact.model.extract_feat(x)
        proposals = InstanceData(bboxes=torch.tensor([[4., 4., 60., 50.], [30., 20., 120., 90.],
                                                      [0., 0., 128., 96.]]))
        meta = [dict(img_shape=(96, 128), ori_shape=(96, 128), scale_factor=(1., 1.))]
        from mmdet.structures.bbox import bbox2roi
        rois = bbox2roi([proposals.bboxes])
        out = model.roi_head._bbox_forward(feats, rois)
        out_c = compact.model.roi_head._bbox_forward(feats_c, rois)
        assert rel(out_c['cls_score'], out['cls_score']) < 1e-4
        assert rel(out_c['bbox_pred'], out['bbox_pred']) < 1e-4
        del meta
    # the original model is untouched
    assert isinstance(model.backbone.layer3[2].conv2, torch.nn.Conv2d)


def test_pspnet_v1c50_dilated_compact_model_reproduces_logits():
    torch.manual_seed(0)
    model = build(segmentor_cfg(), 'mmseg')
    randomize_bn_stats(model, seed=1)
    plan = project(model, 0.3)
    compact = factorize_model(model, plan)
    conv = compact.model.backbone.layer4[2].conv2
    assert isinstance(conv, LowRankConv2d) and conv[0].dilation == (4, 4)
    assert conv[0].padding == (4, 4)
    x = torch.randn(1, 3, 64, 64)
    metas = [dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64))]
    with torch.no_grad():
        logits = model.encode_decode(x, metas)
        logits_c = compact.model.encode_decode(x, metas)
    assert logits.shape == logits_c.shape == (1, 21, 64, 64)
    assert rel(logits_c, logits) < 1e-4


def test_not_low_rank_weights_are_refused_with_per_layer_errors():
    torch.manual_seed(0)
    model = build(segmentor_cfg(), 'mmseg')
    plan = project(model, 0.5)
    with torch.no_grad():
        model.backbone.layer2[0].conv1.weight.add_(
            torch.randn_like(model.backbone.layer2[0].conv1.weight))
    with pytest.raises(NotLowRankError, match=r'1 of \d+ layers are not low-rank.*\n'
                                              r'  backbone.layer2.0.conv1: rank \d+, relative '
                                              r'error \d\.\d+e-0[12]'):
        factorize_model(model, plan)
    forced = factorize_model(model, plan, force=True)
    assert isinstance(forced.model.backbone.layer2[0].conv1, LowRankConv2d)


def test_builder_structure_matches_factorized_state_dict_keys():
    torch.manual_seed(0)
    model = build(segmentor_cfg(), 'mmseg')
    plan = project(model, 0.5)
    compact = factorize_model(model, plan)
    spec = compact.components['backbone']
    rebuilt = apply_factorized_structure(copy.deepcopy(model.backbone), spec['ranks'],
                                         spec['folded_norms'])
    expected = {k for k in compact.model.state_dict() if k.startswith('backbone.')}
    assert {f'backbone.{k}' for k in rebuilt.state_dict()} == expected
    assert 'backbone.stem.0.0.weight' in expected and 'backbone.stem.1.weight' not in expected


def test_measure_rank_errors_pairs_bns_and_flags_the_perturbed_layer():
    torch.manual_seed(0)
    model = build(segmentor_cfg(), 'mmseg')
    randomize_bn_stats(model, seed=2)
    plan = project(model, 0.5)
    with torch.no_grad():
        model.backbone.layer1[0].conv2.weight.mul_(1 + 0.5 * torch.rand_like(
            model.backbone.layer1[0].conv2.weight))
    layers = {layer.name: layer for layer in measure_rank_errors(model, plan)}
    assert layers['backbone.stem.3'].folded_norm == 'backbone.stem.4'
    assert layers['backbone.layer1.0.conv2'].relative_error > 1e-2
    assert max(layer.relative_error for name, layer in layers.items()
               if name != 'backbone.layer1.0.conv2') < 1e-5
