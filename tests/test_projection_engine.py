"""The projection engine: top-k subspace without a full SVD, exact enough, warm-started."""
import pytest
import torch
from torch import nn

from lrpet_mm.lowrank import (
    LowRankProjector,
    ProjectionError,
    numerical_rank,
    plan_ranks,
    project_low_rank,
    select_targets,
)
from lrpet_mm.lowrank.subspace import (
    COMPLEMENT_STEPS,
    ENERGY_RTOL,
    RitzBasis,
    certified_top_basis,
    gram_matrix,
    refine_basis,
)

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
SHAPES = [(24, 60, 10), (60, 24, 10), (32, 32, 20), (16, 144, 15)]  # (m, n, k)


def optimal_error(matrix: torch.Tensor, rank: int) -> float:
    """sqrt(Σ_{i>k} σ_i²) computed in float64."""
    s = torch.linalg.svdvals(matrix.detach().double().cpu())
    return float(s[rank:].pow(2).sum().sqrt())


def achieved_error(matrix: torch.Tensor, projected: torch.Tensor) -> float:
    return float((matrix.double() - projected.double()).norm())


def spectrum_matrix(m: int, n: int, decay: float = 0.9, seed: int = 0) -> torch.Tensor:
    """Random (m, n) matrix with geometrically decaying singular values."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    s = decay ** torch.arange(min(m, n), dtype=torch.float32)
    return (u * s) @ v.t()


def drifted(projected: torch.Tensor, relative: float, seed: int = 1) -> torch.Tensor:
    """A projected weight after some training: plus dense noise of ``relative`` size."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(projected.shape, generator=g).to(projected.device)
    return projected + relative * projected.norm() / noise.norm() * noise


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('m,n,k', SHAPES)
@pytest.mark.parametrize('method', ['exact', 'svd'])
def test_exact_methods_meet_the_error_bound_and_rank(device, m, n, k, method):
    w = spectrum_matrix(m, n).to(device)
    result = project_low_rank(w, k, energy_transfer=False, method=method)
    assert result.method == method
    assert result.matrix.device.type == device and result.matrix.shape == (m, n)
    assert achieved_error(w, result.matrix) <= (1 + 1e-4) * optimal_error(w, k)
    assert numerical_rank(result.matrix, rtol=1e-5) <= k


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('m,n,k', SHAPES)
@pytest.mark.parametrize('drift', [0.01, 0.1])
def test_warm_start_from_previous_basis_is_certified_and_accurate(device, m, n, k, drift):
    w0 = spectrum_matrix(m, n).to(device)
    first = project_low_rank(w0, k, energy_transfer=False)
    assert first.method in ('exact', 'exact-f32') and first.basis.shape == (min(m, n), k)
    w1 = drifted(first.matrix, drift)
    second = project_low_rank(w1, k, energy_transfer=False, warm_basis=first.basis)
    assert second.method.startswith('warm')
    assert achieved_error(w1, second.matrix) <= (1 + 1e-4) * optimal_error(w1, k)
    assert numerical_rank(second.matrix, rtol=1e-5) <= k


@pytest.mark.parametrize('m,n,k', SHAPES)
def test_unrelated_warm_basis_is_rejected_and_result_stays_exact(m, n, k):
    w = spectrum_matrix(m, n, decay=0.97)
    g = torch.Generator().manual_seed(5)
    wrong, _ = torch.linalg.qr(torch.randn(min(m, n), k, generator=g))
    result = project_low_rank(w, k, energy_transfer=False, warm_basis=wrong)
    assert result.method in ('exact', 'exact-f32')
    assert achieved_error(w, result.matrix) <= (1 + 1e-4) * optimal_error(w, k)


def test_a_wrong_shaped_or_nan_warm_basis_is_ignored():
    w = spectrum_matrix(20, 30)
    for bad in (torch.randn(20, 3), torch.full((20, 4), float('nan')), torch.randn(30, 4)):
        assert project_low_rank(w, 4, warm_basis=bad).method in ('exact', 'exact-f32')


