"""`fusesnap diff` and `fusesnap diff-info`: make and inspect update diffs.

`build_diff` streams OLD and NEW in large windows with bounded memory whatever the
image size: windows are compared with ``==`` first and only differing windows block
by block. Changed blocks of NEW go, in dest order, into chunks of `chunk_blocks`
blocks (not necessarily contiguous on the device), which a thread pool compresses
(one ZstdCompressor per thread; zstandard releases the GIL) with a bounded number
of chunks in flight. Chunks are written in order to a temp file next to DIFF, then
the directory, the identification trailer (hashes of every chunk's new contents and
of its blocks' old contents, per block in v0 and per chunk in v1, and both images'
sizes), then the superblock; the file is fsynced and renamed over DIFF and
the directory fsynced. The layout is documented in `fusesnap.formats.update_diff`.

The format code (packing, validation, reading) lives in `fusesnap.formats.update_diff`;
this module is the policy around it: arguments, files, threads, progress, messages.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import os
import queue
import signal
import stat
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import zstandard

from fusesnap import arguments
from fusesnap.arguments import positive_int, whole_number
from fusesnap.devices import fsync_directory
from fusesnap.errors import EXIT_FAILED, EXIT_OK, UserError
from fusesnap.formats.update_diff import (
    CHUNKS_OFFSET, COMPRESSIONS, ENTRY_SIZE, IDENT_VERSION_CHUNK_OLD, MAGIC, MAX_CHUNK_BYTES,
    REFERENCE_FACTOR, SUPERBLOCK_SIZE, VERSION, VERSION_REFERENCING, DiffFile, DiffFormatError,
    Identification, Superblock, TruncatedDiff, hash_block, hash_chunk, pack_directory, pack_references)

DEFAULT_BLOCK_SIZE = 4096
# 512 KiB of decompressed data per chunk (128 blocks of 4 KiB). Whole diff size relative
# to `zstd -3` of all the changed blocks at once, 10% of 4 KiB blocks changed, level 3:
#   chunk     64 KiB  128 KiB  256 KiB  512 KiB  1 MiB
#   ext4       1.123    1.105    1.060    1.053  1.031   (python stdlib, docs, perl trees)
#   mix        1.121    1.101    1.068    1.038  1.016   (bench/bench_diff.py data, 256 MiB)
# A cold random 4 KiB read of a changed block decompresses the whole chunk: 0.2, 1.1,
# 1.8 and 3.1 ms for 64 KiB, 256 KiB, 512 KiB and 1 MiB on one core of the (loaded)
# 2-core test VM. 512 KiB is the smallest within ~5%; readers should cache chunks.
DEFAULT_CHUNK_BYTES = 512 * 1024
DEFAULT_LEVEL = 3
# v1's default: zstd level 1 (the fast strategy), whose hash table is too small to
# remember a chunk's reference (see _referencing_parameters). Binary pair, chunk
# bytes / CPU seconds of compression (bench/bench_diff.py --pairs pairs, one core):
#   level 1, hash_log 14 (zstd's)  60.97 MB 1.15 s   level 3 (dfast, hash_log 17) 18.89 MB 1.63 s
#   level 1, hash_log 17           19.74 MB 1.22 s   level 4 (dfast, hash_log 18) 18.64 MB 2.38 s
# the text pair: level 1 with hash_log 17 4.61 MB, level 3 4.58 MB in 0.29 and 0.48 s.
DEFAULT_LEVEL_REFERENCING = 1
# From this level on, v1 searches OLD harder for what resembles a chunk: features 8
# times denser (one per 32 bytes, up to 64 a block) and 3 old blocks either side of a
# match instead of 1. Text pair at level 19, chunk bytes: 4.10 MB with a feature per
# 64 bytes (up to 32) and 2 blocks a side, 4.05 MB with these (26 against 19 CPU s).
# Measured and no better: 4 times as many references allowed (-0.03%), zstd's
# level 22 or target_length 999 (-0.01%), 4 MiB chunks (-0.8%). Its cap is lower
# than the default's: level 19's zstd contexts take about 150 MiB more than level
# 1's (peak RSS 321 against 170 MiB on the binary pair), and the whole must stay
# under 512 MiB for a 10 GiB image.
THOROUGH_LEVEL = 16
THOROUGH_SEARCH = {"anchor_rate": 32, "per_block": 64, "max_bytes": 96 << 20}
THOROUGH_SPREAD = 3
WINDOW_BYTES = 8 << 20          # read both images in windows of this size
DIRECTORY_BATCH = 1 << 16       # directory entries packed per step when writing
MIN_LEVEL, MAX_LEVEL = -7, zstandard.MAX_COMPRESSION_LEVEL
FORMATS = {"v0": VERSION, "v1": VERSION_REFERENCING}   # --format: superblock version


def default_chunk_blocks(block_size: int) -> int:
    return max(1, DEFAULT_CHUNK_BYTES // block_size)


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclasses.dataclass
class DiffStats:
    old_size: int
    new_size: int
    block_size: int
    chunk_blocks: int
    compression: str
    version: int = VERSION      # of the format: VERSION (dm-update) or VERSION_REFERENCING
    changed_blocks: int = 0
    n_chunks: int = 0
    chunks_bytes: int = 0       # compressed chunks, on disk
    directory_bytes: int = 0    # compressed directory, on disk
    identification_bytes: int = 0   # the identification trailer
    diff_size: int = 0
    seconds: float = 0.0

    @property
    def changed_bytes(self) -> int:
        return self.changed_blocks * self.block_size


def _check_params(compression: str, block_size: int, chunk_blocks: int, level: int) -> None:
    if compression not in COMPRESSIONS:
        raise UserError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if not (512 <= block_size <= 65536 and block_size & (block_size - 1) == 0):
        raise UserError(f"block size must be a power of two from 512 to 65536, got {block_size}")
    if chunk_blocks < 1 or chunk_blocks * block_size >= MAX_CHUNK_BYTES:
        raise UserError(f"chunk blocks must be >= 1 and chunk blocks * block size < 2 GiB, "
                        f"got {chunk_blocks}")
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise UserError(f"zstd level must be from {MIN_LEVEL} to {MAX_LEVEL}, got {level}")


def _open_image(path, what: str) -> tuple[int, int]:
    """(fd, size) of an image file or block device; UserError if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"cannot open {what} {os.fspath(path)}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise UserError(f"{what} {os.fspath(path)} is neither a regular file nor a block device")
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
    except OSError as e:
        os.close(fd)
        raise UserError(f"cannot read {what} {os.fspath(path)}: {e.strerror}") from None
    return fd, size


