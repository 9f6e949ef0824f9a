"""The mount server: opens the images, mounts them over FUSE and serves until unmounted.

Life cycle (all inside one `trio.run`, teardown in one `AsyncExitStack`):
  open images -> pyfuse3.init (the mount appears) -> start image background tasks
  -> tell the waiting CLI "ready" -> pyfuse3.main until the kernel ends the session
  (`fusesnap umount`) or SIGTERM/SIGINT -> stop background tasks -> flush and close
  images -> pyfuse3.close.

`run_server` runs in the foreground; `spawn_server` starts it as a detached child
and waits on a pipe until it is serving or has failed, so `fusesnap mount` returns
only once the mount is usable.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import subprocess
import sys
from typing import Sequence

import pyfuse3
import trio

from .errors import EXIT_FAILED, UserError
from .fs import FuseOperations
from .images.base import Image

log = logging.getLogger(__name__)

READY = "ready"


class MountServer:
    """A running mount: its images and the control commands it answers."""

    def __init__(self, mountpoint: str, images: list[Image], *, workers: int, debug: bool):
        self.mountpoint = mountpoint
        self.images = images
        self.workers = workers
        self.debug = debug
        self.operations: FuseOperations | None = None

    def files(self) -> list[tuple[str, Image]]:
        return [entry for image in self.images for entry in image.files()]

    async def control(self, command: str) -> None:
        """Run a control command from the CLI (setxattr on the root). ValueError if bad."""
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
        operations = self.operations = FuseOperations(self.files(), self.control)
        options = set(pyfuse3.default_options)
        options |= {"fsname=fusesnap", "subtype=fusesnap"}
        if self.debug:
            options.add("debug")
        async with contextlib.AsyncExitStack() as stack:
            # Registered first so it runs last: images are flushed and closed only
            # after the FUSE session and every background task have stopped.
            stack.push_async_callback(self._close_images)
            pyfuse3.init(operations, self.mountpoint, options)
            # unmount=False: after a normal `umount` the kernel has already ended the
            # session; after SIGTERM, _stop_on_signal has unmounted lazily.
            stack.callback(pyfuse3.close, unmount=False)
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            nursery.start_soon(self._stop_on_signal)
            for image in self.images:
                await image.start(nursery)
            on_ready()
            log.info("serving %s on %s", ", ".join(i.name for i in self.images), self.mountpoint)
            await pyfuse3.main(min_tasks=1, max_tasks=self.workers)
            log.info("FUSE session ended")

    async def _stop_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                await trio.run_process(["umount", "-l", self.mountpoint], check=False)
                pyfuse3.terminate()
                return

    async def _close_images(self) -> None:
        for image in self.images:
            try:
                await image.close()
            except Exception:
                log.exception("closing %s failed", image.name)


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_server(mountpoint: str, images: list[Image], *, workers: int, debug: bool,
               ready_fd: int | None) -> int:
    """Serve in this process until unmounted. Reports readiness on `ready_fd`."""

    ready = [False]

    def on_ready() -> None:
        ready[0] = True
        if ready_fd is not None:
            os.write(ready_fd, (READY + "\n").encode())
            os.close(ready_fd)

    server = MountServer(mountpoint, images, workers=workers, debug=debug)
    try:
        trio.run(server.serve, on_ready)
    except Exception as exc:  # mount-time failures (e.g. fuse_session_mount)
        log.exception("mount server failed")
        error = UserError(f"mount failed: {exc}", EXIT_FAILED)
        if ready_fd is not None and not ready[0]:
            os.write(ready_fd, f"{error.exit_status} {error}\n".encode())
        raise error from None
    return 0


def spawn_server(argv: Sequence[str], log_path: str) -> None:
    """Start `fusesnap mount ... --foreground` detached, logging to `log_path`, and
    wait until it is serving. Raises UserError with the server's own one-line reason
    if it fails first."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        log_file = open(log_path, "ab")
    except OSError as exc:
        raise UserError(f"cannot write the log file {log_path}: {exc.strerror}") from None
    read_end, write_end = os.pipe()
    with log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "fusesnap", *argv, "--foreground", "--ready-fd", str(write_end)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            pass_fds=(write_end,), start_new_session=True,
        )
    os.close(write_end)
    with os.fdopen(read_end, "r") as pipe:
        message = pipe.read().strip()
    if message == READY:
        return
    status = child.wait()
    if message:
        # The child wrote "<exit status> <one-line reason>".
        code, _, reason = message.partition(" ")
        raise UserError(reason, int(code))
    raise UserError(f"mount server exited with status {status} before mounting; see {log_path}",
                    EXIT_FAILED)
