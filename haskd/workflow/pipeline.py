"""The whole HAS-KD recipe as resumable stages (METHOD.md "Pipeline"):

1. ``teacher``   multi-modal teacher (points + K frames chosen by the frame filter)
2. ``baseline``  the point-only student trained alone (same budget) -- the reference
3. ``stage1``    student with CE + IHD, saving M snapshots
4. ``experts``   per-class IoU of each snapshot on val -> expert table (with the teacher's per-class val IoU)
5. ``student``   final student with CE + IHD + ASD
Then ``summary.json`` (checkpoint + val metrics of baseline / teacher / student) and ``report.html``.
A stage whose run folder already holds its final metrics is skipped; an interrupted one resumes from last.pt.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Optional

from ..config import Config, point_only, save_config, with_teacher
from ..engine.checkpoint import load_checkpoint, load_model
from ..errors import HaskdError
from .runs import ensemble_metrics, eval_teacher_3d, split_metrics, train_seconds

log = logging.getLogger(__name__)

STAGES = ("teacher", "baseline", "stage1", "experts", "student")


def stage_configs(cfg: Config, out: Path, variant: dict = None, baseline: Path = None, teacher_run: Path = None
                  ) -> dict:
    """Configs of the training stages. ``variant`` switches parts off for ablations:
    ``ihd`` (bool), ``asd`` (bool), ``frame_policy`` (str). ``baseline``: the baseline run that
    ``teacher.init_3d=baseline`` starts the teacher's 3D branch from (default ``out/baseline``). ``teacher_run``:
    the teacher run the students distil from (default ``out/teacher``)."""
    v = {"ihd": True, "asd": True, "frame_policy": cfg.teacher.frame_policy, **(variant or {})}
    teacher = point_only(cfg)
    teacher.role = "teacher"
    teacher.teacher.frame_policy = v["frame_policy"]
    if cfg.teacher.init_3d == "baseline":
        teacher.teacher.init_3d = str(Path(baseline or out / "baseline") / "last.pt")
    if cfg.teacher.model_preset:
        teacher.model.preset = cfg.teacher.model_preset
    if cfg.teacher.epochs:
        teacher.train.epochs = cfg.teacher.epochs
    baseline = point_only(cfg)
    if v["asd"] and expert_run(cfg) == "baseline":
        baseline.train.snapshots = cfg.train.snapshots or 5  # its snapshots are the final student's experts
    teacher_ckpt = Path(teacher_run or out / "teacher") / "last.pt"
    stage1 = point_only(cfg)
    if v["ihd"]:
        with_teacher(stage1, cfg, teacher_ckpt)
    stage1.train.snapshots = cfg.train.snapshots or 5
    student = point_only(cfg)
    if v["ihd"]:
        with_teacher(student, cfg, teacher_ckpt)
    if v["asd"]:
        student.distill.experts = str(out / expert_run(cfg) / "experts.json")
    return {"teacher": teacher, "baseline": baseline, "stage1": stage1, "student": student}


def expert_run(cfg: Config) -> str:
    """The run whose snapshots are the final student's ASD experts: ``stage1`` (METHOD.md) or, with
    ``distill.asd_source=baseline`` (ours), the point-only ``baseline``."""
    return "baseline" if cfg.distill.asd_source == "baseline" else "stage1"


def _done(run_dir: Path, epochs: int) -> bool:
    last = run_dir / "last.pt"
    if not (run_dir / "val_metrics.json").is_file() or not last.is_file():
        return False
    return int(load_checkpoint(last).get("epoch", 0)) >= epochs


def _finished(run_dir: Path, epochs: int) -> Optional[dict]:
    """The val metrics of a run that has trained ``epochs``, or None."""
    return json.loads((run_dir / "val_metrics.json").read_text()) if _done(run_dir, epochs) else None


def run_stage(name, cfg: Config, run_dir: Path, progress=True) -> dict:
    from .train import train

    done = _finished(run_dir, cfg.train.epochs)
    if done is not None:
        log.info("[%s] done already: %s", name, run_dir)
        return done
    log.info("[%s] training -> %s", name, run_dir)
    return train(cfg, run_dir, resume="auto", progress=progress)


def _stage_or_finished(name, cfg: Config, run_dir: Path, progress=True, train=True) -> Optional[dict]:
    """:func:`run_stage`, or with ``train=False`` (``haskd ablate --table-only``) the run's val metrics only if it is
    finished, None if not: nothing is trained."""
    return run_stage(name, cfg, run_dir, progress) if train else _finished(run_dir, cfg.train.epochs)


def _baseline_child(cfg_dict: dict, run_dir: str) -> None:
    """Entry point of the baseline's own process (spawned): one-line errors, epoch lines prefixed with the stage."""
    import sys

    from ..config import from_dict

    logging.basicConfig(level=logging.INFO, format="[baseline] %(message)s", stream=sys.stderr)
    try:
        run_stage("baseline", from_dict(cfg_dict), Path(run_dir), progress=False)
    except HaskdError as e:
        print(f"haskd: error: {e}", file=sys.stderr)
        sys.exit(2)


