"""haskd: HAS-KD distillation for point-only 3D semantic segmentation.

Every training/eval command takes ``--config``, ``--data``, ``--out``, ``--epochs``,
``--seed``, ``--device`` and ``key=value`` overrides. Input problems print one line and exit non-zero."""
from __future__ import annotations

import importlib
import os
import logging
import sys

from .commands.args import Parser
from .errors import HaskdError

# Spinning OpenMP threads starve other processes on small machines (measured: a tiny forward/backward went from
# 0.26 s to 13.7 s with a second busy process on 2 cores). Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Command modules, each with register(subparsers); imported explicitly, in this order.
COMMAND_MODULES = ("train", "prepare", "frames", "experts", "pipeline", "benchmark", "curves")


def build_parser():
    p = Parser(prog="haskd", description=__doc__.split("\n")[0],
               epilog="`haskd COMMAND --help` names each command's inputs, outputs and defaults.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging with logger names")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name in COMMAND_MODULES:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    # key=value overrides may come anywhere on the line (before or after options).
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s")
    try:
        return int(args.func(args) or 0)
    except HaskdError as e:
        print(f"haskd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("haskd: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # read-only folder, disk full, a file where a folder should be: one line, no traceback
        from .io import os_reason

        where = f"{e.filename}: " if e.filename else ""
        print(f"haskd: error: {where}{os_reason(e)}", file=sys.stderr)
        return 2
