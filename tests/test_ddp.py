"""Two CPU processes under torchrun (gloo): parameters stay identical across ranks."""
import os
import subprocess
import sys

import torch

from conftest import REPO
from haskd.bench.ddp import free_port


def test_two_process_ddp_keeps_ranks_identical(tiny_rooms, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        str(REPO / "tests" / "ddp_worker.py"), str(tiny_rooms), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a["world"] == b["world"] == 2
    assert a["threads"] == 1  # cores / local processes on this 2-core machine (at least 1)
    assert a["miou"] == b["miou"]  # metrics all-reduced
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert (tmp_path / "last.pt").is_file()
