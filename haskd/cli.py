"""haskd: HAS-KD distillation for point-only 3D semantic segmentation.

Every training/eval command takes ``--config``, ``--data``, ``--out``, ``--epochs``,
``--seed``, ``--device`` and ``key=value`` overrides. Input problems print one line and exit non-zero."""
from __future__ import annotations

import argparse
import importlib
import os
import json
import logging
import sys

from .errors import HaskdError

# Spinning OpenMP threads starve other processes on small machines (measured: a tiny forward/backward went from
# 0.26 s to 13.7 s with a second busy process on 2 cores). Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Command modules, each with register(subparsers); imported explicitly, in this order.
COMMAND_MODULES = ("prepare", "frames", "experts", "pipeline", "benchmark")


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1 (``--epochs``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_common(p, data_required=False):
    p.add_argument("--config", default=None, help="YAML config or preset name (default: scannet20_student)")
    p.add_argument("--data", default=None, required=data_required, help="data root holding <split>/<scene>/")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.01")


def config_from_args(args):
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "data", None):
        cfg.data.root = args.data
    if getattr(args, "epochs", None) is not None:
        cfg.train.epochs = args.epochs
    if getattr(args, "seed", None) is not None:
        cfg.train.seed = args.seed
    if getattr(args, "device", None):
        cfg.train.device = args.device
    return cfg


def cmd_train(args):
    from .engine.trainer import train

    cfg = config_from_args(args)
    out = args.out or "runs/train"
    metrics = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if metrics:
        print(f"val mIoU {metrics['miou']:.4f}  mAcc {metrics['macc']:.4f}  allAcc {metrics['allacc']:.4f}  -> {out}")
    return 0


def cmd_eval(args):
    import torch

    from .data.dataset import SceneDataset
    from .engine.checkpoint import load_model
    from .engine.distributed import setup
    from .engine.evaluate import evaluate
    from .report import format_metrics

    model, cfg = load_model(args.ckpt, return_config=True)
    from .config import apply_overrides

    apply_overrides(cfg, args.overrides)
    device = setup(args.device or "auto", 0)
    model.to(device)
    root = args.data or cfg.data.root
    ds = SceneDataset(root, args.split, cfg.data.num_classes, cfg.data.voxel_size, use_normal=cfg.data.use_normal)
    extra = None
    if cfg.role == "teacher":
        from .models.teacher import attach_frames

        attach_frames(ds, cfg)
        extra = ds.extra
    with torch.inference_mode():
        m = evaluate(model, ds, device, cfg.data.dataset, extra=extra, progress=True)
    result = {k: m[k] for k in ("miou", "macc", "allacc", "per_class_iou")}
    result.update(confusion=m["confusion"], per_class_acc=m["per_class_acc"], split=args.split,
                  ckpt=str(args.ckpt), num_points=m["num_points"])
    if args.tta:
        with torch.inference_mode():
            t = evaluate(model, ds, device, cfg.data.dataset, tta=True, extra=extra)
        result["tta"] = {k: t[k] for k in ("miou", "macc", "allacc", "per_class_iou")}
    if args.voting:
        from .engine.voting import voting_augs

        augs = voting_augs(cfg.data.vote_augs, cfg.data.dataset)
        with torch.inference_mode():
            v = evaluate(model, ds, device, cfg.data.dataset, extra=extra, progress=True, voting=augs)
        result["voting"] = {k: v[k] for k in ("miou", "macc", "allacc", "per_class_iou", "min_votes",
                                              "augmentations")}
    print(format_metrics(result))
    if "voting" in result:
        v = result["voting"]
        print(f"\nwith fragment voting ({v['augmentations']} augmentations, every point voted at least "
              f"{v['min_votes']} times): mIoU {v['miou']:.4f}  mAcc {v['macc']:.4f}  allAcc {v['allacc']:.4f}")
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def cmd_predict(args):
    from .engine.checkpoint import load_model
    from .engine.distributed import setup
    from .engine.predict import predict_file

    model, cfg = load_model(args.ckpt, return_config=True)
    if cfg.role == "teacher":
        raise HaskdError(f"{args.ckpt}: is a teacher checkpoint; predict runs point-only students")
    device = setup(args.device or "auto", 0)
    model.to(device)
    for inp in args.input:
        r = predict_file(model, cfg, inp, args.out, device, tta=args.tta)
        print(f"{inp}: {r['points']} points -> {r['labels']}, {r['ply']}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="haskd", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a student (or a teacher with role=teacher)")
    add_common(t)
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on every original point of a split")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--data", default=None)
    e.add_argument("--split", default="val")
    e.add_argument("--out", default=None, help="metrics JSON")
    e.add_argument("--tta", action="store_true", help="also report 4-rotation TTA (separately)")
    e.add_argument("--voting", action="store_true",
                   help="also report Pointcept's test: fragment voting over its test-time augmentations "
                        "(data.vote_augs; 13 for ScanNet, 10 for S3DIS), separately")
    e.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    e.add_argument("overrides", nargs="*", metavar="key=value")
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="label point clouds (.ply/.npy/.txt) -> .npy labels + coloured .ply")
    pr.add_argument("--ckpt", required=True)
    pr.add_argument("input", nargs="+")
    pr.add_argument("--out", default="predictions")
    pr.add_argument("--tta", action="store_true")
    pr.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    pr.set_defaults(func=cmd_predict)

    for name in COMMAND_MODULES:  # imported here: the command modules import add_common from this module
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    # key=value overrides may come anywhere on the line (before or after options).
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s")
    try:
        return int(args.func(args) or 0)
    except HaskdError as e:
        print(f"haskd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("haskd: interrupted", file=sys.stderr)
        return 130
