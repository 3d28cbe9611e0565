"""IHD losses against hand-computed values on tiny tensors.

Reference numbers (tau = 2, so tau^2 = 4):
  teacher logits [2 ln 3, 0] / tau -> p_t = [0.75, 0.25]; student logits [0, 0] -> p_s = [0.5, 0.5]
  KL(p_t || p_s) = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.1308120359;  tau^2 * KL = 0.5232481438
  target [1, 0] vs uniform: tau^2 * ln 2 = 2.7725887222
"""
import math

import pytest
import torch

from haskd.distill.ihd import IHDLoss, class_gates, classwise_heads, head_logits
from haskd.distill.kd import Projector, feature_loss, information_weights, kd_kl

LN3 = math.log(3.0)
KL_075 = 0.13081203594113697
KD_075_TAU2 = 4 * KL_075


def test_kd_kl_hand_value_logits():
    s = torch.zeros(1, 2)
    t = torch.tensor([[2 * LN3, 0.0]])
    assert kd_kl(s, t, tau=2.0).item() == pytest.approx(KD_075_TAU2, rel=1e-6)
    # tau = 1: teacher [ln 3, 0] gives the same p_t, no tau^2 factor.
    assert kd_kl(s, torch.tensor([[LN3, 0.0]]), tau=1.0).item() == pytest.approx(KL_075, rel=1e-6)


def test_kd_kl_weighted_mean():
    s = torch.zeros(2, 2)
    t = torch.tensor([[2 * LN3, 0.0], [0.0, 0.0]])  # second point: KL = 0
    w = torch.tensor([1.0, 3.0])
    # (1 * 0.52325 + 3 * 0) / (1 + 3)
    assert kd_kl(s, t, 2.0, w).item() == pytest.approx(KD_075_TAU2 / 4, rel=1e-6)
    assert kd_kl(s, t, 2.0).item() == pytest.approx(KD_075_TAU2 / 2, rel=1e-6)


def test_weighted_mean_without_weights_is_the_weighted_one_with_ones_bit_for_bit():
    from haskd.distill.kd import weighted_mean

    v = torch.randn(1000, generator=torch.Generator().manual_seed(0)).exp().requires_grad_()
    plain, ones = weighted_mean(v, None), weighted_mean(v, torch.ones(1000))
    assert torch.equal(plain, ones)
    assert torch.equal(torch.autograd.grad(plain, v)[0], torch.autograd.grad(ones, v)[0])
    assert weighted_mean(v[:0], None).item() == 0.0  # no point: 0, not NaN


def test_head_logits_takes_each_class_from_its_head():
    # fused [ln 3, 0, 0] -> p = [0.6, 0.2, 0.2]; 3D branch [0, ln 2, ln 2] -> p = [0.2, 0.4, 0.4]
    fused = torch.tensor([[LN3, 0.0, 0.0]])
    z3 = torch.tensor([[0.0, math.log(2.0), math.log(2.0)]])
    # class 0 from the fused head, 1 and 2 from the branch: [0.6, 0.4, 0.4] / 1.4
    p = torch.softmax(head_logits(fused, z3, [True, False, False]), -1)
    assert p[0].tolist() == pytest.approx([0.6 / 1.4, 0.4 / 1.4, 0.4 / 1.4], rel=1e-6)
    # class 0 from the branch, 1 and 2 from the fused head: [0.2, 0.2, 0.2] -> uniform
    p = torch.softmax(head_logits(fused, z3, [False, True, True]), -1)
    assert p[0].tolist() == pytest.approx([1 / 3] * 3, rel=1e-6)
    # all one head: that head's distribution, at any temperature
    for use, z in (([True] * 3, fused), ([False] * 3, z3)):
        assert torch.allclose(torch.softmax(head_logits(fused, z3, use) / 2, -1), torch.softmax(z / 2, -1))


def test_classwise_heads_picks_the_better_head_on_val():
    nan = float("nan")
    # 3D branch better on class 1 only; a tie, an absent class (None / NaN) keep the fused head
    assert classwise_heads([0.5, 0.2, 0.4, None, nan], [0.4, 0.6, 0.4, 0.9, 0.9]) == [True, False, True, True, True]
    with pytest.raises(ValueError):
        classwise_heads([0.5], [0.5, 0.5])


