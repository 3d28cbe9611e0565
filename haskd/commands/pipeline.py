"""``haskd pipeline``, ``haskd demo`` and ``haskd ablate``."""
from __future__ import annotations

import argparse
import copy
import logging
import os
from pathlib import Path

from .args import positive_int
from .train import add_common, config_from_args

log = logging.getLogger(__name__)

DEMO_PRESET = "synthetic_bench"
HASKD_PRESET = "scannet20_haskd"
# The built-in default: the synthetic benchmark's preset and generator on half its training rooms (24 train / 8 val
# with RGB-D frames, generator seed 1): with the hint term on, the benchmark's full 48 rooms take ~20 min on 2 cores,
# over the demo's 15-minute budget. `--rooms 48,8,1` is seed 0 of docs/benchmarks.md; `--config demo_synthetic
# --rooms 16,4,0` is the first demo (16 + 4 rooms).
DEMO_ROOMS = "24,8,1"


def register(sub):
    p = sub.add_parser("pipeline", help="teacher -> student stage 1 -> experts -> HAS-KD student (+ baseline)",
                       description=(
        f"The whole HAS-KD recipe as resumable stages (config default: {HASKD_PRESET}); a finished stage is\n"
        "skipped on a rerun, an interrupted one resumes.\n\n"
        "Reads:  scene folders <DATA>/<split>/<scene>/ with frames/ (or virtual views, cached) for the teacher.\n"
        "Writes: OUT/{teacher,baseline,stage1,student}/ run folders (checkpoints, soft-label caches beside the\n"
        "        teacher and stage 1), OUT/stage1/experts.json, OUT/summary.json, OUT/report.html + OUT/report/.\n"
        "Prints: a line per stage (stage i/n, elapsed, estimate), per epoch, then the results tables (percent)."))
    add_common(p, out_default="runs/pipeline")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline (the reference student)")
    p.set_defaults(func=run_pipeline_cmd)

    d = sub.add_parser("demo", help="the whole pipeline on built-in synthetic rooms; prints the results table",
                       description=(
        "What `make demo` runs: generate synthetic rooms, then the whole pipeline on them.\n\n"
        "Reads:  nothing (the rooms are generated).\n"
        "Writes: everything under OUT (default runs/demo): the rooms in OUT/data_<TRAIN>_<VAL>_<SEED>/, the run in\n"
        "        OUT/<config>_<TRAIN>_<VAL>_<SEED>_seed<S>/ (report.html there). It prints the disk it used at the\n"
        "        end; `rm -rf OUT` frees it.\n"
        "Prints: a line per stage (stage i/n, elapsed, estimate), per epoch, then the results tables (percent)."))
    d.add_argument("--out", default="runs/demo", help="output folder")
    d.add_argument("--config", default=DEMO_PRESET, help=f"preset or YAML file (default {DEMO_PRESET})")
    d.add_argument("--rooms", type=_rooms, default=_rooms(DEMO_ROOMS), metavar="TRAIN,VAL,SEED",
                   help=f"synthetic rooms to generate and their generator seed (default {DEMO_ROOMS})")
    d.add_argument("--seed", type=int, default=0, help="training seed")
    d.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs of every stage, teacher included (default: the preset's)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    d.set_defaults(func=run_demo)

    a = sub.add_parser("ablate", help="baseline | +IHD (uniform) | +IHD (IOF) | +ASD only | HAS-KD over seeds",
                       description=(
        f"The ablation table over seeds (config default: {HASKD_PRESET}); finished runs are reused.\n\n"
        "Reads:  scene folders <DATA>/<split>/<scene>/ (with frames/ or rendered virtual views, cached).\n"
        "Writes: OUT/seed<S>/... run folders, OUT/ablation.md and OUT/ablation.json (ablation_<split>.* with\n"
        "        --split, ablation_<split>_<DIR>.* with --split-data DIR); mIoU in percent.\n"
        "Prints: the ablation table and the per-class table (mean +- std over seeds, percent)."))
    add_common(a, out_default="runs/ablate")
    a.add_argument("--seeds", type=_seed_list, default=(0, 1, 2),
                   help="N (seeds 0..N-1) or a comma list such as 1,2 (finished runs are reused, so seeds can run "
                        "in separate processes into one --out and a last call with all of them writes the table)")
    a.add_argument("--split", default=None,
                   help="split the table reports (default: data.val_split). Experts and every stage still use val; "
                        "a held-out split (`prepare synthetic --test N`) keeps choices made on val out of the numbers")
    a.add_argument("--split-data", default=None, metavar="DIR",
                   help="read the --split rooms from DIR/<split>/ instead of --data: more held-out rooms made "
                        "apart, e.g. `prepare synthetic --out DIR --train 0 --val 0 --test 48 --seed 2`; nothing is "
                        "trained on them. The table is ablation_<split>_<DIR's name>.*")
    a.add_argument("--jobs", type=positive_int, default=1,
                   help="seeds trained side by side in that many processes, each with cores/N torch threads "
                        "(default 1). Each seed's runs are what `--seeds S, train.threads=cores/N` gives alone")
    a.add_argument("--ensemble", action="store_true",
                   help="add the row 'M-snapshot ensemble': the mean softmax of the stage-1 snapshots, to set "
                        "against its final model, the '+IHD (IOF)' row")
    a.add_argument("--image-control", action="store_true",
                   help="add the row '+IHD (3D head: no image)': stage 1 distilling the teacher's points-only "
                        "head (distill.teacher_head=3d), same soft labels, gate and seed; '+IHD (IOF)' minus it is "
                        "what the images themselves give the student")
    a.add_argument("--double-baseline", action="store_true",
                   help="add the row 'baseline (2E)': the baseline trained twice train.epochs (has it plateaued?)")
    a.add_argument("--equal-time-epochs", type=positive_int, default=None, metavar="N",
                   help="add the row 'baseline (N epochs)': the baseline trained N epochs (N set so its wall time "
                        "matches the HAS-KD student's, stage 1 + final: an equal-time baseline; with "
                        "--double-baseline and N = 2E it is that row); the table then gives every seed's training "
                        "seconds and their ratios")
    a.add_argument("--train-seeds", type=positive_int, default=1, metavar="K",
                   help="train the students' rows (baseline, +IHD (IOF), +ASD only, HAS-KD) K times a seed, with "
                        "train.seed S, S+10, ..., S+10(K-1), from seed S's teacher, into OUT/seed<S>/train_seed<T>/; "
                        "those rows are then compared paired by run over K runs a seed (one config's runs can "
                        "spread by more than the rows differ: docs/benchmarks.md 7f)")
    a.add_argument("--table-only", action="store_true",
                   help="train nothing: the table of the runs in OUT that are finished (e.g. while the others still "
                        "train, or where a row was not run); the rows left out are named under the table")
    # where a per-seed process of --jobs writes its one-seed table (its seed folder), so that it never overwrites
    # the table of all seeds in --out, e.g. the val table while a --split test call runs
    a.add_argument("--table-dir", default=None, help=argparse.SUPPRESS)
    a.set_defaults(func=run_ablate)


def _rooms(text: str) -> tuple:
    import argparse

    try:
        train, val, seed = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VAL,SEED (three integers), got {text!r}") from None
    if train < 1 or val < 1:
        raise argparse.ArgumentTypeError(f"need at least one train and one val room, got {text!r}")
    return train, val, seed


def _seed_list(text: str) -> tuple:
    import argparse

    try:
        if "," in text:
            seeds = tuple(int(t) for t in text.split(",") if t.strip())
        else:
            seeds = tuple(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or a comma list of seeds, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected N >= 1 or non-negative seeds, got {text!r}")
    return seeds


def _default_config(args, preset):
    if args.config is None:
        args.config = preset
    return config_from_args(args)


def run_pipeline_cmd(args) -> int:
    from ..workflow.pipeline import run_pipeline
    from ..workflow.report import per_class_table, results_table

    cfg = _default_config(args, HASKD_PRESET)
    if args.epochs is not None:
        cfg.teacher.epochs = args.epochs
    out = Path(args.out or "runs/pipeline")
    summary = run_pipeline(cfg, out, with_baseline=not args.no_baseline)
    print(results_table(summary))
    print("\n" + per_class_table(summary))
    print(f"\nsummary: {out / 'summary.json'}\nreport:  {out / 'report.html'}")
    return 0


def disk_usage(root) -> dict:
    """Bytes under ``root``: ``total`` and the parts a person may want to delete: ``soft_label_caches``
    (``soft_labels_*`` folders), ``checkpoints`` (``*.pt``), ``rooms`` (``data_*`` folders of the demo)."""
    parts = {"total": 0, "soft_label_caches": 0, "checkpoints": 0, "rooms": 0}
    root = Path(root)
    for f in root.rglob("*"):
        if not f.is_file() or f.is_symlink():
            continue
        n = f.stat().st_size
        rel = f.relative_to(root).parts
        parts["total"] += n
        if any(p.startswith("soft_labels_") for p in rel[:-1]):
            parts["soft_label_caches"] += n
        elif f.suffix == ".pt":
            parts["checkpoints"] += n
        elif rel[0].startswith("data_"):
            parts["rooms"] += n
    return parts


def disk_line(root) -> str:
    """``disk: 528 MB under runs/demo (soft-label caches 335 MB, checkpoints ..., rooms ...); `rm -rf runs/demo`
    frees it``."""
    u = disk_usage(root)
    mb = lambda n: f"{n / 2 ** 20:.0f} MB" if n >= 2 ** 20 else f"{n / 2 ** 10:.0f} KB"
    detail = ", ".join(f"{k.replace('_', ' ')} {mb(v)}" for k, v in u.items() if k != "total" and v)
    return f"disk: {mb(u['total'])} under {root}" + (f" ({detail})" if detail else "") + f"; `rm -rf {root}` frees it"


def run_demo(args) -> int:
    import time

    from ..config import load_config
    from ..data.synthetic import write_dataset
    from ..workflow.pipeline import run_pipeline
    from ..progress import duration
    from ..workflow.report import per_class_table, results_table

    t0 = time.time()
    out = Path(args.out)
    cfg = load_config(args.config, args.overrides)
    n_train, n_val, room_seed = args.rooms
    data = out / f"data_{n_train}_{n_val}_{room_seed}"
    if not (data / "val").is_dir():
        print(f"generating {n_train} + {n_val} synthetic rooms -> {data}", flush=True)
        # one process per core (each room has its own seed, so the files are those of one process)
        write_dataset(data, num_train=n_train, num_val=n_val, seed=room_seed, jobs=os.cpu_count() or 1)
        log.info("rooms ready: elapsed %s", duration(time.time() - t0))
    cfg.data.root = str(data)
    cfg.train.seed = args.seed
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
        cfg.teacher.epochs = args.epochs
    # the rooms are part of the run's name: another --rooms must not resume this run's finished stages
    run = out / f"{Path(args.config).stem}_{n_train}_{n_val}_{room_seed}_seed{args.seed}"
    summary = run_pipeline(cfg, run, started=t0)
    print(f"\nHAS-KD demo on {n_train} + {n_val} synthetic rooms (val split, every point, percent):\n")
    print(results_table(summary))
    print("\n" + per_class_table(summary))
    print(f"\nreport: {run / 'report.html'}   ({duration(time.time() - t0)})")
    print(disk_line(out))
    return 0


def run_ablate(args) -> int:
    from ..workflow.pipeline import run_ablation

    cfg = _default_config(args, HASKD_PRESET)
    if args.epochs is not None:
        cfg.teacher.epochs = args.epochs
    out = Path(args.out or "runs/ablate")
    if args.jobs > 1 and len(args.seeds) > 1 and not args.table_only:
        run_seeds_in_parallel(cfg, out, args.seeds, args.jobs, _extra_row_flags(args))
    table = run_ablation(cfg, out, seeds=args.seeds, split=args.split, ensemble=args.ensemble,
                         double_baseline=args.double_baseline,
                         equal_time_epochs=args.equal_time_epochs,  # reuses the runs the processes finished
                         table_dir=args.table_dir, split_root=args.split_data, train_seeds=args.train_seeds,
                         image_control=args.image_control, train=not args.table_only)
    from ..workflow.pipeline import ablation_markdown, ablation_table_name, per_class_markdown

    print(ablation_markdown(table))
    print("\n" + per_class_markdown(table))
    name = ablation_table_name(cfg, table["split"], args.split_data)
    where = Path(args.table_dir or out)
    print(f"\n{where / (name + '.md')}  {where / (name + '.json')}")
    return 0


def _extra_row_flags(args) -> list:
    """The optional-row flags of ``haskd ablate``, to hand to the per-seed processes (they train those rows too)."""
    flags = ["--ensemble"] * args.ensemble + ["--image-control"] * args.image_control
    flags += ["--double-baseline"] * args.double_baseline
    flags += ["--train-seeds", str(args.train_seeds)] if args.train_seeds > 1 else []
    return flags + (["--equal-time-epochs", str(args.equal_time_epochs)] if args.equal_time_epochs else [])


def run_seeds_in_parallel(cfg, out: Path, seeds, jobs: int, flags=()) -> None:
    """Train every seed of an ablation in its own ``haskd ablate --seeds S,`` process, ``jobs`` at a time, each with
    ``cores // jobs`` torch threads. The runs land where a sequential ablation puts them, so the caller's
    ``run_ablation`` then only reads them. A seed that fails stops the ablation with one line naming its log."""
    import subprocess
    import sys
    import time

    from ..config import save_config
    from ..errors import HaskdError

    jobs = min(jobs, len(seeds))
    child = copy.deepcopy(cfg)
    if child.train.threads <= 0:
        child.train.threads = max(1, (os.cpu_count() or 1) // jobs)
    out.mkdir(parents=True, exist_ok=True)
    conf = out / "ablate_jobs_config.yaml"
    save_config(child, conf)
    pending, running = list(seeds), {}
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            (out / f"seed{seed}").mkdir(parents=True, exist_ok=True)
            logf = out / f"seed{seed}" / "ablate.log"
            cmd = [sys.executable, "-m", "haskd", "ablate", "--config", str(conf), "--out", str(out),
                   "--seeds", f"{seed},", "--table-dir", str(out / f"seed{seed}"), *flags]
            with open(logf, "w") as f:
                running[seed] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT), logf)
            print(f"seed {seed}: training in its own process ({child.train.threads} threads), log {logf}", flush=True)
        time.sleep(1.0)
        for seed, (proc, logf) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[seed]
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.terminate()
                tail = logf.read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise HaskdError(f"seed {seed} failed ({tail[0]}); see {logf}")
            print(f"seed {seed}: done", flush=True)
