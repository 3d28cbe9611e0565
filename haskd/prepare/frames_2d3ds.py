"""2D-3D-S RGB-D frames (the image release of S3DIS's areas) -> a room's ``frames/`` folder (ScanNet layout,
:mod:`haskd.data.frames`), in the coordinates of the room's points.

Input, per area (``area_1`` ... ``area_4``, ``area_5a``, ``area_5b``, ``area_6``; S3DIS's Area_5 is 5a + 5b)::

    <root>/<area>/data/rgb/camera_<uuid>_<room>_frame_<n>_domain_rgb.png      RGB, 1080x1080 in the release
    <root>/<area>/data/depth/camera_<uuid>_<room>_frame_<n>_domain_depth.png  uint16, 1/512 m, 65535 = missing
    <root>/<area>/data/pose/camera_<uuid>_<room>_frame_<n>_domain_pose.json   camera_k_matrix (3x3),
                                                                              camera_rt_matrix (3x4 world->camera)

``<room>`` is the S3DIS room folder name (``office_1``). The depth is z-depth (along the optical axis) in these
perspective images (the panoramas under ``pano/`` hold ray distance and are not read). The camera frame is OpenCV's
(x right, y down, z forward), so the camera-to-world pose is the inverse of ``[camera_rt_matrix; 0 0 0 1]``. The
world is the area's frame, the one of the *unaligned* S3DIS release (``Stanford3dDataset_v1.2``); Pointcept's
``--align_angle`` (rotation of each room about its box centre) is applied to points and poses alike by the caller.

Output frames: id ``<uuid>_<n>`` (zero-padded n); colour JPEG (quality 95, resized to ``image_size`` when given,
colour intrinsics scaled to match); depth uint16 millimetres at the native size (``round(raw * 1000 / 512)``, which
maps each 1/512 m step to its own millimetre value, so the original is recovered exactly; 65535 -> 0); pose
camera-to-world. The frames/ layout holds one pair of intrinsics per room: a frame whose K differs from the room's
first frame is resampled onto that K (exact pinhole remap: colour bilinear, depth nearest; depth values unchanged).
"""
from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..data.frames import scale_intrinsic, write_intrinsics
from ..errors import InputError

FRAME_RE = re.compile(r"^camera_(?P<cam>[0-9A-Za-z]+)_(?P<room>.+)_frame_(?P<n>\d+)_domain_(?P<kind>rgb|depth|pose)"
                      r"\.(?P<ext>png|json)$")
KIND_EXT = {"rgb": "png", "depth": "png", "pose": "json"}
DEPTH_SCALE = 512.0          # raw units per metre
DEPTH_MISSING = 65535
# A room whose points fall on the depth of fewer than this fraction of the pixels they project to is taken as not
# registered with its frames. Measured on the test fixtures (views rendered from the real, partial Area_1
# conferenceRoom_1): 0.54 registered (occlusion and splat footprints keep it well below 1), 0.075 with the points
# turned by 90 degrees against the poses.
MIN_REGISTERED = 0.2


def area_dirs(root, area: str) -> list:
    """2D-3D-S area folders for an S3DIS area name (``Area_5`` -> ``area_5a``, ``area_5b``; ``Area_1`` ->
    ``area_1``); case-insensitive; only those holding ``data/``."""
    root = Path(root)
    m = re.fullmatch(r"Area_(\d+)", area)
    if m is None or not root.is_dir():
        return []
    want = re.compile(rf"area_{m.group(1)}[ab]?", re.IGNORECASE)
    return sorted(p for p in root.iterdir() if p.is_dir() and want.fullmatch(p.name) and (p / "data").is_dir())


def find_room_frames(root, area: str, room: str) -> dict:
    """{(camera uuid, frame number): {"rgb"|"depth"|"pose": path}} for one room; frames missing a file are kept
    with what they have (the exporter counts them as skipped)."""
    found = defaultdict(dict)
    for d in area_dirs(root, area):
        for kind, ext in KIND_EXT.items():
            sub = d / "data" / kind
            if not sub.is_dir():
                continue
            for p in sub.glob(f"camera_*_{room}_frame_*_domain_{kind}.{ext}"):
                m = FRAME_RE.match(p.name)
                if m and m.group("room") == room and m.group("kind") == kind:
                    found[(m.group("cam"), int(m.group("n")))][kind] = p
    return dict(found)


