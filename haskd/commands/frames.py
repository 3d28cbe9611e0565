"""``haskd frames select|coverage|targets``: IOF frame selection per scene, the point-coverage comparison of policies,
and what a teacher's cached targets (built from its frames) hand the student per class.

A scene folder is ``<root>/<split>/<scene>/`` with ``coord.npy``, ``color.npy`` and optional ``frames/``; scenes
without frames get rendered virtual views (cached outside the data, see :mod:`haskd.images.views`). The points must be
in the frame of the camera poses (raw ScanNet coordinates, not axis-aligned).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from ..errors import HaskdError, InputError

log = logging.getLogger(__name__)


# Why the render step exists (its --help): training never renders.
RENDER_WHY = ("The prepare step for scenes without frames (S3DIS without 2D-3D-S, point-only scans): render virtual "
              "RGB-D\nviews of each frameless scene from its coloured points, so the teacher has images to look at. "
              "Training never\nrenders: a teacher on a scene with neither frames nor rendered views stops with one "
              "line; `haskd pipeline`\nruns this step itself before its teacher.")


def _common(p):
    p.add_argument("--data", required=True, help="data root holding <split>/<scene>/")
    p.add_argument("--split", default="train", help="split folder whose scenes are processed")
    p.add_argument("--stride", type=int, default=1, help="candidate frames: every s-th frame")
    p.add_argument("--voxel-size", type=float, default=0.05, help="voxel size (m) for coverage gains")
    p.add_argument("--tau", type=float, default=0.1, help="depth tolerance (m) of the visibility test")
    p.add_argument("--lam", type=float, default=1.0, help="weight of the uncertainty term (needs --ckpt)")
    p.add_argument("--quality-power", type=float, default=1.0, help="exponent on the sharpness term (0 = off)")
    p.add_argument("--ckpt", default=None, help="3D model checkpoint: its prediction entropy drives the "
                                                "uncertainty term")
    p.add_argument("--num-views", type=int, default=20, help="virtual views rendered for frameless scenes")


def register(subparsers):
    p = subparsers.add_parser("frames", help="frames for the teacher: render virtual views, IOF selection, coverage",
                              description="Frame filtering (IOF) on scene folders; docs/iof.md.")
    sub = p.add_subparsers(dest="frames_cmd", required=True)
    s = sub.add_parser("select", help="choose K frames per scene -> JSON + contact sheets", description=(
        "Choose K frames per scene with a policy (IOF, uniform, random).\n\n"
        "Reads:  <DATA>/<split>/<scene>/ points and frames/ (scenes without frames get virtual views rendered\n"
        "        into a cache folder, $HASKD_CACHE or ~/.cache/haskd; the data are never written to).\n"
        "Writes: OUT/frames_<policy>_k<K>.json ({scene: [frame ids]}) and OUT/<scene>_<policy>.png contact sheets.\n"
        "Prints: per scene the chosen frames and the share of points they see."))
    _common(s)
    s.add_argument("--k", type=int, default=5, help="frames per scene")
    s.add_argument("--policy", default="iof", choices=("iof", "uniform", "random"), help="frame policy")
    s.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    s.add_argument("--out", required=True, help="output folder")
    s.set_defaults(func=run_select)
    c = sub.add_parser("coverage", help="point coverage of frame policies at several K -> Markdown + JSON",
                       description=(
        "Point coverage (share of points seen by the chosen frames) of frame policies at several K.\n\n"
        "Reads:  <DATA>/<split>/<scene>/ points and frames/ (or rendered virtual views, cached).\n"
        "Writes: OUT (a Markdown table, coverage as fractions 0..1) and OUT with .json (per scene and mean).\n"
        "Prints: the table."))
    _common(c)
    c.add_argument("--ks", default="3,5,10", help="comma-separated K values")
    c.add_argument("--policies", default="iof,uniform,random", help="comma-separated frame policies to compare")
    c.add_argument("--seeds", default="0,1,2,3,4", help="seeds averaged for the random policies")
    c.add_argument("--out", required=True, help="Markdown file (a .json with the same stem is written too)")
    c.set_defaults(func=run_coverage)
    t = sub.add_parser("targets", help="per class: what a teacher's soft-label caches hand the student -> "
                                       "Markdown + JSON", description=(
        "Per class, what the soft-label caches of teachers hand a student on a split: the share of the class's\n"
        "points seen in the teacher's frames, the share the unlabeled-point gate keeps (the target's top-1\n"
        "probability >= --gate, as distill.unlabeled_conf; per class with --keep, as distill.unlabeled_keep),\n"
        "how many kept targets name the class, how often a kept target that names the class is right (its\n"
        "precision), and how many targets name it overall.\n"
        "Compare frame policies (IOF vs uniform) or teachers side by side; several folders under one name (e.g.\n"
        "three seeds) are pooled.\n\n"
        "Reads:  each cache folder (a teacher run's soft_labels_* folder) and <DATA>/<split>/<scene>/ labels.\n"
        "Writes: OUT (a Markdown table, fractions 0..1) and OUT with .json (the counts).\n"
        "Prints: the table."))
    t.add_argument("--data", required=True, help="data root holding <split>/<scene>/")
    t.add_argument("--split", default="train", help="split folder the caches were built on")
    t.add_argument("--cache", action="append", required=True, metavar="NAME=DIR[,DIR...]",
                   help="a column: its name and the cache folders pooled under it (repeat the flag per column)")
    t.add_argument("--gate", type=float, default=0.99, help="top-1 probability a target needs to be kept")
    t.add_argument("--tau", type=float, default=1.0, help="temperature of the targets (distill.tau)")
    t.add_argument("--keep", type=float, default=0.0,
                   help="> 0: per-class gates as distill.unlabeled_keep, at most --gate, computed per cache folder")
    t.add_argument("--labeled-points", type=int, default=0,
                   help="with --keep: the gates come from the other points, as data.labeled_points=N trains "
                        "(0: from every point)")
    t.add_argument("--out", required=True, help="Markdown file (a .json with the same stem is written too)")
    t.set_defaults(func=run_targets)
    r = sub.add_parser("render", help="render virtual views for scenes without RGB-D frames (before the teacher)",
                       description=(
        f"{RENDER_WHY}\n\nReads:  <DATA>/<split>/<scene>/ points (scenes with frames/ or frames_virtual/ are left "
        "alone).\nWrites: rendered views into a cache folder ($HASKD_CACHE, else ~/.cache/haskd); the data are never "
        "written to.\nPrints: how many scenes were rendered."))
    r.add_argument("--data", required=True, help="data root holding <split>/<scene>/")
    r.add_argument("--splits", default="train,val", help="comma-separated split folders")
    r.add_argument("--num-views", type=int, default=20, help="views per scene (the config's teacher.virtual_views)")
    r.set_defaults(func=run_render)


def run(args) -> int:
    """Dispatch on ``args.frames_cmd`` (for callers that do not use ``args.func``)."""
    return {"select": run_select, "coverage": run_coverage, "render": run_render}[args.frames_cmd](args)


def run_render(args) -> int:
    from ..images.views import render_missing

    splits = [s for s in args.splits.split(",") if s]
    n = render_missing(args.data, splits, num_views=args.num_views)
    print(f"rendered virtual views for {n} scene(s) under {args.data} ({', '.join(splits)}); the others have frames")
    return 0


def _ints(text, what):
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise HaskdError(f"--{what} must be comma-separated integers, got '{text}'") from None
    if not vals:
        raise HaskdError(f"--{what} is empty")
    return vals


def _entropy_model(ckpt):
    """(model, cfg) from a checkpoint, or None without one (the uncertainty term is then skipped)."""
    if not ckpt:
        return None
    from ..engine.checkpoint import load_model

    model, cfg = load_model(ckpt, return_config=True)
    if getattr(cfg, "role", None) == "teacher":
        log.warning("--ckpt is a teacher; its entropy needs frames, so the uncertainty term is off")
        return None
    return model, cfg


def _point_entropy(model_cfg, scene):
    """(entropy (N,), log C) of the model's per-point prediction, or (None, None)."""
    if model_cfg is None:
        return None, None
    import torch

    from ..engine.evaluate import predict_points

    model, cfg = model_cfg
    with torch.inference_mode():
        p = predict_points(model, scene, cfg.data.voxel_size, cfg.data.num_classes, "cpu", cfg.data.use_normal)
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(1).numpy()
    return ent, math.log(cfg.data.num_classes)


