"""Writing files safely: atomic writes, temp-file sweeping and one-line reasons for operating-system failures.

Every file haskd writes under its final name is complete: it is written to a hidden temp sibling
(``.<name>.tmp<pid>``) and renamed into place. A failed write removes its temp file; a killed one leaves it, and the
next run that owns the folder sweeps it (:func:`sweep_temp`).
"""
from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path

from .errors import HaskdError

TEMP_RE = re.compile(r"^\..+\.tmp(\d+)$")


def os_reason(e: OSError) -> str:
    """A short reason for an OSError, the way a user would say it."""
    if e.errno == errno.ENOSPC:
        return "disk full (no space left on device)"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (read-only or not yours)"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a path component is a file, not a folder"
    if e.errno == errno.EISDIR:
        return "is a folder, not a file"
    return e.strerror or type(e).__name__


def os_error(e: OSError, path=None) -> HaskdError:
    """The one-line :class:`HaskdError` for an OSError hit while writing ``path``."""
    where = path or e.filename
    return HaskdError(f"{where}: cannot write ({os_reason(e)})")


def make_dir(path) -> Path:
    """``mkdir -p`` with the usual permissions (0777 minus the umask), one-line errors for OS failures."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HaskdError(f"{path}: exists and is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, path) from None
    return path


@contextmanager
def atomic_write(path):
    """Yield a temp path beside ``path``; on success it is renamed to ``path``, on any error it is removed (an
    OSError becomes one line naming ``path``)."""
    path = Path(path)
    make_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):
            raise os_error(e, path) from None
        if isinstance(e, RuntimeError) and ("file write failed" in str(e) or "No space left" in str(e)):
            raise HaskdError(f"{path}: cannot write ({str(e).splitlines()[0][:160]})") from None
        raise


def write_text(path, text: str):
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temp(folder, recursive: bool = True) -> list:
    """Remove temp files (``.<name>.tmp<pid>``) left in ``folder`` by processes that are no longer running (a
    killed save); returns the removed paths."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    it = folder.rglob(".*") if recursive else folder.glob(".*")
    for p in list(it):
        m = TEMP_RE.match(p.name)
        if m and p.is_file() and (int(m.group(1)) == os.getpid() or not _alive(int(m.group(1)))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def cache_root() -> Path:
    """haskd's cache folder (rendered views, compiled kernels): ``$HASKD_CACHE``, else ``$XDG_CACHE_HOME/haskd``, else
    ``~/.cache/haskd``."""
    if os.environ.get("HASKD_CACHE"):
        return Path(os.environ["HASKD_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "haskd"
