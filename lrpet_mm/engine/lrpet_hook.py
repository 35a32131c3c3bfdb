"""LRPETHook: low-rank projection with energy transfer during ordinary mmengine training."""
import copy
import inspect
import logging
from typing import Dict, Optional, Sequence, Union

import torch
from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop

from ..lowrank import (
    BN_RECOVERIES,
    LowRankProjector,
    ProjectionStats,
    RankPlan,
    check_rank_multiple,
    check_rank_ratio,
    select_targets,
)
from ..lowrank.batchnorm import BNR_EPS
from ..lowrank.targets import FROZEN_POLICIES, UNPAIRED_POLICIES
from .checkpoint_meta import BASES_KEY, META_KEY
from .input_shape import check_input_shape, resolve_input_shape
from .lrpet_ddp import DistributedProjectionStats, projection_strategy
from .planning import check_flops_reduction, check_rank_allocation, plan_targets

STATE_VERSION = 1


@HOOKS.register_module()
class LRPETHook(Hook):
    """Low-rank projection with energy transfer (LRPET) for mmengine runners.

    Every ``interval`` epochs (``EpochBasedTrainLoop``) or iterations
    (``IterBasedTrainLoop``) the weight of each targeted conv, viewed as an
    (n_out, n_in·kh·kw) matrix, and of each targeted linear layer ((out, in), e.g. a Swin
    block's ``qkv`` / ``proj`` / FFN layers; never BN-rectified) is replaced by its best rank-k
    approximation; the kept singular values are rescaled to preserve the Frobenius norm
    (energy transfer), and for a conv followed by a BatchNorm the BN-folded weight is
    projected and the conv weight recovered in closed form (BN rectification; by default
    inside the kept subspace, which cannot kill a channel, see ``bn_recovery``). Between
    projections training runs as usual on full-rank weights. A last projection at the end of
    training makes the saved weights exactly low-rank, ready for ``tools/factorize.py``.

    Usage (mmdet or mmseg config)::

        custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
        custom_hooks = [dict(type='LRPETHook', rank_ratio=0.5)]

    In distributed training all ranks hold bit-identical weights after every projection. How
    the work is spread is the model wrapper's job (:func:`~lrpet_mm.engine.lrpet_ddp.\
    projection_strategy`): every rank projects and then takes rank 0's weights, or, with
    ``model_wrapper_cfg=dict(type='LRPETDDP')``, the layers are split across ranks and each
    weight is broadcast from the rank that projected it.

    Checkpoints: regular (resume) checkpoints hold the training weights and the hook's state,
    so a resumed run continues bit for bit. With ``project_before_val`` the projected weights
    stay in the model until validation has ended, so the best checkpoint that
    ``CheckpointHook(save_best=...)`` saves after validating holds the validated (projected,
    low-rank) weights and factorizes like the final one (see :meth:`before_save_checkpoint`).
    ``EMAHook`` is refused: its averaged weights are not projected, so what it validates and
    saves would not be low-rank.

    Args:
        rank_ratio (float, optional): rank pruning ratio p ∈ [0, 1); a layer with an (m, n)
            weight keeps k = floor((1 − p)·min(m, n)) singular values. Give exactly one of
            ``rank_ratio`` and ``flops_reduction``. Defaults to None.
        flops_reduction (float, optional): r ∈ (0, 1): choose ranks so that the factorized
            ``scope`` module has (1 − r)× its FLOPs, counted by mmengine.analysis at
            ``flops_input_shape`` (within ±1 %); FLOPs of layers left alone (frozen,
            excluded) still count in the total, and a budget that the targets cannot reach
            is refused before training with the reachable maximum. Defaults to None.
        rank_allocation (str): how a ``flops_reduction`` budget is spread: 'uniform' (one
            rank ratio for all layers, the paper's) or 'energy' (per-layer ranks that keep the
            most normalized BN-folded energy per FLOP removed, chosen greedily over all
            targets at plan time). Defaults to 'uniform'.
        flops_input_shape (tuple[int], optional): (C, H, W) for FLOPs counting. Defaults to
            None: the config's ``crop_size`` (mmseg) or test ``Resize`` scale (mmdet).
        interval (int): project every ``interval`` epochs or iterations. Defaults to 1.
        by_epoch (bool, optional): count ``interval`` in epochs (True) or iterations (False).
            Defaults to None: epochs under ``EpochBasedTrainLoop``, iterations otherwise.
        energy_transfer (bool): rescale the kept singular values. Defaults to True.
        bn_rectify (bool): BN rectification for convs followed by a BatchNorm.
            Defaults to True.
        scope (str): dotted path of the submodule whose convs and linear layers are projected
            ('' = the whole model). Defaults to 'backbone'.
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
        unpaired (str): with ``bn_rectify``, what to do with a conv whose output no BatchNorm
            consumes: 'skip' (logged), 'project' (without BNR) or 'error'. A conv followed by a
            GroupNorm/LayerNorm raises unless 'project'. Linear layers are always projected
            without BNR, whatever this says. Defaults to 'skip'.
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
        warm_start (bool): start each layer's projection from the singular subspace of its
            previous projection (one subspace iteration, accepted only when a residual
            certificate bounds the error within 1e-4 of the optimum; otherwise the exact
            method). The bases are saved in checkpoints under ``'lrpet_bases'`` so a resumed
            run continues bit for bit. Defaults to True.
    """

    priority = 'NORMAL'  # before LoggerHook (BELOW_NORMAL) and CheckpointHook (VERY_LOW)

    def __init__(self,
                 rank_ratio: Optional[float] = None,
                 flops_reduction: Optional[float] = None,
                 flops_input_shape: Optional[Sequence[int]] = None,
                 rank_allocation: str = 'uniform',
                 interval: int = 1,
                 by_epoch: Optional[bool] = None,
                 energy_transfer: bool = True,
                 bn_rectify: bool = True,
                 scope: str = 'backbone',
                 include: Union[None, str, Sequence[str]] = None,
                 exclude: Union[None, str, Sequence[str]] = None,
                 frozen: str = 'skip',
                 layer_ratios: Optional[Dict[str, float]] = None,
                 min_rank: int = 1,
                 rank_multiple: int = 1,
                 unpaired: str = 'skip',
                 bn_recovery: str = 'in_span',
                 bnr_eps: float = BNR_EPS,
                 project_before_val: bool = True,
                 warm_start: bool = True,
                 **unknown) -> None:
        if unknown:
            accepted = [p for p in inspect.signature(LRPETHook.__init__).parameters
                        if p not in ('self', 'unknown')]
            raise TypeError(f'LRPETHook got unknown argument(s) {sorted(unknown)}; accepted '
                            f'arguments: {accepted}')
        if (rank_ratio is None) == (flops_reduction is None):
            raise ValueError('give exactly one of rank_ratio and flops_reduction, got '
                             f'rank_ratio={rank_ratio!r}, flops_reduction={flops_reduction!r}')
        if rank_ratio is not None:
            check_rank_ratio(rank_ratio)
        if flops_reduction is not None:
            check_flops_reduction(flops_reduction)
        if flops_input_shape is not None:
            flops_input_shape = check_input_shape(flops_input_shape, 'flops_input_shape')
        check_rank_allocation(rank_allocation)
        if rank_allocation != 'uniform' and flops_reduction is None:
            raise ValueError(f'rank_allocation={rank_allocation!r} needs flops_reduction (a '
                             'FLOPs budget to allocate); rank_ratio plans uniform ranks')
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f'interval must be an int >= 1, got {interval!r}')
        if by_epoch not in (None, True, False):
            raise ValueError(f'by_epoch must be None, True or False, got {by_epoch!r}')
        if unpaired not in UNPAIRED_POLICIES:
            raise ValueError(f'unpaired must be one of {UNPAIRED_POLICIES}, got {unpaired!r}')
        if frozen not in FROZEN_POLICIES:
            raise ValueError(f'frozen must be one of {FROZEN_POLICIES}, got {frozen!r}')
        if bn_recovery not in BN_RECOVERIES:
            raise ValueError(f'bn_recovery must be one of {BN_RECOVERIES}, got {bn_recovery!r}')
        if not isinstance(bnr_eps, (int, float)) or not bnr_eps > 0:
            raise ValueError(f'bnr_eps must be > 0, got {bnr_eps!r}')
        check_rank_multiple(rank_multiple)
        for ratio in (layer_ratios or {}).values():
            check_rank_ratio(ratio, 'layer_ratios value')
        if scope is not None and not isinstance(scope, str):
            raise TypeError(f'scope must be a module path string, got {scope!r}')
        self.rank_ratio = None if rank_ratio is None else float(rank_ratio)
        self.flops_reduction = None if flops_reduction is None else float(flops_reduction)
        self.flops_input_shape = flops_input_shape
        self.rank_allocation = rank_allocation
        self.flops_info: Optional[dict] = None
        self.interval = interval
        self.by_epoch = by_epoch
        self.energy_transfer = bool(energy_transfer)
        self.bn_rectify = bool(bn_rectify)
        self.scope = scope or ''
        self.include = include
        self.exclude = exclude
        self.frozen = frozen
        self.layer_ratios = dict(layer_ratios or {})
        self.min_rank = min_rank
        self.rank_multiple = rank_multiple
        self.unpaired = unpaired
        self.bn_recovery = bn_recovery
        self.bnr_eps = float(bnr_eps)
        self.project_before_val = project_before_val
        self.warm_start = bool(warm_start)

        self.plan: Optional[RankPlan] = None
        self.projector: Optional[LowRankProjector] = None
        self.last_projected_step = -1  # training iterations completed at the last projection
        self.num_projections = 0
        self._resumed_state: Optional[dict] = None
        self._val_backup: Optional[Dict[str, torch.Tensor]] = None
        self._val_bases: Optional[Dict[str, torch.Tensor]] = None
        self._resumed_bases: Optional[Dict[str, torch.Tensor]] = None
        self._project = None  # the model wrapper's projection strategy (before_train)

    # ------------------------------------------------------------------ planning
    def settings(self) -> dict:
        """The arguments that define the projection (stored in checkpoint meta)."""
        return dict(rank_ratio=self.rank_ratio, flops_reduction=self.flops_reduction,
                    flops_input_shape=self.flops_input_shape,
                    rank_allocation=self.rank_allocation, interval=self.interval,
                    by_epoch=self.by_epoch,
                    energy_transfer=self.energy_transfer, bn_rectify=self.bn_rectify,
                    scope=self.scope, include=self.include, exclude=self.exclude,
                    frozen=self.frozen, layer_ratios=self.layer_ratios,
                    min_rank=self.min_rank, rank_multiple=self.rank_multiple,
                    unpaired=self.unpaired, bn_recovery=self.bn_recovery,
                    bnr_eps=self.bnr_eps)

    @staticmethod
    def _bare_model(runner) -> torch.nn.Module:
        model = runner.model
        return model.module if is_model_wrapper(model) else model

    def build_plan(self, model: torch.nn.Module, cfg=None) -> None:
        """Select the targets in ``model`` and plan their ranks (or reuse a resumed plan).

        ``cfg`` (the runner's config) gives the FLOPs input shape when ``flops_reduction`` is
        set and ``flops_input_shape`` is not.
        """
        selection = select_targets(model, self.scope, self.include, self.exclude,
                                   self.bn_rectify, self.unpaired, self.frozen)
        if self._resumed_state is not None:
            plan = RankPlan.from_dict(self._resumed_state['plan'])
            self.flops_info = self._resumed_state.get('flops')
        else:
            shape = (resolve_input_shape(cfg, self.flops_input_shape, 'flops_input_shape')
                     if self.flops_reduction is not None else None)
            plan, result = plan_targets(model, selection, self.scope, self.rank_ratio,
                                        self.flops_reduction, shape, self.layer_ratios,
                                        self.min_rank, self.rank_multiple,
                                        self.rank_allocation)
            if result is not None:
                self.flops_info = result.to_dict()
                print_log(f'LRPET: {self.rank_allocation} ranks remove '
                          f'{100 * result.reduction:.2f} % of the {self.scope or "model"} '
                          f'FLOPs ({result.flops_before} -> {result.flops_after} at input '
                          f'{tuple(shape)}; target {100 * self.flops_reduction:.1f} %)',
                          logger='current')
        for name, reason in plan.skipped.items():
            print_log(f'LRPET: leaving {name} alone: {reason}', logger='current')
        self.plan = plan
        self.projector = LowRankProjector(selection.targets, plan, self.energy_transfer,
                                          self.bnr_eps, warm_start=self.warm_start,
                                          bn_recovery=self.bn_recovery)
        if self.warm_start and self._resumed_bases:
            dropped = self.projector.load_basis_state(self._resumed_bases)
            if dropped:
                print_log(f'LRPET: {len(dropped)} saved subspace bases do not fit the plan and '
                          f'are ignored (exact projection for those layers): {dropped[:5]}',
                          logger='current', level=logging.WARNING)
        self._resumed_bases = None
        params_before = sum(layer.params_before for layer in plan.layers.values())
        params_after = sum(layer.params_after for layer in plan.layers.values())
        print_log(f'LRPET: {len(plan)} layers planned in {self.scope or "the model"!r} '
                  f'({len(plan.skipped)} left alone); their weights would go from '
                  f'{params_before} to {params_after} parameters after factorization',
                  logger='current')

    def before_train(self, runner) -> None:
        """Plan ranks now that pretrained / ``load_from`` / resumed weights are in place (the
        plan depends on which convs are frozen and, for FLOPs budgets, on the model), and ask
        the model wrapper how projections are distributed across ranks.

        Raises:
            ValueError: an ``EMAHook`` is registered (its averaged weights, which validation
                and checkpoints would use, are not projected).
        """
        ema = [type(h).__name__ for h in runner.hooks if isinstance(h, EMAHook)]
        if ema:
            raise ValueError(
                f'LRPETHook cannot be combined with {ema[0]}: the averaged weights that '
                'validation and checkpoints use would not be projected, so neither the '
                'validated model nor the saved one would be low-rank. Remove the EMAHook '
                'from custom_hooks')
        self._project = projection_strategy(runner.model)
        if self.by_epoch is None:
            self.by_epoch = isinstance(runner.train_loop, EpochBasedTrainLoop)
        if self._resumed_state is not None and runner.iter == 0:
            self._resumed_state = None  # `load_from` warm start: plan from the loaded weights
        if self._resumed_state is not None:
            state = self._resumed_state
            self.last_projected_step = int(state['last_projected_step'])
            self.num_projections = int(state['num_projections'])
            if state.get('settings') != self.settings():
                print_log('LRPET: the hook settings differ from the resumed checkpoint; the '
                          'stored rank plan is kept', logger='current', level=logging.WARNING)
        self.build_plan(self._bare_model(runner), runner.cfg)
        self._resumed_state = None

    # ------------------------------------------------------------------ projection
    def project(self, runner, step: int) -> ProjectionStats:
        """Project now (``step`` = training iterations completed), log it and record it.

        The work is distributed as the model wrapper says (see :meth:`before_train`); every
        rank ends with bit-identical weights.
        """
        where = f'iteration {step} (epoch {runner.epoch})'
        stats = self._project(self.projector, where)
        self.last_projected_step = step
        self.num_projections += 1
        hub = runner.message_hub
        hub.update_scalar('train/lrpet_energy_kept', stats.energy_kept_mean)
        hub.update_scalar('train/lrpet_energy_kept_min', stats.energy_kept_min)
        hub.update_scalar('train/lrpet_projection_s', stats.seconds)
        hub.update_scalar('train/lrpet_layers', stats.num_layers)
        hub.update_scalar('train/lrpet_warm_layers', stats.num_warm)
        print_log(f'LRPET projection #{self.num_projections} at {where}: {stats.num_layers} '
                  f'layers ({stats.num_warm} warm-started), energy kept before transfer mean '
                  f'{stats.energy_kept_mean:.4f} / min {stats.energy_kept_min:.4f}, '
                  f'{stats.seconds * 1e3:.1f} ms{_split_summary(stats)}', logger='current')
        return stats

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Project every ``interval`` iterations (iteration-based schedules), and after the
        last iteration of training whatever the schedule, so the final weights are exactly
        low-rank."""
        step = runner.iter + 1
        if step == self.last_projected_step:
            return
        if ((not self.by_epoch and self.every_n_train_iters(runner, self.interval))
                or self.is_last_train_iter(runner)):
            self.project(runner, step)

    def after_train_epoch(self, runner) -> None:
        """Project every ``interval`` epochs (epoch-based schedules)."""
        step = runner.iter
        if (self.by_epoch and self.every_n_epochs(runner, self.interval)
                and step != self.last_projected_step):
            self.project(runner, step)

    def after_train(self, runner) -> None:
        """Safety net for loops that end early: the final weights must be exactly low-rank."""
        if self.projector is not None and runner.iter != self.last_projected_step:
            self.project(runner, runner.iter)

    # ------------------------------------------------------------------ validation
    def before_val_epoch(self, runner) -> None:
        """With ``project_before_val``, validate the model a user would deploy: when the
        weights are not projected right now (validation between two projections), keep a
        copy of the training weights and project them. They stay projected until
        :meth:`after_val`, so the best checkpoint saved after validation holds them too."""
        if (not self.project_before_val or self.projector is None
                or runner.iter == self.last_projected_step):
            return
        weights = self.projector.weights()
        self._val_backup = {name: w.detach().clone() for name, w in weights.items()}
        # The validation-time projection must not move the warm-start bases: a run resumed
        # from a checkpoint saved before this validation would not have them.
        self._val_bases = dict(self.projector.bases)
        stats = self._project(self.projector, f'validation at iteration {runner.iter}')
        print_log(f'LRPET: validating with projected weights ({stats.num_layers} layers, '
                  f'{stats.seconds * 1e3:.1f} ms{_split_summary(stats)}); training weights '
                  'are restored when validation ends', logger='current')

    def after_val(self, runner) -> None:
        """Restore the training weights (and warm-start bases) after validation, once every
        hook's ``after_val_epoch`` — ``CheckpointHook``'s best-checkpoint save included — has
        seen the projected ones."""
        if self._val_backup is None:
            return
        with torch.no_grad():
            for name, weight in self.projector.weights().items():
                weight.copy_(self._val_backup[name])
        self._val_backup = None
        if self._val_bases is not None:
            self.projector.bases = self._val_bases
            self._val_bases = None

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """JSON-able state: version, settings, rank plan and schedule position."""
        return dict(version=STATE_VERSION, settings=copy.deepcopy(self.settings()),
                    plan=self.plan.to_dict() if self.plan is not None else None,
                    flops=self.flops_info, last_projected_step=self.last_projected_step,
                    num_projections=self.num_projections)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Store the plan and schedule position in ``meta['lrpet']`` (what
        ``tools/factorize.py`` and a resumed run read) and the warm-start bases under
        ``'lrpet_bases'``.

        During validation between two projections the model holds projected weights. A
        weights-only checkpoint saved then (``CheckpointHook``'s best checkpoint: no optimizer
        state) keeps them — the validated, low-rank model. A checkpoint that can resume
        training (it holds the optimizer state; mmengine re-saves the last one after a new
        best) gets the training weights and bases instead, so resume stays bit-exact.
        ``meta['lrpet']['weights']`` says which: ``'training'`` or ``'projected'``.
        """
        if self.plan is None:
            return
        state = self.state_dict()
        bases = None  # the projector's own
        state['weights'] = 'training'
        if self._val_backup is not None:
            if 'optimizer' in checkpoint:
                weights = checkpoint['state_dict']
                for name, tensor in self._val_backup.items():
                    key = f'{name}.weight'
                    weights[key] = tensor.to(device=weights[key].device).clone()
                bases = self._val_bases or {}
            else:
                state['weights'] = 'projected'
        checkpoint.setdefault('meta', {})[META_KEY] = state
        if self.warm_start:
            checkpoint[BASES_KEY] = self.projector.basis_state(bases)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Keep the stored plan, schedule position and bases for :meth:`before_train` (the
        targets can only be selected once the model is built and its weights loaded)."""
        bases = checkpoint.get(BASES_KEY)
        self._resumed_bases = bases if isinstance(bases, dict) else None
        state = (checkpoint.get('meta') or {}).get(META_KEY)
        if state is None or state.get('plan') is None:
            self._resumed_state = None
            return
        if state.get('version') != STATE_VERSION:
            raise ValueError(f'LRPET state version {state.get("version")!r} in the checkpoint '
                             f'is not supported (expected {STATE_VERSION})')
        self._resumed_state = state


def _split_summary(stats: ProjectionStats) -> str:
    """How the projection was split across ranks ('' when it was not)."""
    return stats.split_summary() if isinstance(stats, DistributedProjectionStats) else ''
