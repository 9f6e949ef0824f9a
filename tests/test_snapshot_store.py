"""The snapshot store's format and the origin's state machine without FUSE: records
against a naive model, compaction that rebuilds the same state, a table that fills
up and moves to its other region while snapshots keep their contents."""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from fusesnap.devices import BlockDevice
from fusesnap.errors import UserError
from fusesnap.formats import snapshot_store as fmt
from fusesnap.images import snapshot as snapshot_image
from fusesnap.images.snapshot import OriginImage, Store

GENERATION = "5b0c2f6e-8d7a-4e1b-9c3d-2a1f0e9d8c7b"


def origin_on_random_device(tmp_path, rng: random.Random, chunk: int, size: int) -> OriginImage:
    """origin.img over tmp_path/dev.raw (`size` bytes from `rng`), with a new store
    tmp_path/dev.store."""
    device_path = tmp_path / "dev.raw"
    device_path.write_bytes(rng.randbytes(size))
    device = BlockDevice(str(device_path))
    return OriginImage(device, Store(str(tmp_path / "dev.store"), device, chunk, 64 << 20))


def reopened(origin: OriginImage) -> OriginImage:
    """The same device and store opened again (as a re-mount does)."""
    device = BlockDevice(origin.device.path)
    return OriginImage(device, Store(origin.store.path, device, origin.chunk_size, origin.store.limit))

operations = st.lists(st.one_of(
    st.tuples(st.just("take")),
    st.tuples(st.just("release"), st.integers(1, 6)),
    st.tuples(st.just("corrupt"), st.integers(1, 6), st.integers(1, 4)),
    st.tuples(st.just("copy"), st.integers(0, 15)),
    st.tuples(st.just("own"), st.integers(1, 6), st.integers(0, 15)),
    st.tuples(st.just("cbt"), st.integers(0, 15), st.integers(0, 6)),
), max_size=60)


def as_records(ops) -> list[fmt.Record]:
    """Operations as the image would record them (fresh slots for every copy)."""
    records, next_number, next_slot = [], 1, 0
    for op in ops:
        if op[0] == "take":
            records.append(fmt.Record(fmt.TAKE, next_number))
            next_number += 1
        elif op[0] == "release":
            records.append(fmt.Record(fmt.RELEASE, op[1]))
        elif op[0] == "corrupt":
            records.append(fmt.Record(fmt.CORRUPT, op[1], count=op[2]))
        elif op[0] == "copy":
            records.append(fmt.Record(fmt.COPY, next_number - 1, op[1], next_slot))
            next_slot += 1
        elif op[0] == "own":
            records.append(fmt.Record(fmt.OWN, op[1], op[2], next_slot))
            next_slot += 1
        else:
            records.append(fmt.Record(fmt.CBT, op[2], op[1]))
    return records


def naive(records) -> tuple[dict, dict]:
    """What each held snapshot reads per chunk (slot or device), and the change map."""
    held: dict[int, dict | str] = {}
    changed: dict[int, int] = {}
    for r in records:
        if r.type == fmt.TAKE:
            held[r.snapshot] = {}
        elif r.type == fmt.RELEASE:
            held.pop(r.snapshot, None)
        elif r.type == fmt.CORRUPT and r.snapshot in held:
            held[r.snapshot] = f"corrupt {r.count}"
        elif r.type == fmt.COPY:
            for snapshot in held.values():
                if isinstance(snapshot, dict) and r.chunk not in snapshot:
                    snapshot[r.chunk] = r.slot
            changed[r.chunk] = r.snapshot
        elif r.type == fmt.OWN:
            if isinstance(held.get(r.snapshot), dict):
                held[r.snapshot][r.chunk] = r.slot
            changed[r.chunk] = max(changed.get(r.chunk, 0), r.snapshot)
        elif r.type == fmt.CBT:
            changed[r.chunk] = r.snapshot
    return held, {chunk: n for chunk, n in changed.items() if n}


def observed(state: fmt.StoreState) -> tuple[dict, dict]:
    held = {n: (f"corrupt {s.corrupted}" if s.corrupted else dict(s.map)) for n, s in state.held.items()}
    changed = {chunk: n for start, stop, n in state.changed for chunk in range(start, stop) if n}
    return held, changed


@settings(max_examples=300, deadline=None)
@given(operations)
def test_records_mean_what_the_format_says_and_compaction_keeps_it(ops):
    records = as_records(ops)
    state = fmt.StoreState(GENERATION)
    for record in records:
        state.apply(record)
    assert observed(state) == naive(records)
    in_use = {slot for s in state.held.values() for slot in s.map.values()}
    assert set(state.refs) == in_use
    assert sum(state.refs.values()) == sum(len(s.map) for s in state.held.values())
    rebuilt = fmt.StoreState(GENERATION, state.next_snapshot)
    for record in state.compacted():
        rebuilt.apply(fmt.Record(*fmt._RECORD.unpack(record.pack(7)[:28])))
    assert observed(rebuilt) == observed(state)
    assert rebuilt.refs == state.refs