def _read_exact(fd: int, n: int, what: str) -> bytes:
    data = os.read(fd, n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.read(fd, n - got)
        if not more:
            raise UserError(f"{what} shrank while reading it (short read)")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Compressor:
    """Compresses chunks in a thread pool, one ZstdCompressor per thread (zstandard
    releases the GIL while compressing), with at most 2 * threads + 2 chunks and about
    INFLIGHT_BYTES pending; results come back in submission order. The same workers
    hash each chunk's new contents and each of its blocks' old contents for the
    identification trailer (hashlib releases the GIL too).

    (zstandard's multi_compress_to_buffer, one C call per batch of chunks, was measured
    too: slower, as every batch waits for its slowest chunk.)
    """

    INFLIGHT_BYTES = 64 << 20

    def __init__(self, compression: str, level: int, threads: int, chunk_bytes: int,
                 block_size: int, on_result: Callable[..., None], references=None):
        """`references(data) -> (runs, reference bytes)`, if given, makes version 1
        chunks: a header of runs, then a frame compressed against the reference;
        `on_result` then gets the reference's hash as a fourth argument."""
        self._on_result = on_result
        self._references = references
        self._block_size = block_size
        self._pending: collections.deque = collections.deque()
        self._compression = compression
        if compression == "zstd":
            self._level = level
            self._tls = threading.local()
            if references is not None:
                self._referencing_params = _referencing_parameters(level, chunk_bytes)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fusesnap-zstd")
        self._max_inflight = max(1, min(2 * threads + 2, self.INFLIGHT_BYTES // chunk_bytes))

    def _compress(self, data) -> bytes:
        if self._compression == "none":
            return data
        cctx = getattr(self._tls, "cctx", None)
        if cctx is None:
            cctx = self._tls.cctx = zstandard.ZstdCompressor(
                level=self._level, write_checksum=True, write_content_size=True)
        return cctx.compress(data)

    def _work(self, data: bytes, old: bytes) -> tuple[bytes, ...]:
        """(compressed chunk, hash of its new contents, the hashes of its old contents
        (v0: one per block; v1: one of them all)[, hash of the reference])."""
        if self._references is None:
            view, bs = memoryview(old), self._block_size
            old_hashes = b"".join(hash_block(view[o:o + bs]) for o in range(0, len(old), bs))
            return self._compress(data), hash_chunk(data), old_hashes
        runs, reference = self._references(data)
        if reference:
            cctx = zstandard.ZstdCompressor(
                compression_params=self._referencing_params, dict_data=zstandard.ZstdCompressionDict(
                    reference, dict_type=zstandard.DICT_TYPE_RAWCONTENT))
            frame = cctx.compress(data)
        else:
            frame = self._compress(data)
        return (pack_references(runs) + frame, hash_chunk(data), hash_chunk(old),
                hash_chunk(reference))

    def submit(self, data: bytes, old: bytes) -> None:
        """A chunk's new contents, and the old contents of its blocks."""
        self._pending.append(self._pool.submit(self._work, data, old))
        while len(self._pending) > self._max_inflight:
            self._on_result(*self._pending.popleft().result())

    def finish(self) -> None:
        while self._pending:
            self._on_result(*self._pending.popleft().result())

    def close(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _referencing_parameters(level: int, chunk_bytes: int) -> zstandard.ZstdCompressionParameters:
    """zstd's parameters of `level` for a chunk and its reference (up to
    REFERENCE_FACTOR chunks long), with a window that spans both and a hash table of
    at least 1/4 entry per byte of chunk: the fast levels' smaller ones forget most of
    the reference by the time the chunk is compressed (3 times larger chunks at level
    1, DEFAULT_LEVEL_REFERENCING)."""
    source_size = (1 + REFERENCE_FACTOR) * chunk_bytes
    zstds = zstandard.ZstdCompressionParameters.from_level(level, source_size=source_size)
    return zstandard.ZstdCompressionParameters.from_level(
        level, source_size=source_size,
        window_log=max(zstds.window_log, (source_size - 1).bit_length()),
        hash_log=max(zstds.hash_log, chunk_bytes.bit_length() - 3),
        write_checksum=1, write_content_size=1, write_dict_id=0)


class _WindowReader:
    """Reads OLD and NEW window by window in a background thread, a few windows ahead,
    so reading overlaps comparing. Iterating yields (old, new) bytes of equal length."""

    DEPTH = 2

    def __init__(self, old_fd: int, new_fd: int, size: int, window: int):
        self._queue: queue.Queue = queue.Queue(maxsize=self.DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(old_fd, new_fd, size, window),
                                        name="fusesnap-diff-reader", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, old_fd: int, new_fd: int, size: int, window: int) -> None:
        try:
            done = 0
            while done < size:
                n = min(window, size - done)
                item = (_read_exact(old_fd, n, "OLD"), _read_exact(new_fd, n, "NEW"))
                if not self._put(item):
                    return
                done += n
            self._put(None)
        except BaseException as e:   # handed to the consumer, raised there
            self._put(e)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _directory_pieces(dests: array, chunk_first: array, chunk_src: array, sentinel_dest: int,
                      sentinel_src: int) -> Iterator[bytes]:
    """Raw directory bytes in batches, sentinel last, without materializing it whole."""
    n_chunks = len(chunk_src)
    c = 0
    while c < n_chunks:
        srcs = array("Q")
        offsets = array("I")
        first = chunk_first[c]
        while c < n_chunks and len(srcs) < DIRECTORY_BATCH:
            count = chunk_first[c + 1] - chunk_first[c]
            srcs.extend(itertools.repeat(chunk_src[c], count))
            offsets.extend(range(count))
            c += 1
        yield pack_directory(dests[first:first + len(srcs)], srcs, offsets)
    yield pack_directory([sentinel_dest], [sentinel_src], [0])


def build_diff(old_path, new_path, out_path, *, compression: str = "zstd",
               block_size: int = DEFAULT_BLOCK_SIZE, chunk_blocks: int | None = None,
               level: int | None = None, threads: int | None = None,
               progress: Callable[[int, int, int], None] | None = None,
               diff_format: str = "v0") -> DiffStats:
    """Write the diff that turns OLD into NEW to `out_path`, atomically: the dm-update
    format (`diff_format` "v0") or fusesnap's version 1, whose chunks reference OLD.

    `progress(scanned_bytes, total_bytes, changed_blocks)` is called after each window.
    `level` defaults to DEFAULT_LEVEL for v0 and DEFAULT_LEVEL_REFERENCING for v1.
    Raises UserError for bad input (missing file, NEW larger than OLD, ...).
    """
    if level is None:
        level = DEFAULT_LEVEL_REFERENCING if diff_format == "v1" else DEFAULT_LEVEL
    if chunk_blocks is None:
        chunk_blocks = default_chunk_blocks(block_size)
    threads = threads or default_threads()
    _check_params(compression, block_size, chunk_blocks, level)
    if diff_format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {diff_format!r}")
    if diff_format == "v1" and compression != "zstd":
        raise UserError("format v1 compresses with zstd only (--algorithm none needs --format v0)")
    start_time = time.monotonic()
    old_fd, old_size = _open_image(old_path, "OLD")
    try:
        new_fd, new_size = _open_image(new_path, "NEW")
        try:
            if new_size > old_size:
                raise UserError(f"NEW ({new_size} bytes) is larger than OLD ({old_size} bytes): "
                                f"the update must fit the device")
            if new_size % block_size:
                raise UserError(f"NEW ({new_size} bytes) is not a multiple of the block size "
                                f"({block_size} bytes)")
            out_path = os.fspath(out_path)
            out_dir = os.path.dirname(os.path.abspath(out_path))
            if not os.path.isdir(out_dir):
                raise UserError(f"cannot write {out_path}: {out_dir} is not a directory")
            if os.path.isdir(out_path):
                raise UserError(f"cannot write {out_path}: it is a directory")
            for fd, what in ((old_fd, "OLD"), (new_fd, "NEW")):
                try:
                    st_out = os.stat(out_path)
                except OSError:
                    break
                st_in = os.fstat(fd)
                if (st_in.st_dev, st_in.st_ino) == (st_out.st_dev, st_out.st_ino):
                    raise UserError(f"DIFF {out_path} is the same file as {what}")
            stats = DiffStats(old_size, new_size, block_size, chunk_blocks, compression,
                              FORMATS[diff_format])
            try:
                _write_diff(old_fd, new_fd, out_path, stats, level, threads, progress)
            except OSError as e:   # EIO on an image, ENOSPC on the diff, ...
                raise UserError(f"cannot make {out_path}: {e.strerror or e}", EXIT_FAILED) from e
        finally:
            os.close(new_fd)
    finally:
        os.close(old_fd)
    stats.seconds = time.monotonic() - start_time
    return stats


def _write_diff(old_fd: int, new_fd: int, out_path: str, stats: DiffStats, level: int,
                threads: int, progress) -> None:
    out_dir = os.path.dirname(os.path.abspath(out_path))
    try:
        tmp_fd, tmp_path = tempfile.mkstemp(
            prefix=f".{os.path.basename(out_path)}.", suffix=".tmp", dir=out_dir)
    except OSError as e:
        raise UserError(f"cannot create a file in {out_dir}: {e.strerror}") from None
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(tmp_fd, 0o666 & ~umask)   # mkstemp makes it 0600; a diff is an ordinary file
        _fill_diff(old_fd, new_fd, tmp_fd, stats, level, threads, progress)
        # Ordering: the whole diff is durable before it takes DIFF's name, and the
        # directory is fsynced after the rename, so a crash leaves the old DIFF (or
        # none) or the complete new one, never a half diff under that name.
        os.fsync(tmp_fd)
        os.close(tmp_fd)
        tmp_fd = -1
        os.rename(tmp_path, out_path)
    except BaseException:
        if tmp_fd >= 0:
            os.close(tmp_fd)
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(out_dir)


def _fill_diff(old_fd: int, new_fd: int, out_fd: int, stats: DiffStats, level: int,
               threads: int, progress) -> None:
    if stats.version == VERSION_REFERENCING:
        return _fill_referencing_diff(old_fd, new_fd, out_fd, stats, level, threads, progress)
    bs = stats.block_size
    cb = stats.chunk_blocks
    chunk_bytes = cb * bs
    new_size = stats.new_size
    window = max(WINDOW_BYTES // bs, 1) * bs

    dests = array("Q")
    chunks = _ChunkWriter(out_fd)
    compressor = _Compressor(stats.compression, level, threads, chunk_bytes, bs, chunks.write)
    reader = _WindowReader(old_fd, new_fd, new_size, window)
    try:
        parts: list = []         # pieces of the chunk being filled
        old_parts: list = []     # the same blocks in OLD
        filled = 0               # blocks in it
        scanned = 0
        for old, new in reader:
            n = len(new)
            if old != new:
                # startswith(view, pos) compares in place: no copy of either block
                matches, oview = new.startswith, memoryview(old)
                offs = [o for o in range(0, n, bs) if not matches(oview[o:o + bs], o)]
                base = scanned // bs
                dests.extend([base + o // bs for o in offs])
                view = memoryview(new)
                k, m = 0, len(offs)
                while k < m:
                    take = min(cb - filled, m - k)
                    a, z = offs[k], offs[k + take - 1]
                    if z - a == (take - 1) * bs:        # consecutive blocks: one slice
                        parts.append(view[a:z + bs])
                        old_parts.append(oview[a:z + bs])
                    else:
                        parts.extend([view[o:o + bs] for o in offs[k:k + take]])
                        old_parts.extend([oview[o:o + bs] for o in offs[k:k + take]])
                    k += take
                    filled += take
                    if filled == cb:   # a copy: a chunk in flight must not pin a whole window
                        compressor.submit(b"".join(parts), b"".join(old_parts))
                        parts, old_parts, filled = [], [], 0
            scanned += n
            if progress is not None:
                progress(scanned, new_size, len(dests))
        if parts:
            compressor.submit(b"".join(parts), b"".join(old_parts))
        compressor.finish()
    finally:
        reader.close()
        compressor.close()

    _finish_diff(out_fd, stats, level, dests, chunks)


def _fill_referencing_diff(old_fd: int, new_fd: int, out_fd: int, stats: DiffStats,
                           level: int, threads: int, progress) -> None:
    """A version 1 diff, in two passes: the first finds the changed blocks and builds
    the similarity index over OLD (every block: references may be changed blocks,
    see fusesnap.formats.update_diff), the second compresses the changed blocks of
    NEW chunk by chunk against the OLD blocks the index finds, reading them back."""
    from fusesnap import similarity  # here: numpy costs every other command ~0.2 s to import
    bs = stats.block_size
    cb = stats.chunk_blocks
    new_size = stats.new_size
    window = max(WINDOW_BYTES // bs, 1) * bs
    old_blocks = stats.old_size // bs
    dests = array("Q")
    thorough = level >= THOROUGH_LEVEL
    index = similarity.SimilarityIndex(old_blocks, bs, **(THOROUGH_SEARCH if thorough else {}))
    spread = THOROUGH_SPREAD if thorough else 1
    reader = _WindowReader(old_fd, new_fd, new_size, window)
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fusesnap-index") as pool:
        try:
            scanned = 0
            for old, new in reader:
                if old != new:
                    matches, oview = new.startswith, memoryview(old)
                    base = scanned // bs
                    dests.extend([base + o // bs for o in range(0, len(new), bs)
                                  if not matches(oview[o:o + bs], o)])
                pending.append((scanned // bs, pool.submit(index.features, old)))
                while len(pending) > threads or (pending and pending[0][1].done()):
                    base, future = pending.popleft()
                    feats, blocks = future.result()
                    index.add(feats, blocks + base)
                scanned += len(new)
                if progress is not None:
                    progress(scanned // 2, new_size, len(dests))   # the first of two passes
            while pending:
                base, future = pending.popleft()
                feats, blocks = future.result()
                index.add(feats, blocks + base)
        finally:
            reader.close()
    # OLD's tail beyond NEW's size may be referenced too
    for at in range(new_size, old_blocks * bs, window):
        data = _read_at(old_fd, min(window, old_blocks * bs - at), at)
        feats, blocks = index.features(data)
        index.add(feats, blocks + at // bs)
    index.freeze()
    limit = REFERENCE_FACTOR * cb

    read_old = old_reader(old_fd, bs)

    def references(data: bytes) -> tuple[list[tuple[int, int]], bytes]:
        runs = similarity.runs_of(similarity.choose_references(index, data, limit, spread=spread))
        return runs, read_old(runs)

    chunks = _ChunkWriter(out_fd)
    compressor = _Compressor(stats.compression, level, threads, cb * bs, bs, chunks.write,
                             references)
    try:
        for first in range(0, len(dests), cb):
            chunk_dests = dests[first:first + cb]
            new_parts, old_parts = [], []
            for dest, count in similarity.runs_of(chunk_dests):
                new_parts.append(_read_at(new_fd, count * bs, dest * bs))
                old_parts.append(_read_at(old_fd, count * bs, dest * bs))
            compressor.submit(b"".join(new_parts), b"".join(old_parts))
            if progress is not None:
                progress(new_size // 2 + (new_size // 2) * (first + cb) // max(1, len(dests)),
                         new_size, len(dests))
        compressor.finish()
    finally:
        compressor.close()
    _finish_diff(out_fd, stats, level, dests, chunks)


class _ChunkWriter:
    """Writes compressed chunks one after the other from CHUNKS_OFFSET, and keeps
    what the directory and the identification trailer need of them."""

    def __init__(self, out_fd: int):
        self.out_fd = out_fd
        self.pos = CHUNKS_OFFSET         # where the next chunk goes
        self.chunk_src = array("Q")
        self.chunk_hashes = bytearray()
        self.old_hashes = bytearray()         # v0: per block; v1: per chunk
        self.reference_hashes = bytearray()   # version 1 only
        os.lseek(out_fd, CHUNKS_OFFSET, os.SEEK_SET)

    def write(self, data, new_hash: bytes, old_hashes: bytes, reference_hash: bytes = b"") -> None:
        self.chunk_src.append(self.pos)
        _write_all(self.out_fd, data)
        self.pos += len(data)
        self.chunk_hashes.extend(new_hash)
        self.old_hashes.extend(old_hashes)
        self.reference_hashes.extend(reference_hash)


FORMAT_NAMES = {VERSION: "dm-update version 0",
                VERSION_REFERENCING: "fusesnap version 1 (chunks reference OLD)"}


def old_reader(fd: int, block_size: int) -> Callable[[list[tuple[int, int]]], bytes]:
    """`read_old` of `DiffFile.decompress_chunk` over an open image of OLD."""
    def read_old(runs: list[tuple[int, int]]) -> bytes:
        return b"".join(_read_at(fd, count * block_size, first * block_size)
                        for first, count in runs)
    return read_old


def _read_at(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise UserError("an image shrank while reading it (short read)")
    return data


def _finish_diff(out_fd: int, stats: DiffStats, level: int, dests: array,
                 chunks: _ChunkWriter) -> None:
    """After the chunks: the directory, the identification trailer, then the superblock."""
    pos, chunk_src = chunks.pos, chunks.chunk_src
    if stats.version == VERSION_REFERENCING:
        identification = Identification(stats.old_size, stats.new_size, len(dests),
                                        bytes(chunks.chunk_hashes),
                                        reference_hashes=bytes(chunks.reference_hashes),
                                        version=IDENT_VERSION_CHUNK_OLD,
                                        old_chunk_hashes=bytes(chunks.old_hashes))
        old_block_hashes = b""
    else:
        identification = Identification(stats.old_size, stats.new_size, len(dests),
                                        bytes(chunks.chunk_hashes))
        old_block_hashes = chunks.old_hashes
    bs = stats.block_size
    cb = stats.chunk_blocks
    new_size = stats.new_size
    n_entries = len(dests)
    chunk_first = array("Q", range(0, n_entries, cb))
    chunk_first.append(n_entries)
    assert len(chunk_src) == len(chunk_first) - 1
    stats.changed_blocks = n_entries
    stats.n_chunks = len(chunk_src)
    stats.chunks_bytes = pos - CHUNKS_OFFSET

    dir_offset = pos
    sentinel_dest = new_size // bs
    dir_n = n_entries + 1
    pieces = _directory_pieces(dests, chunk_first, chunk_src, sentinel_dest, pos)
    if stats.compression == "zstd":
        cobj = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj(
            size=dir_n * ENTRY_SIZE)
        for piece in pieces:
            _write_all(out_fd, cobj.compress(piece))
        tail = cobj.flush()
        _write_all(out_fd, tail)
    else:
        for piece in pieces:
            _write_all(out_fd, piece)
    dir_size = os.lseek(out_fd, 0, os.SEEK_CUR) - dir_offset
    # The identification trailer goes after the directory, where the kernel loader
    # never looks (fusesnap.formats.update_diff explains the choice).
    trailer = identification.pack_trailer_head() + old_block_hashes
    _write_all(out_fd, trailer)
    sb = Superblock(block_bits=bs.bit_length() - 1, chunk_blocks=cb,
                    compression=stats.compression, dir_offset=dir_offset,
                    dir_compressed_size=dir_size, dir_n=dir_n, version=stats.version)
    os.pwrite(out_fd, sb.pack(), 0)
    stats.directory_bytes = dir_size
    stats.identification_bytes = len(trailer)
    stats.diff_size = dir_offset + dir_size + len(trailer)


# ---- command line ------------------------------------------------------------------------

def _block_size(text: str) -> int:
    value = positive_int(text)
    if not (512 <= value <= 65536 and value & (value - 1) == 0):
        raise argparse.ArgumentTypeError(f"must be a power of two from 512 to 65536, got {value}")
    return value


def add_diff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old", metavar="OLD", help="the image the device holds now")
    parser.add_argument("new", metavar="NEW", help="the image it should hold after the update "
                        "(not larger than OLD; a multiple of the block size)")
    parser.add_argument("-o", "--output", metavar="DIFF", required=True,
                        help="the diff to write (atomically: a temp file next to it is renamed)")
    parser.add_argument("--format", choices=tuple(FORMATS), default=None, dest="diff_format",
                        help="v1: fusesnap's, whose chunks are compressed against similar "
                        "data of OLD (default; several times smaller after an upgrade of "
                        "software; its merge keeps a scratch copy of the OLD blocks it "
                        "references in the state directory); v0: the dm-update kernel "
                        "target's format (the default with --algorithm none)")
    parser.add_argument("-a", "--algorithm", choices=COMPRESSIONS, default="zstd",
                        help="chunk and directory compression (default: zstd)")
    parser.add_argument("--block-size", type=_block_size, default=DEFAULT_BLOCK_SIZE,
                        help=f"block size in bytes, a power of two from 512 to 65536 "
                        f"(default: {DEFAULT_BLOCK_SIZE})")
    parser.add_argument("--chunk-blocks", type=positive_int, default=None,
                        help=f"blocks per compressed chunk (default: {DEFAULT_CHUNK_BYTES // 1024} KiB "
                        f"worth, {default_chunk_blocks(DEFAULT_BLOCK_SIZE)} blocks of "
                        f"{DEFAULT_BLOCK_SIZE}); larger compresses better, smaller makes "
                        f"random reads cheaper")
    parser.add_argument("--level", type=whole_number(MIN_LEVEL, MAX_LEVEL), default=None,
                        help=f"zstd compression level (default: {DEFAULT_LEVEL} for v0, "
                        f"{DEFAULT_LEVEL_REFERENCING} for v1)")
    parser.add_argument("-j", "--threads", type=positive_int, default=None,
                        help=f"compression threads (default: all cores, {default_threads()} here)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def default_format(compression: str) -> str:
    """--format when none is given: v1, which compresses with zstd only."""
    return "v1" if compression == "zstd" else "v0"


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so the temp file next to DIFF is removed.
    A BaseException, as KeyboardInterrupt is: the handler raises it wherever the main
    thread happens to be, and an `except Exception` there must not swallow it; where
    it is swallowed all the same (a finalizer ignores exceptions), the next progress
    step raises it again."""


_terminated = False


def _raise_terminated(signum, frame):
    global _terminated
    _terminated = True
    raise Terminated()


def run_diff(args) -> int:
    """`fusesnap diff`: a progress bar and a summary on stderr if it is a TTY (and not
    --quiet), silent otherwise. UserError for bad input; on SIGTERM, as on Ctrl-C, no
    temp file is left behind (exit status 143)."""
    from tqdm import tqdm  # here: importing it costs every other command ~0.1 s
    bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
               disable=True if args.quiet else None)   # None: only on a terminal
    on_terminal = not bar.disable  # (closing the bar sets bar.disable)

    def progress(scanned: int, total: int, changed: int) -> None:
        if _terminated:   # the handler's exception was swallowed where it landed
            raise Terminated()
        bar.total = total
        bar.set_postfix_str(f"{changed:,} changed blocks", refresh=False)
        bar.update(scanned - bar.n)

    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with bar:
            stats = build_diff(args.old, args.new, args.output, compression=args.algorithm,
                               block_size=args.block_size, chunk_blocks=args.chunk_blocks,
                               level=args.level, threads=args.threads, progress=progress,
                               diff_format=args.diff_format or default_format(args.algorithm))
    except Terminated:
        raise UserError("terminated", 128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if on_terminal:
        ratio = stats.changed_bytes / stats.chunks_bytes if stats.chunks_bytes else 0.0
        print(f"{args.output}: {stats.changed_blocks} of {stats.new_size // stats.block_size} "
              f"blocks changed, {stats.n_chunks} chunks, {stats.diff_size} bytes "
              f"(chunk compression ratio {ratio:.2f}) in {stats.seconds:.1f} s", file=sys.stderr)
    return EXIT_OK


def add_diff_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("diff", metavar="DIFF", help="the diff to describe")
    parser.add_argument("--verify", action="store_true",
                        help="decompress every chunk and check every rule of the format")
    parser.add_argument("--old", metavar="OLD", type=arguments.path,
                        help="the image the diff applies to: --verify of a v1 diff reads the "
                        "blocks its chunks reference from it")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def diff_info(diff: DiffFile) -> dict:
    sb = diff.superblock
    chunks_bytes = sum(diff.chunk_extent(c)[1] for c in range(diff.n_chunks))
    changed_bytes = diff.total_blocks * diff.block_size
    return {
        "path": diff.path,
        "version": sb.version,
        "block_size": diff.block_size,
        "block_bits": diff.block_bits,
        "chunk_blocks": diff.chunk_blocks,
        "compression": diff.compression,
        "dir_offset": sb.dir_offset,
        "dir_compressed_size": sb.dir_compressed_size,
        "dir_n": sb.dir_n,
        "changed_blocks": diff.total_blocks,
        "changed_bytes": changed_bytes,
        "chunks": diff.n_chunks,
        "chunks_bytes": chunks_bytes,
        "file_size": diff.file_size,
        "sentinel_dest": diff.sentinel_dest,
        "identified": diff.identification is not None,
        "trailer_version": diff.identification.version if diff.identification else None,
        "old_size": diff.identification.old_size if diff.identification else None,
        "new_size": diff.new_size,
        "compression_ratio": round(changed_bytes / chunks_bytes, 3) if chunks_bytes else None,
    }


def open_diff(path, *, bad_diff_status: int) -> DiffFile:
    """DiffFile.open for a user's argument: a missing or unreadable file is bad input
    (exit 2); a diff that breaks a rule exits with `bad_diff_status`."""
    try:
        return DiffFile.open(path)
    except FileNotFoundError:
        raise UserError(f"no such diff: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except DiffFormatError as e:
        raise UserError(_what_is_wrong(path, e), bad_diff_status) from None


def _what_is_wrong(path, error: DiffFormatError) -> str:
    """The one-line reason a diff was refused, named after the file: 'FILE is not an
    update diff', 'FILE is truncated (N of M bytes)', or 'FILE: <the broken rule>'."""
    if isinstance(error, TruncatedDiff):
        return f"{path} is truncated ({error.size} of {error.expected} bytes)"
    try:
        with open(path, "rb") as f:
            head = f.read(SUPERBLOCK_SIZE)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return f"{path}: {error}"
    if not head or not head.startswith(MAGIC[:len(head)]):
        return f"{path} is not an update diff (made by `fusesnap diff`)"
    if len(head) < SUPERBLOCK_SIZE:
        return f"{path} is truncated ({size} bytes, shorter than its {SUPERBLOCK_SIZE}-byte header)"
    try:
        superblock = Superblock.unpack(head)
    except DiffFormatError:
        return f"{path}: {error}"
    expected = superblock.dir_offset + superblock.dir_compressed_size
    if expected > size and superblock.dir_offset >= SUPERBLOCK_SIZE:
        return f"{path} is truncated ({size} of {expected} bytes)"
    return f"{path}: {error}"


def run_diff_info(args) -> int:
    diff = open_diff(args.diff, bad_diff_status=EXIT_FAILED)
    with diff:
        info = diff_info(diff)
        if args.verify:
            read_old = None
            if args.old is not None:
                old_fd, _ = _open_image(args.old, "OLD")
                read_old = old_reader(old_fd, diff.block_size)
            elif diff.version == VERSION_REFERENCING:
                raise UserError(f"{args.diff} is a v1 diff: --verify needs --old OLD, the image "
                                "its chunks reference")
            try:
                diff.verify(read_old)
            except DiffFormatError as e:
                raise UserError(str(e), EXIT_FAILED) from None
            except OSError as e:
                raise UserError(f"cannot read {args.diff}: {e.strerror}", EXIT_FAILED) from None
            finally:
                if read_old is not None:
                    os.close(old_fd)
            info["verified"] = True
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    mib = 2 ** 20
    print(f"diff:          {info['path']}")
    print(f"format:        {FORMAT_NAMES[info['version']]}, {info['compression']}")
    print(f"block size:    {info['block_size']} bytes (block_bits {info['block_bits']})")
    print(f"chunk size:    {info['chunk_blocks']} blocks "
          f"({info['chunk_blocks'] * info['block_size'] // 1024} KiB)")
    print(f"changed:       {info['changed_blocks']} blocks ({info['changed_bytes'] / mib:.1f} MiB)")
    print(f"chunks:        {info['chunks']} ({info['chunks_bytes'] / mib:.1f} MiB compressed)")
    print(f"directory:     {info['dir_n']} entries with sentinel, {info['dir_compressed_size']} "
          f"bytes at {info['dir_offset']}")
    print(f"file size:     {info['file_size']} bytes")
    print(f"applies to:    OLD of {info['old_size']} bytes, makes NEW of {info['new_size']} bytes "
          f"(identification trailer version {info['trailer_version']})"
          if info["identified"] else "applies to:    unknown (no identification trailer)")
    ratio = info["compression_ratio"]
    print(f"ratio:         {ratio:.2f}" if ratio is not None else "ratio:         -")
    if args.verify:
        print("verify:        ok (every chunk decompressed, every rule checked)")
    return EXIT_OK
