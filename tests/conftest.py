"""Shared fixtures. Real data is read from ../shared/data (or $HASKD_SHARED_DATA); tests skip cleanly when absent."""
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see haskd/cli.py)

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir():
    env = os.environ.get("HASKD_SHARED_DATA")
    p = Path(env) if env else REPO.parent / "shared" / "data"
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def shared_data():
    p = shared_data_dir()
    if p is None:
        pytest.skip("real data (../shared/data) not present")
    return p


@pytest.fixture(autouse=True, scope="session")
def _view_cache(tmp_path_factory):
    # rendered virtual views go to a cache folder (never into the input data): keep the tests' out of ~/.cache
    old = os.environ.get("HASKD_CACHE")
    os.environ["HASKD_CACHE"] = str(tmp_path_factory.mktemp("haskd_cache"))
    yield
    if old is None:
        os.environ.pop("HASKD_CACHE", None)
    else:
        os.environ["HASKD_CACHE"] = old


@pytest.fixture(autouse=True)
def _one_thread():
    # Tests are many small ops on 2 shared cores: 2 OpenMP threads mostly wait on each other (measured up to 5x
    # slower on a loaded machine). Multi-thread paths are exercised by the DDP test and the benchmarks.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_rooms(tmp_path_factory):
    """Four small synthetic rooms with frames: 2 train, 1 val, 1 held-out test (shared by the end-to-end tests)."""
    from haskd.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("rooms")
    write_dataset(root, num_train=2, num_val=1, num_test=1, seed=7, progress=False, points_per_m2=120.0, num_frames=6,
                  image_size=(60, 80))
    return root


TINY = ["model.preset=tiny", "data.voxel_size=0.1", "data.batch_size=2", "optim.lr=0.02", "train.device=cpu"]
