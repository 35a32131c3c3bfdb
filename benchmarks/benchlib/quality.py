"""Quality benchmark: LRPET against its ablations and the usual alternatives, at small scale.

Trains the real mmdet Faster R-CNN and mmseg PSPNet (the toy ResNet-18 configs in
``configs/lrpet/_toy_``) on the built-in synthetic VOC-layout data (``hard=True``) and evaluates
every method on the **compact** (factorized) model with the upstream metrics (VOCMetric mAP@0.5,
IoUMetric mIoU). Rows, all trained for the same number of iterations with the same data, seed
and schedule:

=========  ===============================================================================
baseline   uncompressed network (not factorized)
lrp        LRPETHook with ``energy_transfer=False, bn_rectify=False``
lrp_et     LRPETHook with ``energy_transfer=True, bn_rectify=False``
lrp_bnr    LRPETHook with ``energy_transfer=False, bn_rectify=True``
lrpet      LRPETHook with both (the method)
lra        the trained baseline decomposed by truncated SVD (BN kept), then fine-tuned for the
           same number of iterations (so it has seen twice the training iterations)
scratch    the factorized network (same ranks; BN kept while training) trained from scratch
=========  ===============================================================================

All compressed rows use one rank plan per task: the one LRPETHook's FLOPs-budget planner
makes (``plan_ranks_for_flops``, −50 % backbone FLOPs for detection, −30 % for segmentation,
counted at the config's input size). The hook rows get its uniform ``rank_ratio`` (the same
ranks; checked in every checkpoint), and after factorization every compressed row is the same
network (``LRPETFactorized`` with the same ranks and folded BNs; checked).

Detection uses smaller heads than the toy config (see :func:`_load_base_config`); both tasks
train without validation and keep only the last checkpoint. Each row runs in this process with
its own mmengine ``Runner``, seeded with ``randomness=dict(seed=s, deterministic=True)``: a row
gives the same numbers whether it runs alone (``--rows``) or after the others.

:func:`run_benchmark` does the work; ``benchmarks/bench_quality.py`` is the command line.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import math
import os
import shutil
import sys
import time
import traceback
import uuid
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from benchlib import common
from benchlib.common import REPO_ROOT
from lrpet_mm.datasets.synthetic_voc import generate_synthetic_voc
from lrpet_mm.report.evaluation import quiet_runner
from lrpet_mm.report.markdown import format_count
from lrpet_mm.utils.atomic import atomic_path, check_writable_dir
from lrpet_mm.utils.values import error_text

PathLike = Union[str, os.PathLike]
CONFIG_DIR = REPO_ROOT / 'configs' / 'lrpet' / '_toy_'
FORMAT_VERSION = 1
RESULT_FILES = ('quality.json', 'quality.md')


# =============================================================================== settings
@dataclass(frozen=True)
class RowSpec:
    """One method (row of the table)."""
    key: str
    label: str
    kind: str  # 'baseline' | 'hook' | 'lra' | 'scratch'
    description: str
    energy_transfer: bool = False
    bn_rectify: bool = False


ROWS: Tuple[RowSpec, ...] = (
    RowSpec('baseline', 'uncompressed baseline', 'baseline',
            'the full network, trained normally, evaluated as is (not factorized)'),
    RowSpec('lrp', 'LRP only', 'hook', 'LRPETHook(energy_transfer=False, bn_rectify=False)',
            False, False),
    RowSpec('lrp_et', 'LRP + ET', 'hook', 'LRPETHook(energy_transfer=True, bn_rectify=False)',
            True, False),
    RowSpec('lrp_bnr', 'LRP + BNR', 'hook', 'LRPETHook(energy_transfer=False, bn_rectify=True)',
            False, True),
    RowSpec('lrpet', 'LRPET (LRP + ET + BNR)', 'hook',
            'LRPETHook(energy_transfer=True, bn_rectify=True)', True, True),
    RowSpec('lra', 'LRA: SVD of trained baseline + fine-tune', 'lra',
            'the trained baseline decomposed by truncated SVD (each conv weight W replaced by '
            'its best rank-k approximation as two convs, BN kept), then fine-tuned for as many '
            'iterations as the baseline was trained (twice the training in all)'),
    RowSpec('scratch', 'factorized net from scratch', 'scratch',
            'the factorized network (same ranks, BN kept while training) trained from a '
            'random initialization'),
)
ROW_KEYS: Tuple[str, ...] = tuple(row.key for row in ROWS)
ROWS_BY_KEY: Dict[str, RowSpec] = {row.key: row for row in ROWS}
# Execution order: the LRA row right after the baseline it starts from.
RUN_ORDER: Tuple[str, ...] = ('baseline', 'lra', 'lrp', 'lrp_et', 'lrp_bnr', 'lrpet', 'scratch')


@dataclass(frozen=True)
class TaskSettings:
    """How one task is trained and measured."""
    key: str  # 'det' | 'seg'
    task: str  # 'detection' | 'segmentation'
    config: str  # toy config file stem in configs/lrpet/_toy_
    model_name: str
    metric: str  # evaluator key
    metric_label: str
    metric_scale: float  # to percent: 100 for a fraction (mAP), 1 for mIoU (already %)
    flops_reduction: float
    batch_size: int
    epochs: Optional[int]  # EpochBasedTrainLoop (detection)
    iters: Optional[int]  # IterBasedTrainLoop (segmentation)
    projection_interval: int  # in epochs (detection) or iterations (segmentation)
    warmup_iters: int

    @property
    def by_epoch(self) -> bool:
        return self.epochs is not None

    def iters_per_epoch(self, num_train: int) -> int:
        return math.ceil(num_train / self.batch_size)

    def train_iters(self, num_train: int) -> int:
        if self.by_epoch:
            return self.epochs * self.iters_per_epoch(num_train)
        return int(self.iters)

    def schedule_text(self, num_train: int) -> str:
        n = self.train_iters(num_train)
        if self.by_epoch:
            return (f'{self.epochs} epochs × {self.iters_per_epoch(num_train)} iterations = '
                    f'{n} iterations of batch {self.batch_size}; an LRPET projection every '
                    f'{self.projection_interval} epoch(s) and at the end')
        return (f'{n} iterations of batch {self.batch_size}; an LRPET projection every '
                f'{self.projection_interval} iterations and at the end')


@dataclass(frozen=True)
class BenchSettings:
    """Everything that defines a benchmark run (stored in the results)."""
    mode: str  # 'full' | 'quick'
    num_train: int
    num_val: int
    img_size: Tuple[int, int]  # (w, h)
    classes: Tuple[str, ...]
    hard: bool
    data_seed: int
    seeds: Tuple[int, ...]
    tasks: Tuple[TaskSettings, ...]
    deterministic: bool = True
    lra_eval_before_finetune: bool = True

    def task(self, key: str) -> TaskSettings:
        for task in self.tasks:
            if task.key == key:
                return task
        raise KeyError(f'no task {key!r} in the settings (have {[t.key for t in self.tasks]})')

    def to_dict(self) -> dict:
        data = asdict(self)
        data['img_size'] = list(self.img_size)
        data['classes'] = list(self.classes)
        data['seeds'] = list(self.seeds)
        data['tasks'] = {}
        for task in self.tasks:
            entry = asdict(task)
            entry['train_iters'] = task.train_iters(self.num_train)
            entry['schedule'] = task.schedule_text(self.num_train)
            data['tasks'][task.key] = entry
        return data


#: Classes of the benchmark data: the five shapes of the generator (ellipse, rectangle,
#: triangle, diamond, cross), one class each.
BENCH_CLASSES = ('person', 'car', 'dog', 'cat', 'aeroplane')


def default_settings(quick: bool = False, seeds: Optional[int] = None,
                     tasks: Sequence[str] = ('det', 'seg'), det_epochs: Optional[int] = None,
                     seg_iters: Optional[int] = None) -> BenchSettings:
    """The full benchmark or the ``quick`` smoke test (tiny budgets, ≤ 3 min on 2 cores).

    Full mode, sized for ≤ 45 min on 2 CPU cores: 48 train / 48 test images of 160×128;
    detection 4 epochs × 24 iterations = 96 iterations (a projection per epoch), segmentation
    192 iterations (a projection every 32); 2 seeds. ``seeds`` (number of seeds, 0 .. N-1),
    ``det_epochs`` and ``seg_iters`` override the defaults (the segmentation projection
    interval stays 1/6 of its iterations).
    """
    for name, value in (('seeds', seeds), ('det_epochs', det_epochs), ('seg_iters', seg_iters)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
    if quick:
        mode, num_train, num_val, num_seeds = 'quick', 4, 4, 1
        epochs, iters, warmup = 2, 4, 2
    else:
        mode, num_train, num_val, num_seeds = 'full', 48, 48, 2
        epochs, iters, warmup = 4, 192, 20
    epochs = det_epochs or epochs
    iters = seg_iters or iters
    det = TaskSettings('det', 'detection', 'faster-rcnn_r18_fpn_toy_voc',
                       'Faster R-CNN R-18 FPN', 'pascal_voc/mAP', 'mAP@0.5', 100.0,
                       flops_reduction=0.5, batch_size=2, epochs=epochs, iters=None,
                       projection_interval=1, warmup_iters=warmup)
    seg = TaskSettings('seg', 'segmentation', 'pspnet_r18-d8_toy_voc12aug',
                       'PSPNet R-18-D8 (ResNetV1c)', 'mIoU', 'mIoU', 1.0,
                       flops_reduction=0.3, batch_size=2, epochs=None, iters=iters,
                       projection_interval=max(1, iters // 6), warmup_iters=0)
    by_key = {'det': det, 'seg': seg}
    if isinstance(tasks, str) or not tasks or any(t not in by_key for t in tasks):
        raise ValueError(f'tasks must be a non-empty subset of {sorted(by_key)}, got {tasks!r}')
    return BenchSettings(mode=mode, num_train=num_train, num_val=num_val, img_size=(160, 128),
                         classes=BENCH_CLASSES, hard=True, data_seed=0,
                         seeds=tuple(range(seeds or num_seeds)),
                         tasks=tuple(by_key[t] for t in ('det', 'seg') if t in tasks))


# =============================================================================== statistics
def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n − 1) of the values that are not None.

    Returns ``(None, None)`` for no value and ``(mean, None)`` for one value.
    """
    data = [float(v) for v in values if v is not None]
    if not data:
        return None, None
    mean = sum(data) / len(data)
    if len(data) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in data) / (len(data) - 1)
    return mean, math.sqrt(var)


