"""Inference latency of the original vs the compact (factorized) model, CPU, batch 1.

Models (random weights, init/pretrained off; no training is needed for latency): the planned
convs get exactly rank-k weights at the ranks the project's planner picks for the config's
``flops_reduction`` (:func:`benchlib.synthetic.synthetic_compact_model`), then the
model is factorized exactly.

* ResNet-50 backbone of ``configs/lrpet/faster-rcnn_r50_fpn_lrpet_1x_voc0712.py`` (−50 %
  backbone FLOPs): eager PyTorch and onnxruntime (``lrpet_mm.deploy.export_onnx``, the
  backbone alone), at each of ``shapes``;
* the whole Faster R-CNN: eager tensor forward (``model._forward``: backbone, FPN, RPN with its
  NMS off so the RoI head always gets ``max_per_img`` = 1000 proposals, RoI head) at each of
  ``shapes``; and the model as users deploy it: mmdeploy's end-to-end ONNX (RPN, RoI head
  and NMS in the graph, :func:`lrpet_mm.deploy.mmdeploy_export.deploy_model`) in ONNX Runtime
  with mmdeploy's custom ops, at the config's test size padded like its data preprocessor
  (608×1024);
* the whole PSPNet R50-D8 of ``configs/lrpet/pspnet_r50-d8_lrpet_4xb4-20k_voc12aug-512x512.py``
  (−30 % backbone FLOPs): eager tensor forward (decode-head logits) at each of ``shapes``, and
  mmdeploy's end-to-end ONNX (logits resized, argmax) at its test size (512×512).

``quick`` runs the toy ResNet-18 configs of ``configs/lrpet/_toy_/`` instead, at 128×128 (their
end-to-end ONNX at their test sizes), to check the pipeline in seconds.

Variants, timed interleaved in one run: ``original``; ``factorized`` (every planned conv
factorized); ``latency-merged`` (:func:`lrpet_mm.deploy.latency_aware_merge` measured in the
same runtime, layout and input size: factorized layers slower than their merged conv are
merged back; for the mmdeploy rows the merged model is written as a config + checkpoint with
:mod:`lrpet_mm.deploy.merged_checkpoint`, as ``tools/deploy.py`` does). Eager PyTorch runs all
variants with every BN folded into its conv (onnxruntime folds them itself), so the comparison
measures the factorization, not BN folding, in each of ``layouts`` (``contiguous`` NCHW and
``channels_last``, oneDNN's fast path; the model weights and the input in the same layout).
Each latency is the median of ``repeats`` runs after ``warmup`` runs. FLOPs are counted by
mmengine.analysis (one multiply-add = one FLOP) on the models as run (for the whole models:
the eager tensor forward with 1000 RoIs; the deployed detector's RoI count depends on its NMS).

``allocator='retain'`` (the default) first calls
:func:`benchlib.cpu_allocator.retain_freed_memory` for the whole process, so eager PyTorch does not
page-fault its large activations in again on every forward (onnxruntime has its own arena);
``'default'`` leaves glibc as it is.

P3 (backbone rows): speedup ≥ 0.8 × the planned compact model's FLOPs ratio (original /
factorized), judged for both the factorized and the latency-merged variant.

:func:`run_benchmark` does the work; ``benchmarks/bench_inference.py`` is the command line.
"""
import contextlib
import datetime
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config
from torch import nn

from benchlib.common import REPO_ROOT, machine_info, write_results
from benchlib.cpu_allocator import retain_freed_memory
from benchlib.fold import fold_batchnorms
from benchlib.synthetic import SyntheticCompact, random_init_config, synthetic_compact_model
from lrpet_mm.deploy import (
    check_memory_format,
    default_threads,
    export_onnx,
    export_wrapper,
    interleaved_median_ms,
    latency_aware_merge,
    low_rank_layers,
    ort_runner,
    ort_session,
)
from lrpet_mm.deploy.merged_checkpoint import merged_config
from lrpet_mm.deploy.mmdeploy_export import deploy_model, mmdeploy_ops_library
from lrpet_mm.engine.flops import TensorForward, count_flops, fixed_proposal_count
from lrpet_mm.engine.input_shape import resolve_input_shape
from lrpet_mm.models import compact_config

