"""haskd curves: reading metrics.jsonl, the table's numbers, the PNG."""
import json

import pytest

from haskd.cli import main
from haskd.commands.curves import curve_stats
from haskd.workflow.runs import read_curve


def _run(tmp_path, name, values, extra=""):
    d = tmp_path / name
    d.mkdir()
    rows = [json.dumps({"epoch": i + 1, "train/loss": 1.0 / (i + 1), "val/miou": v}) for i, v in enumerate(values)]
    (d / "metrics.jsonl").write_text("\n".join(rows) + "\n" + extra)
    return d


def test_read_curve_resumed_and_torn(tmp_path):
    d = _run(tmp_path, "a", [0.1, 0.2, 0.3], extra=json.dumps({"epoch": 2, "val/miou": 0.25}) + "\n{\"epoch\": 4, ")
    epochs, values = read_curve(d)
    assert epochs == [1, 2, 3]
    assert values == [0.1, 0.25, 0.3]  # the resumed epoch 2 line wins; the torn last line is skipped


def test_curve_stats_hand_computed():
    vals = [0.1 * i for i in range(1, 12)] + [0.5] * 9  # 20 epochs: tail = 2 epochs
    s = curve_stats(list(range(1, 21)), vals)
    assert s["best_epoch"] == 11 and s["max"] == pytest.approx(1.1)
    assert s["last"] == 0.5 and s["tail_epochs"] == 2 and s["tail_mean"] == pytest.approx(0.5)
    s = curve_stats([1, 2, 3], [0.4, 0.4, 0.1])  # tie -> earliest; 3 epochs: tail of 1
    assert s["best_epoch"] == 1 and s["tail_epochs"] == 1 and s["tail_mean"] == pytest.approx(0.1)


def test_cli_curves(tmp_path, capsys):
    a = _run(tmp_path, "a", [0.1, 0.3, 0.5, 0.6])
    b = _run(tmp_path, "b", [0.2, 0.4])
    out = tmp_path / "c" / "curves.png"
    assert main(["curves", str(a), str(b), "--out", str(out), "--label", "base", "--label", "teach"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "| base | 4 | 4 | 60.00 | 60.00 | 60.00 (1) |" in text
    assert "| teach | 2 | 2 | 40.00 | 40.00 | 40.00 (1) |" in text
    # a metric that is not a fraction is drawn as it is
    assert main(["curves", str(a), "--out", str(out), "--metric", "train/loss"]) == 0
    assert "| a | 4 | 1 | 1.00 | 0.25 |" in capsys.readouterr().out


def test_cli_curves_bad_input(tmp_path, capsys):
    a = _run(tmp_path, "a", [0.1])
    assert main(["curves", str(a), "--out", str(tmp_path / "x.png"), "--label", "x", "--label", "y"]) == 2
    assert main(["curves", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert main(["curves", str(a), "--out", str(tmp_path / "x.png"), "--metric", "val/nope"]) == 2
    err = capsys.readouterr().err
    assert "--label" in err and "no metrics.jsonl" in err and "val/nope" in err
