"""system.img: reads as NEW while the diff merges into the device in the background."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time

import pytest

from harness import (Mount, copy_of, fusesnap, loop_device, make_update_pair, mounted_dir, run,
                     sha256_of, small_tmpfs, sparse_file, teardown_mount)

from fusesnap.formats.update_diff import DiffFile

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
    """(dev, diff): a fresh copy of OLD to update, and a private copy of the diff."""
    old, _, _, diff = pair
    return copy_of(old, tmp_path / "dev.img"), copy_of(diff, tmp_path / "diff.img")


@pytest.fixture
def state(tmp_path):
    """The test's own `--state-dir` (merge progress), as mount arguments."""
    return ["--state-dir", tmp_path / "state"]


def progress_files(state) -> list:
    return sorted((state[1] / "update").glob("*.json")) if (state[1] / "update").exists() else []


def saved_chunks(state) -> int:
    (progress,) = progress_files(state)
    return json.loads(progress.read_text())["merged_chunks"]


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


def test_reads_as_new_before_during_and_after_the_merge(pair, device, mount, state):
    _, new, _, _ = pair
    dev, diff = device
    new_hash = sha256_of(new)

    m = mount(*state, "--system", dev, "--diff", diff, "--no-bg-update")
    assert sha256_of(m / "system.img") == new_hash
    assert system_status(m)["state"] == "disabled"

    m = mount(*state, "--system", dev, "--diff", diff, "--merge-rate", "0.25")
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

    m = mount(*state, "--system", dev, "--diff", diff)
    status = wait_for(lambda: (s := system_status(m))["state"] == "done" and s)
    assert status["merged"] == status["total"] > 0
    assert m.status_text() == f"system.img: update {status['total']} {status['total']} done\n"
    assert sha256_of(m / "system.img") == new_hash
    fusesnap("umount", m.mountpoint)
    assert sha256_of(dev, os.path.getsize(new)) == new_hash


def test_ext4_through_a_loop_device_has_new_files(pair, device, mount, loop, tmp_path, state):
    _, _, files, _ = pair
    dev, diff = device
    m = mount(*state, "--system", dev, "--diff", diff)
    loop_dev = loop(m / "system.img", read_only=True)
    with mounted_dir(loop_dev, tmp_path / "fs", "-o", "ro,noload") as root:
        found = {p.name: sha256_of(p) for p in root.iterdir() if p.is_file()}
    assert found == files
    assert run(["e2fsck", "-fn", loop_dev]).returncode == 0


def test_kill_9_mid_merge_then_remount_resumes(pair, device, mount, state):
    _, new, _, _ = pair
    dev, diff = device
    m = mount(*state, "--system", dev, "--diff", diff, "--merge-rate", "0.25")
    wait_for(lambda: progress_files(state), timeout=30)
    m.kill_server()
    fusesnap("umount", m.mountpoint)

    m = mount(*state, "--system", dev, "--diff", diff)
    assert system_status(m)["merged"] > 0, "resumed, not started over"
    assert sha256_of(m / "system.img") == sha256_of(new)
    wait_for(lambda: system_status(m)["state"] == "done")
    fusesnap("umount", m.mountpoint)
    assert sha256_of(dev, os.path.getsize(new)) == sha256_of(new)


def test_system_img_is_read_only_and_sized_like_the_device(pair, device, mount, state):
    dev, diff = device
    m = mount(*state, "--system", dev, "--diff", diff, "--no-bg-update")
    assert (m / "system.img").stat().st_size == os.path.getsize(dev)
    with pytest.raises(OSError) as excinfo:
        open(m / "system.img", "r+b")
    assert excinfo.value.errno == errno.EROFS


