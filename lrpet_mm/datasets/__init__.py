"""Built-in synthetic VOC-layout data set, a synthetic classification set and config helpers.

Nothing here imports mmengine/mmdet/mmseg at import time.
"""
from .config_data_root import replace_data_root, set_data_root
from .synthetic_classification import CLASSIFICATION_CLASSES, make_shape_classification
from .synthetic_voc import (
    DEFAULT_CLASSES,
    VOC_CLASSES,
    generate_synthetic_voc,
    read_stamp,
    voc_palette,
)

__all__ = [
    'generate_synthetic_voc', 'read_stamp', 'voc_palette', 'VOC_CLASSES', 'DEFAULT_CLASSES',
    'set_data_root', 'replace_data_root', 'make_shape_classification',
    'CLASSIFICATION_CLASSES'
]
