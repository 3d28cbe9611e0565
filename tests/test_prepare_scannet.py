"""ScanNetV2 importer and .sens reader/writer, on official-layout fixtures built from the real ScanNet samples."""
import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from haskd.classes import SCANNET200_CATEGORY_IDS, nyu40_to_scannet20
from haskd.data.frames import open_frames
from haskd.data.scene import load_scene
from haskd.errors import HaskdError, InputError
from haskd.prepare import scannet
from haskd.prepare.manifest import MANIFEST_NAME, folder_checksums
from haskd.prepare.sens import SensHeader, SensReader, write_sens

AI360 = "scannet_rgbd_ai360/scene0000_00"
FRAME_IDS = ("00000", "00003", "00006", "00009", "00012")
INF_FRAME = 2          # this frame gets a -inf pose, as ScanNet has
STEP = 20              # keep every 20th vertex: ~4k vertices per scene


# ---------------------------------------------------------------- fixture builders
def _write_mesh(path, coord, color, faces, label=None):
    from plyfile import PlyData, PlyElement

    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
              ("alpha", "u1")]
    if label is not None:
        fields.append(("label", "<u2"))
    v = np.empty(coord.shape[0], dtype=fields)
    v["x"], v["y"], v["z"] = coord.T
    v["red"], v["green"], v["blue"] = color.T
    v["alpha"] = 255
    if label is not None:
        v["label"] = label
    f = np.empty(faces.shape[0], dtype=[("vertex_indices", "<i4", (3,))])
    f["vertex_indices"] = faces
    PlyData([PlyElement.describe(v, "vertex"),
             PlyElement.describe(f, "face", len_types={"vertex_indices": "u1"},
                                 val_types={"vertex_indices": "i4"})], text=False, byte_order="<").write(str(path))


def _triangulate(coord):
    from scipy.spatial import Delaunay

    return Delaunay(coord[:, :2].astype(np.float64)).simplices.astype(np.int64)


