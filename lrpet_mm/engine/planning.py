"""Rank planning for a FLOPs budget (counted with ``mmengine.analysis``)."""
import copy
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from ..lowrank import ConvTarget, RankPlan, TargetSelection, get_scope_module, plan_ranks
from ..lowrank.batchnorm import bn_scale, has_running_stats, is_batch_norm
from ..lowrank.factorize import apply_factorized_structure
from ..lowrank.ranks import LayerSpectrum, allocate_ranks_by_energy, rank_plan_from_ranks
from .flops import count_flops, flops_by_module


@dataclass
class FlopsPlanResult:
    """A rank plan chosen for a FLOPs budget.

    Attributes:
        plan: the ranks.
        rank_ratio: the uniform ratio p it uses (before ``layer_ratios`` overrides); None
            for ``rank_allocation='energy'`` (per-layer ranks).
        flops_before: FLOPs of the scope module at ``input_shape``.
        flops_after: FLOPs of the factorized scope module, counted by mmengine.analysis.
        target_reduction: the requested reduction r (flops_after ≈ (1 − r)·flops_before).
    """
    plan: RankPlan
    rank_ratio: Optional[float]
    flops_before: int
    flops_after: int
    target_reduction: float
    input_shape: Tuple[int, ...]
    rank_allocation: str = 'uniform'

    @property
    def reduction(self) -> float:
        return 1.0 - self.flops_after / self.flops_before

    def to_dict(self) -> dict:
        return dict(rank_ratio=self.rank_ratio, flops_before=self.flops_before,
                    flops_after=self.flops_after, target_reduction=self.target_reduction,
                    reduction=self.reduction, input_shape=list(self.input_shape),
                    rank_allocation=self.rank_allocation)


def check_flops_reduction(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f'flops_reduction must be a number in (0, 1), got {value!r}')
    return float(value)


def factorized_copy(scope_module: nn.Module, scope: str, plan: RankPlan,
                    folded: Mapping[str, str]) -> nn.Module:
    """A deep copy of ``scope_module`` with the factorized structure of ``plan`` (no weights)."""
    prefix = f'{scope}.' if scope else ''
    ranks = {name[len(prefix):]: layer.rank for name, layer in plan.layers.items()}
    norms = {conv[len(prefix):]: norm[len(prefix):] for conv, norm in folded.items()
             if conv in plan.layers}
    return apply_factorized_structure(copy.deepcopy(scope_module), ranks, norms)


def plan_ranks_for_flops(scope_module: nn.Module, scope: str, selection: TargetSelection,
                         flops_reduction: float, input_shape: Sequence[int],
                         layer_ratios: Optional[Mapping[str, float]] = None,
                         min_rank: int = 1, tolerance: float = 0.01,
                         rank_multiple: int = 1,
                         rank_allocation: str = 'uniform') -> FlopsPlanResult:
    """Choose ranks so the factorized scope module has (1 − r)× the FLOPs.

    With ``rank_allocation='uniform'`` one rank ratio for all targets, found by bisection on a
    per-layer FLOPs model (each conv's or linear layer's counted FLOPs, tokens × in × out for a
    linear layer, scale by k(m + n)/(m·n) when factorized; a folded BN's FLOPs disappear);
    with ``'energy'`` per-layer ranks from
    :func:`~lrpet_mm.lowrank.ranks.allocate_ranks_by_energy` on the same model and the
    spectra of the BN-folded weights. Either way the factorized structure is then counted with
    ``mmengine.analysis`` and, if it misses the target by more than ``tolerance`` (relative to
    the target FLOPs), the model's offset is corrected and the search repeated. FLOPs of
    layers that are not targets (frozen, excluded, unsupported) count in the total.

    Args:
        scope_module: the module whose FLOPs are budgeted (e.g. the backbone); it must run on a
            single (1, C, H, W) tensor.
        scope: its dotted name in the model (plan names are model-relative).
        selection: the targets in scope (from ``select_targets``).
        flops_reduction: r ∈ (0, 1).
        input_shape: (C, H, W).
        layer_ratios, min_rank, rank_multiple: as in
            :func:`~lrpet_mm.lowrank.ranks.plan_ranks` (the bisection runs over the ratio, so
            with ``rank_multiple`` > 1 the rounded ranks still meet the budget);
            ``layer_ratios`` only with ``'uniform'``.
        rank_allocation: ``'uniform'`` or ``'energy'``.

    Raises:
        ValueError: the target cannot be reached even at the smallest ranks (the message
            gives the reachable maximum).
    """
    check_flops_reduction(flops_reduction)
    check_rank_allocation(rank_allocation)
    if rank_allocation == 'energy' and layer_ratios:
        raise ValueError("layer_ratios set per-layer ratios by hand; they cannot be combined "
                         "with rank_allocation='energy', which chooses them")
    input_shape = tuple(int(v) for v in input_shape)
    prefix = f'{scope}.' if scope else ''
    by_module = flops_by_module(scope_module, input_shape)
    total = by_module['']
    shapes = selection.shapes()
    folded = {t.name: t.norm_name for t in selection.targets
              if t.norm is not None and is_batch_norm(t.norm) and has_running_stats(t.norm)}
    conv_flops = {name: by_module.get(name[len(prefix):], 0) for name in shapes}
    norm_flops = {name: by_module.get(norm[len(prefix):], 0) for name, norm in folded.items()}
    target = (1.0 - flops_reduction) * total

    def predicted(plan: RankPlan) -> float:
        saved = 0.0
        for name, layer in plan.layers.items():
            saved += conv_flops[name] * (1.0 - layer.params_after / layer.params_before)
            saved += norm_flops.get(name, 0)
        return total - saved

    def uniform(goal: float) -> Tuple[float, RankPlan]:
        lo, hi = 0.0, 0.999
        best = None
        for _ in range(40):
            mid = (lo + hi) / 2
            plan = plan_ranks(shapes, mid, layer_ratios, min_rank, rank_multiple)
            value = predicted(plan)
            if best is None or abs(value - goal) < abs(best[2] - goal):
                best = (mid, plan, value)
            if value > goal:
                lo = mid
            else:
                hi = mid
        return best[0], best[1]

    if rank_allocation == 'energy':
        spectra = {t.name: LayerSpectrum.from_weight(folded_weight(t), conv_flops[t.name],
                                                     norm_flops.get(t.name, 0))
                   for t in selection.targets}

    def energy(goal: float) -> Tuple[None, RankPlan]:
        ranks = allocate_ranks_by_energy(spectra, max(total - goal, 0.0), min_rank,
                                         rank_multiple)
        return None, rank_plan_from_ranks(spectra, ranks, min_rank, rank_multiple)

    search = uniform if rank_allocation == 'uniform' else energy
    floor = predicted(plan_ranks(shapes, 0.999, layer_ratios, min_rank, rank_multiple))
    if floor > target * (1 + tolerance):
        left_alone = len(selection.skipped)
        raise ValueError(
            f'flops_reduction {flops_reduction} cannot be reached in scope {scope!r}: '
            f'factorizing every target at its smallest rank removes at most '
            f'{100 * (1 - floor / total):.1f} % of {total} FLOPs ({len(shapes)} targets; '
            f'{left_alone} convs left alone still count, e.g. '
            f'{list(selection.skipped.items())[:2]})')
    goal = target
    for _ in range(3):
        ratio, plan = search(goal)
        measured = count_flops(factorized_copy(scope_module, scope, plan, folded), input_shape)
        if abs(measured - target) <= tolerance * target:
            break
        goal -= measured - predicted(plan)  # correct the model's offset, search again
    plan.skipped.update(selection.skipped)
    return FlopsPlanResult(plan, ratio, total, measured, flops_reduction, input_shape,
                           rank_allocation)


