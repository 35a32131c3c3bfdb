"""Report of an LRPET run: FLOPs, parameters and task metric of the projected model (the
training config + checkpoint) against the compact model (the factorized config + checkpoint).

:func:`generate_report` writes ``report.md``, ``report.json`` and ``ranks.png`` into an output
directory (``tools/report.py`` is its command line). FLOPs follow ``mmengine.analysis``
(one multiply-add = one FLOP) and are counted on an all-zero input of a fixed shape.
"""
import contextlib
import copy
import io
import json
import logging
import math
import numbers
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.utils import ProgressBar
from torch import nn

from ..lowrank import LowRankConv2d, bn_scale, find_conv_norm_pairs
from ..lowrank.batchnorm import has_running_stats, is_batch_norm
from ..utils.atomic import atomic_path, check_writable_dir
from .checkpoint_summary import rank_plan_from_checkpoint
from .flops import count_flops, count_params

PathLike = Union[str, os.PathLike]

TASKS = {'mmdet': 'detection', 'mmseg': 'segmentation'}
DEFAULT_INPUT_SHAPES = {'mmdet': (3, 600, 1000), 'mmseg': (3, 512, 512)}
"""(C, H, W) FLOPs are counted at: 1000×600 for detection (the VOC test scale), 512×512 for
segmentation (the VOC crop size)."""
PRIMARY_METRICS = ('pascal_voc/mAP', 'coco/bbox_mAP', 'mIoU')
"""The task metric reported, the first of these the test evaluator returns."""
FLOPS_CONVENTION = 'mmengine.analysis (fvcore): one multiply-add counts as one FLOP'
NUM_SPECTRA = 4
REPORT_FILES = ('report.md', 'report.json', 'ranks.png')


# --------------------------------------------------------------------------- configs, models
def config_scope(cfg: Config, where: str = 'config') -> str:
    """The config's ``default_scope`` (``'mmdet'`` or ``'mmseg'``)."""
    scope = cfg.get('default_scope', None)
    if scope not in TASKS:
        raise ValueError(f'{where} has default_scope {scope!r}; the report supports '
                         f'{sorted(TASKS)} (detection and segmentation configs)')
    return scope


def check_input_shape(shape: Sequence[int]) -> Tuple[int, int, int]:
    values = tuple(shape)
    if len(values) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                   and v > 0 for v in values):
        raise ValueError(f'input shape must be three positive integers (C, H, W), got {shape!r}')
    return tuple(int(v) for v in values)


def default_input_shape(cfg: Config, where: str = 'config') -> Tuple[int, int, int]:
    """(3, 600, 1000) for an mmdet config, (3, 512, 512) for an mmseg config."""
    return DEFAULT_INPUT_SHAPES[config_scope(cfg, where)]


# --------------------------------------------------------------------------- FLOPs, params
def quiet_runner(cfg: Config):
    """``Runner.from_cfg(cfg)`` whose console shows warnings and errors only, on stderr (the
    log file in work_dir keeps everything; upstream Python warnings raised while building are
    silenced and stray prints swallowed, so stdout stays clean)."""
    from mmengine.runner import Runner

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('ignore')
        runner = Runner.from_cfg(cfg)
    for handler in runner.logger.handlers:
        if type(handler) is logging.StreamHandler:
            handler.setStream(sys.stderr)
            handler.setLevel(max(handler.level, logging.WARNING))
    return runner


def make_data_samples(scope: str, input_shape: Sequence[int]) -> list:
    """One data sample (``DetDataSample`` / ``SegDataSample``) with the metainfo of an
    unscaled, unpadded image of ``input_shape`` = (C, H, W)."""
    hw = (int(input_shape[1]), int(input_shape[2]))
    meta = dict(img_shape=hw, ori_shape=hw, batch_input_shape=hw, pad_shape=hw,
                scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=meta)]
    if scope == 'mmseg':
        from mmseg.structures import SegDataSample
        return [SegDataSample(metainfo=meta)]
    raise ValueError(f'unsupported scope {scope!r}')


