"""The source check: which devices a diff may be merged into, without a mount."""

from __future__ import annotations

import os
import random

import pytest
import xxhash

from fusesnap.devices import BlockDevice
from fusesnap.diffing import build_diff, old_reader
from fusesnap.errors import UserError
from fusesnap.formats.update_diff import DiffFile
from fusesnap.images.update import check_source
from fusesnap.old_hashes import OldBlockHashes
from test_diff_v1 import upgraded_in_place, with_trailer_version_2

BS = 4096
CHUNK_BLOCKS = 4


@pytest.fixture
def update(tmp_path):
    """(old, new, diff path, changed blocks): 64 blocks, 20 of them changed (5 chunks)."""
    rng = random.Random(5)
    old = rng.randbytes(64 * BS)
    new = bytearray(old)
    changed = sorted(rng.sample(range(64), 20))
    for block in changed:
        new[block * BS:(block + 1) * BS] = rng.randbytes(BS)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    build_diff(tmp_path / "old", tmp_path / "new", tmp_path / "diff", chunk_blocks=CHUNK_BLOCKS,
               threads=1)
    return old, bytes(new), tmp_path / "diff", changed


def check(tmp_path, contents: bytes, diff) -> int:
    (tmp_path / "dev").write_bytes(contents)
    device = BlockDevice(str(tmp_path / "dev"), read_only=True)
    try:
        with DiffFile.open(diff) as d:
            return check_source(d, device)
    finally:
        device.close()


def mixed(old: bytes, new: bytes, blocks) -> bytes:
    """OLD with `blocks` already holding their new contents."""
    out = bytearray(old)
    for block in blocks:
        out[block * BS:(block + 1) * BS] = new[block * BS:(block + 1) * BS]
    return bytes(out)


def test_old_needs_everything_merged(tmp_path, update):
    old, _, diff, _ = update
    assert check(tmp_path, old, diff) == 0


def test_new_needs_nothing_merged(tmp_path, update):
    _, new, diff, _ = update
    assert check(tmp_path, new, diff) == 5


def test_a_merge_interrupted_inside_a_chunk_is_fine(tmp_path, update):
    """Chunks 0 and 1 merged, then some blocks of chunk 2 and one of chunk 4, in any order
    (writeback does not keep the merge's order)."""
    old, new, diff, changed = update
    merged = changed[:8] + [changed[9], changed[10], changed[17]]
    assert check(tmp_path, mixed(old, new, merged), diff) == 2


@pytest.mark.parametrize("where", [0, 9, 19])
def test_a_block_neither_old_nor_new_is_named(tmp_path, update, where):
    old, new, diff, changed = update
    device = bytearray(mixed(old, new, changed[:where]))
    block = changed[where]
    device[block * BS + 7] ^= 1
    with pytest.raises(UserError, match=f"block {block} \\(byte {block * BS}\\) holds neither"):
        check(tmp_path, bytes(device), diff)


def test_blocks_the_diff_does_not_change_are_not_checked(tmp_path, update):
    old, _, diff, changed = update
    unchanged = next(b for b in range(64) if b not in changed)
    device = bytearray(old)
    device[unchanged * BS] ^= 1
    assert check(tmp_path, bytes(device), diff) == 0


def test_a_random_device_is_refused_at_its_first_changed_block(tmp_path, update):
    _, _, diff, changed = update
    with pytest.raises(UserError, match=f"block {changed[0]} "):
        check(tmp_path, os.urandom(64 * BS), diff)


# ---- version 1 diffs: old contents hashed per chunk (trailer version 3) ----------------

@pytest.fixture
def update_v1(tmp_path):
    """(old, new, v1 diff path, changed blocks, the v1 diff with a version 2 trailer):
    an in-place upgrade of 256 blocks, chunks of 4 blocks."""
    old, new = upgraded_in_place(random.Random(7), 256)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    build_diff(tmp_path / "old", tmp_path / "new", tmp_path / "v1.diff",
               chunk_blocks=CHUNK_BLOCKS, threads=1, diff_format="v1")
    changed = [b for b in range(256) if old[b * BS:(b + 1) * BS] != new[b * BS:(b + 1) * BS]]
    v2 = with_trailer_version_2(tmp_path / "v1.diff", old, tmp_path / "v2-trailer.diff")
    return old, new, tmp_path / "v1.diff", changed, v2


