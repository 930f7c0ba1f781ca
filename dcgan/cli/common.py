"""What every `dcgan` command's parser shares: help that shows each option's default, overrides that
may follow options, and argument types that refuse a bad number with a clear message.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to every option that has a default worth printing, so that `--help`
    alone says what a command will do; descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "(default" in text
            or default is None
            or default is False
            or default == ""
            or default == []
            or default is argparse.SUPPRESS
        ):
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands, too, use HelpFormatter (subparsers take the parent's class).

    `intermixed=True` (for a command that takes key=value overrides) parses as `parse_intermixed_args`
    does, so that overrides may also follow an option: `dcgan train CONFIG --dry-run train.steps=5`.
    A subcommand's parser is called through `parse_known_args`, so that is where intermixing is switched
    on; a request for help is parsed the plain way, which prints each positional's default."""

    def __init__(self, *args: Any, intermixed: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.intermixed = intermixed
        self._intermixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        words = list(sys.argv[1:] if args is None else args)
        asks_help = any(word in ("-h", "--help") for word in words[: words.index("--") if "--" in words else None])
        if not self.intermixed or self._intermixing or asks_help:
            return super().parse_known_args(words, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args (Python < 3.12)
        try:
            return self.parse_known_intermixed_args(words, namespace)
        finally:
            self._intermixing = False


def positive_float(text: str) -> float:
    """argparse type for durations and sizes: > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def ratio_above_one(text: str) -> float:
    """argparse type for --outlier: a ratio of 1 or less would flag every rank slower than the others' median."""
    value = float(text)
    if not value > 1:
        raise argparse.ArgumentTypeError(f"must be > 1, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts: a clear message for 0 or a negative number instead of a crash later."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
