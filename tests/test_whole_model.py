"""Whole-model LRPET (``scope=''``) end to end on the toy detector and segmentor: the hook meets
a whole-model FLOPs budget, leaves predictors and train-only heads alone, and the compact model
(neck and heads factorized too) reproduces the projected one, loads in the upstream
``test.py`` with the same metric, and is refused by ``tools/deploy.py`` until factorized."""
import contextlib
import io
import re

import pytest
import torch
from mmengine.runner import Runner

import lrpet_mm  # noqa: F401
from helpers import load_repo_script, lrpet_train_config
from lrpet_mm.engine import META_KEY
from lrpet_mm.engine.flops import make_data_samples
from lrpet_mm.lowrank import LOW_RANK_TYPES
from lrpet_mm.models import factorize_checkpoint
from lrpet_mm.models.loading import load_config, load_model_and_checkpoint
from lrpet_mm.report import evaluate_checkpoint
from lrpet_mm.report.complexity import measure_complexity
from lrpet_mm.utils import upstream_tool

pytestmark = pytest.mark.slow  # drives a runner, a training, a tool or a benchmark

deploy_cli = load_repo_script('tools/deploy.py', 'deploy_cli_whole_model')
SHAPES = {'mmdet': (3, 128, 160), 'mmseg': (3, 128, 128)}
PREDICTORS = {'mmdet': ['rpn_head.rpn_cls', 'rpn_head.rpn_reg', 'roi_head.bbox_head.fc_cls',
                        'roi_head.bbox_head.fc_reg'],
              'mmseg': ['decode_head.conv_seg', 'auxiliary_head.conv_seg']}


@pytest.fixture(scope='module')
def det_factorized(det_model_run, tmp_path_factory):
    return factorize_checkpoint(*det_model_run, tmp_path_factory.mktemp('det_compact_model'))


@pytest.fixture(scope='module')
def seg_factorized(seg_model_run, tmp_path_factory):
    return factorize_checkpoint(*seg_model_run, tmp_path_factory.mktemp('seg_compact_model'))


@pytest.fixture(scope='module')
def det_compact_model(det_factorized):
    return det_factorized.config_path, det_factorized.checkpoint_path


@pytest.fixture(scope='module')
def seg_compact_model(seg_factorized):
    return seg_factorized.config_path, seg_factorized.checkpoint_path


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= 1e-4 * scale, f'{what}: max |Δ| {error:.3g} (scale {scale:.3g})'


@pytest.mark.parametrize('run,factorized,task', [('det_model_run', 'det_factorized', 'mmdet'),
                                                 ('seg_model_run', 'seg_factorized', 'mmseg')])
def test_whole_model_budget_is_met_and_predictors_are_left_alone(request, run, factorized,
                                                                 task):
    config, checkpoint = request.getfixturevalue(run)
    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=False)
    state = ckpt['meta'][META_KEY]
    skipped, planned = state['plan']['skipped'], [x['name'] for x in state['plan']['layers']]
    for name in PREDICTORS[task]:
        assert name in skipped and 'predictor' in skipped[name] and name not in planned
    if task == 'mmdet':  # neck and both heads carry ranks, the RoI head's FCs too
        for prefix in ('backbone.', 'neck.fpn_convs.', 'neck.lateral_convs.', 'rpn_head.rpn_conv',
                       'roi_head.bbox_head.shared_fcs.'):
            assert any(n.startswith(prefix) for n in planned), prefix
    else:  # the auxiliary head only trains: no rank; the decode head's BN convs are planned
        assert 'not run by the test-time forward' in skipped['auxiliary_head.convs.0.conv']
        assert 'decode_head.bottleneck.conv' in planned
    assert state['flops']['input_shape'] == list(SHAPES[task])

    # the whole projected model at the budget, recounted as the report counts it
    compact = request.getfixturevalue(factorized)  # tools/factorize.py's pipeline
    model = compact.original
    before = measure_complexity(model, SHAPES[task])['model']['flops']
    after = measure_complexity(compact.compact.model, SHAPES[task])['model']['flops']
    assert before == state['flops']['flops_before']
    assert abs(after - 0.5 * before) <= 0.01 * 0.5 * before, (before, after)
    folded = {layer.name: layer.folded_norm for layer in compact.compact.layers}
    if task == 'mmseg':  # BN rectification in the head, its BN folded into the pair
        assert folded['decode_head.bottleneck.conv'] == 'decode_head.bottleneck.bn'
    else:  # convs without BN: nothing folded, the bias kept in the second factor
        assert folded['rpn_head.rpn_conv'] is None
        pair = compact.compact.model.rpn_head.rpn_conv
        assert isinstance(pair, LOW_RANK_TYPES) and pair[1].bias is not None


