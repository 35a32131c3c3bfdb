"""Turn a model whose projected convs / linear layers are exactly low-rank into the compact
model."""
import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from ..lowrank import RankPlan, find_conv_norm_pairs, relative_rank_k_error
from ..lowrank.batchnorm import has_running_stats, is_batch_norm
from ..lowrank.factorize import factorize_layer_checked, set_submodule
from ..lowrank.targets import layer_kind


class NotLowRankError(ValueError):
    """The weights are not low-rank at the planned ranks (not trained with LRPET, wrong plan)."""


@dataclass
class FactorizedLayer:
    """One conv or linear layer replaced by a low-rank pair.

    Attributes:
        name: module name in the model.
        rank: k.
        folded_norm: name of the BN folded into the pair, or None (always None for a linear
            layer).
        relative_error: ‖W' − P_k(W')‖_F / ‖W'‖_F of the (BN-folded) weight before factorizing.
        kind: ``'conv'`` or ``'linear'``.
    """
    name: str
    rank: int
    folded_norm: Optional[str]
    relative_error: float
    kind: str = 'conv'


@dataclass
class CompactModel:
    """Result of :func:`factorize_model`.

    Attributes:
        model: the compact model (a modified deep copy, eval mode).
        layers: the factorized layers in plan order.
        components: ``{top-level component: {'ranks': {...}, 'folded_norms': {...}}}`` with
            names relative to the component, i.e. the arguments of ``LRPETFactorized``.
    """
    model: nn.Module
    layers: List[FactorizedLayer] = field(default_factory=list)
    components: Dict[str, dict] = field(default_factory=dict)


def describe_layers(layers: List[FactorizedLayer]) -> str:
    """``'20 convs'``, ``'24 linear layers'`` or ``'1 conv and 24 linear layers'``."""
    convs = sum(1 for layer in layers if layer.kind == 'conv')
    linears = len(layers) - convs
    parts = []
    if convs or not linears:
        parts.append(f'{convs} conv{"" if convs == 1 else "s"}')
    if linears:
        parts.append(f'{linears} linear layer{"" if linears == 1 else "s"}')
    return ' and '.join(parts)


def planned_layers(model: nn.Module, plan: RankPlan) -> List[FactorizedLayer]:
    """Each planned conv with the BN to fold into it (found by structure; only a BN with
    running stats is folded), and each planned linear layer (nothing folded).
    ``relative_error`` is NaN until measured."""
    pairs = find_conv_norm_pairs(model)
    layers = []
    for layer in plan.layers.values():
        try:
            module = model.get_submodule(layer.name)
        except AttributeError:
            raise KeyError(f'the rank plan names {layer.name!r}, which the model does not '
                           'have (config/checkpoint mismatch?)') from None
        kind = layer_kind(module)
        norm_name = pairs.get(layer.name) if kind == 'conv' else None
        norm = model.get_submodule(norm_name) if norm_name else None
        if norm is not None and not (is_batch_norm(norm) and has_running_stats(norm)):
            norm_name = None
        layers.append(FactorizedLayer(layer.name, layer.rank, norm_name, float('nan'), kind))
    return layers


def measure_rank_errors(model: nn.Module, plan: RankPlan) -> List[FactorizedLayer]:
    """:func:`planned_layers` with each layer's relative rank-k error measured."""
    layers = planned_layers(model, plan)
    for layer in layers:
        norm = model.get_submodule(layer.folded_norm) if layer.folded_norm else None
        layer.relative_error = relative_rank_k_error(model.get_submodule(layer.name),
                                                     layer.rank, norm)
    return layers


@torch.no_grad()
def factorize_model(model: nn.Module, plan: RankPlan, tol: float = 1e-3,
                    force: bool = False) -> CompactModel:
    """Factorize every planned conv (BN folded) of ``model`` into two cascaded convs, and
    every planned linear layer into two cascaded linear layers.

    Args:
        model: the projected model (its weights are left untouched: a deep copy is modified).
        plan: the rank plan (from the checkpoint's meta, usually).
        tol: largest accepted relative rank-k error per layer. Defaults to 1e-3.
        force: factorize even when some layer exceeds ``tol`` (its best rank-k approximation
            is used). Defaults to False.

    Raises:
        NotLowRankError: some layer's weight is not rank-k within ``tol`` and not ``force``.
    """
    compact = copy.deepcopy(model).eval()
    layers = planned_layers(compact, plan)
    pairs = {}
    for layer in layers:  # one SVD per layer gives both the error and the factors
        conv = compact.get_submodule(layer.name)
        norm = compact.get_submodule(layer.folded_norm) if layer.folded_norm else None
        result = factorize_layer_checked(conv, layer.rank, norm)
        layer.relative_error = result.relative_error
        pairs[layer.name] = result.pair
    bad = [layer for layer in layers if layer.relative_error > tol]
    if bad and not force:
        rows = '\n'.join(f'  {layer.name}: rank {layer.rank}, relative error '
                         f'{layer.relative_error:.3e}' for layer in bad)
        raise NotLowRankError(
            f'{len(bad)} of {len(layers)} layers are not low-rank at their planned rank '
            f'(tolerance {tol:g}); was the checkpoint trained with LRPETHook and this plan? '
            f'Use --force to factorize anyway (accuracy will drop).\n{rows}')
    result = CompactModel(compact, layers)
    for layer in layers:
        set_submodule(compact, layer.name, pairs[layer.name])
        component, _, relative = layer.name.partition('.')
        spec = result.components.setdefault(component, dict(ranks={}, folded_norms={}))
        spec['ranks'][relative] = layer.rank
        if layer.folded_norm:
            set_submodule(compact, layer.folded_norm, nn.Identity())
            spec['folded_norms'][relative] = layer.folded_norm.partition('.')[2]
    return result
