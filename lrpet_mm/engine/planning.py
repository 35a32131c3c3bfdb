"""Rank planning: the one rule the hook and the tools use, for a uniform rank ratio or a FLOPs
budget (counted with ``mmengine.analysis``), for a component (e.g. the backbone) or the whole
model."""
import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from ..lowrank import RankPlan, TargetSelection, factorization_pays, plan_ranks
from ..lowrank.batchnorm import has_running_stats, is_batch_norm
from ..lowrank.factorize import apply_factorized_structure
from .flops import budget_forward, count_flops, flops_by_module


@dataclass
class FlopsPlanResult:
    """A rank plan chosen for a FLOPs budget.

    Attributes:
        plan: the ranks.
        rank_ratio: the uniform ratio p it uses (before ``layer_ratios`` overrides).
        flops_before: budgeted FLOPs (the scope component, or the whole model's test-time
            forward for a whole-model scope) at ``input_shape``.
        flops_after: the same FLOPs of the factorized model, counted by mmengine.analysis.
        target_reduction: the requested reduction r (flops_after ≈ (1 − r)·flops_before).
        input_shape: (C, H, W) the FLOPs were counted at.
        counted: what was budgeted, in words: ``'the backbone'`` or ``'the whole model'``.
    """
    plan: RankPlan
    rank_ratio: float
    flops_before: int
    flops_after: int
    target_reduction: float
    input_shape: Tuple[int, ...]
    counted: str = 'the backbone'

    @property
    def reduction(self) -> float:
        return 1.0 - self.flops_after / self.flops_before

    def to_dict(self) -> dict:
        return dict(rank_ratio=self.rank_ratio, flops_before=self.flops_before,
                    flops_after=self.flops_after, target_reduction=self.target_reduction,
                    reduction=self.reduction, input_shape=list(self.input_shape),
                    counted=self.counted)


def factorized_copy(model: nn.Module, plan: RankPlan, folded: Mapping[str, str]) -> nn.Module:
    """A deep copy of ``model`` with the factorized structure of ``plan`` (no weights)."""
    ranks = {name: layer.rank for name, layer in plan.layers.items()}
    norms = {conv: norm for conv, norm in folded.items() if conv in plan.layers}
    return apply_factorized_structure(copy.deepcopy(model), ranks, norms)


def budget_scope(scope: Union[str, Sequence[str]]) -> str:
    """The module a FLOPs budget counts: the component ``scope`` names, or '' (the whole
    model's test-time forward) for a whole-model scope ('' or a list of components)."""
    return scope if isinstance(scope, str) else ''


