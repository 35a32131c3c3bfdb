"""Whole-model channel pruning (``benchmarks/benchlib/head_pruning.py``), the comparison row
of whole-model LRPET in the evidence benchmark: which head channels it prunes, that removing
dead channels leaves the model's outputs unchanged, that a whole-model FLOPs target is met
within 1 %, and the refusals."""
from __future__ import annotations

import pytest
import torch

import lrpet_mm  # noqa: F401
from benchlib.head_pruning import head_groups, prune_heads_with_ratio, prune_whole_model
from helpers import DET_TOY, SEG_TOY, load_toy_config
from lrpet_mm.engine.flops import TensorForward, whole_model_flops
from lrpet_mm.models.factorize_checkpoint import build_model_from_config

DET_SHAPE = (3, 128, 160)
SEG_SHAPE = (3, 128, 128)


def _model(name: str, voc_root, tmp_path):
    torch.manual_seed(0)
    model = build_model_from_config(load_toy_config(name, voc_root, tmp_path))
    model.init_weights()
    model.eval()
    return model


def _outputs(model, shape):
    torch.manual_seed(1)
    x = torch.randn(1, *shape)
    with torch.no_grad():
        out = TensorForward(model, shape)(x)
    flat = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            flat.append(o)
        elif isinstance(o, (list, tuple)):
            for item in o:
                walk(item)
    walk(out)
    return flat


def _kill_lowest(model, ratio: float) -> None:
    """Make the channels pruning at ``ratio`` removes dead: zero filters (and bias, and for a
    conv + BN an output of exactly 0), so their removal cannot change any output."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for group in head_groups(model):
            producer = modules[group.producer]
            c = producer.weight.shape[0]
            dead = torch.arange(round(ratio * c))
            producer.weight[dead] = 0
            if producer.bias is not None:
                producer.bias[dead] = 0
            if group.norm is not None:
                norm = modules[group.norm]
                norm.bias[dead] = 0
                norm.running_mean[dead] = 0


@pytest.mark.parametrize('name,shape,expected', [
    (DET_TOY, DET_SHAPE, ['rpn_head.rpn_conv', 'roi_head.bbox_head.shared_fcs.0',
                          'roi_head.bbox_head.shared_fcs.1']),
    (SEG_TOY, SEG_SHAPE, [f'decode_head.psp_modules.{i}.1.conv' for i in range(4)]
     + ['decode_head.bottleneck.conv'])])
def test_pruning_dead_head_channels_keeps_every_output_and_the_predictors(
        name, shape, expected, voc_root, tmp_path) -> None:
    model = _model(name, voc_root, tmp_path)
    assert [g.producer for g in head_groups(model)] == expected
    _kill_lowest(model, 0.25)
    before = _outputs(model, shape)
    flops_before = whole_model_flops(model, shape)
    predictors = {n: m.weight.shape[0] for n, m in model.named_modules()
                  if n.split('.')[-1] in ('rpn_cls', 'rpn_reg', 'fc_cls', 'fc_reg', 'conv_seg')}
    channels = prune_heads_with_ratio(model, 0.25)
    assert set(channels) == set(expected)
    assert all(after == before - round(0.25 * before) for before, after in channels.values())
    after = _outputs(model, shape)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert whole_model_flops(model, shape) < flops_before
    assert {n: m.weight.shape[0] for n, m in model.named_modules() if n in predictors} == \
        predictors  # classes and box deltas untouched


def test_whole_model_target_is_met_within_one_percent_or_refused_with_the_reachable_minimum(
        voc_root, tmp_path) -> None:
    model = _model(SEG_TOY, voc_root, tmp_path)
    full = whole_model_flops(model, SEG_SHAPE)
    result = prune_whole_model(model, SEG_SHAPE, int(0.6 * full))
    assert result.flops_before == full
    assert abs(result.flops_after - 0.6 * full) <= 0.01 * 0.6 * full
    assert result.flops_after == whole_model_flops(model, SEG_SHAPE)
    assert any(k.startswith('backbone.') for k in result.channels)
    assert any(k.startswith('decode_head.') for k in result.channels)
    assert result.params_after < result.params_before
    fresh = _model(SEG_TOY, voc_root, tmp_path)
    with pytest.raises(ValueError, match=r'unreachable.*leaves \d+ FLOPs'):
        prune_whole_model(fresh, SEG_SHAPE, int(0.01 * full))
    with pytest.raises(ValueError, match='above the unpruned'):
        prune_whole_model(fresh, SEG_SHAPE, 2 * full)


def test_unsupported_head_is_refused_by_name(voc_root, tmp_path) -> None:
    cfg = load_toy_config(SEG_TOY, voc_root, tmp_path)
    cfg.model.decode_head = dict(type='FCNHead', in_channels=512, channels=64, num_convs=1,
                                 num_classes=21, norm_cfg=dict(type='BN'))
    model = build_model_from_config(cfg)
    with pytest.raises(ValueError, match=r'decode_head \(FCNHead\)'):
        head_groups(model)


def test_counting_whole_model_flops_leaves_the_model_in_its_mode(voc_root, tmp_path) -> None:
    # (a counted eval-mode detector used to come back in training mode, its BNs then
    # normalising with batch statistics)
    model = _model(DET_TOY, voc_root, tmp_path)
    whole_model_flops(model, DET_SHAPE)
    assert not any(m.training for m in model.modules())
    model.train()
    whole_model_flops(model, DET_SHAPE)
    assert model.training and model.backbone.layer1.training