def test_a_torn_record_ends_the_replay_and_stale_records_never_count(tmp_path):
    sb = fmt.Superblock(65536, 1 << 20, 4096 * 4, {"device": "x"})
    data = bytearray(sb.data_start)
    data[:fmt.SUPERBLOCK_SIZE] = sb.pack()
    old = fmt.TableHeader(1, GENERATION, 1)
    region = sb.region_offset(0)
    body = fmt.pack_base(old, [fmt.Record(fmt.TAKE, 1)])
    data[region:region + len(body)] = body
    stale = [fmt.Record(fmt.TAKE, 2).pack(1), fmt.Record(fmt.TAKE, 3).pack(1)]
    data[region + len(body):region + len(body) + 64] = b"".join(stale)

    def pread(size, offset):
        return bytes(data[offset:offset + size])

    assert sorted(fmt.load_state(pread, sb)[0].held) == [1, 2, 3]
    torn = region + len(body) + 32 + 5
    data[torn] ^= 0xFF
    assert sorted(fmt.load_state(pread, sb)[0].held) == [1, 2]
    # A newer region (epoch 2) whose base is whole wins; records of epoch 1 after its
    # base are not replayed.
    new = fmt.TableHeader(2, GENERATION, 3)
    body = fmt.pack_base(new, [fmt.Record(fmt.TAKE, 2)])
    other = sb.region_offset(1)
    data[other:other + len(body)] = body
    data[other + len(body):other + len(body) + 32] = fmt.Record(fmt.TAKE, 9).pack(1)
    assert sorted(fmt.load_state(pread, sb)[0].held) == [2]
    data[other + fmt.HEADER_SIZE + 3] ^= 0xFF  # its base is torn: the old region again
    assert sorted(fmt.load_state(pread, sb)[0].held) == [1, 2]


def test_a_full_table_moves_to_its_other_region_and_snapshots_keep_their_contents(tmp_path, monkeypatch):
    """Many takes, writes and releases with a small table: it compacts into the other
    region while in use and again at each re-open; every snapshot stays exact."""
    monkeypatch.setattr(fmt, "table_bytes_for", lambda chunks: 4096 * 12)  # ~1500 records
    chunk, size = 16 << 10, 4 << 20  # 256 chunks; compacted, the state stays under 500 records: it fits in half
    device_path = tmp_path / "dev.raw"
    rng = random.Random(1)
    device_path.write_bytes(rng.randbytes(size))
    store_path = str(tmp_path / "dev.store")
    expected: dict[int, bytes] = {}

    def open_origin() -> OriginImage:
        device = BlockDevice(str(device_path))
        return OriginImage(device, Store(store_path, device, chunk, 64 << 20))

    async def session(origin: OriginImage, rounds: int):
        for _ in range(rounds):
            number = await origin.take()
            expected[number] = bytes(origin.device.pread(size, 0))
            for _ in range(150):
                offset = rng.randrange(size - 3 * chunk)
                await origin.write(offset, rng.randbytes(rng.randrange(1, 3 * chunk)))
            if len(origin.state.held) > 3:
                oldest = min(origin.state.held)
                await origin.release(oldest)
                del expected[oldest]
        await origin.flush()
        for number, contents in expected.items():
            assert await origin.read_snapshot(number, 0, size) == contents, number
        await origin.close()

    epochs = []
    for _ in range(3):
        origin = open_origin()
        epochs.append(origin.epoch)
        trio.run(session, origin, 16)
    # one compaction at each open, and more while in use
    assert epochs[-1] >= len(epochs) + 3, epochs
    origin = open_origin()
    assert sorted(origin.state.held) == sorted(expected)
    assert all(not s.corrupted for s in origin.state.held.values())
    trio.run(origin.close)


