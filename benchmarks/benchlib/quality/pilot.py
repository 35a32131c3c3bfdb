"""The baseline-only pilot that fixes the evidence protocol before any compressed row runs.

The rows of ``bench_quality.py`` compare methods with paired seeds; whether they can answer a
user depends on two numbers fixed in advance: the training length ``T`` and the number of
seeds ``n``. The pilot trains only the uncompressed baseline, for each candidate ``T`` and a
few seeds, evaluates its checkpoints at ``3T/4`` and ``T`` on the test set the main run will
use (:data:`PILOT_TEST_IMAGES`), and
:func:`choose_protocol` then applies a rule written before the pilot ran:

1. ``T`` is the shortest candidate whose baseline metric changes by less than
   ``plateau_points`` (mean over seeds of ``|m(T) − m(3T/4)|``) over its last quarter and
   whose seed-to-seed spread has settled: ``sd(T) ≤ (1 + spread_tolerance) · sd(T_max)``, the
   spread of the longest candidate, and (amended, see below) whose mean is not exceeded by
   ``gain_points`` or more at the next longer candidate (doubling T no longer pays). None
   qualifies: the longest, flagged as not converged.

   The amendment (``gain_points``) was made after the pilot of 2026-12-03 ran and before any
   compressed row: without it the rule picked T = 160 for segmentation, where the baseline
   sits on a plateau near 20 mIoU that T = 640 leaves behind (near 50). The decision of the
   rule without it is kept in the results (``decision_without_gain_check``).
2. The standard deviation of a paired difference between two rows is taken as
   ``√2 · sd(T)`` (no correlation between rows of a seed assumed; the 2026-12-02 run measured
   6.8 mAP points for LRPET − baseline where √2 · sd(baseline) was 6.5).
3. ``n`` for power is the smallest number of seeds (≥ 3) whose paired t-test at 5 % detects
   ``target`` points with 80 % power: ``(t_.975,n−1 + t_.8,n−1) · √2 · sd / √n ≤ target``.
4. ``n`` in budget: a seed of the main run costs ``ROW_TRAININGS`` baseline trainings of
   length ``T`` plus ``ROW_EVALUATIONS`` test evaluations (both measured in the pilot);
   ``floor(budget / cost)`` seeds fit. The protocol runs ``min(n for power, n in budget)``
   seeds and states the detectable difference that gives, and what the power target needs.

:func:`run_pilot` runs it (``bench_quality.py --pilot``) and writes ``pilot_<task>.json`` /
``.md`` after every training, atomically.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import shutil
import time
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from benchlib import common
from benchlib.quality.configs import (
    TEST_IMAGES,
    BenchSettings,
    PathLike,
    TaskSettings,
    base_config,
)
from benchlib.quality.orchestration import QualityBenchmark, train
from benchlib.quality.statistics import mean_std, t_quantile
from lrpet_mm.utils.values import error_text

#: Trainings of length T per seed of the main run, in baseline-training units (measured
#: 2026-12-03: a hook row trains 1.25–1.3× as long as the baseline; a half row T/2): baseline
#: 1, LRPET backbone-only 1.25, the two whole-model LRPET rows 1.3 each, three channel-pruning
#: rows (one per LRPET row's FLOPs) and LRA at equal budget 0.5 each.
ROW_TRAININGS = 1.0 + 1.25 + 2 * 1.3 + 4 * 0.5
#: Test-set evaluations per seed of the main run (one per row).
ROW_EVALUATIONS = 8


@dataclasses.dataclass(frozen=True)
class PilotRule:
    """The decision rule of the pilot, fixed before it runs (see the module docstring)."""
    candidates: Tuple[int, ...]  # T values, ascending, each divisible by 4
    target: float  # detectable paired difference wanted, metric points
    plateau_points: float = 1.0
    spread_tolerance: float = 0.25
    gain_points: Optional[float] = 1.0  # None: the rule as first written (no gain check)
    power: float = 0.8
    budget_min: float = 90.0  # wall minutes of one task's main run
    min_seeds: int = 3
    max_seeds: int = 200

    def __post_init__(self):
        if not self.candidates or any(t < 4 or t % 4 for t in self.candidates) or \
                list(self.candidates) != sorted(set(self.candidates)):
            raise ValueError('candidates must be ascending, distinct and multiples of 4 (the '
                             f'pilot evaluates at 3T/4), got {self.candidates!r}')
        if self.target <= 0 or self.budget_min <= 0:
            raise ValueError('target and budget_min must be positive')


#: The rules of the two tasks (issue #27: ≤ 3 mAP points, ≤ 1.5 mIoU points).
DET_RULE = PilotRule(candidates=(160, 320, 640), target=3.0)
SEG_RULE = PilotRule(candidates=(160, 320, 640), target=1.5)
QUICK_RULE = PilotRule(candidates=(4, 8), target=3.0, budget_min=1.0)


def detectable(sd_diff: float, n: int, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired t-test at 5 % detects with
    probability ``power`` from ``n`` seeds whose differences have std ``sd_diff``."""
    return (t_quantile(0.975, n - 1) + t_quantile(power, n - 1)) * sd_diff / math.sqrt(n)


