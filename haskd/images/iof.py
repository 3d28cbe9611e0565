"""IOF (information-oriented frame filtering): choose the K most informative RGB-D frames of a scene for the teacher.

Policies (same K for all, so they compare fairly):

- ``iof`` (ours): greedy, ``score(f) = coverage_gain(f) * quality(f) * (1 + lam * uncertainty_gain(f))``

  * ``coverage_gain``: number of scene voxels that f sees (depth-consistent, ``|depth - z| < tau``) and that the
    frames chosen so far do not (the greedy maximum-coverage rule of MVPNet);
  * ``quality``: sharpness = variance of the Laplacian of the grey image, divided by the scene's maximum, raised
    to ``quality_power`` (so motion-blurred frames lose);
  * ``uncertainty_gain``: mean per-point prediction entropy of a 3D model over the newly covered voxels, normalised
    to [0, 1] (by ``entropy_max``, e.g. log C, or by the scene maximum); 0 when no entropy is given.
- ``uniform``: one random frame in each of K equal temporal chunks (BPNet style).
- ``random``: K random frames.

Per-frame visibility is computed once per scene into a :class:`FrameVisibility` (boolean frame x point and
frame x voxel matrices), so every policy and K reuses it and the greedy loop is a few array ops.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import HaskdError, InputError
from .lifting import visibility

log = logging.getLogger(__name__)

POLICIES = ("iof", "uniform", "random")


@dataclass
class FrameVisibility:
    """What every candidate frame of one scene sees.

    ids: candidate frame ids (F,), temporal order. point_vis: (F, N) bool. voxel_vis: (F, M) bool.
    point_voxel: (N,) int64 voxel row of every point. sharpness: (F,) variance of the Laplacian.
    quality: (F,) sharpness / scene max, in [0, 1].
    """

    ids: list
    point_vis: np.ndarray
    voxel_vis: np.ndarray
    point_voxel: np.ndarray
    sharpness: np.ndarray
    quality: np.ndarray
    voxel_size: float
    tau: float

    @property
    def num_voxels(self) -> int:
        return int(self.voxel_vis.shape[1])

    def index(self, ids) -> np.ndarray:
        pos = {f: i for i, f in enumerate(self.ids)}
        try:
            return np.array([pos[f] for f in ids], dtype=np.int64)
        except KeyError as e:
            raise HaskdError(f"frame {e.args[0]} is not a candidate frame") from None

    def coverage(self, ids) -> float:
        """Fraction of the scene's points seen by at least one of ``ids``."""
        if len(ids) == 0:
            return 0.0
        return float(self.point_vis[self.index(ids)].any(0).mean())


def voxelize(points, voxel_size: float) -> np.ndarray:
    """(N,) int64 voxel row per point (rows numbered 0..M-1)."""
    g = np.floor((np.asarray(points, dtype=np.float64) - np.min(points, 0)) / voxel_size).astype(np.int64)
    _, inv = np.unique(g, axis=0, return_inverse=True)
    return inv.reshape(-1)


