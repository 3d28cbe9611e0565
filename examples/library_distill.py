"""HAS-KD's distillation in a training loop of your own: your model, your DataLoader, your optimizer, no haskd trainer.

haskd builds the losses and their targets (:func:`haskd.distill.setup.build_distill_task`: it loads the teacher, builds
the soft-label caches beside its checkpoint once, and picks the terms from ``cfg.distill``); the loop below runs the
student, computes its own cross-entropy and adds haskd's terms (:meth:`DistillTask.terms`: ``ihd_logit``,
``ihd_feat``, ``ihd_hint``, ``asd``)::

    python examples/library_distill.py --data data/syn48 --teacher runs/teacher/last.pt --steps 100

The student is any module returning ``{"logits": (N, C), "feat": (N, D)}`` with a ``feat_dim`` (the hint term also
needs ``hint_levels()``, see docs/backbones.md); here haskd's SpUNet of the teacher's size. The batches are haskd's
(:class:`haskd.data.dataset.SceneDataset` + :func:`haskd.data.transforms.collate`): the cached targets need each
batch's ``scene``, ``inverse`` and ``point_offset``, besides ``grid_coord``, ``feat``, ``offset``, ``segment``.

In a Pointcept-style trainer the terms are one more entry of the segmentor's criteria; it needs the batch (and, for
the hints, the tap around the backbone), so the segmentor passes them (a sketch, no Pointcept import)::

    criteria = [dict(type="CrossEntropyLoss", loss_weight=1.0, ignore_index=-1),
                dict(type="HaskdDistillCriterion", loss_weight=1.0)]   # registered: the class below

    # in the segmentor's forward, training branch:
    with HintTap(self.backbone) as tap:            # only when the task has a hint loss
        feat = self.backbone(input_dict)["feat"]
    seg_logits = self.seg_head(feat)
    loss = self.criteria(seg_logits, input_dict["segment"])
    loss = loss + self.kd(seg_logits, input_dict["segment"], input_dict, feat=feat, tap=tap)

:class:`HaskdDistillCriterion` holds the task; its parameters (the training-only projectors) go to the optimizer too.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as haskd's CLI does

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from haskd.config import from_dict, point_only
from haskd.data.dataset import SceneDataset, in_channels
from haskd.data.transforms import collate
from haskd.distill.hints import HintTap
from haskd.distill.setup import build_distill_task
from haskd.engine.checkpoint import load_checkpoint
from haskd.engine.tasks import move_to
from haskd.models import build_model


class HaskdDistillCriterion(nn.Module):
    """The distillation terms as one criterion: ``forward(pred, target, batch, feat=None, tap=None)`` -> the
    weighted sum of the task's terms for the student's logits ``pred`` (and ``feat``) on ``batch``. ``target`` is
    unused (the labels are ``batch["segment"]``); it keeps the criteria's call shape."""

    def __init__(self, task, loss_weight: float = 1.0):
        super().__init__()
        self.__dict__["task"] = task  # not a submodule: the student is yours (your optimizer, your checkpoint)
        self.loss_weight, self.last = loss_weight, {}
        self.kd = nn.ModuleDict(task.losses)  # the training-only projectors: trained with the student, never saved

    def forward(self, pred, target, batch, feat=None, tap=None):
        self.last = self.task.terms(batch, {"logits": pred, "feat": feat}, tap)
        return self.loss_weight * sum(self.last.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="data root holding train/<scene>/ folders")
    ap.add_argument("--teacher", required=True, help="teacher checkpoint (haskd train role=teacher)")
    ap.add_argument("--experts", default="", help="expert table (haskd experts) for ASD, optional")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--hint-weight", type=float, default=1.0, help="0: no per-level hints")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    torch.manual_seed(0)

    # what to distil, as a haskd config: the teacher's data settings, a student's role
    cfg = point_only(from_dict(load_checkpoint(a.teacher)["config"]))
    cfg.data.root = a.data
    cfg.distill.teacher_ckpt = a.teacher
    cfg.distill.experts = a.experts
    cfg.distill.hint_weight = a.hint_weight
    cfg.distill.cache = True

    # your data, model and optimizer
    d = cfg.data
    train_set = SceneDataset(d.root, d.train_split, d.num_classes, d.voxel_size, train=True, use_normal=d.use_normal,
                             max_voxels=d.max_voxels)
    loader = DataLoader(train_set, batch_size=a.batch_size, shuffle=True, collate_fn=collate, drop_last=False)
    model = build_model(cfg.model.name, in_channels(d.use_normal), d.num_classes, preset=cfg.model.preset).to(a.device)

    # haskd's losses and their (cached) targets
    kd = HaskdDistillCriterion(build_distill_task(model, cfg, a.device, train_set)).to(a.device)
    params = [p for p in itertools.chain(model.parameters(), kd.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)

    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for step in range(a.steps):
        batch = move_to(next(batches), a.device)
        with HintTap(model) if kd.task.hint is not None else contextlib.nullcontext() as tap:  # per-level features
            out = model(batch)
        ce = F.cross_entropy(out["logits"], batch["segment"], ignore_index=-1)
        loss = ce + kd(out["logits"], batch["segment"], batch, feat=out["feat"], tap=tap)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row = {"step": step, "loss": loss.item(), "ce": ce.item(), **{k: v.item() for k, v in kd.last.items()}}
        if not all(math.isfinite(v) for v in row.values()):
            raise SystemExit(f"non-finite loss at step {step}: {row}")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
