"""Soft-label cache: frozen teacher / expert outputs stored once per scene, per ORIGINAL point.

Teacher and snapshot experts are frozen, so their outputs can be computed once (METHOD.md "Cost") and mapped
onto the student's augmented voxels with the point -> voxel index of each batch.

Layout (our choice)::

    <cache_dir>/manifest.json      {"format", "version", "topk", "num_classes", "lead_shape", "feat_dim", ...}
    <cache_dir>/<scene>.npz        topk_logits (..., P, k) float16   top-k logits minus the point's max logit
                                   topk_index  (..., P, k) int16     their class ids, best first
                                   feat        (P, D) float16        optional (teacher features)
                                   visible     (P,) bool             optional (teacher saw the point in images)
                                   gain        (P,) float16          optional (what the images add, ihd.image_gain)
                                   image_right (P,) bool             optional (fused head right, 3D branch wrong,
                                                                     ihd.image_right)
                                   shift       (P,) float16          optional (how far the images moved the
                                                                     teacher's answer, ihd.image_shift)
                                   hint<l>     (N_l, D_l) float16    optional (per-level hints: the teacher's 3D
                                   hint_rows<l> (P,) int32             branch's level-l voxel features, and the
                                                                     level-l voxel of every point; l = 0..L-1)

``...`` is an optional leading shape, e.g. ``(M,)`` for M snapshot experts in one file.

Why top-k LOGITS rather than probabilities: the KD target is ``softmax(z / tau)``, and tau is a training
option; storing probabilities at temperature 1 would tie the cache to that temperature after truncation.
From top-k logits the target at any tau is ``softmax`` over the k stored logits, with every other class at
``-inf`` (probability 0) -- exactly the top-k truncated, renormalised distribution. With ``k = C`` nothing
is lost but fp16 rounding. Logits are stored relative to the point's maximum (the top-1 is 0): softmax does
not change, and values near 0 get fp16's finest resolution.

Mapping to voxels: :func:`gather_to_voxels` averages point values over each voxel. Average *probabilities*
(:func:`topk_probs` at the training tau) rather than logits with ``-inf``: a voxel whose points have different
top-k sets would otherwise get ``-inf`` for most classes (or NaN for all). For an unaugmented batch whose
voxels match the teacher's, every point of a voxel carries the same values and both give the online target.

This module owns the whole cache: the file format (:func:`write_scene_cache`, :func:`load_scene_cache`), building a
folder once and deciding when it is stale (:func:`build_cache`, :func:`build_hint_cache`, :func:`build_expert_cache`,
what a frozen model gives per point: :func:`scene_outputs`), and reading it onto a batch's voxels
(:class:`CacheReader`).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import HaskdError, InputError

FORMAT = "haskd-soft-label-cache"
VERSION = 1
MANIFEST = "manifest.json"
FP16_FLOOR = -65000.0  # just above float16's most negative finite value (-65504)


def _as_tensor(x) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))


def _scene_file(cache_dir, scene_name: str) -> Path:
    name = str(scene_name)
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise InputError(scene_name, "invalid scene name for the soft-label cache")
    return Path(cache_dir) / f"{name}.npz"


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_manifest(cache_dir) -> Optional[dict]:
    """The cache's manifest dict, or None when the folder holds no cache yet."""
    p = Path(cache_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(p, f"unreadable cache manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(p, f"not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise InputError(p, f"cache format version {m.get('version')}, this haskd reads {VERSION}: rebuild the cache")
    return m


STORED = "top-k logits minus the per-point max (float16) + class ids (int16), per original point"


def _ensure_manifest(cache_dir, settings: dict, stored: str = STORED) -> None:
    """Create the manifest, or check that this write matches it (one cache dir = one set of settings)."""
    old = read_manifest(cache_dir)
    if old is not None:
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            desc = ", ".join(f"{k}: cache has {a}, now {b}" for k, (a, b) in diff.items())
            raise HaskdError(f"{Path(cache_dir) / MANIFEST}: cache written with other settings ({desc}); "
                             f"use a fresh cache dir")
        return
    data = {"format": FORMAT, "version": VERSION, **settings, "stored": stored}
    _atomic_write(Path(cache_dir) / MANIFEST, lambda f: f.write(json.dumps(data, indent=1).encode()))


def write_scene_cache(cache_dir, scene_name: str, logits, feat=None, visible=None,
                      topk: Optional[int] = None, gain=None, hints=None, image_right=None, shift=None) -> Path:
    """Store one scene's frozen outputs; returns the ``.npz`` path.

    logits: (..., P, C) per original point (torch or numpy; e.g. (P, C) teacher, (M, P, C) experts).
    feat: optional (P, D) teacher features. visible: optional (P,) bool. topk: classes kept per point
    (clipped to C). Default None keeps all C: at tau = 2 the tempered tail is heavy (a synthetic teacher
    with top-1 probability 0.74 at tau = 1 lost 26% of the tau = 2 target mass at k = 5), so truncation is
    an opt-in storage saving (20 classes: 80 B/point at k = C, 20 B/point at k = 5, plus features). hints: optional
    list of ``(feats (N_l, D_l), rows (P,))`` per level (``rows``: :func:`level_rows` of each point), stored per VOXEL
    of each level (a few bytes per point, not ``sum(D_l)`` halves). The manifest records ``topk``, ``num_classes``, ``lead_shape``,
    ``feat_dim`` and ``hint_dims``; writing a scene with other settings into the same dir is an error.
    """
    z = _as_tensor(logits).detach().float().cpu()
    if z.dim() < 2:
        raise ValueError(f"logits must be (..., P, C), got {tuple(z.shape)}")
    *lead, p, c = z.shape
    if c > np.iinfo(np.int16).max:
        raise ValueError(f"{c} classes do not fit int16 class ids")
    if not torch.isfinite(z).all():
        raise ValueError(f"scene {scene_name}: logits contain NaN/inf")
    k = c if topk is None else max(1, min(int(topk), c))
    vals, idx = torch.topk(z, k, dim=-1, sorted=True)
    vals = (vals - vals[..., :1]).clamp_min(FP16_FLOOR)  # relative to the max: top-1 = 0, softmax unchanged
    arrays = {"topk_logits": vals.numpy().astype(np.float16), "topk_index": idx.numpy().astype(np.int16)}
    feat_dim = None
    if feat is not None:
        f = _as_tensor(feat).detach().float().cpu()
        if f.dim() != 2 or f.shape[0] != p:
            raise ValueError(f"feat must be ({p}, D), got {tuple(f.shape)}")
        feat_dim = int(f.shape[1])
        arrays["feat"] = f.numpy().astype(np.float16)
    # per-point rules: bool (visibility, image_right) or float16 (gain, shift), one value a point
    for name, x, flag in (("visible", visible, True), ("gain", gain, False), ("image_right", image_right, True),
                          ("shift", shift, False)):
        if x is None:
            continue
        t = _as_tensor(x).detach().cpu().reshape(-1)
        if t.shape[0] != p:
            raise ValueError(f"{name} must be ({p},), got {tuple(t.shape)}")
        arrays[name] = (t > 0).numpy() if flag else t.float().numpy().astype(np.float16)
    hint_dims = None
    if hints is not None:
        hint_dims = []
        for lvl, (f, r) in enumerate(hints):
            f, r = _as_tensor(f).detach().float().cpu(), _as_tensor(r).detach().cpu().reshape(-1)
            if f.dim() != 2 or r.shape[0] != p or (r.numel() and (int(r.min()) < 0 or int(r.max()) >= f.shape[0])):
                raise ValueError(f"hint level {lvl}: need feats (N, D) and rows ({p},) in [0, N)")
            arrays[f"hint{lvl}"] = f.numpy().astype(np.float16)
            arrays[f"hint_rows{lvl}"] = r.numpy().astype(np.int32)
            hint_dims.append(int(f.shape[1]))
    settings = {"topk": k, "num_classes": int(c), "lead_shape": [int(s) for s in lead], "feat_dim": feat_dim,
                "has_visible": visible is not None, "has_gain": gain is not None}
    if image_right is not None:  # only then: caches without it keep their manifest as it was
        settings["has_image_right"] = True
    if shift is not None:
        settings["has_shift"] = True
    if hint_dims is not None:
        settings["hint_dims"] = hint_dims
    _ensure_manifest(cache_dir, settings)
    path = _scene_file(cache_dir, scene_name)
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def _read_npz(path: Path, missing: str) -> dict:
    """Every array of one cache file (no pickles); :class:`InputError` with ``missing`` when it is not there, or with
    numpy's reason when it cannot be read."""
    if not path.is_file():
        raise InputError(path, missing)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    except Exception as e:  # numpy raises ValueError/OSError/EOFError/BadZipFile for broken files
        raise InputError(path, f"cannot read cache file ({type(e).__name__}: {e})") from None


def view_name(scene_name: str, view: int, index: int) -> str:
    """The file name (no suffix) of the hints of training sample ``index`` (a dataset index) in augmented view
    ``view``: one file per sample and view."""
    return f"{scene_name}~v{int(view)}~{int(index)}"


def write_view_hints(cache_dir, name: str, feats, coords, half: bool = False) -> Path:
    """Store the teacher's per-level hints on one augmented sample: per level ``l``, ``hint<l>`` (N_l, D_l) float32
    (float16 with ``half``) and ``coords<l>`` (N_l, 3) int32, the level's voxel coords (without the batch column), in
    the tap's level order."""
    arrays, dims, dtype = {}, [], np.float16 if half else np.float32
    for lvl, (f, c) in enumerate(zip(feats, coords)):
        f, c = _as_tensor(f).detach().float().cpu(), _as_tensor(c).detach().cpu()
        if f.dim() != 2 or c.dim() != 2 or c.shape[0] != f.shape[0] or c.shape[1] not in (3, 4):
            raise ValueError(f"hint level {lvl}: need feats (N, D) and coords (N, 3 or 4)")
        arrays[f"hint{lvl}"] = f.numpy().astype(dtype)
        arrays[f"coords{lvl}"] = c[:, -3:].numpy().astype(np.int32)
        dims.append(int(f.shape[1]))
    _ensure_manifest(cache_dir, {"kind": "hint views", "hint_dims": dims, "half": bool(half)},
                     stored="per training sample and augmented view: per-level voxel features + coords (int32)")
    path = _scene_file(cache_dir, name)
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def load_scene_cache(cache_dir, scene_name: str, expected_points: Optional[int] = None) -> dict:
    """Read one scene's cache.

    Returns numpy arrays ``{"topk_logits": (..., P, k) float16, "topk_index": (..., P, k) int16,
    "num_classes": int, "feat": (P, D) float16 (if stored), "visible": (P,) bool (if stored),
    "gain": (P,) float16 (if stored), "image_right": (P,) bool (if stored), "shift": (P,) float16 (if stored)}``.
    Raises :class:`InputError` when the file is missing, broken, or (``expected_points``) stale.
    """
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise InputError(cache_dir, "no soft-label cache here (manifest.json missing): build the cache first")
    path = _scene_file(cache_dir, scene_name)
    out = _read_npz(path, f"scene {scene_name!r} is not in the soft-label cache")
    for key in ("topk_logits", "topk_index"):
        if key not in out:
            raise InputError(path, f"cache file lacks '{key}'")
    p = out["topk_logits"].shape[-2]
    if expected_points is not None and p != int(expected_points):
        raise InputError(path, f"cache holds {p} points, the scene has {expected_points}: stale cache, rebuild it")
    out["num_classes"] = int(manifest["num_classes"])
    return out


def dense_logits_from_topk(topk_vals, topk_idx, num_classes: int, fill: float = float("-inf")) -> torch.Tensor:
    """(..., P, k) top-k logits + class ids -> (..., P, C) float32 logits, ``fill`` outside the top-k.

    With the default ``-inf`` fill, ``softmax(dense / tau)`` is the top-k truncated, renormalised target.
    """
    v = _as_tensor(topk_vals).float()
    i = _as_tensor(topk_idx).long().to(v.device)
    out = torch.full((*v.shape[:-1], int(num_classes)), float(fill), dtype=torch.float32, device=v.device)
    return out.scatter_(-1, i, v)


def topk_probs(topk_vals, topk_idx, num_classes: int, tau: float = 1.0) -> torch.Tensor:
    """(..., P, k) top-k logits + ids -> (..., P, C) float32 target ``softmax(z_topk / tau)``, 0 elsewhere."""
    v = _as_tensor(topk_vals).float()
    i = _as_tensor(topk_idx).long().to(v.device)
    p = torch.softmax(v / tau, dim=-1)
    out = torch.zeros((*v.shape[:-1], int(num_classes)), dtype=torch.float32, device=v.device)
    return out.scatter_(-1, i, p)


def mean_reducer(rows, num_voxels: int) -> torch.Tensor:
    """(N, P) CSR matrix whose product with (P, D) point values gives their per-voxel mean (0 for empty voxels).

    rows: (P,) int64 voxel of every point; ``rows >= num_voxels`` drops the point. One sparse product per target is
    several times faster on CPU than ``index_add_`` + a division, and the matrix is shared by every target of a batch.
    """
    rows = _as_tensor(rows).long().reshape(-1)
    n = int(num_voxels)
    counts = torch.bincount(rows.clamp(max=n), minlength=n + 1)[:n]
    order = torch.argsort(rows, stable=True)[: int(counts.sum())]  # dropped points sort last
    crow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(counts, 0)
    vals = 1.0 / counts.clamp_min(1).float()[rows[order]]
    with warnings.catch_warnings():  # "sparse CSR support is in beta": only CSR @ dense is used
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, order, vals, size=(n, rows.numel()))


def _pack(coords: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """(N, 4) non-negative int coords -> (N,) int64 keys, linear in a box of ``extent`` (4,)."""
    k = coords[:, 0].long()
    for d in range(1, 4):
        k = k * extent[d] + coords[:, d].long()
    return k


def level_rows(level_coords: torch.Tensor, voxel_coords: torch.Tensor, stride: int) -> torch.Tensor:
    """Row of ``level_coords`` (M, 4) holding each ``voxel_coords`` (N, 4) voxel at ``stride`` (its coords // stride,
    batch column unchanged): how a sparse UNet's level-l voxels contain its input voxels. Raises if one is missing."""
    q = voxel_coords.long().clone()
    q[:, 1:] = torch.div(q[:, 1:], int(stride), rounding_mode="floor")
    lc = level_coords.long()
    extent = torch.maximum(lc.max(0).values, q.max(0).values) + 1 if len(lc) and len(q) else torch.ones(4).long()
    keys, order = torch.sort(_pack(lc, extent))
    qk = _pack(q, extent)
    pos = torch.searchsorted(keys, qk).clamp_(max=max(len(keys) - 1, 0))
    if len(qk) and (not len(keys) or not bool((keys[pos] == qk).all())):
        raise ValueError(f"voxels at stride {stride} missing from the level's coords: not the same voxel hierarchy")
    return order[pos]


def pair_mean_matrix(rows_a, rows_b, n_a: int, n_b: int) -> torch.Tensor:
    """(n_a, n_b) CSR matrix M with ``M @ X`` = per-``a``-row mean over points of ``X[rows_b[point]]``.

    rows_a, rows_b: (P,) int64, the row of every point on each side; ``rows_a >= n_a`` drops the point. Points that
    share both rows collapse into one entry (their count), so the product costs the distinct pairs, not the points:
    for coarse voxel levels far fewer than P.
    """
    ra, rb = _as_tensor(rows_a).long().reshape(-1), _as_tensor(rows_b).long().reshape(-1)
    keep = ra < n_a
    pair, count = torch.unique(ra[keep] * n_b + rb[keep], return_counts=True)  # sorted: row-major CSR order
    return _pair_csr(pair, count, n_a, n_b)


def _pair_csr(pair, count, n_a: int, n_b: int) -> torch.Tensor:
    """The mean matrix of :func:`pair_mean_matrix` from its sorted distinct pairs ``a * n_b + b`` and their point
    counts: entry ``(a, b)`` is ``count / (points of row a)``."""
    a, b = torch.div(pair, n_b, rounding_mode="floor"), pair % n_b
    per_a = torch.zeros(n_a).index_add_(0, a, count.float()).clamp_min(1)
    crow = torch.zeros(n_a + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(a, minlength=n_a), 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": only CSR @ dense is used
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, b, count.float() / per_a[a], size=(n_a, n_b))


def topk_to_voxels(topk_p, topk_idx, rows, num_voxels: int, num_classes: int) -> torch.Tensor:
    """Per-voxel mean of per-point top-k distributions, made dense in one scatter.

    topk_p: (..., P, k) probabilities (any float dtype), topk_idx: (..., P, k) class ids, rows: (P,) int64 voxel of
    every point, where ``rows == num_voxels`` drops the point (e.g. cropped away). Returns (..., N, C) float32: the
    same as ``gather_to_voxels(topk_probs(...), ...)`` without building the dense (..., P, C) tensor first.
    """
    p = _as_tensor(topk_p)
    idx = _as_tensor(topk_idx).to(p.device).long()
    rows = _as_tensor(rows).to(p.device).long().reshape(-1)
    n, c = int(num_voxels), int(num_classes)
    lead = p.shape[:-2]
    m = int(np.prod(lead)) if lead else 1
    flat = rows[:, None] * c + idx.reshape(m, *idx.shape[-2:])  # (m, P, k)
    flat = flat + (torch.arange(m, device=p.device) * ((n + 1) * c))[:, None, None]
    total = torch.zeros(m * (n + 1) * c, dtype=torch.float32, device=p.device)
    total.index_add_(0, flat.reshape(-1), p.reshape(-1).float())
    total = total.view(m, n + 1, c)[:, :n]
    count = torch.bincount(rows, minlength=n + 1)[:n].clamp_min(1).float()
    return (total / count[None, :, None]).reshape(*lead, n, c)


def gather_to_voxels(point_values, inverse, num_voxels: Optional[int] = None, dim: int = 0) -> torch.Tensor:
    """Mean of point values over each voxel: (..., P, ...) along ``dim`` -> (..., N_vox, ...) float32.

    inverse: (P,) int64, voxel row of every point (the batch's ``inverse``). num_voxels: defaults to
    ``inverse.max() + 1``; voxels with no point get 0. Bool inputs give the fraction of True (e.g. visible).
    ``index_add_`` does the sum in one pass (no Python loop over voxels).
    """
    x = _as_tensor(point_values)
    x = x.float()
    inv = _as_tensor(inverse).long().to(x.device).reshape(-1)
    dim = dim % x.dim()
    if x.shape[dim] != inv.shape[0]:
        raise ValueError(f"{x.shape[dim]} point values along dim {dim}, {inv.shape[0]} inverse entries")
    n = int(num_voxels) if num_voxels is not None else (int(inv.max()) + 1 if inv.numel() else 0)
    shape = list(x.shape)
    shape[dim] = n
    total = torch.zeros(shape, dtype=torch.float32, device=x.device).index_add_(dim, inv, x)
    count = torch.bincount(inv, minlength=n).clamp_min(1).float()
    view = [1] * x.dim()
    view[dim] = n
    return total / count.reshape(view)


# ------------------------------------------------------------------------------------------------ building
def batch_coords(batch):
    """``(N, 4)`` ``[batch, x, y, z]`` of a collated batch's voxels (as :meth:`SparseTensor.from_batch` builds)."""
    from ..sparse import SparseTensor

    return SparseTensor.from_batch(batch["grid_coord"], batch["grid_coord"][:, :1], batch["offset"]).coords


@torch.no_grad()
def scene_outputs(model, scene, cfg, device, extra=None, hint_model=None, angle=0.0, heads=None) -> dict:
    """Per-original-point outputs of a frozen model on one unaugmented scene: ``logits`` (P,C) and, when the
    model gives them, ``feat`` (P,D) and ``visible`` (P,). With ``hint_model`` (the teacher's 3D branch), also
    ``hints``: per level, its voxel features ``(N_l, D_l)`` and every point's level-l voxel ``(P,)``. With
    ``heads`` (a teacher's per-class head choice, :func:`haskd.distill.ihd.head_logits`), ``logits`` are those of
    the chosen heads; the image rules (``gain``, ``image_right``, ``shift``) stay the fused head's."""
    from ..data.transforms import collate
    from ..engine.evaluate import scene_sample
    from ..engine.tasks import move_to
    from .hints import run_with_hints
    from .ihd import head_logits, image_gain, image_right, image_shift

    sample = scene_sample(scene, cfg.data.voxel_size, cfg.data.num_classes, cfg.data.use_normal, angle=angle)
    if extra is not None:
        sample = extra(sample)
    batch = move_to(collate([sample]), device)
    if hint_model is model:
        out, tap = run_with_hints(model, batch)
    else:
        out = model(batch)
    inv = batch["inverse"]
    res = {"logits": out["logits"].float()[inv].cpu()}
    if hint_model is not None:
        if hint_model is not model:
            tap = run_with_hints(hint_model, batch)[1]
        c0 = batch_coords(batch).cpu()
        res["hints"] = [(f.float().cpu(), level_rows(c.cpu(), c0, s)[inv.cpu()])
                        for f, c, s in zip(tap.feats, tap.coords, tap.strides)]
    if "visible" in out:
        res["visible"] = out["visible"][inv].cpu() > 0.5
        res["feat"] = out["feat"].float()[inv].cpu()
    if "logits_3d" in out:
        z3 = out["logits_3d"].float()[inv].cpu()
        res["shift"] = image_shift(res["logits"], z3)
        if scene.segment is not None:
            seg = torch.from_numpy(scene.segment)
            res["gain"] = image_gain(res["logits"], z3, seg)
            res["image_right"] = image_right(res["logits"], z3, seg) > 0
    if heads is not None:
        res["logits"] = head_logits(out["logits"], out["logits_3d"], heads)[inv].cpu()
    return res


def cache_dir_for(src, cfg, kind="teacher") -> Path:
    """Where the cache of ``kind`` built from ``src`` (a checkpoint or an experts JSON) lives: beside it."""
    split = cfg.data.train_split
    return Path(src).parent / f"soft_labels_{kind}_{split}_v{cfg.data.voxel_size:g}"


def _stamp(src) -> str:
    st = Path(src).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def _stamp_of(sources, content: str) -> str:
    return ";".join(_stamp(s) for s in sources) + (f"|{content}" if content else "")


def _fresh(cache_dir, names, stamp: str) -> bool:
    """A cache is reused only when it was built from these very checkpoints, with this content (what each scene
    file holds: both in ``stamp``), and holds every scene."""
    cache_dir = Path(cache_dir)
    sf = cache_dir / "source.txt"
    return sf.is_file() and sf.read_text() == stamp and read_manifest(cache_dir) is not None \
        and all(_scene_file(cache_dir, n).is_file() for n in names)


def _build(cache_dir, scenes, sources, content, desc, write_scene) -> Path:
    """Build a cache folder once: ``write_scene(folder, i, scene)`` for every scene, into a private folder that is
    renamed into place when complete. Two runs that start from the same checkpoint at once (two students of one
    teacher) both build, and whichever finishes second keeps the first one's folder: no run ever reads or deletes
    a folder another is writing (they once did, and a run failed on a scene file deleted under it)."""
    import shutil

    from ..progress import progress

    cache_dir = Path(cache_dir)
    names = [s.name for s in scenes]
    stamp = _stamp_of(sources, content)
    if _fresh(cache_dir, names, stamp):
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", suffix=".building", dir=cache_dir.parent))
    try:
        for i, scene in enumerate(progress(scenes, desc=desc, unit="scene", leave=False)):
            write_scene(tmp, i, scene)
        (tmp / "source.txt").write_text(stamp)
        if not _fresh(cache_dir, names, stamp):  # nobody else finished first: replace the stale folder
            old = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", suffix=".stale", dir=cache_dir.parent))
            try:
                os.replace(cache_dir, old / "cache")
            except FileNotFoundError:
                pass
            try:
                os.replace(tmp, cache_dir)
            except OSError:  # another run put its (equal) folder there in between
                if not _fresh(cache_dir, names, stamp):
                    raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir


def build_cache(teacher, dataset, cfg, device, cache_dir, feat=True, extra=None, topk=8, sources=(),
                heads=None) -> Path:
    """Teacher soft labels (+ features, visibility) per original point of every scene, once; ``heads``: the
    per-class head choice of ``distill.teacher_head`` (None: the fused head)."""
    from .ihd import heads_tag

    def write(folder, i, scene):
        o = scene_outputs(teacher, scene, cfg, device, extra=(lambda s: extra(s, i)) if extra else None,
                          heads=heads)
        write_scene_cache(folder, scene.name, o["logits"], feat=o.get("feat") if feat else None,
                          visible=o.get("visible"), topk=topk, gain=o.get("gain"), image_right=o.get("image_right"),
                          shift=o.get("shift"))

    logits = "teacher logits" if heads is None else "teacher heads " + heads_tag(heads)
    content = f"{logits}, {'features, ' * bool(feat)}visibility, image gain, image right, image shift"
    return _build(cache_dir, dataset.scenes, sources, content, "teacher soft labels", write)


def build_hint_cache(backbone, dataset, cfg, device, cache_dir, sources=(), views=1) -> Path:
    """Per-level hints of the teacher's 3D branch (points only, no frames needed) for every scene, once. The
    file also holds the branch's logits (the cache format's required part; not used as targets).

    ``views`` > 1 (``distill.hint_cache_views``): each level's features are the mean over the scene z-rotated by
    ``2 pi k / views``, ``k = 0..views-1``, each view's per-point features averaged into the unrotated scene's
    level-l voxels. A sparse conv net is not rotation-equivariant, and the student sees every batch at a random
    rotation: the mean over rotations is the part of the teacher's features it can match without knowing the angle.
    """
    def write(folder, i, scene):
        o = scene_outputs(backbone, scene, cfg, device, hint_model=backbone)
        hints = [[f, r] for f, r in o["hints"]]
        for k in range(1, views):
            v = scene_outputs(backbone, scene, cfg, device, hint_model=backbone, angle=2 * np.pi * k / views)
            for h, (f, r) in zip(hints, v["hints"]):
                h[0] = h[0] + torch.sparse.mm(pair_mean_matrix(h[1], r, h[0].shape[0], f.shape[0]), f)
        write_scene_cache(folder, scene.name, o["logits"], topk=1, hints=[(f / views, r) for f, r in hints])

    return _build(cache_dir, dataset.scenes, sources, f"3D-branch logits, per-level hints over {views} z-rotations",
                  "teacher hints", write)


class _Draw:
    """One training sample in one augmented view: what :func:`build_view_hint_cache` writes a file for."""

    def __init__(self, scene, view, index):
        self.view, self.index, self.name = view, index, view_name(scene, view, index)


def build_view_hint_cache(backbone, dataset, device, cache_dir, views: int, sources=(), half=False) -> Path:
    """Per-level hints of the teacher's 3D branch on the ``views`` augmented views of every training sample, the very
    samples the student trains on (``distill.hint_cache_augs``; ours): ``dataset`` (the student's training set) with
    ``views`` set draws epoch ``e``'s samples as epoch ``e mod views``, so these files hold exactly the hints an
    online teacher would compute on the student's batches (float32; float16 with ``half``,
    ``distill.hint_cache_augs_half``). One forward per sample and view, no frames.

    The folder is tied to everything that decides the samples (seed, voxel size, crop, augmentation, repeat): a change
    in any of them rebuilds it. Returns the folder."""
    import copy

    from ..data.transforms import collate
    from ..engine.tasks import move_to
    from .hints import run_with_hints

    ds = copy.copy(dataset)
    ds.frames, ds.views = None, int(views)
    n = len(ds.scenes)
    draws = [_Draw(ds.scenes[i % n].name, v, i) for v in range(ds.views) for i in range(len(ds))]

    @torch.no_grad()
    def write(folder, _, draw):
        ds.set_epoch(draw.view)
        sample = ds[draw.index]
        if sample.get("mix"):
            raise HaskdError("distill.hint_cache_augs: Mix3D batches (data.mix_prob > 0) overlay two samples, whose "
                             "hints no per-sample cache holds; set data.mix_prob=0 or distill.hint_cache_augs=0")
        tap = run_with_hints(backbone, move_to(collate([sample]), device), "the teacher's 3D branch")[1]
        write_view_hints(folder, draw.name, tap.feats, tap.coords, half=half)

    recipe = sorted((ds.recipe or {}).items())
    content = (f"3D-branch hints ({'float16' if half else 'float32'}) on {ds.views} augmented views: seed {ds.seed}, "
               f"voxel {ds.voxel_size:g}, max voxels {ds.max_voxels}, normals {ds.use_normal}, augment {ds.augment}, "
               f"repeat {ds.repeat}, recipe {recipe}")
    return _build(cache_dir, draws, sources, content, "teacher hints, augmented views", write)


def build_expert_cache(experts, dataset, cfg, device, cache_dir, topk=8, sources=()) -> Path:
    """The snapshot experts' soft labels per original point of every scene, all experts in one file, once."""
    def write(folder, i, scene):
        z = torch.stack([scene_outputs(m, scene, cfg, device)["logits"] for m in experts])
        write_scene_cache(folder, scene.name, z, topk=topk)

    return _build(cache_dir, dataset.scenes, sources, "", "expert soft labels", write)


# ------------------------------------------------------------------------------------------------ reading
class CacheReader:
    """Reads one cache folder onto batches: each scene's file is read once (kept in memory, as probabilities at
    ``tau``), and per batch the per-point rows are averaged onto the batch's (augmented, cropped) voxels through the
    point -> voxel ``inverse``: per point ``softmax(topk / tau)``, then the mean over the points of each voxel.
    ``keys``: the stored per-point targets besides the probabilities that the loss reads (``feat``, ``visible``,
    ``gain``, ``image_right``, ``shift``); None = every one stored. The others are not averaged per batch."""

    def __init__(self, cache_dir, num_classes: int, tau: float, keys=None):
        self.cache_dir = Path(cache_dir)
        self.num_classes = int(num_classes)
        self.tau = tau
        self.keys = None if keys is None else frozenset(keys)
        self._mem = {}

    def scene(self, name) -> dict:
        """One scene's cache as tensors, read once: the probabilities at ``tau`` (float16; the softmax is done here,
        not per batch), dense in class order when the cache kept every class, else top-k with their class ids; and
        feat / visible / gain / image_right / shift / hints when stored."""
        if name not in self._mem:
            c = load_scene_cache(self.cache_dir, name)
            p = torch.softmax(torch.from_numpy(c["topk_logits"]).float() / self.tau, -1)
            idx = torch.from_numpy(c["topk_index"]).long()
            if idx.shape[-1] >= self.num_classes:  # every class kept: dense, class-ordered, points first, no index
                d = torch.zeros((*p.shape[:-1], self.num_classes)).scatter_(-1, idx, p)
                t = {"dense": (d.permute(1, 0, 2) if d.dim() == 3 else d).contiguous().half()}
            else:
                t = {"probs": p.half(), "index": idx.short()}
            for k in ("feat", "visible", "gain", "image_right", "shift"):
                if k in c:
                    t[k] = torch.from_numpy(c[k])
            levels = sorted(int(k[4:]) for k in c if k.startswith("hint") and k[4:].isdigit())
            if levels:
                t["hints"] = [(torch.from_numpy(c[f"hint{l}"]), torch.from_numpy(c[f"hint_rows{l}"]).long())
                              for l in levels]
            self._mem[name] = t
        return self._mem[name]

    def voxels(self, batch) -> dict:
        """Per-voxel targets from the per-point cache: probs (..., N, C), and feat / visible / gain / image_right /
        shift when stored. Always computed in float32, outside any autocast of the training step (``optim.amp``)."""
        with torch.autocast("cpu", enabled=False):
            return self._voxels_fp32(batch)

    def _voxels_fp32(self, batch):
        inv = batch["inverse"].cpu()
        N = batch["grid_coord"].shape[0]
        starts = [0] + batch["point_offset"].tolist()[:-1]
        ends = batch["point_offset"].tolist()
        parts = [self.scene(name) for name in batch["scene"]]
        # points cropped away carry -1: they go to a dump row N, dropped at the end (no masked copies)
        i = inv[starts[0]:ends[-1]]
        rows = torch.where(i >= 0, i, torch.full_like(i, N))
        wanted = {"dense", "probs", "index"} | (set(parts[0]) if self.keys is None else self.keys)
        keys = [k for k in parts[0] if k != "hints" and k in wanted]
        if len(parts) == 1:  # nothing to join: the scene's own tensors (read, never written)
            cat = {k: parts[0][k] for k in keys}
        else:
            cat = {k: torch.cat([p[k] for p in parts], dim=-2 if k in ("probs", "index") else 0) for k in keys}
        reducer = mean_reducer(rows, N)  # one per batch, shared by every target below

        def mean(x):  # (P, ...) per point -> (N, ...) per voxel, float32
            return torch.sparse.mm(reducer, x.reshape(x.shape[0], -1).float()).reshape(N, *x.shape[1:])

        dev = batch["grid_coord"].device
        if "dense" in cat:
            probs = mean(cat["dense"])
            probs = probs.permute(1, 0, 2) if probs.dim() == 3 else probs  # experts: (N, M, C) -> (M, N, C)
        else:
            probs = topk_to_voxels(cat["probs"], cat["index"], rows, N, self.num_classes)
        out = {"probs": probs.to(dev)}
        if "feat" in cat:
            out["feat"] = mean(cat["feat"]).to(dev)
        if "visible" in cat:
            out["visible"] = (mean(cat["visible"]) > 0.5).float().to(dev)
        for k in ("gain", "shift"):
            if k in cat:
                out[k] = mean(cat[k]).to(dev)
        if "image_right" in cat:  # per voxel: the share of its points where only the images made the teacher right
            out["image_right"] = mean(cat["image_right"]).to(dev)
        return out

    def hints(self, batch, level_coords, strides) -> list:
        """Per-level cached hints for the voxels of a student's levels (``level_coords``: each level's ``(N_l, 4)``
        voxel coords, at ``strides``): the cached level-l features of the unaugmented scene averaged over the points
        of each student voxel of that level. Float32, outside any autocast."""
        with torch.autocast("cpu", enabled=False):
            return self._hints_fp32(batch, level_coords, strides)

    def _hints_fp32(self, batch, level_coords, strides):
        # Fine to coarse, every level's (student voxel, teacher voxel) pairs come from the next finer level's pairs
        # through both nets' parent maps (a voxel hierarchy: a level-l voxel lies in one voxel of every coarser
        # level): one pass over the points at the finest level, then passes over the far fewer pairs. The same
        # CSR matrices as pair_mean_matrix per level from the points, several times cheaper on a 5-level UNet.
        names = list(batch["scene"])
        n0 = batch["grid_coord"].shape[0]
        inv = batch["inverse"].cpu()
        c0 = batch_coords(batch).cpu()
        dev = batch["grid_coord"].device
        order = sorted(range(len(strides)), key=lambda l: int(strides[l]))
        out = [None] * len(order)
        a = torch.where(inv >= 0, inv, torch.full_like(inv, n0))  # student row per point; cropped: dropped
        prev = None  # (coords, stride, teacher rows, level) of the next finer level
        for lvl in order:
            coords, stride = level_coords[lvl].cpu(), int(strides[lvl])
            n = coords.shape[0]
            feats = [self.scene(nm)["hints"][lvl][0] for nm in names]
            nb = sum(f.shape[0] for f in feats)
            if prev is None:  # finest level: from the points
                if stride == 1 and torch.equal(coords.long(), c0.long()):
                    srow = torch.arange(n)
                else:
                    srow = level_rows(coords, c0, stride)
                a = torch.cat([srow, torch.tensor([n])])[a]
                b = self._teacher_rows(names, lvl)
                keep = a < n
                a, b = a[keep], b[keep]
                key, count = torch.unique(a * nb + b, return_counts=True)
            else:  # coarser: parents of the finer level's pairs, equal pairs merged with their counts summed
                pcoords, pstride, pnb, plvl = prev
                if stride % pstride:
                    raise ValueError(f"strides {pstride} and {stride} do not nest")
                spar = level_rows(coords, pcoords, stride // pstride)
                tpar = self._teacher_parents(names, plvl, lvl)
                key, where = torch.unique(spar[key // pnb] * nb + tpar[key % pnb], return_inverse=True)
                count = torch.zeros(len(key), dtype=count.dtype).index_add_(0, where, count)
            out[lvl] = torch.sparse.mm(_pair_csr(key, count, n, nb), torch.cat(feats).float()).to(dev)
            prev = (coords, stride, nb, lvl)
        return out

    def _teacher_rows(self, names, lvl) -> torch.Tensor:
        """Every point's teacher voxel at level ``lvl``, the batch's scenes stacked (rows offset per scene)."""
        rows, base = [], 0
        for nm in names:
            f, r = self.scene(nm)["hints"][lvl]
            rows.append(r + base)
            base += f.shape[0]
        return torch.cat(rows)

    def _teacher_parents(self, names, fine, coarse) -> torch.Tensor:
        """The teacher's level-``coarse`` voxel holding each of its level-``fine`` voxels, the batch's scenes
        stacked; per scene from its points' rows at both levels, once."""
        parts, base = [], 0
        for nm in names:
            t = self.scene(nm)
            memo = t.setdefault("hint_parents", {})
            if (fine, coarse) not in memo:
                (ff, rf), rc = t["hints"][fine], t["hints"][coarse][1]
                par = torch.zeros(ff.shape[0], dtype=torch.int64)
                par[rf] = rc
                memo[(fine, coarse)] = par
            parts.append(memo[(fine, coarse)] + base)
            base += t["hints"][coarse][0].shape[0]
        return torch.cat(parts)


class ViewHintReader:
    """Reads a cache of :func:`build_view_hint_cache` onto batches drawn from its views (each sample's ``draw``):
    per level, the cached teacher features of each student voxel, found by its coords. When the student's voxel
    hierarchy is the teacher's (the same voxelization of the same sample), these are the online hints (to the bit in
    float32; to float16 rounding with ``half``). Files are read once and kept for the two most recent views (an epoch's and the next one's prefetch)."""

    def __init__(self, cache_dir):
        self.cache_dir = Path(cache_dir)
        self._mem, self._views = {}, []

    def _load(self, scene, view, index) -> dict:
        name = view_name(scene, view, index)
        if name not in self._mem:
            if view not in self._views:
                self._views.append(view)
                if len(self._views) > 2:
                    old = self._views.pop(0)
                    self._mem = {k: v for k, v in self._mem.items() if v["view"] != old}
            arrays = _read_npz(_scene_file(self.cache_dir, name),
                               "this sample and view is not in the hint cache (distill.hint_cache_augs)")
            t = {k: torch.from_numpy(v) for k, v in arrays.items()}
            for k in [k for k in t if k.startswith("coords")]:  # as the student's coords are: [batch 0, x, y, z]
                t[k] = torch.cat([torch.zeros((len(t[k]), 1), dtype=torch.int64), t[k].long()], 1)
            t["view"] = view
            self._mem[name] = t
        return self._mem[name]

    def hints(self, batch, level_coords, strides=None) -> list:
        """The cached teacher features at the student's voxels of every level (``level_coords``: each level's
        ``(N_l, 4)`` ``[batch, x, y, z]`` coords, the student's tap order), float32, on the batch's device."""
        draws = batch.get("draw")
        if draws is None:
            raise HaskdError("distill.hint_cache_augs: the batch does not say which augmented view its samples are "
                             "(its dataset has no views set)")
        files = [self._load(sc, v, i) for sc, (v, i) in zip(batch["scene"], draws)]
        dev = batch["grid_coord"].device
        out = []
        for lvl, coords in enumerate(level_coords):
            coords = coords.cpu().long()
            if len(files) == 1:  # no copies (float16 files are made float32 here)
                feats, tc = files[0][f"hint{lvl}"].float(), files[0][f"coords{lvl}"]
            else:
                feats = torch.cat([f[f"hint{lvl}"] for f in files]).float()
                tc = torch.cat([f[f"coords{lvl}"] for f in files])
                tc[:, 0] = torch.repeat_interleave(torch.arange(len(files)),
                                                   torch.tensor([len(f[f"coords{lvl}"]) for f in files]))
            if not torch.equal(tc, coords):  # same voxels in another order (or none: a stale cache, an error)
                try:
                    feats = feats[level_rows(tc, coords, 1)]
                except ValueError:
                    raise HaskdError(f"{self.cache_dir}: level {lvl} of the cached teacher hints does not hold the "
                                     "student's voxels (a stale cache, or another voxel hierarchy)") from None
            out.append(feats.to(dev))
        return out
