"""ASD: snapshot schedule, expert selection, and the loss against hand-computed values.

Reference numbers (tau = 2): expert logits [2 ln 3, 0] -> target [0.75, 0.25]; student [0, 0] -> uniform;
tau^2 * KL = 0.5232481438. Target [0.625, 0.375] (half [0.75, 0.25] + half uniform) vs uniform: 0.1263357696.
"""
import math

import numpy as np
import pytest
import torch

from haskd.distill.asd import ASDLoss, asd_loss, expert_heatmap_png, select_experts, snapshot_epochs
from haskd.errors import HaskdError

LN3 = math.log(3.0)
KD_075 = 0.5232481437645479
KD_0625 = 0.12633576960785303
NAN = float("nan")


def test_snapshot_epochs_second_half():
    assert snapshot_epochs(100) == [60, 70, 80, 90, 100]
    assert snapshot_epochs(10, 5) == [6, 7, 8, 9, 10]
    assert snapshot_epochs(9, 3) == [6, 8, 9]  # 4 + ceil(5k/3)
    assert snapshot_epochs(7, 5) == [3, 4, 5, 6, 7]  # second half too short: last 5 epochs
    assert snapshot_epochs(1, 5) == [1]
    assert snapshot_epochs(100, 1) == [100]


def test_snapshot_epochs_whole_run():
    assert snapshot_epochs(240, 3, "whole_run") == [80, 160, 240]
    assert snapshot_epochs(10, 3, "whole_run") == [4, 7, 10]  # ceil(10k/3)
    assert snapshot_epochs(2, 3, "whole_run") == [1, 2]  # fewer epochs than snapshots: every epoch


def test_snapshot_epochs_cycles():
    assert snapshot_epochs(100, 5, "cycles") == [20, 40, 60, 80, 100]
    assert snapshot_epochs(100, 5, "cycles", cycles=10) == [60, 70, 80, 90, 100]
    assert snapshot_epochs(60, 5, "cycles", cycles=[10, 20, 30]) == [10, 30, 60]
    with pytest.raises(HaskdError):
        snapshot_epochs(60, 5, "cycles", cycles=[10, 20])
    with pytest.raises(HaskdError):
        snapshot_epochs(0, 5)
    with pytest.raises(HaskdError):
        snapshot_epochs(10, 5, "linear")


IOU = np.array([
    # c0   c1   c2   c3   c4   c5
    [0.5, 0.2, NAN, 0.3, NAN, 0.0],
    [0.6, 0.2, NAN, 0.1, 0.3, 0.0],
    [0.4, 0.1, NAN, 0.3, NAN, 0.0],
])


def test_select_experts_top1_ties_and_nan():
    t = select_experts(IOU)
    # c1: tie 0/1 -> later (1); c2: all NaN -> last (2); c3: tie 0/2 -> 2; c4: NaN elsewhere; c5: all 0 -> last
    assert t["expert"].tolist() == [1, 1, 2, 2, 1, 2]
    assert t["indices"].shape == (6, 1) and t["weights"].tolist() == [[1.0]] * 6


def test_select_experts_topk_weights():
    t = select_experts(IOU, topk=2)
    assert t["indices"].tolist() == [[1, 0], [1, 0], [2, 1], [2, 0], [1, 2], [2, 1]]
    np.testing.assert_allclose(t["weights"], [[0.6 / 1.1, 0.5 / 1.1], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5],
                                              [1.0, 0.0], [1.0, 0.0]], rtol=1e-6)
    assert t["expert"].tolist() == t["indices"][:, 0].tolist()
    assert select_experts(IOU, topk=10)["indices"].shape == (6, 3)  # k clipped to M


def _toy():
    """3 points, 2 classes, 2 snapshots; expert(0) = snapshot 0, expert(1) = snapshot 1."""
    student = torch.zeros(3, 2, requires_grad=True)
    experts = torch.tensor([
        [[2 * LN3, 0.0], [5.0, -5.0], [0.0, 0.0]],   # snapshot 0
        [[0.0, 0.0], [0.0, 0.0], [0.0, 2 * LN3]],    # snapshot 1 (final)
    ], requires_grad=True)
    labels = torch.tensor([0, 1, -1])
    return student, experts, labels, np.array([0, 1])


