"""Point Transformer V3-style student (plain PyTorch, CPU and CUDA, no custom kernels).

The design follows PTv3 (Wu et al., CVPR 2024), written from its description:

- **Serialization**: voxels are sorted along space-filling curves (:mod:`haskd.models.serialization`); attention
  runs inside fixed-size *patches* of that order, so its cost is linear in the number of voxels.
- **Patches never cross samples**: every sample is padded up to a multiple of ``patch_size`` on its own, and padded
  keys are masked out, so a sample's output does not depend on the other samples of the batch (eval mode).
- **Order per block**: block j of a stage uses order ``orders[perm[j % K]]``; in training with ``shuffle_orders``
  the permutation is redrawn every forward pass and stage, so different layers cut space differently.
- **Pre-norm block**: ``x += CPE(x)`` (submanifold sparse conv -> Linear -> LayerNorm: the conditional positional
  encoding, there is no relative position bias); ``x += Attn(LN(x))``; ``x += MLP(LN(x))``.
- **Grid pooling** (stride 2): Linear, then max-pool the voxels that share ``grid // 2`` within a sample; the
  cluster index is kept for **unpooling**, which maps the coarse features back and adds the projected skip.

Batch dict in (see ``docs/backbones.md``): ``grid_coord`` (N,3) int64 >= 0, ``feat`` (N,Cin) float32, ``offset``
(B,) int64 cumulative voxel counts. Output: ``{"logits": (N, num_classes), "feat": (N, feat_dim)}``.

The CPE and the stem are :class:`haskd.sparse.SubMConv3d` layers; ``backend`` (``"auto"``, ``"torch"``,
``"spconv"``) picks their implementation, see :mod:`haskd.sparse` (``haskd.sparse.set_backend`` switches a built
model; the weights are the same). Attention is plain ``scaled_dot_product_attention``, which PyTorch dispatches to
its fused kernels on CUDA.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import HaskdError
from ..sparse import SparseTensor, SubMConv3d, resolve_backend, set_backend
from .serialization import MAX_DEPTH, ORDERS, batch_from_offset, serialize

# Serialize with a fixed curve depth (grid coords < 2^16) so that a sample's order never depends on the extent of
# the other samples in the batch (a Hilbert curve's shape changes with its depth).
SERIAL_DEPTH = MAX_DEPTH

PTV3_PRESETS: Dict[str, dict] = {
    # For CPU runs and tests.
    "tiny": dict(enc_channels=(16, 32, 64, 128), enc_depths=(1, 1, 1, 1), dec_channels=(32, 32, 64),
                 dec_depths=(1, 1, 1), num_heads=(1, 2, 4, 8), patch_size=48, drop_path=0.0),
    # The constructor defaults, with stochastic depth.
    "small": dict(enc_channels=(32, 64, 128, 256), enc_depths=(1, 1, 2, 1), dec_channels=(64, 64, 128),
                  dec_depths=(1, 1, 1), num_heads=(2, 4, 8, 16), patch_size=64, drop_path=0.1),
    # The published PTv3 ScanNet configuration (5 stages, ~46M parameters), for GPU runs.
    "base": dict(enc_channels=(32, 64, 128, 256, 512), enc_depths=(2, 2, 2, 6, 2), dec_channels=(64, 64, 128, 256),
                 dec_depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16, 32), dec_num_heads=(4, 4, 8, 16),
                 patch_size=1024, drop_path=0.3, stem_kernel=5),
}


# ----------------------------------------------------------------------------------------------------------------
# The point state passed between layers
# ----------------------------------------------------------------------------------------------------------------
class _Level:
    """Everything about one resolution level that blocks share (computed once per level per forward).

    grid (N,3) int64 in units of this level's ``stride``, batch (N,) int64, offset (B,) int64, coords (N,4) int64 =
    [batch, grid], and per order k ``gather[k]`` (M,) rows of the padded patch list, ``valid[k]`` (M,) bool,
    ``inverse[k]`` (N,) int64. ``cache``: the sparse-conv kernel maps of this level, built by its first conv and
    shared by all the others.
    """

    def __init__(self, grid, batch, offset, orders: Sequence[str], patch_size: int, perm: List[int], stride: int = 1):
        self.grid, self.batch, self.offset, self.stride = grid, batch, offset, stride
        self.coords = torch.cat([batch[:, None], grid], 1)
        self.cache: dict = {}
        self.orders, self.perm = list(orders), perm
        # A sample smaller than a patch is one (masked) patch whatever the padded length, so shrinking the patch
        # to the largest sample changes nothing but the wasted compute at coarse levels and on small scenes.
        counts = torch.diff(offset, prepend=offset.new_zeros(1))
        self.patch_size = max(1, min(patch_size, int(counts.max()) if len(counts) else 1))
        ser = serialize(grid, batch, self.orders, depth=SERIAL_DEPTH)
        self.gather, self.valid, self.inverse = [], [], []
        pad_src, pad_valid = _patch_padding(offset, self.patch_size)
        for k in range(len(self.orders)):
            # Sorting puts samples contiguous and in batch order, so the per-sample padding maps onto it.
            self.gather.append(ser["order"][k][pad_src])
            self.valid.append(pad_valid)
            self.inverse.append(ser["inverse"][k])

    def sparse(self, feats: torch.Tensor) -> SparseTensor:
        """``feats`` (N,C) on this level's voxels as a :class:`SparseTensor` sharing the level's kernel maps."""
        return SparseTensor(feats, self.coords, stride=self.stride, cache=self.cache)

    def order_index(self, block_idx: int) -> int:
        return self.perm[block_idx % len(self.perm)]


def _patch_padding(offset: torch.Tensor, patch_size: int):
    """Per-sample padding of a sorted, sample-contiguous list to whole patches.

    Returns ``src`` (M,) int64 = index into the sorted list of every padded slot (padding repeats the sample's last
    row) and ``valid`` (M,) bool (False on padding); M = sum over samples of ceil(n_b / P) * P.
    """
    counts = torch.diff(offset.long(), prepend=offset.new_zeros(1))
    padded = (counts + patch_size - 1) // patch_size * patch_size
    start = offset - counts
    pad_start = torch.cumsum(padded, 0) - padded
    sample = torch.repeat_interleave(torch.arange(len(counts), device=offset.device), padded)
    j = torch.arange(int(padded.sum()), device=offset.device) - pad_start[sample]
    n = counts[sample]
    valid = j < n
    src = start[sample] + torch.minimum(j, n - 1)
    return src, valid


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth on the residual branch, per voxel row (rows of one sample are not tied together)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], 1).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class SerializedAttention(nn.Module):
    """Multi-head self-attention inside patches of one serialized order.

    ``forward(x (N,C), level, order_k) -> (N,C)``; uses ``F.scaled_dot_product_attention`` on
    (num_patches, heads, P, C/heads) with a key mask only when some patch holds padding.
    """

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise HaskdError(f"attention channels {channels} not divisible by num_heads {num_heads}")
        self.h = num_heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, level: _Level, k: int) -> torch.Tensor:
        n, c = x.shape
        p = level.patch_size
        gather, valid = level.gather[k], level.valid[k]
        qkv = self.qkv(x)[gather].view(-1, p, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        mask = None
        if not bool(valid.all()):
            mask = valid.view(-1, 1, 1, p)  # (patches, 1, 1, P): padded keys get no weight
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        out = out.transpose(1, 2).reshape(-1, c)[valid]  # sorted order, padding dropped
        return self.proj(out[level.inverse[k]])


class Block(nn.Module):
    """Pre-norm PTv3 block: CPE, attention, MLP; all residual. ``forward(x (N,C), level, block_idx) -> (N,C)``."""

    def __init__(self, channels: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        self.cpe_conv = SubMConv3d(channels, channels, 3, bias=True, backend=backend)
        self.cpe_proj = nn.Linear(channels, channels)
        self.cpe_norm = nn.LayerNorm(channels)
        self.norm1 = nn.LayerNorm(channels)
        self.attn = SerializedAttention(channels, num_heads)
        self.norm2 = nn.LayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, level: _Level, block_idx: int) -> torch.Tensor:
        x = x + self.cpe_norm(self.cpe_proj(self.cpe_conv(level.sparse(x)).feats))
        x = x + self.drop_path(self.attn(self.norm1(x), level, level.order_index(block_idx)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class GridPooling(nn.Module):
    """Stride-2 grid pooling: Linear, then reduce the rows sharing ``(batch, grid // 2)``.

    ``forward(x (N,Cin), grid (N,3), batch (N,)) -> (x (M,Cout), grid (M,3), batch (M,), cluster (N,))`` where
    ``cluster[i]`` is the coarse row of fine row i. Coarse rows are sorted by (batch, cell), so they are
    sample-contiguous and independent of the input row order.
    """

    def __init__(self, cin: int, cout: int, reduce: str = "max"):
        super().__init__()
        if reduce not in ("max", "mean"):
            raise HaskdError(f"grid pooling reduce must be 'max' or 'mean', got {reduce!r}")
        self.reduce = "amax" if reduce == "max" else "mean"
        self.proj = nn.Linear(cin, cout)
        self.norm = nn.BatchNorm1d(cout)
        self.act = nn.GELU()

    def forward(self, x, grid, batch):
        cells = torch.cat([batch[:, None], grid // 2], 1)
        uniq, cluster = torch.unique(cells, dim=0, return_inverse=True)  # lexicographic: batch first
        h = self.proj(x)
        out = h.new_zeros(len(uniq), h.shape[1])
        idx = cluster[:, None].expand_as(h)
        out = out.scatter_reduce(0, idx, h, reduce=self.reduce, include_self=False)
        return self.act(self.norm(out)), uniq[:, 1:], uniq[:, 0], cluster


class GridUnpooling(nn.Module):
    """Inverse of :class:`GridPooling`: ``proj(coarse)[cluster] + proj_skip(skip)``.

    ``forward(coarse (M,Cin), skip (N,Cskip), cluster (N,)) -> (N,Cout)``.
    """

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.GELU())
        self.proj_skip = nn.Sequential(nn.Linear(cskip, cout), nn.BatchNorm1d(cout), nn.GELU())

    def forward(self, coarse, skip, cluster):
        return self.proj(coarse)[cluster] + self.proj_skip(skip)


class _Stem(nn.Module):
    """Voxel embedding: submanifold conv -> BatchNorm -> GELU. ``(feats (N,Cin), level) -> (N,C)``."""

    def __init__(self, cin, cout, kernel_size, backend):
        super().__init__()
        self.conv = SubMConv3d(cin, cout, kernel_size, bias=False, backend=backend)
        self.norm = nn.BatchNorm1d(cout)
        self.act = nn.GELU()

    def forward(self, feats, level):
        return self.act(self.norm(self.conv(level.sparse(feats)).feats))


# ----------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------
class PointTransformerV3(nn.Module):
    """PTv3-style U-Net on voxels: ``forward(batch) -> {"logits": (N, num_classes), "feat": (N, feat_dim)}``.

    ``enc_channels``/``enc_depths``/``num_heads`` have one entry per encoder stage (stage s runs at stride 2^s);
    ``dec_channels``/``dec_depths`` (and ``dec_num_heads``, default: the encoder's head width) one per decoder
    stage, from the finest (index 0, whose channels are ``feat_dim``) to the coarsest. ``patch_size``: voxels per
    attention patch. ``orders``: curves from :data:`haskd.models.serialization.ORDERS`. ``backend``: sparse conv
    backend of the CPE and stem convs (``"auto"``, ``"torch"``, ``"spconv"``, see :mod:`haskd.sparse`).
    """

    def __init__(self, in_channels: int, num_classes: int, enc_channels: Sequence[int] = (32, 64, 128, 256),
                 enc_depths: Sequence[int] = (1, 1, 2, 1), dec_channels: Sequence[int] = (64, 64, 128),
                 dec_depths: Sequence[int] = (1, 1, 1), num_heads: Sequence[int] = (2, 4, 8, 16),
                 patch_size: int = 64, orders: Sequence[str] = ("z", "z-trans", "hilbert", "hilbert-trans"),
                 shuffle_orders: bool = True, backend: str = "auto", dec_num_heads: Optional[Sequence[int]] = None,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, pool_reduce: str = "max", stem_kernel: int = 3):
        super().__init__()
        s = len(enc_channels)
        if not (len(enc_depths) == len(num_heads) == s and len(dec_channels) == len(dec_depths) == s - 1):
            raise HaskdError("ptv3: enc_channels/enc_depths/num_heads need one entry per stage and "
                             "dec_channels/dec_depths one fewer")
        for o in orders:
            if o not in ORDERS:
                raise HaskdError(f"ptv3: unknown order {o!r}; choose from {', '.join(ORDERS)}")
        resolve_backend(backend, "cpu")  # unknown names fail here, not at the first forward
        if patch_size < 1:
            raise HaskdError(f"ptv3: patch_size must be >= 1, got {patch_size}")
        if dec_num_heads is None:
            dec_num_heads = [max(1, c // (enc_channels[i] // num_heads[i])) for i, c in enumerate(dec_channels)]
        self.in_channels, self.num_classes = in_channels, num_classes
        self.orders, self.shuffle_orders, self.patch_size = tuple(orders), shuffle_orders, patch_size
        self.feat_dim = dec_channels[0] if s > 1 else enc_channels[0]
        self.backend = backend

        self.stem = _Stem(in_channels, enc_channels[0], stem_kernel, backend)
        # Stochastic depth grows linearly over the encoder blocks, as in PTv3.
        n_enc = sum(enc_depths)
        rates = [drop_path * i / max(1, n_enc - 1) for i in range(n_enc)]
        self.pools = nn.ModuleList()
        self.enc = nn.ModuleList()
        for i in range(s):
            if i > 0:
                self.pools.append(GridPooling(enc_channels[i - 1], enc_channels[i], pool_reduce))
            blocks = [Block(enc_channels[i], num_heads[i], mlp_ratio, rates.pop(0), backend)
                      for _ in range(enc_depths[i])]
            self.enc.append(nn.ModuleList(blocks))
        self.unpools = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(s - 1):
            cin = enc_channels[-1] if i == s - 2 else dec_channels[i + 1]
            self.unpools.append(GridUnpooling(cin, enc_channels[i], dec_channels[i]))
            self.dec.append(nn.ModuleList([Block(dec_channels[i], dec_num_heads[i], mlp_ratio, 0.0, backend)
                                           for _ in range(dec_depths[i])]))
        self.head = nn.Linear(self.feat_dim, num_classes)
        self._enc_channels, self._dec_channels = tuple(enc_channels), tuple(dec_channels)

    def hint_levels(self) -> list:
        """The levels the hint term of IHD aligns (:mod:`haskd.distill.hints`): ``(module, stride, dim)`` for the
        deepest encoder stage, then every decoder stage, coarse to fine (the last one's features are ``feat``). Each
        module is the stage's last :class:`Block`; its call receives the stage's ``_Level``, whose ``coords`` are
        the level's voxels (input grid // stride, batch first). A stage without blocks has nothing to capture."""
        s = len(self.enc)
        stages = [(self.enc[-1], 2 ** (s - 1), self._enc_channels[-1])]
        stages += [(self.dec[i], 2 ** i, self._dec_channels[i]) for i in reversed(range(len(self.dec)))]
        if any(len(blocks) == 0 for blocks, _, _ in stages):
            raise HaskdError("ptv3: a stage of depth 0 gives no per-level features for hints "
                             "(set distill.hint_weight=0)")
        return [(blocks[-1], stride, dim) for blocks, stride, dim in stages]

    def set_backend(self, backend: str) -> "PointTransformerV3":
        """Run the CPE/stem sparse convs with ``backend`` from now on (weights unchanged)."""
        return set_backend(self, backend)

    def _level(self, grid, batch, offset, stride=1) -> _Level:
        perm = list(range(len(self.orders)))
        if self.training and self.shuffle_orders:
            perm = torch.randperm(len(perm)).tolist()  # torch's RNG, so torch.manual_seed reproduces a run
        return _Level(grid, batch, offset, self.orders, self.patch_size, perm, stride)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        grid = batch["grid_coord"].long()
        x = batch["feat"].float()
        offset = batch["offset"].long()
        bidx = batch_from_offset(offset)
        level = self._level(grid, bidx, offset)
        x = self.stem(x, level)

        skips, levels, clusters = [], [], []
        for i, blocks in enumerate(self.enc):
            if i > 0:
                skips.append(x)
                levels.append(level)
                x, grid, bidx, cluster = self.pools[i - 1](x, grid, bidx)
                clusters.append(cluster)
                counts = torch.bincount(bidx, minlength=len(offset))
                level = self._level(grid, bidx, torch.cumsum(counts, 0), stride=2 ** i)
            for j, blk in enumerate(blocks):
                x = blk(x, level, j)

        for i in reversed(range(len(self.dec))):
            x = self.unpools[i](x, skips[i], clusters[i])
            level = levels[i]
            for j, blk in enumerate(self.dec[i]):
                x = blk(x, level, j)
        return {"logits": self.head(x), "feat": x}
