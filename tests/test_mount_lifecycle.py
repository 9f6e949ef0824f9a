"""`fusesnap mount` / `umount`: returns when usable, refuses while busy, cleans up after a crash."""

from __future__ import annotations

import os

import pytest

from fusesnap.cli import wait_for_exit
from harness import fusesnap, is_mounted, loop_device, sparse_file

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
