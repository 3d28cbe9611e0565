"""The HAS-KD student task: CE + IHD (multi-modal teacher) + ASD (snapshot experts), with cached or online targets.

Frozen helpers (teacher, snapshot experts) are held outside the module tree: DDP wraps only the student and the
training-only projector; the saved model is the student alone (same network as the baseline).

Cached mode (default, ``distill.cache=true``): teacher and expert outputs are computed once per scene on the
unaugmented scene and stored per ORIGINAL point as top-k logits in float16 (:mod:`haskd.distill.cache`). A batch maps them
to its augmented, cropped voxels through the point -> voxel ``inverse``: per point ``softmax(topk / tau)``, then the
mean over the points of each voxel. Online mode runs the frozen models on every batch.

With ``distill.teacher_expert`` (ours) the teacher is one more expert: each class's logit target comes from the
teacher or from its snapshot expert, whichever was better on val (:func:`haskd.distill.asd.teacher_classes`), never both.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import cache as sl_cache
from .asd import ASDLoss, iou_array, teacher_classes, teacher_route
from ..data.transforms import collate
from ..engine.checkpoint import load_model
from ..engine.evaluate import scene_sample
from ..engine.tasks import ce_loss, move_to
from ..errors import HaskdError
from .ihd import HintLoss, IHDLoss, image_gain, image_right

log = logging.getLogger(__name__)


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class _Frozen:
    """Holds a frozen module without registering it (so it is not trained, wrapped or saved)."""

    def __init__(self, module):
        self.module = module


@torch.no_grad()
def scene_outputs(model, scene, cfg, device, extra=None, hint_model=None, angle=0.0) -> dict:
    """Per-original-point outputs of a frozen model on one unaugmented scene: ``logits`` (P,C) and, when the
    model gives them, ``feat`` (P,D) and ``visible`` (P,). With ``hint_model`` (the teacher's 3D branch), also
    ``hints``: per level, its voxel features ``(N_l, D_l)`` and every point's level-l voxel ``(P,)``."""
    sample = scene_sample(scene, cfg.data.voxel_size, cfg.data.num_classes, cfg.data.use_normal, angle=angle)
    if extra is not None:
        sample = extra(sample)
    batch = move_to(collate([sample]), device)
    out = _with_hints(model, batch) if hint_model is model else model(batch)
    inv = batch["inverse"]
    res = {"logits": out["logits"].float()[inv].cpu()}
    if hint_model is not None:
        h = out if hint_model is model else _with_hints(hint_model, batch)
        c0 = _batch_coords(batch).cpu()
        res["hints"] = [(f.float().cpu(), sl_cache.level_rows(c.cpu(), c0, s)[inv.cpu()])
                        for f, c, s in zip(h["hints"], h["hint_coords"], hint_model.hint_strides)]
    if "visible" in out:
        res["visible"] = out["visible"][inv].cpu() > 0.5
        res["feat"] = out["feat"].float()[inv].cpu()
    if "logits_3d" in out and scene.segment is not None:
        z3, seg = out["logits_3d"].float()[inv].cpu(), torch.from_numpy(scene.segment)
        res["gain"] = image_gain(res["logits"], z3, seg)
        res["image_right"] = image_right(res["logits"], z3, seg) > 0
    return res


class DistillTask(nn.Module):
    def __init__(self, student, ihd=None, asd=None, teacher=None, experts=(), cache_dirs=None, num_classes=20,
                 tau=2.0, train_set=None, hint=None, teacher_classes=None):
        super().__init__()
        # (C,) bool with distill.teacher_expert: the classes whose logit target is the teacher's (the rest: ASD)
        self.teacher_classes = None if teacher_classes is None else torch.as_tensor(teacher_classes).bool()
        self.model = student
        self.ihd = ihd
        self.asd = asd
        self.hint = hint
        self._teacher = _Frozen(teacher) if teacher is not None else None
        self._experts = _Frozen(nn.ModuleList(experts)) if experts else None
        self.cache_dirs = cache_dirs or {}
        self.num_classes = num_classes
        self.tau = tau
        self._mem = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, student, cfg, device, datasets):
        d = cfg.distill
        train_set = datasets["train"]
        teacher, ihd, experts, asd, cache_dirs, hint, routed = None, None, [], None, {}, None, None
        if d.teacher_ckpt:
            teacher, tcfg = load_model(d.teacher_ckpt, device=device, return_config=True)
            if tcfg.role != "teacher":
                raise HaskdError(f"{d.teacher_ckpt}: distill.teacher_ckpt must be a teacher checkpoint")
            _frozen(teacher)
            ihd = IHDLoss(student.feat_dim, teacher.feat_dim, tau=d.tau, logit_weight=d.logit_weight,
                          feat_weight=d.feat_weight, trust=d.trust, image_gain=d.image_gain,
                          kd_target=d.kd_target, class_balance=d.class_balance)
            from ..images.provider import FrameProvider

            if d.hint_weight > 0:
                try:
                    hint = HintLoss(_hint_dims(student, "the student"), _hint_dims(teacher.backbone, "the teacher's "
                                    "3D branch"), d.hint_weight)
                except ValueError as e:  # a 3D branch of another depth: no level-to-level match
                    raise HaskdError(f"{d.teacher_ckpt}: distill.hint_weight: {e}") from None
            frames = FrameProvider.for_run(tcfg, Path(d.teacher_ckpt).parent)
            if d.cache:
                view = train_set.with_frames(frames)
                cache_dirs["teacher"] = build_cache(teacher, view, tcfg, device, _cache_dir(d.teacher_ckpt, cfg),
                                                    feat=d.feat_weight > 0, extra=_frames_of(view),
                                                    topk=d.cache_topk, sources=[d.teacher_ckpt])
                if hint is not None and d.hint_cache:  # own folders: switching the options rebuilds nothing
                    if d.hint_cache_views < 1:
                        raise HaskdError(f"distill.hint_cache_views must be at least 1, got {d.hint_cache_views}")
                    kind = "teacher_hints" + (f"_{d.hint_cache_views}rot" if d.hint_cache_views > 1 else "")
                    cache_dirs["teacher_hints"] = build_hint_cache(teacher.backbone, train_set, cfg, device,
                                                                   _cache_dir(d.teacher_ckpt, cfg, kind),
                                                                   sources=[d.teacher_ckpt], views=d.hint_cache_views)
            else:  # the online teacher sees each training sample's frames
                train_set.frames = frames.load(train_set.scenes)
        if d.experts:
            table = json.loads(Path(d.experts).read_text())
            snap_paths = [_resolve(p, d.experts) for p in table["snapshots"]]
            for p in snap_paths:
                experts.append(_frozen(load_model(p, device=device)))
            sel = {"indices": np.array(table["indices"])[:, : d.asd_topk],
                   "weights": np.array(table["weights"])[:, : d.asd_topk]}
            sel["weights"] = sel["weights"] / np.maximum(sel["weights"].sum(1, keepdims=True), 1e-12)
            if d.teacher_expert and d.teacher_ckpt:  # ASD alone (no teacher): the pool is the snapshots
                routed = _teacher_classes(table, d)
            asd = ASDLoss(sel, tau=d.tau, weight=d.asd_weight, unlabeled=d.asd_unlabeled, trust=d.asd_trust,
                          kd_target=d.kd_target, class_balance=d.class_balance)
            if d.cache:
                cache_dirs["experts"] = build_expert_cache(experts, train_set, cfg, device,
                                                           _cache_dir(d.experts, cfg, "experts"), topk=d.cache_topk,
                                                           sources=[d.experts, *snap_paths])
        if d.hint_weight > 0 and hint is None:
            raise HaskdError("distill.hint_weight needs distill.teacher_ckpt (the hints come from its 3D branch)")
        return cls(student, ihd, asd, teacher, experts, cache_dirs, cfg.data.num_classes, d.tau, hint=hint,
                   teacher_classes=routed)

    # ------------------------------------------------------------------ targets
    def _scene_cache(self, kind, name) -> dict:
        """One scene's cache as tensors, read once: the probabilities at ``tau`` (float16; the softmax is done here, not
        per batch), dense in class order when the cache kept every class, else top-k with their class ids; and
        feat / visible / gain when stored."""
        key = (kind, name)
        if key not in self._mem:
            c = sl_cache.load_scene_cache(self.cache_dirs[kind], name)
            p = torch.softmax(torch.from_numpy(c["topk_logits"]).float() / self.tau, -1)
            idx = torch.from_numpy(c["topk_index"]).long()
            if idx.shape[-1] >= self.num_classes:  # every class kept: dense, class-ordered, points first, no index
                d = torch.zeros((*p.shape[:-1], self.num_classes)).scatter_(-1, idx, p)
                t = {"dense": (d.permute(1, 0, 2) if d.dim() == 3 else d).contiguous().half()}
            else:
                t = {"probs": p.half(), "index": idx.short()}
            for k in ("feat", "visible", "gain", "image_right"):
                if k in c:
                    t[k] = torch.from_numpy(c[k])
            levels = sorted(int(k[4:]) for k in c if k.startswith("hint") and k[4:].isdigit())
            if levels:
                t["hints"] = [(torch.from_numpy(c[f"hint{l}"]), torch.from_numpy(c[f"hint_rows{l}"]).long())
                              for l in levels]
            self._mem[key] = t
        return self._mem[key]

    def _cached(self, kind, batch):
        """Per-voxel targets from the per-point cache: probs (..., N, C), and feat / visible / gain when stored.
        Always computed in float32, outside any autocast of the training step (``optim.amp``)."""
        with torch.autocast("cpu", enabled=False):
            return self._cached_fp32(kind, batch)

    def _cached_fp32(self, kind, batch):
        inv = batch["inverse"].cpu()
        N = batch["grid_coord"].shape[0]
        starts = [0] + batch["point_offset"].tolist()[:-1]
        ends = batch["point_offset"].tolist()
        parts = [self._scene_cache(kind, name) for name in batch["scene"]]
        # points cropped away carry -1: they go to a dump row N, dropped at the end (no masked copies)
        i = inv[starts[0]:ends[-1]]
        rows = torch.where(i >= 0, i, torch.full_like(i, N))
        cat = {k: torch.cat([p[k] for p in parts], dim=-2 if k in ("probs", "index") else 0) for k in parts[0]
               if k != "hints"}
        reducer = sl_cache.mean_reducer(rows, N)  # one per batch, shared by every target below

        def mean(x):  # (P, ...) per point -> (N, ...) per voxel, float32
            return torch.sparse.mm(reducer, x.reshape(x.shape[0], -1).float()).reshape(N, *x.shape[1:])

        dev = batch["grid_coord"].device
        if "dense" in cat:
            probs = mean(cat["dense"])
            probs = probs.permute(1, 0, 2) if probs.dim() == 3 else probs  # experts: (N, M, C) -> (M, N, C)
        else:
            probs = sl_cache.topk_to_voxels(cat["probs"], cat["index"], rows, N, self.num_classes)
        out = {"probs": probs.to(dev)}
        if "feat" in cat:
            out["feat"] = mean(cat["feat"]).to(dev)
        if "visible" in cat:
            out["visible"] = (mean(cat["visible"]) > 0.5).float().to(dev)
        if "gain" in cat:
            out["gain"] = mean(cat["gain"]).to(dev)
        if "image_right" in cat:  # per voxel: the share of its points where only the images made the teacher right
            out["image_right"] = mean(cat["image_right"]).to(dev)
        return out

    @torch.no_grad()
    def teacher_targets(self, batch):
        if "teacher" in self.cache_dirs:
            return self._cached("teacher", batch)
        out = self._teacher.module(batch)
        return {"logits": out["logits"].float(), "feat": out["feat"].float(), "visible": out["visible"],
                "gain": image_gain(out["logits"], out["logits_3d"], batch["segment"]),
                "image_right": image_right(out["logits"], out["logits_3d"], batch["segment"])}

    @torch.no_grad()
    def expert_targets(self, batch):
        if "experts" in self.cache_dirs:
            t = self._cached("experts", batch)
            return {"probs": t["probs"], "final_pred": t["probs"][-1].argmax(-1)}
        z = torch.stack([m(batch)["logits"].float() for m in self._experts.module])
        return {"logits": z}

    # ------------------------------------------------------------------ loss
    @torch.no_grad()
    def teacher_hints(self, batch, student_coords=None):
        """Per-level hint targets for this batch's student voxels: the teacher's 3D branch run online on the very
        batch, or (``distill.hint_cache``) its cached per-level features of the unaugmented scene, averaged over the
        points of each student voxel of that level (``student_coords``: the student's ``hint_coords``)."""
        if "teacher_hints" not in self.cache_dirs:
            return _with_hints(self._teacher.module.backbone, batch)["hints"]
        with torch.autocast("cpu", enabled=False):
            return self._cached_hints(batch, student_coords)

    def _cached_hints(self, batch, student_coords):
        parts = [self._scene_cache("teacher_hints", name)["hints"] for name in batch["scene"]]
        n0 = batch["grid_coord"].shape[0]
        inv = batch["inverse"].cpu()
        rows0 = torch.where(inv >= 0, inv, torch.full_like(inv, n0))  # cropped points: dropped
        c0 = _batch_coords(batch).cpu()
        dev = batch["grid_coord"].device
        out = []
        for lvl, (coords, stride) in enumerate(zip(student_coords, self.model.hint_strides)):
            n = coords.shape[0]
            vrow = torch.cat([sl_cache.level_rows(coords.cpu(), c0, stride), torch.tensor([n])])
            feats, trows, base = [], [], 0
            for p in parts:  # scenes in batch order: their points are consecutive in ``inverse``
                f, r = p[lvl]
                feats.append(f)
                trows.append(r + base)
                base += f.shape[0]
            m = sl_cache.pair_mean_matrix(vrow[rows0], torch.cat(trows), n, base)
            out.append(torch.sparse.mm(m, torch.cat(feats).float()).to(dev))
        return out

    def forward(self, batch):
        out = _with_hints(self.model, batch) if self.hint is not None else self.model(batch)
        y = batch["segment"]
        losses = {"ce": ce_loss(out["logits"], y)}
        if self.hint is not None:
            t_hints = self.teacher_hints(batch, out.pop("hint_coords"))
            losses.update(self.hint(out.pop("hints"), t_hints))
        ex = self.expert_targets(batch) if self.asd is not None else None
        route = None
        if self.teacher_classes is not None:  # one logit source per point: the teacher or its class's snapshot
            fp = ex["final_pred"] if "final_pred" in ex else ex["logits"][-1].argmax(-1)
            route = teacher_route(self.teacher_classes, y, fp, self.asd.unlabeled, self.asd.ignore_index)
        if self.ihd is not None:
            t = self.teacher_targets(batch)
            if "feat" in t and self.ihd.feat_weight == 0:
                t = {k: v for k, v in t.items() if k != "feat"}
            losses.update(self.ihd(out, t, y, logit_mask=route))
        if ex is not None:
            losses.update(self.asd(out, ex, y, point_mask=None if route is None else 1.0 - route))
        return losses, out


