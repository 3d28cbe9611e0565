"""Where the student's distillation targets come from, one small class per source, each ``__call__(batch, ...)``:

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

from .hints import run_with_hints
from .ihd import image_gain, image_right


def frozen(model):
    """``model`` in eval mode with no parameter requiring a gradient."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class TeacherTargets:
    """IHD's targets for a batch's voxels: ``{"probs", "feat", "visible", "gain", "image_right"}`` from ``cache`` (a
    :class:`~haskd.distill.cache.CacheReader`; keys as stored), else ``{"logits", "feat", "visible", "gain",
    "image_right"}`` from the frozen ``teacher`` run on the batch (which then needs the batch's frames)."""

    def __init__(self, teacher=None, cache=None):
        if teacher is None and cache is None:
            raise ValueError("TeacherTargets needs a teacher or a cache")
        self.teacher, self.cache = teacher, cache

    @torch.no_grad()
    def __call__(self, batch) -> dict:
        if self.cache is not None:
            return self.cache.voxels(batch)
        out = self.teacher(batch)
        return {"logits": out["logits"].float(), "feat": out["feat"].float(), "visible": out["visible"],
                "gain": image_gain(out["logits"], out["logits_3d"], batch["segment"]),
                "image_right": image_right(out["logits"], out["logits_3d"], batch["segment"])}


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
    scene, averaged over the points of each student voxel (``level_coords``, ``strides``: the student's tap)."""

    def __init__(self, backbone=None, cache=None):
        if backbone is None and cache is None:
            raise ValueError("TeacherHints needs the teacher's 3D branch or a cache")
        self.backbone, self.cache = backbone, cache

    @torch.no_grad()
    def __call__(self, batch, level_coords=None, strides=None) -> list:
        if self.cache is None:
            return run_with_hints(self.backbone, batch, "the teacher's 3D branch")[1].feats
        return self.cache.hints(batch, level_coords, strides)
