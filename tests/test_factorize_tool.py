"""tools/factorize.py end to end: compact files that the upstream test.py evaluates, refusals,
clear errors and no partial output."""
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lrpet_mm  # noqa: F401
from helpers import CONFIG_DIR, load_repo_script
from lrpet_mm.models import factorize_checkpoint
from lrpet_mm.models.loading import load_config
from lrpet_mm.report import evaluate_checkpoint
from lrpet_mm.utils import upstream_tool

pytestmark = pytest.mark.slow  # drives a runner, a training, a tool or a benchmark

REPO = Path(__file__).resolve().parents[1]
factorize_cli = load_repo_script('tools/factorize.py', 'factorize_cli')


def run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=str(REPO), **kw)


def factorize(*args) -> SimpleNamespace:
    """``tools/factorize.py ARGS`` in this process (the upstream ``test.py`` runs are the
    subprocesses here): its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = factorize_cli.main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def upstream_test(package: str, config: Path, checkpoint: Path, work_dir: Path) -> str:
    out = run([upstream_tool(package, 'test.py'), config, checkpoint, '--work-dir', work_dir])
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def metric(log: str, key: str) -> float:
    return float(re.findall(rf'{re.escape(key)}: ([0-9.]+)', log)[-1])


@pytest.mark.parametrize('run_fixture,package,key,layers', [
    # whole model: ResNet-18's 20 convs, FPN's 8, rpn_conv; the RoI head's 2 shared FCs
    ('det_model_run', 'mmdet', 'pascal_voc/mAP', '29 convs and 2 linear layers'),
    ('seg_lrpet_run', 'mmseg', 'mIoU', '22 convs'),  # backbone: ResNetV1c-18 (deep stem)
])
def test_upstream_test_py_evaluates_the_compact_model_like_the_projected_one(
        request, tmp_path, run_fixture, package, key, layers):
    config, ckpt = request.getfixturevalue(run_fixture)
    out = factorize(config, ckpt, '--work-dir', tmp_path / 'compact')
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(rf'factorized {layers} \(max relative rank-k error '
                     r'\d\.\d+e-0[5-9]\)', out.stdout)
    stem = config.stem
    compact_cfg = tmp_path / 'compact' / f'{stem}_lowrank.py'
    compact_ckpt = tmp_path / 'compact' / f'{stem}_lowrank.pth'
    assert sorted(p.name for p in (tmp_path / 'compact').iterdir()) == sorted(
        [compact_cfg.name, compact_ckpt.name])

    log_compact = upstream_test(package, compact_cfg, compact_ckpt, tmp_path / 'test_compact')
    assert 'missing keys' not in log_compact and 'unexpected key' not in log_compact
    # the projected model's metric from the same test loop, run in this process
    projected = evaluate_checkpoint(load_config(config), ckpt, tmp_path / 'test_projected',
                                    progress=False)[key]
    assert metric(log_compact, key) == pytest.approx(projected, abs=1e-3)

    state = torch.load(compact_ckpt, map_location='cpu', weights_only=False)['state_dict']
    assert 'backbone.layer2.0.conv2.0.weight' in state
    assert 'backbone.layer2.0.conv2.weight' not in state
    assert not any(k.startswith('backbone.layer2.0.bn2') for k in state)


def test_checkpoint_that_is_not_low_rank_is_refused_unless_forced(seg_lrpet_run, tmp_path):
    config, ckpt = seg_lrpet_run
    checkpoint = torch.load(ckpt, map_location='cpu', weights_only=False)
    torch.manual_seed(0)
    for key in ('backbone.layer3.0.conv1.weight', 'backbone.layer4.1.conv2.weight'):
        checkpoint['state_dict'][key] += 0.1 * torch.randn_like(checkpoint['state_dict'][key])
    noisy = tmp_path / 'noisy.pth'
    torch.save(checkpoint, noisy)
    out_dir = tmp_path / 'out'
    out = factorize(config, noisy, '--work-dir', out_dir)
    assert out.returncode == 2
    assert re.search(r'refused: 2 of 22 layers are not low-rank', out.stderr)
    assert re.search(r'backbone.layer3.0.conv1: rank \d+, relative error \d\.\d+e-0\d',
                     out.stderr) and 'backbone.layer4.1.conv2' in out.stderr
    assert list(out_dir.iterdir()) == []
    forced = factorize(config, noisy, '--work-dir', out_dir, '--force')
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert len(list(out_dir.iterdir())) == 2


def test_checkpoint_without_lrpet_plan_needs_a_ratio(seg_lrpet_run, tmp_path):
    config, ckpt = seg_lrpet_run
    checkpoint = torch.load(ckpt, map_location='cpu', weights_only=False)
    del checkpoint['meta']['lrpet']
    plain = tmp_path / 'plain.pth'
    torch.save(checkpoint, plain)
    out = factorize(config, plain, '--work-dir', tmp_path / 'o')
    assert out.returncode == 2 and 'has no LRPET rank plan in its meta' in out.stderr
    out = factorize(config, plain, '--work-dir', tmp_path / 'o', '--rank-ratio', '0.5')
    assert out.returncode == 0, out.stderr[-2000:]  # same ranks as the hook's plan: low-rank


def test_cfg_options_are_merged_into_the_config_and_the_compact_config(seg_lrpet_run, tmp_path):
    from mmengine.config import Config
    config, ckpt = seg_lrpet_run
    out = factorize(config, ckpt, '--work-dir', tmp_path / 'o', '--cfg-options',
               'test_dataloader.batch_size=3', 'model.decode_head.dropout_ratio=0.25')
    assert out.returncode == 0, out.stderr[-2000:]
    compact = Config.fromfile(str(tmp_path / 'o' / f'{config.stem}_lowrank.py'))
    assert compact.test_dataloader.batch_size == 3
    assert compact.model.decode_head.dropout_ratio == 0.25
    assert compact.model.backbone.type == 'LRPETFactorized'


def test_bad_inputs_give_clear_errors_and_no_partial_files(seg_lrpet_run, det_model_run, tmp_path):
    config, ckpt = seg_lrpet_run
    out_dir = tmp_path / 'out'
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(ckpt.read_bytes()[:4096])
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    cases = [
        ([tmp_path / 'missing.py', ckpt, '--work-dir', out_dir], r"config '.*missing.py' does "
                                                                 r'not exist'),
        ([config, tmp_path / 'missing.pth', '--work-dir', out_dir], r"checkpoint '.*missing.pth' "
                                                                    r'does not exist'),
        ([config, truncated, '--work-dir', out_dir], r"checkpoint '.*truncated.pth' could not be "
                                                     r'read .*truncated'),
        ([config, ckpt, '--work-dir', a_file / 'sub'], r"cannot create output directory "
                                                       r"'.*a_file/sub'"),
        ([det_model_run[0], ckpt, '--work-dir', out_dir], r"checkpoint '.*' does not match the "
                                                    r"config's model: missing keys"),
    ]
    for args, message in cases:
        out = factorize(*args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert re.search(message, out.stderr), (message, out.stderr[-2000:])
        assert 'Traceback' not in out.stderr
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_failure_while_writing_leaves_no_partial_file(seg_lrpet_run, tmp_path, monkeypatch):
    config, ckpt = seg_lrpet_run
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])  # half-written ...
        raise OSError('simulated: disk full')            # ... then the failure

    monkeypatch.setattr(torch, 'save', failing_save)
    out_dir = tmp_path / 'out'
    with pytest.raises(OSError, match='simulated: disk full'):
        factorize_checkpoint(config, ckpt, out_dir)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize('name,scope', [('faster-rcnn_r18_fpn_lrpet_toy_voc', 'mmdet'),
                                        ('pspnet_r18-d8_lrpet_toy_voc12aug', 'mmseg'),
                                        ('faster-rcnn_r18_fpn_lrpet-model_toy_voc', 'mmdet'),
                                        ('pspnet_r18-d8_lrpet-model_toy_voc12aug', 'mmseg')])
def test_toy_lrpet_configs_add_only_the_hook_line(name, scope):
    from mmengine.config import Config
    from mmengine.registry import HOOKS, DefaultScope
    lrpet = Config.fromfile(str(CONFIG_DIR / f'{name}.py'))
    base_name = re.sub(r'_lrpet(-model)?', '', name)
    base = Config.fromfile(str(CONFIG_DIR / f'{base_name}.py'))
    assert lrpet.default_scope == scope
    assert lrpet.custom_imports == dict(imports=['lrpet_mm'], allow_failed_imports=False)
    assert [h['type'] for h in lrpet.custom_hooks] == ['LRPETHook']
    differing = {k for k in set(lrpet) | set(base) if lrpet.get(k) != base.get(k)}
    assert differing == {'custom_imports', 'custom_hooks'}
    with DefaultScope.overwrite_default_scope(scope):
        assert type(HOOKS.build(lrpet.custom_hooks[0])).__name__ == 'LRPETHook'
