"""The hand-over states of bow.img and origin.img, without FUSE: a successor opens the
image with the old server's descriptors while the old server goes on writing (and
compacting its journal or table), writes nothing itself, and after the state from the
pause holds exactly the old server's maps."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import trio

from fusesnap.devices import BlockDevice, inherited_fds
from fusesnap.images.bow import BowImage, MapJournal, device_identity
from fusesnap.images.snapshot import OriginImage, Store

BLOCK = 4096


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inherit(path: Path, fd: int) -> None:
    """As a live upgrade passes a descriptor (same open file, other number)."""
    inherited_fds[str(path)] = os.dup(fd)


def open_bow(device_path: Path, map_path: Path) -> BowImage:
    device = BlockDevice(str(device_path))
    return BowImage(device, MapJournal(str(map_path), device_identity(device, BLOCK)))


async def bow_writes(image: BowImage, rng: random.Random, count: int) -> None:
    for _ in range(count):
        await image.write(rng.randrange(0, 2 << 20, BLOCK), rng.randbytes(BLOCK * rng.randrange(1, 4)))


def test_bow_successor_catches_up_with_the_journal_including_a_compaction(tmp_path):
    device_path, map_path = tmp_path / "bow.raw", tmp_path / "bow.map"
    rng = random.Random(1)
    device_path.write_bytes(rng.randbytes(4 << 20) + bytes(4 << 20))
    old = open_bow(device_path, map_path)

    async def prepare():
        await old.discard(4 << 20, 4 << 20, zero_range=False)
        old.checkpoint()
        await bow_writes(old, rng, 50)
    trio.run(prepare)
    device_before, map_before = digest(device_path), digest(map_path)
    inherit(device_path, old.device.fd)
    new = open_bow(device_path, map_path)
    assert (digest(device_path), digest(map_path)) == (device_before, map_before), "opening wrote"

    trio.run(bow_writes, old, rng, 50)
    new.restore_handover_state(old.handover_state())  # catch-up, outside the pause
    trio.run(bow_writes, old, rng, 50)
    old._compact_journal()  # as a flush does when the journal grew: a new file
    trio.run(bow_writes, old, rng, 50)
    new.restore_handover_state(old.handover_state())  # the pause

    assert list(new.blocks) == list(old.blocks)
    assert new.log.pack() == old.log.pack() and new.state == old.state == "checkpoint"
    assert (new.sector0_block, new.block0_backup, new.free_cursor) == \
        (old.sector0_block, old.block0_backup, old.free_cursor)
    expected = old._view(0, 8 << 20)
    old.device.close()
    old.journal.close()
    trio.run(bow_writes, new, rng, 50)  # the successor goes on from there
    assert new._view(0, 8 << 20) != expected
    trio.run(new.close)
    reopened = open_bow(device_path, map_path)
    assert list(reopened.blocks) == list(new.blocks)
    trio.run(reopened.close)


def test_bow_state_of_another_journal_is_refused(tmp_path):
    device_path, map_path = tmp_path / "bow.raw", tmp_path / "bow.map"
    device_path.write_bytes(bytes(1 << 20))
    old = open_bow(device_path, map_path)
    inherit(device_path, old.device.fd)
    new = open_bow(device_path, map_path)
    state = old.handover_state()
    for bad in ({**state, "journal_inode": 1}, {**state, "journal_records": state["journal_records"] + 5},
                {**state, "version": 9}, {**state, "map": "/other.map"}):
        with pytest.raises(ValueError):
            new.restore_handover_state(bad)
    trio.run(old.close)
    new.journal.close()
    new.device.close()


def test_snapshot_successor_catches_up_with_the_table_including_a_compaction(tmp_path):
    chunk, size = 16 << 10, 4 << 20
    device_path, store_path = tmp_path / "dev.raw", tmp_path / "dev.store"
    rng = random.Random(2)
    device_path.write_bytes(rng.randbytes(size))

    def open_origin() -> OriginImage:
        device = BlockDevice(str(device_path))
        return OriginImage(device, Store(str(store_path), device, chunk, 64 << 20))

    async def work(origin: OriginImage, takes: int):
        for _ in range(takes):
            number = await origin.take()
            contents[number] = bytes(origin.device.pread(size, 0))
            for _ in range(100):
                await origin.write(rng.randrange(size - chunk), rng.randbytes(rng.randrange(1, chunk)))
            if len(origin.state.held) > 2:
                await origin.release(min(origin.state.held))

    contents: dict[int, bytes] = {}
    old = open_origin()
    trio.run(work, old, 2)
    store_before = digest(store_path)
    inherit(device_path, old.device.fd)
    inherit(store_path, old.store.file.fd)
    new = open_origin()
    assert digest(store_path) == store_before, "opening wrote"

    trio.run(work, old, 2)
    new.restore_handover_state(old.handover_state())
    trio.run(work, old, 1)
    old._compact()  # as an append to a full table does: the other region, a new epoch
    trio.run(work, old, 2)
    new.restore_handover_state(old.handover_state())

    assert new.state.compacted() == old.state.compacted()
    assert (new.epoch, new.region, new.append_at, new.slot_end) == (old.epoch, old.region, old.append_at, old.slot_end)
    assert (list(new.free_slots), new.pending_free) == (list(old.free_slots), old.pending_free)
    assert sorted(new.snapshots) == sorted(old.snapshots) == sorted(old.state.held)
    old.device.close()
    old.store.file.close()

    async def check():
        for number in new.state.held:
            assert await new.read_snapshot(number, 0, size) == contents[number], number
        await work(new, 2)
        await new.close()
    trio.run(check)
