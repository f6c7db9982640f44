"""The argparse side of the ``boneage`` command: value types that name the flag in their errors, the help
formatter, the typed options from the parsed flags and the log handler. ``boneage.cli`` builds the parser from
these; subcommands that live beside their code (``boneage.dicom.node``) use them without importing the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any
from pathlib import Path

from boneage.errors import BoneAgeError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks (RawDescription) and appends each option's default to its help, like
    ArgumentDefaultsHelpFormatter, but not for flags (their help says it) nor for defaults that say nothing (None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or action.nargs == 0 or default in (None, [], "") or default is argparse.SUPPRESS
                or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return text
        return text + " (default: %(default)s)"


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi]; argparse names the flag in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range; use {lo}..{hi}" if hi is not None
                                             else f"{value} is out of range; use an integer >= {lo}")
        return value
    parse.__name__ = "integer"
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def interval_level(text: str) -> float:
    """argparse type: 0.9, 90 or 90% -> 0.9; in (0.5, 0.995]."""
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a level; write e.g. 0.9 or 90%") from None
    value = value / 100 if (text.endswith("%") or value > 1) else value
    if not 0.5 <= value <= 0.995:
        raise argparse.ArgumentTypeError(f"{text} is out of range; use a level from 0.5 to 0.995 (50% to 99.5%)")
    return value


def device_name(text: str) -> str:
    from boneage.device import DEVICE_CHOICES, check_device_name

    try:
        return check_device_name(text)
    except BoneAgeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use {DEVICE_CHOICES}") from None


def out_folder(text: str) -> str:
    """argparse type for --out folders: not an existing file, and writable (or creatable)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file, not a folder; give a folder path")
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {probe} (permission denied); choose another folder")
    return text


def options_from_args(cls: Any, args: argparse.Namespace, **given: Any) -> Any:
    """A typed options dataclass from the parsed flags: every field whose name is a flag's destination."""
    names = {f.name for f in dataclasses.fields(cls)} - set(given)
    return cls(**given, **{n: getattr(args, n) for n in names if hasattr(args, n)})


def log_to_stderr(quiet: bool, verbose: bool) -> None:
    """Messages of ``boneage.*`` loggers on stderr: warnings and progress by default, errors only with
    ``--quiet``, everything with ``--verbose``."""
    import logging

    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("boneage %(name)s: %(levelname)s: %(message)s" if verbose
                                           else "%(name)s: %(message)s"))
    root = logging.getLogger("boneage")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
