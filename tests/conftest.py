"""Shared fixtures. Real data is read from ../shared/data (or $HASKD_SHARED_DATA); tests skip cleanly when absent."""
import os
from pathlib import Path

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


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests run on 2 shared cores: keep torch from oversubscribing.
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)
