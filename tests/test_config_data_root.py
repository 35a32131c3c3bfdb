"""Pointing a config's dataloaders at another data root (benchlib.config_data_root)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, List

import pytest

from benchlib.config_data_root import replace_data_root, set_data_root
from helpers import DET_TOY, SEG_TOY, load_toy_config


@pytest.mark.parametrize('old, new, expected', [
    ('data/VOCdevkit/', '/x/VOCdevkit', '/x/VOCdevkit/'),
    ('data/VOCdevkit', '/x/VOCdevkit/', '/x/VOCdevkit'),
    ('data/VOCdevkit/VOC2012', '/x/VOCdevkit', '/x/VOCdevkit/VOC2012'),
    ('data/VOCdevkit/VOC2012/', '/tmp/y', '/tmp/y/VOC2012/'),
    ('./VOCdevkit/VOCdevkit/VOC2012', 'z', 'z/VOC2012'),
    ('data/cityscapes/', '/x/cityscapes', '/x/cityscapes/'),
    ('data/VOCdevkit2/VOC2012', '/x', '/x'),
])
def test_replace_data_root(old: str, new: str, expected: str) -> None:
    assert replace_data_root(old, new) == expected


def _data_roots(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'data_root':
                yield value
            else:
                yield from _data_roots(value)
    elif isinstance(node, (list, tuple)):
        for item in node:
            yield from _data_roots(item)


def _all_roots(cfg) -> List[str]:
    return [root for key in ('train_dataloader', 'val_dataloader', 'test_dataloader')
            for root in _data_roots(cfg[key])]


def test_toy_configs_point_at_voc_root(voc_root: Path, tmp_path: Path) -> None:
    import mmdet  # noqa: F401  (a hard requirement: fail, never skip)
    import mmseg  # noqa: F401  (a hard requirement: fail, never skip)
    det = load_toy_config(DET_TOY, voc_root, tmp_path / 'det')
    assert set(_all_roots(det)) == {f'{voc_root}/'}
    assert det.work_dir == str(tmp_path / 'det')
    seg = load_toy_config(SEG_TOY, voc_root, tmp_path / 'seg')
    roots = _all_roots(seg)
    assert len(roots) == 4  # train, aug, val, test
    assert set(roots) == {f'{voc_root}/VOC2012'}


def test_nested_upstream_config(voc_root: Path, tmp_path: Path) -> None:
    import mmdet  # noqa: F401  (a hard requirement: fail, never skip)
    from mmengine.config import Config
    cfg_file = tmp_path / 'upstream.py'
    cfg_file.write_text("_base_ = 'mmdet::pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py'\n")
    cfg = Config.fromfile(str(cfg_file))
    changed = set_data_root(cfg, voc_root)
    roots = _all_roots(cfg)
    assert len(roots) == 4  # RepeatDataset(ConcatDataset([07, 12])), val, test
    assert set(roots) == {f'{voc_root}/'}
    assert len(changed) == 5  # + top-level data_root
    assert cfg.data_root == f'{voc_root}/'


def test_errors() -> None:
    import mmengine  # noqa: F401  (a hard requirement: fail, never skip)
    from mmengine.config import Config
    cfg = Config(dict(train_dataloader=dict(dataset=dict(type='X')), val_dataloader=None))
    with pytest.raises(ValueError, match='no data_root'):
        set_data_root(cfg, '/x')
    with pytest.raises(ValueError, match="''"):
        set_data_root(cfg, '')
    with pytest.raises(TypeError, match='3'):
        replace_data_root(3, '/x')  # type: ignore[arg-type]
