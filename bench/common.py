"""Shared pieces of the benchmark scripts: real files, loop devices, fusesnap mounts, fio.

    scratch_dir(prefix)                a temp dir, removed unless something is mounted in it
    page_cached_file(path, size)       a filled (not sparse) file, read once into the page cache
    warm(path)                         fsync it and read it through again (before each run)
                                       (both take small_folios=True: see `warm`)
    attached(path, direct_io=True)     `losetup --find --show`, detached on the way out
    fusesnap_mounted(mnt, *args)       `fusesnap mount`, always torn down on the way out
    fio_job(device, kind, runtime)     one fio job from WORKLOADS -> {"mbps", "iops"}
    fio_figures(command, direction)    any fio command's figures, the same way
    deferred_interrupts()              lets a teardown finish before a Ctrl-C takes effect
    header_lines(), format_table()     what the reports print

Every context manager cleans up even when the body raised (KeyboardInterrupt too) and
never hides the exception already in flight. A fusesnap mount is torn down in this
order: loop devices on it, `fusesnap umount`, then `umount -l` and a kill of the
server if that failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fusesnap.cli import wait_for_exit  # noqa: E402
from fusesnap.devices import loop_devices_backed_under  # noqa: E402
from fusesnap.control import XATTR_PID  # noqa: E402

FUSESNAP = [sys.executable, "-m", "fusesnap"]

FILL_CHUNK = 4 << 20


class BenchError(Exception):
    """A step of a benchmark failed; the message says which and why."""


def run(cmd, *, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; BenchError with that output if it fails.

    The child has its own process group, so a Ctrl-C at the terminal reaches only us;
    subprocess.run kills the child when that interrupts the wait.
    """
    cmd = [str(part) for part in cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, process_group=0, **kwargs)
    if check and result.returncode != 0:
        raise BenchError(f"{shlex.join(cmd)} exited {result.returncode}: "
                         f"{(result.stderr or result.stdout).strip()}")
    return result


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit(f"{sys.argv[0]}: must be run as root (loop devices and FUSE mounts)")


