"""``haskd train``, ``eval`` and ``predict``: the commands of one model; and the options every training command shares
(``--config --data --out --epochs --seed --device key=value``) with the config they give (``pipeline``, ``demo`` and
``ablate`` take them from here)."""
from __future__ import annotations

import json
import os

from ..config import CHOICES, load_config
from ..errors import HaskdError
from .args import SCENES_IN, positive_int


def add_common(p, data_required=False, out_default=None):
    p.add_argument("--config", default=None, help="YAML config or preset name from haskd/configs/ (default: "
                   "scannet20_student for train; each command's description names its own)")
    p.add_argument("--data", default=None, required=data_required,
                   help="data root holding <split>/<scene>/ (default: the config's data.root)")
    p.add_argument("--out", default=None, help=f"output folder (default: {out_default or 'the command default'})")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: the config's train.epochs)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the config's train.seed)")
    p.add_argument("--device", default=None, choices=CHOICES["train.device"],
                   help="default: the config's train.device (auto: cuda when available)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. optim.lr=0.01 model.preset=tiny (an unknown key lists the valid ones)")


def config_from_args(args):
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


def register(sub):
    t = sub.add_parser("train", help="train a student (or a teacher with role=teacher)", description=(
        "Train a point-only student (or the multi-modal teacher with role=teacher) from a config.\n\n"
        f"Reads:  {SCENES_IN};\n"
        "        a teacher also reads each scene's frames/ (or renders virtual views into a cache\n"
        "        folder, $HASKD_CACHE or ~/.cache/haskd; the data are never written to).\n"
        "Writes: OUT/config.yaml (resolved), last.pt (every epoch), best.pt, metrics.jsonl, tb/ (TensorBoard),\n"
        "        val_metrics.json, snapshots/ (with train.snapshots=M), frames.json (teacher).\n"
        "A folder that holds a run is refused unless --resume or --overwrite; one live run per folder.\n"
        "Prints: one line per epoch (loss, val mIoU in percent, time), then the final val metrics."))
    add_common(t, out_default="runs/train")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in OUT exactly (RNG, optimizer, epoch) with its own settings; a larger "
                        "--epochs extends it (the learning-rate schedule is rebuilt for the new length)")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in OUT (default: refused)")
    t.add_argument("--no-progress", action="store_true", help="no per-step progress bar on a terminal")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on every original point of a split", description=(
        "Evaluate a checkpoint on every original point of a split (full resolution).\n\n"
        "Reads:  --ckpt (its config rebuilds the model), the split's scene folders under --data.\n"
        "Writes: --out JSON (fractions 0..1, confusion matrix) when given; nothing otherwise.\n"
        "Prints: mIoU / mAcc / allAcc and per-class IoU, in percent."))
    e.add_argument("--ckpt", required=True, help="checkpoint (last.pt / best.pt of a run)")
    e.add_argument("--data", default=None, help="data root (default: the checkpoint's data.root)")
    e.add_argument("--split", default="val", help="split folder to score")
    e.add_argument("--out", default=None, help="metrics JSON path (default: print only)")
    e.add_argument("--tta", action="store_true", help="also report 4-rotation TTA (separately)")
    e.add_argument("--voting", action="store_true",
                   help="also report Pointcept's test: fragment voting over its test-time augmentations "
                        "(data.vote_augs; 13 for ScanNet, 10 for S3DIS), separately")
    e.add_argument("--ensemble", action="store_true",
                   help="also report the mean softmax of the run's snapshots (snapshots/epoch_*.pt beside --ckpt): "
                        "do the snapshots ASD distils from know more together than the final model?")
    e.add_argument("--device", default=None, choices=CHOICES["train.device"], help="default: auto")
    e.add_argument("--module", default="", metavar="FILE_OR_MODULE",
                    help="your model's Python file or module, imported first (a checkpoint's own model.module is "
                         "never imported: it could name any file)")
    e.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. data.voxel_size)")
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="label point clouds (.ply/.npy/.txt) -> .npy labels + coloured .ply",
                        description=(
        "Label point clouds with a trained point-only student.\n\n"
        "Reads:  INPUT files: .ply (vertex x y z, optional red green blue or diffuse_red..., nx ny nz or a mesh's\n"
        "        faces), .npy ((N,3) xyz, (N,6) xyz rgb or (N,9) xyz rgb normal), .txt / .xyz (one point per line:\n"
        "        x y z [r g b [nx ny nz]]); colours 0..255 or 0..1; metres. A model trained with normals needs them.\n"
        "Writes: OUT/<name>_labels.npy ((N,) int class ids, input order) and OUT/<name>_pred.ply (coloured by\n"
        "        class, with a 'label' property), OUT defaulting to predictions/.\n"
        "Prints: per file, the point count, the two paths and how many points each class got.\n"
        "Try it: `haskd prepare sample-ply --out my_scan.ply` cuts a small real ScanNet room from ../shared/data."))
    pr.add_argument("--ckpt", required=True, help="student checkpoint (a teacher is refused)")
    pr.add_argument("input", nargs="+", help="point cloud files (.ply, .npy, .txt, .xyz)")
    pr.add_argument("--out", default="predictions", help="output folder")
    pr.add_argument("--tta", action="store_true", help="average 4 z-rotations")
    pr.add_argument("--device", default=None, choices=CHOICES["train.device"], help="default: auto")
    pr.add_argument("--module", default="", metavar="FILE_OR_MODULE",
                    help="your model's Python file or module, imported first (a checkpoint's own model.module is "
                         "never imported: it could name any file)")
    pr.set_defaults(func=cmd_predict)


