"""Run a config's test loop on a checkpoint, quietly, with a progress bar."""
import contextlib
import copy
import io
import logging
import os
import sys
import uuid
import warnings
from pathlib import Path
from typing import Dict, Optional, Union

from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.utils import ProgressBar

from ..utils.values import error_text, metric_values

PathLike = Union[str, os.PathLike]
PRIMARY_METRICS = ('pascal_voc/mAP', 'coco/bbox_mAP', 'mIoU')
"""The task metric reported, the first of these the test evaluator returns."""


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
            f'{data_root!r}, log in {os.fspath(work_dir)!r}): {error_text(e, 1000)}') from e
    return metric_values(metrics)


@contextlib.contextmanager
def _quiet_to_stderr():
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter('ignore')
        yield


def primary_metric(metrics: Dict[str, float]) -> str:
    """The reported metric: the first of ``PRIMARY_METRICS`` present, else the first key."""
    for key in PRIMARY_METRICS:
        if key in metrics:
            return key
    numeric = [k for k, v in metrics.items() if isinstance(v, (int, float))]
    if not numeric:
        raise ValueError(f'the test evaluator returned no numeric metric: {metrics!r}')
    return numeric[0]
