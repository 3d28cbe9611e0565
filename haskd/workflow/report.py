"""Human-readable outputs: metric tables (Markdown), and the HTML report of a pipeline run.

Every number a person reads is a percentage (IoU, accuracy, share of points); the JSON files keep fractions.
"""
from __future__ import annotations

# The rows of the results table: summary key -> label (the README's demo table uses the same labels).
MODELS = (("baseline", "baseline (points only)"), ("teacher", "teacher (points + images)"),
          ("student", "HAS-KD student (points only)"))
# Classes that points show weakly (thin, flat on a wall): the results table gives them a column of their own, as
# the README's demo table does, when the data has them.
HARD_CLASSES = ("window", "picture")
PANEL_TITLES = {"baseline": "baseline", "teacher": "teacher (+ images)", "student": "HAS-KD student"}
IGNORE_GREY = (0.82, 0.82, 0.82)  # unlabelled points in the top-down views (a colour no class uses)


def pct(v, digits: int = 2) -> str:
    """A fraction as a percentage without the sign (table cells); '-' for None (class absent)."""
    return "-" if v is None else f"{100 * v:.{digits}f}"


def format_metrics(m: dict) -> str:
    """``haskd eval``'s printout: the three summary numbers and per-class IoU, all in percent."""
    lines = [f"mIoU {pct(m['miou'])}%  mAcc {pct(m['macc'])}%  allAcc {pct(m['allacc'])}%", "",
             "| class | IoU (%) |", "|---|---|"]
    for k, v in m["per_class_iou"].items():
        lines.append(f"| {k} | {pct(v, 1)} |")
    if any(v is None for v in m["per_class_iou"].values()):
        lines.append("\n'-': class absent from these rooms (neither labelled nor predicted); left out of the mean.")
    if "tta" in m:
        t = m["tta"]
        lines.append(f"\nwith 4-rotation TTA: mIoU {pct(t['miou'])}%  mAcc {pct(t['macc'])}%  "
                     f"allAcc {pct(t['allacc'])}%")
    return "\n".join(lines)


def _models(summary: dict) -> list:
    return [(k, label) for k, label in MODELS if k in summary]


def _hard_columns(summary: dict, hard=HARD_CLASSES) -> list:
    """The hard classes that some model scores (present in the val rooms)."""
    return [c for c in hard if any(summary[k]["metrics"]["per_class_iou"].get(c) is not None
                                   for k, _ in _models(summary))]


def results_table(summary: dict, hard=HARD_CLASSES) -> str:
    """Markdown table baseline / teacher / HAS-KD student from a pipeline summary, in percent: mIoU, mAcc,
    allAcc and the IoU of the ``hard`` classes the val rooms hold (the README's demo table)."""
    cols = _hard_columns(summary, hard)
    lines = ["| model (val, every point, %) | mIoU | mAcc | allAcc |" + "".join(f" {c} IoU |" for c in cols),
             "|---|---|---|---|" + "---|" * len(cols)]
    for key, label in _models(summary):
        m = summary[key]["metrics"]
        pc = m["per_class_iou"]
        lines.append(f"| {label} | {pct(m['miou'])} | {pct(m['macc'])} | {pct(m['allacc'])} |"
                     + "".join(f" {pct(pc.get(c), 1)} |" for c in cols))
    return "\n".join(lines)


