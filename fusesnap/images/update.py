"""`system.img`: the update overlay (after dm-update).

The system device as it will be after an update: blocks the diff changes come from
the diff, every other block from the device, while a background task merges the
diff into the device. When the merge is complete the device *is* the new image.

State (plain attributes, see `UpdateImage.__init__`):
  pending        RangeMap block -> (chunk_index, delta): blocks whose new data must
                 still come from the diff; block b sits at offset b - delta of its
                 chunk. Runs of consecutive blocks in one chunk are one range.
  merged_chunks  chunks [0, merged_chunks) are written to the device (directory
                 order); their blocks are no longer in `pending`.
  state          merging | paused | done | disabled | error

Concurrency: everything runs on the trio thread except the blocking work handed to
worker threads (reading and decompressing chunks, writing and fsyncing the device),
which never touches `pending`. `pending` changes only in `_merged()`, with no await.

Before the first write (`resume_point`): the diff must fit the device (no smaller
than NEW), and the source check (`check_source`) proves that every block the diff
changes holds its old or its new contents, against the hashes of the diff's
identification trailer (for a v1 diff whose trailer hashes OLD per chunk, also
against the per-block old hashes its merge records before its first write:
fusesnap.old_hashes); a device that fails is refused untouched. The check also
says where to resume: merging is idempotent (a block's new data is the same
whenever it is written, and until a chunk is merged its blocks are read from the
diff, never from the device), so once every block is old or new, merging from any
chunk is safe, and leading chunks that are wholly new are skipped.

A version 1 diff (chunks compressed against OLD's blocks, fusesnap.formats.update_diff)
is merged with a scratch copy of the changed blocks its chunks reference
(fusesnap.merge_scratch: `open_scratch`, `prepare_scratch` at mount, `_copy_scratch`
before the merge's first write; the orderings are commented there): references are
read from it where they are changed blocks, from the device elsewhere. Served
without merging and without a scratch copy, they are read from the device
(`old_blocks_on`), which holds OLD's contents as long as nothing merged.

Crash safety: the merge writes a chunk's blocks only after the whole chunk
decompressed and passed its checks (its hash in the identification trailer, the
zstd content checksum, the frame's size), and every read of the diff checks the
file was not changed since it was opened, so the device never holds new data from
a bad or rewritten chunk. Progress (`MergeProgress`, in the state directory, keyed
by the diff's content and the device's identity) is saved only after an fsync of
the device, so it never claims more than is durable; after a failed fsync it is
never saved again by this server (`_persist`).
"""

from __future__ import annotations

import argparse
import collections
import errno
import glob
import json
import logging
import os
import stat
import time
from typing import TYPE_CHECKING

import trio

from .. import arguments
from ..control import read_status, require_image, send_command
from ..devices import BlockDevice, replace_durably
from ..diffing import open_diff
from ..errors import EXIT_FAILED, EXIT_USAGE, UserError
from ..formats.update_diff import (BLOCK_HASH_SIZE, VERSION_REFERENCING, DiffFile,
                                   DiffFormatError, ReferencesNotOld, hash_block, hash_chunk)
from ..old_hashes import OldBlockHashes
from ..rangemap import RangeMap
from .base import Image

if TYPE_CHECKING:   # imported where a v1 merge needs it: its numpy costs every command ~0.2 s
    from ..merge_scratch import ScratchCopy

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/fusesnap"
PERSIST_INTERVAL = 3.0          # seconds between progress checkpoints while merging
# Chunks merged at once, in worker threads (the image's limiter allows 2): one
# decompresses while the other's blocks and references are read and written.
# Merging the binary pair's v1 diff in process, three paired runs against one chunk
# at a time on the loaded 2-core machine: 1.7, 1.5 and 1.0 times as fast.
MERGE_DEPTH = 2
# Decompressed chunks kept for reads. A random read of a changed block outside the
# cache decompresses its whole chunk (512 KiB by default: 1-2 ms), so the cache should
# hold the diff's hot set; 256 MiB holds every changed block of a 1 GiB image with a
# quarter of its blocks changed. Memory is only taken as chunks are read.
DEFAULT_CACHE_MIB = 256


