"""The quality benchmark (``benchmarks/bench_quality.py``): statistics, tables, settings, the
truncated-SVD decomposition of the LRA row and BN folding, the orchestration (a failing row is
recorded and the others go on), and one real row pair (baseline + LRA) in quick mode."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lrpet_mm  # noqa: F401  (registers LRPETFactorized)
from benchlib import quality as q
from lrpet_mm.lowrank import LowRankConv2d, plan_ranks, select_targets
from lrpet_mm.models import (
    LRPETFactorized,
    components_of,
    decompose_model,
    factorize_model,
    fold_factorized_norms,
    planned_layers,
)


# ------------------------------------------------------------------------------ statistics
def test_mean_std_uses_the_sample_standard_deviation() -> None:
    assert q.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = q.mean_std([None, 2.0, 4.0])  # None (a failed seed) is left out
    assert mean == 3.0 and std == pytest.approx(math.sqrt(2.0))
    assert q.mean_std([5.0]) == (5.0, None)
    assert q.mean_std([]) == (None, None)
    assert q.mean_std([None]) == (None, None)


def test_format_mean_std() -> None:
    assert q.format_mean_std(41.234, 1.26) == '41.2 ± 1.3'
    assert q.format_mean_std(41.234, None) == '41.2'
    assert q.format_mean_std(None, None) == 'n/a'
    assert q.format_mean_std(0.5, 0.25, digits=2) == '0.50 ± 0.25'


def test_summarize_row_counts_errors_and_keeps_equal_complexity() -> None:
    row = dict(seeds={
        '0': dict(metric_pct=40.0, backbone_flops=10, backbone_params=5, model_params=7),
        '1': dict(metric_pct=42.0, backbone_flops=10, backbone_params=5, model_params=7,
                  extra=dict(metric_pct_before_finetune=1.0)),
        '2': dict(error='RuntimeError: boom'),
    })
    summary = q.summarize_row(row)
    assert summary['n'] == 2 and summary['errors'] == 1
    assert summary['metric_mean'] == 41.0
    assert summary['metric_std'] == pytest.approx(math.sqrt(2.0))
    assert (summary['backbone_flops'], summary['backbone_params'],
            summary['model_params']) == (10, 5, 7)
    assert summary['metric_before_finetune_mean'] == 1.0
    row['seeds']['1']['backbone_flops'] = 11  # seeds disagree: no single value
    assert q.summarize_row(row)['backbone_flops'] is None


# ------------------------------------------------------------------------------ tables, files
def fake_results() -> dict:
    settings = q.default_settings(seeds=2, tasks=['det'])
    rows = {}
    for key, values, flops in (('baseline', (40.0, 42.0), 1000), ('lrpet', (30.0, None), 500),
                               ('lra', (20.0, 22.0), 500)):
        seeds = {}
        for seed, value in enumerate(values):
            seeds[str(seed)] = (dict(error='RuntimeError: boom') if value is None else dict(
                metric=value / 100, metric_pct=value, backbone_flops=flops,
                backbone_params=flops // 2, model_params=flops))
        row = dict(label=q.ROWS_BY_KEY[key].label, description='', seeds=seeds)
        row['summary'] = q.summarize_row(row)
        rows[key] = row
    plan = dict(rank_ratio=0.5625, num_layers=20, num_skipped=0, input_shape=[3, 128, 160],
                flops_before=1000, flops_after=500, reduction=0.5)
    return dict(command='python benchmarks/bench_quality.py', mode='full', complete=True,
                wall_time_s=125.0, settings=settings.to_dict(),
                machine=dict(cpu='Test CPU', usable_cores=2, torch='2.5.1',
                             torch_threads=2),
                tasks=dict(det=dict(task='detection', model='Faster R-CNN R-18 FPN',
                                    metric='pascal_voc/mAP', metric_label='mAP@0.5',
                                    train_iters=96, rank_plan=plan, rows=rows)),
                errors=[dict(task='det', row='lrpet', seed=1, error='RuntimeError: boom')],
                extra_nan=float('nan'))


def test_markdown_table_rows_values_and_failures() -> None:
    table = q.markdown_task_table(fake_results()['tasks']['det'])
    lines = table.strip().splitlines()
    assert lines[0].startswith('| method | mAP@0.5 (%), mean ± std | per seed |')
    body = lines[2:]
    assert [line.split(' | ')[0] for line in body] == [
        '| uncompressed baseline', '| LRPET (LRP + ET + BNR)',
        '| LRA: SVD of trained baseline + fine-tune']  # the order of ROWS
    assert '| 41.0 ± 1.4 | s0: 40.0, s1: 42.0 | 1.000 K |  | 500 |  | 1.000 K |' in body[0]
    assert '| 30.0 (1 failed) | s0: 30.0, s1: error | 500 | -50.0 % | 250 | -50.0 % |' in body[1]
    assert '| 21.0 ± 1.4 |' in body[2]


def test_markdown_results_and_atomic_write(tmp_path: Path) -> None:
    results = fake_results()
    text = q.markdown_results(results)
    assert '## Detection: Faster R-CNN R-18 FPN, −50 % backbone FLOPs' in text
    assert 'wall time: 2.1 min' in text and 'Test CPU' in text and 'commit ?' in text
    assert '4 epochs × 24 iterations = 96 iterations' in text
    assert 'uniform rank ratio 0.5625' in text
    assert 'LRPET minus each other row (mAP@0.5 mean, percentage points): uncompressed ' \
           'baseline -11.0; LRA: SVD of trained baseline + fine-tune +9.0.' in text
    assert '1 row run(s) failed' in text and 'det / lrpet / seed 1' in text
    json_path, md_path = q.write_results(results, tmp_path / 'out')
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['quality.json',
                                                                    'quality.md']
    data = json.loads(json_path.read_text())
    assert data['extra_nan'] is None  # NaN is not JSON
    assert data['tasks']['det']['rows']['baseline']['summary']['metric_mean'] == 41.0
    assert md_path.read_text() == text


# ------------------------------------------------------------------------------ settings
def test_default_settings() -> None:
    full = q.default_settings()
    det, seg = full.task('det'), full.task('seg')
    assert full.seeds == (0, 1) and full.hard and full.num_train == 48
    assert det.train_iters(full.num_train) == 4 * 24 and det.flops_reduction == 0.5
    assert seg.train_iters(full.num_train) == 192 and seg.flops_reduction == 0.3
    assert seg.projection_interval == 32
    quick = q.default_settings(quick=True)
    assert quick.seeds == (0, ) and quick.task('det').train_iters(quick.num_train) == 4
    custom = q.default_settings(seeds=3, tasks=['seg'], seg_iters=60, det_epochs=2)
    assert custom.seeds == (0, 1, 2) and [t.key for t in custom.tasks] == ['seg']
    assert custom.task('seg').projection_interval == 10
    assert custom.to_dict()['tasks']['seg']['train_iters'] == 60
    for bad in (dict(seeds=0), dict(tasks=[]), dict(tasks=['cls']), dict(seg_iters=True)):
        with pytest.raises(ValueError):
            q.default_settings(**bad)


def test_factorized_train_config_keeps_the_norms() -> None:
    from mmengine.config import Config

    cfg = Config(dict(model=dict(type='X', backbone=dict(type='ResNet', depth=18))))
    comps = components_of({'backbone.layer1.0.conv1': 8},
                          {'backbone.layer1.0.conv1': 'backbone.layer1.0.bn1'})
    new = q.factorized_train_config(cfg, comps)
    assert new.model.backbone == dict(type='LRPETFactorized',
                                      module=dict(type='ResNet', depth=18),
                                      ranks={'layer1.0.conv1': 8}, folded_norms={})
    assert cfg.model.backbone == dict(type='ResNet', depth=18)  # not modified


def test_components_of() -> None:
    comps = components_of({'backbone.a.conv': 3, 'neck.b': 2}, {'backbone.a.conv': 'backbone.a.bn'})
    assert comps == {'backbone': dict(ranks={'a.conv': 3}, folded_norms={'a.conv': 'a.bn'}),
                     'neck': dict(ranks={'b': 2}, folded_norms={})}
    with pytest.raises(KeyError):
        components_of({'backbone.a': 3}, {'backbone.b': 'backbone.bn'})


# ------------------------------------------------------------------------------ decomposition
class TinyNet(nn.Module):
    """A 'backbone' of two conv+BN pairs (structural pairing inside an nn.Sequential)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(6, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2, bias=True),
            nn.BatchNorm2d(24))

    def forward(self, x):
        return self.backbone(x)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def best_rank_k(weight: torch.Tensor, k: int) -> torch.Tensor:
    matrix = weight.detach().double().reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def tiny_model_and_plan(ratio: float = 0.5):
    torch.manual_seed(0)
    model = TinyNet().eval()
    randomize_bn(model)
    plan = plan_ranks(select_targets(model).shapes(), ratio)
    return model, plan


