"""A "pretrained" ResNet deep-stem backbone for the benchmarks, trained on a synthetic task and
cached.

There are no downloads: :func:`pretrained_backbone` trains an mmdet ``ResNet(deep_stem=True)``
(the layout of mmseg's ``ResNetV1c``) plus a linear head on
:func:`benchlib.synthetic_classification.make_shape_classification` and saves only the
backbone's weights, keyed as the backbone's own ``state_dict`` (``stem.0.weight``,
``layer1.0.conv1.weight``, ...). The file loads with OpenMMLab's usual
``init_cfg=dict(type='Pretrained', checkpoint=path)`` into both
``mmdet.models.backbones.ResNet(depth=18, deep_stem=True)`` and
``mmseg.models.backbones.ResNetV1c(depth=18)`` (dilated variants included: dilation does not
change the weights).

Images are normalised as OpenMMLab's data preprocessors do (RGB, ImageNet mean / std), so the
backbone sees the same input statistics when fine-tuned.

The checkpoint is cached under ``<cache dir>/pretrained/`` with a name holding a hash of the
settings and ``FORMAT_VERSION``; a later call with the same settings loads it instead of
training.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from benchlib.synthetic_classification import CLASSIFICATION_CLASSES, make_shape_classification
from lrpet_mm.utils.atomic import atomic_path, check_writable_dir

__all__ = ['FORMAT_VERSION', 'PretrainSettings', 'PretrainedBackbone', 'pretrained_backbone',
           'default_cache_dir']

FORMAT_VERSION = 1
"""Version of the checkpoint layout and of the training recipe; part of the cache hash, so
bumping it invalidates every cached file."""

CACHE_ENV = 'LRPET_MM_CACHE'
"""Environment variable naming the cache root (``~/.cache/lrpet_mm`` when unset)."""

IMG_MEAN: Tuple[float, float, float] = (123.675, 116.28, 103.53)
IMG_STD: Tuple[float, float, float] = (58.395, 57.12, 57.375)
"""RGB mean / std of OpenMMLab's data preprocessors (ImageNet statistics, 0-255 scale)."""

DEAD_GAMMA = 0.01
"""A BN channel with ``|gamma|`` below this counts as dead in ``bn_stats``."""

_DEPTHS = (18, 34, 50, 101, 152)
_DATA_SEED_OFFSET = 1_000_003  # the test images come from another seed than the train images

PathLike = Union[str, os.PathLike]
Log = Callable[[str], Any]


