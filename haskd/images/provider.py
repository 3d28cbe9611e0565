"""The teacher's frames, owned by the dataset that feeds it: which frames each scene gives (IOF, or a selection
read from a file), loaded once as tensors, and the frames a sample carries.

One object does this for training, evaluation, caching and benchmarking alike::

    provider = FrameProvider.from_config(teacher_cfg, selections=None, pool=False)   # builds, reads nothing
    ds = SceneDataset(..., frames=provider)     # or: other_ds.with_frames(provider)
    ds[i]["frames"]                             # a training / evaluation sample's frames
    ds.frames_of(i)                             # the K chosen frames of scene i (whole-scene passes, caches)

Frames are looked up, never made: a scene's real ``frames/``, else its ``frames_virtual/``, else virtual views
rendered beforehand into the cache by ``haskd frames render`` (the pipeline runs that step before its teacher).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..data.frames import open_frames, scale_intrinsic
from ..errors import HaskdError, InputError
from .views import find_frames

log = logging.getLogger(__name__)


class FrameProvider:
    """K frames per scene for the multi-modal teacher.

    ``selections``: {scene name: [frame ids]} (``frames.json`` of a teacher run, ``haskd frames select``) instead
    of choosing with the frame filter. ``pool``: keep up to ``frame_pool`` frames per scene (the K chosen first,
    then frames spread evenly over the usable ones) and let each training sample draw ``num_frames`` of them at
    random (``teacher.train_frames=random``); evaluation and caches always see the K chosen frames.
    """

    def __init__(self, num_frames=5, image_size=(240, 320), policy="iof", voxel_size=0.05, depth_tau=0.1, seed=0,
                 stride=1, virtual_views=20, frame_pool=0, selections=None, pool=False):
        self.num_frames = num_frames
        self.image_size = tuple(image_size)
        self.policy = policy
        self.voxel_size = voxel_size
        self.depth_tau = depth_tau
        self.seed = seed
        self.stride = stride
        self.virtual_views = virtual_views
        self.frame_pool = frame_pool
        self.selections = selections
        self.pool = pool
        self.data = None     # per scene: a frame dict (see load_frames) or None, after load()
        self.n_chosen = []   # per scene: how many of its loaded rows are the chosen frames (the rest: the pool)
        self.chosen = {}     # scene name -> the K chosen frame ids

    @classmethod
    def from_config(cls, cfg, selections=None, pool=False) -> "FrameProvider":
        t = cfg.teacher
        return cls(t.num_frames, t.image_size, t.frame_policy, cfg.data.voxel_size, t.depth_tau, cfg.train.seed,
                   t.frame_stride, t.virtual_views, t.frame_pool, selections, pool)

    @classmethod
    def for_run(cls, cfg, run_dir) -> "FrameProvider":
        """The frames a trained teacher run chose (its ``frames.json``), for scenes it knows; others are chosen."""
        return cls.from_config(cfg, selections=read_selection(Path(run_dir) / "frames.json"))

    @property
    def k(self) -> int:
        """Frames a training sample draws from its scene's pool (0: it takes them all)."""
        return self.num_frames if self.pool else 0

    def load(self, scenes) -> "FrameProvider":
        """Choose (or look up) and load every scene's frames, once; a loaded provider is not loaded again."""
        if self.data is not None:
            return self
        data, chosen, n_chosen = [], {}, []
        for scene in scenes:
            fs, ids = self._frames_of(scene)
            n_chosen.append(len(ids))
            if fs is None or not ids:
                log.warning("%s: no usable frame; the teacher sees points only here", scene.path)
                data.append(None)
                continue
            chosen[scene.name] = list(ids)
            if self.pool:
                # the chosen frames first (rows 0..K-1, what evaluation and caching use), then frames spread evenly
                # over the usable ones (no visibility pass: FrameSet.ids holds only usable frames)
                cand = list(fs.ids[::max(1, self.stride)])
                n = max(self.frame_pool, len(ids))
                spread = [cand[j] for j in
                          np.unique(np.linspace(0, len(cand) - 1, min(n, len(cand))).round().astype(int))]
                ids = (list(ids) + [f for f in spread if f not in set(ids)])[:n]
            data.append(load_frames(fs, ids, self.image_size))
        self.data, self.chosen, self.n_chosen = data, chosen, n_chosen
        return self

    def _frames_of(self, scene):
        """(FrameSet, chosen ids) of a scene: the given selection, else the frame filter's choice."""
        from .iof import select_frames

        fdir = find_frames(scene.path, num_views=self.virtual_views)
        if fdir is None:
            raise InputError(scene.path, "no frames for the teacher: no frames/ folder and no rendered virtual "
                                         "views (render them first: haskd frames render --data ROOT)")
        fs = open_frames(fdir)
        if fs is None:
            return None, []
        if fdir == scene.path / "frames":  # real frames: poses in the input's frame (virtual ones: the scene's own)
            fs.origin = scene.origin
        if self.selections and scene.name in self.selections:
            return fs, list(self.selections[scene.name])
        sel = select_frames(scene.coord, fs, k=self.num_frames, policy=self.policy, voxel_size=self.voxel_size,
                            tau=self.depth_tau, seed=self.seed, stride=self.stride)
        return fs, sel["ids"]

    def scene_frames(self, i: int):
        """The K chosen frames of scene ``i`` (evaluation, caches), or None for a scene without frames."""
        fr = self.data[i]
        if self.pool and fr is not None:
            fr = subset_frames(fr, np.arange(self.n_chosen[i]))
        return fr

    def sample_frames(self, i: int, rng, train: bool):
        """The frames a sample of scene ``i`` carries: in training with a pool, ``num_frames`` rows drawn with the
        sample's generator (after its augmentation draws); else every loaded row."""
        fr = self.data[i]
        if fr is not None and train and 0 < self.k < fr["color"].shape[0]:
            fr = subset_frames(fr, np.sort(rng.choice(fr["color"].shape[0], self.k, replace=False)))
        return fr


