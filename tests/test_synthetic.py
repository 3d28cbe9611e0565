"""Synthetic rooms: determinism, labels, frames agreeing with points, hard classes thin and weak in points."""
import argparse

import numpy as np
import pytest

from haskd.commands import prepare as prepare_cmd
from haskd.data.frames import open_frames
from haskd.data.scene import list_scenes, load_scene
from haskd.data.synthetic import HARD_LABELS, CLS, boundary_label_noise, look_pose, make_room, write_dataset
from haskd.errors import HaskdError

SMALL = dict(points_per_m2=150.0, num_frames=4, image_size=(90, 120))


@pytest.fixture(scope="module")
def room():
    return make_room(3, **SMALL)


def _project(coord, frame):
    """Pixel (u, v) and camera depth z of world points in one SynthFrame."""
    T = np.linalg.inv(frame.pose)
    cam = coord.astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    z = cam[:, 2]
    zs = np.maximum(z, 1e-6)
    u = np.round(frame.K[0, 0] * cam[:, 0] / zs + frame.K[0, 2]).astype(int)
    v = np.round(frame.K[1, 1] * cam[:, 1] / zs + frame.K[1, 2]).astype(int)
    H, W = frame.depth.shape
    ok = (z > 0.05) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    return u, v, z, ok


def test_deterministic_per_seed(room):
    again = make_room(3, **SMALL)
    for key in ("coord", "color", "normal", "segment", "segment_clean", "instance"):
        np.testing.assert_array_equal(room[key], again[key])
    for a, b in zip(room["frames"], again["frames"]):
        np.testing.assert_array_equal(a.color, b.color)
        np.testing.assert_array_equal(a.depth, b.depth)
    other = make_room(4, **SMALL)
    assert other["coord"].shape != room["coord"].shape or not np.array_equal(other["coord"], room["coord"])


def test_shapes_and_labels(room):
    n = len(room["coord"])
    assert room["coord"].dtype == np.float32 and room["coord"].shape == (n, 3)
    assert room["color"].dtype == np.uint8 and room["color"].shape == (n, 3)
    np.testing.assert_allclose(np.linalg.norm(room["normal"], axis=1), 1.0, atol=1e-6)
    for key in ("segment", "segment_clean"):
        s = room[key]
        assert s.dtype == np.int64 and s.shape == (n,)
        assert s.min() >= -1 and s.max() <= 19
    present = set(np.unique(room["segment_clean"]).tolist())
    assert {-1, CLS["wall"], CLS["floor"], CLS["door"], *HARD_LABELS} <= present
    assert len(present - {-1, 0, 1}) >= 5          # several furniture classes besides walls and floor
    # points stay inside the room (up to the position noise)
    assert (room["coord"] > -0.02).all() and (room["coord"] < room["room_size"] + 0.02).all()
    assert len(room["frames"]) == SMALL["num_frames"]
    f = room["frames"][0]
    assert f.color.shape == (*SMALL["image_size"], 3) and f.color.dtype == np.uint8
    assert f.depth.shape == SMALL["image_size"] and (f.depth > 0).all()
    assert 1.3 <= f.pose[2, 3] <= 1.6                 # camera height


def test_boundary_noise_only_near_boundaries(room):
    changed = room["segment"] != room["segment_clean"]
    assert 0 < changed.mean() < 0.1
    from scipy.spatial import cKDTree

    # every changed point had a differently labelled clean neighbour within the band (4 cm)
    c, clean = room["coord"], room["segment_clean"]
    tree = cKDTree(c)
    for i in np.flatnonzero(changed)[:200]:
        nb = tree.query_ball_point(c[i], 0.04)
        assert (clean[nb] != clean[i]).any()


def test_boundary_label_noise_unit():
    x = np.linspace(0, 1, 101)
    coord = np.stack([x, np.zeros_like(x), np.zeros_like(x)], 1)
    seg = (x > 0.5).astype(np.int64)
    out = boundary_label_noise(coord, seg, np.random.default_rng(0), band=0.015, prob=1.0)
    changed = np.flatnonzero(out != seg)
    assert len(changed) == 2 and set(changed) == {50, 51}     # the two points at the boundary swap


