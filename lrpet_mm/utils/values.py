"""Small value helpers shared by the report, the tools and the benchmarks."""
import math
import numbers
from typing import Dict

import numpy as np
import torch


def error_text(e: BaseException, limit: int = 300) -> str:
    """``'Type: message'`` on one line, cut to ``limit`` characters."""
    text = ' '.join(str(e).split())
    text = f'{type(e).__name__}: {text}' if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


def finite_or_none(value):
    """``value`` with every non-finite float replaced by None, recursively through dicts,
    lists and tuples (JSON has no NaN; e.g. an IoU metric over classes the test set never
    shows)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def metric_values(metrics: Dict[str, object]) -> Dict[str, object]:
    """Metric values as Python floats where they are numbers (evaluators return numpy scalars,
    0-d arrays or one-element tensors); other values unchanged."""
    def to_float(value):
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, (np.ndarray, np.generic, torch.Tensor)) and np.size(value) == 1:
            return float(value)
        return value

    return {k: to_float(v) for k, v in metrics.items()}
