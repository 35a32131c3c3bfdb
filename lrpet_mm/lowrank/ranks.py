"""Rank planning: which rank k each layer keeps (pure PyTorch / Python).

For a layer whose weight is viewed as an (m, n) matrix and a rank pruning ratio p ∈ [0, 1):
k = floor((1 − p) · min(m, n)), at least ``min_rank``; with ``rank_multiple`` q > 1, k is then
rounded to the nearest multiple of q (at least q), because CPU and GPU convolution kernels run
inner widths that are multiples of 8 markedly faster (``benchmarks/bench_rank_alignment.py``:
layer1's 3×3 pair of ResNet-50 at 800×1333 runs ~40 % faster at k = 24 than at k = 26). A layer is
left alone when the factorized pair would not have fewer parameters than the original:
k·(m + n) ≥ m·n.
"""
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple


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
