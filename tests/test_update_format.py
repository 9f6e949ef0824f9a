"""The dm-update diff format: round trips through build_diff and DiffFile, and a corpus
of corrupted diffs that must all be rejected with DiffFormatError."""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import struct
import tempfile

import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusesnap import diffing
from fusesnap.diffing import build_diff
from fusesnap.errors import EXIT_FAILED, UserError
from fusesnap.formats.update_diff import (
    ENTRY_SIZE, MAGIC, SUPERBLOCK_SIZE, ChunkError, DiffChangedError, DiffFile,
    DiffFormatError, Superblock, pack_directory, pack_entry, unpack_entry)

BS = 4096


# ---- helpers ---------------------------------------------------------------------------

def compressible(rng: random.Random, n: int) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"\x00\x01\x02", b"block", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) if rng.random() < 0.8 else rng.randbytes(8)
    return bytes(out[:n])


def make_pair(rng: random.Random, n_blocks: int, changed: list[int], bs: int = BS,
              new_blocks: int | None = None) -> tuple[bytes, bytes]:
    old = compressible(rng, n_blocks * bs)
    new = bytearray(old[:(new_blocks if new_blocks is not None else n_blocks) * bs])
    for b in changed:
        new[b * bs:(b + 1) * bs] = compressible(rng, bs)
        new[b * bs] = old[b * bs] ^ 0xFF
    return old, bytes(new)


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def reconstruct(diff_path: str, old: bytes, new_size: int) -> bytes:
    """Apply the diff to OLD block by block, the way an overlay reads it."""
    out = bytearray(old)
    with DiffFile.open(diff_path) as d:
        bs = d.block_size
        cache = {}
        for dest, n, chunk, off in d.runs():
            if chunk not in cache:
                cache[chunk] = d.decompress_chunk(chunk, d.read_chunk_raw(chunk))
            out[dest * bs:(dest + n) * bs] = cache[chunk][off * bs:(off + n) * bs]
            for i in range(n):
                assert d.lookup(dest + i) == (chunk, off + i)
        d.verify()
    assert bytes(out[new_size:]) == old[new_size:]
    return bytes(out[:new_size])


def roundtrip(tmp_path, old: bytes, new: bytes, **kw) -> DiffFile:
    o, n, d = write(tmp_path / "old", old), write(tmp_path / "new", new), str(tmp_path / "d")
    stats = build_diff(o, n, d, threads=2, **kw)
    assert reconstruct(d, old, len(new)) == new
    assert stats.diff_size == os.path.getsize(d)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    return DiffFile.open(d)


# ---- round trips -----------------------------------------------------------------------

def test_roundtrip_some_blocks(tmp_path):
    rng = random.Random(1)
    changed = [0, 1, 2, 5, 9, 10, 40, 63]
    old, new = make_pair(rng, 64, changed)
    with roundtrip(tmp_path, old, new, chunk_blocks=3) as d:
        assert d.total_blocks == len(changed)
        assert d.n_chunks == 3
        assert d.superblock.dir_n == len(changed) + 1
        assert [d.entry(i)[0] for i in range(d.total_blocks)] == changed
        assert list(d.runs()) == [(0, 3, 0, 0), (5, 1, 1, 0), (9, 2, 1, 1), (40, 1, 2, 0),
                                  (63, 1, 2, 1)]
        assert d.entry_range_of_chunk(1) == (3, 6)
        assert d.lookup(3) is None
        assert d.sentinel_dest == 64
        start, length = d.chunk_extent(0)
        assert start == SUPERBLOCK_SIZE and length > 0


def test_identical_images_give_empty_diff(tmp_path):
    old, _ = make_pair(random.Random(2), 16, [])
    with roundtrip(tmp_path, old, old) as d:
        assert d.superblock.dir_n == 1
        assert d.total_blocks == 0 and d.n_chunks == 0
        assert list(d.runs()) == []


def test_every_block_changed(tmp_path):
    old, new = make_pair(random.Random(3), 50, list(range(50)))
    with roundtrip(tmp_path, old, new, chunk_blocks=8) as d:
        assert d.total_blocks == 50 and d.n_chunks == 7
        assert list(d.runs())[0] == (0, 8, 0, 0)


def test_new_smaller_than_old_leaves_the_tail(tmp_path):
    old, new = make_pair(random.Random(4), 32, [1, 20], new_blocks=24)
    with roundtrip(tmp_path, old, new) as d:
        assert d.total_blocks == 2
        d.check_device(len(old), 512)