@contextlib.contextmanager
def deferred_interrupts():
    """Hold back SIGINT/SIGTERM while the body runs (a teardown); afterwards raise
    KeyboardInterrupt for them, unless an exception is already in flight.

    A second Ctrl-C during cleanup would otherwise leave a loop device or mount
    behind. (Child processes get no terminal Ctrl-C at all: `run` starts each in its
    own process group, and kills it if we are interrupted while waiting.)
    """
    received: list[int] = []

    def note(signum, frame):
        received.append(signum)

    previous = {signum: signal.signal(signum, note) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received and sys.exc_info()[1] is None:
            raise KeyboardInterrupt


def run_benchmark(body) -> int:
    """A benchmark's main: root check, SIGTERM as Ctrl-C, the header lines, then
    `body()` (True if every figure reaches its floor). Exit status 0, or 1 if a
    figure is below its floor, 2 if the benchmark itself failed, 130 if interrupted."""
    require_root()
    terminate_as_interrupt()
    print("\n".join(header_lines()), flush=True)
    try:
        return 0 if body() else 1
    except BenchError as exc:
        print(f"{sys.argv[0]}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{sys.argv[0]}: interrupted; cleaned up", file=sys.stderr)
        return 130


def terminate_as_interrupt() -> None:
    """Make SIGTERM behave like Ctrl-C, so `finally` blocks run on either."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


# -- files ---------------------------------------------------------------------------

@contextlib.contextmanager
def scratch_dir(prefix: str, parent: str | None = None):
    """A temp directory, removed on the way out unless something is still mounted in it
    (then it is left, with a warning, rather than deleting through a live mount)."""
    path = None
    try:
        with deferred_interrupts():
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        yield path
    finally:
        if path is not None:
            with deferred_interrupts():
                still_mounted = [point for point in _mount_points() if point.startswith(f"{path}/")]
                if still_mounted:
                    print(f"warning: leaving {path}: still mounted: {', '.join(still_mounted)}",
                          file=sys.stderr)
                else:
                    shutil.rmtree(path, ignore_errors=True)


def page_cached_file(path: Path, size: int, *, small_folios: bool = False) -> Path:
    """Create `path` with `size` bytes of random data (every block allocated), make it
    durable, and read it back once so it sits in the page cache.

    With small_folios the cache holds 4 KiB folios instead of the large ones that big
    writes and readahead make (see `warm`).
    """
    with open(path, "wb") as f:
        done = 0
        while done < size:
            done += f.write(os.urandom(min(FILL_CHUNK, size - done)))
        f.flush()
        os.fsync(f.fileno())
        if small_folios:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    warm(path, small_folios=small_folios)
    return path


def warm(path: Path, *, small_folios: bool = False) -> None:
    """fsync `path` (no dirty pages left for the next run to write back) and read all of
    it through the page cache (putting back what O_DIRECT writes evicted).

    Folio size matters on recent kernels (seen on 6.18, ext4 and block devices alike):
    a 4 KiB buffered write into a large folio costs ~30 us, into a 4 KiB folio ~3 us.
    A plain read makes large folios; with small_folios the read goes through an fd
    with POSIX_FADV_RANDOM, whose reads fill the cache one 4 KiB folio at a time.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        if small_folios:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        offset = 0
        while chunk := os.pread(fd, FILL_CHUNK, offset):
            offset += len(chunk)
    finally:
        os.close(fd)


# -- loop devices --------------------------------------------------------------------

def detach(device: str) -> None:
    """losetup -d, and wait until the device is really gone: while udev or a late
    reader (a killed fio) still holds it open, the kernel only marks it autoclear,
    and the backing file stays busy, so `fusesnap umount` would refuse."""
    backing = Path(f"/sys/block/{os.path.basename(device)}/loop/backing_file")
    for _ in range(100):
        if not backing.exists():
            return
        run(["losetup", "-d", device], check=False)
        time.sleep(0.1)
    raise BenchError(f"could not detach {device}")


def loop_direct_io(device: str) -> bool:
    """Whether the loop driver really does direct I/O on its backing file (it falls
    back to buffered I/O silently when the backing file cannot)."""
    name = os.path.basename(device)
    return Path(f"/sys/block/{name}/loop/dio").read_text().strip() == "1"


@contextlib.contextmanager
def attached(path: Path, *, direct_io: bool = True, read_only: bool = False):
    """Attach `path` to a free loop device; yields '/dev/loopN'; detaches on the way out."""
    cmd = ["losetup", "--find", "--show", f"--direct-io={'on' if direct_io else 'off'}"]
    if read_only:
        cmd.append("--read-only")
    device = None
    try:
        # An interrupt must not kill losetup between attaching and telling us the name.
        with deferred_interrupts():
            device = run([*cmd, path]).stdout.strip()
        yield device
    finally:
        if device:
            with deferred_interrupts():
                detach(device)


# -- fusesnap mounts -----------------------------------------------------------------

@dataclass
class Mount:
    mountpoint: Path
    pid: int
    log: Path

    def __truediv__(self, name: str) -> Path:
        return self.mountpoint / name


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo]


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in _mount_points()


