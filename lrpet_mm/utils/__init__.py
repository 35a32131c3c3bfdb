from .atomic import atomic_path, check_writable_dir
from .upstream import upstream_tool

__all__ = ['atomic_path', 'check_writable_dir', 'upstream_tool']
