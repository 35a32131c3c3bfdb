"""Rank planning: which rank k each layer keeps (pure PyTorch / Python).

For a layer whose weight is viewed as an (m, n) matrix and a rank pruning ratio p ∈ [0, 1):
k = floor((1 − p) · min(m, n)), at least ``min_rank``; with ``rank_multiple`` q > 1, k is then
rounded to the nearest multiple of q (at least q), because CPU and GPU convolution kernels run
inner widths that are multiples of 8 markedly faster (``benchmarks/bench_rank_alignment.py``:
layer1's 3×3 pair of ResNet-50 at 800×1333 runs ~40 % faster at k = 24 than at k = 26). A layer is
left alone when the factorized pair would not have fewer parameters than the original:
k·(m + n) ≥ m·n.
"""
import bisect
import heapq
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch


def check_rank_ratio(ratio: float, what: str = 'rank_ratio') -> float:
    """Validate a rank pruning ratio (must be a number in [0, 1))."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f'{what} must be a number in [0, 1), got {ratio!r}')
    return float(ratio)


def check_rank_multiple(multiple: int) -> int:
    """Validate ``rank_multiple`` (an int >= 1)."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f'rank_multiple must be an int >= 1, got {multiple!r}')
    return multiple


def rank_for_ratio(m: int, n: int, ratio: float, min_rank: int = 1,
                   rank_multiple: int = 1) -> int:
    """k = floor((1 − ratio) · min(m, n)); with ``rank_multiple`` q > 1 rounded to the nearest
    multiple of q (halves up, at least q); then clamped to [min_rank, min(m, n)]."""
    check_rank_ratio(ratio)
    check_rank_multiple(rank_multiple)
    full = min(m, n)
    # The 1e-9 guards against (1 - p) * full landing just below an integer in floating point.
    k = math.floor((1.0 - ratio) * full + 1e-9)
    if rank_multiple > 1:
        k = max(rank_multiple, rank_multiple * math.floor(k / rank_multiple + 0.5))
    return max(min(max(k, min_rank), full), 1)


def factorization_pays(m: int, n: int, k: int) -> bool:
    """True when two cascaded convs or linear layers (k·(m + n) params) are smaller than the
    original (m·n)."""
    return k * (m + n) < m * n


