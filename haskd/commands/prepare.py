"""``haskd prepare samples|synthetic|scannet|s3dis``: raw data -> haskd scene folders.

- ``samples``: the real samples of ``shared/data`` (:mod:`haskd.prepare.samples`).
- ``synthetic``: the synthetic rooms benchmark (:mod:`haskd.data.synthetic`).
- ``sample-ply``: a few thousand points of a shared ScanNet room as a PLY, to try ``haskd predict`` on
  (:mod:`haskd.prepare.sample_ply`).
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
                      progress=not args.no_progress, num_test=args.test, jobs=max(1, args.jobs),
                      version=args.version, **kw)
    test = f", test {len(s['test'])}" if s["test"] else ""
    print(f"synthetic: train {len(s['train'])}, val {len(s['val'])}{test}; written {s['written']}, "
          f"already there {s['skipped']} -> {args.out}")
    return 0


def run_sample_ply(args) -> int:
    from ..prepare.sample_ply import write_sample_ply

    r = write_sample_ply(args.src, args.out, scene=args.scene, points=args.points, crop=args.crop, seed=args.seed)
    print(f"{r['points']} of {r['source_points']} points of {args.scene} ({r['source']}) -> {r['path']} "
          f"({r['bytes'] / 1024:.0f} KB)")
    print(f"try: haskd predict --ckpt RUN/last.pt {r['path']} --out preds/")
    return 0


def _external(sub, module: str, command: str, help: str, description: str = None):
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
    p = sub.add_parser(command, help=help, description=description)
    configure(p)
    p.set_defaults(func=lambda args: int(run(args) or 0))
    return p


def register(subparsers):
    p = subparsers.add_parser("prepare", help="import datasets into scene folders (samples, synthetic, scannet, "
                              "s3dis), or cut a sample PLY", description="Raw data -> haskd scene folders "
                              "(<out>/<split>/<scene>/coord.npy, color.npy, segment20.npy, ...). See docs/data.md.")
    sub = p.add_subparsers(dest="prepare_cmd", required=True,
                           metavar="{samples,synthetic,scannet,s3dis,sample-ply}")

    s = sub.add_parser("samples", help="import the real samples of shared/data (ScanNet + S3DIS)", description=(
        "Import the real data samples of ../shared/data into scene folders.\n\n"
        "Reads:  --src, the sample folders described in its README.md (ScanNet: ai360, mmdet3d, votenet; S3DIS).\n"
        "Writes: OUT/scannet/{train,val,frames_only}/<scene>/ and OUT/s3dis/<split>/<room>/; scenes already\n"
        "        there are kept unless --overwrite."))
    s.add_argument("--src", type=Path, default=DEFAULT_SAMPLES, help="samples folder (default ../shared/data)")
    s.add_argument("--out", type=Path, required=True, help="output root: scannet/{train,val,frames_only}, s3dis/")
    s.add_argument("--val-rooms", nargs="+", default=["scene0006", "scene0007", "scene0008"],
                   help="ScanNet rooms (sceneXXXX) that go to val")
    s.add_argument("--overwrite", action="store_true", help="rewrite scenes already there")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    s.set_defaults(func=run_samples)

    y = sub.add_parser("synthetic", help="generate the synthetic rooms benchmark (points + RGB-D frames)",
                       description=(
        "Generate the synthetic rooms benchmark: labelled points and rendered RGB-D frames per room.\n\n"
        "Reads:  nothing (the generator and --seed).\n"
        "Writes: OUT/{train,val,test}/synth_<split>_NNNN/ (coord, color, normal, segment20, frames/) and\n"
        "        OUT/synthetic.json (generator settings); rooms already there are kept unless --overwrite."))
    y.add_argument("--out", type=Path, required=True, help="output root: train/, val/, synthetic.json")
    y.add_argument("--train", type=int, default=8, help="number of train rooms")
    y.add_argument("--val", type=int, default=4, help="number of val rooms")
    y.add_argument("--test", type=int, default=0, help="number of held-out test rooms (read only by "
                   "`haskd eval --split test` and `haskd ablate --split test`)")
    y.add_argument("--seed", type=int, default=0, help="generator seed")
    y.add_argument("--version", type=int, default=1, choices=(1, 2, 3), help="generator version: 1 (default) "
                   "points coloured by the exact texture; 2 points coloured as a fused scan is, blurred over 3 cm, so "
                   "the hard classes' fine pattern shows in the frames only; 3 as 2 with a coarser picture pattern "
                   "(7-10 cm) that 120x160 frames still resolve")
    y.add_argument("--points-per-m2", type=float, default=400.0, help="surface sampling density")
    y.add_argument("--frames", type=int, default=12, help="RGB-D frames per room")
    y.add_argument("--image-size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"), help="frame size")
    y.add_argument("--overwrite", action="store_true", help="rewrite scenes (and accept other settings)")
    y.add_argument("--jobs", type=int, default=1, help="rooms made in parallel processes (same files; default 1)")
    y.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    y.set_defaults(func=run_synthetic)

    _external(sub, "scannet", "scannet", "import ScanNetV2 (official download layout)", description=(
        "Import ScanNetV2 from its official download layout (docs/datasets.md).\n\n"
        "Reads:  --raw/scans/<scene>/ (_vh_clean_2.ply, labels, segs, aggregation, .sens for frames).\n"
        "Writes: OUT/<split>/<scene>/ scene folders (frames/ every --frames-every frames), a manifest of\n"
        "        finished scenes (a rerun continues where it stopped)."))
    _external(sub, "s3dis", "s3dis", "import S3DIS (Stanford3dDataset_v1.2_Aligned_Version)", description=(
        "Import S3DIS from Stanford3dDataset_v1.2_Aligned_Version (docs/datasets.md).\n\n"
        "Reads:  --raw/Area_N/<room>/Annotations/*.txt.\n"
        "Writes: OUT/<split>/Area_N_<room>/ scene folders (13 classes in segment.npy) and a manifest."))

    c = sub.add_parser("sample-ply", help="cut a small real ScanNet room into a PLY to try `haskd predict` on",
                       description=(
        "Cut a few thousand points of a real ScanNet room (shared samples) into a PLY file.\n\n"
        "Reads:  --src/scannet_mmdet3d_testdata/<scene>/ (or scannet_votenet_50k_picwoon/) of ../shared/data.\n"
        "Writes: --out, a binary PLY: x y z (metres, axis-aligned), red green blue, and the ScanNet-20 ground\n"
        "        truth as 'label' (-1 = unlabelled; `haskd predict` ignores it), nx ny nz (estimated from the\n"
        "        room's points, for models trained with normals). About 32 bytes a point."))
    c.add_argument("--src", type=Path, default=DEFAULT_SAMPLES, help="samples folder (default ../shared/data)")
    c.add_argument("--out", type=Path, default=Path("my_scan.ply"), help="PLY path")
    c.add_argument("--scene", default="scene0000_00", help="ScanNet scene of the samples")
    c.add_argument("--points", type=int, default=5000, help="points kept (drawn at random, fixed by --seed)")
    c.add_argument("--crop", type=float, default=0.0, metavar="METRES",
                   help="keep only a square of this side around the room's centre first (0: the whole room)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed")
    c.set_defaults(func=run_sample_ply)
    return p


def run(args) -> int:
    """Dispatch a parsed ``prepare`` namespace (for callers that do not use ``args.func``)."""
    return int(args.func(args) or 0)


__all__ = ["register", "run", "run_sample_ply", "run_samples", "run_synthetic"]
