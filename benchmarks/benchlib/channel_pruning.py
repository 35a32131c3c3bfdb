"""Channel-pruning baseline for ResNet backbones (mmdet ``ResNet``, mmseg ``ResNetV1c``).

Structured L2-magnitude pruning of the channels *inside* the residual blocks, done with
Torch-Pruning's dependency graph so that the following BN and the next conv's input channels
are pruned consistently:

* ``BasicBlock``: output channels of ``conv1`` (and so ``norm1`` and the input of ``conv2``);
* ``Bottleneck``: output channels of ``conv1`` and of ``conv2`` (and their norms and the inputs
  of ``conv2`` / ``conv3``).

The stem, the downsample branches and the block output convs (``conv2`` of a BasicBlock,
``conv3`` of a Bottleneck) keep all their output channels, so every stage's output shape is
unchanged and a neck/head built for the unpruned backbone stays valid.

Importance of a channel = L2 norm of its own filter (``conv.weight[c]``), computed on the
*unpruned* weights of each conv before anything is removed (for a Bottleneck's ``conv2`` this
norm includes the input channels that pruning ``conv1`` removes). The BN and next-conv slices
of the group do not enter the score. The lowest-norm channels are removed (ties: the lower
index is removed first).

One uniform ratio is used for every pruned conv: ``n_pruned = min(round(ratio * C), C - 1)``
(at least one channel kept). :func:`prune_resnet_blocks` bisects that ratio, without touching
the backbone, so that ``count_flops`` of the pruned backbone is within ``tolerance`` of the
target, then prunes the backbone in place. FLOPs follow :mod:`lrpet_mm.engine.flops`
(mmengine's counter, one multiply-add = one FLOP).
"""
import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch_pruning as tp
from torch import nn

from lrpet_mm.engine.flops import count_flops, count_params, flops_by_module

#: Largest uniform pruning ratio the bisection tries.
MAX_RATIO = 0.95


@dataclass
class PruneResult:
    ratio: float
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    #: pruned conv name -> (output channels before, after)
    channels: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    num_pruned_layers: int = 0


@dataclass
class _Layer:
    """One prunable conv: its output channels, the BN after it and the conv that reads it."""
    name: str
    conv: nn.Conv2d
    norm: nn.Module
    norm_name: str
    next_conv: nn.Conv2d
    next_name: str


def _never(name: str) -> bool:
    return False


def _is_block(module: nn.Module) -> bool:
    return (hasattr(module, 'conv1') and hasattr(module, 'conv2')
            and hasattr(module, 'norm1_name') and hasattr(module, 'norm2_name'))


def _blocks(backbone: nn.Module,
            skip: Callable[[str], bool]) -> Iterator[Tuple[str, nn.Module]]:
    for name, module in backbone.named_modules():
        if _is_block(module) and not skip(name):
            yield name, module


def prunable_layers(backbone: nn.Module,
                    skip: Callable[[str], bool] = _never) -> List[_Layer]:
    """The convs whose output channels are pruned, in module order (blocks for which
    ``skip(block_name)`` is true are left out)."""
    layers = []
    for bname, block in _blocks(backbone, skip):
        pairs = [(1, 2), (2, 3)] if hasattr(block, 'conv3') else [(1, 2)]
        for i, j in pairs:
            conv, nxt = getattr(block, f'conv{i}'), getattr(block, f'conv{j}')
            norm_name = getattr(block, f'norm{i}_name')
            for m, what in ((conv, f'conv{i}'), (nxt, f'conv{j}')):
                if type(m) is not nn.Conv2d or m.groups != 1:
                    raise ValueError(f'{bname}.{what} is {type(m).__name__} (groups='
                                     f'{getattr(m, "groups", "?")}); only plain nn.Conv2d '
                                     'with groups=1 is supported')
            layers.append(
                _Layer(f'{bname}.conv{i}', conv, getattr(block, norm_name),
                       f'{bname}.{norm_name}', nxt, f'{bname}.conv{j}'))
    return layers


def channel_importance(conv: nn.Conv2d) -> torch.Tensor:
    """L2 norm of each output channel's filter."""
    return conv.weight.detach().flatten(1).norm(p=2, dim=1)


