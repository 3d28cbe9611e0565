"""``haskd benchmark --loading``: share of a training step spent waiting for the DataLoader (workers 0 and 1)."""
from __future__ import annotations

import statistics
import time

import torch

from .common import env_info


def benchmark_loading(cfg, steps=4, workers_list=(0, 1), threads=1) -> dict:
    """Per training step: time waiting for the DataLoader's next batch vs the step itself (``Trainer.run_step`` of
    the config's point-only task: distillation settings are dropped, the loader is what is measured)."""
    from ..config import point_only
    from ..data.transforms import collate
    from ..workflow.build import build_datasets, build_model
    from .steps import _trainer

    torch.set_num_threads(threads)
    ds = build_datasets(cfg, splits=("train",))["train"]
    # One epoch must hold every timed batch: a new iterator would restart the worker process and time its start-up.
    ds.repeat = max(ds.repeat, -(-(steps + 1) * cfg.data.batch_size // len(ds.scenes)))
    torch.manual_seed(0)
    base = point_only(cfg)
    trainer = _trainer(base, build_model(base), torch.device("cpu"), {"train": ds}, len(workers_list) * (steps + 1))
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
            trainer.run_step(batch)
            t2 = time.perf_counter()
            if n > 0:
                waits.append(t1 - t0)
                stepts.append(t2 - t1)
        del it
        wait, st = statistics.median(waits), statistics.median(stepts)
        rows.append({"workers": w, "wait_s": wait, "step_s": st, "share": wait / (wait + st), "steps": len(waits)})
    return {"env": env_info("cpu"), "loading": rows, "target_share": 0.10, "batch_size": cfg.data.batch_size}