CONFIGS = REPO_ROOT / 'configs' / 'lrpet'
DET_CONFIG = CONFIGS / 'faster-rcnn_r50_fpn_lrpet_1x_voc0712.py'
SEG_CONFIG = CONFIGS / 'pspnet_r50-d8_lrpet_4xb4-20k_voc12aug-512x512.py'
TOY_DET_CONFIG = CONFIGS / '_toy_' / 'faster-rcnn_r18_fpn_lrpet_toy_voc.py'
TOY_SEG_CONFIG = CONFIGS / '_toy_' / 'pspnet_r18-d8_lrpet_toy_voc12aug.py'
#: the whole-model configs (-50 % whole-model FLOPs: backbone, neck and heads factorized)
DET_MODEL_CONFIG = CONFIGS / 'faster-rcnn_r50_fpn_lrpet-model_1x_voc0712.py'
SEG_MODEL_CONFIG = CONFIGS / 'pspnet_r50-d8_lrpet-model_4xb4-20k_voc12aug-512x512.py'
TOY_DET_MODEL_CONFIG = CONFIGS / '_toy_' / 'faster-rcnn_r18_fpn_lrpet-model_toy_voc.py'
TOY_SEG_MODEL_CONFIG = CONFIGS / '_toy_' / 'pspnet_r18-d8_lrpet-model_toy_voc12aug.py'
FULL_INPUTS = ((3, 512, 512), (3, 800, 1333))
QUICK_INPUT = (3, 128, 128)
P3_FACTOR = 0.8
VARIANTS = ('original', 'factorized', 'latency-merged')
RUNTIMES = ('torch', 'onnxruntime')
ALLOCATORS = ('retain', 'default')
#: Whole-model parts: eager tensor forward of this scope, and mmdeploy's end-to-end graph.
WHOLE_PARTS = {'detector': 'mmdet', 'segmentor': 'mmseg'}


@dataclass
class Settings:
    """What to run. ``shapes`` are (C, H, W); ``threads`` None = all cores; ``deploy``:
    also time mmdeploy's end-to-end ONNX of the whole models (needs ``onnx``);
    ``whole_model``: also deploy the whole-model LRPET configs (their mmdeploy rows only);
    ``deployed_only``: only the mmdeploy rows (no eager or backbone rows)."""
    quick: bool = False
    shapes: Tuple[Tuple[int, int, int], ...] = FULL_INPUTS
    threads: Optional[int] = None
    repeats: int = 5
    warmup: int = 1
    merge_repeats: int = 5
    merge_margin: float = 0.05
    onnx: bool = True
    deploy: bool = True
    segmentor: bool = True
    whole_model: bool = True
    deployed_only: bool = False
    layouts: Tuple[str, ...] = ('contiguous', 'channels_last')
    allocator: str = 'retain'

    def __post_init__(self):
        if self.threads is None:
            self.threads = default_threads()
        for name in ('threads', 'repeats', 'merge_repeats'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.warmup < 0 or self.merge_margin < 0:
            raise ValueError('warmup and merge_margin must be >= 0')
        shapes = tuple(tuple(int(v) for v in s) for s in self.shapes)
        if not shapes or any(len(s) != 3 or min(s) <= 0 for s in shapes):
            raise ValueError(f'shapes must be (C, H, W) with positive sizes, got {self.shapes}')
        self.shapes = shapes
        self.layouts = tuple(self.layouts)
        if not self.layouts or len(set(self.layouts)) != len(self.layouts):
            raise ValueError(f'layouts must be distinct and not empty, got {self.layouts}')
        for layout in self.layouts:
            check_memory_format(layout)
        if self.allocator not in ALLOCATORS:
            raise ValueError(f'allocator must be one of {ALLOCATORS}, got {self.allocator!r}')
        if self.deployed_only and not (self.onnx and self.deploy):
            raise ValueError('deployed_only needs the mmdeploy rows (onnx and deploy on)')


def default_settings(quick: bool = False, **overrides) -> Settings:
    """Full run: 512x512 and 800x1333, 5 repeats; quick: the toy R-18 configs at 128x128,
    NCHW only, 2 repeats, 2 per-layer repeats. ``overrides`` that are None keep the default."""
    base = (dict(quick=True, shapes=(QUICK_INPUT, ), repeats=2, merge_repeats=2,
                 layouts=('contiguous', )) if quick else {})
    base.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**base)