def folded_weight(target: ConvTarget) -> Tensor:
    """The matrix LRPET projects for ``target``: its conv weight (m, n), with the BN scale
    folded in (Γ·W) where BN rectification is on."""
    matrix = target.conv.weight.detach().reshape(target.conv.weight.shape[0], -1)
    if target.rectify:
        matrix = bn_scale(target.norm).to(matrix)[:, None] * matrix
    return matrix


#: How :func:`plan_targets` spreads a FLOPs budget over the layers.
RANK_ALLOCATIONS = ('uniform', 'energy')


def check_rank_allocation(value: str) -> str:
    if value not in RANK_ALLOCATIONS:
        raise ValueError(f'rank_allocation must be one of {RANK_ALLOCATIONS}, got {value!r}')
    return value


def plan_targets(model: nn.Module, selection: TargetSelection, scope: str,
                 rank_ratio: Optional[float] = None, flops_reduction: Optional[float] = None,
                 input_shape: Optional[Sequence[int]] = None,
                 layer_ratios: Optional[Mapping[str, float]] = None, min_rank: int = 1,
                 rank_multiple: int = 1, rank_allocation: str = 'uniform'
                 ) -> Tuple[RankPlan, Optional['FlopsPlanResult']]:
    """The one planning rule of the hook and the factorize tool: ranks for the selected
    targets from a uniform ``rank_ratio`` (with ``layer_ratios`` overrides), or for a
    ``flops_reduction`` of the ``scope`` module at ``input_shape`` (then also returns the
    :class:`FlopsPlanResult`). ``plan.skipped`` lists every target left alone with the reason.
    """
    if (rank_ratio is None) == (flops_reduction is None):
        raise ValueError('give exactly one of rank_ratio and flops_reduction, got '
                         f'rank_ratio={rank_ratio!r}, flops_reduction={flops_reduction!r}')
    check_rank_allocation(rank_allocation)
    if flops_reduction is not None:
        if input_shape is None:
            raise ValueError('flops_reduction needs the input shape FLOPs are counted at')
        result = plan_ranks_for_flops(get_scope_module(model, scope), scope, selection,
                                      flops_reduction, input_shape, layer_ratios, min_rank,
                                      rank_multiple=rank_multiple,
                                      rank_allocation=rank_allocation)
        return result.plan, result
    if rank_allocation != 'uniform':
        raise ValueError(f"rank_allocation={rank_allocation!r} needs flops_reduction (a budget "
                         'to allocate); rank_ratio plans uniform ranks')
    plan = plan_ranks(selection.shapes(), rank_ratio, layer_ratios, min_rank, rank_multiple)
    plan.skipped.update(selection.skipped)
    return plan, None