class TensorForward(nn.Module):
    """``model._forward(inputs, data_samples)`` (the tensor mode: backbone, neck, heads, no
    post-processing) as a module of one tensor, so ``FlopAnalyzer`` can trace it."""

    def __init__(self, model: nn.Module, data_samples: list):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor):
        return self.model._forward(inputs, self.data_samples)


def rpn_proposals(model: nn.Module) -> Optional[int]:
    """``max_per_img`` of the model's RPN test config (two-stage detectors), else None."""
    test_cfg = getattr(getattr(model, 'rpn_head', None), 'test_cfg', None)
    if test_cfg is None or 'nms' not in test_cfg or 'max_per_img' not in test_cfg:
        return None
    return int(test_cfg['max_per_img'])


@contextlib.contextmanager
def fixed_proposal_count(model: nn.Module):
    """Switch the RPN's NMS off while counting: the RoI head then runs on the RPN's top
    ``max_per_img`` candidates, a number fixed by the input shape. With NMS on, how many
    proposals survive depends on the weights (on an all-zero image, on ties broken by rounding
    noise), so the projected and the compact model, equal up to ~1e-7, could be counted on
    different numbers of RoIs."""
    if rpn_proposals(model) is None:
        yield
        return
    test_cfg = model.rpn_head.test_cfg
    nms = test_cfg['nms']
    test_cfg['nms'] = None  # mmcv's batched_nms: nms_cfg=None skips NMS
    try:
        yield
    finally:
        test_cfg['nms'] = nms


def whole_model_flops(model: nn.Module, scope: str, input_shape: Sequence[int]) -> int:
    """FLOPs of the model's tensor forward on one all-zero input of ``input_shape`` (for a
    two-stage detector, with a fixed number of proposals: see :func:`fixed_proposal_count`)."""
    with fixed_proposal_count(model):
        return count_flops(TensorForward(model, make_data_samples(scope, input_shape)),
                           input_shape)


def _error_text(e: BaseException, limit: int = 300) -> str:
    text = ' '.join(str(e).split())
    text = f'{type(e).__name__}: {text}' if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


def measure_complexity(model: nn.Module, scope: str, input_shape: Sequence[int]) -> dict:
    """``{'backbone': {flops, params}, 'model': {flops, params, flops_error}}``.

    Whole-model FLOPs that cannot be traced are ``None`` with the error text in
    ``flops_error`` (backbone FLOPs must be countable).
    """
    backbone = getattr(model, 'backbone', None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f'{type(model).__name__} has no backbone module')
    result = dict(backbone=dict(flops=count_flops(backbone, input_shape),
                                params=count_params(backbone)),
                  model=dict(flops=None, params=count_params(model), flops_error=None))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # tracer warnings about Python control flow
            result['model']['flops'] = whole_model_flops(model, scope, input_shape)
    except Exception as e:  # tracing failed for this model: reported, not fatal
        result['model']['flops_error'] = _error_text(e)
    return result


# --------------------------------------------------------------------------- evaluation
class EvaluationError(RuntimeError):
    """The test loop of a model failed (missing test data, ...)."""


@HOOKS.register_module(force=True)
class ReportProgressHook(Hook):
    """Draws an ``mmengine.utils.ProgressBar`` over the test loop's batches."""
    priority = 'VERY_LOW'

    def __init__(self, title: Optional[str] = None, file=None):
        self.title = title
        self.file = file
        self.bar = None

    def before_run(self, runner) -> None:
        if self.title:
            out = self.file or sys.stderr
            out.write(f'{self.title}\n')
            out.flush()

    def before_test_epoch(self, runner) -> None:
        self.bar = ProgressBar(len(runner.test_dataloader), file=self.file or sys.stderr)

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.bar is not None:
            self.bar.update()

    def after_test_epoch(self, runner, metrics=None) -> None:
        if self.bar is not None:
            self.bar.file.write('\n')
            self.bar.file.flush()
            self.bar = None


