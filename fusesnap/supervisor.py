"""Crash failover: a supervisor keeps a mount's FUSE connection alive when its server dies.

`fusesnap mount` (without --no-failover) starts this supervisor, which starts the
server as its child. The supervisor does nothing on the I/O path: it holds

  a duplicate of the FUSE descriptor   the connection lives while one is open, so the
                                       kernel keeps the requests the server had read
  duplicates of the device descriptors block devices are open O_EXCL
  the connection's raw FUSE_INIT       sent once by the kernel; a successor replays it
  the mount's command line and cwd     a successor opens the images from them

Every server of the mount (the first one, a live upgrade's successor, a failover's
successor) holds the other end of a SOCK_SEQPACKET link to the supervisor (inherited
descriptor FUSESNAP_SUPERVISOR_FD) and sends on it, once serving:

  HELLO pid, version, upgrades, devices, mount time, INIT (+ FUSE fd, device fds)
  EXITING                                   the session ended (umount, SIGTERM)

When every process holding the link is gone and none said EXITING, the server
crashed: the supervisor starts `fusesnap takeover MNT` and drives the successor side
of a live upgrade (fusesnap/upgrade.py) with no state to hand over: PREPARE,
CATCH-UP and HANDOVER without "adapter" and "images", so the successor serves the
images as its open recovered them (the update from its persisted progress,
backup-on-write from its journal and log, snapshots from the store) and the adapter's
tables as a fresh server numbers them (fs.py: inode numbers and file handles are
functions of what the file is; PREPARE passes on the mount time, the files' times).
After COMMIT it writes FUSE_NOTIFY_RESEND to the connection: the kernel queues again
every request the dead server had read and not answered, so the loop devices see a
pause, not an error.

When failover is impossible (more than --max-failovers crashes within
CRASH_WINDOW seconds, a successor that cannot start, a kernel without
FUSE_NOTIFY_RESEND) the supervisor aborts the connection (/sys/fs/fuse/connections/N/
abort, or closing the last descriptor), logs why and exits: the behaviour without failover, never a hang. If the
supervisor itself dies, the server serves on and a later crash aborts the
connection as without failover (the server logs that it lost its supervisor).

Concurrency: the supervisor is one trio task loop (plus upgrade.Successor's output
copier); the server side (`Link`) is a trio task in the mount's nursery that sends
HELLO once the connection's INIT has arrived, then waits for the supervisor to go.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pyfuse3
import trio

from . import __version__
from .errors import EXIT_FAILED
from .upgrade import HANDOVER_TIMEOUT, MAX_MESSAGE, Successor, SuccessorFailed, encode, rights

log = logging.getLogger(__name__)

LINK_VARIABLE = "FUSESNAP_SUPERVISOR"   # "<fd>:<supervisor pid>" in every server's environment
CRASH_WINDOW = 60.0                      # seconds: --max-failovers counts crashes within it
DEFAULT_MAX_FAILOVERS = 2                # the third crash within a minute aborts
FAILOVER_PREPARE_TIMEOUT = 10.0          # seconds for a successor to open the images
FUSE_NOTIFY_RESEND = 7                   # Linux 6.9: re-queue requests read and not answered
CONNECTIONS = "/sys/fs/fuse/connections"


def resend_request() -> bytes:
    """struct fuse_out_header {len, error = notify code, unique = 0}: a notification."""
    return struct.pack("<IiQ", 16, FUSE_NOTIFY_RESEND, 0)


def connection_number(mountpoint: str) -> int | None:
    """The FUSE connection of `mountpoint` (its device minor), from /proc/self/mountinfo:
    no request goes to the server."""
    escaped = mountpoint.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
    found = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4] == escaped and " - fuse.fusesnap " in line:
                found = int(fields[2].split(":")[1])  # the last one: mounts stack
    return found


# -- the server's side ---------------------------------------------------------------------

class Link:
    """A server's end of the link to its supervisor (None without one: --no-failover,
    --foreground typed by a user, or a mount started before this code)."""

    def __init__(self, fd: int, supervisor_pid: int):
        self.socket = socket.socket(fileno=fd)
        self.supervisor_pid: int | None = supervisor_pid

    @classmethod
    def from_environment(cls) -> "Link | None":
        value = os.environ.get(LINK_VARIABLE)
        if not value:
            return None
        fd, pid = value.split(":")
        os.set_inheritable(int(fd), False)  # passed on explicitly (`pass_on`), never by accident
        return cls(int(fd), int(pid))

    def pass_on(self) -> tuple[dict[str, str], tuple[int, ...]]:
        """Environment and descriptors for a live upgrade's successor: it serves under
        the same supervisor."""
        return {LINK_VARIABLE: f"{self.socket.fileno()}:{self.supervisor_pid}"}, (self.socket.fileno(),)

    async def report(self, server, devices: dict[str, int], device_fds: list[int]) -> None:
        """Send HELLO once the connection's INIT is known, then wait: if the supervisor
        goes, say so (a crash of this server now aborts the mount)."""
        while pyfuse3.saved_init_request() is None:  # the first request; at once after a take-over
            await trio.sleep(0.005)
        hello = {"type": "hello", "pid": os.getpid(), "version": __version__,
                 "upgrades": server.handover.upgrades, "failovers": server.handover.failovers,
                 "devices": devices, "mount_time_ns": server.operations.mount_time_ns,
                 "cwd": server.handover.launch.cwd,
                 "argv": server.handover.launch.argv,
                 "init": base64.b64encode(pyfuse3.saved_init_request()).decode()}
        try:
            self.socket.sendmsg([json.dumps(hello).encode()],
                               rights([pyfuse3.connection_fd(), *device_fds]))
            await trio.lowlevel.wait_readable(self.socket)
            gone = not self.socket.recv(MAX_MESSAGE, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except OSError:  # ECONNREFUSED, EPIPE: gone before we said hello
            gone = True
        if gone:
            log.warning("the supervisor (pid %d) is gone: a crash of this server will abort "
                        "the mount", self.supervisor_pid)
            self.supervisor_pid = None

    def exiting(self) -> None:
        try:
            self.socket.send(json.dumps({"type": "exiting"}).encode())
        except OSError:
            pass  # the supervisor is gone: nobody to tell


# -- the supervisor ------------------------------------------------------------------------

class Supervisor:
    """Starts the mount's first server, learns from it what a successor needs, and
    starts a successor whenever the server dies without having said EXITING."""

    def __init__(self, argv: list[str], mountpoint: str, ready_fd: int, max_failovers: int):
        self.argv = argv
        self.cwd = os.getcwd()  # the server parses `argv` (relative paths) in it
        self.mountpoint = mountpoint
        self.ready_fd = ready_fd
        self.max_failovers = max_failovers
        self.program = [sys.executable, "-m", "fusesnap"]
        self.hello: dict | None = None
        self.fuse_fd: int | None = None
        self.device_fds: list[int] = []
        self.connection: int | None = None
        self.crashes: list[float] = []
        self.failovers = 0
        self.children: list = []       # processes to reap (the first server, successors)
        self.link: socket.socket | None = None
        self.standby: tuple[Successor, socket.socket] | None = None  # and its link
        self.ended = False

    def _new_link(self) -> tuple[socket.socket, dict[str, str], int]:
        """A link for a server to come: our end, its environment, its descriptor."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        environment = {**os.environ, LINK_VARIABLE: f"{theirs.fileno()}:{os.getpid()}"}
        return ours, environment, theirs.detach()

    async def run(self) -> int:
        self.link, environment, theirs = self._new_link()
        first = subprocess.Popen([*self.program, *self.argv], env=environment, cwd=self.cwd,
                                 pass_fds=(theirs, self.ready_fd), stdin=subprocess.DEVNULL)
        os.close(theirs)
        os.close(self.ready_fd)  # the server reports readiness to `fusesnap mount` itself
        self.children.append(first)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            while True:
                if self.hello is not None and self.standby is None:
                    try:
                        self.standby = await self._start_standby()
                    except SuccessorFailed as exc:  # a failover starts one when it needs it
                        log.warning("no standby successor: %s", exc)
                if await self._listen():
                    continue
                crashed_at = time.monotonic()
                self._reap()
                if self.ended or self.hello is None:
                    break  # unmounted, or the first server failed before serving
                if not await self._fail_over(crashed_at):
                    break
            if self.standby is not None:
                await self.standby[0].kill("not needed")
            nursery.cancel_scope.cancel()
        self._reap()
        if self.hello is None:
            return first.wait()
        return 0 if self.ended else EXIT_FAILED

    async def _start_standby(self) -> tuple[Successor, socket.socket]:
        """A successor started in advance: it waits for PREPARE with its imports done
        (most of a successor's start), so a failover only opens the images."""
        ours, environment, theirs = self._new_link()
        successor = Successor(self.program, environment, self.mountpoint, pass_fds=(theirs,),
                              niceness=0)
        try:
            await successor.start(self.nursery)
        except SuccessorFailed:
            ours.close()
            raise
        finally:
            os.close(theirs)
        self.children.append(successor.process)
        return successor, ours

    async def _listen(self) -> bool:
        """One message from the servers; False when none holds the link any more."""
        await trio.lowlevel.wait_readable(self.link)
        data, fds, _, _ = socket.recv_fds(self.link, MAX_MESSAGE, 64, socket.MSG_DONTWAIT)
        if not data:
            return False
        message = json.loads(data)
        if message["type"] == "exiting":
            self.ended = True
        elif message["type"] == "hello":
            for fd in [self.fuse_fd, *self.device_fds]:
                if fd is not None:
                    os.close(fd)
            self.fuse_fd, *self.device_fds = fds
            self.hello = message
            if self.connection is None:
                self.connection = connection_number(self.mountpoint)
            log.info("supervising %s: server pid %d (fusesnap %s), FUSE connection %s",
                     self.mountpoint, message["pid"], message["version"], self.connection)
        return True

    def _reap(self) -> None:
        self.children = [child for child in self.children if child.poll() is None]

    async def _fail_over(self, crashed_at: float) -> bool:
        """Start successors until one serves (True) or the limit is reached: then the
        connection is aborted (False)."""
        reason = f"server pid {self.hello['pid']} died"
        while True:
            self.crashes = [t for t in self.crashes if crashed_at - t < CRASH_WINDOW] + [crashed_at]
            if len(self.crashes) > self.max_failovers:
                self._abort(f"{reason}: {len(self.crashes)} crashes within {CRASH_WINDOW:g} s "
                            f"(--max-failovers {self.max_failovers})")
                return False
            self.failovers += 1
            log.warning("failover %d of %s: %s; starting a successor", self.failovers,
                        self.mountpoint, reason)
            try:
                await self._start_successor(crashed_at, reason)
            except SuccessorFailed as exc:
                reason = f"the successor failed: {exc}"
                crashed_at = time.monotonic()
                continue
            try:
                os.write(self.fuse_fd, resend_request())
            except OSError as exc:
                self._abort(f"this kernel cannot resend the requests the dead server held "
                            f"(FUSE_NOTIFY_RESEND, Linux 6.9): {exc.strerror}")
                return False
            log.info("failover %d: served again %.1f ms after the crash", self.failovers,
                     (time.monotonic() - crashed_at) * 1e3)
            return True

    async def _start_successor(self, crashed_at: float, reason: str) -> None:
        """Hand the connection to the standby (or a successor started now), as an
        upgrade would, with no state: it serves what its open recovered."""
        successor, link = self.standby or await self._start_standby()
        self.standby = None
        hello = self.hello
        try:
            await successor.exchange(
                encode("prepare", argv=hello["argv"], cwd=hello["cwd"], devices=hello["devices"],
                       niceness=os.getpriority(os.PRIO_PROCESS, 0), old_version=hello["version"],
                       old_pid=hello["pid"], upgrades=hello["upgrades"],
                       failovers=hello["failovers"] + 1, failover_reason=reason,
                       mount_time_ns=hello.get("mount_time_ns")),
                [sys.stderr.fileno(), *self.device_fds], "prepared", FAILOVER_PREPARE_TIMEOUT)
            await successor.exchange(encode("catch-up", images=None), [], "caught-up",
                                     FAILOVER_PREPARE_TIMEOUT)
            await successor.exchange(encode("handover", state={}, stopped_at=crashed_at,
                                            init=hello["init"]),
                                     [self.fuse_fd], "ready", HANDOVER_TIMEOUT)
            await successor.send(encode("commit"))
        except SuccessorFailed as exc:
            link.close()
            raise SuccessorFailed(await successor.kill(str(exc))) from None
        self.link.close()
        self.link = link
        self.nursery.start_soon(successor.detach)

    def _abort(self, reason: str) -> None:
        """End the connection: requests fail (ENOTCONN; EIO through loop devices)."""
        log.error("failover of %s impossible, aborting its FUSE connection: %s",
                  self.mountpoint, reason)
        for child in self.children:  # a successor we started may hold the connection
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
        try:
            with open(f"{CONNECTIONS}/{self.connection}/abort", "w") as abort:
                abort.write("1")
        except OSError as exc:
            # No fusectl mounted: every server is gone, so closing our descriptor, the
            # last one, aborts the connection as well.
            log.info("%s/%s/abort: %s; closing the last descriptor instead", CONNECTIONS,
                     self.connection, exc.strerror)
        os.close(self.fuse_fd)


def run_supervisor(argv: list[str], mountpoint: str, ready_fd: int, max_failovers: int) -> int:
    """`fusesnap mount` without --no-failover, in the detached process it started."""
    supervisor = Supervisor(argv, mountpoint, ready_fd, max_failovers)
    os.chdir("/")  # a daemon must not pin the directory it was started from
    return trio.run(supervisor.run)