def test_ihd_norm_points_divides_by_the_point_count():
    s = torch.zeros(4, 2)
    t = torch.tensor([[2 * LN3, 0.0]] * 4)  # every point: KL = KD_075_TAU2 at tau 2
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])  # a rule that keeps one point of four
    assert kd_kl(s, t, 2.0, w).item() == pytest.approx(KD_075_TAU2, rel=1e-6)
    assert kd_kl(s, t, 2.0, w, norm="points").item() == pytest.approx(KD_075_TAU2 / 4, rel=1e-6)
    a, b = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # distances 2 and 0
    assert feature_loss(a, b, torch.tensor([1.0, 0.0])).item() == pytest.approx(2.0)
    assert feature_loss(a, b, torch.tensor([1.0, 0.0]), norm="points").item() == pytest.approx(1.0)
    ihd = IHDLoss(2, 2, tau=2.0, feat_weight=0, trust="image", norm="points")
    out = ihd({"logits": s}, {"logits": t, "image_right": w}, torch.zeros(4, dtype=torch.long))
    assert out["ihd_logit"].item() == pytest.approx(KD_075_TAU2 / 4, rel=1e-6)


def test_ihd_reads_only_the_targets_its_settings_use():
    assert IHDLoss(4, 4, feat_weight=0).target_keys == {"visible"}
    assert IHDLoss(4, 4, feat_weight=1).target_keys == {"visible", "feat"}
    assert IHDLoss(4, 4, feat_weight=0, trust="image").target_keys == {"visible", "image_right"}
    assert IHDLoss(4, 4, feat_weight=0, trust="image_soft").target_keys == {"visible", "gain"}
    assert IHDLoss(4, 4, feat_weight=0, image_gain=True).target_keys == {"visible", "gain"}


def test_kd_kl_probs_targets_used_as_given():
    s = torch.zeros(2, 2)
    p = torch.tensor([[0.75, 0.25], [1.0, 0.0]])  # second row: top-1 truncated target
    val = kd_kl(s, p, tau=2.0, target_kind="probs").item()
    assert val == pytest.approx((KD_075_TAU2 + 4 * math.log(2)) / 2, rel=1e-6)
    # unnormalised rows are renormalised: [2, 0] == [1, 0]
    assert kd_kl(s[:1], torch.tensor([[2.0, 0.0]]), 2.0, target_kind="probs").item() == pytest.approx(
        4 * math.log(2), rel=1e-6)
    # -inf logits (outside a top-k) give probability 0 and no NaN
    v = kd_kl(s[:1], torch.tensor([[0.0, float("-inf")]]), 2.0)
    assert v.item() == pytest.approx(4 * math.log(2), rel=1e-6)


def test_kd_kl_zero_weights_no_nan():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4)
    loss = kd_kl(s, t, 2.0, torch.zeros(3))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()
    empty = kd_kl(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4), 2.0)
    assert empty.item() == 0.0


