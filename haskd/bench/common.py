"""Timing and memory helpers shared by the benchmarks, and the machine facts recorded with every result.

Timing rule everywhere: ``warmup`` untimed runs, then ``runs`` timed runs; report median, min and max; CUDA is
synchronised around every timed call. Peak memory: CUDA ``max_memory_allocated``; CPU the process's peak resident
set (``VmHWM``), reset before each phase through ``/proc/self/clear_refs`` (Linux), else ``ru_maxrss`` growth.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time

import torch


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_runs(fn, runs=5, warmup=1, device="cpu") -> dict:
    """Wall time of ``fn()``: ``{"median", "min", "max", "runs"}`` in seconds over ``runs`` timed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "runs": len(ts)}


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.mb``: peak memory (MiB) inside the block.

    CPU: peak RSS of the process within the block (``VmHWM`` after resetting it), or, where that reset is not
    possible, how far ``ru_maxrss`` grew (an underestimate when an earlier phase peaked higher). ``m.method`` says
    which.
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.mb, self.method = None, None

    @staticmethod
    def _hwm_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1])
        raise OSError("no VmHWM")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS counter to the current RSS
            self._hwm_kb()
            self.method = "VmHWM (peak RSS, reset per phase)"
        except OSError:
            self.method = "ru_maxrss growth"
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2 ** 20
        elif self.method.startswith("VmHWM"):
            self.mb = self._hwm_kb() / 1024
        else:
            self.mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._start) / 1024
        return False


def env_info(device="cpu") -> dict:
    """Machine and library facts recorded with every result."""
    from ..sparse import spconv_backend

    dev = torch.device(device)
    info = {"device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    spconv_version = None
    if spconv_backend.available():
        try:
            import spconv

            spconv_version = getattr(spconv, "__version__", "unknown")
        except Exception as e:  # a broken install should not stop a benchmark
            spconv_version = f"import failed: {type(e).__name__}"
    info["spconv"] = spconv_version
    if dev.type == "cuda":
        info["sparse_backend"] = "spconv" if spconv_version and "failed" not in spconv_version else "torch"
    else:
        from ..sparse import native

        info["sparse_backend"] = "native" if native.available() else "torch"
    return info


def count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))
