"""The HAS-KD pipeline end to end on tiny synthetic rooms (2 epochs per stage): every stage, summary, report,
and the no-inference-cost contract (the HAS-KD student is the baseline network, parameter for parameter)."""
import json
from pathlib import Path

import pytest
import torch

from haskd.config import load_config
from haskd.engine.checkpoint import load_checkpoint
from haskd.workflow.pipeline import run_pipeline

from conftest import TINY

PIPE = [*TINY, "train.epochs=2", "train.eval_every=0", "train.snapshots=2", "teacher.image_size=[30,40]",
        "teacher.image_widths=[8,16]", "teacher.image_channels=8", "teacher.num_frames=2", "data.use_normal=true"]


@pytest.fixture(scope="module")
def pipeline_run(tiny_rooms, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe")
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}"])
    summary = run_pipeline(cfg, out, progress=False)
    return out, summary


def test_stages_summary_and_report(pipeline_run):
    out, summary = pipeline_run
    for k in ("baseline", "teacher", "student"):
        m = summary[k]["metrics"]
        assert 0 <= m["miou"] <= 1 and set(m) >= {"miou", "macc", "allacc", "per_class_iou"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["student"]["ckpt"].endswith("student/last.pt")
    html = (out / "report.html").read_text()
    for needle in ("iou_bars.png", "confusion_teacher.png", "experts.png", "topdown_"):
        assert needle in html
    assert (out / "stage1" / "experts.json").is_file() and len(list((out / "stage1" / "snapshots").iterdir())) == 2
    assert json.loads((out / "teacher" / "frames.json").read_text())  # frames chosen per scene


def test_student_is_the_baseline_network(pipeline_run):
    out, summary = pipeline_run
    a = load_checkpoint(out / "baseline" / "last.pt")["state_dict"]
    b = load_checkpoint(out / "student" / "last.pt")["state_dict"]
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    assert sum(v.numel() for v in a.values()) == sum(v.numel() for v in b.values())
    assert not any("projector" in k or "teacher" in k for k in b)


def test_rerun_skips_finished_stages(pipeline_run, tiny_rooms, caplog):
    out, summary = pipeline_run
    import logging

    caplog.set_level(logging.INFO)
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}"])
    again = run_pipeline(cfg, out, progress=False, report=False)
    assert again["student"]["metrics"]["miou"] == summary["student"]["metrics"]["miou"]
    assert caplog.text.count("done already") == 4


def test_cached_and_online_distillation_agree_on_unaugmented_batch(pipeline_run, tiny_rooms):
    """The soft-label cache gives the same IHD + ASD losses as running the frozen models online."""
    from haskd.config import load_config
    from haskd.data.transforms import collate
    from haskd.distill.setup import build_distill_task
    from haskd.engine.evaluate import scene_sample
    from haskd.workflow.build import build_datasets
    from haskd.models import build_from_config

    out, _ = pipeline_run
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}",
                                          f"distill.teacher_ckpt={out / 'teacher' / 'last.pt'}",
                                          f"distill.experts={out / 'stage1' / 'experts.json'}"])
    torch.manual_seed(0)
    student = build_from_config(cfg).eval()
    losses = {}
    runs = ((True, False), (False, False), ("gain", True), ("online-gain", True), ("route", False),
            ("online-route", False))
    for cache, gain in runs:
        cfg.distill.cache = cache in (True, "gain", "route")
        cfg.distill.image_gain = gain
        cfg.distill.teacher_expert = cache in ("route", "online-route")  # the table holds the teacher's row
        ds = build_datasets(cfg)
        torch.manual_seed(1)  # same projector initialisation in both tasks
        task = build_distill_task(student, cfg, "cpu", ds["train"]).eval()
        scene = ds["train"].scenes[0]
        sample = scene_sample(scene, cfg.data.voxel_size, cfg.data.num_classes, cfg.data.use_normal)
        if not cfg.distill.cache:
            sample["frames"] = ds["train"].frames_of(0)
        with torch.no_grad():
            losses[cache], _ = task(collate([sample]))
    assert set(losses[True]) == set(losses[False]) == {"ce", "ihd_logit", "ihd_feat", "asd"}
    for a, b in ((True, False), ("gain", "online-gain"), ("route", "online-route")):
        for k in losses[a]:
            assert torch.allclose(losses[a][k], losses[b][k], rtol=2e-2, atol=2e-3), (a, k)
    assert not torch.allclose(losses["gain"]["ihd_logit"], losses[True]["ihd_logit"])  # the weights changed


def test_pipeline_runs_unchanged_with_the_point_transformer(tiny_rooms, tmp_path):
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", "model.name=ptv3", "model.preset=tiny"])
    summary = run_pipeline(cfg, tmp_path / "ptv3", progress=False, report=False)
    assert 0 <= summary["student"]["metrics"]["miou"] <= 1
    a = load_checkpoint(tmp_path / "ptv3" / "baseline" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "ptv3" / "student" / "last.pt")["state_dict"]
    assert list(a) == list(b) and sum(v.numel() for v in a.values()) == sum(v.numel() for v in b.values())


def test_ablation_rows_and_tables(tiny_rooms, tmp_path):
    from haskd.workflow.pipeline import ABLATION_ROWS, run_ablation

    # with the hints and the teacher in the expert pool (as synthetic_bench): "+ASD only" has no teacher, so no hints,
    # and its pool is the snapshots
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", "distill.teacher_expert=true",
                                          "distill.hint_weight=1"])
    table = run_ablation(cfg, tmp_path / "abl", seeds=(0,), progress=False)
    assert list(table["rows"]) == list(ABLATION_ROWS)
    for r in ABLATION_ROWS:
        assert len(table["rows"][r]["miou"]) == 1 and 0 <= table["rows"][r]["mean"] <= 100
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "+IHD (uniform frames)" in md and "HAS-KD" in md
    assert 0 <= table["teacher"]["teacher's 3D branch (points only)"]["mean"] <= 100  # evaluated without images
    assert json.loads((tmp_path / "abl" / "seed0" / "stage1" / "experts.json").read_text())["teacher_iou"]
    rows = lambda run: json.loads((tmp_path / "abl" / "seed0" / run / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows("stage1")["train/ihd_hint"] > 0 and rows("student")["train/ihd_hint"] > 0
    assert "train/ihd_hint" not in rows("asd_only") and rows("asd_only")["train/asd"] >= 0
    # the uniform-frames teacher really used the uniform policy
    assert load_checkpoint(tmp_path / "abl" / "seed0" / "uniform" / "teacher" / "last.pt")["config"]["teacher"][
        "frame_policy"] == "uniform"
    # the same runs reported on the held-out test room: nothing is retrained, each row is its checkpoint evaluated
    from haskd.data.dataset import SceneDataset
    from haskd.engine.checkpoint import load_model
    from haskd.engine.evaluate import evaluate

    test = run_ablation(cfg, tmp_path / "abl", seeds=(0,), progress=False, split="test")
    assert test["split"] == "test" and (tmp_path / "abl" / "ablation_test.md").read_text().startswith(
        "| variant | test mIoU")
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["split"] == "val"  # the val table stays
    model, mcfg = load_model(tmp_path / "abl" / "seed0" / "student" / "last.pt", return_config=True)
    ds = SceneDataset(tiny_rooms, "test", mcfg.data.num_classes, mcfg.data.voxel_size, use_normal=True)
    assert test["rows"]["HAS-KD"]["miou"][0] == pytest.approx(100 * evaluate(model, ds)["miou"])
    assert 0 <= test["teacher"]["teacher (IOF frames)"]["mean"] <= 100
    # --split-data: the split's rooms from another root (here the val rooms, linked in as its "test"); the tables of
    # the data's own splits stay, and each row is its checkpoint on those rooms
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "test").symlink_to(Path(tiny_rooms) / "val", target_is_directory=True)
    more = run_ablation(cfg, tmp_path / "abl", seeds=(0,), progress=False, split="test", split_root=tmp_path / "more")
    assert (tmp_path / "abl" / "ablation_test_more.md").read_text().startswith("| variant | test of more mIoU")
    assert more["split_root"] == str((tmp_path / "more").resolve())
    per_class = lambda t: [t[g][r]["per_class_iou"] for g in ("rows", "teacher") for r in t[g]]
    assert per_class(more) == per_class(table) != per_class(test)
    assert json.loads((tmp_path / "abl" / "ablation_test.json").read_text()) == test
    student_test = json.loads((tmp_path / "abl" / "seed0" / "student" / "metrics_test.json").read_text())
    assert student_test["data_root"] == str(Path(tiny_rooms).resolve())  # the own test rooms' cache is kept
    assert (tmp_path / "abl" / "seed0" / "student" / "metrics_test_more.json").is_file()
    # the cached test metrics belong to these rooms: another root's "test" is not answered from them
    from haskd.errors import HaskdError
    from haskd.workflow.runs import split_metrics

    (tmp_path / "other" / "val").mkdir(parents=True)
    with pytest.raises(HaskdError, match="test"):
        split_metrics(tmp_path / "abl" / "seed0" / "student", "test", tmp_path / "other")


def test_student_warm_starts_from_the_teacher_3d_branch(pipeline_run, tiny_rooms, tmp_path):
    """distill.init_from_teacher: the student's first weights are the teacher's 3D branch, tensor for tensor;
    a teacher of another network is refused with a one-line error."""
    from haskd.engine.checkpoint import init_weights
    from haskd.errors import HaskdError
    from haskd.models import build_from_config

    out, _ = pipeline_run
    teacher_ckpt = out / "teacher" / "last.pt"
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}"])
    student = build_from_config(cfg)
    init_weights(student, teacher_ckpt)
    t = load_checkpoint(teacher_ckpt)["state_dict"]
    for k, v in student.state_dict().items():
        assert torch.equal(v, t["backbone." + k]), k
    other = build_from_config(load_config("scannet20_haskd", [*PIPE, "model.preset=small"]))
    with pytest.raises(HaskdError, match="same model.name and preset"):
        init_weights(other, teacher_ckpt)
    # through the trainer: epoch 0 of a 0-step run keeps the teacher's weights exactly (lr 0)
    run = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", "train.epochs=1", "optim.lr=0",
                                          f"distill.teacher_ckpt={teacher_ckpt}", "distill.init_from_teacher=true",
                                          "distill.feat_weight=0"])
    from haskd.workflow.train import train

    train(run, tmp_path / "warm", progress=False)
    s = load_checkpoint(tmp_path / "warm" / "last.pt")["state_dict"]
    assert all(torch.equal(s[k], t["backbone." + k]) for k in s if not k.endswith(("running_mean", "running_var",
                                                                                      "num_batches_tracked")))


