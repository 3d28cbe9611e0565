"""Adapter that runs haskd's sparse conv layers through spconv 2.x (optional: ``pip install spconv``, ``spconv-cu120``).

The layer keeps its own weight (spconv layout ``(Cout, kx, ky, kz, Cin)``, the same tensor the torch backend uses);
spconv's module is only a cached, unregistered shell that is handed that weight at every call, so switching
backends never touches the state dict. Kernel maps live in spconv's ``indice_dict``, which we keep in the
:class:`~haskd.sparse.SparseTensor` cache so that every conv of one forward shares it (spconv's ``indice_key``).

CPU caveats of spconv 2.3.8 (see docs/sparse.md): its CPU submanifold conv gives wrong, run-to-run different
numbers with more than one thread, so the forward runs with ``torch.set_num_threads(1)`` (restored after); its
backward calls CUDA-only code, so a CPU backward raises :class:`~haskd.errors.HaskdError` instead of a crash.
"""
from __future__ import annotations

import importlib.util

import torch

from ..errors import HaskdError, require

# Level-0 spatial extent is rounded up to this so that every stride-2 level below it has an even size: spconv drops
# outputs beyond floor((L - k) / s) + 1, which would lose the last voxel row when L is odd.
SPATIAL_ALIGN = 64


def available() -> bool:
    """True when spconv can be imported (checked without importing it)."""
    return importlib.util.find_spec("spconv") is not None


def import_spconv():
    return require("spconv.pytorch", "spconv (CPU wheel) or spconv-cu120 (CUDA)")


class _RefuseCpuBackward(torch.autograd.Function):
    """Identity whose backward raises: spconv's CPU backward needs CUDA and would crash with an obscure error."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        raise HaskdError(
            "the spconv backend cannot train on CPU (spconv 2.3.8's backward needs CUDA): "
            "use backend='torch' on CPU, or run on a GPU")


def _spatial_shape(x) -> list:
    if x.spatial_shape is not None:
        return list(x.spatial_shape)
    hi = x.coords[:, 1:].max(0).values + 3 if x.coords.shape[0] else torch.zeros(3, dtype=torch.int64)
    return [int(-(-int(v) // SPATIAL_ALIGN) * SPATIAL_ALIGN) for v in hi.tolist()]


def _module(layer, kind: str, indice_key: str):
    """spconv module shell for ``layer``, cached per indice key (not registered: no parameters, no state)."""
    mods = layer.__dict__.setdefault("_spconv_shells", {})
    if indice_key not in mods:
        spconv = import_spconv()
        cin, cout, k = layer.in_channels, layer.out_channels, layer.kernel_size
        if kind == "subm":
            m = spconv.SubMConv3d(cin, cout, k, bias=False, indice_key=indice_key)
        elif kind == "down":
            m = spconv.SparseConv3d(cin, cout, k, stride=layer.stride, bias=False, indice_key=indice_key)
        else:
            m = spconv.SparseInverseConv3d(cin, cout, k, bias=False, indice_key=indice_key)
        # Drop spconv's own weight: ours is passed in at every call.
        m.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        mods[indice_key] = m
    return mods[indice_key]


def conv(layer, x, kind: str, indice_key: str, out_stride: int):
    """Run ``layer`` (a haskd sparse conv) on SparseTensor ``x`` with spconv -> ``(feats, coords, spatial_shape)``.

    ``kind``: ``'subm'``, ``'down'`` or ``'inverse'``; coords are returned as ``(M, 4)`` int64.
    """
    spconv = import_spconv()
    shell = _module(layer, kind, indice_key)
    batch_size = int(x.coords[:, 0].max()) + 1 if x.coords.shape[0] else 1
    indice_dict = x.cache.setdefault("spconv_indice_dict", {})
    st = spconv.SparseConvTensor(x.feats, x.coords.int(), _spatial_shape(x), batch_size, indice_dict=indice_dict)
    cpu = x.feats.device.type == "cpu"
    old_threads = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)  # spconv 2.3.8 CPU subm conv is wrong/nondeterministic with >1 thread
    try:
        shell._parameters["weight"] = layer.weight  # ours, every call (a .to() may have replaced it)
        out = shell(st)
    finally:
        if cpu:
            torch.set_num_threads(old_threads)
    indice_dict.update(out.indice_dict)  # spconv hands a copy to its output; keep new maps for later layers
    feats = out.features
    if cpu and feats.requires_grad:
        feats = _RefuseCpuBackward.apply(feats)
    coords = x.coords if kind == "subm" else out.indices.long()
    return feats, coords, list(out.spatial_shape)
