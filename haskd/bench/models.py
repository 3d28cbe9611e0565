"""``haskd benchmark`` (default mode): inference latency of student / baseline / multi-modal teacher (with its K
frames) / M-snapshot ensemble, peak memory of each phase, parameter counts, and the training-step comparison of
:mod:`haskd.bench.steps`."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from ..errors import HaskdError, InputError
from .common import PeakMemory, _sync, count_params, env_info
from .steps import _train_steps


def _eval_scenes(root, split, cfg, max_scenes):
    from ..data.dataset import SceneDataset

    ds = SceneDataset(root, split, cfg.data.num_classes, cfg.data.voxel_size, use_normal=cfg.data.use_normal,
                      need_labels=False)
    if not ds.scenes:
        raise InputError(Path(root) / split, "no scenes")
    ds.scenes = ds.scenes[:max_scenes]
    ds.dirs = ds.dirs[:max_scenes]
    return ds


def _latency(predict, scenes, runs, warmup, device) -> dict:
    """Per-scene timing of ``predict(i)``; total median latency and points/s over the scenes."""
    out = _paired_latency({"model": predict}, scenes, runs, warmup, device)["model"]
    out.pop("interleaved_with")
    return out


def _paired_latency(predicts: dict, scenes, runs, warmup, device) -> dict:
    """``_latency`` for several models at once, interleaved: every round times each model once on the scene, in an
    order that rotates from round to round, so that drift of the machine (frequency, other jobs, allocator state)
    hits every model alike. Used where the ratio is the point (student vs baseline: the same network)."""
    names = list(predicts)
    times = {n: [[] for _ in scenes] for n in names}
    for i in range(len(scenes)):
        for n in names:
            for _ in range(warmup):
                predicts[n](i)
        for r in range(runs):
            for n in names[r % len(names):] + names[:r % len(names)]:
                _sync(device)
                t0 = time.perf_counter()
                predicts[n](i)
                _sync(device)
                times[n][i].append(time.perf_counter() - t0)
    out = {}
    for n in names:
        per = [{"scene": s.name, "points": s.num_points, "median": statistics.median(ts), "min": min(ts),
                "max": max(ts), "runs": len(ts)} for s, ts in zip(scenes, times[n])]
        total = sum(p["median"] for p in per)
        out[n] = {"scenes": per, "median_s_per_scene": total / len(per),
                  "points_per_s": sum(p["points"] for p in per) / total, "interleaved_with": names}
    return out


def benchmark_models(ckpt, data, split="val", teacher=None, snapshots=None, baseline=None, runs=5, warmup=1,
                     threads=1, device="cpu", max_scenes=3, train_steps=True, overrides=()) -> dict:
    """Latency / training-step / memory comparison (see module docstring). Returns a JSON-ready dict.
    ``overrides`` (``key=value``) change the student's config for the training steps (e.g. ``optim.amp_dtype``)."""
    from ..engine.checkpoint import load_model
    from ..engine.evaluate import predict_points

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HaskdError("--device cuda asked for, but torch sees no CUDA GPU")
    model, cfg = load_model(ckpt, device=device, return_config=True)
    if cfg.role == "teacher":
        raise InputError(ckpt, "--ckpt must be a student checkpoint (give the teacher with --teacher)")
    cfg.data.root = str(data)
    if overrides:
        from ..config import apply_overrides

        apply_overrides(cfg, list(overrides))
    ds = _eval_scenes(data, split, cfg, max_scenes)
    vs, C, nrm = cfg.data.voxel_size, cfg.data.num_classes, cfg.data.use_normal
    res = {"env": env_info(device), "ckpt": str(ckpt), "data": str(data), "split": split, "runs": runs,
           "warmup": warmup, "voxel_size": vs, "scenes": [s.name for s in ds.scenes],
           "params": {"student": count_params(model)}, "latency": {}, "memory_mb": {}}

    def measure(name, predict):
        with PeakMemory(device) as mem:
            res["latency"][name] = _latency(predict, ds.scenes, runs, warmup, device)
        res["memory_mb"][f"infer_{name}"] = mem.mb
        res["memory_method"] = mem.method

    # no_grad, not inference_mode: the torch backend's reusable scratch buffers would become inference tensors
    # and fail in the training steps that follow (see docs/performance.md).
    with torch.no_grad():
        student = lambda i: predict_points(model, ds.scenes[i], vs, C, device, nrm)  # noqa: E731
        if baseline:
            # Same network: the ratio should be 1, so student and baseline are timed interleaved (drift cancels);
            # their memory is measured in a separate untimed pass each.
            base = load_model(baseline, device=device)
            res["params"]["baseline"] = count_params(base)
            pair = {"student": student, "baseline": lambda i: predict_points(base, ds.scenes[i], vs, C, device, nrm)}
            res["latency"].update(_paired_latency(pair, ds.scenes, runs, warmup, device))
            for name, fn in pair.items():
                with PeakMemory(device) as mem:
                    for i in range(len(ds.scenes)):
                        fn(i)
                res["memory_mb"][f"infer_{name}"] = mem.mb
                res["memory_method"] = mem.method
            res["ratios"] = {"student_over_baseline": res["latency"]["student"]["median_s_per_scene"]
                             / res["latency"]["baseline"]["median_s_per_scene"]}
        else:
            measure("student", student)
        if teacher:
            from ..engine.evaluate import frames_hook
            from ..images.provider import FrameProvider

            tm, tcfg = load_model(teacher, device=device, return_config=True)
            if tcfg.role != "teacher":
                raise InputError(teacher, "--teacher must be a teacher checkpoint (role: teacher)")
            tds = ds.with_frames(FrameProvider.for_run(tcfg, Path(teacher).parent))
            res["params"]["teacher"] = count_params(tm)
            res["teacher_frames"] = {s.name: len(tds.chosen_frames.get(s.name, [])) for s in ds.scenes}
            measure("teacher", lambda i: predict_points(tm, tds.scenes[i], tcfg.data.voxel_size, C, device,
                                                        tcfg.data.use_normal, extra=frames_hook(tds, i)))
        snaps = sorted(Path(snapshots).glob("epoch_*.pt")) if snapshots else []
        if snapshots and not snaps:
            raise InputError(snapshots, "no epoch_*.pt snapshots")
        if snaps:
            ens = [load_model(p, device=device) for p in snaps]
            res["params"]["ensemble"] = sum(count_params(m) for m in ens)

            def ensemble(i):
                p = sum(predict_points(m, ds.scenes[i], vs, C, device, nrm) for m in ens)
                return p / len(ens)

            measure(f"ensemble_{len(ens)}", ensemble)
            res["ensemble_members"] = [str(p) for p in snaps]
        st = res["latency"]["student"]["median_s_per_scene"]
        res.setdefault("ratios", {})
        for k, v in res["latency"].items():
            if k != "student":
                res["ratios"][f"{k}_over_student"] = v["median_s_per_scene"] / st
    if train_steps:
        res["train_step"] = _train_steps(cfg, teacher, snaps, runs, warmup, device)
        base_t = res["train_step"]["baseline"]["median"]
        for k, v in res["train_step"].items():
            if k != "baseline" and "median" in v:
                res["ratios"][f"step_{k}_over_baseline"] = v["median"] / base_t
    res["env"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return res
