#!/usr/bin/env python
"""Compact Swin-T backbone: FLOPs, parameters and onnxruntime latency (CPU, batch 1).

Builds the Swin-T backbone of a Swin config (default
configs/lrpet/upernet_swin-t-p4-w7_lrpet_voc12aug-512x512.py; random init, LayerNorms as
configured, pretrained weights off), plans ranks like the config's LRPETHook (its
flops_reduction and rank_multiple, FLOPs counted at the input size), projects the planned
linear layers once (LowRankProjector: exactly rank k afterwards), factorizes them
(factorize_model), counts FLOPs / parameters with mmengine.analysis (one multiply-add = one
FLOP) and times the original and the compact backbone exported to ONNX in onnxruntime
(CPUExecutionProvider, batch 1, 2 threads by default), interleaved, median of N runs after
warm-up. Both exports are checked against PyTorch (max-normalized error <= 1e-4), the compact
graph also against the original (projected, unfactorized) backbone. Prints a Markdown table and
writes benchmarks/results/swin.{json,md}.

    python benchmarks/bench_swin.py            # Swin-T at 3x512x512 (~2 min on 2 cores)
    python benchmarks/bench_swin.py --quick    # a tiny Swin at 3x64x64, seconds; writes
                                               # work_dirs/bench_swin/quick/swin.{json,md}

Latency depends on shapes, not on trained values, so no training is needed. Exit status 2 on
bad arguments.
"""
import argparse
import datetime
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from benchlib.common import REPO_ROOT, machine_info, write_results
from lrpet_mm.deploy import (
    export_onnx,
    interleaved_median_ms,
    max_normalized_error,
    ort_runner,
    ort_session,
)
from lrpet_mm.engine import LRPETSettings, count_flops, count_params
from lrpet_mm.engine.planning import plan_targets
from lrpet_mm.lowrank import LowRankProjector
from lrpet_mm.models import describe_layers, factorize_model

DEFAULT_CONFIG = REPO_ROOT / 'configs' / 'lrpet' / 'upernet_swin-t-p4-w7_lrpet_voc12aug-512x512.py'
#: --quick: a tiny Swin (the toy configs' backbone) instead of the config's Swin-T
QUICK_BACKBONE = dict(embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=4)


