"""Low-rank projection of a weight matrix with optional energy transfer (pure PyTorch).

A conv weight of shape (n_out, n_in, kh, kw) is viewed as the matrix
W ∈ R^{m × n}, m = n_out, n = n_in·kh·kw (see :func:`conv_weight_as_matrix`).
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .subspace import (
    ENERGY_RTOL,
    RitzBasis,
    allowed_excess,
    basis_coefficients,
    certified_top_basis,
    certify,
    exact_top_basis,
    expand_coefficients,
    gram_matrix,
    refine_basis,
    rounding_margin,
    smaller_side,
    warm_start_usable,
)


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
        matrix: (m, n) result of rank <= k, same dtype/device as the input; ``out`` when
            given: α·P_k(M') of the projected matrix M' (= diag(row_scale)·M, or M), rows
            multiplied by the ``output_row_factor``; with ``in_span`` α·M·V_kV_kᵀ.
        energy_kept: ‖P_k(M')‖_F² / ‖M'‖_F² before energy transfer, in [0, 1] (1.0 for
            M' = 0).
        scale: factor α applied to the kept singular values (1.0 without energy transfer).
        basis: (s, k) orthonormal basis of the kept singular subspace of M' on the smaller
            side (s = min(m, n); left singular vectors if m <= n, else right ones), in the
            working dtype; pass it as ``warm_basis`` to the next projection of the same layer.
            None for M' = 0 (with ``in_span``: M's basis, see :func:`project_low_rank`).
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


def _non_finite(shape: torch.Size) -> ProjectionError:
    return ProjectionError(f'the {tuple(shape)} matrix has non-finite values')


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


@dataclass
class _Found:
    """An accepted subspace of the projected matrix M' (diag(a)·M, or M).

    ``basis`` (s, k) on the smaller side with ``coefficients`` B = Qᵀ M' (k, n) (left side) or
    M' Q (m, k) (right side), ``kept`` = ‖B‖_F², ``total`` = ‖M'‖_F²; ``basis`` and
    ``coefficients`` are None for M' = 0."""
    basis: Optional[Tensor]
    coefficients: Optional[Tensor]
    kept: float
    total: float
    method: str


class _Search:
    """What the attempts of one projection share: the (m, n) working matrix (float32/float64),
    the rank, the side, the row scale, the warm start (s, k) and the outcome of the warm
    attempt; the float64 Gram matrix (s, s) is formed once for the two attempts that use it."""

    def __init__(self, work: Tensor, rank: int, row_scale: Optional[Tensor], rtol: float,
                 warm: Optional[Tensor], float32_exact: bool) -> None:
        self.work, self.rank, self.row_scale, self.rtol = work, rank, row_scale, rtol
        self.side = smaller_side(tuple(work.shape))
        self.warm, self.float32_exact = warm, float32_exact
        self.warm_outcome: Optional[str] = None
        self._gram64: Optional[Tuple[Tensor, float]] = None

    def gram(self, dtype: torch.dtype) -> Tensor:
        """(s, s) Gram matrix of M' in ``dtype`` (a new one each call)."""
        return gram_matrix(self.work, self.side, dtype, self.row_scale)

    def float64_gram(self, take: bool = False) -> Tuple[Tensor, float]:
        """``(G, tr(G))`` in float64, formed on first use (``take``: and no longer kept here).
        Raises :class:`ProjectionError` if M' is not finite."""
        if self._gram64 is None:
            gram = self.gram(torch.float64)
            total = _trace(gram)
            if not math.isfinite(total):
                raise _non_finite(self.work.shape)
            self._gram64 = gram, total
        result = self._gram64
        if take:
            self._gram64 = None
        return result

    def accept(self, ritz: RitzBasis, total_energy: float, method: str) -> Optional[_Found]:
        """The refined basis if its certificate holds with the residual energy of the actual
        projection, else None."""
        basis = ritz.basis.to(self.work.dtype)
        coefficients, kept = basis_coefficients(self.work, basis, self.side, self.row_scale)
        residual = max(total_energy - kept, 0.0)
        margin = rounding_margin(total_energy, self.work.dtype)
        if not certify(ritz, residual + margin,
                       allowed_excess(residual, total_energy, self.work.dtype, self.rtol)):
            return None
        return _Found(basis, coefficients, kept, total_energy, method)


