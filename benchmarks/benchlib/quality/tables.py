"""The evidence benchmark's results files: the Markdown tables and report, and the JSON +
Markdown pair written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

from benchlib import common
from benchlib.quality.configs import ROW_KEYS, ROWS, PathLike
from benchlib.quality.deployed import LATENCY_THREADS, latency_of
from benchlib.quality.figure import write_figure
from benchlib.quality.statistics import compare_rows, summarize_row
from lrpet_mm.report.markdown import format_count
from lrpet_mm.utils.atomic import check_writable_dir


def format_mean_std(mean: Optional[float], std: Optional[float], digits: int = 1) -> str:
    """``'41.2 ± 1.3'``, ``'41.2'`` (one seed) or ``'n/a'``."""
    if mean is None:
        return 'n/a'
    if std is None:
        return f'{mean:.{digits}f}'
    return f'{mean:.{digits}f} ± {std:.{digits}f}'


def _percent_change(value: Optional[float], base: Optional[float]) -> Optional[float]:
    if value is None or base in (None, 0):
        return None
    return 100.0 * (value / base - 1.0)


def _fmt(value: Optional[float], spec: str = '.1f', suffix: str = '') -> str:
    return 'n/a' if value is None else f'{value:{spec}}{suffix}'


def markdown_task_table(task: dict) -> str:
    """The results table of one task: metric, time, complexity and latency per row."""
    label = task['metric_label']
    rows = task['rows']
    base = (rows.get('baseline') or {}).get('summary') or {}
    latency = task.get('latency') or {}
    lines = [f'| method | {label} (%), mean ± std | per seed | training (s) | backbone FLOPs '
             '| vs baseline | whole-model FLOPs | vs baseline | backbone params '
             '| deployed whole model, ORT (ms), median [range] |',
             '|---|---:|---|---:|---:|---:|---:|---:|---:|---:|']
    for key in ROW_KEYS:
        if key not in rows:
            continue
        row = rows[key]
        summary = row.get('summary') or summarize_row(row)
        per_seed = []
        for seed, entry in sorted(row.get('seeds', {}).items(), key=lambda kv: int(kv[0])):
            value = entry.get('metric_pct')
            per_seed.append('error' if entry.get('error') else _fmt(value))
        metric = format_mean_std(summary.get('metric_mean'), summary.get('metric_std'))
        if summary.get('errors'):
            metric += f' ({summary["errors"]} failed)'
        change = _percent_change(summary.get('backbone_flops'), base.get('backbone_flops'))
        model_change = _percent_change(summary.get('model_flops'), base.get('model_flops'))
        lat = latency_of(latency, key)
        lat_text = 'n/a' if lat is None else f'{lat:.1f}'
        base_lat = latency_of(latency, 'baseline')
        if lat is not None:
            lo, hi = latency['rows'][key]['range_ms']
            lat_text += f' [{lo:.1f}, {hi:.1f}]'
            if base_lat and key != 'baseline':
                lat_text += f' ({base_lat / lat:.2f}×)'
        lines.append(
            f'| {row["label"]} | {metric} | {" / ".join(per_seed)} '
            f'| {_fmt(summary.get("train_s_mean"), ".0f")} '
            f'| {format_count(summary.get("backbone_flops"))} '
            f'| {"" if change is None or key == "baseline" else f"{change:+.1f} %"} '
            f'| {format_count(summary.get("model_flops"))} '
            f'| {"" if model_change is None or key == "baseline" else f"{model_change:+.1f} %"} '
            f'| {format_count(summary.get("backbone_params"))} | {lat_text} |')
    return '\n'.join(lines) + '\n'


def markdown_comparisons(task: dict) -> str:
    """Each reported pair (:data:`COMPARISONS`), paired by seed."""
    comparisons = task.get('comparisons') or compare_rows(task)
    if not comparisons:
        return ''
    lines = ['| comparison | mean paired difference (pp) | 95 % CI | first wins '
             '| detectable at this n (pp, 80 % power) | reading |',
             '|---|---:|---|---:|---:|---|']
    for c in comparisons.values():
        ci = c.get('ci95')
        lines.append(
            f'| {task["rows"][c["ours"]]["label"]} − {task["rows"][c["other"]]["label"]} '
            f'| {_fmt(c.get("mean"), "+.2f")} '
            f'| {"n/a" if not ci else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"} '
            f'| {c.get("wins", 0)} of {c.get("n", 0)} | {_fmt(c.get("detectable"), ".2f")} '
            f'| {c.get("verdict", "n/a")} |')
    return '\n'.join(lines) + '\n'


def _sessions_lines(sessions: list) -> list:
    """One line listing a resumed run's sessions (none for a run done in one session)."""
    if len(sessions) < 2:
        return []
    parts = []
    for s in sessions:
        wall = s.get('wall_time_s')
        minutes = None if wall is None else wall / 60
        differs = s.get('pretrained_sha256_differs')
        parts.append(f'{s.get("started", "?")[:16]}, commit '
                     f'{((s.get("machine") or {}).get("git_commit") or "?")[:7]}, '
                     f'{_fmt(minutes, ".1f", " min")}'
                     f'{", pretrained backbone sha256 differs" if differs else ""}')
    return [f'- sessions ({len(sessions)}, resumed with `--resume`): ' + '; '.join(parts)]


