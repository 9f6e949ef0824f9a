"""The FUSE adapter in-process (no mount): only FUSEError leaves a handler."""

from __future__ import annotations

import errno

import pyfuse3
import pytest
import trio

from fusesnap.fs import FuseOperations
from fusesnap.images.base import Image


class BrokenImage(Image):
    target = "broken"

    def __init__(self, exc):
        super().__init__("broken.img", 1 << 20, read_only=False)
        self.exc = exc

    async def read(self, offset, size):
        raise self.exc

    async def write(self, offset, data):
        raise self.exc


async def _no_control(command):
    raise ValueError(command)


def _open_image(ops):
    inode = ops.by_name[b"broken.img"]
    return trio.run(ops.open, inode, 0o2, None).fh


@pytest.mark.parametrize("exc, expected", [
    (RuntimeError("bug"), errno.EIO),
    (KeyError(3), errno.EIO),
    (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
    (pyfuse3.FUSEError(errno.EROFS), errno.EROFS),
])
def test_any_failure_becomes_an_errno_for_that_request(exc, expected, caplog):
    ops = FuseOperations(BrokenImage(exc).files(), _no_control)
    fh = _open_image(ops)
    for call in (lambda: ops.read(fh, 0, 4096), lambda: ops.write(fh, 0, b"x")):
        with pytest.raises(pyfuse3.FUSEError) as excinfo:
            trio.run(call)
        assert excinfo.value.errno == expected
    if expected == errno.EIO:
        assert "failed unexpectedly" in caplog.text


def test_bad_control_command_is_einval():
    ops = FuseOperations([], _no_control)
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        trio.run(ops.setxattr, pyfuse3.ROOT_INODE, b"user.fusesnap.command", b"frob", None)
    assert excinfo.value.errno == errno.EINVAL


def test_status_files_cannot_be_opened_for_writing():
    ops = FuseOperations([], _no_control)
    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        trio.run(ops.open, ops.by_name[b".status"], 0o1, None)
    assert excinfo.value.errno == errno.EACCES


class NamedImage(Image):
    target = "named"

    def __init__(self, name):
        super().__init__(name, 1 << 20, read_only=False)

    async def read(self, offset, size):
        return self.name.encode()[:size]


def _read_through(ops, name: bytes) -> bytes:
    fh = trio.run(ops.open, ops.by_name[name], 0, None).fh
    return trio.run(ops.read, fh, 0, 64)


def test_a_fresh_adapter_numbers_files_and_handles_as_the_one_before():
    """What a failover's successor relies on: the inodes and image handles the kernel
    holds mean the same files in an adapter built later from the same images, whatever
    came and went in between."""
    one, two, three = (NamedImage(f"snapshot-{n}.img") for n in (1, 2, 3))
    before = FuseOperations([(one.name, one), (two.name, two), ("snapshot.img", two)], _no_control)
    alias_handle = trio.run(before.open, before.by_name[b"snapshot.img"], 0, None).fh
    one_handle = trio.run(before.open, before.by_name[one.name.encode()], 0, None).fh
    before.set_files([(two.name, two), (three.name, three), ("snapshot.img", three)])
    assert trio.run(before.read, alias_handle, 0, 64) == b"snapshot-2.img"  # kept its image
    with pytest.raises(pyfuse3.FUSEError) as dropped:
        trio.run(before.read, one_handle, 0, 64)
    assert dropped.value.errno == errno.EIO
    kernel_holds = dict(before.by_name)
    handle = trio.run(before.open, kernel_holds[b"snapshot.img"], 0, None).fh

    two, three = NamedImage("snapshot-2.img"), NamedImage("snapshot-3.img")
    fresh = FuseOperations([(two.name, two), (three.name, three), ("snapshot.img", three)],
                           _no_control)

    assert fresh.by_name == kernel_holds
    assert trio.run(fresh.read, handle, 0, 64) == b"snapshot-3.img"
    assert trio.run(fresh.read, alias_handle, 0, 64) == b"snapshot-2.img"
    assert _read_through(fresh, b"snapshot-2.img") == b"snapshot-2.img"
