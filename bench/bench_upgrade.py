"""Benchmark `fusesnap upgrade`: the pause per hand-over, and what I/O sees meanwhile.

    python bench/bench_upgrade.py [--upgrades 10] [--runtime 10] [--repeat 2] [--ranges 1000000]

Must run as root. Two parts, each printed beside its limit:

1. The test images: linear.img over a 256 MiB page-cached file and system.img (256 MiB,
   a quarter of its blocks changed) while it merges (slowly: all through), each under a loop
   device with direct I/O. fio (libaio, direct, qd 16) does random 4 KiB writes on
   linear.img and random 4 KiB reads on system.img, for --runtime seconds, once
   without upgrades and once with --upgrades of them spread over the run; runs paired,
   the order alternating, --repeat pairs. Printed: fio's p99 and max completion
   latency with and without, and the pauses (from the old server's last request taken
   to the successor's first, as `.status.json` reports it) against the 50 ms limit.
2. system.img with a range map of --ranges ranges (every other 512-byte block of a
   sparse image changed), merging at 5 MB/s: the pause of 5 upgrades against the 1 s
   limit, beside the whole `fusesnap upgrade` time (the successor opens the image
   before the old server pauses).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_update import make_images  # noqa: E402
from common import (FUSESNAP, REPO, XATTR_PID, BenchError, attached, format_table,  # noqa: E402
                    fusesnap_mounted, header_lines, page_cached_file, require_root, run,
                    scratch_dir, terminate_as_interrupt, warm)

PAUSE_LIMIT_MS = 50
LARGE_PAUSE_LIMIT_MS = 1000


def upgrade(mount) -> tuple[float, float]:
    """One `fusesnap upgrade`: (pause in ms as the successor measured it, seconds the
    command took)."""
    started = time.perf_counter()
    result = run([*FUSESNAP, "upgrade", mount.mountpoint], check=False, cwd=REPO)
    took = time.perf_counter() - started
    if result.returncode != 0:
        raise BenchError(f"fusesnap upgrade failed: {result.stderr.strip()}")
    mount.pid = int(os.getxattr(mount.mountpoint, XATTR_PID))  # the teardown's server
    server = json.loads((mount / ".status.json").read_text())["server"]
    return server["last_pause_ms"], took


def fio_latencies(jobs: list[tuple[str, str, str]], runtime: float) -> dict[str, dict]:
    """Run fio jobs (name, device, rw) at once for `runtime` s; per job its p99 and max
    completion latency in ms, and its error count."""
    command = ["fio", "--output-format=json", "--ioengine=libaio", "--direct=1", "--iodepth=16",
               "--bs=4k", "--time_based", f"--runtime={runtime:g}", "--group_reporting=0"]
    for name, device, rw in jobs:
        command += [f"--name={name}", f"--filename={device}", f"--rw={rw}"]
    result = run(command)
    report = json.loads(result.stdout[result.stdout.index("{"):])
    figures = {}
    for job in report["jobs"]:
        direction = "write" if "write" in job["job options"]["rw"] else "read"
        clat = job[direction]["clat_ns"]
        figures[job["jobname"]] = {"p99": clat["percentile"]["99.000000"] / 1e6,
                                   "max": clat["max"] / 1e6, "error": job["error"],
                                   "iops": job[direction]["iops"]}
    return figures


def latency_columns(without: list[dict], during: list[dict]) -> list[str]:
    """p99 and max latency of fio runs (fio_latencies figures of one job), without and
    during the event a benchmark measures."""
    return [" / ".join(f"{f[key]:.{digits}f}" for f in runs)
            for key, digits in (("p99", 2), ("max", 1)) for runs in (without, during)]


def paired_fio_runs(jobs, repeat: int, runtime: float, event) -> dict[bool, list[dict]]:
    """fio_latencies of `jobs` without (False) and with (True) `event()` (a started
    thread) during the run, `repeat` pairs, the order alternating."""
    runs = {False: [], True: []}
    for pair in range(repeat):
        for with_event in ((False, True) if pair % 2 == 0 else (True, False)):
            thread = event() if with_event else None
            runs[with_event].append(fio_latencies(jobs, runtime))
            if thread:
                thread.join()
    return runs


def upgrades_during(mount, count: int, runtime: float, pauses: list) -> threading.Thread:
    """A thread doing `count` upgrades spread over `runtime` seconds."""
    def work():
        interval = runtime / (count + 1)
        for index in range(count):
            time.sleep(interval if index else interval / 2)
            pauses.append(upgrade(mount)[0])
    thread = threading.Thread(target=work)
    thread.start()
    return thread


def part_test_images(work: Path, args) -> tuple[list[list[str]], list[float]]:
    size = 256 << 20
    old, _, changed_blocks = make_images(work, size, 0.25)
    run([*FUSESNAP, "diff", old, work / "new.raw", "-o", work / "diff.img", "--quiet"], cwd=REPO)
    system = work / "system.raw"
    shutil.copyfile(old, system)
    linear = page_cached_file(work / "linear.raw", size)
    for path in (system, work / "diff.img"):
        warm(path)
    pauses: list[float] = []
    # Slow enough that the merge goes on through all the fio runs.
    merge_rate = changed_blocks * 4096 / (2 * args.repeat * args.runtime * 1.5) / 1e6
    with fusesnap_mounted(work / "mnt", "--linear", linear, "--system", system,
                          "--diff", work / "diff.img", "--merge-rate", f"{merge_rate:.2f}") as mount, \
            attached(mount / "linear.img") as linear_loop, \
            attached(mount / "system.img", read_only=True) as system_loop:
        jobs = [("randwrite-linear", linear_loop, "randwrite"),
                ("randread-system", system_loop, "randread")]
        runs = paired_fio_runs(jobs, args.repeat, args.runtime,
                               lambda: upgrades_during(mount, args.upgrades, args.runtime, pauses))
        merge_state = json.loads((mount / ".status.json").read_text())["images"]["system.img"]
    rows = []
    for name, _, _ in jobs:
        without = [figures[name] for figures in runs[False]]
        during = [figures[name] for figures in runs[True]]
        errors = sum(f["error"] != 0 for f in without + during)
        rows.append([name, *latency_columns(without, during),
                     " / ".join(f"{d['iops'] / w['iops']:.2f}" for w, d in zip(without, during)),
                     str(errors)])
    print(f"merge at the end: {merge_state['state']}, {merge_state['merged']} of "
          f"{merge_state['total']} blocks", flush=True)
    return rows, pauses


def part_large_map(work: Path, args) -> list[list[str]]:
    size = args.ranges * 1024  # every other 512-byte block changed
    old, new = work / "old-large.raw", work / "new-large.raw"
    with open(old, "wb") as f:
        f.truncate(size)
    with open(new, "wb") as f:
        for mib in range(size >> 20):
            f.write((b"\0" * 512 + (b"%08d changed " % mib).ljust(512, b"x")) * 1024)
    diff = work / "diff-large.img"
    run([*FUSESNAP, "diff", old, new, "-o", diff, "--block-size", "512", "--quiet"], cwd=REPO)
    info = json.loads(run([*FUSESNAP, "diff-info", diff, "--json"], cwd=REPO).stdout)
    rows = []
    with fusesnap_mounted(work / "mnt-large", "--system", old, "--diff", diff,
                          "--merge-rate", "5") as mount:
        for _ in range(5):
            pause, took = upgrade(mount)
            rows.append([f"{info['changed_blocks']:,} ranges", f"{pause:.1f} ms",
                         f"{took:.2f} s", f"< {LARGE_PAUSE_LIMIT_MS} ms"])
            time.sleep(1)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upgrades", type=int, default=10, help="upgrades during each fio run")
    parser.add_argument("--runtime", type=float, default=10, help="seconds per fio run")
    parser.add_argument("--repeat", type=int, default=2, help="pairs of fio runs")
    parser.add_argument("--ranges", type=int, default=1 << 20,
                        help="ranges in the large map (a multiple of 1024)")
    parser.add_argument("--tmpdir", default=None)
    args = parser.parse_args()
    require_root()
    terminate_as_interrupt()
    print("\n".join(header_lines()), flush=True)
    try:
        with scratch_dir("fusesnap-bench-upgrade-", args.tmpdir) as work:
            latency_rows, pauses = part_test_images(work, args)
            large_rows = part_large_map(work, args)
    except KeyboardInterrupt:
        print(f"{sys.argv[0]}: interrupted; cleaned up", file=sys.stderr)
        return 130
    print()
    print(format_table(["fio job (4 KiB, qd 16)", "p99 ms without", "p99 ms with upgrades",
                        "max ms without", "max ms with", "IOPS with/without", "errors"],
                       latency_rows))
    print()
    print(format_table(["pause, test images", "max", "median", "limit"],
                       [[f"{len(pauses)} upgrades under fio", f"{max(pauses):.1f} ms",
                         f"{statistics.median(pauses):.1f} ms", f"< {PAUSE_LIMIT_MS} ms"]]))
    print()
    print(format_table(["pause, large map", "pause", "fusesnap upgrade took", "limit"], large_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
