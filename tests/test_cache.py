"""Soft-label cache: round trip, documented top-k truncation, and cached == online targets (unaugmented)."""
import json
import math

import numpy as np
import pytest
import torch

from haskd.distill.asd import asd_loss
from haskd.distill.cache import (dense_logits_from_topk, gather_to_voxels, load_scene_cache, read_manifest, topk_probs,
                         write_scene_cache)
from haskd.errors import HaskdError, InputError
from haskd.distill.ihd import IHDLoss
from haskd.distill.kd import kd_kl


def test_topk_truncation_hand_values(tmp_path):
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    write_scene_cache(tmp_path, "s", logits, topk=2)
    c = load_scene_cache(tmp_path, "s")
    # kept: classes 1 and 2, best first, stored relative to the max logit (3): [0, -1]
    assert c["topk_index"].tolist() == [[1, 2]] and c["topk_index"].dtype == np.int16
    assert c["topk_logits"].tolist() == [[0.0, -1.0]] and c["topk_logits"].dtype == np.float16
    dense = dense_logits_from_topk(c["topk_logits"], c["topk_index"], c["num_classes"])
    assert dense.tolist() == [[-math.inf, 0.0, -1.0, -math.inf]]
    # tau = 1: e / (e + 1) = 0.7310586; tau = 2: 1 / (1 + e^-0.5) = 0.6224593
    p1 = topk_probs(c["topk_logits"], c["topk_index"], 4, tau=1.0)
    np.testing.assert_allclose(p1.numpy(), [[0.0, 0.7310586, 0.2689414, 0.0]], atol=1e-6)
    p2 = topk_probs(c["topk_logits"], c["topk_index"], 4, tau=2.0)
    np.testing.assert_allclose(p2.numpy(), [[0.0, 0.6224593, 0.3775407, 0.0]], atol=1e-6)
    # dense logits with -inf give the same truncated target through the loss
    s = torch.zeros(1, 4)
    assert kd_kl(s, dense, 2.0).item() == pytest.approx(kd_kl(s, p2, 2.0, target_kind="probs").item(), rel=1e-6)


def test_round_trip_manifest_and_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 6, generator=g) * 3
    feat = torch.randn(50, 4, generator=g)
    vis = torch.rand(50, generator=g) > 0.5
    path = write_scene_cache(tmp_path, "scene0000_00", logits, feat=feat, visible=vis)  # default: all classes
    assert path.name == "scene0000_00.npz"
    m = read_manifest(tmp_path)
    assert (m["topk"], m["num_classes"], m["feat_dim"], m["lead_shape"]) == (6, 6, 4, [])
    assert json.loads((tmp_path / "manifest.json").read_text())["format"] == "haskd-soft-label-cache"
    c = load_scene_cache(tmp_path, "scene0000_00", expected_points=50)
    dense = dense_logits_from_topk(c["topk_logits"], c["topk_index"], 6)
    rel = logits - logits.max(1, keepdim=True).values
    np.testing.assert_allclose(dense.numpy(), rel.numpy(), atol=2e-2)  # fp16 of values up to ~20
    np.testing.assert_allclose(c["feat"].astype(np.float32), feat.numpy(), atol=2e-3)
    assert c["visible"].dtype == bool and (c["visible"] == vis.numpy()).all()

    with pytest.raises(HaskdError):  # same dir, other settings
        write_scene_cache(tmp_path, "other", logits, topk=3)
    with pytest.raises(InputError):
        load_scene_cache(tmp_path, "missing")
    with pytest.raises(InputError):
        load_scene_cache(tmp_path, "scene0000_00", expected_points=49)
    with pytest.raises(InputError):
        load_scene_cache(tmp_path / "nowhere", "scene0000_00")
    with pytest.raises(InputError):
        write_scene_cache(tmp_path, "../evil", logits, feat=feat, visible=vis, topk=6)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError):
        load_scene_cache(tmp_path, "broken")


def test_gather_to_voxels_mean():
    out = gather_to_voxels(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 2]), num_voxels=4)
    assert out.tolist() == [1.5, 3.0, 4.0, 0.0]  # empty voxel -> 0
    frac = gather_to_voxels(np.array([True, False, True]), np.array([0, 0, 1]))
    assert frac.tolist() == [0.5, 1.0]
    x = torch.arange(12.0).reshape(2, 3, 2)  # (M, P, C), gather along the point dim
    g = gather_to_voxels(x, torch.tensor([1, 0, 1]), dim=1)
    assert g.tolist() == [[[2.0, 3.0], [2.0, 3.0]], [[8.0, 9.0], [8.0, 9.0]]]