def make_test_config(cfg: Config, checkpoint: PathLike, work_dir: PathLike) -> Config:
    """A copy of ``cfg`` for ``runner.test()`` of ``checkpoint`` (train / val parts removed)."""
    cfg = copy.deepcopy(cfg)
    for key in ('test_dataloader', 'test_evaluator'):
        if cfg.get(key, None) is None:
            raise ValueError(f'config has no {key}: cannot evaluate it')
    cfg.work_dir = os.fspath(work_dir)
    cfg.load_from = os.fspath(checkpoint)
    cfg.resume = False
    cfg.launcher = 'none'
    if cfg.get('test_cfg', None) is None:
        cfg.test_cfg = dict(type='TestLoop')
    for key in ('train_dataloader', 'train_cfg', 'optim_wrapper', 'param_scheduler',
                'val_dataloader', 'val_cfg', 'val_evaluator'):
        cfg[key] = None
    cfg.experiment_name = f'report-{Path(os.fspath(checkpoint)).stem}-{uuid.uuid4().hex[:8]}'
    if cfg.get('visualizer', None) is not None:
        cfg.visualizer.pop('name', None)  # then named after the unique experiment_name
    return cfg


def evaluate_checkpoint(cfg: Config, checkpoint: PathLike, work_dir: PathLike,
                        progress: bool = True, title: Optional[str] = None,
                        verbose: bool = False) -> Dict[str, float]:
    """Run the config's test loop (``Runner.from_cfg(...).test()``) on ``checkpoint``.

    The run's logs go to ``work_dir``. Unless ``verbose``, the runner's console log is limited
    to warnings (the log file keeps everything). Returns the evaluator's metrics.
    """
    from mmengine.runner import Runner

    cfg = make_test_config(cfg, checkpoint, work_dir)
    try:
        if verbose:
            runner = Runner.from_cfg(cfg)
            quiet = contextlib.nullcontext()
        else:
            # The console handler is created (and the environment / config logged) in the
            # Runner's constructor: build it writing to a sink, then point the console at
            # stderr, warnings and errors only. The log file in work_dir keeps everything.
            # Upstream Python warnings (deprecations) are silenced and stray prints go to
            # stderr: stdout stays clean.
            runner = quiet_runner(cfg)
            quiet = _quiet_to_stderr()
        if progress:
            runner.register_hook(ReportProgressHook(title))
        with quiet:
            metrics = runner.test()
    except Exception as e:
        data_root = ((cfg.test_dataloader or {}).get('dataset') or {}).get('data_root')
        raise EvaluationError(
            f'the test loop of checkpoint {os.fspath(checkpoint)!r} failed (test data_root '
            f'{data_root!r}, log in {os.fspath(work_dir)!r}): {_error_text(e, 1000)}') from e
    return {k: _to_float(v) for k, v in metrics.items()}


@contextlib.contextmanager
def _quiet_to_stderr():
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter('ignore')
        yield


