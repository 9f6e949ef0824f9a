"""Benchmark system.img (the update overlay) against its limits, side by side in one run.

    python bench/bench_update.py [--size-mib 1024] [--changed 0.25] [--runtime 10] [--repeat 2]
    python bench/bench_update.py --pair binary [--format v0]

Must run as root. It makes OLD (a compressible mix of text-like and random data) and
NEW = OLD with a quarter of its 4 KiB blocks changed (in runs of 1-32 blocks), or
takes a pair of real software from bench/pairs.py (`--pair`), makes the diff with
`fusesnap diff` (default options: format v1, whose merge first copies the OLD blocks
its chunks reference to a scratch file; `--format v0` for the dm-update format), and
measures:

1. reads, with the merge off (`--no-bg-update`), all through loop devices with direct I/O:
   - seq read 1M qd8 of system.img  vs  NEW through a plain loop device (limit; target >= 0.5)
   - rand read 4K qd16 of system.img  vs  linear.img over NEW in the same mount (target >= 0.5)
   Runs are paired and alternate which side goes first; the best of --repeat counts.
2. the background merge on a fresh copy of OLD:
   - idle: MB/s of changed blocks from mount until `.status` says done, the scratch
     copy of a v1 diff included (target >= 100); for a v1 diff, the v0 diff of the
     same images is merged in the same rounds, for scale (the machine is shared)
   - under load: a sequential O_DIRECT reader (1 MiB, qd 1) of system.img runs while the
     merge does; its MB/s against the same reader on system.img with no merge running
     (the --no-bg-update mount of part 1; target >= 0.5), and the merge's MB/s meanwhile.
3. the source check `mount` runs before the first write (`check_source`), in process,
   on a device holding OLD and on one holding NEW (every chunk must then be
   decompressed), with the device in the page cache and evicted from it
   (POSIX_FADV_DONTNEED); against its floor, reading just the changed blocks (the
   same preads, nothing else), and reading the whole device for scale. Paired,
   interleaved runs, the best of --repeat counts. `--source-check-only` runs only this.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (FUSESNAP, REPO, attached, fio_job, format_table, fusesnap_mounted,  # noqa: E402
                    header_lines, require_root, run, scratch_dir, terminate_as_interrupt, warm)

BLOCK = 4096


def make_images(directory: Path, size: int, changed: float, seed: int = 1) -> tuple[Path, Path, int]:
    """OLD and NEW images; returns (old, new, changed_blocks)."""
    rng = random.Random(seed)
    words = [b"update", b"block", b"fusesnap", b"kernel", b"image", b"diff", b"merge", b"loop"]

    def mixed(n: int) -> bytes:
        text = b" ".join(rng.choice(words) for _ in range(n // 12))[: n // 2]
        return text.ljust(n // 2, b".") + rng.randbytes(n - n // 2)

    old, new = directory / "old.raw", directory / "new.raw"
    with open(old, "wb") as f:
        for _ in range(size >> 20):
            f.write(mixed(1 << 20))
    shutil.copyfile(old, new)
    n_blocks, target, changed_blocks = size // BLOCK, int(size // BLOCK * changed), 0
    touched = bytearray(n_blocks)
    with open(new, "r+b") as f:
        while changed_blocks < target:
            start, length = rng.randrange(n_blocks), rng.randint(1, 32)
            length = min(length, n_blocks - start)
            f.seek(start * BLOCK)
            f.write(mixed(length * BLOCK))
            for block in range(start, start + length):
                changed_blocks += not touched[block]
                touched[block] = 1
    return old, new, changed_blocks


def status_of(mount) -> dict:
    return json.loads((mount / ".status.json").read_text())["images"]["system.img"]


def sequential_reader(device: str, stop: threading.Event, result: dict) -> None:
    """Read `device` front to back (wrapping) with 1 MiB O_DIRECT reads until stopped."""
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)
    size = os.lseek(fd, 0, os.SEEK_END)
    done, offset, started = 0, 0, time.perf_counter()
    try:
        while not stop.is_set():
            got = os.preadv(fd, [buf], offset)
            done += got
            offset = offset + got if offset + got < size else 0
    finally:
        os.close(fd)
    result["mbps"] = done / (time.perf_counter() - started) / 1e6


def read_for(device: str, seconds: float) -> float:
    stop, result = threading.Event(), {}
    reader = threading.Thread(target=sequential_reader, args=(device, stop, result))
    reader.start()
    time.sleep(seconds)
    stop.set()
    reader.join()
    return result["mbps"]


def read_changed_blocks(diff, device) -> None:
    """The floor of the source check: the same preads, no hashing."""
    bs = diff.block_size
    for chunk_index in range(diff.n_chunks):
        for dest, n_blocks, _ in diff.chunk_runs(chunk_index):
            device.pread(n_blocks * bs, dest * bs)


def read_whole(device) -> None:
    for offset in range(0, device.size, 8 << 20):
        device.pread(8 << 20, offset)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def source_check_rows(diff_path: Path, devices: dict[str, Path], repeat: int) -> list[list[str]]:
    """Seconds of the source check and of its floor, per device contents and cache state."""
    from fusesnap.devices import BlockDevice
    from fusesnap.formats.update_diff import DiffFile
    from fusesnap.images.update import check_source

    rows = []
    with DiffFile.open(diff_path) as diff:
        for contents, path in devices.items():
            device = BlockDevice(str(path), read_only=True)
            try:
                for cached in (True, False):
                    jobs = {"changed blocks read": lambda: read_changed_blocks(diff, device),
                            "source check": lambda: check_source(diff, device),
                            "whole device read": lambda: read_whole(device)}
                    best = {}
                    for round_ in range(repeat):
                        order = list(jobs.items())
                        if round_ % 2:
                            order.reverse()
                        for name, job in order:
                            if cached:
                                read_whole(device)
                            else:
                                evict(path)
                            started = time.perf_counter()
                            job()
                            seconds = time.perf_counter() - started
                            print(f"  round {round_ + 1}/{repeat}  source check, {contents}, "
                                  f"{'cached' if cached else 'evicted'}: {name} {seconds:.2f} s",
                                  flush=True)
                            best[name] = min(best.get(name, seconds), seconds)
                    floor, check = best["changed blocks read"], best["source check"]
                    rows.append([f"device holds {contents}, {'in page cache' if cached else 'evicted'}",
                                 f"{floor:.2f} s", f"{check:.2f} s", f"{check / floor:.2f}",
                                 f"{best['whole device read']:.2f} s"])
            finally:
                device.close()
    return rows


def timed_merge(work: Path, old: Path, diff: Path, changed_blocks: int,
                idle_read: float | None) -> tuple[float, float | None, str]:
    """Merge `diff` into a fresh copy of OLD: (MB/s of changed blocks from mount until
    `.status` says done, the MB/s of a sequential reader of system.img meanwhile if
    `idle_read` is given (else no reader), the final state)."""
    dev_copy, diff_copy = work / "dev-merge.raw", work / "diff-merge.img"
    shutil.copyfile(old, dev_copy)
    shutil.copyfile(diff, diff_copy)
    warm(dev_copy)
    warm(diff_copy)
    state_dir = work / "state-merge"
    shutil.rmtree(state_dir, ignore_errors=True)
    with fusesnap_mounted(work / "mnt-merge", "--system", dev_copy, "--diff", diff_copy,
                          "--state-dir", state_dir) as mount, \
            attached(mount / "system.img", read_only=True) as system:
        started = time.perf_counter()
        stop, result = threading.Event(), {}
        reader = threading.Thread(target=sequential_reader, args=(system, stop, result))
        if idle_read is not None:
            reader.start()
        while status_of(mount)["state"] == "merging":
            time.sleep(0.01)
        merge_seconds = time.perf_counter() - started
        stop.set()
        if idle_read is not None:
            reader.join()
        state = status_of(mount)["state"]
    return changed_blocks * BLOCK / merge_seconds / 1e6, result.get("mbps"), state


def paired(label, left_name, left_dev, right_name, right_dev, kind, runtime, repeat):
    best = {left_name: None, right_name: None}
    for round_ in range(repeat):
        order = [(left_name, left_dev), (right_name, right_dev)]
        if round_ % 2:
            order.reverse()
        for name, device in order:
            figures = fio_job(device, kind, runtime)
            print(f"  round {round_ + 1}/{repeat}  {label}  {name} {figures['mbps']:.1f} MB/s "
                  f"({figures['iops']:.0f} IOPS)", flush=True)
            if best[name] is None or figures["mbps"] > best[name]["mbps"]:
                best[name] = figures
    return best[left_name], best[right_name]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--changed", type=float, default=0.25, help="fraction of blocks changed")
    parser.add_argument("--runtime", type=float, default=10, help="seconds per fio run")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tmpdir", default=None)
    parser.add_argument("--source-check-only", action="store_true",
                        help="measure only the source check (part 3)")
    parser.add_argument("--pair", choices=("binary", "text"),
                        help="OLD and NEW from bench/pairs.py instead of generated images")
    parser.add_argument("--format", choices=("v0", "v1"), default=None,
                        help="diff format (default: fusesnap diff's)")
    args = parser.parse_args()
    require_root()
    terminate_as_interrupt()
    print("\n".join(header_lines()), flush=True)

    with scratch_dir("fusesnap-bench-update-", args.tmpdir) as work:
        if args.pair:
            from pairs import build_pair
            old, new = build_pair(args.pair)
        else:
            old, new, _ = make_images(work, args.size_mib << 20, args.changed)
        size = os.path.getsize(old)
        diff = work / "diff.img"
        started = time.perf_counter()
        run([*FUSESNAP, "diff", old, new, "-o", diff, "--quiet",
             *(["--format", args.format] if args.format else [])], cwd=REPO)
        diff_seconds = time.perf_counter() - started
        from fusesnap.formats.update_diff import DiffFile
        with DiffFile.open(diff) as opened:
            changed_blocks, version = opened.total_blocks, opened.version
        dev = work / "dev.raw"
        shutil.copyfile(old, dev)
        for path in (old, new, dev, diff):
            warm(path)
        print(f"images: {args.pair or 'generated'}, {size >> 20} MiB, {changed_blocks} of "
              f"{size // BLOCK} blocks changed; diff v{version} {os.path.getsize(diff) / 1e6:.1f} MB "
              f"made in {diff_seconds:.1f} s", flush=True)

        # 3. The source check (first: it needs no mount).
        check_rows = source_check_rows(diff, {"OLD": dev, "NEW": new}, args.repeat)
        check_table = format_table(["source check", "floor: read the changed blocks",
                                    "source check", "ratio", "for scale: read the whole device"],
                                   check_rows)
        if args.source_check_only:
            print()
            print(check_table)
            return 0

        # 1. Reads with the merge off.
        with fusesnap_mounted(work / "mnt", "--linear", new, "--system", dev, "--diff", diff,
                              "--state-dir", work / "state",
                              "--no-bg-update") as mount, \
                attached(new, read_only=True) as plain, \
                attached(mount / "linear.img", read_only=True) as linear, \
                attached(mount / "system.img", read_only=True) as system:
            seq_limit, seq_system = paired("seq read 1M qd8", "plain loop on NEW", plain,
                                           "system.img", system, "seqread", args.runtime, args.repeat)
            rand_limit, rand_system = paired("rand read 4K qd16", "linear.img", linear,
                                             "system.img", system, "randread", args.runtime,
                                             args.repeat)
            # The reader's idle figure: system.img before the merge, nothing else running.
            idle_read = read_for(system, 3.0)

        # 2. The merge, idle (a v1 diff beside the v0 diff of the same images, paired
        # rounds, best kept) and under a sequential reader.
        merges = {"merge, idle": diff}
        if version == 1:
            diff_v0 = work / "diff-v0.img"
            run([*FUSESNAP, "diff", old, new, "-o", diff_v0, "--quiet", "--format", "v0"], cwd=REPO)
            merges["for scale: merge of the v0 diff, idle"] = diff_v0
        best = {}
        for round_ in range(args.repeat):
            order = list(merges.items())
            if round_ % 2:
                order.reverse()
            for label, merged_diff in order:
                mbps, _, state = timed_merge(work, old, merged_diff, changed_blocks, None)
                print(f"  round {round_ + 1}/{args.repeat}  {label}: {mbps:.0f} MB/s", flush=True)
                if label not in best or mbps > best[label][0]:
                    best[label] = (mbps, state)
        merge_rows = [[label, f"{mbps:.0f} MB/s", "", "", ">= 100 MB/s" if label == "merge, idle" else "",
                       state] for label, (mbps, state) in best.items()]
        mbps, reader_mbps, state = timed_merge(work, old, diff, changed_blocks, idle_read)
        merge_rows.append(["merge with a reader running", f"{mbps:.0f} MB/s",
                           f"reader {reader_mbps:.0f} MB/s vs idle {idle_read:.0f} MB/s",
                           f"{reader_mbps / idle_read:.2f}", ">= 0.5", state])

    print()
    rows = [
        ["seq read 1M qd8", f"plain loop on NEW {seq_limit['mbps']:.0f} MB/s",
         f"{seq_system['mbps']:.0f} MB/s", f"{seq_system['mbps'] / seq_limit['mbps']:.2f}", ">= 0.5"],
        ["rand read 4K qd16", f"linear.img {rand_limit['iops']:.0f} IOPS",
         f"{rand_system['iops']:.0f} IOPS", f"{rand_system['iops'] / rand_limit['iops']:.2f}", ">= 0.5"],
    ]
    print(format_table(["workload", "limit", "system.img", "ratio", "target"], rows))
    print()
    print(format_table(["merge", "changed blocks merged", "foreground reads", "ratio", "target",
                        "state"], merge_rows))
    print()
    print(check_table)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
