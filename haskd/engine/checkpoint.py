"""Checkpoints carry their config, so ``load_model(path)`` rebuilds the network with no YAML.

Everything stored is a tensor, a number, a string or a container of those, so loading works with
``torch.load(weights_only=True)`` and never unpickles code. Nor does loading import code a checkpoint names: a
stored ``model.module`` (a user's network file) is refused unless the caller passes that module itself (``--module``
on the command line), or the network it registers is already registered in this process by the user's own code.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError


def save_checkpoint(path, **payload):
    """Atomic write: a temp file in the same folder, then rename (an interrupted save keeps the old file; a failed
    one removes its temp file and says why in one line)."""
    from ..io import atomic_write

    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


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


def load_model(path, device="cpu", return_config=False, module: str = ""):
    """Rebuild the model stored in a checkpoint, in eval mode.

    ``module``: a user's model file or module name to import first, given by the user (``--module``); it replaces
    the checkpoint's ``model.module``, which is never imported (a checkpoint from elsewhere could name any file)."""
    from ..config import from_dict
    from ..models import REGISTRY, build_from_config, import_user_module

    ckpt = load_checkpoint(path)
    cfg = from_dict(ckpt["config"], source=str(path))
    stored = cfg.model.module
    if module:
        import_user_module(module)
        cfg.model.module = module
    elif stored and cfg.model.name not in REGISTRY:
        raise InputError(path, f"its config names user code (model.module={stored}) and haskd never imports code "
                               f"named in a checkpoint; if you trust that file, pass it yourself: --module {stored}")
    if cfg.model.name not in REGISTRY:
        raise InputError(path, f"unknown model '{cfg.model.name}' (known: {', '.join(sorted(REGISTRY))})")
    try:
        model = build_from_config(cfg, pretrained=False, import_module=False)  # its own weights follow
    except InputError:
        raise
    except Exception as e:  # a config whose model kwargs the network rejects
        raise InputError(path, f"cannot build its model from its config ({type(e).__name__}: "
                               f"{(str(e).splitlines() or [''])[0][:160]})") from None
    own = model.state_dict()
    sd = ckpt["state_dict"]
    shape = [k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shape:
        raise InputError(path, f"weights do not match the config's model ({len(shape)} tensor(s) of another shape, "
                               f"e.g. {shape[0]}: {tuple(sd[shape[0]].shape)} vs {tuple(own[shape[0]].shape)})")
    missing, unexpected = model.load_state_dict(sd, strict=False)
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
