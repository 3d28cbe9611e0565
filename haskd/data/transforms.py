"""Point-cloud transforms: augmentation, grid voxelization that keeps the point -> voxel inverse, crop, collate.

All functions are vectorised numpy. A sample dict holds per-point arrays (``coord``, ``color``, ``normal``,
``segment``) until :func:`voxelize` turns it into per-voxel arrays plus ``inverse`` (P,) point -> voxel row.

Two training recipes (``data.augment_recipe``): ``cpu``, :func:`augment` then :func:`voxelize` (mean of each
voxel's points) and :func:`crop`; ``pointcept``, :func:`pointcept_train_voxels`: Pointcept's augmentations, one
random point per voxel (:func:`sample_voxels`), crop by count, shuffle, and Mix3D in :func:`collate`.
:func:`grid_fragments` is the 'test' mode grid sampling of fragment voting (:mod:`haskd.engine.voting`).
"""
from __future__ import annotations

import numpy as np
import torch


def augment(coord, color, normal, rng: np.random.Generator, rotate=True, flip=True, scale=(0.9, 1.1),
            jitter=0.005, color_jitter=0.05):
    """The CPU-sized recipe: random z-rotation, x/y flips, isotropic scale, coordinate jitter and colour
    brightness/contrast jitter."""
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


def crop(vox: dict, max_voxels: int, rng: np.random.Generator, rate: float = 0.0) -> dict:
    """Keep the ``max_voxels`` voxels nearest a random voxel (sphere crop); with ``rate`` > 0, first keep that
    fraction of the voxels the same way (Pointcept's SphereCrop with ``sample_rate``). Dropped points get inverse
    -1. After :func:`sample_voxels` a voxel is one point, so this is Pointcept's crop by point count."""
    if rate > 0:
        vox = crop(vox, int(rate * vox["grid_coord"].shape[0]), rng)
    V = vox["grid_coord"].shape[0]
    if max_voxels <= 0 or V <= max_voxels:
        return vox
    center = vox["coord"][rng.integers(V)]
    d = ((vox["coord"] - center) ** 2).sum(1)
    keep = np.sort(np.argpartition(d, max_voxels - 1)[:max_voxels])
    remap = np.full(V, -1, dtype=np.int64)
    remap[keep] = np.arange(keep.shape[0])
    out = {k: (v[keep] if isinstance(v, np.ndarray) and v.shape[:1] == (V,) else v) for k, v in vox.items()}
    inv = vox["inverse"]
    out["inverse"] = np.where(inv >= 0, remap[np.maximum(inv, 0)], -1)  # points dropped before stay dropped
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
    """Concatenate samples without padding: ``offset`` = cumulative voxel counts, ``inverse`` shifted per sample.

    Mix3D: when the first sample carries ``mix`` = True (drawn by the dataset, see ``data.mix_prob``), samples are
    overlaid in pairs (0, 1), (2, 3), ... (:func:`overlay`): each pair is one scene for the network (one ``offset``
    entry), while ``point_offset``, ``scene`` and ``index`` stay per sample, so per-point targets still map back.
    """
    batch = {}
    n = len(samples)
    groups = [[i, i + 1] if i + 1 < n else [i] for i in range(0, n, 2)] if samples[0].get("mix") else \
        [[i] for i in range(n)]
    grids = [s["grid_coord"] for s in samples]
    rows = [np.arange(g.shape[0]) for g in grids]
    for g in groups:
        if len(g) == 2:
            grids[g[0]], grids[g[1]], rows[g[1]] = overlay(grids[g[0]], grids[g[1]])
    nv = [r.shape[0] for r in rows]
    npt = [s["inverse"].shape[0] for s in samples]
    vstart = np.concatenate([[0], np.cumsum(nv)[:-1]]).astype(np.int64)
    for key in ("coord", "grid_coord", "feat", "segment", "world"):
        if key in samples[0] and samples[0][key] is not None:
            src = grids if key == "grid_coord" else [s[key] for s in samples]
            batch[key] = torch.from_numpy(np.concatenate([x[r] for x, r in zip(src, rows)]))
    inv = []
    for s, r, st in zip(samples, rows, vstart):
        remap = np.full(s["grid_coord"].shape[0] + 1, -1, dtype=np.int64)  # last entry: dropped points (-1)
        remap[r] = st + np.arange(r.shape[0])
        inv.append(remap[s["inverse"]])
    group_nv = [sum(nv[i] for i in g) for g in groups]
    batch["inverse"] = torch.from_numpy(np.concatenate(inv))
    batch["offset"] = torch.tensor(np.cumsum(group_nv), dtype=torch.int64)
    batch["point_offset"] = torch.tensor(np.cumsum(npt), dtype=torch.int64)
    batch["batch"] = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(group_nv))
    for key in ("point_segment",):
        if key in samples[0]:
            batch[key] = torch.from_numpy(np.concatenate([s[key] for s in samples]))
    batch["scene"] = [s["scene"] for s in samples]
    batch["index"] = [s.get("index", i) for i, s in enumerate(samples)]
    if "draw" in samples[0]:
        batch["draw"] = [s["draw"] for s in samples]  # (view, dataset index) per sample: see SceneDataset.views
    if "frames" in samples[0]:
        batch["frames"] = [s["frames"] for s in samples]  # per-sample dicts of image tensors (teacher only)
    batch["grid_coord"] = batch["grid_coord"].long()
    if "segment" in batch:
        batch["segment"] = batch["segment"].long()
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Pointcept's training recipe (configs semseg-spunet-v1m1-0-base / semseg-pt-v3m1-0-base, ScanNet and S3DIS),
# re-implemented as plain functions of numpy arrays and a seeded ``np.random.Generator``: the same generator gives
# the same result, so a resumed run sees the same batches. Angles are in units of pi, as in Pointcept's configs.
# ----------------------------------------------------------------------------------------------------------------

