"""Finished runs read back: learning curves, training time, metrics of a run's checkpoint (or of its snapshots'
ensemble) on any split of any data root, each cached beside the run while its checkpoints are unchanged."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from ..data.dataset import SceneDataset
from ..distill.asd import SnapshotEnsemble
from ..distill.ihd import classwise_heads
from ..engine.checkpoint import load_checkpoint, load_model
from ..engine.evaluate import evaluate
from ..errors import HaskdError, InputError
from ..io import write_text

log = logging.getLogger(__name__)


def find_snapshots(run_dir) -> list:
    snaps = sorted((Path(run_dir) / "snapshots").glob("epoch_*.pt"))
    if not snaps:
        raise HaskdError(f"{Path(run_dir) / 'snapshots'}: no snapshots (train with train.snapshots=M)")
    return snaps


def read_curve(run_dir, metric: str = "val/miou") -> tuple:
    """``(epochs, values)`` of ``metric`` from ``run_dir/metrics.jsonl``, sorted by epoch; a repeated epoch (a
    resumed run) keeps its last line; lines without the metric are skipped; a torn last line (a run writing right
    now) is ignored. Raises :class:`InputError` when the file is missing or holds no value of the metric."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise InputError(path, "no metrics.jsonl here (is this a run folder?)")
    lines = path.read_text().splitlines()
    by_epoch = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # being written
                continue
            raise InputError(path, f"line {i + 1} is not JSON") from None
        v = row.get(metric)
        if v is None or "epoch" not in row or not math.isfinite(float(v)):
            continue
        by_epoch[int(row["epoch"])] = float(v)
    if not by_epoch:
        keys = sorted({k for line in lines[:1] for k in json.loads(line)}) if lines else []
        raise InputError(path, f"no value of {metric!r}" + (f" (keys: {', '.join(keys)})" if keys else ""))
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


def train_seconds(run_dir) -> float:
    """Seconds a run spent in its training loops: the sum of ``epoch_time_s`` over its epochs in ``metrics.jsonl``
    (validation, cache building and start-up excluded; a resumed epoch counts once, its last record)."""
    return float(sum(read_curve(run_dir, "epoch_time_s")[1]))


def _root_tag(root, own_root) -> str:
    """``_<folder name>`` for rooms read from a root other than the run's own (so that another folder's "test" never
    overwrites the cached metrics of the run's own test rooms), else ``""``."""
    root = Path(root).resolve()
    return "" if root == Path(own_root).resolve() else f"_{root.name}"


def split_metrics(run_dir: Path, split=None, root=None, device="cpu", frame_policy=None, branch_3d=False,
                  ckpt_name="last.pt") -> dict:
    """Metrics of a run's ``last.pt`` (or ``ckpt_name``) on ``split`` (default: its config's val split) of ``root``
    (default: the run's data root), every point.

    A teacher sees the frames ``frame_policy`` picks (default: its config's); ``branch_3d`` evaluates its 3D
    branch alone, points only. Cached as ``run_dir/metrics_<split>[_3d|_<policy>][_<ckpt>][_<root>].json`` while
    newer than the checkpoint (``_<root>``: the folder name of a ``root`` other than the run's own data root)."""
    from .build import build_datasets

    run_dir, ckpt = Path(run_dir), Path(run_dir) / ckpt_name
    model, cfg = load_model(ckpt, device=device, return_config=True)
    split = split or cfg.data.val_split
    own_root = cfg.data.root
    cfg.data.root, cfg.data.val_split = str(root or cfg.data.root), split
    tag = ("_3d" if branch_3d else (f"_{frame_policy}" if frame_policy else "")) \
        + ("" if ckpt_name == "last.pt" else f"_{ckpt.stem}") + _root_tag(cfg.data.root, own_root)
    path = run_dir / f"metrics_{split}{tag}.json"
    where = str(Path(cfg.data.root).resolve())
    if path.is_file() and path.stat().st_mtime_ns >= ckpt.stat().st_mtime_ns:
        cached = json.loads(path.read_text())
        if cached.get("data_root") == where:  # the same split name of another root is other rooms
            return cached
    if branch_3d:
        model, cfg.role = model.backbone, "student"  # points only: no frames are loaded
    if cfg.role == "teacher":
        cfg.teacher.frame_policy = frame_policy or cfg.teacher.frame_policy
        cfg.teacher.train_frames = "selected"
    ds = build_datasets(cfg, splits=("val",))["val"]
    metrics = evaluate(model, ds, device, cfg.data.dataset)
    metrics["split"], metrics["data_root"] = split, where
    write_text(path, json.dumps(metrics, indent=1))  # atomic: DDP ranks may evaluate one teacher at once
    return metrics