def summarize_candidate(runs: Sequence[Mapping]) -> dict:
    """Mean ± sd of the metric at T over the seeds, the mean |change| over the last quarter,
    and the mean training / evaluation seconds of one candidate's runs."""
    good = [r for r in runs if r.get('metric_t') is not None and r.get('metric_3t4') is not None]
    mean, sd = mean_std([r['metric_t'] for r in good])
    change, _ = mean_std([abs(r['metric_t'] - r['metric_3t4']) for r in good])
    train_s, _ = mean_std([r['train_s'] for r in good])
    eval_s, _ = mean_std([r['eval_s'] / 2 for r in good])  # two evaluations per run
    return dict(n=len(good), mean=mean, sd=sd, last_quarter_change=change, train_s=train_s,
                eval_s=eval_s)


def choose_protocol(rule: PilotRule, summaries: Mapping[int, Mapping]) -> dict:
    """Apply ``rule`` to the per-candidate summaries (:func:`summarize_candidate`, keyed by T).
    Needs every candidate with ≥ 2 seeds."""
    for t in rule.candidates:
        s = summaries.get(t) or {}
        if (s.get('n') or 0) < 2 or s.get('sd') is None:
            raise ValueError(f'candidate T = {t} has fewer than 2 evaluated seeds')
    longest = summaries[rule.candidates[-1]]['sd']
    chosen, converged = rule.candidates[-1], False
    for i, t in enumerate(rule.candidates):
        s = summaries[t]
        later = rule.candidates[i + 1] if i + 1 < len(rule.candidates) else None
        if rule.gain_points is not None and (
                later is None or summaries[later]['mean'] - s['mean'] >= rule.gain_points):
            continue  # a longer schedule still gains (or none was tried to show it does not)
        if (s['last_quarter_change'] < rule.plateau_points
                and s['sd'] <= (1 + rule.spread_tolerance) * longest):
            chosen, converged = t, True
            break
    s = summaries[chosen]
    sd_diff = math.sqrt(2) * s['sd']
    n_power = next((n for n in range(rule.min_seeds, rule.max_seeds + 1)
                    if detectable(sd_diff, n, rule.power) <= rule.target), None)
    seed_cost_s = ROW_TRAININGS * s['train_s'] + ROW_EVALUATIONS * s['eval_s']
    n_budget = int(rule.budget_min * 60 // seed_cost_s)
    n = max(rule.min_seeds, min(n_power or rule.max_seeds, n_budget))
    return dict(
        iters=chosen, converged=converged, sd=s['sd'], sd_diff=sd_diff,
        seed_cost_s=seed_cost_s, n_power=n_power, n_budget=n_budget, seeds=n,
        detectable=detectable(sd_diff, n, rule.power),
        meets_target=n_power is not None and n >= n_power,
        power_run_min=None if n_power is None else n_power * seed_cost_s / 60)


class PilotRun(QualityBenchmark):
    """Baseline-only trainings of every candidate T and seed (data, pretrained backbone,
    initial weights and evaluation as the main run's)."""

    def __init__(self, settings: BenchSettings, rules: Mapping[str, PilotRule],
                 work_dir: PathLike, out_dir: PathLike, cache_dir: Optional[PathLike] = None,
                 log: Callable[[str], None] = print, command: str = ''):
        super().__init__(settings, work_dir, out_dir, rows=('baseline',), cache_dir=cache_dir,
                         log=log, command=command)
        self.rules = dict(rules)
        self.results = dict(
            benchmark='lrpet_mm evidence pilot (baseline only)', command=command,
            mode=settings.mode, started=None, finished=None, wall_time_s=None,
            settings=settings.to_dict(), machine={}, data={}, pretrained={}, tasks={},
            errors=[])

    def save(self) -> List[Path]:
        if self.start is not None:
            self.results['wall_time_s'] = time.time() - self.start
        paths = []
        for key, task in self.results['tasks'].items():
            rule = self.rules[key]
            task['summaries'] = {str(t): summarize_candidate(task['runs'].get(str(t), []))
                                 for t in rule.candidates}
            by_t = {t: task['summaries'][str(t)] for t in rule.candidates}
            try:
                task['decision'] = choose_protocol(rule, by_t)
                task['decision_without_gain_check'] = choose_protocol(
                    dataclasses.replace(rule, gain_points=None), by_t)
            except ValueError as e:  # not all candidates have run yet
                task['decision'] = dict(error=str(e))
            data = dict(self.results, tasks={key: task})
            paths.append(common.write_results(self.out_dir / f'pilot_{key}.json', data,
                                              pilot_markdown(data, key, rule)))
        return paths

    def run(self) -> int:
        self.start = time.time()
        self.results['started'] = datetime.datetime.now().astimezone().isoformat(
            timespec='seconds')
        self.results['machine'] = common.machine_info()
        data_root = self._data()
        pretrained = self._pretrained()
        for task in self.settings.tasks:
            rule = self.rules[task.key]
            self.results['tasks'][task.key] = dict(
                task=task.task, model=task.model_name, metric_label=task.metric_label,
                rule=dataclasses.asdict(rule), runs={})
            task_dir = self.work_dir / 'runs' / self.settings.mode / task.key
            shutil.rmtree(task_dir, ignore_errors=True)
            for seed in self.settings.seeds:
                init_cfg = base_config(task, self.settings, data_root, task_dir / 'init', seed,
                                       pretrained)
                init = self._initial_checkpoint(init_cfg, seed,
                                                task_dir / f'seed{seed}' / 'init.pth')
                for iters in rule.candidates:
                    entry = self._run_candidate(dataclasses.replace(task, iters=iters), seed,
                                                data_root, pretrained, init,
                                                task_dir / f'seed{seed}' / f'T{iters}')
                    self.results['tasks'][task.key]['runs'].setdefault(str(iters), []).append(
                        entry)
                    self.save()
            shutil.rmtree(task_dir, ignore_errors=True)
        self.results['finished'] = datetime.datetime.now().astimezone().isoformat(
            timespec='seconds')
        self.save()
        self.log(f'pilot done in {(time.time() - self.start) / 60:.1f} min')
        return 1 if self.results['errors'] else 0

    def _run_candidate(self, task: TaskSettings, seed: int, data_root: Path, pretrained: Path,
                       init: Path, run_dir: Path) -> dict:
        """Train the baseline for ``task.iters`` (checkpoints every T/4), evaluate at 3T/4
        and T."""
        entry = dict(seed=seed, iters=task.iters, metric_3t4=None, metric_t=None, error=None)
        t0 = time.time()
        try:
            cfg = base_config(task, self.settings, data_root, run_dir, seed, pretrained)
            cfg.load_from = str(init)
            cfg.default_hooks.checkpoint.interval = task.iters // 4
            ckpt, info = train(cfg)
            self._expect_iters(info, task.iters)
            entry['train_s'] = time.time() - t0
            t1 = time.time()
            at_3t4 = run_dir / f'iter_{3 * task.iters // 4}.pth'
            entry['metric_3t4'] = self._evaluate(task, cfg, at_3t4, run_dir / 'eval')['metric_pct']
            entry['metric_t'] = self._evaluate(task, cfg, ckpt, run_dir / 'eval')['metric_pct']
            entry['eval_s'] = time.time() - t1
        except Exception as e:  # noqa: BLE001 - recorded; the other runs go on
            entry['error'] = error_text(e, 600)
            self.results['errors'].append(dict(task=task.key, seed=seed, iters=task.iters,
                                               error=entry['error']))
        self.log(f'pilot {task.key} seed {seed} T = {task.iters}: {task.metric_label} '
                 f'{entry["metric_3t4"]} at 3T/4, {entry["metric_t"]} at T '
                 f'({time.time() - t0:.0f} s)')
        shutil.rmtree(run_dir, ignore_errors=True)
        return entry


def _f(value: Optional[float], spec: str = '.2f') -> str:
    return 'n/a' if value is None else f'{value:{spec}}'


def pilot_markdown(results: dict, key: str, rule: PilotRule) -> str:
    task = results['tasks'][key]
    label = task['metric_label']
    lines = [f'# Evidence pilot: {task["model"]}, baseline only', '',
             f'- command: `{results["command"]}`',
             f'- machine: {results["machine"].get("cpu", "?")}, '
             f'{results["machine"].get("cores", "?")} cores; wall time '
             f'{_f((results.get("wall_time_s") or 0) / 60, ".1f")} min',
             f'- data: {results["data"].get("description", "")}',
             f'- seeds {list(results["settings"]["seeds"])}; candidates T = '
             f'{list(rule.candidates)}; rule (fixed before the run): shortest T with mean '
             f'|m(T) − m(3T/4)| < {rule.plateau_points} point and sd(T) ≤ '
             f'{1 + rule.spread_tolerance:g} × sd(T = {rule.candidates[-1]})'
             + ('' if rule.gain_points is None else
                f' and the next longer T not ≥ {rule.gain_points:g} point better (amended after '
                'the pilot, see benchlib/quality/pilot.py)') + '; paired sd = '
             f'√2 × sd(T); target: detectable ≤ {rule.target} points (80 % power, paired t, '
             f'5 %); budget {rule.budget_min:g} min per task run', '',
             f'| T | seeds | {label} at T, mean ± sd | per seed (3T/4 → T) | mean abs change over '
             'last quarter | training s | evaluation s |',
             '|---:|---:|---:|---|---:|---:|---:|']
    for t in rule.candidates:
        runs = task['runs'].get(str(t), [])
        s = task['summaries'][str(t)]
        per_seed = ' / '.join('error' if r.get('error') else
                              f'{_f(r["metric_3t4"], ".1f")} → {_f(r["metric_t"], ".1f")}'
                              for r in runs)
        lines.append(f'| {t} | {s["n"]} | {_f(s["mean"])} ± {_f(s["sd"])} | {per_seed} | '
                     f'{_f(s["last_quarter_change"])} | {_f(s["train_s"], ".0f")} | '
                     f'{_f(s["eval_s"], ".1f")} |')
    d = task.get('decision') or {}
    lines.append('')
    if d.get('error'):
        lines.append(f'Decision: not yet ({d["error"]}).')
    else:
        how = ('plateau and spread reached' if d['converged'] else
               'no candidate met the rule: the longest')
        lines += [
            f'**Decision: T = {d["iters"]}** ({how}); '
            f'paired sd ≈ {_f(d["sd_diff"])} points; a seed of the main run ≈ '
            f'{_f(d["seed_cost_s"] / 60, ".1f")} min; seeds for the power target: '
            f'{d["n_power"] if d["n_power"] is not None else f"> {rule.max_seeds}"}'
            f' ({_f(d["power_run_min"], ".0f")} min); seeds in the budget: {d["n_budget"]}. '
            f'**The main run uses n = {d["seeds"]} seeds: detectable difference '
            f'{_f(d["detectable"])} points** '
            f'({"meets" if d["meets_target"] else "misses"} the target of {rule.target}).']
        first = task.get('decision_without_gain_check') or {}
        if first.get('iters') not in (None, d['iters']):
            lines += ['', f'The rule as first written (no gain check) picked T = '
                      f'{first["iters"]} (n = {first["seeds"]}, detectable '
                      f'{_f(first["detectable"])} points).']
    return '\n'.join(lines) + '\n'


def redecide(json_path: PathLike, rule: PilotRule) -> Path:
    """Apply ``rule`` again to the runs of a finished pilot's ``pilot_<task>.json`` and
    rewrite it and its Markdown (the runs are kept as they are)."""
    import json

    json_path = Path(json_path)
    results = json.loads(json_path.read_text())
    (key, task), = results['tasks'].items()
    task['rule'] = dataclasses.asdict(rule)
    by_t = {t: summarize_candidate(task['runs'].get(str(t), [])) for t in rule.candidates}
    task['summaries'] = {str(t): v for t, v in by_t.items()}
    task['decision'] = choose_protocol(rule, by_t)
    task['decision_without_gain_check'] = choose_protocol(
        dataclasses.replace(rule, gain_points=None), by_t)
    return common.write_results(json_path, results, pilot_markdown(results, key, rule))


def run_pilot(settings: BenchSettings, rules: Mapping[str, PilotRule], work_dir: PathLike,
              out_dir: PathLike, cache_dir: Optional[PathLike] = None,
              log: Callable[[str], None] = print, command: str = '') -> Tuple[int, dict]:
    """Run the pilot of ``settings.tasks``; returns ``(exit code, results)``."""
    pilot = PilotRun(settings, rules, work_dir, out_dir, cache_dir, log, command)
    try:
        code = pilot.run()
    except Exception as e:  # noqa: BLE001 - data / pretraining failed: nothing could run
        pilot.results['errors'].append(dict(error=error_text(e, 600)))
        pilot.log(f'pilot failed: {error_text(e, 600)}')
        code = 1
    return code, pilot.results


#: Seeds of the pilot: distinct from the main run's 0 .. n − 1, so no pilot training is reused.
PILOT_SEEDS = (1000, 1001, 1002, 1003)
#: Test images of the pilot and of the main run that follows it (the 2026-12-02 protocol had
#: 100; 400 lowers the test-sample share of the seed spread for ~35 s per detector test).
PILOT_TEST_IMAGES = TEST_IMAGES


def pilot_settings(settings: BenchSettings, seeds: Optional[Sequence[int]] = None
                   ) -> BenchSettings:
    """``settings`` for the pilot: its own data directory (mode 'pilot' or 'pilot_quick'),
    :data:`PILOT_TEST_IMAGES` test images (quick: as given) and :data:`PILOT_SEEDS` (or
    ``seeds``)."""
    quick = settings.mode == 'quick'
    return dataclasses.replace(
        settings, mode='pilot_quick' if quick else 'pilot',
        num_val=settings.num_val if quick else PILOT_TEST_IMAGES,
        seeds=tuple(seeds) if seeds is not None else
        (settings.seeds if quick else PILOT_SEEDS))


__all__ = ['DET_RULE', 'SEG_RULE', 'QUICK_RULE', 'PILOT_SEEDS', 'PILOT_TEST_IMAGES',
           'PilotRule', 'choose_protocol', 'detectable', 'pilot_settings', 'redecide',
           'run_pilot',
           'summarize_candidate']