def shape_text(shape: Sequence[int]) -> str:
    return 'x'.join(str(v) for v in shape)


# --------------------------------------------------------------------------- rows
def make_rows(label: str, part: str, shape: Sequence[int], runtime: str,
              times_ms: Dict[str, float], flops: Dict[str, int], merged_layers: int,
              low_rank: Dict[str, int], is_backbone: bool, layout: str = '') -> List[dict]:
    """The ``factorized`` and ``latency-merged`` rows of one measurement (``layout``: the eager
    memory format, '' for onnxruntime).

    ``times_ms`` / ``flops`` / ``low_rank`` are keyed by :data:`VARIANTS`. Speedup = original
    / variant time; FLOPs ratio = original / variant FLOPs; P3 (backbone rows only) = speedup
    ≥ :data:`P3_FACTOR` × the *factorized* (planned) FLOPs ratio.
    """
    planned_ratio = flops['original'] / flops['factorized']
    rows = []
    for variant in VARIANTS[1:]:
        speedup = times_ms['original'] / times_ms[variant]
        ratio = flops['original'] / flops[variant]
        rows.append(dict(
            model=label, part=part, input=shape_text(shape), runtime=runtime, layout=layout,
            variant=variant,
            original_ms=times_ms['original'], compact_ms=times_ms[variant], speedup=speedup,
            flops_original=flops['original'], flops_compact=flops[variant], flops_ratio=ratio,
            speedup_over_flops_ratio=speedup / ratio, planned_flops_ratio=planned_ratio,
            merged_layers=merged_layers if variant == 'latency-merged' else 0,
            low_rank_layers=low_rank[variant],
            p3=(speedup >= P3_FACTOR * planned_ratio) if is_backbone else None))
    return rows


def _part_module(model: nn.Module, part: str, shape: Sequence[int]) -> nn.Module:
    """Module of one tensor: a whole model's tensor forward (:data:`WHOLE_PARTS`), or the
    backbone."""
    if part in WHOLE_PARTS:
        module = TensorForward(model, shape)
        module.eval()
        return module
    return export_wrapper(model, shape)


def _flops(model: nn.Module, part: str, shape: Sequence[int]) -> int:
    with warnings.catch_warnings(), fixed_proposal_count(model):
        warnings.simplefilter('ignore')
        return count_flops(_part_module(model, part, shape), shape)


def padded_input_shape(cfg: Config) -> Tuple[int, int, int]:
    """(C, H, W): the config's test size padded to its data preprocessor's divisor, the
    tensor the deployed model receives."""
    c, h, w = resolve_input_shape(cfg)
    divisor = cfg.model.data_preprocessor.get('pad_size_divisor', 1) or 1
    return c, math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor


@dataclass
class Family:
    """One model of the benchmark: its config, the random compact model, labels."""
    name: str
    title: str
    cfg: Config
    synthetic: SyntheticCompact
    backbone_label: Optional[str]  # None: no backbone rows
    whole_label: str
    whole_part: str
    deployed_only: bool = False  # only the mmdeploy end-to-end rows