def log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def fusesnap_mounted(mountpoint: Path, *image_args, log: Path | None = None):
    """`fusesnap mount MOUNTPOINT IMAGE_ARGS... --log LOG` (it returns once the mount
    is usable); yields a Mount. On the way out, always: detach loop devices on the
    mount, `fusesnap umount`; if that fails, `umount -l` and kill the server."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = log or mountpoint.with_name(mountpoint.name + ".log")
    mount = None
    try:
        # An interrupt must not leave a mount we know nothing about.
        with deferred_interrupts():
            result = run([*FUSESNAP, "mount", mountpoint, *image_args, "--log", log],
                         check=False, cwd=REPO)
            if result.returncode != 0:
                raise BenchError(f"fusesnap mount failed: {result.stderr.strip()}\n{log_tail(log)}")
            try:
                pid = int(os.getxattr(mountpoint, XATTR_PID))
            except OSError as exc:
                run(["umount", "-l", mountpoint], check=False)
                raise BenchError(f"{mountpoint}: no fusesnap server answers: {exc}") from None
            mount = Mount(mountpoint, pid, log)
        yield mount
    finally:
        if mount:
            with deferred_interrupts():
                _teardown(mount)


def _teardown(mount: Mount) -> None:
    for device, _ in loop_devices_backed_under(mount.mountpoint):
        detach(device)
    if is_mounted(mount.mountpoint):
        result = run([*FUSESNAP, "umount", mount.mountpoint], check=False, cwd=REPO)
        if result.returncode != 0:
            print(f"warning: fusesnap umount failed ({result.stderr.strip()}); "
                  f"unmounting lazily and stopping server {mount.pid}", file=sys.stderr)
            run(["umount", "-l", mount.mountpoint], check=False)
    if not wait_for_exit(mount.pid, 30):
        for signum, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(mount.pid, signum)
            if wait_for_exit(mount.pid, wait):
                break


# -- fio -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    label: str
    rw: str
    block_size: str
    iodepth: int

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"


WORKLOADS = {
    "seqread": Workload("seq read 1M qd8", "read", "1M", 8),
    "seqwrite": Workload("seq write 1M qd8", "write", "1M", 8),
    "randread": Workload("rand read 4K qd16", "randread", "4k", 16),
    "randwrite": Workload("rand write 4K qd16", "randwrite", "4k", 16),
}


def fio_command(device: str, kind: str, runtime: float) -> list[str]:
    """One libaio O_DIRECT job over the whole device (fio's default size for a block
    device), time-based."""
    workload = WORKLOADS[kind]
    return ["fio", f"--name={kind}", f"--filename={device}", f"--rw={workload.rw}",
            f"--bs={workload.block_size}", f"--iodepth={workload.iodepth}",
            "--ioengine=libaio", "--direct=1", "--numjobs=1", "--time_based",
            f"--runtime={runtime:g}", "--output-format=json"]


def fio_job(device: str, kind: str, runtime: float) -> dict:
    """Run one workload of WORKLOADS against `device`; returns {"mbps", "iops"}
    (MB/s in units of 10^6 bytes, as fio prints them)."""
    return fio_figures(fio_command(device, kind, runtime), WORKLOADS[kind].direction)


def fio_figures(command: list[str], direction: str) -> dict:
    """Run a fio command with --output-format=json; {"mbps", "iops"} of its first job
    in `direction` ("read" or "write")."""
    result = run(command)
    # fio may print notes before its JSON document.
    report = json.loads(result.stdout[result.stdout.index("{"):])
    job = report["jobs"][0]
    if job.get("error"):
        raise BenchError(f"{shlex.join(command)}: error {job['error']}")
    figures = job[direction]
    return {"mbps": figures["bw_bytes"] / 1e6, "iops": figures["iops"]}


# -- reporting -----------------------------------------------------------------------

def _git(*args: str) -> str:
    return run(["git", "-C", REPO, *args], check=False).stdout.strip()


def header_lines() -> list[str]:
    """The command line and the facts about this machine a reader needs to compare runs."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.machine())
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    dirty = _git("status", "--porcelain", "--", "fusesnap")
    return [
        f"command:  {shlex.join([sys.executable, *sys.argv])}",
        f"machine:  nproc {os.cpu_count()}, {cpu}, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GiB RAM, load {load}",
        f"kernel:   {platform.release()}",
        f"software: {run(['fio', '--version']).stdout.strip()}, "
        f"python {platform.python_version()}, "
        f"fusesnap at {_git('rev-parse', '--short', 'HEAD')}"
        f"{' + uncommitted changes in fusesnap/' if dirty else ''}",
    ]


def median_ratio(values: list[float], limits: list[float]) -> float:
    """The median of the per-round ratios values[i] / limits[i] (each a pair measured
    seconds apart, so a swing of the machine's load weighs on both sides)."""
    return statistics.median(value / limit for value, limit in zip(values, limits))


def ratio_range(values: list[float], limits: list[float]) -> str:
    ratios = [value / limit for value, limit in zip(values, limits)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        return " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), "-+-".join("-" * width for width in widths),
                      *(line(row) for row in rows)])