def check_v1(tmp_path, contents: bytes, diff, old_hashes=None) -> int:
    """The check as a v1 merge runs it: references read from OLD's contents (what the
    scratch copy holds), old hashes from `old_hashes`."""
    (tmp_path / "dev").write_bytes(contents)
    device = BlockDevice(str(tmp_path / "dev"), read_only=True)
    try:
        with DiffFile.open(diff) as d, open(tmp_path / "old", "rb") as old:
            return check_source(d, device, old_reader(old.fileno(), BS), old_hashes)
    finally:
        device.close()


def recorded_on(tmp_path, old: bytes, diff) -> OldBlockHashes:
    """What the first mount that merges records: the check of OLD, learning."""
    with DiffFile.open(diff) as d:
        hashes = OldBlockHashes.load(str(tmp_path / "record"), d)
    assert check_v1(tmp_path, old, diff, hashes) == 0
    hashes.save()
    return hashes


def test_v1_old_is_recognised_by_chunk_and_its_block_hashes_recorded(tmp_path, update_v1):
    old, _, diff, changed, _ = update_v1
    recorded_on(tmp_path, old, diff)
    with DiffFile.open(diff) as d:
        again = OldBlockHashes.load(str(tmp_path / "record"), d)
        assert again.of_entries(0, d.total_blocks) == b"".join(
            xxhash.xxh3_64_digest(old[b * BS:(b + 1) * BS]) for b in changed)


def test_v1_a_merge_interrupted_inside_a_chunk_is_fine_with_the_recorded_hashes(tmp_path,
                                                                                update_v1):
    """Chunks 0 and 1 merged, then some blocks of chunk 2 and one of chunk 4, after the
    first mount recorded the old hashes."""
    old, new, diff, changed, _ = update_v1
    hashes = recorded_on(tmp_path, old, diff)
    merged = changed[:8] + [changed[9], changed[10], changed[17]]
    assert check_v1(tmp_path, mixed(old, new, merged), diff, hashes) == 2
    assert check_v1(tmp_path, new, diff, hashes) == len(changed) // CHUNK_BLOCKS


def test_v1_a_wrong_block_in_a_half_merged_chunk_is_named(tmp_path, update_v1):
    old, new, diff, changed, _ = update_v1
    hashes = recorded_on(tmp_path, old, diff)
    device = bytearray(mixed(old, new, changed[:9]))
    block = changed[10]
    device[block * BS + 7] ^= 1
    with pytest.raises(UserError, match=f"block {block} \\(byte {block * BS}\\) holds neither"):
        check_v1(tmp_path, bytes(device), diff, hashes)


def test_v1_a_half_merged_chunk_without_recorded_hashes_is_refused(tmp_path, update_v1):
    """Its blocks that are not new cannot be told old: refused, never guessed."""
    old, new, diff, changed, _ = update_v1
    with DiffFile.open(diff) as d:
        nothing_known = OldBlockHashes.load(str(tmp_path / "none"), d)
    with pytest.raises(UserError, match=f"chunk 2 \\(from block {changed[8]}\\) holds neither "
                       f".*block {changed[9]} is not new.*no merge recorded"):
        check_v1(tmp_path, mixed(old, new, changed[:9]), diff, nothing_known)


def test_v1_a_random_device_is_refused_at_its_first_changed_block(tmp_path, update_v1):
    old, _, diff, changed, _ = update_v1
    hashes = recorded_on(tmp_path, old, diff)
    with pytest.raises(UserError, match=f"block {changed[0]} "):
        check_v1(tmp_path, os.urandom(256 * BS), diff, hashes)


def test_v1_with_a_version_2_trailer_tells_blocks_apart_by_its_own_hashes(tmp_path, update_v1):
    old, new, _, changed, v2 = update_v1
    with DiffFile.open(v2) as d:
        from_trailer = OldBlockHashes.from_trailer(d)
    merged = changed[:8] + [changed[9], changed[10], changed[17]]
    assert check_v1(tmp_path, mixed(old, new, merged), v2, from_trailer) == 2
    device = bytearray(mixed(old, new, changed[:9]))
    device[changed[10] * BS] ^= 1
    with pytest.raises(UserError, match=f"block {changed[10]} "):
        check_v1(tmp_path, bytes(device), v2, from_trailer)


def test_a_damaged_record_of_old_hashes_is_ignored(tmp_path, update_v1):
    old, _, diff, _, _ = update_v1
    recorded_on(tmp_path, old, diff)
    raw = bytearray((tmp_path / "record").read_bytes())
    raw[40] ^= 1
    (tmp_path / "record").write_bytes(raw)
    with DiffFile.open(diff) as d:
        assert OldBlockHashes.load(str(tmp_path / "record"), d).of_entries(0, 1) is None
