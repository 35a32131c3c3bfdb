"""The math of LRPET's projection, energy transfer, BN rectification and rank formula."""
import math

import pytest
import torch
from torch import nn

from lrpet_mm.lowrank import (
    LowRankProjector,
    ProjectionError,
    RankPlan,
    bn_scale,
    factorization_pays,
    numerical_rank,
    plan_ranks,
    project_low_rank,
    rank_for_ratio,
    select_targets,
    truncated_svd,
)

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def tail_energy_norm(matrix: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(matrix.double().cpu())
    return float(s[k:].pow(2).sum().sqrt())


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('shape,k', [((64, 576), 32), ((256, 64), 10), ((7, 7), 1),
                                     ((30, 147), 29)])
def test_projection_error_equals_tail_singular_energy(device, shape, k):
    torch.manual_seed(0)
    w = torch.randn(*shape, device=device)
    result = project_low_rank(w, k, energy_transfer=False)
    error = float((w.double() - result.matrix.double()).norm())
    assert error == pytest.approx(tail_energy_norm(w, k), rel=1e-5)
    assert numerical_rank(result.matrix) <= k
    assert result.matrix.device == w.device and result.matrix.dtype == w.dtype


def test_projection_beats_other_rank_k_matrices():
    torch.manual_seed(1)
    w = torch.randn(40, 90)
    best = float((w - project_low_rank(w, 8, energy_transfer=False).matrix).norm())
    for _ in range(20):
        # the best fit of w inside a random 8-dim column space is a rank-8 matrix
        q, _ = torch.linalg.qr(torch.randn(40, 8))
        fitted = q @ (q.T @ w)
        assert float((w - fitted).norm()) >= best - 1e-4


@pytest.mark.parametrize('device', DEVICES)
def test_energy_transfer_preserves_frobenius_norm(device):
    torch.manual_seed(2)
    w = torch.randn(128, 1152, device=device)
    plain = project_low_rank(w, 20, energy_transfer=False)
    transferred = project_low_rank(w, 20, energy_transfer=True)
    assert float(transferred.matrix.norm()) == pytest.approx(float(w.norm()), rel=1e-5)
    assert float(plain.matrix.norm()) < 0.9 * float(w.norm())
    alpha = math.sqrt(1.0 / plain.energy_kept)
    assert transferred.scale == pytest.approx(alpha, rel=1e-6)
    assert torch.allclose(transferred.matrix, plain.matrix * alpha, rtol=1e-4, atol=1e-6)
    assert numerical_rank(transferred.matrix) <= 20
    kept = torch.linalg.svdvals(w.double().cpu())[:20].pow(2).sum() / w.double().pow(2).sum()
    assert plain.energy_kept == pytest.approx(float(kept), rel=1e-6)


def test_zero_matrix_projects_to_zero_without_nan():
    result = project_low_rank(torch.zeros(8, 9), 2)
    assert torch.equal(result.matrix, torch.zeros(8, 9))
    assert result.energy_kept == 1.0


def test_svd_non_convergence_is_retried_in_float64_on_cpu(monkeypatch):
    real_svd = torch.linalg.svd
    calls = []

    def flaky_svd(a, full_matrices=True):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError('simulated: SVD did not converge')
        return real_svd(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, 'svd', flaky_svd)
    w = torch.randn(16, 20)
    u, s, vh = truncated_svd(w, 4)
    assert calls == [torch.float32, torch.float64]
    assert u.dtype == torch.float32 and s.shape == (4, )
    assert torch.allclose(s, torch.linalg.svdvals(w)[:4], rtol=1e-5)


def test_svd_failing_twice_raises_projection_error(monkeypatch):
    def broken_svd(a, full_matrices=True):
        raise torch.linalg.LinAlgError('simulated: SVD did not converge')

    monkeypatch.setattr(torch.linalg, 'svd', broken_svd)
    with pytest.raises(ProjectionError, match='float64 CPU retry failed'):
        truncated_svd(torch.randn(4, 5), 2)


@pytest.mark.parametrize('m,n,ratio,expected', [
    (64, 576, 0.5, 32), (64, 147, 0.5, 32), (64, 64, 0.0, 64), (256, 64, 0.7, 19),
    (10, 30, 0.9, 1), (10, 30, 0.999, 1), (3, 27, 0.5, 1), (100, 100, 0.3, 70)])
def test_rank_formula(m, n, ratio, expected):
    assert rank_for_ratio(m, n, ratio) == expected
    assert rank_for_ratio(m, n, ratio) == max(1, math.floor(round((1 - ratio) * min(m, n), 9)))


@pytest.mark.parametrize('bad', [-0.1, 1.0, 1.5, float('nan'), '0.5', True, None])
def test_rank_ratio_out_of_range_is_rejected_with_the_value(bad):
    with pytest.raises(ValueError, match=r'rank_ratio must be a number in \[0, 1\), got'):
        rank_for_ratio(64, 64, bad)


@pytest.mark.parametrize('m,n,ratio,multiple,expected', [
    (64, 576, 0.6, 8, 24),     # floor 25.6 -> 25 -> nearest multiple of 8: 24
    (64, 576, 0.59, 8, 24),    # 26 -> 24
    (64, 576, 0.55, 8, 32),    # 28 -> 32 (halves round up)
    (128, 1152, 0.59, 8, 56),  # 52 -> 56 (52 / 8 = 6.5 rounds up)
    (10, 30, 0.9, 8, 8),       # at least one multiple
    (6, 30, 0.5, 8, 6),        # never above min(m, n)
    (64, 576, 0.6, 1, 25),     # 1 = the paper's floor
])
def test_rank_multiple_rounds_to_the_nearest_multiple(m, n, ratio, multiple, expected):
    k = rank_for_ratio(m, n, ratio, rank_multiple=multiple)
    full = min(m, n)
    raw = math.floor(round((1 - ratio) * full, 9))
    nearest = max(multiple, multiple * math.floor(raw / multiple + 0.5))
    assert k == min(nearest, full)
    assert k == expected
    if multiple > 1 and full >= multiple:
        assert k % multiple == 0 and (abs(k - raw) <= multiple / 2 or k == multiple)


@pytest.mark.parametrize('bad', [0, -8, 2.5, True, '8'])
def test_bad_rank_multiple_is_rejected_with_the_value(bad):
    with pytest.raises(ValueError, match=r'rank_multiple must be an int >= 1, got'):
        rank_for_ratio(64, 64, 0.5, rank_multiple=bad)
    with pytest.raises(ValueError, match=r'rank_multiple must be an int >= 1, got'):
        plan_ranks({'a.conv': (8, 72)}, 0.5, rank_multiple=bad)


def test_factorization_pays_only_when_it_saves_parameters():
    assert factorization_pays(64, 576, 32)
    assert not factorization_pays(4, 4, 2)  # 2·8 = 16 = 4·4
    assert not factorization_pays(64, 64, 63)


def test_plan_ranks_overrides_first_match_and_skips_unprofitable_layers():
    shapes = {'b.layer1.conv': (64, 576), 'b.layer2.conv': (128, 1152), 'b.head': (4, 4)}
    plan = plan_ranks(shapes, 0.5, layer_ratios={r'layer2': 0.75, r'layer\d': 0.25})
    assert plan.rank_of('b.layer1.conv') == 48
    assert plan.rank_of('b.layer2.conv') == 32
    assert 'b.head' not in plan and 'would not reduce parameters' in plan.skipped['b.head']
    again = RankPlan.from_dict(plan.to_dict())
    assert again.to_dict() == plan.to_dict()


def test_plan_ranks_rejects_an_override_that_matches_nothing():
    with pytest.raises(ValueError, match=r"pattern\(s\) \['layer9'\] match no layer"):
        plan_ranks({'a.conv': (8, 72)}, 0.5, layer_ratios={'layer9': 0.5})
    with pytest.raises(ValueError, match=r"layer_ratios\['a'\] must be a number in \[0, 1\)"):
        plan_ranks({'a.conv': (8, 72)}, 0.5, layer_ratios={'a': 2.0})


class ConvBN(nn.Module):
    def __init__(self, cin=8, cout=16, kernel=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=1, bias=False),
                                  nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, 2 * cout, 1, bias=False))

    def forward(self, x):
        return self.body(x)


