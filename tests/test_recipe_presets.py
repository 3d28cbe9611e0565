"""The Pointcept-recipe presets (scannet20_* / s3dis_*, SpUNet and PTv3, student and HAS-KD) end to end at toy size:
train, evaluate (single pass and Pointcept's fragment voting), and the whole HAS-KD pipeline."""
import json
import shutil

import numpy as np
import pytest
import torch

from haskd.config import load_config
from haskd.data.dataset import SceneDataset
from haskd.engine.checkpoint import load_checkpoint
from haskd.engine.evaluate import evaluate
from haskd.data.transforms import collate
from haskd.workflow.build import build_datasets, train_recipe
from haskd.workflow.train import train
from haskd.engine.voting import VOTING_AUGS, apply_test_aug, vote_points, voting_augs
from haskd.models import build_from_config
from haskd.workflow.pipeline import run_pipeline

RECIPES = [("scannet20", "spunet"), ("scannet20", "ptv3"), ("s3dis", "spunet"), ("s3dis", "ptv3")]
# Toy size: tiny networks, 10 cm voxels, one pass; every other key is the preset's.
TOY = ["model.preset=tiny", "data.voxel_size=0.1", "data.batch_size=2", "data.repeat=1", "data.max_voxels=4000",
       "train.epochs=1", "train.eval_every=0", "train.device=cpu"]
TOY_HASKD = [*TOY, "train.snapshots=1", "teacher.image_size=[30,40]", "teacher.image_widths=[8,16]",
             "teacher.image_channels=8", "teacher.num_frames=2", "teacher.virtual_views=2"]


@pytest.fixture(scope="module")
def s3dis_rooms(tiny_rooms, tmp_path_factory):
    """The tiny rooms with S3DIS-style labels: ``segment.npy`` holding 13 classes (the ScanNet id mod 13)."""
    root = tmp_path_factory.mktemp("s3dis_rooms")
    shutil.copytree(tiny_rooms, root, dirs_exist_ok=True)
    for f in root.glob("*/*/segment20.npy"):
        s = np.load(f)
        np.save(f.parent / "segment.npy", np.where(s >= 0, s % 13, -1).astype(np.int16))
        f.unlink()
    return root


def _root(ds, tiny_rooms, s3dis_rooms):
    return tiny_rooms if ds == "scannet20" else s3dis_rooms


def test_haskd_presets_train_the_student_presets_network():
    """A HAS-KD preset differs from its student preset only in distillation, teacher and snapshots."""
    for ds, net in RECIPES:
        a = load_config(f"{ds}_{net}_student").to_dict()
        b = load_config(f"{ds}_{net}_haskd").to_dict()
        for part in ("data", "model", "optim"):
            assert a[part] == b[part], (ds, net, part)
        assert a["train"] == {**b["train"], "snapshots": 0}
        assert b["distill"]["teacher_expert"] and b["distill"]["asd_trust"] == "hard"
        assert b["distill"]["hint_weight"] == (2.0 if net == "spunet" else 0.0)  # PTv3 hints: not measured, off
        assert a["data"]["augment_recipe"] == "pointcept" and a["data"]["grid_sample"] == "random"
    assert load_config("s3dis_spunet_student").data.num_classes == 13
    assert load_config("scannet20_cpu_student").to_dict() == load_config("scannet20_student").to_dict()
    assert load_config("scannet20_cpu_haskd").to_dict() == load_config("scannet20_haskd").to_dict()


def test_voting_augmentation_lists():
    assert len(VOTING_AUGS["scannet"]) == 13 and len(VOTING_AUGS["s3dis"]) == 10
    assert voting_augs("", "s3dis") is VOTING_AUGS["s3dis"] and voting_augs("", "scannet20") is VOTING_AUGS["scannet"]
    x = np.random.default_rng(0).random((50, 3)).astype(np.float32)
    flip, _ = apply_test_aug(x, None, dict(angle=0.0, scale=1.0, flip=True))
    rot, _ = apply_test_aug(x, None, dict(angle=1.0, scale=1.0, flip=False))
    assert np.allclose(flip, rot, atol=1e-5)  # Pointcept's RandomFlip(p=1) mirrors x and y: a half turn
    s, _ = apply_test_aug(x, None, dict(angle=0.5, scale=0.95, flip=False))
    assert np.allclose(np.linalg.norm(s, axis=1), 0.95 * np.linalg.norm(x, axis=1), atol=1e-5)


def _small_scene(scene, n=1500, seed=0):
    """A random subset of a scene's points (fragment voting runs every point through the network 10-13 times)."""
    from haskd.data.scene import Scene

    i = np.sort(np.random.default_rng(seed).choice(scene.num_points, n, replace=False))
    return Scene(scene.name, scene.coord[i], scene.color[i], scene.segment[i], scene.normal[i])


