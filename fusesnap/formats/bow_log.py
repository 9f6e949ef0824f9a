"""The backup-on-write log: Android dm-bow 1.2's on-disk format, and its restore.

See /work/shared/formats.md section 2 for the byte layout. In short: while a device
is checkpointed its first block is a *log block*: a 28-byte header (magic "BOW",
version 0x0100, block size, entry count, sequence, `sector0` = where the live block
0 sits) and 24-byte entries ``(source, dest, size, checksum)`` saying "the old
contents of `size` bytes at sector `source` were copied to sector `dest`". When a log
block fills, it is itself backed up (entry 0 of the next sequence, source 0).

What this module owns (pure format logic, no trio, no policy):
  - `LogBlock` / `LogEntry`: pack, unpack, checksum (`block_checksum`).
  - `validate(device)`: the whole log checked without writing anything, by
    simulating the restore on a relocation map -- every log block (magic, version,
    sizes, sequence), every entry (sizes, alignment, bounds) and every checksum, as
    Android's vold does before it restores (Checkpoint.cpp, cp_restoreCheckpoint).
  - `restore(device)`: copy every backup back so that the device is the checkpoint
    again; a re-run after an interruption at any point (power cut included)
    finishes the job. Two ways, same result:
      directly, when no backup sits where another is restored to (`direct_plan`;
      the usual case): the backups validation read (adjacent ones at once) and
      checked, kept in memory up to RESTORE_MEMORY, are written back in source
      order (adjacent sources in one write), one fsync, then block 0 (which kept
      the log until then) and a second fsync. Interrupted, the log is intact and
      every backup unchanged: it validates and restores again.
      in log order otherwise (a backup or block 0's live copy was moved), newest
      first, resumable exactly as vold's: before a copy would overwrite a sector
      read earlier in the same pass, the progress (the log block with the
      remaining entry count and the magic "WOB") is written to block 0 between two
      fsyncs. A device left half-restored by vold resumes here and the other way
      round.

`device` is anything with ``pread(size, offset)``, ``pwrite(data, offset)``,
``fsync()`` and ``size`` (a `fusesnap.devices.BlockDevice`). Every violation raises
`BowLogError`, one line naming the log block, the entry and the rule.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import functools
import operator
import struct
import zlib
from typing import Callable, NamedTuple

from ..devices import WriteBehind
from ..rangemap import RangeMap

MAGIC = 0x00574F42                  # "BOW": a log
PARTIAL_RESTORE_MAGIC = 0x00424F57  # "WOB": a restore is in progress
HEADER_VERSION = 0x0100
SECTOR = 512
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 512, 4096

_HEADER = struct.Struct("<IHHIIIQ")
_ENTRY = struct.Struct("<QQII")
HEADER_SIZE = _HEADER.size          # 28
ENTRY_SIZE = _ENTRY.size            # 24
assert (HEADER_SIZE, ENTRY_SIZE) == (28, 24)


class BowLogError(ValueError):
    """The log breaks a rule of the format; the message says where and which."""


def entries_per_block(block_size: int) -> int:
    """Entries that fit in one log block (169 at 4 KiB)."""
    return (block_size - HEADER_SIZE) // ENTRY_SIZE


def valid_block_size(block_size: int) -> bool:
    return MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0


def block_checksum(source_sector: int, data, block_size: int) -> int:
    """Linux crc32_le (reflected, no inversion) seeded with the source block index,
    over `data` block after block: the checksum of a log entry."""
    seed = source_sector // (block_size // SECTOR)
    return zlib.crc32(data, (seed & 0xFFFFFFFF) ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


class LogEntry(NamedTuple):
    """One backup (a tuple: a log holds thousands, built and sorted by the restore)."""
    source: int     # sector of the data that was overwritten
    dest: int       # sector of its backup copy
    size: int       # bytes
    checksum: int   # of the backed-up data; 0 = not recorded

    def pack(self) -> bytes:
        return _ENTRY.pack(self.source, self.dest, self.size, self.checksum)


@dataclasses.dataclass
class LogBlock:
    block_size: int
    sequence: int
    sector0: int
    entries: list[LogEntry] = dataclasses.field(default_factory=list)
    magic: int = MAGIC
    header_version: int = HEADER_VERSION
    header_size: int = HEADER_SIZE

    @property
    def full(self) -> bool:
        return len(self.entries) >= entries_per_block(self.block_size)

    def pack(self, *, count: int | None = None, magic: int | None = None) -> bytes:
        """The block as written to block 0 (zero-padded to block_size)."""
        count = len(self.entries) if count is None else count
        out = bytearray(self.block_size)
        _HEADER.pack_into(out, 0, self.magic if magic is None else magic, self.header_version,
                          self.header_size, self.block_size, count, self.sequence, self.sector0)
        for index, entry in enumerate(self.entries):
            _ENTRY.pack_into(out, self.header_size + index * ENTRY_SIZE, entry.source, entry.dest,
                             entry.size, entry.checksum)
        return bytes(out)

    @classmethod
    def unpack_header(cls, data: bytes) -> tuple[int, int, int, int, int, int, int]:
        """(magic, version, header_size, block_size, count, sequence, sector0)."""
        if len(data) < HEADER_SIZE:
            raise BowLogError(f"log header truncated ({len(data)} of {HEADER_SIZE} bytes)")
        return _HEADER.unpack_from(data, 0)

    @classmethod
    def unpack(cls, data: bytes, *, where: str = "log block", resuming: bool = False) -> LogBlock:
        """Parse and check one log block (the rules vold checks, plus the version)."""
        magic, version, header_size, block_size, count, sequence, sector0 = cls.unpack_header(data)
        if magic != MAGIC and not (resuming and magic == PARTIAL_RESTORE_MAGIC):
            raise BowLogError(f"{where}: bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}, \"BOW\")")
        if version != HEADER_VERSION:
            raise BowLogError(f"{where}: unknown header version 0x{version:04x} (expected 0x0100)")
        if not valid_block_size(block_size):
            raise BowLogError(f"{where}: invalid block size {block_size} (a power of two, 512..4096)")
        if not HEADER_SIZE <= header_size <= block_size - ENTRY_SIZE:
            raise BowLogError(f"{where}: invalid header size {header_size}")
        if len(data) < block_size:
            raise BowLogError(f"{where}: truncated ({len(data)} of {block_size} bytes)")
        most = (block_size - header_size) // ENTRY_SIZE
        if not 1 <= count <= most:
            raise BowLogError(f"{where}: invalid entry count {count} (1..{most})")
        entries = list(map(LogEntry._make, _ENTRY.iter_unpack(data[header_size:header_size + count * ENTRY_SIZE])))
        return cls(block_size, sequence, sector0, entries, magic, version, header_size)


def read_header(device) -> LogBlock | None:
    """Block 0 as a log block, or None if it has neither magic (no log)."""
    head = device.pread(HEADER_SIZE, 0)
    if len(head) < HEADER_SIZE:
        return None
    magic = LogBlock.unpack_header(head)[0]
    if magic not in (MAGIC, PARTIAL_RESTORE_MAGIC):
        return None
    block_size = LogBlock.unpack_header(head)[3]
    if not valid_block_size(block_size):
        raise BowLogError(f"block 0: invalid block size {block_size} (a power of two, 512..4096)")
    return LogBlock.unpack(device.pread(block_size, 0), where="block 0", resuming=True)


# -- validation: the restore simulated on a relocation map ----------------------------

# The most bytes read (or, restoring directly, written) at once.
DIRECT_IO_BYTES = 8 << 20
# The most backup data a direct restore holds in memory: what validation read (and
# checked) is written back from memory up to this much; beyond it, read again in
# batches of this much once those are written.
RESTORE_MEMORY = 256 << 20
# Restored data is handed to the disk (`WriteBehind`) every this many bytes of the device.
WRITE_BEHIND_BYTES = 4 << 20

class _Relocations:
    """Where each sector's restored data would be read from: sector s reads device
    sector s + delta (RangeMap sector -> delta; unmapped = in place)."""

    def __init__(self):
        self.deltas = RangeMap(index_values=False)

    def relocate(self, source: int, dest: int, count: int) -> None:
        """After restoring, [source, source+count) holds what [dest, dest+count) holds now."""
        moved = [(s - dest + source, e - dest + source, (s + (d or 0)) - (s - dest + source))
                 for s, e, d in self.deltas.segments(dest, dest + count)]
        for s, e, delta in moved:
            self.deltas.assign(s, e, delta or None)

    def read(self, device, sector: int, size: int) -> bytes:
        segments = self.deltas.segments(sector, sector + size // SECTOR)
        if len(segments) == 1:  # the usual case: one read, no copying
            s, e, delta = segments[0]
            return device.pread(size, (s + (delta or 0)) * SECTOR)
        out = bytearray()
        for s, e, delta in segments:
            out += device.pread((e - s) * SECTOR, (s + (delta or 0)) * SECTOR)
        return bytes(out)


@dataclasses.dataclass
class LogSummary:
    """What `validate` learned: the log blocks newest first and their figures."""
    blocks: list[LogBlock]
    resuming: bool            # block 0 carries "WOB": a restore was interrupted
    # Backups of a direct log as validation read and checked them (`validate`'s
    # keep_backups): a restore writes these from memory.
    backups: dict[LogEntry, memoryview] = dataclasses.field(default_factory=dict, repr=False)

    @functools.cached_property
    def entries(self) -> int:
        return sum(len(b.entries) for b in self.blocks)

    @functools.cached_property
    def backed_up_bytes(self) -> int:
        return sum(e.size for b in self.blocks for e in b.entries)

    @functools.cached_property
    def direct(self) -> tuple[list[LogEntry], LogEntry] | None:
        """`direct_plan(self)`, worked out once."""
        return direct_plan(self)


def _check_entry(entry: LogEntry, block_size: int, device_size: int, where: str, index: int) -> None:
    source, dest, size, _ = entry
    per_block = block_size // SECTOR
    if (size >= block_size and not size % block_size and not source % per_block and not dest % per_block
            and max(source, dest) * SECTOR + size <= device_size):
        return  # (the usual case, checked at once: a log holds thousands of entries)
    where = f"{where}, entry {index}"
    if size < block_size or size % block_size:
        raise BowLogError(f"{where}: size {size} is not a positive multiple of the block size {block_size}")
    for name, sector in (("source", source), ("dest", dest)):
        if sector % per_block:
            raise BowLogError(f"{where}: {name} sector {sector} is not block-aligned")
        if sector * SECTOR + size > device_size:
            raise BowLogError(f"{where}: {name} sector {sector} + {size} bytes is beyond the "
                              f"end of the device ({device_size} bytes)")


def validate(device, *, keep_backups: bool = False) -> LogSummary:
    """Check the whole log without writing: BowLogError on the first violation.

    The restore is simulated on a relocation map (`_Relocations`), which costs a
    range-map update per entry. The usual log needs none of it: when no backup sits
    where another entry's data is restored to (`direct_plan`), every backup is read
    where it lies and only block 0 moves, so the log is first walked that way
    (`_Block0Chain`) and its backups read in runs and checked. If that walk finds
    anything wrong, or the log is not direct, the full simulation runs and has the
    last word (it names the first violation).

    `keep_backups`: the checked backups of a direct log stay in memory, up to
    RESTORE_MEMORY bytes (`LogSummary.backups`), so that `restore` writes them back
    without reading and checking them a second time."""
    top = read_header(device)
    if top is None:
        raise BowLogError("no backup-on-write log on this device (block 0 has no BOW magic)")
    per_block = top.block_size // SECTOR
    if top.sector0 % per_block or top.sector0 * SECTOR + top.block_size > device.size or top.sector0 == 0:
        raise BowLogError(f"block 0: sector0 {top.sector0} is not a block of the device")
    try:
        summary = _walk(device, top, _Block0Chain(), check_backups=False)
        if summary.direct is not None:
            every_backup = sorted((entry for block in summary.blocks for entry in block.entries),
                                  key=_by_dest)
            summary.backups = _read_backups(device, every_backup, top.block_size,
                                            keep=RESTORE_MEMORY if keep_backups else 0)
            return summary
    except BowLogError:
        pass
    return _walk(device, top, _Relocations(), check_backups=True)


class _Block0Chain:
    """The relocations of a direct log (`direct_plan`): no entry's source overlaps a
    backup, so backups are read in place and only block 0 moves, to the backup of
    the newest block-0 entry walked so far (a later log block's entry 0)."""

    def __init__(self):
        self.block0_at = 0

    def relocate(self, source: int, dest: int, count: int) -> None:
        if source == 0:
            self.block0_at = dest

    def read(self, device, sector: int, size: int) -> bytes:
        assert sector == 0, "only log blocks are read while walking a direct log"
        return device.pread(size, self.block0_at * SECTOR)


def _walk(device, top: LogBlock, relocations, *, check_backups: bool) -> LogSummary:
    """Every log block newest first, each read where the restore so far would have
    put block 0, and every entry checked (its backup's checksum if `check_backups`),
    the restore simulated on `relocations`."""
    resuming = top.magic == PARTIAL_RESTORE_MAGIC
    block_size = top.block_size
    blocks = []
    for sequence in range(top.sequence, -1, -1):
        where = f"log block {sequence}"
        data = relocations.read(device, 0, block_size)
        magic_block_size = LogBlock.unpack_header(data)[3]
        if magic_block_size != block_size:
            raise BowLogError(f"{where}: block size {magic_block_size} differs from block 0's {block_size}")
        block = LogBlock.unpack(data, where=where, resuming=resuming)
        if block.sequence != sequence:
            raise BowLogError(f"{where}: sequence {block.sequence} where {sequence} was expected")
        for index in range(len(block.entries) - 1, -1, -1):
            entry = block.entries[index]
            _check_entry(entry, block_size, device.size, where, index)
            if sequence > 0 and index == 0 and entry.source != 0:
                raise BowLogError(f"{where}, entry {index}: the first entry of a later log block must back "
                                  f"up block 0, not sector {entry.source}")
            if check_backups and entry.checksum:
                data = relocations.read(device, entry.dest, entry.size)
                actual = block_checksum(entry.source, data, block_size)
                if actual != entry.checksum:
                    raise BowLogError(f"{where}, entry {index}: checksum mismatch: recorded 0x{entry.checksum:08x}, "
                                      f"backup at sector {entry.dest} has 0x{actual:08x}")
            relocations.relocate(entry.source, entry.dest, entry.size // SECTOR)
        blocks.append(block)
    return LogSummary(blocks, resuming)


_by_dest = operator.attrgetter("dest")
_by_source = operator.attrgetter("source")


def _read_backups(device, entries: list[LogEntry], block_size: int, *,
                  keep: int) -> dict[LogEntry, memoryview]:
    """Read the backups of `entries` (sorted by dest; adjacent ones at once) and check
    each against its entry's checksum (BowLogError if one differs). Returns the
    backups of the runs that fit in `keep` bytes, first come first kept.

    A worker thread reads the next run while this one is checked (on the random
    bench's log the reads into fresh memory took 35 ms, the checks 19 ms)."""
    kept = {}
    runs = list(_runs(entries, _by_dest))

    def read(run):
        at = run[0].dest * SECTOR
        return at, memoryview(device.pread(run[-1].dest * SECTOR + run[-1].size - at, at))

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        ahead = pool.submit(read, runs[0]) if runs else None
        for index, run in enumerate(runs):
            at, data = ahead.result()
            ahead = pool.submit(read, runs[index + 1]) if index + 1 < len(runs) else None
            backups = [data[entry.dest * SECTOR - at:entry.dest * SECTOR - at + entry.size] for entry in run]
            for entry, backup in zip(run, backups):
                _check_backup(entry, backup, block_size)
            if keep >= len(data):
                kept.update(zip(run, backups))
                keep -= len(data)
    return kept


def _runs(entries: list[LogEntry], sector_of: Callable[[LogEntry], int]):
    """`entries` (sorted by `sector_of`: dest or source) in runs that follow each
    other on the device at `sector_of`, each at most DIRECT_IO_BYTES: one read or
    one write each."""
    start = 0
    while start < len(entries):
        stop = start + 1
        first = sector_of(entries[start]) * SECTOR
        end = first + entries[start].size
        while (stop < len(entries) and sector_of(entries[stop]) * SECTOR == end
               and end + entries[stop].size - first <= DIRECT_IO_BYTES):
            end += entries[stop].size
            stop += 1
        yield entries[start:stop]
        start = stop


# -- restore ----------------------------------------------------------------------------


def restore(device, *, validated: LogSummary | None = None,
            progress: Callable[[int], None] | None = None,
            stop_after: int | None = None) -> LogSummary:
    """Validate (unless `validated` is what `validate(device)` just returned), then
    copy every backup back; the device is then the checkpoint. Resumable: re-running
    after an interruption at any point (power cut included) finishes.

    Directly (`_restore_directly`) when no backup is read from where another one is
    restored to (the usual case); otherwise in log order, newest first
    (`_restore_in_log_order`). `progress(bytes)` is called after each copy.
    `stop_after` (tests only) stops after that many entries are restored, as an
    interruption would.
    """
    summary = validated or validate(device, keep_backups=True)
    plan = summary.direct
    if plan is not None:
        _restore_directly(device, summary, *plan, progress=progress, stop_after=stop_after)
    else:
        _restore_in_log_order(device, summary, progress=progress, stop_after=stop_after)
    return summary


def direct_plan(summary: LogSummary) -> tuple[list[LogEntry], LogEntry] | None:
    """The entries to restore directly (sorted by source) and the one that restores
    block 0, or None if the log needs its order.

    In log order each entry copies its backup (dest) over its source, and a later
    log block reaches block 0 through its entry 0. When no dest overlaps any source
    or block 0, and no two sources overlap (except whole block 0, restored by every
    log block's entry 0 and last by the oldest), every backup still holds what it
    held when validated until the restore ends, and each source is written once: the
    copies may then go in any order, block 0 last, with the same result."""
    block_size = summary.blocks[0].block_size
    in_order = [entry for block in summary.blocks for entry in reversed(block.entries)]
    block0 = [entry for entry in in_order if entry.source == 0 and entry.size == block_size]
    if not block0:
        return None
    others = sorted((entry for entry in in_order if not (entry.source == 0 and entry.size == block_size)),
                    key=_by_source)
    starts = [0] + [entry.source for entry in others]  # (block 0 first, then every other source)
    ends = [block_size // SECTOR] + [entry.source + entry.size // SECTOR for entry in others]
    if any(map(operator.gt, ends, starts[1:])):  # a source ends after the next one starts
        return None
    for entry in in_order:
        # The source that starts last before the dest's end must end before the dest starts.
        index = bisect.bisect_left(starts, entry.dest + entry.size // SECTOR) - 1
        if index >= 0 and ends[index] > entry.dest:
            return None
    return others, block0[-1]


def _restore_directly(device, summary: LogSummary, entries: list[LogEntry], block0: LogEntry, *,
                      progress: Callable[[int], None] | None, stop_after: int | None) -> None:
    """Copy every backup in `entries` (sorted by source) back, fsync, then write
    block 0 and fsync.

    The backups validation kept in memory (`LogSummary.backups`) are written from
    there: they are the bytes whose checksums it checked. Any others are read again
    in batches of at most RESTORE_MEMORY bytes and checked again. Each batch goes
    in source order, backups restored side by side in one write (up to
    DIRECT_IO_BYTES).

    Ordering: block 0 keeps the log, and every backup what validation saw, until
    every other copy is durable (the first fsync); so an interruption before the
    block 0 write is durable leaves a log that validates and restores again to the
    same result, and one after it leaves the restored device."""
    block_size = summary.blocks[0].block_size
    # The restore takes the kept backups over and lets each batch go once written, so
    # that it never holds more than RESTORE_MEMORY of them.
    kept, summary.backups = summary.backups, {}
    block0_backup = kept.pop(block0, None)
    batch, unread = [], []
    for entry in entries:
        backup = kept.pop(entry, None)
        if backup is None:
            unread.append(entry)
        else:
            batch.append((entry, backup))
    del kept  # (what is left: the backups of full log blocks, which are not written back)
    read_again = (sorted(_read_backups(device, some, block_size, keep=RESTORE_MEMORY).items(),
                         key=lambda pair: pair[0].source)
                  for some in _batches(sorted(unread, key=_by_dest)))
    done = done_bytes = 0
    # The disk writes what is restored while the next copies are made: a random
    # run's backups are thousands of scattered blocks, whose writeback in the fsync
    # below took longer than the copies (0.09-0.14 s against 0.06-0.085).
    write_behind = WriteBehind(device.start_write_back, WRITE_BEHIND_BYTES)
    try:
        while batch is not None:
            for source, data, count in _side_by_side(batch):
                device.pwrite(data, source * SECTOR)
                write_behind.wrote(source * SECTOR, len(data))
                if progress:
                    progress(len(data))
                done += count
                done_bytes += len(data)
                if stop_after is not None and done >= stop_after:
                    return
            batch = None  # (let it go before the next one is read)
            batch = next(read_again, None)
        write_behind.finish()
    finally:
        write_behind.close()
    if stop_after is not None and stop_after < summary.entries:
        return  # (the block 0 write restores the remaining entries, those of block 0)
    device.fsync()  # every copy durable before block 0 stops being the log
    if block0_backup is None:
        block0_backup = _read_backups(device, [block0], block_size, keep=block0.size)[block0]
    device.pwrite(block0_backup, 0)
    device.fsync()
    if progress:
        progress(summary.backed_up_bytes - done_bytes)  # block 0 stands for every log block's entry 0


def _batches(entries: list[LogEntry]):
    """`entries` in consecutive slices of at most RESTORE_MEMORY bytes of backups."""
    start = size = 0
    for index, entry in enumerate(entries):
        if size + entry.size > RESTORE_MEMORY and index > start:
            yield entries[start:index]
            start, size = index, 0
        size += entry.size
    if start < len(entries):
        yield entries[start:]


def _side_by_side(backups: list[tuple[LogEntry, memoryview]]):
    """(source sector, data, entries) for each run of `backups` (entry and backup,
    sorted by source) restored side by side: one write each, at most DIRECT_IO_BYTES."""
    run: list[memoryview] = []
    for entry, backup in backups:
        if run and (entry.source != end or size + entry.size > DIRECT_IO_BYTES):
            yield start, b"".join(run) if len(run) > 1 else run[0], len(run)
            run = []
        if not run:
            start, size = entry.source, 0
        run.append(backup)
        size += entry.size
        end = entry.source + entry.size // SECTOR
    if run:
        yield start, b"".join(run) if len(run) > 1 else run[0], len(run)


def _check_backup(entry: LogEntry, data, block_size: int) -> None:
    """The backup has its entry's checksum (if one was recorded). Validation falls back
    to the full simulation, which names the entry, when one has not; a restore that
    reads a backup again stops."""
    if entry.checksum and block_checksum(entry.source, data, block_size) != entry.checksum:
        raise BowLogError(f"the backup at sector {entry.dest} changed since validation "
                          f"(checksum 0x{entry.checksum:08x}): is the device in use?")


def _restore_in_log_order(device, summary: LogSummary, *, progress: Callable[[int], None] | None,
                          stop_after: int | None) -> None:
    """Every entry newest first, as vold does, saving progress ("WOB") before a copy
    would overwrite a sector read since progress was last saved."""
    block_size = summary.blocks[0].block_size
    copies = 0
    for sequence in range(summary.blocks[0].sequence, -1, -1):
        block = LogBlock.unpack(device.pread(block_size, 0), where=f"log block {sequence}", resuming=True)
        # Sectors read as backups since progress was last saved: a copy onto one of
        # them first saves progress, or a re-run would read what this pass wrote.
        read_since_save = RangeMap(index_values=False)
        for index in range(len(block.entries) - 1, -1, -1):
            entry = block.entries[index]
            sectors = entry.size // SECTOR
            data = device.pread(entry.size, entry.dest * SECTOR)
            if entry.checksum and block_checksum(entry.source, data, block_size) != entry.checksum:
                raise BowLogError(f"log block {sequence}, entry {index}: checksum mismatch during the "
                                  "restore although validation passed (is the device in use?)")
            if read_since_save.overlapping(entry.source, entry.source + sectors):
                # Order: everything copied so far durable, then the progress marker
                # (remaining entries = index + 1) durable, then this copy.
                device.fsync()
                device.pwrite(block.pack(count=index + 1, magic=PARTIAL_RESTORE_MAGIC), 0)
                device.fsync()
                read_since_save = RangeMap(index_values=False)
            read_since_save.assign(entry.dest, entry.dest + sectors, True)
            if index == 0:
                # Entry 0 overwrites block 0, the record of this log block's entries:
                # everything they copied must be durable first. (vold only syncs after.)
                device.fsync()
                if sequence > 0:
                    # The previous log block goes back to block 0 marked "WOB", so that a
                    # re-run resumes rather than validating a half-restored device afresh.
                    magic = LogBlock.unpack_header(data)[0]
                    if magic == MAGIC:
                        data = struct.pack("<I", PARTIAL_RESTORE_MAGIC) + data[4:]
            device.pwrite(data, entry.source * SECTOR)
            if index == 0:
                device.fsync()  # this log block is done (or, for sequence 0, the restore)
            copies += 1
            if progress:
                progress(entry.size)
            if stop_after is not None and copies >= stop_after:
                return

