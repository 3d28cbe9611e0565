"""What every command's parser shares: the parser and help classes, whole-number arguments, the scene layout line.
Used by ``haskd.cli`` and by the command modules (which ``cli`` imports: they import this module, never ``cli``)."""
from __future__ import annotations

import argparse


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
