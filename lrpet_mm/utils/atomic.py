"""Write files atomically: to a temporary file in the same directory, then rename."""
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


def check_writable_dir(path: Union[str, os.PathLike], what: str = 'output directory') -> Path:
    """Create ``path`` if needed and check we can write into it; clear error otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f'cannot create {what} {str(path)!r}: {e.strerror}') from e
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f'{what} {str(path)!r} is not a writable directory')
    return path


@contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    On any error the temporary file is removed and ``path`` is left as it was, so a reader
    never sees a half-written file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.stem}.', suffix=f'.tmp{path.suffix}',
                               dir=path.parent)  # keeps the extension (Config.dump needs it)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
