"""tools/report.py: FLOPs, params and task metric of the projected vs the compact model, checked
against independent counts and test runs; clear errors and no partial output."""
import contextlib
import io
import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from torch import nn

import lrpet_mm  # noqa: F401
from helpers import load_repo_script
from lrpet_mm.engine import count_flops, count_params, infer_input_shape, rank_plan_from_checkpoint
from lrpet_mm.models import build_model_from_config, load_config
from lrpet_mm.report.complexity import measure_complexity
from lrpet_mm.report.markdown import build_rows, markdown_table
from lrpet_mm.report.report import config_scope

pytestmark = pytest.mark.slow  # drives a runner, a training, a tool or a benchmark

report_cli = load_repo_script('tools/report.py', 'report_cli')

SHAPE = (3, 64, 64)
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
REPORT_FILES = ('report.md', 'report.json', 'ranks.png')


def cli(*args) -> tuple:
    """Run tools/report.py in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = report_cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def make_run(trained, work, *extra):
    """tools/report.py on a shared LRPET run (``conftest``'s ``det_lrpet_run`` /
    ``seg_lrpet_run``: config as a user has it, validation included; read only)."""
    config, ckpt = trained
    name = config.stem
    out_dir = work / 'report'
    code, stdout, stderr = cli(config, ckpt, '--work-dir', out_dir, '--input-shape', *SHAPE, *extra)
    assert code == 0, stderr[-3000:]
    return dict(config=config, checkpoint=ckpt, out=out_dir, stdout=stdout, stderr=stderr,
                report=json.loads((out_dir / 'report.json').read_text()),
                lowrank_config=out_dir / f'{name}_lowrank.py',
                lowrank_checkpoint=out_dir / f'{name}_lowrank.pth')


@pytest.fixture(scope='module')
def seg_run(seg_lrpet_run, tmp_path_factory):
    return make_run(seg_lrpet_run, tmp_path_factory.mktemp('seg'))


# ----------------------------------------------------------------------- independent checks
class TensorForward(nn.Module):
    """The model's tensor forward with fixed data samples (as mmdet's get_flops.py does)."""

    def __init__(self, model, samples):
        super().__init__()
        self.model, self.samples = model, samples

    def forward(self, x):
        return self.model._forward(x, self.samples)


def data_samples(scope: str, shape) -> list:
    hw = tuple(shape[1:])
    meta = dict(img_shape=hw, ori_shape=hw, batch_input_shape=hw, pad_shape=hw,
                scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=meta)]
    from mmseg.structures import SegDataSample
    return [SegDataSample(metainfo=meta)]


def load(config: Path, checkpoint: Path) -> nn.Module:
    model = build_model_from_config(load_config(config))
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict']
    model.load_state_dict(state, strict=True)
    return model


def independent_counts(config: Path, checkpoint: Path) -> dict:
    model = load(config, checkpoint)
    scope = Config.fromfile(str(config)).default_scope
    if scope == 'mmdet':
        # as the report: RPN NMS off, so both models' RoI heads see max_per_img proposals
        model.rpn_head.test_cfg.nms = None
    return dict(backbone_flops=count_flops(model.backbone, SHAPE),
                backbone_params=count_params(model.backbone),
                model_flops=count_flops(TensorForward(model, data_samples(scope, SHAPE)), SHAPE),
                model_params=count_params(model))


def independent_test(config: Path, checkpoint: Path, work_dir: Path) -> dict:
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(work_dir)
    cfg.load_from = str(checkpoint)
    cfg.experiment_name = f'independent-{uuid.uuid4().hex[:8]}'
    cfg.visualizer.pop('name', None)
    return Runner.from_cfg(cfg).test()


def rows_of(report: dict) -> dict:
    return {(row['part'], row['model']): row for row in report['rows']}


def check_numbers(run: dict, tmp_path: Path, key: str,
                  test_runs=('original', 'compact')) -> None:
    """FLOPs / params against independent counts; the metric of the models in ``test_runs``
    against independent test runs."""
    report = run['report']
    rows = rows_of(report)
    for which, (config, ckpt) in (('original', (run['config'], run['checkpoint'])),
                                  ('compact', (run['lowrank_config'],
                                               run['lowrank_checkpoint']))):
        counts = independent_counts(config, ckpt)
        model = load(config, ckpt)
        components = [part for part, model_ in rows if model_ == which and part != 'model']
        assert components[0] == 'backbone' and 'data_preprocessor' not in components
        for part in components:  # every component with parameters, its own parameters
            assert rows[part, which]['params'] == count_params(model.get_submodule(part))
        # the components' shares of the traced forward add up to (at most) the whole
        shares = sum(rows[part, which]['flops'] for part in components)
        assert 0.95 * counts['model_flops'] <= shares <= counts['model_flops']
        assert rows['backbone', which]['flops'] == counts['backbone_flops']
        assert rows['backbone', which]['params'] == counts['backbone_params']
        assert rows['model', which]['flops'] == counts['model_flops']
        assert rows['model', which]['params'] == counts['model_params']
        assert rows['model', which]['flops_error'] is None
        if which not in test_runs:
            continue
        metrics = independent_test(config, ckpt, tmp_path / which)
        assert rows['model', which]['metric'] == pytest.approx(float(metrics[key]), abs=1e-9)
        assert report['metrics'][which][key] == pytest.approx(float(metrics[key]), abs=1e-9)
    for part in ('backbone', 'model'):
        before, after = rows[part, 'original'], rows[part, 'compact']
        assert after['flops'] < before['flops'] and after['params'] < before['params']
        assert after['flops_reduction_pct'] == pytest.approx(
            100 * (1 - after['flops'] / before['flops']))
        assert after['params_reduction_pct'] == pytest.approx(
            100 * (1 - after['params'] / before['params']))
    # The compact model reproduces the projected one (outputs agree to ~1e-6 relative), so the
    # evaluator's rounded metric is identical.
    metric = report['metric']
    assert metric['name'] == key
    assert abs(metric['compact'] - metric['original']) <= 1e-6
    assert rows['model', 'compact']['delta_metric'] == pytest.approx(
        metric['compact'] - metric['original'])


# ----------------------------------------------------------------------- segmentation
def test_seg_report_numbers_match_independent_counts_and_test_runs(seg_run, tmp_path):
    report = seg_run['report']
    assert report['task'] == 'segmentation' and report['input_shape'] == list(SHAPE)
    assert report['original'] == dict(config=str(seg_run['config']),
                                      checkpoint=str(seg_run['checkpoint']))
    assert report['compact']['checkpoint'] == str(seg_run['lowrank_checkpoint'])
    assert report['warnings'] == []
    check_numbers(seg_run, tmp_path, 'mIoU')


def test_seg_report_files_ranks_and_plot(seg_run):
    out, report = seg_run['out'], seg_run['report']
    for name in REPORT_FILES:
        assert (out / name).is_file()
    # the test runs' logs stay inside the output directory
    assert list((out / 'eval' / 'original').glob('*/*.log'))
    assert list((out / 'eval' / 'compact').glob('*/*.log'))
    assert not [p for p in out.iterdir() if p.name.startswith('.')]  # no temporary files

    # per-layer ranks: the checkpoint's plan, ResNetV1c-18 (deep stem 3 + 16 + downsample 3)
    ckpt = torch.load(seg_run['checkpoint'], map_location='cpu', weights_only=False)
    plan = rank_plan_from_checkpoint(ckpt)
    assert len(report['layers']) == len(plan) == 22
    for layer in report['layers']:
        assert layer['rank'] == layer['planned_rank'] == plan.rank_of(layer['name'])
        assert layer['full_rank'] == min(layer['out_features'], layer['in_features'])
        assert layer['folded_norm'] is not None
    assert report['layers'][0]['name'] == 'backbone.stem.0'
    # four spectra spread over depth; rank k: the (k+1)-th singular value is ~0
    spectra = report['spectra']
    assert len(spectra) == 4
    assert spectra[0]['name'] == report['layers'][0]['name']
    assert spectra[-1]['name'] == report['layers'][-1]['name']
    for spec in spectra:
        values = spec['singular_values']
        assert len(values) == spec['full_rank']
        assert values == sorted(values, reverse=True)
        assert values[spec['rank']] <= 1e-5 * values[0]

    # a valid PNG of a sensible size
    data = (out / 'ranks.png').read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b'IHDR'
    width, height = struct.unpack('>II', data[16:24])
    assert width > 400 and height > 300
    import matplotlib.image
    assert matplotlib.image.imread(str(out / 'ranks.png')).shape[:2] == (height, width)

    # the Markdown table: in report.md and on stdout (stdout holds only the table + paths)
    markdown = (out / 'report.md').read_text()
    table = seg_run['stdout'].split('report.md: ')[0]
    assert table.startswith('| part | model | FLOPs | params | FLOPs reduction | params '
                            'reduction | mIoU | Δ mIoU |')
    assert table in markdown
    rows = rows_of(report)
    compact = rows['model', 'compact']
    assert f'| {compact["flops_reduction_pct"]:.2f} % |' in table
    assert f'| {compact["metric"]:.4f} | {compact["delta_metric"]:+.4f} |' in table
    assert '3×64×64' in markdown
    # a progress bar was drawn for each model (on stderr)
    assert seg_run['stderr'].count(' 4/4, ') == 2


def test_seg_report_with_given_lowrank_files_without_eval(seg_run, tmp_path):
    out = tmp_path / 'again'
    code, stdout, stderr = cli(seg_run['config'], seg_run['checkpoint'], '--work-dir', out,
                               '--lowrank-config', seg_run['lowrank_config'],
                               '--lowrank-checkpoint', seg_run['lowrank_checkpoint'],
                               '--input-shape', 3, 128, 64, '--no-eval')
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)  # nothing factorized
    report = json.loads((out / 'report.json').read_text())
    assert report['input_shape'] == [3, 128, 64]
    assert report['metric'] is None and report['metrics'] is None
    assert report['layers'] == seg_run['report']['layers']
    assert 'not evaluated' in (out / 'report.md').read_text()
    # the backbone (output stride 8) scales exactly with the pixel count: 2x that at 64x64
    small = seg_run['report']['complexity']
    for which in ('original', 'compact'):
        got = report['complexity'][which]['backbone']
        assert got['flops'] == 2 * small[which]['backbone']['flops']
        assert got['params'] == small[which]['backbone']['params']


def test_report_counts_flops_at_the_input_shape_the_planner_uses(seg_run, tmp_path):
    """Without --input-shape the report reads the shape from the config by the rule of the
    hook's planner (one rule everywhere), not a per-task default."""
    out = tmp_path / 'default_shape'
    code, _, stderr = cli(seg_run['config'], seg_run['checkpoint'], '--work-dir', out,
                          '--lowrank-config', seg_run['lowrank_config'],
                          '--lowrank-checkpoint', seg_run['lowrank_checkpoint'], '--no-eval')
    assert code == 0, stderr
    expected = infer_input_shape(Config.fromfile(str(seg_run['config'])))
    assert json.loads((out / 'report.json').read_text())['input_shape'] == list(expected)


