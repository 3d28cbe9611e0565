"""``haskd benchmark --loading``: share of a training step spent waiting for the DataLoader (workers 0 and 1)."""
from __future__ import annotations

import statistics
import time

import torch

from .common import env_info


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
