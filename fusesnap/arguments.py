"""argparse types and actions every command shares: paths that mean what they mean
in the caller's directory, numbers whose errors say what was expected, and options
that may be given only once. Pure parsing, no I/O beyond `os.path`.

Paths are resolved *while parsing*, in the directory `fusesnap` was started in,
before anything can change it (the mount server changes to `/`). An option or
argument that names a file or directory declares `type=path`; one that names a
backing device declares `type=device` (a bare name such as `sda1` means `/dev/sda1`).
The value that reaches the command is then an absolute path.
"""

from __future__ import annotations

import argparse
import math
import os

from .devices import resolve_device_path


def path(text: str) -> str:
    """A file or directory, as an absolute path resolved in the caller's directory."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return os.path.abspath(text)


def device(text: str) -> str:
    """A backing device or image file (`sda1` means `/dev/sda1`), as an absolute path."""
    if not text:
        raise argparse.ArgumentTypeError("expected a device or file, got an empty string")
    return resolve_device_path(text)


def whole_number(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number (decimal, or 0x... hexadecimal) in [minimum, maximum]."""
    expected = (f"a whole number from {minimum} to {maximum}" if maximum is not None
                else f"a whole number >= {minimum}")

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = expected  # what argparse would print, were parse to raise anything else
    return parse


positive_int = whole_number(1)


def positive_number(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


class StoreOnce(argparse.Action):
    """`store`, refusing a second occurrence of the option (`--linear a --linear b`
    would otherwise silently keep only `b`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_options_given", set())
        if self.dest in given:
            raise argparse.ArgumentError(self, "given more than once (a mount takes one of each)")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def refuse_repeated_options(parser: argparse.ArgumentParser) -> None:
    """Make every plain option added to `parser` from now on a `StoreOnce`
    (argument groups share the parser's registry, so image types' options are covered)."""
    parser.register("action", None, StoreOnce)
    parser.register("action", "store", StoreOnce)


def size(text: str) -> int:
    """`100M`, `1G`, `4096` ... (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.rstrip("KMGTkmgtiBb"), text[len(text.rstrip("KMGTkmgtiBb")):].upper()
    unit = unit.replace("IB", "").replace("B", "")
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text} (e.g. 100M, 1G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value
