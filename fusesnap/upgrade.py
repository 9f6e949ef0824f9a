"""Live upgrade: a new server process takes over a running mount, without unmounting.

`fusesnap upgrade MNT [--exec PROGRAM]` asks the running server, over its hand-over
socket, to start a successor (`PROGRAM takeover MNT --fd N`) and hand it the mount.
What goes over (a SOCK_SEQPACKET socket pair, one JSON message per packet, the
descriptors as SCM_RIGHTS):

  the FUSE connection  its /dev/fuse descriptor and the raw FUSE_INIT the kernel sent
                       it once: the successor's libfuse session is initialised by
                       replaying it (pyfuse3 patch 4, DEVELOPERS.md)
  the devices          every image's descriptors (`Image.handover_fds`): block devices
                       are open O_EXCL and cannot be opened twice
  the images           a small versioned state each (`Image.handover_state`); the
                       successor rebuilds the rest from the mount's own command line,
                       the way a restart does, *before* the old server pauses
  the adapter          the inode table and the open file handles the kernel holds
  the server           the mount's command line and directory, the log file, the
                       number of upgrades

  old server                                  successor
    background tasks stop at a safe point
  PREPARE argv, cwd (+ log, device fds)   ->
                                          <-  PREPARED version      images open (or error)
  CATCH-UP image states                   ->
                                          <-  CAUGHT-UP             applied, still outside the pause
    stop taking requests; drain those in flight
  HANDOVER state, INIT (+ FUSE fd)        ->
                                          <-  READY                 state restored, INIT replayed
  COMMIT                                  ->  serves from here on
  exits without unmounting

Rollback: until READY the old server owns the connection. A successor that fails to
start, reports an error, exits or does not answer in time (PREPARE_TIMEOUT,
HANDOVER_TIMEOUT) is killed and the old server resumes where it stopped: its tables
and images are untouched, and the successor never reads the connection or closes an
image (closing may persist state) before COMMIT.

Crash failover (issue 11) reuses the successor side: a supervisor holding the FUSE
descriptor, the device descriptors and the saved INIT sends PREPARE, a CATCH-UP and a
HANDOVER without "adapter" and "images"; the successor then keeps the tables and images as
it opened them, that is, as recovered from their persisted state (PREPARE brings only the
mount time).

Concurrency: the old server's side is trio tasks in the mount's nursery; `serve`
alternates pyfuse3.main with hand-overs. The successor's side is blocking code that
runs before its pyfuse3.main starts.
"""

from __future__ import annotations

import argparse
import array
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pyfuse3
import trio

from . import __version__, arguments
from .control import XATTR_PID, mounted_at, read_status
from .devices import inherited_fds
from .errors import EXIT_FAILED, EXIT_USAGE, UserError
from .images import IMAGE_TYPES
from .images.base import Image

log = logging.getLogger(__name__)

PREPARE_TIMEOUT = 60.0     # seconds for a successor to start and open the images (default)
HANDOVER_TIMEOUT = 2.0     # seconds for it to restore the state: requests wait meanwhile
PROTOCOL = 1               # version of the messages below
# Until it takes over, the successor runs this much nicer than the server: its start
# (imports, opening the images) must not take the CPU from requests being served.
PREPARE_NICENESS = 10
MAX_MESSAGE = 1 << 20


def handover_address(pid: int) -> bytes:
    """The server's hand-over socket (abstract namespace: nothing to clean up)."""
    return f"\0fusesnap-upgrade-{pid}".encode()


class Launch:
    """How this server's mount was started: the `fusesnap mount` arguments and the
    directory they are relative to. A successor re-opens the images from them."""

    def __init__(self, argv: list[str], cwd: str):
        self.argv = argv
        self.cwd = cwd


#: Recorded by `fusesnap mount` before the server leaves its directory (cli.py).
launched: Launch | None = None


def record_launch(argv: list[str]) -> None:
    global launched
    launched = Launch(list(argv), os.getcwd())


class SuccessorFailed(Exception):
    """The successor cannot take over; the message is its reason, for the user."""


