#!/usr/bin/env python3
"""Measure choices of the v1 diff design on the benchmark pairs, before building them out.

For each pair (bench/pairs.py), the changed blocks go into chunks of CHUNK blocks in
dest order as `fusesnap diff` does, and each chunk is compressed (zstd, --level):

  v0          on its own (today's format, chunk data only)
  unchanged   against old blocks the update leaves unchanged, found by the
              similarity index (the merge never overwrites a reference)
  any         against any old block, changed ones included (a merge would have to
              order and checkpoint around the references it overwrites)
  later       against old blocks the update leaves unchanged or changes in a later
              chunk (merged in chunk order, a chunk's references are still old
              while it is merged)
  same-dest   against the old contents of the chunk's own blocks (what an in-place
              delta of each block would see), for comparison

Prints chunk bytes per choice, references per chunk and the index's size.

    python bench/diff_design.py [--pair binary] [--level 3] [--limit 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import zstandard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fusesnap import similarity  # noqa: E402
from fusesnap.similarity import SimilarityIndex, choose_references  # noqa: E402
from pairs import PAIRS, build_pair  # noqa: E402

BS = 4096
CHUNK = 128


def compress(data: bytes, level: int, reference: bytes | None) -> int:
    if reference:
        d = zstandard.ZstdCompressionDict(reference, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        c = zstandard.ZstdCompressor(level=level, dict_data=d, write_checksum=True,
                                     write_content_size=True, write_dict_id=False)
    else:
        c = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return len(c.compress(data))


def measure(name: str, level: int, limit: int, anchor_rate: int) -> None:
    old_path, new_path = build_pair(name)
    old = np.fromfile(old_path, dtype=np.uint8).reshape(-1, BS)
    new = np.fromfile(new_path, dtype=np.uint8).reshape(-1, BS)
    changed_mask = (old != new).any(axis=1)
    changed = np.flatnonzero(changed_mask)
    print(f"{name}: {len(old) * BS >> 20} MiB images, {len(changed)} blocks changed "
          f"({len(changed) * BS / 2**20:.1f} MiB)")
    t0 = time.monotonic()
    indexes = {}
    for variant, allowed in (("unchanged", ~changed_mask), ("any", np.ones(len(old), bool))):
        index = SimilarityIndex(len(old), BS, anchor_rate=anchor_rate)
        step = 2048
        for start in range(0, len(old), step):
            f, b = index.features(old[start:start + step].tobytes())
            keep = allowed[b + start]
            index.add(f[keep], b[keep] + np.uint32(start))
        index.freeze()
        indexes[variant] = (index, allowed)
    print(f"  index: {len(indexes['unchanged'][0])} features ({indexes['unchanged'][0].nbytes / 2**20:.1f} MiB) "
          f"over unchanged blocks, {len(indexes['any'][0])} over all; built in "
          f"{time.monotonic() - t0:.1f} s")
    totals = dict.fromkeys(("v0", "unchanged", "any", "later", "same-dest"), 0)
    refs = dict.fromkeys(("unchanged", "any", "later"), 0)
    chunk_of = np.full(len(old), -1, np.int64)
    chunk_of[changed] = np.arange(len(changed)) // CHUNK
    referenced_changed = np.zeros(len(old), bool)
    times = dict.fromkeys(totals, 0.0)
    n_chunks = 0
    for start in range(0, len(changed), CHUNK):
        dests = changed[start:start + CHUNK]
        data = new[dests].tobytes()
        n_chunks += 1
        t = time.monotonic()
        totals["v0"] += compress(data, level, None)
        times["v0"] += time.monotonic() - t
        for variant, (index, allowed) in (*indexes.items(),
                                          ("later", (indexes["any"][0], (chunk_of < 0) | (chunk_of > n_chunks - 1)))):
            t = time.monotonic()
            blocks = choose_references(index, data, limit, allowed)
            if variant == "any":
                referenced_changed[blocks] = True
            refs[variant] += len(blocks)
            totals[variant] += compress(data, level, old[blocks].tobytes() if blocks else None)
            times[variant] += time.monotonic() - t
        t = time.monotonic()
        totals["same-dest"] += compress(data, level, old[dests].tobytes())
        times["same-dest"] += time.monotonic() - t
    for variant, size in totals.items():
        extra = f", {refs[variant] / n_chunks:.0f} refs/chunk" if variant in refs else ""
        print(f"  {variant:<10} {size / 1e6:8.2f} MB  {size / totals['v0']:.3f} of v0  "
              f"{times[variant]:6.1f} s{extra}")
    scratch = int((referenced_changed & changed_mask).sum())
    print(f"  any: {scratch} changed old blocks are referenced ({scratch * BS / 2**20:.1f} MiB, "
          f"{scratch / len(changed):.2f} of the changed blocks)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=sorted(PAIRS), action="append")
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--limit", type=int, default=2 * CHUNK, help="reference blocks per chunk")
    ap.add_argument("--anchor-rate", type=int, default=similarity.ANCHOR_RATE,
                    help="about one feature per this many bytes")
    args = ap.parse_args()
    print(f"zstd level {args.level}, chunks of {CHUNK} blocks, at most {args.limit} reference "
          f"blocks per chunk, a feature per {args.anchor_rate} bytes")
    for name in args.pair or sorted(PAIRS):
        measure(name, args.level, args.limit, args.anchor_rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
