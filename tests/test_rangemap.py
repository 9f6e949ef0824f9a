"""RangeMap: worked examples, then hypothesis against a naive one-slot-per-point model."""

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sortedcontainers import SortedList

from fusesnap import rangemap
from fusesnap.rangemap import RangeMap, RangeMapCorrupt


def make(*triples):
    m = RangeMap()
    for s, e, v in triples:
        m.assign(s, e, v)
    m.check()
    return m


# -- examples --------------------------------------------------------------------

def test_an_empty_map_has_no_values():
    m = RangeMap()
    assert not m and len(m) == 0
    assert m.get(0) is None and m.get(0, "dflt") == "dflt"
    assert m.find(0) is None
    assert m.segments(0, 10) == [(0, 10, None)]
    assert m.overlapping(0, 10) == []
    assert m.first_with_value("a") is None
    assert m.length_of("a") == 0
    m.check()


def test_assigning_inside_a_range_splits_it_in_three():
    m = make((0, 100, "a"), (40, 60, "b"))
    assert list(m) == [(0, 40, "a"), (40, 60, "b"), (60, 100, "a")]
    assert m.length_of("a") == 80 and m.length_of("b") == 20


def test_touching_ranges_with_equal_values_coalesce():
    m = make((0, 10, "a"), (20, 30, "a"), (10, 20, "a"))
    assert list(m) == [(0, 30, "a")]


def test_touching_ranges_with_different_values_stay_apart():
    m = make((0, 10, "a"), (10, 20, "b"))
    assert list(m) == [(0, 10, "a"), (10, 20, "b")]


def test_overwriting_the_middle_value_merges_all_three():
    m = make((0, 10, "a"), (10, 20, "b"), (20, 30, "a"))
    m.assign(10, 20, "a")
    m.check()
    assert list(m) == [(0, 30, "a")]


def test_an_assignment_spanning_several_ranges_replaces_them():
    m = make((0, 10, "a"), (12, 14, "b"), (16, 18, "c"), (20, 30, "d"))
    m.assign(5, 25, "e")
    m.check()
    assert list(m) == [(0, 5, "a"), (5, 25, "e"), (25, 30, "d")]


def test_clearing_the_middle_leaves_a_gap():
    m = make((0, 30, "a"))
    m.clear(10, 20)
    m.check()
    assert list(m) == [(0, 10, "a"), (20, 30, "a")]
    assert m.get(15) is None and m.find(15) is None
    assert m.find(25) == (20, 30, "a")
    assert m.length_of("a") == 20


def test_clearing_everything_empties_the_map():
    m = make((0, 10, "a"), (10, 20, "b"), (30, 40, "a"))
    m.clear(-5, 100)
    m.check()
    assert not m and m.length_of("a") == 0 and m.length_of("b") == 0


def test_replacing_a_long_run_of_ranges():
    # Hundreds of ranges replaced at once take _replace's bulk-deletion path.
    m = make(*((i, i + 1, "ab"[i % 2]) for i in range(1000)))
    m.assign(100, 900, "c")
    m.check()
    assert len(m) == 100 + 1 + 100
    assert m.find(500) == (100, 900, "c") and m.get(99) == "b" and m.get(900) == "a"
    m.clear(50, 950)
    m.check()
    assert m.segments(49, 951) == [(49, 50, "b"), (50, 950, None), (950, 951, "a")]
    assert m.length_of("a") == m.length_of("b") == 50 and m.length_of("c") == 0


def test_assign_none_is_clear():
    m = make((0, 30, "a"), (10, 20, None))
    assert list(m) == [(0, 10, "a"), (20, 30, "a")]


def test_empty_range_is_a_no_op_and_inverted_range_is_an_error():
    m = make((0, 10, "a"))
    m.assign(5, 5, "b")
    assert list(m) == [(0, 10, "a")]
    with pytest.raises(ValueError):
        m.assign(6, 5, "b")
    with pytest.raises(ValueError):
        m.segments(6, 5)
    assert m.segments(5, 5) == []


def test_segments_tile_the_request_with_gaps_as_none():
    m = make((10, 20, "a"), (20, 25, "b"), (30, 40, "a"))
    assert m.segments(0, 50) == [
        (0, 10, None), (10, 20, "a"), (20, 25, "b"), (25, 30, None), (30, 40, "a"), (40, 50, None)]
    assert m.segments(15, 35) == [(15, 20, "a"), (20, 25, "b"), (25, 30, None), (30, 35, "a")]
    assert m.segments(12, 18) == [(12, 18, "a")]
    assert m.segments(26, 28) == [(26, 28, None)]


def test_overlapping_clips_and_skips_gaps():
    m = make((10, 20, "a"), (20, 25, "b"), (30, 40, "a"))
    assert m.overlapping(15, 35) == [(15, 20, "a"), (20, 25, "b"), (30, 35, "a")]
    assert m.overlapping(25, 30) == []


