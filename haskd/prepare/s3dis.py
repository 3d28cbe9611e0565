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

``--align-angle`` does what Pointcept's ``--align_angle`` does to the unaligned release (``Stanford3dDataset_v1.2``):
each room is turned about the z axis through the centre of its bounding box by minus the room's angle in
``Area_N/Area_N_alignmentAngle.txt``.

``--frames ROOT`` adds the room's real RGB-D frames from the 2D-3D-S release (:mod:`haskd.prepare.frames_2d3ds`) as
``frames/``. Their poses are in the frame of the *unaligned* release, so use them with ``Stanford3dDataset_v1.2``
(with or without ``--align-angle``, which turns poses with the points); the Aligned_Version's rooms are turned by an
unknown amount. Every room's frames are checked against its points (the fraction of projected points that land on
their own depth); a room below :data:`~haskd.prepare.frames_2d3ds.MIN_REGISTERED` is written without frames and
reported.
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
from .scannet import default_workers, parse_image_size

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
    info = {"objects": len(files)}
    transform = None
    if params.get("align_angle") is not None:
        transform = alignment(coord, params["align_angle"])
        coord = (coord.astype(np.float64) @ transform[:3, :3].T + transform[:3, 3]).astype(np.float32)
        info["align_angle"] = params["align_angle"]
    write_frames = None
    if params.get("frames_root"):
        from .frames_2d3ds import MIN_REGISTERED, export_room_frames, find_room_frames, registered_fraction

        area, room_name = params["area"], room.name
        frame_files = find_room_frames(params["frames_root"], area, room_name)
        if not frame_files:
            warnings.append(f"{name}: no 2D-3D-S frame of {area}/{room_name} under {params['frames_root']}")

        def export_frames(frames_dir):
            import shutil

            fi = export_room_frames(frame_files, frames_dir, params["frames_every"], params["image_size"], transform)
            if fi["skipped"]:
                warnings.append(f"{name}: skipped frames: " + ", ".join(f"{n} with {r}" for r, n in
                                                                         sorted(fi["skipped"].items())))
            if fi["written"]:
                fi["registered"] = round(registered_fraction(coord, frames_dir), 4)
                if fi["registered"] < MIN_REGISTERED:
                    warnings.append(f"{name}: frames dropped: only {fi['registered']:.0%} of the projected points "
                                    f"agree with the frames' depth (need {MIN_REGISTERED:.0%}); are the points from "
                                    "the Aligned_Version? 2D-3D-S poses match Stanford3dDataset_v1.2")
                    fi["dropped"] = True
            if not fi["written"] or fi.get("dropped"):
                shutil.rmtree(frames_dir, ignore_errors=True)
            info["frames"] = fi

        if frame_files:
            write_frames = export_frames
    write_scene(out_dir, coord, np.concatenate(colors), segment=np.concatenate(segs),
                instance=np.concatenate(insts), label_name="segment.npy", write_frames=write_frames)
    return {"num_points": int(coord.shape[0]), "info": info, "warnings": warnings}


def alignment(coord, angle_deg: float) -> np.ndarray:
    """4x4 that turns a room about the vertical axis through its bounding-box centre by ``-angle_deg`` (Pointcept's
    ``--align_angle``: rotation ``(2 - angle / 180) * pi``)."""
    coord = np.asarray(coord, dtype=np.float64)
    centre = (coord.min(0) + coord.max(0)) / 2.0
    a = np.radians(-float(angle_deg))
    R = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = centre - R @ centre
    return T


def read_alignment_angles(area_dir) -> dict:
    """{room: angle in degrees} from ``Area_N/Area_N_alignmentAngle.txt`` (``#`` lines are comments)."""
    area_dir = Path(area_dir)
    path = area_dir / f"{area_dir.name}_alignmentAngle.txt"
    if not path.is_file():
        raise InputError(path, "missing file (needed by --align-angle)")
    out = {}
    for k, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            if len(parts) != 2:
                raise ValueError
            out[parts[0]] = float(parts[1])
        except ValueError:
            raise InputError(path, f"line {k}: expected '<room> <angle>', got {line.strip()[:60]!r}") from None
    return out


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


