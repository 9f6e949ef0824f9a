"""Power cuts during the merge of a version 1 diff: from every state the device and the
state directory could be left in, the recovery path reads NEW and finishes the merge
with the device equal to NEW.

One recording device (tests/crash_states.py) holds both, so their writes and flushes
are recorded in one order: OLD at its start (the system device is the recording
itself; the merge never writes past NEW), an ext4 filesystem after it holding the
state directory (progress, scratch copy, old hashes), through a loop device. Each state is
recovered as a mount after the power cut does: ext4 replays its journal, then the
update image is opened from its arguments (source check, scratch copy checked slot
by slot), read whole, and merged to the end.
"""

from __future__ import annotations

import argparse
import json
import random

import pytest
import trio

from crash_states import crash_states, recording_device
from fusesnap.diffing import build_diff
from fusesnap.formats.update_diff import DiffFile
from fusesnap.images import update
from fusesnap.old_hashes import OldBlockHashes
from harness import fusesnap_mount, loop_device, make_ext4, mounted_dir
from test_diff_v1 import upgraded_in_place
from test_update_image import wait_for

pytestmark = pytest.mark.mount

STATE_FS_MIB = 16


def recover(device, diff, state_dir) -> tuple[bytes, bytes]:
    """Open system.img as a mount would, read it whole, merge it to the end:
    (what it read, what the device holds then)."""
    args = argparse.Namespace(system=str(device), diff=str(diff), state_dir=str(state_dir),
                              no_bg_update=False, no_verify_source=False, merge_rate=0.0,
                              cache_mib=16)
    (image,) = update.images_from_args(args)

    async def run():
        read = await image.read(0, image.size)
        await image._merge_or_fail()   # the background task: a done merge drops its scratch
        assert image.state == "done", image.error
        await image.close()
        return read

    read = trio.run(run)
    with open(device, "rb") as f:
        return read, f.read()


def as_the_same_device(directory, device) -> None:
    """Rename the progress and scratch files the recorded run left, named after the
    recording device, after the rebuilt one: the same device, as after a reboot. (The
    record of old hashes is named after the diff alone.)"""
    if not directory.exists():
        return
    with open(device, "rb") as f:
        identity = update.device_identity(argparse.Namespace(fd=f.fileno()))
    for path in directory.iterdir():
        if path.name.startswith(".") or path.suffix == ".oldhashes":
            continue
        fingerprint, recorded, kind = path.name.split(".")
        if kind == "json":
            progress = json.loads(path.read_text())
            progress["identity"]["device"] = identity
            path.write_text(json.dumps(progress))
        path.rename(directory / f"{fingerprint}.{identity}.{kind}")


def test_every_power_cut_state_of_a_v1_merge_recovers_to_new(tmp_path):
    old, new = upgraded_in_place(random.Random(31), 1024)
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(new)
    diff = tmp_path / "v1.diff"
    build_diff(tmp_path / "old.img", tmp_path / "new.img", diff, threads=2, chunk_blocks=16,
               diff_format="v1")
    make_ext4(tmp_path / "state.ext4", STATE_FS_MIB)
    base = tmp_path / "base.img"
    base.write_bytes(old + (tmp_path / "state.ext4").read_bytes())

    with recording_device(tmp_path / "rec", base) as rec:
        with loop_device(rec.device, direct_io=False, offset=len(old)) as state_device, \
                mounted_dir(state_device, tmp_path / "state") as state_dir:
            # Slow enough for several progress saves (one each PERSIST_INTERVAL) while
            # the copy and the merge run.
            with fusesnap_mount(tmp_path / "mnt", "--state-dir", state_dir, "--system", rec.device,
                                "--diff", diff, "--merge-rate", "0.5") as m:
                wait_for(lambda: m.status()["system.img"]["state"] == "done", timeout=120)

    checked = merged_into = 0
    for state in crash_states(base, rec, tmp_path / "states", seed=3, subsets_per_flush=1,
                              every_nth_flush=2):
        with loop_device(state.path, direct_io=False, offset=len(old)) as state_device, \
                mounted_dir(state_device, tmp_path / "recovered-state") as state_dir:
            with open(state.path, "rb") as f:
                written = f.read(len(old)) != old
            if written:
                # The ordering: no write reaches the device before the progress says,
                # durably, that the scratch copy is complete.
                progress = [json.loads(p.read_text()) for p in (state_dir / "update").glob("*.json")]
                assert any(p["scratch_complete"] for p in progress), state.description
                # ... nor before the record of the old blocks' hashes (a half-merged
                # chunk needs them) is whole.
                (record,) = (state_dir / "update").glob("*.oldhashes")
                with DiffFile.open(diff) as d:
                    assert OldBlockHashes.load(str(record), d).of_entries(
                        0, d.total_blocks) is not None, state.description
                merged_into += 1
            as_the_same_device(state_dir / "update", state.path)
            read, device = recover(state.path, diff, state_dir)
        assert read[:len(new)] == new, f"{state.description}: system.img read other than NEW"
        assert device[:len(new)] == new, f"{state.description}: the merge did not end at NEW"
        checked += 1
    print(f"{checked} power-cut states recovered, {merged_into} of them merged into")
    assert checked >= 20 and merged_into >= 10, (checked, merged_into)
