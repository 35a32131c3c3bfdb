"""The benchmarks' synthetic classification set and pretrained ResNet deep-stem backbone
(``benchlib.synthetic_classification``, ``benchlib.pretrained_backbone``)."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from benchlib import pretrained_backbone as pb_module
from benchlib.pretrained_backbone import (
    DEAD_GAMMA,
    FORMAT_VERSION,
    PretrainedBackbone,
    PretrainSettings,
    checkpoint_name,
    pretrained_backbone,
)
from benchlib.synthetic_classification import make_shape_classification


def _quiet(_msg: str) -> None:
    pass


# ----------------------------------------------------------------------------- data
def test_classification_data_is_deterministic_per_seed_and_differs_between_seeds():
    images, labels = make_shape_classification(20, img_size=32, seed=3)
    again_images, again_labels = make_shape_classification(20, img_size=32, seed=3)
    other_images, other_labels = make_shape_classification(20, img_size=32, seed=4)
    assert np.array_equal(images, again_images) and np.array_equal(labels, again_labels)
    assert not np.array_equal(images, other_images)
    assert not np.array_equal(labels, other_labels)


def test_classification_arrays_have_the_documented_shapes_and_cover_every_class():
    images, labels = make_shape_classification(30, img_size=40, seed=0)
    assert images.shape == (30, 40, 40, 3) and images.dtype == np.uint8
    assert labels.shape == (30, ) and labels.dtype == np.int64
    assert np.bincount(labels, minlength=10).tolist() == [3] * 10  # balanced, all 10 classes
    assert images.std() > 10  # real pictures, not a constant


@pytest.mark.parametrize('kwargs, name', [
    (dict(num_images=0), 'num_images'),
    (dict(num_images=2.5), 'num_images'),
    (dict(num_images=4, img_size=16), 'img_size'),
    (dict(num_images=4, img_size=True), 'img_size'),
    (dict(num_images=4, seed=-1), 'seed'),
])
def test_classification_rejects_bad_arguments_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_shape_classification(**kwargs)


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize('field, value', [
    ('depth', 20), ('depth', 18.0), ('num_train', 1), ('num_test', 0), ('img_size', 31),
    ('epochs', 0),
    ('batch_size', 1), ('lr', 0.0), ('lr', float('nan')), ('momentum', 1.0),
    ('weight_decay', -1e-4), ('seed', -1), ('epochs', 2.0),
])
def test_bad_settings_raise_value_error_naming_the_field(tmp_path, field, value):
    settings = dataclasses.replace(PretrainSettings.quick(), **{field: value})
    with pytest.raises(ValueError, match=rf'PretrainSettings\.{field}\b'):
        settings.validate()
    with pytest.raises(ValueError, match=field):
        pretrained_backbone(settings, cache_dir=tmp_path, log=_quiet)
    assert not (tmp_path / 'pretrained').exists() or not any((tmp_path / 'pretrained').iterdir())


def test_default_and_quick_settings_are_valid_and_hash_differently():
    assert PretrainSettings().validate().depth == 18
    assert PretrainSettings.quick().validate().img_size >= 32
    assert PretrainSettings().digest() != PretrainSettings.quick().digest()
    assert checkpoint_name(PretrainSettings()) == (
        f'resnet18_deepstem_synthetic_{PretrainSettings().digest()[:12]}.pth')


# ----------------------------------------------------------------------------- checkpoint
@pytest.fixture(scope='module')
def built(tmp_path_factory: pytest.TempPathFactory) -> PretrainedBackbone:
    """The quick-settings checkpoint, built once for this module."""
    return pretrained_backbone(PretrainSettings.quick(),
                               cache_dir=tmp_path_factory.mktemp('cache'), log=_quiet)


def _saved_state(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def _assert_loaded_exactly(backbone: torch.nn.Module, saved: Dict[str, torch.Tensor]) -> None:
    state = backbone.state_dict()
    assert sorted(state) == sorted(saved), (
        f'missing {sorted(set(state) - set(saved))}, unexpected {sorted(set(saved) - set(state))}')
    different = [k for k in state if not torch.equal(state[k], saved[k])]
    assert different == []


def test_build_writes_backbone_only_state_dict_and_meta(built):
    assert not built.cached and built.path.is_file()
    assert built.path.parent.name == 'pretrained'
    assert built.path.name == checkpoint_name(PretrainSettings.quick())
    ckpt = torch.load(built.path, map_location='cpu', weights_only=True)
    assert 'stem.0.weight' in ckpt['state_dict'] and 'layer1.0.conv1.weight' in ckpt['state_dict']
    assert not any(k.startswith(('backbone.', 'head.')) for k in ckpt['state_dict'])
    meta = ckpt['meta']
    assert meta['hash'] == PretrainSettings.quick().digest()
    assert meta['format_version'] == FORMAT_VERSION
    assert meta['settings'] == dataclasses.asdict(PretrainSettings.quick())
    # accuracy over num_test held-out images: a whole number of them
    correct = built.test_accuracy * PretrainSettings.quick().num_test
    assert correct == pytest.approx(round(correct)) and meta['test_accuracy'] == built.test_accuracy
    stats = built.bn_stats
    assert stats['num_channels'] == sum(v.numel() for k, v in ckpt['state_dict'].items()
                                        if k.endswith('running_mean'))
    gammas = torch.cat([v.abs() for k, v in ckpt['state_dict'].items()
                        if k.endswith('.weight') and k.replace('.weight', '.running_var')
                        in ckpt['state_dict']])
    assert stats['dead_fraction'] == pytest.approx(float((gammas < DEAD_GAMMA).float().mean()))
    assert stats['min'] <= stats['median'] <= stats['max']
    assert 'stem.1' in stats['layers'] and 'layer4.1.bn2' in stats['layers']


def test_checkpoint_loads_into_mmdet_deep_stem_resnet_through_init_cfg(built):
    from mmdet.models.backbones import ResNet

    backbone = ResNet(depth=18, deep_stem=True,
                      init_cfg=dict(type='Pretrained', checkpoint=str(built.path)))
    backbone.init_weights()
    _assert_loaded_exactly(backbone, _saved_state(built.path))


def test_checkpoint_loads_into_mmseg_dilated_resnetv1c_through_init_cfg(built):
    from mmseg.models.backbones import ResNetV1c

    backbone = ResNetV1c(depth=18, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                         contract_dilation=True, init_cfg=built.init_cfg())
    backbone.init_weights()
    _assert_loaded_exactly(backbone, _saved_state(built.path))


def test_second_call_returns_the_cached_file_without_training(built, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError('retrained although the cache holds the checkpoint')

    monkeypatch.setattr(pb_module, '_train', no_training)
    mtime = built.path.stat().st_mtime_ns
    start = time.perf_counter()
    again = pretrained_backbone(PretrainSettings.quick(), cache_dir=built.path.parents[1],
                                log=_quiet)
    assert time.perf_counter() - start < 5
    assert again.cached and again.path == built.path
    assert again.test_accuracy == built.test_accuracy and again.bn_stats == built.bn_stats
    assert built.path.stat().st_mtime_ns == mtime


def test_cache_dir_defaults_to_the_environment_variable(built, tmp_path, monkeypatch):
    (tmp_path / 'pretrained').mkdir()
    shutil.copy(built.path, tmp_path / 'pretrained' / built.path.name)
    monkeypatch.setenv('LRPET_MM_CACHE', str(tmp_path))
    monkeypatch.setattr(pb_module, '_train', None)  # any training attempt would fail
    found = pretrained_backbone(PretrainSettings.quick(), log=_quiet)
    assert found.cached and found.path == tmp_path / 'pretrained' / built.path.name


def test_corrupted_cache_file_is_rebuilt_with_a_warning(built, tmp_path):
    path = tmp_path / 'pretrained' / built.path.name
    path.parent.mkdir()
    path.write_bytes(b'\x00garbage, not a checkpoint' * 10)
    with pytest.warns(RuntimeWarning, match=path.name):
        rebuilt = pretrained_backbone(PretrainSettings.quick(), cache_dir=tmp_path, log=_quiet)
    assert not rebuilt.cached and rebuilt.path == path
    assert torch.load(path, map_location='cpu', weights_only=True)['meta']['hash'] == (
        PretrainSettings.quick().digest())
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_cache_file_with_another_hash_is_not_trusted(built, tmp_path, monkeypatch):
    class Retrained(Exception):
        pass

    def train(*args, **kwargs):
        raise Retrained

    ckpt = torch.load(built.path, map_location='cpu', weights_only=True)
    ckpt['meta']['hash'] = 'f' * 64
    path = tmp_path / 'pretrained' / built.path.name
    path.parent.mkdir()
    torch.save(ckpt, path)
    monkeypatch.setattr(pb_module, '_train', train)
    with pytest.warns(RuntimeWarning, match=path.name), pytest.raises(Retrained):
        pretrained_backbone(PretrainSettings.quick(), cache_dir=tmp_path, log=_quiet)
