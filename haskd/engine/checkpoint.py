"""Checkpoints carry their config, so ``load_model(path)`` rebuilds the network with no YAML.

Everything stored is a tensor, a number, a string or a container of those, so loading works with
``torch.load(weights_only=True)`` and never unpickles code.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError


def save_checkpoint(path, **payload):
    """Atomic write: a temp file in the same folder, then rename (an interrupted save keeps the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_error(e: Exception) -> str:
    """The one informative line of a ``torch.load`` failure. A weights-only refusal comes wrapped in a page of
    advice to load with ``weights_only=False``, which haskd never does; keep only the unpickler's own reason."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        reason = next((ln.strip() for ln in text.split("WeightsUnpickler error:", 1)[1].splitlines() if ln.strip()), "")
        return f"weights-only loading refused it: {reason.split('. ')[0][:200]}"
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:200]}"


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise InputError(path, f"not a readable haskd checkpoint ({_load_error(e)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise InputError(path, "not a haskd checkpoint (needs 'config' and 'state_dict')")
    return ckpt


def load_model(path, device="cpu", return_config=False):
    """Rebuild the model stored in a checkpoint, in eval mode."""
    from ..config import from_dict
    from ..models import build_from_config

    ckpt = load_checkpoint(path)
    cfg = from_dict(ckpt["config"], source=str(path))
    model = build_from_config(cfg, pretrained=False)   # the checkpoint's own weights follow
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise InputError(path, f"weights do not match the config's model (missing {list(missing)[:3]}, "
                               f"unexpected {list(unexpected)[:3]})")
    model.to(device).eval()
    return (model, cfg) if return_config else model


def init_weights(model, path):
    """Warm-start ``model`` from a checkpoint: a student's weights, or the 3D branch (``backbone.*``) of a teacher
    checkpoint (the teacher's 3D branch is the student's network when both share family and preset). Every tensor of
    the model must be found with the same shape: a partial warm start is an error, not a silent mix."""
    ckpt = load_checkpoint(path)
    sd = ckpt["state_dict"]
    if ckpt["config"].get("role") == "teacher":
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    own = model.state_dict()
    bad = [k for k, v in own.items() if k not in sd or tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise InputError(path, f"cannot warm-start this model from it ({len(bad)} tensors missing or of another "
                               f"shape, e.g. {bad[0]}); teacher and student need the same model.name and preset")
    model.load_state_dict({k: sd[k] for k in own})
