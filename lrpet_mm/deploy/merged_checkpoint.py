"""The latency-aware merge as a config + checkpoint, so mmdeploy (and every stock tool) can load it.

:func:`~lrpet_mm.deploy.latency.latency_aware_merge` changes a model in memory; mmdeploy's
``torch2onnx`` (``tools/deploy.py``) builds its model from a config file and a checkpoint file.
:func:`latency_merge_checkpoint` therefore loads the compact pair written by
``tools/factorize.py``, times every low-rank layer against its merged dense layer at the
deployment input size, and writes ``<name>_merged.py`` / ``<name>_merged.pth``: the same
compact config with the merged layers moved from ``ranks`` to ``merged`` in their
``LRPETFactorized`` component (a dense conv with the folded BN bias, see
:mod:`lrpet_mm.models.factorized_module`), and the merged weights. Both files are written to
temporary files and renamed, so a failure leaves no partial output.

The timing forward is the model's test-time tensor forward
(:class:`~lrpet_mm.engine.flops.TensorForward`: backbone, neck and heads, for a two-stage
detector on the RPN's ``max_per_img`` proposals) on an all-zero image of the deployment size,
so every low-rank layer of a whole-model compact model is timed at its real input shape;
layers it does not call (an auxiliary head) stay factorized (listed in ``not_called``).
"""
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from mmengine.config import Config
from torch import nn

from ..engine.flops import TensorForward
from ..engine.input_shape import resolve_input_shape
from ..models.loading import load_config, load_model_and_checkpoint
from ..utils.atomic import atomic_path, check_writable_dir
from .latency import RUNTIMES, LatencyMergeResult, latency_aware_merge, low_rank_layers

PathLike = Union[str, os.PathLike]


@dataclass
class MergedCheckpoint:
    """What :func:`latency_merge_checkpoint` wrote: the merged pair and the measurements."""
    config_path: Path
    checkpoint_path: Path
    merge: LatencyMergeResult
    input_shape: Tuple[int, int, int]


def merged_config(cfg: Config, merged: Sequence[str]) -> Config:
    """A copy of the compact config ``cfg`` in which each layer of ``merged`` (full module
    names, e.g. ``'backbone.layer4.0.conv2'``) is moved from its ``LRPETFactorized``
    component's ``ranks`` to its ``merged`` list."""
    new = copy.deepcopy(cfg)
    for name in merged:
        component, _, relative = name.partition('.')
        spec = new.model.get(component)
        if not (isinstance(spec, dict) and spec.get('type') == 'LRPETFactorized'
                and relative in spec.get('ranks', {})):
            raise KeyError(f'merged layer {name!r} is not a factorized layer of the config '
                           f'(no LRPETFactorized {component!r} with rank for {relative!r})')
        spec['ranks'].pop(relative)
        spec['merged'] = sorted(set(spec.get('merged') or []) | {relative})
    return new


def write_merged_checkpoint(cfg: Config, model: nn.Module, merged: Sequence[str], meta: dict,
                            out_dir: PathLike, name: str) -> Tuple[Path, Path]:
    """Write ``out_dir/<name>_merged.py`` (:func:`merged_config` of ``cfg``) and
    ``out_dir/<name>_merged.pth`` (``model``'s state dict, whose ``merged`` layers are dense,
    and ``meta``), atomically; returns the two paths."""
    new_cfg = merged_config(cfg, merged)
    out_dir = check_writable_dir(out_dir)
    cfg_path, ckpt_path = out_dir / f'{name}_merged.py', out_dir / f'{name}_merged.pth'
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(ckpt_path) as tmp_ckpt, atomic_path(cfg_path) as tmp_cfg:
        torch.save(dict(state_dict=state, meta=meta), tmp_ckpt)
        new_cfg.dump(str(tmp_cfg))
    return cfg_path, ckpt_path


def tensor_forward_example(shape: Sequence[int]) -> Callable[[nn.Module], None]:
    """The merge's timing forward: ``model``'s test-time tensor forward on an all-zero image
    of ``shape`` = (C, H, W), as an ``example`` for :func:`latency_aware_merge`."""
    image = torch.zeros(1, *shape)

    def example(m: nn.Module) -> None:
        TensorForward(m, shape)(image)
    return example


def latency_merge_checkpoint(config: PathLike, checkpoint: PathLike, out_dir: PathLike,
                             input_shape: Optional[Sequence[int]] = None,
                             name: Optional[str] = None, cfg_options: Optional[dict] = None,
                             runtime: str = 'onnxruntime', repeats: int = 10, warmup: int = 2,
                             margin: float = 0.05, threads: Optional[int] = None
                             ) -> MergedCheckpoint:
    """Latency-aware merge of the compact pair ``config`` / ``checkpoint`` (from
    ``tools/factorize.py``) at ``input_shape`` (C, H, W; default the config's test size),
    timed in ``runtime`` on this machine; writes ``out_dir/<name>_merged.{py,pth}`` (``name``
    defaults to the config's file stem) even when no layer was merged, so the output pair is
    always the one to deploy.

    Raises:
        FileNotFoundError: missing config or checkpoint.
        ValueError: the checkpoint does not match the config, or the model has no low-rank
            layer (not a compact model), or bad timing settings.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f'runtime must be one of {RUNTIMES}, got {runtime!r}')
    cfg = load_config(config, cfg_options)
    model, ckpt = load_model_and_checkpoint(cfg, checkpoint, config)
    model = model.float().cpu().eval()
    if not low_rank_layers(model):
        raise ValueError(f'config {os.fspath(config)!r} builds no low-rank layer: the '
                         'latency-aware merge applies to a compact model from '
                         'tools/factorize.py')
    shape = resolve_input_shape(cfg, input_shape)
    result = latency_aware_merge(model, tensor_forward_example(shape), runtime=runtime,
                                 repeats=repeats, warmup=warmup, margin=margin, threads=threads,
                                 inplace=True)
    meta = dict(ckpt.get('meta') or {})
    meta['lrpet_latency_merge'] = dict(result.to_dict(), input_shape=list(shape),
                                       merged=result.merged,
                                       source_checkpoint=os.path.abspath(checkpoint))
    name = name or Path(os.fspath(config)).stem
    cfg_path, ckpt_path = write_merged_checkpoint(cfg, model, result.merged, meta, out_dir,
                                                  name)
    return MergedCheckpoint(cfg_path, ckpt_path, result, shape)
