"""Low-rank projection of a weight matrix with optional energy transfer (pure PyTorch).

A conv weight of shape (n_out, n_in, kh, kw) is viewed as the matrix
W ∈ R^{m × n}, m = n_out, n = n_in·kh·kw (see :func:`conv_weight_as_matrix`).
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .subspace import (ENERGY_RTOL, RitzBasis, allowed_excess, basis_coefficients, certify,
                       certified_top_basis, exact_top_basis, expand_coefficients, gram_matrix, refine_basis,
                       rounding_margin, smaller_side, warm_start_usable)


class ProjectionError(RuntimeError):
    """A projection could not be computed (non-finite weight, SVD failure)."""


def conv_weight_as_matrix(weight: Tensor) -> Tensor:
    """View a conv weight (n_out, n_in, *kernel) as a (n_out, n_in·prod(kernel)) matrix."""
    if weight.dim() < 2:
        raise ValueError(f'expected a weight with >= 2 dims, got shape {tuple(weight.shape)}')
    return weight.reshape(weight.shape[0], -1)


def truncated_svd(matrix: Tensor, rank: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets of a (m, n) matrix.

    Returns ``(U_k (m, k), S_k (k,), Vh_k (k, n))`` in the matrix's dtype and device.
    Half-precision input is computed in float32. If the SVD fails to converge it is
    retried once in float64 on the CPU; a second failure raises :class:`ProjectionError`.
    """
    if matrix.dim() != 2:
        raise ValueError(f'expected a 2-D matrix, got shape {tuple(matrix.shape)}')
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f'rank must be in [1, {min(matrix.shape)}] for a matrix of shape '
                         f'{tuple(matrix.shape)}, got {rank}')
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    try:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
    except RuntimeError as first_error:  # torch.linalg.LinAlgError subclasses RuntimeError
        try:
            u, s, vh = torch.linalg.svd(work.detach().to('cpu', torch.float64),
                                        full_matrices=False)
        except RuntimeError as second_error:
            raise ProjectionError(
                f'SVD of a {tuple(matrix.shape)} matrix failed to converge '
                f'({first_error}); the float64 CPU retry failed too ({second_error})'
            ) from second_error
        u, s, vh = (t.to(device=matrix.device, dtype=work.dtype) for t in (u, s, vh))
    return u[:, :rank], s[:rank], vh[:rank]


#: Most subspace iterations of one warm-started projection (each: one (s, s)×(s, k) product).
WARM_ITERATIONS = 3
#: Projection methods of :func:`project_low_rank`.
PROJECTION_METHODS = ('auto', 'exact', 'svd')


@dataclass
class LowRankProjection:
    """Result of :func:`project_low_rank`.

    Attributes:
        matrix: (m, n) projected matrix of rank <= k (rows multiplied by the
            ``output_row_factor``), same dtype/device as the input; ``out`` when given.
        energy_kept: ‖P_k(W)‖_F² / ‖W‖_F² before energy transfer, in [0, 1].
        scale: factor α applied to the kept singular values (1.0 without energy transfer).
        basis: (s, k) orthonormal basis of the kept singular subspace on the smaller side
            (s = min(m, n); left singular vectors if m <= n, else right ones), in the working
            dtype; pass it as ``warm_basis`` to the next projection of the same layer.
        method: how the subspace was obtained: ``'warm'`` / ``'warm-f64'`` (certified
            subspace iteration on the working-dtype / float64 Gram matrix), ``'exact-f32'``
            (certified float32 Gram eigendecomposition), ``'exact'`` (float64 Gram
            eigendecomposition) or ``'svd'`` (full SVD).
    """
    matrix: Tensor
    energy_kept: float
    scale: float
    basis: Optional[Tensor] = None
    method: str = 'exact'


def _trace(gram: Tensor) -> float:
    """tr(G) = ‖M‖_F², summed in float64."""
    return float(torch.diagonal(gram).double().sum())


def _refine(gram: Tensor, start: Tensor, rtol: float
            ) -> Tuple[Optional[RitzBasis], float, str]:
    """Certified subspace iteration on ``gram`` from ``start``: ``(ritz, tr(G), outcome)``,
    ``ritz`` None unless its outcome allows projecting (see
    :class:`~lrpet_mm.lowrank.subspace.RitzBasis`)."""
    total_energy = _trace(gram)
    if not math.isfinite(total_energy):
        return None, total_energy, 'non-finite'
    if total_energy == 0.0:
        return None, 0.0, 'zero'
    try:
        ritz = refine_basis(gram, start.to(gram.dtype), WARM_ITERATIONS, rtol)
    except RuntimeError:  # solver failure: the caller falls back to the exact method
        return None, total_energy, 'solver-failure'
    if ritz.outcome in ('no-gap', 'degenerate', 'max-iterations'):
        return None, total_energy, ritz.outcome
    return ritz, total_energy, ritz.outcome


