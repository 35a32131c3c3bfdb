"""BatchNorm helpers for BN rectification, pure PyTorch."""
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

#: ε of paper eq. 16, W ← (Γ² + εI)⁻¹ Γ W'_k.
BNR_EPS = 1e-5
#: How the conv weight is recovered from the projected BN-folded weight ΓW (see
#: :class:`~lrpet_mm.lowrank.projector.LowRankProjector`): ``'in_span'`` (the default),
#: W ← α·W·V_kV_kᵀ with V_k the top-k right singular vectors of ΓW; ``'eq16'``, paper eq. 16,
#: W ← (Γ² + εI)⁻¹ Γ·P̃_k(ΓW).
BN_RECOVERIES = ('in_span', 'eq16')


#: Batch norms that do not subclass torch's ``_BatchNorm`` (qualified class names).
_OTHER_BATCH_NORMS = {'mmcv.ops.sync_bn.SyncBatchNorm'}


def is_batch_norm(module: nn.Module) -> bool:
    """True for BatchNorm/SyncBatchNorm (any dim), mmcv's ``MMSyncBN`` and frozen BN variants
    with running stats."""
    if isinstance(module, _BatchNorm):
        return True
    # mmcv.ops.SyncBatchNorm (registered as 'MMSyncBN') is a plain Module with the BN
    # attributes; matched by qualified name so the core stays free of OpenMMLab imports.
    if f'{type(module).__module__}.{type(module).__qualname__}' in _OTHER_BATCH_NORMS:
        return True
    # torchvision.ops.FrozenBatchNorm2d and look-alikes: fixed γ, β, μ, v buffers.
    return type(module).__name__.startswith('FrozenBatchNorm') and all(
        hasattr(module, attr) for attr in ('weight', 'running_var', 'eps'))


def has_running_stats(bn: nn.Module) -> bool:
    """False for a BN with ``track_running_stats=False`` (it normalizes with batch statistics)."""
    return getattr(bn, 'running_var', None) is not None


def bn_scale(bn: nn.Module) -> Tensor:
    """Per-channel scale a = γ / sqrt(v + eps) of a BatchNorm, shape (C,), float32 or wider."""
    if not has_running_stats(bn):
        raise ValueError(f'{type(bn).__name__} has no running variance '
                         '(track_running_stats=False): its scale is not defined')
    var = bn.running_var.detach()
    if var.dtype in (torch.float16, torch.bfloat16):
        var = var.float()
    scale = (var + bn.eps).rsqrt()
    gamma = getattr(bn, 'weight', None)
    if gamma is not None:  # affine=False BN has γ = 1
        scale = scale * gamma.detach().to(scale.dtype)
    return scale


def fold_rows(matrix: Tensor, scale: Tensor) -> Tensor:
    """diag(a)·M: row i of a (m, n) matrix times a_i, in the matrix's dtype."""
    return matrix * scale.to(matrix)[:, None]


def bn_folded_matrix(weight: Tensor, norm: Optional[nn.Module] = None) -> Tensor:
    """The (m, n) matrix LRPET projects for a conv or linear weight (m = n_out): the weight
    with the scale of the BatchNorm ``norm`` that consumes its output folded into its rows,
    diag(a)·W (BN rectification); W itself when ``norm`` is None. In the weight's dtype."""
    matrix = weight.detach().reshape(weight.shape[0], -1)
    return matrix if norm is None else fold_rows(matrix, bn_scale(norm))


def unfold_factor(scale: Tensor, eps: float = BNR_EPS) -> Tensor:
    """Per-row factor a / (a² + ε) of paper eq. 16, shape (m,)."""
    return scale / (scale * scale + eps)