@dataclass(frozen=True)
class PretrainSettings:
    """Settings of the synthetic pretraining; all of them are part of the cache hash.

    Args:
        depth (int): ResNet depth (18, 34, 50, 101 or 152). Defaults to 18.
        num_train (int): Number of training images. Defaults to 4000.
        num_test (int): Number of held-out images for the accuracy. Defaults to 1000.
        img_size (int): Side of the square images in pixels (>= 32). Defaults to 64.
        epochs (int): Training epochs. Defaults to 4.
        batch_size (int): Batch size (>= 2, BN needs it). Defaults to 32.
        lr (float): Peak learning rate of AdamW (short linear warm-up, then cosine decay to
            0). Defaults to 2e-3.
        momentum (float): AdamW ``beta1`` in [0, 1). Defaults to 0.9.
        weight_decay (float): AdamW (decoupled) weight decay (>= 0). Defaults to 1e-4.
        seed (int): Seed of the data and of torch (>= 0). Defaults to 0.
    """
    depth: int = 18
    num_train: int = 4000
    num_test: int = 1000
    img_size: int = 64
    epochs: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0

    @classmethod
    def quick(cls) -> 'PretrainSettings':
        """Tiny settings that train in a few seconds on a CPU (for tests)."""
        return cls(num_train=64, num_test=32, img_size=32, epochs=1, batch_size=16)

    def validate(self) -> 'PretrainSettings':
        """Check every field.

        Returns:
            PretrainSettings: ``self``, for chaining.

        Raises:
            ValueError: If a field is invalid (the message names it).
        """
        def integer(name: str, lo: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f'PretrainSettings.{name} must be an integer >= {lo}, '
                                 f'got {value!r}')

        def number(name: str, lo: float, hi: float, hi_open: bool) -> None:
            value = getattr(self, name)
            ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.number))
                  and math.isfinite(value) and lo <= value and (value < hi if hi_open
                                                                else value <= hi))
            if not ok:
                bound = f'in [{lo}, {hi})' if hi_open else f'in [{lo}, {hi}]'
                raise ValueError(f'PretrainSettings.{name} must be a number {bound}, '
                                 f'got {value!r}')

        if (isinstance(self.depth, bool) or not isinstance(self.depth, (int, np.integer))
                or self.depth not in _DEPTHS):
            raise ValueError(f'PretrainSettings.depth must be one of {_DEPTHS}, '
                             f'got {self.depth!r}')
        integer('num_train', 2)
        integer('num_test', 1)
        integer('img_size', 32)
        integer('epochs', 1)
        integer('batch_size', 2)
        integer('seed', 0)
        number('lr', 0.0, 10.0, False)
        if self.lr == 0:
            raise ValueError(f'PretrainSettings.lr must be > 0, got {self.lr!r}')
        number('momentum', 0.0, 1.0, True)
        number('weight_decay', 0.0, 1.0, False)
        return self

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-friendly dict (ints and floats)."""
        return {f.name: (int(v) if isinstance(v, (int, np.integer)) else float(v))
                for f in fields(self) for v in [getattr(self, f.name)]}

    def digest(self) -> str:
        """sha256 (hex) of the settings and ``FORMAT_VERSION``: the cache key."""
        text = json.dumps(dict(settings=self.to_dict(), format_version=FORMAT_VERSION),
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class PretrainedBackbone:
    """A built (or cached) pretrained backbone checkpoint.

    Args:
        path (Path): The checkpoint: ``{'state_dict': backbone weights, 'meta': {...}}``.
        settings (PretrainSettings): The settings it was trained with.
        test_accuracy (float): Held-out accuracy in [0, 1] of backbone + linear head.
        bn_stats (dict): BN ``|gamma|`` statistics (see :func:`bn_gamma_stats`).
        train_seconds (float): Wall time of the training (data making included) when it was
            built.
        cached (bool): True if loaded from the cache, False if trained by this call.
    """
    path: Path
    settings: PretrainSettings
    test_accuracy: float
    bn_stats: dict
    train_seconds: float
    cached: bool

    def init_cfg(self) -> dict:
        """The OpenMMLab ``init_cfg`` that loads this checkpoint into a backbone."""
        return dict(type='Pretrained', checkpoint=str(self.path))


def default_cache_dir() -> Path:
    """The cache root: ``$LRPET_MM_CACHE`` if set, else ``~/.cache/lrpet_mm``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / '.cache' / 'lrpet_mm'


def checkpoint_name(settings: PretrainSettings) -> str:
    """File name of the cached checkpoint of ``settings``."""
    return f'resnet{settings.depth}_deepstem_synthetic_{settings.digest()[:12]}.pth'


def bn_gamma_stats(backbone: nn.Module) -> Dict[str, Any]:
    """Statistics of the BN scales (``|gamma|``) of ``backbone``.

    Args:
        backbone (nn.Module): Any module; its ``_BatchNorm`` layers with a weight are counted.

    Returns:
        dict: ``layers`` (BN layer name -> mean ``|gamma|``), ``num_channels``,
        ``dead_fraction`` (share of channels with ``|gamma| < DEAD_GAMMA``), ``min``,
        ``median`` and ``max`` of ``|gamma|`` over all channels.
    """
    layers: Dict[str, float] = {}
    gammas = []
    for name, module in backbone.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            gamma = module.weight.detach().abs().float().cpu()
            layers[name] = float(gamma.mean())
            gammas.append(gamma)
    if not gammas:
        return dict(layers={}, num_channels=0, dead_fraction=0.0, min=0.0, median=0.0, max=0.0)
    every = torch.cat(gammas)
    return dict(layers=layers, num_channels=int(every.numel()),
                dead_fraction=float((every < DEAD_GAMMA).float().mean()),
                min=float(every.min()), median=float(every.median()), max=float(every.max()))


