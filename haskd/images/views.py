"""Virtual RGB-D views for scenes without frames (e.g. S3DIS without 2D-3D-S): z-buffer splatting of the coloured
point cloud from a camera path inside the room.

Camera path (ours): cameras at ``height`` metres above the floor (capped at mid-room height), on a small ellipse
around the room centre, each looking *across* the centre at the opposite wall (so a wall is seen from the far side
of the room, wide), yaws evenly spaced with a seeded jitter, pitch alternating between ``pitch_deg`` and
``pitch_deg - 15`` so both walls and the furniture/floor in front of them are seen. The up axis is +z (ScanNet,
S3DIS).

Splatting: every point covers a square footprint of ``ceil(point_size * fx / z / 2 - 1/2)`` pixels radius
(capped; point_size = the point's local spacing, see :func:`point_spacing`), the nearest depth wins per pixel.
Vectorised: one pass per footprint offset, then a sort by (pixel, depth) and the first entry per pixel. Cameras
follow the conventions of :mod:`haskd.images.lifting` (OpenCV axes, camera-to-world pose, pixel-centre intrinsics).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from ..data.frames import open_frames, write_frame, write_intrinsics
from ..errors import InputError
from ..io import cache_root
from .lifting import project

log = logging.getLogger(__name__)

VIRTUAL_DIR = "frames_virtual"


def intrinsics(image_size, fov_deg: float) -> np.ndarray:
    """(3, 3) pinhole K for an image ``(H, W)`` with horizontal field of view ``fov_deg`` (square pixels)."""
    H, W = image_size
    f = (W / 2.0) / np.tan(np.radians(fov_deg) / 2.0)
    return np.array([[f, 0, (W - 1) / 2.0], [0, f, (H - 1) / 2.0], [0, 0, 1]])


def look_pose(position, yaw: float, pitch: float) -> np.ndarray:
    """Camera-to-world 4x4 for a camera at ``position`` looking along (yaw, pitch) radians, z up, no roll."""
    fwd = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)])
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    P = np.eye(4)
    P[:3, :3] = np.stack([right, down, fwd], axis=1)       # columns: camera x (right), y (down), z (forward)
    P[:3, 3] = position
    return P


def camera_path(coord, num_views: int = 20, height: float = 1.5, pitch_deg: float = -20.0, seed: int = 0):
    """(num_views, 4, 4) camera-to-world poses inside the room spanned by ``coord`` (N, 3)."""
    rng = np.random.default_rng(seed)
    lo, hi = np.percentile(coord, 2, axis=0), np.percentile(coord, 98, axis=0)
    centre = (lo + hi) / 2.0
    half = (hi - lo) / 2.0
    z = lo[2] + min(height, 0.5 * (hi[2] - lo[2]))
    poses = []
    for i in range(num_views):
        yaw = 2 * np.pi * i / num_views + rng.uniform(-0.5, 0.5) * np.pi / num_views
        d = np.array([np.cos(yaw), np.sin(yaw)])
        # Stand on the far side of the centre (35% of the half extent) and look across it.
        pos = np.array([*(centre[:2] - 0.35 * half[:2] * d), z])
        pitch = np.radians(pitch_deg - (15.0 if i % 2 else 0.0))
        poses.append(look_pose(pos, yaw, pitch))
    return np.stack(poses)


def point_spacing(coord, k: int = 4) -> np.ndarray:
    """(N,) local point spacing: distance to the ``k``-th nearest neighbour.

    Per point, because mesh-vertex clouds (ScanNet) are dense on details and sparse on flat walls and floors: one
    global size would leave holes there or blur the details.
    """
    from scipy.spatial import cKDTree

    coord = np.asarray(coord, dtype=np.float64)
    if len(coord) <= k:
        return np.full(len(coord), 0.01)
    d, _ = cKDTree(coord).query(coord, k=k + 1)
    return d[:, k]


def splat(coord, color, pose, K, image_size, point_size: float, max_radius: int = 6, near: float = 0.1):
    """Render one view by z-buffer splatting.

    Args: coord (N, 3), color (N, 3) uint8, pose (4, 4) camera-to-world, K (3, 3), image_size (H, W),
        point_size: footprint diameter of a point in metres, scalar or (N,).
    Returns: color (H, W, 3) uint8 (black where empty), depth (H, W) float32 metres (0 where empty).
    """
    H, W = image_size
    uv, z = project(np.asarray(coord, dtype=np.float32), pose[None].astype(np.float32), K.astype(np.float32))
    uv, z = uv[0].numpy(), z[0].numpy()
    keep = z > near
    uv, z, idx = uv[keep], z[keep], np.nonzero(keep)[0]
    size = np.broadcast_to(np.asarray(point_size, dtype=np.float64), (len(keep),))[keep]
    ui, vi = np.round(uv[:, 0]).astype(np.int64), np.round(uv[:, 1]).astype(np.int64)
    rad = np.minimum(np.ceil(0.5 * size * K[0, 0] / z - 0.5), max_radius).astype(np.int64)
    rad = np.maximum(rad, 0)
    R = int(rad.max()) if len(rad) else 0
    pix, dep, src = [], [], []
    for dy in range(-R, R + 1):
        for dx in range(-R, R + 1):
            m = rad >= max(abs(dx), abs(dy))
            u, v = ui[m] + dx, vi[m] + dy
            ok = (u >= 0) & (u < W) & (v >= 0) & (v < H)
            pix.append(v[ok] * W + u[ok])
            dep.append(z[m][ok])
            src.append(idx[m][ok])
    pix, dep, src = np.concatenate(pix), np.concatenate(dep), np.concatenate(src)
    out_c = np.zeros((H * W, 3), dtype=np.uint8)
    out_d = np.zeros(H * W, dtype=np.float32)
    if len(pix):
        order = np.lexsort((dep, pix))                    # by pixel, then nearest first
        first = np.unique(pix[order], return_index=True)[1]
        win = order[first]
        out_c[pix[win]] = np.asarray(color)[src[win]]
        out_d[pix[win]] = dep[win]
    return out_c.reshape(H, W, 3), out_d.reshape(H, W)


def render_views(coord, color, num_views: int = 20, image_size=(240, 320), fov_deg: float = 70.0, seed: int = 0,
                 height: float = 1.5, pitch_deg: float = -20.0, point_size=None, max_radius: int = 6):
    """Render ``num_views`` RGB-D views of a coloured point cloud from a camera path inside the room.

    Args:
        coord: (N, 3) metres, z up. color: (N, 3) uint8. image_size: (H, W). fov_deg: horizontal field of view.
        point_size: footprint diameter in metres, scalar or (N,) (default: per point, the distance to its 4th
            nearest neighbour, capped at the 95th percentile so that stray points do not paint large squares).
    Returns:
        list of tuples ``(color (H, W, 3) uint8, depth (H, W) float32 metres (0 = empty), pose (4, 4)
        camera-to-world, K (3, 3))``.
    """
    coord = np.asarray(coord, dtype=np.float64)
    color = np.asarray(color, dtype=np.uint8)
    if point_size is None:
        sp = point_spacing(coord)
        point_size = np.minimum(sp, np.percentile(sp, 95))
    K = intrinsics(image_size, fov_deg)
    views = []
    for pose in camera_path(coord, num_views, height, pitch_deg, seed):
        c, d = splat(coord, color, pose, K, image_size, point_size, max_radius)
        views.append((c, d, pose, K))
    return views


def virtual_dir(scene_dir, num_views: int = 20, image_size=(240, 320), fov_deg: float = 70.0, seed: int = 0) -> Path:
    """The cache folder of a scene's rendered views: named after the scene, its points file (path, size, mtime)
    and the rendering settings, so edited points or other settings render anew."""
    scene_dir = Path(scene_dir).resolve()
    st = (scene_dir / "coord.npy").stat()
    key = f"{scene_dir}|{st.st_size}|{st.st_mtime_ns}|{num_views}|{tuple(image_size)}|{fov_deg}|{seed}"
    return cache_root() / "virtual_views" / f"{scene_dir.name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def find_frames(scene_dir, num_views: int = 20, image_size=(240, 320), fov_deg: float = 70.0,
                seed: int = 0):
    """A scene's usable frames folder, or None; nothing is rendered: its real ``frames/`` (real frames win), else
    its ``frames_virtual/`` (made beforehand by a prepare step or an older haskd), else its rendered views in the
    cache (:func:`virtual_dir`, by :func:`ensure_frames` / ``haskd frames render``)."""
    scene_dir = Path(scene_dir)
    for d in (scene_dir / "frames", scene_dir / VIRTUAL_DIR, virtual_dir(scene_dir, num_views, image_size, fov_deg,
                                                                        seed)):
        if open_frames(d) is not None:
            return d
    return None


def ensure_frames(scene_dir, num_views: int = 20, image_size=(240, 320), fov_deg: float = 70.0, seed: int = 0) -> Path:
    """The prepare step for scenes without frames (``haskd frames render``): :func:`find_frames`, else virtual views
    rendered and written (ScanNet layout) into the cache (:func:`virtual_dir`).

    The input data are never written to (a read-only dataset works). The cache folder is written into a temporary
    sibling and renamed, so an interrupted run leaves no half folder.
    """
    from ..data.scene import atomic_dir, load_scene

    scene_dir = Path(scene_dir)
    found = find_frames(scene_dir, num_views, image_size, fov_deg, seed)
    if found is not None:
        return found
    out = virtual_dir(scene_dir, num_views, image_size, fov_deg, seed)
    scene = load_scene(scene_dir)
    views = render_views(scene.coord, scene.color, num_views, image_size, fov_deg, seed)
    if not any((d > 0).any() for _, d, _, _ in views):
        raise InputError(scene_dir, "virtual views: no point projects into any rendered view")
    with atomic_dir(out) as tmp:
        for i, (c, d, pose, K) in enumerate(views):
            write_frame(tmp, f"{i:05d}", c, depth_m=d, pose=pose)
        write_intrinsics(tmp, views[0][3])
    log.info("%s: rendered %d virtual views into %s", scene_dir, len(views), out)
    return out


def render_missing(root, splits, num_views: int = 20, progress: bool = True) -> int:
    """Render the virtual views of every scene under ``root/<split>`` that has no frames; returns how many were
    rendered (the pipeline's step before its teacher, ``haskd frames render``)."""
    from ..data.scene import list_scenes
    from ..progress import progress as bar

    todo = [d for s in splits for d in list_scenes(root, s) if find_frames(d, num_views) is None]
    for d in bar(todo, desc="virtual views", unit="scene", leave=False) if progress else todo:
        ensure_frames(d, num_views=num_views)
    return len(todo)
