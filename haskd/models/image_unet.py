"""The teacher's 2D branch: a small ResNet-style encoder-decoder (UNet) in plain torch.

Encoder: a 3x3 stem at full resolution, then one stage per width, each a stride-2 residual block followed by
``blocks - 1`` residual blocks (H, H/2, H/4, H/8 for 4 widths). Decoder: bilinear upsampling, concatenation with the
encoder skip, a residual block, back to full resolution. A 1x1 head gives ``out_channels`` features per pixel and an
optional 1x1 classifier gives 2D logits (for the optional 2D CE loss at projected labeled pixels).

:class:`TimmUNet` puts a pretrained timm encoder (``features_only``: one feature map per stride) under the same
decoder, as the published 2D-3D methods (BPNet, MVPNet) start from an ImageNet-pretrained 2D backbone. timm is
imported only when such an encoder is asked for.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import HaskdError, InputError

log = logging.getLogger(__name__)


def _norm(kind: str, c: int) -> nn.Module:
    # GroupNorm is the safer choice when only a handful of views form a batch; BatchNorm matches most
    # ImageNet-pretrained weights.
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "group":
        return nn.GroupNorm(min(8, c), c)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a residual (1x1 projection when shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.skip is None else self.skip(x)), inplace=True)


class ImageUNet(nn.Module):
    """2D encoder-decoder for the teacher's image branch.

    Args:
        in_channels: input channels (3 for RGB).
        out_channels: per-pixel feature size D.
        widths: encoder widths, one stage per entry; stage i works at H / 2**i.
        num_classes: when set, a 1x1 classifier adds ``logits``.
        blocks: residual blocks per encoder stage.
        norm: "batch" or "group".
        stem_stride: 2 runs the stem conv at full resolution (so fine texture reaches the network) and everything
            after it at H/2, W/2: about 4x cheaper than stride 1; features come out at H/2 (lifting samples any
            resolution over the same field of view).
    Forward: ``x`` (V, in_channels, H, W) float (normalised RGB) ->
        dict ``feat`` (V, out_channels, H/s, W/s), ``logits`` (V, num_classes, H/s, W/s) when ``num_classes`` is set.
    Any H, W works (odd sizes are handled by resizing the upsampled map to the skip's size).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, widths=(32, 64, 128, 256), num_classes=None,
                 blocks: int = 1, norm: str = "batch", stem_stride: int = 1):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths:
            raise ValueError("widths must not be empty")
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False), _norm(norm, widths[0]),
                                  nn.ReLU(inplace=True))
        self.enc = nn.ModuleList()
        for i, w in enumerate(widths):
            cin = widths[max(i - 1, 0)]
            layers = [BasicBlock(cin, w, stride=1 if i == 0 else 2, norm=norm)]
            layers += [BasicBlock(w, w, norm=norm) for _ in range(blocks - 1)]
            self.enc.append(nn.Sequential(*layers))
        self.dec = _decoder(widths, norm)
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        self.classifier = nn.Conv2d(out_channels, num_classes, 1) if num_classes else None

    def forward(self, x):
        skips = []
        y = self.stem(x)
        for stage in self.enc:
            y = stage(y)
            skips.append(y)
        feat = self.head(_decode(self.dec, skips))
        out = {"feat": feat}
        if self.classifier is not None:
            out["logits"] = self.classifier(feat)
        return out

    def load_pretrained(self, path, strict: bool = False) -> dict:
        """Load a local state_dict (``torch.load(weights_only=True)``), tolerating partial matches.

        Accepts a bare state_dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``; a ``module.``
        prefix (DDP) is stripped. Tensors whose shape does not match are skipped. Returns dict ``missing``,
        ``unexpected``, ``mismatched`` (lists of keys) and logs a one-line summary; raises InputError when the file
        is missing, unreadable, matches no parameter at all, or (``strict``) does not match exactly.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "pretrained 2D weights not found")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(path, f"cannot load weights ({type(e).__name__}: {e})") from None
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
        if not isinstance(sd, dict):
            raise InputError(path, f"expected a state_dict, got {type(sd).__name__}")
        sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
        own = self.state_dict()
        mismatched = [k for k, v in sd.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
        usable = {k: v for k, v in sd.items() if k in own and k not in mismatched}
        missing = sorted(set(own) - set(usable))
        unexpected = sorted(set(sd) - set(own))
        if not usable:
            raise InputError(path, f"no parameter matches ImageUNet (first keys: {list(sd)[:3]})")
        if strict and (missing or unexpected or mismatched):
            raise InputError(path, f"weights do not match exactly: {len(missing)} missing, {len(unexpected)} "
                                   f"unexpected, {len(mismatched)} with another shape (e.g. "
                                   f"{(missing + unexpected + mismatched)[:3]})")
        self.load_state_dict(usable, strict=False)
        log.info("%s: loaded %d/%d tensors; %d missing (e.g. %s), %d unexpected (e.g. %s), %d shape-mismatched",
                 path, len(usable), len(own), len(missing), missing[:3], len(unexpected), unexpected[:3],
                 len(mismatched))
        return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def _decoder(widths, norm: str) -> nn.ModuleList:
    """UNet decoder blocks from the coarsest level up: block k fuses level ``L-1-k`` (upsampled) with its skip."""
    return nn.ModuleList(BasicBlock(widths[i] + widths[i - 1], widths[i - 1], norm=norm)
                         for i in range(len(widths) - 1, 0, -1))


def _decode(blocks: nn.ModuleList, skips: list) -> torch.Tensor:
    """Run :func:`_decoder` blocks over encoder maps ``skips`` (finest first); returns the finest-level map."""
    skips = list(skips)
    y = skips.pop()
    for block in blocks:
        s = skips.pop()
        y = F.interpolate(y, size=s.shape[-2:], mode="bilinear", align_corners=False)
        y = block(torch.cat([y, s], dim=1))
    return y


def import_timm():
    """timm, imported on first use; a missing or broken install (e.g. a torchvision that does not match torch) is one
    :class:`HaskdError` line."""
    try:
        import timm
    except Exception as e:   # ImportError, or RuntimeError from a torchvision built for another torch
        raise HaskdError(f"teacher.image_encoder needs timm (and its torchvision) importable beside this torch: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return timm


class TimmUNet(nn.Module):
    """A timm encoder (``features_only``) + the UNet decoder of :class:`ImageUNet`.

    Args:
        encoder: timm model name (``resnet18``, ``convnext_tiny``, ...).
        out_channels, num_classes, norm: as :class:`ImageUNet` (the decoder and heads are new, trained from scratch).
        pretrained: ``""`` random init; ``"hub"`` timm's default pretrained weights (downloaded: needs a network, or
            timm's cache); otherwise a local weights file of the *full* timm model (``.pth``/``.bin``/``.safetensors``,
            as timm saves them), loaded by timm with its own key filtering.
        out_indices: which encoder levels feed the decoder (default: all that timm gives, finest first).
    Forward: ``x`` (V, 3, H, W) ImageNet-normalised RGB -> ``feat`` (V, out_channels, H/s, W/s) at the finest
    stride ``s`` of the chosen levels (2 for a ResNet's stem level), ``logits`` when ``num_classes`` is set.
    """

    def __init__(self, encoder: str, out_channels: int = 64, num_classes=None, pretrained: str = "",
                 out_indices=None, norm: str = "batch"):
        super().__init__()
        timm = import_timm()
        kw = {"features_only": True}
        if out_indices:
            kw["out_indices"] = tuple(int(i) for i in out_indices)
        if pretrained and pretrained != "hub":
            path = Path(pretrained)
            if not path.is_file():
                raise InputError(path, "pretrained 2D encoder weights not found (teacher.image_pretrained)")
            kw.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        else:
            kw["pretrained"] = pretrained == "hub"
        try:
            self.encoder = timm.create_model(encoder, **kw)
        except Exception as e:   # unknown name, no network for the hub, a file that does not fit the model
            where = f" from {pretrained}" if pretrained else ""
            raise HaskdError(f"teacher.image_encoder={encoder!r}{where}: {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:300]}") from None
        info = self.encoder.feature_info
        self.channels = [int(c) for c in info.channels()]
        self.reductions = [int(r) for r in info.reduction()]
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.dec = _decoder(self.channels, norm)
        self.head = nn.Conv2d(self.channels[0], out_channels, 1)
        self.classifier = nn.Conv2d(out_channels, num_classes, 1) if num_classes else None
        log.info("2D encoder %s (%s): levels at strides %s, channels %s", encoder,
                 "random init" if not pretrained else pretrained, self.reductions, self.channels)

    def forward(self, x):
        levels = self.encoder(x)
        # some timm encoders (Swin, ...) give channels-last maps: bring them to (V, C, h, w)
        levels = [f if f.shape[1] == c or f.shape[-1] != c else f.permute(0, 3, 1, 2)
                  for f, c in zip(levels, self.channels)]
        feat = self.head(_decode(self.dec, levels))
        out = {"feat": feat}
        if self.classifier is not None:
            out["logits"] = self.classifier(feat)
        return out