# -- messages -------------------------------------------------------------------------

def encode(kind: str, **fields) -> bytes:
    return json.dumps({"type": kind, "protocol": PROTOCOL, **fields}).encode()


def decode(data: bytes, expected: str) -> dict:
    if not data:
        raise EOFError
    message = json.loads(data)
    if message.get("type") == "error":
        raise SuccessorFailed(message.get("reason", "unknown error"))
    if message.get("type") != expected or message.get("protocol") != PROTOCOL:
        raise SuccessorFailed(f"expected a {expected} message of protocol {PROTOCOL}, "
                              f"got {message.get('type')!r} of {message.get('protocol')!r}")
    return message


def rights(fds: list[int]) -> list:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []


# -- what is handed over --------------------------------------------------------------

ADAPTER_VERSION = 3  # of adapter_state; earlier builds numbered inodes by order of appearance


def adapter_state(operations) -> dict:
    """What the adapter holds that a successor cannot derive: the handles of open
    status files (their numbers and the text rendered at open), the handle counter and
    the mount time. Image files' inodes and handles need nothing: they are a function
    of the files (`fs.inode_for`), the same in every server of the mount."""
    return {
        "version": ADAPTER_VERSION,
        "mount_time_ns": operations.mount_time_ns,
        "open_files": {str(fh): ({"image": opened.name} if isinstance(opened, Image)
                                 else {"status": opened.decode("latin-1")})
                       for fh, opened in operations.open_files.items()},
        "next_fh": operations.next_fh,
    }


def restore_adapter(operations, state: dict, files: list[tuple[str, Image]]) -> None:
    """Take over the old server's handles. `files` are the (name, image) pairs this
    server serves, with the images' states restored (snapshots taken or released since
    it opened them)."""
    if state.get("version") != ADAPTER_VERSION:
        raise ValueError(f"adapter hand-over state version {state.get('version')!r} is unknown "
                         f"to this build (it restores {ADAPTER_VERSION}; a server that numbered "
                         "its inodes otherwise cannot be upgraded in place: unmount and mount again)")
    images = {image.name: image for _, image in files}
    open_files = {}
    for fh, opened in state["open_files"].items():
        if "image" in opened:
            if opened["image"] not in images:
                raise ValueError(f"a file handle is open on {opened['image']}, which this build "
                                 "does not serve (close it, then upgrade)")
            open_files[int(fh)] = images[opened["image"]]
        else:
            open_files[int(fh)] = opened["status"].encode("latin-1")
    # The image entries go, then come back for `files`: with none left, set_files has
    # nothing to invalidate (the session is not initialised yet).
    operations.by_inode = {inode: entry for inode, entry in operations.by_inode.items()
                           if not isinstance(entry, Image)}
    operations.by_name = {name: inode for name, inode in operations.by_name.items()
                          if inode in operations.by_inode}
    operations.set_files(files)
    operations.open_files = open_files
    operations.next_fh = state["next_fh"]
    operations.mount_time_ns = state["mount_time_ns"]


def device_descriptors(images: list[Image]) -> tuple[dict[str, int], list[int]]:
    """The images' descriptors a successor inherits: {path: index} (from 1: PREPARE's
    descriptors start with the log) and the descriptors in that order."""
    devices, fds = {}, []
    for image in images:
        for path, fd in image.handover_fds().items():
            fds.append(fd)
            devices[path] = len(fds)
    return devices, fds


# -- the serving side (old server and successor alike) ---------------------------------