def test_frames_agree_with_points(room):
    coord, color = room["coord"], room["color"].astype(float)
    seen = consistent = 0
    err, err_shuffled = [], []
    rng = np.random.default_rng(0)
    for f in room["frames"]:
        u, v, z, ok = _project(coord, f)
        good = ok & (np.abs(f.depth[np.clip(v, 0, f.depth.shape[0] - 1), np.clip(u, 0, f.depth.shape[1] - 1)] - z)
                     < 0.02)
        seen += ok.sum()
        consistent += good.sum()
        pix = f.color[v[good], u[good]].astype(float)
        err.append(np.abs(pix - color[good]).mean())
        err_shuffled.append(np.abs(pix - color[good][rng.permutation(good.sum())]).mean())
    assert seen > 1000
    assert consistent / seen > 0.45              # the rest is occluded in that view
    assert np.mean(err) < 12 and np.mean(err) < 0.4 * np.mean(err_shuffled)


def test_hard_classes_thin_and_weak_in_points(room):
    hard = [o for o in room["objects"] if o["label"] in HARD_LABELS]
    assert {o["class"] for o in hard} == {"picture", "window"}
    W, D, _ = room["room_size"]
    for o in hard:
        assert o["relief"] <= 0.02
        (lo, hi), = o["boxes"]
        assert min(lo[0], lo[1], W - hi[0], D - hi[1]) < 1e-9      # mounted on a wall
        assert np.sort(hi - lo)[0] <= 0.02 + 1e-9                  # and only as thick as its relief
    c, clean, col = room["coord"], room["segment_clean"], room["color"].astype(float)
    is_hard = np.isin(clean, HARD_LABELS)
    # every hard point lies within relief (+ position noise) of a wall plane
    wall_dist = np.min(np.stack([c[:, 0], c[:, 1], W - c[:, 0], D - c[:, 1]]), 0)
    assert wall_dist[is_hard].max() <= 0.02 + 0.01
    # weakly present: mean colour near the wall's, but a visibly larger colour spread (the fine texture)
    wall = clean == CLS["wall"]
    for lab in HARD_LABELS:
        m = clean == lab
        shift = np.abs(col[m].mean(0) - col[wall].mean(0)).max()
        assert shift < 30
        assert col[m].std(0).mean() > col[wall].std(0).mean()


def test_hard_objects_plain_in_images():
    """In the images the pattern of a hard object gives much more pixel contrast than the wall around it."""
    r = make_room(11, points_per_m2=100.0, num_frames=0)
    assert r["frames"] == []

    obj = next(o for o in r["objects"] if o["class"] == "picture")
    (lo, hi), = obj["boxes"]
    W, D, _ = r["room_size"]
    centre = (lo + hi) / 2
    # camera 1.5 m in front of the picture, looking at it
    normal = np.array([1.0 if lo[0] < 1e-9 else -1.0 if W - hi[0] < 1e-9 else 0.0,
                       1.0 if lo[1] < 1e-9 else -1.0 if D - hi[1] < 1e-9 else 0.0, 0.0])
    cam = centre + 1.5 * normal
    yaw = np.arctan2(-normal[1], -normal[0])
    pose = look_pose(cam, yaw, 0.0)
    (view,) = make_room(11, points_per_m2=100.0, image_size=(120, 160), poses=[pose])["frames"]
    color, depth = view.color, view.depth
    assert np.isclose(depth[60, 80], 1.5 - (hi - lo).min(), atol=0.03)
    centre_patch = color[50:70, 70:90].astype(float)
    assert centre_patch.std() > 12


def test_scan_blur_hides_the_fine_pattern_from_the_points_only(room):
    """Version 2: the same room (geometry, labels, frames), but the hard objects' point colours are blurred as a
    fused scan's are, so their fine pattern is almost gone from the points while the frames keep it."""
    from haskd.data.synthetic import VERSIONS

    blurred = make_room(3, **SMALL, **VERSIONS[2])
    for k in ("coord", "segment", "segment_clean", "normal"):
        np.testing.assert_array_equal(blurred[k], room[k])
    for a, b in zip(blurred["frames"], room["frames"]):
        np.testing.assert_array_equal(a.color, b.color)
    clean = room["segment_clean"]
    wall = clean == CLS["wall"]
    for lab in HARD_LABELS:
        m = clean == lab
        sharp, soft = (r["color"][m].astype(float).std(0).mean() for r in (room, blurred))
        assert soft < 0.5 * sharp
        # the mean colour, the weak cue the points keep, moves by less than the sensor noise
        shift = np.abs(blurred["color"][m].astype(float).mean(0) - room["color"][m].astype(float).mean(0)).max()
        assert shift < 5
    # plain walls change little: their texture is smooth at 3 cm
    assert abs(blurred["color"][wall].astype(float).std(0).mean() - room["color"][wall].astype(float).std(0).mean()) < 3


def _local_contrast(img):
    """Mean absolute difference of each pixel to its 3x3 neighbourhood's mean, per pixel (H, W)."""
    from scipy.ndimage import uniform_filter

    img = img.astype(float)
    return np.abs(img - np.stack([uniform_filter(img[..., c], 3) for c in range(3)], -1)).mean(-1)


