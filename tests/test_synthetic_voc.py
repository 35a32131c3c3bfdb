"""The built-in synthetic VOC-layout data set (lrpet_mm.datasets.synthetic_voc)."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from helpers import DET_TOY, SEG_TOY, VOC_IMG_SIZE, VOC_NUM_TRAIN, VOC_NUM_VAL, load_toy_config
from lrpet_mm.datasets import (
    VOC_CLASSES,
    generate_synthetic_voc,
    read_stamp,
    synthetic_voc,
    voc_palette,
)

SMALL = dict(num_train=2, num_val=1, img_size=(64, 48))


def _ids(path: Path) -> List[str]:
    return path.read_text().split()


def _objects(xml_path: Path) -> Tuple[Tuple[int, int], List[Tuple[str, List[int], int]]]:
    """((width, height), [(name, [xmin, ymin, xmax, ymax], difficult), ...]) of a VOC XML."""
    root = ET.parse(xml_path).getroot()
    size = root.find('size')
    wh = (int(size.find('width').text), int(size.find('height').text))
    assert int(size.find('depth').text) == 3
    objs = []
    for obj in root.findall('object'):
        box = obj.find('bndbox')
        objs.append((obj.find('name').text,
                     [int(box.find(k).text) for k in ('xmin', 'ymin', 'xmax', 'ymax')],
                     int(obj.find('difficult').text)))
        assert obj.find('pose') is not None and obj.find('truncated') is not None
    return wh, objs


def _files(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
            if p.is_file()}


# ----------------------------------------------------------------------------- layout
def test_layout(voc_root: Path) -> None:
    n_all = VOC_NUM_TRAIN + VOC_NUM_VAL
    v07, v12 = voc_root / 'VOC2007', voc_root / 'VOC2012'
    assert len(_ids(v07 / 'ImageSets/Main/trainval.txt')) == VOC_NUM_TRAIN
    assert len(_ids(v07 / 'ImageSets/Main/test.txt')) == VOC_NUM_VAL
    assert len(_ids(v12 / 'ImageSets/Main/trainval.txt')) == n_all
    assert _ids(v12 / 'ImageSets/Segmentation/train.txt') == _ids(
        v12 / 'ImageSets/Segmentation/aug.txt')
    assert len(_ids(v12 / 'ImageSets/Segmentation/train.txt')) == VOC_NUM_TRAIN
    assert len(_ids(v12 / 'ImageSets/Segmentation/val.txt')) == VOC_NUM_VAL
    for img_id in _ids(v07 / 'ImageSets/Main/trainval.txt') + _ids(
            v07 / 'ImageSets/Main/test.txt'):
        assert (v07 / 'Annotations' / f'{img_id}.xml').is_file()
        with Image.open(v07 / 'JPEGImages' / f'{img_id}.jpg') as img:
            assert img.format == 'JPEG' and img.mode == 'RGB' and img.size == VOC_IMG_SIZE
    for img_id in _ids(v12 / 'ImageSets/Main/trainval.txt'):
        for sub, ext in (('Annotations', 'xml'), ('JPEGImages', 'jpg'),
                         ('SegmentationClass', 'png'), ('SegmentationClassAug', 'png')):
            assert (v12 / sub / f'{img_id}.{ext}').is_file()
    assert read_stamp(voc_root)['num_train'] == VOC_NUM_TRAIN
    assert not [p for p in voc_root.parent.iterdir() if p.name.startswith('.')]


def test_annotations_and_masks_agree(voc_root: Path) -> None:
    v12 = voc_root / 'VOC2012'
    palette = voc_palette()
    seen = set()
    for img_id in _ids(v12 / 'ImageSets/Main/trainval.txt'):
        (width, height), objs = _objects(v12 / 'Annotations' / f'{img_id}.xml')
        assert (width, height) == VOC_IMG_SIZE and 1 <= len(objs) <= 3
        with Image.open(v12 / 'SegmentationClass' / f'{img_id}.png') as png:
            assert png.mode == 'P' and png.getpalette()[:len(palette)] == palette
            mask = np.asarray(png)
        with Image.open(v12 / 'SegmentationClassAug' / f'{img_id}.png') as png:
            assert png.mode == 'L'
            np.testing.assert_array_equal(np.asarray(png), mask)
        assert mask.shape == (height, width)
        assert set(np.unique(mask).tolist()) <= set(range(21)) | {255}
        assert (mask == 255).any()  # void borders, as in real VOC
        for name, (xmin, ymin, xmax, ymax), difficult in objs:
            assert name in VOC_CLASSES and difficult == 0
            assert 1 <= xmin < xmax <= width and 1 <= ymin < ymax <= height
            seen.add(name)
        for label in set(np.unique(mask).tolist()) - {0, 255}:
            inside = np.zeros_like(mask, dtype=bool)
            for name, (xmin, ymin, xmax, ymax), _ in objs:
                if VOC_CLASSES.index(name) + 1 == label:
                    inside[ymin - 1:ymax, xmin - 1:xmax] = True
            assert inside.any(), f'{img_id}: mask label {label} has no box'
            assert not ((mask == label) & ~inside).any(), f'{img_id}: label {label} outside box'
        # Easy variant: objects do not overlap, so each box shows its own class.
        for name, (xmin, ymin, xmax, ymax), _ in objs:
            crop = mask[ymin - 1:ymax, xmin - 1:xmax]
            assert (crop == VOC_CLASSES.index(name) + 1).mean() > 0.2
    assert seen <= set(synthetic_voc.DEFAULT_CLASSES) and len(seen) >= 2


def test_hard_variant_and_classes(tmp_path: Path) -> None:
    root = generate_synthetic_voc(tmp_path / 'VOCdevkit', num_train=4, num_val=2, hard=True,
                                  classes=['bus', 'horse'], seed=3)
    for png in (root / 'VOC2012/SegmentationClass').glob('*.png'):
        values = set(np.unique(np.asarray(Image.open(png))).tolist())
        assert values <= {0, 255, VOC_CLASSES.index('bus') + 1, VOC_CLASSES.index('horse') + 1}
    for xml in (root / 'VOC2007/Annotations').glob('*.xml'):
        assert {name for name, _, _ in _objects(xml)[1]} <= {'bus', 'horse'}
    easy = generate_synthetic_voc(tmp_path / 'easy', num_train=4, num_val=2, seed=3,
                                  classes=['bus', 'horse'])
    assert _files(easy) != _files(root)


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = _files(generate_synthetic_voc(tmp_path / 'a' / 'VOCdevkit', seed=5, **SMALL))
    b = _files(generate_synthetic_voc(tmp_path / 'b' / 'VOCdevkit', seed=5, **SMALL))
    assert a == b
    c = _files(generate_synthetic_voc(tmp_path / 'c' / 'VOCdevkit', seed=6, **SMALL))
    assert a.keys() == c.keys()
    assert a['VOC2007/JPEGImages/000001.jpg'] != c['VOC2007/JPEGImages/000001.jpg']


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize('kwargs, fragment', [
    (dict(num_train=0), 'num_train'),
    (dict(num_train=2.5), '2.5'),
    (dict(num_val=-1), '-1'),
    (dict(img_size=(31, 64)), '(31, 64)'),
    (dict(img_size=(64, )), '(64,)'),
    (dict(img_size=(64, 10000)), '10000'),
    (dict(seed=-3), '-3'),
    (dict(classes=['person', 'unicorn']), "'unicorn'"),
    (dict(classes=[]), '[]'),
    (dict(classes=['car', 'car']), "'car'"),
    (dict(hard='yes'), "'yes'"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        generate_synthetic_voc(tmp_path / 'VOCdevkit', **kwargs)
    assert fragment in str(err.value)
    assert not (tmp_path / 'VOCdevkit').exists()


# ----------------------------------------------------------------------------- reuse
def test_reuse_conflict_overwrite(tmp_path: Path) -> None:
    root = tmp_path / 'VOCdevkit'
    generate_synthetic_voc(root, seed=1, **SMALL)
    probe = root / 'VOC2007/JPEGImages/000001.jpg'
    probe.write_bytes(b'marker')  # reuse must not rewrite anything
    assert generate_synthetic_voc(root, seed=1, **SMALL) == root.absolute()
    assert probe.read_bytes() == b'marker'

    with pytest.raises(FileExistsError, match=str(root)):
        generate_synthetic_voc(root, seed=2, **SMALL)
    assert probe.read_bytes() == b'marker'

    generate_synthetic_voc(root, seed=2, overwrite=True, **SMALL)
    assert read_stamp(root)['seed'] == 2
    assert probe.read_bytes() != b'marker'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['VOCdevkit']


def test_unstamped_directories(tmp_path: Path) -> None:
    empty = tmp_path / 'empty'
    empty.mkdir()
    generate_synthetic_voc(empty, **SMALL)  # an empty directory is fine
    assert read_stamp(empty) is not None

    real = tmp_path / 'real' / 'VOCdevkit'
    (real / 'VOC2007').mkdir(parents=True)
    for overwrite in (False, True):  # never delete what we did not make
        with pytest.raises(FileExistsError, match=str(real)):
            generate_synthetic_voc(real, overwrite=overwrite, **SMALL)
    assert (real / 'VOC2007').is_dir()

    a_file = tmp_path / 'file'
    a_file.write_text('x')
    with pytest.raises(FileExistsError, match=str(a_file)):
        generate_synthetic_voc(a_file, **SMALL)


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = synthetic_voc._save_jpeg
    calls = []

    def failing_save(path: Path, image: np.ndarray) -> None:
        calls.append(path)
        if len(calls) > 3:
            raise RuntimeError('disk full (simulated)')
        real_save(path, image)

    root = tmp_path / 'VOCdevkit'
    monkeypatch.setattr(synthetic_voc, '_save_jpeg', failing_save)
    with pytest.raises(RuntimeError, match='simulated'):
        generate_synthetic_voc(root, **SMALL)
    assert list(tmp_path.iterdir()) == []

    # A failed overwrite keeps the previous data set intact.
    monkeypatch.setattr(synthetic_voc, '_save_jpeg', real_save)
    generate_synthetic_voc(root, seed=1, **SMALL)
    before = _files(root)
    calls.clear()
    monkeypatch.setattr(synthetic_voc, '_save_jpeg', failing_save)
    with pytest.raises(RuntimeError, match='simulated'):
        generate_synthetic_voc(root, seed=2, overwrite=True, **SMALL)
    assert _files(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['VOCdevkit']


# ----------------------------------------------------------------------------- OpenMMLab
def test_mmdet_voc_dataset_loads(voc_root: Path, tmp_path: Path) -> None:
    import mmdet  # noqa: F401  (a hard requirement: fail, never skip)
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope
    register_all_modules(init_default_scope=False)

    cfg = load_toy_config(DET_TOY, voc_root, tmp_path)
    with DefaultScope.overwrite_default_scope('mmdet'):
        _check_mmdet_toy_datasets(cfg, voc_root, DATASETS)


def _check_mmdet_toy_datasets(cfg, voc_root: Path, DATASETS) -> None:
    for loader, ann, n in (('train_dataloader', 'trainval.txt', VOC_NUM_TRAIN),
                           ('val_dataloader', 'test.txt', VOC_NUM_VAL)):
        dataset = DATASETS.build(cfg[loader].dataset)
        assert len(dataset) == n
        assert dataset.metainfo['classes'] == VOC_CLASSES
        ids = _ids(voc_root / 'VOC2007/ImageSets/Main' / ann)
        for index in range(len(dataset)):
            info = dataset.get_data_info(index)
            _, objs = _objects(voc_root / 'VOC2007/Annotations' / f'{info["img_id"]}.xml')
            assert info['img_id'] in ids
            assert len(info['instances']) == len(objs)
            for inst, (name, (xmin, ymin, xmax, ymax), _) in zip(info['instances'], objs):
                assert inst['bbox_label'] == VOC_CLASSES.index(name)
                assert inst['bbox'] == [xmin - 1, ymin - 1, xmax - 1, ymax - 1]  # minus_one
                assert inst['ignore_flag'] == 0
        sample = dataset[0]
        assert sample['inputs'].shape[0] == 3
        assert len(sample['data_samples'].gt_instances) == len(dataset.get_data_info(0)
                                                               ['instances'])


def test_mmdet_upstream_voc0712_train_set_loads(voc_root: Path, tmp_path: Path) -> None:
    import mmdet  # noqa: F401  (a hard requirement: fail, never skip)
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from benchlib.config_data_root import set_data_root
    register_all_modules(init_default_scope=False)

    cfg_file = tmp_path / 'upstream.py'
    cfg_file.write_text("_base_ = 'mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py'\n")
    cfg = Config.fromfile(str(cfg_file))
    set_data_root(cfg, voc_root)
    train = cfg.train_dataloader.dataset
    assert train.type == 'RepeatDataset' and train.dataset.type == 'ConcatDataset'
    with DefaultScope.overwrite_default_scope('mmdet'):
        dataset = DATASETS.build(train)
        test_set = DATASETS.build(cfg.test_dataloader.dataset)
    # RepeatDataset(times=3, ConcatDataset(VOC2007 trainval, VOC2012 trainval))
    assert len(dataset) == train.times * (2 * VOC_NUM_TRAIN + VOC_NUM_VAL)
    # Default objects are >= 32 px, so upstream's bbox_min_size=32 ignores none of them.
    for index in range(len(dataset)):
        assert all(inst['ignore_flag'] == 0 for inst in dataset.get_data_info(index)['instances'])
    assert len(test_set) == VOC_NUM_VAL


def test_mmseg_voc_dataset_loads(voc_root: Path, tmp_path: Path) -> None:
    import mmseg  # noqa: F401  (a hard requirement: fail, never skip)
    from mmengine.registry import DefaultScope
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)

    cfg = load_toy_config(SEG_TOY, voc_root, tmp_path)
    with DefaultScope.overwrite_default_scope('mmseg'):
        train = DATASETS.build(cfg.train_dataloader.dataset)  # ConcatDataset(train, aug)
        val = DATASETS.build(cfg.val_dataloader.dataset)
    assert len(train) == 2 * VOC_NUM_TRAIN
    assert len(val) == VOC_NUM_VAL
    assert len(val.metainfo['classes']) == 21
    seg_dir = voc_root / 'VOC2012' / 'SegmentationClass'
    for index in range(len(val)):
        info = val.get_data_info(index)
        assert Path(info['seg_map_path']).parent == seg_dir
        assert Path(info['img_path']).is_file()
    sample = val[0]
    gt = sample['data_samples'].gt_sem_seg.data.numpy()
    expected = np.asarray(Image.open(val.get_data_info(0)['seg_map_path']))
    np.testing.assert_array_equal(gt[0], expected)  # test pipeline keeps the 160x128 size
    sample = train[0]
    assert sample['inputs'].shape[1:] == (128, 128) or max(sample['inputs'].shape[1:]) <= 128
    assert set(np.unique(sample['data_samples'].gt_sem_seg.data.numpy()).tolist()) <= set(
        range(21)) | {255}


def test_stamp_is_json(voc_root: Path) -> None:
    stamp = json.loads((voc_root / synthetic_voc.STAMP_NAME).read_text())
    assert stamp['img_size'] == list(VOC_IMG_SIZE) and stamp['seed'] == 0
