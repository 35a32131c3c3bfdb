"""Linear layers (Swin backbones in mmdet and mmseg): projection math, targeting on the real
SwinTransformer modules, FLOPs counting and budgets, factorization into two linear layers, end
to end training with the hook through the upstream runner, the upstream test.py on the compact
checkpoint, ONNX export, report and deploy helpers. Tiny Swins (32 channels, 4x4 windows) on
small inputs; no download."""
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from mmengine.runner import Runner
from torch import nn

import lrpet_mm  # noqa: F401
from benchlib.decompose import decompose_model, fold_factorized_norms
from helpers import lrpet_train_config
from lrpet_mm.deploy import (
    export_onnx,
    latency_aware_merge,
    load_model,
    low_rank_layers,
    max_normalized_error,
    merge_low_rank,
)
from lrpet_mm.engine import (
    LRPETHook,
    check_checkpoint_ranks,
    count_flops,
    flops_by_module,
    load_checkpoint_file,
    plan_ranks_for_flops,
)
from lrpet_mm.lowrank import (
    LowRankConv2d,
    LowRankLinear,
    LowRankProjector,
    factorize_linear,
    numerical_rank,
    plan_ranks,
    select_targets,
)
from lrpet_mm.lowrank.factorize import apply_factorized_structure, empty_factorized_linear
from lrpet_mm.models import (
    describe_layers,
    factorize_checkpoint,
    factorize_model,
)
from lrpet_mm.report.report import factorized_layers, weight_spectrum
from lrpet_mm.utils import upstream_tool

TINY = dict(embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=4,
            init_cfg=None)


class Holder(nn.Module):
    """Just enough of a model: the hook and tools address modules as ``backbone.*``."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone


def mmdet_swin(**kwargs) -> Holder:
    from mmdet.models.backbones import SwinTransformer
    return Holder(SwinTransformer(**dict(TINY, **kwargs))).eval()


def mmseg_swin(**kwargs) -> Holder:
    from mmseg.models.backbones import SwinTransformer
    return Holder(SwinTransformer(**dict(TINY, pretrain_img_size=64, **kwargs))).eval()


def expected_swin_targets(model: Holder) -> dict:
    """``{name: module}`` of every linear layer a Swin block / patch merging calls, written out
    from the classes' own structure."""
    expected = {}
    for i, stage in enumerate(model.backbone.stages):
        for j, block in enumerate(stage.blocks):
            prefix = f'backbone.stages.{i}.blocks.{j}'
            expected[f'{prefix}.attn.w_msa.qkv'] = block.attn.w_msa.qkv
            expected[f'{prefix}.attn.w_msa.proj'] = block.attn.w_msa.proj
            expected[f'{prefix}.ffn.layers.0.0'] = block.ffn.layers[0][0]
            expected[f'{prefix}.ffn.layers.1'] = block.ffn.layers[1]
        if stage.downsample is not None:
            expected[f'backbone.stages.{i}.downsample.reduction'] = stage.downsample.reduction
    return expected


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------ math
def test_linear_weight_projection_is_the_best_rank_k_matrix_with_energy_transfer():
    torch.manual_seed(0)
    model = Holder(nn.Sequential(nn.LayerNorm(48), nn.Linear(48, 80), nn.GELU()))
    linear = model.backbone[1]
    w, b = linear.weight.detach().clone(), linear.bias.detach().clone()
    selection = select_targets(model)
    (target, ) = selection.targets
    assert (target.name, target.kind, target.rectify, target.norm) == (
        'backbone.1', 'linear', False, None)
    assert target.matrix_shape == (80, 48)
    plan = plan_ranks(selection.shapes(), 0.75)  # k = 12
    assert plan.rank_of('backbone.1') == 12
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :12] * s[:12]) @ vh[:12]  # Eckart–Young optimum
    alpha = float(w.double().norm() / best.norm())

    LowRankProjector(selection.targets, plan, energy_transfer=False).project()
    assert numerical_rank(linear.weight.detach()) == 12
    assert rel(linear.weight.detach().double(), best) < 1e-5
    assert torch.equal(linear.bias.detach(), b)  # biases are not projected

    with torch.no_grad():
        linear.weight.copy_(w)
    LowRankProjector(selection.targets, plan).project()  # energy transfer on
    assert float(linear.weight.detach().norm()) == pytest.approx(float(w.norm()), rel=1e-5)
    assert rel(linear.weight.detach().double(), alpha * best) < 1e-5


