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
