"""SpUNet student: every preset runs forward/backward without NaN on a tiny scene; shapes; determinism; backends."""
import pytest
import torch

from haskd.models.spunet import SPUNET_PRESETS, SpUNet, synthetic_room
from haskd.sparse import spconv_available




def tiny_batch(n_per_scene=(300, 200), cin=6, seed=0):
    """Two small 'rooms' (surface voxels) collated the usual way: flat rows + cumulative ``offset``."""
    gen = torch.Generator().manual_seed(seed)
    grids = [synthetic_room(n, seed=seed + i) for i, n in enumerate(n_per_scene)]
    grid = torch.cat(grids)
    offset = torch.cumsum(torch.tensor([len(g) for g in grids]), 0)
    return dict(grid_coord=grid, feat=torch.randn(len(grid), cin, generator=gen), offset=offset,
                segment=torch.randint(-1, 5, (len(grid),), generator=gen))


@pytest.mark.parametrize("preset", sorted(SPUNET_PRESETS))
def test_presets_forward_backward(preset):
    torch.manual_seed(0)
    batch = tiny_batch()
    model = SpUNet(6, 5, backend="torch", **SPUNET_PRESETS[preset])
    out = model(batch)
    n = batch["grid_coord"].shape[0]
    assert out["logits"].shape == (n, 5)
    assert out["feat"].shape == (n, model.feat_dim)
    loss = torch.nn.functional.cross_entropy(out["logits"], batch["segment"], ignore_index=-1)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.stem.conv.weight.grad.abs().sum() > 0


def test_feat_dim_and_decoder_widths():
    m = SpUNet(3, 7, **SPUNET_PRESETS["base"])
    assert m.feat_dim == 96
    assert SpUNet(3, 7, channels=(8, 16), layers=(1, 1), stem_channels=4).feat_dim == 4


def test_deterministic_and_batch_independent():
    torch.manual_seed(1)
    batch = tiny_batch()
    model = SpUNet(6, 4, backend="torch", **SPUNET_PRESETS["tiny"]).eval()
    with torch.no_grad():
        a, b = model(batch)["logits"], model(batch)["logits"]
        assert torch.equal(a, b)
        # In eval mode, scene 2's prediction does not depend on scene 1 being in the batch.
        n1 = int(batch["offset"][0])
        solo = dict(grid_coord=batch["grid_coord"][n1:], feat=batch["feat"][n1:],
                    offset=batch["offset"][1:] - n1)
        torch.testing.assert_close(model(solo)["logits"], a[n1:], atol=1e-5, rtol=1e-5)


def test_training_step_reduces_loss():
    torch.manual_seed(2)
    batch = tiny_batch((150, 150), cin=3)  # two scenes: BatchNorm needs >1 voxel at stride 16
    model = SpUNet(3, 3, backend="torch", **SPUNET_PRESETS["tiny"])
    target = (batch["grid_coord"][:, 2] > 0).long()  # floor vs the rest: learnable from geometry
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(batch)["logits"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not spconv_available(), reason="spconv not installed")
def test_backends_agree():
    torch.manual_seed(3)
    batch = tiny_batch()
    model = SpUNet(6, 4, backend="torch", **SPUNET_PRESETS["tiny"]).eval()
    with torch.no_grad():
        ref = model(batch)
        model.set_backend("spconv")
        out = model(batch)
    torch.testing.assert_close(out["logits"], ref["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["feat"], ref["feat"], atol=1e-4, rtol=1e-4)


def test_hints_are_per_level_features_in_a_shared_voxel_hierarchy():
    """hint_levels + HintTap: one feature per level (deepest first, the last is ``feat``); two networks built from
    the same batch have the same rows at every level, which the hint term of IHD relies on."""
    import torch

    from haskd.distill.hints import HintTap
    from haskd.models import build_model

    torch.manual_seed(0)
    g = torch.randint(0, 12, (300, 3))
    g = torch.unique(g, dim=0)
    batch = {"grid_coord": g, "feat": torch.rand(len(g), 6), "offset": torch.tensor([len(g)])}
    a = build_model("spunet", 6, 5, preset="tiny", backend="torch").eval()
    b = build_model("spunet", 6, 5, preset="tiny", backend="torch").eval()
    assert set(a(batch)) == {"logits", "feat"}
    with HintTap(a) as ta, HintTap(b) as tb:
        out = a(batch)
        b(batch)
    ha, hb = ta.feats, tb.feats
    assert [h.shape[1] for h in ha] == list(a.hint_dims)
    assert ta.strides == a.hint_strides == (16, 8, 4, 2, 1)
    assert [h.shape[0] for h in ha] == [h.shape[0] for h in hb] == [c.shape[0] for c in ta.coords]
    assert ha[-1].shape[0] == len(g) and ha[0].shape[0] < len(g)
    assert torch.equal(ha[-1], out["feat"])
