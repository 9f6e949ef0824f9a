"""A map from half-open integer ranges ``[start, end)`` to values.

This module owns the one data structure every block image uses to say where its
blocks live: which extents of an update overlay are written, which blocks a
backup-on-write target has already copied, which parts of a snapshot's store are
free. It is plain Python on ``sortedcontainers`` and knows nothing of FUSE, trio or
disks, so it can be tested (and fuzzed) on its own.

Representation
    ``_starts`` is a ``SortedList`` of range starts and ``_ranges`` maps each start
    to ``(end, value)``. The map is always canonical: ranges are non-empty, do not
    overlap, ``None`` is never stored (it means "unmapped"), and two ranges that
    touch never have equal values (they are coalesced into one). Alongside, a
    per-value index (value -> ``SortedList`` of starts) and per-value length
    counters make ``first_with_value`` O(log n) and ``length_of`` O(1). Memory grows
    with the number of ranges, never with the span they cover. ``check()``
    re-derives all of this from the data.

    Speed: ``SortedList`` has no public "neighbours of x" lookup; going through
    positions (``bisect`` then ``sl[i]``) walks its position index in Python and
    costs several times a plain bisect. ``_split`` therefore reads the two lists
    sortedcontainers documents in its "Implementation Details" (``_maxes``, the
    maximum of each sublist, and ``_lists``, the sorted sublists) and finds both
    neighbours with two C-level bisects. It never writes them: every mutation goes
    through the public API, which keeps them consistent.

Concurrency contract
    Every method is synchronous and never awaits. Callers running under trio rely on
    this: a mutation is atomic with respect to other tasks, because no task switch
    can happen inside it. Keep it that way; an ``await`` (or a thread) inside a map
    update would let another task see a half-updated map. Results that callers walk
    while awaiting -- ``overlapping()``, ``segments()``, ``snapshot()`` -- are
    returned as lists computed at call time, so later mutations cannot disturb
    them. ``iter(rangemap)`` is lazy and, like iterating a dict, must not be
    interleaved with mutations.

Values must be hashable; they are compared with ``==`` (so, as for dict keys,
``1``, ``1.0`` and ``True`` are the same value).
"""

from bisect import bisect_left, bisect_right

from sortedcontainers import SortedList

__all__ = ["RangeMap", "RangeMapCorrupt"]


class RangeMapCorrupt(Exception):
    """``RangeMap.check()`` found a broken invariant; the message says which."""