def read_pose_json(path):
    """(K (3,3), camera-to-world (4,4)) from a 2D-3D-S pose JSON; InputError when keys are missing, of the wrong
    shape, not finite, or the rotation is not a rotation."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        K = np.asarray(d["camera_k_matrix"], dtype=np.float64)
        rt = np.asarray(d["camera_rt_matrix"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(path, f"not a 2D-3D-S pose file ({type(e).__name__}: {e})") from None
    if K.shape != (3, 3) or rt.shape != (3, 4):
        raise InputError(path, f"camera_k_matrix must be 3x3 and camera_rt_matrix 3x4, got {K.shape}, {rt.shape}")
    if not (np.isfinite(K).all() and np.isfinite(rt).all()):
        raise InputError(path, "non-finite camera matrix")
    R, t = rt[:, :3], rt[:, 3]
    if np.abs(R @ R.T - np.eye(3)).max() > 1e-4 or np.linalg.det(R) < 0:
        raise InputError(path, "camera_rt_matrix's left 3x3 is not a rotation")
    pose = np.eye(4)
    pose[:3, :3] = R.T
    pose[:3, 3] = -R.T @ t
    return K, pose


def read_depth(path) -> np.ndarray:
    """(H, W) uint16 raw 2D-3D-S depth (1/512 m, 65535 missing)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            d = np.asarray(im)
    except Exception as e:
        raise InputError(path, f"unreadable depth PNG ({type(e).__name__}: {e})") from None
    if d.ndim != 2 or d.dtype not in (np.uint16, np.int32, np.uint32, np.int64):
        raise InputError(path, f"expected a 16-bit single-channel PNG, got shape {d.shape} dtype {d.dtype}")
    return d.astype(np.uint16)


def depth_to_mm(raw: np.ndarray):
    """raw 1/512 m -> (uint16 mm, 0 = missing; number of pixels beyond 65.535 m set missing)."""
    raw = np.asarray(raw, dtype=np.int64)
    mm = np.rint(raw * (1000.0 / DEPTH_SCALE))
    far = (raw != DEPTH_MISSING) & (mm > 65535)
    mm[(raw == DEPTH_MISSING) | far] = 0
    return mm.astype(np.uint16), int(far.sum())


def _remap(img: np.ndarray, K_src, K_dst, size_hw, nearest: bool) -> np.ndarray:
    """Resample an image taken with ``K_src`` onto ``K_dst`` (same camera centre and axes; pixel-centre convention
    of :mod:`haskd.images.lifting`): output pixel (u, v) reads the input at ``K_src K_dst^-1 (u, v, 1)``."""
    import torch
    import torch.nn.functional as F

    H, W = size_hw
    h0, w0 = img.shape[:2]
    M = np.asarray(K_src, dtype=np.float64) @ np.linalg.inv(np.asarray(K_dst, dtype=np.float64))
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    src = np.stack([u, v, np.ones_like(u)], -1) @ M.T
    su, sv = src[..., 0] / src[..., 2], src[..., 1] / src[..., 2]
    if nearest:
        ui, vi = np.rint(su).astype(np.int64), np.rint(sv).astype(np.int64)
        ok = (ui >= 0) & (ui < w0) & (vi >= 0) & (vi < h0)
        out = np.zeros((H, W) + img.shape[2:], dtype=img.dtype)
        out[ok] = img[vi[ok], ui[ok]]
        return out
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    grid = torch.from_numpy(np.stack([(2 * su + 1) / w0 - 1, (2 * sv + 1) / h0 - 1], -1)).float()[None]
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0].permute(1, 2, 0)
    return np.clip(np.rint(out.numpy()), 0, 255).astype(np.uint8)


