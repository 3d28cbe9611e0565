"""Mixed precision (``optim.amp``): the pure-torch sparse conv under autocast, and every training role (baseline,
teacher, distilled student with hints) through the trainer. CPU runs bfloat16 autocast, the same code path as
CUDA's float16 one bar the gradient scaler; the CUDA run itself is tested where a GPU is present."""
import json
import logging

import pytest
import torch

from haskd.config import load_config
from haskd.engine.checkpoint import load_checkpoint
from haskd.engine.trainer import autocast_dtype
from haskd.workflow.train import train
from haskd.errors import HaskdError
from haskd.sparse import SparseTensor, SubMConv3d, SparseConv3d, SparseInverseConv3d

from conftest import TINY

PIPE = [*TINY, "train.eval_every=0", "teacher.image_size=[30,40]", "teacher.image_widths=[8,16]",
        "teacher.image_channels=8", "teacher.num_frames=2", "data.use_normal=true"]


def _tensor(n=400, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.randint(0, 12, (n, 3), generator=g), dim=0)
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1)
    return SparseTensor(torch.randn(len(coords), c, generator=g), coords)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_sparse_conv_under_autocast_matches_float32(dtype):
    """Under autocast every conv of a down / subm / inverse chain runs in the low dtype, its output is the float32
    result up to that dtype's rounding, and the weights' gradients arrive in float32, close to the float32 ones."""
    torch.manual_seed(0)
    down, subm, up = SparseConv3d(8, 16, 2, 2, key="d", backend="torch"), SubMConv3d(16, 16, 3, backend="torch"), \
        SparseInverseConv3d(16, 8, 2, key="d", backend="torch")

    def run(amp):
        x = _tensor()
        for m in (down, subm, up):
            m.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            y = up(subm(down(x)))
            loss = (y.feats.float() ** 2).mean()
        loss.backward()
        return y.feats, [m.weight.grad.clone() for m in (down, subm, up)]

    y32, g32 = run(False)
    ylo, glo = run(True)
    assert y32.dtype == torch.float32 and ylo.dtype == dtype
    assert float((ylo.float() - y32).norm() / y32.norm()) < 2e-2
    for a, b in zip(glo, g32):
        assert a.dtype == torch.float32 and float((a - b).norm() / b.norm()) < 5e-2


def test_backward_inside_autocast():
    """A backward called while autocast is still on (CPU runs it in the calling thread) gives the same gradients."""
    conv = SubMConv3d(8, 8, 3, backend="torch")
    grads = []
    for inside in (False, True):
        conv.zero_grad()
        x = _tensor(seed=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = conv(x).feats.float().sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append(conv.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_autocast_dtype_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    c = load_config("scannet20_haskd")
    assert autocast_dtype(c, cpu) is None  # the default (float16) stays float32 on CPU
    assert autocast_dtype(c, cuda) is torch.float16
    c = load_config("scannet20_haskd", ["optim.amp_dtype=bfloat16"])
    assert autocast_dtype(c, cpu) is torch.bfloat16 and autocast_dtype(c, cuda) is torch.bfloat16
    c = load_config("scannet20_haskd", ["optim.amp_dtype=bfloat16", "optim.amp=false"])
    assert autocast_dtype(c, cpu) is None and autocast_dtype(c, cuda) is None
    with pytest.raises(HaskdError, match="'optim.amp_dtype' must be one of float16, bfloat16, got 'fp8'"):
        load_config("scannet20_haskd", ["optim.amp_dtype=fp8"])  # refused when the config is read
    c.optim.amp_dtype = "fp8"  # and by the trainer for a config built in code
    with pytest.raises(HaskdError, match="optim.amp_dtype must be float16 or bfloat16, got 'fp8'"):
        autocast_dtype(c, cpu)


def _rows(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_role_trains_under_bfloat16_autocast(tiny_rooms, tmp_path, caplog):
    """Teacher (image branch, lifting, fusion), then a student distilled from it with the logit term, the hints and
    cached soft labels, all under CPU bfloat16 autocast: finite losses, a saved float32 student."""
    amp = ["optim.amp_dtype=bfloat16", f"data.root={tiny_rooms}", "train.epochs=1"]
    caplog.set_level(logging.INFO, logger="haskd")
    teacher = load_config("scannet20_haskd", [*PIPE, *amp, "role=teacher"])
    m = train(teacher, tmp_path / "teacher", progress=False)
    assert "mixed precision: autocast bfloat16 on cpu" in caplog.text
    assert 0 <= m["miou"] <= 1
    assert all(torch.isfinite(torch.tensor(v)) for k, v in _rows(tmp_path / "teacher")[-1].items()
               if k.startswith("train/"))
    student = load_config("scannet20_haskd", [*PIPE, *amp, f"distill.teacher_ckpt={tmp_path / 'teacher' / 'last.pt'}",
                                              "distill.hint_weight=1", "train.epochs=2"])
    train(student, tmp_path / "student", progress=False)
    row = _rows(tmp_path / "student")[-1]
    assert row["train/ihd_hint"] > 0 and row["train/ihd_logit"] >= 0
    assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k.startswith("train/"))
    ck = load_checkpoint(tmp_path / "student" / "last.pt")
    assert all(v.dtype in (torch.float32, torch.int64) for v in ck["state_dict"].values())
    assert ck["scaler"] == {}  # bfloat16 needs no gradient scaler


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float16_training_keeps_the_scaler_across_a_resume(tiny_rooms, tmp_path):
    """CUDA float16 (the default there): the gradient scaler's state is saved in last.pt and restored on resume."""
    cfg = load_config("scannet20_haskd", [*PIPE, f"data.root={tiny_rooms}", "train.device=cuda", "train.epochs=1",
                                          "model.backend=torch"])
    train(cfg, tmp_path / "run", progress=False)
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["scaler"] and ck["scaler"]["scale"] > 0
    cfg.train.epochs = 2
    train(cfg, tmp_path / "run", resume=True, progress=False)
    assert [r["epoch"] for r in _rows(tmp_path / "run")] == [1, 2]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in _rows(tmp_path / "run")[-1].items() if k.startswith("train/"))
