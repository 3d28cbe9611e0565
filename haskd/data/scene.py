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
    coord: np.ndarray                      # (N, 3) float32, relative to ``origin``
    color: np.ndarray                      # (N, 3) uint8
    segment: Optional[np.ndarray] = None   # (N,) int64, -1 ignore
    normal: Optional[np.ndarray] = None    # (N, 3) float32
    instance: Optional[np.ndarray] = None  # (N,) int64
    path: Optional[Path] = None
    extras: dict = field(default_factory=dict)
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))  # (3,) float64: world = coord + origin

    @property
    def world(self) -> np.ndarray:
        """(N, 3) float64 coordinates in the input's own frame (what outputs are written in)."""
        return self.coord.astype(np.float64) + self.origin

    @property
    def num_points(self) -> int:
        return int(self.coord.shape[0])

    @property
    def frames_dir(self) -> Optional[Path]:
        if self.path is None:
            return None
        d = Path(self.path) / "frames"
        return d if d.is_dir() else None


# Float32 keeps about 7 significant digits: beyond this distance from the origin (metres) a millimetre is lost, so
# scenes further out (georeferenced scans) are moved to a per-scene origin while still in float64.
FAR = 1.0e4
# Indoor scenes in metres span tens of metres; a span beyond this is a unit or export error (mm, or garbage).
MAX_SPAN = 1.0e4


def _load_npy(path: Path, what: str = "", kinds: str = "biuf") -> np.ndarray:
    """Read an .npy file that must hold numbers of the dtype kinds ``kinds`` (numpy's b, i, u, f)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for broken files
        raise InputError(path, f"cannot read .npy ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if arr.dtype.kind not in kinds:
        want = {"iu": "integers", "biu": "integers", "biuf": "numbers", "iuf": "numbers", "f": "floats"}.get(kinds, kinds)
        raise InputError(path, f"{what or 'array'} must hold {want}, got dtype {arr.dtype}")
    return arr


def to_local(coord: np.ndarray, where) -> tuple:
    """(float32 coordinates, float64 origin): coordinates far from 0 are moved by a per-scene origin (whole
    metres) while still in float64, so float32 keeps sub-millimetre precision; near ones keep origin 0 (unchanged)."""
    coord = np.asarray(coord)
    if coord.ndim != 2 or coord.shape[1] != 3:
        raise InputError(where, f"coord must be (N, 3), got {coord.shape}")
    if coord.shape[0] == 0:
        raise InputError(where, "empty scene (0 points)")
    c64 = coord.astype(np.float64, copy=False)
    finite = np.isfinite(c64)
    if not finite.all():
        bad = int((~finite).any(1).sum())
        raise InputError(where, f"{bad} point(s) with NaN/inf coordinates")
    lo, hi = c64.min(0), c64.max(0)
    span = float((hi - lo).max())
    if span > MAX_SPAN:
        raise InputError(where, f"coordinates span {span:.3g} m (more than {MAX_SPAN:.0f} m): not an indoor scene "
                                f"in metres (millimetres? a stray point?)")
    origin = np.zeros(3)
    if np.abs(c64).max() > FAR:
        origin = np.floor(lo)
    return (c64 - origin).astype(np.float32), origin


def colors_to_uint8(color: np.ndarray, where) -> np.ndarray:
    """Colours as uint8 0..255; float colours in 0..1 or 0..255 are scaled; anything else is refused."""
    if color.dtype == np.uint8:
        return color
    c = np.asarray(color, dtype=np.float64)
    if c.size and not np.isfinite(c).all():
        raise InputError(where, f"{int((~np.isfinite(c)).any(-1).sum())} colour(s) with NaN/inf")
    if c.size and (c.min() < 0 or c.max() > 255):
        raise InputError(where, f"colours must be 0..255 (or 0..1), got {c.min():g}..{c.max():g}")
    if c.size and c.max() <= 1.0 and color.dtype.kind == "f":  # exporters store colours as 0..1 floats
        c = c * 255.0
    return np.clip(np.round(c), 0, 255).astype(np.uint8)


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
    if scene.normal is not None:
        if scene.normal.shape != (n, 3):
            raise InputError(where, f"normal must be ({n}, 3), got {scene.normal.shape}")
        if not np.isfinite(scene.normal).all():
            bad = int((~np.isfinite(scene.normal)).any(1).sum())
            raise InputError(where, f"{bad} normal(s) with NaN/inf")
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
    """Read one scene folder. Raises :class:`InputError` (one line: file and reason) on bad input: a missing or
    unreadable file, a non-numeric array, NaN/inf coordinates, colours or normals, float labels, shapes that
    disagree, labels out of range. Coordinates far from 0 get a per-scene origin (``Scene.origin``)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "scene folder not found")
    for name in ("coord.npy", "color.npy"):
        if not (path / name).is_file():
            raise InputError(path / name, "missing file")
    coord, origin = to_local(_load_npy(path / "coord.npy", "coord", "iuf"), path / "coord.npy")
    color = colors_to_uint8(_load_npy(path / "color.npy", "color", "iuf"), path / "color.npy")
    segment = None
    for name in LABEL_FILES:
        if (path / name).is_file():
            # float labels would be truncated (-0.3 -> class 0): refused, not guessed
            segment = _load_npy(path / name, "labels", "iu").astype(np.int64).reshape(-1)
            break
    normal = None
    if (path / "normal.npy").is_file():
        normal = _load_npy(path / "normal.npy", "normal", "iuf").astype(np.float32)
        if normal.shape == coord.shape and not np.isfinite(normal).all():
            bad = int((~np.isfinite(normal)).any(1).sum())
            raise InputError(path / "normal.npy", f"{bad} normal(s) with NaN/inf")
    instance = None
    if (path / "instance.npy").is_file():
        instance = _load_npy(path / "instance.npy", "instance ids", "iu").astype(np.int64).reshape(-1)
    scene = Scene(path.name, coord, color, segment, normal, instance, path=path, origin=origin)
    return validate(scene, path, num_classes=num_classes, need_labels=need_labels)


@contextmanager
def atomic_dir(path):
    """Build a folder in a temporary sibling and yield it; on success it replaces ``path`` in one rename, on any
    error (or interruption) it is removed, so ``path`` is never left half-written."""
    from ..io import make_dir

    path = Path(path)
    make_dir(path.parent)
    sweep_temp_dirs(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", dir=path.parent))
    except OSError as e:
        from ..io import os_error

        raise os_error(e, path) from None
    # mkdtemp makes a private folder (0700): give the scene the permissions of any new folder (others can read it)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, read-only: one line naming the scene being written
            from ..io import os_error

            raise os_error(e, path) from None
        raise


def sweep_temp_dirs(path) -> list:
    """Remove temp folders of :func:`atomic_dir` for ``path`` (``.<name>.<pid>.<random>``) whose process is gone
    (a killed ``prepare``); returns the removed folders."""
    from ..io import _alive

    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = f".{path.name}."
    for p in path.parent.iterdir():
        rest = p.name[len(prefix):] if p.name.startswith(prefix) else ""
        pid = rest.split(".", 1)[0]
        if p.is_dir() and "." in rest and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


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