def test_report_refuses_a_config_of_another_codebase():
    with pytest.raises(ValueError, match=r"default_scope 'mmpretrain'; the report supports"):
        config_scope(Config(dict(default_scope='mmpretrain')))


class Untraceable(nn.Module):
    """A model whose tensor forward cannot be traced (its backbone can); it claims to be an
    mmseg model, so the report tries to trace it."""

    __module__ = 'mmseg.models.untraceable'

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3)

    def _forward(self, inputs, data_samples):
        raise RuntimeError('cannot | trace this')


def test_untraceable_whole_model_is_reported_not_fatal():
    result = measure_complexity(Untraceable(), (3, 8, 8))
    assert result['backbone'] == dict(flops=4 * 27 * 36, params=4 * 27 + 4)
    assert result['model'] == dict(flops=None, params=4 * 27 + 4,
                                   flops_error='RuntimeError: cannot | trace this')
    rows = build_rows(dict(original=result, compact=result), None)
    table = markdown_table(dict(rows=rows, metric=None))
    assert '| n/a (RuntimeError: cannot \\| trace this) |' in table
    assert table.count('\n') == 6


# ----------------------------------------------------------------------- errors
def truncated_copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:len(data) // 2])
    return dst


@pytest.mark.parametrize('case', ['missing checkpoint', 'truncated checkpoint', 'missing config',
                                  'out under a file', 'config/checkpoint mismatch',
                                  'lowrank is not factorized', 'truncated lowrank checkpoint'])
