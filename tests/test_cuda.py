"""Checks that need a CUDA device (marker ``cuda``; skipped on CPU with the reason "needs a CUDA
device"). ``tools/gpu_check.py`` runs them on a GPU machine (docs/install.md).

They use the pure-PyTorch core and mmengine only — no mmcv, mmdet or mmseg — so that they run
on an image with neither (the device machine lent here: torch 2.11 + CUDA 13): the projection
on CUDA against the float64 CPU reference, LRPETHook training a small conv+BN model through an
mmengine Runner with AMP, and LRPETDDP with NCCL in a 1-process group.
"""
from __future__ import annotations

import copy
import math
import socket
import uuid
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrpet_mm.lowrank import (
    LowRankProjector,
    bn_scale,
    conv_weight_as_matrix,
    numerical_rank,
    plan_ranks,
    project_low_rank,
    select_targets,
)
from lrpet_mm.utils.environment import ALLOW_UNSUPPORTED_ENV

NEEDS_CUDA = 'needs a CUDA device'
DEVICE = torch.device('cuda')
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)]

PROJECTION_RTOL = 1e-5
"""Largest relative Frobenius difference between a float32 CUDA projection and the float64 CPU
one, on matrices whose spectrum has a clear gap at the rank (float32 SVD: ~1e-7·‖W‖/gap)."""


def relative_error(a: Tensor, b: Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def gapped_matrix(m: int, n: int, rank: int, seed: int = 0) -> Tensor:
    """A float64 (m, n) matrix with singular values in [0.6, 1] up to ``rank`` and in
    [0.01, 0.3] after it: a trained-like weight whose top-``rank`` subspace is well defined."""
    g = torch.Generator().manual_seed(seed)
    s = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, s, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, s, generator=g, dtype=torch.float64))
    values = torch.cat([torch.linspace(1.0, 0.6, rank, dtype=torch.float64),
                        torch.linspace(0.3, 0.01, s - rank, dtype=torch.float64)])
    return (u * values) @ v.t()


def conv_bn_backbone() -> nn.Sequential:
    """Three 3×3 conv + BN + ReLU blocks (every conv paired with its BN)."""
    layers = []
    for cin, cout in ((3, 32), (32, 64), (64, 64)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU()]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- (a) projection on CUDA

@pytest.mark.parametrize('shape, rank', [((64, 576), 32), ((256, 64), 32), ((512, 4608), 256),
                                         ((2048, 512), 128), ((384, 96), 48)])
def test_projection_on_cuda_matches_the_float64_cpu_reference(shape, rank):
    matrix = gapped_matrix(*shape, rank)
    reference = project_low_rank(matrix, rank, energy_transfer=True)
    result = project_low_rank(matrix.float().to(DEVICE), rank, energy_transfer=True)
    assert result.matrix.device.type == DEVICE.type and result.matrix.dtype == torch.float32
    assert relative_error(result.matrix, reference.matrix) <= PROJECTION_RTOL
    assert abs(result.energy_kept - reference.energy_kept) <= 1e-6
    assert numerical_rank(result.matrix, rtol=1e-4) <= rank


@pytest.mark.parametrize('in_span', [True, False])
def test_bn_rectified_projection_on_cuda_matches_the_float64_cpu_reference(in_span):
    m, n, rank = 128, 1152, 64
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(m, generator=g, dtype=torch.float64) + 0.5  # BN scale a
    matrix = gapped_matrix(m, n, rank) / scale[:, None]  # so that diag(a)·M has the gap
    unfold = None if in_span else scale / (scale ** 2 + 1e-5)  # eq. 16
    reference = project_low_rank(matrix, rank, row_scale=scale, output_row_factor=unfold,
                                 in_span=in_span)
    on_device = None if unfold is None else unfold.float().to(DEVICE)
    result = project_low_rank(matrix.float().to(DEVICE), rank, row_scale=scale.float().to(DEVICE),
                              output_row_factor=on_device, in_span=in_span)
    assert relative_error(result.matrix, reference.matrix) <= PROJECTION_RTOL
    assert abs(result.energy_kept - reference.energy_kept) <= 1e-6


def test_projection_on_cuda_is_optimal_on_random_weights():
    """No gap (He-initialized weights): the subspace is not unique, the error still is."""
    g = torch.Generator().manual_seed(2)
    for m, n in ((64, 576), (256, 2304), (1024, 256)):
        weight = torch.randn(m, n, generator=g) * math.sqrt(2.0 / n)
        rank = min(m, n) // 2
        result = project_low_rank(weight.to(DEVICE), rank, energy_transfer=False)
        values = torch.linalg.svdvals(weight.double())
        optimum = float(values[rank:].pow(2).sum())
        error = float((result.matrix.double().cpu() - weight.double()).pow(2).sum())
        assert error <= optimum * (1 + 1e-4)
        assert numerical_rank(result.matrix, rtol=1e-4) <= rank


