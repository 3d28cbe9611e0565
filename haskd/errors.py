"""User-facing errors: the CLI prints them as one line (no traceback) and exits non-zero."""


class HaskdError(Exception):
    """A problem with the user's input (file and reason), not a bug in haskd."""


class InputError(HaskdError):
    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def require(module: str, extra: str):
    """Import an optional dependency lazily, with an error that says what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on environment
        raise HaskdError(f"'{module}' is needed for this feature: pip install {extra} ({e})") from e
