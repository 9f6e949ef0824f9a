"""Crash failover: when the server dies, the supervisor started by `fusesnap mount`
starts a successor on the same FUSE connection, the kernel resends what the dead
server held, and loop devices on the mount see no error. A server that keeps dying
ends in an aborted mount with the reason logged; without a supervisor (killed, or
--no-failover) a crash aborts the mount as it always did."""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from bow_helpers import (assert_restored_to, checkpoint_frozen, churn, file_hashes,
                         make_filled_ext4, mounted_again, opened_image)
from crash_states import recording_device
from harness import (FUSESNAP, copy_of, fusesnap as run_fusesnap, mounted_dir, run, sha256_of,
                     sparse_file, wait_for_exit)
from test_upgrade import (BackgroundLoad, FioLoop, VerifyingReader, assert_merge_ends_at,
                          random_file, server_status, slowly_merging_system)

pytestmark = pytest.mark.mount


def wait_for_successor(m, dead_pid: int, timeout: float = 10) -> int:
    """The pid serving after `dead_pid` crashed (reading .status.json waits for it)."""
    deadline = time.monotonic() + timeout
    while (pid := server_status(m)["pid"]) == dead_pid:
        assert time.monotonic() < deadline, "no successor took over"
        time.sleep(0.05)
    return pid


def process_exists(pid: int) -> bool:
    return not wait_for_exit(pid, 0.2)


