"""Benchmark RangeMap on the shapes of the I/O path.

    python bench/bench_rangemap.py [--n 1000000] [--seed 1]

Phases, each N operations: random assignments (starts uniform over 2**32 blocks,
lengths 1..64, values from four values or None), random point lookups (get), and
free-space lookups (first_with_value). Prints per-phase time and ops/s, the final
number of ranges, peak memory, and one summary line for a README table with the
columns: N | assign | get | first_with_value | ranges | tracemalloc peak | RSS growth.

Peak memory is measured twice: tracemalloc's peak of Python allocations during the
assignment phase (run separately, because tracing slows everything down), and the
growth of the process's maximum resident set size over the untraced run.
"""

import argparse
import os
import random
import resource
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusesnap.rangemap import RangeMap  # noqa: E402

SPACE = 2 ** 32
MAX_LENGTH = 64
VALUES = ["a", "b", "c", "d"]


def max_rss_bytes():
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def make_inputs(n, seed):
    rng = random.Random(seed)
    choices = VALUES + [None]
    assigns = []
    for _ in range(n):
        start = rng.randrange(SPACE)
        assigns.append((start, start + rng.randint(1, MAX_LENGTH), rng.choice(choices)))
    points = [rng.randrange(SPACE) for _ in range(n)]
    wanted = [(rng.choice(VALUES), rng.randrange(SPACE)) for _ in range(n)]
    return assigns, points, wanted


def run_assigns(m, assigns):
    assign = m.assign
    for start, end, value in assigns:
        assign(start, end, value)


def run_gets(m, points):
    get = m.get
    for p in points:
        get(p)


def run_first_with_value(m, wanted):
    first = m.first_with_value
    for value, start in wanted:
        first(value, start)


def timed(label, n, fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    dt = time.perf_counter() - t0
    print(f"{label:<18} {n:>10,} ops  {dt:8.2f} s  {n / dt:>12,.0f} ops/s")
    return dt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="operations per phase (default 1000000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="run RangeMap.check() at the end")
    args = parser.parse_args(argv)
    n = args.n

    assigns, points, wanted = make_inputs(n, args.seed)
    print(f"python {sys.version.split()[0]}, n={n:,}, starts over 2**32, lengths 1..{MAX_LENGTH}, "
          f"values {VALUES} + None")

    rss_before = max_rss_bytes()
    m = RangeMap()
    t_assign = timed("assign", n, run_assigns, m, assigns)
    t_get = timed("get", n, run_gets, m, points)
    t_first = timed("first_with_value", n, run_first_with_value, m, wanted)
    rss_growth = max_rss_bytes() - rss_before
    ranges = len(m)
    if args.check:
        t0 = time.perf_counter()
        m.check()
        print(f"check()            {ranges:>10,} ranges {time.perf_counter() - t0:8.2f} s  ok")
    del m

    # The same assignments again under tracemalloc, for the peak of Python allocations.
    tracemalloc.start()
    m = RangeMap()
    run_assigns(m, assigns)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del m

    mib = 1024 * 1024
    print(f"final ranges       {ranges:>10,}")
    print(f"tracemalloc peak   {traced_peak / mib:10.1f} MiB  ({traced_peak / max(ranges, 1):.0f} B/range)")
    print(f"max RSS growth     {rss_growth / mib:10.1f} MiB")
    print(f"| {n:,} | {t_assign:.2f} s ({n / t_assign:,.0f}/s) | {t_get:.2f} s ({n / t_get:,.0f}/s) "
          f"| {t_first:.2f} s ({n / t_first:,.0f}/s) | {ranges:,} | {traced_peak / mib:.0f} MiB "
          f"| {rss_growth / mib:.0f} MiB |")


if __name__ == "__main__":
    main()
