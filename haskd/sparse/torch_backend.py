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
import warnings

import torch


def kernel_offsets(kernel_size: int, centered: bool, device=None) -> torch.Tensor:
    """Offsets of a cubic kernel, ``(K, 3)`` int64, x-major. Centered (submanifold): ``-k//2 .. k//2``; else ``0..k-1``."""
    start = -(kernel_size // 2) if centered else 0
    r = range(start, start + kernel_size)
    return torch.tensor(list(itertools.product(r, r, r)), dtype=torch.int64, device=device)


class CoordHash:
    """Sorted int64 keys of ``(N, 4)`` coords ``[b, x, y, z]`` for vectorised lookups (``searchsorted``).

    Coordinates are packed as ``((b * Sx + x) * Sy + y) * Sz + z`` with ``S = max + 1`` per axis, so every coordinate
    inside the box has a unique key; queries outside the box are rejected before packing.
    """

    def __init__(self, coords: torch.Tensor):
        self.n = coords.shape[0]
        self.maxc = coords.max(0).values if self.n else torch.zeros(4, dtype=torch.int64, device=coords.device)
        self.size = self.maxc + 1
        if bool((coords.min(0).values < 0).any()) if self.n else False:
            raise ValueError("sparse coords must be non-negative")
        keys = self.pack(coords)
        self.keys, self.order = torch.sort(keys)

    def pack(self, c: torch.Tensor) -> torch.Tensor:
        s = self.size
        return ((c[..., 0] * s[1] + c[..., 1]) * s[2] + c[..., 2]) * s[3] + c[..., 3]

    def lookup(self, q: torch.Tensor) -> torch.Tensor:
        """Rows of the hashed coords equal to each query ``(..., 4)``; -1 where absent. Returns ``(...)`` int64."""
        inside = ((q >= 0) & (q <= self.maxc)).all(-1)
        key = self.pack(torch.where(inside[..., None], q, torch.zeros_like(q)))
        if self.n == 0:
            return torch.full(key.shape, -1, dtype=torch.int64, device=q.device)
        pos = torch.searchsorted(self.keys, key).clamp_(max=self.n - 1)
        hit = inside & (self.keys[pos] == key)
        return torch.where(hit, self.order[pos], torch.full_like(pos, -1))


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
        self.in_idx, self.out_idx = in_idx, out_idx
        self.groups = groups
        self.identity_k = identity_k
        self._csr = {}

    @property
    def num_pairs(self) -> int:
        return int(self.in_idx.numel()) + (self.n_out if self.identity_k is not None else 0)

    def transposed(self) -> "KernelMap":
        """The same pairs with input and output swapped (inverse conv, and the input gradient)."""
        t = KernelMap(self.n_out, self.n_in, self.out_idx, self.in_idx, self.groups, self.identity_k)
        swap = {"in": "out", "out": "in"}
        t._csr = {(swap[side], dt): v for (side, dt), v in self._csr.items()}
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


def _pairs_from_table(table: torch.Tensor, skip=None):
    """Turn a ``(K, N_out)`` table of input rows (-1 = none) into ``(in_idx, out_idx, groups)``."""
    hit = table >= 0
    if skip is not None:
        hit[skip] = False
    k_idx, out_idx = hit.nonzero(as_tuple=True)  # one call for all offsets: sorted by offset, then output row
    in_idx = table[k_idx, out_idx]
    counts = torch.bincount(k_idx, minlength=table.shape[0]).tolist()
    groups, start = [], 0
    for k, cnt in enumerate(counts):
        if cnt:  # empty offsets cost nothing later
            groups.append((k, start, start + cnt))
            start += cnt
    return in_idx, out_idx, groups


def unique_coords(coords: torch.Tensor) -> torch.Tensor:
    """Sorted unique rows of ``(N, 4)`` int64 coords (1-D unique on packed keys: ``unique(dim=0)`` is slow on CPU)."""
    if coords.shape[0] == 0:
        return coords
    size = coords.max(0).values + 1
    key = ((coords[:, 0] * size[1] + coords[:, 1]) * size[2] + coords[:, 2]) * size[3] + coords[:, 3]
    key = torch.unique(key)
    out = torch.empty((key.numel(), 4), dtype=coords.dtype, device=coords.device)
    for d in (3, 2, 1):
        out[:, d] = key % size[d]
        key = torch.div(key, size[d], rounding_mode="floor")
    out[:, 0] = key
    return out


def build_subm_map(coords: torch.Tensor, kernel_size: int, hash_: CoordHash | None = None) -> KernelMap:
    """Submanifold map: output coords = input coords; ``(N, 4)`` int64 coords -> :class:`KernelMap`."""
    h = hash_ or CoordHash(coords)
    offs = kernel_offsets(kernel_size, centered=True, device=coords.device)
    q = coords[None, :, :].clone().repeat(offs.shape[0], 1, 1)
    q[:, :, 1:] += offs[:, None, :]
    table = h.lookup(q)  # (K, N)
    centre = offs.shape[0] // 2 if kernel_size % 2 == 1 else None
    in_idx, out_idx, groups = _pairs_from_table(table, skip=centre)
    return KernelMap(coords.shape[0], coords.shape[0], in_idx, out_idx, groups, identity_k=centre)


def build_down_map(coords: torch.Tensor, kernel_size: int, stride: int):
    """Strided conv map (padding 0): output ``p`` covers inputs ``p * stride + d``, ``d in [0, kernel_size)^3``.

    Output coords are every ``p >= 0`` that covers at least one input (for kernel = stride: ``unique(coords // s)``
    per batch), sorted by (b, x, y, z). Returns ``(out_coords (M, 4) int64, KernelMap)``.
    """
    offs = kernel_offsets(kernel_size, centered=False, device=coords.device)
    if kernel_size == stride:
        out_coords = coords.clone()
        out_coords[:, 1:] = torch.div(coords[:, 1:], stride, rounding_mode="floor")
        out_coords = unique_coords(out_coords)
    else:
        cand = coords[None].repeat(offs.shape[0], 1, 1)
        cand[:, :, 1:] -= offs[:, None, :]
        ok = ((cand[:, :, 1:] >= 0) & (cand[:, :, 1:] % stride == 0)).all(-1)
        cand = cand[ok]
        cand[:, 1:] = torch.div(cand[:, 1:], stride, rounding_mode="floor")
        out_coords = unique_coords(cand)
    h = CoordHash(coords)
    q = out_coords[None].repeat(offs.shape[0], 1, 1)
    q[:, :, 1:] = q[:, :, 1:] * stride + offs[:, None, :]
    table = h.lookup(q)  # (K, M)
    in_idx, out_idx, groups = _pairs_from_table(table)
    return out_coords, KernelMap(coords.shape[0], out_coords.shape[0], in_idx, out_idx, groups)


def _gemm_pairs(src: torch.Tensor, idx: torch.Tensor, groups, w: torch.Tensor, transpose_w: bool) -> torch.Tensor:
    """Gather ``src[idx]`` then multiply each offset's slice by its weight. ``w``: ``(Cout, K, Cin)``.

    ``transpose_w=True`` computes ``x @ W_k^T`` (forward, Cin -> Cout); False computes ``g @ W_k`` (input grad).
    Returns ``(P, C')``.
    """
    g = src.index_select(0, idx)
    c_out = w.shape[0] if transpose_w else w.shape[2]
    y = src.new_empty((idx.numel(), c_out))
    for k, s, e in groups:
        wk = w[:, k, :]
        torch.mm(g[s:e], wk.t() if transpose_w else wk, out=y[s:e])
    return y


def _reduce(m: KernelMap, side: str, y: torch.Tensor, n: int) -> torch.Tensor:
    if y.shape[0] == 0:
        return y.new_zeros((n, y.shape[1]))
    return torch.sparse.mm(m.reducer(side, y.dtype), y) if y.device.type == "cpu" else (
        y.new_zeros((n, y.shape[1])).index_add_(0, m.out_idx if side == "out" else m.in_idx, y))


class SparseConvFunction(torch.autograd.Function):
    """``out (N_out, Cout) = conv(x (N_in, Cin), weight (Cout, K, Cin), kmap)`` with a hand-written backward.

    The backward reuses the forward's kernel map and does gather / GEMM / reduce directly, without recording an
    autograd graph of many small ops; the gathered inputs are recomputed there rather than kept alive.
    """

    @staticmethod
    def forward(ctx, x, weight, kmap: KernelMap):
        ctx.kmap = kmap
        ctx.save_for_backward(x, weight)
        y = _gemm_pairs(x, kmap.in_idx, kmap.groups, weight, transpose_w=True)
        out = _reduce(kmap, "out", y, kmap.n_out)
        if kmap.identity_k is not None:
            out.addmm_(x, weight[:, kmap.identity_k, :].t())
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        m: KernelMap = ctx.kmap
        grad_out = grad_out.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            dg = _gemm_pairs(grad_out, m.out_idx, m.groups, weight, transpose_w=False)
            gx = _reduce(m, "in", dg, m.n_in)
            if m.identity_k is not None:
                gx.addmm_(grad_out, weight[:, m.identity_k, :])
        if ctx.needs_input_grad[1]:
            # (K, Cout, Cin) so that every offset's slice is contiguous for mm(out=...)
            gw = weight.new_zeros((weight.shape[1], weight.shape[0], weight.shape[2]))
            if m.groups:
                xi = x.index_select(0, m.in_idx)
                go = grad_out.index_select(0, m.out_idx)
                for k, s, e in m.groups:
                    torch.mm(go[s:e].t(), xi[s:e], out=gw[k])
            if m.identity_k is not None:
                torch.mm(grad_out.t(), x, out=gw[m.identity_k])
            gw = gw.permute(1, 0, 2)
        return gx, gw, None


def sparse_conv(x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """Apply a kernel map: ``x (N_in, Cin)``, ``weight (Cout, kx, ky, kz, Cin)`` -> ``(N_out, Cout)``."""
    w = weight.reshape(weight.shape[0], -1, weight.shape[-1])
    return SparseConvFunction.apply(x.contiguous(), w, kmap)
