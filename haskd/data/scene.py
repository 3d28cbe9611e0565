"""Scene folders (Pointcept layout) -- the one on-disk format every part of haskd reads.

``<root>/<split>/<scene>/``::

    coord.npy     (N, 3) float32, metres
    color.npy     (N, 3) uint8
    normal.npy    (N, 3) float32            optional
    segment20.npy | segment.npy (N,) int    -1 = ignore; segment20 wins when both exist
    instance.npy  (N,) int                  optional
    frames/       optional RGB-D sequence, see :mod:`haskd.data.frames`
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError

LABEL_FILES = ("segment20.npy", "segment.npy")


@dataclass
class Scene:
    name: str
    coord: np.ndarray                      # (N, 3) float32
    color: np.ndarray                      # (N, 3) uint8
    segment: Optional[np.ndarray] = None   # (N,) int64, -1 ignore
    normal: Optional[np.ndarray] = None    # (N, 3) float32
    instance: Optional[np.ndarray] = None  # (N,) int64
    path: Optional[Path] = None
    extras: dict = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        return int(self.coord.shape[0])

    @property
    def frames_dir(self) -> Optional[Path]:
        if self.path is None:
            return None
        d = Path(self.path) / "frames"
        return d if d.is_dir() else None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for broken files
        raise InputError(path, f"cannot read .npy ({type(e).__name__}: {e})") from None


def validate(scene: Scene, where, num_classes: Optional[int] = None, need_labels: bool = False) -> Scene:
    """Check shapes and values; raise :class:`InputError` naming ``where`` and the reason."""
    c = scene.coord
    if c.ndim != 2 or c.shape[1] != 3:
        raise InputError(where, f"coord must be (N, 3), got {c.shape}")
    if c.shape[0] == 0:
        raise InputError(where, "empty scene (0 points)")
    if not np.isfinite(c).all():
        bad = int((~np.isfinite(c)).any(1).sum())
        raise InputError(where, f"{bad} point(s) with NaN/inf coordinates")
    n = c.shape[0]
    if scene.color.shape != (n, 3):
        raise InputError(where, f"color must be ({n}, 3), got {scene.color.shape}")
    if scene.normal is not None and scene.normal.shape != (n, 3):
        raise InputError(where, f"normal must be ({n}, 3), got {scene.normal.shape}")
    if scene.segment is not None:
        s = scene.segment
        if s.shape != (n,):
            raise InputError(where, f"segment must be ({n},), got {s.shape}")
        if num_classes is not None:
            bad = (s < -1) | (s >= num_classes)
            if bad.any():
                raise InputError(where, f"{int(bad.sum())} label(s) outside [-1, {num_classes - 1}] "
                                        f"(e.g. {int(s[bad][0])})")
        if need_labels and not (s >= 0).any():
            raise InputError(where, "no labeled point (all labels are -1)")
    elif need_labels:
        raise InputError(where, f"no label file ({' or '.join(LABEL_FILES)})")
    return scene


def load_scene(path, num_classes: Optional[int] = None, need_labels: bool = False) -> Scene:
    """Read one scene folder. Raises :class:`InputError` (one line: file and reason) on bad input."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "scene folder not found")
    for name in ("coord.npy", "color.npy"):
        if not (path / name).is_file():
            raise InputError(path / name, "missing file")
    coord = _load_npy(path / "coord.npy").astype(np.float32, copy=False)
    color = _load_npy(path / "color.npy")
    if color.dtype != np.uint8:
        # Some exporters store colours as float 0..255 or 0..1.
        color = np.asarray(color, dtype=np.float64)
        if color.size and color.max() <= 1.0:
            color = color * 255.0
        color = np.clip(np.round(color), 0, 255).astype(np.uint8)
    segment = None
    for name in LABEL_FILES:
        if (path / name).is_file():
            segment = _load_npy(path / name).astype(np.int64).reshape(-1)
            break
    normal = _load_npy(path / "normal.npy").astype(np.float32) if (path / "normal.npy").is_file() else None
    instance = _load_npy(path / "instance.npy").astype(np.int64).reshape(-1) if (path / "instance.npy").is_file() else None
    scene = Scene(path.name, coord, color, segment, normal, instance, path=path)
    return validate(scene, path, num_classes=num_classes, need_labels=need_labels)


@contextmanager
def atomic_dir(path):
    """Build a folder in a temporary sibling and yield it; on success it replaces ``path`` in one rename, on any
    error (or interruption) it is removed, so ``path`` is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_scene(path, coord, color, segment=None, normal=None, instance=None, label_name="segment20.npy",
                extra_files: Optional[dict] = None, write_frames=None) -> Path:
    """Write a scene folder atomically (see :func:`atomic_dir`).

    ``extra_files``: {relative name: np.ndarray} written as .npy. ``write_frames``: optional callable that writes the
    RGB-D frames straight into the given ``frames/`` folder of the scene being built (no staging copy).
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        np.save(tmp / "coord.npy", np.ascontiguousarray(coord, dtype=np.float32))
        np.save(tmp / "color.npy", np.ascontiguousarray(color, dtype=np.uint8))
        if segment is not None:
            np.save(tmp / label_name, np.ascontiguousarray(segment, dtype=np.int16 if np.max(segment, initial=0) < 32767 else np.int32))
        if normal is not None:
            np.save(tmp / "normal.npy", np.ascontiguousarray(normal, dtype=np.float32))
        if instance is not None:
            np.save(tmp / "instance.npy", np.ascontiguousarray(instance, dtype=np.int32))
        for name, arr in (extra_files or {}).items():
            np.save(tmp / name, arr)
        if write_frames is not None:
            write_frames(tmp / "frames")
    return path


def list_scenes(root, split: str) -> list:
    """Sorted scene folders of ``<root>/<split>``; raises InputError when the split is missing or empty."""
    d = Path(root) / split
    if not d.is_dir():
        raise InputError(d, f"split folder '{split}' not found under data root")
    scenes = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not scenes:
        raise InputError(d, "no scene folders in split")
    return scenes
