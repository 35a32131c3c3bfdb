"""benchmarks/bench_dead_channels.py: dead conv rows after LRPET training from scratch."""
import json

import pytest
import torch
from torch import nn

from helpers import load_repo_script

pytestmark = pytest.mark.slow  # drives a runner, a training, a tool or a benchmark


def load_script():
    return load_repo_script('benchmarks/bench_dead_channels.py', 'bench_dead_channels')


def test_dead_rows_counts_rows_below_one_percent_of_the_layer_median():
    module = nn.Sequential(nn.Conv2d(2, 5, 1), nn.Conv2d(5, 3, 3))
    with torch.no_grad():
        module[0].weight.fill_(1.0)
        module[0].weight[1] = 0.005  # 0.5 % of the median row norm: dead
        module[0].weight[2] = 0.02   # 2 %: alive
        module[1].weight.fill_(1.0)
    assert load_script().dead_rows(module) == {'0': 1}


def test_quick_run_shows_eq16_kills_channels_and_in_span_does_not(tmp_path):
    """From scratch (zero-initialized last BN of each block), the paper's eq. 16 leaves dead
    rows after a few projections; the default in-span recovery leaves none."""
    out = tmp_path / 'dead.json'
    assert load_script().main(['--quick', '--out', str(out)]) == 0
    rows = json.loads(out.read_text())['rows']
    by = {(r['task'], r['bn_recovery']): r['dead_rows'] for r in rows}
    for task in ('detection', 'segmentation'):
        assert by[(task, None)] == 0, by
        assert by[(task, 'eq16')] > 0, by
        assert by[(task, 'in_span')] == 0, by
    table = out.with_suffix('.md').read_text()
    for r in rows:  # the Markdown table has one row per run, with the JSON's counts
        assert (f'| {r["task"]} | {r["row"]} | {r["dead_rows"]} | '
                f'{r["layers_with_dead_rows"]} |') in table