class HandOver:
    """A server's part in live upgrades: it opens the FUSE session (or takes one over),
    runs the images' background tasks, serves, and hands everything to a successor
    when `fusesnap upgrade` asks."""

    def __init__(self, server, takeover: "Takeover | None" = None):
        self.server = server
        self.takeover = takeover
        self.launch = takeover.launch if takeover else launched
        self.upgrades = takeover.upgrades if takeover else 0
        # crash failovers (fusesnap/supervisor.py) so far, and why the last one happened
        self.failovers = takeover.failovers if takeover else 0
        self.last_failover = takeover.last_failover if takeover else None
        self.last_pause: float | None = None
        self.owns_images = takeover is None  # False: closing them is not ours to do
        self.handed_over = False
        self.operations = None
        self.nursery: trio.Nursery | None = None
        self.background_scope: trio.CancelScope | None = None
        self.background_stopped = trio.Event()
        self.paused = False
        self.drained = trio.Event()
        self.resumed = trio.Event()
        self.busy = False

    def status(self) -> dict:
        return {"version": __version__, "pid": os.getpid(), "upgrades": self.upgrades,
                "last_pause_ms": None if self.last_pause is None else round(self.last_pause * 1e3, 2),
                "failovers": self.failovers, "last_failover": self.last_failover}

    def open_session(self, operations, mountpoint: str, options: set[str]) -> None:
        self.operations = operations
        if self.takeover is None:
            pyfuse3.init(operations, mountpoint, options)
        else:
            self.takeover.take(operations, self.server.images, options)
            self.owns_images = True

    async def start(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        await self._start_background()
        if self.launch is not None:  # a mount started without `fusesnap mount` takes no upgrades
            listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            await listener.bind(handover_address(os.getpid()))
            listener.listen()
            nursery.start_soon(self._listen, listener)

    async def serve(self, max_tasks: int) -> None:
        """pyfuse3.main until the session ends or the mount is handed over."""
        if self.takeover is not None and self.takeover.failover_reason:
            self.last_pause = time.monotonic() - self.takeover.stopped_at
            log.warning("took over %s after a crash (%s); failover %d, serving %.1f ms "
                        "after it", self.server.mountpoint, self.takeover.failover_reason,
                        self.failovers, self.last_pause * 1e3)
        elif self.takeover is not None:
            self.last_pause = time.monotonic() - self.takeover.stopped_at
            log.info("took over %s from pid %d (fusesnap %s) after a pause of %.1f ms; "
                     "upgrade %d", self.server.mountpoint, self.takeover.old_pid,
                     self.takeover.old_version, self.last_pause * 1e3, self.upgrades)
        while True:
            await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
            if not self.paused:
                return  # the kernel ended the session, or a signal did
            self.drained.set()
            await self.resumed.wait()
            if self.handed_over:
                return

    # background tasks: a nursery of their own, stopped at a safe point for the pause

    async def _start_background(self) -> None:
        self.background_stopped = trio.Event()
        self.background_scope = await self.nursery.start(self._run_background)

    async def _run_background(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as tasks:
                    for image in self.server.images:
                        await image.start(tasks)
                    task_status.started(scope)
        finally:
            self.background_stopped.set()

    async def _stop_background(self) -> None:
        # Cancelling is a safe point for every image: a merge chunk being written
        # finishes first (worker threads are not abandoned), and one written but not
        # yet recorded is written again by the successor, with the same data.
        self.background_scope.cancel()
        await self.background_stopped.wait()

    # the hand-over socket: one request per connection, one upgrade at a time

    def _image_states(self) -> dict:
        return {image.name: image.handover_state() for image in self.server.images}

    async def _listen(self, listener) -> None:
        with listener:
            while True:
                connection, _ = await listener.accept()
                self.nursery.start_soon(self._answer, connection)

    async def _answer(self, connection) -> None:
        """One `fusesnap upgrade` request. Nothing a client sends may end the mount."""
        reply = None
        with connection:
            try:
                creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                if int.from_bytes(creds[4:8], sys.byteorder) not in (0, os.geteuid()):
                    return
                request = await self._read_request(connection)
                if self.busy:
                    reply = {"ok": False, "reason": "another upgrade is under way"}
                else:
                    self.busy = True
                    try:
                        reply = await self.upgrade(request["program"], request["environment"],
                                                   request["timeout"])
                    finally:
                        self.busy = False
                await connection.send((json.dumps(reply) + "\n").encode())
            except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
                log.warning("upgrade request failed: %r", exc)
            finally:
                if reply is not None and reply["ok"]:
                    self.resumed.set()  # after the reply: serve() returns, the process ends

    async def _read_request(self, connection) -> dict:
        request = b""
        while not request.endswith(b"\n"):
            data = await connection.recv(65536)
            if not data or len(request) > MAX_MESSAGE:
                raise EOFError("incomplete request")
            request += data
        request = json.loads(request)
        if not (isinstance(request["program"], list) and isinstance(request["environment"], dict)
                and isinstance(request["timeout"], (int, float))):
            raise ValueError(f"bad request {request!r}")
        return request

    async def upgrade(self, program: list[str], environment: dict[str, str],
                      prepare_timeout: float) -> dict:
        """One hand-over attempt: start `program` with `environment` (the command's,
        so that it finds the fusesnap installed where the command runs). Returns the
        reply for `fusesnap upgrade`."""
        unable = [image.name for image in self.server.images if not image.handover_versions]
        if unable:
            return {"ok": False, "old_version": __version__, "old_pid": os.getpid(),
                    "reason": f"{', '.join(unable)} cannot be handed over to a new server yet: "
                              "unmount and mount again to run the new code"}
        link_environment, link_fds = (self.server.link.pass_on() if self.server.link
                                      else ({}, ()))  # the successor serves under our supervisor
        successor = Successor(program, {**environment, **link_environment},
                              self.server.mountpoint, link_fds)
        old = {"old_version": __version__, "old_pid": os.getpid()}
        stopped_at = None
        log.info("upgrade: starting %s", " ".join(program))
        try:
            await successor.start(self.nursery)
            # Background work stops before the successor opens the images, so that what
            # they check on opening (system.img's source check reads every changed block)
            # sees devices no background task is writing. Requests are still served.
            await self._stop_background()
            devices, device_fds = device_descriptors(self.server.images)
            fds = [sys.stderr.fileno(), *device_fds]
            prepared = await successor.exchange(
                encode("prepare", argv=self.launch.argv, cwd=self.launch.cwd, devices=devices,
                       niceness=os.getpriority(os.PRIO_PROCESS, 0),
                       old_version=__version__, old_pid=os.getpid(), upgrades=self.upgrades,
                       failovers=self.failovers, last_failover=self.last_failover),
                fds, "prepared", prepare_timeout)
            # The images' states as they are now, while requests are still served: the
            # successor catches up outside the pause (a merge's chunks since its last
            # persist, say); the states in the pause then differ only by what requests
            # changed meanwhile, which is cheap to apply.
            await successor.exchange(encode("catch-up", images=self._image_states()), [],
                                     "caught-up", prepare_timeout)
            self.paused, self.drained, self.resumed = True, trio.Event(), trio.Event()
            stopped_at = time.monotonic()
            pyfuse3.stop_receiving()
            await self.drained.wait()
            state = {"adapter": adapter_state(self.operations),
                     "images": self._image_states()}
            handover = encode("handover", state=state, stopped_at=stopped_at,
                              init=base64.b64encode(pyfuse3.saved_init_request()).decode())
            await successor.exchange(handover, [pyfuse3.connection_fd()], "ready", HANDOVER_TIMEOUT)
            # Committed: from here on the successor owns the connection and the images.
            await successor.send(encode("commit"))
        except SuccessorFailed as exc:
            reason = str(exc)
        except Exception as exc:  # a bug of ours: never lose the mount over it
            log.exception("upgrade failed")
            reason = f"upgrade failed: {exc!r}"
        else:
            self.handed_over, self.owns_images = True, False
            await successor.detach()
            log.info("handed %s over to pid %d (fusesnap %s)", self.server.mountpoint,
                     successor.pid, prepared["version"])
            return {"ok": True, **old, "new_version": prepared["version"], "new_pid": successor.pid}
        reason = await successor.kill(reason)
        paused = f" after a pause of {(time.monotonic() - stopped_at) * 1e3:.0f} ms" if stopped_at else ""
        log.warning("upgrade refused, serving on%s: %s", paused, reason)
        if self.background_stopped.is_set():
            await self._start_background()
        if self.paused:
            self.paused = False
            self.resumed.set()  # serve() calls pyfuse3.main again
        return {"ok": False, **old, "reason": reason}


class Successor:
    """The old server's handle on the successor process: its socket, its output
    (copied into our log; the last line is its reason if it dies), its exit."""

    def __init__(self, program: list[str], environment: dict[str, str], mountpoint: str,
                 pass_fds: tuple[int, ...] = (), niceness: int = PREPARE_NICENESS):
        self.program = program
        self.pass_fds = pass_fds  # besides the hand-over socket (the supervisor's link)
        self.niceness = niceness  # while it prepares (0: no server is serving meanwhile)
        self.environment = environment
        self.mountpoint = mountpoint
        self.process: trio.Process | None = None
        self.socket = None
        self.last_line = ""
        self.output_done = trio.Event()

    @property
    def pid(self) -> int:
        return self.process.pid

    async def start(self, nursery: trio.Nursery) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.process = await trio.lowlevel.open_process(
                [*self.program, "takeover", self.mountpoint, "--fd", str(theirs.fileno())],
                env=self.environment, pass_fds=(theirs.fileno(), *self.pass_fds),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            ours.close()
            raise SuccessorFailed(f"cannot start {self.program[0]}: {exc.strerror}") from None
        finally:
            theirs.close()
        self.socket = trio.socket.from_stdlib_socket(ours)
        with contextlib.suppress(OSError):  # it may be gone already: we learn that soon
            os.setpriority(os.PRIO_PROCESS, self.process.pid,
                           min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.niceness))
        nursery.start_soon(self._copy_output)

    async def _copy_output(self) -> None:
        pending = b""
        try:
            async for data in self.process.stdout:
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._note(line)
            self._note(pending)
        finally:
            self.output_done.set()

    def _note(self, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()
        if text:
            self.last_line = text
            print(f"successor {self.process.pid}: {text}", file=sys.stderr, flush=True)

    async def send(self, message: bytes, fds: list[int] = ()) -> None:
        await self.socket.sendmsg([message], rights(list(fds)))

    async def exchange(self, message: bytes, fds: list[int], expected: str, timeout: float) -> dict:
        try:
            await self.send(message, fds)
            with trio.fail_after(timeout):
                return decode(await self.socket.recv(MAX_MESSAGE), expected)
        except trio.TooSlowError:
            raise SuccessorFailed(f"the successor did not answer within {timeout:g} s") from None
        except (EOFError, OSError):
            raise SuccessorFailed(await self._exit_reason()) from None

    async def _exit_reason(self) -> str:
        with trio.move_on_after(5):
            await self.process.wait()
            await self.output_done.wait()
        status = self.process.returncode
        said = f": {self.last_line}" if self.last_line else ""
        return f"the successor exited with status {status}{said}"

    async def kill(self, reason: str) -> str:
        """Make sure the successor is gone; returns the reason to report."""
        if self.process is not None:
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGKILL)
            await self.process.wait()
            with trio.move_on_after(1):
                await self.output_done.wait()
        if self.socket is not None:
            self.socket.close()
        return reason

    async def detach(self) -> None:
        """After COMMIT: wait (briefly) until it writes to the log itself."""
        with trio.move_on_after(1):
            await self.output_done.wait()
        self.socket.close()


# -- the successor side -----------------------------------------------------------------

class Takeover:
    """The successor's side: the images are prepared from PREPARE; `take` restores
    the state, initialises the FUSE session from the handed-over connection and
    commits. Blocking code, run before the successor's pyfuse3.main."""

    def __init__(self, channel: socket.socket):
        self.channel = channel
        prepare, fds = self.receive("prepare")
        self.log_fd, self.device_fds = fds[0], fds[1:]
        self.launch = Launch(prepare["argv"], prepare["cwd"])
        self.devices = prepare["devices"]
        self.old_version, self.old_pid = prepare["old_version"], prepare["old_pid"]
        # A supervisor's PREPARE after a crash says why (and counts it); an upgrade's
        # passes the count on.
        self.failover_reason = prepare.get("failover_reason")
        self.failovers = prepare.get("failovers", 0)
        self.last_failover = self.failover_reason or prepare.get("last_failover")
        self.upgrades = prepare["upgrades"] + (0 if self.failover_reason else 1)
        self.mount_time_ns = prepare.get("mount_time_ns")  # a supervisor's: no adapter state
        self.niceness = prepare["niceness"]
        self.stopped_at = 0.0

    def receive(self, expected: str) -> tuple[dict, list[int]]:
        data, fds, _, _ = socket.recv_fds(self.channel, MAX_MESSAGE, 64, socket.MSG_CMSG_CLOEXEC)
        try:
            return decode(data, expected), fds
        except EOFError:
            raise SuccessorFailed("the old server closed the hand-over") from None

    def send(self, kind: str, **fields) -> None:
        self.channel.sendmsg([encode(kind, **fields)])

    def open_images(self) -> tuple[argparse.Namespace, list[Image]]:
        """Open the images as `fusesnap mount` would, with the old server's descriptors."""
        from .cli import build_parser  # cli imports this module
        inherited_fds.update({path: self.device_fds[index - 1]
                              for path, index in self.devices.items()})
        os.chdir(self.launch.cwd)
        try:
            args = build_parser().parse_args(self.launch.argv)
            images = [image for image_type in IMAGE_TYPES
                      for image in image_type.images_from_args(args)]
        finally:
            os.chdir("/")
        return args, images

    def take(self, operations, images: list[Image], options: set[str]) -> None:
        catch_up, _ = self.receive("catch-up")
        with self.refusing():
            restore_images(images, catch_up["images"])
        self.send("caught-up")
        handover, fds = self.receive("handover")
        with self.refusing():
            (fuse_fd,) = fds
            self.stopped_at = handover["stopped_at"]
            state = handover["state"]
            restore_images(images, state.get("images"))  # first: snapshots may have come or gone
            if state.get("adapter") is not None:
                restore_adapter(operations, state["adapter"],
                                [file for image in images for file in image.files()])
            elif self.mount_time_ns is not None:
                operations.mount_time_ns = self.mount_time_ns
            pyfuse3.init(operations, f"/dev/fd/{fuse_fd}", options)
            pyfuse3.replay_init(base64.b64decode(handover["init"]))
        try:  # serve at the old server's priority again (only root may raise it)
            os.setpriority(os.PRIO_PROCESS, 0, self.niceness)
        except OSError as exc:
            log.warning("serving at a lower priority than the old server: %s", exc)
        self.send("ready")
        self.receive("commit")
        # Ours now. Log where the old server logged (our output went to it so far).
        os.dup2(self.log_fd, sys.stdout.fileno())
        os.dup2(self.log_fd, sys.stderr.fileno())
        os.close(self.log_fd)
        self.channel.close()


    @contextlib.contextmanager
    def refusing(self):
        """Tell the old server why we cannot take over (it then serves on)."""
        try:
            yield
        except Exception as exc:
            log.exception("cannot restore the state")
            self.send("error", reason=f"cannot restore the state: {exc}")
            raise SuccessorFailed(str(exc)) from None


def restore_images(images: list[Image], states: dict | None) -> None:
    """Apply the old server's image states (None: keep the images as opened, that is,
    as recovered from what they persisted)."""
    if states is None:
        return
    for image in images:
        if image.name not in states:
            raise ValueError(f"no hand-over state for {image.name}")
        image.restore_handover_state(states[image.name])


def run_successor(args: argparse.Namespace) -> int:
    """`fusesnap takeover MNT --fd N`: started by a server handing MNT over."""
    from .mount import MountServer, ReadyChannel, setup_logging, tune_garbage_collection
    channel = socket.socket(fileno=args.fd)
    setup_logging(False, None, ReadyChannel(None))  # stderr: the old server's log until COMMIT
    try:
        takeover = Takeover(channel)
    except (SuccessorFailed, OSError, ValueError) as exc:
        print(f"fusesnap takeover: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        mount_args, images = takeover.open_images()
    except UserError as exc:
        takeover.send("error", reason=str(exc))
        return exc.exit_status
    except Exception as exc:
        log.exception("opening the images failed")
        takeover.send("error", reason=f"opening the images failed: {exc!r}")
        return EXIT_FAILED
    # From here on, log as the mount was told to (the log file, reopened after logrotate).
    logging.getLogger().handlers.clear()
    setup_logging(mount_args.debug, mount_args.log, ReadyChannel(None))
    takeover.send("prepared", version=__version__, pid=os.getpid())
    server = MountServer(os.path.abspath(args.mountpoint), images,
                         workers=mount_args.workers, debug=mount_args.debug)
    server.handover = HandOver(server, takeover)
    tune_garbage_collection()
    try:
        trio.run(server.serve, lambda: None)
    except SuccessorFailed as exc:
        log.error("take-over refused: %s", exc)
        return EXIT_FAILED
    return 0


# -- the command line -------------------------------------------------------------------

def cmd_upgrade(args) -> int:
    from .cli import wait_for_exit  # cli imports this module
    mountpoint = args.mountpoint
    if mounted_at(mountpoint) != "fuse.fusesnap":
        raise UserError(f"{mountpoint} is not a fusesnap mount")
    if args.exec:
        found = shutil.which(args.exec)
        if found is None:
            raise UserError(f"no such program: {args.exec}")
        program = [os.path.abspath(found)]
    else:
        program = [sys.executable, "-m", "fusesnap"]
    try:
        old_pid = int(os.getxattr(mountpoint, XATTR_PID))
    except OSError as exc:
        raise UserError(f"cannot reach the server of {mountpoint}: {exc.strerror}", EXIT_FAILED) from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        try:
            connection.connect(handover_address(old_pid))
        except OSError as exc:
            raise UserError(f"the server of {mountpoint} (pid {old_pid}) takes no upgrades: "
                            f"{exc.strerror}", EXIT_FAILED) from None
        request = {"program": program, "environment": dict(os.environ), "timeout": args.timeout}
        connection.sendall((json.dumps(request) + "\n").encode())
        with connection.makefile("rb") as replies:
            line = replies.readline()
    if not line:
        raise UserError(f"the server of {mountpoint} (pid {old_pid}) closed the connection "
                        "without answering", EXIT_FAILED)
    reply = json.loads(line)
    if not reply["ok"]:
        raise UserError(f"upgrade of {mountpoint} refused: {reply['reason']}; fusesnap "
                        f"{reply['old_version']} (pid {old_pid}) keeps serving", EXIT_FAILED)
    wait_for_exit(old_pid, 10)
    server = json.loads(read_status(mountpoint, True))["server"]
    print(f"{mountpoint}: fusesnap {reply['old_version']} (pid {old_pid}) -> "
          f"{reply['new_version']} (pid {reply['new_pid']}), pause {server['last_pause_ms']:.1f} ms")
    return 0


def add_commands(commands) -> None:
    p = commands.add_parser(
        "upgrade", help="hand a running mount over to a new server, without unmounting",
        description="Start a new server from the fusesnap installed where this command runs "
        "(or PROGRAM), let it open the images, then hand the mount over to it: requests "
        "pause only for the hand-over itself. If the new server fails, the old one serves on "
        "and the command exits 1 with the reason.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", type=arguments.path)
    p.add_argument("--exec", metavar="PROGRAM",
                   help="the fusesnap program to start (default: this one)")
    p.add_argument("--timeout", type=arguments.positive_number, default=PREPARE_TIMEOUT, metavar="SECONDS",
                   help=f"time the new server has to open the images (default {PREPARE_TIMEOUT:g})")
    p.set_defaults(run=cmd_upgrade)

    p = commands.add_parser(
        "takeover", help="(internal) take a mount over from its server, for `fusesnap upgrade`",
        description="Started by a running server during `fusesnap upgrade`, never by users.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", type=arguments.path)
    p.add_argument("--fd", type=int, required=True)
    p.set_defaults(run=run_successor)
