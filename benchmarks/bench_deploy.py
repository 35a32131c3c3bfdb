#!/usr/bin/env python
"""Latency of the whole deployed model, original vs compact: mmdeploy's end-to-end ONNX of the
paper-setting Faster R-CNN R-50 (RPN, RoI head and NMS included) and PSPNet R-50-D8, run by
ONNX Runtime on CPU (mmdeploy's custom ops registered), batch 1, at the configs' test sizes.

Weights are random (latency depends on shapes): each config's model is planned like its
LRPETHook plans it, its planned convs are given exactly rank k and it is factorized exactly
(``benchlib.synthetic``); both are exported with ``lrpet_mm.deploy.mmdeploy_export`` and timed
interleaved (median of ``--repeats`` runs after 2 warm-ups) on a fixed standard-normal input of
the padded test size. Writes benchmarks/results/deploy.{json,md}.

    python benchmarks/bench_deploy.py [--threads 2]   # ~2 min on a quiet 2-core CPU
    python benchmarks/bench_deploy.py --quick         # toy R-18 models at small sizes, ~1 min
"""
import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from mmengine.config import Config

from benchlib.common import machine_info, write_results
from benchlib.synthetic import synthetic_compact_model
from lrpet_mm.deploy import interleaved_median_ms, torch_threads
from lrpet_mm.deploy.mmdeploy_export import deploy_model
from lrpet_mm.engine import count_flops, resolve_input_shape
from lrpet_mm.models import compact_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs' / 'lrpet'
TASKS = dict(det=CONFIGS / 'faster-rcnn_r50_fpn_lrpet_1x_voc0712.py',
             seg=CONFIGS / 'pspnet_r50-d8_lrpet_4xb4-20k_voc12aug-512x512.py')
QUICK_TASKS = dict(det=CONFIGS / '_toy_' / 'faster-rcnn_r18_fpn_lrpet_toy_voc.py',
                   seg=CONFIGS / '_toy_' / 'pspnet_r18-d8_lrpet_toy_voc12aug.py')


def load_config(path: Path) -> Config:
    """The config with random init (no download) and plain BN (ONNX export, one process)."""
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.init_cfg = None
    if 'pretrained' in cfg.model:
        cfg.model.pretrained = None
    for part in ('backbone', 'decode_head', 'auxiliary_head'):
        module = cfg.model.get(part)
        if isinstance(module, dict) and module.get('norm_cfg', {}).get('type') == 'SyncBN':
            module.norm_cfg = dict(type='BN', requires_grad=True)
    return cfg


def padded_input_shape(cfg: Config) -> tuple:
    """(1, C, H, W): the config's test size padded to its data preprocessor's divisor."""
    c, h, w = resolve_input_shape(cfg)
    divisor = cfg.model.data_preprocessor.get('pad_size_divisor', 1) or 1
    return 1, c, math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    from mmdeploy.backend.onnxruntime.init_plugins import get_ops_path
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_ops_path())
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def export_pair(task: str, path: Path, work: Path) -> dict:
    """Export the original and the compact model of one config; their files and FLOPs."""
    cfg = load_config(path)
    synthetic = synthetic_compact_model(cfg)
    shape = resolve_input_shape(cfg)
    entry = dict(task=task, config=str(path.relative_to(REPO)), input=list(
        padded_input_shape(cfg)[1:]), backbone_flops=dict(
            original=count_flops(synthetic.original.backbone, shape),
            compact=count_flops(synthetic.compact.model.backbone, shape)),
        factorized_layers=len(synthetic.plan.layers))
    variants = dict(original=(cfg, synthetic.original),
                    compact=(compact_config(cfg, synthetic.compact), synthetic.compact.model))
    for which, (model_cfg, model) in variants.items():
        config_file, ckpt = work / f'{task}_{which}.py', work / f'{task}_{which}.pth'
        model_cfg.dump(str(config_file))
        torch.save(dict(state_dict=model.state_dict()), ckpt)
        entry[f'{which}_onnx'] = str(deploy_model(config_file, ckpt, work / f'{task}_{which}')
                                     ['onnx'])
        entry[f'{which}_onnx_mb'] = round(Path(entry[f'{which}_onnx']).stat().st_size / 2**20, 1)
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].replace('\n', ' '))
    parser.add_argument('--threads', type=int, default=None, help='default: all cores')
    parser.add_argument('--repeats', type=int, default=None,
                        help='timed runs per model (default 7; --quick 2)')
    parser.add_argument('--tasks', nargs='+', choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument('--quick', action='store_true', help='toy R-18 models (smoke test)')
    parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'results' / 'deploy.json'))
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    configs = QUICK_TASKS if args.quick else TASKS
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix='bench_deploy_') as tmp, \
            torch_threads(args.threads) as threads:
        for task in args.tasks:
            row = export_pair(task, configs[task], Path(tmp))
            x = np.random.default_rng(0).standard_normal(
                [1, 3] + row['input'][1:], dtype=np.float32)
            sessions = [ort_session(Path(row[f'{w}_onnx']), threads)
                        for w in ('original', 'compact')]
            times = interleaved_median_ms(
                [lambda s=s: s.run(None, {'input': x}) for s in sessions], repeats, 2)
            row.update(original_ms=round(times[0], 1), compact_ms=round(times[1], 1),
                       speedup=round(times[0] / times[1], 3),
                       backbone_flops_ratio=round(row['backbone_flops']['original']
                                                  / row['backbone_flops']['compact'], 3))
            for key in ('original_onnx', 'compact_onnx'):
                row.pop(key)
            rows.append(row)
            print(f'{task}: original {times[0]:.1f} ms, compact {times[1]:.1f} ms '
                  f'({row["speedup"]:.2f}x; backbone FLOPs ratio '
                  f'{row["backbone_flops_ratio"]:.2f}x)', flush=True)
        info = dict(machine_info(), threads=threads)
    lines = ['Whole deployed model (mmdeploy end-to-end ONNX), ONNX Runtime CPU, batch 1, median '
             f'of {repeats} runs, {info["threads"]} threads.', '',
             '| model | input (C×H×W) | original ms | compact ms | speedup | backbone FLOPs '
             'ratio | ONNX MB (original → compact) |', '|---|---|---:|---:|---:|---:|---|']
    for r in rows:
        lines.append(f'| {Path(r["config"]).stem} | {"×".join(map(str, r["input"]))} '
                     f'| {r["original_ms"]} | {r["compact_ms"]} | {r["speedup"]:.2f}× '
                     f'| {r["backbone_flops_ratio"]:.2f}× '
                     f'| {r["original_onnx_mb"]} → {r["compact_onnx_mb"]} |')
    table = '\n'.join(lines) + '\n'
    print(table)
    write_results(args.out, dict(benchmark='deployed whole-model latency', quick=args.quick,
                                 repeats=repeats, machine=info, rows=rows,
                                 wall_seconds=round(time.perf_counter() - start, 1)), table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