class _Bench:
    def __init__(self, settings: Settings, log: Callable[[str], None]):
        self.s = settings
        self.log = log
        self.rows: List[dict] = []
        self.merges: List[dict] = []
        self.onnx_sizes: List[dict] = []
        self.profiles: List[dict] = []  # per op type, deployed whole models
        self.flops_cache: Dict[tuple, int] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix='bench_inference_'))

    def flops(self, key: tuple, model: nn.Module, part: str, shape) -> int:
        if key not in self.flops_cache:
            self.flops_cache[key] = _flops(model, part, shape)
        return self.flops_cache[key]

    def merge(self, family: str, compact: nn.Module, shape, runtime: str,
              layout: str = 'contiguous', whole: bool = False):
        """Latency-aware merge timed on the backbone's forward, or (``whole``) on the whole
        test-time forward, as ``tools/deploy.py`` does, so neck and head layers are timed."""
        x = torch.zeros(1, *shape).contiguous(memory_format=check_memory_format(layout))
        start = time.perf_counter()

        def example(m: nn.Module) -> None:
            TensorForward(m, shape)(x) if whole else m.backbone(x)

        result = latency_aware_merge(compact, example, runtime=runtime,
                                     repeats=self.s.merge_repeats, warmup=self.s.warmup,
                                     margin=self.s.merge_margin, threads=self.s.threads,
                                     memory_format=layout)
        record = dict(family=family, input=shape_text(shape), merged=len(result.merged),
                      measured=len(result.layers),
                      seconds=round(time.perf_counter() - start, 1), **result.to_dict())
        self.merges.append(record)
        self.log(f'{family} {shape_text(shape)}: {result.summary()}')
        return result, record

    def add_rows(self, label: str, family: str, part: str, shape, runtime: str,
                 times: Sequence[float], models: Dict[str, nn.Module], merge_record: dict,
                 is_backbone: bool, flops_models: Optional[Dict[str, nn.Module]] = None,
                 layout: str = '', flops_shape=None) -> None:
        """The two rows of one interleaved measurement (FLOPs counted on ``flops_models``,
        default ``models``, at ``flops_shape``, default ``shape``)."""
        flops_models = flops_models or models
        flops_shape = tuple(flops_shape or shape)
        flops = {v: self.flops((family, part, flops_shape,
                                runtime + layout if v == 'latency-merged' else '', v),
                               flops_models[v], part, flops_shape) for v in VARIANTS}
        rows = make_rows(label, part, shape, runtime, dict(zip(VARIANTS, times)), flops,
                         merge_record['merged'],
                         {v: len(low_rank_layers(models[v])) for v in VARIANTS}, is_backbone,
                         layout)
        self.rows += rows
        for row in rows:
            self.log(f'  {label} {row["input"]} {runtime} {layout} {row["variant"]}: '
                     f'{row["original_ms"]:.1f} -> {row["compact_ms"]:.1f} ms, speedup '
                     f'{row["speedup"]:.2f}, FLOPs ratio {row["flops_ratio"]:.2f}')

    def measure_eager(self, label: str, family: str, part: str, shape,
                      models: Dict[str, nn.Module], merge_record: dict, is_backbone: bool,
                      layout: str) -> None:
        """Time the three variants of ``part`` in eager PyTorch, interleaved (the models must
        already be in ``layout``; the input is made so)."""
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
        x = x.contiguous(memory_format=check_memory_format(layout))
        fns, stack = [], contextlib.ExitStack()
        for variant in VARIANTS:
            module = _part_module(models[variant], part, shape)
            stack.enter_context(fixed_proposal_count(models[variant]))
            fns.append(lambda module=module: module(x))
        with stack, torch.no_grad():
            times = interleaved_median_ms(fns, self.s.repeats, self.s.warmup)
        self.add_rows(label, family, part, shape, 'torch', times, models, merge_record,
                      is_backbone, layout=layout)

    def measure_backbone_onnx(self, label: str, family: str, shape,
                              models: Dict[str, nn.Module], merge_record: dict,
                              flops_models: Dict[str, nn.Module]) -> None:
        """Export the three backbones (``export_onnx``, checked against PyTorch) and time them
        in onnxruntime, interleaved."""
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
        fns, sizes = [], {}
        for variant in VARIANTS:
            path = self.tmp / f'{family}_backbone_{shape_text(shape)}_{variant}.onnx'
            result = export_onnx(models[variant], shape, path, threads=self.s.threads)
            sizes[variant] = result.size_bytes
            self.log(f'  exported {variant} backbone {shape_text(shape)}: '
                     f'{result.size_bytes / 2**20:.1f} MiB; {result.check.summary()}')
            fns.append(ort_runner(ort_session(path, self.s.threads), x.numpy()))
        self.onnx_sizes.append(dict(model=label, part='backbone', input=shape_text(shape),
                                    **{f'{v}_bytes': n for v, n in sizes.items()}))
        times = interleaved_median_ms(fns, self.s.repeats, self.s.warmup)
        for path in self.tmp.glob('*.onnx'):
            path.unlink()
        self.add_rows(label, family, 'backbone', shape, 'onnxruntime', times, models,
                      merge_record, True, flops_models)

    def measure_deployed(self, fam: Family, flops_models: Dict[str, nn.Module]) -> None:
        """The whole model as ``tools/deploy.py`` ships it: mmdeploy's end-to-end ONNX of the
        original, the compact and the latency-merged compact model (merge timed in ONNX
        Runtime at the config's padded test size), each built by mmdeploy from a config +
        checkpoint file, timed interleaved in ONNX Runtime with mmdeploy's custom ops."""
        shape = padded_input_shape(fam.cfg)
        compact = fam.synthetic.compact
        merge, record = self.merge(fam.name, compact.model, shape, 'onnxruntime', whole=True)
        factorized_cfg = compact_config(fam.cfg, compact)
        pairs = {'original': (fam.cfg, fam.synthetic.original),
                 'factorized': (factorized_cfg, compact.model),
                 'latency-merged': (merged_config(factorized_cfg, merge.merged), merge.model)}
        x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
        fns, sizes = [], {}
        for variant, (cfg, model) in pairs.items():
            work = self.tmp / f'{fam.name}_deploy_{variant}'
            work.mkdir()
            cfg_file, ckpt = work / 'model.py', work / 'model.pth'
            cfg.dump(str(cfg_file))
            torch.save(dict(state_dict=model.state_dict()), ckpt)
            start = time.perf_counter()
            onnx_file = deploy_model(cfg_file, ckpt, work, input_shape=shape)['onnx']
            sizes[variant] = onnx_file.stat().st_size
            self.log(f'  mmdeploy exported {variant} {fam.whole_part} '
                     f'({time.perf_counter() - start:.0f} s): {sizes[variant] / 2**20:.1f} MiB')
            session = ort_session(onnx_file, self.s.threads,
                                  custom_ops_library=mmdeploy_ops_library())
            fns.append(ort_runner(session, x))
            self.profiles.append(dict(model=fam.whole_label + ' (mmdeploy end2end)',
                                      variant=variant, input=shape_text(shape),
                                      ops_ms=op_type_ms(onnx_file, x, self.s.threads,
                                                        work / 'profile')))
        self.onnx_sizes.append(dict(model=fam.whole_label + ' (mmdeploy end2end)',
                                    part=fam.whole_part, input=shape_text(shape),
                                    **{f'{v}_bytes': n for v, n in sizes.items()}))
        times = interleaved_median_ms(fns, self.s.repeats, self.s.warmup)
        models = {variant: model for variant, (_, model) in pairs.items()}
        flops_models = dict(flops_models, **{'latency-merged': fold_batchnorms(merge.model)[0]})
        self.add_rows(fam.whole_label + ' (mmdeploy end2end)', fam.name, fam.whole_part, shape,
                      'onnxruntime', times, models, record, False, flops_models)

    def family(self, fam: Family) -> None:
        """Backbone and whole-model rows of one model at every input size: eager in each
        layout, then onnxruntime (the backbone export); then the mmdeploy end-to-end model at
        the config's test size."""
        if fam.deployed_only or self.s.deployed_only:
            self.log(f'{fam.title}: mmdeploy end-to-end ONNX at the test size')
            original, compact = fam.synthetic.original, fam.synthetic.compact.model
            self.measure_deployed(fam, {'original': fold_batchnorms(original)[0],
                                        'factorized': fold_batchnorms(compact)[0]})
            return
        parts = [(fam.backbone_label, 'backbone', True)] if fam.backbone_label else []
        parts.append((fam.whole_label + ' (tensor forward)', fam.whole_part, False))
        original, compact = fam.synthetic.original, fam.synthetic.compact.model
        folded = {'original': fold_batchnorms(original)[0],
                  'factorized': fold_batchnorms(compact)[0]}
        for shape in self.s.shapes:
            self.log(f'{fam.title} at {shape_text(shape)}')
            for layout in self.s.layouts:
                eager = _in_layout(folded, layout)
                merge, record = self.merge(fam.name, eager['factorized'], shape, 'torch',
                                           layout)
                eager['latency-merged'] = merge.model
                for label, part, is_backbone in parts:
                    self.measure_eager(label, fam.name, part, shape, eager, record,
                                       is_backbone, layout)
            _in_layout(folded, 'contiguous')
            if not self.s.onnx:
                continue
            if not fam.backbone_label:
                continue
            merge, record = self.merge(fam.name, compact, shape, 'onnxruntime')
            exported = {'original': original, 'factorized': compact,
                        'latency-merged': merge.model}
            flops_models = dict(folded, **{'latency-merged': fold_batchnorms(merge.model)[0]})
            if fam.backbone_label:
                self.measure_backbone_onnx(fam.backbone_label, fam.name, shape, exported,
                                           record, flops_models)
        if self.s.onnx and self.s.deploy:
            self.log(f'{fam.title}: mmdeploy end-to-end ONNX at the test size')
            self.measure_deployed(fam, folded)


