"""`haskd demo` end to end at toy size: it generates its rooms, runs every stage and prints the results table."""
import pytest

from haskd.cli import main

from conftest import TINY
from test_pipeline import PIPE


def test_demo_prints_the_table(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--rooms", "2,1,7", "--epochs", "2", *PIPE, *TINY,
               "data.max_voxels=4000", "teacher.virtual_views=4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "HAS-KD demo on 2 + 1 synthetic rooms" in text
    for row in ("baseline", "teacher", "HAS-KD student"):
        assert row in text
    assert "| class (val IoU, %) | baseline (points only) |" in text  # the per-class table follows the summary
    assert f"under {tmp_path}" in text and "disk: " in text  # how much it wrote, and where
    assert (tmp_path / "synthetic_bench_2_1_7_seed0" / "report.html").is_file()  # the rooms name the run


@pytest.mark.parametrize("bad", ["2,1", "0,1,0", "a,b,c"])
def test_demo_rejects_bad_room_counts(bad, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--rooms", bad])
    err = capsys.readouterr().err
    assert "TRAIN,VAL,SEED" in err or "at least one" in err