def format_mean_std(mean: Optional[float], std: Optional[float], digits: int = 1) -> str:
    """``'41.2 ± 1.3'``, ``'41.2'`` (one seed) or ``'n/a'``."""
    if mean is None:
        return 'n/a'
    if std is None:
        return f'{mean:.{digits}f}'
    return f'{mean:.{digits}f} ± {std:.{digits}f}'


def _percent_change(value: Optional[float], base: Optional[float]) -> Optional[float]:
    if value is None or base in (None, 0):
        return None
    return 100.0 * (value / base - 1.0)


def summarize_row(row: dict) -> dict:
    """The summary of a row's per-seed results: n, mean ± std of the metric (percent), the
    complexity (equal for every seed; None if the seeds disagree) and the error count."""
    seeds = row.get('seeds', {})
    good = [entry for entry in seeds.values() if not entry.get('error')]
    mean, std = mean_std([entry.get('metric_pct') for entry in good])
    summary = dict(n=len(good), metric_mean=mean, metric_std=std,
                   errors=sum(1 for entry in seeds.values() if entry.get('error')))
    for key in ('backbone_flops', 'backbone_params', 'model_params'):
        values = {entry.get(key) for entry in good}
        summary[key] = values.pop() if len(values) == 1 else None
    before = [entry.get('extra', {}).get('metric_pct_before_finetune') for entry in good]
    if any(v is not None for v in before):
        summary['metric_before_finetune_mean'], summary['metric_before_finetune_std'] = (
            mean_std(before))
    return summary


