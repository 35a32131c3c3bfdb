"""A small synthetic data set in the Pascal VOC directory layout.

Pure numpy + PIL: nothing from mmengine/mmdet/mmseg is imported here, so the data can be
made before (or without) the OpenMMLab stack.

Layout written under ``root`` (a ``VOCdevkit`` directory)::

    VOC2007/                                  # mmdet VOCDataset (detection)
        Annotations/000001.xml ...            # trainval ids first, then test ids
        ImageSets/Main/{trainval,test}.txt
        JPEGImages/000001.jpg ...
    VOC2012/                                  # mmseg PascalVOCDataset + mmdet VOC2012 trainval
        Annotations/2012_000001.xml ...
        ImageSets/Main/trainval.txt           # every VOC2012 id
        ImageSets/Segmentation/{train,val,aug}.txt   # aug.txt == train.txt
        JPEGImages/2012_000001.jpg ...
        SegmentationClass/2012_000001.png     # 'P' PNG, VOC palette
        SegmentationClassAug/2012_000001.png  # 'L' PNG, same class indices
    lrpet_synthetic.json                      # stamp: the generation arguments

Each image (H x W x 3, uint8 RGB) shows 1-3 objects on a noisy background. Every class has a
fixed, distinct look (a shape and a colour, see ``CLASS_STYLES``). Boxes are the tight boxes of
the drawn shapes in VOC's 1-based inclusive pixel coordinates; masks hold the class index
(1..20 in ``VOC_CLASSES`` order, 0 = background) and 255 on a 1-pixel band on each side of every
object outline, like the "void" borders of real VOC masks.

Object sides are 27-60 % of the short image side (15-75 % with ``hard=True``), so at the
default 160x128 every object is >= 34 px and upstream's ``bbox_min_size=32`` ignores none.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    'VOC_CLASSES', 'DEFAULT_CLASSES', 'CLASS_STYLES', 'STAMP_NAME', 'voc_palette',
    'generate_synthetic_voc', 'read_stamp'
]

VOC_CLASSES: Tuple[str, ...] = (
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor')
"""The 20 Pascal VOC class names; mask value of ``VOC_CLASSES[i]`` is ``i + 1``."""

DEFAULT_CLASSES: Tuple[str, ...] = ('person', 'car', 'dog', 'cat')
"""Classes drawn by default: few, so that a tiny detector learns them in minutes on CPU."""

STAMP_NAME = 'lrpet_synthetic.json'
_FORMAT_VERSION = 1
_MIN_SIDE, _MAX_SIDE = 32, 4096
_MAX_OBJECTS = 3
_JPEG_QUALITY = 95

# (shape, RGB colour) per class. The four default classes differ in both shape and colour.
CLASS_STYLES: Dict[str, Tuple[str, Tuple[int, int, int]]] = {
    'person': ('ellipse', (220, 40, 40)),
    'car': ('rectangle', (40, 80, 230)),
    'dog': ('triangle', (40, 190, 60)),
    'cat': ('diamond', (235, 200, 30)),
    'aeroplane': ('cross', (230, 120, 20)),
    'bicycle': ('ellipse', (150, 40, 200)),
    'bird': ('rectangle', (20, 200, 200)),
    'boat': ('triangle', (240, 100, 180)),
    'bottle': ('diamond', (120, 60, 20)),
    'bus': ('cross', (30, 30, 120)),
    'chair': ('ellipse', (130, 230, 60)),
    'cow': ('rectangle', (250, 160, 160)),
    'diningtable': ('triangle', (110, 110, 250)),
    'horse': ('diamond', (0, 120, 110)),
    'motorbike': ('cross', (200, 0, 100)),
    'pottedplant': ('ellipse', (250, 250, 250)),
    'sheep': ('rectangle', (20, 20, 20)),
    'sofa': ('triangle', (170, 140, 60)),
    'train': ('diamond', (90, 160, 250)),
    'tvmonitor': ('cross', (110, 220, 160)),
}

Size = Tuple[int, int]
Box = Tuple[int, int, int, int]


def voc_palette() -> List[int]:
    """The standard Pascal VOC colour map as a flat list of 768 ints (256 RGB entries)."""
    palette: List[int] = []
    for index in range(256):
        r = g = b = 0
        c = index
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


# ----------------------------------------------------------------------------- validation
def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
    return int(value)


def _check_size(img_size: object) -> Size:
    try:
        width, height = img_size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f'img_size must be a (width, height) pair, got {img_size!r}') from None
    for side in (width, height):
        if (isinstance(side, bool) or not isinstance(side, (int, np.integer))
                or not _MIN_SIDE <= side <= _MAX_SIDE):
            raise ValueError(f'img_size sides must be integers in [{_MIN_SIDE}, {_MAX_SIDE}] '
                             f'pixels, got img_size={img_size!r}')
    return int(width), int(height)


def _check_classes(classes: object) -> Tuple[str, ...]:
    if isinstance(classes, str) or not isinstance(classes, Sequence) or len(classes) == 0:
        raise ValueError(f'classes must be a non-empty sequence of VOC class names, '
                         f'got {classes!r}')
    for name in classes:
        if name not in VOC_CLASSES:
            raise ValueError(f'unknown class {name!r} in classes={list(classes)!r}; '
                             f'choose from {VOC_CLASSES}')
    if len(set(classes)) != len(classes):
        raise ValueError(f'classes has duplicates: {list(classes)!r}')
    return tuple(classes)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f'{name} must be a bool, got {value!r}')
    return bool(value)


# ----------------------------------------------------------------------------- drawing
def shape_mask(shape: str, box: Box, size: Size) -> np.ndarray:
    """Boolean (H, W) mask of ``shape`` drawn to fill ``box`` = (x0, y0, x1, y1), 0-based
    inclusive pixel coordinates."""
    x0, y0, x1, y1 = box
    canvas = Image.new('L', size, 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    if shape == 'rectangle':
        draw.rectangle([x0, y0, x1, y1], fill=1)
    elif shape == 'ellipse':
        draw.ellipse([x0, y0, x1, y1], fill=1)
    elif shape == 'triangle':
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=1)
    elif shape == 'diamond':
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=1)
    elif shape == 'cross':
        bar_w, bar_h = max(2, (x1 - x0 + 1) // 3), max(2, (y1 - y0 + 1) // 3)
        draw.rectangle([x0, cy - bar_h / 2, x1, cy + bar_h / 2], fill=1)
        draw.rectangle([cx - bar_w / 2, y0, cx + bar_w / 2, y1], fill=1)
    else:  # pragma: no cover - CLASS_STYLES only holds the shapes above
        raise ValueError(f'unknown shape {shape!r}')
    return np.asarray(canvas, dtype=bool)


def draw_background(rng: np.random.Generator, size: Size, hard: bool) -> np.ndarray:
    """Float (H, W, 3) background in [0, 255]: a dull colour plus noise, or (hard) a texture
    of random colour gratings and blobs plus noise."""
    width, height = size
    base = rng.uniform(70, 170) + rng.uniform(-20, 20, size=3)
    img = np.broadcast_to(base, (height, width, 3)).astype(np.float64)
    if hard:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        for _ in range(3):
            angle = rng.uniform(0, np.pi)
            period = rng.uniform(6, 40)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + phase)
            img = img + wave[..., None] * rng.uniform(-45, 45, size=3)
        for _ in range(int(rng.integers(2, 6))):
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            radius = rng.uniform(0.05, 0.3) * min(width, height)
            blob = np.exp(-((xx - cx)**2 + (yy - cy)**2) / (2 * radius**2))
            img = img + blob[..., None] * rng.uniform(-70, 70, size=3)
    img = img + rng.normal(0, 12 if not hard else 18, size=(height, width, 3))
    return img


def _boxes_apart(a: Box, b: Box, margin: int) -> bool:
    return (a[2] + margin < b[0] or b[2] + margin < a[0] or a[3] + margin < b[1]
            or b[3] + margin < a[1])


def _render_sample(rng: np.random.Generator, size: Size, classes: Tuple[str, ...],
                   hard: bool) -> Tuple[np.ndarray, List[Tuple[str, Box]], np.ndarray]:
    """Draw one image.

    Returns:
        image: uint8 (H, W, 3) RGB.
        objects: list of (class name, (xmin, ymin, xmax, ymax)) with 1-based inclusive pixel
            coordinates of the tight box of each drawn shape (VOC convention).
        mask: uint8 (H, W) class indices (0 background, 1..20 per ``VOC_CLASSES``), 255 on
            object borders.
    """
    width, height = size
    short = min(width, height)
    lo, hi = (0.15, 0.75) if hard else (0.27, 0.6)  # object side / short image side
    image = draw_background(rng, size, hard)
    instances = np.zeros((height, width), dtype=np.uint8)  # 0 bg, k = k-th object
    class_of_instance = [0]
    objects: List[Tuple[str, Box]] = []
    placed: List[Box] = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        name = classes[int(rng.integers(len(classes)))]
        shape, colour = CLASS_STYLES[name]
        for _attempt in range(20):
            obj_w = max(8, int(round(short * rng.uniform(lo, hi))))
            obj_h = max(8, int(round(short * rng.uniform(lo, hi))))
            obj_w, obj_h = min(obj_w, width - 2), min(obj_h, height - 2)
            x0 = int(rng.integers(1, width - obj_w))
            y0 = int(rng.integers(1, height - obj_h))
            box = (x0, y0, x0 + obj_w - 1, y0 + obj_h - 1)
            if hard or all(_boxes_apart(box, other, 4) for other in placed):
                break
        else:
            continue  # no room left for a non-overlapping object
        obj_mask = shape_mask(shape, box, size)
        ys, xs = np.nonzero(obj_mask)
        if len(xs) == 0:  # pragma: no cover - shapes are >= 8 px
            continue
        placed.append(box)
        tint = np.clip(np.asarray(colour, np.float64) + rng.uniform(-15, 15, size=3), 0, 255)
        image[obj_mask] = tint + rng.normal(0, 8, size=(len(xs), 3))
        instances[obj_mask] = len(placed)
        class_of_instance.append(VOC_CLASSES.index(name) + 1)
        objects.append((name, (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1,
                               int(ys.max()) + 1)))
    if not objects:  # pragma: no cover - the first object always fits
        raise RuntimeError('internal error: no object could be placed')
    mask = np.asarray(class_of_instance, dtype=np.uint8)[instances]
    inst_img = Image.fromarray(instances)
    grown = np.asarray(inst_img.filter(ImageFilter.MaxFilter(3)))
    shrunk = np.asarray(inst_img.filter(ImageFilter.MinFilter(3)))
    mask[grown != shrunk] = 255
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects, mask


# ----------------------------------------------------------------------------- writing
def _save_jpeg(path: Path, image: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) RGB array as JPEG (fixed quality: same bytes every time)."""
    Image.fromarray(image).save(path, format='JPEG', quality=_JPEG_QUALITY)


