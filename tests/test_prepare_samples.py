"""Importers of the real samples (shared/data): counts, splits, label ranges, arrays equal to the sources."""
import argparse
import json

import numpy as np
import pytest

from haskd.classes import nyu40_to_scannet20
from haskd.commands import prepare as prepare_cmd
from haskd.data.frames import open_frames, scale_intrinsic
from haskd.data.scene import list_scenes, load_scene
from haskd.prepare.samples import prepare_samples

TRAIN = ["scene0000_00", "scene0000_01", "scene0000_02", "scene0001_00", "scene0001_01", "scene0002_00",
         "scene0002_01", "scene0003_00", "scene0003_01", "scene0003_02", "scene0004_00", "scene0005_00",
         "scene0005_01"]
VAL = ["scene0006_00", "scene0006_01", "scene0006_02", "scene0007_00", "scene0008_00"]


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    return shared_data, out, prepare_samples(shared_data, out, progress=False)


def test_counts_and_splits(prepared):
    src, out, s = prepared
    assert s["scannet"] == {"train": TRAIN, "val": VAL, "frames_only": ["scene0113_00", "scene0448_01"]}
    assert s["s3dis"] == {"train": ["AreaX_office_resampled_nocolor", "Area_1_conferenceRoom_1", "Area_1_office_2"]}
    assert s["written"] == 23 and s["skipped"] == 0
    assert [p.name for p in list_scenes(out / "scannet", "train")] == TRAIN
    assert [p.name for p in list_scenes(out / "scannet", "val")] == VAL
    assert s["sources"]["scannet/train/scene0000_00"] == "scannet_rgbd_ai360/scene0000_00"
    assert s["sources"]["scannet/train/scene0000_01"] == "scannet_mmdet3d_testdata/scene0000_01"
    assert s["sources"]["scannet/val/scene0007_00"] == "scannet_votenet_50k_picwoon/scene0007_00"


def test_label_ranges(prepared):
    _, out, _ = prepared
    for split in ("train", "val"):
        for path in list_scenes(out / "scannet", split):
            sc = load_scene(path, num_classes=20, need_labels=True)
            assert (path / "segment20.npy").is_file() and sc.segment.min() >= -1
    for path in list_scenes(out / "scannet", "frames_only"):
        sc = load_scene(path)
        assert sc.segment is None and sc.frames_dir is not None
    for path in list_scenes(out / "s3dis", "train"):
        sc = load_scene(path, num_classes=13, need_labels=True)
        assert (path / "segment.npy").is_file() and sc.segment.min() >= 0


def test_votenet_and_mmdet3d_equal_sources(prepared):
    src, out, _ = prepared
    v = np.load(src / "scannet_votenet_50k_picwoon" / "scene0007_00_vert.npy")
    sc = load_scene(out / "scannet" / "val" / "scene0007_00")
    np.testing.assert_array_equal(sc.coord, v[:, :3])
    np.testing.assert_array_equal(sc.color, v[:, 3:6].astype(np.uint8))
    nyu = np.load(src / "scannet_votenet_50k_picwoon" / "scene0007_00_sem_label.npy")
    np.testing.assert_array_equal(sc.segment, nyu40_to_scannet20(nyu))
    np.testing.assert_array_equal(np.load(out / "scannet" / "val" / "scene0007_00" / "segment_nyu40.npy"), nyu)
    ins = np.load(src / "scannet_votenet_50k_picwoon" / "scene0007_00_ins_label.npy")
    np.testing.assert_array_equal(sc.instance, ins)

    d = src / "scannet_mmdet3d_testdata" / "scene0000_02"
    v = np.load(d / "scene0000_02_vert_all.npy")
    sc = load_scene(out / "scannet" / "train" / "scene0000_02")
    assert sc.num_points == 86001
    np.testing.assert_array_equal(sc.coord, v[:, :3])
    np.testing.assert_array_equal(sc.segment, nyu40_to_scannet20(np.load(d / "scene0000_02_sem_label_all.npy")))


