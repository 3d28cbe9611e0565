"""A :class:`~haskd.distill.task.DistillTask` from a config: the one place distillation reads files.

:func:`build_distill_task` loads the teacher checkpoint (and checks it is one), gives the training set the teacher's
frames (online teacher) or builds the caches (``distill.cache``: soft labels, and the hint cache with
``distill.hint_cache``), reads the experts JSON and loads its snapshots, and picks the losses from the config:
IHD with ``distill.teacher_ckpt``, the hints with ``distill.hint_weight > 0``, ASD with ``distill.experts``. It is
also the entry point for another training loop (``examples/library_distill.py``): it needs only the student, the
config, the device and the training set.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..classes import class_names
from ..engine.checkpoint import load_model
from ..errors import HaskdError
from .asd import ASDLoss, iou_array, teacher_classes
from .cache import (CacheReader, ViewHintReader, build_cache, build_expert_cache, build_hint_cache,
                    build_view_hint_cache, cache_dir_for, load_scene_cache)
from .hints import HintLoss, hint_dims
from .ihd import IHDLoss, heads_tag, scene_class_gates
from .task import DistillTask, ExpertTargets, TeacherHints, TeacherTargets, frozen


def build_distill_task(student, cfg, device, train_set, teacher_heads=None) -> DistillTask:
    """The distilled student's task of ``cfg`` (``cfg.distill`` names the teacher and/or the experts table).

    ``train_set``: the :class:`haskd.data.dataset.SceneDataset` the student trains on; its scenes are the ones
    cached, and an online teacher's frames are attached to it (``train_set.frames``). ``teacher_heads``: per class,
    whether IHD's target is the teacher's fused head (else its 3D-branch head; ``distill.teacher_head``, resolved by
    the caller from the teacher's val metrics); None = the fused head everywhere."""
    d = cfg.distill
    losses, targets, routed = {}, {}, None
    if d.teacher_ckpt:
        teacher, tcfg = load_model(d.teacher_ckpt, device=device, return_config=True)
        if tcfg.role != "teacher":
            raise HaskdError(f"{d.teacher_ckpt}: distill.teacher_ckpt must be a teacher checkpoint")
        frozen(teacher)
        losses["ihd"] = IHDLoss(student.feat_dim, teacher.feat_dim, tau=d.tau, logit_weight=d.logit_weight,
                                feat_weight=d.feat_weight, trust=d.trust, image_gain=d.image_gain,
                                kd_target=d.kd_target, class_balance=d.class_balance, norm=d.ihd_norm,
                                unlabeled_conf=d.unlabeled_conf)
        from ..images.provider import FrameProvider

        if d.hint_weight > 0:
            try:
                losses["hint"] = HintLoss(hint_dims(student, "the student"),
                                          hint_dims(teacher.backbone, "the teacher's 3D branch"), d.hint_weight)
            except ValueError as e:  # a 3D branch of another depth: no level-to-level match
                raise HaskdError(f"{d.teacher_ckpt}: distill.hint_weight: {e}") from None
            if not (d.cache and d.hint_cache) and type(student) is not type(teacher.backbone):
                raise HaskdError(f"{d.teacher_ckpt}: distill.hint_weight: online hints pair the student's voxels with "
                                 f"the teacher's 3D branch's row by row, which needs one network family (student "
                                 f"{type(student).__name__}, 3D branch {type(teacher.backbone).__name__}); "
                                 "the cached hints (distill.hint_cache=true) match them by position")
        frames = FrameProvider.for_run(tcfg, Path(d.teacher_ckpt).parent)
        hint_cache = None
        if d.cache:
            view = train_set.with_frames(frames)
            # its own folder per content: with the features (distill.feat_weight), with the image rules of sparse
            # labels (data.labeled_points), so that no run reads a cache that lacks what it needs
            kind = "teacher" + "_feat" * (d.feat_weight > 0) + (f"_labels{cfg.data.labeled_points}"
                                                                 if cfg.data.labeled_points else "")
            if teacher_heads is not None:  # distill.teacher_head
                kind += "_head" + heads_tag(teacher_heads)
            teacher_cache = build_cache(teacher, view, tcfg, device, cache_dir_for(d.teacher_ckpt, cfg, kind),
                                        feat=d.feat_weight > 0, extra=_frames_of(view), topk=d.cache_topk,
                                        sources=[d.teacher_ckpt], heads=teacher_heads)
            targets["teacher"] = TeacherTargets(cache=CacheReader(teacher_cache, cfg.data.num_classes, d.tau,
                                                                  keys=losses["ihd"].target_keys))
            if d.unlabeled_keep > 0:  # per-class gates from the targets on the unlabeled training points
                gates = scene_class_gates(((load_scene_cache(teacher_cache, sc.name), sc.segment)
                                           for sc in train_set.scenes), cfg.data.num_classes, d.unlabeled_keep,
                                          d.unlabeled_conf, d.tau)
                losses["ihd"].unlabeled_conf = torch.from_numpy(gates)
                low = ", ".join(f"{n} {g:.3f}" for n, g in zip(class_names(cfg.data.dataset), gates)
                                if g < d.unlabeled_conf)
                logging.getLogger(__name__).info("distill.unlabeled_keep=%g: gates below %g: %s", d.unlabeled_keep,
                                                 d.unlabeled_conf, low or "none")
            if "hint" in losses and d.hint_cache and d.hint_cache_augs:  # the student's own augmented batches
                train_set.views = d.hint_cache_augs  # epoch e draws view e mod K: the views the cache holds
                kind = f"teacher_hints_{d.hint_cache_augs}aug{'_half' * d.hint_cache_augs_half}_seed{train_set.seed}"
                hint_cache = build_view_hint_cache(teacher.backbone, train_set, device,
                                                   cache_dir_for(d.teacher_ckpt, cfg, kind), d.hint_cache_augs,
                                                   sources=[d.teacher_ckpt], half=d.hint_cache_augs_half)
            elif "hint" in losses and d.hint_cache:  # own folders: switching the options rebuilds nothing
                if d.hint_cache_views < 1:
                    raise HaskdError(f"distill.hint_cache_views must be at least 1, got {d.hint_cache_views}")
                kind = "teacher_hints" + (f"_{d.hint_cache_views}rot" if d.hint_cache_views > 1 else "")
                hint_cache = build_hint_cache(teacher.backbone, train_set, cfg, device,
                                              cache_dir_for(d.teacher_ckpt, cfg, kind), sources=[d.teacher_ckpt],
                                              views=d.hint_cache_views)
        else:  # the online teacher sees each training sample's frames
            if d.unlabeled_keep > 0:
                raise HaskdError("distill.unlabeled_keep needs distill.cache=true (its gates come from the cached "
                                 "targets on the training rooms)")
            train_set.frames = frames.load(train_set.scenes)
            targets["teacher"] = TeacherTargets(teacher=teacher, heads=teacher_heads, keys=losses["ihd"].target_keys)
        if "hint" in losses:
            if hint_cache is None:
                targets["hints"] = TeacherHints(backbone=teacher.backbone)
            else:
                targets["hints"] = TeacherHints(cache=ViewHintReader(hint_cache) if d.hint_cache_augs else
                                                CacheReader(hint_cache, cfg.data.num_classes, d.tau))
    if d.experts:
        table = json.loads(Path(d.experts).read_text())
        snap_paths = [_resolve(p, d.experts) for p in table["snapshots"]]
        experts = [frozen(load_model(p, device=device)) for p in snap_paths]
        sel = {"indices": np.array(table["indices"])[:, : d.asd_topk],
               "weights": np.array(table["weights"])[:, : d.asd_topk]}
        sel["weights"] = sel["weights"] / np.maximum(sel["weights"].sum(1, keepdims=True), 1e-12)
        if d.teacher_expert and d.teacher_ckpt:  # ASD alone (no teacher): the pool is the snapshots
            routed = _teacher_classes(table, d)
        losses["asd"] = ASDLoss(sel, tau=d.tau, weight=d.asd_weight, unlabeled=d.asd_unlabeled, trust=d.asd_trust,
                                kd_target=d.kd_target, class_balance=d.class_balance, unlabeled_conf=d.unlabeled_conf)
        if d.cache:
            expert_cache = build_expert_cache(experts, train_set, cfg, device, cache_dir_for(d.experts, cfg, "experts"),
                                              topk=d.cache_topk, sources=[d.experts, *snap_paths])
            targets["experts"] = ExpertTargets(cache=CacheReader(expert_cache, cfg.data.num_classes, d.tau))
        else:
            targets["experts"] = ExpertTargets(experts)
    if d.hint_weight > 0 and "hint" not in losses:
        raise HaskdError("distill.hint_weight needs distill.teacher_ckpt (the hints come from its 3D branch)")
    return DistillTask(student, losses, targets, teacher_classes=routed)


def _teacher_classes(table: dict, d):
    """The teacher's classes (:func:`haskd.distill.asd.teacher_classes`) from an experts JSON that holds the
    teacher's row."""
    if table.get("teacher_iou") is None:
        raise HaskdError(f"{d.experts}: distill.teacher_expert needs the teacher's per-class IoU in the expert table "
                         "(rebuild it: haskd experts --run RUN --teacher TEACHER_RUN)")
    return teacher_classes(iou_array(table["iou"]), iou_array(table["teacher_iou"]))


def _resolve(p, relative_to):
    p = Path(p)
    return p if p.is_absolute() or p.exists() else Path(relative_to).parent / p


def _frames_of(view):
    """``extra(sample, i)`` giving a whole-scene sample of scene ``i`` the frames ``view`` holds for it."""
    def add(sample, i):
        sample["frames"] = view.frames_of(i)
        return sample

    return add