def test_factorized_linear_pair_is_exact_has_the_documented_keys_and_merges_back():
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 5) @ torch.randn(5, 40))  # rank 5
    pair = factorize_linear(linear, 5)
    assert isinstance(pair, LowRankLinear) and pair.rank == 5
    assert [(k, tuple(v.shape)) for k, v in pair.state_dict().items()] == [
        ('0.weight', (5, 40)), ('1.weight', (24, 5)), ('1.bias', (24, ))]
    assert pair[0].bias is None
    x = torch.randn(2, 7, 40)  # (batch, tokens, channels), as in a transformer
    with torch.no_grad():
        assert rel(pair(x), linear(x)) < 1e-5
        merged = merge_low_rank(pair)
        assert type(merged) is nn.Linear and rel(merged(x), linear(x)) < 1e-5
    # the builder's empty pair has the same structure; no bias where the original has none
    assert {k: v.shape for k, v in empty_factorized_linear(linear, 5).state_dict().items()} \
        == {k: v.shape for k, v in pair.state_dict().items()}
    no_bias = nn.Linear(40, 24, bias=False)
    assert list(factorize_linear(no_bias, 3).state_dict()) == ['0.weight', '1.weight']
    with pytest.raises(ValueError, match='rank 25 out of range'):
        factorize_linear(linear, 25)
    with pytest.raises(TypeError, match='expected a LowRankConv2d or LowRankLinear'):
        merge_low_rank(linear)


# ------------------------------------------------------------------------------- targeting
@pytest.mark.parametrize('make_model', [mmdet_swin, mmseg_swin])
def test_swin_linear_layers_are_the_targets_and_the_patch_embedding_is_logged(make_model):
    model = make_model()
    expected = expected_swin_targets(model)
    assert len(expected) == 4 * 8 + 3
    selection = select_targets(model)
    assert [t.name for t in selection.targets] == list(expected)
    # the FFN layers are mmcv's wrappers.Linear (accepted by qualified name), the rest nn.Linear
    ffn = model.backbone.stages[0].blocks[0].ffn.layers[0][0]
    assert f'{type(ffn).__module__}.{type(ffn).__name__}' == 'mmcv.cnn.bricks.wrappers.Linear'
    for target in selection.targets:
        assert target.layer is expected[target.name]
        assert (target.kind, target.rectify, target.norm, target.norm_name) == (
            'linear', False, None, None)
    # the patch-embedding conv: a LayerNorm follows it, not a BatchNorm
    assert selection.skipped == {'backbone.patch_embed.projection': (
        "no BatchNorm consumes its output (unpaired='skip'; use unpaired='project' to project "
        'it without BNR)')}
    # unpaired='error' refuses the conv only; 'project' adds it (without BNR)
    with pytest.raises(ValueError, match=r"conv 'backbone.patch_embed.projection': no "
                                         r'BatchNorm consumes its output'):
        select_targets(model, unpaired='error')
    projected = select_targets(model, unpaired='project')
    assert [t.name for t in projected.targets] == ['backbone.patch_embed.projection',
                                                   *expected]
    assert projected.targets[0].kind == 'conv' and not projected.targets[0].rectify
    # at half rank a square C x C layer (attention proj) does not pay and is left alone
    plan = plan_ranks(selection.shapes(), 0.5)
    assert sorted(plan.skipped) == sorted(n for n in expected if n.endswith('w_msa.proj'))
    assert plan.skipped['backbone.stages.0.blocks.0.attn.w_msa.proj'] == (
        'factorizing would not reduce parameters: rank 16 of 32x32 gives 1024 >= 1024')


