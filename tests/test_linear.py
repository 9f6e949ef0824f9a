"""linear.img: a read-write pass-through of a device, through real loop devices and ext4."""

from __future__ import annotations

import errno
import os

import pytest

from harness import fill_files, mounted_dir, run, sha256_of, sparse_file

pytestmark = pytest.mark.mount


@pytest.fixture
def backing(tmp_path):
    return sparse_file(tmp_path / "linear.raw", 256 << 20)


def test_image_file_mirrors_the_device(mount, backing):
    m = mount("--linear", backing)
    image = m / "linear.img"
    st = image.stat()
    assert st.st_size == 256 << 20
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    assert sorted(os.listdir(m.mountpoint)) == [".status", ".status.json", "linear.img"]
    with open(image, "r+b") as f:
        f.seek(12345)
        f.write(b"written through fusesnap")
        f.flush()
        os.fsync(f.fileno())
    assert backing.read_bytes()[12345:12345 + 24] == b"written through fusesnap"


def test_status_is_current_and_machine_readable(mount, backing):
    m = mount("--linear", backing)
    assert m.status_text() == f"linear.img: linear {256 << 20} {backing}\n"
    assert m.status() == {"linear.img": {"target": "linear", "size": 256 << 20,
                                         "device": str(backing)}}


def test_o_direct_open_works(mount, backing):
    m = mount("--linear", backing)
    fd = os.open(m / "linear.img", os.O_RDWR | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        buf.write(b"x" * 4096)
        assert os.pwritev(fd, [buf], 8192) == 4096
        assert os.preadv(fd, [buf], 8192) == 4096
    finally:
        os.close(fd)


def test_ext4_on_a_loop_device_end_to_end(mount, loop, backing, tmp_path):
    """mkfs, mount, write files, fstrim, unmount, fsck clean, contents verified."""
    m = mount("--linear", backing)
    device = loop(m / "linear.img", direct_io=True)
    run(["mkfs.ext4", "-q", "-F", device])
    with mounted_dir(device, tmp_path / "ext4") as root:
        hashes = fill_files(root, 40, seed=1, size=256 << 10)
        (root / "removed").write_bytes(os.urandom(32 << 20))
        os.sync()
        (root / "removed").unlink()
        trimmed = run(["fstrim", "-v", str(root)]).stdout
        assert "trimmed" in trimmed
    assert run(["e2fsck", "-fn", device]).returncode == 0
    with mounted_dir(device, tmp_path / "ext4", "-o", "ro") as root:
        for name, digest in hashes.items():
            assert sha256_of(root / name) == digest
    # fstrim reached the backing file as hole punches: it is sparse now.
    assert os.stat(backing).st_blocks * 512 < 64 << 20


def test_discard_reads_back_as_zeros(mount, backing):
    backing.write_bytes(b"\xff" * (256 << 20))
    m = mount("--linear", backing)
    fd = os.open(m / "linear.img", os.O_RDWR)
    try:
        from fusesnap.devices import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20)
        assert os.pread(fd, 1 << 20, 1 << 20) == bytes(1 << 20)
        assert os.pread(fd, 4096, 2 << 20) == b"\xff" * 4096
    finally:
        os.close(fd)


def test_read_only_device_gives_a_read_only_image(mount, loop, backing):
    read_only_device = loop(backing, read_only=True)  # detached after the mount is gone
    m = mount("--linear", read_only_device)
    with pytest.raises(OSError) as excinfo:
        open(m / "linear.img", "r+b")
    assert excinfo.value.errno == errno.EROFS
    assert (m / "linear.img").read_bytes()[:4096] == bytes(4096)


def test_acknowledged_writes_survive_a_server_crash(mount, loop, backing):
    """What a flush (fsync) acknowledged is on the device even if the server is killed -9."""
    m = mount("--linear", backing)
    device = loop(m / "linear.img", direct_io=True)
    payload = os.urandom(1 << 20)
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, payload, 8 << 20)
        os.fsync(fd)  # the loop device sends a flush: fsync on linear.img
    finally:
        os.close(fd)
    m.kill_server()
    with open(backing, "rb") as f:
        f.seek(8 << 20)
        assert f.read(1 << 20) == payload
