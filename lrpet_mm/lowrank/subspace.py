"""Top-k singular subspace of a weight matrix without a full SVD (pure PyTorch).

Only the rank-k projection P_k(M) = U_k U_kᵀ M = M V_k V_kᵀ is needed, i.e. an orthonormal
basis of the top-k singular subspace on the *smaller* side of the (m, n) matrix M:
the left side (basis (m, k), Gram G = M Mᵀ) when m <= n, else the right side
(basis (n, k), G = Mᵀ M). Two ways to get it:

* exact: eigendecomposition of G in float64 (:func:`exact_top_basis`);
* warm: subspace iteration on G started from the basis of the previous projection, with
  Rayleigh–Ritz, in the matrix's dtype (:func:`refine_basis`). Weights move little between
  two LRPET projections, so one iteration usually suffices.

The warm result is accepted only with a residual certificate (:func:`excess_energy_bound`):
for Ritz pairs (θ, Q) of G with residual R = G Q − Q diag(θ) and δ = θ_k − λ_max(C) > 0
(C = G restricted to the complement of Q, λ_max(C) <= min(tr(C), ‖C‖_F, ‖C‖_{S8}),
tr(C) = τ²),

    Σ_{i<=k} λ_i(G) − Σ θ_i  <=  ‖R‖_F² / δ,

so the achieved residual energy τ² = ‖M − Q Qᵀ M‖_F² exceeds the optimum
Σ_{i>k} σ_i² by at most ‖R‖_F² / δ. (Proof: for any orthonormal X = [X1; X2] in the basis
[Q, Q⊥], tr(Xᵀ G X) <= Σθ − δ t² + 2‖R‖_F t with t = ‖X2‖_F; maximize over t.)
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

#: Relative tolerance on the residual energy: the accepted projection has
#: ‖M − P̂‖_F² <= (1 + ENERGY_RTOL) · Σ_{i>k} σ_i², i.e. the norm is within ≈ 1 + 5e-5.
ENERGY_RTOL = 1e-4
#: Largest chunk (elements) converted to float64 at once when forming an exact Gram matrix.
GRAM_CHUNK_ELEMENTS = 1 << 18


def smaller_side(shape: Tuple[int, int]) -> str:
    """``'left'`` if m <= n (basis of the column space, (m, k)), else ``'right'`` ((n, k))."""
    return 'left' if shape[0] <= shape[1] else 'right'


def _symmetric_product(a: Tensor, blocks: int) -> Tensor:
    """a aᵀ computing only the diagonal and upper blocks of a ``blocks``×``blocks`` tiling
    (about (blocks + 1) / (2·blocks) of the full product's flops)."""
    s = a.shape[0]
    edges = [round(i * s / blocks) for i in range(blocks + 1)]
    gram = torch.empty(s, s, dtype=a.dtype, device=a.device)
    for i in range(blocks):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i, blocks):
            cols = slice(edges[j], edges[j + 1])
            block = a[rows] @ a[cols].t()
            gram[rows, cols] = block
            if j > i:
                gram[cols, rows] = block.t()
    return gram


