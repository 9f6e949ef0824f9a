"""bow.img: backup-on-write through real mounts, loop devices and ext4 -- checkpoint,
a workload, restore; a server crash in the middle; commit; a full disk; unaligned
I/O; the commands' errors."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil

import pytest

from bow_helpers import (BLOCK, assert_restored_to, checkpoint_frozen, churn, discard, file_hashes,
                         make_filled_ext4, mounted_again, opened_image)
from harness import fusesnap, loop_device, mounted_dir, run, sha256_of, sparse_file

pytestmark = pytest.mark.mount


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from the test's directory, so device and map paths are relative, as users give them."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def ext4_device(in_tmp):
    make_filled_ext4(in_tmp / "dev.img", 64, files=40)
    return in_tmp / "dev.img"


def bow_status(m) -> dict:
    return m.status()["bow.img"]


def mount_random_device(mount, directory, rng, *options):
    """bow.img over an 8 MiB device of random bytes (dev.img, map dev.map)."""
    (directory / "dev.img").write_bytes(rng.randbytes(8 << 20))
    return mount("--bow", "dev.img", "--bow-map", "dev.map", *options)


def checkpoint_with_free(m, fd, offset, length):
    """Discard [offset, offset + length) of bow.img (room for backups), then checkpoint."""
    discard(fd, offset, length)
    fusesnap("bow", "checkpoint", m.mountpoint)


def test_checkpoint_workload_then_restore_gives_the_checkpoint(mount, ext4_device, in_tmp):
    m = mount("--bow", "dev.img", "--bow-map", "dev.map", "--bow-low-space", "1M")
    assert m.status_text() == "bow.img: bow trim 0 0 0 0\n"
    with loop_device(m / "bow.img") as device, mounted_dir(device, in_tmp / "fs") as root:
        hashes = file_hashes(root)
        checkpoint_frozen(root, m.mountpoint, in_tmp / "checkpoint.img")
        status = bow_status(m)
        assert status["state"] == "checkpoint" and status["log_entries"] == 1
        churn(root, random.Random(1), 1400)
        os.sync()
    status = bow_status(m)
    assert status["sequence"] >= 3, f"the log should have rolled over several times: {status}"
    assert m.status_text() == (f"bow.img: bow checkpoint {status['free']} {status['backed_up']} "
                               f"{status['log_entries']} {status['sequence']}\n")
    fusesnap("umount", m.mountpoint)
    restored = fusesnap("bow", "restore", "dev.img", "--bow-map", "dev.map")
    assert "restored to its checkpoint" in restored.stdout
    assert not (in_tmp / "dev.map").exists()
    assert_restored_to(in_tmp / "dev.img", in_tmp / "checkpoint.img", hashes, in_tmp)


def test_a_server_crash_mid_workload_loses_nothing_and_restore_still_works(mount, ext4_device, in_tmp):
    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    rng = random.Random(2)
    with loop_device(m / "bow.img") as device:
        root = in_tmp / "fs"
        root.mkdir()
        run(["mount", device, str(root)])
        try:
            hashes = file_hashes(root)
            checkpoint_frozen(root, m.mountpoint, in_tmp / "checkpoint.img")
            churn(root, rng, 500)
            os.sync()
            acknowledged = file_hashes(root)
            assert bow_status(m)["staged"] > 0, "first writes should have been staged"
            m.kill_server()
        finally:
            run(["umount", str(root)], check=False)  # the device is gone: errors are expected
    fusesnap("umount", m.mountpoint)  # removes the dead mount

    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    assert bow_status(m)["state"] == "checkpoint"
    with loop_device(m / "bow.img") as device, mounted_dir(device, in_tmp / "fs2") as root:
        assert file_hashes(root) == acknowledged  # every synced write is there
        churn(root, rng, 500)
        os.sync()
    assert bow_status(m)["sequence"] >= 2
    fusesnap("umount", m.mountpoint)
    fusesnap("bow", "restore", "dev.img", "--bow-map", "dev.map")
    assert_restored_to(in_tmp / "dev.img", in_tmp / "checkpoint.img", hashes, in_tmp)


def test_commit_keeps_the_changes_and_a_remount_starts_in_trim_state(mount, ext4_device, in_tmp):
    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    with loop_device(m / "bow.img") as device, mounted_dir(device, in_tmp / "fs") as root:
        checkpoint_frozen(root, m.mountpoint, in_tmp / "checkpoint.img")
        churn(root, random.Random(3), 300)
        (root / "after-checkpoint").write_bytes(b"kept")
        os.sync()
        fusesnap("bow", "commit", m.mountpoint)
        assert bow_status(m)["state"] == "committed"
        (root / "after-commit").write_bytes(b"also kept")
        latest = file_hashes(root)
    image_hash = sha256_of(m / "bow.img")
    fusesnap("umount", m.mountpoint)
    assert sha256_of(in_tmp / "dev.img") == image_hash  # the device is what bow.img showed
    with open(in_tmp / "dev.img", "rb") as dev:
        assert dev.read(4) != b"BOW\0"  # its own block 0 is back
    run(["e2fsck", "-fn", str(in_tmp / "dev.img")])
    with mounted_again(str(in_tmp / "dev.img"), in_tmp / "fs3", "-o", "ro,loop") as root:
        assert file_hashes(root) == latest
    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    assert bow_status(m)["state"] == "trim"
    assert fusesnap("bow", "restore", "dev.img", "--bow-map", "dev.map", check=False).returncode == 1


def test_forward_steps_only_and_clear_errors(mount, in_tmp):
    sparse_file(in_tmp / "dev.img", 16 << 20)
    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    result = fusesnap("bow", "commit", m.mountpoint, check=False)
    assert result.returncode == 1 and "trim state" in result.stderr and len(result.stderr.splitlines()) == 1
    result = fusesnap("bow", "checkpoint", m.mountpoint, check=False)
    assert result.returncode == 1 and "two free blocks" in result.stderr
    assert bow_status(m)["state"] == "trim"
    with open(m / "bow.img", "r+b") as image:
        discard(image.fileno(), 1 << 20, 1 << 20)
    fusesnap("bow", "checkpoint", m.mountpoint)
    result = fusesnap("bow", "checkpoint", m.mountpoint, check=False)
    assert result.returncode == 1 and "checkpoint state" in result.stderr
    fusesnap("bow", "commit", m.mountpoint)
    for action in ("checkpoint", "commit"):
        assert fusesnap("bow", action, m.mountpoint, check=False).returncode == 1
    assert bow_status(m)["state"] == "committed"


def test_a_full_disk_fails_the_write_with_enospc_and_keeps_the_checkpoint(mount, in_tmp):
    rng = random.Random(4)
    m = mount_random_device(mount, in_tmp, rng, "--bow-low-space", "1M")
    with opened_image(m) as fd:
        checkpoint_with_free(m, fd, 6 << 20, 64 << 10)  # 16 free blocks
        checkpoint = os.pread(fd, 8 << 20, 0)
        assert bow_status(m)["low_space"] and "low-space" in m.status_text()
        written = {}
        with pytest.raises(OSError) as excinfo:
            for block in range(1, 64):
                data = rng.randbytes(BLOCK)
                os.pwrite(fd, data, block * BLOCK)
                written[block] = data
        assert excinfo.value.errno == errno.ENOSPC
        assert 8 <= len(written) < 16
        os.fsync(fd)
        for block, data in written.items():  # nothing written before is lost
            assert os.pread(fd, BLOCK, block * BLOCK) == data
    fusesnap("umount", m.mountpoint)
    fusesnap("bow", "restore", "dev.img", "--bow-map", "dev.map")
    restored = (in_tmp / "dev.img").read_bytes()
    free = range(6 << 20, (6 << 20) + (64 << 10))
    assert restored[:free.start] == checkpoint[:free.start]
    assert restored[free.stop:] == checkpoint[free.stop:]


@pytest.mark.parametrize("block_size", ["512", "4096"])
def test_unaligned_and_512_byte_io_reads_back_like_a_plain_file(mount, in_tmp, block_size):
    rng = random.Random(5)
    size, used = 8 << 20, 4 << 20
    model = bytearray(rng.randbytes(size))
    (in_tmp / "dev.img").write_bytes(model)
    checkpoint = None
    m = mount("--bow", "dev.img", "--bow-map", "dev.map", "--bow-block-size", block_size)
    with opened_image(m) as fd:
        discard(fd, used, size - used)  # room for backups
        model[used:] = bytes(size - used)
        for step in range(400):
            if step == 150:
                fusesnap("bow", "checkpoint", m.mountpoint)
                checkpoint = bytes(model)
            offset = rng.choice([rng.randrange(used - 10000), rng.randrange(used // 512 - 20) * 512,
                                 rng.randrange(8000)])
            length = rng.choice([1, 100, 512, 4096, 5000, 9000, rng.randrange(1, 20000)])
            if rng.random() < 0.15:
                discard(fd, offset, length)
                model[offset:offset + length] = bytes(length)
            else:
                data = rng.randbytes(length)
                os.pwrite(fd, data, offset)
                model[offset:offset + length] = data
            if step % 50 == 0:
                assert os.pread(fd, size, 0) == model, f"step {step}"
        assert os.pread(fd, size, 0) == model
    fusesnap("umount", m.mountpoint)
    fusesnap("bow", "restore", "dev.img", "--bow-map", "dev.map")
    restored = (in_tmp / "dev.img").read_bytes()
    # Blocks discarded before the checkpoint are free (they may differ); all others are back.
    bs = int(block_size)
    free = {i for i in range(0, size, bs) if checkpoint[i:i + bs] == bytes(bs)}
    for i in range(0, size, bs):
        if i not in free:
            assert restored[i:i + bs] == checkpoint[i:i + bs], f"block at {i}"


def test_ext4_on_a_512_byte_sector_loop_device(mount, loop, in_tmp):
    """A loop device with 512-byte sectors and ext4 with 1 KiB blocks: unaligned to
    bow.img's 4 KiB blocks, read-modify-written."""
    sparse_file(in_tmp / "dev.img", 32 << 20)
    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    device = loop(m / "bow.img", direct_io=False)
    run(["mkfs.ext4", "-q", "-F", "-b", "1024", device])
    with mounted_dir(device, in_tmp / "fs") as root:
        run(["fstrim", str(root)])
        fusesnap("bow", "checkpoint", m.mountpoint)
        from harness import fill_files
        hashes = fill_files(root, 30, seed=6, size=100 << 10)
        os.sync()
    run(["e2fsck", "-fn", device])
    with mounted_again(device, in_tmp / "fs", "-o", "ro") as root:
        assert {name: sha for name, sha in file_hashes(root).items() if name in hashes} == hashes


