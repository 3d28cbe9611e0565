"""`haskd benchmark` modes run on tiny inputs and write well-formed JSON (no timing assertions)."""
import json

import pytest
import torch

from conftest import TINY
from haskd.cli import main
from haskd.config import load_config
from haskd.engine.checkpoint import save_checkpoint
from haskd.models import build_from_config

TINY_TEACHER = ["role=teacher", "teacher.image_size=[60,80]", "teacher.num_frames=2", "teacher.image_widths=[8,16]",
                "teacher.image_channels=8", "teacher.fusion_hidden=16", "teacher.virtual_views=4"]


def _ckpt(path, overrides, seed=0):
    cfg = load_config(None, TINY + list(overrides))
    torch.manual_seed(seed)
    save_checkpoint(path, config=cfg.to_dict(), state_dict=build_from_config(cfg).state_dict())
    return path


@pytest.fixture(scope="module")
def ckpts(tiny_rooms, tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_ckpts")
    data = [f"data.root={tiny_rooms}", "data.max_voxels=3000"]
    out = {"student": _ckpt(d / "student.pt", data), "baseline": _ckpt(d / "baseline.pt", data, seed=1),
           "teacher": _ckpt(d / "teacher" / "teacher.pt", data + TINY_TEACHER, seed=2)}
    for e in (1, 2):
        _ckpt(d / "snapshots" / f"epoch_{e:03d}.pt", data, seed=10 + e)
    out["snapshots"] = d / "snapshots"
    return out


def test_model_benchmark_json(tiny_rooms, ckpts, tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["benchmark", "--ckpt", str(ckpts["student"]), "--data", str(tiny_rooms), "--baseline",
               str(ckpts["baseline"]), "--teacher", str(ckpts["teacher"]), "--snapshots", str(ckpts["snapshots"]),
               "--runs", "1", "--warmup", "0", "--max-scenes", "1", "--out", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(r["latency"]) == {"student", "baseline", "teacher", "ensemble_2"}
    assert r["params"]["student"] == r["params"]["baseline"] > 0
    assert r["params"]["ensemble"] == 2 * r["params"]["student"]
    assert set(r["train_step"]) >= {"baseline", "haskd_cached", "haskd_online"}
    for k in ("student_over_baseline", "teacher_over_student", "step_haskd_cached_over_baseline"):
        assert r["ratios"][k] > 0
    assert r["env"]["torch"] == torch.__version__ and "sparse_backend" in r["env"]
    assert all(v is None or v > 0 for v in r["memory_mb"].values())
    assert "| student |" in capsys.readouterr().out


def test_train_step_benchmark_times_the_hint_term_apart(tiny_rooms, ckpts, tmp_path):
    """A student config with hints on: HAS-KD is also timed with the cache alone (hints off), in the same run."""
    student = _ckpt(tmp_path / "hint_student.pt", [f"data.root={tiny_rooms}", "data.max_voxels=3000",
                                                   "distill.hint_weight=1"])
    out = tmp_path / "h.json"
    assert main(["benchmark", "--ckpt", str(student), "--data", str(tiny_rooms), "--teacher", str(ckpts["teacher"]),
                 "--runs", "1", "--warmup", "0", "--max-scenes", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["train_step"]) >= {"baseline", "haskd_cached", "haskd_online", "haskd_cached_no_hints",
                                    "haskd_cached_hints_cached"}  # the other way of getting the hints
    assert r["train_step"]["haskd_parts"]["hints"] is True
    assert r["ratios"]["step_haskd_cached_no_hints_over_baseline"] > 0


def test_layers_benchmark_json(tiny_rooms, tmp_path):
    out = tmp_path / "l.json"
    assert main(["benchmark", "--layers", "--data", str(tiny_rooms), "--preset", "tiny", "--voxels", "3000",
                 "--runs", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    kinds = set(r["layer_types"])
    assert {"subm L0", "down L0->L1", "inverse L1->L0"} <= kinds
    assert all(v["gflop"] > 0 and v["fwd_gflops"] > 0 for v in r["layer_types"].values())
    assert r["copy_gbps"] > 0
    for v in r["layer_types"].values():  # the roofline: the limit is the longer of compute and memory time
        assert v["fwd_bound"] in ("memory", "compute") and v["fwd_fraction_of_roofline"] > 0
        assert v["fwd_gb"] > 0 and v["bwd_gb"] > v["fwd_gb"]
    backends = [(u["backend"], u["threads"]) for u in r["unet"]]
    assert ("torch", 1) in backends and ("torch", 2) in backends
    spc = [u for u in r["unet"] if u["backend"] == "spconv"]
    assert spc and (spc[0]["threads"] is None or spc[0]["mismatch_rows"] == 0)  # forced 1 thread is right


def test_conv_bytes_counts_every_pass_of_the_torch_backend():
    from haskd.bench.layers import conv_bytes

    # 10 pairs, 4 input rows (2 ch), 3 output rows (3 ch), float32, int64 index, no centre offset.
    # fwd: gather 10 * (2*2*4 + 8) = 240, GEMM 10 * (2 + 3) * 4 = 200, reduction 10 * (3*4 + 8 + 4) + 3*3*4 = 276
    # bwd: gather grad 10 * (2*3*4 + 8) = 320, GEMM 200, reduction 10 * (2*4 + 12) + 4*2*4 = 232, x again 240,
    #      weight-gradient GEMM 200
    assert conv_bytes(10, 0, 4, 3, 2, 3) == (716.0, 1192.0)
    # a submanifold centre over 3 rows adds one GEMM reading x and reading + writing the output: 3 * (2 + 6) * 4
    assert conv_bytes(10, 3, 4, 3, 2, 3)[0] == 716.0 + 96.0


def test_conv_bytes_of_the_native_kernel():
    from haskd.bench.layers import conv_bytes

    # same conv, fused: a pair reads its input row and both indices and reads + writes its output row
    # fwd: 10 * ((2 + 2*3) * 4 + 2*8) = 480; bwd: input gradient 10 * ((3 + 2*2) * 4 + 16) = 440, weight gradient
    # reads both rows and both indices once: 10 * ((2 + 3) * 4 + 16) = 360
    assert conv_bytes(10, 0, 4, 3, 2, 3, native=True) == (480.0, 800.0)
    # the centre offset over 3 rows: forward GEMM 3 * (2 + 6) * 4 = 96; backward input GEMM 3 * (3 + 4) * 4 = 84
    # and weight GEMM 3 * (3 + 2) * 4 = 60
    assert conv_bytes(10, 3, 4, 3, 2, 3, native=True) == (576.0, 944.0)


def test_loading_benchmark_json(tiny_rooms, ckpts, tmp_path):
    out = tmp_path / "d.json"
    assert main(["benchmark", "--loading", "--ckpt", str(ckpts["student"]), "--data", str(tiny_rooms),
                 "--steps", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [x["workers"] for x in r["loading"]] == [0, 1]
    assert all(0 <= x["share"] <= 1 for x in r["loading"])


def test_ddp_gradients_match_single_process(tiny_rooms, tmp_path):
    """2 gloo ranks (1 sample each, BN in eval mode: CPU BN statistics are per rank) vs one process on the same
    global batch of 2: the averaged gradients agree within float tolerance."""
    from haskd.bench.ddp import reference_grads, run_ddp

    cfg = load_config(None, TINY + [f"data.root={tiny_rooms}", "data.max_voxels=2000", "data.batch_size=1"])
    out = tmp_path / "grads.pt"
    run_ddp(cfg, out, nproc=2, threads=1, steps=1, global_batch=2, grad=True, timeout=300)
    got = torch.load(out, weights_only=True)
    ref = reference_grads(cfg, global_batch=2, world=2)
    assert set(got) == set(ref) and len(ref) > 10
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-6), k


def test_chunked_benchmark_json(tiny_rooms, tmp_path):
    out = tmp_path / "c.json"
    assert main(["benchmark", "--chunked", "--data", str(tiny_rooms), "--preset", "tiny", "--grid", "2",
                 "--max-voxels", "8000", "--overlap", "0.5", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["chunked"]["chunks"] > 1 and r["chunked"]["largest_chunk"] <= 8000
    assert 0.9 <= r["label_agreement"] <= 1.0


def test_bench_checkpoints_example_writes_loadable_checkpoints(tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    from haskd.engine.checkpoint import load_model

    script = Path(__file__).resolve().parents[1] / "examples" / "bench_checkpoints.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--config", "samples_bench", "--out", str(tmp_path),
                                      "model.preset=tiny"])
    runpy.run_path(str(script), run_name="__main__")
    _, cfg = load_model(tmp_path / "teacher" / "teacher.pt", return_config=True)
    assert cfg.role == "teacher"
    assert len(list((tmp_path / "snapshots").glob("epoch_*.pt"))) == 3
    assert load_model(tmp_path / "student.pt").feat_dim == load_model(tmp_path / "baseline.pt").feat_dim


def test_train_step_benchmark_times_mixed_precision_against_float32(tiny_rooms, ckpts, tmp_path):
    """A run that trains under autocast (here CPU bfloat16, given as an override) is timed so, and its float32
    baseline step beside it."""
    out = tmp_path / "a.json"
    assert main(["benchmark", "--ckpt", str(ckpts["student"]), "--data", str(tiny_rooms), "--teacher",
                 str(ckpts["teacher"]), "--runs", "1", "--warmup", "0", "--max-scenes", "1", "--out", str(out),
                 "optim.amp_dtype=bfloat16"]) == 0
    r = json.loads(out.read_text())
    assert set(r["train_step"]) >= {"baseline", "baseline_fp32", "haskd_cached", "haskd_online"}
    assert r["ratios"]["step_baseline_fp32_over_baseline"] > 0


def _spy_run_step(monkeypatch):
    """Record ``(trainer, task class)`` of every ``Trainer.run_step`` call, then run the real step. The trainer itself
    is kept, not its ``id``: a collected trainer's id can be reused by the next one (the test once failed so)."""
    from haskd.engine.trainer import Trainer

    calls, real = [], Trainer.run_step

    def spy(self, batch):
        calls.append((self, type(self.task).__name__))
        return real(self, batch)

    monkeypatch.setattr(Trainer, "run_step", spy)
    return calls


def test_train_step_benchmark_times_the_trainers_run_step(tiny_rooms, ckpts, tmp_path, monkeypatch):
    """Every configuration's step is ``Trainer.run_step``: the baseline (point-only task) and both HAS-KD rows
    (distillation task), each in its memory pass and its timed pass (2 fixed batches each, runs=1, warmup=0)."""
    calls = _spy_run_step(monkeypatch)
    out = tmp_path / "s.json"
    assert main(["benchmark", "--ckpt", str(ckpts["student"]), "--data", str(tiny_rooms), "--teacher",
                 str(ckpts["teacher"]), "--runs", "1", "--warmup", "0", "--max-scenes", "1", "--out", str(out)]) == 0
    rows = [k for k, v in json.loads(out.read_text())["train_step"].items() if "median" in v]
    assert rows == ["baseline", "haskd_cached", "haskd_online"]
    per_trainer = {}
    for trainer, kind in calls:  # the list holds every trainer, so no two share an id
        per_trainer.setdefault(id(trainer), []).append(kind)
    kinds = sorted(ks[0] for ks in per_trainer.values())
    assert len(per_trainer) == 2 * len(rows) and all(len(ks) == 2 for ks in per_trainer.values())
    assert kinds == ["DistillTask"] * 4 + ["SegmentationTask"] * 2


def test_loading_benchmark_times_the_trainers_run_step(tiny_rooms, ckpts, tmp_path, monkeypatch):
    calls = _spy_run_step(monkeypatch)
    assert main(["benchmark", "--loading", "--ckpt", str(ckpts["student"]), "--data", str(tiny_rooms),
                 "--steps", "1", "--out", str(tmp_path / "d.json")]) == 0
    assert len(calls) == 2 * (1 + 1)  # workers 0 and 1, the untimed first batch included


def test_benchmark_step_is_the_training_step(tiny_rooms):
    """From the same state, one benchmark step (gradient clipping on) and one training step (``build_trainer`` with
    the run's schedule, as ``haskd train`` builds it) give the same weights, digit for digit; clipping changes them."""
    from haskd.bench.steps import _step_fn, _train_batches
    from haskd.workflow.build import build_datasets, build_model, build_trainer, steps_per_epoch, train_sampler

    def training_step(cfg, batch):
        torch.manual_seed(0)
        datasets = build_datasets(cfg, splits=("train",))
        trainer = build_trainer(cfg, build_model(cfg), datasets, torch.device("cpu"),
                                cfg.train.epochs * steps_per_epoch(cfg, train_sampler(cfg, datasets["train"])))
        trainer.task.train()
        return trainer.run_step(batch), trainer.task.state_dict()

    cfg = load_config(None, TINY + [f"data.root={tiny_rooms}", "data.max_voxels=2000", "optim.clip_grad=0.05"])
    step, _, _ = _step_fn(cfg, torch.device("cpu"), n_batches=1)
    step()
    bench = step.trainer.task.state_dict()
    _, batches = _train_batches(cfg, 1, build_datasets(cfg, splits=("train",)))
    _, trained = training_step(cfg, batches[0])
    assert set(bench) == set(trained)
    assert all(torch.equal(bench[k], trained[k]) for k in bench)
    unclipped = load_config(None, TINY + [f"data.root={tiny_rooms}", "data.max_voxels=2000", "optim.clip_grad=0"])
    _, free = training_step(unclipped, batches[0])
    assert any(not torch.equal(bench[k], free[k]) for k in bench if bench[k].is_floating_point())


def test_ddp_benchmark_alternates_setups_and_reports_medians_against_one_core(monkeypatch):
    """--ddp runs its setups in turn, round after round, and compares each setup's median to 1 process x 1 thread
    (the timing itself is stubbed: no timing is asserted)."""
    from haskd.bench import ddp

    from haskd.config import Config

    order, rate = [], {(1, 1, False): [1.0, 3.0, 2.0], (2, 1, False): [3.0, 3.6, 4.0], (1, 2, False): [2.0, 2.2, 2.4],
                       (2, 1, True): [3.9, 3.8, 3.7]}

    def fake(cfg, out, nproc, threads, steps, global_batch):
        key = (nproc, threads, cfg.data.balance_ranks)
        order.append(key)
        return {"world": nproc, "threads": threads, "wall_s": 1.0, "steps": steps,
                "samples_per_s": rate[key][order.count(key) - 1]}

    monkeypatch.setattr(ddp, "run_ddp", fake)
    r = ddp.benchmark_ddp(Config(), steps=2, rounds=3)
    assert order == [(1, 1, False), (2, 1, False), (1, 2, False), (2, 1, True)] * 3
    assert [row["samples_per_s"] for row in r["ddp"]] == [2.0, 3.6, 2.2, 3.8]
    assert r["speedup_2proc_over_1core"] == 1.8 and r["speedup_2threads_over_1core"] == 1.1
    assert r["speedup_2proc_balanced_over_1core"] == 1.9
    assert abs(r["speedup_2proc_over_2threads"] - 3.6 / 2.2) < 1e-12
