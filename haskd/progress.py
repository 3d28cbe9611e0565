"""Progress output that suits where it goes.

On a terminal (stdout and stderr both ttys) loops show tqdm bars. Anywhere else (``make demo > demo.log 2>&1``, CI,
``| tee``) a bar's carriage returns would turn a log into hundreds of very long lines, so a loop prints nothing
while it runs and at most one plain line when it ends (``<desc>: 24 scenes in 31 s``). ``HASKD_PROGRESS=bar`` or
``=line`` forces either form.

Also :class:`StageClock`, the overall ``stage i/n, elapsed, estimate`` line of multi-stage runs.
"""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("haskd")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def interactive() -> bool:
    """True where carriage-return bars are wanted: both stdout and stderr are terminals (or ``HASKD_PROGRESS=bar``)."""
    mode = os.environ.get("HASKD_PROGRESS", "").strip().lower()
    if mode in ("bar", "bars", "tty"):
        return True
    if mode in ("line", "lines", "plain"):
        return False
    return _isatty(sys.stdout) and _isatty(sys.stderr)


def duration(seconds: float) -> str:
    """``42 s``, ``3m05s``, ``1h02m``: short and unambiguous in a log line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class _Lines:
    """Stand-in for a tqdm bar off a terminal: counts, and logs one line when closed (unless ``line`` is False)."""

    def __init__(self, iterable, desc, unit, total, line):
        self.iterable, self.desc, self.unit, self.line = iterable, desc, unit, line
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.t0, self.closed = 0, time.perf_counter(), False

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.n += 1
        finally:
            self.close()

    def __len__(self):
        return self.total or 0

    def update(self, n=1):
        self.n += n

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.line and self.n:
            units = self.unit + ("s" if self.n != 1 and not self.unit.endswith("s") else "")
            log.info("%s: %d %s in %s", self.desc, self.n, units, duration(time.perf_counter() - self.t0))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable=None, desc: str = "", unit: str = "it", total=None, disable: bool = False, line: bool = True,
             **tqdm_kwargs):
    """A tqdm bar on a terminal; elsewhere an iterator that logs ``desc: N units in T`` once at the end (``line``;
    pass False where the caller logs its own line, e.g. the trainer's epoch line). ``disable``: neither."""
    if disable:
        return _Lines(iterable, desc, unit, total, line=False)
    if not interactive():
        return _Lines(iterable, desc, unit, total, line)
    from tqdm import tqdm

    tqdm_kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, unit=unit, total=total, **tqdm_kwargs)


class StageClock:
    """The overall progress of a run made of stages: ``stage 2/5 baseline: elapsed 3m05s, about 7m left``.

    ``stages``: ``[(name, weight)]`` or ``[(name, weight, kind)]`` in order; a weight is the stage's share of the
    work (the pipeline uses its epochs), a kind groups stages whose unit of weight costs alike (a teacher epoch
    is not a student epoch). The estimate prices each stage left at the time per unit of weight of the stages of
    its kind that ran in this process, else of all that ran (stages finished earlier and skipped count nothing);
    before any stage has run there is none. ``logger``: where the lines go (None: nowhere)."""

    def __init__(self, stages, started: float = None, logger=log):
        self.stages = [(str(st[0]), float(st[1]), st[2] if len(st) > 2 else "") for st in stages]
        self.t0 = time.time() if started is None else started
        self.log = logger  # None: silent (the other ranks of a distributed run)
        self.index = {n: i for i, (n, _, _) in enumerate(self.stages)}
        self.spent = {}  # kind -> [seconds, weight] of the stages timed here
        self.current, self.current_start, self.finished = None, None, set()

    def _rate(self, kind):
        t, w = self.spent.get(kind, (0.0, 0.0))
        if w > 0:
            return t / w
        t, w = (sum(v[i] for v in self.spent.values()) for i in (0, 1))
        return t / w if w > 0 else None

    def estimate(self, after: int):
        """Seconds left for the unfinished stages from index ``after`` on, or None while nothing has been timed."""
        if self._rate(None) is None:
            return None
        return sum(w * self._rate(k) for i, (n, w, k) in enumerate(self.stages)
                   if i >= after and n not in self.finished)

    def line(self, name: str) -> str:
        i = self.index[name]
        est = self.estimate(i)
        tail = "estimate after the first stage" if est is None else f"about {duration(est)} left"
        return f"stage {i + 1}/{len(self.stages)} {name}: elapsed {duration(time.time() - self.t0)}, {tail}"

    def start(self, name: str) -> None:
        self.current, self.current_start = name, time.time()
        if self.log is not None:
            self.log.info(self.line(name))

    def done(self, name: str, ran: bool = True) -> None:
        """``ran``: False for a stage that was skipped (finished earlier): its time says nothing of the rate."""
        _, weight, kind = self.stages[self.index[name]]
        if ran and weight > 0 and self.current == name and self.current_start is not None:
            t = self.spent.setdefault(kind, [0.0, 0.0])
            t[0] += time.time() - self.current_start
            t[1] += weight
        self.finished.add(name)
        self.current = None

    def summary(self) -> str:
        return f"{len(self.finished)}/{len(self.stages)} stages done in {duration(time.time() - self.t0)}"
