"""A second thread for independent work inside one training step, with the numbers of one thread.

On a CPU, a second intra-op thread barely speeds up this project's ops (docs/performance.md), but two independent
pieces of work (the teacher's 3D branch and its image branch; the frozen teacher on the next batch and the student
on this one) can each keep a core busy. An op computes the same numbers in any thread as long as it runs with the
same intra-op thread count, so :func:`in_this_context` carries that count over with the rest of the caller's
per-thread state (grad mode, inference mode, autocast). The count has to be set again in the worker: OpenMP keeps
it per thread, and a worker made while the count was 1 stays at 1 after the caller sets 2 (a test caught it).
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

_PREFIX = "haskd-branch"
_pool = None
_lock = threading.Lock()


def in_this_context(fn):
    """``fn`` wrapped to run under the caller's intra-op thread count, grad mode, inference mode and autocast
    (per-thread state that another thread does not share)."""
    threads, grad, inference = torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    amp = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]

    def run(*args, **kwargs):
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(inference))
            if not inference:
                stack.enter_context(torch.set_grad_enabled(grad))
            for device, dtype in amp:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            return fn(*args, **kwargs)

    return run


def submit(fn, *args):
    """Start ``fn(*args)`` in the shared worker thread, under this thread's context; returns its future. Called from
    the worker itself, it runs inline (a future already done), so nested use cannot wait on itself."""
    global _pool
    if threading.current_thread().name.startswith(_PREFIX):
        done = Future()
        done.set_result(fn(*args))
        return done
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix=_PREFIX)
    return _pool.submit(in_this_context(fn), *args)