def _num_pruned(channels: int, ratio: float) -> int:
    return max(0, min(int(round(ratio * channels)), channels - 1))


@contextmanager
def _traceable(backbone: nn.Module):
    """Eval mode, every parameter requiring grad (Torch-Pruning traces the autograd graph,
    which frozen stages would cut) and no activation checkpointing; all restored after,
    module by module, including the ``requires_grad`` of parameters replaced by pruning."""
    modes = {name: m.training for name, m in backbone.named_modules()}
    grads = {name: p.requires_grad for name, p in backbone.named_parameters()}
    cps = {name: m.with_cp for name, m in backbone.named_modules() if hasattr(m, 'with_cp')}
    try:
        backbone.eval()
        for p in backbone.parameters():
            p.requires_grad_(True)
        for name, m in backbone.named_modules():
            if name in cps:
                m.with_cp = False
        yield
    finally:
        for name, m in backbone.named_modules():
            if name in modes:
                m.training = modes[name]
            if name in cps:
                m.with_cp = cps[name]
        for name, p in backbone.named_parameters():
            if name in grads:
                p.requires_grad_(grads[name])


def _forward_with_grad(model: nn.Module, inputs: torch.Tensor):
    # Torch-Pruning calls ``model.eval()`` before this; mmdet/mmseg ResNet's ``train()``
    # override re-freezes the frozen stages there, which would cut them out of the autograd
    # graph the tracer follows. The input requires grad too, so no op is left without grad_fn.
    for p in model.parameters():
        p.requires_grad_(True)
    return model(inputs)


def _example_input(backbone: nn.Module, input_shape: Tuple[int, int, int]) -> torch.Tensor:
    param = next(backbone.parameters())
    return torch.randn(1, *input_shape, device=param.device, dtype=param.dtype,
                       requires_grad=True)


