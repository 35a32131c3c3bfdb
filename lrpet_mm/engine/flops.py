"""FLOPs and parameter counting with ``mmengine.analysis``.

FLOPs follow mmengine's (fvcore's) convention: one multiply-add counts as one FLOP.
"""
from contextlib import contextmanager
from typing import Dict, Sequence

import torch
from mmengine.analysis import FlopAnalyzer, parameter_count
from torch import nn


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
