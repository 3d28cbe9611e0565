"""``haskd predict``: a point cloud file in -> per-point labels (.npy) and a PLY coloured by class."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..classes import class_names, colorize
from ..data.scene import Scene, validate
from ..errors import InputError


def read_points(path) -> Scene:
    """Read ``.ply`` (x y z [red green blue]), ``.npy`` ((N,3) or (N,6) xyzrgb) or ``.txt`` (xyz[rgb] per line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    suffix = path.suffix.lower()
    if suffix == ".ply":
        from plyfile import PlyData

        try:
            ply = PlyData.read(str(path))
            v = ply["vertex"].data
            coord = np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float32)
        except Exception as e:
            raise InputError(path, f"corrupt or unsupported PLY ({type(e).__name__}: {str(e)[:120]})") from None
        names = v.dtype.names
        if all(c in names for c in ("red", "green", "blue")):
            color = np.stack([v["red"], v["green"], v["blue"]], 1)
        else:
            color = np.full((coord.shape[0], 3), 128)
    elif suffix in (".npy", ".txt", ".xyz"):
        try:
            arr = np.load(path, allow_pickle=False) if suffix == ".npy" else np.loadtxt(path, dtype=np.float64, ndmin=2)
        except Exception as e:
            raise InputError(path, f"cannot read points ({type(e).__name__}: {str(e)[:120]})") from None
        if arr.ndim != 2 or arr.shape[1] < 3:
            raise InputError(path, f"expected an (N, 3) or (N, 6) array, got {arr.shape}")
        coord = arr[:, :3].astype(np.float32)
        color = arr[:, 3:6] if arr.shape[1] >= 6 else np.full((coord.shape[0], 3), 128)
    else:
        raise InputError(path, f"unsupported file type '{suffix}' (use .ply, .npy or .txt)")
    color = np.asarray(color, dtype=np.float64)
    if color.size and color.max() <= 1.0:
        color = color * 255
    scene = Scene(path.stem, coord, np.clip(np.round(color), 0, 255).astype(np.uint8), path=None)
    return validate(scene, path)


def write_ply(path, coord, color, labels=None):
    from plyfile import PlyData, PlyElement

    fields = [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if labels is not None:
        fields.append(("label", "i4"))
    v = np.empty(coord.shape[0], dtype=fields)
    v["x"], v["y"], v["z"] = coord[:, 0], coord[:, 1], coord[:, 2]
    v["red"], v["green"], v["blue"] = color[:, 0], color[:, 1], color[:, 2]
    if labels is not None:
        v["label"] = labels
    PlyData([PlyElement.describe(v, "vertex")], text=False).write(str(path))


def predict_file(model, cfg, inp, out_dir, device="cpu", tta=False) -> dict:
    from .evaluate import predict_points

    scene = read_points(inp)
    probs = predict_points(model, scene, cfg.data.voxel_size, cfg.data.num_classes, device,
                           cfg.data.use_normal, tta)
    labels = probs.argmax(1).numpy().astype(np.int64)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npy = out / f"{scene.name}_labels.npy"
    ply = out / f"{scene.name}_pred.ply"
    np.save(npy, labels)
    write_ply(ply, scene.coord, colorize(labels, cfg.data.dataset), labels)
    names = class_names(cfg.data.dataset)
    counts = np.bincount(labels, minlength=cfg.data.num_classes)
    return {"labels": str(npy), "ply": str(ply), "points": int(labels.shape[0]),
            "class_counts": {names[i]: int(c) for i, c in enumerate(counts) if c}}
