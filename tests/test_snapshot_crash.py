"""Power cuts of the snapshot store: every state a crash could leave either shows
each snapshot intact or reports it lost (corrupted), never silently wrong. States
whose table says DIRTY are recovered as a mount after a reboot does (every snapshot
lost, a new generation); the others must be exact.

The store is a recording device (`crash_states`); the origin device is a plain file
the test models. What a state must show follows from the marks: a take marked
before the state's flush is there (intact or reported corrupted), and every origin
write that may be on the device has its chunk's old
contents in the store for every intact snapshot taken before it (see the
comment on `on_device_from` for when a write may be on the device).
"""

from __future__ import annotations

import os
import random

import pytest

from crash_states import FLUSH, MARK, crash_states, read_log, recording_device
from fusesnap.formats import snapshot_store as fmt
from harness import fusesnap_mount, sparse_file

pytestmark = pytest.mark.mount

CHUNK = 64 << 10
ANOTHER_BOOT = "00000000-0000-4000-8000-000000000001"
DEVICE_SIZE = 4 << 20


def test_every_crash_state_shows_snapshots_intact_or_reported_lost(tmp_path):
    rng = random.Random(5)
    device = tmp_path / "sdb1.raw"
    origin = bytearray(rng.randbytes(DEVICE_SIZE))
    device.write_bytes(origin)
    store_base = sparse_file(tmp_path / "store.base", 3 << 20)  # the table and ~40 chunks
    at_take: dict[int, bytes] = {}
    writes: list[tuple[range, int]] = []  # origin writes: chunks, newest snapshot then

    with recording_device(tmp_path / "rec", store_base) as rec:
        with fusesnap_mount(tmp_path / "mnt", "--snapshot", device, "--store", rec.device,
                            "--chunk-size", "64K", "--store-limit", "3M") as m:
            rec.mark("mounted")
            fd = os.open(m / "origin.img", os.O_WRONLY)
            try:
                def take(number):
                    os.setxattr(m.mountpoint, "user.fusesnap.command", b"snapshot take")
                    at_take[number] = bytes(origin)
                    rec.mark(f"took {number}")

                def write_chunks(newest, count):
                    for index in range(count):
                        if index % 3 == 2:
                            os.fsync(fd)  # a flush: the store becomes clean
                        offset = rng.randrange(DEVICE_SIZE - 2 * CHUNK)
                        data = rng.randbytes(rng.randrange(1, 2 * CHUNK))
                        writes.append((range(offset // CHUNK, (offset + len(data) - 1) // CHUNK + 1), newest))
                        rec.mark(f"issue {len(writes) - 1}")
                        os.pwrite(fd, data, offset)
                        rec.mark(f"ack {len(writes) - 1}")
                        origin[offset:offset + len(data)] = data

                take(1)
                write_chunks(1, 8)
                take(2)
                write_chunks(2, 8)
                rec.mark("releasing 1")
                os.setxattr(m.mountpoint, "user.fusesnap.command", b"snapshot release 1")
                write_chunks(2, 8)  # reuses the slots snapshot 1 alone held
                take(3)
                write_chunks(3, 6)
            finally:
                os.close(fd)

    # A state after flush k may hold store writes issued before flush k + 1: the
    # release may be in every state from the flush before its mark on. The device is
    # not recorded: an origin write may be on it from the moment the server passed it
    # on, somewhere between its issue and its ack. If no flush of the store came
    # between them, that may have been before flush k + 1 for the k of its issue;
    # otherwise only after the flush the server waited for.
    flushes = 0
    issued_at: dict[int, int] = {}
    on_device_from: dict[int, int] = {}
    for kind, _, payload in read_log(rec.log_path):
        flushes += kind == FLUSH
        if kind != MARK:
            continue
        label = payload.decode()
        if label == "releasing 1":
            release_may_be_in = flushes
        elif label.startswith("issue "):
            issued_at[int(label.split()[1])] = flushes
        elif label.startswith("ack "):
            index = int(label.split()[1])
            issued = issued_at[index]
            on_device_from[index] = issued if flushes == issued else issued + 1
    checked = intact = lost = 0
    for state in crash_states(store_base, rec, tmp_path / "states", seed=2, subsets_per_flush=2):
        with open(state.path, "rb") as f:
            pread = lambda size, offset: os.pread(f.fileno(), size, offset)  # noqa: E731
            head = pread(fmt.SUPERBLOCK_SIZE, 0)
            if not head.strip(b"\0"):
                assert "mounted" not in state.marks, state.description
                continue
            sb = fmt.Superblock.unpack(head)
            loaded = fmt.load_state(pread, sb)
            assert loaded is not None, state.description
            store_state = loaded[0]
            generation = store_state.generation
            if store_state.recover(ANOTHER_BOOT):  # what a mount after the power cut does
                assert store_state.generation != generation
                assert all(s.corrupted == fmt.POWER_CUT for s in store_state.held.values())
                lost += 1
            held = store_state.held
            for number in at_take:
                released = number == 1 and state.flushes >= release_may_be_in
                if f"took {number}" in state.marks and not released:
                    assert number in held, state.description
            for number, snapshot in held.items():
                assert number in at_take, state.description
                if snapshot.corrupted:
                    continue
                intact += 1
                for chunk, slot in snapshot.map.items():
                    stored = pread(CHUNK, sb.data_start + slot * CHUNK)
                    assert stored == at_take[number][chunk * CHUNK:(chunk + 1) * CHUNK], \
                        f"{state.description}: snapshot {number} chunk {chunk} is silently wrong"
                # Every origin write that may be on the device has its old contents kept.
                overwritten = {chunk for index, (chunks, newest) in enumerate(writes)
                               if on_device_from[index] <= state.flushes and newest >= number
                               for chunk in chunks}
                assert overwritten <= set(snapshot.map), \
                    f"{state.description}: snapshot {number} lost the old contents of {overwritten - set(snapshot.map)}"
        checked += 1
    assert checked > 50 and intact > 20 and lost > 20, (checked, intact, lost)
