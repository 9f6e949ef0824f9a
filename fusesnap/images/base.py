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

Live upgrade (`fusesnap.upgrade`): the successor process opens every image from the
mount's command line the way a restart does (with the old server's descriptors, see
`handover_fds`), *before* the old server pauses; in the pause it only applies the
small state of `handover_state()`. That state is versioned: `restore_handover_state`
accepts the versions in `handover_versions` and refuses any other with ValueError,
which rolls the upgrade back.
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
    #: FUSE requests the image wants handled at once (the mount serves at least this
    #: many): an image whose writes wait for a shared fsync (group commit) needs
    #: several in flight, or every write waits alone
    concurrent_requests: ClassVar[int] = 1

    #: versions of handover_state() this code restores; the first is the one it writes.
    #: Empty: the image type cannot be handed over, and `fusesnap upgrade` refuses the
    #: mount (its state would go stale between the successor opening it and the pause).
    handover_versions: ClassVar[tuple[int, ...]] = ()

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

    # -- live upgrade -------------------------------------------------------------

    def handover_fds(self) -> dict[str, int]:
        """Descriptors a successor must inherit instead of opening the paths again,
        by path (a block device opened O_EXCL cannot be opened twice)."""
        return {}

    def handover_state(self) -> dict[str, Any]:
        """What a successor needs beyond what it rebuilds when it opens the image from
        the mount's command line (JSON-serialisable, small: it is taken during the
        pause). Called with no request in flight and background tasks stopped."""
        return {"target": self.target, "version": self.handover_versions[0]}

    def restore_handover_state(self, state: dict[str, Any]) -> None:
        """Take over `state` from the previous server (the image was just opened and
        is not serving yet). ValueError if the state is not one this code knows.

        Called twice: with the state as it was before the pause (apply the costly part
        then), and with the final one, taken in the pause, which supersedes it."""
        self.check_handover_state(state)

    def check_handover_state(self, state: dict[str, Any]) -> int:
        """The version of `state`, after checking it is for this image type and a
        version this code restores; ValueError otherwise."""
        if state.get("target") != self.target:
            raise ValueError(f"{self.name}: hand-over state of a {state.get('target')!r} "
                             f"image, not {self.target!r}")
        version = state.get("version")
        if version not in self.handover_versions:
            raise ValueError(f"{self.name}: hand-over state version {version!r} is unknown "
                             f"to this build (it restores {', '.join(map(str, self.handover_versions))})")
        return version
