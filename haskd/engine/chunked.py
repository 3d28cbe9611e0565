"""Bounded-memory inference for large scenes: overlapping xy tiles, one model call per tile.

The scene is voxelized **once** (the same grid as :func:`haskd.engine.evaluate.predict_points`), then its voxels are
split by their xy cell into non-overlapping *cores* of ``tile`` metres; each chunk is a core grown by ``overlap``
metres on every side. The model runs on one chunk at a time, and every voxel takes its probabilities from the chunk
whose core holds it, i.e. the chunk where it is most central (at least ``overlap`` from any cut). Because chunks are
subsets of the same voxel grid, shifted by a multiple of ``ALIGN`` voxels (so every stride-2 pooling groups the same
voxels), a voxel whose receptive field lies inside its chunk gets exactly the one-shot result; only voxels whose
receptive field crosses a cut can differ.

Peak memory is set by the largest chunk (``max_voxels``), not by the scene. Students only: the teacher needs its
frames projected onto the whole scene.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ..data.transforms import collate
from ..errors import HaskdError
from .evaluate import predict_points, scene_sample
from .tasks import move_to

log = logging.getLogger(__name__)

# Chunk grid coords are shifted by a multiple of this, so that coords // 2^l of every UNet level (up to 2^6) group
# the same voxels as in the whole scene.
ALIGN = 64


def _chunk_sizes(cell_xy: np.ndarray, tile: float, overlap: float) -> tuple:
    """Core id per voxel and the voxel rows of each chunk.

    ``cell_xy``: ``(V, 2)`` float voxel xy positions (metres, relative to the scene minimum).
    Returns ``(core (V,) int64 core index, chunks: list of (core id, (n,) int64 voxel rows))``, empty cores left out.
    """
    nx = max(1, int(math.ceil((cell_xy[:, 0].max() + 1e-9) / tile)))
    ny = max(1, int(math.ceil((cell_xy[:, 1].max() + 1e-9) / tile)))
    ix = np.minimum((cell_xy[:, 0] // tile).astype(np.int64), nx - 1)
    iy = np.minimum((cell_xy[:, 1] // tile).astype(np.int64), ny - 1)
    core = ix * ny + iy
    chunks = []
    for c in np.unique(core):
        cx, cy = divmod(int(c), ny)
        lo = np.array([cx * tile - overlap, cy * tile - overlap])
        hi = np.array([(cx + 1) * tile + overlap, (cy + 1) * tile + overlap])
        rows = np.flatnonzero(((cell_xy >= lo) & (cell_xy < hi)).all(1))
        chunks.append((int(c), rows))
    return core, chunks


def plan_chunks(grid_coord: np.ndarray, voxel_size: float, max_voxels: int, tile: float | None = None,
                overlap: float = 1.0) -> dict:
    """Split voxels into overlapping xy chunks.

    Args:
        grid_coord: ``(V, 3)`` int64 voxel indices of the whole scene.
        tile: core size in metres; ``None`` = the largest tile (shrunk by 0.8 steps) whose chunks all hold at most
            ``max_voxels`` voxels.
        overlap: margin (metres) added around each core.
    Returns dict: ``tile`` (float), ``core`` (V,) core id per voxel, ``chunks`` list of ``(core id, rows)``.
    """
    xy = (grid_coord[:, :2] - grid_coord[:, :2].min(0)).astype(np.float64) * voxel_size + voxel_size / 2
    if tile is not None:
        if tile <= 0:
            raise HaskdError(f"chunked inference: tile must be > 0 m, got {tile}")
        core, chunks = _chunk_sizes(xy, tile, overlap)
        biggest = max(len(r) for _, r in chunks)
        if biggest > max_voxels:
            log.warning("chunked inference: a %.2f m tile holds %d voxels (> max_voxels %d)", tile, biggest,
                        max_voxels)
        return {"tile": float(tile), "core": core, "chunks": chunks}
    extent = float(xy.max()) + voxel_size
    t = extent / max(1.0, math.ceil(math.sqrt(len(xy) / max(1, max_voxels))))
    while True:
        core, chunks = _chunk_sizes(xy, t, overlap)
        if max(len(r) for _, r in chunks) <= max_voxels:
            return {"tile": float(t), "core": core, "chunks": chunks}
        t *= 0.8
        if t < max(4 * voxel_size, 0.25):
            raise HaskdError(f"chunked inference: max_voxels={max_voxels} is too small for overlap {overlap} m "
                             f"at voxel size {voxel_size} m (raise max_voxels or lower overlap)")


@torch.no_grad()
def predict_points_chunked(model, scene, voxel_size, num_classes, device="cpu", use_normal=False,
                           max_voxels=200000, tile=None, overlap=1.0, info: dict | None = None) -> torch.Tensor:
    """Per-point class probabilities ``(P, C)`` float32 of one scene, with at most about ``max_voxels`` voxels per
    model call.

    When the whole scene has at most ``max_voxels`` voxels and no ``tile`` is forced, this is exactly
    :func:`~haskd.engine.evaluate.predict_points` (one call). ``info``, when given, is filled with ``voxels``,
    ``chunks``, ``tile``, ``largest_chunk``.
    """
    sample = scene_sample(scene, voxel_size, num_classes, use_normal)
    V = sample["grid_coord"].shape[0]
    if V <= max_voxels and tile is None:
        if info is not None:
            info.update(voxels=V, chunks=1, tile=None, largest_chunk=V)
        return predict_points(model, scene, voxel_size, num_classes, device, use_normal)
    plan = plan_chunks(sample["grid_coord"], voxel_size, max_voxels, tile, overlap)
    core = plan["core"]
    voxel_probs = torch.zeros(V, num_classes)
    for cid, rows in plan["chunks"]:
        g = sample["grid_coord"][rows]
        shift = (g.min(0) // ALIGN) * ALIGN  # keeps every pooling level's voxel grouping
        sub = {"scene": scene.name, "coord": sample["coord"][rows], "grid_coord": g - shift,
               "feat": sample["feat"][rows], "inverse": np.arange(len(rows), dtype=np.int64)}
        batch = move_to(collate([sub]), device)
        p = torch.softmax(model(batch)["logits"].float(), 1).cpu()
        own = torch.from_numpy(core[rows] == cid)
        voxel_probs[torch.from_numpy(rows)[own]] = p[own]
        del batch, p
    if info is not None:
        info.update(voxels=V, chunks=len(plan["chunks"]), tile=plan["tile"],
                    largest_chunk=max(len(r) for _, r in plan["chunks"]))
    return voxel_probs[torch.from_numpy(sample["inverse"])]