def test_decompose_gives_the_planned_ranks_and_the_best_rank_k_approximation() -> None:
    model, plan = tiny_model_and_plan()
    assert {n: layer.rank for n, layer in plan.layers.items()} == {'backbone.0': 8,
                                                                  'backbone.3': 12}
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    result = decompose_model(model, plan)
    for layer in result.layers:
        conv = model.get_submodule(layer.name)
        pair = result.model.get_submodule(layer.name)
        assert isinstance(pair, LowRankConv2d) and pair.rank == plan.rank_of(layer.name)
        reduce, expand = pair[0], pair[1]
        assert (reduce.stride, reduce.padding, reduce.dilation) == (conv.stride, conv.padding,
                                                                  conv.dilation)
        assert reduce.bias is None and expand.kernel_size == (1, 1)
        product = (expand.weight.double().reshape(expand.out_channels, -1)
                   @ reduce.weight.double().reshape(pair.rank, -1))
        target = best_rank_k(conv.weight, pair.rank)
        assert float((product - target).norm() / target.norm()) < 1e-5  # Eckart–Young
        full = conv.weight.detach().double().reshape(conv.out_channels, -1)
        assert layer.relative_error == pytest.approx(
            float((full - target).norm() / full.norm()), rel=1e-6)
        assert 0.0 < layer.relative_error < 1.0  # a random weight is full rank: truncated
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        assert torch.equal(expand.bias, bias)
    assert [layer.norm for layer in result.layers] == ['backbone.1', 'backbone.4']
    # BNs kept, original untouched
    assert isinstance(result.model.backbone[1], nn.BatchNorm2d)
    assert isinstance(model.backbone[0], nn.Conv2d)
    assert all(torch.equal(v, original_state[k]) for k, v in model.state_dict().items())
    assert result.components == {'backbone': dict(ranks={'0': 8, '3': 12}, folded_norms={})}