def test_kd_kl_gradient_only_to_student():
    s = torch.zeros(2, 3, requires_grad=True)
    t = torch.randn(2, 3, requires_grad=True)
    kd_kl(s, t, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_information_weights_hard_soft_none():
    labels = torch.tensor([0, 2, -1, 2])
    logits = torch.tensor([
        [math.log(2.0), 0.0, 0.0],  # argmax 0 == label; p(label) = 2/4 = 0.5
        [0.0, LN3, 0.0],            # argmax 1 != label 2; p(label) = 1/5 = 0.2
        [5.0, 0.0, 0.0],            # unlabeled -> trust 1
        [0.0, 0.0, 9.0],            # right, but not visible
    ])
    visible = torch.tensor([True, True, True, False])
    assert information_weights(logits, labels, visible, "hard").tolist() == [1.0, 0.0, 1.0, 0.0]
    soft = information_weights(logits, labels, visible, "soft")
    assert soft.tolist() == pytest.approx([0.5, 0.2, 1.0, 0.0], abs=1e-6)
    assert information_weights(logits, labels, visible, "none").tolist() == [1.0, 1.0, 1.0, 0.0]
    # float visibility (fraction of a voxel's points seen) scales the weight; None = all visible
    frac = information_weights(logits, labels, torch.tensor([0.5, 1.0, 0.25, 1.0]), "hard")
    assert frac.tolist() == [0.5, 0.0, 0.25, 1.0]
    assert information_weights(logits, labels, None, "hard").tolist() == [1.0, 0.0, 1.0, 1.0]
    # probabilities as teacher output: soft trust reads them directly
    probs = torch.softmax(logits, -1)
    assert information_weights(probs, labels, visible, "soft", target_kind="probs").tolist() == pytest.approx(
        [0.5, 0.2, 1.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError):
        information_weights(logits, labels, visible, "maybe")


def test_unlabeled_confidence_gate():
    """distill.unlabeled_conf: an unlabeled point keeps its trust only where the target's top probability reaches
    the threshold; labeled points are never gated."""
    labels = torch.tensor([-1, -1, 0, -1])
    logits = torch.tensor([
        [5.0, 0.0, 0.0],            # unlabeled, top p = e^5 / (e^5 + 2) = 0.98670
        [0.0, 0.0, 0.0],            # unlabeled, top p = 1/3
        [0.0, 0.0, 0.0],            # labeled 0, p(label) = 1/3: kept, the label's trust rule decides
        [LN3, 0.0, 0.0],            # unlabeled, top p = 3/5 = 0.6
    ])
    top0 = math.exp(5) / (math.exp(5) + 2)
    assert information_weights(logits, labels, None, "none", unlabeled_conf=0.6).tolist() == [1.0, 0.0, 1.0, 1.0]
    assert information_weights(logits, labels, None, "none", unlabeled_conf=0.9).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert information_weights(logits, labels, None, "none", unlabeled_conf=top0 + 1e-4).tolist() == [0, 0, 1, 0]
    soft = information_weights(logits, labels, torch.tensor([1.0, 1.0, 0.5, 1.0]), "soft", unlabeled_conf=0.9)
    assert soft.tolist() == pytest.approx([1.0, 0.0, 0.5 / 3, 0.0], abs=1e-6)
    probs = torch.softmax(logits, -1)  # cached targets: the gate reads the probabilities as given
    assert information_weights(probs, labels, None, "hard", target_kind="probs",
                               unlabeled_conf=0.9).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert information_weights(logits, labels, None, "hard", unlabeled_conf=0.0).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_class_gates_hand_values():
    """distill.unlabeled_keep (ours): class k's gate is min(cap, the 1 - keep quantile of the top-1 probabilities of
    the targets naming k); a class no target names keeps the cap."""
    p = [0.9, 0.8, 0.7, 0.6, 0.99, 0.5]
    k = [0, 0, 0, 0, 1, 1]
    # medians: (0.7 + 0.8) / 2 and (0.5 + 0.99) / 2
    assert class_gates(p, k, 3, keep=0.5, cap=0.95).tolist() == pytest.approx([0.75, 0.745, 0.95])
    assert class_gates(p, k, 3, keep=1.0, cap=0.95).tolist() == pytest.approx([0.6, 0.5, 0.95])  # keep all
    # 0.75 quantiles: 0.8 + 0.25 * 0.1 = 0.825 and 0.5 + 0.75 * 0.49 = 0.8675; the cap 0.85 lowers the second
    assert class_gates(p, k, 3, keep=0.25, cap=0.85).tolist() == pytest.approx([0.825, 0.85, 0.85])
    with pytest.raises(ValueError):
        class_gates(p, k, 3, keep=0.0, cap=0.9)
    with pytest.raises(ValueError):
        class_gates(p, k[:-1], 3, keep=0.5, cap=0.9)


def test_per_class_confidence_gate():
    """A (C,) gate: an unlabeled point is gated by the gate of the class its target ranks first; a list in
    IHDLoss gives the same loss as a scalar gate where they keep the same points."""
    labels = torch.tensor([-1, -1, 0, -1])
    logits = torch.tensor([
        [5.0, 0.0, 0.0],            # unlabeled, class 0 at 0.98670
        [0.0, LN3, 0.0],            # unlabeled, class 1 at 0.6
        [0.0, 0.0, 0.0],            # labeled: never gated
        [0.0, 0.0, LN3],            # unlabeled, class 2 at 0.6
    ])
    w = information_weights(logits, labels, None, "none", unlabeled_conf=torch.tensor([0.99, 0.5, 0.7]))
    assert w.tolist() == [0.0, 1.0, 1.0, 0.0]
    w = information_weights(logits, labels, None, "none", unlabeled_conf=torch.tensor([0.98, 0.7, 0.5]))
    assert w.tolist() == [1.0, 0.0, 1.0, 1.0]
    probs = torch.softmax(logits, -1)
    w = information_weights(probs, labels, None, "none", target_kind="probs",
                            unlabeled_conf=torch.tensor([0.98, 0.7, 0.5]))
    assert w.tolist() == [1.0, 0.0, 1.0, 1.0]
    torch.manual_seed(0)
    s = {"logits": torch.randn(4, 3)}
    per_class = IHDLoss(2, 2, tau=2.0, feat_weight=0.0, trust="none", unlabeled_conf=[0.98, 0.7, 0.5])
    scalar = IHDLoss(2, 2, tau=2.0, feat_weight=0.0, trust="none", unlabeled_conf=0.65)  # of the unlabeled: point 0
    per_class0 = IHDLoss(2, 2, tau=2.0, feat_weight=0.0, trust="none", unlabeled_conf=[0.98, 0.7, 0.7])
    assert per_class0(s, {"logits": logits}, labels)["ihd_logit"].item() == pytest.approx(
        scalar(s, {"logits": logits}, labels)["ihd_logit"].item(), rel=1e-6)
    assert per_class(s, {"logits": logits}, labels)["ihd_logit"].item() != pytest.approx(
        scalar(s, {"logits": logits}, labels)["ihd_logit"].item(), rel=1e-3)


def test_feature_loss_hand_value():
    a = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [1.0, 0.0], [-1.0, 0.0]])
    # per point: orthogonal -> 2, same direction -> 0, opposite -> 4
    assert feature_loss(a, b).item() == pytest.approx(2.0, rel=1e-6)
    assert feature_loss(a, b, torch.tensor([1.0, 1.0, 2.0])).item() == pytest.approx((2 + 0 + 8) / 4, rel=1e-6)
    assert feature_loss(a, b, torch.zeros(3)).item() == 0.0


