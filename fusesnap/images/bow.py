"""`bow.img`: backup-on-write (after Android's dm-bow 1.2), with trim, checkpoint,
commit and an offline restore.

States (forward only):
  trim        after mount: a pass-through; discards mark ranges free.
  checkpoint  `fusesnap bow checkpoint MNT`: device block 0 becomes the log
              (`fusesnap.formats.bow_log`, Android's format byte for byte); the
              filesystem's block 0 lives in a relocated block (`sector0`). The first
              write to a block still holding checkpoint data copies it into free
              space and logs it before the write reaches the device.
  committed   `fusesnap bow commit MNT`: block 0 goes back; a pass-through again
              (a re-mount starts in trim state).
`fusesnap bow restore DEV` (offline) copies every backup back: the device is the
checkpoint again.

State (plain attributes): `blocks`, a RangeMap device block -> kind, unmapped = in
use with the data the device holds (in checkpoint state: checkpoint data, which a
write must back up first):
  FREE      discarded: reads as zeros, no backup needed, a backup may go here
  CHANGED   written (or backed up) since the checkpoint: written freely
  ZEROED    discarded after the checkpoint: reads as zeros, but the device still
            holds checkpoint data, backed up before any write
  BACKUP    holds a backup (it was free, so it reads as zeros); a write first moves
            the backup elsewhere (a log entry from here to there, as dm-bow does)
  COPYING   a backup being made here (reserved, held by the copier; reads as zeros)
  LOG       device block 0 in checkpoint state
  SECTOR0   where the filesystem's block 0 lives (`sector0_block`); it was free, so
            image block `sector0_block` reads as zeros, and a write there moves
            block 0 elsewhere first (logged without a checksum, as dm-bow does)

Discards: loop devices turn both discards and write-zeroes into PUNCH_HOLE, so a
discarded range must read back as zeros. In trim state the punch is passed to the
device too (so free blocks hold zeros there, also after a restore); after the
checkpoint only blocks whose contents no restore needs (CHANGED) are punched; others
become ZEROED (zeros are served from the map). Commit punches every block that reads
as zeros but holds old data, so the committed device is what bow.img showed.

What outlives the process: the map is journaled (`MapJournal`, `--bow-map`, by
default /var/lib/fusesnap/bow/<device>.map): every change is appended before the
request that depends on it is acknowledged, and fsync'ed on flush. The device log is
the authority for backups: a re-mount applies log entries the journal has not seen
(the journal is written after the log, see `recorded`). The device alone is enough
for `bow restore`.

Staged first writes (`--bow-staging`, default 64 MiB; 0: off): a first write in
checkpoint state is acknowledged once its backup destinations are reserved and its
new data is *staged*: written to `<map>.stage` (`StagingFile`, page cache) and kept
in `staged` (block -> StagedWrite, so reads see it). Its blocks stay held (a later
write that needs a backup waits); the next group-commit round makes its backup (in a
worker thread, with those of every write staged since: `copy`), and it is applied in
place only after group commit has made its backup and log entry durable
(`_apply_staged`), then its slots are cleared (a round's together:
`staged_finished`); until then the device holds what the backup is made of. A later
write to blocks still staged needs no backup of its own (the staged write's covers
them): it replaces the staged data, in the staging file before it is acknowledged,
and does not wait (`_restage`); the round applies the newest. So no
overwrite reaches the device before its backup and log entry are durable, and one
barrier covers every write staged since the last, however many. Flush waits until
every write acknowledged before it is applied in place, then syncs the device: a
flushed write never lives only in the staging file. After a kill -9 a re-mount in
the same boot replays the staging file through the write path (backups first)
before it serves (`_replay_staged`); after a reboot it is ignored (unflushed writes
may be lost in a power cut; the device holds no overwrite whose backup is not
durable). No room in the staging file: the write waits for its backup as without
staging (backpressure). A staged write whose backup fails leaves the image failed:
every later write and flush fails with EIO, reads still see the staged data, and
its record stays for a re-mount to replay.

Concurrency: `fusesnap.copy_before_write` holds per-block locks and runs the group
commit (copy, barrier, log, barrier, overwrite); its `drive_staged` runs the rounds
of staged writes as a background task. Everything runs on the trio thread;
page-cached preads/pwrites run inline, fsyncs in a worker thread, and so do a
round's backups of staged writes (`_copy_blocks`, which touches no map). Map changes happen
only in synchronous methods (`plan`, `write_records`, `recorded`, `abandoned`,
discard and state changes), never across an await. In trim and committed state a
write never awaits, so state changes (sync `control`) see no write half-done.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import json
import logging
import os
import stat
import struct
import sys
import time
import zlib

import trio

from .. import arguments
from ..control import read_status, require_image, send_command
from ..copy_before_write import CopyBeforeWrite
from ..devices import RANGE_SYNC_FILESYSTEMS, BlockDevice, check_range, filesystem_type, write_back
from ..errors import EXIT_FAILED, UserError
from ..formats import bow_log
from ..formats.bow_log import SECTOR, BowLogError, LogBlock, LogEntry
from ..rangemap import RangeMap
from .base import Image

log = logging.getLogger(__name__)

# Block kinds (RangeMap values; also their codes in the journal). Unmapped: in use.
IN_USE, FREE, CHANGED, ZEROED, BACKUP, LOG, SECTOR0, COPYING = range(8)
KIND_NAMES = {IN_USE: "in-use", FREE: "free", CHANGED: "changed", ZEROED: "zeroed",
              BACKUP: "backup", LOG: "log", SECTOR0: "sector0", COPYING: "copying"}
READS_AS_ZEROS = frozenset((FREE, ZEROED, BACKUP, COPYING, SECTOR0))
NEEDS_BACKUP = frozenset((None, ZEROED, BACKUP, SECTOR0))
_MIXED = object()  # `RangeMap.uniform`'s answer for blocks of more than one kind

TRIM, CHECKPOINT, COMMITTED = "trim", "checkpoint", "committed"
STATE_CODES = {TRIM: 0, CHECKPOINT: 1, COMMITTED: 2}

DEFAULT_BLOCK_SIZE = 4096
DEFAULT_LOW_SPACE = 100 << 20
DEFAULT_STAGING = 64 << 20
MAP_DIR = "/var/lib/fusesnap/bow"
# Free blocks kept back from backups of data for rolling the log over, so that a
# full log block can always be backed up.
LOG_RESERVE = 2
# Free blocks set aside for backup destinations at a time (`_destination`).
RESERVED_BLOCKS = 256
# Backups of at least this many blocks in one `copy` are made in a worker thread.
THREADED_COPY_BLOCKS = 16


@dataclasses.dataclass(eq=False)
class StagedWrite:
    """A first write acknowledged before its backup is durable: whole blocks from
    device block `first`, in the staging file from `slot`."""
    first: int
    data: bytes | bytearray  # a bytearray once a later write replaced part of it (`_restage`)
    slot: int

    def blocks(self, block_size: int) -> range:
        return range(self.first, self.first + len(self.data) // block_size)


@dataclasses.dataclass(eq=False)
class BowCopy:
    """One backup in flight: `blocks` blocks from `source` to `dest` (device blocks)."""
    source: int
    dest: int
    blocks: int
    kind: str                  # "data", "sector0" (block 0's live copy moves), "log" (log block backup)
    checksum: int = 0
    hold: trio.Event | None = None


# -- the map journal ---------------------------------------------------------------

class MapJournal:
    """The block map's journal: a header naming the device, then fixed-size records.

    Header: b"FSBOWMAP", u32 length, that many bytes of JSON (device identity, block
    size), u32 CRC-32 of the JSON. Records (24 bytes): u8 type, u8 value, 2 pad, u64
    a, u64 b, u32 CRC-32 of the first 20 bytes. Types: ASSIGN [a, b) = value; STATE
    value (a = sector0 block); LOGPOS (a = sequence, b = count): the log as far as
    this journal knows it. A torn or garbage tail (power cut) ends the replay there.
    Rewritten compactly (write-temp, fsync, rename, fsync-dir) at every mount and
    when it grows large.
    """

    MAGIC = b"FSBOWMAP"
    RECORD = struct.Struct("<BB2xQQ")
    RECORD_SIZE = RECORD.size + 4
    ASSIGN, STATE, LOGPOS = 1, 2, 3

    def __init__(self, path: str, identity: dict):
        self.path = path
        self.identity = identity
        self.fd = -1
        self.buffer = bytearray()
        self.records = 0          # records in the file (this process's count)
        self.header_end = 0       # where the records start
        self.inode = 0            # of the file `load` read (a rewrite replaces it)

    @staticmethod
    def pack(record_type: int, value: int, a: int, b: int) -> bytes:
        body = MapJournal.RECORD.pack(record_type, value, a, b)
        return body + struct.pack("<I", zlib.crc32(body))

    def load(self, upto: int | None = None) -> list[tuple[int, int, int, int]] | None:
        """The records of an existing journal (None if there is none), the first
        `upto` if given; UserError if it belongs to another device or its header is
        unreadable."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                self.inode = os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UserError(f"cannot read the bow map {self.path}: {exc.strerror}") from None
        magic, rest = data[:8], data[8:]
        if magic != self.MAGIC or len(rest) < 4:
            raise UserError(f"{self.path} is not a bow map (delete it only if the device is not checkpointed)")
        (length,) = struct.unpack_from("<I", rest)
        header = rest[4:4 + length]
        crc_bytes = rest[4 + length:8 + length]
        if len(crc_bytes) < 4 or struct.unpack("<I", crc_bytes)[0] != zlib.crc32(header):
            raise UserError(f"{self.path}: damaged header (delete it only if the device is not checkpointed)")
        identity = json.loads(header)
        if identity != self.identity:
            raise UserError(f"{self.path} belongs to another device or block size "
                            f"({identity.get('device')}, {identity.get('block_size')}-byte blocks): "
                            "give --bow-map, or delete it if it is stale")
        self.header_end = 16 + length
        if upto is not None:
            data = data[:self.header_end + upto * self.RECORD_SIZE]
        records = self._parse(data, self.header_end)
        self.records = len(records)
        return records

    def _parse(self, data: bytes, pos: int) -> list[tuple[int, int, int, int]]:
        records = []
        while pos + self.RECORD_SIZE <= len(data):
            body = data[pos:pos + self.RECORD.size]
            (crc,) = struct.unpack_from("<I", data, pos + self.RECORD.size)
            if zlib.crc32(body) != crc:
                break  # a torn tail
            records.append(self.RECORD.unpack(body))
            pos += self.RECORD_SIZE
        return records

    def append_to_loaded(self) -> None:
        """Append to the journal as `load` read it, without rewriting it: a live
        upgrade's successor, while the previous server still appends to it."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)  # read: records_after_load
        if os.fstat(self.fd).st_ino != self.inode:
            raise OSError(errno.ESTALE, f"{self.path} was replaced while being read")

    def records_after_load(self, upto: int) -> list[tuple[int, int, int, int]]:
        """Records `self.records` up to `upto` of the file `load` read, which another
        process appended meanwhile (ValueError if it has fewer)."""
        if upto < self.records:
            raise ValueError(f"{self.path}: {upto} records handed over, {self.records} already read")
        start = self.header_end + self.records * self.RECORD_SIZE
        data = os.pread(self.fd, (upto - self.records) * self.RECORD_SIZE, start)
        records = self._parse(data, 0)
        if len(records) != upto - self.records:
            raise ValueError(f"{self.path} holds {self.records + len(records)} intact records, "
                             f"not the {upto} handed over")
        self.records = upto
        return records

    def rewrite(self, records: list[bytes]) -> None:
        """Replace the journal with a compact one holding `records` (blocking)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        header = json.dumps(self.identity, sort_keys=True).encode()
        temp = self.path + ".tmp"
        with open(temp, "wb") as f:
            f.write(self.MAGIC + struct.pack("<I", len(header)) + header + struct.pack("<I", zlib.crc32(header)))
            f.write(b"".join(records))
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, self.path)
        dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.inode = os.fstat(self.fd).st_ino
        self.records = len(records)

    def add(self, record_type: int, value: int, a: int, b: int) -> None:
        self.buffer += self.pack(record_type, value, a, b)

    def write_out(self) -> None:
        """Append the buffered records (page cache: they outlive a crash of the server).
        On an error what was not written stays buffered, and is appended by the next
        call exactly where this one stopped."""
        while self.buffer:
            written = os.write(self.fd, self.buffer)
            del self.buffer[:written]
            self.records += written // self.RECORD_SIZE

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- the staging file ----------------------------------------------------------------

