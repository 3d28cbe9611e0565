"""Virtual views: splatted depth is consistent with the points, lifting the rendered colours recovers point colours."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from haskd.data.frames import open_frames
from haskd.data.scene import write_scene
from haskd.images.lifting import lift
from haskd.images.views import ensure_frames, look_pose, render_views, splat

STEP = 0.05


def _grid(a0, a1, b0, b1):
    a, b = np.meshgrid(np.arange(a0, a1 + 1e-9, STEP), np.arange(b0, b1 + 1e-9, STEP), indexing="ij")
    return a.ravel(), b.ravel()


def _room():
    """A 4 x 3 x 2.5 m box room (floor, ceiling, 4 walls) with a solid 'table' block; colour is a smooth function
    of position so that a splat of a neighbour has nearly the right colour."""
    parts = []
    x, y = _grid(0, 4, 0, 3)
    parts += [np.c_[x, y, 0 * x], np.c_[x, y, 0 * x + 2.5]]
    x, z = _grid(0, 4, 0, 2.5)
    parts += [np.c_[x, 0 * x, z], np.c_[x, 0 * x + 3, z]]
    y, z = _grid(0, 3, 0, 2.5)
    parts += [np.c_[0 * y, y, z], np.c_[0 * y + 4, y, z]]
    x, y = _grid(1.5, 2.5, 1.0, 2.0)
    parts += [np.c_[x, y, 0 * x + 0.8]]                      # table top occludes the floor under it
    coord = np.concatenate(parts).astype(np.float32)
    color = np.clip(np.c_[coord[:, 0] / 4, coord[:, 1] / 3, coord[:, 2] / 2.5] * 200 + 30, 0, 255).astype(np.uint8)
    return coord, color


def test_look_pose_is_a_rotation_looking_forward():
    P = look_pose(np.array([1.0, 2.0, 1.5]), yaw=0.0, pitch=0.0)
    np.testing.assert_allclose(P[:3, :3] @ P[:3, :3].T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(P[:3, 2], [1, 0, 0], atol=1e-12)    # forward = +x
    np.testing.assert_allclose(P[:3, 1], [0, 0, -1], atol=1e-12)   # image down = world down
    assert np.linalg.det(P[:3, :3]) > 0


def test_splat_nearest_depth_wins():
    K = np.array([[50.0, 0, 9.5], [0, 50.0, 9.5], [0, 0, 1]])
    pose = look_pose(np.zeros(3), 0.0, 0.0)                   # looking along +x
    coord = np.array([[2.0, 0, 0], [1.0, 0, 0], [3.0, 0.5, 0]])
    color = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    c, d = splat(coord, color, pose, K, (20, 20), point_size=0.01)
    # the two first points land on the centre pixel (10 after rounding 9.5); the nearer (green) wins
    cy, cx = np.round(9.5).astype(int), np.round(9.5).astype(int)
    assert d[cy, cx] == pytest.approx(1.0) and c[cy, cx].tolist() == [0, 255, 0]
    assert (d > 0).sum() == 2                                  # the third lands elsewhere (u = 9.5 - 50*0.5/3)


def test_render_views_depth_consistent_and_lifting_recovers_colours():
    from scipy.spatial import cKDTree

    coord, color = _room()
    views = render_views(coord, color, num_views=4, image_size=(60, 80), fov_deg=70, seed=0)
    assert len(views) == 4
    tree = cKDTree(coord)
    for c, d, pose, K in views:
        assert c.shape == (60, 80, 3) and c.dtype == np.uint8 and d.shape == (60, 80)
        assert (d > 0).mean() > 0.9                            # inside a closed room nearly every pixel is hit
        # back-project every rendered pixel: it must land on (next to) a point of the cloud
        v, u = np.nonzero(d > 0)
        z = d[v, u]
        cam = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], 1)
        world = cam @ pose[:3, :3].T + pose[:3, 3]
        dist, _ = tree.query(world)
        assert np.median(dist) < STEP and np.percentile(dist, 95) < 2 * STEP
        # the camera is inside the room
        assert (pose[:3, 3] > coord.min(0)).all() and (pose[:3, 3] < coord.max(0)).all()

    img = torch.from_numpy(np.stack([v[0] for v in views])).permute(0, 3, 1, 2).float()
    depth = np.stack([v[1] for v in views])
    pose = np.stack([v[2] for v in views])
    K = views[0][3]
    out = lift(coord, img, pose, K, (60, 80), depth, K, tau=STEP)
    vis = out["visible"].numpy()
    assert vis.mean() > 0.1                                   # 4 small views of a whole room
    err = np.abs(out["feat"][vis].numpy() - color[vis]).mean()
    shuf = np.abs(out["feat"][vis].numpy() - color[vis][np.random.default_rng(0).permutation(vis.sum())]).mean()
    assert err < 5.0 and err < 0.1 * shuf, (err, shuf)


def test_ensure_frames_writes_virtual_and_prefers_real(tmp_path):
    coord, color = _room()
    scene = write_scene(tmp_path / "train" / "room", coord[::2], color[::2])
    before = sorted(p.name for p in scene.iterdir())
    d = ensure_frames(scene, num_views=3, image_size=(30, 40))
    assert d.parent.parent == Path(os.environ["HASKD_CACHE"]) and d.name.startswith("room-")
    assert sorted(p.name for p in scene.iterdir()) == before  # the input is never written to
    assert d.stat().st_mode & 0o077 != 0  # a normal folder (others may read it), not mkdtemp's private 0700
    fs = open_frames(d, strict=True)
    assert len(fs.ids) == 3
    f = fs.load(fs.ids[0])
    assert f.color.shape == (30, 40, 3) and f.depth.shape == (30, 40) and (f.depth > 0).mean() > 0.5
    mtime = (d / "pose" / f"{fs.ids[0]}.txt").stat().st_mtime_ns
    assert ensure_frames(scene, num_views=3, image_size=(30, 40)) == d          # reused, not re-rendered
    assert (d / "pose" / f"{fs.ids[0]}.txt").stat().st_mtime_ns == mtime
    # a real frames/ folder wins
    import shutil
    shutil.copytree(d, scene / "frames")
    assert ensure_frames(scene) == scene / "frames"
