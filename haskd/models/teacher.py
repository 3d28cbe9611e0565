"""The multi-modal teacher: a 3D sparse-conv branch + a 2D image branch on K frames picked by a frame filter (IOF),
fused per point after lifting 2D features onto the voxels that the images see.

Training only: at inference HAS-KD runs the point-only student. See METHOD.md "Teacher (multi-modal)".
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

from ..errors import HaskdError
from ..images.lifting import lift
from ..threads import submit
from .image_unet import ImageUNet, TimmUNet

log = logging.getLogger(__name__)

# ImageNet-like normalisation of RGB in [0, 1].
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class MultiModalTeacher(nn.Module):
    """``forward(batch)`` needs ``batch["frames"]`` (one dict per sample, see :func:`haskd.images.provider.load_frames`) and
    ``batch["world"]`` (voxel centres in the scene frame). Returns ``logits`` (N,C) fused, ``feat`` (N,D) fused
    features (the IHD feature target), ``logits_3d`` (N,C), ``visible`` (N,) float (1 = seen by some frame)."""

    def __init__(self, backbone: nn.Module, image_net: nn.Module, num_classes: int, hidden: int = 128,
                 depth_tau: float = 0.1, fusion: str = "concat", overlap_branches: bool = True,
                 detach_3d: bool = False, freeze_3d: bool = False):
        super().__init__()
        if fusion not in ("concat", "residual"):
            raise HaskdError(f"teacher.fusion must be 'concat' or 'residual', got {fusion!r}")
        # residual: the fused head only corrects the 3D branch's logits, so where images add nothing the
        # teacher stays the 3D network (our change, see docs/method.md); concat: the head alone decides.
        self.fusion_mode = fusion
        self.backbone = backbone
        self.image_net = image_net
        c2d = image_net.out_channels
        self.unseen = nn.Parameter(torch.zeros(c2d))
        self.fusion = nn.Sequential(
            nn.Linear(backbone.feat_dim + c2d + 1, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, num_classes)
        self.feat_dim = hidden
        self.depth_tau = depth_tau
        # on CPU the image branch runs in a second thread while the 3D branch runs here (haskd.threads): the same
        # numbers, about 13% less time a teacher step on 2 cores (docs/performance.md)
        self.overlap_branches = overlap_branches
        # teacher.detach_3d (ours): the fused head reads the 3D branch without sending gradients into it, so the
        # branch trains as the point-only network it would be alone (its own CE only) and the images add on top
        self.detach_3d = detach_3d
        # teacher.freeze_3d (ours): the 3D branch is a point-only network trained alone (teacher.init_3d) and stays
        # so: no gradients, BatchNorm in eval mode. Its head is that network's; the fused head learns only what the
        # images add to it. (It also saves the 3D branch's backward pass.)
        self.freeze_3d = freeze_3d
        if freeze_3d:
            backbone.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg, backbone, pretrained: bool = True):
        """The teacher of ``cfg`` around ``backbone``, its 3D branch (built by
        :func:`haskd.models.registry.build_from_config`, from the same registry as a student). ``pretrained``: load
        the 2D branch's starting weights (``teacher.image_weights`` / ``teacher.image_pretrained``); off when a
        checkpoint's own weights follow (no file, no network needed)."""
        t = cfg.teacher
        num_2d = cfg.data.num_classes if t.loss_2d > 0 else None
        if t.image_encoder:
            image_net = TimmUNet(t.image_encoder, t.image_channels, num_classes=num_2d,
                                 pretrained=t.image_pretrained if pretrained else "",
                                 out_indices=t.image_out_indices or None)
            return cls(backbone, image_net, cfg.data.num_classes, t.fusion_hidden, t.depth_tau, t.fusion,
                       t.overlap_branches, t.detach_3d, t.freeze_3d)
        image_net = ImageUNet(3, t.image_channels, tuple(t.image_widths), stem_stride=t.image_stem_stride,
                              num_classes=num_2d)
        if t.image_weights and pretrained:
            image_net.load_pretrained(t.image_weights)
        return cls(backbone, image_net, cfg.data.num_classes, t.fusion_hidden, t.depth_tau, t.fusion,
                       t.overlap_branches, t.detach_3d, t.freeze_3d)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_3d:
            self.backbone.eval()  # frozen: its BatchNorm statistics stay those it was trained with
        return self

    def photometric_jitter(self, batch):
        """``(gain, bias)``, each (V, 1, 1, 1), for the batch's V training images, or None (evaluation, no frames):
        per image brightness and contrast jitter. The points get colour jitter, the images get theirs, so the 2D
        branch cannot memorise the few training rooms' exact colours. Drawn by :meth:`forward` before either branch
        runs, so the random stream does not depend on which thread runs the image branch."""
        imgs = [fr["color"] for fr in (batch.get("frames") or []) if fr is not None]
        if not self.training or not imgs:
            return None
        v, device = sum(int(x.shape[0]) for x in imgs), imgs[0].device
        gain = 1 + (torch.rand(v, 1, 1, 1, device=device) - 0.5) * 0.4
        bias = (torch.rand(v, 1, 1, 1, device=device) - 0.5) * 0.2
        return gain, bias

    def lift_images(self, batch, jitter=None):
        """(N, C2d [+ num_classes]) lifted image features (+ 2D logits when the image net has a classifier) and
        (N,) visibility. ``jitter``: :meth:`photometric_jitter`'s draw (training; drawn here when not given)."""
        world = batch["world"]
        N = world.shape[0]
        c = self.image_net.out_channels + (self.image_net.num_classes or 0)
        f2d = world.new_zeros(N, c)
        vis = torch.zeros(N, dtype=torch.bool, device=world.device)
        frames = batch.get("frames") or []
        starts = [0] + batch["offset"].tolist()[:-1]
        ends = batch["offset"].tolist()
        # One image-net pass over every frame of the batch (BatchNorm sees them all).
        imgs = [fr["color"] for fr in frames if fr is not None]
        if not imgs:
            return f2d, vis
        x = torch.cat(imgs).float().div(255.0)
        if jitter is None:
            jitter = self.photometric_jitter(batch)
        if jitter is not None:
            gain, bias = jitter
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * gain + mean + bias).clamp(0, 1)
        x = (x - _MEAN.to(x.device)) / _STD.to(x.device)
        out2d = self.image_net(x)
        feats = out2d["feat"] if "logits" not in out2d else torch.cat([out2d["feat"], out2d["logits"]], 1)
        i = 0
        for b, fr in enumerate(frames):
            if fr is None:
                continue
            v = fr["color"].shape[0]
            fb = feats[i:i + v]
            i += v
            sl = slice(starts[b], ends[b])
            out = lift(world[sl], fb, fr["pose"], fr["K_color"], tuple(fr["color"].shape[-2:]), fr["depth"],
                       fr["K_depth"], self.depth_tau)
            f2d[sl] = out["feat"].to(f2d.dtype)
            vis[sl] = out["visible"]
        return f2d, vis

    def forward(self, batch):
        jitter = self.photometric_jitter(batch)
        overlap = self.overlap_branches and batch["world"].device.type == "cpu"
        images = submit(self.lift_images, batch, jitter) if overlap else None
        with torch.no_grad() if self.freeze_3d else contextlib.nullcontext():
            out3 = self.backbone(batch)
        lifted, vis = images.result() if overlap else self.lift_images(batch, jitter)
        c2d = self.image_net.out_channels
        f2d, logits_2d = lifted[:, :c2d], lifted[:, c2d:]
        visf = vis.to(f2d.dtype)[:, None]
        f2d = f2d * visf + self.unseen[None] * (1 - visf)
        f3, z3 = (out3["feat"].detach(), out3["logits"].detach()) if self.detach_3d else (out3["feat"], out3["logits"])
        h = self.fusion(torch.cat([f3, f2d, visf], 1))
        logits = self.classifier(h)
        if self.fusion_mode == "residual":
            logits = logits + z3
        out = {"logits": logits, "feat": h, "logits_3d": out3["logits"], "visible": vis.float()}
        if logits_2d.shape[1]:
            out["logits_2d"] = logits_2d  # image-branch logits lifted onto the voxels (mean over views)
        return out