def _identity_projector(loss: IHDLoss):
    with torch.no_grad():
        loss.projector.linear.weight.copy_(torch.eye(2))
        loss.projector.linear.bias.zero_()


def test_ihd_loss_module_hand_value_and_keys():
    loss = IHDLoss(student_dim=2, teacher_dim=2, tau=2.0, logit_weight=0.5, feat_weight=2.0, trust="hard")
    _identity_projector(loss)
    s_logits = torch.zeros(2, 2, requires_grad=True)
    s_feat = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    t_logits = torch.tensor([[2 * LN3, 0.0], [0.0, 2 * LN3]], requires_grad=True)
    t_feat = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0])  # teacher wrong on point 1 -> weight 0 there
    out = loss({"logits": s_logits, "feat": s_feat},
               {"logits": t_logits, "feat": t_feat, "visible": torch.tensor([1, 1])}, labels)
    assert set(out) == {"ihd_logit", "ihd_feat"}
    assert out["ihd_logit"].item() == pytest.approx(0.5 * KD_075_TAU2, rel=1e-6)
    assert out["ihd_feat"].item() == pytest.approx(2.0 * 2.0, rel=1e-6)
    sum(out.values()).backward()
    assert t_logits.grad is None and t_feat.grad is None  # frozen teacher
    assert s_logits.grad.abs().sum() > 0 and s_feat.grad is not None
    assert loss.projector.linear.weight.grad is not None


def test_ihd_loss_skips_feature_term():
    s = {"logits": torch.randn(4, 3), "feat": torch.randn(4, 5)}
    labels = torch.tensor([0, 1, -1, 2])
    out = IHDLoss(5, 7)(s, {"logits": torch.randn(4, 3), "feat": None}, labels)
    assert set(out) == {"ihd_logit"}
    out = IHDLoss(5, 7, feat_weight=0.0)(s, {"logits": torch.randn(4, 3), "feat": torch.randn(4, 7)}, labels)
    assert set(out) == {"ihd_logit"}
    out = IHDLoss(5, 7)(s, {"probs": torch.softmax(torch.randn(4, 3), -1), "feat": torch.randn(4, 7)}, labels)
    assert set(out) == {"ihd_logit", "ihd_feat"} and all(torch.isfinite(v) for v in out.values())


def test_projector_shape_and_not_in_student():
    p = Projector(8, 16)
    assert p(torch.randn(5, 8)).shape == (5, 16)
    # the projector belongs to the loss module, so a student's state dict never holds it
    assert any(k.startswith("projector.") for k in IHDLoss(8, 16).state_dict())


