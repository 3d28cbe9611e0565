"""The training loop: ``losses = task(batch); sum; backward; step`` plus checkpoints, resume, logs and snapshots.

A run folder holds ``config.yaml`` (resolved), ``last.pt`` (written atomically every epoch: config, state_dict,
optimizer, scheduler, RNG states, epoch), ``best.pt``, ``snapshots/epoch_XXX.pt`` (ASD), ``metrics.jsonl`` and
TensorBoard events under ``tb/``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data.dataset import SceneDataset, split_state
from ..data.transforms import collate
from ..errors import HaskdError, InputError
from ..models import build_from_config
from . import distributed as dist_utils
from .checkpoint import init_weights, load_checkpoint, save_checkpoint
from .evaluate import evaluate
from .tasks import SegmentationTask, WithLovasz, move_to

log = logging.getLogger(__name__)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def build_datasets(cfg: Config, splits=("train", "val"), optional_val: bool = False):
    """{which: SceneDataset}. With ``optional_val`` a validation split that is turned off (``data.val_split=none``)
    or empty (Pointcept's empty ``val/``) gives ``None`` and a one-line notice instead of an error."""
    d = cfg.data
    if not d.root:
        raise HaskdError("no data root: pass --data ROOT (a folder holding <split>/<scene>/ scene folders)")
    check_dataset_kind(d.root, d.dataset)
    out = {}
    for which in splits:
        split = d.train_split if which == "train" else d.val_split
        if which == "val" and optional_val:
            state = split_state(d.root, split)
            if state in ("off", "empty"):
                if dist_utils.is_main():
                    why = ("data.val_split=none" if state == "off" else
                           f"{Path(d.root) / split} holds no scene folder")
                    log.warning("no validation: %s; training runs without evaluation and writes no best.pt "
                                "(data.val_split=SPLIT evaluates on another split)", why)
                out[which] = None
                continue
            if state == "missing":
                raise InputError(Path(d.root) / split, f"split folder '{split}' not found under data root "
                                                       "(data.val_split=none trains without validation)")
        out[which] = SceneDataset(d.root, split, d.num_classes, d.voxel_size, train=(which == "train"),
                                  use_normal=d.use_normal, max_voxels=d.max_voxels, augment=d.augment,
                                  seed=cfg.train.seed, repeat=d.repeat, recipe=train_recipe(cfg))
    if cfg.role == "teacher":
        from ..models.teacher import attach_frames

        if cfg.teacher.train_frames not in ("selected", "random"):
            raise HaskdError(f"teacher.train_frames must be 'selected' or 'random', got {cfg.teacher.train_frames!r}")
        for which, ds in out.items():
            if ds is None:
                continue
            attach_frames(ds, cfg, pool=which == "train" and cfg.teacher.train_frames == "random")
    return out


# ``haskd prepare scannet|s3dis`` record what they imported in ROOT/manifest.json: its labels follow that class list.
MANIFEST_CLASS_LISTS = {"scannet": "scannet20", "s3dis": "s3dis"}


def check_dataset_kind(root, dataset: str) -> None:
    """Refuse data prepared as one dataset read under another's class list (S3DIS labels would train with ScanNet
    names, and the reverse); data without a manifest are not checked."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        return
    try:
        kind = json.loads(path.read_text()).get("dataset")
    except (ValueError, OSError, AttributeError):
        return
    want = MANIFEST_CLASS_LISTS.get(kind)
    if want and want != dataset:
        raise HaskdError(f"{path}: these scenes were prepared as {kind} (class list {want}) but the config has "
                         f"data.dataset={dataset}; use the {want} preset or data.dataset={want} "
                         f"data.num_classes=...")


def train_recipe(cfg: Config):
    """Keyword arguments of Pointcept's training recipe for :class:`SceneDataset` (None: the CPU-sized one).

    Mix3D is for point-only networks: the teacher lifts each scene's own images (and so does an online teacher
    inside distillation), so it stays off for them."""
    d = cfg.data
    if d.augment_recipe != "pointcept":
        return None
    online_teacher = bool(cfg.distill.teacher_ckpt) and not cfg.distill.cache
    return dict(grid_sample_mode=d.grid_sample, crop_rate=d.crop_rate, elastic=d.elastic, shuffle=d.shuffle,
                mix_prob=0.0 if cfg.role == "teacher" or online_teacher else d.mix_prob)


def build_task(cfg: Config, model, device, datasets):
    if cfg.role == "teacher":
        from ..models.teacher import TeacherTask

        return TeacherTask(model, cfg)
    if cfg.distill.teacher_ckpt or cfg.distill.experts:
        from ..distill.task import DistillTask

        task = DistillTask.from_config(model, cfg, device, datasets)
    else:
        task = SegmentationTask(model)
    # Pointcept's PTv3 recipes add a Lovasz term to cross-entropy (students only: the teacher keeps its own losses)
    return WithLovasz(task, cfg.train.lovasz_weight) if cfg.train.lovasz_weight > 0 else task


def build_optimizer(cfg: Config, params, model=None):
    """SGD (Nesterov) or AdamW. With ``optim.block_lr_scale`` != 1 and a ``model``, the parameters of its
    attention blocks (modules named ``Block``, as Pointcept's ``param_dicts`` keyword "block") form a second group
    at ``lr * block_lr_scale``."""
    o = cfg.optim
    if model is not None and o.block_lr_scale != 1.0:
        ids = {id(p) for m in model.modules() if type(m).__name__ == "Block" for p in m.parameters()}
        block = [p for p in params if id(p) in ids]
        if block:
            params = [{"params": [p for p in params if id(p) not in ids]},
                      {"params": block, "lr": o.lr * o.block_lr_scale}]
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    raise HaskdError(f"optim.optimizer must be sgd or adamw, got '{o.optimizer}'")


def build_scheduler(cfg: Config, opt, total_steps: int):
    o = cfg.optim
    total_steps = max(1, total_steps)
    if o.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=total_steps, pct_start=0.05, anneal_strategy="cos",
                                                   div_factor=10.0, final_div_factor=o.final_div,
                                                   cycle_momentum=o.cycle_momentum)
    if o.scheduler == "poly":  # Pointcept's PolyLR: lr * (1 - step / (total + 1)) ** 0.9
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / (total_steps + 1)) ** 0.9)
    if o.scheduler in ("cosine", "cyclic_cosine"):
        cycles = max(1, o.cycles) if o.scheduler == "cyclic_cosine" else 1
        per = total_steps / cycles

        def f(step):
            t = (step % per) / per if step < total_steps else 1.0
            return 0.5 * (1 + math.cos(math.pi * t)) * (1 - 1e-3) + 1e-3

        return torch.optim.lr_scheduler.LambdaLR(opt, f)
    raise HaskdError(f"optim.scheduler must be onecycle, poly, cosine or cyclic_cosine, got '{o.scheduler}'")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)), "numpy_pos": int(np.random.get_state()[2])}


def _set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(int(x) for x in s["python"]), None))
    st = np.random.get_state()
    np.random.set_state((st[0], s["numpy"].numpy().astype(np.uint32), int(s.get("numpy_pos", 624)), 0, 0.0))


class JsonlLogger:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except Exception as e:  # tensorboard is optional at run time
                log.warning("TensorBoard disabled (%s)", e)

    def log(self, record: dict, step: int):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def snapshot_schedule(cfg: Config) -> list:
    if cfg.train.snapshots <= 0:
        return []
    from ..distill.asd import snapshot_epochs

    return snapshot_epochs(cfg.train.epochs, cfg.train.snapshots, cfg.train.snapshot_schedule,
                           cycles=cfg.optim.cycles if cfg.optim.scheduler == "cyclic_cosine" else None)


def warm_start_path(cfg: Config) -> str:
    """Checkpoint the run starts from: ``train.init``, else the teacher with ``distill.init_from_teacher``."""
    if cfg.train.init:
        return cfg.train.init
    if cfg.role == "student" and cfg.distill.init_from_teacher:
        if not cfg.distill.teacher_ckpt:
            raise HaskdError("distill.init_from_teacher needs distill.teacher_ckpt")
        return cfg.distill.teacher_ckpt
    return ""


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
    from ..io import make_dir, sweep_temp, write_text
    from .runfolder import RunLock, check_resume_config, check_start, clear_run

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
    datasets = build_datasets(cfg, optional_val=True)
    train_set, val_set = datasets["train"], datasets["val"]
    model = build_checked(cfg, pretrained=not resuming)  # a resumed run takes every weight from last.pt
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
            if cfg.role == "teacher":
                chosen = {**train_set.chosen_frames, **(val_set.chosen_frames if val_set is not None else {})}
                write_text(out / "frames.json", json.dumps(chosen, indent=1))
            if resuming:
                _trim_metrics(out / "metrics.jsonl", int(ck["epoch"]))
        return _train_loop(cfg, out, model, datasets, device, main, ck, progress, return_model)
    finally:
        if lock is not None:
            lock.release()


def build_checked(cfg: Config, pretrained: bool = True):
    """The network of ``cfg``; a constructor that rejects the config's ``model.kwargs`` (or preset) is one line."""
    try:
        return build_from_config(cfg, pretrained=pretrained)
    except HaskdError:
        raise
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise HaskdError(f"model {cfg.model.name} (preset {cfg.model.preset}, kwargs {cfg.model.kwargs}) cannot be "
                         f"built: {type(e).__name__}: {first}") from None


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


def _train_loop(cfg, out, model, datasets, device, main, ck, progress, return_model):
    train_set, val_set = datasets["train"], datasets["val"]
    resume = ck is not None
    init = warm_start_path(cfg)
    if init and not resume:
        init_weights(model, init)
    model = model.to(device)
    task = build_task(cfg, model, device, datasets).to(device)
    wrapped = task
    if dist_utils.world_size() > 1:
        if device.type == "cuda":  # SyncBatchNorm is CUDA-only; on CPU, BN statistics stay per rank
            task = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            task, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    params = [p for p in task.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params, model)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist_utils.world_size(),
                                                  rank=dist_utils.rank(), shuffle=True, seed=cfg.train.seed,
                                                  drop_last=False)
    bs = cfg.data.batch_size
    steps_per_epoch = max(1, math.ceil(len(sampler) / bs))
    sched = build_scheduler(cfg, opt, cfg.train.epochs * steps_per_epoch)
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if amp_dtype is not None and main:
        log.info("mixed precision: autocast %s on %s%s", str(amp_dtype).replace("torch.", ""), device.type,
                 " with a gradient scaler" if scaler.is_enabled() else "")
    start_epoch, best, history = 0, -1.0, []
    if resume:
        task.load_state_dict(ck["task_state"])
        opt.load_state_dict(ck["optimizer"])
        if int(ck["config"]["train"]["epochs"]) == cfg.train.epochs:
            sched.load_state_dict(ck["scheduler"])
        else:  # an extended run: the schedule of the new length, at the step reached
            import warnings

            sched = build_scheduler(cfg, opt, cfg.train.epochs * steps_per_epoch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
                for _ in range(int(ck["epoch"]) * steps_per_epoch):
                    sched.step()
            if main:
                log.info("extending the run from %d to %d epochs: learning-rate schedule rebuilt for %d epochs",
                         int(ck["config"]["train"]["epochs"]), cfg.train.epochs, cfg.train.epochs)
        _set_rng_state(ck["rng"])
        if scaler.is_enabled() and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start_epoch, best = int(ck["epoch"]), float(ck.get("best_miou", -1.0))
        if main:
            log.info("resumed from %s at epoch %d", out / "last.pt", start_epoch)
    snaps = set(snapshot_schedule(cfg))
    logger = JsonlLogger(out, main)
    cfg_dict = cfg.to_dict()
    metrics = {}
    step = start_epoch * steps_per_epoch
    run_t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.train.epochs):
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(train_set, batch_size=bs, sampler=sampler, collate_fn=collate,
                                             num_workers=cfg.data.workers, drop_last=False)
        task.train()
        it = loader
        if progress and main:
            from ..progress import progress as bar

            # off a terminal: no bar, the epoch line below is the only output of an epoch
            it = bar(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step", leave=False, line=False)
        t0, sums, n = time.perf_counter(), {}, 0
        for batch in it:
            batch = move_to(batch, device)
            with autocast(amp_dtype, device):
                losses, _ = wrapped(batch)
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise HaskdError(f"loss became {total.item()} at epoch {epoch + 1}; lower optim.lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if cfg.optim.clip_grad > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            n += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
            if progress and main and hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{float(total.detach()):.3f}", refresh=False)
        rec = {"epoch": epoch + 1, "step": step, "lr": opt.param_groups[0]["lr"],
               "epoch_time_s": time.perf_counter() - t0, **{f"train/{k}": v / max(n, 1) for k, v in sums.items()}}
        last_epoch = epoch + 1 == cfg.train.epochs
        due = (cfg.train.eval_every > 0 and (epoch + 1) % cfg.train.eval_every == 0) or last_epoch
        if due and val_set is not None:
            metrics = evaluate(model, val_set, device, cfg.data.dataset, extra=getattr(val_set, "extra", None))
            rec.update({"val/miou": metrics["miou"], "val/macc": metrics["macc"], "val/allacc": metrics["allacc"]})
            history.append({"epoch": epoch + 1, "miou": metrics["miou"]})
        logger.log(rec, step)
        if main:
            payload = dict(config=cfg_dict, state_dict=model.state_dict(), task_state=task.state_dict(),
                           optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=_rng_state(),
                           scaler=scaler.state_dict() if scaler.is_enabled() else {},
                           epoch=epoch + 1, best_miou=best, val_metrics=_plain(metrics))
            if metrics and "val/miou" in rec and metrics["miou"] > best:
                best = metrics["miou"]
                payload["best_miou"] = best
                save_checkpoint(out / "best.pt", config=cfg_dict, state_dict=model.state_dict(), epoch=epoch + 1,
                                val_metrics=_plain(metrics))
            save_checkpoint(out / "last.pt", **payload)
            if epoch + 1 in snaps:
                save_checkpoint(out / "snapshots" / f"epoch_{epoch + 1:03d}.pt", config=cfg_dict,
                                state_dict=model.state_dict(), epoch=epoch + 1)
            log.info(epoch_line(epoch + 1, cfg.train.epochs, rec, time.perf_counter() - run_t0,
                                epoch + 1 - start_epoch))
        dist_utils.barrier()
    logger.close()
    if main and metrics:
        from ..io import write_text

        write_text(out / "val_metrics.json", json.dumps(metrics))
    return (metrics, model) if return_model else metrics


def epoch_line(epoch: int, epochs: int, rec: dict, elapsed: float, done_here: int) -> str:
    """The one log line of an epoch: ``epoch 3/6 loss 0.8123 val mIoU 30.01% (25 s/epoch, about 1m15s left)``.

    ``elapsed``: seconds since this process started training (``done_here`` epochs, so a resumed run's estimate
    uses only the epochs it timed itself)."""
    from ..progress import duration

    msg = f"epoch {epoch}/{epochs} loss {rec['train/loss']:.4f}"
    if "val/miou" in rec:
        msg += f" val mIoU {100 * rec['val/miou']:.2f}%"
    per = elapsed / max(done_here, 1)
    left = f", about {duration(per * (epochs - epoch))} left" if epoch < epochs else ""
    return msg + f" ({duration(per)}/epoch{left})"


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast_dtype(cfg: Config, device):
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


def _plain(m: dict) -> dict:
    """Metrics as JSON/weights_only-safe plain types (drop the bulky confusion matrix)."""
    return {k: v for k, v in m.items() if k != "confusion"} if m else {}
