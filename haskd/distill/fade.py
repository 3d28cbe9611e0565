"""A distillation weight that fades over training (``distill.kd_fade``, ours; METHOD.md keeps it constant).

The idea: the teacher shapes the early epochs and the labels have the last word, for a student trained to
convergence, where a constant KD term looked like what held it below the baseline (docs/benchmarks.md 7d, E = 240).
Measured (7e): fading costs more than the constant weight, and once the term is gone cross-entropy does not undo
what it did; kept as an option for that lesson. Every distillation term fades together (``ihd_logit``, ``ihd_feat``,
``ihd_hint``, ``asd``): :class:`KDFade` sets :attr:`haskd.distill.task.DistillTask.kd_scale` before each step.
The terms are still computed at scale 0 (under DDP every projector must take part in each step's gradient).
"""
from __future__ import annotations

import math

from ..config import CHOICES
from ..engine.hooks import Hook

RULES = CHOICES["distill.kd_fade"]


def kd_fade(rule: str, progress: float, end: float = 1.0) -> float:
    """The distillation terms' scale at ``progress`` (0 = first step, 1 = end of training): 1 throughout for
    ``none``; for ``linear`` and ``cosine`` from 1 at the start down to 0 at ``progress = end`` (a fraction of the
    run, 0 < end <= 1), and 0 from there on (a straight line, or half a cosine wave)."""
    if rule == "none":
        return 1.0
    if rule not in RULES:
        raise ValueError(f"distill.kd_fade must be one of {', '.join(RULES)}, got {rule!r}")
    if not 0 < end <= 1:
        raise ValueError(f"distill.kd_fade_end must be in (0, 1], got {end}")
    t = min(max(progress / end, 0.0), 1.0)
    return 1.0 - t if rule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


class KDFade(Hook):
    """Sets the task's ``kd_scale`` to :func:`kd_fade` at the trainer's step out of ``total_steps``, before every
    step (a resumed run takes up the fade at its step), and writes the last step's scale in the epoch record."""

    def __init__(self, rule: str, end: float, total_steps: int):
        kd_fade(rule, 0.0, end)  # a bad rule or end fails here, not at the first step
        self.rule, self.end, self.total = rule, float(end), max(1, int(total_steps))
        self.last = 1.0  # the scale of the step just taken

    def _set(self, trainer):
        trainer.task.kd_scale = kd_fade(self.rule, trainer.step / self.total, self.end)

    def before_train(self, trainer):
        self._set(trainer)

    def after_step(self, trainer, losses):
        self.last = trainer.task.kd_scale
        self._set(trainer)

    def after_epoch(self, trainer):
        trainer.record["kd_scale"] = self.last
