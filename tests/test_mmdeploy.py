"""tools/deploy.py: the whole compact detector / segmentor deployed with mmdeploy (end-to-end
ONNX, ONNX Runtime with mmdeploy's custom ops) reproduces the PyTorch compact model."""
import contextlib
import copy
import io
from pathlib import Path

import onnx
import pytest
import torch
from mmdet.structures.bbox import bbox_overlaps
from mmengine.config import Config

from helpers import load_repo_script
from lrpet_mm.deploy import low_rank_layers, merge_low_rank
from lrpet_mm.deploy.merged_checkpoint import (
    latency_merge_checkpoint,
    merged_config,
    write_merged_checkpoint,
)
from lrpet_mm.deploy.mmdeploy_export import backend_model, deploy_config
from lrpet_mm.lowrank.factorize import apply_factorized_structure, set_submodule
from lrpet_mm.models import factorize_checkpoint
from lrpet_mm.models.loading import load_config, load_model_and_checkpoint
from lrpet_mm.report import evaluate_checkpoint

pytestmark = pytest.mark.slow  # drives a runner, a training, a tool or a benchmark

deploy_cli = load_repo_script('tools/deploy.py', 'deploy_cli')

#: Detection tolerance. mmdeploy's RPN applies one NMS to the proposals of all FPN levels
#: where mmdet's applies it per level, so a few proposals — and the detections built on them —
#: differ; every other step is the same computation (equal detections agree to ~1e-6). A
#: detection counts as reproduced with the same label, IoU >= 0.9 and |Δscore| <= 0.02;
#: measured: 96 % of this test's detections, 84 % of `make demo`'s with score >= 0.3.
MIN_MATCHED_DETECTIONS = 0.8
MAX_MAP_DIFFERENCE = 0.02


def deploy(config: Path, checkpoint: Path, work_dir: Path, *extra) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = deploy_cli.main([str(config), str(checkpoint), '--work-dir', str(work_dir),
                                *map(str, extra)])
    return code, out.getvalue(), err.getvalue()


def images_of_test_set(config: Path) -> list:
    """The images of the config's test set (VOC layout: ids in its ann_file)."""
    dataset = Config.fromfile(str(config)).test_dataloader.dataset
    root = Path(dataset.data_root)
    ids = (root / dataset.ann_file).read_text().split()
    prefix = dataset.data_prefix
    folder = (root / prefix.sub_data_root / 'JPEGImages' if 'sub_data_root' in prefix
              else root / prefix.img_path)
    return [folder / f'{i}.jpg' for i in ids]


@pytest.fixture(scope='module')
def det_compact(det_model_run, tmp_path_factory):
    """The whole-model compact detector (backbone, FPN, RPN and RoI head factorized)."""
    out = factorize_checkpoint(*det_model_run, tmp_path_factory.mktemp('det_compact'))
    return out.config_path, out.checkpoint_path


@pytest.fixture(scope='module')
def seg_compact(seg_lrpet_run, tmp_path_factory):
    out = factorize_checkpoint(*seg_lrpet_run, tmp_path_factory.mktemp('seg_compact'))
    return out.config_path, out.checkpoint_path


def test_whole_compact_detector_is_deployed_and_reproduced_by_onnx_runtime(det_compact,
                                                                          tmp_path):
    config, checkpoint = det_compact
    code, stdout, stderr = deploy(config, checkpoint, tmp_path / 'deploy', '--test',
                                  '--no-latency-aware')
    assert code == 0, stderr[-3000:]
    assert 'latency-aware merge' not in stdout
    assert not list((tmp_path / 'deploy').glob('*_merged.*'))
    onnx_file, deploy_file = tmp_path / 'deploy' / 'end2end.onnx', tmp_path / 'deploy' / \
        'deploy_cfg.py'
    assert onnx_file.is_file() and deploy_file.is_file()
    assert Config.fromfile(str(deploy_file)).codebase_config.task == 'ObjectDetection'
    op_types = {node.op_type for node in onnx.load(str(onnx_file)).graph.node}
    assert 'RoiAlign' in op_types and 'ScatterND' not in op_types  # lrpet_mm's RoI extractor

    processor, ort_model = backend_model(config, onnx_file, deploy_file)
    torch_model, _ = load_model_and_checkpoint(load_config(config), checkpoint, config)
    total = matched = 0
    for image in images_of_test_set(config):
        data, _ = processor.create_input(str(image))
        with torch.no_grad():
            ort = ort_model.test_step(data)[0].pred_instances
            ref = torch_model.test_step(data)[0].pred_instances
        ref = ref[ref.scores >= 0.05]
        if len(ref) == 0:
            continue
        iou = bbox_overlaps(ref.bboxes, ort.bboxes) if len(ort) else torch.zeros(len(ref), 0)
        for i in range(len(ref)):
            same = ((iou[i] >= 0.9) & (ort.labels == ref.labels[i])
                    & ((ort.scores - ref.scores[i]).abs() <= 0.02))
            matched += bool(same.any())
            total += 1
    assert total >= 10
    assert matched / total >= MIN_MATCHED_DETECTIONS, (matched, total)

    # the metric of the deployed model (printed by --test) against the PyTorch compact model
    deployed_map = float(stdout.split('pascal_voc/mAP: ')[1].split()[0])
    reference = evaluate_checkpoint(load_config(config), checkpoint, tmp_path / 'ref',
                                    progress=False)['pascal_voc/mAP']
    assert abs(deployed_map - reference) <= MAX_MAP_DIFFERENCE, (deployed_map, reference)


