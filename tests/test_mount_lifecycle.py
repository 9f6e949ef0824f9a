"""`fusesnap mount` / `umount`: returns when usable, refuses while busy, cleans up after a crash."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pyfuse3
import pytest

from fusesnap.cli import wait_for_exit
from fusesnap.errors import UserError
from fusesnap.mount import check_discards
from harness import fusesnap, fusesnap_mount, is_mounted, loop_device, sparse_file, random_update_pair

pytestmark = pytest.mark.mount


@pytest.fixture
def device(tmp_path):
    return sparse_file(tmp_path / "dev.raw", 64 << 20)


def test_mount_returns_usable_and_umount_stops_the_server(mount, device):
    m = mount("--linear", device)
    assert (m / "linear.img").stat().st_size == 64 << 20  # usable right away
    fusesnap("umount", m.mountpoint)
    assert not is_mounted(m.mountpoint)
    assert wait_for_exit(m.pid, 0.5), "umount returns only after the server exited"


def test_umount_refuses_while_a_loop_device_is_attached(mount, device):
    m = mount("--linear", device)
    with loop_device(m / "linear.img") as loop:
        result = fusesnap("umount", m.mountpoint, check=False)
        assert result.returncode == 1
        assert loop in result.stderr and "linear.img" in result.stderr
        assert is_mounted(m.mountpoint)
    fusesnap("umount", m.mountpoint)


def test_umount_cleans_up_after_a_dead_server(mount, device):
    m = mount("--linear", device)
    m.kill_server()
    with pytest.raises(OSError):
        os.stat(m / "linear.img")  # "Transport endpoint is not connected"
    result = fusesnap("umount", m.mountpoint)
    assert "not running" in result.stdout
    assert not is_mounted(m.mountpoint)


def test_background_server_logs_to_the_named_file(mount, device):
    m = mount("--linear", device)
    assert "serving linear.img" in m.log.read_text()


def test_status_command_prints_status_files(mount, device):
    m = mount("--linear", device)
    assert fusesnap("status", m.mountpoint).stdout == m.status_text()
    assert '"target": "linear"' in fusesnap("status", m.mountpoint, "--json").stdout


def test_umount_names_the_processes_that_hold_an_image_open(mount, device):
    m = mount("--linear", device)
    holder = subprocess.Popen(["sleep", "60"], stdin=open(m / "linear.img", "rb"))
    try:
        result = fusesnap("umount", m.mountpoint, check=False)
        assert result.returncode == 1
        assert f"is in use by sleep (pid {holder.pid})" in result.stderr
        assert is_mounted(m.mountpoint)
    finally:
        holder.kill()
        holder.wait()
    fusesnap("umount", m.mountpoint)


def test_the_log_records_the_devices_served_and_every_control_command(mount, device):
    m = mount("--linear", device)
    fusesnap("umount", m.mountpoint)
    log = m.log.read_text()
    assert f"serving linear.img: linear {64 << 20} {device}" in log
    assert "control: flush" in log


def test_the_log_file_is_reopened_after_logrotate_moves_it(mount, device):
    m = mount("--linear", device)
    m.log.rename(m.log.with_name("rotated.log"))
    fusesnap("umount", m.mountpoint)
    assert "control: flush" in m.log.read_text()
    assert "control: flush" not in m.log.with_name("rotated.log").read_text()


MISSING_HANDLER = """\
import pyfuse3
del pyfuse3.fuse_fallocate_async  # as in stock pyfuse3, which has no fallocate handler
"""


@pytest.fixture
def stock_pyfuse3(tmp_path, monkeypatch):
    """fusesnap commands in this test see a pyfuse3 without the fallocate handler
    (a sitecustomize module removes it in every Python process they start)."""
    site = tmp_path / "stock-pyfuse3"
    site.mkdir()
    (site / "sitecustomize.py").write_text(MISSING_HANDLER)
    monkeypatch.setenv("PYTHONPATH", str(site))


def test_without_the_fallocate_handler_mount_warns_and_status_tells(stock_pyfuse3, tmp_path, device):
    fix = f"{sys.executable} -m fusesnap.pyfuse3_build"
    version = fusesnap("--version").stdout
    assert f"discards: NOT supported" in version and f"fix: {fix}" in version
    with fusesnap_mount(tmp_path / "mnt", "--linear", device) as m:
        assert m.status_json()["discards"] is False
    result = fusesnap("mount", tmp_path / "mnt", "--linear", device, "--log", m.log)
    try:
        assert result.stderr == ("fusesnap: warning: this pyfuse3 has no fallocate handler: "
                                 "discards through loop devices (fstrim, blkdiscard) will fail; "
                                 f"fix: {fix}\n")
    finally:
        fusesnap("umount", tmp_path / "mnt")


def test_with_the_fallocate_handler_status_says_discards_work(mount, device):
    assert mount("--linear", device).status_json()["discards"] is True


def test_without_the_fallocate_handler_an_image_that_needs_discards_is_refused(monkeypatch):
    monkeypatch.delattr(pyfuse3, "fuse_fallocate_async")
    needy = types.SimpleNamespace(name="bow.img", needs_discards=True)
    with pytest.raises(UserError) as refused:
        check_discards([needy])
    assert refused.value.exit_status == 2
    assert str(refused.value) == ("bow.img cannot work without discards, and this pyfuse3 has no "
                                  f"fallocate handler; fix: {sys.executable} -m fusesnap.pyfuse3_build")


@pytest.fixture
def update_files(tmp_path):
    """dev.img (a copy of OLD) and update.diff turning it into NEW."""
    random_update_pair(tmp_path)
    fusesnap("diff", "old.img", "new.img", "-o", "update.diff", cwd=tmp_path)
    (tmp_path / "dev.img").write_bytes((tmp_path / "old.img").read_bytes())
    return tmp_path / "dev.img", tmp_path / "update.diff"


def test_update_wait_exits_1_with_the_reason_when_the_merge_stops(mount, update_files):
    device, diff = update_files
    with open(diff, "r+b") as f:  # a byte of the first chunk: its checksum fails
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    m = mount("--system", device, "--diff", diff)
    result = fusesnap("update", "wait", m.mountpoint, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("fusesnap: system.img: merge stopped: ")
    assert len(result.stderr.splitlines()) == 1


def test_update_wait_refuses_a_mount_that_does_not_merge(mount, update_files):
    device, diff = update_files
    m = mount("--system", device, "--diff", diff, "--no-bg-update")
    result = fusesnap("update", "wait", m.mountpoint, check=False)
    assert (result.returncode, result.stderr) == (
        1, "fusesnap: system.img does not merge (mounted with --no-bg-update)\n")
