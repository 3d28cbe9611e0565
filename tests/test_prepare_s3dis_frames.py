"""`haskd prepare s3dis --frames`: 2D-3D-S frames into a room's frames/, on fixtures in the documented 2D-3D-S
format rendered from the real (partial) S3DIS room Area_1/conferenceRoom_1 with known poses.

No real 2D-3D-S file exists here: the format (file names, 1/512 m depth with 65535 missing, pose JSON with a 3x3
camera_k_matrix and a 3x4 world-to-camera camera_rt_matrix) follows the dataset's README and public loaders."""
import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from haskd.data.frames import open_frames
from haskd.data.scene import load_scene
from haskd.images.lifting import lift
from haskd.prepare import s3dis
from haskd.prepare.frames_2d3ds import DEPTH_MISSING, MIN_REGISTERED, read_pose_json
from haskd.prepare.manifest import MANIFEST_NAME

PARTIAL = "s3dis_area1_conferenceRoom1_partial/Area_1/conferenceRoom_1/Annotations"
EVERY = 4                        # every 4th line of the real files: ~63k points
ROOM = "conferenceRoom_1"
CAMS = ("0d600f92f8d14e288ddc590c32584a5a", "a3b1c2d4e5f60718293a4b5c6d7e8f90")
HW = (160, 160)


def _name(cam, room, n, kind):
    ext = "json" if kind == "pose" else "png"
    return f"camera_{cam}_{room}_frame_{n}_domain_{kind}.{ext}"


def _write_2d3ds(area_dir, cam, room, n, color, depth_m, pose, K, fov):
    """One frame in the 2D-3D-S layout: rgb PNG, depth PNG (uint16, 1/512 m, 65535 = missing), pose JSON."""
    from PIL import Image

    data = area_dir / "data"
    for k in ("rgb", "depth", "pose"):
        (data / k).mkdir(parents=True, exist_ok=True)
    Image.fromarray(color).save(data / "rgb" / _name(cam, room, n, "rgb"))
    raw = np.where(depth_m > 0, np.rint(depth_m * 512.0), DEPTH_MISSING).astype(np.uint16)
    Image.fromarray(raw).save(data / "depth" / _name(cam, room, n, "depth"))
    R, t = pose[:3, :3], pose[:3, 3]
    rt = np.concatenate([R.T, (-R.T @ t)[:, None]], 1)        # world -> camera, OpenCV axes
    meta = {"camera_k_matrix": K.tolist(), "camera_rt_matrix": rt.tolist(), "camera_location": t.tolist(),
            "field_of_view_rads": float(np.radians(fov)), "frame_num": n, "camera_uuid": cam, "point_uuid": cam,
            "room": f"{room}_1"}
    (data / "pose" / _name(cam, room, n, "pose")).write_text(json.dumps(meta))
    return raw


def _rotz(deg):
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


@pytest.fixture(scope="module")
def fixture(shared_data, tmp_path_factory):
    """raw/Area_1/conferenceRoom_1 (the real room, every 4th point) + Area_1_alignmentAngle.txt; 2d3ds/area_1 with
    2 cameras x 3 frames (the second camera with another field of view, so another K), a frame without pose and a
    frame of conferenceRoom_10 (neither may be used). Also raw_turned/: the same room turned by 90 degrees (as the
    Aligned_Version is, relative to the 2D-3D-S poses)."""
    from haskd.images.views import render_views

    base = tmp_path_factory.mktemp("s3dis_2d3ds")
    raw = base / "raw"
    ann = raw / "Area_1" / ROOM / "Annotations"
    ann.mkdir(parents=True)
    rows = []
    for p in sorted((shared_data / PARTIAL).glob("*.txt")):
        lines = p.read_text().splitlines()[::EVERY]
        (ann / p.name).write_text("\n".join(lines) + "\n")
        rows.append(np.loadtxt(ann / p.name))
    (raw / "Area_1" / "Area_1_alignmentAngle.txt").write_text(
        "## Global alignment angle per disjoint space in Area_1 ##\n## Disjoint Space Name Global Alignment Angle ##\n"
        f"{ROOM} 90\n")
    pts = np.concatenate(rows)
    coord, color = pts[:, :3], pts[:, 3:].astype(np.uint8)
    area = base / "2d3ds" / "area_1"
    frames = {}
    for cam, fov, seed in ((CAMS[0], 70.0, 0), (CAMS[1], 55.0, 1)):
        for n, (c, d, pose, K) in enumerate(render_views(coord, color, num_views=3, image_size=HW, fov_deg=fov,
                                                         seed=seed)):
            raw_d = _write_2d3ds(area, cam, ROOM, n, c, d, pose, K, fov)
            frames[(cam, n)] = dict(color=c, raw=raw_d, pose=pose, K=K)
    c, d, pose, K = render_views(coord, color, num_views=1, image_size=HW, seed=5)[0]
    _write_2d3ds(area, CAMS[0], "conferenceRoom_10", 0, c, d, pose, K, 70.0)      # another room
    _write_2d3ds(area, CAMS[0], ROOM, 7, c, d, pose, K, 70.0)
    (area / "data" / "pose" / _name(CAMS[0], ROOM, 7, "pose")).unlink()            # a frame without pose
    turned = base / "raw_turned" / "Area_1" / ROOM / "Annotations"
    turned.mkdir(parents=True)
    centre = (coord.min(0) + coord.max(0)) / 2
    for p in sorted(ann.glob("*.txt")):
        a = np.loadtxt(p)
        a[:, :3] = (a[:, :3] - centre) @ _rotz(90).T + centre
        np.savetxt(turned / p.name, a, fmt="%.6f %.6f %.6f %d %d %d")
    return {"raw": raw, "frames_root": base / "2d3ds", "frames": frames, "coord": coord, "color": color,
            "turned": base / "raw_turned"}


