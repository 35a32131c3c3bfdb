"""Top-k singular subspace of a weight matrix without a full SVD (pure PyTorch).

Only the rank-k projection P_k(M) = U_k U_kᵀ M = M V_k V_kᵀ is needed, i.e. an orthonormal
basis of the top-k singular subspace on the *smaller* side of the (m, n) matrix M:
the left side (basis (m, k), Gram G = M Mᵀ) when m <= n, else the right side
(basis (n, k), G = Mᵀ M). Three ways to get it:

* exact: eigendecomposition of G in float64 (:func:`exact_top_basis`);
* exact-f32: eigendecomposition of G in float32, certified (:func:`certified_top_basis`);
* warm: subspace iteration on G started from the basis of the previous projection, with
  Rayleigh–Ritz, in the matrix's dtype (:func:`refine_basis`). Weights move little between
  two LRPET projections, so one iteration usually suffices.

The float32 results are accepted only with a residual certificate (:func:`certify`):
for Ritz pairs (θ, Q) of G with residual R = G Q − Q diag(θ) and δ = θ_k − λ_max(C) > 0
(C = G restricted to the complement of Q, λ_max(C) <= min(tr(C), ‖C‖_F, ‖C‖_{S8}) or,
after an eigendecomposition, λ̂_{k+1} plus the eigen-residual below the cut,
tr(C) = τ²),

    Σ_{i<=k} λ_i(G) − Σ θ_i  <=  ‖R‖_F² / δ,

so the achieved residual energy τ² = ‖M − Q Qᵀ M‖_F² exceeds the optimum
Σ_{i>k} σ_i² by at most ‖R‖_F² / δ. (Proof: for any orthonormal X = [X1; X2] in the basis
[Q, Q⊥], tr(Xᵀ G X) <= Σθ − δ t² + 2‖R‖_F t with t = ‖X2‖_F; maximize over t.)

The certificate is checked without an eigendecomposition of H = Qᵀ G Q: θ_k > μ is proven
by a Cholesky factorization of H − μ I, for the μ the wanted bound needs; λ_max(C) is bounded
by the cheapest of τ², ‖C‖_F (C formed blockwise) and ‖C‖_{S4}, ‖C‖_{S8} that suffices.
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
#: Tightening steps of the bound on λ_max(C) (see :func:`_tighten_complement`).
COMPLEMENT_STEPS = 3


def smaller_side(shape: Tuple[int, int]) -> str:
    """``'left'`` if m <= n (basis of the column space, (m, k)), else ``'right'`` ((n, k))."""
    return 'left' if shape[0] <= shape[1] else 'right'


def _symmetric_product(a: Tensor, blocks: int, weights: Optional[Tensor] = None) -> Tensor:
    """a·diag(w)·aᵀ (a aᵀ without ``weights``) for a (s, t) matrix, shape (s, s), computing only
    the diagonal and upper blocks of a ``blocks``×``blocks`` tiling (about
    (blocks + 1) / (2·blocks) of the full product's flops). With ``weights`` (t,) only one
    row block of a is scaled at a time (extra memory ≈ a.numel() / blocks)."""
    s = a.shape[0]
    edges = [round(i * s / blocks) for i in range(blocks + 1)]
    gram = torch.empty(s, s, dtype=a.dtype, device=a.device)
    for i in range(blocks):
        rows = slice(edges[i], edges[i + 1])
        left = a[rows] if weights is None else a[rows] * weights
        for j in range(i, blocks):
            cols = slice(edges[j], edges[j + 1])
            block = left @ a[cols].t()
            gram[rows, cols] = block
            if j > i:
                gram[cols, rows] = block.t()
        del left
    return gram


def gram_matrix(matrix: Tensor, side: str, dtype: torch.dtype,
                row_scale: Optional[Tensor] = None) -> Tensor:
    """Gram matrix of M' = diag(row_scale)·M (M itself without ``row_scale``) in ``dtype``:
    M' M'ᵀ (left) or M'ᵀ M' (right), shape (s, s), s = min(m, n).

    The left Gram is scaled after the product, the right one weights the product by
    row_scale². Float64 Grams of lower-precision matrices are accumulated over chunks (no
    float64 copy of the matrix); in the matrix's own dtype the product is formed blockwise
    (upper blocks only) for s >= 256. Never copies the whole matrix.
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
    if matrix.dtype == dtype and matrix.shape[1] >= 256:
        weights = None if row_scale is None else row_scale.to(dtype).square()
        return _symmetric_product(matrix.t(), 4, weights)
    n = matrix.shape[1]
    gram = torch.zeros(n, n, dtype=dtype, device=matrix.device)
    step = max(1, GRAM_CHUNK_ELEMENTS // n)
    for start in range(0, matrix.shape[0], step):
        chunk = matrix[start:start + step].to(dtype)
        if row_scale is not None:
            chunk = chunk * row_scale[start:start + step].to(dtype)[:, None]
        gram.addmm_(chunk.t(), chunk)
    return gram


def _eigh(matrix: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` into preallocated outputs, the vectors in column-major layout.

    Workaround for torch 2.5's CPU eigh, which otherwise makes two (s, s) copies besides its
    workspace (a row-major input is cloned, then relaid out): peak extra memory ≈ 4 s²
    elements instead of ≈ 2 s² (measured: 18 MB vs 8 MB for s = 1024 in float32)."""
    s = matrix.shape[0]
    values = torch.empty(s, dtype=matrix.dtype, device=matrix.device)
    vectors = torch.empty(s, s, dtype=matrix.dtype, device=matrix.device).t()
    return torch.linalg.eigh(matrix, out=(values, vectors))


def exact_top_basis(gram: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
    """Top-``rank`` eigenpairs of a symmetric (s, s) matrix: ``(basis (s, k), values (k,))``,
    values descending. Computed in float64 (on the CPU if the device's solver fails)."""
    g = gram.double()
    try:
        values, vectors = _eigh(g)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        values, vectors = _eigh(g.cpu())
        values, vectors = values.to(gram.device), vectors.to(gram.device)
    return vectors[:, -rank:].flip(-1), values[-rank:].flip(-1)


def certified_top_basis(gram: Tensor, rank: int) -> Optional[Tuple['RitzBasis', Tensor]]:
    """Top-``rank`` eigenvectors of G from its eigendecomposition in G's own dtype, with the
    quantities to certify them: ``(ritz, G·basis)``, or None if the solver fails.

    ``ritz.complement_max`` bounds λ_max(C) (C: G on the complement of the basis) by
    λ̂_{k+1} + ‖G V⊥ − V⊥ Λ̂⊥‖_F plus a rounding allowance, where (Λ̂⊥, V⊥) are the computed
    eigenpairs below the cut (C = Λ̂⊥ + V⊥ᵀ(G V⊥ − V⊥ Λ̂⊥) for orthonormal V). Unlike the
    norm bounds of :func:`_tighten_complement`, this holds with a tail spread over many
    directions; it needs an eigenvalue gap at the cut above the dtype's resolution.
    Memory: the eigensolver's (about 2 s² in G's dtype, see :func:`_eigh`), then
    s² + s·k.
    """
    try:
        values, vectors = _eigh(gram)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        return None
    s = gram.shape[0]
    basis = vectors[:, s - rank:].flip(-1)  # (s, k) copy, descending
    complement = 0.0
    if rank < s:
        below = vectors[:, :s - rank]
        defect = gram @ below
        defect.sub_(below * values[:s - rank])
        eps = torch.finfo(gram.dtype).eps
        rounding = 4 * eps * (s ** 0.5) * float(torch.linalg.matrix_norm(gram))
        complement = (float(values[s - rank - 1]) + float(torch.linalg.matrix_norm(defect))
                      + rounding)
        del below, defect
    del vectors, values
    gq = gram @ basis
    ritz = _ritz(basis, gq)
    ritz.bound_complement(complement, final=True)  # the norm bounds would not be tighter
    return ritz, gq


@dataclass
class RitzBasis:
    """Rayleigh–Ritz quantities of an orthonormal basis Q (s, k) for a Gram matrix G.

    Attributes:
        basis: (s, k) orthonormal basis Q.
        h: (k, k) H = Qᵀ G Q (symmetrized), in G's dtype. Its eigenvalues are the Ritz
            values θ (see :attr:`values`).
        residual_sq: ‖R‖_F², R = G Q − Q H.
        value_sum: Σθ = tr(H), summed in float64.
        value_max: an upper bound on θ_1 (min of ‖H‖_F and ‖H‖_1).
        complement_max: an upper bound on λ_max(C), C = Q⊥ᵀ G Q⊥ (G restricted to the
            complement of the basis), ``inf`` until computed (see :func:`certify`).
        iterations: subspace iterations done (:func:`refine_basis`).
        outcome: why :func:`refine_basis` stopped: ``'certified'``, ``'no-gap'`` (no
            eigenvalue gap proven at the cut: the basis is far from converged),
            ``'stagnated'`` (the bound stopped shrinking: typically the dtype's rounding
            level), ``'degenerate'`` (θ_k at the dtype's rounding level: the k-th direction
            carries no resolvable energy, e.g. behind a zero BN scale) or
            ``'max-iterations'``.
    """
    basis: Tensor
    h: Tensor
    residual_sq: float
    value_sum: float
    value_max: float
    complement_max: float = float('inf')
    iterations: int = 0
    outcome: str = ''
    _values: Optional[Tensor] = None
    _complement_steps: int = 0
    _proven_above: float = float('-inf')

    @property
    def values(self) -> Tensor:
        """(k,) Ritz values θ, descending, float64 (an eigvalsh of H, computed once)."""
        if self._values is None:
            self._values = torch.linalg.eigvalsh(self.h).double().flip(-1)
        return self._values

    @property
    def value_rounding(self) -> float:
        """Absolute rounding allowance on the Ritz values (H's entries carry ≈ eps·θ_1)."""
        return 4 * torch.finfo(self.h.dtype).eps * self.h.shape[0] * self.value_max

    def bound_complement(self, bound: float, final: bool = False) -> None:
        """Adopt ``bound`` as an upper bound on λ_max(C) if it is tighter than the current one;
        ``final``: no norm bound of :func:`_tighten_complement` is to be tried after it."""
        self.complement_max = min(self.complement_max, bound)
        if final:
            self._complement_steps = COMPLEMENT_STEPS

    def next_complement_step(self) -> Optional[int]:
        """Claim the next tightening step of λ_max(C)'s bound (0: ‖C‖_F, 1: Schatten-4,
        2: Schatten-8; see :func:`_tighten_complement`), or None when none is left."""
        if self._complement_steps >= COMPLEMENT_STEPS:
            return None
        self._complement_steps += 1
        return self._complement_steps - 1

    def smallest_value_exceeds(self, level: float) -> bool:
        """Whether θ_k > ``level`` (+ rounding), proven by a Cholesky factorization of
        H − level·I (or read off the Ritz values once they are computed)."""
        level = level + self.value_rounding
        if self._values is not None:
            return float(self._values[-1]) > level
        if level <= self._proven_above:
            return True
        shifted = self.h.clone()
        shifted.diagonal().sub_(level)
        _, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            self._proven_above = level
            return True
        return False


def _ritz(q: Tensor, gq: Tensor) -> RitzBasis:
    """Rayleigh–Ritz quantities of the orthonormal basis ``q`` given ``gq`` = G q."""
    h = q.t() @ gq
    h = (h + h.t()) * 0.5
    residual_sq = float(torch.linalg.matrix_norm(gq - q @ h)) ** 2
    value_sum = float(torch.diagonal(h).double().sum())
    value_max = min(float(torch.linalg.matrix_norm(h)),
                    float(torch.linalg.matrix_norm(h, ord=1)))
    return RitzBasis(q, h, residual_sq, value_sum, value_max)


#: Rows of the complement C formed at once by :func:`_tighten_complement` (Frobenius step).
COMPLEMENT_BLOCK_ROWS = 256


def _tighten_complement(ritz: RitzBasis, gram: Tensor, gq: Tensor) -> bool:
    """Compute the next, tighter (and costlier) upper bound on λ_max(C) into
    ``ritz.complement_max``: step 1 ‖C‖_F (C formed in row blocks, O(s²k)), step 2 the
    Schatten-4 norm (Σλ_j(C)⁴)^{1/4}, step 3 the Schatten-8 norm (full C, O(s³)).
    Returns False when no step is left.

    C = G − Q Zᵀ − Z Qᵀ with Z = G Q − Q H / 2 (= Q⊥Q⊥ᵀ G Q⊥Q⊥ᵀ for orthonormal Q)."""
    step = ritz.next_complement_step()
    if step is None:
        return False
    q, h, eps = ritz.basis, ritz.h, torch.finfo(gram.dtype).eps
    z = gq - 0.5 * (q @ h)
    k, s = q.shape[1], q.shape[0]
    # GEMM rounding: |δC| <= 2 k eps |Q||Z|ᵀ entrywise, so ‖δC‖_F <= 2 k eps √k ‖Z‖_F.
    rounding = 4 * eps * (k ** 1.5 * float(torch.linalg.matrix_norm(z))
                          + float(torch.linalg.matrix_norm(gram)))
    if step == 0:
        total = 0.0
        for start in range(0, s, COMPLEMENT_BLOCK_ROWS):
            rows = slice(start, start + COMPLEMENT_BLOCK_ROWS)
            block = torch.addmm(gram[rows], q[rows], z.t(), alpha=-1)
            block.addmm_(z[rows], q.t(), alpha=-1)
            total += float(torch.linalg.matrix_norm(block)) ** 2
        bound = total ** 0.5 + rounding
    else:
        c = torch.addmm(gram, q, z.t(), alpha=-1)
        c.addmm_(z, q.t(), alpha=-1)
        c = (c + c.t()) * 0.5
        c2 = _symmetric_product(c, 4) if s >= 256 else c @ c  # C² (C symmetric)
        del c
        rounding += 8 * eps * ritz.value_max * s
        if step == 1:
            bound = float(torch.linalg.matrix_norm(c2)) ** 0.5 + rounding
        else:
            c4 = _symmetric_product(c2, 4) if s >= 256 else c2 @ c2
            bound = float(torch.linalg.matrix_norm(c4)) ** 0.25 + rounding
    ritz.bound_complement(bound)
    return True


def certify(ritz: RitzBasis, residual_energy: float, allowed_excess: float,
            gram: Optional[Tensor] = None, gq: Optional[Tensor] = None) -> bool:
    """Whether the certificate shows Σ_{i<=k} λ_i(G) − Σθ <= ``allowed_excess``.

    ``residual_energy`` is an upper estimate of τ² = tr(C). Needs θ_k > λ_max(C) +
    ‖R‖²/allowed; λ_max(C) is bounded by τ² first, then — only given ``gram`` and ``gq`` = G Q,
    and only while it decides — by the tighter bounds of :func:`_tighten_complement`.
    """
    if not allowed_excess > 0.0:
        return False
    need = ritz.residual_sq / allowed_excess
    if ritz.smallest_value_exceeds(min(residual_energy, ritz.complement_max) + need):
        return True
    if gram is None or not ritz.smallest_value_exceeds(need):
        return False  # (even λ_max(C) = 0 would not do: the basis needs iterating)
    while _tighten_complement(ritz, gram, gq):
        if ritz.smallest_value_exceeds(min(residual_energy, ritz.complement_max) + need):
            return True
    return False


def refine_basis(gram: Tensor, start: Tensor, max_iterations: int = 1,
                 rtol: float = ENERGY_RTOL) -> RitzBasis:
    """Subspace iteration on G from the (s, k) ``start`` basis, with Rayleigh–Ritz.

    Stops after the first iteration whose certificate (estimated from G alone:
    τ² ≈ tr(G) − tr(H)) holds, when the excess bound stops shrinking (by less than 4×), or
    after ``max_iterations``. Cost: one (s, s)×(s, k) product per iteration plus one, a QR of
    (s, k) and a Cholesky factorization of (k, k) per iteration; the eigenvalues of H and
    the tighter complement bounds only where they decide. The basis is not rotated to Ritz
    vectors: only its span matters.
    """
    total = float(torch.diagonal(gram).double().sum())
    eps = torch.finfo(gram.dtype).eps
    gq, ritz, previous = gram @ start, None, float('inf')
    outcome = 'max-iterations'
    for iteration in range(1, max_iterations + 1):
        q, _ = torch.linalg.qr(gq)
        gq = gram @ q
        ritz = _ritz(q, gq)
        ritz.iterations = iteration
        margin = 4 * eps * q.shape[1] * ritz.value_max + rounding_margin(total, gram.dtype)
        residual = max(total - ritz.value_sum, 0.0)
        allowed = allowed_excess(residual - margin, total, gram.dtype, rtol)
        if certify(ritz, residual + margin, allowed, gram, gq):
            outcome = 'certified'
            break
        # Not certified: the numeric bound decides whether iterating helps.
        while (ritz.value_rounding < float(ritz.values[-1])
               <= min(residual + margin, ritz.complement_max)
               and _tighten_complement(ritz, gram, gq)):
            pass
        if float(ritz.values[-1]) <= ritz.value_rounding:
            outcome = 'degenerate'  # θ_k at the rounding level: no gap to find in this dtype
            break
        bound = excess_energy_bound(ritz, residual + margin)
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
    λ_max(C) is bounded by min(tr(C), ``ritz.complement_max``). Computes the Ritz values.
    """
    gap = (float(ritz.values[-1]) - ritz.value_rounding
           - min(residual_energy, ritz.complement_max))
    if gap <= 0.0:
        return float('inf')
    return ritz.residual_sq / gap


def basis_coefficients(matrix: Tensor, basis: Tensor, side: str,
                       row_scale: Optional[Tensor] = None) -> Tuple[Tensor, float]:
    """``(B, ‖B‖_F²)``: the coordinates of M' = diag(row_scale)·M (or M) in the orthonormal
    (s, k) basis: B = Qᵀ M' (k, n) on the left side, M' Q (m, k) on the right side. The
    projection of M' on the basis is Q B (left) or B Qᵀ (right), of squared norm ‖B‖_F².
    M' is never formed."""
    basis = basis.to(matrix.dtype)
    a = None if row_scale is None else row_scale.to(matrix.dtype)
    if side == 'left':
        coefficients = (basis if a is None else basis * a[:, None]).t() @ matrix
    else:
        coefficients = matrix @ basis
        if a is not None:
            coefficients.mul_(a[:, None])
    return coefficients, float(torch.linalg.matrix_norm(coefficients)) ** 2


def expand_coefficients(basis: Tensor, coefficients: Tensor, side: str, scale: float = 1.0,
                        output_row_factor: Optional[Tensor] = None,
                        out: Optional[Tensor] = None) -> Tensor:
    """diag(output_row_factor)·scale·(Q B) (left) or ·(B Qᵀ) (right), shape (m, n), with one
    GEMM; the factors are applied to the small operand. Written into ``out`` if given (it may
    share memory with the matrix B was computed from). ``coefficients`` may be modified."""
    basis = basis.to(coefficients.dtype)
    if side == 'left':
        factor = (None if output_row_factor is None
                  else output_row_factor.to(basis.dtype) * scale)
        left = basis * factor[:, None] if factor is not None else (
            basis * scale if scale != 1.0 else basis)
        return torch.matmul(left, coefficients, out=out)
    if output_row_factor is not None:
        coefficients.mul_((output_row_factor.to(coefficients.dtype) * scale)[:, None])
    elif scale != 1.0:
        coefficients.mul_(scale)
    return torch.matmul(coefficients, basis.t(), out=out)


def rounding_margin(total_energy: float, dtype: torch.dtype) -> float:
    """Absolute uncertainty of a residual energy τ² = ‖M‖² − ‖P‖² computed in ``dtype``."""
    return 8 * torch.finfo(dtype).eps * total_energy


def allowed_excess(residual_energy: float, total_energy: float, dtype: torch.dtype,
                   rtol: float = ENERGY_RTOL) -> float:
    """Largest excess τ² − Σ_{i>k} σ_i² that still gives τ² <= (1 + ``rtol``)·Σ_{i>k} σ_i².

    ``residual_energy`` is τ² as computed (± :func:`rounding_margin`). The allowance has a
    floor at the rounding level of ``dtype`` (a result stored in float32 cannot be closer than
    that to the optimum anyway).
    """
    floor = (4 * torch.finfo(dtype).eps) ** 2 * total_energy
    lower = max(residual_energy - rounding_margin(total_energy, dtype), 0.0)
    return (rtol * lower + floor) / (1 + rtol)


def warm_start_usable(start: Optional[Tensor], side_size: int, rank: int) -> bool:
    """A cached basis fits a matrix whose smaller side is ``side_size`` and rank ``rank``."""
    return (start is not None and start.dim() == 2
            and tuple(start.shape) == (side_size, rank) and bool(torch.isfinite(start).all()))
