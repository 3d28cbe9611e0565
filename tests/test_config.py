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


def test_converged_preset_is_the_bench_preset_at_its_documented_size():
    """synthetic_converged repeats synthetic_bench's values (one level of _base_): it may differ only where its
    comments and docs/benchmarks.md say (rooms' voxel size, frame size, epochs of both models, validation, threads)."""
    import dataclasses

    size = ["data.voxel_size=0.08", "teacher.image_size=[120,160]", "train.epochs=120", "teacher.epochs=120",
            "train.eval_every=4", "train.threads=1"]
    assert dataclasses.asdict(load_config("synthetic_converged")) == dataclasses.asdict(
        load_config("synthetic_bench", size))


def test_limited_annotation_preset_is_the_converged_preset_with_its_documented_changes():
    """synthetic_converged_la500 repeats synthetic_converged's values (one level of _base_) but the four its
    comments and docs/benchmarks.md 7d give: 500 labeled points a room, the frozen-baseline teacher, no hints."""
    import dataclasses

    diff = ["data.labeled_points=500", "teacher.init_3d=baseline", "teacher.freeze_3d=true", "distill.hint_weight=0"]
    assert dataclasses.asdict(load_config("synthetic_converged_la500")) == dataclasses.asdict(
        load_config("synthetic_converged", diff))


def test_e240_preset_is_the_limited_annotation_preset_with_its_documented_changes():
    """synthetic_converged_la500_e240 (docs/benchmarks.md 7f) differs from synthetic_converged_la500 only in the
    epochs of every model, the validation interval and the confidence gate its comments give."""
    import dataclasses

    diff = ["train.epochs=240", "teacher.epochs=240", "train.eval_every=4", "distill.unlabeled_conf=0.99"]
    assert dataclasses.asdict(load_config("synthetic_converged_la500_e240")) == dataclasses.asdict(
        load_config("synthetic_converged_la500", diff))


def test_bexp_preset_is_the_e240_preset_with_the_baselines_experts():
    """synthetic_converged_la500_e240_bexp (docs/benchmarks.md 7g) is the e240 preset but for whose snapshots ASD
    distils and the teacher out of the expert pool."""
    bexp, e240 = load_config("synthetic_converged_la500_e240_bexp"), load_config("synthetic_converged_la500_e240")
    assert (bexp.distill.asd_source, bexp.distill.teacher_expert) == ("baseline", False)
    bexp.distill.asd_source, bexp.distill.teacher_expert = "stage1", True
    assert bexp == e240  # the e240 preset but for those two keys


def test_32_room_preset_is_the_bexp_preset_at_half_the_epochs():
    """synthetic_converged32_la500_bexp runs on twice the training rooms (its data folder, not a config key) and so
    differs from synthetic_converged_la500_e240_bexp only in the epochs of every model: the same number of steps."""
    import dataclasses

    diff = ["train.epochs=120", "teacher.epochs=120"]
    assert dataclasses.asdict(load_config("synthetic_converged32_la500_bexp")) == dataclasses.asdict(
        load_config("synthetic_converged_la500_e240_bexp", diff))


def test_32_room_e240_preset_is_the_32_room_preset_with_students_at_twice_the_epochs():
    """synthetic_converged32_e240 doubles the students' (and so the baseline's) epochs; the teacher's image branch
    keeps its 120, on top of the 240-epoch baseline it starts from."""
    import dataclasses

    assert dataclasses.asdict(load_config("synthetic_converged32_e240")) == dataclasses.asdict(
        load_config("synthetic_converged32_la500_bexp", ["train.epochs=240"]))


def test_ablate_seed_lists():
    import argparse

    import pytest

    from haskd.commands.pipeline import _seed_list

    assert _seed_list("3") == (0, 1, 2) and _seed_list("1,2") == (1, 2) and _seed_list("2,") == (2,)
    for bad in ("0", "a", "-1,2", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            _seed_list(bad)


@pytest.mark.parametrize("key", sorted(__import__("haskd.config", fromlist=["CHOICES"]).CHOICES))
def test_closed_choices_are_checked_when_read(key):
    with pytest.raises(HaskdError, match=f"'{key}' must be one of"):
        load_config(None, [f"{key}=bogus"])
    cfg = load_config("synthetic_bench")
    d = cfg.distill
    assert (d.hint_weight, d.feat_weight, d.asd_trust, d.teacher_expert) == (2.0, 0.0, "hard", True)
    d = load_config("scannet20_haskd").distill  # the ScanNet presets keep METHOD.md's terms
    assert (d.hint_weight, d.teacher_expert) == (0.0, False)


def test_every_choice_error_names_the_allowed_values():
    from haskd.config import CHOICES, Config, check_config

    for key, allowed in CHOICES.items():
        with pytest.raises(HaskdError) as e:
            load_config(None, [f"{key}=bogus"])
        msg = str(e.value)
        shown = ", ".join(v or '""' for v in allowed)
        assert "\n" not in msg and f"must be one of {shown}, got 'bogus'" in msg, msg
        cfg = Config()  # a config built in code, not read: checked by check_config
        section, _, name = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, name, "bogus")
        with pytest.raises(HaskdError, match=f"'{key}' must be one of"):
            check_config(cfg)


