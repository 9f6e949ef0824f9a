"""The snapshot store: one file holding the old contents of origin chunks that held
snapshots still need, and the table saying which snapshot reads which.

Layout (all integers little-endian; offsets in bytes)

    0                       superblock, 4096 bytes, written once at creation
    4096                    table region A, `table_bytes` long
    4096 + table_bytes      table region B, `table_bytes` long
    data_start              slot 0, slot 1, ... (data_start = 4096 + 2 * table_bytes),
                            each `chunk_size` bytes: slot i at data_start + i * chunk_size

Superblock: magic b"FSNAPSTR", u32 version (1), u32 chunk_size, u64 device_size,
u64 table_bytes, u32 length, `length` bytes of JSON (the device's identity: path,
size, device numbers or inode), u32 CRC-32 of everything before it. Never rewritten.

Table region: a 64-byte header, then 32-byte records up to the region's end.
    header: magic b"FSNAPTBL", u64 epoch, 16 bytes generation (a UUID), u32
            next_snapshot (the number the next take gets), u32 base_count, u32
            base_crc (CRC-32 of the first base_count records' bytes), 20 bytes zero,
            u32 CRC-32 of the header's first 60 bytes.
    record: u8 type, 3 bytes zero, u32 snapshot, u64 chunk, u64 slot, u32 count,
            u32 CRC-32 of the first 28 bytes, computed with the region's epoch (low
            32 bits) as the starting value, so records left over from an older use
            of the region never pass as current.
The active region is the one whose header and base records are intact with the
higher epoch. Its records are replayed in order: the `base_count` base records
(all must be intact: a compaction written out completely), then appended records
until the first one whose CRC fails (a torn tail after a power cut ends the replay).
A compaction writes the whole state as the base of the other region with epoch + 1;
until that region is durable in full, the old one stays the active one. A base must
leave half its region for appends; if the state does not fit, the oldest intact
snapshots are marked corrupted (table full), their maps dropped, one at a time until
it does (at worst the base keeps only the change map).

Record types and their meaning, applied in order to (held snapshots, per snapshot a
map chunk -> slot, the change-block map chunk -> number):
    TAKE     snapshot N is held: it reads every chunk from the device.
    RELEASE  snapshot N is dropped with its map.
    COPY     chunks [chunk, chunk + count) had their old contents copied into slots
             [slot, slot + count): every held, intact snapshot with no entry for a
             chunk gets that slot (one copy shared by all). Change map := snapshot
             (the newest number at the time of the write; a copy made ahead of a
             sequential writer's next writes keeps the chunk's value, 0 if none).
    OWN      snapshot N's private copy of chunk(s) (a write to the snapshot); change
             map := max(change map, N).
    MAP      (compaction) snapshot N reads chunks from slots [slot, slot + count).
    CBT      (compaction, and origin writes that copied nothing) change map := snapshot.
    CORRUPT  snapshot N is corrupted (count is the reason: 1 overflow, 2 store I/O
             error, 3 table full, 4 power cut): its reads fail, its map is dropped.
    DIRTY    from here on copies and records may be in the page cache only; chunk
             and slot hold the boot id (/proc/sys/kernel/random/boot_id, 16 bytes)
             of the running kernel. Durable before any origin write whose copy is not.
    CLEAN    everything before it is durable (written after an fsync of the store).

Loading: if a DIRTY is in force (no CLEAN after it) and its boot id is not the
running kernel's, the machine went down with copies in its page cache: every
snapshot is lost (CORRUPT, reason 4) and the change map starts a new generation.
With the same boot id only the server died; the page cache kept everything.

A slot is in use while an intact held snapshot maps to it. Ordering rules that keep
every crash state honest (the image follows them, see fusesnap.images.snapshot): a
copy reaches the store (page cache) before its record, and its record before the
origin chunk it protects is overwritten; a DIRTY record is durable before the first
overwrite whose copy is not; a CLEAN record only follows an fsync that covered every
record before it; a RELEASE or CORRUPT record is durable before a slot it frees is
reused; TAKE and RELEASE are fsynced before they are acknowledged.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import uuid
import zlib

MAGIC = b"FSNAPSTR"
TABLE_MAGIC = b"FSNAPTBL"
VERSION = 1
SUPERBLOCK_SIZE = 4096
HEADER_SIZE = 64
RECORD_SIZE = 32

_SUPER = struct.Struct("<8sIIQQI")
_HEADER = struct.Struct("<8sQ16sIII20x")
_RECORD = struct.Struct("<B3xIQQI")

TAKE, RELEASE, COPY, OWN, MAP, CBT, CORRUPT, DIRTY, CLEAN = range(1, 10)
RECORD_NAMES = {TAKE: "take", RELEASE: "release", COPY: "copy", OWN: "own", MAP: "map",
                CBT: "cbt", CORRUPT: "corrupt", DIRTY: "dirty", CLEAN: "clean"}
OVERFLOW, STORE_ERROR, TABLE_FULL, POWER_CUT = 1, 2, 3, 4
REASONS = {OVERFLOW: "overflow: the store had no room for a chunk it needed",
           STORE_ERROR: "the store could not be written",
           TABLE_FULL: "the store's table is full",
           POWER_CUT: "power cut: the store was in use, not synced, when the machine went down"}


class StoreFormatError(ValueError):
    """The file is not a snapshot store, or its superblock is damaged."""


@dataclasses.dataclass(frozen=True)
class Superblock:
    chunk_size: int
    device_size: int
    table_bytes: int
    identity: dict

    @property
    def data_start(self) -> int:
        return SUPERBLOCK_SIZE + 2 * self.table_bytes

    def region_offset(self, region: int) -> int:
        return SUPERBLOCK_SIZE + region * self.table_bytes

    @property
    def record_capacity(self) -> int:
        return (self.table_bytes - HEADER_SIZE) // RECORD_SIZE

    def pack(self) -> bytes:
        ident = json.dumps(self.identity, sort_keys=True).encode()
        body = _SUPER.pack(MAGIC, VERSION, self.chunk_size, self.device_size, self.table_bytes,
                           len(ident)) + ident
        block = body + struct.pack("<I", zlib.crc32(body))
        if len(block) > SUPERBLOCK_SIZE:
            raise ValueError("device identity too long for the superblock")
        return block.ljust(SUPERBLOCK_SIZE, b"\0")

    @classmethod
    def unpack(cls, block: bytes) -> "Superblock":
        if len(block) < _SUPER.size or block[:8] != MAGIC:
            raise StoreFormatError("not a snapshot store (no FSNAPSTR magic)")
        magic, version, chunk_size, device_size, table_bytes, length = _SUPER.unpack_from(block)
        end = _SUPER.size + length
        if end + 4 > len(block) or struct.unpack_from("<I", block, end)[0] != zlib.crc32(block[:end]):
            raise StoreFormatError("damaged superblock (CRC mismatch)")
        if version != VERSION:
            raise StoreFormatError(f"store format version {version}, this fusesnap reads {VERSION}")
        if chunk_size < 4096 or chunk_size & (chunk_size - 1) or table_bytes < HEADER_SIZE + RECORD_SIZE:
            raise StoreFormatError("superblock with impossible chunk or table size")
        return cls(chunk_size, device_size, table_bytes, json.loads(block[_SUPER.size:end]))


def table_bytes_for(chunk_count: int) -> int:
    """Room for a compacted table in the worst case we accept (four runs per chunk)
    plus appended records, in whole 4 KiB blocks."""
    wanted = HEADER_SIZE + RECORD_SIZE * (4 * chunk_count + 4096)
    return -(-wanted // 4096) * 4096


@dataclasses.dataclass(frozen=True)
class Record:
    type: int
    snapshot: int = 0
    chunk: int = 0
    slot: int = 0
    count: int = 1

    def pack(self, epoch: int) -> bytes:
        body = _RECORD.pack(self.type, self.snapshot, self.chunk, self.slot, self.count)
        return body + struct.pack("<I", zlib.crc32(body, epoch & 0xFFFFFFFF))


@dataclasses.dataclass
class TableHeader:
    epoch: int
    generation: str
    next_snapshot: int
    base_count: int = 0
    base_crc: int = 0

    def pack(self) -> bytes:
        body = _HEADER.pack(TABLE_MAGIC, self.epoch, uuid.UUID(self.generation).bytes,
                            self.next_snapshot, self.base_count, self.base_crc)
        return body[:60] + struct.pack("<I", zlib.crc32(body[:60]))

    @classmethod
    def unpack(cls, data: bytes) -> "TableHeader | None":
        if len(data) < HEADER_SIZE or data[:8] != TABLE_MAGIC:
            return None
        if struct.unpack_from("<I", data, 60)[0] != zlib.crc32(data[:60]):
            return None
        _, epoch, gen, next_snapshot, base_count, base_crc = _HEADER.unpack_from(data)
        return cls(epoch, str(uuid.UUID(bytes=gen)), next_snapshot, base_count, base_crc)


@dataclasses.dataclass
class Table:
    """The active region as read: which region, its header, its records, and where
    the next record goes."""
    region: int
    header: TableHeader
    records: list[Record]

    @property
    def append_at(self) -> int:
        return len(self.records)


def _read_region(pread, sb: Superblock, region: int) -> Table | None:
    data = pread(sb.table_bytes, sb.region_offset(region))
    header = TableHeader.unpack(data[:HEADER_SIZE])
    if header is None or header.base_count > sb.record_capacity:
        return None
    base_end = HEADER_SIZE + header.base_count * RECORD_SIZE
    if zlib.crc32(data[HEADER_SIZE:base_end]) != header.base_crc:
        return None  # a compaction that did not reach the disk in full
    records = []
    for pos in range(HEADER_SIZE, len(data) - RECORD_SIZE + 1, RECORD_SIZE):
        record = _record_at(data, pos, header.epoch)
        if record is None:
            if pos < base_end:
                return None
            break
        records.append(record)
    return Table(region, header, records)


def _record_at(data: bytes, pos: int, epoch: int) -> Record | None:
    """The intact record of `epoch` at `pos`, or None (torn, stale or garbage)."""
    body = data[pos:pos + 28]
    if struct.unpack_from("<I", data, pos + 28)[0] != zlib.crc32(body, epoch & 0xFFFFFFFF):
        return None
    record = Record(*_RECORD.unpack(body))
    return record if record.type in RECORD_NAMES else None


def read_records(pread, sb: Superblock, region: int, epoch: int, start: int, end: int) -> list[Record]:
    """Records [start, end) of `region`, which must be of `epoch` (StoreFormatError
    otherwise): what another process appended after its table was read."""
    header = TableHeader.unpack(pread(HEADER_SIZE, sb.region_offset(region)))
    if header is None or header.epoch != epoch:
        raise StoreFormatError(f"table region {region} is not of epoch {epoch} any more")
    data = pread((end - start) * RECORD_SIZE, sb.region_offset(region) + HEADER_SIZE + start * RECORD_SIZE)
    records = []
    for pos in range(0, len(data) - RECORD_SIZE + 1, RECORD_SIZE):
        record = _record_at(data, pos, epoch)
        if record is None:
            break
        records.append(record)
    if len(records) != end - start:
        raise StoreFormatError(f"table region {region} holds {start + len(records)} intact records, not {end}")
    return records


def read_table(pread, sb: Superblock) -> Table | None:
    """The active table region (None if neither region is intact: a store whose
    creation did not finish)."""
    tables = [t for t in (_read_region(pread, sb, 0), _read_region(pread, sb, 1)) if t is not None]
    return max(tables, key=lambda t: t.header.epoch) if tables else None


def pack_base(header: TableHeader, records: list[Record]) -> bytes:
    """A region's header and base records (sets header.base_count and base_crc)."""
    body = b"".join(r.pack(header.epoch) for r in records)
    header.base_count = len(records)
    header.base_crc = zlib.crc32(body)
    return header.pack() + body


