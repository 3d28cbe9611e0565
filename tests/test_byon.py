"""The 'bring your own network' example of docs/backbones.md, trained with HAS-KD through the CLI."""
import json

from haskd.cli import main

from conftest import REPO
from test_pipeline import PIPE


def test_example_wrapper_runs_the_pipeline(tiny_rooms, tmp_path):
    example = REPO / "examples" / "byon_model.py"
    assert len(example.read_text().splitlines()) < 40 + 10  # the wrapper itself is under 40 lines of code
    out = tmp_path / "byon"
    rc = main(["pipeline", "--data", str(tiny_rooms), "--out", str(out), *PIPE,
               f"model.module={example}", "model.name=my_pointnet"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert {"baseline", "teacher", "student"} <= set(s)
    import haskd

    m = haskd.load(out / "student" / "last.pt")
    assert type(m.model).__name__ == "MyPointNet"
