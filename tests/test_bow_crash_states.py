"""Power cuts in checkpoint state: `bow restore` gives the checkpoint from every state
the device could be left in (tests/crash_states.py records a real run: ext4 on a loop
device on bow.img, whose device is the recorder). First writes are staged (acknowledged
before their backups are durable, applied in place after them), and writes to blocks
still staged replace the staged data; the staging file is not on the recorded device:
after a power cut it is ignored, as a reboot ignores it.

Two devices: the recorder's file itself (FUSE ignores RWF_DSYNC, so barriers
fdatasync), and a block device on it (a loop device: barriers write back only what
they cover, and a ranged fsync flushes, which the loop device passes on)."""

from __future__ import annotations

import contextlib
import mmap
import os
import random

import pytest

from bow_helpers import BLOCK, checkpoint_frozen, churn, ext4_free_blocks, make_filled_ext4
from crash_states import crash_states, recording_device
from fusesnap.devices import BlockDevice
from fusesnap.formats import bow_log
from harness import fusesnap_mount, loop_device, mounted_dir

pytestmark = pytest.mark.mount


def write_twice_directly(root, rng: random.Random, count: int) -> None:
    """Blocks of checkpoint-time files, each written twice in a row with O_DIRECT (no
    page cache to merge them): the second write reaches bow.img while the first is
    still staged."""
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    buffer = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    for _ in range(count):
        fd = os.open(root / rng.choice(names), os.O_WRONLY | os.O_DIRECT)
        try:
            offset = rng.randrange(os.fstat(fd).st_size // BLOCK) * BLOCK
            for _ in range(2):
                buffer[:] = rng.randbytes(BLOCK)
                os.pwrite(fd, buffer, offset)
        finally:
            os.close(fd)


@pytest.mark.parametrize("device_kind", ["file", "block device"])
def test_restore_gives_the_checkpoint_after_a_power_cut_at_any_moment(tmp_path, device_kind):
    base = tmp_path / "base.img"
    make_filled_ext4(base, 24, files=12)
    capture = tmp_path / "checkpoint.img"
    with recording_device(tmp_path / "rec", base) as rec, contextlib.ExitStack() as stack:
        bow_device = rec.device if device_kind == "file" else stack.enter_context(
            loop_device(rec.device, direct_io=False))
        with fusesnap_mount(tmp_path / "mnt", "--bow", bow_device, "--bow-map", tmp_path / "dev.map",
                            "--bow-low-space", "0", "--bow-block-size", "1024") as m:
            with loop_device(m / "bow.img") as device, mounted_dir(device, tmp_path / "fs") as root:
                checkpoint_frozen(root, m.mountpoint, capture)
                rec.mark("checkpointed")
                write_twice_directly(root, random.Random(12), 40)
                churn(root, random.Random(11), 260, sync_every=20)
                os.sync()
            status = m.status()["bow.img"]
            assert status["sequence"] >= 1, "the log should roll over during the run"
            assert status["staged"] > 0, "first writes should have been staged"
            assert status["restaged"] > 0, "writes to staged blocks should have replaced their data"

    in_use = [b for b in range(os.path.getsize(capture) // BLOCK) if b not in ext4_free_blocks(capture)]
    with open(capture, "rb") as f:
        expected = {b: os.pread(f.fileno(), BLOCK, b * BLOCK) for b in in_use}

    checked = 0
    for state in crash_states(base, rec, tmp_path / "states", seed=5, subsets_per_flush=2,
                              every_nth_flush=4):
        device = BlockDevice(str(state.path))
        try:
            if "checkpointed" not in state.marks and bow_log.read_header(device) is None:
                continue  # the checkpoint is not durable yet: nothing to restore
            try:
                bow_log.restore(device)
            except bow_log.BowLogError as exc:
                pytest.fail(f"{state.description}: restore refused: {exc}")
            for block, data in expected.items():
                assert device.pread(BLOCK, block * BLOCK) == data, \
                    f"{state.description}: block {block} is not its checkpoint contents"
            checked += 1
        finally:
            device.close()
    assert checked >= 50, f"only {checked} states checked"
