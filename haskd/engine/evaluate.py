"""Full-resolution evaluation: voxel predictions are mapped back to every original point through ``inverse``."""
from __future__ import annotations

import numpy as np
import torch

from ..classes import class_names
from ..data.transforms import collate, make_features, voxel_mean, voxelize
from .distributed import rank, world_size
from .metrics import ConfusionMatrix
from .tasks import move_to


def scene_sample(scene, voxel_size, num_classes, use_normal=False, angle=0.0) -> dict:
    """Unaugmented (optionally z-rotated, for TTA) voxel sample of a whole scene."""
    coord = scene.coord
    normal = scene.normal
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)
        coord = coord @ R.T
        normal = normal @ R.T if normal is not None else None
    vox = voxelize(coord, scene.color.astype(np.float32), scene.segment, normal, voxel_size, num_classes)
    sample = {"scene": scene.name, "coord": vox["coord"], "grid_coord": vox["grid_coord"],
              "feat": make_features(vox, use_normal), "inverse": vox["inverse"],
              "world": voxel_mean(scene.coord, vox["inverse"], vox["grid_coord"].shape[0])}
    if "segment" in vox:
        sample["segment"] = vox["segment"]
    return sample


def frames_hook(dataset, i):
    """``extra`` for a whole-scene pass over scene ``i`` of ``dataset``: its chosen frames on the sample, or None
    for a dataset without frames."""
    if getattr(dataset, "frames", None) is None:
        return None
    fr = dataset.frames_of(i)

    def add(sample):
        sample["frames"] = fr
        return sample

    return add


@torch.no_grad()
def predict_points(model, scene, voxel_size, num_classes, device="cpu", use_normal=False, tta=False,
                   extra=None) -> torch.Tensor:
    """Per-point class probabilities (P, C) for one scene. ``tta`` averages 4 z-rotations.

    ``extra(sample) -> sample`` lets a caller add inputs (the teacher adds its frames).
    """
    angles = [0.0, np.pi / 2, np.pi, 3 * np.pi / 2] if tta else [0.0]
    probs = None
    for a in angles:
        sample = scene_sample(scene, voxel_size, num_classes, use_normal, a)
        if extra is not None:
            sample = extra(sample)
        batch = move_to(collate([sample]), device)
        logits = model(batch)["logits"].float()
        p = torch.softmax(logits, 1)[batch["inverse"]].cpu()
        probs = p if probs is None else probs + p
    return probs / len(angles)


def evaluate(model, dataset, device="cpu", dataset_name="scannet20", tta=False, progress=False, voting=None) -> dict:
    """mIoU / mAcc / allAcc / per-class IoU on every original point of every scene of ``dataset``.

    ``voting``: a list of test-time augmentations (:data:`haskd.engine.voting.VOTING_AUGS`) for Pointcept's
    fragment voting instead of the single pass; the result then also holds ``min_votes``, the fewest forwards that
    saw any point (at least one per augmentation). Under DDP each rank evaluates a shard and the confusion
    matrices are summed. A dataset with the teacher's frames (:meth:`SceneDataset.with_frames`) shows each scene's
    chosen frames to the model.
    """
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(dataset.num_classes)
    min_votes = 1 << 62
    idx = list(range(rank(), len(dataset.scenes), world_size()))
    it = idx
    if progress:
        from ..progress import progress as bar

        it = bar(idx, desc="eval", unit="scene", leave=False, line=False)
    for i in it:
        scene = dataset.scenes[i]
        if scene.segment is None:
            continue
        hook = frames_hook(dataset, i)
        if voting:
            from .voting import vote_points

            probs, votes = vote_points(model, scene, dataset.voxel_size, dataset.num_classes, voting, device,
                                       dataset.use_normal, extra=hook)
            min_votes = min(min_votes, int(votes.min()))
        else:
            probs = predict_points(model, scene, dataset.voxel_size, dataset.num_classes, device,
                                   dataset.use_normal, tta, extra=hook)
        cm.update(probs.argmax(1), torch.from_numpy(scene.segment))
    cm.all_reduce()
    model.train(was_training)
    out = cm.compute(class_names(dataset_name)[: dataset.num_classes])
    if voting:
        out.update(min_votes=min_votes if min_votes < 1 << 62 else 0, augmentations=len(voting))
    return out