def test_bow_mounts_beside_the_other_images(mount, in_tmp):
    from harness import make_update_pair
    old, new, _ = make_update_pair(in_tmp)
    shutil.copyfile(old, in_tmp / "system.img")
    fusesnap("diff", old, new, "-o", in_tmp / "diff.img", "--quiet")
    sparse_file(in_tmp / "linear.raw", 8 << 20)
    sparse_file(in_tmp / "dev.img", 8 << 20)
    m = mount("--system", "system.img", "--diff", "diff.img", "--linear", "linear.raw",
              "--bow", "dev.img", "--bow-map", "dev.map")
    assert sorted(os.listdir(m.mountpoint)) == [".status", ".status.json", "bow.img", "linear.img",
                                                "system.img"]
    status = m.status()
    assert status["bow.img"]["target"] == "bow" and status["system.img"]["target"] == "update"
    assert status["bow.img"]["device"] == str(in_tmp / "dev.img")


def test_restore_and_inspect_refuse_a_mounted_device_and_a_device_without_a_log(mount, in_tmp):
    sparse_file(in_tmp / "dev.img", 8 << 20)
    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    for command in (["restore", "dev.img"], ["inspect", "dev.img"]):
        result = fusesnap("bow", *command, check=False)
        assert result.returncode == 1 and "in use by a fusesnap mount" in result.stderr
    fusesnap("umount", m.mountpoint)
    before = sha256_of(in_tmp / "dev.img")
    for command in (["restore", "dev.img"], ["restore", "dev.img", "--dry-run"], ["inspect", "dev.img"]):
        result = fusesnap("bow", *command, check=False)
        assert result.returncode == 1 and "no backup-on-write log" in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert sha256_of(in_tmp / "dev.img") == before
    result = fusesnap("bow", "restore", "missing.img", check=False)
    assert result.returncode == 2 and "no such device" in result.stderr


