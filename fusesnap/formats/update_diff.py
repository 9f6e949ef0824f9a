"""The update diff: the on-disk format of the proposed dm-update kernel target, version 0.

See /work/shared/formats.md section 1 for the byte layout. In short: a 64-byte
superblock, compressed chunks of changed blocks, and one compressed directory of
16-byte entries ``(dest, src, offset)`` sorted by dest and ended by a sentinel.

Layout written by ``fusesnap diff`` (the reader accepts any layout the rules allow)::

    [0, 64)                        superblock
    [64, S)                        chunks, one after the other in directory order;
                                   S is the sentinel's src (the end of the last chunk)
    [S, S + dir_compressed_size)   the directory (dir_offset == S); the file ends here

    [D, end of file)               the identification trailer (below), D being
                                   S + dir_compressed_size

The directory goes after the chunks because its size is only known once every chunk
is written. The sentinel's dest is the size of NEW in blocks (greater than every real
dest) and its offset is 0. An empty diff is a superblock followed by a directory
holding only the sentinel (``dir_n == 1``, sentinel src 64).

The identification trailer (a fusesnap extension of version 0) says what the diff
applies to, so a mount can refuse a device that is neither OLD nor partly updated:
OLD's and NEW's sizes, the XXH3-128 of each decompressed chunk (NEW's contents of
the chunk's blocks) and the XXH3-64 of each changed block's OLD contents, in
directory order (digests in xxHash's canonical, big-endian form). Layout
(little-endian)::

    magic "fsnapid\0" | u32 version 1 | u32 header size 96 | u64 old_size |
    u64 new_size | u64 n_blocks | u64 n_chunks | u32 block hash size 8 |
    u32 chunk hash size 16 | 8 bytes zero | 32-byte sha256 of this header (with
    this field zero) followed by the chunk hashes
    n_chunks * 16 bytes   chunk hashes
    n_blocks * 8 bytes    old block hashes

Why a trailer after the directory and not a sidecar file: the dm-update loader reads
only the superblock, the chunks and the directory at the offsets the superblock
gives, so bytes after them are invisible to it (it must ignore them anyway: its diff
usually sits on a partition larger than the diff), and the diff stays one file that
cannot be separated from its identification by a copy. Format version 1 carries an
`Identification` too (trailer versions 2 and 3, below). In trailer version 1 old
blocks get a hash each, not one per chunk, because a crash in the middle of merging a
chunk leaves some of its blocks old and some new, and each must be told apart; 8
bytes keep the trailer at 0.2% of a 4 KiB block and make a chance match 2^-64
(version 3 hashes them per chunk and leaves the per-block hashes to the merge, see
below). New contents need only the chunk hash: a
block that is not old is compared with the decompressed chunk itself. XXH3, not a
cryptographic hash: the hashes guard against accidents (a mistyped device, a diff
rewritten in place), not against someone who can rewrite the diff, hashes included
(that needs a signature). Measured with sha256 instead: `fusesnap diff` took 1.25x
zstd's CPU time instead of 1.05x (every block changed), and the source check of a
1 GiB image with a quarter changed 3 to 6 times as long (page-cached device).

Version 1 (fusesnap's own; written by ``fusesnap diff`` by default, read here given
OLD's blocks; `system.img` serves and merges it, see fusesnap.merge_scratch;
DEVELOPERS.md "Diff format version 1" has the measurements that chose it). A v1 chunk is compressed against data of OLD that
resembles it. It keeps v0's superblock (``version`` 1; ``compression`` must be
"zstd"), directory (same entries, same rules: sorted dests, one contiguous run of
entries per chunk, sentinel) and layout; what changes is what sits at a chunk's
``src`` (little-endian)::

    u32 n_runs                        references: runs of OLD's blocks, in this order
    n_runs * (u64 first, u32 count)   first block and block count of each run
    zstd frame                        the chunk's new blocks, compressed with the
                                      concatenated contents of those OLD blocks as a
                                      raw-content dictionary (no dictionary ID); with
                                      n_runs 0, a plain frame as in v0

A chunk's length is still the next chunk's src minus its src, header included.
Runs are non-empty, ascend without overlapping, lie within OLD (first + count <=
old_size / block size) and hold at most REFERENCE_FACTOR * chunk_blocks blocks in
all. References are OLD's contents wherever they are: blocks the update leaves
unchanged and blocks it changes (after an in-place upgrade the old version of a file
mostly sits where the new one is written).

A v1 diff must carry its identification trailer, in version 3 (what ``fusesnap diff``
writes) or 2 (what it wrote before; still read, served and merged). Both keep version
1's 96-byte header, its fields and its checksum rule (the sha256 covers the header,
checksum field zero, and every chunk-sized hash that follows it, not per-block ones);
they differ in these header fields and in what follows the header:

=======  ===============  ==========================================================
trailer  block hash size  after the header
=======  ===============  ==========================================================
2        8                n_chunks * 16 bytes  chunk hashes
                          n_chunks * 16 bytes  reference hashes
                          n_blocks * 8 bytes   old block hashes (as in version 1)
3        0                n_chunks * 16 bytes  chunk hashes
                          n_chunks * 16 bytes  reference hashes
                          n_chunks * 16 bytes  old chunk hashes; the file ends here
=======  ===============  ==========================================================

- reference hash: XXH3-128 of the chunk's dictionary (the concatenated contents of
  its runs; of empty input for a chunk with no references). It tells a device whose
  referenced blocks are not OLD's from a damaged chunk.
- old chunk hash: XXH3-128 of the OLD contents of the chunk's blocks, concatenated in
  directory order (the order of the chunk's entries, not of their offsets).

A reader takes a version 0 diff with trailer version 1 or none, a version 1 diff with
trailer version 3 or 2; any other version is a bad diff.

Why version 3: the old block hashes (8 bytes per changed block) were 219 KB of the
text pair's 4.35 MB at ``--level 19``, what kept it above 1.1 x ``zstd --patch-from``
(3.84 MB); with them per chunk the trailer is 10 KB and the diff 4.136 MB (1.077 x).
A chunk's blocks are now told old together (the hash of all of them: a chance match
2^-128, against 2^-64 per block). Only a chunk a crash left half merged needs each
block's old hash, and only a merge can have left one, so the merge records them
itself before its first write, from the chunks it has just found wholly old on the
device (fusesnap.old_hashes). Shorter per-block hashes were the other way: at 2
bytes the text pair would come to about 4.19 MB (1.09 x, computed from the measured
parts), and a wrong block in a half-merged chunk would pass with chance 2^-16.

This module is pure format code: packing, unpacking, validation and reading of
chunks. It never decides policy (what to do with a bad diff) and never touches trio.
Every violation raises :class:`DiffFormatError` with a one-line message naming the rule.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import operator
import os
import struct
import sys
import threading
from array import array
from collections.abc import Iterator, Sequence

import xxhash
import zstandard

MAGIC = b"update\0\0"
VERSION = 0                       # the dm-update format
VERSION_REFERENCING = 1           # fusesnap's: chunks may reference OLD (docstring)
VERSIONS = (VERSION, VERSION_REFERENCING)
REFERENCE_FACTOR = 2              # a v1 chunk references at most 2 * chunk_blocks blocks
SUPERBLOCK_SIZE = 64
ENTRY_SIZE = 16
CHUNKS_OFFSET = SUPERBLOCK_SIZE   # where `fusesnap diff` puts the first chunk
MIN_BLOCK_BITS = 9
MAX_BLOCK_BITS = 31               # block_bits < 32
MAX_CHUNK_BYTES = 1 << 31         # chunk_blocks << block_bits < 2^31
MAX_48 = 1 << 48                  # dest and src are 48-bit
COMPRESSIONS = ("zstd", "none")
COMPRESSION_FIELD = 16

_SB = struct.Struct("<8sBBHI16sQQQQ")
_ENTRY = struct.Struct("<IHHII")
_M32 = 0xFFFFFFFF
_CONTENTSIZE_UNKNOWN = zstandard.CONTENTSIZE_UNKNOWN
_PIECE = 4096   # input piece size when a zstd frame does not state its content size

IDENT_MAGIC = b"fsnapid\0"
IDENT_VERSION = 1                 # the trailer of a version 0 diff
IDENT_VERSION_REFERENCING = 2     # of a version 1 diff: reference hashes added (still read)
IDENT_VERSION_CHUNK_OLD = 3       # of a version 1 diff: old hashes per chunk, not per block
IDENT_VERSIONS = {VERSION: (IDENT_VERSION,),                    # diff version: trailers
                  VERSION_REFERENCING: (IDENT_VERSION_CHUNK_OLD, IDENT_VERSION_REFERENCING)}
BLOCK_HASH_SIZE = 8
CHUNK_HASH_SIZE = 16
_IDENT = struct.Struct("<8sIIQQQQII8x32s")
_REF_COUNT = struct.Struct("<I")
_REF_RUN = struct.Struct("<QI")
IDENT_HEADER_SIZE = _IDENT.size

assert _SB.size == SUPERBLOCK_SIZE and _ENTRY.size == ENTRY_SIZE and IDENT_HEADER_SIZE == 96


class DiffFormatError(ValueError):
    """The diff breaks a rule of the format; the message is one line naming the rule."""

    def __init__(self, detail: str):
        super().__init__(f"bad diff: {detail}")


class TruncatedDiff(DiffFormatError):
    """The file ends before the end its own header and trailer describe."""

    def __init__(self, detail: str, size: int, expected: int):
        super().__init__(detail)
        self.size, self.expected = size, expected


class ChunkError(DiffFormatError):
    """One chunk does not decompress, or decompresses to something its entries cannot use."""

    def __init__(self, chunk_index: int, detail: str):
        super().__init__(f"chunk {chunk_index}: {detail}")
        self.chunk_index = chunk_index


class ReferencesNotOld(ChunkError):
    """A version 1 chunk's references do not hold OLD's contents: the diff may be fine,
    the old data it needs is not where it was read from."""


class DiffChangedError(DiffFormatError):
    """The diff file changed after it was opened and validated."""


def hash_block(block) -> bytes:
    """The identification hash of one block's OLD contents (BLOCK_HASH_SIZE bytes)."""
    return xxhash.xxh3_64_digest(block)


