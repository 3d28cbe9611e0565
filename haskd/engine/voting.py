"""Pointcept's test-time fragment voting (its ``SemSegTester`` with a ``test_cfg``), as an evaluation mode.

For each test-time augmentation of a scene (``aug_transform`` of Pointcept's configs: 13 for ScanNet, 10 for
S3DIS), the scene is grid-sampled in 'test' mode (:func:`haskd.data.transforms.grid_fragments`): fragment ``i``
holds point ``i mod n_v`` of every voxel ``v``, so the fragments of one augmentation hold every point at least
once. Each fragment goes through the network on its own (one point per voxel, the point's own colour and normal);
the softmax of its logits is added to the points it holds. The prediction is the argmax of the sum. Pointcept sums
probabilities, not logits; so do we.

The single pass of :func:`haskd.engine.evaluate.evaluate` (mean of each voxel's points, one forward) stays the
default and is reported apart.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.transforms import center_shift, collate, grid_fragments, make_features, rotation_matrix
from .tasks import move_to


def _augs(rotations, scales, flip_last):
    return [dict(angle=a, scale=s, flip=False) for s in scales for a in rotations] + \
        ([dict(angle=0.0, scale=1.0, flip=True)] if flip_last else [])


# Pointcept's aug_transform lists (angles in units of pi about z through the floor centre; ``flip`` mirrors x and
# y, as its RandomFlip with p = 1 does).
VOTING_AUGS = {
    # semseg-spunet-v1m1-0-base / semseg-pt-v3m1-0-base (ScanNet): 4 rotations x scales 1, 0.95, 1.05, then a flip.
    "scannet": _augs((0.0, 0.5, 1.0, 1.5), (1.0, 0.95, 1.05), True),
    # the same configs for S3DIS: 5 scales, without and with the flip.
    "s3dis": [dict(angle=0.0, scale=s, flip=f) for f in (False, True) for s in (0.9, 0.95, 1.0, 1.05, 1.1)],
}


def voting_augs(name: str, dataset: str = "scannet20") -> list:
    """The augmentation list ``name`` (``""``: the one of ``dataset``'s family)."""
    if not name:
        name = "s3dis" if dataset.startswith("s3dis") else "scannet"
    return VOTING_AUGS[name]


def apply_test_aug(coord, normal, aug: dict):
    """One test-time augmentation: rotation about z through the origin, isotropic scale, x/y mirror."""
    R = rotation_matrix("z", aug["angle"] * np.pi) * aug["scale"]
    if aug["flip"]:
        R = np.diag([-1.0, -1.0, 1.0]) @ R
    c = (coord.astype(np.float64) @ R.T).astype(np.float32)
    if normal is None:
        return c, None
    n = normal.astype(np.float64) @ (R / aug["scale"]).T
    return c, n.astype(np.float32)


def scene_fragments(scene, voxel_size, aug: dict, use_normal=False) -> list:
    """The fragments of one scene under one augmentation: sample dicts ready for :func:`collate` (``inverse`` is
    the identity: one point per voxel), each with ``index`` (V,) the scene's point ids it holds."""
    coord, normal = apply_test_aug(center_shift(scene.coord, apply_z=True), scene.normal, aug)
    frags, grid = grid_fragments(coord, voxel_size)
    color = scene.color.astype(np.float32)
    out = []
    for idx in frags:
        vox = {"color": color[idx], "normal": None if normal is None else normal[idx], "coord": coord[idx]}
        g = grid[idx]
        out.append({"scene": scene.name, "coord": coord[idx], "grid_coord": g - g.min(0),
                    "feat": make_features(vox, use_normal), "inverse": np.arange(idx.shape[0], dtype=np.int64),
                    "world": scene.coord[idx], "points": idx})
    return out


@torch.no_grad()
def vote_points(model, scene, voxel_size, num_classes, augs, device="cpu", use_normal=False, extra=None,
                fragments_per_batch=4):
    """Summed softmax over every fragment of every augmentation: ``(probs (P, C), votes (P,))``, where
    ``votes[i]`` counts the forwards that saw point ``i`` (at least ``len(augs)`` for every point).

    ``extra(sample) -> sample`` adds inputs (the teacher's frames). Fragments are independent samples, so several
    share one forward (``fragments_per_batch``) without changing the result in eval mode."""
    P = scene.coord.shape[0]
    probs = torch.zeros((P, num_classes), dtype=torch.float64)
    votes = torch.zeros(P, dtype=torch.int64)
    for aug in augs:
        frags = scene_fragments(scene, voxel_size, aug, use_normal)
        for s in range(0, len(frags), fragments_per_batch):
            part = frags[s:s + fragments_per_batch]
            samples = [extra(f) if extra is not None else f for f in part]
            batch = move_to(collate(samples), device)
            p = torch.softmax(model(batch)["logits"].float(), 1).cpu().double()
            for f, a, b in zip(part, [0, *batch["offset"].tolist()[:-1]], batch["offset"].tolist()):
                rows = torch.from_numpy(f["points"])
                probs.index_add_(0, rows, p[a:b])
                votes.index_add_(0, rows, torch.ones_like(rows))
    return probs, votes