def test_hint_term_trains_only_the_student_and_saves_the_baseline_network(pipeline_run, tiny_rooms, tmp_path):
    """distill.hint_weight: the per-level hint loss is logged, the teacher is untouched, the saved student has the
    baseline's tensors (the hint projectors stay in the task); a student whose levels do not match the teacher's 3D
    branch (a PTv3 student, a SpUNet teacher: other levels, or as many but online) is refused in one line."""
    from haskd.workflow.train import train
    from haskd.errors import HaskdError

    out, _ = pipeline_run
    teacher_ckpt = out / "teacher" / "last.pt"
    before = {k: v.clone() for k, v in load_checkpoint(teacher_ckpt)["state_dict"].items()}
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", "train.epochs=1", "train.snapshots=0",
                                          f"distill.teacher_ckpt={teacher_ckpt}", "distill.hint_weight=1"])
    train(cfg, tmp_path / "hint", progress=False)
    row = json.loads((tmp_path / "hint" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train/ihd_hint"] > 0
    after = load_checkpoint(teacher_ckpt)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    s = load_checkpoint(tmp_path / "hint" / "last.pt")["state_dict"]
    base = load_checkpoint(out / "baseline" / "last.pt")["state_dict"]
    assert list(s) == list(base) and all(s[k].shape == base[k].shape for k in s)
    bad = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", "train.epochs=1", "model.name=ptv3",
                                          "model.preset=tiny", f"distill.teacher_ckpt={teacher_ckpt}",
                                          "distill.hint_weight=1"])
    with pytest.raises(HaskdError, match="hint levels differ"):
        train(bad, tmp_path / "bad", progress=False)
    # as many levels (5-stage PTv3) but another family: online hints would pair unrelated rows
    bad.model.preset = "base"
    with pytest.raises(HaskdError, match="needs one network family"):
        train(bad, tmp_path / "bad2", progress=False)


def test_ddp_distillation_with_hints_and_no_feature_term(pipeline_run, tiny_rooms, tmp_path):
    """torchrun, 2 CPU processes: CE + IHD (hints on, feature term off, as the CPU benchmark presets run it). The
    unused feature projector must not take part (DDP waits for every trainable parameter's gradient)."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    from haskd.bench.ddp import free_port

    out, _ = pipeline_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "haskd", "train", "--config", "scannet20_haskd", "--data", str(tiny_rooms), "--out", str(tmp_path / "d"),
           *PIPE, "train.epochs=2", "data.batch_size=1", "train.snapshots=0", "train.threads=1",  # >= 2 steps a rank
           f"distill.teacher_ckpt={out / 'teacher' / 'last.pt'}", "distill.feat_weight=0", "distill.hint_weight=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((tmp_path / "d" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train/ihd_hint"] > 0 and "train/ihd_feat" not in row


def test_teacher_in_the_expert_pool_routes_each_class_to_one_logit_source(pipeline_run, tiny_rooms, tmp_path):
    """distill.teacher_expert (ours): the pipeline's expert table carries the teacher's per-class val IoU; a teacher
    at least as good as every snapshot keeps every class (ASD is 0, IHD unchanged), one worse than every snapshot
    hands the classes the snapshots score to them (the IHD logit term drops those points, ASD takes them); a table
    without the teacher's row gets a one-line error."""
    from haskd.data.transforms import collate
    from haskd.distill.setup import build_distill_task
    from haskd.engine.evaluate import scene_sample
    from haskd.workflow.build import build_datasets
    from haskd.errors import HaskdError
    from haskd.models import build_from_config

    from haskd.cli import main

    out, _ = pipeline_run
    table = json.loads((out / "stage1" / "experts.json").read_text())
    teacher_iou = list(json.loads((out / "teacher" / "val_metrics.json").read_text())["per_class_iou"].values())
    assert table["teacher_iou"] == teacher_iou
    # the same row through the command
    assert main(["experts", "--run", str(out / "stage1"), "--data", str(tiny_rooms), "--teacher", str(out / "teacher"),
                 "--out", str(tmp_path / "cli.json"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "cli.json").read_text())["teacher_iou"] == teacher_iou
    assert main(["experts", "--run", str(out / "stage1"), "--data", str(tiny_rooms), "--teacher", str(tmp_path),
                 "--out", str(tmp_path / "bad.json"), "--device", "cpu"]) != 0  # no metrics there: one-line error
    # a table on other rooms (a split named 'sel' of another root, here the same val rooms): the teacher is
    # evaluated there instead of its val_metrics.json being used, and gives the same IoU on the same rooms
    other = tmp_path / "other_root"
    other.mkdir()
    (other / "sel").symlink_to(Path(tiny_rooms) / "val", target_is_directory=True)
    assert main(["experts", "--run", str(out / "stage1"), "--data", str(other), "--split", "sel", "--teacher",
                 str(out / "teacher"), "--out", str(tmp_path / "sel.json"), "--device", "cpu"]) == 0
    sel = json.loads((tmp_path / "sel.json").read_text())
    assert sel["split"] == "sel" and (out / "teacher" / "metrics_sel_other_root.json").is_file()
    assert [None if v is None else pytest.approx(v, abs=1e-9) for v in teacher_iou] == sel["teacher_iou"]
    base = [*PIPE, f"data.root={tiny_rooms}", f"distill.teacher_ckpt={out / 'teacher' / 'last.pt'}",
            "distill.asd_trust=none", "distill.trust=none"]
    torch.manual_seed(0)
    student = build_from_config(load_config("scannet20_haskd", base)).eval()

    def losses(t_iou, routed=True):
        p = tmp_path / f"experts_{t_iou}.json"
        p.write_text(json.dumps({**table, "teacher_iou": None if t_iou is None else [t_iou] * len(teacher_iou)}))
        cfg = load_config("scannet20_haskd", [*base, f"distill.experts={p}", f"distill.teacher_expert={routed}"])
        ds = build_datasets(cfg)
        task = build_distill_task(student, cfg, "cpu", ds["train"]).eval()
        s = ds["train"].scenes[0]
        with torch.no_grad():
            return task(collate([scene_sample(s, cfg.data.voxel_size, cfg.data.num_classes, True)]))[0]

    plain, best, worst = losses(0.5, routed=False), losses(2.0), losses(-1.0)
    assert best["asd"].item() == 0 and torch.allclose(best["ihd_logit"], plain["ihd_logit"])
    assert worst["ihd_logit"] < plain["ihd_logit"] and worst["asd"] > 0
    assert worst["asd"] <= plain["asd"] + 1e-6  # same normaliser, fewer points
    with pytest.raises(HaskdError, match="teacher's per-class IoU"):
        losses(None)


def test_cached_hints_equal_online_hints_on_an_unaugmented_batch(pipeline_run, tiny_rooms, tmp_path):
    """distill.hint_cache: the teacher's per-level hints read from the cache (per level-l voxel of the unaugmented
    scene, averaged over each student voxel's points) are the online hints on an unaugmented batch, level for level;
    an augmented, cropped training run with them trains and writes the hint cache in its own folder."""
    from haskd.data.transforms import collate
    from haskd.distill.hints import run_with_hints
    from haskd.distill.setup import build_distill_task
    from haskd.engine.evaluate import scene_sample
    from haskd.workflow.build import build_datasets
    from haskd.workflow.train import train
    from haskd.models import build_from_config

    out, _ = pipeline_run
    teacher = out / "teacher" / "last.pt"
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", f"distill.teacher_ckpt={teacher}",
                                          "distill.hint_weight=1"])
    torch.manual_seed(0)
    student = build_from_config(cfg).eval()
    targets, losses = {}, {}
    for cached in (True, False):
        cfg.distill.hint_cache = cached
        ds = build_datasets(cfg)
        torch.manual_seed(1)
        task = build_distill_task(student, cfg, "cpu", ds["train"]).eval()
        assert (task.targets["hints"].cache is not None) == cached
        scenes = ds["train"].scenes[:2]
        batch = collate([scene_sample(s, cfg.data.voxel_size, cfg.data.num_classes, cfg.data.use_normal)
                         for s in scenes])
        with torch.no_grad():
            _, tap = run_with_hints(student, batch)
            targets[cached] = task.targets["hints"](batch, tap.coords, tap.strides)
            losses[cached], _ = task(batch)
    assert len(targets[True]) == len(targets[False]) == len(student.hint_dims)
    for a, b in zip(targets[True], targets[False]):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-2)  # float16 storage
    assert torch.allclose(losses[True]["ihd_hint"], losses[False]["ihd_hint"], rtol=1e-2, atol=1e-4)
    run = tmp_path / "cached_hints"
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", f"distill.teacher_ckpt={teacher}",
                                          "distill.hint_weight=1", "distill.hint_cache=true", "train.epochs=1",
                                          "train.snapshots=0", "data.max_voxels=400"])
    train(cfg, run, progress=False)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train/ihd_hint"] > 0
    assert list((out / "teacher").glob("soft_labels_teacher_hints_*/manifest.json"))


