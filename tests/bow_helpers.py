"""Shared steps of the bow.img tests: a checkpointed ext4 on bow.img, the workload
that rolls its log over, and the checks that a restore gave the checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import time
from pathlib import Path

from fusesnap.devices import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from harness import fill_files, fusesnap, run

BLOCK = 4096


@contextlib.contextmanager
def opened_image(mount):
    """An O_RDWR descriptor on the mount's bow.img."""
    fd = os.open(mount / "bow.img", os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)


def discard(fd: int, offset: int, length: int) -> None:
    """What a loop device sends for a discard (and for write-zeroes)."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


@contextlib.contextmanager
def mounted_again(device: str, directory: Path, *options: str):
    """mount(8) a device just unmounted, waiting while a prober (udev's blkid, another
    test's scan) still holds it open: then mount says "already mounted or busy"."""
    directory.mkdir(parents=True, exist_ok=True)
    for _ in range(50):
        result = run(["mount", *options, device, str(directory)], check=False)
        if result.returncode == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"mount {device} failed: {result.stderr}")
    try:
        yield directory
    finally:
        run(["umount", str(directory)])


def ext4_free_blocks(image: Path) -> set[int]:
    """The blocks ext4 itself counts as free (from dumpe2fs's per-group lists)."""
    free = set()
    output = run(["dumpe2fs", str(image)]).stdout
    for listing in re.findall(r"^\s+Free blocks: (.*)$", output, re.MULTILINE):
        for part in filter(None, (p.strip() for p in listing.split(","))):
            lo, _, hi = part.partition("-")
            free.update(range(int(lo), int(hi or lo) + 1))
    return free


def file_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def make_filled_ext4(path: Path, size_mib: int, files: int, seed: int = 1) -> None:
    """An ext4 with `files` files of 256 KiB, as a device file."""
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(path)])
    mnt = path.with_name(path.name + ".fs")
    mnt.mkdir(exist_ok=True)
    run(["mount", "-o", "loop", str(path), str(mnt)])
    try:
        fill_files(mnt, files, seed=seed, size=256 << 10)
    finally:
        run(["umount", str(mnt)])


def checkpoint_frozen(fs_root: Path, mountpoint: Path, capture: Path) -> None:
    """fstrim, then checkpoint with the filesystem frozen (so the checkpoint is a
    clean filesystem), and capture bow.img as it is at the checkpoint."""
    run(["fstrim", str(fs_root)])
    run(["fsfreeze", "-f", str(fs_root)])
    try:
        fusesnap("bow", "checkpoint", mountpoint)
        with open(mountpoint / "bow.img", "rb") as image, open(capture, "wb") as out:
            while chunk := image.read(4 << 20):
                out.write(chunk)
    finally:
        run(["fsfreeze", "-u", str(fs_root)])


def churn(root: Path, rng: random.Random, rounds: int, *, sync_every: int = 50) -> None:
    """Overwrite files in place at random blocks (each a backup), delete, create and
    grow files: a workload whose log rolls over."""
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    for n in range(rounds):
        name = rng.choice(names)
        path = root / name
        action = rng.random()
        if action < 0.8 and path.exists():
            size = path.stat().st_size
            if size >= BLOCK:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.pwrite(fd, rng.randbytes(BLOCK), rng.randrange(size // BLOCK) * BLOCK)
                finally:
                    os.close(fd)
        elif action < 0.87 and path.exists():
            path.unlink()
        elif action < 0.94:
            (root / f"new{n:05d}").write_bytes(rng.randbytes(rng.randrange(1, 64) << 10))
        elif path.exists():
            with open(path, "ab") as f:
                f.write(rng.randbytes(32 << 10))
        if n % sync_every == sync_every - 1:
            os.sync()


def assert_restored_to(device: Path, capture: Path, hashes: dict[str, str], tmp_path: Path) -> None:
    """The device is the checkpoint: every block ext4 used then is byte-equal (block 0
    included), e2fsck is clean, and every file has its checkpoint contents."""
    in_use_free = ext4_free_blocks(capture)
    with open(device, "rb") as dev, open(capture, "rb") as cap:
        blocks = os.fstat(cap.fileno()).st_size // BLOCK
        for block in range(blocks):
            if block in in_use_free:
                continue
            cap_data = os.pread(cap.fileno(), BLOCK, block * BLOCK)
            assert os.pread(dev.fileno(), BLOCK, block * BLOCK) == cap_data, f"block {block} differs"
    run(["e2fsck", "-fn", str(device)])
    with mounted_again(str(device), tmp_path / "restored-fs", "-o", "ro,loop") as root:
        assert file_hashes(root) == hashes
