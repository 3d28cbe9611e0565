"""Serialization curves, the student protocol and the PTv3-style student (all on tiny inputs, CPU)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from haskd.errors import HaskdError
from haskd.models.protocol import HookedBackbone, check_student, wrap_student
from haskd.models.ptv3 import PTV3_PRESETS, GridPooling, PointTransformerV3, _patch_padding
from haskd.models.serialization import (batch_from_offset, encode, hilbert_encode, serialize, z_order_encode)




# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _sample(n, seed, side=12, cin=6):
    """n distinct voxels of a side^3 grid with random features."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(side ** 3, generator=g)[:n]
    grid = torch.stack([cells // (side * side), (cells // side) % side, cells % side], 1)
    return grid, torch.randn(n, cin, generator=g)


def _batch(*samples):
    grids, feats = zip(*samples)
    counts = torch.tensor([len(g) for g in grids])
    return {"grid_coord": torch.cat(grids), "feat": torch.cat(feats), "offset": torch.cumsum(counts, 0),
            "coord": torch.cat(grids).float() * 0.05}


def _tiny(**kw):
    args = {**PTV3_PRESETS["tiny"], "patch_size": 16, **kw}
    torch.manual_seed(0)
    return PointTransformerV3(6, 5, **args)


# ---------------------------------------------------------------------------------------------------------------
# serialization
# ---------------------------------------------------------------------------------------------------------------
def test_morton_matches_hand_computation():
    grid = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 5, 6], [0, 0, 0]])
    # (3,5,6): x=011 y=101 z=110 -> triples (x_i y_i z_i) from bit 2 down: 011, 101, 110 = 3*64 + 5*8 + 6
    assert z_order_encode(grid, 3).tolist() == [4, 2, 1, 238, 0]
    # the transposed order swaps x and y
    assert encode(grid, order="z-trans", depth=3).tolist() == [2, 4, 1, 5 * 64 + 3 * 8 + 6, 0]


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_hilbert_is_a_face_adjacent_permutation(depth):
    r = torch.arange(2 ** depth)
    grid = torch.cartesian_prod(r, r, r)
    code = hilbert_encode(grid, depth)
    assert torch.equal(code.sort().values, torch.arange(8 ** depth))
    path = grid[code.argsort()]
    step = (path[1:] - path[:-1]).abs().sum(1)
    assert bool((step == 1).all()), "consecutive Hilbert codes must be face-adjacent cells"
    # the transposed curve is the same curve on (y, x, z)
    assert torch.equal(encode(grid, order="hilbert-trans", depth=depth), hilbert_encode(grid[:, [1, 0, 2]], depth))


def test_serialize_keeps_samples_contiguous_and_inverts():
    g1, _ = _sample(40, 1)
    g2, _ = _sample(25, 2)
    grid = torch.cat([g1, g2])
    batch = batch_from_offset(torch.tensor([40, 65]))
    assert batch.tolist() == [0] * 40 + [1] * 25
    ser = serialize(grid, batch, depth=4)
    assert ser["code"].shape == ser["order"].shape == ser["inverse"].shape == (4, 65)
    for k in range(4):
        assert bool((batch[ser["order"][k]][:40] == 0).all())  # sample 0 first, then sample 1
        assert torch.equal(ser["order"][k][ser["inverse"][k]], torch.arange(65))
        assert bool((ser["code"][k][batch == 1] >> 12 == 1).all())  # batch index above 3*depth bits


def test_serialization_rejects_bad_coords():
    with pytest.raises(HaskdError, match="must lie in"):
        z_order_encode(torch.tensor([[-1, 0, 0]]), 3)
    with pytest.raises(HaskdError, match="unknown serialization order"):
        encode(torch.zeros(1, 3, dtype=torch.long), order="peano")


# ---------------------------------------------------------------------------------------------------------------
# PTv3 building blocks
# ---------------------------------------------------------------------------------------------------------------
def test_patch_padding_per_sample():
    src, valid = _patch_padding(torch.tensor([5, 8]), 4)  # counts 5 and 3 -> padded 8 and 4
    assert src.tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 5, 6, 7, 7]
    assert valid.tolist() == [True] * 5 + [False] * 3 + [True] * 3 + [False]


