"""The evidence benchmark (``benchmarks/bench_quality.py``): paired statistics, the schedule of
the half rows, tables, settings, and the whole protocol end to end in quick mode (every row,
two paired seeds, the built-in data and a user's ``--data-root``)."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import lrpet_mm  # noqa: F401  (registers LRPETFactorized)
from benchlib.quality import configs, orchestration, tables
from benchlib.quality import statistics as stats
from helpers import load_repo_script
from lrpet_mm.datasets.synthetic_voc import generate_synthetic_voc


# ------------------------------------------------------------------------------ statistics
def test_mean_std_uses_the_sample_standard_deviation() -> None:
    assert stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = stats.mean_std([None, 2.0, 4.0])
    assert mean == 3.0 and std == pytest.approx(math.sqrt(2.0))
    assert stats.mean_std([5.0]) == (5.0, None) and stats.mean_std([]) == (None, None)


def test_paired_comparison_pairs_by_seed_and_gives_the_t_interval() -> None:
    ours = {'0': 50.0, '1': 52.0, '2': 49.0, '3': 55.0, '4': None}
    other = {'0': 48.0, '1': 51.0, '2': 50.0, '3': 51.0, '4': 40.0, '5': 10.0}
    c = stats.paired_comparison(ours, other)
    assert c['seeds'] == ['0', '1', '2', '3'] and c['diffs'] == [2.0, 1.0, -1.0, 4.0]
    assert c['n'] == 4 and c['wins'] == 3 and c['losses'] == 1
    assert c['mean'] == pytest.approx(1.5)
    sd = math.sqrt(((0.5) ** 2 + 0.5 ** 2 + 2.5 ** 2 + 2.5 ** 2) / 3)
    assert c['std'] == pytest.approx(sd)
    half = 3.182446305284263 * sd / 2  # t_{0.975, 3}
    assert c['ci95'] == pytest.approx([1.5 - half, 1.5 + half])
    assert c['detectable'] == pytest.approx((3.182446305284263 + 0.9784723123633045) * sd / 2)
    # the interval holds 0: the answer is the bound on |difference| it gives
    assert stats.verdict(c) == f'no difference larger than {1.5 + half:.1f} points'
    assert stats.verdict(c, 'LRPET whole model').startswith('no difference')
    assert stats.verdict(stats.paired_comparison({'0': 3.0, '1': 4.1}, {'0': 1.0, '1': 2.0})) == (
        'LRPET better')
    assert stats.verdict(stats.paired_comparison({'0': 1.0, '1': 2.0}, {'0': 3.0, '1': 4.1}),
                         'pruning') == 'pruning worse'
    one = stats.paired_comparison({'0': 1.0}, {'0': 0.0})
    assert one['ci95'] is None and stats.verdict(one) == 'n/a'


def test_the_half_rows_continue_the_schedule_of_the_baseline() -> None:
    """The learning rate of the second-half run at step s equals the full schedule's at
    T/2 + s (mmengine's own schedulers, stepped as the train loop steps them)."""
    from mmengine.optim import OptimWrapper
    from mmengine.registry import PARAM_SCHEDULERS

    def lrs(task, second_half):
        schedulers, lr = configs.schedulers(task, second_half)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        wrapper = OptimWrapper(opt)
        built = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper)) for s in schedulers]
        out = []
        for _ in range(task.iters // (2 if second_half else 1)):
            out.append(opt.param_groups[0]['lr'])
            for scheduler in built:
                scheduler.step()
        return out

    for key in ('det', 'seg'):
        task = configs.default_settings(tasks=[key], det_iters=40, seg_iters=40).tasks[0]
        full, half = lrs(task, False), lrs(task, True)
        assert half == pytest.approx(full[20:], rel=1e-6), key
        assert full[0] != full[-1]


def test_default_settings_and_bad_values() -> None:
    full = configs.default_settings(tasks=['seg'])
    assert full.mode == 'full' and full.seeds == tuple(range(configs.PROTOCOL['seg'][1]))
    assert full.num_val == configs.TEST_IMAGES and full.tasks[0].iters == configs.PROTOCOL['seg'][0]
    assert [t.key for t in full.tasks] == ['seg'] and full.tasks[0].flops_reduction == 0.3
    both = configs.default_settings(tasks=['det', 'seg'])
    assert len(both.seeds) == max(n for _, n in configs.PROTOCOL.values())
    quick = configs.default_settings(quick=True)
    assert quick.mode == 'quick' and len(quick.seeds) == 2 and quick.tasks[0].key == 'det'
    for kwargs, match in ((dict(seeds=0), 'seeds'), (dict(det_iters=7), 'even'),
                          (dict(tasks=['cls']), 'tasks'), (dict(seg_iters=True), 'seg_iters')):
        with pytest.raises(ValueError, match=match):
            configs.default_settings(**kwargs)


def test_bad_arguments_exit_with_status_2(capsys) -> None:
    script = load_repo_script('benchmarks/bench_quality.py', 'bench_quality')
    assert script.main(['--seeds', '0']) == 2
    assert 'seeds' in capsys.readouterr().err
    assert script.main(['--data-root', '/nonexistent/VOCdevkit']) == 2
    assert '/nonexistent/VOCdevkit' in capsys.readouterr().err


def test_the_main_protocol_is_the_one_the_committed_pilot_decided() -> None:
    """T, the seeds and the test-set size of the main run are those of the baseline-only
    pilot's results in the repository (fixed before any compressed row ran)."""
    from benchlib.common import REPO_ROOT

    for key, (iters, seeds) in configs.PROTOCOL.items():
        pilot = json.loads((REPO_ROOT / 'benchmarks' / 'results' / 'pilot' /
                            f'pilot_{key}.json').read_text())
        decision = pilot['tasks'][key]['decision']
        assert (decision['iters'], decision['seeds']) == (iters, seeds), key
        assert pilot['settings']['num_val'] == configs.TEST_IMAGES


def test_main_and_ablation_runs_cover_every_row_and_write_apart() -> None:
    from benchlib.quality.tables import result_name

    assert set(configs.MAIN_ROWS) | set(configs.ABLATION_ROWS) == set(configs.ROW_KEYS)
    assert 'baseline' in configs.ABLATION_ROWS and 'lrpet' in configs.ABLATION_ROWS
    assert result_name(['det']) == 'quality_det'
    assert result_name(['det'], 'ablation') == 'quality_det_ablation'
    for ours, other in configs.COMPARISONS:
        assert ours in configs.ROW_KEYS and other in configs.ROW_KEYS and ours != other


# ------------------------------------------------------------------------------ end to end
def check_results(results: dict, settings: configs.BenchSettings, task_key: str,
                  rows=configs.ROW_KEYS) -> dict:
    assert results['complete'] and not results['errors'], results['errors']
    task = results['tasks'][task_key]
    assert set(task['rows']) == set(rows)
    for key in rows:
        seeds = task['rows'][key]['seeds']
        assert sorted(seeds) == [str(s) for s in settings.seeds], key
        for entry in seeds.values():
            assert entry['error'] is None and entry['metric_pct'] is not None, (key, entry)
            assert entry['train_s'] > 0
    flops = {key: task['rows'][key]['summary']['backbone_flops'] for key in rows}
    base = flops['baseline']
    target = (1 - settings.tasks[0].flops_reduction) * base
    whole_rows = set(rows) & set(configs.WHOLE_MODEL_ROWS)
    for key in set(rows) - {'baseline'} - whole_rows:
        assert flops[key] is not None and abs(flops[key] - target) <= 0.02 * base, key
    assert abs(flops['prune'] - flops['lrpet']) <= 0.01 * flops['lrpet']
    # whole-model rows: their budgets are whole-model test-time FLOPs (within the planner's
    # 1 %): the backbone-only LRPET plan's, and half of the baseline's
    model_flops = {key: task['rows'][key]['summary']['model_flops'] for key in rows}
    assert model_flops['lrpet'] < model_flops['baseline']
    assert task['rank_plan']['model_flops_after'] == model_flops['lrpet']
    if 'lrpet_model_eq' in rows:
        assert abs(model_flops['lrpet_model_eq'] - model_flops['lrpet']) <= 0.01 * model_flops[
            'lrpet']
        assert flops['lrpet_model_eq'] > flops['lrpet']  # the heads pay part of the budget
    if 'lrpet_model_half' in rows:
        half = 0.5 * model_flops['baseline']
        assert abs(model_flops['lrpet_model_half'] - half) <= 0.01 * half
    # the uniform rows and both LRA rows are the same network
    same = {flops[key] for key in ('lrpet', 'paper', 'lra_half', 'lra_pretrained') if key in rows}
    assert len(same) == 1
    expected = {f'{a} - {b}' for a, b in configs.COMPARISONS if a in rows and b in rows}
    assert set(task['comparisons']) == expected
    for comparison in task['comparisons'].values():
        assert comparison['n'] == len(settings.seeds)
        assert (comparison['ci95'] is not None) == (len(settings.seeds) > 1)
    # every row's deployed whole model is timed, the baseline twice (identical architecture)
    latency = task['latency']
    assert set(latency['rows']) == set(rows) | {'baseline_again'}, latency.get('error')
    for timing in latency['rows'].values():
        lo, hi = timing['range_ms']
        assert 0 < lo <= timing['median_ms'] <= hi
        assert len(timing['round_medians_ms']) == settings.latency_rounds
    assert 0 <= latency['agreement']['relative_difference'] < 1
    for key in set(rows) & {'prune', 'prune_model_eq', 'prune_model_half'}:
        assert 0 < task['prune_ratios'][key] < 1
    if 'prune_model_half' in rows:  # backbone and heads pruned to -50 % whole-model FLOPs
        half = 0.5 * model_flops['baseline']
        assert abs(model_flops['prune_model_half'] - half) <= 0.01 * half
        channels = task['rows']['prune_model_half']['seeds']['0']['extra']['channels']
        assert any(not name.startswith('backbone.') for name in channels)
    if 'prune_model_eq' in rows:
        assert abs(model_flops['prune_model_eq'] - model_flops['lrpet']) <= 0.01 * model_flops[
            'lrpet']
    return task


@pytest.mark.slow
def test_quick_run_of_every_row(tmp_path: Path) -> None:
    """Every row of the segmentation task, one seed (the paired statistics over two seeds
    are checked by the detection run below, to keep the suite short)."""
    script = load_repo_script('benchmarks/bench_quality.py', 'bench_quality')
    out = tmp_path / 'out'
    code = script.main(['--quick', '--tasks', 'seg', '--seeds', '1', '--work-dir',
                        str(tmp_path / 'work'), '--out-dir', str(out), '--cache-dir',
                        str(tmp_path / 'cache'), '--rows', *configs.ROW_KEYS])
    assert code == 0
    results = json.loads((out / 'quality_seg.json').read_text())
    settings = configs.default_settings(quick=True, tasks=['seg'], seeds=1)
    check_results(results, settings, 'seg')
    pre = results['pretrained']
    assert Path(pre['file']).parent.parent == tmp_path / 'cache' and not pre['cached']
    assert 0 <= pre['test_accuracy_pct'] <= 100
    text = (out / 'quality_seg.md').read_text()
    for row in configs.ROWS:
        assert f'| {row.label} |' in text
    assert '95 % CI' in text and 'Quick mode' in text
    assert results['tasks']['seg']['figure'] == 'quality_seg.png'
    assert (out / 'quality_seg.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert '](quality_seg.png)' in text


@pytest.mark.slow
def test_an_interrupted_run_resumes_its_unfinished_seeds_only(tmp_path: Path) -> None:
    """``--resume`` keeps the finished seeds as recorded, runs a half-done seed again whole
    (reproducing it exactly: a seed fixes the starting point and the data order), and
    refuses results of other settings."""
    script = load_repo_script('benchmarks/bench_quality.py', 'bench_quality')
    out = tmp_path / 'out'
    args = ['--quick', '--tasks', 'seg', '--rows', 'baseline', 'lra_half', '--work-dir',
            str(tmp_path / 'work'), '--out-dir', str(out), '--cache-dir', str(tmp_path / 'c')]
    assert script.main(args) == 0
    path = out / 'quality_seg.json'
    first = json.loads(path.read_text())
    # interrupted during seed 1: its baseline recorded, its LRA row not
    cut = copy.deepcopy(first)
    del cut['tasks']['seg']['rows']['lra_half']['seeds']['1']
    cut['complete'] = False
    path.write_text(json.dumps(cut))
    assert script.main(args + ['--resume']) == 0
    again = json.loads(path.read_text())
    assert again['complete'] and len(again['sessions']) == 2 and again['sessions'][1]['resumed']
    for key in ('baseline', 'lra_half'):
        seeds = again['tasks']['seg']['rows'][key]['seeds']
        old = first['tasks']['seg']['rows'][key]['seeds']
        assert seeds['0'] == old['0'], key  # kept as recorded (wall time included)
        assert seeds['1']['wall_s'] != old['1']['wall_s']  # run again ...
        assert seeds['1']['metric'] == old['1']['metric']  # ... with the same result
    assert again['tasks']['seg']['latency'] == first['tasks']['seg']['latency']
    assert again['wall_time_s'] > first['wall_time_s']
    assert again['wall_time_s'] == pytest.approx(sum(x['wall_time_s'] for x in again['sessions']))
    assert '- sessions (2, resumed with `--resume`): ' in (out / 'quality_seg.md').read_text()
    assert '- sessions' not in tables.markdown_results(first)  # one session: no line
    # results of another protocol are not resumed
    assert script.main(args + ['--resume', '--seeds', '3']) == 2


@pytest.mark.slow
def test_quick_detection_on_a_user_data_root(tmp_path: Path) -> None:
    """Detection (mmdet ResNet, FPN) on a VOCdevkit given by the user; the rows whose code
    differs by task (baseline, the hook, pruning of the mmdet backbone and of the RPN / RoI
    heads, each deployed end to end), to keep it short (the whole-model LRPET rows run the hook
    with another scope: the segmentation run covers them)."""
    rows = ('baseline', 'lrpet', 'prune', 'prune_model_half')
    root = generate_synthetic_voc(tmp_path / 'mine' / 'VOCdevkit', num_train=6, num_val=5,
                                  img_size=(144, 112), seed=3, hard=True,
                                  classes=('person', 'car', 'dog', 'cat', 'aeroplane'))
    settings = configs.default_settings(quick=True, tasks=['det'])
    code, results = orchestration.run_benchmark(
        settings, tmp_path / 'work', tmp_path / 'out', rows=rows, data_root=root,
        cache_dir=tmp_path / 'cache', log=lambda m: None)
    assert code == 0
    check_results(results, settings, 'det', rows)
    assert results['data']['root'] == str(root)
    assert not (tmp_path / 'work' / 'data').exists()  # nothing generated: the user's data


# ------------------------------------------------------------------------------ pilot
def _summary(mean: float, sd: float, change: float, train_s: float = 60.0,
             eval_s: float = 10.0) -> dict:
    return dict(n=4, mean=mean, sd=sd, last_quarter_change=change, train_s=train_s,
                eval_s=eval_s)


def test_pilot_rule_picks_the_shortest_settled_schedule_and_the_seeds_for_power() -> None:
    from benchlib.quality import pilot

    rule = pilot.PilotRule(candidates=(160, 320, 640), target=3.0, budget_min=600.0)
    summaries = {160: _summary(25.0, 5.0, 3.0),   # still climbing over its last quarter
                 320: _summary(30.0, 2.1, 0.6),   # plateau, spread within 1.25 x 1.8
                 640: _summary(30.5, 1.8, 0.2)}  # doubling T gains < 1 point
    d = pilot.choose_protocol(rule, summaries)
    assert d['iters'] == 320 and d['converged']
    assert d['sd_diff'] == pytest.approx(math.sqrt(2) * 2.1)
    n = d['n_power']
    assert pilot.detectable(d['sd_diff'], n) <= 3.0 < pilot.detectable(d['sd_diff'], n - 1)
    assert d['seeds'] == n and d['meets_target'] and d['detectable'] <= 3.0
    assert d['seed_cost_s'] == pytest.approx(pilot.ROW_TRAININGS * 60 + pilot.ROW_EVALUATIONS
                                             * 10)
    # a spread that has not settled (sd 2.5 > 1.25 x 1.8) moves the choice to T = 640
    summaries[320] = _summary(30.0, 2.5, 0.6)
    assert pilot.choose_protocol(rule, summaries)['iters'] == 640
    # a plateau that a longer schedule leaves behind is not convergence (the amendment);
    # the rule as first written (gain_points=None) took it
    low = {160: _summary(20.0, 0.5, 0.4), 320: _summary(35.0, 2.0, 3.0),
           640: _summary(52.0, 2.0, 5.0)}
    d = pilot.choose_protocol(rule, low)
    assert d['iters'] == 640 and not d['converged']
    first = pilot.choose_protocol(dataclasses.replace(rule, gain_points=None), low)
    assert first['iters'] == 160 and first['converged']
    # nothing on a plateau: the longest, flagged; a budget of 30 min caps the seeds
    flat = {t: _summary(20.0, 4.0, 2.0) for t in (160, 320, 640)}
    tight = pilot.PilotRule(candidates=(160, 320, 640), target=3.0, budget_min=30.0)
    d = pilot.choose_protocol(tight, flat)
    assert d['iters'] == 640 and not d['converged']
    assert d['n_budget'] == int(30 * 60 // d['seed_cost_s'])
    assert d['seeds'] == max(3, d['n_budget']) < d['n_power'] and not d['meets_target']
    assert d['detectable'] == pytest.approx(pilot.detectable(d['sd_diff'], d['seeds']))
    assert d['detectable'] > 3.0


def test_pilot_rule_refuses_bad_candidates_and_missing_seeds() -> None:
    from benchlib.quality import pilot

    for bad in ((), (160, 160), (320, 160), (162,)):
        with pytest.raises(ValueError, match='candidates'):
            pilot.PilotRule(candidates=bad, target=3.0)
    rule = pilot.PilotRule(candidates=(160, 320), target=3.0)
    with pytest.raises(ValueError, match='T = 320 has fewer than 2'):
        pilot.choose_protocol(rule, {160: _summary(1, 1, 0), 320: dict(n=1, sd=None)})
    runs = [dict(metric_3t4=20.0, metric_t=22.0, train_s=10.0, eval_s=4.0),
            dict(metric_3t4=25.0, metric_t=24.0, train_s=12.0, eval_s=6.0),
            dict(metric_3t4=None, metric_t=None, error='boom')]
    s = pilot.summarize_candidate(runs)
    assert s['n'] == 2 and s['mean'] == 23.0 and s['sd'] == pytest.approx(math.sqrt(2))
    assert s['last_quarter_change'] == 1.5 and s['train_s'] == 11.0 and s['eval_s'] == 2.5


@pytest.mark.slow
def test_quick_pilot_writes_its_runs_and_decision(tmp_path: Path) -> None:
    script = load_repo_script('benchmarks/bench_quality.py', 'bench_quality')
    code = script.main(['--pilot', '--quick', '--tasks', 'seg', '--seeds', '2', '--work-dir',
                        str(tmp_path / 'work'), '--cache-dir', str(tmp_path / 'cache')])
    assert code == 0
    out = tmp_path / 'work' / 'quick' / 'pilot'
    results = json.loads((out / 'pilot_seg.json').read_text())
    task = results['tasks']['seg']
    assert results['settings']['seeds'] == [1000, 1001]
    assert results['settings']['mode'] == 'pilot_quick'
    for t in (4, 8):
        runs = task['runs'][str(t)]
        assert [r['seed'] for r in runs] == [1000, 1001]
        assert all(r['error'] is None and 0 <= r['metric_t'] <= 100 for r in runs)
    decision = task['decision']
    assert 'error' not in decision and decision['iters'] in (4, 8) and decision['seeds'] >= 3
    assert 'Decision: T =' in (out / 'pilot_seg.md').read_text()
    assert not (tmp_path / 'work' / 'runs' / 'pilot_quick' / 'seg').exists()  # cleaned up
    # --redecide applies the rule again to the saved runs, without training
    (out / 'pilot_seg.md').unlink()
    assert script.main(['--pilot', '--quick', '--tasks', 'seg', '--redecide', '--work-dir',
                        str(tmp_path / 'work')]) == 0
    again = json.loads((out / 'pilot_seg.json').read_text())['tasks']['seg']
    assert again['runs'] == task['runs'] and again['decision'] == decision
    assert 'iters' in again['decision_without_gain_check']
    assert 'Decision: T =' in (out / 'pilot_seg.md').read_text()
    assert script.main(['--pilot', '--quick', '--tasks', 'det', '--redecide', '--work-dir',
                        str(tmp_path / 'work')]) == 2  # no det pilot to redecide
