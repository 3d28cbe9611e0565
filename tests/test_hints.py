"""Per-level hints through forward hooks: the levels each backbone names, what the tap captures, and its cleanup."""
import pytest
import torch

from haskd.distill.cache import level_rows
from haskd.distill.hints import HintLoss, HintTap, hint_dims, run_with_hints
from haskd.errors import HaskdError
from haskd.models import build_model
from haskd.sparse import SparseTensor


def _batch(seed=0, sizes=(220, 150), side=14, cin=6):
    g = torch.Generator().manual_seed(seed)
    grids = []
    for n in sizes:
        cells = torch.randperm(side ** 3, generator=g)[:n]
        grids.append(torch.stack([cells // (side * side), (cells // side) % side, cells % side], 1))
    grid = torch.cat(grids)
    return {"grid_coord": grid, "feat": torch.randn(len(grid), cin, generator=g),
            "offset": torch.cumsum(torch.tensor(sizes), 0)}


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def _spunet_by_hand(net, batch):
    """SpUNet's per-level features and coords, walking the network by hand (deepest encoder level, then every
    decoder level), as its ``forward`` computes them."""
    x = net.stem(SparseTensor.from_batch(batch["grid_coord"], batch["feat"], batch["offset"]))
    skips = [x]
    for down, enc in zip(net.down, net.enc):
        x = enc(down(x))
        skips.append(x)
    skips.pop()
    feats, coords = [x.feats], [x.coords]
    for up, dec in zip(net.up, net.dec):
        x = up(x)
        x = dec(x.replace_feats(torch.cat([x.feats, skips.pop().feats], 1)))
        feats.append(x.feats)
        coords.append(x.coords)
    return feats, coords


def test_spunet_tap_gives_the_features_of_each_level():
    torch.manual_seed(0)
    net = build_model("spunet", 6, 5, preset="tiny", backend="torch").eval()
    batch = _batch()
    with torch.no_grad():
        want_f, want_c = _spunet_by_hand(net, batch)
        out, tap = run_with_hints(net, batch)
    assert len(tap.feats) == len(want_f) == 5 and tap.strides == (16, 8, 4, 2, 1)
    for f, c, wf, wc in zip(tap.feats, tap.coords, want_f, want_c):
        assert torch.equal(f, wf) and torch.equal(c, wc)
    assert torch.equal(tap.feats[-1], out["feat"])
    assert hint_dims(net) == net.hint_dims == tuple(f.shape[1] for f in tap.feats)
    c0 = SparseTensor.from_batch(batch["grid_coord"], batch["feat"], batch["offset"]).coords
    for c, s in zip(tap.coords, tap.strides):  # each level's voxels hold the input voxels at its stride
        assert level_rows(c, c0, s).max() < len(c)


def test_tap_hooks_are_removed_after_use_even_on_error():
    torch.manual_seed(0)
    net = build_model("spunet", 6, 5, preset="tiny", backend="torch").eval()
    batch = _batch()
    assert _hooks(net) == 0
    with HintTap(net) as tap:
        assert _hooks(net) == len(tap.strides)
        net(batch)
    assert _hooks(net) == 0
    with pytest.raises(RuntimeError):
        with HintTap(net):
            net({**batch, "feat": batch["feat"][:, :3]})  # wrong width: fails inside the block
    assert _hooks(net) == 0
    first = tap.feats[0]
    net(batch)  # a forward outside the block changes nothing captured
    assert tap.feats[0] is first


def test_ptv3_names_its_levels_with_their_voxel_coords():
    """PTv3's levels: the deepest encoder stage, then each decoder stage; each level's coords are the input grid
    // stride (batch first), so the cached hints map onto them as onto SpUNet's; two nets on one batch build the
    same rows (the online hint term pairs them row for row)."""
    a, b = (build_model("ptv3", 6, 5, preset="tiny", backend="torch").eval() for _ in range(2))
    b.load_state_dict(a.state_dict())
    batch = _batch(sizes=(200, 90))
    with torch.no_grad(), HintTap(a) as ta, HintTap(b) as tb:
        out = a(batch)
        b(batch)
    assert ta.strides == (8, 4, 2, 1) and _hooks(a) == 0
    assert hint_dims(a) == (128, 64, 32, 32) == tuple(f.shape[1] for f in ta.feats)
    assert torch.equal(ta.feats[-1], out["feat"])
    c0 = SparseTensor.from_batch(batch["grid_coord"], batch["feat"], batch["offset"]).coords
    for f, c, cb, s in zip(ta.feats, ta.coords, tb.coords, ta.strides):
        q = c0.clone()
        q[:, 1:] //= s
        assert torch.equal(torch.unique(q, dim=0), torch.unique(c, dim=0)) and len(c) == len(f)
        assert torch.equal(c, cb)
        level_rows(c, c0, s)
    loss = HintLoss(hint_dims(a), hint_dims(b))(ta.feats, tb.feats)["ihd_hint"]
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)  # the same weights: no gap


def test_a_network_naming_no_levels_is_one_line_error():
    with pytest.raises(HaskdError, match="gives no per-level features"):
        HintTap(torch.nn.Linear(3, 3), "the student")


def _train_with_hints(ahead: bool, threads: int):
    """Four steps of a student distilled from a frozen teacher's online hints; returns the student's weights and
    the names of the threads that ran the teacher."""
    import threading

    from haskd.distill.hints import HintLoss
    from haskd.distill.task import DistillTask, TeacherHints, frozen
    from haskd.engine.trainer import Trainer

    class Recorded(TeacherHints):
        def __call__(self, batch, *args):
            ran.append(threading.current_thread().name)
            return super().__call__(batch, *args)

    ran = []
    torch.manual_seed(0)
    student, teacher = (build_model("spunet", 6, 5, preset="tiny", backend="torch") for _ in range(2))
    teacher = frozen(teacher)
    task = DistillTask(student, {"hint": HintLoss(hint_dims(student), hint_dims(teacher))},
                       {"hints": Recorded(backbone=teacher)})
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = Trainer(task, opt, sched, "cpu", ahead=ahead)
    batches = []
    for seed in range(4):
        b = _batch(seed)
        b["segment"] = torch.randint(0, 5, (len(b["grid_coord"]),), generator=torch.Generator().manual_seed(seed))
        batches.append(b)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trainer.fit(lambda epoch: batches, 0, 1)
    finally:
        torch.set_num_threads(old)
    return {k: v.clone() for k, v in student.state_dict().items()}, ran


@pytest.mark.parametrize("threads", [1, 2])
def test_targets_ahead_run_the_teacher_in_a_worker_with_the_same_numbers(threads):
    """train.targets_ahead: the frozen teacher runs on the next batch in a worker thread while the student trains,
    and the student ends with the very same weights (the teacher's ops keep the step's intra-op thread count)."""
    plain, ran_plain = _train_with_hints(False, threads)
    ahead, ran_ahead = _train_with_hints(True, threads)
    assert ran_plain == ["MainThread"] * 4
    assert len(ran_ahead) == 4 and all(n.startswith("haskd-ahead") for n in ran_ahead)
    for k in plain:
        assert torch.equal(plain[k], ahead[k]), k
