"""``haskd benchmark --chunked``: peak memory and time of chunked vs one-shot inference on a tiled real room."""
from __future__ import annotations

import time

import numpy as np
import torch

from .common import PeakMemory, env_info
from .layers import _load_real_scene


def tiled_scene(scene, grid=3, gap=0.5):
    """``grid x grid`` translated copies of a scene (``gap`` metres apart): a large multi-room test scene."""
    from ..data.scene import Scene

    ext = scene.coord.max(0) - scene.coord.min(0)
    shifts = [np.array([i * (ext[0] + gap), j * (ext[1] + gap), 0], np.float32)
              for i in range(grid) for j in range(grid)]
    return Scene(f"{scene.name}_x{grid * grid}", np.concatenate([scene.coord + s for s in shifts]),
                 np.concatenate([scene.color] * len(shifts)))


def benchmark_chunked(data, ckpt=None, scene=None, grid=3, max_voxels=100000, overlap=1.0, preset="small",
                      voxel_size=0.05, threads=1) -> dict:
    """Peak memory and time of chunked vs one-shot inference on a tiled real room; label agreement of the two.

    Chunked runs first: the one-shot pass's freed memory may stay mapped and would inflate a later peak.
    """
    from ..engine.checkpoint import load_model
    from ..engine.chunked import predict_points_chunked
    from ..engine.evaluate import predict_points
    from ..models.spunet import SPUNET_PRESETS, SpUNet

    torch.set_num_threads(threads)
    if ckpt:
        model, cfg = load_model(ckpt, return_config=True)
        voxel_size, C, nrm = cfg.data.voxel_size, cfg.data.num_classes, cfg.data.use_normal
    else:
        torch.manual_seed(0)
        model, C, nrm = SpUNet(3, 20, backend="torch", **SPUNET_PRESETS[preset]).eval(), 20, False
    big = tiled_scene(_load_real_scene(data, scene), grid)
    res = {"env": env_info("cpu"), "scene": big.name, "points": big.num_points, "voxel_size": voxel_size,
           "max_voxels": max_voxels, "overlap_m": overlap, "model": str(ckpt) if ckpt else f"untrained {preset}"}
    info = {}
    with torch.no_grad():
        with PeakMemory("cpu") as m1:
            t0 = time.perf_counter()
            a = predict_points_chunked(model, big, voxel_size, C, "cpu", nrm, max_voxels=max_voxels,
                                       overlap=overlap, info=info)
            t1 = time.perf_counter()
        res["chunked"] = {"peak_rss_mb": m1.mb, "seconds": t1 - t0, **info}
        a = a.argmax(1)
        with PeakMemory("cpu") as m2:
            t0 = time.perf_counter()
            b = predict_points(model, big, voxel_size, C, "cpu", nrm).argmax(1)
            t1 = time.perf_counter()
        res["one_shot"] = {"peak_rss_mb": m2.mb, "seconds": t1 - t0}
    res["label_agreement"] = float((a == b).float().mean())
    res["memory_method"] = m1.method
    return res
