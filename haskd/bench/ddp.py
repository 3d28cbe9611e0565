"""``haskd benchmark --ddp``: samples/s of 2 torchrun processes (1 thread each) and of 1 process with 2 threads, each
against 1 process with 1 thread (what the second core buys); the
worker entry point (``python -m haskd.bench.ddp ddp-worker ...``) and the single-process reference gradients."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..errors import HaskdError
from .common import env_info


def _ddp_worker(argv):
    """``python -m haskd.bench.ddp ddp-worker CONFIG_JSON OUT_JSON STEPS GLOBAL_BATCH [grad]``.

    Each rank takes its share of a fixed global batch. Timing mode: ``STEPS`` DDP steps (``Trainer.run_step``),
    rank 0 writes samples/s.
    ``grad`` mode: one backward with the model in eval mode (BatchNorm statistics are per rank on CPU, so BN must
    not normalise with batch statistics for the gradients to match), rank 0 writes the averaged gradients.
    """
    from ..config import from_dict, point_only
    from ..data.transforms import collate
    from ..engine import distributed as du
    from ..engine.tasks import SegmentationTask
    from ..workflow.build import build_datasets, build_model
    from .steps import _trainer

    cfg_path, out_path, steps, gb = argv[0], argv[1], int(argv[2]), int(argv[3])
    grad_mode = len(argv) > 4 and argv[4] == "grad"
    cfg = from_dict(json.loads(Path(cfg_path).read_text()))
    du.setup("cpu", cfg.train.threads)  # process group (under torchrun) and threads
    ws, rk = du.world_size(), du.rank()
    ds = build_datasets(cfg, splits=("train",))["train"]
    torch.manual_seed(0)
    model = build_model(cfg)
    if cfg.data.balance_ranks:  # the split training uses (data.balance_ranks), by this batch's voxels
        from ..data.sampler import split_by_size

        samples = {i: ds[i % len(ds)] for i in range(gb)}
        mine = split_by_size(range(gb), [s["grid_coord"].shape[0] for s in samples.values()], ws, -(-gb // ws))[rk]
    else:  # round robin, as DistributedSampler: this rank loads its own samples only
        mine = [i for i in range(gb) if i % ws == rk]
        samples = {i: ds[i % len(ds)] for i in mine}
    batch = collate([samples[i] for i in mine])
    if grad_mode:
        task = SegmentationTask(model).eval()
        wrapped = torch.nn.parallel.DistributedDataParallel(task) if ws > 1 else task
        losses, _ = wrapped(batch)
        sum(losses.values()).backward()
        if rk == 0:
            torch.save({n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}, out_path)
        del wrapped, losses  # DDP's reducer holds the process group: release it before the group is torn down
        du.cleanup()
        return
    base = point_only(cfg)  # the point-only task's training step, wrapped in DDP by build_trainer
    trainer = _trainer(base, model, torch.device("cpu"), {"train": ds}, steps + 1)
    trainer.run_step(batch)  # warm-up
    du.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.run_step(batch)
    du.barrier()
    wall = time.perf_counter() - t0
    if rk == 0:
        Path(out_path).write_text(json.dumps({"world": ws, "threads": torch.get_num_threads(), "wall_s": wall,
                                              "steps": steps, "samples_per_s": steps * gb / wall}))
    del trainer  # holds the DDP model (see the grad branch)
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
               "-m", "haskd.bench.ddp", "ddp-worker", *worker]
    else:
        cmd = [sys.executable, "-m", "haskd.bench.ddp", "ddp-worker", *worker]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:  # the ranks' own messages first: torchrun's summary at the tail hides why a rank died
        said = [ln for ln in r.stderr.splitlines() if any(k in ln for k in ("Error", "terminate", "what()"))]
        raise HaskdError(f"DDP benchmark process failed (exit {r.returncode}): " + " | ".join(said[:8])
                         + f" ... {r.stderr.strip()[-600:]}")
    return None if grad else json.loads(Path(out_json).read_text())


# The setups timed by ``--ddp``: (name, processes, threads per process); the first is the 1-core reference.
DDP_SETUPS = (("1 process x 1 thread", 1, 1), ("torchrun 2 processes x 1 thread", 2, 1),
              ("1 process x 2 threads", 1, 2), ("torchrun 2 processes x 1 thread, balanced ranks", 2, 1))


def benchmark_ddp(cfg, steps=3, global_batch=4, rounds=1) -> dict:
    """Samples/s of 2 processes x 1 thread (torchrun, gloo) and 1 process x 2 threads against 1 process x 1 thread,
    same model, same global batch. ``rounds``: the setups run in turn that many times (A B C A B C ...), each
    setup's median reported, so a machine whose speed drifts affects all of them alike."""
    import statistics

    runs = {name: [] for name, _, _ in DDP_SETUPS}
    with tempfile.TemporaryDirectory(prefix="haskd_ddp_") as tmp:
        for _ in range(max(1, rounds)):
            for name, nproc, th in DDP_SETUPS:
                c = copy.deepcopy(cfg)
                c.data.balance_ranks = name.endswith("balanced ranks")
                runs[name].append(run_ddp(c, Path(tmp) / f"ddp{nproc}x{th}.json", nproc, th, steps, global_batch))
    rows = []
    for name, _, _ in DDP_SETUPS:
        r = sorted(runs[name], key=lambda x: x["samples_per_s"])[len(runs[name]) // 2]
        rows.append({"setup": name, **r, "samples_per_s_all": [x["samples_per_s"] for x in runs[name]],
                     "samples_per_s": statistics.median(x["samples_per_s"] for x in runs[name])})
    one, procs, threads, balanced = (r["samples_per_s"] for r in rows)
    return {"env": env_info("cpu"), "ddp": rows, "global_batch": global_batch, "rounds": max(1, rounds),
            "speedup_2proc_over_1core": procs / one, "speedup_2threads_over_1core": threads / one,
            "speedup_2proc_balanced_over_1core": balanced / one, "speedup_2proc_over_2threads": procs / threads}


if __name__ == "__main__":  # the DDP worker entry point
    if len(sys.argv) > 1 and sys.argv[1] == "ddp-worker":
        _ddp_worker(sys.argv[2:])
    else:
        sys.exit("usage: python -m haskd.bench.ddp ddp-worker CONFIG_JSON OUT_JSON STEPS GLOBAL_BATCH [grad]")