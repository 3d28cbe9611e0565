"""Training-step time of the benchmark's configurations (baseline, HAS-KD with cached and online soft labels, the
hint variants), timed interleaved on the same batches. Every configuration's step is the training step itself:
``build_trainer`` builds it as training does and the benchmark times ``Trainer.run_step`` (gradient clipping and
the finite-loss check included)."""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .common import PeakMemory, _sync


def _copy_ckpt(ckpt, tmp: Path, name: str) -> str:
    """Copy a checkpoint (and its frames.json / experts.json neighbours) so that soft-label caches built for the
    benchmark land in a temporary folder, not next to the user's checkpoint."""
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ckpt, d / Path(ckpt).name)
    fj = Path(ckpt).parent / "frames.json"
    if fj.is_file():
        shutil.copy2(fj, d / "frames.json")
    return str(d / Path(ckpt).name)


def _experts_table(snaps, num_classes, tmp: Path) -> str:
    """An experts JSON for ``snaps``: the run's own ``experts.json`` when next to the snapshots, else a round-robin
    table (which expert teaches which class does not change the cost)."""
    for cand in (snaps[0].parent / "experts.json", snaps[0].parent.parent / "experts.json"):
        if cand.is_file():
            t = json.loads(cand.read_text())
            t["snapshots"] = [str(s) for s in snaps] if len(t.get("snapshots", [])) != len(snaps) else t["snapshots"]
            out = tmp / "experts" / "experts.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(t))
            return str(out)
    M = len(snaps)
    t = {"snapshots": [str(s.resolve()) for s in snaps], "indices": [[c % M] for c in range(num_classes)],
         "weights": [[1.0] for _ in range(num_classes)], "synthetic": True}
    out = tmp / "experts" / "experts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(t))
    return str(out)


def _train_batches(cfg, n_batches, datasets=None):
    """``n_batches`` training batches (augmented, cropped; same seed -> the same batches for every task)."""
    from ..data.transforms import collate
    from ..workflow.build import build_datasets

    datasets = build_datasets(cfg, splits=("train",)) if datasets is None else datasets
    ds = datasets["train"]
    bs = cfg.data.batch_size
    idx = [[(b * bs + j) % len(ds) for j in range(bs)] for b in range(n_batches)]
    return datasets, [collate([ds[i] for i in ix]) for ix in idx]


def _trainer(task_cfg, model, device, datasets, steps=100):
    """The training step of ``task_cfg`` around ``model``: ``build_trainer``, what training builds, with the schedule
    of a run of that config (the benchmark's steps use the learning rates a run starts with), lengthened to ``steps``
    where the run would be shorter than the benchmark."""
    from ..workflow.build import build_trainer, steps_per_epoch, train_sampler
    from ..workflow.runs import teacher_heads

    per_epoch = steps_per_epoch(task_cfg, train_sampler(task_cfg, datasets["train"]))
    trainer = build_trainer(task_cfg, model, datasets, device, max(task_cfg.train.epochs * per_epoch, steps),
                            teacher_heads=teacher_heads(task_cfg, device))
    trainer.task.train()
    return trainer


def _step_fn(task_cfg, device, n_batches=2, steps=100):
    """(step function, setup seconds, voxels per batch) of the task ``task_cfg`` describes, on fixed batches: one call
    is ``Trainer.run_step`` (forward, finite-loss check, backward, gradient clip, optimizer and schedule step);
    ``steps``: how many calls at most (the schedule must last that long)."""
    from ..engine.tasks import move_to
    from ..workflow.build import build_datasets, build_model

    torch.manual_seed(0)
    datasets = build_datasets(task_cfg, splits=("train",))
    model = build_model(task_cfg).to(device)
    t0 = time.perf_counter()
    trainer = _trainer(task_cfg, model, device, datasets, steps)  # builds soft-label caches in cached mode
    setup_s = time.perf_counter() - t0
    _, batches = _train_batches(task_cfg, n_batches, datasets)
    batches = [move_to(b, device) for b in batches]
    state = {"i": 0}

    def step():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        trainer.run_step(b)

    step.trainer = trainer  # what is timed, for a caller that checks it
    return step, setup_s, int(batches[0]["grid_coord"].shape[0])