def test_inspect_dry_run_and_a_corrupt_log_via_the_cli(mount, in_tmp):
    rng = random.Random(7)
    m = mount_random_device(mount, in_tmp, rng)
    with opened_image(m) as fd:
        checkpoint_with_free(m, fd, 4 << 20, 2 << 20)
        for block in range(1, 400, 3):
            os.pwrite(fd, rng.randbytes(BLOCK), block * BLOCK)
        os.fsync(fd)
    fusesnap("umount", m.mountpoint)
    info = json.loads(fusesnap("bow", "inspect", "dev.img", "--json").stdout)
    assert info["valid"] and info["magic"] == "BOW" and info["sequence"] >= 0 and info["entries"] == 134
    before = sha256_of(in_tmp / "dev.img")
    assert "would restore 134 backups" in fusesnap("bow", "restore", "dev.img", "--dry-run").stdout
    assert sha256_of(in_tmp / "dev.img") == before
    # Corrupt the checksum of the newest entry: refused, nothing written, exit 1.
    with open(in_tmp / "dev.img", "r+b") as dev:
        count = int.from_bytes(dev.read(16)[12:16], "little")
        dev.seek(28 + 24 * (count - 1) + 20)
        dev.write(b"\xde\xad\xbe\xef")
    corrupted = sha256_of(in_tmp / "dev.img")
    result = fusesnap("bow", "restore", "dev.img", check=False)
    assert result.returncode == 1 and "checksum mismatch" in result.stderr and "nothing written" in result.stderr
    assert sha256_of(in_tmp / "dev.img") == corrupted
    result = fusesnap("bow", "inspect", "dev.img", check=False)
    assert result.returncode == 1 and "checksum mismatch" in result.stdout


