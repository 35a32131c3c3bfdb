"""Compact models without training, for latency measurements and export tests.

A randomly initialised model is planned like the hook plans it (``rank_ratio`` or
``flops_reduction``), each planned conv weight is replaced by a random matrix of exactly rank k
(what LRPET's last projection leaves; a BN folded in afterwards scales rows only, so the folded
weight keeps rank ≤ k) and the model is factorized exactly with
:func:`~lrpet_mm.models.factorize_model`. Latency depends on shapes, not on trained values.
"""
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from mmengine.config import Config
from torch import nn

from lrpet_mm.engine import LRPETSettings
from lrpet_mm.lowrank import RankPlan
from lrpet_mm.lowrank.batchnorm import is_batch_norm
from lrpet_mm.models.compact_model import CompactModel, factorize_model
from lrpet_mm.models.factorize_checkpoint import plan_for
from lrpet_mm.models.loading import build_model_from_config


def random_init_config(config: Union[str, os.PathLike]) -> Config:
    """``config`` with random init (no download) and plain BN where it has SyncBN (one CPU
    process; the same state dict, and what mmdeploy exports)."""
    cfg = Config.fromfile(str(config))
    cfg.model.backbone.init_cfg = None
    if 'pretrained' in cfg.model:
        cfg.model.pretrained = None
    for part in ('backbone', 'decode_head', 'auxiliary_head'):
        module = cfg.model.get(part)
        if isinstance(module, dict) and module.get('norm_cfg', {}).get('type') == 'SyncBN':
            module.norm_cfg = dict(type='BN', requires_grad=True)
    return cfg


@dataclass
class SyntheticCompact:
    """``original``: the random model with its planned convs of rank k (eval mode);
    ``compact``: its exact factorization; ``plan``: the ranks."""
    original: nn.Module
    compact: CompactModel
    plan: RankPlan


@torch.no_grad()
def randomize_batchnorms(model: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial affine parameters and running statistics (so folding them
    is actually exercised), in place."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if is_batch_norm(module) and getattr(module, 'running_var', None) is not None:
            n = module.running_var.numel()
            module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            module.running_var.copy_(0.5 + torch.rand(n, generator=g))
            if getattr(module, 'weight', None) is not None:
                module.weight.copy_(0.5 + torch.rand(n, generator=g))
            if getattr(module, 'bias', None) is not None:
                module.bias.copy_(0.1 * torch.randn(n, generator=g))


@torch.no_grad()
def make_planned_convs_low_rank(model: nn.Module, plan: RankPlan, seed: int = 0) -> None:
    """Replace each planned conv's (m, n) weight by a random rank-k matrix ``A·B`` (Gaussian
    factors, rescaled to the old weight's Frobenius norm), in place. Exactly rank k like a
    projected weight, without an SVD per layer."""
    g = torch.Generator().manual_seed(seed)
    for name, layer in plan.layers.items():
        conv = model.get_submodule(name)
        m, k = conv.weight.shape[0], layer.rank
        n = conv.weight[0].numel()
        product = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(
            k, n, generator=g, dtype=torch.float64)
        product *= conv.weight.detach().double().norm() / product.norm().clamp_min(1e-30)
        conv.weight.copy_(product.reshape(conv.weight.shape).to(conv.weight.dtype))


def synthetic_compact_model(cfg: Config, rank_ratio: Optional[float] = None,
                            flops_reduction: Optional[float] = None,
                            flops_input_shape: Optional[Sequence[int]] = None,
                            seed: int = 0) -> SyntheticCompact:
    """Build ``cfg.model`` with random weights, plan, make the planned convs rank k and
    factorize it.

    Without ``rank_ratio`` / ``flops_reduction`` the config's ``LRPETHook`` settings are used.
    ``flops_input_shape`` (C, H, W) defaults to the config's (as the hook).
    """
    if rank_ratio is None and flops_reduction is None:
        settings = LRPETSettings.from_config(cfg)
        if settings is None:
            raise ValueError('give rank_ratio or flops_reduction (the config has no LRPETHook '
                             'to read them from)')
        rank_ratio, flops_reduction = settings.rank_ratio, settings.flops_reduction
    torch.manual_seed(seed)
    model = build_model_from_config(cfg).cpu()
    randomize_batchnorms(model, seed)
    model.eval()
    plan, _ = plan_for(model, {}, cfg, 'random model', rank_ratio=rank_ratio,
                    flops_reduction=flops_reduction, flops_input_shape=flops_input_shape)
    make_planned_convs_low_rank(model, plan, seed)
    return SyntheticCompact(model, factorize_model(model, plan), plan)
