"""Inference factorization: a rank-k conv (+ its BN, folded) becomes two cascaded convs, a
rank-k linear layer two cascaded linear layers.

For a conv weight W (m = n_out, n = n_in·kh·kw) followed by a BN with scale a = γ/sqrt(v+eps),
the folded weight is W' = diag(a)·W and the folded bias b' = β + a·(b − μ). With the thin SVD
W' ≈ U_k Σ_k V_kᵀ:

* first conv: weight Σ_k^{1/2} V_kᵀ reshaped to (k, n_in, kh, kw), the original stride, padding,
  dilation and padding mode, no bias;
* second conv: 1×1, weight U_k Σ_k^{1/2} reshaped to (m, k, 1, 1), bias b'.

A linear layer with weight W (m = out, n = in) and thin SVD U_k Σ_k V_kᵀ becomes
``nn.Linear(n, k, bias=False)`` with weight Σ_k^{1/2} V_kᵀ, then ``nn.Linear(k, m)`` with weight
U_k Σ_k^{1/2} and the original bias (none if the original had none): :class:`LowRankLinear`,
state-dict keys ``<name>.0.weight``, ``<name>.1.weight`` (and ``<name>.1.bias``).

Parameters go from m·n to k·(m + n); so do the multiply-adds per output pixel or token.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from .batchnorm import bn_folded_matrix, bn_scale
from .projection import conv_weight_as_matrix


class LowRankConv2d(nn.Sequential):
    """Two cascaded convs replacing one conv (+ BN): ``reduce`` (k filters) then ``expand`` (1×1).

    A plain ``nn.Sequential`` subclass so it is traced, counted and exported like any other
    module; its state dict keys are ``<name>.0.weight`` and ``<name>.1.weight/bias``.
    """

    @property
    def rank(self) -> int:
        return self[0].out_channels


class LowRankLinear(nn.Sequential):
    """Two cascaded linear layers replacing one: ``reduce`` (in → k, no bias) then ``expand``
    (k → out, the original bias).

    A plain ``nn.Sequential`` subclass like :class:`LowRankConv2d`; state dict keys
    ``<name>.0.weight``, ``<name>.1.weight`` and ``<name>.1.bias``. It applies to the last
    dimension of any input, as ``nn.Linear`` does.
    """

    @property
    def rank(self) -> int:
        return self[0].out_features


#: The factorized pair types (convs and linear layers).
LOW_RANK_TYPES = (LowRankConv2d, LowRankLinear)


@dataclass
class FoldedConv:
    """A conv's weight and bias with its BN folded in: weight (m, n_in, kh, kw), bias (m,)."""
    weight: Tensor
    bias: Tensor


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, norm: Optional[nn.Module] = None) -> FoldedConv:
    """Fold an eval-mode BN into the preceding conv (in float64)."""
    weight = conv.weight.detach().double()
    bias = (conv.bias.detach().double() if conv.bias is not None else
            torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
    if norm is None:
        return FoldedConv(weight, bias)
    a = bn_scale(norm).double()
    beta = norm.bias.detach().double() if getattr(norm, 'bias', None) is not None else 0.0
    mean = norm.running_mean.detach().double()
    return FoldedConv(bn_folded_matrix(weight, norm).view_as(weight), beta + a * (bias - mean))


@torch.no_grad()
def relative_rank_k_error(conv: nn.Conv2d, rank: int, norm: Optional[nn.Module] = None) -> float:
    """‖W' − P_k(W')‖_F / ‖W'‖_F of the (BN-folded) weight: 0 for an exactly rank-k layer."""
    matrix = conv_weight_as_matrix(fold_conv_bn(conv, norm).weight)
    return _tail_ratio(torch.linalg.svdvals(matrix.cpu()), rank)


def _tail_ratio(singular_values: Tensor, rank: int) -> float:
    total = float(singular_values.pow(2).sum())
    if total == 0.0:
        return 0.0
    return (float(singular_values[rank:].pow(2).sum()) / total) ** 0.5


@dataclass
class ConvFactorization:
    """A factorized conv (or linear layer) and the relative rank-k error of the weight it was
    made from."""
    pair: nn.Sequential
    relative_error: float


@torch.no_grad()
def factorize_conv_checked(conv: nn.Conv2d, rank: int,
                           norm: Optional[nn.Module] = None) -> ConvFactorization:
    """:func:`factorize_conv` plus the relative rank-k error, from one float64 SVD."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise ValueError(f'can only factorize a Conv2d with groups=1, got {conv!r}')
    if not 1 <= rank <= min(conv.out_channels, conv.weight[0].numel()):
        raise ValueError(f'rank {rank} out of range for {conv!r}')
    folded = fold_conv_bn(conv, norm)
    u, s, vh = torch.linalg.svd(conv_weight_as_matrix(folded.weight), full_matrices=False)
    error = _tail_ratio(s, rank)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    n_out, n_in, *kernel = conv.weight.shape
    reduce = nn.Conv2d(n_in, rank, tuple(kernel), stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, groups=1, bias=False,
                       padding_mode=conv.padding_mode)
    expand = nn.Conv2d(rank, n_out, 1, bias=True)
    factory = dict(dtype=conv.weight.dtype, device=conv.weight.device)
    reduce.to(**factory)
    expand.to(**factory)
    reduce.weight.copy_((root[:, None] * vh).reshape(rank, n_in, *kernel))
    expand.weight.copy_((u * root).reshape(n_out, rank, 1, 1))
    expand.bias.copy_(folded.bias)
    return ConvFactorization(LowRankConv2d(reduce, expand), error)


def _check_linear(linear: nn.Module, rank: int) -> None:
    if not isinstance(linear, nn.Linear):
        raise ValueError(f'can only factorize an nn.Linear here, got {linear!r}')
    if not 1 <= rank <= min(linear.out_features, linear.in_features):
        raise ValueError(f'rank {rank} out of range for {linear!r}')


@torch.no_grad()
def factorize_linear_checked(linear: nn.Linear, rank: int) -> ConvFactorization:
    """:func:`factorize_linear` plus the relative rank-k error, from one float64 SVD."""
    _check_linear(linear, rank)
    weight = linear.weight.detach().double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    error = _tail_ratio(s, rank)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    factory = dict(dtype=linear.weight.dtype, device=linear.weight.device)
    reduce = nn.Linear(linear.in_features, rank, bias=False, **factory)
    expand = nn.Linear(rank, linear.out_features, bias=linear.bias is not None, **factory)
    reduce.weight.copy_(root[:, None] * vh)
    expand.weight.copy_(u * root)
    if linear.bias is not None:
        expand.bias.copy_(linear.bias.detach())
    return ConvFactorization(LowRankLinear(reduce, expand), error)


def factorize_linear(linear: nn.Linear, rank: int) -> LowRankLinear:
    """Replace ``linear`` by two cascaded linear layers of inner width ``rank`` (see the module
    docstring): exact when its weight has rank <= ``rank``, the best rank-``rank``
    approximation otherwise. Same dtype and device as ``linear``."""
    return factorize_linear_checked(linear, rank).pair


@torch.no_grad()
def factorize_layer_checked(module: nn.Module, rank: int,
                            norm: Optional[nn.Module] = None) -> ConvFactorization:
    """:func:`factorize_conv_checked` for a conv, :func:`factorize_linear_checked` for a linear
    layer (which takes no norm: a BatchNorm is never folded into a linear layer)."""
    if isinstance(module, nn.Linear):
        if norm is not None:
            raise ValueError(f'cannot fold norm {type(norm).__name__} into linear layer '
                             f'{module!r}: only conv + BatchNorm pairs are folded')
        return factorize_linear_checked(module, rank)
    return factorize_conv_checked(module, rank, norm)


def factorize_conv(conv: nn.Conv2d, rank: int,
                   norm: Optional[nn.Module] = None) -> LowRankConv2d:
    """Replace ``conv`` (and ``norm``, folded) by two cascaded convs of inner width ``rank``.

    The result reproduces ``norm(conv(x))`` (eval-mode BN) exactly when the folded weight has
    rank <= ``rank``, and is the best rank-``rank`` approximation otherwise. It has the dtype
    and device of ``conv``.
    """
    return factorize_conv_checked(conv, rank, norm).pair


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (must exist) by ``module``."""
    parent_name, _, child = name.rpartition('.')
    parent = root.get_submodule(parent_name) if parent_name else root
    if not hasattr(parent, child):
        raise AttributeError(f'{type(root).__name__} has no submodule {name!r}')
    setattr(parent, child, module)


def empty_factorized_conv(conv: nn.Conv2d, rank: int) -> LowRankConv2d:
    """A :class:`LowRankConv2d` with the geometry :func:`factorize_conv` gives ``conv``."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise ValueError(f'cannot factorize {conv!r}: only Conv2d with groups=1')
    if not 1 <= rank <= min(conv.out_channels, conv.weight[0].numel()):
        raise ValueError(f'rank {rank} out of range for {conv!r}')
    reduce = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, bias=False,
                       padding_mode=conv.padding_mode)
    expand = nn.Conv2d(rank, conv.out_channels, 1, bias=True)
    return LowRankConv2d(reduce, expand)


def empty_factorized_linear(linear: nn.Linear, rank: int) -> LowRankLinear:
    """A :class:`LowRankLinear` with the geometry :func:`factorize_linear` gives ``linear``."""
    _check_linear(linear, rank)
    return LowRankLinear(nn.Linear(linear.in_features, rank, bias=False),
                         nn.Linear(rank, linear.out_features, bias=linear.bias is not None))


def empty_factorized_layer(module: nn.Module, rank: int) -> nn.Sequential:
    """:func:`empty_factorized_linear` for a linear layer, :func:`empty_factorized_conv`
    otherwise."""
    if isinstance(module, nn.Linear):
        return empty_factorized_linear(module, rank)
    return empty_factorized_conv(module, rank)


def empty_merged_layer(module: nn.Module) -> nn.Module:
    """The dense layer a latency-aware merge puts back in place of ``module``'s low-rank pair:
    a conv of ``module``'s geometry *with* bias (the pair's folded BN bias), or a linear layer
    with ``module``'s bias setting (as :func:`~lrpet_mm.deploy.merge_low_rank` builds them)."""
    if isinstance(module, nn.Linear):
        _check_linear(module, 1)
        return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        raise ValueError(f'cannot merge {module!r}: only Conv2d with groups=1 or Linear')
    return nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                     stride=module.stride, padding=module.padding, dilation=module.dilation,
                     bias=True, padding_mode=module.padding_mode)