def _scenes(args):
    from ..data.frames import open_frames
    from ..data.scene import list_scenes, load_scene
    from ..images.views import ensure_frames

    for d in list_scenes(args.data, args.split):
        fdir = ensure_frames(d, num_views=args.num_views)
        scene = load_scene(d)
        fs = open_frames(fdir, strict=True)
        if fdir == d / "frames":  # real frames: poses in the input's frame (virtual ones: the scene's own)
            fs.origin = scene.origin
        yield scene, fs


def run_select(args) -> int:
    from ..images.iof import contact_sheet, select_frames

    if args.k < 1:
        raise HaskdError(f"--k must be >= 1, got {args.k}")
    from ..io import make_dir

    mc = _entropy_model(args.ckpt) if args.policy == "iof" else None
    scenes = list(_scenes(args))  # every scene and frame list checked before the output folder is made
    out = make_dir(args.out)
    result = {}
    for scene, fs in scenes:
        ent, emax = _point_entropy(mc, scene)
        r = select_frames(scene.coord, fs, args.k, args.policy, args.voxel_size, args.tau, args.lam, ent,
                          args.seed, args.stride, entropy_max=emax, quality_power=args.quality_power)
        result[scene.name] = r
        sheet = contact_sheet(fs, r["ids"], r["scores"], out / f"{scene.name}_{args.policy}.png",
                              title=f"{scene.name} {args.policy} k={args.k} coverage {r['coverage']:.1%}")
        print(f"{scene.name}: {len(fs.ids)} frames -> {', '.join(r['ids'])} (coverage {r['coverage']:.1%}) "
              f"-> {sheet}")
    path = out / f"frames_{args.policy}_k{args.k}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    print(f"-> {path}")
    return 0