@pytest.mark.parametrize("ds,net", RECIPES)
def test_student_preset_trains_and_evaluates_with_voting(ds, net, tiny_rooms, s3dis_rooms, tmp_path):
    cfg = load_config(f"{ds}_{net}_student", [*TOY, f"data.root={_root(ds, tiny_rooms, s3dis_rooms)}"])
    metrics, model = train(cfg, tmp_path / "run", progress=False, return_model=True)
    assert 0 <= metrics["miou"] <= 1 and len(metrics["per_class_iou"]) == cfg.data.num_classes
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ("train/lovasz" in rec) == (net == "ptv3")  # Pointcept's PTv3 criteria: CE + Lovasz
    val = SceneDataset(cfg.data.root, "val", cfg.data.num_classes, cfg.data.voxel_size,
                       use_normal=cfg.data.use_normal)  # ScanNet presets: colour + normal; S3DIS: colour only
    val.scenes = [_small_scene(val.scenes[0])]
    augs = voting_augs(cfg.data.vote_augs, cfg.data.dataset)
    v = evaluate(model, val, dataset_name=cfg.data.dataset, voting=augs)
    assert v["augmentations"] == len(augs) == (13 if ds == "scannet20" else 10)
    assert v["min_votes"] >= len(augs)  # every point voted in every pass
    assert v["num_points"] == int((val.scenes[0].segment >= 0).sum()) and 0 <= v["miou"] <= 1


def test_every_point_gets_a_vote_from_every_augmentation(tiny_rooms):
    cfg = load_config("scannet20_spunet_student", [*TOY, f"data.root={tiny_rooms}"])
    torch.manual_seed(0)
    model = build_from_config(cfg).eval()
    scene = _small_scene(SceneDataset(tiny_rooms, "val", 20, 0.1).scenes[0], 2000, seed=1)
    probs, votes = vote_points(model, scene, 0.1, 20, VOTING_AUGS["scannet"], use_normal=True)
    assert votes.shape == (scene.num_points,) and int(votes.min()) >= 13
    assert torch.allclose(probs.sum(1), votes.double())  # one softmax (sums to 1) per vote
    one, v1 = vote_points(model, scene, 0.1, 20, VOTING_AUGS["scannet"][:1], use_normal=True)
    assert int(v1.min()) >= 1 and int(v1.max()) > 1  # points sharing a voxel come back in several fragments
    # fragments are independent samples: batching them does not change the votes
    two, _ = vote_points(model, scene, 0.1, 20, VOTING_AUGS["scannet"][:1], use_normal=True, fragments_per_batch=1)
    assert torch.allclose(one, two, atol=1e-5)


@pytest.mark.parametrize("ds,net", RECIPES)
def test_haskd_preset_runs_the_pipeline(ds, net, tiny_rooms, s3dis_rooms, tmp_path):
    # the baseline stage is the student preset's training, run by the test above
    cfg = load_config(f"{ds}_{net}_haskd", [*TOY_HASKD, f"data.root={_root(ds, tiny_rooms, s3dis_rooms)}"])
    summary = run_pipeline(cfg, tmp_path / "pipe", with_baseline=False, progress=False, report=False)
    for stage in ("teacher", "student"):
        assert 0 <= summary[stage]["metrics"]["miou"] <= 1
    a = load_checkpoint(tmp_path / "pipe" / "stage1" / "last.pt")["state_dict"]
    # the final student's checkpoint: student/ or, when no snapshot is the expert of any class, stage1/ itself
    b = load_checkpoint(summary["student"]["ckpt"])["state_dict"]
    assert list(a) == list(b)  # no inference cost: the student is the student preset's network
    assert list(build_from_config(load_config(f"{ds}_{net}_student", TOY)).state_dict()) == list(b)
    experts = json.loads((tmp_path / "pipe" / "stage1" / "experts.json").read_text())
    assert experts.get("teacher_iou") is not None  # the teacher joined the expert pool