def _accept(work: Tensor, ritz: RitzBasis, total_energy: float, side: str,
            row_scale: Optional[Tensor], rtol: float) -> Optional[Tuple[Tensor, Tensor, float]]:
    """``(basis, coefficients, kept energy)`` of the refined basis if its certificate holds
    with the residual energy of the actual projection, else None."""
    basis = ritz.basis.to(work.dtype)
    coefficients, kept_energy = basis_coefficients(work, basis, side, row_scale)
    residual = max(total_energy - kept_energy, 0.0)
    margin = rounding_margin(total_energy, work.dtype)
    if not certify(ritz, residual + margin,
                   allowed_excess(residual, total_energy, work.dtype, rtol)):
        return None
    return basis, coefficients, kept_energy


def _top_triplets_by_svd(folded: Tensor, rank: int, side: str) -> Tuple[Tensor, Tensor, float]:
    """``(basis, coefficients, kept energy)`` of the folded matrix straight from its full SVD
    (the reference method): basis U_k with coefficients S_k·Vh_k (left side), or V_k with
    U_k·S_k (right side); no further product with the matrix."""
    u, s, vh = truncated_svd(folded, rank)
    kept_energy = float(s.double().pow(2).sum())
    if side == 'left':
        return u, s[:, None] * vh, kept_energy
    return vh.t(), u * s, kept_energy


def _check_out(out: Tensor, shape: Tuple[int, int]) -> None:
    if tuple(out.shape) != shape:
        raise ValueError(f'out must have the matrix shape {shape}, got {tuple(out.shape)}')


