"""``haskd experts``: evaluate every snapshot of a run, build the per-class IoU matrix A[m, c] and pick the expert
of each class (ASD). Writes ``experts.json`` and a heatmap PNG."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..distill.asd import expert_heatmap_png, iou_array, select_experts, teacher_classes
from ..classes import class_names
from ..data.dataset import SceneDataset
from ..engine.checkpoint import load_model
from ..engine.evaluate import evaluate
from ..errors import HaskdError
from .runs import find_snapshots, split_metrics


def teacher_iou(teacher, split: str, num_classes: int, metrics: dict = None) -> list:
    """The teacher's per-class IoU on ``split`` from its run folder's ``val_metrics.json`` (written when it was
    trained, with its own frames), from that file given directly, or from ``metrics`` (the teacher evaluated
    elsewhere); None for an absent class."""
    p = Path(teacher)
    p = p / "val_metrics.json" if p.is_dir() else p
    if metrics is None and not p.is_file():
        raise HaskdError(f"{p}: no teacher metrics (train the teacher first, or pass its run folder)")
    m = metrics if metrics is not None else json.loads(p.read_text())
    if m.get("split", split) != split:
        raise HaskdError(f"{p}: teacher metrics are on split {m['split']!r}, the snapshots on {split!r}")
    iou = list(m.get("per_class_iou", {}).values())
    if len(iou) != num_classes:
        raise HaskdError(f"{p}: {len(iou)} per-class IoUs, the snapshots have {num_classes} classes")
    return [None if v is None else float(v) for v in iou]


def build_expert_table(run_dir, data_root, split="val", device="cpu", topk=3, out=None, progress=True,
                       teacher=None) -> dict:
    """``teacher``: the teacher's run folder (or metrics JSON): its per-class IoU on the same rooms is stored as
    ``teacher_iou``, for ``distill.teacher_expert``; the snapshots' expert table does not depend on it. For the
    split the teacher was validated on that is its ``val_metrics.json``; for another split or data root the
    teacher is evaluated there (:func:`haskd.workflow.runs.split_metrics`, cached in its run folder)."""
    snaps = find_snapshots(run_dir)
    rows, cfg = [], None
    for p in snaps:
        model, cfg = load_model(p, device=device, return_config=True)
        ds = SceneDataset(data_root or cfg.data.root, split, cfg.data.num_classes, cfg.data.voxel_size,
                          use_normal=cfg.data.use_normal)
        with torch.inference_mode():
            m = evaluate(model, ds, device, cfg.data.dataset, progress=progress)
        rows.append(list(m["per_class_iou"].values()))
    iou = iou_array(rows)
    sel = select_experts(iou, topk=min(topk, len(snaps)))
    names = list(class_names(cfg.data.dataset))[: cfg.data.num_classes]
    table = {
        "snapshots": [str(p.resolve()) for p in snaps],
        "split": split,
        "class_names": names,
        "iou": [[None if np.isnan(v) else float(v) for v in r] for r in iou],
        "expert": [int(e) for e in sel["expert"]],
        "indices": np.asarray(sel["indices"]).astype(int).tolist(),
        "weights": np.asarray(sel["weights"]).astype(float).tolist(),
    }
    if teacher is not None:
        source, root, elsewhere = Path(teacher), Path(data_root or cfg.data.root).resolve(), None
        if source.is_dir() and (split != cfg.data.val_split or root != Path(cfg.data.root).resolve()):
            # other rooms than the ones it was validated on: evaluate the teacher there (its frames; cached)
            elsewhere = split_metrics(source, split, root, device)
        table["teacher"] = str(Path(teacher).resolve())
        table["teacher_iou"] = teacher_iou(source, split, len(names), elsewhere)
    out = Path(out) if out else Path(run_dir) / "experts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1))
    expert_heatmap_png(iou, names, sel["expert"], out.with_suffix(".png"),
                       teacher_iou=iou_array(table.get("teacher_iou")))
    table["path"] = str(out)
    return table


def snapshot_classes(table: dict, teacher_expert: bool = False) -> np.ndarray:
    """(C,) bool: the classes whose ASD target is a snapshot that earned it on val -- a finite snapshot IoU, and,
    with ``teacher_expert`` and the teacher's row in the table, a snapshot strictly better than the teacher
    (:func:`haskd.distill.asd.teacher_classes`). When none is True, ASD has nothing of its own to distil: the final student
    would be stage 1 trained again (the pipeline then keeps stage 1, see :func:`asd_pointless`)."""
    iou = iou_array(table["iou"])
    scored = np.isfinite(iou).any(0)
    if teacher_expert and table.get("teacher_iou") is not None:
        scored &= ~teacher_classes(iou, iou_array(table["teacher_iou"]))
    return scored


def asd_pointless(table_path, teacher_expert: bool = False):
    """None when some class has a snapshot expert (:func:`snapshot_classes`), else the one-line reason why not."""
    table = json.loads(Path(table_path).read_text())
    if snapshot_classes(table, teacher_expert).any():
        return None
    if teacher_expert and table.get("teacher_iou") is not None and np.isfinite(iou_array(table["iou"])).any():
        return (f"{table_path}: the teacher is the expert of every class (distill.teacher_expert), no snapshot "
                "supervises any")
    return f"{table_path}: no snapshot scores any class on {table.get('split', 'val')} (every class absent)"


