"""Import the real data samples of ``shared/data`` into haskd scene folders.

Sources (each folder has its own README with provenance and formats):

    scannet_rgbd_ai360/            3 ScanNet scenes with RGB-D frames; scene0000_00 also per-point NYU40 labels
    scannet_mmdet3d_testdata/      scene0000_00/01/02 full resolution, NYU40 + instance
    scannet_votenet_50k_picwoon/   15 scenes (scene0001_00 .. scene0008_00), 50k-point subsamples, NYU40 + instance
    s3dis_area1_conferenceRoom1_partial/   raw S3DIS Annotations/*.txt (6 objects of one room)
    s3dis_mmdet3d_testdata/        100 points of Area_1/office_2
    s3dis_room_instance_resampled_wdc/     one office, xyz only, objects resampled to 8192 points

Output (``out``)::

    scannet/train/<scene>/        rooms not in ``val_rooms`` (13 scenes with the shared samples)
    scannet/val/<scene>/          rooms in ``val_rooms`` (5 scenes)
    scannet/frames_only/<scene>/  unlabeled scenes with frames (teacher / frame-filter demos)
    s3dis/<split>/Area_N_<room>/  segment.npy with the 13 S3DIS classes; names and splits as haskd.prepare.s3dis
                                  (Area_5 -> val; none of the samples is from Area 5, so all are train)

ScanNet scenes: coordinates in the **axis-aligned** frame (as in the mmdet3d / votenet files). For the ai360 scenes
the points are aligned with ``meta.json``'s axis_align_matrix and the frame poses are pre-multiplied by the same
matrix, so frames and points stay registered; ``axis_align_matrix.npy`` is kept to go back to the raw frame.
Labels: ``segment20.npy`` (ScanNet-20 ids, -1 ignore) and ``segment_nyu40.npy`` (source ids, 0 = unannotated);
``instance.npy`` keeps the source ids (0 = none). When a scene exists in several sources the richest one wins:
ai360 (frames + labels) > mmdet3d (full resolution) > votenet (50k subsample).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from ..classes import nyu40_to_scannet20
from ..data.frames import read_matrix
from ..data.scene import write_scene
from ..errors import InputError

log = logging.getLogger(__name__)

AI360 = "scannet_rgbd_ai360"
MMDET3D = "scannet_mmdet3d_testdata"
VOTENET = "scannet_votenet_50k_picwoon"
S3DIS_RAW = "s3dis_area1_conferenceRoom1_partial"
S3DIS_MMDET3D = "s3dis_mmdet3d_testdata"
S3DIS_WDC = "s3dis_room_instance_resampled_wdc"
DEFAULT_VAL_ROOMS = ("scene0006", "scene0007", "scene0008")
# colour written for the xyz-only S3DIS sample (scene folders require colour); flagged in the summary
NO_COLOR_GRAY = 128


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise InputError(path, f"cannot read .npy ({type(e).__name__}: {e})") from None


def _fromfile(path: Path, dtype, cols=None) -> np.ndarray:
    try:
        a = np.fromfile(path, dtype=dtype)
    except Exception as e:
        raise InputError(path, f"cannot read ({e})") from None
    if cols:
        if a.size % cols:
            raise InputError(path, f"{a.size} values is not a multiple of {cols}")
        a = a.reshape(-1, cols)
    return a


def _color_u8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _scannet_labels(nyu40: np.ndarray, n: int, where) -> dict:
    nyu40 = np.asarray(nyu40).reshape(-1)
    if nyu40.shape[0] != n:
        raise InputError(where, f"{nyu40.shape[0]} labels for {n} points")
    return {"segment": nyu40_to_scannet20(nyu40), "extra_files": {"segment_nyu40.npy": nyu40.astype(np.int16)}}


def _apply(T: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    return xyz.astype(np.float64) @ T[:3, :3].T + T[:3, 3]


# ---------------------------------------------------------------------------------------------------------------
# Readers: each returns write_scene keyword arguments (plus "frames": a callable that stages frames/ in a folder)


def read_votenet(folder: Path, scene: str) -> dict:
    """``<scene>_vert.npy`` (N,6) axis-aligned xyz + rgb, ``_sem_label.npy`` NYU40, ``_ins_label.npy``."""
    vert = _load(folder / f"{scene}_vert.npy")
    if vert.ndim != 2 or vert.shape[1] < 6:
        raise InputError(folder / f"{scene}_vert.npy", f"expected (N, 6), got {vert.shape}")
    out = {"coord": vert[:, :3].astype(np.float32), "color": _color_u8(vert[:, 3:6])}
    out.update(_scannet_labels(_load(folder / f"{scene}_sem_label.npy"), len(vert), folder / f"{scene}_sem_label.npy"))
    ins = folder / f"{scene}_ins_label.npy"
    if ins.is_file():
        out["instance"] = _load(ins).astype(np.int64)
    return out


def read_mmdet3d(folder: Path, scene: str) -> dict:
    """``<scene>/<scene>_vert_all.npy`` (N,6) axis-aligned, ``_sem_label_all.npy`` NYU40, ``_ins_label_all.npy``."""
    d = folder / scene
    vert = _load(d / f"{scene}_vert_all.npy")
    if vert.ndim != 2 or vert.shape[1] < 6:
        raise InputError(d / f"{scene}_vert_all.npy", f"expected (N, 6), got {vert.shape}")
    out = {"coord": vert[:, :3].astype(np.float32), "color": _color_u8(vert[:, 3:6])}
    out.update(_scannet_labels(_load(d / f"{scene}_sem_label_all.npy"), len(vert), d / f"{scene}_sem_label_all.npy"))
    if (d / f"{scene}_ins_label_all.npy").is_file():
        out["instance"] = _load(d / f"{scene}_ins_label_all.npy").astype(np.int64)
    if (d / "axis_align_matrix.txt").is_file():
        out["extra_files"]["axis_align_matrix.npy"] = read_matrix(d / "axis_align_matrix.txt")
    return out


def read_ai360(folder: Path, scene: str) -> dict:
    """Raw-frame points ``<scene>_points_xyzrgb.bin`` + frames; labels when ``_sem_label_nyu40.npy`` exists.

    Points and poses are moved to the axis-aligned frame with ``meta.json``'s matrix (identity when absent).
    """
    d = folder / scene
    pts = _fromfile(d / f"{scene}_points_xyzrgb.bin", np.float32, 6)
    A = np.eye(4)
    if (d / "meta.json").is_file():
        try:
            A = np.asarray(json.loads((d / "meta.json").read_text())["axis_align_matrix"], dtype=np.float64)
        except (ValueError, KeyError) as e:
            raise InputError(d / "meta.json", f"no usable axis_align_matrix ({e})") from None
        if A.shape != (4, 4):
            raise InputError(d / "meta.json", f"axis_align_matrix must be 4x4, got {A.shape}")
    out = {"coord": _apply(A, pts[:, :3]).astype(np.float32), "color": _color_u8(pts[:, 3:6]),
           "extra_files": {"axis_align_matrix.npy": A}}
    if (d / f"{scene}_sem_label_nyu40.npy").is_file():
        lab = _scannet_labels(_load(d / f"{scene}_sem_label_nyu40.npy"), len(pts), d / f"{scene}_sem_label_nyu40.npy")
        out["segment"] = lab["segment"]
        out["extra_files"].update(lab["extra_files"])
    if (d / f"{scene}_ins_label.npy").is_file():
        out["instance"] = _load(d / f"{scene}_ins_label.npy").astype(np.int64)
    out["frames"] = lambda dst: stage_ai360_frames(d, dst, A)
    return out


def stage_ai360_frames(src: Path, dst: Path, align: np.ndarray) -> int:
    """Copy an ai360 frame sequence into haskd's ``frames/`` layout; returns the number of frames.

    Images are copied byte for byte (no re-encoding); poses become ``align @ pose`` (non-finite poses stay
    non-finite, so loaders still skip them); ``intrinsic_depth.txt`` is the source's colour intrinsics scaled to
    the depth size (the true depth intrinsics are not in the sample).
    """
    src, dst = Path(src), Path(dst)
    for sub in ("color", "depth", "pose", "intrinsic"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    n = 0
    for jpg in sorted((src / "color").glob("*.jpg")):
        fid = jpg.stem
        shutil.copyfile(jpg, dst / "color" / jpg.name)
        if (src / "depth" / f"{fid}.png").is_file():
            shutil.copyfile(src / "depth" / f"{fid}.png", dst / "depth" / f"{fid}.png")
        if (src / "pose" / f"{fid}.txt").is_file():
            pose = read_matrix(src / "pose" / f"{fid}.txt")
            with np.errstate(invalid="ignore"):
                np.savetxt(dst / "pose" / f"{fid}.txt", align @ pose, fmt="%.8f")
        n += 1
    intr = src / "intrinsic"
    shutil.copyfile(intr / "intrinsic_color.txt", dst / "intrinsic" / "intrinsic_color.txt")
    depth_k = intr / "intrinsic_depth.txt"
    if not depth_k.is_file():
        depth_k = intr / "intrinsic_depth_scaled_from_color.txt"
    if depth_k.is_file():
        shutil.copyfile(depth_k, dst / "intrinsic" / "intrinsic_depth.txt")
    return n


def read_s3dis_mmdet3d(folder: Path, name: str = "Area_1_office_2") -> dict:
    pts = _fromfile(folder / f"{name}_points.bin", np.float32, 6)
    seg = _fromfile(folder / f"{name}_semantic_mask.bin", np.int64)
    ins = _fromfile(folder / f"{name}_instance_mask.bin", np.int64)
    if len(seg) != len(pts) or len(ins) != len(pts):
        raise InputError(folder, f"{len(pts)} points but {len(seg)} labels / {len(ins)} instances")
    return {"coord": pts[:, :3].copy(), "color": _color_u8(pts[:, 3:6]), "segment": seg, "instance": ins}


def read_s3dis_wdc(folder: Path) -> dict:
    coord = _load(folder / "coord.npy").astype(np.float32)
    return {"coord": coord, "color": np.full((len(coord), 3), NO_COLOR_GRAY, np.uint8),
            "segment": _load(folder / "segment.npy").astype(np.int64),
            "instance": _load(folder / "instance.npy").astype(np.int64)}


# ---------------------------------------------------------------------------------------------------------------
# Planning and writing


def plan_samples(src, val_rooms=DEFAULT_VAL_ROOMS, s3dis_val_area: int = 5) -> list:
    """List of jobs ``{"dataset", "split", "name", "source", "read" | "write"}`` for what ``src`` holds (missing
    sources are left out). ``read()`` returns write_scene keyword arguments; ``write(path)`` writes the scene."""
    src = Path(src)
    jobs, seen = [], set()

    def scannet(name, source, read, labeled=True):
        if name in seen:
            return
        seen.add(name)
        split = ("val" if name[:9] in val_rooms else "train") if labeled else "frames_only"
        jobs.append({"dataset": "scannet", "split": split, "name": name, "source": source, "read": read})

    # priority order: ai360 (frames), mmdet3d (full resolution), votenet (50k subsample)
    if (src / AI360).is_dir():
        for d in sorted(p for p in (src / AI360).iterdir() if p.is_dir()):
            if (d / f"{d.name}_points_xyzrgb.bin").is_file():
                labeled = (d / f"{d.name}_sem_label_nyu40.npy").is_file()
                scannet(d.name, f"{AI360}/{d.name}", lambda d=d: read_ai360(d.parent, d.name), labeled)
    if (src / MMDET3D).is_dir():
        for d in sorted(p for p in (src / MMDET3D).iterdir() if p.is_dir()):
            if (d / f"{d.name}_vert_all.npy").is_file():
                scannet(d.name, f"{MMDET3D}/{d.name}", lambda d=d: read_mmdet3d(d.parent, d.name))
    if (src / VOTENET).is_dir():
        for f in sorted((src / VOTENET).glob("*_vert.npy")):
            name = f.name[: -len("_vert.npy")]
            scannet(name, f"{VOTENET}/{name}", lambda name=name: read_votenet(src / VOTENET, name))
    # S3DIS: the layout and names of haskd.prepare.s3dis (<split>/Area_N_<room>, Area_<s3dis_val_area> -> val)
    def s3dis_split(area):
        return "val" if area == f"Area_{s3dis_val_area}" else "train"

    ann_rooms = sorted((src / S3DIS_RAW).glob("Area_*/*/Annotations")) if (src / S3DIS_RAW).is_dir() else []
    for ann in ann_rooms:
        room = ann.parent
        name = f"{room.parent.name}_{room.name}"
        # raw Annotations/*.txt: parsed by the full S3DIS importer, so both paths give identical scenes
        jobs.append({"dataset": "s3dis", "split": s3dis_split(room.parent.name), "name": name,
                     "source": f"{S3DIS_RAW}/{room.parent.name}/{room.name}",
                     "write": lambda path, name=name, room=room: _s3dis_raw_room(name, room, path)})
    if (src / S3DIS_MMDET3D / "Area_1_office_2_points.bin").is_file():
        jobs.append({"dataset": "s3dis", "split": s3dis_split("Area_1"), "name": "Area_1_office_2",
                     "source": S3DIS_MMDET3D, "read": lambda: read_s3dis_mmdet3d(src / S3DIS_MMDET3D)})
    if (src / S3DIS_WDC / "coord.npy").is_file():
        # the source does not say which area; xyz only (colour is a constant placeholder)
        jobs.append({"dataset": "s3dis", "split": "train", "name": "AreaX_office_resampled_nocolor",
                     "source": S3DIS_WDC, "read": lambda: read_s3dis_wdc(src / S3DIS_WDC)})
    return jobs


def _s3dis_raw_room(name: str, room: Path, path: Path):
    from .s3dis import prepare_room

    prepare_room(name, {"dir": str(room)}, str(path))
    return path


def write_job(job: dict, out: Path) -> Path:
    """Read one source scene and write it (atomically) to ``<out>/<dataset>/<split>/<name>``."""
    path = Path(out) / job["dataset"] / job["split"] / job["name"]
    if "write" in job:
        return job["write"](path)
    kw = job["read"]()
    stage = kw.pop("frames", None)
    label_name = "segment20.npy" if job["dataset"] == "scannet" else "segment.npy"
    args = dict(coord=kw["coord"], color=kw["color"], segment=kw.get("segment"), normal=kw.get("normal"),
                instance=kw.get("instance"), label_name=label_name, extra_files=kw.get("extra_files"))
    return write_scene(path, write_frames=stage, **args)


def prepare_samples(src, out, val_rooms=DEFAULT_VAL_ROOMS, overwrite: bool = False, progress: bool = True,
                    s3dis_val_area: int = 5) -> dict:
    """Import every sample found under ``src`` into ``out`` (layout in the module docstring).

    Scenes already written are skipped unless ``overwrite`` (writes are atomic, so an existing folder is complete).
    Returns ``{"out", "scannet": {"train", "val", "frames_only"}, "s3dis": {split: [rooms]}, "written", "skipped",
    "sources": {"<dataset>/<split>/<name>": source}, "placeholder_color": [...]}`` (scene name lists sorted).
    """
    from ..progress import progress as bar

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InputError(src, "samples folder not found")
    jobs = plan_samples(src, tuple(val_rooms), s3dis_val_area)
    if not jobs:
        raise InputError(src, "no known sample folder inside (see shared/data/README.md)")
    summary = {"out": str(out), "scannet": {"train": [], "val": [], "frames_only": []}, "s3dis": {},
               "written": 0, "skipped": 0, "sources": {}, "placeholder_color": []}
    for job in bar(jobs, desc="import samples", unit="scene", disable=not progress):
        key = f"{job['dataset']}/{job['split']}/{job['name']}"
        summary["sources"][key] = job["source"]
        group = summary[job["dataset"]]
        group.setdefault(job["split"], []).append(job["name"])
        if job["source"] == S3DIS_WDC:
            summary["placeholder_color"].append(key)
        if (out / key).is_dir() and not overwrite:
            summary["skipped"] += 1
            continue
        write_job(job, out)
        summary["written"] += 1
    for group in (summary["scannet"], summary["s3dis"]):
        for v in group.values():
            v.sort()
    return summary
