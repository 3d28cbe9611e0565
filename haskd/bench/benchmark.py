"""Performance measurements behind ``haskd benchmark`` (see docs/performance.md).

Four independent benchmarks, each returning a JSON-ready dict:

- :func:`benchmark_models`: inference latency of student / baseline / multi-modal teacher (with its K frames) /
  M-snapshot ensemble, training-step time of the baseline task and of HAS-KD (cached and online soft labels), peak
  memory of each phase, parameter counts.
- :func:`benchmark_layers`: per-layer FLOP rate of the pure-torch sparse conv on a real room vs this machine's
  dense matmul rate, and the whole-UNet torch vs spconv comparison.
- :func:`benchmark_loading`: share of a training step spent waiting for the DataLoader (workers 0 and 1).
- :func:`benchmark_ddp`: samples/s of 2 torchrun processes (1 thread each) vs 1 process with 2 threads.

Timing rule everywhere: ``warmup`` untimed runs, then ``runs`` timed runs; report median, min and max; CUDA is
synchronised around every timed call. Peak memory: CUDA ``max_memory_allocated``; CPU the process's peak resident
set (``VmHWM``), reset before each phase through ``/proc/self/clear_refs`` (Linux), else ``ru_maxrss`` growth.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import HaskdError, InputError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ timing / memory
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_runs(fn, runs=5, warmup=1, device="cpu") -> dict:
    """Wall time of ``fn()``: ``{"median", "min", "max", "runs"}`` in seconds over ``runs`` timed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "runs": len(ts)}


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.mb``: peak memory (MiB) inside the block.

    CPU: peak RSS of the process within the block (``VmHWM`` after resetting it), or, where that reset is not
    possible, how far ``ru_maxrss`` grew (an underestimate when an earlier phase peaked higher). ``m.method`` says
    which.
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.mb, self.method = None, None

    @staticmethod
    def _hwm_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1])
        raise OSError("no VmHWM")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS counter to the current RSS
            self._hwm_kb()
            self.method = "VmHWM (peak RSS, reset per phase)"
        except OSError:
            self.method = "ru_maxrss growth"
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2 ** 20
        elif self.method.startswith("VmHWM"):
            self.mb = self._hwm_kb() / 1024
        else:
            self.mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._start) / 1024
        return False


