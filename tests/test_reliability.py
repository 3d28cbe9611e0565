"""Hostile inputs and careless users (issue 19): each case gets a non-zero exit, one line naming the file and the
reason, and leaves nothing partial behind. Most cases drive ``haskd.cli.main`` in-process on tiny synthetic scenes;
the lock case uses a second real process (the pid in the message must be another process's)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from haskd.cli import main

from conftest import REPO, TINY


def cli(capsys, *args):
    """Run the CLI in-process; returns (exit code, stdout, the non-empty stderr lines)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, [ln for ln in err.splitlines() if ln.strip()]


def one_line(rc, err, *needles):
    assert rc == 2, (rc, err)
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for n in needles:
        assert str(n) in err[0], (n, err[0])


def leftovers(folder):
    """Temp files of haskd's atomic writes under ``folder``."""
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


def tiny_ckpt(path, **config_changes):
    """A checkpoint of an untrained tiny student (no training needed to test loading)."""
    from haskd.config import load_config
    from haskd.engine.checkpoint import save_checkpoint
    from haskd.models import build_from_config

    cfg = load_config(None, TINY)
    model = build_from_config(cfg)
    d = cfg.to_dict()
    for key, value in config_changes.items():
        sec, name = key.split("__")
        d[sec][name] = value
    save_checkpoint(path, config=d, state_dict=model.state_dict(), epoch=1)
    return path


def cloud(path, n=300, seed=0, normals=False):
    rng = np.random.default_rng(seed)
    arr = np.concatenate([rng.random((n, 3)) * 3, rng.integers(0, 255, (n, 3))], 1)
    if normals:
        nrm = rng.normal(size=(n, 3))
        arr = np.concatenate([arr, nrm / np.linalg.norm(nrm, axis=1, keepdims=True)], 1)
    np.save(path, arr.astype(np.float64))
    return path


# ---------------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("name", ["evil_net", "spunet"])
def test_checkpoint_naming_a_module_never_runs_it(tmp_path, capsys, name):
    """A checkpoint whose config names a Python file: the file is never imported. With an unknown model name the
    load is refused in one line (pass --module to trust it); with a built-in name the built-in network is used."""
    marker = tmp_path / "PAYLOAD_RAN"
    payload = tmp_path / f"payload_{name}.py"  # one per case: a module is imported once per process
    payload.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    ck = tiny_ckpt(tmp_path / "evil.pt", model__module=str(payload), model__name=name)
    inp = cloud(tmp_path / "c.npy")
    rc, out, err = cli(capsys, "predict", "--ckpt", ck, inp, "--out", tmp_path / "pred", "--device", "cpu")
    if name == "evil_net":
        one_line(rc, err, ck, "model.module=", "never imports code named in a checkpoint", "--module")
        assert not (tmp_path / "pred").exists()
        rc, _, err = cli(capsys, "eval", "--ckpt", ck, "--data", tmp_path, "--device", "cpu")
        one_line(rc, err, ck, "never imports")
    else:
        assert rc == 0, err
    assert not marker.exists()
    # the user may pass the file themself: then it is their code, and it runs
    rc, _, err = cli(capsys, "predict", "--ckpt", ck, inp, "--out", tmp_path / "p2", "--module", payload)
    assert marker.exists()
