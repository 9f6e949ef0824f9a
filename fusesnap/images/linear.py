"""`linear.img`: a read-write pass-through of one device (`--linear DEV`).

The simplest image: offsets map 1:1 onto the device. It proves the stack end to end
and is the yardstick the other images are measured against. I/O runs directly on the
trio thread (no worker thread): a pread/pwrite on a page-cached file is cheaper than
the hand-off to a thread, which measured five times slower for 4 KiB requests.
"""

from __future__ import annotations

import argparse

from .. import arguments
from ..devices import BlockDevice, check_range
from .base import Image


class LinearImage(Image):
    target = "linear"
    status_line_keys = ("size", "device")
    handover_versions = (1,)

    def __init__(self, device: BlockDevice, name: str = "linear.img"):
        super().__init__(name, device.size, read_only=device.read_only)
        self.device = device

    async def read(self, offset: int, size: int) -> bytes:
        return self.device.pread(size, offset)

    async def write(self, offset: int, data: bytes) -> int:
        check_range(self.size, offset, len(data))
        # Acknowledged only after pwrite returned: the data is then in the kernel's
        # page cache of the device and survives a crash of this server; flush()
        # makes it durable against power loss.
        return self.device.pwrite(data, offset)

    async def discard(self, offset: int, length: int, *, zero_range: bool) -> None:
        check_range(self.size, offset, length)
        self.device.punch(offset, length, zero_range=zero_range)

    async def flush(self) -> None:
        self.device.fsync()

    def status(self) -> dict:
        return {"size": self.size, "device": self.device.path}

    def handover_fds(self) -> dict[str, int]:
        return {self.device.path: self.device.fd}

    def handover_state(self) -> dict:
        return {**super().handover_state(), "device": self.device.path, "size": self.size}

    def restore_handover_state(self, state: dict) -> None:
        self.check_handover_state(state)
        if (state["device"], state["size"]) != (self.device.path, self.size):
            raise ValueError(f"{self.name}: handed over for {state['device']} ({state['size']} "
                             f"bytes), but opened {self.device.path} ({self.size} bytes)")

    async def close(self) -> None:
        self.device.fsync()
        self.device.close()


def add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--linear", metavar="DEV", type=arguments.device,
                        help="expose linear.img, a read-write pass-through of DEV")


USAGE_EXAMPLES = """\
  fusesnap mount mnt --linear /dev/sdb        # mnt/linear.img: read-write pass-through of /dev/sdb
  losetup --find --show mnt/linear.img        # use the printed /dev/loopN as a block device"""


def add_commands(commands) -> None:
    """linear.img has no subcommands of its own."""


def images_from_args(args: argparse.Namespace) -> list[Image]:
    if not args.linear:
        return []
    return [LinearImage(BlockDevice(args.linear))]
