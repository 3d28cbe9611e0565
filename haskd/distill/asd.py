"""ASD: adept snapshot distillation -- training snapshots as class-wise experts.

Our design (METHOD.md "ASD"; the paper's abstract gives only the idea):

1. :func:`snapshot_epochs` says after which epochs a stage-1 run saves its M snapshots (free: checkpoints).
2. Each snapshot is evaluated on the validation split: per-class IoU matrix ``A (M, C)``, NaN where a class
   is absent. :func:`select_experts` picks ``expert(c) = argmax_m A[m, c]`` (ties -> later snapshot), or the
   top-k snapshots per class with weights proportional to their IoU.
3. :func:`asd_loss`: a labeled point of class ``y`` is distilled from the expert(s) of ``y`` only,
   ``tau^2 * KL(softmax(z_expert(y) / tau) || softmax(z_s / tau))``, averaged over the points used. A snapshot
   never supervises points of a class it is not the expert of. Unlabeled points use the expert of the class
   that the final snapshot predicts (``unlabeled="final"``) or are skipped (``"skip"``).

Snapshots are indexed in saving order: index ``M - 1`` is the final (latest) snapshot.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..config import CHOICES
from ..errors import HaskdError, require
from .kd import (KD_TARGETS, TARGET_KINDS, TRUST_MODES, _check_choice, class_balance, information_weights,
                  kl_per_point, kl_per_point_nontarget, weighted_mean)

SCHEDULES = CHOICES["train.snapshot_schedule"]
UNLABELED_MODES = CHOICES["distill.asd_unlabeled"]


# ----------------------------------------------------------------------------------------------- snapshots
def snapshot_epochs(total_epochs: int, num_snapshots: int = 5, schedule: str = "second_half",
                    cycles: Union[None, int, Sequence[int]] = None) -> list:
    """Sorted 1-based epochs after which a snapshot is saved; the last one is always ``total_epochs``.

    ``schedule="second_half"``: ``num_snapshots`` epochs evenly spaced over ``(total // 2, total]``
    (100 epochs, 5 snapshots -> 60, 70, 80, 90, 100). ``"whole_run"`` (ours): evenly spaced over ``(0, total]``
    (240 epochs, 3 snapshots -> 80, 160, 240), the snapshots of one cosine run at the cycle ends a 3-cycle schedule
    would have. When the span has fewer distinct epochs than snapshots, the last ``min(num_snapshots, total)``
    epochs are used instead.
    ``schedule="cycles"``: the end of each cosine cycle. ``cycles`` is the number of equal cycles (default
    ``num_snapshots``) or a list of cycle lengths in epochs summing to ``total_epochs``; when there are more
    cycles than snapshots, the last ``num_snapshots`` cycle ends are kept.
    """
    if schedule not in SCHEDULES:
        raise HaskdError(f"snapshot schedule must be one of {SCHEDULES}, got {schedule!r}")
    total, m = int(total_epochs), int(num_snapshots)
    if total < 1 or m < 1:
        raise HaskdError(f"need total_epochs >= 1 and num_snapshots >= 1, got {total_epochs}, {num_snapshots}")
    if schedule in ("second_half", "whole_run"):
        start = total // 2 if schedule == "second_half" else 0
        length = total - start
        # Integer ceil keeps the spacing exact (no float rounding) and makes the last one == total.
        epochs = sorted({start + (k * length + m - 1) // m for k in range(1, m + 1)})
        if len(epochs) < m:
            epochs = list(range(max(1, total - m + 1), total + 1))
        return epochs
    if cycles is None:
        cycles = m
    if isinstance(cycles, (int, np.integer)):
        n = int(cycles)
        if n < 1 or n > total:
            raise HaskdError(f"cycles must be in [1, {total}], got {n}")
        ends = [int(round(k * total / n)) for k in range(1, n + 1)]
    else:
        lengths = [int(c) for c in cycles]
        if not lengths or min(lengths) < 1 or sum(lengths) != total:
            raise HaskdError(f"cycle lengths {lengths} must be >= 1 and sum to total_epochs={total}")
        ends = list(np.cumsum(lengths).tolist())
    return sorted(set(ends))[-m:]


# ----------------------------------------------------------------------------------------------- experts
def iou_array(values) -> np.ndarray:
    """IoU values as stored in JSON (None = class absent) -> float64 array with NaN there, any shape."""
    return np.array(values, dtype=object).astype(np.float64) if values is not None else None


def select_experts(iou, topk: int = 1) -> dict:
    """Choose the expert snapshot(s) of every class from the IoU matrix.

    iou: (M, C) array, NaN where a class is absent from a snapshot's evaluation.
    Returns ``{"expert": (C,) int64, "indices": (C, k) int64, "weights": (C, k) float32}``, ``k = min(topk, M)``:
    ``indices[c]`` are the snapshots ranked by IoU on class ``c`` (ties -> later snapshot first; NaN ranks
    lowest), ``expert = indices[:, 0]``, ``weights[c] = iou[indices[c], c] / sum`` (NaN counts as 0).
    A column without evidence (all NaN, or all top-k IoUs 0) goes to its best-ranked snapshot with weight 1:
    for an all-NaN column that is the last (final) snapshot.
    """
    a = np.asarray(iou, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1:
        raise HaskdError(f"IoU matrix must be (snapshots, classes) with >= 1 snapshot, got shape {a.shape}")
    m, c = a.shape
    k = max(1, min(int(topk), m))
    key = np.where(np.isnan(a), -np.inf, a)
    # Rank by (IoU, snapshot index) descending: sort the row-reversed matrix stably, map back.
    rev = key[::-1]
    order_rev = np.argsort(-rev, axis=0, kind="stable")  # stable: among equal IoU, reversed order = later first
    indices = (m - 1 - order_rev)[:k].T.copy()          # (C, k)
    vals = np.take_along_axis(np.nan_to_num(a, nan=0.0).T, indices, axis=1)  # (C, k)
    vals = np.clip(vals, 0.0, None)
    sums = vals.sum(1, keepdims=True)
    weights = np.where(sums > 0, vals / np.where(sums > 0, sums, 1.0), 0.0)
    weights[sums[:, 0] <= 0, 0] = 1.0
    return {"expert": indices[:, 0].astype(np.int64), "indices": indices.astype(np.int64),
            "weights": weights.astype(np.float32)}


def _table_tensors(expert_table, device):
    """(indices (C, k) long, weights (C, k) float) from a select_experts dict or a plain (C,) expert array."""
    if isinstance(expert_table, dict):
        idx = torch.as_tensor(np.asarray(expert_table["indices"]) if not torch.is_tensor(expert_table["indices"])
                              else expert_table["indices"])
        w = expert_table["weights"]
        w = torch.as_tensor(np.asarray(w)) if not torch.is_tensor(w) else w
    else:
        e = expert_table if torch.is_tensor(expert_table) else torch.as_tensor(np.asarray(expert_table))
        idx = e.reshape(-1, 1)
        w = torch.ones(idx.shape, dtype=torch.float32)
    return idx.to(device=device, dtype=torch.long), w.to(device=device, dtype=torch.float32)


def asd_loss(student_logits: torch.Tensor, expert_logits: torch.Tensor, labels: torch.Tensor, expert_table,
             tau: float = 2.0, unlabeled: str = "final", final_pred: Optional[torch.Tensor] = None,
             target_kind: str = "logits", ignore_index: int = -1, trust: str = "none",
             kd_target: str = "full", point_mask: Optional[torch.Tensor] = None,
             balance: bool = False, unlabeled_conf: float = 0.0) -> torch.Tensor:
    """Adept snapshot distillation loss (scalar).

    student_logits: (N, C). expert_logits: (M, N, C) logits of the M snapshots on the same voxels
    (``target_kind="logits"``, tempered by ``tau``) or their target distributions (``"probs"``, used as given,
    renormalised). labels: (N,) int64, ``ignore_index`` = unlabeled. expert_table: :func:`select_experts`
    dict (``indices``/``weights``) or a (C,) array of expert indices.
    The target of a point assigned class ``y`` is ``sum_j weights[y, j] * p(indices[y, j])`` (a mixture of the
    top-k experts' tempered distributions). Unlabeled points are assigned ``final_pred`` (N,) if given, else
    the argmax of the final snapshot ``expert_logits[-1]`` (``unlabeled="final"``), or dropped (``"skip"``).
    Returns ``mean over used points of tau^2 * KL(target || softmax(z_s / tau))``; 0 when no point is used.
    ``trust`` (ours, not METHOD.md; ``distill.asd_trust``): ``"none"`` (METHOD.md) weighs every used point 1;
    ``"hard"`` keeps a labeled point only where its target's argmax is the label, ``"soft"`` weighs it by the
    target's probability of the label (the IHD trust, applied to the experts); unlabeled points keep weight 1;
    the mean is then weighted, ``sum(w * kl) / sum(w)``. ``kd_target="nontarget"`` (ours) distils only the
    non-label classes of labeled points (:func:`haskd.distill.kd.kl_per_point_nontarget`). ``point_mask`` (N,): 0 for
    points whose class the teacher supervises instead (:func:`teacher_route`); they leave the sum, not the
    normaliser (:func:`haskd.distill.kd.weighted_mean`). ``balance`` (ours, ``distill.class_balance``): each point
    also weighs :func:`haskd.distill.kd.class_balance` of its assigned class, so every class has the same share.
    ``unlabeled_conf`` > 0 (ours, ``distill.unlabeled_conf``, the gate IHD has): an unlabeled point stays only where
    its target (the experts' mixture, as distilled) has a top probability of at least this; it leaves the sum and
    the normaliser, as a point of weight 0 does.
    Targets are detached: the experts are frozen and never receive gradients.
    """
    _check_choice("unlabeled", unlabeled, UNLABELED_MODES)
    _check_choice("target_kind", target_kind, TARGET_KINDS)
    _check_choice("trust", trust, TRUST_MODES)
    _check_choice("kd_target", kd_target, KD_TARGETS)
    if expert_logits.dim() != 3 or expert_logits.shape[1:] != student_logits.shape:
        raise ValueError(f"expert_logits must be (M, {', '.join(map(str, student_logits.shape))}), "
                         f"got {tuple(expert_logits.shape)}")
    device = student_logits.device
    ex = expert_logits.detach().to(device).float()
    m, n, c = ex.shape
    labels = labels.to(device).long()
    idx, w = _table_tensors(expert_table, device)
    if idx.shape[0] != c:
        raise ValueError(f"expert table covers {idx.shape[0]} classes, logits have {c}")
    if int(idx.min()) < 0 or int(idx.max()) >= m:
        raise ValueError(f"expert table refers to snapshot {int(idx.max())}, only {m} given")

    cls = labels.clone()
    unl = labels == ignore_index
    if unlabeled == "final" and bool(unl.any()):
        fp = final_pred.to(device).long() if final_pred is not None else ex[-1].argmax(-1)
        cls = torch.where(unl, fp, cls)
        used = torch.ones(n, dtype=torch.bool, device=device)
    else:
        used = ~unl
    if not bool(used.any()):
        return student_logits.sum() * 0.0
    cls, rows = cls[used], torch.nonzero(used, as_tuple=True)[0]

    # Mixture of the class's experts; only the expert rows of each point are ever read, so a snapshot that is
    # not an expert of class y cannot influence points of class y.
    target = torch.zeros(rows.numel(), c, device=device)
    for j in range(idx.shape[1]):  # k is tiny (1-3); points and classes are vectorised
        e = idx[cls, j]
        z = ex[e, rows]  # (n_used, C)
        if target_kind == "logits":
            p = torch.softmax(z / tau, dim=-1)
        else:
            p = z.clamp_min(0)
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
        target = target + w[cls, j, None] * p
    if kd_target == "nontarget":
        kl = kl_per_point_nontarget(student_logits[rows], target, labels[rows], tau, ignore_index)
    else:
        kl = kl_per_point(student_logits[rows], target, tau)
    mask = None if point_mask is None else point_mask.to(device).reshape(-1)[rows]
    # the IHD trust weights, with the expert target in the teacher's place (unlabeled points keep weight 1)
    wts = None if trust == "none" else information_weights(target, labels[rows], trust=trust,
                                                           ignore_index=ignore_index, target_kind="probs")
    if balance:  # over the used points' assigned classes, as the IHD term does over its own
        b = class_balance(cls, c)
        wts = b if wts is None else wts * b
    if unlabeled_conf > 0:
        sure = ((target.max(-1).values >= unlabeled_conf) | ~unl[rows]).float()
        wts = sure if wts is None else wts * sure
    if wts is None and mask is None:
        return kl.mean()
    return weighted_mean(kl, wts, mask)


# ----------------------------------------------------------------------------------------------- ensemble
class SnapshotEnsemble(nn.Module):
    """The M snapshots as one model: ``forward(batch) -> {"logits": log(mean_m softmax(z_m))}`` (N, C).

    A softmax of these logits is the mean of the members' probabilities, so :func:`haskd.engine.evaluate.evaluate`
    scores the ensemble with the metric code of every single model. It is what ASD's snapshots give at M times the
    inference cost (the yardstick for "diverse experts": an ensemble that is not above the final snapshot has
    nothing class-wise to hand over)."""

    def __init__(self, members):
        super().__init__()
        if not members:
            raise HaskdError("an ensemble needs at least one snapshot")
        self.members = nn.ModuleList(members)

    def forward(self, batch) -> dict:
        p = torch.stack([torch.softmax(m(batch)["logits"].float(), -1) for m in self.members]).mean(0)
        return {"logits": torch.log(p.clamp_min(1e-30))}


# ----------------------------------------------------------------------------------------------- teacher route
def teacher_classes(snapshot_iou, teacher_iou) -> np.ndarray:
    """(C,) bool: the classes whose logit target stays the teacher's when the teacher joins the expert pool
    (``distill.teacher_expert``, ours, not METHOD.md).

    snapshot_iou: (M, C), teacher_iou: (C,), both val IoU with NaN for an absent class. A class goes to the
    teacher when its IoU is at least the best snapshot's (ties -> teacher, the IHD default), or when no
    snapshot scores it; to its snapshot expert when the snapshot is strictly better, or when only snapshots
    score it.
    """
    a = np.asarray(snapshot_iou, dtype=np.float64)
    t = np.asarray(teacher_iou, dtype=np.float64).reshape(-1)
    if a.ndim != 2 or t.shape[0] != a.shape[1]:
        raise HaskdError(f"teacher IoU covers {t.shape[0]} classes, the snapshot matrix {tuple(a.shape)}")
    best = np.where(np.isnan(a), -np.inf, a).max(0)
    return np.where(np.isnan(t), ~np.isfinite(best), t >= best)


def teacher_route(classes: torch.Tensor, labels: torch.Tensor, final_pred: Optional[torch.Tensor] = None,
                  unlabeled: str = "final", ignore_index: int = -1) -> torch.Tensor:
    """(N,) float mask: 1 where a point's class is a teacher class (:func:`teacher_classes`), 0 where a snapshot
    expert supervises it. A point's class is its label; an unlabeled point takes ``final_pred`` (the final
    snapshot's prediction) with ``unlabeled="final"`` and stays with the teacher with ``"skip"`` (ASD skips it).
    The IHD logit term takes this mask and ASD its complement, so each point has one logit source."""
    classes = classes.to(labels.device).bool()
    labels = labels.long()
    unl = labels == ignore_index
    cls = labels
    if unlabeled == "final" and final_pred is not None:
        cls = torch.where(unl, final_pred.to(labels.device).long(), labels)
    safe = cls.clamp(0, classes.numel() - 1)
    keep = classes[safe] | (cls == ignore_index)
    return keep.float()


class ASDLoss(nn.Module):
    """ASD loss module: ``forward(student_out, experts, labels, final_pred=None) -> {"asd": weight * L_asd}``.

    student_out: ``{"logits": (N, C), ...}`` or the logits tensor. experts: (M, N, C) logits, or a dict with
    ``"logits"`` or ``"probs"`` (M, N, C) and optionally ``"final_pred"`` (N,). The expert table is stored as
    buffers (``indices``, ``weights``) so it travels with the loss's state dict.
    """

    def __init__(self, expert_table, tau: float = 2.0, weight: float = 1.0, unlabeled: str = "final",
                 ignore_index: int = -1, trust: str = "none", kd_target: str = "full", class_balance: bool = False,
                 unlabeled_conf: float = 0.0):
        super().__init__()
        self.unlabeled_conf = float(unlabeled_conf)
        self.class_balance = bool(class_balance)
        _check_choice("kd_target", kd_target, KD_TARGETS)
        self.kd_target = kd_target
        _check_choice("unlabeled", unlabeled, UNLABELED_MODES)
        _check_choice("trust", trust, TRUST_MODES)
        self.trust = trust
        idx, w = _table_tensors(expert_table, "cpu")
        self.register_buffer("indices", idx)
        self.register_buffer("weights", w)
        self.tau = float(tau)
        self.weight = float(weight)
        self.unlabeled = unlabeled
        self.ignore_index = ignore_index

    def forward(self, student_out, experts, labels: torch.Tensor, final_pred: Optional[torch.Tensor] = None,
                point_mask: Optional[torch.Tensor] = None) -> dict:
        logits = student_out["logits"] if isinstance(student_out, dict) else student_out
        kind = "logits"
        if isinstance(experts, dict):
            final_pred = experts.get("final_pred", final_pred)
            if experts.get("logits") is not None:
                experts = experts["logits"]
            else:
                experts, kind = experts["probs"], "probs"
        loss = asd_loss(logits, experts, labels, {"indices": self.indices, "weights": self.weights},
                        tau=self.tau, unlabeled=self.unlabeled, final_pred=final_pred, target_kind=kind,
                        ignore_index=self.ignore_index, trust=self.trust, kd_target=self.kd_target,
                        point_mask=point_mask, balance=self.class_balance, unlabeled_conf=self.unlabeled_conf)
        return {"asd": self.weight * loss}


# ----------------------------------------------------------------------------------------------- report
def expert_heatmap_png(iou, class_names: Sequence[str], expert, path, teacher_iou=None) -> Path:
    """Heatmap of the IoU matrix (snapshots x classes) with each class's expert boxed; written to ``path``.

    iou: (M, C) with NaN for absent classes (drawn grey). expert: (C,) snapshot index per class.
    teacher_iou: (C,) or None; when given it is drawn as a last row "teacher", and the classes the teacher keeps
    in the pool (:func:`teacher_classes`) have their box on that row.
    """
    matplotlib = require("matplotlib", "matplotlib")
    # Figure without pyplot: no global backend switch, works headless on training machines.
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    a = np.asarray(iou, dtype=np.float64)
    expert = np.asarray(expert).reshape(-1)
    m, c = a.shape
    if len(class_names) != c or expert.shape[0] != c:
        raise ValueError(f"{c} classes in the IoU matrix, {len(class_names)} names, {expert.shape[0]} experts")
    labels = [f"snapshot {i}" for i in range(m)]
    if teacher_iou is not None:
        t = np.asarray(teacher_iou, dtype=np.float64).reshape(1, -1)
        expert = np.where(teacher_classes(a, t[0]), m, expert)
        a, m = np.concatenate([a, t]), m + 1
        labels.append("teacher")
    fig = Figure(figsize=(max(6.0, 0.45 * c + 2), max(2.5, 0.5 * m + 1.5)))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # NaN = class absent
    a = 100 * a  # read in percent
    vmax = float(np.nanmax(a)) if np.isfinite(a).any() else 100.0
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=0.0, vmax=max(vmax, 1e-4), aspect="auto")
    for j in range(c):
        # a class absent from every row was chosen by default, not on evidence: dashed grey box
        absent = not np.isfinite(a[:, j]).any()
        ax.add_patch(Rectangle((j - 0.5, expert[j] - 0.5), 1, 1, fill=False, edgecolor="0.2" if absent else "red",
                               linewidth=1.2 if absent else 2, linestyle="--" if absent else "-"))
        if m * c <= 400:  # numbers only while they stay readable
            for i in range(m):
                if math.isfinite(a[i, j]):
                    ax.text(j, i, f"{a[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="black" if a[i, j] > 0.6 * vmax else "white")  # readable on yellow
    ax.set_xticks(range(c))
    ax.set_xticklabels(class_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(m))
    ax.set_yticklabels(labels, fontsize=7)
    who = "snapshot and the teacher" if teacher_iou is not None else "snapshot"
    ax.set_title(f"val IoU (%) per class of each {who}; red box = the class's expert, grey = class absent",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, label="IoU (%)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
