"""The report's rows and Markdown."""
from typing import List, Optional


def _reduction(before: Optional[int], after: Optional[int]) -> Optional[float]:
    if before is None or after is None or before == 0:
        return None
    return 100.0 * (1.0 - after / before)


def format_count(value: Optional[float]) -> str:
    if value is None:
        return 'n/a'
    for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(value) >= scale:
            return f'{value / scale:.3f} {unit}'
    return str(int(value))


def _fmt(value: Optional[float], spec: str, suffix: str = '') -> str:
    return '' if value is None else f'{value:{spec}}{suffix}'


def _part(complexity: dict, part: str) -> dict:
    """FLOPs / params of ``part`` (a component or ``'model'``) of one measured model; the
    backbone's own count when the whole forward could not be traced."""
    if part == 'model':
        return complexity['model']
    entry = complexity.get('components', {}).get(part)
    if part == 'backbone' and (entry is None or entry['flops'] is None):
        return complexity['backbone']
    return entry


def build_rows(complexity: dict, metric: Optional[dict]) -> List[dict]:
    """The table rows: each component (backbone, neck, heads) and the whole model ×
    original / compact."""
    parts = list(complexity['original'].get('components') or ['backbone']) + ['model']
    rows = []
    for part in parts:
        for which in ('original', 'compact'):
            entry = _part(complexity[which], part)
            base = _part(complexity['original'], part)
            row = dict(part=part, model=which, flops=entry['flops'], params=entry['params'],
                       flops_reduction_pct=None, params_reduction_pct=None, metric=None,
                       delta_metric=None, flops_error=entry.get('flops_error'))
            if which == 'compact':
                row['flops_reduction_pct'] = _reduction(base['flops'], entry['flops'])
                row['params_reduction_pct'] = _reduction(base['params'], entry['params'])
            if part == 'model' and metric is not None:
                row['metric'] = metric[which]
                if which == 'compact':
                    row['delta_metric'] = metric['delta']
            rows.append(row)
    return rows


def markdown_table(report: dict) -> str:
    """The Markdown table of ``report`` (a :func:`generate_report` result)."""
    metric = report.get('metric')
    name = metric['name'] if metric else 'metric'
    lines = [f'| part | model | FLOPs | params | FLOPs reduction | params reduction | {name} '
             f'| Δ {name} |', '|---|---|---:|---:|---:|---:|---:|---:|']
    for row in report['rows']:
        part = 'whole model' if row['part'] == 'model' else row['part']
        model = 'original (projected)' if row['model'] == 'original' else 'compact'
        flops = (format_count(row['flops']) if row['flops'] is not None
                 else f'n/a ({row["flops_error"] or "not counted"})'.replace('|', '\\|'))
        metric_text = '' if row['metric'] is None else f'{row["metric"]:.4f}'
        lines.append(
            f'| {part} | {model} | {flops} | {format_count(row["params"])} '
            f'| {_fmt(row["flops_reduction_pct"], ".2f", " %")} '
            f'| {_fmt(row["params_reduction_pct"], ".2f", " %")} '
            f'| {metric_text} | {_fmt(row["delta_metric"], "+.4f")} |')
    return '\n'.join(lines) + '\n'


def markdown_report(report: dict) -> str:
    c, h, w = report['input_shape']
    lines = ['# LRPET report', '',
             f'- task: {report["task"]} (`default_scope={report["default_scope"]!r}`)',
             f'- original (projected): `{report["original"]["config"]}` + '
             f'`{report["original"]["checkpoint"]}`',
             f'- compact: `{report["compact"]["config"]}` + '
             f'`{report["compact"]["checkpoint"]}`',
             f'- FLOPs at input {c}×{h}×{w} (C×H×W, one all-zero image); '
             f'{report["flops_convention"]}',
             f'- factorized layers: {len(report["layers"])}', '',
             markdown_table(report)]
    if report['task'] == 'detection':
        text = ('Whole-model FLOPs are the tensor forward (`model._forward`: backbone, neck, '
                'heads, no post-processing); a component\'s FLOPs are its share of it.')
        if report.get('rpn_proposals') is not None:
            text += (f' The RPN\'s NMS is off while counting, so the RoI head runs on the top '
                     f'`max_per_img={report["rpn_proposals"]}` proposals (or all candidates if '
                     'fewer) for both models alike.')
        lines += [text, '']
    if report.get('metric') is None:
        lines += ['The task metric was not evaluated.', '']
    for warning in report.get('warnings', []):
        lines += [f'**Warning:** {warning}', '']
    lines += ['![ranks](ranks.png)', '']
    return '\n'.join(lines)
