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
    return rc, out, [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]  # progress bars are not messages


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
    d = cfg.to_dict()
    for key, value in config_changes.items():
        sec, name = key.split("__")
        d[sec][name] = value
    if d["model"]["name"] in ("spunet", "ptv3"):
        cfg.data.use_normal = d["data"]["use_normal"]
    model = build_from_config(cfg)
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


# ---------------------------------------------------------------------------------------------------- run folders

def scene(root, name="s0", split="train", n=200, seed=0, **arrays):
    """A tiny scene folder; ``arrays`` replace or add files (name -> array, or None to leave the file out)."""
    d = root / split / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    files = {"coord": (rng.random((n, 3)) * 2).astype(np.float32), "color": rng.integers(0, 255, (n, 3)).astype(np.uint8),
             "segment20": rng.integers(0, 5, n)}
    files.update(arrays)
    for key, arr in files.items():
        if arr is not None:
            np.save(d / f"{key}.npy", arr)
    return d


@pytest.fixture
def data(tmp_path):
    scene(tmp_path / "data")
    scene(tmp_path / "data", split="val", seed=1)
    return tmp_path / "data"


RUN = ["--no-progress", "--device", "cpu", *TINY, "train.eval_every=0"]


def train(capsys, data, out, *more):
    return cli(capsys, "train", "--data", data, "--out", out, *RUN, *more)


