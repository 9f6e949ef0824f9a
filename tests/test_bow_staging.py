"""Staged first writes of bow.img: a server killed (kill -9) with first writes
acknowledged but not yet backed up durably, let alone in place. A re-mount applies
them (backups first) before it serves; after a reboot they are ignored (never
flushed: a power cut may lose them) and the device holds no overwrite without its
backup. Either way `bow restore` gives the checkpoint. A later write to blocks still
staged replaces their staged data without waiting for their backup's round: a
re-mount applies the newest data, and so does a flush.

The server here is a small program that opens bow.img the way `fusesnap mount` does
and is killed with SIGKILL right after its writes return: writes on one trio task
never wait for a barrier, so every first write is still staged, none applied."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import random
import shutil
import subprocess
import sys

import pytest
import trio
import trio.testing

from fusesnap.devices import BlockDevice
from fusesnap.formats import bow_log
from fusesnap.images.bow import BowImage, MapJournal, StagingFile, device_identity
from bow_helpers import discard
from harness import fusesnap

pytestmark = pytest.mark.mount

BLOCK = 4096
SIZE = 8 << 20
FREE_FROM = 4 << 20  # the upper half is discarded: room for backups

KILLED_SERVER = r"""
import os, random, signal, sys
import trio, trio.testing
from fusesnap.devices import BlockDevice
from fusesnap.images.bow import BowImage, MapJournal, StagingFile, device_identity

