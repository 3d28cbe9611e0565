"""``haskd benchmark``: latency / training-step / memory comparison, or one of ``--layers``, ``--chunked``,
``--loading``, ``--ddp``.

Prints Markdown tables and writes the full result as JSON (``--out``). See docs/performance.md.
"""
from __future__ import annotations

import json
from pathlib import Path


def register(sub):
    p = sub.add_parser("benchmark", help="time inference, training steps, sparse-conv layers, data loading, DDP",
                       description=(
        "Latency / training-step / memory medians and their ratios, measured in one run (docs/performance.md);\n"
        "or one of --layers, --chunked, --loading, --ddp.\n\n"
        "Reads:  --ckpt (and --teacher, --snapshots, --baseline), the split's scene folders under --data.\n"
        "Writes: --out, the full result as JSON (seconds, bytes).\n"
        "Prints: Markdown tables."))
    p.add_argument("--ckpt", default=None, help="student checkpoint (model benchmark; config for --loading/--ddp)")
    p.add_argument("--data", required=True, help="data root holding <split>/<scene>/")
    p.add_argument("--split", default="val", help="split whose scenes are timed")
    p.add_argument("--teacher", default=None, help="multi-modal teacher checkpoint")
    p.add_argument("--snapshots", default=None, help="folder of epoch_*.pt snapshots (ensemble; ASD experts)")
    p.add_argument("--baseline", default=None, help="baseline student checkpoint (same network)")
    p.add_argument("--runs", type=int, default=5, help="timed repetitions (medians reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared: default 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device")
    p.add_argument("--max-scenes", type=int, default=3, help="scenes of the split to time")
    p.add_argument("--no-train", action="store_true", help="skip the training-step comparison")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--layers", action="store_true", help="per-layer FLOP rate of the sparse conv (see --backend)")
    mode.add_argument("--loading", action="store_true", help="DataLoader share of a training step")
    mode.add_argument("--chunked", action="store_true", help="chunked vs one-shot inference on a tiled room")
    mode.add_argument("--ddp", action="store_true", help="1 core vs 2: torchrun 2 x 1 thread, 1 process x 2 threads")
    p.add_argument("--scene", default=None, help="--layers: scene name (default: the first)")
    p.add_argument("--preset", default="small", help="--layers: SpUNet preset")
    p.add_argument("--voxels", type=int, default=50000, help="--layers: target voxel count of the room")
    p.add_argument("--no-unet", action="store_true", help="--layers: skip the whole-UNet backend comparison")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "native"),
                   help="--layers: sparse conv backend of the per-layer table (auto: native where it compiles)")
    p.add_argument("--grid", type=int, default=3, help="--chunked: grid x grid copies of the room")
    p.add_argument("--max-voxels", type=int, default=100000, help="--chunked: voxel budget per chunk")
    p.add_argument("--overlap", type=float, default=1.0, help="--chunked: chunk overlap (m)")
    p.add_argument("--steps", type=int, default=4, help="--loading / --ddp: timed steps")
    p.add_argument("--config", default=None, help="--loading / --ddp: config (default: --ckpt's, else preset)")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides: of the training steps (model benchmark), of the run (--loading / --ddp)")
    p.set_defaults(func=run)


def _config(args):
    from ..config import apply_overrides, from_dict, load_config
    from ..engine.checkpoint import load_checkpoint

    if args.ckpt and not args.config:
        cfg = from_dict(load_checkpoint(args.ckpt)["config"], source=str(args.ckpt))
        stored, cfg.model.module = cfg.model.module, ""  # never import code a checkpoint names (see load_model)
        apply_overrides(cfg, args.overrides)
        if stored and not cfg.model.module:
            from ..errors import InputError

            raise InputError(args.ckpt, f"its config names user code (model.module={stored}) and haskd never "
                                        f"imports code named in a checkpoint; if you trust that file, pass "
                                        f"model.module={stored}")
    else:
        cfg = load_config(args.config, args.overrides)
    cfg.data.root = args.data
    cfg.train.device = "cpu"
    return cfg


def run(args) -> int:
    from .. import bench as B
    from ..errors import HaskdError

    if args.runs < 1 or args.warmup < 0:
        raise HaskdError("--runs must be >= 1 and --warmup >= 0")
    if args.layers:
        res = B.benchmark_layers(args.data, args.scene, args.preset, args.threads, runs=args.runs,
                                 target_voxels=args.voxels, unet=not args.no_unet, backend=args.backend)
    elif args.chunked:
        res = B.benchmark_chunked(args.data, args.ckpt, args.scene, args.grid, args.max_voxels, args.overlap,
                                  args.preset, threads=args.threads)
    elif args.loading:
        res = B.benchmark_loading(_config(args), steps=args.steps, threads=args.threads)
    elif args.ddp:
        res = B.benchmark_ddp(_config(args), steps=args.steps, rounds=args.runs)
    else:
        if not args.ckpt:
            raise HaskdError("haskd benchmark needs --ckpt STUDENT.pt (or one of --layers, --loading, --ddp)")
        res = B.benchmark_models(args.ckpt, args.data, args.split, args.teacher, args.snapshots, args.baseline,
                                 args.runs, args.warmup, args.threads, args.device, args.max_scenes,
                                 train_steps=not args.no_train, overrides=args.overrides)
    print(B.to_markdown(res))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"-> {out}")
    return 0
