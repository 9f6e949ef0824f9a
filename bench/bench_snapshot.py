#!/usr/bin/env python3
"""Benchmark snapshots: origin writes with snapshots held against the same writes
without any, snapshot reads against origin reads, and qemu-storage-daemon (a qcow2
overlay exported over FUSE) beside them.

    python bench/bench_snapshot.py                     # 1 GiB devices, 64 MiB regions, 7 rounds
    python bench/bench_snapshot.py --size-mib 512 --region-mib 32 --rounds 5 --no-qemu

Must run as root; installs qemu-utils and qemu-system-common with apt-get if
qemu-storage-daemon is missing (--no-qemu skips that column). In one run it:

1. fills three (four with qemu) backing files of --size-mib with random data (page-cached) and mounts
   three fusesnap servers: NONE (`--snapshot` with no snapshot ever taken: the
   limit), ONE (one snapshot held) and EIGHT (eight held), each with its own store;
   attaches a loop device (`--direct-io=on`) to each origin.img, to ONE's
   snapshot.img, and to the qemu export;
2. qemu: `qemu-img create -f qcow2 -b BASE -F raw overlay.qcow2`, then
   `qemu-storage-daemon` with the overlay as a writable FUSE export (the usual way
   to keep a device's old contents while writing on: the base stays, writes go to
   the overlay);
3. per round, on a region of the devices no earlier round touched: seq write 1M qd8
   (libaio, O_DIRECT, --region-mib) on NONE, ONE, EIGHT and qemu -- the first touch
   of every chunk (a copy into the store, a cluster allocation in qcow2) -- then the
   same writes again (chunks already copied); the targets go in one order in even
   rounds and in the reverse order in odd ones (ABBA), so a change of the machine's
   load during a round weighs on both sides of a ratio;
4. seq read 1M qd8 (time-based) of ONE's snapshot.img once with its store dropped
   from the page cache (copies are written uncached: what a backup reads later;
   no floor), then, with the store read into the page cache as the devices are,
   of ONE's origin.img and of its snapshot.img (--rounds * --region-mib of it
   copied into the store), and of the qemu export, the same way, --read-rounds
   rounds;
5. prints the median over the rounds of each round's ratio (a ratio of two runs
   seconds apart, on a shared machine whose load swings the absolute figures by 2x
   within a run), the median absolute figures beside it, and the floors of the
   issue: first touch >= 0.5, copied >= 0.9, eight snapshots within 10% of one,
   snapshot reads >= 0.8.

Teardown always runs, in this order: loop devices, fusesnap mounts, the qemu daemon
and its export, the temp dir. Exit status: 0 if every floor is met, 1 if one is not,
2 if the benchmark failed, 130 if interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    BenchError, attached, deferred_interrupts, fio_figures, format_table, fusesnap_mounted,
    header_lines, median_ratio, page_cached_file, ratio_range, require_root, run, scratch_dir,
    terminate_as_interrupt, warm, FUSESNAP,
)

FIRST_TOUCH_FLOOR, COPIED_FLOOR, EIGHT_TOLERANCE, READ_FLOOR = 0.5, 0.9, 0.1, 0.8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="device size (default 1024)")
    parser.add_argument("--region-mib", type=int, default=64, help="written per run (default 64)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of writes (default 7)")
    parser.add_argument("--read-rounds", type=int, default=4, help="rounds of reads (default 4)")
    parser.add_argument("--read-runtime", type=float, default=3, help="seconds per read run (default 3)")
    parser.add_argument("--workers", type=int, default=1, help="fusesnap mount --workers N, all mounts")
    parser.add_argument("--no-qemu", action="store_true", help="leave qemu-storage-daemon out")
    parser.add_argument("--tmpdir", help="where the backing files go (default: $TMPDIR)")
    args = parser.parse_args(argv)
    if args.region_mib * args.rounds * 2 > args.size_mib:
        parser.error("--size-mib must hold 2 * --rounds regions")
    return args


def region_write(device: str, offset_mib: int, size_mib: int) -> float:
    command = ["fio", "--name=region", f"--filename={device}", "--rw=write", "--bs=1M", "--iodepth=8",
               "--ioengine=libaio", "--direct=1", f"--offset={offset_mib}M", f"--size={size_mib}M",
               "--output-format=json"]
    return fio_figures(command, "write")["mbps"]


def seq_read(device: str, runtime: float) -> float:
    command = ["fio", "--name=read", f"--filename={device}", "--rw=read", "--bs=1M", "--iodepth=8",
               "--ioengine=libaio", "--direct=1", "--time_based", f"--runtime={runtime:g}",
               "--output-format=json"]
    return fio_figures(command, "read")["mbps"]


def ensure_qemu() -> None:
    if shutil.which("qemu-storage-daemon") and shutil.which("qemu-img"):
        return
    print("installing qemu-utils and qemu-system-common (apt-get) for qemu-storage-daemon", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "install", "-y", "-qq", "qemu-utils", "qemu-system-common"], env=env)


@contextlib.contextmanager
def qemu_overlay_export(base: Path, workdir: Path):
    """A qcow2 overlay on `base`, exported writable over FUSE by qemu-storage-daemon;
    yields the export's path. The daemon is stopped and the export gone on the way out."""
    overlay, export, pidfile = workdir / "overlay.qcow2", workdir / "export.img", workdir / "qsd.pid"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay])
    export.touch()
    pid = None
    try:
        with deferred_interrupts():
            run(["qemu-storage-daemon", "--daemonize", "--pidfile", pidfile,
                 "--blockdev", f"driver=qcow2,node-name=overlay,file.driver=file,file.filename={overlay}",
                 "--export", f"type=fuse,id=export,node-name=overlay,mountpoint={export},writable=on"])
            pid = int(pidfile.read_text())
        # The export is mounted over the empty file; a loop device attached before
        # that would be of size 0 (seen under load).
        for _ in range(100):
            if export.stat().st_size == base.stat().st_size:
                break
            time.sleep(0.1)
        else:
            raise BenchError(f"the qemu export {export} did not appear")
        yield export
    finally:
        with deferred_interrupts():
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.1)
            run(["umount", "-l", export], check=False)


