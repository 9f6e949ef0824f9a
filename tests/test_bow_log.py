"""The dm-bow log format: logs written by an independent implementation (written here
from the format text, formats.md section 2) restore to the checkpoint; corrupt logs
are refused without a single write; an interrupted restore (power cut included)
finishes when run again."""

from __future__ import annotations

import random
import struct

import pytest

from fusesnap.formats import bow_log
from fusesnap.formats.bow_log import BowLogError

SECTOR = 512


def crc32_le(seed: int, data: bytes) -> int:
    """Linux crc32_le, bit by bit from its definition: reflected 0xEDB88320, no inversion."""
    crc = seed
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc


class PowerCut(Exception):
    pass


class MemoryDevice:
    """A device in memory whose writes since the last fsync a power cut may lose."""

    def __init__(self, data: bytes):
        self.durable = bytearray(data)
        self.data = bytearray(data)
        self.unsynced: list[tuple[int, bytes]] = []
        self.size = len(data)
        self.writes = 0
        self.reads = 0
        self.steps = 0  # fsyncs so far (writes are counted in `writes`)
        self.steps_left: int | None = None  # the power goes before write or fsync number N+1

    def pread(self, size, offset):
        self.reads += 1
        return bytes(self.data[offset:offset + size])

    def _step(self):
        if self.steps_left is not None:
            if self.steps_left == 0:
                raise PowerCut
            self.steps_left -= 1

    def pwrite(self, data, offset):
        self._step()
        self.data[offset:offset + len(data)] = data
        self.unsynced.append((offset, bytes(data)))
        self.writes += 1
        return len(data)

    def start_write_back(self, offset, length):
        pass  # (makes nothing durable: a power cut may still lose the writes)

    def fsync(self):
        self._step()
        self.steps += 1
        self.durable[:] = self.data
        self.unsynced.clear()

    def power_cut(self, rng: random.Random) -> None:
        """Keep what was synced plus a random subset of the later writes, in any order."""
        self.data = bytearray(self.durable)
        for offset, data in self.unsynced:
            if rng.random() < 0.5:
                self.data[offset:offset + len(data)] = data
        self.durable[:] = self.data
        self.unsynced.clear()


class ReferenceBow:
    """dm-bow as formats.md describes it, written independently of fusesnap's code.

    Free blocks are handed out lowest first; `write(block, data)` writes image block
    `block` (block 0 lives in the relocated `sector0` block)."""

    def __init__(self, device: MemoryDevice, block_size: int, free: set[int]):
        self.dev = device
        self.bs = block_size
        self.spb = block_size // SECTOR
        self.free = set(free)
        self.changed: set[int] = set()
        self.backups: set[int] = set()
        self.count = self.sequence = 0
        self.entries: list[bytes] = []

    def _block(self, b):
        return bytes(self.dev.data[b * self.bs:(b + 1) * self.bs])

    def _put(self, b, data):
        self.dev.data[b * self.bs:(b + 1) * self.bs] = data

    def _take_free(self):
        b = min(self.free)
        self.free.remove(b)
        return b

    def _checksum(self, source_block, data):
        return crc32_le(source_block, data)

    def _write_log(self):
        header = struct.pack("<IHHIIIQ", 0x00574F42, 0x0100, 28, self.bs, len(self.entries),
                             self.sequence, self.sector0 * self.spb)
        block = header + b"".join(self.entries)
        self._put(0, block + bytes(self.bs - len(block)))

    def _log(self, source_block, dest_block, blocks, checksum):
        if 28 + 24 * (len(self.entries) + 1) > self.bs:
            # The full log block is backed up; the next one starts with that backup.
            log_copy = self._take_free()
            old = self._block(0)
            self._put(log_copy, old)
            self.backups.add(log_copy)
            self.sequence += 1
            self.entries = [struct.pack("<QQII", 0, log_copy * self.spb, self.bs, self._checksum(0, old))]
        self.entries.append(struct.pack("<QQII", source_block * self.spb, dest_block * self.spb,
                                        blocks * self.bs, checksum))
        self._write_log()

    def checkpoint(self):
        self.sector0 = self._take_free()
        self._put(self.sector0, self._block(0))
        backup = self._take_free()
        original = self._block(0)
        self._put(backup, original)
        self.backups.add(backup)
        self.entries = []
        self._log(0, backup, 1, self._checksum(0, original))

    def write(self, block, data):
        assert len(data) == self.bs
        if block == 0:
            self._put(self.sector0, data)
            return
        if block == self.sector0:  # block 0's live copy moves on, unchecked
            new = self._take_free()
            self._put(new, self._block(block))
            self._log(block, new, 1, 0)
            self.sector0 = new
            self._write_log()
        elif block in self.free:
            self.free.remove(block)
        elif block not in self.changed:  # checkpoint data or a backup: back it up
            dest = self._take_free()
            old = self._block(block)
            self._put(dest, old)
            self.backups.discard(block)
            self.backups.add(dest)
            self._log(block, dest, 1, self._checksum(block, old))
        self.changed.add(block)
        self._put(block, data)


