"""SpUNet: the sparse-conv UNet student (MinkUNet / Pointcept SpUNet family), on :mod:`haskd.sparse`.

Layout (strides in voxels of the input grid)::

    stem      subm conv k3 + BN + ReLU                                   stride 1, stem_channels
    enc[i]    down conv k2 s2 + BN + ReLU, layers[i] residual blocks      stride 2^(i+1), channels[i]
    dec[j]    inverse conv k2 + BN + ReLU (back to enc level's voxels),
              concat the skip of that level, dec_layers[j] residual blocks  dec_channels[j]
    head      linear on the last decoder feature                          stride 1, num_classes

Residual block = subm conv + BN + ReLU + subm conv + BN, plus the input (through a linear + BN when widths differ),
then ReLU. The submanifold kernel maps are built once per level and the down maps are reused by the matching up
convs (see :class:`haskd.sparse.SparseTensor`).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from ..errors import HaskdError
from ..sparse import SparseConv3d, SparseInverseConv3d, SparseTensor, SubMConv3d, set_backend
from ..sparse.torch_backend import unique_coords

SPUNET_PRESETS: Dict[str, dict] = {
    # Quick CPU experiments and tests.
    "tiny": dict(channels=(16, 32, 64, 128), layers=(1, 1, 1, 1)),
    # The default student (MinkUNet18-like widths with a symmetric decoder).
    "small": dict(channels=(32, 64, 128, 256), layers=(2, 2, 2, 2)),
    # MinkUNet34C-like: deeper encoder, decoder widths (256, 128, 96, 96); the usual GPU student.
    "base": dict(channels=(32, 64, 128, 256), layers=(2, 3, 4, 6), dec_channels=(256, 128, 96, 96),
                 dec_layers=(2, 2, 2, 2)),
}


def _bn(c):
    return nn.BatchNorm1d(c, eps=1e-3, momentum=0.01)


class BasicBlock(nn.Module):
    """Residual block on a :class:`SparseTensor`: ``(N, cin) -> (N, cout)``, same voxels."""

    def __init__(self, cin: int, cout: int, backend: str = "auto"):
        super().__init__()
        self.conv1, self.bn1 = SubMConv3d(cin, cout, 3, backend=backend), _bn(cout)
        self.conv2, self.bn2 = SubMConv3d(cout, cout, 3, backend=backend), _bn(cout)
        self.proj = None if cin == cout else nn.Sequential(nn.Linear(cin, cout, bias=False), _bn(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: SparseTensor) -> SparseTensor:
        shortcut = x.feats if self.proj is None else self.proj(x.feats)
        h = x.replace_feats(self.act(self.bn1(self.conv1(x).feats)))
        h = self.bn2(self.conv2(h).feats)
        return x.replace_feats(self.act(h + shortcut))


class _ConvBNReLU(nn.Module):
    def __init__(self, conv: nn.Module, cout: int):
        super().__init__()
        self.conv, self.bn, self.act = conv, _bn(cout), nn.ReLU(inplace=True)

    def forward(self, x: SparseTensor) -> SparseTensor:
        y = self.conv(x)
        return y.replace_feats(self.act(self.bn(y.feats)))


class SpUNet(nn.Module):
    """Sparse-conv UNet for point-cloud semantic segmentation.

    Args:
        in_channels: input feature width ``Cin`` (e.g. 3 for colour, 6 with normals).
        num_classes: output logits width.
        channels / layers: encoder width and block count per stage (each stage halves the resolution).
        backend: sparse conv backend, ``'auto'`` | ``'torch'`` | ``'spconv'`` (see :mod:`haskd.sparse`).
        stem_channels: width of the full-resolution stem (default ``channels[0]``).
        dec_channels / dec_layers: decoder width and blocks per stage, deepest first (default: mirror the encoder:
            ``(channels[-2], ..., channels[0], stem_channels)`` with ``layers`` reversed).

    ``forward(batch)`` reads ``grid_coord (N, 3)`` int64, ``feat (N, Cin)`` float, ``offset (B,)`` int64 cumulative
    voxel counts and returns ``{"logits": (N, num_classes), "feat": (N, feat_dim)}`` in the input voxel order.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (32, 64, 128, 256),
                 layers: Sequence[int] = (2, 2, 2, 2), backend: str = "auto", stem_channels: int | None = None,
                 dec_channels: Sequence[int] | None = None, dec_layers: Sequence[int] | None = None):
        super().__init__()
        channels, layers = tuple(channels), tuple(layers)
        if len(channels) != len(layers) or not channels:
            raise HaskdError(f"spunet: channels {channels} and layers {layers} need the same (non-zero) length")
        n = len(channels)
        stem_channels = int(stem_channels or channels[0])
        dec_channels = tuple(dec_channels) if dec_channels else tuple(channels[-2::-1]) + (stem_channels,)
        dec_layers = tuple(dec_layers) if dec_layers else tuple(layers[::-1])
        if len(dec_channels) != n or len(dec_layers) != n:
            raise HaskdError(f"spunet: dec_channels {dec_channels} / dec_layers {dec_layers} need {n} entries")
        self.backend = backend
        self.in_channels, self.num_classes = in_channels, num_classes

        self.stem = _ConvBNReLU(SubMConv3d(in_channels, stem_channels, 3, backend=backend), stem_channels)
        skip_widths = [stem_channels]  # width at stride 1, 2, 4, ...
        self.down, self.enc = nn.ModuleList(), nn.ModuleList()
        prev = stem_channels
        for i in range(n):
            self.down.append(_ConvBNReLU(SparseConv3d(prev, channels[i], 2, 2, key=f"enc{i}", backend=backend),
                                         channels[i]))
            self.enc.append(nn.Sequential(*[BasicBlock(channels[i], channels[i], backend) for _ in range(layers[i])]))
            prev = channels[i]
            skip_widths.append(prev)

        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        for j in range(n):
            level = n - 1 - j  # going back to the voxels that enc[level]'s down conv started from
            cout = dec_channels[j]
            self.up.append(_ConvBNReLU(SparseInverseConv3d(prev, cout, 2, key=f"enc{level}", backend=backend), cout))
            blocks = [BasicBlock(cout + skip_widths[level], cout, backend)]
            blocks += [BasicBlock(cout, cout, backend) for _ in range(dec_layers[j] - 1)]
            self.dec.append(nn.Sequential(*blocks))
            prev = cout
        self.feat_dim = prev
        self.head = nn.Linear(prev, num_classes)
        self._hint_strides = (2 ** n, *(2 ** (n - 1 - j) for j in range(n)))
        self._hint_dims = (channels[-1], *dec_channels)

    def hint_levels(self) -> list:
        """The levels the hint term of IHD aligns (:mod:`haskd.distill.hints`): ``(module, stride, dim)`` for the
        deepest encoder level, then every decoder level, coarse to fine (the last one's features are ``feat``).
        Each module returns a :class:`SparseTensor` whose coords are that level's voxels (input coords // stride)."""
        mods = [self.enc[-1], *self.dec]
        return list(zip(mods, self._hint_strides, self._hint_dims))

    @property
    def hint_dims(self) -> tuple:
        return tuple(d for _, _, d in self.hint_levels())

    @property
    def hint_strides(self) -> tuple:
        return tuple(s for _, s, _ in self.hint_levels())

    def set_backend(self, backend: str) -> "SpUNet":
        """Run every sparse conv with ``backend`` from now on (weights unchanged)."""
        return set_backend(self, backend)

    def forward(self, batch: dict) -> dict:
        x = SparseTensor.from_batch(batch["grid_coord"], batch["feat"], batch["offset"])
        x = self.stem(x)
        skips = [x]
        for down, enc in zip(self.down, self.enc):
            x = enc(down(x))
            skips.append(x)
        skips.pop()  # the deepest level is x itself
        for up, dec in zip(self.up, self.dec):
            x = up(x)
            skip = skips.pop()
            x = dec(x.replace_feats(torch.cat([x.feats, skip.feats], 1)))
        return {"logits": self.head(x.feats), "feat": x.feats}


