"""The HAS-KD student task: CE + each configured distillation loss on its targets.

``DistillTask(student, losses, targets)``: ``losses`` maps ``"ihd"`` (:class:`haskd.distill.ihd.IHDLoss`), ``"hint"``
(:class:`haskd.distill.hints.HintLoss`) and ``"asd"`` (:class:`haskd.distill.asd.ASDLoss`) to the terms in use;
``targets`` maps ``"teacher"``, ``"hints"`` and ``"experts"`` to their sources (below: a frozen model online or a
cache). The losses (and their training-only projectors) are registered, the sources are
not: DDP wraps only the student and the projectors; the saved model is the student alone (same network as the
baseline). :func:`haskd.distill.setup.build_distill_task` builds one from a config; nothing here reads files.
A training loop of its own runs the student (:meth:`DistillTask.run_student`) and adds :meth:`DistillTask.terms`
to its loss.

With ``teacher_classes`` (``distill.teacher_expert``, ours) the teacher is one more expert: each class's logit target
comes from the teacher or from its snapshot expert, whichever was better on val
(:func:`haskd.distill.asd.teacher_classes`), never both.

The target sources, one small class each, ``__call__(batch, ...)``:

* :class:`TeacherTargets`: the multi-modal teacher's logits (or probabilities), features, visibility and image
  rules for IHD, from the frozen teacher run on the batch (online) or from its cache
  (:class:`haskd.distill.cache.CacheReader`).
* :class:`ExpertTargets`: the snapshot experts' logits (online) or probabilities (cached) for ASD.
* :class:`TeacherHints`: the per-level features of the teacher's 3D branch for the hint term, captured with a
  :class:`haskd.distill.hints.HintTap` on the very batch (online) or read from the hint cache.

Frozen models are held as plain attributes of these plain objects: never registered in the task's module tree, so
they are not trained, wrapped by DDP or saved with the student. Every call runs without gradients.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..engine.tasks import ce_loss
from .asd import teacher_route
from .hints import run_with_hints
from .ihd import head_logits, image_gain, image_right, image_shift

LOSSES = ("ihd", "asd", "hint")  # registration order (the task's state dict and parameter order)
SOURCES = {"ihd": "teacher", "asd": "experts", "hint": "hints"}


class DistillTask(nn.Module):
    """``forward(batch) -> (losses, out)``: the student's output and its named loss terms, ``ce`` first, then
    ``ihd_hint``, ``ihd_logit`` / ``ihd_feat`` and ``asd`` for the losses given."""

    def __init__(self, student, losses: dict, targets: dict, teacher_classes=None):
        super().__init__()
        unknown = set(losses) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown distillation losses {sorted(unknown)}; known: {LOSSES}")
        for name in losses:
            if SOURCES[name] not in targets:
                raise ValueError(f"the {name} loss needs targets[{SOURCES[name]!r}]")
        # (C,) bool with distill.teacher_expert: the classes whose logit target is the teacher's (the rest: ASD)
        self.teacher_classes = None if teacher_classes is None else torch.as_tensor(teacher_classes).bool()
        self.model = student
        for name in LOSSES:
            setattr(self, name, losses.get(name))
        self.targets = dict(targets)  # plain objects: frozen models inside are not registered
        self.kd_scale = 1.0  # every distillation term times this (distill.kd_fade: haskd.distill.fade.KDFade)

    @property
    def losses(self) -> dict:
        """The distillation loss modules in use, by name (their parameters: the training-only projectors)."""
        return {name: getattr(self, name) for name in LOSSES if getattr(self, name) is not None}

    def run_student(self, batch):
        """``(out, tap)``: the student's output, with its per-level features in ``tap`` when a hint loss is used
        (a :class:`~haskd.distill.hints.HintTap`; else None)."""
        if self.hint is not None:
            return run_with_hints(self.model, batch, "the student")
        return self.model(batch), None

    def ahead(self, batch) -> dict:
        """The targets that depend on ``batch`` alone, computed now: those of the frozen models run online (the
        teacher, its 3D branch for hints, the experts), by source name; cached targets are left to :meth:`terms`
        (cheap, and cached hints need the student's voxels). A trainer may run this on the next batch while the
        student trains on this one and hand the result back as ``batch["ahead"]`` (a dict or a future of one:
        :meth:`haskd.engine.trainer.Trainer.look_ahead`)."""
        sources = [SOURCES[name] for name in self.losses]
        return {src: self.targets[src](batch) for src in sources if getattr(self.targets[src], "cache", None) is None}

    def terms(self, batch, out, tap=None) -> dict:
        """The distillation terms (no CE) for the student's ``out`` on ``batch``: ``ihd_hint`` (needs ``tap``),
        ``ihd_logit`` / ``ihd_feat``, ``asd``, for the losses given, each times :attr:`kd_scale`. For a training loop
        that runs the student itself (``examples/library_distill.py``). Targets in ``batch["ahead"]`` (:meth:`ahead`)
        are not computed again."""
        y = batch["segment"]
        pre = batch.get("ahead") or {}
        if not isinstance(pre, dict):
            pre = pre.result()

        def target(source, *args):
            return pre[source] if source in pre else self.targets[source](batch, *args)

        losses = {}
        if self.hint is not None:
            if tap is None:
                raise ValueError("the hint loss needs the student's per-level features: run it inside a HintTap")
            t_hints = target("hints", tap.coords, tap.strides)
            losses.update(self.hint(tap.feats, t_hints))
        ex = target("experts") if self.asd is not None else None
        route = None
        if self.teacher_classes is not None:  # one logit source per point: the teacher or its class's snapshot
            fp = ex["final_pred"] if "final_pred" in ex else ex["logits"][-1].argmax(-1)
            route = teacher_route(self.teacher_classes, y, fp, self.asd.unlabeled, self.asd.ignore_index)
        if self.ihd is not None:
            t = target("teacher")
            if "feat" in t and self.ihd.feat_weight == 0:
                t = {k: v for k, v in t.items() if k != "feat"}
            losses.update(self.ihd(out, t, y, logit_mask=route))
        if ex is not None:
            losses.update(self.asd(out, ex, y, point_mask=None if route is None else 1.0 - route))
        if self.kd_scale != 1.0:
            losses = {k: v * self.kd_scale for k, v in losses.items()}
        return losses

    def forward(self, batch):
        out, tap = self.run_student(batch)
        losses = {"ce": ce_loss(out["logits"], batch["segment"])}
        losses.update(self.terms(batch, out, tap))
        return losses, out


# ------------------------------------------------------------------------------------------ target sources
def frozen(model):
    """``model`` in eval mode with no parameter requiring a gradient."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class TeacherTargets:
    """IHD's targets for a batch's voxels: ``{"probs", "feat", "visible", "gain", "image_right", "shift"}`` from
    ``cache`` (a :class:`~haskd.distill.cache.CacheReader`; keys as stored), else ``{"logits", "feat", "visible"}``
    and the image rules in ``keys`` (None: all three) from the frozen ``teacher`` run on the batch (which then needs
    the batch's frames)."""

    def __init__(self, teacher=None, cache=None, heads=None, keys=None):
        if teacher is None and cache is None:
            raise ValueError("TeacherTargets needs a teacher or a cache")
        self.teacher, self.cache, self.heads = teacher, cache, heads  # heads: distill.teacher_head (cache: built in)
        self.keys = None if keys is None else frozenset(keys)  # online: the image rules the loss reads (None: all)

    @torch.no_grad()
    def __call__(self, batch) -> dict:
        if self.cache is not None:
            return self.cache.voxels(batch)
        out = self.teacher(batch)
        logits = out["logits"].float() if self.heads is None else head_logits(out["logits"], out["logits_3d"],
                                                                                self.heads)
        res = {"logits": logits, "feat": out["feat"].float(), "visible": out["visible"]}
        rules = {"gain": lambda: image_gain(out["logits"], out["logits_3d"], batch["segment"]),
                 "image_right": lambda: image_right(out["logits"], out["logits_3d"], batch["segment"]),
                 "shift": lambda: image_shift(out["logits"], out["logits_3d"])}
        res.update({k: rule() for k, rule in rules.items() if self.keys is None or k in self.keys})
        return res


class ExpertTargets:
    """ASD's targets: ``{"probs": (M, N, C), "final_pred": (N,)}`` from ``cache``, else ``{"logits": (M, N, C)}``
    from the frozen ``experts`` (snapshots in saving order: the last is the final one) run on the batch."""

    def __init__(self, experts=(), cache=None):
        if not experts and cache is None:
            raise ValueError("ExpertTargets needs experts or a cache")
        self.experts = nn.ModuleList(experts) if experts else None
        self.cache = cache

    @torch.no_grad()
    def __call__(self, batch) -> dict:
        if self.cache is not None:
            t = self.cache.voxels(batch)
            return {"probs": t["probs"], "final_pred": t["probs"][-1].argmax(-1)}
        return {"logits": torch.stack([m(batch)["logits"].float() for m in self.experts])}


class TeacherHints:
    """The hint term's targets: per level, the teacher's 3D-branch features at the student's voxels of that level.
    Online: ``backbone`` run on the very batch through a :class:`~haskd.distill.hints.HintTap` (both nets build the
    same voxel hierarchy, so rows match). Cached (``distill.hint_cache``): the branch's features of the unaugmented
    scene, averaged over the points of each student voxel (``level_coords``, ``strides``: the student's tap), or
    with ``distill.hint_cache_augs`` its features on the very augmented sample, found by voxel coords."""

    def __init__(self, backbone=None, cache=None):
        if backbone is None and cache is None:
            raise ValueError("TeacherHints needs the teacher's 3D branch or a cache")
        self.backbone, self.cache = backbone, cache

    @torch.no_grad()
    def __call__(self, batch, level_coords=None, strides=None) -> list:
        if self.cache is None:
            return run_with_hints(self.backbone, batch, "the teacher's 3D branch")[1].feats
        return self.cache.hints(batch, level_coords, strides)