def boot_id() -> bytes:
    """This boot's id (it changes with every boot, so also after a power cut)."""
    with open("/proc/sys/kernel/random/boot_id", "rb") as f:
        return f.read().strip()[:36].ljust(36, b" ")


class StagingFile:
    """New data of first writes acknowledged before their backups are durable (see
    "Staged first writes" in the module docstring), in the page cache of a file
    beside the map, `<map>.stage`, never synced.

    Layout: a 4096-byte header (b"FSBOWSTG", the boot id it was written in, block
    size, slots, CRC-32), a table of one 24-byte slot header per slot, then the
    slots, a block each, from `data_start`. A staged write of n blocks takes n
    consecutive slots, allocated as a ring (writes are applied about in the order
    they came); its header is at its first slot: u32 STAGED, u32 n, u64 device
    block, u32 CRC-32 of those 16 bytes, 4 pad. Every other slot header is zeros
    (`clear` zeroes it again). The data is written before its header: a slot with a
    valid header holds its data.

    Only a re-mount in the same boot replays it (`recover`): after a kill -9 the
    page cache holds every record as written. After a reboot it is ignored: what a
    power cut left of it is not to be trusted, and nothing a flush covered lives
    only here (flush applies staged writes in place first).
    """

    MAGIC = b"FSBOWSTG"
    HEADER = struct.Struct("<8s36sII")
    SLOT = struct.Struct("<IIQ")
    SLOT_SIZE = 24
    STAGED = 0x53544744

    def __init__(self, path: str, block_size: int, size: int):
        """`size` bytes of room (0: nothing is staged; `recover` still reads what
        an earlier server staged)."""
        self.path = path
        self.block_size = block_size
        self.slots = size // block_size
        self.data_start = self._data_start(self.slots, block_size)
        self.fd = -1
        self.used = bytearray(self.slots)  # 1 = the slot holds a staged write
        self.next_slot = 0

    @classmethod
    def _data_start(cls, slots: int, block_size: int) -> int:
        return -(-(4096 + slots * cls.SLOT_SIZE) // block_size) * block_size

    def _header(self) -> bytes:
        body = self.HEADER.pack(self.MAGIC, boot_id(), self.block_size, self.slots)
        return body + struct.pack("<I", zlib.crc32(body))

    def recover(self) -> list[tuple[int, bytes]]:
        """The staged writes a server of this boot left (byte offset on the device,
        data), read from the file as it is now, in the layout its header gives (an
        earlier mount's --bow-staging); none if it is missing or of another boot."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(self.HEADER.size + 4)
                if len(head) < self.HEADER.size + 4 or zlib.crc32(head[:-4]) != struct.unpack("<I", head[-4:])[0]:
                    return []
                magic, boot, block_size, slots = self.HEADER.unpack(head[:-4])
                if magic != self.MAGIC or boot != boot_id():
                    return []
                table = os.pread(f.fileno(), slots * self.SLOT_SIZE, 4096)
                data_start = self._data_start(slots, block_size)
                found = []
                for slot in range(slots):
                    at = slot * self.SLOT_SIZE
                    body = table[at:at + self.SLOT.size]
                    magic, blocks, device_block = self.SLOT.unpack(body)
                    if magic != self.STAGED or struct.unpack_from("<I", table, at + 16)[0] != zlib.crc32(body):
                        continue
                    data = os.pread(f.fileno(), blocks * block_size, data_start + slot * block_size)
                    found.append((device_block * block_size, data))
                return found
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UserError(f"cannot read the staged writes {self.path}: {exc.strerror}") from None

    def reset(self) -> None:
        """Start empty (blocking; nothing synced: see the class docstring)."""
        self.close()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, self._header(), 0)
        os.ftruncate(self.fd, self.data_start + self.slots * self.block_size)
        self.used = bytearray(self.slots)
        self.next_slot = 0

    def put(self, device_block: int, data) -> int | None:
        """Stage `data` (whole blocks) for device block `device_block`: its first
        slot, or None if there is no room (nothing written then). OSError if it was
        written but could not be cleared again."""
        n = len(data) // self.block_size
        slot = self.next_slot if self.next_slot + n <= self.slots else 0
        if self.fd < 0 or n > self.slots or self.used.find(1, slot, slot + n) >= 0:
            return None
        self.used[slot:slot + n] = b"\1" * n
        try:
            # Ordering: the data before the header that names it, so a kill -9 between
            # the two leaves no header (the write was not acknowledged) and a valid
            # header always has its data. Page cache only: a reboot ignores the file.
            os.pwrite(self.fd, data, self.data_start + slot * self.block_size)
            body = self.SLOT.pack(self.STAGED, n, device_block)
            os.pwrite(self.fd, body + struct.pack("<I4x", zlib.crc32(body)), 4096 + slot * self.SLOT_SIZE)
        except OSError:
            self.clear(slot, n)  # if this fails too, the write fails: a stale record must not stay
            return None
        self.next_slot = slot + n
        return slot

    def rewrite(self, slot: int, data) -> None:
        """New data (whole blocks) for slots of a staged write, from `slot` (its
        header stays valid)."""
        if os.pwrite(self.fd, data, self.data_start + slot * self.block_size) != len(data):
            raise OSError(errno.ENOSPC, "short write")

    def clear(self, slot: int, n: int) -> None:
        """The staged write is in place (or was never acknowledged): its slots are free."""
        self.clear_all([(slot, n)])

    def clear_all(self, writes: list[tuple[int, int]]) -> None:
        """`clear` for several staged writes, (slot, n) each: the records of writes
        in neighbouring slots (the ring hands them out in order) in one pwrite."""
        runs: list[list[int]] = []  # [first slot, end slot]
        for slot, n in sorted(writes):
            if runs and runs[-1][1] == slot:
                runs[-1][1] = slot + n
            else:
                runs.append([slot, slot + n])
        for start, end in runs:
            os.pwrite(self.fd, bytes((end - start) * self.SLOT_SIZE), 4096 + start * self.SLOT_SIZE)
            self.used[start:end] = bytes(end - start)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def default_map_path(device_path: str) -> str:
    return os.path.join(MAP_DIR, os.path.realpath(device_path).strip("/").replace("/", "-") + ".map")


def device_identity(device: BlockDevice, block_size: int) -> dict:
    st = os.fstat(device.fd)
    ident = ([os.major(st.st_rdev), os.minor(st.st_rdev)] if stat.S_ISBLK(st.st_mode)
             else [st.st_dev, st.st_ino])
    return {"device": os.path.realpath(device.path), "size": device.size, "id": ident,
            "block_size": block_size}


def lock_device(device: BlockDevice, what: str) -> None:
    """An exclusive lock on the device for as long as it is open: a mount and an
    offline restore never use one device at the same time."""
    try:
        fcntl.flock(device.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{device.path} is in use by a fusesnap mount ({what} needs it to itself)",
                        EXIT_FAILED) from None


# -- the image ---------------------------------------------------------------------

class BowImage(Image):
    target = "bow"
    status_line_keys = ("state", "free", "backed_up", "log_entries", "sequence", "warning")
    control_verbs = ("bow",)
    needs_discards = True
    concurrent_requests = 32  # first writes share fsyncs only while others are in flight
    handover_versions = (1,)

    def __init__(self, device: BlockDevice, journal: MapJournal, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 low_space: int = DEFAULT_LOW_SPACE, on_low_space: str = "warn",
                 group_commit: bool = True, staging: StagingFile | None = None, name: str = "bow.img"):
        size = device.size // block_size * block_size
        super().__init__(name, size, read_only=device.read_only)
        self.device = device
        self.journal = journal
        self.block_size = block_size
        self.sectors_per_block = block_size // SECTOR
        self.n_blocks = size // block_size
        self.low_space = low_space
        self.on_low_space = on_low_space
        self.blocks = RangeMap()
        self.state = TRIM
        self.log: LogBlock | None = None          # the log block in device block 0 (checkpoint)
        self.sector0_block = 0                    # where image block 0 lives (checkpoint)
        self.block0_backup = 0                    # where the checkpoint's block 0 is backed up
        self.log_copy_pending = False             # a full log block is being backed up
        self.free_cursor = 0                      # next-fit start for backup destinations
        # Free blocks taken out of FREE together, handed out one destination at a time
        # (`_destination`): [reserved_from, reserved_end) is COPYING in the map but
        # free; a write there gives it back first (`plan`).
        self.reserved_from = self.reserved_end = 0
        self.punch_supported = True
        self.unsynced: list[tuple[int, bytes]] = []  # (offset, data) the next barrier makes durable
        # Barriers sync only what they cover where a ranged fsync is known to commit
        # the file's metadata and flush the cache (see _sync_ranges); elsewhere (a
        # device on FUSE, say, which ignores RWF_DSYNC) they fdatasync.
        self.range_barriers = device.is_block_device or filesystem_type(device.fd) in RANGE_SYNC_FILESYSTEMS
        self.cbw = CopyBeforeWrite(self, group_commit=group_commit)
        self.staging = staging
        self.staged: dict[int, StagedWrite] = {}    # device block -> its staged write, not yet in place
        self.restaged = 0                           # writes that replaced staged data (`_restage`)
        self.applied: list[StagedWrite] = []        # in place this round, still in the staging file
        self.committing: trio.Event | None = None    # a commit is due or waits for staged writes: set when done
        self.commit_running = False
        self.commits_when_low = False               # `_commit_when_low` runs
        self.failed: str | None = None              # a staged write could not be applied: EIO from now on
        self.map_was_missing = False
        self.low_space_event = trio.Event()
        self.error: str | None = None
        # Opened with a previous server's descriptor (live upgrade): it may still be
        # serving, so opening writes nothing; `restore_handover_state` brings the map
        # up to its state, or, with none, `start` finishes the recovery (failover).
        self.recovery_deferred = device.inherited
        self._load()
        if self.recovery_deferred:
            self.journal.append_to_loaded()
        else:
            self._compact_journal()

    # -- startup: journal + device log -> map ---------------------------------------

    def _load(self, upto: int | None = None) -> None:
        records = self.journal.load(upto)
        self.map_was_missing = records is None  # then a staging file is not this device's
        device_log = bow_log.read_header(self.device)  # BowLogError: refused by the caller
        if device_log is not None and device_log.magic == bow_log.PARTIAL_RESTORE_MAGIC:
            raise UserError(f"{self.device.path}: a restore was interrupted; finish it with "
                            f"`fusesnap bow restore {self.device.path}`", EXIT_FAILED)
        logpos = self._replay(records or [])
        if device_log is not None:
            if records is None:
                raise UserError(f"{self.device.path} is checkpointed (a backup-on-write log is in "
                                f"block 0) but its map {self.journal.path} is missing: roll back with "
                                f"`fusesnap bow restore {self.device.path}`", EXIT_FAILED)
            if device_log.block_size != self.block_size:
                raise UserError(f"{self.device.path}: its log uses {device_log.block_size}-byte blocks, "
                                f"not {self.block_size}")
            if self.state == TRIM:  # the checkpoint was made, the journal did not hear of it
                logpos = (0, 0)
            self.state = CHECKPOINT
            self.log = device_log
            self._apply_unjournaled_entries(logpos)
            self.sector0_block = device_log.sector0 // self.sectors_per_block
            if not self.block0_backup:
                first_block = device_log if device_log.sequence == 0 else bow_log.validate(self.device).blocks[-1]
                self.block0_backup = first_block.entries[0].dest // self.sectors_per_block
            self.blocks.assign(0, 1, LOG)
            self.blocks.assign(self.sector0_block, self.sector0_block + 1, SECTOR0)
        elif self.state == CHECKPOINT and not self.recovery_deferred:
            self._committed_before_the_journal_heard()  # writes: see _finish_recovery
        if self.state == COMMITTED:
            self.state = TRIM  # a re-mount after a commit starts in trim state

    def _replay(self, records) -> tuple[int, int]:
        """Apply journal records to the map; the last log position they name."""
        logpos = (0, 0)
        for record_type, value, a, b in records:
            if record_type == MapJournal.ASSIGN:
                self.blocks.assign(a, b, None if value == IN_USE else value)
            elif record_type == MapJournal.STATE:
                self.state = {code: name for name, code in STATE_CODES.items()}[value]
                self.sector0_block, self.block0_backup = a, b
            elif record_type == MapJournal.LOGPOS:
                logpos = (a, b)
        return logpos

    def _finish_recovery(self) -> None:
        """What opening defers when the descriptor was inherited and no state came
        after it (a failover: the previous server is gone)."""
        if self.state == CHECKPOINT and self.log is None:
            self._committed_before_the_journal_heard()
            if self.state == COMMITTED:
                self.state = TRIM
        self._compact_journal()
        self.recovery_deferred = False

    def _committed_before_the_journal_heard(self) -> None:
        """The map says checkpoint, the device has no log. A commit that the journal
        did not hear of leaves block 0 equal to its live copy (and, unless block 0
        never changed, different from its backup); anything else is a restore or
        another device, and the map is no longer true."""
        bs = self.block_size
        block0 = self.device.pread(bs, 0)
        if (self.sector0_block and block0 == self.device.pread(bs, self.sector0_block * bs)
                and block0 != self.device.pread(bs, self.block0_backup * bs)):
            log.info("%s: the commit finished before the server stopped", self.name)
            self._committed()
            return
        raise UserError(f"{self.device.path} has no backup-on-write log although its map "
                        f"{self.journal.path} says it is checkpointed: it was restored or replaced "
                        "(delete the map then)", EXIT_FAILED)

    def _apply_unjournaled_entries(self, logpos: tuple[int, int]) -> None:
        """Backups the device log records beyond what the journal knows (the server
        died between a log write and its journal record): their destinations hold
        backups. Their sources were not overwritten yet, so they keep their kind."""
        sequence, count = logpos
        if (self.log.sequence, len(self.log.entries)) == (sequence, count):
            blocks = []
        elif self.log.sequence == sequence:
            blocks = [self.log]
        else:
            # Earlier log blocks are read as a restore would (their backups may have
            # moved since), which also checks the whole log.
            blocks = [b for b in bow_log.validate(self.device).blocks if b.sequence >= sequence]
        for block in reversed(blocks):
            start = count if block.sequence == sequence else 0
            for entry in block.entries[start:]:
                first = entry.dest // self.sectors_per_block
                self.blocks.assign(first, first + entry.size // self.block_size, BACKUP)
        old_sector0 = self.sector0_block
        if old_sector0 and old_sector0 != self.log.sector0 // self.sectors_per_block \
                and self.blocks.get(old_sector0) == SECTOR0:
            self.blocks.assign(old_sector0, old_sector0 + 1, FREE)  # block 0 moved on; it reads as zeros

    def _journal_snapshot(self) -> list[bytes]:
        # A backup in flight is not in the log yet: its destination is free as far as
        # a restart knows (the log says otherwise once its entry is durable).
        records = [MapJournal.pack(MapJournal.ASSIGN, FREE if value == COPYING else value, s, e)
                   for s, e, value in self.blocks]
        records.append(MapJournal.pack(MapJournal.STATE, STATE_CODES[self.state], self.sector0_block,
                                       self.block0_backup))
        if self.log is not None:
            records.append(MapJournal.pack(MapJournal.LOGPOS, 0, self.log.sequence, len(self.log.entries)))
        return records

    def _compact_journal(self) -> None:
        self.journal.buffer.clear()
        self.journal.rewrite(self._journal_snapshot())

    def _assign(self, first: int, end: int, kind) -> None:
        """A map change that must outlive the process: journaled (written out before
        the request is acknowledged)."""
        self.blocks.assign(first, end, kind)
        if kind != COPYING:
            self.journal.add(MapJournal.ASSIGN, IN_USE if kind is None else kind, first, end)

    # -- reads ---------------------------------------------------------------------

    def _view(self, offset: int, size: int) -> bytearray:
        """What bow.img holds at [offset, offset + size) (sync: no await)."""
        out = bytearray(size)
        bs = self.block_size
        pos, end = offset, offset + size
        if self.state == CHECKPOINT and pos < bs:
            # Image block 0 lives in sector0_block.
            take = min(end, bs) - pos
            out[:take] = self.device.pread(take, self.sector0_block * bs + pos)
            pos += take
        if pos >= end:
            return out
        for first, stop, kind in self.blocks.segments(pos // bs, (end - 1) // bs + 1):
            lo, hi = max(pos, first * bs), min(end, stop * bs)
            if kind in READS_AS_ZEROS or kind == LOG:
                continue  # zeros already
            self.device.pread_into(memoryview(out)[lo - offset:hi - offset], lo)
        for block, staged in self._staged_in(offset // bs, (end - 1) // bs + 1):
            lo, hi = max(offset, block * bs), min(end, (block + 1) * bs)
            at = lo - staged.first * bs
            out[lo - offset:hi - offset] = staged.data[at:at + hi - lo]
        return out

    def _staged_in(self, first: int, end: int) -> list[tuple[int, StagedWrite]]:
        """Blocks of [first, end) with a staged write (per block: staged writes are
        small, and in trim state there are none)."""
        if not self.staged:
            return []
        return [(block, self.staged[block]) for block in range(first, end) if block in self.staged]

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        bs = self.block_size
        first, stop = offset // bs, (end - 1) // bs + 1
        if not (self.state == CHECKPOINT and offset < bs) and not (self.staged and self._staged_in(first, stop)) \
                and self._on_device(first, stop):
            return self.device.pread(end - offset, offset)  # all of it is on the device: one pread
        return self._view(offset, end - offset)

    def _on_device(self, first: int, stop: int) -> bool:
        """No block of [first, stop) reads as zeros (`READS_AS_ZEROS`): one bisection
        when the blocks are all of one kind (the usual read), a walk otherwise."""
        kind = self.blocks.uniform(first, stop, _MIXED)
        if kind is not _MIXED:
            return kind not in READS_AS_ZEROS
        return not any(kind in READS_AS_ZEROS for _, _, kind in self.blocks.overlapping(first, stop))

    # -- writes --------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> int:
        check_range(self.size, offset, len(data))
        if not data:
            return 0
        self._check_failed()
        while self.committing is not None:  # it waits for staged writes: later ones wait for it
            await self.committing.wait()
        bs = self.block_size
        try:
            if self.state == CHECKPOINT and offset < bs:
                head = min(len(data), bs - offset)
                await self._write_block0(offset, data[:head])
                if head < len(data):
                    await self._write_checkpointed(offset + head, memoryview(data)[head:])
            elif self.state == CHECKPOINT:
                await self._write_checkpointed(offset, data)
            else:
                self._write_pass_through(offset, data)
        finally:
            self.journal.write_out()  # map changes outlive the server before the ack
        return len(data)

    def _merged(self, offset: int, data) -> tuple[int, bytes | memoryview]:
        """The write as whole blocks: unaligned edges are read-modify-written from
        the current view. Call with the blocks held and before the map changes."""
        bs = self.block_size
        first = offset // bs * bs
        end = -(-(offset + len(data)) // bs) * bs
        if first == offset and end == offset + len(data):
            return offset, data
        buffer = bytearray(end - first)
        buffer[:bs] = self._view(first, bs)
        if end - bs > first:
            buffer[-bs:] = self._view(end - bs, bs)
        buffer[offset - first:offset - first + len(data)] = data
        return first, buffer

    def _write_pass_through(self, offset: int, data) -> None:
        """Trim and committed state: free blocks written are in use again. No await:
        a state change never sees this half done."""
        bs = self.block_size
        first_block, end_block = offset // bs, -(-(offset + len(data)) // bs)
        if self.blocks.uniform(first_block, end_block, _MIXED) is not None:  # (None: all in use)
            free = [(s, e) for s, e, kind in self.blocks.overlapping(first_block, end_block)]
            offset, data = self._merged(offset, data)
            for s, e in free:
                self._assign(s, e, None)
        self.device.pwrite(data, offset)

    async def _write_checkpointed(self, offset: int, data) -> None:
        bs = self.block_size
        first, end = offset // bs, -(-(offset + len(data)) // bs)
        if offset % bs == 0 and len(data) % bs == 0:
            found = self.blocks.find(first)
            if found and found[2] == CHANGED and found[1] >= end and not self.cbw.is_held(first, end):
                # A rewrite: already backed up (or free at the checkpoint), and nobody is
                # working on these blocks; no await between this check and the write.
                self.device.pwrite(data, offset)
                return
        if self.staged and self._restage(offset, data, first, end):
            return
        merged = []

        def read_edges():
            self._check_failed()  # a write that waited for a staged one that failed
            merged.append(self._merged(offset, data))

        def stage():
            return self._stage(*merged[0])

        async with self.cbw.writing(first, end, before_plan=read_edges,
                                    stage=stage if self.staging is not None else None) as staged:
            if not staged:
                self._overwrite(*merged[0])

    def _restage(self, offset: int, data, first: int, end: int) -> bool:
        """Sync. A write whose blocks are all staged, or changed and not held, needs
        no backup (a staged write's round already backs up what its blocks held at
        the checkpoint): its data replaces the staged data, in the staging file
        first, and blocks not staged are written in place, without waiting for the
        staged write's round. False (nothing changed) if a block needs more, or the
        staging file could not be written: then the write takes the usual path."""
        if not any(block in self.staged for block in range(first, end)):
            return False  # a first write, most likely
        runs: list[list] = []  # [first, end, its StagedWrite or None]
        for block in range(first, end):
            staged = self.staged.get(block)
            if runs and runs[-1][2] is staged:
                runs[-1][1] = block + 1
            else:
                runs.append([block, block + 1, staged])
        for s, e, staged in runs:
            if staged is None and (self.cbw.is_held(s, e) or
                                   any(kind != CHANGED for _, _, kind in self.blocks.segments(s, e))):
                return False
        bs = self.block_size
        where, whole = self._merged(offset, data)  # the edges from the view: staged data included
        pieces = memoryview(whole)
        try:
            for s, e, staged in runs:
                if staged is not None:
                    # Ordering: in the staging file before the write is acknowledged, so a
                    # kill -9 replays the newest data (a kill during it leaves a mix of
                    # old and new blocks, of a write never acknowledged).
                    self.staging.rewrite(staged.slot + s - staged.first, pieces[(s - first) * bs:(e - first) * bs])
        except OSError as exc:
            log.warning("%s: cannot rewrite a staged write (%s); the write waits for its backup",
                        self.name, exc.strerror)
            return False
        for s, e, staged in runs:
            piece = pieces[(s - first) * bs:(e - first) * bs]
            if staged is None:
                self.device.pwrite(piece, s * bs)
            else:
                if not isinstance(staged.data, bytearray):
                    staged.data = bytearray(staged.data)
                staged.data[(s - staged.first) * bs:(e - staged.first) * bs] = piece
        self.restaged += 1
        return True

    def _overwrite(self, where: int, whole) -> None:
        """The in-place write of whole blocks, their backups durable (or none needed)."""
        bs = self.block_size
        if self.state == CHECKPOINT or not self.blocks.overlapping(where // bs, (where + len(whole)) // bs):
            self.device.pwrite(whole, where)
        else:  # committed while we waited for the backup
            self._write_pass_through(where, whole)

    def _stage(self, where: int, whole):
        """Sync, the backups planned (the next round makes them): stage the write, or
        None (no room, or a commit waits for staged writes to finish)."""
        if self.committing is not None or self.state != CHECKPOINT:
            return None
        bs = self.block_size
        first = where // bs
        slot = self.staging.put(first, whole)
        if slot is None:
            return None
        staged = StagedWrite(first, bytes(whole), slot)  # no copy of the request's own bytes
        for block in staged.blocks(bs):
            self.staged[block] = staged
        return lambda error: self._apply_staged(staged, error)

    def _apply_staged(self, staged: StagedWrite, error: BaseException | None) -> None:
        """Its backups and log entries are durable (error None): in place; out of the
        staging file with the round's others (`staged_finished`, before their blocks
        are released: a kill -9 between the two applies it again: same data, and no
        later write to its blocks ran, they were held). Never raises: it runs in a
        group-commit round."""
        if error is None and self.failed is None:
            try:
                self._overwrite(staged.first * self.block_size, staged.data)
            except OSError as exc:
                error = exc
        if error is not None or self.failed is not None:
            # Acknowledged, but it must not reach the device without its backup: it
            # stays in the staging file (a re-mount replays it) and in `staged` (reads).
            self._fail_staging(f"a staged write could not be applied: {error}")
            return
        self.applied.append(staged)

    def staged_finished(self) -> None:
        """Sync, never raises. The staged writes the round applied leave the staging
        file (their slot records cleared, neighbours in one write) and `staged`."""
        applied, self.applied = self.applied, []
        try:
            self.staging.clear_all([(staged.slot, len(staged.data) // self.block_size) for staged in applied])
            self.journal.write_out()
        except OSError as exc:
            self._fail_staging(f"a staged write could not be applied: {exc}")
            return  # its data is in place: reads see the same either way
        for staged in applied:
            for block in staged.blocks(self.block_size):
                del self.staged[block]

    def _fail_staging(self, reason: str) -> None:
        if self.failed is None:
            self.failed = self.error = reason
            log.error("%s: %s; writes and flushes fail until a re-mount", self.name, self.failed)

    def _check_failed(self) -> None:
        if self.failed is not None:
            raise OSError(errno.EIO, self.failed)

    async def _write_block0(self, offset: int, data) -> None:
        """Image block 0 lives in sector0_block; it needs no backup (the original
        block 0 was backed up at the checkpoint)."""
        while True:
            where = self.sector0_block
            async with self.cbw.exclusive(where, where + 1):
                self._check_failed()
                if self.state != CHECKPOINT:
                    self._write_pass_through(offset, data)
                    return
                if self.sector0_block != where:
                    continue  # moved while we waited
                _, whole = self._merged(offset, data)
                self.device.pwrite(whole, where * self.block_size)
                return

    # -- the copy-before-write policy (see fusesnap.copy_before_write) -------------

    def plan(self, first: int, end: int) -> list[BowCopy]:
        """Sync. Blocks [first, end) are held. Free blocks become changed; blocks that
        hold checkpoint data, a backup or block 0 get a destination each."""
        if self.state != CHECKPOINT:
            return []
        if first < self.reserved_end and self.reserved_from < end:
            self._unreserve()  # the filesystem writes free blocks set aside for backups
        segments = self.blocks.segments(first, end)
        needed = sum(e - s for s, e, kind in segments if kind in NEEDS_BACKUP)
        free_here = sum(e - s for s, e, kind in segments if kind == FREE)
        if (needed or free_here) and self._free_blocks() - free_here - needed < LOG_RESERVE:
            # Free blocks written count too: the last LOG_RESERVE are kept for the log.
            self._note_low_space()
            raise OSError(errno.ENOSPC, "no free space left for backups")
        # Free blocks written become changed first, so none of them is chosen as a
        # destination below.
        for s, e, kind in segments:
            if kind == FREE:
                self._assign(s, e, CHANGED)
        copies = []
        for s, e, kind in segments:
            if kind == SECTOR0:
                dest = self._destination(1)[0]
                copies.append(self._hold(BowCopy(s, dest, 1, "sector0")))
            elif kind in NEEDS_BACKUP:
                while s < e:
                    dest, n = self._destination(e - s)
                    copies.append(self._hold(BowCopy(s, dest, n, "data")))
                    s += n
        if copies:
            self._check_low_space()  # now, not when recorded: staged writes run ahead
        return copies

    def _allocate(self, wanted: int) -> tuple[int, int]:
        """The start and length (<= wanted) of a free run (next fit)."""
        found = self.blocks.first_with_value(FREE, self.free_cursor) or self.blocks.first_with_value(FREE, 0)
        if found is None:
            raise OSError(errno.ENOSPC, "no free space left for backups")
        start, stop = found
        n = min(wanted, stop - start)
        self.free_cursor = start + n
        return start, n

    def _destination(self, wanted: int) -> tuple[int, int]:
        """Sync. The start and length (<= wanted) of free blocks for a backup, COPYING
        in the map. Taken from the reserved run, which is refilled with up to
        RESERVED_BLOCKS free blocks at once: one map change for many backups. A
        run too short for `wanted` is given back first, so that a large write's
        backup stays one log entry where the free space allows."""
        if self.reserved_end - self.reserved_from < wanted:
            self._unreserve()
        if self.reserved_from == self.reserved_end:
            start, n = self._allocate(max(wanted, RESERVED_BLOCKS))
            self.blocks.assign(start, start + n, COPYING)
            self.reserved_from, self.reserved_end = start, start + n
        dest = self.reserved_from
        n = min(wanted, self.reserved_end - dest)
        self.reserved_from += n
        return dest, n

    def _unreserve(self) -> None:
        """Sync. The reserved run is free again."""
        self.blocks.assign(self.reserved_from, self.reserved_end, FREE)
        self.reserved_from = self.reserved_end = 0

    def _free_blocks(self) -> int:
        return self.blocks.length_of(FREE) + self.reserved_end - self.reserved_from

    def _hold(self, copy: BowCopy) -> BowCopy:
        """Its destination is held until the copy is recorded: no write lands there."""
        copy.hold = self.cbw.hold(copy.dest, copy.dest + copy.blocks)
        return copy

    async def copy(self, copies: list[BowCopy]) -> None:
        """The backups: a write's own on the trio thread, a round's (the copies of
        every write staged since the last) in a worker thread, which touches no map."""
        if sum(copy.blocks for copy in copies) >= THREADED_COPY_BLOCKS:
            written = await trio.to_thread.run_sync(self._copy_blocks, copies)
        else:
            written = self._copy_blocks(copies)
        self.unsynced.extend(written)

    def _copy_blocks(self, copies: list[BowCopy]) -> list[tuple[int, bytes]]:
        """(Any thread.) Read each copy's source, checksum it, write it to its
        destination (page cache); (offset, data) of what was written."""
        bs = self.block_size
        written = []
        for copy in copies:
            data = self.device.pread(copy.blocks * bs, copy.source * bs)
            if copy.kind == "data":
                copy.checksum = bow_log.block_checksum(copy.source * self.sectors_per_block, data, bs)
            self.device.pwrite(data, copy.dest * bs)
            written.append((copy.dest * bs, data))
        return written

    def write_records(self, copies: list[BowCopy]):
        """Sync. Append log entries for durable copies and write the log block; a full
        log block is first backed up (injected) and everything else deferred. Raises
        only before recording anything."""
        if self.state != CHECKPOINT:
            return copies, [], []  # committed meanwhile: the log is gone
        # One call backs up at most one full log block (after that everything waits
        # for it). Without a free block for it, fail them all before recording any.
        if len(copies) >= bow_log.entries_per_block(self.block_size) - len(self.log.entries) \
                and not self.log_copy_pending and not self._free_blocks():
            raise OSError(errno.ENOSPC, "no free block left to roll the log over")
        recorded, deferred, injected = [], [], []
        spb, changed = self.sectors_per_block, False
        for copy in copies:
            if copy.kind == "log":
                # Rollover: the backup of the full log block is durable.
                self.log = LogBlock(self.block_size, self.log.sequence + 1, self.log.sector0,
                                    [LogEntry(0, copy.dest * spb, self.block_size, copy.checksum)])
                self.log_copy_pending = False
                recorded.append(copy)
                changed = True
            elif self.log_copy_pending:
                deferred.append(copy)
            elif self.log.full:
                dest = self._destination(1)[0]
                log_copy = self._hold(BowCopy(0, dest, 1, "log"))
                data = self.log.pack()
                log_copy.checksum = bow_log.block_checksum(0, data, self.block_size)
                self._write_for_barrier(data, dest * self.block_size)
                self.log_copy_pending = True
                injected.append(log_copy)
                deferred.append(copy)
            else:
                self.log.entries.append(LogEntry(copy.source * spb, copy.dest * spb,
                                                 copy.blocks * self.block_size, copy.checksum))
                if copy.kind == "sector0":
                    self.log.sector0 = copy.dest * spb
                recorded.append(copy)
                changed = True
        if changed:
            # Ordering: these copies were made durable by an earlier barrier; the next
            # barrier makes this log block durable before any overwrite proceeds.
            self._write_for_barrier(self.log.pack(), 0)
        return recorded, deferred, injected

    def _write_for_barrier(self, data: bytes, offset: int) -> None:
        self.device.pwrite(data, offset)
        self.unsynced.append((offset, data))

    async def barrier(self) -> None:
        """Make durable what copies and log writes wrote since the last barrier, and
        only that: an fdatasync would also write back every overwrite since (the
        in-place writes of a whole round: random writes, many times the cost)."""
        pending, self.unsynced = self.unsynced, []
        if not (self.cbw.group_commit and self.range_barriers):
            # (The naive order's barriers run concurrently with other writers' log
            # writes, so `_sync_ranges` could rewrite an older log block.) fdatasync:
            # the device's size never changes, its timestamps need not be durable.
            await trio.to_thread.run_sync(os.fdatasync, self.device.fd)
        elif pending:
            await trio.to_thread.run_sync(self._sync_ranges, pending)

    def _sync_ranges(self, pending: list[tuple[int, bytes]]) -> None:
        """(Worker thread.) Every range is written back, then one of them is written
        again with RWF_DSYNC: a datasync of that range, which commits the file's
        metadata (blocks allocated for the others included) and flushes the
        device's cache, so the ranges written back before it are durable too. The
        rewrite is of the same bytes, to a block nobody else writes meanwhile: a
        copy's destination (held until recorded) if there is one, else block 0, the
        log, which group commit writes only between barriers (and a commit waits
        for the round: `settled_commit`)."""
        runs: list[list[int]] = []
        for offset, data in sorted(pending, key=lambda item: item[0]):
            if runs and offset <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], offset + len(data))
            else:
                runs.append([offset, offset + len(data)])
        for start, end in runs:
            write_back(self.device.fd, start, end - start)
        offset, data = min(pending, key=lambda item: (item[0] == 0, len(item[1])))
        os.pwritev(self.device.fd, [data], offset, os.RWF_DSYNC)

    def recorded(self, copies: list[BowCopy]) -> None:
        """Sync. The log entries are durable: sources may be overwritten now. The
        journal hears of it only now, after the log (see `_apply_unjournaled_entries`)."""
        backups: list[list] = []  # runs of destinations now holding backups: [start, end, holds]
        for copy in copies:
            if self.state != CHECKPOINT:  # committed meanwhile
                self.cbw.release(copy.dest, copy.dest + copy.blocks, copy.hold)
                self._assign(copy.dest, copy.dest + copy.blocks, FREE)
                self._punch(copy.dest, copy.dest + copy.blocks)
                continue
            if copy.kind == "sector0":
                self.cbw.release(copy.dest, copy.dest + 1, copy.hold)
                self._assign(copy.source, copy.source + 1, CHANGED)
                self._assign(copy.dest, copy.dest + 1, SECTOR0)
                self.sector0_block = copy.dest
                self.journal.add(MapJournal.STATE, STATE_CODES[CHECKPOINT], copy.dest, self.block0_backup)
                continue
            if copy.kind == "data":
                self._assign(copy.source, copy.source + copy.blocks, CHANGED)
            # Destinations are handed out next-fit, so a round's are mostly one run:
            # one map change for all of them.
            if backups and backups[-1][1] == copy.dest:
                backups[-1][1] += copy.blocks
                backups[-1][2].append(copy.hold)
            else:
                backups.append([copy.dest, copy.dest + copy.blocks, [copy.hold]])
        for start, end, holds in backups:
            self.cbw.release(start, end, *holds)
            self._assign(start, end, BACKUP)
        if self.log is not None:
            self.journal.add(MapJournal.LOGPOS, 0, self.log.sequence, len(self.log.entries))
        self.journal.write_out()
        self._check_low_space()

    def abandoned(self, copies: list[BowCopy], exc: BaseException) -> None:
        # What they wrote must not be rewritten by a later barrier (`_sync_ranges`)
        # once their destinations hold other copies.
        bs = self.block_size
        gone = [(copy.dest * bs, (copy.dest + copy.blocks) * bs) for copy in copies]
        self.unsynced = [(offset, data) for offset, data in self.unsynced
                         if not any(offset < end and start < offset + len(data) for start, end in gone)]
        for copy in copies:
            self.blocks.assign(copy.dest, copy.dest + copy.blocks, FREE)
            self.cbw.release(copy.dest, copy.dest + copy.blocks, copy.hold)
            if copy.kind == "log":
                self.log_copy_pending = False

    # -- discards --------------------------------------------------------------------

    async def discard(self, offset: int, length: int, *, zero_range: bool) -> None:
        """Both kinds read back as zeros (a loop device sends write-zeroes as punches)."""
        check_range(self.size, offset, length)
        self._check_failed()
        bs = self.block_size
        first, end = -(-offset // bs), (offset + length) // bs
        try:
            if first >= end:
                await self.write(offset, bytes(length))
                return
            if offset < first * bs:
                await self.write(offset, bytes(first * bs - offset))
            if (offset + length) > end * bs:
                await self.write(end * bs, bytes(offset + length - end * bs))
            if self.state != CHECKPOINT:
                self._discard_blocks(first, end)  # no await: see _write_pass_through
                return
            if first == 0:
                await self.write(0, bytes(bs))  # block 0 lives in sector0_block
                first = 1
            async with self.cbw.exclusive(first, end):
                self._check_failed()
                self._discard_blocks(first, end)
        finally:
            self.journal.write_out()

    def _discard_blocks(self, first: int, end: int) -> None:
        if self.state != CHECKPOINT:
            self._assign(first, end, FREE)
            self._punch(first, end)
            return
        # Checkpoint: only what no restore needs may be punched.
        for s, e, kind in self.blocks.segments(first, end):
            if kind == CHANGED:
                self._assign(s, e, FREE)
                self._punch(s, e)
            elif kind is None:
                self._assign(s, e, ZEROED)

    def _punch(self, first: int, end: int) -> None:
        if not self.punch_supported:
            return
        try:
            self.device.punch(first * self.block_size, (end - first) * self.block_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
            log.info("%s: %s cannot punch holes (%s); free blocks are zeros in the map only",
                     self.name, self.device.path, exc.strerror)
            self.punch_supported = False

    async def flush(self) -> None:
        # Staged writes acknowledged so far are applied in place first: a flushed
        # write never lives only in the staging file (see the module docstring).
        await self.cbw.settled()
        self._check_failed()
        self.journal.write_out()

        def sync_both():
            os.fdatasync(self.device.fd)  # the size never changes; timestamps need not be durable
            self.journal.fsync()

        await trio.to_thread.run_sync(sync_both)
        if self.journal.records > 4 * max(1024, len(self.blocks)):
            self._compact_journal()

    # -- state changes ------------------------------------------------------------------

    async def control(self, verb: str, args: list[str]) -> str:
        if args == ["checkpoint"]:
            self.checkpoint()
        elif args == ["commit"]:
            await self.settled_commit()
        else:
            raise ValueError(f"bow takes checkpoint or commit, not {' '.join(args)!r}")
        return self.state

    def checkpoint(self) -> None:
        """trim -> checkpoint (sync: see the module docstring on why nothing is half done)."""
        if self.state != TRIM:
            raise OSError(errno.EPERM, f"cannot checkpoint in {self.state} state")
        if self.blocks.length_of(FREE) < 2:
            raise OSError(errno.ENOSPC, "checkpoint needs two free blocks (discard free space first: fstrim)")
        bs, spb = self.block_size, self.sectors_per_block
        live = self._allocate(1)[0]
        self.blocks.assign(live, live + 1, COPYING)
        backup = self._allocate(1)[0]
        self.blocks.assign(backup, backup + 1, COPYING)
        block0 = bytes(self._view(0, bs))
        original = self.device.pread(bs, 0)
        try:
            self.device.pwrite(block0, live * bs)
            self.device.pwrite(original, backup * bs)
            # Ordering: every write acknowledged so far and both copies of block 0
            # durable, then the log; until the log is durable block 0 is untouched,
            # and a crash leaves the device as it is: the checkpoint.
            self.device.fsync()
            log_block = LogBlock(bs, 0, live * spb, [LogEntry(0, backup * spb, bs,
                                                              bow_log.block_checksum(0, original, bs))])
            self.device.pwrite(log_block.pack(), 0)
            self.device.fsync()
        except OSError:
            self.blocks.assign(live, live + 1, FREE)
            self.blocks.assign(backup, backup + 1, FREE)
            raise
        self.log = log_block
        self.state = CHECKPOINT
        self.sector0_block = live
        self._assign(0, 1, LOG)
        self._assign(live, live + 1, SECTOR0)
        self._assign(backup, backup + 1, BACKUP)
        self.block0_backup = backup
        self.journal.add(MapJournal.STATE, STATE_CODES[CHECKPOINT], live, backup)
        self.journal.add(MapJournal.LOGPOS, 0, 0, 1)
        self.journal.write_out()
        self.journal.fsync()
        self._check_low_space()
        log.info("%s: checkpoint; block 0 lives in block %d", self.name, live)

    async def settled_commit(self) -> None:
        """`commit` once no write is staged: pass-through writes after it take no
        locks, so none may overtake a staged write. New writes wait meanwhile (and
        do not use up free space: `--bow-on-low-space commit`)."""
        while self.commit_running:  # another one (low space, a command): then this one is late
            await self.committing.wait()
        if self.state != CHECKPOINT:
            raise OSError(errno.EPERM, f"cannot commit in {self.state} state")
        self.commit_running = True
        if self.committing is None:  # else `_note_low_space` made writes wait already
            self.committing = trio.Event()
        try:
            while self.staged and self.failed is None:
                await self.cbw.settled()
            while self.cbw.round_running:  # its barrier may rewrite the log block: see _sync_ranges
                await self.cbw.round_done.wait()
            self.commit()
        finally:
            self.commit_running = False
            self.committing.set()
            self.committing = None

    def commit(self) -> None:
        """checkpoint -> committed: block 0 goes back; the device is a pass-through.
        No write may be staged (`settled_commit`)."""
        if self.state != CHECKPOINT:
            raise OSError(errno.EPERM, f"cannot commit in {self.state} state")
        self._check_failed()
        assert not self.staged, "commit with staged writes"
        bs = self.block_size
        block0 = self.device.pread(bs, self.sector0_block * bs)
        # Ordering: the device is made durable first (writes before the commit stay
        # behind a valid log until then), then block 0 replaces the log at once.
        self.device.fsync()
        self.device.pwrite(block0, 0)
        self.device.fsync()
        self._committed()
        self.journal.write_out()
        self.journal.fsync()
        log.info("%s: committed", self.name)

    def _committed(self) -> None:
        """Block 0 is back on the device: the map of a pass-through again."""
        self.state = COMMITTED
        self.log = None
        self.log_copy_pending = False
        self._unreserve()
        # What reads as zeros but holds old data is punched, so the device is what
        # bow.img showed; in-use is what the filesystem wrote.
        for s, e, kind in self.blocks.snapshot():
            if kind in (CHANGED, LOG):
                self._assign(s, e, None)
            elif kind in (ZEROED, BACKUP, SECTOR0):
                self._assign(s, e, FREE)
                self._punch(s, e)
        self.journal.add(MapJournal.STATE, STATE_CODES[COMMITTED], 0, 0)

    # -- low space ----------------------------------------------------------------------

    def _note_low_space(self) -> None:
        if self.commits_when_low and self.state == CHECKPOINT and self.committing is None:
            # Writes wait from the next one on: staged writes return without an await,
            # so many could use up the rest before the commit task runs.
            self.committing = trio.Event()
        self.low_space_event.set()

    def _check_low_space(self) -> None:
        if self.state == CHECKPOINT and self.free_bytes < self.low_space:
            self._note_low_space()

    @property
    def free_bytes(self) -> int:
        return self._free_blocks() * self.block_size

    async def start(self, nursery: trio.Nursery) -> None:
        """Called before the mount serves (again after a refused upgrade)."""
        if self.recovery_deferred:
            self._finish_recovery()
        if self.staging is not None:
            if self.staging.fd < 0:
                await self._replay_staged()
            if self.staging.slots:
                nursery.start_soon(self.cbw.drive_staged)
        if self.on_low_space == "commit":
            nursery.start_soon(self._commit_when_low)

    async def _replay_staged(self) -> None:
        """Writes a killed server staged (acknowledged, maybe not yet backed up) go
        through the write path now, backups first, before anything is served (no
        two of them share a block: a staged write held its blocks). Then the
        staging file starts empty; a kill -9 before that replays them again."""
        found = [] if self.map_was_missing else self.staging.recover()
        if found:
            log.info("%s: applying %d writes a stopped server had staged", self.name, len(found))
            try:
                async with trio.open_nursery() as nursery:  # concurrent: they share rounds
                    for offset, data in found:
                        nursery.start_soon(self.write, offset, data)
                await self.flush()
            except OSError as exc:
                raise UserError(f"{self.device.path}: cannot apply the writes staged in "
                                f"{self.staging.path}: {exc.strerror or exc}", EXIT_FAILED) from None
        try:
            self.staging.reset()
        except OSError as exc:
            raise UserError(f"cannot keep staged writes in {self.staging.path}: {exc.strerror}") from None

    async def _commit_when_low(self) -> None:
        """Android's vold polls the free space and commits when it runs low."""
        self.commits_when_low = True
        try:
            while True:
                await self.low_space_event.wait()
                self.low_space_event = trio.Event()
                if self.state == CHECKPOINT and self.free_bytes < self.low_space:
                    log.warning("%s: free space %d bytes below %d: committing", self.name,
                                self.free_bytes, self.low_space)
                    try:
                        await self.settled_commit()
                    except OSError as exc:
                        self.error = f"automatic commit failed: {exc}"
                        log.error("%s: %s", self.name, self.error)
                elif self.committing is not None and not self.commit_running:  # no longer due
                    self.committing.set()
                    self.committing = None
        finally:
            self.commits_when_low = False
            if self.committing is not None and not self.commit_running:  # due, but nobody will
                self.committing.set()
                self.committing = None

    # -- status, teardown -----------------------------------------------------------

    def status(self) -> dict:
        low = self.state == CHECKPOINT and self.free_bytes < self.low_space
        entries = 0
        if self.log is not None:
            entries = self.log.sequence * bow_log.entries_per_block(self.block_size) + len(self.log.entries)
        return {"state": self.state, "free": self.free_bytes,
                "backed_up": self.blocks.length_of(BACKUP) * self.block_size,
                "log_entries": entries, "sequence": self.log.sequence if self.log else 0,
                "warning": "low-space" if low else "", "low_space": low,
                "low_space_threshold": self.low_space, "block_size": self.block_size,
                "device": self.device.path, "map": self.journal.path, "error": self.error,
                "staged": self.cbw.staged_count, "staged_now": len(self.cbw.unfinished),
                "restaged": self.restaged, **self.cbw.status()}

    # -- live upgrade ------------------------------------------------------------------

    def handover_fds(self) -> dict[str, int]:
        return {self.device.path: self.device.fd}

    def handover_state(self) -> dict:
        """The map is handed over through its journal: its records are written out
        (page cache, shared with the successor) and the state names how many there
        are; the successor reads the ones after what it read when it opened the
        image. The rest is what the journal does not hold. In the pause no request
        is in flight, so no copy is (`idle`), and the map equals the journal's."""
        self._unreserve()  # the journal calls it free (if the upgrade is refused: taken again)
        self.journal.write_out()
        idle = self.cbw.idle
        return {**super().handover_state(), "device": self.device.path, "map": self.journal.path,
                "journal_inode": self.journal.inode, "journal_records": self.journal.records,
                "state": self.state, "sector0_block": self.sector0_block,
                "block0_backup": self.block0_backup, "free_cursor": self.free_cursor,
                "log_copy_pending": self.log_copy_pending, "punch_supported": self.punch_supported,
                "error": self.error, "idle": idle, "figures": self._map_figures() if idle else None,
                "staged": len(self.cbw.unfinished)}

    def _map_figures(self) -> list[int]:
        """A cheap fingerprint of the map, compared after a hand-over."""
        return [len(self.blocks), *(self.blocks.length_of(kind) for kind in (FREE, CHANGED, ZEROED, BACKUP))]

    def restore_handover_state(self, state: dict) -> None:
        self.check_handover_state(state)
        if state.get("staged"):  # stopping background tasks finishes them, unless the device failed
            raise ValueError(f"{self.name}: {state['staged']} staged writes could not be applied; "
                             "unmount and mount again")
        if (state["device"], state["map"]) != (self.device.path, self.journal.path):
            raise ValueError(f"{self.name}: handed over for {state['device']} with map {state['map']}, "
                             f"but opened {self.device.path} with {self.journal.path}")
        if state["journal_inode"] == self.journal.inode:
            self._replay(self.journal.records_after_load(state["journal_records"]))
        else:  # the old server compacted its journal after we read it: read it again
            if os.stat(self.journal.path).st_ino != state["journal_inode"]:
                raise ValueError(f"{self.journal.path} is not the journal handed over (compacted since?)")
            self.journal.close()
            self.blocks, self.log, self.state = RangeMap(), None, TRIM
            self._load(state["journal_records"])
            self.journal.append_to_loaded()
        self.state = state["state"]
        self.sector0_block, self.block0_backup = state["sector0_block"], state["block0_backup"]
        # The log block in block 0 is what the old server last wrote (page cache).
        self.log = bow_log.read_header(self.device) if self.state == CHECKPOINT else None
        self.free_cursor, self.log_copy_pending = state["free_cursor"], state["log_copy_pending"]
        self.punch_supported, self.error = state["punch_supported"], state["error"]
        if state["idle"] and self._map_figures() != state["figures"]:
            raise ValueError(f"{self.name}: the map read from {self.journal.path} ({self._map_figures()}) "
                             f"is not the old server's ({state['figures']})")
        self.recovery_deferred = False  # the state is the old server's: nothing to recover

    async def close(self) -> None:
        try:
            self._unreserve()
            self.journal.write_out()
            self.device.fsync()
            self.journal.fsync()
        finally:
            self.journal.close()
            self.device.close()
            if self.staging is not None:
                self.staging.close()