def _start_baseline_beside(cfg: Config, cfgs: dict, out: Path):
    """The baseline does not depend on the teacher: train it in a process of its own while the teacher trains here,
    each with half the cores (``train.parallel_stages``; on 2 cores a second torch thread barely speeds up a step,
    a second process doubles the work done). Returns the process, or None where the stages run one after the other:
    the option off, a distributed run, one core, or either stage already finished."""
    import multiprocessing as mp
    import os

    from ..engine.distributed import world_size

    cores = os.cpu_count() or 1
    if not cfg.train.parallel_stages or world_size() > 1 or cores < 2 \
            or _done(out / "teacher", cfgs["teacher"].train.epochs) \
            or _done(out / "baseline", cfgs["baseline"].train.epochs):
        return None
    for name in ("teacher", "baseline"):
        if cfgs[name].train.threads <= 0:
            cfgs[name].train.threads = max(1, cores // 2)
    log.info("[baseline] training in its own process beside the teacher (%d threads each) -> %s",
             cfgs["baseline"].train.threads, out / "baseline")
    # spawn, not fork: this process holds torch's thread pools, which a fork does not carry over
    proc = mp.get_context("spawn").Process(target=_baseline_child,
                                           args=(cfgs["baseline"].to_dict(), str(out / "baseline")))
    proc.start()
    return proc


def _join_baseline(proc) -> None:
    proc.join()
    if proc.exitcode != 0:
        raise HaskdError(f"the baseline stage failed in its own process (exit code {proc.exitcode}, its error is "
                         "above); a rerun continues it")


def _render_views(cfg: Config, progress: bool) -> None:
    """Virtual views for the train and val scenes that have no frames (``haskd frames render``), before the
    teacher needs them; on the main rank, the others wait."""
    from ..engine.distributed import barrier, is_main
    from ..images.views import render_missing

    if is_main():
        n = render_missing(cfg.data.root, [cfg.data.train_split, cfg.data.val_split], cfg.teacher.virtual_views,
                           progress)
        if n:
            log.info("[teacher] rendered virtual views for %d scene(s) without frames", n)
    barrier()


def _check_splits(cfg: Config, *more, root=None) -> None:
    """A missing or empty train/val split (or one of ``more``, read from ``root``, default the data root) stops a
    multi-stage run with one line before any folder is made."""
    from ..data.scene import list_scenes

    for split in (cfg.data.train_split, cfg.data.val_split):
        list_scenes(cfg.data.root, split)
    for split in filter(None, more):
        list_scenes(root or cfg.data.root, split)


def run_pipeline(cfg: Config, out, variant: dict = None, with_baseline=True, progress=True, report=True,
                 started: float = None) -> dict:
    """Run every stage (skipping finished ones); returns the summary dict (also written to OUT/summary.json).

    Before each stage one line gives the overall progress (``stage 2/5 baseline: elapsed 3m05s, about 7m10s
    left``, :class:`haskd.progress.StageClock`: each stage weighted by its epochs, teacher and student epochs priced
    apart); ``started`` (a ``time.time()``) counts earlier work (the demo's room generation) in the elapsed time."""
    from ..engine.distributed import barrier, is_main
    from .experts import asd_pointless, build_expert_table
    from ..progress import StageClock

    _check_splits(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    v = {"ihd": True, "asd": True, **(variant or {})}
    cfgs = stage_configs(cfg, out, v)
    # teacher.init_3d=baseline: the teacher's 3D branch starts from this run's baseline, trained first
    after_baseline = v["ihd"] and cfg.teacher.init_3d == "baseline"
    if after_baseline and not with_baseline:
        raise HaskdError("teacher.init_3d=baseline starts the teacher from the pipeline's own baseline: drop "
                         "--no-baseline, or give teacher.init_3d a point-only checkpoint")
    if v["asd"] and expert_run(cfg) == "baseline" and not with_baseline:
        raise HaskdError("distill.asd_source=baseline distils the baseline's snapshots: drop --no-baseline")
    # weights: epochs; a teacher epoch (images) and a student epoch are priced apart
    first = [("teacher", cfgs["teacher"].train.epochs, "teacher")] if v["ihd"] else []
    first += [("baseline", cfgs["baseline"].train.epochs, "student")] if with_baseline else []
    plan = (first[::-1] if after_baseline else first) \
        + [("stage1", cfgs["stage1"].train.epochs, "student")] \
        + ([("experts", 0, "experts"), ("student", cfgs["student"].train.epochs, "student")] if v["asd"] else [])
    clock = StageClock(plan, started=started, logger=log if is_main() else None)

    def stage(name):
        clock.start(name)
        ran = not _done(out / name, cfgs[name].train.epochs)
        metrics = run_stage(name, cfgs[name], out / name, progress)
        clock.done(name, ran)
        return metrics

    summary = {"config": str(out / "config.yaml"), "variant": v}
    if v["ihd"]:  # the prepare step of frameless scenes: training never renders
        _render_views(cfg, progress)
    beside = _start_baseline_beside(cfg, cfgs, out) if v["ihd"] and with_baseline and not after_baseline else None
    if v["ihd"] and not after_baseline:
        summary["teacher"] = _entry(out / "teacher", stage("teacher"))
    if beside is not None:
        _join_baseline(beside)
    if with_baseline:
        summary["baseline"] = _entry(out / "baseline", stage("baseline"))
    if after_baseline:
        summary["teacher"] = _entry(out / "teacher", stage("teacher"))
    if v["asd"]:
        # distill.asd_source=baseline: the final student's experts are the baseline's snapshots, so stage 1 trains
        # only when the final student would be stage 1 (the table gives the snapshots no class)
        stage1 = None
        if expert_run(cfg) == "baseline":
            clock.start("stage1")
            clock.done("stage1", False)
        else:
            stage1 = stage("stage1")
        exp = Path(cfgs["student"].distill.experts)
        teacher = out / "teacher" if v["ihd"] else None
        clock.start("experts")
        stale = _stale_table(exp, teacher)
        if stale and is_main():
            build_expert_table(exp.parent, cfg.data.root, cfg.data.val_split, "cpu"
                               if cfg.train.device in ("auto", "cpu") else cfg.train.device,
                               topk=max(1, cfg.distill.asd_topk), out=exp, progress=progress, teacher=teacher)
        clock.done("experts", stale)
        barrier()  # the other ranks read the table the main one wrote
        summary["experts"] = str(exp)
        reason = asd_pointless(exp, _teacher_routes(cfgs["student"]))
        if reason:  # the "final student" would be stage 1 trained again under another name: keep stage 1
            log.info("[student] not trained, the final student is stage 1: %s", reason)
            summary["student"] = _entry(out / "stage1", stage1 if stage1 is not None else stage("stage1"))
            summary["student_is_stage1"] = reason
            clock.done("student", False)
        else:
            summary["student"] = _entry(out / "student", stage("student"))
    else:
        summary["student"] = _entry(out / "stage1", stage("stage1"))
    if is_main():
        log.info(clock.summary())
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if report:
            from .report import write_report

            write_report(out, summary, cfg)
    return summary


def _teacher_routes(c: Config) -> bool:
    """Whether the teacher takes the classes it is best at from the snapshots in ``c`` (``distill.teacher_expert``
    with a teacher to distil from)."""
    return bool(c.distill.teacher_expert and c.distill.teacher_ckpt)


def _stale_table(path: Path, teacher=None) -> bool:
    """An expert table is (re)built when it is missing, or when it lacks the teacher's row that a teacher run
    can give (tables written before ``distill.teacher_expert`` existed)."""
    if not path.is_file():
        return True
    return teacher is not None and json.loads(path.read_text()).get("teacher_iou") is None


def _entry(run_dir: Path, metrics: dict) -> dict:
    return {"ckpt": str(run_dir / "last.pt"),
            "metrics": {k: metrics[k] for k in ("miou", "macc", "allacc", "per_class_iou") if k in metrics},
            "confusion": metrics.get("confusion")}


ABLATION_ROWS = ("baseline", "+IHD (uniform frames)", "+IHD (IOF)", "+ASD only", "HAS-KD")
TEACHER_ROWS = ("teacher (IOF frames)", "teacher (uniform frames)", "teacher's 3D branch (points only)")


ENSEMBLE_ROW = "M-snapshot ensemble"
CONTROL_ROW = "+IHD (3D head: no image)"  # IHD from the teacher's 3D-branch head: the control for the images' part
DOUBLE_ROW = "baseline (2E)"
STUDENT_PATH = "HAS-KD student (stage 1 + final)"  # the training a HAS-KD student costs beside its teacher
# (with distill.asd_source=baseline its "stage 1" is the baseline, whose snapshots are the experts)


def equal_time_row(epochs: int) -> str:
    return f"baseline ({int(epochs)} epochs)"


RESEEDED_ROWS = ("baseline", "+IHD (IOF)", "+ASD only", "HAS-KD")  # the students' rows, over training seeds too


def train_seed_list(seed: int, train_seeds: int) -> list:
    """The ``train.seed`` values of ablation seed ``seed``'s student runs: ``seed``, then ``seed + 10 k``."""
    return [seed + 10 * k for k in range(max(1, int(train_seeds)))]


def _asd_rows(c: Config, d: Path, student: Config, teacher: Path, dev, progress, train=True) -> tuple:
    """The expert tables of ``d/baseline`` and ``d/stage1`` (built when missing or stale), then "HAS-KD"
    (``student``) and "+ASD only" (the baseline distilling its own snapshots). Returns ``(runs, kept)``: an ASD
    row whose expert table gives no class to any snapshot would retrain its stage 1, so it is not trained and
    ``kept`` maps it to ``(the row it is, why)``. ``train=False``: no table is built and nothing trained; a row is
    its finished run, or None."""
    from .experts import asd_pointless, build_expert_table

    # the table of the final student's experts names the teacher (for distill.teacher_expert)
    for run_dir, t in ((d / "baseline", teacher if expert_run(c) == "baseline" else None), (d / "stage1", teacher)):
        if train and _stale_table(run_dir / "experts.json", t):
            build_expert_table(run_dir, c.data.root, c.data.val_split, dev, topk=max(1, c.distill.asd_topk),
                               progress=progress, teacher=t)
    runs, kept = {}, {}
    asd_only = point_only(c)
    asd_only.distill.experts = str(d / "baseline" / "experts.json")
    for row, src, name, rc, run_dir in (("HAS-KD", "+IHD (IOF)", "student", student, d / "student"),
                                        ("+ASD only", "baseline", "asd-only", asd_only, d / "asd_only")):
        why = asd_pointless(rc.distill.experts, _teacher_routes(rc)) if train or Path(
            rc.distill.experts).is_file() else ""
        if why:
            kept[row] = (src, why)
        else:
            runs[row] = _stage_or_finished(name, rc, run_dir, progress, train)
    return runs, kept


def run_ablation(cfg: Config, out, seeds=(0, 1, 2), progress=True, split=None, ensemble=False,
                 double_baseline=False, equal_time_epochs=None, table_dir=None, split_root=None,
                 train_seeds=1, image_control=False, train=True) -> dict:
    """baseline | +IHD (uniform frames) | +IHD (IOF) | +ASD only | HAS-KD, for each seed; mean +- std.

    Optional rows (after those, all off by default): ``ensemble`` "M-snapshot ensemble" (the mean softmax of the
    stage-1 snapshots, :func:`ensemble_metrics`; the final model it is measured against is "+IHD (IOF)"),
    ``image_control`` "+IHD (3D head: no image)" (:data:`CONTROL_ROW`: stage 1's config with
    ``distill.teacher_head=3d``, in ``seed<S>/stage1_3d``: the same teacher, soft labels, gate and student seed, but
    the targets come from the teacher's points-only head, so "+IHD (IOF)" minus it is what the images themselves
    give the student),
    ``double_baseline`` "baseline (2E)" (the baseline's config trained ``2 * train.epochs``) and
    ``equal_time_epochs=N`` "baseline (N epochs)" (the same, ``N`` epochs: N chosen so that its wall time matches
    the HAS-KD student's). A baseline of as many epochs as the baseline row is that row; with ``double_baseline``
    and N = 2E the equal-time row is "baseline (2E)" (one row, its times set against the student's).

    Shared work is not repeated: the baseline run saves the snapshots that "+ASD only" distils from, and the
    stage-1 student of HAS-KD (CE + IHD with IOF frames) is the "+IHD (IOF)" row.
    ``split``: the split the table reports (default ``data.val_split``); every stage and the expert tables use val
    whatever it is. Another split's table goes to ``ablation_<split>.md/json`` beside the val one, in ``table_dir``
    (default ``out``). ``split_root``: the reported split's rooms are read from ``split_root/<split>/`` instead of
    ``data.root`` (more held-out rooms, made apart from the training data); its table is
    ``ablation_<split>_<split_root's name>`` (:func:`ablation_table_name`).
    ``train_seeds=K`` > 1: the students' rows (:data:`RESEEDED_ROWS`, and the ensemble of each stage 1) are also
    trained with ``train.seed = seed + 10 k``, k = 1 .. K-1 (:func:`train_seed_list`), from the same seed's teacher,
    in ``out/seed<S>/train_seed<T>/``: one configuration's runs spread by more than the rows differ (docs/
    benchmarks.md 7f), so those rows are compared over K runs a seed, paired by run. Each row's ``runs`` labels its
    values, ``"S"`` or ``"S/T"``.
    ``train=False`` (``haskd ablate --table-only``): nothing is trained (and no expert table or uniform-frame teacher
    built); the table holds the runs that are finished, and ``missing`` names, per row, the runs that are not.
    """
    import numpy as np

    _check_splits(cfg, split or (cfg.data.val_split if split_root else None), root=split_root)
    out = Path(out)
    longer = {}  # row -> epochs of the longer baselines asked for
    if double_baseline:
        longer[DOUBLE_ROW] = 2 * cfg.train.epochs
    # the equal-time row; when its epochs are 2E it is the 2E row, not a second row of the same runs
    et_row = (DOUBLE_ROW if double_baseline and equal_time_epochs == 2 * cfg.train.epochs
              else equal_time_row(equal_time_epochs or 0))
    if equal_time_epochs:
        longer[et_row] = int(equal_time_epochs)
    extra_rows = (ENSEMBLE_ROW,) * bool(ensemble) + (CONTROL_ROW,) * bool(image_control) + tuple(longer)
    rows = ABLATION_ROWS + extra_rows + TEACHER_ROWS
    results = {r: {} for r in rows}  # row -> {run label: metrics}
    same_as = {}  # row -> {run label: {"row": the row it is, "why": ...}} for ASD rows not trained (asd_pointless)
    seconds = {}  # row -> training seconds per seed (with equal_time_epochs)
    missing = {}  # row -> run labels without a finished run (train=False)
    other_split = bool(split_root or (split is not None and split != cfg.data.val_split))
    s_split, s_root = split or cfg.data.val_split, split_root or cfg.data.root
    stage = lambda name, rc, run_dir: _stage_or_finished(name, rc, run_dir, progress, train)  # noqa: E731
    for seed in seeds:
        c = copy.deepcopy(cfg)
        c.train.seed = seed
        d = out / f"seed{seed}"
        iof = stage_configs(c, d)
        uni = stage_configs(c, d / "uniform", {"frame_policy": "uniform"}, baseline=d / "baseline")
        dev = "cpu" if c.train.device in ("auto", "cpu") else c.train.device
        base_cfg = copy.deepcopy(iof["baseline"])
        base_cfg.train.snapshots = c.train.snapshots or 5
        runs = {}
        runs["baseline"] = stage("baseline", base_cfg, d / "baseline")
        runs["teacher (IOF frames)"] = stage("teacher", iof["teacher"], d / "teacher")
        runs["teacher's 3D branch (points only)"] = (eval_teacher_3d(d / "teacher", dev)
                                                     if runs["teacher (IOF frames)"] else None)
        runs["+IHD (IOF)"] = stage("stage1", iof["stage1"], d / "stage1")
        asd_runs, kept = _asd_rows(c, d, iof["student"], d / "teacher", dev, progress, train)
        runs.update(asd_runs)
        # the uniform-frame rows after the rows the method's claims rest on: an ablation cut short has those
        if c.teacher.train_frames == "random":
            # The teacher trained on random frames does not depend on the frame policy: only the frames it
            # sees when it writes soft labels do. Reuse its weights with uniformly chosen frames.
            reused = d / "uniform" / "teacher"
            runs["teacher (uniform frames)"] = (reuse_teacher(d / "teacher", reused, "uniform", dev) if train else
                                                _reused_teacher_metrics(reused))
        else:
            runs["teacher (uniform frames)"] = stage("teacher-uniform", uni["teacher"], d / "uniform" / "teacher")
        ihd_uni = copy.deepcopy(uni["stage1"])
        ihd_uni.train.snapshots = 0
        runs["+IHD (uniform frames)"] = stage("ihd-uniform", ihd_uni, d / "uniform" / "stage1")
        row_dirs = {}  # the optional rows' run folders (scored again on another split)
        if image_control:
            row_dirs[CONTROL_ROW] = d / "stage1_3d"
            runs[CONTROL_ROW] = stage("ihd-3d-head", control_config(iof["stage1"]), row_dirs[CONTROL_ROW])
        for r, n in longer.items():
            if n == base_cfg.train.epochs:
                row_dirs[r] = d / "baseline"
                runs[r] = runs["baseline"]
                continue
            long_cfg = copy.deepcopy(base_cfg)
            long_cfg.train.epochs = n
            row_dirs[r] = d / f"baseline_e{n}"
            runs[r] = stage(r, long_cfg, row_dirs[r])
        if ensemble:
            runs[ENSEMBLE_ROW] = (ensemble_metrics(d / "stage1", None, None, dev, progress)
                                  if runs["+IHD (IOF)"] else None)
        absent = _absent(runs, str(seed), missing)
        if other_split:
            runs = _runs_on_split(d, s_split, s_root, c.teacher.frame_policy, dev, skip=set(kept) | absent)
            for r, run_dir in row_dirs.items():
                if r not in absent:
                    runs[r] = split_metrics(run_dir, s_split, s_root, dev)
            if ensemble and ENSEMBLE_ROW not in absent:
                runs[ENSEMBLE_ROW] = ensemble_metrics(d / "stage1", s_split, s_root, dev, progress)
        # the training times the equal-time row is set against (with train=False: when every run they need is there)
        if equal_time_epochs and not absent & {"baseline", "teacher (IOF frames)", "+IHD (IOF)", "HAS-KD", et_row}:
            stage2 = 0.0 if "HAS-KD" in kept else train_seconds(d / "student")
            needed = d / ("stage1" if "HAS-KD" in kept else expert_run(c))  # the run the final student needs
            for r, t in ((STUDENT_PATH, train_seconds(needed) + stage2), ("HAS-KD", stage2),
                         ("teacher", train_seconds(d / "teacher")), ("baseline", train_seconds(d / "baseline")),
                         (et_row, train_seconds(row_dirs[et_row]))):
                seconds.setdefault(r, []).append(t)
        by_run = {str(seed): (runs, kept)}
        for t_seed in train_seed_list(seed, train_seeds)[1:]:
            # the students again with another training seed, from this seed's teacher
            ct = copy.deepcopy(c)
            ct.train.seed = t_seed
            dt = d / f"train_seed{t_seed}"
            cfgs = stage_configs(ct, dt, teacher_run=d / "teacher")
            base_t = copy.deepcopy(cfgs["baseline"])
            base_t.train.snapshots = base_cfg.train.snapshots
            runs_t = {"baseline": stage("baseline", base_t, dt / "baseline"),
                      "+IHD (IOF)": stage("stage1", cfgs["stage1"], dt / "stage1")}
            asd_runs, kept_t = _asd_rows(ct, dt, cfgs["student"], d / "teacher", dev, progress, train)
            runs_t.update(asd_runs)
            if ensemble:
                runs_t[ENSEMBLE_ROW] = (ensemble_metrics(dt / "stage1", None, None, dev, progress)
                                        if runs_t["+IHD (IOF)"] else None)
            absent_t = _absent(runs_t, f"{seed}/{t_seed}", missing)
            if other_split:
                runs_t = _runs_on_split(dt, s_split, s_root, c.teacher.frame_policy, dev, skip=set(kept_t) | absent_t,
                                        rows=RESEEDED_ROWS)
                if ensemble and ENSEMBLE_ROW not in absent_t:
                    runs_t[ENSEMBLE_ROW] = ensemble_metrics(dt / "stage1", s_split, s_root, dev, progress)
            by_run[f"{seed}/{t_seed}"] = (runs_t, kept_t)
        for label, (runs, kept) in by_run.items():
            for r, (src, why) in kept.items():
                if src not in runs:  # train=False: the row it is has no finished run either
                    continue
                log.info("[run %s] %s not trained, its row is %s: %s", label, r, src, why)
                same_as.setdefault(r, {})[label] = {"row": src, "why": why}
                runs[r] = runs[src]
            for r in rows:
                if r in runs:
                    results[r][label] = runs[r]
    if not results["baseline"]:
        raise HaskdError(f"{out}: no finished baseline run, so no row has anything to be compared with")
    table = {"seeds": list(seeds), "split": s_split, "rows": {}, "teacher": {}}
    if missing:
        table["missing"] = missing
    if train_seeds > 1:
        table["train_seeds"] = int(train_seeds)
    if split_root:
        table["split_root"] = str(Path(split_root).resolve())
    if same_as:
        table["same_as"] = same_as
    if seconds:
        table["train_seconds"] = seconds
        table["expert_run"] = expert_run(cfg)
    for r in (r for r in rows if results[r]):
        v = np.array([m["miou"] for m in results[r].values()]) * 100
        entry = {"miou": v.tolist(), "runs": list(results[r]), "mean": float(v.mean()),
                 "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                 "per_class_iou": [m["per_class_iou"] for m in results[r].values()]}
        table["teacher" if r in TEACHER_ROWS else "rows"][r] = entry
    md = ablation_markdown(table) + "\n\n" + per_class_markdown(table)
    name = ablation_table_name(cfg, s_split, split_root)
    where = Path(table_dir or out)
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{name}.md").write_text(md + "\n")
    (where / f"{name}.json").write_text(json.dumps(table, indent=1))
    return table


def _absent(runs: dict, label: str, missing: dict) -> set:
    """Drop the rows of ``runs`` without a finished run (None, ``train=False``) and note them in ``missing``."""
    absent = [r for r, m in runs.items() if m is None]  # in the rows' order
    for r in absent:
        del runs[r]
        missing.setdefault(r, []).append(label)
    return set(absent)


def _reused_teacher_metrics(dst: Path) -> Optional[dict]:
    """The val metrics :func:`reuse_teacher` wrote in ``dst``, or None when it has not run there."""
    done = (dst / "val_metrics.json").is_file() and (dst / "frames.json").is_file()
    return json.loads((dst / "val_metrics.json").read_text()) if done else None


def control_config(stage1: Config) -> Config:
    """The image control of :data:`CONTROL_ROW`: ``stage1`` distilling the teacher's 3D-branch head
    (``distill.teacher_head=3d``), without snapshots (nothing distils from them)."""
    c = copy.deepcopy(stage1)
    c.distill.teacher_head = "3d"
    c.train.snapshots = 0
    return c


def ablation_table_name(cfg: Config, split: str, split_root=None) -> str:
    """``ablation`` for the val split of the data, ``ablation_<split>`` for another, and
    ``ablation_<split>_<name of split_root>`` for a split read from another root."""
    if split_root:
        return f"ablation_{split}_{Path(split_root).resolve().name}"
    return "ablation" if split == cfg.data.val_split else f"ablation_{split}"


def _runs_on_split(d: Path, split: str, root, policy: str, device, skip=(), rows=None) -> dict:
    """Every ablation row of one seed folder ``d`` (or only ``rows``) evaluated on ``split`` (see
    :func:`split_metrics`), but the rows in ``skip`` (not trained: their run folder does not exist)."""
    where = {"baseline": (d / "baseline", {}),
             "teacher (IOF frames)": (d / "teacher", {"frame_policy": policy}),
             "teacher's 3D branch (points only)": (d / "teacher", {"branch_3d": True}),
             "+IHD (IOF)": (d / "stage1", {}),
             "teacher (uniform frames)": (d / "uniform" / "teacher", {"frame_policy": "uniform"}),
             "+IHD (uniform frames)": (d / "uniform" / "stage1", {}),
             "+ASD only": (d / "asd_only", {}),
             "HAS-KD": (d / "student", {})}
    return {r: split_metrics(run, split, root, device, **kw) for r, (run, kw) in where.items()
            if r not in skip and (rows is None or r in rows)}


def reuse_teacher(src: Path, dst: Path, policy: str, device="cpu") -> dict:
    """``dst``: the teacher of ``src`` (same weights) that sees frames chosen by ``policy``.

    Writes ``dst/last.pt`` (a copy), ``dst/frames.json`` (the policy's frames for the train and val scenes, which
    distillation caches with) and ``dst/val_metrics.json`` (the teacher evaluated with those frames)."""
    import shutil

    from ..engine.evaluate import evaluate
    from .build import build_datasets
    from ..images.provider import save_selection

    dst = Path(dst)
    done = _reused_teacher_metrics(dst)
    if done is not None:
        return done
    model, cfg = load_model(src / "last.pt", device=device, return_config=True)
    cfg.teacher.frame_policy = policy
    cfg.teacher.train_frames = "selected"
    sets = build_datasets(cfg)
    dst.mkdir(parents=True, exist_ok=True)
    save_selection({**sets["train"].chosen_frames, **sets["val"].chosen_frames}, dst / "frames.json")
    metrics = evaluate(model, sets["val"], device, cfg.data.dataset)
    tmp = dst / "last.pt.tmp"
    shutil.copyfile(src / "last.pt", tmp)
    tmp.replace(dst / "last.pt")
    (dst / "val_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _class_mean(per_class: list, classes) -> list:
    """Per seed, the mean IoU (x100) over ``classes`` that the seed's per-class dict scores (None = absent)."""
    out = []
    for pc in per_class:
        vals = [pc[c] for c in classes if pc.get(c) is not None]
        out.append(100 * sum(vals) / len(vals) if vals else float("nan"))
    return out


def per_class_markdown(table: dict, rows=("baseline", "+IHD (IOF)", CONTROL_ROW, "HAS-KD", "teacher (IOF frames)")
                       ) -> str:
    """Per-class IoU (x100, mean +- std over seeds) of those of ``rows`` the table has; classes absent from every
    seed are left out."""
    import numpy as np

    entries = {**table["rows"], **table.get("teacher", {})}
    rows = [r for r in rows if r in entries and entries[r].get("per_class_iou")]
    if not rows:
        return ""
    classes = list(entries[rows[0]]["per_class_iou"][0])

    def cell(r, c):
        v = np.array([pc.get(c) if pc.get(c) is not None else np.nan for pc in entries[r]["per_class_iou"]], float)
        if not np.isfinite(v).any():
            return None
        sd = np.nanstd(v, ddof=1) * 100 if np.isfinite(v).sum() > 1 else 0.0
        return f"{np.nanmean(v) * 100:.1f} +- {sd:.1f}"

    lines = ["| class | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for c in classes:
        cells = [cell(r, c) for r in rows]
        if any(x is not None for x in cells):
            lines.append(f"| {c} | " + " | ".join(x or "-" for x in cells) + " |")
    return "\n".join(lines)


PAIRED_ROWS = (("+IHD (IOF)", "baseline"), ("+ASD only", "baseline"), ("HAS-KD", "+IHD (IOF)"),
               (ENSEMBLE_ROW, "+IHD (IOF)"), ("+IHD (IOF)", CONTROL_ROW))  # the comparisons, row - reference


def paired_deltas(table: dict, row: str, ref: str) -> list:
    """mIoU of ``row`` minus ``ref`` for each run both have (matched by the ``runs`` labels; a table without them
    labels its values by seed); [] when either row or its values are missing."""
    entries = {**table["rows"], **table.get("teacher", {})}
    if "miou" not in entries.get(row, {}) or "miou" not in entries.get(ref, {}):
        return []
    by_run = lambda e: dict(zip(e.get("runs") or [str(s) for s in table["seeds"]], e["miou"]))  # noqa: E731
    a, b = by_run(entries[row]), by_run(entries[ref])
    return [a[k] - b[k] for k in a if k in b]


def _vs_baseline(table: dict, row: str) -> float:
    """A row's lead over the baseline: the mean of its paired differences, or of the means without per-run values."""
    import numpy as np

    d = paired_deltas(table, row, "baseline")
    rows = {**table["rows"], **table.get("teacher", {})}
    return float(np.mean(d)) if d else rows[row]["mean"] - table["rows"]["baseline"]["mean"]


def ablation_markdown(table: dict, hard_classes=("picture", "window")) -> str:
    """Markdown table: mIoU mean +- std, the gain over the baseline, and the mean IoU over ``hard_classes``
    (the classes that points show weakly; on data without them the column is left out)."""
    import numpy as np

    rows = {**table["rows"], **table.get("teacher", {})}
    hard = {r: _class_mean(v.get("per_class_iou") or [], hard_classes) for r, v in rows.items()}
    show_hard = any(np.isfinite(h).any() for h in hard.values() if h)
    where = f" of {Path(table['split_root']).name}" if table.get("split_root") else ""
    seeds = table["seeds"]
    over = f"seeds {seeds}"
    if table.get("train_seeds", 1) > 1:
        over += f"; rows marked (N runs): also train.seed S+10k, {table['train_seeds']} a seed"
    head = f"| variant | {table.get('split', 'val')}{where} mIoU (mean +- std over {over}) | vs baseline |"
    rule = "|---|---|---|"
    if show_hard:
        head += f" {' / '.join(hard_classes)} mean IoU |"
        rule += "---|"
    lines = [head, rule]
    for r, v in rows.items():
        runs = f" ({len(v['miou'])} runs)" if any("/" in k for k in v.get("runs", ())) else ""
        line = f"| {r}{runs} | {v['mean']:.2f} +- {v['std']:.2f} | {_vs_baseline(table, r):+.2f} |"
        if show_hard:
            h = np.array(hard[r], float)
            line += f" {np.nanmean(h):.2f} +- {np.nanstd(h, ddof=1) if np.isfinite(h).sum() > 1 else 0.0:.2f} |"
        lines.append(line)
    t = table.get("teacher", {}).get("teacher (IOF frames)")
    has_kd = "HAS-KD" in table["rows"]  # not in a --table-only table whose final students are not finished
    if t is not None:
        gap, got = (_vs_baseline(table, r) if r in rows else 0.0 for r in ("teacher (IOF frames)", "HAS-KD"))
        frac = f"{100 * got / gap:.0f}%" if gap > 0 else "n/a (the teacher is not above the baseline)"
        lines.append(f"\nTeacher - baseline gap: {gap:+.2f} mIoU" + (f"; HAS-KD closes {frac} of it ({got:+.2f})."
                                                                     if has_kd else "."))
        if show_hard:  # the classes the images explain: does the teacher's lead there reach the student?
            hard_mean = lambda r: float(np.nanmean(np.array(hard[r], float)))  # noqa: E731
            lead = hard_mean("teacher (IOF frames)") - hard_mean("baseline")
            moved = hard_mean("HAS-KD") - hard_mean("baseline") if has_kd else 0.0
            share = f"{100 * moved / lead:.0f}%" if lead > 0 else "n/a (the teacher does not lead there)"
            lines.append(f"On {' / '.join(hard_classes)} (mean IoU) the teacher leads by {lead:+.2f}" + (
                f"; HAS-KD gets {share} of it ({moved:+.2f})." if has_kd else "."))
            if lead > 0 and "+IHD (IOF)" in rows:  # IHD's share, and the part of it its control gets without images
                ihd = hard_mean("+IHD (IOF)") - hard_mean("baseline")
                more = f"+IHD (IOF) gets {100 * ihd / lead:.0f}% ({ihd:+.2f})"
                if CONTROL_ROW in rows:
                    ctrl = hard_mean(CONTROL_ROW) - hard_mean("baseline")
                    more += (f", {CONTROL_ROW} {100 * ctrl / lead:.0f}% ({ctrl:+.2f}): the images' own part is "
                             f"{100 * (ihd - ctrl) / lead:.0f}% ({ihd - ctrl:+.2f})")
                lines[-1] += f" {more}."
    paired = []
    for a, b in PAIRED_ROWS:
        d = np.array(paired_deltas(table, a, b))
        if d.size:
            sd = f" +- {d.std(ddof=1):.2f}" if d.size > 1 else ""
            paired.append(f"{a} - {b}: {d.mean():+.2f}{sd} ({int((d > 0).sum())} of {d.size} positive)")
    if paired:
        lines.append("\nPaired by run (same teacher, same train.seed), mean +- std of the differences: "
                     + "; ".join(paired) + ".")
    secs = table.get("train_seconds", {})
    if STUDENT_PATH in secs:
        mean = lambda r: sum(secs[r]) / len(secs[r])
        path = mean(STUDENT_PATH)
        first = "baseline (its experts)" if table.get("expert_run") == "baseline" else "stage 1"
        others = ", ".join(f"{'final student (stage 2)' if r == 'HAS-KD' else r} {mean(r):.0f} s "
                           f"({mean(r) / path:.2f}x)" for r in secs if r != STUDENT_PATH)
        lines.append(f"\nTraining time (sum of the epochs' training loops, mean over seeds; validation and "
                     f"soft-label cache building not included): HAS-KD student, {first} + final, {path:.0f} s; "
                     f"{others}. The whole pipeline with its teacher is "
                     f"{(path + mean('teacher')) / mean('baseline'):.2f}x the baseline's time.")
    if table.get("missing"):
        lines.append("\nNot finished, so left out of this table (`haskd ablate --table-only`): " + "; ".join(
            f"{r} (run{'s' * (len(labels) > 1)} {', '.join(labels)})" for r, labels in table["missing"].items()) + ".")
    for r, by_seed in table.get("same_as", {}).items():
        src = sorted({x["row"] for x in by_seed.values()})
        why = next(iter(by_seed.values()))["why"]
        lines.append(f"\n{r} is not a model of its own on seed(s) {', '.join(sorted(by_seed))}: no snapshot is the "
                     f"expert of any class, so its row is the {' / '.join(src)} row (e.g. {why}).")
    return "\n".join(lines)