def _write_scene(d: Path, name, coord, color, nyu=None, ins=None, align=np.eye(4), labeled=True):
    d.mkdir(parents=True)
    faces = _triangulate(coord)
    _write_mesh(d / f"{name}_vh_clean_2.ply", coord, color, faces)
    (d / f"{name}.txt").write_text("axisAlignment = " + " ".join(f"{x:.6f}" for x in align.reshape(-1))
                                   + "\nsceneType = Test\n")
    if not labeled:
        return
    _write_mesh(d / f"{name}_vh_clean_2.labels.ply", coord, color, faces, label=nyu)
    # Over-segmentation: a few segments per instance, arbitrary large ids as in ScanNet.
    idx = np.arange(coord.shape[0])
    seg = np.where(ins > 0, ins.astype(np.int64) * 10 + idx % 4, 100000 + idx // 50)
    (d / f"{name}_vh_clean_2.0.010000.segs.json").write_text(json.dumps({"sceneId": name, "segIndices": seg.tolist()}))
    groups = []
    for k in np.unique(ins[ins > 0]):
        m = ins == k
        cat = f"cat{np.bincount(nyu[m]).argmax()}"
        groups.append({"id": int(k) - 1, "objectId": int(k) - 1, "segments": sorted(set(seg[m].tolist())),
                       "label": cat})
    (d / f"{name}.aggregation.json").write_text(json.dumps({"sceneId": name, "segGroups": groups}))


def _sens_frames(src: Path):
    from PIL import Image

    out = []
    for i, fid in enumerate(FRAME_IDS):
        pose = np.loadtxt(src / "pose" / f"{fid}.txt").astype(np.float32)
        if i == INF_FRAME:
            pose[:] = -np.inf
        out.append({"pose": pose, "color_bytes": (src / "color" / f"{fid}.jpg").read_bytes(),
                    "depth": np.asarray(Image.open(src / "depth" / f"{fid}.png"), dtype=np.uint16),
                    "timestamp_color": 1000 * i, "timestamp_depth": 1000 * i + 7})
    return out


def _sens_header(src: Path):
    Kc = np.loadtxt(src / "intrinsic" / "intrinsic_color.txt").astype(np.float32)
    Kd = np.loadtxt(src / "intrinsic" / "intrinsic_depth_scaled_from_color.txt").astype(np.float32)
    return SensHeader("StructureSensor", Kc, np.eye(4, dtype=np.float32), Kd, np.eye(4, dtype=np.float32),
                      "jpeg", "zlib_ushort", 1296, 968, 640, 480, 1000.0, 0)


def _tsv(path, nyu_ids):
    lines = ["id\traw_category\tcategory\tcount\tnyu40id"]
    # even NYU40 ids get a ScanNet-200 category (the n-th), odd ones a category outside the 200
    ids = [SCANNET200_CATEGORY_IDS[int(n)] if n % 2 == 0 else 2000 + int(n) for n in nyu_ids]
    lines += [f"{i}\tcat{int(n)}\tcat{int(n)}\t1\t{int(n)}" for i, n in zip(ids, nyu_ids)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def raw_src(shared_data, tmp_path_factory):
    """A pristine official-layout root: scans/scene0000_00 (with .sens), scans/scene0000_01,
    scans_test/scene0000_02 (mesh only). Returns (root, expected arrays per scene)."""
    root = tmp_path_factory.mktemp("scannet_raw")
    src = shared_data / AI360
    pts = np.fromfile(src / "scene0000_00_points_xyzrgb.bin", dtype=np.float32).reshape(-1, 6)[::STEP]
    nyu = np.load(src / "scene0000_00_sem_label_nyu40.npy")[::STEP].astype(np.int64)
    ins = np.load(src / "scene0000_00_ins_label.npy")[::STEP].astype(np.int64)
    align = np.array(json.loads((src / "meta.json").read_text())["axis_align_matrix"])
    expect = {"scene0000_00": dict(coord=pts[:, :3].copy(), color=pts[:, 3:].astype(np.uint8), nyu=nyu, ins=ins,
                                   align=align)}
    _write_scene(root / "scans" / "scene0000_00", "scene0000_00", expect["scene0000_00"]["coord"],
                 expect["scene0000_00"]["color"], nyu, ins, align)
    write_sens(root / "scans" / "scene0000_00" / "scene0000_00.sens", _sens_header(src), _sens_frames(src))
    mm = shared_data / "scannet_mmdet3d_testdata"
    for name, labeled, sub in (("scene0000_01", True, "scans"), ("scene0000_02", False, "scans_test")):
        v = np.load(mm / name / f"{name}_vert_all.npy")[::STEP * 2]
        e = dict(coord=v[:, :3].astype(np.float32), color=v[:, 3:].astype(np.uint8))
        if labeled:
            e["nyu"] = np.load(mm / name / f"{name}_sem_label_all.npy")[::STEP * 2].astype(np.int64)
            e["ins"] = np.load(mm / name / f"{name}_ins_label_all.npy")[::STEP * 2].astype(np.int64)
        _write_scene(root / sub / name, name, e["coord"], e["color"], e.get("nyu"), e.get("ins"), labeled=labeled)
        expect[name] = e
    all_nyu = np.unique(np.concatenate([expect[n]["nyu"] for n in ("scene0000_00", "scene0000_01")]))
    _tsv(root / "labels.tsv", all_nyu)
    return root, expect


@pytest.fixture
def raw(raw_src, tmp_path):
    """A private copy of the raw root that a test may break."""
    root, expect = raw_src
    dst = tmp_path / "raw"
    shutil.copytree(root, dst)
    return dst, expect


def _args(raw_root, out, *extra):
    p = scannet.configure_parser(argparse.ArgumentParser())
    return p.parse_args(["--raw", str(raw_root), "--out", str(out), "--workers", "1", *extra])


def _tree(root: Path) -> dict:
    return {k: v for k, v in folder_checksums(root).items() if k != MANIFEST_NAME}


# ---------------------------------------------------------------- .sens
def test_sens_roundtrip_is_bit_exact(shared_data, tmp_path):
    src = shared_data / AI360
    frames = _sens_frames(src)
    path = write_sens(tmp_path / "x.sens", _sens_header(src), frames)
    with SensReader(path) as r:
        h = r.header
        assert (h.version, h.sensor_name, h.num_frames) == (4, "StructureSensor", len(FRAME_IDS))
        assert (h.color_width, h.color_height, h.depth_width, h.depth_height) == (1296, 968, 640, 480)
        assert (h.color_compression, h.depth_compression, h.depth_shift) == ("jpeg", "zlib_ushort", 1000.0)
        np.testing.assert_array_equal(h.intrinsic_color, _sens_header(src).intrinsic_color)
        got = list(r.frames())
        for g, e in zip(got, frames):
            assert g.pose.tobytes() == e["pose"].tobytes()
            assert g.color_bytes == e["color_bytes"]
            assert (g.timestamp_color, g.timestamp_depth) == (e["timestamp_color"], e["timestamp_depth"])
            np.testing.assert_array_equal(r.decode_depth(g), e["depth"])
        assert [f.pose_ok for f in got] == [i != INF_FRAME for i in range(len(FRAME_IDS))]
        assert [f.index for f in r.frames(every=2, color=False)] == [0, 2, 4]
        assert r.decode_color(got[0]).shape == (968, 1296, 3)


def test_sens_corrupt_files_raise_one_line(shared_data, tmp_path):
    src = shared_data / AI360
    good = write_sens(tmp_path / "good.sens", _sens_header(src), _sens_frames(src)[:2])
    data = good.read_bytes()
    cut = tmp_path / "cut.sens"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(InputError, match=r"cut\.sens: truncated \.sens: frame 1"):
        with SensReader(cut) as r:
            list(r.frames())
    bad = tmp_path / "v3.sens"
    bad.write_bytes(b"\x03\x00\x00\x00" + data[4:])
    with pytest.raises(InputError, match=r"v3\.sens: not a \.sens v4"):
        SensReader(bad)
    tiny = tmp_path / "tiny.sens"
    tiny.write_bytes(data[:100])
    with pytest.raises(InputError, match="truncated"):
        SensReader(tiny)
    with SensReader(good) as r:
        f = next(r.frames())
        f.depth_bytes = f.depth_bytes[:-50]
        with pytest.raises(InputError, match="corrupt depth in frame 0"):
            r.decode_depth(f)


# ---------------------------------------------------------------- end to end
def test_prepare_reproduces_source_exactly(raw, tmp_path, shared_data):
    root, expect = raw
    out = tmp_path / "out"
    rc = scannet.run(_args(root, out, "--frames-every", "2", "--image-size", "native",
                           "--labels-tsv", str(root / "labels.tsv")))
    assert rc == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == ["scene0000_00", "scene0000_01"]
    assert [p.name for p in (out / "test").iterdir()] == ["scene0000_02"]
    tsv = scannet.read_labels_tsv(root / "labels.tsv")
    for name, e in expect.items():
        split = "test" if name == "scene0000_02" else "train"
        s = load_scene(out / split / name)
        np.testing.assert_array_equal(s.coord, e["coord"])
        np.testing.assert_array_equal(s.color, e["color"])
        assert s.normal.shape == s.coord.shape
        if "nyu" not in e:
            assert s.segment is None and s.instance is None
            continue
        np.testing.assert_array_equal(s.segment, nyu40_to_scannet20(e["nyu"]))
        np.testing.assert_array_equal(s.instance, e["ins"] - 1)       # objectId, -1 = no object
        seg200 = np.load(out / split / name / "segment200.npy")
        category = np.load(out / split / name / "segment_category.npy")
        want, want200 = np.full(e["ins"].shape, -1), np.full(e["ins"].shape, -1)
        for k in np.unique(e["ins"][e["ins"] > 0]):
            m = e["ins"] == k
            n = np.bincount(e['nyu'][m]).argmax()
            want[m] = tsv[f"cat{n}"]
            want200[m] = n if n % 2 == 0 else -1      # Pointcept's meaning: index among the 200, else ignore
        np.testing.assert_array_equal(category, want)
        np.testing.assert_array_equal(seg200, want200)
        assert (seg200 >= 0).any() and (seg200 == -1).any()

    # frames: every 2nd of 5 -> 0, 2, 4; frame 2 has a -inf pose -> skipped, never written
    fs = open_frames(out / "train" / "scene0000_00" / "frames", strict=True)
    assert fs.ids == ["000000", "000004"] and not fs.skipped
    src = shared_data / AI360
    sens_frames = _sens_frames(src)
    from PIL import Image

    for fid, k in zip(fs.ids, (0, 4)):
        d = fs.root
        assert (d / "color" / f"{fid}.jpg").read_bytes() == sens_frames[k]["color_bytes"]
        np.testing.assert_array_equal(np.asarray(Image.open(d / "depth" / f"{fid}.png")), sens_frames[k]["depth"])
        assert fs.pose(fid).astype(np.float32).tobytes() == sens_frames[k]["pose"].tobytes()
    np.testing.assert_allclose(fs.K_color, _sens_header(src).intrinsic_color[:3, :3], atol=1e-5)
    entry = json.loads((out / MANIFEST_NAME).read_text())["scenes"]["scene0000_00"]
    assert entry["info"]["frames"]["written"] == 2 and entry["info"]["frames"]["skipped_pose"] == 1
    assert entry["num_points"] == expect["scene0000_00"]["coord"].shape[0]
    assert not (out / "train" / "scene0000_01" / "frames").exists()


def test_vertex_normals_are_area_weighted():
    # Two triangles sharing vertex 0: one in z=0 (area 2), one in x=0 (area 0.5).
    v = np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float32)
    f = np.array([[0, 1, 2], [0, 3, 4]])
    n = scannet.vertex_normals(v, f)
    want0 = np.array([0, 0, 4.0]) + np.array([1.0, 0, 0])   # cross products = 2 * area * unit normal
    np.testing.assert_allclose(n[0], want0 / np.linalg.norm(want0), rtol=1e-6)
    np.testing.assert_allclose(n[1], [0, 0, 1], atol=1e-7)
    np.testing.assert_allclose(n[3], [1, 0, 0], atol=1e-7)
    iso = scannet.vertex_normals(np.zeros((1, 3), np.float32), np.zeros((0, 3), np.int64))
    np.testing.assert_array_equal(iso, 0)


def test_resized_frames_axis_align_and_parallel_workers(raw, tmp_path, shared_data):
    root, expect = raw
    out = tmp_path / "out"
    args = _args(root, out, "--frames-every", "4", "--axis-align")
    args.workers = 2
    assert scannet.run(args) == 0
    e = expect["scene0000_00"]
    s = load_scene(out / "train" / "scene0000_00")
    M = e["align"]
    np.testing.assert_allclose(s.coord, e["coord"] @ M[:3, :3].T + M[:3, 3], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(s.normal, axis=1), 1, atol=1e-5)
    fs = open_frames(out / "train" / "scene0000_00" / "frames", strict=True)
    assert fs.ids == ["000000", "000004"]
    from PIL import Image
    assert Image.open(fs.root / "color" / "000004.jpg").size == (320, 240)
    np.testing.assert_allclose(fs.K_color[0, 0], 1169.621094 * 320 / 1296, rtol=1e-5)
    np.testing.assert_allclose(fs.K_color[1, 2], 489.927032 * 240 / 968, rtol=1e-5)
    pose = _sens_frames(shared_data / AI360)[4]["pose"].astype(np.float64)
    np.testing.assert_allclose(fs.pose("000004"), M @ pose, atol=1e-6)


def test_interrupted_run_resumes_and_matches_clean_run(raw, tmp_path, monkeypatch):
    root, _ = raw
    clean = tmp_path / "clean"
    assert scannet.run(_args(root, clean, "--frames-every", "2")) == 0

    real = scannet.prepare_scene
    calls = []

    def dies_on_second_scene(name, params, out_dir):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt   # what Ctrl-C / a kill between two scenes looks like to the loop
        return real(name, params, out_dir)

    out = tmp_path / "out"
    monkeypatch.setattr(scannet, "prepare_scene", dies_on_second_scene)
    with pytest.raises(KeyboardInterrupt):
        scannet.run(_args(root, out, "--frames-every", "2"))
    assert list(json.loads((out / MANIFEST_NAME).read_text())["scenes"]) == ["scene0000_00"]
    # a write killed mid-way leaves only a hidden temp folder, which the rerun removes
    (out / "train" / ".scene0000_01.tmpjunk").mkdir(parents=True)

    calls.clear()
    monkeypatch.setattr(scannet, "prepare_scene", lambda *a: (calls.append(a[0]), real(*a))[1])
    summary = scannet.prepare_scannet(root, out, frames_every=2)
    assert summary.skipped == ["scene0000_00"] and calls == ["scene0000_01", "scene0000_02"]
    assert _tree(out) == _tree(clean)

    calls.clear()
    assert scannet.prepare_scannet(root, out, frames_every=2).skipped == ["scene0000_00", "scene0000_01",
                                                                          "scene0000_02"]
    assert calls == []
    # a damaged output is noticed by its checksum and redone; other options redo everything
    (out / "train" / "scene0000_01" / "color.npy").write_bytes(b"junk")
    assert scannet.prepare_scannet(root, out, frames_every=2).done == ["scene0000_01"]
    assert _tree(out) == _tree(clean)
    assert len(scannet.prepare_scannet(root, out, frames_every=3).done) == 3


# ---------------------------------------------------------------- bad input: one line naming the file
def _truncate(p: Path, keep=0.6):
    b = p.read_bytes()
    p.write_bytes(b[: int(len(b) * keep)])


def _nan_vertex(p: Path):
    from plyfile import PlyData

    ply = PlyData.read(str(p), mmap=False)
    ply["vertex"].data["x"][5] = np.nan
    ply.write(str(p))


def _labels_count(p: Path):
    from plyfile import PlyData, PlyElement

    ply = PlyData.read(str(p), mmap=False)
    v = ply["vertex"].data[:-3]
    PlyData([PlyElement.describe(v, "vertex")], text=False, byte_order="<").write(str(p))


def _unknown_class(p: Path):
    agg = json.loads(p.read_text())
    agg["segGroups"][0]["label"] = "hovercraft"
    p.write_text(json.dumps(agg))


S0 = "scans/scene0000_00/scene0000_00"
BAD_CASES = {
    "truncated mesh": (f"{S0}_vh_clean_2.ply", _truncate, r"_vh_clean_2\.ply: truncated or corrupt PLY"),
    "truncated sens": (f"{S0}.sens", _truncate, r"scene0000_00\.sens: truncated \.sens"),
    "labels count": (f"{S0}_vh_clean_2.labels.ply", _labels_count, r"labels\.ply: \d+ vertices, but the mesh has"),
    "missing segs": (f"{S0}_vh_clean_2.0.010000.segs.json", Path.unlink, r"segs\.json: missing file"),
    "missing mesh": (f"{S0}_vh_clean_2.ply", Path.unlink, r"_vh_clean_2\.ply: missing file"),
    "nan coords": (f"{S0}_vh_clean_2.ply", _nan_vertex, r"_vh_clean_2\.ply: 1 vertex\(es\) with NaN"),
    "unknown class": (f"{S0}.aggregation.json", _unknown_class, r"aggregation\.json: unknown class name 'hovercraft'"),
    "corrupt json": (f"{S0}.aggregation.json", lambda p: _truncate(p, 0.5), r"aggregation\.json: truncated or corrupt"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fails_that_scene_only(raw, tmp_path, capsys, case):
    root, _ = raw
    rel, breaker, pattern = BAD_CASES[case]
    breaker(root / rel)
    out = tmp_path / "out"
    rc = scannet.run(_args(root, out, "--frames-every", "2", "--labels-tsv", str(root / "labels.tsv")))
    assert rc == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "FAILED" in ln)
    assert line.startswith("  FAILED scene0000_00: ") and str(root) in line
    assert re.search(pattern, line), line
    assert "failed 1" in err
    assert (out / "train" / "scene0000_01" / "coord.npy").is_file()   # good scenes are kept
    assert (out / "test" / "scene0000_02" / "coord.npy").is_file()
    assert not (out / "train" / "scene0000_00").exists()
    assert not [p for p in (out / "train").iterdir() if p.name.startswith(".")]


def test_missing_raw_layout_is_one_clear_error(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(InputError, match="no scene folders under scans/"):
        scannet.run(_args(tmp_path / "raw", tmp_path / "out"))
    with pytest.raises(SystemExit):
        _args(tmp_path, tmp_path, "--image-size", "320by240")


def test_split_file_moves_scenes(raw, tmp_path):
    root, _ = raw
    (tmp_path / "val.txt").write_text("scene0000_01\n")
    out = tmp_path / "out"
    assert scannet.run(_args(root, out, "--frames-every", "0", "--split-file", f"val={tmp_path / 'val.txt'}")) == 0
    assert [p.name for p in (out / "val").iterdir()] == ["scene0000_01"]
    assert [p.name for p in (out / "train").iterdir()] == ["scene0000_00"]


def test_sigkill_halfway_then_rerun_equals_clean_run(raw, tmp_path):
    """A real kill (SIGKILL, no cleanup code runs) of `haskd prepare scannet` as soon as one scene is done."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, _ = raw
    clean = tmp_path / "clean"
    assert scannet.run(_args(root, clean, "--frames-every", "1")) == 0
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "haskd", "prepare", "scannet", "--raw", str(root), "--out", str(out),
           "--workers", "1", "--frames-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        m = out / MANIFEST_NAME
        try:
            done = json.loads(m.read_text())["scenes"] if m.is_file() else {}
        except ValueError:  # manifest being replaced right now
            done = {}
        if len(done) >= 1:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    summary = scannet.prepare_scannet(root, out, frames_every=1)
    if killed:
        assert summary.skipped and not summary.failed
    assert _tree(out) == _tree(clean)


def test_split_lists_follow_pointcept(raw, tmp_path):
    """--split-lists: train list -> train/, val list -> val/, any other scene -> test/; the three folders exist even
    when empty (here val/: its only listed scene is not in the download)."""
    root, _ = raw
    lists = tmp_path / "meta"
    lists.mkdir()
    (lists / "scannetv2_train.txt").write_text("scene0000_00\n")
    (lists / "scannetv2_val.txt").write_text("scene0568_00\n")
    out = tmp_path / "out"
    assert scannet.run(_args(root, out, "--frames-every", "0", "--split-lists", str(lists))) == 0
    assert [p.name for p in (out / "train").iterdir()] == ["scene0000_00"]
    assert sorted(p.name for p in (out / "test").iterdir()) == ["scene0000_01", "scene0000_02"]
    assert (out / "val").is_dir() and not list((out / "val").iterdir())
    with pytest.raises(HaskdError, match="cannot be combined"):
        scannet.run(_args(root, out, "--split-lists", str(lists), "--split-file", f"val={lists / 'x.txt'}"))
