"""system.img: reads as NEW while the diff merges into the device in the background."""

from __future__ import annotations

import errno
import os
import time

import pytest

from harness import (copy_of, fusesnap, make_update_pair, mounted_dir, run, sha256_of)

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(old, new, new_files, diff): ext4 images and the diff between them."""
    directory = tmp_path_factory.mktemp("pair")
    old, new, files = make_update_pair(directory)
    diff = directory / "diff.img"
    fusesnap("diff", old, new, "-o", diff, "--quiet")
    return old, new, files, diff


@pytest.fixture
def device(pair, tmp_path):
    """(dev, diff): a fresh copy of OLD to update, and a private copy of the diff
    (its progress file lives beside it)."""
    old, _, _, diff = pair
    return copy_of(old, tmp_path / "dev.img"), copy_of(diff, tmp_path / "diff.img")


def wait_for(predicate, timeout=60.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def system_status(m) -> dict:
    return m.status()["system.img"]


def test_reads_as_new_before_during_and_after_the_merge(pair, device, mount):
    _, new, _, _ = pair
    dev, diff = device
    new_hash = sha256_of(new)

    m = mount("--system", dev, "--diff", diff, "--no-bg-update")
    assert sha256_of(m / "system.img") == new_hash
    assert system_status(m)["state"] == "disabled"

    m = mount("--system", dev, "--diff", diff, "--merge-rate", "0.25")
    wait_for(lambda: system_status(m)["merged"] > 0)
    status = system_status(m)
    assert status["state"] == "merging" and status["merged"] < status["total"]
    assert sha256_of(m / "system.img") == new_hash
    fusesnap("update", "pause", m.mountpoint)
    assert system_status(m)["state"] == "paused"
    assert sha256_of(m / "system.img") == new_hash
    fusesnap("update", "resume", m.mountpoint)
    assert system_status(m)["state"] == "merging"
    fusesnap("umount", m.mountpoint)

    m = mount("--system", dev, "--diff", diff)
    status = wait_for(lambda: (s := system_status(m))["state"] == "done" and s)
    assert status["merged"] == status["total"] > 0
    assert m.status_text() == f"system.img: update {status['total']} {status['total']} done\n"
    assert sha256_of(m / "system.img") == new_hash
    fusesnap("umount", m.mountpoint)
    assert sha256_of(dev, os.path.getsize(new)) == new_hash


def test_ext4_through_a_loop_device_has_new_files(pair, device, mount, loop, tmp_path):
    _, _, files, _ = pair
    dev, diff = device
    m = mount("--system", dev, "--diff", diff)
    loop_dev = loop(m / "system.img", read_only=True)
    with mounted_dir(loop_dev, tmp_path / "fs", "-o", "ro,noload") as root:
        found = {p.name: sha256_of(p) for p in root.iterdir() if p.is_file()}
    assert found == files
    assert run(["e2fsck", "-fn", loop_dev]).returncode == 0


def test_kill_9_mid_merge_then_remount_resumes(pair, device, mount):
    _, new, _, _ = pair
    dev, diff = device
    m = mount("--system", dev, "--diff", diff, "--merge-rate", "0.25")
    wait_for(lambda: os.path.exists(str(diff) + ".progress"), timeout=30)
    m.kill_server()
    fusesnap("umount", m.mountpoint)

    m = mount("--system", dev, "--diff", diff)
    assert system_status(m)["merged"] > 0, "resumed, not started over"
    assert sha256_of(m / "system.img") == sha256_of(new)
    wait_for(lambda: system_status(m)["state"] == "done")
    fusesnap("umount", m.mountpoint)
    assert sha256_of(dev, os.path.getsize(new)) == sha256_of(new)


def test_system_img_is_read_only_and_sized_like_the_device(pair, device, mount):
    dev, diff = device
    m = mount("--system", dev, "--diff", diff, "--no-bg-update")
    assert (m / "system.img").stat().st_size == os.path.getsize(dev)
    with pytest.raises(OSError) as excinfo:
        open(m / "system.img", "r+b")
    assert excinfo.value.errno == errno.EROFS


@pytest.mark.parametrize("change", ["none", "all"])
def test_empty_and_full_diffs(tmp_path, mount, change):
    old = tmp_path / "old.raw"
    old.write_bytes(os.urandom(8 << 20))
    new = tmp_path / "new.raw"
    new.write_bytes(old.read_bytes() if change == "none" else os.urandom(8 << 20))
    diff = tmp_path / "diff.img"
    fusesnap("diff", old, new, "-o", diff, "--quiet")
    m = mount("--system", old, "--diff", diff)
    assert sha256_of(m / "system.img") == sha256_of(new)
    status = wait_for(lambda: (s := system_status(m))["state"] == "done" and s)
    assert status["total"] == (0 if change == "none" else (8 << 20) // 4096)
    fusesnap("umount", m.mountpoint)
    assert sha256_of(old) == sha256_of(new)


def test_a_corrupt_chunk_fails_that_read_only(tmp_path, mount):
    old = tmp_path / "old.raw"
    old.write_bytes(bytes(4 << 20))
    new = tmp_path / "new.raw"
    new.write_bytes(os.urandom(4 << 20))
    diff = tmp_path / "diff.img"
    fusesnap("diff", old, new, "-o", diff, "--quiet", "--chunk-blocks", "16")
    with open(diff, "r+b") as f:  # garble the middle of the first chunk
        f.seek(64 + 1000)
        f.write(b"\xaa" * 64)
    m = mount("--system", old, "--diff", diff)
    with open(m / "system.img", "rb") as image:
        with pytest.raises(OSError) as excinfo:
            image.read(4096)
        assert excinfo.value.errno == errno.EIO
        image.seek(1 << 20)
        assert image.read(4096) == new.read_bytes()[1 << 20:(1 << 20) + 4096]
    status = wait_for(lambda: (s := system_status(m))["state"] == "error" and s)
    assert "chunk 0" in status["error"]
    assert old.read_bytes()[:65536] == bytes(65536), "no half-merged data from a bad chunk"


def test_a_bad_diff_fails_the_mount_naming_the_rule(tmp_path):
    dev = tmp_path / "dev.raw"
    dev.write_bytes(bytes(1 << 20))
    diff = tmp_path / "diff.img"
    fusesnap("diff", dev, dev, "-o", diff, "--quiet")
    data = bytearray(diff.read_bytes())
    data[8] = 7  # version
    diff.write_bytes(data)
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", "--system", dev, "--diff", diff, check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "version" in result.stderr


def test_a_diff_for_a_bigger_device_is_refused(tmp_path):
    small, big = tmp_path / "small.raw", tmp_path / "big.raw"
    small.write_bytes(bytes(1 << 20))
    big.write_bytes(bytes(1 << 20) + os.urandom(1 << 20))
    old_big = tmp_path / "oldbig.raw"
    old_big.write_bytes(bytes(2 << 20))
    diff = tmp_path / "diff.img"
    fusesnap("diff", old_big, big, "-o", diff, "--quiet")
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", "--system", small, "--diff", diff, check=False)
    assert result.returncode == 2 and "beyond the end of the device" in result.stderr


def test_progress_of_another_diff_is_refused(tmp_path, mount):
    """A device half-merged with one diff is never served through another."""
    old = tmp_path / "old.raw"
    old.write_bytes(bytes(8 << 20))
    new1, new2 = tmp_path / "new1.raw", tmp_path / "new2.raw"
    new1.write_bytes(os.urandom(8 << 20))
    new2.write_bytes(os.urandom(8 << 20))
    diff = tmp_path / "diff.img"
    fusesnap("diff", old, new1, "-o", diff, "--quiet", "--chunk-blocks", "16")
    m = mount("--system", old, "--diff", diff, "--merge-rate", "1")
    wait_for(lambda: os.path.exists(str(diff) + ".progress"), timeout=30)
    fusesnap("umount", m.mountpoint)
    fusesnap("diff", tmp_path / "new1.raw", new2, "-o", diff, "--quiet")  # same name, other diff
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", "--system", old, "--diff", diff, check=False)
    assert result.returncode == 2 and "half-updated" in result.stderr


def test_progress_is_checked_against_the_device(pair, device, mount):
    """A device restored to OLD behind a finished merge's back is noticed, not misread."""
    old, _, _, _ = pair
    dev, diff = device
    m = mount("--system", dev, "--diff", diff)
    wait_for(lambda: system_status(m)["state"] == "done")
    fusesnap("umount", m.mountpoint)
    copy_of(old, dev)
    (dev.parent / "mnt").mkdir()
    result = fusesnap("mount", dev.parent / "mnt", "--system", dev, "--diff", diff, check=False)
    assert result.returncode == 2 and "not on the device" in result.stderr


def test_relative_diff_path_resumes(pair, device, mount, tmp_path, monkeypatch):
    dev, diff = device
    monkeypatch.chdir(tmp_path)
    m = mount("--system", dev.name, "--diff", diff.name, "--merge-rate", "0.25")
    wait_for(lambda: os.path.exists(str(diff) + ".progress"), timeout=30)
    fusesnap("umount", m.mountpoint)
    m = mount("--system", dev.name, "--diff", diff.name)
    assert system_status(m)["merged"] > 0
