"""Merging a version 1 diff: its chunks reference OLD blocks the merge overwrites, so
the merge first copies them into a scratch file in the state directory. Reads equal
NEW before, during and after, across kill -9 at any point; a damaged scratch copy is
an error, never wrong data; a full state directory is refused before anything is
written; the scratch copy goes once the merge is done."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading

import pytest
import xxhash

from fusesnap.diffing import build_diff
from fusesnap.formats.update_diff import DiffFile
from fusesnap.merge_scratch import ScratchCopy
from fusesnap.old_hashes import OldBlockHashes
from harness import fusesnap, loop_device
from test_diff_v1 import upgraded_in_place, with_trailer_version_2
from test_update_format import write
from test_update_image import small_tmpfs, wait_for

pytestmark = pytest.mark.mount

BS = 4096


@pytest.fixture
def pair(tmp_path):
    """(old, new, device, diff): an in-place upgrade of 4 MiB, a device holding OLD and
    a v1 diff in chunks of 16 blocks whose references are mostly blocks it changes."""
    old, new = upgraded_in_place(random.Random(21), 1024)
    device = write(tmp_path / "device.img", old)
    write(tmp_path / "new.img", new)
    diff = tmp_path / "v1.diff"
    build_diff(device, tmp_path / "new.img", diff, threads=2, chunk_blocks=16, diff_format="v1")
    return old, new, device, diff


def progress_of(state_dir) -> dict:
    (progress,) = (state_dir / "update").glob("*.json")
    return json.loads(progress.read_text())


def scratch_files(state_dir) -> list:
    return sorted((state_dir / "update").glob("*.scratch"))


class ReadsEqualNew:
    """Reads random 4 KiB blocks of a block device in a thread and compares each
    with NEW, until stopped."""

    def __init__(self, device: str, new: bytes):
        self.device, self.new = device, new
        self.failures, self.reads = [], 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        rng = random.Random(1)
        fd = os.open(self.device, os.O_RDONLY)
        try:
            while not self.stop.is_set():
                block = rng.randrange(len(self.new) // BS)
                os.posix_fadvise(fd, block * BS, BS, os.POSIX_FADV_DONTNEED)
                got = os.pread(fd, BS, block * BS)
                if got != self.new[block * BS:(block + 1) * BS]:
                    self.failures.append(block)
                self.reads += 1
        finally:
            os.close(fd)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        assert not self.failures, f"blocks read other than NEW: {self.failures[:10]}"
        assert self.reads


def test_a_v1_diff_merges_through_a_loop_device_reading_as_new_throughout(pair, mount, tmp_path,
                                                                         monkeypatch):
    """From the directory holding the files, with relative paths, as users call it."""
    old, new, device, diff = pair
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    m = mount("--state-dir", "state", "--system", "device.img", "--diff", "v1.diff",
              "--merge-rate", "0.4")
    with loop_device(m / "system.img", read_only=True) as system, ReadsEqualNew(system, new):
        (scratch,) = scratch_files(state)   # created at mount, its whole size at once
        assert not m.status()["system.img"]["scratch_ready"], "copying before any write"
        assert open(device, "rb").read() == old
        wait_for(lambda: m.status()["system.img"]["merged"] > 0, timeout=60)
        assert progress_of(state)["scratch_complete"], "said complete before the first write"
        with DiffFile.open(diff) as d:
            assert scratch.stat().st_size == ScratchCopy(str(scratch), d).size > 0
        fusesnap("update", "wait", m.mountpoint)
        with open(system, "rb") as f:
            assert f.read() == new
    assert open(device, "rb").read() == new
    assert scratch_files(state) == [], "the scratch copy goes once the merge is done"
    fusesnap("umount", m.mountpoint)
    m = mount("--state-dir", "state", "--system", "device.img", "--diff", "v1.diff")
    assert m.status()["system.img"]["state"] == "done"
    assert scratch_files(state) == [], "a mount of a merged device makes no scratch copy"


@pytest.mark.parametrize("killed", ["while copying the scratch", "while merging",
                                    "while merging a diff with a version 2 trailer"])
def test_kill_9_then_remount_reads_new_and_finishes(pair, mount, tmp_path, killed):
    """A diff written before trailer version 3 carries every block's old hash: its
    merge uses those and records none."""
    old, new, device, diff = pair
    state = tmp_path / "state"
    if "version 2" in killed:
        diff = with_trailer_version_2(diff, old, tmp_path / "v2-trailer.diff")
    args = ("--state-dir", state, "--system", device, "--diff", diff)
    m = mount(*args, "--merge-rate", "0.5")
    if killed == "while copying the scratch":
        wait_for(lambda: os.path.getsize(device) and scratch_files(state)
                 and not m.status()["system.img"]["scratch_ready"])
    else:
        wait_for(lambda: m.status()["system.img"]["merged"] > 0, timeout=60)
    m.kill_server()
    fusesnap("umount", m.mountpoint)

    m = mount(*args)
    assert open(m / "system.img", "rb").read() == new
    fusesnap("update", "wait", m.mountpoint)
    assert open(m / "system.img", "rb").read() == new
    assert open(device, "rb").read() == new
    assert scratch_files(state) == []
    assert len(list((state / "update").glob("*.oldhashes"))) == ("version 2" not in killed)


def half_merged(pair, mount, tmp_path) -> tuple[int, list]:
    """Merge part of the diff, then unmount: (chunks the progress saved, mount arguments)."""
    _, _, device, diff = pair
    state = tmp_path / "state"
    args = ["--state-dir", state, "--system", device, "--diff", diff]
    m = mount(*args, "--merge-rate", "0.3")
    with DiffFile.open(diff) as d:
        wait_for(lambda: m.status()["system.img"]["merged"] >= d.total_blocks // 2, timeout=60)
    fusesnap("update", "pause", m.mountpoint)
    fusesnap("umount", m.mountpoint)
    return progress_of(state)["merged_chunks"], args


def overwritten_but_needed(diff, scratch_path, merged_chunks) -> tuple[int, int]:
    """(slot, block) of the scratch copy whose block the merge has overwritten and a
    chunk still to merge references."""
    with DiffFile.open(diff) as d:
        scratch = ScratchCopy(str(scratch_path), d)
        merged_blocks = {dest + i for c in range(merged_chunks)
                         for dest, n, _ in d.chunk_runs(c) for i in range(n)}
        slots = [s for s, block in enumerate(scratch.blocks) if int(block) in merged_blocks]
        block, _ = scratch.first_needed(d, slots, merged_chunks)
        return int(list(scratch.blocks).index(block)), block


def test_a_damaged_scratch_copy_is_refused_not_read(pair, mount, tmp_path):
    old, new, device, diff = pair
    merged_chunks, args = half_merged(pair, mount, tmp_path)
    (scratch,) = scratch_files(tmp_path / "state")
    slot, block = overwritten_but_needed(diff, scratch, merged_chunks)
    assert open(device, "rb").read()[block * BS:(block + 1) * BS] != old[block * BS:(block + 1) * BS]
    with open(scratch, "r+b") as f:
        f.seek(slot * BS + 100)
        f.write(b"bit rot")
    before = open(device, "rb").read()

    (tmp_path / "refused").mkdir()
    result = fusesnap("mount", tmp_path / "refused", *args, check=False)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert f"block {block}, which chunk " in result.stderr and str(scratch) in result.stderr
    assert open(device, "rb").read() == before

    # Served without merging, the chunks that need the lost block fail; none reads wrong.
    m = mount(*args, "--no-bg-update")
    with open(m / "system.img", "rb") as image:
        for chunk_block in range(0, len(new) // BS, 16):
            image.seek(chunk_block * BS)
            try:
                got = image.read(16 * BS)
            except OSError as exc:
                assert exc.errno == 5
                continue
            assert got == new[chunk_block * BS:(chunk_block + 16) * BS]


def test_a_damaged_slot_whose_block_is_still_old_is_copied_again(pair, mount, tmp_path):
    _, new, device, diff = pair
    merged_chunks, args = half_merged(pair, mount, tmp_path)
    (scratch,) = scratch_files(tmp_path / "state")
    with DiffFile.open(diff) as d:
        copy = ScratchCopy(str(scratch), d)
        later = {dest + i for c in range(merged_chunks + 1, d.n_chunks)
                 for dest, n, _ in d.chunk_runs(c) for i in range(n)}
        slot = next(s for s, block in enumerate(copy.blocks) if int(block) in later)
    with open(scratch, "r+b") as f:
        f.seek(slot * BS)
        f.write(bytes(BS))
    m = mount(*args)
    assert "damaged or lost" in m.log.read_text()
    assert open(m / "system.img", "rb").read() == new
    fusesnap("update", "wait", m.mountpoint)
    assert open(device, "rb").read() == new


def test_a_state_directory_too_small_for_the_scratch_copy_is_refused(pair, tmp_path, stack):
    old, _, device, diff = pair
    media = stack.enter_context(small_tmpfs(tmp_path / "tmpfs", "256k"))
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", "--state-dir", media, "--system", device,
                      "--diff", diff, check=False)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "cannot keep the scratch copy" in line and "No space left on device" in line
    assert "nothing was written" in line
    assert open(device, "rb").read() == old
    assert not list((media / "update").glob("*.scratch"))


def test_a_renumbered_loop_device_resumes_from_its_other_scratch_copy(pair, mount, loop, tmp_path):
    """Its scratch copy is named by the device number: another number finds the
    copy the first one made, and takes what it needs from it."""
    _, new, device, diff = pair
    state = tmp_path / "state"
    first = loop(device)
    m = mount("--state-dir", state, "--system", first, "--diff", diff, "--merge-rate", "0.3")
    wait_for(lambda: m.status()["system.img"]["merged"] > 0, timeout=60)
    fusesnap("update", "pause", m.mountpoint)
    fusesnap("umount", m.mountpoint)
    second = loop(device)
    m = mount("--state-dir", state, "--system", second, "--diff", diff)
    fusesnap("update", "wait", m.mountpoint)
    fusesnap("umount", m.mountpoint)
    assert open(device, "rb").read() == new
    assert len(scratch_files(state)) == 1, "the finished device's copy is gone, the other stays"


def test_a_lost_state_directory_after_a_partial_merge_is_refused(pair, mount, tmp_path):
    """The old contents the merge overwrote went with the scratch copy: one line, exit
    status 1, and the device as it was."""
    _, _, device, _ = pair
    _, args = half_merged(pair, mount, tmp_path)
    shutil.rmtree(tmp_path / "state")
    before = open(device, "rb").read()
    (tmp_path / "refused").mkdir()
    result = fusesnap("mount", tmp_path / "refused", *args, check=False)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "cannot merge" in line and "scratch copy" in line and "lost" in line
    assert open(device, "rb").read() == before


# ---- old hashes per chunk (trailer version 3), and diffs with per-block ones (version 2) ----

def crashed_inside_a_chunk(pair, mount, tmp_path, *, bad_block: bool = False) -> list:
    """A merge that stopped with the chunk after the saved progress half written (as a
    power cut leaves writeback: some of its blocks new, the others old); with
    `bad_block`, one of its old blocks then changed behind the merge's back. Returns
    the mount arguments."""
    _, new, device, diff = pair
    merged_chunks, args = half_merged(pair, mount, tmp_path)
    with DiffFile.open(diff) as d:
        blocks = [dest + i for dest, n, _ in d.chunk_runs(merged_chunks) for i in range(n)]
    assert len(blocks) >= 4
    with open(device, "r+b") as f:
        for block in blocks[::2]:
            f.seek(block * BS)
            f.write(new[block * BS:(block + 1) * BS])
        if bad_block:
            f.seek(blocks[1] * BS + 10)
            f.write(b"not old")
    return args


def test_a_crash_in_the_middle_of_a_chunk_resumes_by_the_recorded_old_hashes(pair, mount,
                                                                              tmp_path):
    _, new, device, diff = pair
    args = crashed_inside_a_chunk(pair, mount, tmp_path)
    (record,) = (tmp_path / "state" / "update").glob("*.oldhashes")
    with DiffFile.open(diff) as d:
        assert d.identification.version == 3, "no per-block hashes in the diff"
        assert record.stat().st_size == 24 + 9 * d.total_blocks + 16
    # Without the record the chunk's old blocks cannot be told old: refused, not guessed.
    record.rename(tmp_path / "record")
    (tmp_path / "refused").mkdir()
    result = fusesnap("mount", tmp_path / "refused", *args, check=False)
    assert result.returncode == 2 and "no merge recorded" in result.stderr, result.stderr
    (tmp_path / "record").rename(record)
    m = mount(*args)
    assert open(m / "system.img", "rb").read() == new
    fusesnap("update", "wait", m.mountpoint)
    assert open(device, "rb").read() == new


@pytest.mark.parametrize("device_holds", ["a bad block in a half-merged chunk", "random data"])
def test_a_wrong_device_is_refused_untouched(pair, mount, tmp_path, device_holds):
    _, _, device, diff = pair
    if device_holds == "random data":
        args = ["--state-dir", tmp_path / "state", "--system", device, "--diff", diff]
        write(device, os.urandom(os.path.getsize(device)))
    else:
        args = crashed_inside_a_chunk(pair, mount, tmp_path, bad_block=True)
    before = open(device, "rb").read()
    (tmp_path / "refused").mkdir()
    result = fusesnap("mount", tmp_path / "refused", *args, check=False)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "holds neither its old" in line and "nothing was written" in line
    assert open(device, "rb").read() == before


def test_without_the_source_check_the_first_merge_still_records_the_old_hashes(pair, mount,
                                                                               tmp_path):
    old, new, device, diff = pair
    state = tmp_path / "state"
    m = mount("--state-dir", state, "--system", device, "--diff", diff, "--no-verify-source")
    fusesnap("update", "wait", m.mountpoint)
    assert open(device, "rb").read() == new
    (record,) = (state / "update").glob("*.oldhashes")
    with DiffFile.open(diff) as d:
        recorded = OldBlockHashes.load(str(record), d).of_entries(0, d.total_blocks)
        assert recorded == b"".join(xxhash.xxh3_64_digest(old[d.entry(i)[0] * BS:][:BS])
                                    for i in range(d.total_blocks))