def test_mix3d_trains_with_cached_distillation(tiny_rooms, tmp_path):
    """Mix3D on every batch, with the hints and cached soft labels of a teacher (the scenes' own maps survive)."""
    base = [*TOY_HASKD, f"data.root={tiny_rooms}", "data.mix_prob=1.0"]
    teacher = load_config("scannet20_spunet_haskd", [*base, "role=teacher"])
    train(teacher, tmp_path / "teacher", progress=False)
    cfg = load_config("scannet20_spunet_haskd", [*base, f"distill.teacher_ckpt={tmp_path / 'teacher' / 'last.pt'}",
                                                 "distill.teacher_expert=false"])
    assert train_recipe(cfg)["mix_prob"] == 1.0 and train_recipe(teacher)["mix_prob"] == 0.0  # teacher: own images
    # the teacher votes too, each fragment with its scene's frames
    from haskd.engine.checkpoint import load_model
    from haskd.images.provider import FrameProvider

    tmodel, tcfg = load_model(tmp_path / "teacher" / "last.pt", return_config=True)
    val = SceneDataset(tiny_rooms, "val", 20, 0.1, use_normal=True)
    val = val.with_frames(FrameProvider.from_config(tcfg))
    val.scenes = [_small_scene(val.scenes[0], 800)]
    tv = evaluate(tmodel, val, voting=VOTING_AUGS["scannet"][:2])
    assert tv["min_votes"] >= 2 and 0 <= tv["miou"] <= 1
    ds = build_datasets(cfg, ("train",))["train"]
    b = collate([ds[0], ds[1]])
    assert b["offset"].shape == (1,) and b["point_offset"].shape == (2,)  # two scenes overlaid into one
    for hint_cache in ("false", "true"):  # hints from the teacher run online on the mixed batch, or from a cache
        run = tmp_path / f"student_{hint_cache}"
        cfg.distill.hint_cache = hint_cache == "true"
        m = train(cfg, run, progress=False)
        assert 0 <= m["miou"] <= 1
        rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert rec["train/ihd_logit"] > 0 and rec["train/ihd_hint"] > 0


def test_cli_eval_reports_voting_apart(tiny_rooms, tmp_path, capsys):
    from haskd.cli import main
    from haskd.data.scene import write_scene
    from haskd.engine.checkpoint import save_checkpoint

    cfg = load_config("scannet20_spunet_student", [*TOY, f"data.root={tiny_rooms}"])
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", config=cfg.to_dict(), state_dict=build_from_config(cfg).state_dict(), epoch=1)
    s = _small_scene(SceneDataset(tiny_rooms, "val", 20, 0.1).scenes[0], 1000)
    write_scene(tmp_path / "data" / "val" / s.name, s.coord, s.color, segment=s.segment, normal=s.normal)
    out = tmp_path / "m.json"
    assert main(["eval", "--ckpt", str(tmp_path / "m.pt"), "--data", str(tmp_path / "data"), "--voting",
                 "--out", str(out), "--device", "cpu"]) == 0
    r = json.loads(out.read_text())
    assert r["voting"]["augmentations"] == 13 and r["voting"]["min_votes"] >= 13
    assert 0 <= r["miou"] <= 1 and 0 <= r["voting"]["miou"] <= 1
    assert "fragment voting (13 augmentations" in capsys.readouterr().out


def test_recipe_samples_repeat_for_a_seed_and_epoch(tiny_rooms):
    """A resumed run sees the same batches: the recipe's sample is a function of (seed, epoch, index)."""
    cfg = load_config("scannet20_spunet_student", [*TOY, f"data.root={tiny_rooms}"])
    a = build_datasets(cfg, ("train",))["train"]
    b = build_datasets(cfg, ("train",))["train"]
    x, y = a[1], b[1]
    for k in ("grid_coord", "feat", "segment", "inverse", "world"):
        assert np.array_equal(x[k], y[k])
    a.set_epoch(1)
    assert not np.array_equal(a[1]["feat"], x["feat"])


def test_pointcept_optimiser_and_schedules():
    from haskd.workflow.build import build_optimizer, build_scheduler

    cfg = load_config("scannet20_ptv3_student", ["model.preset=tiny"])
    model = build_from_config(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params, model)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.006, 0.0006])  # attention blocks at lr / 10
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    sched = build_scheduler(cfg, opt, 100)
    lrs, betas = [], []
    for _ in range(100):
        lrs.append([g["lr"] for g in opt.param_groups])
        betas.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    assert max(l[0] for l in lrs) == pytest.approx(0.006, rel=1e-3) and max(l[1] for l in lrs) == pytest.approx(
        0.0006, rel=1e-3)
    assert min(betas) == pytest.approx(0.85, abs=1e-3) and max(betas) == pytest.approx(0.95, abs=1e-3)  # cycled
    assert lrs[-1][0] < 0.006 / 10 / 1000 * 1.5  # final lr = lr / div / final_div
    s3 = load_config("s3dis_spunet_student", ["model.preset=tiny"])
    opt = build_optimizer(s3, [torch.nn.Parameter(torch.zeros(1))])
    sched = build_scheduler(s3, opt, 10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.1) and seen[5] == pytest.approx(0.1 * (1 - 5 / 11) ** 0.9)  # Pointcept's poly
