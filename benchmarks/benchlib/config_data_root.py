"""Point the dataloaders of an mmengine config at another data root (the tests and the
benchmarks; the tools take ``--cfg-options ...data_root=...``)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, List, MutableMapping, Union

if TYPE_CHECKING:  # pragma: no cover
    from mmengine import Config

__all__ = ['set_data_root', 'replace_data_root']

_DATALOADER_KEYS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
_ANCHOR = 'VOCdevkit'


def replace_data_root(old: str, new_root: Union[str, os.PathLike]) -> str:
    """The new value for one ``data_root`` entry.

    If ``old`` has a ``VOCdevkit`` path component, everything up to and including it is replaced
    by ``new_root`` (taken as the VOCdevkit directory) and what followed is kept, so
    ``'data/VOCdevkit/VOC2012'`` -> ``'<new_root>/VOC2012'``. Otherwise the whole value becomes
    ``new_root``. A trailing ``/`` on ``old`` is kept (mmdet joins ``'VOC2007/'`` to it).
    """
    if not isinstance(old, str):
        raise TypeError(f'data_root must be a str, got {old!r}')
    new = os.fspath(new_root).rstrip('/') or '/'
    parts = old.replace('\\', '/').rstrip('/').split('/')
    if _ANCHOR in parts:
        tail = parts[len(parts) - 1 - parts[::-1].index(_ANCHOR) + 1:]
        new = '/'.join([new.rstrip('/')] + tail) if tail else new
    if old.endswith('/') and not new.endswith('/'):
        new += '/'
    return new


def _rewrite(node: Any, new_root: Union[str, os.PathLike], changed: List[str], where: str) -> None:
    """Replace every ``data_root`` value found below ``node`` (dicts and lists), in place."""
    if isinstance(node, MutableMapping):
        for key in list(node.keys()):
            value = node[key]
            if key == 'data_root' and isinstance(value, str):
                node[key] = replace_data_root(value, new_root)
                changed.append(f'{where}.{key}: {value!r} -> {node[key]!r}')
            else:
                _rewrite(value, new_root, changed, f'{where}.{key}')
    elif isinstance(node, (list, tuple)):
        for index, item in enumerate(node):
            _rewrite(item, new_root, changed, f'{where}[{index}]')


def set_data_root(cfg: 'Config', data_root: Union[str, os.PathLike]) -> List[str]:
    """Rewrite, in place, every ``data_root`` of the train/val/test dataloaders of ``cfg``.

    Nested datasets (``RepeatDataset.dataset``, ``ConcatDataset.datasets``, ...) are followed.
    ``data_root`` is the new ``VOCdevkit`` directory; for values like
    ``'data/VOCdevkit/VOC2012'`` (mmseg) the part after ``VOCdevkit`` is kept, see
    :func:`replace_data_root`. A top-level ``cfg.data_root`` is rewritten too.

    Returns:
        One line ``'<key path>: <old> -> <new>'`` per value changed.

    Raises:
        ValueError: if no dataloader of ``cfg`` has a ``data_root``.
    """
    if isinstance(data_root, bytes) or not isinstance(data_root, (str, os.PathLike)) \
            or os.fspath(data_root) == '':
        raise ValueError(f'data_root must be a non-empty path, got {data_root!r}')
    changed: List[str] = []
    for key in _DATALOADER_KEYS:
        if key in cfg and cfg[key] is not None:
            _rewrite(cfg[key], data_root, changed, key)
    if not changed:
        raise ValueError(f'no data_root found in {", ".join(_DATALOADER_KEYS)} of the config '
                         f'{getattr(cfg, "filename", None)!r}; nothing was set to {data_root!r}')
    if isinstance(cfg.get('data_root', None), str):
        old = cfg['data_root']
        cfg['data_root'] = replace_data_root(old, data_root)
        changed.append(f'data_root: {old!r} -> {cfg["data_root"]!r}')
    return changed
