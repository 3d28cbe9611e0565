"""torchrun / DDP helpers. We never launch processes ourselves: ``torchrun --nproc_per_node=N -m haskd train``."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: str, threads: int = 0) -> torch.device:
    """Initialise the process group when started by torchrun, pick the device and the threads per process.

    Threads default to cores / local processes: on 2 cores, 2 ranks x 2 threads each ran 10-20x slower.
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from ..errors import HaskdError

        raise HaskdError("--device cuda asked for, but torch sees no CUDA GPU")
    cores = os.cpu_count() or 1
    torch.set_num_threads(threads if threads > 0 else max(1, cores // local_world))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(device)


def barrier():
    if world_size() > 1:
        dist.barrier()


def cleanup():
    """Tear the process group down once every rank is done with its collectives (the barrier): a rank that
    destroys its group while a peer still reads from it can abort that peer's process at exit."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
