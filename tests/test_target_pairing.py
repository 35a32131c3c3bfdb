"""Structural conv↔BN pairing and target selection on the real mmdet / mmseg backbones."""
import re

import pytest
import torch
from torch import nn

from lrpet_mm.lowrank import find_conv_norm_pairs, select_targets


class Detector(nn.Module):
    """Just enough of a detector: the hook and tools address modules as ``backbone.*``."""

    def __init__(self, backbone: nn.Module, neck: nn.Module = None):
        super().__init__()
        self.backbone = backbone
        if neck is not None:
            self.neck = neck


def expected_resnet_pairs(backbone: nn.Module, deep_stem: bool, avg_down: bool) -> dict:
    """Pairs written out from the block classes' own structure (normN_name, downsample)."""
    expected = {}
    if deep_stem:
        for conv, norm in ((0, 1), (3, 4), (6, 7)):
            expected[f'backbone.stem.{conv}'] = f'backbone.stem.{norm}'
    else:
        expected['backbone.conv1'] = f'backbone.{backbone.norm1_name}'
    for layer_name in backbone.res_layers:
        for j, block in enumerate(getattr(backbone, layer_name)):
            prefix = f'backbone.{layer_name}.{j}'
            n_convs = 3 if hasattr(block, 'conv3') else 2
            for i in range(1, n_convs + 1):
                expected[f'{prefix}.conv{i}'] = f'{prefix}.{getattr(block, f"norm{i}_name")}'
            if block.downsample is not None:
                conv_idx = 1 if avg_down else 0
                expected[f'{prefix}.downsample.{conv_idx}'] = f'{prefix}.downsample.{conv_idx + 1}'
    return expected


def backbone_pairs(model: nn.Module) -> dict:
    return {c: n for c, n in find_conv_norm_pairs(model).items() if c.startswith('backbone.')}


def test_mmdet_resnet50_every_conv_paired_with_its_own_bn():
    from mmdet.models.backbones import ResNet
    model = Detector(ResNet(depth=50, frozen_stages=1, norm_eval=True, init_cfg=None))
    pairs = backbone_pairs(model)
    expected = expected_resnet_pairs(model.backbone, deep_stem=False, avg_down=False)
    assert len(expected) == 53
    assert pairs == expected
    # every pair really is the BN module the block calls after that conv
    block = model.backbone.layer3[0]
    assert model.get_submodule(pairs['backbone.layer3.0.conv2']) is block.norm2
    selection = select_targets(model, frozen='project')
    assert [t.name for t in selection.targets] == list(expected)
    assert all(t.rectify and t.norm is model.get_submodule(expected[t.name])
               for t in selection.targets)
    # frozen stages (stem + layer1: weights without grad) are left alone by default
    default = select_targets(model)
    assert len(default.targets) == 53 - 1 - 10
    assert 'backbone.layer1.0.conv1' not in {t.name for t in default.targets}
    assert default.skipped['backbone.layer1.2.conv3'].startswith('frozen (its weight does not '
                                                                 'require grad')
    assert 'backbone.layer2.0.conv1' in {t.name for t in default.targets}
    with pytest.raises(ValueError, match=r"frozen must be one of \('skip', 'project'\)"):
        select_targets(model, frozen='freeze')


def test_mmcv_sync_bn_is_paired_and_folded_like_sync_bn(tmp_path):
    """mmcv's MMSyncBN (mmcv.ops.SyncBatchNorm) is not a torch _BatchNorm; it still pairs,
    rectifies and folds (eval mode, its running statistics)."""
    import torch.distributed as dist
    from mmcv.ops import SyncBatchNorm as MMSyncBN

    from lrpet_mm.lowrank import LowRankProjector, bn_scale, fold_conv_bn, plan_ranks

    torch.manual_seed(0)
    # MMSyncBN asks for the world size when built: a one-process gloo group
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "pg"}', rank=0,
                            world_size=1)
    try:
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), MMSyncBN(16)).eval()
    finally:
        dist.destroy_process_group()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].running_mean.normal_()
    selection = select_targets(model, scope='')
    assert [(t.name, t.norm_name, t.rectify) for t in selection.targets] == [('0', '1', True)]
    plan = plan_ranks(selection.shapes(), 0.5)
    LowRankProjector(selection.targets, plan).project()
    folded = fold_conv_bn(model[0], model[1])
    expected = bn_scale(model[1])[:, None, None, None] * model[0].weight
    assert torch.allclose(folded.weight.to(expected), expected, atol=1e-6)
    assert torch.linalg.matrix_rank(folded.weight.reshape(16, -1).double(), rtol=1e-5) <= 8


def test_mmdet_resnet_v1d_deep_stem_and_avg_down_pairing():
    from mmdet.models.backbones import ResNetV1d
    model = Detector(ResNetV1d(depth=50, init_cfg=None))
    expected = expected_resnet_pairs(model.backbone, deep_stem=True, avg_down=True)
    assert backbone_pairs(model) == expected
    assert len(select_targets(model).targets) == len(expected) == 55


