"""Figures of the LRPET report (matplotlib, Agg backend: no display needed)."""
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ..utils.atomic import atomic_path

PathLike = Union[str, os.PathLike]


def _short(name: str) -> str:
    return name[len('backbone.'):] if name.startswith('backbone.') else name


def plot_ranks(layers: Sequence[Mapping], spectra: Sequence[Mapping], path: PathLike,
               title: Optional[str] = None) -> None:
    """Write a PNG with the kept vs full rank of each layer and a few singular-value spectra.

    Args:
        layers: one mapping per factorized layer, in model order, with ``name``, ``rank`` (kept
            rank k) and ``full_rank`` (min(m, n)).
        spectra: one mapping per plotted layer with ``name``, ``rank``, ``folded`` (whether the
            BN scale was folded in) and ``singular_values`` (descending).
        path: the PNG to write; written to a temporary file and renamed (atomic).
        title: optional figure title.
    """
    # the Agg canvas directly (no pyplot): no display needed, the global backend is untouched
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_spec = max(1, len(spectra))
    fig = Figure(figsize=(max(8.0, 3.2 * n_spec), 7.5), layout='constrained')
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, n_spec, height_ratios=(1.1, 1.0))

    ax = fig.add_subplot(grid[0, :])
    x = np.arange(len(layers))
    full = [int(layer['full_rank']) for layer in layers]
    kept = [int(layer['rank']) for layer in layers]
    ax.bar(x, full, color='#c9d6e8', label='full rank min(m, n)')
    ax.bar(x, kept, color='#2b6cb0', label='kept rank k')
    ax.set_xticks(x)
    ax.set_xticklabels([_short(layer['name']) for layer in layers], rotation=70, ha='right',
                       fontsize=7 if len(layers) <= 30 else 5)
    ax.set_ylabel('rank')
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.legend(loc='upper left', fontsize=8)
    ax.set_title('per-layer rank (kept / full)')

    for i, spec in enumerate(spectra):
        ax = fig.add_subplot(grid[1, i])
        values = np.asarray(spec['singular_values'], dtype=np.float64)
        if values.size:
            floor = max(values[0], 1e-300) * 1e-16  # exact zeros cannot go on a log axis
            ax.semilogy(np.arange(1, values.size + 1), np.maximum(values, floor), '.-',
                        markersize=3, linewidth=1, color='#2b6cb0')
        ax.axvline(int(spec['rank']) + 0.5, color='#c53030', linestyle='--', linewidth=1,
                   label=f'k = {int(spec["rank"])}')
        ax.set_title(_short(spec['name']), fontsize=9)
        ax.set_xlabel('index')
        if i == 0:
            ax.set_ylabel('singular value (BN-folded weight)'
                          if spec.get('folded') else 'singular value')
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)