def test_image_gain_hand_values():
    from haskd.distill.ihd import image_gain

    # point 0: images raise p(y=0) from 0.5 to 0.75 -> 0.25; point 1: images lower it -> 0; point 2: unlabeled -> 0
    fused = torch.tensor([[LN3, 0.0], [0.0, LN3], [5.0, 0.0]])
    three = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    g = image_gain(fused, three, torch.tensor([0, 0, -1]))
    assert g.tolist() == pytest.approx([0.25, 0.0, 0.0], abs=1e-6)


def test_image_gain_weights_the_ihd_terms():
    s = {"logits": torch.zeros(2, 2), "feat": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    t = {"logits": torch.tensor([[2 * LN3, 0.0], [2 * LN3, 0.0]]), "feat": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
         "visible": torch.tensor([1, 1])}
    labels = torch.tensor([0, 0])
    plain = IHDLoss(2, 2, tau=2.0, trust="hard")
    gain = IHDLoss(2, 2, tau=2.0, trust="hard", image_gain=True)
    _identity_projector(plain)
    _identity_projector(gain)
    # all weight on point 0 (feature distance 2) instead of the mean over both points (distance 1)
    out = gain(s, {**t, "gain": torch.tensor([0.4, 0.0])}, labels)
    assert out["ihd_feat"].item() == pytest.approx(2.0, rel=1e-6)
    assert plain(s, t, labels)["ihd_feat"].item() == pytest.approx(1.0, rel=1e-6)
    assert out["ihd_logit"].item() == pytest.approx(KD_075_TAU2, rel=1e-6)  # same KL at both points
    with pytest.raises(ValueError, match="gain"):
        gain(s, t, labels)


def test_hint_loss_hand_value_identity_init_and_gradient():
    """HintLoss: mean over levels of the normalised squared distance; identity projectors where widths agree."""
    from haskd.distill.hints import HintLoss

    h = HintLoss((2, 3), (2, 4), weight=2.0)
    assert torch.equal(h.projectors[0].linear.weight, torch.eye(2))  # same width: identity to start
    with torch.no_grad():  # level 1 (3 -> 4): a fixed map, so the value is hand-computable
        h.projectors[1].linear.weight.copy_(torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]))
        h.projectors[1].linear.bias.zero_()
    s0 = torch.tensor([[1., 0.], [0., 2.]], requires_grad=True)
    t0 = torch.tensor([[0., 3.], [0., 1.]])  # row 0 orthogonal: |e1 - e2|^2 = 2; row 1 same direction: 0
    s1 = torch.tensor([[1., 0., 0.]], requires_grad=True)
    t1 = torch.tensor([[-2., 0., 0., 0.]])   # opposite: 4
    out = h([s0, s1], [t0, t1])
    assert set(out) == {"ihd_hint"}
    # level means: (2 + 0) / 2 = 1 and 4; mean over levels 2.5; weight 2
    assert out["ihd_hint"].item() == pytest.approx(5.0, abs=1e-6)
    out["ihd_hint"].backward()
    assert s0.grad is not None and s1.grad is not None and not t0.requires_grad
    assert h([t0.clone(), s1], [t0, torch.tensor([[1., 0., 0., 0.]])])["ihd_hint"].item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="rows differ"):
        h([s0, s1], [t0[:1], t1])
    with pytest.raises(ValueError, match="levels"):
        HintLoss((2,), (2, 3))