def _run(raw, out, *extra):
    p = s3dis.configure_parser(argparse.ArgumentParser())
    return s3dis.run(p.parse_args(["--raw", str(raw), "--out", str(out), "--workers", "1", *extra]))


def test_frames_round_trip(fixture, tmp_path):
    out = tmp_path / "out"
    assert _run(fixture["raw"], out, "--frames", str(fixture["frames_root"]), "--frames-every", "1",
                "--image-size", "native") == 0
    scene = out / "train" / f"Area_1_{ROOM}"
    fs = open_frames(scene / "frames", strict=True)
    want = sorted(f"{cam}_{n:04d}" for cam, n in fixture["frames"])
    assert fs.ids == want                          # nothing of conferenceRoom_10, nothing without a pose
    K0 = fixture["frames"][(CAMS[0], 0)]["K"]
    np.testing.assert_allclose(fs.K_depth, K0, atol=1e-6)
    np.testing.assert_allclose(fs.K_color, K0, atol=1e-6)
    from PIL import Image
    from scipy.spatial import cKDTree

    tree = cKDTree(fixture["coord"])
    for (cam, n), f in fixture["frames"].items():
        fid = f"{cam}_{n:04d}"
        json_pose = read_pose_json(fixture["frames_root"] / "area_1" / "data" / "pose" / _name(cam, ROOM, n, "pose"))[1]
        np.testing.assert_array_equal(fs.pose(fid), json_pose)          # bit for bit through the text file
        np.testing.assert_allclose(fs.pose(fid), f["pose"], atol=1e-9)   # = the camera that rendered the view
        mm = np.asarray(Image.open(fs.root / "depth" / f"{fid}.png")).astype(np.int64)
        col = np.asarray(Image.open(fs.root / "color" / f"{fid}.jpg").convert("RGB")).astype(float)
        if cam == CAMS[0]:                          # the room's K: depth exact in 1/512 m steps, colour JPEG q95
            np.testing.assert_array_equal(np.where(mm > 0, np.rint(mm * 512 / 1000.0), DEPTH_MISSING), f["raw"])
            assert np.abs(col - f["color"]).mean() < 3.0
        else:                                       # another K: remapped onto the room's K, depth values kept
            assert mm.shape == f["raw"].shape
        # every valid depth pixel, back-projected with the room's K and the frame's pose, lands on a room point
        v, u = np.nonzero(mm > 0)
        if cam == CAMS[0] and n == 1:
            assert len(v) == 0 and (f["raw"] == DEPTH_MISSING).all()   # this view of the partial room sees nothing
            continue
        z = mm[v, u] / 1000.0
        cam_pts = np.stack([(u - K0[0, 2]) * z / K0[0, 0], (v - K0[1, 2]) * z / K0[1, 1], z], 1)
        world = cam_pts @ fs.pose(fid)[:3, :3].T + fs.pose(fid)[:3, 3]
        dist = tree.query(world)[0]
        other = fs.pose(fs.ids[(fs.ids.index(fid) + 2) % len(fs.ids)])          # a wrong pose, for scale
        wrong = tree.query(cam_pts @ other[:3, :3].T + other[:3, 3])[0]
        # (splatted renders: a pixel holds the depth of a point whose footprint covers it, a few cm off its ray)
        print(fid, len(v), np.median(dist), np.percentile(dist, 95), np.median(wrong))
        assert len(v) > 200 and np.median(dist) < 0.03 and np.percentile(dist, 95) < 0.08, fid
        assert np.median(dist) < 0.2 * np.median(wrong), fid
    info = json.loads((out / MANIFEST_NAME).read_text())["scenes"][f"Area_1_{ROOM}"]["info"]["frames"]
    assert info["written"] == 6 and info["resampled"] == 3 and info["skipped"] == {"no pose": 1}
    assert info["registered"] > 0.4