def test_asd_loss_hand_values():
    s, e, y, table = _toy()
    # point 0: class 0 -> snapshot 0 -> [.75, .25] -> 0.52325; point 1: class 1 -> snapshot 1 -> uniform -> 0
    assert asd_loss(s, e, y, table, tau=2.0, unlabeled="skip").item() == pytest.approx(KD_075 / 2, rel=1e-6)
    # point 2 unlabeled: the final snapshot predicts class 1 -> expert 1 -> [.25, .75] -> 0.52325
    assert asd_loss(s, e, y, table, 2.0, "final").item() == pytest.approx(2 * KD_075 / 3, rel=1e-6)
    # given final prediction 0 -> expert 0 on point 2 -> uniform -> 0
    v = asd_loss(s, e, y, table, 2.0, "final", final_pred=torch.tensor([0, 0, 0]))
    assert v.item() == pytest.approx(KD_075 / 3, rel=1e-6)
    # the select_experts dict works the same as a plain expert array
    d = select_experts(np.array([[0.9, 0.1], [0.2, 0.8]]))
    assert asd_loss(s, e, y, d, 2.0, "skip").item() == pytest.approx(KD_075 / 2, rel=1e-6)


def test_asd_loss_topk_mixture():
    s, e, y, _ = _toy()
    table = {"indices": np.array([[0, 1], [1, 0]]), "weights": np.array([[0.5, 0.5], [1.0, 0.0]])}
    # point 0: 0.5 * [.75, .25] + 0.5 * uniform = [.625, .375]; point 1: snapshot 1 (weight 1) -> uniform
    assert asd_loss(s, e, y, table, 2.0, "skip").item() == pytest.approx(KD_0625 / 2, rel=1e-6)


def test_asd_class_supervised_only_by_its_expert():
    s, e, y, table = _toy()
    base = asd_loss(s, e, y, table, 2.0, "skip")
    base.backward()
    assert e.grad is None  # experts are frozen: never a gradient source
    assert s.grad.abs().sum() > 0
    e2 = e.detach().clone()
    e2[0, 1] = torch.tensor([-7.0, 3.0])  # snapshot 0 is not the expert of class 1 (point 1)
    e2[1, 0] = torch.tensor([4.0, 1.0])   # snapshot 1 is not the expert of class 0 (point 0)
    assert asd_loss(s, e2, y, table, 2.0, "skip").item() == pytest.approx(base.item(), abs=1e-7)
    e3 = e.detach().clone()
    e3[0, 0] = torch.tensor([0.0, 0.0])   # the expert of class 0 on a class-0 point: the loss moves
    assert asd_loss(s, e3, y, table, 2.0, "skip").item() != pytest.approx(base.item(), abs=1e-4)


def test_asd_probs_and_module():
    s, e, y, table = _toy()
    probs = torch.softmax(e.detach() / 2.0, -1)
    ref = asd_loss(s, e, y, table, 2.0, "final")
    got = asd_loss(s, probs, y, table, 2.0, "final", target_kind="probs")
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    mod = ASDLoss(select_experts(np.array([[0.9, 0.1], [0.2, 0.8]])), tau=2.0, weight=3.0)
    out = mod({"logits": s}, e, y)
    assert set(out) == {"asd"} and out["asd"].item() == pytest.approx(3 * ref.item(), rel=1e-6)
    out = mod(s, {"probs": probs, "final_pred": torch.tensor([0, 0, 0])}, y)
    assert out["asd"].item() == pytest.approx(3 * KD_075 / 3, rel=1e-6)


def test_asd_no_used_point_is_zero():
    s = torch.randn(4, 3, requires_grad=True)
    loss = asd_loss(s, torch.randn(2, 4, 3), torch.full((4,), -1), np.array([0, 1, 1]), unlabeled="skip")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all()


