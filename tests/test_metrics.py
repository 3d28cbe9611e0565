import numpy as np

from haskd.engine.metrics import ConfusionMatrix


def reference(pred, gt, C):
    ious = []
    for c in range(C):
        p, g = pred == c, gt == c
        union = (p | g)[gt >= 0].sum()
        inter = (p & g)[gt >= 0].sum()
        ious.append(inter / union if union else None)
    return ious


def test_against_numpy_reference():
    rng = np.random.default_rng(0)
    C = 6
    gt = rng.integers(-1, C - 1, 5000)  # class C-1 never in labels
    pred = rng.integers(0, C - 1, 5000)  # ... nor predicted -> null
    cm = ConfusionMatrix(C)
    cm.update(pred[:2000], gt[:2000])
    cm.update(pred[2000:], gt[2000:])
    m = cm.compute([f"c{i}" for i in range(C)])
    ref = reference(pred, gt, C)
    assert m["per_class_iou"]["c5"] is None and ref[5] is None
    for c in range(C - 1):
        assert abs(m["per_class_iou"][f"c{c}"] - ref[c]) < 1e-12
    assert abs(m["miou"] - np.mean([r for r in ref if r is not None])) < 1e-12
    ok = gt >= 0
    assert abs(m["allacc"] - (pred[ok] == gt[ok]).mean()) < 1e-12
    accs = [((pred == c) & (gt == c)).sum() / (gt == c).sum() for c in range(C - 1)]
    assert abs(m["macc"] - np.mean(accs)) < 1e-12


def test_class_only_predicted_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 2]), np.array([0, 1, 1]))
    m = cm.compute()
    assert m["per_class_iou"]["2"] == 0.0 and m["per_class_iou"]["1"] == 0.5
