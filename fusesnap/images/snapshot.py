"""`origin.img`, `snapshot.img` and `snapshot-<N>.img`: copy-on-write snapshots of a
device that stays in use, with one store shared by all snapshots and change-block
tracking for incremental backups (after blksnap).

    fusesnap mount MNT --snapshot DEV --store FILE [--store-limit SIZE] [--chunk-size BYTES]
    fusesnap snapshot take MNT [--no-freeze]     prints GEN:N; snapshot-N.img appears
    fusesnap snapshot release MNT [N]            the oldest if N is not given
    fusesnap snapshot list MNT [--json]
    fusesnap snapshot changes MNT --since GEN:N [--json]

Images: `origin.img` passes reads and writes through to DEV. Each held snapshot N
is `snapshot-N.img`, the newest also `snapshot.img`. The first write to a chunk of
origin.img after a take copies the chunk's old contents into one slot of the store,
shared by every snapshot still reading that chunk from DEV (`COPY` in
`fusesnap.formats.snapshot_store`), so an origin write costs one copy whatever the
number of snapshots. A write to a snapshot goes to a slot of its own (a private
copy of what it showed, then the write), never to DEV or another snapshot.

Overflow: when no slot is left (the store is at --store-limit), or the store cannot
be written, the snapshots that needed the copy are marked corrupted (a `CORRUPT`
record, durable before the origin write proceeds), their reads fail with EIO, and
the origin write succeeds. `.status` warns when less than a tenth of the limit is
left.

Ordering (`fusesnap.copy_before_write` runs it; this module is the policy): copy
into a reserved slot, write the records, then the origin write proceeds. Copies (in
the page cache until written back: RWF_DONTCACHE) and records are in the kernel's
hands, which outlive a kill -9 of the server; for power
cuts the store is marked DIRTY (with the kernel's boot id, fsynced) before the first
origin write whose copy is not durable, and CLEAN after an fsync that covered every
record (each flush of origin.img). A re-mount after a reboot that finds DIRTY in
force reports every snapshot lost and starts a new generation of the change map:
after a power cut a snapshot is intact or reported lost, and first writes cost no
fsync (per-write fsyncs measured 0.04 of the writes without a snapshot). A slot
whose last reference went (release, corruption) is reused only after the record
that freed it is durable. Takes and releases hold every chunk (no write is half done
meanwhile) and fsync their record before returning. While a DIRTY is durably in
force (`_marks_at_once`), a write copies its chunks and appends their records
itself, in the same order, without the group commit's rounds (`_copy_at_once`),
and a write whose chunks are copied and need only change marks appends them right
before it.

Sequential writers: a write that goes on where a recent one ended also copies the
COPY_AHEAD bytes of chunks after it (`_plan_ahead`), so that the stream's next
writes find them copied; a copy ahead keeps the chunk's change mark. A sequential
snapshot reader asks the kernel for the store slots of the READ_AHEAD bytes after
it (the copies are not cached).

Growth: the store file is extended ahead of its slots, `PREALLOCATE` bytes at a
time (fallocate), so that a first copy writes into allocated blocks: ext4 then skips
its per-block delayed allocation (the store's system time per first-touched MiB went
from 0.97 to 0.67 ms, bench/bench_snapshot.py's pattern driven in-process). At most one
step lies beyond the slots in use; a tail freed by a release is cut with it.

State (plain attributes): `state` (`StoreState`: held snapshots with their chunk ->
slot maps, slot reference counts, the change map), `free_slots`, `slot_end` (slots
the file spans), `preallocated_end` (slots the file has room for), `pending_free`
(freed, not yet reusable), the table position.
Concurrency: everything runs on the trio thread; state changes happen only in
synchronous methods (plan, write_records, control steps between awaits); store and
device I/O is inline (page-cached or uncached buffered I/O, copies from a mapping
of the device), fsyncs in a worker thread.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import fcntl
import json
import logging
import mmap
import os
import sys

import trio
from sortedcontainers import SortedList

from .. import arguments
from ..control import read_status, require_image, send_command
from ..copy_before_write import CopyBeforeWrite
from ..devices import FALLOC_FL_KEEP_SIZE, BlockDevice, check_range, fallocate, loop_devices_backed_under
from ..errors import EXIT_FAILED, UserError
from ..formats import snapshot_store as fmt
from .base import Image

log = logging.getLogger(__name__)

MIN_CHUNK = 256 << 10
MAX_CHUNKS = 1 << 16
LOW_SPACE_FRACTION = 0.1
PREALLOCATE = 32 << 20   # the store file grows this much ahead of its slots
RWF_DONTCACHE = getattr(os, "RWF_DONTCACHE", 0x80)  # <linux/fs.h>; Python 3.14 names it
COPY_AHEAD = 1 << 20     # a sequential write copies this much past its end
STREAMS = 16             # how many recent ends of writes (reads) tell a sequential one
READ_AHEAD = 4 << 20     # a snapshot read asks for the store's slots of this much after it
MAP_WINDOW = 256 << 20   # copies read the device through a kept mapping of this much of it
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878


def chunk_size_for(device_size: int) -> int:
    """blksnap's rule: at least 256 KiB, a power of two, at most MAX_CHUNKS chunks."""
    chunk = MIN_CHUNK
    while chunk * MAX_CHUNKS < device_size:
        chunk *= 2
    return chunk


@dataclasses.dataclass(eq=False)
class StoreCopy:
    """One step of a write: `kind` "copy" (origin chunk -> shared slot), "own" (a
    snapshot's private copy), "cbt" (change map only) or "corrupt"."""
    kind: str
    chunk: int
    slot: int | None = None
    number: int = 0           # the snapshot (own, corrupt) or the change-map value
    reason: int = 0           # corrupt: a snapshot_store reason code
    failed: bool = False      # copy: the store could not be written
    ahead: bool = False       # copy: made ahead of the writes (`OriginImage._plan_ahead`)
    # the first of a run of copies ahead: (first, end, token) of the chunks it holds
    hold: tuple[int, int, trio.Event] | None = None