def checkpointed_device(block_size=4096, blocks=256, writes=600, seed=0, moves=True):
    """(device, checkpoint contents, reference). With `moves`, writes go to any block,
    so backups and block 0's live copy move (a backup is backed up again, which a
    restore must undo in log order); without, they never do."""
    rng = random.Random(seed)
    device = MemoryDevice(rng.randbytes(block_size * blocks))
    free = set(rng.sample(range(1, blocks), blocks // 2))
    in_use = [b for b in range(blocks) if b not in free]
    ref = ReferenceBow(device, block_size, free)
    ref.checkpoint()
    checkpoint = {b: bytes(device.data[b * block_size:(b + 1) * block_size]) for b in in_use}
    checkpoint[0] = ref._block(ref.sector0)
    for _ in range(writes):
        target = rng.choice([0, ref.sector0, *in_use, *rng.sample(range(1, blocks), 3)])
        if not moves and (target == ref.sector0 or target in ref.backups):
            continue
        if target and len(ref.free) < 3:
            break
        ref.write(target, rng.randbytes(block_size))
    if moves:  # at least one move of each kind
        for target in (ref.sector0, max(ref.backups)):
            if len(ref.free) >= 3:
                ref.write(target, rng.randbytes(block_size))
    device.fsync()
    return device, checkpoint, ref


def assert_is_checkpoint(device, checkpoint, block_size):
    for block, data in checkpoint.items():
        assert device.data[block * block_size:(block + 1) * block_size] == data, f"block {block} differs"


@pytest.mark.parametrize("block_size", [512, 1024, 4096])
def test_a_log_written_independently_restores_to_the_checkpoint(block_size):
    device, checkpoint, ref = checkpointed_device(block_size, blocks=4096 * 256 // block_size // 4 * 4,
                                                  writes=1500)
    assert ref.sequence >= 2 or block_size == 4096, "the log should have rolled over"
    summary = bow_log.validate(device)
    assert summary.blocks[0].sequence == ref.sequence
    bow_log.restore(device)
    assert_is_checkpoint(device, checkpoint, block_size)
    with pytest.raises(BowLogError, match="no backup-on-write log"):
        bow_log.validate(device)  # the log is gone with the restore


def test_log_rolls_over_several_times_and_restores():
    device, checkpoint, ref = checkpointed_device(512, blocks=2048, writes=3000, seed=5)
    assert ref.sequence >= 4
    bow_log.restore(device)
    assert_is_checkpoint(device, checkpoint, 512)


def test_checksum_is_linux_crc32_le_seeded_with_the_source_block():
    rng = random.Random(1)
    for block_size in (512, 4096):
        data = rng.randbytes(block_size * 3)
        for source_block in (0, 1, 77, 2**32 + 5):
            assert (bow_log.block_checksum(source_block * (block_size // SECTOR), data, block_size)
                    == crc32_le(source_block & 0xFFFFFFFF, data))


@pytest.mark.parametrize("moves", [True, False])
def test_a_log_is_restored_directly_unless_a_backup_was_backed_up_again(moves):
    """Directly: every copy in dest order, one fsync, block 0, one fsync. In log order
    (vold's way) when a backup or block 0's live copy moved."""
    device, checkpoint, _ = checkpointed_device(4096, blocks=512, writes=400, seed=11, moves=moves)
    summary = bow_log.validate(device)
    assert summary.blocks[0].sequence >= 1, "the log should have rolled over"
    assert (bow_log.direct_plan(summary) is None) == moves
    fsyncs_before = device.steps
    bow_log.restore(device)
    assert_is_checkpoint(device, checkpoint, 4096)
    if not moves:
        assert device.steps - fsyncs_before == 2


def test_validating_a_log_reads_each_run_of_adjacent_backups_at_once():
    """The usual log (no backup moved) is validated with a read per log block and one
    per run of backups lying side by side, not one per entry."""
    device, _, _ = checkpointed_device(4096, blocks=512, writes=400, seed=11, moves=False)
    device.reads = 0
    summary = bow_log.validate(device)
    dests = sorted(entry.dest for block in summary.blocks for entry in block.entries if entry.checksum)
    runs = 1 + sum(1 for a, b in zip(dests, dests[1:]) if b != a + 4096 // SECTOR)
    assert runs < summary.entries // 2
    assert device.reads <= 2 + len(summary.blocks) + runs


def source_runs(entries) -> int:
    """How many runs of sources lying side by side `entries` restore to."""
    spans = sorted((entry.source, entry.source + entry.size // SECTOR) for entry in entries)
    return 1 + sum(1 for (_, end), (start, _) in zip(spans, spans[1:]) if start != end)


def test_a_direct_restore_reads_each_backup_once_and_writes_neighbours_together():
    """What validation read and checked is what the restore writes back: no backup is
    read twice. Backups restored side by side go in one write, then block 0."""
    device, checkpoint, _ = checkpointed_device(4096, blocks=512, writes=400, seed=11, moves=False)
    summary = bow_log.validate(device, keep_backups=True)
    entries, _ = summary.direct
    reads, writes = device.reads, device.writes
    bow_log.restore(device, validated=summary)
    assert_is_checkpoint(device, checkpoint, 4096)
    assert device.reads == reads
    assert source_runs(entries) < len(entries)
    assert device.writes - writes == source_runs(entries) + 1


def test_a_backup_changed_after_validation_does_not_reach_the_device():
    device, checkpoint, _ = checkpointed_device(4096, blocks=512, writes=400, seed=11, moves=False)
    summary = bow_log.validate(device, keep_backups=True)
    entries, _ = summary.direct
    device.data[entries[0].dest * SECTOR] ^= 0xFF
    bow_log.restore(device, validated=summary)
    assert_is_checkpoint(device, checkpoint, 4096)


def test_backups_beyond_the_memory_budget_are_read_and_checked_again(monkeypatch):
    """At most RESTORE_MEMORY bytes of backups are kept from validation; the rest are
    read again in batches of that size, and a change since validation stops the
    restore before block 0 (the log) is touched."""
    monkeypatch.setattr(bow_log, "RESTORE_MEMORY", 5 * 4096)
    device, checkpoint, _ = checkpointed_device(4096, blocks=512, writes=400, seed=11, moves=False)
    summary = bow_log.validate(device, keep_backups=True)
    entries, _ = summary.direct
    assert sum(backup.nbytes for backup in summary.backups.values()) <= 5 * 4096
    assert len(entries) > 3 * 5
    changed = MemoryDevice(bytes(device.data))
    bow_log.restore(device, validated=summary)
    assert_is_checkpoint(device, checkpoint, 4096)

    summary = bow_log.validate(changed, keep_backups=True)
    last = max(entries, key=lambda entry: entry.dest)
    assert last not in summary.backups
    changed.data[last.dest * SECTOR] ^= 0xFF
    log = bytes(changed.data[:4096])
    with pytest.raises(BowLogError, match=f"backup at sector {last.dest} changed since validation"):
        bow_log.restore(changed, validated=summary)
    assert changed.data[:4096] == log


def test_a_summary_validated_without_keeping_backups_restores_too():
    device, checkpoint, _ = checkpointed_device(4096, blocks=512, writes=400, seed=11, moves=False)
    summary = bow_log.validate(device)
    assert not summary.backups
    bow_log.restore(device, validated=summary)
    assert_is_checkpoint(device, checkpoint, 4096)


@pytest.mark.parametrize("moves", [True, False])
def test_restore_interrupted_after_any_copy_finishes_when_run_again(moves):
    device, checkpoint, _ = checkpointed_device(512, blocks=512, writes=400, seed=2, moves=moves)
    assert (bow_log.direct_plan(bow_log.validate(device)) is None) == moves
    total = bow_log.validate(device).entries
    for stop in range(1, total, max(1, total // 40)):
        copy = MemoryDevice(bytes(device.data))
        bow_log.restore(copy, stop_after=stop)
        bow_log.restore(copy)
        assert_is_checkpoint(copy, checkpoint, 512)


@pytest.mark.parametrize("moves", [True, False])
def test_restore_survives_a_power_cut_at_any_point(moves):
    device, checkpoint, _ = checkpointed_device(512, blocks=512, writes=400, seed=3, moves=moves)
    assert (bow_log.direct_plan(bow_log.validate(device)) is None) == moves
    total = bow_log.validate(device).entries
    rng = random.Random(4)
    for stop in range(1, total, max(1, total // 40)):
        copy = MemoryDevice(bytes(device.data))
        bow_log.restore(copy, stop_after=stop)
        copy.power_cut(rng)
        bow_log.restore(copy)
        assert_is_checkpoint(copy, checkpoint, 512)


@pytest.mark.parametrize("moves", [True, False])
def test_restore_survives_a_power_cut_before_any_write(moves):
    """Cut before any write or fsync of the restore (unsynced writes kept at random)."""
    device, checkpoint, _ = checkpointed_device(512, blocks=512, writes=400, seed=8, moves=moves)
    assert (bow_log.direct_plan(bow_log.validate(device)) is None) == moves
    rng = random.Random(9)
    probe = MemoryDevice(bytes(device.data))
    bow_log.restore(probe)
    for cut in range(probe.writes + probe.steps):
        copy = MemoryDevice(bytes(device.data))
        copy.steps_left = cut
        with pytest.raises(PowerCut):
            bow_log.restore(copy)
        copy.steps_left = None
        copy.power_cut(rng)
        if bow_log.read_header(copy) is not None:  # none: the cut kept the last write, block 0
            bow_log.restore(copy)
        assert_is_checkpoint(copy, checkpoint, 512)


def test_a_half_restored_device_resumes_under_the_wob_marker():
    device, checkpoint, _ = checkpointed_device(512, blocks=512, writes=400, seed=6)
    assert bow_log.direct_plan(bow_log.validate(device)) is None  # WOB: only in log order
    for stop in range(1, 400, 7):
        copy = MemoryDevice(bytes(device.data))
        bow_log.restore(copy, stop_after=stop)
        if struct.unpack_from("<I", copy.data)[0] == bow_log.PARTIAL_RESTORE_MAGIC:
            assert bow_log.validate(copy).resuming
            bow_log.restore(copy)
            assert_is_checkpoint(copy, checkpoint, 512)
            return
    pytest.fail("no interruption left a WOB marker")


# -- corrupt logs: refused, nothing written -----------------------------------------

HEADER_FIELDS = {  # name: (offset, struct format)
    "magic": (0, "<I"), "header_version": (4, "<H"), "header_size": (6, "<H"),
    "block_size": (8, "<I"), "count": (12, "<I"), "sequence": (16, "<I"), "sector0": (20, "<Q"),
}


def corrupted(device: MemoryDevice, offset: int, fmt: str, value: int) -> MemoryDevice:
    copy = MemoryDevice(bytes(device.data))
    struct.pack_into(fmt, copy.data, offset, value)
    copy.fsync()
    return copy


def assert_refused(device: MemoryDevice, match: str):
    before = bytes(device.data)
    with pytest.raises(BowLogError, match=match):
        bow_log.restore(device)
    assert device.writes == 0 and bytes(device.data) == before


@pytest.fixture(scope="module")
def good():
    device, _, ref = checkpointed_device(512, blocks=1024, writes=700, seed=7, moves=False)
    assert ref.sequence >= 2
    return device


@pytest.mark.parametrize("field, value, match", [
    ("magic", 0x12345678, "no backup-on-write log"),
    ("header_version", 0x0200, "unknown header version"),
    ("header_size", 27, "invalid header size"),
    ("header_size", 600, "invalid header size"),
    ("block_size", 1000, "invalid block size"),
    ("block_size", 8192, "invalid block size"),
    ("block_size", 1024, "."),
    ("count", 0, "invalid entry count"),
    ("count", 21, "invalid entry count"),
    ("count", 20, "not a positive multiple"),
    ("sequence", 7, "sequence|checksum|first entry"),
    ("sequence", 1, "sequence|checksum|first entry"),
    ("sector0", 0, "sector0"),
    ("sector0", 10**9, "sector0"),
])
def test_every_corrupt_header_field_is_refused(good, field, value, match):
    offset, fmt = HEADER_FIELDS[field]
    assert_refused(corrupted(good, offset, fmt, value), match)


ENTRY_FIELDS = {"source": (0, "<Q"), "dest": (8, "<Q"), "size": (16, "<I"), "checksum": (20, "<I")}


@pytest.mark.parametrize("field, value, match", [
    ("size", 0, "not a positive multiple"),
    ("size", 700, "not a positive multiple"),
    ("size", 512 * 10**6, "beyond the end"),
    ("source", 10**9, "beyond the end"),
    ("dest", 10**9, "beyond the end"),
    ("checksum", 0xDEADBEEF, "checksum mismatch"),
])
def test_every_corrupt_entry_field_is_refused(good, field, value, match):
    count = struct.unpack_from("<I", good.data, 12)[0]
    delta, fmt = ENTRY_FIELDS[field]
    entry = count - 1 if field != "checksum" else next(
        i for i in range(count - 1, -1, -1) if struct.unpack_from("<I", good.data, 28 + 24 * i + 20)[0])
    assert_refused(corrupted(good, 28 + 24 * entry + delta, fmt, value), match)


def test_a_corrupt_backup_is_refused(good):
    count = struct.unpack_from("<I", good.data, 12)[0]
    for index in range(count - 1, -1, -1):
        _, dest, _, checksum = struct.unpack_from("<QQII", good.data, 28 + 24 * index)
        if checksum:
            break
    copy = MemoryDevice(bytes(good.data))
    copy.data[dest * SECTOR] ^= 0xFF
    copy.fsync()
    assert_refused(copy, f"entry {index}: checksum mismatch")


def test_a_truncated_sequence_is_refused(good):
    """An earlier log block that is not there (its backup overwritten) is caught."""
    _, dest, _, _ = struct.unpack_from("<QQII", good.data, 28)  # entry 0: the previous log block
    copy = MemoryDevice(bytes(good.data))
    copy.data[dest * SECTOR:dest * SECTOR + 512] = bytes(512)
    copy.fsync()
    assert_refused(copy, "log block|checksum")


def test_a_device_without_a_log_is_refused():
    assert_refused(MemoryDevice(bytes(1 << 20)), "no backup-on-write log")


def test_the_cli_restore_killed_at_a_random_moment_finishes_when_run_again(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    device, checkpoint, _ = checkpointed_device(512, blocks=16384, writes=12000, seed=10)
    path = tmp_path / "dev.img"
    for delay in (0.05, 0.4, 0.55, 0.7, 0.85):  # before, during validation, during the copies
        path.write_bytes(bytes(device.data))
        command = [sys.executable, "-m", "fusesnap", "bow", "restore", "dev.img", "--bow-map", "dev.map"]
        first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        first.send_signal(signal.SIGKILL)
        first.wait()
        again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
        # "No log" is right when the first one had copied the last backup (block 0).
        assert again.returncode == 0 or "no backup-on-write log" in again.stderr, again.stderr
        restored = MemoryDevice(path.read_bytes())
        assert_is_checkpoint(restored, checkpoint, 512)