# =============================================================================== formatting
def markdown_task_table(task: dict) -> str:
    """The Markdown table of one task's results (``results['tasks'][key]``)."""
    label = task['metric_label']
    rows = task['rows']
    base = (rows.get('baseline') or {}).get('summary') or {}
    lines = [
        f'| method | {label} (%), mean ± std | per seed | backbone FLOPs | vs baseline '
        f'| backbone params | vs baseline | model params |',
        '|---|---:|---|---:|---:|---:|---:|---:|'
    ]
    for key in ROW_KEYS:
        if key not in rows:
            continue
        row = rows[key]
        summary = row.get('summary') or summarize_row(row)
        per_seed = []
        for seed, entry in sorted(row.get('seeds', {}).items(), key=lambda kv: int(kv[0])):
            if entry.get('error'):
                per_seed.append(f's{seed}: error')
            elif entry.get('metric_pct') is None:
                per_seed.append(f's{seed}: n/a')
            else:
                per_seed.append(f's{seed}: {entry["metric_pct"]:.1f}')
        metric = format_mean_std(summary.get('metric_mean'), summary.get('metric_std'))
        if summary.get('errors'):
            metric += f' ({summary["errors"]} failed)'
        flops_change = _percent_change(summary.get('backbone_flops'), base.get('backbone_flops'))
        params_change = _percent_change(summary.get('backbone_params'),
                                        base.get('backbone_params'))
        lines.append(
            f'| {row["label"]} | {metric} | {", ".join(per_seed)} '
            f'| {format_count(summary.get("backbone_flops"))} '
            f'| {"" if flops_change is None or key == "baseline" else f"{flops_change:+.1f} %"} '
            f'| {format_count(summary.get("backbone_params"))} '
            f'| {"" if params_change is None or key == "baseline" else f"{params_change:+.1f} %"} '
            f'| {format_count(summary.get("model_params"))} |')
    return '\n'.join(lines) + '\n'


def comparison_lines(task: dict) -> List[str]:
    """Plain differences of LRPET's mean metric to the other rows (percentage points)."""
    rows = task['rows']
    lrpet = (rows.get('lrpet') or {}).get('summary') or {}
    if lrpet.get('metric_mean') is None:
        return []
    parts = []
    for key in ('baseline', 'lra', 'scratch', 'lrp', 'lrp_et', 'lrp_bnr'):
        other = (rows.get(key) or {}).get('summary') or {}
        if other.get('metric_mean') is None:
            continue
        diff = lrpet['metric_mean'] - other['metric_mean']
        parts.append(f'{ROWS_BY_KEY[key].label} {diff:+.1f}')
    if not parts:
        return []
    return [f'LRPET minus each other row ({task["metric_label"]} mean, percentage points): '
            + '; '.join(parts) + '.']


def markdown_results(results: dict) -> str:
    """The whole ``quality.md``."""
    settings = results['settings']
    machine = results.get('machine', {})
    wall = results.get('wall_time_s')
    lines = ['# Quality at small scale: LRPET vs its ablations, LRA and training from scratch',
             '']
    if settings['mode'] == 'quick':
        lines += ['**Quick mode**: a smoke test with tiny budgets; its numbers say nothing about '
                  'the methods.', '']
    if not results.get('complete'):
        lines += ['**Incomplete run** (interrupted, or still running): the table holds the rows '
                  'finished so far.', '']
    if results.get('errors'):
        lines += [f'**{len(results["errors"])} row run(s) failed**: see `errors` in '
                  '`quality.json`.', '']
    seeds = settings['seeds']
    lines += [
        f'- command: `{results.get("command", "")}` ({settings["mode"]} mode)',
        _time_line(wall, results.get('cpu_time_s'), machine.get('threads')),
        f'- machine: {machine.get("cpu", "?")}, {machine.get("usable_cores", "?")} '
        f'CPU core(s) available, torch {machine.get("torch", "?")} '
        f'({machine.get("threads", "?")} threads), mmdet {machine.get("mmdet", "?")}, '
        f'mmseg {machine.get("mmseg", "?")}, mmengine {machine.get("mmengine", "?")}; '
        f'load average at start {machine.get("load_average", "?")}',
        f'- code: commit {(machine.get("git_commit") or "?")[:12]}'
        f'{" + uncommitted changes" if machine.get("git_dirty") else ""}',
        f'- data: built-in synthetic VOC layout (`generate_synthetic_voc(hard=True)`: textured '
        f'backgrounds, {len(settings["classes"])} classes drawn as different shapes '
        f'({", ".join(settings["classes"])}), overlap, object sides 15–75 % of the short image '
        f'side), {settings["num_train"]} train / {settings["num_val"]} test images of '
        f'{settings["img_size"][0]}×{settings["img_size"][1]}, data seed '
        f'{settings["data_seed"]}; the same data for every row and seed',
        f'- seeds: {", ".join(str(s) for s in seeds)} (mean ± sample standard deviation over '
        f'seeds; `randomness=dict(seed=s, deterministic={settings["deterministic"]})`)',
        '- every row is evaluated as the **compact** (factorized) model, except the baseline; '
        'FLOPs (one multiply-add = one FLOP, `mmengine.analysis`) and parameters are counted on '
        'the evaluated model at the input size the ranks were planned for', '']
    for key, task in results['tasks'].items():
        tset = settings['tasks'][key]
        plan = task.get('rank_plan') or {}
        lines += [f'## {task["task"].capitalize()}: {task["model"]}, '
                  f'−{100 * tset["flops_reduction"]:.0f} % backbone FLOPs', '']
        lines += [f'- training, every row: {tset["schedule"]}; SGD as the toy config, same '
                  'schedule for every row; LRA: the trained baseline is decomposed, then '
                  f'fine-tuned for another {task.get("train_iters", "?")} iterations with the '
                  'same schedule']
        if plan:
            c, h, w = plan['input_shape']
            lines.append(
                f'- ranks: LRPETHook\'s FLOPs-budget plan, uniform rank ratio '
                f'{plan["rank_ratio"]:.4f} over {plan["num_layers"]} backbone convs '
                f'({plan["num_skipped"]} left alone), backbone FLOPs at {c}×{h}×{w}: '
                f'{format_count(plan["flops_before"])} → {format_count(plan["flops_after"])} '
                f'({100 * plan["reduction"]:.2f} % fewer); the same ranks for every compressed '
                'row')
        lines += ['', markdown_task_table(task)]
        lines += comparison_lines(task)
        lra = (task['rows'].get('lra') or {}).get('summary') or {}
        if lra.get('metric_before_finetune_mean') is not None:
            before = format_mean_std(lra['metric_before_finetune_mean'],
                                     lra.get('metric_before_finetune_std'))
            lines.append(f'LRA right after the SVD, before fine-tuning: {before} '
                         f'{task["metric_label"]} (%).')
        lines.append('')
    lines += ['### Rows', '']
    for row in ROWS:
        lines.append(f'- **{row.label}**: {row.description}.')
    lines.append('')
    if results.get('errors'):
        lines += ['### Errors', '']
        for err in results['errors']:
            lines.append(f'- {err["task"]} / {err["row"]} / seed {err["seed"]}: '
                         f'`{err["error"].splitlines()[0] if err["error"] else ""}`')
        lines.append('')
    return '\n'.join(lines)


