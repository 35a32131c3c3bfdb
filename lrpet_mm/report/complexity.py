"""FLOPs and parameters of a whole detector / segmentor and of its backbone."""
import contextlib
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from ..engine.flops import count_flops, count_params
from ..utils.values import error_text

FLOPS_CONVENTION = 'mmengine.analysis (fvcore): one multiply-add counts as one FLOP'


def make_data_samples(scope: str, input_shape: Sequence[int]) -> list:
    """One data sample (``DetDataSample`` / ``SegDataSample``) with the metainfo of an
    unscaled, unpadded image of ``input_shape`` = (C, H, W)."""
    hw = (int(input_shape[1]), int(input_shape[2]))
    meta = dict(img_shape=hw, ori_shape=hw, batch_input_shape=hw, pad_shape=hw,
                scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=meta)]
    if scope == 'mmseg':
        from mmseg.structures import SegDataSample
        return [SegDataSample(metainfo=meta)]
    raise ValueError(f'unsupported scope {scope!r}')


class TensorForward(nn.Module):
    """``model._forward(inputs, data_samples)`` (the tensor mode: backbone, neck, heads, no
    post-processing) as a module of one tensor, so ``FlopAnalyzer`` can trace it."""

    def __init__(self, model: nn.Module, data_samples: list):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor):
        return self.model._forward(inputs, self.data_samples)


def rpn_proposals(model: nn.Module) -> Optional[int]:
    """``max_per_img`` of the model's RPN test config (two-stage detectors), else None."""
    test_cfg = getattr(getattr(model, 'rpn_head', None), 'test_cfg', None)
    if test_cfg is None or 'nms' not in test_cfg or 'max_per_img' not in test_cfg:
        return None
    return int(test_cfg['max_per_img'])


@contextlib.contextmanager
def fixed_proposal_count(model: nn.Module):
    """Switch the RPN's NMS off while counting: the RoI head then runs on the RPN's top
    ``max_per_img`` candidates, a number fixed by the input shape. With NMS on, how many
    proposals survive depends on the weights (on an all-zero image, on ties broken by rounding
    noise), so the projected and the compact model, equal up to ~1e-7, could be counted on
    different numbers of RoIs."""
    if rpn_proposals(model) is None:
        yield
        return
    test_cfg = model.rpn_head.test_cfg
    nms = test_cfg['nms']
    test_cfg['nms'] = None  # mmcv's batched_nms: nms_cfg=None skips NMS
    try:
        yield
    finally:
        test_cfg['nms'] = nms


def whole_model_flops(model: nn.Module, scope: str, input_shape: Sequence[int]) -> int:
    """FLOPs of the model's tensor forward on one all-zero input of ``input_shape`` (for a
    two-stage detector, with a fixed number of proposals: see :func:`fixed_proposal_count`)."""
    with fixed_proposal_count(model):
        return count_flops(TensorForward(model, make_data_samples(scope, input_shape)),
                           input_shape)


def measure_complexity(model: nn.Module, scope: str, input_shape: Sequence[int]) -> dict:
    """``{'backbone': {flops, params}, 'model': {flops, params, flops_error}}``.

    Whole-model FLOPs that cannot be traced are ``None`` with the error text in
    ``flops_error`` (backbone FLOPs must be countable).
    """
    backbone = getattr(model, 'backbone', None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f'{type(model).__name__} has no backbone module')
    result = dict(backbone=dict(flops=count_flops(backbone, input_shape),
                                params=count_params(backbone)),
                  model=dict(flops=None, params=count_params(model), flops_error=None))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # tracer warnings about Python control flow
            result['model']['flops'] = whole_model_flops(model, scope, input_shape)
    except Exception as e:  # tracing failed for this model: reported, not fatal
        result['model']['flops_error'] = error_text(e)
    return result