def env_info(device="cpu") -> dict:
    """Machine and library facts recorded with every result."""
    from ..sparse import spconv_backend

    dev = torch.device(device)
    info = {"device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    spconv_version = None
    if spconv_backend.available():
        try:
            import spconv

            spconv_version = getattr(spconv, "__version__", "unknown")
        except Exception as e:  # a broken install should not stop a benchmark
            spconv_version = f"import failed: {type(e).__name__}"
    info["spconv"] = spconv_version
    info["sparse_backend"] = "spconv" if dev.type == "cuda" and spconv_version and "failed" not in spconv_version \
        else "torch"
    return info


def count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ------------------------------------------------------------------------------------------------ models
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


def _step_fn(task_cfg, device, n_batches=2):
    """(step function, setup seconds, voxels per batch) of the task ``task_cfg`` describes, on fixed batches: one call
    is a forward + backward + optimizer step."""
    from ..engine.tasks import move_to
    from ..engine.trainer import autocast, autocast_dtype
    from ..workflow.build import build_datasets, build_optimizer, build_task
    from ..models import build_from_config

    torch.manual_seed(0)
    datasets = build_datasets(task_cfg, splits=("train",))
    model = build_from_config(task_cfg).to(device)
    t0 = time.perf_counter()
    task = build_task(task_cfg, model, device, datasets).to(device)  # builds soft-label caches in cached mode
    setup_s = time.perf_counter() - t0
    _, batches = _train_batches(task_cfg, n_batches, datasets)
    batches = [move_to(b, device) for b in batches]
    opt = build_optimizer(task_cfg, [p for p in task.parameters() if p.requires_grad])
    task.train()
    state = {"i": 0}
    amp = autocast_dtype(task_cfg, device)  # the trainer's mixed precision (optim.amp), scaler included
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    def step():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        with autocast(amp, device):
            losses, _ = task(b)
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()

    return step, setup_s, int(batches[0]["grid_coord"].shape[0])


def _step_times(task_cfgs: dict, device, runs, warmup, n_batches=2) -> dict:
    """Median step time of several tasks, timed **interleaved** (each round runs every task once, in an order that
    rotates), so that the ratios between them do not depend on which one ran first; peak memory of each in a separate
    untimed pass with only that task alive. Returns ``{name: {median, min, max, runs, setup_s, peak_mb, voxels_per_batch}}``."""
    import gc

    out = {}
    for n, c in task_cfgs.items():  # memory: one task alive at a time (its setup builds the soft-label caches)
        step, setup_s, vox = _step_fn(c, device, n_batches)
        with PeakMemory(device) as mem:
            for _ in range(n_batches):
                step()
        out[n] = {"setup_s": setup_s, "peak_mb": mem.mb, "voxels_per_batch": vox}
        del step
        gc.collect()
    built = {n: _step_fn(c, device, n_batches)[0] for n, c in task_cfgs.items()}  # caches exist now: quick
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


def _train_steps(cfg, teacher, snaps, runs, warmup, device) -> dict:
    """Baseline task vs HAS-KD (cached, online) on the same training batches, timed interleaved."""
    from ..config import from_dict

    from ..engine.trainer import autocast_dtype

    base_cfg = from_dict(cfg.to_dict())
    base_cfg.distill.teacher_ckpt, base_cfg.distill.experts = "", ""
    base = {"baseline": base_cfg}
    if autocast_dtype(cfg, device) is not None:  # training runs mixed precision here: what it saves, same run
        base["baseline_fp32"] = from_dict(base_cfg.to_dict())
        base["baseline_fp32"].optim.amp = False
    if not teacher and not snaps:
        return _step_times(base, device, runs, warmup)
    with tempfile.TemporaryDirectory(prefix="haskd_bench_") as tmp:
        tmp = Path(tmp)
        kd = from_dict(cfg.to_dict())
        kd.distill.teacher_ckpt = _copy_ckpt(teacher, tmp, "teacher") if teacher else ""
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
        out = _step_times(cfgs, device, runs, warmup)
        out["haskd_parts"] = {"ihd": bool(teacher), "asd": bool(snaps), "asd_experts": len(snaps), "hints": hints,
                              "hint_cache": hints and kd.distill.hint_cache}
    return out


# ------------------------------------------------------------------------------------------------ markdown
def _fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def to_markdown(res: dict) -> str:
    """Human-readable tables of any benchmark result dict."""
    lines = []
    env = res.get("env", {})
    if env:
        lines.append(f"device {env.get('device')}, {env.get('threads')} threads, torch {env.get('torch')}, "
                     f"sparse backend {env.get('sparse_backend')}, spconv {env.get('spconv')}, "
                     f"load {env.get('loadavg')}")
    if "latency" in res:
        lines += ["", "| model | median s/scene | min | max | points/s | peak MiB | params |", "|---|---|---|---|---|---|---|"]
        for k, v in res["latency"].items():
            mins = sum(s["min"] for s in v["scenes"]) / len(v["scenes"])
            maxs = sum(s["max"] for s in v["scenes"]) / len(v["scenes"])
            pk = "ensemble" if k.startswith("ensemble") else k
            lines.append(f"| {k} | {_fmt(v['median_s_per_scene'])} | {_fmt(mins)} | {_fmt(maxs)} | "
                         f"{v['points_per_s']:.0f} | {_fmt(res['memory_mb'].get('infer_' + k), 0)} | "
                         f"{res['params'].get(pk, '-')} |")
    if "train_step" in res:
        lines += ["", "| training task | median step s | min | max | peak MiB | setup s |", "|---|---|---|---|---|---|"]
        for k, v in res["train_step"].items():
            if "median" in v:
                lines.append(f"| {k} | {_fmt(v['median'])} | {_fmt(v['min'])} | {_fmt(v['max'])} | "
                             f"{_fmt(v['peak_mb'], 0)} | {_fmt(v['setup_s'], 2)} |")
    if res.get("ratios"):
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in res["ratios"].items()]
    if "layer_types" in res:
        lines += ["", f"dense matmul peak {res['dense_gflops_peak']:.1f} GFLOP/s; room {res['voxels']} voxels",
                  "", "| layer type | layers | pairs | GFLOP fwd | fwd s | fwd GFLOP/s | bwd s | bwd GFLOP/s | "
                      "fwd / dense same shape |", "|---|---|---|---|---|---|---|---|---|"]
        for k, v in res["layer_types"].items():
            lines.append(f"| {k} | {v['layers']} | {v['pairs']} | {v['gflop']:.2f} | {v['fwd_s']:.4f} | "
                         f"{v['fwd_gflops']:.1f} | {v['bwd_s']:.4f} | {v['bwd_gflops']:.1f} | "
                         f"{v['fwd_fraction_of_dense']:.2f} |")
    if "unet" in res:
        lines += ["", "| whole UNet | threads | forward s | step s | mismatching rows | note |", "|---|---|---|---|---|---|"]
        for v in res["unet"]:
            lines.append(f"| {v['backend']} | {v['threads']} | {_fmt(v.get('forward'))} | {_fmt(v.get('step'))} | "
                         f"{v.get('mismatch_rows', '-')} | {v.get('note', '')} |")
    if "loading" in res:
        lines += ["", "| workers | wait s/step | step s | loading share |", "|---|---|---|---|"]
        for v in res["loading"]:
            lines.append(f"| {v['workers']} | {_fmt(v['wait_s'])} | {_fmt(v['step_s'])} | {v['share']:.1%} |")
    if "chunked" in res:
        lines += ["", f"{res['scene']}: {res['points']} points, voxel {res['voxel_size']} m, label agreement "
                      f"{res['label_agreement']:.4f}", "", "| path | peak RSS MiB | seconds | chunks |",
                  "|---|---|---|---|",
                  f"| chunked (max_voxels {res['max_voxels']}) | {_fmt(res['chunked']['peak_rss_mb'], 0)} | "
                  f"{_fmt(res['chunked']['seconds'], 2)} | {res['chunked']['chunks']} |",
                  f"| one-shot | {_fmt(res['one_shot']['peak_rss_mb'], 0)} | {_fmt(res['one_shot']['seconds'], 2)} "
                  f"| 1 |"]
    if "ddp" in res:
        lines += ["", "| setup | samples/s | wall s | steps |", "|---|---|---|---|"]
        for v in res["ddp"]:
            lines.append(f"| {v['setup']} | {_fmt(v['samples_per_s'], 2)} | {_fmt(v['wall_s'], 2)} | {v['steps']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ layers
def _load_real_scene(data, scene=None, split="val"):
    """Scene ``scene`` from any split of ``data`` (default: the first scene of ``split``, else of train)."""
    from ..data.scene import list_scenes, load_scene

    root = Path(data)
    others = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    splits = [sp for sp in dict.fromkeys([split, "train", "val", *others]) if (root / sp).is_dir()]
    dirs = [d for sp in splits for d in list_scenes(root, sp)]
    if scene:
        dirs = [d for d in dirs if d.name == scene]
    if not dirs:
        raise InputError(root, f"scene {scene} not found" if scene else "no scene folders under <root>/<split>/")
    return load_scene(dirs[0])


def _voxel_batch(scene, target_voxels=50000):
    """One-scene batch with about ``target_voxels`` voxels: the voxel size is searched (2-10 cm)."""
    from ..engine.evaluate import scene_sample
    from ..data.transforms import collate

    best = None
    for vs in np.arange(0.02, 0.101, 0.005):
        s = scene_sample(scene, float(vs), 20)
        n = s["grid_coord"].shape[0]
        if best is None or abs(n - target_voxels) < abs(best[1] - target_voxels):
            best = (float(vs), n, s)
        if n < target_voxels:
            break
    vs, n, s = best
    return vs, collate([s])


def _dense_gflops(m, k, n, reps=3) -> float:
    """torch.mm rate (GFLOP/s) of an ``(m, k) @ (k, n)`` product: the physical limit for the same shape."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)
    t = time_runs(lambda: torch.mm(a, b, out=out), reps, 1)["min"]
    return 2.0 * m * k * n / t / 1e9


def benchmark_layers(data, scene=None, preset="small", threads=1, runs=3, target_voxels=50000,
                     unet=True) -> dict:
    """Per-layer FLOP rate of the torch sparse conv on a real room, plus the whole-UNet backend comparison."""
    from ..models.spunet import SPUNET_PRESETS, SpUNet
    from ..sparse import SparseConv3d, SparseInverseConv3d, SubMConv3d
    from ..sparse.torch_backend import sparse_conv

    torch.set_num_threads(threads)
    sc = _load_real_scene(data, scene)
    vs, batch = _voxel_batch(sc, target_voxels)
    torch.manual_seed(0)
    model = SpUNet(3, 20, backend="torch", **SPUNET_PRESETS[preset]).eval()
    level = {1: 0, 2: 1, 4: 2, 8: 3, 16: 4, 32: 5}
    records = []

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, SubMConv3d):
            kind, kmap = f"subm L{level[x.stride]}", x.cache[("subm", x.stride, mod.kernel_size)]
        elif isinstance(mod, SparseConv3d):
            rec = x.cache[("down", mod.key or f"s{x.stride}")]
            kind, kmap = f"down L{level[x.stride]}->L{level[rec['out_stride']]}", rec["kmap"]
        else:
            rec = x.cache[("down", mod.key or x.cache.get(("down_to", x.stride)))]
            kind, kmap = f"inverse L{level[x.stride]}->L{level[rec['in_stride']]}", rec["kmap"].transposed()
        records.append((kind, x.feats.detach().clone(), mod.weight.detach().clone(), kmap))

    hs = [m.register_forward_hook(hook) for m in model.modules()
          if isinstance(m, (SubMConv3d, SparseConv3d, SparseInverseConv3d))]
    with torch.no_grad():
        model(batch)
    for h in hs:
        h.remove()
    dense_cache, types = {}, {}
    per_layer = []
    for kind, x, w, kmap in records:
        cin, cout = x.shape[1], w.shape[0]
        pairs = kmap.num_pairs
        flop = 2.0 * pairs * cin * cout
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        fwd = time_runs(lambda: sparse_conv(x, w, kmap), runs, 1)["median"]
        y = sparse_conv(xg, wg, kmap)
        g = torch.randn_like(y)
        bwd = time_runs(lambda: torch.autograd.grad(y, (xg, wg), g, retain_graph=True), runs, 1)["median"]
        groups = max(1, len(kmap.groups) + (kmap.identity_k is not None))
        shape = (max(1, pairs // groups), cin, cout)
        if shape not in dense_cache:
            dense_cache[shape] = _dense_gflops(*shape)
        per_layer.append({"type": kind, "cin": cin, "cout": cout, "rows_in": kmap.n_in, "rows_out": kmap.n_out,
                          "pairs": pairs, "gflop": flop / 1e9, "fwd_s": fwd, "bwd_s": bwd,
                          "fwd_gflops": flop / fwd / 1e9, "bwd_gflops": 2 * flop / bwd / 1e9,
                          "dense_gflops_same_shape": dense_cache[shape]})
        t = types.setdefault(kind, {"layers": 0, "pairs": 0, "gflop": 0.0, "fwd_s": 0.0, "bwd_s": 0.0,
                                    "_dense_s": 0.0})
        t["layers"] += 1
        t["pairs"] += pairs
        t["gflop"] += flop / 1e9
        t["fwd_s"] += fwd
        t["bwd_s"] += bwd
        t["_dense_s"] += flop / 1e9 / dense_cache[shape]
    for t in types.values():
        t["fwd_gflops"] = t["gflop"] / t["fwd_s"]
        t["bwd_gflops"] = 2 * t["gflop"] / t["bwd_s"]  # backward = input grad + weight grad: twice the flops
        t["fwd_fraction_of_dense"] = t.pop("_dense_s") / t["fwd_s"]
    peak = _dense_gflops(4096, 256, 256)
    res = {"env": env_info("cpu"), "scene": sc.name, "points": sc.num_points, "voxel_size": vs,
           "voxels": int(batch["grid_coord"].shape[0]), "preset": preset, "threads": threads,
           "dense_gflops_peak": peak, "flop_rule": "2 x pairs x Cin x Cout (backward: twice that)",
           "layer_types": types, "layers": per_layer,
           "total": {"gflop_fwd": sum(t["gflop"] for t in types.values()),
                     "fwd_s": sum(t["fwd_s"] for t in types.values()),
                     "bwd_s": sum(t["bwd_s"] for t in types.values())}}
    if unet:
        res["unet"] = unet_backends(batch, preset, runs)
    return res


class _NoThreadChange:
    """Stand-in for the ``torch`` module inside the spconv adapter whose ``set_num_threads`` does nothing, so that
    spconv runs with the caller's thread count (the adapter forces 1 thread because more give wrong results: this is
    how we show that)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def set_num_threads(n):
        pass


