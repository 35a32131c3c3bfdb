"""Latency-aware merge: un-factorize the low-rank layers that are *measured* slower.

A :class:`~lrpet_mm.lowrank.LowRankConv2d` (``reduce``: k×n_in×kh×kw conv, then ``expand``: 1×1
conv m×k with bias) computes the same linear map as one conv with weight
``W = expand.weight[:, :, 0, 0] @ reduce.weight.reshape(k, -1)`` reshaped to (m, n_in, kh, kw)
and bias ``expand.bias`` (the 1×1 conv is pointwise, so it commutes with the first conv's
padding and stride); a :class:`~lrpet_mm.lowrank.LowRankLinear` likewise computes one linear
layer with weight ``expand.weight @ reduce.weight``. :func:`merge_low_rank` builds that conv or
linear layer. Fewer FLOPs do not always mean
less time (a thin inner width k runs at a lower arithmetic intensity, and it is one more
kernel launch and one more intermediate tensor), so :func:`latency_aware_merge` times each
factorized layer against its merged conv, at the layer's real input shape (captured with
forward hooks during one forward at the deployment input size), and merges where the
factorized one is slower by more than ``margin``.
"""
import copy
import io
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..lowrank.factorize import LOW_RANK_TYPES, LowRankLinear, set_submodule
from .timing import (
    check_memory_format,
    check_repeats,
    check_threads,
    interleaved_median_ms,
    ort_runner,
    ort_session,
    torch_threads,
)

RUNTIMES = ('torch', 'onnxruntime')
"""Where layers are timed: PyTorch eager, or onnxruntime (CPUExecutionProvider)."""

Example = Union[Tensor, Callable[[nn.Module], Any]]


@torch.no_grad()
def _merge_low_rank_linear(pair: LowRankLinear) -> nn.Linear:
    reduce, expand = pair[0], pair[1]
    if not (isinstance(reduce, nn.Linear) and isinstance(expand, nn.Linear)):
        raise ValueError(f'cannot merge {pair!r}: both layers must be nn.Linear')
    weight = expand.weight.double() @ reduce.weight.double()
    has_bias = expand.bias is not None or reduce.bias is not None
    linear = nn.Linear(reduce.in_features, expand.out_features, bias=has_bias,
                       dtype=reduce.weight.dtype, device=reduce.weight.device)
    linear.weight.copy_(weight)
    if has_bias:
        total = torch.zeros(expand.out_features, dtype=torch.float64, device=weight.device)
        if reduce.bias is not None:  # not made by factorize_linear, but merged exactly anyway
            total += expand.weight.double() @ reduce.bias.double()
        if expand.bias is not None:
            total += expand.bias.double()
        linear.bias.copy_(total)
    return linear.train(pair.training)


@torch.no_grad()
def merge_low_rank(pair: nn.Sequential) -> nn.Module:
    """The single conv (for a :class:`LowRankConv2d`) or linear layer (for a
    :class:`LowRankLinear`) equivalent to ``pair`` (exact up to float rounding; composed in
    float64). Conv weight (m, n_in, kh, kw) / linear weight (m, n), bias (m,), dtype and device
    of ``pair``."""
    if not isinstance(pair, LOW_RANK_TYPES) or len(pair) != 2:
        raise TypeError('expected a LowRankConv2d or LowRankLinear (reduce, expand), got '
                        f'{type(pair).__name__}')
    if isinstance(pair, LowRankLinear):
        return _merge_low_rank_linear(pair)
    reduce, expand = pair[0], pair[1]
    if expand.kernel_size != (1, 1) or expand.stride != (1, 1) or expand.groups != 1 \
            or reduce.groups != 1:
        raise ValueError(f'cannot merge {pair!r}: the second conv must be a plain 1x1 conv')
    rank, n_in, *kernel = reduce.weight.shape
    n_out = expand.weight.shape[0]
    weight = expand.weight.double().reshape(n_out, rank) @ reduce.weight.double().reshape(rank, -1)
    bias = [expand.bias is not None, reduce.bias is not None]
    conv = nn.Conv2d(n_in, n_out, tuple(kernel), stride=reduce.stride, padding=reduce.padding,
                     dilation=reduce.dilation, bias=any(bias), padding_mode=reduce.padding_mode)
    conv.to(dtype=reduce.weight.dtype, device=reduce.weight.device)
    conv.weight.copy_(weight.reshape(n_out, n_in, *kernel))
    if any(bias):
        total = torch.zeros(n_out, dtype=torch.float64, device=weight.device)
        if reduce.bias is not None:  # not made by factorize_conv, but merged exactly anyway
            total += expand.weight.double().reshape(n_out, rank) @ reduce.bias.double()
        if expand.bias is not None:
            total += expand.bias.double()
        conv.bias.copy_(total)
    return conv.train(pair.training)


