"""Whole-model scopes on untrained toy models (fast): which layers are selected, the settings'
canonical form, the whole-model FLOPs budget and clear refusals."""
import pytest
from mmengine.config import Config
from torch import nn

import lrpet_mm  # noqa: F401
from helpers import CONFIG_DIR
from lrpet_mm.engine import LRPETSettings
from lrpet_mm.engine.flops import whole_model_flops
from lrpet_mm.engine.planning import factorized_copy
from lrpet_mm.lowrank import is_predictor
from lrpet_mm.models.loading import build_model_from_config

DET_SHAPE, SEG_SHAPE = (3, 128, 160), (3, 128, 128)


@pytest.fixture(scope='module')
def detector() -> nn.Module:
    return build_model_from_config(Config.fromfile(str(CONFIG_DIR /
                                                       'faster-rcnn_r18_fpn_toy_voc.py')))


@pytest.fixture(scope='module')
def segmentor() -> nn.Module:
    return build_model_from_config(Config.fromfile(str(CONFIG_DIR /
                                                       'pspnet_r18-d8_toy_voc12aug.py')))


@pytest.mark.parametrize('name,expected', [
    ('rpn_head.rpn_cls', True), ('rpn_head.rpn_reg', True), ('roi_head.bbox_head.fc_cls', True),
    ('roi_head.bbox_head.fc_reg', True), ('decode_head.conv_seg', True),
    ('roi_head.mask_head.conv_logits', True), ('bbox_head.multi_level_conv_obj.2', True),
    ('bbox_head.retina_cls', True), ('rpn_head.rpn_conv', False),
    ('roi_head.bbox_head.shared_fcs.0', False), ('neck.fpn_convs.0.conv', False),
    ('decode_head.bottleneck.conv', False), ('bbox_head.cls_convs.0.conv', False),
    ('backbone.layer1.0.conv1', False)])
def test_predictors_are_recognized_by_their_openmmlab_names(name, expected):
    assert is_predictor(name) is expected


def test_whole_model_scope_projects_neck_and_heads_but_not_predictors(detector):
    settings = LRPETSettings(rank_ratio=0.5, scope='')
    assert settings.whole_model and settings.unpaired == 'project'
    selection = settings.select_targets(detector)
    names = {t.name for t in selection.targets}
    assert {'neck.fpn_convs.0.conv', 'rpn_head.rpn_conv',
            'roi_head.bbox_head.shared_fcs.0'} <= names
    assert not any(is_predictor(n) for n in names)
    assert 'predictor' in selection.skipped['roi_head.bbox_head.fc_cls']
    rectified = {t.name for t in selection.targets if t.rectify}
    assert 'backbone.layer1.0.conv1' in rectified and 'neck.fpn_convs.0.conv' not in rectified
    # predictors='project' takes them in
    everything = settings.replace(predictors='project').select_targets(detector)
    assert 'roi_head.bbox_head.fc_cls' in {t.name for t in everything.targets}


def test_component_list_selects_only_those_components(detector):
    settings = LRPETSettings(rank_ratio=0.5, scope=['neck', 'rpn_head'])
    assert settings.scope == ('neck', 'rpn_head') and settings.whole_model
    assert settings.to_dict()['scope'] == ['neck', 'rpn_head']
    assert LRPETSettings(**settings.to_dict()) == settings
    names = {t.name for t in settings.select_targets(detector).targets}
    assert names and all(n.startswith(('neck.', 'rpn_head.')) for n in names)


def test_component_scope_keeps_the_backbone_defaults():
    settings = LRPETSettings(rank_ratio=0.5)
    assert settings.scope == 'backbone' and not settings.whole_model
    assert settings.unpaired == 'skip' and settings.predictors == 'skip'
    assert LRPETSettings(rank_ratio=0.5, scope='', unpaired='skip').unpaired == 'skip'


@pytest.mark.parametrize('scope,message', [
    (['backbone', 'nek'], r"scope 'nek' does not exist in FasterRCNN; top-level modules: "),
    (['backbone', 'backbone.layer1'], r"'backbone.layer1', which is inside 'backbone'"),
])
def test_bad_component_lists_are_refused_with_the_name(detector, scope, message):
    with pytest.raises(ValueError, match=message):
        LRPETSettings(rank_ratio=0.5, scope=scope).select_targets(detector)


@pytest.mark.parametrize('kwargs,message', [
    (dict(scope=['neck', 'neck']), 'scope lists a component twice'),
    (dict(scope=[]), 'non-empty list'),
    (dict(scope=['neck', 3]), 'non-empty list'),
    (dict(predictors='maybe'), "predictors must be one of \\('skip', 'project'\\)"),
])
def test_bad_whole_model_settings_are_refused(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LRPETSettings(rank_ratio=0.5, **kwargs)


@pytest.mark.parametrize('model,shape,aux', [('detector', DET_SHAPE, False),
                                             ('segmentor', SEG_SHAPE, True)])
def test_whole_model_flops_budget_is_met_within_one_percent(request, model, shape, aux):
    model = request.getfixturevalue(model)
    settings = LRPETSettings(flops_reduction=0.4, scope='', flops_input_shape=shape)
    plan, result = settings.plan(model, settings.select_targets(model))
    before = whole_model_flops(model, shape)
    assert result.flops_before == before
    target = 0.6 * before
    assert abs(result.flops_after - target) <= 0.01 * target
    folded = {t.name: t.norm_name for t in settings.select_targets(model).targets
              if t.rectify}
    recounted = whole_model_flops(factorized_copy(model, plan, folded), shape)
    assert recounted == result.flops_after
    if aux:  # the auxiliary FCN head never runs at test time: no rank, reason logged
        assert 'not run by the test-time forward' in plan.skipped['auxiliary_head.convs.0.conv']
        assert not any(n.startswith('auxiliary_head.') for n in plan.layers)


def test_whole_model_scope_on_a_model_it_cannot_trace_is_a_clear_error(detector):
    class Broken(type(detector)):
        def _forward(self, inputs, data_samples=None):
            raise RuntimeError('cannot run on one image')

    broken = Broken.__new__(Broken)
    broken.__dict__ = detector.__dict__
    settings = LRPETSettings(flops_reduction=0.5, scope='', flops_input_shape=DET_SHAPE)
    with pytest.raises(ValueError, match=r"cannot count the FLOPs of Broken's test-time "
                                         r'forward .* cannot run on one image'):
        settings.plan(broken, settings.select_targets(broken))
