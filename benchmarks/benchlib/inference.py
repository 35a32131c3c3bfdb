"""Inference latency of the original vs the compact (factorized) model, CPU, batch 1.

Models (random weights, init/pretrained off; no training is needed for latency): the planned
convs get exactly rank-k weights at the ranks the project's planner picks for the config's
``flops_reduction`` (:func:`benchlib.synthetic.synthetic_compact_model`), then the
model is factorized exactly.

* ResNet-50 backbone of ``configs/lrpet/faster-rcnn_r50_fpn_lrpet_1x_voc0712.py`` (−50 %
  backbone FLOPs);
* the whole Faster R-CNN: eager tensor forward (``model._forward``: backbone, FPN, RPN with
  its NMS off so the RoI head always gets ``max_per_img`` = 1000 proposals, RoI head), and the
  exportable ``detector-features`` part (backbone + FPN + RPN head convs) in eager and
  onnxruntime;
* the whole PSPNet R50-D8 of ``configs/lrpet/pspnet_r50-d8_lrpet_4xb4-20k_voc12aug-512x512.py``
  (−30 % backbone FLOPs): ``encode_decode`` (logits resized to the input).

Variants, timed interleaved in one run: ``original``; ``factorized`` (every planned conv
factorized); ``latency-merged`` (:func:`lrpet_mm.deploy.latency_aware_merge` measured in the
same runtime, layout and input size: factorized layers slower than their merged conv are
merged back). Eager PyTorch runs all variants with every BN folded into its conv (onnxruntime
folds them itself), so the comparison measures the factorization, not BN folding, in each of
``layouts`` (``contiguous`` NCHW and ``channels_last``, oneDNN's fast path; the model weights
and the input in the same layout). Each latency is the median of ``repeats`` runs after
``warmup`` runs. FLOPs are counted by mmengine.analysis (one multiply-add = one FLOP) on the
models as run.

``allocator='retain'`` (the default) first calls
:func:`lrpet_mm.deploy.retain_freed_memory` for the whole process, so eager PyTorch does not
page-fault its large activations in again on every forward (onnxruntime has its own arena);
``'default'`` leaves glibc as it is.

P3 (backbone rows): speedup ≥ 0.8 × the planned compact model's FLOPs ratio (original /
factorized), judged for both the factorized and the latency-merged variant.

:func:`run_benchmark` does the work; ``benchmarks/bench_inference.py`` is the command line.
"""
import contextlib
import datetime
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from benchlib.common import REPO_ROOT, machine_info, write_results
from benchlib.synthetic import synthetic_compact_model
from lrpet_mm.deploy import (
    check_memory_format,
    default_threads,
    export_onnx,
    export_wrapper,
    fold_batchnorms,
    interleaved_median_ms,
    latency_aware_merge,
    low_rank_layers,
    ort_runner,
    ort_session,
    retain_freed_memory,
)
from lrpet_mm.engine.flops import count_flops
from lrpet_mm.report.complexity import TensorForward, fixed_proposal_count, make_data_samples

DET_CONFIG = REPO_ROOT / 'configs' / 'lrpet' / 'faster-rcnn_r50_fpn_lrpet_1x_voc0712.py'
SEG_CONFIG = (REPO_ROOT / 'configs' / 'lrpet' /
              'pspnet_r50-d8_lrpet_4xb4-20k_voc12aug-512x512.py')
FULL_INPUTS = ((3, 512, 512), (3, 800, 1333))
QUICK_INPUT = (3, 224, 224)
P3_FACTOR = 0.8
VARIANTS = ('original', 'factorized', 'latency-merged')
RUNTIMES = ('torch', 'onnxruntime')
ALLOCATORS = ('retain', 'default')


@dataclass
class Settings:
    """What to run. ``shapes`` are (C, H, W); ``threads`` None = all cores."""
    quick: bool = False
    shapes: Tuple[Tuple[int, int, int], ...] = FULL_INPUTS
    threads: Optional[int] = None
    repeats: int = 5
    warmup: int = 1
    merge_repeats: int = 5
    merge_margin: float = 0.05
    onnx: bool = True
    segmentor: bool = True
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


def default_settings(quick: bool = False, **overrides) -> Settings:
    """Full run: 512x512 and 800x1333, 5 repeats; quick: backbone only at 224x224, 3 repeats,
    3 per-layer repeats. ``overrides`` that are None keep the default."""
    base = (dict(quick=True, shapes=(QUICK_INPUT, ), repeats=3, merge_repeats=3,
                 segmentor=False) if quick else {})
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
    """Module of one tensor: ``detector`` = the whole tensor forward, else an export part."""
    if part == 'detector':
        module = TensorForward(model, make_data_samples('mmdet', shape))
        module.eval()
        return module
    return export_wrapper(model, part, shape)