class Holder(nn.Module):
    """The backbone as ``model.backbone`` (what the planner and the exporter address)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone


def parse_size(text: str) -> tuple:
    parts = text.lower().split('x')
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f'--input takes a size like 512x512, got {text!r}')
    return (3, int(parts[0]), int(parts[1]))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=str(DEFAULT_CONFIG),
                        help='a Swin config with an LRPETHook (default: the UPerNet Swin-T one)')
    parser.add_argument('--quick', action='store_true',
                        help='tiny Swin (32 channels) at 3x64x64, 2 repeats: a smoke test')
    parser.add_argument('--input', default=None, metavar='HxW',
                        help='input size (default 512x512; --quick: 64x64)')
    parser.add_argument('--threads', type=int, default=2,
                        help='onnxruntime intra-op threads (default 2)')
    parser.add_argument('--repeats', type=int, default=None,
                        help='timed runs per model (default 10; --quick: 2)')
    parser.add_argument('--warmup', type=int, default=None,
                        help='untimed runs first (default 2; --quick: 1)')
    parser.add_argument('--out', default=None,
                        help='output JSON (default benchmarks/results/swin.json, or '
                             'work_dirs/bench_swin/quick/swin.json with --quick); the Markdown '
                             'table goes next to it')
    return parser.parse_args(argv)


def build_backbone(cfg, quick: bool) -> Holder:
    from mmengine.registry import MODELS, init_default_scope

    init_default_scope(cfg.get('default_scope', 'mmseg'))
    backbone_cfg = dict(cfg.model.backbone, init_cfg=None)
    if quick:
        backbone_cfg.update(QUICK_BACKBONE)
        if 'pretrain_img_size' in backbone_cfg:
            backbone_cfg['pretrain_img_size'] = 64
    model = Holder(MODELS.build(backbone_cfg))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model.backbone.init_weights()  # the backbone's own random init (no download)
    return model.eval()


def hook_settings(cfg) -> LRPETSettings:
    settings = LRPETSettings.from_config(cfg)
    if settings is None:
        raise ValueError('the config has no LRPETHook')
    return settings


def run(args: argparse.Namespace, log=print) -> dict:
    from mmengine.config import Config

    start = time.perf_counter()
    shape = parse_size(args.input or ('64x64' if args.quick else '512x512'))
    repeats = args.repeats or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.threads < 1 or repeats < 1 or warmup < 0:
        raise ValueError('threads and repeats must be >= 1, warmup >= 0')
    cfg = Config.fromfile(args.config)
    hook = hook_settings(cfg)
    if hook.flops_reduction is None:
        raise ValueError(f'the LRPETHook of {args.config} has no flops_reduction')
    torch.manual_seed(0)
    model = build_backbone(cfg, args.quick)
    selection = hook.select_targets(model)
    plan, planned = plan_targets(model, selection, hook, shape)  # at this run's input size
    log(f'planned {len(plan)} layers ({len(plan.skipped)} left alone) for -'
        f'{100 * hook.flops_reduction:.0f} % backbone FLOPs at {shape}: '
        f'{100 * planned.reduction:.2f} % counted')
    stats = LowRankProjector(selection.targets, plan).project()
    compact = factorize_model(model, plan)
    log(f'projected ({stats.seconds:.1f} s) and factorized {describe_layers(compact.layers)} '
        f'(max relative rank-k error {max(x.relative_error for x in compact.layers):.1e})')

    flops = dict(original=count_flops(model.backbone, shape),
                 compact=count_flops(compact.model.backbone, shape))
    params = dict(original=count_params(model.backbone),
                  compact=count_params(compact.model.backbone))
    tmp = Path(tempfile.mkdtemp(prefix='bench_swin_'))
    try:
        exports, runners = {}, []
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
        for name, module in (('original', model), ('compact', compact.model)):
            result = export_onnx(module, shape, tmp / f'{name}.onnx',
                                 threads=args.threads)
            exports[name] = result
            log(f'exported the {name} backbone: {result.size_bytes / 2**20:.1f} MiB; '
                f'{result.check.summary()}')
            runners.append(ort_runner(ort_session(result.path, args.threads), x.numpy()))
        # the compact graph against the original (projected, unfactorized) PyTorch backbone
        got = runners[1]()
        with torch.no_grad():
            expected = model.backbone(x)
        cross_error = max(max_normalized_error(g, e.numpy()) for g, e in zip(got, expected))
        times = interleaved_median_ms(runners, repeats, warmup)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    latency = dict(original=times[0], compact=times[1])
    backbone = {k: v for k, v in cfg.model.backbone.items() if k in (
        'type', 'embed_dims', 'depths', 'num_heads', 'window_size', 'mlp_ratio')}
    if args.quick:
        backbone.update(QUICK_BACKBONE)
    kinds = sorted({layer.kind for layer in compact.layers})
    return dict(
        benchmark='swin', date=datetime.date.today().isoformat(),
        wall_seconds=round(time.perf_counter() - start, 1),
        machine=dict(machine_info(), onnxruntime_threads=args.threads),
        settings=dict(config=config_name(args.config), quick=args.quick,
                      input_shape=list(shape),
                      repeats=repeats, warmup=warmup, runtime='onnxruntime CPU',
                      batch=1, threads=args.threads),
        backbone=backbone,
        plan=dict(flops_reduction=hook.flops_reduction,
                  rank_multiple=hook.rank_multiple, rank_ratio=planned.rank_ratio,
                  counted_reduction=planned.reduction, layers=len(plan),
                  layer_kinds=kinds, left_alone=dict(plan.skipped),
                  ranks={name: layer.rank for name, layer in plan.layers.items()},
                  energy_kept_mean=stats.energy_kept_mean),
        flops=dict(flops, ratio=flops['original'] / flops['compact']),
        params=dict(params, ratio=params['original'] / params['compact']),
        onnx=dict(original_bytes=exports['original'].size_bytes,
                  compact_bytes=exports['compact'].size_bytes,
                  original_check=exports['original'].check.max_error,
                  compact_check=exports['compact'].check.max_error,
                  compact_vs_original_pytorch=cross_error),
        latency_ms=dict(latency, speedup=latency['original'] / latency['compact']))


def config_name(config: str) -> str:
    """``config`` relative to the repository if it is inside it."""
    try:
        return str(Path(config).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return config


def left_alone_summary(left_alone: dict) -> str:
    """E.g. ``'12 (factorizing would not reduce parameters), 1 (no BatchNorm consumes its
    output)'``: the layers left alone, grouped by the start of their reason."""
    counts = {}
    for reason in left_alone.values():
        key = reason.split(':')[0].split(' (')[0]
        counts[key] = counts.get(key, 0) + 1
    return ', '.join(f'{n} ({key})' for key, n in counts.items()) or 'none'


