"""The projection: one exact truncated SVD per layer, no state between projections."""
import pytest
import torch
from torch import nn

from lrpet_mm.lowrank import (
    LowRankProjector,
    ProjectionError,
    bn_folded_matrix,
    numerical_rank,
    plan_ranks,
    project_low_rank,
    select_targets,
)

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
SHAPES = [(24, 60, 10), (60, 24, 10), (32, 32, 20), (16, 144, 15)]  # (m, n, k)


def spectrum_matrix(m: int, n: int, decay: float = 0.9, seed: int = 0) -> torch.Tensor:
    """Random (m, n) matrix with geometrically decaying singular values."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    s = decay ** torch.arange(min(m, n), dtype=torch.float32)
    return (u * s) @ v.t()


def float64_reference(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """α·P_k(M) from a float64 SVD on the CPU."""
    work = matrix.detach().double().cpu()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    alpha = float(work.norm() / s[:rank].norm())
    return (u[:, :rank] * (alpha * s[:rank])) @ vh[:rank]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('m,n,k', SHAPES)
def test_float32_projection_equals_the_float64_reference(device, m, n, k):
    w = spectrum_matrix(m, n).to(device)
    result = project_low_rank(w, k, energy_transfer=True)
    expected = float64_reference(w, k)
    assert result.matrix.dtype == torch.float32 and result.matrix.device == w.device
    assert torch.allclose(result.matrix.double().cpu(), expected, atol=1e-5)
    assert float(result.matrix.norm()) == pytest.approx(float(w.norm()), rel=1e-5)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('m,n,k', SHAPES)
def test_row_scale_projects_the_folded_matrix(device, m, n, k):
    w = spectrum_matrix(m, n).to(device)
    a = torch.linspace(0.2, 3.0, m, device=device)
    folded = project_low_rank(w * a[:, None], k, energy_transfer=True)
    implicit = project_low_rank(w, k, energy_transfer=True, row_scale=a)
    assert torch.allclose(implicit.matrix, folded.matrix,
                          atol=1e-5 * float(folded.matrix.abs().max()))
    assert implicit.scale == pytest.approx(folded.scale, rel=1e-5)


def test_projection_is_a_pure_function_of_the_matrix():
    w = spectrum_matrix(48, 100, decay=0.95)
    first = project_low_rank(w, 20)
    project_low_rank(spectrum_matrix(48, 100, seed=3), 20)  # another layer in between
    assert torch.equal(project_low_rank(w, 20).matrix, first.matrix)


def test_zero_matrix_and_bad_arguments():
    zero = project_low_rank(torch.zeros(6, 9), 2)
    assert torch.equal(zero.matrix, torch.zeros(6, 9)) and zero.energy_kept == 1.0
    with pytest.raises(ValueError, match=r'rank must be in \[1, 6\]'):
        project_low_rank(torch.randn(6, 9), 7)
    with pytest.raises(ValueError, match='exclude each other'):
        project_low_rank(torch.randn(6, 9), 2, row_scale=torch.ones(6),
                         output_row_factor=torch.ones(6), in_span=True)
    with pytest.raises(ProjectionError, match='non-finite'):
        project_low_rank(torch.full((6, 9), float('inf')), 2)


def test_half_precision_weights_are_projected_in_float32():
    w = spectrum_matrix(16, 40).half()
    result = project_low_rank(w, 5, energy_transfer=False)
    assert result.matrix.dtype == torch.float16
    expected = project_low_rank(w.float(), 5, energy_transfer=False).matrix
    assert torch.equal(result.matrix, expected.half())
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


def test_projector_makes_every_folded_weight_rank_k():
    torch.manual_seed(0)
    model = TwoConvs()
    projector, plan = make_projector(model)
    stats = projector.project()
    assert stats.num_layers == len(plan) == 2
    for target in projector.targets:
        folded = bn_folded_matrix(target.layer.weight, target.norm)
        assert numerical_rank(folded, rtol=1e-5) == plan.rank_of(target.name)
        assert 0.0 < stats.energy_kept[target.name] < 1.0


def test_channels_last_weights_are_projected_in_their_own_memory_format():
    # A 3x3 conv in channels_last has no (m, n) view: the result must be written back into
    # the parameter, keeping the parameter object and its layout.
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


def test_non_finite_weight_is_refused_and_left_untouched():
    torch.manual_seed(0)
    model = TwoConvs()
    projector, _ = make_projector(model)
    with torch.no_grad():
        model.body[3].weight[0, 0, 0, 0] = float('nan')
    before = model.body[0].weight.detach().clone()
    bad_before = model.body[3].weight.detach().clone()
    with pytest.raises(ProjectionError, match=r"body\.3.*1 non-finite.*iteration 3"):
        projector.project(where='iteration 3')
    # The layer before the bad one was projected; the bad one is untouched.
    assert torch.equal(model.body[3].weight.nan_to_num(), bad_before.nan_to_num())
    assert not torch.equal(model.body[0].weight, before)