def per_class_table(summary: dict) -> str:
    """Markdown table of val IoU (%) per class (rows) and model (columns); classes no model scores are named in a
    line under it instead of filling rows with '-'."""
    models = _models(summary)
    names = list(summary[models[0][0]]["metrics"]["per_class_iou"])
    present = [c for c in names if any(summary[k]["metrics"]["per_class_iou"].get(c) is not None for k, _ in models)]
    lines = ["| class (val IoU, %) | " + " | ".join(label for _, label in models) + " |",
             "|---" * (len(models) + 1) + "|"]
    for c in present:
        lines.append(f"| {c} | " + " | ".join(pct(summary[k]["metrics"]["per_class_iou"].get(c), 1)
                                              for k, _ in models) + " |")
    absent = [c for c in names if c not in present]
    notes = []
    if any(summary[k]["metrics"]["per_class_iou"].get(c) is None for c in present for k, _ in models):
        notes.append("'-': the class has no point in the val rooms and the model predicted none (no IoU); a model "
                     "that predicts a class the rooms lack scores 0 on it.")
    if absent:
        notes.append(f"Absent from the val rooms (no IoU, left out of the mean): {', '.join(absent)}.")
    return "\n".join(lines + ([""] + notes if notes else []))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _present(summary: dict) -> list:
    models = _models(summary)
    names = list(summary[models[0][0]]["metrics"]["per_class_iou"])
    return [c for c in names if any(summary[k]["metrics"]["per_class_iou"].get(c) is not None for k, _ in models)]


def iou_bars_png(summary: dict, path):
    """Grouped bars: val IoU (%) per class, one bar per model; classes absent from the val rooms are left out."""
    import numpy as np

    plt = _plt()
    models = _models(summary)
    names = _present(summary)
    x = np.arange(len(names))
    w = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.7), 4.2))
    for i, (k, label) in enumerate(models):
        vals = [100 * (summary[k]["metrics"]["per_class_iou"].get(c) or 0) for c in names]
        ax.bar(x + i * w - 0.4 + w / 2, vals, w, label=label)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("IoU on val (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def confusion_png(conf, names, path, title=""):
    """Row-normalised confusion matrix in percent (a row: where the points of one true class went)."""
    import numpy as np

    plt = _plt()
    m = np.asarray(conf, dtype=np.float64)
    keep = (m.sum(0) + m.sum(1)) > 0  # classes that occur in labels or predictions
    m, names = m[keep][:, keep], [n for n, k in zip(names, keep) if k]
    m = 100 * m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=100)
    if len(names) <= 20:  # the diagonal (recall of each class) in numbers
        for i in range(len(names)):
            ax.text(i, i, f"{m[i, i]:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if m[i, i] > 60 else "black")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the true class's points")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _scene_miou(pred, gt, num_classes):
    """mIoU (fraction) of one room's labelled points over the classes that occur in its labels or predictions."""
    import numpy as np

    ok = gt >= 0
    p, g = pred[ok], gt[ok]
    ious = []
    for c in range(num_classes):
        inter, union = np.sum((p == c) & (g == c)), np.sum((p == c) | (g == c))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)) if ious else None


def legend_entries(label_arrays, dataset) -> list:
    """``[(name, rgb 0..1)]`` for every class that occurs in any of ``label_arrays`` (palette order), then the
    unlabelled entry when any point is unlabelled (-1)."""
    import numpy as np

    from ..classes import DATASETS

    names, pal = DATASETS[dataset]["classes"], DATASETS[dataset]["palette"]
    seen = np.unique(np.concatenate([np.asarray(a).reshape(-1) for a in label_arrays]))
    out = [(names[c], tuple(pal[c] / 255.0)) for c in seen if 0 <= c < len(pal)]
    if (seen < 0).any():
        out.append(("unlabelled (not scored)", IGNORE_GREY))
    return out


def _marker_size(coord, n_points: int, panel_inches: float) -> float:
    """Scatter marker area (pt^2) that lets ``n_points`` spread over the room's footprint just touch in a panel
    ``panel_inches`` wide: dense scans stay crisp, sparse ones do not fade to a few specks."""
    import numpy as np

    ext = np.ptp(coord[:, :2], axis=0).clip(min=1e-3)
    spacing_m = float(np.sqrt(ext[0] * ext[1] / max(n_points, 1)))
    pt_per_m = panel_inches * 72 / float(ext.max())
    # x2.5: the points also lie on walls and furniture sides, so fewer of them than n_points cover the floor
    return float(np.clip(2.5 * (spacing_m * pt_per_m) ** 2, 0.3, 30.0))


