"""tools/gpu_check.py on a machine without CUDA: everything reported skipped, exit 0; and its
ResNet-50 conv list (timed on the GPU) against torchvision's ResNet-50."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO_ROOT, load_repo_script
from lrpet_mm.lowrank import select_targets


@pytest.fixture(scope='module')
def gpu_check():
    return load_repo_script('tools/gpu_check.py', 'gpu_check_tool')


def test_resnet50_conv_list_is_torchvisions_resnet50(gpu_check):
    shapes = gpu_check.resnet50_conv_shapes()
    assert len(shapes) == 53 and len({name for name, _ in shapes}) == 53
    torchvision = pytest.importorskip('torchvision')
    model = torchvision.models.resnet50()
    expected = [(name, tuple(m.weight.shape)) for name, m in model.named_modules()
                if isinstance(m, torch.nn.Conv2d)]
    assert shapes == expected


def test_resnet50_timing_model_pairs_every_conv_with_its_bn(gpu_check):
    selection = select_targets(gpu_check.resnet50_conv_bn_model(torch.device('cpu')), scope='')
    assert len(selection.targets) == 53 and all(t.rectify for t in selection.targets)


@pytest.mark.skipif(torch.cuda.is_available(), reason='with a GPU this is the GPU check itself')
def test_gpu_check_on_cpu_reports_every_part_skipped_and_exits_0(tmp_path):
    out = tmp_path / 'gpu_check.json'
    done = subprocess.run([sys.executable, 'tools/gpu_check.py', '--out', str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result['exit_code'] == 0 and result['machine']['cuda_available'] is False
    assert len(result['tests']) >= 10
    assert {(r['outcome'], r['message']) for r in result['tests']} == {
        ('skipped', 'needs a CUDA device')}
    assert result['resnet50'] == {'skipped': 'needs a CUDA device'}
    assert 'ResNet-50 projection timing' in done.stdout and 'skipped' in done.stdout
