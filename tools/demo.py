#!/usr/bin/env python
"""`make demo`: the whole LRPET workflow on CPU with the built-in VOC-layout data.

1. build the data set (data/VOCdevkit);
2. train a small Faster R-CNN with whole-model LRPET (−50 % of the whole detector's FLOPs:
   backbone, FPN, RPN and RoI head) through the upstream mmdet ``tools/train.py``;
3. factorize the checkpoint into the compact model (``tools/factorize.py``);
4. evaluate the compact model with the upstream mmdet ``tools/test.py``;
5. print the report (FLOPs, params, mAP of projected vs compact) from ``tools/report.py``.

A second run reuses the data set and a finished training run.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

from lrpet_mm.datasets import generate_synthetic_voc
from lrpet_mm.engine.checkpoint_meta import (
    check_checkpoint_ranks,
    load_checkpoint_file,
    rank_plan_from_checkpoint,
)
from lrpet_mm.models import describe_layers, factorize_checkpoint
from lrpet_mm.utils import upstream_tool
from lrpet_mm.utils.cli import tool_parser

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / 'configs' / 'lrpet' / '_toy_' / 'faster-rcnn_r18_fpn_lrpet-model_toy_voc.py'


def parse_args():
    parser = tool_parser(__doc__)
    parser.add_argument('--data-root', default='data/VOCdevkit',
                        help='VOCdevkit to create/reuse (default: %(default)s)')
    parser.add_argument('--work-dir', default='work_dirs/demo',
                        help='training run in WORK_DIR/train, compact model in WORK_DIR/compact, '
                             'report in WORK_DIR/compact/report (default: %(default)s)')
    parser.add_argument('--retrain', action='store_true', help='train again even if finished')
    return parser.parse_args()


def finished_checkpoint(work_dir: Path):
    """The last checkpoint of a finished run in ``work_dir``, or None."""
    last = work_dir / 'last_checkpoint'
    if not last.is_file():
        return None
    path = Path(last.read_text().strip())
    if not path.is_file():
        return None
    from mmengine.config import Config
    cfg = Config.fromfile(str(DEMO_CONFIG))
    meta = load_checkpoint_file(path).get('meta', {})
    stored = (meta.get('lrpet') or {}).get('settings', {})
    hook = next(h for h in cfg.custom_hooks if h['type'] == 'LRPETHook')
    same_hook = all(stored.get(k) == v for k, v in hook.items() if k != 'type')
    return path if meta.get('epoch') == cfg.train_cfg.max_epochs and same_hook else None


def main() -> int:
    args = parse_args()
    os.chdir(REPO)  # the toy configs use data_root='data/VOCdevkit/'
    data = generate_synthetic_voc(args.data_root, num_train=16, num_val=8, img_size=(160, 128),
                                  seed=0)
    print(f'[demo] data set: {data}')
    work_dir = Path(args.work_dir) / 'train'
    compact_dir = Path(args.work_dir) / 'compact'
    ckpt = None if args.retrain else finished_checkpoint(work_dir)
    if ckpt is None:
        train = upstream_tool('mmdet', 'train.py')
        cmd = [sys.executable, str(train), str(DEMO_CONFIG), '--work-dir', str(work_dir)]
        print('[demo] training with LRPET:', ' '.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        ckpt = finished_checkpoint(work_dir)
        if ckpt is None:
            raise RuntimeError(f'training finished but no final checkpoint in {work_dir}')
    else:
        print(f'[demo] reusing the finished run in {work_dir}')

    checkpoint = load_checkpoint_file(ckpt)
    plan = rank_plan_from_checkpoint(checkpoint, str(ckpt))
    checks = check_checkpoint_ranks(checkpoint, plan)
    state = checkpoint['meta']['lrpet']
    print(f'\n[demo] {ckpt}: {state["num_projections"]} LRPET projections, the last after '
          f'iteration {state["last_projected_step"]}')
    print(f'{"layer":40s} {"weight shape":>18s} {"k":>5s} {"full":>5s} {"rank now":>8s}')
    for c in checks:
        print(f'{c.name:40s} {str(c.shape):>18s} {c.planned_rank:5d} {c.full_rank:5d} '
              f'{c.numerical_rank:8d}')
    params_before = sum(layer.params_before for layer in plan.layers.values())
    params_after = sum(layer.params_after for layer in plan.layers.values())
    ok = all(c.numerical_rank <= c.planned_rank for c in checks)
    print(f'\n[demo] {len(checks)} projected layers, all at rank <= k: {ok}; their weights '
          f'would go from {params_before} to {params_after} parameters '
          f'({100 * (1 - params_after / params_before):.1f} % fewer) once factorized')
    for name, reason in plan.skipped.items():
        print(f'[demo] left alone: {name}: {reason}')
    if not ok:
        return 1

    out = factorize_checkpoint(DEMO_CONFIG, ckpt, compact_dir)
    print(f'\n[demo] factorized {describe_layers(out.compact.layers)} into two cascaded '
          'layers each:'
          f'\n  {out.config_path}\n  {out.checkpoint_path}')
    test = upstream_tool('mmdet', 'test.py')
    cmd = [sys.executable, str(test), str(out.config_path), str(out.checkpoint_path),
           '--work-dir', str(compact_dir / 'upstream_test')]
    print('[demo] evaluating the compact model with the upstream tools/test.py:',
          ' '.join(cmd), flush=True)
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    maps = re.findall(r'pascal_voc/mAP: ([0-9.]+)', result.stdout + result.stderr)
    if not maps:
        raise RuntimeError('upstream test.py printed no pascal_voc/mAP:\n' + result.stderr[-2000:])
    print(f'[demo] upstream test.py on the compact model: pascal_voc/mAP = {maps[-1]}')

    report_dir = compact_dir / 'report'
    cmd = [sys.executable, str(REPO / 'tools' / 'report.py'), str(DEMO_CONFIG), str(ckpt),
           '--lowrank-config', str(out.config_path), '--lowrank-checkpoint',
           str(out.checkpoint_path), '--work-dir', str(report_dir)]
    print('[demo] report:', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    print(f'\n[demo] done. Files: training run {work_dir}, compact model {compact_dir}, '
          f'report {report_dir}/report.md (+ report.json, ranks.png)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