def test_include_exclude_layer_ratios_and_frozen_apply_to_linear_layers():
    model = mmdet_swin(frozen_stages=1)
    model.train()  # mmdet's Swin freezes its stages in train()
    selection = select_targets(model)
    frozen = {n for n, r in selection.skipped.items() if r.startswith('frozen')}
    assert frozen == {'backbone.patch_embed.projection'} | {
        n for n in expected_swin_targets(model) if n.startswith('backbone.stages.0.')}
    assert all(not n.startswith('backbone.stages.0.') for n in selection.shapes())
    assert len(select_targets(model, frozen='project').targets) == 35

    model = mmseg_swin()
    ffn = select_targets(model, include=r'ffn\.')
    assert len(ffn.targets) == 16 and all('.ffn.layers.' in t.name for t in ffn.targets)
    no_attn = select_targets(model, exclude=[r'\.attn\.'])
    assert len(no_attn.targets) == 19
    assert no_attn.skipped['backbone.stages.3.blocks.1.attn.w_msa.qkv'] == 'excluded by pattern'
    plan = plan_ranks(select_targets(model).shapes(), 0.25, layer_ratios={r'\.qkv$': 0.75})
    assert plan.rank_of('backbone.stages.2.blocks.0.attn.w_msa.qkv') == 32  # 128 x 384, p 0.75
    assert plan.rank_of('backbone.stages.2.blocks.0.ffn.layers.0.0') == 96  # 512 x 128, p 0.25
    with pytest.raises(ValueError, match=r"include pattern 'lm_head' matches no conv or "
                                         r'linear layer'):
        select_targets(model, include='lm_head')


def test_linears_that_cannot_be_factorized_and_grouped_convs_are_skipped_with_the_numbers():
    from mmdet.models.backbones import ResNeXt
    from mmdet.models.layers import NormedLinear

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2)
            self.normed = NormedLinear(16, 8)
            self.fc = nn.Linear(16, 16)
            self.depthwise = nn.Conv2d(8, 8, 3, groups=8)

    selection = select_targets(Holder(Block()), bn_rectify=False)
    assert [t.name for t in selection.targets] == ['backbone.fc']
    assert selection.skipped['backbone.attn.out_proj'].startswith(
        'out_proj of nn.MultiheadAttention: the attention reads its weight directly')
    assert selection.skipped['backbone.normed'] == (
        'linear subclass NormedLinear may transform its weight in forward (e.g. weight '
        'normalization); only plain nn.Linear is projected')
    assert selection.skipped['backbone.depthwise'] == (
        'grouped conv (groups=8): each group is a separate (out/groups) x (in/groups·kh·kw) = '
        '1 x 9 matrix of rank <= 1; no rank saves parameters here; per-group factorization is '
        'not implemented')
    # ResNeXt-50 32x4d: 4 x 36 per group in the first stage (rank <= 4; 3·40 = 120 < 144 but
    # 4·40 = 160 >= 144), 8 x 72 in the second
    resnext = Holder(ResNeXt(depth=50, groups=32, base_width=4, init_cfg=None))
    skipped = select_targets(resnext).skipped
    assert skipped['backbone.layer1.0.conv2'] == (
        'grouped conv (groups=32): each group is a separate (out/groups) x (in/groups·kh·kw) = '
        '4 x 36 matrix of rank <= 4; factorizing a group at rank k saves parameters only when '
        'k·(m + n) < m·n, i.e. k <= 3 here; per-group factorization is not implemented')
    assert '8 x 72 matrix of rank <= 8' in skipped['backbone.layer2.0.conv2']
    assert 'k <= 7 here' in skipped['backbone.layer2.0.conv2']


