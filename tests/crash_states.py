"""Crash states: record every write and flush a real run sends to a device, then
rebuild the device as a power cut could have left it.

A test-only recording device: a tiny pyfuse3 filesystem (run as its own process by
`recording_device`) that exposes one file, `device`, with direct_io. Hand its path to
the code under test as the device (`fusesnap mount --bow REC/device`, a snapshot
store, an update merge ...). Reads come from a working copy of the base image;
every write (offset, data), every fsync (a flush) and every discard (recorded as a
write of zeros) is applied to it and appended, in arrival order, to a log. A test can
put labelled marks into the log (`Recording.mark("checkpointed")`) to say what had
been acknowledged by then. Production code carries no test hooks for this.

It can also hold reads: after `Recording.hold_reads(offset)` every read of the
device that covers `offset` waits until `Recording.release_reads()`, and
`Recording.held_reads()` counts them (released or not). A test uses this to stop the
code under test inside a request, at a known point, without any hook in that code.

Afterwards `crash_states(base, recording, workdir)` replays the log and yields
`CrashState`s: the device after each flush (everything before it durable), and, for
each flush, random subsets and random prefixes of the writes issued after it and
before the next one (a disk may persist any of them, in any order), cut into 4 KiB
pieces. A state's `marks` are the marks recorded before its flush: things certainly
acknowledged before the power cut. Each state is a fresh file the check may modify.

    with recording_device(tmp_path / "rec", base_image) as rec:
        ...use rec.device...; rec.mark("checkpointed"); ...
    for state in crash_states(base_image, rec, tmp_path / "states", seed=1):
        check(state.path, state.marks)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from fusesnap.devices import FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE

WRITE, FLUSH, MARK = b"W", b"F", b"M"
_RECORD = struct.Struct("<cQI")  # kind, offset, length; then `length` bytes of data or label
PIECE = 4096
XATTR_MARK = "user.crash_states.mark"
XATTR_HOLD = "user.crash_states.hold"            # value: the offset whose reads wait
XATTR_RELEASE = "user.crash_states.release"      # they go on (the offset stays watched)
XATTR_HELD_READS = "user.crash_states.held_reads"  # reads of the offset since the hold
DEVICE_NAME = "device"


# -- the recorder (runs in its own process: `python crash_states.py MNT BASE WORKDIR`) --

def _serve(mountpoint: str, working_copy: str, log_path: str) -> None:
    import pyfuse3
    import trio

    device_inode = pyfuse3.ROOT_INODE + 1

    class Recorder(pyfuse3.Operations):
        def __init__(self):
            super().__init__()
            self.fd = os.open(working_copy, os.O_RDWR)
            self.size = os.fstat(self.fd).st_size
            self.log = open(log_path, "wb")
            self.held_offset: int | None = None
            self.held_reads = 0
            self.released = trio.Event()

        def append(self, kind: bytes, offset: int, payload: bytes) -> None:
            self.log.write(_RECORD.pack(kind, offset, len(payload)))
            self.log.write(payload)

        async def getattr(self, inode, ctx=None):
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = inode
            attr.attr_timeout = attr.entry_timeout = 300
            if inode == pyfuse3.ROOT_INODE:
                attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o755, 2
            elif inode == device_inode:
                attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o600, 1, self.size
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attr

        async def lookup(self, parent_inode, name, ctx=None):
            if parent_inode == pyfuse3.ROOT_INODE and name == DEVICE_NAME.encode():
                return await self.getattr(device_inode)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start_id, token):
            if start_id == 0:
                pyfuse3.readdir_reply(token, DEVICE_NAME.encode(), await self.getattr(device_inode), 1)

        async def open(self, inode, flags, ctx):
            if inode != device_inode:
                raise pyfuse3.FUSEError(errno.EISDIR)
            return pyfuse3.FileInfo(fh=inode, direct_io=True)

        async def read(self, fh, off, size):
            if self.held_offset is not None and off <= self.held_offset < off + size:
                self.held_reads += 1
                await self.released.wait()
            return os.pread(self.fd, min(size, max(0, self.size - off)), off)

        async def write(self, fh, off, buf):
            if off + len(buf) > self.size:
                raise pyfuse3.FUSEError(errno.ENOSPC)
            os.pwrite(self.fd, buf, off)
            self.append(WRITE, off, bytes(buf))
            return len(buf)

        async def fallocate(self, fh, mode, offset, length):
            # Punching a hole or zeroing a range (a discard through a loop device)
            # reads back as zeros; plain allocation changes no byte.
            if not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                return
            zeros = bytes(min(length, max(0, self.size - offset)))
            os.pwrite(self.fd, zeros, offset)
            self.append(WRITE, offset, zeros)

        async def fsync(self, fh, datasync):
            self.append(FLUSH, 0, b"")
            self.log.flush()

        async def setxattr(self, inode, name, value, ctx):
            if name.decode() == XATTR_HOLD:
                self.held_offset, self.held_reads = int(value), 0
                self.released = trio.Event()
            elif name.decode() == XATTR_RELEASE:
                self.released.set()
            elif name.decode() == XATTR_MARK:
                self.append(MARK, 0, bytes(value))
                self.log.flush()
            else:
                raise pyfuse3.FUSEError(errno.ENOTSUP)

        async def getxattr(self, inode, name, ctx):
            if name.decode() != XATTR_HELD_READS:
                raise pyfuse3.FUSEError(errno.ENODATA)
            return str(self.held_reads).encode()

        async def flush(self, fh):
            pass

        async def release(self, fh):
            pass

        async def statfs(self, ctx):
            return pyfuse3.StatvfsData()

    operations = Recorder()
    pyfuse3.init(operations, mountpoint, set(pyfuse3.default_options) | {"fsname=crash_states"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
        operations.log.close()


# -- the test side ----------------------------------------------------------------

@dataclasses.dataclass
class Recording:
    """A running recorder: `device` is the file to use as the device."""
    mountpoint: Path
    log_path: Path
    device: Path
    process: subprocess.Popen

    def mark(self, label: str) -> None:
        """Record that everything acknowledged so far happened before `label`."""
        os.setxattr(self.device, XATTR_MARK, label.encode())

    def hold_reads(self, offset: int) -> None:
        """From now on a read covering `offset` waits for `release_reads`."""
        os.setxattr(self.device, XATTR_HOLD, str(offset).encode())

    def release_reads(self) -> None:
        os.setxattr(self.device, XATTR_RELEASE, b"")

    def held_reads(self) -> int:
        """Reads covering the held offset since `hold_reads`, waiting or released."""
        return int(os.getxattr(self.device, XATTR_HELD_READS))


def _is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


@contextlib.contextmanager
def recording_device(workdir: Path, base_image: Path) -> Iterator[Recording]:
    """Serve a recording device over a copy of `base_image` (which stays untouched).
    On exit (the code under test must have closed the device) it is unmounted and the
    recorder stopped; the log is then complete."""
    workdir.mkdir(parents=True, exist_ok=True)
    mountpoint, working_copy, log_path = workdir / "mnt", workdir / "working.img", workdir / "writes.log"
    mountpoint.mkdir(exist_ok=True)
    shutil.copyfile(base_image, working_copy)
    process = subprocess.Popen([sys.executable, __file__, str(mountpoint), str(working_copy), str(log_path)],
                               stdout=subprocess.DEVNULL, stderr=open(workdir / "recorder.log", "wb"))
    try:
        deadline = time.monotonic() + 20
        while not _is_mounted(mountpoint):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"recorder did not mount: {(workdir / 'recorder.log').read_text()}")
            time.sleep(0.02)
        yield Recording(mountpoint, log_path, mountpoint / DEVICE_NAME, process)
    finally:
        if _is_mounted(mountpoint):
            if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def read_log(log_path: Path) -> list[tuple[bytes, int, bytes]]:
    """The recorded events in order: (WRITE, offset, data), (FLUSH, 0, b""), (MARK, 0, label)."""
    events = []
    with open(log_path, "rb") as log:
        while header := log.read(_RECORD.size):
            kind, offset, length = _RECORD.unpack(header)
            events.append((kind, offset, log.read(length)))
    return events


def _pieces(offset: int, data: bytes) -> list[tuple[int, bytes]]:
    """A write cut at PIECE boundaries: the units a power cut may keep or lose."""
    pieces, pos = [], 0
    while pos < len(data):
        end = min(len(data), (offset + pos) // PIECE * PIECE + PIECE - offset)
        pieces.append((offset + pos, data[pos:end]))
        pos = end
    return pieces


@dataclasses.dataclass
class CrashState:
    path: Path          # a rebuilt device; the check may modify it
    marks: frozenset    # labels recorded before the last flush this state contains
    flushes: int        # flushes durable in this state
    description: str    # for assertion messages


def _apply(fd: int, writes) -> None:
    for offset, data in writes:
        os.pwrite(fd, data, offset)


def crash_states(base_image: Path, recording: Recording | Path, workdir: Path, *, seed: int = 0,
                 subsets_per_flush: int = 2, every_nth_flush: int = 1) -> Iterator[CrashState]:
    """The device states a power cut could leave; see the module docstring.

    `every_nth_flush` thins out long runs (the flush states themselves are all kept;
    subsets are made after every n-th flush only).
    """
    log_path = recording.log_path if isinstance(recording, Recording) else recording
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    flushed = workdir / "flushed.img"
    shutil.copyfile(base_image, flushed)
    state_path = workdir / "state.img"
    marks: set[str] = set()
    pending: list[tuple[int, bytes]] = []
    flushes = -1  # the start counts as flush 0: the base image itself

    def fresh_state(writes) -> Path:
        shutil.copyfile(flushed, state_path)
        fd = os.open(state_path, os.O_RDWR)
        try:
            _apply(fd, writes)
        finally:
            os.close(fd)
        return state_path

    def states_after_flush():
        yield CrashState(fresh_state([]), frozenset(marks), flushes, f"flush {flushes}")
        if not pending or flushes % every_nth_flush:
            return
        for n in range(subsets_per_flush):
            subset = [p for p in pending if rng.random() < 0.5]
            yield CrashState(fresh_state(subset), frozenset(marks), flushes,
                             f"flush {flushes} + random subset {n} ({len(subset)}/{len(pending)} pieces)")
        cut = rng.randrange(len(pending) + 1)
        yield CrashState(fresh_state(pending[:cut]), frozenset(marks), flushes,
                         f"flush {flushes} + first {cut}/{len(pending)} pieces")

    events = [(FLUSH, 0, b"")] + read_log(log_path)
    flushed_fd = os.open(flushed, os.O_RDWR)
    try:
        pending_marks: list[str] = []
        for index, (kind, offset, payload) in enumerate(events):
            if kind == WRITE:
                pending.extend(_pieces(offset, payload))
            elif kind == MARK:
                pending_marks.append(payload.decode())
            elif kind == FLUSH:
                # The states between this flush and the next: everything before it,
                # plus any of the writes after it.
                upcoming = []
                for later_kind, later_offset, later_payload in events[index + 1:]:
                    if later_kind == FLUSH:
                        break
                    if later_kind == WRITE:
                        upcoming.extend(_pieces(later_offset, later_payload))
                _apply(flushed_fd, pending)
                os.fsync(flushed_fd)
                flushes += 1
                marks.update(pending_marks)
                pending_marks = []
                pending = upcoming
                yield from states_after_flush()
                pending = []
        # After the last flush nothing was forced out: the writes after it (already in
        # `pending` from the last flush's look-ahead) were covered above.
    finally:
        os.close(flushed_fd)


if __name__ == "__main__":
    _serve(*sys.argv[1:4])
