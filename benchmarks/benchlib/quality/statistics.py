"""The evidence benchmark's statistics: mean ± std over seeds, paired differences between
rows with their t interval and the smallest difference the seeds can detect (power)."""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

from benchlib.quality.configs import COMPARISONS


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n − 1) of the values that are not None.

    Returns ``(None, None)`` for no value and ``(mean, None)`` for one value.
    """
    data = [float(v) for v in values if v is not None]
    if not data:
        return None, None
    mean = sum(data) / len(data)
    if len(data) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in data) / (len(data) - 1)
    return mean, math.sqrt(var)


def t_quantile(q: float, df: int) -> float:
    """Quantile ``q`` of Student's t distribution with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(q, df))


def paired_comparison(ours: Mapping[str, Optional[float]],
                      other: Mapping[str, Optional[float]], power: float = 0.8) -> dict:
    """Paired differences ``ours − other`` over the seeds both have a value for.

    Returns n, the mean difference, its sample std, the 95 % confidence interval of the mean
    (Student's t, n − 1 degrees of freedom), the number of seeds where ours is higher (wins),
    lower (losses), and the smallest true mean difference a two-sided paired t-test at 5 %
    detects with probability ``power`` given the observed std (``(t_.975 + t_power) · s/√n``);
    None where n is too small.
    """
    seeds = sorted(k for k in ours if ours.get(k) is not None and other.get(k) is not None)
    diffs = [float(ours[k]) - float(other[k]) for k in seeds]
    n = len(diffs)
    result = dict(n=n, mean=None, std=None, ci95=None, wins=sum(d > 0 for d in diffs),
                  losses=sum(d < 0 for d in diffs), detectable=None, diffs=diffs,
                  seeds=seeds)
    if n == 0:
        return result
    mean, std = mean_std(diffs)
    result.update(mean=mean, std=std)
    if n >= 2:
        half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
        result['ci95'] = [mean - half, mean + half]
        result['detectable'] = ((t_quantile(0.975, n - 1) + t_quantile(power, n - 1))
                                * std / math.sqrt(n))
    return result


def verdict(comparison: dict, ours: str = 'LRPET') -> str:
    """What the interval supports: '<ours> better', '<ours> worse', or 'no difference larger
    than X' where X bounds |difference| at 95 % (the interval's farther end)."""
    ci = comparison.get('ci95')
    if not ci:
        return 'n/a'
    if ci[0] > 0:
        return f'{ours} better'
    if ci[1] < 0:
        return f'{ours} worse'
    return f'no difference larger than {max(abs(ci[0]), abs(ci[1])):.1f} points'


def metric_by_seed(row: dict) -> Dict[str, Optional[float]]:
    return {seed: entry.get('metric_pct') for seed, entry in row.get('seeds', {}).items()
            if not entry.get('error')}


def summarize_row(row: dict) -> dict:
    """n, mean ± std of the metric (percent) and of the training time, the complexity (equal
    for every seed; None if the seeds disagree) and the error count."""
    seeds = row.get('seeds', {})
    good = [entry for entry in seeds.values() if not entry.get('error')]
    mean, std = mean_std([entry.get('metric_pct') for entry in good])
    train_mean, _ = mean_std([entry.get('train_s') for entry in good])
    summary = dict(n=len(good), metric_mean=mean, metric_std=std, train_s_mean=train_mean,
                   errors=sum(1 for entry in seeds.values() if entry.get('error')))
    for key in ('backbone_flops', 'backbone_params', 'model_flops', 'model_params'):
        values = {entry.get(key) for entry in good}
        summary[key] = values.pop() if len(values) == 1 else None
    return summary


def compare_rows(task: dict) -> Dict[str, dict]:
    """Each pair of :data:`COMPARISONS` whose rows ran, keyed ``'<ours> - <other>'``:
    :func:`paired_comparison` of ``ours − other`` + verdict."""
    rows = task['rows']
    out = {}
    for ours, other in COMPARISONS:
        if ours not in rows or other not in rows:
            continue
        comparison = paired_comparison(metric_by_seed(rows[ours]), metric_by_seed(rows[other]))
        comparison.update(ours=ours, other=other,
                          verdict=verdict(comparison, rows[ours]['label']))
        out[f'{ours} - {other}'] = comparison
    return out
