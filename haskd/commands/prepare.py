"""``haskd prepare samples|synthetic|scannet|s3dis``: raw data -> haskd scene folders.

- ``samples``: the real samples of ``shared/data`` (:mod:`haskd.prepare.samples`).
- ``synthetic``: the synthetic rooms benchmark (:mod:`haskd.data.synthetic`).
- ``scannet`` / ``s3dis``: full datasets; their arguments come from ``haskd.prepare.scannet`` /
  ``haskd.prepare.s3dis`` (``configure_parser(parser)``, ``run(args) -> int``). When such a module is missing or
  fails to import, the subcommand stays listed and prints one line saying so.

Each handler is ``run_*(args) -> int`` and is set as ``args.func``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

DEFAULT_SAMPLES = Path("..") / "shared" / "data"


def run_samples(args) -> int:
    from ..prepare.samples import prepare_samples

    s = prepare_samples(args.src, args.out, val_rooms=tuple(args.val_rooms), overwrite=args.overwrite,
                        progress=not args.no_progress)
    sc = s["scannet"]
    s3 = ", ".join(f"{k} {len(v)}" for k, v in sorted(s["s3dis"].items())) or "none"
    print(f"scannet: train {len(sc['train'])}, val {len(sc['val'])}, frames_only {len(sc['frames_only'])}; "
          f"s3dis: {s3}; written {s['written']}, already there {s['skipped']} -> {args.out}")
    for key in s["placeholder_color"]:
        print(f"note: {key} has no colour in its source (constant grey written)")
    return 0


def run_synthetic(args) -> int:
    from ..data.synthetic import write_dataset

    kw = {"points_per_m2": args.points_per_m2, "num_frames": args.frames, "image_size": tuple(args.image_size)}
    s = write_dataset(args.out, num_train=args.train, num_val=args.val, seed=args.seed, overwrite=args.overwrite,
                      progress=not args.no_progress, num_test=args.test, jobs=max(1, args.jobs), **kw)
    test = f", test {len(s['test'])}" if s["test"] else ""
    print(f"synthetic: train {len(s['train'])}, val {len(s['val'])}{test}; written {s['written']}, "
          f"already there {s['skipped']} -> {args.out}")
    return 0


def _external(sub, module: str, command: str, help: str):
    """Add ``prepare <command>`` from ``haskd.prepare.<module>``; when that module cannot be imported, add a stub
    that accepts any arguments and reports why in one line (exit code 2)."""
    try:
        mod = importlib.import_module(f"haskd.prepare.{module}")
        configure, run = mod.configure_parser, mod.run
    except (ImportError, AttributeError) as e:
        reason = f"{type(e).__name__}: {e}"
        # no option prefix and no -h: every argument lands in `rest`, so the stub never fails while parsing
        p = sub.add_parser(command, help=f"{help} (unavailable)", add_help=False, prefix_chars="\x00")
        p.add_argument("rest", nargs=argparse.REMAINDER)

        def unavailable(args) -> int:
            print(f"haskd: error: 'prepare {command}' is unavailable: haskd.prepare.{module} could not be loaded "
                  f"({reason})", file=sys.stderr)
            return 2

        p.set_defaults(func=unavailable)
        return p
    p = sub.add_parser(command, help=help)
    configure(p)
    p.set_defaults(func=lambda args: int(run(args) or 0))
    return p


def register(subparsers):
    p = subparsers.add_parser("prepare", help="import datasets into scene folders (samples, synthetic, scannet, s3dis)")
    sub = p.add_subparsers(dest="prepare_cmd", required=True, metavar="{samples,synthetic,scannet,s3dis}")

    s = sub.add_parser("samples", help="import the real samples of shared/data (ScanNet + S3DIS)")
    s.add_argument("--src", type=Path, default=DEFAULT_SAMPLES, help="samples folder (default ../shared/data)")
    s.add_argument("--out", type=Path, required=True, help="output root: scannet/{train,val,frames_only}, s3dis/")
    s.add_argument("--val-rooms", nargs="+", default=["scene0006", "scene0007", "scene0008"],
                   help="ScanNet rooms (sceneXXXX) that go to val")
    s.add_argument("--overwrite", action="store_true", help="rewrite scenes already there")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run_samples)

    y = sub.add_parser("synthetic", help="generate the synthetic rooms benchmark (points + RGB-D frames)")
    y.add_argument("--out", type=Path, required=True, help="output root: train/, val/, synthetic.json")
    y.add_argument("--train", type=int, default=8, help="number of train rooms")
    y.add_argument("--val", type=int, default=4, help="number of val rooms")
    y.add_argument("--test", type=int, default=0, help="number of held-out test rooms (read only by "
                   "`haskd eval --split test` and `haskd ablate --split test`)")
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--points-per-m2", type=float, default=400.0, help="surface sampling density")
    y.add_argument("--frames", type=int, default=12, help="RGB-D frames per room")
    y.add_argument("--image-size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    y.add_argument("--overwrite", action="store_true", help="rewrite scenes (and accept other settings)")
    y.add_argument("--jobs", type=int, default=1, help="rooms made in parallel processes (same files; default 1)")
    y.add_argument("--no-progress", action="store_true")
    y.set_defaults(func=run_synthetic)

    _external(sub, "scannet", "scannet", "import ScanNetV2 (official download layout)")
    _external(sub, "s3dis", "s3dis", "import S3DIS (Stanford3dDataset_v1.2_Aligned_Version)")
    return p


def run(args) -> int:
    """Dispatch a parsed ``prepare`` namespace (for callers that do not use ``args.func``)."""
    return int(args.func(args) or 0)


__all__ = ["register", "run", "run_samples", "run_synthetic"]
