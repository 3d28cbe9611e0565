"""ScanNetV2 importer: official download layout -> haskd scene folders (+ RGB-D ``frames/`` from ``.sens``).

Input (``--raw ROOT``)::

    ROOT/scans/<scene>/<scene>_vh_clean_2.ply                  mesh: vertex x y z red green blue alpha, faces
    ROOT/scans/<scene>/<scene>_vh_clean_2.labels.ply           vertex property ``label`` = NYU40 id (0 unannotated)
    ROOT/scans/<scene>/<scene>_vh_clean_2.0.010000.segs.json   {"segIndices": [segment id per vertex]}
    ROOT/scans/<scene>/<scene>.aggregation.json                {"segGroups": [{"objectId", "segments", "label"}]}
    ROOT/scans/<scene>/<scene>.txt                             "axisAlignment = 16 numbers" (row-major 4x4)
    ROOT/scans/<scene>/<scene>.sens                            optional RGB-D stream, see :mod:`haskd.prepare.sens`
    ROOT/scans_test/<scene>/...                                mesh (+ .txt, .sens) only: no labels

Output (``--out ROOT``), one folder per scene (:mod:`haskd.data.scene`)::

    <split>/<scene>/coord.npy (N,3) float32, color.npy (N,3) uint8, normal.npy (N,3) float32 (area-weighted vertex
                   normals of the mesh), segment20.npy (N,) int16 ScanNet-20 ids / -1, instance.npy (N,) int32
                   (aggregation objectId, -1 = none), and with --labels-tsv: segment200.npy (N,) int16 (ScanNet-200
                   index 0..199 of the vertex's object category, -1 = another category or none: Pointcept's meaning,
                   :func:`haskd.classes.category_to_scannet200`) and segment_category.npy (N,) int16 (the raw tsv
                   ``id`` of that category, -1 = none), frames/ (every s-th frame with a finite pose)

Splits: scenes under ``scans/`` go to ``train``, under ``scans_test/`` to ``test``; ``--split-file val=FILE`` (one
scene name per line, repeatable) moves the listed scenes to that split (e.g. the official ``scannetv2_val.txt``).
``--split-lists DIR`` applies the official lists the way Pointcept's preprocessing does: a scene named in
``DIR/scannetv2_train.txt`` goes to ``train``, in ``DIR/scannetv2_val.txt`` to ``val``, any other scene to ``test``,
and the three split folders are created even when empty.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from ..classes import category_to_scannet200, nyu40_to_scannet20
from ..data.frames import scale_intrinsic, write_intrinsics
from ..data.scene import write_scene
from ..errors import HaskdError, InputError
from .manifest import Job, Manifest, run_jobs

log = logging.getLogger(__name__)

RAW_SPLITS = (("scans", "train"), ("scans_test", "test"))
# The official split lists, as named in the ScanNet repository and in Pointcept's meta_data folder.
SPLIT_LISTS = (("train", "scannetv2_train.txt"), ("val", "scannetv2_val.txt"))
POINTCEPT_SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------- PLY meshes and labels
def _read_ply(path: Path):
    from plyfile import PlyData

    if not path.is_file():
        raise InputError(path, "missing file")
    try:
        # Telling plyfile that faces are triangles lets it read them as one array instead of row by row.
        # (labels.ply carries the same faces: they must be read past even though unused.)
        return PlyData.read(str(path), known_list_len={"face": {"vertex_indices": 3}})
    except Exception:
        pass
    try:  # a mesh with some non-triangle faces: the generic (slow) reader
        return PlyData.read(str(path))
    except Exception as e:
        raise InputError(path, f"truncated or corrupt PLY ({type(e).__name__}: {e})") from None


def _read_vertices(path: Path):
    """(PlyData, vertex records) of a PLY file; InputError when it has no vertex element."""
    ply = _read_ply(path)
    try:
        return ply, ply["vertex"].data
    except KeyError:
        raise InputError(path, "no 'vertex' element") from None


def read_mesh(path) -> tuple:
    """Read a ScanNet ``_vh_clean_2.ply``.

    Returns ``coord`` (N,3) float32, ``color`` (N,3) uint8, ``faces`` (F,3) int64 (triangles; polygons are fanned).
    Raises :class:`InputError` for a missing / truncated / corrupt file, missing properties, NaN coordinates or
    face indices out of range.
    """
    path = Path(path)
    ply, v = _read_vertices(path)
    names = v.dtype.names or ()
    for k in ("x", "y", "z", "red", "green", "blue"):
        if k not in names:
            raise InputError(path, f"vertex property '{k}' missing (has {', '.join(names)})")
    coord = np.stack([v["x"], v["y"], v["z"]], axis=1).astype(np.float32)
    color = np.stack([v["red"], v["green"], v["blue"]], axis=1).astype(np.uint8)
    if coord.shape[0] == 0:
        raise InputError(path, "mesh has no vertex")
    bad = ~np.isfinite(coord).all(axis=1)
    if bad.any():
        raise InputError(path, f"{int(bad.sum())} vertex(es) with NaN/inf coordinates (first: vertex "
                               f"{int(np.flatnonzero(bad)[0])})")
    faces = _faces(ply, path)
    if faces.size and (faces.min() < 0 or faces.max() >= coord.shape[0]):
        raise InputError(path, f"face index out of range [0, {coord.shape[0]})")
    return coord, color, faces


def _faces(ply, path: Path) -> np.ndarray:
    try:
        fd = ply["face"].data
    except KeyError:
        return np.zeros((0, 3), dtype=np.int64)
    key = "vertex_indices" if "vertex_indices" in fd.dtype.names else fd.dtype.names[0]
    col = fd[key]
    if col.dtype != object:                       # fast path: (F, 3) already
        return np.asarray(col, dtype=np.int64).reshape(-1, 3)
    tris = []
    for poly in col:                              # slow path: fan-triangulate polygons
        poly = np.asarray(poly, dtype=np.int64)
        for k in range(1, len(poly) - 1):
            tris.append((poly[0], poly[k], poly[k + 1]))
    return np.asarray(tris, dtype=np.int64).reshape(-1, 3)


def vertex_normals(coord: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals (N,3) float32, unit length; vertices in no (non-degenerate) face get (0,0,0).

    The cross product of two triangle edges has length twice the triangle's area, so summing the raw cross products
    over the faces around a vertex weights each face by its area.
    """
    v = np.asarray(coord, dtype=np.float64)
    n = v.shape[0]
    out = np.zeros((n, 3), dtype=np.float64)
    if faces.size:
        a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
        fn = np.cross(b - a, c - a)
        for corner in range(3):
            for axis in range(3):
                out[:, axis] += np.bincount(faces[:, corner], weights=fn[:, axis], minlength=n)
    length = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, length, out=out, where=length > 0)
    return out.astype(np.float32)


