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


def import_user_module(spec: str):
    """Import a user's Python file (path ending in .py) or module name, so that it can ``register`` models."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    if not spec:
        return
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        if not path.is_file():
            raise HaskdError(f"{spec}: model.module file not found")
        name = f"haskd_user_{path.stem}"
        if name in sys.modules:
            return
        s = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(s)
        sys.modules[name] = mod
        s.loader.exec_module(mod)
    else:
        try:
            importlib.import_module(spec)
        except ImportError as e:
            raise HaskdError(f"model.module '{spec}' cannot be imported ({e})") from None


def build_from_config(cfg, pretrained: bool = True, import_module: bool = True):
    """Student network, or the multi-modal teacher when ``cfg.role == 'teacher'`` (``pretrained``: load the teacher's
    2D starting weights; off when a checkpoint's weights are loaded next). ``import_module=False``: do not import
    ``cfg.model.module`` (a config read from a checkpoint; see :func:`haskd.engine.checkpoint.load_model`)."""
    from ..data.dataset import in_channels

    if import_module:
        import_user_module(cfg.model.module)

    m = cfg.model
    net = build_model(m.name, in_channels(cfg.data.use_normal), cfg.data.num_classes, preset=m.preset,
                      backend=m.backend, **m.kwargs)
    if cfg.role == "teacher":  # the student's network is the teacher's 3D branch
        from .teacher import MultiModalTeacher

        return MultiModalTeacher.from_config(cfg, net, pretrained=pretrained)
    return net
