"""What every command's parser shares: the parser and help classes, the common training options
(``--config --data --out --epochs --seed --device key=value``) and the config they give. Used by ``haskd.cli`` and by
the command modules (which ``cli`` imports: they import this module, never ``cli``)."""
from __future__ import annotations

import argparse

from ..config import CHOICES, load_config


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1 (``--epochs``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the line breaks of a command's description and ends each option's help with its default
    (unless the help already names it, or there is none worth saying: None, False, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.help is argparse.SUPPRESS or "default" in text.lower():
            return text
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, (list, tuple)) and not d):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else "%(default)s"
            return f"{text} (default: {shown})".strip()
        return text


class Parser(argparse.ArgumentParser):
    """The parser class of ``haskd`` and every subcommand (subparsers inherit it): :class:`HelpFormatter`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


# Shown under every training/eval command's options.
SCENES_IN = "scene folders <DATA>/<split>/<scene>/ (coord.npy, color.npy, segment20.npy or segment.npy, ...)"


def add_common(p, data_required=False, out_default=None):
    p.add_argument("--config", default=None, help="YAML config or preset name from haskd/configs/ (default: "
                   "scannet20_student for train; each command's description names its own)")
    p.add_argument("--data", default=None, required=data_required,
                   help="data root holding <split>/<scene>/ (default: the config's data.root)")
    p.add_argument("--out", default=None, help=f"output folder (default: {out_default or 'the command default'})")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: the config's train.epochs)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the config's train.seed)")
    p.add_argument("--device", default=None, choices=CHOICES["train.device"],
                   help="default: the config's train.device (auto: cuda when available)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. optim.lr=0.01 model.preset=tiny (an unknown key lists the valid ones)")


def config_from_args(args):

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "data", None):
        cfg.data.root = args.data
    if getattr(args, "epochs", None) is not None:
        cfg.train.epochs = args.epochs
    if getattr(args, "seed", None) is not None:
        cfg.train.seed = args.seed
    if getattr(args, "device", None):
        cfg.train.device = args.device
    return cfg
