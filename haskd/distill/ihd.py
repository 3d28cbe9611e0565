"""IHD: information-oriented heterogeneous distillation (multi-modal teacher -> point-only student).

Our design (METHOD.md "IHD"; the paper's abstract gives only the idea). Per student voxel ``i``:

* logit term   ``w_i * tau^2 * KL(softmax(z_t,i / tau) || softmax(z_s,i / tau))``
* feature term ``w_i * || normalize(P(f_s,i)) - normalize(f_t,i) ||^2``, ``P`` a linear :class:`Projector`
  that lives in :class:`IHDLoss` (not in the student), so the saved inference model never carries it.
* information weights ``w_i = visible_i * trust_i`` (optionally ``* gain_i``, see :func:`image_gain`); both terms
  are normalised by ``sum(w)`` (by the batch's point count with ``distill.ihd_norm=points``, ours). The trust can
  also be what the images alone know (``trust="image"``: the fused head right where the teacher's 3D-branch head is
  wrong, :func:`image_right`; ``"image_soft"``: ``image_gain``; ``"image_shift"``: how far the images moved the
  teacher's answer, :func:`image_shift`, the one rule that needs no label).
* the target itself: the teacher's fused head (METHOD.md), its 3D-branch head, or per class the head that is better
  on val (``distill.teacher_head``, ours: :func:`head_logits`, :func:`classwise_heads`).

The teacher is frozen: every target here is detached, gradients reach only the student (and the projector).
Targets are teacher logits (online) or cached probabilities; the primitives (softened KL, weighted means, the
information weights) are in :mod:`haskd.distill.kd`, the per-level hints in :mod:`haskd.distill.hints`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .kd import (IHD_TRUST_MODES, IMAGE_TRUST_MODES, KD_TARGETS, TRUST_MODES, Projector, _check_choice,
                 class_balance, feature_loss, information_weights, kd_kl)

__all__ = ["IHDLoss", "TARGET_COUNTS", "cache_top1", "class_gates", "classwise_heads", "head_logits", "heads_tag",
           "image_gain", "image_right", "image_shift", "scene_class_gates", "target_counts",
           "IHD_TRUST_MODES", "IMAGE_TRUST_MODES", "TRUST_MODES"]

# distill.trust -> the teacher's per-point image rule it reads (computed where the 3D-branch logits are)
IMAGE_RULE_KEYS = {"image": "image_right", "image_soft": "gain", "image_shift": "shift"}


def image_gain(fused_logits: torch.Tensor, logits_3d: torch.Tensor, labels: torch.Tensor,
               ignore_index: int = -1) -> torch.Tensor:
    """What the images add to the teacher at a point: ``max(0, p_fused(y) - p_3d(y))`` at temperature 1, 0 for
    unlabeled points. ``(N, C), (N, C), (N,) -> (N,)`` float32, detached.

    Our addition to the information weights (``distill.image_gain``): the METHOD.md weights distil wherever the
    teacher saw the point and is right, including where its answer comes from geometry the student has too; this
    factor keeps the logit and feature terms on the points where the images made the teacher more sure of the truth.
    """
    labels = labels.to(fused_logits.device).long()
    lab = labels != ignore_index
    safe = torch.where(lab, labels, torch.zeros_like(labels))[:, None]
    p_f = torch.softmax(fused_logits.detach().float(), -1).gather(1, safe)[:, 0]
    p_3 = torch.softmax(logits_3d.detach().float(), -1).gather(1, safe)[:, 0]
    return torch.where(lab, (p_f - p_3).clamp_min(0), torch.zeros_like(p_f))


def image_right(fused_logits: torch.Tensor, logits_3d: torch.Tensor, labels: torch.Tensor,
                ignore_index: int = -1) -> torch.Tensor:
    """Where the images made the teacher right: 1 where the fused head's argmax is the label AND the teacher's own
    3D-branch head's argmax is not, else 0; 0 for unlabeled points. ``(N, C), (N, C), (N,) -> (N,)`` float32.

    Ours (``distill.trust=image``): the 3D branch is a point-only network trained inside the teacher, so where it is
    right the student can learn the point from its labels alone; where only the fused head is right, the images
    told the teacher something the points do not, which is what distillation can add."""
    labels = labels.to(fused_logits.device).long()
    right = fused_logits.detach().argmax(-1) == labels
    wrong_3d = logits_3d.detach().to(fused_logits.device).argmax(-1) != labels
    return (right & wrong_3d & (labels != ignore_index)).float()


TARGET_COUNTS = ("points", "seen", "kept", "kept_right", "top1_right", "kept_named")


def target_counts(cache: dict, labels, gate=0.0, tau: float = 1.0) -> np.ndarray:
    """What one scene's cached teacher targets hand a student, per class (ours, a diagnostic: ``haskd frames
    targets``). ``cache``: :func:`haskd.distill.cache.load_scene_cache` of a teacher (one target per point);
    ``labels`` (P,) int, -1 ignored. Returns (C, 6) int64 counts, columns :data:`TARGET_COUNTS`: the class's points,
    those seen in the teacher's frames (all of them when the cache has no ``visible``), those the unlabeled-point gate
    keeps (the target's top-1 probability at ``tau`` >= ``gate``, as ``distill.unlabeled_conf`` does; a (C,) ``gate``
    is per class, of the class the target names, as ``distill.unlabeled_keep``'s :func:`class_gates`), those kept
    whose target's top-1 is the class, those whose top-1 is the class whether kept or not, and the kept labelled
    points of any class whose target's top-1 is this class (kept_right / kept_named: how often a kept target that
    names the class is right)."""
    top1_p, top1 = cache_top1(cache, tau)
    y = np.asarray(labels).astype(np.int64)
    if y.shape != top1.shape:
        raise ValueError(f"{y.shape[0]} labels for {top1.shape[0]} cached points")
    c = int(cache["num_classes"])
    right = top1 == y
    seen = np.asarray(cache["visible"], dtype=bool) if "visible" in cache else np.ones_like(right)
    kept = top1_p >= (np.asarray(gate)[top1] if np.ndim(gate) else gate)
    ok = (y >= 0) & (y < c)
    cols = (np.ones_like(right), seen, kept, kept & right, right)
    by_label = [np.bincount(y[ok & m], minlength=c) for m in cols]
    named = np.bincount(top1[ok & kept], minlength=c)  # counted by the target's class, not the label
    return np.stack(by_label + [named], axis=1).astype(np.int64)


def cache_top1(cache: dict, tau: float = 1.0):
    """The top-1 probability at ``tau`` and class of each point's cached teacher target (``cache``: one scene of
    :func:`haskd.distill.cache.load_scene_cache`): ``(P,) float32, (P,) int64``. The stored logits are the point's
    top-k minus its max, so the probability is ``1 / sum(exp(z / tau))`` over the k kept (as the loss renormalises
    them)."""
    z = np.asarray(cache["topk_logits"], dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"one target per point expected, got top-k logits of shape {z.shape}")
    return 1.0 / np.exp(z / tau).sum(-1), np.asarray(cache["topk_index"])[:, 0].astype(np.int64)


def class_gates(top1_p, top1, num_classes: int, keep: float, cap: float) -> np.ndarray:
    """Per-class gates of the unlabeled points (``distill.unlabeled_keep``, ours): ``(P,), (P,) int, C -> (C,)``
    float32. ``top1_p`` / ``top1``: the top-1 probability and class of the teacher's targets on the training rooms'
    unlabeled points. Class ``k``'s gate is ``min(cap, q_k)``, ``q_k`` the ``1 - keep`` quantile (linear
    interpolation, numpy's default) of the top-1 probabilities of the targets that name ``k``: at least the share
    ``keep`` of them passes, and never fewer than the global gate ``cap`` (``distill.unlabeled_conf``) keeps. A class
    no target names keeps ``cap``.

    Why: one global gate keeps most of the classes the teacher is sure of and little of those it is less sure of,
    which are the ones the images explain (docs/iof.md: at 0.99 under half of picture's points on the 32 rooms,
    though its kept targets are 97% right). Class-wise thresholds by quantile are the class-balanced self-training
    of Zou et al. (ECCV 2018); here they only ever lower the global gate. Computed on the points, while the loss
    gates the voxel-averaged targets (the same quantity up to that mean)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    top1_p = np.asarray(top1_p, dtype=np.float64).reshape(-1)
    top1 = np.asarray(top1).astype(np.int64).reshape(-1)
    if top1_p.shape != top1.shape:
        raise ValueError(f"{top1_p.shape[0]} probabilities for {top1.shape[0]} classes")
    gates = np.full(num_classes, cap, dtype=np.float64)
    for k in np.unique(top1):
        gates[k] = min(cap, float(np.quantile(top1_p[top1 == k], 1.0 - keep)))
    return gates.astype(np.float32)


