"""The crash-state recorder itself: what it records and which states it rebuilds."""

from __future__ import annotations

import os

import pytest

from crash_states import FLUSH, MARK, WRITE, crash_states, read_log, recording_device
from harness import sparse_file

pytestmark = pytest.mark.mount


def test_records_writes_flushes_and_marks_and_rebuilds_every_flush_point(tmp_path):
    base = sparse_file(tmp_path / "base.img", 1 << 20)
    with recording_device(tmp_path / "rec", base) as rec:
        fd = os.open(rec.device, os.O_RDWR)
        try:
            os.pwrite(fd, b"A" * 4096, 0)
            os.fsync(fd)
            rec.mark("first synced")
            os.pwrite(fd, b"B" * 8192, 4096)
            os.pwrite(fd, b"C" * 100, 20000)
            os.fsync(fd)
            os.pwrite(fd, b"D" * 4096, 0)
            assert os.pread(fd, 4096, 0) == b"D" * 4096
        finally:
            os.close(fd)
    assert base.read_bytes() == bytes(1 << 20)  # the base stays untouched
    kinds = [kind for kind, _, _ in read_log(rec.log_path)]
    assert kinds == [WRITE, FLUSH, MARK, WRITE, WRITE, FLUSH, WRITE]

    states = list(crash_states(base, rec, tmp_path / "states", seed=3, subsets_per_flush=4))
    flush_states = [s for s in states if s.description == f"flush {s.flushes}"]
    assert [s.flushes for s in flush_states] == [0, 1, 2]
    seen = set()
    for state in states:
        data = state.path.read_bytes()
        block0, b1, b2, c = data[:4096], data[4096:8192], data[8192:12288], data[20000:20100]
        # Nothing flushed is ever lost; unflushed writes may or may not be there.
        if state.flushes >= 1:
            assert block0 in (b"A" * 4096, b"D" * 4096), state.description
        if state.flushes >= 2:
            assert (b1, b2, c) == (b"B" * 4096, b"B" * 4096, b"C" * 100), state.description
        assert state.marks == (frozenset({"first synced"}) if state.flushes >= 2 else frozenset())
        seen.add((state.flushes, block0[:1], b1[:1], b2[:1], c[:1]))
    # Subsets include partial outcomes of the two writes after flush 1.
    assert any(s[0] == 1 and s[2] != s[3] for s in seen) or any(s[0] == 1 and s[2] != s[4] for s in seen)
