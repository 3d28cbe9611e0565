"""Config schema (dataclasses), YAML files with at most one base, and ``key=value`` overrides.

A YAML file may name one base with ``_base_: other.yaml`` (relative to the file, or a preset name from
``haskd/configs``). Overrides use dotted keys: ``optim.lr=0.01 model.preset=tiny``. Unknown keys are an error
that lists the valid ones. The resolved config is saved in every run folder and inside every checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import HaskdError

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "scannet20_student"


@dataclass
class DataConfig:
    root: str = ""
    dataset: str = "scannet20"           # class list: scannet20 | s3dis
    num_classes: int = 20
    train_split: str = "train"
    val_split: str = "val"
    voxel_size: float = 0.05             # metres; 0.02 for full ScanNet on GPU
    use_normal: bool = False
    max_voxels: int = 80000              # training crop bound (sphere crop around a random point)
    augment: bool = True
    batch_size: int = 2
    workers: int = 0
    repeat: int = 1                      # passes over the training scenes per epoch
    augment_recipe: str = "cpu"          # cpu: light aug (rotate, flip, scale, jitter, colour) | pointcept: Pointcept's
                                         # recipe (dropout, tilt, elastic, chromatic, ...; haskd/data/transforms.py)
    grid_sample: str = "mean"            # mean: a voxel is the mean of its points | random: one random point per voxel
                                         # (Pointcept's GridSample 'train' mode; pointcept recipe only)
    elastic: bool = True                 # elastic distortion in the pointcept recipe (Pointcept's PTv3 S3DIS: off)
    crop_rate: float = 0.0               # > 0: sphere crop to this fraction first, then to max_voxels (PTv3 S3DIS: 0.6)
    shuffle: bool = False                # random voxel order (Pointcept's ShufflePoint)
    mix_prob: float = 0.0                # Mix3D: probability that a training batch is overlaid in pairs of scenes
    balance_ranks: bool = False          # DDP: split each global batch across ranks by scene size (ours;
                                         # haskd/data/sampler.py); off: Pointcept's DistributedSampler shards
    vote_augs: str = ""                  # test-time augmentations of `haskd eval --voting`: scannet (13) | s3dis (10)
                                         # | "" (by data.dataset)
    labeled_points: int = 0              # > 0: train on the labels of only this many points per training scene
                                         # (ours; the setting of Pointcept's ScanNet data-efficient 'la' files,
                                         # 20-200 points a scene), the same points for every model and seed; the
                                         # other points are unlabeled (-1). Val and test keep every label


@dataclass
class ModelConfig:
    name: str = "spunet"                 # a key of haskd.models.REGISTRY
    preset: str = "small"
    backend: str = "auto"                # sparse conv backend: auto | torch | native | spconv
    kwargs: dict = field(default_factory=dict)
    module: str = ""                     # a Python file or module to import first (registers a user's network)


@dataclass
class OptimConfig:
    optimizer: str = "sgd"               # sgd | adamw
    lr: float = 0.05
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "onecycle"          # onecycle | poly | cosine | cyclic_cosine
    cycles: int = 1                      # for cyclic_cosine
    clip_grad: float = 1.0               # 0 disables
    final_div: float = 1e3               # onecycle: final lr = lr / 10 / final_div (Pointcept SpUNet: 1e4)
    cycle_momentum: bool = False         # onecycle: cycle momentum (SGD) / beta1 (AdamW) 0.85..0.95 against the lr
    block_lr_scale: float = 1.0          # lr factor for attention-block parameters (Pointcept PTv3: 0.1)
    amp: bool = True                     # mixed precision (torch.autocast): on CUDA; on CPU only with bfloat16
    amp_dtype: str = "float16"           # float16 (CUDA, with a GradScaler) | bfloat16 (CUDA or CPU, no scaler)


@dataclass
class TrainConfig:
    epochs: int = 50
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda
    eval_every: int = 1                  # epochs between validations (0 = only at the end)
    threads: int = 0                     # torch threads per process (0 = cores / local processes)
    snapshots: int = 0                   # ASD snapshots saved by this run
    snapshot_schedule: str = "second_half"  # second_half | cycles (ends of optim.scheduler=cyclic_cosine's cycles)
                                         # | whole_run: evenly over the whole run (ours)
    init: str = ""                       # warm start: a student checkpoint, or a teacher's (its 3D branch)
    lovasz_weight: float = 0.0           # students: + weight x Lovasz-softmax loss (Pointcept's PTv3 recipes: 1.0)
    parallel_stages: bool = True         # pipeline: the baseline trains in a process of its own beside the teacher
                                         # (both independent), each with half the cores; off under torchrun
    targets_ahead: bool = True           # distillation: the frozen models that run online (teacher, its 3D branch
                                         # for hints, experts) run on the next batch in a thread while this one
                                         # trains; the same numbers, the time of a second core


@dataclass
class TeacherConfig:
    """Multi-modal teacher (used when ``role: teacher``)."""
    image_size: list = field(default_factory=lambda: [240, 320])   # H, W
    image_channels: int = 32
    image_widths: list = field(default_factory=lambda: [32, 64, 128])
    image_stem_stride: int = 2           # full-resolution stem, then H/2 (see haskd/models/image_unet.py)
    image_weights: str = ""              # optional local state_dict for the 2D branch
    image_encoder: str = ""              # "" = the built-in ImageUNet; else a timm model name (features_only encoder
                                         # under the same decoder; needs timm, imported only then)
    image_pretrained: str = ""           # timm encoder weights: "" random init | "hub" (network) | a local file
    image_out_indices: list = field(default_factory=list)   # timm feature levels fed to the decoder ([] = all)
    num_frames: int = 5                  # K frames per scene picked by the frame filter
    frame_policy: str = "iof"            # iof | uniform | random
    frame_stride: int = 1
    depth_tau: float = 0.1               # depth-consistency threshold (m), about one voxel or two
    fusion_hidden: int = 128
    loss_3d: float = 1.0                 # CE on the 3D branch
    loss_2d: float = 0.5                 # CE on 2D logits at projected labeled pixels (0 = off)
    virtual_views: int = 20              # rendered views for scenes without frames
    model_preset: str = ""               # 3D branch preset ("" = the student's preset)
    epochs: int = 0                      # teacher epochs in the pipeline (0 = train.epochs)
    train_frames: str = "selected"       # selected: train on the K chosen frames | random: K random frames of a
                                         # per-scene pool each step (more 2D data; caching still uses the K chosen)
    frame_pool: int = 24                 # pool size for train_frames=random (spread evenly over the frames)
    fusion: str = "concat"               # concat: logits = head(mlp[f3d, f2d, vis]) | residual: 3D logits + head(...)
    overlap_branches: bool = True        # CPU: the image branch runs in a second thread beside the 3D branch (same
                                         # numbers; haskd/threads.py)
    detach_3d: bool = False              # the 3D branch learns from its own CE only: the fusion reads its features
                                         # and logits detached, so the images cannot make it lazier than a
                                         # point-only network (ours)
    init_3d: str = ""                    # start the 3D branch from a point-only checkpoint (a student's last.pt; in
                                         # `haskd pipeline`, "baseline" = the run's own baseline, trained first)
    freeze_3d: bool = False              # keep the 3D branch as loaded (needs init_3d): no gradients, BatchNorm
                                         # statistics kept; the fused head learns what the images add to a point-only
                                         # network trained alone (ours)


def _teacher_side(default):
    """A distillation key that acts on the teacher (only with ``distill.teacher_ckpt``): :func:`point_only` resets
    it, :func:`with_teacher` gives it back, :func:`check_run` refuses it without a teacher."""
    return field(default=default, metadata={"needs": "teacher"})


@dataclass
class DistillConfig:
    teacher_ckpt: str = ""               # IHD on when set
    tau: float = 2.0
    logit_weight: float = 1.0
    feat_weight: float = 1.0
    hint_weight: float = _teacher_side(0.0)  # per-level feature hints from the teacher's 3D branch (ours)
    hint_cache: bool = False             # with distill.cache: the hints from a cache of the unaugmented scenes (ours)
    hint_cache_views: int = 1            # cached hints: mean over this many z-rotations of each scene (ours)
    hint_cache_augs: int = 0             # > 0: cached hints of the teacher on K augmented views of every training
                                         # sample, the very batches the student sees (epoch e draws view e mod K);
                                         # K = train.epochs gives the online hints (ours)
    hint_cache_augs_half: bool = False   # store those hints in float16: half the disk, no longer the online hints
                                         # to the bit (float32 by default)
    trust: str = "hard"                  # hard | soft | none | image | image_soft: only what the images know (ours)
    ihd_norm: str = "weights"            # IHD terms divided by: weights = sum of the information weights (METHOD.md)
                                         # | points = the batch's point count, so a rule that keeps few points
                                         # weighs as little as it covers (ours; for trust=image)
    unlabeled_conf: float = 0.0          # > 0: IHD and ASD keep an unlabeled point only where their target's top
                                         # probability is at least this (0 = every point, METHOD.md; ours)
    unlabeled_keep: float = 0.0          # > 0 (cached IHD): per class, lower that gate until at least this share of
                                         # the class's unlabeled training targets passes (ours; 0 = one gate)
    teacher_head: str = _teacher_side("fused")  # the IHD target: fused = the teacher's output (METHOD.md) | 3d = its
                                         # 3D-branch head, points only (a control) | classwise = per class the head
                                         # with the higher val IoU (ours)
    kd_target: str = "full"              # full (METHOD.md) | nontarget: IHD logit and ASD terms skip the label class (ours)
    image_gain: bool = False             # also weight by what the images add: max(0, p_fused(y) - p_3d(y)) (ours)
    class_balance: bool = False          # IHD + ASD weights x N / (K n_c): each class of a batch weighs the same (ours)
    experts: str = ""                    # ASD on when set: experts JSON written by `haskd experts`
    asd_weight: float = 1.0
    asd_topk: int = 1
    asd_unlabeled: str = "final"         # final | skip
    asd_source: str = "stage1"           # whose snapshots the pipeline's final student distils: stage1 (METHOD.md:
                                         # the CE + IHD student's) | baseline (the point-only baseline's, ours)
    asd_trust: str = "none"              # none (METHOD.md) | hard | soft: gate ASD by the expert's correctness (ours)
    teacher_expert: bool = _teacher_side(False)  # the teacher joins the expert pool: one logit source per class (ours)
    init_from_teacher: bool = _teacher_side(False)  # start the student from the teacher's 3D branch (ours)
    kd_fade: str = "none"                # none (METHOD.md) | linear | cosine: every distillation term fades from
                                         # weight 1 to 0 over the run (ours; haskd/distill/fade.py)
    kd_fade_end: float = 1.0             # the fraction of the run at which the faded weight reaches 0
    cache: bool = True                   # cached soft labels (else online teacher/expert forward)
    cache_topk: int = 20


@dataclass
class Config:
    role: str = "student"                # student | teacher
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _valid_keys(obj, prefix="") -> list:
    keys = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            keys += _valid_keys(v, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(value, current, key):
    """Convert a YAML-parsed override to the type of the current value."""
    if current is None or isinstance(current, (dict, list)):
        return value
    t = type(current)
    if t is bool:
        if isinstance(value, bool):
            return value
        raise HaskdError(f"config key '{key}' expects true/false, got {value!r}")
    if t in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HaskdError(f"config key '{key}' expects a number, got {value!r}")
        if t is int and isinstance(value, float) and not value.is_integer():
            raise HaskdError(f"config key '{key}' expects an integer, got {value!r}")
        return t(value)
    if t is str:
        return "" if value is None else str(value)
    return value


# Every key with a closed set of values, and the values: checked when a config is read (file or override), the
# allowed values named in the error. The loss and model modules take their sets from here (one list, no drift).
CHOICES = {
    "role": ("student", "teacher"),
    "data.augment_recipe": ("cpu", "pointcept"),
    "data.grid_sample": ("mean", "random"),
    "data.vote_augs": ("", "scannet", "s3dis"),
    "model.backend": ("auto", "torch", "native", "spconv"),
    "optim.optimizer": ("sgd", "adamw"),
    "optim.scheduler": ("onecycle", "poly", "cosine", "cyclic_cosine"),
    "optim.amp_dtype": ("float16", "bfloat16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.snapshot_schedule": ("second_half", "cycles", "whole_run"),
    "teacher.frame_policy": ("iof", "uniform", "random"),
    "teacher.train_frames": ("selected", "random"),
    "teacher.fusion": ("concat", "residual"),
    "distill.trust": ("hard", "soft", "none", "image", "image_soft", "image_shift"),
    "distill.asd_trust": ("hard", "soft", "none"),
    "distill.kd_target": ("full", "nontarget"),
    "distill.ihd_norm": ("weights", "points"),
    "distill.teacher_head": ("fused", "3d", "classwise"),
    "distill.asd_unlabeled": ("final", "skip"),
    "distill.asd_source": ("stage1", "baseline"),
    "distill.kd_fade": ("none", "linear", "cosine"),
}


def listed(choices) -> str:
    """``a, b, ""``: a closed set as an error shows it."""
    return ", ".join(c if c else '""' for c in choices)


# Keys that were in the schema once and did nothing: still accepted (configs inside old checkpoints and run folders
# hold them), and dropped when read.
REMOVED_KEYS = ("train.log_every",)


def _set(cfg: Config, key: str, value, source: str):
    if key in REMOVED_KEYS:
        return
    parts = key.split(".")
    obj = cfg
    for p in parts[:-1]:
        if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
            raise HaskdError(f"{source}: unknown config key '{key}'; valid keys: {', '.join(_valid_keys(cfg))}")
        obj = getattr(obj, p)
    name = parts[-1]
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)} \
            or dataclasses.is_dataclass(getattr(obj, name)):
        raise HaskdError(f"{source}: unknown config key '{key}'; valid keys: {', '.join(_valid_keys(cfg))}")
    value = _coerce(value, getattr(obj, name), key)
    if key in CHOICES and value not in CHOICES[key]:
        raise HaskdError(f"{source}: config key '{key}' must be one of {listed(CHOICES[key])}, got {value!r}")
    setattr(obj, name, value)


def _flatten(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def resolve_path(name) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    for cand in (PRESET_DIR / name, PRESET_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    presets = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
    raise HaskdError(f"{name}: config file not found (presets: {', '.join(presets)})")


def _read_yaml(path: Path, depth=0) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise HaskdError(f"{path}: not a text YAML file (binary content)") from None
    except yaml.YAMLError as e:
        raise HaskdError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise HaskdError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(raw, dict):
        raise HaskdError(f"{path}: a config must be a mapping")
    base = raw.pop("_base_", None)
    if base is None:
        return raw
    if depth > 0:
        raise HaskdError(f"{path}: a base config may not have a base itself (one level only)")
    base_path = (path.parent / base) if (path.parent / base).is_file() else resolve_path(base)
    merged = _read_yaml(base_path, depth + 1)
    _deep_update(merged, raw)
    return merged


def _deep_update(a: dict, b: dict):
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict) and k != "kwargs":
            _deep_update(a[k], v)
        else:
            a[k] = v


def _check_teacher(cfg: Config, source: str):
    """Rules across the teacher's 2D-branch keys, checked when a config is read (file paths are checked when the
    weights are loaded: a checkpoint's config is also read where its training files are gone)."""
    t = cfg.teacher
    if t.image_pretrained and not t.image_encoder:
        raise HaskdError(f"{source}: teacher.image_pretrained needs teacher.image_encoder (a timm model name); the "
                         "built-in 2D UNet takes its weights from teacher.image_weights")
    if t.image_encoder and t.image_weights:
        raise HaskdError(f"{source}: teacher.image_weights is for the built-in 2D UNet; with teacher.image_encoder use "
                         "teacher.image_pretrained (hub or a local timm weights file)")
    if not isinstance(t.image_out_indices, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in t.image_out_indices):
        raise HaskdError(f"{source}: teacher.image_out_indices must be a list of encoder level numbers (0, 1, ...), "
                         f"got {t.image_out_indices!r}")
    if t.image_out_indices and not t.image_encoder:
        raise HaskdError(f"{source}: teacher.image_out_indices needs teacher.image_encoder")
    if t.detach_3d and t.loss_3d <= 0:
        raise HaskdError(f"{source}: teacher.detach_3d needs teacher.loss_3d > 0 (detached, the 3D branch learns "
                         "from its own cross-entropy only)")
    if t.freeze_3d and not t.init_3d:
        raise HaskdError(f"{source}: teacher.freeze_3d needs teacher.init_3d (a point-only checkpoint to keep; "
                         "frozen at random, the 3D branch would know nothing)")


