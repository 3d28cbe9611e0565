"""Per-level hints (ours, ``distill.hint_weight``; not in METHOD.md): the student's features at every level of its
voxel hierarchy aligned to the teacher's 3D branch at the same level.

A backbone names its levels with ``hint_levels()``: a list of ``(module, stride, dim)``, coarse to fine, ``module``
a submodule whose output is that level's features, ``stride`` the level's voxel size in input voxels (its voxel
coords are the input coords ``// stride``), ``dim`` the feature width. :class:`HintTap` captures them with forward
hooks while the backbone runs, so the network needs no flag and no extra outputs; the hooks are removed when the
``with`` block ends. :class:`haskd.models.spunet.SpUNet` and :class:`haskd.models.ptv3.PointTransformerV3` name
their levels; a module's output is a :class:`haskd.sparse.SparseTensor` (SpUNet) or a ``(N, D)`` tensor whose
call received the level's state (an argument with ``coords``, PTv3's blocks).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import HaskdError
from .kd import Projector, feature_loss


def hint_levels(model, who: str = "the model") -> list:
    """``model.hint_levels()``; a one-line error for a network that names none."""
    levels = getattr(model, "hint_levels", None)
    if levels is None:
        raise HaskdError(f"distill.hint_weight: {who} ({type(model).__name__}) gives no per-level features; hints "
                         "work with the networks that name their levels (spunet, ptv3; set distill.hint_weight=0)")
    return list(levels())


def hint_dims(model, who: str = "the model") -> tuple:
    """The feature width of each hint level of ``model``, coarse to fine."""
    return tuple(int(d) for _, _, d in hint_levels(model, who))


class HintTap:
    """Captures a backbone's per-level features while it runs: ``with HintTap(net) as tap: out = net(batch)``, then
    ``tap.feats`` (one ``(N_l, D_l)`` per level, coarse to fine), ``tap.coords`` (their ``(N_l, 4)`` ``[batch, x,
    y, z]`` voxel coords) and ``tap.strides``. The forward hooks are removed on leaving the block (also on an error).
    A level module called more than once in a forward keeps its last call."""

    def __init__(self, model: nn.Module, who: str = "the model"):
        self.levels = hint_levels(model, who)
        self.strides = tuple(int(s) for _, s, _ in self.levels)
        self.feats, self.coords, self._handles = [], [], []

    def _hook(self, i):
        def capture(module, args, output):
            if hasattr(output, "feats"):
                self.feats[i], self.coords[i] = output.feats, output.coords
            else:
                self.feats[i] = output
                self.coords[i] = next(a.coords for a in args if hasattr(a, "coords"))
        return capture

    def __enter__(self) -> "HintTap":
        n = len(self.levels)
        self.feats, self.coords = [None] * n, [None] * n
        self._handles = [m.register_forward_hook(self._hook(i)) for i, (m, _, _) in enumerate(self.levels)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False


def run_with_hints(model, batch, who: str = "the model"):
    """``(model(batch), tap)``: the forward pass with ``model``'s per-level features captured."""
    with HintTap(model, who) as tap:
        out = model(batch)
    return out, tap


class HintLoss(nn.Module):
    """Per-level feature hints from the teacher's 3D branch (ours, ``distill.hint_weight``; not in METHOD.md).

    The IHD feature term aligns only the last feature (to the teacher's fused feature). When the student is the same
    network family as the teacher's 3D branch, both nets build the same sparse voxel hierarchy from the same batch,
    so their features at every level (deepest encoder level and each decoder level) match row for row. This term
    aligns them all, FitNets-style: ``mean_l || normalize(P_l(s_l)) - normalize(t_l) ||^2``, one training-only
    linear projector ``P_l`` per level (identity-initialised when the widths agree), plain mean over voxels (the
    3D branch's representation is what it transfers, not the images' knowledge, so no information weights).

    forward(student_hints, teacher_hints): two lists of ``(N_l, D_l)``; returns ``{"ihd_hint": weight * L}``.
    """

    def __init__(self, student_dims, teacher_dims, weight: float = 1.0):
        super().__init__()
        student_dims, teacher_dims = tuple(student_dims), tuple(teacher_dims)
        if len(student_dims) != len(teacher_dims):
            raise ValueError(f"hint levels differ: student {student_dims}, teacher {teacher_dims}")
        self.weight = float(weight)
        self.projectors = nn.ModuleList(Projector(s, t) for s, t in zip(student_dims, teacher_dims))
        for p, s, t in zip(self.projectors, student_dims, teacher_dims):
            if s == t:
                with torch.no_grad():
                    p.linear.weight.copy_(torch.eye(s))
                    p.linear.bias.zero_()

    def forward(self, student_hints, teacher_hints) -> dict:
        if len(student_hints) != len(self.projectors) or len(teacher_hints) != len(self.projectors):
            raise ValueError(f"expected {len(self.projectors)} hint levels, got {len(student_hints)} (student) "
                             f"and {len(teacher_hints)} (teacher)")
        terms = []
        for proj, s, t in zip(self.projectors, student_hints, teacher_hints):
            if s.shape[0] != t.shape[0]:
                raise ValueError(f"hint level rows differ: student {s.shape[0]}, teacher {t.shape[0]} (the two "
                                 "nets must build the same voxel hierarchy: same family, same batch)")
            terms.append(feature_loss(proj(s), t))
        return {"ihd_hint": self.weight * torch.stack(terms).mean()}
