"""Real parts for tests: fusesnap mounts, loop devices, ext4 filesystems.

Every context manager here cleans up on the way out even when the body raised, and
never hides the exception already in flight: loop devices first, then the mount,
then the server process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fusesnap.cli import wait_for_exit
from fusesnap.devices import loop_devices_backed_under

FUSESNAP = [sys.executable, "-m", "fusesnap"]


def run(cmd, *, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; on failure the assertion shows it."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def fusesnap(*args, check=True, cwd=None) -> subprocess.CompletedProcess:
    return run([*FUSESNAP, *map(str, args)], check=check, cwd=cwd)


def sha256_of(path, length: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length if length is not None else float("inf")
        while remaining > 0:
            block = f.read(int(min(4 << 20, remaining)))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


def loop_backing_file(device: str) -> str | None:
    """The file loop device `device` is attached to, as the kernel names it (None:
    not attached)."""
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def detach_loop(device: str, backing: str) -> None:
    """losetup -d, retrying while udev or a late reader still holds the device. Each
    try first checks that the device is still attached to `backing` (as
    `loop_backing_file` named it): once detached, its number may be another run's."""
    for _ in range(50):
        if loop_backing_file(device) != backing:
            return
        if run(["losetup", "-d", device], check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"could not detach {device} from {backing}")


@contextlib.contextmanager
def loop_device(path, *, direct_io: bool = True, read_only: bool = False, offset: int = 0):
    """Attach `path` (from byte `offset` on) to a free loop device; yields '/dev/loopN'."""
    cmd = ["losetup", "--find", "--show", f"--direct-io={'on' if direct_io else 'off'}"]
    if read_only:
        cmd.append("--read-only")
    if offset:
        cmd += ["--offset", str(offset)]
    device = run([*cmd, str(path)]).stdout.strip()
    backing = loop_backing_file(device)
    try:
        yield device
    finally:
        detach_loop(device, backing)


@contextlib.contextmanager
def mounted_dir(device: str, directory: Path, *options: str):
    """mount(8) a block device (ext4 in our tests) on `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    run(["mount", *options, device, str(directory)])
    try:
        yield directory
    finally:
        run(["umount", str(directory)])


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str):
    """A tmpfs of `size` (e.g. "3m") mounted on `directory`: a file on it whose pages
    do not fit makes a loop device over it fail its writeback (an fsync error)."""
    directory.mkdir()
    run(["mount", "-t", "tmpfs", "-o", f"size={size}", "fusesnap-test", str(directory)])
    try:
        yield directory
    finally:
        run(["umount", str(directory)])


class Mount:
    """A running fusesnap mount (the server is a background process)."""

    def __init__(self, mountpoint: Path, log: Path):
        self.mountpoint = mountpoint
        self.log = log
        self.pid = int(os.getxattr(mountpoint, "user.fusesnap.pid"))
        self.supervisor_pid = self.status_json()["server"]["supervisor_pid"]  # None: --no-failover

    def __truediv__(self, name: str) -> Path:
        return self.mountpoint / name

    def status_text(self) -> str:
        return (self.mountpoint / ".status").read_text()

    def status_json(self) -> dict:
        return json.loads((self.mountpoint / ".status.json").read_text())

    def status(self) -> dict:
        return self.status_json()["images"]

    def kill_server(self) -> None:
        """kill -9 the server, as a crash would, with no supervisor to fail over
        (it goes first): the mount is left aborted."""
        for pid in filter(None, (self.supervisor_pid, self.pid)):
            os.kill(pid, signal.SIGKILL)
            wait_for_exit(pid, 10)

    def crash_server(self) -> int:
        """kill -9 the current server and leave the failover to the supervisor;
        returns the pid killed."""
        pid = self.status_json()["server"]["pid"]
        os.kill(pid, signal.SIGKILL)
        return pid


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


@contextlib.contextmanager
def fusesnap_mount(mountpoint: Path, *image_args, log: Path | None = None, cwd: Path | None = None):
    """`fusesnap mount` with the given image arguments; always torn down on exit:
    loop devices on it, then the mount (`fusesnap umount`, lazily if that fails),
    then the server process (SIGKILL if it lingers). With `cwd`, the command runs
    there, so relative paths in the arguments mean paths inside it."""
    cwd = Path(cwd or Path.cwd())
    where = cwd / mountpoint
    where.mkdir(parents=True, exist_ok=True)
    log = log or Path(str(mountpoint) + ".log")
    fusesnap("mount", mountpoint, *image_args, "--log", log, cwd=cwd)
    try:
        mount = Mount(where, cwd / log)
    except BaseException:
        run(["umount", "-l", str(where)], check=False)
        raise
    try:
        yield mount
    finally:
        teardown_mount(mount)


def children_of(pid: int | None) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # gone, or no pid
        return []


def teardown_mount(mount: Mount) -> None:
    for device, backing in loop_devices_backed_under(mount.mountpoint):
        detach_loop(device, backing)
    if is_mounted(mount.mountpoint):
        if fusesnap("umount", mount.mountpoint, check=False).returncode != 0:
            run(["umount", "-l", str(mount.mountpoint)], check=False)
    # The supervisor goes first: a server killed before it would be failed over. Its
    # children are the servers it started (a failover's successor, the standby).
    servers = [mount.pid, *children_of(mount.supervisor_pid)]
    for pid in filter(None, (mount.supervisor_pid, *servers)):
        if not wait_for_exit(pid, 30):
            os.kill(pid, signal.SIGKILL)
            wait_for_exit(pid, 10)


def leftovers(prefix: str) -> list[str]:
    """Mounts, loop devices and servers a test run must not leave behind."""
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fields[4].startswith(prefix):
                found.append(f"mount {fields[4]} ({fstype})")
    found += [f"loop device {dev}" for dev, _ in loop_devices_backed_under(prefix)]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fusesnap" in cmdline and any(arg.startswith(prefix.encode()) for arg in cmdline):
            found.append(f"server process {pid}")
    return found


def sparse_file(path: Path, size: int) -> Path:
    """A file of `size` zero bytes that takes no space yet."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def make_ext4(path: Path, size_mib: int) -> None:
    sparse_file(path, size_mib << 20)
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(path)])