def test_low_space_commit_commits_by_itself(mount, in_tmp):
    rng = random.Random(8)
    m = mount_random_device(mount, in_tmp, rng, "--bow-low-space", "200K", "--bow-on-low-space", "commit")
    with opened_image(m) as fd:
        checkpoint_with_free(m, fd, 4 << 20, 1 << 20)
        for block in range(1, 300):
            os.pwrite(fd, rng.randbytes(BLOCK), block * BLOCK)  # never ENOSPC: it commits first
    assert bow_status(m)["state"] == "committed"


def test_default_map_location_and_a_block_device_as_the_device(mount, loop, in_tmp):
    sparse_file(in_tmp / "dev.img", 16 << 20)
    backing = loop(in_tmp / "dev.img")
    m = mount("--bow", backing)
    map_path = bow_status(m)["map"]
    try:
        assert map_path.startswith("/var/lib/fusesnap/bow/") and os.path.exists(map_path)
        with open(m / "bow.img", "r+b") as image:
            discard(image.fileno(), 1 << 20, 1 << 20)
            fusesnap("bow", "checkpoint", m.mountpoint)
            image.seek(8192)
            image.write(b"x" * 4096)
        fusesnap("umount", m.mountpoint)
        fusesnap("bow", "restore", backing)
        assert not os.path.exists(map_path)
        with open(backing, "rb") as dev:
            assert dev.read(16384) == bytes(16384)
    finally:
        if os.path.exists(map_path):
            os.unlink(map_path)


