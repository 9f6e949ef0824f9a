"""bow.img's map journal: what is appended is replayed, a torn tail is dropped, and a
journal of another device is refused."""

from __future__ import annotations

import pytest

from fusesnap.errors import UserError
from fusesnap.images.bow import MapJournal

IDENTITY = {"device": "/dev/sda3", "size": 1 << 30, "id": [8, 3], "block_size": 4096}


def test_appended_records_are_replayed_in_order(tmp_path):
    journal = MapJournal(str(tmp_path / "dev.map"), IDENTITY)
    journal.rewrite([MapJournal.pack(MapJournal.ASSIGN, 1, 10, 20)])
    journal.add(MapJournal.STATE, 1, 7, 0)
    journal.add(MapJournal.LOGPOS, 0, 2, 88)
    journal.write_out()
    journal.close()
    assert MapJournal(str(tmp_path / "dev.map"), IDENTITY).load() == [
        (MapJournal.ASSIGN, 1, 10, 20), (MapJournal.STATE, 1, 7, 0), (MapJournal.LOGPOS, 0, 2, 88)]


def test_a_torn_tail_ends_the_replay(tmp_path):
    path = tmp_path / "dev.map"
    journal = MapJournal(str(path), IDENTITY)
    journal.rewrite([MapJournal.pack(MapJournal.ASSIGN, 1, 0, 5), MapJournal.pack(MapJournal.ASSIGN, 2, 5, 6)])
    journal.close()
    data = path.read_bytes()
    path.write_bytes(data[:-10] + bytes(10))
    assert MapJournal(str(path), IDENTITY).load() == [(MapJournal.ASSIGN, 1, 0, 5)]


def test_no_journal_is_none_and_another_devices_journal_is_refused(tmp_path):
    path = tmp_path / "dev.map"
    assert MapJournal(str(path), IDENTITY).load() is None
    MapJournal(str(path), IDENTITY).rewrite([])
    with pytest.raises(UserError, match="belongs to another device"):
        MapJournal(str(path), {**IDENTITY, "size": 2 << 30}).load()
    path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a bow map"):
        MapJournal(str(path), IDENTITY).load()
