"""copy_before_write: chunk locks, group commit and the copy -> record -> overwrite order,
driven by an in-memory policy that logs every step (no FUSE, no disk)."""

from __future__ import annotations

import errno
import functools

import pytest
import trio
import trio.testing

from fusesnap.copy_before_write import CopyBeforeWrite


class LoggingPolicy:
    """Copies chunks the first time they are written; logs copy/record/barrier steps.

    `record_capacity` records fit before the "log" must roll over: then it injects a
    copy of the log itself (chunk -1) and defers everything until that is recorded,
    the way bow.img rolls its log block over.
    """

    def __init__(self, *, record_capacity: int | None = None, free: int = 10_000):
        self.steps: list[tuple] = []
        self.copied: set[int] = set()
        self.in_flight: set[int] = set()
        self.free = free
        self.record_capacity = record_capacity
        self.records_in_log = 0
        self.log_copy_pending = False
        self.fail_next_barrier = False
        self.abandoned_chunks: list[int] = []

    def plan(self, first, end):
        needed = [c for c in range(first, end) if c not in self.copied]
        if len(needed) > self.free:
            raise OSError(errno.ENOSPC, "no free chunks")
        self.free -= len(needed)
        self.in_flight.update(needed)
        return needed

    async def copy(self, copies):
        await trio.sleep(0)
        self.steps.extend(("copy", c) for c in copies)

    def write_records(self, copies):
        recorded, deferred, injected = [], [], []
        for c in copies:
            if c == -1:  # the log's own copy: the log rolls over
                self.log_copy_pending = False
                self.records_in_log = 0
                self.steps.append(("record", c))
                recorded.append(c)
            elif self.log_copy_pending:
                deferred.append(c)
            elif self.record_capacity is not None and self.records_in_log == self.record_capacity:
                self.log_copy_pending = True
                self.steps.append(("copy", -1))
                injected.append(-1)
                deferred.append(c)
            else:
                self.records_in_log += 1
                self.steps.append(("record", c))
                recorded.append(c)
        return recorded, deferred, injected

    async def barrier(self):
        await trio.sleep(0.001)
        if self.fail_next_barrier:
            self.fail_next_barrier = False
            raise OSError(errno.EIO, "fsync failed")
        self.steps.append(("barrier",))

    def recorded(self, copies):
        for c in copies:
            self.in_flight.discard(c)
            if c >= 0:
                self.copied.add(c)

    def abandoned(self, copies, exc):
        for c in copies:
            self.in_flight.discard(c)
            self.abandoned_chunks.append(c)
            self.free += 1


def check_order(steps):
    """Every overwrite of a copied chunk came after copy, barrier, record, barrier."""
    copied_at, recorded_at = {}, {}
    barriers = [i for i, s in enumerate(steps) if s == ("barrier",)]

    def barrier_between(a, b):
        return any(a < i < b for i in barriers)

    for i, step in enumerate(steps):
        if step[0] == "copy":
            copied_at.setdefault(step[1], i)
        elif step[0] == "record":
            assert barrier_between(copied_at[step[1]], i), f"record of {step[1]} before its copy was durable"
            recorded_at.setdefault(step[1], i)
        elif step[0] == "overwrite" and step[1] in copied_at:
            assert barrier_between(recorded_at[step[1]], i), f"overwrite of {step[1]} before its record was durable"


async def first_writes(cbw, policy, chunks):
    async def one(chunk):
        async with cbw.writing(chunk, chunk + 1):
            policy.steps.append(("overwrite", chunk))

    async with trio.open_nursery() as nursery:
        for chunk in chunks:
            nursery.start_soon(one, chunk)


def test_first_write_is_copied_recorded_then_overwritten():
    policy = LoggingPolicy()
    cbw = CopyBeforeWrite(policy)
    trio.run(first_writes, cbw, policy, [7])
    assert policy.steps == [("copy", 7), ("barrier",), ("record", 7), ("barrier",), ("overwrite", 7)]


def test_concurrent_first_writes_share_barriers():
    policy = LoggingPolicy()
    cbw = CopyBeforeWrite(policy)
    trio.run(first_writes, cbw, policy, range(64))
    check_order(policy.steps)
    assert policy.copied == set(range(64))
    assert cbw.barriers <= 4, f"{cbw.barriers} barriers for 64 concurrent first writes"