def test_refined_basis_certificate_bound_holds_against_the_true_spectrum():
    w = drifted(project_low_rank(spectrum_matrix(40, 90), 12, False).matrix, 0.05)
    start = project_low_rank(spectrum_matrix(40, 90), 12, False).basis
    gram = gram_matrix(w, 'left', torch.float64)
    ritz = refine_basis(gram, start.double())
    top = torch.linalg.eigvalsh(gram).flip(-1)[:12].sum()
    achieved = float(ritz.values.sum())
    assert float(top) - achieved <= ritz.residual_sq / (float(ritz.values[-1])
                                                        - float(top.new_tensor(0)) - 0) + 1e-12
    assert torch.allclose(ritz.basis.t() @ ritz.basis, torch.eye(12, dtype=torch.float64),
                          atol=1e-10)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('m,n,k', SHAPES)
@pytest.mark.parametrize('method', ['exact', 'svd'])
def test_row_scale_projects_the_folded_matrix_without_forming_it(device, m, n, k, method):
    w = spectrum_matrix(m, n).to(device)
    a = torch.linspace(0.2, 3.0, m, device=device)
    folded = project_low_rank(w * a[:, None], k, energy_transfer=True, method=method)
    implicit = project_low_rank(w, k, energy_transfer=True, method=method, row_scale=a)
    tol = 1e-5 * float(folded.matrix.abs().max())
    assert torch.allclose(implicit.matrix, folded.matrix, atol=tol)
    assert implicit.scale == pytest.approx(folded.scale, rel=1e-5)
    # Warm start with a row scale: the next projection of the drifted (unfolded) weight.
    w1 = drifted(implicit.matrix / a[:, None], 0.01)
    warm = project_low_rank(w1, k, True, warm_basis=implicit.basis, row_scale=a)
    reference = project_low_rank(w1 * a[:, None], k, True, method='svd')
    assert warm.method.startswith('warm')
    assert torch.allclose(warm.matrix, reference.matrix,
                          atol=1e-4 * float(reference.matrix.abs().max()))


def test_methods_agree_and_energy_transfer_keeps_the_norm():
    w = spectrum_matrix(48, 100, decay=0.95)
    results = {m: project_low_rank(w, 20, True, method=m) for m in ('svd', 'exact')}
    warm = project_low_rank(drifted(results['exact'].matrix / results['exact'].scale, 0.02), 20,
                            True, warm_basis=results['exact'].basis)
    assert torch.allclose(results['svd'].matrix, results['exact'].matrix, atol=1e-5)
    assert results['exact'].energy_kept == pytest.approx(results['svd'].energy_kept, rel=1e-6)
    for result in (*results.values(), warm):
        assert float(result.matrix.norm()) == pytest.approx(float(w.norm()) if result is not warm
                                                            else result.matrix.norm().item())
    assert float(results['exact'].matrix.norm()) == pytest.approx(float(w.norm()), rel=1e-5)


def test_zero_matrix_and_bad_arguments():
    zero = project_low_rank(torch.zeros(6, 9), 2)
    assert torch.equal(zero.matrix, torch.zeros(6, 9))
    with pytest.raises(ValueError, match='method must be one of'):
        project_low_rank(torch.randn(6, 9), 2, method='qr')
    with pytest.raises(ValueError, match=r'rank must be in \[1, 6\]'):
        project_low_rank(torch.randn(6, 9), 7)


def test_half_precision_weights_are_projected_in_float32():
    w = spectrum_matrix(16, 40).half()
    result = project_low_rank(w, 5, energy_transfer=False)
    assert result.matrix.dtype == torch.float16 and result.basis.dtype == torch.float32
    assert numerical_rank(result.matrix.float(), rtol=1e-2) <= 5


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(8, 32, 3, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU(), nn.Conv2d(32, 16, 1, bias=False),
                                  nn.BatchNorm2d(16))

    def forward(self, x):
        return self.body(x)


def make_projector(model, init_bn=True, **kwargs):
    with torch.no_grad():
        for bn in (model.body[1], model.body[4]) if init_bn else ():
            bn.weight.uniform_(0.5, 1.5)
            bn.running_var.uniform_(0.5, 2.0)
    selection = select_targets(model, '', bn_rectify=True)
    plan = plan_ranks(selection.shapes(), 0.5)
    return LowRankProjector(selection.targets, plan, **kwargs), plan


