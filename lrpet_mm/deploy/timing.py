"""Wall-clock latency helpers shared by the latency-aware merge and ``benchmarks/``.

Every measurement is the median of ``repeats`` timed calls after ``warmup`` untimed ones. When
several candidates are compared they are timed *interleaved* (A, B, A, B, ...), so a slow
phase of a shared machine hits all of them alike.
"""
import os
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch


def default_threads() -> int:
    """Number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_threads(threads: Optional[int]) -> int:
    """``threads`` validated (a positive int), or :func:`default_threads` for None."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f'threads must be a positive integer, got {threads!r}')
    return threads


MEMORY_FORMATS = {'contiguous': torch.contiguous_format, 'channels_last': torch.channels_last}
"""Eager PyTorch activation / weight layouts: NCHW, or NHWC strides (oneDNN's fast path)."""


def check_memory_format(name: str) -> torch.memory_format:
    """The ``torch.memory_format`` named ``name`` (a key of :data:`MEMORY_FORMATS`)."""
    if name not in MEMORY_FORMATS:
        raise ValueError(f'memory_format must be one of {sorted(MEMORY_FORMATS)}, got {name!r}')
    return MEMORY_FORMATS[name]


def check_repeats(repeats: int, warmup: int) -> None:
    for name, value, low in (('repeats', repeats, 1), ('warmup', warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')


@contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[int]:
    """Run PyTorch's intra-op pool with ``threads`` threads (None: all cores) inside."""
    threads = check_threads(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def interleaved_median_ms(fns: Sequence[Callable[[], Any]], repeats: int,
                          warmup: int) -> List[float]:
    """Median wall time (ms) of each callable, timed round-robin ``repeats`` times."""
    check_repeats(repeats, warmup)
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(bucket) for bucket in times]


def ort_session(model: Union[str, os.PathLike, bytes], threads: Optional[int] = None,
                custom_ops_library: Optional[Union[str, os.PathLike]] = None):
    """An onnxruntime ``InferenceSession`` on ``CPUExecutionProvider`` with ``threads``
    intra-op threads (None: all cores), one inter-op thread, all graph optimizations, and
    ``custom_ops_library`` registered (e.g. mmdeploy's, for its end-to-end graphs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if custom_ops_library is not None:
        options.register_custom_ops_library(os.fspath(custom_ops_library))
    options.intra_op_num_threads = check_threads(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=['CPUExecutionProvider'])


def ort_runner(session, inputs: np.ndarray) -> Callable[[], Any]:
    """A callable running ``session`` on its single input ``inputs`` (float32 NCHW)."""
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(inputs, dtype=np.float32)}
    return lambda: session.run(None, feed)
