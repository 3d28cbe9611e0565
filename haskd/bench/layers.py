"""``haskd benchmark --layers``: per-layer FLOP rate of the pure-torch sparse conv on a real room vs this machine's
dense matmul rate, and the whole-UNet torch vs spconv comparison."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..sparse.native import MAX_CIN_COUT
from .common import env_info, time_runs


def _load_real_scene(data, scene=None, split="val"):
    """Scene ``scene`` from any split of ``data`` (default: the first scene of ``split``, else of train)."""
    from ..data.scene import list_scenes, load_scene

    root = Path(data)
    others = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    splits = [sp for sp in dict.fromkeys([split, "train", "val", *others]) if (root / sp).is_dir()]
    dirs = [d for sp in splits for d in list_scenes(root, sp)]
    if scene:
        dirs = [d for d in dirs if d.name == scene]
    if not dirs:
        raise InputError(root, f"scene {scene} not found" if scene else "no scene folders under <root>/<split>/")
    return load_scene(dirs[0])


def _voxel_batch(scene, target_voxels=50000):
    """One-scene batch with about ``target_voxels`` voxels: the voxel size is searched (2-10 cm)."""
    from ..engine.evaluate import scene_sample
    from ..data.transforms import collate

    best = None
    for vs in np.arange(0.02, 0.101, 0.005):
        s = scene_sample(scene, float(vs), 20)
        n = s["grid_coord"].shape[0]
        if best is None or abs(n - target_voxels) < abs(best[1] - target_voxels):
            best = (float(vs), n, s)
        if n < target_voxels:
            break
    vs, n, s = best
    return vs, collate([s])


def _dense_gflops(m, k, n, reps=3) -> float:
    """torch.mm rate (GFLOP/s) of an ``(m, k) @ (k, n)`` product: the physical limit for the same shape."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)
    t = time_runs(lambda: torch.mm(a, b, out=out), reps, 1)["min"]
    return 2.0 * m * k * n / t / 1e9


