"""Deployment: ONNX export of the backbone alone with an onnxruntime check (latency studies;
whole detectors / segmentors are deployed with ``tools/deploy.py``, see
:mod:`lrpet_mm.deploy.mmdeploy_export`), the latency-aware merge of low-rank layers (eager NCHW
or channels_last, or onnxruntime) and its timing helpers. ``onnx`` / ``onnxruntime`` are
imported only when exporting or timing in onnxruntime."""
from .export_modules import (
    export_wrapper,
    output_names,
)
from .latency import (
    LatencyMergeResult,
    LayerLatency,
    capture_input_shapes,
    latency_aware_merge,
    low_rank_layers,
    merge_low_rank,
    time_layer_pair,
)
from .onnx_export import (
    ERROR_METRIC,
    ExportResult,
    OnnxCheck,
    OnnxMismatchError,
    check_onnx_path,
    export_onnx,
    format_size,
    load_model,
    max_normalized_error,
)
from .timing import (
    MEMORY_FORMATS,
    check_memory_format,
    default_threads,
    interleaved_median_ms,
    ort_runner,
    ort_session,
    torch_threads,
)

__all__ = ['MEMORY_FORMATS', 'check_memory_format',
           'LatencyMergeResult', 'LayerLatency', 'capture_input_shapes',
           'latency_aware_merge', 'low_rank_layers', 'merge_low_rank', 'time_layer_pair',
           'ERROR_METRIC', 'ExportResult', 'OnnxCheck', 'OnnxMismatchError',
           'check_onnx_path',
           'export_onnx', 'export_wrapper', 'format_size', 'load_model', 'max_normalized_error',
           'output_names', 'default_threads', 'interleaved_median_ms',
           'ort_runner', 'ort_session', 'torch_threads']
