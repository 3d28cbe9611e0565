"""Data parity with Pointcept: ScanNet-200 labels in Pointcept's meaning, its official split lists, and a
Pointcept-made ScanNet folder (empty val/, unlabeled test/, int64 labels) that trains and evaluates as-is."""
import csv
import json
import shutil

import numpy as np
import pytest

from haskd.classes import (SCANNET20_CLASSES, SCANNET200_CATEGORY_IDS, SCANNET200_CLASSES, category_to_scannet200)
from haskd.cli import main
from haskd.errors import InputError

from conftest import TINY


def test_scannet200_lists_are_200_distinct_ids_and_names():
    assert len(SCANNET200_CATEGORY_IDS) == len(set(SCANNET200_CATEGORY_IDS)) == 200
    assert len(SCANNET200_CLASSES) == len(set(SCANNET200_CLASSES)) == 200
    assert list(SCANNET200_CATEGORY_IDS) == sorted(SCANNET200_CATEGORY_IDS)
    # every ScanNet-20 class is also a ScanNet-200 class, except the NYU40 catch-all
    assert set(SCANNET20_CLASSES) - set(SCANNET200_CLASSES) == {"sofa", "otherfurniture"}  # "couch" in ScanNet-200


def test_category_to_scannet200_by_hand():
    got = category_to_scannet200(np.array([1, 2, 3, 1191, 1163, 300, 12, 0, -1, 1192, 100000]))
    np.testing.assert_array_equal(got, [0, 1, 2, 199, 172, 148, -1, -1, -1, -1, -1])


def test_scannet200_ids_name_their_class_in_the_real_label_table(shared_data):
    """Each of the 200 ids is a category of ScanNet's own tsv whose name is the class name."""
    path = shared_data / "scannet_meta" / "scannetv2-labels.combined.tsv"
    names = {}
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            names.setdefault(int(r["id"]), set()).update({r["category"], r["raw_category"]})
    for cid, name in zip(SCANNET200_CATEGORY_IDS, SCANNET200_CLASSES):
        assert name in names.get(cid, set()), (cid, name)


def test_official_split_lists_read_as_pointcept(shared_data, tmp_path):
    from haskd.prepare.scannet import read_split_lists

    m = read_split_lists(shared_data / "scannet_meta")
    assert sum(v == "train" for v in m.values()) == 1201 and sum(v == "val" for v in m.values()) == 312
    assert m["scene0000_00"] == "train" and m["scene0568_00"] == "val"
    (tmp_path / "scannetv2_train.txt").write_text("scene0000_00\r\nscene0001_00\r\n")   # CRLF tolerated
    (tmp_path / "scannetv2_val.txt").write_text("scene0001_00\n")
    with pytest.raises(InputError, match="also in the train list"):
        read_split_lists(tmp_path)
    (tmp_path / "scannetv2_val.txt").unlink()
    with pytest.raises(InputError, match="missing file"):
        read_split_lists(tmp_path)


def _pointcept_folder(rooms, root):
    """What Pointcept's ScanNet preprocessing writes: train/ val/ test/ (all present), per scene coord float32,
    color uint8, normal float32, segment20 / segment200 / instance int64 (``astype(int)``); test scenes unlabeled."""
    idx200 = {n: i for i, n in enumerate(SCANNET200_CLASSES)}
    to200 = np.array([idx200.get(n, -1) for n in SCANNET20_CLASSES] + [-1])
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
    labeled = sorted((rooms / "train").iterdir()) + sorted((rooms / "val").iterdir())
    for src in labeled:
        dst = root / "train" / src.name
        dst.mkdir()
        for k in ("coord", "color", "normal"):
            shutil.copy(src / f"{k}.npy", dst / f"{k}.npy")
        seg = np.load(src / "segment20.npy").astype(int)
        np.save(dst / "segment20.npy", seg)
        np.save(dst / "segment200.npy", to200[seg].astype(int))
        np.save(dst / "instance.npy", np.load(src / "instance.npy").astype(int))
    for src in sorted((rooms / "test").iterdir()):
        dst = root / "test" / src.name
        dst.mkdir()
        for k in ("coord", "color", "normal"):
            shutil.copy(src / f"{k}.npy", dst / f"{k}.npy")
    return labeled


def test_pointcept_folder_with_empty_val_trains_and_evaluates(tiny_rooms, tmp_path, caplog):
    root = tmp_path / "scannet"
    labeled = _pointcept_folder(tiny_rooms, root)
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert main(["train", "--data", str(root), "--out", str(out), "--epochs", "1", "--no-progress", *TINY]) == 0
    notes = [r.getMessage() for r in caplog.records if "no validation" in r.getMessage()]
    assert len(notes) == 1 and "holds no scene folder" in notes[0]
    assert (out / "last.pt").is_file() and not (out / "best.pt").exists()
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 1 and not any(k.startswith("val/") for k in rec[0])

    m = tmp_path / "m.json"
    assert main(["eval", "--ckpt", str(out / "last.pt"), "--data", str(root), "--split", "train",
                 "--out", str(m)]) == 0
    res = json.loads(m.read_text())
    assert res["num_points"] == sum(int((np.load(p / "segment20.npy") >= 0).sum()) for p in labeled)
    assert 0.0 <= res["miou"] <= 1.0


def test_val_split_none_and_missing_val(tiny_rooms, tmp_path):
    from haskd.config import load_config
    from haskd.workflow.build import build_datasets

    cfg = load_config(None, [f"data.root={tiny_rooms}", "data.val_split=none", *TINY])
    sets = build_datasets(cfg, optional_val=True)
    assert sets["val"] is None and len(sets["train"]) == 2
    cfg.data.val_split = "vall"                        # a typo stays an error, and says how to train without val
    with pytest.raises(InputError, match="data.val_split=none"):
        build_datasets(cfg, optional_val=True)
    with pytest.raises(InputError, match="not found"):
        build_datasets(cfg)                            # explicit requests for val (pipeline, eval) never skip