def _flops(model: nn.Module, part: str, shape: Sequence[int]) -> int:
    with warnings.catch_warnings(), fixed_proposal_count(model):
        warnings.simplefilter('ignore')
        return count_flops(_part_module(model, part, shape), shape)


class _Bench:
    def __init__(self, settings: Settings, log: Callable[[str], None]):
        self.s = settings
        self.log = log
        self.rows: List[dict] = []
        self.merges: List[dict] = []
        self.onnx_sizes: List[dict] = []
        self.flops_cache: Dict[tuple, int] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix='bench_inference_'))

    def flops(self, key: tuple, model: nn.Module, part: str, shape) -> int:
        if key not in self.flops_cache:
            self.flops_cache[key] = _flops(model, part, shape)
        return self.flops_cache[key]

    def merge(self, family: str, compact: nn.Module, shape, runtime: str,
              layout: str = 'contiguous'):
        x = torch.zeros(1, *shape).contiguous(memory_format=check_memory_format(layout))
        start = time.perf_counter()
        result = latency_aware_merge(compact, lambda m: m.backbone(x), runtime=runtime,
                                     repeats=self.s.merge_repeats, warmup=self.s.warmup,
                                     margin=self.s.merge_margin, threads=self.s.threads,
                                     memory_format=layout)
        record = dict(family=family, input=shape_text(shape), merged=len(result.merged),
                      measured=len(result.layers),
                      seconds=round(time.perf_counter() - start, 1), **result.to_dict())
        self.merges.append(record)
        self.log(f'{family} {shape_text(shape)}: {result.summary()}')
        return result.model, record

    def measure(self, label: str, family: str, part: str, shape, runtime: str,
                models: Dict[str, nn.Module], merge_record: dict, is_backbone: bool,
                flops_models: Optional[Dict[str, nn.Module]] = None, layout: str = '') -> None:
        """Time the three variants of ``part`` interleaved; append the two rows. In eager
        PyTorch the models must already be in ``layout``; the input is made so."""
        s = self.s
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
        if runtime == 'torch':
            x = x.contiguous(memory_format=check_memory_format(layout))
            fns, stack = [], contextlib.ExitStack()
            for variant in VARIANTS:
                module = _part_module(models[variant], part, shape)
                stack.enter_context(fixed_proposal_count(models[variant]))
                fns.append(lambda module=module: module(x))
            with stack, torch.no_grad():
                times = interleaved_median_ms(fns, s.repeats, s.warmup)
        else:
            fns, sizes = [], {}
            for variant in VARIANTS:
                path = self.tmp / f'{family}_{part}_{shape_text(shape)}_{variant}.onnx'
                result = export_onnx(models[variant], part, shape, path, threads=s.threads)
                sizes[variant] = result.size_bytes
                self.log(f'  exported {variant} {part} {shape_text(shape)}: '
                         f'{result.size_bytes / 2**20:.1f} MiB; {result.check.summary()}')
                fns.append(ort_runner(ort_session(path, s.threads), x.numpy()))
            self.onnx_sizes.append(dict(model=label, part=part, input=shape_text(shape),
                                        **{f'{v}_bytes': n for v, n in sizes.items()}))
            times = interleaved_median_ms(fns, s.repeats, s.warmup)
            for path in self.tmp.glob('*.onnx'):
                path.unlink()
        flops_models = flops_models or models
        flops = {v: self.flops((family, part, tuple(shape),
                                runtime + layout if v == 'latency-merged' else '', v),
                               flops_models[v], part, shape) for v in VARIANTS}
        rows = make_rows(label, part, shape, runtime, dict(zip(VARIANTS, times)), flops,
                         merge_record['merged'],
                         {v: len(low_rank_layers(models[v])) for v in VARIANTS}, is_backbone,
                         layout)
        self.rows += rows
        for row in rows:
            self.log(f'  {label} {row["input"]} {runtime} {layout} {row["variant"]}: '
                     f'{row["original_ms"]:.1f} -> {row["compact_ms"]:.1f} ms, speedup '
                     f'{row["speedup"]:.2f}, FLOPs ratio {row["flops_ratio"]:.2f}')

    def detector(self, det) -> None:
        parts = [('ResNet-50 backbone', 'backbone', True)]
        if not self.s.quick:
            parts += [('Faster R-CNN features (backbone+FPN+RPN head)', 'detector-features',
                       False),
                      ('Faster R-CNN whole (tensor forward, 1000 RoIs)', 'detector', False)]
        self.family('faster-rcnn', 'Faster R-CNN R50', det, parts)

    def segmentor(self, seg) -> None:
        self.family('pspnet', 'PSPNet R50-D8', seg,
                    [('PSPNet R50-D8 whole (encode_decode)', 'segmentor', False)])

    def family(self, family: str, title: str, synthetic,
               parts: List[Tuple[str, str, bool]]) -> None:
        """Every (label, part, is_backbone) of one model at every input size: eager in each
        layout, then onnxruntime (where the part exports)."""
        original, compact = synthetic.original, synthetic.compact.model
        folded = {'original': fold_batchnorms(original)[0],
                  'factorized': fold_batchnorms(compact)[0]}
        for shape in self.s.shapes:
            self.log(f'{title} at {shape_text(shape)}')
            for layout in self.s.layouts:
                eager = _in_layout(folded, layout)
                merged, record = self.merge(family, eager['factorized'], shape, 'torch',
                                            layout)
                eager['latency-merged'] = merged
                for label, part, is_backbone in parts:
                    self.measure(label, family, part, shape, 'torch', eager, record,
                                 is_backbone, layout=layout)
            _in_layout(folded, 'contiguous')
            if not self.s.onnx:
                continue
            merged, record = self.merge(family, compact, shape, 'onnxruntime')
            exported = {'original': original, 'factorized': compact, 'latency-merged': merged}
            flops_models = dict(folded, **{'latency-merged': fold_batchnorms(merged)[0]})
            for label, part, is_backbone in parts:
                if part != 'detector':  # RoIAlign / NMS do not export without custom ops
                    self.measure(label, family, part, shape, 'onnxruntime', exported,
                                 record, is_backbone, flops_models)


