"""Deployment: ONNX export of the backbone alone with an onnxruntime check (latency studies;
whole detectors / segmentors are deployed with ``tools/deploy.py``, see
:mod:`lrpet_mm.deploy.mmdeploy_export`), the latency-aware merge of low-rank layers (eager NCHW
or channels_last, or onnxruntime), BN folding for eager timings, the CPU allocator setting for
eager inference. ``onnx`` / ``onnxruntime`` are imported only when exporting or timing in
onnxruntime."""
from .cpu_allocator import retain_freed_memory
from .export_modules import (
    PARTS,
    check_part,
    export_wrapper,
    output_names,
)
from .fold import fold_batchnorms
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

__all__ = ['retain_freed_memory', 'MEMORY_FORMATS', 'check_memory_format', 'fold_batchnorms',
           'LatencyMergeResult', 'LayerLatency', 'capture_input_shapes',
           'latency_aware_merge', 'low_rank_layers', 'merge_low_rank', 'time_layer_pair',
           'ERROR_METRIC', 'PARTS', 'ExportResult', 'OnnxCheck', 'OnnxMismatchError',
           'check_onnx_path', 'check_part',
           'export_onnx', 'export_wrapper', 'format_size', 'load_model', 'max_normalized_error',
           'output_names', 'default_threads', 'interleaved_median_ms',
           'ort_runner', 'ort_session', 'torch_threads']
