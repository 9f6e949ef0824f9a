"""The scratch copy that makes merging a version 1 diff safe.

A v1 chunk decompresses only with OLD's contents of the blocks it references, and
most of those are blocks the update changes: the merge overwrites them. So before
its first write to the device the merge copies the old contents of every changed
block some chunk references into a scratch file in the state directory, checks each
against its block's old hash (a version 2 trailer's, or the record the merge keeps
of them for a version 3 trailer: fusesnap.old_hashes), and makes the file
durable (fsync, then fsync of its directory). From then on a chunk's references are
read from the scratch file where they are changed blocks, and from the device where
they are not (the merge never writes those), so every chunk can be decompressed at
any time: the merge stays idempotent and order-free, as v0's is. Android's snapuserd
keeps a scratch copy for the same reason.

Layout: slot i (block_size bytes at i * block_size) holds OLD's contents of the i-th
referenced changed block in ascending block order (`blocks`). There is no header: the
file's name says which diff and device it serves, and nothing in it is trusted
without its hash: `verify` checks every slot when the file is opened, `fill` checks
what it copies, and each chunk checks its whole dictionary against its reference
hash when decompressed, so a damaged or lost scratch file is an error, never wrong
data.

Memory: 17 bytes per slot (block number, entry index, validity), at most one slot per
changed block: for a 10 GiB image, 11 MiB with a quarter of its blocks changed, 45 MiB
with all of them (and, while the slots are found, 9 bytes per changed block more),
besides the old hashes' 9 bytes per changed block.

Concurrency: plain blocking code; the update image runs it in worker threads. `valid`
changes only in `verify` (before the image serves) and `mark_valid` (the image's trio
thread, from what `fill` returned); `read_old` only reads it.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os

import numpy as np

from .devices import BlockDevice, fsync_directory
from .formats.update_diff import DiffFile, hash_block
from .old_hashes import OldBlockHashes

class ScratchCopy:
    """The scratch file of one v1 diff merging into one device (module docstring)."""

    FILL_BATCH = 256      # slots per `fill` call (1 MiB of 4 KiB blocks): a pause point

    def __init__(self, path: str, diff: DiffFile, old_hashes: OldBlockHashes | None = None):
        """Finds the slots: one small read per chunk (its reference header). A slot is
        checked against its block's hash in `old_hashes` (fusesnap.old_hashes); one
        whose hash is not known (or without `old_hashes`) never holds OLD's contents
        as far as this copy can tell. Blocking."""
        self.path = path
        self.block_size = diff.block_size
        dests = diff.changed_blocks()
        referenced = np.zeros(len(dests), dtype=bool)
        for chunk_index in range(diff.n_chunks):
            for first, count in diff.chunk_references(chunk_index):
                referenced[bisect.bisect_left(dests, first):bisect.bisect_left(dests, first + count)] = True
        self.entries = np.flatnonzero(referenced)
        self.blocks = np.frombuffer(dests, dtype=np.dtype(f"u{dests.itemsize}"))[self.entries].astype(np.int64)
        self.old_hashes = old_hashes
        self.valid = bytearray(len(self.blocks))
        self.n_valid = 0
        self.fd = -1

    @property
    def n_slots(self) -> int:
        return len(self.blocks)

    @property
    def size(self) -> int:
        return self.n_slots * self.block_size

    @property
    def complete(self) -> bool:
        return self.n_valid == self.n_slots

    def _holds_old(self, slot: int, block) -> bool:
        """Does `block` (read for this slot) hold OLD's contents of the slot's block?"""
        known = self.old_hashes and self.old_hashes.entry_hash(int(self.entries[slot]))
        return bool(known) and len(block) == self.block_size and hash_block(block) == known

    # -- the file -------------------------------------------------------------------

    def open(self, *, create: bool) -> bool:
        """Open the file (for writing, and created with its whole size allocated, if
        `create`; else read-only), then check every slot it holds. False if there is
        none and `create` is false.
        OSError (ENOSPC: the directory cannot hold it) leaves no new file behind."""
        existed = os.path.exists(self.path)
        if not existed and not create:
            return False
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT if create else os.O_RDONLY, 0o600)
        try:
            if create:
                # All of it now, so that a full disk is one clear error at mount, not a
                # merge stopped half way through the copy.
                os.posix_fallocate(self.fd, 0, max(self.size, 1))
        except BaseException:
            self.close()
            if not existed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            raise
        if existed:
            self.verify()
        return True

    def verify(self) -> int:
        """Check every slot of the file against its hash; returns the number valid. Blocking."""
        self.n_valid = 0
        for slot, _, good in self._checked_slots(self.fd):
            self.valid[slot] = good
            self.n_valid += good
        return self.n_valid

    def _checked_slots(self, fd: int):
        """(slot, its block, whether that holds OLD's contents) for every slot of the
        scratch file open as `fd`, read a batch at a time."""
        bs = self.block_size
        for first in range(0, self.n_slots, self.FILL_BATCH):
            end = min(first + self.FILL_BATCH, self.n_slots)
            data = memoryview(os.pread(fd, (end - first) * bs, first * bs))
            for slot in range(first, end):
                block = data[(slot - first) * bs:(slot - first + 1) * bs]
                yield slot, block, self._holds_old(slot, block)

    def adopt(self, other_path: str) -> None:
        """Take the slots not valid yet from another scratch copy of this diff (the
        same device, opened under another name: `losetup` gave it another number),
        where they hold OLD's contents. Blocking; before the image serves."""
        with open(other_path, "rb") as other:
            for slot, block, good in self._checked_slots(other.fileno()):
                if good and not self.valid[slot]:
                    os.pwrite(self.fd, block, slot * self.block_size)
                    self.mark_valid([slot])

    def fill(self, device: BlockDevice, first: int, end: int) -> tuple[list[int], list[int]]:
        """Copy the device's blocks into the slots in [first, end) not valid yet, where
        the device holds their OLD contents. Returns (slots filled, slots whose block
        holds something else: already overwritten). Blocking; changes no state (the
        caller marks the filled slots with `mark_valid`)."""
        bs, filled, missing = self.block_size, [], []
        for lo, hi in self._invalid_runs(first, end):
            data = memoryview(device.pread((hi - lo) * bs, int(self.blocks[lo]) * bs))
            os.pwrite(self.fd, data, lo * bs)
            for slot in range(lo, hi):
                good = self._holds_old(slot, data[(slot - lo) * bs:(slot - lo + 1) * bs])
                (filled if good else missing).append(slot)
        return filled, missing

    def mark_valid(self, slots: list[int]) -> None:
        for slot in slots:
            if not self.valid[slot]:
                self.valid[slot] = 1
                self.n_valid += 1

    def sync(self) -> None:
        """Make the file and its directory entry durable. Blocking."""
        os.fsync(self.fd)
        fsync_directory(os.path.dirname(self.path))

    def remove(self) -> None:
        """Delete the file (the merge is done, durably). The descriptor stays open: a
        read that had started still finds its references. Blocking."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fsync_directory(os.path.dirname(self.path))

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _invalid_runs(self, first: int, end: int):
        """Maximal [lo, hi) within [first, end) of slots not valid yet whose blocks are
        consecutive (one pread of the device each)."""
        slot = first
        while slot < end:
            if self.valid[slot]:
                slot += 1
                continue
            lo = slot
            slot += 1
            while slot < end and not self.valid[slot] and self.blocks[slot] == self.blocks[slot - 1] + 1:
                slot += 1
            yield lo, slot

    # -- reading references -------------------------------------------------------------

    def read_old(self, device: BlockDevice):
        """`read_old` for `DiffFile.decompress_chunk`: OLD's contents of runs of blocks,
        changed blocks from their valid slots, every other block from the device.
        Per run: one read of the device, then one read of the run's slots (adjacent in
        the file) straight into their places, over the device's blocks."""
        bs = self.block_size
        junk = memoryview(bytearray(bs))   # where a slot not valid is read to

        def read_old(runs: list[tuple[int, int]]) -> bytearray:
            data = bytearray(sum(count for _, count in runs) * bs)
            view = memoryview(data)
            firsts = np.fromiter((first for first, _ in runs), np.int64, len(runs))
            ends = firsts + np.fromiter((count for _, count in runs), np.int64, len(runs))
            at = 0   # in blocks
            for (first, count), lo, hi in zip(runs, np.searchsorted(self.blocks, firsts).tolist(),
                                              np.searchsorted(self.blocks, ends).tolist()):
                device.pread_into(view[at * bs:(at + count) * bs], first * bs)
                if hi > lo:
                    buffers = self._places(view, lo, hi, at - first, junk)
                    if os.preadv(self.fd, buffers, lo * bs) != (hi - lo) * bs:
                        raise OSError(errno.EIO, f"{self.path}: short read of the scratch copy")
                at += count
            return data
        return read_old

    def _places(self, view: memoryview, lo: int, hi: int, shift: int, junk: memoryview) -> list:
        """preadv buffers for slots [lo, hi): each valid slot's block at its place in
        `view` (block b at b + shift), merged where adjacent; `junk` for the others."""
        bs, buffers, start, last = self.block_size, [], -1, -2
        for slot, block in zip(range(lo, hi), self.blocks[lo:hi].tolist()):
            place = block + shift if self.valid[slot] else -1
            if place >= 0 and place == last + 1:
                last = place
                continue
            if start >= 0:
                buffers.append(view[start * bs:(last + 1) * bs])
            if place < 0:
                buffers.append(junk)
            start = last = place
        if start >= 0:
            buffers.append(view[start * bs:(last + 1) * bs])
        return buffers

    def first_needed(self, diff: DiffFile, slots: list[int], from_chunk: int) -> tuple[int, int] | None:
        """(block, chunk) of the first of `slots` that a chunk from `from_chunk` on
        references, or None. Blocking (reads the chunks' reference headers)."""
        wanted = np.sort(self.blocks[slots]) if slots else np.zeros(0, np.int64)
        if not len(wanted):
            return None
        for chunk_index in range(from_chunk, diff.n_chunks):
            for first, count in diff.chunk_references(chunk_index):
                at = np.searchsorted(wanted, first)
                if at < len(wanted) and wanted[at] < first + count:
                    return int(wanted[at]), chunk_index
        return None
