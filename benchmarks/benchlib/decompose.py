"""Decompose a trained (full-rank) model by truncated SVD, and fold the BatchNorms of a
factorized model into its 1×1 convs.

These are the building blocks of the classic *low-rank approximation* baseline (LRA:
decompose a trained network, then fine-tune it) and of training the factorized network from
scratch, which the quality benchmark compares with LRPET:

* :func:`decompose_model` replaces each planned conv (weight W viewed as an
  (n_out, n_in·kh·kw) matrix) by two cascaded convs carrying its best rank-k approximation
  U_k Σ_k V_kᵀ (Eckart–Young; first conv Σ_k^{1/2} V_kᵀ with the original stride / padding /
  dilation, second conv 1×1 U_k Σ_k^{1/2}); a planned linear layer likewise becomes two
  linear layers (:class:`~lrpet_mm.lowrank.LowRankLinear`). The BatchNorm after the conv is
  **kept** (not folded), so the decomposed model trains (fine-tunes) like the original, BN
  included. Unlike :func:`~lrpet_mm.models.factorize_model` it does not require the weights to
  be low-rank already: the truncation error is the point, and is reported per layer.
* :func:`fold_factorized_norms` folds each kept BN (eval statistics) into the 1×1 conv of its
  factorized pair and replaces the BN by ``nn.Identity``: the result has exactly the
  structure :func:`~lrpet_mm.models.factorize_model` gives an LRPET-trained model
  (``LRPETFactorized`` with ``folded_norms``), so all compact models are the same network.
"""
import copy
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from lrpet_mm.lowrank import RankPlan
from lrpet_mm.lowrank.batchnorm import has_running_stats, is_batch_norm
from lrpet_mm.lowrank.factorize import (
    LOW_RANK_TYPES,
    LowRankConv2d,
    factorize_layer_checked,
    fold_conv_bn,
    set_submodule,
)
from lrpet_mm.models.compact_model import CompactModel, FactorizedLayer, planned_layers

__all__ = ['DecomposedLayer', 'DecomposedModel', 'decompose_model', 'fold_factorized_norms',
           'components_of']


@dataclass
class DecomposedLayer:
    """One conv replaced by its truncated SVD.

    Attributes:
        name: module name in the model.
        rank: k.
        relative_error: ‖W − P_k(W)‖_F / ‖W‖_F, the truncation error of the (unfolded) weight.
        norm: name of the BatchNorm that follows the conv (kept in the model), or None.
    """
    name: str
    rank: int
    relative_error: float
    norm: Optional[str]

    @property
    def energy_kept(self) -> float:
        """‖P_k(W)‖_F² / ‖W‖_F²."""
        return 1.0 - self.relative_error ** 2


@dataclass
class DecomposedModel:
    """Result of :func:`decompose_model`.

    Attributes:
        model: the decomposed model (a modified deep copy; BNs kept).
        layers: the decomposed layers in plan order.
        components: ``{top-level component: {'ranks': {...}, 'folded_norms': {}}}`` (names
            relative to the component): the arguments of ``LRPETFactorized`` that build this
            structure with the BNs kept.
    """
    model: nn.Module
    layers: List[DecomposedLayer] = field(default_factory=list)
    components: Dict[str, dict] = field(default_factory=dict)


def components_of(ranks: Mapping[str, int],
                  folded_norms: Optional[Mapping[str, str]] = None) -> Dict[str, dict]:
    """Group model-level ``ranks`` / ``folded_norms`` by top-level component, with names
    relative to it: ``{'backbone': {'ranks': {'layer1.0.conv1': 32}, 'folded_norms': {...}}}``.
    """
    components: Dict[str, dict] = {}
    for name, rank in ranks.items():
        component, _, relative = name.partition('.')
        if not relative:
            raise ValueError(f'layer {name!r} is not inside a model component')
        spec = components.setdefault(component, dict(ranks={}, folded_norms={}))
        spec['ranks'][relative] = int(rank)
    for conv, norm in (folded_norms or {}).items():
        component, _, relative = conv.partition('.')
        norm_component, _, norm_relative = norm.partition('.')
        if component not in components or relative not in components[component]['ranks']:
            raise KeyError(f'folded norm {norm!r} belongs to {conv!r}, which is not factorized')
        if norm_component != component:
            raise ValueError(f'norm {norm!r} is not in the component of its conv {conv!r}')
        components[component]['folded_norms'][relative] = norm_relative
    return components