def scene_class_gates(scenes, num_classes: int, keep: float, cap: float, tau: float = 1.0) -> np.ndarray:
    """:func:`class_gates` of the points the gate decides in several scenes: ``scenes`` yields ``(cache, labels)``,
    ``cache`` one scene of :func:`haskd.distill.cache.load_scene_cache`, ``labels`` (P,) with -1 where unlabeled
    (None: every point unlabeled). The gated points are the unlabeled ones the teacher saw (all, without
    ``visible``); only their top-1 probability and class are kept in memory, scene by scene."""
    p, k = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)]
    for cache, labels in scenes:
        top1_p, top1 = cache_top1(cache, tau)
        use = np.ones(len(top1), dtype=bool) if labels is None else np.asarray(labels) < 0
        if "visible" in cache:
            use &= np.asarray(cache["visible"]) > 0
        p.append(top1_p[use])
        k.append(top1[use])
    return class_gates(np.concatenate(p), np.concatenate(k), num_classes, keep, cap)


def image_shift(fused_logits: torch.Tensor, logits_3d: torch.Tensor) -> torch.Tensor:
    """How far the images moved the teacher's answer at a point: the total-variation distance
    ``0.5 * sum_c |p_fused(c) - p_3d(c)|`` between its fused head and its own 3D-branch head at temperature 1, in
    [0, 1]; labels play no part. ``(N, C), (N, C) -> (N,)`` float32, detached.

    Ours (``distill.trust=image_shift``): :func:`image_right` and :func:`image_gain` need the label, so under
    limited annotation (``data.labeled_points``) they are 0 on almost every point, and the points they keep already
    have cross-entropy. This rule distils, on every point, as much as the images changed the teacher's
    distribution. With a frozen-baseline 3D branch (``teacher.freeze_3d``) the 3D head is the point-only baseline,
    so where the two heads agree the student would learn nothing from the teacher that training alone does not
    give it, and where they differ the images told the teacher something."""
    p_f = torch.softmax(fused_logits.detach().float(), -1)
    p_3 = torch.softmax(logits_3d.detach().float().to(p_f.device), -1)
    return 0.5 * (p_f - p_3).abs().sum(-1)


