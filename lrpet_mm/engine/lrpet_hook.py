"""LRPETHook: low-rank projection with energy transfer during ordinary mmengine training."""
import logging
from typing import Dict, Optional

import torch
from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop

from ..lowrank import LowRankProjector, ProjectionStats, RankPlan
from ..utils.environment import check_training_environment
from .checkpoint_meta import LEGACY_BASES_KEY, META_KEY
from .lrpet_ddp import DistributedProjectionStats, projection_strategy
from .settings import LRPETSettings

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
        **settings: the :class:`~lrpet_mm.engine.settings.LRPETSettings` fields (budget:
            ``rank_ratio`` or ``flops_reduction``; ``interval``, ``scope``, ``include`` /
            ``exclude``, ``layer_ratios``, ``rank_multiple``, ``bn_recovery``,
            ``project_before_val`` ...), validated once; an unknown name is a TypeError.
    """

    priority = 'NORMAL'  # before LoggerHook (BELOW_NORMAL) and CheckpointHook (VERY_LOW)

    def __init__(self, **settings) -> None:
        self.settings = LRPETSettings(**settings)
        self.by_epoch = self.settings.by_epoch  # resolved from the train loop if None
        self.flops_info: Optional[dict] = None
        self.plan: Optional[RankPlan] = None
        self.projector: Optional[LowRankProjector] = None
        self.last_projected_step = -1  # training iterations completed at the last projection
        self.num_projections = 0
        self._resumed_state: Optional[dict] = None
        self._val_backup: Optional[Dict[str, torch.Tensor]] = None
        self._project = None  # the model wrapper's projection strategy (before_train)

    @staticmethod
    def _bare_model(runner) -> torch.nn.Module:
        model = runner.model
        return model.module if is_model_wrapper(model) else model

    def build_plan(self, model: torch.nn.Module, cfg=None) -> None:
        """Select the targets in ``model`` and plan their ranks (or reuse a resumed plan).

        ``cfg`` (the runner's config) gives the FLOPs input shape when ``flops_reduction`` is
        set and ``flops_input_shape`` is not.
        """
        settings = self.settings
        selection = settings.select_targets(model)
        if self._resumed_state is not None:
            plan = RankPlan.from_dict(self._resumed_state['plan'])
            self.flops_info = self._resumed_state.get('flops')
        else:
            plan, result = settings.plan(model, selection, cfg)
            if result is not None:
                self.flops_info = result.to_dict()
                what = ("the whole model's test-time" if settings.whole_model
                        else f'the {settings.scope}')
                print_log(f'LRPET: ranks (uniform ratio {result.rank_ratio:.4f}) remove '
                          f'{100 * result.reduction:.2f} % of {what} FLOPs '
                          f'({result.flops_before} -> {result.flops_after} at input '
                          f'{tuple(result.input_shape)}; target '
                          f'{100 * settings.flops_reduction:.1f} %)', logger='current')
        for name, reason in plan.skipped.items():
            print_log(f'LRPET: leaving {name} alone: {reason}', logger='current')
        self.plan = plan
        self.projector = LowRankProjector(selection.targets, plan, settings.energy_transfer,
                                          settings.bn_recovery, settings.bnr_eps)
        params_before = sum(layer.params_before for layer in plan.layers.values())
        params_after = sum(layer.params_after for layer in plan.layers.values())
        print_log(f'LRPET: {len(plan)} layers planned in {settings.describe_scope()} '
                  f'({len(plan.skipped)} left alone); their weights would go from '
                  f'{params_before} to {params_after} parameters after factorization',
                  logger='current')

    def before_train(self, runner) -> None:
        """Plan ranks now that pretrained / ``load_from`` / resumed weights are in place (the
        plan depends on which convs are frozen and, for FLOPs budgets, on the model), and ask
        the model wrapper how projections are distributed across ranks.

        On CUDA it first checks the environment (mmcv ops compiled with CUDA, supported
        versions), so a user gets the fix instead of mmcv's error at the first NMS.

        Raises:
            ValueError: an ``EMAHook`` is registered (its averaged weights, which validation
                and checkpoints would use, are not projected).
            RuntimeError: the model is on CUDA and the environment cannot train there
                (:func:`~lrpet_mm.utils.environment.check_training_environment`).
        """
        ema = [type(h).__name__ for h in runner.hooks if isinstance(h, EMAHook)]
        if ema:
            raise ValueError(
                f'LRPETHook cannot be combined with {ema[0]}: the averaged weights that '
                'validation and checkpoints use would not be projected, so neither the '
                'validated model nor the saved one would be low-rank. Remove the EMAHook '
                'from custom_hooks')
        device = next(self._bare_model(runner).parameters()).device
        if device.type == 'cuda':  # mmcv ops without CUDA would fail only at the first NMS
            check_training_environment(device)
        self._project = projection_strategy(runner.model)
        if self.by_epoch is None:
            self.by_epoch = isinstance(runner.train_loop, EpochBasedTrainLoop)
        if self._resumed_state is not None and runner.iter == 0:
            self._resumed_state = None  # `load_from` warm start: plan from the loaded weights
        if self._resumed_state is not None:
            state = self._resumed_state
            self.last_projected_step = int(state['last_projected_step'])
            self.num_projections = int(state['num_projections'])
            changed = changed_settings(state.get('settings') or {}, self.settings)
            if changed:
                print_log(f'LRPET: the hook settings differ from the resumed checkpoint '
                          f'({changed}); the stored rank plan is kept', logger='current',
                          level=logging.WARNING)
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
        print_log(f'LRPET projection #{self.num_projections} at {where}: {stats.num_layers} '
                  f'layers, energy kept before transfer mean '
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
        if ((not self.by_epoch and self.every_n_train_iters(runner, self.settings.interval))
                or self.is_last_train_iter(runner)):
            self.project(runner, step)

    def after_train_epoch(self, runner) -> None:
        """Project every ``interval`` epochs (epoch-based schedules)."""
        step = runner.iter
        if (self.by_epoch and self.every_n_epochs(runner, self.settings.interval)
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
        if (not self.settings.project_before_val or self.projector is None
                or runner.iter == self.last_projected_step):
            return
        weights = self.projector.weights()
        self._val_backup = {name: w.detach().clone() for name, w in weights.items()}
        stats = self._project(self.projector, f'validation at iteration {runner.iter}')
        print_log(f'LRPET: validating with projected weights ({stats.num_layers} layers, '
                  f'{stats.seconds * 1e3:.1f} ms{_split_summary(stats)}); training weights '
                  'are restored when validation ends', logger='current')

    def after_val(self, runner) -> None:
        """Restore the training weights after validation, once every
        hook's ``after_val_epoch`` — ``CheckpointHook``'s best-checkpoint save included — has
        seen the projected ones."""
        if self._val_backup is None:
            return
        with torch.no_grad():
            for name, weight in self.projector.weights().items():
                weight.copy_(self._val_backup[name])
        self._val_backup = None

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """JSON-able state: version, settings, rank plan and schedule position."""
        return dict(version=STATE_VERSION, settings=self.settings.to_dict(),
                    plan=self.plan.to_dict() if self.plan is not None else None,
                    flops=self.flops_info, last_projected_step=self.last_projected_step,
                    num_projections=self.num_projections)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Store the settings, plan and schedule position in ``meta['lrpet']`` (what
        ``tools/factorize.py`` and a resumed run read).

        During validation between two projections the model holds projected weights. A
        weights-only checkpoint saved then (``CheckpointHook``'s best checkpoint: no optimizer
        state) keeps them — the validated, low-rank model. A checkpoint that can resume
        training (it holds the optimizer state; mmengine re-saves the last one after a new
        best) gets the training weights instead, so resume stays bit-exact.
        ``meta['lrpet']['weights']`` says which: ``'training'`` or ``'projected'``.
        """
        if self.plan is None:
            return
        state = self.state_dict()
        state['weights'] = 'training'
        if self._val_backup is not None:
            if 'optimizer' in checkpoint:
                weights = checkpoint['state_dict']
                for name, tensor in self._val_backup.items():
                    key = f'{name}.weight'
                    weights[key] = tensor.to(device=weights[key].device).clone()
            else:
                state['weights'] = 'projected'
        checkpoint.setdefault('meta', {})[META_KEY] = state

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Keep the stored plan and schedule position for :meth:`before_train` (the targets
        can only be selected once the model is built and its weights loaded).

        Checkpoints of lrpet_mm before 2026-12 also hold warm-start subspace bases under
        ``'lrpet_bases'``; projections no longer use any, so they are ignored (logged)."""
        if LEGACY_BASES_KEY in checkpoint:
            print_log(f'LRPET: ignoring {LEGACY_BASES_KEY!r} in the checkpoint (subspace bases '
                      'of an older lrpet_mm; every projection is now an exact SVD)',
                      logger='current')
        state = (checkpoint.get('meta') or {}).get(META_KEY)
        if state is None or state.get('plan') is None:
            self._resumed_state = None
            return
        if state.get('version') != STATE_VERSION:
            raise ValueError(f'LRPET state version {state.get("version")!r} in the checkpoint '
                             f'is not supported (expected {STATE_VERSION})')
        self._resumed_state = state


def changed_settings(stored: dict, settings: LRPETSettings) -> Dict[str, tuple]:
    """``{field: (stored, current)}`` for the settings that differ from those a checkpoint
    stored, both in canonical form (an older lrpet_mm stored e.g. ``layer_ratios={}``). Fields
    the checkpoint does not have, and those an older lrpet_mm stored that no longer exist, are
    not compared."""
    current = settings.to_dict()
    known = {name: value for name, value in stored.items() if name in current}
    try:
        known = LRPETSettings(**known).to_dict()
    except (TypeError, ValueError):  # not a valid combination on its own: compare as stored
        pass
    return {name: (known[name], value) for name, value in current.items()
            if name in known and known[name] != value}


def _split_summary(stats: ProjectionStats) -> str:
    """How the projection was split across ranks ('' when it was not)."""
    return stats.split_summary() if isinstance(stats, DistributedProjectionStats) else ''
