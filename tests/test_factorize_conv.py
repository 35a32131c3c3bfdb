"""Two cascaded convs reproduce a projected conv + BN."""
import pytest
import torch
from torch import nn

from lrpet_mm.lowrank import (
    LowRankConv2d,
    LowRankProjector,
    factorize_conv,
    plan_ranks,
    relative_rank_k_error,
    select_targets,
)

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def conv_bn(conv: nn.Conv2d, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(conv.out_channels)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(conv.out_channels))
        bn.bias.copy_(torch.randn(conv.out_channels))
        bn.running_mean.copy_(torch.randn(conv.out_channels))
        bn.running_var.copy_(torch.rand(conv.out_channels) + 0.1)
    return nn.Sequential(conv, bn).eval()


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('conv_kwargs', [
    dict(in_channels=16, out_channels=32, kernel_size=3, padding=1),
    dict(in_channels=16, out_channels=32, kernel_size=3, stride=2, padding=2, dilation=2),
    dict(in_channels=16, out_channels=24, kernel_size=(3, 1), padding=(4, 0), dilation=4,
         bias=True),
    dict(in_channels=32, out_channels=16, kernel_size=1, stride=2, bias=False),
])
def test_factorized_pair_reproduces_projected_conv_and_bn(device, conv_kwargs):
    model = conv_bn(nn.Conv2d(**conv_kwargs)).to(device)
    selection = select_targets(model, scope='')
    plan = plan_ranks(selection.shapes(), 0.5)
    LowRankProjector(selection.targets, plan).project()
    k = plan.rank_of('0')
    assert relative_rank_k_error(model[0], k, model[1]) < 1e-5

    pair = factorize_conv(model[0], k, model[1])
    assert isinstance(pair, LowRankConv2d) and pair.rank == k
    assert pair[0].stride == model[0].stride and pair[0].dilation == model[0].dilation
    assert pair[0].padding == model[0].padding and pair[0].bias is None
    assert pair[1].kernel_size == (1, 1) and pair[1].bias is not None
    x = torch.randn(2, conv_kwargs['in_channels'], 17, 19, device=device)
    expected, got = model(x), pair(x)
    assert got.shape == expected.shape
    assert float((got - expected).norm() / expected.norm()) < 1e-5
    n_params = sum(p.numel() for p in pair.parameters())
    m, n = model[0].weight.shape[0], model[0].weight[0].numel()
    assert n_params == k * (m + n) + m  # weights + the folded bias


def test_rank_k_error_is_large_for_a_weight_that_was_never_projected():
    model = conv_bn(nn.Conv2d(16, 32, 3, padding=1))
    assert relative_rank_k_error(model[0], 8, model[1]) > 0.3
    assert relative_rank_k_error(model[0], 32, model[1]) < 1e-6


def test_factorize_rejects_grouped_conv():
    with pytest.raises(ValueError, match='groups=1'):
        factorize_conv(nn.Conv2d(8, 8, 3, groups=2), 2)