# ----------------------------------------------------------------------------------------------------------------
# Step-time benchmark: python -m haskd.models.spunet --voxels 50000 --threads 2 [--backend torch] [--preset small]
# ----------------------------------------------------------------------------------------------------------------

def synthetic_room(n_voxels: int = 50000, seed: int = 0) -> torch.Tensor:
    """Surface voxels of a box room with a floor, four walls and a few tables: ``(n_voxels, 3)`` int64.

    Indoor scans are 2D manifolds in 3D (about 9 neighbours per voxel in a 3x3x3 window), which is what sets the
    cost of a sparse conv; a random cloud of the same size would be far cheaper and not representative.
    """
    gen = torch.Generator().manual_seed(seed)
    scale = max(0.1, (n_voxels / 45000) ** 0.5)
    plane = lambda a, b: torch.stack(torch.meshgrid(a, b, indexing="ij"), -1).reshape(-1, 2)  # noqa: E731
    while True:
        sx, sy, sz = int(120 * scale), int(95 * scale), max(4, int(50 * scale))
        ax = [torch.arange(s) for s in (sx, sy, sz)]
        xy, xz, yz = plane(ax[0], ax[1]), plane(ax[0], ax[2]), plane(ax[1], ax[2])
        parts = [torch.cat([xy, torch.zeros(len(xy), 1, dtype=torch.long)], 1)]  # floor
        for x0 in (0, sx - 1):
            parts.append(torch.cat([torch.full((len(yz), 1), x0), yz], 1))
        for y0 in (0, sy - 1):
            parts.append(torch.stack([xz[:, 0], torch.full((len(xz),), y0), xz[:, 1]], 1))
        for _ in range(6):  # table tops (a fifth of the room's width at most) at 30% of its height
            w = (torch.rand(2, generator=gen) * 0.12 + 0.08) * torch.tensor([sx, sy])
            o = torch.rand(2, generator=gen) * (torch.tensor([sx, sy]) - w - 2) + 1
            top = plane(torch.arange(int(w[0]) + 1) + int(o[0]), torch.arange(int(w[1]) + 1) + int(o[1]))
            parts.append(torch.cat([top, torch.full((len(top), 1), max(1, int(0.3 * sz)))], 1))
        vox = torch.cat(parts)
        vox = unique_coords(torch.cat([torch.zeros(len(vox), 1, dtype=torch.long), vox], 1))[:, 1:]
        if len(vox) >= n_voxels:
            return vox[torch.randperm(len(vox), generator=gen)[:n_voxels]]
        scale *= 1.05


