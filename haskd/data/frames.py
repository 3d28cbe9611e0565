"""RGB-D frame sequences in ScanNet's exported layout, inside a scene folder::

    frames/color/<id>.jpg                 RGB (any size)
    frames/depth/<id>.png                 uint16 depth in millimetres, 0 = invalid
    frames/pose/<id>.txt                  4x4 camera-to-world
    frames/intrinsic/intrinsic_color.txt  4x4 (fx, fy, cx, cy in the top-left 3x3)
    frames/intrinsic/intrinsic_depth.txt  4x4, for the depth image size

Frames with a non-finite pose (ScanNet has ``-inf`` poses), a colour image without depth, an unreadable image or
pose, a depth image that is not 16-bit or not of the sequence's size are skipped and counted, never used.
Intrinsics that are not finite, have fx or fy <= 0, or do not fit the images' size stop with one line.
"""
from __future__ import annotations

import logging
import os
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
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))  # the scene's origin (see Scene.origin)
    depth_hw: tuple = ()                         # (h, w) of every usable depth image

    def pose(self, fid) -> np.ndarray:
        """Camera-to-world, in the scene's local frame (world minus the scene's origin)."""
        m = read_pose(self.root / "pose" / f"{fid}.txt")
        m[:3, 3] -= self.origin
        return m

    def read_color(self, fid) -> np.ndarray:
        """(H, W, 3) uint8; an unreadable (truncated, garbage) file raises :class:`InputError` naming it."""
        return _read_image(self.root / "color" / f"{fid}.jpg", "RGB")

    def read_depth(self, fid) -> np.ndarray:
        """(h, w) float32 metres; unreadable, not 16-bit, or of another size than the others: :class:`InputError`."""
        path = self.root / "depth" / f"{fid}.png"
        d = _read_image(path, None)
        if d.dtype != np.uint16 and d.dtype != np.int32:
            raise InputError(path, f"depth must be a 16-bit PNG in millimetres, got {d.dtype}")
        if self.depth_hw and d.shape != tuple(self.depth_hw):
            raise InputError(path, f"depth of size {d.shape[1]}x{d.shape[0]}, the others are "
                                   f"{self.depth_hw[1]}x{self.depth_hw[0]}")
        return d.astype(np.float32) / 1000.0

    def load(self, fid, color: bool = True) -> Frame:
        c = self.read_color(fid) if color else None
        return Frame(fid, c, self.read_depth(fid), self.pose(fid), self.K_color, self.K_depth)


def _read_image(path, mode) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if mode is None and im.mode in ("I;16", "I;16B", "I;16L"):
                return np.array(im, dtype=np.uint16)
            return np.asarray(im.convert(mode) if mode else im)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for truncated or garbage files
        raise InputError(path, f"unreadable image ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


_HEADERS: dict = {}  # (path, size, mtime) -> header: a scene's frame list is opened several times per run


def _header(path):
    """(mode, (h, w)) from an image's header, or None when the header is unreadable."""
    from PIL import Image

    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HEADERS:
        try:
            with Image.open(path) as im:
                _HEADERS[key] = (im.mode, (im.height, im.width))
        except Exception:
            _HEADERS[key] = None
    return _HEADERS[key]


def check_intrinsic(K, path, hw=None) -> np.ndarray:
    """Refuse intrinsics that are not finite or have fx, fy <= 0, and (given the image size ``hw``) a principal
    point far from the image centre (intrinsics of another image size): one line naming the file."""
    K = np.asarray(K, dtype=np.float64)
    if not np.isfinite(K).all():
        raise InputError(path, "intrinsics hold NaN/inf")
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    if fx <= 0 or fy <= 0:
        raise InputError(path, f"intrinsics need fx, fy > 0, got fx={fx:g} fy={fy:g}")
    if hw:
        h, w = hw
        if not (0.25 * w <= cx <= 0.75 * w and 0.25 * h <= cy <= 0.75 * h):
            raise InputError(path, f"principal point ({cx:g}, {cy:g}) is not near the centre of the {w}x{h} "
                                   f"images: intrinsics for another image size?")
    return K


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
    check_intrinsic(K_color, intr / "intrinsic_color.txt")
    check_intrinsic(K_depth, kd if kd.is_file() else intr / "intrinsic_color.txt")
    skipped = {}
    ids, depth_hw, color_hw = [], {}, {}
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
        if not reason:  # image headers only (cheap); a file truncated after its header is caught when read
            ch, dh = _header(p), _header(d / "depth" / f"{fid}.png")  # cached per file (size, mtime)
            if ch is None or dh is None:
                reason = "unreadable image"
            elif dh[0] not in ("I;16", "I;16B", "I;16L", "I"):
                reason = "depth not 16-bit"
            else:
                depth_hw[fid], color_hw[fid] = dh[1], ch[1]
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            ids.append(fid)
    if ids:  # depth images of one size: frames of another size are skipped (their intrinsics would not fit)
        sizes = [depth_hw[f] for f in ids]
        common = max(set(sizes), key=sizes.count)
        other = [f for f in ids if depth_hw[f] != common]
        if other:
            skipped["depth of another size"] = len(other)
            ids = [f for f in ids if depth_hw[f] == common]
        check_intrinsic(K_depth, kd if kd.is_file() else intr / "intrinsic_color.txt", common)
        check_intrinsic(K_color, intr / "intrinsic_color.txt", color_hw[ids[0]])
    if skipped:
        log.warning("%s: skipped %s", d, ", ".join(f"{n} frame(s) with {r}" for r, n in sorted(skipped.items())))
    if not ids:
        if strict:
            raise InputError(d, f"no usable frame ({skipped})")
        return None
    return FrameSet(d, ids, K_color, K_depth, skipped, depth_hw=common)


def scale_intrinsic(K, sx: float, sy: float) -> np.ndarray:
    """Intrinsics for an image resized by (sx, sy) (pixel-centre convention of ScanNet: plain scaling)."""
    K = np.asarray(K, dtype=np.float64).copy()
    K[0, :] *= sx
    K[1, :] *= sy
    K[2, :] = (0, 0, 1)
    return K
