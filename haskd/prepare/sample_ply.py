"""``haskd prepare sample-ply``: a few thousand points of a real ScanNet room as a PLY, to try ``haskd predict``.

The room comes from the shared samples (``shared/data``): the full-resolution ``scannet_mmdet3d_testdata`` when it
holds the scene, else the 50k-point ``scannet_votenet_50k_picwoon`` subsample. Points are axis-aligned metres, as
those sources store them. Nothing of ``shared/data`` is copied into the repository: the file is written where
``--out`` says.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .samples import MMDET3D, VOTENET, read_mmdet3d, read_votenet


def read_room(src, scene: str) -> tuple:
    """``(points dict with coord / color / segment, source folder name)`` of ``scene`` in the samples ``src``."""
    src = Path(src)
    if not src.is_dir():
        raise InputError(src, "samples folder not found (pass --src, e.g. ../shared/data)")
    if (src / MMDET3D / scene / f"{scene}_vert_all.npy").is_file():
        return read_mmdet3d(src / MMDET3D, scene), MMDET3D
    if (src / VOTENET / f"{scene}_vert.npy").is_file():
        return read_votenet(src / VOTENET, scene), VOTENET
    raise InputError(src, f"no ScanNet scene '{scene}' in {MMDET3D}/ or {VOTENET}/")


def cut(coord: np.ndarray, points: int, crop: float = 0.0, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of at most ``points`` points drawn at random (``seed``), first keeping only the square of
    side ``crop`` metres around the centre of the room's footprint when ``crop`` > 0."""
    idx = np.arange(coord.shape[0])
    if crop > 0:
        centre = (coord[:, :2].min(0) + coord[:, :2].max(0)) / 2
        idx = idx[(np.abs(coord[:, :2] - centre) <= crop / 2).all(1)]
    if idx.size > points:
        idx = np.random.default_rng(seed).choice(idx, points, replace=False)
    return np.sort(idx)


def write_sample_ply(src, out, scene: str = "scene0000_00", points: int = 5000, crop: float = 0.0,
                     seed: int = 0) -> dict:
    """Write ``out`` (binary PLY: x y z, red green blue, label = ScanNet-20 id or -1, nx ny nz estimated from the
    room's points) and return ``{"path", "points", "source_points", "source", "bytes"}``."""
    from ..engine.predict import pca_normals, write_ply

    if points < 1:
        raise InputError(out, f"--points must be at least 1, got {points}")
    room, source = read_room(src, scene)
    idx = cut(room["coord"], points, crop, seed)
    if idx.size == 0:
        raise InputError(out, f"no point of {scene} inside a {crop} m square around its centre")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    # normals from the full-resolution room (the samples store none), so models trained with normals can label it
    normal = pca_normals(room["coord"], query=room["coord"][idx])
    write_ply(tmp, room["coord"][idx], room["color"][idx], room["segment"][idx].astype(np.int32), normal=normal)
    tmp.replace(out)
    return {"path": str(out), "points": int(idx.size), "source_points": int(room["coord"].shape[0]),
            "source": source, "bytes": out.stat().st_size}
