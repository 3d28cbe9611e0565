"""2D-3D lifting: projection against a hand-made pinhole camera, depth test, exact bilinear values, real ScanNet."""
import numpy as np
import pytest
import torch

from haskd.data.frames import read_intrinsic, read_pose, scale_intrinsic
from haskd.images.lifting import inside, lift, project, sample_features, visibility

K = np.array([[100.0, 0, 50], [0, 100.0, 40], [0, 0, 1]])   # image 80 x 100 (H x W)
HW = (80, 100)
# Camera at (0, 0, 3) looking down the world -z axis; its y axis is world -y.
POSE_DOWN = np.array([[1.0, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 3], [0, 0, 0, 1]])


def test_project_hand_made_camera():
    pts = np.array([[0.0, 0, 1], [0.5, 0.2, 1], [0.0, 0, 4], [10.0, 0, 1]])
    uv, z = project(pts, POSE_DOWN, K)
    assert uv.shape == (1, 4, 2) and z.shape == (1, 4)
    # (0.5, 0.2, 1) -> camera (0.5, -0.2, 2) -> u = 50 + 100 * 0.25, v = 40 - 100 * 0.1
    np.testing.assert_allclose(uv[0, :2].numpy(), [[50, 40], [75, 30]], atol=1e-9)
    np.testing.assert_allclose(z[0].numpy(), [2, 2, -1, 2], atol=1e-9)
    assert inside(uv, HW)[0, [0, 1, 3]].tolist() == [True, True, False]


def test_project_matches_inverse_pose_batched():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(50, 3))
    poses = []
    for a in (0.3, 1.2):
        c, s = np.cos(a), np.sin(a)
        P = np.eye(4)
        P[:3, :3] = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
        P[:3, 3] = rng.normal(size=3)
        poses.append(P)
    poses = np.stack(poses)
    K2 = K * [[2], [2], [1]]
    uv, z = project(pts, poses, np.stack([K, K2]))
    for v in range(2):
        cam = (np.linalg.inv(poses[v]) @ np.c_[pts, np.ones(50)].T)[:3]
        pix = ((K2 if v else K) @ cam)
        front = cam[2] > 1e-3
        np.testing.assert_allclose(z[v].numpy(), cam[2], atol=1e-9)
        np.testing.assert_allclose(uv[v].numpy()[front], (pix[:2] / pix[2]).T[front], atol=1e-7)


def test_visibility_depth_test():
    depth = np.full((1, 80, 100), 2.0)
    depth[0, 30, 75] = 0.0                                    # invalid pixel
    pts = np.array([
        [0.0, 0, 1],        # on the surface (z = 2): visible
        [0.0, 0, 0.5],      # same ray, 0.5 m behind the surface: occluded
        [0.0, 0, 1.04],     # 4 cm in front of the surface: within tau
        [0.5, 0.2, 1],      # lands on the invalid pixel
        [0.0, 0, 5],        # behind the camera
        [10.0, 0, 1],       # outside the image
    ])
    vis = visibility(pts, POSE_DOWN[None], K, depth, tau=0.05)
    assert vis.shape == (1, 6)
    assert vis[0].tolist() == [True, False, True, False, False, False]


