"""Backing devices: resolve a device argument, learn its size and granularity, and
do positional I/O on it.

A `BlockDevice` wraps one file descriptor on a block device or a regular file. Every
method is a plain blocking syscall on that fd (`pread`/`pwrite` are positional, so
several threads may use one device at once). Images call them from the trio thread
when the data is expected in the page cache and from worker threads otherwise.
`WriteBehind` starts writeback of a long run of writes from a worker thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct
import tempfile
from typing import Callable

from .errors import UserError

log = logging.getLogger(__name__)


def fsync_directory(directory: str) -> None:
    """Make a directory's entries durable (after a rename, create or unlink in it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: str, data: bytes) -> None:
    """Write `path` whole so that a crash leaves the old version or the new one:
    write-temp (a name unique to this writer), fsync, rename, fsync-directory. When it
    returns the new version is durable; OSError leaves the old one."""
    directory = os.path.dirname(path)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # Order: the new version is durable before it takes the name, and the rename
        # is durable (directory fsync) before the caller counts on it.
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_directory(directory)

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKROGET = 0x125E

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (Python's os.posix_fallocate takes none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
_SYNC_FILE_RANGE_WRITE = 2


#: Filesystems whose fsync of a range (an RWF_DSYNC write) commits all of the file's
#: metadata and flushes the disk cache (statfs f_type): ext2/3/4, XFS
RANGE_SYNC_FILESYSTEMS = frozenset((0xEF53, 0x58465342))


def filesystem_type(fd: int) -> int:
    """statfs(2) f_type of the filesystem holding `fd` (Python's os.fstatvfs lacks it)."""
    buffer = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buffer) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buffer).value


def write_back(fd: int, offset: int, length: int) -> None:
    """Write the range's dirty pages to the device and wait (sync_file_range(2)).
    Not durable by itself: no metadata, no cache flush; a later fsync of a range of
    the same file (an RWF_DSYNC write) commits the file's metadata and flushes."""
    if _libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_ALL) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class WriteBehind:
    """Starts writeback of what a long run of buffered writes wrote while the writer
    goes on: `wrote(offset, length)` after each write; every `span` bytes of the
    device covered, a worker thread calls `start(offset, length)` for that range
    (`BlockDevice.start_write_back`, which blocks while it queues the I/O).
    `finish()` waits for the thread and raises its first OSError; an fsync after it
    then waits for less; `close()` stops the thread. Not durable by itself. One
    writer thread."""

    def __init__(self, start: Callable[[int, int], None], span: int):
        self.start = start
        self.span = span
        self.low = self.high = None  # the range written since the last hand-over
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-behind")
        self.started: list[concurrent.futures.Future] = []

    def wrote(self, offset: int, length: int) -> None:
        end = offset + length
        self.low = offset if self.low is None else min(self.low, offset)
        self.high = end if self.high is None else max(self.high, end)
        if self.high - self.low >= self.span:
            self._hand_over()

    def _hand_over(self) -> None:
        self.started.append(self.pool.submit(self.start, self.low, self.high - self.low))
        self.low = self.high = None

    def finish(self) -> None:
        """Start the rest and wait for it all; the thread's first OSError, if any."""
        if self.low is not None:
            self._hand_over()
        for future in self.started:
            future.result()

    def close(self) -> None:
        """Stop the thread (always, after `finish` or instead of it: a writer that
        stopped early or failed), without looking at its results."""
        self.pool.shutdown(wait=True, cancel_futures=True)


#: Descriptors handed over by a live upgrade, by path (`fusesnap.upgrade`): a
#: BlockDevice for one of these paths takes the descriptor instead of opening the
#: path, because a block device opened O_EXCL cannot be opened a second time.
inherited_fds: dict[str, int] = {}


def _open_or_inherit(path: str, flags: int) -> int:
    inherited = inherited_fds.pop(path, None)
    return os.open(path, flags) if inherited is None else inherited


def resolve_device_path(arg: str) -> str:
    """Turn a device argument into an absolute path.

    A bare name such as `sda1` means `/dev/sda1`; when no such device node exists
    and a file of that name is in the current directory, the file is meant.
    """
    if "/" not in arg:
        dev_path = os.path.join("/dev", arg)
        if os.path.exists(dev_path) or not os.path.exists(arg):
            return dev_path
    return os.path.abspath(arg)


