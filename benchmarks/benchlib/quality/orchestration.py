"""Runs the evidence benchmark: every (task, seed, row) in one process, the results recorded
after each row (:func:`run_benchmark`; ``benchmarks/bench_quality.py`` is the command line)."""
from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import logging
import math
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from benchlib import common
from benchlib.quality.configs import (
    HALF_ROWS,
    MAIN_ROWS,
    ROW_KEYS,
    ROWS_BY_KEY,
    RUN_ORDER,
    BenchSettings,
    PathLike,
    RowSpec,
    TaskSettings,
    base_config,
    factorized_train_config,
    load_config,
    second_half_config,
)
from benchlib.quality.deployed import (
    LATENCY_THREADS,
    export_deployed,
    merged_for_deployment,
    time_deployed,
)
from benchlib.quality.statistics import compare_rows, summarize_row
from benchlib.quality.tables import result_file_stem, write_results
from lrpet_mm.datasets.synthetic_voc import generate_synthetic_voc
from lrpet_mm.report.evaluation import quiet_runner
from lrpet_mm.report.markdown import format_count
from lrpet_mm.utils.atomic import atomic_path
from lrpet_mm.utils.values import error_text

FORMAT_VERSION = 3


class RowError(RuntimeError):
    """A row could not be run (recorded in the results, the other rows go on)."""


class _GlobalState:
    """Process-wide state the Runners change (deterministic algorithms, seeds), restored at
    the end so that the calling process (e.g. a test session) is left as it was."""

    def __init__(self):
        import random

        import numpy as np
        import torch

        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def restore(self) -> None:
        import random

        import numpy as np
        import torch

        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        random.setstate(self.rng[0])
        np.random.set_state(self.rng[1])
        torch.set_rng_state(self.rng[2])


