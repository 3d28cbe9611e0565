"""KD primitives shared by IHD, ASD and the hints: target distributions, the softened KL (full or non-target),
weighted means over points, the per-point trust weights, class balance, and the normalised feature term.

Targets come either as logits (tempered by ``tau``) or as probabilities that are *already the target distribution*
(e.g. cached probabilities at temperature ``tau`` averaged onto augmented voxels, see :mod:`haskd.distill.cache`);
probabilities are used as given, only renormalised to sum to 1. Every target here is detached: gradients reach only
the student (and the training-only projectors).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CHOICES

TRUST_MODES = CHOICES["distill.asd_trust"]
IHD_TRUST_MODES = CHOICES["distill.trust"]
# distill.trust only (ASD's experts have no 3D branch): distil where the images, not the points, made the teacher
# right or moved its answer (:func:`haskd.distill.ihd.image_right`, :func:`haskd.distill.ihd.image_gain`,
# :func:`haskd.distill.ihd.image_shift`)
IMAGE_TRUST_MODES = tuple(m for m in IHD_TRUST_MODES if m not in TRUST_MODES)
TARGET_KINDS = ("logits", "probs")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def target_distribution(target: torch.Tensor, tau: float, target_kind: str = "logits") -> torch.Tensor:
    """Detached target distribution ``(..., C)``.

    ``target_kind="logits"``: ``softmax(target / tau)`` (``-inf`` entries get probability 0).
    ``target_kind="probs"``: ``target`` is the target distribution already; it is only renormalised
    (a top-k truncated distribution stays truncated).
    """
    _check_choice("target_kind", target_kind, TARGET_KINDS)
    target = target.detach().float()
    if target_kind == "logits":
        return torch.softmax(target / tau, dim=-1)
    p = target.clamp_min(0)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-12)


def kl_per_point(student_logits: torch.Tensor, target_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 * KL(p_t || softmax(z_s / tau))`` per row: ``(N, C), (N, C) -> (N,)``.

    ``xlogy`` makes classes with ``p_t = 0`` (e.g. outside a top-k) contribute exactly 0, never NaN.
    """
    log_ps = torch.log_softmax(student_logits.float() / tau, dim=-1)
    kl = (torch.xlogy(target_probs, target_probs) - target_probs * log_ps).sum(-1)
    return kl * (tau * tau)


KD_TARGETS = CHOICES["distill.kd_target"]


