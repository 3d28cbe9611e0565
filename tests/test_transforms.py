import numpy as np
import torch

from haskd.data.transforms import augment, collate, crop, majority_label, voxelize


def test_voxelize_inverse_and_means():
    rng = np.random.default_rng(0)
    coord = rng.random((3000, 3)).astype(np.float32) * 2
    color = rng.integers(0, 256, (3000, 3)).astype(np.float32)
    seg = rng.integers(-1, 4, 3000)
    v = voxelize(coord, color, seg, None, 0.25, 4)
    inv = v["inverse"]
    # every point's voxel holds it: grid coords agree
    g = np.floor((coord - coord.min(0)) / 0.25).astype(np.int64)
    assert (v["grid_coord"][inv] == g).all()
    for j in (0, 17, 123):
        pts = inv == j
        assert np.allclose(v["coord"][j], coord[pts].mean(0), atol=1e-5)
        assert np.allclose(v["color"][j], color[pts].mean(0), atol=1e-3)


def test_majority_label_ignores_unlabeled():
    inv = np.array([0, 0, 0, 1, 1, 2])
    seg = np.array([2, -1, -1, 1, 1, -1])
    assert majority_label(inv, seg, 3, 4).tolist() == [2, 1, -1]


def test_crop_bounds_and_marks_dropped_points():
    rng = np.random.default_rng(1)
    coord = rng.random((5000, 3)).astype(np.float32) * 4
    v = voxelize(coord, np.zeros((5000, 3), np.float32), None, None, 0.1)
    c = crop(v, 500, rng)
    assert c["grid_coord"].shape[0] == 500 and c["grid_coord"].min() == 0
    kept = c["inverse"] >= 0
    assert 0 < kept.sum() < 5000 and c["inverse"].max() == 499


def test_augment_keeps_shapes_and_is_seeded():
    rng = np.random.default_rng(0)
    coord = rng.random((100, 3)).astype(np.float32)
    col = rng.integers(0, 255, (100, 3)).astype(np.float32)
    a = augment(coord, col, None, np.random.default_rng(5))
    b = augment(coord, col, None, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and a[0].shape == (100, 3) and a[1].max() <= 255


def test_collate_offsets_without_padding():
    s = []
    for n, p in ((4, 6), (3, 5)):
        s.append({"scene": f"s{n}", "coord": np.zeros((n, 3), np.float32), "grid_coord": np.zeros((n, 3), np.int64),
                  "feat": np.zeros((n, 3), np.float32), "segment": np.zeros(n, np.int64),
                  "inverse": np.arange(p) % n, "world": np.zeros((n, 3), np.float32)})
    s[1]["inverse"][0] = -1
    b = collate(s)
    assert b["offset"].tolist() == [4, 7] and b["point_offset"].tolist() == [6, 11]
    assert b["inverse"][6].item() == -1 and b["inverse"][7].item() == 4 + 1
    assert b["batch"].tolist() == [0, 0, 0, 0, 1, 1, 1] and b["feat"].dtype == torch.float32


def test_labeled_points_keep_n_labels_per_training_scene_the_same_for_every_seed(tiny_rooms):
    """data.labeled_points = n: each training scene keeps the labels of n of its labeled points (chosen by the
    scene's name, so every model and seed trains on the same ones), the rest -1; val keeps every label."""
    from haskd.config import load_config
    from haskd.workflow.build import build_datasets

    def sets(*over):
        return build_datasets(load_config("scannet20_student", [f"data.root={tiny_rooms}", *over]))

    full = sets()
    sparse, other_seed = sets("data.labeled_points=50"), sets("data.labeled_points=50", "train.seed=3")
    for a, b, c in zip(full["train"].scenes, sparse["train"].scenes, other_seed["train"].scenes):
        kept = b.segment >= 0
        assert kept.sum() == 50 and (a.segment >= 0).sum() > 50
        assert np.array_equal(b.segment[kept], a.segment[kept])  # the true labels of the kept points
        assert np.array_equal(b.segment, c.segment)
    assert sparse["train"].scenes[0].segment[sparse["train"].scenes[0].segment >= 0].size == 50
    assert not np.array_equal(np.flatnonzero(sparse["train"].scenes[0].segment >= 0),
                              np.flatnonzero(sparse["train"].scenes[1].segment >= 0))
    assert np.array_equal(sparse["val"].scenes[0].segment, full["val"].scenes[0].segment)
    sample = sparse["train"][0]
    assert 0 < (sample["segment"] >= 0).sum() <= 50  # a voxel is labeled by its labeled points only