def hash_chunk(data) -> bytes:
    """The identification hash of a decompressed chunk, its blocks' NEW contents
    (CHUNK_HASH_SIZE bytes)."""
    return xxhash.xxh3_128_digest(data)


@dataclasses.dataclass(frozen=True)
class Identification:
    """What a diff applies to: OLD's and NEW's sizes, a hash of every chunk's new
    contents (`chunk_hashes`, CHUNK_HASH_SIZE bytes each, in chunk order) and of its
    blocks' old contents: per changed block in trailer versions 1 and 2
    (BLOCK_HASH_SIZE bytes each, in directory order; they stay in the file, read with
    `DiffFile.old_block_hashes`, at `block_hashes_offset`), per chunk in version 3
    (`old_chunk_hashes`)."""

    old_size: int
    new_size: int
    n_blocks: int
    chunk_hashes: bytes
    block_hashes_offset: int = 0
    # version 1 diffs: per chunk, the hash of the OLD data it references (its dictionary)
    reference_hashes: bytes = b""
    version: int = IDENT_VERSION
    # trailer version 3: per chunk, the hash of its blocks' OLD contents
    old_chunk_hashes: bytes = b""

    @property
    def block_hash_size(self) -> int:
        """Bytes per changed block of old-contents hash: 0 in version 3 (none)."""
        return _block_hash_size(self.version)

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_hashes) // CHUNK_HASH_SIZE

    def chunk_hash(self, chunk_index: int) -> bytes:
        return _nth(self.chunk_hashes, chunk_index)

    def reference_hash(self, chunk_index: int) -> bytes:
        return _nth(self.reference_hashes, chunk_index)

    def old_chunk_hash(self, chunk_index: int) -> bytes:
        """Version 3: `hash_chunk` of the OLD contents of the chunk's blocks, in
        directory order."""
        return _nth(self.old_chunk_hashes, chunk_index)

    def _header(self, checksum: bytes) -> bytes:
        return _IDENT.pack(IDENT_MAGIC, self.version, IDENT_HEADER_SIZE, self.old_size,
                           self.new_size, self.n_blocks, self.n_chunks, self.block_hash_size,
                           CHUNK_HASH_SIZE, checksum)

    def pack_trailer_head(self) -> bytes:
        """The trailer without its old block hashes (which follow it in versions 1
        and 2; version 3 has none: this is the whole trailer)."""
        hashes = self.chunk_hashes + self.reference_hashes + self.old_chunk_hashes
        checksum = hashlib.sha256(self._header(bytes(32)) + hashes).digest()
        return self._header(checksum) + hashes

    @classmethod
    def read_trailer(cls, fd: int, at: int, file_size: int, n_blocks: int, n_chunks: int,
                     diff_version: int = VERSION) -> Identification | None:
        """The trailer at byte `at` of the diff; None if there is none (the diff was
        made by another tool). DiffFormatError if one starts there but is damaged, or
        is not a version that goes with `diff_version`."""
        head = os.pread(fd, IDENT_HEADER_SIZE, at)
        if not head or not IDENT_MAGIC.startswith(head[:len(IDENT_MAGIC)]):
            return None   # no trailer: nothing, or bytes that are not ours

        def fail(detail: str) -> DiffFormatError:
            return DiffFormatError(f"identification trailer at {at}: {detail}")

        expected = IDENT_VERSIONS[diff_version]
        if len(head) < IDENT_HEADER_SIZE:
            # Where the trailer should end, if its version can still be read.
            version = int.from_bytes(head[8:12], "little") if len(head) >= 12 else None
            end = at + (_trailer_size(version, n_blocks, n_chunks) if version in expected
                        else IDENT_HEADER_SIZE)
            raise TruncatedDiff(f"identification trailer at {at}: truncated, {len(head)} of "
                                f"{IDENT_HEADER_SIZE} header bytes", file_size, end)
        (_, version, header_size, old_size, new_size, t_blocks, t_chunks, block_hash_size,
         chunk_hash_size, _) = _IDENT.unpack(head)
        if (version not in expected or (header_size, block_hash_size, chunk_hash_size) != (
                IDENT_HEADER_SIZE, _block_hash_size(version),
                CHUNK_HASH_SIZE)):
            raise fail(f"unknown version {version} (header {header_size} bytes, hashes "
                       f"{block_hash_size}/{chunk_hash_size}), expected "
                       f"{' or '.join(map(str, expected))} for a version {diff_version} diff")
        if (t_blocks, t_chunks) != (n_blocks, n_chunks):
            raise fail(f"describes {t_blocks} blocks in {t_chunks} chunks, the directory "
                       f"has {n_blocks} in {n_chunks}")
        n_hashed = n_chunks * _CHUNK_HASHES_PER_CHUNK[version]
        hashes_at = at + IDENT_HEADER_SIZE
        end = at + _trailer_size(version, n_blocks, n_chunks)
        if end > file_size:
            raise TruncatedDiff(f"identification trailer at {at}: truncated, the file ends at "
                                f"{file_size}, the trailer at {end}", file_size, end)
        hashes = os.pread(fd, n_hashed * CHUNK_HASH_SIZE, hashes_at)
        split = n_chunks * CHUNK_HASH_SIZE
        ident = cls(old_size, new_size, n_blocks, hashes[:split], hashes_at + len(hashes),
                    hashes[split:2 * split], version, hashes[2 * split:])
        if ident.pack_trailer_head()[:IDENT_HEADER_SIZE] != head:
            raise fail("checksum mismatch")
        return ident


