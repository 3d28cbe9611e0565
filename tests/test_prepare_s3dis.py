"""S3DIS importer on raw-layout rooms built from the real S3DIS samples."""
import argparse
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from haskd.classes import S3DIS_CLASSES
from haskd.data.scene import load_scene
from haskd.errors import InputError
from haskd.prepare import s3dis
from haskd.prepare.manifest import MANIFEST_NAME, folder_checksums

PARTIAL = "s3dis_area1_conferenceRoom1_partial/Area_1/conferenceRoom_1/Annotations"
EVERY = 40   # keep every 40th line of the real files: ~6k points


def _parse(lines):
    """Independent reference parser: (M, 6) float64 of 'x y z r g b' lines."""
    return np.array([[float(t) for t in ln.split()] for ln in lines], dtype=np.float64).reshape(-1, 6)


@pytest.fixture(scope="module")
def raw_src(shared_data, tmp_path_factory):
    """Area_1/conferenceRoom_1 (train) from the partial real room (+ a stairs file), Area_5/office_2 (val) from
    the mmdet3d sample. Returns (root, {scene: (coord, color, segment) of the source, in file-name order})."""
    root = tmp_path_factory.mktemp("s3dis_raw")
    expect = {}
    ann = root / "Area_1" / "conferenceRoom_1" / "Annotations"
    ann.mkdir(parents=True)
    for p in sorted((shared_data / PARTIAL).glob("*.txt")):
        lines = p.read_text().splitlines()[::EVERY]
        (ann / p.name).write_text("\n".join(lines) + "\n")
        if p.name == "clutter_1.txt":   # S3DIS has a 14th 'stairs' class, merged into clutter
            (ann / "stairs_1.txt").write_text("\n".join(lines[:30]) + "\n")
    rows, segs = [], []
    for p in sorted(ann.glob("*.txt")):
        a = _parse(p.read_text().splitlines())
        rows.append(a)
        name = p.stem.rsplit("_", 1)[0]
        segs.append(np.full(len(a), S3DIS_CLASSES.index("clutter" if name == "stairs" else name)))
    a = np.concatenate(rows)
    expect["Area_1_conferenceRoom_1"] = (a[:, :3].astype(np.float32), a[:, 3:].astype(np.uint8),
                                         np.concatenate(segs))

    mm = shared_data / "s3dis_mmdet3d_testdata"
    pts = np.fromfile(mm / "Area_1_office_2_points.bin", dtype=np.float32).reshape(-1, 6)
    sem = np.fromfile(mm / "Area_1_office_2_semantic_mask.bin", dtype=np.int64)
    ins = np.fromfile(mm / "Area_1_office_2_instance_mask.bin", dtype=np.int64)
    ann = root / "Area_5" / "office_2" / "Annotations"
    ann.mkdir(parents=True)
    order = []
    for k, (c, i) in enumerate(sorted(set(zip(sem.tolist(), ins.tolist())))):
        m = (sem == c) & (ins == i)
        # %.9g keeps float32 coordinates exact through text
        txt = "\n".join(f"{x:.9g} {y:.9g} {z:.9g} {int(r)} {int(g)} {int(b)}" for x, y, z, r, g, b in pts[m])
        (ann / f"{S3DIS_CLASSES[c]}_{k + 1}.txt").write_text(txt + "\n")
        order.append((f"{S3DIS_CLASSES[c]}_{k + 1}.txt", m))
    order.sort()
    idx = np.concatenate([np.flatnonzero(m) for _, m in order])
    expect["Area_5_office_2"] = (pts[idx, :3], pts[idx, 3:].astype(np.uint8), sem[idx])
    return root, expect


@pytest.fixture
def raw(raw_src, tmp_path):
    root, expect = raw_src
    dst = tmp_path / "raw"
    shutil.copytree(root, dst)
    return dst, expect


def _args(raw_root, out, *extra):
    p = s3dis.configure_parser(argparse.ArgumentParser())
    return p.parse_args(["--raw", str(raw_root), "--out", str(out), "--workers", "1", *extra])


def _tree(root: Path) -> dict:
    return {k: v for k, v in folder_checksums(root).items() if k != MANIFEST_NAME}


def test_prepare_reproduces_source_exactly(raw, tmp_path):
    root, expect = raw
    out = tmp_path / "out"
    assert s3dis.run(_args(root, out)) == 0
    assert [p.name for p in (out / "train").iterdir()] == ["Area_1_conferenceRoom_1"]
    assert [p.name for p in (out / "val").iterdir()] == ["Area_5_office_2"]
    for name, (coord, color, seg) in expect.items():
        s = load_scene(out / ("val" if name.startswith("Area_5") else "train") / name, num_classes=13)
        np.testing.assert_array_equal(s.coord, coord)
        np.testing.assert_array_equal(s.color, color)
        np.testing.assert_array_equal(s.segment, seg)
        assert s.normal is None
        # one instance per annotation file, numbered in file order, so instances never straddle classes
        for k in np.unique(s.instance):
            assert len(np.unique(s.segment[s.instance == k])) == 1
    s = load_scene(out / "train" / "Area_1_conferenceRoom_1")
    assert s.instance.max() + 1 == len(list((root / "Area_1" / "conferenceRoom_1" / "Annotations").glob("*.txt")))
    # the stairs file lands in clutter
    assert (s.segment == S3DIS_CLASSES.index("clutter")).sum() > 30