def test_projector_warm_starts_the_second_projection_and_matches_exact():
    torch.manual_seed(0)
    model = TwoConvs()
    projector, plan = make_projector(model)
    first = projector.project()
    assert first.num_warm == 0 and set(first.methods.values()) <= {'exact', 'exact-f32'}
    with torch.no_grad():
        for w in projector.weights().values():
            w.add_(0.01 * w.norm() / w.numel() ** 0.5 * torch.randn_like(w))
    reference = TwoConvs()
    reference.load_state_dict(model.state_dict())
    exact, _ = make_projector(reference, init_bn=False, warm_start=False)
    exact.project()
    second = projector.project()
    assert second.num_warm == len(plan)
    for name, w in projector.weights().items():
        assert torch.allclose(w, exact.weights()[name], atol=1e-5), name
    for name, basis in projector.bases.items():
        assert basis.shape == (min(plan.layers[name].out_features,
                                   plan.layers[name].in_features), plan.rank_of(name))


def test_channels_last_weights_are_projected_in_their_own_memory_format():
    # A 3x3 conv in channels_last has no (m, n) view: the projection runs on a copy and must
    # be written back (it was silently lost before), keeping the parameter and its layout.
    torch.manual_seed(0)
    model = TwoConvs()
    projector, plan = make_projector(model)
    reference = TwoConvs()
    reference.load_state_dict(model.state_dict())
    expected, _ = make_projector(reference, init_bn=False)
    expected.project()
    model.to(memory_format=torch.channels_last)
    params = {name: w for name, w in projector.weights().items()}
    assert not params['body.0'].is_contiguous()
    projector.project()
    for name, w in projector.weights().items():
        assert w is params[name]
        assert w.is_contiguous(memory_format=torch.channels_last), name
        assert torch.allclose(w, expected.weights()[name], atol=1e-6), name
        assert numerical_rank(w.detach().reshape(w.shape[0], -1)) <= plan.rank_of(name)


def test_basis_state_round_trip_and_bad_entries_are_dropped():
    torch.manual_seed(0)
    projector, plan = make_projector(TwoConvs())
    projector.project()
    state = projector.basis_state()
    assert all(t.device.type == 'cpu' for t in state.values())
    other, _ = make_projector(TwoConvs())
    state['nope'] = torch.zeros(3, 3)
    name = next(iter(plan.layers))
    state[name] = state[name][:, :1]
    dropped = other.load_basis_state(state)
    assert sorted(dropped) == sorted(['nope', name])
    assert set(other.bases) == set(plan.layers) - {name}


def test_non_finite_weight_is_refused_before_anything_changes():
    torch.manual_seed(0)
    model = TwoConvs()
    projector, _ = make_projector(model)
    with torch.no_grad():
        model.body[3].weight[0, 0, 0, 0] = float('nan')
    before = model.body[0].weight.detach().clone()
    with pytest.raises(ProjectionError, match="body.3.*non-finite"):
        projector.project(where='iteration 3')
    # The layers before the bad one were projected; the bad one is untouched.
    assert torch.isnan(model.body[3].weight).any()
    assert not torch.equal(model.body[0].weight, before)


def test_float32_rounding_limited_case_is_certified_on_the_float64_gram():
    # One tail direction whose energy is far below float32's resolution of σ_1²: the float32
    # iteration cannot certify the result; the float64 tier can, without an eigensolver.
    w0 = spectrum_matrix(32, 32)
    first = project_low_rank(w0, 31, energy_transfer=False)
    w1 = drifted(first.matrix, 0.01)
    second = project_low_rank(w1, 31, energy_transfer=False, warm_basis=first.basis)
    assert second.method == 'warm-f64'
    assert achieved_error(w1, second.matrix) <= (1 + 1e-4) * optimal_error(w1, 31)


def test_cold_float32_eigendecomposition_is_certified_with_a_gap_and_falls_back_without():
    gapped = spectrum_matrix(120, 300, decay=0.97)
    result = project_low_rank(gapped, 40, energy_transfer=False)
    assert result.method == 'exact-f32'
    assert achieved_error(gapped, result.matrix) <= (1 + 1e-4) * optimal_error(gapped, 40)
    # σ_40 = σ_41 exactly: no gap at the cut, nothing to certify in float32.
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(120, 120, generator=g))
    v, _ = torch.linalg.qr(torch.randn(300, 120, generator=g))
    s = 0.97 ** torch.arange(120, dtype=torch.float32)
    s[40] = s[39]
    flat = (u * s) @ v.t()
    result = project_low_rank(flat, 40, energy_transfer=False)
    assert result.method == 'exact'
    assert achieved_error(flat, result.matrix) <= (1 + 1e-4) * optimal_error(flat, 40)


