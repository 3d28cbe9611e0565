"""Run under torchrun by tests/test_ddp.py: train, then every rank saves its live parameters for comparison."""
import sys

import torch
import torch.distributed as dist

from haskd.config import load_config
from haskd.workflow.train import train

root, out = sys.argv[1], sys.argv[2]
cfg = load_config(None, ["model.preset=tiny", "data.voxel_size=0.1", "data.batch_size=1", "train.device=cpu",
                         "train.eval_every=0", f"data.root={root}", "train.epochs=1"])
metrics, model = train(cfg, out, progress=False, return_model=True)
rank = dist.get_rank() if dist.is_initialized() else 0
world = dist.get_world_size() if dist.is_initialized() else 1
torch.save({"world": world, "threads": torch.get_num_threads(), "miou": metrics.get("miou"),
            "state": {k: v.detach().clone() for k, v in model.named_parameters()}}, f"{out}/rank{rank}.pt")