def test_naive_order_costs_two_barriers_per_first_write():
    policy = LoggingPolicy()
    cbw = CopyBeforeWrite(policy, group_commit=False)
    trio.run(first_writes, cbw, policy, range(16))
    check_order(policy.steps)
    assert cbw.barriers == 32


def test_rewrites_need_no_copy_and_no_barrier():
    policy = LoggingPolicy()
    cbw = CopyBeforeWrite(policy)

    async def main():
        await first_writes(cbw, policy, [3])
        before = cbw.barriers
        await first_writes(cbw, policy, [3, 3, 3])
        assert cbw.barriers == before

    trio.run(main)
    assert [s for s in policy.steps if s[0] == "copy"] == [("copy", 3)]


def test_writes_to_one_chunk_wait_for_its_copy_and_copy_once():
    policy = LoggingPolicy()
    cbw = CopyBeforeWrite(policy)
    trio.run(first_writes, cbw, policy, [5] * 8)
    check_order(policy.steps)
    assert [s for s in policy.steps if s[0] == "copy"] == [("copy", 5)]
    assert policy.steps.count(("overwrite", 5)) == 8


def test_unrelated_writes_do_not_wait_for_a_held_chunk():
    policy = LoggingPolicy()
    cbw = CopyBeforeWrite(policy)
    order = []

    async def main():
        release = trio.Event()

        async def slow():
            async with cbw.writing(0, 4):
                await release.wait()
                order.append("slow")

        async def fast():
            async with cbw.writing(4, 8):
                order.append("fast")
            release.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.sleep(0.05)
            nursery.start_soon(fast)

    trio.run(main)
    assert order == ["fast", "slow"]


def test_enospc_changes_nothing_and_releases_the_chunks():
    policy = LoggingPolicy(free=2)
    cbw = CopyBeforeWrite(policy)

    async def main():
        with pytest.raises(OSError) as excinfo:
            async with cbw.writing(0, 3):
                policy.steps.append(("overwrite", 0))
        assert excinfo.value.errno == errno.ENOSPC
        assert not cbw.held
        await first_writes(cbw, policy, [0])  # the chunks are free to lock again

    trio.run(main)
    assert policy.steps[0] == ("copy", 0)
    check_order(policy.steps)


def test_a_failed_barrier_fails_its_writers_and_records_nothing_it_covered():
    policy = LoggingPolicy()
    cbw = CopyBeforeWrite(policy)

    async def main():
        policy.fail_next_barrier = True
        with pytest.raises(OSError) as excinfo:
            async with cbw.writing(1, 2):
                policy.steps.append(("overwrite", 1))
        assert excinfo.value.errno == errno.EIO
        assert policy.abandoned_chunks == [1]
        assert not cbw.held

    trio.run(main)
    assert ("overwrite", 1) not in policy.steps
    assert ("record", 1) not in policy.steps


def test_log_rollover_injects_a_copy_recorded_before_the_rest():
    policy = LoggingPolicy(record_capacity=5)
    cbw = CopyBeforeWrite(policy)
    trio.run(first_writes, cbw, policy, range(23))
    check_order(policy.steps)
    assert policy.copied == set(range(23))
    records = [s[1] for s in policy.steps if s[0] == "record"]
    # Every rollover records the log's own copy before any later record.
    assert records.count(-1) == 4
    assert all(len(run) <= 5 for run in _runs_between(records, -1))


def test_naive_order_handles_the_rollover_too():
    policy = LoggingPolicy(record_capacity=3)
    cbw = CopyBeforeWrite(policy, group_commit=False)
    trio.run(first_writes, cbw, policy, range(10))
    check_order(policy.steps)
    assert policy.copied == set(range(10))


def _runs_between(items, separator):
    run = []
    for item in items:
        if item == separator:
            yield run
            run = []
        else:
            run.append(item)
    yield run


def test_chunks_held_by_the_policy_make_writers_wait_until_released():
    policy = LoggingPolicy()
    cbw = CopyBeforeWrite(policy)
    order = []

    async def main():
        token = cbw.hold(10, 12)
        with pytest.raises(RuntimeError):
            cbw.hold(11, 13)  # already held

        async def writer():
            async with cbw.writing(11, 12):
                order.append("write")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.sleep(0.05)
            order.append("release")
            cbw.release(10, 12, token)
        assert not cbw.held

    trio.run(main)
    assert order == ["release", "write"]