def test_grid_pooling_groups_cells_per_sample():
    pool = GridPooling(2, 2, "max")
    with torch.no_grad():
        pool.proj.weight.copy_(torch.eye(2))
        pool.proj.bias.zero_()
    pool.eval()
    grid = torch.tensor([[0, 0, 0], [1, 1, 1], [2, 0, 0], [0, 0, 0]])
    batch = torch.tensor([0, 0, 0, 1])
    x = torch.tensor([[1.0, 5.0], [3.0, 2.0], [7.0, 7.0], [9.0, 9.0]])
    _, cgrid, cbatch, cluster = pool(x, grid, batch)
    assert cluster.tolist() == [0, 0, 1, 2]  # cells 0 and 1 share (0,0,0)//2; sample 1 stays apart
    assert cgrid.tolist() == [[0, 0, 0], [1, 0, 0], [0, 0, 0]] and cbatch.tolist() == [0, 0, 1]
    h = pool.proj(x)
    pooled = torch.stack([torch.maximum(h[0], h[1]), h[2], h[3]])
    assert torch.allclose(pool.act(pool.norm(pooled)), pool(x, grid, batch)[0])


# ---------------------------------------------------------------------------------------------------------------
# PTv3 network
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PTV3_PRESETS))
def test_presets_forward_backward(preset):
    torch.manual_seed(0)
    model = PointTransformerV3(6, 5, **PTV3_PRESETS[preset])
    model.train()
    batch = _batch(_sample(90, 1), _sample(37, 2))
    out = check_student(model, batch, num_classes=5)
    assert out["feat"].shape == (127, model.feat_dim)
    (out["logits"].logsumexp(1).mean() + out["feat"].pow(2).mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_batch_items_never_mix():
    model = _tiny().eval()
    s1, s2 = _sample(70, 1), _sample(50, 2)
    other = _sample(33, 9)  # different size, cells and features
    with torch.no_grad():
        a = model(_batch(s1, s2))["logits"]
        b = model(_batch(s1, other))["logits"]
        c = model(_batch(other, s2))["logits"]
        alone = model(_batch(s1))["logits"]
    assert torch.allclose(a[:70], b[:70], atol=1e-5)
    assert torch.allclose(a[70:], c[33:], atol=1e-5)
    assert torch.allclose(a[:70], alone, atol=1e-5)


def test_permutation_equivariance():
    model = _tiny(shuffle_orders=False).eval()
    batch = _batch(_sample(70, 1), _sample(50, 2))
    g = torch.Generator().manual_seed(5)
    perm = torch.cat([torch.randperm(70, generator=g), 70 + torch.randperm(50, generator=g)])  # rows stay per sample
    shuffled = {k: (v[perm] if k != "offset" else v) for k, v in batch.items()}
    with torch.no_grad():
        out = model(batch)
        out_p = model(shuffled)
    assert torch.allclose(out_p["logits"], out["logits"][perm], atol=1e-5)
    assert torch.allclose(out_p["feat"], out["feat"][perm], atol=1e-5)


def test_order_shuffle_only_in_training():
    model = _tiny()
    grid, _ = _sample(10, 1)
    b, off = torch.zeros(10, dtype=torch.long), torch.tensor([10])
    model.eval()
    assert model._level(grid, b, off).perm == [0, 1, 2, 3]
    model.train()
    perms = {tuple(model._level(grid, b, off).perm) for _ in range(20)}
    assert len(perms) > 1 and all(sorted(p) == [0, 1, 2, 3] for p in perms)


def test_single_stage_network():
    model = PointTransformerV3(6, 5, enc_channels=(16,), enc_depths=(1,), num_heads=(2,), dec_channels=(),
                               dec_depths=())
    out = check_student(model, _batch(_sample(30, 1)), num_classes=5)
    assert out["feat"].shape == (30, 16)


def test_bad_config_is_reported():
    with pytest.raises(HaskdError, match="one entry per stage"):
        PointTransformerV3(6, 5, enc_channels=(16, 32), enc_depths=(1,), num_heads=(1, 2), dec_channels=(16,),
                           dec_depths=(1,))
    with pytest.raises(HaskdError, match="unknown order"):
        PointTransformerV3(6, 5, orders=("z", "morton"))
    with pytest.raises(HaskdError, match="unknown sparse backend"):
        PointTransformerV3(6, 5, backend="minkowski")


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16,
                 marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_autocast_forward_backward(device, dtype):
    model = _tiny(backend="torch").to(device).train()
    batch = {k: v.to(device) for k, v in _batch(_sample(90, 1), _sample(37, 2)).items()}
    with torch.autocast(device, dtype=dtype):
        out = model(batch)
    assert out["logits"].shape == (127, 5) and bool(torch.isfinite(out["logits"]).all())
    out["logits"].float().logsumexp(1).mean().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def test_set_backend_switches_every_conv():
    model = _tiny()
    assert model.set_backend("torch") is model
    assert {m.backend for m in model.modules() if hasattr(m, "kernel_size")} == {"torch"}


def _voxelize(xyz, rgb, size):
    grid = np.floor((xyz - xyz.min(0)) / size).astype(np.int64)
    _, first = np.unique(grid, axis=0, return_index=True)
    feat = np.concatenate([rgb[first] / 127.5 - 1, xyz[first] - xyz[first].mean(0)], 1)
    return torch.from_numpy(grid[first]), torch.from_numpy(feat).float()


def test_real_scenes_forward(shared_data):
    """A real ScanNet room (20 cm voxels) and a real S3DIS sample in one batch."""
    scan = np.load(shared_data / "scannet_mmdet3d_testdata/scene0000_00/scene0000_00_vert_all.npy")
    s3dis = np.fromfile(shared_data / "s3dis_mmdet3d_testdata/Area_1_office_2_points.bin", np.float32).reshape(-1, 6)
    batch = _batch(_voxelize(scan[:, :3], scan[:, 3:6], 0.2), _voxelize(s3dis[:, :3], s3dis[:, 3:6], 0.05))
    torch.manual_seed(0)
    model = PointTransformerV3(6, 20, **PTV3_PRESETS["tiny"]).eval()
    with torch.no_grad():
        out = check_student(model, batch, num_classes=20)
    assert out["logits"].shape[0] == batch["feat"].shape[0] > 4000


# ---------------------------------------------------------------------------------------------------------------
# protocol
# ---------------------------------------------------------------------------------------------------------------
class _LogitsOnly(nn.Module):
    """A user network returning only a logits tensor."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))
        self.cls = nn.Linear(8, 5)

    def forward(self, batch):
        return self.cls(self.body(batch["feat"]))


def test_hooked_backbone_captures_features():
    torch.manual_seed(0)
    net = _LogitsOnly()
    model = HookedBackbone(net, "body.2")
    assert model.feat_dim == 8
    batch = _batch(_sample(30, 1), _sample(12, 2))
    out = check_student(model, batch, num_classes=5)
    assert torch.allclose(out["feat"], net.body(batch["feat"]))
    assert torch.allclose(out["logits"], net(batch))
    out["feat"].sum().backward()  # the captured feature is part of the graph
    assert net.body[0].weight.grad is not None
    assert wrap_student(net, None) is net and isinstance(wrap_student(net, "body"), HookedBackbone)


def test_hooked_backbone_logits_key_and_errors():
    class DictNet(_LogitsOnly):
        def forward(self, batch):
            return {"scores": super().forward(batch)}

    batch = _batch(_sample(10, 1))
    out = HookedBackbone(DictNet(), "body", logits_key="scores", feat_dim=8)(batch)
    assert out["logits"].shape == (10, 5) and out["feat"].shape == (10, 8)
    with pytest.raises(HaskdError, match="is not a submodule.*body"):
        HookedBackbone(_LogitsOnly(), "backbone.head")
    with pytest.raises(HaskdError, match="pass feat_dim"):
        HookedBackbone(_LogitsOnly(), "body.1")  # ReLU: width unknown
    with pytest.raises(HaskdError, match="logits_key"):
        HookedBackbone(DictNet(), "body.2")(batch)


def test_check_student_messages():
    batch = _batch(_sample(10, 1))
    net = _LogitsOnly()
    net.feat_dim = 8

    class Fixed(nn.Module):
        feat_dim = 8

        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, batch):
            return self.out

    good = {"logits": torch.zeros(10, 5), "feat": torch.zeros(10, 8)}
    assert check_student(Fixed(good), batch, 5) is good
    cases = [
        (net, "returned Tensor"),
        (Fixed({"logits": torch.zeros(10, 5)}), "lacks 'feat'"),
        (Fixed({**good, "feat": torch.zeros(7, 8)}), r"shape \(7, 8\), expected \(10"),
        (Fixed({**good, "feat": torch.zeros(10, 4)}), "feat_dim = 8"),
        (Fixed({**good, "logits": torch.full((10, 5), float("nan"))}), "NaN"),
        (Fixed({**good, "logits": torch.zeros(10, 5, dtype=torch.long)}), "floating tensor"),
        (Fixed({**good, "logits": torch.zeros(10, 3)}), "3 classes, expected 5"),
    ]
    for model, msg in cases:
        with pytest.raises(HaskdError, match=msg):
            check_student(model, batch, num_classes=5)
    with pytest.raises(HaskdError, match="feat_dim"):
        check_student(_LogitsOnly(), batch)
