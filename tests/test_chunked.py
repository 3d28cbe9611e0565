"""Chunked (tiled) inference equals one-shot inference where receptive fields stay inside a chunk."""
from pathlib import Path

import numpy as np
import pytest
import torch

from haskd.data.scene import Scene
from haskd.data.transforms import collate
from haskd.engine.chunked import plan_chunks, predict_points_chunked
from haskd.engine.evaluate import predict_points, scene_sample
from haskd.errors import HaskdError
from haskd.models.spunet import SPUNET_PRESETS, SpUNet


@pytest.fixture(scope="module")
def tiled_room(shared_data):
    """A 2 x 2 grid of translated copies of the real ScanNet room scene0000_00: 325,476 points, about 14 x 15 m."""
    from haskd.prepare.samples import read_mmdet3d

    src = Path(shared_data) / "scannet_mmdet3d_testdata"
    if not (src / "scene0000_00").is_dir():
        pytest.skip("scannet_mmdet3d_testdata/scene0000_00 not present")
    d = read_mmdet3d(src, "scene0000_00")
    c = d["coord"]
    ext = c.max(0) - c.min(0)
    shifts = [np.array([i * (ext[0] + 0.5), j * (ext[1] + 0.5), 0], np.float32) for i in range(2) for j in range(2)]
    return Scene("tiled", np.concatenate([c + s for s in shifts]), np.concatenate([d["color"]] * 4))


def _calibrate_bn(model, scene, voxel_size):
    """BN running stats from one pass over the scene, so deep layers carry signal as in a trained network."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(collate([scene_sample(scene, voxel_size, 20)]))
    return model.eval()


def test_small_scene_is_exactly_one_shot(tiled_room):
    torch.manual_seed(0)
    model = SpUNet(3, 20, backend="torch", **SPUNET_PRESETS["tiny"]).eval()
    info = {}
    a = predict_points_chunked(model, tiled_room, 0.1, 20, max_voxels=10 ** 7, info=info)
    b = predict_points(model, tiled_room, 0.1, 20)
    assert info["chunks"] == 1
    assert torch.equal(a, b)


def test_tiled_real_scene_agrees_with_one_shot(tiled_room):
    """Untrained tiny SpUNet (fixed seed, eval mode): chunked labels = one-shot labels on >= 99% of the points."""
    torch.manual_seed(0)
    model = SpUNet(3, 20, backend="torch", **SPUNET_PRESETS["tiny"]).eval()
    info = {}
    a = predict_points_chunked(model, tiled_room, 0.1, 20, max_voxels=20000, overlap=1.0, info=info)
    b = predict_points(model, tiled_room, 0.1, 20)
    assert a.shape == b.shape == (tiled_room.num_points, 20)
    assert info["chunks"] > 1 and info["largest_chunk"] <= 20000
    agree = (a.argmax(1) == b.argmax(1)).float().mean().item()
    print(f"chunked/one-shot label agreement {agree:.4f} over {info['chunks']} chunks")
    assert agree >= 0.99
    assert torch.allclose(a.sum(1), torch.ones(len(a)), atol=1e-5)


def test_exact_where_receptive_field_inside_chunk(tiled_room):
    """A 2-level SpUNet (receptive field radius about 25 voxels = 2.5 m) with normalised activations and 3 m of
    overlap: the same probabilities up to float rounding."""
    torch.manual_seed(1)
    model = _calibrate_bn(SpUNet(3, 20, channels=(16, 32), layers=(1, 1), backend="torch"), tiled_room, 0.1)
    a = predict_points_chunked(model, tiled_room, 0.1, 20, tile=4.0, overlap=3.0)
    b = predict_points(model, tiled_room, 0.1, 20)
    assert (a - b).abs().max().item() < 1e-4


def test_plan_chunks_covers_every_voxel_once():
    rng = np.random.default_rng(0)
    g = rng.integers(0, 200, size=(5000, 3))
    plan = plan_chunks(g, 0.05, max_voxels=1500, overlap=0.5)
    assert max(len(r) for _, r in plan["chunks"]) <= 1500
    owned = np.concatenate([r[plan["core"][r] == c] for c, r in plan["chunks"]])
    assert np.array_equal(np.sort(owned), np.arange(len(g)))
    with pytest.raises(HaskdError):
        plan_chunks(g, 0.05, max_voxels=10, overlap=2.0)
