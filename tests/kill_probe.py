"""Test-only fault for ``tests/test_resume.py``: listed in a config's ``custom_imports``, it
registers ``KillAfterCheckpoint``, which ends the training process with SIGKILL (no cleanup,
no exception handling: a real process kill) right after the checkpoint of a given iteration was
written."""
import os
import signal

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class KillAfterCheckpoint(Hook):
    """SIGKILL this process after iteration ``iteration``'s hooks, CheckpointHook's included."""
    priority = 'LOWEST'  # after CheckpointHook (VERY_LOW)

    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)