def new_generation() -> str:
    return str(uuid.uuid4())


def dirty_record(boot_id: str) -> Record:
    high, low = struct.unpack("<QQ", uuid.UUID(boot_id).bytes)
    return Record(DIRTY, 0, high, low)


def current_boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


# -- the state the records describe (pure logic, shared by the image and the CLI) ----

@dataclasses.dataclass
class HeldSnapshot:
    number: int
    corrupted: int = 0                       # 0, or a reason code (REASONS)
    map: dict[int, int] = dataclasses.field(default_factory=dict)  # chunk -> slot


class StoreState:
    """Held snapshots, their maps, slot reference counts and the change map, as the
    records applied so far say. `freed` collects slots whose last reference went
    (the caller makes them reusable once the record that freed them is durable)."""

    def __init__(self, generation: str, next_snapshot: int = 1):
        from ..rangemap import RangeMap
        self.generation = generation
        self.next_snapshot = next_snapshot
        self.held: dict[int, HeldSnapshot] = {}
        self.refs: dict[int, int] = {}
        self.changed = RangeMap(index_values=False)  # chunk -> number of its last write
        self.freed: list[int] = []
        self.dirty_boot: str | None = None  # the boot id of a DIRTY in force

    def _ref(self, slot: int) -> None:
        self.refs[slot] = self.refs.get(slot, 0) + 1

    def _unref(self, slot: int) -> None:
        left = self.refs[slot] - 1
        if left:
            self.refs[slot] = left
        else:
            del self.refs[slot]
            self.freed.append(slot)

    def _drop_map(self, snapshot: HeldSnapshot) -> None:
        for slot in snapshot.map.values():
            self._unref(slot)
        snapshot.map.clear()

    def _mark_changed(self, first: int, end: int, number: int, *, at_least: bool) -> None:
        if not at_least:
            if number:
                self.changed.assign(first, end, number)
            else:  # never written (a copy ahead of a chunk no write has marked)
                self.changed.clear(first, end)
            return
        for chunk in range(first, end):
            if self.changed.get(chunk, 0) < number:
                self.changed.assign(chunk, chunk + 1, number)

    def apply(self, r: Record) -> None:
        if r.type == TAKE:
            self.held[r.snapshot] = HeldSnapshot(r.snapshot)
            self.next_snapshot = max(self.next_snapshot, r.snapshot + 1)
        elif r.type == RELEASE:
            snapshot = self.held.pop(r.snapshot, None)
            if snapshot is not None:
                self._drop_map(snapshot)
        elif r.type == CORRUPT:
            snapshot = self.held.get(r.snapshot)
            if snapshot is not None:
                snapshot.corrupted = r.count
                self._drop_map(snapshot)
        elif r.type == COPY:
            for i in range(r.count):
                chunk, slot = r.chunk + i, r.slot + i
                sharers = [s for s in self.held.values() if not s.corrupted and chunk not in s.map]
                for snapshot in sharers:
                    snapshot.map[chunk] = slot
                    self._ref(slot)
                if not sharers:
                    self.freed.append(slot)
            self._mark_changed(r.chunk, r.chunk + r.count, r.snapshot, at_least=False)
        elif r.type in (OWN, MAP):
            snapshot = self.held.get(r.snapshot)
            if snapshot is None or snapshot.corrupted:
                self.freed.extend(range(r.slot, r.slot + r.count))
            else:
                for i in range(r.count):
                    old = snapshot.map.get(r.chunk + i)
                    snapshot.map[r.chunk + i] = r.slot + i
                    self._ref(r.slot + i)
                    if old is not None:
                        self._unref(old)
            if r.type == OWN:
                self._mark_changed(r.chunk, r.chunk + r.count, r.snapshot, at_least=True)
        elif r.type == CBT:
            self._mark_changed(r.chunk, r.chunk + r.count, r.snapshot, at_least=False)
        elif r.type == DIRTY:
            self.dirty_boot = str(uuid.UUID(bytes=struct.pack("<QQ", r.chunk, r.slot)))
        elif r.type == CLEAN:
            self.dirty_boot = None

    def recover(self, boot_id: str) -> bool:
        """After a load: if a DIRTY of another boot is in force, every snapshot is
        lost and the change map starts a new generation. True if so."""
        if self.dirty_boot is None or self.dirty_boot == boot_id:
            return False
        for snapshot in self.held.values():
            if not snapshot.corrupted:
                self.apply(Record(CORRUPT, snapshot.number, count=POWER_CUT))
        from ..rangemap import RangeMap
        self.changed = RangeMap(index_values=False)
        self.generation = new_generation()
        self.dirty_boot = None
        return True

    def compacted(self, *, with_maps: bool = True) -> list[Record]:
        """Records that rebuild this state from nothing (maps as runs)."""
        records = []
        for number in sorted(self.held):
            snapshot = self.held[number]
            records.append(Record(TAKE, number))
            if snapshot.corrupted:
                records.append(Record(CORRUPT, number, count=snapshot.corrupted))
        if with_maps:
            for number in sorted(self.held):
                run = None
                for chunk, slot in sorted(self.held[number].map.items()):
                    if run and chunk == run[0] + run[2] and slot == run[1] + run[2]:
                        run[2] += 1
                        continue
                    if run:
                        records.append(Record(MAP, number, *run))
                    run = [chunk, slot, 1]
                if run:
                    records.append(Record(MAP, number, *run))
        for start, stop, number in self.changed:
            if number:
                records.append(Record(CBT, number, start, 0, stop - start))
        if self.dirty_boot is not None:
            records.append(dirty_record(self.dirty_boot))
        return records

    def changed_since(self, number: int) -> list[tuple[int, int]]:
        """Chunk runs [start, stop) last written at or after snapshot `number`'s take."""
        runs: list[tuple[int, int]] = []
        for start, stop, value in self.changed:
            if value >= number:
                if runs and runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], stop)
                else:
                    runs.append((start, stop))
        return runs


def load_state(pread, sb: Superblock) -> tuple[StoreState, Table] | None:
    """Replay the active table (None if the store has no intact table)."""
    table = read_table(pread, sb)
    if table is None:
        return None
    state = StoreState(table.header.generation, table.header.next_snapshot)
    for record in table.records:
        state.apply(record)
    return state, table
