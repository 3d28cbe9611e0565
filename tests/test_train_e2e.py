"""End-to-end: the real trainer, evaluator and predictor through the CLI, on tiny synthetic rooms."""
import json

import numpy as np
import pytest
import torch

from haskd.cli import main
from haskd.engine.checkpoint import load_checkpoint

from conftest import TINY


@pytest.fixture(scope="module")
def trained(tiny_rooms, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", "--data", str(tiny_rooms), "--out", str(out), "--epochs", "2", "--seed", "0",
               "--no-progress", *TINY])
    assert rc == 0
    return out


def test_train_writes_checkpoints_logs_and_config(trained):
    assert (trained / "last.pt").is_file() and (trained / "best.pt").is_file()
    assert (trained / "config.yaml").is_file()
    lines = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2] and "val/miou" in lines[-1]
    ck = load_checkpoint(trained / "last.pt")  # weights_only=True inside
    assert ck["epoch"] == 2 and ck["config"]["model"]["preset"] == "tiny"
    assert {"optimizer", "scheduler", "rng", "task_state"} <= set(ck)
    assert list((trained / "tb").iterdir())


def test_eval_json_contract(trained, tiny_rooms, tmp_path):
    out = tmp_path / "m.json"
    assert main(["eval", "--ckpt", str(trained / "last.pt"), "--data", str(tiny_rooms), "--split", "val",
                 "--out", str(out), "--tta"]) == 0
    m = json.loads(out.read_text())
    for k in ("miou", "macc", "allacc"):
        assert 0.0 <= m[k] <= 1.0
    assert set(m["per_class_iou"]) >= {"wall", "floor"}
    assert all(v is None or 0 <= v <= 1 for v in m["per_class_iou"].values())
    # full resolution: every labeled original point of the val scene is counted
    seg = np.load(next((tiny_rooms / "val").iterdir()) / "segment20.npy")
    assert m["num_points"] == int((seg >= 0).sum())
    assert "tta" in m and m["tta"]["miou"] >= 0


def test_load_rebuilds_model_from_checkpoint(trained):
    import haskd

    model = haskd.load(trained / "last.pt")
    assert not model.training and sum(p.numel() for p in model.parameters()) > 0


def test_predict_writes_labels_and_ply(trained, tiny_rooms, tmp_path):
    from plyfile import PlyData

    scene = next((tiny_rooms / "val").iterdir())
    xyzrgb = np.concatenate([np.load(scene / "coord.npy"), np.load(scene / "color.npy")], 1)
    np.save(tmp_path / "cloud.npy", xyzrgb)
    np.savetxt(tmp_path / "cloud2.txt", xyzrgb[:500], fmt="%.4f")
    assert main(["predict", "--ckpt", str(trained / "last.pt"), str(tmp_path / "cloud.npy"),
                 str(tmp_path / "cloud2.txt"), "--out", str(tmp_path / "pred")]) == 0
    lab = np.load(tmp_path / "pred" / "cloud_labels.npy")
    assert lab.shape == (xyzrgb.shape[0],) and lab.min() >= 0 and lab.max() < 20
    ply = PlyData.read(str(tmp_path / "pred" / "cloud_pred.ply"))
    assert ply["vertex"].count == xyzrgb.shape[0]
    assert set(ply["vertex"].data.dtype.names) >= {"x", "red", "label"}
    # a PLY with the same points and colours gives the same labels
    from haskd.engine.predict import write_ply

    write_ply(tmp_path / "cloud3.ply", xyzrgb[:, :3], xyzrgb[:, 3:].astype(np.uint8))
    assert main(["predict", "--ckpt", str(trained / "last.pt"), str(tmp_path / "cloud3.ply"),
                 "--out", str(tmp_path / "pred2")]) == 0
    assert np.array_equal(np.load(tmp_path / "pred2" / "cloud3_labels.npy"), lab)




def test_resume_matches_uninterrupted(tiny_rooms, tmp_path):
    from haskd.config import load_config
    from haskd.workflow.train import train

    def cfg(epochs):
        c = load_config(None, [*TINY, "train.eval_every=0", f"data.root={tiny_rooms}", "train.seed=5"])
        c.train.epochs = epochs
        return c

    full = train(cfg(3), tmp_path / "full", progress=False)
    # simulate an interruption after epoch 2: run 3 epochs but stop the loop early via a patched config
    import haskd.engine.hooks as T

    part_dir = tmp_path / "part"
    orig = T.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_maybe_stop(path, **payload):
        orig(path, **payload)
        if path.name == "last.pt" and payload["epoch"] == 2:
            raise Stop

    T.save_checkpoint = save_then_maybe_stop
    try:
        with pytest.raises(Stop):
            train(cfg(3), part_dir, progress=False)
    finally:
        T.save_checkpoint = orig
    resumed = train(cfg(3), part_dir, resume=True, progress=False)
    assert resumed["miou"] == full["miou"]
    sa = load_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    sb = load_checkpoint(part_dir / "last.pt")["state_dict"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
