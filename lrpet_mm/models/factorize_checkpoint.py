"""The factorize pipeline: from a config + LRPET checkpoint to a compact config + checkpoint that
the upstream tools load."""
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from mmengine.config import Config
from torch import nn

from ..engine.checkpoint_meta import META_KEY, load_checkpoint_file, rank_plan_from_checkpoint
from ..engine.settings import LRPETSettings
from ..lowrank import RankPlan
from ..utils.atomic import atomic_path, check_writable_dir
from .compact_model import CompactModel, factorize_model
from .loading import PathLike, build_model_from_config, load_config, load_state_dict_strict


def plan_for(model: nn.Module, checkpoint: dict, cfg: Config, where: str,
             rank_ratio: Optional[float] = None, flops_reduction: Optional[float] = None,
             flops_input_shape: Optional[Sequence[int]] = None
             ) -> Tuple[RankPlan, Optional[dict]]:
    """``(plan, FLOPs planning info or None)``: the checkpoint's stored plan (and FLOPs info);
    or, with ``rank_ratio`` / ``flops_reduction``, the plan the config's ``LRPETHook`` makes
    with that budget instead (its scope, patterns, rounding and ``flops_input_shape``;
    ``flops_input_shape`` given here overrides the hook's)."""
    if rank_ratio is None and flops_reduction is None:
        state = (checkpoint.get('meta') or {}).get(META_KEY) or {}
        return rank_plan_from_checkpoint(checkpoint, where), state.get('flops')
    if rank_ratio is not None and flops_reduction is not None:
        raise ValueError('give at most one of rank_ratio and flops_reduction')
    settings = LRPETSettings.from_config(cfg) or LRPETSettings(rank_ratio=0.0)
    settings = settings.replace(rank_ratio=rank_ratio, flops_reduction=flops_reduction)
    if flops_input_shape is not None:
        settings = settings.replace(flops_input_shape=flops_input_shape)
    plan, result = settings.plan(model, settings.select_targets(model), cfg)
    return plan, None if result is None else result.to_dict()


def compact_config(cfg: Config, compact: CompactModel) -> Config:
    """A copy of ``cfg`` whose components build the compact structure (no LRPETHook)."""
    new = copy.deepcopy(cfg)
    for component, spec in compact.components.items():
        if component not in new.model:
            raise KeyError(f'model config has no {component!r} entry to factorize')
        new.model[component] = dict(type='LRPETFactorized', module=new.model[component],
                                    ranks=spec['ranks'], folded_norms=spec['folded_norms'])
    imports = list((new.get('custom_imports') or {}).get('imports', []))
    if 'lrpet_mm' not in imports:
        imports.append('lrpet_mm')
    new.custom_imports = dict(imports=imports, allow_failed_imports=False)
    new.custom_hooks = [h for h in (new.get('custom_hooks') or [])
                        if h.get('type') != 'LRPETHook']
    new.load_from = None
    new.resume = False
    return new


@dataclass
class FactorizeOutput:
    """What :func:`factorize_checkpoint` wrote and built; ``flops`` is the FLOPs planning info
    of a ``flops_reduction`` plan (input shape, FLOPs before / after), else None."""
    config_path: Path
    checkpoint_path: Path
    compact: CompactModel
    original: nn.Module
    flops: Optional[dict] = None


def factorize_checkpoint(config: PathLike, checkpoint: PathLike, out_dir: PathLike,
                         tol: float = 1e-3, force: bool = False,
                         rank_ratio: Optional[float] = None,
                         flops_reduction: Optional[float] = None,
                         flops_input_shape: Optional[Sequence[int]] = None,
                         name: Optional[str] = None,
                         cfg_options: Optional[dict] = None) -> FactorizeOutput:
    """Write ``out_dir/<name>_lowrank.py`` and ``out_dir/<name>_lowrank.pth``.

    ``name`` defaults to the config's file stem; ``cfg_options`` are merged into the config
    (and so into the compact config). Both files are written to temporary files and renamed,
    so a failure leaves no partial output.
    """
    cfg = load_config(config, cfg_options)
    out_dir = check_writable_dir(out_dir)
    ckpt = load_checkpoint_file(checkpoint)
    where = f'checkpoint {os.fspath(checkpoint)!r}'
    model = build_model_from_config(cfg)
    load_state_dict_strict(model, ckpt, where)
    plan, flops = plan_for(model, ckpt, cfg, where, rank_ratio, flops_reduction,
                           flops_input_shape)
    compact = factorize_model(model, plan, tol=tol, force=force)
    new_cfg = compact_config(cfg, compact)

    name = name or Path(os.fspath(config)).stem
    cfg_path = out_dir / f'{name}_lowrank.py'
    ckpt_path = out_dir / f'{name}_lowrank.pth'
    meta = dict(ckpt.get('meta') or {})
    meta['lrpet_factorized'] = dict(
        source_checkpoint=os.path.abspath(os.fspath(checkpoint)),
        layers=[dict(name=layer.name, rank=layer.rank, folded_norm=layer.folded_norm,
                     relative_error=layer.relative_error) for layer in compact.layers],
        components=compact.components, flops=flops)
    state = {k: v.detach().cpu() for k, v in compact.model.state_dict().items()}
    with atomic_path(ckpt_path) as tmp_ckpt, atomic_path(cfg_path) as tmp_cfg:
        torch.save(dict(state_dict=state, meta=meta), tmp_ckpt)
        new_cfg.dump(str(tmp_cfg))
    return FactorizeOutput(cfg_path, ckpt_path, compact, model, flops)