_CHUNK_HASHES_PER_CHUNK = {IDENT_VERSION: 1, IDENT_VERSION_REFERENCING: 2, IDENT_VERSION_CHUNK_OLD: 3}


def _trailer_size(version: int, n_blocks: int, n_chunks: int) -> int:
    """Bytes of an identification trailer of this version, header included."""
    return (IDENT_HEADER_SIZE + n_chunks * _CHUNK_HASHES_PER_CHUNK[version] * CHUNK_HASH_SIZE
            + n_blocks * _block_hash_size(version))


def _block_hash_size(version: int) -> int:
    """Bytes of old-contents hash per changed block in a trailer of this version
    (version 3 hashes them per chunk instead)."""
    return 0 if version == IDENT_VERSION_CHUNK_OLD else BLOCK_HASH_SIZE


def _nth(hashes: bytes, index: int) -> bytes:
    """The index-th of a run of chunk-sized hashes."""
    return hashes[index * CHUNK_HASH_SIZE:(index + 1) * CHUNK_HASH_SIZE]


@dataclasses.dataclass(frozen=True)
class Superblock:
    block_bits: int
    chunk_blocks: int
    compression: str
    dir_offset: int
    dir_compressed_size: int
    dir_n: int
    version: int = VERSION
    magic: bytes = MAGIC
    pad1: int = 0
    pad2: int = 0

    @property
    def block_size(self) -> int:
        return 1 << self.block_bits

    def pack(self) -> bytes:
        name = self.compression.encode("ascii")
        if len(name) >= COMPRESSION_FIELD:
            raise ValueError(f"compression name {self.compression!r} too long")
        return _SB.pack(self.magic, self.version, self.block_bits, self.pad1, self.chunk_blocks,
                        name.ljust(COMPRESSION_FIELD, b"\0"), self.dir_offset,
                        self.dir_compressed_size, self.dir_n, self.pad2)

    @classmethod
    def unpack(cls, data: bytes) -> Superblock:
        """Parse 64 bytes; checks only the magic and that the compression field is a
        NUL-padded name (so it can become a str). Call :meth:`validate` for the rules.
        """
        if len(data) < SUPERBLOCK_SIZE:
            raise DiffFormatError(f"superblock: need {SUPERBLOCK_SIZE} bytes, got {len(data)}")
        (magic, version, block_bits, pad1, chunk_blocks, comp, dir_offset,
         dir_size, dir_n, pad2) = _SB.unpack_from(data)
        if magic != MAGIC:
            raise DiffFormatError(f"magic: must be {MAGIC!r}, got {magic!r}")
        name, nul, tail = comp.partition(b"\0")
        if not nul:
            raise DiffFormatError(f"compression: must be NUL-terminated within "
                                  f"{COMPRESSION_FIELD} bytes, got {comp!r}")
        if tail.strip(b"\0"):
            raise DiffFormatError(f"compression: bytes after the NUL must be zero, got {comp!r}")
        return cls(block_bits=block_bits, chunk_blocks=chunk_blocks,
                   compression=name.decode("latin-1"), dir_offset=dir_offset,
                   dir_compressed_size=dir_size, dir_n=dir_n, version=version, magic=magic,
                   pad1=pad1, pad2=pad2)

    def validate(self) -> None:
        """The kernel loader's header checks, plus zero pads."""
        if self.magic != MAGIC:
            raise DiffFormatError(f"magic: must be {MAGIC!r}, got {self.magic!r}")
        if self.version not in VERSIONS:
            raise DiffFormatError(f"version: must be {VERSION} (or {VERSION_REFERENCING}, "
                                  f"fusesnap's), got {self.version}")
        if self.version == VERSION_REFERENCING and self.compression != "zstd":
            raise DiffFormatError(f"compression: version {self.version} needs zstd, got "
                                  f"{self.compression!r}")
        if not MIN_BLOCK_BITS <= self.block_bits <= MAX_BLOCK_BITS:
            raise DiffFormatError(f"block_bits: must be in [{MIN_BLOCK_BITS}, {MAX_BLOCK_BITS}], "
                                  f"got {self.block_bits}")
        if self.pad1:
            raise DiffFormatError(f"pad1: must be 0, got {self.pad1}")
        if self.chunk_blocks <= 0:
            raise DiffFormatError(f"chunk_blocks: must be > 0, got {self.chunk_blocks}")
        if self.chunk_blocks << self.block_bits >= MAX_CHUNK_BYTES:
            raise DiffFormatError(f"chunk_blocks: chunk_blocks << block_bits must be < 2^31, got "
                                  f"{self.chunk_blocks} << {self.block_bits}")
        if self.compression not in COMPRESSIONS:
            raise DiffFormatError(f"compression: must be one of {', '.join(COMPRESSIONS)}, "
                                  f"got {self.compression!r}")
        if self.dir_n < 1:
            raise DiffFormatError(f"dir_n: must be >= 1, got {self.dir_n}")
        if self.pad2:
            raise DiffFormatError(f"pad2: must be 0, got {self.pad2}")


