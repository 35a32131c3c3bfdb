"""Deploy a whole (compact) detector or segmentor the way OpenMMLab users do: through mmdeploy.

:func:`deploy_model` writes, into one directory, the end-to-end ONNX model that
``mmdeploy.apis.torch2onnx`` exports (for Faster R-CNN: backbone, neck, RPN, RoI head and NMS;
for a segmentor: logits and argmax) and the mmdeploy deploy config it used (``deploy_cfg.py``),
so the pair can be reused with mmdeploy's own tools — and, with ``backend='tensorrt'``, turned
into a TensorRT engine on a GPU machine. An ONNX Runtime export extracts RoI features with
:mod:`lrpet_mm.deploy.roi_extractor` (mmdeploy's numbers without its per-level ``ScatterND``).
:func:`evaluate_deployed` runs the config's test loop on the deployed model (ONNX Runtime with
mmdeploy's custom ops) and returns the metrics.

Workaround (named, see ``Makefile``): mmdeploy 1.3.1 declares ``protobuf<=3.20.2``, which
conflicts with the ``onnx`` this project pins; ``make install`` installs mmdeploy with
``--no-deps`` and its runtime dependencies from ``requirements.txt``, keeping onnx's protobuf.
Export and ONNX Runtime inference work with it (``tests/test_mmdeploy.py``).
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
from mmengine.config import Config

from ..engine.input_shape import resolve_input_shape
from ..utils.atomic import check_writable_dir
from ..utils.values import metric_values

PathLike = Union[str, os.PathLike]

#: Backends :func:`deploy_model` writes a deploy config for.
BACKENDS = ('onnxruntime', 'tensorrt')
ONNX_FILE = 'end2end.onnx'
DEPLOY_CONFIG_FILE = 'deploy_cfg.py'
OPSET = 11


def mmdeploy_ops_library() -> str:
    """Path of mmdeploy's ONNX Runtime custom-op library (NMS, RoIAlign ... of its end-to-end
    graphs), to register in an ``onnxruntime.SessionOptions``."""
    from mmdeploy.backend.onnxruntime.init_plugins import get_ops_path

    path = get_ops_path()
    if not path or not os.path.isfile(path):
        raise ImportError('mmdeploy\'s ONNX Runtime custom-op library was not found (is '
                          'mmdeploy installed with `make install`?)')
    return path


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    return backend


def deploy_config(model_cfg: Config, backend: str = 'onnxruntime',
                  input_shape: Optional[Sequence[int]] = None) -> Config:
    """The mmdeploy deploy config for ``model_cfg`` (an mmdet or mmseg config): end-to-end ONNX
    with dynamic batch and image size, opset 11, post-processing from the model's own
    ``test_cfg`` (mmdeploy reads ``score_thr`` / NMS IoU / ``max_per_img`` from it), and the
    ``backend`` section (TensorRT: input shapes around ``input_shape`` = (C, H, W), default
    from the config)."""
    check_backend(backend)
    scope = model_cfg.get('default_scope', None)
    dynamic = {0: 'batch', 2: 'height', 3: 'width'}
    if scope == 'mmdet':
        onnx_config = dict(output_names=['dets', 'labels'],
                           dynamic_axes=dict(input=dynamic, dets={0: 'batch', 1: 'num_dets'},
                                             labels={0: 'batch', 1: 'num_dets'}))
        codebase_config = dict(
            type='mmdet', task='ObjectDetection', model_type='end2end',
            post_processing=dict(score_threshold=0.0, confidence_threshold=0.005,
                                 iou_threshold=0.5, max_output_boxes_per_class=200,
                                 pre_top_k=5000, keep_top_k=100, background_label_id=-1))
    elif scope == 'mmseg':
        onnx_config = dict(output_names=['output'],
                           dynamic_axes=dict(input=dynamic,
                                             output={0: 'batch', 2: 'height', 3: 'width'}))
        codebase_config = dict(type='mmseg', task='Segmentation', with_argmax=True)
    else:
        raise ValueError(f'the config has default_scope {scope!r}; deployment supports '
                         "'mmdet' (detection) and 'mmseg' (segmentation) configs")
    onnx_config.update(type='onnx', export_params=True, keep_initializers_as_inputs=False,
                       opset_version=OPSET, save_file=ONNX_FILE, input_names=['input'],
                       input_shape=None, optimize=True)
    backend_config = dict(type=backend)
    if backend == 'tensorrt':
        c, h, w = resolve_input_shape(model_cfg, input_shape)
        shapes = dict(min_shape=[1, c, max(32, h // 2), max(32, w // 2)],
                      opt_shape=[1, c, h, w], max_shape=[1, c, 2 * h, 2 * w])
        backend_config.update(common_config=dict(fp16_mode=False, max_workspace_size=1 << 30),
                              model_inputs=[dict(input_shapes=dict(input=shapes))])
    return Config(dict(onnx_config=onnx_config, codebase_config=codebase_config,
                       backend_config=backend_config))


def example_image(model_cfg: Config, input_shape: Optional[Sequence[int]] = None
                  ) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 image of the config's test size, to trace the export
    (the graph has dynamic image size, so its content and size only steer the trace)."""
    _, h, w = resolve_input_shape(model_cfg, input_shape)
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def deploy_model(config: PathLike, checkpoint: PathLike, work_dir: PathLike,
                 backend: str = 'onnxruntime', cfg_options: Optional[dict] = None,
                 input_shape: Optional[Sequence[int]] = None) -> Dict[str, Path]:
    """Export ``config`` + ``checkpoint`` (e.g. ``tools/factorize.py``'s compact pair) end to
    end with mmdeploy into ``work_dir``: ``end2end.onnx`` and ``deploy_cfg.py``.

    The export runs in a temporary directory beside ``work_dir``'s files and both are renamed
    into place only when it succeeded, so a failure leaves no partial output.

    Returns:
        ``{'onnx': path, 'deploy_cfg': path}``.
    """
    from mmdeploy.apis import torch2onnx

    from ..models.loading import load_config
    from . import roi_extractor  # noqa: F401 (registers the ScatterND-free RoI extractor)

    cfg = load_config(config, cfg_options)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {os.fspath(checkpoint)!r} does not exist')
    deploy_cfg = deploy_config(cfg, backend, input_shape)
    out = check_writable_dir(work_dir)
    paths = dict(onnx=out / ONNX_FILE, deploy_cfg=out / DEPLOY_CONFIG_FILE)
    with tempfile.TemporaryDirectory(prefix='.lrpet_deploy_', dir=out) as tmp:
        torch2onnx(example_image(cfg, input_shape), tmp, ONNX_FILE, deploy_cfg, cfg,
                   os.fspath(checkpoint), device='cpu')
        exported = Path(tmp) / ONNX_FILE
        if not exported.is_file():
            raise RuntimeError(f'mmdeploy wrote no {ONNX_FILE} for config '
                               f'{os.fspath(config)!r}')
        deploy_cfg.dump(str(Path(tmp) / DEPLOY_CONFIG_FILE))
        for name in (ONNX_FILE, DEPLOY_CONFIG_FILE):
            shutil.move(str(Path(tmp) / name), str(out / name))
    return paths