def head_logits(fused_logits: torch.Tensor, logits_3d: torch.Tensor, use_fused) -> torch.Tensor:
    """The IHD target of ``distill.teacher_head`` (ours): class ``k``'s log-probability from the teacher's fused head
    where ``use_fused[k]``, else from its 3D-branch head, ``(N, C), (N, C), (C,) bool -> (N, C)`` float32 log-probs
    (unnormalised across the two heads; any softmax renormalises them). ``use_fused`` all true gives the fused head's
    distribution, all false the 3D branch's."""
    use = torch.as_tensor(use_fused, dtype=torch.bool, device=fused_logits.device)
    return torch.where(use, torch.log_softmax(fused_logits.detach().float(), -1),
                       torch.log_softmax(logits_3d.detach().float().to(fused_logits.device), -1))


def heads_tag(use_fused) -> str:
    """A per-class head choice as text, one letter a class (``f`` fused, ``3`` the 3D branch): it names the cache
    folder of those targets and stamps its content."""
    return "".join("f" if h else "3" for h in use_fused)


def classwise_heads(fused_iou, iou_3d) -> list:
    """Per class, whether the teacher's fused head is its expert (``distill.teacher_head=classwise``, ours): its val
    IoU is at least the 3D-branch head's, or either is unknown (a class absent from val keeps the fused head).

    Why: a multi-modal teacher can be worse than its own 3D branch on some classes (the images mislead it, or it
    overfits them with few labels); taking those classes from the branch keeps the images' knowledge where they
    add some and passes on no error they introduced. The choice is made on val, as ASD picks its experts."""
    if len(fused_iou) != len(iou_3d):
        raise ValueError(f"per-class IoU of {len(fused_iou)} and {len(iou_3d)} classes")
    return [not (f is not None and t is not None and f == f and t == t and t > f) for f, t in zip(fused_iou, iou_3d)]


