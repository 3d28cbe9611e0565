"""``haskd curves RUN [RUN ...] --out curves.png``: a metric per epoch of several runs, one line each, and a table.

Used to tell whether a run has plateaued (issue 16: a converged benchmark): the table gives, per run, the epoch
of the best value, the best, the last, and the mean over the last 10% of the epochs (at least one).
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import HaskdError, require
from ..workflow.runs import read_curve


def register(sub):
    p = sub.add_parser("curves", help="val mIoU per epoch of runs -> PNG (one line per run) + table",
                       description=(
        "Plot a metric per epoch of one or more runs (val mIoU by default), one line per run, and print a\n"
        "table per run: epoch of the max, max, last, mean of the last 10% of the epochs.\n\n"
        "Reads:  RUN/metrics.jsonl of each run (a run still training is read as far as it got).\n"
        "Writes: --out PNG (values in percent for fractions such as val/miou).\n"
        "Prints: the table, in percent."))
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders holding metrics.jsonl")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="legend name of each run, in order, once per run (default: the folder names)")
    p.add_argument("--metric", default="val/miou", help="metrics.jsonl key to draw")
    p.set_defaults(func=run)


def curve_stats(epochs, values) -> dict:
    """``{"epochs", "best_epoch", "max", "last", "tail_mean", "tail_epochs"}``: the tail is the last 10% of the
    epochs read (rounded up, at least 1); ties for the max go to the earliest epoch."""
    n = len(values)
    tail = max(1, math.ceil(0.1 * n))
    best = max(range(n), key=lambda i: (values[i], -i))
    return {"epochs": n, "best_epoch": epochs[best], "max": values[best], "last": values[-1],
            "tail_mean": sum(values[-tail:]) / tail, "tail_epochs": tail}


def draw_curves(curves: dict, out, metric: str, scale: float) -> None:
    """``curves``: label -> (epochs, values); drawn times ``scale`` into the PNG ``out``."""
    require("matplotlib", "matplotlib")
    from matplotlib.figure import Figure  # no pyplot: no global backend, works headless

    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for label, (e, v) in curves.items():
        ax.plot(e, [scale * x for x in v], label=label, linewidth=1.4)
    ax.set_xlabel("epoch")
    name = {"val/miou": "val mIoU", "val/macc": "val mAcc", "val/allacc": "val allAcc"}.get(metric, metric)
    ax.set_ylabel(name + (" (%)" if scale == 100 else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out))


def curves_table(stats: dict, scale: float) -> str:
    """Markdown table of :func:`curve_stats` per label, values times ``scale``."""
    lines = ["| run | epochs | best epoch | max | last | mean of last 10% (epochs) |", "|---|---|---|---|---|---|"]
    for label, s in stats.items():
        lines.append(f"| {label} | {s['epochs']} | {s['best_epoch']} | {scale * s['max']:.2f} | "
                     f"{scale * s['last']:.2f} | {scale * s['tail_mean']:.2f} ({s['tail_epochs']}) |")
    return "\n".join(lines)


def run(args) -> int:
    labels = args.label or [Path(r).resolve().name for r in args.runs]
    if len(labels) != len(args.runs):
        raise HaskdError(f"--label given {len(labels)} times for {len(args.runs)} runs (once per run, in order)")
    if len(set(labels)) != len(labels):
        raise HaskdError(f"two runs share a legend name ({', '.join(labels)}): name them with --label")
    curves = {lab: read_curve(r, args.metric) for lab, r in zip(labels, args.runs)}
    # fractions (mIoU, accuracies) in percent, like every other haskd output; losses as they are
    scale = 100.0 if all(0 <= x <= 1 for _, v in curves.values() for x in v) and "loss" not in args.metric else 1.0
    draw_curves(curves, args.out, args.metric, scale)
    stats = {lab: curve_stats(*c) for lab, c in curves.items()}
    print(f"{args.metric}" + (" in percent" if scale == 100 else "") + f" -> {args.out}")
    print(curves_table(stats, scale))
    return 0