def test_sample_features_exact_bilinear():
    # A linear field f(u, v) = 2u + 3v + 1 is reproduced exactly by bilinear interpolation, at any resolution,
    # when pixel centres are placed as documented (pixel i of an s-times smaller map sits at image u = s*i + (s-1)/2).
    H, W = HW
    uv = torch.tensor([[[10.25, 20.75], [50.0, 40.0], [0.0, 0.0], [97.5, 77.0]]], dtype=torch.float64)
    want = 2 * uv[0, :, 0] + 3 * uv[0, :, 1] + 1
    for s in (1, 2):
        jj = torch.arange(W // s, dtype=torch.float64) * s + (s - 1) / 2
        ii = torch.arange(H // s, dtype=torch.float64) * s + (s - 1) / 2
        f = 2 * jj[None, :] + 3 * ii[:, None] + 1
        feat = torch.stack([f, torch.full_like(f, 7.0)])[None]       # (1, 2, H/s, W/s)
        out = sample_features(feat, uv, HW)
        assert out.shape == (1, 4, 2)
        # every query lies between pixel centres of the full map; (0, 0) and (97.5, 77) lie outside the
        # centres of the half map (border clamping), so check only the two interior ones there
        n = 4 if s == 1 else 2
        np.testing.assert_allclose(out[0, :n, 0].numpy(), want[:n].numpy(), atol=1e-9)
        np.testing.assert_allclose(out[0, :, 1].numpy(), 7.0)


def test_lift_means_over_visible_views():
    pts = np.array([[0.0, 0, 1], [0.5, 0.2, 1], [0.0, 0, 0.5]])
    poses = np.stack([POSE_DOWN, POSE_DOWN])
    depth = np.stack([np.full((80, 100), 2.0), np.full((80, 100), 2.0)])
    depth[1, 30, 75] = 0.0                                    # view 1 does not see point 1
    feat = torch.zeros(2, 1, 40, 50)
    feat[0] += 1.0
    feat[1] += 3.0
    feat.requires_grad_(True)
    out = lift(pts, feat, poses, K, HW, depth, K, tau=0.05)
    assert out["count"].tolist() == [2, 1, 0]
    assert out["visible"].tolist() == [True, True, False]
    np.testing.assert_allclose(out["feat"][:, 0].detach().numpy(), [2.0, 1.0, 0.0])
    out["feat"].sum().backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0


# ---------------------------------------------------------------- real ScanNet frames

def _load_scene(root, scene, frame_ids):
    from PIL import Image

    d = root / "scannet_rgbd_ai360" / scene
    pts = np.fromfile(d / f"{scene}_points_xyzrgb.bin", dtype=np.float32).reshape(-1, 6)
    colors, depths, poses = [], [], []
    for fid in frame_ids:
        colors.append(np.asarray(Image.open(d / "color" / f"{fid}.jpg").convert("RGB")))
        depths.append(np.asarray(Image.open(d / "depth" / f"{fid}.png"), dtype=np.float32) / 1000.0)
        poses.append(read_pose(d / "pose" / f"{fid}.txt"))
    Kc = read_intrinsic(d / "intrinsic" / "intrinsic_color.txt")
    return pts, np.stack(colors), np.stack(depths), np.stack(poses), Kc


@pytest.mark.parametrize("scene,frame_ids", [
    ("scene0000_00", ["00000", "00150", "00297"]),
    ("scene0113_00", ["00000", "00150", "00290"]),
    ("scene0448_01", ["00000", "00150", "00290"]),
])
def test_lift_real_colours_match(shared_data, scene, frame_ids):
    pts, colors, depths, poses, Kc = _load_scene(shared_data, scene, frame_ids)
    pts = pts[::3]                                             # keep the test fast
    H, W = colors.shape[1:3]
    h, w = depths.shape[1:3]
    Kd = scale_intrinsic(Kc, w / W, h / H)
    img = torch.from_numpy(colors).permute(0, 3, 1, 2).float()
    out = lift(pts[:, :3], img, poses, Kc, (H, W), depths, Kd, tau=0.05)
    vis = out["visible"].numpy()
    assert vis.sum() > 1000, f"{scene}: only {vis.sum()} depth-consistent points"
    pc = pts[vis, 3:]
    ic = out["feat"][vis].numpy()
    err = np.abs(pc - ic).mean()
    shuf = np.abs(pc - ic[np.random.default_rng(0).permutation(len(ic))]).mean()
    print(f"{scene}: {vis.sum()} visible pts, mean |point - image colour| {err:.1f}, shuffled {shuf:.1f}")
    assert err <= 0.5 * shuf


# ---------------------------------------------------------------- the 2D branch that produces feat2d

def test_image_unet_shapes_and_grad():
    from haskd.models.image_unet import ImageUNet

    torch.manual_seed(0)
    net = ImageUNet(3, 16, widths=(8, 16, 32), num_classes=5)
    x = torch.randn(2, 3, 30, 41)                                # odd sizes on purpose
    out = net(x)
    assert out["feat"].shape == (2, 16, 30, 41) and out["logits"].shape == (2, 5, 30, 41)
    out["logits"].mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert "logits" not in ImageUNet(3, 16, widths=(8, 16))(x[:1])


def test_image_unet_load_pretrained(tmp_path, caplog):
    from haskd.errors import InputError
    from haskd.models.image_unet import ImageUNet

    src = ImageUNet(3, 16, widths=(8, 16), num_classes=5)
    sd = {"module." + k: v for k, v in src.state_dict().items()}
    sd["module.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    dst = ImageUNet(3, 16, widths=(8, 16), num_classes=7)       # another classifier: shape mismatch
    rep = dst.load_pretrained(tmp_path / "w.pth")
    assert rep["unexpected"] == ["extra.weight"]
    assert set(rep["mismatched"]) == {"classifier.weight", "classifier.bias"}
    assert set(rep["missing"]) == {"classifier.weight", "classifier.bias"}
    torch.testing.assert_close(dst.stem[0].weight, src.stem[0].weight)
    with pytest.raises(InputError, match="not match exactly"):
        dst.load_pretrained(tmp_path / "w.pth", strict=True)
    with pytest.raises(InputError, match="not found"):
        dst.load_pretrained(tmp_path / "nope.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="no parameter"):
        dst.load_pretrained(tmp_path / "bad.pth")