def pack_entry(dest: int, src: int, offset: int) -> bytes:
    if not (0 <= dest < MAX_48 and 0 <= src < MAX_48 and 0 <= offset <= _M32):
        raise ValueError(f"directory entry out of range: dest={dest} src={src} offset={offset}")
    return _ENTRY.pack(dest & _M32, dest >> 32, src >> 32, src & _M32, offset)


def unpack_entry(data: bytes, index: int = 0) -> tuple[int, int, int]:
    """(dest, src, offset) of entry `index` of raw directory bytes."""
    dest_lo, dest_hi, src_hi, src_lo, offset = _ENTRY.unpack_from(data, index * ENTRY_SIZE)
    return dest_lo | dest_hi << 32, src_lo | src_hi << 32, offset


def pack_directory(dests: Sequence[int], srcs: Sequence[int], offsets: Sequence[int]) -> bytes:
    """Raw directory bytes of parallel sequences (arrays are fastest), sentinel included."""
    n = len(dests)
    if not n == len(srcs) == len(offsets):
        raise ValueError("dests, srcs and offsets must have the same length")
    if n == 0:
        return b""
    if max(dests) >= MAX_48 or max(srcs) >= MAX_48 or max(offsets) > _M32:
        raise ValueError("directory entry out of range (dest and src are 48-bit, offset 32-bit)")
    words = array("I", bytes(ENTRY_SIZE * n))
    if max(dests) <= _M32 and max(srcs) <= _M32:
        words[0::4] = array("I", dests)
        words[2::4] = array("I", srcs)
    else:
        words[0::4] = array("I", (d & _M32 for d in dests))
        words[1::4] = array("I", ((d >> 32) | (s >> 32) << 16 for d, s in zip(dests, srcs)))
        words[2::4] = array("I", (s & _M32 for s in srcs))
    words[3::4] = array("I", offsets)
    if sys.byteorder == "big":
        words.byteswap()
    return words.tobytes()


def pack_references(runs: Sequence[tuple[int, int]]) -> bytes:
    """A version 1 chunk's header: the runs (first OLD block, count) it references."""
    return _REF_COUNT.pack(len(runs)) + b"".join(_REF_RUN.pack(first, count)
                                                  for first, count in runs)