def _in_layout(models: Dict[str, nn.Module], layout: str) -> Dict[str, nn.Module]:
    """``models`` converted in place to the eager memory format ``layout``; a new dict."""
    for model in models.values():
        model.to(memory_format=check_memory_format(layout))
    return dict(models)


def load_synthetic(config: Path, plan_shape: Optional[Sequence[int]] = None):
    """Random model of ``config`` (pretrained init off), factorized at its hook's budget
    (planned at ``plan_shape``, default the config's input size)."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(config))
    cfg.model.backbone.init_cfg = None
    if 'pretrained' in cfg.model:
        cfg.model.pretrained = None
    return synthetic_compact_model(cfg, flops_input_shape=plan_shape)


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
             'times the same network as the factorized row. Allocator: '
             f'{m.get("allocator", "default")}.\n')
    return text


def run_benchmark(settings: Settings, out_stem: Path, log: Callable[[str], None] = print,
                  command: str = '') -> dict:
    """Run the benchmark; write ``<out_stem>.json`` and ``<out_stem>.md`` atomically."""
    start = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    info = dict(machine_info(), threads=settings.threads)
    info['allocator'] = 'glibc default'
    if settings.allocator == 'retain':  # process-wide and final: see retain_freed_memory
        info['allocator'] = ('glibc, freed memory retained (lrpet_mm.deploy.retain_freed_memory)'
                             if retain_freed_memory() else
                             'default (retain_freed_memory: not glibc, nothing changed)')
    log(f'allocator: {info["allocator"]}')
    bench = _Bench(settings, log)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            # quick: plan at the small input (for ResNet-50, whose conv FLOPs all scale with
            # H·W, the plan equals the one at the config's 3x600x1000); full: the config's
            log('building Faster R-CNN R50 (random weights) and planning its ranks')
            det = load_synthetic(DET_CONFIG, settings.shapes[0] if settings.quick else None)
            bench.detector(det)
            del det
            if settings.segmentor:
                log('building PSPNet R50-D8 (random weights) and planning its ranks')
                bench.segmentor(load_synthetic(SEG_CONFIG))
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
        rows=bench.rows, onnx_sizes=bench.onnx_sizes, merges=bench.merges)
    out_stem = Path(out_stem)
    json_path = write_results(out_stem.parent / f'{out_stem.name}.json', result,
                              f'# Inference latency\n\n{markdown(result)}')
    result['files'] = [str(json_path), str(json_path.with_suffix('.md'))]
    return result
