"""The ``native`` sparse conv backend: the torch backend's kernel maps, with its CPU float32 convs run by a small C
kernel (``native.c``) that fuses gather, GEMM and scatter in one pass over the pairs (docs/sparse.md, "native").

Why by hand: spconv, the library for this, has a CPU forward but no CPU backward, and gives wrong sums with more than
one thread (docs/performance.md); PyTorch has no fused gather-GEMM-scatter on CPU.

The kernel is compiled at first use with the system C compiler (``$CC``, else ``cc``; ``-O3 -march=native``) into
the haskd cache folder (``$HASKD_CACHE``, else ``~/.cache/haskd``), under a name that hashes the source, the flags
and this CPU's feature flags, so a cache shared between machines never loads a kernel built for another CPU. The
library is written to a temp name and renamed into place: concurrent processes (DDP ranks) may both compile, and
none loads a partial file. Without a compiler, or if compiling fails, :func:`available` is False (with one warning)
and ``backend: auto`` runs the torch backend: results equal up to float rounding, only slower.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from ..io import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
FLAG_SETS = (("-O3", "-march=native"), ("-O3",))  # the second where the compiler has no -march=native
# The forward of a layer whose Cin x Cout exceeds this runs the torch backend's path: at 256 x 256 channels MKL's
# GEMMs are faster there than the kernel's register tiles; at 128 x 128 and below the kernel wins. The backward runs
# the kernel at every width: its input and weight gradients beat the gathered GEMMs at 256 channels too
# (docs/performance.md section 0000b).
MAX_CIN_COUT = 128 * 128

_lock = threading.Lock()
_lib = None
_error = None  # why the kernel is unavailable, once tried


def _cpu_tag() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them, else its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compile(cc: str, flags, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _load():
    cc = os.environ.get("CC") or "cc"
    if not shutil.which(cc):
        raise RuntimeError(f"no C compiler ({cc!r} not found; set $CC)")
    src = SOURCE.read_bytes()
    folder = cache_root() / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    last = None
    for flags in FLAG_SETS:
        key = hashlib.sha1(b"\0".join([src, " ".join(flags).encode(), cc.encode(), _cpu_tag().encode()]))
        target = folder / f"haskd_sparse_{key.hexdigest()[:16]}.so"
        try:
            if not target.is_file():
                _compile(cc, flags, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as e:
            last = getattr(e, "stderr", None) or str(e)
            continue
        p, n = ctypes.c_void_p, ctypes.c_int64
        lib.haskd_conv_forward.argtypes = [p, n, p, n, p, p, p, n, p]
        lib.haskd_conv_forward.restype = ctypes.c_int
        lib.haskd_conv_weight_grad.argtypes = [p, n, p, n, p, p, p, n, p]
        lib.haskd_conv_weight_grad.restype = ctypes.c_int
        return lib
    raise RuntimeError(f"compiling {SOURCE.name} failed: {str(last).strip().splitlines()[-1] if last else '?'}")


def available() -> bool:
    """Whether the kernel compiled and loaded (tried once per process; a failure warns once)."""
    global _lib, _error
    if _lib is None and _error is None:
        with _lock:
            if _lib is None and _error is None:
                try:
                    _lib = _load()
                except (RuntimeError, OSError) as e:
                    _error = str(e)
                    log.warning("native sparse conv kernel unavailable (%s): using the torch backend", _error)
    return _lib is not None


def unavailable_reason():
    """Why :func:`available` is False (None when it is True or was not tried)."""
    return _error


def handles(x: torch.Tensor, weight: torch.Tensor, forward: bool = True) -> bool:
    """Whether a conv of ``x (N, Cin)`` by ``weight (Cout, K, Cin)`` runs here, its ``forward`` pass or its
    backward: CPU float32, and for the forward no wider than ``MAX_CIN_COUT``."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (not forward or weight.shape[0] * weight.shape[2] <= MAX_CIN_COUT) and available())


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def conv_pairs(x: torch.Tensor, w_kio: torch.Tensor, in_idx, out_idx, group_table, out: torch.Tensor) -> None:
    """``out[o] += x[i] @ w_kio[k]`` over every pair of every group, in place. ``x (N_in, Cin)``, ``w_kio (K, Cin,
    Cout)``, ``out (N_out, Cout)``: contiguous float32; ``group_table (G, 3)`` int64 rows ``(k, start, end)``."""
    if _lib.haskd_conv_forward(_ptr(x), x.shape[1], _ptr(w_kio), w_kio.shape[2], _ptr(in_idx), _ptr(out_idx),
                               _ptr(group_table), group_table.shape[0], _ptr(out)):
        raise MemoryError("native sparse conv: out of memory for the weight scratch")


def weight_grad_pairs(x: torch.Tensor, g: torch.Tensor, in_idx, out_idx, group_table, gw_kio: torch.Tensor) -> None:
    """``gw_kio[k] += x[i]^T g[o]`` over offset ``k``'s pairs, in place; ``gw_kio (K, Cin, Cout)``."""
    if _lib.haskd_conv_weight_grad(_ptr(x), x.shape[1], _ptr(g), g.shape[1], _ptr(in_idx), _ptr(out_idx),
                                   _ptr(group_table), group_table.shape[0], _ptr(gw_kio)):
        raise MemoryError("native sparse conv: out of memory for the weight-gradient buffers")