def from_dict(d: dict, source: str = "config") -> Config:
    cfg = Config()
    for k, v in _flatten(copy.deepcopy(d)).items():
        _set(cfg, k, v, source)
    _check_teacher(cfg, source)
    return cfg


def load_config(path: Optional[str] = None, overrides=()) -> Config:
    """Load a config file (or the default preset) and apply ``key=value`` overrides."""
    p = resolve_path(path or DEFAULT_PRESET)
    cfg = from_dict(_read_yaml(p), source=str(p))
    apply_overrides(cfg, overrides)
    return check_config(cfg)


def apply_overrides(cfg: Config, overrides) -> Config:
    for item in overrides:
        if "=" not in item:
            raise HaskdError(f"override '{item}' must look like key=value")
        k, v = item.split("=", 1)
        try:
            value: Any = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            value = v
        _set(cfg, k.strip(), value, "command line")
    _check_teacher(cfg, "command line")
    return cfg


def save_config(cfg: Config, path):
    from .io import write_text

    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))




def check_config(cfg: Config) -> Config:
    """Check every value of a config when it is read, before any folder is made: one line naming the key, the
    rule and the value (instead of a traceback deep inside training, or a silent wrong run)."""
    import math

    from .classes import DATASETS

    def bad(key, rule, value):
        raise HaskdError(f"config key '{key}' {rule}, got {value!r}")

    def positive(key, value, strict=True):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (strict and value == 0):
            bad(key, "must be a finite number " + ("> 0" if strict else ">= 0"), value)

    def one_of(key, value, choices):
        if value not in choices:
            bad(key, f"must be one of {listed(choices)}", value)

    d, m, o, t, te, di = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.teacher, cfg.distill
    for key, choices in CHOICES.items():  # again here: a Config built in code has not been through _set
        one_of(key, get(cfg, key), choices)
    one_of("data.dataset", d.dataset, tuple(DATASETS))
    n_names = len(DATASETS[d.dataset]["classes"])
    if not 1 <= d.num_classes <= n_names:
        bad("data.num_classes", f"must be 1..{n_names} for data.dataset={d.dataset}", d.num_classes)
    positive("data.voxel_size", d.voxel_size)
    for key in ("batch_size", "repeat"):
        if getattr(d, key) < 1:
            bad(f"data.{key}", "must be at least 1", getattr(d, key))
    for key in ("max_voxels", "workers", "labeled_points"):
        if getattr(d, key) < 0:
            bad(f"data.{key}", "must be >= 0", getattr(d, key))
    for key in ("crop_rate", "mix_prob"):
        value = getattr(d, key)
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            bad(f"data.{key}", "must be between 0 and 1", value)
    if not isinstance(m.kwargs, dict) or not all(isinstance(k, str) for k in m.kwargs):
        bad("model.kwargs", "must be a mapping of argument names to values", m.kwargs)
    if not m.module:  # a user's module registers its network when imported; built-in names are checked here
        from .models import REGISTRY

        one_of("model.name", m.name, tuple(sorted(REGISTRY)))
    for key in ("lr", "weight_decay", "momentum", "clip_grad"):
        positive(f"optim.{key}", getattr(o, key), strict=False)
    positive("optim.final_div", o.final_div)
    positive("optim.block_lr_scale", o.block_lr_scale, strict=False)
    positive("train.lovasz_weight", t.lovasz_weight, strict=False)
    if o.momentum >= 1:
        bad("optim.momentum", "must be below 1", o.momentum)
    if o.cycles < 1:
        bad("optim.cycles", "must be at least 1", o.cycles)
    if t.epochs < 1:
        bad("train.epochs", "must be at least 1", t.epochs)
    for key in ("eval_every", "threads", "snapshots"):
        if getattr(t, key) < 0:
            bad(f"train.{key}", "must be >= 0", getattr(t, key))
    if not (isinstance(te.image_size, list) and len(te.image_size) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 8 for x in te.image_size)):
        bad("teacher.image_size", "must be [H, W], two whole numbers >= 8", te.image_size)
    for key in ("num_frames", "frame_stride", "frame_pool", "image_channels", "image_stem_stride", "fusion_hidden"):
        if getattr(te, key) < 1:
            bad(f"teacher.{key}", "must be at least 1", getattr(te, key))
    for key in ("virtual_views", "epochs"):
        if getattr(te, key) < 0:
            bad(f"teacher.{key}", "must be >= 0", getattr(te, key))
    positive("teacher.depth_tau", te.depth_tau)
    for key in ("loss_3d", "loss_2d"):
        positive(f"teacher.{key}", getattr(te, key), strict=False)
    positive("distill.tau", di.tau)
    for key in ("logit_weight", "feat_weight", "hint_weight", "asd_weight"):
        positive(f"distill.{key}", getattr(di, key), strict=False)
    if not isinstance(di.unlabeled_conf, (int, float)) or not 0 <= di.unlabeled_conf < 1:
        bad("distill.unlabeled_conf", "must be in [0, 1)", di.unlabeled_conf)
    if cfg.train.snapshot_schedule == "cycles" and cfg.optim.scheduler != "cyclic_cosine":
        bad("train.snapshot_schedule", "saves at the ends of cosine cycles, which need optim.scheduler=cyclic_cosine "
            f"(optim.scheduler={cfg.optim.scheduler}: snapshots of one run over it are train.snapshot_schedule="
            "whole_run)", "cycles")
    if not isinstance(di.unlabeled_keep, (int, float)) or not 0 <= di.unlabeled_keep <= 1:
        bad("distill.unlabeled_keep", "must be in [0, 1]", di.unlabeled_keep)
    if di.unlabeled_keep > 0 and di.unlabeled_conf == 0:
        bad("distill.unlabeled_keep", "lowers the gate distill.unlabeled_conf, which is 0 (off)", di.unlabeled_keep)
    if not isinstance(di.kd_fade_end, (int, float)) or not 0 < di.kd_fade_end <= 1:
        bad("distill.kd_fade_end", "must be in (0, 1]", di.kd_fade_end)
    for key in ("asd_topk", "cache_topk", "hint_cache_views"):
        if getattr(di, key) < 1:
            bad(f"distill.{key}", "must be at least 1", getattr(di, key))
    _check_together(cfg)
    return cfg