def _step_times(task_cfgs: dict, device, runs, warmup, n_batches=2) -> dict:
    """Median step time of several tasks, timed **interleaved** (each round runs every task once, in an order that
    rotates), so that the ratios between them do not depend on which one ran first; peak memory of each in a separate
    untimed pass with only that task alive. Returns ``{name: {median, min, max, runs, setup_s, peak_mb, voxels_per_batch}}``."""
    import gc

    out = {}
    for n, c in task_cfgs.items():  # memory: one task alive at a time (its setup builds the soft-label caches)
        step, setup_s, vox = _step_fn(c, device, n_batches, steps=n_batches)
        with PeakMemory(device) as mem:
            for _ in range(n_batches):
                step()
        out[n] = {"setup_s": setup_s, "peak_mb": mem.mb, "voxels_per_batch": vox}
        del step
        gc.collect()
    steps = (warmup + runs) * n_batches
    built = {n: _step_fn(c, device, n_batches, steps)[0] for n, c in task_cfgs.items()}  # caches exist now: quick
    names = list(built)
    for _ in range(warmup * n_batches):
        for n in names:
            built[n]()
    ts = {n: [] for n in names}
    for r in range(runs * n_batches):  # every batch the same number of times for every task
        for n in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            built[n]()
            _sync(device)
            ts[n].append(time.perf_counter() - t0)
    for n in names:
        out[n].update({"median": statistics.median(ts[n]), "min": min(ts[n]), "max": max(ts[n]), "runs": len(ts[n])})
    return out


def _no_hint_cache_without_cache(cfgs: dict) -> dict:
    """``distill.hint_cache`` off in the rows without ``distill.cache``: the hint cache is only built with the
    soft-label cache (an online teacher computes the hints itself), so this changes nothing that runs and every row
    is a config that training accepts."""
    for c in cfgs.values():
        if not c.distill.cache:
            c.distill.hint_cache, c.distill.hint_cache_augs = False, 0
    return cfgs


def _train_steps(cfg, teacher, snaps, runs, warmup, device) -> dict:
    """Baseline task vs HAS-KD (cached, online) on the same training batches, timed interleaved."""
    from ..config import from_dict, point_only, with_teacher
    from ..engine.trainer import autocast_dtype

    base = {"baseline": point_only(cfg)}
    if autocast_dtype(cfg, device) is not None:  # training runs mixed precision here: what it saves, same run
        base["baseline_fp32"] = point_only(cfg)
        base["baseline_fp32"].optim.amp = False
    if not teacher and not snaps:
        return _step_times(_no_hint_cache_without_cache(base), device, runs, warmup)
    with tempfile.TemporaryDirectory(prefix="haskd_bench_") as tmp:
        tmp = Path(tmp)
        kd = point_only(cfg)
        if teacher:
            with_teacher(kd, cfg, _copy_ckpt(teacher, tmp, "teacher"))
        kd.distill.experts = _experts_table(snaps, cfg.data.num_classes, tmp) if snaps else ""
        cfgs = dict(base)
        for mode, cache in (("haskd_cached", True), ("haskd_online", False)):
            cfgs[mode] = from_dict(kd.to_dict())
            cfgs[mode].distill.cache = cache
        hints = bool(teacher) and kd.distill.hint_weight > 0
        if hints:  # time the logit cache alone too, and the hints the other way (online / cached)
            cfgs["haskd_cached_no_hints"] = from_dict(kd.to_dict())
            cfgs["haskd_cached_no_hints"].distill.hint_weight = 0.0
            other = "online" if kd.distill.hint_cache else "cached"
            cfgs[f"haskd_cached_hints_{other}"] = from_dict(kd.to_dict())
            cfgs[f"haskd_cached_hints_{other}"].distill.hint_cache = not kd.distill.hint_cache
            cfgs[f"haskd_cached_hints_{other}"].distill.hint_cache_augs = 0  # the online row: no views to cache
            if kd.distill.hint_cache and kd.distill.hint_cache_augs:  # and the cache of the unaugmented scenes
                cfgs["haskd_cached_hints_scene"] = from_dict(kd.to_dict())
                cfgs["haskd_cached_hints_scene"].distill.hint_cache_augs = 0
        out = _step_times(_no_hint_cache_without_cache(cfgs), device, runs, warmup)
        out["haskd_parts"] = {"ihd": bool(teacher), "asd": bool(snaps), "asd_experts": len(snaps), "hints": hints,
                              "hint_cache": hints and kd.distill.hint_cache}
    return out
