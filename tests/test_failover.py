"""Crash failover: when the server dies, the supervisor started by `fusesnap mount`
starts a successor on the same FUSE connection, the kernel resends what the dead
server held, and loop devices on the mount see no error. A server that keeps dying
ends in an aborted mount with the reason logged; without a supervisor (killed, or
--no-failover) a crash aborts the mount as it always did."""

from __future__ import annotations

import errno
import os
import random
import signal
import time

import pytest

from bow_helpers import (assert_restored_to, checkpoint_frozen, churn, file_hashes,
                         make_filled_ext4)
from harness import (FUSESNAP, fusesnap as run_fusesnap, loop_device, mounted_dir, run, sha256_of,
                     sparse_file, wait_for_exit)
from test_upgrade import (BackgroundLoad, FioLoop, VerifyingReader, assert_merge_ends_at, server_status,
                          slowly_merging_system)

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


def test_open_handles_and_cached_inodes_survive_a_crash(tmp_path, mount, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, as users type them
    sparse_file(tmp_path / "dev.raw", 16 << 20)
    m = mount("--linear", "dev.raw")
    image = m / "linear.img"
    inode = image.stat().st_ino
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
    status = server_status(m)
    assert status["pid"] == successor and status["failovers"] == 1
    assert status["last_failover"] == f"server pid {dead} died"
    assert status["supervisor_pid"] == m.supervisor_pid
    log = m.log.read_text()
    assert f"failover 1 of {m.mountpoint}: server pid {dead} died" in log
    assert "served again" in log


def test_fio_with_verify_through_loop_devices_while_the_server_is_killed_20_times(
        tmp_path, mount, loop):
    """linear.img under fio with verify, and system.img while merging under fio reads
    and reads compared with NEW, all through loop devices; SIGKILL of the server 20
    times at random moments: no I/O error, no verify failure, the merge ends at NEW."""
    system_args, system_device, new = slowly_merging_system(tmp_path)
    linear_device = sparse_file(tmp_path / "linear.raw", 64 << 20)
    m = mount("--linear", linear_device, *system_args, "--max-failovers", "100")
    linear_loop = loop(m / "linear.img")
    system_loop = loop(m / "system.img", read_only=True)

    rng = random.Random(11)
    recoveries = []
    with FioLoop(linear_loop) as fio, FioLoop(system_loop, read_only=True) as fio_reads, \
            VerifyingReader(system_loop, new) as reader:
        time.sleep(1)
        for _ in range(20):
            time.sleep(rng.uniform(0.1, 1.0))
            dead = m.crash_server()
            wait_for_successor(m, dead)
            recoveries.append(server_status(m)["last_pause_ms"])
    fio.check()
    fio_reads.check()
    reader.check()
    print(f"crash to serving again, 20 crashes under fio: longest {max(recoveries):.0f} ms, "
          f"median {sorted(recoveries)[10]:.0f} ms")
    assert server_status(m)["failovers"] == 20
    assert_merge_ends_at(m, new, system_loop, system_device)


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


class Crasher(BackgroundLoad):
    """SIGKILLs the mount's server at random moments from a thread, each time waiting
    until a successor serves, until stopped."""

    def __init__(self, m, seed: int):
        super().__init__()
        self.m = m
        self.rng = random.Random(seed)
        self.crashes = 0

    def _loop(self) -> None:
        while not self._stop.wait(self.rng.uniform(0.2, 1.0)):
            try:
                wait_for_successor(self.m, self.m.crash_server())
            except AssertionError as exc:
                self.failures.append(str(exc))
                return
            self.crashes += 1

    def done(self, crashes: int) -> bool:
        """`crashes` taken over (or a failure, which `check` reports)."""
        return self.crashes >= crashes or bool(self.failures)

    def check(self) -> None:
        assert not self.failures, self.failures


def test_ext4_on_bow_img_through_crashes_restores_to_its_checkpoint(mount, tmp_path, monkeypatch):
    """A file workload on ext4 on bow.img while the server is killed again and again:
    every synced file is there, e2fsck is clean, and a restore still gives the
    checkpoint (a first write re-executed after a crash is not backed up twice over
    the checkpoint's data)."""
    monkeypatch.chdir(tmp_path)
    make_filled_ext4(tmp_path / "dev.img", 64, files=40)
    m = mount("--bow", "dev.img", "--bow-map", "dev.map", "--max-failovers", "100")
    with loop_device(m / "bow.img") as device:
        with mounted_dir(device, tmp_path / "fs") as root:
            hashes = file_hashes(root)
            checkpoint_frozen(root, m.mountpoint, tmp_path / "checkpoint.img")
            rng = random.Random(4)
            with Crasher(m, seed=3) as crasher:
                while not crasher.done(5):
                    churn(root, rng, 100)
                os.sync()
            acknowledged = file_hashes(root)
        run(["e2fsck", "-fn", device])
        with mounted_dir(device, tmp_path / "fs2") as root:
            assert file_hashes(root) == acknowledged
    crasher.check()
    assert server_status(m)["failovers"] == crasher.crashes
    run_fusesnap("umount", m.mountpoint)
    run_fusesnap("bow", "restore", "dev.img", "--bow-map", "dev.map")
    assert_restored_to(tmp_path / "dev.img", tmp_path / "checkpoint.img", hashes, tmp_path)


def test_fio_verify_on_origin_img_through_crashes_keeps_the_snapshots(mount, loop, tmp_path):
    """fio with verify through a loop device on origin.img while the server is killed
    again and again: no error, and each snapshot still equals the origin at its take."""
    device = sparse_file(tmp_path / "sdb1.raw", 64 << 20)
    m = mount("--snapshot", device, "--store", tmp_path / "sdb1.store", "--max-failovers", "100")
    taken = {}
    for number in (1, 2):
        with open(m / "origin.img", "r+b") as origin:
            origin.seek(number << 20)
            origin.write(random.Random(number).randbytes(8 << 20))
        run_fusesnap("snapshot", "take", m.mountpoint)
        taken[f"snapshot-{number}.img"] = sha256_of(m / "origin.img")
    origin_loop = loop(m / "origin.img")
    with FioLoop(origin_loop) as fio, Crasher(m, seed=5) as crasher:
        while not crasher.done(5):
            time.sleep(0.1)
    fio.check()
    crasher.check()
    assert server_status(m)["failovers"] == crasher.crashes
    for name, digest in taken.items():
        assert sha256_of(m / name) == digest, f"{name} changed"


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