async def main():
    device = BlockDevice(os.path.abspath("dev.img"))  # as the command line gives them
    image = BowImage(device, MapJournal(os.path.abspath("dev.map"), device_identity(device, 4096)),
                     staging=StagingFile(os.path.abspath("dev.map.stage"), 4096, 1 << 20))
    async with trio.open_nursery() as nursery:
        await image.start(nursery)
        await trio.testing.wait_all_tasks_blocked()  # its staging driver waits for work
        await image.discard(FREE_FROM, SIZE - FREE_FROM, zero_range=False)
        image.checkpoint()
        with open("checkpoint.img", "wb") as out:
            out.write(await image.read(0, SIZE))
        rng = random.Random(4)
        for offset, length in WRITES + REWRITES:
            await image.write(offset, rng.randbytes(length))
        assert image.cbw.barriers == 0 and len(image.cbw.unfinished) == len(WRITES), "not all staged"
        assert image.restaged == len(REWRITES), "rewrites should replace staged data"
        print("acknowledged", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

trio.run(main)
"""

# First writes: single blocks, a multi-block run, unaligned (read-modify-write), and
# one to the block where block 0 lives after the checkpoint is not among them (it is
# free, so it is picked as a destination; see test_bow_image for block 0).
WRITES = [(5 * BLOCK, BLOCK), (9 * BLOCK, BLOCK), (20 * BLOCK, 6 * BLOCK), (40 * BLOCK + 512, 3000),
          (100 * BLOCK, BLOCK), (101 * BLOCK, BLOCK)]
# Then writes to those blocks while they are still staged: a whole staged write, part
# of the multi-block one, unaligned within a staged block, across two staged writes
# (unaligned), and the first block again (the newest data wins).
REWRITES = [(5 * BLOCK, BLOCK), (22 * BLOCK, 2 * BLOCK), (40 * BLOCK + 100, 200),
            (100 * BLOCK + 2048, BLOCK), (5 * BLOCK, BLOCK)]


@pytest.fixture
def killed_with_staged_writes(tmp_path, monkeypatch):
    """dev.img checkpointed, then the WRITES and REWRITES acknowledged by a server
    killed at once. Returns what bow.img should read after them (from the same random
    bytes)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dev.img").write_bytes(random.Random(1).randbytes(SIZE))
    program = (f"FREE_FROM, SIZE, WRITES, REWRITES = {FREE_FROM}, {SIZE}, {WRITES!r}, {REWRITES!r}\n"
               + KILLED_SERVER)
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == -9 and "acknowledged" in result.stdout, result.stderr
    expected = bytearray((tmp_path / "checkpoint.img").read_bytes())
    rng = random.Random(4)
    for offset, length in WRITES + REWRITES:
        expected[offset:offset + length] = rng.randbytes(length)
    return bytes(expected)


def staged_records(path) -> list:
    return StagingFile(str(path), BLOCK, 1 << 20).recover()


def restored(tmp_path, name: str) -> bytes:
    """A copy of dev.img as it is now, restored offline: the blocks in use at the
    checkpoint (free blocks may hold backups)."""
    copy = tmp_path / name
    shutil.copyfile(tmp_path / "dev.img", copy)
    fusesnap("bow", "restore", name, "--bow-map", f"{name}.map")
    return copy.read_bytes()[:FREE_FROM]


@pytest.mark.parametrize("remount_options", [[], ["--bow-staging", "0"]], ids=["staging", "no-staging"])
def test_a_remount_applies_staged_writes_and_restore_still_gives_the_checkpoint(killed_with_staged_writes,
                                                                                 tmp_path, mount, remount_options):
    assert len(staged_records(tmp_path / "dev.map.stage")) == len(WRITES)
    # Nothing is in place yet: the device restores to the checkpoint as it is.
    checkpoint = (tmp_path / "checkpoint.img").read_bytes()
    assert restored(tmp_path, "before.img") == checkpoint[:FREE_FROM]

    m = mount("--bow", "dev.img", "--bow-map", "dev.map", *remount_options)  # another room: still applied
    assert (m / "bow.img").read_bytes() == killed_with_staged_writes
    status = m.status()["bow.img"]
    assert status["state"] == "checkpoint" and status["backed_up"] >= 10 * BLOCK
    assert staged_records(tmp_path / "dev.map.stage") == [], "applied, then the staging file starts empty"
    fusesnap("umount", m.mountpoint)
    assert restored(tmp_path, "after.img") == checkpoint[:FREE_FROM]


def test_after_a_reboot_staged_writes_are_ignored_and_restore_gives_the_checkpoint(killed_with_staged_writes,
                                                                                   tmp_path, mount):
    stage = tmp_path / "dev.map.stage"
    with open(stage, "r+b") as f:  # as another boot left it
        f.seek(8)
        f.write(b"0" * 36)
    assert staged_records(stage) == []
    checkpoint = (tmp_path / "checkpoint.img").read_bytes()
    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    assert (m / "bow.img").read_bytes() == checkpoint, "never flushed: the writes are gone, nothing else"
    fusesnap("umount", m.mountpoint)
    assert restored(tmp_path, "after.img") == checkpoint[:FREE_FROM]


def test_restore_removes_the_staging_file(killed_with_staged_writes, tmp_path):
    fusesnap("bow", "restore", "dev.img", "--bow-map", "dev.map")
    assert not (tmp_path / "dev.map.stage").exists() and not (tmp_path / "dev.map").exists()
    device = BlockDevice("dev.img", read_only=True)
    try:
        assert bow_log.read_header(device) is None
    finally:
        device.close()
    assert (tmp_path / "dev.img").read_bytes()[:FREE_FROM] == (tmp_path / "checkpoint.img").read_bytes()[:FREE_FROM]


def test_a_full_staging_file_makes_writes_wait_for_their_backups(tmp_path, monkeypatch, mount):
    """Room for two blocks: concurrent first writes stage while there is room and
    otherwise wait for their backups as without staging (a 64 KiB write never fits);
    every write lands, and restore gives the checkpoint."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dev.img").write_bytes(random.Random(2).randbytes(SIZE))
    m = mount("--bow", "dev.img", "--bow-map", "dev.map", "--bow-staging", "8K")
    with open(m / "bow.img", "r+b", buffering=0) as image:
        discard(image.fileno(), FREE_FROM, SIZE - FREE_FROM)
        fusesnap("bow", "checkpoint", m.mountpoint)
        checkpoint = (m / "bow.img").read_bytes()
        rng = random.Random(3)
        writes = [(block * BLOCK, rng.randbytes(BLOCK)) for block in rng.sample(range(1, 900), 120)]
        writes += [(960 * BLOCK, rng.randbytes(16 * BLOCK))]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda write: os.pwrite(image.fileno(), write[1], write[0]), writes))
        expected = bytearray(checkpoint)
        for offset, data in writes:
            expected[offset:offset + len(data)] = data
        assert (m / "bow.img").read_bytes() == expected
        os.fsync(image.fileno())
    status = m.status()["bow.img"]
    assert 0 < status["staged"] < len(writes), status
    fusesnap("umount", m.mountpoint)
    assert restored(tmp_path, "after.img") == checkpoint[:FREE_FROM]


def run_in_process(tmp_path, body) -> None:
    """Without FUSE: dev.img checkpointed with its upper half free, then
    `await body(image, device)`, with the image's background tasks running."""
    (tmp_path / "dev.img").write_bytes(random.Random(5).randbytes(SIZE))
    device = BlockDevice(str(tmp_path / "dev.img"))
    image = BowImage(device, MapJournal(str(tmp_path / "dev.map"), device_identity(device, BLOCK)),
                     staging=StagingFile(str(tmp_path / "dev.map.stage"), BLOCK, 1 << 20))

    async def main():
        try:
            async with trio.open_nursery() as nursery:
                await image.start(nursery)
                await trio.testing.wait_all_tasks_blocked()  # its staging driver waits for work
                await image.discard(FREE_FROM, SIZE - FREE_FROM, zero_range=False)
                image.checkpoint()
                await body(image, device)
                nursery.cancel_scope.cancel()
        finally:
            await image.close()

    trio.run(main)


def test_a_flush_applies_the_newest_data_of_a_rewritten_staged_write(tmp_path):
    """A staged write, a rewrite of it and a write across a staged block and one
    already in place are acknowledged without a round; flush returns once the newest
    data is on the device and the staging file is empty."""
    rng = random.Random(6)
    first, again, across = rng.randbytes(BLOCK), rng.randbytes(BLOCK), rng.randbytes(2 * BLOCK)

    async def body(image, device):
        await image.write(5 * BLOCK, rng.randbytes(BLOCK))
        await image.flush()  # block 5 in place: changed
        await image.write(6 * BLOCK, first)
        await image.write(6 * BLOCK, again)
        assert image.restaged == 1, "no round ran: the rewrite replaced the staged data"
        assert (await image.read(6 * BLOCK, BLOCK)) == again
        await image.write(5 * BLOCK, across)  # block 5 in place, block 6 staged
        assert image.restaged == 2 and (await image.read(5 * BLOCK, 2 * BLOCK)) == across
        await image.flush()
        assert not image.staged and device.pread(2 * BLOCK, 5 * BLOCK) == across
        assert staged_records(tmp_path / "dev.map.stage") == []

    run_in_process(tmp_path, body)


def test_a_rewrite_the_staging_file_refuses_waits_for_the_staged_write(tmp_path, monkeypatch):
    """The staging file cannot take the new data (a full disk, say): the write takes
    the usual path, waits until the staged write is in place, then overwrites it."""
    rng = random.Random(7)
    first, again = rng.randbytes(BLOCK), rng.randbytes(BLOCK)

    def refuse(slot, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    async def body(image, device):
        await image.write(6 * BLOCK, first)
        assert image.cbw.barriers == 0 and image.staged
        monkeypatch.setattr(image.staging, "rewrite", refuse)
        await image.write(6 * BLOCK, again)
        assert image.restaged == 0 and image.cbw.barriers >= 2, "it waited for the round"
        assert not image.staged and device.pread(BLOCK, 6 * BLOCK) == again
        assert staged_records(tmp_path / "dev.map.stage") == []

    run_in_process(tmp_path, body)


def test_free_blocks_set_aside_for_backups_stay_free_and_a_write_there_takes_them_back(tmp_path):
    """A first write sets aside a run of free blocks for the backups to come (one map
    change for many); they still count as free, and the filesystem, which thinks them
    free, may write there: that write goes in place and no later backup lands on it."""
    rng = random.Random(8)

    async def body(image, device):
        free = image.free_bytes
        await image.write(3 * BLOCK, rng.randbytes(BLOCK))
        await image.flush()
        backup = image.log.entries[-1].dest * bow_log.SECTOR // BLOCK
        assert image.free_bytes == free - BLOCK, "only the backup's block is used"
        mine = rng.randbytes(BLOCK)
        await image.write((backup + 1) * BLOCK, mine)  # the next block set aside
        for block in range(10, 40):
            await image.write(block * BLOCK, rng.randbytes(BLOCK))
        await image.flush()
        assert device.pread(BLOCK, (backup + 1) * BLOCK) == mine
        assert all(entry.dest * bow_log.SECTOR // BLOCK != backup + 1 for entry in image.log.entries)
        assert image.free_bytes == free - 32 * BLOCK

    run_in_process(tmp_path, body)