@pytest.mark.parametrize("bs", [512, 65536])
def test_block_sizes(tmp_path, bs):
    old, new = make_pair(random.Random(bs), 12, [0, 3, 4, 11], bs=bs)
    with roundtrip(tmp_path, old, new, block_size=bs, chunk_blocks=2) as d:
        assert d.block_size == bs and d.block_bits == bs.bit_length() - 1


def test_compression_none(tmp_path):
    old, new = make_pair(random.Random(5), 20, [2, 3, 7, 19])
    with roundtrip(tmp_path, old, new, compression="none", chunk_blocks=3) as d:
        assert d.compression == "none"
        assert d.chunk_extent(0)[1] == 3 * BS


def test_zstd_frames_have_checksum_and_size(tmp_path):
    old, new = make_pair(random.Random(6), 8, [1, 2])
    with roundtrip(tmp_path, old, new) as d:
        params = zstandard.get_frame_parameters(d.read_chunk_raw(0))
        assert params.has_checksum and params.content_size == 2 * BS


def test_superblock_pack_unpack():
    sb = Superblock(block_bits=12, chunk_blocks=64, compression="zstd", dir_offset=100,
                    dir_compressed_size=20, dir_n=3)
    raw = sb.pack()
    assert len(raw) == 64 and raw[:8] == MAGIC and raw[16:32] == b"zstd" + bytes(12)
    assert Superblock.unpack(raw) == sb
    sb.validate()


def test_entry_pack_unpack_48_bit():
    raw = pack_entry((1 << 47) + 5, (1 << 40) + 7, 3)
    assert len(raw) == ENTRY_SIZE and unpack_entry(raw) == ((1 << 47) + 5, (1 << 40) + 7, 3)
    assert raw == struct.pack("<IHHII", 5, 1 << 15, 1 << 8, 7, 3)
    d = pack_directory([1, (1 << 33) + 2], [64, (1 << 34) + 9], [0, 1])
    assert unpack_entry(d, 1) == ((1 << 33) + 2, (1 << 34) + 9, 1)


def test_check_device(tmp_path):
    old, new = make_pair(random.Random(7), 16, [15])
    with roundtrip(tmp_path, old, new) as d:
        d.check_device(16 * BS, 4096)
        with pytest.raises(DiffFormatError, match="logical block size"):
            d.check_device(16 * BS, 8192)


def test_a_device_smaller_than_new_does_not_fit_even_if_the_changes_do(tmp_path):
    old, new = make_pair(random.Random(7), 16, [1])
    with roundtrip(tmp_path, old, new) as d:
        assert d.new_size == 16 * BS
        with pytest.raises(DiffFormatError, match=r"smaller than the image the diff makes "
                                                  r"\(65536 bytes\)"):
            d.check_device(8 * BS, 512)


def test_without_identification_only_the_changed_blocks_must_fit(tmp_path):
    old, new = make_pair(random.Random(7), 16, [15])
    with roundtrip(tmp_path, old, new) as d:
        unidentified = strip_identification(tmp_path, d)
    with DiffFile.open(unidentified) as d:
        assert d.identification is None and d.new_size is None
        d.check_device(16 * BS, 512)
        with pytest.raises(DiffFormatError, match="beyond the end of the device"):
            d.check_device(16 * BS - 1, 512)


# ---- identification ----------------------------------------------------------------------

def strip_identification(tmp_path, d: DiffFile) -> str:
    """A copy of the diff without its identification trailer, as another tool makes it."""
    sb = d.superblock
    with open(d.path, "rb") as f:
        return write(tmp_path / "unidentified", f.read(sb.dir_offset + sb.dir_compressed_size))


def test_the_diff_identifies_old_and_new(tmp_path):
    old, new = make_pair(random.Random(11), 40, [0, 1, 2, 9, 20, 21, 37], new_blocks=38)
    with roundtrip(tmp_path, old, new, chunk_blocks=3) as d:
        ident = d.identification
        assert (ident.old_size, ident.new_size, ident.n_blocks) == (40 * BS, 38 * BS, 7)
        for c in range(d.n_chunks):
            data = d.decompress_chunk(c, d.read_chunk_raw(c))
            assert ident.chunk_hash(c) == xxhash.xxh3_128_digest(data)
            first, end = d.entry_range_of_chunk(c)
            dests = [d.entry(i)[0] for i in range(first, end)]
            assert d.old_block_hashes(c) == b"".join(
                xxhash.xxh3_64_digest(old[b * BS:(b + 1) * BS]) for b in dests)


