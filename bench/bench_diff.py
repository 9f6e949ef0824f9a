#!/usr/bin/env python3
"""Benchmark `fusesnap diff` against its targets.

Makes OLD, NEW_10 (OLD with 10% of its 4 KiB blocks rewritten at random) and NEW_ALL
(every block different) in a temp dir, from a compressible mix: Zipf-distributed
words with punctuation (text), little-endian records with counters and small fields
(binary), random bytes (already-compressed files) and sparse blocks (mostly zeros).
Then it prints, side by side with the targets:

- scan speed of the 10% diff (NEW size / wall time), target >= 400 MB/s;
- compression speed of the every-block diff vs `zstd -T0 -3 -c NEW_ALL > /dev/null`,
  target >= 0.8 of zstd's speed;
- diff size vs `zstd -3` of the changed blocks of NEW alone, concatenated, target <= 1.05;
- peak RSS of the diff process (wait4 rusage of a subprocess), target < 256 MiB.

    python bench/bench_diff.py                 # 1 GiB images
    python bench/bench_diff.py --size-mib 128  # quicker
    python bench/bench_diff.py --sweep 16,32,64,128,256   # diff size per chunk_blocks
    python bench/bench_diff.py --pairs          # real software (bench/pairs.py) vs delta tools
    python bench/bench_diff.py --pairs text --level-only 19   # one level vs zstd (cached)

With --pairs it measures instead, on each benchmark pair from real software (ext4
images of a Python tree whose packages were upgraded in place, bench/pairs.py), in one
run: `fusesnap diff` (v0; v1 at its default level and at 19) as users run it,
`xdelta3 -9 -s OLD NEW` and `zstd -19 --long=30 --patch-from=OLD NEW` (size, wall and
CPU time, peak RSS each), then issue 12's targets beside the figures: v1's size
against v0, xdelta3 and zstd, its scan speed (image size / wall time, best of 3
interleaved with v0's) and peak RSS; and last, the peak RSS of a v1 diff of a
synthetic 10 GiB sparse pair (--memory-gib). xdelta3 is Debian's (apt-get install
xdelta3), not a test dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fusesnap.formats.update_diff import DiffFile  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BS = 4096
SEGMENT = 64 * 1024
POOL_BYTES = 48 << 20


def _text(rng: random.Random, n: int) -> bytes:
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkjqxz") for _ in range(rng.randint(1, 10)))
             for _ in range(3000)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    seps = [" "] * 12 + [", ", ". ", "\n", "\n\n", "(", ") ", ": ", "_", "/"]
    out = []
    size = 0
    while size < n:
        ws = rng.choices(words, weights, k=4096)
        ss = rng.choices(seps, k=4096)
        piece = "".join(w + s for w, s in zip(ws, ss)).encode()
        out.append(piece)
        size += len(piece)
    return b"".join(out)[:n]


def _binary(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    counter = rng.randrange(1 << 20)
    while len(out) < n:
        counter += rng.randint(1, 3)
        out += counter.to_bytes(4, "little")
        out += rng.randrange(256).to_bytes(2, "little")
        out += bytes([rng.randrange(4), 0])
        out += rng.randbytes(4) if rng.random() < 0.3 else b"\0\0\0\0"
        out += (rng.choice((0x1000, 0x2000, 0x8000, 0x10000)) * rng.randint(1, 4)).to_bytes(4, "little")
    return bytes(out[:n])


def _sparse(rng: random.Random, n: int) -> bytes:
    out = bytearray(n)
    for _ in range(n // 512):
        pos = rng.randrange(n - 64)
        out[pos:pos + 16] = rng.randbytes(16)
    return bytes(out)


def make_pool(seed: int) -> bytes:
    """48 MiB of mixed material in 64 KiB segments: 45% text, 25% binary, 20% random, 10% sparse."""
    rng = random.Random(seed)
    kinds = rng.choices(["text", "binary", "random", "sparse"], [45, 25, 20, 10],
                        k=POOL_BYTES // SEGMENT)
    need = {k: kinds.count(k) * SEGMENT for k in set(kinds)}
    material = {
        "text": _text(rng, need.get("text", 0)),
        "binary": _binary(rng, need.get("binary", 0)),
        "random": rng.randbytes(need.get("random", 0)),
        "sparse": _sparse(rng, need.get("sparse", 0)) if need.get("sparse") else b"",
    }
    used = dict.fromkeys(material, 0)
    parts = []
    for k in kinds:
        parts.append(material[k][used[k]:used[k] + SEGMENT])
        used[k] += SEGMENT
    return b"".join(parts)


def make_images(workdir: str, size: int, seed: int) -> tuple[str, str, str, int]:
    """OLD, NEW_10, NEW_ALL; returns paths and the number of blocks rewritten in NEW_10."""
    rng = random.Random(seed)
    pool = make_pool(seed)
    region = 1 << 20
    paths = [os.path.join(workdir, n) for n in ("old.img", "new10.img", "newall.img")]
    nblocks = size // BS
    changed = sorted(rng.sample(range(nblocks), nblocks // 10))
    ci = 0
    with open(paths[0], "wb") as old, open(paths[1], "wb") as new10, open(paths[2], "wb") as newall:
        for start in range(0, size, region):
            n = min(region, size - start)
            o = rng.randrange(len(pool) - n) & ~7
            data = pool[o:o + n]
            old.write(data)
            # NEW_ALL: the same kind of material shifted by a few bytes, so every block differs
            shift = rng.randrange(1, 4096)
            a = (o + shift) % (len(pool) - n)
            alld = bytearray(pool[a:a + n])
            for b in range(0, n, BS):   # guarantee each block differs (sparse blocks may not)
                alld[b + 8] ^= 0x5A
            newall.write(alld)
            d = bytearray(data)
            first = start // BS
            while ci < len(changed) and changed[ci] < first + n // BS:
                b = (changed[ci] - first) * BS
                p = rng.randrange(len(pool) - BS)
                d[b:b + BS] = pool[p:p + BS]
                d[b] ^= 0xFF if d[b] == data[b] else 0
                ci += 1
            new10.write(d)
    return paths[0], paths[1], paths[2], len(changed)


def run_diff_subprocess(old: str, new: str, out: str, extra: dict) -> tuple[float, int, dict]:
    """(wall seconds, peak RSS bytes, stats) of build_diff in a fresh interpreter;
    stats["cpu"] is its user + system CPU seconds."""
    code = (
        "import json, sys, dataclasses; sys.path.insert(0, sys.argv[1]);"
        "from fusesnap.diffing import build_diff;"
        "kw = json.loads(sys.argv[5]);"
        "s = build_diff(sys.argv[2], sys.argv[3], sys.argv[4], **kw);"
        "print(json.dumps(dataclasses.asdict(s)))"
    )
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, ROOT, old, new, out, json.dumps(extra)],
                            stdout=subprocess.PIPE)
    stdout = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"diff failed with status {proc.returncode}")
    stats = json.loads(stdout)
    stats["cpu"] = rusage.ru_utime + rusage.ru_stime
    return elapsed, rusage.ru_maxrss * 1024, stats


def time_cmd(argv: list[str], stdout_path: str = "/dev/null") -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS bytes) of a command."""
    with open(stdout_path, "wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, cwd=ROOT)
        _, status, rusage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{argv} failed")
    return elapsed, rusage.ru_utime + rusage.ru_stime, rusage.ru_maxrss * 1024


def changed_blocks_file(diff_path: str, new_path: str, out_path: str) -> int:
    """Concatenate the blocks of NEW the diff holds; returns their number."""
    n = 0
    with DiffFile.open(diff_path) as d, open(new_path, "rb") as new, open(out_path, "wb") as out:
        for dest, count, _, _ in d.runs():
            new.seek(dest * d.block_size)
            out.write(new.read(count * d.block_size))
            n += count
    return n


def zstd_size(path: str, level: int = 3) -> int:
    out = subprocess.run(["zstd", f"-{level}", "-c", "-q", path], check=True,
                         stdout=subprocess.PIPE).stdout
    return len(out)


PEERS = {"xdelta3 -9": lambda old, new, out: ["xdelta3", "-9", "-f", "-e", "-s", old, new, out],
         "zstd -19 --long --patch-from": lambda old, new, out: [
             "zstd", "-q", "-f", "-19", "--long=30", f"--patch-from={old}", new, "-o", out]}
# `fusesnap diff` settings measured on the pairs: (label, options). (v0 at level 19,
# 0.85-0.90 of v0's size in 50-110 s, is left out: it is not a target.)
FUSESNAP_VARIANTS = [("v0", ["--format", "v0"]), ("v1", ["--format", "v1"]),
                     ("v1 --level 19", ["--format", "v1", "--level", "19"])]
SCAN_RUNS = 3       # v1 at its default level is timed this many times, interleaved with v0


def run_tool(argv: list[str], out: str) -> dict:
    """Size of what a command wrote to `out`, its wall and CPU seconds, peak RSS."""
    elapsed, cpu, rss = time_cmd(argv)
    size = os.path.getsize(out)
    os.unlink(out)
    return {"size": size, "wall": elapsed, "cpu": cpu, "rss": rss}


def fusesnap_diff(options: list[str], old: str, new: str, out: str) -> list[str]:
    """`fusesnap diff` as a user runs it (python -m fusesnap: no shell wrapper)."""
    return [sys.executable, "-m", "fusesnap", "diff", "-q", *options, old, new, "-o", out]


def measure_pairs(names: list[str], workdir: str, memory_gib: int) -> None:
    """Every tool on every pair, then the issue's targets beside the figures."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pairs import build_pair
    mb = 1e6
    out = os.path.join(workdir, "out.diff")
    for name in names:
        old, new = map(str, build_pair(name))
        subprocess.run(["cat", old, new], stdout=subprocess.DEVNULL, check=True)  # warm cache
        size = os.path.getsize(new)
        runs: dict[str, list[dict]] = {}
        # the default settings' scan speed is the figure most exposed to the load of
        # the (shared) machine: best of SCAN_RUNS, interleaved with v0's
        for _ in range(SCAN_RUNS):
            for label in ("v0", "v1"):
                options = dict(FUSESNAP_VARIANTS)[label]
                runs.setdefault(label, []).append(run_tool(fusesnap_diff(options, old, new, out), out))
        for label, options in FUSESNAP_VARIANTS:
            if label not in runs:
                runs[label] = [run_tool(fusesnap_diff(options, old, new, out), out)]
        for label, argv in PEERS.items():
            runs[label] = [run_tool(argv(old, new, out), out)]
        best = {label: min(results, key=lambda r: r["wall"]) for label, results in runs.items()}
        changed = _changed_bytes(old, new)
        print(f"pair {name}: {size >> 20} MiB images, {changed / 2**20:.1f} MiB of 4 KiB blocks "
              f"changed; load average {os.getloadavg()[0]:.1f}")
        print(f"  {'':<32} {'size MB':>9} {'wall s':>7} {'MB/s':>6} {'CPU s':>6} {'peak RSS':>9}")
        for label, r in best.items():
            runs_note = f" (best of {len(runs[label])})" if len(runs[label]) > 1 else ""
            tool = label if label in PEERS else f"fusesnap diff {label}"
            print(f"  {tool + runs_note:<32} {r['size'] / mb:9.2f} {r['wall']:7.1f} "
                  f"{size / r['wall'] / mb:6.0f} {r['cpu']:6.1f} {r['rss'] / 2**20:6.0f} MiB")
        v0, v1, v1_19 = best["v0"]["size"], best["v1"]["size"], best["v1 --level 19"]["size"]
        xdelta, zstd19 = best["xdelta3 -9"]["size"], best["zstd -19 --long --patch-from"]["size"]
        scan = size / best["v1"]["wall"] / mb
        row("target (issue 12)", "value", "limit")
        row("v1 size / v0", f"{v1 / v0:.2f}", "<= 0.6", v1 / v0 <= 0.6)
        row("v1 size / xdelta3 -9", f"{v1 / xdelta:.2f}", "<= 1.5", v1 / xdelta <= 1.5)
        row("v1 scan speed (image / wall)", f"{scan:.0f} MB/s", ">= 100 MB/s", scan >= 100)
        row("v1 --level 19 size / zstd --patch-from", f"{v1_19 / zstd19:.2f}", "<= 1.1",
            v1_19 / zstd19 <= 1.1)
        row("v1 peak RSS", f"{best['v1']['rss'] / 2**20:.0f} MiB", "", None)
    if memory_gib:
        measure_memory(workdir, memory_gib)


def measure_level(names: list[str], workdir: str, level: int) -> None:
    """Only `fusesnap diff --level LEVEL` on each pair, its bytes by part, beside
    `zstd -19 --long --patch-from`'s size, measured once per pair and kept next to
    its images (zstd is deterministic): the quick loop for tuning the high levels."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pairs import build_pair
    mb = 1e6
    out = os.path.join(workdir, "out.diff")
    zstd_label = "zstd -19 --long --patch-from"
    for name in names:
        old, new = map(str, build_pair(name))
        cache = os.path.join(os.path.dirname(new), "zstd-patch-from.json")
        version = subprocess.run(["zstd", "--version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        key = {"zstd": version, "old": os.path.getmtime(old), "new": os.path.getmtime(new)}
        cached = {}
        if os.path.exists(cache):
            with open(cache) as f:
                cached = json.load(f)
        if cached.get("key") != key:
            cached = {"key": key, "size": run_tool(PEERS[zstd_label](old, new, out), out)["size"]}
            with open(cache, "w") as f:
                json.dump(cached, f)
        elapsed, cpu, rss = time_cmd(fusesnap_diff(["--format", "v1", "--level", str(level)],
                                                   old, new, out))
        with DiffFile.open(out) as d:
            chunks = sum(d.chunk_extent(c)[1] for c in range(d.n_chunks))
            directory = d.superblock.dir_compressed_size
            size = d.file_size
        os.unlink(out)
        print(f"pair {name}: fusesnap diff --level {level} {size / mb:.3f} MB (chunks "
              f"{chunks / mb:.3f}, directory {directory / mb:.3f}, superblock and trailer "
              f"{(size - chunks - directory) / mb:.3f}) "
              f"in {elapsed:.1f} s, CPU {cpu:.1f} s, peak RSS {rss / 2**20:.0f} MiB; "
              f"{zstd_label} {cached['size'] / mb:.3f} MB (cached): {size / cached['size']:.3f}")


DENSE_FRACTION = 0.3     # of the synthetic large pair's blocks that hold data
EXTENT = 64 << 20        # its data sits in extents this long


def make_large_pair(workdir: str, gib: int, seed: int = 1) -> dict:
    """A sparse OLD and NEW of `gib` GiB: DENSE_FRACTION of OLD's extents hold random
    bytes (the index's worst case per block: every block has MAX_PER_BLOCK features),
    the rest are holes (free space). NEW rewrites 10% of the blocks of each data
    extent and fills one free extent. Returns their paths, OLD's data blocks, NEW's
    changed blocks and the index's bounds."""
    import numpy as np
    sys.path.insert(0, ROOT)
    from fusesnap import similarity
    rng = np.random.default_rng(seed)
    size = gib << 30
    n_extents = size // EXTENT
    dense = [e for e in range(n_extents) if int((e + 1) * DENSE_FRACTION) > int(e * DENSE_FRACTION)]
    filled = next(e for e in range(n_extents) if e not in dense)
    paths = [os.path.join(workdir, n) for n in ("large-old.img", "large-new.img")]
    changed = 0
    with open(paths[0], "wb") as old, open(paths[1], "wb") as new:
        old.truncate(size)
        new.truncate(size)
        for e in dense:
            data = rng.bytes(EXTENT)
            os.pwrite(old.fileno(), data, e * EXTENT)
            blocks = np.frombuffer(data, np.uint8).reshape(-1, BS).copy()
            rewrite = rng.choice(len(blocks), len(blocks) // 10, replace=False)
            blocks[rewrite] = rng.integers(0, 256, (len(rewrite), BS), dtype=np.uint8)
            os.pwrite(new.fileno(), blocks.tobytes(), e * EXTENT)
            changed += len(rewrite)
        os.pwrite(new.fileno(), rng.bytes(EXTENT), filled * EXTENT)
        changed += EXTENT // BS
    return {"old": paths[0], "new": paths[1], "data_blocks": len(dense) * EXTENT // BS,
            "changed": changed, "index_per_block": similarity.MAX_PER_BLOCK * 8,
            "index_cap": similarity.INDEX_BYTES}


def measure_memory(workdir: str, gib: int) -> None:
    """Peak RSS of `fusesnap diff --format v1` on a synthetic pair of `gib` GiB, and
    what it would be if every block held data and had changed (extrapolated)."""
    t0 = time.monotonic()
    # in a child process, as the diff's: this process stays small (a child's peak RSS
    # starts from its parent's when it is spawned)
    made = json.loads(subprocess.run([sys.executable, os.path.abspath(__file__), "--make-large-pair",
                                      workdir, str(gib)], check=True, stdout=subprocess.PIPE).stdout)
    old, new, data_blocks, changed = made["old"], made["new"], made["data_blocks"], made["changed"]
    index_per_block, index_cap = made["index_per_block"], made["index_cap"]
    made = time.monotonic() - t0
    out = os.path.join(workdir, "large.diff")
    r = run_tool(fusesnap_diff(["--format", "v1"], old, new, out), out)
    blocks = (gib << 30) // BS
    per_changed = 16         # the dest (8 bytes) and the old block's hash (8 bytes)
    worst = (r["rss"] + min(index_cap, blocks * index_per_block) - data_blocks * index_per_block
             + (blocks - changed) * per_changed)
    print(f"large pair: {gib} GiB sparse images, {data_blocks * BS / 2**30:.1f} GiB of data in OLD, "
          f"{changed * BS / 2**30:.2f} GiB changed (made in {made:.0f} s); load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"  fusesnap diff --format v1: {r['size'] / 1e6:.1f} MB in {r['wall']:.1f} s "
          f"({(gib << 30) / r['wall'] / 1e6:.0f} MB/s), CPU {r['cpu']:.1f} s")
    row("peak RSS, as measured", f"{r['rss'] / 2**20:.0f} MiB", "< 512 MiB", r["rss"] < 512 << 20)
    row("every block data and changed", f"{worst / 2**20:.0f} MiB", "< 512 MiB", worst < 512 << 20)
    print(f"  (extrapolated: + {index_per_block} B of index per block that holds data, at most "
          f"{index_cap >> 20} MiB, + {per_changed} B per changed block)")
    os.unlink(old)
    os.unlink(new)


def _changed_bytes(old: str, new: str) -> int:
    changed = 0
    with open(old, "rb") as a, open(new, "rb") as b:
        while True:
            x, y = a.read(8 << 20), b.read(8 << 20)
            if not y:
                return changed
            changed += sum(x[o:o + BS] != y[o:o + BS] for o in range(0, len(y), BS)) * BS


def row(name: str, value: str, target: str, ok: bool | None = None, width: int = 40) -> None:
    mark = "" if ok is None else ("ok" if ok else "MISSED")
    print(f"  {name:<{width}} {value:>26}   {target:<22} {mark}")


def main() -> int:
    if sys.argv[1:2] == ["--make-images"]:
        workdir, size, seed = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(make_images(workdir, size, seed)))
        return 0
    if sys.argv[1:2] == ["--make-large-pair"]:
        print(json.dumps(make_large_pair(sys.argv[2], int(sys.argv[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="image size in MiB (default 1024)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chunk-blocks", type=int, default=None, help="default: fusesnap's default")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3, help="runs per speed measurement, best kept")
    ap.add_argument("--pairs", nargs="?", const="binary,text", default=None,
                    help="measure on pairs from real software (default: binary,text)")
    ap.add_argument("--memory-gib", type=int, default=None,
                    help="peak RSS of a v1 diff of a synthetic sparse pair this large, 30%% data "
                    "(with --pairs: 10 GiB by default, 0 to skip)")
    ap.add_argument("--sweep", default=None,
                    help="comma-separated chunk_blocks values: print diff size and time for each")
    ap.add_argument("--level-only", type=int, default=None, metavar="LEVEL",
                    help="with --pairs: only v1 at this level, beside zstd --patch-from's size "
                    "(measured once, cached next to the pair)")
    args = ap.parse_args()
    if args.pairs and args.memory_gib is None:
        args.memory_gib = 10
    size = args.size_mib << 20
    workdir = tempfile.mkdtemp(prefix="bench-diff-", dir=args.dir)
    try:
        if args.pairs and args.level_only is not None:
            measure_level(args.pairs.split(","), workdir, args.level_only)
            return 0
        if args.pairs:
            measure_pairs(args.pairs.split(","), workdir, args.memory_gib)
            return 0
        if args.memory_gib:
            measure_memory(workdir, args.memory_gib)
            return 0
        t0 = time.monotonic()
        # in a child process: a fork of a big parent would inflate the diff child's peak RSS
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--make-images", workdir,
                              str(size), str(args.seed)], check=True, stdout=subprocess.PIPE).stdout
        old, new10, newall, n_changed = json.loads(out)
        subprocess.run(["cat", old, new10, newall], stdout=subprocess.DEVNULL, check=True)  # warm cache
        print(f"images: {args.size_mib} MiB each in {workdir}, made in {time.monotonic() - t0:.1f} s; "
              f"{os.cpu_count()} CPUs; zstd level 3; load average {os.getloadavg()[0]:.1f}")
        extra = {}
        if args.chunk_blocks:
            extra["chunk_blocks"] = args.chunk_blocks
        if args.threads:
            extra["threads"] = args.threads
        diff10 = os.path.join(workdir, "d10.diff")
        diffall = os.path.join(workdir, "dall.diff")
        blocks10 = os.path.join(workdir, "changed10.bin")
        mb = 1e6

        if args.sweep:
            changed_blocks_file_done = False
            print(f"{'chunk_blocks':>12} {'KiB':>5} {'diff MB':>9} {'zstd -3 MB':>11} {'ratio':>6} "
                  f"{'time s':>7} {'MB/s':>6}   (10% changed)")
            for cb in [int(x) for x in args.sweep.split(",")]:
                el, rss, st = run_diff_subprocess(old, new10, diff10, dict(extra, chunk_blocks=cb))
                if not changed_blocks_file_done:
                    changed_blocks_file(diff10, new10, blocks10)
                    ref = zstd_size(blocks10)
                    changed_blocks_file_done = True
                print(f"{cb:>12} {cb * BS // 1024:>5} {st['diff_size'] / mb:>9.2f} {ref / mb:>11.2f} "
                      f"{st['diff_size'] / ref:>6.3f} {el:>7.2f} {size / el / mb:>6.0f}")
            return 0

        # Best of --repeat, interleaved: other processes on the machine make single runs noisy.
        el10 = elall = zstd_all = float("inf")
        rss10 = rssall = 0
        for _ in range(args.repeat):
            e, r, st10 = run_diff_subprocess(old, new10, diff10, extra)
            el10, rss10 = min(el10, e), max(rss10, r)
            e, r, stall = run_diff_subprocess(old, newall, diffall, extra)
            elall, rssall = min(elall, e), max(rssall, r)
            e, zstd_cpu, _ = time_cmd(["zstd", "-T0", "-3", "-q", "-c", newall])
            zstd_all = min(zstd_all, e)
        changed_blocks_file(diff10, new10, blocks10)
        ref10 = zstd_size(blocks10)
        blocksall = os.path.join(workdir, "changedall.bin")
        changed_blocks_file(diffall, newall, blocksall)
        refall = zstd_size(blocksall)

        print(f"chunk_blocks {st10['chunk_blocks']} ({st10['chunk_blocks'] * BS // 1024} KiB), "
              f"{st10['changed_blocks']} of {size // BS} blocks changed in NEW_10 "
              f"({n_changed} rewritten), {stall['changed_blocks']} in NEW_ALL")
        print(f"  {'measure (best of ' + str(args.repeat) + ')':<34} {'fusesnap diff':>26}   "
              f"{'target / reference':<22}")
        scan = size / el10 / mb
        row("10%: scan speed (NEW / wall)", f"{scan:,.0f} MB/s ({el10:.2f} s)", ">= 400 MB/s", scan >= 400)
        ours = size / elall / mb
        ref = size / zstd_all / mb
        row("100%: compression speed", f"{ours:,.0f} MB/s ({elall:.2f} s)",
            f"zstd -T0 -3 {ref:,.0f} MB/s", None)
        row("100%: speed / zstd -T0 -3", f"{ours / ref:.2f}", ">= 0.80", ours / ref >= 0.8)
        row("100%: CPU seconds (last run)", f"{stall['cpu']:.2f} s", f"zstd -T0 -3 {zstd_cpu:.2f} s",
            None)
        row("10%: CPU seconds (last run)", f"{st10['cpu']:.2f} s", "", None)
        r10 = st10["diff_size"] / ref10
        row("10%: diff size / zstd -3 changed", f"{st10['diff_size'] / mb:.2f} / {ref10 / mb:.2f} MB = {r10:.3f}",
            "<= 1.05", r10 <= 1.05)
        rall = stall["diff_size"] / refall
        row("100%: diff size / zstd -3 changed",
            f"{stall['diff_size'] / mb:.2f} / {refall / mb:.2f} MB = {rall:.3f}", "<= 1.05", rall <= 1.05)
        row("10%: peak RSS", f"{rss10 / 2**20:.0f} MiB", "< 256 MiB", rss10 < 256 << 20)
        row("100%: peak RSS", f"{rssall / 2**20:.0f} MiB", "< 256 MiB", rssall < 256 << 20)
        row("100%: compression ratio", f"{size / stall['diff_size']:.2f}", "", None)
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share the CPUs)")
        return 0
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