def test_a_full_table_corrupts_the_oldest_snapshots_only_until_the_rest_fits(tmp_path, monkeypatch):
    """Six snapshots, each followed by writes all over the device, so that each one
    maps its chunks in many runs, with a table too small for all their maps: the
    oldest snapshots are marked corrupted (reason: a full table) until the rest
    fits, the newest stay exact, and every origin write succeeds."""
    monkeypatch.setattr(fmt, "table_bytes_for", lambda chunks: 4096 * 8)  # ~1000 records
    chunk, size = 16 << 10, 4 << 20  # 256 chunks
    rng = random.Random(3)
    origin = origin_on_random_device(tmp_path, rng, chunk, size)

    async def session():
        expected = {}
        for _ in range(6):
            number = await origin.take()
            expected[number] = bytes(origin.device.pread(size, 0))
            for index in rng.sample(range(size // chunk), 200):  # scattered: a run per chunk
                await origin.write(index * chunk + 512, rng.randbytes(1024))
        final = bytes(origin.device.pread(size, 0))
        await origin.flush()
        return expected, final

    expected, final = trio.run(session)
    corrupted = sorted(n for n, held in origin.state.held.items() if held.corrupted)
    intact = sorted(n for n, held in origin.state.held.items() if not held.corrupted)
    assert corrupted and intact, (corrupted, intact)
    assert corrupted == list(range(1, len(corrupted) + 1))  # the oldest ones
    assert {origin.state.held[n].corrupted for n in corrupted} == {fmt.TABLE_FULL}
    assert 6 in intact

    async def check():
        assert await origin.read(0, size) == final
        for number in intact:
            assert await origin.read_snapshot(number, 0, size) == expected[number], number
        for number in corrupted:
            with pytest.raises(OSError, match="table is full"):
                await origin.read_snapshot(number, 0, chunk)
        await origin.close()

    trio.run(check)


def test_copies_that_straddle_the_device_mapping_windows_are_exact(tmp_path, monkeypatch):
    """Copies read the device through a mapping of one window at a time: with
    windows of 768 KiB, sequential writes whose copies (ahead too) start in one
    window and end in the next, or jump back to an earlier window, still leave
    the snapshot exactly as it was, up to the device's last, partial chunk."""
    monkeypatch.setattr(snapshot_image, "MAP_WINDOW", 768 << 10)
    chunk, size = 256 << 10, (8 << 20) + (100 << 10)
    rng = random.Random(4)
    origin = origin_on_random_device(tmp_path, rng, chunk, size)

    async def session():
        number = await origin.take()
        before = bytes(origin.device.pread(size, 0))
        for start in (3 << 20, 0, (6 << 20) + (320 << 10)):  # later windows, then back
            offset = start
            while offset < min(size, start + (2 << 20)):
                length = min(rng.choice((640 << 10, 384 << 10)), size - offset)
                await origin.write(offset, rng.randbytes(length))
                offset += length
        assert await origin.read_snapshot(number, 0, size) == before
        await origin.close()

    trio.run(session)


def test_a_file_that_is_not_a_store_is_not_overwritten(tmp_path):
    (tmp_path / "dev.raw").write_bytes(bytes(1 << 20))
    device = BlockDevice(str(tmp_path / "dev.raw"))
    precious = tmp_path / "precious"
    precious.write_bytes(b"FSNAPSTX" + os.urandom(8000))
    before = precious.read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite"):
        Store(str(precious), device, None, 64 << 20)
    assert precious.read_bytes() == before


def test_sequential_writers_find_their_chunks_copied_ahead_and_changes_stay_exact(tmp_path):
    """Eight concurrent sequential writers over part of the device (writes that
    straddle chunks, as a loop device splits 1 MiB into 640 + 384 KiB): most
    writes find their chunks copied ahead by an earlier write and go straight to
    the device; every snapshot still reads as at its take, chunks copied ahead but
    never written are not reported as changed, and the table says the same after a
    re-open."""
    chunk, size = 256 << 10, 32 << 20
    device_path = tmp_path / "dev.raw"
    rng = random.Random(2)
    device_path.write_bytes(rng.randbytes(size))
    store_path = str(tmp_path / "dev.store")
    pieces = [(0, 640 << 10), (640 << 10, 384 << 10)]
    written_end = 20 << 20  # the writers stop here: copies ahead reach past it

    def open_origin() -> OriginImage:
        device = BlockDevice(str(device_path))
        return OriginImage(device, Store(store_path, device, chunk, 64 << 20))

    async def session(origin: OriginImage):
        first = await origin.take()
        before = bytes(origin.device.pread(size, 0))

        async def writer(lane: int):
            for mib in range(lane, written_end >> 20, 8):
                for start, length in pieces:
                    await origin.write((mib << 20) + start, rng.randbytes(length))

        async with trio.open_nursery() as nursery:
            for lane in range(8):
                nursery.start_soon(writer, lane)
        assert await origin.read_snapshot(first, 0, size) == before
        # a write that copies waits for two rounds: many needed none
        assert origin.cbw.rounds < 2 * len(pieces) * (written_end >> 20) * 3 // 4
        copied = len(origin.state.held[first].map)
        assert written_end // chunk <= copied <= (written_end + (1 << 20)) // chunk
        assert origin.state.changed_since(first) == [(0, written_end // chunk)]
        second = await origin.take()
        middle = bytes(origin.device.pread(size, 0))
        await origin.write(written_end, rng.randbytes(chunk))  # a copied-ahead chunk
        assert origin.state.changed_since(second) == [(written_end // chunk, written_end // chunk + 1)]
        assert await origin.read_snapshot(first, 0, size) == before
        assert await origin.read_snapshot(second, 0, size) == middle
        await origin.close()
        return before, middle

    before, middle = trio.run(session, open_origin())
    origin = open_origin()

    async def check():
        assert await origin.read_snapshot(1, 0, size) == before
        assert await origin.read_snapshot(2, 0, size) == middle
        assert origin.state.changed_since(2) == [(written_end // chunk, written_end // chunk + 1)]
        await origin.close()

    trio.run(check)


def test_while_dirty_is_durable_first_writes_copy_without_rounds_and_a_clean_store_takes_them(tmp_path):
    """Once a DIRTY record is durable, a first write copies and records its chunks at
    once (no group-commit round; a run of chunks is one COPY record), also one that
    had to wait for its chunks, and the snapshot still reads the old contents; after
    a flush (CLEAN) the next first write takes its rounds again, which make a new
    DIRTY durable before it overwrites."""
    chunk, size = 64 << 10, 4 << 20
    rng = random.Random(6)
    origin = origin_on_random_device(tmp_path, rng, chunk, size)

    def table() -> list[fmt.Record]:
        return fmt.read_table(origin.store.file.pread, origin.store.sb).records

    async def session():
        number = await origin.take()
        before = bytes(origin.device.pread(size, 0))
        await origin.write(0, rng.randbytes(chunk))  # clean store: two rounds, DIRTY durable
        assert (origin.cbw.rounds, origin.copies_at_once, origin.dirty_durable) == (2, 0, True)

        records_before = len(table())
        await origin.write(8 * chunk, rng.randbytes(4 * chunk))  # four chunks, at once
        assert (origin.cbw.rounds, origin.copies_at_once) == (2, 4)
        assert table()[records_before:] == [fmt.Record(fmt.COPY, number, 8, 1, 4)]
        assert await origin.read_snapshot(number, 0, size) == before

        async def write_when_free(offset: int, length: int):
            await origin.write(offset, rng.randbytes(length))

        async with trio.open_nursery() as nursery:  # a write that waits for its chunks
            async with origin.cbw.exclusive(13, 15):
                nursery.start_soon(write_when_free, 13 * chunk, 2 * chunk)
                await trio.testing.wait_all_tasks_blocked()
                assert origin.copies_at_once == 4
        assert (origin.cbw.rounds, origin.copies_at_once) == (2, 6)
        assert await origin.read_snapshot(number, 0, size) == before

        await origin.flush()  # CLEAN: copies take their rounds again
        assert not origin.dirty
        await origin.write(20 * chunk, rng.randbytes(chunk))
        assert (origin.cbw.rounds, origin.copies_at_once, origin.dirty_durable) == (4, 6, True)
        assert [r.type for r in table()[-3:]] == [fmt.CLEAN, fmt.DIRTY, fmt.COPY]
        assert await origin.read_snapshot(number, 0, size) == before
        await origin.close()
        return number, before

    number, before = trio.run(session)
    again = reopened(origin)
    assert trio.run(again.read_snapshot, number, 0, size) == before
    trio.run(again.close)


def test_a_table_write_that_fails_loses_the_snapshots_never_their_slots_and_never_an_origin_write(tmp_path):
    """The table refuses a write (EIO, injected) of records already applied in
    memory: every snapshot is corrupted with that reason, reads fail with EIO,
    origin writes go on (with their data), no slot a snapshot referenced is handed
    out again, and no snapshot can be taken until a re-mount."""
    chunk, size = 64 << 10, 2 << 20
    rng = random.Random(9)
    origin = origin_on_random_device(tmp_path, rng, chunk, size)
    table_end = origin.store.sb.data_start

    async def session():
        number = await origin.take()
        await origin.write(0, rng.randbytes(chunk))  # clean store: its rounds make DIRTY durable
        write = origin.store.file.pwrite

        def refusing_the_table(data, offset):
            if offset < table_end:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return write(data, offset)

        origin.store.file.pwrite = refusing_the_table
        free_before = set(origin.free_slots)
        new = rng.randbytes(3 * chunk)
        await origin.write(4 * chunk, new)  # copies at once; its COPY record is refused
        assert bytes(origin.device.pread(3 * chunk, 4 * chunk)) == new
        assert origin.state.held[number].corrupted == fmt.STORE_ERROR
        assert "table could not be written" in origin.status()["store_error"]
        with pytest.raises(OSError) as refused:
            await origin.read_snapshot(number, 0, chunk)
        assert refused.value.errno == errno.EIO
        assert set(origin.free_slots) <= free_before  # the refused copies' slots stay taken
        await origin.write(8 * chunk, b"o" * chunk)  # the origin goes on
        assert bytes(origin.device.pread(chunk, 8 * chunk)) == b"o" * chunk
        with pytest.raises(OSError):
            await origin.take()
        origin.store.file.pwrite = write
        await origin.close()

    trio.run(session)