class Store:
    """The store file: its superblock, the active table region and the slots."""

    def __init__(self, path: str, device: BlockDevice, chunk_size: int | None, limit: int):
        self.path = path
        self.limit = limit
        if not os.path.exists(path):
            try:
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            except OSError as exc:
                raise UserError(f"cannot create the store {path}: {exc.strerror}") from None
        self.file = BlockDevice(path, image_device=False)
        if self.file.read_only:
            raise UserError(f"the store {path} is read-only")
        identity = {"device": os.path.realpath(device.path), "size": device.size}
        head = self.file.pread(fmt.SUPERBLOCK_SIZE + fmt.HEADER_SIZE, 0)
        # A new store: an empty file, or one whose superblock was never written (zeros,
        # perhaps with the table of a creation cut short). Anything else that is not a
        # store is refused rather than overwritten.
        self.created = not head[:fmt.SUPERBLOCK_SIZE].strip(b"\0") and (
            not head[fmt.SUPERBLOCK_SIZE:].strip(b"\0")
            or fmt.TableHeader.unpack(head[fmt.SUPERBLOCK_SIZE:]) is not None)
        if self.created:
            chunk = chunk_size or chunk_size_for(device.size)
            self.sb = fmt.Superblock(chunk, device.size,
                                     fmt.table_bytes_for(-(-device.size // chunk)), identity)
        else:
            try:
                self.sb = fmt.Superblock.unpack(head[:fmt.SUPERBLOCK_SIZE])
            except fmt.StoreFormatError as exc:
                raise UserError(f"{path}: {exc} (refusing to overwrite it)") from None
            if self.sb.identity != identity:
                raise UserError(f"the store {path} belongs to {self.sb.identity.get('device')} "
                                f"({self.sb.identity.get('size')} bytes), not {identity['device']} "
                                f"({device.size} bytes)")
            if chunk_size and chunk_size != self.sb.chunk_size:
                raise UserError(f"the store {path} uses {self.sb.chunk_size}-byte chunks, not {chunk_size}")
        self.chunk_size = self.sb.chunk_size
        self.max_slots = (limit - self.sb.data_start) // self.chunk_size
        if self.max_slots < 1:
            raise UserError(f"--store-limit must be at least {self.sb.data_start + self.chunk_size} "
                            f"bytes for this device (the table and one chunk)")

    def slot_offset(self, slot: int) -> int:
        return self.sb.data_start + slot * self.chunk_size

    def create(self) -> None:
        """A new store: superblock and an empty table, durable (blocking)."""
        header = fmt.TableHeader(1, fmt.new_generation(), 1)
        self.file.pwrite(fmt.pack_base(header, []), self.sb.region_offset(0))
        self.file.pwrite(bytes(fmt.HEADER_SIZE), self.sb.region_offset(1))
        # Ordering: the table before the superblock, so a store with a superblock
        # always has a table (a crash before leaves a file that is created afresh).
        self.file.fsync()
        self.file.pwrite(self.sb.pack(), 0)
        self.file.fsync()


class OriginImage(Image):
    target = "origin"
    status_line_keys = ("size", "device", "warning")
    control_verbs = ("snapshot",)
    # 2: without version 1's "copy_in_kernel" (copies no longer use copy_file_range;
    # whether RWF_DONTCACHE works each server finds out for itself), which 1 had
    handover_versions = (2, 1)

    def __init__(self, device: BlockDevice, store: Store, name: str = "origin.img"):
        super().__init__(name, device.size, read_only=False)
        self.device = device
        self.store = store
        self.chunk_size = store.chunk_size
        self.n_chunks = -(-device.size // self.chunk_size)
        self.cbw = CopyBeforeWrite(self)
        self.snapshots: dict[int, SnapshotImage] = {}
        self.free_slots = SortedList()
        self.pending_free: list[int] = []
        self.slot_end = 0
        self.preallocated_end = 0
        self.store_failed: str | None = None
        self.table_unwritable = False        # a table write failed (`_table_write_failed`)
        self.boot_id = fmt.current_boot_id()
        self.dirty = False                  # a DIRTY record is in force
        self.dirty_durable = False          # ... and the fsync after it returned
        # hints, not state: recent origin writes' ends, snapshot reads' (number, end),
        # and per snapshot the chunk its store read-ahead reaches
        self.write_ends: collections.deque[int] = collections.deque(maxlen=STREAMS)
        self.read_ends = collections.deque(maxlen=STREAMS)
        self.read_ahead_to: dict[int, int] = {}
        self.records_appended = 0
        self.copies_at_once = 0             # copies recorded without a round (`_copy_at_once`)
        self.copy_uncached = True           # until the kernel refuses RWF_DONTCACHE
        self.device_mapping: tuple[int, mmap.mmap, memoryview] | None = None  # `_device_window`
        if store.created:
            store.create()
        loaded = fmt.load_state(store.file.pread, store.sb)
        if loaded is None:
            raise UserError(f"{store.path}: neither table region is intact (a damaged store)", EXIT_FAILED)
        self.state, table = loaded
        self.epoch = table.header.epoch
        self.region = table.region
        self.append_at = table.append_at
        used = set(self.state.refs)
        self.slot_end = max(used) + 1 if used else 0
        self.preallocated_end = self.slot_end  # (what lies beyond is allocated again: harmless)
        self.free_slots.update(set(range(self.slot_end)) - used)
        self.state.freed.clear()
        # Opened with a previous server's descriptors (live upgrade): it may still be
        # serving, so opening writes nothing; `restore_handover_state` brings the
        # state up to its own, or, with none, `start` recovers (failover).
        self.recovery_deferred = store.file.inherited
        if not self.recovery_deferred:
            self._recover()
        for number, held in self.state.held.items():
            self.snapshots[number] = SnapshotImage(self, number)
            if held.corrupted:
                log.warning("snapshot %d is corrupted: %s", number, fmt.REASONS.get(held.corrupted))

    def _recover(self) -> None:
        if self.state.recover(self.boot_id):
            log.warning("%s: the machine went down while the store was in use: every snapshot "
                        "is lost, and incremental backups need a full one first", self.store.path)
        # Everything read is durable once the compacted table is: no DIRTY in force.
        self.state.dirty_boot = None
        self._compact()  # a fresh region: no torn tail, room to append
        self._allocate_table()
        self.store.file.fsync()
        self._reclaim()
        self.recovery_deferred = False

    def _allocate_table(self) -> None:
        """Allocate both table regions' blocks (best effort), so that appending a
        record never needs a new block: on a full disk an append that failed with
        ENOSPC would fail the origin write it protects (seen when the benchmark's
        disk filled up)."""
        if self.store.file.is_block_device:
            return
        try:
            fallocate(self.store.file.fd, FALLOC_FL_KEEP_SIZE, 0, self.store.sb.data_start)
        except OSError as exc:
            log.debug("store %s: table not preallocated (%s)", self.store.path, exc.strerror)

    # -- the table ------------------------------------------------------------------

    def _compact(self) -> None:
        """Write the whole state as the base of the other region (sync; durable with
        the next fsync, until then the current region stays the active one).

        A state too large for half a region (many snapshots, each mapping its chunks
        in many runs) is a full table: the table cannot record another chunk for
        anyone, so the oldest intact snapshots are marked corrupted (their maps
        dropped), one at a time, until the rest fits. The newest, the one the next
        backup reads, is kept the longest (the overflow rule: as few snapshots as
        it takes, never the origin)."""
        base = self.state.compacted()
        room = self.store.sb.record_capacity // 2  # half the region left for appends
        for held in sorted(self.state.held.values(), key=lambda held: held.number):
            if len(base) <= room:
                break
            if not held.corrupted:
                self.state.apply(fmt.Record(fmt.CORRUPT, held.number, count=fmt.TABLE_FULL))
                log.warning("store %s: its table is full: snapshot %d is marked corrupted",
                            self.store.path, held.number)
                base = self.state.compacted()
        self.pending_free += self.state.freed
        self.state.freed.clear()
        self.epoch += 1
        self.region = 1 - self.region
        header = fmt.TableHeader(self.epoch, self.state.generation, self.state.next_snapshot)
        self.store.file.pwrite(fmt.pack_base(header, base), self.store.sb.region_offset(self.region))
        self.append_at = len(base)

    def _append(self, records: list[fmt.Record]) -> None:
        """Apply and write records (page cache; the caller makes them durable). Once
        the table could not be written (`_table_write_failed`), apply only."""
        self.records_appended += len(records)
        for record in records:
            self.state.apply(record)
        self.pending_free += self.state.freed
        self.state.freed.clear()
        if self.table_unwritable:
            return
        try:
            if self.append_at + len(records) > self.store.sb.record_capacity:
                self._compact()  # the base already holds these records' effect
                return
            data = b"".join(record.pack(self.epoch) for record in records)
            self.store.file.pwrite(data, self.store.sb.region_offset(self.region) + fmt.HEADER_SIZE
                                   + self.append_at * fmt.RECORD_SIZE)
        except OSError as exc:
            self._table_write_failed(exc)
            return
        self.append_at += len(records)

    def _table_write_failed(self, exc: OSError) -> None:
        """The table did not take records already applied in memory (a copy mapped to
        its slot, a release): a re-mount would not see them, so nothing the store
        says is trusted any more. As after a failed fsync (`_store_failure`), every
        snapshot is corrupted (in memory only: the table cannot take the marks) and
        no slot is reused; the table is not written again until a re-mount, and
        origin writes go on (they never fail because of a snapshot)."""
        self.table_unwritable = True
        reason = (f"the store's table could not be written ({exc.strerror}): after a re-mount "
                  "the snapshots may look intact, and are not")
        self.store_failed = f"{self.store_failed}; {reason}" if self.store_failed else reason
        log.error("%s: %s", self.store.path, self.store_failed)
        self._corrupt_all_unrecorded()
        self.pending_free.clear()

    async def _sync_store(self) -> None:
        """fsync the store; then slots freed by durable records may be reused."""
        freed, self.pending_free = self.pending_free, []
        try:
            await trio.to_thread.run_sync(self.store.file.fsync)
        except OSError as exc:
            self.pending_free = freed + self.pending_free
            raise exc
        self.free_slots.update(freed)
        self._reclaim(freed)

    def _reclaim(self, freed: list[int] = ()) -> None:
        """Give space back: truncate the file after the last slot in use, punch holes
        for the slots in `freed` before it (best effort: a block device or a file
        system without holes keeps the space, reused all the same)."""
        end = self.slot_end
        while end and end - 1 in self.free_slots:
            end -= 1
        try:
            if end < self.slot_end:
                self.free_slots = SortedList(s for s in self.free_slots if s < end)
                self.slot_end = self.preallocated_end = end
                if not self.store.file.is_block_device:
                    os.ftruncate(self.store.file.fd, self.store.slot_offset(end))
            for slot in freed:
                if slot < end:
                    self.store.file.punch(self.store.slot_offset(slot), self.chunk_size)
        except OSError as exc:
            log.debug("store %s: space not given back (%s)", self.store.path, exc.strerror)

    def _allocate(self) -> int | None:
        if self.free_slots:
            return self.free_slots.pop(0)
        if self.slot_end < self.store.max_slots:
            self.slot_end += 1
            if self.slot_end > self.preallocated_end:
                self._preallocate()
            return self.slot_end - 1
        return None

    def _preallocate(self) -> None:
        """Allocate the file's blocks for the next PREALLOCATE bytes of slots (best
        effort: without fallocate, or on a full disk, copies allocate as they go, and
        a copy that finds no room fails as before)."""
        end = min(self.store.max_slots, self.slot_end - 1 + max(1, PREALLOCATE // self.chunk_size))
        if not self.store.file.is_block_device:
            start = self.store.slot_offset(self.slot_end - 1)
            try:
                fallocate(self.store.file.fd, 0, start, self.store.slot_offset(end) - start)
            except OSError as exc:
                log.debug("store %s: not preallocated (%s)", self.store.path, exc.strerror)
        self.preallocated_end = end

    # -- origin I/O -------------------------------------------------------------------

    async def read(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        return self.device.pread(size, offset) if size else b""

    async def write(self, offset: int, data: bytes) -> int:
        check_range(self.size, offset, len(data))
        if not data:
            return 0
        first, end = offset // self.chunk_size, -(-(offset + len(data)) // self.chunk_size)
        sequential = offset in self.write_ends  # it goes on where a recent write ended
        self.write_ends.append(offset + len(data))
        if not self.cbw.is_held(first, end):
            # No other write holds the chunks, and no await from here to the write:
            # nothing can come between, so these two cases need no chunk locks.
            if self._copied_for_all(first, end):  # the common case once copied
                unmarked = self._unmarked_runs(first, end)
                if not unmarked or self._marks_at_once():
                    self._mark_at_once(unmarked)
                    self.device.pwrite(data, offset)
                    return len(data)
            elif self._marks_at_once():
                self._copy_at_once(self.plan(first, end, ahead=sequential))
                self.device.pwrite(data, offset)
                return len(data)
        async with self.cbw.writing(first, end, plan=self.plan_sequential if sequential else self.plan_write):
            # The old contents of every chunk a snapshot needs are in the store (or
            # the snapshot is marked corrupted), and a DIRTY is durable, by now.
            self.device.pwrite(data, offset)
        return len(data)

    def _copied_for_all(self, first: int, end: int) -> bool:
        """True if no intact snapshot reads a chunk of [first, end) from the device
        any more: an origin write there needs no copy, at most change marks."""
        intact = [s for s in self.state.held.values() if not s.corrupted]
        return all(chunk in s.map for s in intact for chunk in range(first, end))

    def _unmarked_runs(self, first: int, end: int) -> list[tuple[int, int]]:
        """Runs [a, b) of chunks of [first, end) whose change mark is not the newest
        snapshot's (none while no snapshot was ever taken)."""
        newest = self.newest
        if not newest:
            return []
        runs, pos = [], first
        for start, stop, number in self.state.changed.overlapping(first, end):
            if number == newest:
                if pos < start:
                    runs.append((pos, start))
                pos = stop
        if pos < end:
            runs.append((pos, end))
        return runs

    def _marks_at_once(self) -> bool:
        """Can a change mark be appended right before its write, without a round?
        Yes while a DIRTY is durably in force: a kill -9 keeps the mark (page cache,
        appended before the write), and after a power cut that lost it the re-mount
        starts a new generation of the change map anyway. Not in a clean store: the
        origin write could reach the disk and the mark not, and the change map would
        hide that change from an incremental backup."""
        return self.dirty_durable and not self.store_failed

    def _mark_at_once(self, runs: list[tuple[int, int]]) -> None:
        """Append CBT records marking the chunk runs [a, b) changed in the newest
        snapshot (only when `_marks_at_once`; sync: the caller writes next)."""
        if runs:
            self._append([fmt.Record(fmt.CBT, self.newest, first, 0, end - first) for first, end in runs])

    async def discard(self, offset: int, length: int, *, zero_range: bool) -> None:
        """A discard is a write of zeros to the snapshots' eyes: old contents first."""
        check_range(self.size, offset, length)
        if not length:
            return
        first, end = offset // self.chunk_size, -(-(offset + length) // self.chunk_size)
        async with self.cbw.writing(first, end):
            self.device.punch(offset, length, zero_range=zero_range)

    async def flush(self) -> None:
        appended = self.records_appended
        await trio.to_thread.run_sync(self.device.fsync)
        try:
            await self._sync_store()
            # Ordering: CLEAN only after an fsync that covered every record so far
            # (none was appended meanwhile), and never after a failed one.
            if self.dirty and self.records_appended == appended and not self.store_failed:
                self._append([fmt.Record(fmt.CLEAN)])
                self.dirty = self.dirty_durable = False
                await self._sync_store()
        except OSError as exc:
            await self._store_failure(exc)

    # -- the copy-before-write policy (see fusesnap.copy_before_write) ---------------

    @property
    def newest(self) -> int:
        return self.state.next_snapshot - 1

    def plan_write(self, first: int, end: int) -> list[StoreCopy]:
        """`plan` for an origin write that waited for its chunks: copies at once where
        it can (`_copy_at_once`)."""
        return self._copy_at_once(self.plan(first, end))

    def plan_sequential(self, first: int, end: int) -> list[StoreCopy]:
        """`plan_write` for a write that goes on where a recent one ended: copies ahead too."""
        return self._copy_at_once(self.plan(first, end, ahead=True))

    def _copy_at_once(self, copies: list[StoreCopy]) -> list[StoreCopy]:
        """While a DIRTY is durably in force (`_marks_at_once`), make the copies and
        append their records right here (sync: nothing else runs until the write),
        and return nothing left to commit: the write goes on without the group commit's
        two rounds, whose barrier would have nothing to do (it fsyncs only to make
        a DIRTY durable). Ordering as in a round: each copy is in the store (page
        cache, or on its way to the disk) when its write returns, its record is
        appended after it, and the origin write after the record, all in the
        kernel's hands, which a kill -9 keeps; after a power cut the DIRTY marks
        every snapshot lost. Otherwise (a clean store, a failed one) the copies go
        to the rounds as they are."""
        if not copies or not self._marks_at_once():
            return copies
        try:
            self._copies_from_device([copy for copy in copies if copy.kind == "copy"])
            self.write_records(copies)
        except BaseException as exc:
            self.abandoned(copies, exc)
            raise
        self.recorded(copies)
        self.copies_at_once += len(copies)
        return []

    def plan(self, first: int, end: int, *, ahead: bool = False) -> list[StoreCopy]:
        """Origin writes, sync: a shared copy of each chunk some intact snapshot still
        reads from the device; corruption where there is no room; change marks; with
        `ahead`, copies past the write (`_plan_ahead`)."""
        intact = [s for s in self.state.held.values() if not s.corrupted]
        copies, overflowed, unmarked = [], set(), []
        for chunk in range(first, end):
            needers = [s.number for s in intact if chunk not in s.map and s.number not in overflowed]
            slot = self._allocate() if needers else None
            if slot is not None:
                copies.append(StoreCopy("copy", chunk, slot, self.newest))
                continue
            overflowed.update(needers)
            if self.newest and self.state.changed.get(chunk, 0) != self.newest:
                unmarked.append(chunk)
        if self._marks_at_once():
            self._mark_at_once(_runs(unmarked))
        else:
            copies += [StoreCopy("cbt", chunk, number=self.newest) for chunk in unmarked]
        copies += [StoreCopy("corrupt", 0, number=n, reason=fmt.OVERFLOW) for n in sorted(overflowed)]
        if ahead and not overflowed and any(copy.kind == "copy" for copy in copies):
            copies += self._plan_ahead(end, intact)
        return copies

    def _plan_ahead(self, end: int, intact: list[fmt.HeldSnapshot]) -> list[StoreCopy]:
        """Copies of up to COPY_AHEAD bytes of chunks past the end of a sequential
        write (one that went on where a recent write ended: the next writes of that
        stream need them), made and recorded with this write's, so that those writes
        find them copied and go straight to the device. A copy ahead is not a write:
        its record keeps the chunk's change mark. The chunks are held until recorded
        (no write lands before its copy is), and taken only where nothing holds
        them, with a tenth of the store to spare (never a cause of overflow); a
        stream that stops leaves at most COPY_AHEAD copied for nothing. Copied at
        once (`_copy_at_once`), they are recorded before anything else runs: no hold."""
        room = self.store.max_slots * (1 - LOW_SPACE_FRACTION) - len(self.state.refs)
        stop_at = min(self.n_chunks, end + COPY_AHEAD // self.chunk_size, end + int(room))
        first_held = self.cbw.first_held(end, stop_at) if stop_at > end else None
        if first_held is not None:
            stop_at = first_held
        stop = end
        while stop < stop_at and any(stop not in s.map for s in intact):
            stop += 1
        if stop == end:
            return []
        ahead = []
        for chunk in range(end, stop):
            slot = self._allocate()
            if slot is None:
                break
            ahead.append(StoreCopy("copy", chunk, slot, self.state.changed.get(chunk, 0), ahead=True))
        if ahead and not self._marks_at_once():
            end_held = ahead[-1].chunk + 1
            ahead[0].hold = (end, end_held, self.cbw.hold(end, end_held))
        return ahead

    def plan_snapshot_write(self, number: int, first: int, end: int) -> list[StoreCopy]:
        """Writes to snapshot `number`, sync: a private slot for each chunk it shares
        (or reads from the device); ENOSPC, changing nothing, if there is no room."""
        held = self.state.held[number]
        copies = []
        for chunk in range(first, end):
            slot = held.map.get(chunk)
            if slot is None or self.state.refs.get(slot, 0) > 1:
                mine = self._allocate()
                if mine is None:
                    self.free_slots.update(c.slot for c in copies if c.kind == "own")
                    raise OSError(errno.ENOSPC, "the snapshot store is full")
                copies.append(StoreCopy("own", chunk, mine, number))
            elif self.state.changed.get(chunk, 0) < number:
                copies.append(StoreCopy("cbt", chunk, number=number))
        return copies

    async def copy(self, copies: list[StoreCopy]) -> None:
        # Inline, not in a worker thread: page-cached copies cost less than the
        # hand-off (measured no faster with --workers 2 and a thread).
        self._copies_from_device([copy for copy in copies if copy.kind == "copy"])
        for copy in copies:
            if copy.kind == "own":
                data = self._snapshot_view(self.state.held[copy.number], copy.chunk * self.chunk_size,
                                           min(self.chunk_size, self.size - copy.chunk * self.chunk_size))
                self.store.file.pwrite(data, self.store.slot_offset(copy.slot))

    def _copies_from_device(self, copies: list[StoreCopy]) -> None:
        """Copy each run of consecutive chunks bound for consecutive slots (the usual
        case: a write's chunks, their slots allocated in order) in one go."""
        runs: list[list[StoreCopy]] = []
        for copy in copies:
            if runs and (runs[-1][-1].chunk + 1, runs[-1][-1].slot + 1) == (copy.chunk, copy.slot):
                runs[-1].append(copy)
            else:
                runs.append([copy])
        for run in runs:
            try:
                self._copy_from_device(run[0].chunk, run[0].slot, len(run))
            except OSError as exc:
                # Never the origin's failure: the snapshots needing it are corrupted.
                log.error("store %s: copy of chunks %d-%d failed: %s", self.store.path,
                          run[0].chunk, run[-1].chunk, exc)
                for copy in run:
                    copy.failed = True

    def _copy_from_device(self, chunk: int, slot: int, count: int) -> None:
        """Device chunks [chunk, chunk + count) -> store slots from `slot` on, in one
        write from a mapping of the device (the kernel copies page cache to page
        cache: a pread into a buffer first costs more than the write itself here).
        The mapping is a window of MAP_WINDOW bytes kept between copies
        (`_device_window`); a copy that straddles two windows maps its own. A
        mapping is read only inside the write, so a device that fails to read fails
        the write (EFAULT or EIO), never with SIGBUS."""
        start = chunk * self.chunk_size
        length = min(count * self.chunk_size, self.size - start)
        destination = self.store.slot_offset(slot)
        try:
            window_start, window = self._device_window(start)
            if start + length > window_start + len(window):
                window = None
                mapped = mmap.mmap(self.device.fd, length, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                   mmap.PROT_READ, offset=start)
        except OSError:  # a device that cannot be mapped (on a FUSE mount, say)
            self._write_uncached(memoryview(self.device.pread(length, start)), destination)
            return
        if window is not None:
            with window[start - window_start:start - window_start + length] as view:
                self._write_uncached(view, destination)
            return
        with mapped, memoryview(mapped) as view:
            self._write_uncached(view, destination)

    def _device_window(self, offset: int) -> tuple[int, memoryview]:
        """The mapping of the MAP_WINDOW-aligned window of the device around
        `offset` (start, view), mapped on first use and kept until a copy needs
        another window: a mapping per copy (mmap, populate, munmap) cost about a
        fifth of the copy. Not populated: the write faults in what it reads. One
        window at a time bounds the page tables a large device would need."""
        window_start = offset - offset % MAP_WINDOW
        if self.device_mapping is None or self.device_mapping[0] != window_start:
            self._unmap_device_window()
            mapped = mmap.mmap(self.device.fd, min(MAP_WINDOW, self.size - window_start),
                               mmap.MAP_SHARED, mmap.PROT_READ, offset=window_start)
            self.device_mapping = (window_start, mapped, memoryview(mapped))
        return self.device_mapping[0], self.device_mapping[2]

    def _unmap_device_window(self) -> None:
        if self.device_mapping is not None:
            _, mapped, view = self.device_mapping
            self.device_mapping = None
            view.release()
            mapped.close()

    def _write_uncached(self, data: memoryview, offset: int) -> None:
        """Write a copy into the store without keeping it in the page cache
        (RWF_DONTCACHE, Linux 6.14: the kernel starts writeback at once and drops the
        pages when it is done). A backup reads a copy once, much later, if at all;
        cached, every copy takes page-cache pages the machine has not used recently,
        which cost far more than pages recycled from the previous copies
        (DEVELOPERS.md, "Snapshots"). Ordering is unchanged: when the call returns the copy is in the
        page cache or on its way to the disk, so it survives a kill -9 like any
        buffered write, and the DIRTY record covers power cuts. Without the flag (an
        older kernel, a filesystem without it) a plain write."""
        done = 0
        while done < len(data):
            if self.copy_uncached:
                try:
                    done += os.pwritev(self.store.file.fd, [data[done:]], offset + done, RWF_DONTCACHE)
                    continue
                except OSError as exc:
                    if exc.errno != errno.EOPNOTSUPP:
                        raise
                    self.copy_uncached = False
            done += os.pwrite(self.store.file.fd, data[done:], offset + done)

    def write_records(self, copies: list[StoreCopy]):
        records = []
        for copy in copies:
            if copy.kind == "copy" and copy.failed and copy.ahead:
                self.free_slots.add(copy.slot)  # no write needed it: nothing is lost
            elif copy.kind == "copy" and copy.failed:
                self.free_slots.add(copy.slot)  # never named by a record
                records += [fmt.Record(fmt.CORRUPT, s.number, count=fmt.STORE_ERROR)
                            for s in self.state.held.values()
                            if not s.corrupted and copy.chunk not in s.map]
                records.append(fmt.Record(fmt.CBT, copy.number, copy.chunk))
            elif copy.kind == "copy":
                last = records[-1] if records else None
                if last and last.type == fmt.COPY and last.snapshot == copy.number and \
                        (last.chunk + last.count, last.slot + last.count) == (copy.chunk, copy.slot):
                    records[-1] = fmt.Record(fmt.COPY, copy.number, last.chunk, last.slot, last.count + 1)  # a run
                else:
                    records.append(fmt.Record(fmt.COPY, copy.number, copy.chunk, copy.slot))
            elif copy.kind == "own":
                records.append(fmt.Record(fmt.OWN, copy.number, copy.chunk, copy.slot))
            elif copy.kind == "cbt":
                records.append(fmt.Record(fmt.CBT, copy.number, copy.chunk))
            elif copy.kind == "corrupt":
                records.append(fmt.Record(fmt.CORRUPT, copy.number, count=copy.reason))
        # Ordering: the copies these records name are in the store (page cache) by
        # now; the barrier after this makes sure a DIRTY is durable before any
        # overwrite of the chunks they protect (`_copy_at_once`: it is already).
        self._append(records)
        return copies, [], []

    async def barrier(self) -> None:
        """Once per clean -> dirty change (not per write): DIRTY is made durable before
        any overwrite whose copy is in the page cache only."""
        if self.dirty:
            return
        self._append([fmt.dirty_record(self.boot_id)])
        self.dirty = True
        try:
            await self._sync_store()
        except OSError as exc:
            await self._store_failure(exc)  # the origin write goes on; the snapshots are lost
        else:
            self.dirty_durable = self.dirty  # (unless a flush made it CLEAN meanwhile)

    def recorded(self, copies: list[StoreCopy]) -> None:
        """The records were applied as they were written; copies ahead free the
        chunks they held."""
        self._release_held(copies)

    def abandoned(self, copies: list[StoreCopy], exc: BaseException) -> None:
        """Copies whose records were never written: their slots are free again."""
        self.free_slots.update(c.slot for c in copies if c.kind in ("copy", "own") and not c.failed)
        self._release_held(copies)

    def _release_held(self, copies: list[StoreCopy]) -> None:
        for copy in copies:
            if copy.hold is not None:
                self.cbw.release(*copy.hold)
                copy.hold = None

    async def _store_failure(self, exc: OSError) -> None:
        """The store could not be made durable: copies since its last good fsync may be
        lost, so every snapshot is. They are marked corrupted in memory at once, then
        in the table: CORRUPT records claim nothing the failed fsync covered, and an
        fsync that succeeds after it made them durable (a new writeback error would be
        reported again). If that fails too, `.status` and the log say that a re-mount
        may show the snapshots intact. No slot is reused from then on, and no
        snapshot taken, until a re-mount."""
        if self.store_failed:
            return  # every snapshot is marked already
        self.store_failed = f"store fsync failed: {exc.strerror}"
        log.error("%s: %s; every snapshot is marked corrupted", self.store.path, self.store_failed)
        marks = [fmt.Record(fmt.CORRUPT, held.number, count=fmt.STORE_ERROR)
                 for held in self.state.held.values() if not held.corrupted]
        try:
            self._append(marks)
            if self.table_unwritable:
                return  # (it said why, and corrupted them in memory)
            await trio.to_thread.run_sync(self.store.file.fsync)
        except OSError as again:
            self._corrupt_all_unrecorded()
            self.store_failed += (f"; the corrupted marks could not be written either ({again.strerror}): "
                                  "after a re-mount the snapshots may look intact, and are not")
            log.error("%s: %s", self.store.path, self.store_failed)
        self.pending_free.clear()  # never reused: nothing about the store is trusted now

    def _corrupt_all_unrecorded(self) -> None:
        """In memory only: the store cannot record it."""
        for held in self.state.held.values():
            if not held.corrupted:
                self.state.apply(fmt.Record(fmt.CORRUPT, held.number, count=fmt.STORE_ERROR))
        self.state.freed.clear()  # never reused: nothing about the store is trusted now

    # -- snapshot I/O ----------------------------------------------------------------------

    def _held(self, number: int) -> fmt.HeldSnapshot:
        held = self.state.held.get(number)
        if held is None:
            raise OSError(errno.EIO, f"snapshot {number} was released")
        if held.corrupted:
            raise OSError(errno.EIO, f"snapshot {number} is corrupted: {fmt.REASONS[held.corrupted]}")
        return held

    def _snapshot_view(self, held: fmt.HeldSnapshot, offset: int, size: int) -> bytes | bytearray:
        """What snapshot `held` shows at [offset, offset + size) (sync: no await)."""
        first, end = offset // self.chunk_size, -(-(offset + size) // self.chunk_size)
        if not any(chunk in held.map for chunk in range(first, end)):
            return self.device.pread(size, offset)  # all of it from the device: one call
        out = bytearray(size)
        view = memoryview(out)
        pos, end, cs = offset, offset + size, self.chunk_size
        while pos < end:
            chunk = pos // cs
            stop = min(end, (chunk + 1) * cs)
            slot = held.map.get(chunk)
            if slot is None:
                # Runs of chunks read from the device in one call.
                while stop < end and held.map.get(stop // cs) is None:
                    stop = min(end, stop + cs)
                self.device.pread_into(view[pos - offset:stop - offset], pos)
            else:
                self.store.file.pread_into(view[pos - offset:stop - offset],
                                           self.store.slot_offset(slot) + pos - chunk * cs)
            pos = stop
        return out

    async def read_snapshot(self, number: int, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        if not size:
            return b""
        held = self._held(number)
        data = self._snapshot_view(held, offset, size)
        if (number, offset) in self.read_ends:  # it goes on where a recent read ended
            self._read_ahead(held, -(-(offset + size) // self.chunk_size))
        self.read_ends.append((number, offset + size))
        return data

    def _read_ahead(self, held: fmt.HeldSnapshot, chunk: int) -> None:
        """For a sequential reader at `chunk`: once it is within half of READ_AHEAD
        of where the last hint for this snapshot ended, ask the kernel to read the
        store slots of the next READ_AHEAD bytes of chunks (POSIX_FADV_WILLNEED: it
        starts the reads and returns). Copies are written uncached, so a backup
        reading a snapshot in order would otherwise wait for the disk at every chunk
        the store holds, one read at a time; the kernel's own read-ahead follows the
        store's slots, not the snapshot's order."""
        window = max(1, READ_AHEAD // self.chunk_size)
        hinted = self.read_ahead_to.get(held.number, 0)
        if chunk + window // 2 < hinted:
            return
        start, end = max(chunk, hinted), min(self.n_chunks, chunk + window)
        self.read_ahead_to[held.number] = end
        slots = sorted(slot for c in range(start, end) if (slot := held.map.get(c)) is not None)
        for first, stop in _runs(slots):
            os.posix_fadvise(self.store.file.fd, self.store.slot_offset(first),
                             (stop - first) * self.chunk_size, os.POSIX_FADV_WILLNEED)

    async def write_snapshot(self, number: int, offset: int, data: bytes) -> int:
        check_range(self.size, offset, len(data))
        self._held(number)
        if not data:
            return 0
        cs = self.chunk_size
        first, end = offset // cs, -(-(offset + len(data)) // cs)
        async with self.cbw.writing(first, end, plan=lambda a, b: self.plan_snapshot_write(number, a, b)):
            held = self._held(number)
            pos, view = offset, memoryview(data)
            while view:
                chunk = pos // cs
                piece = view[:(chunk + 1) * cs - pos]
                self.store.file.pwrite(piece, self.store.slot_offset(held.map[chunk]) + pos - chunk * cs)
                pos += len(piece)
                view = view[len(piece):]
        return len(data)

    # -- take and release ------------------------------------------------------------------

    def control(self, verb: str, args: list[str]):
        if args == ["take"]:
            return self.take()
        if len(args) == 2 and args[0] == "release" and args[1].isdigit():
            return self.release(int(args[1]))
        raise ValueError(f"snapshot takes 'take' or 'release N', not {' '.join(args)!r}")

    async def take(self) -> int:
        if self.store_failed:
            raise OSError(errno.EIO, f"no snapshot taken: {self.store_failed} (re-mount first)")
        # Every chunk held: no origin write is between its copy and its overwrite.
        async with self.cbw.exclusive(0, self.n_chunks):
            number = self.state.next_snapshot
            self._append([fmt.Record(fmt.TAKE, number)])
            if self.table_unwritable:
                raise OSError(errno.EIO, f"snapshot {number} not taken: {self.store_failed}")
            try:
                await trio.to_thread.run_sync(self.store.file.fsync)
            except OSError as exc:
                # The take fails as a whole: its RELEASE follows the TAKE, so a table
                # that has both never shows the snapshot; the rest is a store failure.
                self._append([fmt.Record(fmt.RELEASE, number)])
                await self._store_failure(exc)
                raise OSError(exc.errno, f"snapshot {number} not taken: the store's fsync failed") from None
            self.snapshots[number] = SnapshotImage(self, number)
        log.info("took snapshot %d (generation %s)", number, self.state.generation)
        return number

    async def release(self, number: int) -> None:
        if number not in self.state.held:
            raise OSError(errno.ENOENT, f"no snapshot {number}")
        async with self.cbw.exclusive(0, self.n_chunks):
            self._append([fmt.Record(fmt.RELEASE, number)])
            self.snapshots.pop(number).released = True
            self.read_ahead_to.pop(number, None)
            # Ordering: the release is durable before its slots can take new copies.
            await self._sync_store()
        log.info("released snapshot %d", number)

    # -- live upgrade ----------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        if self.recovery_deferred:
            self._recover()

    def handover_fds(self) -> dict[str, int]:
        return {self.device.path: self.device.fd, self.store.path: self.store.file.fd}

    def handover_state(self) -> dict:
        """The table is handed over through the store file (page cache, shared with
        the successor): the state says where it stands, and the successor applies
        the records after those it read when it opened the image. The rest is what
        the table does not say. In the pause no request is in flight, so no copy is
        (`idle`), and the table says everything the state holds."""
        idle = self.cbw.idle
        return {**super().handover_state(), "device": self.device.path, "store": self.store.path,
                "epoch": self.epoch, "region": self.region, "append_at": self.append_at,
                "slot_end": self.slot_end, "free_slots": _runs(self.free_slots),
                "pending_free": self.pending_free, "dirty": self.dirty,
                "store_failed": self.store_failed, "table_unwritable": self.table_unwritable,
                "records_appended": self.records_appended, "idle": idle,
                "figures": self._state_figures() if idle else None}

    def _state_figures(self) -> list:
        """A cheap fingerprint of the state, compared after a hand-over."""
        held = self.state.held
        return [self.state.generation, self.state.next_snapshot, sorted(held),
                [held[n].corrupted for n in sorted(held)], sum(len(h.map) for h in held.values()),
                len(self.state.refs), len(self.state.changed)]

    def restore_handover_state(self, state: dict) -> None:
        self.check_handover_state(state)
        if (state["device"], state["store"]) != (self.device.path, self.store.path):
            raise ValueError(f"{self.name}: handed over for {state['device']} with store {state['store']}, "
                             f"but opened {self.device.path} with {self.store.path}")
        try:
            if (state["epoch"], state["region"]) == (self.epoch, self.region):
                records = fmt.read_records(self.store.file.pread, self.store.sb, self.region,
                                           self.epoch, self.append_at, state["append_at"])
                for record in records:
                    self.state.apply(record)
            else:  # the old server compacted its table after we read it: read it again
                self.state = fmt.StoreState(*self._region_header(state["region"], state["epoch"]))
                for record in fmt.read_records(self.store.file.pread, self.store.sb, state["region"],
                                               state["epoch"], 0, state["append_at"]):
                    self.state.apply(record)
        except fmt.StoreFormatError as exc:
            raise ValueError(f"{self.store.path}: {exc}") from None
        self.state.freed.clear()  # the old server's pending_free says which are not reusable yet
        self.epoch, self.region, self.append_at = state["epoch"], state["region"], state["append_at"]
        self.slot_end = self.preallocated_end = state["slot_end"]
        self.free_slots = SortedList(slot for first, end in state["free_slots"] for slot in range(first, end))
        self.pending_free = list(state["pending_free"])
        self.dirty, self.records_appended = state["dirty"], state["records_appended"]
        # In the pause no round runs, so a DIRTY in force had its fsync (a failed one
        # leaves store_failed, which keeps marks in rounds).
        self.dirty_durable = self.dirty
        self.store_failed = state["store_failed"]
        self.table_unwritable = state.get("table_unwritable", False)  # (builds before it had none)
        if self.store_failed:
            self._corrupt_all_unrecorded()
        for number in [n for n in self.snapshots if n not in self.state.held]:
            self.snapshots.pop(number).released = True
        for number in self.state.held:
            self.snapshots.setdefault(number, SnapshotImage(self, number))
        if state["idle"] and self._state_figures() != state["figures"]:
            raise ValueError(f"{self.name}: the table read from {self.store.path} "
                             f"({self._state_figures()}) is not the old server's ({state['figures']})")
        self.recovery_deferred = False  # the state is the old server's: nothing to recover

    def _region_header(self, region: int, epoch: int) -> tuple[str, int]:
        header = fmt.TableHeader.unpack(self.store.file.pread(fmt.HEADER_SIZE, self.store.sb.region_offset(region)))
        if header is None or header.epoch != epoch:
            raise fmt.StoreFormatError(f"table region {region} is not of epoch {epoch} any more")
        return header.generation, header.next_snapshot

    # -- status, files, teardown ----------------------------------------------------------

    def files(self) -> list[tuple[str, Image]]:
        files: list[tuple[str, Image]] = [(self.name, self)]
        for number in sorted(self.snapshots):
            files.append((self.snapshots[number].name, self.snapshots[number]))
        if self.snapshots:
            files.append(("snapshot.img", self.snapshots[max(self.snapshots)]))
        return files

    @property
    def store_bytes(self) -> int:
        return self.store.slot_offset(len(self.state.refs))

    def status(self) -> dict:
        low = self.store.max_slots - len(self.state.refs) < LOW_SPACE_FRACTION * self.store.max_slots
        return {"size": self.size, "device": self.device.path, "store": self.store.path,
                "store_bytes": self.store_bytes, "limit": self.store.limit, "chunk_size": self.chunk_size,
                "generation": self.state.generation, "newest": self.newest if self.snapshots else None,
                "warning": "low-space" if low and self.snapshots else "",
                "store_error": self.store_failed, "copies_at_once": self.copies_at_once, **self.cbw.status()}

    async def close(self) -> None:
        try:
            self.device.fsync()
            self.store.file.fsync()
            if self.dirty and not self.store_failed:
                self._append([fmt.Record(fmt.CLEAN)])  # after the fsync that covered everything
                self.store.file.fsync()
        finally:
            self._unmap_device_window()
            self.device.close()
            self.store.file.close()


class SnapshotImage(Image):
    """`snapshot-<N>.img`: held snapshot N (reads and writes go through the origin's
    maps; its store is the origin's)."""
    target = "snapshot"
    status_line_keys = ("chunks_stored", "store_bytes", "limit", "state")

    def __init__(self, origin: OriginImage, number: int):
        super().__init__(f"snapshot-{number}.img", origin.size, read_only=False)
        self.origin = origin
        self.number = number
        self.released = False

    async def read(self, offset: int, size: int) -> bytes:
        return await self.origin.read_snapshot(self.number, offset, size)

    async def write(self, offset: int, data: bytes) -> int:
        return await self.origin.write_snapshot(self.number, offset, data)

    async def flush(self) -> None:
        await self.origin.flush()

    def status(self) -> dict:
        held = self.origin.state.held.get(self.number)
        reason = fmt.REASONS.get(held.corrupted) if held else "released"
        return {"number": self.number, "id": f"{self.origin.state.generation}:{self.number}",
                "chunks_stored": len(held.map) if held else 0, "store_bytes": self.origin.store_bytes,
                "limit": self.origin.store.limit, "state": "active" if held and not held.corrupted else "corrupted",
                "reason": reason}


def _runs(slots) -> list[tuple[int, int]]:
    """Sorted slots as [first, end) runs (a short list where there are many)."""
    runs: list[list[int]] = []
    for slot in slots:
        if runs and runs[-1][1] == slot:
            runs[-1][1] += 1
        else:
            runs.append([slot, slot + 1])
    return [tuple(run) for run in runs]


# -- mount options ------------------------------------------------------------------------

def chunk_size_arg(text: str) -> int:
    value = arguments.size(text)
    if value < 4096 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two of at least 4096, got {text}")
    return value


def add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("snapshots (origin.img, snapshot.img)")
    group.add_argument("--snapshot", metavar="DEV", type=arguments.device, help="expose origin.img (DEV) and its snapshots")
    group.add_argument("--store", metavar="FILE", type=arguments.path, help="the snapshots' store, created if missing")
    group.add_argument("--store-limit", type=arguments.size, metavar="SIZE",
                       help="the most the store may grow to (default: the size of DEV)")
    group.add_argument("--chunk-size", type=chunk_size_arg, metavar="BYTES",
                       help="copy granularity, a power of two (default: from DEV's size, at least 256K)")


def _filesystem_device_of(path: str) -> int:
    directory = os.path.dirname(path) or "."
    try:
        return os.stat(directory).st_dev
    except OSError as exc:
        raise UserError(f"cannot keep the store {path}: {directory}: {exc.strerror}") from None


def refuse_store_on_device(store_path: str, device: BlockDevice) -> None:
    """A store on a filesystem that lives on DEV itself would copy into itself."""
    st_dev = _filesystem_device_of(store_path)
    dev_stat = os.fstat(device.fd)
    sys_dir = f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}"
    inside = False
    if device.is_block_device:
        # DEV itself, or a partition of DEV
        parent = os.path.join(sys_dir, "..", "dev")
        inside = st_dev == dev_stat.st_rdev or (
            os.path.exists(os.path.join(sys_dir, "partition")) and os.path.exists(parent)
            and open(parent).read().strip() == f"{os.major(dev_stat.st_rdev)}:{os.minor(dev_stat.st_rdev)}")
    else:
        # a loop device over DEV's file
        try:
            with open(os.path.join(sys_dir, "loop", "backing_file")) as f:
                backing = os.stat(f.read().strip())
            inside = (backing.st_dev, backing.st_ino) == (dev_stat.st_dev, dev_stat.st_ino)
        except OSError:
            pass
    if inside:
        raise UserError(f"the store {store_path} is on a filesystem on {device.path} itself: "
                        "put it on another device")


def images_from_args(args: argparse.Namespace) -> list[Image]:
    if not args.snapshot:
        if args.store:
            raise UserError("--store needs --snapshot DEV")
        return []
    if not args.store:
        raise UserError("--snapshot needs --store FILE (where old chunks are kept)")
    device = BlockDevice(args.snapshot)
    store = None
    try:
        if device.read_only:
            raise UserError(f"{device.path} is read-only: origin.img needs to write it")
        store_path = args.store
        refuse_store_on_device(store_path, device)
        limit = args.store_limit if args.store_limit is not None else max(device.size, 64 << 20)
        store = Store(store_path, device, args.chunk_size, limit)
        try:
            fcntl.flock(store.file.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"the store {store_path} is in use by another mount", EXIT_FAILED) from None
        try:
            return [OriginImage(device, store)]
        except OSError as exc:
            raise UserError(f"cannot use the store {store_path}: {exc.strerror}", EXIT_FAILED) from None
    except BaseException:
        if store is not None:
            store.file.close()
        device.close()
        raise


# -- the command line -------------------------------------------------------------------

USAGE_EXAMPLES = """\
  fusesnap mount mnt --snapshot /dev/sdb1 --store /var/lib/fusesnap/sdb1.store   # mnt/origin.img
  fusesnap snapshot take mnt                                  # prints GEN:N; mnt/snapshot.img appears
  dd if=mnt/snapshot.img of=/backup/full.img bs=4M            # a consistent full backup
  fusesnap snapshot changes mnt --since GEN:N                 # next time: what changed since N
  fusesnap snapshot release mnt                               # drop the oldest snapshot"""


def add_commands(commands) -> None:
    p = commands.add_parser("snapshot", help="snapshots: take, release, list, changes",
                            description="Take and release snapshots of origin.img in a mount, list "
                            "them, and print what changed since one (for incremental backups).")
    actions = p.add_subparsers(dest="snapshot_action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    q = actions.add_parser("take", help="take a snapshot; prints its id GEN:N")
    q.add_argument("mountpoint", metavar="MOUNTPOINT", type=arguments.path)
    q.add_argument("--no-freeze", action="store_true",
                   help="do not freeze filesystems mounted from loop devices on origin.img")
    q.set_defaults(run=cmd_take)
    q = actions.add_parser("release", help="drop a snapshot (the oldest if no ID) and free its store space")
    q.add_argument("mountpoint", metavar="MOUNTPOINT", type=arguments.path)
    q.add_argument("id", metavar="ID", nargs="?", help="N or GEN:N")
    q.set_defaults(run=cmd_release)
    q = actions.add_parser("list", help="the held snapshots")
    q.add_argument("mountpoint", metavar="MOUNTPOINT", type=arguments.path)
    q.add_argument("--json", action="store_true", help="as JSON")
    q.set_defaults(run=cmd_list)
    q = actions.add_parser("changes", help="byte ranges changed since snapshot N of generation GEN")
    q.add_argument("mountpoint", metavar="MOUNTPOINT", type=arguments.path)
    q.add_argument("--since", required=True, metavar="GEN:N")
    q.add_argument("--json", action="store_true", help="as JSON")
    q.set_defaults(run=cmd_changes)


def _origin_figures(mountpoint: str) -> tuple[dict, list[dict]]:
    require_image(mountpoint, "origin", "mount it with --snapshot DEV --store FILE")
    images = json.loads(read_status(mountpoint, True))["images"]
    origin = next(f for f in images.values() if f["target"] == "origin")
    snapshots = sorted((f for name, f in images.items() if f["target"] == "snapshot"
                        and name != "snapshot.img"), key=lambda f: f["number"])
    return origin, snapshots


def mounts_on_loops_of(image_path: str) -> list[str]:
    """Mount points of filesystems on loop devices backed by `image_path`."""
    wanted = {f"{os.major(os.stat(dev).st_rdev)}:{os.minor(os.stat(dev).st_rdev)}"
              for dev, backing in loop_devices_backed_under(os.path.dirname(image_path))
              if backing == image_path}
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[2] in wanted:
                found.append(fields[4].encode().decode("unicode_escape"))
    return found


def cmd_take(args) -> int:
    _origin_figures(args.mountpoint)
    frozen = []
    try:
        if not args.no_freeze:
            for mount_point in mounts_on_loops_of(os.path.realpath(os.path.join(args.mountpoint, "origin.img"))):
                fd = os.open(mount_point, os.O_RDONLY)
                try:
                    fcntl.ioctl(fd, FIFREEZE, 0)
                except OSError as exc:
                    os.close(fd)
                    raise UserError(f"cannot freeze {mount_point}: {exc.strerror} (use --no-freeze)",
                                    EXIT_FAILED) from None
                frozen.append(fd)
        send_command(args.mountpoint, "snapshot take")
    finally:
        for fd in frozen:
            try:
                fcntl.ioctl(fd, FITHAW, 0)
            finally:
                os.close(fd)
    origin, _ = _origin_figures(args.mountpoint)
    print(f"{origin['generation']}:{origin['newest']}")
    return 0


def _parse_id(text: str, generation: str) -> int:
    gen, _, number = text.rpartition(":")
    if not number.isdigit():
        raise UserError(f"not a snapshot id: {text} (N or GEN:N)")
    if gen and gen != generation:
        raise UserError(f"snapshot {text} is of generation {gen}, the store's is {generation}", EXIT_FAILED)
    return int(number)


def cmd_release(args) -> int:
    origin, snapshots = _origin_figures(args.mountpoint)
    if not snapshots:
        raise UserError(f"{args.mountpoint} holds no snapshot", EXIT_FAILED)
    number = _parse_id(args.id, origin["generation"]) if args.id else snapshots[0]["number"]
    if number not in {s["number"] for s in snapshots}:
        raise UserError(f"no snapshot {number} in {args.mountpoint}", EXIT_FAILED)
    send_command(args.mountpoint, f"snapshot release {number}")
    return 0


def cmd_list(args) -> int:
    origin, snapshots = _origin_figures(args.mountpoint)
    if args.json:
        print(json.dumps({"generation": origin["generation"], "snapshots": snapshots}, indent=1))
        return 0
    for s in snapshots:
        reason = f" ({s['reason']})" if s["state"] != "active" else ""
        print(f"{s['id']} snapshot-{s['number']}.img {s['chunks_stored']} chunks {s['state']}{reason}")
    return 0


def cmd_changes(args) -> int:
    origin, _ = _origin_figures(args.mountpoint)
    gen, _, number = args.since.rpartition(":")
    if not gen or not number.isdigit():
        raise UserError(f"--since wants GEN:N (as `snapshot take` printed), not {args.since}")
    # The store's table, read as the server wrote it (takes fsync it, so everything
    # up to the newest take is there).
    store = BlockDevice(origin["store"], read_only=True, image_device=False)
    try:
        sb = fmt.Superblock.unpack(store.pread(fmt.SUPERBLOCK_SIZE, 0))
        loaded = fmt.load_state(store.pread, sb)
    except fmt.StoreFormatError as exc:
        raise UserError(f"{origin['store']}: {exc}", EXIT_FAILED) from None
    finally:
        store.close()
    if loaded is None:
        raise UserError(f"{origin['store']}: no intact table", EXIT_FAILED)
    state = loaded[0]
    if gen != state.generation:
        raise UserError(f"generation {gen} is not the store's ({state.generation}): "
                        "a full backup is needed", EXIT_FAILED)
    cs, size = sb.chunk_size, sb.device_size
    ranges = [(a * cs, min(b * cs, size) - a * cs) for a, b in state.changed_since(int(number))]
    if args.json:
        print(json.dumps({"generation": state.generation, "since": int(number),
                          "chunk_size": cs, "ranges": ranges}))
    else:
        sys.stdout.writelines(f"{offset} {length}\n" for offset, length in ranges)
    return 0
