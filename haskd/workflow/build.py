"""The one module that knows roles. From a config it builds what a run needs: datasets (with the teacher's frames
for a teacher), the network, the task (teacher losses, plain CE, or distillation), optimizer, schedule, the
:class:`~haskd.engine.trainer.Trainer` and its hooks.

Roles: ``teacher`` (points + frames, :class:`~haskd.engine.tasks.TeacherTask`), a point-only student (no
``distill.teacher_ckpt`` and no ``distill.experts``: :class:`~haskd.engine.tasks.SegmentationTask`, the baseline),
and a distilled student (either set: :func:`haskd.distill.setup.build_distill_task`). Reading input happens here
(datasets, the teacher's checkpoint and caches for distillation); the classes built do no I/O of their own.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from ..config import Config, check_run
from ..data.dataset import SceneDataset, split_state
from ..engine import distributed as dist_utils
from ..engine.checkpoint import init_weights
from ..engine.tasks import SegmentationTask, TeacherTask, WithLovasz
from ..engine.trainer import Trainer, autocast_dtype
from ..errors import HaskdError, InputError
from ..models.registry import build_from_config

log = logging.getLogger(__name__)


def role_of(cfg: Config) -> str:
    """``teacher``, ``student`` (point-only) or ``distilled`` (a student with a teacher and/or snapshot experts)."""
    if cfg.role == "teacher":
        return "teacher"
    return "distilled" if cfg.distill.teacher_ckpt or cfg.distill.experts else "student"


# ------------------------------------------------------------------------------------------------ data
def build_datasets(cfg: Config, splits=("train", "val"), optional_val: bool = False):
    """{which: SceneDataset}. A teacher's datasets carry its frames (``teacher.train_frames=random``: the train set
    draws K of a pool per sample). With ``optional_val`` a validation split that is turned off
    (``data.val_split=none``) or empty (Pointcept's empty ``val/``) gives ``None`` and a one-line notice instead of
    an error."""
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
                                  seed=cfg.train.seed, repeat=d.repeat, recipe=train_recipe(cfg),
                                  frames=teacher_frames(cfg, pool=which == "train"),
                                  labeled_points=d.labeled_points if which == "train" else 0)
    return out


def teacher_frames(cfg: Config, pool: bool = False, selections=None):
    """The frame provider of a teacher config (None for a student); ``pool`` for its train set."""
    if cfg.role != "teacher":
        return None
    from ..images.provider import FrameProvider

    return FrameProvider.from_config(cfg, selections=selections, pool=pool and cfg.teacher.train_frames == "random")


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


# ------------------------------------------------------------------------------------------------ model and task
def build_model(cfg: Config, pretrained: bool = True):
    """The network of ``cfg``; a constructor that rejects the config's ``model.kwargs`` (or preset) is one line."""
    try:
        return build_from_config(cfg, pretrained=pretrained)
    except HaskdError:
        raise
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise HaskdError(f"model {cfg.model.name} (preset {cfg.model.preset}, kwargs {cfg.model.kwargs}) cannot be "
                         f"built: {type(e).__name__}: {first}") from None


def build_task(cfg: Config, model, device, datasets, teacher_heads=None):
    """The task of the config's role (see the module's docstring). Pointcept's PTv3 recipes add a Lovasz term to
    cross-entropy (students only: the teacher keeps its own losses). ``teacher_heads``: ``distill.teacher_head``
    resolved by the caller (:func:`haskd.workflow.runs.teacher_heads`: it evaluates the teacher)."""
    role = role_of(check_run(cfg))
    if role == "teacher":
        return TeacherTask(model, cfg.teacher.loss_3d, cfg.teacher.loss_2d)
    if role == "distilled":
        from ..distill.setup import build_distill_task

        if cfg.distill.teacher_head != "fused" and teacher_heads is None:
            raise HaskdError(f"distill.teacher_head={cfg.distill.teacher_head} needs the heads resolved "
                             "(haskd.workflow.runs.teacher_heads) before the task is built")
        task = build_distill_task(model, cfg, device, datasets["train"], teacher_heads=teacher_heads)
    else:
        task = SegmentationTask(model)
    return WithLovasz(task, cfg.train.lovasz_weight) if cfg.train.lovasz_weight > 0 else task


def warm_start(cfg: Config, model) -> None:
    """Start ``model`` from the checkpoints its config names: ``train.init`` (else the teacher, with
    ``distill.init_from_teacher``) for the whole network, and, for a teacher, ``teacher.init_3d`` for its 3D branch
    (a point-only checkpoint; "baseline" is resolved by ``haskd pipeline``, which trains its own baseline first)."""
    c = cfg.train.init
    if not c and cfg.role == "student" and cfg.distill.init_from_teacher:
        if not cfg.distill.teacher_ckpt:
            raise HaskdError("distill.init_from_teacher needs distill.teacher_ckpt")
        c = cfg.distill.teacher_ckpt
    if c:
        init_weights(model, c)
    if cfg.role == "teacher" and cfg.teacher.init_3d:
        if cfg.teacher.init_3d == "baseline":
            raise HaskdError("teacher.init_3d=baseline names the pipeline's own baseline run (haskd pipeline / "
                             "ablate); with haskd train give a checkpoint, e.g. teacher.init_3d=runs/baseline/last.pt")
        init_weights(model.backbone, cfg.teacher.init_3d)


# ------------------------------------------------------------------------------------------------ optimization
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


def train_sampler(cfg: Config, train_set):
    """The train set's sampler: shuffled per epoch, sharded over DDP ranks; with ``data.balance_ranks`` under DDP,
    each step's global batch split across ranks by the points of its scenes
    (:class:`haskd.data.sampler.BalancedRankSampler`)."""
    if cfg.data.balance_ranks and dist_utils.world_size() > 1:
        from ..data.sampler import BalancedRankSampler

        n = len(train_set.scenes)
        return BalancedRankSampler([train_set.scenes[i % n].num_points for i in range(len(train_set))],
                                   dist_utils.world_size(), dist_utils.rank(), cfg.data.batch_size,
                                   seed=cfg.train.seed)
    return torch.utils.data.DistributedSampler(train_set, num_replicas=dist_utils.world_size(),
                                               rank=dist_utils.rank(), shuffle=True, seed=cfg.train.seed,
                                               drop_last=False)


def steps_per_epoch(cfg: Config, sampler) -> int:
    return max(1, math.ceil(len(sampler) / cfg.data.batch_size))


def build_trainer(cfg: Config, model, datasets, device, total_steps: int, hooks=(), teacher_heads=None) -> Trainer:
    """The role's task around ``model`` (already on ``device``), wrapped in DDP under torchrun, its optimizer and a
    schedule of ``total_steps``: the step that training, the benchmark and a user's script all run."""
    task = build_task(cfg, model, device, datasets, teacher_heads=teacher_heads).to(device)
    wrapped = task
    if dist_utils.world_size() > 1:
        if device.type == "cuda":  # SyncBatchNorm is CUDA-only; on CPU, BN statistics stay per rank
            task = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            task, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    params = [p for p in task.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params, model)
    sched = build_scheduler(cfg, opt, total_steps)
    return Trainer(task, opt, sched, device, params=params, wrapped=wrapped, clip_grad=cfg.optim.clip_grad,
                   amp_dtype=autocast_dtype(cfg, device), hooks=hooks, ahead=cfg.train.targets_ahead)


def snapshot_schedule(cfg: Config) -> list:
    """Epochs (1-based) at which the run saves a snapshot for ASD (none without ``train.snapshots``)."""
    if cfg.train.snapshots <= 0:
        return []
    from ..distill.asd import snapshot_epochs

    return snapshot_epochs(cfg.train.epochs, cfg.train.snapshots, cfg.train.snapshot_schedule,
                           cycles=cfg.optim.cycles if cfg.optim.scheduler == "cyclic_cosine" else None)


def build_hooks(cfg: Config, out, model, datasets, main: bool, progress: bool, best: float = -1.0, *,
                total_steps: int) -> list:
    """The run's hooks, in the order they run: progress, evaluation, metrics log, checkpoints, snapshots, epoch
    line; a teacher's frame list first, a distilled student's fading KD weight (``distill.kd_fade``, over
    ``total_steps``) before all. Ranks other than the main one only evaluate (their shard) and fade."""
    from ..engine import hooks as H

    epochs = cfg.train.epochs
    out_hooks = []
    if cfg.role == "student" and cfg.distill.kd_fade != "none" and (cfg.distill.teacher_ckpt or cfg.distill.experts):
        from ..distill.fade import KDFade

        out_hooks.append(KDFade(cfg.distill.kd_fade, cfg.distill.kd_fade_end, total_steps))
    if main and cfg.role == "teacher":
        out_hooks.append(H.FrameList(out, [datasets["train"], datasets["val"]]))
    if main and progress:
        out_hooks.append(H.Progress(epochs))
    if datasets["val"] is not None:
        out_hooks.append(H.Evaluation(model, datasets["val"], cfg.data.dataset, cfg.train.eval_every, epochs))
    if main:
        cfg_dict = cfg.to_dict()
        out_hooks += [H.MetricsLog(out), H.Checkpoints(out, model, cfg_dict, best),
                      H.Snapshots(out, model, cfg_dict, snapshot_schedule(cfg)), H.EpochLine(epochs)]
    return out_hooks