def test_whole_compact_segmentor_is_deployed_and_reproduced_by_onnx_runtime(seg_compact,
                                                                           tmp_path):
    # latency-aware merge on (the default): the exported model is the merged pair written
    # beside the ONNX file; the reference stays the compact model as factorize wrote it
    config, checkpoint = seg_compact
    code, stdout, stderr = deploy(config, checkpoint, tmp_path / 'deploy', '--test',
                                  '--merge-repeats', 3, '--threads', 1)
    assert code == 0, stderr[-3000:]
    deploy_dir = tmp_path / 'deploy'
    assert 'latency-aware merge (onnxruntime, 1 threads)' in stdout
    merged_config = deploy_dir / f'{config.stem}_merged.py'
    merged_checkpoint = deploy_dir / f'{config.stem}_merged.pth'
    assert f'merged config:     {merged_config}' in stdout
    merge_meta = torch.load(merged_checkpoint, map_location='cpu',
                            weights_only=False)['meta']['lrpet_latency_merge']
    spec = Config.fromfile(str(merged_config)).model.backbone
    factorized = load_config(config).model.backbone.ranks
    assert set(spec.ranks) | set(spec.get('merged', [])) == set(factorized)
    assert sorted(spec.get('merged', [])) == sorted(
        n.partition('.')[2] for n in merge_meta['merged'])
    assert len(merge_meta['layers']) + len(merge_meta['not_called']) == len(factorized)
    processor, ort_model = backend_model(merged_config, deploy_dir / 'end2end.onnx',
                                         deploy_dir / 'deploy_cfg.py')
    torch_model, _ = load_model_and_checkpoint(load_config(config), checkpoint, config)
    agree = pixels = 0
    for image in images_of_test_set(config):
        data, _ = processor.create_input(str(image))
        with torch.no_grad():
            ort = ort_model.test_step(data)[0].pred_sem_seg.data
            ref = torch_model.test_step(data)[0].pred_sem_seg.data
        assert ort.shape == ref.shape
        agree += int((ort == ref).sum())
        pixels += ref.numel()
    # same computation in float32 (argmax of equal logits): only near-ties may flip
    assert agree / pixels >= 0.999, (agree, pixels)
    deployed = float(stdout.split('mIoU: ')[1].split()[0])
    reference = evaluate_checkpoint(load_config(config), checkpoint, tmp_path / 'ref',
                                    progress=False)['mIoU']
    assert abs(deployed - reference) <= 0.1, (deployed, reference)  # mIoU in percent


def test_tensorrt_deploy_config_and_bad_inputs(seg_compact, tmp_path):
    config, checkpoint = seg_compact
    cfg = deploy_config(load_config(config), 'tensorrt', (3, 64, 96))
    shapes = cfg.backend_config.model_inputs[0].input_shapes.input
    assert shapes.opt_shape == [1, 3, 64, 96] and shapes.max_shape == [1, 3, 128, 192]
    code, _, stderr = deploy(config, checkpoint, tmp_path / 'x', '--backend', 'tensorrt',
                             '--test')
    assert code == 2 and '--test runs the deployed model in ONNX Runtime' in stderr
    code, _, stderr = deploy(config, tmp_path / 'missing.pth', tmp_path / 'y')
    assert code == 2 and "checkpoint '" in stderr and 'does not exist' in stderr
    assert not (tmp_path / 'y' / 'end2end.onnx').exists()
    with pytest.raises(ValueError, match="default_scope 'mmpretrain'"):
        deploy_config(Config(dict(default_scope='mmpretrain')))


def test_merged_pair_rebuilds_with_dense_layers_and_reproduces_the_compact_model(seg_compact,
                                                                                 tmp_path):
    """Every low-rank layer merged (the deterministic extreme of the latency-aware merge): the
    written config builds dense convs with bias where the pairs were, the checkpoint loads
    with every key matched, and the outputs equal the compact model's."""
    config, checkpoint = seg_compact
    cfg = load_config(config)
    compact, ckpt = load_model_and_checkpoint(cfg, checkpoint, config)
    merged = copy.deepcopy(compact)
    names = list(low_rank_layers(merged))
    for name in names:
        set_submodule(merged, name, merge_low_rank(merged.get_submodule(name)))
    cfg_path, ckpt_path = write_merged_checkpoint(cfg, merged, names, dict(ckpt['meta']),
                                                  tmp_path, 'toy')
    assert (cfg_path.name, ckpt_path.name) == ('toy_merged.py', 'toy_merged.pth')
    spec = Config.fromfile(str(cfg_path)).model.backbone
    assert spec.ranks == {} and sorted(spec.merged) == sorted(n.partition('.')[2] for n in names)
    rebuilt, _ = load_model_and_checkpoint(load_config(cfg_path), ckpt_path, cfg_path)
    assert not low_rank_layers(rebuilt)
    conv = rebuilt.get_submodule(names[0])
    assert type(conv) is torch.nn.Conv2d and conv.bias is not None
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = compact.extract_feat(x)[-1], rebuilt.extract_feat(x)[-1]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    with pytest.raises(KeyError, match="merged layer 'backbone.nope' is not a factorized"):
        merged_config(cfg, ['backbone.nope'])
    with pytest.raises(ValueError, match='both as factorized'):
        apply_factorized_structure(copy.deepcopy(compact.backbone), {'layer1.0.conv1': 2},
                                   merged=['layer1.0.conv1'])


def test_latency_merge_refuses_a_model_without_low_rank_layers(seg_lrpet_run, tmp_path):
    config, checkpoint = seg_lrpet_run
    with pytest.raises(ValueError, match='builds no low-rank layer'):
        latency_merge_checkpoint(config, checkpoint, tmp_path)
    assert not list(tmp_path.iterdir())