def test_the_trailer_leaves_the_v0_diff_untouched(tmp_path):
    """What the kernel loader reads (superblock, chunks, directory) is the same diff
    with or without the trailer, and the trailer starts right after the directory."""
    old, new = make_pair(random.Random(12), 30, [3, 4, 17, 29])
    with roundtrip(tmp_path, old, new, chunk_blocks=2) as d:
        sb = d.superblock
        dir_end = sb.dir_offset + sb.dir_compressed_size
        raw = open(d.path, "rb").read()
        assert raw[dir_end:dir_end + 8] == b"fsnapid\0"
        assert len(raw) == dir_end + 96 + d.n_chunks * 16 + d.total_blocks * 8
        with DiffFile.open(strip_identification(tmp_path, d)) as bare:
            assert bare.superblock == sb and list(bare.runs()) == list(d.runs())
            bare.verify()


def test_a_damaged_trailer_is_a_bad_diff(tmp_path, good_diff):
    raw = good_diff[0]
    sb = Superblock.unpack(raw)
    at = sb.dir_offset + sb.dir_compressed_size
    expect_bad(tmp_path, poke(raw, at + 96 + 5, b"\xff"), "identification trailer.*checksum")
    expect_bad(tmp_path, poke(raw, at + 16, struct.pack("<Q", 1)), "checksum")
    expect_bad(tmp_path, raw[:at + 3], "identification trailer.*truncated")
    expect_bad(tmp_path, raw[:-1], "identification trailer.*truncated")


def test_a_chunk_that_is_not_the_one_hashed_is_refused(tmp_path):
    """With `-a none` the trailer's chunk hash is the only check of a chunk's contents."""
    old, new = make_pair(random.Random(13), 8, [1, 2, 5])
    with roundtrip(tmp_path, old, new, compression="none", chunk_blocks=2) as d:
        start, length = d.chunk_extent(1)
        path = d.path
    raw = open(path, "rb").read()
    bad = write(tmp_path / "swapped", poke(raw, start, raw[64:64 + length]))
    with DiffFile.open(bad) as d:
        d.decompress_chunk(0, d.read_chunk_raw(0))
        with pytest.raises(ChunkError, match="chunk 1: .*hash"):
            d.decompress_chunk(1, d.read_chunk_raw(1))


def test_a_diff_changed_after_opening_is_refused(tmp_path):
    old, new = make_pair(random.Random(14), 8, [1, 2, 5])
    with roundtrip(tmp_path, old, new, compression="none") as d:
        d.read_chunk_raw(0)
        with open(d.path, "r+b") as f:   # rewritten in place: same inode, same size
            f.seek(70)
            f.write(b"x")
        with pytest.raises(DiffChangedError, match="changed while in use"):
            d.read_chunk_raw(0)


def test_the_fingerprint_names_the_contents(tmp_path):
    old, new = make_pair(random.Random(15), 8, [1, 2, 5])
    with roundtrip(tmp_path, old, new, compression="none") as d:
        fingerprint = d.fingerprint()
        unidentified = strip_identification(tmp_path, d)
        copy = write(tmp_path / "copy", open(d.path, "rb").read())
    with DiffFile.open(copy) as d:
        assert d.fingerprint() == fingerprint   # a copy is the same diff
    raw = open(unidentified, "rb").read()
    with DiffFile.open(unidentified) as d:
        start, _ = d.chunk_extent(0)
        bare_fingerprint = d.fingerprint()
    with DiffFile.open(write(tmp_path / "other", poke(raw, start, b"\x01"))) as d:
        assert d.fingerprint() != bare_fingerprint   # chunks count, even without a trailer


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_blocks=st.integers(0, 24), shrink=st.integers(0, 4),
       chunk_blocks=st.integers(1, 5), compression=st.sampled_from(["zstd", "none"]))