def run_coverage(args) -> int:
    from ..images.iof import POLICIES, build_visibility, select_frames

    ks = _ints(args.ks, "ks")
    seeds = _ints(args.seeds, "seeds")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise HaskdError(f"--policies: unknown {bad or 'empty'} (choose from {', '.join(POLICIES)})")
    mc = _entropy_model(args.ckpt) if "iof" in policies else None
    table = {}                                            # scene -> {"<policy>@<k>": coverage, "frames", "all"}
    for scene, fs in _scenes(args):
        cache = build_visibility(scene.coord, fs, args.voxel_size, args.tau, args.stride)
        ent, emax = _point_entropy(mc, scene)
        row = {"frames": len(cache.ids), "all": cache.coverage(cache.ids)}
        for k in ks:
            for pol in policies:
                # IOF is deterministic; the random baselines are averaged over seeds.
                ss = seeds if pol != "iof" else seeds[:1]
                row[f"{pol}@{k}"] = float(np.mean([
                    select_frames(scene.coord, fs, k, pol, lam=args.lam, point_entropy=ent, seed=s,
                                  entropy_max=emax, quality_power=args.quality_power, cache=cache)["coverage"]
                    for s in ss]))
        table[scene.name] = row
        print(f"{scene.name}: " + "  ".join(f"{c} {v:.3f}" for c, v in row.items() if "@" in c))
    cols = [f"{p}@{k}" for k in ks for p in policies]
    mean = {c: float(np.mean([r[c] for r in table.values()])) for c in cols + ["all"]}
    lines = [
        f"Point coverage (fraction of points seen, |depth - z| < {args.tau} m) of K frames per scene; "
        f"random policies: mean over seeds {','.join(map(str, seeds))}; 'all' = every candidate frame.",
        "",
        "| scene | frames | " + " | ".join(f"{p} K={k}" for k in ks for p in policies) + " | all |",
        "|---|---:|" + "---:|" * (len(cols) + 1),
    ]
    for name, r in table.items():
        lines.append(f"| {name} | {r['frames']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {r['all']:.3f} |")
    lines.append("| **mean** | | " + " | ".join(f"**{mean[c]:.3f}**" for c in cols) + f" | {mean['all']:.3f} |")
    md = Path(args.out)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    md.with_suffix(".json").write_text(json.dumps({"scenes": table, "mean": mean, "ks": ks, "policies": policies,
                                                   "seeds": seeds, "tau": args.tau,
                                                   "voxel_size": args.voxel_size}, indent=1))
    print("\n".join(lines[2:]))
    print(f"-> {md}, {md.with_suffix('.json')}")
    return 0


def _named_caches(specs) -> dict:
    out = {}
    for spec in specs:
        name, sep, dirs = spec.partition("=")
        folders = [Path(d) for d in dirs.split(",") if d.strip()]
        if not sep or not name.strip() or not folders:
            raise HaskdError(f"--cache must be NAME=DIR[,DIR...], got '{spec}'")
        if name in out:
            raise HaskdError(f"--cache: the name '{name}' is given twice")
        out[name] = folders
    return out