def export_room_frames(files: dict, frames_dir, every: int = 5, image_size=None, transform=None) -> dict:
    """Write every ``every``-th frame of each camera (frame numbers in order) of a room into ``frames_dir``.

    ``files``: :func:`find_room_frames` output. ``image_size``: (W, H) for colour, or None (native).
    ``transform``: 4x4 applied to every camera-to-world pose (the room's alignment), or None.
    Returns ``{"written", "skipped": {reason: count}, "resampled", "far_depth", "color_size", "depth_size"}``.
    """
    from PIL import Image

    frames_dir = Path(frames_dir)
    by_cam = defaultdict(list)
    for (cam, n) in sorted(files):
        by_cam[cam].append(n)
    chosen = [(cam, n) for cam in sorted(by_cam) for n in by_cam[cam][::max(1, every)]]
    skipped = defaultdict(int)
    written = resampled = far = 0
    K0 = native = depth_hw = None
    poses = {}
    for cam, n in chosen:
        f = files[(cam, n)]
        missing = [k for k in KIND_EXT if k not in f]
        if missing:
            skipped[f"no {missing[0]}"] += 1
            continue
        K, pose = read_pose_json(f["pose"])
        raw = read_depth(f["depth"])
        with Image.open(f["rgb"]) as im:
            rgb = np.asarray(im.convert("RGB"))
        if K0 is None:
            K0, native, depth_hw = K, (rgb.shape[1], rgb.shape[0]), raw.shape
            for sub in ("color", "depth", "pose"):
                (frames_dir / sub).mkdir(parents=True, exist_ok=True)
        if rgb.shape[:2] != raw.shape:
            raise InputError(f["depth"], f"depth {raw.shape} and colour {rgb.shape[:2]} sizes differ")
        if raw.shape != depth_hw or not np.allclose(K, K0, rtol=0, atol=1e-6):
            # frames/ holds one K per room: put this frame on the room's K (an exact pinhole remap)
            rgb = _remap(rgb, K, K0, depth_hw, nearest=False)
            raw = _remap(raw, K, K0, depth_hw, nearest=True)
            raw[raw == 0] = DEPTH_MISSING
            resampled += 1
        mm, nfar = depth_to_mm(raw)
        far += nfar
        img = Image.fromarray(rgb)
        if image_size and tuple(image_size) != native:
            img = img.resize(tuple(image_size), getattr(Image, "Resampling", Image).BILINEAR, reducing_gap=2.0)
        fid = f"{cam}_{n:04d}"
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        (frames_dir / "color" / f"{fid}.jpg").write_bytes(buf.getvalue())
        Image.fromarray(mm).save(frames_dir / "depth" / f"{fid}.png", compress_level=1)
        if transform is not None:
            pose = np.asarray(transform, dtype=np.float64) @ pose
        np.savetxt(frames_dir / "pose" / f"{fid}.txt", pose, fmt="%.17g")
        poses[fid] = pose
        written += 1
    size = tuple(image_size) if image_size else native
    if written:
        write_intrinsics(frames_dir, scale_intrinsic(K0, size[0] / native[0], size[1] / native[1]), K0)
    return {"written": written, "skipped": dict(skipped), "resampled": resampled, "far_depth": far,
            "color_size": list(size) if written else None,
            "depth_size": [depth_hw[1], depth_hw[0]] if written else None}


def registered_fraction(coord, frames_dir, tau: float = 0.05, max_points: int = 20000, seed: int = 0) -> float:
    """Of the (room point, frame) pairs where the point projects onto a valid depth pixel in front of the camera,
    the fraction whose depth agrees within ``tau`` metres: near 1 minus occlusion when frames and points share a
    frame, near 0 when they do not (e.g. unaligned poses on Aligned_Version points)."""
    import torch

    from ..data.frames import open_frames
    from ..images.lifting import inside, project

    fs = open_frames(frames_dir)
    if fs is None:
        return 0.0
    coord = np.asarray(coord)
    if len(coord) > max_points:
        coord = coord[np.random.default_rng(seed).choice(len(coord), max_points, replace=False)]
    hit = seen = 0
    for fid in fs.ids:
        fr = fs.load(fid, color=False)
        d = torch.from_numpy(fr.depth)
        uv, z = project(coord.astype(np.float64), fr.pose, fs.K_depth)
        h, w = d.shape
        ok = (z[0] > 1e-3) & inside(uv, (h, w))[0]
        ui = torch.round(uv[0, :, 0]).long().clamp(0, w - 1)
        vi = torch.round(uv[0, :, 1]).long().clamp(0, h - 1)
        dz = d[vi, ui].double()
        ok &= dz > 0
        seen += int(ok.sum())
        hit += int((ok & ((dz - z[0]).abs() < tau)).sum())
    return hit / seen if seen else 0.0