def test_test_area_option_and_parallel_workers_give_same_output(raw, tmp_path):
    root, _ = raw
    a, b = tmp_path / "a", tmp_path / "b"
    assert s3dis.run(_args(root, a, "--test-area", "1")) == 0
    args = _args(root, b, "--test-area", "1")
    args.workers = 2
    assert s3dis.run(args) == 0
    assert [p.name for p in (a / "val").iterdir()] == ["Area_1_conferenceRoom_1"]
    assert _tree(a) == _tree(b)


def test_malformed_line_is_skipped_with_file_and_line(raw, tmp_path, caplog):
    root, expect = raw
    board = root / "Area_1" / "conferenceRoom_1" / "Annotations" / "board_1.txt"
    lines = board.read_text().splitlines()
    # the kind of damage S3DIS has (Area_5/office_19 ceiling): a stray control character inside a number
    lines[6] = lines[6].replace(".", ".\x10", 1)
    board.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert s3dis.run(_args(root, out)) == 0
    assert any(f"{board}:7: malformed line skipped" in r.getMessage() for r in caplog.records)
    s = load_scene(out / "train" / "Area_1_conferenceRoom_1")
    coord, _, _ = expect["Area_1_conferenceRoom_1"]
    assert s.num_points == coord.shape[0] - 1
    # exactly the bad row is gone
    first_board = sum(len(p.read_text().splitlines()) for p in sorted(board.parent.glob("*.txt")) if p.name < board.name)
    keep = np.ones(coord.shape[0], bool)
    keep[first_board + 6] = False
    np.testing.assert_array_equal(s.coord, coord[keep])


def _unknown_class(ann: Path):
    shutil.copy(ann / "chair_1.txt", ann / "piano_1.txt")


def _nan(ann: Path):
    p = ann / "door_1.txt"
    lines = p.read_text().splitlines()
    lines[3] = "nan 1.0 2.0 10 20 30"
    p.write_text("\n".join(lines) + "\n")


def _many_bad(ann: Path):
    p = ann / "wall_1.txt"
    p.write_text("".join(f"{ln} 7\n" for ln in p.read_text().splitlines()))   # 7 columns everywhere


def _no_annotations(ann: Path):
    shutil.rmtree(ann)


BAD_CASES = {
    "unknown class": (_unknown_class, r"piano_1\.txt: unknown class name 'piano'"),
    "nan coords": (_nan, r"door_1\.txt: 1 point\(s\) with NaN/inf coordinates"),
    "many malformed lines": (_many_bad, r"wall_1\.txt: more than 10 malformed lines"),
    "missing annotations": (_no_annotations, r"Annotations: missing folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_room_fails_alone(raw, tmp_path, capsys, case):
    root, _ = raw
    breaker, pattern = BAD_CASES[case]
    breaker(root / "Area_1" / "conferenceRoom_1" / "Annotations")
    out = tmp_path / "out"
    assert s3dis.run(_args(root, out)) == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "FAILED" in ln)
    assert line.startswith("  FAILED Area_1_conferenceRoom_1: ") and str(root) in line
    assert re.search(pattern, line), line
    assert (out / "val" / "Area_5_office_2" / "coord.npy").is_file()
    assert not (out / "train" / "Area_1_conferenceRoom_1").exists()


def test_interrupted_run_resumes_and_matches_clean_run(raw, tmp_path, monkeypatch):
    root, _ = raw
    clean = tmp_path / "clean"
    assert s3dis.run(_args(root, clean)) == 0
    real = s3dis.prepare_room
    calls = []

    def dies_on_second_room(name, params, out_dir):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(name, params, out_dir)

    out = tmp_path / "out"
    monkeypatch.setattr(s3dis, "prepare_room", dies_on_second_room)
    with pytest.raises(KeyboardInterrupt):
        s3dis.run(_args(root, out))
    assert list(json.loads((out / MANIFEST_NAME).read_text())["scenes"]) == ["Area_1_conferenceRoom_1"]
    calls.clear()
    monkeypatch.setattr(s3dis, "prepare_room", lambda *a: (calls.append(a[0]), real(*a))[1])
    summary = s3dis.prepare_s3dis(root, out)
    assert summary.skipped == ["Area_1_conferenceRoom_1"] and calls == ["Area_5_office_2"]
    assert _tree(out) == _tree(clean)
    calls.clear()
    assert len(s3dis.prepare_s3dis(root, out).skipped) == 2 and calls == []
    # an edited input file changes the fingerprint: that room is redone
    p = root / "Area_5" / "office_2" / "Annotations"
    next(iter(sorted(p.glob("*.txt")))).write_text("0 0 0 1 2 3\n")
    assert s3dis.prepare_s3dis(root, out).done == ["Area_5_office_2"]


def test_layout_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Area_N folders"):
        s3dis.run(_args(tmp_path / "empty", tmp_path / "out"))
    with pytest.raises(InputError, match="missing file"):
        s3dis.read_xyzrgb(tmp_path / "nope.txt")
    with pytest.raises(Exception, match="scannet"):
        from haskd.prepare.manifest import Manifest
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / MANIFEST_NAME).write_text(json.dumps({"version": 1, "dataset": "scannet", "scenes": {}}))
        Manifest(tmp_path / "o", "s3dis")