class IHDLoss(nn.Module):
    """IHD loss module.

    forward(student_out, teacher, labels):
      student_out: ``{"logits": (N, C), "feat": (N, D_s)}`` (``feat`` needed only for the feature term).
      teacher: ``{"logits": (N, C)}`` or ``{"probs": (N, C)}`` (see :func:`kd_kl`), optional
      ``"feat": (N, D_t) or None``, optional ``"visible": (N,)`` (None/absent = all visible), ``"gain": (N,)``
      (needed with ``image_gain`` and ``trust="image_soft"``), ``"image_right": (N,)`` (needed with
      ``trust="image"``), ``"shift": (N,)`` (needed with ``trust="image_shift"``).
      labels: (N,) int64, ``ignore_index`` = unlabeled.
    Returns ``{"ihd_logit": logit_weight * L_logit, "ihd_feat": feat_weight * L_feat}``; ``ihd_feat`` is absent
    when the teacher gives no features or ``feat_weight == 0``; ``ihd_logit`` is absent when ``logit_weight == 0``.
    """

    def __init__(self, student_dim: int, teacher_dim: int, tau: float = 2.0, logit_weight: float = 1.0,
                 feat_weight: float = 1.0, trust: str = "hard", ignore_index: int = -1, image_gain: bool = False,
                 kd_target: str = "full", class_balance: bool = False, norm: str = "weights",
                 unlabeled_conf=0.0):
        super().__init__()
        # distill.unlabeled_conf: gate of the unlabeled points; a (C,) sequence: one a class (class_gates)
        self.unlabeled_conf = (float(unlabeled_conf) if np.ndim(unlabeled_conf) == 0 else
                               torch.as_tensor(np.asarray(unlabeled_conf, dtype=np.float32)))
        self.norm = norm  # distill.ihd_norm: what both terms are divided by (kd.weighted_mean)
        self.class_balance = bool(class_balance)
        _check_choice("kd_target", kd_target, KD_TARGETS)
        self.kd_target = kd_target
        self.image_gain = bool(image_gain)
        _check_choice("trust", trust, IHD_TRUST_MODES)
        self.tau = float(tau)
        self.logit_weight = float(logit_weight)
        self.feat_weight = float(feat_weight)
        self.trust = trust
        self.ignore_index = ignore_index
        # Built even when feat_weight == 0 so that state dicts keep one shape across ablations.
        self.projector = Projector(student_dim, teacher_dim)
        if self.feat_weight == 0:  # unused: frozen, so the optimiser skips it and DDP expects no gradient for it
            self.projector.requires_grad_(False)

    @property
    def target_keys(self) -> set:
        """The teacher's per-point targets this loss reads besides its logits / probabilities."""
        keys = {"visible"}
        if self.feat_weight != 0:
            keys.add("feat")
        if self.image_gain:
            keys.add("gain")
        if self.trust in IMAGE_RULE_KEYS:
            keys.add(IMAGE_RULE_KEYS[self.trust])
        return keys

    def forward(self, student_out: dict, teacher: dict, labels: torch.Tensor,
                logit_mask: Optional[torch.Tensor] = None) -> dict:
        """``logit_mask`` (N,): the points whose logit target is the teacher's (1) or another expert's (0, see
        :func:`haskd.distill.asd.teacher_route`); None = every point. The feature term always uses every point."""
        if "logits" in teacher and teacher["logits"] is not None:
            t, kind = teacher["logits"], "logits"
        elif "probs" in teacher and teacher["probs"] is not None:
            t, kind = teacher["probs"], "probs"
        else:
            raise ValueError("teacher dict needs 'logits' or 'probs'")
        image = None
        if self.trust in IMAGE_TRUST_MODES:  # the per-point rule, computed where the 3D-branch logits were
            key = IMAGE_RULE_KEYS[self.trust]
            image = teacher.get(key)
            if image is None:
                raise ValueError(f"distill.trust={self.trust} needs the teacher's {key!r} (its 3D-branch head)")
        w = information_weights(t, labels, teacher.get("visible"), trust=self.trust,
                                ignore_index=self.ignore_index, target_kind=kind, image=image,
                                unlabeled_conf=self.unlabeled_conf)
        if self.image_gain:
            if teacher.get("gain") is None:
                raise ValueError("distill.image_gain needs the teacher's 'gain' (its 3D-branch logits)")
            w = w * teacher["gain"].detach().to(w.device).float().reshape(-1)
        if self.class_balance:  # a point's class: its label, the teacher's argmax where unlabeled
            lab = labels.to(t.device).long()
            w = w * class_balance(torch.where(lab == self.ignore_index, t.detach().argmax(-1), lab), t.shape[1])
        out = {}
        if self.logit_weight != 0:
            out["ihd_logit"] = self.logit_weight * kd_kl(student_out["logits"], t, self.tau, w, target_kind=kind,
                                                         labels=labels, kd_target=self.kd_target,
                                                         ignore_index=self.ignore_index, mask=logit_mask,
                                                         norm=self.norm)
        t_feat = teacher.get("feat")
        if t_feat is not None and self.feat_weight != 0:
            proj = self.projector(student_out["feat"])
            out["ihd_feat"] = self.feat_weight * feature_loss(proj, t_feat.to(proj.device), w, self.norm)
        return out
