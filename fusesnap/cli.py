"""The `fusesnap` command line: the user's interface to everything.

    fusesnap mount MNT [--linear DEV] [--system DEV --diff DIFF] [--foreground] [--debug]
    fusesnap umount MNT
    fusesnap status MNT [--json]
    fusesnap update pause|resume MNT
    fusesnap diff OLD NEW -o DIFF
    fusesnap diff-info DIFF [--verify]

Every user error is one line on stderr, `fusesnap: <reason>`, with the exit status
of `fusesnap.errors` (2 for bad input, 1 for an operation that failed); never a
traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import time

from . import diffing, mount
from .devices import loop_devices_backed_under
from .errors import EXIT_FAILED, EXIT_USAGE, UserError
from .control import XATTR_PID, mounted_at, read_status, send_command
from .images import IMAGE_TYPES

LOG_DIR = "/var/log/fusesnap"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"fusesnap: {message} (see '{self.prog} --help')\n")


def default_log_path(mountpoint: str) -> str:
    escaped = os.path.realpath(mountpoint).strip("/").replace("/", "-") or "root"
    return os.path.join(LOG_DIR, escaped + ".log")


# -- mount -------------------------------------------------------------------------

def cmd_mount(args) -> int:
    mountpoint = os.path.abspath(args.mountpoint)  # before the chdir below
    if not os.path.isdir(mountpoint):
        raise UserError(f"mountpoint {mountpoint} is not a directory")
    if mounted_at(mountpoint):
        raise UserError(f"{mountpoint} is already mounted")
    if not args.foreground:
        log_path = args.log or default_log_path(mountpoint)
        mount.spawn_server(args.argv, log_path)
        return 0

    mount.setup_logging(args.debug)
    try:
        images = [image for image_type in IMAGE_TYPES for image in image_type.images_from_args(args)]
        if not images:
            raise UserError("no images to mount: give --linear DEV, --system DEV --diff DIFF, --bow DEV or --snapshot DEV --store FILE")
    except UserError as exc:
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"{exc.exit_status} {exc}\n".encode())
        raise
    os.chdir("/")  # a daemon must not pin the directory it was started from
    return mount.run_server(os.path.abspath(mountpoint), images, workers=args.workers,
                            debug=args.debug, ready_fd=args.ready_fd)


# -- umount ------------------------------------------------------------------------

def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process `pid` is gone (or a zombie); False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat_file:
                if stat_file.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def cmd_umount(args) -> int:
    mountpoint = args.mountpoint
    if mounted_at(mountpoint) != "fuse.fusesnap":
        raise UserError(f"{mountpoint} is not a fusesnap mount")
    busy = [f"{device} ({os.path.basename(backing)})"
            for device, backing in loop_devices_backed_under(mountpoint)]
    if busy:
        raise UserError(f"{mountpoint} is in use by {', '.join(busy)}: detach with losetup -d first",
                        EXIT_FAILED)
    try:
        pid = int(os.getxattr(mountpoint, XATTR_PID))
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise UserError(f"cannot reach the server of {mountpoint}: {exc.strerror}",
                            EXIT_FAILED) from None
        # "Transport endpoint is not connected": the server died; remove its mount.
        result = subprocess.run(["umount", "-l", mountpoint], capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"umount -l {mountpoint} failed: {result.stderr.strip()}",
                            EXIT_FAILED)
        print(f"{mountpoint}: server was not running ({exc.strerror}); mount removed")
        return 0
    send_command(mountpoint, "flush")
    result = subprocess.run(["umount", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"umount {mountpoint} failed: {result.stderr.strip()}", EXIT_FAILED)
    if not wait_for_exit(pid, timeout=120):
        raise UserError(f"server {pid} did not exit after unmount; see {default_log_path(mountpoint)}",
                        EXIT_FAILED)
    return 0


# -- status and control ------------------------------------------------------------

# -- status ------------------------------------------------------------------------

def cmd_status(args) -> int:
    sys.stdout.write(read_status(args.mountpoint, args.json))
    return 0



# -- the parser --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fusesnap", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands.required = True

    p = commands.add_parser("mount", help="mount images on MNT",
                            description="Mount virtual block images as files in MOUNTPOINT. "
                            "Returns once the mount is usable; the server keeps running in the "
                            f"background and logs to {LOG_DIR}/<mountpoint with / as ->.log "
                            "unless --foreground or --log is given.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    for image_type in IMAGE_TYPES:
        image_type.add_mount_arguments(p)
    p.add_argument("--foreground", action="store_true", help="serve in this process, logging to stderr")
    p.add_argument("--debug", action="store_true", help="log every request (verbose)")
    p.add_argument("--log", metavar="FILE", help="log file of the background server")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="concurrent request handlers (default 1: fastest for page-cached I/O)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(run=cmd_mount)

    p = commands.add_parser("umount", help="flush, unmount and stop the server")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(run=cmd_umount)

    p = commands.add_parser("status", help="print MOUNTPOINT/.status")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print .status.json instead")
    p.set_defaults(run=cmd_status)

    for image_type in IMAGE_TYPES:
        image_type.add_commands(commands)

    p = commands.add_parser("diff", help="make an update diff from OLD to NEW")
    diffing.add_diff_arguments(p)
    p.set_defaults(run=diffing.run_diff)

    p = commands.add_parser("diff-info", help="describe and check an update diff")
    diffing.add_diff_info_arguments(p)
    p.set_defaults(run=diffing.run_diff_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except UserError as exc:
        print(f"fusesnap: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("fusesnap: interrupted", file=sys.stderr)
        return 130