def take(mountpoint: Path) -> None:
    run([*FUSESNAP, "snapshot", "take", mountpoint, "--no-freeze"])


def main(argv=None) -> int:
    args = parse_args(argv)
    require_root()
    terminate_as_interrupt()
    if not args.no_qemu:
        ensure_qemu()
    print("\n".join(header_lines()), flush=True)
    size = args.size_mib << 20
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(scratch_dir("bench-snapshot-", args.tmpdir))
        targets: dict[str, str] = {}
        mounts = {}
        for name, takes in (("none", 0), ("one", 1), ("eight", 8)):
            device = page_cached_file(tmp / f"{name}.raw", size)
            m = stack.enter_context(fusesnap_mounted(tmp / f"mnt-{name}", "--snapshot", device,
                                                     "--store", tmp / f"{name}.store",
                                                     "--workers", str(args.workers)))
            for _ in range(takes):
                take(m.mountpoint)
            mounts[name] = (m, device)
            targets[name] = stack.enter_context(attached(m.mountpoint / "origin.img"))
        if not args.no_qemu:
            base = page_cached_file(tmp / "qemu-base.raw", size)
            export = stack.enter_context(qemu_overlay_export(base, tmp))
            targets["qemu"] = stack.enter_context(attached(export))
        snapshot_dev = stack.enter_context(attached(mounts["one"][0].mountpoint / "snapshot.img",
                                                    read_only=True))

        # figures[kind][target]: one figure per round, in round order
        first: dict[str, list[float]] = {name: [] for name in targets}
        again: dict[str, list[float]] = {name: [] for name in targets}
        for round_number in range(args.rounds):
            offset = round_number * args.region_mib
            for _, device in mounts.values():
                warm(device)
            order = list(targets) if round_number % 2 == 0 else list(reversed(targets))
            for kind, figures in (("first touch", first), ("copied", again)):
                for name in order:
                    mbps = region_write(targets[name], offset, args.region_mib)
                    figures[name].append(mbps)
                    print(f"round {round_number + 1}: {kind:12} {name:6} {mbps:8.1f} MB/s", flush=True)

        # Copies are written uncached (RWF_DONTCACHE): first one pass over snapshot.img
        # with the store on disk (for the table; no floor), then the store is read
        # into the page cache, as the devices are, so that the rounds compare
        # fusesnap's read path with origin.img's rather than the disk with the cache.
        store = tmp / "one.store"
        drop_from_cache(store)
        cold_read = seq_read(snapshot_dev, args.read_runtime)
        print(f"read 0: snapshot.img, store on disk {cold_read:8.1f} MB/s", flush=True)
        warm(store)
        reads: dict[str, list[float]] = {}
        read_targets = {"origin.img": targets["one"], "snapshot.img": snapshot_dev}
        if "qemu" in targets:
            read_targets["qemu export"] = targets["qemu"]
        for round_number in range(args.read_rounds):
            order = list(read_targets) if round_number % 2 == 0 else list(reversed(read_targets))
            for name in order:
                mbps = seq_read(read_targets[name], args.read_runtime)
                reads.setdefault(name, []).append(mbps)
                print(f"read {round_number + 1}: {name:12} {mbps:8.1f} MB/s", flush=True)
        status = mounts["one"][0].mountpoint / ".status"
        print(status.read_text().rstrip())

    qemu = "qemu" in first
    rows, ok = [], True

    def row(label, values, limits, floor, text_floor, qemu_values=None):
        """One line: the median of the per-round ratios values[i] / limits[i]."""
        nonlocal ok
        ratio = median_ratio(values, limits)
        passed = floor(ratio)
        ok &= passed
        cells = [label, f"{statistics.median(limits):.0f}", f"{statistics.median(values):.0f}",
                 f"{ratio:.2f}", ratio_range(values, limits), text_floor, "PASS" if passed else "BELOW-FLOOR"]
        if qemu:
            cells += [f"{statistics.median(qemu_values):.0f}" if qemu_values else "-",
                      f"{median_ratio(qemu_values, limits):.2f}" if qemu_values else "-"]
        rows.append(cells)

    row("write, 1 snapshot, first touch", first["one"], first["none"],
        lambda r: r >= FIRST_TOUCH_FLOOR, f">= {FIRST_TOUCH_FLOOR}", first.get("qemu"))
    row("write, 1 snapshot, copied", again["one"], again["none"],
        lambda r: r >= COPIED_FLOOR, f">= {COPIED_FLOOR}", again.get("qemu"))
    row("write, 8 snapshots, first touch (vs 1)", first["eight"], first["one"],
        lambda r: r >= 1 - EIGHT_TOLERANCE, f">= {1 - EIGHT_TOLERANCE:.1f}")
    row("write, 8 snapshots, copied (vs 1)", again["eight"], again["one"],
        lambda r: r >= 1 - EIGHT_TOLERANCE, f">= {1 - EIGHT_TOLERANCE:.1f}")
    row("read snapshot.img (vs origin.img)", reads["snapshot.img"], reads["origin.img"],
        lambda r: r >= READ_FLOOR, f">= {READ_FLOOR}", reads.get("qemu export"))
    row("read snapshot.img, store on disk (one pass)", [cold_read], reads["origin.img"][:1],
        lambda r: True, "-")
    headers = ["seq 1M qd8, MB/s (medians)", "limit", "fusesnap", "ratio", "ratio range", "floor", "result"]
    if qemu:
        headers += ["qemu qcow2", "qemu ratio"]
    print()
    print(format_table(headers, rows))
    print(f"(ratio: the median over {args.rounds} write rounds, {args.read_rounds} read rounds, of each "
          "round's ratio; load at the end " + " ".join(f"{v:.2f}" for v in os.getloadavg()) + ")")
    return 0 if ok else 1


def drop_from_cache(path: Path) -> None:
    """fsync `path` and drop its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench_snapshot: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("bench_snapshot: interrupted", file=sys.stderr)
        sys.exit(130)
