"""Bad input: one clear line (file and reason), non-zero exit, no partial output left behind."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO


def haskd(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "haskd", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd or REPO, timeout=300)
    return r.returncode, r.stdout, r.stderr


def scene(root, name="s0", split="train", n=200, coord=None, seg=None, color=True):
    d = root / split / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(d / "coord.npy", rng.random((n, 3)).astype(np.float32) if coord is None else coord)
    if color:
        np.save(d / "color.npy", rng.integers(0, 255, (n, 3)).astype(np.uint8))
    np.save(d / "segment20.npy", rng.integers(0, 5, n) if seg is None else seg)
    return d


def expect_one_line(rc, err, *needles):
    assert rc != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


CASES = {
    "missing_file": (lambda r: scene(r, color=False), ["color.npy", "missing file"]),
    "nan_coords": (lambda r: scene(r, coord=np.full((200, 3), np.nan, np.float32)), ["coord", "NaN"]),
    "empty_scene": (lambda r: scene(r, n=0, coord=np.zeros((0, 3), np.float32)), ["empty scene"]),
    "no_labeled_point": (lambda r: scene(r, seg=np.full(200, -1)), ["no labeled point"]),
    "labels_out_of_range": (lambda r: scene(r, seg=np.full(200, 25)), ["outside [-1, 19]"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_bad_scene(tmp_path, case):
    make, needles = CASES[case]
    d = make(tmp_path / "data")
    scene(tmp_path / "data", split="val")
    out = tmp_path / "out"
    rc, _, err = haskd("train", "--data", tmp_path / "data", "--out", out, "--epochs", "1", "--no-progress")
    expect_one_line(rc, err, str(d), *needles)
    assert not out.exists()


def test_unknown_config_key(tmp_path):
    rc, _, err = haskd("train", "--data", tmp_path, "--out", tmp_path / "o", "optim.lrr=1")
    expect_one_line(rc, err, "unknown config key 'optim.lrr'", "optim.lr")
    assert not (tmp_path / "o").exists()


def test_missing_data_split(tmp_path):
    rc, _, err = haskd("train", "--data", tmp_path / "nope", "--out", tmp_path / "o")
    expect_one_line(rc, err, "nope", "split folder 'train' not found")
    scene(tmp_path / "d")  # a train split, no val split: the pipeline stops before it writes anything
    rc, out, err = haskd("pipeline", "--data", tmp_path / "d", "--out", tmp_path / "p")
    expect_one_line(rc, err, "split folder 'val' not found")
    assert not (tmp_path / "p").exists() and "training" not in out + err
    rc, out, err = haskd("ablate", "--data", tmp_path / "d", "--out", tmp_path / "a", "--seeds", 1)
    expect_one_line(rc, err, "split folder 'val' not found")
    assert not (tmp_path / "a").exists()


def test_corrupt_ply_and_bad_checkpoint(tmp_path):
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 100\nproperty float x\nend_header\n\x00\x01")
    ck = tmp_path / "x.pt"
    ck.write_bytes(b"not a checkpoint")
    rc, _, err = haskd("predict", "--ckpt", ck, bad, "--out", tmp_path / "p")
    expect_one_line(rc, err, str(ck), "checkpoint")
    assert not (tmp_path / "p").exists()


def test_corrupt_ply_reported(tmp_path):
    from haskd.engine.predict import read_points
    from haskd.errors import InputError

    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 100\nproperty float x\nend_header\n\x00\x01")
    with pytest.raises(InputError, match="bad.ply: corrupt or unsupported PLY"):
        read_points(bad)
    nan = tmp_path / "nan.txt"
    nan.write_text("0 0 0\nnan 1 1\n")
    with pytest.raises(InputError, match="NaN"):
        read_points(nan)


def test_checkpoint_with_code_is_refused_in_one_reason(tmp_path):
    import fractions

    import torch

    from haskd.engine.checkpoint import load_checkpoint
    from haskd.errors import InputError

    ck = tmp_path / "obj.pt"
    torch.save({"model": {}, "x": fractions.Fraction(1, 3)}, ck)  # a class weights-only loading does not allow
    with pytest.raises(InputError) as e:
        load_checkpoint(ck)
    msg = str(e.value)
    assert "obj.pt" in msg and "weights-only loading refused it" in msg and "Fraction" in msg
    assert "weights_only` set to `False`" not in msg and "\n" not in msg  # none of torch's advice to unpickle code


def test_zero_epochs_is_an_error_not_a_silent_empty_run(tmp_path):
    scene(tmp_path / "d")
    rc, _, err = haskd("train", "--data", tmp_path / "d", "--out", tmp_path / "o", "train.epochs=0")
    expect_one_line(rc, err, "'train.epochs' must be at least 1")
    rc, _, err = haskd("train", "--data", tmp_path / "d", "--out", tmp_path / "o", "--epochs", 0)
    assert rc == 2 and "--epochs: must be at least 1" in err
    assert not (tmp_path / "o").exists()
