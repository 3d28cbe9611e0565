#!/usr/bin/env python3
"""The prepared GPU check (`make gpu-check OUT=DIR`): every CUDA path of haskd, time-boxed, into one JSON.

Runs on a CUDA machine that has PyTorch and haskd's dependencies and no network (README, "GPU check"). Parts, each a
child process with its own time limit, so that one slow or broken part cannot eat the others' time:

- ``tests``: the CUDA tests (``pytest -m cuda``: every test that skips without CUDA), CPU-vs-CUDA agreement of the
  sparse conv, a SpUNet step, PTv3 and a cached distillation step; and the tests that need timm (``-m timm``: the
  teacher's pretrained 2D encoder), which a CUDA machine usually has and a CPU setup does not.
- ``throughput``: training step time, samples/s, points/s and peak memory of SpUNet small/base and PTv3 small at
  2 cm on ScanNet-sized rooms (real rooms tiled to about 150k points), batch 8, float32 and AMP; spconv beside the
  pure-PyTorch backend when spconv imports.
- ``pipeline``: the whole synthetic HAS-KD pipeline (`haskd demo`'s rooms and preset) on CUDA, with its table.
- ``benchmark``: `haskd benchmark` on the pipeline's checkpoints: student / teacher / snapshot-ensemble latency and
  the cached KD step against the baseline step.

Writes ``OUT/gpu_check.json`` after every part (a part killed at its limit is recorded as such) and
``OUT/gpu_check.log``. Exit status 0 when every part ran to its end without error (failed tests count as an error).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# seconds per part: together under 8 minutes, python start-ups and the room generation included
# (measured on one H200: tests 26 s, throughput 52 s, the pipeline ~4 min, the benchmark ~40 s)
LIMITS = {"tests": 50, "throughput": 80, "pipeline": 270, "benchmark": 60}
DEMO_ROOMS = (24, 8, 1)          # what `haskd demo` runs (haskd/commands/pipeline.py DEMO_ROOMS)
TINY_ROOMS = (2, 1, 1)           # --tiny: a check of this script itself on any machine


def _log(out: Path, text: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    print(line, flush=True)
    with open(out / "gpu_check.log", "a") as f:
        f.write(line + "\n")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ rooms
def tile_rooms(src_root: Path, dst_root: Path, target_points: int = 150_000, n_scenes: int = 3,
               split: str = "train") -> dict:
    """Scene folders of about ``target_points`` points each, made by placing rooms of ``src_root/<split>`` side by
    side along x (0.5 m apart), as a stand-in for full-resolution ScanNet rooms (~150k points). Writes
    ``dst_root/{train,val}/tile_<i>/`` (val holds a copy of the first tile) and returns their point counts."""
    import numpy as np

    from haskd.data.scene import write_scene

    scenes = sorted(p for p in (src_root / split).iterdir() if (p / "coord.npy").is_file())
    if not scenes:
        raise SystemExit(f"gpu-check: no scene folders in {src_root / split}")
    seg_name = next((n for n in ("segment20.npy", "segment.npy") if (scenes[0] / n).is_file()), None)
    counts = []
    for t in range(n_scenes):
        parts, shift, k = [], 0.0, t
        while sum(len(p[0]) for p in parts) < target_points:
            s = scenes[k % len(scenes)]
            k += 1
            c = np.load(s / "coord.npy").astype(np.float64)
            c = c - c.min(0)
            c[:, 0] += shift
            shift = c[:, 0].max() + 0.5
            seg = np.load(s / seg_name).astype(np.int64) if seg_name else np.full(len(c), -1)
            parts.append((c, np.load(s / "color.npy"), seg))
        coord = np.concatenate([p[0] for p in parts]).astype(np.float32)
        color = np.concatenate([p[1] for p in parts])
        seg = np.concatenate([p[2] for p in parts])
        for sp in (("train", "val") if t == 0 else ("train",)):
            write_scene(dst_root / sp / f"tile_{t}", coord, color, segment=seg)
        counts.append(int(len(coord)))
    return {"source": str(src_root), "points": counts}


def _default_rooms(out: Path, tiny: bool) -> Path:
    """A root to tile: ``../shared/data`` prepared as haskd samples when present, else synthetic rooms."""
    from haskd.data.synthetic import write_dataset

    root = out / "synthetic_src"
    if not (root / "train").is_dir():
        write_dataset(root, num_train=2 if tiny else 6, num_val=1, seed=3, progress=False,
                      points_per_m2=200.0 if tiny else 1200.0, num_frames=1)
    return root


# ------------------------------------------------------------------------------------------------ parts
def part_tests(args, out: Path) -> dict:
    import xml.etree.ElementTree as ET

    xml = out / "cuda_tests.xml"
    env = dict(os.environ)
    if args.device == "cpu":
        env["HASKD_CUDA_TESTS_ON"] = "cpu"  # --allow-cpu: the tests against themselves
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda or timm", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "-o", "addopts="]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (out / "cuda_tests.log").write_text(r.stdout + r.stderr)
    res = {"returncode": r.returncode, "tail": (r.stdout + r.stderr)[-1500:]}
    if xml.is_file():
        cases = []
        for tc in ET.parse(xml).getroot().iter("testcase"):
            status, msg = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = tc.find(tag)
                if el is not None:
                    status, msg = tag, (el.get("message") or "")[:300]
            cases.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "status": status,
                          "seconds": float(tc.get("time", 0)), "message": msg})
        res["cases"] = cases
        res["counts"] = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failure", "error", "skipped")}
    res["ok"] = r.returncode == 0
    return res


def _throughput_one(cfg, device, steps, warmup) -> dict:
    import torch

    from haskd.bench.common import PeakMemory, time_runs
    from haskd.bench.steps import _step_fn

    step, setup_s, voxels = _step_fn(cfg, device, n_batches=2, steps=steps + warmup)
    with PeakMemory(device) as mem:
        t = time_runs(step, runs=steps, warmup=warmup, device=device)
    med = t["median"]
    bs = cfg.data.batch_size
    return {"step_s": med, "min_s": t["min"], "max_s": t["max"], "steps": t["runs"], "voxels_per_batch": voxels,
            "samples_per_s": bs / med, "voxels_per_s": voxels / med, "peak_mb": mem.mb, "setup_s": setup_s,
            "torch_threads": torch.get_num_threads()}


def part_throughput(args, out: Path) -> dict:
    import gc

    import torch

    from haskd.config import load_config
    from haskd.sparse import spconv_available

    device = torch.device(args.device)
    src = Path(args.rooms) if args.rooms else _default_rooms(out, args.tiny)
    root = out / "rooms_tiled"
    target = 20_000 if args.tiny else 150_000
    rooms = tile_rooms(src, root, target_points=target)
    voxel = 0.1 if args.tiny else 0.02
    batch = 2 if args.tiny else 8
    models = [("spunet", "tiny" if args.tiny else "small"), ("ptv3", "tiny" if args.tiny else "small")] if args.tiny \
        else [("spunet", "small"), ("spunet", "base"), ("ptv3", "small")]
    runs = [(n, p, amp, "torch") for n, p in models for amp in (False, True)]
    if spconv_available() and device.type == "cuda":
        runs.append(("spunet", "small", False, "spconv"))
    res = {"rooms": rooms, "voxel_size": voxel, "batch_size": batch, "results": [],
           "spconv": "available" if spconv_available() else "not importable here: only the torch backend is timed"}
    t_end = time.time() + LIMITS["throughput"] * 0.85
    for name, preset, amp, backend in runs:
        row = {"model": name, "preset": preset, "amp": amp, "backend": backend}
        if time.time() > t_end:
            row["skipped"] = "out of time"
            res["results"].append(row)
            continue
        cfg = load_config("scannet20_student", [
            f"data.root={root}", f"data.voxel_size={voxel}", f"data.batch_size={batch}", "data.max_voxels=1000000",
            "data.use_normal=false", f"model.name={name}", f"model.preset={preset}", f"model.backend={backend}",
            f"train.device={device.type}", f"optim.amp={str(amp).lower()}", "optim.amp_dtype=float16"
            if device.type == "cuda" else "optim.amp_dtype=bfloat16"])
        try:
            row.update(_throughput_one(cfg, device, steps=2 if args.tiny else 5, warmup=1 if args.tiny else 2))
            pts = sum(rooms["points"]) / len(rooms["points"]) * batch
            row["points_per_s"] = pts / row["step_s"]
        except Exception as e:  # an OOM or a kernel failure is a result, not the end of the check
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        res["results"].append(row)
        _log(out, f"  throughput {name}/{preset} amp={amp} {backend}: "
                  + (f"{row['step_s']:.3f} s/step, {row['samples_per_s']:.2f} samples/s, {row['peak_mb']:.0f} MiB"
                     if "step_s" in row else row.get("error", row.get("skipped", ""))))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["ok"] = all("error" not in r for r in res["results"])
    return res


def _demo_paths(out: Path, tiny: bool):
    n_train, n_val, seed = TINY_ROOMS if tiny else DEMO_ROOMS
    demo = out / "demo"
    return demo, demo / f"data_{n_train}_{n_val}_{seed}", (n_train, n_val, seed)


def make_demo_rooms(out: Path, tiny: bool) -> None:
    """The demo's rooms, generated in parallel processes (the same files as `haskd demo` would write)."""
    from haskd.data.synthetic import write_dataset

    _, data, (n_train, n_val, seed) = _demo_paths(out, tiny)
    write_dataset(data, num_train=n_train, num_val=n_val, seed=seed, progress=False,
                  jobs=min(16, os.cpu_count() or 1))