def _reprojection(scene_dir, shuffle=False):
    """(visible points, mean |point colour - image colour|) over every frame, lifting the image colours onto the
    points; ``shuffle`` gives every image the pose of another frame."""
    s = load_scene(scene_dir)
    fs = open_frames(scene_dir / "frames", strict=True)
    frs = [fs.load(f) for f in fs.ids]
    poses = np.stack([f.pose for f in frs])
    if shuffle:
        poses = np.roll(poses, 1, axis=0)
    img = torch.from_numpy(np.stack([f.color for f in frs])).permute(0, 3, 1, 2).float()
    out = lift(s.coord.astype(np.float64), img, poses, fs.K_color, img.shape[-2:], np.stack([f.depth for f in frs]),
               fs.K_depth, tau=0.05)
    vis = out["visible"].numpy()
    err = np.abs(out["feat"][vis].numpy() - s.color[vis]).mean() if vis.any() else float("inf")
    return int(vis.sum()), float(err)


@pytest.mark.parametrize("align", [False, True])
def test_reprojected_colours_match_real_poses_not_shuffled(fixture, tmp_path, align):
    """Default 320x240 colour (non-uniform scaling of the square images) with and without Pointcept's alignment."""
    out = tmp_path / "out"
    extra = ["--align-angle"] if align else []
    assert _run(fixture["raw"], out, "--frames", str(fixture["frames_root"]), "--frames-every", "1", *extra) == 0
    scene = out / "train" / f"Area_1_{ROOM}"
    coord = load_scene(scene).coord
    if align:   # turned by -90 degrees about the box centre, as Pointcept's --align_angle
        c = (fixture["coord"].min(0) + fixture["coord"].max(0)) / 2
        np.testing.assert_allclose(coord, (fixture["coord"] - c) @ _rotz(-90).T + c, atol=1e-4)
    vis, err = _reprojection(scene)
    vis_s, err_s = _reprojection(scene, shuffle=True)
    print(f"align={align}: real poses {vis} visible points, colour error {err:.1f}; shuffled {vis_s}, {err_s:.1f}")
    assert vis > 0.3 * len(coord) and err < 12.0
    assert vis_s < 0.25 * vis and (vis_s < 100 or err_s > 2 * err)


def test_points_turned_against_the_frames_drop_them(fixture, tmp_path, caplog):
    """The Aligned_Version's rooms are turned relative to 2D-3D-S's poses: the check refuses the frames."""
    out = tmp_path / "out"
    assert _run(fixture["turned"], out, "--frames", str(fixture["frames_root"]), "--frames-every", "2") == 0
    scene = out / "train" / f"Area_1_{ROOM}"
    assert scene.is_dir() and not (scene / "frames").exists()
    info = json.loads((out / MANIFEST_NAME).read_text())["scenes"][f"Area_1_{ROOM}"]["info"]["frames"]
    print("turned: registered", info["registered"])
    assert info["dropped"] and info["registered"] < MIN_REGISTERED
    assert any("frames dropped" in r.getMessage() and "Aligned_Version" in r.getMessage() for r in caplog.records)


def test_bad_pose_json_fails_the_room(fixture, tmp_path):
    root = tmp_path / "2d3ds"
    shutil.copytree(fixture["frames_root"], root)
    (root / "area_1" / "data" / "pose" / _name(CAMS[0], ROOM, 1, "pose")).write_text('{"camera_k_matrix": [[1]]}')
    out = tmp_path / "out"
    assert _run(fixture["raw"], out, "--frames", str(root), "--frames-every", "1") == 1
    assert not (out / "train" / f"Area_1_{ROOM}").exists()