def test_hint_cache_over_rotations_is_the_mean_of_the_rotated_views(pipeline_run, tiny_rooms, tmp_path):
    """distill.hint_cache_views = K: each cached level is the mean over K z-rotations of the scene, every view's
    per-point features averaged into the unrotated scene's voxels of that level (checked against a per-point
    gather + voxel mean), in a folder of its own."""
    import numpy as np

    from haskd.distill.cache import build_hint_cache, gather_to_voxels, load_scene_cache, scene_outputs
    from haskd.engine.checkpoint import load_model
    from haskd.workflow.build import build_datasets

    out, _ = pipeline_run
    teacher, tcfg = load_model(out / "teacher" / "last.pt", return_config=True)
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}"])
    ds = build_datasets(cfg, splits=("train",))["train"]
    ds.scenes = ds.scenes[:1]
    bb = teacher.backbone.eval()
    d = build_hint_cache(bb, ds, cfg, "cpu", tmp_path / "h3", views=3)
    c = load_scene_cache(d, ds.scenes[0].name)
    views = [scene_outputs(bb, ds.scenes[0], cfg, "cpu", hint_model=bb, angle=2 * np.pi * k / 3) for k in range(3)]
    for lvl, (f0, r0) in enumerate(views[0]["hints"]):
        per_point = torch.stack([v["hints"][lvl][0][v["hints"][lvl][1]] for v in views]).mean(0)  # (P, D)
        expect = gather_to_voxels(per_point, r0, f0.shape[0])
        got = torch.from_numpy(c[f"hint{lvl}"]).float()
        assert torch.equal(torch.from_numpy(c[f"hint_rows{lvl}"]).long(), r0)
        assert torch.allclose(got, expect, rtol=1e-2, atol=2e-3), lvl
        if lvl == len(views[0]["hints"]) - 1:  # the views differ (no rotation-equivariant net): the mean moved
            assert not torch.allclose(got, f0, rtol=1e-2, atol=2e-3)


def test_hint_cache_over_augmented_views_holds_the_online_hints_of_the_training_batches(pipeline_run, tiny_rooms,
                                                                                       tmp_path):
    """distill.hint_cache_augs = K: epoch e draws the samples of epoch e mod K, and the cached hints of a training
    sample are the teacher's 3D branch run on it, level for level, to the bit (float32 storage); on a batch of two
    augmented, cropped samples too (to float16 rounding with hint_cache_augs_half); a batch the cache does not hold
    is refused in one line; a run trains with them."""
    from haskd.data.transforms import collate
    from haskd.distill.hints import run_with_hints
    from haskd.distill.setup import build_distill_task
    from haskd.engine.checkpoint import load_model
    from haskd.errors import HaskdError
    from haskd.models import build_from_config
    from haskd.workflow.build import build_datasets
    from haskd.workflow.train import train

    out, _ = pipeline_run
    teacher = out / "teacher" / "last.pt"
    over = [*PIPE, f"data.root={tiny_rooms}", f"distill.teacher_ckpt={teacher}", "distill.hint_weight=1",
            "distill.hint_cache=true", "distill.hint_cache_augs=2", "data.max_voxels=400"]
    cfg = load_config("scannet20_haskd", over)
    torch.manual_seed(0)
    student = build_from_config(cfg).eval()
    train_set = build_datasets(cfg, splits=("train",))["train"]
    task = build_distill_task(student, cfg, "cpu", train_set).eval()
    assert train_set.views == 2
    branch = load_model(teacher).backbone.eval()
    half = build_distill_task(student, load_config("scannet20_haskd", [*over, "distill.hint_cache_augs_half=true"]),
                              "cpu", train_set)

    def both(task, batch):
        with torch.no_grad():
            _, tap = run_with_hints(student, batch)
            return task.targets["hints"](batch, tap.coords, tap.strides), run_with_hints(branch, batch)[1].feats

    grids = []
    for epoch in range(3):
        train_set.set_epoch(epoch)
        cached, online = both(task, collate([train_set[1]]))
        assert len(cached) == len(online) == len(student.hint_dims)
        assert all(torch.equal(a, b) for a, b in zip(cached, online))
        batch = collate([train_set[0], train_set[1]])
        assert batch["draw"] == [(epoch % 2, 0), (epoch % 2, 1)]
        grids.append(batch["grid_coord"])
        for t, tol in ((task, 1e-5), (half, 1e-2)):
            cached, online = both(t, batch)
            for a, b in zip(cached, online):
                assert a.shape == b.shape
                assert torch.allclose(a, b, rtol=tol, atol=tol)
    assert torch.equal(grids[0], grids[2]) and not torch.equal(grids[0], grids[1])
    other = build_datasets(load_config("scannet20_haskd", [*over, "train.seed=5"]), splits=("train",))["train"]
    other.views = 2
    batch = collate([other[0]])
    with torch.no_grad():
        _, tap = run_with_hints(student, batch)
        with pytest.raises(HaskdError, match="does not hold the student's voxels"):
            task.targets["hints"](batch, tap.coords, tap.strides)
        batch.pop("draw")
        with pytest.raises(HaskdError, match="does not say which augmented view"):
            task.targets["hints"](batch, tap.coords, tap.strides)
    run = tmp_path / "aug_hints"
    train(load_config("scannet20_haskd", [*over, "train.epochs=1", "train.snapshots=0"]), run, progress=False)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train/ihd_hint"] > 0
    for kind in ("2aug", "2aug_half"):
        assert len(list((out / "teacher").glob(f"soft_labels_teacher_hints_{kind}_seed0_*/*.npz"))) == 2 * len(train_set)


def test_ablate_jobs_gives_the_sequential_tables(tiny_rooms, tmp_path):
    """`haskd ablate --jobs 2`: two seeds trained in two processes; each seed's row values are those of that seed
    run alone in this process with the same threads, number for number."""
    from haskd.cli import main
    from haskd.workflow.pipeline import run_ablation

    over = [*PIPE, "train.epochs=1", "train.snapshots=1", "train.threads=1"]
    assert main(["ablate", "--config", "scannet20_haskd", "--data", str(tiny_rooms), "--out", str(tmp_path / "par"),
                 "--seeds", "0,1", "--jobs", "2", *over]) == 0
    assert (tmp_path / "par" / "seed1" / "ablate.log").is_file()
    cfg = load_config("scannet20_haskd", [*over, f"data.root={tiny_rooms}"])
    seq = run_ablation(cfg, tmp_path / "seq", seeds=(1,), progress=False)  # one seed alone, in this process
    par = json.loads((tmp_path / "par" / "ablation.json").read_text())
    assert par["seeds"] == [0, 1]
    # each process wrote its one-seed table in its seed folder, never over the table of all seeds
    assert json.loads((tmp_path / "par" / "seed1" / "ablation.json").read_text())["seeds"] == [1]
    for part in ("rows", "teacher"):
        for r, v in seq[part].items():
            assert par[part][r]["miou"][1] == v["miou"][0], r


# ------------------------------------------------------------------------------------------ the report (issue 21)
class _Page:
    """The parts of report.html the structure tests look at (stdlib HTML parser)."""

    def __init__(self, text):
        from html.parser import HTMLParser

        page = self
        self.imgs, self.sections, self.frames_rows, self.views = [], [], 0, []
        self.text = text

        class P(HTMLParser):
            stack, in_frames, cur_view = [], False, None

            def handle_starttag(self, tag, attrs):
                a = dict(attrs)
                if tag == "h2":
                    page.sections.append({"imgs": [], "what": 0, "title": ""})
                if tag == "img":
                    page.imgs.append(a["src"])
                    if page.sections:
                        page.sections[-1]["imgs"].append(a["src"])
                    if self.cur_view is not None:
                        self.cur_view["img"] = a["src"]
                if tag == "p" and a.get("class") == "what" and page.sections:
                    page.sections[-1]["what"] += 1
                if tag == "div" and a.get("class") == "view":
                    self.cur_view = {"img": None, "legend": 0}
                    page.views.append(self.cur_view)
                if tag == "div" and a.get("class") == "item" and self.cur_view is not None:
                    self.cur_view["legend"] += 1
                if tag == "th" and a.get("class") is None:
                    pass
                if tag == "tr" and page.sections and "Frames" in page.sections[-1]["title"]:
                    page.frames_rows += 1

            def handle_data(self, data):
                if self.lasttag == "h2" and page.sections:
                    page.sections[-1]["title"] += data

        P().feed(text)


