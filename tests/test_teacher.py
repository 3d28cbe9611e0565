"""Teacher options: residual fusion, a detached 3D branch, training on random frames from a per-scene pool."""
import pytest
import torch

from haskd.config import load_config
from haskd.errors import HaskdError
from haskd.data.transforms import collate
from haskd.workflow.build import build_datasets
from haskd.models import build_from_config

from conftest import TINY

TEACH = [*TINY, "role=teacher", "teacher.image_size=[30,40]", "teacher.image_widths=[8,16]",
         "teacher.image_channels=8", "teacher.num_frames=2", "teacher.fusion_hidden=16"]


def _cfg(root, *extra):
    return load_config("scannet20_haskd", [*TEACH, f"data.root={root}", *extra])


def test_random_training_frames_come_from_a_pool_with_the_chosen_frames_first(tiny_rooms):
    cfg = _cfg(tiny_rooms, "teacher.train_frames=random", "teacher.frame_pool=5")
    ds = build_datasets(cfg)
    train, val = ds["train"], ds["val"]
    assert train.frames.k == 2 and val.frames.k == 0
    for i, scene in enumerate(train.scenes):
        pool = train.frames.data[i]["ids"]
        chosen = train.chosen_frames[scene.name]
        assert len(chosen) == 2 and pool[:2] == chosen and len(pool) == 5 and len(set(pool)) == 5
        # evaluation / caching passes see exactly the chosen frames
        assert train.frames_of(i)["ids"] == chosen
    seen = set()
    for epoch in range(6):
        train.set_epoch(epoch)
        fr = train[0]["frames"]
        assert fr["color"].shape[0] == 2 and fr["depth"].shape[0] == 2 and fr["pose"].shape[0] == 2
        assert set(fr["ids"]) <= set(train.frames.data[0]["ids"])
        seen.update(fr["ids"])
    assert len(seen) > 2  # draws vary over epochs
    assert val[0]["frames"]["ids"] == val.chosen_frames[val.scenes[0].name]


def test_selected_training_frames_are_the_chosen_ones(tiny_rooms):
    ds = build_datasets(_cfg(tiny_rooms))
    train = ds["train"]
    assert train.frames.k == 0
    assert train[0]["frames"]["ids"] == train.chosen_frames[train.scenes[0].name]


def test_residual_fusion_adds_the_head_to_the_3d_logits(tiny_rooms):
    cfg = _cfg(tiny_rooms, "teacher.fusion=residual")
    ds = build_datasets(cfg, ("val",))["val"]
    model = build_from_config(cfg).eval()
    batch = collate([ds[0]])
    with torch.no_grad():
        out = model(batch)
        lifted, vis = model.lift_images(batch)
        c2d = model.image_net.out_channels
        visf = vis.float()[:, None]
        f2d = lifted[:, :c2d] * visf + model.unseen[None] * (1 - visf)
        h = model.fusion(torch.cat([model.backbone(batch)["feat"], f2d, visf], 1))
    torch.testing.assert_close(out["logits"], model.classifier(h) + out["logits_3d"])
    torch.testing.assert_close(out["feat"], h)


def test_bad_fusion_and_train_frames_values_are_one_line_errors(tiny_rooms):
    import pytest

    from haskd.errors import HaskdError

    with pytest.raises(HaskdError, match="teacher.train_frames"):
        build_datasets(_cfg(tiny_rooms, "teacher.train_frames=all"))
    with pytest.raises(HaskdError, match="teacher.fusion"):  # refused when the config is read
        _cfg(tiny_rooms, "teacher.fusion=sum")
    cfg = _cfg(tiny_rooms)
    cfg.teacher.fusion = "sum"  # and by the network itself when a config is built in code
    with pytest.raises(HaskdError, match="teacher.fusion"):
        build_from_config(cfg)


