"""Snapshots: origin.img, snapshot.img and snapshot-<N>.img over one shared store, as a
user drives them (the scenarios of blksnap's own test suite)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import threading

import pytest

from fusesnap.formats import snapshot_store as fmt
from harness import (FUSESNAP, fill_files, fusesnap, loop_device, mounted_dir, run, small_tmpfs,
                     sparse_file)

pytestmark = pytest.mark.mount

MiB = 1 << 20
CHUNK = 256 << 10
DEVICE_SIZE = 64 * MiB


@pytest.fixture
def device(tmp_path):
    return sparse_file(tmp_path / "sdb1.raw", DEVICE_SIZE)


@pytest.fixture
def snap_mount(mount, device, tmp_path):
    """mount(*extra) -> a mount with --snapshot DEVICE --store tmp/sdb1.store."""
    def _mount(*extra):
        return mount("--snapshot", device, "--store", tmp_path / "sdb1.store", *extra)
    return _mount


def snapshot_cli(m, *args, check=True) -> subprocess.CompletedProcess:
    """`fusesnap snapshot ...` as a user types it: from the mount's parent directory,
    with a relative mountpoint."""
    return run([*FUSESNAP, "snapshot", args[0], m.mountpoint.name, *map(str, args[1:])],
               cwd=m.mountpoint.parent, check=check)


def take(m, *extra) -> str:
    return snapshot_cli(m, "take", *extra).stdout.strip()


def chunk_sums(path, size=DEVICE_SIZE) -> list[str]:
    with open(path, "rb") as f:
        return [hashlib.sha256(f.read(CHUNK)).hexdigest() for _ in range(size // CHUNK)]


def pwrite(path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def pread(path, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def file_sums(root) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.is_file()}


# -- the images ---------------------------------------------------------------------

def test_snapshot_holds_the_files_of_before_and_mounts_cleanly(snap_mount, loop, stack, tmp_path):
    """ext4 on origin.img, files, take (freezing it), more files: the snapshot holds
    exactly the files of before (mounted read-only, no journal replay), the origin all."""
    m = snap_mount()
    origin_dev = loop(m / "origin.img")
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", origin_dev])
    root = stack.enter_context(mounted_dir(origin_dev, tmp_path / "srv"))
    before = fill_files(root, 40, seed=1)
    snapshot_id = take(m)
    generation, number = snapshot_id.split(":")
    assert number == "1" and generation == m.status()["origin.img"]["generation"]
    assert sorted(os.listdir(m.mountpoint)) == [".status", ".status.json", "origin.img",
                                                 "snapshot-1.img", "snapshot.img"]
    after = fill_files(root, 60, seed=2)  # rewrites file0000..file0039 and adds 20
    run(["sync"])
    snap_dev = loop(m / "snapshot.img", read_only=True)
    run(["e2fsck", "-fn", snap_dev])
    # A read-only device cannot replay a journal: this mount works only if the take
    # froze the filesystem.
    with mounted_dir(snap_dev, tmp_path / "snap", "-o", "ro") as snap_root:
        assert file_sums(snap_root) == before
    assert file_sums(root) == after
    assert m.status_text().splitlines()[1].startswith("snapshot-1.img: snapshot ")
    assert m.status_text().splitlines()[1].endswith(f" {DEVICE_SIZE} active")


def test_writable_snapshot_writes_to_the_store_only(snap_mount, loop, tmp_path, device):
    m = snap_mount()
    origin_dev = loop(m / "origin.img")
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", origin_dev])
    with mounted_dir(origin_dev, tmp_path / "srv") as root:
        fill_files(root, 10, seed=1)
    take(m)
    origin_before = chunk_sums(m / "origin.img")
    with loop_device(m / "snapshot-1.img") as snap_dev:
        with mounted_dir(snap_dev, tmp_path / "snap") as snap_root:
            written = fill_files(snap_root, 20, seed=5)
        with mounted_dir(snap_dev, tmp_path / "snap") as snap_root:  # re-mounted: they persist
            assert file_sums(snap_root).items() >= written.items()
        run(["e2fsck", "-fn", snap_dev])
    assert chunk_sums(m / "origin.img") == origin_before
    assert chunk_sums(device) == origin_before


def test_five_snapshots_each_equal_the_origin_at_its_take(snap_mount):
    m = snap_mount()
    rng = random.Random(7)
    pwrite(m / "origin.img", rng.randbytes(DEVICE_SIZE // 2), 0)
    at_take = {}
    for number in range(1, 6):
        take(m)
        at_take[number] = chunk_sums(m / "origin.img")
        # snapshot.img now means the new snapshot, though the kernel had it cached
        assert chunk_sums(m / "snapshot.img") == at_take[number]
        for _ in range(6):
            pwrite(m / "origin.img", rng.randbytes(rng.randrange(1, 3 * CHUNK)),
                   rng.randrange(DEVICE_SIZE - 3 * CHUNK))
    for number, sums in at_take.items():
        assert chunk_sums(m / f"snapshot-{number}.img") == sums, number
    assert chunk_sums(m / "snapshot.img") == at_take[5]


def test_one_copy_per_chunk_shared_by_every_snapshot_that_needs_it(snap_mount):
    m = snap_mount()
    for _ in range(5):
        take(m)
    store_before = m.status()["origin.img"]["store_bytes"]
    pwrite(m / "origin.img", b"x" * CHUNK, 10 * CHUNK)  # after the fifth take: one copy for all five
    status = m.status()
    assert status["origin.img"]["store_bytes"] == store_before + CHUNK
    assert [status[f"snapshot-{n}.img"]["chunks_stored"] for n in range(1, 6)] == [1] * 5
    pwrite(m / "origin.img", b"y" * CHUNK, 10 * CHUNK)  # copied already: nothing more
    assert m.status()["origin.img"]["store_bytes"] == store_before + CHUNK
    assert pread(m / "snapshot-3.img", CHUNK, 10 * CHUNK) == bytes(CHUNK)


def test_writes_straddling_chunks_at_odd_offsets(snap_mount):
    m = snap_mount("--chunk-size", "64K")
    chunk = 64 << 10
    rng = random.Random(3)
    base = rng.randbytes(8 * MiB)
    pwrite(m / "origin.img", base, 0)
    take(m)
    origin, snapshot = bytearray(base), bytearray(base)
    for offset in (chunk - 1, 3 * chunk + 4097, 5 * MiB - 12345, 2 * MiB + 511):
        data = rng.randbytes(MiB)
        pwrite(m / "origin.img", data, offset)
        origin[offset:offset + MiB] = data
        data = rng.randbytes(MiB)
        pwrite(m / "snapshot-1.img", data, offset + 777)
        snapshot[offset + 777:offset + 777 + MiB] = data
    assert pread(m / "origin.img", 8 * MiB, 0) == origin
    assert pread(m / "snapshot-1.img", 8 * MiB, 0) == snapshot
    assert pread(m / "snapshot-1.img", 3 * chunk + 5, chunk - 3) == snapshot[chunk - 3:4 * chunk + 2]


def test_discards_on_origin_keep_the_snapshot(snap_mount, loop):
    m = snap_mount()
    data = random.Random(4).randbytes(4 * MiB)
    pwrite(m / "origin.img", data, 0)
    take(m)
    run(["blkdiscard", "--offset", str(MiB), "--length", str(2 * MiB), loop(m / "origin.img")])
    assert pread(m / "origin.img", 2 * MiB, MiB) == bytes(2 * MiB)
    assert pread(m / "snapshot.img", 4 * MiB, 0) == data


# -- overflow, release -----------------------------------------------------------------

def test_overflow_corrupts_the_snapshots_never_the_origin(snap_mount, tmp_path):
    m = snap_mount("--store-limit", "3M")  # the table and a few chunks
    take(m)
    take(m)
    rng = random.Random(9)
    written = rng.randbytes(16 * MiB)
    for offset in range(0, len(written), MiB):
        pwrite(m / "origin.img", written[offset:offset + MiB], offset)  # every write succeeds
    assert pread(m / "origin.img", len(written), 0) == written
    status = m.status()
    for name in ("snapshot-1.img", "snapshot-2.img"):
        assert status[name]["state"] == "corrupted"
        assert "overflow" in status[name]["reason"]
        with pytest.raises(OSError) as excinfo:
            pread(m / name, 4096, 0)
        assert excinfo.value.errno == errno.EIO
    assert f" {3 * MiB} corrupted\n" in m.status_text()


def test_low_space_warning_comes_before_overflow(snap_mount):
    m = snap_mount("--store-limit", "8M")
    take(m)
    origin = m.status()["origin.img"]
    slots = (origin["limit"] - origin["store_bytes"]) // CHUNK
    pwrite(m / "origin.img", b"z" * ((slots - 1) * CHUNK), 0)
    status = m.status()
    assert status["snapshot-1.img"]["state"] == "active"
    assert status["origin.img"]["warning"] == "low-space"
    assert m.status_text().splitlines()[0].endswith(" low-space")


def test_release_frees_the_store_and_the_file(snap_mount, tmp_path):
    m = snap_mount()
    take(m)
    pwrite(m / "origin.img", b"a" * (4 * MiB), 0)        # copies for snapshot 1 alone
    take(m)
    pwrite(m / "origin.img", b"b" * (4 * MiB), 8 * MiB)  # copies shared by 1 and 2
    store = tmp_path / "sdb1.store"
    allocated = store.stat().st_blocks
    snapshot_cli(m, "release", 1)
    # its own share was punched (a record or two may have taken a new table block)
    assert store.stat().st_blocks <= allocated - (4 * MiB - 16384) // 512
    assert sorted(os.listdir(m.mountpoint)) == [".status", ".status.json", "origin.img",
                                                 "snapshot-2.img", "snapshot.img"]
    assert pread(m / "snapshot.img", 4096, 8 * MiB) == bytes(4096)
    assert pread(m / "snapshot.img", 4096, 0) == b"a" * 4096
    snapshot_cli(m, "release")  # the oldest, now 2
    assert sorted(os.listdir(m.mountpoint)) == [".status", ".status.json", "origin.img"]
    assert m.status()["origin.img"]["store_bytes"] == store.stat().st_size  # the tail was cut
    assert snapshot_cli(m, "release", check=False).returncode == 1


def test_a_store_whose_writeback_fails_loses_its_snapshots_and_records_that(tmp_path, mount, device,
                                                                              loop, stack):
    """The store on a device whose writeback fails once the 2 MiB tmpfs under it is
    full: the take whose fsync reports it fails (exit 1) and leaves no snapshot, the
    snapshot before it is marked corrupted in .status and in the store's table (a
    re-mount still says so), and origin writes go on."""
    media = stack.enter_context(small_tmpfs(tmp_path / "tmpfs", "2m"))
    store = loop(sparse_file(media / "store.raw", 32 * MiB), direct_io=False)
    options = ("--snapshot", device, "--store", store, "--store-limit", "32M")
    m = mount(*options)
    take(m)
    pwrite(m / "origin.img", os.urandom(8 * MiB), 0)  # 8 MiB of copies for 2 MiB of room
    result = snapshot_cli(m, "take", "--no-freeze", check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "'snapshot take' failed" in result.stderr
    status = m.status()
    assert [name for name in status if name.startswith("snapshot")] == ["snapshot-1.img"]
    assert status["snapshot-1.img"]["state"] == "corrupted"
    assert status["origin.img"]["store_error"].startswith("store fsync failed")
    assert "could not be written" not in status["origin.img"]["store_error"]
    assert snapshot_cli(m, "take", "--no-freeze", check=False).returncode == 1  # until a re-mount
    pwrite(m / "origin.img", b"o" * MiB, 16 * MiB)
    assert pread(m / "origin.img", MiB, 16 * MiB) == b"o" * MiB
    fusesnap("umount", m.mountpoint)

    status = mount(*options).status()
    assert [name for name in status if name.startswith("snapshot")] == ["snapshot-1.img"]
    assert status["snapshot-1.img"]["state"] == "corrupted"
    assert status["snapshot-1.img"]["reason"] == fmt.REASONS[fmt.STORE_ERROR]


def test_release_while_a_snapshot_is_being_read(snap_mount):
    m = snap_mount()
    take(m)
    take(m)
    pwrite(m / "origin.img", b"c" * (2 * MiB), 0)
    errors = []
    fd = os.open(m / "snapshot-1.img", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == bytes(4096)
        stop = threading.Event()

        def reader():
            while not stop.is_set():
                try:
                    os.pread(fd, MiB, 0)
                except OSError as exc:
                    errors.append(exc.errno)
                    return

        thread = threading.Thread(target=reader)
        thread.start()
        snapshot_cli(m, "release", 1)
        thread.join(timeout=20)
        stop.set()
        assert not thread.is_alive()
        assert errors and errors[0] in (errno.EIO, errno.ENOENT)
    finally:
        os.close(fd)
    assert not (m / "snapshot-1.img").exists()
    assert pread(m / "snapshot-2.img", 4096, 0) == bytes(4096)  # other readers unharmed


# -- change-block tracking ---------------------------------------------------------------

def test_changes_cover_exactly_the_chunks_written_and_survive_a_restart(snap_mount, mount, device, tmp_path):
    m = snap_mount()
    first = take(m)
    pwrite(m / "origin.img", b"1" * 100, 3 * CHUNK + 10)
    pwrite(m / "origin.img", b"2" * (2 * CHUNK), 10 * CHUNK + CHUNK // 2)  # chunks 10-12
    second = take(m)
    pwrite(m / "snapshot-2.img", b"3" * 10, 20 * CHUNK)  # a write to the snapshot counts
    expected = [[3 * CHUNK, CHUNK], [10 * CHUNK, 3 * CHUNK]]
    answer = json.loads(snapshot_cli(m, "changes", "--since", first, "--json").stdout)
    assert answer["ranges"] == expected + [[20 * CHUNK, CHUNK]]
    assert snapshot_cli(m, "changes", "--since", second).stdout == f"{20 * CHUNK} {CHUNK}\n"
    stale = snapshot_cli(m, "changes", "--since", "0b5f7e1c-0000-4000-8000-000000000000:1", check=False)
    assert stale.returncode == 1 and "full backup" in stale.stderr
    fusesnap("umount", m.mountpoint)
    again = mount("--snapshot", device, "--store", tmp_path / "sdb1.store")
    answer = json.loads(snapshot_cli(again, "changes", "--since", first, "--json").stdout)
    assert answer["ranges"] == expected + [[20 * CHUNK, CHUNK]]


# -- concurrency, crashes ------------------------------------------------------------------

def test_fio_verify_on_origin_while_every_snapshot_is_checked(snap_mount):
    m = snap_mount()
    rng = random.Random(11)
    pwrite(m / "origin.img", rng.randbytes(16 * MiB), 0)
    sums = {}
    for number in (1, 2):
        take(m)
        sums[number] = chunk_sums(m / "origin.img")
        pwrite(m / "origin.img", rng.randbytes(2 * MiB), rng.randrange(14) * MiB)
    fio = subprocess.Popen(["fio", "--name=verify", f"--filename={m / 'origin.img'}", "--rw=randwrite",
                            "--bs=64k", "--size=32M", "--direct=1", "--ioengine=psync",
                            "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
                            "--output-format=terse"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rounds = 0
    while fio.poll() is None or rounds == 0:
        for number, expected in sums.items():
            assert chunk_sums(m / f"snapshot-{number}.img") == expected
        rounds += 1
    out, err = fio.communicate()
    assert fio.returncode == 0, err


def test_snapshots_survive_kill_9_with_every_acknowledged_write(snap_mount, mount, device, tmp_path):
    m = snap_mount()
    rng = random.Random(13)
    pwrite(m / "origin.img", rng.randbytes(8 * MiB), 0)
    take(m)
    at_take = chunk_sums(m / "origin.img")
    pwrite(m / "origin.img", rng.randbytes(3 * MiB), MiB + 5)  # no fsync: acknowledged only
    take(m)
    snap_write = rng.randbytes(MiB)
    pwrite(m / "snapshot-2.img", snap_write, 4 * MiB + 3)
    snap2 = pread(m / "snapshot-2.img", DEVICE_SIZE, 0)
    origin = pread(m / "origin.img", DEVICE_SIZE, 0)
    m.kill_server()
    fusesnap("umount", m.mountpoint)  # removes the dead mount
    again = mount("--snapshot", device, "--store", tmp_path / "sdb1.store")
    assert chunk_sums(again / "snapshot-1.img") == at_take
    assert pread(again / "snapshot-2.img", DEVICE_SIZE, 0) == snap2
    assert pread(again / "origin.img", DEVICE_SIZE, 0) == origin


# -- bad input ---------------------------------------------------------------------------

def test_a_store_on_the_device_itself_is_refused(tmp_path, loop):
    device = tmp_path / "sdb1.raw"
    sparse_file(device, DEVICE_SIZE)
    run(["mkfs.ext4", "-q", "-F", str(device)])
    (tmp_path / "mnt").mkdir()
    with mounted_dir(loop(device), tmp_path / "fs") as root:
        result = fusesnap("mount", tmp_path / "mnt", "--snapshot", device, "--store", root / "s.store",
                          "--log", tmp_path / "log", check=False)
    assert result.returncode == 2
    assert "on a filesystem on" in result.stderr and "Traceback" not in result.stderr


def test_a_store_of_another_device_is_refused(snap_mount, tmp_path):
    m = snap_mount()
    fusesnap("umount", m.mountpoint)
    other = sparse_file(tmp_path / "other.raw", 2 * DEVICE_SIZE)
    (tmp_path / "mnt9").mkdir()
    result = fusesnap("mount", tmp_path / "mnt9", "--snapshot", other, "--store", tmp_path / "sdb1.store",
                      "--log", tmp_path / "log9", check=False)
    assert result.returncode == 2 and "belongs to" in result.stderr
    result = fusesnap("mount", tmp_path / "mnt9", "--snapshot", other, "--log", tmp_path / "log9", check=False)
    assert result.returncode == 2 and "--store" in result.stderr
    not_a_store = tmp_path / "precious.img"
    not_a_store.write_bytes(b"\0" * 4096 + b"data that must survive")
    result = fusesnap("mount", tmp_path / "mnt9", "--snapshot", other, "--store", not_a_store,
                      "--log", tmp_path / "log9", check=False)
    assert result.returncode == 2 and "refusing to overwrite" in result.stderr
    assert not_a_store.read_bytes().endswith(b"data that must survive")


def test_the_readme_backup_full_then_incremental(snap_mount, tmp_path):
    """The README's nightly backup, its shell lines as written: the incremental
    backup equals the newest snapshot."""
    m = snap_mount()
    rng = random.Random(17)
    pwrite(m / "origin.img", rng.randbytes(8 * MiB), 0)
    script = f"""set -euo pipefail
        cd {tmp_path}
        fusesnap() {{ {" ".join(FUSESNAP)} "$@"; }}
        ID=$(fusesnap snapshot take {m.mountpoint.name})
        dd if={m.mountpoint.name}/snapshot.img of=full.img bs=4M status=none
        echo "$ID" > last-id
        python3 -c "import os; fd = os.open('{m / 'origin.img'}', os.O_WRONLY); \\
            [os.pwrite(fd, os.urandom(70000), o) for o in (5000, 3 << 20, 40 << 20)]"
        NEW=$(fusesnap snapshot take {m.mountpoint.name})
        fusesnap snapshot changes {m.mountpoint.name} --since "$(cat last-id)" |
            while read offset length; do
                dd if={m.mountpoint.name}/snapshot.img of=full.img bs=64K iflag=skip_bytes,count_bytes \\
                   oflag=seek_bytes conv=notrunc skip=$offset seek=$offset count=$length status=none
            done
        fusesnap snapshot release {m.mountpoint.name} "$(cat last-id)"
        echo "$NEW" > last-id
    """
    run(["bash", "-c", script])
    assert chunk_sums(tmp_path / "full.img") == chunk_sums(m / "snapshot.img")
    assert [s["number"] for s in json.loads(snapshot_cli(m, "list", "--json").stdout)["snapshots"]] == [2]


def test_a_block_device_as_dev(mount, tmp_path, loop):
    backing = sparse_file(tmp_path / "disk.raw", DEVICE_SIZE)
    device = loop(backing)
    m = mount("--snapshot", device, "--store", tmp_path / "disk.store")
    pwrite(m / "origin.img", b"before" * 1000, 0)
    take(m)
    pwrite(m / "origin.img", b"after!" * 1000, 0)
    assert pread(m / "snapshot.img", 6000, 0) == b"before" * 1000
    assert pread(device, 6000, 0) == b"after!" * 1000


def test_after_a_reboot_with_the_store_dirty_every_snapshot_is_reported_lost(snap_mount, mount, device,
                                                                              tmp_path):
    """A power cut is a kill -9 plus a lost page cache; the boot id tells them apart.
    Here the store's DIRTY record is given another boot's id, as after a reboot."""
    m = snap_mount()
    first = take(m)
    pwrite(m / "origin.img", b"x" * MiB, 0)  # not flushed: the store is dirty
    m.kill_server()
    fusesnap("umount", m.mountpoint)
    store = tmp_path / "sdb1.store"
    with open(store, "r+b") as f:
        pread_store = lambda size, offset: os.pread(f.fileno(), size, offset)  # noqa: E731
        sb = fmt.Superblock.unpack(pread_store(fmt.SUPERBLOCK_SIZE, 0))
        table = fmt.read_table(pread_store, sb)
        index = max(i for i, r in enumerate(table.records) if r.type == fmt.DIRTY)
        os.pwrite(f.fileno(), fmt.dirty_record("00000000-0000-4000-8000-000000000001").pack(table.header.epoch),
                  sb.region_offset(table.region) + fmt.HEADER_SIZE + index * fmt.RECORD_SIZE)
    again = mount("--snapshot", device, "--store", store)
    status = again.status()
    assert status["snapshot-1.img"]["state"] == "corrupted"
    assert "power cut" in status["snapshot-1.img"]["reason"]
    with pytest.raises(OSError) as excinfo:
        pread(again / "snapshot-1.img", 4096, 0)
    assert excinfo.value.errno == errno.EIO
    stale = snapshot_cli(again, "changes", "--since", first, check=False)
    assert stale.returncode == 1 and "full backup" in stale.stderr
    assert pread(again / "origin.img", MiB, 0) == b"x" * MiB