def unpack_references(raw: bytes, old_blocks: int, limit: int,
                      fail) -> tuple[list[tuple[int, int]], int]:
    """(runs, offset of the zstd frame) of a version 1 chunk; the runs must lie in
    OLD (`old_blocks` long), ascend without overlapping and hold at most `limit`
    blocks. `fail(detail)` builds the exception to raise."""
    if len(raw) < _REF_COUNT.size:
        raise fail("too short for its reference count")
    (n_runs,) = _REF_COUNT.unpack_from(raw)
    at = _REF_COUNT.size + n_runs * _REF_RUN.size
    if at > len(raw):
        raise fail(f"{n_runs} reference runs do not fit its {len(raw)} bytes")
    runs = [_REF_RUN.unpack_from(raw, _REF_COUNT.size + i * _REF_RUN.size) for i in range(n_runs)]
    end = total = 0
    for first, count in runs:
        if count == 0 or first < end or first + count > old_blocks:
            raise fail(f"reference run ({first}, {count}) must be non-empty, ascending and "
                       f"within OLD's {old_blocks} blocks")
        end = first + count
        total += count
    if total > limit:
        raise fail(f"references {total} blocks, more than the {limit} allowed")
    return runs, at


def _zstd_decompress(dctx: zstandard.ZstdDecompressor, raw: bytes, limit: int,
                     fail) -> bytes:
    """Decompress exactly one zstd frame of at most `limit` bytes filling all of `raw`.

    `fail(detail)` builds the exception to raise. The content checksum is verified by
    libzstd when the frame has one.
    """
    try:
        params = zstandard.get_frame_parameters(raw)
    except zstandard.ZstdError as e:
        raise fail(f"not a zstd frame ({e})") from None
    size = params.content_size
    if size != _CONTENTSIZE_UNKNOWN and size > limit:
        raise fail(f"decompresses to {size} bytes, more than the {limit} allowed")
    dobj = dctx.decompressobj()
    try:
        if size != _CONTENTSIZE_UNKNOWN:
            out = dobj.decompress(raw)
        else:   # feed small pieces so a decompression bomb stops early
            parts = []
            total = 0
            view = memoryview(raw)
            for pos in range(0, len(raw), _PIECE):
                part = dobj.decompress(view[pos:pos + _PIECE])
                total += len(part)
                if total > limit:
                    raise fail(f"decompresses to more than the {limit} bytes allowed")
                parts.append(part)
                if dobj.eof:
                    break
            out = b"".join(parts)
    except zstandard.ZstdError as e:
        raise fail(f"zstd: {e}") from None
    if not dobj.eof:
        raise fail("zstd frame is truncated")
    if dobj.unused_data or (size == _CONTENTSIZE_UNKNOWN and pos + _PIECE < len(raw)):
        raise fail("trailing bytes after the zstd frame")
    if len(out) > limit:
        raise fail(f"decompresses to {len(out)} bytes, more than the {limit} allowed")
    return out


def _first_not_increasing(values: Sequence[int], start: int = 0, stop: int | None = None) -> int | None:
    """Smallest i in (start, stop) with values[i] <= values[i - 1], or None."""
    stop = len(values) if stop is None else stop
    bad = itertools.compress(itertools.count(start + 1),
                             map(operator.ge, itertools.islice(values, start, stop - 1),
                                 itertools.islice(values, start + 1, stop)))
    return next(bad, None)


def _split_directory(words: array) -> tuple[array, array, array]:
    """(dests, srcs, offsets) arrays of directory words, the sentinel included."""
    hi = words[1::4]
    if any(hi):
        dests = array("Q", (lo | (h & 0xFFFF) << 32 for lo, h in zip(words[0::4], hi)))
        srcs = array("Q", (lo | (h >> 16) << 32 for lo, h in zip(words[2::4], hi)))
    else:   # the usual case: 32-bit dests and srcs, kept as 4-byte arrays
        dests = words[0::4]
        srcs = words[2::4]
    return dests, srcs, words[3::4]


def _first_decreasing(values: Sequence[int], start: int, stop: int) -> int | None:
    """Smallest i in (start, stop) with values[i] < values[i - 1], or None."""
    if stop - start < 2:
        return None
    bad = itertools.compress(itertools.count(start + 1),
                             map(operator.gt, itertools.islice(values, start, stop - 1),
                                 itertools.islice(values, start + 1, stop)))
    return next(bad, None)


