"""The student protocol: what every backbone returns, and a hook wrapper for networks that return only logits.

A student is an ``nn.Module`` that takes the batch dict (keys documented in ``docs/backbones.md``: ``coord``,
``grid_coord``, ``feat``, ``offset``, ...) and returns::

    {"logits": (N, num_classes) float, "feat": (N, feat_dim) float}

with one row per voxel of the batch (N = ``batch["feat"].shape[0]``), and has an int attribute ``feat_dim``. The
distillation losses read ``feat`` (IHD's feature term, through a projector built from ``feat_dim``) and
``logits``; nothing else about the network is assumed.

A network that returns only a logits tensor (or a dict/tuple without ``feat``) is wrapped by
:class:`HookedBackbone`, which captures the output of a named submodule with a forward hook (the torchdistill
approach: the user's network runs unchanged).
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from ..errors import HaskdError

OUTPUT_KEYS = ("logits", "feat")


def _rows(x):
    """Row tensor of a module output: a tensor, a sparse tensor (``.feats`` / ``.F`` / ``.features``), or the
    first element of a tuple/list."""
    if isinstance(x, torch.Tensor):
        return x
    for attr in ("feats", "F", "features"):
        v = getattr(x, attr, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(x, (tuple, list)) and x:
        return _rows(x[0])
    return None


def _infer_out_dim(module: nn.Module) -> Optional[int]:
    """Output channels of common layer types (Linear, convs, norms); for a container (e.g. ``nn.Sequential``) the
    width of its last child that has one. None when unknown."""
    for attr in ("out_features", "out_channels", "num_features"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    shape = getattr(module, "normalized_shape", None)  # LayerNorm
    if isinstance(shape, tuple) and len(shape) == 1:
        return int(shape[0])
    if isinstance(module, (nn.Sequential, nn.ModuleList)):
        for child in reversed(list(module.children())):
            dim = _infer_out_dim(child)
            if dim is not None:
                return dim
    return None


class HookedBackbone(nn.Module):
    """Make a logits-only network follow the student protocol.

    ``HookedBackbone(model, feat_module="decoder.final", logits_key=None, feat_dim=None)``:

    - ``feat_module``: dotted path of the submodule (as in ``model.named_modules()``) whose output is the per-voxel
      feature (N, D); it may return a tensor, a sparse tensor with ``.feats``, or a tuple whose first item is one.
      If it runs several times in a forward pass, the last call wins.
    - ``logits_key``: how to find the logits in the model's output: None = the output itself when it is a tensor,
      else ``out["logits"]``; a str = ``out[key]``; an int = ``out[index]`` of a tuple/list.
    - ``feat_dim``: the feature width; None = read from the submodule (``out_features``, ``out_channels``,
      ``num_features``, a 1-D LayerNorm, or the last such layer of an ``nn.Sequential``). Raises :class:`HaskdError` when it cannot be found.

    ``forward(batch) -> {"logits": (N, C), "feat": (N, feat_dim)}``. The wrapped network is ``self.model``, so a
    state dict saved from the wrapper has keys prefixed with ``model.``.
    """

    def __init__(self, model: nn.Module, feat_module: str, logits_key: Union[None, str, int] = None,
                 feat_dim: Optional[int] = None):
        super().__init__()
        self.model = model
        self.feat_module = feat_module
        self.logits_key = logits_key
        try:
            module = model.get_submodule(feat_module)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            hint = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise HaskdError(f"feat_module '{feat_module}' is not a submodule of {type(model).__name__} "
                             f"(submodules: {hint})") from None
        dim = feat_dim if feat_dim is not None else _infer_out_dim(module)
        if dim is None:
            raise HaskdError(f"cannot tell the feature width of '{feat_module}' ({type(module).__name__}); "
                             "pass feat_dim=")
        self.feat_dim = int(dim)
        self._captured = None
        self._handle = module.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self._captured = output

    def _logits(self, out):
        key = self.logits_key
        try:
            if key is None:
                return out if isinstance(out, torch.Tensor) else out["logits"]
            return out[key]
        except (KeyError, IndexError, TypeError) as e:
            raise HaskdError(f"cannot read logits with logits_key={key!r} from a model output of type "
                             f"{type(out).__name__} ({e})") from None

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        self._captured = None
        out = self.model(batch)
        captured, self._captured = self._captured, None  # do not keep the graph alive between steps
        if captured is None:
            raise HaskdError(f"feat_module '{self.feat_module}' did not run during the forward pass")
        feat = _rows(captured)
        if feat is None:
            raise HaskdError(f"feat_module '{self.feat_module}' returned {type(captured).__name__}, "
                             "expected a tensor, a sparse tensor with .feats, or a tuple starting with one")
        return {"logits": self._logits(out), "feat": feat}


def wrap_student(model: nn.Module, feat_module: Optional[str] = None, logits_key: Union[None, str, int] = None,
                 feat_dim: Optional[int] = None) -> nn.Module:
    """``model`` itself when ``feat_module`` is None (it must follow the protocol), else a :class:`HookedBackbone`."""
    if feat_module is None:
        return model
    return HookedBackbone(model, feat_module, logits_key=logits_key, feat_dim=feat_dim)


def check_student(model: nn.Module, batch: Dict[str, torch.Tensor], num_classes: Optional[int] = None
                  ) -> Dict[str, torch.Tensor]:
    """Run ``model(batch)`` and check the output against the protocol; return the output.

    Raises :class:`HaskdError` with a message naming what is wrong: the output is not a dict, a key is missing, a
    value is not a floating tensor, rows differ from the number of voxels, the class count differs from
    ``num_classes``, ``feat`` is not (N, model.feat_dim), or values are not finite.
    """
    name = type(model).__name__
    feat_dim = getattr(model, "feat_dim", None)
    if not isinstance(feat_dim, int) or feat_dim <= 0:
        raise HaskdError(f"{name} has no positive int attribute 'feat_dim' (got {feat_dim!r}); set it to the "
                         "width of the 'feat' output, or wrap the model in HookedBackbone")
    n = int(batch["feat"].shape[0])
    out = model(batch)
    if not isinstance(out, dict):
        raise HaskdError(f"{name} returned {type(out).__name__}; a student returns a dict with keys 'logits' and "
                         "'feat' (wrap a logits-only model in HookedBackbone)")
    missing = [k for k in OUTPUT_KEYS if k not in out]
    if missing:
        raise HaskdError(f"{name} output lacks {', '.join(repr(k) for k in missing)} "
                         f"(has {', '.join(repr(k) for k in out)})")
    for key in OUTPUT_KEYS:
        v = out[key]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise HaskdError(f"{name} output '{key}' must be a floating tensor, got "
                             f"{type(v).__name__}{'' if not isinstance(v, torch.Tensor) else ' ' + str(v.dtype)}")
        if v.dim() != 2 or v.shape[0] != n:
            raise HaskdError(f"{name} output '{key}' has shape {tuple(v.shape)}, expected ({n}, ...): one row per "
                             "voxel of the batch (map points to voxels before returning)")
        if not bool(torch.isfinite(v).all()):
            raise HaskdError(f"{name} output '{key}' has NaN or inf values")
    if num_classes is not None and out["logits"].shape[1] != num_classes:
        raise HaskdError(f"{name} output 'logits' has {out['logits'].shape[1]} classes, expected {num_classes}")
    if out["feat"].shape[1] != feat_dim:
        raise HaskdError(f"{name} output 'feat' has width {out['feat'].shape[1]} but feat_dim = {feat_dim}")
    return out