# -- the command line --------------------------------------------------------------

def block_size_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not bow_log.valid_block_size(value):
        raise argparse.ArgumentTypeError(f"must be a power of two from 512 to 4096, got {text}")
    return value


def add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backup-on-write (bow.img)")
    group.add_argument("--bow", metavar="DEV", type=arguments.device, help="expose bow.img, DEV with backup-on-write")
    group.add_argument("--bow-map", metavar="FILE", type=arguments.path,
                       help=f"where DEV's block map is kept (default {MAP_DIR}/<DEV path>.map)")
    group.add_argument("--bow-block-size", type=block_size_arg, default=None, metavar="BYTES",
                       help=f"backup granularity, 512..4096 (default {DEFAULT_BLOCK_SIZE}, "
                       "or what DEV's map or log says)")
    group.add_argument("--bow-low-space", type=arguments.size, default=DEFAULT_LOW_SPACE, metavar="SIZE",
                       help="warn (or commit) when free space for backups falls below SIZE (default 100M)")
    group.add_argument("--bow-on-low-space", choices=("warn", "commit"), default="warn",
                       help="what to do below --bow-low-space in checkpoint state (default warn)")
    group.add_argument("--bow-staging", type=arguments.size, default=DEFAULT_STAGING, metavar="SIZE",
                       help="room for first writes acknowledged before their backups are durable, "
                       "kept beside the map (default 64M; 0: every first write waits for its backup)")
    # For bench/bench_bow.py: two syncs per first write instead of group commit.
    group.add_argument("--bow-naive-commit", action="store_true", help=argparse.SUPPRESS)


