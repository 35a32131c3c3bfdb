"""CPU inference: keep freed memory in the process instead of returning it to the kernel.

With glibc's default settings every allocation above the (dynamic, at most 32 MiB) mmap
threshold is a fresh ``mmap`` and every free an ``munmap``, and freed memory at the top of the
heap is trimmed; the next forward pass then page-faults its activations in again
(``tests/test_cpu_allocator.py`` counts the minor page faults per forward with and without
:func:`retain_freed_memory`). At detection input sizes (800×1333: 68 MB feature maps) those
faults cost a fixed amount per forward, the same for the original and the factorized model, so
they hide the factorization's speedup. onnxruntime has its own arena and does not pay it;
PyTorch's launch tooling preloads jemalloc / tcmalloc for the same reason.

:func:`retain_freed_memory` sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` with
``mallopt``. It is process-wide and cannot be undone (the threshold stops being dynamic);
call it once, at the start of an inference process.
"""
import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30


def retain_freed_memory(threshold_bytes: int = DEFAULT_THRESHOLD) -> bool:
    """Serve allocations below ``threshold_bytes`` from the heap and never trim it below that.

    Args:
        threshold_bytes: the new mmap and trim thresholds in bytes (>= 1 MiB). Defaults to
            1 GiB (larger than any single activation of the models benchmarked here).

    Returns:
        True when glibc accepted both settings; False where the C library is not glibc (the
        process is then left as it was).

    Raises:
        ValueError: ``threshold_bytes`` is not an int >= 1 MiB.
    """
    if isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int) \
            or threshold_bytes < (1 << 20):
        raise ValueError(f'threshold_bytes must be an int >= 1 MiB (1048576), got '
                         f'{threshold_bytes!r}')
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return False
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = getattr(libc, 'mallopt', None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    value = min(threshold_bytes, 2**31 - 1)  # mallopt takes a C int
    return bool(mallopt(M_MMAP_THRESHOLD, value)) and bool(mallopt(M_TRIM_THRESHOLD, value))
