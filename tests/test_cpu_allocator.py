"""benchlib.cpu_allocator.retain_freed_memory (for the benchmarks' eager CPU timings): after
it, an eager forward pass no longer page-faults its activations in again (counted with
getrusage in fresh processes: the setting is process-wide and final, so it never runs in the
test process itself)."""
import json
import platform
import subprocess
import sys

import pytest

from benchlib.cpu_allocator import retain_freed_memory
from helpers import REPO_ROOT

FORWARD_FAULTS = r'''
import json, resource, sys
import torch
from torch import nn
from benchlib.cpu_allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == 'retain' else None
torch.set_num_threads(1)
torch.manual_seed(0)
net = nn.Sequential(*[m for _ in range(2) for m in (nn.Conv2d(16, 64, 1), nn.ReLU(),
                                                    nn.Conv2d(64, 16, 1), nn.ReLU())]).eval()
x = torch.randn(1, 16, 256, 320)  # 64-channel activations of 21 MB
counts = []
with torch.no_grad():
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# median of the last 5 forwards: the heap may still grow once early on
print(json.dumps(dict(applied=applied, faults=sorted(counts[3:])[2])))
'''


def forward_faults(mode: str) -> dict:
    # run in benchmarks/, where ``benchlib`` is importable (``-c`` puts the cwd on sys.path)
    out = subprocess.run([sys.executable, '-c', FORWARD_FAULTS, mode], capture_output=True,
                         text=True, check=True, cwd=REPO_ROOT / 'benchmarks')
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_retained_memory_stops_page_faults_in_every_forward():
    assert platform.libc_ver()[0] == 'glibc'  # the project's supported platform (Linux)
    default, retained = forward_faults('default'), forward_faults('retain')
    assert retained['applied'] is True
    # glibc returns the large activations to the kernel after each forward: thousands of
    # faults per forward (one per 4 KiB page touched again); retained: (almost) none
    assert default['faults'] > 2000, default
    assert retained['faults'] < 0.02 * default['faults'], (default, retained)


@pytest.mark.parametrize('bad', [0, 1000, 2.0**30, True, '1G'])
def test_bad_threshold_is_rejected_with_the_value(bad):
    with pytest.raises(ValueError, match=r'threshold_bytes must be an int >= 1 MiB'):
        retain_freed_memory(bad)
