"""BatchNorm helpers for BN rectification (paper eq. 16), pure PyTorch."""
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

#: ε of paper eq. 16, W ← (Γ² + εI)⁻¹ Γ W'_k.
BNR_EPS = 1e-5


def is_batch_norm(module: nn.Module) -> bool:
    """True for BatchNorm/SyncBatchNorm (any dim) and frozen BN variants with running stats."""
    if isinstance(module, _BatchNorm):
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


def fold_bn_scale(matrix: Tensor, scale: Tensor) -> Tensor:
    """W' = Γ W: row i of a (m, n) matrix scaled by scale[i] (shape (m,))."""
    return matrix * scale.to(matrix.dtype)[:, None]


def unfold_bn_scale(folded: Tensor, scale: Tensor, eps: float = BNR_EPS) -> Tensor:
    """Recover a conv weight from a projected folded weight, paper eq. 16.

    W = (Γ² + εI)⁻¹ Γ W'_k, i.e. row i scaled by a_i / (a_i² + ε).
    """
    return folded * unfold_factor(scale.to(folded.dtype), eps)[:, None]


def unfold_factor(scale: Tensor, eps: float = BNR_EPS) -> Tensor:
    """Per-row factor a / (a² + ε) of paper eq. 16, shape (m,)."""
    return scale / (scale * scale + eps)
