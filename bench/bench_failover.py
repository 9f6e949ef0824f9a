"""Benchmark crash failover: the time from a server's death to the first request served
again, what I/O sees meanwhile, and what the supervisor costs when nothing fails.

    python bench/bench_failover.py [--crashes 5] [--runtime 10] [--repeat 2]

Must run as root. Three parts, each printed beside its limit:

1. The test images: linear.img over a 256 MiB page-cached file and system.img (256 MiB,
   a quarter of its blocks changed) while it merges, each under a loop device with
   direct I/O. fio (libaio, direct, qd 16) does random 4 KiB writes on linear.img and
   random 4 KiB reads on system.img for --runtime seconds, once without crashes and
   once with --crashes SIGKILLs of the server spread over the run; runs paired, the
   order alternating, --repeat pairs. Printed: fio's p99 and max latency with and
   without, and its errors (must be 0).
2. Recovery: 10 crashes of an idle mount of the same images; for each, from the
   server's exit (seen through a pidfd) to the first 4 KiB read of linear.img
   answered, against the 1 s limit.
3. The supervisor's cost: linear.img with and without --no-failover, fio random 4 KiB
   reads and writes, paired runs: IOPS with / without, against the 3% limit.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_update import make_images  # noqa: E402
from bench_upgrade import fio_latencies, latency_columns, paired_fio_runs  # noqa: E402
from common import (FUSESNAP, REPO, BenchError, attached, format_table,  # noqa: E402
                    fusesnap_mounted, page_cached_file, run, run_benchmark, scratch_dir, warm)

RECOVERY_LIMIT_MS = 1000
COST_LIMIT = 0.03


def server_status(mount) -> dict:
    return json.loads((mount / ".status.json").read_text())["server"]


def crash(mount) -> None:
    """SIGKILL the server and wait until it is gone (not until a successor serves)."""
    pid = server_status(mount)["pid"]
    with os.fdopen(os.pidfd_open(pid), "rb", buffering=0) as pidfd:
        os.kill(pid, signal.SIGKILL)
        select.select([pidfd], [], [])


def follow(mount) -> None:
    """Let the teardown know the serving process."""
    mount.pid = server_status(mount)["pid"]


def crashes_during(mount, count: int, runtime: float) -> threading.Thread:
    def work():
        interval = runtime / (count + 1)
        for index in range(count):
            time.sleep(interval if index else interval / 2)
            crash(mount)
        follow(mount)
    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_images(work: Path, args) -> Path:
    size = 256 << 20
    old, _, changed_blocks = make_images(work, size, 0.25)
    run([*FUSESNAP, "diff", old, work / "new.raw", "-o", work / "diff.img", "--quiet"], cwd=REPO)
    shutil.copyfile(old, work / "system.raw")
    page_cached_file(work / "linear.raw", size)
    for path in (work / "system.raw", work / "diff.img"):
        warm(path)
    return changed_blocks


def part_latency(work: Path, args, changed_blocks: int) -> list[list[str]]:
    merge_rate = changed_blocks * 4096 / (2 * args.repeat * args.runtime * 1.5) / 1e6
    with fusesnap_mounted(work / "mnt", "--linear", work / "linear.raw", "--system",
                          work / "system.raw", "--diff", work / "diff.img",
                          "--merge-rate", f"{merge_rate:.2f}", "--max-failovers", "1000") as mount, \
            attached(mount / "linear.img") as linear_loop, \
            attached(mount / "system.img", read_only=True) as system_loop:
        jobs = [("randwrite-linear", linear_loop, "randwrite"),
                ("randread-system", system_loop, "randread")]
        runs = paired_fio_runs(jobs, args.repeat, args.runtime,
                               lambda: crashes_during(mount, args.crashes, args.runtime))
        failovers = server_status(mount)["failovers"]
    if failovers != args.crashes * args.repeat:
        raise BenchError(f"{failovers} failovers for {args.crashes * args.repeat} crashes")
    rows = []
    for name, _, _ in jobs:
        without = [figures[name] for figures in runs[False]]
        during = [figures[name] for figures in runs[True]]
        rows.append([name, *latency_columns(without, during),
                     str(sum(f["error"] != 0 for f in without + during))])
    return rows


def part_recovery(work: Path) -> list[float]:
    times = []
    with fusesnap_mounted(work / "mnt-idle", "--linear", work / "linear.raw", "--system",
                          work / "system.raw", "--diff", work / "diff.img",
                          "--max-failovers", "1000") as mount:
        for _ in range(10):
            fd = os.open(mount / "linear.img", os.O_RDONLY)
            try:
                crash(mount)
                gone = time.perf_counter()
                os.pread(fd, 4096, 0)
                times.append((time.perf_counter() - gone) * 1e3)
            finally:
                os.close(fd)
            time.sleep(2)  # the supervisor's next standby successor starts meanwhile
        follow(mount)
    return times


def part_cost(work: Path, args) -> tuple[list[list[str]], list[float]]:
    """Two mounts of linear.img over two page-cached files, one with the supervisor, one
    --no-failover; fio on each in turn, the order alternating."""
    ratios = {"randread": [], "randwrite": []}
    page_cached_file(work / "linear-b.raw", 256 << 20)
    with fusesnap_mounted(work / "mnt-with", "--linear", work / "linear.raw") as supervised, \
            fusesnap_mounted(work / "mnt-without", "--linear", work / "linear-b.raw",
                             "--no-failover") as plain, \
            attached(supervised / "linear.img") as with_loop, \
            attached(plain / "linear.img") as without_loop:
        for pair in range(2 * args.repeat):
            for rw in ratios:
                order = [("with", with_loop), ("without", without_loop)]
                iops = {name: fio_latencies([(rw, device, rw)], args.runtime)[rw]["iops"]
                        for name, device in (order if pair % 2 == 0 else order[::-1])}
                ratios[rw].append(iops["with"] / iops["without"])
    rows = [[rw, " / ".join(f"{r:.3f}" for r in values), f"{statistics.median(values):.3f}",
             f">= {1 - COST_LIMIT:.2f}"] for rw, values in ratios.items()]
    return rows, [statistics.median(values) for values in ratios.values()]


def bench(args) -> bool:
    """True if every figure is within its limit."""
    with scratch_dir("fusesnap-bench-failover-", args.tmpdir) as work:
        changed_blocks = test_images(work, args)
        latency_rows = part_latency(work, args, changed_blocks)
        recovery = part_recovery(work)
        cost_rows, cost_medians = part_cost(work, args)
    print()
    print(format_table(["fio job (4 KiB, qd 16)", "p99 ms without", "p99 ms with crashes",
                        "max ms without", "max ms with", "errors"], latency_rows))
    print()
    print(format_table(["crash to first read served", "max", "median", "limit"],
                       [[f"{len(recovery)} crashes, idle", f"{max(recovery):.0f} ms",
                         f"{statistics.median(recovery):.0f} ms", f"< {RECOVERY_LIMIT_MS} ms"]]))
    print()
    print(format_table(["fio 4 KiB qd 16 on linear.img", "IOPS supervised / not, per pair",
                        "median", "limit"], cost_rows))
    return (all(row[-1] == "0" for row in latency_rows) and max(recovery) < RECOVERY_LIMIT_MS
            and min(cost_medians) >= 1 - COST_LIMIT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crashes", type=int, default=5, help="crashes during each fio run")
    parser.add_argument("--runtime", type=float, default=10, help="seconds per fio run")
    parser.add_argument("--repeat", type=int, default=2, help="pairs of fio runs")
    parser.add_argument("--tmpdir", default=None)
    return run_benchmark(lambda: bench(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
