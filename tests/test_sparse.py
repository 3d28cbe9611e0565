"""Sparse conv backends against dense torch conv3d / conv_transpose3d on small random grids (values and gradients)."""
import pytest
import torch
import torch.nn.functional as F

from haskd.errors import HaskdError
from haskd.sparse import (SparseConv3d, SparseInverseConv3d, SparseTensor, SubMConv3d, resolve_backend, set_backend,
                          spconv_available)
from haskd.sparse import native
from haskd.sparse.torch_backend import build_subm_map

GRID = 8  # even, so that stride-2 levels of the dense reference line up with the sparse ones
B = 2



needs_spconv = pytest.mark.skipif(not spconv_available(), reason="spconv not installed")
# the pure-torch passes and the fused C kernel (skipped where no C compiler builds it)
MAP_BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.unavailable_reason()}"))]


def random_coords(gen, n_per_batch=60, grid=GRID, batches=B):
    out = []
    for b in range(batches):
        flat = torch.randperm(grid ** 3, generator=gen)[:n_per_batch]
        xyz = torch.stack([flat // grid ** 2, (flat // grid) % grid, flat % grid], 1)
        out.append(torch.cat([torch.full((n_per_batch, 1), b), xyz], 1))
    return torch.cat(out).long()


def to_dense(feats, coords, grid):
    d = feats.new_zeros((B, feats.shape[1], grid, grid, grid))
    d[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]] = feats
    return d


def at(dense, coords):
    return dense[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]]


def dense_weight(w):
    """(Cout, kx, ky, kz, Cin) -> conv3d's (Cout, Cin, kx, ky, kz)."""
    return w.permute(0, 4, 1, 2, 3)


def sorted_rows(coords, *tensors):
    key = ((coords[:, 0] * 64 + coords[:, 1]) * 64 + coords[:, 2]) * 64 + coords[:, 3]
    order = torch.argsort(key)
    return [coords[order]] + [t[order] for t in tensors]


def make_input(seed=0, cin=3):
    gen = torch.Generator().manual_seed(seed)
    coords = random_coords(gen)
    feats = torch.randn(coords.shape[0], cin, generator=gen)
    return coords, feats