def test_expert_heatmap_png(tmp_path):
    t = select_experts(IOU)
    p = expert_heatmap_png(IOU, [f"class{i}" for i in range(6)], t["expert"], tmp_path / "sub" / "experts.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_asd_trust_gates_points_the_expert_gets_wrong():
    """asd_trust (ours): hard keeps labeled points whose target argmax is the label, soft weighs by the target's
    probability of the label, unlabeled points keep weight 1; "none" is the plain mean (METHOD.md)."""
    import math

    import torch

    from haskd.distill.asd import asd_loss

    # one expert, two classes, tau 1; point 0 right (p = [0.75, 0.25], label 0), point 1 wrong (same p, label 1),
    # point 2 unlabeled; student uniform
    z = torch.tensor([[math.log(3.0), 0.0]] * 3)[None]
    s = torch.zeros(3, 2)
    y = torch.tensor([0, 1, -1])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL([.75, .25] || [.5, .5]), the same for all three
    table = {"indices": [[0], [0]], "weights": [[1.0], [1.0]]}
    assert asd_loss(s, z, y, table, tau=1.0, trust="none").item() == pytest.approx(kl, rel=1e-5)
    # with a student that differs per point the weighting shows: make point 1's KL larger
    s2 = torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    per = [kl, 0.75 * math.log(0.75 / (1 / (1 + math.e ** 2))) + 0.25 * math.log(0.25 / (math.e ** 2 / (1 + math.e ** 2))), kl]
    none = asd_loss(s2, z, y, table, tau=1.0, trust="none").item()
    hard = asd_loss(s2, z, y, table, tau=1.0, trust="hard").item()
    soft = asd_loss(s2, z, y, table, tau=1.0, trust="soft").item()
    assert none == pytest.approx(sum(per) / 3, rel=1e-5)
    assert hard == pytest.approx((per[0] + per[2]) / 2, rel=1e-5)          # the wrong point 1 is dropped
    assert soft == pytest.approx((0.75 * per[0] + 0.25 * per[1] + per[2]) / 2.0, rel=1e-5)
    with pytest.raises(ValueError, match="trust"):
        asd_loss(s2, z, y, table, tau=1.0, trust="maybe")


def test_asd_nontarget_uses_the_non_label_classes():
    import math

    import torch

    from haskd.distill.asd import asd_loss
    from haskd.distill.kd import kl_per_point_nontarget

    z = torch.tensor([[[math.log(3.0), 0.0, 0.5]], [[0.0, 2.0, 0.0]]])  # 2 snapshots, 1 point, 3 classes
    s = torch.tensor([[0.3, -0.2, 0.1]])
    y = torch.tensor([1])
    table = {"indices": [[0], [1], [0]], "weights": [[1.0], [1.0], [1.0]]}  # class 1 -> snapshot 1
    ref = kl_per_point_nontarget(s, torch.softmax(z[1], -1), y, 1.0)[0].item()
    assert asd_loss(s, z, y, table, tau=1.0, kd_target="nontarget").item() == pytest.approx(ref, rel=1e-6)


def test_teacher_classes_ties_and_nan():
    """distill.teacher_expert (ours): the teacher keeps a class when it is at least as good as the best snapshot."""
    from haskd.distill.asd import teacher_classes

    # IOU's best snapshot per class: 0.6, 0.2, NaN, 0.3, 0.3, 0.0
    t = np.array([0.7, 0.2, NAN, 0.2, NAN, NAN])
    # c0 teacher better; c1 tie -> teacher; c2 nobody -> teacher; c3 snapshot better; c4/c5 only snapshots score
    assert teacher_classes(IOU, t).tolist() == [True, True, True, False, False, False]
    with pytest.raises(HaskdError):
        teacher_classes(IOU, t[:4])


def test_teacher_route_gives_each_point_one_logit_source():
    """The IHD logit term and ASD split the points by class; together they are one KD term over every point: the
    masked sums keep the whole normaliser, and a point's gradient comes only from its class's source."""
    from haskd.distill.asd import teacher_route
    from haskd.distill.kd import kd_kl

    classes = torch.tensor([True, False])          # class 0: the teacher; class 1: its snapshot expert
    y = torch.tensor([0, 1, -1, -1])
    fp = torch.tensor([1, 1, 0, 1])                 # the final snapshot's prediction on the unlabeled points
    route = teacher_route(classes, y, fp, "final")
    assert route.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert teacher_route(classes, y, fp, "skip").tolist() == [1.0, 0.0, 1.0, 1.0]  # ASD skips them: teacher

    s = torch.zeros(4, 2, requires_grad=True)
    teacher = torch.tensor([[2 * LN3, 0.0]] * 4)    # [.75, .25] at tau 2 on every point
    snap = torch.tensor([[[0.0, 2 * LN3]] * 4])     # [.25, .75]
    ihd = kd_kl(s, teacher, 2.0, mask=route)
    asd = asd_loss(s, snap, y, np.array([0, 0]), 2.0, "final", final_pred=fp, point_mask=1.0 - route)
    # every point is at KL 0.52325 from its own source, each term holds half the points over all 4
    assert ihd.item() == pytest.approx(KD_075 / 2, rel=1e-6) and asd.item() == pytest.approx(KD_075 / 2, rel=1e-6)
    (ihd + asd).backward()
    g = s.grad
    # the teacher's points are pulled to class 0, the snapshot's to class 1: nothing else reaches them
    assert (g[[0, 2], 0] < 0).all() and (g[[1, 3], 1] < 0).all()
    s.grad = None
    kd_kl(s, teacher, 2.0, mask=route).backward()
    assert s.grad[[1, 3]].abs().sum() == 0 and s.grad[[0, 2]].abs().sum() > 0


def test_expert_heatmap_with_the_teacher_row(tmp_path):
    t = select_experts(IOU)
    p = expert_heatmap_png(IOU, [f"class{i}" for i in range(6)], t["expert"], tmp_path / "experts.png",
                           teacher_iou=[0.7, 0.2, NAN, 0.2, NAN, NAN])
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_asd_class_balance_hand_value():
    s, e, y, table = _toy()
    # assigned classes [0, 1, 1] (point 2 from the final snapshot): weights [1.5, 0.75, 0.75], sum 3;
    # KL [0.52325, 0, 0.52325] -> (1.5 + 0.75) * 0.52325 / 3, against 2 * 0.52325 / 3 unbalanced
    v = asd_loss(s, e, y, table, 2.0, "final", balance=True)
    assert v.item() == pytest.approx(0.75 * KD_075, rel=1e-6)
    m = ASDLoss(table, tau=2.0, class_balance=True)(s, e, y)["asd"]
    assert m.item() == pytest.approx(0.75 * KD_075, rel=1e-6)


def test_asd_unlabeled_confidence_gate():
    """distill.unlabeled_conf (ours): an unlabeled point stays only where its expert target's top probability
    reaches the threshold; labeled points are never gated."""
    s, e, y, table = _toy()
    # point 2 (unlabeled) -> expert 1 -> [.25, .75], top 0.75; point 1 (labeled) has a uniform target, top 0.5
    ungated = 2 * KD_075 / 3
    assert asd_loss(s, e, y, table, 2.0, "final", unlabeled_conf=0.7).item() == pytest.approx(ungated, rel=1e-6)
    # at 0.8 point 2 leaves the sum and the normaliser: (0.52325 + 0) / 2; point 1 (0.5 < 0.8) stays
    assert asd_loss(s, e, y, table, 2.0, "final", unlabeled_conf=0.8).item() == pytest.approx(KD_075 / 2, rel=1e-6)
    m = ASDLoss(table, tau=2.0, unlabeled_conf=0.8)(s, e, y)["asd"]
    assert m.item() == pytest.approx(KD_075 / 2, rel=1e-6)
    # with the hard trust (labeled point 1's uniform target has argmax 0, not its label 1: dropped) only point 0 is left
    v = asd_loss(s, e, y, table, 2.0, "final", trust="hard", unlabeled_conf=0.8)
    assert v.item() == pytest.approx(KD_075, rel=1e-6)


def _table(iou, teacher=None):
    t = {"iou": iou, "split": "val"}
    if teacher is not None:
        t["teacher_iou"] = teacher
    return t


def test_snapshot_classes_and_asd_pointless(tmp_path):
    import json

    from haskd.workflow.experts import asd_pointless, snapshot_classes

    iou = [[0.5, None, 0.2], [0.6, None, 0.1]]
    # no teacher in the pool: every class some snapshot scores has an expert of its own
    assert snapshot_classes(_table(iou)).tolist() == [True, False, True]
    # teacher at least as good on class 0 (tie -> teacher) and better on 2: nothing left to the snapshots
    assert snapshot_classes(_table(iou, [0.6, 0.9, 0.3]), teacher_expert=True).tolist() == [False, False, False]
    # a snapshot strictly better on class 0 keeps it; the teacher row is ignored without teacher_expert
    assert snapshot_classes(_table(iou, [0.59, 0.9, 0.3]), teacher_expert=True).tolist() == [True, False, False]
    assert snapshot_classes(_table(iou, [0.9, 0.9, 0.9])).tolist() == [True, False, True]
    p = tmp_path / "experts.json"
    p.write_text(json.dumps(_table(iou, [0.6, 0.9, 0.3])))
    assert "teacher is the expert of every class" in asd_pointless(p, teacher_expert=True)
    assert asd_pointless(p, teacher_expert=False) is None
    p.write_text(json.dumps(_table([[None, None], [None, None]])))
    assert "every class absent" in asd_pointless(p)


def test_snapshot_ensemble_is_the_mean_softmax():
    import torch

    from haskd.distill.asd import SnapshotEnsemble

    class Fixed(torch.nn.Module):
        def __init__(self, z):
            super().__init__()
            self.z = torch.tensor(z)

        def forward(self, batch):
            return {"logits": self.z}

    a, b = [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 2.0, 0.0], [0.0, 3.0, -1.0]]
    ens = SnapshotEnsemble([Fixed(a), Fixed(b)])
    p = torch.softmax(ens({})["logits"], -1)
    e2 = torch.e ** 2
    row0 = torch.tensor([e2 / (e2 + 2) + 1 / (e2 + 2), 1 / (e2 + 2) + e2 / (e2 + 2), 2 / (e2 + 2)]) / 2
    assert torch.allclose(p[0], row0, atol=1e-6)
    e3, em = torch.e ** 3, torch.e ** -1
    row1 = (torch.tensor([1 / 3, 1 / 3, 1 / 3]) + torch.tensor([1.0, e3, em]) / (1 + e3 + em)) / 2
    assert torch.allclose(p[1], row1, atol=1e-6)
    # a tie broken by the members: class 0 and 1 each win one member on row 0 with equal mass
    assert p[0, 0] == pytest.approx(p[0, 1].item())
