"""The mount server: opens the images, mounts them over FUSE and serves until unmounted.

Life cycle (all inside one `trio.run`, teardown in one `AsyncExitStack`):
  open images -> pyfuse3.init (the mount appears) -> start image background tasks
  -> tell the waiting CLI "ready" -> pyfuse3.main until the kernel ends the session
  (`fusesnap umount`) or SIGTERM/SIGINT -> stop background tasks -> flush and close
  images -> pyfuse3.close.

`run_server` runs in the foreground; `spawn_server` starts it as a detached child
and waits on a pipe (`ReadyChannel`) until it is serving or has failed, so `fusesnap
mount` returns only once the mount is usable, printing the server's start-up warnings
on the way.

Discards: a loop device sends them as fallocate requests, which only a pyfuse3 built
with `fusesnap/pyfuse3_patches/` passes on (`discards_supported`). Without it an image
that needs discards is refused and the others mount with a warning.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import logging.handlers
import os
import shlex
import signal
import subprocess
import sys
from typing import Sequence

import pyfuse3
import trio

from .errors import EXIT_FAILED, UserError
from .fs import FuseOperations
from .images.base import Image
from .supervisor import Link
from .upgrade import HandOver, device_descriptors

log = logging.getLogger(__name__)

READY = "ready"
WARNING = "warning"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def discards_supported() -> bool:
    """Does this pyfuse3 pass fallocate requests (discards from loop devices) on?
    Only one built with fusesnap's patches does; stock pyfuse3 answers them ENOSYS."""
    return hasattr(pyfuse3, "fuse_fallocate_async")


def pyfuse3_fix_command() -> str:
    """The command that installs the patched pyfuse3 into this Python environment."""
    return f"{shlex.quote(sys.executable)} -m fusesnap.pyfuse3_build"


def discards_report() -> str:
    """One line: whether discards work, and if not, what fixes it."""
    where = os.path.dirname(pyfuse3.__file__)
    if discards_supported():
        return f"discards: supported (pyfuse3 {pyfuse3.__version__} with fallocate, {where})"
    return (f"discards: NOT supported (pyfuse3 {pyfuse3.__version__} in {where} has no fallocate "
            f"handler); fix: {pyfuse3_fix_command()}")


def check_discards(images: list[Image]) -> None:
    """Refuse (UserError, exit 2) images that need discards when pyfuse3 cannot pass
    them on; warn for the others, whose discards (fstrim, blkdiscard) would fail."""
    if discards_supported():
        return
    needing = [image.name for image in images if image.needs_discards]
    if needing:
        raise UserError(f"{', '.join(needing)} cannot work without discards, and this pyfuse3 "
                        f"has no fallocate handler; fix: {pyfuse3_fix_command()}")
    log.warning("this pyfuse3 has no fallocate handler: discards through loop devices "
                "(fstrim, blkdiscard) will fail; fix: %s", pyfuse3_fix_command())


class ReadyChannel:
    """The pipe from a starting server to the `fusesnap mount` waiting for it: lines
    `warning <text>`, then `ready` or `<exit status> <one-line reason>`. Without a pipe
    (`--foreground` typed by a user) every method does nothing."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def _send(self, line: str) -> None:
        if self.fd is not None:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def warn(self, text: str) -> None:
        self._send(f"{WARNING} {text}")

    def ready(self) -> None:
        self._send(READY)
        self._close()

    def failed(self, error: UserError) -> None:
        self._send(f"{error.exit_status} {error}")
        self._close()


class _WarningsToChannel(logging.Handler):
    """Forwards start-up warnings to the waiting `fusesnap mount` (and nothing once
    the channel is closed), so they reach the user's terminal, not only the log."""

    def __init__(self, channel: ReadyChannel):
        super().__init__(logging.WARNING)
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        self.channel.warn(record.getMessage())


