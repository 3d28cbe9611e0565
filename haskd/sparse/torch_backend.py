"""Pure-PyTorch sparse convolution: kernel maps built by hashing + sorting, and a gather-GEMM-scatter autograd op.

A *kernel map* lists, for every kernel offset ``k``, the pairs ``(in_row, out_row)`` such that
``coord_in[in_row] == coord_out[out_row] * stride + offset_k`` (cross-correlation, the same convention as
``torch.nn.functional.conv3d`` and spconv). A convolution is then

    out[o] = sum_k sum_{(i, o) in map_k} W_k @ x[i]

computed as: one gather of every pair's input row into a ``(P, Cin)`` buffer, one GEMM per non-empty offset into a
``(P, Cout)`` buffer, and one reduction of that buffer into the output rows. The reduction is a multiplication by a
0/1 CSR matrix: on CPU it is several times faster than ``index_add_`` (which scatters row by row). The backward
pass reuses the same map: the input gradient is the same op with the roles of ``in``/``out`` swapped.

Weights are stored in spconv 2.x layout ``(Cout, kx, ky, kz, Cin)``, so both backends share one state dict; here they
are viewed as ``(Cout, K, Cin)`` with the offsets enumerated x-major (``k = (dx * ky + dy) * kz + dz``).
"""
from __future__ import annotations

import itertools
import threading
import warnings

import torch

from . import native as _native


