"""The modules that are exported: each part of a detector / segmentor as a module of one
tensor (the preprocessed image batch (1, C, H, W)), and PSPNet's adaptive pooling as fixed-size
matrix products (see :mod:`~lrpet_mm.deploy.onnx_export`)."""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..engine.input_shape import check_input_shape
from ..lowrank.factorize import set_submodule

PARTS = ('backbone', 'segmentor', 'detector-features')


def check_part(part: str) -> str:
    if part not in PARTS:
        raise ValueError(f'unknown part {part!r}; choose one of {", ".join(PARTS)}')
    return part


def flatten_outputs(outputs) -> List[Tensor]:
    """The tensors of nested tuples / lists of outputs, in order."""
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in flatten_outputs(item)]
    raise TypeError(f'cannot export an output of type {type(outputs).__name__}')


class BackboneForward(nn.Module):
    """``model.backbone(x)`` as a flat tuple of feature maps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        return tuple(flatten_outputs(self.backbone(x)))


class SegmentorForward(nn.Module):
    """mmseg ``encode_decode``: (1, C, H, W) → logits (1, num_classes, H, W)."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int]):
        super().__init__()
        self.model = model
        hw = (int(input_shape[1]), int(input_shape[2]))
        self.img_metas = [dict(img_shape=hw, ori_shape=hw, pad_shape=hw,
                               batch_input_shape=hw)]

    def forward(self, x: Tensor) -> Tensor:
        return self.model.encode_decode(x, self.img_metas)


class DetectorFeatures(nn.Module):
    """Backbone + neck features, then the dense head's raw outputs, as a flat tuple.
    ``num_feats`` is the number of feature maps of the last forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        head = getattr(model, 'rpn_head', None)
        self.head = head if head is not None else getattr(model, 'bbox_head', None)
        self.num_feats = None

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        feats = flatten_outputs(self.model.extract_feat(x))
        self.num_feats = len(feats)
        outputs = list(feats)
        if self.head is not None:
            outputs += flatten_outputs(self.head(tuple(feats)))
        return tuple(outputs)


def export_wrapper(model: nn.Module, part: str, input_shape: Sequence[int]) -> nn.Module:
    """The module of one tensor (1, C, H, W) that ``part`` exports (eval mode; shares the
    model's weights).

    Raises:
        ValueError: unknown part or bad shape, or ``model`` has no such part (e.g.
            ``segmentor`` of a detector).
    """
    check_part(part)
    shape = check_input_shape(input_shape)
    kind = type(model).__name__
    if part == 'backbone':
        if not isinstance(getattr(model, 'backbone', None), nn.Module):
            raise ValueError(f'part {part!r}: {kind} has no backbone')
        wrapper = BackboneForward(model)
    elif part == 'segmentor':
        if not (hasattr(model, 'encode_decode') and hasattr(model, 'decode_head')):
            raise ValueError(f"part {part!r} needs an mmseg segmentor (EncoderDecoder); {kind} "
                             "has no encode_decode/decode_head (use 'detector-features' for "
                             'a detector)')
        wrapper = SegmentorForward(model, shape)
    else:
        if not (hasattr(model, 'extract_feat') and (hasattr(model, 'rpn_head')
                                                    or hasattr(model, 'bbox_head'))):
            raise ValueError(f"part {part!r} needs an mmdet detector; {kind} has no "
                             "extract_feat/rpn_head/bbox_head (use 'segmentor' for a "
                             'segmentor)')
        wrapper = DetectorFeatures(model)
    wrapper.eval()
    return wrapper


def output_names(wrapper: nn.Module, n_outputs: int) -> List[str]:
    """Names of the ``n_outputs`` outputs of ``wrapper`` (after one forward)."""
    if isinstance(wrapper, SegmentorForward):
        return ['seg_logits']
    if isinstance(wrapper, BackboneForward):
        return [f'backbone_{i}' for i in range(n_outputs)]
    n_feats = wrapper.num_feats
    model = wrapper.model
    names = [f'neck_{i}' if getattr(model, 'with_neck', False) else f'backbone_{i}'
             for i in range(n_feats)]
    head_outputs = n_outputs - n_feats
    if getattr(model, 'rpn_head', None) is not None and head_outputs == 2 * n_feats:
        names += [f'rpn_cls_score_{i}' for i in range(n_feats)]
        names += [f'rpn_bbox_pred_{i}' for i in range(n_feats)]
    else:
        names += [f'head_{i}' for i in range(head_outputs)]
    return names


def model_dtype(model: nn.Module) -> torch.dtype:
    """dtype of the model's first parameter (float32 for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.dtype if param is not None else torch.float32


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device('cpu')


# --------------------------------------------------------------------------- exportable pooling
def adaptive_pool_matrix(in_size: int, out_size: int) -> Tensor:
    """(out_size, in_size) averaging matrix of PyTorch's adaptive pooling: row i averages the
    inputs floor(i·in/out) .. ceil((i+1)·in/out) − 1."""
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -(-((i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class StaticAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` for one fixed input size (H, W) as ``P_h · x · P_wᵀ`` (two
    MatMuls in ONNX, any output size). Equal to the original up to float rounding."""

    def __init__(self, output_size: Tuple[int, int], input_size: Tuple[int, int],
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.input_size = tuple(int(v) for v in input_size)
        self.output_size = tuple(int(v) for v in output_size)
        factory = dict(device=device, dtype=dtype)
        pool_h = adaptive_pool_matrix(self.input_size[0], self.output_size[0])
        pool_w = adaptive_pool_matrix(self.input_size[1], self.output_size[1])
        self.register_buffer('pool_h', pool_h.to(**factory))
        self.register_buffer('pool_w_t', pool_w.t().contiguous().to(**factory))

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f'StaticAdaptiveAvgPool2d was built for {self.input_size}, got '
                             f'input {tuple(x.shape)}')
        return torch.matmul(torch.matmul(self.pool_h, x), self.pool_w_t)


def _pair_output_size(pool: nn.AdaptiveAvgPool2d, in_hw: Tuple[int, int]) -> Tuple[int, int]:
    size = pool.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return tuple(in_hw[i] if s is None else int(s) for i, s in enumerate(size))


def replace_adaptive_pools(module: nn.Module, example: Tensor) -> List[str]:
    """Swap, in place, each ``nn.AdaptiveAvgPool2d`` whose output size does not divide its
    input (as seen in one forward of ``example``) for a :class:`StaticAdaptiveAvgPool2d`.
    Returns the names swapped."""

    pools = {n: m for n, m in module.named_modules() if type(m) is nn.AdaptiveAvgPool2d}
    seen: Dict[str, set] = {n: set() for n in pools}
    handles = [m.register_forward_pre_hook(
        lambda _m, args, n=n: seen[n].add(tuple(args[0].shape[-2:]))) for n, m in pools.items()]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    swapped = []
    for name, pool in pools.items():
        if len(seen[name]) != 1:
            continue  # not called (or called at several sizes): left as is
        in_hw = next(iter(seen[name]))
        out_hw = _pair_output_size(pool, in_hw)
        if all(i % o == 0 for i, o in zip(in_hw, out_hw)):
            continue  # the exporter handles it natively
        set_submodule(module, name, StaticAdaptiveAvgPool2d(out_hw, in_hw, example.dtype,
                                                            example.device))
        swapped.append(name)
    return swapped