@pytest.mark.parametrize('bn_recovery', ['in_span', 'eq16'])
def test_projector_on_cuda_matches_the_float64_cpu_reference(bn_recovery):
    torch.manual_seed(3)
    model = conv_bn_backbone()
    for module in model:
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.running_var.uniform_(0.5, 2.0)
    reference = copy.deepcopy(model).double()
    model = model.to(DEVICE)

    def project(net: nn.Module) -> Dict[str, Tensor]:
        selection = select_targets(net, scope='')
        plan = plan_ranks({t.name: t.matrix_shape for t in selection.targets}, 0.5)
        # planned ranks on gapped weights: rewrite each conv weight with a gap at its rank
        for seed, target in enumerate(selection.targets):
            if target.name in plan.layers:
                m, n = target.matrix_shape
                weight = gapped_matrix(m, n, plan.rank_of(target.name), seed)
                weight = weight / bn_scale(target.norm).detach().double().cpu()[:, None]
                target.layer.weight.data.copy_(weight.view_as(target.layer.weight))
        projector = LowRankProjector(selection.targets, plan, energy_transfer=True,
                                     bn_recovery=bn_recovery)
        stats = projector.project(where='gpu check')
        assert stats.num_layers == len(plan.layers) > 0
        return {t.name: t.layer.weight.detach() for t in selection.targets
                if t.name in plan.layers}

    got, expected = project(model), project(reference)
    assert set(got) == set(expected)
    for name, weight in got.items():
        assert weight.device.type == DEVICE.type and weight.dtype == torch.float32
        assert relative_error(weight, expected[name]) <= PROJECTION_RTOL, name


# ---------------------------------------------------------------- (b) the hook on CUDA, AMP

def toy_model():
    """An mmengine BaseModel: the conv+BN backbone and a linear classifier."""
    from mmengine.model import BaseModel

    class ToyConvNet(BaseModel):

        def __init__(self) -> None:
            super().__init__()
            self.backbone = conv_bn_backbone()
            self.head = nn.Linear(64, 4)

        def forward(self, inputs: Tensor, labels: Optional[Tensor] = None,
                    mode: str = 'tensor'):
            logits = self.head(self.backbone(inputs).mean((2, 3)))
            if mode == 'loss':
                return dict(loss=F.cross_entropy(logits, labels))
            return logits

    return ToyConvNet()


class RandomImages(torch.utils.data.Dataset):
    """32 seeded random 3×16×16 images with labels in 0..3."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(32, 3, 16, 16, generator=g)
        self.labels = torch.randint(0, 4, (32, ), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return dict(inputs=self.images[i], labels=self.labels[i])


def train_with_hook(work_dir: Path, amp: bool = True, launcher: str = 'none',
                    model_wrapper_cfg: Optional[dict] = None, max_iters: int = 6):
    """Train the toy model with LRPETHook (rank ratio 0.5, a projection every 2 iterations)
    through an mmengine Runner; returns the runner."""
    from mmengine.runner import Runner

    import lrpet_mm  # noqa: F401  (registers LRPETHook and LRPETDDP)

    runner = Runner(
        model=toy_model(), work_dir=str(work_dir),
        experiment_name=f'cuda-check-{uuid.uuid4().hex[:8]}',
        train_dataloader=dict(dataset=RandomImages(), batch_size=8, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=True),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=max_iters),
        optim_wrapper=dict(type='AmpOptimWrapper' if amp else 'OptimWrapper',
                           optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        custom_hooks=[dict(type='LRPETHook', rank_ratio=0.5, interval=2)],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=max_iters,
                                           by_epoch=False)),
        log_processor=dict(by_epoch=False),
        launcher=launcher, cfg=dict(model_wrapper_cfg=model_wrapper_cfg),
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend='nccl')),
        default_scope='mmengine')
    runner.train()
    return runner


def check_trained_low_rank(runner) -> None:
    """The hook projected during training, and the final weights are exactly low-rank."""
    from mmengine.model import is_model_wrapper

    from lrpet_mm.engine import LRPETHook

    (hook, ) = [h for h in runner.hooks if isinstance(h, LRPETHook)]
    assert hook.num_projections >= 3  # iterations 2, 4, 6
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    assert all(p.device.type == DEVICE.type for p in model.parameters())
    assert len(hook.plan.layers) == 3
    for name, planned in hook.plan.layers.items():
        weight = model.get_submodule(name).weight
        assert weight.dtype == torch.float32  # AMP keeps float32 master weights
        assert numerical_rank(conv_weight_as_matrix(weight), rtol=1e-4) <= planned.rank, name
    loss = runner.message_hub.get_scalar('train/loss').current()
    assert math.isfinite(loss)
    assert (Path(runner.work_dir) / 'iter_6.pth').is_file()


def test_hook_trains_a_conv_bn_model_on_cuda_with_amp(tmp_path, monkeypatch):
    from mmengine.optim import AmpOptimWrapper

    monkeypatch.setenv(ALLOW_UNSUPPORTED_ENV, '1')  # this check is for the core, any torch
    runner = train_with_hook(tmp_path, amp=True)
    assert isinstance(runner.optim_wrapper, AmpOptimWrapper)
    assert math.isfinite(float(runner.optim_wrapper.loss_scaler.get_scale()))
    check_trained_low_rank(runner)


# ---------------------------------------------------------------- (c) LRPETDDP with NCCL

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_lrpetddp_with_nccl_in_a_one_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist

    from lrpet_mm.engine import LRPETDDP

    if not dist.is_nccl_available():
        pytest.skip('this torch has no NCCL')
    monkeypatch.setenv(ALLOW_UNSUPPORTED_ENV, '1')
    for key, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    try:
        runner = train_with_hook(tmp_path, amp=True, launcher='pytorch',
                                 model_wrapper_cfg=dict(type='LRPETDDP'))
        assert dist.is_initialized() and dist.get_backend() == 'nccl'
        assert isinstance(runner.model, LRPETDDP)
        check_trained_low_rank(runner)
        # the wrapper's own split projection, called as the hook calls it
        stats = runner.model.lrpet_project(
            [h for h in runner.hooks if type(h).__name__ == 'LRPETHook'][0].projector,
            'after training')
        assert stats.num_layers == 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