def _teacher_classes(table: dict, d):
    """The teacher's classes (:func:`haskd.distill.asd.teacher_classes`) from an experts JSON that holds the teacher's row."""
    if table.get("teacher_iou") is None:
        raise HaskdError(f"{d.experts}: distill.teacher_expert needs the teacher's per-class IoU in the expert table "
                         "(rebuild it: haskd experts --run RUN --teacher TEACHER_RUN)")
    return teacher_classes(iou_array(table["iou"]), iou_array(table["teacher_iou"]))


def _hint_dims(model, who):
    dims = getattr(model, "hint_dims", None)
    if dims is None:
        raise HaskdError(f"distill.hint_weight: {who} ({type(model).__name__}) gives no per-level features; hints "
                         "work with the spunet family (set distill.hint_weight=0)")
    return dims


def _batch_coords(batch):
    """``(N, 4)`` ``[batch, x, y, z]`` of a collated batch's voxels (as :meth:`SparseTensor.from_batch` builds)."""
    from ..sparse import SparseTensor

    return SparseTensor.from_batch(batch["grid_coord"], batch["grid_coord"][:, :1], batch["offset"]).coords


def _with_hints(model, batch):
    """``model(batch)`` with its per-level features (``out["hints"]``), leaving the model as it was."""
    model.return_hints = True
    try:
        return model(batch)
    finally:
        model.return_hints = False