@pytest.mark.parametrize("change", ["none", "all"])
def test_empty_and_full_diffs(tmp_path, mount, change, state):
    old = tmp_path / "old.raw"
    old.write_bytes(os.urandom(8 << 20))
    new = tmp_path / "new.raw"
    new.write_bytes(old.read_bytes() if change == "none" else os.urandom(8 << 20))
    diff = tmp_path / "diff.img"
    fusesnap("diff", old, new, "-o", diff, "--quiet")
    m = mount(*state, "--system", old, "--diff", diff)
    assert sha256_of(m / "system.img") == sha256_of(new)
    status = wait_for(lambda: (s := system_status(m))["state"] == "done" and s)
    assert status["total"] == (0 if change == "none" else (8 << 20) // 4096)
    fusesnap("umount", m.mountpoint)
    assert sha256_of(old) == sha256_of(new)


def test_a_corrupt_chunk_fails_that_read_only(tmp_path, mount, state):
    old = tmp_path / "old.raw"
    old.write_bytes(bytes(4 << 20))
    new = tmp_path / "new.raw"
    new.write_bytes(os.urandom(4 << 20))
    diff = tmp_path / "diff.img"
    fusesnap("diff", old, new, "-o", diff, "--quiet", "--chunk-blocks", "16")
    with open(diff, "r+b") as f:  # garble the middle of the first chunk
        f.seek(64 + 1000)
        f.write(b"\xaa" * 64)
    m = mount(*state, "--system", old, "--diff", diff)
    with open(m / "system.img", "rb") as image:
        with pytest.raises(OSError) as excinfo:
            image.read(4096)
        assert excinfo.value.errno == errno.EIO
        image.seek(1 << 20)
        assert image.read(4096) == new.read_bytes()[1 << 20:(1 << 20) + 4096]
    status = wait_for(lambda: (s := system_status(m))["state"] == "error" and s)
    assert "chunk 0" in status["error"] and str(diff) in status["error"]
    assert old.read_bytes()[:65536] == bytes(65536), "no half-merged data from a bad chunk"

    printed = fusesnap("status", m.mountpoint).stdout.splitlines()
    assert printed[0] == m.status_text().strip() and printed[0].endswith(" error")
    assert printed[1] == f"system.img: error: {status['error']}"
    assert m.status_text().count("\n") == 1, ".status stays one line per image"
    result = fusesnap("update", "resume", m.mountpoint, check=False)
    assert result.returncode == 1
    assert "cannot resume: the merge stopped in error: " in result.stderr and "chunk 0" in result.stderr


def test_resume_of_a_disabled_merge_says_why(pair, device, mount, state):
    dev, diff = device
    m = mount(*state, "--system", dev, "--diff", diff, "--no-bg-update")
    result = fusesnap("update", "resume", m.mountpoint, check=False)
    assert result.returncode == 1 and "disabled" in result.stderr and "--no-bg-update" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_bad_diff_fails_the_mount_naming_the_rule(tmp_path, state):
    dev = tmp_path / "dev.raw"
    dev.write_bytes(bytes(1 << 20))
    diff = tmp_path / "diff.img"
    fusesnap("diff", dev, dev, "-o", diff, "--quiet")
    data = bytearray(diff.read_bytes())
    data[8] = 7  # version
    diff.write_bytes(data)
    result = refused_mount(tmp_path, state, dev, diff)
    assert "version" in result.stderr


# ---- what the diff applies to ---------------------------------------------------------

def refused_mount(tmp_path, state, dev, diff, *options):
    """`fusesnap mount` that must fail with one line and exit 2."""
    (tmp_path / "mnt-refused").mkdir(exist_ok=True)
    result = fusesnap("mount", tmp_path / "mnt-refused", *state, "--system", dev, "--diff", diff,
                      *options, check=False)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    return result


def changed_blocks_of(diff) -> list[int]:
    with DiffFile.open(diff) as d:
        return [d.entry(i)[0] for i in range(d.total_blocks)]


@pytest.mark.parametrize("wrong", ["random contents", "OLD with one changed block altered"])
def test_a_wrong_device_is_refused_and_untouched(pair, device, tmp_path, state, wrong):
    dev, diff = device
    if wrong == "random contents":
        dev.write_bytes(os.urandom(dev.stat().st_size))
        first_bad = changed_blocks_of(diff)[0]
    else:
        first_bad = changed_blocks_of(diff)[len(changed_blocks_of(diff)) // 2]
        with open(dev, "r+b") as f:
            f.seek(first_bad * 4096 + 100)
            f.write(b"not OLD")
    before = sha256_of(dev)
    result = refused_mount(tmp_path, state, dev, diff)
    with DiffFile.open(diff) as d:   # a v1 diff (the default) hashes OLD per chunk
        chunk_index, _ = d.lookup(first_bad)
        chunk_start = next(d.chunk_runs(chunk_index))[0]
    assert (f"chunk {chunk_index} (from block {chunk_start}) holds neither its old nor its new "
            "contents" in result.stderr), result.stderr
    assert "--no-verify-source" in result.stderr
    assert sha256_of(dev) == before
    assert not progress_files(state)


def test_no_verify_source_skips_the_check(pair, device, mount, state):
    dev, diff = device
    dev.write_bytes(os.urandom(dev.stat().st_size))
    m = mount(*state, "--system", dev, "--diff", diff, "--no-verify-source", "--no-bg-update")
    assert system_status(m)["state"] == "disabled"


def test_a_device_smaller_than_new_is_refused(tmp_path, state):
    """The changed blocks all fit the device; NEW does not."""
    old, new, small = tmp_path / "old.raw", tmp_path / "new.raw", tmp_path / "small.raw"
    old.write_bytes(bytes(16 << 20))
    new.write_bytes(os.urandom(1 << 20) + bytes(15 << 20))
    small.write_bytes(bytes(8 << 20))
    diff = tmp_path / "diff.img"
    fusesnap("diff", old, new, "-o", diff, "--quiet")
    result = refused_mount(tmp_path, state, small, diff)
    assert "smaller than the image the diff makes (16777216 bytes)" in result.stderr
    assert small.read_bytes() == bytes(8 << 20)


def test_a_diff_without_identification_mounts_with_a_warning(tmp_path, state, stack):
    old, new = tmp_path / "old.raw", tmp_path / "new.raw"
    old.write_bytes(bytes(4 << 20))
    new.write_bytes(os.urandom(4 << 20))
    diff = tmp_path / "diff.img"
    fusesnap("diff", old, new, "-o", diff, "--quiet", "--format", "v0")
    with DiffFile.open(diff) as d:
        dir_end = d.superblock.dir_offset + d.superblock.dir_compressed_size
    os.truncate(diff, dir_end)   # as another tool makes it: the dm-update format, no trailer
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", *state, "--system", old, "--diff", diff,
                      "--log", tmp_path / "mnt.log")
    m = Mount(tmp_path / "mnt", tmp_path / "mnt.log")
    stack.callback(teardown_mount, m)
    (warning,) = result.stderr.splitlines()
    assert warning.startswith("fusesnap: warning: ") and "cannot be checked" in warning
    wait_for(lambda: system_status(m)["state"] == "done")
    assert sha256_of(m / "system.img") == sha256_of(new)


def test_a_device_half_merged_by_another_diff_is_refused(tmp_path, mount, state):
    """Whatever progress says, a device with blocks of another update is never merged into."""
    old = tmp_path / "old.raw"
    old.write_bytes(bytes(8 << 20))
    new1, new2 = tmp_path / "new1.raw", tmp_path / "new2.raw"
    new1.write_bytes(os.urandom(8 << 20))
    new2.write_bytes(os.urandom(8 << 20))
    diff = tmp_path / "diff.img"
    fusesnap("diff", old, new1, "-o", diff, "--quiet", "--chunk-blocks", "16")
    m = mount(*state, "--system", old, "--diff", diff, "--merge-rate", "1")
    wait_for(lambda: progress_files(state), timeout=30)
    fusesnap("umount", m.mountpoint)
    fusesnap("diff", new1, new2, "-o", diff, "--quiet")  # same name, other diff
    result = refused_mount(tmp_path, state, old, diff)
    assert "holds neither its old nor its new contents" in result.stderr


def merge_then_restore_old(pair, device, mount, state) -> None:
    """Merge to the end, unmount, and put OLD back on the device behind the merge's back."""
    old, _, _, _ = pair
    dev, diff = device
    m = mount(*state, "--system", dev, "--diff", diff)
    wait_for(lambda: system_status(m)["state"] == "done")
    fusesnap("umount", m.mountpoint)
    copy_of(old, dev)


def test_a_device_restored_to_old_is_merged_again(pair, device, mount, state):
    """Progress is a hint: a device put back to OLD behind a finished merge's back is
    seen for what it is and merged again."""
    _, new, _, _ = pair
    dev, diff = device
    merge_then_restore_old(pair, device, mount, state)
    m = mount(*state, "--system", dev, "--diff", diff, "--merge-rate", "0.25")
    assert system_status(m)["merged"] < system_status(m)["total"]
    assert sha256_of(m / "system.img") == sha256_of(new)


def test_without_the_source_check_progress_is_checked_against_the_device(pair, device, mount,
                                                                          state, tmp_path):
    dev, diff = device
    merge_then_restore_old(pair, device, mount, state)
    result = refused_mount(tmp_path, state, dev, diff, "--no-verify-source")
    assert "is not on it" in result.stderr


# ---- where progress lives, and what finds it -------------------------------------------

def test_relative_paths_resume(pair, device, mount, tmp_path, monkeypatch):
    dev, diff = device
    monkeypatch.chdir(tmp_path)
    m = mount("--state-dir", "state", "--system", dev.name, "--diff", diff.name,
              "--merge-rate", "0.25")
    wait_for(lambda: list((tmp_path / "state" / "update").glob("*.json")), timeout=30)
    fusesnap("umount", m.mountpoint)
    m = mount("--state-dir", "state", "--system", dev.name, "--diff", diff.name,
              "--no-verify-source")
    assert system_status(m)["merged"] > 0


def half_merge(mount, state, dev, diff) -> int:
    """Mount, merge a part, unmount; returns the chunks the saved progress counts."""
    m = mount(*state, "--system", dev, "--diff", diff, "--merge-rate", "0.2")
    wait_for(lambda: system_status(m)["merged"] > 0)
    fusesnap("update", "pause", m.mountpoint)
    fusesnap("umount", m.mountpoint)
    assert 0 < saved_chunks(state)
    return saved_chunks(state)


@pytest.mark.parametrize("renamed", ["touch", "copied back", "symlink"])
def test_a_remount_resumes_by_what_the_diff_and_device_are(pair, device, mount, state,
                                                           tmp_path, renamed):
    """Without the source check, only the saved progress can say what is merged."""
    _, new, _, _ = pair
    dev, diff = device
    saved = half_merge(mount, state, dev, diff)
    if renamed == "touch":
        os.utime(diff)
    elif renamed == "copied back":
        copy_of(diff, tmp_path / "elsewhere.img")
        copy_of(tmp_path / "elsewhere.img", diff)
    else:
        (tmp_path / "link").symlink_to(dev)
        dev = tmp_path / "link"
    m = mount(*state, "--system", dev, "--diff", diff, "--no-verify-source", "--no-bg-update")
    with DiffFile.open(diff) as d:
        assert system_status(m)["merged"] == d.entry_range_of_chunk(saved)[0]
    fusesnap("umount", m.mountpoint)
    m = mount(*state, "--system", dev, "--diff", diff, "--no-verify-source")
    wait_for(lambda: system_status(m)["state"] == "done")
    assert sha256_of(m / "system.img") == sha256_of(new)
    assert len(progress_files(state)) == 1


def test_a_renumbered_loop_device_resumes(pair, device, mount, state, loop, tmp_path):
    """Another device number has no saved progress: the source check sees what is merged."""
    _, new, _, _ = pair
    dev, diff = device
    with loop_device(dev) as first:
        half_merge(mount, state, first, diff)
        second = loop(dev)  # attached while the first still is: another number
    assert second != first
    m = mount(*state, "--system", second, "--diff", diff)
    assert system_status(m)["merged"] > 0, "resumed, not started over"
    wait_for(lambda: system_status(m)["state"] == "done")
    assert sha256_of(m / "system.img") == sha256_of(new)
    assert len(progress_files(state)) == 2, "one per device"


def test_one_diff_merges_into_two_devices_at_once(pair, device, mount, state, tmp_path):
    old, new, _, _ = pair
    dev1, diff = device
    dev2 = copy_of(old, tmp_path / "dev2.img")
    m1 = mount(*state, "--system", dev1, "--diff", diff)
    m2 = mount(*state, "--system", dev2, "--diff", diff)
    for m in (m1, m2):
        wait_for(lambda: system_status(m)["state"] == "done")
        fusesnap("umount", m.mountpoint)
    for dev in (dev1, dev2):
        assert sha256_of(dev, new.stat().st_size) == sha256_of(new)
    assert len(progress_files(state)) == 2
    assert not list((state[1] / "update").glob("*.tmp"))


def test_a_diff_on_read_only_media_merges(pair, device, mount, state, stack, tmp_path):
    _, new, _, _ = pair
    dev, diff = device
    media = stack.enter_context(read_only_bind(diff.parent, tmp_path / "media"))
    m = mount(*state, "--system", dev, "--diff", media / diff.name)
    wait_for(lambda: system_status(m)["state"] == "done")
    fusesnap("umount", m.mountpoint)
    assert sha256_of(dev, new.stat().st_size) == sha256_of(new)


# ---- a diff that changes, a device that fails ------------------------------------------

@pytest.mark.parametrize("algorithm", ["zstd", "none"])
def test_a_diff_rewritten_in_place_stops_the_merge(tmp_path, mount, state, algorithm):
    old, new1, new2 = tmp_path / "old.raw", tmp_path / "new1.raw", tmp_path / "new2.raw"
    old.write_bytes(bytes(8 << 20))
    new1.write_bytes(os.urandom(8 << 20))
    new2.write_bytes(os.urandom(8 << 20))
    diff, other = tmp_path / "diff.img", tmp_path / "other.img"
    for new, out in ((new1, diff), (new2, other)):
        fusesnap("diff", old, new, "-o", out, "--quiet", "-a", algorithm, "--chunk-blocks", "16")
    m = mount(*state, "--system", old, "--diff", diff, "--merge-rate", "1")
    wait_for(lambda: system_status(m)["merged"] > 0)
    with DiffFile.open(diff) as d:   # same size, same directory, other chunks
        sb = d.superblock
        layout = (sb.dir_offset, d.file_size)
    with DiffFile.open(other) as d:
        assert (d.superblock.dir_offset, d.file_size) == layout  # random data: stored raw
    with open(diff, "r+b") as f:
        f.seek(64)
        f.write(other.read_bytes()[64:sb.dir_offset])   # chunks of another update
    status = wait_for(lambda: (s := system_status(m))["state"] == "error" and s)
    assert str(diff) in status["error"] and "changed while in use" in status["error"]
    merged_blocks = status["merged"]
    with open(m / "system.img", "rb") as image:
        image.seek(merged_blocks * 4096)
        with pytest.raises(OSError) as excinfo:
            image.read(4096)
        assert excinfo.value.errno == errno.EIO
    data = old.read_bytes()
    new1_data, new2_data = new1.read_bytes(), new2.read_bytes()
    for block in range(0, 2048, 97):
        got = data[block * 4096:(block + 1) * 4096]
        assert got != new2_data[block * 4096:(block + 1) * 4096], "no block of the other update"
        assert got in (bytes(4096), new1_data[block * 4096:(block + 1) * 4096])


@contextlib.contextmanager
def read_only_bind(source, directory):
    directory.mkdir()
    run(["mount", "--bind", str(source), str(directory)])
    try:
        run(["mount", "-o", "remount,ro,bind", str(directory)])
        yield directory
    finally:
        run(["umount", str(directory)])


def test_after_an_fsync_error_progress_claims_nothing_unwritten(tmp_path, mount, state, loop,
                                                                stack):
    """A device whose writeback fails once the 3 MiB tmpfs under it is full: the merge
    stops in error, and neither the merge nor `umount` (whose second fsync returns 0)
    saves progress counting what never arrived."""
    chunk = 16 * 4096
    old, new = tmp_path / "old.raw", tmp_path / "new.raw"
    sparse_file(old, 16 << 20)
    new.write_bytes(os.urandom(16 << 20))
    diff = tmp_path / "diff.img"
    fusesnap("diff", old, new, "-o", diff, "--quiet", "--chunk-blocks", "16")
    media = stack.enter_context(small_tmpfs(tmp_path / "tmpfs", "3m"))
    backing = sparse_file(media / "dev.img", 16 << 20)   # OLD: zeros, taking no space
    dev = loop(backing, direct_io=False)

    # 0.5 MB/s: the pause must come before 3 MiB are merged, and on a loaded machine
    # `fusesnap update pause` takes seconds to start.
    m = mount(*state, "--system", dev, "--diff", diff, "--merge-rate", "0.5")
    wait_for(lambda: system_status(m)["merged"] >= 64)
    fusesnap("update", "pause", m.mountpoint)        # saves progress: an fsync that works
    # The pause's save, not an earlier periodic one: paused, the saved count catches up
    # with what the merge reports.
    wait_for(lambda: progress_files(state) and saved_chunks(state) * 16 == system_status(m)["merged"])
    saved = saved_chunks(state)
    assert 0 < saved * chunk < 3 << 20
    fusesnap("update", "resume", m.mountpoint)
    status = wait_for(lambda: (s := system_status(m))["state"] == "error" and s, timeout=90)
    assert f"fsync of {dev} failed" in status["error"]
    saved = saved_chunks(state)   # a periodic save may have worked after the resume
    assert status["merged"] == saved * 16, "chunks since the saved progress come from the diff"
    assert sha256_of(m / "system.img") == sha256_of(new)
    fusesnap("umount", m.mountpoint)

    assert saved_chunks(state) == saved, "umount saved no progress after the failed fsync"
    assert backing.read_bytes()[:saved * chunk] == new.read_bytes()[:saved * chunk]
    m = mount(*state, "--system", dev, "--diff", diff, "--no-bg-update")
    assert sha256_of(m / "system.img") == sha256_of(new)