def load_frames(frameset, ids, image_hw) -> dict:
    """Load chosen frames as tensors: ``color`` (K,3,H,W) uint8 resized to image_hw, ``depth`` (K,h,w) metres,
    ``pose`` (K,4,4), ``K_color`` (3,3) for the resized colour, ``K_depth`` (3,3)."""
    from PIL import Image

    H, W = image_hw
    cols, deps, poses = [], [], []
    K_color = None
    kept = []
    for fid in ids:
        try:
            fr = frameset.load(fid)
        except InputError as e:  # truncated after a readable header: skipped and counted, like open_frames' skips
            log.warning("%s; frame skipped", e)
            frameset.skipped["unreadable image"] = frameset.skipped.get("unreadable image", 0) + 1
            continue
        kept.append(fid)
        h0, w0 = fr.color.shape[:2]
        img = Image.fromarray(fr.color).resize((W, H), Image.BILINEAR)
        cols.append(np.asarray(img).transpose(2, 0, 1))
        deps.append(fr.depth)
        poses.append(fr.pose)
        K_color = scale_intrinsic(fr.K_color, W / w0, H / h0)
    if not kept:
        raise InputError(frameset.root, "no readable frame among the chosen ones")
    dshapes = {d.shape for d in deps}
    if len(dshapes) != 1:
        raise HaskdError(f"{frameset.root}: depth images of different sizes {sorted(dshapes)}")
    return {"color": torch.from_numpy(np.stack(cols)), "depth": torch.from_numpy(np.stack(deps)).float(),
            "pose": torch.from_numpy(np.stack(poses)).float(), "K_color": torch.from_numpy(K_color).float(),
            "K_depth": torch.from_numpy(frameset.K_depth).float(), "ids": list(kept)}


def subset_frames(frames: dict, rows) -> dict:
    """The frames at ``rows`` of a per-scene frame dict (see :func:`load_frames`)."""
    rows = np.asarray(rows)
    out = dict(frames)
    for key in ("color", "depth", "pose"):
        out[key] = frames[key][torch.from_numpy(rows)]
    out["ids"] = [frames["ids"][i] for i in rows]
    return out


def read_selection(path):
    """{scene: [frame ids]} from a ``frames.json``, or None when there is none."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def save_selection(chosen: dict, path):
    from ..io import write_text

    write_text(path, json.dumps(chosen, indent=1))