class DiffFile:
    """An opened, fully validated diff: header, directory and chunk layout.

    Owns its file descriptor. Entries live in compact arrays (`array` module): a diff
    with millions of entries costs 8 bytes per entry (12 if a dest needs more than 32 bits). Reading and decompressing
    chunks is thread-safe; nothing else mutates after `open`.
    """

    def __init__(self, path: str, fd: int, superblock: Superblock, file_size: int,
                 dests: array, offsets: array, chunk_first: array, chunk_src: array,
                 sentinel_dest: int):
        self.path = path
        self._fd = fd
        self.superblock = superblock
        self.block_bits = superblock.block_bits
        self.block_size = 1 << superblock.block_bits
        self.chunk_blocks = superblock.chunk_blocks
        self.compression = superblock.compression
        self.file_size = file_size
        self.total_blocks = len(dests)
        self.n_chunks = len(chunk_first) - 1
        self.sentinel_dest = sentinel_dest
        self._dests = dests                # real entries only
        self._offsets = offsets            # real entries only
        self._chunk_first = chunk_first    # n_chunks + 1: entry index where each chunk starts
        self._chunk_src = chunk_src        # n_chunks + 1: byte offset of each chunk, then sentinel src
        self._tls = threading.local()
        st = os.fstat(fd)
        # What the file was when validated: every later read checks it still is.
        self.opened_as = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.identification: Identification | None = None

    # ---- opening and validation -------------------------------------------------------

    @classmethod
    def open(cls, path) -> DiffFile:
        """Open and validate; raises DiffFormatError (bad diff) or OSError."""
        path = os.fspath(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return cls._load(path, fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _load(cls, path: str, fd: int) -> DiffFile:
        file_size = os.fstat(fd).st_size
        head = os.pread(fd, SUPERBLOCK_SIZE, 0)
        if len(head) < SUPERBLOCK_SIZE:
            raise DiffFormatError(f"file is {len(head)} bytes, shorter than the "
                                  f"{SUPERBLOCK_SIZE}-byte superblock")
        sb = Superblock.unpack(head)
        sb.validate()
        dir_end = sb.dir_offset + sb.dir_compressed_size
        if sb.dir_offset < SUPERBLOCK_SIZE:
            raise DiffFormatError(f"dir_offset: must be >= {SUPERBLOCK_SIZE} (after the superblock), "
                                  f"got {sb.dir_offset}")
        if dir_end > file_size:
            raise DiffFormatError(f"dir_offset + dir_compressed_size: directory must lie inside "
                                  f"the file ({file_size} bytes), got {sb.dir_offset} + "
                                  f"{sb.dir_compressed_size}")
        if sb.dir_compressed_size == 0:
            raise DiffFormatError("dir_compressed_size: must be > 0, got 0")
        expected = sb.dir_n * ENTRY_SIZE
        if sb.compression == "none" and sb.dir_compressed_size != expected:
            raise DiffFormatError(f"dir_compressed_size: must be dir_n * {ENTRY_SIZE} = {expected} "
                                  f"with compression none, got {sb.dir_compressed_size}")
        raw = os.pread(fd, sb.dir_compressed_size, sb.dir_offset)
        if len(raw) != sb.dir_compressed_size:
            raise DiffFormatError(f"directory: file truncated, read {len(raw)} of "
                                  f"{sb.dir_compressed_size} bytes")
        if sb.compression == "zstd":
            raw = _zstd_decompress(zstandard.ZstdDecompressor(), raw, expected,
                                   lambda d: DiffFormatError(f"directory: {d}"))
        if len(raw) != expected:
            raise DiffFormatError(f"directory: must decompress to dir_n * {ENTRY_SIZE} = {expected} "
                                  f"bytes, got {len(raw)}")
        words = array("I")   # 4 little-endian u32 per entry
        words.frombytes(raw)
        del raw              # peak memory: the directory is held once, not twice
        if sys.byteorder == "big":
            words.byteswap()
        dests, srcs, offsets = _split_directory(words)
        del words
        return cls._parse_directory(path, fd, sb, file_size, dests, srcs, offsets)

    @classmethod
    def _parse_directory(cls, path: str, fd: int, sb: Superblock, file_size: int,
                         dests: array, srcs: array, offsets: array) -> DiffFile:
        real = sb.dir_n - 1
        sentinel_dest, sentinel_src = dests[real], srcs[real]
        del offsets[real:]

        cb = sb.chunk_blocks
        if real and max(offsets) >= cb:
            i = next(i for i, o in enumerate(offsets) if o >= cb)
            raise DiffFormatError(f"directory entry {i}: offset must be < chunk_blocks ({cb}), "
                                  f"got {offsets[i]}")
        i = _first_not_increasing(dests)
        if i is not None:
            if i == real:
                raise DiffFormatError(f"sentinel: dest must be greater than every real dest, "
                                      f"got {dests[i]} after {dests[i - 1]}")
            raise DiffFormatError(f"directory entry {i}: dests must strictly increase, "
                                  f"got {dests[i]} after {dests[i - 1]}")
        del dests[real:]

        # Chunk boundaries: entries where src changes (real entries only).
        chunk_first = array("Q")
        if _first_decreasing(srcs, 0, real) is None:   # valid diffs: find them by bisection
            e = 0
            while e < real:
                chunk_first.append(e)
                e = bisect.bisect_right(srcs, srcs[e], e, real)
        else:   # invalid: find every change, the checks below name the broken rule
            chunk_first.extend([0] if real else [])
            chunk_first.extend(itertools.compress(
                itertools.count(1),
                map(operator.ne, itertools.islice(srcs, 0, max(real - 1, 0)),
                    itertools.islice(srcs, 1, max(real, 1)))))
        chunk_src = array("Q", (srcs[e] for e in chunk_first))
        chunk_src.append(sentinel_src)
        chunk_first.append(real)
        del srcs
        n_chunks = len(chunk_first) - 1
        j = _first_not_increasing(chunk_src)
        if j is not None:
            if j == n_chunks:
                raise DiffFormatError(f"sentinel: src must be greater than the last chunk's src "
                                      f"(it is the end of that chunk), got {chunk_src[j]} after "
                                      f"{chunk_src[j - 1]}")
            e = chunk_first[j]
            if chunk_src[j] in set(chunk_src[:j]):
                raise DiffFormatError(f"directory entry {e}: entries of the chunk at src "
                                      f"{chunk_src[j]} must be contiguous, it reappears after src "
                                      f"{chunk_src[j - 1]}")
            raise DiffFormatError(f"directory entry {e}: srcs of consecutive chunks must increase, "
                                  f"got {chunk_src[j]} after {chunk_src[j - 1]}")

        dir_start, dir_end = sb.dir_offset, sb.dir_offset + sb.dir_compressed_size
        if sentinel_src > file_size:
            raise DiffFormatError(f"sentinel: src (end of the last chunk) must be <= the file size "
                                  f"({file_size}), got {sentinel_src}")
        if n_chunks:
            lo = chunk_src[0]
            if lo < SUPERBLOCK_SIZE:
                raise DiffFormatError(f"chunk 0: src must be >= {SUPERBLOCK_SIZE} (after the "
                                      f"superblock), got {lo}")
            if not (sentinel_src <= dir_start or lo >= dir_end):
                raise DiffFormatError(f"chunks [{lo}, {sentinel_src}) overlap the directory "
                                      f"[{dir_start}, {dir_end})")
        self = cls(path, fd, sb, file_size, dests, offsets, chunk_first, chunk_src, sentinel_dest)
        if sb.compression == "none":
            for c in range(n_chunks):
                self._check_chunk_size(c, self.chunk_extent(c)[1])
        ident = self.identification = Identification.read_trailer(
            fd, max(dir_end, sentinel_src), file_size, real, n_chunks, sb.version)
        if ident is None and sb.version == VERSION_REFERENCING:
            raise DiffFormatError(f"version {sb.version} needs its identification trailer "
                                  f"after the directory, found none")
        if ident is not None and real and (dests[-1] + 1) * sb.block_size > ident.new_size:
            raise DiffFormatError(f"identification trailer: NEW's size {ident.new_size} does "
                                  f"not hold dest block {dests[-1]}")
        return self

    # ---- queries ------------------------------------------------------------------------

    def entry(self, index: int) -> tuple[int, int, int]:
        """(dest, src, offset) of real entry `index`."""
        if not 0 <= index < self.total_blocks:
            raise IndexError(index)
        c = bisect.bisect_right(self._chunk_first, index) - 1
        return self._dests[index], self._chunk_src[c], self._offsets[index]

    def lookup(self, block: int) -> tuple[int, int] | None:
        """(chunk_index, offset) holding destination `block`, or None if it is unchanged."""
        i = bisect.bisect_left(self._dests, block)
        if i == self.total_blocks or self._dests[i] != block:
            return None
        return bisect.bisect_right(self._chunk_first, i) - 1, self._offsets[i]

    def runs(self) -> Iterator[tuple[int, int, int, int]]:
        """(dest_start_block, n_blocks, chunk_index, first_offset) for maximal runs of entries
        with consecutive dests, in one chunk, with consecutive offsets; in directory order."""
        for c in range(self.n_chunks):
            for dest, n, offset in self.chunk_runs(c):
                yield dest, n, c, offset

    def chunk_runs(self, chunk_index: int) -> Iterator[tuple[int, int, int]]:
        """(dest_start_block, n_blocks, first_offset) for the maximal runs of one chunk."""
        dests, offsets = self._dests, self._offsets
        a, b = self.entry_range_of_chunk(chunk_index)
        n = b - a
        d0, o0 = dests[a], offsets[a]
        if dests[b - 1] - d0 == n - 1 and offsets[a:b] == array("I", range(o0, o0 + n)):
            yield d0, n, o0
            return
        start = a
        for e in range(a + 1, b):
            if dests[e] != dests[e - 1] + 1 or offsets[e] != offsets[e - 1] + 1:
                yield dests[start], e - start, offsets[start]
                start = e
        yield dests[start], b - start, offsets[start]

    def fingerprint(self) -> str:
        """sha256 naming this diff by its contents: the superblock, the compressed
        directory, and the chunk hashes of the identification; a diff without one has
        every compressed chunk hashed instead (one read of the whole diff). Blocking."""
        sb = self.superblock
        digest = hashlib.sha256(sb.pack())
        digest.update(os.pread(self._fd, sb.dir_compressed_size, sb.dir_offset))
        if self.identification is not None:
            digest.update(self.identification.pack_trailer_head())
        else:
            for c in range(self.n_chunks):
                digest.update(self.read_chunk_raw(c))
        return digest.hexdigest()

    @property
    def new_size(self) -> int | None:
        """NEW's size in bytes, if the diff identifies it."""
        return self.identification.new_size if self.identification else None

    def old_block_hashes(self, chunk_index: int) -> bytes:
        """The old-contents hashes of a chunk's blocks (BLOCK_HASH_SIZE bytes each, in
        directory order). Only for a diff whose trailer has them (versions 1 and 2).
        Blocking."""
        return self.entries_old_block_hashes(*self.entry_range_of_chunk(chunk_index))

    def entries_old_block_hashes(self, first: int, end: int) -> bytes:
        """The old-contents hashes of directory entries [first, end). Blocking."""
        size = (end - first) * BLOCK_HASH_SIZE
        hashes = os.pread(self._fd, size, self.identification.block_hashes_offset
                          + first * BLOCK_HASH_SIZE)
        self.check_unchanged()
        if len(hashes) != size:
            raise DiffFormatError(f"identification trailer: truncated at entry {first + len(hashes) // BLOCK_HASH_SIZE}")
        return hashes

    def check_unchanged(self) -> None:
        """DiffChangedError if the file is not the one opened (a diff rewritten in place
        would otherwise be read as a blend of two diffs). A diff replaced by a rename
        is no danger: this fd keeps reading the old one, whole."""
        st = os.fstat(self._fd)
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self.opened_as:
            raise DiffChangedError(f"{self.path} changed while in use (size, mtime or inode "
                                   "differ from when it was opened)")

    def chunk_extent(self, chunk_index: int) -> tuple[int, int]:
        """(byte offset in the file, compressed length) of a chunk."""
        if not 0 <= chunk_index < self.n_chunks:
            raise IndexError(chunk_index)
        start = self._chunk_src[chunk_index]
        return start, self._chunk_src[chunk_index + 1] - start

    def entry_range_of_chunk(self, chunk_index: int) -> tuple[int, int]:
        """Directory entry indexes [first, last + 1) of a chunk."""
        if not 0 <= chunk_index < self.n_chunks:
            raise IndexError(chunk_index)
        return self._chunk_first[chunk_index], self._chunk_first[chunk_index + 1]

    # ---- chunk data ---------------------------------------------------------------------

    def read_chunk_raw(self, chunk_index: int) -> bytes:
        """The compressed bytes of a chunk. Blocking: run it in a thread."""
        start, length = self.chunk_extent(chunk_index)
        raw = os.pread(self._fd, length, start)
        self.check_unchanged()   # after the read: a rewrite during it changed the mtime
        if len(raw) != length:
            raise ChunkError(chunk_index, f"file truncated, read {len(raw)} of {length} bytes "
                                          f"at {start}")
        return raw

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dctx = getattr(self._tls, "dctx", None)
        if dctx is None:
            dctx = self._tls.dctx = zstandard.ZstdDecompressor()
        return dctx

    @property
    def version(self) -> int:
        return self.superblock.version

    def references(self, chunk_index: int, raw: bytes) -> tuple[list[tuple[int, int]], int]:
        """(runs of OLD blocks a version 1 chunk references, offset of its zstd frame in
        `raw`); ([], 0) for version 0."""
        if self.version == VERSION:
            return [], 0
        fail = lambda d: ChunkError(chunk_index, d)  # noqa: E731
        return unpack_references(raw, self.identification.old_size >> self.block_bits,
                                 REFERENCE_FACTOR * self.chunk_blocks, fail)

    def chunk_references(self, chunk_index: int) -> list[tuple[int, int]]:
        """The runs of OLD a version 1 chunk references, from its header alone (one
        small read); [] for version 0. Blocking."""
        if self.version == VERSION:
            return []
        start, length = self.chunk_extent(chunk_index)
        limit = REFERENCE_FACTOR * self.chunk_blocks   # each run holds a block at least
        head = os.pread(self._fd, min(length, _REF_COUNT.size + limit * _REF_RUN.size), start)
        self.check_unchanged()
        return self.references(chunk_index, head)[0]

    def changed_blocks(self) -> Sequence[int]:
        """Every real entry's dest, ascending (the directory's order)."""
        return self._dests

    def decompress_chunk(self, chunk_index: int, raw: bytes, read_old=None) -> bytes:
        """The decompressed chunk, checked against its entries; raises ChunkError.
        A version 1 chunk that references OLD needs `read_old(runs)`: the contents of
        those runs of OLD's blocks, concatenated (checked against the chunk's reference
        hash). Thread-safe."""
        _, length = self.chunk_extent(chunk_index)
        if len(raw) != length:
            raise ChunkError(chunk_index, f"got {len(raw)} compressed bytes, expected {length}")
        limit = self.chunk_blocks << self.block_bits
        fail = lambda d: ChunkError(chunk_index, d)  # noqa: E731
        runs, frame_at = self.references(chunk_index, raw)
        if runs:
            if read_old is None:
                raise ChunkError(chunk_index, "references OLD's blocks: needs the old image")
            reference = read_old(runs)
            if hash_chunk(reference) != self.identification.reference_hash(chunk_index):
                raise ReferencesNotOld(chunk_index, f"the OLD blocks it references (from "
                                                    f"block {runs[0][0]}) do not hold OLD's contents")
            dctx = zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(
                reference, dict_type=zstandard.DICT_TYPE_RAWCONTENT))
        else:
            dctx = self._decompressor()
        if self.compression == "none":
            data = raw
        else:
            data = _zstd_decompress(dctx, raw[frame_at:] if frame_at else raw, limit, fail)
        self._check_chunk_size(chunk_index, len(data))
        if (self.identification is not None
                and hash_chunk(data) != self.identification.chunk_hash(chunk_index)):
            raise ChunkError(chunk_index, "contents do not match the chunk's hash in the "
                                          "identification trailer")
        return data

    def _check_chunk_size(self, chunk_index: int, size: int) -> None:
        limit = self.chunk_blocks << self.block_bits
        if size > limit:
            raise ChunkError(chunk_index, f"size must be <= chunk_blocks << block_bits = {limit}, "
                                          f"got {size}")
        if size % self.block_size:
            raise ChunkError(chunk_index, f"size must be a multiple of the block size "
                                          f"{self.block_size}, got {size}")
        a, b = self._chunk_first[chunk_index], self._chunk_first[chunk_index + 1]
        need = (max(self._offsets[a:b]) + 1) * self.block_size
        if size < need:
            raise ChunkError(chunk_index, f"size {size} does not cover the offsets its entries use "
                                          f"(needs {need} bytes)")

    # ---- whole-diff checks --------------------------------------------------------------

    def check_device(self, device_size: int, granularity: int) -> None:
        """Raise DiffFormatError if the diff does not fit a device of `device_size` bytes
        whose logical block size is `granularity`."""
        if self.block_size % granularity:
            raise DiffFormatError(f"block size {self.block_size} must be a multiple of the "
                                  f"device's logical block size {granularity}")
        if self.new_size is not None:
            if device_size < self.new_size:
                raise DiffFormatError(f"the device ({device_size} bytes) is smaller than the "
                                      f"image the diff makes ({self.new_size} bytes)")
        elif self.total_blocks:
            last = self._dests[-1]
            if (last + 1) * self.block_size > device_size:
                raise DiffFormatError(f"dest block {last} lies beyond the end of the device "
                                      f"({device_size} bytes, {device_size // self.block_size} "
                                      f"blocks of {self.block_size})")

    def verify(self, read_old=None) -> None:
        """Decompress every chunk and check every rule (open already checked the rest);
        `read_old` as for `decompress_chunk`."""
        for c in range(self.n_chunks):
            self.decompress_chunk(c, self.read_chunk_raw(c), read_old)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> DiffFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<DiffFile {self.path!r} blocks={self.total_blocks} chunks={self.n_chunks} "
                f"block_size={self.block_size} chunk_blocks={self.chunk_blocks} "
                f"compression={self.compression}>")