def _warm(search: _Search) -> Optional[_Found]:
    """Subspace iteration from the warm basis on the working-dtype Gram matrix (``'warm'``).
    Records its outcome; a refined basis whose certificate fails counts as ``'stagnated'``."""
    if search.warm is None:
        return None
    gram = search.gram(search.work.dtype)
    ritz, total_energy, search.warm_outcome = _refine(gram, search.warm, search.rtol)
    del gram  # freed before the projection ('non-finite': the float64 Gram decides)
    if ritz is None:
        return None
    found = search.accept(ritz, total_energy, 'warm')
    if found is None:
        search.warm_outcome = 'stagnated'
    return found


def _warm_f64(search: _Search) -> Optional[_Found]:
    """The same iteration on the float64 Gram matrix (``'warm-f64'``), only where the warm
    attempt stagnated: float32 rounding hid the gap at the cut (a basis far from converged goes
    straight to the exact method)."""
    if search.warm_outcome != 'stagnated' or search.work.dtype == torch.float64:
        return None
    gram, total_energy = search.float64_gram()
    if total_energy == 0.0:
        return None
    ritz, _, _ = _refine(gram, search.warm.double(), search.rtol)
    return None if ritz is None else search.accept(ritz, total_energy, 'warm-f64')


def _exact_f32(search: _Search) -> Optional[_Found]:
    """The float32 Gram eigendecomposition, accepted with its certificate (``'exact-f32'``).
    Skipped for float64 weights, with ``float32_exact=False`` and after a warm attempt that
    stagnated or was degenerate (the gap at the cut is below float32's resolution)."""
    if (not search.float32_exact or search.work.dtype != torch.float32
            or search.warm_outcome in ('stagnated', 'degenerate')):
        return None
    gram = search.gram(torch.float32)
    total_energy = _trace(gram)
    eig = (certified_top_basis(gram, search.rank)
           if math.isfinite(total_energy) and total_energy > 0.0 else None)
    del gram
    if eig is None:
        return None
    ritz = eig[0]
    del eig
    return search.accept(ritz, total_energy, 'exact-f32')


def _exact(search: _Search) -> _Found:
    """Eigendecomposition of the float64 Gram matrix (``'exact'``); always answers."""
    gram, total_energy = search.float64_gram(take=True)
    if total_energy == 0.0:  # an all-zero matrix is already of rank 0 <= k
        return _Found(None, None, 0.0, 0.0, 'exact')
    try:
        basis, _ = exact_top_basis(gram, search.rank)
    except RuntimeError as e:
        raise ProjectionError(f'eigendecomposition of the Gram matrix of a '
                              f'{tuple(search.work.shape)} matrix failed: {e}') from e
    del gram
    basis = basis.to(search.work.dtype)
    coefficients, kept = basis_coefficients(search.work, basis, search.side, search.row_scale)
    return _Found(basis, coefficients, kept, total_energy, 'exact')


def _svd(search: _Search) -> _Found:
    """The top triplets of M' from its full SVD (``'svd'``, the reference): basis U_k with
    coefficients S_k·Vh_k (left side), or V_k with U_k·S_k (right side)."""
    work, a = search.work, search.row_scale
    folded = work if a is None else work * a.to(work.dtype)[:, None]
    total_energy = float(folded.double().pow(2).sum())
    if not math.isfinite(total_energy):
        raise _non_finite(work.shape)
    if total_energy == 0.0:
        return _Found(None, None, 0.0, 0.0, 'svd')
    u, s, vh = truncated_svd(folded, search.rank)
    del folded
    kept = float(s.double().pow(2).sum())
    if search.side == 'left':
        return _Found(u, s[:, None] * vh, kept, total_energy, 'svd')
    return _Found(vh.t(), u * s, kept, total_energy, 'svd')


