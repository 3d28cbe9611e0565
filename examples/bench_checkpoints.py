"""Write untrained checkpoints (student, baseline, teacher, 3 snapshots) of a preset for `haskd benchmark`.

Weights do not change what the benchmark times, so cost can be measured for any network without training it first:

    python examples/bench_checkpoints.py --config samples_bench --out runs/bench_small model.preset=small
    haskd benchmark --ckpt runs/bench_small/student.pt --baseline runs/bench_small/baseline.pt \\
        --teacher runs/bench_small/teacher/teacher.pt --snapshots runs/bench_small/snapshots \\
        --data data/samples/scannet --max-scenes 2 --runs 5 --threads 1 --out small.json
"""
import argparse
from pathlib import Path

import torch

from haskd.config import load_config
from haskd.engine.checkpoint import save_checkpoint
from haskd.models import build_from_config


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="samples_bench")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    out = Path(args.out)

    def write(path, extra=(), seed=0):
        cfg = load_config(args.config, [*args.overrides, *extra])
        torch.manual_seed(seed)
        save_checkpoint(path, config=cfg.to_dict(), state_dict=build_from_config(cfg).state_dict())

    write(out / "student.pt")
    write(out / "baseline.pt", seed=1)
    write(out / "teacher" / "teacher.pt", ["role=teacher"], seed=2)
    for e in (1, 2, 3):
        write(out / "snapshots" / f"epoch_{e:03d}.pt", seed=10 + e)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