class MountServer:
    """A running mount: its images and the control commands it answers."""

    def __init__(self, mountpoint: str, images: list[Image], *, workers: int, debug: bool):
        self.mountpoint = mountpoint
        self.images = images
        self.workers = max(workers, *(image.concurrent_requests for image in images))
        self.debug = debug
        self.handover = HandOver(self)  # live upgrade: fusesnap/upgrade.py
        self.link = Link.from_environment()  # crash failover: fusesnap/supervisor.py
        self.operations: FuseOperations | None = None

    def files(self) -> list[tuple[str, Image]]:
        return [entry for image in self.images for entry in image.files()]

    async def control(self, command: str) -> None:
        """Run a control command from the CLI (setxattr on the root). ValueError if bad."""
        log.info("control: %s", command)
        words = command.split()
        if not words:
            raise ValueError("empty command")
        verb, args = words[0], words[1:]
        if verb == "flush":
            for image in self.images:
                await image.flush()
            return
        takers = [image for image in self.images if verb in image.control_verbs]
        if not takers:
            raise ValueError(f"no image in this mount takes '{verb}' commands")
        try:
            for image in takers:
                answer = image.control(verb, args)
                if inspect.isawaitable(answer):
                    await answer
        finally:
            if self.operations is not None:
                self.operations.set_files(self.files())  # images may have come or gone

    async def serve(self, on_ready) -> None:
        operations = self.operations = FuseOperations(self.files(), self.control,
                                                      {"discards": discards_supported()})
        operations.status.server_status = self.server_status
        options = set(pyfuse3.default_options)
        options |= {"fsname=fusesnap", "subtype=fusesnap"}
        if self.debug:
            options.add("debug")
        async with contextlib.AsyncExitStack() as stack:
            # Registered first so it runs last: images are flushed and closed only
            # after the FUSE session and every background task have stopped.
            stack.push_async_callback(self._close_images)
            self.handover.open_session(operations, self.mountpoint, options)
            # unmount=False: after a normal `umount` the kernel has already ended the
            # session; after SIGTERM, _stop_on_signal has unmounted lazily.
            stack.callback(pyfuse3.close, unmount=False)
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            nursery.start_soon(self._stop_on_signal)
            await self.handover.start(nursery)  # the images' background tasks, and upgrades
            if self.link is not None:
                nursery.start_soon(self.link.report, self, *device_descriptors(self.images))
            on_ready()
            log.info("serving on %s (%s)", self.mountpoint, discards_report())
            for line in operations.status.as_text().splitlines():
                log.info("serving %s", line)
            await self.handover.serve(max_tasks=self.workers)
            if self.link is not None and not self.handover.handed_over:
                self.link.exiting()  # the session ended: nothing for the supervisor to take over
            log.info("handed over" if self.handover.handed_over else "FUSE session ended")

    def server_status(self) -> dict:
        return {**self.handover.status(),
                "supervisor_pid": self.link.supervisor_pid if self.link else None}

    async def _stop_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                await trio.run_process(["umount", "-l", self.mountpoint], check=False)
                pyfuse3.terminate()
                return

    async def _close_images(self) -> None:
        if not self.handover.owns_images:
            return  # handed over (or not yet taken over): another server uses them
        for image in self.images:
            try:
                await image.close()
            except Exception:
                log.exception("closing %s failed", image.name)


def setup_logging(debug: bool, log_path: str | None, channel: ReadyChannel) -> None:
    """Log to `log_path` (reopened when logrotate moves it away) or to stderr, and
    forward warnings to `channel` until the mount is ready."""
    if log_path:
        handler: logging.Handler = logging.handlers.WatchedFileHandler(log_path)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.addHandler(handler)
    root.addHandler(_WarningsToChannel(channel))


# Python's cyclic garbage collector, as the server uses it: a young collection every
# 100,000 allocations (not 700), and the objects of start-up (modules, images, their
# loaded maps) left out of every collection. Every request allocates a few short-lived
# objects (events, plans, copies) and the collector's default thresholds then ran
# full collections over the long-lived range maps and logs: about 9% of the serving
# thread's samples (perf) in bow.img's random first writes. With this, in alternating
# runs of bench_bow's first writes (/tmp harness, not kept): the serving thread's CPU
# per random 4 KiB write 117-137 us against 121-148, sequential 1 MiB writes
# 298-337 MB/s against 276-279 (4 and 3 pairs); an earlier 8 pairs of random writes
# pointed the same way.
GC_THRESHOLDS = (100_000, 50, 100)


def tune_garbage_collection() -> None:
    """Call once the images are open, before serving (see GC_THRESHOLDS)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_server(mountpoint: str, images: list[Image], *, workers: int, debug: bool,
               channel: ReadyChannel) -> int:
    """Serve in this process until unmounted. Reports readiness on `channel`."""
    server = MountServer(mountpoint, images, workers=workers, debug=debug)
    tune_garbage_collection()
    try:
        trio.run(server.serve, channel.ready)
    except Exception as exc:  # mount-time failures (e.g. fuse_session_mount)
        log.exception("mount server failed")
        error = UserError(f"mount failed: {exc}", EXIT_FAILED)
        channel.failed(error)  # nothing if it was ready already
        raise error from None
    return 0


def spawn_server(argv: Sequence[str], log_path: str) -> None:
    """Start `fusesnap mount ... --foreground` detached, logging to `log_path`, and
    wait until it is serving, printing its start-up warnings. Raises UserError with the
    server's own one-line reason if it fails first. `argv` holds no --log: the child
    gets `--log log_path`. Its stdout and stderr go to the log file too (for anything
    written outside `logging`)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        log_file = open(log_path, "ab")
    except OSError as exc:
        raise UserError(f"cannot write the log file {log_path}: {exc.strerror}") from None
    read_end, write_end = os.pipe()
    with log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "fusesnap", *argv, "--log", log_path, "--foreground",
             "--ready-fd", str(write_end)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            pass_fds=(write_end,), start_new_session=True,
        )
    os.close(write_end)
    with os.fdopen(read_end, "r") as pipe:
        for line in pipe:
            kind, _, text = line.rstrip("\n").partition(" ")
            if kind == WARNING:
                print(f"fusesnap: warning: {text}", file=sys.stderr)
            elif kind == READY:
                return
            else:  # "<exit status> <one-line reason>"
                child.wait()
                raise UserError(text, int(kind))
    status = child.wait()
    raise UserError(f"mount server exited with status {status} before mounting; see {log_path}",
                    EXIT_FAILED)
