"""The native backend's C kernel: equal to the torch backend up to float rounding, deterministic, used only where it
handles the layer, and a clean fallback where it cannot be compiled."""
import pytest
import torch

from haskd.sparse import SparseConv3d, SparseInverseConv3d, SparseTensor, SubMConv3d, native
from haskd.sparse.torch_backend import SparseConvFunction

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"native kernel unavailable: {native.unavailable_reason()}")


def _coords(seed, n=700, grid=10):
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.randint(0, grid, (n, 3), generator=gen)
    b = torch.randint(0, 2, (n, 1), generator=gen)
    return torch.unique(torch.cat([b, xyz], 1), dim=0)


def _run(backend, coords, cin, cout, seed=0):
    """A subm -> down -> inverse chain: values and every gradient."""
    torch.manual_seed(seed)
    a = SubMConv3d(cin, cout, 3, backend=backend)
    d = SparseConv3d(cout, cout, 2, 2, key="d", backend=backend)
    u = SparseInverseConv3d(cout, cin, 2, key="d", backend=backend)
    x = torch.randn(coords.shape[0], cin, requires_grad=True)
    y = u(d(a(SparseTensor(x, coords)))).feats
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach(), x.grad, a.weight.grad, d.weight.grad, u.weight.grad]


@needs_native
@pytest.mark.parametrize("cin,cout", [(3, 5), (6, 32), (33, 48), (64, 17), (16, 24), (1, 1), (130, 140)])
def test_native_matches_torch_backend(cin, cout):
    # channel counts off the kernel's row tiles and 16/32-column panels exercise its half panel (a VW-column tile:
    # 8 on AVX2, 16 on AVX-512) and its left-over loops; 130 x 140 is above MAX_CIN_COUT: torch forward, kernel
    # backward
    coords = _coords(cin + cout)
    for got, ref in zip(_run("native", coords, cin, cout), _run("torch", coords, cin, cout)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_native
def test_native_is_deterministic():
    coords = _coords(7)
    first, second = _run("native", coords, 8, 32), _run("native", coords, 8, 32)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


@needs_native
def test_kernel_runs_only_where_it_handles_the_layer(monkeypatch):
    calls = []
    real = native.conv_pairs
    monkeypatch.setattr(native, "conv_pairs", lambda *a: calls.append(a[1].shape) or real(*a))
    coords = _coords(3)
    x = torch.randn(coords.shape[0], 8)
    conv = SubMConv3d(8, 16, 3, backend="native")
    conv(SparseTensor(x, coords))
    assert calls == [(27, 8, 16)]  # (K, Cin, Cout): the weight as the kernel reads it
    calls.clear()
    conv.double()(SparseTensor(x.double(), coords))  # float64: the torch passes
    wide = SubMConv3d(256, 256, 3, backend="native")  # above MAX_CIN_COUT: MKL's GEMMs are faster forward
    y = wide(SparseTensor(torch.randn(coords.shape[0], 256, requires_grad=True), coords)).feats
    torch_only = SubMConv3d(8, 16, 3, backend="torch")
    torch_only(SparseTensor(x, coords))
    assert calls == []
    y.sum().backward()  # ... and the kernel faster backward: the input gradient by W_k^T, (K, Cout, Cin)
    assert calls == [(27, 256, 256)] and wide.weight.grad is not None
    assert not native.handles(torch.randn(4, 256), torch.randn(256, 27, 256))
    assert native.handles(torch.randn(4, 256), torch.randn(256, 27, 256), forward=False)
    assert native.handles(torch.randn(4, 128), torch.randn(128, 27, 128))


@needs_native
def test_native_without_the_identity_offset_and_empty_maps():
    # a down conv has no centre offset (the output starts from zeros); an empty input gives an empty output
    coords = _coords(5)
    empty = coords[:0]
    for be in ("native", "torch"):
        d = SparseConv3d(4, 8, 2, 2, backend=be)
        assert d(SparseTensor(torch.randn(0, 4), empty)).feats.shape == (0, 8)
    x = torch.randn(coords.shape[0], 4, requires_grad=True)
    w = torch.randn(8, 8, 4, requires_grad=True)
    from haskd.sparse.torch_backend import build_down_map
    _, kmap = build_down_map(coords, 2, 2)
    assert kmap.identity_k is None
    out_n = SparseConvFunction.apply(x, w, kmap, True)
    out_t = SparseConvFunction.apply(x, w, kmap, False)
    torch.testing.assert_close(out_n, out_t)


def test_fallback_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("HASKD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no C compiler"):
        native._load()
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with pytest.raises(RuntimeError, match="compiling native.c failed"):
        native._load()
    kernels = tmp_path / "kernels"
    assert kernels.is_dir() and list(kernels.iterdir()) == []  # nothing partial left behind


@needs_native
def test_compiled_kernel_is_cached_under_a_cpu_specific_name(monkeypatch, tmp_path):
    monkeypatch.setenv("HASKD_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    native._load()
    (lib,) = (tmp_path / "kernels").iterdir()
    assert lib.name.startswith("haskd_sparse_") and lib.suffix == ".so"
    mtime = lib.stat().st_mtime_ns
    native._load()  # the second load reuses it
    assert lib.stat().st_mtime_ns == mtime and len(list((tmp_path / "kernels").iterdir())) == 1
    monkeypatch.setattr(native, "_cpu_tag", lambda: "flags : another cpu")
    native._load()  # another CPU: another file, never the first one
    assert len(list((tmp_path / "kernels").iterdir())) == 2
