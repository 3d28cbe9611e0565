"""distill.kd_fade (ours): every distillation term fades from weight 1 to 0 over the run; hand-computed values."""
import math

import pytest
import torch

from haskd.distill.fade import KDFade, kd_fade
from haskd.engine.hooks import Hook
from haskd.engine.trainer import Trainer


@pytest.mark.parametrize("rule, progress, end, want", [
    ("none", 0.7, 1.0, 1.0),
    ("linear", 0.0, 1.0, 1.0),
    ("linear", 0.25, 1.0, 0.75),
    ("linear", 1.0, 1.0, 0.0),
    ("linear", 0.25, 0.5, 0.5),      # halfway to an end at half the run
    ("linear", 0.6, 0.5, 0.0),       # past the end: off
    ("cosine", 0.5, 1.0, 0.5),
    ("cosine", 0.25, 1.0, 0.5 * (1 + math.cos(math.pi / 4))),  # 0.853553...
    ("cosine", 0.75, 1.0, 0.5 * (1 - math.cos(math.pi / 4))),  # 0.146446...
    ("cosine", 0.9, 0.5, 0.0),
])
def test_fade_values(rule, progress, end, want):
    assert kd_fade(rule, progress, end) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("rule, end", [("exp", 1.0), ("linear", 0.0), ("cosine", 1.5)])
def test_fade_refuses_bad_rules(rule, end):
    with pytest.raises(ValueError, match="kd_fade"):
        KDFade(rule, end, 10)


class _Task(torch.nn.Module):
    """A task that records the scale each step ran with; its loss is the scale times a weight."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.kd_scale, self.seen = 1.0, []

    def forward(self, batch):
        self.seen.append(self.kd_scale)
        return {"ce": self.w.sum() * 0, "ihd_logit": self.kd_scale * self.w.sum()}, None


def test_hook_sets_the_scale_before_every_step_and_resumes_at_its_step():
    """4 steps a run of 2 epochs x 2 batches, linear: the steps run at 1, 3/4, 1/2, 1/4; the epoch record holds
    its last step's scale; a run resumed at step 2 takes up the fade there."""
    task = _Task()
    opt = torch.optim.SGD(task.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    records = []

    class Keep(Hook):
        def after_epoch(self, trainer):
            records.append(dict(trainer.record))

    trainer = Trainer(task, opt, sched, "cpu", hooks=[KDFade("linear", 1.0, 4), Keep()])
    batch = {"segment": torch.zeros(3, dtype=torch.long)}
    trainer.fit(lambda epoch: [batch, batch], 0, 2)
    assert task.seen == [1.0, 0.75, 0.5, 0.25]
    assert [r["kd_scale"] for r in records] == [0.75, 0.25]
    assert [r["train/ihd_logit"] for r in records] == [pytest.approx(0.875), pytest.approx(0.375)]
    task.seen.clear()
    resumed = Trainer(task, opt, sched, "cpu", hooks=[KDFade("linear", 1.0, 4)])
    resumed.step = 2
    resumed.fit(lambda epoch: [batch, batch], 1, 2)
    assert task.seen == [0.5, 0.25]


def test_distill_task_scales_every_term(monkeypatch):
    """DistillTask.terms times kd_scale: the IHD logit and feature terms at scale 0.3 are 0.3 x those at 1."""
    from haskd.distill.ihd import IHDLoss
    from haskd.distill.task import DistillTask

    torch.manual_seed(0)
    n, c = 12, 4
    student = torch.nn.Linear(3, c)
    target = {"logits": torch.randn(n, c), "feat": torch.randn(n, 5), "visible": torch.ones(n, dtype=torch.bool)}
    task = DistillTask(student, {"ihd": IHDLoss(6, 5, trust="none")}, {"teacher": lambda batch: target})
    batch = {"segment": torch.randint(0, c, (n,))}
    out = {"logits": torch.randn(n, c), "feat": torch.randn(n, 6)}
    full = task.terms(batch, out)
    task.kd_scale = 0.3
    part = task.terms(batch, out)
    assert set(full) == set(part) == {"ihd_logit", "ihd_feat"}
    for k in full:
        assert part[k].item() == pytest.approx(0.3 * full[k].item(), rel=1e-6)