def randomized_conv_bn(seed=0) -> ConvBN:
    torch.manual_seed(seed)
    model = ConvBN()
    bn = model.body[1]
    with torch.no_grad():
        bn.weight.copy_(torch.randn(16) * 2)  # includes negative γ
        bn.running_var.copy_(torch.rand(16) * 3 + 1e-3)
        bn.running_mean.copy_(torch.randn(16))
    return model


def make_projector(model, ratio=0.5, energy_transfer=True, bn_rectify=True,
                   bn_recovery='in_span'):
    selection = select_targets(model, scope='', bn_rectify=bn_rectify, unpaired='project')
    plan = plan_ranks(selection.shapes(), ratio)
    return LowRankProjector(selection.targets, plan, energy_transfer,
                            bn_recovery=bn_recovery), plan


@pytest.mark.parametrize('device', DEVICES)
def test_bn_rectification_matches_paper_eq16_and_makes_folded_weight_low_rank(device):
    # float64 so the comparison is not limited by float32 rounding amplified by 1/a_i
    model = randomized_conv_bn().to(device=device, dtype=torch.float64)
    conv, bn = model.body[0], model.body[1]
    original = conv.weight.detach().clone()
    projector, plan = make_projector(model, bn_recovery='eq16')
    k = plan.rank_of('body.0')
    projector.project()

    a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    folded = a[:, None] * original.reshape(16, -1)
    folded_k = project_low_rank(folded, k, energy_transfer=True).matrix
    eps = 1e-5
    expected = torch.diag(a / (a * a + eps)) @ folded_k  # (Γ² + εI)⁻¹ Γ W'_k
    assert torch.allclose(conv.weight.reshape(16, -1), expected, rtol=1e-9, atol=1e-12)
    new_folded = bn_scale(bn)[:, None] * conv.weight.detach().reshape(16, -1)
    assert numerical_rank(new_folded) <= k
    assert numerical_rank(conv.weight.detach().reshape(16, -1)) <= k
    # BNR differs from projecting the raw weight when BN scales differ per channel
    raw_k = project_low_rank(original.reshape(16, -1), k).matrix
    assert not torch.allclose(conv.weight.reshape(16, -1), raw_k, atol=1e-3)
    # the second conv has no BN after it: projected without BNR ('project' policy)
    assert not projector.targets[1].rectify