def test_compact_whole_detector_reproduces_features_rpn_and_roi_outputs(det_model_run,
                                                                        det_compact_model):
    projected, _ = load_model_and_checkpoint(load_config(det_model_run[0]), det_model_run[1],
                                             det_model_run[0])
    compact, _ = load_model_and_checkpoint(load_config(det_compact_model[0]),
                                           det_compact_model[1], det_compact_model[0])
    projected.eval(), compact.eval()
    assert any(isinstance(m, LOW_RANK_TYPES) for m in compact.roi_head.modules())
    x = torch.randn(1, *SHAPES['mmdet'], generator=torch.Generator().manual_seed(0))
    samples = make_data_samples('mmdet', SHAPES['mmdet'])
    with torch.no_grad():
        feats_p, feats_c = projected.extract_feat(x), compact.extract_feat(x)
        for level, (p, c) in enumerate(zip(feats_p, feats_c)):
            _close(c, p, f'FPN level {level}')
        for which, (p_list, c_list) in enumerate(zip(projected.rpn_head(feats_p),
                                                     compact.rpn_head(feats_c))):
            for p, c in zip(p_list, c_list):
                _close(c, p, f'RPN output {which}')
        # the same proposals into both RoI heads: scores and box deltas
        proposals = projected.rpn_head.predict(feats_p, samples, rescale=False)
        assert len(proposals[0]) > 0
        roi_p = projected.roi_head.forward(feats_p, proposals, samples)
        roi_c = compact.roi_head.forward(feats_c, proposals, samples)
    for name, p, c in zip(('cls_score', 'bbox_pred'), roi_p, roi_c):
        _close(c, p, f'RoI head {name}')


def test_compact_whole_segmentor_reproduces_the_logits(seg_model_run, seg_compact_model):
    projected, _ = load_model_and_checkpoint(load_config(seg_model_run[0]), seg_model_run[1],
                                             seg_model_run[0])
    compact, _ = load_model_and_checkpoint(load_config(seg_compact_model[0]),
                                           seg_compact_model[1], seg_compact_model[0])
    projected.eval(), compact.eval()
    assert isinstance(compact.decode_head.bottleneck.conv, LOW_RANK_TYPES)
    x = torch.randn(1, *SHAPES['mmseg'], generator=torch.Generator().manual_seed(0))
    samples = make_data_samples('mmseg', SHAPES['mmseg'])
    with torch.no_grad():
        _close(compact._forward(x, samples), projected._forward(x, samples), 'logits')


def test_upstream_test_py_gives_the_compact_whole_segmentor_the_projected_metric(
        tmp_path, seg_model_run, seg_compact_model):
    """(The whole detector: tests/test_factorize_tool.py.)"""
    import subprocess
    import sys
    package, key = 'mmseg', 'mIoU'
    config, checkpoint = seg_model_run
    compact_cfg, compact_ckpt = seg_compact_model
    out = subprocess.run([sys.executable, str(upstream_tool(package, 'test.py')),
                          str(compact_cfg), str(compact_ckpt), '--work-dir',
                          str(tmp_path / 'test')], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert 'missing keys' not in log and 'unexpected key' not in log
    compact_metric = float(re.findall(rf'{re.escape(key)}: ([0-9.]+)', log)[-1])
    projected = evaluate_checkpoint(load_config(config), checkpoint, tmp_path / 'projected',
                                    progress=False)[key]
    assert compact_metric == pytest.approx(projected, abs=1e-3)


def test_unreachable_whole_model_budget_is_refused_before_training(voc_root, tmp_path):
    """A whole-model budget for the backbone's layers only (a component list): the toy
    detector's backbone is too small a share of its FLOPs to halve them."""
    cfg = lrpet_train_config('faster-rcnn_r18_fpn_toy_voc', voc_root, tmp_path,
                             dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=1),
                             hook=dict(flops_reduction=0.5, scope=['backbone']))
    with pytest.raises(ValueError, match=r"cannot be reached in scope \['backbone'\]: .* at "
                                         r"most \d+\.\d % of the whole model's test-time FLOPs"):
        Runner.from_cfg(cfg).train()
    assert not list(tmp_path.rglob('*.pth'))


def test_deploy_refuses_a_training_checkpoint_that_is_not_factorized(det_model_run, tmp_path):
    config, checkpoint = det_model_run
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = deploy_cli.main([str(config), str(checkpoint), '--work-dir',
                                str(tmp_path / 'deploy')])
    assert code != 0
    assert 'tools/factorize.py' in err.getvalue() and 'not yet factorized' in err.getvalue()
    assert not (tmp_path / 'deploy').exists() or not list((tmp_path / 'deploy').iterdir())


def test_latency_aware_merge_times_the_neck_and_head_layers(det_compact_model, tmp_path):
    """The merge's timing forward is the whole test-time forward: every low-rank layer of the
    compact detector is timed at its real input (the RoI head's FCs on the RPN's 300 test
    proposals of the toy config), none is left untimed."""
    from lrpet_mm.deploy.merged_checkpoint import latency_merge_checkpoint
    config, checkpoint = det_compact_model
    merged = latency_merge_checkpoint(config, checkpoint, tmp_path, runtime='torch', repeats=1,
                                      warmup=0, threads=1)
    shapes = {layer.name: layer.input_shapes for layer in merged.merge.layers}
    assert merged.merge.not_called == []
    assert shapes['rpn_head.rpn_conv'] and shapes['neck.fpn_convs.0.conv']
    assert shapes['roi_head.bbox_head.shared_fcs.0'] == [(300, 12544)]