def test_uniform_is_the_value_of_a_range_all_alike_or_the_marker_for_mixed():
    m = make((10, 20, "a"), (20, 25, "b"), (30, 40, "a"))
    mixed = object()
    assert m.uniform(12, 18, mixed) == "a"
    assert m.uniform(10, 20, mixed) == "a"
    assert m.uniform(26, 30, mixed) is None      # all unmapped
    assert m.uniform(0, 10, mixed) is None
    assert m.uniform(40, 99, mixed) is None
    assert m.uniform(15, 21, mixed) is mixed     # two values
    assert m.uniform(24, 26, mixed) is mixed     # a value, then a gap
    assert m.uniform(5, 11, mixed) is mixed      # a gap, then a value


def test_segments_is_a_list_unaffected_by_later_mutation():
    m = make((0, 10, "a"), (20, 30, "b"))
    segs = m.segments(0, 30)
    m.assign(0, 30, "c")  # e.g. a write landing while a read awaits its data
    assert segs == [(0, 10, "a"), (10, 20, None), (20, 30, "b")]


def test_first_with_value_follows_mutations():
    free = "free"
    m = make((0, 1000, free))
    assert m.first_with_value(free) == (0, 1000)
    m.assign(0, 100, "used")
    assert m.first_with_value(free) == (100, 1000)
    m.assign(500, 600, "used")
    assert m.first_with_value(free, 50) == (100, 500)
    assert m.first_with_value(free, 200) == (200, 500)   # clipped to begin at 200
    assert m.first_with_value(free, 500) == (600, 1000)  # skips the used hole
    assert m.first_with_value(free, 1000) is None
    m.assign(0, 1000, "used")
    assert m.first_with_value(free) is None
    assert m.first_with_value("used", 999) == (999, 1000)
    with pytest.raises(ValueError):
        m.first_with_value(None)


def test_equal_values_are_one_value():
    m = make((0, 10, 1), (10, 20, 1.0))
    assert list(m) == [(0, 20, 1)]
    assert m.length_of(1.0) == 20


def test_snapshot_round_trips_through_from_ranges():
    m = make((0, 10, "a"), (10, 20, "b"), (30, 40, "a"))
    state = m.snapshot()
    assert state == [(0, 10, "a"), (10, 20, "b"), (30, 40, "a")]
    copy = RangeMap.from_ranges(state)
    copy.check()
    assert copy.snapshot() == state
    assert copy.first_with_value("a", 15) == (30, 40) and copy.length_of("a") == 20


def test_from_ranges_applies_non_canonical_input_in_order():
    m = RangeMap.from_ranges([(0, 10, "a"), (5, 15, "b"), (15, 20, "b"), (8, 9, None)])
    m.check()
    assert list(m) == [(0, 5, "a"), (5, 8, "b"), (9, 20, "b")]


def test_repr_is_short():
    m = make(*((i * 10, i * 10 + 5, "a") for i in range(1000)))
    assert len(repr(m)) < 120
    assert "1000 ranges" in repr(m)


# -- check() catches corruption ----------------------------------------------------

def corrupt_overlap(m):
    m._ranges[0] = (15, "a")  # [0, 15) now overlaps [10, 20)


def corrupt_touching_equal(m):
    m._ranges[20] = (30, "b")  # [10, 20)='b' now touches [20, 30)='b'


def corrupt_empty_range(m):
    m._ranges[0] = (0, "a")


def corrupt_stored_none(m):
    m._ranges[40] = (50, None)


def corrupt_index(m):
    m._index["a"].remove(40)


def corrupt_index_stale_value(m):
    m._index["zzz"] = SortedList([0])


def corrupt_lengths(m):
    m._lengths["a"] += 1


def corrupt_starts(m):
    m._starts.remove(20)


def corrupt_range_table(m):
    del m._ranges[20]


def corrupt_sortedlist_internals(m):
    m._starts._maxes[-1] += 1  # the list still iterates fine, but lookups would go astray


@pytest.mark.parametrize("corrupt, complaint", [
    (corrupt_overlap, "overlaps"),
    (corrupt_touching_equal, "touching ranges"),
    (corrupt_empty_range, "empty"),
    (corrupt_stored_none, "stores None"),
    (corrupt_index, "per-value index"),
    (corrupt_index_stale_value, "per-value index"),
    (corrupt_lengths, "per-value lengths"),
    (corrupt_starts, "disagree"),
    (corrupt_range_table, "disagree"),
    (corrupt_sortedlist_internals, "internally inconsistent"),
])
def test_check_catches_corruption(corrupt, complaint):
    m = make((0, 10, "a"), (10, 20, "b"), (20, 30, "c"), (40, 50, "a"))
    corrupt(m)
    with pytest.raises(RangeMapCorrupt, match=complaint):
        m.check()


