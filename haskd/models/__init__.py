"""Networks from a config: the backbone registry, user modules that register their own, and the teacher when the
config's role asks for it (all in :mod:`.registry`)."""
from __future__ import annotations

from .registry import REGISTRY, build_from_config, build_model, import_user_module, register

__all__ = ["REGISTRY", "build_model", "register", "import_user_module", "build_from_config"]
