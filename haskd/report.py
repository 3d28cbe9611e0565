"""Human-readable outputs: metric tables (Markdown), and the HTML report of a pipeline run."""
from __future__ import annotations


def format_metrics(m: dict) -> str:
    lines = [f"mIoU {m['miou']:.4f}  mAcc {m['macc']:.4f}  allAcc {m['allacc']:.4f}", "", "| class | IoU |", "|---|---|"]
    for k, v in m["per_class_iou"].items():
        lines.append(f"| {k} | {'-' if v is None else f'{v:.4f}'} |")
    if "tta" in m:
        t = m["tta"]
        lines.append(f"\nwith 4-rotation TTA: mIoU {t['miou']:.4f}  mAcc {t['macc']:.4f}  allAcc {t['allacc']:.4f}")
    return "\n".join(lines)


def results_table(summary: dict) -> str:
    """Markdown table baseline / teacher / HAS-KD student from a pipeline summary."""
    rows = [("baseline (points only)", "baseline"), ("teacher (points + images)", "teacher"),
            ("HAS-KD student (points only)", "student")]
    lines = ["| model | mIoU | mAcc | allAcc |", "|---|---|---|---|"]
    for label, key in rows:
        if key in summary:
            m = summary[key]["metrics"]
            lines.append(f"| {label} | {100 * m['miou']:.2f} | {100 * m['macc']:.2f} | {100 * m['allacc']:.2f} |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def iou_bars_png(summary: dict, path):
    import numpy as np

    plt = _plt()
    keys = [k for k in ("baseline", "teacher", "student") if k in summary]
    # only classes that occur (a class absent from labels and predictions has IoU None everywhere)
    names = [c for c in summary[keys[0]]["metrics"]["per_class_iou"]
             if any(summary[k]["metrics"]["per_class_iou"].get(c) is not None for k in keys)]
    x = np.arange(len(names))
    w = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.6), 4))
    for i, k in enumerate(keys):
        vals = [summary[k]["metrics"]["per_class_iou"].get(c) or 0 for c in names]
        ax.bar(x + i * w - 0.4 + w / 2, vals, w, label=k)
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set_ylabel("IoU (val)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def confusion_png(conf, names, path, title=""):
    import numpy as np

    plt = _plt()
    m = np.asarray(conf, dtype=np.float64)
    keep = (m.sum(0) + m.sum(1)) > 0  # classes that occur in labels or predictions
    m, names = m[keep][:, keep], [n for n, k in zip(names, keep) if k]
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def topdown_png(coord, labels_by_title: dict, dataset, path, max_points=60000):
    """Top-down renders of one scene, one panel per labelling (e.g. ground truth, baseline, student)."""
    import numpy as np

    from .classes import colorize

    plt = _plt()
    idx = np.arange(coord.shape[0])
    if idx.size > max_points:
        idx = np.random.default_rng(0).choice(idx, max_points, replace=False)
    order = idx[np.argsort(coord[idx, 2])]  # draw low points first so the top surface shows
    n = len(labels_by_title)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4))
    for ax, (title, lab) in zip(np.atleast_1d(axes), labels_by_title.items()):
        ax.scatter(coord[order, 0], coord[order, 1], c=colorize(lab[order], dataset) / 255.0, s=0.5, marker=".")
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(out, summary: dict, cfg, num_scenes: int = 2):
    """OUT/report.html with PNGs under OUT/report/: IoU bars, confusion matrices, expert heatmap, chosen frames,
    top-down predictions next to ground truth."""
    import html
    import json
    import shutil
    from pathlib import Path

    import numpy as np
    import torch

    from .classes import class_names
    from .data.scene import list_scenes, load_scene
    from .engine.checkpoint import load_model
    from .engine.evaluate import predict_points

    out = Path(out)
    rd = out / "report"
    rd.mkdir(exist_ok=True)
    names = list(class_names(cfg.data.dataset))[: cfg.data.num_classes]
    parts = [f"<h1>HAS-KD run: {html.escape(str(out))}</h1>", "<h2>Validation results</h2>",
             _md_table_html(results_table(summary))]
    iou_bars_png(summary, rd / "iou_bars.png")
    parts.append('<h2>Per-class IoU</h2><img src="report/iou_bars.png">')
    parts.append("<h2>Confusion matrices (rows: ground truth, normalised)</h2>")
    for k in ("baseline", "teacher", "student"):
        if k in summary and summary[k].get("confusion") is not None:
            confusion_png(summary[k]["confusion"], names, rd / f"confusion_{k}.png", k)
            parts.append(f'<img src="report/confusion_{k}.png">')
    exp_png = out / "stage1" / "experts.png"
    if exp_png.is_file():
        shutil.copy(exp_png, rd / "experts.png")
        parts.append('<h2>Snapshot experts (per-class IoU; experts marked)</h2><img src="report/experts.png">')
    frames = out / "teacher" / "frames.json"
    if frames.is_file():
        parts.append("<h2>Frames chosen for the teacher</h2>")
        chosen = json.loads(frames.read_text())
        parts.append("<ul>" + "".join(f"<li>{html.escape(s)}: {', '.join(map(str, ids))}</li>"
                                      for s, ids in list(chosen.items())[:20]) + "</ul>")
        try:
            from .data.frames import open_frames
            from .iof import contact_sheet
            from .virtual_views import ensure_frames

            for sd in list_scenes(cfg.data.root, cfg.data.val_split)[:num_scenes]:
                if sd.name in chosen:
                    fs = open_frames(ensure_frames(sd))
                    contact_sheet(fs, chosen[sd.name], [None] * len(chosen[sd.name]), rd / f"frames_{sd.name}.png",
                                  title=sd.name)
                    parts.append(f'<img src="report/frames_{sd.name}.png" width="900">')
        except Exception as e:  # the report never fails a finished run
            parts.append(f"<p>(contact sheets unavailable: {html.escape(str(e))})</p>")
    parts.append("<h2>Predictions (top-down)</h2>")
    models = {k: load_model(summary[k]["ckpt"]) for k in ("baseline", "student") if k in summary}
    for sd in list_scenes(cfg.data.root, cfg.data.val_split)[:num_scenes]:
        scene = load_scene(sd)
        labs = {"ground truth": scene.segment if scene.segment is not None else np.full(scene.num_points, -1)}
        with torch.inference_mode():
            for k, m in models.items():
                labs[k] = predict_points(m, scene, cfg.data.voxel_size, cfg.data.num_classes,
                                         use_normal=cfg.data.use_normal).argmax(1).numpy()
        topdown_png(scene.coord, labs, cfg.data.dataset, rd / f"topdown_{sd.name}.png")
        parts.append(f'<h3>{html.escape(sd.name)}</h3><img src="report/topdown_{sd.name}.png" width="1100">')
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>HAS-KD report</title>"
            "<style>body{font-family:sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse}"
            "td,th{border:1px solid #999;padding:4px 10px;text-align:right} img{max-width:100%}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    (out / "report.html").write_text(page)
    return out / "report.html"


def _md_table_html(md: str) -> str:
    import html

    rows = [r.strip("|").split("|") for r in md.splitlines() if r.strip() and not r.startswith("|---")]
    head, body = rows[0], rows[1:]
    return ("<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body)
            + "</table>")