def test_one_chunk_holds_and_longer_ones_exclude_each_other():
    """One-chunk holds (most writes) and longer ones are kept apart internally; a
    long exclusive waits for a one-chunk write inside it, a one-chunk write for a
    long hold around it, and a release of a run ends every hold in it."""
    policy = LoggingPolicy()
    cbw = CopyBeforeWrite(policy)
    order = []

    async def main():
        singles = [cbw.hold(chunk, chunk + 1) for chunk in (3, 4, 900)]
        assert cbw.is_held(0, 10) and cbw.is_held(100, 1000) and not cbw.is_held(5, 900)
        run = cbw.hold(20, 30)
        assert [cbw.first_held(0, 10), cbw.first_held(5, 1000), cbw.first_held(25, 1000),
                cbw.first_held(30, 900)] == [3, 20, 25, None]
        cbw.release(20, 30, run)
        with pytest.raises(RuntimeError):
            cbw.hold(2, 5)

        async def long_exclusive():
            async with cbw.exclusive(0, 1 << 20):
                order.append("exclusive")
                await trio.sleep(0.05)
            order.append("exclusive done")

        async def one_chunk_write():
            await trio.sleep(0.02)
            async with cbw.writing(500, 501):
                order.append("write")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_exclusive)
            nursery.start_soon(one_chunk_write)
            await trio.sleep(0.01)
            order.append("release")
            cbw.release(3, 5, *singles[:2])
            cbw.release(900, 901, singles[2])
        assert not cbw.held

    trio.run(main)
    assert order == ["release", "exclusive", "exclusive done", "write"]


def test_exclusive_holds_without_planning_and_before_plan_runs_first():
    policy = LoggingPolicy()
    cbw = CopyBeforeWrite(policy)

    async def main():
        async with cbw.exclusive(0, 8):
            assert cbw.is_held(0, 8)
        assert policy.steps == []  # nothing planned or copied
        seen = []
        async with cbw.writing(2, 3, before_plan=lambda: seen.append(2 in policy.in_flight)):
            pass
        assert seen == [False]  # before_plan ran before the chunk was planned

    trio.run(main)


class FailingRecords(LoggingPolicy):
    def __init__(self, fail_in: str):
        super().__init__()
        self.fail_in = fail_in

    def write_records(self, copies):
        if self.fail_in == "write_records":
            self.fail_in = ""
            raise OSError(errno.ENOSPC, "no room for the log")
        return super().write_records(copies)

    def recorded(self, copies):
        super().recorded(copies)
        if self.fail_in == "recorded":
            self.fail_in = ""
            raise OSError(errno.EIO, "bookkeeping failed")


@pytest.mark.parametrize("fail_in", ["write_records", "recorded"])
def test_a_policy_error_fails_its_writers_and_nobody_hangs(fail_in):
    policy = FailingRecords(fail_in)
    cbw = CopyBeforeWrite(policy)
    failures = []

    async def main():
        async def one(chunk):
            try:
                async with cbw.writing(chunk, chunk + 1):
                    policy.steps.append(("overwrite", chunk))
            except OSError as exc:
                failures.append(exc.errno)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for chunk in range(8):
                    nursery.start_soon(one, chunk)
        assert not cbw.held and not cbw.waiter_of
        await first_writes(cbw, policy, range(8, 12))  # later writes work again

    trio.run(main)
    assert failures and all(code in (errno.ENOSPC, errno.EIO) for code in failures)
    check_order(policy.steps)


# -- staged first writes -------------------------------------------------------------

class StagingPolicy(LoggingPolicy):
    """LoggingPolicy whose image stages first writes: `room` staged writes at a time;
    `finish` logs the overwrite (or, failed, a "lost" step), `staged_finished` a
    "finished" step after the finishes of one round."""

    def __init__(self, *, room: int = 1000, **kwargs):
        super().__init__(**kwargs)
        self.room = room
        self.staged_now = 0

    def stage_for(self, chunk):
        def stage():
            if self.staged_now >= self.room:
                return None
            self.staged_now += 1
            self.steps.append(("staged", chunk))

            def finish(error):
                self.staged_now -= 1
                self.steps.append(("overwrite", chunk) if error is None else ("lost", chunk))
            return finish
        return stage

    def staged_finished(self):
        self.steps.append(("finished",))