def test_report_explains_itself(pipeline_run, tiny_rooms):
    """report.html: every image exists; a class legend beside every top-down view, whose panels include the teacher;
    a 'what this shows' line in every section with a figure; the chosen-frames list complete (one row per room of
    frames.json, header excluded); percent units; the expert heatmap explained in words that name the teacher."""
    from haskd.data.scene import load_scene

    out, summary = pipeline_run
    text = (out / "report.html").read_text()
    page = _Page(text)
    assert page.imgs and all((out / src).is_file() for src in page.imgs), page.imgs
    assert page.views and all(v["img"] and v["legend"] >= 2 for v in page.views)  # a class + unlabelled at least
    gt = load_scene(Path(tiny_rooms) / "val" / "synth_val_0000").segment
    assert page.views[0]["legend"] >= len(set(gt[gt >= 0].tolist()))  # every true class in the key
    assert "left to right: ground truth, teacher (+ images), baseline, HAS-KD student" in text
    for sec in page.sections:
        if sec["imgs"]:
            assert sec["what"] >= 1, sec["title"]
    chosen = json.loads((out / "teacher" / "frames.json").read_text())
    assert page.frames_rows == len(chosen) + 1
    assert "model (val, every point, %)" in text and "All numbers are percentages" in text
    what = text[text.index("Snapshot experts"):]
    assert "teacher" in what[:what.index("Frames chosen")].split("What this shows")[1]


def test_frames_list_folds_but_never_truncates(tmp_path):
    """A run with many rooms lists every one of them (folded in <details> that says how many)."""
    from types import SimpleNamespace

    from haskd.workflow.report import _frames_section

    (tmp_path / "teacher").mkdir()
    chosen = {f"room{i:03d}": ["00001", "00002"] for i in range(40)}
    (tmp_path / "teacher" / "frames.json").write_text(json.dumps(chosen))
    cfg = SimpleNamespace(teacher=SimpleNamespace(frame_policy="iof", num_frames=2))
    html = "\n".join(_frames_section(tmp_path, cfg, [], tmp_path, num_scenes=2))
    assert "<summary>all 40 rooms</summary>" in html
    assert html.count("<tr>") == 41 and all(name in html for name in chosen)


def _chromium():
    import shutil

    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_report_images_load_in_headless_chromium(pipeline_run):
    """Open report.html in headless Chromium: every <img> decodes (naturalWidth > 0) once the page has loaded."""
    import re
    import subprocess

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium; `make setup-test` tries)")
    out, _ = pipeline_run
    probe = ("<script>window.addEventListener('load', () => { const r = [...document.images].map(i => "
             "[i.getAttribute('src'), i.complete, i.naturalWidth]); const p = document.createElement('pre'); "
             "p.id = 'probe'; p.textContent = JSON.stringify(r); document.body.appendChild(p); });</script>")
    page = out / "report_probe.html"  # beside report.html: the same relative image paths
    page.write_text((out / "report.html").read_text().replace("</body>", probe + "</body>"))
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                        "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert m, (r.returncode, r.stderr[-2000:])
    import html as _html

    imgs = json.loads(_html.unescape(m.group(1)))
    assert len(imgs) == (out / "report.html").read_text().count("<img ")
    missing = [src for src, complete, width in imgs if not complete or width == 0]
    assert imgs and not missing, missing


def test_readme_predict_example_runs_as_written(pipeline_run, shared_data, tmp_path, capsys):
    """The README's `haskd prepare sample-ply` and `haskd predict` lines, run word for word from a folder beside
    ../shared/data with a student at runs/haskd/student/last.pt (the tiny pipeline's)."""
    import os
    import shlex

    import numpy as np

    from conftest import REPO
    from haskd.cli import main

    out, _ = pipeline_run
    readme = (REPO / "README.md").read_text()
    lines = [ln.split("#")[0].strip() for ln in readme.splitlines()]
    cut = next(ln for ln in lines if ln.startswith("haskd prepare sample-ply"))
    predict = next(ln for ln in lines if ln.startswith("haskd predict"))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data, target_is_directory=True)
    cwd = tmp_path / "work"
    (cwd / "runs" / "haskd" / "student").mkdir(parents=True)
    (cwd / "runs" / "haskd" / "student" / "last.pt").symlink_to(out / "student" / "last.pt")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(shlex.split(cut)[1:]) == 0
        capsys.readouterr()
        assert main(shlex.split(predict)[1:]) == 0
    finally:
        os.chdir(old)
    printed = capsys.readouterr().out
    name = Path(next(a for a in shlex.split(predict) if a.endswith(".ply"))).stem
    preds = cwd / "preds"
    labels = np.load(preds / f"{name}_labels.npy")
    assert 1000 <= labels.size <= 20000 and (preds / f"{name}_pred.ply").is_file()
    counts = [int(m.replace(",", "")) for m in __import__("re").findall(r"([\d,]+) points +[\d.]+%", printed)]
    assert sum(counts) == labels.size  # the per-class counts are printed and add up


def test_pipeline_logs_stage_lines(pipeline_run, tiny_rooms, caplog):
    """The overall progress line before each stage: stage i/n, elapsed, estimate (none before anything ran)."""
    import logging
    import re

    out, _ = pipeline_run
    caplog.set_level(logging.INFO)
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}"])
    run_pipeline(cfg, out, progress=False, report=False)
    stages = [re.fullmatch(r"stage (\d)/5 (\w+): elapsed [\dms ]+, (.*)", m).groups() for m in caplog.messages
              if m.startswith("stage ")]
    assert [(i, n) for i, n, _ in stages] == [("1", "teacher"), ("2", "baseline"), ("3", "stage1"), ("4", "experts"),
                                              ("5", "student")]
    assert all(tail == "estimate after the first stage" for _, _, tail in stages)  # every stage was skipped
    assert any(m.startswith("5/5 stages done in") for m in caplog.messages)


def test_no_snapshot_expert_keeps_stage1(pipeline_run, tiny_rooms, tmp_path, caplog):
    """An expert table that gives every class to the teacher: the final student is stage 1, not a second copy."""
    import logging
    import shutil

    src, _ = pipeline_run
    out = tmp_path / "pipe"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("student", "summary.json", "report*"))
    exp = out / "stage1" / "experts.json"
    table = json.loads(exp.read_text())
    table["teacher_iou"] = [1.0] * len(table["teacher_iou"])  # hand-made: the teacher beats every snapshot
    exp.write_text(json.dumps(table))
    caplog.set_level(logging.INFO)
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", "distill.teacher_expert=true"])
    summary = run_pipeline(cfg, out, progress=False, report=False)
    assert not (out / "student").exists()
    assert summary["student"]["ckpt"] == str(out / "stage1" / "last.pt")
    stage1 = json.loads((out / "stage1" / "val_metrics.json").read_text())
    assert summary["student"]["metrics"]["miou"] == stage1["miou"]
    assert "teacher is the expert of every class" in json.loads((out / "summary.json").read_text())[
        "student_is_stage1"]
    lines = [r.getMessage() for r in caplog.records if "not trained" in r.getMessage()]
    assert len(lines) == 1 and "final student is stage 1" in lines[0]


def test_ablation_markdown_names_rows_that_are_another_row():
    from haskd.workflow.pipeline import ablation_markdown

    row = lambda m: {"miou": [m], "mean": m, "std": 0.0, "per_class_iou": [{}]}
    table = {"seeds": [0], "split": "val", "rows": {"baseline": row(50.0), "+IHD (IOF)": row(55.0),
                                                    "HAS-KD": row(55.0)}, "teacher": {}}
    plain = ablation_markdown(table)
    assert "not a model of its own" not in plain
    table["same_as"] = {"HAS-KD": {"0": {"row": "+IHD (IOF)", "why": "x: the teacher is the expert of every class"}}}
    md = ablation_markdown(table)
    assert md.startswith(plain) and "HAS-KD is not a model of its own on seed(s) 0" in md
    assert "its row is the +IHD (IOF) row" in md


