"""FLOPs and parameter counting with ``mmengine.analysis``, of a module run on one tensor or of a
whole detector / segmentor's test-time tensor forward.

FLOPs follow mmengine's (fvcore's) convention: one multiply-add counts as one FLOP.
"""
import contextlib
from contextlib import contextmanager
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from mmengine.analysis import FlopAnalyzer, parameter_count
from torch import nn

#: OpenMMLab packages whose models have a tensor-mode ``_forward(inputs, data_samples)``
TASK_SCOPES = ('mmdet', 'mmseg')


@contextmanager
def eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _analyzer(module: nn.Module, input_shape: Sequence[int]) -> FlopAnalyzer:
    param = next(module.parameters())
    inputs = (torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype), )
    analyzer = FlopAnalyzer(module, inputs)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer


@torch.no_grad()
def count_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of ``module`` (eval mode) on one input of shape ``input_shape`` = (C, H, W)."""
    with eval_mode(module):
        return int(_analyzer(module, input_shape).total())


@torch.no_grad()
def flops_by_module(module: nn.Module, input_shape: Sequence[int]) -> Dict[str, int]:
    """``{submodule name relative to module ('' = total): FLOPs}``."""
    with eval_mode(module):
        return {k: int(v) for k, v in _analyzer(module, input_shape).by_module().items()}


def count_params(module: nn.Module) -> int:
    """Number of parameters (as ``mmengine.analysis.parameter_count``)."""
    return int(parameter_count(module)[''])


def model_task(model: nn.Module) -> Optional[str]:
    """``'mmdet'`` or ``'mmseg'`` for a detector / segmentor (any class in its MRO defined in
    that package), None for another module."""
    for cls in type(model).__mro__:
        package = cls.__module__.partition('.')[0]
        if package in TASK_SCOPES and hasattr(model, '_forward'):
            return package
    return None


def make_data_samples(task: str, input_shape: Sequence[int]) -> list:
    """One data sample (``DetDataSample`` / ``SegDataSample``) with the metainfo of an
    unscaled, unpadded image of ``input_shape`` = (C, H, W)."""
    hw = (int(input_shape[1]), int(input_shape[2]))
    meta = dict(img_shape=hw, ori_shape=hw, batch_input_shape=hw, pad_shape=hw,
                scale_factor=(1.0, 1.0))
    if task == 'mmdet':
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=meta)]
    if task == 'mmseg':
        from mmseg.structures import SegDataSample
        return [SegDataSample(metainfo=meta)]
    raise ValueError(f'unsupported task {task!r} (expected one of {TASK_SCOPES})')


def rpn_proposals(model: nn.Module) -> Optional[int]:
    """``max_per_img`` of the model's RPN test config (two-stage detectors), else None."""
    test_cfg = getattr(getattr(model, 'rpn_head', None), 'test_cfg', None)
    if test_cfg is None or 'nms' not in test_cfg or 'max_per_img' not in test_cfg:
        return None
    return int(test_cfg['max_per_img'])


@contextlib.contextmanager
def fixed_proposal_count(model: nn.Module):
    """Switch the RPN's NMS off while counting or timing: the RoI head then runs on the RPN's
    top ``max_per_img`` candidates, a number fixed by the input shape. With NMS on, how many
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


class TensorForward(nn.Module):
    """The test-time tensor forward of a detector / segmentor as a module of one tensor:
    ``model._forward(inputs, data_samples)`` (backbone, neck, heads; no post-processing;
    auxiliary heads that only train are not run), with a fixed number of RPN proposals (see
    :func:`fixed_proposal_count`), so ``FlopAnalyzer`` can trace it and forward hooks see every
    layer that runs at test time."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int]):
        super().__init__()
        task = model_task(model)
        if task is None:
            raise ValueError(f'{type(model).__name__} is not an mmdet detector or an mmseg '
                             'segmentor (no tensor-mode _forward)')
        self.model = model
        self.data_samples = make_data_samples(task, input_shape)
        # the wrapper's mode is the model's: counting (eval_mode) restores the model as it was
        self.training = model.training

    def forward(self, inputs: torch.Tensor):
        with fixed_proposal_count(self.model):
            return self.model._forward(inputs, self.data_samples)


def whole_model_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of the model's test-time tensor forward (:class:`TensorForward`) on one all-zero
    input of ``input_shape`` = (C, H, W)."""
    return count_flops(TensorForward(model, input_shape), input_shape)


def budget_forward(model: nn.Module, scope: str, input_shape: Sequence[int]
                   ) -> Tuple[nn.Module, Callable[[str], str]]:
    """What a FLOPs budget counts: ``(module, key)``, where ``module`` runs on one
    (1, C, H, W) tensor and ``key(name)`` is the name under which the model's layer ``name``
    appears in ``flops_by_module(module, ...)``.

    * ``scope`` a component (e.g. ``'backbone'``): that component alone;
    * ``scope=''`` (whole-model budgets): the model's test-time tensor forward
      (:class:`TensorForward`) for a detector / segmentor, else the model itself.
    """
    if scope:
        prefix = f'{scope}.'
        return model.get_submodule(scope), lambda name: name[len(prefix):]
    if model_task(model) is None:
        return model, lambda name: name
    return TensorForward(model, input_shape), lambda name: f'model.{name}'
