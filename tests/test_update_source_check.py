"""The source check: which devices a diff may be merged into, without a mount."""

from __future__ import annotations

import os
import random

import pytest

from fusesnap.devices import BlockDevice
from fusesnap.diffing import build_diff
from fusesnap.errors import UserError
from fusesnap.formats.update_diff import DiffFile
from fusesnap.images.update import check_source

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
