import pytest

from haskd.config import apply_overrides, load_config
from haskd.errors import HaskdError


def test_default_preset_and_overrides():
    cfg = load_config(None, ["optim.lr=0.01", "model.preset=tiny", "data.use_normal=true", "train.epochs=3"])
    assert cfg.optim.lr == 0.01 and cfg.model.preset == "tiny" and cfg.data.use_normal is True
    assert cfg.train.epochs == 3 and cfg.data.num_classes == 20


def test_unknown_key_lists_valid_keys():
    with pytest.raises(HaskdError) as e:
        load_config(None, ["optim.lrr=0.1"])
    assert "optim.lrr" in str(e.value) and "optim.lr" in str(e.value) and "data.voxel_size" in str(e.value)


def test_type_errors_are_clear():
    with pytest.raises(HaskdError, match="expects a number"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(HaskdError, match="key=value"):
        load_config(None, ["optim.lr"])


def test_base_one_level(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: scannet20_student\noptim:\n  lr: 0.2\n")
    cfg = load_config(str(tmp_path / "a.yaml"))
    assert cfg.optim.lr == 0.2 and cfg.model.name == "spunet"
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(HaskdError, match="one level"):
        load_config(str(tmp_path / "b.yaml"))


def test_unknown_key_in_file(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  widht: 3\n")
    with pytest.raises(HaskdError, match="c.yaml.*model.widht"):
        load_config(str(tmp_path / "c.yaml"))


def test_missing_file():
    with pytest.raises(HaskdError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


def test_haskd_preset_has_distillation_defaults():
    cfg = apply_overrides(load_config("scannet20_haskd"), [])
    assert cfg.train.snapshots == 5 and cfg.distill.tau == 2.0 and cfg.teacher.num_frames == 5


def test_every_shipped_config_loads():
    from pathlib import Path

    import haskd

    names = sorted(p.stem for p in (Path(haskd.__file__).parent / "configs").glob("*.yaml"))
    assert "synthetic_bench" in names and "demo_synthetic" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.data.num_classes > 0


def test_ablate_seed_lists():
    import argparse

    import pytest

    from haskd.commands.pipeline import _seed_list

    assert _seed_list("3") == (0, 1, 2) and _seed_list("1,2") == (1, 2) and _seed_list("2,") == (2,)
    for bad in ("0", "a", "-1,2", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            _seed_list(bad)


@pytest.mark.parametrize("key", ["distill.trust", "distill.asd_trust", "distill.kd_target", "distill.asd_unlabeled"])
def test_closed_choices_are_checked_when_read(key):
    with pytest.raises(HaskdError, match=f"'{key}' must be one of"):
        load_config(None, [f"{key}=bogus"])
    cfg = load_config("synthetic_bench")
    d = cfg.distill
    assert (d.hint_weight, d.feat_weight, d.asd_trust, d.teacher_expert) == (2.0, 0.0, "hard", True)
    d = load_config("scannet20_haskd").distill  # the ScanNet presets keep METHOD.md's terms
    assert (d.hint_weight, d.teacher_expert) == (0.0, False)
