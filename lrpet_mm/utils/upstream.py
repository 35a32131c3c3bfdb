"""Locate the upstream OpenMMLab tools shipped inside the mmdet / mmseg wheels."""
import importlib.util
from pathlib import Path


def upstream_tool(package: str, tool: str) -> Path:
    """Path of ``tools/<tool>`` shipped by ``package`` (``mmdet`` or ``mmseg``) in ``.mim/``.

    Example: ``upstream_tool('mmdet', 'train.py')``.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f'package {package!r} is not installed')
    path = Path(list(spec.submodule_search_locations)[0]) / '.mim' / 'tools' / tool
    if not path.is_file():
        raise FileNotFoundError(f'{package} does not ship tools/{tool} (looked for {path})')
    return path
