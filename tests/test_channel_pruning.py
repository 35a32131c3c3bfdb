"""benchmarks/benchlib/channel_pruning.py: L2 channel pruning of ResNet blocks to a FLOPs target."""
import copy

import pytest
import torch

from benchlib.channel_pruning import prunable_layers, prune_resnet_blocks, prune_with_ratio
from lrpet_mm.engine.flops import count_flops

DET_SHAPE = (3, 128, 160)


def det_resnet18(**kwargs):
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    return ResNet(depth=18, deep_stem=True, **kwargs)


@torch.no_grad()
def outputs(backbone, x):
    backbone.eval()
    return backbone(x)


def test_half_flops_keeps_stage_shapes_skipped_stage_and_largest_l2_filters():
    backbone = det_resnet18()
    original = copy.deepcopy(backbone)
    x = torch.randn(1, *DET_SHAPE)
    shapes = [o.shape for o in outputs(backbone, x)]
    target = count_flops(backbone, DET_SHAPE) // 2

    result = prune_resnet_blocks(backbone, DET_SHAPE, target,
                                 skip=lambda n: n.startswith('layer1'))

    assert abs(result.flops_after - target) <= 0.01 * target
    assert result.flops_after == count_flops(backbone, DET_SHAPE)
    assert result.params_after < result.params_before
    assert [o.shape for o in outputs(backbone, x)] == shapes
    assert result.num_pruned_layers == 6  # conv1 of the 2 blocks of layer2..layer4
    assert not any(name.startswith('layer1') for name in result.channels)
    for key, value in original.layer1.state_dict().items():
        assert torch.equal(backbone.layer1.state_dict()[key], value), key
    for name, (before, after) in result.channels.items():
        assert after < before
        block = name.rsplit('.', 1)[0]
        old = original.get_submodule(block)
        new = backbone.get_submodule(block)
        norms = old.conv1.weight.flatten(1).norm(dim=1)
        kept = torch.sort(torch.topk(norms, after).indices).values
        assert new.conv1.out_channels == after
        assert torch.equal(new.conv1.weight, old.conv1.weight[kept])
        assert torch.equal(new.norm1.weight, old.norm1.weight[kept])
        assert torch.equal(new.norm1.running_mean, old.norm1.running_mean[kept])
        assert torch.equal(new.conv2.weight, old.conv2.weight[:, kept])
        assert new.conv2.out_channels == old.conv2.out_channels


def test_pruning_dead_channels_leaves_the_outputs_unchanged():
    backbone = det_resnet18()
    backbone.double().eval()  # float64: only exact zeros may differ; .eval() returns None
    gen = torch.Generator().manual_seed(1)
    dead = {}
    with torch.no_grad():
        for layer in prunable_layers(backbone):
            c = layer.conv.out_channels
            idxs = torch.randperm(c, generator=gen)[:c // 4]
            dead[layer.name] = idxs
            assert layer.conv.weight.flatten(1).norm(dim=1).min() > 0.1  # live: large norms
            layer.conv.weight[idxs] = 0.0
            layer.norm.bias[idxs] = 0.0
            layer.norm.running_mean[idxs] = 0.0
    x = torch.randn(2, *DET_SHAPE, dtype=torch.float64)
    before = outputs(backbone, x)
    layers = {layer.name: layer for layer in prunable_layers(backbone)}
    live = {name: layers[name].conv.weight[
        [i for i in range(layers[name].conv.out_channels) if i not in set(idxs.tolist())]
    ].clone() for name, idxs in dead.items()}

    channels = prune_with_ratio(backbone, DET_SHAPE, 0.25)

    assert channels == {name: (c, c - c // 4) for name, (c, _) in channels.items()}
    for name, weight in live.items():  # exactly the dead ones went
        assert torch.equal(backbone.get_submodule(name).weight, weight)
    after = outputs(backbone, x)
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_dilated_mmseg_resnetv1c_reduced_by_30_percent_keeps_output_shapes():
    from mmseg.models.backbones import ResNetV1c
    torch.manual_seed(0)
    backbone = ResNetV1c(depth=18, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                         contract_dilation=True)
    shape = (3, 128, 128)
    x = torch.randn(1, *shape)
    shapes = [o.shape for o in outputs(backbone, x)]
    target = int(0.7 * count_flops(backbone, shape))

    result = prune_resnet_blocks(backbone, shape, target)

    assert abs(result.flops_after - target) <= 0.01 * target
    assert result.num_pruned_layers == 8
    assert [o.shape for o in outputs(backbone, x)] == shapes


def test_unreachable_and_above_original_targets_raise_with_the_numbers():
    shape = (3, 64, 64)
    backbone = det_resnet18()
    flops = count_flops(backbone, shape)
    floor = copy.deepcopy(backbone)
    prune_with_ratio(floor, shape, 0.95)
    reachable = count_flops(floor, shape)

    with pytest.raises(ValueError) as err:
        prune_resnet_blocks(backbone, shape, reachable // 2)
    msg = str(err.value)
    assert str(reachable // 2) in msg and str(reachable) in msg and '8 prunable' in msg

    with pytest.raises(ValueError) as err:
        prune_resnet_blocks(backbone, shape, flops + 1000)
    assert str(flops + 1000) in str(err.value) and str(flops) in str(err.value)
    assert count_flops(backbone, shape) == flops  # untouched


def test_pruned_frozen_backbone_trains_and_keeps_frozen_params_frozen():
    backbone = det_resnet18(frozen_stages=1)
    backbone.train()
    shape = (3, 64, 64)
    prune_with_ratio(backbone, shape, 0.5)  # layer1 (frozen) pruned too

    assert backbone.layer1[0].conv1.out_channels == 32
    assert backbone.training and not backbone.layer1.training
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    frozen = backbone.layer1[0].conv1.weight.clone()
    live = backbone.layer2[0].conv1.weight.clone()
    params = [p for p in backbone.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=0.1)
    loss = sum(o.pow(2).mean() for o in backbone(torch.randn(2, *shape)))
    loss.backward()
    optim.step()

    assert not torch.equal(backbone.layer2[0].conv1.weight, live)
    assert torch.equal(backbone.layer1[0].conv1.weight, frozen)