def test_ai360_scene_aligned_with_frames(prepared):
    src, out, _ = prepared
    path = out / "scannet" / "train" / "scene0000_00"
    sc = load_scene(path)
    # aligned points = the mmdet3d full-resolution arrays of the same scene (README: 1.2e-7 m)
    mm = np.load(src / "scannet_mmdet3d_testdata" / "scene0000_00" / "scene0000_00_vert_all.npy")
    np.testing.assert_allclose(sc.coord, mm[:, :3], atol=1e-5)
    np.testing.assert_array_equal(sc.color, mm[:, 3:6].astype(np.uint8))
    ai = src / "scannet_rgbd_ai360" / "scene0000_00"
    np.testing.assert_array_equal(sc.segment, nyu40_to_scannet20(np.load(ai / "scene0000_00_sem_label_nyu40.npy")))
    A = np.asarray(json.loads((ai / "meta.json").read_text())["axis_align_matrix"])
    np.testing.assert_allclose(np.load(path / "axis_align_matrix.npy"), A)

    fs = open_frames(path / "frames", strict=True)
    assert len(fs.ids) == 100
    np.testing.assert_allclose(fs.K_depth, scale_intrinsic(fs.K_color, 640 / 1296, 480 / 968), atol=1e-3)
    np.testing.assert_allclose(fs.pose("00150"), A @ np.loadtxt(ai / "pose" / "00150.txt"), atol=1e-6)
    # the aligned pose still sees the aligned points where the depth map says (README check: 24-67 % per frame)
    fr = fs.load("00150", color=False)
    T = np.linalg.inv(fr.pose)
    cam = sc.coord.astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    z = np.maximum(cam[:, 2], 1e-6)
    u = np.round(fs.K_depth[0, 0] * cam[:, 0] / z + fs.K_depth[0, 2]).astype(int)
    v = np.round(fs.K_depth[1, 1] * cam[:, 1] / z + fs.K_depth[1, 2]).astype(int)
    ok = (cam[:, 2] > 0.1) & (u >= 0) & (u < 640) & (v >= 0) & (v < 480)
    d = fr.depth[v[ok], u[ok]]
    assert ok.sum() > 1000
    assert ((d > 0) & (np.abs(d - cam[ok, 2]) < 0.05)).mean() > 0.2
    # images are copied byte for byte
    assert (path / "frames" / "color" / "00150.jpg").read_bytes() == (ai / "color" / "00150.jpg").read_bytes()


def test_s3dis_equal_sources(prepared):
    src, out, _ = prepared
    d = src / "s3dis_mmdet3d_testdata"
    pts = np.fromfile(d / "Area_1_office_2_points.bin", dtype=np.float32).reshape(-1, 6)
    sc = load_scene(out / "s3dis" / "train" / "Area_1_office_2")
    np.testing.assert_array_equal(sc.coord, pts[:, :3])
    np.testing.assert_array_equal(sc.segment, np.fromfile(d / "Area_1_office_2_semantic_mask.bin", dtype=np.int64))
    room = load_scene(out / "s3dis" / "train" / "Area_1_conferenceRoom_1")
    assert room.num_points == 251921
    assert sorted(np.unique(room.segment).tolist()) == [2, 3, 6, 8, 11, 12]   # wall beam door chair board clutter
    assert (room.segment == 3).sum() == 61528
    wdc = load_scene(out / "s3dis" / "train" / "AreaX_office_resampled_nocolor")
    np.testing.assert_array_equal(wdc.coord, np.load(src / "s3dis_room_instance_resampled_wdc" / "coord.npy"))


def test_rerun_skips_and_cli(prepared, capsys):
    src, out, _ = prepared
    before = (out / "scannet" / "train" / "scene0001_00" / "coord.npy").stat().st_mtime_ns
    parser = argparse.ArgumentParser()
    prepare_cmd.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["prepare", "samples", "--src", str(src), "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    msg = capsys.readouterr().out
    assert "train 13, val 5, frames_only 2" in msg and "written 0" in msg
    assert (out / "scannet" / "train" / "scene0001_00" / "coord.npy").stat().st_mtime_ns == before


def test_missing_src_is_input_error(tmp_path):
    from haskd.errors import InputError

    with pytest.raises(InputError):
        prepare_samples(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        prepare_samples(tmp_path / "empty", tmp_path / "out", progress=False)


def test_unavailable_external_importer(capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    prepare_cmd._external(sub, "no_such_importer", "nosuch", "help")
    args = parser.parse_args(["nosuch", "--raw", "x", "-h"])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "haskd.prepare.no_such_importer" in err


def test_scannet_and_s3dis_subcommands_wired():
    parser = argparse.ArgumentParser()
    prepare_cmd.register(parser.add_subparsers(dest="cmd"))
    for cmd in ("scannet", "s3dis"):
        args = parser.parse_args(["prepare", cmd, "--raw", "r", "--out", "o"])
        assert callable(args.func)