def check_grads(sparse_out, dense_out_at, feats_s, feats_d, coords, layer, w_dense, gen):
    r = torch.randn(sparse_out.shape, generator=gen)
    (sparse_out * r).sum().backward()
    (dense_out_at * r).sum().backward()
    torch.testing.assert_close(feats_s.grad, at(feats_d.grad, coords), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.weight.grad, w_dense.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", MAP_BACKENDS)
@pytest.mark.parametrize("kernel_size", [3, 1, 5])
def test_subm_conv_matches_dense(kernel_size, backend):
    gen = torch.Generator().manual_seed(1)
    coords, feats = make_input(1)
    conv = SubMConv3d(3, 4, kernel_size, backend=backend)
    fs = feats.clone().requires_grad_()
    out = conv(SparseTensor(fs, coords))
    assert torch.equal(out.coords, coords) and out.stride == 1
    fd = to_dense(feats, coords, GRID).requires_grad_()
    wd = conv.weight.detach().clone().requires_grad_()
    ref = at(F.conv3d(fd, dense_weight(wd), padding=kernel_size // 2), coords)
    torch.testing.assert_close(out.feats, ref, atol=1e-5, rtol=1e-5)
    check_grads(out.feats, ref, fs, fd, coords, conv, wd, gen)


@pytest.mark.parametrize("backend", MAP_BACKENDS)
@pytest.mark.parametrize("kernel_size,stride", [(2, 2), (3, 2)])
def test_down_conv_matches_dense(kernel_size, stride, backend):
    gen = torch.Generator().manual_seed(2)
    coords, feats = make_input(2)
    conv = SparseConv3d(3, 5, kernel_size, stride, backend=backend)
    fs = feats.clone().requires_grad_()
    out = conv(SparseTensor(fs, coords))
    assert out.stride == stride
    if kernel_size == stride:
        expect = torch.unique(torch.cat([coords[:, :1], coords[:, 1:] // stride], 1), dim=0)
        assert torch.equal(out.coords, expect)
    fd = to_dense(feats, coords, GRID).requires_grad_()
    wd = conv.weight.detach().clone().requires_grad_()
    # Pad the high side so that windows hanging over the grid edge exist in the dense output too.
    pad = (0, kernel_size - stride) * 3
    dense = F.conv3d(F.pad(fd, pad), dense_weight(wd), stride=stride)
    inside = (out.coords[:, 1:] < dense.shape[-1]).all(1)
    assert inside.all()
    ref = at(dense, out.coords)
    torch.testing.assert_close(out.feats, ref, atol=1e-5, rtol=1e-5)
    # Dense outputs that no sparse voxel covers must be exactly zero (no input in their window).
    occ = F.conv3d(F.pad(to_dense(torch.ones(len(coords), 1), coords, GRID), pad),
                   torch.ones(1, 1, *(kernel_size,) * 3), stride=stride)
    assert int((occ > 0).sum()) == out.coords.shape[0]
    check_grads(out.feats, ref, fs, fd, coords, conv, wd, gen)


@pytest.mark.parametrize("backend", MAP_BACKENDS)
def test_inverse_conv_matches_dense_transpose(backend):
    gen = torch.Generator().manual_seed(3)
    coords, feats = make_input(3)
    down = SparseConv3d(3, 6, 2, 2, key="d0", backend=backend)
    up = SparseInverseConv3d(6, 4, 2, key="d0", backend=backend)
    x = SparseTensor(feats, coords)
    coarse = down(x)
    cf = coarse.feats.detach().clone().requires_grad_()
    out = up(coarse.replace_feats(cf))
    assert torch.equal(out.coords, coords) and out.stride == 1
    cd = torch.zeros(B, 6, GRID // 2, GRID // 2, GRID // 2)
    cd[coarse.coords[:, 0], :, coarse.coords[:, 1], coarse.coords[:, 2], coarse.coords[:, 3]] = cf.detach()
    cd.requires_grad_()
    wd = up.weight.detach().clone().requires_grad_()
    # conv_transpose3d weight is (Cin, Cout, k, k, k)
    ref = at(F.conv_transpose3d(cd, wd.permute(4, 0, 1, 2, 3), stride=2), coords)
    torch.testing.assert_close(out.feats, ref, atol=1e-5, rtol=1e-5)
    r = torch.randn(out.feats.shape, generator=gen)
    (out.feats * r).sum().backward()
    (ref * r).sum().backward()
    torch.testing.assert_close(cf.grad, at(cd.grad, coarse.coords), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(up.weight.grad, wd.grad, atol=1e-4, rtol=1e-4)


def test_default_inverse_key_and_cache_reuse():
    coords, feats = make_input(4)
    x = SparseTensor(feats, coords)
    a, b = SubMConv3d(3, 4, backend="torch"), SubMConv3d(4, 4, backend="torch")
    y = b(a(x))
    maps = [k for k in x.cache if k[0] == "subm"]
    assert maps == [("subm", 1, 3)]  # one map for both convs of the level
    assert y.cache is x.cache and y.replace_feats(y.feats * 2).cache is x.cache
    down = SparseConv3d(4, 8, backend="torch")
    up = SparseInverseConv3d(8, 4, backend="torch")  # no key: pairs with the downsample that made stride 2
    z = up(down(y))
    assert torch.equal(z.coords, coords) and z.stride == 1
    with pytest.raises(HaskdError):
        SparseInverseConv3d(8, 4, key="nope", backend="torch")(down(y))


def test_kernel_map_pairs_are_symmetric():
    coords, _ = make_input(5)
    m = build_subm_map(coords, 3)
    # (i -> o) under offset k  <=>  (o -> i) under -k, the mirrored offset K-1-k
    fwd = {(k, int(i), int(o)) for k, s, e in m.groups for i, o in zip(m.in_idx[s:e], m.out_idx[s:e])}
    assert fwd == {(26 - k, o, i) for k, i, o in fwd}
    assert m.identity_k == 13


def test_searchsorted_lookup_matches_dense_table(monkeypatch):
    from haskd.sparse import torch_backend as tb

    coords, feats = make_input(9)
    dense = tb.build_subm_map(coords, 3)
    monkeypatch.setattr(tb, "DENSE_MAX_CELLS", 0)  # force the binary-search path (huge sparse boxes)
    assert tb.CoordIndex(coords, 1).table is None
    sparse = tb.build_subm_map(coords, 3)
    assert dense.groups == sparse.groups
    assert torch.equal(dense.in_idx, sparse.in_idx) and torch.equal(dense.out_idx, sparse.out_idx)


def test_empty_and_single_voxel():
    conv = SubMConv3d(2, 3, backend="torch")
    one = SparseTensor(torch.ones(1, 2, requires_grad=True), torch.tensor([[0, 5, 5, 5]]))
    out = conv(one)
    torch.testing.assert_close(out.feats, one.feats @ conv.weight[:, 1, 1, 1, :].t())
    out.feats.sum().backward()
    assert one.feats.grad.shape == (1, 2)


def test_backend_names(monkeypatch):
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("native", "cpu") == "native"
    assert resolve_backend("auto", "cpu") == ("native" if native.available() else "torch")
    monkeypatch.setattr(native, "available", lambda: False)  # no compiler here: auto runs the torch backend
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(HaskdError):
        resolve_backend("minkowski", "cpu")
    net = torch.nn.Sequential(SubMConv3d(2, 2), SubMConv3d(2, 2))
    set_backend(net, "torch")
    assert all(m.backend == "torch" for m in net)


# ---- spconv: only what spconv 2.3.8 can do on CPU (forward; its backward needs CUDA) ----

@needs_spconv
def test_spconv_subm_forward_matches_torch_and_dense():
    coords, feats = make_input(6)
    conv = SubMConv3d(3, 4, backend="torch")
    ref = conv(SparseTensor(feats, coords)).feats
    set_backend(conv, "spconv")
    with torch.no_grad():
        out = conv(SparseTensor(feats, coords))
    assert torch.equal(out.coords, coords)
    torch.testing.assert_close(out.feats, ref.detach(), atol=1e-5, rtol=1e-5)
    assert torch.get_num_threads() == 1  # restored to the caller's setting
    torch.set_num_threads(2)  # spconv's forward must not use >1 thread (wrong numbers in 2.3.8): forced back to 1
    with torch.no_grad():
        again = conv(SparseTensor(feats, coords))
    assert torch.equal(again.feats, out.feats) and torch.get_num_threads() == 2


@needs_spconv
def test_spconv_down_and_inverse_match_torch():
    coords, feats = make_input(7)
    down, up = SparseConv3d(3, 6, key="d"), SparseInverseConv3d(6, 4, key="d")
    res = {}
    for name in ("torch", "spconv"):
        set_backend(down, name)
        set_backend(up, name)
        with torch.no_grad():
            c = down(SparseTensor(feats, coords))
            f = up(c)
        res[name] = (sorted_rows(c.coords, c.feats), f)
    (ct, ft), (cs, fs) = res["torch"][0], res["spconv"][0]
    assert torch.equal(ct, cs)
    torch.testing.assert_close(fs, ft, atol=1e-5, rtol=1e-5)
    assert torch.equal(res["spconv"][1].coords, coords)
    torch.testing.assert_close(res["spconv"][1].feats, res["torch"][1].feats, atol=1e-5, rtol=1e-5)


@needs_spconv
def test_spconv_refuses_cpu_backward():
    coords, feats = make_input(8)
    conv = SubMConv3d(3, 4, backend="spconv")
    out = conv(SparseTensor(feats.requires_grad_(), coords))
    with pytest.raises(HaskdError, match="cannot train on CPU"):
        out.feats.sum().backward()


def test_scratch_buffers_survive_inference_mode_then_training():
    """Evaluate under inference_mode, then train in the same process (the experts stage does exactly this)."""
    from haskd.sparse import SparseTensor, SubMConv3d

    torch.manual_seed(0)
    coords = torch.cat([torch.zeros(300, 1, dtype=torch.long), torch.randint(0, 12, (300, 3))], 1).unique(dim=0)
    conv = SubMConv3d(4, 8, 3, backend="torch")
    with torch.inference_mode():
        conv(SparseTensor(torch.randn(coords.shape[0], 4), coords))
    out = conv(SparseTensor(torch.randn(coords.shape[0], 4, requires_grad=True), coords))
    out.feats.sum().backward()
    assert conv.weight.grad is not None
