"""From a config + LRPET checkpoint to a compact config + checkpoint loadable by upstream tools."""
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch import nn

from ..engine.checkpoint_meta import load_checkpoint_file, rank_plan_from_checkpoint
from ..engine.input_shape import resolve_input_shape
from ..engine.planning import plan_targets
from ..lowrank import RankPlan, select_targets
from ..utils.atomic import atomic_path, check_writable_dir
from .compact_model import CompactModel, factorize_model

PathLike = Union[str, os.PathLike]


def load_config(config: PathLike, cfg_options: Optional[dict] = None) -> Config:
    """``Config.fromfile`` (runs ``custom_imports``) with ``cfg_options`` merged in (as the
    ``--cfg-options`` of the mmdet / mmseg tools), and a clear error for a missing file."""
    if not os.path.isfile(config):
        raise FileNotFoundError(f'config {os.fspath(config)!r} does not exist')
    cfg = Config.fromfile(os.fspath(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_model_from_config(cfg: Config) -> nn.Module:
    """Build ``cfg.model`` in the config's default scope, without pretrained weight loading."""
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(copy.deepcopy(cfg.model))
    return model.eval()


def load_state_dict_strict(model: nn.Module, checkpoint: dict, where: str) -> None:
    """Load ``checkpoint['state_dict']`` with every key matched, or say which keys differ."""
    state = checkpoint.get('state_dict', checkpoint)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f'{where} does not match the config\'s model: missing keys '
            f'{result.missing_keys[:6]}{" ..." if len(result.missing_keys) > 6 else ""}, '
            f'unexpected keys {result.unexpected_keys[:6]}'
            f'{" ..." if len(result.unexpected_keys) > 6 else ""}')


def load_model_and_checkpoint(cfg: Config, checkpoint: PathLike, cfg_path: PathLike
                              ) -> Tuple[nn.Module, dict]:
    """Build ``cfg``'s model (no pretrained download) and load ``checkpoint`` with every key
    matched; returns ``(model in eval mode, checkpoint dict)``. Errors name both files."""

    ckpt = load_checkpoint_file(checkpoint)
    try:
        model = build_model_from_config(cfg)
    except Exception as e:
        raise ValueError(f'cannot build the model of config {os.fspath(cfg_path)!r} '
                         f'({type(e).__name__}: {e})') from e
    load_state_dict_strict(model, ckpt, f'checkpoint {os.fspath(checkpoint)!r} (config '
                                        f'{os.fspath(cfg_path)!r})')
    return model, ckpt


def hook_settings(cfg: Config) -> dict:
    """Arguments of the ``LRPETHook`` in ``cfg.custom_hooks`` (empty if none)."""
    for hook in cfg.get('custom_hooks', None) or []:
        if hook.get('type') == 'LRPETHook':
            return {k: v for k, v in hook.items() if k != 'type'}
    return {}


def plan_for(model: nn.Module, checkpoint: dict, cfg: Config, where: str,
             rank_ratio: Optional[float] = None, flops_reduction: Optional[float] = None,
             flops_input_shape: Optional[Sequence[int]] = None) -> RankPlan:
    """The checkpoint's stored plan; or, with ``rank_ratio`` / ``flops_reduction``, a plan
    made like the hook's (scope and patterns from the config's ``LRPETHook``)."""
    if rank_ratio is None and flops_reduction is None:
        return rank_plan_from_checkpoint(checkpoint, where)
    if rank_ratio is not None and flops_reduction is not None:
        raise ValueError('give at most one of rank_ratio and flops_reduction')
    settings = hook_settings(cfg)
    scope = settings.get('scope', 'backbone')
    selection = select_targets(model, scope, settings.get('include'), settings.get('exclude'),
                               settings.get('bn_rectify', True),
                               settings.get('unpaired', 'skip'), settings.get('frozen', 'skip'))
    shape = (resolve_input_shape(cfg, flops_input_shape, 'flops_input_shape')
             if flops_reduction is not None else None)
    plan, _ = plan_targets(model, selection, scope, rank_ratio, flops_reduction, shape,
                           settings.get('layer_ratios'), settings.get('min_rank', 1),
                           settings.get('rank_multiple', 1),
                           settings.get('rank_allocation', 'uniform')
                           if flops_reduction is not None else 'uniform')
    return plan


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
    config_path: Path
    checkpoint_path: Path
    compact: CompactModel
    original: nn.Module


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
    plan = plan_for(model, ckpt, cfg, where, rank_ratio, flops_reduction, flops_input_shape)
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
        components=compact.components)
    state = {k: v.detach().cpu() for k, v in compact.model.state_dict().items()}
    with atomic_path(ckpt_path) as tmp_ckpt, atomic_path(cfg_path) as tmp_cfg:
        torch.save(dict(state_dict=state, meta=meta), tmp_ckpt)
        new_cfg.dump(str(tmp_cfg))
    return FactorizeOutput(cfg_path, ckpt_path, compact, model)
