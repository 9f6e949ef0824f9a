#!/usr/bin/env python3
"""`fusesnap bow restore` of this checkout against another one, in pairs, on identical
copies of one device.

    git archive 8d1f2af | tar -x -C /tmp/base       # the checkout to compare with
    python bench/bench_bow_restore.py --base /tmp/base --pairs 8

Must run as root. It builds the log of bench_bow.py's random run once (a --size-mib
file, its upper half discarded, checkpointed, fio writing random 4 KiB blocks over a
quarter of its first 3/8 once), then for each pair restores two fresh copies of it,
one with each checkout, alternating which goes first:

- in-process: `bow_log.validate(keep_backups=True)` (where the checkout has it) and
  `bow_log.restore`, timed without Python's start-up (wall and CPU time);
- the command: `python -m fusesnap bow restore`, the time it reports (validation and
  copies) and the whole command's.

Prints every run, then medians, best runs and the per-pair ratios. Both checkouts
run with this interpreter (their `fusesnap` found first on sys.path); their
`__pycache__` is compiled first, so that no run compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_bow import discard, fio_once, flush  # noqa: E402
from common import FUSESNAP, REPO, attached, fusesnap_mounted, page_cached_file, run, scratch_dir  # noqa: E402

IN_PROCESS = """
import sys, time
from fusesnap.devices import BlockDevice
from fusesnap.formats import bow_log
device = BlockDevice(sys.argv[1])
wall, cpu = time.perf_counter(), time.process_time()
try:
    summary = bow_log.validate(device, keep_backups=True)
except TypeError:  # a checkout from before keep_backups
    summary = bow_log.validate(device)
bow_log.restore(device, validated=summary)
device.fsync()
print(summary.backed_up_bytes, time.perf_counter() - wall, time.process_time() - cpu)
"""


def build_log(tmp: Path, size_mib: int) -> tuple[Path, int]:
    size = size_mib << 20
    region = size * 3 // 8
    device = tmp / "device.raw"
    page_cached_file(device, size)
    with fusesnap_mounted(tmp / "mnt", "--bow", device, "--bow-map", tmp / "build.map",
                          "--bow-low-space", "0") as mount:
        discard(mount / "bow.img", region, size - region)
        run([*FUSESNAP, "bow", "checkpoint", mount.mountpoint], cwd=REPO)
        with attached(mount / "bow.img") as loop:
            fio_once(loop, "randwrite", region)
            flush(loop)  # (every staged first write backed up, so that the status counts it)
        backed_up = json.loads((mount / ".status.json").read_text())["images"]["bow.img"]["backed_up"]
    return device, backed_up


def fresh_copy(device: Path, name: str) -> Path:
    copy = device.with_name(name)
    shutil.copyfile(device, copy)
    os.sync()  # nothing else of ours left to write back while a restore runs
    return copy


def restore_in_process(checkout: Path, device: Path) -> dict:
    out = run([sys.executable, "-c", IN_PROCESS, device], cwd=checkout).stdout.split()
    backed_up, wall, cpu = int(out[0]), float(out[1]), float(out[2])
    return {"mbps": backed_up / wall / 1e6, "seconds": wall, "cpu": cpu}


def restore_command(checkout: Path, device: Path, backed_up: int) -> dict:
    started = time.monotonic()
    output = run([*FUSESNAP, "bow", "restore", device, "--bow-map", f"{device}.map"], cwd=checkout).stdout
    elapsed = time.monotonic() - started
    own = float(re.search(r"in ([0-9.]+) s\)", output).group(1))
    return {"mbps": backed_up / own / 1e6, "seconds": own, "command_mbps": backed_up / elapsed / 1e6}


def summarize(label: str, results: dict[str, list[dict]], key: str) -> None:
    for name, runs in results.items():
        values = [r[key] for r in runs]
        print(f"  {label} {name:<6} median {statistics.median(values):6.0f} MB/s, best {max(values):4.0f} "
              f"({', '.join(f'{v:.0f}' for v in values)})")
    ratios = [b[key] / a[key] for a, b in zip(results["base"], results["this"])]
    print(f"  {label} this/base per pair: {', '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the checkout to compare with")
    parser.add_argument("--pairs", type=int, default=8, help="pairs of each kind (default 8)")
    parser.add_argument("--size-mib", type=int, default=512, help="device size (default 512)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit(f"{sys.argv[0]}: must be run as root (a FUSE mount and a loop device build the log)")
    checkouts = {"base": args.base.resolve(), "this": REPO}
    for checkout in checkouts.values():
        run([sys.executable, "-m", "compileall", "-q", checkout / "fusesnap"])
    with scratch_dir("fusesnap-bench-restore-") as tmp:
        print(f"building the random run's log on a {args.size_mib} MiB file in {tmp} ...", flush=True)
        device, backed_up = build_log(tmp, args.size_mib)
        in_process = {name: [] for name in checkouts}
        command = {name: [] for name in checkouts}
        for pair in range(args.pairs):
            order = list(checkouts) if pair % 2 == 0 else list(reversed(checkouts))
            for name in order:
                result = restore_in_process(checkouts[name], fresh_copy(device, f"{name}.raw"))
                in_process[name].append(result)
                print(f"  pair {pair + 1} in-process {name:<4} {result['seconds']:.3f} s = {result['mbps']:.0f} MB/s "
                      f"(CPU {result['cpu']:.3f} s)", flush=True)
            for name in order:
                result = restore_command(checkouts[name], fresh_copy(device, f"{name}.raw"), backed_up)
                command[name].append(result)
                print(f"  pair {pair + 1} command    {name:<4} {result['seconds']:.2f} s = {result['mbps']:.0f} MB/s "
                      f"({result['command_mbps']:.0f} MB/s with start-up)", flush=True)
        print(f"{backed_up >> 20} MiB backed up; base {checkouts['base']}, this {REPO}")
        summarize("in-process          ", in_process, "mbps")
        summarize("command             ", command, "mbps")
        summarize("command with start-up", command, "command_mbps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
