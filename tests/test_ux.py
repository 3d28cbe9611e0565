"""What a person sees (issue 21): --help texts, log lines off a terminal, the printed tables, overall progress."""
import argparse
import logging
import re


from haskd.cli import build_parser, main

from conftest import TINY


def _leaf_parsers(parser, path=()):
    """(command path, parser) for every command that runs something (no sub-commands of its own)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, p in subs[0].choices.items():
        yield from _leaf_parsers(p, path + (name,))


def test_every_command_help_names_inputs_outputs_and_defaults():
    leaves = dict(_leaf_parsers(build_parser()))
    assert {("train",), ("eval",), ("predict",), ("pipeline",), ("demo",), ("ablate",), ("experts",),
            ("benchmark",), ("frames", "select"), ("frames", "coverage"), ("prepare", "samples"),
            ("prepare", "synthetic"), ("prepare", "sample-ply")} <= set(leaves)
    for path, p in leaves.items():
        text = p.format_help()
        if "(unavailable)" in text or p.add_help is False:  # an importer that could not load: one-line error
            continue
        assert "Reads:" in text and "Writes:" in text, path
        for a in p._actions:
            d = a.default
            if a.option_strings and d not in (None, False, argparse.SUPPRESS) and not (
                    isinstance(d, (list, tuple)) and not d):
                assert a.help and "default" in p._get_formatter()._get_help_string(a).lower(), (path, a.dest)
    predict = leaves[("predict",)].format_help()
    for word in (".ply", ".npy", ".txt", "predictions", "_labels.npy", "_pred.ply"):
        assert word in predict


def test_epoch_lines_off_a_terminal(tiny_rooms, tmp_path, capsys, caplog, monkeypatch):
    """stdout/stderr not terminals (as under pytest, or `> log 2>&1`): no carriage-return bar, exactly one line per
    epoch with val mIoU in percent and the time, and the final line in percent."""
    monkeypatch.delenv("HASKD_PROGRESS", raising=False)
    caplog.set_level(logging.INFO)
    rc = main(["train", "--data", str(tiny_rooms), "--out", str(tmp_path / "r"), "--epochs", "2", *TINY,
               "data.max_voxels=2000", "train.eval_every=1"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "\r" not in cap.err and "\r" not in cap.out
    epochs = [m for m in caplog.messages if re.match(r"epoch \d+/2\b", m)]
    assert len(epochs) == 2, caplog.text
    for ln in epochs:
        assert re.fullmatch(r"epoch \d/2 loss \d+\.\d{4} val mIoU \d+\.\d\d% \(\S+( s)?/epoch(, about \S+( s)? left)?\)",
                            ln), ln
    assert "about" in epochs[0] and "left" in epochs[0] and "left" not in epochs[1]
    assert re.search(r"^val mIoU \d+\.\d\d%  mAcc \d+\.\d\d%  allAcc \d+\.\d\d%", cap.out, re.M)


def test_progress_bars_only_on_a_terminal(monkeypatch, caplog):
    from haskd import progress as P

    caplog.set_level(logging.INFO)
    monkeypatch.setenv("HASKD_PROGRESS", "line")
    assert list(P.progress(range(3), desc="rooms", unit="scene")) == [0, 1, 2]
    assert len(caplog.messages) == 1 and re.fullmatch(r"rooms: 3 scenes in \d+ s", caplog.messages[0])
    caplog.clear()
    list(P.progress(range(3), desc="quiet", line=False))
    assert caplog.messages == []
    monkeypatch.setenv("HASKD_PROGRESS", "bar")
    from tqdm import tqdm

    assert isinstance(P.progress(range(2), desc="x"), tqdm)
    monkeypatch.delenv("HASKD_PROGRESS")
    assert not P.interactive()  # pytest captures stdout: not a terminal


def test_stage_clock_estimates_from_the_stages_that_ran(monkeypatch):
    from haskd import progress as P

    now = [1000.0]
    monkeypatch.setattr(P.time, "time", lambda: now[0])
    lines = []
    clock = P.StageClock([("teacher", 12, "teacher"), ("baseline", 6, "student"), ("experts", 0, "experts"),
                          ("student", 6, "student")], started=990.0,
                         logger=type("L", (), {"info": lambda self, m: lines.append(m)})())
    clock.start("teacher")
    now[0] += 120  # 12 teacher epochs in 120 s
    clock.done("teacher")
    clock.start("baseline")
    now[0] += 30  # 6 student epochs in 30 s
    clock.done("baseline")
    clock.start("experts")
    now[0] += 7  # weight 0: its time prices nothing
    clock.done("experts")
    clock.start("student")
    assert lines[0] == "stage 1/4 teacher: elapsed 10 s, estimate after the first stage"
    assert lines[1] == "stage 2/4 baseline: elapsed 2m10s, about 2m00s left"  # no student timed yet: 10 s/epoch
    assert lines[3] == "stage 4/4 student: elapsed 2m47s, about 30 s left"  # 5 s per student epoch x 6
    skipped = P.StageClock([("a", 1), ("b", 1)], logger=None)
    skipped.start("a")
    skipped.done("a", ran=False)  # finished earlier: says nothing of the rate
    assert skipped.estimate(1) is None
    assert P.duration(3725) == "1h02m" and P.duration(59.6) == "1m00s"


def _summary(with_window=True):
    pc = {"wall": 0.8, "floor": 0.9, "bed": None, "window": 0.25 if with_window else None, "picture": 0.0}
    m = {"miou": 0.4875, "macc": 0.6, "allacc": 0.85, "per_class_iou": pc}
    return {k: {"metrics": m, "ckpt": "x"} for k in ("baseline", "teacher", "student")}


def test_printed_tables_are_in_percent_with_the_readme_columns():
    from haskd.workflow.report import format_metrics, per_class_table, results_table

    t = results_table(_summary())
    assert t.splitlines()[0] == "| model (val, every point, %) | mIoU | mAcc | allAcc | window IoU | picture IoU |"
    assert "| HAS-KD student (points only) | 48.75 | 60.00 | 85.00 | 25.0 | 0.0 |" in t
    assert "window IoU" not in results_table(_summary(with_window=False))  # the data has no window: no column
    pc = per_class_table(_summary())
    assert "| wall | 80.0 | 80.0 | 80.0 |" in pc and "| bed |" not in pc and "Absent from the val rooms" in pc
    f = format_metrics({**_summary()["baseline"]["metrics"]})
    assert f.startswith("mIoU 48.75%  mAcc 60.00%  allAcc 85.00%") and "| window | 25.0 |" in f


def test_disk_line_counts_caches_checkpoints_and_rooms(tmp_path):
    from haskd.commands.pipeline import disk_line, disk_usage

    (tmp_path / "data_1_1_0" / "val").mkdir(parents=True)
    (tmp_path / "data_1_1_0" / "val" / "coord.npy").write_bytes(b"x" * 1000)
    run = tmp_path / "run" / "teacher"
    (run / "soft_labels_teacher_train_v0.05").mkdir(parents=True)
    (run / "soft_labels_teacher_train_v0.05" / "a.npz").write_bytes(b"x" * 3000)
    (run / "last.pt").write_bytes(b"x" * 2000)
    (run / "metrics.jsonl").write_text("{}")
    u = disk_usage(tmp_path)
    assert u == {"total": 6002, "soft_label_caches": 3000, "checkpoints": 2000, "rooms": 1000}
    assert disk_line(tmp_path).startswith("disk: 6 KB under ")


def test_expert_explanation_says_what_the_teacher_everywhere_means():
    from haskd.workflow.report import experts_explanation

    table = {"class_names": ["wall", "floor", "bed"], "iou": [[0.5, 0.6, None], [0.55, 0.7, None]],
             "expert": [1, 1, 1]}
    everywhere = experts_explanation({**table, "teacher_iou": [0.9, 0.8, None]})
    assert "all 2 classes" in everywhere and "ASD then adds nothing" in everywhere and "bed" in everywhere
    some = experts_explanation({**table, "teacher_iou": [0.9, 0.1, None]})
    assert "keeps 1 of the 2" in some and "(floor)" in some
    assert "teacher" not in experts_explanation(table).split("Grey")[0].replace("teacher)", "")


def test_predict_prints_per_class_counts():
    from haskd.commands.train import class_counts_text

    text = class_counts_text({"wall": 1500, "floor": 3500}, 5000)
    assert text.splitlines()[0].split() == ["floor", "3,500", "points", "70.0%"]
    assert text.splitlines()[1].split() == ["wall", "1,500", "points", "30.0%"]


def test_sample_ply_cut_is_a_seeded_subset_of_the_crop():
    import numpy as np

    from haskd.prepare.sample_ply import cut

    coord = np.random.default_rng(0).uniform(0, 10, (20000, 3)).astype(np.float32)
    a, b = cut(coord, 3000, crop=4.0, seed=1), cut(coord, 3000, crop=4.0, seed=1)
    assert np.array_equal(a, b) and a.size == 3000 and np.all(np.diff(a) > 0)
    assert np.all(np.abs(coord[a, :2] - 5.0) <= 2.0 + 1e-3)  # inside the 4 m square around the centre
    assert cut(coord, 50000).size == 20000  # fewer points than asked: all of them


def test_sample_ply_from_the_shared_room(shared_data, tmp_path):
    from haskd.engine.predict import read_points
    from haskd.prepare.sample_ply import write_sample_ply

    r = write_sample_ply(shared_data, tmp_path / "s.ply", points=2000)
    scene = read_points(tmp_path / "s.ply")  # what `haskd predict` reads
    assert scene.num_points == r["points"] == 2000 and r["source_points"] > 2000
    assert scene.color.std() > 0  # real colours, not the grey placeholder