def markdown_results(results: dict) -> str:
    """The whole Markdown report."""
    settings = results['settings']
    machine = results.get('machine', {})
    lines = ['# Evidence benchmark: LRPET vs decompose-then-finetune and channel pruning', '']
    if settings['mode'] == 'quick':
        lines += ['**Quick mode**: a smoke test with tiny budgets; its numbers say nothing about '
                  'the methods.', '']
    if not results.get('complete'):
        lines += ['**Incomplete run** (interrupted, or still running): the tables hold the '
                  'rows finished so far.', '']
    if results.get('errors'):
        lines += [f'**{len(results["errors"])} row run(s) failed**: see `errors` in the JSON.',
                  '']
    wall = results.get('wall_time_s')
    pre = results.get('pretrained') or {}
    data = results.get('data') or {}
    lines += [
        f'- command: `{results.get("command", "")}` ({settings["mode"]} mode)',
        f'- wall time: {_fmt(None if wall is None else wall / 60, ".1f", " min")}',
        f'- machine: {machine.get("cpu", "?")}, {machine.get("usable_cores", "?")} CPU core(s), '
        f'torch {machine.get("torch", "?")} ({machine.get("threads", "?")} threads), mmdet '
        f'{machine.get("mmdet", "?")}, mmseg {machine.get("mmseg", "?")}; load average at '
        f'start {machine.get("load_average", "?")}',
        f'- code: commit {(machine.get("git_commit") or "?")[:12]}'
        f'{" + uncommitted changes" if machine.get("git_dirty") else ""}',
        *_sessions_lines(results.get('sessions') or []),
        f'- data: {data.get("description", "?")}',
        f'- pretrained backbone: ResNet-{settings["pretrain"]["depth"]} deep stem, '
        f'pretrained by the package on a synthetic {pre.get("num_classes", 10)}-class shape '
        f'classification task ({settings["pretrain"]["num_train"]} images of '
        f'{settings["pretrain"]["img_size"]} px, {settings["pretrain"]["epochs"]} epochs): '
        f'held-out accuracy {_fmt(pre.get("test_accuracy_pct"), ".1f", " %")}, BN scales '
        f'|γ| median {_fmt(pre.get("gamma_median"), ".3f")}, '
        f'{_fmt(pre.get("dead_fraction_pct"), ".2f", " %")} below 0.01; file '
        f'`{pre.get("file", "?")}`',
        f'- seeds: {", ".join(str(s) for s in settings["seeds"])}, paired (same initial '
        'weights, data order and test set for every row of a seed)',
        '- every compressed row is evaluated as its deployed model (factorized with BNs folded,'
        ' or pruned); FLOPs = multiply-adds (`mmengine.analysis`) at the planning input size, '
        'of the backbone and of the whole model\'s test-time tensor forward (as '
        '`tools/report.py` counts it); latency: each row\'s deployed whole model (seed 0, '
        'latency-aware merge and mmdeploy end-to-end export as `tools/deploy.py` does) in ONNX '
        f'Runtime, {LATENCY_THREADS} threads, batch 1, on one preprocessed test image: '
        f'{settings.get("latency_rounds", 1)} rounds in shuffled order, each of '
        f'{settings["latency_repeats"]} interleaved runs per model; median of the round '
        'medians [their range]; the baseline is timed twice (two sessions) to measure the '
        'agreement of identical architectures', '']
    for key, task in results['tasks'].items():
        tset = settings['tasks'][key]
        plan = task.get('rank_plan') or {}
        lines += [f'## {task["task"].capitalize()}: {task["model"]}, '
                  f'−{100 * tset["flops_reduction"]:.0f} % backbone FLOPs', '',
                  f'- training: {tset["schedule"]}; {task.get("config_notes", "")}']
        if plan:
            c, h, w = plan['input_shape']
            lines.append(
                f'- uniform ranks (LRPET defaults, paper-exact, both LRA rows): rank ratio '
                f'{plan["rank_ratio"]:.4f} over {plan["num_layers"]} backbone convs, '
                f'backbone FLOPs at {c}×{h}×{w}: {format_count(plan["flops_before"])} → '
                f'{format_count(plan["flops_after"])} ({100 * plan["reduction"]:.2f} % fewer)')
            if plan.get('model_flops_before') is not None:
                lines.append(
                    f'- whole-model test-time FLOPs of that plan: '
                    f'{format_count(plan["model_flops_before"])} → '
                    f'{format_count(plan["model_flops_after"])} '
                    f'({100 * plan["model_reduction"]:.2f} % fewer): the budget of the '
                    '"whole model, same FLOPs" row')
        for row_key, ratio in (task.get('prune_ratios') or {}).items():
            where = ('every residual block' if row_key == 'prune' else
                     'every residual block and head layer chain')
            lines.append(f'- {task["rows"][row_key]["label"]}: {100 * ratio:.1f} % of the inner '
                         f'channels of {where} removed')
        agreement = (task.get('latency') or {}).get('agreement')
        if agreement:
            lines.append(f'- identical architectures (the baseline in two sessions) differ by '
                         f'{100 * agreement["relative_difference"]:.1f} % in median latency '
                         f'(target ≤ {100 * agreement["target"]:.0f} %: '
                         f'{"met" if agreement["met"] else "NOT met"})')
        if (task.get('latency') or {}).get('error'):
            lines.append(f'- latency: failed: `{task["latency"]["error"]}`')
        for row_key, info in (task.get('deployed') or {}).items():
            if info.get('error'):
                lines.append(f'- deployment of {row_key} failed: `{info["error"]}`')
        lines += ['', markdown_task_table(task), markdown_comparisons(task)]
        lines += [f'![{key}: metric vs deployed latency and FLOPs]({figure_name(results, key)})'
                  if task.get('figure') else '', '']
    lines += ['## Rows', '']
    ran = {key for task in results['tasks'].values() for key in task['rows']}
    for row in ROWS:
        if row.key in ran:
            lines.append(f'- **{row.label}**: {row.description}.')
    lines.append('')
    if results.get('errors'):
        lines += ['## Errors', '']
        for err in results['errors']:
            lines.append(f'- {err["task"]} / {err["row"]} / seed {err["seed"]}: '
                         f'`{(err["error"] or "").splitlines()[0] if err["error"] else ""}`')
        lines.append('')
    return '\n'.join(lines)


