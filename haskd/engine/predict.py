"""``haskd predict``: a point cloud file in -> per-point labels (.npy) and a PLY coloured by class."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..classes import class_names, colorize
from ..data.scene import Scene, validate
from ..errors import InputError


COLOR_NAMES = (("red", "green", "blue"), ("diffuse_red", "diffuse_green", "diffuse_blue"), ("r", "g", "b"))
NORMAL_NAMES = (("nx", "ny", "nz"), ("normal_x", "normal_y", "normal_z"))


def _fields(v, groups):
    names = v.dtype.names
    for group in groups:
        if all(c in names for c in group):
            return np.stack([np.asarray(v[c]) for c in group], 1)
    return None


def _face_normals(coord, faces) -> np.ndarray:
    """Vertex normals of a triangle mesh: area-weighted sum of the faces' normals at each vertex, unit length."""
    tri = np.array([f[:3] for f in faces if len(f) >= 3], dtype=np.int64).reshape(-1, 3)
    normal = np.zeros_like(coord, dtype=np.float64)
    if len(tri):
        fn = np.cross(coord[tri[:, 1]] - coord[tri[:, 0]], coord[tri[:, 2]] - coord[tri[:, 0]])
        for j in range(3):
            np.add.at(normal, tri[:, j], fn)
    length = np.linalg.norm(normal, axis=1, keepdims=True)
    return (normal / np.where(length > 0, length, 1.0)).astype(np.float32)


def pca_normals(coord, k: int = 16, viewpoint=None, query=None) -> np.ndarray:
    """Unit normals (M, 3) float32 at the points ``query`` (default: all of ``coord``): the smallest principal axis
    of each point's ``k`` nearest neighbours in ``coord``, turned to face ``viewpoint`` (default: 1.5 m above the
    centre of the footprint, inside an indoor room)."""
    from scipy.spatial import cKDTree

    coord = np.asarray(coord, dtype=np.float64)
    query = coord if query is None else np.asarray(query, dtype=np.float64)
    k = max(3, min(k, coord.shape[0]))
    _, nn = cKDTree(coord).query(query, k=k)
    nb = coord[nn] - coord[nn].mean(1, keepdims=True)              # (M, k, 3)
    _, vecs = np.linalg.eigh(np.einsum("mki,mkj->mij", nb, nb))   # ascending eigenvalues
    normal = vecs[:, :, 0]
    if viewpoint is None:
        lo, hi = coord.min(0), coord.max(0)
        viewpoint = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2] + 1.5])
    flip = ((np.asarray(viewpoint) - query) * normal).sum(1) < 0
    normal[flip] *= -1
    return normal.astype(np.float32)