def test_reused_teacher_keeps_weights_and_sees_the_policy_frames(tiny_rooms, tmp_path):
    import json

    from haskd.engine.checkpoint import load_checkpoint
    from haskd.workflow.train import train
    from haskd.images.iof import select_frames
    from haskd.workflow.pipeline import reuse_teacher

    cfg = _cfg(tiny_rooms, "teacher.train_frames=random", "train.epochs=1", "train.eval_every=0")
    train(cfg, tmp_path / "t", progress=False)
    metrics = reuse_teacher(tmp_path / "t", tmp_path / "u", "uniform")
    a = load_checkpoint(tmp_path / "t" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "u" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    chosen = json.loads((tmp_path / "u" / "frames.json").read_text())
    ds = build_datasets(_cfg(tiny_rooms))
    for scene in ds["train"].scenes + ds["val"].scenes:
        from haskd.data.frames import open_frames

        want = select_frames(scene.coord, open_frames(scene.path / "frames"), k=2, policy="uniform",
                             voxel_size=cfg.data.voxel_size, tau=cfg.teacher.depth_tau, seed=cfg.train.seed)["ids"]
        assert chosen[scene.name] == want
    assert 0 <= metrics["miou"] <= 1
    assert json.loads((tmp_path / "u" / "val_metrics.json").read_text())["miou"] == metrics["miou"]


def test_ablation_table_reports_the_share_of_the_teacher_gap_closed():
    from haskd.workflow.pipeline import ablation_markdown

    row = lambda m: {"mean": m, "std": 0.5}  # noqa: E731
    table = {"seeds": [0, 1, 2], "rows": {"baseline": row(40.0), "HAS-KD": row(43.0)},
             "teacher": {"teacher (IOF frames)": row(46.0)}}
    md = ablation_markdown(table)
    assert "| HAS-KD | 43.00 +- 0.50 | +3.00 |" in md and "| teacher (IOF frames) | 46.00 +- 0.50 | +6.00 |" in md
    assert "closes 50% of it" in md
    table["teacher"]["teacher (IOF frames)"] = row(39.0)
    assert "n/a" in ablation_markdown(table)


def test_ablation_table_shows_the_hard_classes_when_scored():
    from haskd.workflow.pipeline import ablation_markdown

    def row(m, pic, win):
        return {"mean": m, "std": 0.0, "per_class_iou": [{"picture": pic, "window": win, "wall": 0.9}] * 2}

    table = {"seeds": [0, 1], "rows": {"baseline": row(40.0, 0.0, 0.1), "HAS-KD": row(41.0, 0.1, 0.3)},
             "teacher": {"teacher (IOF frames)": row(45.0, 0.2, 0.4)}}
    md = ablation_markdown(table)
    assert "picture / window mean IoU" in md
    assert "| baseline | 40.00 +- 0.00 | +0.00 | 5.00 +- 0.00 |" in md
    assert "| teacher (IOF frames) | 45.00 +- 0.00 | +5.00 | 30.00 +- 0.00 |" in md
    # the teacher's lead on those classes (30 - 5) and the share of it the student got (20 - 5 = 60%)
    assert "On picture / window (mean IoU) the teacher leads by +25.00; HAS-KD gets 60% of it (+15.00)." in md
    # with IHD and its image control: each one's share of the lead, and IHD's lead over the control (the images')
    table["rows"]["+IHD (IOF)"] = row(41.5, 0.15, 0.35)  # 25 - 5 = 20 of 25: 80%
    table["rows"]["+IHD (3D head: no image)"] = row(41.0, 0.05, 0.25)  # 15 - 5 = 10: 40%
    assert ("+IHD (IOF) gets 80% (+20.00), +IHD (3D head: no image) 40% (+10.00): the images' own part is 40% "
            "(+10.00).") in ablation_markdown(table)
    del table["rows"]["+IHD (IOF)"], table["rows"]["+IHD (3D head: no image)"]
    table["rows"]["baseline"]["per_class_iou"] = [{"wall": 0.9}]
    for r in ("HAS-KD",):
        table["rows"][r]["per_class_iou"] = [{"wall": 0.9}]
    table["teacher"]["teacher (IOF frames)"]["per_class_iou"] = [{"wall": 0.9}]
    assert "mean IoU" not in ablation_markdown(table)


def test_per_class_table_averages_seeds_and_skips_absent_classes():
    from haskd.workflow.pipeline import per_class_markdown

    def row(wall):
        return {"mean": 0.0, "std": 0.0, "per_class_iou": [{"wall": w, "sink": None} for w in wall]}

    table = {"seeds": [0, 1], "rows": {"baseline": row([0.8, 0.9]), "HAS-KD": row([0.9, 1.0])},
             "teacher": {"teacher (IOF frames)": row([1.0, 1.0])}}
    md = per_class_markdown(table)
    assert md.splitlines()[0] == "| class | baseline | HAS-KD | teacher (IOF frames) |"
    assert "| wall | 85.0 +- 7.1 | 95.0 +- 7.1 | 100.0 +- 0.0 |" in md
    assert "sink" not in md
    table["rows"]["+IHD (IOF)"] = row([0.7, 0.7])  # IHD and its image control sit beside the baseline when scored
    table["rows"]["+IHD (3D head: no image)"] = row([0.6, 0.6])
    assert per_class_markdown(table).splitlines()[0] == ("| class | baseline | +IHD (IOF) | +IHD (3D head: no image) "
                                                         "| HAS-KD | teacher (IOF frames) |")


def _teacher_step(cfg, batch, threads):
    torch.manual_seed(0)
    model = build_from_config(cfg).train()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = model(batch)
        (out["logits"].square().mean() + out["feat"].mean()).backward()
        with torch.no_grad():
            model.eval()
            ev = model(batch)["logits"]
    finally:
        torch.set_num_threads(old)
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, ev


def test_overlapped_branches_give_the_same_outputs_and_gradients(tiny_rooms):
    """teacher.overlap_branches: the image branch in a second thread beside the 3D branch changes no number, in
    training (random photometric jitter, gradients) and in evaluation (no grad), at 1 and 2 intra-op threads."""
    ds = build_datasets(_cfg(tiny_rooms))["train"]
    batch = collate([ds[0], ds[1]])
    for threads in (1, 2):
        ref = _teacher_step(_cfg(tiny_rooms, "teacher.overlap_branches=false"), batch, threads)
        got = _teacher_step(_cfg(tiny_rooms), batch, threads)
        for k in ("logits", "feat", "logits_3d", "visible"):
            assert torch.equal(ref[0][k], got[0][k]), k
        assert ref[1].keys() == got[1].keys() and len(ref[1]) > 10
        for n in ref[1]:
            assert torch.equal(ref[1][n], got[1][n]), n
        assert torch.equal(ref[2], got[2])


def test_detach_3d_keeps_the_fused_loss_out_of_the_3d_branch(tiny_rooms):
    """teacher.detach_3d: the same outputs, the fused head's loss reaches the fusion and the image branch but no
    parameter of the 3D branch, which then learns from its own CE alone."""
    ds = build_datasets(_cfg(tiny_rooms))["train"]
    batch = collate([ds[0]])
    outs, grads = {}, {}
    for det in ("false", "true"):
        torch.manual_seed(0)
        model = build_from_config(_cfg(tiny_rooms, f"teacher.detach_3d={det}", "teacher.fusion=residual")).train()
        out = model(batch)
        out["logits"].square().mean().backward()  # the fused head's output only
        outs[det] = out["logits"].detach()
        grads[det] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(outs["false"], outs["true"])
    assert any(n.startswith("backbone.") for n in grads["false"])
    assert not any(n.startswith("backbone.") and g.abs().sum() > 0 for n, g in grads["true"].items())
    assert any(n.startswith("fusion.") for n in grads["true"])
    assert any(n.startswith("image_net.") for n in grads["true"])
    with pytest.raises(HaskdError, match="teacher.detach_3d needs teacher.loss_3d"):
        _cfg(tiny_rooms, "teacher.detach_3d=true", "teacher.loss_3d=0")
