"""Copy-before-write: the first write to a chunk copies its old contents elsewhere,
durably recorded, before the write proceeds.

Both images that preserve old data are built on this: `bow.img` (backup-on-write,
after Android's dm-bow: old blocks are copied into the device's free space and logged
in block 0) and snapshots (after blksnap: old chunks are copied once into a store
file shared by all snapshots and recorded in the store's table). This module owns the
mechanics they share; the *policy* -- which chunks need a copy, where a copy goes,
what the record is and how it is made durable -- belongs to the image.

Interface
    `CopyBeforeWrite(policy, group_commit=True)`; an image wraps every write (and
    every read-modify-write) of chunks ``[first, end)`` in::

        async with cbw.writing(first, end):
            ...overwrite the chunks...

    On entry, in this order:
      1. *Chunk locks*: waits until no other `writing` holds a chunk of
         ``[first, end)``, then holds them until the block exits. Writes to
         unrelated chunks never wait for each other; a second write to a chunk
         whose copy is in flight waits for it (and then usually needs no copy).
      2. ``policy.plan(first, end) -> list[copy]`` (synchronous, never awaits, so it
         is atomic): which chunks need a copy; reserve their destinations and mark
         them in the image's maps. The copy objects are the policy's own (opaque
         here). ``[]`` means nothing to copy: the block is entered at once. May
         raise OSError (ENOSPC when there is no room: then it must change nothing).
      3. ``await policy.copy(copies)``: write the old contents to the destinations
         (into the page cache; no sync needed).
      4. *Group commit* (below) until every copy is durably recorded.
    The overwrite in the block may then proceed. `writing(..., before_plan=f)` runs
    `f()` between 1 and 2 (a read-modify-write reads the current contents there);
    `writing(..., plan=g)` calls `g(first, end)` instead of ``policy.plan`` in 2, for
    an image whose writes come in kinds that need different copies (a snapshot's
    own writes beside the origin's); `g` has the same contract as ``plan``.
    `exclusive(first, end)` only holds the chunks (a discard, a state change);
    `hold(first, end)` / `release(...)` let the policy hold chunks itself, without
    waiting, e.g. the destinations of its copies until they are recorded. An exception in 2-4 calls
    ``policy.abandoned(copies, exc)`` for copies not yet recorded, releases the
    locks and propagates; the overwrite does not happen.

Group commit and the ordering it guarantees
    A record may only become durable after the copy it describes, and an overwrite
    only after its record. Done naively that is two syncs per first write (copy,
    sync, record, sync, overwrite). Here concurrent first writes share them: a round
    is

        recorded, deferred, injected = policy.write_records(durable_copies)
        await policy.barrier()          # one fsync for everything below
        policy.recorded(recorded)       # then their writers may overwrite

    where ``durable_copies`` are the copies a *previous* barrier made durable, and
    the barrier also makes durable every copy written since the last round. So a
    round costs one barrier however many writes share it, and each copy is durable
    one round before its record is written: the ordering holds for every crash
    point. A first write waits for two rounds. Whoever needs a round while none is
    running runs it (no background task), shielded from cancellation.

    ``write_records`` (synchronous) records the copies it can (e.g. appends log
    entries and pwrites the log block) and returns ``(recorded, deferred,
    injected)``: ``deferred`` are copies it could not record yet (they are offered
    again next round, in order), ``injected`` are new copies the policy itself wrote
    (e.g. dm-bow's backup of a full log block) that must become durable and then be
    offered to it before the deferred ones. Injected copies have no waiting writer.

    ``group_commit=False`` gives the naive order for comparison (bench/bench_bow.py):
    each first write runs its own barrier, records, barrier.

Staged first writes (optional)
    Waiting for two rounds bounds a writer's throughput by its queue depth over two
    barriers. An image that can keep a write's new data somewhere that outlives the
    server passes ``writing(..., stage=s)``: once the copies are planned (2), ``s()``
    (sync) stages the new data and returns ``finish(error)``, or None when it has no
    room (then the write copies and waits for its rounds as above: backpressure).
    A staged write's copies are made by the next round, together with those of
    every write staged since (one ``policy.copy`` call, which may hand them to a
    worker thread), before its barrier; their sources are held until then. The block is
    then entered with ``True`` (the write is done as far as its caller knows: the
    body must not overwrite), and the chunks *stay held* until the copies are
    durably recorded; then ``finish(None)`` applies the staged data in place and the
    chunks are released (``finish(exc)`` if the round failed: the image must not
    apply it). So a later `writing` of a staged chunk waits for it (an image may
    instead let it replace the staged data itself), and the overwrite still comes
    after its record. Nobody waits for those rounds: `drive_staged`, a
    background task the image starts, runs them; staging happens only while it
    runs, and when it is cancelled it stops staging and finishes what is staged
    (shielded) before it returns. `settled()` waits until every write staged before
    the call is finished (an image's flush). The staged writes a round finishes are
    finished together: each one's ``finish``, then ``policy.staged_finished()``
    (sync, never raises: the place for what the finishes of a round can share, such
    as one write that forgets all their records), then their chunks are released,
    with no await in between.

    An exception from the round's `copy` of staged writes' copies fails those
    writers (their copies are abandoned). One from `write_records` fails the writers
    of the copies it was given (they are abandoned, so it must raise only before
    recording any of them); one from `recorded` fails the writers of those copies
    (their records are durable: the copies count as recorded). Nobody waits forever.
    A failed barrier fails every writer of that round with the OSError: copies it
    should have made durable are abandoned (`abandoned` must forget them; their
    records are never written), and records it covered are not trusted as durable,
    though `recorded` is still called for them (their copies were durable, so the
    records are true whenever they reach the disk).

Policy methods, all called on the trio thread:
    plan(first, end) -> list[copy]                    sync, no await
    async copy(copies) -> None                         may await (threads)
    write_records(copies) -> (recorded, deferred, injected)   sync, no await
    async barrier() -> None                            may await (fsync in a thread)
    recorded(copies) -> None                           sync, no await
    abandoned(copies, exc) -> None                     sync, no await
    staged_finished() -> None                          sync, no await (only if it stages)

Concurrency contract: everything runs on one trio thread; the module's own state
(held chunks, pending copies) changes only between awaits. Policy map changes happen
only in the synchronous methods, so each is atomic. Figures for `.status` and the
benchmark: `rounds`, `barriers`, `barrier_seconds` (their total time as the round
saw it), `copies_recorded`; `staged_count` counts writes staged so far.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import trio

from .rangemap import RangeMap

__all__ = ["CopyBeforeWrite", "CopyPolicy"]


class CopyPolicy(Protocol):
    """What an image supplies; see the module docstring for each method's contract."""

    def plan(self, first: int, end: int) -> list[Any]: ...
    async def copy(self, copies: list[Any]) -> None: ...
    def write_records(self, copies: list[Any]) -> tuple[list[Any], list[Any], list[Any]]: ...
    async def barrier(self) -> None: ...
    def recorded(self, copies: list[Any]) -> None: ...
    def abandoned(self, copies: list[Any], exc: BaseException) -> None: ...
    def staged_finished(self) -> None: ...  # only if it stages writes


