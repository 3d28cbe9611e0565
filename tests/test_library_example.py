"""examples/library_distill.py: haskd's distillation in a plain PyTorch loop (own model, loader, optimizer), run as a
user would, on tiny synthetic rooms and a tiny teacher trained here."""
import json
import math
import os
import subprocess
import sys

from conftest import REPO, TINY

TEACHER = [*TINY, "role=teacher", "train.epochs=1", "train.eval_every=0", "train.snapshots=0",
           "data.use_normal=true", "teacher.image_size=[30,40]", "teacher.image_widths=[8,16]",
           "teacher.image_channels=8", "teacher.num_frames=2"]


def test_library_example_adds_the_distillation_terms_to_its_own_loss(tiny_rooms, tmp_path):
    from haskd.config import load_config
    from haskd.workflow.train import train

    train(load_config("scannet20_haskd", [*TEACHER, f"data.root={tiny_rooms}"]), tmp_path / "teacher", progress=False)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "examples" / "library_distill.py"), "--data", str(tiny_rooms),
                        "--teacher", str(tmp_path / "teacher" / "last.pt"), "--steps", "3", "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["step"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert {"loss", "ce", "ihd_logit", "ihd_hint"} <= set(row) and all(math.isfinite(v) for v in row.values())
        assert row["loss"] > row["ce"]  # the KD terms are in the loss
    assert list((tmp_path / "teacher").glob("soft_labels_teacher_*/manifest.json"))  # the cached targets