def center_shift(coord, apply_z=True) -> np.ndarray:
    """Move the xy centre of the bounding box to 0 and, with ``apply_z``, the lowest point to z = 0."""
    lo, hi = coord.min(0), coord.max(0)
    shift = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2] if apply_z else 0.0], dtype=coord.dtype)
    return coord - shift


def random_dropout(n: int, rng: np.random.Generator, ratio=0.2, p=0.2):
    """With probability ``p``, the sorted indices of ``n * (1 - ratio)`` points kept at random; else None (all)."""
    if p <= 0 or ratio <= 0 or rng.random() >= p:
        return None
    return np.sort(rng.choice(n, int(n * (1 - ratio)), replace=False))


def rotation_matrix(axis: str, angle: float) -> np.ndarray:
    """Right-handed rotation by ``angle`` radians about ``axis`` ('x', 'y' or 'z')."""
    c, s = np.cos(angle), np.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(f"axis must be x, y or z, got {axis!r}")


def rotate(coord, normal, R, center=None):
    """Apply rotation ``R`` about ``center`` (default: the bounding-box centre) to points and normals."""
    c = (coord.min(0) + coord.max(0)) / 2 if center is None else np.asarray(center, dtype=np.float64)
    out = ((coord.astype(np.float64) - c) @ R.T + c).astype(np.float32)
    return out, None if normal is None else (normal.astype(np.float64) @ R.T).astype(np.float32)


def random_rotate(coord, normal, rng: np.random.Generator, axis="z", angle=(-1.0, 1.0), p=0.5, center=None):
    """With probability ``p``, rotate by a uniform angle in ``angle`` (units of pi) about ``axis``."""
    if rng.random() >= p:
        return coord, normal
    return rotate(coord, normal, rotation_matrix(axis, rng.uniform(*angle) * np.pi), center)