def test_nontarget_kl_hand_value_and_label_gradient():
    """kd_target=nontarget (ours): KL over the non-label classes, both sides renormalised; unlabeled rows keep the
    full KL; the label's own logit gets no gradient from it (CE alone moves it)."""
    from haskd.distill.kd import kl_per_point, kl_per_point_nontarget

    s = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    y = torch.tensor([0, -1])
    # row 0: target [.3, .2] -> [.6, .4] over classes 1, 2; student softmax([1, 2]) = [1, e] / (1 + e)
    q1, q2 = 1 / (1 + math.e), math.e / (1 + math.e)
    ref0 = 0.6 * math.log(0.6 / q1) + 0.4 * math.log(0.4 / q2)
    out = kl_per_point_nontarget(s, t, y, tau=1.0)
    assert out[0].item() == pytest.approx(ref0, rel=1e-5)
    assert out[1].item() == pytest.approx(kl_per_point(s, t, 1.0)[1].item(), rel=1e-6)
    out[0].backward()
    assert s.grad[0, 0].item() == 0.0 and s.grad[0, 1].item() != 0.0
    # all target mass on the label: nothing left to distil
    one = kl_per_point_nontarget(torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]), tau=2.0)
    assert one.item() == 0.0 and torch.isfinite(one).all()
    with pytest.raises(ValueError, match="labels"):
        kd_kl(torch.zeros(1, 3), torch.zeros(1, 3), kd_target="nontarget")
    loss = IHDLoss(3, 3, tau=1.0, feat_weight=0, trust="none", kd_target="nontarget")
    assert loss({"logits": s.detach()}, {"probs": t}, y)["ihd_logit"].item() == pytest.approx(
        (ref0 + out[1].item()) / 2, rel=1e-5)


def test_unused_feature_projector_is_frozen():
    """feat_weight = 0: the projector stays in the state dict (one shape across ablations) but takes no gradient,
    so the optimiser skips it and DDP (find_unused_parameters=False) does not wait for it."""
    off, on = IHDLoss(4, 3, feat_weight=0), IHDLoss(4, 3, feat_weight=1)
    assert set(off.state_dict()) == set(on.state_dict())
    assert not any(p.requires_grad for p in off.parameters())
    assert all(p.requires_grad for p in on.parameters())


def test_class_balance_hand_values_and_ihd_weights():
    from haskd.distill.kd import class_balance

    # classes [0, 0, 0, 1]: N = 4, K = 2 -> 4 / (2 * 3) for class 0, 4 / (2 * 1) for class 1; mean 1
    b = class_balance(torch.tensor([0, 0, 0, 1]), 3)
    assert b.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])
    assert b.mean().item() == pytest.approx(1.0)
    assert class_balance(torch.zeros(0, dtype=torch.long), 3).numel() == 0
    # IHD: points 0-2 are class 0 with KL 0; point 3 is unlabeled, the teacher's argmax (class 1) is its class,
    # KL 0.1308 (tau 1). Plain mean: 0.1308 / 4; balanced: (2 * 0.1308) / (3 * 2/3 + 2) = 0.1308 / 2.
    t = torch.tensor([[0.0, 0.0]] * 3 + [[0.0, LN3]])
    s = torch.zeros(4, 2)
    labels = torch.tensor([0, 0, 0, -1])
    kw = dict(student_dim=2, teacher_dim=2, tau=1.0, feat_weight=0.0, trust="none")
    plain = IHDLoss(**kw)({"logits": s}, {"logits": t}, labels)["ihd_logit"].item()
    bal = IHDLoss(**kw, class_balance=True)({"logits": s}, {"logits": t}, labels)["ihd_logit"].item()
    assert plain == pytest.approx(KL_075 / 4, rel=1e-6)
    assert bal == pytest.approx(KL_075 / 2, rel=1e-6)