def truncated_copy(model: nn.Module, plan) -> nn.Module:
    """A TinyNet copy of ``model`` whose planned conv weights are their best rank-k
    approximations (full-size convs)."""
    truncated = TinyNet().eval()
    truncated.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, layer in plan.layers.items():
            conv = truncated.get_submodule(name)
            conv.weight.copy_(best_rank_k(conv.weight, layer.rank).reshape(conv.weight.shape))
    return truncated


def test_decomposed_model_computes_the_truncated_network() -> None:
    model, plan = tiny_model_and_plan()
    truncated = truncated_copy(model, plan)
    x = torch.randn(2, 6, 12, 12)
    decomposed = decompose_model(model, plan).model.eval()
    with torch.no_grad():
        assert torch.allclose(decomposed(x), truncated(x), atol=1e-5, rtol=1e-4)


def test_fold_factorized_norms_keeps_outputs_and_gives_the_lrpet_structure() -> None:
    model, plan = tiny_model_and_plan()
    decomposed = decompose_model(model, plan).model
    randomize_bn(decomposed, seed=1)
    norms = {layer.name: layer.folded_norm for layer in planned_layers(model, plan)}
    x = torch.randn(2, 6, 12, 12)
    with torch.no_grad():
        before = decomposed.eval()(x)
        compact = fold_factorized_norms(decomposed, norms)
        after = compact.model(x)
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4)
    assert isinstance(compact.model.backbone[1], nn.Identity)
    assert isinstance(decomposed.backbone[1], nn.BatchNorm2d)  # copy_model=True by default
    # the same structure factorize_model gives a model whose weights are exactly rank k
    low_rank = decompose_model(model, plan)  # weights rank k ...
    exact = truncated_copy(model, plan)
    assert low_rank.components['backbone']['ranks'] == compact.components['backbone']['ranks']
    assert factorize_model(exact, plan).components == compact.components
    with pytest.raises(KeyError, match='not a factorized pair'):
        fold_factorized_norms(model, norms)


