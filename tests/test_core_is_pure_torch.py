"""The core (lrpet_mm.lowrank) must not depend on OpenMMLab packages."""
import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / 'lrpet_mm' / 'lowrank'


def test_core_sources_import_no_openmmlab_package():
    offenders = []
    for path in sorted(CORE.glob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or '']
            offenders += [f'{path.name}: {n}' for n in names if n.split('.')[0].startswith('mm')]
    assert len(list(CORE.glob('*.py'))) >= 5
    assert offenders == []


def test_core_imports_and_projects_with_openmmlab_blocked():
    code = (
        'import sys\n'
        "for name in ('mmengine', 'mmcv', 'mmdet', 'mmseg'):\n"
        '    sys.modules[name] = None  # any import of them now fails\n'
        'import torch\n'
        'from lrpet_mm.lowrank import project_low_rank\n'
        'r = project_low_rank(torch.randn(6, 9), 2)\n'
        "assert all(mod is None for name, mod in sys.modules.items()\n"
        "           if name.split('.')[0] in ('mmengine', 'mmcv', 'mmdet', 'mmseg'))\n"
        "print('ok', r.matrix.shape)\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=str(CORE.parents[1]))
    assert out.returncode == 0, out.stderr
    assert 'ok torch.Size([6, 9])' in out.stdout