def test_image_right_hand_values():
    from haskd.distill.ihd import image_right

    fused = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    three = torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 0, -1, 1])
    # 0: fused right, 3D wrong -> 1; 1: both right -> 0; 2: both wrong -> 0; 3: unlabeled -> 0;
    # 4: 3D right, fused wrong -> 0
    assert image_right(fused, three, labels).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_image_trust_weights_hand_values():
    """trust=image / image_soft: the weight is the image rule (times visibility), unlabeled points 0; the logit
    term is the KL mean over the points the images made right."""
    from haskd.distill.ihd import image_gain, image_right

    fused = torch.tensor([[LN3, 0.0], [LN3, 0.0], [0.0, LN3], [5.0, 0.0]])  # p(0) = 0.75, 0.75, 0.25, ~1
    three = torch.tensor([[0.0, 0.0], [LN3, 0.0], [0.0, 0.0], [0.0, 0.0]])  # p(0) = 0.5 (argmax 0: a tie), 0.75
    three[0, 1] = 0.1  # point 0: the 3D branch leans to class 1 (wrong); p_3d(0) = 1 / (1 + e^0.1)
    labels = torch.tensor([0, 0, 0, -1])
    hard = image_right(fused, three, labels)
    assert hard.tolist() == [1.0, 0.0, 0.0, 0.0]
    soft = image_gain(fused, three, labels)
    assert soft.tolist() == pytest.approx([0.75 - 1 / (1 + math.exp(0.1)), 0.0, 0.0, 0.0], abs=1e-6)
    vis = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert information_weights(fused, labels, vis, trust="image", image=hard).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert information_weights(fused, labels, torch.tensor([0.0, 1, 1, 1]), trust="image_soft",
                               image=soft).tolist() == [0.0, 0.0, 0.0, 0.0]  # not seen: no image knowledge
    with pytest.raises(ValueError, match="image"):
        information_weights(fused, labels, trust="image")
    # the loss module picks the rule from the teacher dict: all weight on point 0 (KL 0.5232), none elsewhere
    s = {"logits": torch.zeros(4, 2), "feat": torch.zeros(4, 2)}
    t = {"logits": 2 * fused, "visible": vis, "image_right": hard, "gain": soft}
    for trust in ("image", "image_soft"):
        out = IHDLoss(2, 2, tau=2.0, trust=trust, feat_weight=0)(s, t, labels)
        assert out["ihd_logit"].item() == pytest.approx(KD_075_TAU2, rel=1e-5), trust
    with pytest.raises(ValueError, match="image_right"):
        IHDLoss(2, 2, trust="image")(s, {"logits": 2 * fused}, labels)
    with pytest.raises(ValueError, match="trust"):
        IHDLoss(2, 2, trust="images")


def test_image_shift_hand_values_and_weights():
    """trust=image_shift: the weight is the total-variation distance between the fused and 3D-branch heads' softmax,
    labels or none (times visibility); the logit term is the weighted mean of the KL."""
    from haskd.distill.ihd import image_shift

    fused = torch.tensor([[LN3, 0.0], [LN3, 0.0], [0.0, 0.0], [LN3, 0.0]])  # p(0) = 0.75, 0.75, 0.5, 0.75
    three = torch.tensor([[0.0, LN3], [LN3, 0.0], [0.0, 0.0], [0.0, 0.0]])  # p(0) = 0.25, 0.75, 0.5, 0.5
    shift = image_shift(fused, three)
    # 0.5 * (|0.75 - 0.25| + |0.25 - 0.75|) = 0.5; equal heads 0; point 3: 0.5 * (0.25 + 0.25) = 0.25
    assert shift.tolist() == pytest.approx([0.5, 0.0, 0.0, 0.25], abs=1e-6)
    labels = torch.tensor([-1, 0, -1, 1])  # unlabeled or not, wrong or right: the rule ignores labels
    vis = torch.tensor([1.0, 1.0, 1.0, 0.0])
    w = information_weights(fused, labels, vis, trust="image_shift", image=shift)
    assert w.tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0], abs=1e-6)  # point 3 unseen
    # the loss reads "shift" from the teacher dict; only point 0 weighs: the KL of the 0.75 target at tau 2 there
    s = {"logits": torch.zeros(4, 2)}
    t = {"logits": 2 * fused, "visible": torch.ones(4), "shift": shift}
    loss = IHDLoss(2, 2, tau=2.0, trust="image_shift", feat_weight=0)(s, t, labels)["ihd_logit"].item()
    kl = [KD_075_TAU2, KD_075_TAU2, 0.0, KD_075_TAU2]  # per point, the tau^2-scaled KL (point 2's target is flat)
    assert loss == pytest.approx((0.5 * kl[0] + 0.25 * kl[3]) / 0.75, rel=1e-5)
    assert IHDLoss(4, 4, feat_weight=0, trust="image_shift").target_keys == {"visible", "shift"}
    with pytest.raises(ValueError, match="shift"):
        IHDLoss(2, 2, trust="image_shift")(s, {"logits": 2 * fused}, labels)


def test_image_trust_is_a_closed_choice_of_distill_trust_only():
    from haskd.config import load_config
    from haskd.errors import HaskdError

    assert load_config("scannet20_haskd", ["distill.trust=image"]).distill.trust == "image"
    assert load_config("scannet20_haskd", ["distill.trust=image_soft"]).distill.trust == "image_soft"
    assert load_config("scannet20_haskd", ["distill.trust=image_shift"]).distill.trust == "image_shift"
    with pytest.raises(HaskdError, match="asd_trust"):
        load_config("scannet20_haskd", ["distill.asd_trust=image"])
