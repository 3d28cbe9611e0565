"""HAS-KD: make a point-only 3D segmentation network better with a multi-modal teacher and snapshot experts."""

__version__ = "0.1.0"


def load(path, device="cpu", module=""):
    """Rebuild a model from a checkpoint (config travels inside it). See :func:`haskd.engine.checkpoint.load_model`:
    a ``model.module`` named in the checkpoint is never imported; pass ``module`` (your own file) for a network of
    your own that is not registered yet."""
    from .engine.checkpoint import load_model

    return load_model(path, device=device, module=module)