def _voxelize(n_points=300, grid=0.25, seed=0):
    """Random points -> (inverse (P,), N_vox): the point->voxel map of an unaugmented batch."""
    rng = np.random.default_rng(seed)
    coord = rng.uniform(0, 1, (n_points, 3))
    _, inverse = np.unique(np.floor(coord / grid).astype(np.int64), axis=0, return_inverse=True)
    inverse = torch.from_numpy(inverse.reshape(-1))
    return inverse, int(inverse.max()) + 1


def test_cached_equals_online_unaugmented(tmp_path):
    g = torch.Generator().manual_seed(1)
    inverse, n_vox = _voxelize()
    c, d_t, tau = 5, 8, 2.0
    t_vox = torch.randn(n_vox, c, generator=g) * 3        # online teacher on the student's voxels
    f_vox = torch.randn(n_vox, d_t, generator=g)
    vis_vox = torch.rand(n_vox, generator=g) > 0.3
    labels = torch.randint(-1, c, (n_vox,), generator=g)
    student = {"logits": torch.randn(n_vox, c, generator=g), "feat": torch.randn(n_vox, 6, generator=g)}
    # the cache holds per ORIGINAL point: each point carries its voxel's outputs
    gain_vox = torch.rand(n_vox, generator=g)
    write_scene_cache(tmp_path, "s", t_vox[inverse], feat=f_vox[inverse], visible=vis_vox[inverse], topk=c,
                      gain=gain_vox[inverse])
    e = load_scene_cache(tmp_path, "s", expected_points=inverse.numel())

    ihd = IHDLoss(6, d_t, tau=tau, trust="soft", image_gain=True)
    online = ihd(student, {"logits": t_vox, "feat": f_vox, "visible": vis_vox, "gain": gain_vox}, labels)
    dense = gather_to_voxels(dense_logits_from_topk(e["topk_logits"], e["topk_index"], c), inverse, n_vox)
    feat = gather_to_voxels(e["feat"], inverse, n_vox)
    vis = gather_to_voxels(e["visible"], inverse, n_vox)
    gain = gather_to_voxels(e["gain"], inverse, n_vox)
    cached = ihd(student, {"logits": dense, "feat": feat, "visible": vis, "gain": gain}, labels)
    for k in ("ihd_logit", "ihd_feat"):
        assert cached[k].item() == pytest.approx(online[k].item(), rel=1e-2, abs=1e-3)
    # the probabilities route (what augmented batches use) gives the same target
    probs = gather_to_voxels(topk_probs(e["topk_logits"], e["topk_index"], c, tau=tau), inverse, n_vox)
    w = vis.float()
    assert kd_kl(student["logits"], probs, tau, w, target_kind="probs").item() == pytest.approx(
        kd_kl(student["logits"], t_vox, tau, w).item(), rel=1e-2, abs=1e-3)


def test_cached_experts_equal_online(tmp_path):
    g = torch.Generator().manual_seed(2)
    inverse, n_vox = _voxelize(200, seed=3)
    m, c = 3, 4
    ex_vox = torch.randn(m, n_vox, c, generator=g) * 2
    write_scene_cache(tmp_path, "s", ex_vox[:, inverse], topk=c)  # (M, P, C) in one file
    e = load_scene_cache(tmp_path, "s")
    assert e["topk_logits"].shape == (m, inverse.numel(), c) and read_manifest(tmp_path)["lead_shape"] == [m]
    dense = gather_to_voxels(dense_logits_from_topk(e["topk_logits"], e["topk_index"], c), inverse, n_vox, dim=1)
    student = torch.randn(n_vox, c, generator=g)
    labels = torch.randint(-1, c, (n_vox,), generator=g)
    table = np.array([0, 2, 1, 2])
    got = asd_loss(student, dense, labels, table, tau=2.0)
    assert got.item() == pytest.approx(asd_loss(student, ex_vox, labels, table, tau=2.0).item(), rel=1e-2, abs=1e-3)


