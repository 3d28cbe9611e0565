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


def ce_loss(logits, target):
    if (target >= 0).any():
        return F.cross_entropy(logits.float(), target, ignore_index=-1)
    return logits.sum() * 0.0


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