def _stream_gbps(mib=256, reps=5) -> float:
    """Memory bandwidth of this run's threads (GB/s): a ``mib``-MiB tensor copy, read + write counted, best of
    ``reps``. The roofline's slope: no layer that streams its bytes can beat it."""
    src = torch.ones(mib * 2 ** 18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time_runs(lambda: dst.copy_(src), reps, 1)["min"]
    return 2.0 * src.numel() * 4 / t / 1e9


def conv_bytes(pairs, identity_rows, n_in, n_out, cin, cout, elem=4, index=8, native=False):
    """Bytes one sparse conv moves through memory, forward and backward (input + weight gradient), as the torch
    backend runs it (:mod:`haskd.sparse.torch_backend`): every gather reads its rows and index and writes the
    gathered copy, every per-offset GEMM reads its operands and writes its product, every CSR reduction reads the
    pair rows, its column index and values and writes the summed rows; the centre offset of a submanifold map is
    one plain GEMM. With ``native`` (:mod:`haskd.sparse.native`) a pair reads its input row and both indices and
    reads and writes its output row (no pair buffers), and the weight gradient reads each pair's two rows and
    indices once. Every access counts as memory traffic and the weights are too small to count. Returns
    ``(fwd_bytes, bwd_bytes)``."""
    p, e = float(pairs), float(elem)
    ident_f = identity_rows * (cin + 2 * cout) * e            # addmm reads and writes the output too
    if native:
        def fused(ci, co):
            return p * ((ci + 2 * co) * e + 2 * index)

        ident_b = identity_rows * (cout + 2 * cin) * e + identity_rows * (cout + cin) * e
        return fused(cin, cout) + ident_f, fused(cout, cin) + p * ((cin + cout) * e + 2 * index) + ident_b

    def gather(c):
        return p * (2 * c * e + index)

    def gemm(ci, co, rows):
        return rows * (ci + co) * e

    def reduce(c, rows):
        return p * (c * e + index + e) + rows * c * e

    fwd = gather(cin) + gemm(cin, cout, p) + reduce(cout, n_out) + ident_f
    ident_b = gemm(cout, 2 * cin, identity_rows) + gemm(cout, cin, identity_rows)
    bwd = (gather(cout) + gemm(cout, cin, p) + reduce(cin, n_in)    # input gradient
           + gather(cin) + gemm(cout, cin, p) + ident_b)            # weight gradient (x gathered again)
    return fwd, bwd


def benchmark_layers(data, scene=None, preset="small", threads=1, runs=3, target_voxels=50000,
                     unet=True, backend="auto") -> dict:
    """Per-layer FLOP rate of the sparse conv (``backend``: torch or native; auto = what training here uses) on a
    real room, plus the whole-UNet backend comparison."""
    from ..models.spunet import SPUNET_PRESETS, SpUNet
    from ..sparse import SparseConv3d, SparseInverseConv3d, SubMConv3d, resolve_backend
    from ..sparse.torch_backend import sparse_conv

    backend = resolve_backend(backend, "cpu")
    if backend not in ("torch", "native"):
        raise InputError(backend, "--layers times the torch or native backend (spconv has no CPU backward)")
    native = backend == "native"
    torch.set_num_threads(threads)
    sc = _load_real_scene(data, scene)
    vs, batch = _voxel_batch(sc, target_voxels)
    torch.manual_seed(0)
    model = SpUNet(3, 20, backend="torch", **SPUNET_PRESETS[preset]).eval()
    level = {1: 0, 2: 1, 4: 2, 8: 3, 16: 4, 32: 5}
    records = []

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, SubMConv3d):
            kind, kmap = f"subm L{level[x.stride]}", x.cache[("subm", x.stride, mod.kernel_size)]
        elif isinstance(mod, SparseConv3d):
            rec = x.cache[("down", mod.key or f"s{x.stride}")]
            kind, kmap = f"down L{level[x.stride]}->L{level[rec['out_stride']]}", rec["kmap"]
        else:
            rec = x.cache[("down", mod.key or x.cache.get(("down_to", x.stride)))]
            kind, kmap = f"inverse L{level[x.stride]}->L{level[rec['in_stride']]}", rec["kmap"].transposed()
        records.append((kind, x.feats.detach().clone(), mod.weight.detach().clone(), kmap))

    hs = [m.register_forward_hook(hook) for m in model.modules()
          if isinstance(m, (SubMConv3d, SparseConv3d, SparseInverseConv3d))]
    with torch.no_grad():
        model(batch)
    for h in hs:
        h.remove()
    dense_cache, types = {}, {}
    per_layer = []
    for kind, x, w, kmap in records:
        cin, cout = x.shape[1], w.shape[0]
        pairs = kmap.num_pairs
        flop = 2.0 * pairs * cin * cout
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        fwd = time_runs(lambda: sparse_conv(x, w, kmap, native), runs, 1)["median"]
        y = sparse_conv(xg, wg, kmap, native)
        g = torch.randn_like(y)
        bwd = time_runs(lambda: torch.autograd.grad(y, (xg, wg), g, retain_graph=True), runs, 1)["median"]
        groups = max(1, len(kmap.groups) + (kmap.identity_k is not None))
        shape = (max(1, pairs // groups), cin, cout)
        if shape not in dense_cache:
            dense_cache[shape] = _dense_gflops(*shape)
        fb, bb = conv_bytes(kmap.in_idx.numel(), kmap.n_out if kmap.identity_k is not None else 0, kmap.n_in,
                            kmap.n_out, cin, cout, native=native and cin * cout <= MAX_CIN_COUT)
        per_layer.append({"type": kind, "cin": cin, "cout": cout, "rows_in": kmap.n_in, "rows_out": kmap.n_out,
                          "pairs": pairs, "gflop": flop / 1e9, "fwd_s": fwd, "bwd_s": bwd, "fwd_gb": fb / 1e9,
                          "bwd_gb": bb / 1e9,
                          "fwd_gflops": flop / fwd / 1e9, "bwd_gflops": 2 * flop / bwd / 1e9,
                          "dense_gflops_same_shape": dense_cache[shape]})
        t = types.setdefault(kind, {"layers": 0, "pairs": 0, "gflop": 0.0, "fwd_s": 0.0, "bwd_s": 0.0,
                                    "fwd_gb": 0.0, "bwd_gb": 0.0, "_dense_s": 0.0})
        t["layers"] += 1
        t["pairs"] += pairs
        t["gflop"] += flop / 1e9
        t["fwd_s"] += fwd
        t["bwd_s"] += bwd
        t["fwd_gb"] += fb / 1e9
        t["bwd_gb"] += bb / 1e9
        t["_dense_s"] += flop / 1e9 / dense_cache[shape]
    bw = _stream_gbps()
    for t in types.values():
        t["fwd_gflops"] = t["gflop"] / t["fwd_s"]
        t["bwd_gflops"] = 2 * t["gflop"] / t["bwd_s"]  # backward = input grad + weight grad: twice the flops
        dense_s = t.pop("_dense_s")
        t["fwd_fraction_of_dense"] = dense_s / t["fwd_s"]
        t["bwd_fraction_of_dense"] = 2 * dense_s / t["bwd_s"]
        # roofline: the time the layer needs at least, compute (the dense rate of its shapes) or memory (its bytes
        # at the copy bandwidth), whichever is longer; the fraction of that limit the layer reaches
        for d, f in (("fwd", 1), ("bwd", 2)):
            need = max(f * dense_s, t[f"{d}_gb"] / bw)
            t[f"{d}_bound"] = "memory" if t[f"{d}_gb"] / bw > f * dense_s else "compute"
            t[f"{d}_fraction_of_roofline"] = need / t[f"{d}_s"]
    peak = _dense_gflops(4096, 256, 256)
    res = {"env": env_info("cpu"), "scene": sc.name, "points": sc.num_points, "voxel_size": vs,
           "voxels": int(batch["grid_coord"].shape[0]), "preset": preset, "threads": threads, "backend": backend,
           "dense_gflops_peak": peak, "copy_gbps": bw, "flop_rule": "2 x pairs x Cin x Cout (backward: twice that)",
           "byte_rule": "conv_bytes: the passes over memory as the backend runs them, caches ignored",
           "layer_types": types, "layers": per_layer,
           "total": {"gflop_fwd": sum(t["gflop"] for t in types.values()),
                     "fwd_s": sum(t["fwd_s"] for t in types.values()),
                     "bwd_s": sum(t["bwd_s"] for t in types.values())}}
    if unet:
        res["unet"] = unet_backends(batch, preset, runs)
    return res


class _NoThreadChange:
    """Stand-in for the ``torch`` module inside the spconv adapter whose ``set_num_threads`` does nothing, so that
    spconv runs with the caller's thread count (the adapter forces 1 thread because more give wrong results: this is
    how we show that)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def set_num_threads(n):
        pass


def unet_backends(batch, preset="small", runs=3, threads_list=(1, 2)) -> list:
    """Whole-UNet forward and training step: torch and native backends at each thread count, spconv single- and
    multi-thread (forward only on CPU: its backward needs CUDA). Native and spconv outputs are compared with the torch
    backend's."""
    from ..models.spunet import SPUNET_PRESETS, SpUNet
    from ..sparse import native, spconv_backend

    old = torch.get_num_threads()
    torch.manual_seed(0)
    model = SpUNet(3, 20, backend="torch", **SPUNET_PRESETS[preset])
    state = copy.deepcopy(model.state_dict())
    target = torch.randint(0, 20, (batch["grid_coord"].shape[0],))
    out = []
    try:
        for backend in ("torch", "native") if native.available() else ("torch",):
            model.set_backend(backend)
            for th in threads_list:
                torch.set_num_threads(th)
                model.load_state_dict(state)
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=1e-3)

                def step():
                    loss = torch.nn.functional.cross_entropy(model(batch)["logits"], target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                step_t = time_runs(step, runs, 1)["median"]
                model.load_state_dict(state)
                model.eval()
                with torch.no_grad():
                    fwd_t = time_runs(lambda: model(batch), runs, 1)["median"]
                out.append({"backend": backend, "threads": th, "forward": fwd_t, "step": step_t})
        model.set_backend("torch")
        # Compare in train mode (BN with batch statistics): activations are normalised as in a trained network.
        model.load_state_dict(state)
        model.train()
        with torch.no_grad():
            ref = model(batch)["logits"]
        tol = 1e-4 * max(float(ref.abs().max()), 1.0)
        if native.available():
            model.set_backend("native")
            with torch.no_grad():
                got = model(batch)["logits"]
            for row in out:
                if row["backend"] == "native":
                    row["mismatch_rows"] = int(((got - ref).abs() > tol).any(1).sum())
                    row["max_abs_diff"], row["tolerance"] = float((got - ref).abs().max()), tol
            model.set_backend("torch")
        if not spconv_backend.available():
            out.append({"backend": "spconv", "threads": None, "note": "spconv not installed"})
            return out
        model.set_backend("spconv")
        single = None
        for th, forced in ((1, True), (max(threads_list), False)):
            torch.set_num_threads(th)
            saved = spconv_backend.torch
            if not forced:
                spconv_backend.torch = _NoThreadChange()
            try:
                with torch.no_grad():
                    model.eval()  # timed like the torch backend's forward above
                    fwd_t = time_runs(lambda: model(batch), runs, 1)["median"]
                    model.train()
                    gots = [model(batch)["logits"] for _ in range(5)]
            finally:
                spconv_backend.torch = saved
            single = gots[0] if forced else single
            bad = max(int(((g - ref).abs() > tol).any(1).sum()) for g in gots)
            same = all(torch.equal(gots[0], g) for g in gots[1:])
            vs_single = max(int((g != single).any(1).sum()) for g in gots)
            note = "forward only (spconv's CPU backward needs CUDA); " + (
                "forced single-thread (haskd's adapter)" if forced else "multi-thread")
            if bad or not same:
                note += f": WRONG (up to {bad} of {len(ref)} rows differ from the torch backend" + (
                    "; runs differ from each other)" if not same else ")")
            out.append({"backend": "spconv", "threads": th, "forward": fwd_t, "step": None, "mismatch_rows": bad,
                        "rows_not_bitwise_equal_to_1_thread": vs_single, "repeatable_over_5_runs": same,
                        "max_abs_diff": max(float((g - ref).abs().max()) for g in gots), "tolerance": tol,
                        "note": note})
        model.set_backend("torch")
    finally:
        torch.set_num_threads(old)
    return out