def test_lra_path_on_the_mmdet_resnet() -> None:
    """Decompose a (random, full-rank) mmdet ResNet-18, load it strictly into the
    ``LRPETFactorized`` structure with BNs kept (the LRA fine-tuning network), fold it, and get
    the structure ``factorize_model`` gives an LRPET model."""
    import mmdet  # noqa: F401  (a hard requirement: fail, never skip)
    from mmengine.registry import MODELS, init_default_scope

    init_default_scope('mmdet')
    backbone_cfg = dict(type='ResNet', depth=18, init_cfg=None, norm_eval=False)

    class Wrapper(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

    torch.manual_seed(0)
    model = Wrapper(MODELS.build(backbone_cfg)).eval()
    randomize_bn(model)
    plan = plan_ranks(select_targets(model).shapes(), 0.5625)
    decomposed = decompose_model(model, plan)
    assert len(decomposed.layers) == len(plan) == 20
    assert all(0.0 < layer.energy_kept < 1.0 for layer in decomposed.layers)
    spec = decomposed.components['backbone']
    train_net = LRPETFactorized(module=backbone_cfg, ranks=spec['ranks'], folded_norms={})
    train_net.load_state_dict(decomposed.model.backbone.state_dict(), strict=True)
    norms = {layer.name: layer.folded_norm for layer in planned_layers(model, plan)}
    compact = fold_factorized_norms(Wrapper(train_net), norms)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = [t for t in Wrapper(train_net).eval().backbone(x)]
        out = compact.model.backbone(x)
    for a, b in zip(out, ref):
        assert float((a - b).norm() / b.norm()) < 1e-4
    expected = components_of({n: layer.rank for n, layer in plan.layers.items()}, norms)
    assert q._same_components(compact.components, expected)


# ------------------------------------------------------------------------------ orchestration
def test_a_failing_row_is_recorded_and_the_others_go_on(tmp_path: Path, monkeypatch) -> None:
    settings = q.default_settings(quick=True, seeds=2, tasks=['det'])
    calls = []

    def fake_context(self, task, seed, data_root, seed_dir, contexts):
        return q.TaskContext(task, plan=None, plan_info=dict(rank_ratio=0.5), norms={},
                             expected_components={}, input_shape=(3, 8, 8))

    def fake_row(self, task, row, seed, data_root, row_dir, ctx):
        calls.append((row.key, seed))
        if row.key == 'lrp_bnr' and seed == 1:
            raise RuntimeError('synthetic failure')
        return dict(error=None, metric=0.1, metric_pct=10.0 + seed, backbone_flops=5,
                    backbone_params=3, model_params=4, extra={})

    monkeypatch.setattr(q.QualityBenchmark, '_context', fake_context)
    monkeypatch.setattr(q.QualityBenchmark, '_run_row', fake_row)
    monkeypatch.setattr(q, 'generate_synthetic_voc', lambda root, **kw: Path(root))
    logs = []
    code, results = q.run_benchmark(settings, tmp_path / 'work', tmp_path / 'out',
                                    log=logs.append)
    assert code == 1
    assert len(calls) == 2 * len(q.ROWS)  # every row of every seed ran
    assert [key for key, seed in calls[:7]] == list(q.RUN_ORDER)
    assert results['complete'] and len(results['errors']) == 1
    assert results['errors'][0]['row'] == 'lrp_bnr' and results['errors'][0]['seed'] == 1
    rows = results['tasks']['det']['rows']
    assert rows['lrp_bnr']['summary']['n'] == 1 and rows['lrp_bnr']['summary']['errors'] == 1
    assert rows['lrpet']['summary']['metric_mean'] == 10.5
    on_disk = json.loads((tmp_path / 'out' / 'quality.json').read_text())
    assert on_disk['tasks']['det']['rows']['lrp_bnr']['seeds']['1']['error'] == (
        'RuntimeError: synthetic failure')
    assert on_disk['machine']['usable_cores'] >= 1 and on_disk['wall_time_s'] >= 0
    assert any('FAILED' in line for line in logs)


def test_quick_segmentation_baseline_and_lra_end_to_end(tmp_path: Path) -> None:
    """Two real rows: the baseline trains, LRA decomposes it, fine-tunes, folds; both compact
    models are evaluated with mmseg's IoUMetric and counted (a few seconds of training)."""
    import mmseg  # noqa: F401  (a hard requirement: fail, never skip)
    settings = q.default_settings(quick=True, tasks=['seg'])
    code, results = q.run_benchmark(settings, tmp_path / 'work', tmp_path / 'out',
                                    rows=['lra'], log=lambda m: None)
    task = results['tasks']['seg']
    assert code == 0, results['errors']
    assert set(task['rows']) == {'lra'}  # the baseline was trained for LRA, not reported
    entry = task['rows']['lra']['seeds']['0']
    plan = task['rank_plan']
    assert entry['error'] is None and 0.0 <= entry['metric_pct'] <= 100.0
    assert entry['backbone_flops'] == plan['flops_after']
    assert plan['reduction'] == pytest.approx(0.3, abs=0.01)
    assert entry['train_iters'] == entry['finetune_iters'] == 4
    assert 0.0 < entry['extra']['svd_energy_kept_mean'] < 1.0
    assert entry['extra']['metric_pct_before_finetune'] is not None
    assert (tmp_path / 'out' / 'quality.md').is_file()
    assert not list((tmp_path / 'work').rglob('*.pth'))  # checkpoints cleaned up
    assert not torch.are_deterministic_algorithms_enabled()  # process state restored
