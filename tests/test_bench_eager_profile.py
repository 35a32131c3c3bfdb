"""benchmarks/bench_eager_profile.py end to end on a small input (run in a child process: the
script sets glibc's allocator for its whole process). No timing is asserted (speed lives in
benchmarks/): the rows are complete and consistent, and the profile finds the convolutions."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import load_repo_script

pytestmark = pytest.mark.slow  # drives a runner, a training, a tool or a benchmark

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_eager_profile.py'


def load_script():
    return load_repo_script(f'benchmarks/{SCRIPT.name}', 'bench_eager_profile')


def test_op_names_fall_in_their_categories():
    category_of = load_script().category_of
    assert category_of('aten::mkldnn_convolution') == 'convolution'
    assert category_of('aten::max_pool2d_with_indices') == 'max-pool'
    assert category_of('aten::add_') == category_of('aten::clamp_min_') == 'element-wise'
    assert category_of('aten::empty') == 'other'


def test_small_run_profiles_both_layouts_of_both_backbones(tmp_path):
    out = tmp_path / 'eager_profile.json'
    subprocess.run([sys.executable, str(SCRIPT), '--inputs', '64x96', '--repeats', '1',
                    '--warmup', '0', '--threads', '2', '--out', str(out)], check=True,
                   capture_output=True, text=True)
    data = json.loads(out.read_text())
    assert [(r['input'], r['layout']) for r in data['rows']] == [
        ('3x64x96', 'contiguous'), ('3x64x96', 'channels_last')]
    for row in data['rows']:
        original, factorized = row['original'], row['factorized']
        # every planned conv became two convs; FLOPs at the config's budget (about -50 %)
        assert factorized['convs'] > original['convs'] == 53
        assert 1.8 < row['flops_ratio'] == original['flops'] / factorized['flops'] < 2.2
        for model in (original, factorized):
            profile = model['profile_ms']
            assert model['ms'] > 0 and profile['convolution'] > 0
            assert abs(profile['total'] - sum(v for k, v in profile.items()
                                              if k != 'total')) < 1e-6
            assert profile['convolution'] > profile['max-pool']
        assert row['convolution_speedup'] == (original['profile_ms']['convolution']
                                              / factorized['profile_ms']['convolution'])
    assert '| 3x64x96 | channels_last |' in out.with_suffix('.md').read_text()


def test_bad_input_size_is_refused_with_the_value():
    result = subprocess.run([sys.executable, str(SCRIPT), '--inputs', '16x16'],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "['16x16']" in result.stderr