def unet_backends(batch, preset="small", runs=3, threads_list=(1, 2)) -> list:
    """Whole-UNet forward and training step: torch backend at each thread count, spconv single- and multi-thread
    (forward only on CPU: its backward needs CUDA). spconv outputs are compared with the torch backend's."""
    from ..models.spunet import SPUNET_PRESETS, SpUNet
    from ..sparse import spconv_backend

    old = torch.get_num_threads()
    torch.manual_seed(0)
    model = SpUNet(3, 20, backend="torch", **SPUNET_PRESETS[preset])
    state = copy.deepcopy(model.state_dict())
    target = torch.randint(0, 20, (batch["grid_coord"].shape[0],))
    out = []
    try:
        for th in threads_list:
            torch.set_num_threads(th)
            model.load_state_dict(state)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)

            def step():
                loss = torch.nn.functional.cross_entropy(model(batch)["logits"], target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step_t = time_runs(step, runs, 1)["median"]
            model.load_state_dict(state)
            model.eval()
            with torch.no_grad():
                fwd_t = time_runs(lambda: model(batch), runs, 1)["median"]
            out.append({"backend": "torch", "threads": th, "forward": fwd_t, "step": step_t})
        # Compare in train mode (BN with batch statistics): activations are normalised as in a trained network.
        model.load_state_dict(state)
        model.train()
        with torch.no_grad():
            ref = model(batch)["logits"]
        if not spconv_backend.available():
            out.append({"backend": "spconv", "threads": None, "note": "spconv not installed"})
            return out
        model.set_backend("spconv")
        tol = 1e-4 * max(float(ref.abs().max()), 1.0)
        single = None
        for th, forced in ((1, True), (max(threads_list), False)):
            torch.set_num_threads(th)
            saved = spconv_backend.torch
            if not forced:
                spconv_backend.torch = _NoThreadChange()
            try:
                with torch.no_grad():
                    model.eval()  # timed like the torch backend's forward above
                    fwd_t = time_runs(lambda: model(batch), runs, 1)["median"]
                    model.train()
                    gots = [model(batch)["logits"] for _ in range(5)]
            finally:
                spconv_backend.torch = saved
            single = gots[0] if forced else single
            bad = max(int(((g - ref).abs() > tol).any(1).sum()) for g in gots)
            same = all(torch.equal(gots[0], g) for g in gots[1:])
            vs_single = max(int((g != single).any(1).sum()) for g in gots)
            note = "forward only (spconv's CPU backward needs CUDA); " + (
                "forced single-thread (haskd's adapter)" if forced else "multi-thread")
            if bad or not same:
                note += f": WRONG (up to {bad} of {len(ref)} rows differ from the torch backend" + (
                    "; runs differ from each other)" if not same else ")")
            out.append({"backend": "spconv", "threads": th, "forward": fwd_t, "step": None, "mismatch_rows": bad,
                        "rows_not_bitwise_equal_to_1_thread": vs_single, "repeatable_over_5_runs": same,
                        "max_abs_diff": max(float((g - ref).abs().max()) for g in gots), "tolerance": tol,
                        "note": note})
        model.set_backend("torch")
    finally:
        torch.set_num_threads(old)
    return out


# ------------------------------------------------------------------------------------------------ chunked inference
def tiled_scene(scene, grid=3, gap=0.5):
    """``grid x grid`` translated copies of a scene (``gap`` metres apart): a large multi-room test scene."""
    from ..data.scene import Scene

    ext = scene.coord.max(0) - scene.coord.min(0)
    shifts = [np.array([i * (ext[0] + gap), j * (ext[1] + gap), 0], np.float32)
              for i in range(grid) for j in range(grid)]
    return Scene(f"{scene.name}_x{grid * grid}", np.concatenate([scene.coord + s for s in shifts]),
                 np.concatenate([scene.color] * len(shifts)))


def benchmark_chunked(data, ckpt=None, scene=None, grid=3, max_voxels=100000, overlap=1.0, preset="small",
                      voxel_size=0.05, threads=1) -> dict:
    """Peak memory and time of chunked vs one-shot inference on a tiled real room; label agreement of the two.

    Chunked runs first: the one-shot pass's freed memory may stay mapped and would inflate a later peak.
    """
    from ..engine.checkpoint import load_model
    from ..engine.chunked import predict_points_chunked
    from ..engine.evaluate import predict_points
    from ..models.spunet import SPUNET_PRESETS, SpUNet

    torch.set_num_threads(threads)
    if ckpt:
        model, cfg = load_model(ckpt, return_config=True)
        voxel_size, C, nrm = cfg.data.voxel_size, cfg.data.num_classes, cfg.data.use_normal
    else:
        torch.manual_seed(0)
        model, C, nrm = SpUNet(3, 20, backend="torch", **SPUNET_PRESETS[preset]).eval(), 20, False
    big = tiled_scene(_load_real_scene(data, scene), grid)
    res = {"env": env_info("cpu"), "scene": big.name, "points": big.num_points, "voxel_size": voxel_size,
           "max_voxels": max_voxels, "overlap_m": overlap, "model": str(ckpt) if ckpt else f"untrained {preset}"}
    info = {}
    with torch.no_grad():
        with PeakMemory("cpu") as m1:
            t0 = time.perf_counter()
            a = predict_points_chunked(model, big, voxel_size, C, "cpu", nrm, max_voxels=max_voxels,
                                       overlap=overlap, info=info)
            t1 = time.perf_counter()
        res["chunked"] = {"peak_rss_mb": m1.mb, "seconds": t1 - t0, **info}
        a = a.argmax(1)
        with PeakMemory("cpu") as m2:
            t0 = time.perf_counter()
            b = predict_points(model, big, voxel_size, C, "cpu", nrm).argmax(1)
            t1 = time.perf_counter()
        res["one_shot"] = {"peak_rss_mb": m2.mb, "seconds": t1 - t0}
    res["label_agreement"] = float((a == b).float().mean())
    res["memory_method"] = m1.method
    return res


# ------------------------------------------------------------------------------------------------ data loading
def benchmark_loading(cfg, steps=4, workers_list=(0, 1), threads=1) -> dict:
    """Per training step: time waiting for the DataLoader's next batch vs the step itself."""
    from ..data.transforms import collate
    from ..engine.tasks import SegmentationTask
    from ..workflow.build import build_datasets, build_optimizer
    from ..models import build_from_config

    torch.set_num_threads(threads)
    ds = build_datasets(cfg, splits=("train",))["train"]
    # One epoch must hold every timed batch: a new iterator would restart the worker process and time its start-up.
    ds.repeat = max(ds.repeat, -(-(steps + 1) * cfg.data.batch_size // len(ds.scenes)))
    torch.manual_seed(0)
    task = SegmentationTask(build_from_config(cfg)).train()
    opt = build_optimizer(cfg, task.parameters())
    rows = []
    for w in workers_list:
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.data.batch_size, shuffle=False, collate_fn=collate,
                                             num_workers=w, drop_last=False)
        waits, stepts = [], []
        it = iter(loader)
        for n in range(steps + 1):  # the first batch (worker start-up) is not counted
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            losses, _ = task(batch)
            total = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            t2 = time.perf_counter()
            if n > 0:
                waits.append(t1 - t0)
                stepts.append(t2 - t1)
        del it
        wait, st = statistics.median(waits), statistics.median(stepts)
        rows.append({"workers": w, "wait_s": wait, "step_s": st, "share": wait / (wait + st), "steps": len(waits)})
    return {"env": env_info("cpu"), "loading": rows, "target_share": 0.10, "batch_size": cfg.data.batch_size}


# ------------------------------------------------------------------------------------------------ DDP
def _ddp_worker(argv):
    """``python -m haskd.bench.benchmark ddp-worker CONFIG_JSON OUT_JSON STEPS GLOBAL_BATCH [grad]``.

    Each rank takes its share of a fixed global batch. Timing mode: ``STEPS`` DDP steps, rank 0 writes samples/s.
    ``grad`` mode: one backward with the model in eval mode (BatchNorm statistics are per rank on CPU, so BN must
    not normalise with batch statistics for the gradients to match), rank 0 writes the averaged gradients.
    """
    from ..config import from_dict
    from ..data.transforms import collate
    from ..engine import distributed as du
    from ..engine.tasks import SegmentationTask
    from ..workflow.build import build_datasets
    from ..models import build_from_config

    cfg_path, out_path, steps, gb = argv[0], argv[1], int(argv[2]), int(argv[3])
    grad_mode = len(argv) > 4 and argv[4] == "grad"
    cfg = from_dict(json.loads(Path(cfg_path).read_text()))
    du.setup("cpu", cfg.train.threads)  # process group (under torchrun) and threads
    ws, rk = du.world_size(), du.rank()
    ds = build_datasets(cfg, splits=("train",))["train"]
    torch.manual_seed(0)
    task = SegmentationTask(build_from_config(cfg))
    wrapped = torch.nn.parallel.DistributedDataParallel(task) if ws > 1 else task
    mine = [i for i in range(gb) if i % ws == rk]
    batch = collate([ds[i % len(ds)] for i in mine])
    if grad_mode:
        task.eval()
        losses, _ = wrapped(batch)
        sum(losses.values()).backward()
        if rk == 0:
            torch.save({n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}, out_path)
        du.cleanup()
        return
    opt = torch.optim.SGD(task.parameters(), lr=1e-3)
    task.train()

    def step():
        losses, _ = wrapped(batch)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    step()  # warm-up
    du.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    du.barrier()
    wall = time.perf_counter() - t0
    if rk == 0:
        Path(out_path).write_text(json.dumps({"world": ws, "threads": torch.get_num_threads(), "wall_s": wall,
                                              "steps": steps, "samples_per_s": steps * gb / wall}))
    du.cleanup()


def reference_grads(cfg, global_batch: int, world: int) -> dict:
    """Single-process gradients equal to DDP's on ``world`` ranks: DDP averages each rank's mean loss, so the
    reference is the mean over the rank shards' losses, on one process (BN in eval mode)."""
    from ..data.transforms import collate
    from ..engine.tasks import SegmentationTask
    from ..workflow.build import build_datasets
    from ..models import build_from_config

    ds = build_datasets(cfg, splits=("train",))["train"]
    torch.manual_seed(0)
    task = SegmentationTask(build_from_config(cfg)).eval()
    total = 0.0
    for rk in range(world):
        losses, _ = task(collate([ds[i % len(ds)] for i in range(global_batch) if i % world == rk]))
        total = total + sum(losses.values()) / world
    total.backward()
    return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for the DDP rendezvous: a fixed port can still be held
    by an earlier run's socket)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ddp(cfg, out_json, nproc, threads, steps, global_batch, grad=False, port=None, timeout=600) -> dict | None:
    """Start the DDP worker under ``python -m torch.distributed.run`` (or one plain process when ``nproc == 1``);
    ``port``: the rendezvous port (default: a free one)."""
    port = port or free_port()
    cfg = copy.deepcopy(cfg)
    cfg.train.threads = threads
    cfg.train.device = "cpu"
    cfg_path = Path(out_json).with_suffix(".config.json")
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    worker = [str(cfg_path), str(out_json), str(steps), str(global_batch)] + (["grad"] if grad else [])
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               "-m", "haskd.bench.benchmark", "ddp-worker", *worker]
    else:
        cmd = [sys.executable, "-m", "haskd.bench.benchmark", "ddp-worker", *worker]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise HaskdError(f"DDP benchmark process failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")
    return None if grad else json.loads(Path(out_json).read_text())


def benchmark_ddp(cfg, steps=3, global_batch=4) -> dict:
    """Samples/s of 2 processes x 1 thread (torchrun, gloo) vs 1 process x 2 threads, same global batch."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="haskd_ddp_") as tmp:
        for setup, nproc, th in (("torchrun 2 processes x 1 thread", 2, 1), ("1 process x 2 threads", 1, 2)):
            r = run_ddp(cfg, Path(tmp) / f"ddp{nproc}.json", nproc, th, steps, global_batch)
            rows.append({"setup": setup, **r})
    return {"env": env_info("cpu"), "ddp": rows, "global_batch": global_batch,
            "speedup_2proc_over_2threads": rows[0]["samples_per_s"] / rows[1]["samples_per_s"]}


if __name__ == "__main__":  # the DDP worker entry point
    if len(sys.argv) > 1 and sys.argv[1] == "ddp-worker":
        _ddp_worker(sys.argv[2:])
    else:
        sys.exit("usage: python -m haskd.bench.benchmark ddp-worker CONFIG_JSON OUT_JSON STEPS GLOBAL_BATCH [grad]")
