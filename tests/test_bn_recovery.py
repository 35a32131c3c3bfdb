"""BN recovery of the projector: in-span recovery (the default) and paper eq. 16.

In-span: with V_k the top-k right singular vectors of the BN-folded weight ΓW,
W ← α·W·V_kV_kᵀ, so that ΓW_new = α·P_k(ΓW) exactly. Eq. 16: W ← (Γ² + εI)⁻¹Γ·α·P_k(ΓW).
"""
from typing import Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn

from lrpet_mm.lowrank import (
    BN_RECOVERIES,
    LowRankProjector,
    bn_scale,
    numerical_rank,
    plan_ranks,
    project_low_rank,
    select_targets,
)
from lrpet_mm.lowrank.batchnorm import unfold_factor

# (n_in, n_out, kernel): matrices (16, 72) (m <= n, left Gram side) and (64, 32) (m > n).
CONVS = {'m<=n': (8, 16, 3), 'm>n': (32, 64, 1)}
RATIO = 0.5


def conv_bn(shape: str, dtype: torch.dtype = torch.float64, seed: int = 0,
            zero_channels: Sequence[int] = ()) -> nn.Sequential:
    """A conv followed by a real BatchNorm2d with random γ (some negative), running mean and
    running variance, ready for eval; γ = 0 on ``zero_channels``."""
    n_in, n_out, kernel = CONVS[shape]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(n_in, n_out, kernel, padding=kernel // 2, bias=False),
                          nn.BatchNorm2d(n_out))
    with torch.no_grad():
        bn = model[1]
        bn.weight.copy_(torch.randn(n_out) * 2)
        bn.weight[list(zero_channels)] = 0.0
        bn.bias.copy_(torch.randn(n_out))
        bn.running_mean.copy_(torch.randn(n_out))
        bn.running_var.copy_(torch.rand(n_out) * 3 + 1e-3)
    return model.to(dtype).eval()


def projector_for(model: nn.Module, **kwargs) -> Tuple[LowRankProjector, int]:
    """The projector of the model's single conv (BN rectification on) and its rank."""
    selection = select_targets(model, scope='', bn_rectify=True)
    assert [t.rectify for t in selection.targets] == [True]
    plan = plan_ranks(selection.shapes(), RATIO)
    return LowRankProjector(selection.targets, plan, **kwargs), plan.rank_of('0')


def weight_matrix(model: nn.Module) -> Tensor:
    weight = model[0].weight.detach()
    return weight.reshape(weight.shape[0], -1).clone()


def svd_reference(folded: Tensor, k: int) -> Tuple[Tensor, Tensor, float]:
    """``(P_k(M) (m, n), V_k (n, k), α = ‖M‖_F / ‖P_k(M)‖_F)`` from a float64 full SVD."""
    u, s, vh = torch.linalg.svd(folded.double(), full_matrices=False)
    projected = (u[:, :k] * s[:k]) @ vh[:k]
    return projected, vh[:k].t(), float(folded.double().norm() / projected.norm())


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-10) -> None:
    """Equal up to float64 rounding, relative to the size of ``expected``."""
    error = float((actual.double() - expected.double()).norm())
    assert error <= rtol * float(expected.double().norm()), error


@pytest.mark.parametrize('shape', list(CONVS))
@pytest.mark.parametrize('energy_transfer', [True, False])
def test_in_span_folded_weight_is_the_energy_transferred_projection(shape, energy_transfer):
    model = conv_bn(shape)
    original = weight_matrix(model)
    projector, k = projector_for(model, energy_transfer=energy_transfer)
    assert projector.bn_recovery == 'in_span'  # the default
    stats = projector.project()
    a = bn_scale(model[1])
    folded = a[:, None] * original
    projected, _, alpha = svd_reference(folded, k)
    alpha = alpha if energy_transfer else 1.0
    new = weight_matrix(model)
    assert_close(a[:, None] * new, alpha * projected)
    assert numerical_rank(new) <= k and numerical_rank(a[:, None] * new) <= k
    if energy_transfer:
        assert float((a[:, None] * new).norm()) == pytest.approx(float(folded.norm()), rel=1e-12)
    # energy kept: of the folded weight, as before
    kept = float(projected.pow(2).sum() / folded.pow(2).sum())
    assert stats.energy_kept['0'] == pytest.approx(kept, rel=1e-10)