def test_topk_to_voxels_equals_dense_then_gather():
    """The one-scatter path gives what densifying per point and averaging per voxel gives, dropped points included."""
    import torch

    from haskd.distill.cache import gather_to_voxels, topk_probs, topk_to_voxels

    g = torch.Generator().manual_seed(0)
    M, P, k, C, N = 3, 50, 4, 7, 9
    logits = torch.randn(M, P, C, generator=g)
    vals, idx = logits.topk(k, dim=-1)
    rows = torch.randint(0, N + 1, (P,), generator=g)  # N = dropped
    keep = rows < N
    want = gather_to_voxels(topk_probs(vals[:, keep], idx[:, keep], C, tau=2.0), rows[keep], N, dim=-2)
    got = topk_to_voxels(torch.softmax(vals / 2.0, -1), idx, rows, N, C)
    assert got.shape == (M, N, C) and torch.allclose(got, want, atol=1e-6)
    single = topk_to_voxels(torch.softmax(vals[0] / 2.0, -1), idx[0], rows, N, C)
    assert torch.allclose(single, want[0], atol=1e-6)


def test_mean_reducer_matches_gather_to_voxels():
    import torch

    from haskd.distill.cache import gather_to_voxels, mean_reducer

    g = torch.Generator().manual_seed(1)
    P, N, D = 60, 11, 5
    rows = torch.randint(0, N + 1, (P,), generator=g)  # N = dropped
    x = torch.randn(P, D, generator=g)
    keep = rows < N
    want = gather_to_voxels(x[keep], rows[keep], N)
    got = torch.sparse.mm(mean_reducer(rows, N), x)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("k", [4, 2])  # every class kept (dense path) and a true top-k
def test_distill_task_maps_the_cache_onto_cropped_voxels(tmp_path, k):
    """CacheReader.voxels (two scenes in one batch, cropped points dropped) equals the per-point reference."""
    from haskd.distill.cache import CacheReader

    g = torch.Generator().manual_seed(4)
    c, m, tau = 4, 3, 2.0
    inv_a, n_a = _voxelize(120, seed=5)
    inv_b, n_b = _voxelize(90, seed=6)
    la = torch.randn(m, inv_a.numel(), c, generator=g)
    lb = torch.randn(m, inv_b.numel(), c, generator=g)
    fa = torch.randn(inv_a.numel(), 3, generator=g)
    fb = torch.randn(inv_b.numel(), 3, generator=g)
    write_scene_cache(tmp_path / "e", "a", la, topk=k)
    write_scene_cache(tmp_path / "e", "b", lb, topk=k)
    write_scene_cache(tmp_path / "t", "a", la[0], feat=fa, topk=k)
    write_scene_cache(tmp_path / "t", "b", lb[0], feat=fb, topk=k)
    drop_a = torch.rand(inv_a.numel(), generator=g) < 0.3  # cropped away
    inverse = torch.cat([torch.where(drop_a, -1, inv_a), inv_b + n_a])
    batch = {"inverse": inverse, "grid_coord": torch.zeros(n_a + n_b, 4), "scene": ["a", "b"],
             "point_offset": torch.tensor([inv_a.numel(), inv_a.numel() + inv_b.numel()])}
    readers = {kind: CacheReader(tmp_path / kind[0], num_classes=c, tau=tau) for kind in ("experts", "teacher")}
    keep = inverse >= 0
    for kind, logits in (("experts", torch.cat([la, lb], 1)), ("teacher", torch.cat([la[0], lb[0]]))):
        vals, idx = logits.topk(k, dim=-1)
        want = gather_to_voxels(topk_probs(vals, idx, c, tau=tau)[..., keep, :], inverse[keep], n_a + n_b, dim=-2)
        got = readers[kind].voxels(batch)
        assert torch.allclose(got["probs"], want, atol=2e-3), kind
    want_f = gather_to_voxels(torch.cat([fa, fb])[keep], inverse[keep], n_a + n_b)
    assert torch.allclose(readers["teacher"].voxels(batch)["feat"], want_f, atol=2e-3)
    # a reader told which targets the loss reads averages only those, and the probabilities the same
    only = CacheReader(tmp_path / "t", num_classes=c, tau=tau, keys={"visible"}).voxels(batch)
    assert set(only) == {"probs"} and torch.equal(only["probs"], readers["teacher"].voxels(batch)["probs"])


def test_level_rows_finds_each_voxel_in_its_coarse_level():
    from haskd.distill.cache import level_rows

    level = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])  # stride-2 voxels, not sorted
    vox = torch.tensor([[0, 0, 1, 1], [0, 3, 0, 1], [1, 1, 1, 0], [0, 2, 1, 0]])
    assert level_rows(level, vox, 2).tolist() == [1, 0, 2, 0]
    with pytest.raises(ValueError, match="not the same voxel hierarchy"):
        level_rows(level, torch.tensor([[0, 4, 0, 0]]), 2)


