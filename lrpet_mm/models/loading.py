"""Load what a user's tools are given: a config (with ``--cfg-options``), the model it builds and
a checkpoint with every key matched. Used by the factorize pipeline, the report and deploy."""
import copy
import os
from typing import Optional, Tuple, Union

from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch import nn

from ..engine.checkpoint_meta import load_checkpoint_file

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