@pytest.mark.parametrize('shape', list(CONVS))
def test_in_span_equals_paper_eq15_when_the_scale_is_invertible(shape):
    model = conv_bn(shape)
    a = bn_scale(model[1])
    assert bool((a != 0).all())
    folded = a[:, None] * weight_matrix(model)
    projector, k = projector_for(model)
    projector.project()
    projected, _, alpha = svd_reference(folded, k)
    assert_close(weight_matrix(model), alpha * projected / a[:, None])  # Γ⁻¹·W'_k


@pytest.mark.parametrize('shape', list(CONVS))
def test_rows_with_zero_scale_keep_their_in_span_part_whereas_eq16_zeroes_them(shape):
    dead = [0, 3, 5]
    results = {}
    for recovery in BN_RECOVERIES:
        model = conv_bn(shape, zero_channels=dead)
        original = weight_matrix(model)
        projector, k = projector_for(model, bn_recovery=recovery)
        projector.project()
        results[recovery] = weight_matrix(model)
    a = bn_scale(model[1])
    assert bool((a[dead] == 0).all())
    projected, v, alpha = svd_reference(a[:, None] * original, k)
    in_span = results['in_span']
    expected_rows = alpha * original[dead] @ v @ v.t()  # their in-span part
    assert float(expected_rows.norm()) > 0.1 * float(original[dead].norm())
    assert_close(in_span[dead], expected_rows)
    assert_close(a[:, None] * in_span, alpha * projected)
    assert numerical_rank(in_span) <= k
    assert torch.count_nonzero(results['eq16'][dead]) == 0


@pytest.mark.parametrize('shape', list(CONVS))
@pytest.mark.parametrize('recovery', BN_RECOVERIES)
def test_scaling_the_weight_scales_the_result(shape, recovery):
    c = 7.5
    plain, scaled = conv_bn(shape, seed=1), conv_bn(shape, seed=1)
    with torch.no_grad():
        scaled[0].weight.mul_(c)
    for model in (plain, scaled):
        projector_for(model, bn_recovery=recovery)[0].project()
    assert_close(weight_matrix(scaled), c * weight_matrix(plain))


@pytest.mark.parametrize('shape', list(CONVS))
def test_in_span_is_invariant_to_a_weight_scale_the_bn_absorbs_and_eq16_is_not(shape):
    # W → cW with a → a/c (what a train-mode BN does): the BN output is unchanged.
    c = 100.0
    results = {}
    for recovery in BN_RECOVERIES:
        plain, scaled = conv_bn(shape, seed=2), conv_bn(shape, seed=2)
        with torch.no_grad():
            scaled[0].weight.mul_(c)
            scaled[1].weight.div_(c)
        for model in (plain, scaled):
            projector_for(model, bn_recovery=recovery)[0].project()
        results[recovery] = weight_matrix(scaled), c * weight_matrix(plain)
    assert_close(*results['in_span'])
    eq16_scaled, eq16_expected = results['eq16']
    assert float((eq16_scaled - eq16_expected).norm()) > 1e-3 * float(eq16_expected.norm())


@pytest.mark.parametrize('shape', list(CONVS))
@pytest.mark.parametrize('eps', [1e-5, 1e-2])
def test_eq16_is_selectable_and_unchanged(shape, eps):
    model = conv_bn(shape, zero_channels=[1])
    original = weight_matrix(model)
    projector, k = projector_for(model, bn_recovery='eq16', bnr_eps=eps)
    projector.project()
    a = bn_scale(model[1])
    factor = a / (a * a + eps)
    # bit-identical to what the projector did before in-span recovery existed
    before = project_low_rank(original.clone(), k, True, row_scale=a,
                              output_row_factor=unfold_factor(a, eps))
    assert torch.equal(weight_matrix(model), before.matrix)
    projected, _, alpha = svd_reference(a[:, None] * original, k)
    assert_close(weight_matrix(model), factor[:, None] * alpha * projected)


