"""Sparse voxel tensors and 3D sparse convolutions with two interchangeable backends.

- ``torch``: pure PyTorch, see :mod:`haskd.sparse.torch_backend`.
- ``native`` (default on CPU): the torch backend's kernel maps, with the CPU float32 convs of up to 128 x 128
  channels run by a fused C kernel compiled at first use (:mod:`haskd.sparse.native`); elsewhere it is ``torch``.
- ``spconv`` (optional, the usual choice on CUDA): spconv 2.x, see :mod:`haskd.sparse.spconv_backend`.
- ``auto``: spconv when the tensor is on CUDA and spconv is installed, else native when the kernel compiles here,
  else torch.

``torch`` and ``native`` give the same results up to float rounding (the sums run in another order) and share
kernel maps, so a downsampling conv run by one can be inverted by the other.

Both backends read the same weight tensor, stored in spconv 2.x layout ``(Cout, kx, ky, kz, Cin)``, so a state dict
trained with one runs with the other. Kernel maps are built once per level and per forward and kept in the
:class:`SparseTensor`'s ``cache`` dict, which every tensor derived from the input shares; a downsampling conv
records its map under a key so that the matching :class:`SparseInverseConv3d` goes back to exactly the same voxels.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import HaskdError
from . import native, spconv_backend, torch_backend

BACKENDS = ("auto", "torch", "native", "spconv")

__all__ = [
    "BACKENDS", "SparseTensor", "SubMConv3d", "SparseConv3d", "SparseInverseConv3d", "resolve_backend",
    "set_backend", "spconv_available",
]


def spconv_available() -> bool:
    return spconv_backend.available()


def resolve_backend(name: str, device) -> str:
    """``'auto'`` -> ``'spconv'`` on CUDA when installed, ``'native'`` on CPU when its kernel compiles, else
    ``'torch'``; other names are checked and returned."""
    if name not in BACKENDS:
        raise HaskdError(f"unknown sparse backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        if torch.device(device).type == "cuda":
            return "spconv" if spconv_available() else "torch"
        return "native" if native.available() else "torch"
    return name


def _maps_of(backend: str) -> str:
    """Which kernel maps a backend uses: native runs on the torch backend's."""
    return "torch" if backend == "native" else backend


class SparseTensor:
    """Features on sparse voxels.

    Attributes:
        feats: ``(N, C)`` float features, one row per voxel.
        coords: ``(N, 4)`` int64 ``[batch, x, y, z]``, non-negative, unique, in units of this tensor's stride.
        stride: voxel size relative to the input level (1, 2, 4, ...).
        cache: dict shared by every tensor of one forward (kernel maps, downsample records, spconv indice dict).
        spatial_shape: grid extent used by spconv (None until the spconv backend sets it).
    """

    def __init__(self, feats, coords, stride: int = 1, cache: dict | None = None, spatial_shape=None):
        if coords.dim() != 2 or coords.shape[1] != 4 or feats.shape[0] != coords.shape[0]:
            raise ValueError(f"need feats (N, C) and coords (N, 4); got {tuple(feats.shape)} and {tuple(coords.shape)}")
        self.feats = feats
        self.coords = coords.long()
        self.stride = int(stride)
        self.cache = {} if cache is None else cache
        self.spatial_shape = spatial_shape

    @classmethod
    def from_batch(cls, grid_coord: torch.Tensor, feat: torch.Tensor, offset: torch.Tensor) -> "SparseTensor":
        """Build from the collated batch: ``grid_coord (N, 3)`` int64, ``feat (N, C)``, ``offset (B,)`` cumulative."""
        offset = offset.to(grid_coord.device).long()
        counts = torch.diff(offset, prepend=offset.new_zeros(1))
        bidx = torch.repeat_interleave(torch.arange(offset.numel(), device=grid_coord.device), counts)
        return cls(feat, torch.cat([bidx[:, None], grid_coord.long()], 1))

    def replace_feats(self, feats: torch.Tensor) -> "SparseTensor":
        """Same voxels and shared cache, new ``(N, C')`` features."""
        return SparseTensor(feats, self.coords, self.stride, self.cache, self.spatial_shape)

    @property
    def device(self):
        return self.feats.device

    def __repr__(self):
        return f"SparseTensor(n={self.coords.shape[0]}, c={self.feats.shape[1]}, stride={self.stride})"


