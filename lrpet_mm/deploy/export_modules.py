"""The module that is exported: the backbone of a detector / segmentor as a module of one
tensor (the preprocessed image batch (1, C, H, W)), see :mod:`~lrpet_mm.deploy.onnx_export`.

Only the backbone is exported here (latency studies). The whole detector / segmentor,
post-processing included, is deployed with ``tools/deploy.py`` (mmdeploy,
:mod:`lrpet_mm.deploy.mmdeploy_export`)."""
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..engine.input_shape import check_input_shape


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


def export_wrapper(model: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """The module of one tensor (1, C, H, W) that is exported: the model's backbone (eval mode;
    shares the model's weights).

    Raises:
        ValueError: bad shape, or ``model`` has no backbone.
    """
    check_input_shape(input_shape)
    if not isinstance(getattr(model, 'backbone', None), nn.Module):
        raise ValueError(f'{type(model).__name__} has no backbone to export')
    wrapper = BackboneForward(model)
    wrapper.eval()
    return wrapper


def output_names(wrapper: nn.Module, n_outputs: int) -> List[str]:
    """Names of the ``n_outputs`` outputs of ``wrapper`` (after one forward)."""
    if not isinstance(wrapper, BackboneForward):
        raise TypeError(f'expected the wrapper of export_wrapper, got {type(wrapper).__name__}')
    return [f'backbone_{i}' for i in range(n_outputs)]


def model_dtype(model: nn.Module) -> torch.dtype:
    """dtype of the model's first parameter (float32 for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.dtype if param is not None else torch.float32


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device('cpu')