def topdown_png(coord, labels_by_title: dict, dataset, path, max_points=60000):
    """Top-down renders of one scene, one panel per labelling (e.g. ground truth, teacher, baseline, student).
    Returns the legend entries ``[(name, rgb 0..1)]`` of the classes drawn (the report shows them beside it)."""
    import numpy as np

    from ..classes import colorize

    plt = _plt()
    idx = np.arange(coord.shape[0])
    if idx.size > max_points:
        idx = np.random.default_rng(0).choice(idx, max_points, replace=False)
    order = idx[np.argsort(coord[idx, 2])]  # draw low points first so the top surface shows
    n = len(labels_by_title)
    panel = 3.4
    size = _marker_size(coord[order], len(order), panel)
    fig, axes = plt.subplots(1, n, figsize=(panel * n, panel + 0.7))
    for ax, (title, lab) in zip(np.atleast_1d(axes), labels_by_title.items()):
        rgb = colorize(lab[order], dataset) / 255.0
        rgb[np.asarray(lab[order]) < 0] = IGNORE_GREY
        ax.scatter(coord[order, 0], coord[order, 1], c=rgb, s=size, marker="s", linewidths=0)
        ax.set_title(title, fontsize=11)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")  # two-line titles stay inside the image
    plt.close(fig)
    return legend_entries(list(labels_by_title.values()), dataset)


def _legend_html(entries) -> str:
    """A colour key (swatch + class name per line) as HTML, shown beside a view."""
    import html

    def swatch(rgb):
        r, g, b = (round(255 * v) for v in rgb[:3])
        return f"<span class='sw' style='background:rgb({r},{g},{b})'></span>"

    return ("<div class='legend'><b>classes</b>" + "".join(f"<div class='item'>{swatch(c)}{html.escape(n)}</div>"
                                                          for n, c in entries) + "</div>")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _what(text: str) -> str:
    import html

    return f"<p class='what'><b>What this shows:</b> {html.escape(text)}</p>"


def _figure(src: str, alt: str, caption: str = "", width: int = None) -> str:
    import html

    w = f" width='{width}'" if width else ""
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f"<figure><img src='{html.escape(src)}' alt='{html.escape(alt)}'{w}>{cap}</figure>"


def experts_explanation(table: dict) -> str:
    """One paragraph on what the expert heatmap of ``table`` (experts.json) means for ASD, from its numbers."""
    import numpy as np

    from ..distill.asd import iou_array, teacher_classes

    a = iou_array(table["iou"])
    names = table["class_names"]
    t = iou_array(table.get("teacher_iou"))
    present = np.isfinite(a).any(0) | (np.isfinite(t) if t is not None else False)  # some row scores the class
    absent = [n for n, p in zip(names, present) if not p]
    rows = ("Rows: the stage-1 snapshots" + (" and the teacher (last row)" if t is not None else "")
            + "; columns: classes; numbers: val IoU (%). ")
    tail = ""
    if absent:
        default = "the teacher stays their target" if t is not None else "the last snapshot is used"
        tail = (f" Grey columns ({len(absent)}: {', '.join(absent)}) are classes that no row scores (absent from "
                f"the val rooms and never predicted there): nothing to compare, so {default} (dashed box).")
    if t is None:
        return (rows + "The red box marks each class's expert: ASD distils the final student's predictions on "
                "that class from that snapshot." + tail)
    to_teacher = teacher_classes(a, t) & present
    k, n = int(to_teacher.sum()), int(present.sum())
    text = rows + "The red box marks whose predictions the final student copies for that class under ASD. "
    if k == n:
        text += (f"Here the teacher is boxed for all {n} classes scored on the val rooms: it is at least as good "
                 "as every snapshot on each of them, so ASD hands every class to the teacher, whose soft labels IHD already "
                 "uses. ASD then adds nothing, so the pipeline does not train a final student: it is the stage-1 "
                 "(CE + IHD) student; snapshots would matter only on classes where one beats the teacher.")
    elif k == 0:
        text += (f"No class stays with the teacher: on each of the {n} classes scored a snapshot beats it, so ASD "
                 "distils every class from its best snapshot instead of the teacher.")
    else:
        snap = [nm for nm, s, p in zip(names, to_teacher, present) if p and not s]
        text += (f"The teacher keeps {k} of the {n} classes scored; a snapshot beats it on {n - k} "
                 f"({', '.join(snap)}), and ASD distils those classes from that snapshot instead.")
    return text + tail