class RangeMap:
    """Half-open integer ranges ``[start, end)`` mapped to values; see the module docstring."""

    __slots__ = ("_starts", "_ranges", "_index", "_lengths")

    def __init__(self, *, index_values=True):
        """``index_values=False`` drops the per-value index and counters (and with them
        ``first_with_value`` and ``length_of``): for maps whose values are nearly all
        distinct, such as locations, where an index would cost a SortedList per range."""
        self._starts = SortedList()  # starts of all ranges
        self._ranges = {}            # start -> (end, value)
        # value -> SortedList of starts of ranges with that value; None: not kept
        self._index = {} if index_values else None
        # value -> total length of ranges with that value; None: not kept
        self._lengths = {} if index_values else None

    # -- mutation ----------------------------------------------------------------

    def assign(self, start, end, value):
        """Map ``[start, end)`` to ``value`` (``None`` unmaps it).

        Ranges the new one overlaps are cut back or split; touching or overlapping
        ranges with an equal value are merged with it. ``start == end`` does nothing;
        ``start > end`` raises ``ValueError``.
        """
        if start >= end:
            if start > end:
                raise ValueError(f"range start {start} > end {end}")
            return
        starts = self._starts
        ranges = self._ranges

        # The affected run: every range overlapping [start, end), plus a neighbour
        # that touches it with an equal value (it merges); consecutive in _starts.
        # Of the ranges beginning before `start`, only the last one can reach it.
        before, after = _split(starts, start, bisect_left)
        affected = []
        if before is not None:
            e, v = ranges[before]
            if e > start or (e == start and v == value):
                affected.append((before, e, v))
        if after is not None and after <= end:
            for s in starts.irange(after, end):
                e, v = ranges[s]
                if s == end and v != value:
                    break
                affected.append((s, e, v))

        if not affected:
            if value is not None:
                self._add(start, end, value)
            return

        # What replaces the run: a left remnant, the new range, a right remnant.
        # Remnants with an equal value are absorbed into the new range instead.
        pieces = []
        new_start, new_end = start, end
        first_start, _, first_value = affected[0]
        if first_start < start:
            if first_value == value:
                new_start = first_start
            else:
                pieces.append((first_start, start, first_value))
        _, last_end, last_value = affected[-1]
        tail = None
        if last_end > end:
            if last_value == value:
                new_end = last_end
            else:
                tail = (end, last_end, last_value)
        if value is not None:
            pieces.append((new_start, new_end, value))
        if tail is not None:
            pieces.append(tail)
        self._replace(affected, pieces)

    def clear(self, start, end):
        """Unmap ``[start, end)``; the same as ``assign(start, end, None)``."""
        self.assign(start, end, None)

    def _add(self, start, end, value):
        # A new range touching nothing of its own value (the common case of a write
        # to fresh space): one insertion per structure.
        self._starts.add(start)
        self._ranges[start] = (end, value)
        if self._index is None:
            return
        index = self._index.get(value)
        if index is None:
            self._index[value] = SortedList((start,))
            self._lengths[value] = end - start
        else:
            index.add(start)
            self._lengths[value] += end - start

    def _replace(self, old, new):
        # Replace the ranges `old` (consecutive in _starts) by `new`. Only old[0]'s
        # start can reappear in `new`, and only as new[0]'s start: the left remnant
        # or a left-merged range keeps it, or the new range begins exactly there.
        # Every other new start (`start` or `end` of the assignment) lies strictly
        # inside a gap or an old range, so it is not in _starts yet.
        starts, ranges, index, lengths = self._starts, self._ranges, self._index, self._lengths
        first_start, _, first_value = old[0]
        kept = bool(new) and new[0][0] == first_start
        gone = old[1:] if kept else old
        if len(gone) > _BULK:
            # One slice deletion instead of many single removals (e.g. discarding a
            # whole image); this needs positions, which are only worth it here.
            lo = starts.bisect_left(gone[0][0])
            del starts[lo:lo + len(gone)]
        else:
            for s, _, _ in gone:
                starts.remove(s)
        if index is None:
            for s, _, _ in old:
                if s != first_start or not kept:
                    del ranges[s]
            for n, (s, e, v) in enumerate(new):
                ranges[s] = (e, v)
                if not (n == 0 and kept):
                    starts.add(s)
            return
        for s, e, v in old:
            total = lengths[v] - (e - s)
            if total:
                lengths[v] = total
            else:
                del lengths[v]
            if s == first_start and kept and new[0][2] == v:
                continue  # the same start keeps its value: the index entry stays
            starts_of_v = index[v]
            starts_of_v.remove(s)
            if not starts_of_v:
                del index[v]
            if s != first_start or not kept:
                del ranges[s]
        for n, (s, e, v) in enumerate(new):
            ranges[s] = (e, v)
            lengths[v] = lengths.get(v, 0) + (e - s)
            reused = n == 0 and kept
            if not reused:
                starts.add(s)
            if not (reused and first_value == v):
                starts_of_v = index.get(v)
                if starts_of_v is None:
                    index[v] = SortedList((s,))
                else:
                    starts_of_v.add(s)

    # -- lookup ------------------------------------------------------------------

    def find(self, point):
        """``(start, end, value)`` of the range covering ``point``, or ``None``."""
        s = _split(self._starts, point, bisect_right)[0]
        if s is not None:
            e, v = self._ranges[s]
            if point < e:
                return (s, e, v)
        return None

    def get(self, point, default=None):
        """The value covering ``point``, or ``default`` if it is unmapped."""
        found = self.find(point)
        return default if found is None else found[2]

    def uniform(self, a, b, mixed=None):
        """The value every point of ``[a, b)`` has (``None``: all unmapped), or
        ``mixed`` if they differ; ``a < b``. One bisection and no list: for the
        hot path of a read that only needs to know whether its whole range is alike."""
        before, after = _split(self._starts, a, bisect_right)
        if after is not None and after < b:
            return mixed  # a range starts inside (a, b)
        if before is not None:
            e, v = self._ranges[before]
            if e > a:
                return v if e >= b else mixed  # (a range then a gap)
        return None

    def overlapping(self, a, b):
        """List of ``(start, end, value)`` of ranges overlapping ``[a, b)``, clipped to it, in order."""
        return [r for r in self._walk(a, b) if r[2] is not None]

    def segments(self, a, b):
        """List of ``(start, end, value)`` tiling ``[a, b)`` in order; gaps come as value ``None``.

        This is what a read of ``[a, b)`` needs: for each piece, where its data lives
        (or that it has none).
        """
        return list(self._walk(a, b))

    def _walk(self, a, b):
        # Tile [a, b) with clipped ranges and gaps.
        if a >= b:
            if a > b:
                raise ValueError(f"range start {a} > end {b}")
            return
        starts, ranges = self._starts, self._ranges
        pos = a
        before, after = _split(starts, a, bisect_right)
        if before is not None:
            e, v = ranges[before]
            if e > a:
                pos = min(e, b)
                yield (a, pos, v)
        if after is not None and after < b:
            for s in starts.irange(after, b, inclusive=(True, False)):
                if s > pos:
                    yield (pos, s, None)
                e, v = ranges[s]
                pos = min(e, b)
                yield (s, pos, v)
        if pos < b:
            yield (pos, b, None)

    def first_with_value(self, value, start=0):
        """``(start, end)`` of the first range with ``value`` that ends after ``start``.

        The result is clipped to begin at ``start`` or later; ``None`` if there is no
        such range. O(log n) through the per-value index, e.g. "the
        first free extent at or after X" when free space is mapped to a FREE value.
        Unmapped space is not indexed, so ``value`` may not be ``None``.
        """
        if value is None:
            raise ValueError("first_with_value(None): unmapped space is not indexed")
        self._require_index("first_with_value")
        starts_of_v = self._index.get(value)
        if starts_of_v is None:
            return None
        before, after = _split(starts_of_v, start, bisect_right)
        if before is not None:
            # Same-valued ranges never overlap, so only this one can contain `start`.
            e = self._ranges[before][0]
            if e > start:
                return (start, e)
        if after is not None:
            return (after, self._ranges[after][0])
        return None

    def length_of(self, value):
        """Total length of the ranges mapped to ``value``; O(1). ``value`` may not be ``None``."""
        if value is None:
            raise ValueError("length_of(None): unmapped space is unbounded")
        self._require_index("length_of")
        return self._lengths.get(value, 0)

    def _require_index(self, what):
        if self._index is None:
            raise TypeError(f"{what}() needs a RangeMap made with index_values=True")

    def __len__(self):
        """The number of ranges (after coalescing)."""
        return len(self._starts)

    def __bool__(self):
        return bool(self._starts)

    def __iter__(self):
        """All ``(start, end, value)`` in order. Lazy: do not mutate the map meanwhile."""
        ranges = self._ranges
        for s in self._starts:
            e, v = ranges[s]
            yield (s, e, v)

    def __repr__(self):
        shown = []
        for s, e, v in self:
            if len(shown) == 3:
                shown.append("...")
                break
            shown.append(f"[{s}, {e})={v!r}")
        return f"<RangeMap {len(self)} ranges: {', '.join(shown)}>"

    # -- state hand-over ---------------------------------------------------------

    def snapshot(self):
        """The whole state as a plain list of ``(start, end, value)`` in order, for ``from_ranges``."""
        return list(self)

    @classmethod
    def from_ranges(cls, triples, *, index_values=True):
        """A map built from ``(start, end, value)`` triples, as if assigned in that order.

        ``snapshot()`` output (sorted, canonical) is bulk-loaded without per-range
        ``assign``; anything else goes through ``assign`` one triple at a time.
        """
        triples = [tuple(t) for t in triples]
        self = cls(index_values=index_values)
        if not _is_canonical(triples):
            for s, e, v in triples:
                self.assign(s, e, v)
            return self
        by_value = {}
        for s, e, v in triples:
            self._ranges[s] = (e, v)
            if index_values:
                by_value.setdefault(v, []).append(s)
                self._lengths[v] = self._lengths.get(v, 0) + (e - s)
        self._starts = SortedList(self._ranges)
        if index_values:
            self._index = {v: SortedList(ss) for v, ss in by_value.items()}
        return self

    # -- invariants --------------------------------------------------------------

    def check(self):
        """Re-derive every invariant from the data; raise ``RangeMapCorrupt`` on the first violation."""
        starts, ranges = self._starts, self._ranges
        index = self._index or {}
        for name, sl in [("starts", starts), *((f"index of {v!r}", sl) for v, sl in index.items())]:
            try:
                sl._check()  # sortedcontainers' own consistency check; _split trusts _maxes
            except Exception as exc:
                raise RangeMapCorrupt(f"SortedList of {name} is internally inconsistent: {exc!r}") from None
        listed = list(starts)
        if listed != sorted(set(listed)):
            raise RangeMapCorrupt("range starts are not sorted and unique")
        if set(listed) != set(ranges):
            raise RangeMapCorrupt(
                f"starts list and range table disagree: {len(listed)} starts, {len(ranges)} ranges")
        by_value = {}
        lengths = {}
        prev_end = prev_value = None
        for s in listed:
            e, v = ranges[s]
            if v is None:
                raise RangeMapCorrupt(f"range [{s}, {e}) stores None")
            if not s < e:
                raise RangeMapCorrupt(f"empty or inverted range [{s}, {e})")
            if prev_end is not None:
                if s < prev_end:
                    raise RangeMapCorrupt(f"range [{s}, {e}) overlaps one ending at {prev_end}")
                if s == prev_end and v == prev_value:
                    raise RangeMapCorrupt(f"touching ranges at {s} both have value {v!r}")
            prev_end, prev_value = e, v
            by_value.setdefault(v, []).append(s)
            lengths[v] = lengths.get(v, 0) + (e - s)
        if self._index is None:
            return
        indexed = {v: list(ss) for v, ss in self._index.items()}
        if indexed != by_value:
            bad = sorted(map(repr, set(indexed) ^ set(by_value)
                             | {v for v in set(indexed) & set(by_value) if indexed[v] != by_value[v]}))
            raise RangeMapCorrupt(f"per-value index disagrees with the ranges for values {', '.join(bad)}")
        if self._lengths != lengths:
            raise RangeMapCorrupt(f"per-value lengths {self._lengths!r} != derived {lengths!r}")


_BULK = 64  # _replace deletes runs longer than this from _starts by slice


def _split(sl, x, bisect):
    """The elements of SortedList ``sl`` on either side of ``x`` as ``bisect`` splits them.

    Returns ``(last element before the split, first element after it)``, either
    ``None`` if there is none: with ``bisect_left`` that is ``(last < x, first >=
    x)``, with ``bisect_right`` ``(last <= x, first > x)``. Reads sortedcontainers'
    documented internals (see the module docstring) to avoid positional indexing.
    """
    maxes = sl._maxes
    pos = bisect(maxes, x)
    if pos == len(maxes):
        return (maxes[-1] if maxes else None), None
    sublist = sl._lists[pos]
    i = bisect(sublist, x)
    if i:
        return sublist[i - 1], sublist[i]
    return (maxes[pos - 1] if pos else None), sublist[0]


def _is_canonical(triples):
    # Sorted, non-empty, non-overlapping, no None, no touching equal neighbours.
    prev_end = prev_value = None
    for s, e, v in triples:
        if v is None or not s < e:
            return False
        if prev_end is not None and (s < prev_end or (s == prev_end and v == prev_value)):
            return False
        prev_end, prev_value = e, v
    return True
