"""Diff format version 1: chunks compressed against similar blocks of OLD. `--format v0`
keeps writing the dm-update format byte for byte; v1 reads back as NEW given OLD, is
smaller when NEW's data moved, and is served without merging from the device alone
(merging it: test_merge_v1.py)."""

from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest
import xxhash
import zstandard

from fusesnap.diffing import THOROUGH_LEVEL, build_diff, old_reader
from fusesnap.formats.update_diff import (VERSION, VERSION_REFERENCING, ChunkError, DiffFile,
                                          DiffFormatError)
from harness import fusesnap
from test_update_format import compressible, make_pair, write

BS = 4096


def test_format_v0_is_byte_for_byte_what_it_was(tmp_path):
    """Digests of diffs made before v1 existed (libzstd 1.5.7, whose output they pin)."""
    if zstandard.ZSTD_VERSION != (1, 5, 7):
        pytest.skip(f"digests pinned with libzstd 1.5.7, this is {zstandard.ZSTD_VERSION}")
    rng = random.Random(12)
    old, new = make_pair(rng, 300, sorted(rng.sample(range(300), 140)))
    o, n, d = write(tmp_path / "o", old), write(tmp_path / "n", new), tmp_path / "x.diff"
    expected = [({}, "a66169c2844abf68159ad7f061df532c589804b0b1c9d42d9bae012650cd8e58"),
                ({"compression": "none", "chunk_blocks": 7},
                 "6703aad055cd266d4951508fde66a16dc20974188d459653543684a8882cbef1"),
                ({"level": 19, "block_size": 1024},
                 "86561c8136dd353ec6cf7c0ee979063d8e7a30f2da80be87f29723c2dbcb734f")]
    for options, digest in expected:
        build_diff(o, n, d, threads=2, diff_format="v0", **options)
        assert hashlib.sha256(d.read_bytes()).hexdigest() == digest, options