def op_type_ms(onnx_file: Path, x: np.ndarray, threads: int, prefix: Path,
               runs: int = 3) -> Dict[str, float]:
    """Mean ms per run spent in each ONNX op type (ONNX Runtime's profiler; the session's
    first run, which allocates its memory, is left out), largest first: which part of a
    deployed model shrinks with the ranks (``Conv``, ``MatMul``/``Gemm``) and which does not
    (``RoiAlign``, NMS, indexing)."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(os.fspath(mmdeploy_ops_library()))
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = os.fspath(prefix)
    session = ort.InferenceSession(os.fspath(onnx_file), options,
                                   providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: x}
    for _ in range(runs + 1):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    windows = sorted((e['ts'], e['ts'] + e['dur']) for e in events
                     if e.get('name') == 'model_run')[1:]  # without the first run
    totals: Dict[str, float] = {}
    for event in events:
        if (event.get('cat') == 'Node' and event.get('name', '').endswith('_kernel_time')
                and any(start <= event['ts'] <= end for start, end in windows)):
            op = event.get('args', {}).get('op_name', '?')
            totals[op] = totals.get(op, 0.0) + event['dur'] / 1000.0 / len(windows)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


#: op types whose cost the factorization changes (convs, FCs and their low-rank pairs)
FACTORIZED_OPS = ('Conv', 'FusedConv', 'MatMul', 'Gemm', 'FusedGemm', 'FusedMatMul')


def profile_table(profiles: List[dict]) -> str:
    """Markdown: per deployed model and variant, the time in factorizable ops (convs, FCs)
    and in the rest, with the three largest other op types."""
    if not profiles:
        return ''
    lines = ['| model | variant | convs + FCs ms | other ops ms | largest other op types (ms) |',
             '|---|---|---:|---:|---|']
    for p in profiles:
        ops = p['ops_ms']
        factorized = sum(ms for op, ms in ops.items() if op in FACTORIZED_OPS)
        others = {op: ms for op, ms in ops.items() if op not in FACTORIZED_OPS}
        top = ', '.join(f'{op} {ms:.1f}' for op, ms in list(others.items())[:3])
        lines.append(f'| {p["model"]} | {p["variant"]} | {factorized:.1f} '
                     f'| {sum(others.values()):.1f} | {top} |')
    return '\n'.join(lines) + '\n'


def _in_layout(models: Dict[str, nn.Module], layout: str) -> Dict[str, nn.Module]:
    """``models`` converted in place to the eager memory format ``layout``; a new dict."""
    for model in models.values():
        model.to(memory_format=check_memory_format(layout))
    return dict(models)


def load_family(name: str, title: str, config: Path, backbone_label: Optional[str],
                whole_label: str, whole_part: str, plan_shape: Optional[Sequence[int]] = None,
                deployed_only: bool = False) -> Family:
    """Random model of ``config``, factorized at its hook's budget (planned at
    ``plan_shape``, default the config's input size)."""
    cfg = random_init_config(config)
    return Family(name, title, cfg, synthetic_compact_model(cfg, flops_input_shape=plan_shape),
                  backbone_label, whole_label, whole_part, deployed_only)


