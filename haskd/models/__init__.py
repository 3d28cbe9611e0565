"""Networks from a config: the backbone registry (:mod:`.registry`), user modules that register their own, and the
teacher when the config's role asks for it."""
from __future__ import annotations

from ..errors import HaskdError
from .registry import REGISTRY, build_model, register

__all__ = ["REGISTRY", "build_model", "register", "import_user_module", "build_from_config"]


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

    cin = in_channels(cfg.data.use_normal)
    if cfg.role == "teacher":
        from .teacher import MultiModalTeacher

        return MultiModalTeacher.from_config(cfg, cin, pretrained=pretrained)
    m = cfg.model
    return build_model(m.name, cin, cfg.data.num_classes, preset=m.preset, backend=m.backend, **m.kwargs)
