"""The backbone registry: a config names a student family, ``build_model`` builds it. Imports are explicit and lazy
(each family is optional until used). Its own module so the teacher can build its 3D branch without importing the
package that builds the teacher."""
from __future__ import annotations

from ..errors import HaskdError


def _spunet(in_channels, num_classes, preset="small", backend="auto", **kw):
    from .spunet import SPUNET_PRESETS, SpUNet

    if preset not in SPUNET_PRESETS:
        raise HaskdError(f"unknown spunet preset '{preset}' (known: {', '.join(SPUNET_PRESETS)})")
    args = {**SPUNET_PRESETS[preset], **kw}
    return SpUNet(in_channels, num_classes, backend=backend, **args)


def _ptv3(in_channels, num_classes, preset="small", backend="auto", **kw):
    from .ptv3 import PTV3_PRESETS, PointTransformerV3

    if preset not in PTV3_PRESETS:
        raise HaskdError(f"unknown ptv3 preset '{preset}' (known: {', '.join(PTV3_PRESETS)})")
    args = {**PTV3_PRESETS[preset], **kw}
    return PointTransformerV3(in_channels, num_classes, backend=backend, **args)


REGISTRY = {"spunet": _spunet, "ptv3": _ptv3}


def register(name, builder):
    """Add a backbone: ``builder(in_channels, num_classes, preset=..., backend=..., **kwargs) -> nn.Module``."""
    REGISTRY[name] = builder


def build_model(name, in_channels, num_classes, preset="small", backend="auto", **kwargs):
    if name not in REGISTRY:
        raise HaskdError(f"unknown model '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name](in_channels, num_classes, preset=preset, backend=backend, **kwargs)