# --------------------------------------------------------------------------- output
def _p3(value) -> str:
    return '' if value is None else ('pass' if value else 'FAIL')


def markdown(result: dict) -> str:
    """The results table, the ONNX file sizes and a footer naming machine and settings."""
    m, s = result['machine'], result['settings']
    lines = ['| model | input | runtime | variant | original ms | compact ms | speedup | '
             'FLOPs ratio | speedup / FLOPs ratio | P3 |',
             '|---|---|---|---|---:|---:|---:|---:|---:|---|']
    for r in result['rows']:
        variant = r['variant']
        if variant == 'latency-merged':
            variant += f' ({r["merged_layers"]} merged)'
        runtime = r['runtime'] + (f' {r["layout"]}' if r.get('layout') else '')
        lines.append(
            f'| {r["model"]} | {r["input"]} | {runtime} | {variant} '
            f'| {r["original_ms"]:.1f} | {r["compact_ms"]:.1f} | {r["speedup"]:.2f} '
            f'| {r["flops_ratio"]:.2f} | {r["speedup_over_flops_ratio"]:.2f} | {_p3(r["p3"])} |')
    text = '\n'.join(lines) + '\n'
    if result['onnx_sizes']:
        text += ('\n| ONNX file | input | original MiB | factorized MiB | latency-merged MiB |\n'
                 '|---|---|---:|---:|---:|\n')
        for o in result['onnx_sizes']:
            text += (f'| {o["model"]} | {o["input"]} | {o["original_bytes"] / 2**20:.1f} '
                     f'| {o["factorized_bytes"] / 2**20:.1f} '
                     f'| {o["latency-merged_bytes"] / 2**20:.1f} |\n')
    text += (f'\nCPU: {m["cpu"]}, {m["threads"]} threads ({m["usable_cores"]} usable cores), '
             f'torch {m["torch"]}, onnxruntime {m["onnxruntime"]}; batch 1; median of '
             f'{s["repeats"]} runs after {s["warmup"]} warm-up; load average at start / end '
             f'{m["load_average_start"][0]:.2f} / {m["load_average_end"][0]:.2f}; '
             f'{result["date"]}; {result["wall_seconds"]:.0f} s.\n'
             f'Speedup = original ms / compact ms; FLOPs ratio = original / compact FLOPs '
             '(mmengine.analysis) of the models as run; P3 = speedup >= '
             f'{s["p3_factor"]} x the planned (factorized) FLOPs ratio, backbone rows. Eager '
             'PyTorch runs with every BN folded in all variants, weights and input in the named '
             'memory format (contiguous = NCHW); a latency-merged row with 0 merged layers '
             'times the same network as the factorized row. Whole-model rows: "tensor '
             'forward" = eager model._forward (detector: RPN NMS off, 1000 RoIs); "mmdeploy '
             'end2end" = the ONNX file tools/deploy.py writes (NMS and RoI head in the graph; '
             'the number of RoIs follows the weights), at the config\'s padded test size, '
             'FLOPs counted on the eager tensor forward at that size. Allocator: '
             f'{m.get("allocator", "default")}.\n')
    if result.get('profiles'):
        text += ('\nWhere the deployed models spend their time (ONNX Runtime profiler, mean of '
                 '3 runs after a first one, same threads; kernel time by op type):\n\n'
                 + profile_table(result['profiles']))
    return text