#: The attempts of each method, in order; the first that answers is used.
_ATTEMPTS = {'auto': (_warm, _warm_f64, _exact_f32, _exact), 'exact': (_exact,),
             'svd': (_svd,)}


def _find_subspace(search: _Search, method: str) -> _Found:
    """The first answer of ``method``'s attempts (the last one always answers)."""
    for attempt in _ATTEMPTS[method]:
        found = attempt(search)
        if found is not None:
            return found
    raise AssertionError(f'no attempt of method {method!r} answered')  # unreachable


def _expand_in_span(work: Tensor, found: _Found, side: str, row_scale: Tensor,
                    energy_transfer: bool, out: Optional[Tensor]) -> Tuple[Tensor, float]:
    """In-span recovery: ``(α·M·V Vᵀ (m, n), α)`` with V (n, k) an orthonormal basis of the
    kept right singular subspace of M' = diag(a)·M — the basis itself on the right side, the
    Q factor of Bᵀ on the left — and α = ‖M'‖_F / ‖M'·V‖_F (1 without energy transfer).
    Written into ``out`` if given; takes ``found.coefficients`` (set to None)."""
    if side == 'left':
        right, _ = torch.linalg.qr(found.coefficients.t())  # (n, k), spans B's rows
    else:
        right = found.basis
    found.coefficients = None
    inner = work @ right  # (m, k) M·V
    kept = float(torch.linalg.matrix_norm(inner * row_scale.to(work.dtype)[:, None])) ** 2
    scale = (found.total / kept) ** 0.5 if energy_transfer and kept > 0.0 else 1.0
    if scale != 1.0:
        inner.mul_(scale)
    return torch.matmul(inner, right.t(), out=out), scale


def _finish(found: _Found, matrix: Tensor, work: Tensor, energy_transfer: bool,
            row_scale: Optional[Tensor], output_row_factor: Optional[Tensor], in_span: bool,
            out: Optional[Tensor]) -> LowRankProjection:
    """Energy transfer, recovery (row factor or in-span) and the write into ``out`` (or a new
    (m, n) tensor of ``matrix``'s dtype)."""
    if found.basis is None:
        return _zero_result(matrix, out, 1.0, None, found.method)
    kept = min(found.kept, found.total)
    if kept == 0.0:  # no energy on the basis
        return _zero_result(matrix, out, 0.0, found.basis, found.method)
    energy_kept = min(kept / found.total, 1.0)
    side = smaller_side(tuple(work.shape))
    direct = out is not None and out.dtype == work.dtype
    if in_span:
        projected, scale = _expand_in_span(work, found, side, row_scale, energy_transfer,
                                           out if direct else None)
    else:
        scale = (found.total / kept) ** 0.5 if energy_transfer else 1.0
        coefficients, found.coefficients = found.coefficients, None
        projected = expand_coefficients(found.basis, coefficients, side, scale,
                                        output_row_factor, out=out if direct else None)
        del coefficients
    if out is not None and not direct:
        projected = out.copy_(projected)
    elif projected.dtype != matrix.dtype:
        projected = projected.to(matrix.dtype)
    return LowRankProjection(projected, energy_kept, scale, found.basis, found.method)


def _check_arguments(matrix: Tensor, rank: int, method: str, output_row_factor: Optional[Tensor],
                     in_span: bool, out: Optional[Tensor]) -> None:
    if matrix.dim() != 2:
        raise ValueError(f'expected a 2-D matrix, got shape {tuple(matrix.shape)}')
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f'rank must be in [1, {min(matrix.shape)}] for a matrix of shape '
                         f'{tuple(matrix.shape)}, got {rank}')
    if method not in PROJECTION_METHODS:
        raise ValueError(f'method must be one of {PROJECTION_METHODS}, got {method!r}')
    if in_span and output_row_factor is not None:
        raise ValueError('in_span and output_row_factor exclude each other')
    if out is not None and tuple(out.shape) != tuple(matrix.shape):
        raise ValueError(f'out must have the matrix shape {tuple(matrix.shape)}, '
                         f'got {tuple(out.shape)}')


