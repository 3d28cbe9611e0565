"""``haskd train``: one run from a config, in a run folder, resumable.

A run folder holds ``config.yaml`` (resolved), ``last.pt`` (written atomically every epoch: config, state_dict,
optimizer, scheduler, RNG states, epoch), ``best.pt``, ``snapshots/epoch_XXX.pt`` (ASD), ``metrics.jsonl``,
TensorBoard events under ``tb/`` and, for a teacher, ``frames.json``. What is built comes from
:mod:`haskd.workflow.build`; the loop is :class:`haskd.engine.trainer.Trainer`.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch

from ..config import Config
from ..data.transforms import collate
from ..engine import distributed as dist_utils
from ..engine.checkpoint import load_checkpoint
from ..engine.trainer import seed_everything
from ..errors import HaskdError
from . import build as B
from .runs import teacher_heads

log = logging.getLogger(__name__)


def train(cfg: Config, out_dir, resume=False, progress: bool = True, return_model: bool = False,
          overwrite: bool = False):
    """Train from a config; returns the final validation metrics (also in ``last.pt`` and metrics.jsonl), or
    ``(metrics, model)`` with ``return_model``.

    ``resume``: True continues the run in ``out_dir`` (there must be one), False starts a new one (there must be
    none, unless ``overwrite`` replaces it), "auto" resumes when there is one (the pipeline's stages). See
    :mod:`haskd.engine.runfolder`. A resume with a larger ``train.epochs`` extends a run: the learning-rate
    schedule is rebuilt for the new length and fast-forwarded to the step reached (so the rate jumps to where the
    longer schedule is at that step), and snapshot epochs follow the new length."""
    from ..config import check_config
    from ..engine.runfolder import RunLock, check_resume_config, check_start, clear_run
    from ..io import make_dir, sweep_temp, write_text

    check_config(cfg)
    device = dist_utils.setup(cfg.train.device, cfg.train.threads)
    main = dist_utils.is_main()
    out = Path(out_dir)
    if main:
        check_start(out, resume, overwrite)
    resuming = bool(resume) and (out / "last.pt").is_file()
    ck = None
    if resuming:
        ck = load_checkpoint(out / "last.pt")
        check_resume_config(out, ck["config"], cfg.to_dict())
        done, planned = int(ck["epoch"]), int(ck["config"]["train"]["epochs"])
        if cfg.train.epochs < done:
            raise HaskdError(f"{out}: the run has trained {done} epochs already; --epochs {cfg.train.epochs} would "
                             f"shorten it (pass --epochs N > {done} to extend it)")
        if cfg.train.epochs == done:
            if resume is True:
                raise HaskdError(f"{out}: the run is finished ({done} of {planned} epochs); pass --epochs N > {done} "
                                 f"to extend it")
            metrics = dict(ck.get("val_metrics") or {})
            if main and metrics and not (out / "val_metrics.json").is_file():
                write_text(out / "val_metrics.json", json.dumps(metrics))
            return (metrics, None) if return_model else metrics
    elif resume is True and main:
        log.info("%s: no last.pt yet (the run stopped in its first epoch); starting it from epoch 0", out)
    seed_everything(cfg.train.seed + dist_utils.rank())
    # Read (and validate) all input, and build the network, before anything is written: bad input or a bad model
    # setting leaves no folder and no file.
    datasets = B.build_datasets(cfg, optional_val=True)
    model = B.build_model(cfg, pretrained=not resuming)  # a resumed run takes every weight from last.pt
    if not resuming:
        B.warm_start(cfg, model)  # reads its checkpoints here: a bad one leaves no run folder
    lock = None
    if main:
        make_dir(out)
        lock = RunLock(out)
    try:
        if main:
            if (overwrite or resume is True) and not resuming:
                clear_run(out)  # --overwrite, or --resume of a run that never saved an epoch: start clean
            for p in sweep_temp(out):
                log.info("removed %s (left by an interrupted save)", p)
            write_text(out / "config.yaml", _yaml(cfg))
            if resuming:
                _trim_metrics(out / "metrics.jsonl", int(ck["epoch"]))
        metrics = _fit(cfg, out, model, datasets, device, main, ck, progress)
        return (metrics, model) if return_model else metrics
    finally:
        if lock is not None:
            lock.release()


def _fit(cfg, out, model, datasets, device, main, ck, progress) -> dict:
    """Build the trainer and its hooks for ``model`` (warm-started, or resumed from ``ck``) and run the epochs."""
    resume = ck is not None
    model = model.to(device)
    train_set = datasets["train"]
    sampler = B.train_sampler(cfg, train_set)
    per_epoch = B.steps_per_epoch(cfg, sampler)
    trainer = B.build_trainer(cfg, model, datasets, device, cfg.train.epochs * per_epoch,
                              teacher_heads=teacher_heads(cfg, device))
    if trainer.amp_dtype is not None and main:
        log.info("mixed precision: autocast %s on %s%s", str(trainer.amp_dtype).replace("torch.", ""), device.type,
                 " with a gradient scaler" if trainer.scaler.is_enabled() else "")
    start_epoch, best = 0, -1.0
    if resume:
        same_length = int(ck["config"]["train"]["epochs"]) == cfg.train.epochs
        trainer.load_state_dict(ck, schedule=same_length)
        if not same_length:  # an extended run: the schedule of the new length, at the step reached
            trainer.scheduler = B.build_scheduler(cfg, trainer.optimizer, cfg.train.epochs * per_epoch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
                for _ in range(int(ck["epoch"]) * per_epoch):
                    trainer.scheduler.step()
            if main:
                log.info("extending the run from %d to %d epochs: learning-rate schedule rebuilt for %d epochs",
                         int(ck["config"]["train"]["epochs"]), cfg.train.epochs, cfg.train.epochs)
        start_epoch, best = int(ck["epoch"]), float(ck.get("best_miou", -1.0))
        if main:
            log.info("resumed from %s at epoch %d", out / "last.pt", start_epoch)
    trainer.hooks = B.build_hooks(cfg, out, model, datasets, main, progress, best,
                                  total_steps=cfg.train.epochs * per_epoch)
    trainer.step = start_epoch * per_epoch

    def loader_of_epoch(epoch):
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(train_set, batch_size=cfg.data.batch_size, sampler=sampler,
                                           collate_fn=collate, num_workers=cfg.data.workers, drop_last=False)

    return trainer.fit(loader_of_epoch, start_epoch, cfg.train.epochs)


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _trim_metrics(path: Path, epoch: int) -> None:
    """Drop metric lines of epochs after ``epoch`` (a run killed between its metrics line and its save logged an
    epoch that the resume repeats)."""
    from ..io import write_text

    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("epoch", 0)) <= epoch:
                keep.append(line)
        except (ValueError, AttributeError):
            pass  # a line cut by a kill
    write_text(path, "".join(f"{ln}\n" for ln in keep))
