"""``haskd experts``: evaluate every snapshot of a run, build the per-class IoU matrix A[m, c] and pick the expert
of each class (ASD). Writes ``experts.json`` and a heatmap PNG."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .asd import expert_heatmap_png, select_experts
from .classes import class_names
from .data.dataset import SceneDataset
from .engine.checkpoint import load_model
from .engine.evaluate import evaluate
from .errors import HaskdError


def find_snapshots(run_dir) -> list:
    snaps = sorted((Path(run_dir) / "snapshots").glob("epoch_*.pt"))
    if not snaps:
        raise HaskdError(f"{Path(run_dir) / 'snapshots'}: no snapshots (train with train.snapshots=M)")
    return snaps


def build_expert_table(run_dir, data_root, split="val", device="cpu", topk=3, out=None, progress=True) -> dict:
    snaps = find_snapshots(run_dir)
    rows, cfg = [], None
    for p in snaps:
        model, cfg = load_model(p, device=device, return_config=True)
        ds = SceneDataset(data_root or cfg.data.root, split, cfg.data.num_classes, cfg.data.voxel_size,
                          use_normal=cfg.data.use_normal)
        with torch.inference_mode():
            m = evaluate(model, ds, device, cfg.data.dataset, progress=progress)
        rows.append([np.nan if v is None else v for v in m["per_class_iou"].values()])
    iou = np.array(rows, dtype=np.float64)
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
    out = Path(out) if out else Path(run_dir) / "experts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1))
    expert_heatmap_png(iou, names, sel["expert"], out.with_suffix(".png"))
    table["path"] = str(out)
    return table