def prune_with_ratio(backbone: nn.Module,
                     input_shape: Tuple[int, int, int],
                     ratio: float,
                     skip: Callable[[str], bool] = _never) -> Dict[str, Tuple[int, int]]:
    """Prune ``round(ratio * C)`` lowest-L2 output channels (at most ``C - 1``) of every
    prunable conv of ``backbone``, in place. Returns ``{conv name: (before, after)}``."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f'ratio must be in [0, 1), got {ratio}')
    layers = prunable_layers(backbone, skip)
    # all indices from the unpruned weights, before any group is pruned
    plan = []
    for layer in layers:
        c = layer.conv.out_channels
        n = _num_pruned(c, ratio)
        order = torch.argsort(channel_importance(layer.conv).cpu(), stable=True)
        plan.append((layer, c, sorted(order[:n].tolist())))
    channels = {layer.name: (c, c - len(idxs)) for layer, c, idxs in plan}
    if not any(idxs for _, _, idxs in plan):
        return channels

    all_modules = set(backbone.modules())
    with _traceable(backbone):
        dg = tp.DependencyGraph().build_dependency(
            backbone, example_inputs=_example_input(backbone, input_shape),
            forward_fn=_forward_with_grad, verbose=False)
        for layer, _, idxs in plan:
            if not idxs:
                continue
            group = dg.get_pruning_group(layer.conv, tp.prune_conv_out_channels, idxs)
            allowed = {layer.conv, layer.norm, layer.next_conv}
            for item in group.items:
                module = item.dep.target.module
                if module in all_modules and module not in allowed:
                    name = dg._module2name.get(module, type(module).__name__)
                    raise RuntimeError(f'pruning {layer.name} would also prune {name}; '
                                       'only channels internal to a block may be pruned')
            group.prune()
    return channels


def _flops_model(backbone: nn.Module, input_shape: Tuple[int, int, int],
                 layers: List[_Layer]) -> Tuple[int, Callable[[float], int]]:
    """``(flops_before, predict(ratio))``: FLOPs of convs scale with in x out channels and of
    BN with channels, so the FLOPs after pruning follow from one per-module count."""
    by_module = flops_by_module(backbone, input_shape)
    total = by_module['']
    out_of = {id(layer.conv): layer for layer in layers}
    in_of = {id(layer.next_conv): layer for layer in layers}
    terms = []  # (flops, in-channel layer or None, out-channel layer or None)
    seen = set()
    for layer in layers:
        for name, m in ((layer.name, layer.conv), (layer.next_name, layer.next_conv)):
            if id(m) not in seen:
                seen.add(id(m))
                terms.append((by_module.get(name, 0), in_of.get(id(m)), out_of.get(id(m))))
        terms.append((by_module.get(layer.norm_name, 0), None, layer))

    def predict(ratio: float) -> int:
        flops = float(total)
        for f, lin, lout in terms:
            scale = 1.0
            for lay in (lin, lout):
                if lay is not None:
                    c = lay.conv.out_channels
                    scale *= (c - _num_pruned(c, ratio)) / c
            flops -= f * (1.0 - scale)
        return int(round(flops))

    return total, predict


def _bisect(flops_at: Callable[[float], int], target: int, tolerance: float,
            lo: float, hi: float, steps: int = 40) -> Optional[float]:
    """Ratio in [lo, hi] whose FLOPs are within ``tolerance`` of ``target`` (FLOPs decrease
    with the ratio; flops_at(lo) >= target >= flops_at(hi)), or None."""
    for r in (lo, hi):
        if abs(flops_at(r) - target) <= tolerance * target:
            return r
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        f = flops_at(mid)
        if abs(f - target) <= tolerance * target:
            return mid
        if f > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    return None


def prune_resnet_blocks(backbone: nn.Module,
                        input_shape: Tuple[int, int, int],
                        target_flops: int,
                        skip: Callable[[str], bool] = _never,
                        tolerance: float = 0.01) -> PruneResult:
    """L2-magnitude channel pruning of the residual blocks' inner channels, in place, with one
    uniform ratio chosen so that ``count_flops(backbone, input_shape)`` is within
    ``tolerance`` (relative) of ``target_flops``.

    Importance: L2 norm of each output channel's filter of the pruned conv (unpruned weights;
    BN and next-conv slices do not enter). ``skip(block_name)`` excludes blocks, e.g.
    ``lambda n: n.startswith('layer1')`` for a frozen first stage.

    Raises ``ValueError`` when the target is above the unpruned FLOPs, or below what the
    largest ratio (:data:`MAX_RATIO`, at least one channel kept per conv) reaches.
    """
    layers = prunable_layers(backbone, skip)
    flops_before, predict = _flops_model(backbone, input_shape, layers)
    params_before = count_params(backbone)
    if target_flops > flops_before:
        raise ValueError(f'target {target_flops} FLOPs is above the unpruned backbone\'s '
                         f'{flops_before} FLOPs')

    def measured(ratio: float) -> int:
        trial = copy.deepcopy(backbone)
        prune_with_ratio(trial, input_shape, ratio, skip)
        return count_flops(trial, input_shape)

    reachable = predict(MAX_RATIO)
    if target_flops < reachable * (1 - tolerance):
        reachable = measured(MAX_RATIO)  # the message reports counted FLOPs
    if target_flops < reachable * (1 - tolerance) or not layers:
        raise ValueError(
            f'target {target_flops} FLOPs is unreachable: pruning {len(layers)} prunable '
            f'layers at ratio {MAX_RATIO} (at least one channel kept) leaves {reachable} FLOPs '
            f'(unpruned: {flops_before}, tolerance {tolerance:.1%})')

    ratio = _bisect(predict, target_flops, tolerance, 0.0, MAX_RATIO)
    if ratio is None or abs(measured(ratio) - target_flops) > tolerance * target_flops:
        # the analytic model disagrees with the counter: bisect on counted FLOPs
        ratio = _bisect(measured, target_flops, tolerance, 0.0, MAX_RATIO, steps=20)
    if ratio is None:
        raise ValueError(f'no uniform ratio brings the FLOPs within {tolerance:.1%} of '
                         f'target {target_flops} (channel rounding is too coarse over '
                         f'{len(layers)} prunable layers)')

    channels = prune_with_ratio(backbone, input_shape, ratio, skip)
    flops_after = count_flops(backbone, input_shape)
    return PruneResult(
        ratio=ratio,
        flops_before=flops_before,
        flops_after=flops_after,
        params_before=params_before,
        params_after=count_params(backbone),
        channels=channels,
        num_pruned_layers=sum(1 for b, a in channels.values() if a < b))