def read_points(path) -> Scene:
    """Read a point cloud: ``.ply`` (x y z, colours as red/green/blue or diffuse_red/..., normals as nx ny nz, or
    from the faces of a mesh), ``.npy`` or ``.txt`` ((N, 3) xyz, (N, 6) xyzrgb, (N, 9) xyzrgb + normals).

    Coordinates are read in float64 and moved to a per-scene origin when far from 0 (``Scene.origin``)."""
    from ..data.scene import colors_to_uint8, to_local

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    suffix = path.suffix.lower()
    normal = None
    if suffix == ".ply":
        from plyfile import PlyData

        try:
            ply = PlyData.read(str(path))
            v = ply["vertex"].data
            coord = np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float64)
            faces = None
            if "face" in ply and len(ply["face"].data):
                fd = ply["face"].data
                key = "vertex_indices" if "vertex_indices" in fd.dtype.names else fd.dtype.names[0]
                faces = fd[key]
        except Exception as e:
            raise InputError(path, f"corrupt or unsupported PLY ({type(e).__name__}: {str(e)[:120]})") from None
        color = _fields(v, COLOR_NAMES)
        normal = _fields(v, NORMAL_NAMES)
        if normal is None and faces is not None:
            normal = _face_normals(coord, faces)
        if color is None:
            color = np.full((coord.shape[0], 3), 128, dtype=np.uint8)
    elif suffix in (".npy", ".txt", ".xyz"):
        try:
            arr = np.load(path, allow_pickle=False) if suffix == ".npy" else np.loadtxt(path, dtype=np.float64, ndmin=2)
        except Exception as e:
            raise InputError(path, f"cannot read points ({type(e).__name__}: {str(e)[:120]})") from None
        if arr.dtype.kind not in "iuf":
            raise InputError(path, f"points must be numbers, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] not in (3, 6, 9):
            raise InputError(path, f"expected an (N, 3) xyz, (N, 6) xyzrgb or (N, 9) xyzrgb+normal array, got "
                                   f"{arr.shape}")
        coord = arr[:, :3].astype(np.float64)
        color = arr[:, 3:6] if arr.shape[1] >= 6 else np.full((coord.shape[0], 3), 128, dtype=np.uint8)
        normal = arr[:, 6:9] if arr.shape[1] == 9 else None
    else:
        raise InputError(path, f"unsupported file type '{suffix}' (use .ply, .npy or .txt)")
    local, origin = to_local(coord, path)
    color = np.asarray(color)
    if color.dtype.kind == "f" and color.size and np.isfinite(color).all() and color.max() > 1.0:
        color = np.round(color)  # 0..255 stored as floats (text files)
    scene = Scene(path.stem, local, colors_to_uint8(color, path),
                  normal=None if normal is None else np.asarray(normal, dtype=np.float32), path=None, origin=origin)
    if np.any(origin):
        scene.extras["coord64"] = coord  # the input's own coordinates, written back unchanged
    return validate(scene, path)


def write_ply(path, coord, color, labels=None, atomic=True, normal=None):
    from plyfile import PlyData, PlyElement

    coord = np.asarray(coord)
    xyz = "f8" if coord.dtype == np.float64 else "f4"  # far-from-origin coordinates keep their float64 precision
    fields = [("x", xyz), ("y", xyz), ("z", xyz), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if normal is not None:
        fields += [("nx", "f4"), ("ny", "f4"), ("nz", "f4")]
    if labels is not None:
        fields.append(("label", "i4"))
    v = np.empty(coord.shape[0], dtype=fields)
    v["x"], v["y"], v["z"] = coord[:, 0], coord[:, 1], coord[:, 2]
    v["red"], v["green"], v["blue"] = color[:, 0], color[:, 1], color[:, 2]
    if labels is not None:
        v["label"] = labels
    if normal is not None:
        v["nx"], v["ny"], v["nz"] = normal[:, 0], normal[:, 1], normal[:, 2]
    data = PlyData([PlyElement.describe(v, "vertex")], text=False)
    if not atomic:
        data.write(str(path))
        return
    from ..io import atomic_write

    with atomic_write(path) as tmp:  # never a truncated PLY under its final name (disk full, kill)
        data.write(str(tmp))


def predict_file(model, cfg, inp, out_dir, device="cpu", tta=False) -> dict:
    from .evaluate import predict_points

    from ..io import atomic_write, make_dir

    scene = read_points(inp)
    if cfg.data.use_normal and scene.normal is None:
        raise InputError(inp, "the model was trained with normals (data.use_normal) and this file has none: give "
                              "nx ny nz in the PLY (or a mesh's faces), or columns 7-9 of an (N, 9) .npy/.txt")
    probs = predict_points(model, scene, cfg.data.voxel_size, cfg.data.num_classes, device,
                           cfg.data.use_normal, tta)
    labels = probs.argmax(1).numpy().astype(np.int64)
    out = make_dir(out_dir)
    npy = out / f"{scene.name}_labels.npy"
    ply = out / f"{scene.name}_pred.ply"
    # both files are written to temp names and renamed only when both are complete (a full disk leaves neither)
    with atomic_write(npy) as tmp_npy, atomic_write(ply) as tmp_ply:
        with open(tmp_npy, "wb") as f:
            np.save(f, labels)
        write_ply(tmp_ply, scene.extras.get("coord64", scene.coord), colorize(labels, cfg.data.dataset), labels,
                  atomic=False)
    names = class_names(cfg.data.dataset)
    counts = np.bincount(labels, minlength=cfg.data.num_classes)
    return {"labels": str(npy), "ply": str(ply), "points": int(labels.shape[0]),
            "class_counts": {names[i]: int(c) for i, c in enumerate(counts) if c}}