def _save_png(path: Path, mask: np.ndarray, palette: Optional[List[int]]) -> None:
    """Write a uint8 (H, W) mask as 'P' PNG with ``palette``, or as 'L' PNG if None."""
    img = Image.fromarray(mask)
    if palette is not None:
        img = img.convert('P')
        img.putpalette(palette)
    img.save(path, format='PNG')


def _annotation_xml(folder: str, img_id: str, size: Size, objects: List[Tuple[str, Box]],
                    segmented: bool) -> str:
    width, height = size
    lines = [
        '<annotation>', f'\t<folder>{folder}</folder>', f'\t<filename>{img_id}.jpg</filename>',
        '\t<source>', '\t\t<database>LRPET synthetic VOC</database>', '\t</source>',
        '\t<size>', f'\t\t<width>{width}</width>', f'\t\t<height>{height}</height>',
        '\t\t<depth>3</depth>', '\t</size>', f'\t<segmented>{int(segmented)}</segmented>'
    ]
    for name, (xmin, ymin, xmax, ymax) in objects:
        lines += [
            '\t<object>', f'\t\t<name>{name}</name>', '\t\t<pose>Unspecified</pose>',
            '\t\t<truncated>0</truncated>', '\t\t<difficult>0</difficult>', '\t\t<bndbox>',
            f'\t\t\t<xmin>{xmin}</xmin>', f'\t\t\t<ymin>{ymin}</ymin>',
            f'\t\t\t<xmax>{xmax}</xmax>', f'\t\t\t<ymax>{ymax}</ymax>', '\t\t</bndbox>',
            '\t</object>'
        ]
    lines.append('</annotation>')
    return '\n'.join(lines) + '\n'


