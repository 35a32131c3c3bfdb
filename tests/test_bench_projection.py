"""benchmarks/bench_projection.py end to end on ResNet-18 (no timing asserted here: speed
lives in benchmarks/): the engine's projections meet the accuracy bound against float64
singular values, the warm pass is warm, memory is measured in the child process."""
import json
from pathlib import Path

import torch

from helpers import load_repo_script

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_projection.py'


def load_script():
    return load_repo_script(f'benchmarks/{SCRIPT.name}', 'bench_projection')


def test_quick_run_reports_accurate_warm_projections_and_measured_memory(tmp_path):
    out = tmp_path / 'projection.json'
    assert load_script().main(['--quick', '--threads', '2', '--out', str(out)]) == 0
    assert torch.get_num_threads() == 2  # restored after the cross-layer runs
    data = json.loads(out.read_text())
    cold, warm = data['rows']
    assert cold['layers'] == warm['layers'] == data['settings']['layers'] > 0
    assert set(cold['methods']) <= {'exact-f32', 'exact'}
    assert warm['methods'] == {'warm': warm['layers']}
    for row in data['rows']:
        assert 0.0 <= row['worst_excess'] <= 1e-4 and row['rank_excess'] <= 0
        assert row['svd_ms'] > 0 and row['engine_ms'] > 0
        assert row['peak_extra_mb'] > 0 and row['peak_extra_ratio'] is not None
    # the cold pass creates the warm-start bases, later passes replace them
    assert cold['bases_stored_mb'] > 0 and abs(warm['bases_stored_mb']) < 1e-6
    assert data['targets']['accuracy_within_1e4'] is True
    table = out.with_suffix('.md').read_text()
    assert '| random init (cold, first projection) |' in table
    # the warm pass's time is broken down by stage; the cold pass has no warm stages
    assert 'stages_ms' not in cold
    module = load_script()
    assert set(warm['stages_ms']) == set(module.STAGES)
    assert all(ms > 0 for ms in warm['stages_ms'].values())
    floor = sum(warm['stages_ms'][s] for s in module.UNAVOIDABLE_STAGES)
    assert abs(warm['floor_ms'] - floor) < 1e-9
    assert abs(warm['speedup_cap'] - warm['svd_ms'] / floor) < 1e-9
    assert abs(warm['rest_ms'] - (warm['engine_ms'] - sum(warm['stages_ms'].values()))) < 1e-9
    assert "Where the warm engine's time goes" in table
    # both methods are timed again with 2 layers in flight; the engine stays warm there
    across = warm['across_layers']
    assert across['workers'] == 2 and across['methods'] == {'warm': warm['layers']}
    assert across['svd_ms'] > 0 and across['engine_ms'] > 0
    assert abs(across['speedup'] - across['svd_ms'] / across['engine_ms']) < 1e-9
    assert abs(across['engine_gain'] - warm['engine_ms'] / across['engine_ms']) < 1e-9
    assert abs(across['svd_gain'] - warm['svd_ms'] / across['svd_ms']) < 1e-9
    assert '**Cross-layer parallelism**' in table and 'across_layers' not in cold