def result_name(tasks: Sequence[str], variant: Optional[str] = None) -> str:
    """``quality_det`` / ``quality_seg`` / ``quality_det_seg`` (one result file per task run),
    ``quality_det_ablation`` for the ablation run."""
    return 'quality_' + '_'.join(tasks) + (f'_{variant}' if variant else '')


def result_file_stem(results: dict) -> str:
    """The results' file name without extension (:func:`result_name` of their tasks)."""
    return result_name(list(results['tasks']) or list(results['settings']['tasks']),
                       results.get('variant'))


def figure_name(results: dict, task_key: str) -> str:
    """The figure file of one task, next to the tables: ``<result name>_<task>.png``."""
    name = result_file_stem(results)
    return f'{name}.png' if len(results['tasks']) < 2 else f'{name}_{task_key}.png'


def write_results(results: dict, out_dir: PathLike) -> Tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` atomically (temporary file, then rename), and
    each task's figure (:func:`figure_name`) once its rows have metrics."""
    out_dir = check_writable_dir(out_dir)
    name = result_file_stem(results)
    for key, task in results['tasks'].items():
        path = write_figure(task, out_dir / figure_name(results, key),
                            f'{task["model"]} ({results["settings"]["mode"]} mode): each row\'s '
                            'metric over its paired seeds against its deployed cost')
        task['figure'] = None if path is None else path.name
    json_path = common.write_results(out_dir / f'{name}.json', results,
                                     markdown_results(results))
    return json_path, json_path.with_suffix('.md')