@dataclass
class LayerRank:
    """Planned rank of one layer.

    Attributes:
        name: module name relative to the model (e.g. ``backbone.layer1.0.conv2``).
        out_features: m = n_out.
        in_features: n = n_in·kh·kw.
        rank: k, the number of singular values kept.
        ratio: the rank pruning ratio p it was planned with.
    """
    name: str
    out_features: int
    in_features: int
    rank: int
    ratio: float

    @property
    def full_rank(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def params_before(self) -> int:
        return self.out_features * self.in_features

    @property
    def params_after(self) -> int:
        return self.rank * (self.out_features + self.in_features)


@dataclass
class RankPlan:
    """Ranks for the projected layers, plus the layers left alone and why.

    ``layers`` keeps the model's module order. Serializes to plain JSON-able dicts
    (stored in checkpoint meta by the hook, read by the factorize tool).
    """
    layers: Dict[str, LayerRank] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def rank_of(self, name: str) -> int:
        return self.layers[name].rank

    def to_dict(self) -> dict:
        return dict(layers=[asdict(layer) for layer in self.layers.values()],
                    skipped=dict(self.skipped))

    @classmethod
    def from_dict(cls, data: Mapping) -> 'RankPlan':
        try:
            layers = {d['name']: LayerRank(**d) for d in data['layers']}
            return cls(layers=layers, skipped=dict(data.get('skipped', {})))
        except (KeyError, TypeError) as e:
            raise ValueError(f'malformed rank plan: {e!r}') from e


def compile_patterns(patterns: Iterable[str], what: str) -> List[Tuple[str, 're.Pattern']]:
    """``[(pattern, compiled regex)]``; a ValueError naming ``what`` and the bad pattern."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append((pattern, re.compile(pattern)))
        except re.error as e:
            raise ValueError(f'{what}: invalid regular expression {pattern!r}: {e}') from e
    return compiled


def plan_ranks(shapes: Mapping[str, Tuple[int, int]],
               rank_ratio: float,
               layer_ratios: Optional[Mapping[str, float]] = None,
               min_rank: int = 1, rank_multiple: int = 1) -> RankPlan:
    """Plan ranks for layers given their matrix shapes.

    Args:
        shapes: ordered ``{module name: (m, n)}`` of the layers in scope.
        rank_ratio: default rank pruning ratio p ∈ [0, 1).
        layer_ratios: ``{regex: ratio}`` overrides, matched with ``re.search`` against the
            module name; the first matching pattern wins. Every pattern must match a layer.
        min_rank: lower bound on k (the paper needed one for VGG). Defaults to 1.
        rank_multiple: round each k to a multiple of this (see the module docstring); 1 keeps
            the paper's floor((1 − p)·min(m, n)). Defaults to 1.

    Returns:
        A :class:`RankPlan`; layers where factorization would not reduce parameters are in
        ``plan.skipped`` with the reason.
    """
    check_rank_ratio(rank_ratio)
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f'min_rank must be an int >= 1, got {min_rank!r}')
    check_rank_multiple(rank_multiple)
    overrides = compile_patterns((layer_ratios or {}).keys(), 'layer_ratios')
    for pattern, _ in overrides:
        check_rank_ratio(layer_ratios[pattern], f'layer_ratios[{pattern!r}]')
    used = set()
    plan = RankPlan()
    for name, (m, n) in shapes.items():
        ratio = rank_ratio
        for pattern, regex in overrides:
            if regex.search(name):
                ratio = float(layer_ratios[pattern])
                used.add(pattern)
                break
        k = rank_for_ratio(m, n, ratio, min_rank, rank_multiple)
        if not factorization_pays(m, n, k):
            plan.skipped[name] = (f'factorizing would not reduce parameters: rank {k} of '
                                  f'{m}x{n} gives {k * (m + n)} >= {m * n}')
            continue
        plan.layers[name] = LayerRank(name, m, n, k, ratio)
    unused = [p for p, _ in overrides if p not in used]
    if unused:
        raise ValueError(f'layer_ratios pattern(s) {unused} match no layer in scope; '
                         f'layers: {list(shapes)[:8]}{" ..." if len(shapes) > 8 else ""}')
    return plan


# ---------------------------------------------------------------------------------------------
# Budgeted rank allocation by energy
# ---------------------------------------------------------------------------------------------

@dataclass
class LayerSpectrum:
    """What :func:`allocate_ranks_by_energy` needs to know about one layer.

    Attributes:
        out_features: m = n_out.
        in_features: n = n_in·kh·kw.
        conv_flops: FLOPs of the unfactorized conv at the planning input size. Factorized at
            rank k it costs ``conv_flops · k(m + n)/(m·n)`` (the model of
            ``plan_ranks_for_flops``).
        energy: squared singular values σ_i² of the (BN-folded) weight matrix, length
            min(m, n); a 1-D tensor or a sequence. Stored as a descending float64 CPU tensor
            (it is sorted: a rank-k truncation keeps the k largest, whatever the input order).
        extra_saved_flops: FLOPs that disappear once the layer is factorized at any rank, e.g.
            those of the BN folded into the factorized pair. Defaults to 0.
    """
    out_features: int
    in_features: int
    conv_flops: float
    energy: object
    extra_saved_flops: float = 0.0

    def __post_init__(self):
        for what in ('out_features', 'in_features'):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{what} must be an int >= 1, got {value!r}')
        for what in ('conv_flops', 'extra_saved_flops'):
            value = getattr(self, what)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f'{what} must be a finite number >= 0, got {value!r}')
        energy = torch.as_tensor(
            self.energy.detach() if isinstance(self.energy, torch.Tensor) else self.energy,
            dtype=torch.float64).cpu()
        if energy.dim() != 1 or energy.numel() != self.full_rank:
            raise ValueError(f'energy must be 1-D of length min(m, n) = {self.full_rank} for a '
                             f'{self.out_features}x{self.in_features} layer, got shape '
                             f'{tuple(energy.shape)}')
        if not bool(torch.isfinite(energy).all()) or bool((energy < 0).any()):
            raise ValueError('energy (squared singular values) must be finite and >= 0')
        self.energy = torch.sort(energy, descending=True).values

    @property
    def full_rank(self) -> int:
        return min(self.out_features, self.in_features)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, conv_flops: float,
                    extra_saved_flops: float = 0.0) -> 'LayerSpectrum':
        """Build from a (BN-folded) conv weight (n_out, n_in, *kernel) or an (m, n) matrix;
        the singular values are computed in float64 on the weight's device."""
        if weight.dim() < 2:
            raise ValueError(f'expected a weight with >= 2 dims, got shape {tuple(weight.shape)}')
        matrix = weight.detach().reshape(weight.shape[0], -1)
        energy = torch.linalg.svdvals(matrix.double()).pow(2).cpu()
        return cls(matrix.shape[0], matrix.shape[1], conv_flops, energy, extra_saved_flops)

    def flops_saved(self, rank: Optional[int]) -> float:
        """FLOPs removed by factorizing at ``rank`` (0.0 for ``None`` or a rank that does not
        pay); the same expression as ``plan_ranks_for_flops``'s model."""
        m, n = self.out_features, self.in_features
        if rank is None or not factorization_pays(m, n, rank):
            return 0.0
        return self.conv_flops * (1.0 - rank * (m + n) / (m * n)) + self.extra_saved_flops

    def energy_kept(self, rank: Optional[int]) -> float:
        """Σ_{j<=rank} σ_j² / Σ_j σ_j²; 1.0 for ``None`` (unfactorized) and for an all-zero
        spectrum."""
        total = float(self.energy.sum())
        if rank is None or rank >= self.full_rank or total == 0.0:
            return 1.0
        return min(float(self.energy[:rank].sum()) / total, 1.0)


def allowed_ranks(m: int, n: int, min_rank: int = 1, rank_multiple: int = 1) -> List[int]:
    """All ranks :func:`rank_for_ratio` can give a (m, n) layer, ascending:
    ``min(max(j·q, min_rank), min(m, n))`` for j >= 1 (q = ``rank_multiple``)."""
    check_rank_multiple(rank_multiple)
    full = min(m, n)
    if min_rank >= full:
        return [full]
    if rank_multiple == 1:
        return list(range(min_rank, full + 1))
    ranks = {min(max(j * rank_multiple, min_rank), full)
             for j in range(1, full // rank_multiple + 2)}
    return sorted(ranks)


def _check_min_rank(min_rank) -> int:
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f'min_rank must be an int >= 1, got {min_rank!r}')
    return min_rank


class _LayerCurve:
    """One layer's trade-off: the factorizing ranks (descending), FLOPs saved and normalized
    energy lost at each, and the lower convex hull of (saved, lost) starting at (0, 0) =
    unfactorized. Index -1 in ``ranks`` terms means unfactorized."""

    def __init__(self, spec: LayerSpectrum, min_rank: int, rank_multiple: int):
        m, n = spec.out_features, spec.in_features
        candidates = [k for k in allowed_ranks(m, n, min_rank, rank_multiple)
                      if factorization_pays(m, n, k)]
        candidates.reverse()  # descending: entry (break-even) rank first
        cumulative = [0.0] + torch.cumsum(spec.energy, 0).tolist()
        total = cumulative[-1]
        self.ranks: List[int] = []
        self.saved: List[float] = []
        self.lost: List[float] = []
        for k in candidates:
            saved = spec.flops_saved(k)
            # A rank that saves no more than a larger one is never worth taking.
            if saved <= (self.saved[-1] if self.saved else 0.0):
                continue
            self.ranks.append(k)
            self.saved.append(saved)
            self.lost.append(max(total - cumulative[k], 0.0) / total if total > 0 else 0.0)
        # Lower convex hull (monotone chain) of the points (0, 0), (saved_i, lost_i); x is
        # strictly increasing. Collinear points are kept so equal-slope moves stay fine-grained.
        hull = [-1]

        def point(i):
            return (0.0, 0.0) if i < 0 else (self.saved[i], self.lost[i])

        for i in range(len(self.ranks)):
            x2, y2 = point(i)
            while len(hull) >= 2:
                x0, y0 = point(hull[-2])
                x1, y1 = point(hull[-1])
                if (y1 - y0) * (x2 - x1) > (y2 - y1) * (x1 - x0):  # hull[-1] above the chord
                    hull.pop()
                else:
                    break
            hull.append(i)
        self.hull = hull  # hull[0] == -1; moves go hull[j] -> hull[j + 1]

    def point(self, i: int) -> Tuple[float, float]:
        return (0.0, 0.0) if i < 0 else (self.saved[i], self.lost[i])

    def slope(self, j: int) -> float:
        (x0, y0), (x1, y1) = self.point(self.hull[j]), self.point(self.hull[j + 1])
        return (y1 - y0) / (x1 - x0)

    @property
    def max_saved(self) -> float:
        return self.saved[-1] if self.saved else 0.0


def allocate_ranks_by_energy(layers: Mapping[str, LayerSpectrum], flops_to_remove: float,
                             min_rank: int = 1, rank_multiple: int = 1) -> Dict[str, int]:
    """Per-layer ranks that remove at least ``flops_to_remove`` FLOPs while keeping the most
    spectral energy (an alternative to the paper's single ratio for all layers).

    Objective: maximize Σ_i E_i(k_i), E_i(k) = Σ_{j<=k} σ_j² / Σ_j σ_j² (1 for an unfactorized
    layer), subject to Σ_i saved_i(k_i) >= ``flops_to_remove``, where a layer factorized at k
    saves ``conv_flops·(1 − k(m + n)/(m·n)) + extra_saved_flops`` and an unfactorized one saves
    nothing (the FLOPs model of ``plan_ranks_for_flops``). Each layer is either unfactorized or
    at a rank :func:`rank_for_ratio` can produce (multiples of ``rank_multiple`` q, at least q,
    at least ``min_rank``, at most min(m, n) — see :func:`allowed_ranks`) with
    k(m + n) < m·n. A layer whose spectrum is all zero loses no energy at any rank.

    Algorithm (greedy on convex hulls, O(U log L) for U allowed ranks over L layers):

    1. Per layer, the points (saved, lost) for unfactorized (0, 0) and every factorizing rank,
       descending. The curve is not convex: the first move — entering factorization at the
       break-even rank k0 (largest k with k(m + n) < m·n) — loses the whole tail
       Σ_{j>k0} σ_j² (min(m, n) − k0 values, about half of them for a square layer) but saves
       only the small jump F·(1 − k0(m + n)/(m·n)) plus ``extra_saved_flops``; later single
       steps of q lose σ² of one step and each save the same F·q(m + n)/(m·n). Ranking "enter at
       k0" as one move by its own loss/FLOP ratio would make flat-spectrum layers look far
       costlier than they are once entered, so moves are instead the segments of the lower
       convex hull of those points: entry is merged with as many following steps as make its
       average loss per FLOP no worse than the next step (for most layers this is
       "enter at k0" alone, then single steps). Segment slopes increase along each layer.
    2. All layers' next segments sit in a heap keyed by (loss per FLOP saved, layer order,
       segment); the cheapest is applied until the budget is met. This is optimal for the
       fractional relaxation; only the last move can overshoot.
    3. The last move, which may overshoot, is undone and replaced by the single move (any
       layer, from its current rank to any smaller allowed rank or into factorization) that
       covers the remaining deficit with the least energy lost — this includes the last move
       trimmed to the largest rank that suffices. Then single undo moves (one rank step up, or
       unfactorizing a layer at k0) are applied while the budget still holds, the largest
       energy gain first. Afterwards every possible undo move would save more FLOPs than the
       surplus (removed − budget).

    Ties (equal slope, equal gain) go to the layer that comes first in ``layers``; the result
    depends only on the inputs.

    Args:
        layers: ordered ``{module name: LayerSpectrum}``.
        flops_to_remove: the FLOPs budget to remove (<= 0 returns ``{}``).
        min_rank, rank_multiple: as in :func:`plan_ranks`.

    Returns:
        ``{name: rank}`` for the factorized layers only, in the order of ``layers``.

    Raises:
        ValueError: ``flops_to_remove`` exceeds what factorizing every layer at its smallest
            allowed rank removes (that maximum is in the message), or invalid arguments.
    """
    _check_min_rank(min_rank)
    check_rank_multiple(rank_multiple)
    if (isinstance(flops_to_remove, bool) or not isinstance(flops_to_remove, (int, float))
            or math.isnan(flops_to_remove)):
        raise ValueError(f'flops_to_remove must be a number, got {flops_to_remove!r}')
    for name, spec in layers.items():
        if not isinstance(spec, LayerSpectrum):
            raise ValueError(f'layers[{name!r}] must be a LayerSpectrum, got {type(spec).__name__}')
    if flops_to_remove <= 0:
        return {}
    names = list(layers)
    curves = [_LayerCurve(layers[name], min_rank, rank_multiple) for name in names]
    reachable = math.fsum(c.max_saved for c in curves)
    if flops_to_remove > reachable:
        raise ValueError(
            f'cannot remove {flops_to_remove:.6g} FLOPs: factorizing every layer at its smallest '
            f'allowed rank (min_rank={min_rank}, rank_multiple={rank_multiple}) removes at most '
            f'{reachable:.6g} FLOPs ({reachable:.0f})')

    # state[i]: index into curves[i].ranks (-1 = unfactorized).
    state = [-1] * len(curves)
    heap = [(c.slope(0), i, 0) for i, c in enumerate(curves) if len(c.hull) > 1]
    heapq.heapify(heap)
    removed = 0.0
    last = None
    while removed < flops_to_remove and heap:
        _, i, j = heapq.heappop(heap)
        curve = curves[i]
        before, after = curve.hull[j], curve.hull[j + 1]
        removed += curve.point(after)[0] - curve.point(before)[0]
        state[i] = after
        last = (i, before, after)
        if j + 2 < len(curve.hull):
            heapq.heappush(heap, (curve.slope(j + 1), i, j + 1))

    def total_removed() -> float:
        return math.fsum(c.point(s)[0] for c, s in zip(curves, state))

    # Complete the budget with the cheapest single move instead of blindly the last one: undo
    # the last move, then over all layers take the move (from the current rank to any smaller
    # allowed rank, or into factorization) that covers the deficit at the least energy lost.
    # This contains "the last move, trimmed to the largest rank that suffices".
    if last is not None and total_removed() >= flops_to_remove:
        i, before, _ = last
        state[i] = before
        base = total_removed()
        best = None
        for i, (curve, s) in enumerate(zip(curves, state)):
            x0, y0 = curve.point(s)
            # Deeper points save and lose monotonically more: the first that suffices is best.
            idx = bisect.bisect_left(curve.saved, flops_to_remove - base + x0, lo=s + 1)
            if idx >= len(curve.ranks):
                continue
            cost = curve.lost[idx] - y0
            if best is None or cost < best[0]:
                best = (cost, i, idx)
        if best is None:  # rounding only: redo the greedy's last move
            best = (0.0, last[0], last[2])
        _, i, idx = best
        state[i] = idx
        while total_removed() < flops_to_remove and state[i] + 1 < len(curves[i].ranks):
            state[i] += 1  # rounding: the sum fell just short

    # Give back surplus: undo single steps while the budget still holds, largest gain first.
    while True:
        surplus = total_removed() - flops_to_remove
        best = None
        for i, (curve, s) in enumerate(zip(curves, state)):
            if s < 0:
                continue
            up = s - 1  # next larger rank, or -1 = unfactorized
            cost = curve.point(s)[0] - curve.point(up)[0]
            if cost > surplus:
                continue
            gain = curve.point(s)[1] - curve.point(up)[1]
            if best is None or gain > best[0]:
                best = (gain, i, up)
        if best is None:
            break
        _, i, up = best
        previous, state[i] = state[i], up
        if total_removed() < flops_to_remove:  # rounding put it just under: keep the step
            state[i] = previous
            break
    return {name: curve.ranks[s] for name, curve, s in zip(names, curves, state) if s >= 0}


def estimated_flops_removed(layers: Mapping[str, LayerSpectrum],
                            ranks: Mapping[str, int]) -> float:
    """FLOPs removed by factorizing ``ranks`` (``{name: rank}``) under the model of
    :func:`allocate_ranks_by_energy`; ranks that do not pay count 0."""
    return math.fsum(layers[name].flops_saved(k) for name, k in ranks.items())


def normalized_energy_kept(layers: Mapping[str, LayerSpectrum],
                           ranks: Mapping[str, int]) -> float:
    """Σ over ``layers`` of the normalized energy kept (1 for each layer absent from
    ``ranks``); the objective :func:`allocate_ranks_by_energy` maximizes."""
    return math.fsum(spec.energy_kept(ranks.get(name)) for name, spec in layers.items())


def rank_plan_from_ranks(layers: Mapping[str, LayerSpectrum], ranks: Mapping[str, int],
                         min_rank: int = 1, rank_multiple: int = 1) -> RankPlan:
    """A :class:`RankPlan` for per-layer ranks (e.g. from :func:`allocate_ranks_by_energy`).

    Each planned layer gets ``ratio = 1 − k/min(m, n)``, descriptive only: consumers use
    ``LayerRank.rank``. ``rank_for_ratio`` maps it back to k except for k = ``min_rank`` off
    the ``rank_multiple`` grid (it rounds to the grid before clamping). The other layers of
    ``layers`` go to ``plan.skipped`` with the reason; ``min_rank`` and ``rank_multiple`` only
    tell apart the layers that no allowed rank can factorize.

    Raises:
        ValueError: a name not in ``layers``, or a rank outside [1, min(m, n)] or one where
            factorizing would not reduce parameters.
    """
    _check_min_rank(min_rank)
    check_rank_multiple(rank_multiple)
    unknown = [name for name in ranks if name not in layers]
    if unknown:
        raise ValueError(f'ranks given for layers not in `layers`: {unknown}')
    plan = RankPlan()
    for name, spec in layers.items():
        m, n = spec.out_features, spec.in_features
        if name in ranks:
            k = ranks[name]
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= spec.full_rank:
                raise ValueError(f'rank for {name!r} must be an int in [1, {spec.full_rank}], '
                                 f'got {k!r}')
            if not factorization_pays(m, n, k):
                raise ValueError(f'rank {k} for {name!r} ({m}x{n}) would not reduce parameters: '
                                 f'{k * (m + n)} >= {m * n}')
            plan.layers[name] = LayerRank(name, m, n, k, 1.0 - k / spec.full_rank)
            continue
        smallest = allowed_ranks(m, n, min_rank, rank_multiple)[0]
        if not factorization_pays(m, n, smallest):
            plan.skipped[name] = (f'factorizing would not reduce parameters: rank {smallest} of '
                                  f'{m}x{n} gives {smallest * (m + n)} >= {m * n}')
        elif spec.flops_saved(smallest) <= 0:
            plan.skipped[name] = 'factorizing would not remove FLOPs (no FLOPs counted)'
        else:
            plan.skipped[name] = 'not factorized: the FLOPs budget is met by keeping more energy'
    return plan