def cmd_train(args):
    from pathlib import Path

    from ..workflow.train import train

    out = args.out or "runs/train"
    if args.resume and args.config is None and (Path(out) / "config.yaml").is_file():
        args.config = str(Path(out) / "config.yaml")  # a resume continues with the run's own settings
    cfg = config_from_args(args)
    metrics = train(cfg, out, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":  # under torchrun the main process alone reports (the group is gone)
        return 0
    if metrics:
        print(f"val mIoU {100 * metrics['miou']:.2f}%  mAcc {100 * metrics['macc']:.2f}%  "
              f"allAcc {100 * metrics['allacc']:.2f}%  -> {out}")
    else:
        print(f"trained without validation -> {out}")
    return 0


# Settings that define a checkpoint's network: an eval override may not change them (it would be silently ignored).
CHECKPOINT_FIXED = (("model", "name"), ("model", "preset"), ("model", "kwargs"), ("data", "use_normal"),
                    ("data", "num_classes"))


def cmd_eval(args):
    from pathlib import Path

    import torch

    from ..data.dataset import SceneDataset
    from ..engine.checkpoint import load_model
    from ..engine.distributed import setup
    from ..engine.evaluate import evaluate
    from ..config import apply_overrides, check_config
    from ..workflow.report import format_metrics

    module = args.module
    for item in args.overrides:  # model.module=FILE on the command line is the user's own choice, like --module
        if item.startswith("model.module="):
            module = item.split("=", 1)[1]
    model, cfg = load_model(args.ckpt, return_config=True, module=module)
    before = cfg.to_dict()
    apply_overrides(cfg, [o for o in args.overrides if not o.startswith("model.module=")])
    after = cfg.to_dict()
    for sec, key in CHECKPOINT_FIXED:
        if before[sec][key] != after[sec][key]:
            raise HaskdError(f"{args.ckpt}: {sec}.{key}={after[sec][key]!r} disagrees with the checkpoint's "
                             f"{before[sec][key]!r}; the network is rebuilt as stored (drop the override)")
    check_config(cfg)
    snaps = None
    if args.ensemble:  # a run without snapshots fails now, not after the evaluation
        from ..workflow.runs import find_snapshots

        snaps = find_snapshots(Path(args.ckpt).parent)
    if args.out:  # an unwritable --out fails now, not after the evaluation
        from ..io import make_dir

        make_dir(Path(args.out).parent)
    device = setup(args.device or "auto", 0)
    model.to(device)
    root = args.data or cfg.data.root
    ds = SceneDataset(root, args.split, cfg.data.num_classes, cfg.data.voxel_size, use_normal=cfg.data.use_normal)
    if cfg.role == "teacher":
        from ..images.provider import FrameProvider

        ds = ds.with_frames(FrameProvider.from_config(cfg))
    with torch.inference_mode():
        m = evaluate(model, ds, device, cfg.data.dataset, progress=True)
    result = {k: m[k] for k in ("miou", "macc", "allacc", "per_class_iou")}
    result.update(confusion=m["confusion"], per_class_acc=m["per_class_acc"], split=args.split,
                  ckpt=str(args.ckpt), num_points=m["num_points"])
    if args.tta:
        with torch.inference_mode():
            t = evaluate(model, ds, device, cfg.data.dataset, tta=True)
        result["tta"] = {k: t[k] for k in ("miou", "macc", "allacc", "per_class_iou")}
    if args.voting:
        from ..engine.voting import voting_augs

        augs = voting_augs(cfg.data.vote_augs, cfg.data.dataset)
        with torch.inference_mode():
            v = evaluate(model, ds, device, cfg.data.dataset, progress=True, voting=augs)
        result["voting"] = {k: v[k] for k in ("miou", "macc", "allacc", "per_class_iou", "min_votes",
                                              "augmentations")}
    if snaps:
        from ..workflow.runs import evaluate_ensemble

        ens = evaluate_ensemble(snaps, root, args.split, str(device), progress=True)
        result["ensemble"] = {k: ens[k] for k in ("miou", "macc", "allacc", "per_class_iou", "members")}
    print(format_metrics(result))
    if "ensemble" in result:
        en = result["ensemble"]
        print(f"\nensemble of {len(en['members'])} snapshots (mean softmax): mIoU {100 * en['miou']:.2f}%  "
              f"mAcc {100 * en['macc']:.2f}%  allAcc {100 * en['allacc']:.2f}%  "
              f"({100 * (en['miou'] - result['miou']):+.2f} mIoU against --ckpt)")
    if "voting" in result:
        v = result["voting"]
        print(f"\nwith fragment voting ({v['augmentations']} augmentations, every point voted at least "
              f"{v['min_votes']} times): mIoU {100 * v['miou']:.2f}%  mAcc {100 * v['macc']:.2f}%  "
              f"allAcc {100 * v['allacc']:.2f}%")
    if args.out:
        from ..io import write_text

        write_text(args.out, json.dumps(result, indent=1))
    return 0


def cmd_predict(args):
    from pathlib import Path

    from ..engine.checkpoint import load_model
    from ..engine.distributed import setup
    from ..engine.predict import predict_file

    seen = {}
    for inp in args.input:  # outputs are named after the input's stem: two inputs must not share one
        prev = seen.setdefault(Path(inp).stem, inp)
        if prev != inp:
            raise HaskdError(f"{prev} and {inp} would write the same output names ({Path(inp).stem}_labels.npy, "
                             f"{Path(inp).stem}_pred.ply); label them in separate calls with different --out")
        if list(args.input).count(inp) > 1:
            raise HaskdError(f"{inp} is given twice")
    model, cfg = load_model(args.ckpt, return_config=True, module=args.module)
    if cfg.role == "teacher":
        raise HaskdError(f"{args.ckpt}: is a teacher checkpoint; predict runs point-only students")
    device = setup(args.device or "auto", 0)
    model.to(device)
    for inp in args.input:
        r = predict_file(model, cfg, inp, args.out, device, tta=args.tta)
        print(f"{inp}: {r['points']} points -> {r['labels']}, {r['ply']}")
        print(class_counts_text(r["class_counts"], r["points"]))
    return 0


def class_counts_text(counts: dict, total: int) -> str:
    """Per-class point counts, most frequent first, with their share in percent (one class per line)."""
    width = max((len(k) for k in counts), default=0)
    return "\n".join(f"  {name:<{width}}  {n:>9,d} points  {100 * n / max(total, 1):5.1f}%"
                     for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