@contextlib.contextmanager
def _quiet():
    """Warnings off, stray prints to stderr, mmengine's current logger at WARNING (its
    ``init_weights`` report alone is hundreds of lines per model)."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter('ignore')
            yield
    finally:
        logger.setLevel(level)


def _run_training(runner) -> dict:
    with _quiet():
        runner.train()
    info = dict(iters=int(runner.iter))
    with contextlib.suppress(Exception):
        info['loss'] = float(runner.message_hub.get_scalar('train/loss').current())
    return info


def train(cfg) -> Tuple[Path, dict]:
    """Train ``cfg`` in this process; returns its final checkpoint and a few scalars."""
    runner = quiet_runner(cfg)
    try:
        info = _run_training(runner)
    finally:
        del runner
        gc.collect()
    path = Path(cfg.work_dir) / f'iter_{info["iters"]}.pth'
    if not path.is_file():
        raise RowError(f'training in {cfg.work_dir} saved no {path.name}')
    return path, info


def save_state(state: Mapping, path: Path, meta: Optional[dict] = None) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(dict(state_dict={k: v.detach().cpu() for k, v in state.items()},
                        meta=meta or {}), tmp)
    return path


def _save_compact(cfg, model, meta: dict, out_dir: Path, name: str) -> Tuple[Path, Path]:
    """Write ``<name>.py`` (``cfg``) and ``<name>.pth`` (``model``'s state) atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / f'{name}.py'
    ckpt_path = save_state(model.state_dict(), out_dir / f'{name}.pth', meta)
    with atomic_path(cfg_path) as tmp_cfg:
        cfg.dump(str(tmp_cfg))
    return cfg_path, ckpt_path


def _same_components(got: Mapping[str, dict], expected: Mapping[str, dict]) -> bool:
    def norm(spec):
        return {c: (dict(s['ranks']), dict(s.get('folded_norms') or {})) for c, s in spec.items()}
    return norm(got) == norm(expected)


@dataclass
class TaskContext:
    """Per-task state shared by the seeds and rows."""
    task: TaskSettings
    plan: object  # RankPlan (uniform, the LRA rows' ranks)
    plan_info: dict
    norms: Dict[str, str]  # planned conv -> its BN (folded in the compact model)
    components: Dict[str, dict]
    input_shape: Tuple[int, int, int]
    baseline_half: Optional[Path] = None  # the baseline's checkpoint at T/2 (this seed)
    baseline_train_s: Optional[float] = None
    lrpet_flops: Optional[int] = None
    model_flops: Optional[int] = None  # the uncompressed model's test-time FLOPs
    lrpet_model_flops: Optional[int] = None  # ... of the backbone-only LRPET plan's compact model
    task_dir: Optional[Path] = None
    deployed: Dict[str, Path] = field(default_factory=dict)  # seed 0's ONNX per row
    deploy_input: Optional[object] = None  # the preprocessed image they are timed on


def hook_budget(row: RowSpec, task: TaskSettings, ctx: TaskContext) -> float:
    """The ``flops_reduction`` of a hook row (see :attr:`RowSpec.budget`)."""
    if row.budget == 'task':
        return task.flops_reduction
    if row.budget == 'model_half':
        return 0.5
    if row.budget == 'lrpet_model':  # the backbone-only plan's whole-model reduction
        return 1.0 - ctx.lrpet_model_flops / ctx.model_flops
    raise ValueError(f'unknown budget {row.budget!r} of row {row.key!r}')


class QualityBenchmark:
    """Runs the rows, records results after each one (see :func:`run_benchmark`)."""

    def __init__(self, settings: BenchSettings, work_dir: PathLike, out_dir: PathLike,
                 rows: Sequence[str] = MAIN_ROWS, data_root: Optional[PathLike] = None,
                 cache_dir: Optional[PathLike] = None, keep_checkpoints: bool = False,
                 log: Callable[[str], None] = print, command: str = '',
                 variant: Optional[str] = None, resume: bool = False):
        unknown = [r for r in rows if r not in ROWS_BY_KEY]
        if unknown or not rows:
            raise ValueError(f'rows must be a non-empty subset of {list(ROW_KEYS)}, got '
                             f'{list(rows)!r}')
        self.settings = settings
        self.rows = [r for r in ROW_KEYS if r in rows]
        self.work_dir = Path(work_dir).absolute()
        self.out_dir = Path(out_dir).absolute()
        self.user_data_root = None if data_root is None else Path(data_root).absolute()
        if self.user_data_root is not None and not self.user_data_root.is_dir():
            raise FileNotFoundError(f'--data-root {self.user_data_root} is not a directory')
        self.cache_dir = cache_dir
        self.keep_checkpoints = keep_checkpoints
        self._log = log
        self.start = None
        self.results = dict(
            benchmark='lrpet_mm evidence benchmark', format_version=FORMAT_VERSION,
            command=command, mode=settings.mode, variant=variant, started=None,
            finished=None, complete=False, wall_time_s=None, settings=settings.to_dict(),
            machine={}, data={}, pretrained={}, tasks={}, errors=[], sessions=[])
        self.resume = resume
        self._previous = self._load_previous() if resume else None

    # ------------------------------------------------------------------ helpers
    def log(self, message: str) -> None:
        elapsed = 0.0 if self.start is None else time.time() - self.start
        self._log(f'[bench_quality {elapsed:7.1f}s] {message}')

    def save(self) -> Tuple[Path, Path]:
        if self.start is not None:  # this session's time (so far: a killed run keeps the time
            # to its last row) plus that of the sessions before
            self.results['sessions'][-1]['wall_time_s'] = time.time() - self.start
            self.results['wall_time_s'] = sum(x.get('wall_time_s') or 0.0
                                              for x in self.results['sessions'])
        for task in self.results['tasks'].values():
            task['comparisons'] = compare_rows(task)
        return write_results(self.results, self.out_dir)

    def _results_path(self) -> Path:
        return self.out_dir / f'{result_file_stem(self.results)}.json'

    def _load_previous(self) -> Optional[dict]:
        """The results an interrupted run of the same protocol left in ``out_dir`` (None if
        there are none); raises ``ValueError`` when they are of another protocol."""
        import json

        path = self._results_path()
        if not path.is_file():
            return None
        previous = json.loads(path.read_text())
        if previous.get('format_version') != FORMAT_VERSION:
            raise ValueError(f'--resume: {path} has format version '
                             f'{previous.get("format_version")}, this code writes '
                             f'{FORMAT_VERSION}')
        if previous.get('settings') != self.results['settings']:
            raise ValueError(f'--resume: {path} was run with other settings (mode, T, seeds, '
                             'data or pretraining); start a new run in another --out-dir')
        for key, task in previous.get('tasks', {}).items():
            if sorted(task.get('rows', {})) != sorted(self.rows):
                raise ValueError(f'--resume: {path} ({key}) has rows '
                                 f'{sorted(task.get("rows", {}))}, this run {sorted(self.rows)}')
        return previous

    def _take_previous(self) -> None:
        """Keep the previous run's finished seeds (every row recorded); a seed left half
        done is dropped and runs again whole (its rows share the baseline's T/2 checkpoint)."""
        for key, old in self._previous['tasks'].items():
            if key not in self.results['tasks']:
                continue
            done = [str(seed) for seed in self.settings.seeds
                    if all(str(seed) in row['seeds'] for row in old['rows'].values())]
            for row in old['rows'].values():
                row['seeds'] = {seed: e for seed, e in row['seeds'].items() if seed in done}
                row['summary'] = summarize_row(row)
            self.results['tasks'][key] = old
        self.results['errors'] = [e for e in self._previous.get('errors', [])
                                  if str(e['seed']) in self._done_seeds(e['task'])]
        pre = self._previous.get('pretrained') or {}
        if pre.get('sha256') and pre['sha256'] != self.results['pretrained'].get('sha256'):
            self.results['sessions'][-1]['pretrained_sha256_differs'] = True
            self.log('warning: the pretrained backbone was rebuilt with other weights than the '
                     'resumed run\'s (recorded; seeds stay paired within themselves)')
        self.results['pretrained_previous'] = pre

    def _done_seeds(self, task_key: str) -> List[str]:
        rows = self.results['tasks'][task_key]['rows'].values()
        return [str(seed) for seed in self.settings.seeds
                if all(str(seed) in row['seeds'] for row in rows)]

    def _cleanup(self, *paths: Optional[Path]) -> None:
        if self.keep_checkpoints:
            return
        for path in paths:
            if path is not None and Path(path).is_dir():
                for ckpt in Path(path).rglob('*.pth'):
                    ckpt.unlink()

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        """Run every (task, seed, row); returns 0, or 1 if any row failed."""
        self.start = time.time()
        self.results['started'] = datetime.datetime.now().astimezone().isoformat(
            timespec='seconds')
        self.results['machine'] = common.machine_info()
        session = dict(started=self.results['started'], command=self.results['command'],
                       machine=self.results['machine'], resumed=self._previous is not None)
        if self._previous is not None:
            self.results['started'] = self._previous['started']
            self.results['sessions'] = list(self._previous.get('sessions') or [])
        self.results['sessions'].append(session)
        s = self.settings
        self.log(f'{s.mode} mode: tasks {[t.key for t in s.tasks]}, rows {self.rows}, seeds '
                 f'{list(s.seeds)}; work dir {self.work_dir}, results in {self.out_dir}')
        saved = _GlobalState()
        try:
            data_root = self._data()
            pretrained = self._pretrained()
            for task in s.tasks:
                self.results['tasks'][task.key] = dict(
                    task=task.task, model=task.model_name, metric=task.metric,
                    metric_label=task.metric_label, rank_plan=None, prune_ratios={},
                    config_notes=('ResNet-18 deep stem, no frozen stage, BN statistics '
                                  'trained (norm_eval=False, see docs/benchmarks.md); smaller '
                                  'FPN/RPN/RoI heads (128 channels)'
                                  if task.key == 'det' else
                                  'ResNetV1c-18, dilated (output stride 8), BN trained'),
                    rows={key: dict(label=ROWS_BY_KEY[key].label,
                                    description=ROWS_BY_KEY[key].description, seeds={},
                                    summary=None) for key in self.rows},
                    latency=None)
            if self._previous is not None:
                self._take_previous()
            self.save()
            for task in s.tasks:
                self._run_task(task, data_root, pretrained)
        finally:
            saved.restore()
            self.results['finished'] = session['finished'] = \
                datetime.datetime.now().astimezone().isoformat(timespec='seconds')
            self.results['complete'] = self._all_done()
            json_path, md_path = self.save()
            self.log(f'wrote {json_path} and {md_path}')
        failed = len(self.results['errors'])
        self.log(f'done in {(time.time() - self.start) / 60:.1f} min; '
                 + (f'{failed} row run(s) failed' if failed else 'all rows succeeded'))
        return 1 if failed else 0

    def _data(self) -> Path:
        s = self.settings
        if self.user_data_root is not None:
            self.results['data'] = dict(root=str(self.user_data_root), description=(
                f'the VOCdevkit at `{self.user_data_root}` (given with --data-root)'))
            return self.user_data_root
        root = generate_synthetic_voc(
            self.work_dir / 'data' / s.mode / 'VOCdevkit', num_train=s.num_train,
            num_val=s.num_val, img_size=s.img_size, seed=s.data_seed, classes=s.classes,
            hard=s.hard, overwrite=True)
        self.results['data'] = dict(root=str(root), description=(
            f'built-in synthetic VOC layout (`generate_synthetic_voc(hard=True)`: textured '
            f'backgrounds, {len(s.classes)} classes drawn as different shapes, overlap), '
            f'{s.num_train} train / {s.num_val} test images of {s.img_size[0]}×'
            f'{s.img_size[1]}, data seed {s.data_seed}'))
        self.log(f'data: {root}')
        return root

    def _pretrained(self) -> Path:
        from benchlib.pretrained_backbone import pretrained_backbone

        t0 = time.time()
        built = pretrained_backbone(self.settings.pretrain, cache_dir=self.cache_dir,
                                    log=self.log)
        stats = built.bn_stats.get('overall', built.bn_stats)
        self.results['pretrained'] = dict(
            file=str(built.path), sha256=common.file_sha256(built.path), cached=built.cached,
            test_accuracy_pct=100 * built.test_accuracy, train_seconds=built.train_seconds,
            bn_stats=built.bn_stats,
            gamma_median=stats.get('gamma_median', stats.get('median')),
            dead_fraction_pct=(None if stats.get('dead_fraction') is None
                               else 100 * stats['dead_fraction']),
            num_classes=10, wall_s=time.time() - t0)
        self.log(f'pretrained backbone {built.path} ({"cached" if built.cached else "built"}), '
                 f'held-out accuracy {100 * built.test_accuracy:.1f} %')
        return Path(built.path)

    def _all_done(self) -> bool:
        for task in self.settings.tasks:
            rows = self.results['tasks'].get(task.key, {}).get('rows', {})
            for key in self.rows:
                if len(rows.get(key, {}).get('seeds', {})) != len(self.settings.seeds):
                    return False
        return True

    def _record(self, task: TaskSettings, key: str, seed: int, entry: dict) -> None:
        row = self.results['tasks'][task.key]['rows'][key]
        row['seeds'][str(seed)] = entry
        row['summary'] = summarize_row(row)
        if entry.get('error'):
            self.results['errors'].append(dict(task=task.key, row=key, seed=seed,
                                               error=entry['error']))
        self.save()

    # ------------------------------------------------------------------ one task
    def _run_task(self, task: TaskSettings, data_root: Path, pretrained: Path) -> None:
        task_dir = self.work_dir / 'runs' / self.settings.mode / task.key
        if task_dir.exists():
            shutil.rmtree(task_dir)
        try:
            ctx = self._context(task, data_root, pretrained, task_dir)
        except Exception as e:  # noqa: BLE001 - recorded, nothing of this task can run
            for seed in self.settings.seeds:
                for key in self.rows:
                    self._record(task, key, seed, dict(error=f'planning failed: '
                                                       f'{error_text(e, 600)}'))
            return
        done = set(self._done_seeds(task.key))
        if done:
            self.log(f'{task.key}: resuming; seeds {sorted(done, key=int)} are done')
        for seed in self.settings.seeds:
            if str(seed) in done:
                continue
            self._run_seed(task, seed, data_root, pretrained, task_dir / f'seed{seed}', ctx)
            if seed == self.settings.seeds[0]:
                self._time_deployed(task, ctx)

    def _time_deployed(self, task: TaskSettings, ctx: TaskContext) -> None:
        """Time the first seed's deployed models together (right after that seed, so that an
        interrupted run that is resumed later has its latency table)."""
        if not ctx.deployed:
            return
        self.log(f'{task.key}: timing {len(ctx.deployed)} deployed whole models in ONNX '
                 'Runtime')
        try:
            with _quiet():
                latency = time_deployed(ctx.deployed, ctx.deploy_input,
                                        threads=LATENCY_THREADS,
                                        rounds=self.settings.latency_rounds,
                                        repeats=self.settings.latency_repeats)
        except Exception as e:  # noqa: BLE001 - the accuracy results stand without it
            latency = dict(error=error_text(e, 600))
        latency['seed'] = self.settings.seeds[0]
        latency['machine'] = self.results['machine'].get('cpu')
        self.results['tasks'][task.key]['latency'] = latency
        self.save()

    def _context(self, task: TaskSettings, data_root: Path, pretrained: Path,
                 task_dir: Path) -> TaskContext:
        """The uniform rank plan of ``task`` (the LRPET default's ranks, used by LRA)."""
        from benchlib.decompose import components_of
        from lrpet_mm.engine.flops import whole_model_flops
        from lrpet_mm.engine.input_shape import infer_input_shape
        from lrpet_mm.engine.planning import factorized_copy, plan_ranks_for_flops
        from lrpet_mm.lowrank import select_targets
        from lrpet_mm.models import planned_layers
        from lrpet_mm.models.factorize_checkpoint import build_model_from_config

        cfg = base_config(task, self.settings, data_root, task_dir / 'plan', 0, pretrained)
        with _quiet():
            model = build_model_from_config(cfg)
            shape = infer_input_shape(cfg)
            selection = select_targets(model, 'backbone', None, None, True, 'skip')
            result = plan_ranks_for_flops(model, 'backbone', selection, task.flops_reduction,
                                          shape)
        plan = result.plan
        norms = {layer.name: layer.folded_norm for layer in planned_layers(model, plan)
                 if layer.folded_norm}
        with _quiet():  # the whole-model cost of the backbone-only plan (for lrpet_model_eq)
            model_flops = whole_model_flops(model, shape)
            lrpet_model_flops = whole_model_flops(factorized_copy(model, plan, norms), shape)
        info = result.to_dict()
        info.update(model_flops_before=model_flops, model_flops_after=lrpet_model_flops,
                    model_reduction=1 - lrpet_model_flops / model_flops)
        info.update(num_layers=len(plan), num_skipped=len(plan.skipped),
                    ranks={name: layer.rank for name, layer in plan.layers.items()},
                    skipped=dict(plan.skipped))
        self.results['tasks'][task.key]['rank_plan'] = info
        self.log(f'{task.key}: uniform rank ratio {result.rank_ratio:.4f} on {len(plan)} '
                 f'backbone convs removes {100 * result.reduction:.2f} % of the backbone FLOPs '
                 f'at input {tuple(shape)} (target {100 * task.flops_reduction:.0f} %)')
        return TaskContext(task, plan, info, norms,
                           components_of({n: layer.rank for n, layer in plan.layers.items()},
                                         norms), tuple(shape), model_flops=model_flops,
                           lrpet_model_flops=lrpet_model_flops, task_dir=task_dir)

    def _initial_checkpoint(self, cfg, seed: int, path: Path) -> Path:
        """Pretrained backbone + heads initialised under ``torch.manual_seed(seed)``: the
        starting weights of every row of this seed."""
        import torch

        from lrpet_mm.models.factorize_checkpoint import build_model_from_config

        torch.manual_seed(seed)
        with _quiet():
            model = build_model_from_config(cfg)
            model.init_weights()
        return save_state(model.state_dict(), path, dict(seed=seed))

    def _run_seed(self, task: TaskSettings, seed: int, data_root: Path, pretrained: Path,
                  seed_dir: Path, ctx: TaskContext) -> None:
        ctx.baseline_half = ctx.baseline_train_s = ctx.lrpet_flops = None
        try:
            cfg = base_config(task, self.settings, data_root, seed_dir / 'init', seed,
                              pretrained)
            init = self._initial_checkpoint(cfg, seed, seed_dir / 'init' / 'init.pth')
        except Exception as e:  # noqa: BLE001 - recorded for every row of this seed
            for key in self.rows:
                self._record(task, key, seed, dict(error=f'initial weights failed: '
                                                   f'{error_text(e, 600)}'))
            return
        wanted = set(self.rows)
        if wanted & set(HALF_ROWS):
            wanted.add('baseline')
        if 'prune' in wanted:
            wanted.add('lrpet')  # pruning targets the LRPET row's backbone FLOPs
        order = [k for k in RUN_ORDER if k in wanted]
        if 'prune' in order:  # after the LRPET row it matches
            order.remove('prune')
            order.insert(order.index('lrpet') + 1, 'prune')
        for key in order:
            row = ROWS_BY_KEY[key]
            row_dir = seed_dir / key
            t0 = time.time()
            self.log(f'{task.key} seed {seed} {key}: start')
            try:
                entry = self._run_row(task, row, seed, data_root, pretrained, init, row_dir,
                                      ctx)
            except Exception as e:  # noqa: BLE001 - recorded, the other rows go on
                entry = dict(error=error_text(e, 600), traceback=traceback.format_exc(limit=8))
                self.log(f'{task.key} seed {seed} {key}: FAILED after {time.time() - t0:.0f} s:'
                         f' {entry["error"]}')
            else:
                metric = entry.get('metric_pct')
                self.log(f'{task.key} seed {seed} {key}: {task.metric_label} '
                         f'{"n/a" if metric is None else f"{metric:.2f}"} %, backbone '
                         f'{format_count(entry.get("backbone_flops"))} FLOPs, '
                         f'{time.time() - t0:.0f} s')
            entry['wall_s'] = time.time() - t0
            if key in self.rows:
                self._record(task, key, seed, entry)
            if key != 'baseline':
                self._cleanup(row_dir)
        self._cleanup(seed_dir)

    # ------------------------------------------------------------------ rows
    def _run_row(self, task: TaskSettings, row: RowSpec, seed: int, data_root: Path,
                 pretrained: Path, init: Path, row_dir: Path, ctx: TaskContext) -> dict:
        cfg = base_config(task, self.settings, data_root, row_dir / 'train', seed, pretrained)
        entry = dict(error=None, extra={})
        t0 = time.time()
        if row.kind == 'baseline':
            cfg.load_from = str(init)
            ckpt, info = train(cfg)
            ctx.baseline_train_s = entry['train_s'] = time.time() - t0
            ctx.baseline_half = Path(cfg.work_dir) / f'iter_{task.iters // 2}.pth'
            eval_cfg, eval_ckpt = cfg, ckpt
            self._expect_iters(info, task.iters)
        elif row.kind == 'hook':
            cfg.load_from = str(init)
            cfg.custom_hooks = [dict(type='LRPETHook', flops_reduction=hook_budget(row, task, ctx),
                                     interval=task.projection_interval, by_epoch=False,
                                     **dict(row.hook_kwargs))]
            ckpt, info = train(cfg)
            entry['train_s'] = time.time() - t0
            self._expect_iters(info, task.iters)
            eval_cfg, eval_ckpt = self._factorize_hook_run(cfg, ckpt, row_dir, entry)
        elif row.kind in ('lra_half', 'lra_pretrained'):
            source = self._baseline_half(ctx) if row.kind == 'lra_half' else init
            if row.kind == 'lra_half':
                cfg = second_half_config(cfg, task)
            eval_cfg, eval_ckpt, info = self._lra(task, cfg, source, row_dir, ctx, entry)
            self._expect_iters(info, task.iters // 2 if row.kind == 'lra_half' else task.iters)
            entry['train_s'] = time.time() - t0
            if row.kind == 'lra_half':
                entry['train_s'] += ctx.baseline_train_s / 2
        elif row.kind == 'prune':
            entry.update(self._prune(task, row, second_half_config(cfg, task), ctx, seed))
            entry['train_s'] = entry['finetune_s'] + ctx.baseline_train_s / 2
            return entry
        else:  # pragma: no cover - ROWS only has the kinds above
            raise ValueError(f'unknown row kind {row.kind!r}')
        entry['extra'].update({k: v for k, v in info.items() if k != 'iters'})
        t1 = time.time()
        entry.update(self._evaluate(task, eval_cfg, eval_ckpt, row_dir / 'eval'))
        model = self._build(eval_cfg, eval_ckpt)
        entry.update(self._complexity(model, ctx))
        if row.key == 'lrpet':
            ctx.lrpet_flops = entry['backbone_flops']
        if seed == self.settings.seeds[0]:
            self._deploy(task, row.key, model, eval_cfg, ctx)
        entry['eval_s'] = time.time() - t1
        return entry

    def _deploy(self, task: TaskSettings, key: str, model, cfg, ctx: TaskContext) -> None:
        """Export ``model`` (seed 0 of row ``key``) as a user deploys it (latency-aware
        merge, mmdeploy end to end for ONNX Runtime) for the timing at the end of the task;
        a failure is recorded and the row's accuracy stands."""
        info = self.results['tasks'][task.key].setdefault('deployed', {})
        try:
            with _quiet():
                deployable, merged = merged_for_deployment(model, ctx.input_shape,
                                                           LATENCY_THREADS)
                path = ctx.task_dir / 'deployed' / f'{key}.onnx'
                inputs = export_deployed(deployable, cfg, path, ctx.input_shape)
        except Exception as e:  # noqa: BLE001 - recorded, the row's metric stands
            info[key] = dict(error=error_text(e, 600))
            self.log(f'{task.key} {key}: deployment failed: {info[key]["error"]}')
            return
        if ctx.deploy_input is None:
            ctx.deploy_input = inputs
        ctx.deployed[key] = path
        info[key] = dict(merged_layers=merged, onnx_mb=path.stat().st_size / 2 ** 20)

    @staticmethod
    def _expect_iters(info: dict, n: int) -> None:
        if info.get('iters') != n:
            raise RowError(f'trained {info.get("iters")} iterations, expected {n}')

    @staticmethod
    def _baseline_half(ctx: TaskContext) -> Path:
        if ctx.baseline_half is None or not ctx.baseline_half.is_file():
            raise RowError('the baseline of this seed did not leave its T/2 checkpoint')
        return ctx.baseline_half

    def _evaluate(self, task: TaskSettings, cfg, checkpoint: Path, work_dir: Path) -> dict:
        from lrpet_mm.report import evaluate_checkpoint

        with _quiet():
            metrics = evaluate_checkpoint(cfg, checkpoint, work_dir, progress=False)
        return self._metric(task, metrics)

    @staticmethod
    def _metric(task: TaskSettings, metrics: Mapping[str, float]) -> dict:
        if task.metric not in metrics:
            raise RowError(f'the test evaluator returned no {task.metric!r} '
                           f'(got {sorted(metrics)})')
        value = None if metrics[task.metric] is None else float(metrics[task.metric])
        pct = None if value is None or not math.isfinite(value) else value * task.metric_scale
        return dict(metric=value, metric_pct=pct)

    @staticmethod
    def _build(cfg, checkpoint: Path):
        from lrpet_mm.engine.checkpoint_meta import load_checkpoint_file
        from lrpet_mm.models.factorize_checkpoint import (
            build_model_from_config,
            load_state_dict_strict,
        )

        with _quiet():
            model = build_model_from_config(cfg)
            load_state_dict_strict(model, load_checkpoint_file(checkpoint), str(checkpoint))
        model.eval()
        return model

    @staticmethod
    def _complexity(model, ctx: TaskContext) -> dict:
        from lrpet_mm.engine.flops import count_flops, count_params, whole_model_flops

        with _quiet():
            return dict(backbone_flops=count_flops(model.backbone, ctx.input_shape),
                        backbone_params=count_params(model.backbone),
                        model_flops=whole_model_flops(model, ctx.input_shape),
                        model_params=count_params(model))

    def _factorize_hook_run(self, cfg, ckpt: Path, row_dir: Path, entry: dict):
        """LRPET-trained checkpoint -> compact config + checkpoint (the steps of
        ``factorize_checkpoint``, in process; raises unless every layer is low-rank)."""
        from lrpet_mm.engine.checkpoint_meta import load_checkpoint_file, rank_plan_from_checkpoint
        from lrpet_mm.models import compact_config, factorize_model
        from lrpet_mm.models.factorize_checkpoint import (
            build_model_from_config,
            load_state_dict_strict,
        )

        checkpoint = load_checkpoint_file(ckpt)
        plan = rank_plan_from_checkpoint(checkpoint, str(ckpt))
        with _quiet():
            model = build_model_from_config(cfg)
            load_state_dict_strict(model, checkpoint, str(ckpt))
            compact = factorize_model(model, plan)
        entry['extra']['ranks'] = {name: layer.rank for name, layer in plan.layers.items()}
        entry['extra']['max_relative_rank_error'] = max(
            layer.relative_error for layer in compact.layers)
        cfg_path, ckpt_path = _save_compact(
            compact_config(cfg, compact), compact.model, dict(source_checkpoint=str(ckpt)),
            row_dir / 'compact', 'compact')
        return load_config(cfg_path), ckpt_path

    def _fold(self, base_cfg, trained_cfg, ckpt: Path, out_dir: Path, ctx: TaskContext):
        """A trained factorized (BN kept) model -> the compact config + checkpoint."""
        from benchlib.decompose import fold_factorized_norms
        from lrpet_mm.models import compact_config

        model = self._build(trained_cfg, ckpt)
        compact = fold_factorized_norms(model, ctx.norms, copy_model=False)
        if not _same_components(compact.components, ctx.components):
            raise RowError('the compact model differs from the planned structure')
        cfg_path, ckpt_path = _save_compact(compact_config(base_cfg, compact), compact.model,
                                            dict(source_checkpoint=str(ckpt)), out_dir, 'compact')
        return load_config(cfg_path), ckpt_path

    def _lra(self, task: TaskSettings, cfg, source: Path, row_dir: Path, ctx: TaskContext,
             entry: dict):
        """Truncated SVD of ``source`` at the uniform ranks, train ``cfg``'s schedule, fold."""
        from benchlib.decompose import decompose_model

        base_cfg = copy.deepcopy(cfg)
        base = self._build(cfg, source)
        decomposed = decompose_model(base, ctx.plan)
        energies = [layer.energy_kept for layer in decomposed.layers]
        entry['extra']['svd_energy_kept_mean'] = sum(energies) / len(energies)
        entry['extra']['svd_energy_kept_min'] = min(energies)
        ft_cfg = factorized_train_config(cfg, ctx.components)
        dec_path = save_state(decomposed.model.state_dict(), row_dir / 'decomposed.pth',
                              dict(source_checkpoint=str(source)))
        check = self._build(ft_cfg, dec_path)  # every key must load (the Runner's is lax)
        del base, check, decomposed
        ft_cfg.load_from = str(dec_path)
        ckpt, info = train(ft_cfg)
        eval_cfg, eval_ckpt = self._fold(base_cfg, ft_cfg, ckpt, row_dir / 'compact', ctx)
        return eval_cfg, eval_ckpt, info

    def _prune(self, task: TaskSettings, row: RowSpec, cfg, ctx: TaskContext, seed: int
               ) -> dict:
        """The baseline at T/2, channel-pruned (the backbone to the LRPET row's backbone
        FLOPs, or backbone and heads to the row's whole-model budget), fine-tuned T/2 and
        tested in the same Runner (the pruned network has no config of its own)."""
        from benchlib.channel_pruning import prune_resnet_blocks
        from benchlib.head_pruning import prune_whole_model
        from lrpet_mm.engine.checkpoint_meta import load_checkpoint_file
        from lrpet_mm.models.factorize_checkpoint import load_state_dict_strict

        source = self._baseline_half(ctx)
        if row.budget == 'task' and ctx.lrpet_flops is None:
            raise RowError('the LRPET row of this seed gave no backbone FLOPs to match')
        runner = quiet_runner(cfg)
        try:
            model = runner.model
            with _quiet():
                model.init_weights()  # now, so that train() does not re-initialise the
                load_state_dict_strict(model, load_checkpoint_file(source), str(source))
                if row.budget == 'task':
                    pruned = prune_resnet_blocks(model.backbone, ctx.input_shape,
                                                 ctx.lrpet_flops)
                    channels = {f'backbone.{k}': v for k, v in pruned.channels.items()}
                else:
                    target = round((1 - hook_budget(row, task, ctx)) * ctx.model_flops)
                    pruned = prune_whole_model(model, ctx.input_shape, target)
                    channels = pruned.channels
            self.results['tasks'][task.key].setdefault('prune_ratios', {})[row.key] = \
                pruned.ratio
            t0 = time.time()
            info = _run_training(runner)
            train_s = time.time() - t0
            self._expect_iters(info, task.iters // 2)
            t1 = time.time()
            with _quiet():
                metrics = runner.test()
            entry = dict(error=None, extra=dict(prune_ratio=pruned.ratio,
                                                channels={k: list(v) for k, v in
                                                          channels.items()}))
            entry.update(self._metric(task, metrics))
            model = runner.model
            model.eval()
            entry.update(self._complexity(model, ctx))
            if seed == self.settings.seeds[0]:
                self._deploy(task, row.key, model, cfg, ctx)
            entry['eval_s'] = time.time() - t1
            entry['finetune_s'] = train_s
            return entry
        finally:
            del runner
            gc.collect()


def run_benchmark(settings: BenchSettings, work_dir: PathLike, out_dir: PathLike,
                  rows: Sequence[str] = MAIN_ROWS, data_root: Optional[PathLike] = None,
                  cache_dir: Optional[PathLike] = None, keep_checkpoints: bool = False,
                  log: Callable[[str], None] = print, command: str = '',
                  variant: Optional[str] = None, resume: bool = False) -> Tuple[int, dict]:
    """Run the benchmark; returns ``(exit code, results)``: 0 if every row succeeded, else 1.

    Results are written to ``out_dir/quality_<task>.{json,md}`` after every row (atomically),
    so an interrupted run leaves the rows finished so far (``complete: false``).
    """
    bench = QualityBenchmark(settings, work_dir, out_dir, rows, data_root, cache_dir,
                             keep_checkpoints, log, command, variant, resume)
    code = bench.run()
    return code, bench.results
