"""Scene datasets: scene folders -> per-sample voxel dicts (see :mod:`haskd.data.transforms`)."""
from __future__ import annotations

import copy
import dataclasses
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .scene import list_scenes, load_scene
from .transforms import augment, crop, make_features, pointcept_train_voxels, voxel_mean, voxelize


def with_labeled_points(scene, n: int):
    """``scene`` with the labels of only ``n`` of its labeled points kept, the others -1 (``data.labeled_points``).

    The points are drawn by a generator seeded by the scene's name alone, so every model and every seed trains on
    the same ones (as Pointcept's data-efficient benchmark ships them in fixed files); a scene with at most ``n``
    labeled points keeps them all."""
    if scene.segment is None:
        return scene
    return dataclasses.replace(scene, segment=sparse_labels(scene.name, scene.segment, n))


def sparse_labels(name: str, segment, n: int) -> np.ndarray:
    """The labels ``segment`` (P,) of scene ``name`` with only the ``n`` points of :func:`with_labeled_points`
    kept, the others -1 (the same array when it has at most ``n`` labeled points)."""
    labeled = np.flatnonzero(segment >= 0)
    if len(labeled) <= n:
        return segment
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    keep = rng.choice(labeled, size=n, replace=False)
    out = np.full_like(segment, -1)
    out[keep] = segment[keep]
    return out


class SceneDataset(torch.utils.data.Dataset):
    """Scenes of ``<root>/<split>``, loaded once into memory (indoor scenes are small after voxelization).

    Training samples are augmented and cropped with a generator seeded by (seed, epoch, index), so a resumed run
    sees exactly the same batches as an uninterrupted one. With ``views`` = K > 0 (``distill.hint_cache_augs``),
    epoch e draws the samples of epoch e mod K: the K augmented views of every sample are known in advance (a cache
    of a frozen model's outputs on them), and each sample carries ``draw`` = (view, index). Evaluation samples are neither augmented nor cropped,
    and carry ``point_segment`` (labels of every original point) for full-resolution metrics.
    """

    def __init__(self, root, split, num_classes, voxel_size=0.05, train=False, use_normal=False, max_voxels=0,
                 augment=True, seed=0, repeat=1, need_labels=True, scenes=None, recipe=None, frames=None,
                 labeled_points=0):
        self.dirs = [Path(p) for p in scenes] if scenes is not None else list_scenes(root, split)
        self.scenes = [load_scene(p, num_classes=num_classes, need_labels=need_labels) for p in self.dirs]
        if labeled_points > 0:  # data.labeled_points: limited annotation
            self.scenes = [with_labeled_points(sc, labeled_points) for sc in self.scenes]
        if use_normal:  # zeros in place of missing normals would give a silently different network input
            for sc in self.scenes:
                if sc.normal is None:
                    raise InputError(Path(sc.path) / "normal.npy", "missing file (the config has data.use_normal=true)")
        self.num_classes = num_classes
        self.voxel_size = voxel_size
        self.train = train
        self.use_normal = use_normal
        self.max_voxels = max_voxels
        self.augment = augment and train
        self.seed = seed
        self.epoch = 0
        self.views = 0  # > 0: epoch e draws the samples of epoch e mod views (set by the distilled student's setup)
        self.repeat = max(1, repeat) if train else 1
        # Pointcept's recipe (data.augment_recipe=pointcept): keyword arguments of pointcept_train_voxels, plus
        # mix_prob (Mix3D, drawn per sample, applied by collate). None: haskd's CPU-sized augmentation.
        self.recipe = dict(recipe) if recipe and train else None
        # the teacher's frames (haskd.images.provider.FrameProvider, duck-typed: this module does not import it)
        self.frames = frames.load(self.scenes) if frames is not None else None

    def with_frames(self, provider) -> "SceneDataset":
        """The same scenes, their samples carrying ``provider``'s frames (loaded here, once)."""
        view = copy.copy(self)
        view.frames = provider.load(self.scenes)
        return view

    def frames_of(self, i: int):
        """The frames scene ``i`` shows the teacher in a whole-scene pass (evaluation, caches), or None."""
        return self.frames.scene_frames(i) if self.frames is not None else None

    @property
    def chosen_frames(self) -> dict:
        """{scene name: the frame ids chosen for it} ({} without frames)."""
        return self.frames.chosen if self.frames is not None else {}

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.scenes) * self.repeat

    def __getitem__(self, idx):
        scene = self.scenes[idx % len(self.scenes)]
        view = self.epoch % self.views if self.views else self.epoch
        rng = np.random.default_rng([self.seed, view, idx])
        coord, color, normal = scene.coord, scene.color.astype(np.float32), scene.normal
        mix = False
        if self.recipe is not None:
            r = dict(self.recipe)
            mix = rng.random() < r.pop("mix_prob", 0.0)
            vox = pointcept_train_voxels(coord, color, scene.segment, normal, rng, self.voxel_size, self.num_classes,
                                         max_points=self.max_voxels, augment=self.augment, **r)
        else:
            if self.augment:
                coord, color, normal = augment(coord, color, normal, rng)
            vox = voxelize(coord, color, scene.segment, normal, self.voxel_size, self.num_classes)
            # Voxel centres in the scene's own (unaugmented) frame: the teacher projects these into its images.
            vox["world"] = voxel_mean(scene.coord, vox["inverse"], vox["grid_coord"].shape[0])
            if self.train:
                vox = crop(vox, self.max_voxels, rng)
        sample = {
            "scene": scene.name,
            "coord": vox["coord"],
            "grid_coord": vox["grid_coord"],
            "feat": make_features(vox, self.use_normal),
            "inverse": vox["inverse"],
            "world": vox["world"],
            "index": idx % len(self.scenes),
        }
        if "segment" in vox:
            sample["segment"] = vox["segment"]
        if mix:
            sample["mix"] = True
        if self.views:
            sample["draw"] = (view, idx)
        if self.frames is not None:
            sample["frames"] = self.frames.sample_frames(idx % len(self.scenes), rng, self.train)
        if not self.train and scene.segment is not None:
            sample["point_segment"] = scene.segment
        return sample


# data.val_split values that turn validation off.
NO_SPLIT = ("", "none")


def split_state(root, split: str) -> str:
    """What ``<root>/<split>`` holds: ``"off"`` (``split`` is "" or "none"), ``"missing"`` (no such folder),
    ``"empty"`` (a folder without scene folders: Pointcept's preprocessing writes an empty ``val/`` when every scene
    is in the train list) or ``"ok"``."""
    if str(split).strip().lower() in NO_SPLIT:
        return "off"
    d = Path(root) / split
    if not d.is_dir():
        return "missing"
    return "ok" if any(p.is_dir() and not p.name.startswith(".") for p in d.iterdir()) else "empty"


def in_channels(use_normal: bool) -> int:
    return 6 if use_normal else 3