def _to_float(value):
    """Metric values as Python floats (evaluators return numpy scalars)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)) and np.size(value) == 1:
        return float(value)  # 0-d arrays / tensors
    return value


def primary_metric(metrics: Dict[str, float]) -> str:
    """The reported metric: the first of ``PRIMARY_METRICS`` present, else the first key."""
    for key in PRIMARY_METRICS:
        if key in metrics:
            return key
    numeric = [k for k, v in metrics.items() if isinstance(v, (int, float))]
    if not numeric:
        raise ValueError(f'the test evaluator returned no numeric metric: {metrics!r}')
    return numeric[0]


# --------------------------------------------------------------------------- layers, spectra
def _conv_geometry(conv: nn.Conv2d) -> tuple:
    return (conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
            tuple(conv.padding), tuple(conv.dilation))


def factorized_layers(original: nn.Module, compact: nn.Module, checkpoint: dict,
                      where: str) -> List[dict]:
    """Each factorized conv of ``compact`` (model order) with its kept and full rank.

    Checks that the original model has a matching conv at every factorized name.
    """
    try:
        plan = rank_plan_from_checkpoint(checkpoint)
    except ValueError:
        plan = None
    pairs = find_conv_norm_pairs(original)
    layers = []
    for name, module in compact.named_modules():
        if not isinstance(module, LowRankConv2d):
            continue
        try:
            conv = original.get_submodule(name)
        except AttributeError:
            conv = None
        reduce, expand = module[0], module[1]
        if not isinstance(conv, nn.Conv2d) or _conv_geometry(conv) != (
                reduce.in_channels, expand.out_channels, tuple(reduce.kernel_size),
                tuple(reduce.stride), tuple(reduce.padding), tuple(reduce.dilation)):
            raise ValueError(f'{where}: the compact model factorizes {name!r}, which has no '
                             'conv of the same geometry in the original model (config / '
                             'low-rank config mismatch?)')
        m, n = conv.out_channels, conv.weight[0].numel()
        norm_name = pairs.get(name)
        folded = False
        if norm_name is not None:
            try:
                folded = isinstance(compact.get_submodule(norm_name), nn.Identity)
            except AttributeError:
                folded = False
        layers.append(dict(
            name=name, rank=int(module.rank), full_rank=min(m, n), out_features=m,
            in_features=n, planned_rank=(plan.rank_of(name) if plan is not None
                                         and name in plan else None),
            folded_norm=norm_name if folded else None))
    if not layers:
        raise ValueError(f'{where}: the low-rank model has no factorized convs; is it the '
                         'output of tools/factorize.py (LRPETFactorized)?')
    return layers


@torch.no_grad()
def weight_spectrum(original: nn.Module, name: str, norm_name: Optional[str]) -> List[float]:
    """Singular values (descending) of conv ``name``'s weight as an (m, n) matrix, with the BN
    ``norm_name`` folded in (the matrix LRPET projects), in float64."""
    conv = original.get_submodule(name)
    weight = conv.weight.detach().double().reshape(conv.weight.shape[0], -1)
    if norm_name is not None:
        norm = original.get_submodule(norm_name)
        if is_batch_norm(norm) and has_running_stats(norm):
            weight = bn_scale(norm).double()[:, None] * weight
    return [float(v) for v in torch.linalg.svdvals(weight)]


def spread_indices(count: int, num: int = NUM_SPECTRA) -> List[int]:
    """Up to ``num`` distinct indices spread evenly over range(count), first and last included."""
    if count <= num:
        return list(range(count))
    return sorted({round(i * (count - 1) / (num - 1)) for i in range(num)})


# --------------------------------------------------------------------------- formatting
def _reduction(before: Optional[int], after: Optional[int]) -> Optional[float]:
    if before is None or after is None or before == 0:
        return None
    return 100.0 * (1.0 - after / before)


def format_count(value: Optional[float]) -> str:
    if value is None:
        return 'n/a'
    for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(value) >= scale:
            return f'{value / scale:.3f} {unit}'
    return str(int(value))


def _fmt(value: Optional[float], spec: str, suffix: str = '') -> str:
    return '' if value is None else f'{value:{spec}}{suffix}'


def build_rows(complexity: dict, metric: Optional[dict]) -> List[dict]:
    """The table rows: backbone / whole model × original / compact."""
    rows = []
    for part in ('backbone', 'model'):
        for which in ('original', 'compact'):
            entry = complexity[which][part]
            base = complexity['original'][part]
            row = dict(part=part, model=which, flops=entry['flops'], params=entry['params'],
                       flops_reduction_pct=None, params_reduction_pct=None, metric=None,
                       delta_metric=None, flops_error=entry.get('flops_error'))
            if which == 'compact':
                row['flops_reduction_pct'] = _reduction(base['flops'], entry['flops'])
                row['params_reduction_pct'] = _reduction(base['params'], entry['params'])
            if part == 'model' and metric is not None:
                row['metric'] = metric[which]
                if which == 'compact':
                    row['delta_metric'] = metric['delta']
            rows.append(row)
    return rows


def markdown_table(report: dict) -> str:
    """The Markdown table of ``report`` (a :func:`generate_report` result)."""
    metric = report.get('metric')
    name = metric['name'] if metric else 'metric'
    lines = [f'| part | model | FLOPs | params | FLOPs reduction | params reduction | {name} '
             f'| Δ {name} |', '|---|---|---:|---:|---:|---:|---:|---:|']
    for row in report['rows']:
        part = 'backbone' if row['part'] == 'backbone' else 'whole model'
        model = 'original (projected)' if row['model'] == 'original' else 'compact'
        flops = (format_count(row['flops']) if row['flops'] is not None
                 else f'n/a ({row["flops_error"] or "not counted"})'.replace('|', '\\|'))
        metric_text = '' if row['metric'] is None else f'{row["metric"]:.4f}'
        lines.append(
            f'| {part} | {model} | {flops} | {format_count(row["params"])} '
            f'| {_fmt(row["flops_reduction_pct"], ".2f", " %")} '
            f'| {_fmt(row["params_reduction_pct"], ".2f", " %")} '
            f'| {metric_text} | {_fmt(row["delta_metric"], "+.4f")} |')
    return '\n'.join(lines) + '\n'


def markdown_report(report: dict) -> str:
    c, h, w = report['input_shape']
    lines = ['# LRPET report', '',
             f'- task: {report["task"]} (`default_scope={report["default_scope"]!r}`)',
             f'- original (projected): `{report["original"]["config"]}` + '
             f'`{report["original"]["checkpoint"]}`',
             f'- compact: `{report["compact"]["config"]}` + '
             f'`{report["compact"]["checkpoint"]}`',
             f'- FLOPs at input {c}×{h}×{w} (C×H×W, one all-zero image); '
             f'{report["flops_convention"]}',
             f'- factorized layers: {len(report["layers"])}', '',
             markdown_table(report)]
    if report['task'] == 'detection':
        text = ('Whole-model FLOPs are the tensor forward (`model._forward`: backbone, neck, '
                'heads, no post-processing).')
        if report.get('rpn_proposals') is not None:
            text += (f' The RPN\'s NMS is off while counting, so the RoI head runs on the top '
                     f'`max_per_img={report["rpn_proposals"]}` proposals (or all candidates if '
                     'fewer) for both models alike.')
        lines += [text, '']
    if report.get('metric') is None:
        lines += ['The task metric was not evaluated.', '']
    for warning in report.get('warnings', []):
        lines += [f'**Warning:** {warning}', '']
    lines += ['![ranks](ranks.png)', '']
    return '\n'.join(lines)


# --------------------------------------------------------------------------- the report
class _Cleanup:
    """Remove what a failed report created in the output directory (and nothing else)."""

    def __init__(self, out_dir: Path, created_dir: bool):
        self.out_dir = out_dir
        self.created_dir = created_dir
        self.before = set(os.listdir(out_dir))
        self.nested: Dict[Path, Optional[set]] = {}

    def watch(self, path: Path) -> None:
        """Also remove new entries inside ``path`` (a pre-existing subdirectory)."""
        self.nested[path] = set(os.listdir(path)) if path.is_dir() else None

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()

    def __call__(self) -> None:
        for path, before in self.nested.items():
            if before is not None and path.is_dir():
                for entry in set(os.listdir(path)) - before:
                    self._remove(path / entry)
        if self.out_dir.is_dir():
            for entry in set(os.listdir(self.out_dir)) - self.before:
                self._remove(self.out_dir / entry)
            if self.created_dir:
                with contextlib.suppress(OSError):
                    self.out_dir.rmdir()


def generate_report(config: PathLike, checkpoint: PathLike, out_dir: PathLike,
                    lowrank_config: Optional[PathLike] = None,
                    lowrank_checkpoint: Optional[PathLike] = None,
                    input_shape: Optional[Sequence[int]] = None, evaluate: bool = True,
                    progress: bool = True, verbose: bool = False) -> dict:
    """Compare the projected model with its compact factorization and write the report.

    Args:
        config, checkpoint: the training config (with ``LRPETHook``) and its checkpoint.
        out_dir: where ``report.md``, ``report.json``, ``ranks.png`` (and, if produced here,
            the compact files and the test runs' work dirs ``eval/{original,compact}``) go.
        lowrank_config, lowrank_checkpoint: the compact model (``tools/factorize.py``'s
            output); if not given, ``factorize_checkpoint(config, checkpoint, out_dir)`` makes
            them.
        input_shape: (C, H, W) for FLOPs; default (3, 600, 1000) for mmdet configs and
            (3, 512, 512) for mmseg configs.
        evaluate: run the test loop of both models for the task metric.
        progress: show a progress bar (stderr) while evaluating.
        verbose: let the test runners log to the console as usual.

    Returns:
        The report as written to ``report.json``.

    Raises:
        FileNotFoundError, ValueError, PermissionError, KeyError: bad inputs (each naming the
            file); nothing is left in ``out_dir`` then.
    """
    if (lowrank_config is None) != (lowrank_checkpoint is None):
        raise ValueError('give both lowrank_config and lowrank_checkpoint, or neither')
    with warnings.catch_warnings():
        if not verbose:  # upstream deprecation noise while building models
            warnings.simplefilter('ignore')
        return _generate_report(config, checkpoint, out_dir, lowrank_config,
                                lowrank_checkpoint, input_shape, evaluate, progress, verbose)


def _generate_report(config, checkpoint, out_dir, lowrank_config, lowrank_checkpoint,
                     input_shape, evaluate, progress, verbose) -> dict:
    from ..models.factorize_checkpoint import (factorize_checkpoint, load_config,
                                               load_model_and_checkpoint)

    # Validate everything that can be checked before writing anything.
    cfg = load_config(config)
    scope = config_scope(cfg, f'config {os.fspath(config)!r}')
    shape = check_input_shape(tuple(input_shape) if input_shape is not None
                              else DEFAULT_INPUT_SHAPES[scope])
    original, ckpt = load_model_and_checkpoint(cfg, checkpoint, config)

    def load_compact():
        lcfg = load_config(lowrank_config)
        _check_same_scope(scope, lcfg, lowrank_config)
        compact, lckpt = load_model_and_checkpoint(lcfg, lowrank_checkpoint, lowrank_config)
        where = (f'low-rank config {os.fspath(lowrank_config)!r} vs config '
                 f'{os.fspath(config)!r}')
        layers = factorized_layers(original, compact, ckpt, where)
        return lcfg, compact, lckpt, layers

    if lowrank_config is not None:
        lcfg, compact, lckpt, layers = load_compact()

    out_path = Path(out_dir)
    created_dir = not out_path.exists()
    out_path = check_writable_dir(out_path)
    cleanup = _Cleanup(out_path, created_dir)
    try:
        if lowrank_config is None:
            produced = factorize_checkpoint(config, checkpoint, out_path)
            lowrank_config, lowrank_checkpoint = produced.config_path, produced.checkpoint_path
            lcfg, compact, lckpt, layers = load_compact()
        report_warnings = _source_warnings(lckpt, original, compact, checkpoint,
                                           lowrank_checkpoint, layers)

        complexity = dict(original=measure_complexity(original, scope, shape),
                          compact=measure_complexity(compact, scope, shape))

        spectra = []
        for index in spread_indices(len(layers)):
            layer = layers[index]
            spectra.append(dict(name=layer['name'], rank=layer['rank'],
                                full_rank=layer['full_rank'],
                                folded=layer['folded_norm'] is not None,
                                singular_values=weight_spectrum(original, layer['name'],
                                                                layer['folded_norm'])))

        metric, metrics = None, None
        if evaluate:
            eval_dir = out_path / 'eval'
            cleanup.watch(eval_dir)
            metrics = {}
            for which, (c, k) in (('original', (cfg, checkpoint)),
                                  ('compact', (lcfg, lowrank_checkpoint))):
                work_dir = eval_dir / which
                cleanup.watch(work_dir)
                title = (f'evaluating the {"projected" if which == "original" else which} '
                         f'model: {os.fspath(k)}')
                metrics[which] = evaluate_checkpoint(c, k, work_dir, progress=progress,
                                                     title=title, verbose=verbose)
            name = primary_metric(metrics['original'])
            if name not in metrics['compact']:
                raise ValueError(f'the compact model\'s test evaluator did not return {name!r} '
                                 f'(got {sorted(metrics["compact"])})')
            metric = dict(name=name, original=metrics['original'][name],
                          compact=metrics['compact'][name],
                          delta=metrics['compact'][name] - metrics['original'][name])

        report = dict(
            task=TASKS[scope], default_scope=scope, input_shape=list(shape),
            flops_convention=FLOPS_CONVENTION, rpn_proposals=rpn_proposals(original),
            original=dict(config=_abs(config), checkpoint=_abs(checkpoint)),
            compact=dict(config=_abs(lowrank_config), checkpoint=_abs(lowrank_checkpoint)),
            metric=metric, metrics=metrics,
            rows=build_rows(complexity, metric), complexity=complexity,
            layers=layers, spectra=spectra, warnings=report_warnings,
            files={name: str(out_path / name) for name in REPORT_FILES})
        report = _finite(report)

        from .plots import plot_ranks
        with atomic_path(out_path / 'report.json') as tmp_json, \
                atomic_path(out_path / 'report.md') as tmp_md, \
                atomic_path(out_path / 'ranks.png') as tmp_png:
            tmp_json.write_text(json.dumps(report, indent=2) + '\n')
            tmp_md.write_text(markdown_report(report))
            plot_ranks(layers, spectra, tmp_png,
                       title=f'{Path(os.fspath(config)).stem}: kept rank and singular values')
            for tmp in (tmp_json, tmp_md, tmp_png):
                _readable(tmp)
    except BaseException:
        cleanup()
        raise
    return report


def _readable(path: Path) -> None:
    """Give a temporary file (mkstemp: 0600) the mode a plain ``open`` would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _abs(path: PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def _check_same_scope(scope: str, lcfg: Config, lowrank_config: PathLike) -> None:
    lscope = config_scope(lcfg, f'low-rank config {os.fspath(lowrank_config)!r}')
    if lscope != scope:
        raise ValueError(f'low-rank config {os.fspath(lowrank_config)!r} has default_scope '
                         f'{lscope!r} but the config has {scope!r} (mismatched configs?)')


def _source_warnings(lckpt: dict, original: nn.Module, compact: nn.Module,
                     checkpoint: PathLike, lowrank_checkpoint: PathLike,
                     layers: List[dict]) -> List[str]:
    """Signs that the compact checkpoint was not factorized from this checkpoint."""
    found = []
    source = ((lckpt.get('meta') or {}).get('lrpet_factorized') or {}).get('source_checkpoint')
    if source is not None and os.path.abspath(source) != _abs(checkpoint):
        found.append(f'the low-rank checkpoint {os.fspath(lowrank_checkpoint)!r} was '
                     f'factorized from {source!r}, not from {_abs(checkpoint)!r}')
    # parameters untouched by factorization should be equal (unless fine-tuned afterwards)
    touched = set()
    for layer in layers:
        touched.add(layer['name'] + '.')
        if layer['folded_norm']:
            touched.add(layer['folded_norm'] + '.')
    state, lstate = original.state_dict(), compact.state_dict()
    differing = [k for k in state if k in lstate and not any(k.startswith(t) for t in touched)
                 and not k.endswith('num_batches_tracked')
                 and (state[k].shape != lstate[k].shape or not torch.equal(state[k], lstate[k]))]
    if differing:
        found.append(f'{len(differing)} tensors that factorization does not change differ '
                     f'between the checkpoint and the low-rank checkpoint (e.g. '
                     f'{differing[0]!r}): the compact model was not factorized from this '
                     'checkpoint, or was fine-tuned afterwards')
    return found


def _finite(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN; e.g. an IoU
    metric over classes the test set never shows)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
