"""Finding old blocks that resemble new ones: the similarity index of `fusesnap diff`.

A block's *features* are 64-bit hashes of 12-byte strings found at content-defined
anchors: the offsets where a hash of the 4 bytes there falls in the top
1/ANCHOR_RATE of its range (so about one anchor per ANCHOR_RATE bytes, at the same
places in the same text wherever it sits in a block; a word of zeros is never an
anchor). Strings that repeat
one 4-byte word (padding) are not features. Two blocks sharing features share those
strings, so a new block's features name the old blocks it will find matches in when
compressed against them, whatever the shift between the two versions of a file.

`SimilarityIndex` holds the features of the old blocks a diff may reference in one
sorted numpy array of 8-byte keys: a feature's high bits with the block number in
the low bits, at most MAX_PER_BLOCK features per block (the smallest: a bottom-k
sketch). That is at most 16 MiB per GiB of OLD in 4 KiB blocks (free space and zero
blocks have no features), sorted in place, and never more than INDEX_BYTES: for an
OLD so large that its blocks' features could exceed it, features are sampled by
value (the same ones of OLD and NEW are kept), so the index is bounded whatever the
image size. Features found in more than COMMON_LIMIT old blocks say nothing about
where a block came from and are ignored by lookups.

Pure computation. `features` and lookups are thread-safe (lookups once frozen);
numpy releases the GIL in the heavy steps, so the caller computes the features of
several windows in parallel.
"""

from __future__ import annotations

import threading

import numpy as np

ANCHOR_RATE = 256               # about one feature per this many bytes
MAX_PER_BLOCK = 8               # features kept per block: bounds the index's memory
SLICE_BYTES = 1 << 20           # features are computed in slices this long (cache-friendly)
COMMON_LIMIT = 16               # a feature in more old blocks than this is ignored
INDEX_BYTES = 192 << 20         # the index never holds more than this
_MIX32 = np.uint32(0x9E3779B1)
_MIX_A = np.uint64(0x9E3779B97F4A7C15)
_MIX_B = np.uint64(0xC2B2AE3D27D4EB4F)
_NO_FEATURES = (np.empty(0, np.uint64), np.empty(0, np.uint32))


_scratch = threading.local()     # per thread: buffers for the hash of every word of a slice


