"""LRPETSettings: the one definition of LRPET's training settings, validated once.

The hook is built from them (``LRPETHook(**settings)``), stores them in checkpoint meta, and
``tools/factorize.py`` / the report read them back from the training config
(:meth:`LRPETSettings.from_config`), so the tools plan exactly as training did.
"""
import dataclasses
import numbers
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

from ..lowrank import (
    BN_RECOVERIES,
    BNR_EPS,
    RankPlan,
    TargetSelection,
    check_rank_multiple,
    check_rank_ratio,
    select_targets,
)
from ..lowrank.targets import (
    FROZEN_POLICIES,
    PREDICTOR_POLICIES,
    UNPAIRED_POLICIES,
    compile_patterns,
)
from .input_shape import check_input_shape, resolve_input_shape
from .planning import FlopsPlanResult, plan_targets

Patterns = Union[None, str, Sequence[str]]


def check_flops_reduction(value) -> float:
    """A FLOPs reduction r must be a number in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f'flops_reduction must be a number in (0, 1), got {value!r}')
    return float(value)


def _patterns(value: Patterns, what: str) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    values = (value, ) if isinstance(value, str) else tuple(value)
    for pattern in values:
        if not isinstance(pattern, str):
            raise TypeError(f'{what} must be regex strings, got {pattern!r}')
    compile_patterns(values, what)
    return values


def _choice(value, allowed: Sequence, what: str):
    if value not in allowed:
        raise ValueError(f'{what} must be one of {tuple(allowed)}, got {value!r}')
    return value


@dataclass(frozen=True)
class LRPETSettings:
    """What LRPET projects, to which rank, when and how.

    Args:
        rank_ratio (float, optional): rank pruning ratio p ∈ [0, 1); a layer with an (m, n)
            weight keeps k = floor((1 − p)·min(m, n)) singular values. Give exactly one of
            ``rank_ratio`` and ``flops_reduction``. Defaults to None.
        flops_reduction (float, optional): r ∈ (0, 1): choose one rank ratio so that the
            budgeted FLOPs become (1 − r)×, counted by mmengine.analysis at
            ``flops_input_shape`` (within ±1 %): the ``scope`` component's FLOPs for a
            component scope, the whole model's test-time FLOPs (its tensor forward, as the
            report counts them) for a whole-model scope. FLOPs of layers left alone (frozen,
            excluded, predictors) still count in the total, and a budget that the targets
            cannot reach is refused before training with the reachable maximum.
            Defaults to None.
        flops_input_shape (tuple[int], optional): (C, H, W) for FLOPs counting. Defaults to
            None: the config's ``crop_size`` (mmseg) or test ``Resize`` scale (mmdet).
        interval (int): project every ``interval`` epochs or iterations. Defaults to 1.
        by_epoch (bool, optional): count ``interval`` in epochs (True) or iterations (False).
            Defaults to None: epochs under ``EpochBasedTrainLoop``, iterations otherwise.
        energy_transfer (bool): rescale the kept singular values to keep ‖W‖_F.
            Defaults to True.
        bn_rectify (bool): BN rectification for convs followed by a BatchNorm.
            Defaults to True.
        scope (str | list[str]): what is projected: the dotted path of one component (e.g.
            'backbone'), or the whole model: '' or a list of its components (e.g.
            ``['backbone', 'neck', 'rpn_head', 'roi_head']``). With a whole-model scope,
            ``flops_reduction`` budgets the whole model's test-time FLOPs and layers that do
            not run at test time (auxiliary heads) are left alone. Defaults to 'backbone'.
        include (str | list[str], optional): regexes on full module names; only matching
            layers in scope are projected. Each must match a conv or linear layer. Defaults to
            None.
        exclude (str | list[str], optional): regexes of layers to leave alone. Defaults to
            None.
        frozen (str): layers whose weight does not require grad (frozen stages, e.g. mmdet's
            ``frozen_stages=1``): 'skip' (logged; projecting them would truncate them once
            and they could never re-learn) or 'project'. Defaults to 'skip'.
        layer_ratios (dict[str, float], optional): ``{regex: rank_ratio}`` per-layer overrides,
            first match wins. Defaults to None.
        min_rank (int): smallest rank kept. Defaults to 1.
        rank_multiple (int): round every rank to a multiple of this (8 suits CPU and GPU
            convolution kernels: the factorized model runs faster at the same FLOPs); with
            ``flops_reduction`` the budget is still met. 1 keeps the paper's ranks.
            Defaults to 1.
        unpaired (str, optional): with ``bn_rectify``, what to do with a conv whose output no
            BatchNorm consumes: 'skip' (logged), 'project' (without BNR; its bias goes to the
            second factor) or 'error'. A conv followed by a GroupNorm/LayerNorm raises unless
            'project'. Linear layers are always projected without BNR, whatever this says.
            Defaults to None: 'project' for a whole-model scope (FPN and RPN convs have no
            BatchNorm), 'skip' for a component scope.
        predictors (str): a head's final predictor (``fc_cls``/``fc_reg``,
            ``rpn_cls``/``rpn_reg``, ``conv_seg``..., see
            :data:`~lrpet_mm.lowrank.targets.PREDICTOR_PATTERN`): 'skip' (logged: projecting
            it would confine its outputs to a rank-k subspace, for a small share of the
            FLOPs) or 'project'.
            Defaults to 'skip'.
        bn_recovery (str): how BN rectification recovers the conv weight from the projected
            BN-folded weight ΓW: 'in_span' (W ← α·W·V_kV_kᵀ with V_k the kept right singular
            subspace of ΓW: Γ·W_new is exactly the energy-transferred projection, no ε, and a
            channel whose BN scale is ~0 keeps its in-span part) or 'eq16' (the paper's
            W ← (Γ² + εI)⁻¹ΓW'_k, which shrinks channels with a small BN scale at every
            projection and zeroes those with a zero scale for good). Defaults to 'in_span'.
        bnr_eps (float): ε of eq. 16 (``bn_recovery='eq16'`` only). Defaults to 1e-5.
        project_before_val (bool): evaluate during training with projected weights: when
            validation falls between two projections, the weights are projected for
            validation (and for the best checkpoint saved after it) and the training weights
            restored when validation ends. Defaults to True.
    """
    rank_ratio: Optional[float] = None
    flops_reduction: Optional[float] = None
    flops_input_shape: Optional[Tuple[int, int, int]] = None
    interval: int = 1
    by_epoch: Optional[bool] = None
    energy_transfer: bool = True
    bn_rectify: bool = True
    scope: Union[str, Sequence[str]] = 'backbone'
    include: Patterns = None
    exclude: Patterns = None
    frozen: str = 'skip'
    layer_ratios: Optional[Dict[str, float]] = None
    min_rank: int = 1
    rank_multiple: int = 1
    unpaired: Optional[str] = None
    predictors: str = 'skip'
    bn_recovery: str = 'in_span'
    bnr_eps: float = BNR_EPS
    project_before_val: bool = True

    def __post_init__(self) -> None:
        """Validate every field (a ValueError / TypeError naming the field and the value) and
        store it in one canonical form (floats, tuples)."""
        if (self.rank_ratio is None) == (self.flops_reduction is None):
            raise ValueError('give exactly one of rank_ratio and flops_reduction, got '
                             f'rank_ratio={self.rank_ratio!r}, '
                             f'flops_reduction={self.flops_reduction!r}')
        canonical = dict(
            rank_ratio=None if self.rank_ratio is None else check_rank_ratio(self.rank_ratio),
            flops_reduction=(None if self.flops_reduction is None
                             else check_flops_reduction(self.flops_reduction)),
            flops_input_shape=(None if self.flops_input_shape is None else check_input_shape(
                self.flops_input_shape, 'flops_input_shape')),
            include=_patterns(self.include, 'include'),
            exclude=_patterns(self.exclude, 'exclude'),
            layer_ratios=self._check_layer_ratios(),
            bnr_eps=self._check_bnr_eps(),
            scope=self._check_scope())
        whole_model = not isinstance(canonical['scope'], str) or canonical['scope'] == ''
        canonical['unpaired'] = (self.unpaired if self.unpaired is not None
                                 else 'project' if whole_model else 'skip')
        for name in ('interval', 'min_rank'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f'{name} must be an int >= 1, got {value!r}')
        check_rank_multiple(self.rank_multiple)
        _choice(self.by_epoch, (None, True, False), 'by_epoch')
        for name in ('energy_transfer', 'bn_rectify', 'project_before_val'):
            _choice(getattr(self, name), (True, False), name)
        _choice(self.frozen, FROZEN_POLICIES, 'frozen')
        _choice(canonical['unpaired'], UNPAIRED_POLICIES, 'unpaired')
        _choice(self.predictors, PREDICTOR_POLICIES, 'predictors')
        _choice(self.bn_recovery, BN_RECOVERIES, 'bn_recovery')
        for name, value in canonical.items():
            object.__setattr__(self, name, value)

    def _check_layer_ratios(self) -> Optional[Dict[str, float]]:
        if not self.layer_ratios:
            return None
        if not isinstance(self.layer_ratios, dict):
            raise TypeError(f'layer_ratios must be a dict {{regex: rank_ratio}}, got '
                            f'{self.layer_ratios!r}')
        compile_patterns(self.layer_ratios, 'layer_ratios')
        return {pattern: check_rank_ratio(ratio, f'layer_ratios[{pattern!r}]')
                for pattern, ratio in self.layer_ratios.items()}

    def _check_bnr_eps(self) -> float:
        if (isinstance(self.bnr_eps, bool) or not isinstance(self.bnr_eps, (int, float))
                or not self.bnr_eps > 0):
            raise ValueError(f'bnr_eps must be > 0, got {self.bnr_eps!r}')
        return float(self.bnr_eps)

    def _check_scope(self) -> Union[str, Tuple[str, ...]]:
        if self.scope is None or isinstance(self.scope, str):
            return self.scope or ''
        if not isinstance(self.scope, (list, tuple)) or not self.scope or not all(
                isinstance(c, str) and c for c in self.scope):
            raise TypeError("scope must be a module path ('' = the whole model) or a "
                            f'non-empty list of component names, got {self.scope!r}')
        if len(set(self.scope)) != len(self.scope):
            raise ValueError(f'scope lists a component twice: {list(self.scope)}')
        return tuple(self.scope)

    @property
    def whole_model(self) -> bool:
        """Whether the scope is the whole model ('' or a list of components): budgets count
        the whole model's test-time forward."""
        return not isinstance(self.scope, str) or self.scope == ''

    def describe_scope(self) -> str:
        """The scope in words, for log lines."""
        if isinstance(self.scope, str):
            return repr(self.scope) if self.scope else 'the whole model'
        return f'the whole model ({", ".join(self.scope)})'

    @classmethod
    def from_config(cls, cfg) -> Optional['LRPETSettings']:
        """The settings of the ``LRPETHook`` in ``cfg.custom_hooks``; None if it has none."""
        for hook in cfg.get('custom_hooks', None) or []:
            if hook.get('type') == 'LRPETHook':
                return cls(**{k: v for k, v in hook.items() if k not in ('type', 'priority')})
        return None

    def replace(self, **changes) -> 'LRPETSettings':
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-able form (stored in checkpoint meta)."""
        data = dataclasses.asdict(self)
        for name in ('flops_input_shape', 'include', 'exclude'):
            if data[name] is not None:
                data[name] = list(data[name])
        if not isinstance(data['scope'], str):
            data['scope'] = list(data['scope'])
        return data

    def select_targets(self, model) -> TargetSelection:
        """The layers these settings project in ``model`` (see
        :func:`~lrpet_mm.lowrank.targets.select_targets`)."""
        return select_targets(model, self.scope, self.include, self.exclude, self.bn_rectify,
                              self.unpaired, self.frozen, self.predictors)

    def plan(self, model, selection: TargetSelection, cfg=None
             ) -> Tuple[RankPlan, Optional[FlopsPlanResult]]:
        """Ranks for ``selection`` (see :func:`~lrpet_mm.engine.planning.plan_targets`);
        ``cfg`` gives the FLOPs input shape when ``flops_input_shape`` is not set (needed for
        a FLOPs budget, and for a whole-model scope, whose test-time forward is traced)."""
        shape = (resolve_input_shape(cfg, self.flops_input_shape, 'flops_input_shape')
                 if self.flops_reduction is not None or self.whole_model else None)
        return plan_targets(model, selection, self, shape)
