"""Fold eval-mode BatchNorms into the convs before them, for fair eager-mode timings.

The ONNX exporter and onnxruntime fold Conv+BatchNormalization themselves, and a compact model
has the BNs of its factorized convs folded already; folding the remaining ones in PyTorch too
makes an eager comparison measure the factorization, not the BN folding.
"""
import copy
from typing import List, Tuple

import torch
from torch import nn

from lrpet_mm.lowrank import find_conv_norm_pairs
from lrpet_mm.lowrank.batchnorm import has_running_stats, is_batch_norm
from lrpet_mm.lowrank.factorize import fold_conv_bn, set_submodule

_FOLDABLE_CONVS = {'torch.nn.modules.conv.Conv2d', 'mmcv.cnn.bricks.wrappers.Conv2d'}


def _foldable(conv: nn.Module) -> bool:
    return f'{type(conv).__module__}.{type(conv).__qualname__}' in _FOLDABLE_CONVS


@torch.no_grad()
def fold_batchnorms(model: nn.Module, inplace: bool = False) -> Tuple[nn.Module, List[str]]:
    """Fold each BN (with running statistics) that structurally follows a plain conv into that
    conv's weight and bias, and replace the BN by ``nn.Identity``.

    Pairs come from :func:`~lrpet_mm.lowrank.find_conv_norm_pairs` (the BN consumes the conv's
    output directly). Eval-mode outputs are unchanged up to float rounding.

    Returns:
        The (copied unless ``inplace``) model and the names of the folded BNs.
    """
    model = model if inplace else copy.deepcopy(model)
    folded = []
    for conv_name, norm_name in find_conv_norm_pairs(model).items():
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        if not (_foldable(conv) and is_batch_norm(norm) and has_running_stats(norm)):
            continue
        result = fold_conv_bn(conv, norm)
        conv.weight.copy_(result.weight.reshape(conv.weight.shape))
        bias = result.bias.to(dtype=conv.weight.dtype, device=conv.weight.device)
        if conv.bias is None:
            conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(bias)
        set_submodule(model, norm_name, nn.Identity())
        folded.append(norm_name)
    return model, folded