class _SparseConv(nn.Module):
    """Shared weight handling. ``weight``: ``(Cout, k, k, k, Cin)`` (spconv layout); optional ``bias`` ``(Cout,)``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=False, backend="auto"):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = int(kernel_size), int(stride)
        self.backend = backend
        k = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, k, k, k, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # Same rule as nn.Conv3d's default init (fan_in = Cin * k^3).
        nn.init.kaiming_uniform_(self.weight.view(out_channels, -1), a=math.sqrt(5))

    def _backend(self, x: SparseTensor) -> str:
        return resolve_backend(self.backend, x.device)

    def _native(self, x: SparseTensor) -> bool:
        return self._backend(x) == "native"

    def _finish(self, x, feats, coords, stride, spatial_shape=None):
        if self.bias is not None:
            feats = feats + self.bias
        return SparseTensor(feats, coords, stride, x.cache, spatial_shape)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


class SubMConv3d(_SparseConv):
    """Submanifold conv: output voxels = input voxels; ``(N, Cin) -> (N, Cout)``. Odd ``kernel_size``."""

    def __init__(self, in_channels, out_channels, kernel_size=3, bias=False, backend="auto"):
        if kernel_size % 2 != 1:
            raise ValueError("SubMConv3d needs an odd kernel_size")
        super().__init__(in_channels, out_channels, kernel_size, 1, bias, backend)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self._backend(x) == "spconv":
            f, c, shape = spconv_backend.conv(self, x, "subm", f"subm{x.stride}k{self.kernel_size}", x.stride)
            return self._finish(x, f, c, x.stride, shape)
        key = ("subm", x.stride, self.kernel_size)
        if key not in x.cache:  # one map per level, shared by every conv of that level
            x.cache[key] = torch_backend.build_subm_map(x.coords, self.kernel_size)
        return self._finish(x, torch_backend.sparse_conv(x.feats, self.weight, x.cache[key], self._native(x)),
                            x.coords, x.stride, x.spatial_shape)


class SparseConv3d(_SparseConv):
    """Strided (downsampling) conv, padding 0: ``(N, Cin)`` at stride s -> ``(M, Cout)`` at stride ``s * stride``.

    For ``kernel_size == stride`` the output voxels are ``unique(coords // stride)`` per batch. ``key`` names the
    recorded map for the matching :class:`SparseInverseConv3d` (default: one per input stride).
    """

    def __init__(self, in_channels, out_channels, kernel_size=2, stride=2, bias=False, key=None, backend="auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, bias, backend)
        self.key = key

    def forward(self, x: SparseTensor) -> SparseTensor:
        key = self.key or f"s{x.stride}"
        out_stride = x.stride * self.stride
        backend = _maps_of(self._backend(x))
        rec = x.cache.get(("down", key))
        if rec is not None and (rec["backend"], rec["in_stride"]) != (backend, x.stride):
            raise HaskdError(f"sparse downsample key {key!r} reused for a different level or backend")
        if backend == "spconv":
            f, c, shape = spconv_backend.conv(self, x, "down", f"down_{key}", out_stride)
            x.cache[("down", key)] = dict(backend=backend, in_stride=x.stride, out_stride=out_stride,
                                          kernel_size=self.kernel_size, shape=x.spatial_shape)
            x.cache.setdefault(("down_to", out_stride), key)
            return self._finish(x, f, c, out_stride, shape)
        if rec is None:
            out_coords, kmap = torch_backend.build_down_map(x.coords, self.kernel_size, self.stride)
            rec = dict(backend=backend, in_stride=x.stride, out_stride=out_stride, kernel_size=self.kernel_size,
                       in_coords=x.coords, out_coords=out_coords, kmap=kmap, shape=x.spatial_shape)
            x.cache[("down", key)] = rec
            x.cache.setdefault(("down_to", out_stride), key)
        return self._finish(x, torch_backend.sparse_conv(x.feats, self.weight, rec["kmap"], self._native(x)),
                            rec["out_coords"], out_stride)


class SparseInverseConv3d(_SparseConv):
    """Transposed conv back to the voxels that a :class:`SparseConv3d` came from (spconv's inverse conv).

    ``(M, Cin)`` at stride ``s * r`` -> ``(N, Cout)`` at stride ``s``, on exactly the downsample's input voxels, in
    their order. ``key``: the downsample's key; default: the downsample that produced this tensor's stride.
    """

    def __init__(self, in_channels, out_channels, kernel_size=2, bias=False, key=None, backend="auto"):
        super().__init__(in_channels, out_channels, kernel_size, 1, bias, backend)
        self.key = key

    def forward(self, x: SparseTensor) -> SparseTensor:
        key = self.key or x.cache.get(("down_to", x.stride))
        rec = x.cache.get(("down", key))
        if rec is None:
            raise HaskdError(f"no downsampling conv recorded for key {key!r} (stride {x.stride}) in this forward")
        if rec["kernel_size"] != self.kernel_size or rec["out_stride"] != x.stride:
            raise HaskdError(f"inverse conv does not match downsample {key!r}: kernel {self.kernel_size} vs "
                             f"{rec['kernel_size']}, stride {x.stride} vs {rec['out_stride']}")
        if _maps_of(self._backend(x)) != rec["backend"]:
            raise HaskdError("inverse conv must use the same sparse backend as its downsampling conv")
        if rec["backend"] == "spconv":
            f, c, shape = spconv_backend.conv(self, x, "inverse", f"down_{key}", rec["in_stride"])
            return self._finish(x, f, c, rec["in_stride"], shape)
        if "kmap_t" not in rec:
            rec["kmap_t"] = rec["kmap"].transposed()
        return self._finish(x, torch_backend.sparse_conv(x.feats, self.weight, rec["kmap_t"], self._native(x)),
                            rec["in_coords"], rec["in_stride"], rec["shape"])


def set_backend(module: nn.Module, backend: str) -> nn.Module:
    """Switch every sparse conv inside ``module`` to ``backend`` (weights are shared, nothing else changes)."""
    resolve_backend(backend, "cpu")  # validates the name
    for m in module.modules():
        if isinstance(m, _SparseConv):
            m.backend = backend
    if hasattr(module, "backend"):
        module.backend = backend
    return module