class _Holds:
    """Held chunks -> the trio.Event their holder sets when it lets go. Holds never
    overlap. A hold of one chunk (most writes, most copies' destinations) lives in
    a dict, longer ones in a RangeMap: locking and releasing one chunk is two dict
    operations. A longer query or release looks at the dict chunk by chunk, or at
    each one-chunk hold (writes in flight) if there are fewer."""

    def __init__(self):
        self.one: dict[int, trio.Event] = {}
        self.runs = RangeMap(index_values=False)  # every holder's event is distinct

    def __bool__(self) -> bool:
        return bool(self.one) or bool(self.runs)

    def holder(self, first: int, end: int) -> trio.Event | None:
        """The event of a hold overlapping [first, end), None if there is none."""
        if end - first == 1 and first in self.one:
            return self.one[first]
        if self.runs:
            found = self.runs.overlapping(first, end)
            if found:
                return found[0][2]
        if end - first > 1:
            for chunk in self._one_chunk_holds_in(first, end):
                return self.one[chunk]
        return None

    def add(self, first: int, end: int, event: trio.Event) -> None:
        if end - first == 1:
            self.one[first] = event
        else:
            self.runs.assign(first, end, event)

    def remove(self, first: int, end: int) -> None:
        """Every hold within [first, end) ends."""
        if end - first == 1 and self.one.pop(first, None) is not None:
            return
        for chunk in self._one_chunk_holds_in(first, end):
            del self.one[chunk]
        if self.runs:
            self.runs.clear(first, end)

    def first_held(self, first: int, end: int) -> int | None:
        """The first chunk of [first, end) a hold covers, None if there is none."""
        starts = self._one_chunk_holds_in(first, end)
        if self.runs:
            found = self.runs.overlapping(first, end)
            if found:
                starts.append(max(first, found[0][0]))
        return min(starts, default=None)

    def _one_chunk_holds_in(self, first: int, end: int) -> list[int]:
        if end - first <= len(self.one):
            return [chunk for chunk in range(first, end) if chunk in self.one]
        return [chunk for chunk in self.one if first <= chunk < end]