def test_pair_mean_matrix_averages_over_points_and_drops_the_dump_row():
    from haskd.distill.cache import pair_mean_matrix

    rows_a = torch.tensor([0, 0, 0, 1, 2, 1])   # point -> row of side a (2 = dropped with n_a = 2)
    rows_b = torch.tensor([1, 1, 0, 2, 0, 2])   # point -> row of side b
    x = torch.tensor([[1.0], [10.0], [100.0]])
    m = pair_mean_matrix(rows_a, rows_b, 2, 3)
    # row 0: points with b rows 1, 1, 0 -> (10 + 10 + 1) / 3; row 1: two points of b row 2 -> 100
    assert torch.allclose(torch.sparse.mm(m, x).reshape(-1), torch.tensor([7.0, 100.0]))
    assert m._nnz() == 3  # the two (0, 1) points and the two (1, 2) points are one entry each


def test_cached_hints_read_level_by_level_equal_the_per_point_pair_means(tmp_path):
    """CacheReader.hints reduces fine to coarse through both nets' parent maps; every level must equal the direct
    per-level mean over the points (pair_mean_matrix), with two scenes, a random shift between the teacher's and
    the student's voxels (augmentation) and cropped points."""
    from haskd.distill.cache import CacheReader, batch_coords, level_rows, pair_mean_matrix, write_scene_cache

    g = torch.Generator().manual_seed(0)
    strides = (4, 2, 1)                                   # coarse to fine, as a HintTap lists them
    grid, inverse, offset, teacher_rows, names = [], [], [], [], []
    for s, n_pts in enumerate((300, 200)):
        pts = torch.rand(n_pts, 3, generator=g) * 12
        tv, tinv = torch.unique(pts.floor().long(), dim=0, return_inverse=True)   # the teacher's voxels
        hints, rows = [], []
        for st in strides:
            lv, r = torch.unique(torch.div(tv, st, rounding_mode="floor"), dim=0, return_inverse=True)
            hints.append((torch.randn(len(lv), 3, generator=g), r[tinv]))
            rows.append(r[tinv])
        write_scene_cache(tmp_path, f"s{s}", torch.randn(n_pts, 5), topk=1, hints=hints)
        teacher_rows.append(rows)
        sv, sinv = torch.unique((pts + torch.rand(3, generator=g)).floor().long() + 1, dim=0, return_inverse=True)
        sinv[torch.rand(n_pts, generator=g) < 0.1] = -1   # cropped points
        inverse.append(torch.where(sinv >= 0, sinv + sum(len(x) for x in grid), sinv))
        grid.append(sv)
        offset.append(sum(len(x) for x in grid))
        names.append(f"s{s}")
    batch = {"grid_coord": torch.cat(grid), "offset": torch.tensor(offset), "inverse": torch.cat(inverse),
             "scene": names}
    c0 = batch_coords(batch)
    level_coords = []
    for st in strides:
        q = c0.clone()
        q[:, 1:] = torch.div(q[:, 1:], st, rounding_mode="floor")
        level_coords.append(torch.unique(q, dim=0)[torch.randperm(len(torch.unique(q, dim=0)), generator=g)])
    reader = CacheReader(tmp_path, 5, 1.0)
    got = reader.hints(batch, level_coords, strides)
    inv = batch["inverse"]
    for lvl, (coords, st) in enumerate(zip(level_coords, strides)):
        n = len(coords)
        a = torch.cat([level_rows(coords, c0, st), torch.tensor([n])])[torch.where(inv >= 0, inv, len(c0))]
        b = torch.cat([teacher_rows[0][lvl], teacher_rows[1][lvl] + len(reader.scene("s0")["hints"][lvl][0])])
        feats = torch.cat([reader.scene(nm)["hints"][lvl][0] for nm in names]).float()
        want = torch.sparse.mm(pair_mean_matrix(a, b, n, len(feats)), feats)
        assert got[lvl].shape == want.shape
        assert torch.allclose(got[lvl], want, atol=1e-6), lvl