def run_benchmark(settings: Settings, out_stem: Path, log: Callable[[str], None] = print,
                  command: str = '') -> dict:
    """Run the benchmark; write ``<out_stem>.json`` and ``<out_stem>.md`` atomically."""
    start = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    info = dict(machine_info(), threads=settings.threads)
    info['load_average_start'] = list(os.getloadavg())
    info['allocator'] = 'glibc default'
    if settings.allocator == 'retain':  # process-wide and final: see retain_freed_memory
        info['allocator'] = ('glibc, freed memory retained '
                             '(benchlib.cpu_allocator.retain_freed_memory)'
                             if retain_freed_memory() else
                             'default (retain_freed_memory: not glibc, nothing changed)')
    log(f'allocator: {info["allocator"]}')
    bench = _Bench(settings, log)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            quick = settings.quick
            depth = 18 if quick else 50
            families = [('faster-rcnn', f'Faster R-CNN R{depth}',
                         TOY_DET_CONFIG if quick else DET_CONFIG, f'ResNet-{depth} backbone',
                         f'Faster R-CNN R{depth} whole', 'detector', False)]
            if settings.whole_model and settings.deploy and settings.onnx:
                families.append(('faster-rcnn-model', f'Faster R-CNN R{depth}, whole-model LRPET',
                                 TOY_DET_MODEL_CONFIG if quick else DET_MODEL_CONFIG, None,
                                 f'Faster R-CNN R{depth} whole, whole-model LRPET', 'detector',
                                 True))
            if settings.segmentor:
                families.append(('pspnet', f'PSPNet R{depth}-D8',
                                 TOY_SEG_CONFIG if quick else SEG_CONFIG, None,
                                 f'PSPNet R{depth}-D8 whole', 'segmentor', False))
                if settings.whole_model and settings.deploy and settings.onnx:
                    families.append(('pspnet-model', f'PSPNet R{depth}-D8, whole-model LRPET',
                                     TOY_SEG_MODEL_CONFIG if quick else SEG_MODEL_CONFIG, None,
                                     f'PSPNet R{depth}-D8 whole, whole-model LRPET',
                                     'segmentor', True))
            for name, title, config, backbone, whole, part, deployed_only in families:
                log(f'building {title} (random weights) and planning its ranks')
                bench.family(load_family(name, title, config, backbone, whole, part,
                                         deployed_only=deployed_only))
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(bench.tmp, ignore_errors=True)
    info['load_average_end'] = list(os.getloadavg())
    backbone = [r for r in bench.rows if r['p3'] is not None]
    settings_dict = dict(asdict(settings), inputs=[shape_text(s) for s in settings.shapes],
                         batch=1, p3_factor=P3_FACTOR)
    settings_dict.pop('shapes')
    result = dict(
        benchmark='inference latency, original vs compact', quick=settings.quick,
        date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        machine=info, settings=settings_dict, command=command,
        wall_seconds=round(time.perf_counter() - start, 1),
        p3=dict(rows=len(backbone), passed=sum(bool(r['p3']) for r in backbone),
                all_pass=bool(backbone) and all(r['p3'] for r in backbone)),
        rows=bench.rows, onnx_sizes=bench.onnx_sizes, merges=bench.merges,
        profiles=bench.profiles)
    out_stem = Path(out_stem)
    json_path = write_results(out_stem.parent / f'{out_stem.name}.json', result,
                              f'# Inference latency\n\n{markdown(result)}')
    result['files'] = [str(json_path), str(json_path.with_suffix('.md'))]
    return result