def test_ensemble_metrics_are_the_mean_of_the_snapshots(pipeline_run):
    """The M-snapshot ensemble scored on every val point: mean of the snapshots' per-point softmax, then the metric
    code of every model; one snapshot alone is that snapshot's own metrics."""
    from haskd.data.dataset import SceneDataset
    from haskd.engine.checkpoint import load_model
    from haskd.engine.evaluate import evaluate, predict_points
    from haskd.engine.metrics import ConfusionMatrix
    from haskd.workflow.runs import evaluate_ensemble, find_snapshots
    from haskd.workflow.runs import ensemble_metrics

    out, _ = pipeline_run
    snaps = find_snapshots(out / "stage1")
    got = ensemble_metrics(out / "stage1")
    assert (out / "stage1" / "metrics_val_ensemble.json").is_file() and len(got["members"]) == len(snaps) == 2
    models = [load_model(p, return_config=True) for p in snaps]
    cfg = models[0][1]
    ds = SceneDataset(cfg.data.root, "val", cfg.data.num_classes, cfg.data.voxel_size, use_normal=True)
    cm = ConfusionMatrix(ds.num_classes)
    for scene in ds.scenes:
        p = sum(predict_points(m, scene, ds.voxel_size, ds.num_classes, use_normal=True) for m, _ in models) / 2
        cm.update(p.argmax(1), torch.from_numpy(scene.segment))
    ref = cm.compute(list(got["per_class_iou"]))
    assert got["miou"] == pytest.approx(ref["miou"]) and got["allacc"] == pytest.approx(ref["allacc"])
    one = evaluate_ensemble(snaps[-1:], split="val")
    assert one["miou"] == pytest.approx(evaluate(models[-1][0], ds)["miou"])
    assert ensemble_metrics(out / "stage1") == got  # cached


def test_eval_ensemble_reports_the_snapshots_beside_the_checkpoint(pipeline_run, tmp_path, capsys):
    """`haskd eval --ensemble`: the checkpoint's metrics, and under "ensemble" the mean softmax of the snapshots
    beside it (the same numbers as ensemble_metrics); a run without snapshots is one line, no traceback."""
    from haskd.cli import main
    from haskd.workflow.runs import evaluate_ensemble, find_snapshots

    out, _ = pipeline_run
    js = tmp_path / "m.json"
    assert main(["eval", "--ckpt", str(out / "stage1" / "last.pt"), "--ensemble", "--out", str(js),
                 "--device", "cpu"]) == 0
    got = json.loads(js.read_text())
    ref = evaluate_ensemble(find_snapshots(out / "stage1"), split="val")
    assert got["ensemble"]["miou"] == pytest.approx(ref["miou"]) and got["ensemble"]["members"] == ref["members"]
    assert "ensemble of 2 snapshots" in capsys.readouterr().out
    assert main(["eval", "--ckpt", str(out / "student" / "last.pt"), "--ensemble", "--device", "cpu"]) == 2
    assert "no snapshots" in capsys.readouterr().err


def test_ablation_optional_rows(tiny_rooms, tmp_path, monkeypatch):
    """--ensemble / --image-control / --double-baseline / --equal-time-epochs add their rows after the five (which
    stay as they are), each from the run it names; no training here: the stages are replaced by stand-ins that
    record their configs."""
    import haskd.workflow.experts
    import haskd.workflow.pipeline as pl

    trained = {}

    def fake_metrics(miou):
        return {"miou": miou, "per_class_iou": {"wall": miou}}

    def fake_stage(name, cfg, run_dir, progress=True):
        trained[str(Path(run_dir).relative_to(tmp_path))] = cfg
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": e + 1, "epoch_time_s": 10.0 if cfg.distill.teacher_ckpt else 5.0}) + "\n"
            for e in range(cfg.train.epochs)))
        return fake_metrics(0.1 * len(trained))

    monkeypatch.setattr(pl, "run_stage", fake_stage)
    monkeypatch.setattr(pl, "eval_teacher_3d", lambda *a, **k: fake_metrics(0.9))
    monkeypatch.setattr(pl, "reuse_teacher", lambda *a, **k: fake_metrics(0.8))
    monkeypatch.setattr(pl, "_stale_table", lambda *a, **k: False)
    monkeypatch.setattr(pl, "ensemble_metrics", lambda run_dir, *a, **k: {**fake_metrics(0.77), "run": str(run_dir)})
    monkeypatch.setattr(haskd.workflow.experts, "asd_pointless", lambda *a, **k: None)
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", "teacher.train_frames=random"])
    plain = pl.run_ablation(cfg, tmp_path / "a", seeds=(0,), progress=False)
    assert list(plain["rows"]) == list(pl.ABLATION_ROWS) and "same_as" not in plain
    trained.clear()
    table = pl.run_ablation(cfg, tmp_path / "b", seeds=(0,), progress=False, ensemble=True, double_baseline=True,
                            equal_time_epochs=3, image_control=True)
    assert list(table["rows"]) == [*pl.ABLATION_ROWS, "M-snapshot ensemble", "+IHD (3D head: no image)",
                                   "baseline (2E)", "baseline (3 epochs)"]
    # the control is stage 1 but for its IHD target (the teacher's points-only head) and its snapshots
    control, stage1 = trained["b/seed0/stage1_3d"], trained["b/seed0/stage1"]
    assert control.distill.teacher_head == "3d" and stage1.distill.teacher_head == "fused"
    assert control.train.snapshots == 0 and stage1.train.snapshots > 0
    control.distill.teacher_head, control.train.snapshots = "fused", stage1.train.snapshots
    assert control == stage1
    assert table["rows"]["M-snapshot ensemble"]["mean"] == pytest.approx(77.0)
    assert trained["b/seed0/baseline_e4"].train.epochs == 4 and trained["b/seed0/baseline_e3"].train.epochs == 3
    base = trained["b/seed0/baseline"]
    for k in ("baseline_e4", "baseline_e3"):  # the baseline's recipe, only longer
        c = trained[f"b/seed0/{k}"]
        assert c.role == "student" and not c.distill.teacher_ckpt and c.train.snapshots == base.train.snapshots
        assert c.optim == base.optim and c.model == base.model
    md = (tmp_path / "b" / "ablation.md").read_text()
    assert "| M-snapshot ensemble | 77.00" in md and "| baseline (3 epochs) |" in md
    assert "+IHD (IOF) - +IHD (3D head: no image)" in md
    scored = []
    monkeypatch.setattr(pl, "split_metrics", lambda run_dir, *a, **k: scored.append(Path(run_dir).name)
                        or fake_metrics(0.25))
    on_test = pl.run_ablation(cfg, tmp_path / "b", seeds=(0,), progress=False, split="test", image_control=True)
    assert "stage1_3d" in scored and on_test["rows"]["+IHD (3D head: no image)"]["mean"] == pytest.approx(25.0)
    # training times: 2 epochs x 10 s (stage 1, the final student), 2 x 5 s (teacher, baseline), 3 x 5 s (equal
    # time); the student's path is stage 1 + the final student
    assert table["train_seconds"] == {pl.STUDENT_PATH: [40.0], "HAS-KD": [20.0], "teacher": [10.0],
                                      "baseline": [10.0], "baseline (3 epochs)": [15.0]}
    assert ("stage 1 + final, 40 s; final student (stage 2) 20 s (0.50x), teacher 10 s (0.25x), baseline 10 s "
            "(0.25x), baseline (3 epochs) 15 s (0.38x). The whole pipeline with its teacher is 5.00x") in md
    assert "train_seconds" not in plain
    # a longer baseline of the baseline's own epochs is that row, not a second run
    trained.clear()
    again = pl.run_ablation(cfg, tmp_path / "c", seeds=(0,), progress=False, equal_time_epochs=2)
    assert "c/seed0/baseline_e2" not in trained
    assert again["rows"]["baseline (2 epochs)"]["miou"] == again["rows"]["baseline"]["miou"]
    # equal time at 2E with --double-baseline: one row, "baseline (2E)", whose times are the equal-time ones
    both = pl.run_ablation(cfg, tmp_path / "b", seeds=(0,), progress=False, double_baseline=True, equal_time_epochs=4)
    assert list(both["rows"])[len(pl.ABLATION_ROWS):] == ["baseline (2E)"]
    assert both["train_seconds"]["baseline (2E)"] == [20.0] and "baseline (4 epochs)" not in both["train_seconds"]
    # an expert table with no snapshot class: HAS-KD is not trained, its row is +IHD (IOF), and the table says so
    monkeypatch.setattr(haskd.workflow.experts, "asd_pointless",
                        lambda path, *a: "no snapshot" if "stage1" in str(path) else None)
    trained.clear()
    kept = pl.run_ablation(cfg, tmp_path / "d", seeds=(0,), progress=False)
    assert "d/seed0/student" not in trained and "d/seed0/asd_only" in trained
    assert kept["rows"]["HAS-KD"]["miou"] == kept["rows"]["+IHD (IOF)"]["miou"]
    assert kept["same_as"] == {"HAS-KD": {"0": {"row": "+IHD (IOF)", "why": "no snapshot"}}}
    assert "HAS-KD is not a model of its own" in (tmp_path / "d" / "ablation.md").read_text()