def _num(value: float) -> str:
    return f'{value:.2f}' if value >= 0.1 else f'{value:.3g}'


def markdown(result: dict) -> str:
    s, f, p, o, t = (result[k] for k in ('settings', 'flops', 'params', 'onnx', 'latency_ms'))
    m, plan, b = result['machine'], result['plan'], result['backbone']
    name = ('tiny Swin (quick)' if s['quick'] else 'Swin-T') + ' backbone'
    shape = 'x'.join(str(v) for v in s['input_shape'])
    lines = ['| model | input | FLOPs (G) | params (M) | ONNX (MiB) | onnxruntime ms | '
             'speedup |', '|---|---|---:|---:|---:|---:|---:|']
    for which in ('original', 'compact'):
        label = name if which == 'original' else (
            f'{name}, compact ({plan["layers"]} linear layers factorized)')
        lines.append(f'| {label} | {shape} | {_num(f[which] / 1e9)} | {_num(p[which] / 1e6)} | '
                     f'{o[f"{which}_bytes"] / 2**20:.1f} | {t[which]:.1f} | '
                     f'{"" if which == "original" else format(t["speedup"], ".2f")} |')
    lines.append('')
    lines.append(
        f'Backbone {b.get("type")} (embed_dims {b.get("embed_dims")}, depths '
        f'{b.get("depths")}, window {b.get("window_size")}), random init; ranks planned for '
        f'-{100 * plan["flops_reduction"]:.0f} % backbone FLOPs (rank_multiple '
        f'{plan["rank_multiple"]}, uniform ratio {plan["rank_ratio"]:.3f}): '
        f'{100 * (1 - 1 / f["ratio"]):.1f} % fewer FLOPs ({f["ratio"]:.2f}x), '
        f'{100 * (1 - 1 / p["ratio"]):.1f} % fewer parameters; layers left alone: '
        f'{left_alone_summary(plan["left_alone"])}. FLOPs by mmengine.analysis (one '
        f'multiply-add = one FLOP). onnxruntime {m.get("onnxruntime")} '
        f'CPUExecutionProvider, batch 1, {s["threads"]} threads, median of {s["repeats"]} '
        f'runs after {s["warmup"]} warm-ups, '
        f'both models timed interleaved; ONNX checks: max-normalized error '
        f'{max(o["original_check"], o["compact_check"]):.1e} vs PyTorch, compact graph vs the '
        f'original backbone {o["compact_vs_original_pytorch"]:.1e}. {m.get("cpu")}, '
        f'{m.get("usable_cores")} usable cores, torch {m.get("torch")}, {result["date"]}.')
    return '\n'.join(lines) + '\n'


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        parse_size(args.input or '1x1')
        if args.threads < 1:
            raise ValueError(f'--threads must be >= 1, got {args.threads}')
        if not Path(args.config).is_file():
            raise ValueError(f'config {args.config!r} does not exist')
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (
        REPO_ROOT / 'work_dirs' / 'bench_swin' / 'quick' / 'swin.json' if args.quick else
        REPO_ROOT / 'benchmarks' / 'results' / 'swin.json')
    result = run(args)
    table = markdown(result)
    print(table, end='')
    write_results(out, result, table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