def read_labels(path, num_vertices: int) -> np.ndarray:
    """NYU40 id per vertex (N,) int64 from ``_vh_clean_2.labels.ply``; its vertex count must match the mesh."""
    path = Path(path)
    _, v = _read_vertices(path)
    if "label" not in (v.dtype.names or ()):
        raise InputError(path, "vertex property 'label' missing")
    if len(v) != num_vertices:
        raise InputError(path, f"{len(v)} vertices, but the mesh has {num_vertices}")
    return np.asarray(v["label"], dtype=np.int64)


# ---------------------------------------------------------------- instances, categories, alignment
def _read_json(path: Path):
    if not path.is_file():
        raise InputError(path, "missing file")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(path, f"truncated or corrupt JSON ({e})") from None


def read_instances(segs_path, agg_path, num_vertices: int):
    """Instance id per vertex from the over-segmentation and the object aggregation.

    Returns ``instance`` (N,) int32 (the group's ``objectId``, -1 = in no object) and ``labels``: the raw
    category name of each object, indexed by instance id (list).
    """
    segs_path, agg_path = Path(segs_path), Path(agg_path)
    segs = _read_json(segs_path)
    agg = _read_json(agg_path)
    try:
        seg = np.asarray(segs["segIndices"], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise InputError(segs_path, "no valid 'segIndices' list") from None
    if seg.shape != (num_vertices,):
        raise InputError(segs_path, f"{seg.size} segment indices, but the mesh has {num_vertices} vertices")
    groups = agg.get("segGroups") if isinstance(agg, dict) else None
    if not isinstance(groups, list):
        raise InputError(agg_path, "no 'segGroups' list")
    uniq, inv = np.unique(seg, return_inverse=True)
    group_of_seg = np.full(uniq.shape[0], -1, dtype=np.int64)
    names = {}
    for g in groups:
        try:
            oid = int(g.get("objectId", g.get("id")))
            members = np.asarray(g["segments"], dtype=np.int64)
            names[oid] = str(g.get("label", ""))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InputError(agg_path, f"malformed segGroup {str(g)[:80]}") from None
        pos = np.searchsorted(uniq, members)
        ok = (pos < uniq.shape[0]) & (uniq[np.minimum(pos, uniq.shape[0] - 1)] == members)
        group_of_seg[pos[ok]] = oid
    instance = group_of_seg[inv].astype(np.int32)
    labels = [names.get(i, "") for i in range(max(names, default=-1) + 1)]
    return instance, labels


def read_labels_tsv(path) -> dict:
    """``scannetv2-labels.combined.tsv`` -> {raw_category: id} (the category ids ScanNet-200 is defined on)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "missing file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(path, f"cannot read tsv ({e})") from None
    if not rows or "raw_category" not in rows[0] or "id" not in rows[0]:
        raise InputError(path, "expected a tab-separated file with columns 'id' and 'raw_category'")
    out = {}
    for k, r in enumerate(rows, start=2):
        try:
            out[r["raw_category"]] = int(r["id"])
        except (TypeError, ValueError):
            raise InputError(path, f"line {k}: bad id '{r.get('id')}'") from None
    return out


def read_axis_alignment(path) -> np.ndarray:
    """4x4 float64 ``axisAlignment`` of a scene's ``<scene>.txt`` (identity when the line is absent)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "missing file (needed by --axis-align)")
    for line in path.read_text(errors="replace").splitlines():
        key, _, val = line.partition("=")
        if key.strip() == "axisAlignment":
            try:
                m = np.array([float(x) for x in val.split()], dtype=np.float64)
            except ValueError:
                m = np.zeros(0)
            if m.shape != (16,) or not np.isfinite(m).all():
                raise InputError(path, "axisAlignment must be 16 finite numbers")
            return m.reshape(4, 4)
    return np.eye(4)


# ---------------------------------------------------------------- frames from .sens
def _write_pose(path: Path, pose: np.ndarray):
    # 9 significant digits: a float32 pose survives the text round trip bit for bit.
    np.savetxt(path, np.asarray(pose, dtype=np.float64), fmt="%.9g")


def export_frames(sens_path, frames_dir, every: int = 20, image_size=None, align: Optional[np.ndarray] = None) -> dict:
    """Write every ``every``-th frame of a ``.sens`` file whose pose is finite into ``frames_dir``
    (layout of :mod:`haskd.data.frames`; frame id = the .sens frame index, zero-padded to 6 digits).

    Colour: the JPEG bytes as stored, unless ``image_size`` (W, H) differs from the sensor's (then resized,
    re-encoded at quality 95, colour intrinsics rescaled). Depth: uint16 millimetres, PNG (lossless). Pose: camera to
    world, premultiplied by ``align`` when given (so it matches axis-aligned points).
    Returns ``{"written": int, "skipped_pose": int, "color_size": [W, H], "depth_size": [W, H]}``.
    """
    from PIL import Image

    from .sens import SensReader

    _BILINEAR = getattr(Image, "Resampling", Image).BILINEAR   # Pillow < 9.1 has no Image.Resampling
    frames_dir = Path(frames_dir)
    written = skipped = 0
    with SensReader(sens_path) as r:
        h = r.header
        native = (h.color_width, h.color_height)
        size = tuple(image_size) if image_size else native
        reencode = size != native or h.color_compression != "jpeg"
        for sub in ("color", "depth", "pose"):
            (frames_dir / sub).mkdir(parents=True, exist_ok=True)
        for fr in r.frames(every=every):
            if not fr.pose_ok:
                skipped += 1
                continue
            depth = r.decode_depth(fr)
            if h.depth_shift != 1000.0:   # frames/ stores millimetres
                depth = np.clip(np.round(depth * (1000.0 / h.depth_shift)), 0, 65535).astype(np.uint16)
            fid = f"{fr.index:06d}"
            if reencode:
                img = Image.fromarray(r.decode_color(fr))
                if size != native:
                    img = img.resize(size, _BILINEAR, reducing_gap=2.0)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
                cbytes = buf.getvalue()
            else:
                cbytes = fr.color_bytes
            (frames_dir / "color" / f"{fid}.jpg").write_bytes(cbytes)
            # zlib level 1: 3x faster than the default for ~10 % larger depth PNGs (still lossless)
            Image.fromarray(depth).save(frames_dir / "depth" / f"{fid}.png", compress_level=1)
            pose = fr.pose.astype(np.float64)
            _write_pose(frames_dir / "pose" / f"{fid}.txt", pose if align is None else align @ pose)
            written += 1
        K_color = scale_intrinsic(h.intrinsic_color[:3, :3], size[0] / native[0], size[1] / native[1])
        write_intrinsics(frames_dir, K_color, h.intrinsic_depth[:3, :3])
    return {"written": written, "skipped_pose": skipped, "color_size": list(size),
            "depth_size": [h.depth_width, h.depth_height]}


# ---------------------------------------------------------------- one scene
def scene_files(scene_dir: Path, name: str) -> dict:
    return {
        "mesh": scene_dir / f"{name}_vh_clean_2.ply",
        "labels": scene_dir / f"{name}_vh_clean_2.labels.ply",
        "segs": scene_dir / f"{name}_vh_clean_2.0.010000.segs.json",
        "agg": scene_dir / f"{name}.aggregation.json",
        "meta": scene_dir / f"{name}.txt",
        "sens": scene_dir / f"{name}.sens",
    }


def prepare_scene(name: str, params: dict, out_dir: str) -> dict:
    """Convert one raw scene (worker function of :func:`haskd.prepare.manifest.run_jobs`).

    ``params``: ``dir`` (raw scene folder), ``labeled`` (bool), ``frames_every``, ``image_size`` ((W,H) or None),
    ``axis_align`` (bool), ``tsv`` ({raw_category: id} or None), ``tsv_path``.
    """
    src = Path(params["dir"])
    files = scene_files(src, name)
    coord, color, faces = read_mesh(files["mesh"])
    n = coord.shape[0]
    normal = vertex_normals(coord, faces)
    segment = instance = None
    extra = {}
    if params["labeled"]:
        segment = nyu40_to_scannet20(read_labels(files["labels"], n))
        instance, obj_labels = read_instances(files["segs"], files["agg"], n)
        if params.get("tsv") is not None:
            tsv = params["tsv"]
            ids = np.full(len(obj_labels) + 1, -1, dtype=np.int64)   # last slot: instance -1
            for k, lab in enumerate(obj_labels):
                if lab and lab not in tsv:
                    raise InputError(files["agg"], f"unknown class name '{lab}' (not in {params['tsv_path']})")
                ids[k] = tsv.get(lab, -1)
            category = ids[instance]
            extra["segment200.npy"] = category_to_scannet200(category).astype(np.int16)
            extra["segment_category.npy"] = category.astype(np.int16)
    align = None
    if params["axis_align"]:
        align = read_axis_alignment(files["meta"])
        coord = (coord.astype(np.float64) @ align[:3, :3].T + align[:3, 3]).astype(np.float32)
        normal = (normal.astype(np.float64) @ align[:3, :3].T).astype(np.float32)

    info = {"faces": int(faces.shape[0])}
    warnings = []
    out_dir = Path(out_dir)

    def write_frames(frames_dir):
        # Exported straight into the scene folder being built (atomically, with the arrays).
        fi = export_frames(files["sens"], frames_dir, params["frames_every"], params["image_size"], align)
        info["frames"] = fi
        if fi["skipped_pose"]:
            warnings.append(f"{files['sens']}: skipped {fi['skipped_pose']} frame(s) with a non-finite pose")
        if fi["written"] == 0:
            warnings.append(f"{files['sens']}: no frame with a finite pose; scene has no frames/")
            shutil.rmtree(frames_dir, ignore_errors=True)

    with_frames = params["frames_every"] > 0 and files["sens"].is_file()
    write_scene(out_dir, coord, color, segment=segment, normal=normal, instance=instance,
                label_name="segment20.npy", extra_files=extra, write_frames=write_frames if with_frames else None)
    return {"num_points": n, "info": info, "warnings": warnings}


# ---------------------------------------------------------------- discovery and CLI
def _read_split_files(specs) -> dict:
    """``["val=list.txt", ...]`` -> {scene: split}."""
    out = {}
    for spec in specs or ():
        split, sep, fname = spec.partition("=")
        if not sep or not split or not fname:
            raise HaskdError(f"--split-file expects SPLIT=FILE (e.g. val=scannetv2_val.txt), got '{spec}'")
        p = Path(fname)
        if not p.is_file():
            raise InputError(p, "missing file")
        for line in p.read_text().split():
            out[line.strip()] = split
    return out


def read_split_lists(folder) -> dict:
    """{scene: split} from the official lists in ``folder`` (``scannetv2_train.txt``, ``scannetv2_val.txt``); a scene
    named in both is an error (Pointcept would silently put it in train)."""
    folder = Path(folder)
    out = {}
    for split, fname in SPLIT_LISTS:
        p = folder / fname
        if not p.is_file():
            raise InputError(p, "missing file (--split-lists needs the official scannetv2_train.txt and "
                                "scannetv2_val.txt)")
        for name in p.read_text().split():
            if out.get(name, split) != split:
                raise InputError(p, f"scene {name} is also in the {out[name]} list")
            out[name] = split
    return out


def find_scenes(raw, split_map: Optional[dict] = None, unlisted: Optional[str] = None) -> list:
    """[(name, split, scene_dir, labeled)] for every ``scans*/scene*`` folder under ``raw``, sorted by name.

    ``split_map`` {scene: split} overrides the folder's split; with ``unlisted`` every scene missing from it goes to
    that split instead (Pointcept's rule: what neither official list names is a test scene)."""
    raw = Path(raw)
    if not raw.is_dir():
        raise InputError(raw, "raw ScanNet folder not found")
    found = []
    for sub, split in RAW_SPLITS:
        d = raw / sub
        if d.is_dir():
            for s in sorted(d.iterdir()):
                if s.is_dir() and s.name.startswith("scene"):
                    fallback = unlisted or split
                    found.append((s.name, (split_map or {}).get(s.name, fallback), s, sub == "scans"))
    if not found:
        raise InputError(raw, "no scene folders under scans/ or scans_test/ (expected the official layout)")
    return sorted(found, key=lambda t: t[0])


def prepare_scannet(raw, out, frames_every: int = 20, image_size=(320, 240), workers: int = 1,
                    labels_tsv=None, axis_align: bool = False, split_files=None, split_lists=None):
    """Prepare every scene under ``raw`` into ``out``; returns a :class:`haskd.prepare.manifest.Summary`.

    ``split_lists``: a folder with the official ``scannetv2_{train,val}.txt`` (see the module doc)."""
    tsv = read_labels_tsv(labels_tsv) if labels_tsv else None
    if split_lists:
        if split_files:
            raise HaskdError("--split-lists and --split-file cannot be combined")
        scenes = find_scenes(raw, read_split_lists(split_lists), unlisted="test")
        for split in POINTCEPT_SPLITS:   # Pointcept's layout: every split folder exists, empty or not
            (Path(out) / split).mkdir(parents=True, exist_ok=True)
    else:
        scenes = find_scenes(raw, _read_split_files(split_files))
    options = {"frames_every": int(frames_every), "image_size": list(image_size) if image_size else None,
               "axis_align": bool(axis_align), "segment200": "scannet200_index",
               "tsv": hashlib.sha256(Path(labels_tsv).read_bytes()).hexdigest() if labels_tsv else None}
    jobs = []
    for name, split, d, labeled in scenes:
        params = {"dir": str(d), "labeled": labeled, "frames_every": int(frames_every),
                  "image_size": tuple(image_size) if image_size else None, "axis_align": bool(axis_align),
                  "tsv": tsv, "tsv_path": str(labels_tsv) if labels_tsv else None}
        jobs.append(Job(name, split, params, inputs=list(scene_files(d, name).values())))
    manifest = Manifest(out, "scannet")
    return run_jobs(jobs, prepare_scene, manifest, options, workers=workers, desc="scannet")


def parse_image_size(text: str):
    """'320x240' -> (320, 240); 'native' -> None (keep the stored JPEG bytes)."""
    if text.lower() in ("native", "none", "0"):
        return None
    w, sep, h = text.lower().partition("x")
    try:
        size = (int(w), int(h))
    except ValueError:
        size = None
    if not sep or size is None or min(size) <= 0:
        raise argparse.ArgumentTypeError(f"expected WxH (e.g. 320x240) or 'native', got '{text}'")
    return size


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--raw", required=True, type=Path, help="ScanNet root holding scans/ (and scans_test/)")
    parser.add_argument("--out", required=True, type=Path, help="output root (scene folders per split)")
    parser.add_argument("--frames-every", type=int, default=20,
                        help="export every s-th .sens frame to frames/ (0: no frames; default 20)")
    parser.add_argument("--image-size", type=parse_image_size, default=(320, 240),
                        help="colour frames resized to WxH, intrinsics rescaled (default 320x240; 'native' keeps "
                             "the original JPEG bytes)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="parallel processes")
    parser.add_argument("--labels-tsv", type=Path, default=None,
                        help="scannetv2-labels.combined.tsv: also write segment200.npy (ScanNet-200 index 0..199, "
                             "-1 ignore, as Pointcept) and segment_category.npy (raw category ids)")
    parser.add_argument("--axis-align", action="store_true",
                        help="apply each scene's axisAlignment (<scene>.txt) to points, normals and poses")
    parser.add_argument("--split-file", action="append", default=[], metavar="SPLIT=FILE",
                        help="scenes listed in FILE go to SPLIT (repeatable), e.g. val=scannetv2_val.txt")
    parser.add_argument("--split-lists", type=Path, default=None, metavar="DIR",
                        help="folder with the official scannetv2_train.txt / scannetv2_val.txt: listed scenes go to "
                             "train / val, all others to test, as Pointcept's preprocessing does")
    return parser


def run(args) -> int:
    summary = prepare_scannet(args.raw, args.out, frames_every=args.frames_every, image_size=args.image_size,
                              workers=args.workers, labels_tsv=args.labels_tsv, axis_align=args.axis_align,
                              split_files=args.split_file, split_lists=args.split_lists)
    summary.report()
    return summary.exit_code
