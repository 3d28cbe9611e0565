"""Training and evaluation on the real ScanNet samples of ../shared/data (skipped when absent)."""
import json

import pytest

from haskd.cli import main


@pytest.fixture(scope="module")
def real_root(shared_data, tmp_path_factory):
    from haskd.prepare.samples import prepare_samples

    out = tmp_path_factory.mktemp("samples")
    prepare_samples(shared_data, out, progress=False)
    return out / "scannet"


def test_train_eval_on_real_scenes_fast(real_root, tmp_path):
    """One short epoch at 10 cm on the real train rooms, full-resolution eval on the 5 real val rooms."""
    out = tmp_path / "run"
    assert main(["train", "--data", str(real_root), "--out", str(out), "--epochs", "1", "--no-progress",
                 "model.preset=tiny", "data.voxel_size=0.1", "data.max_voxels=8000", "train.device=cpu"]) == 0
    assert main(["eval", "--ckpt", str(out / "last.pt"), "--data", str(real_root), "--split", "val",
                 "--out", str(tmp_path / "val.json")]) == 0
    m = json.loads((tmp_path / "val.json").read_text())
    assert 0 <= m["miou"] <= 1 and m["num_points"] > 100000  # 5 real val rooms, every labeled point


@pytest.mark.slow
def test_real_baseline_learns(real_root, tmp_path):
    """The README's baseline recipe, shortened: after 8 epochs the small SpUNet must beat chance clearly."""
    out = tmp_path / "run"
    assert main(["train", "--config", "scannet20_samples", "--data", str(real_root), "--out", str(out),
                 "--epochs", "8", "--no-progress", "train.eval_every=0"]) == 0
    m = json.loads((out / "val_metrics.json").read_text())
    assert m["allacc"] > 0.4 and m["per_class_iou"]["floor"] > 0.5
