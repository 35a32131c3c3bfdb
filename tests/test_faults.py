"""Faults during training: a NaN at projection time and a crash while saving a checkpoint
leave the last good checkpoint loadable, and resume works from it."""
from pathlib import Path

import mmengine.runner.runner as mmengine_runner_module
import pytest
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import lrpet_mm  # noqa: F401
from helpers import lrpet_train_config
from lrpet_mm.engine import LRPETHook
from lrpet_mm.lowrank import ProjectionError

pytestmark = pytest.mark.slow  # drives a runner, a training, a tool or a benchmark

SEG = 'pspnet_r18-d8_toy_voc12aug'


def seg_config(voc_root, work_dir, max_iters=4):
    return lrpet_train_config(SEG, voc_root, work_dir,
                              dict(type='IterBasedTrainLoop', max_iters=max_iters,
                                   val_interval=100), checkpoint_interval=2)


@HOOKS.register_module(force=True)
class NaNAtIteration(Hook):
    """Test fault: a NaN appears in a conv weight after the given iteration."""
    priority = 'HIGH'  # before LRPETHook

    def __init__(self, iteration: int, layer: str):
        self.iteration, self.layer = iteration, layer

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            with torch.no_grad():
                runner.model.get_submodule(self.layer).weight.view(-1)[0] = float('inf')


def test_non_finite_weight_keeps_last_good_checkpoint_loadable(voc_root, tmp_path):
    cfg = seg_config(voc_root, tmp_path)
    cfg.custom_hooks.append(dict(type='NaNAtIteration', iteration=4,
                                 layer='backbone.layer2.0.conv2'))
    with pytest.raises(ProjectionError, match=r"layer 'backbone.layer2.0.conv2' has 1 "
                                              r'non-finite weight value\(s\) at iteration 4'):
        Runner.from_cfg(cfg).train()
    assert not (tmp_path / 'iter_4.pth').exists()  # the error came before the save
    good = torch.load(tmp_path / 'iter_2.pth', map_location='cpu', weights_only=False)
    assert all(torch.isfinite(v).all() for v in good['state_dict'].values())
    assert good['meta']['lrpet']['last_projected_step'] == 2

    resumed = seg_config(voc_root, tmp_path)
    resumed.resume = True  # finds work_dir/last_checkpoint -> iter_2.pth
    runner = Runner.from_cfg(resumed)
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
    assert runner.iter == 4 and hook.last_projected_step == 4 and hook.num_projections == 2


def test_crash_while_saving_keeps_previous_checkpoint_and_resume_works(voc_root, tmp_path,
                                                                       monkeypatch):
    real_save = mmengine_runner_module.save_checkpoint

    def crash_on_iter_4(checkpoint, filename, *args, **kwargs):
        if Path(filename).name == 'iter_4.pth':
            Path(filename).write_bytes(b'PK\x03\x04 half a zip')  # torn write ...
            raise KeyboardInterrupt('simulated: killed while saving')  # ... then killed
        return real_save(checkpoint, filename, *args, **kwargs)

    monkeypatch.setattr(mmengine_runner_module, 'save_checkpoint', crash_on_iter_4)
    with pytest.raises(KeyboardInterrupt):
        Runner.from_cfg(seg_config(voc_root, tmp_path)).train()
    assert (tmp_path / 'last_checkpoint').read_text().strip().endswith('iter_2.pth')
    monkeypatch.setattr(mmengine_runner_module, 'save_checkpoint', real_save)

    resumed = seg_config(voc_root, tmp_path)
    resumed.resume = True
    runner = Runner.from_cfg(resumed)
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, LRPETHook))
    assert runner.iter == 4 and hook.num_projections == 2 and hook.last_projected_step == 4
    saved = torch.load(tmp_path / 'iter_4.pth', map_location='cpu', weights_only=False)
    assert saved['meta']['lrpet']['num_projections'] == 2