class BlockDevice:
    """An open block device or regular file used as an image's backing store (or,
    with `image_device=False`, a file an image keeps data in, such as a snapshot store,
    which may be empty and of any size)."""

    def __init__(self, path: str, *, read_only: bool = False, image_device: bool = True):
        self.path = path
        self.read_only = read_only
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UserError(f"no such device: {path}") from None
        except OSError as exc:
            raise UserError(f"cannot use {path}: {exc.strerror}") from None
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise UserError(f"{path} is neither a block device nor a regular file")
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        # O_EXCL on a block device: refuse one that is mounted or otherwise claimed.
        exclusive = os.O_EXCL if self.is_block_device and not read_only else 0
        #: True if the descriptor came from a live upgrade: the previous server may
        #: still be serving, so opening must not write (see `fusesnap.upgrade`)
        self.inherited = path in inherited_fds
        try:
            self.fd = _open_or_inherit(path, (os.O_RDONLY if read_only else os.O_RDWR | exclusive)
                              | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise UserError(f"{path} is in use (mounted, or claimed by another program)") from None
            if read_only or exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise UserError(f"cannot open {path}: {exc.strerror}") from None
            # A write-protected device still makes a (read-only) image.
            self.read_only = True
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if self.is_block_device:
            self.size = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8))[0]
            self.logical_block_size = struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4))[0]
            if struct.unpack("i", fcntl.ioctl(self.fd, BLKROGET, b"\0" * 4))[0]:
                self.read_only = True  # Linux lets root open it O_RDWR, but writes fail
        else:
            self.size = st.st_size
            self.logical_block_size = 512
        if image_device and self.size == 0:
            self.close()
            raise UserError(f"{path} is empty (0 bytes): there is nothing to serve")
        if image_device and self.size % 512:
            log.warning("%s is %d bytes, not a multiple of 512: a loop device on its image "
                        "ignores the last %d bytes", path, self.size, self.size % 512)

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pread_into(self, buffer: bytearray, offset: int) -> None:
        """Fill all of `buffer` from `offset` (EIO if the device ends first)."""
        view = memoryview(buffer)
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"{self.path} ends before byte {offset + len(view)}")
            done += got

    def pwrite(self, data, offset: int) -> int:
        """Write all of `data` at `offset` (loops over short writes)."""
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        return done

    def punch(self, offset: int, length: int, *, zero_range: bool = False) -> None:
        """Discard (`PUNCH_HOLE`) or zero (`ZERO_RANGE`) a byte range; it reads back as zeros.

        On a block device the kernel turns this into a discard/write-zeroes request
        (blkdev_fallocate); on a file it frees or zeroes the blocks.
        """
        mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_ZERO_RANGE if zero_range else FALLOC_FL_PUNCH_HOLE)
        fallocate(self.fd, mode, offset, length)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def start_write_back(self, offset: int, length: int) -> None:
        """Start writing the range's dirty pages to the device, without waiting for
        them (sync_file_range(2) SYNC_FILE_RANGE_WRITE; any thread). Not durable."""
        if _libc.sync_file_range(self.fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<BlockDevice {self.path} {self.size} bytes>"


def check_range(image_size: int, offset: int, length: int) -> None:
    """Raise ENOSPC for a write or discard that reaches past the end of an image."""
    if offset < 0 or length < 0 or offset + length > image_size:
        raise OSError(errno.ENOSPC, "beyond the end of the image")


def processes_using(directory: str) -> list[tuple[int, str]]:
    """(pid, command name) of every other process with a file, its working directory or
    its root inside `directory` (what makes `umount` say "target is busy")."""
    prefix = os.path.realpath(directory) + "/"
    found = []
    for pid in sorted(int(name) for name in os.listdir("/proc") if name.isdigit()):
        if pid == os.getpid():
            continue
        try:
            links = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
            targets = []
            for link in links:
                try:
                    targets.append(os.readlink(link) + "/")
                except OSError:
                    pass  # the fd was closed meanwhile
            if any(target.startswith(prefix) for target in targets):
                with open(f"/proc/{pid}/comm") as comm:
                    found.append((pid, comm.read().strip()))
        except OSError:
            continue  # the process ended meanwhile
    return found


def loop_devices_backed_under(directory: str) -> list[tuple[str, str]]:
    """(loop device, backing file) of every loop device whose backing file lies
    inside `directory`."""
    prefix = os.path.realpath(directory) + "/"
    found = []
    for name in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as backing:
                path = backing.read().strip()
        except OSError:
            continue
        if path.startswith(prefix):
            found.append((f"/dev/{name}", path))
    return found
