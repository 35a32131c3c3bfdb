"""Evidence benchmark: LRPET against decompose-then-finetune and channel pruning, fine-tuned
from a pretrained backbone, with paired seeds.

One task per run (``--tasks det`` or ``--tasks seg``): the upstream VOC Faster R-CNN / PSPNet
configs at CPU size (the toy configs in ``configs/lrpet/_toy_`` with a ResNet-18 deep-stem
backbone) are fine-tuned on VOC-layout data from a backbone the package pretrains on a
synthetic classification task (:func:`lrpet_mm.models.pretrained_backbone`, cached on disk,
loaded through ``init_cfg=dict(type='Pretrained')``). Rows (``ROWS``), every one trained for
``T`` iterations in all:

=============== ==========================================================================
baseline        the uncompressed network, ``T`` iterations
lrpet           ``LRPETHook(flops_reduction=r)`` with its defaults, ``T``
paper           LRPETHook as the paper: ``bn_recovery='eq16'``, uniform ranks, ``T``
energy          LRPETHook with ``rank_allocation='energy'``, ``T``
lra_half        LRA at equal budget: the baseline's checkpoint at ``T/2``, truncated SVD at
                the uniform ranks, fine-tuned ``T/2`` continuing the schedule
lra_pretrained  LRA from the pretrained backbone: truncated SVD, then ``T``
prune           channel pruning (Torch-Pruning, L2 magnitude of the blocks' inner channels)
                of the baseline at ``T/2`` to the same backbone FLOPs, fine-tuned ``T/2``
=============== ==========================================================================

Seeds are paired: seed ``s`` gives every row the same initial weights (one initial checkpoint
per seed: pretrained backbone + heads initialised with ``torch.manual_seed(s)``), the same
data order (``InfiniteSampler(seed=s)``) and the same test set. Every compressed row is
evaluated as the model a user deploys (factorized, BNs folded; or pruned). The latency column
times each row's deployed backbone of seed 0 in ONNX Runtime, all rows interleaved in one run.

:func:`run_benchmark` does the work; ``benchmarks/bench_quality.py`` is the command line.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import io
import logging
import math
import os
import shutil
import sys
import time
import traceback
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from benchlib import common
from benchlib.common import REPO_ROOT
from lrpet_mm.datasets.synthetic_voc import generate_synthetic_voc
from lrpet_mm.models.pretrained_backbone import PretrainSettings
from lrpet_mm.report.evaluation import quiet_runner
from lrpet_mm.report.markdown import format_count
from lrpet_mm.utils.atomic import atomic_path, check_writable_dir
from lrpet_mm.utils.values import error_text

PathLike = Union[str, os.PathLike]
CONFIG_DIR = REPO_ROOT / 'configs' / 'lrpet' / '_toy_'
FORMAT_VERSION = 2


# =============================================================================== settings
@dataclass(frozen=True)
class RowSpec:
    """One method (row of the table)."""
    key: str
    label: str
    kind: str  # 'baseline' | 'hook' | 'lra_half' | 'lra_pretrained' | 'prune'
    description: str
    hook_kwargs: Tuple[Tuple[str, object], ...] = ()


ROWS: Tuple[RowSpec, ...] = (
    RowSpec('baseline', 'baseline (uncompressed)', 'baseline',
            'the full network fine-tuned for T iterations, evaluated as is'),
    RowSpec('lrpet', 'LRPET (defaults)', 'hook',
            'LRPETHook(flops_reduction=r) with its defaults (in-span BN recovery, uniform '
            'ranks, frozen layers skipped), T iterations, then factorized'),
    RowSpec('paper', 'LRPET paper-exact', 'hook',
            "LRPETHook(flops_reduction=r, bn_recovery='eq16', rank_allocation='uniform'): "
            'the BN recovery of the paper\'s eq. 16, T iterations, then factorized',
            (('bn_recovery', 'eq16'), ('rank_allocation', 'uniform'))),
    RowSpec('energy', 'LRPET energy ranks', 'hook',
            "LRPETHook(flops_reduction=r, rank_allocation='energy'): the same FLOPs budget "
            'spread by singular-value energy, T iterations, then factorized',
            (('rank_allocation', 'energy'),)),
    RowSpec('lra_half', 'LRA, equal budget', 'lra_half',
            'the baseline\'s checkpoint at T/2, every planned conv replaced by its truncated '
            'SVD (two convs, BN kept), fine-tuned T/2 continuing the schedule, BN folded'),
    RowSpec('lra_pretrained', 'LRA from pretrained', 'lra_pretrained',
            'the pretrained backbone decomposed by truncated SVD before any fine-tuning, '
            'then trained T iterations, BN folded'),
    RowSpec('prune', 'channel pruning', 'prune',
            'the baseline\'s checkpoint at T/2, the inner channels of every residual block '
            'pruned by L2 magnitude (Torch-Pruning, one ratio, stage outputs kept) to the '
            'backbone FLOPs of the LRPET row, fine-tuned T/2 continuing the schedule'),
)
ROW_KEYS: Tuple[str, ...] = tuple(row.key for row in ROWS)
ROWS_BY_KEY: Dict[str, RowSpec] = {row.key: row for row in ROWS}
#: Execution order: the rows that start from the baseline's T/2 checkpoint right after it.
RUN_ORDER: Tuple[str, ...] = ('baseline', 'lra_half', 'prune', 'lrpet', 'paper', 'energy',
                              'lra_pretrained')
#: Rows that share the first T/2 iterations of the baseline.
HALF_ROWS = ('lra_half', 'prune')


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
    iters: int  # T
    batch_size: int = 2
    lr: float = 0.01
    projections: int = 8  # LRPET projections during T (and one at the end)

    @property
    def projection_interval(self) -> int:
        return max(1, self.iters // self.projections)

    def schedule_text(self) -> str:
        lr = (f'linear warm-up over {max(1, self.iters // 10)} iterations, ×0.1 at '
              f'{int(0.75 * self.iters)}' if self.key == 'det' else
              'poly decay (power 0.9, to 1e-4)')
        return (f'T = {self.iters} iterations of batch {self.batch_size}, SGD lr {self.lr} '
                f'({lr}); an LRPET projection every {self.projection_interval} iterations and '
                'at the end')


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
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    deterministic: bool = True
    latency_repeats: int = 30

    def to_dict(self) -> dict:
        data = asdict(self)
        data['img_size'] = list(self.img_size)
        data['classes'] = list(self.classes)
        data['seeds'] = list(self.seeds)
        data['tasks'] = {}
        for task in self.tasks:
            entry = asdict(task)
            entry['projection_interval'] = task.projection_interval
            entry['schedule'] = task.schedule_text()
            data['tasks'][task.key] = entry
        return data


#: Classes of the built-in data: the five shapes of the generator, one class each.
BENCH_CLASSES = ('person', 'car', 'dog', 'cat', 'aeroplane')


def _check_positive(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f'{name} must be an integer >= 1, got {value!r}')


def default_settings(quick: bool = False, seeds: Optional[int] = None,
                     tasks: Sequence[str] = ('det',), det_iters: Optional[int] = None,
                     seg_iters: Optional[int] = None) -> BenchSettings:
    """The full protocol or the ``quick`` smoke test (tiny data, budgets and pretraining).

    Full mode: 200 train / 100 test images of 160×128, 5 seeds, detection T = 160 and
    segmentation T = 160 iterations of batch 2 (sized so one task runs in ≤ 60 min on 2 CPU
    cores). ``seeds`` (number of seeds, 0 .. N-1), ``det_iters`` / ``seg_iters`` (T, even)
    override the defaults.
    """
    for name, value in (('seeds', seeds), ('det_iters', det_iters), ('seg_iters', seg_iters)):
        _check_positive(name, value)
    for name, value in (('det_iters', det_iters), ('seg_iters', seg_iters)):
        if value is not None and value % 2:
            raise ValueError(f'{name} must be even (the half rows branch off at T/2), got '
                             f'{value}')
    if quick:
        mode, num_train, num_val, num_seeds, iters = 'quick', 8, 4, 2, 4
        pretrain = PretrainSettings.quick()
    else:
        mode, num_train, num_val, num_seeds, iters = 'full', 200, 100, 5, 160
        pretrain = PretrainSettings()
    det = TaskSettings('det', 'detection', 'faster-rcnn_r18_fpn_toy_voc',
                       'Faster R-CNN R-18 (deep stem) FPN', 'pascal_voc/mAP', 'mAP@0.5', 100.0,
                       flops_reduction=0.5, iters=det_iters or iters)
    seg = TaskSettings('seg', 'segmentation', 'pspnet_r18-d8_toy_voc12aug',
                       'PSPNet R-18-D8 (ResNetV1c)', 'mIoU', 'mIoU', 1.0,
                       flops_reduction=0.3, iters=seg_iters or iters)
    by_key = {'det': det, 'seg': seg}
    if isinstance(tasks, str) or not tasks or any(t not in by_key for t in tasks):
        raise ValueError(f'tasks must be a non-empty subset of {sorted(by_key)}, got {tasks!r}')
    return BenchSettings(mode=mode, num_train=num_train, num_val=num_val, img_size=(160, 128),
                         classes=BENCH_CLASSES, hard=True, data_seed=0,
                         seeds=tuple(range(seeds or num_seeds)),
                         tasks=tuple(by_key[t] for t in ('det', 'seg') if t in tasks),
                         pretrain=pretrain, latency_repeats=5 if quick else 30)


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


def t_quantile(q: float, df: int) -> float:
    """Quantile ``q`` of Student's t distribution with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(q, df))