# ----------------------------------------------------------------------------------- FLOPs
def test_linear_flops_are_tokens_times_in_times_out_with_the_window_padding():
    model = mmdet_swin()
    by_module = flops_by_module(model.backbone, (3, 72, 100))
    # 72x100 / 4 = 18x25 = 450 tokens; window attention pads them to 20x28 = 560 (4x4 windows)
    assert by_module['stages.0.blocks.0.attn.w_msa.qkv'] == 560 * 32 * 96
    assert by_module['stages.0.blocks.1.attn.w_msa.proj'] == 560 * 32 * 32
    assert by_module['stages.0.blocks.0.ffn.layers.0.0'] == 450 * 32 * 128  # not padded
    assert by_module['stages.0.blocks.0.ffn.layers.1'] == 450 * 128 * 32
    # patch merging: 18x25 padded to 18x26, 9x13 = 117 tokens of 4·32 -> 64 channels
    assert by_module['stages.0.downsample.reduction'] == 117 * 128 * 64
    # factorized at rank k a linear layer costs tokens·k·(m + n)
    pair = factorize_linear(model.backbone.stages[0].blocks[0].ffn.layers[1], 8)
    assert count_flops(nn.Sequential(Tokens(), pair), (128, 18, 25)) == 450 * 8 * (128 + 32)


