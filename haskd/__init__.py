"""HAS-KD: make a point-only 3D segmentation network better with a multi-modal teacher and snapshot experts."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """Rebuild a model from a checkpoint (config travels inside it). See :func:`haskd.engine.checkpoint.load_model`."""
    from .engine.checkpoint import load_model

    return load_model(path, device=device)