def project_low_rank(matrix: Tensor, rank: int, energy_transfer: bool = True,
                     warm_basis: Optional[Tensor] = None, method: str = 'auto',
                     rtol: float = ENERGY_RTOL, row_scale: Optional[Tensor] = None,
                     output_row_factor: Optional[Tensor] = None,
                     out: Optional[Tensor] = None, float32_exact: bool = True
                     ) -> LowRankProjection:
    """Project a (m, n) matrix onto the rank-``rank`` matrices (Eckart–Young optimum).

    With ``row_scale`` a (shape (m,)) the matrix projected is diag(a)·M (the BN-folded weight
    of BN rectification), without forming it. With ``output_row_factor`` u (shape (m,)) the
    result's rows are multiplied by u (BN rectification's unfolding), at no extra pass.

    With ``energy_transfer`` the kept singular values are multiplied by
    α = ‖W‖_F / ‖P_k(W)‖_F, so the result has the same Frobenius norm as ``matrix``.

    Only the top-k singular subspace on the smaller side is computed (see
    :mod:`~lrpet_mm.lowrank.subspace`). ``method``:

    * ``'auto'`` (default): with a ``warm_basis`` of shape (min(m, n), k) — the ``basis`` of
      the previous projection of this layer — subspace iteration on the Gram matrix in the
      working dtype (``method='warm'``), accepted if its residual certificate shows
      ‖W − P̂‖_F² <= (1 + ``rtol``)·Σ_{i>k} σ_i²; failing that, where float32 rounding is
      what stopped it, the same on the float64 Gram matrix (``'warm-f64'``). Without a warm
      basis, or when it is far from converged: for float32 weights the float32 Gram
      eigendecomposition, accepted with its certificate (``'exact-f32'``, see
      :func:`~lrpet_mm.lowrank.subspace.certified_top_basis`); failing that, as ``'exact'``;
    * ``'exact'``: eigendecomposition of the float64 Gram matrix of the smaller side;
    * ``'svd'``: full thin SVD (the reference; slow).

    ``float32_exact=False`` skips the ``'exact-f32'`` attempt (for a layer whose previous
    projection needed the float64 one: its cut has no float32-resolvable gap).

    ``out`` (shape (m, n), the working dtype) receives the result; it may be ``matrix``
    itself (in-place projection: the matrix is only overwritten once everything else is
    computed, so an error leaves it untouched). Half-precision input is computed in float32.
    Raises :class:`ProjectionError` if the matrix is not finite or the eigen/singular value
    solver fails (after a float64 CPU retry).
    """
    if matrix.dim() != 2:
        raise ValueError(f'expected a 2-D matrix, got shape {tuple(matrix.shape)}')
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f'rank must be in [1, {min(matrix.shape)}] for a matrix of shape '
                         f'{tuple(matrix.shape)}, got {rank}')
    if method not in PROJECTION_METHODS:
        raise ValueError(f'method must be one of {PROJECTION_METHODS}, got {method!r}')
    if out is not None:
        _check_out(out, tuple(matrix.shape))
    work = matrix.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    side = smaller_side(tuple(work.shape))
    warm = (warm_basis.to(device=work.device, dtype=work.dtype)
            if method == 'auto' and warm_start_usable(warm_basis, min(work.shape), rank)
            else None)
    accepted, outcome, used = None, None, None
    if warm is not None:
        # Tier 1: subspace iteration in the working dtype (float32 for float32 weights).
        # The Gram matrix is freed before the projection (memory).
        gram = gram_matrix(work, side, work.dtype, row_scale)
        ritz, total_energy, outcome = _refine(gram, warm, rtol)
        del gram  # ('non-finite' falls through to the float64 Gram, which decides)
        if ritz is not None:
            accepted = _accept(work, ritz, total_energy, side, row_scale, rtol)
            used = 'warm'
            if accepted is None:
                outcome = 'stagnated'
    if method == 'svd':
        folded = work if row_scale is None else work * row_scale.to(work.dtype)[:, None]
        total_energy = float(folded.double().pow(2).sum())
        if not math.isfinite(total_energy):
            raise ProjectionError(f'the {tuple(matrix.shape)} matrix has non-finite values')
        if total_energy == 0.0:
            return _zero_result(matrix, out, 1.0, None, method)
        basis, coefficients, kept_energy = _top_triplets_by_svd(folded, rank, side)
        del folded
        used = 'svd'
    elif accepted is not None:
        basis, coefficients, kept_energy = accepted
    if (method == 'auto' and float32_exact and accepted is None
            and outcome not in ('stagnated', 'degenerate') and work.dtype == torch.float32):
        # Cold (or far from converged): the float32 eigendecomposition, accepted with its
        # certificate; float64 where the gap at the cut is below float32's resolution
        # (known beforehand when the warm attempt found θ_k at float32's rounding level).
        gram = gram_matrix(work, side, work.dtype, row_scale)
        total_energy = _trace(gram)
        eig = (certified_top_basis(gram, rank)
               if math.isfinite(total_energy) and total_energy > 0.0 else None)
        del gram
        if eig is not None:
            accepted = _accept(work, eig[0], total_energy, side, row_scale, rtol)
            del eig
            if accepted is not None:
                basis, coefficients, kept_energy = accepted
                used = 'exact-f32'
    if method != 'svd' and accepted is None:
        gram = gram_matrix(work, side, torch.float64, row_scale)
        total_energy = _trace(gram)
        if not math.isfinite(total_energy):
            raise ProjectionError(f'the {tuple(matrix.shape)} matrix has non-finite values')
        if total_energy == 0.0:
            # An all-zero matrix is already of rank 0 <= k: keep it.
            return _zero_result(matrix, out, 1.0, None, 'exact')
        accepted = None
        if outcome == 'stagnated' and work.dtype != torch.float64:
            # Tier 2: the same iteration on the float64 Gram, where float32 rounding hid the
            # gap at the cut (tier 1 stagnated with a gap; a basis far from converged goes
            # straight to the exact method).
            ritz, _, _ = _refine(gram, warm.double(), rtol)
            if ritz is not None:
                accepted = _accept(work, ritz, total_energy, side, row_scale, rtol)
        if accepted is not None:
            basis, coefficients, kept_energy = accepted
            used = 'warm-f64'
        else:
            used = 'exact'
            try:
                basis, _ = exact_top_basis(gram, rank)
            except RuntimeError as e:
                raise ProjectionError(f'eigendecomposition of the Gram matrix of a '
                                      f'{tuple(matrix.shape)} matrix failed: {e}') from e
            del gram
            basis = basis.to(work.dtype)
            coefficients, kept_energy = basis_coefficients(work, basis, side, row_scale)
    kept_energy = min(kept_energy, total_energy)
    if kept_energy == 0.0:
        return _zero_result(matrix, out, 0.0, basis, used)
    energy_kept = min(kept_energy / total_energy, 1.0)
    scale = (total_energy / kept_energy) ** 0.5 if energy_transfer else 1.0
    direct = out is not None and out.dtype == work.dtype
    projected = expand_coefficients(basis, coefficients, side, scale, output_row_factor,
                                    out=out if direct else None)
    del coefficients
    if out is not None and not direct:
        projected = out.copy_(projected)
    elif projected.dtype != matrix.dtype:
        projected = projected.to(matrix.dtype)
    return LowRankProjection(projected, energy_kept, scale, basis, used)


def _zero_result(matrix: Tensor, out: Optional[Tensor], energy_kept: float,
                 basis: Optional[Tensor], method: str) -> LowRankProjection:
    """The all-zero projection (of a zero matrix, or of one with no energy on the basis)."""
    result = torch.zeros_like(matrix) if out is None else out.zero_()
    return LowRankProjection(result, energy_kept, 1.0, basis, method)


def numerical_rank(matrix: Tensor, rtol: float = 1e-5) -> int:
    """Number of singular values above ``rtol`` × the largest one (computed in float64)."""
    s = torch.linalg.svdvals(matrix.detach().double().cpu())
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > rtol * s[0]).sum())