def _write_ids(path: Path, ids: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(f'{i}\n' for i in ids))


def _write_year(out: Path, year: int, num_train: int, num_val: int, size: Size,
                classes: Tuple[str, ...], seed: int, hard: bool) -> None:
    """Write VOC2007 (detection only) or VOC2012 (detection + segmentation) under ``out``."""
    folder = f'VOC{year}'
    year_dir = out / folder
    segmentation = year == 2012
    subdirs = ['Annotations', 'JPEGImages']
    if segmentation:
        subdirs += ['SegmentationClass', 'SegmentationClassAug']
    for sub in subdirs:
        (year_dir / sub).mkdir(parents=True)
    palette = voc_palette()
    ids = [f'{index:06d}' if year == 2007 else f'{year}_{index:06d}'
           for index in range(1, num_train + num_val + 1)]
    for index, img_id in enumerate(ids):
        rng = np.random.default_rng([seed, year, index])
        image, objects, mask = _render_sample(rng, size, classes, hard)
        _save_jpeg(year_dir / 'JPEGImages' / f'{img_id}.jpg', image)
        (year_dir / 'Annotations' / f'{img_id}.xml').write_text(
            _annotation_xml(folder, img_id, size, objects, segmentation))
        if segmentation:
            _save_png(year_dir / 'SegmentationClass' / f'{img_id}.png', mask, palette)
            _save_png(year_dir / 'SegmentationClassAug' / f'{img_id}.png', mask, None)
    train_ids, val_ids = ids[:num_train], ids[num_train:]
    if segmentation:
        seg_sets = year_dir / 'ImageSets' / 'Segmentation'
        _write_ids(seg_sets / 'train.txt', train_ids)
        _write_ids(seg_sets / 'val.txt', val_ids)
        _write_ids(seg_sets / 'aug.txt', train_ids)
        _write_ids(year_dir / 'ImageSets' / 'Main' / 'trainval.txt', ids)
    else:
        _write_ids(year_dir / 'ImageSets' / 'Main' / 'trainval.txt', train_ids)
        _write_ids(year_dir / 'ImageSets' / 'Main' / 'test.txt', val_ids)


