"""S3DIS importer: ``Stanford3dDataset_v1.2_Aligned_Version`` -> haskd scene folders.

Input (``--raw ROOT``)::

    ROOT/Area_N/<room>/Annotations/<class>_<k>.txt    one point per line: x y z r g b (metres, 0-255)

Output (``--out ROOT``): ``val/Area_<test>_<room>/`` for the rooms of ``--test-area`` (default 5), ``train/...`` for
the others, each with ``coord.npy`` (N,3) float32, ``color.npy`` (N,3) uint8, ``segment.npy`` (N,) int16 (13 classes
of :data:`haskd.classes.S3DIS_CLASSES`; ``stairs`` -> clutter, as is customary) and ``instance.npy`` (N,) int32 (one
instance per annotation file, numbered in file-name order). Points keep the Area's global coordinates.

A line that does not parse as six numbers is skipped with a warning naming the file and line (S3DIS has one:
a stray character in ``Area_5/office_19/Annotations/ceiling_1.txt``). A file with many such lines, NaN
coordinates, colours outside 0..255 or an unknown class name fails its room only.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from ..classes import S3DIS_CLASSES
from ..data.scene import write_scene
from ..errors import HaskdError, InputError
from .manifest import Job, Manifest, run_jobs
from .scannet import default_workers

CLASS_ID = {name: i for i, name in enumerate(S3DIS_CLASSES)}
CLASS_ID["stairs"] = CLASS_ID["clutter"]
_FILE_RE = re.compile(r"^(?P<cls>.+?)_(?P<k>\d+)$")
# Tolerated malformed lines per file before the file is declared broken.
MAX_BAD_LINES = 10


def class_of(path: Path) -> int:
    """Class id from an annotation file name ``<class>_<k>.txt``; InputError for an unknown class."""
    m = _FILE_RE.match(path.stem)
    name = m.group("cls") if m else path.stem
    if name not in CLASS_ID:
        raise InputError(path, f"unknown class name '{name}' (known: {', '.join(CLASS_ID)})")
    return CLASS_ID[name]


def read_xyzrgb(path, warnings: list = None) -> np.ndarray:
    """(M, 6) float64 of a ``x y z r g b`` text file.

    Fast path: numpy's C parser over the whole file. Only when that fails is the file re-read line by line, skipping
    (and reporting in ``warnings``) the lines that are not six numbers; more than ``MAX_BAD_LINES`` of them, NaN
    coordinates or colours outside 0..255 raise :class:`InputError`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "missing file")
    if path.stat().st_size == 0:
        return np.zeros((0, 6), dtype=np.float64)
    try:
        arr = np.loadtxt(path, dtype=np.float64, ndmin=2, comments=None)
        if arr.shape[1] != 6:
            raise ValueError(f"{arr.shape[1]} columns")
    except ValueError:
        arr = _read_slow(path, warnings if warnings is not None else [])
    bad = ~np.isfinite(arr[:, :3]).all(axis=1)
    if bad.any():
        raise InputError(path, f"{int(bad.sum())} point(s) with NaN/inf coordinates (first near line "
                               f"{int(np.flatnonzero(bad)[0]) + 1})")
    rgb = arr[:, 3:]
    if rgb.size and (not np.isfinite(rgb).all() or rgb.min() < 0 or rgb.max() > 255):
        raise InputError(path, "colour values outside 0..255")
    return arr


def _read_slow(path: Path, warnings: list) -> np.ndarray:
    rows, bad = [], []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 6:
                    raise ValueError
                rows.append([float(p) for p in parts])
            except ValueError:
                bad.append(lineno)
                if len(bad) > MAX_BAD_LINES:
                    raise InputError(path, f"more than {MAX_BAD_LINES} malformed lines (lines "
                                           f"{', '.join(map(str, bad[:5]))}, ...): not x y z r g b") from None
    for lineno in bad:
        warnings.append(f"{path}:{lineno}: malformed line skipped (not 6 numbers)")
    return np.asarray(rows, dtype=np.float64).reshape(-1, 6)


def prepare_room(name: str, params: dict, out_dir: str) -> dict:
    """Convert one room (worker of :func:`haskd.prepare.manifest.run_jobs`). ``params``: ``dir`` (room folder)."""
    room = Path(params["dir"])
    ann = room / "Annotations"
    if not ann.is_dir():
        raise InputError(ann, "missing folder")
    files = sorted(p for p in ann.glob("*.txt") if not p.name.startswith("."))
    if not files:
        raise InputError(ann, "no annotation files (<class>_<k>.txt)")
    labels = [class_of(p) for p in files]   # unknown names fail before any parsing
    warnings = []
    coords, colors, segs, insts = [], [], [], []
    for k, (p, cls) in enumerate(zip(files, labels)):
        a = read_xyzrgb(p, warnings)
        coords.append(a[:, :3].astype(np.float32))
        colors.append(a[:, 3:].astype(np.uint8))
        segs.append(np.full(a.shape[0], cls, dtype=np.int16))
        insts.append(np.full(a.shape[0], k, dtype=np.int32))
    coord = np.concatenate(coords)
    if coord.shape[0] == 0:
        raise InputError(ann, "room has no point")
    write_scene(out_dir, coord, np.concatenate(colors), segment=np.concatenate(segs),
                instance=np.concatenate(insts), label_name="segment.npy")
    return {"num_points": int(coord.shape[0]), "info": {"objects": len(files)}, "warnings": warnings}


def find_rooms(raw, test_area: int = 5) -> list:
    """[(scene name, split, room dir)] for ``raw/Area_*/<room>``, sorted."""
    raw = Path(raw)
    if not raw.is_dir():
        raise InputError(raw, "raw S3DIS folder not found")
    areas = sorted(p for p in raw.iterdir() if p.is_dir() and re.fullmatch(r"Area_\d+", p.name))
    if not areas:
        raise InputError(raw, "no Area_N folders (expected Stanford3dDataset_v1.2_Aligned_Version)")
    out = []
    for area in areas:
        split = "val" if area.name == f"Area_{test_area}" else "train"
        for room in sorted(p for p in area.iterdir() if p.is_dir() and not p.name.startswith(".")):
            out.append((f"{area.name}_{room.name}", split, room))
    if not out:
        raise InputError(raw, "no room folders under the Area_N folders")
    return out


def prepare_s3dis(raw, out, test_area: int = 5, workers: int = 1):
    """Prepare every room under ``raw`` into ``out``; returns a :class:`haskd.prepare.manifest.Summary`."""
    jobs = []
    for name, split, room in find_rooms(raw, test_area):
        ann = room / "Annotations"
        inputs = sorted(ann.glob("*.txt")) if ann.is_dir() else []
        jobs.append(Job(name, split, {"dir": str(room)}, inputs=inputs))
    return run_jobs(jobs, prepare_room, Manifest(out, "s3dis"), {"format": 1}, workers=workers, desc="s3dis")


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--raw", required=True, type=Path, help="Stanford3dDataset_v1.2_Aligned_Version folder")
    parser.add_argument("--out", required=True, type=Path, help="output root (train/ and val/ scene folders)")
    parser.add_argument("--test-area", type=int, default=5, help="area whose rooms go to val/ (default 5)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="parallel processes")
    return parser


def run(args) -> int:
    if not 1 <= args.test_area <= 6:
        raise HaskdError(f"--test-area must be 1..6, got {args.test_area}")
    summary = prepare_s3dis(args.raw, args.out, test_area=args.test_area, workers=args.workers)
    summary.report()
    return summary.exit_code
