"""Performance measurements behind ``haskd benchmark`` (see docs/performance.md), one module per measurement, each
returning a JSON-ready dict:

- :mod:`.models` (:func:`benchmark_models`): inference latency, peak memory, parameter counts, and the training-step
  comparison of :mod:`.steps` (the configurations' ``Trainer.run_step``);
- :mod:`.layers` (:func:`benchmark_layers`): sparse conv per level vs dense matmul, whole UNet torch vs spconv;
- :mod:`.chunked` (:func:`benchmark_chunked`): chunked vs one-shot inference on a tiled room;
- :mod:`.loading` (:func:`benchmark_loading`): DataLoader share of a training step;
- :mod:`.ddp` (:func:`benchmark_ddp`): 1 core vs 2 (torchrun 2 x 1 thread, 1 process x 2 threads).

:mod:`.common` holds the timing and memory helpers, :mod:`.report` the Markdown tables.
"""
from __future__ import annotations

from .chunked import benchmark_chunked
from .ddp import benchmark_ddp
from .layers import benchmark_layers
from .loading import benchmark_loading
from .models import benchmark_models
from .report import to_markdown

__all__ = ["benchmark_chunked", "benchmark_ddp", "benchmark_layers", "benchmark_loading", "benchmark_models",
           "to_markdown"]
