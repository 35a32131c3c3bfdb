"""LRPETHook: low-rank projection with energy transfer during ordinary mmengine training."""
import copy
import inspect
from typing import Dict, Optional, Sequence, Union

import torch
from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop

from ..analysis.checkpoint_summary import BASES_KEY, META_KEY
from ..analysis.flops import check_flops_reduction, plan_ranks_for_flops
from ..analysis.input_shape import infer_input_shape
from ..lowrank import (LowRankProjector, ProjectionStats, RankPlan, check_rank_multiple,
                       check_rank_ratio, get_scope_module, plan_ranks, select_targets)
from ..lowrank.batchnorm import BNR_EPS
from ..lowrank.targets import UNPAIRED_POLICIES
from .lrpet_ddp import (DistributedProjectionStats, LRPETDDP, broadcast_weights,
                        sync_projection_inputs)

STATE_VERSION = 1


@HOOKS.register_module()
class LRPETHook(Hook):
    """Low-rank projection with energy transfer (LRPET) for mmengine runners.

    Every ``interval`` epochs (``EpochBasedTrainLoop``) or iterations
    (``IterBasedTrainLoop``) the weight of each targeted conv, viewed as an
    (n_out, n_in·kh·kw) matrix, is replaced by its best rank-k approximation; the kept
    singular values are rescaled to preserve the Frobenius norm (energy transfer), and for a
    conv followed by a BatchNorm the BN-folded weight is projected and the conv weight
    recovered in closed form (BN rectification, paper eq. 16). Between projections training
    runs as usual on full-rank weights. A last projection at the end of training makes the
    saved weights exactly low-rank, ready for ``tools/factorize.py``.

    Usage (mmdet or mmseg config)::

        custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
        custom_hooks = [dict(type='LRPETHook', rank_ratio=0.5)]

    In distributed training all ranks hold bit-identical weights after every projection:
    every rank projects and then takes rank 0's weights, or, with
    ``model_wrapper_cfg=dict(type='LRPETDDP')``, the layers are split across ranks and each
    weight is broadcast from the rank that projected it (see :class:`LRPETDDP`).

    Args:
        rank_ratio (float, optional): rank pruning ratio p ∈ [0, 1); a layer with an (m, n)
            weight keeps k = floor((1 − p)·min(m, n)) singular values. Give exactly one of
            ``rank_ratio`` and ``flops_reduction``. Defaults to None.
        flops_reduction (float, optional): r ∈ (0, 1): choose the (uniform) ratio so that the
            factorized ``scope`` module has (1 − r)× its FLOPs, counted by mmengine.analysis
            at ``flops_input_shape`` (within ±1 %). Defaults to None.
        flops_input_shape (tuple[int], optional): (C, H, W) for FLOPs counting. Defaults to
            None: the config's ``crop_size`` (mmseg) or test ``Resize`` scale (mmdet).
        interval (int): project every ``interval`` epochs or iterations. Defaults to 1.
        by_epoch (bool, optional): count ``interval`` in epochs (True) or iterations (False).
            Defaults to None: epochs under ``EpochBasedTrainLoop``, iterations otherwise.
        energy_transfer (bool): rescale the kept singular values. Defaults to True.
        bn_rectify (bool): BN rectification for convs followed by a BatchNorm.
            Defaults to True.
        scope (str): dotted path of the submodule whose convs are projected ('' = the whole
            model). Defaults to 'backbone'.
        include (str | list[str], optional): regexes on full module names; only matching convs
            in scope are projected. Each must match a conv. Defaults to None.
        exclude (str | list[str], optional): regexes of convs to leave alone (e.g.
            ``r'backbone\\.(conv1|layer1)\\.'`` for frozen stages). Defaults to None.
        layer_ratios (dict[str, float], optional): ``{regex: rank_ratio}`` per-layer overrides,
            first match wins. Defaults to None.
        min_rank (int): smallest rank kept. Defaults to 1.
        rank_multiple (int): round every rank to a multiple of this (8 suits CPU and GPU
            convolution kernels: the factorized model runs faster at the same FLOPs); with
            ``flops_reduction`` the budget is still met. 1 keeps the paper's ranks.
            Defaults to 1.
        unpaired (str): with ``bn_rectify``, what to do with a conv whose output no BatchNorm
            consumes: 'skip' (logged), 'project' (without BNR) or 'error'. A conv followed by a
            GroupNorm/LayerNorm raises unless 'project'. Defaults to 'skip'.
        bnr_eps (float): ε of eq. 16. Defaults to 1e-5.
        project_before_val (bool): evaluate during training with projected weights: when
            validation falls between two projections, a projected copy of the weights is
            swapped in for validation and the training weights restored after it.
            Defaults to True.
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
                 interval: int = 1,
                 by_epoch: Optional[bool] = None,
                 energy_transfer: bool = True,
                 bn_rectify: bool = True,
                 scope: str = 'backbone',
                 include: Union[None, str, Sequence[str]] = None,
                 exclude: Union[None, str, Sequence[str]] = None,
                 layer_ratios: Optional[Dict[str, float]] = None,
                 min_rank: int = 1,
                 rank_multiple: int = 1,
                 unpaired: str = 'skip',
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
        if flops_input_shape is not None and (
                not isinstance(flops_input_shape, (tuple, list)) or len(flops_input_shape) != 3
                or not all(isinstance(v, int) and v > 0 for v in flops_input_shape)):
            raise ValueError('flops_input_shape must be (C, H, W) positive ints, got '
                             f'{flops_input_shape!r}')
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f'interval must be an int >= 1, got {interval!r}')
        if by_epoch not in (None, True, False):
            raise ValueError(f'by_epoch must be None, True or False, got {by_epoch!r}')
        if unpaired not in UNPAIRED_POLICIES:
            raise ValueError(f'unpaired must be one of {UNPAIRED_POLICIES}, got {unpaired!r}')
        if not isinstance(bnr_eps, (int, float)) or not bnr_eps > 0:
            raise ValueError(f'bnr_eps must be > 0, got {bnr_eps!r}')
        check_rank_multiple(rank_multiple)
        for ratio in (layer_ratios or {}).values():
            check_rank_ratio(ratio, 'layer_ratios value')
        if scope is not None and not isinstance(scope, str):
            raise TypeError(f'scope must be a module path string, got {scope!r}')
        self.rank_ratio = None if rank_ratio is None else float(rank_ratio)
        self.flops_reduction = None if flops_reduction is None else float(flops_reduction)
        self.flops_input_shape = (None if flops_input_shape is None else
                                  tuple(flops_input_shape))
        self.flops_info: Optional[dict] = None
        self.interval = interval
        self.by_epoch = by_epoch
        self.energy_transfer = bool(energy_transfer)
        self.bn_rectify = bool(bn_rectify)
        self.scope = scope or ''
        self.include = include
        self.exclude = exclude
        self.layer_ratios = dict(layer_ratios or {})
        self.min_rank = min_rank
        self.rank_multiple = rank_multiple
        self.unpaired = unpaired
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

    # ------------------------------------------------------------------ planning
    def settings(self) -> dict:
        """The arguments that define the projection (stored in checkpoint meta)."""
        return dict(rank_ratio=self.rank_ratio, flops_reduction=self.flops_reduction,
                    flops_input_shape=self.flops_input_shape, interval=self.interval,
                    by_epoch=self.by_epoch,
                    energy_transfer=self.energy_transfer, bn_rectify=self.bn_rectify,
                    scope=self.scope, include=self.include, exclude=self.exclude,
                    layer_ratios=self.layer_ratios, min_rank=self.min_rank,
                    rank_multiple=self.rank_multiple,
                    unpaired=self.unpaired, bnr_eps=self.bnr_eps)

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
                                   self.bn_rectify, self.unpaired)
        for name, reason in selection.skipped.items():
            print_log(f'LRPET: leaving {name} alone: {reason}', logger='current')
        if self._resumed_state is not None:
            plan = RankPlan.from_dict(self._resumed_state['plan'])
            self.flops_info = self._resumed_state.get('flops')
        elif self.flops_reduction is not None:
            shape = self.flops_input_shape
            if shape is None:
                if cfg is None:
                    raise ValueError('flops_reduction needs flops_input_shape or a config')
                shape = infer_input_shape(cfg)
            result = plan_ranks_for_flops(get_scope_module(model, self.scope), self.scope,
                                          selection, self.flops_reduction, shape,
                                          self.layer_ratios, self.min_rank,
                                          rank_multiple=self.rank_multiple)
            plan = result.plan
            self.flops_info = result.to_dict()
            print_log(f'LRPET: rank ratio {result.rank_ratio:.4f} removes '
                      f'{100 * result.reduction:.2f} % of the {self.scope or "model"} FLOPs '
                      f'({result.flops_before} -> {result.flops_after} at input '
                      f'{tuple(shape)}; target {100 * self.flops_reduction:.1f} %)',
                      logger='current')
        else:
            plan = plan_ranks(selection.shapes(), self.rank_ratio, self.layer_ratios,
                              self.min_rank, self.rank_multiple)
            for name, reason in plan.skipped.items():
                print_log(f'LRPET: leaving {name} alone: {reason}', logger='current')
            plan.skipped.update(selection.skipped)
        self.plan = plan
        self.projector = LowRankProjector(selection.targets, plan, self.energy_transfer,
                                          self.bnr_eps, warm_start=self.warm_start)
        if self.warm_start and self._resumed_bases:
            dropped = self.projector.load_basis_state(self._resumed_bases)
            if dropped:
                print_log(f'LRPET: {len(dropped)} saved subspace bases do not fit the plan and '
                          f'are ignored (exact projection for those layers): {dropped[:5]}',
                          logger='current', level=30)
        self._resumed_bases = None
        params_before = sum(layer.params_before for layer in plan.layers.values())
        params_after = sum(layer.params_after for layer in plan.layers.values())
        print_log(f'LRPET: {len(plan)} conv layers planned in {self.scope or "the model"!r} '
                  f'({len(plan.skipped)} left alone); their weights would go from '
                  f'{params_before} to {params_after} parameters after factorization',
                  logger='current')

    def before_train(self, runner) -> None:
        """Plan ranks now that pretrained / ``load_from`` / resumed weights are in place."""
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
                          'stored rank plan is kept', logger='current', level=30)
        self.build_plan(self._bare_model(runner), runner.cfg)
        self._resumed_state = None

    # ------------------------------------------------------------------ projection
    def project(self, runner, step: int) -> ProjectionStats:
        """Project now (``step`` = training iterations completed) and record it."""
        where = f'iteration {step} (epoch {runner.epoch})'
        stats = self._project_all(runner, where)
        self.last_projected_step = step
        self.num_projections += 1
        hub = runner.message_hub
        hub.update_scalar('train/lrpet_energy_kept', stats.energy_kept_mean)
        hub.update_scalar('train/lrpet_energy_kept_min', stats.energy_kept_min)
        hub.update_scalar('train/lrpet_projection_s', stats.seconds)
        hub.update_scalar('train/lrpet_layers', stats.num_layers)
        hub.update_scalar('train/lrpet_warm_layers', stats.num_warm)
        print_log(f'LRPET projection #{self.num_projections} at {where}: {stats.num_layers} '
                  f'layers ({stats.num_warm} warm-started), energy kept before transfer mean {stats.energy_kept_mean:.4f} / '
                  f'min {stats.energy_kept_min:.4f}, {stats.seconds * 1e3:.1f} ms'
                  f'{self._split_info(stats)}', logger='current')
        return stats

    def _project_all(self, runner, where: str) -> ProjectionStats:
        """Project every planned layer; in distributed training all ranks end bit-identical.

        With an :class:`~lrpet_mm.engine.LRPETDDP` model the work is split across ranks
        (``LRPETDDP.lrpet_project``). Otherwise every rank projects all layers and then takes
        rank 0's weights. Either way the BatchNorms used by BN rectification are first made
        identical to rank 0's (their running statistics are not synchronized by DDP under
        mmengine's default ``broadcast_buffers=False``).
        """
        if isinstance(runner.model, LRPETDDP):
            return runner.model.lrpet_project(self.projector, where=where)
        sync_projection_inputs(self.projector, src=0)
        stats = self.projector.project(where=where)
        self._sync_across_ranks()
        return stats

    def _sync_across_ranks(self) -> None:
        """Make every rank hold rank 0's projected weights (bit-identical)."""
        if get_world_size() > 1:
            broadcast_weights(self.projector, src=0)

    @staticmethod
    def _split_info(stats: ProjectionStats) -> str:
        if not isinstance(stats, DistributedProjectionStats):
            return ''
        share = ', '.join(f'{n} layers {s * 1e3:.1f} ms'
                          for n, s in zip(stats.rank_layers, stats.rank_seconds))
        return f' (split over {stats.world_size} ranks by LRPETDDP: {share})'

    def _due(self, count: int) -> bool:
        return count % self.interval == 0

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        step = runner.iter + 1
        if step == self.last_projected_step:
            return
        if (not self.by_epoch and self._due(step)) or step >= runner.max_iters:
            self.project(runner, step)

    def after_train_epoch(self, runner) -> None:
        step = runner.iter
        if self.by_epoch and self._due(runner.epoch + 1) and step != self.last_projected_step:
            self.project(runner, step)

    def after_train(self, runner) -> None:
        # Safety net for loops that end early: the final weights must be exactly low-rank.
        if self.projector is not None and runner.iter != self.last_projected_step:
            self.project(runner, runner.iter)

    # ------------------------------------------------------------------ validation
    def before_val_epoch(self, runner) -> None:
        if (not self.project_before_val or self.projector is None
                or runner.iter == self.last_projected_step):
            return
        weights = self.projector.weights()
        self._val_backup = {name: w.detach().clone() for name, w in weights.items()}
        # The validation-time projection must not move the warm-start bases: a run resumed
        # from a checkpoint saved before this validation would not have them.
        self._val_bases = dict(self.projector.bases)
        stats = self._project_all(runner, f'validation at iteration {runner.iter}')
        print_log(f'LRPET: validating with projected weights ({stats.num_layers} layers, '
                  f'{stats.seconds * 1e3:.1f} ms{self._split_info(stats)}); training weights '
                  'are restored afterwards', logger='current')

    def after_val_epoch(self, runner, metrics=None) -> None:
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
        if self.plan is not None:
            checkpoint.setdefault('meta', {})[META_KEY] = self.state_dict()
            if self.warm_start and self.projector is not None:
                checkpoint[BASES_KEY] = self.projector.basis_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
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