def _map_path(args, device_path: str) -> str:
    return args.bow_map or default_map_path(device_path)


def staging_path(map_path: str) -> str:
    return map_path + ".stage"


def _block_size_of(device: BlockDevice, map_path: str, wanted: int | None) -> int:
    """The block size: as given, else the device log's or the map's, else the default."""
    found = None
    try:
        header = bow_log.read_header(device)
        if header is not None:
            found = header.block_size
    except BowLogError:
        pass
    if found is None:
        try:
            with open(map_path, "rb") as f:
                head = f.read(4096)
            length = struct.unpack_from("<I", head, 8)[0]
            found = json.loads(head[12:12 + length]).get("block_size")
        except (OSError, ValueError, struct.error):
            found = None
    if wanted is not None and found is not None and wanted != found:
        raise UserError(f"{device.path} uses {found}-byte backup blocks (its log or map says so), "
                        f"not {wanted}")
    return wanted or found or DEFAULT_BLOCK_SIZE


def images_from_args(args: argparse.Namespace) -> list[Image]:
    if not args.bow:
        return []
    device = BlockDevice(args.bow)
    try:
        if device.read_only:
            raise UserError(f"{device.path} is read-only: bow.img needs to write it")
        lock_device(device, "the mount")
        map_path = _map_path(args, device.path)
        block_size = _block_size_of(device, map_path, args.bow_block_size)
        if device.logical_block_size > block_size:
            raise UserError(f"{device.path} has {device.logical_block_size}-byte sectors: "
                            f"--bow-block-size must be at least that")
        if device.size < 4 * block_size:
            raise UserError(f"{device.path} is too small for bow.img ({device.size} bytes)")
        journal = MapJournal(map_path, device_identity(device, block_size))
        # Always there: a re-mount with less room (or none) still applies what was staged.
        staging = StagingFile(staging_path(map_path), block_size,
                              0 if args.bow_naive_commit else args.bow_staging)
        try:
            return [BowImage(device, journal, block_size=block_size, low_space=args.bow_low_space,
                             on_low_space=args.bow_on_low_space,
                             group_commit=not args.bow_naive_commit, staging=staging)]
        except BowLogError as exc:
            raise UserError(f"{device.path}: damaged backup-on-write log: {exc}", EXIT_FAILED) from None
        except OSError as exc:
            raise UserError(f"cannot keep the bow map {map_path}: {exc.strerror}") from None
    except BaseException:
        device.close()
        raise