def kernel_offsets(kernel_size: int, centered: bool, device=None) -> torch.Tensor:
    """Offsets of a cubic kernel, ``(K, 3)`` int64, x-major: ``-k//2..k//2`` if centered, else ``0..k-1``."""
    start = -(kernel_size // 2) if centered else 0
    r = range(start, start + kernel_size)
    return torch.tensor(list(itertools.product(r, r, r)), dtype=torch.int64, device=device)


# A dense voxel -> row table is used while the padded box has at most this many cells per voxel (or 2^20 cells in
# all), and never above 2^26 cells (256 MiB of int32); beyond that, lookups binary-search the sorted keys.
DENSE_CELLS_PER_VOXEL = 64
DENSE_MAX_CELLS = 1 << 26


def linear_keys(coords: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of int64 ``coords`` ``(..., D)`` with ``mult`` ``(D,)``: a product and a sum, not
    ``coords @ mult``, since CUDA has no integer matrix-vector kernel ("addmv_impl_cuda" not implemented for
    'Long', found by the GPU check)."""
    return (coords * mult).sum(-1)


class CoordIndex:
    """Row lookup for ``(N, 4)`` int64 coords ``[b, x, y, z]`` (non-negative, unique).

    Coordinates are shifted by ``pad`` and packed linearly as ``b * Sx*Sy*Sz + x * Sy*Sz + y * Sz + z`` in a box
    padded by ``pad`` on every side, so that for any offset ``|d| <= pad`` the key of ``c + d`` is simply
    ``key(c) + key(d)``: a whole kernel's queries are one broadcast add, with no bounds checks. Lookups use a dense
    cell -> row table when the box is small enough (one gather per query), else ``searchsorted`` on sorted keys.
    """

    def __init__(self, coords: torch.Tensor, pad: int):
        self.n = coords.shape[0]
        dev = coords.device
        if self.n and bool((coords.min(0).values < 0).any()):
            raise ValueError("sparse coords must be non-negative")
        hi = coords.max(0).values.tolist() if self.n else [0, 0, 0, 0]
        sx, sy, sz = (int(h) + 1 + 2 * pad for h in hi[1:])
        self.mult = torch.tensor([sx * sy * sz, sy * sz, sz, 1], dtype=torch.int64, device=dev)
        self.pad = pad
        self.volume = (int(hi[0]) + 1) * sx * sy * sz
        keys = linear_keys(coords, self.mult) + pad * int(self.mult[1:].sum()) if self.n else coords.new_zeros(0)
        self.keys, self.order = torch.sort(keys)
        self.table = None
        if self.volume <= min(DENSE_MAX_CELLS, max(DENSE_CELLS_PER_VOXEL * self.n, 1 << 20)):
            self.table = torch.full((self.volume,), -1, dtype=torch.int32, device=dev)
            self.table[keys] = torch.arange(self.n, dtype=torch.int32, device=dev)

    def delta(self, offsets: torch.Tensor) -> torch.Tensor:
        """Key shift of each ``(K, 3)`` offset, ``(K,)``; valid for ``|offset| <= pad``."""
        return linear_keys(offsets, self.mult[1:])

    def find(self, qkeys: torch.Tensor) -> torch.Tensor:
        """Rows whose key equals each query (keys from :meth:`delta` shifts, so inside the box); -1 where none."""
        if self.n == 0:
            return torch.full_like(qkeys, -1)
        if self.table is not None:
            return self.table[qkeys].long()
        pos = torch.searchsorted(self.keys, qkeys).clamp_(max=self.n - 1)
        return torch.where(self.keys[pos] == qkeys, self.order[pos], torch.full_like(pos, -1))


class KernelMap:
    """Input/output row pairs of one convolution, grouped by kernel offset.

    Attributes:
        n_in, n_out: row counts of the input and output tensors.
        in_idx, out_idx: ``(P,)`` int64, pairs of every non-empty non-identity offset, concatenated offset by offset.
        groups: list of ``(k, start, end)``: offset ``k`` owns pairs ``start:end``.
        identity_k: offset whose map is the identity (the centre of a submanifold kernel), applied as a plain
            matmul without gather/scatter; ``None`` otherwise.
    """

    def __init__(self, n_in, n_out, in_idx, out_idx, groups, identity_k=None):
        self.n_in, self.n_out = int(n_in), int(n_out)
        self.in_idx, self.out_idx = in_idx.contiguous(), out_idx.contiguous()  # the native kernel reads them raw
        self.groups = groups
        self.identity_k = identity_k
        self._csr = {}
        self._group_table = None

    @property
    def group_table(self) -> torch.Tensor:
        """``groups`` as a ``(G, 3)`` int64 CPU tensor (what the native kernel reads)."""
        if self._group_table is None:
            self._group_table = torch.tensor(self.groups, dtype=torch.int64).reshape(-1, 3)
        return self._group_table

    @property
    def num_pairs(self) -> int:
        return int(self.in_idx.numel()) + (self.n_out if self.identity_k is not None else 0)

    def transposed(self) -> "KernelMap":
        """The same pairs with input and output swapped (inverse conv, and the input gradient)."""
        t = KernelMap(self.n_out, self.n_in, self.out_idx, self.in_idx, self.groups, self.identity_k)
        swap = {"in": "out", "out": "in"}
        t._csr = {(swap[side], dt): v for (side, dt), v in self._csr.items()}
        t._group_table = self._group_table
        return t

    def reducer(self, side: str, dtype=torch.float32) -> torch.Tensor:
        """CSR ``(n_rows, P)`` 0/1 matrix summing pair rows into output (``side='out'``) or input (``'in'``) rows."""
        if (side, dtype) not in self._csr:
            idx, n = (self.out_idx, self.n_out) if side == "out" else (self.in_idx, self.n_in)
            perm = torch.argsort(idx, stable=True)
            crow = torch.zeros(n + 1, dtype=torch.int64, device=idx.device)
            crow[1:] = torch.cumsum(torch.bincount(idx, minlength=n), 0)
            vals = torch.ones(idx.numel(), device=idx.device, dtype=dtype)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": we use only CSR @ dense
                warnings.simplefilter("ignore")
                self._csr[side, dtype] = torch.sparse_csr_tensor(crow, perm, vals, size=(n, idx.numel()))
        return self._csr[side, dtype]


def _pairs_from_table(table: torch.Tensor, out_rows: torch.Tensor | None = None, skip=None):
    """``(K, M)`` table of input rows (-1 = none) -> ``(in_idx, out_idx, groups)``.

    Column ``j`` of the table is output row ``out_rows[j]`` (default ``j``); offset ``skip`` is left out.
    """
    hit = table >= 0
    if skip is not None:
        hit[skip] = False
    k_idx, j = hit.nonzero(as_tuple=True)  # one call for all offsets: sorted by offset, then column
    in_idx = table[k_idx, j]
    out_idx = j if out_rows is None else out_rows[j]
    return in_idx, out_idx, _groups(torch.bincount(k_idx, minlength=table.shape[0]))


def _groups(counts: torch.Tensor):
    groups, start = [], 0
    for k, cnt in enumerate(counts.tolist()):
        if cnt:  # empty offsets cost nothing later
            groups.append((k, start, start + cnt))
            start += cnt
    return groups


def unique_coords(coords: torch.Tensor, return_inverse: bool = False):
    """Sorted unique rows of ``(N, 4)`` int64 coords (1-D unique on packed keys: ``unique(dim=0)`` is slow on CPU).

    Returns ``(M, 4)``, plus the ``(N,)`` row of each input in it when ``return_inverse``.
    """
    if coords.shape[0] == 0:
        return (coords, coords.new_zeros(0)) if return_inverse else coords
    size = (coords.max(0).values + 1).tolist()
    key = ((coords[:, 0] * size[1] + coords[:, 1]) * size[2] + coords[:, 2]) * size[3] + coords[:, 3]
    key, inverse = torch.unique(key, return_inverse=True)
    out = torch.empty((key.numel(), 4), dtype=coords.dtype, device=coords.device)
    for d in (3, 2, 1):
        out[:, d] = key % size[d]
        key = torch.div(key, size[d], rounding_mode="floor")
    out[:, 0] = key
    return (out, inverse) if return_inverse else out


def build_subm_map(coords: torch.Tensor, kernel_size: int) -> KernelMap:
    """Submanifold map: output coords = input coords; ``(N, 4)`` int64 coords -> :class:`KernelMap`.

    Pairs are listed in key order (spatially coherent), which keeps the gathers cache-friendly.
    """
    index = CoordIndex(coords, pad=kernel_size // 2)
    offs = kernel_offsets(kernel_size, centered=True, device=coords.device)
    table = index.find(index.keys[None, :] + index.delta(offs)[:, None])  # (K, N), column j = row order[j]
    centre = offs.shape[0] // 2
    in_idx, out_idx, groups = _pairs_from_table(table, index.order, skip=centre)
    return KernelMap(coords.shape[0], coords.shape[0], in_idx, out_idx, groups, identity_k=centre)


def build_down_map(coords: torch.Tensor, kernel_size: int, stride: int):
    """Strided conv map (padding 0): output ``p`` covers inputs ``p * stride + d``, ``d in [0, kernel_size)^3``.

    Output coords are every ``p >= 0`` that covers at least one input (for kernel = stride: ``unique(coords // s)``
    per batch), sorted by (b, x, y, z). Returns ``(out_coords (M, 4) int64, KernelMap)``.
    """
    if kernel_size == stride:
        # Every input lies in exactly one window: its offset is coords % s, no lookup needed.
        q = coords.clone()
        q[:, 1:] = torch.div(coords[:, 1:], stride, rounding_mode="floor")
        rem = coords[:, 1:] - q[:, 1:] * stride
        k = (rem[:, 0] * stride + rem[:, 1]) * stride + rem[:, 2]
        out_coords, inverse = unique_coords(q, return_inverse=True)
        k_sorted, perm = torch.sort(k, stable=True)
        kmap = KernelMap(coords.shape[0], out_coords.shape[0], perm, inverse[perm],
                         _groups(torch.bincount(k_sorted, minlength=stride ** 3)))
        return out_coords, kmap
    offs = kernel_offsets(kernel_size, centered=False, device=coords.device)
    cand = coords[None].repeat(offs.shape[0], 1, 1)
    cand[:, :, 1:] -= offs[:, None, :]
    ok = ((cand[:, :, 1:] >= 0) & (cand[:, :, 1:] % stride == 0)).all(-1)
    cand = cand[ok]
    cand[:, 1:] = torch.div(cand[:, 1:], stride, rounding_mode="floor")
    out_coords = unique_coords(cand)
    index = CoordIndex(coords, pad=kernel_size)
    base = out_coords.clone()
    base[:, 1:] *= stride
    bkeys = linear_keys(base, index.mult) + index.pad * int(index.mult[1:].sum())
    table = index.find(bkeys[None, :] + index.delta(offs)[:, None])  # (K, M)
    in_idx, out_idx, groups = _pairs_from_table(table)
    return out_coords, KernelMap(coords.shape[0], out_coords.shape[0], in_idx, out_idx, groups)


_WORKSPACE = threading.local()


def _buffer(slot: int, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A ``(rows, cols)`` scratch tensor reused across calls (CPU only).

    Fresh multi-MB allocations are returned to the OS and page-faulted back in on every call, which costs as much
    as the gather itself; intermediate pair buffers are never returned nor saved for backward, so they can be
    reused. Per thread; :func:`release_workspace` frees them.
    """
    if like.device.type != "cpu":
        return like.new_empty((rows, cols))
    bufs = _WORKSPACE.__dict__.setdefault("bufs", {})
    n = rows * cols
    # A buffer made under inference_mode cannot be written outside it (and vice versa): keep one per mode.
    key = (slot, torch.is_inference_mode_enabled())
    buf = bufs.get(key)
    if buf is None or buf.numel() < n or buf.dtype != like.dtype:
        buf = bufs[key] = torch.empty(int(n * 1.25) + 1024, dtype=like.dtype)
    return buf[:n].view(rows, cols)


def release_workspace():
    """Free this thread's scratch buffers."""
    _WORKSPACE.__dict__.pop("bufs", None)


def _gather(src: torch.Tensor, idx: torch.Tensor, slot: int) -> torch.Tensor:
    return torch.index_select(src, 0, idx, out=_buffer(slot, idx.numel(), src.shape[1], src))


def _per_offset_mm(g: torch.Tensor, groups, w: torch.Tensor, transpose_w: bool, slot: int) -> torch.Tensor:
    """``y[s:e] = g[s:e] @ W_k^T`` (``transpose_w``, forward) or ``g[s:e] @ W_k`` (input gradient) per offset group.

    ``w``: ``(Cout, K, Cin)``. Returns ``(P, Cout)`` (or ``(P, Cin)``), in scratch slot ``slot``.
    """
    y = _buffer(slot, g.shape[0], w.shape[0] if transpose_w else w.shape[2], g)
    for k, s, e in groups:
        wk = w[:, k, :]
        torch.mm(g[s:e], wk.t() if transpose_w else wk, out=y[s:e])
    return y


def _reduce(m: KernelMap, side: str, y: torch.Tensor) -> torch.Tensor:
    """Sum pair rows ``y (P, C)`` into the ``side`` rows: a 0/1 CSR product on CPU, ``index_add_`` elsewhere."""
    n = m.n_out if side == "out" else m.n_in
    if y.shape[0] == 0:
        return y.new_zeros((n, y.shape[1]))
    if y.device.type == "cpu":
        if y.dtype not in (torch.float32, torch.float64):  # MKL's CSR product has no bfloat16 / float16 kernel
            return torch.sparse.mm(m.reducer(side, torch.float32), y.float()).to(y.dtype)
        return torch.sparse.mm(m.reducer(side, y.dtype), y)
    return y.new_zeros((n, y.shape[1])).index_add_(0, m.out_idx if side == "out" else m.in_idx, y)


class SparseConvFunction(torch.autograd.Function):
    """``out (N_out, Cout) = conv(x (N_in, Cin), weight (Cout, K, Cin), kmap)`` with a hand-written backward.

    The backward reuses the forward's kernel map and does gather / GEMM / reduce directly, without recording an
    autograd graph of many small ops; the gathered inputs are recomputed there rather than kept alive. With
    ``native`` (and a CPU float32 layer the kernel handles, :func:`haskd.sparse.native.handles`, which decides
    the forward and the backward apart), the pairs are summed by the fused C kernel instead of the three passes; the
    centre offset stays one GEMM either way.
    """

    @staticmethod
    def forward(ctx, x, weight, kmap: KernelMap, native: bool = False):
        ctx.kmap = kmap
        ctx.native = native and _native.handles(x, weight, forward=False)
        ctx.save_for_backward(x, weight)
        if native and _native.handles(x, weight):
            out = _centre_or_zeros(x, weight, kmap.identity_k, kmap.n_out, forward=True)
            _native.conv_pairs(x, weight.permute(1, 2, 0).contiguous(), kmap.in_idx, kmap.out_idx,
                               kmap.group_table, out)
            return out
        y = _per_offset_mm(_gather(x, kmap.in_idx, 0), kmap.groups, weight, True, 1)
        out = _reduce(kmap, "out", y)
        if kmap.identity_k is not None:  # centre of a submanifold kernel: a plain matmul, no gather/scatter
            out.addmm_(x, weight[:, kmap.identity_k, :].t())
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # a backward called inside autocast
            gx, gw = (SparseConvFunction._backward_native if ctx.native else SparseConvFunction._backward)(
                ctx, grad_out)
            return gx, gw, None, None

    @staticmethod
    def _backward_native(ctx, grad_out):
        x, weight = ctx.saved_tensors
        m: KernelMap = ctx.kmap
        grad_out = grad_out.to(x.dtype).contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:  # the same kernel over the swapped pairs, by W_k^T
            gx = _centre_or_zeros(grad_out, weight, m.identity_k, m.n_in, forward=False)
            _native.conv_pairs(grad_out, weight.permute(1, 0, 2).contiguous(), m.out_idx, m.in_idx,
                               m.group_table, gx)
        if ctx.needs_input_grad[1]:
            gw = weight.new_zeros((weight.shape[1], weight.shape[2], weight.shape[0]))  # (K, Cin, Cout)
            _native.weight_grad_pairs(x, grad_out, m.in_idx, m.out_idx, m.group_table, gw)
            if m.identity_k is not None:
                torch.mm(x.t(), grad_out, out=gw[m.identity_k])
            gw = gw.permute(2, 0, 1)
        return gx, gw

    @staticmethod
    def _backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        m: KernelMap = ctx.kmap
        grad_out = grad_out.to(x.dtype).contiguous()
        gx = gw = None
        go = _gather(grad_out, m.out_idx, 0)  # shared by both gradients
        if ctx.needs_input_grad[0]:
            gx = _reduce(m, "in", _per_offset_mm(go, m.groups, weight, False, 1))
            if m.identity_k is not None:
                gx.addmm_(grad_out, weight[:, m.identity_k, :])
        if ctx.needs_input_grad[1]:
            # (K, Cout, Cin) so that every offset's slice is contiguous for mm(out=...)
            gw = weight.new_zeros((weight.shape[1], weight.shape[0], weight.shape[2]))
            xi = _gather(x, m.in_idx, 2)
            for k, s, e in m.groups:
                torch.mm(go[s:e].t(), xi[s:e], out=gw[k])
            if m.identity_k is not None:
                torch.mm(grad_out.t(), x, out=gw[m.identity_k])
            gw = gw.permute(1, 0, 2)
        return gx, gw


def _centre_or_zeros(x, weight, identity_k, n_rows, forward: bool):
    """Where the native kernel adds the pairs: the centre offset's GEMM (a submanifold map; ``x @ W_c^T`` forward,
    ``x @ W_c`` for the input gradient), else zeros. ``weight (Cout, K, Cin)``."""
    if identity_k is None:
        return x.new_zeros((n_rows, weight.shape[0] if forward else weight.shape[2]))
    wc = weight[:, identity_k, :]
    return torch.mm(x, wc.t() if forward else wc)


def sparse_conv(x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, native: bool = False) -> torch.Tensor:
    """Apply a kernel map: ``x (N_in, Cin)``, ``weight (Cout, kx, ky, kz, Cin)`` -> ``(N_out, Cout)``. ``native``:
    the fused C kernel where it handles the layer (:mod:`haskd.sparse.native`; CPU float32), else the passes here.

    Under ``torch.autocast`` (mixed precision, ``optim.amp``) the op runs in the autocast dtype, as autocast runs a
    linear layer: input and weight are cast once here and the ops inside run with autocast off. Left to autocast,
    the per-offset ``mm(out=...)`` stay float32 (no speed-up) while the CPU CSR reduction (``sparse.mm``) is cast to
    bfloat16, for which MKL has no kernel. The weight's gradient flows back through the cast to the float32
    parameter. Outside autocast, the inputs' own dtypes are used.
    """
    w = weight.reshape(weight.shape[0], -1, weight.shape[-1])
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return SparseConvFunction.apply(x.to(dt).contiguous(), w.to(dt), kmap, native)
    return SparseConvFunction.apply(x.contiguous(), w, kmap, native)
