"""The toy CPU configs train and validate end to end (a few iterations, ~10 s in all)."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import DET_TOY, SEG_TOY, load_toy_config

pytestmark = pytest.mark.slow  # drives a runner, a training, a tool or a benchmark


def test_faster_rcnn_toy_trains_one_epoch(voc_root: Path, tmp_path: Path) -> None:
    import mmdet  # noqa: F401  (a hard requirement: fail, never skip)
    from mmengine.runner import Runner

    cfg = load_toy_config(DET_TOY, voc_root, tmp_path)
    cfg.train_cfg.max_epochs = 1  # 8 images, batch 2: 4 iterations, then validation
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 4
    assert (tmp_path / 'epoch_1.pth').is_file()
    m_ap = runner.message_hub.get_scalar('val/pascal_voc/mAP').current()
    # the test loop on the same (validation) images and weights reports the same mAP
    assert runner.test()['pascal_voc/mAP'] == pytest.approx(m_ap)


def test_pspnet_toy_trains_a_few_iterations(voc_root: Path, tmp_path: Path) -> None:
    import mmseg  # noqa: F401  (a hard requirement: fail, never skip)
    from mmengine.runner import Runner

    cfg = load_toy_config(SEG_TOY, voc_root, tmp_path)
    cfg.train_cfg.max_iters = 4
    cfg.train_cfg.val_interval = 4
    cfg.default_hooks.checkpoint.interval = 4
    cfg.param_scheduler[0].end = 4
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 4
    assert (tmp_path / 'iter_4.pth').is_file()
    m_iou = runner.message_hub.get_scalar('val/mIoU').current()
    assert runner.test()['mIoU'] == pytest.approx(m_iou)