def benchmark_step(n_voxels=50000, preset="small", backend="torch", threads=2, steps=5, warmup=2, in_channels=3,
                   num_classes=20):
    """Median wall time (s) of forward, backward and one full SGD step of SpUNet on :func:`synthetic_room`."""
    import time

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        grid = synthetic_room(n_voxels)
        batch = dict(grid_coord=grid, feat=torch.rand(len(grid), in_channels), offset=torch.tensor([len(grid)]))
        target = torch.randint(0, num_classes, (len(grid),))
        model = SpUNet(in_channels, num_classes, backend=backend, **SPUNET_PRESETS[preset])
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        fwd, bwd, tot = [], [], []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(batch)["logits"], target)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t2 = time.perf_counter()
            if i >= warmup:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
                tot.append(t2 - t0)
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        return dict(voxels=len(grid), forward=med(fwd), backward=med(bwd), step=med(tot), min_step=min(tot))
    finally:
        torch.set_num_threads(old)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Time a SpUNet training step on a synthetic room.")
    ap.add_argument("--voxels", type=int, default=50000)
    ap.add_argument("--preset", default="small", choices=sorted(SPUNET_PRESETS))
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    r = benchmark_step(a.voxels, a.preset, a.backend, a.threads, a.steps)
    print(f"{a.preset} {a.backend} {r['voxels']} voxels, {a.threads} threads: forward {r['forward']:.3f} s, "
          f"backward+step {r['backward']:.3f} s, step {r['step']:.3f} s (median of {a.steps}; min {r['min_step']:.3f})")
