"""Built-in synthetic VOC-layout data set.

Nothing here imports mmengine/mmdet/mmseg at import time.
"""
from .synthetic_voc import (
    DEFAULT_CLASSES,
    VOC_CLASSES,
    generate_synthetic_voc,
    read_stamp,
    voc_palette,
)

__all__ = ['generate_synthetic_voc', 'read_stamp', 'voc_palette', 'VOC_CLASSES',
           'DEFAULT_CLASSES']