def write_report(out, summary: dict, cfg, num_scenes: int = 2):
    """OUT/report.html with PNGs under OUT/report/: result tables, IoU bars, confusion matrices, expert heatmap,
    chosen frames, top-down predictions of every model next to the ground truth, each with a legend and a line
    saying what it shows."""
    import html
    import json
    from pathlib import Path

    from ..classes import class_names
    from ..data.scene import list_scenes

    out = Path(out)
    rd = out / "report"
    rd.mkdir(exist_ok=True)
    names = list(class_names(cfg.data.dataset))[: cfg.data.num_classes]
    val_dirs = list_scenes(cfg.data.root, cfg.data.val_split)
    labels = dict(_models(summary))
    parts = [f"<h1>HAS-KD run: {html.escape(str(out))}</h1>",
             f"<p>Data: {html.escape(str(cfg.data.root))}, scored on the <b>{html.escape(cfg.data.val_split)}</b> "
             f"split ({_n(len(val_dirs), 'room')}, every point). All numbers are percentages.</p>",
             "<h2>Validation results</h2>", _md_table_html(results_table(summary)),
             _what("mIoU: mean over classes of the overlap between predicted and true points of a class; mAcc: "
                   "mean per-class accuracy; allAcc: share of all points labelled right. The teacher sees images "
                   "as well as points; the baseline and the HAS-KD student are the same point-only network, so "
                   "the student's gain over the baseline is what distillation bought at no inference cost."),
             "<h3>Per class</h3>", _md_table_html(per_class_table(summary))]
    if summary.get("student_is_stage1"):
        parts.insert(3, _what("The HAS-KD student is the stage-1 (CE + IHD) student, not trained again: "
                              + summary["student_is_stage1"] + "."))
    iou_bars_png(summary, rd / "iou_bars.png")
    parts += ["<h2>Per-class IoU</h2>", _figure("report/iou_bars.png", "per-class IoU bars"),
              _what("val IoU of each class for each model; classes absent from the val rooms are left out.")]
    conf = [k for k in labels if summary[k].get("confusion") is not None]
    if conf:
        parts.append("<h2>Confusion matrices</h2><div class='row'>")
        for k in conf:
            confusion_png(summary[k]["confusion"], names, rd / f"confusion_{k}.png", labels[k])
            parts.append(_figure(f"report/confusion_{k}.png", f"confusion matrix of the {k}", labels[k]))
        parts.append("</div>" + _what("Each row is a true class; the row's colours say where its points went "
                                      "(% of that class's points). A dark diagonal is right; a dark cell off the "
                                      "diagonal is a class taken for another. Numbers on the diagonal: per-class "
                                      "accuracy."))
    exp_json = Path(summary.get("experts") or out / "stage1" / "experts.json")
    if exp_json.is_file():
        from ..distill.asd import expert_heatmap_png, iou_array

        table = json.loads(exp_json.read_text())
        expert_heatmap_png(iou_array(table["iou"]), table["class_names"], table["expert"], rd / "experts.png",
                           teacher_iou=iou_array(table.get("teacher_iou")))
        parts += ["<h2>Snapshot experts (ASD)</h2>", _figure("report/experts.png", "expert heatmap"),
                  _what(experts_explanation(table))]
    parts += _frames_section(out, cfg, val_dirs, rd, num_scenes)
    parts += _topdown_section(summary, cfg, val_dirs, rd, num_scenes, labels)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>HAS-KD report</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1200px;line-height:1.35}"
            "table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #999;padding:4px 10px}"
            "td{text-align:right} td:first-child,th:first-child{text-align:left} img{max-width:100%}"
            "figure{margin:.5em 0} figcaption{font-size:1em;color:#222}"
            ".row{display:flex;flex-wrap:wrap;gap:1em} .row figure{flex:1 1 520px}"
            ".what{background:#f3f6fa;border-left:4px solid #7a9cc6;padding:.4em .8em;max-width:60em}"
            ".view{display:flex;align-items:center;gap:1em} .view figure{flex:1 1 auto;min-width:0}"
            ".legend{flex:0 0 auto;font-size:.9em} .legend .item{white-space:nowrap;margin:.15em 0}"
            "td.list{text-align:left}"
            ".sw{display:inline-block;width:1em;height:1em;margin-right:.35em;vertical-align:-.15em;"
            "border:1px solid #666}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>")
    (out / "report.html").write_text(page)
    return out / "report.html"