@dataclass(eq=False)
class _Waiter:
    """One `writing` block waiting for its copies to be recorded."""
    remaining: int
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    on_done: Callable[["_Waiter"], None] | None = None  # a staged write: apply it then

    def finish(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.remaining -= 1
        if (self.remaining <= 0 or error is not None) and not self.done.is_set():
            self.done.set()
            if self.on_done is not None:
                self.on_done(self)


@dataclass(eq=False)
class _Staged:
    """A staged write: its chunks stay held until `finish` has run."""
    sequence: int
    first: int
    end: int
    released: trio.Event
    finish: Callable[[BaseException | None], None]


class CopyBeforeWrite:
    """Chunk locks, group commit and the copy -> record -> overwrite order; see the
    module docstring."""

    def __init__(self, policy: CopyPolicy, *, group_commit: bool = True):
        self.policy = policy
        self.group_commit = group_commit
        self.held = _Holds()
        self.uncopied: list[Any] = []  # copies of staged writes, made by the next round
        self.written: list[Any] = []  # copies written since the last barrier
        self.durable: list[Any] = []  # copies a barrier made durable, not yet recorded
        self.waiter_of: dict[int, _Waiter] = {}  # id(copy) -> its writer
        self.round_running = False
        self.round_done = trio.Event()
        self.rounds = 0
        self.barriers = 0
        self.barrier_seconds = 0.0  # time spent in barriers (to the caller: thread hand-off included)
        self.copies_recorded = 0
        self.staging = False  # `drive_staged` runs: writers may stage
        self.staged_count = 0
        self.unfinished: dict[int, _Staged] = {}  # sequence -> staged write, oldest first
        self.staged_work = trio.Event()      # set when a staged write needs rounds
        self.staged_finished = trio.Event()  # set (and replaced) whenever some finish
        self.finishing: list[tuple[_Staged, _Waiter]] = []  # done in this step: `_finish_staged`

    # -- the public entry -------------------------------------------------------

    @contextlib.asynccontextmanager
    async def writing(self, first: int, end: int, *, before_plan: Callable[[], None] | None = None,
                      plan: Callable[[int, int], list[Any]] | None = None,
                      stage: Callable[[], Callable[[BaseException | None], None] | None] | None = None):
        """Hold chunks [first, end) and make their old contents durably copied
        (where the policy says so) before the body overwrites them. Yields whether
        the write was staged instead (see "Staged first writes").

        `before_plan` (sync) runs once the chunks are held and before `plan`: the
        place for a read-modify-write to read what the chunks hold now. `plan`
        (sync) replaces ``policy.plan`` for this write."""
        released = await self._lock(first, end)
        staged = None
        try:
            if before_plan is not None:
                before_plan()
            copies = (plan or self.policy.plan)(first, end)
            if copies:
                staged = await self._copy_and_commit(copies, stage, first, end, released)
            yield staged is not None
        finally:
            if staged is None:
                self.held.remove(first, end)
                released.set()
            # else the chunks are released when the staged write is finished

    @contextlib.asynccontextmanager
    async def exclusive(self, first: int, end: int):
        """Hold chunks [first, end) without planning copies (a discard, a state change)."""
        released = await self._lock(first, end)
        try:
            yield
        finally:
            self.held.remove(first, end)
            released.set()

    # -- chunk locks --------------------------------------------------------------

    async def _lock(self, first: int, end: int) -> trio.Event:
        while (holder := self.held.holder(first, end)) is not None:
            await holder.wait()  # then look again: others may have come first
        released = trio.Event()
        self.held.add(first, end, released)
        return released

    def is_held(self, first: int, end: int) -> bool:
        """Does any `writing`, `exclusive` or `hold` hold a chunk of [first, end)? (A
        write the policy knows needs no copy may skip the locks if not.)"""
        return self.held.holder(first, end) is not None

    def first_held(self, first: int, end: int) -> int | None:
        """The first chunk of [first, end) that a `writing`, `exclusive` or `hold`
        holds, None if none is held."""
        return self.held.first_held(first, end)

    def hold(self, first: int, end: int) -> trio.Event:
        """Hold chunks [first, end) at once (sync, for `plan` or `write_records`:
        e.g. a copy's destination, so that no write lands there before the copy is
        recorded). They must be free: RuntimeError otherwise. Give the result to
        `release` when done."""
        if self.held.holder(first, end) is not None:
            raise RuntimeError(f"chunks [{first}, {end}) are already held")
        released = trio.Event()
        self.held.add(first, end, released)
        return released

    def release(self, first: int, end: int, *tokens: trio.Event) -> None:
        """Release chunks taken with `hold`: [first, end) is what the holds of
        `tokens` took together (one map change for a run of them)."""
        self.held.remove(first, end)
        for token in tokens:
            token.set()

    # -- copy, then commit --------------------------------------------------------

    async def _copy_and_commit(self, copies, stage, first, end, released) -> _Staged | None:
        # No await from here to the hand-over: `drive_staged` is still running when
        # it sees the staged write.
        try:
            finish = stage() if stage is not None and self.staging and self.group_commit else None
        except BaseException as exc:
            self.policy.abandoned(copies, exc)
            raise
        if finish is not None:
            staged = _Staged(self.staged_count, first, end, released, finish)
            self.staged_count += 1
            self.unfinished[staged.sequence] = staged
            waiter = _Waiter(len(copies), on_done=lambda waiter: self.finishing.append((staged, waiter)))
            for copy in copies:
                self.waiter_of[id(copy)] = waiter
            self.uncopied.extend(copies)
            self.staged_work.set()
            return staged
        try:
            await self.policy.copy(copies)
        except BaseException as exc:
            self.policy.abandoned(copies, exc)
            raise
        if self.group_commit:
            await self._commit_grouped(copies)
        else:
            await self._commit_naively(copies)
        return None

    def _queue(self, copies: list[Any], waiter: _Waiter) -> None:
        for copy in copies:
            self.waiter_of[id(copy)] = waiter
        self.written.extend(copies)

    def _finish_staged(self) -> None:
        """The copies of the staged writes in `finishing` are recorded (or failed):
        the image applies them, then their chunks are free."""
        if not self.finishing:
            return
        finishing, self.finishing = self.finishing, []
        try:
            for staged, waiter in finishing:
                staged.finish(waiter.error)
            self.policy.staged_finished()
        finally:
            for staged, _ in finishing:
                del self.unfinished[staged.sequence]
                self.held.remove(staged.first, staged.end)
                staged.released.set()
            self.staged_finished.set()
            self.staged_finished = trio.Event()

    async def drive_staged(self) -> None:
        """Background task: while it runs, writers may stage, and it runs the rounds
        their copies wait for. Cancelled, it stops staging and finishes every staged
        write first (shielded)."""
        self.staging = True
        try:
            while True:
                await self.staged_work.wait()
                self.staged_work = trio.Event()
                await self._run_rounds_until_finished()
        finally:
            self.staging = False
            with trio.CancelScope(shield=True):
                await self._run_rounds_until_finished()

    async def _run_rounds_until_finished(self) -> None:
        while self.unfinished:
            if self.round_running:
                await self.round_done.wait()
            else:
                with trio.CancelScope(shield=True):  # a half-run round would strand others
                    await self._run_round()

    async def settled(self) -> None:
        """Wait until every write staged before this call is finished."""
        mark = self.staged_count
        while self.unfinished and next(iter(self.unfinished)) < mark:
            await self.staged_finished.wait()

    async def _commit_grouped(self, copies: list[Any]) -> None:
        waiter = _Waiter(len(copies))
        self._queue(copies, waiter)
        while not waiter.done.is_set():
            if self.round_running:
                await self.round_done.wait()
            else:
                with trio.CancelScope(shield=True):  # a half-run round would strand others
                    await self._run_round()
        if waiter.error is not None:
            raise waiter.error

    async def _run_round(self) -> None:
        self.round_running = True
        self.round_done = trio.Event()
        try:
            if self.uncopied:
                await self._copy_staged()
            ready, self.durable = self.durable, []
            try:
                recorded, deferred, injected = self.policy.write_records(ready) if ready else ([], [], [])
            except Exception as exc:  # their writers fail; nobody waits forever
                self._fail(ready, exc)
                return
            to_sync, self.written = injected + self.written, []
            self.rounds += 1
            try:
                await self._barrier()
            except OSError as exc:
                self._recorded(recorded, exc)
                self._fail(to_sync + deferred, exc)
                return
            self._recorded(recorded, None)
            # Injected copies first: the policy needs them recorded before the rest.
            self.durable = injected + deferred + to_sync[len(injected):]
        finally:
            self.round_running = False
            self.round_done.set()

    async def _copy_staged(self) -> None:
        """The copies of the writes staged since the last round, in one call; the
        barrier that follows makes them durable."""
        copies, self.uncopied = self.uncopied, []
        try:
            await self.policy.copy(copies)
        except Exception as exc:  # their writers fail (the image must not apply them)
            self._fail(copies, exc)
            return
        self.written.extend(copies)

    async def _commit_naively(self, copies: list[Any]) -> None:
        """Each write on its own: sync its copies, write its records, sync them."""
        pending = copies
        try:
            await self._barrier()
            while pending:
                recorded, deferred, injected = self.policy.write_records(pending)
                await self._barrier()
                self.policy.recorded(recorded)
                self.copies_recorded += len(recorded)
                pending = injected + deferred
                if not recorded and not injected:
                    await trio.sleep(0)  # another write holds what the policy waits for
        except BaseException as exc:
            self.policy.abandoned(pending, exc)
            raise

    async def _barrier(self) -> None:
        self.barriers += 1
        started = time.monotonic()
        try:
            await self.policy.barrier()
        finally:
            self.barrier_seconds += time.monotonic() - started

    def _recorded(self, copies: Sequence[Any], error: BaseException | None) -> None:
        if not copies:
            return
        try:
            self.policy.recorded(list(copies))
        except Exception as exc:  # e.g. the policy's own bookkeeping could not be written
            error = error or exc
        self.copies_recorded += len(copies)
        for copy in copies:
            waiter = self.waiter_of.pop(id(copy), None)
            if waiter is not None:
                waiter.finish(error)
        self._finish_staged()

    def _fail(self, copies: Sequence[Any], error: BaseException) -> None:
        if not copies:
            return
        self.policy.abandoned(list(copies), error)
        for copy in copies:
            waiter = self.waiter_of.pop(id(copy), None)
            if waiter is not None:
                waiter.finish(error)
        self._finish_staged()

    @property
    def idle(self) -> bool:
        """No chunk held, no copy waiting for a round, no round running: every copy
        made so far is recorded (true once every writer is done, as in a live
        upgrade's pause)."""
        return not (self.round_running or self.durable or self.written or self.uncopied or self.held
                    or self.unfinished)

    def status(self) -> dict:
        return {"rounds": self.rounds, "barriers": self.barriers,
                "barrier_seconds": round(self.barrier_seconds, 3),
                "copies_recorded": self.copies_recorded}