def _resolve(p, relative_to):
    p = Path(p)
    return p if p.is_absolute() or p.exists() else Path(relative_to).parent / p


def _frames_of(view):
    """``extra(sample, i)`` giving a whole-scene sample of scene ``i`` the frames ``view`` holds for it."""
    def add(sample, i):
        sample["frames"] = view.frames_of(i)
        return sample

    return add


def _cache_dir(src, cfg, kind="teacher") -> Path:
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
    return sf.is_file() and sf.read_text() == stamp and sl_cache.read_manifest(cache_dir) is not None \
        and all(sl_cache._scene_file(cache_dir, n).is_file() for n in names)


def _build(cache_dir, scenes, sources, content, desc, write_scene) -> Path:
    """Build a cache folder once: ``write_scene(folder, i, scene)`` for every scene, into a private folder that is
    renamed into place when complete. Two runs that start from the same checkpoint at once (two students of one
    teacher) both build, and whichever finishes second keeps the first one's folder: no run ever reads or deletes
    a folder another is writing (they once did, and a run failed on a scene file deleted under it)."""
    import os
    import shutil
    import tempfile

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


def build_cache(teacher, dataset, cfg, device, cache_dir, feat=True, extra=None, topk=8, sources=()) -> Path:
    """Teacher soft labels (+ features, visibility) per original point of every scene, once."""
    def write(folder, i, scene):
        o = scene_outputs(teacher, scene, cfg, device, extra=(lambda s: extra(s, i)) if extra else None)
        sl_cache.write_scene_cache(folder, scene.name, o["logits"], feat=o.get("feat") if feat else None,
                                   visible=o.get("visible"), topk=topk, gain=o.get("gain"),
                                   image_right=o.get("image_right"))

    return _build(cache_dir, dataset.scenes, sources, "teacher logits, features, visibility, image gain, image right",
                  "teacher soft labels", write)


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
                h[0] = h[0] + torch.sparse.mm(sl_cache.pair_mean_matrix(h[1], r, h[0].shape[0], f.shape[0]), f)
        sl_cache.write_scene_cache(folder, scene.name, o["logits"], topk=1, hints=[(f / views, r) for f, r in hints])

    return _build(cache_dir, dataset.scenes, sources, f"3D-branch logits, per-level hints over {views} z-rotations",
                  "teacher hints", write)


def build_expert_cache(experts, dataset, cfg, device, cache_dir, topk=8, sources=()) -> Path:
    def write(folder, i, scene):
        z = torch.stack([scene_outputs(m, scene, cfg, device)["logits"] for m in experts])
        sl_cache.write_scene_cache(folder, scene.name, z, topk=topk)

    return _build(cache_dir, dataset.scenes, sources, "", "expert soft labels", write)