def low_rank_layers(model: nn.Module) -> Dict[str, nn.Sequential]:
    """``{module name: LowRankConv2d or LowRankLinear}`` of ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LOW_RANK_TYPES)}


def _run_example(model: nn.Module, example: Example) -> None:
    with torch.no_grad():
        if isinstance(example, Tensor):
            model(example)
        elif callable(example):
            example(model)
        else:
            raise TypeError('example must be an input tensor or a callable taking the model, '
                            f'got {type(example).__name__}')


def capture_input_shapes(model: nn.Module, example: Example,
                         layers: Optional[Dict[str, nn.Module]] = None
                         ) -> Dict[str, List[Tuple[int, ...]]]:
    """Input shape of every call of each of ``layers`` (default: the model's low-rank layers)
    during one forward ``example`` (an input tensor, or ``example(model)``)."""
    layers = low_rank_layers(model) if layers is None else layers
    shapes: Dict[str, List[Tuple[int, ...]]] = {name: [] for name in layers}
    handles = []
    for name, module in layers.items():
        def hook(_module, args, name=name):
            shapes[name].append(tuple(args[0].shape))
        handles.append(module.register_forward_pre_hook(hook))
    try:
        was_training = model.training
        model.eval()
        _run_example(model, example)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _onnx_bytes(module: nn.Module, x: Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(module, (x, ), buffer, opset_version=17, input_names=['input'],
                          output_names=['output'], do_constant_folding=True)
    return buffer.getvalue()


def _check_runtime(runtime: str, memory_format: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f'runtime must be one of {RUNTIMES}, got {runtime!r}')
    check_memory_format(memory_format)
    if runtime != 'torch' and memory_format != 'contiguous':
        raise ValueError(f"memory_format={memory_format!r} applies to runtime='torch' only "
                         f'(onnxruntime picks its own layouts), got runtime={runtime!r}')


def time_layer_pair(factorized: nn.Module, merged: nn.Module, input_shape: Tuple[int, ...],
                    runtime: str = 'torch', repeats: int = 20, warmup: int = 3,
                    threads: Optional[int] = None,
                    memory_format: str = 'contiguous') -> Tuple[float, float]:
    """Median latency (ms) of ``factorized`` and of ``merged`` on one random input of
    ``input_shape`` ((N, C, H, W) for convs, e.g. (N, tokens, C) for linear layers), timed
    interleaved in ``runtime``; in eager PyTorch a 4-D input has ``memory_format`` (the
    modules' weights should have it too)."""
    _check_runtime(runtime, memory_format)
    param = next(factorized.parameters())
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(param)
    if runtime == 'torch':
        if x.dim() == 4:  # channels_last exists for 4-D tensors only
            x = x.contiguous(memory_format=check_memory_format(memory_format))
        with torch_threads(threads), torch.no_grad():
            return tuple(interleaved_median_ms([lambda: factorized(x), lambda: merged(x)],
                                               repeats, warmup))
    x = x.float().cpu()
    runners = [ort_runner(ort_session(_onnx_bytes(copy.deepcopy(m).float().cpu(), x), threads),
                          x.numpy()) for m in (factorized, merged)]
    return tuple(interleaved_median_ms(runners, repeats, warmup))


@dataclass
class LayerLatency:
    """One low-rank layer's measurement.

    Attributes:
        name: module name.
        rank: inner width k.
        input_shapes: (N, C, H, W) of each call during the example forward.
        factorized_ms, merged_ms: median latency of the factorized pair and of the merged conv
            (summed over the calls), in milliseconds.
        merged: whether it was replaced by the merged conv.
    """
    name: str
    rank: int
    input_shapes: List[Tuple[int, ...]]
    factorized_ms: float
    merged_ms: float
    merged: bool


@dataclass
class LatencyMergeResult:
    """Result of :func:`latency_aware_merge`: the model and what was measured / merged."""
    model: nn.Module
    layers: List[LayerLatency] = field(default_factory=list)
    runtime: str = 'torch'
    threads: int = 1
    repeats: int = 0
    warmup: int = 0
    margin: float = 0.0
    confirm: bool = True
    memory_format: str = 'contiguous'
    not_called: List[str] = field(default_factory=list)

    @property
    def merged(self) -> List[str]:
        return [layer.name for layer in self.layers if layer.merged]

    def summary(self) -> str:
        kept = len(self.layers) - len(self.merged)
        where = self.runtime + (f' {self.memory_format}' if self.runtime == 'torch' else '')
        return (f'latency-aware merge ({where}, {self.threads} threads): '
                f'{len(self.merged)} of {len(self.layers)} low-rank layers merged back into '
                f'one layer (measured slower factorized), {kept} kept factorized')

    def to_dict(self) -> dict:
        return dict(runtime=self.runtime, threads=self.threads, repeats=self.repeats,
                    warmup=self.warmup, margin=self.margin, confirm=self.confirm,
                    memory_format=self.memory_format, not_called=list(self.not_called),
                    layers=[asdict(layer) for layer in self.layers])


def latency_aware_merge(model: nn.Module, example: Example, runtime: str = 'torch',
                        repeats: int = 20, warmup: int = 3, margin: float = 0.05,
                        threads: Optional[int] = None, confirm: bool = True,
                        inplace: bool = False,
                        memory_format: str = 'contiguous') -> LatencyMergeResult:
    """Merge back every low-rank layer that is measured slower than its single-conv (or single
    linear layer) form.

    Args:
        model: a compact model (any module holding :class:`LowRankConv2d` /
            :class:`LowRankLinear` layers).
        example: one deployment-size forward: an input tensor (``model(example)``) or a
            callable ``example(model)``. Layers it does not call are left factorized.
        runtime: ``'torch'`` (eager) or ``'onnxruntime'`` (each layer exported alone).
        repeats, warmup: timed and untimed runs per layer (median of the timed ones).
        margin: merge when ``factorized_ms > (1 + margin) * merged_ms``; > 0 keeps the smaller
            layer when the two are within timing noise. Defaults to 0.05.
        threads: intra-op threads for timing (None: all cores).
        confirm: a layer found slower factorized is timed a second time and merged only if
            that measurement agrees too (guards against a noisy machine); the recorded times
            are then the mean of the two medians. Defaults to True.
        inplace: modify ``model`` itself instead of a deep copy.
        memory_format: eager layout the layers are timed in, ``'contiguous'`` (NCHW) or
            ``'channels_last'`` (deploy the result in the same layout: which layers are slower
            factorized depends on it); runtime ``'torch'`` only. Defaults to 'contiguous'.

    Returns:
        The (copied) model, in eval mode and in ``memory_format``, and the per-layer
        measurements. The merged model's
        outputs equal the compact model's up to float rounding.
    """
    _check_runtime(runtime, memory_format)
    layout = check_memory_format(memory_format)
    check_repeats(repeats, warmup)
    threads = check_threads(threads)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
        raise ValueError(f'margin must be a number >= 0, got {margin!r}')
    model = model if inplace else copy.deepcopy(model)
    model.eval()  # (mmdet's ResNet.train returns None: no chaining)
    model.to(memory_format=layout)
    layers = low_rank_layers(model)
    shapes = capture_input_shapes(model, example, layers)
    result = LatencyMergeResult(model, runtime=runtime, threads=threads, repeats=repeats,
                                warmup=warmup, margin=float(margin), confirm=bool(confirm),
                                memory_format=memory_format)
    for name, pair in layers.items():
        if not shapes[name]:
            result.not_called.append(name)
            continue
        merged_conv = merge_low_rank(pair).to(memory_format=layout)

        def measure() -> Tuple[float, float]:
            total_f = total_m = 0.0
            for shape, count in Counter(shapes[name]).items():
                f_ms, m_ms = time_layer_pair(pair, merged_conv, shape, runtime, repeats,
                                             warmup, threads, memory_format)
                total_f += count * f_ms
                total_m += count * m_ms
            return total_f, total_m

        factorized_ms, merged_ms = measure()
        merge = factorized_ms > (1.0 + margin) * merged_ms
        if merge and confirm:  # a second, independent measurement must agree
            again_f, again_m = measure()
            merge = again_f > (1.0 + margin) * again_m
            factorized_ms, merged_ms = (factorized_ms + again_f) / 2, (merged_ms + again_m) / 2
        if merge:
            set_submodule(model, name, merged_conv)
        result.layers.append(LayerLatency(name, pair.rank, list(shapes[name]), factorized_ms,
                                          merged_ms, merge))
    return result