def sharpness(path, max_side: int = 640) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image, decoded at about ``max_side`` pixels wide.

    JPEG draft mode decodes at a reduced scale directly (much cheaper than full decode); the scale is the same for
    every frame of a scene, so the per-scene normalisation keeps the ranking meaningful.
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.width > max_side:
            im.draft("L", (max_side, max_side * im.height // im.width))
        g = np.asarray(im.convert("L"), dtype=np.float32)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def _load_depths(frameset, ids, step: int):
    """Depths (F, h, w) metres at 1/step resolution and poses; an unreadable frame gets an all-invalid depth (it sees
    nothing) and is listed in the third value."""
    ds, ps, bad = [], [], []
    for fid in ids:
        try:
            d = frameset.read_depth(fid)
        except InputError as e:
            log.warning("%s; frame skipped", e)
            bad.append(fid)
            h, w = frameset.depth_hw or ds[0].shape
            d = np.zeros((h, w), dtype=np.float32)
        # Strided subsampling keeps pixel j of the small map = pixel step*j of the full one, so plain scaling of K
        # by 1/step is exact in the pixel-centre convention.
        ds.append(d[::step, ::step])
        ps.append(frameset.pose(fid))
    return np.stack(ds), np.stack(ps), bad


def build_visibility(points, frameset, voxel_size: float = 0.05, tau: float = 0.1, stride: int = 1,
                     depth_step: int = 2, chunk: int = 8, ids=None) -> FrameVisibility:
    """Compute which points/voxels every candidate frame sees (depth-consistent within ``tau``).

    Args:
        points: (N, 3) world coordinates (the frame of the poses).
        frameset: a :class:`haskd.data.frames.FrameSet`.
        stride: keep every ``stride``-th frame as a candidate. ``ids`` overrides the candidate list.
        depth_step: read depth at 1/depth_step resolution (faster, nearest-pixel lookup is still ~1 px accurate).
        chunk: frames projected at once (bounds memory to chunk x N).
    """
    points = np.asarray(points, dtype=np.float32)
    cand = list(frameset.ids[::max(1, int(stride))]) if ids is None else list(ids)
    if not cand:
        raise HaskdError(f"{frameset.root}: no candidate frame")
    pv = voxelize(points, voxel_size)
    M = int(pv.max()) + 1
    F = len(cand)
    point_vis = np.zeros((F, len(points)), dtype=bool)
    voxel_vis = np.zeros((F, M), dtype=bool)
    Kd = np.asarray(frameset.K_depth, dtype=np.float64).copy()
    Kd[:2] /= depth_step
    Kd[2] = (0, 0, 1)
    pts = torch.from_numpy(points)
    bad = []
    for s in range(0, F, chunk):
        part = cand[s:s + chunk]
        depth, pose, unreadable = _load_depths(frameset, part, depth_step)
        bad += unreadable
        vis = visibility(pts, torch.from_numpy(pose).float(), torch.from_numpy(Kd).float(),
                         torch.from_numpy(depth), tau).numpy()
        point_vis[s:s + len(part)] = vis
        fi, pi = np.nonzero(vis)
        voxel_vis[s + fi, pv[pi]] = True
    sharp = []
    for fid in cand:
        try:
            sharp.append(sharpness(frameset.root / "color" / f"{fid}.jpg"))
        except Exception as e:  # a truncated or garbage JPEG: skipped and counted, like the frame list's own skips
            log.warning("%s: unreadable image (%s); frame skipped", frameset.root / "color" / f"{fid}.jpg",
                        type(e).__name__)
            bad.append(fid)
            sharp.append(0.0)
    sharp = np.array(sharp)
    if bad:
        frameset.skipped["unreadable image"] = frameset.skipped.get("unreadable image", 0) + len(set(bad))
        keep = np.array([fid not in set(bad) for fid in cand])
        if not keep.any():
            raise HaskdError(f"{frameset.root}: no readable frame among the candidates")
        cand = [f for f, k in zip(cand, keep) if k]
        point_vis, voxel_vis, sharp = point_vis[keep], voxel_vis[keep], sharp[keep]
    quality = sharp / sharp.max() if sharp.max() > 0 else np.ones_like(sharp)
    return FrameVisibility(cand, point_vis, voxel_vis, pv, sharp, quality, float(voxel_size), float(tau))


def _voxel_uncertainty(cache: FrameVisibility, point_entropy, entropy_max) -> np.ndarray:
    """(M,) mean point entropy per voxel, normalised to [0, 1]."""
    e = np.asarray(point_entropy, dtype=np.float64).reshape(-1)
    if e.shape[0] != cache.point_voxel.shape[0]:
        raise HaskdError(f"point_entropy has {e.shape[0]} values for {cache.point_voxel.shape[0]} points")
    M = cache.num_voxels
    ve = np.bincount(cache.point_voxel, weights=e, minlength=M) / np.maximum(
        np.bincount(cache.point_voxel, minlength=M), 1)
    top = float(entropy_max) if entropy_max else float(ve.max())
    return np.clip(ve / top, 0.0, 1.0) if top > 0 else np.zeros(M)


def _scores(cache, order_or_none, k, lam, unc, quality):
    """Greedy IOF. With ``order_or_none`` given, only score that order (for the baselines)."""
    covered = np.zeros(cache.num_voxels, dtype=bool)
    chosen, scores = [], []
    F = len(cache.ids)
    for step in range(min(k, F) if order_or_none is None else len(order_or_none)):
        new = cache.voxel_vis & ~covered                                   # (F, M)
        gain = new.sum(1).astype(np.float64)
        ug = (new @ unc) / np.maximum(gain, 1) if unc is not None else np.zeros(F)
        score = gain * quality * (1.0 + lam * ug)
        if order_or_none is None:
            score_pick = score.copy()
            score_pick[chosen] = -np.inf
            f = int(np.argmax(score_pick))
            if gain[f] == 0:
                # Nothing new to see: fill up with the sharpest unused frames (ties -> temporal order).
                q = quality.copy()
                q[chosen] = -np.inf
                f = int(np.argmax(q))
        else:
            f = int(order_or_none[step])
        chosen.append(f)
        scores.append(float(score[f]))
        covered |= cache.voxel_vis[f]
    return chosen, scores


def select_frames(points, frameset, k: int = 5, policy: str = "iof", voxel_size: float = 0.05, tau: float = 0.1,
                  lam: float = 1.0, point_entropy=None, seed: int = 0, stride: int = 1,
                  entropy_max: Optional[float] = None, quality_power: float = 1.0,
                  cache: Optional[FrameVisibility] = None) -> dict:
    """Choose ``k`` frames of a scene.

    Args:
        points: (N, 3) world coordinates. frameset: :class:`haskd.data.frames.FrameSet`.
        policy: "iof" | "uniform" | "random". lam: weight of the uncertainty term.
        point_entropy: optional (N,) prediction entropy of a 3D model per point.
        entropy_max: normaliser of the entropy (e.g. log C); default: the scene's max voxel entropy.
        quality_power: exponent on the normalised sharpness (0 switches the quality term off).
        cache: a :class:`FrameVisibility` from :func:`build_visibility` (reused across policies and K).
    Returns:
        dict ``ids`` (list of frame ids, selection order for iof, temporal order otherwise), ``scores`` (the IOF
        score of each chosen frame at its position, for every policy, so they can be compared), ``coverage``
        (fraction of points seen by the chosen frames).
    """
    if policy not in POLICIES:
        raise HaskdError(f"unknown frame policy '{policy}' (choose from {', '.join(POLICIES)})")
    if k < 1:
        raise HaskdError(f"k must be >= 1, got {k}")
    if cache is None:
        cache = build_visibility(points, frameset, voxel_size, tau, stride)
    F = len(cache.ids)
    unc = _voxel_uncertainty(cache, point_entropy, entropy_max) if point_entropy is not None and lam else None
    quality = cache.quality ** quality_power
    rng = np.random.default_rng(seed)
    if policy == "iof":
        order, scores = _scores(cache, None, k, lam, unc, quality)
    else:
        if policy == "uniform":
            order = [int(rng.choice(c)) for c in np.array_split(np.arange(F), min(k, F))]
        else:
            order = sorted(rng.choice(F, size=min(k, F), replace=False).tolist())
        _, scores = _scores(cache, order, k, lam, unc, quality)
    ids = [cache.ids[i] for i in order]
    return {"ids": ids, "scores": scores, "coverage": cache.coverage(ids)}


def coverage(points, frameset, ids, voxel_size: float = 0.05, tau: float = 0.1,
             cache: Optional[FrameVisibility] = None) -> float:
    """Fraction of ``points`` seen (depth-consistent within ``tau``) by at least one of the frames ``ids``."""
    if cache is None:
        cache = build_visibility(points, frameset, voxel_size, tau, ids=list(ids))
    return cache.coverage(list(ids))


def _caption_font(size: int):
    """A scalable font of ``size`` px (Pillow >= 10.1 ships one), else PIL's small bitmap default."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: no size argument
        return ImageFont.load_default()


def contact_sheet(frameset, ids, scores, path, thumb_width: int = 320, cols: int = 5, title: str = "") -> Path:
    """Write a PNG grid of the chosen frames captioned with id and score (a None score is left out).

    Returns the path."""
    from PIL import Image, ImageDraw

    thumbs = []
    for fid in ids:
        with Image.open(frameset.root / "color" / f"{fid}.jpg") as im:
            im.draft("RGB", (thumb_width, thumb_width))
            im = im.convert("RGB")
            thumbs.append(im.resize((thumb_width, max(1, round(im.height * thumb_width / im.width)))))
    if not thumbs:
        raise HaskdError("contact sheet: no frame to draw")
    font = _caption_font(max(13, thumb_width // 18))  # the default bitmap font is ~8 px: unreadable scaled
    size = getattr(font, "size", 10)
    cap, top = size + 8, size + 10 if title else 0
    th = max(t.height for t in thumbs)
    cols = max(1, min(cols, len(thumbs)))
    rows = (len(thumbs) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * thumb_width, top + rows * (th + cap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    scores = list(scores) if scores is not None else []
    scores += [None] * (len(thumbs) - len(scores))
    for i, (t, fid, s) in enumerate(zip(thumbs, ids, scores)):
        x, y = (i % cols) * thumb_width, top + (i // cols) * (th + cap)
        sheet.paste(t, (x, y))
        draw.text((x + 4, y + th + 3), f"#{i + 1} {fid}" + ("" if s is None else f"  score {s:.4g}"), fill=(0, 0, 0),
                  font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