def budgeted_flops(model: nn.Module, scope: Union[str, Sequence[str]],
                   input_shape: Sequence[int]) -> Tuple[Dict[str, int], Callable[[str], str]]:
    """``(by_module, key)``: the FLOPs of what a budget for ``scope`` counts, per submodule
    (``by_module['']`` is the total), and the key of a model layer name in it (see
    :func:`~lrpet_mm.engine.flops.budget_forward`)."""
    counted = budget_scope(scope)
    module, key = budget_forward(model, counted, input_shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # tracer warnings about Python control flow
            return flops_by_module(module, input_shape), key
    except Exception as e:
        what = (f'the {counted!r} component on one tensor' if counted
                else f"{type(model).__name__}'s test-time forward")
        raise ValueError(f'cannot count the FLOPs of {what} at input {tuple(input_shape)} '
                         f'for scope {scope!r}: tracing failed ({type(e).__name__}: {e}); use a '
                         "component scope that runs on one tensor (e.g. 'backbone')") from e


def without_unused_layers(selection: TargetSelection, by_module: Mapping[str, int],
                          key: Callable[[str], str]) -> TargetSelection:
    """``selection`` without the targets that the counted forward never runs (e.g. an
    auxiliary head, which only trains): they cost nothing at test time, so they get no rank
    (moved to ``skipped`` with the reason)."""
    kept, skipped = [], dict(selection.skipped)
    for target in selection.targets:
        if by_module.get(key(target.name), 0) > 0:
            kept.append(target)
        else:
            skipped[target.name] = ('not run by the test-time forward (e.g. an auxiliary head '
                                    'that only trains): it costs nothing at test time')
    if not kept:
        raise ValueError('none of the selected layers runs in the test-time forward; '
                         f'skipped: {skipped}')
    return TargetSelection(kept, skipped)


def plan_ranks_for_flops(model: nn.Module, scope: Union[str, Sequence[str]],
                         selection: TargetSelection,
                         flops_reduction: float, input_shape: Sequence[int],
                         layer_ratios: Optional[Mapping[str, float]] = None,
                         min_rank: int = 1, tolerance: float = 0.01,
                         rank_multiple: int = 1,
                         by_module: Optional[Mapping[str, int]] = None) -> FlopsPlanResult:
    """Choose one rank ratio so the factorized model's budgeted FLOPs become (1 − r)×.

    What is budgeted (:func:`budget_scope`): for a component scope (e.g. ``'backbone'``), that
    component run alone on one (1, C, H, W) tensor; for a whole-model scope ('' or a list of
    components), the whole model's test-time tensor forward (for a two-stage detector with a
    fixed number of proposals), as the report counts it.

    The ratio is found by bisection on a per-layer FLOPs model (each conv's or linear layer's
    counted FLOPs, tokens × in × out for a linear layer, scaled by k(m + n)/(m·n) when
    factorized; a folded BN's FLOPs disappear). The factorized structure is then counted with
    ``mmengine.analysis`` and, if it misses the target by more than ``tolerance`` (relative to
    the target FLOPs), the model's offset is corrected and the search repeated. FLOPs of
    layers that are not targets (frozen, excluded, unsupported, predictors) count in the total.

    Args:
        model: the (unwrapped) model.
        scope: the settings' scope (plan names are model-relative).
        selection: the targets in scope (from ``select_targets``).
        flops_reduction: r ∈ (0, 1).
        input_shape: (C, H, W).
        layer_ratios, min_rank, rank_multiple: as in
            :func:`~lrpet_mm.lowrank.ranks.plan_ranks` (the bisection runs over the ratio, so
            with ``rank_multiple`` > 1 the rounded ranks still meet the budget).
        by_module: :func:`budgeted_flops` of ``model`` if already counted.

    Raises:
        ValueError: the target cannot be reached even at the smallest ranks (the message
            gives the reachable maximum).
    """
    input_shape = tuple(int(v) for v in input_shape)
    counted = budget_scope(scope)
    if by_module is None:
        by_module, key = budgeted_flops(model, scope, input_shape)
    else:
        key = budget_forward(model, counted, input_shape)[1]
    total = by_module['']
    shapes = selection.shapes()
    folded = {t.name: t.norm_name for t in selection.targets
              if t.norm is not None and is_batch_norm(t.norm) and has_running_stats(t.norm)}
    conv_flops = {name: by_module.get(key(name), 0) for name in shapes}
    norm_flops = {name: by_module.get(key(norm), 0) for name, norm in folded.items()}
    target = (1.0 - flops_reduction) * total
    what = f'the {counted} FLOPs' if counted else "the whole model's test-time FLOPs"
    shown = scope if isinstance(scope, str) else list(scope)

    def predicted(plan: RankPlan) -> float:
        saved = 0.0
        for name, layer in plan.layers.items():
            saved += conv_flops[name] * (1.0 - layer.params_after / layer.params_before)
            saved += norm_flops.get(name, 0)
        return total - saved

    def search(goal: float, below: bool = False) -> Tuple[float, RankPlan]:
        """Bisection on the uniform ratio: the plan whose predicted FLOPs are closest to
        ``goal`` (``below``: closest without exceeding it)."""
        lo, hi = 0.0, 0.999
        best = None
        for _ in range(40):
            mid = (lo + hi) / 2
            plan = plan_ranks(shapes, mid, layer_ratios, min_rank, rank_multiple)
            value = predicted(plan)
            if (not below or value <= goal) and (
                    best is None or abs(value - goal) < abs(best[2] - goal)):
                best = (mid, plan, value)
            if value > goal:
                lo = mid
            else:
                hi = mid
        if best is None:  # nothing below the goal: the smallest ranks
            return 0.999, plan_ranks(shapes, 0.999, layer_ratios, min_rank, rank_multiple)
        return best[0], best[1]

    def top_up(plan: RankPlan, goal: float) -> RankPlan:
        """Raise single layers' ranks by one step while the prediction stays <= ``goal``,
        the largest step that fits first. A uniform ratio moves every layer of one shape at
        once (with ``rank_multiple`` by a whole multiple), a jump that can exceed the
        tolerance when few layer shapes carry the FLOPs (e.g. a whole detector's FPN and RPN
        convs)."""
        step = rank_multiple
        gap = goal - predicted(plan)
        while True:
            fits = []
            for name, layer in plan.layers.items():
                m, n = layer.out_features, layer.in_features
                rank = layer.rank + step
                if rank > min(m, n) or not factorization_pays(m, n, rank):
                    continue
                cost = conv_flops[name] * step * (m + n) / (m * n)
                if 0 < cost <= gap:
                    fits.append((cost, name))
            if not fits:
                return plan
            cost, name = max(fits)
            plan.layers[name].rank += step
            gap -= cost

    def within(measured: int) -> bool:
        return abs(measured - target) <= tolerance * target

    def count(plan: RankPlan) -> int:
        compact = factorized_copy(model, plan, folded)
        return count_flops(budget_forward(compact, counted, input_shape)[0], input_shape)

    floor = predicted(plan_ranks(shapes, 0.999, layer_ratios, min_rank, rank_multiple))
    if floor > target * (1 + tolerance):
        raise ValueError(
            f'flops_reduction {flops_reduction} cannot be reached in scope {shown!r}: '
            f'factorizing every target at its smallest rank removes at most '
            f'{100 * (1 - floor / total):.1f} % of {what} ({total} at input {input_shape}; '
            f'{len(shapes)} targets; {len(selection.skipped)} layers left alone still count, '
            f'e.g. {list(selection.skipped.items())[:2]})')
    goal = target
    for _ in range(3):
        ratio, plan = search(goal)
        measured = count(plan)
        if within(measured):
            break
        goal -= measured - predicted(plan)  # correct the model's offset, search again
    else:  # one uniform step is larger than the tolerance: fill the gap layer by layer
        ratio, plan = search(goal, below=True)
        plan = top_up(plan, goal)
        measured = count(plan)
    plan.skipped.update(selection.skipped)
    return FlopsPlanResult(plan, ratio, total, measured, flops_reduction, input_shape,
                           f'the {counted}' if counted else 'the whole model')


def plan_targets(model: nn.Module, selection: TargetSelection, settings,
                 input_shape: Optional[Sequence[int]] = None
                 ) -> Tuple[RankPlan, Optional[FlopsPlanResult]]:
    """The one planning rule of the hook and the tools: ranks for the selected targets from
    ``settings`` (an :class:`~lrpet_mm.engine.settings.LRPETSettings`): its uniform
    ``rank_ratio`` (with ``layer_ratios`` overrides), or its ``flops_reduction`` of the
    budgeted FLOPs at ``input_shape`` (then also returns the :class:`FlopsPlanResult`).
    With a whole-model scope, layers the test-time forward never runs (auxiliary heads) get
    no rank. ``plan.skipped`` lists every target left alone with the reason.
    """
    s = settings
    by_module = None
    if s.whole_model:
        if input_shape is None:
            raise ValueError('a whole-model scope needs the input shape its test-time forward '
                             'is traced at')
        by_module, key = budgeted_flops(model, s.scope, input_shape)
        selection = without_unused_layers(selection, by_module, key)
    if s.flops_reduction is not None:
        if input_shape is None:
            raise ValueError('flops_reduction needs the input shape FLOPs are counted at')
        result = plan_ranks_for_flops(model, s.scope, selection, s.flops_reduction,
                                      input_shape, s.layer_ratios, s.min_rank,
                                      rank_multiple=s.rank_multiple, by_module=by_module)
        return result.plan, result
    plan = plan_ranks(selection.shapes(), s.rank_ratio, s.layer_ratios, s.min_rank,
                      s.rank_multiple)
    plan.skipped.update(selection.skipped)
    return plan, None
