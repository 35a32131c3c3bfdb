"""The evidence benchmark's deployed whole models: each row's compact (or pruned) model of
seed 0 exported end to end with mmdeploy for ONNX Runtime, as ``tools/deploy.py`` would (the
latency-aware merge first, for a model with low-rank layers), and all of them timed together.

A pruned model has no config of its own (its widths are not expressible in the upstream
configs), so the export takes the model object: the steps of mmdeploy's ``torch2onnx`` with
the model given instead of built from a checkpoint (task processor, its input of the config's
test pipeline, ``mmdeploy.apis.onnx.export`` under the deploy config's rewriters).

Timing (:func:`time_deployed`): one ONNX Runtime session per row (mmdeploy's custom ops,
``threads`` intra-op threads) on the same preprocessed test-size image; ``rounds`` rounds, each
timing every session ``repeats`` times round-robin (:func:`interleaved_median_ms`), in a
shuffled order per round. A row's latency is the median of its round medians and its spread
the range of those; the baseline ONNX is loaded a second time as a row of its own
(``baseline_again``), so the agreement of identical architectures is measured in every run.
"""
from __future__ import annotations

import copy
import os
import random
import statistics
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from torch import nn

#: The second session on the baseline's ONNX (identical architecture and weights).
BASELINE_AGAIN = 'baseline_again'
#: ONNX Runtime intra-op threads of the timing (this machine's cores).
LATENCY_THREADS = 2
#: Identical architectures must agree within this (relative, median latency).
AGREEMENT_TARGET = 0.05


def merged_for_deployment(model: nn.Module, shape: Sequence[int], threads: int
                          ) -> Tuple[nn.Module, list]:
    """``tools/deploy.py``'s latency-aware merge (ONNX Runtime timing, its defaults) of a
    copy of ``model`` when it has low-rank layers; ``(model to export, merged layer names)``."""
    from lrpet_mm.deploy.latency import latency_aware_merge, low_rank_layers
    from lrpet_mm.deploy.merged_checkpoint import tensor_forward_example

    model = copy.deepcopy(model).float().cpu()
    model.eval()
    if not low_rank_layers(model):
        return model, []
    result = latency_aware_merge(model, tensor_forward_example(shape), runtime='onnxruntime',
                                 repeats=10, warmup=2, threads=threads, inplace=True)
    return result.model, list(result.merged)


def export_deployed(model: nn.Module, cfg, onnx_path: Path, shape: Sequence[int]
                    ) -> np.ndarray:
    """Export ``model`` (built from ``cfg``'s architecture, possibly pruned) end to end with
    mmdeploy for ONNX Runtime to ``onnx_path`` (atomically); returns the preprocessed input
    the export traced (1, C, H, W), float32, to time every row on."""
    from mmdeploy.apis.core.pipeline_manager import no_mp
    from mmdeploy.apis.onnx import export
    from mmdeploy.apis.utils import build_task_processor
    from mmdeploy.utils import get_dynamic_axes, get_onnx_config

    from lrpet_mm.deploy import roi_extractor  # noqa: F401 (the ScatterND-free rewriter)
    from lrpet_mm.deploy.mmdeploy_export import deploy_config, example_image

    deploy_cfg = deploy_config(cfg, 'onnxruntime', shape)
    processor = build_task_processor(cfg, deploy_cfg, 'cpu')
    model.eval()
    data, inputs = processor.create_input(
        example_image(cfg, shape), None,
        data_preprocessor=getattr(model, 'data_preprocessor', None))
    if isinstance(inputs, list) and len(inputs) == 1:
        inputs = inputs[0]
    onnx_cfg = get_onnx_config(deploy_cfg)
    names = onnx_cfg['input_names'] + onnx_cfg['output_names']
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='.deploy_', dir=onnx_path.parent) as tmp:
        with no_mp():
            export(model, inputs, output_path_prefix=os.path.join(tmp, 'end2end'),
                   backend='onnxruntime', input_metas=dict(data_samples=data['data_samples'],
                                                           mode='predict'),
                   context_info=dict(deploy_cfg=deploy_cfg),
                   input_names=onnx_cfg['input_names'], output_names=onnx_cfg['output_names'],
                   opset_version=onnx_cfg['opset_version'],
                   dynamic_axes=get_dynamic_axes(deploy_cfg, names),
                   keep_initializers_as_inputs=onnx_cfg['keep_initializers_as_inputs'],
                   optimize=onnx_cfg.get('optimize', False))
        exported = Path(tmp) / 'end2end.onnx'
        if not exported.is_file():
            raise RuntimeError(f'mmdeploy wrote no ONNX file for {onnx_path.name}')
        os.replace(exported, onnx_path)
    return inputs.detach().cpu().numpy().astype(np.float32)


def time_deployed(onnx_files: Mapping[str, Path], inputs: np.ndarray, threads: int = 2,
                  rounds: int = 5, repeats: int = 10, warmup: int = 3, seed: int = 0) -> dict:
    """Median latency (ms) of each deployed model and its round-to-round range, plus the
    agreement of the baseline's two sessions (see the module docstring)."""
    from lrpet_mm.deploy.mmdeploy_export import mmdeploy_ops_library
    from lrpet_mm.deploy.timing import interleaved_median_ms, ort_runner, ort_session

    if rounds < 1:
        raise ValueError(f'rounds must be >= 1, got {rounds}')
    files = dict(onnx_files)
    if 'baseline' in files:
        files[BASELINE_AGAIN] = files['baseline']
    library = mmdeploy_ops_library()
    runners = {key: ort_runner(ort_session(path, threads, library), inputs)
               for key, path in files.items()}
    order = list(runners)
    rng = random.Random(seed)
    by_round: Dict[str, list] = {key: [] for key in order}
    for i in range(rounds):
        rng.shuffle(order)
        times = interleaved_median_ms([runners[k] for k in order], repeats=repeats,
                                      warmup=warmup if i == 0 else 1)
        for key, ms in zip(order, times):
            by_round[key].append(ms)
    rows = {key: dict(median_ms=statistics.median(v), range_ms=[min(v), max(v)],
                      round_medians_ms=v) for key, v in by_round.items()}
    result = dict(rows=rows, threads=threads, rounds=rounds, repeats=repeats,
                  input_shape=list(inputs.shape[1:]), batch=int(inputs.shape[0]))
    if BASELINE_AGAIN in rows:
        a, b = rows['baseline']['median_ms'], rows[BASELINE_AGAIN]['median_ms']
        result['agreement'] = dict(pair=['baseline', BASELINE_AGAIN],
                                   relative_difference=abs(a / b - 1),
                                   target=AGREEMENT_TARGET,
                                   met=abs(a / b - 1) <= AGREEMENT_TARGET)
    return result


def latency_of(latency: Optional[dict], key: str) -> Optional[float]:
    """A row's median deployed latency (ms) from :func:`time_deployed`'s result, or None."""
    row = ((latency or {}).get('rows') or {}).get(key)
    return None if row is None else row.get('median_ms')
