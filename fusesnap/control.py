"""The client side of the control channel: finding a fusesnap mount, reading its
status files and sending its server commands. Used by the CLI and by image types'
own subcommands; plain blocking calls, no FUSE (the server side is `fusesnap.fs`).
"""

from __future__ import annotations

import json
import os
import re

from .errors import EXIT_FAILED, UserError

# The channel: extended attributes of the mount root, answered by `fusesnap.fs`.
XATTR_PID = b"user.fusesnap.pid"          # getxattr: the server's pid
XATTR_COMMAND = b"user.fusesnap.command"  # setxattr "<verb> <args>": run a command


def mounted_at(path: str) -> str | None:
    """The filesystem type mounted at `path`, or None."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            # The kernel escapes space, tab, newline and backslash as \ooo.
            mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
            if mount_point == target:
                found = fields[fields.index("-") + 1]  # the last one is on top
    return found


def read_status(mountpoint: str, json_form: bool) -> str:
    if mounted_at(mountpoint) != "fuse.fusesnap":
        raise UserError(f"{mountpoint} is not a fusesnap mount")
    name = ".status.json" if json_form else ".status"
    try:
        with open(os.path.join(mountpoint, name)) as status:
            return status.read()
    except OSError as exc:
        raise UserError(f"cannot read {mountpoint}/{name}: {exc.strerror}", EXIT_FAILED) from None


def send_command(mountpoint: str, command: str) -> None:
    try:
        os.setxattr(mountpoint, XATTR_COMMAND, command.encode())
    except OSError as exc:
        raise UserError(f"{mountpoint}: '{command}' failed: {exc.strerror}", EXIT_FAILED) from None


def require_image(mountpoint: str, target: str, hint: str) -> None:
    """UserError unless the mount at `mountpoint` serves an image of type `target`."""
    images = json.loads(read_status(mountpoint, True))["images"]
    if not any(figures["target"] == target for figures in images.values()):
        raise UserError(f"{mountpoint} has no {target} image ({hint})")
