"""Rank planning: the one rule the hook and the tools use, for a uniform rank ratio or a FLOPs
budget (counted with ``mmengine.analysis``)."""
import copy
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

from torch import nn

from ..lowrank import RankPlan, TargetSelection, get_scope_module, plan_ranks
from ..lowrank.batchnorm import has_running_stats, is_batch_norm
from ..lowrank.factorize import apply_factorized_structure
from .flops import count_flops, flops_by_module


@dataclass
class FlopsPlanResult:
    """A rank plan chosen for a FLOPs budget.

    Attributes:
        plan: the ranks.
        rank_ratio: the uniform ratio p it uses (before ``layer_ratios`` overrides).
        flops_before: FLOPs of the scope module at ``input_shape``.
        flops_after: FLOPs of the factorized scope module, counted by mmengine.analysis.
        target_reduction: the requested reduction r (flops_after ≈ (1 − r)·flops_before).
        input_shape: (C, H, W) the FLOPs were counted at.
    """
    plan: RankPlan
    rank_ratio: float
    flops_before: int
    flops_after: int
    target_reduction: float
    input_shape: Tuple[int, ...]

    @property
    def reduction(self) -> float:
        return 1.0 - self.flops_after / self.flops_before

    def to_dict(self) -> dict:
        return dict(rank_ratio=self.rank_ratio, flops_before=self.flops_before,
                    flops_after=self.flops_after, target_reduction=self.target_reduction,
                    reduction=self.reduction, input_shape=list(self.input_shape))


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
                         rank_multiple: int = 1) -> FlopsPlanResult:
    """Choose one rank ratio so the factorized scope module has (1 − r)× the FLOPs.

    The ratio is found by bisection on a per-layer FLOPs model (each conv's or linear layer's
    counted FLOPs, tokens × in × out for a linear layer, scaled by k(m + n)/(m·n) when
    factorized; a folded BN's FLOPs disappear). The factorized structure is then counted with
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
            with ``rank_multiple`` > 1 the rounded ranks still meet the budget).

    Raises:
        ValueError: the target cannot be reached even at the smallest ranks (the message
            gives the reachable maximum).
    """
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

    def search(goal: float) -> Tuple[float, RankPlan]:
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
    return FlopsPlanResult(plan, ratio, total, measured, flops_reduction, input_shape)


def plan_targets(model: nn.Module, selection: TargetSelection, settings,
                 input_shape: Optional[Sequence[int]] = None
                 ) -> Tuple[RankPlan, Optional[FlopsPlanResult]]:
    """The one planning rule of the hook and the tools: ranks for the selected targets from
    ``settings`` (an :class:`~lrpet_mm.engine.settings.LRPETSettings`): its uniform
    ``rank_ratio`` (with ``layer_ratios`` overrides), or its ``flops_reduction`` of the
    ``scope`` module at ``input_shape`` (then also returns the :class:`FlopsPlanResult`).
    ``plan.skipped`` lists every target left alone with the reason.
    """
    s = settings
    if s.flops_reduction is not None:
        if input_shape is None:
            raise ValueError('flops_reduction needs the input shape FLOPs are counted at')
        result = plan_ranks_for_flops(get_scope_module(model, s.scope), s.scope, selection,
                                      s.flops_reduction, input_shape, s.layer_ratios,
                                      s.min_rank, rank_multiple=s.rank_multiple)
        return result.plan, result
    plan = plan_ranks(selection.shapes(), s.rank_ratio, s.layer_ratios, s.min_rank,
                      s.rank_multiple)
    plan.skipped.update(selection.skipped)
    return plan, None
