"""The teacher's 2D branch on a timm encoder (features_only, several strides, the same UNet decoder).

timm needs a torchvision built for the installed torch; the CPU torch of this project's machines has none, so the
tests that build a real timm model skip there with the import error as the reason, and run where timm imports
(e.g. a CUDA machine with torch + torchvision + timm). The adapter's wiring is tested everywhere with a hand-made
encoder that follows timm's features_only contract."""
import pytest
import torch
import torch.nn as nn

from haskd.config import load_config
from haskd.errors import HaskdError, InputError
from haskd.models import image_unet
from haskd.models.image_unet import TimmUNet

from conftest import TINY


def _timm_or_skip():
    try:
        import timm
    except Exception as e:  # ImportError, or RuntimeError from a torchvision that does not match torch
        pytest.skip(f"timm does not import here ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return timm


TEACH = [*TINY, "role=teacher", "teacher.image_size=[32,48]", "teacher.image_channels=8", "teacher.num_frames=2",
         "teacher.fusion_hidden=16"]


def test_config_rules_checked_when_read():
    with pytest.raises(HaskdError, match="needs teacher.image_encoder"):
        load_config(None, ["teacher.image_pretrained=hub"])
    with pytest.raises(HaskdError, match="teacher.image_weights is for the built-in"):
        load_config(None, ["teacher.image_encoder=resnet18", "teacher.image_weights=w.pth"])
    with pytest.raises(HaskdError, match="list of encoder level"):
        load_config(None, ["teacher.image_encoder=resnet18", "teacher.image_out_indices=[1,-2]"])
    cfg = load_config(None, ["teacher.image_encoder=resnet18", "teacher.image_pretrained=/no/such/file.pth",
                             "teacher.image_out_indices=[1,2,3]"])
    assert cfg.teacher.image_out_indices == [1, 2, 3]   # a path is checked when loaded, not when read


# ---------------------------------------------------------------- the adapter, with a features_only stand-in
class _Info:
    def __init__(self, chans, reds):
        self._c, self._r = chans, reds

    def channels(self):
        return list(self._c)

    def reduction(self):
        return list(self._r)


class _FeaturesOnly(nn.Module):
    """Three levels at strides 2, 4, 8 with 6, 10, 14 channels: timm's features_only output contract."""

    def __init__(self):
        super().__init__()
        self.s1 = nn.Conv2d(3, 6, 3, 2, 1)
        self.s2 = nn.Conv2d(6, 10, 3, 2, 1)
        self.s3 = nn.Conv2d(10, 14, 3, 2, 1)
        self.feature_info = _Info([6, 10, 14], [2, 4, 8])

    def forward(self, x):
        a = self.s1(x)
        b = self.s2(a)
        return [a, b, self.s3(b).permute(0, 2, 3, 1)]    # the coarsest level channels-last, as Swin's


class _FakeTimm:
    def __init__(self):
        self.calls = []

    def create_model(self, name, **kw):
        self.calls.append((name, kw))
        if name != "tiny_enc":
            raise RuntimeError(f"Unknown model ({name})")
        return _FeaturesOnly()


def test_adapter_decodes_every_level_and_passes_the_weight_source(monkeypatch, tmp_path):
    fake = _FakeTimm()
    monkeypatch.setattr(image_unet, "import_timm", lambda: fake)
    torch.manual_seed(0)
    net = TimmUNet("tiny_enc", out_channels=5, num_classes=3)
    x = torch.randn(2, 3, 30, 41)                                  # odd sizes: upsampling meets every skip
    out = net(x)
    assert out["feat"].shape == (2, 5, 15, 21) and out["logits"].shape == (2, 3, 15, 21)
    out["logits"].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert fake.calls[-1] == ("tiny_enc", {"features_only": True, "pretrained": False})
    TimmUNet("tiny_enc", pretrained="hub", out_indices=[0, 2])
    assert fake.calls[-1][1] == {"features_only": True, "out_indices": (0, 2), "pretrained": True}
    w = tmp_path / "enc.pth"
    w.write_bytes(b"x")
    TimmUNet("tiny_enc", pretrained=str(w))
    assert fake.calls[-1][1] == {"features_only": True, "pretrained": True, "pretrained_cfg_overlay": {"file": str(w)}}
    with pytest.raises(InputError, match="not found"):
        TimmUNet("tiny_enc", pretrained=str(tmp_path / "none.pth"))
    with pytest.raises(HaskdError, match="Unknown model"):
        TimmUNet("no_such_net")


def test_missing_timm_is_one_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_timm(name, *a, **k):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(HaskdError, match="needs timm"):
        TimmUNet("resnet18")


# ---------------------------------------------------------------- a real timm model (skips where timm cannot import)
@pytest.mark.timm
def test_real_timm_resnet_feeds_the_decoder_and_loads_a_local_file(tmp_path):
    timm = _timm_or_skip()
    torch.manual_seed(0)
    net = TimmUNet("resnet18", out_channels=8, num_classes=4, pretrained="")
    assert net.reductions == [2, 4, 8, 16, 32]
    out = net(torch.randn(2, 3, 64, 96))
    assert out["feat"].shape == (2, 8, 32, 48) and out["logits"].shape == (2, 4, 32, 48)
    out["feat"].mean().backward()
    # a local file holding a full timm resnet18 (as timm saves it): the encoder starts from exactly those weights
    src = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():
        src.conv1.weight.normal_()
    torch.save(src.state_dict(), tmp_path / "resnet18.pth")
    loaded = TimmUNet("resnet18", out_channels=8, pretrained=str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(loaded.encoder.conv1.weight, src.conv1.weight)


@pytest.mark.timm
def test_real_timm_teacher_trains_a_step_and_rebuilds_without_the_file(tiny_rooms, tmp_path):
    timm = _timm_or_skip()
    from haskd.data.transforms import collate
    from haskd.workflow.build import build_datasets
    from haskd.models import build_from_config
    from haskd.engine.tasks import TeacherTask

    w = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), w)
    cfg = load_config("scannet20_haskd", [*TEACH, f"data.root={tiny_rooms}", "teacher.image_encoder=resnet18",
                                          f"teacher.image_pretrained={w}", "teacher.image_out_indices=[1,2,3]"])
    model = build_from_config(cfg)
    assert model.image_net.reductions == [4, 8, 16]
    task = TeacherTask(model, cfg.teacher.loss_3d, cfg.teacher.loss_2d)
    batch = collate([build_datasets(cfg, splits=("train",))["train"][0]])
    losses, out = task(batch)
    sum(losses.values()).backward()
    assert out["visible"].sum() > 0 and all(torch.isfinite(v) for v in losses.values())
    w.unlink()                                        # a checkpoint rebuild never reads the starting weights
    rebuilt = build_from_config(cfg, pretrained=False)
    rebuilt.load_state_dict(model.state_dict())
