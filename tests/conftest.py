"""Shared pytest fixtures."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:
    import lrpet_mm  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import VOC_IMG_SIZE, VOC_NUM_TRAIN, VOC_NUM_VAL  # noqa: E402
from lrpet_mm.datasets import generate_synthetic_voc  # noqa: E402


@pytest.fixture(scope='session')
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic ``VOCdevkit`` (8 train / 4 val images of 160x128, seed 0), made once per
    session; see ``lrpet_mm.datasets.generate_synthetic_voc`` for the layout."""
    return generate_synthetic_voc(
        tmp_path_factory.mktemp('voc') / 'VOCdevkit',
        num_train=VOC_NUM_TRAIN,
        num_val=VOC_NUM_VAL,
        img_size=VOC_IMG_SIZE,
        seed=0)


def _train_lrpet_run(name: str, voc_root: Path, work_dir: Path, train_cfg: dict,
                     hook: dict = None):
    """Train a toy config with LRPETHook (default rank_ratio 0.5); (config file dumped,
    checkpoint)."""
    from mmengine.runner import Runner

    from helpers import lrpet_train_config

    cfg = lrpet_train_config(name, voc_root, work_dir, train_cfg, hook)
    Runner.from_cfg(cfg).train()
    config_path = work_dir / f'{name}.py'
    cfg.dump(str(config_path))
    by_epoch = train_cfg['type'] == 'EpochBasedTrainLoop'
    return config_path, work_dir / ('epoch_1.pth' if by_epoch
                                    else f'iter_{train_cfg["max_iters"]}.pth')


@pytest.fixture(scope='session')
def seg_lrpet_run(voc_root, tmp_path_factory):
    """The toy PSPNet trained 4 iterations with LRPETHook: (config file, checkpoint)."""
    return _train_lrpet_run('pspnet_r18-d8_toy_voc12aug', voc_root,
                            tmp_path_factory.mktemp('seg_lrpet_run'),
                            dict(type='IterBasedTrainLoop', max_iters=4, val_interval=100))


@pytest.fixture(scope='session')
def det_model_run(voc_root, tmp_path_factory):
    """The toy Faster R-CNN trained 1 epoch with whole-model LRPET (the hook of
    ``faster-rcnn_r18_fpn_lrpet-model_toy_voc.py``: -50 % whole-model FLOPs): (config file,
    checkpoint); shared by the factorize, report, deploy and whole-model tests (read only)."""
    return _train_lrpet_run('faster-rcnn_r18_fpn_toy_voc', voc_root,
                            tmp_path_factory.mktemp('det_model_run'),
                            dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=1),
                            _toy_hook('faster-rcnn_r18_fpn_lrpet-model_toy_voc'))


@pytest.fixture(scope='session')
def seg_model_run(voc_root, tmp_path_factory):
    """The toy PSPNet trained 4 iterations with whole-model LRPET (-50 % whole-model FLOPs,
    projected every 2 iterations): (config file, checkpoint); read only."""
    return _train_lrpet_run('pspnet_r18-d8_toy_voc12aug', voc_root,
                            tmp_path_factory.mktemp('seg_model_run'),
                            dict(type='IterBasedTrainLoop', max_iters=4, val_interval=100),
                            dict(_toy_hook('pspnet_r18-d8_lrpet-model_toy_voc12aug'),
                                 interval=2))


def _toy_hook(name: str) -> dict:
    """The LRPETHook entry of toy config ``name`` (without its type)."""
    from mmengine.config import Config

    from helpers import CONFIG_DIR
    hooks = Config.fromfile(str(CONFIG_DIR / f'{name}.py')).custom_hooks
    (hook, ) = [h for h in hooks if h['type'] == 'LRPETHook']
    return {k: v for k, v in hook.items() if k != 'type'}
