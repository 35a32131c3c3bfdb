"""A synthetic image classification task, made in memory (pure numpy + PIL).

Used to pretrain backbones without downloads (see :mod:`benchlib.pretrained_backbone`).
It reuses the drawing helpers of :mod:`lrpet_mm.datasets.synthetic_voc` (textured
backgrounds, the five shapes) but draws different images from its own random stream: one shape
per image, of a random size, position and colour, either filled or only its outline. The class
is the shape and the fill style, never the colour, so a network has to learn shape features.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from PIL import Image, ImageFilter

from lrpet_mm.datasets.synthetic_voc import draw_background, shape_mask

__all__ = ['CLASSIFICATION_CLASSES', 'make_shape_classification']

_SHAPES: Tuple[str, ...] = ('ellipse', 'rectangle', 'triangle', 'diamond', 'cross')

CLASSIFICATION_CLASSES: Tuple[str, ...] = tuple(
    f'{shape}_{style}' for shape in _SHAPES for style in ('filled', 'outline'))
"""The 10 class names; label ``i`` is ``CLASSIFICATION_CLASSES[i]`` (shape ``i // 2``, filled
when ``i`` is even, outline when odd)."""

_STREAM_ID = 0xC1A55  # mixes into the seed: a stream of its own, unlike synthetic_voc's
_MIN_SIDE, _MAX_SIDE = 32, 4096
_SIZE_RANGE = (0.3, 0.9)  # shape side / image side
_MIN_CONTRAST = 60.0  # mean |colour - background| per channel the shape colour must reach


def _check_int(name: str, value: object, lo: int, hi: float = float('inf')) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
            or not lo <= value <= hi):
        bound = f'>= {lo}' if hi == float('inf') else f'in [{lo}, {int(hi)}]'
        raise ValueError(f'{name} must be an integer {bound}, got {value!r}')
    return int(value)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The border band of a boolean mask: ``mask`` minus ``mask`` eroded by ``width`` px."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    eroded = np.asarray(img.filter(ImageFilter.MinFilter(2 * width + 1))) > 0
    return mask & ~eroded


def _render(rng: np.random.Generator, img_size: int, label: int) -> np.ndarray:
    """One uint8 (img_size, img_size, 3) RGB image of class ``label``."""
    size = (img_size, img_size)
    shape, outline = _SHAPES[label // 2], bool(label % 2)
    image = draw_background(rng, size, True)
    lo, hi = _SIZE_RANGE
    obj_w = int(round(img_size * rng.uniform(lo, hi)))
    obj_h = int(round(img_size * rng.uniform(lo, hi)))
    x0 = int(rng.integers(0, img_size - obj_w + 1))
    y0 = int(rng.integers(0, img_size - obj_h + 1))
    mask = shape_mask(shape, (x0, y0, x0 + obj_w - 1, y0 + obj_h - 1), size)
    if outline:
        width = max(2, int(round(min(obj_w, obj_h) * 0.08)))
        mask = _outline(mask, width)
    background = image[mask].mean(axis=0)
    for _attempt in range(20):  # a random colour that stands out from the local background
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - background).mean() >= _MIN_CONTRAST:
            break
    image[mask] = colour + rng.normal(0, 8, size=(int(mask.sum()), 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def make_shape_classification(num_images: int, img_size: int = 64,
                              seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Make a balanced 10-class shape classification set (see ``CLASSIFICATION_CLASSES``).

    Each image shows one of five shapes (ellipse, rectangle, triangle, diamond, cross), filled
    or as an outline a few pixels wide, at a random size (30-90 % of the image side), position
    and colour, on a random textured background. Labels are balanced (``num_images // 10`` or
    one more per class) and shuffled. The same arguments give the same arrays.

    Args:
        num_images (int): Number of images (>= 1).
        img_size (int): Side of the square images in pixels (32-4096). Defaults to 64.
        seed (int): Random seed (>= 0); different seeds give different images. Defaults to 0.

    Returns:
        Tuple[np.ndarray, np.ndarray]: uint8 images ``(num_images, img_size, img_size, 3)``
        in RGB order, and int64 labels ``(num_images,)`` in ``[0, 10)``.

    Raises:
        ValueError: If an argument is invalid (the message names it).
    """
    num_images = _check_int('num_images', num_images, 1)
    img_size = _check_int('img_size', img_size, _MIN_SIDE, _MAX_SIDE)
    seed = _check_int('seed', seed, 0)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_ID]))
    num_classes = len(CLASSIFICATION_CLASSES)
    labels = rng.permutation(np.arange(num_images, dtype=np.int64) % num_classes)
    images = np.empty((num_images, img_size, img_size, 3), dtype=np.uint8)
    for index, label in enumerate(labels):
        images[index] = _render(rng, img_size, int(label))
    return images, labels