class ChunkCache:
    """LRU of decompressed chunks. Concurrent reads of one chunk share one
    decompression, which runs in a worker thread."""

    def __init__(self, diff: DiffFile, capacity_bytes: int, limiter: trio.CapacityLimiter,
                 read_old=None):
        """`read_old`: where a version 1 chunk's references are read (`old_blocks_on`)."""
        self.diff = diff
        self.read_old = read_old
        chunk_bytes = diff.chunk_blocks * diff.block_size
        self.capacity = max(16, capacity_bytes // max(1, chunk_bytes))  # in chunks, at least 16
        self.limiter = limiter
        self._chunks: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._loading: dict[int, trio.Event] = {}
        self.merged: set[int] = set()

    def _load(self, chunk_index: int) -> bytes:
        return self.diff.decompress_chunk(chunk_index, self.diff.read_chunk_raw(chunk_index),
                                          self.read_old)

    def forget(self, chunk_index: int) -> None:
        """The chunk is merged: its blocks are read from the device now."""
        self.merged.add(chunk_index)
        self._chunks.pop(chunk_index, None)

    async def get(self, chunk_index: int) -> bytes:
        while True:
            data = self._chunks.get(chunk_index)
            if data is not None:
                self._chunks.move_to_end(chunk_index)
                return data
            loading = self._loading.get(chunk_index)
            if loading is None:
                break
            await loading.wait()  # then look again: loaded, or failed (and we retry)
        done = self._loading[chunk_index] = trio.Event()
        try:
            data = await trio.to_thread.run_sync(self._load, chunk_index, limiter=self.limiter)
        finally:
            del self._loading[chunk_index]
            done.set()
        if chunk_index in self.merged:
            return data  # merged while we decompressed: the device serves it from now on
        self._chunks[chunk_index] = data
        if len(self._chunks) > self.capacity:
            self._chunks.popitem(last=False)
        return data


def old_blocks_on(device: BlockDevice, block_size: int):
    """`read_old` for `DiffFile.decompress_chunk`: a version 1 chunk's references read
    from the device. Right only while the device holds OLD's contents there (nothing
    merged: a merge reads them through its scratch copy); the chunk's reference hash
    catches any other case. Blocking."""
    def read_old(runs: list[tuple[int, int]]) -> bytes:
        data = bytearray(sum(count for _, count in runs) * block_size)
        view, at = memoryview(data), 0
        for first, count in runs:
            device.pread_into(view[at:at + count * block_size], first * block_size)
            at += count * block_size
        return bytes(data)
    return read_old


def device_identity(device: BlockDevice) -> str:
    """What the device is, whatever name reached it (a symlink, /dev/disk/by-uuid/...):
    the device number of a block device, the filesystem and inode of a file."""
    st = os.fstat(device.fd)
    if stat.S_ISBLK(st.st_mode):
        return f"blk-{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return f"file-{st.st_dev:x}-{st.st_ino}"


class MergeProgress:
    """The persisted merge progress of one diff into one device, in the state directory:
    `STATE_DIR/update/<diff fingerprint>.<device identity>.json`.

    Keyed by what the diff is (its content fingerprint, chunk hashes included) and what
    the device is (`device_identity`), so a copied or touched diff, another name for
    the device, and one diff merging into several devices at once all find their own
    progress. Written with write-temp (a name unique to this writer), fsync, rename,
    fsync-directory, so after a crash it is either the old or the new version. Progress
    is a hint to skip work: the source check (`check_source`) decides what is safe.
    """

    def __init__(self, state_dir: str, fingerprint: str, device: BlockDevice, diff_path: str):
        self.identity = {"diff": fingerprint, "device": device_identity(device),
                         "device_size": device.size}
        self.directory = os.path.join(state_dir, "update")
        self.path = os.path.join(self.directory, f"{fingerprint}.{self.identity['device']}.json")
        self.names = {"diff_path": diff_path, "device_path": device.path}  # for people
        self.scratch_path = os.path.join(self.directory,
                                         f"{fingerprint}.{self.identity['device']}.scratch")
        # OLD's hashes depend on the diff alone: one record for every device
        self.old_hashes_path = os.path.join(self.directory, f"{fingerprint}.oldhashes")
        # A version 1 merge's scratch copy is complete and durable (merge_scratch.py):
        # loaded, and saved from then on.
        self.scratch_complete = False

    def load(self) -> int:
        """Chunks already merged (0 if no usable progress is saved); sets
        `scratch_complete` to what the progress says."""
        try:
            with open(self.path) as f:
                saved = json.load(f)
            merged = saved["merged_chunks"]
            if saved["identity"] != self.identity or not isinstance(merged, int) or merged < 0:
                raise ValueError(f"not the progress of this diff and device: {saved!r}")
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unusable merge progress %s (%s)", self.path, exc)
            return 0
        self.scratch_complete = saved.get("scratch_complete") is True
        return merged

    def save(self, merged_chunks: int) -> None:
        """Blocking. The caller has fsync'ed the device first."""
        os.makedirs(self.directory, exist_ok=True)
        replace_durably(self.path, json.dumps({"identity": self.identity, **self.names,
                                               "merged_chunks": merged_chunks,
                                               "scratch_complete": self.scratch_complete}).encode())


def check_source(diff: DiffFile, device: BlockDevice, read_old=None,
                 old_hashes: OldBlockHashes | None = None) -> int:
    """Before the first write: every block the diff changes must hold its old or its
    new contents (a partly merged device is fine). Returns how many leading chunks hold
    their new contents entirely (those need no merging); UserError naming the first
    block that holds neither. Blocking.

    A block's old contents are checked against its hash: from `old_hashes` if given
    (fusesnap.old_hashes), else from the diff's trailer (versions 1 and 2). A version 3
    trailer has one old hash per chunk: a chunk that matches it is wholly old, and
    its blocks' hashes are learned into `old_hashes`; a block of a chunk that is
    neither wholly old nor wholly new needs its hash from `old_hashes` (recorded
    before a merge wrote into that chunk).

    Cost: one read of the changed blocks (the next chunk's are read ahead while this
    one is hashed), and per chunk one or two hashes: of each
    block (against the old contents' hashes) or of the whole chunk (against the new
    contents' hash), whichever its first block suggests. Only a chunk that is neither
    wholly old nor wholly new (a merge was interrupted in it) or does not hold what it
    should is decompressed and compared block by block, with its references from
    `read_old` (a v1 merge's `ScratchCopy.read_old`; default: the device).
    """
    bs = diff.block_size
    per_chunk = not diff.identification.block_hash_size   # trailer version 3
    leading_new = 0
    next_runs = list(diff.chunk_runs(0)) if diff.n_chunks else []
    for chunk_index in range(diff.n_chunks):
        runs = next_runs
        if chunk_index + 1 < diff.n_chunks:
            # Let the device read the next chunk's blocks while we hash this one's.
            next_runs = list(diff.chunk_runs(chunk_index + 1))
            for dest, n_blocks, _ in next_runs:
                os.posix_fadvise(device.fd, dest * bs, n_blocks * bs, os.POSIX_FADV_WILLNEED)
        data = _read_chunk_blocks(device, runs, bs)
        blocks = [memoryview(data)[i:i + bs] for i in range(0, len(data), bs)]
        first, end = diff.entry_range_of_chunk(chunk_index)
        if per_chunk:
            if hash_chunk(data) == diff.identification.old_chunk_hash(chunk_index):
                if old_hashes is not None:
                    old_hashes.learn(first, b"".join(map(hash_block, blocks)))
                continue   # wholly old
            old_block_hashes = old_hashes.of_entries(first, end) if old_hashes else None
        else:
            old_block_hashes = (old_hashes.of_entries(first, end) if old_hashes
                                else diff.old_block_hashes(chunk_index))
            if (hash_block(blocks[0]) == old_block_hashes[:BLOCK_HASH_SIZE]
                    and b"".join(map(hash_block, blocks)) == old_block_hashes):
                continue   # wholly old
        if _holds_new_chunk(diff, chunk_index, runs, data):
            leading_new += leading_new == chunk_index
            continue
        try:
            new_data = diff.decompress_chunk(chunk_index, diff.read_chunk_raw(chunk_index),
                                             read_old or old_blocks_on(device, bs))
            unknown = ""
        except ReferencesNotOld:   # a v1 chunk whose OLD data is gone: no block can be new
            new_data = None
            unknown = (" (nor can its new contents be made: the OLD data its chunk is "
                       "compressed against is gone too, with a scratch copy if a merge had one)")
        block_index = 0
        for dest, n_blocks, first_offset in runs:
            for i in range(n_blocks):
                block = blocks[block_index]
                old_hash = (old_block_hashes[block_index * BLOCK_HASH_SIZE:(block_index + 1) * BLOCK_HASH_SIZE]
                            if old_block_hashes is not None else None)
                block_index += 1
                new_at = (first_offset + i) * bs
                if hash_block(block) == old_hash or (new_data is not None
                                                     and block == new_data[new_at:new_at + bs]):
                    continue
                if old_block_hashes is None:   # only the chunk's blocks together are known
                    what = (f"chunk {chunk_index} (from block {runs[0][0]}) holds neither its "
                            f"old nor its new contents{unknown}: block {dest + i} is not new, "
                            "and the diff hashes the chunk's old contents together (no merge "
                            "recorded them block by block, which would tell a half-merged "
                            "chunk's blocks apart)")
                else:
                    what = (f"block {dest + i} (byte {(dest + i) * bs}) holds neither its old "
                            f"nor its new contents{unknown}")
                raise UserError(f"{device.path} is not what {diff.path} updates: {what}; "
                                "nothing was written (--no-verify-source skips this check)")
    return leading_new


def record_old_hashes(diff: DiffFile, device: BlockDevice, old_hashes: OldBlockHashes,
                      from_chunk: int) -> None:
    """Without the source check: learn the old hashes of the blocks of chunks from
    `from_chunk` on that are wholly old on the device and not known yet (a version 3
    trailer). Chunks that are not are trusted, as the user asked, and learn nothing.
    Blocking: reads those chunks' blocks once."""
    bs = diff.block_size
    for chunk_index in range(from_chunk, diff.n_chunks):
        first, end = diff.entry_range_of_chunk(chunk_index)
        if old_hashes.of_entries(first, end) is not None:
            continue
        data = _read_chunk_blocks(device, diff.chunk_runs(chunk_index), bs)
        if hash_chunk(data) == diff.identification.old_chunk_hash(chunk_index):
            old_hashes.learn(first, b"".join(hash_block(memoryview(data)[i:i + bs])
                                             for i in range(0, len(data), bs)))


def _read_chunk_blocks(device: BlockDevice, runs, block_size: int) -> bytearray:
    """A chunk's blocks as the device holds them, in directory order."""
    runs = list(runs)
    data = bytearray(sum(n_blocks for _, n_blocks, _ in runs) * block_size)
    at = 0
    for dest, n_blocks, _ in runs:
        device.pread_into(memoryview(data)[at:at + n_blocks * block_size], dest * block_size)
        at += n_blocks * block_size
    return data


def _holds_new_chunk(diff: DiffFile, chunk_index: int, runs, data: bytearray) -> bool:
    """Is `data` (the chunk's blocks read from the device, in directory order) the
    chunk's new contents? Without decompressing: when the chunk holds its blocks in
    directory order (as `fusesnap diff` writes them), its hash covers exactly them."""
    position = 0
    for _, n_blocks, first_offset in runs:
        if first_offset != position:
            return False
        position += n_blocks
    return hash_chunk(data) == diff.identification.chunk_hash(chunk_index)


class UpdateImage(Image):
    target = "update"
    status_line_keys = ("merged", "total", "state")
    control_verbs = ("update",)
    handover_versions = (2, 1)   # 2: scratch_ready

    def __init__(self, device: BlockDevice, diff: DiffFile, progress: MergeProgress, *,
                 merged_chunks: int = 0, saved_chunks: int = 0, background_merge: bool = True,
                 merge_rate: float = 0.0, cache_bytes: int = DEFAULT_CACHE_MIB << 20,
                 scratch: ScratchCopy | None = None, scratch_ready: bool = False,
                 name: str = "system.img"):
        """Chunks [0, merged_chunks) are on the device (`resume_point`); the progress
        file says [0, saved_chunks) are. A version 1 diff's references are read
        through `scratch` if given (merge_scratch.py); `scratch_ready`: it holds every
        reference the merge still needs, durably, so the merge may write."""
        super().__init__(name, device.size, read_only=True)
        self.device = device
        self.diff = diff
        self.block_size = diff.block_size
        self.progress = progress
        self.merged_chunks = merged_chunks
        # Chunks known durable on the device: what the next progress save can skip,
        # and where reads fall back to if an fsync fails.
        self.persisted_chunks = min(saved_chunks, merged_chunks)
        self.fsync_failed = False  # once true, this server never saves progress again
        # Runs come sorted and maximal, so this bulk-loads. No value index: values
        # are nearly all distinct.
        self.pending = RangeMap.from_ranges(
            ((dest, dest + n_blocks, (chunk_index, dest - first_offset))
             for dest, n_blocks, chunk_index, first_offset in diff.runs()
             if chunk_index >= self.merged_chunks),
            index_values=False)
        self.merged_blocks = self._blocks_before(self.merged_chunks)
        self.merge_rate = merge_rate  # bytes of changed blocks per second; 0 = unlimited
        self.limiter = trio.CapacityLimiter(2)
        self.scratch = scratch
        self.scratch_ready = scratch_ready
        self.read_old = (scratch.read_old(device) if scratch is not None
                         else old_blocks_on(device, diff.block_size))
        self.cache = ChunkCache(diff, cache_bytes, self.limiter, self.read_old)
        self.error: str | None = None
        self.last_read = -1.0  # trio clock of the latest read: the merge yields to reads
        self.unpaused = trio.Event()
        self.unpaused.set()
        if self.merged_chunks == diff.n_chunks:
            self.state = "done"
        else:
            self.state = "merging" if background_merge else "disabled"

    def _blocks_before(self, chunk_index: int) -> int:
        """Changed blocks in chunks [0, chunk_index)."""
        if chunk_index < self.diff.n_chunks:
            return self.diff.entry_range_of_chunk(chunk_index)[0]
        return self.diff.total_blocks

    # -- reads --------------------------------------------------------------------

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        self.last_read = trio.current_time()
        if not self.pending:
            return self.device.pread(end - offset, offset)
        bs = self.block_size
        # A list, not the live iterator: the merge may change `pending` while we await.
        from_diff = self.pending.overlapping(offset // bs, (end - 1) // bs + 1)
        if not from_diff:
            return self.device.pread(end - offset, offset)
        # One pread for the whole request, then the diff's blocks laid over it: far
        # cheaper than a pread per gap when changed blocks are scattered.
        data = bytearray(end - offset)
        self.device.pread_into(data, offset)
        for first_block, end_block, (chunk_index, delta) in from_diff:
            lo, hi = max(offset, first_block * bs), min(end, end_block * bs)
            try:
                chunk = await self.cache.get(chunk_index)
            except DiffFormatError as exc:
                self._fail(f"{self.diff.path}: {exc}")
                raise OSError(errno.EIO, str(exc)) from None
            at = (first_block - delta) * bs + (lo - first_block * bs)
            data[lo - offset:hi - offset] = chunk[at:at + hi - lo]
        return data

    # -- the background merge -----------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        # A paused merge waits in its task; a done one may still have a scratch
        # copy to drop once its progress says done.
        if self.state in ("merging", "paused") or (self.state == "done" and self.scratch_ready):
            nursery.start_soon(self._merge_or_fail)

    async def _merge_or_fail(self) -> None:
        """The merge task: whatever goes wrong stops the merge, never the mount."""
        try:
            await self._merge()
        except DiffFormatError as exc:
            self._fail(f"merge stopped: {self.diff.path}: {exc}")
        except OSError as exc:
            self._fail(f"merge stopped: {exc}")
        except Exception as exc:
            log.exception("%s: merge failed unexpectedly", self.name)
            self._fail(f"merge stopped: {exc!r}")

    async def _merge(self) -> None:
        if self.scratch is not None and not self.scratch_ready:
            if not await self._copy_scratch():
                return
        log.info("%s: merging %s into %s from chunk %d of %d", self.name, self.diff.path,
                 self.device.path, self.merged_chunks, self.diff.n_chunks)
        last_persist = trio.current_time()
        while self.merged_chunks < self.diff.n_chunks:
            if not await self._wait_while_paused():
                await self._persist()
                return
            depth = 1 if self.merge_rate else MERGE_DEPTH   # a limited merge needs no speed
            chunk_indexes = range(self.merged_chunks,
                                  min(self.merged_chunks + depth, self.diff.n_chunks))
            started = trio.current_time()
            written = await self._write_chunks(chunk_indexes)
            for chunk_index in chunk_indexes:
                self._merged(chunk_index)
            if trio.current_time() - last_persist >= PERSIST_INTERVAL:
                await self._persist()
                last_persist = trio.current_time()
            if self.merge_rate:
                await trio.sleep_until(started + written / self.merge_rate)
            elif self.last_read >= started:
                # Foreground reads came in meanwhile: give them as much time as this
                # chunk took, so they keep at least about half their speed.
                await trio.sleep(trio.current_time() - started)
            else:
                await trio.sleep(0)  # let waiting requests in between chunks
        await self._persist()
        self.state = "done"
        log.info("%s: merge complete (%d blocks)", self.name, self.merged_blocks)
        if self.scratch is not None and self.persisted_chunks == self.diff.n_chunks:
            # Order: only once the progress file says every chunk is merged (durably:
            # _persist fsynced the device, then saved it) is the scratch copy dropped;
            # a crash before that finds it and needs it no more.
            await trio.to_thread.run_sync(self.scratch.remove, limiter=self.limiter)

    async def _wait_while_paused(self) -> bool:
        """False if the merge must stop (a read found a bad chunk)."""
        while not self.unpaused.is_set():  # a loop: pause/resume/pause replaces the event
            await self._persist()  # progress is saved at every pause
            await self.unpaused.wait()
        return self.state != "error"

    async def _copy_scratch(self) -> bool:
        """Before the merge's first write: copy the old contents of every changed block
        a chunk references into the scratch file (merge_scratch.py), make it durable,
        and say so in the progress. False if the merge must stop; OSError if a write
        or fsync of the scratch file failed (then nothing claims it complete)."""
        scratch, bs = self.scratch, self.block_size
        log.info("%s: copying %d referenced blocks of %s to %s", self.name,
                 scratch.n_slots - scratch.n_valid, self.device.path, scratch.path)
        lost = []
        for first in range(0, scratch.n_slots, scratch.FILL_BATCH):
            if not await self._wait_while_paused():
                return False
            started = trio.current_time()
            end = min(first + scratch.FILL_BATCH, scratch.n_slots)
            filled, missing = await trio.to_thread.run_sync(scratch.fill, self.device, first,
                                                            end, limiter=self.limiter)
            scratch.mark_valid(filled)
            lost += missing
            if self.merge_rate:
                await trio.sleep_until(started + (len(filled) + len(missing)) * bs / self.merge_rate)
            else:
                await trio.sleep(0)
        problem = await trio.to_thread.run_sync(scratch.first_needed, self.diff, lost,
                                                self.merged_chunks, limiter=self.limiter)
        if problem:
            self._fail(scratch_lost(problem, self.device.path, scratch.path))
            return False
        # Order: the scratch file and its directory entry are durable before the
        # progress says the copy is complete, and that before the first write to the
        # device (the caller's loop). A crash before the save leaves a device untouched
        # and a copy that the next mount checks slot by slot and finishes; a failed
        # fsync raises here, so nothing claims the copy, and the device is never written.
        await trio.to_thread.run_sync(scratch.sync, limiter=self.limiter)
        if not self.progress.scratch_complete and not self.fsync_failed:
            self.progress.scratch_complete = True
            await trio.to_thread.run_sync(self.progress.save, self.persisted_chunks,
                                          limiter=self.limiter)
        self.scratch_ready = True
        return True

    async def _write_chunks(self, chunk_indexes: range) -> int:
        """Merge these chunks at once, one worker thread each (merging is order-free:
        they are marked merged, in order, only once all are written). Bytes written;
        the first failure is raised as itself."""
        written = []

        async def write(chunk_index: int) -> None:
            written.append(await trio.to_thread.run_sync(self._write_chunk, chunk_index,
                                                         limiter=self.limiter))
        try:
            async with trio.open_nursery() as nursery:
                for chunk_index in chunk_indexes:
                    nursery.start_soon(write, chunk_index)
        except BaseExceptionGroup as group:
            failures = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
            if failures:
                raise failures[0] from None
            raise
        return sum(written)

    def _write_chunk(self, chunk_index: int) -> int:
        """Worker thread: decompress a whole chunk (checksum verified), then write its
        blocks. Nothing is written unless the whole chunk is good."""
        data = self.diff.decompress_chunk(chunk_index, self.diff.read_chunk_raw(chunk_index),
                                          self.read_old)
        bs, written = self.block_size, 0
        for dest, n_blocks, first_offset in self.diff.chunk_runs(chunk_index):
            self.device.pwrite(memoryview(data)[first_offset * bs:(first_offset + n_blocks) * bs],
                               dest * bs)
            written += n_blocks * bs
        return written

    def _merged(self, chunk_index: int) -> None:
        """The chunk's blocks are in the device (its page cache, coherent for our reads):
        serve them from there from now on. No await: atomic for concurrent reads."""
        for dest, n_blocks, _ in self.diff.chunk_runs(chunk_index):
            self.pending.clear(dest, dest + n_blocks)
        first, end = self.diff.entry_range_of_chunk(chunk_index)
        self.merged_blocks += end - first
        self.merged_chunks = chunk_index + 1
        self.cache.forget(chunk_index)

    def _unmerge_since(self, chunk_index: int) -> None:
        """Serve chunks [chunk_index, merged_chunks) from the diff again: their blocks
        may not have reached the device. No await: atomic for concurrent reads."""
        for c in range(chunk_index, self.merged_chunks):
            for dest, n_blocks, first_offset in self.diff.chunk_runs(c):
                self.pending.assign(dest, dest + n_blocks, (c, dest - first_offset))
            self.cache.merged.discard(c)
        self.merged_chunks = chunk_index
        self.merged_blocks = self._blocks_before(chunk_index)

    async def _persist(self) -> None:
        """Make the merged chunks durable, then say so in the progress file.

        The rule for every image that persists state after an fsync (DEVELOPERS.md):
        once an fsync of the device failed, Linux has reported that writeback error
        and a later fsync returns 0 although the data never arrived. So the first
        failure ends persisting for the life of this server, and the chunks merged
        since the last saved progress are read from the diff again.
        """
        merged_chunks = self.merged_chunks
        if self.fsync_failed or merged_chunks == self.persisted_chunks:
            return
        try:
            await trio.to_thread.run_sync(self.device.fsync, limiter=self.limiter)
        except OSError as exc:
            self.fsync_failed = True
            self._unmerge_since(self.persisted_chunks)
            self._fail(f"fsync of {self.device.path} failed ({exc.strerror or exc}): "
                       f"merge stopped, no more progress is saved by this mount, and "
                       f"system.img reads chunks {self.persisted_chunks} on from the diff")
            raise
        # Order matters: the device's merged blocks are durable before the progress
        # file says they are merged; a crash in between only repeats work.
        await trio.to_thread.run_sync(self.progress.save, merged_chunks, limiter=self.limiter)
        self.persisted_chunks = merged_chunks

    def _fail(self, reason: str) -> None:
        """Stop the merge in state error. The first reason stays: it is the cause."""
        if self.state != "error":
            log.error("%s: %s", self.name, reason)
            self.error = reason
        self.state = "error"
        self.unpaused.set()

    # -- control, status, teardown -----------------------------------------------

    def control(self, verb: str, args: list[str]) -> str:
        if args == ["resume"] and why_not_resumable(self.state, self.error):
            raise ValueError(why_not_resumable(self.state, self.error))
        if args == ["pause"]:
            if self.state == "merging":
                self.state = "paused"
                self.unpaused = trio.Event()
        elif args == ["resume"]:
            if self.state == "paused":
                self.state = "merging"
                self.unpaused.set()
        else:
            raise ValueError(f"update takes pause or resume, not {' '.join(args)!r}")
        return self.state

    def status(self) -> dict:
        return {"merged": self.merged_blocks, "total": self.diff.total_blocks, "state": self.state,
                "diff": self.diff.path, "device": self.device.path, "error": self.error,
                "progress": self.progress.path,
                "scratch": self.scratch.path if self.scratch is not None else None,
                "scratch_ready": self.scratch_ready}

    # -- live upgrade ----------------------------------------------------------------

    def handover_fds(self) -> dict[str, int]:
        return {self.device.path: self.device.fd}

    def handover_state(self) -> dict:
        """Where the merge stands. The successor opened the image from the persisted
        progress (at most PERSIST_INTERVAL behind) and catches up from here."""
        return {**super().handover_state(), "device": self.device.path, "diff": self.diff.path,
                "merged_chunks": self.merged_chunks, "state": self.state, "error": self.error,
                "fsync_failed": self.fsync_failed, "scratch_ready": self.scratch_ready,
                "scratch_valid": self.scratch.n_valid if self.scratch is not None else 0}

    def restore_handover_state(self, state: dict) -> None:
        self.check_handover_state(state)
        if (state["device"], state["diff"]) != (self.device.path, self.diff.path):
            raise ValueError(f"{self.name}: handed over for {state['device']} with "
                             f"{state['diff']}, but opened {self.device.path} with {self.diff.path}")
        merged_chunks = state["merged_chunks"]
        if state.get("scratch_ready") and not self.scratch_ready and merged_chunks < self.diff.n_chunks:
            # The old server finished the scratch copy after we opened it: read it
            # again (in the catch-up before the pause, as a rule). A merge that is
            # done needs none.
            if self.scratch is None or self.scratch.verify() < state["scratch_valid"]:
                raise ValueError(f"{self.name}: handed over with the scratch copy complete, "
                                 f"but {self.progress.scratch_path} does not hold it")
            self.scratch_ready = True
        if not self.merged_chunks <= merged_chunks <= self.diff.n_chunks:
            raise ValueError(f"{self.name}: handed over with {merged_chunks} merged chunks, "
                             f"but {self.merged_chunks} are persisted or merged, of {self.diff.n_chunks}")
        # The chunks merged since the last persist are on the device (its page cache,
        # shared with the old server): serve them from there, as the old server did.
        for chunk_index in range(self.merged_chunks, merged_chunks):
            self._merged(chunk_index)
        self.state, self.error = state["state"], state["error"]
        # After a failed fsync the old server saved no more progress; nor may we (the
        # error was reported once, on the descriptor we now share).
        self.fsync_failed = state.get("fsync_failed", False)
        if self.state == "paused":
            self.unpaused = trio.Event()

    async def close(self) -> None:
        try:
            if self.state != "disabled":
                await self._persist()
        finally:
            self.diff.close()
            self.device.close()
            if self.scratch is not None:
                self.scratch.close()


def scratch_lost(needed: tuple[int, int], device_path: str, scratch_path: str) -> str:
    block, chunk_index = needed
    return (f"block {block}, which chunk {chunk_index} needs, holds neither its old contents on "
            f"{device_path} nor in the scratch copy {scratch_path} (lost or damaged after the "
            "merge overwrote the block): the merge cannot go on; nothing more was written")


def add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("update overlay (system.img)")
    group.add_argument("--system", metavar="DEV", type=arguments.device,
                       help="the system device the update applies to")
    group.add_argument("--diff", metavar="DIFF", type=arguments.path,
                       help="the update diff made by `fusesnap diff`")
    group.add_argument("--no-bg-update", action="store_true",
                       help="serve system.img from the diff without merging it into DEV")
    group.add_argument("--merge-rate", type=arguments.positive_number, default=0.0, metavar="MB/s",
                       help="limit the background merge to this many MB/s of changed blocks, "
                       "a number > 0 (default: unlimited; to stop the merge, use "
                       "`fusesnap update pause`)")
    group.add_argument("--cache-mib", type=arguments.positive_int, default=DEFAULT_CACHE_MIB,
                       metavar="MIB", help=f"cache of decompressed chunks (default "
                       f"{DEFAULT_CACHE_MIB} MiB, at least 16 chunks)")
    group.add_argument("--state-dir", type=arguments.path, default=DEFAULT_STATE_DIR,
                       metavar="DIR", help="where merge progress is kept, one file per diff and "
                       f"device (default {DEFAULT_STATE_DIR})")
    group.add_argument("--no-verify-source", action="store_true",
                       help="skip the check that every block the diff changes holds its old or "
                       "new contents (it reads each changed block of DEV once)")


USAGE_EXAMPLES = """\
  fusesnap diff old.img new.img -o update.diff                # on the build machine
  fusesnap mount mnt --system /dev/sda1 --diff update.diff    # mnt/system.img reads as new.img
  losetup --find --show --read-only mnt/system.img            # while the diff merges into sda1
  fusesnap update wait mnt                                    # until the merge is done"""


def add_commands(commands) -> None:
    p = commands.add_parser(
        "update", help="pause, resume or wait for the background merge of system.img",
        description="Pause or resume the background merge of system.img, or wait until it "
        "is done (a progress bar on a terminal; exit status 1 if the merge stops in error).")
    p.add_argument("action", choices=("pause", "resume", "wait"))
    p.add_argument("mountpoint", metavar="MOUNTPOINT", type=arguments.path)
    p.set_defaults(run=cmd_update)


def why_not_resumable(state: str, error: str | None) -> str | None:
    """Why `update resume` can do nothing for a merge in `state`, or None."""
    if state == "disabled":
        return "the merge is disabled (mounted with --no-bg-update)"
    if state == "error":
        return f"the merge stopped in error: {error}"
    return None


def cmd_update(args) -> int:
    require_image(args.mountpoint, "update", "mount it with --system and --diff")
    if args.action == "wait":
        return wait_for_merge(args.mountpoint)
    if args.action == "resume":
        images = json.loads(read_status(args.mountpoint, True))["images"]
        for name, figures in images.items():
            reason = figures["target"] == "update" and why_not_resumable(figures["state"],
                                                                         figures["error"])
            if reason:
                raise UserError(f"{name}: cannot resume: {reason}", EXIT_FAILED)
    send_command(args.mountpoint, f"update {args.action}")
    return 0


WAIT_POLL_SECONDS = 0.5


def wait_for_merge(mountpoint: str) -> int:
    """Block until system.img's merge is done; exit status 1 (UserError) with the
    reason if it stops in error, is not running, or the mount goes away. Progress
    (blocks merged, rate, time left) is a tqdm bar on a terminal, nothing otherwise."""
    from tqdm import tqdm  # here: importing it costs every other command ~0.1 s
    with tqdm(unit=" blocks", disable=None, dynamic_ncols=True) as bar:  # None: only on a terminal
        while True:
            try:
                images = json.loads(read_status(mountpoint, True))["images"]
            except UserError:
                raise UserError(f"{mountpoint} went away before the merge was done",
                                EXIT_FAILED) from None
            name, figures = next((name, figures) for name, figures in images.items()
                                 if figures["target"] == "update")
            bar.total = figures["total"]
            bar.update(figures["merged"] - bar.n)
            bar.set_postfix_str(figures["state"])
            if figures["state"] == "done":
                return 0
            if figures["state"] == "error":
                raise UserError(f"{name}: {figures['error']}", EXIT_FAILED)
            if figures["state"] == "disabled":
                raise UserError(f"{name} does not merge (mounted with --no-bg-update)", EXIT_FAILED)
            time.sleep(WAIT_POLL_SECONDS)


def resume_point(diff: DiffFile, device: BlockDevice, progress: MergeProgress, *,
                 verify_source: bool, read_old=None,
                 old_hashes: OldBlockHashes | None = None) -> tuple[int, int]:
    """(chunks on the device already, chunks the saved progress counts), checking the
    device first (`check_source`, given `read_old` and `old_hashes`).

    With the source check, the device itself says: the check proves every changed
    block holds its old or new contents, so merging from any chunk is safe, and the
    leading chunks that are wholly new need no merging, whatever progress was saved
    (or lost, or kept elsewhere). Without it, the saved progress counts, after checking
    that its last merged chunk really is on the device.
    """
    saved = min(progress.load(), diff.n_chunks)
    if verify_source:
        on_device = check_source(diff, device, read_old, old_hashes)
        if saved > on_device:
            log.warning("%s says %d chunks are merged, but chunk %d of %s is not wholly on "
                        "%s: merging again from there", progress.path, saved, on_device,
                        diff.path, device.path)
        return on_device, saved
    if saved and not _chunk_is_on_device(diff, device, saved - 1, read_old):
        raise UserError(f"{progress.path} says {saved} chunks of {diff.path} are merged into "
                        f"{device.path}, but chunk {saved - 1} is not on it: the device changed "
                        "behind the merge's back (mount without --no-verify-source to let the "
                        "device be checked)")
    return saved, saved


def _chunk_is_on_device(diff: DiffFile, device: BlockDevice, chunk_index: int,
                        read_old=None) -> bool:
    """Does the device hold this chunk's new blocks?"""
    bs = diff.block_size
    data = diff.decompress_chunk(chunk_index, diff.read_chunk_raw(chunk_index),
                                 read_old or old_blocks_on(device, bs))
    return all(device.pread(n_blocks * bs, dest * bs)
               == data[first_offset * bs:(first_offset + n_blocks) * bs]
               for dest, n_blocks, first_offset in diff.chunk_runs(chunk_index))


def images_from_args(args: argparse.Namespace) -> list[Image]:
    if not args.system and not args.diff:
        return []
    if not (args.system and args.diff):
        raise UserError("--system DEV and --diff DIFF go together")
    # Absolute: the server leaves the current directory.
    diff = open_diff(os.path.abspath(args.diff), bad_diff_status=EXIT_USAGE)
    device = scratch = None
    try:
        device = BlockDevice(args.system, read_only=args.no_bg_update)
        try:
            diff.check_device(device.size, device.logical_block_size)
        except DiffFormatError as exc:
            raise UserError(f"{args.diff} does not fit {device.path}: {exc}") from None
        if not args.no_bg_update:
            if device.read_only:
                raise UserError(f"{device.path} is read-only: the merge needs to write it "
                                "(use --no-bg-update to serve system.img without merging)")
            progress_dir = os.path.join(args.state_dir, "update")
            try:
                os.makedirs(progress_dir, exist_ok=True)
                if not os.access(progress_dir, os.W_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            except OSError as exc:
                raise UserError(f"cannot keep merge progress in {progress_dir}: {exc.strerror} "
                                "(give --state-dir DIR, or --no-bg-update to serve without "
                                "merging)") from None
        verify_source = not args.no_verify_source
        if verify_source and diff.identification is None:
            log.warning("%s does not say what it applies to (made by another tool?): %s "
                        "cannot be checked before merging", diff.path, device.path)
            verify_source = False
        try:
            progress = MergeProgress(args.state_dir, diff.fingerprint(), device, diff.path)
            merge = not args.no_bg_update
            old_hashes = None
            if diff.version == VERSION_REFERENCING:
                old_hashes = open_old_hashes(diff, progress)
                # Before the source check, which may need it (a half-merged chunk).
                scratch = open_scratch(diff, progress, old_hashes,
                                       create=merge and progress.load() < diff.n_chunks)
            merged_chunks, saved_chunks = resume_point(
                diff, device, progress, verify_source=verify_source,
                read_old=scratch.read_old(device) if scratch is not None else None,
                old_hashes=old_hashes)
            if merge and old_hashes is not None and merged_chunks < diff.n_chunks:
                if not verify_source:
                    record_old_hashes(diff, device, old_hashes, merged_chunks)
                # Order: before the merge's first write to the device, so that a crash
                # in the middle of a chunk finds its blocks' old hashes.
                save_old_hashes(old_hashes)
            if (merge and diff.version == VERSION_REFERENCING and scratch is None
                    and merged_chunks < diff.n_chunks):   # progress said done, the device disagrees
                scratch = open_scratch(diff, progress, old_hashes, create=True)
            scratch_ready = False
            if scratch is not None and merge:
                scratch_ready = prepare_scratch(scratch, diff, device, progress, merged_chunks)
            return [UpdateImage(device, diff, progress, merged_chunks=merged_chunks,
                                saved_chunks=saved_chunks,
                                background_merge=not args.no_bg_update,
                                merge_rate=args.merge_rate * 1e6,
                                cache_bytes=args.cache_mib << 20,
                                scratch=scratch, scratch_ready=scratch_ready)]
        except ReferencesNotOld as exc:   # a v1 chunk's old data was overwritten
            raise UserError(f"cannot merge {diff.path}: chunk {exc.chunk_index} needs old contents "
                            f"that neither {device.path} nor a scratch copy in "
                            f"{progress.directory} holds (the device was merged into, and the "
                            "scratch copy of what the merge overwrote is lost)", EXIT_FAILED) from None
        except DiffFormatError as exc:  # the checks met a bad chunk
            raise UserError(f"{diff.path}: {exc}") from None
        except OSError as exc:
            raise UserError(f"cannot check {device.path} against {diff.path}: "
                            f"{exc.strerror or exc}") from None
    except BaseException:
        diff.close()
        if device is not None:
            device.close()
        if scratch is not None:
            scratch.close()
        raise


def open_old_hashes(diff: DiffFile, progress: MergeProgress) -> OldBlockHashes:
    """The old hashes of a version 1 diff's changed blocks (fusesnap.old_hashes): its
    version 2 trailer's, or what merges of it recorded in the state directory."""
    if diff.identification.block_hash_size:
        return OldBlockHashes.from_trailer(diff)
    return OldBlockHashes.load(progress.old_hashes_path, diff)


def save_old_hashes(old_hashes: OldBlockHashes) -> None:
    try:
        old_hashes.save()
    except OSError as exc:
        raise UserError(f"cannot record the old blocks' hashes the merge needs in "
                        f"{old_hashes.path}: {exc.strerror or exc} (free space there, give "
                        "--state-dir DIR, or serve without merging with --no-bg-update); "
                        "nothing was written", EXIT_FAILED) from None


def open_scratch(diff: DiffFile, progress: MergeProgress, old_hashes: OldBlockHashes, *,
                 create: bool) -> ScratchCopy | None:
    """The scratch copy of a version 1 diff merging into this device (merge_scratch.py),
    opened and checked slot by slot, completed from other copies of this diff; created
    with its whole size if `create` (a UserError if the state directory cannot hold
    it: the device is untouched). Without `create`, the copy a merge left if there is
    one. None if there is none, or no chunk references a changed block."""
    if not create and not os.path.exists(progress.scratch_path):
        return None
    from ..merge_scratch import ScratchCopy
    scratch = ScratchCopy(progress.scratch_path, diff, old_hashes)
    if not scratch.n_slots:
        return None
    try:
        if not scratch.open(create=create):
            return None
    except OSError as exc:
        raise UserError(f"cannot keep the scratch copy a version 1 merge needs "
                        f"({scratch.size / 2**20:.1f} MiB) in {progress.directory}: "
                        f"{exc.strerror or exc} (free space there, give --state-dir DIR, or "
                        "serve without merging with --no-bg-update); nothing was written",
                        EXIT_FAILED) from None
    # Copies of this diff's scratch for the same device under another name (`losetup`
    # gave it another number): what they hold is checked, so any may help.
    ours = f".{progress.identity['device']}.scratch"
    for other in glob.glob(glob.escape(scratch.path[:-len(ours)]) + ".*.scratch"):
        if other != scratch.path and not scratch.complete:
            scratch.adopt(other)
    return scratch


def prepare_scratch(scratch: ScratchCopy, diff: DiffFile, device: BlockDevice,
                    progress: MergeProgress, merged_chunks: int) -> bool:
    """At mount, before serving: is the scratch copy ready for the merge to write (it
    holds what the merge needs, durably)? If the device may already be merged into
    (progress says the copy was complete, or chunks are on the device) and the copy is
    not complete, complete it now, from another copy of this diff (the same device
    under another name) and from the device, and refuse (UserError) if a chunk still
    to merge needs a block whose old contents are gone. Otherwise the merge task
    copies it before its first write. Blocking."""
    if merged_chunks == diff.n_chunks:
        return True    # nothing needs it any more; the merge task removes it
    if scratch.complete:
        return progress.scratch_complete
    if not (progress.scratch_complete or merged_chunks):
        return False
    lost = []
    for first in range(0, scratch.n_slots, scratch.FILL_BATCH):
        filled, missing = scratch.fill(device, first, min(first + scratch.FILL_BATCH, scratch.n_slots))
        scratch.mark_valid(filled)
        lost += missing
    needed = scratch.first_needed(diff, lost, merged_chunks)
    if needed:
        raise UserError(f"cannot merge {diff.path}: " + scratch_lost(needed, device.path, scratch.path),
                        EXIT_FAILED)
    if progress.scratch_complete:
        log.warning("%s was damaged or lost; rebuilt what the merge still needs", scratch.path)
    return False   # the merge task makes it durable and says so first