def project_low_rank(matrix: Tensor, rank: int, energy_transfer: bool = True,
                     warm_basis: Optional[Tensor] = None, method: str = 'auto',
                     rtol: float = ENERGY_RTOL, row_scale: Optional[Tensor] = None,
                     output_row_factor: Optional[Tensor] = None,
                     out: Optional[Tensor] = None, float32_exact: bool = True,
                     in_span: bool = False) -> LowRankProjection:
    """Project a (m, n) matrix onto the rank-``rank`` matrices (Eckart–Young optimum).

    With ``row_scale`` a (shape (m,)) the matrix projected is M' = diag(a)·M (the BN-folded
    weight of BN rectification), without forming it; else M' = M. The result is
    α·P_k(M'), with rows multiplied by ``output_row_factor`` u (shape (m,)) if given (paper
    eq. 16's unfolding, at no extra pass). With ``in_span`` (BN rectification's in-span
    recovery; excludes ``output_row_factor``) it is instead α·M·V_kV_kᵀ, V_k the top-k right
    singular vectors of M': diag(a)·result = α·P_k(M') exactly, rank <= k, and a row with
    a_i = 0 keeps its part in span(V_k). If M' = 0 while M ≠ 0 (every a_i = 0), nothing ranks
    M's directions: M itself is projected (in-span recovery with a = c·1 for any c ≠ 0), the
    result's ``basis`` is M's and ``energy_kept`` is 1.0 (nothing of M' is lost). Without
    ``row_scale``, ``in_span`` changes nothing.

    With ``energy_transfer`` the kept singular values are multiplied by
    α = ‖M'‖_F / ‖P_k(M')‖_F (in-span: ‖M'‖_F / ‖M'·V_k‖_F), so the result (or its fold) has
    the same Frobenius norm as M'.

    Only the top-k singular subspace on the smaller side is computed (see
    :mod:`~lrpet_mm.lowrank.subspace`). ``method``:

    * ``'auto'`` (default): the first of these attempts that answers —
      ``'warm'``: with a ``warm_basis`` of shape (min(m, n), k) (the ``basis`` of the previous
      projection of this layer), subspace iteration on the Gram matrix in the working dtype,
      accepted if its residual certificate shows ‖M' − P̂‖_F² <= (1 + ``rtol``)·Σ_{i>k} σ_i²;
      ``'warm-f64'``: where float32 rounding is what stopped it, the same on the float64 Gram
      matrix; ``'exact-f32'``: for float32 weights without a usable warm basis, or one far
      from converged, the float32 Gram eigendecomposition accepted with its certificate (see
      :func:`~lrpet_mm.lowrank.subspace.certified_top_basis`); ``'exact'`` otherwise;
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
    _check_arguments(matrix, rank, method, output_row_factor, in_span, out)
    work = matrix.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    warm = (warm_basis.to(device=work.device, dtype=work.dtype)
            if method == 'auto' and warm_start_usable(warm_basis, min(work.shape), rank)
            else None)
    found = _find_subspace(_Search(work, rank, row_scale, rtol, warm, float32_exact), method)
    in_span = in_span and row_scale is not None
    if in_span and found.basis is None:
        # M' = 0: project M itself (a zero M stays zero).
        result = project_low_rank(matrix, rank, energy_transfer, warm_basis, method, rtol,
                                  out=out, float32_exact=float32_exact)
        result.energy_kept = 1.0
        return result
    return _finish(found, matrix, work, energy_transfer, row_scale, output_row_factor, in_span,
                   out)


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