def _time_line(wall: Optional[float], cpu: Optional[float], threads) -> str:
    if wall is None:
        return '- wall time: n/a'
    line = f'- wall time: {wall / 60:.1f} min'
    if cpu is not None:
        line += f'; process CPU time {cpu / 60:.1f} min ({threads or "?"} torch threads)'
    return line


def write_results(results: dict, out_dir: PathLike) -> Tuple[Path, Path]:
    """Write ``quality.json`` and ``quality.md`` atomically (temporary file, then rename)."""
    json_path = common.write_results(check_writable_dir(out_dir) / RESULT_FILES[0], results,
                                     markdown_results(results))
    return json_path, json_path.with_suffix('.md')


# =============================================================================== configs
def _load_base_config(task: TaskSettings, settings: BenchSettings, data_root: Path,
                      work_dir: Path, seed: int):
    """The toy config of ``task``, adapted for the benchmark (see the module docstring)."""
    from mmengine.config import Config

    from lrpet_mm.datasets import set_data_root

    path = CONFIG_DIR / f'{task.config}.py'
    if not path.is_file():
        raise FileNotFoundError(f'toy config {path} not found (the benchmark runs from a '
                                'checkout of the repository)')
    cfg = _unformatted(Config.fromfile(str(path)))
    set_data_root(cfg, str(data_root))
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'bench-{task.key}-{uuid.uuid4().hex[:8]}'
    if cfg.get('visualizer') is not None:
        cfg.visualizer.pop('name', None)  # named after experiment_name: unique per runner
    cfg.custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
    cfg.custom_hooks = []
    cfg.randomness = dict(seed=int(seed), deterministic=settings.deterministic)
    cfg.train_dataloader.batch_size = task.batch_size
    # No validation while training: each row is evaluated once, as its compact model.
    cfg.val_dataloader = None
    cfg.val_cfg = None
    cfg.val_evaluator = None
    cfg.load_from = None
    cfg.resume = False
    n_iters = task.train_iters(settings.num_train)
    if task.key == 'det':
        # Smaller heads than the toy config (FPN/RPN/RoI 128 channels, 256-d box fcs, 64
        # sampled RoIs): on CPU they otherwise take ~2/3 of the step time; the backbone,
        # which every method compresses, stays the toy ResNet-18.
        model = cfg.model
        model.neck.out_channels = 128
        model.rpn_head.in_channels = 128
        model.rpn_head.feat_channels = 128
        model.roi_head.bbox_roi_extractor.out_channels = 128
        model.roi_head.bbox_head.in_channels = 128
        model.roi_head.bbox_head.fc_out_channels = 256
        model.train_cfg.rcnn.sampler.num = 64
        cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=task.epochs,
                             val_interval=task.epochs + 1)
        schedulers = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
                           end=max(1, task.warmup_iters))]
        if task.epochs >= 2:
            schedulers.append(dict(type='MultiStepLR', begin=0, end=task.epochs, by_epoch=True,
                                   milestones=[task.epochs - 1], gamma=0.1))
        cfg.param_scheduler = schedulers
        cfg.default_hooks.logger = dict(type='LoggerHook', interval=10)
        cfg.default_hooks.checkpoint = dict(
            type='CheckpointHook', interval=task.epochs, by_epoch=True, max_keep_ckpts=1,
            save_optimizer=False, save_param_scheduler=False, save_last=True)
    else:
        cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=n_iters,
                             val_interval=n_iters + 1)
        cfg.param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0,
                                    end=n_iters, by_epoch=False)]
        cfg.default_hooks.logger = dict(type='LoggerHook', interval=10,
                                        log_metric_by_epoch=False)
        cfg.default_hooks.checkpoint = dict(
            type='CheckpointHook', interval=n_iters, by_epoch=False, max_keep_ckpts=1,
            save_optimizer=False, save_param_scheduler=False, save_last=True)
    return cfg