def _check_together(cfg: Config) -> None:
    """Rules across keys, each a key that does nothing unless another is set: one line naming both (these were
    silently ignored before)."""
    di = cfg.distill

    def needs(key, other, why):
        raise HaskdError(f"config key '{key}' needs {other} ({why})")

    if di.hint_cache and not di.cache:
        needs("distill.hint_cache", "distill.cache=true", "the cached hints are built beside the cached soft labels")
    if di.hint_cache_views > 1 and not di.hint_cache:
        needs("distill.hint_cache_views", "distill.hint_cache=true", "it sets how the cached hints are averaged")
    if di.hint_cache_augs < 0:
        raise HaskdError(f"config key 'distill.hint_cache_augs' must be >= 0, got {di.hint_cache_augs}")
    if di.hint_cache_augs and not di.hint_cache:
        needs("distill.hint_cache_augs", "distill.hint_cache=true", "it sets which views the hints are cached on")
    if di.hint_cache_augs_half and not di.hint_cache_augs:
        needs("distill.hint_cache_augs_half", "distill.hint_cache_augs > 0", "it sets how those hints are stored")
    if di.hint_cache_augs and di.hint_cache_views > 1:
        raise HaskdError("config keys 'distill.hint_cache_augs' and 'distill.hint_cache_views' exclude each other "
                         "(hints of the augmented batches, or the mean over rotations of the unaugmented scene)")
    if di.hint_cache_augs and cfg.data.mix_prob > 0:
        raise HaskdError("config key 'distill.hint_cache_augs' needs data.mix_prob=0 (a Mix3D batch overlays two "
                         "samples, whose hints no per-sample cache holds)")
    if cfg.role == "teacher":
        for key in ("teacher_ckpt", "experts"):
            if getattr(di, key):
                needs(f"distill.{key}", "role=student", "a teacher is trained, not distilled")


