"""Point-cloud transforms: augmentation, grid voxelization that keeps the point -> voxel inverse, crop, collate.

All functions are vectorised numpy. A sample dict holds per-point arrays (``coord``, ``color``, ``normal``,
``segment``) until :func:`voxelize` turns it into per-voxel arrays plus ``inverse`` (P,) point -> voxel row.
"""
from __future__ import annotations

import numpy as np
import torch


def augment(coord, color, normal, rng: np.random.Generator, rotate=True, flip=True, scale=(0.9, 1.1),
            jitter=0.005, color_jitter=0.05):
    """Random z-rotation, x/y flips, isotropic scale, coordinate jitter and colour brightness/contrast jitter."""
    R = np.eye(3)
    if rotate:
        a = rng.uniform(0, 2 * np.pi)
        c, s = np.cos(a), np.sin(a)
        R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    if flip:
        for axis in (0, 1):
            if rng.random() < 0.5:
                F = np.eye(3)
                F[axis, axis] = -1
                R = F @ R
    s = rng.uniform(*scale) if scale else 1.0
    coord = (coord.astype(np.float64) @ R.T * s).astype(np.float32)
    if normal is not None:
        normal = (normal.astype(np.float64) @ R.T).astype(np.float32)
    if jitter:
        coord = coord + np.clip(rng.normal(0, jitter, coord.shape), -4 * jitter, 4 * jitter).astype(np.float32)
    if color_jitter:
        col = color.astype(np.float32)
        mean = col.mean(0, keepdims=True)
        contrast = 1 + rng.uniform(-color_jitter, color_jitter)
        bright = rng.uniform(-color_jitter, color_jitter) * 255
        color = np.clip((col - mean) * contrast + mean + bright, 0, 255)
    return coord, color, normal


def grid_keys(grid: np.ndarray) -> np.ndarray:
    """Pack non-negative (N,3) int grid coords into int64 keys (21 bits per axis)."""
    g = grid.astype(np.int64)
    return (g[:, 0] << 42) | (g[:, 1] << 21) | g[:, 2]


def voxelize(coord, color, segment=None, normal=None, voxel_size=0.05, num_classes=None):
    """Average points into a regular grid.

    Returns dict: ``grid_coord`` (V,3) int64 >= 0, ``coord`` (V,3) mean point position, ``color`` (V,3) float mean
    colour 0..255, ``normal`` (V,3) or None, ``segment`` (V,) majority label over labeled points (-1 if none),
    ``inverse`` (P,) int64 point -> voxel row, ``origin`` (3,) float the grid origin.
    """
    coord = np.asarray(coord, dtype=np.float32)
    origin = coord.min(0)
    grid = np.floor((coord - origin) / voxel_size).astype(np.int64)
    keys = grid_keys(grid)
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    V = uniq.shape[0]
    counts = np.bincount(inverse, minlength=V).astype(np.float32)[:, None]

    def mean(x):
        out = np.zeros((V, x.shape[1]), dtype=np.float64)
        for j in range(x.shape[1]):  # bincount with weights is much faster than np.add.at
            out[:, j] = np.bincount(inverse, weights=x[:, j], minlength=V)
        return (out / counts).astype(np.float32)

    out = {
        "grid_coord": grid[first],
        "coord": mean(coord),
        "color": mean(np.asarray(color, dtype=np.float32)),
        "normal": None,
        "inverse": inverse.astype(np.int64),
        "origin": origin,
    }
    if normal is not None:
        n = mean(np.asarray(normal, dtype=np.float32))
        out["normal"] = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-6)
    if segment is not None:
        out["segment"] = majority_label(inverse, np.asarray(segment), V, num_classes)
    return out


def voxel_mean(values, inverse, V) -> np.ndarray:
    """Mean of per-point ``values`` (P,D) over each voxel (inverse: point -> voxel row)."""
    counts = np.maximum(np.bincount(inverse, minlength=V), 1).astype(np.float64)
    return np.stack([np.bincount(inverse, weights=values[:, j], minlength=V) / counts
                     for j in range(values.shape[1])], 1).astype(np.float32)


def majority_label(inverse, segment, V, num_classes=None):
    """Most frequent non-ignore label per voxel (-1 where a voxel holds no labeled point)."""
    seg = segment.astype(np.int64)
    lab = seg >= 0
    C = int(num_classes or (seg.max() + 1 if lab.any() else 1))
    counts = np.bincount(inverse[lab] * C + seg[lab], minlength=V * C).reshape(V, C)
    out = counts.argmax(1).astype(np.int64)
    out[counts.sum(1) == 0] = -1
    return out


def crop(vox: dict, max_voxels: int, rng: np.random.Generator) -> dict:
    """Keep the ``max_voxels`` voxels nearest a random voxel (sphere crop). Dropped points get inverse -1."""
    V = vox["grid_coord"].shape[0]
    if max_voxels <= 0 or V <= max_voxels:
        return vox
    center = vox["coord"][rng.integers(V)]
    d = ((vox["coord"] - center) ** 2).sum(1)
    keep = np.sort(np.argpartition(d, max_voxels - 1)[:max_voxels])
    remap = np.full(V, -1, dtype=np.int64)
    remap[keep] = np.arange(keep.shape[0])
    out = {k: (v[keep] if isinstance(v, np.ndarray) and v.shape[:1] == (V,) else v) for k, v in vox.items()}
    out["inverse"] = remap[vox["inverse"]]
    out["grid_coord"] = out["grid_coord"] - out["grid_coord"].min(0)
    return out


def make_features(vox: dict, use_normal: bool) -> np.ndarray:
    """Network input: colour scaled to [-1, 1] (+ normal)."""
    f = [vox["color"] / 127.5 - 1.0]
    if use_normal:
        n = vox.get("normal")
        f.append(n if n is not None else np.zeros_like(vox["coord"]))
    return np.concatenate(f, 1).astype(np.float32)


def collate(samples: list) -> dict:
    """Concatenate samples without padding: ``offset`` = cumulative voxel counts, ``inverse`` shifted per sample."""
    batch = {}
    nv = [s["grid_coord"].shape[0] for s in samples]
    npt = [s["inverse"].shape[0] for s in samples]
    vstart = np.concatenate([[0], np.cumsum(nv)[:-1]])
    for key in ("coord", "grid_coord", "feat", "segment", "world"):
        if key in samples[0] and samples[0][key] is not None:
            batch[key] = torch.from_numpy(np.concatenate([s[key] for s in samples]))
    inv = []
    for s, st in zip(samples, vstart):
        i = s["inverse"].copy()
        i[i >= 0] += st
        inv.append(i)
    batch["inverse"] = torch.from_numpy(np.concatenate(inv))
    batch["offset"] = torch.tensor(np.cumsum(nv), dtype=torch.int64)
    batch["point_offset"] = torch.tensor(np.cumsum(npt), dtype=torch.int64)
    batch["batch"] = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(nv))
    for key in ("point_segment",):
        if key in samples[0]:
            batch[key] = torch.from_numpy(np.concatenate([s[key] for s in samples]))
    batch["scene"] = [s["scene"] for s in samples]
    batch["index"] = [s.get("index", i) for i, s in enumerate(samples)]
    if "frames" in samples[0]:
        batch["frames"] = [s["frames"] for s in samples]  # per-sample dicts of image tensors (teacher only)
    batch["grid_coord"] = batch["grid_coord"].long()
    if "segment" in batch:
        batch["segment"] = batch["segment"].long()
    return batch
