"""benchmarks/bench_inference.py's bookkeeping (no timing asserted: speed lives in
benchmarks/): P3 is judged against the planned FLOPs ratio, the table shows it, bad arguments
are refused, and a quick run times every kind of row, the whole detector as mmdeploy deploys
it included."""
import json

import pytest

from benchlib.inference import default_settings, make_rows, markdown
from helpers import load_repo_script

pytestmark = pytest.mark.slow  # drives a runner, a training, a tool or a benchmark

FLOPS = {'original': 200, 'factorized': 100, 'latency-merged': 125}
LOW_RANK = {'original': 0, 'factorized': 53, 'latency-merged': 50}


def rows_for(original_ms: float, factorized_ms: float, merged_ms: float, backbone=True,
             layout='contiguous'):
    times = {'original': original_ms, 'factorized': factorized_ms,
             'latency-merged': merged_ms}
    return make_rows('ResNet-50 backbone', 'backbone', (3, 64, 64), 'torch', times, FLOPS, 3,
                     LOW_RANK, backbone, layout)


def test_p3_needs_speedup_of_0_8_times_the_planned_flops_ratio():
    factorized, merged = rows_for(100.0, 62.0, 60.0)  # speedups 1.61 and 1.67, planned 2.0
    assert factorized['flops_ratio'] == merged['planned_flops_ratio'] == 2.0
    assert factorized['speedup'] == pytest.approx(100 / 62) and factorized['p3'] is True
    # the merged variant's own FLOPs ratio is 1.6, but P3 is judged against the planned 2.0
    assert merged['flops_ratio'] == 1.6 and merged['p3'] is True
    assert merged['merged_layers'] == 3 and factorized['merged_layers'] == 0
    slow = rows_for(100.0, 63.0, 70.0)  # 1.587 < 1.6
    assert [r['p3'] for r in slow] == [False, False]
    assert slow[1]['speedup_over_flops_ratio'] == pytest.approx((100 / 70) / 1.6)
    assert [r['p3'] for r in rows_for(100.0, 50.0, 50.0, backbone=False)] == [None, None]


def test_markdown_table_marks_p3_only_on_backbone_rows():
    rows = rows_for(100.0, 62.0, 70.0) + [
        dict(r, model='PSPNet whole') for r in rows_for(10.0, 9.0, 9.0, backbone=False,
                                                        layout='channels_last')]
    result = dict(rows=rows, onnx_sizes=[], date='today', wall_seconds=1.0,
                  machine=dict(cpu='cpu', threads=1, usable_cores=2, torch='t',
                               onnxruntime='o', load_average_start=[0.5, 0, 0],
                               load_average_end=[0.7, 0, 0], allocator='glibc default'),
                  settings=dict(repeats=5, warmup=1, p3_factor=0.8))
    lines = markdown(result).splitlines()
    assert lines[2].endswith('| 1.61 | 2.00 | 0.81 | pass |')
    assert '| torch contiguous | factorized |' in lines[2]
    assert '| torch channels_last | factorized |' in lines[4]
    assert 'Allocator: glibc default.' in lines[-1]
    assert '| latency-merged (3 merged) |' in lines[3] and lines[3].endswith('| FAIL |')
    assert lines[4].startswith('| PSPNet whole |') and lines[4].endswith('|  |')


def test_bad_benchmark_arguments_are_refused(capsys):
    script = load_repo_script('benchmarks/bench_inference.py', 'bench_inference')
    assert script.main(['--inputs', '512x0']) == 2
    assert "--inputs takes sizes like 512x512, got '512x0'" in capsys.readouterr().err
    assert script.main(['--threads', '0']) == 2
    assert 'threads must be >= 1, got 0' in capsys.readouterr().err
    with pytest.raises(ValueError, match='repeats must be >= 1'):
        default_settings(repeats=0)
    with pytest.raises(ValueError, match=r"memory_format must be one of .*got 'nhwc'"):
        default_settings(layouts=('nhwc', ))
    with pytest.raises(ValueError, match=r"allocator must be one of \('retain', 'default'\), "
                                         r"got 'jemalloc'"):
        default_settings(allocator='jemalloc')
    with pytest.raises(SystemExit) as exited:  # argparse refuses it
        script.main(['--layouts', 'nhwc'])
    assert exited.value.code == 2
    assert "invalid choice: 'nhwc'" in capsys.readouterr().err
    quick = default_settings(quick=True)
    assert quick.shapes == ((3, 128, 128), ) and quick.layouts == ('contiguous', )