def paired_comparison(ours: Mapping[str, Optional[float]],
                      other: Mapping[str, Optional[float]], power: float = 0.8) -> dict:
    """Paired differences ``ours − other`` over the seeds both have a value for.

    Returns n, the mean difference, its sample std, the 95 % confidence interval of the mean
    (Student's t, n − 1 degrees of freedom), the number of seeds where ours is higher (wins),
    lower (losses), and the smallest true mean difference a two-sided paired t-test at 5 %
    detects with probability ``power`` given the observed std (``(t_.975 + t_power) · s/√n``);
    None where n is too small.
    """
    seeds = sorted(k for k in ours if ours.get(k) is not None and other.get(k) is not None)
    diffs = [float(ours[k]) - float(other[k]) for k in seeds]
    n = len(diffs)
    result = dict(n=n, mean=None, std=None, ci95=None, wins=sum(d > 0 for d in diffs),
                  losses=sum(d < 0 for d in diffs), detectable=None, diffs=diffs,
                  seeds=seeds)
    if n == 0:
        return result
    mean, std = mean_std(diffs)
    result.update(mean=mean, std=std)
    if n >= 2:
        half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
        result['ci95'] = [mean - half, mean + half]
        result['detectable'] = ((t_quantile(0.975, n - 1) + t_quantile(power, n - 1))
                                * std / math.sqrt(n))
    return result


