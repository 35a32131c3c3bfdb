"""Small value helpers shared by the report, the tools and the benchmarks."""
import math


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