@pytest.mark.parametrize('shape', list(CONVS))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_projecting_a_projected_weight_again_changes_nothing(shape, dtype):
    model = conv_bn(shape, dtype=dtype, zero_channels=[2])
    projector, k = projector_for(model)
    projector.project()
    once = weight_matrix(model)
    projector.project()
    assert_close(weight_matrix(model), once, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    a = bn_scale(model[1])
    assert numerical_rank(a[:, None] * weight_matrix(model), rtol=1e-4) <= k


@pytest.mark.parametrize('shape', list(CONVS))
def test_rank_deficient_folded_weight_is_kept_and_zero_scale_rows_survive(shape):
    # Only 4 channels with a ≠ 0: rank(ΓW) = 4 < k.
    m = CONVS[shape][1]
    dead = list(range(4, m))
    model = conv_bn(shape, zero_channels=dead)
    original = weight_matrix(model)
    projector, k = projector_for(model)
    assert k > 4
    stats = projector.project()
    a = bn_scale(model[1])
    new = weight_matrix(model)
    assert_close(a[:, None] * new, a[:, None] * original)  # all folded energy is kept
    assert stats.energy_kept['0'] == pytest.approx(1.0)
    assert numerical_rank(new) <= k
    assert bool((new[dead].norm(dim=1) > 0).all())


@pytest.mark.parametrize('shape', list(CONVS))
def test_all_zero_bn_scale_projects_the_weight_itself(shape):
    """ΓW = 0 while W ≠ 0 (e.g. zero_init_residual): in-span recovery projects W itself (with
    energy transfer on ‖W‖), reports energy kept 1.0 (of the zero folded weight); eq. 16 would
    zero the layer for good."""
    m = CONVS[shape][1]
    results = {}
    for recovery in BN_RECOVERIES:
        model = conv_bn(shape, zero_channels=range(m))
        original = weight_matrix(model)
        projector, k = projector_for(model, bn_recovery=recovery)
        stats = projector.project()
        assert stats.energy_kept['0'] == 1.0
        results[recovery] = weight_matrix(model)
    projected, _, alpha = svd_reference(original, k)
    assert_close(results['in_span'], alpha * projected)
    assert numerical_rank(results['in_span']) == k
    assert torch.count_nonzero(results['eq16']) == 0


@pytest.mark.parametrize('recovery', BN_RECOVERIES)
def test_zero_weight_stays_zero_without_nan(recovery):
    for zero_channels in ((), range(16)):
        model = conv_bn('m<=n', zero_channels=zero_channels)
        with torch.no_grad():
            model[0].weight.zero_()
        projector, _ = projector_for(model, bn_recovery=recovery)
        assert projector.project().energy_kept['0'] == 1.0
        assert torch.count_nonzero(model[0].weight) == 0


def test_invalid_bn_recovery_is_rejected_naming_the_allowed_ones():
    model = conv_bn('m<=n')
    with pytest.raises(ValueError, match=r"bn_recovery must be one of \('in_span', 'eq16'\), "
                                         r"got 'eq15'"):
        projector_for(model, bn_recovery='eq15')
    with pytest.raises(ValueError, match='in_span and output_row_factor exclude each other'):
        project_low_rank(torch.randn(6, 9), 2, row_scale=torch.ones(6),
                         output_row_factor=torch.ones(6), in_span=True)


@pytest.mark.parametrize('m,n,k', [(24, 60, 10), (60, 24, 10)])
def test_in_span_projection_of_a_matrix_matches_the_reference(m, n, k):
    g = torch.Generator().manual_seed(6)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    a = torch.linspace(-2.0, 2.0, m, dtype=torch.float64)  # includes a ≈ 0 and negative scales
    projected, v, alpha = svd_reference(a[:, None] * w, k)
    result = project_low_rank(w, k, True, row_scale=a, in_span=True)
    assert_close(result.matrix, alpha * w @ v @ v.t())
    assert_close(a[:, None] * result.matrix, alpha * projected)
    half = project_low_rank(w.half(), k, True, row_scale=a, in_span=True)
    assert half.matrix.dtype == torch.float16