def kl_per_point_nontarget(student_logits: torch.Tensor, target_probs: torch.Tensor, labels: torch.Tensor,
                           tau: float, ignore_index: int = -1) -> torch.Tensor:
    """``tau^2 * KL`` over the classes other than each point's label, both sides renormalised there (the non-target
    term of decoupled KD, Zhao et al. 2022): ``(N, C), (N, C), (N,) -> (N,)``.

    Ours, ``distill.kd_target=nontarget`` (METHOD.md distils the full distribution: ``full``). The label's own
    probability is left to CE alone, so a teacher (or expert) less sure of the label than the student never pulls
    the student's confidence down; what is distilled is how the remaining mass spreads over the other classes.
    Unlabeled points (``ignore_index``) keep the full KL. A target with all its mass on the label gives 0.
    """
    z = student_logits.float() / tau
    labels = labels.to(z.device).long()
    lab = labels != ignore_index
    safe = torch.where(lab, labels, torch.zeros_like(labels))
    mask = torch.zeros_like(z, dtype=torch.bool).scatter_(1, safe[:, None], True) & lab[:, None]
    log_ps = torch.log_softmax(z.masked_fill(mask, float("-inf")), dim=-1)
    p = target_probs.float().masked_fill(mask, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    cross = torch.where(p > 0, p * log_ps, torch.zeros_like(p))  # 0 * -inf at the masked label -> 0, not NaN
    return (torch.xlogy(p, p) - cross).sum(-1) * (tau * tau)


def weighted_mean(values: torch.Tensor, weights: Optional[torch.Tensor],
                  mask: Optional[torch.Tensor] = None, norm: str = "weights") -> torch.Tensor:
    """``sum(w * m * v) / sum(w)`` over points; plain mean when ``weights`` is None; 0 (still in the graph)
    when there is no point or ``sum(w) == 0``. Values at zero-weight points are masked, so a NaN/inf
    there cannot leak into the result. ``mask`` (N,) in [0, 1], None = all ones, drops points from the sum
    but not from the normaliser: two terms with complementary masks add up to one term over every point
    (the class routing of :mod:`haskd.distill.asd`). ``norm="points"`` (``distill.ihd_norm``, ours): divide by the
    number of points instead of ``sum(w)``."""
    _check_choice("norm", norm, CHOICES["distill.ihd_norm"])
    if weights is None and mask is None:  # the same sum and normaliser as with weights of 1, without their passes
        return values.sum() / values.new_tensor(float(max(values.numel(), 1)))
    if weights is None:
        weights = torch.ones_like(values)
    weights = weights.detach().to(values.dtype)
    total = weights.sum()
    if mask is not None:
        weights = weights * mask.detach().to(device=values.device, dtype=values.dtype).reshape(-1)
    zero = torch.zeros_like(values)
    values = torch.where(weights > 0, values, zero)
    # torch.where on the denominator (not a clamp) keeps the gradient finite when total == 0.
    if norm == "points":
        total = torch.full_like(total, float(values.numel()))
    denom = torch.where(total > 0, total, torch.ones_like(total))
    return (weights * values).sum() / denom


def information_weights(teacher_logits: torch.Tensor, labels: torch.Tensor, visible: Optional[torch.Tensor] = None,
                        trust: str = "hard", ignore_index: int = -1, target_kind: str = "logits",
                        image: Optional[torch.Tensor] = None, unlabeled_conf=0.0) -> torch.Tensor:
    """Information-oriented weights ``w = visible * trust``: ``(N, C), (N,), (N,) -> (N,) float32``.

    ``trust="hard"``: 1 where the teacher's argmax equals the label or the point is unlabeled
    (``label == ignore_index``), else 0. ``"soft"``: the teacher's probability of the true class
    (1 for unlabeled points), from ``softmax(logits)`` at temperature 1, or from the given probabilities when
    ``target_kind="probs"``. ``"none"``: 1. ``visible`` (bool or float, None = all visible) is the fraction
    of the point the teacher saw in images (0/1 per point, a fraction after averaging onto voxels).
    ``"image"`` / ``"image_soft"`` / ``"image_shift"`` (ours, distil only what the images know): the trust is
    ``image`` (N,), the per-point rule computed from the teacher's fused and 3D-branch heads
    (:func:`haskd.distill.ihd.image_right` for ``"image"``, :func:`haskd.distill.ihd.image_gain` for
    ``"image_soft"``, both 0 on unlabeled points; :func:`haskd.distill.ihd.image_shift` for ``"image_shift"``, on
    every point), given by the caller because the 3D branch's logits are not in ``teacher_logits``.
    ``unlabeled_conf`` > 0 (ours, ``distill.unlabeled_conf``): an unlabeled point keeps its weight only where the
    target's top probability (as for ``"soft"``: logits at temperature 1, probabilities as given) is at least this,
    else 0; labeled points are not gated (their trust rule sees the label). ``unlabeled_conf`` may also be a (C,)
    tensor of per-class gates (``distill.unlabeled_keep``, :func:`haskd.distill.ihd.class_gates`): a point's gate is
    the one of the class its target ranks first.
    """
    _check_choice("trust", trust, IHD_TRUST_MODES)
    _check_choice("target_kind", target_kind, TARGET_KINDS)
    t = teacher_logits.detach().float()
    n = t.shape[0]
    labels = labels.to(t.device).long()
    if labels.shape != (n,):
        raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
    unlabeled = labels == ignore_index
    safe = torch.where(unlabeled, torch.zeros_like(labels), labels)
    if trust in IMAGE_TRUST_MODES:
        if image is None:
            raise ValueError(f"trust={trust!r} needs the per-point image rule (the teacher's 3D-branch head)")
        tr = image.detach().to(t.device).float().reshape(-1)
        if tr.shape != (n,):
            raise ValueError(f"image must be ({n},), got {tuple(tr.shape)}")
    elif trust == "none":
        tr = torch.ones(n, device=t.device)
    elif trust == "hard":
        tr = ((t.argmax(-1) == labels) | unlabeled).float()
    else:
        probs = target_distribution(t, 1.0, target_kind)
        tr = torch.where(unlabeled, torch.ones(n, device=t.device), probs.gather(1, safe[:, None])[:, 0])
    if torch.is_tensor(unlabeled_conf) or unlabeled_conf > 0:
        top = target_distribution(t, 1.0, target_kind).max(-1)
        gate = unlabeled_conf.to(t.device)[top.indices] if torch.is_tensor(unlabeled_conf) else unlabeled_conf
        tr = tr * ((top.values >= gate) | ~unlabeled).float()
    if visible is None:
        return tr
    visible = visible.detach().to(t.device).float().reshape(-1)
    if visible.shape != (n,):
        raise ValueError(f"visible must be ({n},), got {tuple(visible.shape)}")
    return visible * tr


def class_balance(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-point weights that give every class of the batch the same share of a weighted mean: ``N / (K * n_c)``
    for a point of class ``c``, ``n_c`` the points of that class among the ``N`` given, ``K`` the classes present;
    their mean is 1. ``classes`` (N,) int64 in ``[0, num_classes)`` -> (N,) float32.

    Ours (``distill.class_balance``): mIoU averages classes, while a plain mean over points spends the logit
    terms on the walls and floors the student already learns from its labels; with these weights the rare
    classes, where the teacher's extra knowledge is, get as much of them as the common ones.
    """
    classes = classes.long()
    if classes.numel() == 0:
        return torch.ones(0, device=classes.device)
    counts = torch.bincount(classes, minlength=num_classes).float()
    return (classes.numel() / ((counts > 0).sum() * counts))[classes]


def kd_kl(student_logits: torch.Tensor, target: torch.Tensor, tau: float = 2.0,
          weights: Optional[torch.Tensor] = None, target_kind: str = "logits", labels: Optional[torch.Tensor] = None,
          kd_target: str = "full", ignore_index: int = -1, mask: Optional[torch.Tensor] = None,
          norm: str = "weights") -> torch.Tensor:
    """Weighted KD loss: ``sum_i w_i * tau^2 * KL(p_t,i || p_s,i) / sum_i w_i`` (scalar).

    student_logits: (N, C). target: (N, C) teacher logits (``target_kind="logits"``, tempered by ``tau``)
    or the target distribution itself (``"probs"``, possibly top-k truncated; renormalised, not tempered).
    weights: (N,) or None (plain mean). Returns 0 (no NaN) when ``sum(w) == 0`` or N == 0. ``mask``: see
    :func:`weighted_mean` (points routed to another source keep their share of the normaliser), and ``norm``.
    """
    if student_logits.shape != target.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and target {tuple(target.shape)} differ")
    _check_choice("kd_target", kd_target, KD_TARGETS)
    p_t = target_distribution(target, tau, target_kind)
    if kd_target == "nontarget":
        if labels is None:
            raise ValueError("kd_target='nontarget' needs the labels")
        return weighted_mean(kl_per_point_nontarget(student_logits, p_t, labels, tau, ignore_index), weights, mask,
                             norm)
    return weighted_mean(kl_per_point(student_logits, p_t, tau), weights, mask, norm)


def feature_loss(student_feat_projected: torch.Tensor, teacher_feat: torch.Tensor,
                 weights: Optional[torch.Tensor] = None, norm: str = "weights") -> torch.Tensor:
    """``|| normalize(a_i) - normalize(b_i) ||^2`` (in [0, 4]) weighted over points: ``(N, D), (N, D) -> ()``.

    Normalising both sides makes the term scale-free, so teacher and student features of different
    magnitudes (different networks) can be compared; the teacher side is detached.
    """
    if student_feat_projected.shape != teacher_feat.shape:
        raise ValueError(f"projected student feat {tuple(student_feat_projected.shape)} and teacher feat "
                         f"{tuple(teacher_feat.shape)} differ")
    a = F.normalize(student_feat_projected.float(), dim=-1)
    b = F.normalize(teacher_feat.detach().float(), dim=-1)
    return weighted_mean(((a - b) ** 2).sum(-1), weights, norm=norm)


class Projector(nn.Module):
    """Linear map ``(N, D_s) -> (N, D_t)`` from student to teacher feature space, used only in training.

    It belongs to the loss, not to the student, so checkpoints of the student never contain it.
    """

    def __init__(self, student_dim: int, teacher_dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim, bias=bias)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.linear(feat)