def assert_aborted(m, device: str) -> None:
    """The mount was aborted: a reader of the loop device gets EIO within seconds,
    the image reports the lost connection, the supervisor has exited."""
    started = time.monotonic()
    with pytest.raises(OSError) as failed:
        with open(device, "rb", buffering=0) as reader:
            os.posix_fadvise(reader.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            reader.read(4096)
    assert failed.value.errno == errno.EIO
    assert time.monotonic() - started < 15
    with pytest.raises(OSError) as gone:
        os.listdir(m.mountpoint)
    assert gone.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert wait_for_exit(m.supervisor_pid, 10)


def test_open_handles_cached_inodes_and_file_times_survive_a_crash(tmp_path, mount, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, as users type them
    sparse_file(tmp_path / "dev.raw", 16 << 20)
    m = mount("--linear", "dev.raw")
    image = m / "linear.img"
    inode = image.stat().st_ino
    mount_time = (m / ".status").stat().st_mtime_ns  # a status file's attributes are never cached
    handle = os.open(image, os.O_RDWR)
    try:
        os.pwrite(handle, b"before" * 100, 4096)
        dead = m.crash_server()
        successor = wait_for_successor(m, dead)
        assert os.pread(handle, 600, 4096) == b"before" * 100
        os.pwrite(handle, b"after" * 100, 1 << 20)
    finally:
        os.close(handle)
    assert image.stat().st_ino == inode
    assert (m / ".status").stat().st_mtime_ns == mount_time
    status = server_status(m)
    assert status["pid"] == successor and status["failovers"] == 1
    assert status["last_failover"] == f"server pid {dead} died"
    assert status["supervisor_pid"] == m.supervisor_pid
    log = m.log.read_text()
    assert f"failover 1 of {m.mountpoint}: server pid {dead} died" in log
    assert "served again" in log


class FileChurn(BackgroundLoad):
    """The bow tests' file workload (`churn`: overwrites in place, deletes, new and
    growing files) on a mounted filesystem, round after round until stopped, then a
    sync. An OSError (an I/O error, ext4 gone read-only) is a failure.

    Paced, `pause` seconds between rounds: every first write in checkpoint state takes
    a free block for its backup, so an unpaced workload on a quiet machine fills the
    free space within seconds, and the ENOSPC that follows is by design, not a
    failover's fault. A round takes at most about 150 KiB of free space."""

    def __init__(self, root: Path, seed: int, pause: float = 0.1):
        super().__init__()
        self.root = root
        self.rng = random.Random(seed)
        self.pause = pause
        self.rounds = 0

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.pause):
                churn(self.root, self.rng, 20)
                self.rounds += 1
            os.sync()
        except OSError as exc:
            self.failures.append(f"file workload: {exc}")

    def check(self) -> None:
        assert not self.failures, self.failures
        assert self.rounds, "the file workload never ran"


def ext4_errors(device: str) -> int:
    """Errors ext4 has counted on the filesystem mounted from `device`."""
    return int(Path(f"/sys/fs/ext4/{Path(device).name}/errors_count").read_text())


def test_every_image_type_through_loop_devices_while_the_server_is_killed_20_times(
        tmp_path, mount, loop, monkeypatch):
    """One mount with every image type, each through a loop device, while the server
    is killed with SIGKILL 20 times at random moments: fio with verify on linear.img
    and on origin.img (two snapshots held: first writes copy to the store); system.img
    merging, under fio reads and reads compared with NEW; snapshot-1.img under reads
    compared with its take-time contents; ext4 on bow.img in checkpoint state under a
    file workload. No I/O error, no verify failure, no ext4 error, e2fsck clean, every
    synced file intact; then the merge ends at NEW, each snapshot is what it was at
    its take, and a restore of bow.img gives the checkpoint (a first write re-executed
    after a crash is not backed up twice over the checkpoint's data)."""
    monkeypatch.chdir(tmp_path)  # relative paths, as users type them
    system_args, system_device, new = slowly_merging_system(tmp_path, seconds=30)
    sparse_file(tmp_path / "linear.raw", 64 << 20)
    # 128 MiB: the paced file workload needs at most ~50 MB of backups in the kill phase.
    make_filled_ext4(tmp_path / "bow.raw", 128, files=40)
    random_file(tmp_path / "origin.raw", 64 << 20, 64 << 20, seed=3)
    m = mount("--linear", "linear.raw", *system_args, "--bow", "bow.raw", "--bow-map", "bow.map",
              "--snapshot", "origin.raw", "--store", "origin.store", "--max-failovers", "100")
    at_take = {}
    for number in (1, 2):
        with open(m / "origin.img", "r+b") as origin:
            origin.seek(number << 20)
            origin.write(random.Random(number).randbytes(4 << 20))
        run_fusesnap("snapshot", "take", m.mountpoint)
        at_take[number] = copy_of(m / "origin.img", tmp_path / f"origin-at-take-{number}.raw")
    linear_loop = loop(m / "linear.img")
    system_loop = loop(m / "system.img", read_only=True)
    origin_loop = loop(m / "origin.img")
    snapshot_loop = loop(m / "snapshot-1.img", read_only=True)
    bow_loop = loop(m / "bow.img")

    rng = random.Random(11)
    recoveries = []
    with mounted_dir(bow_loop, tmp_path / "fs") as root:
        checkpoint_hashes = file_hashes(root)
        checkpoint_frozen(root, m.mountpoint, tmp_path / "checkpoint.img")
        with FioLoop(linear_loop) as fio_linear, FioLoop(origin_loop) as fio_origin, \
                FioLoop(system_loop, read_only=True) as fio_system, \
                VerifyingReader(system_loop, new) as merge_reader, \
                VerifyingReader(snapshot_loop, at_take[1]) as snapshot_reader, \
                FileChurn(root, seed=4) as files:
            for _ in range(20):
                time.sleep(rng.uniform(0.1, 1.0))
                wait_for_successor(m, m.crash_server())
                recoveries.append(server_status(m)["last_pause_ms"])
        synced = file_hashes(root)
        # Sized so that no write meets ENOSPC (by design, and not what this test is about).
        assert m.status()["bow.img"]["free"] >= 16 << 20, "the workload nearly filled bow.img"
        assert ext4_errors(bow_loop) == 0
    for load in (fio_linear, fio_origin, fio_system, merge_reader, snapshot_reader, files):
        load.check()
    print(f"crash to serving again, 20 crashes under load: longest {max(recoveries):.0f} ms, "
          f"median {sorted(recoveries)[10]:.0f} ms")
    assert server_status(m)["failovers"] == 20
    run(["e2fsck", "-fn", bow_loop])
    with mounted_again(bow_loop, tmp_path / "fs-again") as root:
        assert file_hashes(root) == synced

    assert_merge_ends_at(m, new, system_loop, system_device)
    for number, contents in at_take.items():
        assert sha256_of(m / f"snapshot-{number}.img") == sha256_of(contents), f"snapshot {number} changed"
    status = m.status()
    assert status["bow.img"]["state"] == "checkpoint" and status["bow.img"]["backed_up"] > 0
    with opened_image(m) as bow_image:
        os.fsync(bow_image)  # the device as a power cut now would leave it
    restored = copy_of(tmp_path / "bow.raw", tmp_path / "bow-restored.raw")
    run_fusesnap("bow", "restore", restored)
    assert_restored_to(restored, tmp_path / "checkpoint.img", checkpoint_hashes, tmp_path)


def test_a_request_the_dead_server_had_read_is_resent_once_and_answered(tmp_path, stack, mount,
                                                                        loop):
    """The server reads a request and is killed before it answers: the kernel resends
    that request to the successor (FUSE_NOTIFY_RESEND), once, and the reader gets the
    right data, no error. linear.img's device is a recording device
    (tests/crash_states.py) that holds reads of one block, so the server is stopped
    inside that request at a known point, with no hook in fusesnap: its pread of the
    device waits there, SIGKILL or not, and when it returns the process dies without
    answering."""
    base = random_file(tmp_path / "base.raw", 16 << 20, 16 << 20, seed=9)
    held = 8 << 20
    recorder = stack.enter_context(recording_device(tmp_path / "rec", base))
    m = mount("--linear", recorder.device)
    device = loop(m / "linear.img")
    buffer = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    reader = os.open(device, os.O_RDONLY | os.O_DIRECT)
    recorder.hold_reads(held)
    try:
        outcome = []
        reading = threading.Thread(target=lambda: outcome.append(os.preadv(reader, [buffer], held)),
                                   daemon=True)
        reading.start()
        deadline = time.monotonic() + 10
        while recorder.held_reads() == 0:
            assert time.monotonic() < deadline, "the server never read the device"
            time.sleep(0.01)
        dead = m.pid
        os.kill(dead, signal.SIGKILL)
        time.sleep(0.5)
        assert process_exists(dead), "the killed server is still inside the request"
        recorder.release_reads()
        m.pid = wait_for_successor(m, dead)  # the teardown ends it even if the read hangs
        reading.join(10)
        assert outcome == [4096], "the request was not answered"
    finally:
        recorder.release_reads()
        os.close(reader)
    assert buffer[:] == base.read_bytes()[held:held + 4096]
    assert recorder.held_reads() == 2, "read by the dead server, then once by its successor"
    assert server_status(m)["failovers"] == 1


def test_a_server_that_keeps_dying_ends_in_an_aborted_mount_not_a_hang(tmp_path, mount, loop):
    m = mount("--linear", sparse_file(tmp_path / "dev.raw", 16 << 20), "--max-failovers", "2")
    device = loop(m / "linear.img")
    for _ in range(2):
        wait_for_successor(m, m.crash_server())
    os.kill(server_status(m)["pid"], signal.SIGKILL)  # the third within a minute

    assert_aborted(m, device)
    assert wait_for_exit(m.supervisor_pid, 10)
    log = m.log.read_text()
    assert "3 crashes within 60 s (--max-failovers 2)" in log
    assert "aborting its FUSE connection" in log


def test_a_successor_that_cannot_start_ends_in_an_aborted_mount(tmp_path, mount, loop,
                                                                monkeypatch):
    """The device is gone (renamed) when the server dies: every successor fails to
    open it, and after the limit the mount is aborted with the reason logged."""
    monkeypatch.chdir(tmp_path)
    sparse_file(tmp_path / "dev.img", 16 << 20)
    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    device = loop(m / "bow.img")
    (tmp_path / "dev.img").rename(tmp_path / "moved.img")

    m.crash_server()

    assert_aborted(m, device)
    log = m.log.read_text()
    assert log.count("the successor failed") == 2
    assert "3 crashes within 60 s (--max-failovers 2)" in log


def test_without_its_supervisor_the_server_serves_on_and_a_crash_aborts(tmp_path, mount):
    m = mount("--linear", sparse_file(tmp_path / "dev.raw", 16 << 20))
    os.kill(m.supervisor_pid, signal.SIGKILL)
    wait_for_exit(m.supervisor_pid, 10)
    with open(m / "linear.img", "r+b") as image:
        image.write(b"still served")
    deadline = time.monotonic() + 5
    while "is gone: a crash of this server will abort the mount" not in m.log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server_status(m)["supervisor_pid"] is None

    os.kill(m.pid, signal.SIGKILL)
    wait_for_exit(m.pid, 10)
    with pytest.raises(OSError) as gone:
        (m / "linear.img").read_bytes()
    assert gone.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def test_no_failover_runs_no_supervisor_and_umount_ends_both_otherwise(tmp_path, mount):
    plain = mount("--linear", sparse_file(tmp_path / "a.raw", 16 << 20), "--no-failover")
    assert plain.supervisor_pid is None and server_status(plain)["failovers"] == 0
    supervised = mount("--linear", sparse_file(tmp_path / "b.raw", 16 << 20))
    assert process_exists(supervised.supervisor_pid)

    run_fusesnap("umount", supervised.mountpoint)

    assert not process_exists(supervised.pid) and not process_exists(supervised.supervisor_pid)


def test_a_server_started_by_an_upgrade_is_supervised_too(tmp_path, mount):
    m = mount("--linear", sparse_file(tmp_path / "dev.raw", 16 << 20))
    run([*FUSESNAP, "upgrade", str(m.mountpoint)])
    with open(m / "linear.img", "r+b") as image:
        image.write(b"written after the upgrade")
    assert server_status(m)["supervisor_pid"] == m.supervisor_pid

    wait_for_successor(m, m.crash_server())

    status = server_status(m)
    assert (status["upgrades"], status["failovers"]) == (1, 1)
    with open(m / "linear.img", "rb") as image:
        assert image.read(25) == b"written after the upgrade"
