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