class Tokens(nn.Module):
    """(N, C, H, W) -> (N, H·W, C)."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


@pytest.mark.slow
@pytest.mark.parametrize('make_model,reduction,multiple', [
    (mmdet_swin, 0.3, 1),
    (mmseg_swin, 0.3, 8),
])
def test_flops_budget_lands_within_one_percent_on_the_compact_swin(make_model, reduction,
                                                                   multiple):
    torch.manual_seed(0)
    model = make_model()
    shape = (3, 96, 128)
    selection = select_targets(model)
    result = plan_ranks_for_flops(model, 'backbone', selection, reduction, shape,
                                  rank_multiple=multiple)
    target = (1 - reduction) * result.flops_before
    assert abs(result.flops_after - target) <= 0.01 * target
    assert all(k % multiple == 0 for k in (layer.rank for layer in result.plan.layers.values()))
    LowRankProjector(selection.targets, result.plan).project()
    compact = factorize_model(model, result.plan)
    assert count_flops(model.backbone, shape) == result.flops_before
    assert count_flops(compact.model.backbone, shape) == result.flops_after


# --------------------------------------------------------------------------- factorization
def test_compact_swin_detector_reproduces_the_projected_one_and_the_builder_matches():
    from mmdet.structures.bbox import bbox2roi
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    from helpers import CONFIG_DIR
    init_default_scope('mmdet')
    torch.manual_seed(0)
    cfg = Config.fromfile(str(CONFIG_DIR / 'faster-rcnn_swin_fpn_toy_voc.py'))
    model = MODELS.build(cfg.model).eval()
    selection = select_targets(model)
    plan = plan_ranks(selection.shapes(), 0.6)
    LowRankProjector(selection.targets, plan).project()
    compact = factorize_model(model, plan)
    assert describe_layers(compact.layers) == '35 linear layers'
    assert all(layer.kind == 'linear' and layer.folded_norm is None for layer in compact.layers)
    assert max(layer.relative_error for layer in compact.layers) < 1e-5
    assert isinstance(compact.model.backbone.stages[1].blocks[0].attn.w_msa.qkv, LowRankLinear)
    x = torch.randn(1, 3, 96, 128)
    rois = bbox2roi([torch.tensor([[4., 4., 60., 50.], [30., 20., 120., 90.]])])
    with torch.no_grad():
        feats, feats_c = model.extract_feat(x), compact.model.extract_feat(x)
        for got, expected in zip(feats_c, feats):
            assert rel(got, expected) < 1e-4
        out, out_c = (m.roi_head._bbox_forward(f, rois)
                      for m, f in ((model, feats), (compact.model, feats_c)))
        assert rel(out_c['cls_score'], out['cls_score']) < 1e-4
        assert rel(out_c['bbox_pred'], out['bbox_pred']) < 1e-4
    spec = compact.components['backbone']
    assert spec['folded_norms'] == {}
    rebuilt = apply_factorized_structure(MODELS.build(cfg.model.backbone), spec['ranks'])
    keys = {f'backbone.{k}' for k in rebuilt.state_dict()}
    assert keys == {k for k in compact.model.state_dict() if k.startswith('backbone.')}
    assert {'backbone.stages.0.blocks.0.attn.w_msa.qkv.0.weight',
            'backbone.stages.0.blocks.0.attn.w_msa.qkv.1.weight',
            'backbone.stages.0.blocks.0.attn.w_msa.qkv.1.bias',
            'backbone.stages.0.downsample.reduction.0.weight'} <= keys
    assert 'backbone.stages.0.downsample.reduction.1.bias' not in keys  # no bias upstream
    with pytest.raises(ValueError, match='only conv \\+ BatchNorm pairs are folded'):
        apply_factorized_structure(mmdet_swin().backbone, {'stages.0.blocks.0.ffn.layers.1': 8},
                                   {'stages.0.blocks.0.ffn.layers.1': 'stages.0.norm'})


def test_decompose_and_deploy_helpers_handle_linear_pairs():
    torch.manual_seed(0)
    model = mmseg_swin()
    plan = plan_ranks(select_targets(model).shapes(), 0.6)
    decomposed = decompose_model(model, plan)
    qkv = 'backbone.stages.2.blocks.1.attn.w_msa.qkv'
    assert isinstance(decomposed.model.get_submodule(qkv), LowRankLinear)
    assert decomposed.components['backbone']['ranks'][qkv[len('backbone.'):]] == plan.rank_of(qkv)
    assert 0 < min(layer.relative_error for layer in decomposed.layers)  # not low-rank yet
    with pytest.raises(ValueError, match='is a factorized linear layer'):
        fold_factorized_norms(decomposed.model, {qkv: 'backbone.stages.2.blocks.1.norm1'})
    folded = fold_factorized_norms(decomposed.model, {})
    assert {layer.kind for layer in folded.layers} == {'linear'}
    # latency-aware merge: linear layers take (batch, tokens, channels); channels_last applies
    # to 4-D tensors only
    backbone = decomposed.model.backbone
    x = torch.randn(1, 3, 32, 32)
    result = latency_aware_merge(backbone, x, runtime='torch', repeats=1, warmup=0, threads=1,
                                 margin=0.0, confirm=False, memory_format='channels_last')
    assert len(result.layers) == len(plan) == len(low_rank_layers(backbone))
    qkv_record = next(r for r in result.layers if r.name == qkv[len('backbone.'):])
    assert qkv_record.input_shapes == [(1, 16, 128)]  # 2x2 tokens padded to one 4x4 window
    for record in result.layers:
        module = result.model.get_submodule(record.name)
        assert type(module) is (nn.Linear if record.merged else LowRankLinear)
    with torch.no_grad():
        for a, b in zip(result.model(x), backbone(x)):
            assert max_normalized_error(a.numpy(), b.numpy()) < 1e-5


@pytest.mark.parametrize('name,scope', [('faster-rcnn_swin_fpn_lrpet_toy_voc', 'mmdet'),
                                        ('upernet_swin_lrpet_toy_voc12aug', 'mmseg')])
def test_toy_swin_lrpet_configs_add_only_the_hook_line(name, scope):
    from mmengine.config import Config

    from helpers import CONFIG_DIR
    lrpet = Config.fromfile(str(CONFIG_DIR / f'{name}.py'))
    base = Config.fromfile(str(CONFIG_DIR / f'{name.replace("_lrpet", "")}.py'))
    assert lrpet.default_scope == scope and lrpet.model.backbone.type == 'SwinTransformer'
    assert lrpet.model.backbone.init_cfg is None
    assert lrpet.custom_hooks == [dict(type='LRPETHook', flops_reduction=0.3,
                                       interval=lrpet.custom_hooks[0]['interval'])]
    differing = {k for k in set(lrpet) | set(base) if lrpet.get(k) != base.get(k)}
    assert differing == {'custom_imports', 'custom_hooks'}


# ------------------------------------------------------------------ end to end, upstream
def _train(name, voc_root, work, train_cfg, hook):
    cfg = lrpet_train_config(name, voc_root, work, train_cfg, hook=hook)
    runner = Runner.from_cfg(cfg)
    runner.train()
    config = work / f'{name}.py'
    cfg.dump(str(config))
    by_epoch = train_cfg['type'] == 'EpochBasedTrainLoop'
    ckpt = work / ('epoch_1.pth' if by_epoch else f'iter_{train_cfg["max_iters"]}.pth')
    out = factorize_checkpoint(config, ckpt, work / 'compact')
    compact, _ = load_model(out.config_path, out.checkpoint_path)  # every key matched
    hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
    model = runner.model.eval()
    return SimpleNamespace(runner=runner, hook=hook, config=config, ckpt=ckpt, out=out,
                           model=model, compact=compact, work=work)


@pytest.fixture(scope='module')
def swin_det(voc_root, tmp_path_factory):
    return _train('faster-rcnn_swin_fpn_toy_voc', voc_root, tmp_path_factory.mktemp('swin_det'),
                  dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=1),
                  dict(flops_reduction=0.3, interval=1))


@pytest.fixture(scope='module')
def swin_seg(voc_root, tmp_path_factory):
    return _train('upernet_swin_toy_voc12aug', voc_root, tmp_path_factory.mktemp('swin_seg'),
                  dict(type='IterBasedTrainLoop', max_iters=2, val_interval=2),
                  dict(flops_reduction=0.3, interval=1))


def upstream_test(package: str, run: SimpleNamespace) -> str:
    out = subprocess.run([sys.executable, str(upstream_tool(package, 'test.py')),
                          str(run.out.config_path), str(run.out.checkpoint_path),
                          '--work-dir', str(run.work / 'test_compact')],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    for mismatch in ('missing keys', 'unexpected key', 'do not match exactly'):
        assert mismatch not in log
    return log


def val_metric(run: SimpleNamespace, key: str) -> float:
    """The metric of the validation that ended training: the projected model (the last
    projection precedes it), on the same data as the test set of the toy configs."""
    return float(run.runner.message_hub.get_scalar(f'val/{key}').current())


def check_training_run(run: SimpleNamespace, input_shape) -> None:
    plan, info = run.hook.plan, run.hook.flops_info
    assert info['input_shape'] == list(input_shape)
    target = 0.7 * info['flops_before']
    assert abs(info['flops_after'] - target) <= 0.01 * target
    assert plan.skipped['backbone.patch_embed.projection'].startswith('no BatchNorm consumes')
    assert all(isinstance(run.model.get_submodule(n), nn.Linear) for n in plan.layers)
    ckpt = load_checkpoint_file(run.ckpt)
    assert ckpt['meta']['lrpet']['flops']['flops_after'] == info['flops_after']
    for check in check_checkpoint_ranks(ckpt, plan):  # the saved weights are rank <= k
        assert check.numerical_rank <= check.planned_rank < check.full_rank
    layers = run.out.compact.layers
    assert [layer.name for layer in layers] == list(plan.layers)
    assert describe_layers(layers) == f'{len(plan)} linear layers'
    assert max(layer.relative_error for layer in layers) < 1e-4
    assert run.out.compact.model.backbone.stages[3].blocks[1].ffn.layers[1].rank == \
        plan.rank_of('backbone.stages.3.blocks.1.ffn.layers.1')


@pytest.mark.slow
def test_swin_detector_trains_with_the_hook_and_upstream_test_py_reproduces_it(swin_det):
    from mmdet.structures.bbox import bbox2roi
    check_training_run(swin_det, (3, 128, 160))
    log = upstream_test('mmdet', swin_det)
    compact_map = float(re.findall(r'pascal_voc/mAP: ([0-9.]+)', log)[-1])
    assert compact_map == pytest.approx(val_metric(swin_det, 'pascal_voc/mAP'), abs=1e-3)
    # the compact model that test.py builds (LRPETFactorized + compact checkpoint) reproduces
    # the projected model's features and RoI-head outputs
    model, compact = swin_det.model, swin_det.compact
    x = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    rois = bbox2roi([torch.tensor([[4., 4., 60., 50.], [30., 20., 150., 120.]])])
    with torch.no_grad():
        feats, feats_c = model.extract_feat(x), compact.extract_feat(x)
        for got, expected in zip(feats_c, feats):
            assert rel(got, expected) < 1e-4
        for got, expected in zip(compact.rpn_head(feats_c), model.rpn_head(feats)):
            for g, e in zip(got, expected):
                assert rel(g, e) < 1e-4
        out, out_c = (m.roi_head._bbox_forward(f, rois)
                      for m, f in ((model, feats), (compact, feats_c)))
        assert rel(out_c['cls_score'], out['cls_score']) < 1e-4
        assert rel(out_c['bbox_pred'], out['bbox_pred']) < 1e-4


@pytest.mark.slow
def test_swin_segmentor_trains_with_the_hook_and_upstream_test_py_reproduces_it(swin_seg):
    check_training_run(swin_seg, (3, 128, 128))
    log = upstream_test('mmseg', swin_seg)
    compact_miou = float(re.findall(r'mIoU: ([0-9.]+)', log)[-1])
    assert compact_miou == pytest.approx(val_metric(swin_seg, 'mIoU'), abs=1e-2)
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    metas = [dict(img_shape=(96, 128), ori_shape=(96, 128), pad_shape=(96, 128))]
    with torch.no_grad():
        logits = swin_seg.model.encode_decode(x, metas)
        logits_c = swin_seg.compact.encode_decode(x, metas)
    assert logits.shape == (1, 21, 96, 128)
    assert rel(logits_c, logits) < 1e-4


@pytest.mark.slow
def test_compact_swin_backbone_exports_to_onnx_and_onnxruntime_reproduces_it(swin_seg, tmp_path):
    shape = (3, 64, 96)
    result = export_onnx(swin_seg.compact, shape, tmp_path / 'compact.onnx',
                         threads=1)
    assert result.check.passed and result.check.max_error <= 1e-4
    assert result.low_rank_layers == len(swin_seg.hook.plan) and len(result.output_names) == 4
    # the graph holds the compact weights: smaller than the projected backbone's float32 ones
    params = sum(p.numel() for p in swin_seg.model.backbone.parameters())
    compact_params = sum(p.numel() for p in swin_seg.compact.backbone.parameters())
    assert 4 * compact_params < result.size_bytes < 4 * params
    # onnxruntime's compact graph against the projected, unfactorized PyTorch backbone
    from lrpet_mm.deploy import ort_session
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    session = ort_session(result.path, threads=1)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = swin_seg.model.backbone(x)
    for g, e in zip(got, expected):
        assert max_normalized_error(g, e.numpy()) <= 1e-4


def test_report_lists_the_factorized_linear_layers(swin_det):
    ckpt = load_checkpoint_file(swin_det.ckpt)
    layers = factorized_layers(swin_det.model, swin_det.compact, ckpt, 'test')
    plan = swin_det.hook.plan
    assert [layer['name'] for layer in layers] == list(plan.layers)
    for layer in layers:
        assert layer['kind'] == 'linear' and layer['folded_norm'] is None
        assert layer['rank'] == layer['planned_rank'] == plan.rank_of(layer['name'])
        assert layer['full_rank'] == min(layer['out_features'], layer['in_features'])
    spectrum = weight_spectrum(swin_det.model, layers[0]['name'], None)
    assert len(spectrum) == layers[0]['full_rank']
    assert sum(v > 1e-5 * spectrum[0] for v in spectrum) <= layers[0]['rank']
    # a compact model whose pair does not match the original layer is refused
    wrong = swin_det.compact
    name = layers[0]['name']
    saved = wrong.get_submodule(name)
    parent, _, child = name.rpartition('.')
    setattr(wrong.get_submodule(parent), child, LowRankConv2d(nn.Conv2d(3, 2, 1),
                                                              nn.Conv2d(2, 3, 1)))
    try:
        with pytest.raises(ValueError, match='has no conv of the same geometry'):
            factorized_layers(swin_det.model, wrong, ckpt, 'test')
    finally:
        setattr(wrong.get_submodule(parent), child, saved)