def upgraded_in_place(rng: random.Random, n_blocks: int = 512) -> tuple[bytes, bytes]:
    """OLD holds 'files'; NEW has each of a few files replaced by a new version of
    another (a shifted copy with small edits) written over it, as an in-place upgrade
    reuses freed blocks: the similar old data sits in blocks NEW changes."""
    old = bytearray(compressible(rng, n_blocks * BS))
    for start in range(0, len(old), 64 * BS):   # files of unrelated random-ish data
        old[start:start + 32 * BS] = rng.randbytes(32 * BS)
    new = bytearray(old)
    for file in range(0, n_blocks // 64):
        src = ((file + 1) % (n_blocks // 64)) * 64 * BS
        version2 = bytearray(old[src:src + 32 * BS])[100:] + rng.randbytes(100)
        for _ in range(20):
            at = rng.randrange(len(version2) - 8)
            version2[at:at + 8] = rng.randbytes(8)
        new[file * 64 * BS:file * 64 * BS + 32 * BS] = version2
    return bytes(old), bytes(new)


def read_back(diff_path, old_path, new: bytes) -> None:
    with DiffFile.open(diff_path) as d, open(old_path, "rb") as old_file:
        read_old = old_reader(old_file.fileno(), d.block_size)
        for c in range(d.n_chunks):
            data = d.decompress_chunk(c, d.read_chunk_raw(c), read_old)
            for dest, n, offset in d.chunk_runs(c):
                assert data[offset * BS:(offset + n) * BS] == new[dest * BS:(dest + n) * BS]


@pytest.mark.parametrize("level", [None, THOROUGH_LEVEL], ids=["default", "thorough"])
def test_v1_reads_back_as_new_and_is_smaller_when_data_moved(tmp_path, level):
    old, new = upgraded_in_place(random.Random(3))
    o, n = write(tmp_path / "old", old), write(tmp_path / "new", new)
    v0 = build_diff(o, n, tmp_path / "v0.diff", threads=2, diff_format="v0", level=level)
    v1 = build_diff(o, n, tmp_path / "v1.diff", threads=2, diff_format="v1", level=level)
    assert v1.changed_blocks == v0.changed_blocks
    assert v1.diff_size < 0.3 * v0.diff_size, (v1.diff_size, v0.diff_size)
    read_back(tmp_path / "v1.diff", o, new)
    with DiffFile.open(tmp_path / "v1.diff") as d:
        assert d.version == VERSION_REFERENCING
        assert d.identification.old_size == len(old)
        assert any(d.references(c, d.read_chunk_raw(c))[0] for c in range(d.n_chunks))


def test_v1_roundtrips_random_pairs_with_odd_geometry(tmp_path):
    rng = random.Random(5)
    for n_blocks, chunk_blocks, shrink in ((40, 3, 0), (100, 7, 9), (64, 128, 1)):
        old, new = make_pair(rng, n_blocks, sorted(rng.sample(range(n_blocks - shrink), n_blocks // 3)),
                             new_blocks=n_blocks - shrink)
        o, n = write(tmp_path / "old", old), write(tmp_path / "new", new)
        build_diff(o, n, tmp_path / "v1.diff", threads=2, chunk_blocks=chunk_blocks,
                   diff_format="v1")
        read_back(tmp_path / "v1.diff", o, new)


def test_a_chunk_is_read_only_with_the_old_data_it_references(tmp_path):
    old, new = upgraded_in_place(random.Random(4))
    o, n = write(tmp_path / "old", old), write(tmp_path / "new", new)
    build_diff(o, n, tmp_path / "v1.diff", threads=2, diff_format="v1")
    with DiffFile.open(tmp_path / "v1.diff") as d:
        c = next(c for c in range(d.n_chunks) if d.references(c, d.read_chunk_raw(c))[0])
        raw = d.read_chunk_raw(c)
        with pytest.raises(ChunkError, match="needs the old image"):
            d.decompress_chunk(c, raw)
        (first, count), *_ = d.references(c, raw)[0]
        damaged = bytearray(old)
        damaged[first * BS] ^= 1
        write(tmp_path / "damaged", bytes(damaged))
        with open(tmp_path / "damaged", "rb") as f, \
                pytest.raises(ChunkError, match="do not hold OLD's contents"):
            d.decompress_chunk(c, raw, old_reader(f.fileno(), BS))


def test_v1_without_its_identification_is_a_bad_diff(tmp_path):
    old, new = make_pair(random.Random(6), 32, [1, 2, 30])
    o, n = write(tmp_path / "old", old), write(tmp_path / "new", new)
    build_diff(o, n, tmp_path / "v1.diff", threads=2, diff_format="v1")
    with DiffFile.open(tmp_path / "v1.diff") as d:
        end = d.superblock.dir_offset + d.superblock.dir_compressed_size
    raw = (tmp_path / "v1.diff").read_bytes()
    write(tmp_path / "bare.diff", raw[:end])
    with pytest.raises(DiffFormatError, match="needs its identification trailer"):
        DiffFile.open(tmp_path / "bare.diff")


# ---- the identification trailer of a v1 diff ----------------------------------------------

def old_blocks_of_chunk(d: DiffFile, old: bytes, chunk_index: int) -> list[bytes]:
    first, end = d.entry_range_of_chunk(chunk_index)
    return [old[d.entry(i)[0] * BS:(d.entry(i)[0] + 1) * BS] for i in range(first, end)]


def test_v1_hashes_old_once_per_chunk_in_trailer_version_3(tmp_path):
    """After the directory: the 96-byte header, then per chunk the hash of its new
    contents, of its references, and of its blocks' old contents; no per-block hash."""
    old, new = upgraded_in_place(random.Random(8), 256)
    o, n = write(tmp_path / "old", old), write(tmp_path / "new", new)
    build_diff(o, n, tmp_path / "v1.diff", threads=2, chunk_blocks=16, diff_format="v1")
    raw = (tmp_path / "v1.diff").read_bytes()
    with DiffFile.open(tmp_path / "v1.diff") as d:
        at = d.superblock.dir_offset + d.superblock.dir_compressed_size
        assert d.n_chunks > 2
        assert len(raw) == at + 96 + 3 * 16 * d.n_chunks
        magic, version, header_size, *_, block_hash_size, chunk_hash_size = struct.unpack_from(
            "<8sIIQQQQII", raw, at)
        assert (magic, version, header_size, block_hash_size, chunk_hash_size) == (
            b"fsnapid\0", 3, 96, 0, 16)
        checksum = raw[at + 64:at + 96]
        assert hashlib.sha256(raw[at:at + 64] + bytes(32) + raw[at + 96:]).digest() == checksum
        old_chunk_hashes = raw[at + 96 + 32 * d.n_chunks:]
        for c in range(d.n_chunks):
            assert old_chunk_hashes[c * 16:(c + 1) * 16] == xxhash.xxh3_128_digest(
                b"".join(old_blocks_of_chunk(d, old, c)))
            assert d.identification.old_chunk_hash(c) == old_chunk_hashes[c * 16:(c + 1) * 16]
    damaged = bytearray(raw)
    damaged[-1] ^= 1
    write(tmp_path / "damaged.diff", bytes(damaged))
    with pytest.raises(DiffFormatError, match="identification trailer.*checksum"):
        DiffFile.open(tmp_path / "damaged.diff")
    write(tmp_path / "short.diff", raw[:-1])
    with pytest.raises(DiffFormatError, match="identification trailer.*truncated"):
        DiffFile.open(tmp_path / "short.diff")


def with_trailer_version_2(diff_path, old: bytes, out_path):
    """The diff as fusesnap wrote v1 diffs before trailer version 3, written from that
    format's description: a header of version 2 with 8-byte block hashes, the chunk
    and reference hashes, then the XXH3-64 of every changed block's old contents."""
    raw = open(diff_path, "rb").read()
    with DiffFile.open(diff_path) as d:
        at = d.superblock.dir_offset + d.superblock.dir_compressed_size
        ident = d.identification
        block_hashes = b"".join(xxhash.xxh3_64_digest(block) for c in range(d.n_chunks)
                                for block in old_blocks_of_chunk(d, old, c))
        chunk_and_reference = ident.chunk_hashes + ident.reference_hashes
        n_blocks, n_chunks = d.total_blocks, d.n_chunks

    def header(checksum):
        return struct.pack("<8sIIQQQQII8x32s", b"fsnapid\0", 2, 96, ident.old_size,
                           ident.new_size, n_blocks, n_chunks, 8, 16, checksum)
    checksum = hashlib.sha256(header(bytes(32)) + chunk_and_reference).digest()
    return write(out_path, raw[:at] + header(checksum) + chunk_and_reference + block_hashes)


def test_v1_with_a_version_2_trailer_is_still_read(tmp_path):
    old, new = upgraded_in_place(random.Random(9), 256)
    o, n = write(tmp_path / "old", old), write(tmp_path / "new", new)
    build_diff(o, n, tmp_path / "v1.diff", threads=2, chunk_blocks=16, diff_format="v1")
    v2 = with_trailer_version_2(tmp_path / "v1.diff", old, tmp_path / "v2-trailer.diff")
    read_back(v2, o, new)
    with DiffFile.open(v2) as d, DiffFile.open(tmp_path / "v1.diff") as v3:
        assert (d.identification.version, v3.identification.version) == (2, 3)
        assert d.fingerprint() != v3.fingerprint()   # their merges keep apart
        for c in range(d.n_chunks):
            assert d.old_block_hashes(c) == b"".join(
                map(xxhash.xxh3_64_digest, old_blocks_of_chunk(d, old, c)))


def test_the_command_line_makes_describes_and_verifies_v1(tmp_path):
    """From the directory holding the images, with relative paths, as users call it."""
    old, new = upgraded_in_place(random.Random(7), 128)
    write(tmp_path / "old.img", old)
    write(tmp_path / "new.img", new)
    fusesnap("diff", "old.img", "new.img", "-o", "u.diff", cwd=tmp_path)   # v1 by default
    info = fusesnap("diff-info", "u.diff", cwd=tmp_path).stdout
    assert "fusesnap version 1" in info and "(identification trailer version 3)" in info
    refused = fusesnap("diff-info", "--verify", "u.diff", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "needs --old OLD" in refused.stderr
    assert "verify:        ok" in fusesnap("diff-info", "--verify", "--old", "old.img", "u.diff",
                                            cwd=tmp_path).stdout
    for options in (["--format", "v0"], ["--algorithm", "none"]):
        fusesnap("diff", *options, "old.img", "new.img", "-o", "v0.diff", cwd=tmp_path)
        with DiffFile.open(tmp_path / "v0.diff") as d:
            assert d.version == VERSION, options


def test_v1_needs_zstd(tmp_path):
    old, new = make_pair(random.Random(8), 8, [1])
    o, n = write(tmp_path / "old", old), write(tmp_path / "new", new)
    result = fusesnap("diff", "--format", "v1", "-a", "none", o, n, "-o", tmp_path / "x",
                      check=False)
    assert result.returncode == 2 and "zstd only" in result.stderr
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.mount
def test_system_img_serves_a_v1_diff_without_merging(tmp_path, mount, loop):
    old, new = upgraded_in_place(random.Random(9), 1024)
    device = write(tmp_path / "device.img", old)
    write(tmp_path / "new.img", new)
    build_diff(device, tmp_path / "new.img", tmp_path / "v1.diff", threads=2, diff_format="v1")
    m = mount("--state-dir", tmp_path / "state", "--system", device, "--diff",
              tmp_path / "v1.diff", "--no-bg-update")
    blocks = len(new) // BS
    with open(loop(m / "system.img", read_only=True), "rb", buffering=0) as dev:
        for block in random.Random(10).sample(range(blocks), 200):   # cold chunks, one by one
            dev.seek(block * BS)
            assert dev.read(BS) == new[block * BS:(block + 1) * BS], block
        dev.seek(0)
        assert dev.read(len(new)) == new
    assert open(device, "rb").read() == old   # nothing merged
    assert not (tmp_path / "state").exists(), "no scratch copy without a merge"
