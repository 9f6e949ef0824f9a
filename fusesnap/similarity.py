"""Finding old blocks that resemble new ones: the similarity index of `fusesnap diff`.

A block's *features* are 64-bit hashes of 12-byte strings found at content-defined
anchors: the offsets where a hash of the 4 bytes there falls below 2^32 / ANCHOR_RATE
(so about one anchor per ANCHOR_RATE bytes, at the same places in the same text
wherever it sits in a block). Strings that repeat one 4-byte word (zeros, padding)
are not features. Two blocks sharing features share those strings, so a new block's
features name the old blocks it will find matches in when compressed against them,
whatever the shift between the two versions of a file.

`SimilarityIndex` holds the features of the old blocks a diff may reference, sorted,
in two numpy arrays: 12 bytes per feature, at most MAX_PER_BLOCK per block (the
smallest: a bottom-k sketch), so at most 24 MiB per GiB of OLD in 4 KiB blocks, 240
MiB for 10 GiB (most images hold far less: free space and zero blocks have no
features; 12 MiB for the 512 MiB benchmark pairs). Features found in
more than COMMON_LIMIT old blocks say nothing about where a block came from and are
ignored by lookups.

Pure computation, thread-safe for lookups once built; numpy releases the GIL in the
heavy steps, so features of several windows are computed in parallel by the caller.
"""

from __future__ import annotations

import numpy as np

ANCHOR_RATE = 256               # about one feature per this many bytes
MAX_PER_BLOCK = 8               # features kept per block: bounds the index's memory
SLICE_BYTES = 1 << 20           # features are computed in slices this long (cache-friendly)
COMMON_LIMIT = 16               # a feature in more old blocks than this is ignored
_ANCHOR_BELOW = np.uint32((1 << 32) // ANCHOR_RATE)
_MIX32 = np.uint32(0x9E3779B1)
_MIX_A = np.uint64(0x9E3779B97F4A7C15)
_MIX_B = np.uint64(0xC2B2AE3D27D4EB4F)


def _words(data, n: int) -> np.ndarray:
    """The little-endian u32 at every byte offset of data[:n] but the last 3."""
    words = np.empty(n - 3, np.uint32)
    for shift in range(4):
        count = (n - shift) // 4
        words[shift::4] = np.frombuffer(data, "<u4", count=count, offset=shift)[:len(words[shift::4])]
    return words


def features(data, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(features uint64, block index uint32 within `data`) of the blocks of `data`
    (bytes-like, a multiple of block_size long), in block order; a feature repeated
    within a block may appear more than once. Anchors never straddle blocks."""
    step = max(1, SLICE_BYTES // block_size) * block_size
    if len(data) <= step:
        return _slice_features(data, block_size)
    view = memoryview(data)
    parts = [_slice_features(view[at:at + step], block_size) for at in range(0, len(data), step)]
    return (np.concatenate([f for f, _ in parts]),
            np.concatenate([b + np.uint32(i * (step // block_size)) for i, (_, b) in enumerate(parts)]))


def _slice_features(data, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(data)
    if n < 16:
        return np.empty(0, np.uint64), np.empty(0, np.uint32)
    words = _words(data, n)
    head = words[:-8]
    anchors = np.flatnonzero(((head * _MIX32) < _ANCHOR_BELOW) & (head != 0))
    w0, w1, w2 = words[anchors], words[anchors + 4], words[anchors + 8]
    # not a repeated word (zeros, padding), and the 12 bytes lie in the anchor's block
    keep = ((w0 != w1) | (w1 != w2)) & ((anchors % block_size) <= block_size - 12)
    anchors, w0, w1, w2 = anchors[keep], w0[keep], w1[keep], w2[keep]
    feats = ((w0.astype(np.uint64) << np.uint64(32) | w1.astype(np.uint64)) * _MIX_A
             ^ w2.astype(np.uint64) * _MIX_B)
    blocks = (anchors // block_size).astype(np.uint32)
    # at most MAX_PER_BLOCK per block, the smallest (a bottom-k sketch of the block)
    order = np.lexsort((feats, blocks))
    feats, blocks = feats[order], blocks[order]
    first = np.searchsorted(blocks, blocks, side="left")
    keep = (np.arange(len(blocks)) - first) < MAX_PER_BLOCK
    return feats[keep], blocks[keep]


class SimilarityIndex:
    """Features of old blocks (block numbers of the device), built once from pieces."""

    def __init__(self) -> None:
        self._pieces: list[tuple[np.ndarray, np.ndarray]] = []
        self._features = np.empty(0, np.uint64)
        self._blocks = np.empty(0, np.uint32)

    def add(self, feats: np.ndarray, blocks: np.ndarray) -> None:
        """Features of old blocks (`blocks` are device block numbers)."""
        if len(feats):
            self._pieces.append((feats, blocks))

    def freeze(self) -> None:
        """Sort what was added; lookups work from here on."""
        self._pieces.append((self._features, self._blocks))
        feats = np.concatenate([f for f, _ in self._pieces])
        blocks = np.concatenate([b for _, b in self._pieces])
        self._pieces = []
        order = np.argsort(feats, kind="stable")
        self._features, self._blocks = feats[order], blocks[order]

    @property
    def nbytes(self) -> int:
        return self._features.nbytes + self._blocks.nbytes

    def __len__(self) -> int:
        return len(self._features)

    def votes(self, feats: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For features of new blocks (`owners`: which new block each belongs to), the
        (owner, old block, shared features) triples, rare features only."""
        lo = np.searchsorted(self._features, feats, side="left")
        hi = np.searchsorted(self._features, feats, side="right")
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
        pairs = (np.repeat(owners.astype(np.int64), count) << 32) | self._blocks[positions].astype(np.int64)
        keys, shared = np.unique(pairs, return_counts=True)
        return keys >> 32, keys & 0xFFFFFFFF, shared


def choose_references(index: SimilarityIndex, chunk, block_size: int, limit: int,
                      allowed: np.ndarray | None = None, old_blocks: int | None = None) -> list[int]:
    """Old block numbers (sorted, at most `limit`) to compress the chunk (new blocks'
    contents, bytes-like) against: for each new block the old block sharing most of
    its features, with the blocks either side of it (a shifted file straddles two),
    among the blocks `allowed` (a bool per old block) says may be referenced (all
    `old_blocks` if None). When there are more than `limit`, the most voted for are
    kept."""
    feats, owners = features(chunk, block_size)
    owner, old, shared = index.votes(feats, owners)
    if allowed is not None:
        ok = allowed[old]
        owner, old, shared = owner[ok], old[ok], shared[ok]
        old_blocks = len(allowed)
    if not len(owner):
        return []
    # per new block (owner), its best old block: sort by owner, then shared descending
    order = np.lexsort((-shared, owner))
    owner, old, shared = owner[order], old[order], shared[order]
    first = np.concatenate(([True], owner[1:] != owner[:-1]))
    best, weight = old[first], shared[first]
    candidates = np.concatenate((best - 1, best, best + 1))
    weights = np.concatenate((weight, weight * 2, weight))
    ok = (candidates >= 0) & (candidates < old_blocks)
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
