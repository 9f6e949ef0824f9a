"""Every path a user gives means what it means in the caller's directory: each command,
run from a directory that is not `/`, with relative paths only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import fusesnap, fusesnap_mount, is_mounted, sparse_file, random_update_pair

pytestmark = pytest.mark.mount


def test_mount_status_umount_with_a_relative_mountpoint_device_and_log(tmp_path):
    sparse_file(tmp_path / "dev.img", 16 << 20)
    with fusesnap_mount(Path("mnt"), "--linear", "dev.img", log=Path("logs/mnt.log"),
                        cwd=tmp_path) as m:
        assert m.mountpoint == tmp_path / "mnt" and is_mounted(tmp_path / "mnt")
        assert m.status()["linear.img"]["device"] == str(tmp_path / "dev.img")
        assert "serving linear.img" in (tmp_path / "logs" / "mnt.log").read_text()
        assert fusesnap("status", "mnt", cwd=tmp_path).stdout == m.status_text()
        fusesnap("umount", "mnt", cwd=tmp_path)
        assert not is_mounted(tmp_path / "mnt")


def test_diff_diff_info_mount_and_update_commands_with_relative_paths(tmp_path):
    random_update_pair(tmp_path)
    fusesnap("diff", "old.img", "new.img", "-o", "update.diff", cwd=tmp_path)
    info = json.loads(fusesnap("diff-info", "update.diff", "--json", cwd=tmp_path).stdout)
    assert info["path"] == "update.diff" and info["changed_blocks"] == 256
    (tmp_path / "dev.img").write_bytes((tmp_path / "old.img").read_bytes())
    with fusesnap_mount(Path("mnt"), "--system", "dev.img", "--diff", "update.diff",
                        "--merge-rate", "0.1", cwd=tmp_path) as m:
        figures = m.status()["system.img"]
        assert (figures["device"], figures["diff"]) == (str(tmp_path / "dev.img"),
                                                        str(tmp_path / "update.diff"))
        fusesnap("update", "pause", "mnt", cwd=tmp_path)
        assert m.status()["system.img"]["state"] == "paused"
        fusesnap("update", "resume", "mnt", cwd=tmp_path)
        assert (m / "system.img").read_bytes() == (tmp_path / "new.img").read_bytes()
        fusesnap("umount", "mnt", cwd=tmp_path)
    log = m.log.read_text()
    assert "control: update pause" in log and "control: update resume" in log


def test_update_wait_with_a_relative_mountpoint(tmp_path):
    random_update_pair(tmp_path)
    fusesnap("diff", "old.img", "new.img", "-o", "update.diff", cwd=tmp_path)
    (tmp_path / "dev.img").write_bytes((tmp_path / "old.img").read_bytes())
    with fusesnap_mount(Path("mnt"), "--system", "dev.img", "--diff", "update.diff",
                        cwd=tmp_path) as m:
        result = fusesnap("update", "wait", "mnt", cwd=tmp_path)
        assert result.stdout == result.stderr == ""  # quiet when not on a terminal
        assert m.status()["system.img"]["state"] == "done"
    assert (tmp_path / "dev.img").read_bytes() == (tmp_path / "new.img").read_bytes()


def test_snapshot_mount_take_and_changes_with_relative_paths(tmp_path):
    sparse_file(tmp_path / "sdb1.raw", 16 << 20)
    (tmp_path / "mnt").mkdir()
    missing = fusesnap("mount", "mnt", "--snapshot", "sdb1.raw", "--store", "stores/sdb1.store",
                       cwd=tmp_path, check=False)
    assert missing.returncode == 2
    assert missing.stderr == (f"fusesnap: cannot keep the store {tmp_path}/stores/sdb1.store: "
                              f"{tmp_path}/stores: No such file or directory\n")
    (tmp_path / "stores").mkdir()
    with fusesnap_mount(Path("mnt"), "--snapshot", "sdb1.raw", "--store", "stores/sdb1.store",
                        cwd=tmp_path) as m:
        assert m.status()["origin.img"]["device"] == str(tmp_path / "sdb1.raw")
        assert (tmp_path / "stores" / "sdb1.store").is_file()
        snapshot_id = fusesnap("snapshot", "take", "mnt", "--no-freeze", cwd=tmp_path).stdout.strip()
        assert (tmp_path / "mnt" / "snapshot.img").exists()
        fusesnap("snapshot", "changes", "mnt", "--since", snapshot_id, cwd=tmp_path)
        fusesnap("umount", "mnt", cwd=tmp_path)
