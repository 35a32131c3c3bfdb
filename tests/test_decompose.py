"""Truncated-SVD decomposition (the LRA baseline's first step) and BN folding of a trained
factorized network: ranks, Eckart–Young optimality, output equality, the LRPET structure."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpet_mm  # noqa: F401  (registers LRPETFactorized)
from benchlib.decompose import components_of, decompose_model, fold_factorized_norms
from lrpet_mm.lowrank import LowRankConv2d, plan_ranks, select_targets
from lrpet_mm.models import LRPETFactorized, factorize_model, planned_layers


def test_components_of() -> None:
    comps = components_of({'backbone.a.conv': 3, 'neck.b': 2}, {'backbone.a.conv': 'backbone.a.bn'})
    assert comps == {'backbone': dict(ranks={'a.conv': 3}, folded_norms={'a.conv': 'a.bn'}),
                     'neck': dict(ranks={'b': 2}, folded_norms={})}
    with pytest.raises(KeyError):
        components_of({'backbone.a': 3}, {'backbone.b': 'backbone.bn'})


# ------------------------------------------------------------------------------ decomposition
class TinyNet(nn.Module):
    """A 'backbone' of two conv+BN pairs (structural pairing inside an nn.Sequential)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(6, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2, bias=True),
            nn.BatchNorm2d(24))

    def forward(self, x):
        return self.backbone(x)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def best_rank_k(weight: torch.Tensor, k: int) -> torch.Tensor:
    matrix = weight.detach().double().reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def tiny_model_and_plan(ratio: float = 0.5):
    torch.manual_seed(0)
    model = TinyNet().eval()
    randomize_bn(model)
    plan = plan_ranks(select_targets(model).shapes(), ratio)
    return model, plan


def test_decompose_gives_the_planned_ranks_and_the_best_rank_k_approximation() -> None:
    model, plan = tiny_model_and_plan()
    assert {n: layer.rank for n, layer in plan.layers.items()} == {'backbone.0': 8,
                                                                  'backbone.3': 12}
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    result = decompose_model(model, plan)
    for layer in result.layers:
        conv = model.get_submodule(layer.name)
        pair = result.model.get_submodule(layer.name)
        assert isinstance(pair, LowRankConv2d) and pair.rank == plan.rank_of(layer.name)
        reduce, expand = pair[0], pair[1]
        assert (reduce.stride, reduce.padding, reduce.dilation) == (conv.stride, conv.padding,
                                                                  conv.dilation)
        assert reduce.bias is None and expand.kernel_size == (1, 1)
        product = (expand.weight.double().reshape(expand.out_channels, -1)
                   @ reduce.weight.double().reshape(pair.rank, -1))
        target = best_rank_k(conv.weight, pair.rank)
        assert float((product - target).norm() / target.norm()) < 1e-5  # Eckart–Young
        full = conv.weight.detach().double().reshape(conv.out_channels, -1)
        assert layer.relative_error == pytest.approx(
            float((full - target).norm() / full.norm()), rel=1e-6)
        assert 0.0 < layer.relative_error < 1.0  # a random weight is full rank: truncated
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        assert torch.equal(expand.bias, bias)
    assert [layer.norm for layer in result.layers] == ['backbone.1', 'backbone.4']
    # BNs kept, original untouched
    assert isinstance(result.model.backbone[1], nn.BatchNorm2d)
    assert isinstance(model.backbone[0], nn.Conv2d)
    assert all(torch.equal(v, original_state[k]) for k, v in model.state_dict().items())
    assert result.components == {'backbone': dict(ranks={'0': 8, '3': 12}, folded_norms={})}


def truncated_copy(model: nn.Module, plan) -> nn.Module:
    """A TinyNet copy of ``model`` whose planned conv weights are their best rank-k
    approximations (full-size convs)."""
    truncated = TinyNet().eval()
    truncated.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, layer in plan.layers.items():
            conv = truncated.get_submodule(name)
            conv.weight.copy_(best_rank_k(conv.weight, layer.rank).reshape(conv.weight.shape))
    return truncated


def test_decomposed_model_computes_the_truncated_network() -> None:
    model, plan = tiny_model_and_plan()
    truncated = truncated_copy(model, plan)
    x = torch.randn(2, 6, 12, 12)
    decomposed = decompose_model(model, plan).model.eval()
    with torch.no_grad():
        assert torch.allclose(decomposed(x), truncated(x), atol=1e-5, rtol=1e-4)


def test_fold_factorized_norms_keeps_outputs_and_gives_the_lrpet_structure() -> None:
    model, plan = tiny_model_and_plan()
    decomposed = decompose_model(model, plan).model
    randomize_bn(decomposed, seed=1)
    norms = {layer.name: layer.folded_norm for layer in planned_layers(model, plan)}
    x = torch.randn(2, 6, 12, 12)
    with torch.no_grad():
        before = decomposed.eval()(x)
        compact = fold_factorized_norms(decomposed, norms)
        after = compact.model(x)
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4)
    assert isinstance(compact.model.backbone[1], nn.Identity)
    assert isinstance(decomposed.backbone[1], nn.BatchNorm2d)  # copy_model=True by default
    # the same structure factorize_model gives a model whose weights are exactly rank k
    low_rank = decompose_model(model, plan)  # weights rank k ...
    exact = truncated_copy(model, plan)
    assert low_rank.components['backbone']['ranks'] == compact.components['backbone']['ranks']
    assert factorize_model(exact, plan).components == compact.components
    with pytest.raises(KeyError, match='not a factorized pair'):
        fold_factorized_norms(model, norms)


@pytest.mark.slow
def test_lra_path_on_the_mmdet_resnet() -> None:
    """Decompose a (random, full-rank) mmdet ResNet-18, load it strictly into the
    ``LRPETFactorized`` structure with BNs kept (the LRA fine-tuning network), fold it, and get
    the structure ``factorize_model`` gives an LRPET model."""
    import mmdet  # noqa: F401  (a hard requirement: fail, never skip)
    from mmengine.registry import MODELS, init_default_scope

    init_default_scope('mmdet')
    backbone_cfg = dict(type='ResNet', depth=18, init_cfg=None, norm_eval=False)

    class Wrapper(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

    torch.manual_seed(0)
    model = Wrapper(MODELS.build(backbone_cfg)).eval()
    randomize_bn(model)
    plan = plan_ranks(select_targets(model).shapes(), 0.5625)
    decomposed = decompose_model(model, plan)
    assert len(decomposed.layers) == len(plan) == 20
    assert all(0.0 < layer.energy_kept < 1.0 for layer in decomposed.layers)
    spec = decomposed.components['backbone']
    train_net = LRPETFactorized(module=backbone_cfg, ranks=spec['ranks'], folded_norms={})
    train_net.load_state_dict(decomposed.model.backbone.state_dict(), strict=True)
    norms = {layer.name: layer.folded_norm for layer in planned_layers(model, plan)}
    compact = fold_factorized_norms(Wrapper(train_net), norms)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = [t for t in Wrapper(train_net).eval().backbone(x)]
        out = compact.model.backbone(x)
    for a, b in zip(out, ref):
        assert float((a - b).norm() / b.norm()) < 1e-4
    expected = components_of({n: layer.rank for n, layer in plan.layers.items()}, norms)
    assert compact.components == expected
