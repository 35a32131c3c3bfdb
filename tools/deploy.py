#!/usr/bin/env python
"""Deploy a compact (or original) detector / segmentor end to end with mmdeploy: write the
ONNX model of the whole model and the mmdeploy deploy config it used.

example:
    python tools/deploy.py DIR/<name>_lowrank.py DIR/<name>_lowrank.pth \
        --backend onnxruntime --work-dir DEPLOY_DIR [--test]

writes DEPLOY_DIR/end2end.onnx and DEPLOY_DIR/deploy_cfg.py (reusable with mmdeploy's own tools;
with --backend tensorrt its deploy config builds a TensorRT engine on a GPU machine). --test
runs the config's test loop on the deployed model in ONNX Runtime and prints its metrics.
"""
import sys

from lrpet_mm.deploy.mmdeploy_export import BACKENDS, deploy_model, evaluate_deployed
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
    add_input_shape(parser, 'image size the export is traced at, and the TensorRT optimal '
                    'shape (default: from the config)')
    parser.add_argument('--test', action='store_true',
                        help='evaluate the deployed model (ONNX Runtime) with the config\'s '
                             'test loop; logs in WORK_DIR/test')
    add_cfg_options(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def deploy() -> int:
        if args.test and args.backend != 'onnxruntime':
            raise ValueError('--test runs the deployed model in ONNX Runtime: use '
                             '--backend onnxruntime')
        paths = deploy_model(args.config, args.checkpoint, args.work_dir, args.backend,
                             args.cfg_options, args.input_shape)
        print(f'onnx:          {paths["onnx"]}')
        print(f'deploy config: {paths["deploy_cfg"]}')
        if args.test:
            metrics = evaluate_deployed(args.config, paths['onnx'], paths['deploy_cfg'],
                                        f'{args.work_dir}/test', args.cfg_options)
            for name, value in metrics.items():
                print(f'{name}: {value:.4f}' if isinstance(value, float) else f'{name}: {value}')
        return 0

    return run_tool(deploy, errors=(FileNotFoundError, PermissionError, ValueError, KeyError,
                                    ImportError))


if __name__ == '__main__':
    sys.exit(main())
