"""benchmarks/bench_deploy.py: whole deployed models, original vs compact, in ONNX Runtime."""
import json

from helpers import load_repo_script


def test_quick_run_times_the_deployed_original_and_compact_segmentor(tmp_path):
    script = load_repo_script('benchmarks/bench_deploy.py', 'bench_deploy')
    out = tmp_path / 'deploy.json'
    assert script.main(['--quick', '--tasks', 'seg', '--repeats', '1', '--threads', '2',
                        '--out', str(out)]) == 0
    result = json.loads(out.read_text())
    (row, ) = result['rows']
    assert row['task'] == 'seg' and row['input'] == [3, 128, 128]
    assert row['original_ms'] > 0 and row['compact_ms'] > 0
    assert abs(row['speedup'] - row['original_ms'] / row['compact_ms']) < 0.05
    # the compact model is smaller: fewer backbone FLOPs and a smaller ONNX file
    assert row['backbone_flops_ratio'] > 1.3
    assert row['compact_onnx_mb'] < row['original_onnx_mb']
    assert result['machine']['threads'] == 2
    assert '| pspnet_r18-d8_lrpet_toy_voc12aug | 3×128×128 |' in out.with_suffix('.md').read_text()