def test_version3_picture_pattern_survives_small_frames_but_not_the_points(room):
    """Version 3: as version 2, with a coarser picture pattern. In frames downscaled 2x as the teacher of the
    converged candidate loads them (PIL bilinear, 240x320 -> 120x160), version 2's picture pattern is gone and
    version 3's stays; in the points both are blurred away."""
    from PIL import Image

    from haskd.data.synthetic import VERSIONS

    kw = dict(points_per_m2=150.0, num_frames=12, image_size=(240, 320))
    v2, v3 = (make_room(3, **kw, **VERSIONS[v]) for v in (2, 3))
    for k in ("coord", "segment", "segment_clean"):
        np.testing.assert_array_equal(v2[k], v3[k])
    contrast = {2: [], 3: []}
    for a, b in zip(v2["frames"], v3["frames"]):
        moved = (a.color != b.color).any(-1)  # only the picture's pattern differs between the versions
        small = np.asarray(Image.fromarray(moved.astype(np.uint8) * 255).resize((160, 120), Image.NEAREST)) > 0
        for v, fr in ((2, a), (3, b)):
            down = np.asarray(Image.fromarray(fr.color).resize((160, 120), Image.BILINEAR))
            contrast[v].append(_local_contrast(down)[small])
    c2, c3 = (np.concatenate(contrast[v]).mean() for v in (2, 3))
    assert sum(len(c) for c in contrast[3]) > 500  # the picture is in view
    assert c3 > 2 * c2
    pic = v2["segment_clean"] == CLS["picture"]
    sharp = room["color"][pic].astype(float).std(0).mean()
    for r in (v2, v3):
        assert r["color"][pic].astype(float).std(0).mean() < 0.5 * sharp


def test_write_dataset_roundtrip(tmp_path):
    kw = dict(points_per_m2=60.0, num_frames=2, image_size=(30, 40))
    s = write_dataset(tmp_path, num_train=1, num_val=1, seed=5, progress=False, **kw)
    assert s["written"] == 2 and s["train"] == ["synth_train_0000"] and s["val"] == ["synth_val_0000"]
    for split in ("train", "val"):
        (path,) = list_scenes(tmp_path, split)
        sc = load_scene(path, num_classes=20, need_labels=True)
        assert sc.normal is not None and sc.instance is not None
        assert (path / "segment20_clean.npy").is_file()
        fs = open_frames(path / "frames", strict=True)
        assert len(fs.ids) == 2
        np.testing.assert_allclose(fs.K_color, fs.K_depth)
        fr = fs.load(fs.ids[0])
        assert fr.color.shape == (30, 40, 3) and fr.depth.shape == (30, 40) and (fr.depth > 0).all()
    again = write_dataset(tmp_path, num_train=1, num_val=1, seed=5, progress=False, **kw)
    assert again["written"] == 0 and again["skipped"] == 2
    with pytest.raises(HaskdError):
        write_dataset(tmp_path, num_train=1, num_val=1, seed=6, progress=False, **kw)
    # a held-out test split added later: the train and val rooms stay as they were, the test room is a new one
    before = {sp: (list_scenes(tmp_path, sp)[0] / "coord.npy").read_bytes() for sp in ("train", "val")}
    t = write_dataset(tmp_path, num_train=1, num_val=1, num_test=1, seed=5, progress=False, overwrite=True, **kw)
    assert t["test"] == ["synth_test_0000"] and t["written"] == 3
    for sp in ("train", "val"):
        assert (list_scenes(tmp_path, sp)[0] / "coord.npy").read_bytes() == before[sp]
    (test_room,) = list_scenes(tmp_path, "test")
    assert (test_room / "coord.npy").read_bytes() != before["val"]
    # the generator version is part of the settings: a version-1 root is not silently extended with version 2
    with pytest.raises(HaskdError, match="other settings"):
        write_dataset(tmp_path, num_train=1, num_val=1, seed=5, progress=False, version=2, **kw)
    with pytest.raises(HaskdError, match="version 9"):
        write_dataset(tmp_path / "v9", num_train=1, progress=False, version=9, **kw)


def test_cli_synthetic(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    prepare_cmd.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["prepare", "synthetic", "--out", str(tmp_path), "--train", "1", "--val", "0",
                              "--points-per-m2", "50", "--frames", "1", "--image-size", "24", "32", "--no-progress"])
    assert args.func(args) == 0
    assert "train 1" in capsys.readouterr().out
    assert len(list_scenes(tmp_path, "train")) == 1