def verdict(comparison: dict) -> str:
    """What the interval supports: 'LRPET better', 'LRPET worse' or 'no clear difference'."""
    ci = comparison.get('ci95')
    if not ci:
        return 'n/a'
    if ci[0] > 0:
        return 'LRPET better'
    if ci[1] < 0:
        return 'LRPET worse'
    return 'no clear difference'


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


def metric_by_seed(row: dict) -> Dict[str, Optional[float]]:
    return {seed: entry.get('metric_pct') for seed, entry in row.get('seeds', {}).items()
            if not entry.get('error')}


def summarize_row(row: dict) -> dict:
    """n, mean ± std of the metric (percent) and of the training time, the complexity (equal
    for every seed; None if the seeds disagree) and the error count."""
    seeds = row.get('seeds', {})
    good = [entry for entry in seeds.values() if not entry.get('error')]
    mean, std = mean_std([entry.get('metric_pct') for entry in good])
    train_mean, _ = mean_std([entry.get('train_s') for entry in good])
    summary = dict(n=len(good), metric_mean=mean, metric_std=std, train_s_mean=train_mean,
                   errors=sum(1 for entry in seeds.values() if entry.get('error')))
    for key in ('backbone_flops', 'backbone_params', 'model_params'):
        values = {entry.get(key) for entry in good}
        summary[key] = values.pop() if len(values) == 1 else None
    return summary


def compare_rows(task: dict) -> Dict[str, dict]:
    """LRPET (defaults) against every other row: :func:`paired_comparison` + verdict."""
    rows = task['rows']
    if 'lrpet' not in rows:
        return {}
    ours = metric_by_seed(rows['lrpet'])
    out = {}
    for key in ROW_KEYS:
        if key == 'lrpet' or key not in rows:
            continue
        comparison = paired_comparison(ours, metric_by_seed(rows[key]))
        comparison['verdict'] = verdict(comparison)
        out[key] = comparison
    return out


# =============================================================================== formatting
def _fmt(value: Optional[float], spec: str = '.1f', suffix: str = '') -> str:
    return 'n/a' if value is None else f'{value:{spec}}{suffix}'


def markdown_task_table(task: dict) -> str:
    """The results table of one task: metric, time, complexity and latency per row."""
    label = task['metric_label']
    rows = task['rows']
    base = (rows.get('baseline') or {}).get('summary') or {}
    latency = task.get('latency') or {}
    lines = [f'| method | {label} (%), mean ± std | per seed | training (s) | backbone FLOPs '
             '| vs baseline | backbone params | deployed backbone, ORT (ms) |',
             '|---|---:|---|---:|---:|---:|---:|---:|']
    for key in ROW_KEYS:
        if key not in rows:
            continue
        row = rows[key]
        summary = row.get('summary') or summarize_row(row)
        per_seed = []
        for seed, entry in sorted(row.get('seeds', {}).items(), key=lambda kv: int(kv[0])):
            value = entry.get('metric_pct')
            per_seed.append('error' if entry.get('error') else _fmt(value))
        metric = format_mean_std(summary.get('metric_mean'), summary.get('metric_std'))
        if summary.get('errors'):
            metric += f' ({summary["errors"]} failed)'
        change = _percent_change(summary.get('backbone_flops'), base.get('backbone_flops'))
        lat = (latency.get('rows') or {}).get(key)
        lat_text = 'n/a' if lat is None else f'{lat:.2f}'
        base_lat = (latency.get('rows') or {}).get('baseline')
        if lat is not None and base_lat and key != 'baseline':
            lat_text += f' ({base_lat / lat:.2f}×)'
        lines.append(
            f'| {row["label"]} | {metric} | {" / ".join(per_seed)} '
            f'| {_fmt(summary.get("train_s_mean"), ".0f")} '
            f'| {format_count(summary.get("backbone_flops"))} '
            f'| {"" if change is None or key == "baseline" else f"{change:+.1f} %"} '
            f'| {format_count(summary.get("backbone_params"))} | {lat_text} |')
    return '\n'.join(lines) + '\n'


