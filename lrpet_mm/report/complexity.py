"""FLOPs and parameters of a whole detector / segmentor and of each of its components."""
import warnings
from typing import Dict, Sequence

from torch import nn

from ..engine.flops import TensorForward, count_flops, count_params, flops_by_module
from ..utils.values import error_text

FLOPS_CONVENTION = 'mmengine.analysis (fvcore): one multiply-add counts as one FLOP'


def component_names(model: nn.Module) -> list:
    """The model's top-level components that hold parameters (``backbone``, ``neck``,
    ``rpn_head``, ``roi_head``, ``decode_head``, ``auxiliary_head``...), in model order."""
    return [name for name, child in model.named_children()
            if any(True for _ in child.parameters())]


def measure_complexity(model: nn.Module, input_shape: Sequence[int]) -> dict:
    """``{'model': {flops, params, flops_error}, 'components': {name: {flops, params}},
    'backbone': {flops, params}}``.

    Whole-model FLOPs are the test-time tensor forward
    (:class:`~lrpet_mm.engine.flops.TensorForward`); each component's FLOPs are its share of
    that forward (0 for a head that only trains, e.g. an auxiliary head). If the forward
    cannot be traced, whole-model and component FLOPs are ``None`` with the error text in
    ``flops_error``; the backbone's own FLOPs (run alone) must be countable.
    """
    backbone = getattr(model, 'backbone', None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f'{type(model).__name__} has no backbone module')
    names = component_names(model)
    result = dict(backbone=dict(flops=count_flops(backbone, input_shape),
                                params=count_params(backbone)),
                  model=dict(flops=None, params=count_params(model), flops_error=None),
                  components={name: dict(flops=None, params=count_params(
                      model.get_submodule(name))) for name in names})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # tracer warnings about Python control flow
            by_module: Dict[str, int] = flops_by_module(TensorForward(model, input_shape),
                                                        input_shape)
    except Exception as e:  # tracing failed for this model: reported, not fatal
        result['model']['flops_error'] = error_text(e)
        return result
    result['model']['flops'] = by_module['']
    for name in names:
        result['components'][name]['flops'] = by_module.get(f'model.{name}', 0)
    return result