def _anchored_words(data, n: int, block_size: int, anchor_from: np.uint32) -> tuple[np.ndarray, ...]:
    """(offsets, w0, w1, w2): the anchors of data[:n] (n <= SLICE_BYTES), the offsets
    whose word hashes to `anchor_from` or more (0 hashes to 0), whose 12 bytes lie in
    the anchor's block, and the three little-endian u32 there. Anchors at
    offsets s mod 4 are found in the u32 array starting at s, so every word is hashed
    in place, into buffers kept per thread (fresh ones cost page faults: 4 times
    slower)."""
    if getattr(_scratch, "hashed", None) is None:
        _scratch.hashed = np.empty(SLICE_BYTES // 4, np.uint32)
        _scratch.below = np.empty(SLICE_BYTES // 4, bool)
    parts = []
    for shift in range(4):
        words = np.frombuffer(data, "<u4", count=(n - shift) // 4, offset=shift)
        hashed, below = _scratch.hashed[:len(words) - 2], _scratch.below[:len(words) - 2]
        np.multiply(words[:-2], _MIX32, out=hashed)
        np.greater_equal(hashed, anchor_from, out=below)
        at = np.flatnonzero(below)
        offsets = at * 4 + shift
        inside = (offsets % block_size) <= block_size - 12
        at, offsets = at[inside], offsets[inside]
        parts.append((offsets, words[at], words[at + 1], words[at + 2]))
    return tuple(np.concatenate(column) for column in zip(*parts))


class SimilarityIndex:
    """Features of the blocks of an OLD of `old_blocks` blocks, built once: `add` the
    features of its windows (any order), `freeze`, then look up. About one feature
    per `anchor_rate` bytes, at most `per_block` a block (denser finds more of what
    resembles a block, for more memory and time)."""

    def __init__(self, old_blocks: int, block_size: int, *, anchor_rate: int = ANCHOR_RATE,
                 per_block: int = MAX_PER_BLOCK, max_bytes: int = INDEX_BYTES) -> None:
        self.block_size = block_size
        self.old_blocks = old_blocks
        self._anchor_from = np.uint32((1 << 32) - (1 << 32) // anchor_rate)
        self._per_block = per_block
        self._block_bits = max(1, (old_blocks - 1).bit_length())
        self._block_mask = np.uint64((1 << self._block_bits) - 1)
        capacity = max(1, min(per_block * old_blocks, max_bytes // 8))
        # Keep features below this value: all of them unless an OLD full of data would
        # overflow. Sampling comes before the bottom-k: a block full of data keeps about
        # one anchor per anchor_rate bytes, times the rate.
        self._keep_below = None
        if per_block * old_blocks > capacity:
            rate = capacity / (max(per_block, block_size // anchor_rate) * old_blocks)
            self._keep_below = np.uint64(int(rate * 2**64))
        self._keys = np.empty(capacity, np.uint64)   # pages are touched as they fill
        self._n = 0
        self._frozen = False

    def features(self, data) -> tuple[np.ndarray, np.ndarray]:
        """(features uint64, block index uint32 within `data`) of the blocks of `data`
        (bytes-like, a multiple of the block size long), grouped by block: at most
        `per_block` a block, the smallest, those this index keeps. A feature
        repeated within a block may appear twice. Thread-safe."""
        bs = self.block_size
        step = max(1, SLICE_BYTES // bs) * bs
        if len(data) <= step:
            return self._slice_features(data)
        view = memoryview(data)
        parts = [self._slice_features(view[at:at + step]) for at in range(0, len(data), step)]
        return (np.concatenate([f for f, _ in parts]),
                np.concatenate([b + np.uint32(i * (step // bs)) for i, (_, b) in enumerate(parts)]))

    def _slice_features(self, data) -> tuple[np.ndarray, np.ndarray]:
        n = len(data)
        # zeros (free space) have no anchors: a look at them is 4 times cheaper
        if n < 16 or not np.frombuffer(data, np.uint64, count=n // 8).any():
            return _NO_FEATURES
        offsets, w0, w1, w2 = _anchored_words(data, n, self.block_size, self._anchor_from)
        keep = (w0 != w1) | (w1 != w2)          # not one repeated word (padding)
        offsets, w0, w1, w2 = offsets[keep], w0[keep], w1[keep], w2[keep]
        feats = ((w0.astype(np.uint64) << np.uint64(32) | w1.astype(np.uint64)) * _MIX_A
                 ^ w2.astype(np.uint64) * _MIX_B)
        blocks = (offsets // self.block_size).astype(np.uint32)
        if self._keep_below is not None:
            sampled = feats < self._keep_below
            feats, blocks = feats[sampled], blocks[sampled]
        # at most per_block per block, the smallest (a bottom-k sketch of the block)
        order = np.lexsort((feats, blocks))
        feats, blocks = feats[order], blocks[order]
        first = np.searchsorted(blocks, blocks, side="left")
        keep = (np.arange(len(blocks)) - first) < self._per_block
        return feats[keep], blocks[keep]

    def add(self, feats: np.ndarray, blocks: np.ndarray) -> None:
        """Features of old blocks (`blocks` are device block numbers), as `features`
        returns them. Not thread-safe: one thread adds. Past the index's capacity
        (possible only for an OLD dense almost everywhere) features are dropped."""
        assert not self._frozen
        n = min(len(feats), len(self._keys) - self._n)
        keys = self._keys[self._n:self._n + n]
        np.right_shift(feats[:n], np.uint64(self._block_bits), out=keys)
        keys <<= np.uint64(self._block_bits)
        keys |= blocks[:n].astype(np.uint64)
        self._n += n

    def freeze(self) -> None:
        """Sort what was added, in place; lookups work from here on."""
        self._keys = self._keys[:self._n]
        self._keys.sort()
        self._frozen = True

    @property
    def nbytes(self) -> int:
        return self._keys[:self._n].nbytes

    def __len__(self) -> int:
        return self._n

    def votes(self, feats: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For features of new blocks (`owners`: which new block each belongs to), the
        (owner, old block, shared features) triples, rare features only."""
        assert self._frozen
        low = (feats >> np.uint64(self._block_bits)) << np.uint64(self._block_bits)
        lo = np.searchsorted(self._keys, low, side="left")
        hi = np.searchsorted(self._keys, low | self._block_mask, side="right")
        count = hi - lo
        useful = (count > 0) & (count <= COMMON_LIMIT)
        lo, count, owners = lo[useful], count[useful], owners[useful]
        if not len(lo):
            empty = np.empty(0, np.int64)
            return empty, empty, empty
        total = int(count.sum())
        # positions lo[i] .. lo[i] + count[i] - 1, flattened
        starts = np.repeat(lo - np.concatenate(([0], np.cumsum(count)[:-1])), count)
        positions = starts + np.arange(total)
        olds = (self._keys[positions] & self._block_mask).astype(np.int64)
        pairs = (np.repeat(owners.astype(np.int64), count) << 32) | olds
        keys, shared = np.unique(pairs, return_counts=True)
        return keys >> 32, keys & 0xFFFFFFFF, shared


def choose_references(index: SimilarityIndex, chunk, limit: int,
                      allowed: np.ndarray | None = None, spread: int = 1) -> list[int]:
    """Old block numbers (sorted, at most `limit`) to compress the chunk (new blocks'
    contents, bytes-like) against: for each new block the old block sharing most of
    its features, with the `spread` blocks either side of it (a shifted file straddles
    two; a file's new version may have grown), among the blocks `allowed` (a bool per
    old block) says may be referenced (all if None). When there are more than
    `limit`, the most voted for are kept, the best of each new block counting double."""
    feats, owners = index.features(chunk)
    owner, old, shared = index.votes(feats, owners)
    if allowed is not None:
        ok = allowed[old]
        owner, old, shared = owner[ok], old[ok], shared[ok]
    if not len(owner):
        return []
    # per new block (owner), its best old block: sort by owner, then shared descending
    order = np.lexsort((-shared, owner))
    owner, old, shared = owner[order], old[order], shared[order]
    first = np.concatenate(([True], owner[1:] != owner[:-1]))
    best, weight = old[first], shared[first]
    candidates = np.concatenate([best + k for k in range(-spread, spread + 1)])
    weights = np.concatenate([weight * (2 if k == 0 else 1) for k in range(-spread, spread + 1)])
    ok = (candidates >= 0) & (candidates < index.old_blocks)
    candidates, weights = candidates[ok], weights[ok]
    if allowed is not None:
        ok = allowed[candidates]
        candidates, weights = candidates[ok], weights[ok]
    blocks, inverse = np.unique(candidates, return_inverse=True)
    if len(blocks) > limit:
        total = np.bincount(inverse, weights=weights)
        blocks = np.sort(blocks[np.argsort(-total, kind="stable")[:limit]])
    return blocks.tolist()


def runs_of(blocks: list[int]) -> list[tuple[int, int]]:
    """(first, count) runs of consecutive numbers in a sorted list."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
