"""IHD losses against hand-computed values on tiny tensors.

Reference numbers (tau = 2, so tau^2 = 4):
  teacher logits [2 ln 3, 0] / tau -> p_t = [0.75, 0.25]; student logits [0, 0] -> p_s = [0.5, 0.5]
  KL(p_t || p_s) = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.1308120359;  tau^2 * KL = 0.5232481438
  target [1, 0] vs uniform: tau^2 * ln 2 = 2.7725887222
"""
import math

import pytest
import torch

from haskd.ihd import IHDLoss, Projector, feature_loss, information_weights, kd_kl

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
    from haskd.ihd import image_gain

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