def test_choice_sets_are_the_ones_the_code_uses():
    from haskd.config import CHOICES
    from haskd.distill import asd, kd
    from haskd.sparse import BACKENDS

    assert kd.IHD_TRUST_MODES == kd.TRUST_MODES + kd.IMAGE_TRUST_MODES == CHOICES["distill.trust"]
    assert asd.UNLABELED_MODES == CHOICES["distill.asd_unlabeled"] and BACKENDS == CHOICES["model.backend"]


@pytest.mark.parametrize("overrides, match", [
    (["distill.cache=false", "distill.hint_cache=true"], "'distill.hint_cache' needs distill.cache=true"),
    (["distill.hint_cache_views=4"], "'distill.hint_cache_views' needs distill.hint_cache=true"),
    (["distill.hint_cache_augs=2"], "'distill.hint_cache_augs' needs distill.hint_cache=true"),
    (["distill.cache=true", "distill.hint_cache=true", "distill.hint_cache_augs=2", "distill.hint_cache_views=2"],
     "'distill.hint_cache_augs' and 'distill.hint_cache_views' exclude each other"),
    (["distill.cache=true", "distill.hint_cache=true", "distill.hint_cache_augs=2", "data.mix_prob=0.5"],
     "'distill.hint_cache_augs' needs data.mix_prob=0"),
    (["distill.hint_cache_augs=-1"], "'distill.hint_cache_augs' must be >= 0"),
    (["data.labeled_points=-1"], "'data.labeled_points' must be >= 0"),
    (["distill.hint_cache_augs_half=true"], "'distill.hint_cache_augs_half' needs distill.hint_cache_augs > 0"),
    (["role=teacher", "distill.teacher_ckpt=t.pt"], "'distill.teacher_ckpt' needs role=student"),
    (["role=teacher", "distill.experts=e.json"], "'distill.experts' needs role=student"),
    (["train.snapshot_schedule=cycles"], "'train.snapshot_schedule' saves at the ends of cosine cycles, which need "
                                         "optim.scheduler=cyclic_cosine"),
    (["distill.unlabeled_keep=0.5"], "'distill.unlabeled_keep' lowers the gate distill.unlabeled_conf"),
])
def test_keys_that_need_another_are_refused_when_read(overrides, match):
    with pytest.raises(HaskdError, match=match):
        load_config(None, overrides)


def test_removed_key_is_accepted_and_dropped():
    cfg = load_config(None, ["train.log_every=5"])  # configs of old checkpoints hold it
    assert not hasattr(cfg.train, "log_every")


@pytest.mark.parametrize("key, value", [("distill.hint_weight", "1.0"), ("distill.teacher_expert", "true"),
                                        ("distill.init_from_teacher", "true")])
def test_teacher_side_keys_need_a_teacher_in_a_run(key, value):
    from haskd.config import check_run

    cfg = load_config(None, [f"{key}={value}"])  # a recipe may hold it (the pipeline hands it on)
    check_run(cfg)  # a point-only student (a baseline from a HAS-KD preset): the key is off, said in one line
    asd_only = apply_overrides(cfg, ["distill.experts=e.json"])
    with pytest.raises(HaskdError, match=f"'{key}' needs distill.teacher_ckpt"):
        check_run(asd_only)
    check_run(apply_overrides(asd_only, ["distill.teacher_ckpt=t.pt"]))


def test_point_only_and_with_teacher_derive_the_stage_configs():
    from haskd.config import TEACHER_KEYS, Config, check_run, get, point_only, with_teacher

    assert set(TEACHER_KEYS) == {"distill.hint_weight", "distill.teacher_expert", "distill.init_from_teacher",
                                 "distill.teacher_head"}
    cfg = load_config("synthetic_bench", ["distill.init_from_teacher=true", "train.snapshots=3"])
    base = point_only(cfg)
    check_run(base)
    assert base.role == "student" and base.train.snapshots == 0 and not base.distill.experts
    assert all(get(base, k) == get(Config(), k) for k in TEACHER_KEYS)
    assert base.optim == cfg.optim and base.distill.trust == cfg.distill.trust  # the rest is kept
    student = with_teacher(point_only(cfg), cfg, "t/last.pt")
    check_run(student)
    assert student.distill.teacher_ckpt == "t/last.pt"
    assert all(get(student, k) == get(cfg, k) for k in TEACHER_KEYS)