def test_random_pairs_roundtrip(data, n_blocks, shrink, chunk_blocks, compression):
    bs = 512
    old = data.draw(st.binary(min_size=n_blocks * bs, max_size=n_blocks * bs), label="old")
    new = bytearray(old[:max(0, n_blocks - shrink) * bs])
    changed = data.draw(st.sets(st.integers(0, max(0, len(new) // bs - 1))), label="changed")
    for b in changed:
        if b * bs < len(new):
            new[b * bs + data.draw(st.integers(0, bs - 1))] ^= data.draw(st.integers(1, 255))
    with tempfile.TemporaryDirectory() as tmp:
        o, n, d = write(f"{tmp}/old", old), write(f"{tmp}/new", bytes(new)), f"{tmp}/d"
        build_diff(o, n, d, block_size=bs, chunk_blocks=chunk_blocks, compression=compression,
                   threads=2)
        assert reconstruct(d, old, len(new)) == bytes(new)


# ---- build_diff errors -----------------------------------------------------------------

def test_new_larger_than_old(tmp_path):
    o, n = write(tmp_path / "o", bytes(BS)), write(tmp_path / "n", bytes(2 * BS))
    with pytest.raises(UserError, match=r"NEW \(8192 bytes\) is larger than OLD \(4096 bytes\)"):
        build_diff(o, n, tmp_path / "d")
    assert os.listdir(tmp_path) == ["o", "n"] or sorted(os.listdir(tmp_path)) == ["n", "o"]


def test_new_not_multiple_of_block_size(tmp_path):
    o, n = write(tmp_path / "o", bytes(2 * BS)), write(tmp_path / "n", bytes(BS + 1))
    with pytest.raises(UserError, match="not a multiple of the block size"):
        build_diff(o, n, tmp_path / "d")


def test_missing_file(tmp_path):
    o = write(tmp_path / "o", bytes(BS))
    with pytest.raises(UserError, match="cannot open NEW"):
        build_diff(o, tmp_path / "nope", tmp_path / "d")


def test_interrupted_run_leaves_nothing(tmp_path):
    old, new = make_pair(random.Random(8), 8, [1, 2, 3])
    o, n = write(tmp_path / "o", old), write(tmp_path / "n", new)
    write(tmp_path / "d", b"previous diff")

    def progress(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_diff(o, n, tmp_path / "d", progress=progress)
    assert sorted(os.listdir(tmp_path)) == ["d", "n", "o"]
    assert (tmp_path / "d").read_bytes() == b"previous diff"


# ---- corrupted diffs -------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_diff(tmp_path_factory) -> tuple[bytes, bytes]:
    """A valid diff (chunk_blocks 4, 3 chunks) and its OLD."""
    tmp = tmp_path_factory.mktemp("good")
    old, new = make_pair(random.Random(9), 40, [0, 1, 2, 3, 4, 7, 8, 20, 21, 22, 30, 39])
    build_diff(write(tmp / "o", old), write(tmp / "n", new), tmp / "d", chunk_blocks=4)
    return (tmp / "d").read_bytes(), old


def parse(raw: bytes) -> tuple[Superblock, list[list[int]]]:
    sb = Superblock.unpack(raw)
    d = zstandard.ZstdDecompressor().decompress(
        raw[sb.dir_offset:sb.dir_offset + sb.dir_compressed_size])
    return sb, [list(unpack_entry(d, i)) for i in range(sb.dir_n)]


def with_directory(raw: bytes, entries, dir_n=None, compress=True) -> bytes:
    """Replace the directory (kept at the same offset) and fix up the superblock."""
    sb = Superblock.unpack(raw)
    d = b"".join(pack_entry(*e) for e in entries)
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(d) if compress else d
    sb = dataclasses.replace(sb, dir_compressed_size=len(blob),
                             dir_n=len(entries) if dir_n is None else dir_n)
    return sb.pack() + raw[SUPERBLOCK_SIZE:sb.dir_offset] + blob


def with_sb(raw: bytes, **fields) -> bytes:
    return dataclasses.replace(Superblock.unpack(raw), **fields).pack() + raw[SUPERBLOCK_SIZE:]


def poke(raw: bytes, offset: int, data: bytes) -> bytes:
    return raw[:offset] + data + raw[offset + len(data):]


_names = iter(range(1 << 30))


def expect_bad(tmp_path, raw: bytes, match: str | None = None) -> None:
    # a fresh name each time: rewriting a file in place makes ext4 flush it (auto_da_alloc)
    path = write(tmp_path / f"bad{next(_names)}", raw)
    with pytest.raises(DiffFormatError, match=match) as info:
        with DiffFile.open(path) as d:
            d.verify()
    msg = str(info.value)
    assert msg.startswith("bad diff: ") and "\n" not in msg


def edit_entries(raw: bytes, fn) -> bytes:
    _, entries = parse(raw)
    fn(entries)
    return with_directory(raw, entries)


HEADER_CASES = {
    "magic": (lambda r: poke(r, 0, b"updatf\0\0"), "magic"),
    "version": (lambda r: with_sb(r, version=2), r"version: must be 0 \(or 1, fusesnap's\), got 2"),
    "version 1 with a version 0 trailer": (lambda r: with_sb(r, version=1),
                                           "expected 3 or 2 for a version 1 diff"),
    "block_bits small": (lambda r: with_sb(r, block_bits=8), "block_bits"),
    "block_bits large": (lambda r: with_sb(r, block_bits=32), "block_bits"),
    "chunk_blocks 0": (lambda r: with_sb(r, chunk_blocks=0), "chunk_blocks: must be > 0"),
    "chunk_blocks large": (lambda r: with_sb(r, chunk_blocks=1 << 19), "2\\^31"),
    "compression unknown": (lambda r: with_sb(r, compression="lz4"), "compression"),
    "compression no NUL": (lambda r: poke(r, 16, b"z" * 16), "NUL-terminated"),
    "compression garbage": (lambda r: poke(r, 16, b"zstd\0x"), "after the NUL"),
    "pad1": (lambda r: poke(r, 10, b"\1\0"), "pad1"),
    "pad2": (lambda r: poke(r, 56, b"\1"), "pad2"),
    "dir_n 0": (lambda r: with_sb(r, dir_n=0), "dir_n: must be >= 1, got 0"),
    "dir_n +1": (lambda r: with_sb(r, dir_n=Superblock.unpack(r).dir_n + 1), "directory"),
    "dir_n -1": (lambda r: with_sb(r, dir_n=Superblock.unpack(r).dir_n - 1), "directory"),
    "dir_n huge": (lambda r: with_sb(r, dir_n=1 << 60), "directory"),
    "dir_offset beyond": (lambda r: with_sb(r, dir_offset=len(r)), "directory must lie inside"),
    "dir_offset in sb": (lambda r: with_sb(r, dir_offset=10), "dir_offset"),
    "dir_offset shifted": (lambda r: with_sb(r, dir_offset=Superblock.unpack(r).dir_offset - 1),
                           None),
    "dir size beyond": (lambda r: with_sb(r, dir_compressed_size=len(r)), "inside"),
    "dir size 0": (lambda r: with_sb(r, dir_compressed_size=0), "dir_compressed_size"),
    "dir size short": (lambda r: with_sb(r, dir_compressed_size=Superblock.unpack(r)
                                         .dir_compressed_size - 1), "directory"),
    "dir trailing byte": (lambda r: with_sb(r, dir_compressed_size=Superblock.unpack(r)
                                            .dir_compressed_size + 1) + b"\0", "trailing"),
    "dir garbage": (lambda r: r[:Superblock.unpack(r).dir_offset + 8] + b"\xAA" * 8
                    + r[Superblock.unpack(r).dir_offset + 16:], "directory"),
    "empty file": (lambda r: b"", "shorter than the 64-byte superblock"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_header(tmp_path, good_diff, case):
    fn, match = HEADER_CASES[case]
    expect_bad(tmp_path, fn(good_diff[0]), match)


def test_good_diff_is_good(tmp_path, good_diff):
    with DiffFile.open(write(tmp_path / "d", good_diff[0])) as d:
        d.verify()
        assert d.n_chunks == 3


def test_truncation_anywhere(tmp_path, good_diff):
    """Any cut is a bad diff, except right after the directory: that is a diff without
    an identification trailer, as other tools make them."""
    raw = good_diff[0]
    sb = Superblock.unpack(raw)
    dir_end = sb.dir_offset + sb.dir_compressed_size
    for cut in sorted(set(range(0, 70)) | set(range(70, len(raw), 7)) | {len(raw) - 1}):
        if cut != dir_end:
            expect_bad(tmp_path, raw[:cut])
    with DiffFile.open(write(tmp_path / "bare", raw[:dir_end])) as d:
        assert d.identification is None
        d.verify()


def _swap(e):
    e[1], e[2] = e[2], e[1]


def _dup(e):
    e[5][0] = e[4][0]


def _offset(e):
    e[3][2] = 4


def _noncontiguous(e):
    # chunks: entries 0-3, 4-7, 8-11: move entry 8 (chunk 2) into chunk 0's src
    e[8][1] = e[0][1]
    e[8][2] = 3


def _sentinel_dest(e):
    e[-1][0] = e[-2][0]


def _sentinel_src_small(e):
    e[-1][1] = e[-2][1]


def _sentinel_src_beyond(e):
    e[-1][1] = 10 ** 9


def _src_in_superblock(e):
    for x in e[:4]:
        x[1] = 10


def _srcs_decrease(e):
    for x in e[4:8]:
        x[1] = e[0][1] - 1


def _chunks_overlap_directory(e):
    e[-1][1] += 100


DIRECTORY_CASES = {
    "swapped entries": (_swap, "dests must strictly increase"),
    "duplicated dest": (_dup, "dests must strictly increase"),
    "offset >= chunk_blocks": (_offset, "offset must be < chunk_blocks"),
    "non-contiguous chunk": (_noncontiguous, "must be contiguous"),
    "sentinel dest": (_sentinel_dest, "sentinel: dest"),
    "sentinel src small": (_sentinel_src_small, "sentinel: src"),
    "sentinel src beyond file": (_sentinel_src_beyond, "sentinel: src"),
    "src in superblock": (_src_in_superblock, "superblock"),
    "srcs decrease": (_srcs_decrease, "must increase"),
    "chunks overlap directory": (_chunks_overlap_directory, None),
}


@pytest.mark.parametrize("case", list(DIRECTORY_CASES))
def test_bad_directory(tmp_path, good_diff, case):
    fn, match = DIRECTORY_CASES[case]
    expect_bad(tmp_path, edit_entries(good_diff[0], fn), match)


def test_directory_compression_none_size_mismatch(tmp_path, good_diff):
    _, entries = parse(good_diff[0])
    raw = with_directory(good_diff[0], entries, compress=False)
    expect_bad(tmp_path, raw, "directory: not a zstd frame")   # zstd diff, raw directory


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_garbage_in_chunk(tmp_path, good_diff, where):
    raw = good_diff[0]
    path = write(tmp_path / "d", raw)
    with DiffFile.open(path) as d:
        start, length = d.chunk_extent(1)
    pos = {"start": start, "middle": start + length // 2, "end": start + length - 3}[where]
    bad = poke(raw, pos, bytes(b ^ 0x55 for b in raw[pos:pos + 3]))
    path = write(tmp_path / "bad", bad)
    with DiffFile.open(path) as d:
        d.decompress_chunk(0, d.read_chunk_raw(0))
        with pytest.raises(ChunkError, match="chunk 1") as info:
            d.decompress_chunk(1, d.read_chunk_raw(1))
        assert info.value.chunk_index == 1
        with pytest.raises(DiffFormatError):
            d.verify()


# Diffs assembled by hand, for chunk contents the builder never writes.

def assemble(chunks: list[bytes], entries: list[tuple[int, int, int]], *, chunk_blocks=4,
             compression="zstd", block_bits=9) -> bytes:
    """entries: (dest, chunk_index, offset); sentinel dest is last dest + 1."""
    srcs, pos = [], SUPERBLOCK_SIZE
    for c in chunks:
        srcs.append(pos)
        pos += len(c)
    dests = [e[0] for e in entries] + [(entries[-1][0] + 1) if entries else 0]
    d = pack_directory(dests, [srcs[e[1]] for e in entries] + [pos],
                       [e[2] for e in entries] + [0])
    blob = zstandard.ZstdCompressor().compress(d) if compression == "zstd" else d
    sb = Superblock(block_bits=block_bits, chunk_blocks=chunk_blocks, compression=compression,
                    dir_offset=pos, dir_compressed_size=len(blob), dir_n=len(dests))
    return sb.pack() + b"".join(chunks) + blob


def frame(data: bytes, **kw) -> bytes:
    return zstandard.ZstdCompressor(**kw).compress(data)


def test_assembled_good(tmp_path):
    raw = assemble([frame(b"a" * 1024), frame(b"b" * 512, write_content_size=False)],
                   [(3, 0, 0), (4, 0, 1), (9, 1, 0)])
    with DiffFile.open(write(tmp_path / "d", raw)) as d:
        d.verify()
        assert list(d.runs()) == [(3, 2, 0, 0), (9, 1, 1, 0)]


CHUNK_CASES = {
    "too large": ([frame(b"a" * 2560)], "more than the 2048"),
    "too large, size unknown": ([frame(b"a" * 2560, write_content_size=False)], "more than"),
    "not a block multiple": ([frame(b"a" * 700)], "multiple of the block size"),
    "does not cover offsets": ([frame(b"a" * 512)], "does not cover"),
    "trailing bytes": ([frame(b"a" * 1024) + b"\0\0"], "trailing"),
    "two frames": ([frame(b"a" * 512) + frame(b"a" * 512)], "trailing"),
    "truncated frame": ([frame(bytes(range(256)) * 4)[:-5]], "chunk 0"),
    "bad checksum": ([poke(frame(b"ab" * 512, write_checksum=True), -2, b"\0\0")], "chunk 0"),
    "not zstd": ([b"\0" * 40], "not a zstd frame"),
}


@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_bad_chunk(tmp_path, case):
    chunks, match = CHUNK_CASES[case]
    raw = assemble(chunks, [(3, 0, 0), (4, 0, 1)])
    with DiffFile.open(write(tmp_path / "d", raw)) as d:
        with pytest.raises(ChunkError, match=match):
            d.decompress_chunk(0, d.read_chunk_raw(0))
    expect_bad(tmp_path, raw, match)


@pytest.mark.parametrize("chunk, match", [(b"a" * 2560, "<= chunk_blocks"),
                                          (b"a" * 700, "multiple"),
                                          (b"a" * 512, "does not cover")])
def test_bad_chunk_compression_none(tmp_path, chunk, match):
    raw = assemble([chunk], [(3, 0, 0), (4, 0, 1)], compression="none")
    expect_bad(tmp_path, raw, match)   # detected at open: sizes are known without decompressing


def test_empty_assembled_diff(tmp_path):
    with DiffFile.open(write(tmp_path / "d", assemble([], []))) as d:
        assert d.total_blocks == 0 and d.superblock.dir_n == 1
        d.verify()


# ---- diff-info --------------------------------------------------------------------------

def run_info(argv) -> int:
    p = argparse.ArgumentParser()
    diffing.add_diff_info_arguments(p)
    return diffing.run_diff_info(p.parse_args(argv))


def test_diff_info(tmp_path, good_diff, capsys):
    path = write(tmp_path / "d", good_diff[0])
    assert run_info([path, "--verify"]) == 0
    assert "verify:        ok" in capsys.readouterr().out
    assert run_info([path, "--json"]) == 0
    assert '"changed_blocks": 12' in capsys.readouterr().out


def test_diff_info_bad(tmp_path, good_diff):
    raw = good_diff[0]
    with DiffFile.open(write(tmp_path / "d", raw)) as d:
        start, _ = d.chunk_extent(2)
    path = write(tmp_path / "bad", poke(raw, start + 5, b"\xFF\xFF\xFF"))
    with pytest.raises(UserError, match="^bad diff: chunk 2") as info:
        run_info([path, "--verify"])
    assert info.value.exit_status == EXIT_FAILED
    with pytest.raises(UserError, match="bad2 is not an update diff") as info:
        run_info([write(tmp_path / "bad2", b"x" * 100)])
    assert info.value.exit_status == EXIT_FAILED
    with pytest.raises(UserError, match="no such diff"):
        run_info([str(tmp_path / "missing")])


def test_output_is_an_input(tmp_path):
    old, new = make_pair(random.Random(10), 4, [1])
    o, n = write(tmp_path / "o", old), write(tmp_path / "n", new)
    with pytest.raises(UserError, match="same file as NEW"):
        build_diff(o, n, n)
    assert (tmp_path / "n").read_bytes() == new


def test_48_bit_dests(tmp_path):
    big = (1 << 40) + 7
    raw = assemble([frame(b"a" * 1024), frame(b"b" * 512)],
                   [(big, 0, 1), (big + 1, 0, 0), (big + 2, 1, 0)])
    with DiffFile.open(write(tmp_path / "d", raw)) as d:
        d.verify()
        assert list(d.runs()) == [(big, 1, 0, 1), (big + 1, 1, 0, 0), (big + 2, 1, 1, 0)]
        assert d.lookup(big + 2) == (1, 0) and d.lookup(big - 1) is None
        assert d.entry(1) == (big + 1, SUPERBLOCK_SIZE, 0)
        with pytest.raises(DiffFormatError, match="beyond the end of the device"):
            d.check_device(1 << 40, 512)
