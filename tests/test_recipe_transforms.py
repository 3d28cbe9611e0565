"""Pointcept's training augmentations (haskd/data/transforms.py): each one's invariants, and the same output for
the same seed."""
import numpy as np
import pytest
import torch

from haskd.data import transforms as T


def _cloud(n=4000, seed=0, extent=(4.0, 3.0, 2.5)):
    rng = np.random.default_rng(seed)
    coord = (rng.random((n, 3)) * np.array(extent) + np.array([10.0, -5.0, 1.0])).astype(np.float32)
    color = rng.integers(20, 230, (n, 3)).astype(np.float32)
    normal = rng.standard_normal((n, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    seg = rng.integers(-1, 5, n)
    return coord, color, normal, seg


def _same_for_seed(fn):
    a, b, c = fn(np.random.default_rng(3)), fn(np.random.default_rng(3)), fn(np.random.default_rng(4))
    flat = lambda x: np.concatenate([np.ravel(v) for v in (x if isinstance(x, tuple) else (x,)) if v is not None])
    assert np.array_equal(flat(a), flat(b))
    assert not np.array_equal(flat(a), flat(c))


def _pdist(x, k=50):
    return np.linalg.norm(x[:k, None] - x[None, :k], axis=-1)


def test_center_shift_puts_the_floor_centre_at_the_origin():
    coord = _cloud()[0]
    c = T.center_shift(coord)
    assert np.allclose((c.min(0) + c.max(0))[:2] / 2, 0, atol=1e-5) and abs(c[:, 2].min()) < 1e-6
    assert np.allclose(T.center_shift(coord, apply_z=False)[:, 2], coord[:, 2])


def test_random_dropout_keeps_80_percent_with_probability_p():
    assert T.random_dropout(1000, np.random.default_rng(0), 0.2, p=0.0) is None
    keep = T.random_dropout(1000, np.random.default_rng(0), 0.2, p=1.0)
    assert keep.shape == (800,) and np.unique(keep).shape == (800,) and (np.diff(keep) > 0).all()
    hits = sum(T.random_dropout(100, np.random.default_rng(s), 0.2, 0.2) is not None for s in range(400))
    assert 50 < hits < 110  # about 0.2 * 400
    _same_for_seed(lambda r: T.random_dropout(500, r, 0.2, 1.0))


@pytest.mark.parametrize("axis,angle", [("z", (-1.0, 1.0)), ("x", (-1 / 64, 1 / 64)), ("y", (-1 / 64, 1 / 64))])
def test_random_rotate_is_rigid_and_bounded(axis, angle):
    coord, _, normal, _ = _cloud()
    c, n = T.random_rotate(coord, normal, np.random.default_rng(1), axis, angle, p=1.0)
    assert np.allclose(_pdist(c), _pdist(coord), atol=1e-4)
    assert np.allclose(np.linalg.norm(n, axis=1), 1, atol=1e-5)
    # the rotation angle: between a normal and its image, never more than the range allows
    cos = (n * normal).sum(1)
    assert np.arccos(np.clip(cos, -1, 1)).max() <= max(abs(a) for a in angle) * np.pi + 1e-4
    if axis == "z":
        assert np.allclose(c[:, 2], coord[:, 2], atol=1e-5)
    same = T.random_rotate(coord, normal, np.random.default_rng(1), axis, angle, p=0.0)
    assert same[0] is coord
    _same_for_seed(lambda r: T.random_rotate(coord, normal, r, axis, angle, p=1.0))


def test_random_scale_flip_and_jitter():
    coord, _, normal, _ = _cloud()
    s = T.random_scale(coord, np.random.default_rng(2), (0.9, 1.1))
    ratio = s / coord
    assert np.allclose(ratio, ratio[0, 0], rtol=1e-5) and 0.9 <= ratio[0, 0] <= 1.1
    f, fn = T.random_flip(coord, normal, np.random.default_rng(2), p=1.0)
    assert np.array_equal(f[:, :2], -coord[:, :2]) and np.array_equal(f[:, 2], coord[:, 2])
    assert np.array_equal(fn[:, :2], -normal[:, :2])
    j = T.random_jitter(coord, np.random.default_rng(2), 0.005, 0.02)
    d = j - coord
    assert np.abs(d).max() <= 0.02 + 1e-6 and 0.003 < d.std() < 0.007
    for fn_ in (lambda r: T.random_scale(coord, r), lambda r: T.random_flip(coord, normal, r, 0.5),
                lambda r: T.random_jitter(coord, r)):
        _same_for_seed(fn_)


def test_elastic_distortion_is_smooth_and_seeded():
    coord = _cloud(6000)[0]
    e = T.elastic_distortion(coord, np.random.default_rng(5), ((0.2, 0.4), (0.8, 1.6)), p=1.0)
    d = e - coord
    assert np.isfinite(e).all() and np.abs(d).max() > 0.01  # it moves points
    # smooth: points 2 cm apart move almost alike (far less than the displacement itself)
    i, j = np.nonzero(np.linalg.norm(coord[:400, None] - coord[None, :400], axis=-1) < 0.05)
    diff = np.linalg.norm(d[i] - d[j], axis=1).max()
    assert diff < 0.25 * np.linalg.norm(d, axis=1).max()
    assert T.elastic_distortion(coord, np.random.default_rng(5), p=0.0) is coord
    _same_for_seed(lambda r: T.elastic_distortion(coord, r, p=1.0))


def test_chromatic_augmentations_stay_in_range():
    color = _cloud()[1]
    ac = T.chromatic_auto_contrast(color, np.random.default_rng(0), p=1.0, blend=1.0)
    assert np.allclose(ac.min(0), 0, atol=1e-3) and np.allclose(ac.max(0), 255, atol=1e-3)
    assert T.chromatic_auto_contrast(color, np.random.default_rng(0), p=0.0) is color
    tr = T.chromatic_translation(color, np.random.default_rng(0), p=1.0, ratio=0.05)
    d = tr - color
    assert np.allclose(d, d[0], atol=1e-3) and np.abs(d[0]).max() <= 0.05 * 255 + 1e-3  # one offset per channel
    jt = T.chromatic_jitter(color, np.random.default_rng(0), p=1.0, std=0.05)
    assert jt.min() >= 0 and jt.max() <= 255 and 0.04 * 255 < (jt - color).std() < 0.06 * 255
    for fn in (lambda r: T.chromatic_auto_contrast(color, r, p=1.0), lambda r: T.chromatic_translation(color, r, 1.0),
               lambda r: T.chromatic_jitter(color, r, 1.0)):
        _same_for_seed(fn)


def test_grid_sample_takes_one_random_point_of_every_voxel():
    coord, color, normal, seg = _cloud()
    vs = 0.25
    sel, inv, grid = T.grid_sample(coord, vs, np.random.default_rng(0))
    g = np.floor(coord / vs).astype(np.int64)
    g -= g.min(0)
    assert np.unique(T.grid_keys(grid)).shape[0] == grid.shape[0] == sel.shape[0]  # one point per voxel
    assert (g[sel] == grid).all() and (grid[inv] == g).all()  # the chosen point lies in its voxel; inverse agrees
    sel2 = T.grid_sample(coord, vs, np.random.default_rng(1))[0]
    counts = np.bincount(inv)
    expected = 1 - (1 / counts).mean()  # a uniform pick differs from another with this probability
    assert abs((sel2 != sel).mean() - expected) < 0.05
    _same_for_seed(lambda r: T.grid_sample(coord, vs, r)[0])
    v = T.sample_voxels(coord, color, seg, normal, vs, np.random.default_rng(0))
    assert (v["segment"] == seg[v["select"]]).all() and np.array_equal(v["color"], color[v["select"]])
    assert np.array_equal(v["inverse"], inv) and np.array_equal(v["coord"], coord[sel])


def test_grid_fragments_cover_every_point():
    coord = _cloud(3000)[0]
    frags, g = T.grid_fragments(coord, 0.3)
    counts = np.bincount(np.unique(T.grid_keys(g), return_inverse=True)[1].reshape(-1))
    assert len(frags) == counts.max()
    allp = np.concatenate(frags)
    assert np.array_equal(np.unique(allp), np.arange(coord.shape[0]))  # every point in some fragment
    for f in frags:  # each fragment: one point of every voxel
        assert f.shape[0] == counts.shape[0] == np.unique(T.grid_keys(g[f])).shape[0]


def test_crop_by_rate_then_count_and_shuffle():
    coord, color, _, seg = _cloud(5000)
    v = T.sample_voxels(coord, color, seg, None, 0.1, np.random.default_rng(0))
    V = v["grid_coord"].shape[0]
    c = T.crop(v, 200, np.random.default_rng(0), rate=0.6)
    assert c["grid_coord"].shape[0] == 200
    c2 = T.crop(v, 10 ** 6, np.random.default_rng(0), rate=0.6)
    assert c2["grid_coord"].shape[0] == int(0.6 * V)
    s = T.shuffle_voxels(c, np.random.default_rng(1))
    kept = c["inverse"] >= 0
    assert np.array_equal(kept, s["inverse"] >= 0)
    assert np.array_equal(s["grid_coord"][s["inverse"][kept]], c["grid_coord"][c["inverse"][kept]])
    assert not np.array_equal(s["grid_coord"], c["grid_coord"])
    _same_for_seed(lambda r: T.shuffle_voxels(c, r)["grid_coord"])


def test_pointcept_train_voxels_keeps_the_point_map():
    coord, color, normal, seg = _cloud(5000)
    kw = dict(voxel_size=0.1, num_classes=5, max_points=800, elastic=False, shuffle=True)
    a = T.pointcept_train_voxels(coord, color, seg, normal, np.random.default_rng(7), **kw)
    b = T.pointcept_train_voxels(coord, color, seg, normal, np.random.default_rng(7), **kw)
    for k in ("grid_coord", "color", "inverse", "world", "segment"):
        assert np.array_equal(a[k], b[k])
    inv = a["inverse"]
    assert inv.shape == (5000,) and a["grid_coord"].shape[0] == 800 and inv.max() == 799
    ok = inv >= 0
    # a voxel's scene-frame position is its chosen point's: every point of the voxel lies near it
    assert np.linalg.norm(a["world"][inv[ok]] - coord[ok], axis=1).max() < 0.1 * np.sqrt(3) * 1.2 + 0.05
    assert a["color"].min() >= 0 and a["color"].max() <= 255 and np.allclose(np.linalg.norm(a["normal"], axis=1), 1,
                                                                             atol=1e-4)


def _toy(n, rng, extent=2.0):
    coord = (rng.random((n, 3)) * extent).astype(np.float32)
    v = T.voxelize(coord, np.zeros((n, 3), np.float32), rng.integers(0, 3, n), None, 0.2, 3)
    return {"scene": "s", "coord": v["coord"], "grid_coord": v["grid_coord"], "feat": v["color"],
            "segment": v["segment"], "inverse": v["inverse"], "world": v["coord"], "mix": True}


def test_mix3d_overlays_pairs_and_keeps_per_point_maps():
    rng = np.random.default_rng(0)
    samples = [_toy(800, rng), _toy(600, rng, 1.0), _toy(500, rng)]
    b = T.collate(samples)
    assert b["offset"].shape == (2,) and b["point_offset"].tolist() == [800, 1400, 1900]  # scenes (0+1), (2)
    coords = torch.cat([b["batch"][:, None], b["grid_coord"]], 1)
    assert torch.unique(coords, dim=0).shape[0] == coords.shape[0]  # voxels stay unique after the overlay
    inv = b["inverse"]
    # each point still maps to a voxel carrying its own sample's values; the second scene loses only shared voxels
    va = samples[0]["grid_coord"].shape[0]
    assert torch.equal(inv[:800], torch.from_numpy(samples[0]["inverse"]))
    second = inv[800:1400]
    assert ((second >= va) | (second == -1)).all() and (second >= 0).float().mean() > 0.3
    assert (inv[1400:] >= b["offset"][0]).all()
    keep = second >= 0
    seg_b = torch.from_numpy(samples[1]["segment"][samples[1]["inverse"]])
    assert torch.equal(b["segment"][second[keep]], seg_b[keep])
    plain = T.collate([{k: v for k, v in s.items() if k != "mix"} for s in samples])
    assert plain["offset"].tolist() == [samples[0]["grid_coord"].shape[0],
                                        samples[0]["grid_coord"].shape[0] + samples[1]["grid_coord"].shape[0],
                                        sum(s["grid_coord"].shape[0] for s in samples)]


def test_lovasz_softmax_is_one_minus_iou_on_hard_predictions():
    from haskd.engine.tasks import lovasz_softmax

    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.integers(-1, 4, 300))
    pred = torch.from_numpy(rng.integers(0, 5, 300))
    logits = torch.nn.functional.one_hot(pred, 5).float() * 1e4  # softmax = one-hot
    v = y >= 0
    ious = []
    for c in torch.unique(y[v]):  # classes present in the labels, as Pointcept's classes="present"
        a, b = y[v] == c, pred[v] == c
        ious.append((a & b).sum().item() / (a | b).sum().item())
    assert lovasz_softmax(logits, y).item() == pytest.approx(1 - np.mean(ious), abs=1e-6)
    perfect = torch.nn.functional.one_hot(y.clamp(min=0), 5).float() * 1e4
    assert lovasz_softmax(perfect, y).item() == pytest.approx(0.0, abs=1e-6)
    soft = torch.randn(300, 5, requires_grad=True)
    lovasz_softmax(soft, y).backward()
    assert torch.isfinite(soft.grad).all() and soft.grad[~v].abs().sum() == 0  # ignored points get no gradient