def test_quick_run_times_backbone_eager_and_the_deployed_whole_detector(tmp_path):
    script = load_repo_script('benchmarks/bench_inference.py', 'bench_inference')
    out = tmp_path / 'inference'
    assert script.main(['--quick', '--no-segmentor', '--repeats', '1', '--merge-repeats', '1',
                        '--threads', '2', '--out', str(out)]) == 0
    result = json.loads(out.with_suffix('.json').read_text())
    kinds = {(r['model'], r['runtime'], r['input']) for r in result['rows']}
    whole_model = 'Faster R-CNN R18 whole, whole-model LRPET (mmdeploy end2end)'
    assert kinds == {
        ('ResNet-18 backbone', 'torch', '3x128x128'),
        ('ResNet-18 backbone', 'onnxruntime', '3x128x128'),
        ('Faster R-CNN R18 whole (tensor forward)', 'torch', '3x128x128'),
        # the toy config's test size 128x160, already a multiple of its pad divisor 32
        ('Faster R-CNN R18 whole (mmdeploy end2end)', 'onnxruntime', '3x128x160'),
        (whole_model, 'onnxruntime', '3x128x160')}
    for row in result['rows']:
        assert row['original_ms'] > 0 and row['compact_ms'] > 0
        assert row['speedup'] == pytest.approx(row['original_ms'] / row['compact_ms'])
        assert (row['p3'] is not None) == (row['model'] == 'ResNet-18 backbone')
        planned = 31 if row['model'] == whole_model else 20  # + FPN, rpn_conv, shared FCs
        assert row['low_rank_layers'] == (planned if row['variant'] == 'factorized'
                                          else planned - row['merged_layers'])
    deployed = [r for r in result['rows'] if 'mmdeploy' in r['model']]
    assert [r['variant'] for r in deployed] == ['factorized', 'latency-merged'] * 2
    assert deployed[0]['flops_ratio'] > 1.0  # planned -50 % backbone FLOPs, whole model less
    # the whole-model config: -50 % of the whole model's FLOPs (ratio 2 within 1 %), the
    # merge timed on the whole forward (every low-rank layer measured, heads included)
    assert deployed[2]['flops_ratio'] == pytest.approx(2.0, rel=0.011)
    whole_merge = result['merges'][-1]
    assert whole_merge['family'] == 'faster-rcnn-model' and whole_merge['measured'] == 31
    sizes = {o['model']: o for o in result['onnx_sizes']}
    whole = sizes['Faster R-CNN R18 whole (mmdeploy end2end)']
    assert whole['factorized_bytes'] < whole['original_bytes']
    assert sizes['ResNet-18 backbone']['factorized_bytes'] < 0.6 * sizes[
        'ResNet-18 backbone']['original_bytes']
    assert [m['runtime'] for m in result['merges']] == ['torch'] + ['onnxruntime'] * 3
    # where the deployed models spend their time: the convs shrink, RoIAlign does not
    profiles = {(p['model'], p['variant']): p['ops_ms'] for p in result['profiles']}
    assert len(profiles) == 6
    original = profiles[whole_model, 'original']
    factorized = profiles[whole_model, 'factorized']
    assert original['Conv'] > 0 and 'RoiAlign' in original and 'RoiAlign' in factorized
    table = out.with_suffix('.md').read_text()
    assert '| convs + FCs ms | other ops ms |' in table
    assert '| Faster R-CNN R18 whole (mmdeploy end2end) | 3x128x160 | onnxruntime |' in table