async def staged_writes(cbw, policy, chunks, *, then=None):
    """Writes with staging, `drive_staged` running; returns what each write yielded."""
    yielded = {}

    async def one(chunk):
        async with cbw.writing(chunk, chunk + 1, stage=policy.stage_for(chunk)) as staged:
            yielded[chunk] = staged
            if not staged:
                policy.steps.append(("overwrite", chunk))

    async with trio.open_nursery() as background:
        background.start_soon(cbw.drive_staged)
        await trio.testing.wait_all_tasks_blocked()  # the driver runs: writes may stage
        async with trio.open_nursery() as nursery:
            for chunk in chunks:
                nursery.start_soon(one, chunk)
        policy.steps.append(("acknowledged",))
        if then is not None:
            await then()
        await cbw.settled()
        policy.steps.append(("settled",))
        background.cancel_scope.cancel()
    return yielded


def test_a_staged_write_returns_before_its_copy_is_durable_and_is_applied_after_its_record():
    policy = StagingPolicy()
    cbw = CopyBeforeWrite(policy)
    yielded = trio.run(staged_writes, cbw, policy, [3, 4, 5])
    assert yielded == {3: True, 4: True, 5: True}
    acknowledged = policy.steps.index(("acknowledged",))
    assert not any(step[0] in ("barrier", "overwrite") for step in policy.steps[:acknowledged])
    check_order(policy.steps)
    assert policy.steps[-1] == ("settled",) and cbw.idle
    assert cbw.barriers == 2, "three staged writes share both barriers"


def test_a_later_write_to_a_staged_chunk_waits_until_it_is_applied():
    policy = StagingPolicy()
    cbw = CopyBeforeWrite(policy)

    async def rewrite():
        async with cbw.writing(3, 4, stage=policy.stage_for(3)) as staged:
            assert not staged  # copied already: nothing to stage
            policy.steps.append(("rewrite", 3))

    trio.run(functools.partial(staged_writes, cbw, policy, [3], then=rewrite))
    assert policy.steps.index(("overwrite", 3)) < policy.steps.index(("finished",)) \
        < policy.steps.index(("rewrite", 3))


def test_the_staged_writes_of_a_round_are_finished_together_then_released():
    policy = StagingPolicy()
    cbw = CopyBeforeWrite(policy)
    trio.run(staged_writes, cbw, policy, [3, 4, 5])
    finished = policy.steps.index(("finished",))
    assert sorted(policy.steps[finished - 3:finished]) == [("overwrite", 3), ("overwrite", 4), ("overwrite", 5)]
    assert policy.steps.count(("finished",)) == 1 and cbw.idle


def test_without_room_a_write_waits_for_its_rounds_as_without_staging():
    policy = StagingPolicy(room=2)
    cbw = CopyBeforeWrite(policy)
    yielded = trio.run(staged_writes, cbw, policy, range(6))
    assert sorted(yielded.values()) == [False] * 4 + [True] * 2
    check_order(policy.steps)


def test_settled_waits_for_staged_writes_and_stopping_the_driver_finishes_them():
    policy = StagingPolicy()
    cbw = CopyBeforeWrite(policy)

    async def main():
        async with trio.open_nursery() as background:
            background.start_soon(cbw.drive_staged)
            await trio.testing.wait_all_tasks_blocked()  # the driver runs
            async with cbw.writing(1, 2, stage=policy.stage_for(1)) as staged:
                assert staged
            background.cancel_scope.cancel()  # at once: the driver finishes it first
        assert ("overwrite", 1) in policy.steps and cbw.idle and not cbw.staging
        async with cbw.writing(2, 3, stage=policy.stage_for(2)) as staged:
            assert not staged, "no driver: no staging"
            policy.steps.append(("overwrite", 2))

    trio.run(main)
    check_order(policy.steps)


def test_a_failed_barrier_tells_a_staged_write_not_to_apply_it():
    policy = StagingPolicy()
    cbw = CopyBeforeWrite(policy)
    policy.fail_next_barrier = True
    trio.run(staged_writes, cbw, policy, [8])
    assert ("lost", 8) in policy.steps and ("overwrite", 8) not in policy.steps
    assert policy.abandoned_chunks == [8] and cbw.idle
