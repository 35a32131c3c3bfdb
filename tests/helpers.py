"""Plain helpers shared by the tests (import with ``from helpers import ...``)."""
from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path
from types import ModuleType
from typing import Optional, Union

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / 'configs' / 'lrpet' / '_toy_'
"""Directory of the small CPU configs."""

VOC_NUM_TRAIN = 8
VOC_NUM_VAL = 4
VOC_IMG_SIZE = (160, 128)  # (w, h)
"""Size of the session-wide synthetic data set of the ``voc_root`` fixture (conftest.py)."""

DET_TOY = 'faster-rcnn_r18_fpn_toy_voc'
SEG_TOY = 'pspnet_r18-d8_toy_voc12aug'


def load_toy_config(name: str, voc_root: Union[str, os.PathLike],
                    work_dir: Union[str, os.PathLike]):
    """The mmengine ``Config`` of toy config ``name`` (file name in ``CONFIG_DIR``, with or
    without ``.py``), with every dataloader ``data_root`` pointed at ``voc_root`` (a
    ``VOCdevkit`` directory) and ``work_dir`` set.

    It also gets a unique ``experiment_name`` and visualizer name, so that several Runners built
    in one test process (even within the same second) do not share the logger, visualizer or
    default-scope instances that mmengine keys by name.
    """
    from mmengine.config import Config

    from benchlib.config_data_root import set_data_root

    path = CONFIG_DIR / (name if name.endswith('.py') else f'{name}.py')
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob('*.py'))
        raise FileNotFoundError(f'no toy config {name!r} ({path}); known: {known}')
    cfg = Config.fromfile(str(path))
    set_data_root(cfg, str(voc_root))
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'{path.stem}-{uuid.uuid4().hex[:8]}'
    if cfg.get('visualizer') is not None:
        cfg.visualizer.pop('name', None)  # the Runner then names it after experiment_name
    return cfg


def load_repo_script(relative_path: str, module_name: str) -> ModuleType:
    """Import a script of the repository (e.g. ``'benchmarks/bench_projection.py'``, which is
    not in a package) as module ``module_name``."""
    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lrpet_train_config(name: str, voc_root: Union[str, os.PathLike],
                       work_dir: Union[str, os.PathLike], train_cfg: dict,
                       hook: Optional[dict] = None,
                       checkpoint_interval: Optional[int] = None):
    """A toy config (:func:`load_toy_config`) for a short LRPET run: ``train_cfg`` as given,
    one ``LRPETHook`` (default ``rank_ratio=0.5``, every epoch / every 2 iterations), and a
    ``CheckpointHook`` every ``checkpoint_interval`` epochs / iterations (default: every epoch,
    or once at ``max_iters``)."""
    cfg = load_toy_config(name, voc_root, work_dir)
    by_epoch = train_cfg['type'] == 'EpochBasedTrainLoop'
    cfg.train_cfg = dict(train_cfg)
    cfg.custom_imports = dict(imports=['lrpet_mm'], allow_failed_imports=False)
    cfg.custom_hooks = [dict(type='LRPETHook', rank_ratio=0.5, interval=1 if by_epoch else 2)
                        if hook is None else dict(hook, type='LRPETHook')]
    if checkpoint_interval is None:
        checkpoint_interval = 1 if by_epoch else train_cfg['max_iters']
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=by_epoch,
                                        interval=checkpoint_interval)
    return cfg