def _frames_section(out, cfg, val_dirs, rd, num_scenes) -> list:
    """The frames IOF chose for each room (complete list, train and val), and contact sheets of the first val
    rooms (saying how many of them are shown)."""
    import html
    import json

    frames = out / "teacher" / "frames.json"
    if not frames.is_file():
        return []
    chosen = json.loads(frames.read_text())
    val_names = {d.name for d in val_dirs}
    rows = "".join(f"<tr><td>{html.escape(s)}</td><td>{'val' if s in val_names else 'train'}</td>"
                   f"<td class='list'>{html.escape(', '.join(map(str, ids)))}</td></tr>" for s, ids in chosen.items())
    listing = (f"<table><tr><th>room</th><th>split</th><th>frame ids, in the order chosen</th></tr>{rows}</table>")
    if len(chosen) > 12:  # complete, folded away
        listing = f"<details><summary>all {len(chosen)} rooms</summary>{listing}</details>"
    parts = ["<h2>Frames chosen for the teacher</h2>",
             f"<p>{_n(len(chosen), 'room')} ({sum(s in val_names for s in chosen)} val, "
             f"{sum(s not in val_names for s in chosen)} train), policy <b>{html.escape(cfg.teacher.frame_policy)}"
             f"</b>, K = {cfg.teacher.num_frames} frames each.</p>", listing]
    shown = [d for d in val_dirs if d.name in chosen][:num_scenes]
    if not shown:
        return parts
    n_val = sum(d.name in chosen for d in val_dirs)
    parts.append(f"<p>The chosen frames of {len(shown)} of the {_n(n_val, 'val room')} (the first by name):</p>")
    try:
        from ..data.frames import open_frames
        from ..images.iof import contact_sheet
        from ..images.views import find_frames

        virtual = False
        for sd in shown:
            fdir = find_frames(sd, num_views=cfg.teacher.virtual_views)
            if fdir is None:
                continue
            virtual |= fdir.name != "frames"
            ids = chosen[sd.name]
            contact_sheet(open_frames(fdir), ids, [None] * len(ids), rd / f"frames_{sd.name}.png",
                          thumb_width=240, cols=min(4, len(ids)))
            kind = "virtual views rendered from the points" if fdir.name != "frames" else "camera frames"
            parts.append(_figure(f"report/frames_{sd.name}.png", f"chosen frames of {sd.name}",
                                 f"{sd.name} (val): {kind} {', '.join(map(str, ids))}, left to right in the order "
                                 "chosen"))
        note = (" Rooms without RGB-D frames get virtual views rendered from their coloured points, which show the "
                "teacher nothing the points do not." if virtual else "")
        parts.append(_what("The images the teacher sees with the points of each room, picked by the frame filter "
                           "to cover the room (the student never sees images)." + note))
    except Exception as e:  # the report never fails a finished run
        parts.append(f"<p>(contact sheets unavailable: {html.escape(str(e))})</p>")
    return parts