USAGE_EXAMPLES = """\
  fusesnap mount mnt --bow /dev/sda3                          # mnt/bow.img: sda3, backed up on write
  losetup --find --show --direct-io=on mnt/bow.img            # mount the loop device, then fstrim it
  fusesnap bow checkpoint mnt                                 # from now on overwrites are backed up
  fusesnap bow commit mnt                                     # keep the changes; or, to roll back:
  fusesnap bow restore /dev/sda3                              # (unmounted) sda3 is the checkpoint again"""


def add_commands(commands) -> None:
    p = commands.add_parser("bow", help="backup-on-write: checkpoint, commit, restore, inspect",
                            description="Checkpoint and commit bow.img in a mount; restore or "
                            "inspect a device offline.")
    actions = p.add_subparsers(dest="bow_action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    q = actions.add_parser("checkpoint", help="from now on, back up every overwritten block")
    q.add_argument("mountpoint", metavar="MOUNTPOINT", type=arguments.path)
    q.set_defaults(run=cmd_state_change)
    q = actions.add_parser("commit", help="keep the changes: block 0 goes back, pass-through again")
    q.add_argument("mountpoint", metavar="MOUNTPOINT", type=arguments.path)
    q.set_defaults(run=cmd_state_change)
    q = actions.add_parser("restore", help="roll DEV back to its checkpoint (offline)")
    q.add_argument("device", metavar="DEV", type=arguments.device)
    q.add_argument("--dry-run", action="store_true", help="validate the log and say what would be restored")
    q.add_argument("--bow-map", metavar="FILE", type=arguments.path, help="DEV's block map, removed after the restore "
                   f"(default {MAP_DIR}/<DEV path>.map)")
    q.set_defaults(run=cmd_restore)
    q = actions.add_parser("inspect", help="print DEV's log header and a summary (offline)")
    q.add_argument("device", metavar="DEV", type=arguments.device)
    q.add_argument("--json", action="store_true", help="as JSON")
    q.set_defaults(run=cmd_inspect)


NEXT_STATE = {"checkpoint": (TRIM, CHECKPOINT), "commit": (CHECKPOINT, COMMITTED)}


def cmd_state_change(args) -> int:
    """`bow checkpoint|commit MNT`: forward steps only; anything else changes nothing."""
    require_image(args.mountpoint, "bow", "mount it with --bow DEV")
    images = json.loads(read_status(args.mountpoint, True))["images"]
    figures = next(f for f in images.values() if f["target"] == "bow")
    needed, _ = NEXT_STATE[args.bow_action]
    if figures["state"] != needed:
        raise UserError(f"bow.img is in {figures['state']} state: `{args.bow_action}` needs {needed} "
                        "state (only forward steps: trim -> checkpoint -> committed)", EXIT_FAILED)
    if args.bow_action == "checkpoint" and figures["free"] < 2 * figures["block_size"]:
        raise UserError("checkpoint needs two free blocks: discard free space first "
                        "(fstrim the filesystem on bow.img)", EXIT_FAILED)
    send_command(args.mountpoint, f"bow {args.bow_action}")
    return 0


def _open_offline(device_arg: str, what: str, *, read_only: bool) -> BlockDevice:
    device = BlockDevice(device_arg, read_only=read_only)
    try:
        lock_device(device, what)
    except BaseException:
        device.close()
        raise
    return device


def cmd_restore(args) -> int:
    device = _open_offline(args.device, "restore", read_only=args.dry_run)
    started = time.monotonic()
    try:
        try:
            # The checked backups stay in memory: the restore writes them without reading them again.
            summary = bow_log.validate(device, keep_backups=not args.dry_run)
        except BowLogError as exc:
            raise UserError(f"{device.path}: not restored, nothing written: {exc}", EXIT_FAILED) from None
        total = summary.backed_up_bytes
        verb = "resuming an interrupted restore" if summary.resuming else "restoring"
        if args.dry_run:
            print(f"{device.path}: log valid; would restore {summary.entries} backups "
                  f"({total} bytes, {len(summary.blocks)} log blocks)")
            return 0
        if device.read_only:
            raise UserError(f"{device.path} is read-only", EXIT_FAILED)
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=verb)
        try:
            bow_log.restore(device, validated=summary, progress=bar.update if bar else None)
        except BowLogError as exc:
            raise UserError(f"{device.path}: restore stopped: {exc}; run it again", EXIT_FAILED) from None
        except OSError as exc:
            raise UserError(f"{device.path}: restore stopped: {exc.strerror}; run it again",
                            EXIT_FAILED) from None
        finally:
            if bar:
                bar.close()
        device.fsync()
    finally:
        device.close()
    map_path = _map_path(args, device.path)
    for path in (map_path, staging_path(map_path)):
        try:
            os.unlink(path)  # they described the device after the checkpoint
        except FileNotFoundError:
            pass
    print(f"{device.path}: restored to its checkpoint ({summary.entries} backups, {total} bytes, "
          f"in {time.monotonic() - started:.2f} s)")
    return 0


def cmd_inspect(args) -> int:
    device = _open_offline(args.device, "inspect", read_only=True)
    try:
        summary = header = problem = None
        try:
            header = bow_log.read_header(device)
            if header is None:
                raise UserError(f"{device.path}: no backup-on-write log (block 0 has no BOW magic)",
                                EXIT_FAILED)
            summary = bow_log.validate(device)
        except BowLogError as exc:
            problem = str(exc)
    finally:
        device.close()
    info = {"device": device.path, "valid": problem is None, "problem": problem}
    if header is not None:
        info.update({"magic": "WOB (restore in progress)" if header.magic == bow_log.PARTIAL_RESTORE_MAGIC
                     else "BOW", "header_version": f"0x{header.header_version:04x}",
                     "header_size": header.header_size, "block_size": header.block_size,
                     "count": len(header.entries), "sequence": header.sequence, "sector0": header.sector0})
    if summary is not None:
        info.update({"log_blocks": len(summary.blocks), "entries": summary.entries,
                     "backed_up_bytes": summary.backed_up_bytes})
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=True))
    else:
        for key, value in info.items():
            if value is not None:
                print(f"{key}: {value}")
    return 0 if problem is None else EXIT_FAILED