def test_two_runs_building_one_cache_at_once_both_get_it_whole(tmp_path):
    """Two students of one teacher started together both build its cache: each writes a private folder and the
    one finishing second keeps the first's, so neither reads or deletes files the other is writing; a changed
    source (the checkpoint) rebuilds in place."""
    import threading
    import time
    from types import SimpleNamespace

    from haskd.distill.cache import _build

    src = tmp_path / "teacher.pt"
    src.write_bytes(b"x")
    scenes = [SimpleNamespace(name=f"s{i}") for i in range(4)]
    seen = []

    def write(folder, i, scene):
        time.sleep(0.02)
        seen.append(folder)
        write_scene_cache(folder, scene.name, torch.randn(5, 3))

    out, errors = tmp_path / "soft_labels_teacher", []

    def run():
        try:
            _build(out, scenes, [src], "logits", "test", write)
        except Exception as e:  # noqa: BLE001 -- the test reports it
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(seen)) == 2 and out not in seen  # two private folders, never the shared one
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "s0.npz", "s1.npz", "s2.npz", "s3.npz",
                                                     "source.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left behind
    before = load_scene_cache(out, "s0")["topk_logits"]
    _build(out, scenes, [src], "logits", "test", write)  # fresh: reused, not rebuilt
    assert len(seen) == 8 and np.array_equal(load_scene_cache(out, "s0")["topk_logits"], before)
    time.sleep(0.01)
    src.write_bytes(b"xy")  # the checkpoint changed: rebuilt
    _build(out, scenes, [src], "logits", "test", write)
    assert len(seen) == 12 and not np.array_equal(load_scene_cache(out, "s0")["topk_logits"], before)


def test_image_right_cached_per_point_and_averaged_onto_voxels(tmp_path):
    """trust=image in cached mode: the per-point rule stored beside the soft labels; on an unaugmented batch each
    voxel gets its own value back, so the cached loss is the online one."""
    g = torch.Generator().manual_seed(3)
    inverse, n_vox = _voxelize()
    c, tau = 4, 2.0
    t_vox = torch.randn(n_vox, c, generator=g) * 3
    z3_vox = torch.randn(n_vox, c, generator=g) * 3
    labels = torch.randint(-1, c, (n_vox,), generator=g)
    from haskd.distill.ihd import image_right

    right = image_right(t_vox, z3_vox, labels)
    assert 0 < right.sum() < n_vox
    write_scene_cache(tmp_path, "s", t_vox[inverse], topk=c, image_right=right[inverse] > 0)
    assert read_manifest(tmp_path)["has_image_right"] is True
    e = load_scene_cache(tmp_path, "s", expected_points=inverse.numel())
    assert e["image_right"].dtype == np.bool_ and e["image_right"].shape == (inverse.numel(),)
    vox = gather_to_voxels(e["image_right"], inverse, n_vox)
    assert torch.equal(vox.float(), right)
    student = {"logits": torch.randn(n_vox, c, generator=g)}
    ihd = IHDLoss(6, 8, tau=tau, trust="image", feat_weight=0)
    online = ihd(student, {"logits": t_vox, "image_right": right}, labels)["ihd_logit"]
    probs = gather_to_voxels(topk_probs(e["topk_logits"], e["topk_index"], c, tau=tau), inverse, n_vox)
    cached = ihd(student, {"probs": probs, "image_right": vox}, labels)["ihd_logit"]
    assert cached.item() == pytest.approx(online.item(), rel=1e-2, abs=1e-3)
    # a cache written without it keeps its manifest as before
    write_scene_cache(tmp_path / "old", "s", t_vox[inverse], topk=c)
    assert "has_image_right" not in read_manifest(tmp_path / "old") and "has_shift" not in read_manifest(
        tmp_path / "old")


def test_image_shift_cached_per_point_in_float16(tmp_path):
    """trust=image_shift in cached mode: the label-free rule stored per point (float16) and averaged back onto the
    voxels, within float16 rounding of the online value."""
    from haskd.distill.ihd import image_shift

    g = torch.Generator().manual_seed(4)
    inverse, n_vox = _voxelize()
    t_vox, z3_vox = torch.randn(n_vox, 4, generator=g) * 3, torch.randn(n_vox, 4, generator=g) * 3
    shift = image_shift(t_vox, z3_vox)
    write_scene_cache(tmp_path, "s", t_vox[inverse], topk=4, shift=shift[inverse])
    assert read_manifest(tmp_path)["has_shift"] is True
    e = load_scene_cache(tmp_path, "s", expected_points=inverse.numel())
    assert e["shift"].dtype == np.float16 and e["shift"].shape == (inverse.numel(),)
    assert torch.allclose(gather_to_voxels(e["shift"], inverse, n_vox).float(), shift, atol=1e-3)
    with pytest.raises(ValueError, match="shift must be"):
        write_scene_cache(tmp_path / "bad", "s", t_vox[inverse], shift=shift)