def test_ablation_table_only_trains_nothing_and_names_the_rows_left_out(tiny_rooms, tmp_path, monkeypatch):
    """--table-only: the table of the finished runs; a row without one (here the final student and the control) is
    left out and named, the teacher's lead is still given, and nothing is trained or built."""
    import shutil

    import haskd.workflow.experts
    import haskd.workflow.pipeline as pl
    from haskd.errors import HaskdError

    trained = []

    def fake_stage(name, cfg, run_dir, progress=True):
        trained.append(Path(run_dir).name)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        m = {"miou": 0.5 + 0.01 * len(trained), "per_class_iou": {"wall": 0.5}}
        (Path(run_dir) / "val_metrics.json").write_text(json.dumps(m))
        (Path(run_dir) / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "epoch_time_s": 5.0}) + "\n")
        return m

    monkeypatch.setattr(pl, "run_stage", fake_stage)
    monkeypatch.setattr(pl, "_done", lambda run_dir, epochs: (Path(run_dir) / "val_metrics.json").is_file())
    monkeypatch.setattr(pl, "eval_teacher_3d", lambda *a, **k: {"miou": 0.4, "per_class_iou": {"wall": 0.4}})
    monkeypatch.setattr(pl, "reuse_teacher", lambda src, dst, *a, **k: fake_stage("reuse", None, dst))
    monkeypatch.setattr(pl, "_stale_table", lambda *a, **k: False)
    monkeypatch.setattr(haskd.workflow.experts, "asd_pointless", lambda *a, **k: None)
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", "teacher.train_frames=random"])
    full = pl.run_ablation(cfg, tmp_path, seeds=(0,), progress=False, image_control=True, equal_time_epochs=3)
    assert "train_seconds" in full
    (tmp_path / "seed0" / "uniform" / "teacher" / "frames.json").write_text("{}")  # what reuse_teacher leaves
    shutil.rmtree(tmp_path / "seed0" / "student")
    shutil.rmtree(tmp_path / "seed0" / "stage1_3d")
    trained.clear()
    monkeypatch.setattr(pl, "_stale_table", lambda *a, **k: pytest.fail("--table-only builds no expert table"))
    part = pl.run_ablation(cfg, tmp_path, seeds=(0,), progress=False, image_control=True, equal_time_epochs=3,
                           train=False)
    assert trained == []
    assert part["missing"] == {"HAS-KD": ["0"], "+IHD (3D head: no image)": ["0"]}
    assert set(part["rows"]) == set(full["rows"]) - {"HAS-KD", "+IHD (3D head: no image)"}
    for r in part["rows"]:
        assert part["rows"][r]["miou"] == full["rows"][r]["miou"]
    assert "train_seconds" not in part  # the student's path is not finished: no time ratios
    md = (tmp_path / "ablation.md").read_text()
    assert ("Not finished, so left out of this table (`haskd ablate --table-only`): HAS-KD (run 0); "
            "+IHD (3D head: no image) (run 0).") in md
    lead = full["teacher"]["teacher (IOF frames)"]["mean"] - full["rows"]["baseline"]["mean"]
    assert f"Teacher - baseline gap: {lead:+.2f} mIoU.\n" in md and "HAS-KD closes" not in md
    shutil.rmtree(tmp_path / "seed0" / "baseline")
    with pytest.raises(HaskdError, match="no finished baseline"):
        pl.run_ablation(cfg, tmp_path, seeds=(0,), progress=False, train=False)


def test_ablation_train_seeds_retrain_the_students_from_the_seeds_teacher(tiny_rooms, tmp_path, monkeypatch):
    """train_seeds=2: the students' rows are trained again with train.seed S+10 into seed<S>/train_seed<S+10>/, from
    seed S's teacher and their own stage 1's experts; the teachers are not retrained; each row labels its runs, and
    the reported split scores the retrained runs too. No training here: stand-ins record the configs."""
    import haskd.workflow.experts
    import haskd.workflow.pipeline as pl

    trained, scored = {}, []

    def fake_stage(name, cfg, run_dir, progress=True):
        trained[str(Path(run_dir).relative_to(tmp_path))] = cfg
        return {"miou": 0.5 + 0.01 * cfg.train.seed, "per_class_iou": {"wall": 0.5}}

    def fake_split(run_dir, split, root, device, **kw):
        scored.append(str(Path(run_dir).relative_to(tmp_path)))
        return {"miou": 0.25, "per_class_iou": {"wall": 0.25}}

    monkeypatch.setattr(pl, "run_stage", fake_stage)
    monkeypatch.setattr(pl, "split_metrics", fake_split)
    monkeypatch.setattr(pl, "eval_teacher_3d", lambda *a, **k: {"miou": 0.9, "per_class_iou": {"wall": 0.9}})
    monkeypatch.setattr(pl, "reuse_teacher", lambda *a, **k: {"miou": 0.8, "per_class_iou": {"wall": 0.8}})
    monkeypatch.setattr(pl, "_stale_table", lambda *a, **k: False)
    monkeypatch.setattr(haskd.workflow.experts, "asd_pointless", lambda *a, **k: None)
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", "teacher.train_frames=random"])
    table = pl.run_ablation(cfg, tmp_path / "a", seeds=(0, 1), progress=False, train_seeds=2)
    assert pl.train_seed_list(1, 3) == [1, 11, 21]
    # the rows the method's claims rest on first, so that an ablation cut short has them
    assert [k.split("/", 2)[2] for k in trained if k.startswith("a/seed0/") and "train_seed" not in k] == [
        "baseline", "teacher", "stage1", "student", "asd_only", "uniform/stage1"]
    for s, t in ((0, 10), (1, 11)):
        again = {k.split("/")[-1]: c for k, c in trained.items() if k.startswith(f"a/seed{s}/train_seed{t}/")}
        assert sorted(again) == ["asd_only", "baseline", "stage1", "student"]
        assert all(c.train.seed == t for c in again.values())
        teacher = str(tmp_path / "a" / f"seed{s}" / "teacher" / "last.pt")
        assert again["stage1"].distill.teacher_ckpt == again["student"].distill.teacher_ckpt == teacher
        assert again["student"].distill.experts == str(tmp_path / "a" / f"seed{s}" / f"train_seed{t}" / "stage1"
                                                       / "experts.json")
        assert again["baseline"].train.snapshots == trained[f"a/seed{s}/baseline"].train.snapshots > 0
    assert not [k for k in trained if "train_seed" in k and "teacher" in k.split("/")[-1]]
    for r in pl.RESEEDED_ROWS:
        assert table["rows"][r]["runs"] == ["0", "0/10", "1", "1/11"]
    assert table["rows"]["baseline"]["miou"] == pytest.approx([50.0, 60.0, 51.0, 61.0])
    assert table["rows"]["+IHD (uniform frames)"]["runs"] == ["0", "1"] and table["train_seeds"] == 2
    md = (tmp_path / "a" / "ablation.md").read_text()
    assert "| baseline (4 runs) | 55.50 +- 5.80 |" in md and "| +IHD (uniform frames) | 50.50" in md
    assert "HAS-KD - +IHD (IOF): +0.00 +- 0.00 (0 of 4 positive)" in md
    test = pl.run_ablation(cfg, tmp_path / "a", seeds=(0, 1), progress=False, train_seeds=2, split="test")
    assert {"a/seed0/train_seed10/student", "a/seed1/train_seed11/asd_only"} <= set(scored)
    assert not [k for k in scored if "train_seed" in k and ("teacher" in k or "uniform" in k)]
    assert test["rows"]["HAS-KD"]["miou"] == [25.0] * 4 and len(test["teacher"]["teacher (IOF frames)"]["miou"]) == 2


def test_asd_source_baseline_gives_the_final_student_the_baselines_snapshots(tiny_rooms, tmp_path):
    """distill.asd_source=baseline: the final student's experts are the baseline run's table, the baseline saves
    snapshots for it, and a pipeline without its baseline says so in one line; the default stays stage 1's."""
    from haskd.errors import HaskdError
    from haskd.workflow.pipeline import run_pipeline, stage_configs

    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", "train.snapshots=0"])
    plain = stage_configs(cfg, tmp_path)
    assert plain["student"].distill.experts == str(tmp_path / "stage1" / "experts.json")
    assert plain["baseline"].train.snapshots == 0
    cfg.distill.asd_source = "baseline"
    c = stage_configs(cfg, tmp_path)
    assert c["student"].distill.experts == str(tmp_path / "baseline" / "experts.json")
    assert c["baseline"].train.snapshots == 5 and c["stage1"].train == plain["stage1"].train
    assert stage_configs(cfg, tmp_path, {"asd": False})["baseline"].train.snapshots == 0
    with pytest.raises(HaskdError, match="asd_source=baseline"):
        run_pipeline(cfg, tmp_path / "p", with_baseline=False, progress=False, report=False)
    # the pipeline: no stage 1 (the final student needs only the baseline's snapshots and the teacher)
    cfg.train.snapshots = 2
    summary = run_pipeline(cfg, tmp_path / "p", progress=False, report=False)
    assert not (tmp_path / "p" / "stage1").exists() and summary["student"]["ckpt"].endswith("student/last.pt")
    assert json.loads((tmp_path / "p" / "baseline" / "experts.json").read_text())["teacher_iou"]
    used = load_checkpoint(tmp_path / "p" / "student" / "last.pt")["config"]["distill"]["experts"]
    assert used == str(tmp_path / "p" / "baseline" / "experts.json")