def gram_matrix(matrix: Tensor, side: str, dtype: torch.dtype,
                row_scale: Optional[Tensor] = None) -> Tensor:
    """Gram matrix of M' = diag(row_scale)·M (M itself without ``row_scale``) in ``dtype``:
    M' M'ᵀ (left) or M'ᵀ M' (right), shape (s, s), s = min(m, n).

    The left Gram is scaled after the product. Float64 Grams of lower-precision matrices are
    accumulated over chunks (no float64 copy of the matrix); in the matrix's own dtype the
    product is formed blockwise (upper blocks only) for s >= 256, on one scaled copy for a
    right Gram with ``row_scale``.
    """
    if side == 'left':
        if matrix.dtype == dtype:
            gram = (_symmetric_product(matrix, 4) if matrix.shape[0] >= 256
                    else matrix @ matrix.t())
        else:
            gram = torch.zeros(matrix.shape[0], matrix.shape[0], dtype=dtype,
                               device=matrix.device)
            step = max(1, GRAM_CHUNK_ELEMENTS // matrix.shape[0])
            for start in range(0, matrix.shape[1], step):
                chunk = matrix[:, start:start + step].to(dtype)
                gram.addmm_(chunk, chunk.t())
        if row_scale is not None:
            a = row_scale.to(dtype)
            gram.mul_(a[:, None]).mul_(a[None, :])
        return gram
    if matrix.dtype == dtype:
        # One scaled copy (freed on return) lets the blockwise symmetric product run on
        # large GEMMs; the float64 path below never copies the whole matrix.
        scaled = matrix if row_scale is None else matrix * row_scale.to(dtype)[:, None]
        a = scaled.t()
        return _symmetric_product(a, 4) if a.shape[0] >= 256 else a @ scaled
    n = matrix.shape[1]
    gram = torch.zeros(n, n, dtype=dtype, device=matrix.device)
    step = max(1, GRAM_CHUNK_ELEMENTS // n)
    for start in range(0, matrix.shape[0], step):
        chunk = matrix[start:start + step].to(dtype)
        if row_scale is not None:
            chunk = chunk * row_scale[start:start + step].to(dtype)[:, None]
        gram.addmm_(chunk.t(), chunk)
    return gram


def exact_top_basis(gram: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
    """Top-``rank`` eigenpairs of a symmetric (s, s) matrix: ``(basis (s, k), values (k,))``,
    values descending. Computed in float64 (on the CPU if the device's solver fails)."""
    g = gram.double()
    try:
        values, vectors = torch.linalg.eigh(g)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        values, vectors = torch.linalg.eigh(g.cpu())
        values, vectors = values.to(gram.device), vectors.to(gram.device)
    return vectors[:, -rank:].flip(-1), values[-rank:].flip(-1)


@dataclass
class RitzBasis:
    """Result of :func:`refine_basis`.

    Attributes:
        basis: (s, k) orthonormal basis of the refined subspace.
        values: (k,) eigenvalues of H = Qᵀ G Q (the Ritz values θ), descending, float64.
        residual_sq: ‖G Q − Q H‖_F² (float).
        complement_sq: an upper estimate of ‖C‖_F², C = Q⊥ᵀ G Q⊥ (G's restriction to the
            complement of the basis): ‖G‖_F² − ‖H‖_F² − 2‖R‖_F² plus a rounding allowance.
        iterations: subspace iterations done.
        outcome: why :func:`refine_basis` stopped: ``'certified'``, ``'no-gap'`` (no
            eigenvalue gap proven at the cut: the basis is far from converged),
            ``'stagnated'`` (the bound stopped shrinking: typically the dtype's rounding
            level) or ``'max-iterations'``.
        complement_max: an upper bound on λ_max(C): ‖C‖_F, or, where that leaves no gap
            below the smallest Ritz value, the Schatten-4 (then -8) norm (Σ λ_j(C)^p)^{1/p}
            of the explicitly formed C plus a rounding allowance.
    """
    basis: Tensor
    values: Tensor
    residual_sq: float
    complement_sq: float = float('inf')
    complement_max: float = float('inf')
    iterations: int = 0
    outcome: str = ''


def _ritz(gram: Tensor, q: Tensor) -> RitzBasis:
    """Rayleigh–Ritz quantities of the orthonormal basis ``q`` for G."""
    gq = gram @ q
    h = q.t() @ gq
    h = (h + h.t()) * 0.5
    residual_sq = float(torch.linalg.matrix_norm(gq - q @ h)) ** 2
    values = torch.linalg.eigvalsh(h).double().flip(-1)
    # ‖G‖² = ‖H‖² + 2‖R‖² + ‖C‖² (blocks of G in the basis [Q, Q⊥]); entries of H carry an
    # absolute rounding error of about eps·λ_max, hence the allowance.
    eps = torch.finfo(gram.dtype).eps
    allowance = 4 * eps * float(values[0].abs()) * float(values.abs().sum()) * gram.shape[0]
    complement_sq = max(float(torch.linalg.matrix_norm(gram)) ** 2
                        - float(torch.linalg.matrix_norm(h)) ** 2 - 2 * residual_sq
                        + allowance, 0.0)
    complement_max = complement_sq ** 0.5
    if complement_max >= float(values[-1]):
        # ‖C‖_F is loose when the tail energy is spread over many directions: bound λ_max(C)
        # by a higher Schatten norm, C = G − Q(GQ)ᵀ − (GQ)Qᵀ + Q H Qᵀ formed in O(s²k + s³).
        c = gram - q @ gq.t() - gq @ q.t() + (q @ h) @ q.t()
        c = (c + c.t()) * 0.5
        rounding = 8 * eps * float(values[0].abs()) * gram.shape[0]
        c2 = c @ c
        complement_max = min(complement_max,
                             float(torch.linalg.matrix_norm(c2)) ** 0.5 + rounding)  # S4
        if complement_max >= float(values[-1]):
            complement_max = min(complement_max,
                                 float(torch.linalg.matrix_norm(c2 @ c2)) ** 0.25 + rounding)
    return RitzBasis(q, values, residual_sq, complement_sq, complement_max)


def refine_basis(gram: Tensor, start: Tensor, max_iterations: int = 1,
                 rtol: float = ENERGY_RTOL) -> RitzBasis:
    """Subspace iteration on G from the (s, k) ``start`` basis, with Rayleigh–Ritz values.

    Stops after the first iteration whose certificate (estimated from G alone:
    τ² ≈ tr(G) − tr(H)) holds, when the excess bound stops shrinking (by less than 4×), or
    after ``max_iterations``. Cost per iteration: two (s, s)×(s, k) products, a QR of (s, k)
    and the eigenvalues (not vectors) of the (k, k) matrix H = Qᵀ G Q. The basis is not
    rotated to Ritz vectors: only its span matters.
    """
    total = float(torch.diagonal(gram).double().sum())
    eps = torch.finfo(gram.dtype).eps
    q, ritz, previous = start, None, float('inf')
    outcome = 'max-iterations'
    for iteration in range(1, max_iterations + 1):
        q, _ = torch.linalg.qr(gram @ q)
        ritz = _ritz(gram, q)
        ritz.iterations = iteration
        margin = 4 * eps * q.shape[1] * float(ritz.values[0]) + rounding_margin(total, gram.dtype)
        residual = max(total - float(ritz.values.sum()), 0.0)
        bound = excess_energy_bound(ritz, residual + margin)
        if certificate_holds(bound, residual - margin, total, gram.dtype, rtol):
            outcome = 'certified'
            break
        if bound == float('inf') and iteration >= 2:
            outcome = 'no-gap'
            break
        if not bound * 4 <= previous:
            outcome = 'stagnated'
            break
        previous = bound
    ritz.outcome = outcome
    return ritz


def excess_energy_bound(ritz: RitzBasis, residual_energy: float) -> float:
    """Upper bound on τ² − Σ_{i>k} σ_i² (see the module docstring); ``inf`` without a gap.

    ``residual_energy`` is an upper estimate of the achieved τ² = ‖M − Q Qᵀ M‖_F² = tr(C);
    λ_max(C) is bounded by min(tr(C), ``ritz.complement_max``).
    """
    gap = float(ritz.values[-1]) - min(residual_energy, ritz.complement_max)
    if gap <= 0.0:
        return float('inf')
    return ritz.residual_sq / gap


def project_on_basis(matrix: Tensor, basis: Tensor, side: str,
                     row_scale: Optional[Tensor] = None) -> Tuple[Tensor, float]:
    """``(P, ‖P‖_F²)``: the projection of M' = diag(row_scale)·M (or M) on the span of the
    orthonormal (s, k) basis: P = Q Qᵀ M' (left) or M' Q Qᵀ (right), shape (m, n);
    ‖P‖_F² = ‖Qᵀ M'‖_F² (resp. ‖M' Q‖_F²). M' is never formed."""
    basis = basis.to(matrix.dtype)
    a = None if row_scale is None else row_scale.to(matrix.dtype)
    if side == 'left':
        coefficients = (basis if a is None else basis * a[:, None]).t() @ matrix  # (k, n)
        projected = basis @ coefficients
    else:
        coefficients = matrix @ basis  # (m, k)
        if a is not None:
            coefficients.mul_(a[:, None])
        projected = coefficients @ basis.t()
    return projected, float(torch.linalg.matrix_norm(coefficients)) ** 2


def rounding_margin(total_energy: float, dtype: torch.dtype) -> float:
    """Absolute uncertainty of a residual energy τ² = ‖M‖² − ‖P‖² computed in ``dtype``."""
    return 8 * torch.finfo(dtype).eps * total_energy


def certificate_holds(excess_bound: float, residual_energy: float, total_energy: float,
                      dtype: torch.dtype, rtol: float = ENERGY_RTOL) -> bool:
    """Whether τ² <= (1 + ``rtol``)·Σ_{i>k} σ_i² follows from the excess bound.

    ``residual_energy`` is τ² as computed (± :func:`rounding_margin`). The allowance has a
    floor at the rounding level of ``dtype`` (a result stored in float32 cannot be closer than
    that to the optimum anyway).
    """
    floor = (4 * torch.finfo(dtype).eps) ** 2 * total_energy
    lower = max(residual_energy - rounding_margin(total_energy, dtype), 0.0)
    return excess_bound * (1 + rtol) <= rtol * lower + floor


def warm_start_usable(start: Optional[Tensor], side_size: int, rank: int) -> bool:
    """A cached basis fits a matrix whose smaller side is ``side_size`` and rank ``rank``."""
    return (start is not None and start.dim() == 2
            and tuple(start.shape) == (side_size, rank) and bool(torch.isfinite(start).all()))