def test_bad_inputs_are_clear_errors_and_leave_no_files(seg_run, tmp_path, case):
    config, ckpt = seg_run['config'], seg_run['checkpoint']
    out = tmp_path / 'out'
    extra = []
    if case == 'missing checkpoint':
        ckpt = tmp_path / 'nope.pth'
        expected = [str(ckpt), 'does not exist']
    elif case == 'truncated checkpoint':
        ckpt = truncated_copy(ckpt, tmp_path / 'half.pth')
        expected = [str(ckpt), 'truncated']
    elif case == 'missing config':
        config = tmp_path / 'nope.py'
        expected = [str(config), 'does not exist']
    elif case == 'out under a file':
        (tmp_path / 'file').write_text('x')
        out = tmp_path / 'file' / 'out'
        expected = [str(out), 'cannot create output directory']
    elif case == 'config/checkpoint mismatch':
        ckpt = seg_run['lowrank_checkpoint']  # compact weights for the original structure
        expected = [str(ckpt), str(config), 'does not match', 'unexpected keys']
    elif case == 'lowrank is not factorized':
        extra = ['--lowrank-config', config, '--lowrank-checkpoint', ckpt]
        expected = [str(config), 'no factorized convs']
    else:
        bad = truncated_copy(seg_run['lowrank_checkpoint'], tmp_path / 'half_lowrank.pth')
        extra = ['--lowrank-config', seg_run['lowrank_config'], '--lowrank-checkpoint', bad]
        expected = [str(bad), 'truncated']
    code, stdout, stderr = cli(config, ckpt, '--work-dir', out, '--input-shape', *SHAPE, *extra)
    assert code == 2
    assert stdout == ''
    assert stderr.startswith('error: ') and stderr.count('\n') == 1, stderr
    for fragment in expected:
        assert fragment in stderr, (fragment, stderr)
    assert not out.exists() or not any(out.iterdir())


