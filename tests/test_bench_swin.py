"""benchmarks/bench_swin.py --quick end to end (no timing asserted: speed lives in
benchmarks/): a tiny Swin is planned, projected, factorized, counted, exported, checked and
timed; bad arguments are refused."""
import json

import pytest

from helpers import load_repo_script

pytestmark = pytest.mark.slow  # drives a runner, a training, a tool or a benchmark


def load_script():
    return load_repo_script('benchmarks/bench_swin.py', 'bench_swin')


def test_quick_run_counts_exports_and_times_the_compact_swin(tmp_path):
    out = tmp_path / 'swin.json'
    script = load_script()
    assert script.main(['--quick', '--threads', '1', '--repeats', '1', '--warmup', '0',
                        '--out', str(out)]) == 0
    data = json.loads(out.read_text())
    assert data['settings']['quick'] and data['settings']['input_shape'] == [3, 64, 64]
    assert data['backbone']['embed_dims'] == 32
    plan = data['plan']
    assert plan['layer_kinds'] == ['linear'] and plan['layers'] == 27
    assert abs(plan['counted_reduction'] - 0.3) <= 0.007 + 1e-9  # within 1 % of the target
    assert all(k % 8 == 0 for k in plan['ranks'].values())  # the config's rank_multiple=8
    flops, params, onnx = data['flops'], data['params'], data['onnx']
    assert flops['compact'] < flops['original'] and params['compact'] < params['original']
    assert abs(flops['compact'] - 0.7 * flops['original']) <= 0.01 * 0.7 * flops['original']
    assert onnx['compact_bytes'] < onnx['original_bytes']
    assert max(onnx['original_check'], onnx['compact_check'],
               onnx['compact_vs_original_pytorch']) <= 1e-4
    assert data['latency_ms']['original'] > 0 and data['latency_ms']['compact'] > 0
    table = out.with_suffix('.md').read_text()
    assert table.startswith('| model | input | FLOPs (G) |')
    assert 'compact (27 linear layers factorized)' in table and 'median of 1 runs' in table


def test_bad_arguments_are_refused(capsys, tmp_path):
    script = load_script()
    assert script.main(['--input', '512x0']) == 2
    assert "--input takes a size like 512x512, got '512x0'" in capsys.readouterr().err
    assert script.main(['--threads', '0']) == 2
    assert '--threads must be >= 1, got 0' in capsys.readouterr().err
    assert script.main(['--config', str(tmp_path / 'nope.py')]) == 2
    assert 'does not exist' in capsys.readouterr().err