def markdown_comparisons(task: dict) -> str:
    """LRPET minus each other row, paired by seed."""
    comparisons = task.get('comparisons') or compare_rows(task)
    if not comparisons:
        return ''
    lines = ['| LRPET (defaults) minus | mean paired difference (pp) | 95 % CI | LRPET wins '
             '| detectable at this n (pp, 80 % power) | reading |',
             '|---|---:|---|---:|---:|---|']
    for key, c in comparisons.items():
        ci = c.get('ci95')
        lines.append(
            f'| {task["rows"][key]["label"]} | {_fmt(c.get("mean"), "+.2f")} '
            f'| {"n/a" if not ci else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"} '
            f'| {c.get("wins", 0)} of {c.get("n", 0)} | {_fmt(c.get("detectable"), ".2f")} '
            f'| {c.get("verdict", "n/a")} |')
    return '\n'.join(lines) + '\n'


def markdown_results(results: dict) -> str:
    """The whole Markdown report."""
    settings = results['settings']
    machine = results.get('machine', {})
    lines = ['# Evidence benchmark: LRPET vs decompose-then-finetune and channel pruning', '']
    if settings['mode'] == 'quick':
        lines += ['**Quick mode**: a smoke test with tiny budgets; its numbers say nothing about '
                  'the methods.', '']
    if not results.get('complete'):
        lines += ['**Incomplete run** (interrupted, or still running): the tables hold the '
                  'rows finished so far.', '']
    if results.get('errors'):
        lines += [f'**{len(results["errors"])} row run(s) failed**: see `errors` in the JSON.',
                  '']
    wall = results.get('wall_time_s')
    pre = results.get('pretrained') or {}
    data = results.get('data') or {}
    lines += [
        f'- command: `{results.get("command", "")}` ({settings["mode"]} mode)',
        f'- wall time: {"n/a" if wall is None else f"{wall / 60:.1f} min"}',
        f'- machine: {machine.get("cpu", "?")}, {machine.get("usable_cores", "?")} CPU core(s), '
        f'torch {machine.get("torch", "?")} ({machine.get("threads", "?")} threads), mmdet '
        f'{machine.get("mmdet", "?")}, mmseg {machine.get("mmseg", "?")}; load average at '
        f'start {machine.get("load_average", "?")}',
        f'- code: commit {(machine.get("git_commit") or "?")[:12]}'
        f'{" + uncommitted changes" if machine.get("git_dirty") else ""}',
        f'- data: {data.get("description", "?")}',
        f'- pretrained backbone: ResNet-{settings["pretrain"]["depth"]} deep stem, '
        f'pretrained by the package on a synthetic {pre.get("num_classes", 10)}-class shape '
        f'classification task ({settings["pretrain"]["num_train"]} images of '
        f'{settings["pretrain"]["img_size"]} px, {settings["pretrain"]["epochs"]} epochs): '
        f'held-out accuracy {_fmt(pre.get("test_accuracy_pct"), ".1f", " %")}, BN scales '
        f'|γ| median {_fmt(pre.get("gamma_median"), ".3f")}, '
        f'{_fmt(pre.get("dead_fraction_pct"), ".2f", " %")} below 0.01; file '
        f'`{pre.get("file", "?")}`',
        f'- seeds: {", ".join(str(s) for s in settings["seeds"])}, paired (same initial '
        'weights, data order and test set for every row of a seed)',
        '- every compressed row is evaluated as its deployed model (factorized with BNs folded,'
        ' or pruned); FLOPs = multiply-adds (`mmengine.analysis`) of the backbone at the '
        'planning input size; latency: each row\'s deployed backbone (seed 0) in ONNX Runtime, '
        f'batch 1, median of {settings["latency_repeats"]} interleaved runs', '']
    for key, task in results['tasks'].items():
        tset = settings['tasks'][key]
        plan = task.get('rank_plan') or {}
        lines += [f'## {task["task"].capitalize()}: {task["model"]}, '
                  f'−{100 * tset["flops_reduction"]:.0f} % backbone FLOPs', '',
                  f'- training: {tset["schedule"]}; {task.get("config_notes", "")}']
        if plan:
            c, h, w = plan['input_shape']
            lines.append(
                f'- uniform ranks (LRPET defaults, paper-exact, both LRA rows): rank ratio '
                f'{plan["rank_ratio"]:.4f} over {plan["num_layers"]} backbone convs, '
                f'backbone FLOPs at {c}×{h}×{w}: {format_count(plan["flops_before"])} → '
                f'{format_count(plan["flops_after"])} ({100 * plan["reduction"]:.2f} % fewer)')
        if task.get('prune_ratio') is not None:
            lines.append(f'- channel pruning: {100 * task["prune_ratio"]:.1f} % of the inner '
                         'channels of every residual block removed')
        lines += ['', markdown_task_table(task), markdown_comparisons(task)]
    lines += ['## Rows', '']
    for row in ROWS:
        lines.append(f'- **{row.label}**: {row.description}.')
    lines.append('')
    if results.get('errors'):
        lines += ['## Errors', '']
        for err in results['errors']:
            lines.append(f'- {err["task"]} / {err["row"]} / seed {err["seed"]}: '
                         f'`{(err["error"] or "").splitlines()[0] if err["error"] else ""}`')
        lines.append('')
    return '\n'.join(lines)