@pytest.mark.parametrize('device', DEVICES)
def test_bn_rectification_in_span_makes_folded_weight_its_projection(device):
    # the default recovery: ΓW_new = P̃_k(ΓW) exactly, i.e. W_new = Γ⁻¹ W'_k (paper eq. 15)
    model = randomized_conv_bn().to(device=device, dtype=torch.float64)
    conv, bn = model.body[0], model.body[1]
    original = conv.weight.detach().clone()
    projector, plan = make_projector(model)
    assert projector.bn_recovery == 'in_span'
    k = plan.rank_of('body.0')
    projector.project()

    a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    folded = a[:, None] * original.reshape(16, -1)
    folded_k = project_low_rank(folded, k, energy_transfer=True).matrix
    new_folded = bn_scale(bn)[:, None] * conv.weight.detach().reshape(16, -1)
    assert torch.allclose(new_folded, folded_k, rtol=1e-9, atol=1e-12)
    assert torch.allclose(conv.weight.reshape(16, -1), folded_k / a[:, None], rtol=1e-9,
                          atol=1e-12)
    assert numerical_rank(new_folded) <= k
    assert numerical_rank(conv.weight.detach().reshape(16, -1)) <= k
    assert float(new_folded.norm()) == pytest.approx(float(folded.norm()), rel=1e-12)


def test_projection_keeps_parameter_identity_and_optimizer_state_valid():
    model = randomized_conv_bn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8, 6, 6)).sum().backward()
    optimizer.step()
    params_before = [id(p) for p in model.parameters()]
    momentum_before = {id(p): optimizer.state[p]['momentum_buffer'].clone()
                       for p in model.parameters()}
    projector, _ = make_projector(model)
    projector.project()
    assert [id(p) for p in model.parameters()] == params_before
    for p in model.parameters():
        buf = optimizer.state[p]['momentum_buffer']
        assert buf.shape == p.shape and torch.isfinite(buf).all()
        assert torch.equal(buf, momentum_before[id(p)])
    model(torch.randn(2, 8, 6, 6)).sum().backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_energy_transfer_off_shrinks_norm_and_bn_rectify_off_projects_raw_weight():
    model = randomized_conv_bn()
    conv = model.body[0]
    original = conv.weight.detach().clone().reshape(16, -1)
    projector, plan = make_projector(model, energy_transfer=False, bn_rectify=False)
    projector.project()
    expected = project_low_rank(original, plan.rank_of('body.0'), energy_transfer=False).matrix
    assert torch.allclose(conv.weight.reshape(16, -1), expected, atol=1e-6)
    assert float(conv.weight.norm()) < float(original.norm())


@pytest.mark.parametrize('bad_value', [float('nan'), float('inf')])
def test_non_finite_weight_is_refused_naming_layer_and_position(bad_value):
    model = randomized_conv_bn()
    projector, _ = make_projector(model)
    with torch.no_grad():
        model.body[3].weight[0, 0, 0, 0] = bad_value
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ProjectionError, match=r"layer 'body.3' has 1 non-finite .* at iteration 7"):
        projector.project(where='iteration 7')
    after = model.state_dict()
    # body.0 comes first and was projected; the failing layer was not modified
    assert torch.equal(after['body.3.weight'].nan_to_num(), before['body.3.weight'].nan_to_num())


def test_projector_rejects_plan_that_does_not_fit_the_model():
    model = randomized_conv_bn()
    selection = select_targets(model, scope='', unpaired='project')
    plan = plan_ranks({'body.0': (16, 72), 'body.3': (32, 64)}, 0.5)
    with pytest.raises(ValueError, match=r"'body.3' has matrix shape \(32, 16\), the rank plan "
                                         r'expects \(32, 64\)'):
        LowRankProjector(selection.targets, plan)