def prepare_s3dis(raw, out, test_area: int = 5, workers: int = 1, frames=None, frames_every: int = 5,
                  image_size=(320, 240), align_angle: bool = False):
    """Prepare every room under ``raw`` into ``out``; returns a :class:`haskd.prepare.manifest.Summary`.

    ``frames``: 2D-3D-S root (see the module doc); ``frames_every``: keep every s-th frame of each camera;
    ``image_size``: (W, H) colour size or None (native); ``align_angle``: Pointcept's per-room alignment."""
    from .frames_2d3ds import find_room_frames

    if frames is not None and not Path(frames).is_dir():
        raise InputError(Path(frames), "2D-3D-S folder not found")
    angles = {}
    jobs = []
    for name, split, room in find_rooms(raw, test_area):
        ann = room / "Annotations"
        inputs = sorted(ann.glob("*.txt")) if ann.is_dir() else []
        params = {"dir": str(room)}
        area = room.parent.name
        if align_angle:
            if area not in angles:
                angles[area] = read_alignment_angles(room.parent)
            if room.name not in angles[area]:
                raise InputError(room.parent / f"{area}_alignmentAngle.txt", f"no angle for room {room.name}")
            params["align_angle"] = angles[area][room.name]
        if frames is not None:
            params.update(frames_root=str(frames), area=area, frames_every=int(frames_every),
                          image_size=tuple(image_size) if image_size else None)
            inputs += sorted(p for f in find_room_frames(frames, area, room.name).values() for p in f.values())
        jobs.append(Job(name, split, params, inputs=inputs))
    options = {"format": 1}
    if align_angle:
        options["align_angle"] = True
    if frames is not None:
        options.update(frames=2, frames_every=int(frames_every), image_size=list(image_size) if image_size else None)
    return run_jobs(jobs, prepare_room, Manifest(out, "s3dis"), options, workers=workers, desc="s3dis")


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--raw", required=True, type=Path,
                        help="Stanford3dDataset_v1.2_Aligned_Version folder, or Stanford3dDataset_v1.2 (unaligned: "
                             "needed by --frames, and by --align-angle)")
    parser.add_argument("--out", required=True, type=Path, help="output root (train/ and val/ scene folders)")
    parser.add_argument("--test-area", type=int, default=5, help="area whose rooms go to val/ (default 5)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="parallel processes")
    parser.add_argument("--align-angle", action="store_true",
                        help="turn each room by its Area_N_alignmentAngle.txt angle, as Pointcept's --align_angle "
                             "(points and frames alike)")
    parser.add_argument("--frames", type=Path, default=None, metavar="ROOT",
                        help="2D-3D-S root (area_1 ... area_5a, area_5b, area_6, each with data/rgb|depth|pose): "
                             "write each room's RGB-D frames to frames/")
    parser.add_argument("--frames-every", type=int, default=5,
                        help="keep every s-th frame of each 2D-3D-S camera (default 5)")
    parser.add_argument("--image-size", type=parse_image_size, default=(320, 240),
                        help="colour frames resized to WxH, intrinsics scaled (default 320x240; 'native' keeps "
                             "the 1080x1080 size); depth stays native")
    return parser


def run(args) -> int:
    if not 1 <= args.test_area <= 6:
        raise HaskdError(f"--test-area must be 1..6, got {args.test_area}")
    if args.frames_every < 1:
        raise HaskdError(f"--frames-every must be at least 1, got {args.frames_every}")
    summary = prepare_s3dis(args.raw, args.out, test_area=args.test_area, workers=args.workers, frames=args.frames,
                            frames_every=args.frames_every, image_size=args.image_size, align_angle=args.align_angle)
    summary.report()
    return summary.exit_code
