"""RGB-D frame sequences in ScanNet's exported layout, inside a scene folder::

    frames/color/<id>.jpg                 RGB (any size)
    frames/depth/<id>.png                 uint16 depth in millimetres, 0 = invalid
    frames/pose/<id>.txt                  4x4 camera-to-world
    frames/intrinsic/intrinsic_color.txt  4x4 (fx, fy, cx, cy in the top-left 3x3)
    frames/intrinsic/intrinsic_depth.txt  4x4, for the depth image size

Frames with a non-finite pose (ScanNet has ``-inf`` poses), a colour image without depth, or an unreadable file are
skipped and counted, never used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)


@dataclass
class Frame:
    frame_id: str
    color: np.ndarray      # (H, W, 3) uint8
    depth: np.ndarray      # (h, w) float32 metres, 0 = invalid
    pose: np.ndarray       # (4, 4) float64 camera-to-world
    K_color: np.ndarray    # (3, 3) for color's resolution
    K_depth: np.ndarray    # (3, 3) for depth's resolution


@dataclass
class FrameSet:
    root: Path
    ids: list                                   # usable frame ids, sorted
    K_color: np.ndarray
    K_depth: np.ndarray
    skipped: dict = field(default_factory=dict)  # reason -> count

    def pose(self, fid) -> np.ndarray:
        return read_pose(self.root / "pose" / f"{fid}.txt")

    def load(self, fid, color: bool = True) -> Frame:
        from PIL import Image

        c = np.asarray(Image.open(self.root / "color" / f"{fid}.jpg").convert("RGB")) if color else None
        d = np.asarray(Image.open(self.root / "depth" / f"{fid}.png"), dtype=np.float32) / 1000.0
        return Frame(fid, c, d, self.pose(fid), self.K_color, self.K_depth)


def read_matrix(path) -> np.ndarray:
    try:
        m = np.loadtxt(path, dtype=np.float64)
    except Exception as e:
        raise InputError(path, f"cannot parse matrix ({e})") from None
    if m.shape != (4, 4) and m.shape != (3, 3):
        raise InputError(path, f"expected a 4x4 or 3x3 matrix, got shape {m.shape}")
    return m


def read_pose(path) -> np.ndarray:
    m = read_matrix(path)
    if m.shape != (4, 4):
        raise InputError(path, "pose must be 4x4")
    return m


def read_intrinsic(path) -> np.ndarray:
    return read_matrix(path)[:3, :3].copy()


def write_intrinsics(frames_dir, K_color, K_depth=None):
    d = Path(frames_dir) / "intrinsic"
    d.mkdir(parents=True, exist_ok=True)
    for name, K in (("intrinsic_color.txt", K_color), ("intrinsic_depth.txt", K_color if K_depth is None else K_depth)):
        M = np.eye(4)
        M[:3, :3] = np.asarray(K)[:3, :3]
        np.savetxt(d / name, M, fmt="%.6f")


def write_frame(frames_dir, frame_id, color=None, depth_m=None, pose=None, depth_mm=None, quality=95,
                color_bytes=None):
    """Write one frame. ``color`` (H,W,3) uint8, or ``color_bytes`` (an encoded JPEG, written as-is, lossless);
    depth as metres (float) or millimetres (uint16); pose 4x4 (written with enough digits to round-trip)."""
    from PIL import Image

    d = Path(frames_dir)
    for sub in ("color", "depth", "pose"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    if color_bytes is not None:
        (d / "color" / f"{frame_id}.jpg").write_bytes(color_bytes)
    else:
        Image.fromarray(np.asarray(color, dtype=np.uint8)).save(d / "color" / f"{frame_id}.jpg", quality=quality)
    if depth_mm is None:
        depth_mm = np.clip(np.round(np.asarray(depth_m) * 1000.0), 0, 65535).astype(np.uint16)
    Image.fromarray(np.asarray(depth_mm, dtype=np.uint16)).save(d / "depth" / f"{frame_id}.png")
    np.savetxt(d / "pose" / f"{frame_id}.txt", np.asarray(pose, dtype=np.float64), fmt="%.17g")


def open_frames(frames_dir, strict: bool = False):
    """Index a frames folder. Returns a :class:`FrameSet`, or None when the folder holds no usable frame.

    Unusable frames are skipped and counted in ``FrameSet.skipped`` (logged as one warning). With ``strict`` a
    folder that exists but has nothing usable raises :class:`InputError`.
    """
    d = Path(frames_dir)
    if not (d / "color").is_dir():
        if strict:
            raise InputError(d, "no color/ folder in frames")
        return None
    intr = d / "intrinsic"
    if not (intr / "intrinsic_color.txt").is_file():
        if strict:
            raise InputError(intr / "intrinsic_color.txt", "missing intrinsics")
        log.warning("%s: missing intrinsics, frames ignored", intr / "intrinsic_color.txt")
        return None
    K_color = read_intrinsic(intr / "intrinsic_color.txt")
    kd = intr / "intrinsic_depth.txt"
    K_depth = read_intrinsic(kd) if kd.is_file() else K_color.copy()
    skipped = {}
    ids = []
    for p in sorted((d / "color").glob("*.jpg")):
        fid = p.stem
        reason = None
        if not (d / "depth" / f"{fid}.png").is_file():
            reason = "no depth"
        elif not (d / "pose" / f"{fid}.txt").is_file():
            reason = "no pose"
        else:
            try:
                pose = read_pose(d / "pose" / f"{fid}.txt")
                if not np.isfinite(pose).all():
                    reason = "non-finite pose"
            except InputError:
                reason = "unreadable pose"
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            ids.append(fid)
    if skipped:
        log.warning("%s: skipped %s", d, ", ".join(f"{n} frame(s) with {r}" for r, n in sorted(skipped.items())))
    if not ids:
        if strict:
            raise InputError(d, f"no usable frame ({skipped})")
        return None
    return FrameSet(d, ids, K_color, K_depth, skipped)


def scale_intrinsic(K, sx: float, sy: float) -> np.ndarray:
    """Intrinsics for an image resized by (sx, sy) (pixel-centre convention of ScanNet: plain scaling)."""
    K = np.asarray(K, dtype=np.float64).copy()
    K[0, :] *= sx
    K[1, :] *= sy
    K[2, :] = (0, 0, 1)
    return K
