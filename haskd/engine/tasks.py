"""Tasks turn (model, batch) into a dict of named losses. The trainer sums them and never knows which exist.

DDP wraps a task, i.e. only trainable parts (student, training-only projector). Frozen helpers (teacher, experts,
caches) are held outside the module tree so they are neither wrapped, nor saved, nor updated.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SegmentationTask(nn.Module):
    """Plain cross-entropy on voxel labels (-1 ignored). The baseline."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        out = self.model(batch)
        return {"ce": ce_loss(out["logits"], batch["segment"])}, out


class TeacherTask(nn.Module):
    """The multi-modal teacher's losses: CE on its fused logits + ``loss_3d`` x CE on the 3D branch + ``loss_2d`` x
    CE of the image branch's lifted logits at the voxels some frame sees (3D labels carried into the images: it
    teaches the image branch directly what the textures mean)."""

    def __init__(self, model: nn.Module, loss_3d: float = 0.0, loss_2d: float = 0.0):
        super().__init__()
        self.model = model
        self.w3d = loss_3d
        self.w2d = loss_2d

    def forward(self, batch):
        out = self.model(batch)
        y = batch["segment"]
        losses = {"ce_fused": ce_loss(out["logits"], y)}
        if self.w3d > 0:
            losses["ce_3d"] = self.w3d * ce_loss(out["logits_3d"], y)
        if self.w2d > 0 and "logits_2d" in out:
            seen = out["visible"] > 0
            losses["ce_2d"] = self.w2d * ce_loss(out["logits_2d"][seen], y[seen])
        return losses, out


def ce_loss(logits, target):
    if (target >= 0).any():
        return F.cross_entropy(logits.float(), target, ignore_index=-1)
    return logits.sum() * 0.0


def lovasz_softmax(logits, target, ignore_index=-1):
    """Lovasz-softmax loss (Berman et al. 2018), over the whole batch, averaged over the classes present in
    ``target``: the convex surrogate of 1 - IoU that Pointcept's PTv3 recipes add to cross-entropy. For one-hot
    probabilities it equals the mean over present classes of 1 - IoU. ``logits`` (N, C), ``target`` (N,)."""
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    p = torch.softmax(logits[valid].float(), 1)
    y = target[valid]
    terms = []
    for c in torch.unique(y):
        fg = (y == c).float()
        err, order = torch.sort((fg - p[:, c]).abs(), descending=True)
        fg = fg[order]
        inter = fg.sum() - fg.cumsum(0)
        union = fg.sum() + (1 - fg).cumsum(0)
        jac = 1 - inter / union
        grad = torch.cat([jac[:1], jac[1:] - jac[:-1]])
        terms.append(torch.dot(err, grad))
    return torch.stack(terms).mean()


class WithLovasz(nn.Module):
    """A student task plus ``weight`` x :func:`lovasz_softmax` on its logits (``train.lovasz_weight``): the
    inner task's losses are unchanged, one more named loss is added."""

    def __init__(self, task: nn.Module, weight: float):
        super().__init__()
        self.task, self.weight = task, weight

    def forward(self, batch):
        losses, out = self.task(batch)
        losses["lovasz"] = self.weight * lovasz_softmax(out["logits"], batch["segment"])
        return losses, out


def move_to(batch: dict, device) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v.to(device, non_blocking=True)
        elif k == "frames":
            out[k] = [{n: (t.to(device) if torch.is_tensor(t) else t) for n, t in f.items()} if f else f for f in v]
        else:
            out[k] = v
    return out
