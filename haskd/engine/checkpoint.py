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


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise InputError(path, f"not a readable haskd checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise InputError(path, "not a haskd checkpoint (needs 'config' and 'state_dict')")
    return ckpt


def load_model(path, device="cpu", return_config=False):
    """Rebuild the model stored in a checkpoint, in eval mode."""
    from ..config import from_dict
    from ..models import build_from_config

    ckpt = load_checkpoint(path)
    cfg = from_dict(ckpt["config"], source=str(path))
    model = build_from_config(cfg)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise InputError(path, f"weights do not match the config's model (missing {list(missing)[:3]}, "
                               f"unexpected {list(unexpected)[:3]})")
    model.to(device).eval()
    return (model, cfg) if return_config else model
