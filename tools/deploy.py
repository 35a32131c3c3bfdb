#!/usr/bin/env python
"""Deploy a compact (or original) detector / segmentor end to end with mmdeploy: write the
ONNX model of the whole model and the mmdeploy deploy config it used.

example:
    python tools/deploy.py DIR/<name>_lowrank.py DIR/<name>_lowrank.pth \
        --backend onnxruntime --work-dir DEPLOY_DIR [--test]

writes DEPLOY_DIR/end2end.onnx and DEPLOY_DIR/deploy_cfg.py (reusable with mmdeploy's own tools;
with --backend tensorrt its deploy config builds a TensorRT engine on a GPU machine). --test
runs the config's test loop on the deployed model in ONNX Runtime and prints its metrics.

Latency-aware merge (--backend onnxruntime, on by default for a compact model): each low-rank
layer is timed in ONNX Runtime on this machine, at the deployment input size, against the one
dense layer it factorizes; those measured slower factorized are merged back first, and the
model that is exported is written as DEPLOY_DIR/<name>_merged.py / .pth (the config and
checkpoint to use with the ONNX file in mmdeploy's tools). Run it on the CPU you deploy to;
--no-latency-aware exports the compact pair as it is.
"""
import sys

from lrpet_mm.deploy.latency import low_rank_layers
from lrpet_mm.deploy.merged_checkpoint import latency_merge_checkpoint
from lrpet_mm.deploy.mmdeploy_export import BACKENDS, deploy_model, evaluate_deployed
from lrpet_mm.engine.checkpoint_meta import META_KEY, load_checkpoint_file
from lrpet_mm.models.loading import build_model_from_config, load_config
from lrpet_mm.utils.cli import add_cfg_options, add_input_shape, run_tool, tool_parser


def parse_args(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument('config', help="model config (e.g. tools/factorize.py's *_lowrank.py)")
    parser.add_argument('checkpoint', help='checkpoint matching the config')
    parser.add_argument('--work-dir', required=True,
                        help='directory the ONNX model and the deploy config are written to')
    parser.add_argument('--backend', choices=BACKENDS, default='onnxruntime',
                        help='inference backend the deploy config is for (default: '
                             '%(default)s)')
    add_input_shape(parser, 'image size the export is traced at, the latency-aware merge is '
                    'timed at, and the TensorRT optimal shape (default: from the config)')
    parser.add_argument('--test', action='store_true',
                        help='evaluate the deployed model (ONNX Runtime) with the config\'s '
                             'test loop; logs in WORK_DIR/test')
    parser.add_argument('--no-latency-aware', action='store_true',
                        help='keep every low-rank layer factorized (no timing, no merge)')
    parser.add_argument('--merge-margin', type=float, default=0.05,
                        help='merge a layer when factorized > (1 + margin) x merged time '
                             '(default: %(default)s)')
    parser.add_argument('--merge-repeats', type=int, default=10,
                        help='timed runs per layer (median, after 2 warm-up runs; default: '
                             '%(default)s)')
    parser.add_argument('--threads', type=int, default=None,
                        help='ONNX Runtime threads for the merge timing (default: all cores)')
    add_cfg_options(parser)
    return parser.parse_args(argv)


def has_low_rank_layers(config, cfg_options) -> bool:
    """Whether the config builds a compact model (no weights loaded: structure only)."""
    return bool(low_rank_layers(build_model_from_config(load_config(config, cfg_options))))


def refuse_unfactorized(args, low_rank: bool) -> None:
    """A training checkpoint of LRPETHook is low-rank but still full size: deploying it would
    export the full-size model. Tell the user to factorize it first (``low_rank``: whether
    the config builds low-rank layers)."""
    if low_rank:
        return
    meta = load_checkpoint_file(args.checkpoint).get('meta') or {}
    if (meta.get(META_KEY) or {}).get('plan'):
        raise ValueError(
            f'checkpoint {args.checkpoint!r} was trained with LRPETHook: its layers are '
            'low-rank but not yet factorized, so it would deploy at full size. Run '
            f'tools/factorize.py {args.config} {args.checkpoint} --work-dir DIR first, then '
            'deploy DIR/<name>_lowrank.py and DIR/<name>_lowrank.pth')


def merge_first(args, low_rank: bool) -> tuple:
    """The (config, checkpoint) to export: the latency-aware merged pair written into the work
    directory, or the given pair where the merge does not apply (printing why;
    ``low_rank``: whether the config builds low-rank layers)."""
    if args.no_latency_aware:
        return args.config, args.checkpoint
    if args.backend != 'onnxruntime':
        print('latency-aware merge skipped: it is timed in ONNX Runtime on this CPU, not in '
              f'{args.backend}')
        return args.config, args.checkpoint
    if not low_rank:
        print('latency-aware merge skipped: the model has no low-rank layer')
        return args.config, args.checkpoint
    merged = latency_merge_checkpoint(
        args.config, args.checkpoint, args.work_dir, args.input_shape,
        cfg_options=args.cfg_options, repeats=args.merge_repeats, margin=args.merge_margin,
        threads=args.threads)
    print(merged.merge.summary())
    print(f'merged config:     {merged.config_path}')
    print(f'merged checkpoint: {merged.checkpoint_path}')
    return merged.config_path, merged.checkpoint_path


def main(argv=None) -> int:
    args = parse_args(argv)

    def deploy() -> int:
        if args.test and args.backend != 'onnxruntime':
            raise ValueError('--test runs the deployed model in ONNX Runtime: use '
                             '--backend onnxruntime')
        low_rank = has_low_rank_layers(args.config, args.cfg_options)
        refuse_unfactorized(args, low_rank)
        config, checkpoint = merge_first(args, low_rank)
        paths = deploy_model(config, checkpoint, args.work_dir, args.backend,
                             args.cfg_options, args.input_shape)
        print(f'onnx:          {paths["onnx"]}')
        print(f'deploy config: {paths["deploy_cfg"]}')
        if args.test:
            metrics = evaluate_deployed(config, paths['onnx'], paths['deploy_cfg'],
                                        f'{args.work_dir}/test', args.cfg_options)
            for name, value in metrics.items():
                print(f'{name}: {value:.4f}' if isinstance(value, float) else f'{name}: {value}')
        return 0

    return run_tool(deploy, errors=(FileNotFoundError, PermissionError, ValueError, KeyError,
                                    ImportError))


if __name__ == '__main__':
    sys.exit(main())
