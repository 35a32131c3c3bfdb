"""benchmarks/bench_rank_alignment.py --quick end to end (no timing asserted: speed lives in
benchmarks/): every layer gets its unaligned rank first, then multiples of 8, all timed."""
import json
from pathlib import Path

from helpers import load_repo_script

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_rank_alignment.py'


def load_script():
    return load_repo_script(f'benchmarks/{SCRIPT.name}', 'bench_rank_alignment')


def test_quick_run_times_every_rank_variant_of_every_layer(tmp_path):
    out = tmp_path / 'rank_alignment.json'
    module = load_script()
    assert module.main(['--quick', '--threads', '1', '--out', str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r['layer'] for r in data['rows']] == [layer[0] for layer in module.LAYERS]
    for row, layer in zip(data['rows'], module.LAYERS):
        ranks = list(layer[-1])
        assert row['ranks'] == ranks and ranks[0] % 8 != 0
        assert all(k % 8 == 0 for k in ranks[1:])
        assert len(row['ms']) == len(ranks) and all(ms > 0 for ms in row['ms'])
        assert row['unfactorized_ms'] > 0
    table = out.with_suffix('.md').read_text()
    assert 'median of 3 runs after 1 warm-ups' in table
    assert table.startswith('| layer | conv |') and '| layer1.x.conv2 |' in table
