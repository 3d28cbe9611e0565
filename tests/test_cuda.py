"""CUDA against CPU: the pure-PyTorch sparse conv (every conv type, forward and backward), a whole SpUNet training
step, the PTv3-style model and a cached distillation step. Skipped without CUDA; `make gpu-check` runs them (`-m
cuda`). Tolerances: CUDA matmuls may use TF32 and reduce in another order, so they are looser than the CPU tests'."""
import copy
import json
import os

import pytest
import torch

from haskd.models.spunet import SPUNET_PRESETS, SpUNet, synthetic_room
from haskd.sparse import SparseConv3d, SparseInverseConv3d, SparseTensor, SubMConv3d

# HASKD_CUDA_TESTS_ON=cpu runs the same comparisons CPU against CPU: a check of the tests themselves on a machine
# without CUDA (they pass trivially there), never a substitute for the CUDA run.
DEV = os.environ.get("HASKD_CUDA_TESTS_ON", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def _exact_matmuls():
    # TF32 would make every comparison below a comparison of TF32 against float32; what is checked is the code path
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _coords(n=400, seed=0):
    grids = [synthetic_room(n, seed=seed), synthetic_room(n // 2, seed=seed + 1)]
    return torch.cat([torch.cat([torch.full((len(g), 1), b), g], 1) for b, g in enumerate(grids)]).long()


def _run_layers(device, layers, coords, feats):
    feats = feats.detach().to(device, copy=True).requires_grad_(True)  # a leaf of its own on every device
    x = SparseTensor(feats, coords.to(device))
    a = layers[0](x)                       # submanifold
    b = layers[1](a)                       # stride-2 down
    c = layers[2](b)                       # inverse up to the input voxels
    out = c.feats
    r = torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape)
    (out * r).sum().backward()
    return out.detach().cpu(), feats.grad.cpu(), [p.grad.cpu() for p in layers.parameters()]


def test_sparse_conv_forward_backward_agree():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([SubMConv3d(4, 8, 3, backend="torch"),
                                  SparseConv3d(8, 16, 2, 2, key="d1", backend="torch"),
                                  SparseInverseConv3d(16, 8, 2, key="d1", backend="torch")])
    coords = _coords()
    feats = torch.randn(len(coords), 4)
    cpu = _run_layers("cpu", layers, coords, feats)
    gpu = _run_layers(DEV, copy.deepcopy(layers).to(DEV), coords, feats)
    torch.testing.assert_close(gpu[0], cpu[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu[1], cpu[1], atol=1e-4, rtol=1e-4)
    for g, c in zip(gpu[2], cpu[2]):
        torch.testing.assert_close(g, c, atol=1e-3, rtol=1e-4)


def _step(model, batch, device):
    model = model.to(device).train()
    b = {k: v.to(device) for k, v in batch.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(b)
    loss = torch.nn.functional.cross_entropy(out["logits"], b["segment"], ignore_index=-1)
    loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return loss.item(), out["logits"].detach().cpu(), grads, {n: p.detach().cpu() for n, p in model.named_parameters()}


def test_spunet_training_step_agrees():
    torch.manual_seed(0)
    coords = _coords(600)
    offset = torch.tensor([int((coords[:, 0] == 0).sum()), len(coords)])
    batch = dict(grid_coord=coords[:, 1:], feat=torch.randn(len(coords), 6), offset=offset,
                 segment=torch.randint(-1, 5, (len(coords),)))
    model = SpUNet(6, 5, backend="torch", **SPUNET_PRESETS["tiny"])
    cpu = _step(copy.deepcopy(model), batch, "cpu")
    gpu = _step(copy.deepcopy(model), batch, DEV)
    assert abs(cpu[0] - gpu[0]) < 1e-4
    torch.testing.assert_close(gpu[1], cpu[1], atol=1e-3, rtol=1e-3)
    for n in cpu[2]:  # batch norm in train mode: small float differences grow a little through the UNet
        torch.testing.assert_close(gpu[2][n], cpu[2][n], atol=2e-3, rtol=2e-3, msg=f"grad of {n}")
    for n in cpu[3]:
        torch.testing.assert_close(gpu[3][n], cpu[3][n], atol=1e-3, rtol=1e-3, msg=f"{n} after the step")


def test_ptv3_forward_agrees():
    from haskd.models.ptv3 import PointTransformerV3

    torch.manual_seed(0)
    coords = _coords(300)
    offset = torch.tensor([int((coords[:, 0] == 0).sum()), len(coords)])
    batch = dict(grid_coord=coords[:, 1:], coord=coords[:, 1:].float() * 0.05, feat=torch.randn(len(coords), 6),
                 offset=offset)
    model = PointTransformerV3(6, 5, enc_channels=(16, 32), enc_depths=(1, 1), num_heads=(1, 2), dec_channels=(16,),
                               dec_depths=(1,), backend="torch").eval()
    with torch.no_grad():
        cpu = model(batch)["logits"]
        gpu = copy.deepcopy(model).to(DEV)({k: v.to(DEV) for k, v in batch.items()})["logits"].cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)


def test_cached_distillation_step_runs_on_cuda(tiny_rooms, tmp_path):
    """Teacher on CUDA, then a student whose soft labels and hints come from the caches, all on CUDA."""
    from haskd.config import load_config
    from haskd.workflow.train import train

    common = [f"data.root={tiny_rooms}", "data.voxel_size=0.1", "model.preset=tiny", f"train.device={DEV}",
              "train.epochs=1", "teacher.image_size=[48,64]", "teacher.image_channels=8",
              "teacher.image_widths=[8,16]", "teacher.num_frames=2", "model.backend=torch"]
    teacher = load_config("scannet20_haskd", [*common, "role=teacher"])
    train(teacher, tmp_path / "teacher", progress=False)
    student = load_config("scannet20_haskd", [*common, f"distill.teacher_ckpt={tmp_path / 'teacher' / 'last.pt'}",
                                              "distill.cache=true", "distill.hint_weight=1", "distill.hint_cache=true"])
    train(student, tmp_path / "student", progress=False)

    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/ihd_hint"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for k, v in rows[-1].items() if k.startswith("train/"))