def test_a_server_crash_in_trim_and_committed_state_resumes_there(mount, in_tmp):
    rng = random.Random(9)
    m = mount_random_device(mount, in_tmp, rng)
    with opened_image(m) as fd:
        discard(fd, 2 << 20, 3 << 20)
        data = rng.randbytes(3 * BLOCK)
        os.pwrite(fd, data, (3 << 20) + BLOCK)  # into free space: in use again
    free = bow_status(m)["free"]
    assert free == (3 << 20) - 3 * BLOCK
    m.kill_server()
    fusesnap("umount", m.mountpoint)
    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    assert bow_status(m)["state"] == "trim" and bow_status(m)["free"] == free
    with opened_image(m) as fd:
        assert os.pread(fd, 3 * BLOCK, (3 << 20) + BLOCK) == data
        assert os.pread(fd, BLOCK, 2 << 20) == bytes(BLOCK)  # discarded: zeros
        fusesnap("bow", "checkpoint", m.mountpoint)
        os.pwrite(fd, b"after checkpoint".ljust(BLOCK), 0)
        fusesnap("bow", "commit", m.mountpoint)
        os.pwrite(fd, b"after commit".ljust(BLOCK), BLOCK)
    m.kill_server()
    fusesnap("umount", m.mountpoint)
    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    assert bow_status(m)["state"] == "trim"
    with opened_image(m) as fd:
        assert os.pread(fd, BLOCK, 0) == b"after checkpoint".ljust(BLOCK)
        assert os.pread(fd, BLOCK, BLOCK) == b"after commit".ljust(BLOCK)
        assert os.pread(fd, 3 * BLOCK, (3 << 20) + BLOCK) == data


def test_a_crash_between_commit_and_its_journal_record_is_recognised(mount, in_tmp):
    rng = random.Random(10)
    m = mount_random_device(mount, in_tmp, rng)
    with opened_image(m) as fd:
        checkpoint_with_free(m, fd, 4 << 20, 1 << 20)
        latest = rng.randbytes(8 * BLOCK)
        os.pwrite(fd, latest, 0)
        os.fsync(fd)
    m.kill_server()
    fusesnap("umount", m.mountpoint)
    # What commit writes before it records the commit: the live block 0 back at 0.
    header = (in_tmp / "dev.img").read_bytes()[:28]
    live = int.from_bytes(header[20:28], "little") * 512
    with open(in_tmp / "dev.img", "r+b") as dev:
        dev.seek(live)
        block0 = dev.read(BLOCK)
        dev.seek(0)
        dev.write(block0)
    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    assert bow_status(m)["state"] == "trim"
    with opened_image(m) as fd:
        assert os.pread(fd, 8 * BLOCK, 0) == latest
    fusesnap("umount", m.mountpoint)
    # A restored device is not taken for a committed one.
    m = mount("--bow", "dev.img", "--bow-map", "dev.map")
    with opened_image(m) as fd:
        checkpoint_with_free(m, fd, 4 << 20, 1 << 20)
        os.pwrite(fd, rng.randbytes(BLOCK), 0)
    fusesnap("umount", m.mountpoint)
    fusesnap("bow", "restore", "dev.img")  # the default map path: dev.map stays behind
    (in_tmp / "mnt9").mkdir()
    result = fusesnap("mount", in_tmp / "mnt9", "--bow", "dev.img", "--bow-map", "dev.map", check=False)
    if result.returncode == 0:
        fusesnap("umount", in_tmp / "mnt9")
    assert result.returncode == 1 and "restored or replaced" in result.stderr