@torch.no_grad()
def decompose_model(model: nn.Module, plan: RankPlan) -> DecomposedModel:
    """Replace each planned conv of ``model`` by the two-conv truncated SVD of its weight.

    Args:
        model: a trained model with full-size convs (left untouched: a deep copy is modified).
        plan: the ranks (e.g. the plan LRPETHook makes for a FLOPs budget).

    Returns:
        :class:`DecomposedModel`. Its model computes, in place of each conv W, the conv with
        the best rank-k approximation of W (bias kept, in the 1×1 conv); the BatchNorms that
        follow are unchanged.
    """
    decomposed = copy.deepcopy(model)
    norms = {layer.name: layer.folded_norm for layer in planned_layers(decomposed, plan)}
    result = DecomposedModel(decomposed)
    pairs = {}
    for layer in plan.layers.values():
        conv = decomposed.get_submodule(layer.name)
        factorized = factorize_layer_checked(conv, layer.rank, None)
        pairs[layer.name] = factorized.pair.train(conv.training)
        result.layers.append(
            DecomposedLayer(layer.name, layer.rank, factorized.relative_error,
                            norms.get(layer.name)))
    for name, pair in pairs.items():
        set_submodule(decomposed, name, pair)
    result.components = components_of({layer.name: layer.rank for layer in result.layers})
    return result


@torch.no_grad()
def fold_factorized_norms(model: nn.Module, norms: Mapping[str, str],
                          copy_model: bool = True) -> CompactModel:
    """Fold each BatchNorm ``norms[conv]`` into the 1×1 conv of the factorized pair ``conv``.

    Args:
        model: a model whose convs named in ``norms`` are :class:`LowRankConv2d` pairs, each
            followed by a BatchNorm with running statistics (a decomposed or from-scratch
            factorized model after training).
        norms: ``{pair name: BN name}`` (model-level names).
        copy_model: modify a deep copy (default) rather than ``model`` itself.

    Returns:
        A :class:`CompactModel` (eval mode) whose ``components`` hold the ranks of *every*
        factorized pair in the model and the folded norms, i.e. the ``LRPETFactorized``
        arguments of the compact structure. Eval-mode outputs are unchanged (up to rounding).
    """
    compact = copy.deepcopy(model) if copy_model else model
    compact.eval()
    pairs = {name: module for name, module in compact.named_modules()
             if isinstance(module, LOW_RANK_TYPES)}
    ranks = {name: module.rank for name, module in pairs.items()}
    layers = []
    for conv_name, norm_name in norms.items():
        if conv_name not in ranks:
            raise KeyError(f'{conv_name!r} is not a factorized pair (LowRankConv2d) in the model')
        if not isinstance(pairs[conv_name], LowRankConv2d):
            raise ValueError(f'{conv_name!r} is a factorized linear layer (LowRankLinear): only '
                             'BatchNorms after factorized convs can be folded')
        norm = compact.get_submodule(norm_name)
        if not (is_batch_norm(norm) and has_running_stats(norm)):
            raise ValueError(f'{norm_name!r} is not a BatchNorm with running statistics '
                             f'({type(norm).__name__}); cannot fold it')
        expand = compact.get_submodule(conv_name)[1]
        if norm.num_features != expand.out_channels:
            raise ValueError(f'{norm_name!r} has {norm.num_features} channels but '
                             f'{conv_name!r} outputs {expand.out_channels}')
        folded = fold_conv_bn(expand, norm)
        if expand.bias is None:
            expand.bias = nn.Parameter(torch.zeros_like(expand.weight[:, 0, 0, 0]))
        expand.weight.copy_(folded.weight.to(expand.weight.dtype))
        expand.bias.copy_(folded.bias.to(expand.bias.dtype))
        set_submodule(compact, norm_name, nn.Identity())
        layers.append(FactorizedLayer(conv_name, ranks[conv_name], norm_name, 0.0))
    folded_names = {layer.name for layer in layers}
    for name, rank in ranks.items():
        if name not in folded_names:
            kind = 'conv' if isinstance(pairs[name], LowRankConv2d) else 'linear'
            layers.append(FactorizedLayer(name, rank, None, 0.0, kind))
    return CompactModel(compact, layers, components_of(ranks, dict(norms)))