def result_name(tasks: Sequence[str]) -> str:
    """``quality_det`` / ``quality_seg`` / ``quality_det_seg``: one result file per task run."""
    return 'quality_' + '_'.join(tasks)


def write_results(results: dict, out_dir: PathLike) -> Tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` atomically (temporary file, then rename)."""
    name = result_name(list(results['tasks']) or list(results['settings']['tasks']))
    json_path = common.write_results(check_writable_dir(out_dir) / f'{name}.json', results,
                                     markdown_results(results))
    return json_path, json_path.with_suffix('.md')


# =============================================================================== configs
def _unformatted(cfg):
    """``cfg`` with yapf formatting of its text off (mmengine formats the whole config each
    time a Runner logs or dumps it, ~1.5 s per call; the flag survives deep copies)."""
    object.__setattr__(cfg, '_format_python_code', False)
    return cfg


def _load_config(path: Path):
    from mmengine.config import Config

    return _unformatted(Config.fromfile(str(path)))


def _has_seg_aug(data_root: Path) -> bool:
    return (data_root / 'VOC2012' / 'ImageSets' / 'Segmentation' / 'aug.txt').is_file()


def schedulers(task: TaskSettings, second_half: bool = False) -> Tuple[List[dict], float]:
    """The LR schedule of ``T`` iterations, or of its second half (iterations T/2 .. T) as a
    schedule of its own: ``(param_scheduler, base lr)``."""
    n = task.iters
    if task.key == 'det':
        step = int(0.75 * n)
        if not second_half:
            return [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
                         end=max(1, n // 10)),
                    dict(type='MultiStepLR', by_epoch=False, begin=0, end=n,
                         milestones=[step], gamma=0.1)], task.lr
        return [dict(type='MultiStepLR', by_epoch=False, begin=0, end=n // 2,
                     milestones=[max(1, step - n // 2)], gamma=0.1)], task.lr
    eta_min, power = 1e-4, 0.9
    if not second_half:
        return [dict(type='PolyLR', eta_min=eta_min, power=power, begin=0, end=n,
                     by_epoch=False)], task.lr
    # mmengine's PolyLR over ``end`` iterations scales (lr − η) by (1 − t/(end − 1))^p, so at
    # t = T/2 + s: (1 − (T/2 + s)/(T − 1))^p = ((T/2 − 1)/(T − 1))^p · (1 − s/(T/2 − 1))^p
    lr = eta_min + (task.lr - eta_min) * ((n // 2 - 1) / (n - 1)) ** power
    return [dict(type='PolyLR', eta_min=eta_min, power=power, begin=0, end=n // 2,
                 by_epoch=False)], lr


def base_config(task: TaskSettings, settings: BenchSettings, data_root: Path, work_dir: Path,
                seed: int, pretrained: Optional[Path], iters: Optional[int] = None):
    """The toy config of ``task`` set up for the benchmark: ResNet-18 deep stem from the
    pretrained checkpoint, ``T`` iterations without validation, a checkpoint at T/2 and T,
    seeded data order."""
    from mmengine.config import Config

    from lrpet_mm.datasets import set_data_root

    path = CONFIG_DIR / f'{task.config}.py'
    if not path.is_file():
        raise FileNotFoundError(f'toy config {path} not found (the benchmark runs from a '
                                'checkout of the repository)')
    cfg = _unformatted(Config.fromfile(str(path)))
    set_data_root(cfg, str(data_root))
    n = task.iters if iters is None else iters
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'bench-{task.key}-{uuid.uuid4().hex[:8]}'
    if cfg.get('visualizer') is not None:
        cfg.visualizer.pop('name', None)
    cfg.custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
    cfg.custom_hooks = []
    cfg.randomness = dict(seed=int(seed), deterministic=settings.deterministic)
    cfg.val_dataloader = None
    cfg.val_cfg = None
    cfg.val_evaluator = None
    cfg.load_from = None
    cfg.resume = False
    backbone = cfg.model.backbone
    backbone.init_cfg = (None if pretrained is None else
                         dict(type='Pretrained', checkpoint=str(pretrained)))
    loader = cfg.train_dataloader
    loader.batch_size = task.batch_size
    loader.sampler = dict(type='InfiniteSampler', shuffle=True, seed=int(seed))
    if task.key == 'det':
        # Upstream VOC Faster R-CNN backbone settings, except: deep stem (the pretrained
        # checkpoint's stem); no frozen stage (with the deep stem, stem + layer1 hold 40 % of
        # the backbone FLOPs: −50 % is out of reach of a method that skips them); BN
        # statistics trained (norm_eval=False): the synthetic pretraining's statistics do not
        # fit the task images (a one-seed pilot with upstream's norm_eval=True: baseline
        # 0.75 % mAP after T = 160, 27.3 % with norm_eval=False; decided before any
        # compressed row ran).
        backbone.update(deep_stem=True, avg_down=False, frozen_stages=-1, norm_eval=False)
        model = cfg.model
        # Smaller heads than the toy config: on CPU they otherwise take most of the step time.
        model.neck.out_channels = 128
        model.rpn_head.in_channels = 128
        model.rpn_head.feat_channels = 128
        model.roi_head.bbox_roi_extractor.out_channels = 128
        model.roi_head.bbox_head.in_channels = 128
        model.roi_head.bbox_head.fc_out_channels = 256
        model.train_cfg.rcnn.sampler.num = 64
    else:
        cfg.model.pretrained = None
        if not _has_seg_aug(data_root):  # a real VOC2012 without SBD's SegmentationClassAug
            loader.dataset.datasets = loader.dataset.datasets[:1]
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=n, val_interval=n + 1)
    cfg.param_scheduler, cfg.optim_wrapper.optimizer.lr = schedulers(task)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=10, log_metric_by_epoch=False)
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', interval=max(1, n // 2), by_epoch=False, save_optimizer=False,
        save_param_scheduler=False, save_last=True)
    return cfg


def second_half_config(cfg, task: TaskSettings):
    """``cfg`` for the last T/2 iterations of the schedule (the half rows' fine-tuning)."""
    cfg = copy.deepcopy(cfg)
    n = task.iters // 2
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=n, val_interval=n + 1)
    cfg.param_scheduler, cfg.optim_wrapper.optimizer.lr = schedulers(task, second_half=True)
    cfg.default_hooks.checkpoint.interval = n
    return cfg


def factorized_train_config(cfg, components: Mapping[str, dict]):
    """``cfg`` whose components are factorized with the given ranks and their BNs kept (the
    LRA rows' network while it trains; weights come from ``load_from``)."""
    new = copy.deepcopy(cfg)
    for component, spec in components.items():
        inner = new.model[component]
        inner.init_cfg = None
        new.model[component] = dict(type='LRPETFactorized', module=inner,
                                    ranks=dict(spec['ranks']), folded_norms={})
    return new


# =============================================================================== running
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


def cpu_eval_copy(module):
    """A CPU copy of ``module`` in eval mode (mmdet/mmseg ``ResNet.train`` returns None, so
    ``.eval()`` does not chain)."""
    module = copy.deepcopy(module).cpu()
    module.eval()
    return module


def onnx_latency_ms(backbones: Mapping[str, object], input_shape: Sequence[int],
                    repeats: int) -> Dict[str, float]:
    """Median ONNX Runtime latency (ms, batch 1) of each backbone, timed interleaved."""
    import numpy as np
    import torch

    from lrpet_mm.deploy.timing import interleaved_median_ms, ort_runner, ort_session

    x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    runners = []
    for module in backbones.values():
        module = cpu_eval_copy(module)
        buffer = io.BytesIO()
        with _quiet(), torch.no_grad():
            torch.onnx.export(module, (x,), buffer, opset_version=17, do_constant_folding=True)
        runners.append(ort_runner(ort_session(buffer.getvalue()), x.numpy().astype(np.float32)))
    times = interleaved_median_ms(runners, repeats=repeats, warmup=3)
    return dict(zip(backbones, times))


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
    deployed: Dict[str, object] = field(default_factory=dict)  # seed 0 backbones


class QualityBenchmark:
    """Runs the rows, records results after each one (see :func:`run_benchmark`)."""

    def __init__(self, settings: BenchSettings, work_dir: PathLike, out_dir: PathLike,
                 rows: Sequence[str] = ROW_KEYS, data_root: Optional[PathLike] = None,
                 cache_dir: Optional[PathLike] = None, keep_checkpoints: bool = False,
                 log: Callable[[str], None] = print, command: str = ''):
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
            command=command, mode=settings.mode, started=None, finished=None, complete=False,
            wall_time_s=None, settings=settings.to_dict(), machine={}, data={},
            pretrained={}, tasks={}, errors=[])

    # ------------------------------------------------------------------ helpers
    def log(self, message: str) -> None:
        elapsed = 0.0 if self.start is None else time.time() - self.start
        self._log(f'[bench_quality {elapsed:7.1f}s] {message}')

    def save(self) -> Tuple[Path, Path]:
        if self.start is not None:
            self.results['wall_time_s'] = time.time() - self.start
        for task in self.results['tasks'].values():
            task['comparisons'] = compare_rows(task)
        return write_results(self.results, self.out_dir)

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
                    metric_label=task.metric_label, rank_plan=None, prune_ratio=None,
                    config_notes=('ResNet-18 deep stem, no frozen stage, BN statistics '
                                  'trained (norm_eval=False, see docs/benchmarks.md); smaller '
                                  'FPN/RPN/RoI heads (128 channels)'
                                  if task.key == 'det' else
                                  'ResNetV1c-18, dilated (output stride 8), BN trained'),
                    rows={key: dict(label=ROWS_BY_KEY[key].label,
                                    description=ROWS_BY_KEY[key].description, seeds={},
                                    summary=None) for key in self.rows},
                    latency=None)
            self.save()
            for task in s.tasks:
                self._run_task(task, data_root, pretrained)
        finally:
            saved.restore()
            self.results['finished'] = datetime.datetime.now().astimezone().isoformat(
                timespec='seconds')
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
        from lrpet_mm.models.pretrained_backbone import pretrained_backbone

        t0 = time.time()
        built = pretrained_backbone(self.settings.pretrain, cache_dir=self.cache_dir,
                                    log=self.log)
        stats = built.bn_stats.get('overall', built.bn_stats)
        self.results['pretrained'] = dict(
            file=str(built.path), cached=built.cached, test_accuracy_pct=100 *
            built.test_accuracy, train_seconds=built.train_seconds, bn_stats=built.bn_stats,
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
        for seed in self.settings.seeds:
            self._run_seed(task, seed, data_root, pretrained, task_dir / f'seed{seed}', ctx)
        if ctx.deployed:
            self.log(f'{task.key}: timing {len(ctx.deployed)} deployed backbones in ONNX '
                     'Runtime')
            try:
                times = onnx_latency_ms(ctx.deployed, ctx.input_shape,
                                        self.settings.latency_repeats)
            except Exception as e:  # noqa: BLE001 - the accuracy results stand without it
                self.results['tasks'][task.key]['latency'] = dict(error=error_text(e, 600))
            else:
                self.results['tasks'][task.key]['latency'] = dict(
                    rows=times, input_shape=list(ctx.input_shape), batch=1, seed=0,
                    repeats=self.settings.latency_repeats)
            self.save()

    def _context(self, task: TaskSettings, data_root: Path, pretrained: Path,
                 task_dir: Path) -> TaskContext:
        """The uniform rank plan of ``task`` (the LRPET default's ranks, used by LRA)."""
        from lrpet_mm.engine.input_shape import infer_input_shape
        from lrpet_mm.engine.planning import plan_ranks_for_flops
        from lrpet_mm.lowrank import get_scope_module, select_targets
        from lrpet_mm.models import components_of, planned_layers
        from lrpet_mm.models.factorize_checkpoint import build_model_from_config

        cfg = base_config(task, self.settings, data_root, task_dir / 'plan', 0, pretrained)
        with _quiet():
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
        self.log(f'{task.key}: uniform rank ratio {result.rank_ratio:.4f} on {len(plan)} '
                 f'backbone convs removes {100 * result.reduction:.2f} % of the backbone FLOPs '
                 f'at input {tuple(shape)} (target {100 * task.flops_reduction:.0f} %)')
        return TaskContext(task, plan, info, norms,
                           components_of({n: layer.rank for n, layer in plan.layers.items()},
                                         norms), tuple(shape))

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
            deployed = None
        elif row.kind == 'hook':
            cfg.load_from = str(init)
            cfg.custom_hooks = [dict(type='LRPETHook', flops_reduction=task.flops_reduction,
                                     interval=task.projection_interval, by_epoch=False,
                                     **dict(row.hook_kwargs))]
            ckpt, info = train(cfg)
            entry['train_s'] = time.time() - t0
            self._expect_iters(info, task.iters)
            eval_cfg, eval_ckpt = self._factorize_hook_run(cfg, ckpt, row_dir, entry)
            deployed = None
        elif row.kind in ('lra_half', 'lra_pretrained'):
            source = self._baseline_half(ctx) if row.kind == 'lra_half' else init
            if row.kind == 'lra_half':
                cfg = second_half_config(cfg, task)
            eval_cfg, eval_ckpt, info = self._lra(task, cfg, source, row_dir, ctx, entry)
            self._expect_iters(info, task.iters // 2 if row.kind == 'lra_half' else task.iters)
            entry['train_s'] = time.time() - t0
            if row.kind == 'lra_half':
                entry['train_s'] += ctx.baseline_train_s / 2
            deployed = None
        elif row.kind == 'prune':
            entry.update(self._prune(task, second_half_config(cfg, task), ctx, seed))
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
            ctx.deployed[row.key] = deployed or cpu_eval_copy(model.backbone)
        entry['eval_s'] = time.time() - t1
        return entry

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
        from lrpet_mm.engine.flops import count_flops, count_params

        with _quiet():
            return dict(backbone_flops=count_flops(model.backbone, ctx.input_shape),
                        backbone_params=count_params(model.backbone),
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
        return _load_config(cfg_path), ckpt_path

    def _fold(self, base_cfg, trained_cfg, ckpt: Path, out_dir: Path, ctx: TaskContext):
        """A trained factorized (BN kept) model -> the compact config + checkpoint."""
        from lrpet_mm.models import compact_config, fold_factorized_norms

        model = self._build(trained_cfg, ckpt)
        compact = fold_factorized_norms(model, ctx.norms, copy_model=False)
        if not _same_components(compact.components, ctx.components):
            raise RowError('the compact model differs from the planned structure')
        cfg_path, ckpt_path = _save_compact(compact_config(base_cfg, compact), compact.model,
                                            dict(source_checkpoint=str(ckpt)), out_dir, 'compact')
        return _load_config(cfg_path), ckpt_path

    def _lra(self, task: TaskSettings, cfg, source: Path, row_dir: Path, ctx: TaskContext,
             entry: dict):
        """Truncated SVD of ``source`` at the uniform ranks, train ``cfg``'s schedule, fold."""
        from lrpet_mm.models import decompose_model

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

    def _prune(self, task: TaskSettings, cfg, ctx: TaskContext, seed: int) -> dict:
        """The baseline at T/2, channel-pruned to the LRPET row's backbone FLOPs, fine-tuned
        T/2 and tested in the same Runner (the pruned network has no config of its own)."""
        from benchlib.channel_pruning import prune_resnet_blocks
        from lrpet_mm.engine.checkpoint_meta import load_checkpoint_file
        from lrpet_mm.engine.flops import count_flops, count_params
        from lrpet_mm.models.factorize_checkpoint import load_state_dict_strict

        source = self._baseline_half(ctx)
        if ctx.lrpet_flops is None:
            raise RowError('the LRPET row of this seed gave no backbone FLOPs to match')
        runner = quiet_runner(cfg)
        try:
            model = runner.model
            with _quiet():
                model.init_weights()  # now, so that train() does not re-initialise the
                load_state_dict_strict(model, load_checkpoint_file(source), str(source))
                pruned = prune_resnet_blocks(model.backbone, ctx.input_shape, ctx.lrpet_flops)
            self.results['tasks'][task.key]['prune_ratio'] = pruned.ratio
            t0 = time.time()
            info = _run_training(runner)
            train_s = time.time() - t0
            self._expect_iters(info, task.iters // 2)
            t1 = time.time()
            with _quiet():
                metrics = runner.test()
            entry = dict(error=None, extra=dict(prune_ratio=pruned.ratio,
                                                channels={k: list(v) for k, v in
                                                          pruned.channels.items()}))
            entry.update(self._metric(task, metrics))
            model = runner.model
            model.eval()
            with _quiet():
                entry.update(backbone_flops=count_flops(model.backbone, ctx.input_shape),
                             backbone_params=count_params(model.backbone),
                             model_params=count_params(model))
            if seed == self.settings.seeds[0]:
                ctx.deployed['prune'] = cpu_eval_copy(model.backbone)
            entry['eval_s'] = time.time() - t1
            entry['finetune_s'] = train_s
            return entry
        finally:
            del runner
            gc.collect()


def run_benchmark(settings: BenchSettings, work_dir: PathLike, out_dir: PathLike,
                  rows: Sequence[str] = ROW_KEYS, data_root: Optional[PathLike] = None,
                  cache_dir: Optional[PathLike] = None, keep_checkpoints: bool = False,
                  log: Callable[[str], None] = print, command: str = '') -> Tuple[int, dict]:
    """Run the benchmark; returns ``(exit code, results)``: 0 if every row succeeded, else 1.

    Results are written to ``out_dir/quality_<task>.{json,md}`` after every row (atomically),
    so an interrupted run leaves the rows finished so far (``complete: false``).
    """
    bench = QualityBenchmark(settings, work_dir, out_dir, rows, data_root, cache_dir,
                             keep_checkpoints, log, command)
    code = bench.run()
    return code, bench.results