def test_spread_tail_is_certified_by_the_complement_bound_and_the_bound_is_true():
    """A drift spread over many directions: tr(C) alone gives no gap, ‖C‖_F does."""
    w0 = spectrum_matrix(200, 400, decay=0.99)
    first = project_low_rank(w0, 60, energy_transfer=False)
    w1 = drifted(first.matrix, 0.15)
    gram = gram_matrix(w1, 'left', torch.float32)
    ritz = refine_basis(gram, first.basis, max_iterations=3)
    top = torch.linalg.eigvalsh(gram.double()).flip(-1)
    tail = float(top[60:].sum())
    assert ritz.outcome == 'certified'
    assert tail > float(ritz.values[-1])  # so τ² could not bound λ_max(C)
    assert ritz.complement_max < float(ritz.values[-1])  # the tightened bound did
    achieved = float(torch.trace(gram.double())) - float(
        (ritz.basis.double().t() @ gram.double() @ ritz.basis.double()).trace())
    assert achieved - tail <= ENERGY_RTOL * tail


def test_in_place_projection_with_output_row_factor_matches_the_reference():
    w = spectrum_matrix(40, 90)
    a = torch.linspace(0.5, 2.0, 40)
    u = 1.0 / a
    reference = project_low_rank(w, 12, True, row_scale=a)
    expected = reference.matrix * u[:, None]
    target = w.clone()
    result = project_low_rank(target, 12, True, row_scale=a, output_row_factor=u, out=target)
    assert result.matrix.data_ptr() == target.data_ptr()
    assert torch.allclose(target, expected, atol=1e-5 * float(expected.abs().max()))
    with pytest.raises(ValueError, match='out must have the matrix shape'):
        project_low_rank(w, 12, out=torch.empty(90, 40))


def test_failed_projection_leaves_the_output_untouched():
    w = spectrum_matrix(20, 30)
    w[3, 4] = float('nan')
    target = w.clone()
    with pytest.raises(ProjectionError, match='non-finite'):
        project_low_rank(target, 5, out=target)
    assert torch.equal(target.isnan(), w.isnan()) and torch.equal(target.nan_to_num(),
                                                                  w.nan_to_num())


def test_warm_start_without_energy_at_the_cut_goes_to_float64_directly():
    """Rows behind a zero BN scale: the folded matrix has rank 10 < k = 15."""
    w = spectrum_matrix(30, 80)
    a = torch.ones(30)
    a[10:] = 0.0
    first = project_low_rank(w, 15, False, row_scale=a)
    gram = gram_matrix(w, 'left', torch.float32, a)
    assert refine_basis(gram, first.basis, max_iterations=3).outcome == 'degenerate'
    second = project_low_rank(w, 15, False, warm_basis=first.basis, row_scale=a)
    assert second.method == 'exact'
    folded = w * a[:, None]
    assert achieved_error(folded, second.matrix) <= 1e-5 * float(folded.norm())
    assert numerical_rank(second.matrix, rtol=1e-5) <= 15


def test_ritz_basis_claims_complement_steps_in_order_and_keeps_the_tightest_bound():
    ritz = RitzBasis(torch.eye(4, 2), torch.eye(2), 0.0, 2.0, 1.0)
    steps = []
    while (step := ritz.next_complement_step()) is not None:
        steps.append(step)
    assert steps == list(range(COMPLEMENT_STEPS))
    ritz.bound_complement(0.5)
    ritz.bound_complement(0.75)  # looser: ignored
    assert ritz.complement_max == 0.5
    # An eigendecomposition's bound is final: no norm bound is tried after it.
    gram = gram_matrix(spectrum_matrix(20, 50), 'left', torch.float64)
    certified, _ = certified_top_basis(gram, 5)
    assert certified.complement_max < float('inf')
    assert certified.next_complement_step() is None
