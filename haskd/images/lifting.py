"""2D-3D lifting: project points into posed RGB-D frames, test visibility against depth, sample 2D features.

Conventions (used by every function here):

- ``pose`` is camera-to-world (ScanNet), the camera frame is OpenCV's: x right, y down, z forward.
  A world point X goes to the camera as ``R^T (X - t)`` with ``pose = [[R, t], [0, 1]]``.
- Pixel coordinates follow the OpenCV/ScanNet **pixel-centre** convention: ``u = fx * x / z + cx`` and the centre
  of pixel column ``i`` is at ``u = i``; the image of width W spans ``u`` in ``[-0.5, W - 0.5)``.
  Nearest-pixel lookup is therefore ``round(u)``; for bilinear sampling we map the image extent onto
  ``grid_sample``'s ``[-1, 1]`` with ``align_corners=False`` (``x = (2u + 1) / W - 1``), which samples a feature map
  of *any* resolution covering the same field of view at the right place (an H/2 feature map is sampled correctly
  with image coordinates).

Everything is batched over views (V) and points (N) with tensor ops; no Python loop over points.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Points closer than this to the camera plane are treated as behind it (avoids dividing by ~0).
NEAR = 1e-3


def _t(x, dtype=None, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device if device is not None else x.device, dtype=dtype or x.dtype)
    return torch.as_tensor(x, dtype=dtype, device=device)


def _float_dtype(x) -> torch.dtype:
    # Keep float64 inputs exact (tests, numpy callers); everything else computes in float32.
    return torch.float64 if str(getattr(x, "dtype", "")).endswith("float64") else torch.float32


def project(points, pose, K):
    """Project world points into V cameras.

    Args:
        points: (N, 3) world coordinates (numpy or torch).
        pose: (V, 4, 4) or (4, 4) camera-to-world.
        K: (V, 3, 3) or (3, 3) intrinsics (a 4x4 is accepted, its top-left 3x3 is used).
    Returns:
        uv: (V, N, 2) pixel coordinates (pixel-centre convention, see module doc); meaningless where z <= NEAR.
        z: (V, N) depth along the camera axis (metres); <= 0 behind the camera.
    """
    dt = _float_dtype(points)
    pts = _t(points, dt)
    dev = pts.device
    pose = _t(pose, dt, dev)
    K = _t(K, dt, dev)[..., :3, :3]
    if pose.dim() == 2:
        pose = pose[None]
    V = pose.shape[0]
    if K.dim() == 2:
        K = K[None].expand(V, 3, 3)
    R = pose[:, :3, :3]                      # (V, 3, 3) camera axes in world
    t = pose[:, :3, 3]                       # (V, 3) camera centre
    # x_cam = R^T (X - t): with row vectors that is (X - t) @ R.
    cam = torch.einsum("vnk,vkj->vnj", pts[None] - t[:, None, :], R)     # (V, N, 3)
    pix = torch.einsum("vnk,vjk->vnj", cam, K)                            # (V, N, 3) = K x_cam
    z = cam[..., 2]
    zs = torch.where(z > NEAR, z, torch.full_like(z, NEAR))
    uv = pix[..., :2] / zs[..., None]
    return uv, z


def inside(uv, hw) -> torch.Tensor:
    """(V, N) bool: ``uv`` (V, N, 2) falls on a pixel of an image of size ``hw = (H, W)``."""
    H, W = int(hw[0]), int(hw[1])
    u, v = uv[..., 0], uv[..., 1]
    return (u >= -0.5) & (u < W - 0.5) & (v >= -0.5) & (v < H - 0.5)


def visibility(points, pose, K_depth, depth, tau: float = 0.05, return_z: bool = False):
    """Which views see which points, tested against the depth images.

    A point is visible in view v when it is in front of the camera, projects onto a pixel of the depth image and
    ``|depth(u, v) - z| < tau`` with a nearest-pixel depth lookup (invalid depth = 0 never matches).

    Args:
        points: (N, 3) world; pose: (V, 4, 4) camera-to-world; K_depth: (V, 3, 3) or (3, 3) for the depth image;
        depth: (V, h, w) metres, 0 = invalid; tau: depth tolerance in metres (about one voxel).
    Returns:
        (V, N) bool (and z (V, N) when ``return_z``).
    """
    depth = _t(depth)
    if depth.dim() == 2:
        depth = depth[None]
    uv, z = project(points, pose, K_depth)
    V, h, w = depth.shape
    ok = (z > NEAR) & inside(uv, (h, w))
    ui = torch.round(uv[..., 0]).long().clamp_(0, w - 1)
    vi = torch.round(uv[..., 1]).long().clamp_(0, h - 1)
    flat = depth.reshape(V, h * w).to(z.dtype)
    d = torch.gather(flat, 1, vi * w + ui)                                # (V, N)
    vis = ok & (d > 0) & ((d - z).abs() < tau)
    return (vis, z) if return_z else vis


def sample_features(feat, uv, image_hw=None):
    """Bilinearly sample 2D features at pixel positions.

    Args:
        feat: (V, C, Hf, Wf) feature maps covering the same field of view as the image.
        uv: (V, N, 2) positions in pixel coordinates of an image of size ``image_hw = (Himg, Wimg)``
            (default: the feature map's own size). Pixel-centre convention, see module doc.
    Returns:
        (V, N, C). Positions outside the image get the border value (callers mask them).
    """
    V, C, Hf, Wf = feat.shape
    Himg, Wimg = (Hf, Wf) if image_hw is None else (int(image_hw[0]), int(image_hw[1]))
    uv = _t(uv, feat.dtype, feat.device)
    gx = (2.0 * uv[..., 0] + 1.0) / Wimg - 1.0
    gy = (2.0 * uv[..., 1] + 1.0) / Himg - 1.0
    grid = torch.stack([gx, gy], dim=-1)[:, None]                        # (V, 1, N, 2)
    out = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, 0].permute(0, 2, 1)                                  # (V, N, C)


def lift(points, feat2d, pose, K_color, color_hw, depth, K_depth, tau: float = 0.05):
    """Lift per-view 2D features onto 3D points: mean over the views that see each point.

    Args:
        points: (N, 3) world coordinates.
        feat2d: (V, C, Hf, Wf) 2D features of the V colour images (any resolution over the same field of view).
        pose: (V, 4, 4) camera-to-world.
        K_color: (V, 3, 3) or (3, 3) intrinsics of the colour image of size ``color_hw = (H, W)``.
        depth: (V, h, w) metres (0 = invalid); K_depth: intrinsics for the depth image size.
        tau: depth tolerance (metres).
    Returns:
        dict ``feat`` (N, C) mean feature over visible views (zeros where unseen; the teacher adds a learned
        "unseen" embedding), ``visible`` (N,) bool, ``count`` (N,) int64 number of views that see the point.
        Gradients flow into ``feat2d``.
    """
    vis = visibility(points, pose, K_depth, depth, tau).to(feat2d.device)  # (V, N)
    uv, _ = project(points, pose, K_color)
    vis = vis & inside(uv, color_hw).to(feat2d.device)
    f = sample_features(feat2d, uv.to(feat2d.device), color_hw)            # (V, N, C)
    m = vis.to(feat2d.dtype)[..., None]
    count = vis.sum(0)
    feat = (f * m).sum(0) / count.clamp(min=1)[:, None].to(feat2d.dtype)
    return {"feat": feat, "visible": count > 0, "count": count.long()}