def test_run_folder_is_owned_by_one_run(data, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = train(capsys, data, out, "--resume", "--epochs", 1)  # a mistyped --out must not start from scratch
    one_line(rc, err, out, "no run to resume")
    assert not out.exists()
    assert train(capsys, data, out, "--epochs", 1)[0] == 0
    best = (out / "best.pt").read_bytes()
    lines = (out / "metrics.jsonl").read_text()
    rc, _, err = train(capsys, data, out, "--epochs", 1)  # a plain rerun must not replace the run
    one_line(rc, err, out, "already holds a run", "--resume", "--overwrite")
    assert (out / "best.pt").read_bytes() == best and (out / "metrics.jsonl").read_text() == lines
    rc, _, err = train(capsys, data, out, "--resume", "--epochs", 1)  # nothing left to do
    one_line(rc, err, out, "finished (1 of 1 epochs)", "--epochs N > 1")
    # another preset / optimizer / scheduler on resume: refused before config.yaml is touched
    conf = (out / "config.yaml").read_text()
    for change in ("model.preset=small", "optim.optimizer=adamw", "optim.scheduler=cosine"):
        rc, _, err = train(capsys, data, out, "--resume", "--epochs", 2, change)
        key = change.split("=")[0]
        one_line(rc, err, out, "--resume with settings other than the run's", key)
        assert (out / "config.yaml").read_text() == conf
    rc, _, err = train(capsys, data, out, "--resume", "--overwrite")
    one_line(rc, err, "contradict")
    # extending a finished run: two more epochs, one metrics line per epoch, the schedule of 3 epochs
    assert train(capsys, data, out, "--resume", "--epochs", 3)[0] == 0
    rows = [__import__("json").loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    from haskd.engine.checkpoint import load_checkpoint

    ck = load_checkpoint(out / "last.pt")
    assert ck["epoch"] == 3 and ck["config"]["train"]["epochs"] == 3
    assert ck["scheduler"]["total_steps"] == 3  # one step per epoch on one training scene, batch 2
    rc, _, err = train(capsys, data, out, "--resume", "--epochs", 2)
    one_line(rc, err, "trained 3 epochs already")
    # --overwrite replaces the run (only its own files)
    (out / "notes.txt").write_text("mine")
    assert train(capsys, data, out, "--epochs", 1, "--overwrite")[0] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1 and (out / "notes.txt").exists()
    assert leftovers(out) == []


def test_second_live_run_is_refused_naming_the_first_pid(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from haskd.engine.runfolder import RunLock; "
                               f"RunLock({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = train(capsys, data, out, "--epochs", 1)
        one_line(rc, err, out, f"another haskd run (pid {holder.pid})")
        assert sorted(p.name for p in out.iterdir()) == [".haskd.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert train(capsys, data, out, "--epochs", 1)[0] == 0  # the kernel dropped the dead run's lock


def test_resume_after_a_kill_between_metrics_and_save(data, tmp_path, capsys, monkeypatch):
    """A run killed after it logged epoch 2 but before it saved it: the resume repeats epoch 2, and metrics.jsonl
    holds it once; the killed save's temp file is swept."""
    import haskd.engine.hooks as T

    out = tmp_path / "run"
    real = T.save_checkpoint

    class Killed(BaseException):
        pass

    def save(path, **payload):
        if payload.get("epoch") == 2:
            (path.parent / f".{path.name}.tmp999999").write_bytes(b"half")  # what a killed save leaves
            raise Killed
        real(path, **payload)

    monkeypatch.setattr(T, "save_checkpoint", save)
    with pytest.raises(Killed):
        train(capsys, data, out, "--epochs", 3)
    monkeypatch.setattr(T, "save_checkpoint", real)
    assert (out / ".last.pt.tmp999999").exists()
    assert train(capsys, data, out, "--resume")[0] == 0
    rows = [__import__("json").loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert leftovers(out) == []


def test_predict_never_overwrites_its_own_outputs(tmp_path, capsys):
    ck = tiny_ckpt(tmp_path / "m.pt")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = cloud(tmp_path / "a" / "room.npy", seed=1), cloud(tmp_path / "b" / "room.npy", seed=2)
    rc, _, err = cli(capsys, "predict", "--ckpt", ck, a, b, "--out", tmp_path / "p")
    one_line(rc, err, "room_labels.npy", str(a), str(b), "would write the same output names")
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------------------------------- config values

CONFIG_CASES = {
    "voxel_size<=0": (["data.voxel_size=0"], ["data.voxel_size", "> 0", "0"]),
    "batch_size<=0": (["data.batch_size=0"], ["data.batch_size", "at least 1"]),
    "lr<0": (["optim.lr=-0.1"], ["optim.lr", ">= 0", "-0.1"]),
    "lr nan": (["optim.lr=.nan"], ["optim.lr", "finite"]),
    "unknown dataset": (["data.dataset=kitti"], ["data.dataset", "scannet20, s3dis", "kitti"]),
    "num_classes above the class list": (["data.num_classes=30"], ["data.num_classes", "1..20"]),
    "kwargs not a mapping": (["model.kwargs=5"], ["model.kwargs", "mapping"]),
    "unknown kwarg": (["model.kwargs={bogus: 1}"], ["model spunet", "bogus"]),
    "bad kwarg value": (["model.kwargs={channels: [8, 16]}"], ["spunet", "channels", "same"]),
    "unknown model": (["model.name=pointnet9"], ["model.name", "ptv3, spunet"]),
    "unknown optimizer": (["optim.optimizer=adam"], ["optim.optimizer", "sgd, adamw"]),
    "bad image size": (["teacher.image_size=[0, 10]"], ["teacher.image_size"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_value_stops_before_any_folder(data, tmp_path, capsys, case):
    overrides, needles = CONFIG_CASES[case]
    out = tmp_path / "run"
    rc, _, err = train(capsys, data, out, "--epochs", 1, *overrides)
    one_line(rc, err, *needles)
    assert not out.exists()


def test_binary_yaml_is_one_line(data, tmp_path, capsys):
    bad = tmp_path / "cfg.yaml"
    bad.write_bytes(bytes(range(256)) * 4)
    rc, _, err = cli(capsys, "train", "--config", bad, "--data", data, "--out", tmp_path / "run")
    one_line(rc, err, bad, "not a text YAML file")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------- scene arrays

N = 200
_rng = np.random.default_rng(3)
SCENE_CASES = {
    "non-numeric coord": (dict(coord=np.array([["a", "b", "c"]] * N)), "coord.npy", ["coord must hold numbers", "<U1"]),
    "nan coord": (dict(coord=np.full((N, 3), np.nan)), "coord.npy", ["NaN/inf coordinates"]),
    "coords spanning 1e7 m": (dict(coord=np.concatenate([_rng.random((N - 1, 3)), [[1e7, 0, 0]]])), "coord.npy",
                              ["span", "not an indoor scene"]),
    "coord (N, 2)": (dict(coord=np.zeros((N, 2), np.float32)), "coord.npy", ["coord must be (N, 3)"]),
    "float labels": (dict(segment20=np.full(N, -0.3)), "segment20.npy", ["labels must hold integers", "float64"]),
    "nan colour": (dict(color=np.full((N, 3), np.nan)), "color.npy", ["colour(s) with NaN/inf"]),
    "colour out of range": (dict(color=np.full((N, 3), 300, np.int32)), "color.npy", ["colours must be 0..255", "300"]),
    "nan normal": (dict(normal=np.full((N, 3), np.nan, np.float32)), "normal.npy", ["normal(s) with NaN/inf"]),
    "normal wrong shape": (dict(normal=np.zeros((N, 2), np.float32)), "", ["normal must be (200, 3)"]),
    "missing normals": (dict(normal=None), "normal.npy", ["missing file", "data.use_normal=true"]),
    "garbage npy": ("garbage", "coord.npy", ["cannot read .npy"]),
}


@pytest.mark.parametrize("case", sorted(SCENE_CASES))
def test_bad_scene_array_is_one_line(tmp_path, capsys, case):
    arrays, fname, needles = SCENE_CASES[case]
    normals = dict(normal=_rng.normal(size=(N, 3)).astype(np.float32))
    d = scene(tmp_path / "data", **{**normals, **({} if arrays == "garbage" else arrays)})
    if arrays == "garbage":
        (d / "coord.npy").write_bytes(b"\x93NUMPY garbage")
    scene(tmp_path / "data", split="val", seed=1, **normals)
    out = tmp_path / "run"
    rc, _, err = train(capsys, tmp_path / "data", out, "--epochs", 1, "data.use_normal=true")
    one_line(rc, err, d / fname if fname else d, *needles)
    assert not out.exists()


def test_far_coordinates_keep_their_precision(tmp_path, capsys):
    """A georeferenced scan 5e5 m from 0: labels equal those of the same cloud at 0, and the output PLY keeps the
    input's own coordinates (float64)."""
    from plyfile import PlyData

    from haskd.data.scene import load_scene

    ck = tiny_ckpt(tmp_path / "m.pt")
    near = cloud(tmp_path / "near.npy", n=2000)
    arr = np.load(near)
    far = tmp_path / "far.npy"
    arr[:, :3] += (5e5, 4e6, 0)
    np.save(far, arr)
    rc, _, err = cli(capsys, "predict", "--ckpt", ck, near, far, "--out", tmp_path / "p")
    assert rc == 0, err
    assert np.array_equal(np.load(tmp_path / "p" / "near_labels.npy"), np.load(tmp_path / "p" / "far_labels.npy"))
    v = PlyData.read(str(tmp_path / "p" / "far_pred.ply"))["vertex"].data
    assert v["x"].dtype == np.float64 and np.array_equal(v["x"], arr[:, 0]) and np.array_equal(v["y"], arr[:, 1])
    # scene folders: float64 coordinates kept until the origin is subtracted
    d = scene(tmp_path / "data", n=2000, coord=arr[:, :3])
    s = load_scene(d)
    assert np.array_equal(s.origin, [5e5, 4e6, 0]) and np.abs(s.world - arr[:, :3]).max() < 1e-6


def test_predict_reads_ply_colour_names_and_normals(tmp_path, capsys):
    from plyfile import PlyData, PlyElement

    from haskd.engine.predict import read_points

    n = 50
    v = np.zeros(n, [("x", "f4"), ("y", "f4"), ("z", "f4"), ("diffuse_red", "u1"), ("diffuse_green", "u1"),
                     ("diffuse_blue", "u1"), ("nx", "f4"), ("ny", "f4"), ("nz", "f4")])
    v["x"] = np.arange(n)
    v["diffuse_red"], v["diffuse_green"], v["diffuse_blue"], v["nz"] = 200, 10, 30, 1
    PlyData([PlyElement.describe(v, "vertex")]).write(str(tmp_path / "d.ply"))
    s = read_points(tmp_path / "d.ply")
    assert (s.color == [200, 10, 30]).all() and (s.normal == [0, 0, 1]).all()
    # a mesh without stored normals: from its faces (one triangle in the z=0 plane, counter-clockwise: +z)
    mv = np.array([(0, 0, 0), (1, 0, 0), (0, 1, 0)], [("x", "f4"), ("y", "f4"), ("z", "f4")])
    faces = np.array([([0, 1, 2],)], [("vertex_indices", "i4", (3,))])
    PlyData([PlyElement.describe(mv, "vertex"), PlyElement.describe(faces, "face")]).write(str(tmp_path / "m.ply"))
    assert np.allclose(read_points(tmp_path / "m.ply").normal, [0, 0, 1])
    # a model trained with normals: an input without them is refused in one line; (N, 9) .npy with normals runs
    ck = tiny_ckpt(tmp_path / "n.pt", data__use_normal=True)
    rc, _, err = cli(capsys, "predict", "--ckpt", ck, cloud(tmp_path / "plain.npy"), "--out", tmp_path / "p")
    one_line(rc, err, "plain.npy", "trained with normals", "has none")
    assert not (tmp_path / "p").exists()
    rc, _, err = cli(capsys, "predict", "--ckpt", ck, cloud(tmp_path / "withn.npy", normals=True), "--out",
                     tmp_path / "p")
    assert rc == 0, err


def test_eval_override_that_disagrees_with_the_checkpoint(tmp_path, capsys):
    ck = tiny_ckpt(tmp_path / "m.pt")
    rc, _, err = cli(capsys, "eval", "--ckpt", ck, "--data", tmp_path, "model.preset=small")
    one_line(rc, err, ck, "model.preset='small' disagrees with the checkpoint's 'tiny'")


def test_checkpoint_whose_weights_disagree_with_its_config(tmp_path, capsys):
    from haskd.engine.checkpoint import load_checkpoint, save_checkpoint

    ck = tiny_ckpt(tmp_path / "m.pt")
    c = load_checkpoint(ck)
    c["config"]["model"]["preset"] = "small"
    save_checkpoint(ck, **c)
    rc, _, err = cli(capsys, "predict", "--ckpt", ck, cloud(tmp_path / "c.npy"), "--out", tmp_path / "p")
    one_line(rc, err, ck, "weights do not match the config's model")
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------------------------------- frames

def frames_scene(root, n_frames=4, K=None, split="train", name="s0"):
    """A scene whose 4 frames look at its points (identity poses, points 2 m in front); 30x40 images."""
    from haskd.data.frames import write_frame, write_intrinsics

    rng = np.random.default_rng(0)
    coord = np.concatenate([rng.uniform(-1, 1, (N, 2)), np.full((N, 1), 2.0)], 1).astype(np.float32)
    d = scene(root, name=name, split=split, coord=coord)
    for i in range(n_frames):
        write_frame(d / "frames", f"{i:03d}", rng.integers(0, 255, (30, 40, 3)).astype(np.uint8),
                    depth_m=np.full((30, 40), 2.0), pose=np.eye(4))
    write_intrinsics(d / "frames", np.array([[30, 0, 20], [0, 30, 15], [0, 0, 1]]) if K is None else K)
    return d


def _depth(d, fid, arr):
    from PIL import Image

    Image.fromarray(arr).save(d / "frames" / "depth" / f"{fid}.png")


FRAME_ERRORS = {
    "nan intrinsics": (lambda d: frames_scene(d, K=np.full((3, 3), np.nan)), "intrinsic_color.txt", ["NaN/inf"]),
    "zero intrinsics": (lambda d: frames_scene(d, K=np.zeros((3, 3))), "intrinsic_color.txt", ["fx, fy > 0"]),
    "every depth of another size": (
        lambda d: [_depth(s, f"{i:03d}", np.full((15, 20), 2000, np.uint16)) for s in [frames_scene(d)] for i in range(4)],
        "intrinsic_depth.txt", ["principal point (20, 15) is not near the centre of the 20x15 images"]),
}


@pytest.mark.parametrize("case", sorted(FRAME_ERRORS))
def test_bad_frames_are_one_line(tmp_path, capsys, case):
    make, fname, needles = FRAME_ERRORS[case]
    make(tmp_path / "data")
    d = tmp_path / "data" / "train" / "s0" / "frames" / "intrinsic" / fname
    rc, _, err = cli(capsys, "frames", "select", "--data", tmp_path / "data", "--policy", "uniform", "--k", 2,
                     "--out", tmp_path / "sel")
    one_line(rc, err, d, *needles)
    assert not (tmp_path / "sel").exists()
    # teacher training reads the same frames (NaN intrinsics used to crash it with a segfault)
    frames_scene(tmp_path / "data", split="val", name="v0")
    rc, _, err = train(capsys, tmp_path / "data", tmp_path / "run", "--epochs", 1, "role=teacher")
    one_line(rc, err, d, *needles)
    assert not (tmp_path / "run").exists()


def _truncate_jpg(d, fid):
    p = d / "frames" / "color" / f"{fid}.jpg"
    p.write_bytes(p.read_bytes()[:200])


FRAME_SKIPS = {
    "one depth of another size": (lambda d: _depth(d, "001", np.full((15, 20), 2000, np.uint16)), "depth of another size"),
    "8-bit depth": (lambda d: _depth(d, "001", np.full((30, 40), 200, np.uint8)), "depth not 16-bit"),
    "garbage depth png": (lambda d: (d / "frames" / "depth" / "001.png").write_bytes(b"\x89PNG garbage"),
                          "unreadable image"),
    "truncated jpg": (lambda d: _truncate_jpg(d, "001"), "unreadable image"),
}


@pytest.mark.parametrize("case", sorted(FRAME_SKIPS))
def test_unusable_frame_is_a_counted_skip(tmp_path, capsys, caplog, case):
    import json

    spoil, reason = FRAME_SKIPS[case]
    spoil(frames_scene(tmp_path / "data"))
    rc, _, err = cli(capsys, "frames", "select", "--data", tmp_path / "data", "--policy", "uniform", "--k", 3,
                     "--out", tmp_path / "sel")
    assert rc == 0, err
    chosen = json.loads((tmp_path / "sel" / "frames_uniform_k3.json").read_text())["s0"]["ids"]
    assert "001" not in chosen and len(chosen) == 3
    assert reason in caplog.text


# ---------------------------------------------------------------------------------------------------- writes

def _fail_after_partial(errno_):
    """A write function that leaves half a file, then fails like the OS would."""
    def write(*args, **kwargs):
        target = next((a for a in args if isinstance(a, (str, os.PathLike))), None)
        if target is not None:
            with open(target, "wb") as f:
                f.write(b"half")
        raise OSError(errno_, os.strerror(errno_))
    return write


def test_disk_full_in_train_leaves_no_partial_checkpoint(data, tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _fail_after_partial(errno.ENOSPC))
    rc, _, err = train(capsys, data, out, "--epochs", 1)
    one_line(rc, err, out / "best.pt", "cannot write", "disk full")
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists() and leftovers(out) == []
    monkeypatch.undo()
    assert train(capsys, data, out, "--resume", "--epochs", 1)[0] == 0  # the run that never saved starts clean
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_disk_full_in_predict_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    import errno

    import plyfile

    ck = tiny_ckpt(tmp_path / "m.pt")
    monkeypatch.setattr(plyfile.PlyData, "write", lambda self, path: _fail_after_partial(errno.ENOSPC)(path))
    rc, _, err = cli(capsys, "predict", "--ckpt", ck, cloud(tmp_path / "c.npy"), "--out", tmp_path / "p")
    one_line(rc, err, "c_pred.ply", "disk full")
    assert list((tmp_path / "p").iterdir()) == []  # neither the labels nor a truncated PLY, no temp file


SMALL = ["--train", 1, "--val", 1, "--points-per-m2", 30, "--frames", 2, "--image-size", 24, 32, "--no-progress"]


def test_disk_full_in_prepare_leaves_no_partial_scene(tmp_path, capsys, monkeypatch):
    import errno

    import haskd.data.scene as S

    real = np.save
    calls = []

    def save(path, arr, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            _fail_after_partial(errno.ENOSPC)(path)
        real(path, arr, *a, **k)

    monkeypatch.setattr(S.np, "save", save)
    out = tmp_path / "syn"
    rc, _, err = cli(capsys, "prepare", "synthetic", "--out", out, *SMALL)
    one_line(rc, err, out / "train", "disk full")
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no temp folder left
    assert not any((p / "coord.npy").exists() and not (p / "color.npy").exists() for p in out.rglob("*") if p.is_dir())


@pytest.mark.parametrize("command", ["train", "eval", "predict", "prepare"])
def test_read_only_output_is_one_line(data, tmp_path, capsys, monkeypatch, command):
    """A read-only --out (monkeypatched: tests run as root, for whom chmod does not bite)."""
    import errno
    import pathlib

    ro = tmp_path / "ro"
    real = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    ck = tiny_ckpt(tmp_path / "m.pt")
    args = {"train": ["train", "--data", data, "--out", ro / "run", *RUN, "--epochs", 1],
            "eval": ["eval", "--ckpt", ck, "--data", data, "--out", ro / "m.json", "--device", "cpu"],
            "predict": ["predict", "--ckpt", ck, cloud(tmp_path / "c.npy"), "--out", ro / "p"],
            "prepare": ["prepare", "synthetic", "--out", ro / "syn", *SMALL]}[command]
    rc, _, err = cli(capsys, *args)
    one_line(rc, err, ro, "read-only")
    assert not ro.exists()


@pytest.mark.parametrize("command", ["train", "predict", "eval"])
def test_out_that_is_a_file(data, tmp_path, capsys, command):
    f = tmp_path / "taken"
    f.write_text("mine")
    ck = tiny_ckpt(tmp_path / "m.pt")
    args = {"train": ["train", "--data", data, "--out", f, *RUN, "--epochs", 1],
            "predict": ["predict", "--ckpt", ck, cloud(tmp_path / "c.npy"), "--out", f],
            "eval": ["eval", "--ckpt", ck, "--data", data, "--out", f / "m.json", "--device", "cpu"]}[command]
    rc, _, err = cli(capsys, *args)
    one_line(rc, err, f, "is a file")
    assert f.read_text() == "mine"


def test_prepared_scenes_are_readable_by_others_and_killed_temp_folders_are_swept(tmp_path, capsys):
    out = tmp_path / "syn"
    assert cli(capsys, "prepare", "synthetic", "--out", out, *SMALL)[0] == 0
    room = next(p for p in (out / "train").iterdir() if p.is_dir())
    assert room.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's private 0700
    stale = room.parent / f".{room.name}.999999.abcd1234"  # what a killed prepare leaves (its pid is gone)
    stale.mkdir()
    (stale / "coord.npy").write_bytes(b"half")
    assert cli(capsys, "prepare", "synthetic", "--out", out, *SMALL, "--overwrite")[0] == 0
    assert not stale.exists()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_s3dis_scenes_under_the_scannet_class_list(data, tmp_path, capsys):
    (data / "manifest.json").write_text('{"version": 1, "dataset": "s3dis", "scenes": {}}')
    rc, _, err = train(capsys, data, tmp_path / "run", "--epochs", 1)
    one_line(rc, err, data / "manifest.json", "prepared as s3dis", "data.dataset=scannet20")
    assert not (tmp_path / "run").exists()


def test_pca_normals_of_a_plane_face_the_room():
    from haskd.engine.predict import pca_normals

    rng = np.random.default_rng(0)
    floor = np.c_[rng.random((300, 2)) * 4, np.zeros(300)]
    n = pca_normals(floor, viewpoint=(2, 2, 1.5))
    assert np.allclose(n, [0, 0, 1], atol=1e-6)


def test_temp_manifest_of_a_killed_prepare_is_swept(tmp_path):
    from haskd.prepare.manifest import Manifest

    stale = tmp_path / ".manifest.999999.ab12cd.json"  # a SIGKILL while the manifest was being replaced
    stale.write_text("{")
    mine = tmp_path / f".manifest.{os.getpid()}.ef34gh.json"  # a live writer's: kept
    mine.write_text("{")
    Manifest(tmp_path, "scannet")
    assert not stale.exists() and mine.exists()