def test_only_one_lowrank_argument_is_a_usage_error(seg_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        report_cli.main([str(seg_run['config']), str(seg_run['checkpoint']), '--work-dir',
                         str(tmp_path / 'o'), '--lowrank-config', str(seg_run['lowrank_config'])])
    assert exc.value.code == 2
    assert 'give both --lowrank-config and --lowrank-checkpoint' in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()


def test_failure_during_evaluation_removes_only_what_the_report_wrote(seg_run, tmp_path):
    """A test loop that fails (here: the test images are gone) leaves the directory as it was."""
    cfg = Config.fromfile(str(seg_run['config']))
    cfg.test_dataloader.dataset.data_root = str(tmp_path / 'no_data')
    broken = tmp_path / 'broken.py'
    cfg.dump(str(broken))
    out = tmp_path / 'out'
    (out / 'eval').mkdir(parents=True)
    (out / 'mine.txt').write_text('kept')
    (out / 'eval' / 'old').mkdir()
    code, stdout, stderr = cli(broken, seg_run['checkpoint'], '--work-dir', out,
                               '--lowrank-config', seg_run['lowrank_config'],
                               '--lowrank-checkpoint', seg_run['lowrank_checkpoint'],
                               '--input-shape', *SHAPE, '--no-progress')
    assert code == 2 and stdout == '', stderr
    error = stderr.splitlines()[-1]
    assert error.startswith('error: the test loop of checkpoint ') and 'no_data' in error, stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob('*')) == [
        'eval', os.path.join('eval', 'old'), 'mine.txt']


# ----------------------------------------------------------------------- detection
def test_det_report_numbers_match_independent_counts_and_test_runs(det_model_run, tmp_path):
    """The whole-model run: every component's row shows its own reduction."""
    run = make_run(det_model_run, tmp_path / 'det', '--no-progress')
    report = run['report']
    assert report['task'] == 'detection' and report['rpn_proposals'] == 300
    assert len(report['layers']) == 31  # ResNet-18's 20, FPN's 8, rpn_conv, 2 shared FCs
    rows = rows_of(report)
    for part in ('neck', 'rpn_head', 'roi_head'):
        assert rows[part, 'compact']['flops'] < rows[part, 'original']['flops']
    # (one independent test run here, to save time: the compact metric is checked equal to it)
    check_numbers(run, tmp_path, 'pascal_voc/mAP', test_runs=('original', ))
    assert 'RoI' in (run['out'] / 'report.md').read_text()
    shutil.rmtree(run['out'])