def hook_config(task: TaskSettings, row: RowSpec, rank_ratio: float) -> dict:
    """The LRPETHook entry of a hook row."""
    return dict(type='LRPETHook', rank_ratio=float(rank_ratio),
                interval=task.projection_interval, by_epoch=task.by_epoch,
                energy_transfer=row.energy_transfer, bn_rectify=row.bn_rectify)


def factorized_train_config(cfg, components: Mapping[str, dict]):
    """A copy of ``cfg`` whose components are factorized with the given ranks and their BNs
    kept (``LRPETFactorized`` without ``folded_norms``): the network of the LRA and
    from-scratch rows while they train."""
    new = copy.deepcopy(cfg)
    for component, spec in components.items():
        new.model[component] = dict(type='LRPETFactorized', module=new.model[component],
                                    ranks=dict(spec['ranks']), folded_norms={})
    return new


# =============================================================================== running
class RowError(RuntimeError):
    """A row could not be run (recorded in the results, the other rows go on)."""


@dataclass
class TaskContext:
    """Per (task, seed) state shared by the rows."""
    task: TaskSettings
    plan: object  # RankPlan
    plan_info: dict
    norms: Dict[str, str]  # planned conv -> its BN (folded in the compact model)
    expected_components: Dict[str, dict]
    input_shape: Tuple[int, int, int]
    baseline_checkpoint: Optional[Path] = None
    baseline_config: object = None


class _GlobalState:
    """The process-wide state the Runners change (``randomness=dict(deterministic=True)``
    turns on ``torch.use_deterministic_algorithms``; seeds), restored after the benchmark so
    that the calling process (e.g. a test session) is left as it was."""

    def __init__(self):
        import random

        import numpy as np
        import torch

        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        self.cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def restore(self) -> None:
        import random

        import numpy as np
        import torch

        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = self.cudnn
        random.setstate(self.rng[0])
        np.random.set_state(self.rng[1])
        torch.set_rng_state(self.rng[2])


def _last_checkpoint(work_dir: Path) -> Path:
    marker = work_dir / 'last_checkpoint'
    if not marker.is_file():
        raise RowError(f'training in {work_dir} saved no checkpoint')
    path = Path(marker.read_text().strip())
    if not path.is_file():
        raise RowError(f'last checkpoint {path} of {work_dir} is missing')
    return path


def train(cfg) -> Tuple[Path, dict]:
    """Train ``cfg`` in this process; returns the final checkpoint and a few scalars."""
    runner = quiet_runner(cfg)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter('ignore')
            runner.train()
        info = dict(iters=int(runner.iter))
        hub = runner.message_hub
        for key in ('train/loss', 'train/lrpet_energy_kept', 'train/lrpet_energy_kept_min'):
            with contextlib.suppress(Exception):
                info[key.split('/', 1)[1]] = float(hub.get_scalar(key).current())
        return _last_checkpoint(Path(cfg.work_dir)), info
    finally:
        del runner
        gc.collect()