def random_scale(coord, rng: np.random.Generator, scale=(0.9, 1.1)):
    """Isotropic scale by a uniform factor in ``scale``."""
    return (coord * np.float32(rng.uniform(*scale))).astype(np.float32)


def random_flip(coord, normal, rng: np.random.Generator, p=0.5):
    """Mirror x with probability ``p``, then y with probability ``p`` (points and normals)."""
    coord = coord.copy()
    normal = None if normal is None else normal.copy()
    for axis in (0, 1):
        if rng.random() < p:
            coord[:, axis] = -coord[:, axis]
            if normal is not None:
                normal[:, axis] = -normal[:, axis]
    return coord, normal


def random_jitter(coord, rng: np.random.Generator, sigma=0.005, clip=0.02):
    """Per-point Gaussian noise of std ``sigma``, clipped to +-``clip`` (metres)."""
    return coord + np.clip(sigma * rng.standard_normal(coord.shape), -clip, clip).astype(np.float32)


def elastic_distortion(coord, rng: np.random.Generator, params=((0.2, 0.4), (0.8, 1.6)), p=0.95):
    """With probability ``p``, for each ``(granularity, magnitude)``: a 3-vector Gaussian noise field on a grid of
    spacing ``granularity`` (m), smoothed twice by a 3-tap box filter along each axis, trilinearly interpolated at
    every point and added times ``magnitude`` (the distortion of Pointcept / MinkowskiEngine)."""
    if not params or rng.random() >= p:
        return coord
    from scipy.interpolate import RegularGridInterpolator
    from scipy.ndimage import uniform_filter1d

    coord = coord.astype(np.float64)
    for granularity, magnitude in params:
        lo = coord.min(0)
        dims = ((coord - lo).max(0) // granularity).astype(int) + 3
        noise = rng.standard_normal((*dims, 3))
        for _ in range(2):
            for ax in range(3):
                noise = uniform_filter1d(noise, 3, axis=ax, mode="constant", cval=0.0)
        axes = [np.linspace(a - granularity, a + granularity * (d - 2), d) for a, d in zip(lo, dims)]
        field = RegularGridInterpolator(axes, noise, bounds_error=False, fill_value=0.0)
        coord = coord + field(coord) * magnitude
    return coord.astype(np.float32)


def chromatic_auto_contrast(color, rng: np.random.Generator, p=0.2, blend=None):
    """With probability ``p``, stretch each channel to 0..255 and blend with the input (factor uniform in [0, 1)
    unless ``blend`` is given). ``color`` is float (N, 3) in 0..255."""
    if rng.random() >= p:
        return color
    lo, hi = color.min(0, keepdims=True), color.max(0, keepdims=True)
    diff = hi - lo
    if not (diff > 0).any():
        return color
    scale = np.where(diff > 0, 255.0 / np.maximum(diff, 1e-12), 1.0)
    b = rng.random() if blend is None else blend
    return ((1 - b) * color + b * (color - lo) * scale).astype(np.float32)


def chromatic_translation(color, rng: np.random.Generator, p=0.95, ratio=0.05):
    """With probability ``p``, add one random offset per channel, uniform in +-``ratio`` * 255, clipped to 0..255."""
    if rng.random() >= p:
        return color
    t = (rng.random((1, 3)) - 0.5) * 255 * 2 * ratio
    return np.clip(color + t, 0, 255).astype(np.float32)


def chromatic_jitter(color, rng: np.random.Generator, p=0.95, std=0.05):
    """With probability ``p``, per-point Gaussian colour noise of std ``std`` * 255, clipped to 0..255."""
    if rng.random() >= p:
        return color
    return np.clip(color + rng.standard_normal(color.shape) * std * 255, 0, 255).astype(np.float32)


def pointcept_augment(coord, color, normal, rng: np.random.Generator, elastic=True, dropout=True):
    """Pointcept's training augmentations in its order (before grid sampling). Returns ``coord, color, normal,
    keep`` where ``keep`` holds the indices of the points that survive random dropout (None: all of them)."""
    coord = center_shift(np.asarray(coord, dtype=np.float32), apply_z=True)
    color = np.asarray(color, dtype=np.float32)
    keep = random_dropout(coord.shape[0], rng) if dropout else None
    if keep is not None:
        coord, color = coord[keep], color[keep]
        normal = None if normal is None else normal[keep]
    coord, normal = random_rotate(coord, normal, rng, "z", (-1.0, 1.0), 0.5, center=(0.0, 0.0, 0.0))
    coord, normal = random_rotate(coord, normal, rng, "x", (-1 / 64, 1 / 64), 0.5)
    coord, normal = random_rotate(coord, normal, rng, "y", (-1 / 64, 1 / 64), 0.5)
    coord = random_scale(coord, rng, (0.9, 1.1))
    coord, normal = random_flip(coord, normal, rng, 0.5)
    coord = random_jitter(coord, rng, 0.005, 0.02)
    if elastic:
        coord = elastic_distortion(coord, rng)
    color = chromatic_auto_contrast(color, rng, 0.2)
    color = chromatic_translation(color, rng, 0.95, 0.05)
    color = chromatic_jitter(color, rng, 0.95, 0.05)
    return coord, color, normal, keep


def grid_sample(coord, voxel_size, rng: np.random.Generator):
    """Pointcept's GridSample in 'train' mode: one point drawn at random in every occupied voxel.

    Returns ``select`` (V,) the chosen point of each voxel, ``inverse`` (P,) point -> voxel row and ``grid`` (V,3)
    int64 >= 0 the voxels' grid coordinates (origin at the lowest occupied cell)."""
    g = np.floor(np.asarray(coord, dtype=np.float64) / voxel_size).astype(np.int64)
    g -= g.min(0)
    order, starts, counts, inverse = _voxel_groups(g)
    select = order[starts + np.floor(rng.random(counts.shape[0]) * counts).astype(np.int64)]
    return select, inverse, g[select]


def grid_fragments(coord, voxel_size):
    """Pointcept's GridSample in 'test' mode: fragment ``i`` takes point ``i mod n_v`` of every voxel ``v`` (n_v its
    point count), for ``i < max n_v``, so that the fragments together hold every point at least once.

    Returns ``fragments`` (a list of (V,) point indices) and ``grid`` (P,3) int64 >= 0 of every point."""
    g = np.floor(np.asarray(coord, dtype=np.float64) / voxel_size).astype(np.int64)
    g -= g.min(0)
    order, starts, counts, _ = _voxel_groups(g)
    return [order[starts + i % counts] for i in range(int(counts.max()))], g


def _voxel_groups(g):
    """Points grouped by voxel: ``order`` (P,) point ids sorted by voxel, ``starts``/``counts`` (V,) each voxel's
    slice of ``order``, ``inverse`` (P,) point -> voxel row (voxels in key order)."""
    keys = grid_keys(g)
    order = np.argsort(keys, kind="stable")
    _, starts, inv_sorted, counts = np.unique(keys[order], return_index=True, return_inverse=True,
                                              return_counts=True)
    inverse = np.empty_like(order)
    inverse[order] = inv_sorted.reshape(-1)
    return order, starts, counts, inverse


def sample_voxels(coord, color, segment=None, normal=None, voxel_size=0.05, rng=None):
    """:func:`voxelize`'s output (same keys) from one random point per voxel (Pointcept 'train' mode): the voxel
    takes that point's position, colour, normal and label; ``inverse`` still maps every point to its voxel."""
    coord = np.asarray(coord, dtype=np.float32)
    select, inverse, grid = grid_sample(coord, voxel_size, rng)
    out = {"grid_coord": grid, "coord": coord[select], "color": np.asarray(color, dtype=np.float32)[select],
           "normal": None if normal is None else np.asarray(normal, dtype=np.float32)[select],
           "inverse": inverse.astype(np.int64), "origin": np.floor(coord.min(0) / voxel_size) * voxel_size,
           "select": select}
    if segment is not None:
        out["segment"] = np.asarray(segment).astype(np.int64)[select]
    return out


def shuffle_voxels(vox: dict, rng: np.random.Generator) -> dict:
    """Random order of the voxel rows (Pointcept's ShufflePoint), with ``inverse`` remapped to match."""
    V = vox["grid_coord"].shape[0]
    perm = rng.permutation(V)
    rank = np.empty(V, dtype=np.int64)
    rank[perm] = np.arange(V)
    out = {k: (v[perm] if isinstance(v, np.ndarray) and v.shape[:1] == (V,) else v) for k, v in vox.items()}
    inv = vox["inverse"]
    out["inverse"] = np.where(inv >= 0, rank[np.maximum(inv, 0)], -1)
    return out


def overlay(ga, gb):
    """Mix3D for voxel grids: ``gb`` moved so that its xy box centre meets ``ga``'s (both keep z from 0), then both
    shifted to non-negative coordinates. Pointcept keeps both scenes' points even where they share a voxel; a voxel
    grid needs unique voxels, so a voxel of ``gb`` that ``ga`` already occupies is dropped (its points get -1).

    Returns ``ga'`` (Va,3), ``gb'`` (Vb,3) and ``rows_b`` the kept rows of ``gb``."""
    ca = (ga.min(0) + ga.max(0)) / 2
    cb = (gb.min(0) + gb.max(0)) / 2
    shift = np.round(ca - cb).astype(np.int64)
    shift[2] = ga[:, 2].min() - gb[:, 2].min()
    gb = gb + shift
    low = np.minimum(ga.min(0), gb.min(0))
    ga, gb = ga - low, gb - low
    rows_b = np.flatnonzero(~np.isin(grid_keys(gb), grid_keys(ga)))
    return ga, gb, rows_b


def pointcept_train_voxels(coord, color, segment, normal, rng: np.random.Generator, voxel_size, num_classes=None,
                           grid_sample_mode="random", max_points=0, crop_rate=0.0, elastic=True, shuffle=True,
                           augment=True) -> dict:
    """One training sample by Pointcept's recipe: :func:`pointcept_augment`, grid sampling (``random``: one point
    per voxel; ``mean``: :func:`voxelize`), sphere crop (``crop_rate`` then ``max_points``), shuffle.

    Returns :func:`voxelize`'s keys plus ``world`` (V,3) voxel positions in the scene's own frame (from the
    unaugmented ``coord``). ``inverse`` (P,) covers every input point: -1 for points dropped or cropped away.
    ``augment`` False keeps only the grid sampling, crop and shuffle."""
    coord0 = np.asarray(coord, dtype=np.float32)
    if augment:
        c, col, nrm, keep = pointcept_augment(coord0, color, normal, rng, elastic=elastic)
    else:
        c, col, nrm, keep = center_shift(coord0), np.asarray(color, dtype=np.float32), normal, None
    seg = None if segment is None else (segment if keep is None else segment[keep])
    if grid_sample_mode == "random":
        vox = sample_voxels(c, col, seg, nrm, voxel_size, rng)
        src = coord0 if keep is None else coord0[keep]
        vox["world"] = src[vox.pop("select")]
    else:
        vox = voxelize(c, col, seg, nrm, voxel_size, num_classes)
        vox["world"] = voxel_mean(coord0 if keep is None else coord0[keep], vox["inverse"],
                                  vox["grid_coord"].shape[0])
    if keep is not None:  # inverse over every original point
        full = np.full(coord0.shape[0], -1, dtype=np.int64)
        full[keep] = vox["inverse"]
        vox["inverse"] = full
    vox = crop(vox, max_points, rng, crop_rate)
    if shuffle:
        vox = shuffle_voxels(vox, rng)
    return vox
