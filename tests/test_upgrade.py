"""`fusesnap upgrade`: a new server takes over a running mount without unmounting,
while loop devices keep doing I/O; a successor that fails is refused and the old
server serves on."""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

import fusesnap
from fusesnap.diffing import open_diff
from fusesnap.images.linear import LinearImage
from fusesnap.images.update import MergeProgress, UpdateImage, images_from_args
from fusesnap.devices import BlockDevice
from bow_helpers import discard, opened_image
from harness import (FUSESNAP, Mount, copy_of, fusesnap as run_fusesnap, make_update_pair, run,
                     sha256_of, sparse_file)

pytestmark = pytest.mark.mount

FIO_REGION = 24 << 20


def upgrade(m, *args, check=True, cwd=None):
    """`fusesnap upgrade` of mount `m`; afterwards `m.pid` is the serving process."""
    result = run([*FUSESNAP, "upgrade", str(m.mountpoint), *map(str, args)], check=check, cwd=cwd)
    m.pid = int(os.getxattr(m.mountpoint, "user.fusesnap.pid"))
    return result


def server_status(m) -> dict:
    return json.loads((m / ".status.json").read_text())["server"]


def variant_build(directory: Path, *edits: tuple[str, str, str]) -> Path:
    """A copy of this fusesnap package with `edits` (file, old text, new text),
    installed in `directory` with a program that runs it, like a separately installed
    build. Returns the program."""
    root = directory / "site"
    shutil.copytree(Path(fusesnap.__file__).parent, root / "fusesnap",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for file_name, old, new in edits:
        path = root / "fusesnap" / file_name
        text = path.read_text()
        assert old in text, f"{old!r} not in {file_name}"
        path.write_text(text.replace(old, new))
    program = directory / "bin" / "fusesnap"
    program.parent.mkdir(parents=True)
    program.write_text(f'#!/bin/sh\nPYTHONPATH={root} exec {sys.executable} -m fusesnap "$@"\n')
    program.chmod(0o755)
    return program


VERSION = ('__init__.py', '__version__ = "', '__version__ = "9.9.9+variant-')
LINEAR_RESTORE = ("images/linear.py", "        self.check_handover_state(state)\n")


def broken_restore(breakage: str, *, in_the_pause: bool = True) -> tuple[str, str, str]:
    """An edit that breaks linear.img's restore: in the pause (the state is applied
    twice, before the pause and in it), or in its first call, before the pause."""
    if in_the_pause:
        breakage = (f"if getattr(self, 'caught_up', False):\n            {breakage}\n"
                    "        self.caught_up = True")
    return (*LINEAR_RESTORE, LINEAR_RESTORE[1] + f"        {breakage}\n")


class BackgroundLoad:
    """A load that runs in a thread from `with` until the end of the block."""

    def __init__(self):
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()


class FioLoop(BackgroundLoad):
    """fio (libaio, direct, qd 16: random 4 KiB and sequential 1 MiB) run again and
    again on a loop device until stopped: writes with verify (each region read back and
    checked), or on a read-only device, reads. Every run must end without an I/O error
    or a verify failure."""

    def __init__(self, device: str, *, read_only: bool = False):
        super().__init__()
        self.device = device
        self.read_only = read_only
        self.runs: list[dict] = []

    def command(self) -> list[str]:
        common = ["--ioengine=libaio", "--direct=1", "--iodepth=16", f"--size={FIO_REGION}"]
        if self.read_only:
            random_rw, sequential_rw = "randread", "read"
        else:
            random_rw, sequential_rw = "randwrite", "write"
            common += ["--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0"]
        return ["fio", f"--filename={self.device}", "--output-format=json",
                "--name=rand4k", f"--rw={random_rw}", "--bs=4k", "--offset=0", *common,
                "--name=seq1m", f"--rw={sequential_rw}", "--bs=1M", f"--offset={FIO_REGION}",
                *common]

    def _loop(self) -> None:
        while not self._stop.is_set():
            result = run(self.command(), check=False)
            try:
                report = json.loads(result.stdout[result.stdout.index("{"):])
                errors = [job["error"] for job in report["jobs"] if job["error"]]
            except ValueError:
                errors = ["no report"]
            self.runs.append({"status": result.returncode})
            if result.returncode != 0 or errors:
                self.failures.append(f"fio exited {result.returncode}, errors {errors}: "
                                     f"{result.stderr[-2000:]}")
                return

    def check(self) -> None:
        assert not self.failures, self.failures
        assert self.runs, "fio never ran"


class VerifyingReader(BackgroundLoad):
    """Random 64 KiB O_DIRECT reads of a read-only loop device, each compared with
    the file it must read as (NEW), until stopped."""

    def __init__(self, device: str, expected: Path):
        super().__init__()
        self.device = device
        self.expected = expected
        self.reads = 0

    def _loop(self) -> None:
        size = self.expected.stat().st_size
        buffer = mmap.mmap(-1, 64 << 10)  # page-aligned, as O_DIRECT wants
        rng = random.Random(7)
        fd = os.open(self.device, os.O_RDONLY | os.O_DIRECT)
        try:
            with open(self.expected, "rb") as expected:
                while not self._stop.is_set():
                    offset = rng.randrange(size >> 16) << 16
                    try:
                        got = os.preadv(fd, [buffer], offset)
                    except OSError as exc:
                        self.failures.append(f"read at {offset}: {exc}")
                        return
                    expected.seek(offset)
                    if got != len(buffer) or buffer[:] != expected.read(len(buffer)):
                        self.failures.append(f"wrong data at {offset}")
                        return
                    self.reads += 1
        finally:
            os.close(fd)

    def check(self) -> None:
        assert not self.failures, self.failures
        assert self.reads, "nothing was read"


@pytest.fixture
def device(tmp_path):
    return sparse_file(tmp_path / "dev.raw", 64 << 20)


def slowly_merging_system(tmp_path: Path, seconds: float = 60) -> tuple[list, Path, Path]:
    """system.img arguments for a merge of about `seconds` in small chunks (one is in
    progress at any moment), its device, and NEW."""
    (tmp_path / "pair").mkdir()
    old, new, _ = make_update_pair(tmp_path / "pair")
    diff = tmp_path / "diff.img"
    run_fusesnap("diff", old, new, "-o", diff, "--quiet", "--chunk-blocks", "8")
    with contextlib.closing(open_diff(str(diff), bad_diff_status=2)) as diff_file:
        changed_bytes = diff_file.total_blocks * diff_file.block_size
    system_device = copy_of(old, tmp_path / "system.raw")
    # Each hand-over also cuts short the merge's rate-limiting sleep: it goes faster.
    merge_rate = changed_bytes / seconds / 1e6
    return (["--system", system_device, "--diff", diff, "--merge-rate", f"{merge_rate:.3f}"],
            system_device, new)


def assert_merge_ends_at(m, new: Path, *devices) -> None:
    """The merge ends (within 2 minutes) with every one of `devices` equal to NEW."""
    deadline = time.monotonic() + 120
    while m.status()["system.img"]["state"] != "done":
        assert time.monotonic() < deadline, m.status()
        time.sleep(0.2)
    for device in devices:
        assert sha256_of(device) == sha256_of(new), f"{device} is not NEW"


# -- the hand-over ------------------------------------------------------------------

def test_idle_mount_is_handed_over_with_data_handles_and_cached_entries(tmp_path, mount, device,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, as users type them
    m = mount("--linear", "dev.raw")
    image = m / "linear.img"
    inode = image.stat().st_ino  # the kernel caches this entry (entry_timeout 300 s)
    handle = os.open(image, os.O_RDWR)
    try:
        os.pwrite(handle, b"before" * 100, 4096)
        old_pid = m.pid

        result = upgrade(m, cwd=tmp_path)

        assert m.pid != old_pid
        assert f"fusesnap {fusesnap.__version__} (pid {old_pid}) -> {fusesnap.__version__}" \
            in result.stdout and " ms" in result.stdout
        # The handle opened before the upgrade reads and writes through the new server.
        assert os.pread(handle, 600, 4096) == b"before" * 100
        os.pwrite(handle, b"after" * 100, 1 << 20)
    finally:
        os.close(handle)
    assert image.stat().st_ino == inode
    # It prepared at a lower priority, and serves at the old server's (ours).
    assert os.getpriority(os.PRIO_PROCESS, m.pid) == os.getpriority(os.PRIO_PROCESS, 0)
    with open(image, "rb") as again:  # opened through the cached entry
        again.seek(1 << 20)
        assert again.read(500) == b"after" * 100
    assert open(device, "rb").read(4096 + 600)[4096:] == b"before" * 100
    status = server_status(m)
    assert status["pid"] == m.pid and status["upgrades"] == 1
    assert 0 < status["last_pause_ms"] < 1000
    log = m.log.read_text()
    assert f"handed {m.mountpoint} over to pid {m.pid}" in log and "took over" in log


def test_block_device_opened_exclusively_is_handed_over(tmp_path, mount, loop):
    """A block device is open O_EXCL and cannot be opened twice: the successor gets
    the old server's descriptor, and the claim holds all through."""
    block_device = loop(sparse_file(tmp_path / "backing.raw", 32 << 20))
    m = mount("--linear", Path(block_device).name)  # a bare name means /dev/NAME
    with open(m / "linear.img", "r+b") as image:
        image.write(b"on a block device")
    upgrade(m)
    with pytest.raises(OSError) as claimed:
        os.close(os.open(block_device, os.O_RDWR | os.O_EXCL))
    assert claimed.value.errno == errno.EBUSY
    with open(m / "linear.img", "rb") as image:
        assert image.read(17) == b"on a block device"
    assert m.status()["linear.img"]["device"] == block_device


def random_file(path: Path, size: int, data_size: int, seed: int) -> Path:
    """A file of `size` bytes, the first `data_size` of them random."""
    sparse_file(path, size)
    with open(path, "r+b") as f:
        f.write(random.Random(seed).randbytes(data_size))
    return path


def test_fio_with_verify_through_loop_devices_while_upgrading_20_times(tmp_path, mount, loop):
    """Every image type at once, through loop devices, while 20 upgrades run: fio with
    verify on linear.img, bow.img (in checkpoint state: every first write is backed
    up) and origin.img (a snapshot held: every first write copies to the store);
    system.img while merging under fio reads and reads compared with NEW, and
    snapshot.img under reads compared with what it held at the take. Afterwards the
    bow device restores to the checkpoint, and the snapshot is still what it was."""
    system_args, system_device, new = slowly_merging_system(tmp_path)
    linear_device = sparse_file(tmp_path / "linear.raw", 64 << 20)
    bow_device = random_file(tmp_path / "bow.raw", 128 << 20, 64 << 20, seed=2)
    origin_device = random_file(tmp_path / "origin.raw", 64 << 20, 64 << 20, seed=3)
    m = mount("--linear", linear_device, *system_args, "--bow", bow_device,
              "--bow-map", tmp_path / "bow.map", "--snapshot", origin_device,
              "--store", tmp_path / "origin.store")
    with opened_image(m) as bow_image:
        discard(bow_image, 64 << 20, 64 << 20)  # room for backups
    run_fusesnap("bow", "checkpoint", m.mountpoint)
    bow_checkpoint = sha256_of(m / "bow.img", 64 << 20)
    run_fusesnap("snapshot", "take", m.mountpoint)
    snapshot_at_take = copy_of(m / "snapshot.img", tmp_path / "snapshot-at-take.raw")
    linear_loop = loop(m / "linear.img")
    system_loop = loop(m / "system.img", read_only=True)
    bow_loop = loop(m / "bow.img")
    origin_loop = loop(m / "origin.img")
    snapshot_loop = loop(m / "snapshot.img", read_only=True)

    pauses, merged = [], []
    with FioLoop(linear_loop) as fio, FioLoop(system_loop, read_only=True) as fio_reads, \
            VerifyingReader(system_loop, new) as reader, FioLoop(bow_loop) as fio_bow, \
            FioLoop(origin_loop) as fio_origin, VerifyingReader(snapshot_loop, snapshot_at_take) as snapshot_reader:
        for _ in range(20):
            upgrade(m)
            pauses.append(server_status(m)["last_pause_ms"])
            system = m.status()["system.img"]
            if system["state"] == "merging":
                merged.append(system["merged"])
            time.sleep(0.2)
    for load in (fio, fio_reads, reader, fio_bow, fio_origin, snapshot_reader):
        load.check()
    print(f"longest pause of 20 upgrades under fio: {max(pauses):.1f} ms "
          f"(median {sorted(pauses)[10]:.1f} ms)")
    assert len(merged) >= 10 and merged == sorted(merged) and merged[-1] > merged[0], \
        "the merge went on through the upgrades, from where it was"
    assert server_status(m)["upgrades"] == 20

    assert_merge_ends_at(m, new, system_loop, system_device)
    status = m.status()
    assert status["bow.img"]["state"] == "checkpoint" and status["bow.img"]["backed_up"] > 0
    assert status["snapshot-1.img"]["state"] == "active"
    assert sha256_of(m / "snapshot.img") == sha256_of(snapshot_at_take)
    with opened_image(m) as bow_image:
        os.fsync(bow_image)  # the device as a crash now would leave it
    restored = copy_of(bow_device, tmp_path / "bow-restored.raw")
    run_fusesnap("bow", "restore", restored)
    assert sha256_of(restored, 64 << 20) == bow_checkpoint


# -- other builds ---------------------------------------------------------------------

def test_upgrade_to_a_different_build_runs_its_code_with_the_state(tmp_path, mount, device):
    program = variant_build(
        tmp_path / "variant", VERSION,
        ("images/linear.py", 'return {"size": self.size, "device": self.device.path}',
         'return {"size": self.size, "device": self.device.path, "build": "variant"}'))
    m = mount("--linear", device)
    with open(m / "linear.img", "r+b") as image:
        image.write(b"carried over")
        image.flush()

        result = upgrade(m, "--exec", program)

        assert "-> 9.9.9+variant-" in result.stdout
        assert m.status()["linear.img"]["build"] == "variant"  # its code serves
        assert server_status(m)["version"].startswith("9.9.9+variant-")
        image.seek(0)
        assert image.read(12) == b"carried over"

        upgrade(m)  # and back to this build, state and all
        assert "build" not in m.status()["linear.img"]
        assert server_status(m)["upgrades"] == 2


def test_state_of_an_unknown_version_is_refused(tmp_path, mount, device):
    newer = variant_build(tmp_path / "newer", VERSION,
                          ("images/linear.py", "handover_versions = (1,)",
                           "handover_versions = (2, 1)"))
    m = mount("--linear", device)
    upgrade(m, "--exec", newer)  # the newer build restores version 1 ...
    newer_pid = m.pid

    result = upgrade(m, check=False)  # ... but this one does not know its version 2

    assert result.returncode == 1
    assert "hand-over state version 2 is unknown to this build" in result.stderr
    assert m.pid == newer_pid and server_status(m)["version"].startswith("9.9.9")


def test_a_mount_with_an_image_that_cannot_be_handed_over_is_refused(tmp_path, stack, device):
    """An image type without a hand-over (here: a build whose bow.img has none) makes
    the upgrade refused before a successor starts, and the server serves on."""
    program = variant_build(tmp_path / "variant",
                            ("images/bow.py", "    handover_versions = (1,)\n", ""))
    (tmp_path / "mnt").mkdir()
    run([program, "mount", tmp_path / "mnt", "--bow", device, "--bow-map", tmp_path / "bow.map",
         "--log", tmp_path / "mnt.log"], cwd=tmp_path)  # not here: ./fusesnap would come first
    stack.callback(run, [*FUSESNAP, "umount", tmp_path / "mnt"])
    m = Mount(tmp_path / "mnt", tmp_path / "mnt.log")
    server = m.pid

    result = upgrade(m, check=False)

    assert result.returncode == 1
    assert "bow.img cannot be handed over to a new server yet" in result.stderr
    assert m.pid == server and "bow.img" in m.status()


def test_snapshot_handles_entries_and_takes_across_upgrades(tmp_path, mount, device):
    """Snapshot files come and go at runtime: their inodes, a handle open on
    snapshot.img (snapshot 1, even once snapshot.img means snapshot 2) and the
    snapshot table carry over, with a take between two upgrades."""
    with open(device, "r+b") as dev:
        dev.write(random.Random(1).randbytes(4 << 20))
    m = mount("--snapshot", device, "--store", tmp_path / "dev.store", "--chunk-size", "65536")
    snapshot_cli(m, "take")
    at_first_take = sha256_of(m / "snapshot.img")
    def inodes():
        return {name: (m / name).stat().st_ino for name in os.listdir(m.mountpoint)}
    before = inodes()
    handle = os.open(m / "snapshot.img", os.O_RDONLY)
    try:
        with open(m / "origin.img", "r+b") as origin:
            origin.write(b"after the first take" * 1000)
        upgrade(m)
        assert inodes() == before
        snapshot_cli(m, "take")
        at_second_take = sha256_of(m / "snapshot.img")
        before = inodes()  # snapshot.img is a new file now: a new inode
        with open(m / "origin.img", "r+b") as origin:
            origin.seek(1 << 20)
            origin.write(b"after the second take" * 1000)
        upgrade(m)
        read_through_handle = hashlib.sha256()
        for offset in range(0, 64 << 20, 4 << 20):
            read_through_handle.update(os.pread(handle, 4 << 20, offset))
        assert read_through_handle.hexdigest() == at_first_take
    finally:
        os.close(handle)
    assert inodes() == before
    assert sha256_of(m / "snapshot-1.img") == at_first_take
    assert sha256_of(m / "snapshot-2.img") == sha256_of(m / "snapshot.img") == at_second_take
    listed = snapshot_cli(m, "list").stdout.split()
    assert "snapshot-1.img" in listed and "snapshot-2.img" in listed
    assert m.status()["origin.img"]["newest"] == 2 and server_status(m)["upgrades"] == 2


def snapshot_cli(m, *args):
    return run([*FUSESNAP, "snapshot", args[0], str(m.mountpoint), *map(str, args[1:])])


def test_image_state_checks_type_and_version(device):
    image = LinearImage(BlockDevice(str(device)))
    try:
        state = image.handover_state()
        image.restore_handover_state(state)
        for bad in ({**state, "version": 7}, {**state, "target": "update"},
                    {**state, "device": "/dev/other"}):
            with pytest.raises(ValueError):
                image.restore_handover_state(bad)
    finally:
        image.device.close()


def test_merge_position_is_handed_over_and_caught_up(tmp_path):
    """system.img's state: the successor opens the image at the persisted progress and
    catches up to where the old server's merge stands; a state behind what is
    persisted, or of an unknown version, is refused."""
    old, new = tmp_path / "old.raw", tmp_path / "new.raw"
    rng = random.Random(3)
    old.write_bytes(rng.randbytes(4 << 20))
    data = bytearray(old.read_bytes())
    for block in rng.sample(range(1024), 300):
        data[block * 4096:(block + 1) * 4096] = rng.randbytes(4096)
    new.write_bytes(data)
    diff = tmp_path / "diff.img"
    run_fusesnap("diff", old, new, "-o", diff, "--quiet", "--chunk-blocks", "16")

    def open_image():
        device, opened = BlockDevice(str(old)), open_diff(str(diff), bad_diff_status=2)
        progress = MergeProgress(str(tmp_path / "state"), opened.fingerprint(), device, opened.path)
        return UpdateImage(device, opened, progress)

    running, successor = open_image(), open_image()
    try:
        for chunk_index in range(5):  # the old server merged 5 chunks, persisted none
            running._write_chunk(chunk_index)
            running._merged(chunk_index)
        running.control("update", ["pause"])
        state = running.handover_state()

        successor.restore_handover_state(state)
        successor.restore_handover_state(state)  # before the pause, and in it

        assert list(successor.pending) == list(running.pending)
        assert successor.status() == running.status()
        assert successor.status()["state"] == "paused"
        assert not successor.unpaused.is_set()
        with pytest.raises(ValueError, match="version 3 is unknown"):
            successor.restore_handover_state({**state, "version": 3})
        with pytest.raises(ValueError, match="2 merged chunks, but 5 are persisted or merged"):
            successor.restore_handover_state({**state, "merged_chunks": 2})
    finally:
        for image in (running, successor):
            image.diff.close()
            image.device.close()


def test_a_v1_merge_hands_over_its_scratch_copy(tmp_path):
    """A successor that opened system.img while the old server was still copying the
    scratch copy of a v1 diff takes it as complete from the hand-over (after reading
    it again), and merges on from where the old server stands; a state claiming a
    complete copy that the file does not hold is refused."""
    from test_diff_v1 import upgraded_in_place
    from test_update_format import write
    old, new = upgraded_in_place(random.Random(8), 512)
    device, new_path = write(tmp_path / "dev.raw", old), write(tmp_path / "new.raw", new)
    run_fusesnap("diff", "--format", "v1", device, new_path, "-o", tmp_path / "diff.img",
                 "--quiet", "--chunk-blocks", "16")
    args = argparse.Namespace(system=device, diff=str(tmp_path / "diff.img"),
                              state_dir=str(tmp_path / "state"), no_bg_update=False,
                              no_verify_source=False, merge_rate=0.0, cache_mib=16)
    (running,), (successor,) = images_from_args(args), images_from_args(args)
    try:
        assert not running.scratch_ready and not successor.scratch_ready
        assert trio.run(running._copy_scratch)
        for chunk_index in range(3):
            running._write_chunk(chunk_index)
            running._merged(chunk_index)
        state = running.handover_state()
        assert state["scratch_ready"] and state["version"] == 2

        with open(running.scratch.path, "r+b") as f:
            intact = f.read(4096)
            f.seek(0)
            f.write(bytes(4096))
        with pytest.raises(ValueError, match="does not hold it"):
            successor.restore_handover_state(state)
        with open(running.scratch.path, "r+b") as f:
            f.write(intact)
        successor.restore_handover_state(state)
        assert successor.scratch_ready and successor.merged_chunks == 3
        assert trio.run(successor.read, 0, successor.size) == new
        trio.run(successor._merge_or_fail)
        assert successor.state == "done", successor.error
        assert open(device, "rb").read() == new
        assert not os.path.exists(successor.scratch.path)
        (third,) = images_from_args(args)   # the merge is done: no scratch copy needed
        third.restore_handover_state(successor.handover_state())
        assert third.state == "done" and third.scratch is None
        trio.run(third.close)
    finally:
        for image in (running, successor):
            trio.run(image.close)


# -- rollback ---------------------------------------------------------------------------

BROKEN_SUCCESSORS = {
    "fails to import": (("upgrade.py", "import trio\n", "import trio\nraise ImportError('broken build')\n"),
                        "broken build"),
    "hangs before the pause": (broken_restore("__import__('time').sleep(3600)", in_the_pause=False),
                               "did not answer within 3 s"),
    "raises while restoring": (broken_restore("raise RuntimeError('restore is broken')"),
                               "cannot restore the state: restore is broken"),
    "hangs in the pause": (broken_restore("__import__('time').sleep(3600)"),
                           "did not answer within 2 s"),
    "exits after receiving the fd": (broken_restore("__import__('os')._exit(3)"),
                                     "exited with status 3"),
}


def test_broken_successors_are_refused_and_the_old_server_serves_on(tmp_path, mount, loop, device):
    m = mount("--linear", device)
    linear_loop = loop(m / "linear.img")
    old_pid = m.pid
    with FioLoop(linear_loop) as fio:
        for name, (edit, reason) in BROKEN_SUCCESSORS.items():
            program = variant_build(tmp_path / name.replace(" ", "-"), edit)

            result = upgrade(m, "--exec", program, "--timeout", 3, check=False)

            assert result.returncode == 1, (name, result.stdout)
            assert "refused" in result.stderr and reason in result.stderr, (name, result.stderr)
            assert m.pid == old_pid and server_status(m)["upgrades"] == 0
        upgrade(m)  # a good one still goes through afterwards
    fio.check()
    assert "upgrade refused, serving on" in m.log.read_text()


def test_upgrade_errors_are_one_line(tmp_path, mount, device):
    m = mount("--linear", device)
    result = upgrade(m, "--exec", tmp_path / "no-such-program", check=False)
    assert result.returncode == 2 and result.stderr.startswith("fusesnap: no such program")
    result = run([*FUSESNAP, "upgrade", str(tmp_path)], check=False)
    assert result.returncode == 2 and "is not a fusesnap mount" in result.stderr