def backend_model(config: PathLike, onnx_file: PathLike, deploy_cfg: PathLike,
                  cfg_options: Optional[dict] = None):
    """``(task processor, model)``: the deployed ONNX model run by mmdeploy's ONNX Runtime
    wrapper (mmdeploy's custom-op library registered), as an mmengine model whose
    ``test_step`` returns data samples like the PyTorch model's."""
    from mmdeploy.apis.utils import build_task_processor

    from ..models.loading import load_config

    cfg = load_config(config, cfg_options)
    processor = build_task_processor(cfg, Config.fromfile(os.fspath(deploy_cfg)), 'cpu')
    model = processor.build_backend_model([os.fspath(onnx_file)],
                                          processor.update_data_preprocessor)
    return processor, model


def evaluate_deployed(config: PathLike, onnx_file: PathLike, deploy_cfg: PathLike,
                      work_dir: PathLike, cfg_options: Optional[dict] = None
                      ) -> Dict[str, float]:
    """Metrics of the config's test loop (VOCMetric / IoUMetric ...) computed from the deployed
    model's outputs (ONNX Runtime), logs in ``work_dir``."""
    processor, model = backend_model(config, onnx_file, deploy_cfg, cfg_options)
    runner = processor.build_test_runner(model, os.fspath(work_dir), log_file=None, show=False,
                                         show_dir=None, wait_time=0, interval=1,
                                         dataloader=None)
    return metric_values(runner.test())