def _get_layer(module: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:
        raise KeyError(f'{what} layer {name!r} does not exist in '
                       f'{type(module).__name__}') from None


def apply_factorized_structure(module: nn.Module, ranks: Dict[str, int],
                               folded_norms: Optional[Dict[str, str]] = None,
                               merged: Optional[Sequence[str]] = None) -> nn.Module:
    """Swap convs and linear layers for low-rank pairs (``ranks``) or, for the layers a
    latency-aware merge put back (``merged``), for dense layers with bias; folded BNs (of
    either kind of layer) for identities. In place; returns module."""
    merged = list(merged or [])
    both = sorted(set(ranks) & set(merged))
    if both:
        raise ValueError(f'layers {both} are listed both as factorized (ranks) and as merged')
    linears = set()
    for name, rank in ranks.items():
        layer = _get_layer(module, name, 'factorized')
        if isinstance(layer, nn.Linear):
            linears.add(name)
        set_submodule(module, name, empty_factorized_layer(layer, int(rank)))
    for name in merged:
        layer = _get_layer(module, name, 'merged')
        if isinstance(layer, nn.Linear):
            linears.add(name)
        set_submodule(module, name, empty_merged_layer(layer))
    for conv_name, norm_name in (folded_norms or {}).items():
        if conv_name not in ranks and conv_name not in merged:
            raise KeyError(f'folded norm {norm_name!r} belongs to {conv_name!r}, which is '
                           'neither factorized nor merged')
        if conv_name in linears:
            raise ValueError(f'folded norm {norm_name!r} belongs to linear layer {conv_name!r}: '
                             'only conv + BatchNorm pairs are folded')
        set_submodule(module, norm_name, nn.Identity())
    return module