class _Classifier(nn.Module):
    """mmdet ``ResNet`` deep-stem backbone + global average pool + linear head."""

    def __init__(self, depth: int, num_classes: int) -> None:
        super().__init__()
        from mmdet.models.backbones import ResNet

        self.backbone = ResNet(depth=depth, deep_stem=True, avg_down=False,
                               norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False,
                               frozen_stages=-1, out_indices=(3, ), zero_init_residual=False)
        # mmdet's default init (Kaiming fan-out convs, BN gamma 1 / beta 0), done here quietly;
        # no zero-init of the last BN of each block, so no gamma starts (and stays) near 0
        for module in self.backbone.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.head = nn.Linear(self.backbone.feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.backbone(x)[-1]
        return self.head(feat.mean(dim=(2, 3)))


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB -> normalised float (N, 3, H, W), as OpenMMLab preprocessors."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    mean = torch.tensor(IMG_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMG_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray,
              batch_size: int) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(_to_input(images[start:start + batch_size]))
            target = torch.from_numpy(labels[start:start + batch_size])
            correct += int((logits.argmax(dim=1) == target).sum())
    return correct / len(images)


def _train(settings: PretrainSettings,
           log: Log) -> Tuple[Dict[str, torch.Tensor], float, nn.Module]:
    """Train backbone + head; (backbone state_dict on CPU, held-out accuracy, backbone)."""
    s = settings
    train_x, train_y = make_shape_classification(s.num_train, s.img_size, s.seed)
    test_x, test_y = make_shape_classification(s.num_test, s.img_size,
                                               s.seed + _DATA_SEED_OFFSET)
    with torch.random.fork_rng(devices=[]):  # leave the caller's torch RNG alone
        torch.manual_seed(s.seed)
        model = _Classifier(s.depth, len(CLASSIFICATION_CLASSES))
        # AdamW, not SGD: on this short from-scratch schedule SGD (lr 0.1 / 0.02 / 0.01,
        # momentum 0.9) stayed near chance (18 % held-out after 4 epochs), AdamW learns
        optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(s.momentum, 0.999),
                                      weight_decay=s.weight_decay)
        steps_per_epoch = s.num_train // s.batch_size or 1  # the last partial batch is dropped
        total = steps_per_epoch * s.epochs
        warmup = min(total // 10, 100)

        def lr_at(step: int) -> float:
            if step < warmup:
                return s.lr * (step + 1) / warmup
            return 0.5 * s.lr * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

        generator = torch.Generator().manual_seed(s.seed)
        loss_fn = nn.CrossEntropyLoss()
        step = 0
        for epoch in range(s.epochs):
            model.train()
            order = torch.randperm(s.num_train, generator=generator).numpy()
            batch_size = min(s.batch_size, s.num_train)
            running = 0.0
            for index in range(steps_per_epoch):
                batch = order[index * batch_size:(index + 1) * batch_size]
                for group in optimizer.param_groups:
                    group['lr'] = lr_at(step)
                loss = loss_fn(model(_to_input(train_x[batch])), torch.from_numpy(train_y[batch]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                running += float(loss)
                step += 1
            log(f'pretrain epoch {epoch + 1}/{s.epochs}: '
                f'mean loss {running / steps_per_epoch:.4f}')
        accuracy = _accuracy(model, test_x, test_y, max(s.batch_size, 64))
    state = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
    return state, accuracy, model.backbone


def _load_cached(path: Path, digest: str) -> Optional[dict]:
    """The meta of a valid cached checkpoint, or None (with a warning) if it is not one."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        meta = ckpt['meta']
        if not isinstance(ckpt['state_dict'], dict) or not ckpt['state_dict']:
            raise ValueError('empty or malformed state_dict')
        if meta.get('hash') != digest or meta.get('format_version') != FORMAT_VERSION:
            raise ValueError(f'meta hash {meta.get("hash")!r} / format '
                             f'{meta.get("format_version")!r} differ from the expected '
                             f'{digest!r} / {FORMAT_VERSION}')
        return meta
    except Exception as e:  # any unreadable / foreign file: rebuild it
        warnings.warn(f'cached pretrained backbone {str(path)!r} is unusable '
                      f'({type(e).__name__}: {e}); rebuilding it', RuntimeWarning,
                      stacklevel=3)
        return None


def pretrained_backbone(settings: PretrainSettings = PretrainSettings(),
                        cache_dir: Optional[PathLike] = None,
                        log: Log = print) -> PretrainedBackbone:
    """The cached checkpoint of a ResNet deep-stem backbone pretrained on a synthetic task.

    On a cache hit (file of these settings present, loadable and with the matching hash) the
    stored meta is returned without training. Otherwise, it trains mmdet ``ResNet(depth,
    deep_stem=True, avg_down=False)`` + global average pool + ``nn.Linear(feat_dim, 10)`` on
    :func:`make_shape_classification` (AdamW, warm-up + cosine), measures the held-out accuracy
    and writes the backbone's ``state_dict`` (no prefix) and a ``meta`` dict atomically. A
    cache file that cannot be loaded or whose hash differs is rebuilt with a
    ``RuntimeWarning`` naming it.

    Args:
        settings (PretrainSettings): What to train. Defaults to ``PretrainSettings()``
            (ResNet-18, 4000 64x64 images, 4 epochs: a few minutes on a 2-core CPU).
        cache_dir (str | os.PathLike, optional): Cache root; the file goes in its
            ``pretrained/`` subfolder. Defaults to None: ``$LRPET_MM_CACHE``, else
            ``~/.cache/lrpet_mm``.
        log (Callable[[str], Any]): Receives progress messages. Defaults to ``print``.

    Returns:
        PretrainedBackbone: Path, settings, accuracy, BN statistics, training time and whether
        it came from the cache.

    Raises:
        ValueError: If ``settings`` is invalid (the message names the field).
        PermissionError: If the cache directory cannot be written.
    """
    if not isinstance(settings, PretrainSettings):
        raise ValueError(f'settings must be a PretrainSettings, got {type(settings).__name__}')
    settings.validate()
    root = Path(os.fspath(cache_dir)) if cache_dir is not None else default_cache_dir()
    out_dir = check_writable_dir(root / 'pretrained', 'pretrained-backbone cache directory')
    path = out_dir / checkpoint_name(settings)
    digest = settings.digest()
    if path.exists():
        meta = _load_cached(path, digest)
        if meta is not None:
            log(f'pretrained backbone: cache hit {path}')
            return PretrainedBackbone(path=path, settings=settings,
                                      test_accuracy=float(meta['test_accuracy']),
                                      bn_stats=meta['bn_stats'],
                                      train_seconds=float(meta['train_seconds']), cached=True)
    log(f'pretrained backbone: training ResNet-{settings.depth} deep-stem on the synthetic '
        f'classification task ({settings.to_dict()}) -> {path}')
    start = time.perf_counter()
    state, accuracy, backbone = _train(settings, log)
    seconds = time.perf_counter() - start
    stats = bn_gamma_stats(backbone)
    meta = dict(format_version=FORMAT_VERSION, hash=digest, settings=settings.to_dict(),
                test_accuracy=float(accuracy), bn_stats=stats, train_seconds=float(seconds),
                classes=list(CLASSIFICATION_CLASSES), img_mean=list(IMG_MEAN),
                img_std=list(IMG_STD),
                arch=dict(type='ResNet', depth=settings.depth, deep_stem=True,
                          avg_down=False))
    with atomic_path(path) as tmp:
        torch.save(dict(state_dict=state, meta=meta), tmp)
    log(f'pretrained backbone: held-out accuracy {accuracy:.3f} after {seconds:.1f} s; '
        f'BN |gamma| median {stats["median"]:.3f}, dead {stats["dead_fraction"]:.1%}; '
        f'saved {path}')
    return PretrainedBackbone(path=path, settings=settings, test_accuracy=float(accuracy),
                              bn_stats=stats, train_seconds=float(seconds), cached=False)