def part_pipeline(args, out: Path) -> dict:
    demo, data, (n_train, n_val, seed) = _demo_paths(out, args.tiny)
    t0 = time.time()
    if not (data / "val").is_dir():
        make_demo_rooms(out, args.tiny)
    rooms_s = time.time() - t0
    cmd = [sys.executable, "-m", "haskd", "demo", "--out", str(demo), "--rooms", f"{n_train},{n_val},{seed}",
           f"train.device={args.device}"]
    if args.tiny:
        cmd += ["--epochs", "1", "model.preset=tiny", "teacher.image_size=[30,40]", "teacher.num_frames=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t1 = time.time()
    with open(out / "pipeline.log", "w") as log:  # streamed: a run stopped at its limit still shows how far it got
        r = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    text = (out / "pipeline.log").read_text()
    res = {"command": " ".join(cmd[1:]), "returncode": r.returncode, "rooms_s": rooms_s,
           "pipeline_s": time.time() - t1, "table": text[text.rfind("HAS-KD demo"):][-3000:]
           if "HAS-KD demo" in text else "", "tail": text[-1500:]}
    runs = sorted(p for p in demo.iterdir() if p.is_dir() and (p / "summary.json").is_file())
    if runs:
        s = json.loads((runs[0] / "summary.json").read_text())
        res["summary"] = {k: v["metrics"] for k, v in s.items() if isinstance(v, dict) and "metrics" in v}
        res["run_dir"] = str(runs[0])
    res["ok"] = r.returncode == 0
    return res


def part_benchmark(args, out: Path) -> dict:
    from haskd.bench import benchmark_models, to_markdown

    demo, data, _ = _demo_paths(out, args.tiny)
    runs = sorted(p for p in demo.glob("*_seed*") if p.is_dir()) if demo.is_dir() else []
    if not runs:
        return {"ok": False, "error": "no pipeline run to benchmark (the pipeline part did not get far enough)"}
    run = runs[0]
    student = next((run / d / "last.pt" for d in ("student", "stage1", "baseline") if (run / d / "last.pt").is_file()),
                   None)
    if student is None:
        return {"ok": False, "error": f"{run}: no student checkpoint yet"}
    teacher = run / "teacher" / "last.pt"
    snaps = run / "stage1" / "snapshots"
    base = run / "baseline" / "last.pt"
    res = benchmark_models(str(student), str(data), "val", teacher=str(teacher) if teacher.is_file() else None,
                           snapshots=str(snaps) if snaps.is_dir() and any(snaps.glob("epoch_*.pt")) else None,
                           baseline=str(base) if base.is_file() and base != student else None,
                           runs=2 if args.tiny else 5, warmup=1, threads=0, device=args.device,
                           max_scenes=1 if args.tiny else 3)
    (out / "benchmark.md").write_text(to_markdown(res))
    return {"ok": True, "student": str(student), "ratios": res.get("ratios", {}), "result": res}


PARTS = {"tests": part_tests, "throughput": part_throughput, "pipeline": part_pipeline, "benchmark": part_benchmark}


# ------------------------------------------------------------------------------------------------ driver
def _env(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_count": os.cpu_count(), "device": device, "host": platform.node()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                    capability=f"{p.major}.{p.minor}", gpus=torch.cuda.device_count())
    for mod in ("numpy", "scipy", "yaml", "plyfile", "PIL", "tqdm", "matplotlib", "tensorboard", "spconv", "timm"):
        try:
            m = __import__(mod)
            info[f"v_{mod}"] = getattr(m, "__version__", "present")
        except Exception as e:  # recorded, not fatal: each part says what it misses
            info[f"v_{mod}"] = f"missing ({type(e).__name__})"
    return info


def run_part_child(args) -> int:
    out = Path(args.out)
    try:
        res = PARTS[args.part](args, out)
    except Exception as e:
        import traceback

        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    _write_json(out / f"part_{args.part}.json", res)
    sys.stdout.flush()
    # no interpreter teardown: once its result is written a part is done (one benchmark run hung there past its limit)
    os._exit(0 if res.get("ok") else 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.log and the parts' files")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    ap.add_argument("--rooms", default=None, help="prepared scene root whose train rooms are tiled for the "
                    "throughput part (e.g. `haskd prepare samples` output's scannet/); default: synthetic rooms")
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU (a check of this script, not of CUDA)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (with --allow-cpu: the script's own test)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every part's time limit")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.part:
        return run_part_child(args)

    import torch

    if torch.cuda.is_available():
        args.device = "cuda"
    elif args.allow_cpu:
        args.device = "cpu"
    else:
        print(f"gpu-check: torch {torch.__version__} sees no CUDA GPU; run it on a CUDA machine (README, "
              "'GPU check'), or pass --allow-cpu to check the script itself", file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        print(f"gpu-check: unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.log").write_text("")
    report = {"env": _env(args.device), "limits_s": {p: LIMITS[p] * args.scale for p in parts}, "parts": {}}
    _write_json(out / "gpu_check.json", report)
    _log(out, f"gpu-check on {report['env'].get('gpu', args.device)}, torch {report['env']['torch']}")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    rooms = None
    if "pipeline" in parts:  # CPU work: generate the demo's rooms while the GPU parts before it run
        code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {str(REPO)!r}); "
                f"from scripts.gpu_check import make_demo_rooms; from pathlib import Path; "
                f"make_demo_rooms(Path({str(out)!r}), {args.tiny})")
        rooms = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                 stderr=open(out / "rooms.log", "w"))
    t_all = time.time()
    for p in parts:
        limit = LIMITS[p] * args.scale
        if p == "pipeline" and rooms is not None:
            rooms.wait()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", p, "--out", str(out), "--device",
               args.device] + (["--tiny"] if args.tiny else []) + (["--rooms", args.rooms] if args.rooms else [])
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=open(out / f"part_{p}.out", "w"),
                                stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and every process it started
            proc.wait()
            timed_out = True
        pj = out / f"part_{p}.json"
        res = json.loads(pj.read_text()) if pj.is_file() else {"ok": False}
        if timed_out:
            res.update(ok=False, timed_out=True, error=f"stopped at its {limit:.0f} s limit")
        res["wall_s"] = round(time.time() - t0, 1)
        report["parts"][p] = res
        report["total_s"] = round(time.time() - t_all, 1)
        _write_json(out / "gpu_check.json", report)
        _log(out, f"{p}: {'ok' if res.get('ok') else 'FAILED'} in {res['wall_s']} s"
                  + (f" ({res.get('error')})" if res.get("error") else ""))
    if rooms is not None and rooms.poll() is None:
        rooms.kill()
    ok = all(r.get("ok") for r in report["parts"].values())
    _log(out, f"done in {report['total_s']} s: {'all parts ok' if ok else 'some parts failed'} -> "
              f"{out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
