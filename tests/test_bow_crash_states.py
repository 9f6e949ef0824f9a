"""Power cuts in checkpoint state: `bow restore` gives the checkpoint from every state
the device could be left in (tests/crash_states.py records a real run: ext4 on a loop
device on bow.img, whose device is the recorder)."""

from __future__ import annotations

import os
import random

import pytest

from bow_helpers import BLOCK, checkpoint_frozen, churn, ext4_free_blocks, make_filled_ext4
from crash_states import crash_states, recording_device
from fusesnap.devices import BlockDevice
from fusesnap.formats import bow_log
from harness import fusesnap_mount, loop_device, mounted_dir

pytestmark = pytest.mark.mount


def test_restore_gives_the_checkpoint_after_a_power_cut_at_any_moment(tmp_path):
    base = tmp_path / "base.img"
    make_filled_ext4(base, 24, files=12)
    capture = tmp_path / "checkpoint.img"
    with recording_device(tmp_path / "rec", base) as rec:
        with fusesnap_mount(tmp_path / "mnt", "--bow", rec.device, "--bow-map", tmp_path / "dev.map",
                            "--bow-low-space", "0", "--bow-block-size", "1024") as m:
            with loop_device(m / "bow.img") as device, mounted_dir(device, tmp_path / "fs") as root:
                checkpoint_frozen(root, m.mountpoint, capture)
                rec.mark("checkpointed")
                churn(root, random.Random(11), 260, sync_every=20)
                os.sync()
            assert m.status()["bow.img"]["sequence"] >= 1, "the log should roll over during the run"

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
