"""The training loop, and nothing else: ``run_step`` turns a batch into named losses and one optimizer step;
``fit`` runs epochs of steps and calls its hooks (evaluation, checkpoints, snapshots, logs, progress:
:mod:`haskd.engine.hooks`).

The trainer never knows which losses exist, which model it trains or which role the run has: a task
(:mod:`haskd.engine.tasks`, :class:`haskd.distill.task.DistillTask`) returns ``(losses, out)`` and the trainer sums
the losses. What is built from a config (task, optimizer, schedule, hooks) is built by :mod:`haskd.workflow.build`.
"""
from __future__ import annotations

import contextlib
import random
import time

import numpy as np
import torch

from ..errors import HaskdError
from . import distributed as dist_utils
from .tasks import move_to


class Trainer:
    """``task(batch) -> (losses, out)`` trained by ``optimizer`` under ``scheduler`` (stepped every step).

    ``wrapped``: what the step calls (the task under DDP, else the task itself); ``params``: the parameters the
    gradient clip sees (``clip_grad`` > 0: the global norm is clipped to it); ``amp_dtype``: autocast dtype of the
    forward (None: float32; float16 adds a gradient scaler); ``ahead``: for a task with an ``ahead(batch)`` method
    (:class:`haskd.distill.task.DistillTask`), run it on the next batch in a second thread while this batch trains
    (:meth:`look_ahead`)."""

    def __init__(self, task, optimizer, scheduler, device, params=None, wrapped=None, clip_grad: float = 0.0,
                 amp_dtype=None, hooks=(), ahead: bool = False):
        self.task = task
        self.wrapped = wrapped if wrapped is not None else task
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.params = list(params) if params is not None else [p for p in task.parameters() if p.requires_grad]
        self.clip_grad = clip_grad
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        self.hooks = list(hooks)
        self.ahead = bool(ahead) and callable(getattr(task, "ahead", None))
        self.step = 0           # optimizer steps taken, over the whole run (a resumed run starts where it was)
        self.epoch = 0          # the epoch running (0-based), then the number of epochs done
        self.loader = None      # the epoch's batches (a hook may wrap them, e.g. in a progress bar)
        self.record = {}        # the epoch's record: train losses, then what hooks add (val metrics, ...)
        self.metrics = {}       # the last evaluation's metrics (set by the evaluation hook)

    def run_step(self, batch) -> dict:
        """One training step: batch -> named losses -> total -> finite check -> backward -> clip -> optimizer and
        schedule step. Returns the named losses as floats, with their sum as ``loss``."""
        batch = move_to(batch, self.device)
        with autocast(self.amp_dtype, self.device):
            losses, _ = self.wrapped(batch)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise HaskdError(f"loss became {total.item()} at epoch {self.epoch + 1}; lower optim.lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["loss"] = float(total.detach())
        return out

    def fit(self, loader_of_epoch, start_epoch: int, epochs: int) -> dict:
        """Train epochs ``start_epoch .. epochs - 1``; ``loader_of_epoch(epoch)`` gives an epoch's batches.
        Returns the last evaluation's metrics."""
        self.epoch = start_epoch
        self._call("before_train")
        for epoch in range(start_epoch, epochs):
            self.epoch = epoch
            self.loader = loader_of_epoch(epoch)
            self.task.train()
            self._call("before_epoch")
            t0, sums, n = time.perf_counter(), {}, 0
            for batch in (self.look_ahead(self.loader) if self.ahead else self.loader):
                losses = self.run_step(batch)
                n += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                self._call("after_step", losses)
            self.record = {"epoch": epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                           "epoch_time_s": time.perf_counter() - t0,
                           **{f"train/{k}": v / max(n, 1) for k, v in sums.items()}}
            self._call("after_epoch")
            dist_utils.barrier()
        self.epoch = epochs
        self._call("after_train")
        return self.metrics

    def look_ahead(self, batches):
        """Yield ``batches`` (moved to the device) one late, each carrying ``batch["ahead"]``: a future of
        ``task.ahead(batch)`` (the targets that frozen models compute from the batch alone), submitted to a worker
        thread when the batch is fetched. So the frozen teacher runs on batch t+1 while the student trains on batch
        t: on a CPU whose second core a second intra-op thread barely uses, that core does the teacher's work.
        Every op runs with the same intra-op thread count as in the step, so the numbers are the same as without
        (tests/test_hints.py). The worker runs under the step's autocast."""
        from concurrent.futures import ThreadPoolExecutor

        from ..threads import in_this_context

        @in_this_context
        def targets(batch):
            with autocast(self.amp_dtype, self.device):
                return self.task.ahead(batch)

        with ThreadPoolExecutor(1, thread_name_prefix="haskd-ahead") as pool:
            held = None
            for batch in batches:
                batch = move_to(batch, self.device)
                batch["ahead"] = pool.submit(targets, batch)
                if held is not None:
                    yield held
                held = batch
            if held is not None:
                yield held

    def _call(self, what, *args):
        for h in self.hooks:
            getattr(h, what)(self, *args)

    # ------------------------------------------------------------------ state (checkpoints, resume)
    def state_dict(self) -> dict:
        return dict(task_state=self.task.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), rng=rng_state(),
                    scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {})

    def load_state_dict(self, ck: dict, schedule: bool = True) -> None:
        """Task, optimizer, RNG and scaler state of a checkpoint; the schedule's too unless ``schedule`` is False
        (an extended run keeps its rebuilt schedule)."""
        self.task.load_state_dict(ck["task_state"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if schedule:
            self.scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        if self.scaler.is_enabled() and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2])}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(int(x) for x in s["python"]), None))
    st = np.random.get_state()
    np.random.set_state((st[0], s["numpy"].numpy().astype(np.uint32), int(s.get("numpy_pos", 624)), 0, 0.0))


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast_dtype(cfg, device):
    """The autocast dtype of a run, or None for full float32: ``optim.amp`` with ``optim.amp_dtype`` on CUDA; on
    CPU only bfloat16 (float16 autocast on CPU is slow and needs a scaler), so the default stays float32 there."""
    name = cfg.optim.amp_dtype
    if name not in AMP_DTYPES:
        raise HaskdError(f"optim.amp_dtype must be {' or '.join(AMP_DTYPES)}, got {name!r}")
    if not cfg.optim.amp or (device.type == "cpu" and name != "bfloat16") or device.type not in ("cpu", "cuda"):
        return None
    return AMP_DTYPES[name]


def autocast(amp_dtype, device):
    """The training step's autocast context (:func:`autocast_dtype`; a no-op for None)."""
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
