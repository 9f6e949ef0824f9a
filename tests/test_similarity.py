"""The similarity index of v1 diffs: it names the old block a new block came from
whatever the shift, ignores zeros, and stays within its memory bound at any size."""

from __future__ import annotations

import random

import numpy as np

from fusesnap.similarity import MAX_PER_BLOCK, SimilarityIndex, choose_references, runs_of

BS = 4096


def indexed(old: bytes, **options) -> SimilarityIndex:
    index = SimilarityIndex(len(old) // BS, BS, **options)
    feats, blocks = index.features(old)
    index.add(feats, blocks)
    index.freeze()
    return index


def test_a_shifted_new_block_is_found_in_the_old_block_it_came_from():
    rng = random.Random(1)
    old = rng.randbytes(64 * BS)
    index = indexed(old)
    for block in (0, 17, 63):
        for shift in (0, 1, 3, 1000):
            new = old[block * BS + shift:(block + 1) * BS] + rng.randbytes(shift)
            refs = choose_references(index, new, limit=8)
            assert block in refs, (block, shift, refs)
            assert all(abs(r - block) <= 1 for r in refs)


def test_zeros_and_repeated_words_have_no_features():
    index = SimilarityIndex(8, BS)
    assert len(index.features(bytes(8 * BS))[0]) == 0
    assert len(index.features(b"\x90\x90\x90\x90" * (2 * BS))[0]) == 0


def test_each_block_keeps_at_most_its_share_of_features():
    old = random.Random(2).randbytes(16 * BS)
    feats, blocks = SimilarityIndex(16, BS).features(old)
    assert np.bincount(blocks).max() == MAX_PER_BLOCK
    denser = SimilarityIndex(16, BS, anchor_rate=64, per_block=32).features(old)[1]
    assert np.bincount(denser).max() == 32


def test_the_index_never_outgrows_its_bound_and_still_finds_blocks():
    """An OLD whose features would take 8 times the bound is sampled down to it, by
    feature value, so that a new block's features are sampled alike."""
    rng = random.Random(3)
    old = rng.randbytes(256 * BS)
    bound = 256 * MAX_PER_BLOCK * 8 // 8
    index = indexed(old, max_bytes=bound)
    assert index.nbytes <= bound
    found = sum(b in choose_references(index, old[b * BS:(b + 1) * BS], limit=4)
                for b in range(0, 256, 8))
    assert found >= 20   # of 32: a block keeps about one feature in 8


def test_references_are_limited_and_come_back_as_runs():
    rng = random.Random(4)
    old = rng.randbytes(64 * BS)
    index = indexed(old)
    chunk = old[10 * BS:40 * BS]
    refs = choose_references(index, chunk, limit=16)
    assert len(refs) == 16 and refs == sorted(refs)
    assert runs_of([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 1), (9, 2)]