def _save_compact(cfg, model, meta: dict, out_dir: Path, name: str) -> Tuple[Path, Path]:
    """Write ``<name>.py`` (``cfg``) and ``<name>.pth`` (``model``'s state) atomically."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt_path = out_dir / f'{name}.py', out_dir / f'{name}.pth'
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(ckpt_path) as tmp_ckpt, atomic_path(cfg_path) as tmp_cfg:
        torch.save(dict(state_dict=state, meta=meta), tmp_ckpt)
        cfg.dump(str(tmp_cfg))
    return cfg_path, ckpt_path


def _unformatted(cfg):
    """``cfg`` with yapf formatting of its text off. mmengine formats the whole config with
    yapf each time a Runner logs or dumps it (~1.5 s per call here, several calls per row);
    ``Config.fromfile(format_python_code=False)`` is ignored for plain (non-lazy) configs in
    mmengine 0.10, hence the attribute. Deep copies (Runner, test configs) keep it."""
    object.__setattr__(cfg, '_format_python_code', False)
    return cfg


def _load_config(path: Path):
    from mmengine.config import Config

    return _unformatted(Config.fromfile(str(path)))


def _same_components(got: Mapping[str, dict], expected: Mapping[str, dict]) -> bool:
    def norm(spec):
        return {c: (dict(s['ranks']), dict(s.get('folded_norms') or {})) for c, s in spec.items()}
    return norm(got) == norm(expected)


class QualityBenchmark:
    """Runs the rows, records results after each one and writes them (see :func:`run_benchmark`)."""

    def __init__(self, settings: BenchSettings, work_dir: PathLike, out_dir: PathLike,
                 rows: Sequence[str] = ROW_KEYS, keep_checkpoints: bool = False,
                 log: Callable[[str], None] = print, command: str = ''):
        unknown = [r for r in rows if r not in ROWS_BY_KEY]
        if unknown or not rows:
            raise ValueError(f'rows must be a non-empty subset of {list(ROW_KEYS)}, got '
                             f'{list(rows)!r}')
        self.settings = settings
        self.rows = [r for r in ROW_KEYS if r in rows]
        self.work_dir = Path(work_dir).absolute()
        self.out_dir = Path(out_dir).absolute()
        self.keep_checkpoints = keep_checkpoints
        self._log = log
        self.start = None
        self.results = dict(
            benchmark='lrpet_mm quality benchmark', format_version=FORMAT_VERSION,
            command=command, mode=settings.mode, started=None, finished=None, complete=False,
            wall_time_s=None, cpu_time_s=None, settings=settings.to_dict(), machine={},
            tasks={}, errors=[])

    # ------------------------------------------------------------------ helpers
    def log(self, message: str) -> None:
        elapsed = 0.0 if self.start is None else time.time() - self.start
        self._log(f'[bench_quality {elapsed:7.1f}s] {message}')

    def save(self) -> Tuple[Path, Path]:
        if self.start is not None:
            self.results['wall_time_s'] = time.time() - self.start
            self.results['cpu_time_s'] = time.process_time() - self.cpu_start
        return write_results(self.results, self.out_dir)

    def _cleanup(self, *paths: Path) -> None:
        if self.keep_checkpoints:
            return
        for path in paths:
            if path is None:
                continue
            path = Path(path)
            if path.is_dir():
                for ckpt in path.rglob('*.pth'):
                    ckpt.unlink()
            elif path.suffix == '.pth' and path.is_file():
                path.unlink()

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        """Run every (seed, task, row); returns 0, or 1 if any row failed."""
        self.start, self.cpu_start = time.time(), time.process_time()
        self.results['started'] = datetime.datetime.now().astimezone().isoformat(
            timespec='seconds')
        self.results['machine'] = common.machine_info()
        s = self.settings
        self.log(f'{s.mode} mode: tasks {[t.key for t in s.tasks]}, rows {self.rows}, seeds '
                 f'{list(s.seeds)}; work dir {self.work_dir}, results in {self.out_dir}')
        saved = _GlobalState()
        try:
            data_root = generate_synthetic_voc(
                self.work_dir / 'data' / s.mode / 'VOCdevkit', num_train=s.num_train,
                num_val=s.num_val, img_size=s.img_size, seed=s.data_seed, classes=s.classes,
                hard=s.hard, overwrite=True)
            self.log(f'data: {data_root}')
            for task in s.tasks:
                self.results['tasks'][task.key] = dict(
                    task=task.task, model=task.model_name, metric=task.metric,
                    metric_label=task.metric_label,
                    train_iters=task.train_iters(s.num_train), rank_plan=None,
                    rows={key: dict(label=ROWS_BY_KEY[key].label,
                                    description=ROWS_BY_KEY[key].description, seeds={},
                                    summary=None) for key in self.rows})
            self.save()
            contexts = {}
            for seed in s.seeds:
                for task in s.tasks:
                    try:
                        self._run_task_seed(task, seed, data_root, contexts)
                    except Exception as e:  # noqa: BLE001 - outside any row: record, go on
                        self._record_missing(task, seed, f'{task.key} seed {seed} stopped: '
                                             f'{error_text(e, 600)}')
        finally:
            saved.restore()
            self.results['finished'] = datetime.datetime.now().astimezone().isoformat(
                timespec='seconds')
            self.results['complete'] = self._all_done()
            json_path, md_path = self.save()
            self.log(f'wrote {json_path} and {md_path}')
        failed = len(self.results['errors'])
        self.log(f'done in {(time.time() - self.start) / 60:.1f} min; '
                 f'{failed} row run(s) failed' if failed else
                 f'done in {(time.time() - self.start) / 60:.1f} min; all rows succeeded')
        return 1 if failed else 0

    def _all_done(self) -> bool:
        for task in self.settings.tasks:
            rows = self.results['tasks'].get(task.key, {}).get('rows', {})
            for key in self.rows:
                if len(rows.get(key, {}).get('seeds', {})) != len(self.settings.seeds):
                    return False
        return True

    def _record_missing(self, task: TaskSettings, seed: int, error: str) -> None:
        """Record ``error`` for every row of (task, seed) that has no result yet."""
        self.log(error)
        rows = self.results['tasks'][task.key]['rows']
        for key in self.rows:
            if str(seed) not in rows[key]['seeds']:
                self._record(task, key, seed, dict(error=error))

    def _record(self, task: TaskSettings, key: str, seed: int, entry: dict) -> None:
        row = self.results['tasks'][task.key]['rows'][key]
        row['seeds'][str(seed)] = entry
        row['summary'] = summarize_row(row)
        if entry.get('error'):
            self.results['errors'].append(dict(task=task.key, row=key, seed=seed,
                                               error=entry['error']))
        self.save()

    def _run_task_seed(self, task: TaskSettings, seed: int, data_root: Path,
                       contexts: dict) -> None:
        seed_dir = self.work_dir / 'runs' / self.settings.mode / task.key / f'seed{seed}'
        if seed_dir.exists():
            shutil.rmtree(seed_dir)
        try:
            ctx = self._context(task, seed, data_root, seed_dir, contexts)
        except Exception as e:  # noqa: BLE001 - recorded, the other tasks go on
            self._record_missing(task, seed, f'rank planning failed: {error_text(e, 600)}')
            return
        for key in RUN_ORDER:
            if key not in self.rows and not (key == 'baseline' and 'lra' in self.rows):
                continue
            row = ROWS_BY_KEY[key]
            row_dir = seed_dir / key
            t0, c0 = time.time(), time.process_time()
            self.log(f'{task.key} seed {seed} {key}: start')
            try:
                entry = self._run_row(task, row, seed, data_root, row_dir, ctx)
            except Exception as e:  # noqa: BLE001 - recorded, the other rows go on
                entry = dict(error=error_text(e, 600), traceback=traceback.format_exc(limit=8))
                self.log(f'{task.key} seed {seed} {key}: FAILED after {time.time() - t0:.0f} s: '
                         f'{entry["error"]}')
            else:
                metric = entry.get('metric_pct')
                self.log(f'{task.key} seed {seed} {key}: {task.metric_label} '
                         f'{"n/a" if metric is None else f"{metric:.2f}"} %, backbone '
                         f'{format_count(entry.get("backbone_flops"))} FLOPs / '
                         f'{format_count(entry.get("backbone_params"))} params, '
                         f'{time.time() - t0:.0f} s (CPU {time.process_time() - c0:.0f} s)')
            entry['wall_s'] = time.time() - t0
            entry['cpu_s'] = time.process_time() - c0
            if key in self.rows:
                self._record(task, key, seed, entry)
            if key == 'lra' or ('lra' not in self.rows and key == 'baseline'):
                self._cleanup(ctx.baseline_checkpoint)
            self._cleanup(row_dir if key != 'baseline' else None)

    # ------------------------------------------------------------------ planning
    def _context(self, task: TaskSettings, seed: int, data_root: Path, seed_dir: Path,
                 contexts: dict) -> TaskContext:
        """The rank plan of ``task`` (computed once, reused for every seed)."""
        from lrpet_mm.engine.input_shape import infer_input_shape
        from lrpet_mm.engine.planning import plan_ranks_for_flops
        from lrpet_mm.lowrank import get_scope_module, select_targets
        from lrpet_mm.models import components_of, planned_layers
        from lrpet_mm.models.factorize_checkpoint import build_model_from_config

        if task.key in contexts:
            ctx = contexts[task.key]
            return replace(ctx, baseline_checkpoint=None, baseline_config=None)
        cfg = _load_base_config(task, self.settings, data_root, seed_dir / 'plan', seed)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = build_model_from_config(cfg)
            shape = infer_input_shape(cfg)
            selection = select_targets(model, 'backbone', None, None, True, 'skip')
            result = plan_ranks_for_flops(get_scope_module(model, 'backbone'), 'backbone',
                                          selection, task.flops_reduction, shape)
        plan = result.plan
        norms = {layer.name: layer.folded_norm for layer in planned_layers(model, plan)
                 if layer.folded_norm}
        info = result.to_dict()
        info.update(num_layers=len(plan), num_skipped=len(plan.skipped),
                    ranks={name: layer.rank for name, layer in plan.layers.items()},
                    skipped=dict(plan.skipped))
        self.results['tasks'][task.key]['rank_plan'] = info
        self.log(f'{task.key}: rank ratio {result.rank_ratio:.4f} on {len(plan)} backbone convs '
                 f'removes {100 * result.reduction:.2f} % of the backbone FLOPs at input '
                 f'{tuple(shape)} (target {100 * task.flops_reduction:.0f} %)')
        ctx = TaskContext(task, plan, info, norms,
                          components_of({n: layer.rank for n, layer in plan.layers.items()}, norms),
                          tuple(shape))
        contexts[task.key] = ctx
        del model
        return replace(ctx)

    # ------------------------------------------------------------------ rows
    def _run_row(self, task: TaskSettings, row: RowSpec, seed: int, data_root: Path,
                 row_dir: Path, ctx: TaskContext) -> dict:
        cfg = _load_base_config(task, self.settings, data_root, row_dir / 'train', seed)
        n_iters = task.train_iters(self.settings.num_train)
        entry = dict(error=None, train_iters=n_iters, extra={})
        t0 = time.time()
        if row.kind == 'baseline':
            ckpt, info = train(cfg)
            entry['train_s'] = time.time() - t0
            ctx.baseline_checkpoint, ctx.baseline_config = ckpt, cfg
            eval_cfg, eval_ckpt = cfg, ckpt
        elif row.kind == 'hook':
            cfg.custom_hooks = [hook_config(task, row, ctx.plan_info['rank_ratio'])]
            ckpt, info = train(cfg)
            entry['train_s'] = time.time() - t0
            eval_cfg, eval_ckpt = self._factorize_hook_run(cfg, ckpt, row_dir, ctx)
        elif row.kind == 'lra':
            if ctx.baseline_checkpoint is None:
                raise RowError('the baseline of this seed did not train; LRA starts from it')
            eval_cfg, eval_ckpt, info = self._lra(task, cfg, row_dir, ctx, entry)
            entry['finetune_iters'] = n_iters
            entry['train_s'] = time.time() - t0
        elif row.kind == 'scratch':
            ft_cfg = factorized_train_config(cfg, ctx.expected_components)
            ckpt, info = train(ft_cfg)
            entry['train_s'] = time.time() - t0
            eval_cfg, eval_ckpt = self._fold(cfg, ft_cfg, ckpt, row_dir / 'compact', ctx,
                                             'scratch_compact')
        else:  # pragma: no cover - ROWS only has the kinds above
            raise ValueError(f'unknown row kind {row.kind!r}')
        if info.get('iters') != n_iters:
            raise RowError(f'trained {info.get("iters")} iterations, expected {n_iters}')
        entry['extra'].update({k: v for k, v in info.items() if k != 'iters'})
        t1 = time.time()
        entry.update(self._evaluate(task, eval_cfg, eval_ckpt, row_dir / 'eval'))
        entry.update(self._complexity(eval_cfg, ctx))
        entry['eval_s'] = time.time() - t1
        if row.kind != 'baseline' and entry['backbone_flops'] != ctx.plan_info['flops_after']:
            entry.setdefault('warnings', []).append(
                f'the compact backbone has {entry["backbone_flops"]} FLOPs, the rank plan '
                f'counted {ctx.plan_info["flops_after"]}')
        return entry

    def _evaluate(self, task: TaskSettings, cfg, checkpoint: Path, work_dir: Path) -> dict:
        from lrpet_mm.report import evaluate_checkpoint

        metrics = evaluate_checkpoint(cfg, checkpoint, work_dir, progress=False)
        if task.metric not in metrics:
            raise RowError(f'the test evaluator returned no {task.metric!r} '
                           f'(got {sorted(metrics)})')
        value = metrics[task.metric]
        pct = None if value is None or not math.isfinite(value) else value * task.metric_scale
        return dict(metric=value, metric_pct=pct)

    def _complexity(self, cfg, ctx: TaskContext) -> dict:
        from lrpet_mm.engine.flops import count_flops, count_params
        from lrpet_mm.models.factorize_checkpoint import build_model_from_config

        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = build_model_from_config(cfg)
            return dict(backbone_flops=count_flops(model.backbone, ctx.input_shape),
                        backbone_params=count_params(model.backbone),
                        model_params=count_params(model))

    def _factorize_hook_run(self, cfg, ckpt: Path, row_dir: Path, ctx: TaskContext):
        """LRPET-trained checkpoint -> compact config + checkpoint, after checking the run used
        the reference ranks. The steps of ``factorize_checkpoint`` (build, load every key,
        ``factorize_model`` with its low-rank check, ``compact_config``), in process."""
        from lrpet_mm.engine.checkpoint_meta import load_checkpoint_file, rank_plan_from_checkpoint
        from lrpet_mm.models import compact_config, factorize_model
        from lrpet_mm.models.factorize_checkpoint import (
            build_model_from_config,
            load_state_dict_strict,
        )

        checkpoint = load_checkpoint_file(ckpt)
        plan = rank_plan_from_checkpoint(checkpoint, str(ckpt))
        ranks = {name: layer.rank for name, layer in plan.layers.items()}
        if ranks != ctx.plan_info['ranks']:
            raise RowError('the hook planned other ranks than the reference plan')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = build_model_from_config(cfg)
            load_state_dict_strict(model, checkpoint, str(ckpt))
            compact = factorize_model(model, plan)  # raises unless every layer is rank <= k
        if not _same_components(compact.components, ctx.expected_components):
            raise RowError('the compact model differs from the reference structure')
        errors = [layer.relative_error for layer in compact.layers]
        cfg_path, ckpt_path = _save_compact(
            compact_config(cfg, compact), compact.model,
            dict(source_checkpoint=str(ckpt), max_relative_rank_error=max(errors)),
            row_dir / 'compact', 'compact')
        return _load_config(cfg_path), ckpt_path

    def _fold(self, base_cfg, trained_cfg, ckpt: Path, out_dir: Path, ctx: TaskContext,
              name: str):
        """A trained factorized (BN kept) model -> the compact config + checkpoint."""
        from lrpet_mm.engine.checkpoint_meta import load_checkpoint_file
        from lrpet_mm.models import compact_config, fold_factorized_norms
        from lrpet_mm.models.factorize_checkpoint import (
            build_model_from_config,
            load_state_dict_strict,
        )

        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = build_model_from_config(trained_cfg)
            load_state_dict_strict(model, load_checkpoint_file(ckpt), str(ckpt))
            compact = fold_factorized_norms(model, ctx.norms, copy_model=False)
        if not _same_components(compact.components, ctx.expected_components):
            raise RowError('the compact model differs from the reference structure')
        new_cfg = compact_config(base_cfg, compact)
        cfg_path, ckpt_path = _save_compact(new_cfg, compact.model,
                                            dict(source_checkpoint=str(ckpt)), out_dir, name)
        return _load_config(cfg_path), ckpt_path

    def _lra(self, task: TaskSettings, cfg, row_dir: Path, ctx: TaskContext, entry: dict):
        """Decompose the trained baseline by truncated SVD, (evaluate,) fine-tune, fold."""
        import torch

        from lrpet_mm.engine.checkpoint_meta import load_checkpoint_file
        from lrpet_mm.models import decompose_model
        from lrpet_mm.models.factorize_checkpoint import (
            build_model_from_config,
            load_state_dict_strict,
        )

        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            base = build_model_from_config(ctx.baseline_config)
            load_state_dict_strict(base, load_checkpoint_file(ctx.baseline_checkpoint),
                                   str(ctx.baseline_checkpoint))
            decomposed = decompose_model(base, ctx.plan)
        energies = [layer.energy_kept for layer in decomposed.layers]
        entry['extra']['svd_energy_kept_mean'] = sum(energies) / len(energies)
        entry['extra']['svd_energy_kept_min'] = min(energies)
        ft_cfg = factorized_train_config(cfg, ctx.expected_components)
        row_dir.mkdir(parents=True, exist_ok=True)
        dec_path = row_dir / 'decomposed.pth'
        state = {k: v.detach().cpu() for k, v in decomposed.model.state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            check = build_model_from_config(ft_cfg)  # every key must load (the Runner's
            load_state_dict_strict(check, dict(state_dict=state), str(dec_path))  # is lax)
        with atomic_path(dec_path) as tmp:
            torch.save(dict(state_dict=state, meta=dict(
                lrpet_decomposed=dict(source_checkpoint=str(ctx.baseline_checkpoint)))), tmp)
        del base, check
        if self.settings.lra_eval_before_finetune:
            before_cfg, before_ckpt = self._fold(cfg, ft_cfg, dec_path, row_dir / 'before',
                                                 ctx, 'lra_before_finetune')
            before = self._evaluate(task, before_cfg, before_ckpt, row_dir / 'eval_before')
            entry['extra']['metric_before_finetune'] = before['metric']
            entry['extra']['metric_pct_before_finetune'] = before['metric_pct']
        ft_cfg.load_from = str(dec_path)
        ckpt, info = train(ft_cfg)
        eval_cfg, eval_ckpt = self._fold(cfg, ft_cfg, ckpt, row_dir / 'compact', ctx,
                                         'lra_compact')
        return eval_cfg, eval_ckpt, info


def run_benchmark(settings: BenchSettings, work_dir: PathLike, out_dir: PathLike,
                  rows: Sequence[str] = ROW_KEYS, keep_checkpoints: bool = False,
                  log: Callable[[str], None] = print, command: str = '') -> Tuple[int, dict]:
    """Run the benchmark; returns ``(exit code, results)``: 0 if every row succeeded, else 1.

    Results are written to ``out_dir/quality.{json,md}`` after every row (atomically), so an
    interrupted run leaves the rows finished so far (``complete: false``).
    """
    bench = QualityBenchmark(settings, work_dir, out_dir, rows, keep_checkpoints, log, command)
    code = bench.run()
    return code, bench.results
