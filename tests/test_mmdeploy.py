"""tools/deploy.py: the whole compact detector / segmentor deployed with mmdeploy (end-to-end
ONNX, ONNX Runtime with mmdeploy's custom ops) reproduces the PyTorch compact model."""
import contextlib
import io
from pathlib import Path

import pytest
import torch
from mmdet.structures.bbox import bbox_overlaps
from mmengine.config import Config

from helpers import load_repo_script
from lrpet_mm.deploy.mmdeploy_export import backend_model, deploy_config
from lrpet_mm.models import factorize_checkpoint
from lrpet_mm.models.factorize_checkpoint import load_config, load_model_and_checkpoint
from lrpet_mm.report import evaluate_checkpoint

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
def det_compact(det_lrpet_run, tmp_path_factory):
    out = factorize_checkpoint(*det_lrpet_run, tmp_path_factory.mktemp('det_compact'))
    return out.config_path, out.checkpoint_path


@pytest.fixture(scope='module')
def seg_compact(seg_lrpet_run, tmp_path_factory):
    out = factorize_checkpoint(*seg_lrpet_run, tmp_path_factory.mktemp('seg_compact'))
    return out.config_path, out.checkpoint_path


def test_whole_compact_detector_is_deployed_and_reproduced_by_onnx_runtime(det_compact,
                                                                          tmp_path):
    config, checkpoint = det_compact
    code, stdout, stderr = deploy(config, checkpoint, tmp_path / 'deploy', '--test')
    assert code == 0, stderr[-3000:]
    onnx_file, deploy_file = tmp_path / 'deploy' / 'end2end.onnx', tmp_path / 'deploy' / \
        'deploy_cfg.py'
    assert onnx_file.is_file() and deploy_file.is_file()
    assert Config.fromfile(str(deploy_file)).codebase_config.task == 'ObjectDetection'

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
    config, checkpoint = seg_compact
    code, stdout, stderr = deploy(config, checkpoint, tmp_path / 'deploy', '--test')
    assert code == 0, stderr[-3000:]
    deploy_dir = tmp_path / 'deploy'
    processor, ort_model = backend_model(config, deploy_dir / 'end2end.onnx',
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
