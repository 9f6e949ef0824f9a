"""The hash of OLD's contents of every block a version 1 diff changes, where known.

The merge needs them after a crash in the middle of a chunk (the source check tells
each block of that chunk old from new) and for its scratch copy (each slot is checked
against its block's old hash). A version 2 identification trailer carries them (8
bytes per changed block); version 3 carries one hash of OLD's contents per chunk
instead (fusesnap.formats.update_diff), which makes the diff smaller, so the merge
derives them: the first mount that merges finds each chunk wholly old on the device
(its blocks together match the chunk's 128-bit old hash), hashes its blocks one by
one (`hash_block`, as a version 2 trailer would) and records them here, durably,
before its first write to the device. A chunk is then either wholly old, wholly new,
or one the merge wrote part of, whose blocks were all recorded before that write.
A block whose chunk was already wholly new when first seen has no hash: the merge
never writes it again with other contents, so only a scratch slot could need it,
and that slot's old contents are gone with the first merge's state (as they were
before this record).

The record depends on the diff alone (OLD's contents), not on the device: one file
per diff, `STATE_DIR/update/<diff fingerprint>.oldhashes`, shared by every device the
diff merges into. Layout (little-endian)::

    magic "fsnapoh\\0" | u32 version 1 | u32 0 | u64 n_blocks
    n_blocks bytes          1 where the block's hash is known, else 0
    n_blocks * 8 bytes      the hashes, in directory order (zero where not known)
    16 bytes                XXH3-128 of everything before

A record that does not check out is ignored with a warning (as if there were none).
Written with write-temp, fsync, rename, fsync-directory.

Memory: 9 bytes per changed block (24 MiB for a 10 GiB image with every block
changed). Concurrency: plain blocking code, used before the image serves and, for
reading only, by the scratch copy's worker threads.
"""

from __future__ import annotations

import logging
import struct

import xxhash

from .devices import replace_durably
from .formats.update_diff import BLOCK_HASH_SIZE, DiffFile

log = logging.getLogger(__name__)

MAGIC = b"fsnapoh\0"
VERSION = 1
_HEADER = struct.Struct("<8sIIQ")
_CHECKSUM_SIZE = 16


class OldBlockHashes:
    """Per changed block (directory entry), the hash of its OLD contents, or None."""

    def __init__(self, n_blocks: int, path: str | None = None):
        self.n_blocks = n_blocks
        self.path = path               # where the record is kept; None: not kept
        self.hashes = bytearray(n_blocks * BLOCK_HASH_SIZE)
        self.known = bytearray(n_blocks)
        self.dirty = False             # learned something the file does not hold

    @classmethod
    def from_trailer(cls, diff: DiffFile) -> OldBlockHashes:
        """All of them, from a version 2 trailer. Blocking."""
        self = cls(diff.total_blocks)
        if diff.total_blocks:
            self.hashes[:] = diff.entries_old_block_hashes(0, diff.total_blocks)
        self.known[:] = b"\1" * diff.total_blocks
        return self

    @classmethod
    def load(cls, path: str, diff: DiffFile) -> OldBlockHashes:
        """The record at `path`, or an empty one (nothing known) to learn into. Blocking."""
        self = cls(diff.total_blocks, path)
        n = diff.total_blocks
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return self
        except OSError as exc:
            log.warning("ignoring %s: %s", path, exc.strerror or exc)
            return self
        body, checksum = raw[:-_CHECKSUM_SIZE], raw[-_CHECKSUM_SIZE:]
        expected_size = _HEADER.size + n * (1 + BLOCK_HASH_SIZE)
        if (len(body) != expected_size or xxhash.xxh3_128_digest(body) != checksum
                or _HEADER.unpack_from(body) != (MAGIC, VERSION, 0, n)):
            log.warning("ignoring %s: not a record of %d old block hashes, or damaged", path, n)
            return self
        self.known[:] = body[_HEADER.size:_HEADER.size + n]
        self.hashes[:] = body[_HEADER.size + n:]
        return self

    def entry_hash(self, entry: int) -> bytes | None:
        if not self.known[entry]:
            return None
        return bytes(self.hashes[entry * BLOCK_HASH_SIZE:(entry + 1) * BLOCK_HASH_SIZE])

    def of_entries(self, first: int, end: int) -> bytes | None:
        """The hashes of entries [first, end), or None unless all are known."""
        if self.known[first:end].count(0):
            return None
        return bytes(self.hashes[first * BLOCK_HASH_SIZE:end * BLOCK_HASH_SIZE])

    def learn(self, first: int, hashes: bytes) -> None:
        """The hashes of entries from `first` on, known to be OLD's."""
        end = first + len(hashes) // BLOCK_HASH_SIZE
        if self.known[first:end].count(0):
            self.hashes[first * BLOCK_HASH_SIZE:end * BLOCK_HASH_SIZE] = hashes
            self.known[first:end] = b"\1" * (end - first)
            self.dirty = True

    def save(self) -> None:
        """Make what was learned durable, if anything. Blocking; OSError if it fails
        (then the file is as it was)."""
        if self.path is None or not self.dirty:
            return
        body = _HEADER.pack(MAGIC, VERSION, 0, self.n_blocks) + self.known + self.hashes
        # Before the merge writes the device (the caller's order).
        replace_durably(self.path, body + xxhash.xxh3_128_digest(body))
        self.dirty = False
