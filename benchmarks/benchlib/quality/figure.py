"""The evidence benchmark's figure: each row's metric (mean with its 95 % interval over the
paired seeds) against its deployed whole-model latency (median, with the spread over timing
rounds) and against its whole-model test-time FLOPs; one point per row, written next to the
tables as ``quality_<task>.png``."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

from benchlib.quality.configs import ROW_KEYS
from benchlib.quality.statistics import summarize_row, t_quantile
from lrpet_mm.utils.atomic import atomic_path

#: Marker per method family (LRPET, channel pruning, LRA, baseline).
_STYLE = {'baseline': ('k', 'o'), 'lrpet': ('C0', 's'), 'paper': ('C0', 'v'),
          'lrpet_model_eq': ('C0', 'D'), 'lrpet_model_half': ('C0', '^'),
          'prune': ('C3', 's'), 'prune_model_eq': ('C3', 'D'), 'prune_model_half': ('C3', '^'),
          'lra_half': ('C2', 's'), 'lra_pretrained': ('C2', 'v')}


def metric_interval(row: dict) -> Optional[Tuple[float, float]]:
    """``(mean, half-width of the 95 % t interval)`` of a row's metric over its seeds
    (half-width 0 with one seed), or None without a result."""
    summary = row.get('summary') or summarize_row(row)
    mean, std, n = summary.get('metric_mean'), summary.get('metric_std'), summary.get('n')
    if mean is None:
        return None
    if not n or n < 2 or std is None:
        return mean, 0.0
    return mean, t_quantile(0.975, n - 1) * std / n ** 0.5


def figure_points(task: dict) -> Dict[str, dict]:
    """Per row with a metric: its label, metric interval, whole-model FLOPs (G) and deployed
    latency (median ms and its round-to-round range, when timed)."""
    latency = (task.get('latency') or {}).get('rows') or {}
    points = {}
    for key in ROW_KEYS:
        row = task['rows'].get(key)
        interval = None if row is None else metric_interval(row)
        if interval is None:
            continue
        summary = row.get('summary') or summarize_row(row)
        lat = latency.get(key) or {}
        flops = summary.get('model_flops')
        points[key] = dict(label=row['label'], metric=interval[0], ci=interval[1],
                           gflops=None if flops is None else flops / 1e9,
                           latency_ms=lat.get('median_ms'), latency_range=lat.get('range_ms'))
    return points


def write_figure(task: dict, path: Path, title: str) -> Optional[Path]:
    """Draw the two panels for one task's results into ``path`` (PNG, atomically); None when
    no row has a metric yet."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    points = figure_points(task)
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = ((axes[0], 'latency_ms', 'deployed whole model, ONNX Runtime, batch 1 (ms)'),
              (axes[1], 'gflops', 'whole-model test-time FLOPs (G multiply-adds)'))
    for ax, x_key, x_label in panels:
        for key, p in points.items():
            if p[x_key] is None:
                continue
            color, marker = _STYLE.get(key, ('C7', 'o'))
            xerr = None
            if x_key == 'latency_ms' and p['latency_range']:
                lo, hi = p['latency_range']
                xerr = [[p[x_key] - lo], [hi - p[x_key]]]
            ax.errorbar(p[x_key], p['metric'], yerr=p['ci'], xerr=xerr, fmt=marker,
                        color=color, capsize=3, label=p['label'])
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f'{task["metric_label"]} (%), mean ± 95 % CI')
    handles, labels = axes[1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='center left', bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110, bbox_inches='tight')
    plt.close(fig)
    return path
