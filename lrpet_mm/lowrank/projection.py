"""Low-rank projection of a weight matrix with optional energy transfer (pure PyTorch).

A conv weight of shape (n_out, n_in, kh, kw) is viewed as the matrix
W ∈ R^{m × n}, m = n_out, n = n_in·kh·kw (see :func:`conv_weight_as_matrix`).
"""
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor


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


@dataclass
class LowRankProjection:
    """Result of :func:`project_low_rank`.

    Attributes:
        matrix: (m, n) projected matrix of rank <= k, same dtype/device as the input.
        energy_kept: ‖P_k(W)‖_F² / ‖W‖_F² before energy transfer, in [0, 1].
        scale: factor α applied to the kept singular values (1.0 without energy transfer).
    """
    matrix: Tensor
    energy_kept: float
    scale: float


def project_low_rank(matrix: Tensor, rank: int, energy_transfer: bool = True) -> LowRankProjection:
    """Project a (m, n) matrix onto the rank-``rank`` matrices (Eckart–Young optimum).

    With ``energy_transfer`` the kept singular values are multiplied by
    α = ‖W‖_F / ‖P_k(W)‖_F, so the result has the same Frobenius norm as ``matrix``.
    """
    u, s, vh = truncated_svd(matrix, rank)
    total_energy = float(matrix.detach().double().pow(2).sum())
    kept_energy = float(s.double().pow(2).sum())
    if total_energy == 0.0 or kept_energy == 0.0:
        # An all-zero matrix is already of rank 0 <= k: keep it (no division by zero).
        return LowRankProjection(torch.zeros_like(matrix), 1.0, 1.0)
    energy_kept = min(kept_energy / total_energy, 1.0)
    scale = (total_energy / kept_energy) ** 0.5 if energy_transfer else 1.0
    projected = (u * (s * scale)) @ vh
    return LowRankProjection(projected.to(matrix.dtype), energy_kept, scale)


def numerical_rank(matrix: Tensor, rtol: float = 1e-5) -> int:
    """Number of singular values above ``rtol`` × the largest one (computed in float64)."""
    s = torch.linalg.svdvals(matrix.detach().double().cpu())
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > rtol * s[0]).sum())
