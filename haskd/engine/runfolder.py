"""A run folder belongs to one run.

* A live run holds an exclusive lock on ``OUT/.haskd.lock`` (``flock``: the kernel drops it when the process dies,
  so a killed run never leaves a stale lock); a second run into the folder is refused, naming the first one's pid.
* A folder that already holds a run (``last.pt``, ``config.yaml`` or ``metrics.jsonl``) is refused unless the
  caller resumes it (``--resume``) or replaces it (``--overwrite``, which removes that run's files first, only
  those). ``--resume`` on a folder without a run is an error (a mistyped ``--out`` must not start from scratch).
* A resume must use the run's own settings: only the keys in :data:`RESUME_MAY_CHANGE` may differ; anything else
  (preset, optimizer, scheduler, lr, data, ...) is refused before a file is written. ``train.epochs`` may grow
  (the learning-rate schedule is then rebuilt for the new length, see :func:`haskd.workflow.train.train`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..config import REMOVED_KEYS
from ..errors import HaskdError

LOCK_NAME = ".haskd.lock"
RUN_MARKERS = ("last.pt", "config.yaml", "metrics.jsonl")
RUN_FILES = ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "val_metrics.json", "frames.json")
RUN_DIRS = ("snapshots", "tb")
RESUME_MAY_CHANGE = ("train.epochs", "train.device", "train.threads", "train.eval_every", "data.root",
                     "data.workers")


def holds_run(out) -> list:
    """The files that show ``out`` holds a run (empty when none)."""
    out = Path(out)
    return [n for n in RUN_MARKERS if (out / n).exists()]


def _lock_holder(out: Path):
    """The pid holding ``out``'s lock, or None when no live process holds it."""
    import fcntl

    path = out / LOCK_NAME
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = path.read_text().strip()
        return text or "?"
    finally:
        os.close(fd)  # closing drops a lock this probe took
    return None


def check_start(out, resume, overwrite: bool = False) -> None:
    """Refuse, in one line, a run that must not start in ``out`` (read only: nothing is created).

    ``resume``: True (the user asked: a run must be there), False (a new run: none may be there) or "auto" (resume
    when there is one; the pipeline's stages)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HaskdError(f"{out}: exists and is a file, not a folder; pick another --out")
    if resume is True and overwrite:
        raise HaskdError("--resume and --overwrite contradict each other: pick one")
    pid = _lock_holder(out) if out.is_dir() else None
    if pid is not None:
        raise HaskdError(f"{out}: another haskd run (pid {pid}) is using this folder; wait for it to end or pick "
                         f"another --out")
    found = holds_run(out)
    if resume is True and not (out / "last.pt").is_file() and not found:
        raise HaskdError(f"{out}: no run to resume (no last.pt); check --out, or drop --resume to start a new run")
    if not resume and not overwrite and found:
        raise HaskdError(f"{out}: already holds a run ({', '.join(found)}); --resume continues it, --overwrite "
                         f"replaces it, or pick another --out")


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_resume_config(out, stored: dict, cfg_dict: dict) -> None:
    """Refuse a resume whose config differs from the run's (``stored``) outside :data:`RESUME_MAY_CHANGE`."""
    a, b = _flat(stored), _flat(cfg_dict)
    diff = [k for k in sorted(set(a) | set(b))
            if k not in RESUME_MAY_CHANGE and k not in REMOVED_KEYS and a.get(k) != b.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:3])
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise HaskdError(f"{out}: --resume with settings other than the run's ({shown}{more}); resume with the "
                         f"run's own config (only {', '.join(RESUME_MAY_CHANGE)} may change) or start a new --out")


class RunLock:
    """Exclusive ``flock`` on ``OUT/.haskd.lock`` holding this process's pid; released by :meth:`release` or by the
    kernel when the process ends."""

    def __init__(self, out):
        import fcntl

        self.path = Path(out) / LOCK_NAME
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            from ..io import os_error

            raise os_error(e, self.path) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            pid = self.path.read_text().strip() or "?"
            raise HaskdError(f"{out}: another haskd run (pid {pid}) is using this folder; wait for it to end or "
                             f"pick another --out") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self):
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def clear_run(out) -> None:
    """Remove a run's own files (``--overwrite``); anything else in the folder is left alone."""
    out = Path(out)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