def _topdown_section(summary, cfg, val_dirs, rd, num_scenes, labels) -> list:
    """Top-down views of the first val rooms: ground truth and every model's prediction, with a legend."""
    import html
    from pathlib import Path

    import numpy as np
    import torch

    from ..data.dataset import SceneDataset
    from ..data.scene import load_scene
    from ..engine.checkpoint import load_model
    from ..engine.evaluate import predict_points

    shown = val_dirs[:num_scenes]
    parts = ["<h2>Predictions (top-down)</h2>",
             f"<p>{len(shown)} of the {_n(len(val_dirs), 'val room')} (the first by name), seen from above.</p>"]
    preds = {sd.name: {} for sd in shown}
    with torch.inference_mode():
        for k in sorted(labels, key=("teacher", "baseline", "student").index):
            model, mcfg = load_model(summary[k]["ckpt"], return_config=True)
            model.eval()
            if mcfg.role == "teacher":
                from ..engine.evaluate import frames_hook
                from ..images.provider import FrameProvider

                ds = SceneDataset(None, None, mcfg.data.num_classes, mcfg.data.voxel_size, scenes=shown,
                                  use_normal=mcfg.data.use_normal, need_labels=False,
                                  frames=FrameProvider.for_run(mcfg, Path(summary[k]["ckpt"]).parent))
                for i, scene in enumerate(ds.scenes):
                    preds[scene.name][k] = predict_points(
                        model, scene, mcfg.data.voxel_size, mcfg.data.num_classes, use_normal=mcfg.data.use_normal,
                        extra=frames_hook(ds, i)).argmax(1).numpy()
            else:
                for sd in shown:
                    preds[sd.name][k] = predict_points(model, load_scene(sd), mcfg.data.voxel_size,
                                                       mcfg.data.num_classes,
                                                       use_normal=mcfg.data.use_normal).argmax(1).numpy()
    for sd in shown:
        scene = load_scene(sd)
        gt = scene.segment if scene.segment is not None else np.full(scene.num_points, -1)
        labs = {"ground truth": gt}
        for k, p in preds[sd.name].items():
            miou = _scene_miou(p, gt, cfg.data.num_classes) if scene.segment is not None else None
            labs[PANEL_TITLES[k] + ("" if miou is None else f"\nmIoU {100 * miou:.1f}% on this room")] = p
        entries = topdown_png(scene.coord, labs, cfg.data.dataset, rd / f"topdown_{sd.name}.png")
        panels = ", ".join(t.split("\n")[0] for t in labs)
        parts += [f"<h3>{html.escape(sd.name)}</h3>", "<div class='view'>"
                  + _figure(f"report/topdown_{sd.name}.png", f"top-down views of {sd.name}",
                            f"{sd.name}, left to right: {panels}") + _legend_html(entries) + "</div>"]
    parts.append(_what("Every point of the room seen from above, coloured by class: the true labels, then each "
                       "model's prediction (mIoU on this room alone in the title). Grey points carry no label and "
                       "are not scored. The teacher sees the room's chosen images too; baseline and student only "
                       "the points."))
    return parts


def _md_table_html(md: str) -> str:
    """A Markdown table (and any plain lines after it) as HTML."""
    import html

    lines = [r for r in md.splitlines() if r.strip()]
    rows = [r.strip().strip("|").split("|") for r in lines if r.startswith("|") and not r.startswith("|---")]
    notes = [r for r in lines if not r.startswith("|")]
    head, body = rows[0], rows[1:]
    return ("<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body)
            + "</table>" + "".join(f"<p>{html.escape(n)}</p>" for n in notes))