def test_ablation_markdown_pairs_rows_by_run():
    """'vs baseline' and the paired line match values by run label, not by position; hand-computed."""
    from haskd.workflow.pipeline import ablation_markdown, paired_deltas

    row = lambda runs, v: {"miou": v, "runs": runs, "mean": sum(v) / len(v), "std": 0.0, "per_class_iou": [{}] * len(v)}
    table = {"seeds": [0, 1], "split": "val", "train_seeds": 2,
             "rows": {"baseline": row(["0", "0/10", "1", "1/11"], [50.0, 40.0, 60.0, 70.0]),
                      "+IHD (IOF)": row(["0", "0/10", "1", "1/11"], [52.0, 41.0, 59.0, 74.0]),
                      "HAS-KD": row(["1/11", "0"], [75.0, 51.0])},
             "teacher": {"teacher (IOF frames)": row(["0", "1"], [58.0, 63.0])}}
    assert paired_deltas(table, "HAS-KD", "+IHD (IOF)") == [1.0, -1.0]
    assert paired_deltas(table, "teacher (IOF frames)", "baseline") == [8.0, 3.0]
    assert paired_deltas(table, "+ASD only", "baseline") == []
    md = ablation_markdown(table)
    # IHD: +2, +1, -1, +4 -> mean 1.5, std sqrt(((0.5)^2 + 0.5^2 + 2.5^2 + 2.5^2) / 3) = 2.08
    assert "+IHD (IOF) - baseline: +1.50 +- 2.08 (3 of 4 positive)" in md
    assert "HAS-KD - +IHD (IOF): +0.00 +- 1.41 (1 of 2 positive)" in md
    assert "| teacher (IOF frames) | 60.50 +- 0.00 | +5.50 |" in md  # paired with its own seeds' baselines
    assert "| HAS-KD (2 runs) | 63.00 +- 0.00 | +3.00 |" in md  # 75 - 70 and 51 - 50
    assert "Teacher - baseline gap: +5.50 mIoU; HAS-KD closes 55% of it (+3.00)." in md


def test_image_trust_cached_and_online_agree(pipeline_run, tiny_rooms):
    """distill.trust=image / image_soft / image_shift through the real task: the cache holds the teacher's image
    rules per point (from its fused and 3D-branch heads), and on an unaugmented batch the cached IHD terms equal the
    online ones."""
    from haskd.distill.cache import read_manifest
    from haskd.data.transforms import collate
    from haskd.distill.setup import build_distill_task
    from haskd.engine.evaluate import scene_sample
    from haskd.workflow.build import build_datasets
    from haskd.models import build_from_config

    out, _ = pipeline_run
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}",
                                          f"distill.teacher_ckpt={out / 'teacher' / 'last.pt'}"])
    torch.manual_seed(0)
    student = build_from_config(cfg).eval()
    losses, rules = {}, {}
    from haskd.distill.ihd import IMAGE_RULE_KEYS

    for trust in ("image", "image_soft", "image_shift"):
        for cache in (True, False):
            cfg.distill.cache, cfg.distill.trust = cache, trust
            ds = build_datasets(cfg)
            torch.manual_seed(1)
            task = build_distill_task(student, cfg, "cpu", ds["train"]).eval()
            if cache:
                manifest = read_manifest(task.targets["teacher"].cache.cache_dir)
                assert manifest["has_image_right"] is True and manifest["has_shift"] is True
            sample = scene_sample(ds["train"].scenes[0], cfg.data.voxel_size, cfg.data.num_classes,
                                  cfg.data.use_normal)
            if not cache:
                sample["frames"] = ds["train"].frames_of(0)
            batch = collate([sample])
            with torch.no_grad():
                losses[trust, cache], _ = task(batch)
                t = task.targets["teacher"](batch)
                rules[trust, cache] = t[IMAGE_RULE_KEYS[trust]]
        # per point vs per voxel labels (a voxel of mixed classes) and float16 storage: close, not equal
        assert torch.allclose(rules[trust, True], rules[trust, False], atol=2e-2), trust
        for k in ("ihd_logit", "ihd_feat"):
            assert torch.allclose(losses[trust, True][k], losses[trust, False][k], rtol=2e-2, atol=2e-3), (trust, k)
    assert rules["image_soft", True].sum() > 0  # the images add something somewhere: the soft rule is not all 0
    # no label in it: two heads that differ at all differ a little almost everywhere, unlike image_right's 0/1
    assert (rules["image_shift", True] > 0).float().mean() > 0.5


def test_ablate_row_flags_reach_the_seed_processes():
    from haskd.cli import build_parser
    from haskd.commands.pipeline import _extra_row_flags

    p = build_parser()
    assert _extra_row_flags(p.parse_args(["ablate"])) == []
    args = p.parse_args(["ablate", "--ensemble", "--double-baseline", "--equal-time-epochs", "7", "--train-seeds", "3",
                         "--image-control"])
    flags = _extra_row_flags(args)
    assert flags == ["--ensemble", "--image-control", "--double-baseline", "--train-seeds", "3",
                     "--equal-time-epochs", "7"]
    again = p.parse_args(["ablate", *flags])  # what a seed process parses
    assert (again.ensemble, again.double_baseline, again.equal_time_epochs, again.train_seeds,
            again.image_control) == (True, True, 7, 3, True)


def test_baseline_beside_the_teacher_gives_the_sequential_runs(tiny_rooms, tmp_path, caplog):
    """train.parallel_stages: the baseline trains in its own process while the teacher trains; both runs are those
    of the stages run one after the other with the same threads, number for number."""
    import logging

    over = [*PIPE, f"data.root={tiny_rooms}", "train.epochs=1", "train.threads=1"]
    with caplog.at_level(logging.INFO, logger="haskd"):
        par = run_pipeline(load_config("scannet20_haskd", over), tmp_path / "par", variant={"asd": False},
                           progress=False, report=False)
    assert "in its own process beside the teacher" in caplog.text
    seq = run_pipeline(load_config("scannet20_haskd", [*over, "train.parallel_stages=false"]), tmp_path / "seq",
                       variant={"asd": False}, progress=False, report=False)
    for k in ("teacher", "baseline", "student"):
        assert par[k]["metrics"] == seq[k]["metrics"], k
    for k in ("teacher", "baseline"):
        a = load_checkpoint(tmp_path / "par" / k / "last.pt")["state_dict"]
        b = load_checkpoint(tmp_path / "seq" / k / "last.pt")["state_dict"]
        assert all(torch.equal(a[n], b[n]) for n in a), k


def test_teacher_cache_has_a_folder_per_content_so_no_run_reads_one_without_what_it_needs(pipeline_run, tiny_rooms):
    """A run with the feature term after one without it on the same teacher gets the teacher's features (a cache
    without them was once reused, and the term silently dropped); sparse labels (data.labeled_points) get their own
    image rules."""
    from haskd.data.transforms import collate
    from haskd.distill.setup import build_distill_task
    from haskd.models import build_from_config
    from haskd.workflow.build import build_datasets

    out, _ = pipeline_run
    teacher = out / "teacher" / "last.pt"
    over = [*PIPE, f"data.root={tiny_rooms}", f"distill.teacher_ckpt={teacher}", "distill.cache=true",
            "distill.hint_weight=0"]
    targets = {}
    for name, more in (("plain", ["distill.feat_weight=0"]), ("feat", ["distill.feat_weight=1"]),
                       ("sparse", ["distill.feat_weight=0", "data.labeled_points=30"])):
        cfg = load_config("scannet20_haskd", [*over, *more])
        train_set = build_datasets(cfg, splits=("train",))["train"]
        task = build_distill_task(build_from_config(cfg), cfg, "cpu", train_set)
        targets[name] = task.targets["teacher"](collate([train_set[0]]))
    assert "feat" not in targets["plain"] and targets["feat"]["feat"].shape[0] == targets["feat"]["probs"].shape[0]
    assert torch.allclose(targets["plain"]["probs"], targets["feat"]["probs"], atol=1e-3)
    assert {"soft_labels_teacher_feat_train_v0.1", "soft_labels_teacher_labels30_train_v0.1",
            "soft_labels_teacher_train_v0.1"} <= {p.name for p in teacher.parent.glob("soft_labels_teacher*")}


