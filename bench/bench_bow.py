#!/usr/bin/env python3
"""Benchmark bow.img: trim state against linear.img, first writes in checkpoint state
(group commit and the naive two-syncs order) and rewrites against the trim state, and
the restore rate.

    python bench/bench_bow.py                  # 512 MiB devices, 5 s runs, 5 rounds
    python bench/bench_bow.py --size-mib 1024 --repeat 7
    python bench/bench_bow.py --only randwrite --no-naive   # one part, quicker

Must run as root. In one run it:

1. fills a template file of --size-mib random bytes (page-cached);
2. trim state: one mount with `--linear A --bow B` (A, B copies of the template),
   a loop device (direct I/O) on each image, the four fio workloads of bench/common.py
   (time-based, whole device) on each, back to back, alternating which goes first;
   ratio bow.img / linear.img, floor 0.9;
3. first writes: for each workload (rand write 4 KiB qd16, seq write 1 MiB qd8) and
   each mode -- `trim` (no checkpoint), `group` (checkpoint, group commit) and, in the
   first round only (it takes longer than the others together), `naive`
   (checkpoint, `--bow-naive-commit`: copy, sync, log, sync per first write) -- a fresh
   copy of the template is mounted with `--bow`, its upper half discarded (free space
   for backups), checkpointed (not in `trim` mode), and fio writes the first 3/8 of it
   (every block there holds checkpoint data) once: random 4 KiB over a quarter of it, each
   block at most once (fio's random map), sequential 1 MiB over all of it. Ratios
   against `trim`: floor 0.3 (random) and 0.5 (sequential) for `group`; `naive` is
   shown for comparison. The same job again (same blocks, now backed up) straight
   after gives the rewrites *straight after* of `group` and `trim` (shown, no floor:
   in checkpoint state they share the server with the rounds that still back up and
   apply the first writes staged before them); then an fsync of the loop device (it
   returns once every staged write is in place and durable; its time is shown) and
   the same job once more gives the rewrites *after a flush* (ranges already backed
   up, nothing else running), floor 0.9. After the group run the device is
   unmounted and `fusesnap bow restore` is timed: MB/s of backed-up data over the
   time it reports (validation and copies), floor 200; beside it the same over the
   whole command (Python's start-up and imports included).
   Modes run in rotating order each round.
4. prints, for each ratio, the median over the rounds of each round's ratio (two
   runs seconds apart, so a change of the machine's load weighs on both sides) with
   its range, and the median absolute figures beside it; restore rates are medians
   of the rounds. (The best run of each side, which this printed before, picks the
   two sides' outliers from different rounds: on a quiet machine a trim-state
   baseline that swung 2x between rounds gave a rewrite ratio of 0.63 where the
   two rounds' own ratios were 1.17 and 0.63.)

Teardown always runs (loop devices, `fusesnap umount`, temp dir). Exit status: 0 if
every figure reaches its floor, 1 if one is below, 2 if the benchmark failed, 130 if
interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    FUSESNAP, REPO, WORKLOADS, attached, fio_job, format_table, fusesnap_mounted, median_ratio,
    page_cached_file, ratio_range, run, run_benchmark, scratch_dir, warm,
)

from fusesnap.devices import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate  # noqa: E402

TRIM_FLOOR = 0.9
FIRST_WRITE_FLOOR = {"randwrite": 0.3, "seqwrite": 0.5}
REWRITE_FLOOR = 0.9
RESTORE_FLOOR_MBPS = 200
MODES = ("trim", "group", "naive")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="device size (default 512)")
    parser.add_argument("--runtime", type=float, default=5, help="seconds per time-based fio run (default 5)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="rounds; ratios are medians of the rounds' own ratios (default 5)")
    parser.add_argument("--tmpdir", help="where the temp dir goes (default: $TMPDIR or /tmp)")
    parser.add_argument("--only", choices=("trim", "randwrite", "seqwrite"), action="append",
                        help="run only this part (repeatable): the trim state against linear.img, "
                             "or first writes, rewrites and restore of one workload (default: all)")
    parser.add_argument("--no-naive", action="store_true",
                        help="leave out the naive order (quicker, for trying changes)")
    args = parser.parse_args()
    args.only = args.only or ["trim", "randwrite", "seqwrite"]
    if args.repeat < 1 or args.size_mib < 64 or args.runtime <= 0:
        parser.error("--repeat and --runtime must be positive, --size-mib at least 64")
    return args


def cell(result: dict) -> str:
    return f"{result['mbps']:.1f} ({result['iops']:.0f})"


def median_cell(results: list[dict]) -> str:
    return f"{statistics.median(r['mbps'] for r in results):.1f} " \
           f"({statistics.median(r['iops'] for r in results):.0f})"


def mbps(results: list[dict]) -> list[float]:
    return [result["mbps"] for result in results]


def fio_once(device: str, kind: str, region: int) -> dict:
    """Write `region` bytes from the start of `device` once: sequential 1 MiB over all
    of it, or random 4 KiB over a quarter of it with no block written twice."""
    workload = WORKLOADS[kind]
    io_size = region if kind == "seqwrite" else region // 4
    cmd = ["fio", f"--name={kind}", f"--filename={device}", f"--rw={workload.rw}",
           f"--bs={workload.block_size}", f"--iodepth={workload.iodepth}", "--ioengine=libaio",
           "--direct=1", "--numjobs=1", f"--size={region}", f"--io_size={io_size}",
           "--randrepeat=1", "--output-format=json"]
    report = json.loads((out := run(cmd).stdout)[out.index("{"):])
    figures = report["jobs"][0]["write"]
    return {"mbps": figures["bw_bytes"] / 1e6, "iops": figures["iops"]}


def flush(device: str) -> float:
    """fsync `device`; the seconds it took."""
    started = time.monotonic()
    fd = os.open(device, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - started


def discard(path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    finally:
        os.close(fd)


def trim_state(args, tmp, template) -> dict:
    """bow.img in trim state against linear.img, the four workloads: for each
    (workload, target), its result in each round."""
    results: dict = {}
    linear, bow = tmp / "linear.raw", tmp / "bow.raw"
    shutil.copyfile(template, linear)
    shutil.copyfile(template, bow)
    with contextlib.ExitStack() as stack:
        mount = stack.enter_context(fusesnap_mounted(tmp / "mnt-trim", "--linear", linear, "--bow", bow,
                                                     "--bow-map", tmp / "trim.map"))
        devices = {"linear.img": stack.enter_context(attached(mount / "linear.img")),
                   "bow.img": stack.enter_context(attached(mount / "bow.img"))}
        for round_index in range(args.repeat):
            order = ("linear.img", "bow.img") if round_index % 2 == 0 else ("bow.img", "linear.img")
            for kind in WORKLOADS:
                for target in order:
                    warm(linear if target == "linear.img" else bow)
                    result = fio_job(devices[target], kind, args.runtime)
                    print(f"  trim round {round_index + 1}  {WORKLOADS[kind].label:<19} {target:<10} "
                          f"{cell(result)}", flush=True)
                    results.setdefault((kind, target), []).append(result)
    return results


def first_writes(args, tmp, template, results: dict, round_index: int) -> None:
    size = args.size_mib << 20
    region = size * 3 // 8  # backed up into the free upper half, with room for the log
    for kind in [kind for kind in ("randwrite", "seqwrite") if kind in args.only]:
        modes = MODES[round_index % 3:] + MODES[:round_index % 3]
        if args.no_naive or round_index > 0:
            modes = tuple(mode for mode in modes if mode != "naive")
        for mode in modes:
            device = tmp / f"bow-{mode}.raw"
            shutil.copyfile(template, device)
            warm(device)
            map_path = tmp / f"first-writes-{mode}.map"
            naive = ["--bow-naive-commit"] if mode == "naive" else []
            with fusesnap_mounted(tmp / f"mnt-{mode}", "--bow", device, "--bow-map", map_path,
                                  "--bow-low-space", "0", *naive) as mount:
                discard(mount / "bow.img", region, size - region)
                if mode != "trim":
                    run([*FUSESNAP, "bow", "checkpoint", mount.mountpoint], cwd=REPO)
                with attached(mount / "bow.img") as loop:
                    first = fio_once(loop, kind, region)
                    again = settled = None
                    if mode != "naive":
                        again = fio_once(loop, kind, region)
                        flush_seconds = flush(loop)
                        settled = fio_once(loop, kind, region)
                status = json.loads((mount / ".status.json").read_text())["images"]["bow.img"]
            print(f"  round {round_index + 1}  {WORKLOADS[kind].label:<19} {mode:<6} first {cell(first)}"
                  + (f"  rewrite {cell(again)}  flush {flush_seconds:.2f} s  rewrite after it {cell(settled)}"
                     if again else "")
                  + f"  barriers {status['barriers']} for {status['copies_recorded']} copies"
                  + (f" ({status['staged']} writes staged, {status['restaged']} restaged)"
                     if status.get("staged") else "")
                  + (f", {status['barrier_seconds'] / status['barriers'] * 1e3:.1f} ms each"
                     if status["barriers"] else ""), flush=True)
            results.setdefault(("first", kind, mode), []).append(first)
            if again:
                results.setdefault(("rewrite", kind, mode), []).append(again)
                results.setdefault(("settled rewrite", kind, mode), []).append(settled)
            if mode == "group":
                backed_up = status["backed_up"]
                started = time.monotonic()
                output = run([*FUSESNAP, "bow", "restore", device, "--bow-map", map_path], cwd=REPO).stdout
                elapsed = time.monotonic() - started
                own = float(re.search(r"in ([0-9.]+) s\)", output).group(1))  # validation and copies
                result = {"mbps": backed_up / own / 1e6, "iops": 0, "bytes": backed_up,
                          "command_mbps": backed_up / elapsed / 1e6}
                print(f"  round {round_index + 1}  restore after {kind}: {backed_up >> 20} MiB "
                      f"in {own:.2f} s = {result['mbps']:.0f} MB/s (the command: {elapsed:.2f} s = "
                      f"{result['command_mbps']:.0f} MB/s)", flush=True)
                results.setdefault(("restore", kind), []).append(result)
            device.unlink()
            map_path.unlink(missing_ok=True)  # the next round's device is a new file


def report(trim: dict, results: dict) -> bool:
    all_pass = True

    def row(label, measured, baselines, floor, rows):
        """One line: median absolute figures, the median and range of the rounds' ratios
        (a mode run only in the first round, naive, pairs with that round's baseline)."""
        nonlocal all_pass
        values, limits = mbps(measured), mbps(baselines)[:len(measured)]
        ratio = median_ratio(values, limits)
        passed = floor is None or ratio >= floor
        all_pass &= passed
        rows.append([label, median_cell(baselines[:len(measured)]), median_cell(measured), f"{ratio:.2f}",
                     ratio_range(values, limits), f"{floor:.2f}" if floor else "-",
                     ("PASS" if passed else "BELOW-FLOOR") if floor else "-"])

    rows: list = []
    for kind in WORKLOADS if trim else ():
        row(f"trim: {WORKLOADS[kind].label}", trim[(kind, "bow.img")], trim[(kind, "linear.img")],
            TRIM_FLOOR, rows)
    if rows:
        print(format_table(["bow.img trim state", "linear.img MB/s (IOPS)", "bow.img MB/s (IOPS)",
                            "ratio", "range", "floor", "mark"], rows))
        print()
    kinds = [kind for kind in ("randwrite", "seqwrite") if ("restore", kind) in results]
    if not kinds:
        return all_pass
    rows = []
    for kind in kinds:
        label = WORKLOADS[kind].label
        for mode in [mode for mode in ("group", "naive") if ("first", kind, mode) in results]:
            row(f"first writes, {label}, {mode}", results[("first", kind, mode)],
                results[("first", kind, "trim")], FIRST_WRITE_FLOOR[kind] if mode == "group" else None, rows)
        row(f"rewrites straight after, {label}", results[("rewrite", kind, "group")],
            results[("rewrite", kind, "trim")], None, rows)
        row(f"rewrites after a flush, {label}", results[("settled rewrite", kind, "group")],
            results[("settled rewrite", kind, "trim")], REWRITE_FLOOR, rows)
    print(format_table(["checkpoint state", "trim MB/s (IOPS)", "checkpoint MB/s (IOPS)", "ratio",
                        "range", "floor", "mark"], rows))
    print()
    rows = []
    for kind in kinds:
        restores = results[("restore", kind)]
        rates = mbps(restores)
        passed = statistics.median(rates) >= RESTORE_FLOOR_MBPS
        all_pass &= passed
        rows.append([f"after {WORKLOADS[kind].label}", f"{restores[0]['bytes'] >> 20} MiB",
                     f"{statistics.median(rates):.0f}", f"{min(rates):.0f}-{max(rates):.0f}",
                     f"{statistics.median(r['command_mbps'] for r in restores):.0f}", f"{RESTORE_FLOOR_MBPS}",
                     "PASS" if passed else "BELOW-FLOOR"])
    print(format_table(["bow restore", "backed up", "MB/s", "range", "MB/s with start-up", "floor", "mark"],
                       rows))
    return all_pass


def bench(args) -> bool:
    with scratch_dir("fusesnap-bench-bow-", args.tmpdir) as tmp:
        print(f"filling a {args.size_mib} MiB template in {tmp} ...", flush=True)
        template = page_cached_file(tmp / "template.raw", args.size_mib << 20)
        trim = trim_state(args, tmp, template) if "trim" in args.only else {}
        results: dict = {}
        for round_index in range(args.repeat):
            first_writes(args, tmp, template, results, round_index)
    print()
    print(f"(medians over {args.repeat} rounds; load at the end "
          + " ".join(f"{load:.2f}" for load in os.getloadavg()) + ")")
    return report(trim, results)


def main() -> int:
    args = parse_args()
    return run_benchmark(lambda: bench(args))

if __name__ == "__main__":
    sys.exit(main())