# -- against a naive model ----------------------------------------------------------

UNIVERSE = 200                     # points 0..199; one model slot each
VALUES = ["a", "b", "c"]           # few values, so equal neighbours (which must merge) are common
# Most points come from a coarse grid, so that assignments often share or touch
# boundaries (where the bugs live); uniform points alone rarely do.
points = st.one_of(st.integers(0, UNIVERSE // 25).map(lambda k: k * 25), st.integers(0, UNIVERSE))
values = st.sampled_from(VALUES + [None])


def model_runs(model, a=0, b=UNIVERSE, with_gaps=False):
    # Maximal runs of equal values in model[a:b], as (start, end, value).
    runs = []
    for p in range(a, b):
        v = model[p]
        if runs and runs[-1][2] == v and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1, v)
        else:
            runs.append((p, p + 1, v))
    return runs if with_gaps else [r for r in runs if r[2] is not None]


def model_first_with_value(model, value, start):
    for s, e, v in model_runs(model, max(start, 0)):
        if v == value:
            return (s, e)
    return None


class TinySortedList(SortedList):
    # sortedcontainers splits its sublists at 2 * 1000 elements, so maps this small
    # would live in one sublist and never reach the lookups that cross sublists.
    DEFAULT_LOAD_FACTOR = 4


class RangeMapVsModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.real_sorted_list = rangemap.SortedList
        rangemap.SortedList = TinySortedList
        self.map = RangeMap()
        self.unindexed = RangeMap(index_values=False)  # the same, without a value index
        self.model = [None] * UNIVERSE

    def teardown(self):
        rangemap.SortedList = self.real_sorted_list

    @rule(a=points, b=points, value=values)
    def assign(self, a, b, value):
        a, b = min(a, b), max(a, b)
        self.map.assign(a, b, value)
        self.unindexed.assign(a, b, value)
        self.model[a:b] = [value] * (b - a)

    @rule(a=points, b=points)
    def clear(self, a, b):
        a, b = min(a, b), max(a, b)
        self.map.clear(a, b)
        self.unindexed.clear(a, b)
        self.model[a:b] = [None] * (b - a)

    @precondition(lambda self: self.map)
    @rule()
    def round_trip(self):
        # State handed to "freshly loaded code" behaves identically from here on.
        self.map = RangeMap.from_ranges(self.map.snapshot())
        self.unindexed = RangeMap.from_ranges(self.unindexed.snapshot(), index_values=False)

    @rule(a=points, b=points, value=st.sampled_from(VALUES), start=st.one_of(points, st.integers(-5, UNIVERSE + 5)))
    def queries(self, a, b, value, start):
        a, b = min(a, b), max(a, b)
        assert self.map.segments(a, b) == model_runs(self.model, a, b, with_gaps=True)
        assert self.map.overlapping(a, b) == model_runs(self.model, a, b)
        if a < b:
            alike = set(self.model[a:b])
            assert self.unindexed.uniform(a, b, "mixed") == (alike.pop() if len(alike) == 1 else "mixed")
        assert self.map.first_with_value(value, start) == model_first_with_value(self.model, value, start)

    @invariant()
    def map_agrees_with_model(self):
        self.map.check()
        runs = model_runs(self.model)
        assert list(self.map) == runs  # canonical: exactly the model's maximal runs
        self.unindexed.check()
        assert list(self.unindexed) == runs
        assert len(self.map) == len(runs)
        assert [self.map.get(p) for p in range(-1, UNIVERSE + 1)] == [None] + self.model + [None]
        for v in VALUES:
            assert self.map.length_of(v) == self.model.count(v)


RangeMapVsModel.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
test_rangemap_against_model = RangeMapVsModel.TestCase


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(points, points, values), max_size=30))
def test_from_ranges_equals_assigning_in_order(ops):
    ops = [(min(a, b), max(a, b), v) for a, b, v in ops]
    model = [None] * UNIVERSE
    expected = RangeMap()
    for a, b, v in ops:
        expected.assign(a, b, v)
        model[a:b] = [v] * (b - a)
        expected.check()
    assert expected.snapshot() == model_runs(model)
    loaded = RangeMap.from_ranges(ops)
    loaded.check()
    assert loaded.snapshot() == expected.snapshot()
    reloaded = RangeMap.from_ranges(loaded.snapshot())
    reloaded.check()
    assert reloaded.snapshot() == expected.snapshot()


def test_a_map_without_value_index_refuses_value_queries():
    m = RangeMap(index_values=False)
    m.assign(0, 10, ("chunk", 3))
    with pytest.raises(TypeError):
        m.first_with_value(("chunk", 3))
    with pytest.raises(TypeError):
        m.length_of(("chunk", 3))
