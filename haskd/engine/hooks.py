"""Hooks of :class:`haskd.engine.trainer.Trainer`: everything a run does around its steps.

A hook implements any of ``before_train``, ``before_epoch``, ``after_step(losses)``, ``after_epoch`` and
``after_train``, each called with the trainer; hooks run in list order (:func:`haskd.workflow.build.build_hooks`
puts evaluation before logging and checkpoints, which read its metrics).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .checkpoint import save_checkpoint

log = logging.getLogger(__name__)


class Hook:
    def before_train(self, trainer):
        pass

    def before_epoch(self, trainer):
        pass

    def after_step(self, trainer, losses: dict):
        pass

    def after_epoch(self, trainer):
        pass

    def after_train(self, trainer):
        pass


class Evaluation(Hook):
    """Evaluate ``model`` on ``dataset`` every ``every`` epochs and after the last (``every`` <= 0: only the last);
    the metrics go to ``trainer.metrics`` and ``val/*`` of the epoch record."""

    def __init__(self, model, dataset, dataset_name: str, every: int, epochs: int):
        self.model, self.dataset, self.dataset_name = model, dataset, dataset_name
        self.every, self.epochs = every, epochs

    def after_epoch(self, trainer):
        from .evaluate import evaluate

        done = trainer.epoch + 1
        if not ((self.every > 0 and done % self.every == 0) or done == self.epochs):
            return
        m = evaluate(self.model, self.dataset, trainer.device, self.dataset_name)
        trainer.metrics = m
        trainer.record.update({"val/miou": m["miou"], "val/macc": m["macc"], "val/allacc": m["allacc"]})


class MetricsLog(Hook):
    """Each epoch's record as a line of ``metrics.jsonl``, and its numbers as TensorBoard scalars under ``tb/``
    (optional at run time: without TensorBoard only the JSON lines are written)."""

    def __init__(self, out_dir, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
            except Exception as e:  # tensorboard is optional at run time
                log.warning("TensorBoard disabled (%s)", e)

    def after_epoch(self, trainer):
        rec = trainer.record
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(k, v, trainer.step)

    def after_train(self, trainer):
        if self.tb is not None:
            self.tb.close()


class Checkpoints(Hook):
    """``last.pt`` every epoch (config, student weights, trainer state, epoch, best mIoU, val metrics), ``best.pt``
    when the epoch's evaluation beats the best so far, and ``val_metrics.json`` at the end. Every file carries the
    run's config (as plain data: loading never unpickles code)."""

    def __init__(self, out_dir, model, config: dict, best: float = -1.0):
        self.out, self.model, self.config, self.best = Path(out_dir), model, config, best

    def after_epoch(self, trainer):
        done, m = trainer.epoch + 1, trainer.metrics
        payload = dict(config=self.config, state_dict=self.model.state_dict(), **trainer.state_dict(), epoch=done,
                       best_miou=self.best, val_metrics=plain_metrics(m))
        if m and "val/miou" in trainer.record and m["miou"] > self.best:
            self.best = payload["best_miou"] = m["miou"]
            save_checkpoint(self.out / "best.pt", config=self.config, state_dict=self.model.state_dict(), epoch=done,
                            val_metrics=plain_metrics(m))
        save_checkpoint(self.out / "last.pt", **payload)

    def after_train(self, trainer):
        from ..io import write_text

        if trainer.metrics:
            write_text(self.out / "val_metrics.json", json.dumps(trainer.metrics))


class Snapshots(Hook):
    """The model's weights at the given epochs (1-based) under ``snapshots/epoch_XXX.pt``: ASD's experts."""

    def __init__(self, out_dir, model, config: dict, epochs):
        self.out, self.model, self.config, self.epochs = Path(out_dir), model, config, set(epochs)

    def after_epoch(self, trainer):
        done = trainer.epoch + 1
        if done in self.epochs:
            save_checkpoint(self.out / "snapshots" / f"epoch_{done:03d}.pt", config=self.config,
                            state_dict=self.model.state_dict(), epoch=done)


class FrameList(Hook):
    """``frames.json``: the frames chosen for each scene of the teacher's datasets ({scene: [frame ids]}), what
    distillation later caches the teacher with."""

    def __init__(self, out_dir, datasets):
        self.path, self.datasets = Path(out_dir) / "frames.json", [d for d in datasets if d is not None]

    def before_train(self, trainer):
        from ..images.provider import save_selection

        chosen = {}
        for d in self.datasets:
            chosen.update(d.chosen_frames)
        save_selection(chosen, self.path)


class EpochLine(Hook):
    """One log line per epoch: ``epoch 3/6 loss 0.8123 val mIoU 30.01% (25 s/epoch, about 1m15s left)``."""

    def __init__(self, epochs: int):
        self.epochs, self.t0, self.first = epochs, None, 0

    def before_train(self, trainer):
        self.t0, self.first = time.perf_counter(), trainer.epoch

    def after_epoch(self, trainer):
        log.info(epoch_line(trainer.epoch + 1, self.epochs, trainer.record, time.perf_counter() - self.t0,
                            trainer.epoch + 1 - self.first))


class Progress(Hook):
    """A progress bar over each epoch's steps with the running loss (on a terminal only: off one, the epoch line
    is an epoch's only output)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def before_epoch(self, trainer):
        from ..progress import progress as bar

        trainer.loader = bar(trainer.loader, desc=f"epoch {trainer.epoch + 1}/{self.epochs}", unit="step",
                             leave=False, line=False)

    def after_step(self, trainer, losses):
        if hasattr(trainer.loader, "set_postfix"):
            trainer.loader.set_postfix(loss=f"{losses['loss']:.3f}", refresh=False)


def epoch_line(epoch: int, epochs: int, rec: dict, elapsed: float, done_here: int) -> str:
    """The one log line of an epoch. ``elapsed``: seconds since this process started training (``done_here``
    epochs, so a resumed run's estimate uses only the epochs it timed itself)."""
    from ..progress import duration

    msg = f"epoch {epoch}/{epochs} loss {rec['train/loss']:.4f}"
    if "val/miou" in rec:
        msg += f" val mIoU {100 * rec['val/miou']:.2f}%"
    per = elapsed / max(done_here, 1)
    left = f", about {duration(per * (epochs - epoch))} left" if epoch < epochs else ""
    return msg + f" ({duration(per)}/epoch{left})"


def plain_metrics(m: dict) -> dict:
    """Metrics as JSON/weights_only-safe plain types (drop the bulky confusion matrix)."""
    return {k: v for k, v in m.items() if k != "confusion"} if m else {}