def test_mmseg_resnet_v1c50_dilated_pairing_with_syncbn():
    from mmseg.models.backbones import ResNetV1c
    backbone = ResNetV1c(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                         contract_dilation=True, norm_cfg=dict(type='SyncBN', requires_grad=True),
                         init_cfg=None)
    model = Detector(backbone)
    expected = expected_resnet_pairs(backbone, deep_stem=True, avg_down=False)
    assert backbone_pairs(model) == expected
    targets = select_targets(model).targets
    assert len(targets) == len(expected) == 55
    assert all(isinstance(t.norm, nn.SyncBatchNorm) for t in targets)
    dilated = model.get_submodule('backbone.layer4.1.conv2')
    assert dilated.dilation == (4, 4) and 'backbone.layer4.1.conv2' in {t.name for t in targets}


def test_mmdet_resnet18_basic_blocks():
    from mmdet.models.backbones import ResNet
    model = Detector(ResNet(depth=18, init_cfg=None))
    expected = expected_resnet_pairs(model.backbone, deep_stem=False, avg_down=False)
    assert backbone_pairs(model) == expected and len(expected) == 20


def test_grouped_and_deformable_convs_are_skipped_with_a_reason():
    from mmdet.models.backbones import ResNet, ResNeXt
    resnext = Detector(ResNeXt(depth=50, groups=32, base_width=4, init_cfg=None))
    selection = select_targets(resnext)
    assert selection.skipped['backbone.layer2.0.conv2'] == (
        'grouped conv (groups=32): each group is a separate (out/groups) x (in/groups·kh·kw) = '
        '8 x 72 matrix of rank <= 8; factorizing a group at rank k saves parameters only when '
        'k·(m + n) < m·n, i.e. k <= 7 here; per-group factorization is not implemented')
    assert 'backbone.layer2.0.conv1' in {t.name for t in selection.targets}
    dcn = Detector(ResNet(depth=50, dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
                          stage_with_dcn=(False, False, True, True), init_cfg=None))
    selection = select_targets(dcn)
    assert re.match(r'unsupported layer type DeformConv2dPack',
                    selection.skipped['backbone.layer3.0.conv2'])
    assert 'backbone.layer2.0.conv2' in {t.name for t in selection.targets}


def test_convs_without_bn_follow_the_unpaired_policy():
    from mmdet.models.backbones import ResNet
    from mmdet.models.necks import FPN
    model = Detector(ResNet(depth=18, init_cfg=None), FPN([64, 128, 256, 512], 64, 5))
    with pytest.raises(ValueError, match=r"no conv or linear layer to project in scope 'neck'.*"
                                         r"'neck.fpn_convs.0.conv': \"no BatchNorm consumes"):
        select_targets(model, scope='neck', include=r'fpn_convs')  # default unpaired='skip'
    projected = select_targets(model, scope='neck', include=r'fpn_convs', unpaired='project')
    assert [t.rectify for t in projected.targets] == [False] * 4
    with pytest.raises(ValueError, match=r"conv 'neck.lateral_convs.0.conv': no BatchNorm"):
        select_targets(model, scope='neck', unpaired='error')
    # without BN rectification every plain conv is projected
    assert len(select_targets(model, scope='neck', bn_rectify=False).targets) == 8


def test_group_norm_requires_explicit_permission():
    from mmdet.models.backbones import ResNet
    model = Detector(ResNet(depth=18, norm_cfg=dict(type='GN', num_groups=8), init_cfg=None))
    with pytest.raises(ValueError, match=r"conv 'backbone.conv1' is followed by GroupNorm "
                                         r"'backbone.gn1'.*unpaired='project'"):
        select_targets(model)
    targets = select_targets(model, unpaired='project').targets
    assert len(targets) == 20 and not any(t.rectify for t in targets)


def test_scope_and_patterns_that_match_nothing_are_errors():
    from mmdet.models.backbones import ResNet
    model = Detector(ResNet(depth=18, init_cfg=None))
    with pytest.raises(ValueError, match=r"scope 'backbone.layer9' does not exist"):
        select_targets(model, scope='backbone.layer9')
    with pytest.raises(ValueError, match=r"include pattern 'layer7' matches no conv"):
        select_targets(model, include=['layer7'])
    with pytest.raises(ValueError, match=r"exclude pattern 'nothing_here' matches no conv"):
        select_targets(model, exclude='nothing_here')
    with pytest.raises(ValueError, match=r"invalid regular expression '\('"):
        select_targets(model, include='(')


def test_pre_activation_conv_module_is_not_paired():
    from mmcv.cnn import ConvModule
    post = ConvModule(4, 8, 3, norm_cfg=dict(type='BN'))
    pre = ConvModule(8, 8, 3, norm_cfg=dict(type='BN'), order=('norm', 'conv', 'act'))
    model = nn.Sequential(post, pre)
    assert find_conv_norm_pairs(model) == {'0.conv': '0.bn'}
    assert model(torch.randn(1, 4, 8, 8)).shape == (1, 8, 4, 4)
