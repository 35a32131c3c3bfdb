"""Low-rank projection of a weight matrix with optional energy transfer (pure PyTorch).

A conv weight of shape (n_out, n_in, kh, kw) is viewed as the matrix
W ∈ R^{m × n}, m = n_out, n = n_in·kh·kw (see :func:`conv_weight_as_matrix`).

Every projection is one exact thin SVD (``torch.linalg.svd``), with no state carried from one
projection to the next. Precision: float32 weights (and half-precision ones, upcast) are
decomposed in float32 — the SVD is backward stable, so the result is the exact projection of
a matrix within ~1e-7·‖W‖ of W, far below what one SGD step moves a weight — and float64
weights in float64. A layer needs float64 only when the float32 solver fails (it does not
converge, or returns non-finite values, which happens for badly scaled matrices with
clustered singular values): that layer is then decomposed again in float64 on the CPU.
Energies (‖W‖_F², the kept part) are summed in float64.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .batchnorm import fold_rows


class ProjectionError(RuntimeError):
    """A projection could not be computed (non-finite weight, SVD failure)."""


def conv_weight_as_matrix(weight: Tensor) -> Tensor:
    """View a conv weight (n_out, n_in, *kernel) as a (n_out, n_in·prod(kernel)) matrix."""
    if weight.dim() < 2:
        raise ValueError(f'expected a weight with >= 2 dims, got shape {tuple(weight.shape)}')
    return weight.reshape(weight.shape[0], -1)


def _check_rank(matrix: Tensor, rank: int) -> None:
    if matrix.dim() != 2:
        raise ValueError(f'expected a 2-D matrix, got shape {tuple(matrix.shape)}')
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f'rank must be in [1, {min(matrix.shape)}] for a matrix of shape '
                         f'{tuple(matrix.shape)}, got {rank}')


def truncated_svd(matrix: Tensor, rank: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets of a (m, n) matrix: ``(U_k (m, k), S_k (k,), Vh_k (k, n))``.

    Computed in float32 (half precision upcast) or float64 for a float64 matrix, on the
    matrix's device. If the solver fails or returns non-finite values, it is retried once in
    float64 on the CPU (results cast back); a second failure raises :class:`ProjectionError`.
    """
    _check_rank(matrix, rank)
    work = matrix.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    try:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        if not bool(torch.isfinite(s).all()):
            raise RuntimeError('non-finite singular values')
    except RuntimeError as first_error:  # torch.linalg.LinAlgError subclasses RuntimeError
        try:
            u, s, vh = torch.linalg.svd(work.to('cpu', torch.float64), full_matrices=False)
        except RuntimeError as second_error:
            raise ProjectionError(
                f'SVD of a {tuple(matrix.shape)} matrix failed ({first_error}); the float64 '
                f'CPU retry failed too ({second_error})') from second_error
        u, s, vh = (t.to(device=work.device, dtype=work.dtype) for t in (u, s, vh))
    return u[:, :rank], s[:rank], vh[:rank]


@dataclass
class LowRankProjection:
    """Result of :func:`project_low_rank`.

    Attributes:
        matrix: (m, n) result of rank <= k, in the input's dtype and device.
        energy_kept: ‖P_k(M')‖_F² / ‖M'‖_F² before energy transfer, in [0, 1] (1.0 for M' = 0).
        scale: factor α applied to the kept singular values (1.0 without energy transfer).
    """
    matrix: Tensor
    energy_kept: float
    scale: float


def _energy(values: Tensor) -> float:
    """Σ values², summed in float64."""
    return float(values.detach().double().pow(2).sum())


def project_low_rank(matrix: Tensor, rank: int, energy_transfer: bool = True,
                     row_scale: Optional[Tensor] = None,
                     output_row_factor: Optional[Tensor] = None,
                     in_span: bool = False) -> LowRankProjection:
    """Project a (m, n) matrix onto the rank-``rank`` matrices (Eckart–Young optimum).

    The matrix projected is M' = diag(a)·M with ``row_scale`` a (shape (m,): BN
    rectification's BN-folded weight), else M' = M. With P_k(M') = U_k S_k V_kᵀ from
    :func:`truncated_svd`, the result is

    * α·P_k(M'), rows multiplied by ``output_row_factor`` u (shape (m,), paper eq. 16's
      unfolding) if given;
    * with ``in_span`` (BN rectification's in-span recovery; excludes ``output_row_factor``):
      α·M·V_kV_kᵀ, so diag(a)·result = α·P_k(M') exactly, rank <= k, and a row with a_i = 0
      keeps its part in span(V_k). If M' = 0 while M ≠ 0 (every a_i = 0) nothing ranks M's
      directions: M itself is projected and ``energy_kept`` is 1.0 (nothing of M' is lost).

    With ``energy_transfer``, α = ‖M'‖_F / ‖P_k(M')‖_F (the result, or its fold, keeps the
    Frobenius norm of M'); else α = 1.

    Raises:
        ProjectionError: the matrix (or row scale) is not finite, or the SVD failed twice.
    """
    _check_rank(matrix, rank)
    if in_span and output_row_factor is not None:
        raise ValueError('in_span and output_row_factor exclude each other')
    work = matrix.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    folded = work if row_scale is None else fold_rows(work, row_scale)
    total = _energy(folded)
    if not math.isfinite(total):
        raise ProjectionError(f'the {tuple(matrix.shape)} matrix has non-finite values')
    if total == 0.0:
        if in_span and row_scale is not None and _energy(work) > 0.0:
            result = project_low_rank(matrix, rank, energy_transfer)
            return LowRankProjection(result.matrix, 1.0, result.scale)
        return LowRankProjection(torch.zeros_like(matrix), 1.0, 1.0)
    u, s, vh = truncated_svd(folded, rank)
    kept = _energy(s)
    if kept == 0.0:
        return LowRankProjection(torch.zeros_like(matrix), 0.0, 1.0)
    scale = (total / kept) ** 0.5 if energy_transfer else 1.0
    if in_span and row_scale is not None:
        projected = (work @ vh.t()).mul_(scale) @ vh
    else:
        left = u * (s * scale)
        if output_row_factor is not None:
            left = left * output_row_factor.to(left)[:, None]
        projected = left @ vh
    return LowRankProjection(projected.to(matrix.dtype), min(kept / total, 1.0), scale)


def numerical_rank(matrix: Tensor, rtol: float = 1e-5) -> int:
    """Number of singular values above ``rtol`` × the largest one (computed in float64)."""
    s = torch.linalg.svdvals(matrix.detach().double().cpu())
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > rtol * s[0]).sum())