def fill_files(root: Path, count: int, seed: int, size: int = 64 << 10) -> dict[str, str]:
    """Write `count` files of mixed compressible/random content; returns name -> sha256."""
    import random
    rng = random.Random(seed)
    hashes = {}
    for index in range(count):
        words = b" ".join(rng.choice([b"block", b"image", b"fusesnap", b"update", b"%d" % index])
                          for _ in range(size // 8))
        data = (words[: size // 2] + rng.randbytes(size // 2))
        name = f"file{index:04d}"
        (root / name).write_bytes(data)
        hashes[name] = hashlib.sha256(data).hexdigest()
    return hashes


def make_update_pair(directory: Path, size_mib: int = 64) -> tuple[Path, Path, dict[str, str]]:
    """An ext4 image OLD with files and NEW = OLD with files changed, added and removed.

    Returns (old, new, new_files) with new_files mapping file name -> sha256 in NEW.
    """
    import shutil
    old, new = directory / "old.img", directory / "new.img"
    make_ext4(old, size_mib)
    with loop_device(old) as device, mounted_dir(device, directory / "old-fs") as root:
        fill_files(root, 60, seed=10)
    shutil.copyfile(old, new)
    with loop_device(new) as device, mounted_dir(device, directory / "new-fs") as root:
        for index in range(0, 60, 3):
            (root / f"file{index:04d}").unlink()
        changed = fill_files(root, 20, seed=11, size=96 << 10)  # rewrites file0000..file0019
        hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in root.iterdir() if p.is_file()}
    assert changed.items() <= hashes.items()
    return old, new, hashes


def random_update_pair(directory: Path, blocks: int = 2048) -> None:
    """old.img (random 4 KiB blocks) and new.img with every 8th block changed."""
    import random
    rng = random.Random(7)
    old = bytearray(rng.randbytes(blocks * 4096))
    new = bytearray(old)
    for block in range(0, blocks, 8):
        new[block * 4096:(block + 1) * 4096] = rng.randbytes(4096)
    (directory / "old.img").write_bytes(old)
    (directory / "new.img").write_bytes(new)


def copy_of(source: Path, target: Path) -> Path:
    import shutil
    shutil.copyfile(source, target)
    return target


def on_a_terminal(*args, cwd=None, columns: int = 120) -> tuple[int, str]:
    """Run `fusesnap ARGS` with stdout and stderr on a pseudo-terminal; returns its exit
    status and everything it drew, carriage returns turned into newlines."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen([*FUSESNAP, *map(str, args)], cwd=cwd, stdout=slave, stderr=slave,
                               stdin=subprocess.DEVNULL)
    os.close(slave)
    drawn = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    return process.wait(), drawn.decode(errors="replace").replace("\r", "\n")