def run_targets(args) -> int:
    from ..classes import DATASETS
    from ..data.dataset import sparse_labels
    from ..data.scene import LABEL_FILES, list_scenes
    from ..distill.cache import load_scene_cache
    from ..distill.ihd import TARGET_COUNTS, scene_class_gates, target_counts

    if not 0 <= args.gate < 1 or args.tau <= 0:
        raise HaskdError(f"--gate must be in [0, 1) and --tau > 0, got {args.gate} and {args.tau}")
    if not 0 <= args.keep <= 1 or args.labeled_points < 0:
        raise HaskdError(f"--keep must be in [0, 1] and --labeled-points >= 0, got {args.keep} and "
                         f"{args.labeled_points}")
    caches = _named_caches(args.cache)
    labels = {}
    for d in list_scenes(args.data, args.split):
        f = next((d / n for n in LABEL_FILES if (d / n).is_file()), None)
        if f is None:
            raise InputError(d, f"no labels ({' or '.join(LABEL_FILES)})")
        labels[d.name] = np.load(f)
    counts, gates = {}, {}
    sparse = {n: sparse_labels(n, y, args.labeled_points) if args.labeled_points else None
              for n, y in labels.items()}  # the labels a student of data.labeled_points sees (None: every point)
    for name, folders in caches.items():
        total = 0
        for folder in folders:
            gate = args.gate
            if args.keep > 0:  # the folder's own gates, as its student trains with them
                c = int(load_scene_cache(folder, next(iter(labels)))["num_classes"])
                gate = scene_class_gates(((load_scene_cache(folder, n, expected_points=len(y)), sparse[n])
                                          for n, y in labels.items()), c, args.keep, args.gate, args.tau)
                gates.setdefault(name, []).append(gate.tolist())
            for scene, y in labels.items():
                total = total + target_counts(load_scene_cache(folder, scene, expected_points=len(y)), y,
                                              gate, args.tau)
        counts[name] = total
    c = next(iter(counts.values())).shape[0]
    names = next((list(v["classes"]) for v in DATASETS.values() if len(v["classes"]) == c), [str(i) for i in range(c)])
    cols = ("seen", "kept", "kept right", "kept precision", "top-1 right")
    per_class = ""
    if args.keep:
        per_class = f", lowered per class until it keeps {args.keep:g} of the targets naming the class" + (
            f" on the points other than {args.labeled_points} labelled a scene" if args.labeled_points else "")
    lines = [
        f"What the teachers' cached targets hand the student on the {len(labels)} '{args.split}' scenes of "
        f"{args.data}, per class: share of its points seen in the frames; share kept by the gate (top-1 probability "
        f">= {args.gate} at tau {args.tau}{per_class}); of those kept, share whose target names the class; of the "
        "kept targets that name the class (on points of any class), share right; share of all whose target names it.",
        "",
        "| class | points | " + " | ".join(f"{n}: {col}" for n in counts for col in cols) + " |",
        "|---|---:|" + "---:|" * (len(cols) * len(counts)),
    ]
    points = sum(np.bincount(y[(y >= 0) & (y < c)].astype(np.int64), minlength=c) for y in labels.values())
    for k in range(c):
        if points[k] == 0:
            continue
        cells = []
        for n in counts:
            pts, seen, kept, kept_right, right, named = (int(v) for v in counts[n][k])
            cells += [f"{seen / pts:.3f}", f"{kept / pts:.3f}", f"{kept_right / kept:.3f}" if kept else "-",
                      f"{kept_right / named:.3f}" if named else "-", f"{right / pts:.3f}"]
        lines.append(f"| {names[k]} | {int(points[k])} | " + " | ".join(cells) + " |")
    md = Path(args.out)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    md.with_suffix(".json").write_text(json.dumps({
        "columns": list(TARGET_COUNTS), "classes": names, "gate": args.gate, "tau": args.tau, "split": args.split,
        "caches": {n: [str(f) for f in caches[n]] for n in counts}, "keep": args.keep,
        "labeled_points": args.labeled_points, "gates": gates,
        "counts": {n: counts[n].tolist() for n in counts}}, indent=1))
    print("\n".join(lines[2:]))
    print(f"-> {md}, {md.with_suffix('.json')}")
    return 0
