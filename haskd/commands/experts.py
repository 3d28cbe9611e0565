"""``haskd experts --run DIR --data ROOT --split val``."""
from __future__ import annotations


def register(sub):
    p = sub.add_parser("experts", help="per-class IoU of every snapshot of a run -> expert table (JSON + PNG)",
                       description=(
        "ASD's expert table: every snapshot of a run scored per class; each class's best snapshot is its expert.\n\n"
        "Reads:  RUN/snapshots/epoch_*.pt, the split's scene folders, TEACHER/val_metrics.json with --teacher.\n"
        "Writes: OUT (default RUN/experts.json; IoU as fractions 0..1) and a heatmap PNG beside it (same stem).\n"
        "Prints: per class its expert and that snapshot's IoU (and the teacher's) in percent."))
    p.add_argument("--run", required=True, help="run folder holding snapshots/epoch_*.pt")
    p.add_argument("--data", default=None, help="data root (default: the run's)")
    p.add_argument("--split", default="val", help="split the snapshots are scored on")
    p.add_argument("--topk", type=int, default=3, help="experts kept per class (the loss uses distill.asd_topk)")
    p.add_argument("--out", default=None, help="JSON path (default: RUN/experts.json)")
    p.add_argument("--teacher", default=None, help="teacher run folder: store its per-class IoU on the same rooms "
                   "in the table, for distill.teacher_expert (the teacher joins the expert pool)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.distributed import setup
    from ..workflow.experts import build_expert_table

    device = setup(args.device, 0)
    t = build_expert_table(args.run, args.data, args.split, device, args.topk, args.out, teacher=args.teacher)
    names = t["class_names"]
    print(f"{len(t['snapshots'])} snapshots -> {t['path']}")
    ti = t.get("teacher_iou")
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    for c, e in enumerate(t["expert"]):
        line = f"  {names[c]:>16}: snapshot {e} (IoU {fmt(t['iou'][e][c])})"
        print(line + ("" if ti is None else f", teacher {fmt(ti[c])}"))
    return 0
