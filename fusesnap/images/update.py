"""`system.img`: the update overlay (after dm-update).

The system device as it will be after an update: blocks the diff changes come from
the diff, every other block from the device, while a background task merges the
diff into the device. When the merge is complete the device *is* the new image.

State (plain attributes, see `UpdateImage.__init__`):
  pending        RangeMap block -> (chunk_index, delta): blocks whose new data must
                 still come from the diff; block b sits at offset b - delta of its
                 chunk. Runs of consecutive blocks in one chunk are one range.
  merged_chunks  chunks [0, merged_chunks) are written to the device (directory
                 order); their blocks are no longer in `pending`.
  state          merging | paused | done | disabled | error

Concurrency: everything runs on the trio thread except the blocking work handed to
worker threads (reading and decompressing chunks, writing and fsyncing the device),
which never touches `pending`. `pending` changes only in `_merged()`, with no await.

Crash safety: the merge writes a chunk's blocks only after the whole chunk
decompressed and passed its checks (the zstd content checksum `fusesnap diff`
writes, the frame's size), so the device never holds new data from a bad chunk.
Progress is persisted only after an fsync of the device (see `_persist`), so the
progress file never claims more than is durable. A restart resumes from the
persisted chunk, after checking that the last merged chunk really is on the device;
restarting from zero is always safe too, because merging is idempotent: a block's
new data is the same whenever it is written, and until a chunk is merged its blocks
are read from the diff, never from the device.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import logging
import os
import time

import trio
from tqdm import tqdm

from .. import arguments
from ..control import read_status, require_image, send_command
from ..devices import BlockDevice, resolve_device_path
from ..diffing import open_diff
from ..errors import EXIT_FAILED, EXIT_USAGE, UserError
from ..formats.update_diff import DiffFile, DiffFormatError
from ..rangemap import RangeMap
from .base import Image

log = logging.getLogger(__name__)

PERSIST_INTERVAL = 3.0          # seconds between progress checkpoints while merging
# Decompressed chunks kept for reads. A random read of a changed block outside the
# cache decompresses its whole chunk (512 KiB by default: 1-2 ms), so the cache should
# hold the diff's hot set; 256 MiB holds every changed block of a 1 GiB image with a
# quarter of its blocks changed. Memory is only taken as chunks are read.
DEFAULT_CACHE_MIB = 256


class ChunkCache:
    """LRU of decompressed chunks. Concurrent reads of one chunk share one
    decompression, which runs in a worker thread."""

    def __init__(self, diff: DiffFile, capacity_bytes: int, limiter: trio.CapacityLimiter):
        self.diff = diff
        chunk_bytes = diff.chunk_blocks * diff.block_size
        self.capacity = max(16, capacity_bytes // max(1, chunk_bytes))  # in chunks, at least 16
        self.limiter = limiter
        self._chunks: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._loading: dict[int, trio.Event] = {}
        self.merged: set[int] = set()

    def _load(self, chunk_index: int) -> bytes:
        return self.diff.decompress_chunk(chunk_index, self.diff.read_chunk_raw(chunk_index))

    def forget(self, chunk_index: int) -> None:
        """The chunk is merged: its blocks are read from the device now."""
        self.merged.add(chunk_index)
        self._chunks.pop(chunk_index, None)

    async def get(self, chunk_index: int) -> bytes:
        while True:
            data = self._chunks.get(chunk_index)
            if data is not None:
                self._chunks.move_to_end(chunk_index)
                return data
            loading = self._loading.get(chunk_index)
            if loading is None:
                break
            await loading.wait()  # then look again: loaded, or failed (and we retry)
        done = self._loading[chunk_index] = trio.Event()
        try:
            data = await trio.to_thread.run_sync(self._load, chunk_index, limiter=self.limiter)
        finally:
            del self._loading[chunk_index]
            done.set()
        if chunk_index in self.merged:
            return data  # merged while we decompressed: the device serves it from now on
        self._chunks[chunk_index] = data
        if len(self._chunks) > self.capacity:
            self._chunks.popitem(last=False)
        return data


class MergeProgress:
    """The persisted merge progress of one (diff, device) pair: `<DIFF>.progress`.

    JSON written with write-temp, fsync, rename, fsync-directory, so it is either the
    old or the new version after a crash. It names the diff (a fingerprint of its
    header and directory, its size and mtime) and the device (path and size). A
    progress file of another diff or device that merged anything is refused: the
    device may be half-updated by that other diff, and no read could be trusted.
    """

    def __init__(self, diff: DiffFile, device: BlockDevice):
        self.path = diff.path + ".progress"
        st = os.stat(diff.path)
        self.identity = {"diff": diff.fingerprint(), "diff_size": st.st_size,
                         "diff_mtime_ns": st.st_mtime_ns,
                         "device": device.path, "device_size": device.size}

    def load(self) -> int:
        """Chunks already merged (0 if none); UserError if the file is not ours."""
        try:
            with open(self.path) as f:
                saved = json.load(f)
            merged = saved["merged_chunks"]
            identity = saved["identity"]
            if not isinstance(merged, int) or merged < 0:
                raise ValueError(f"bad merged_chunks {merged!r}")
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"unreadable merge progress {self.path} ({exc}): "
                            "delete it only if the device was never merged into") from None
        if identity != self.identity:
            if merged == 0:
                return 0
            raise self.mismatch(f"records {merged} merged chunks of another diff or device")
        return merged

    def mismatch(self, what: str) -> UserError:
        return UserError(f"{self.path} {what}: the device may be half-updated. If "
                         f"{self.identity['device']} is back to OLD, delete {self.path}; "
                         "otherwise finish the merge with the diff that started it")

    def save(self, merged_chunks: int) -> None:
        """Blocking. The caller has fsync'ed the device first."""
        temp = self.path + ".tmp"
        with open(temp, "w") as f:
            json.dump({"identity": self.identity, "merged_chunks": merged_chunks}, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, self.path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class UpdateImage(Image):
    target = "update"
    status_line_keys = ("merged", "total", "state")
    control_verbs = ("update",)

    def __init__(self, device: BlockDevice, diff: DiffFile, *, background_merge: bool = True,
                 merge_rate: float = 0.0, cache_bytes: int = DEFAULT_CACHE_MIB << 20,
                 name: str = "system.img"):
        super().__init__(name, device.size, read_only=True)
        self.device = device
        self.diff = diff
        self.block_size = diff.block_size
        self.progress = MergeProgress(diff, device)
        self.merged_chunks = self.persisted_chunks = min(self.progress.load(), diff.n_chunks)
        if self.merged_chunks and not self._chunk_is_on_device(self.merged_chunks - 1):
            raise self.progress.mismatch(f"says {self.merged_chunks} chunks are merged, "
                                         "but the last of them is not on the device")
        # Runs come sorted and maximal, so this bulk-loads. No value index: values
        # are nearly all distinct.
        self.pending = RangeMap.from_ranges(
            ((dest, dest + n_blocks, (chunk_index, dest - first_offset))
             for dest, n_blocks, chunk_index, first_offset in diff.runs()
             if chunk_index >= self.merged_chunks),
            index_values=False)
        self.merged_blocks = (diff.entry_range_of_chunk(self.merged_chunks)[0]
                              if self.merged_chunks < diff.n_chunks else diff.total_blocks)
        self.merge_rate = merge_rate  # bytes of changed blocks per second; 0 = unlimited
        self.limiter = trio.CapacityLimiter(2)
        self.cache = ChunkCache(diff, cache_bytes, self.limiter)
        self.error: str | None = None
        self.last_read = -1.0  # trio clock of the latest read: the merge yields to reads
        self.unpaused = trio.Event()
        self.unpaused.set()
        if self.merged_chunks == diff.n_chunks:
            self.state = "done"
        else:
            self.state = "merging" if background_merge else "disabled"

    # -- reads --------------------------------------------------------------------

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        self.last_read = trio.current_time()
        if not self.pending:
            return self.device.pread(end - offset, offset)
        bs = self.block_size
        # A list, not the live iterator: the merge may change `pending` while we await.
        from_diff = self.pending.overlapping(offset // bs, (end - 1) // bs + 1)
        if not from_diff:
            return self.device.pread(end - offset, offset)
        # One pread for the whole request, then the diff's blocks laid over it: far
        # cheaper than a pread per gap when changed blocks are scattered.
        data = bytearray(end - offset)
        self.device.pread_into(data, offset)
        for first_block, end_block, (chunk_index, delta) in from_diff:
            lo, hi = max(offset, first_block * bs), min(end, end_block * bs)
            try:
                chunk = await self.cache.get(chunk_index)
            except DiffFormatError as exc:
                self._fail(str(exc))
                raise OSError(errno.EIO, str(exc)) from None
            at = (first_block - delta) * bs + (lo - first_block * bs)
            data[lo - offset:hi - offset] = chunk[at:at + hi - lo]
        return data

    # -- the background merge -----------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        if self.state in ("merging", "paused"):  # a paused merge waits in its task
            nursery.start_soon(self._merge_or_fail)

    async def _merge_or_fail(self) -> None:
        """The merge task: whatever goes wrong stops the merge, never the mount."""
        try:
            await self._merge()
        except (DiffFormatError, OSError) as exc:
            self._fail(f"merge stopped: {exc}")
        except Exception as exc:
            log.exception("%s: merge failed unexpectedly", self.name)
            self._fail(f"merge stopped: {exc!r}")

    async def _merge(self) -> None:
        log.info("%s: merging %s into %s from chunk %d of %d", self.name, self.diff.path,
                 self.device.path, self.merged_chunks, self.diff.n_chunks)
        last_persist = trio.current_time()
        while self.merged_chunks < self.diff.n_chunks:
            while not self.unpaused.is_set():  # a loop: pause/resume/pause replaces the event
                await self._persist()  # progress is saved at every pause
                await self.unpaused.wait()
            if self.state == "error":  # a read found a bad chunk
                await self._persist()
                return
            chunk_index = self.merged_chunks
            started = trio.current_time()
            written = await trio.to_thread.run_sync(self._write_chunk, chunk_index,
                                                    limiter=self.limiter)
            self._merged(chunk_index)
            if trio.current_time() - last_persist >= PERSIST_INTERVAL:
                await self._persist()
                last_persist = trio.current_time()
            if self.merge_rate:
                await trio.sleep_until(started + written / self.merge_rate)
            elif self.last_read >= started:
                # Foreground reads came in meanwhile: give them as much time as this
                # chunk took, so they keep at least about half their speed.
                await trio.sleep(trio.current_time() - started)
            else:
                await trio.sleep(0)  # let waiting requests in between chunks
        await self._persist()
        self.state = "done"
        log.info("%s: merge complete (%d blocks)", self.name, self.merged_blocks)

    def _write_chunk(self, chunk_index: int) -> int:
        """Worker thread: decompress a whole chunk (checksum verified), then write its
        blocks. Nothing is written unless the whole chunk is good."""
        data = self.diff.decompress_chunk(chunk_index, self.diff.read_chunk_raw(chunk_index))
        bs, written = self.block_size, 0
        for dest, n_blocks, first_offset in self.diff.chunk_runs(chunk_index):
            self.device.pwrite(memoryview(data)[first_offset * bs:(first_offset + n_blocks) * bs],
                               dest * bs)
            written += n_blocks * bs
        return written

    def _chunk_is_on_device(self, chunk_index: int) -> bool:
        """Does the device hold this chunk's new blocks? (Checks progress on restart.)"""
        data = self.diff.decompress_chunk(chunk_index, self.diff.read_chunk_raw(chunk_index))
        bs = self.block_size
        return all(self.device.pread(n_blocks * bs, dest * bs)
                   == data[first_offset * bs:(first_offset + n_blocks) * bs]
                   for dest, n_blocks, first_offset in self.diff.chunk_runs(chunk_index))

    def _merged(self, chunk_index: int) -> None:
        """The chunk's blocks are in the device (its page cache, coherent for our reads):
        serve them from there from now on. No await: atomic for concurrent reads."""
        for dest, n_blocks, _ in self.diff.chunk_runs(chunk_index):
            self.pending.clear(dest, dest + n_blocks)
        first, end = self.diff.entry_range_of_chunk(chunk_index)
        self.merged_blocks += end - first
        self.merged_chunks = chunk_index + 1
        self.cache.forget(chunk_index)

    async def _persist(self) -> None:
        merged_chunks = self.merged_chunks
        if merged_chunks != self.persisted_chunks:
            await trio.to_thread.run_sync(self._persist_blocking, merged_chunks, limiter=self.limiter)
            self.persisted_chunks = merged_chunks

    def _persist_blocking(self, merged_chunks: int) -> None:
        # Order matters: the device's merged blocks must be durable before the
        # progress file says they are merged; a crash in between only repeats work.
        self.device.fsync()
        self.progress.save(merged_chunks)

    def _fail(self, reason: str) -> None:
        if self.state != "error":
            log.error("%s: %s", self.name, reason)
        self.state, self.error = "error", reason
        self.unpaused.set()

    # -- control, status, teardown -----------------------------------------------

    def control(self, verb: str, args: list[str]) -> str:
        if args == ["pause"]:
            if self.state == "merging":
                self.state = "paused"
                self.unpaused = trio.Event()
        elif args == ["resume"]:
            if self.state == "paused":
                self.state = "merging"
                self.unpaused.set()
        else:
            raise ValueError(f"update takes pause or resume, not {' '.join(args)!r}")
        return self.state

    def status(self) -> dict:
        return {"merged": self.merged_blocks, "total": self.diff.total_blocks, "state": self.state,
                "diff": self.diff.path, "device": self.device.path, "error": self.error}

    # -- live upgrade ----------------------------------------------------------------

    def handover_fds(self) -> dict[str, int]:
        return {self.device.path: self.device.fd}

    def handover_state(self) -> dict:
        """Where the merge stands. The successor opened the image from the persisted
        progress (at most PERSIST_INTERVAL behind) and catches up from here."""
        return {**super().handover_state(), "device": self.device.path, "diff": self.diff.path,
                "merged_chunks": self.merged_chunks, "state": self.state, "error": self.error}

    def restore_handover_state(self, state: dict) -> None:
        self.check_handover_state(state)
        if (state["device"], state["diff"]) != (self.device.path, self.diff.path):
            raise ValueError(f"{self.name}: handed over for {state['device']} with "
                             f"{state['diff']}, but opened {self.device.path} with {self.diff.path}")
        merged_chunks = state["merged_chunks"]
        if not self.merged_chunks <= merged_chunks <= self.diff.n_chunks:
            raise ValueError(f"{self.name}: handed over with {merged_chunks} merged chunks, "
                             f"but {self.merged_chunks} are persisted or merged, of {self.diff.n_chunks}")
        # The chunks merged since the last persist are on the device (its page cache,
        # shared with the old server): serve them from there, as the old server did.
        for chunk_index in range(self.merged_chunks, merged_chunks):
            self._merged(chunk_index)
        self.state, self.error = state["state"], state["error"]
        if self.state == "paused":
            self.unpaused = trio.Event()

    async def close(self) -> None:
        try:
            await self._persist()
        finally:
            self.diff.close()
            self.device.close()


def add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("update overlay (system.img)")
    group.add_argument("--system", metavar="DEV", type=arguments.device,
                       help="the system device the update applies to")
    group.add_argument("--diff", metavar="DIFF", type=arguments.path,
                       help="the update diff made by `fusesnap diff`")
    group.add_argument("--no-bg-update", action="store_true",
                       help="serve system.img from the diff without merging it into DEV")
    group.add_argument("--merge-rate", type=arguments.positive_number, default=0.0, metavar="MB/s",
                       help="limit the background merge to this many MB/s of changed blocks, "
                       "a number > 0 (default: unlimited; to stop the merge, use "
                       "`fusesnap update pause`)")
    group.add_argument("--cache-mib", type=arguments.positive_int, default=DEFAULT_CACHE_MIB,
                       metavar="MIB", help=f"cache of decompressed chunks (default "
                       f"{DEFAULT_CACHE_MIB} MiB, at least 16 chunks)")


USAGE_EXAMPLES = """\
  fusesnap diff old.img new.img -o update.diff                # on the build machine
  fusesnap mount mnt --system /dev/sda1 --diff update.diff    # mnt/system.img reads as new.img
  losetup --find --show --read-only mnt/system.img            # while the diff merges into sda1
  fusesnap update wait mnt                                    # until the merge is done"""


def add_commands(commands) -> None:
    p = commands.add_parser(
        "update", help="pause, resume or wait for the background merge of system.img",
        description="Pause or resume the background merge of system.img, or wait until it "
        "is done (a progress bar on a terminal; exit status 1 if the merge stops in error).")
    p.add_argument("action", choices=("pause", "resume", "wait"))
    p.add_argument("mountpoint", metavar="MOUNTPOINT", type=arguments.path)
    p.set_defaults(run=cmd_update)


def cmd_update(args) -> int:
    require_image(args.mountpoint, "update", "mount it with --system and --diff")
    if args.action == "wait":
        return wait_for_merge(args.mountpoint)
    send_command(args.mountpoint, f"update {args.action}")
    return 0


WAIT_POLL_SECONDS = 0.5


def wait_for_merge(mountpoint: str) -> int:
    """Block until system.img's merge is done; exit status 1 (UserError) with the
    reason if it stops in error, is not running, or the mount goes away. Progress
    (blocks merged, rate, time left) is a tqdm bar on a terminal, nothing otherwise."""
    with tqdm(unit=" blocks", disable=None, dynamic_ncols=True) as bar:  # None: only on a terminal
        while True:
            try:
                images = json.loads(read_status(mountpoint, True))["images"]
            except UserError:
                raise UserError(f"{mountpoint} went away before the merge was done",
                                EXIT_FAILED) from None
            name, figures = next((name, figures) for name, figures in images.items()
                                 if figures["target"] == "update")
            bar.total = figures["total"]
            bar.update(figures["merged"] - bar.n)
            bar.set_postfix_str(figures["state"])
            if figures["state"] == "done":
                return 0
            if figures["state"] == "error":
                raise UserError(f"{name}: {figures['error']}", EXIT_FAILED)
            if figures["state"] == "disabled":
                raise UserError(f"{name} does not merge (mounted with --no-bg-update)", EXIT_FAILED)
            time.sleep(WAIT_POLL_SECONDS)


def images_from_args(args: argparse.Namespace) -> list[Image]:
    if not args.system and not args.diff:
        return []
    if not (args.system and args.diff):
        raise UserError("--system DEV and --diff DIFF go together")
    # Absolute: the server leaves the current directory, and the progress file is
    # named after the diff.
    diff = open_diff(os.path.abspath(args.diff), bad_diff_status=EXIT_USAGE)
    device = None
    try:
        device = BlockDevice(resolve_device_path(args.system), read_only=args.no_bg_update)
        try:
            diff.check_device(device.size, device.logical_block_size)
        except DiffFormatError as exc:
            raise UserError(f"{args.diff} does not fit {device.path}: {exc}") from None
        if not args.no_bg_update:
            if device.read_only:
                raise UserError(f"{device.path} is read-only: the merge needs to write it "
                                "(use --no-bg-update to serve system.img without merging)")
            if not os.access(os.path.dirname(diff.path), os.W_OK):
                raise UserError(f"cannot save merge progress beside {diff.path}: its directory "
                                "is not writable (use --no-bg-update to serve without merging)")
        try:
            return [UpdateImage(device, diff, background_merge=not args.no_bg_update,
                                merge_rate=args.merge_rate * 1e6,
                                cache_bytes=args.cache_mib << 20)]
        except DiffFormatError as exc:  # checking the progress met a bad chunk
            raise UserError(f"{diff.path}: {exc}") from None
    except BaseException:
        diff.close()
        if device is not None:
            device.close()
        raise