def test_teacher_head_targets_come_from_the_chosen_heads(pipeline_run, tiny_rooms, caplog):
    """distill.teacher_head: classwise takes each class from the head with the higher val IoU (both evaluations
    kept beside the teacher), 3d from the 3D branch alone; each gets its own cache folder."""
    import json
    import logging

    from haskd.data.transforms import collate
    from haskd.distill.ihd import classwise_heads
    from haskd.distill.setup import build_distill_task
    from haskd.models import build_from_config
    from haskd.workflow.build import build_datasets
    from haskd.workflow.runs import teacher_heads

    out, _ = pipeline_run
    teacher = out / "teacher" / "last.pt"
    over = [*PIPE, f"data.root={tiny_rooms}", f"distill.teacher_ckpt={teacher}", "distill.cache=true",
            "distill.hint_weight=0", "distill.feat_weight=0"]
    probs, heads = {}, {}
    for head in ("fused", "3d", "classwise"):
        cfg = load_config("scannet20_haskd", [*over, f"distill.teacher_head={head}"])
        with caplog.at_level(logging.INFO, logger="haskd"):
            heads[head] = teacher_heads(cfg)
        train_set = build_datasets(cfg, splits=("train",))["train"]
        task = build_distill_task(build_from_config(cfg), cfg, "cpu", train_set, teacher_heads=heads[head])
        probs[head] = task.targets["teacher"](collate([train_set[0]]))["probs"]
    assert heads["fused"] is None and heads["3d"] == [False] * 20
    fused = json.loads((out / "teacher" / "metrics_val.json").read_text())["per_class_iou"]
    branch = json.loads((out / "teacher" / "metrics_val_3d.json").read_text())["per_class_iou"]
    assert heads["classwise"] == classwise_heads(list(fused.values()), list(branch.values()))
    assert "distill.teacher_head=classwise" in caplog.text
    assert not torch.allclose(probs["fused"], probs["3d"])
    cw = "".join("f3"[not h] for h in heads["classwise"])
    assert {"soft_labels_teacher_train_v0.1", f"soft_labels_teacher_head{'3' * 20}_train_v0.1",
            f"soft_labels_teacher_head{cw}_train_v0.1"} <= {p.name for p in teacher.parent.glob("soft_labels_*")}


def test_teacher_keeps_the_baseline_as_its_frozen_3d_branch(pipeline_run, tiny_rooms, tmp_path, capsys):
    """teacher.init_3d=baseline + teacher.freeze_3d: the pipeline trains its baseline first and the teacher's 3D
    branch is that network, tensor for tensor (BatchNorm statistics included) after the teacher's epochs, so its 3D
    head is the baseline's; the fused head trains. Without the freeze the same start moves. A bad use is one line."""
    import shutil

    from haskd.cli import main
    from haskd.errors import HaskdError
    from haskd.workflow.pipeline import stage_configs

    src, _ = pipeline_run
    out = tmp_path / "pipe"
    shutil.copytree(src / "baseline", out / "baseline")  # finished: the pipeline keeps it and starts from it
    base = load_checkpoint(out / "baseline" / "last.pt")["state_dict"]
    opts = [*PIPE, f"data.root={tiny_rooms}", "teacher.init_3d=baseline", "teacher.freeze_3d=true"]
    cfg = load_config("scannet20_haskd", opts)
    assert stage_configs(cfg, out)["teacher"].teacher.init_3d == str(out / "baseline" / "last.pt")
    run_pipeline(cfg, out, variant={"asd": False}, progress=False, report=False)
    t = load_checkpoint(out / "teacher" / "last.pt")["state_dict"]
    assert all(torch.equal(t["backbone." + k], v) for k, v in base.items())
    first = load_config("scannet20_haskd", [*opts[:-1], "train.epochs=1", "role=teacher",
                                            f"teacher.init_3d={out / 'baseline' / 'last.pt'}"])
    from haskd.workflow.train import train

    train(first, tmp_path / "moving", progress=False)
    moved = load_checkpoint(tmp_path / "moving" / "last.pt")["state_dict"]
    assert not all(torch.equal(moved["backbone." + k], v) for k, v in base.items())
    from haskd.engine.trainer import seed_everything
    from haskd.models import build_from_config

    seed_everything(cfg.train.seed)  # as train() does before it builds: the teacher's first weights
    start = build_from_config(stage_configs(cfg, out)["teacher"]).state_dict()
    fused = [k for k in t if k.startswith(("fusion.", "classifier."))]
    assert fused and not any(torch.equal(t[k], start[k]) for k in fused)  # the fused head did train
    with pytest.raises(HaskdError, match="drop --no-baseline"):
        run_pipeline(cfg, tmp_path / "nob", with_baseline=False, progress=False, report=False)
    with pytest.raises(HaskdError, match="teacher.freeze_3d needs teacher.init_3d"):
        load_config("scannet20_haskd", [*PIPE, "teacher.freeze_3d=true"])
    rc = main(["train", "--config", "scannet20_haskd", "--data", str(tiny_rooms), "--out", str(tmp_path / "cli"),
               *[o for o in opts if not o.startswith("data.root")], "role=teacher"])
    err = capsys.readouterr().err
    assert rc != 0 and "teacher.init_3d=baseline names the pipeline's own baseline run" in err
    assert "Traceback" not in err and not (tmp_path / "cli").exists()


def test_faded_kd_weight_reaches_the_run_and_bad_values_are_one_line_errors(pipeline_run, tiny_rooms, tmp_path):
    """distill.kd_fade=linear through `haskd train`: each epoch's record holds the scale of its last step, 1 - s/S
    for step s of S; a bad rule or end is refused when the config is read."""
    from haskd.errors import HaskdError
    from haskd.workflow.train import train

    out, _ = pipeline_run
    over = [*PIPE, f"data.root={tiny_rooms}", "train.snapshots=0",
            f"distill.teacher_ckpt={out / 'teacher' / 'last.pt'}"]
    train(load_config("scannet20_haskd", [*over, "distill.kd_fade=linear"]), tmp_path / "fade", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "fade" / "metrics.jsonl").read_text().splitlines()]
    total = rows[-1]["step"]
    assert [r["kd_scale"] for r in rows] == [pytest.approx(1 - (r["step"] - 1) / total) for r in rows]
    with pytest.raises(HaskdError, match="kd_fade_end"):
        load_config("scannet20_haskd", [*over, "distill.kd_fade=cosine", "distill.kd_fade_end=0"])
    with pytest.raises(HaskdError, match="distill.kd_fade"):
        load_config("scannet20_haskd", [*over, "distill.kd_fade=step"])


def test_unlabeled_conf_reaches_the_ihd_and_asd_losses(pipeline_run, tiny_rooms):
    """distill.unlabeled_conf goes from the config to the IHD weights and the ASD loss (hand values in test_ihd.py
    and test_asd.py)."""
    from haskd.distill.setup import build_distill_task
    from haskd.models import build_from_config
    from haskd.workflow.build import build_datasets

    out, _ = pipeline_run
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", "distill.cache=false",
                                          f"distill.teacher_ckpt={out / 'teacher' / 'last.pt'}",
                                          f"distill.experts={out / 'stage1' / 'experts.json'}",
                                          "distill.unlabeled_conf=0.9"])
    task = build_distill_task(build_from_config(cfg), cfg, "cpu", build_datasets(cfg)["train"])
    assert task.ihd.unlabeled_conf == 0.9 and task.asd.unlabeled_conf == 0.9


def test_unlabeled_keep_lowers_the_gate_per_class(pipeline_run, tiny_rooms, caplog):
    """distill.unlabeled_keep: per class, a gate at most distill.unlabeled_conf that passes at least that share of
    the cached teacher targets naming the class on the training rooms' unlabeled points (hand values of the rule in
    test_ihd.py); it needs the cache (and a gate to lower: test_config.py)."""
    import numpy as np

    from haskd.distill.cache import cache_dir_for, load_scene_cache
    from haskd.errors import HaskdError
    from haskd.distill.setup import build_distill_task
    from haskd.models import build_from_config
    from haskd.workflow.build import build_datasets

    out, _ = pipeline_run
    over = [*PIPE, f"data.root={tiny_rooms}", f"distill.teacher_ckpt={out / 'teacher' / 'last.pt'}",
            "distill.feat_weight=0", "distill.hint_weight=0", "data.labeled_points=30", "distill.unlabeled_conf=0.99"]
    cfg = load_config("scannet20_haskd", [*over, "distill.cache=true", "distill.unlabeled_keep=0.5"])
    train_set = build_datasets(cfg, splits=("train",))["train"]
    with caplog.at_level("INFO", logger="haskd.distill.setup"):
        gates = build_distill_task(build_from_config(cfg), cfg, "cpu", train_set).ihd.unlabeled_conf
    assert "distill.unlabeled_keep=0.5: gates below 0.99: " in caplog.text
    assert gates.shape == (cfg.data.num_classes,) and bool((gates <= 0.99).all())
    cache = cache_dir_for(cfg.distill.teacher_ckpt, cfg, "teacher_labels30")
    p, k = [], []
    for scene in train_set.scenes:
        c = load_scene_cache(cache, scene.name)
        use = (scene.segment < 0) & (np.asarray(c["visible"]) > 0)
        p.append(1.0 / np.exp(np.asarray(c["topk_logits"], np.float32)[use]).sum(-1))
        k.append(np.asarray(c["topk_index"])[use, 0])
    p, k = np.concatenate(p), np.concatenate(k)
    named = np.unique(k)
    assert np.isin(np.arange(cfg.data.num_classes), named, invert=True).any()
    assert bool((gates < 0.99).any())  # the 2-epoch teacher is unsure: the gate was lowered
    for c in range(cfg.data.num_classes):
        if c in named:
            assert (p[k == c] >= gates[c].item() - 1e-6).mean() >= 0.5
        else:
            assert gates[c].item() == pytest.approx(0.99)
    with pytest.raises(HaskdError, match="distill.cache=true"):
        cfg = load_config("scannet20_haskd", [*over, "distill.cache=false", "distill.unlabeled_keep=0.5"])
        build_distill_task(build_from_config(cfg), cfg, "cpu", train_set)