TEACHER_KEYS = tuple(f"distill.{f.name}" for f in dataclasses.fields(DistillConfig) if f.metadata.get("needs"))


def check_run(cfg: Config) -> Config:
    """Rules of one training run (not of a recipe: `haskd pipeline` reads a config whose teacher-side keys it hands
    to the stages that have a teacher). A student distilled from snapshot experts alone refuses a key that acts on
    the teacher; a point-only student (a baseline trained from a HAS-KD preset) says in one line that they are off."""
    if cfg.role != "student" or cfg.distill.teacher_ckpt:
        return cfg
    keys = [k for k in TEACHER_KEYS if get(cfg, k) != get(Config(), k)]
    if keys and cfg.distill.experts:
        raise HaskdError(f"config key '{keys[0]}' needs distill.teacher_ckpt (it acts on the teacher; this run "
                         "distils from snapshot experts only; `haskd pipeline` sets the checkpoint for its stages)")
    if keys:
        logging.getLogger(__name__).info("point-only student: %s act on a teacher and are off in this run",
                                         ", ".join(keys))
    return cfg


def point_only(cfg: Config) -> Config:
    """A copy of ``cfg`` as a point-only student: no teacher, no experts, no teacher-side key, no snapshots (the
    baseline, and the start of every stage config of the pipeline)."""
    c = copy.deepcopy(cfg)
    c.role = "student"
    c.distill.teacher_ckpt = ""
    c.distill.experts = ""
    for key in TEACHER_KEYS:
        _put(c, key, get(Config(), key))
    c.train.snapshots = 0
    return c


def with_teacher(c: Config, cfg: Config, ckpt) -> Config:
    """Distil ``c`` from the teacher at ``ckpt``, with ``cfg``'s teacher-side keys."""
    c.distill.teacher_ckpt = str(ckpt)
    for key in TEACHER_KEYS:
        _put(c, key, get(cfg, key))
    return c


def _put(cfg: Config, key: str, value) -> None:
    parent, _, name = key.rpartition(".")
    setattr(get(cfg, parent) if parent else cfg, name, value)


def get(cfg: Config, key: str):
    """The value of a dotted key."""
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
