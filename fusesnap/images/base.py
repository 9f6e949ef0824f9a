"""The interface every image type implements, and how image types plug into `mount`.

An `Image` is one virtual block device exposed as a file in the mount. An image type
is a module in this package with three functions, `add_mount_arguments(parser)`,
`add_commands(commands)` (its own subcommands, e.g. `fusesnap update ...`; they reach
a running mount through `fusesnap.control`) and `images_from_args(args) -> list[Image]`,
listed in `fusesnap.images.IMAGE_TYPES`. The FUSE
adapter (`fusesnap.fs`) only ever calls the methods below; everything an image type
needs beyond them (its range map, its background tasks, its on-disk formats) is its
own business.

Concurrency contract: every method runs on the trio thread of the mount. Methods may
await (to run blocking or CPU-heavy work in a thread, say), so requests to one image
can interleave at their awaits; an image keeps its range-map mutations free of awaits
so each one is atomic. Errors: raise `OSError` with an errno meant for the request
(EIO, ENOSPC, EROFS ...); anything else is a bug, which the adapter logs and answers
with EIO for that request alone.

State is kept in plain attributes of the image object (no closures, no globals), so a
running mount can hand it to freshly loaded code.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

import trio


class Image:
    """Base class of an image type. Subclasses set the class attributes and override
    the I/O methods they support."""

    #: target type shown in .status, e.g. "linear", "update"
    target: ClassVar[str]
    #: keys of status() that make up the text line of .status, in order
    status_line_keys: ClassVar[tuple[str, ...]] = ()
    #: control verbs this image answers to (`fusesnap update pause` sends verb "update")
    control_verbs: ClassVar[tuple[str, ...]] = ()
    #: True for an image that cannot work without discards from the loop device
    #: (FUSE fallocate requests, which stock pyfuse3 does not pass on)
    needs_discards: ClassVar[bool] = False

    def __init__(self, name: str, size: int, *, read_only: bool):
        self.name = name
        self.size = size
        self.read_only = read_only

    async def start(self, nursery: trio.Nursery) -> None:
        """Start background tasks in the mount's nursery (called once, after mounting)."""

    async def read(self, offset: int, size: int) -> bytes:
        raise NotImplementedError

    async def write(self, offset: int, data: bytes) -> int:
        raise OSError(errno.EROFS, "read-only image")

    async def discard(self, offset: int, length: int, *, zero_range: bool) -> None:
        """A discard (or, with zero_range, write-zeroes) from the loop device."""
        raise OSError(errno.EOPNOTSUPP, "discard not supported")

    async def flush(self) -> None:
        """Make every write acknowledged so far durable (fsync on the image)."""

    def status(self) -> dict[str, Any]:
        """Target figures for .status.json (JSON-serialisable)."""
        return {}

    def files(self) -> list[tuple[str, "Image"]]:
        """The files this image shows in the mount: itself, and for an image type whose
        set of files changes at runtime (snapshots) the others it owns. The server asks
        again after every control command."""
        return [(self.name, self)]

    def control(self, verb: str, args: list[str]) -> str:
        """Act on a control command; return a one-line answer. ValueError = bad command.
        May be a coroutine function (a command that waits for in-flight writes)."""
        raise ValueError(f"{self.name} takes no '{verb}' commands")

    async def close(self) -> None:
        """Stop background work, flush, release devices (the mount is going away)."""