def eval_teacher_3d(run_dir: Path, device="cpu", ckpt_name="last.pt") -> dict:
    """Val metrics of a teacher's 3D branch alone (no image): a point-only network of the student's family, trained
    inside the teacher (:func:`split_metrics` on the teacher's val split, cached beside its checkpoint)."""
    return split_metrics(run_dir, None, device=device, branch_3d=True, ckpt_name=ckpt_name)


def teacher_heads(cfg, device="cpu"):
    """``distill.teacher_head`` of a distilled student's ``cfg`` as a per-class list (True: the teacher's fused head
    is the IHD target of that class, False: its 3D-branch head), None for ``fused``. ``classwise`` compares both
    heads' per-class IoU on the teacher's val split (:func:`haskd.distill.ihd.classwise_heads`; the two
    evaluations are cached beside the teacher's checkpoint) and logs which classes take the 3D branch."""
    d = cfg.distill
    if d.teacher_head == "fused" or not d.teacher_ckpt:
        return None
    if d.teacher_head == "3d":
        return [False] * cfg.data.num_classes
    run, name = Path(d.teacher_ckpt).parent, Path(d.teacher_ckpt).name
    fused = split_metrics(run, device=device, ckpt_name=name)["per_class_iou"]
    branch = eval_teacher_3d(run, device=device, ckpt_name=name)["per_class_iou"]
    heads = classwise_heads(list(fused.values()), list(branch.values()))
    names = [c for c, h in zip(fused, heads) if not h]
    log.info("distill.teacher_head=classwise: the 3D branch's head for %s (val IoU above the "
             "fused head's), the fused head for the other %d classes", ", ".join(names) or "no class",
             len(heads) - len(names))
    return heads


def evaluate_ensemble(snapshots, data_root=None, split="val", device="cpu", progress=False) -> dict:
    """Metrics of the mean softmax of ``snapshots`` (checkpoint paths of point-only models) on every point of
    ``split`` (:class:`haskd.distill.asd.SnapshotEnsemble` through :func:`evaluate`: the same metric code as ``haskd eval``).
    ``data_root`` defaults to the snapshots' own. The result also lists the ``members``."""
    models, cfg = [], None
    for p in snapshots:
        m, cfg = load_model(p, device=device, return_config=True)
        if cfg.role == "teacher":
            raise HaskdError(f"{p}: a teacher checkpoint; the ensemble is of point-only snapshots")
        models.append(m)
    if cfg is None:
        raise HaskdError("no snapshots to ensemble")
    ds = SceneDataset(data_root or cfg.data.root, split, cfg.data.num_classes, cfg.data.voxel_size,
                      use_normal=cfg.data.use_normal)
    with torch.inference_mode():
        out = evaluate(SnapshotEnsemble(models).to(device), ds, device, cfg.data.dataset, progress=progress)
    out["members"] = [str(Path(p).resolve()) for p in snapshots]
    return out


def ensemble_metrics(run_dir: Path, split=None, root=None, device="cpu", progress=False) -> dict:
    """Metrics of the mean softmax of a run's snapshots (``run_dir/snapshots/epoch_*.pt``) on ``split`` (default:
    the run's val split) of ``root`` (default: the run's data root), every point
    (:func:`evaluate_ensemble`). Cached as ``run_dir/metrics_<split>_ensemble[_<root>].json`` while newer than
    every snapshot and of the same snapshots and rooms."""
    run_dir = Path(run_dir)
    snaps = find_snapshots(run_dir)
    cfg = load_checkpoint(snaps[-1])["config"]
    split = split or cfg["data"]["val_split"]
    where = str(Path(root or cfg["data"]["root"]).resolve())
    path = run_dir / f"metrics_{split}_ensemble{_root_tag(where, cfg['data']['root'])}.json"
    members = [str(p.resolve()) for p in snaps]
    if path.is_file() and all(path.stat().st_mtime_ns >= p.stat().st_mtime_ns for p in snaps):
        cached = json.loads(path.read_text())
        if cached.get("data_root") == where and cached.get("members") == members:
            return cached
    metrics = evaluate_ensemble(snaps, where, split, device, progress=progress)
    metrics["split"], metrics["data_root"] = split, where
    write_text(path, json.dumps(metrics, indent=1))
    return metrics
