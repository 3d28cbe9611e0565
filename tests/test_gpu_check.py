"""The prepared GPU check (scripts/gpu_check.py) on a machine without CUDA: it refuses in one line, tiles rooms to
the asked size, and records a part stopped at its time limit instead of hanging. Its CUDA parts run on a GPU machine
(`make gpu-check`)."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from conftest import REPO


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(tmp_path, capsys):
    assert _module().main(["--out", str(tmp_path / "gc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sees no CUDA GPU" in err[0]
    assert not (tmp_path / "gc").exists()  # nothing written


def test_unknown_part_is_refused(tmp_path, capsys):
    assert _module().main(["--out", str(tmp_path / "gc"), "--allow-cpu", "--parts", "tests,warp"]) == 2
    assert "unknown part(s) warp" in capsys.readouterr().err


def test_tile_rooms_reaches_the_target_size(tmp_path):
    from haskd.data.scene import write_scene

    rng = np.random.default_rng(0)
    for i, n in enumerate((300, 500)):
        write_scene(tmp_path / "src" / "train" / f"room{i}", rng.uniform(0, 3, (n, 3)),
                    rng.integers(0, 255, (n, 3)), segment=rng.integers(-1, 20, n))
    res = _module().tile_rooms(tmp_path / "src", tmp_path / "tiled", target_points=1200, n_scenes=2)
    assert len(res["points"]) == 2 and all(p >= 1200 for p in res["points"])
    c = np.load(tmp_path / "tiled" / "train" / "tile_0" / "coord.npy")
    s = np.load(tmp_path / "tiled" / "train" / "tile_0" / "segment20.npy")
    assert len(c) == len(s) == res["points"][0]
    # rooms sit side by side along x, 0.5 m apart, so a tile of two 3 m rooms is over 6 m long
    assert c[:, 0].max() > 2 * 3 and (tmp_path / "tiled" / "val" / "tile_0" / "coord.npy").is_file()


def test_a_part_past_its_limit_is_stopped_and_recorded(tmp_path):
    out = tmp_path / "gc"
    # the tests part cannot finish in 0.05 s (python and torch start-up alone take longer): it is killed there
    rc = _module().main(["--out", str(out), "--allow-cpu", "--tiny", "--parts", "tests", "--scale", "0.001"])
    assert rc == 1
    rep = json.loads((out / "gpu_check.json").read_text())
    part = rep["parts"]["tests"]
    assert part["timed_out"] and not part["ok"] and "limit" in part["error"]
    assert part["wall_s"] < 30
    assert "tests: FAILED" in (out / "gpu_check.log").read_text()