# ----------------------------------------------------------------------------- public API
def read_stamp(root: Union[str, os.PathLike]) -> Optional[dict]:
    """The generation arguments stored in ``root/lrpet_synthetic.json``, or None if absent or
    unreadable."""
    try:
        return json.loads((Path(root) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def generate_synthetic_voc(root: Union[str, os.PathLike],
                           num_train: int = 16,
                           num_val: int = 8,
                           img_size: Tuple[int, int] = (160, 128),
                           seed: int = 0,
                           overwrite: bool = False,
                           classes: Sequence[str] = DEFAULT_CLASSES,
                           hard: bool = False) -> Path:
    """Write a synthetic VOC-layout data set under ``root`` (the ``VOCdevkit`` directory).

    Args:
        root: directory to create, e.g. ``data/VOCdevkit``. Its parent is created if needed.
        num_train: images in VOC2007 ``trainval`` and in VOC2012 ``train`` (and ``aug``).
        num_val: images in VOC2007 ``test`` and in VOC2012 ``val``.
        img_size: (width, height) of every image in pixels, each in [32, 4096].
        seed: non-negative integer; the same arguments give byte-identical files.
        overwrite: replace an existing ``root`` made by this function with other arguments.
            A non-empty ``root`` without a stamp (e.g. a real VOCdevkit) is never deleted.
        classes: VOC class names to draw (subset of ``VOC_CLASSES``). Labels and mask values
            always use the full 20-class VOC indexing.
        hard: harder variant: textured background, wider object scale range, overlapping
            objects allowed.

    Returns:
        The absolute path of ``root``.

    If ``root`` already holds a data set made with the same arguments it is reused as is.
    Files are written to a temporary sibling directory that is renamed into place only when
    complete, so an interrupted run never leaves a partial data set at ``root``.
    """
    num_train = _check_count('num_train', num_train)
    num_val = _check_count('num_val', num_val)
    size = _check_size(img_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
    classes = _check_classes(classes)
    hard = _check_bool('hard', hard)
    overwrite = _check_bool('overwrite', overwrite)
    if not isinstance(root, (str, os.PathLike)) or str(root) == '':
        raise ValueError(f'root must be a non-empty path, got {root!r}')
    root = Path(root).expanduser().absolute()

    stamp = {
        'generator': 'lrpet_mm.datasets.synthetic_voc',
        'format_version': _FORMAT_VERSION,
        'num_train': num_train,
        'num_val': num_val,
        'img_size': list(size),
        'seed': int(seed),
        'classes': list(classes),
        'hard': hard,
    }
    if root.exists() or root.is_symlink():
        _check_replaceable(root, stamp, overwrite)
        if read_stamp(root) == stamp and not overwrite:
            return root

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.partial-', dir=root.parent))
    try:
        for year in (2007, 2012):
            _write_year(tmp, year, num_train, num_val, size, classes, int(seed), hard)
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + '\n')
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0o700
        _move_into_place(tmp, root, stamp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _check_replaceable(root: Path, stamp: dict, overwrite: bool) -> None:
    """Raise unless ``root`` may be reused or (with ``overwrite``) replaced."""
    if not root.is_dir():
        raise FileExistsError(f'{root} exists and is not a directory; remove it or choose '
                              f'another root')
    existing = read_stamp(root)
    if existing is None:
        if any(root.iterdir()):
            raise FileExistsError(
                f'{root} exists, is not empty and has no {STAMP_NAME} stamp, so it was not '
                f'made by generate_synthetic_voc (a real VOCdevkit?); it is never '
                f'overwritten: delete it yourself or choose another root')
        return
    if existing != stamp and not overwrite:
        raise FileExistsError(
            f'{root} holds a synthetic data set made with other arguments '
            f'({json.dumps(existing, sort_keys=True)}); pass overwrite=True (--overwrite) to '
            f'replace it, or choose another root')


def _move_into_place(tmp: Path, root: Path, stamp: dict) -> None:
    """Rename the finished ``tmp`` to ``root``, replacing an existing ``root`` last."""
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f'.{root.name}.old-', dir=root.parent))
        old.rmdir()
        os.rename(root, old)
        try:
            os.rename(tmp, root)
        except BaseException:
            os.rename(old, root)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process finished the same data set first: keep theirs if it matches.
        if read_stamp(root) == stamp:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise
