"""Whole-model channel pruning: the backbone's residual-block channels
(:mod:`benchlib.channel_pruning`) and the inner channels of the neck-free head layers, with
one uniform ratio chosen so that the whole model's test-time FLOPs (``whole_model_flops``, as
the report counts them) meet a target.

The comparison row for whole-model LRPET (issue #27): at the same whole-model FLOPs, pruning
is allowed to remove channels wherever they are internal to a layer chain of the heads:

* Faster R-CNN ``RPNHead``: the output channels of ``rpn_conv`` (and the input channels of
  ``rpn_cls`` / ``rpn_reg``);
* ``Shared2FCBBoxHead`` (``ConvFCBBoxHead`` with shared FCs only): the outputs of each shared
  FC (and the inputs of the next FC, or of ``fc_cls`` / ``fc_reg`` after the last);
* mmseg ``PSPHead``: the outputs of each pyramid-pooling ``ConvModule`` (conv + BN; their
  slice of the ``bottleneck``'s input) and of the ``bottleneck`` (conv + BN; the input of
  ``conv_seg``).

The FPN keeps its width: its output channels are summed across levels top-down and read by
both heads and the RoI extractor, so they are one channel group spanning the whole detector,
which Torch-Pruning cannot trace through mmdet's detector forward (and pruning it would change
every head's input). The predictors keep their outputs (classes, box deltas). Importance and
rounding follow :mod:`benchlib.channel_pruning`: L2 norm of a channel's filter in the
unpruned weights, ``round(ratio · C)`` removed, at least one kept.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from benchlib.channel_pruning import (
    MAX_RATIO,
    PruneResult,
    _bisect,
    _num_pruned,
    channel_importance,
    prune_with_ratio,
)
from lrpet_mm.engine.flops import count_params, whole_model_flops


@dataclass
class HeadGroup:
    """One prunable channel group of a head: ``producer``'s output channels (and its
    ``norm``'s), read by each consumer at input channels ``offset .. offset + C``."""
    producer: str
    norm: Optional[str]
    consumers: List[Tuple[str, int]]


def _conv_of(module: nn.Module) -> nn.Module:
    """The conv of an mmcv ``ConvModule`` (or the layer itself)."""
    return getattr(module, 'conv', module)


def _norm_name(parent: str, module: nn.Module) -> Optional[str]:
    name = getattr(module, 'norm_name', None)
    return None if name is None or getattr(module, name, None) is None else f'{parent}.{name}'


def head_groups(model: nn.Module) -> List[HeadGroup]:
    """The prunable channel groups of ``model``'s heads (see the module docstring); raises
    ``ValueError`` naming a head whose layout is not one of those supported."""
    groups: List[HeadGroup] = []
    rpn = getattr(model, 'rpn_head', None)
    if rpn is not None:
        if not isinstance(getattr(rpn, 'rpn_conv', None), nn.Conv2d):
            raise ValueError(f'rpn_head ({type(rpn).__name__}): only a single plain rpn_conv '
                             '(num_convs=1) is supported')
        groups.append(HeadGroup('rpn_head.rpn_conv', None,
                                [('rpn_head.rpn_cls', 0), ('rpn_head.rpn_reg', 0)]))
    bbox = getattr(getattr(model, 'roi_head', None), 'bbox_head', None)
    if bbox is not None:
        extra = [n for n in ('shared_convs', 'cls_convs', 'cls_fcs', 'reg_convs', 'reg_fcs')
                 if len(getattr(bbox, n, ()) or ())]
        fcs = getattr(bbox, 'shared_fcs', None)
        if extra or not fcs or not all(isinstance(fc, nn.Linear) for fc in fcs):
            raise ValueError(f'roi_head.bbox_head ({type(bbox).__name__}): only shared FCs '
                             f'followed by fc_cls / fc_reg are supported (has {extra or "no FCs"})')
        names = [f'roi_head.bbox_head.shared_fcs.{i}' for i in range(len(fcs))]
        last = [(f'roi_head.bbox_head.{n}', 0) for n in ('fc_cls', 'fc_reg')
                if getattr(bbox, n, None) is not None]
        for i, name in enumerate(names):
            groups.append(HeadGroup(name, None, [(names[i + 1], 0)] if i + 1 < len(names)
                                    else last))
    decode = getattr(model, 'decode_head', None)
    if decode is not None:
        ppm, bottleneck = getattr(decode, 'psp_modules', None), getattr(decode, 'bottleneck',
                                                                          None)
        if ppm is None or bottleneck is None or isinstance(decode, nn.ModuleList):
            raise ValueError(f'decode_head ({type(decode).__name__}): only PSPHead is supported')
        offset = decode.in_channels
        for i, branch in enumerate(ppm):
            conv_module = branch[1]
            parent = f'decode_head.psp_modules.{i}.1'
            groups.append(HeadGroup(f'{parent}.conv', _norm_name(parent, conv_module),
                                    [('decode_head.bottleneck.conv', offset)]))
            offset += _conv_of(conv_module).out_channels
        groups.append(HeadGroup('decode_head.bottleneck.conv',
                                _norm_name('decode_head.bottleneck', bottleneck),
                                [('decode_head.conv_seg', 0)]))
    return groups


def _keep_rows(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep output channels ``keep`` of a Conv2d / Linear / BatchNorm, in place."""
    with torch.no_grad():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            for attr in ('weight', 'bias'):
                p = getattr(layer, attr)
                if p is not None:
                    setattr(layer, attr, nn.Parameter(p[keep].clone(), p.requires_grad))
            layer.running_mean = layer.running_mean[keep].clone()
            layer.running_var = layer.running_var[keep].clone()
            layer.num_features = len(keep)
            return
        layer.weight = nn.Parameter(layer.weight[keep].clone(), layer.weight.requires_grad)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[keep].clone(), layer.bias.requires_grad)
        if isinstance(layer, nn.Linear):
            layer.out_features = len(keep)
        else:
            layer.out_channels = len(keep)


def _drop_inputs(layer: nn.Module, offset: int, channels: int, keep: torch.Tensor) -> None:
    """Of input channels ``offset .. offset + channels`` of a Conv2d / Linear, keep only
    ``offset + keep``, in place."""
    n_in = layer.weight.shape[1]
    index = torch.cat([torch.arange(offset), offset + keep,
                       torch.arange(offset + channels, n_in)]).to(layer.weight.device)
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight[:, index].clone(), layer.weight.requires_grad)
    if isinstance(layer, nn.Linear):
        layer.in_features = len(index)
    else:
        layer.in_channels = len(index)


def prune_heads_with_ratio(model: nn.Module, ratio: float,
                           groups: Optional[Sequence[HeadGroup]] = None
                           ) -> Dict[str, Tuple[int, int]]:
    """Prune ``round(ratio · C)`` lowest-L2 output channels of every head group's producer
    (at most ``C − 1``), in place. Returns ``{producer: (before, after)}``."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f'ratio must be in [0, 1), got {ratio}')
    modules = dict(model.named_modules())
    channels = {}
    # last group first: pruning a slice of a shared consumer's inputs (the PSP bottleneck)
    # leaves the offsets of the slices before it valid
    for group in reversed(head_groups(model) if groups is None else groups):
        producer = modules[group.producer]
        c = producer.weight.shape[0]
        n = _num_pruned(c, ratio)
        channels[group.producer] = (c, c - n)
        if not n:
            continue
        order = torch.argsort(channel_importance(producer).cpu(), stable=True)
        keep = torch.sort(order[n:]).values
        _keep_rows(producer, keep.to(producer.weight.device))
        if group.norm is not None:
            _keep_rows(modules[group.norm], keep.to(producer.weight.device))
        for name, offset in group.consumers:
            _drop_inputs(modules[name], offset, c, keep)
    return channels


def prune_model_with_ratio(model: nn.Module, input_shape: Sequence[int], ratio: float
                           ) -> Dict[str, Tuple[int, int]]:
    """The backbone's block channels and the heads' groups at one ``ratio``, in place."""
    channels = {f'backbone.{k}': v for k, v in
                prune_with_ratio(model.backbone, tuple(input_shape), ratio).items()}
    channels.update(prune_heads_with_ratio(model, ratio))
    return channels


def prune_whole_model(model: nn.Module, input_shape: Sequence[int], target_flops: int,
                      tolerance: float = 0.01,
                      log: Callable[[str], None] = lambda _: None) -> PruneResult:
    """Prune ``model`` (backbone blocks and heads, one uniform ratio) in place so that its
    whole-model test-time FLOPs are within ``tolerance`` of ``target_flops``.

    Raises ``ValueError`` when the target is above the unpruned FLOPs or below what
    :data:`MAX_RATIO` reaches (the message gives that reachable minimum).
    """
    head_groups(model)  # refuse an unsupported head before any work
    shape = tuple(input_shape)
    flops_before = whole_model_flops(model, shape)
    params_before = count_params(model)
    if target_flops > flops_before:
        raise ValueError(f'target {target_flops} FLOPs is above the unpruned model\'s '
                         f'{flops_before} FLOPs')
    cache: Dict[float, int] = {}

    def measured(ratio: float) -> int:
        if ratio not in cache:
            trial = copy.deepcopy(model)
            prune_model_with_ratio(trial, shape, ratio)
            cache[ratio] = whole_model_flops(trial, shape)
            log(f'whole-model pruning: ratio {ratio:.4f} -> {cache[ratio]} FLOPs '
                f'(target {target_flops})')
        return cache[ratio]

    reachable = measured(MAX_RATIO)
    if target_flops < reachable * (1 - tolerance):
        raise ValueError(f'target {target_flops} FLOPs is unreachable by whole-model channel '
                         f'pruning: ratio {MAX_RATIO} leaves {reachable} FLOPs (unpruned: '
                         f'{flops_before}; the FPN width, the stem, the downsample branches '
                         'and the block outputs are kept)')
    ratio = _bisect(measured, target_flops, tolerance, 0.0, MAX_RATIO, steps=20)
    if ratio is None:
        raise ValueError(f'no uniform ratio brings the whole model within {tolerance:.1%} of '
                         f'{target_flops} FLOPs (channel rounding is too coarse)')
    channels = prune_model_with_ratio(model, shape, ratio)
    return PruneResult(ratio=ratio, flops_before=flops_before,
                       flops_after=whole_model_flops(model, shape), params_before=params_before,
                       params_after=count_params(model), channels=channels,
                       num_pruned_layers=sum(1 for b, a in channels.values() if a < b))
