"""The `fusesnap` command line: the user's interface to everything.

    fusesnap mount MNT [--linear DEV] [--system DEV --diff DIFF] [--foreground] [--debug]
    fusesnap umount MNT
    fusesnap status MNT [--json]
    fusesnap update pause|resume|wait MNT
    fusesnap upgrade MNT [--exec PROGRAM]
    fusesnap diff OLD NEW -o DIFF
    fusesnap diff-info DIFF [--verify]
    fusesnap SOURCE MNT -o OPTIONS      (as mount.fuse3 runs it for `mount -t fuse.fusesnap`)

Every user error is one line on stderr, `fusesnap: <reason>`, with the exit status
of `fusesnap.errors` (2 for bad input, 1 for an operation that failed); never a
traceback. Every path is resolved in the caller's directory while parsing
(`fusesnap.arguments`).

Only the commands that serve a mount (`mount`, `upgrade`, `takeover`) import the
FUSE side (pyfuse3: `mount`, `supervisor`, `upgrade`); the others are parsed without
it (`main`), so that an offline command such as `bow restore` starts sooner.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import time

from . import __version__, arguments, diffing
from .devices import loop_devices_backed_under, processes_using
from .errors import EXIT_FAILED, EXIT_USAGE, UserError
from .control import XATTR_PID, mounted_at, read_status, send_command
from .images import IMAGE_TYPES

LOG_DIR = "/var/log/fusesnap"
# Commands that work without root; every other one mounts or talks to a mount.
ROOTLESS_COMMANDS = ("diff", "diff-info")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"fusesnap: {message} (see '{self.prog} --help')\n")


def default_log_path(mountpoint: str) -> str:
    escaped = os.path.realpath(mountpoint).strip("/").replace("/", "-") or "root"
    return os.path.join(LOG_DIR, escaped + ".log")


# -- mount -------------------------------------------------------------------------

def cmd_mount(args) -> int:
    from . import mount, supervisor, upgrade  # the FUSE side (see the module docstring)

    mountpoint = os.path.abspath(args.mountpoint)  # before the chdir below
    if not os.path.isdir(mountpoint):
        raise UserError(f"mountpoint {mountpoint} is not a directory")
    if mounted_at(mountpoint):
        raise UserError(f"{mountpoint} is already mounted")
    if not args.foreground:
        log_path = args.log or default_log_path(mountpoint)
        mount.spawn_server(without_option(args.argv, "--log"), log_path)
        return 0

    if (args.ready_fd is not None and not args.no_failover
            and supervisor.LINK_VARIABLE not in os.environ):
        # Started by `fusesnap mount` (not --foreground typed by a user): this process
        # supervises, the server is its child (fusesnap/supervisor.py).
        mount.setup_logging(args.debug, args.log, mount.ReadyChannel(None))
        return supervisor.run_supervisor(args.argv, mountpoint, args.ready_fd, args.max_failovers)
    channel = mount.ReadyChannel(args.ready_fd)
    mount.setup_logging(args.debug, args.log, channel)
    try:
        images = [image for image_type in IMAGE_TYPES for image in image_type.images_from_args(args)]
        if not images:
            raise UserError("no images to mount: give --linear DEV, --system DEV --diff DIFF, "
                            "--bow DEV or --snapshot DEV --store FILE")
        mount.check_discards(images)
    except UserError as exc:
        channel.failed(exc)
        raise
    upgrade.record_launch(args.argv)  # a successor re-opens the images from these
    os.chdir("/")  # a daemon must not pin the directory it was started from
    return mount.run_server(mountpoint, images, workers=args.workers, debug=args.debug,
                            channel=channel)


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE` (the server is given its own)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


# -- mount(8): `mount -t fuse.fusesnap` and /etc/fstab ----------------------------------

# Options mount(8) and mount.fuse3 pass on, or that belong to them, not to fusesnap.
GENERIC_MOUNT_OPTIONS = frozenset(
    "rw dev nodev suid nosuid exec noexec async sync atime noatime relatime strictatime "
    "nodiratime diratime lazytime nolazytime silent loud defaults auto noauto nofail "
    "_netdev user nouser users".split())
# Options of `fusesnap mount` that make no sense from mount(8).
NOT_MOUNT_OPTIONS = ("foreground", "ready_fd")


def from_mount_helper(argv: list[str], mount_options: set[str]) -> list[str]:
    """mount.fuse3 runs `fusesnap SOURCE MOUNTPOINT [-o OPT[=VALUE],...]`: the same as
    `fusesnap mount MOUNTPOINT --OPT [VALUE] ...` (underscores in OPT may be dashes).
    SOURCE is a placeholder (`none` or `fusesnap`): images are options."""
    source, mountpoint, *rest = argv
    if source not in ("none", "fusesnap"):
        raise UserError(f"unknown command or mount source {source!r}: a mount source must be "
                        "'none' (images are options, e.g. linear=/dev/sdb)")
    options = []
    while rest:
        if rest[0] != "-o" or len(rest) < 2:
            raise UserError(f"as a mount helper, fusesnap takes SOURCE MOUNTPOINT -o OPTIONS, "
                            f"not {' '.join(rest)!r}")
        options += [option for option in rest[1].split(",") if option]
        rest = rest[2:]
    translated = ["mount", mountpoint]
    for option in options:
        name, has_value, value = option.partition("=")
        if name in GENERIC_MOUNT_OPTIONS or name.startswith("x-") or name == "comment":
            continue
        flag = "--" + name.replace("_", "-")
        if name.replace("-", "_") in NOT_MOUNT_OPTIONS or flag not in mount_options:
            raise UserError(f"unknown mount option {name!r} (see 'fusesnap mount --help': "
                            "--linear DEV is linear=DEV)")
        translated += [flag, value] if has_value else [flag]
    return translated


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


def refuse_while_processes_use(mountpoint: str) -> None:
    users = [f"{name} (pid {pid})" for pid, name in processes_using(mountpoint)]
    if users:
        raise UserError(f"{mountpoint} is in use by {', '.join(users)}: stop them or let them "
                        "close its files first", EXIT_FAILED)


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
    refuse_while_processes_use(mountpoint)
    supervisor_pid = json.loads(read_status(mountpoint, True)).get("server", {}).get("supervisor_pid")
    send_command(mountpoint, "flush")
    result = subprocess.run(["umount", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        refuse_while_processes_use(mountpoint)  # one started using it meanwhile
        raise UserError(f"umount {mountpoint} failed: {result.stderr.strip()}", EXIT_FAILED)
    for process in filter(None, (pid, supervisor_pid)):  # the supervisor ends after its server
        if not wait_for_exit(process, timeout=120):
            raise UserError(f"server {process} did not exit after unmount; see "
                            f"{default_log_path(mountpoint)}", EXIT_FAILED)
    return 0


# -- status ------------------------------------------------------------------------

def cmd_status(args) -> int:
    """.status (or .status.json), then, below the lines, why any image is in error
    (`.status` itself stays one line of figures per image)."""
    sys.stdout.write(read_status(args.mountpoint, args.json))
    if not args.json:
        images = json.loads(read_status(args.mountpoint, True))["images"]
        for name, figures in images.items():
            if figures.get("error"):
                print(f"{name}: error: {figures['error']}")
    return 0


# -- the parser --------------------------------------------------------------------

HELP_TOP = """\
fusesnap exposes virtual block images as files in a FUSE mount; attach a loop device
to one and use it as a block device. Mounting and the commands that talk to a mount
need root; diff and diff-info do not."""

HELP_EXIT = """\
exit status: 0 done; 1 the operation failed (busy mount, bad diff found by diff-info,
full disk, merge stopped); 2 bad input (bad arguments, missing device, corrupt or
mismatched diff). Errors are one line on stderr.

/etc/fstab: none /mnt/v fuse.fusesnap linear=/dev/sdb,nofail 0 0
(every mount option OPTION[=VALUE] is the option --OPTION [VALUE] of `fusesnap mount`)"""


class VersionAction(argparse.Action):
    """--version: fusesnap's version, and whether this pyfuse3 passes discards on."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and whether "
                         "discards work, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from . import mount

        print(f"fusesnap {__version__}\n{mount.discards_report()}")
        parser.exit()


def add_command(commands, name: str, summary: str, description: str = "", *,
                mountpoint: bool = True) -> argparse.ArgumentParser:
    """A subcommand with its one-line summary (in `fusesnap --help`) and description."""
    parser = commands.add_parser(name, help=summary, description=description or summary)
    if mountpoint:
        parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=arguments.path)
    return parser


def add_mount_command(commands) -> None:
    from . import supervisor

    p = add_command(commands, "mount", "mount images on MOUNTPOINT",
                    "Mount virtual block images as files in MOUNTPOINT. Returns once the mount "
                    "is usable; the server keeps running in the background and logs to "
                    f"{LOG_DIR}/<mountpoint with / as ->.log unless --foreground or --log is "
                    "given. Each option may be given once.")
    arguments.refuse_repeated_options(p)
    for image_type in IMAGE_TYPES:
        image_type.add_mount_arguments(p)
    p.add_argument("--foreground", action="store_true", help="serve in this process, logging to "
                   "stderr (or to --log)")
    p.add_argument("--debug", action="store_true", help="log every request (verbose)")
    p.add_argument("--log", metavar="FILE", type=arguments.path,
                   help="log file (reopened when logrotate moves it)")
    p.add_argument("--workers", type=arguments.positive_int, default=1, metavar="N",
                   help="concurrent request handlers, >= 1 (default 1: fastest for page-cached I/O)")
    p.add_argument("--no-failover", action="store_true",
                   help="no supervisor: a crash of the server aborts the mount (its loop devices "
                   "fail their I/O) instead of a new server taking over")
    p.add_argument("--max-failovers", type=arguments.positive_int,
                   default=supervisor.DEFAULT_MAX_FAILOVERS, metavar="N",
                   help=f"crashes within {supervisor.CRASH_WINDOW:g} s taken over before the "
                   f"mount is aborted (default {supervisor.DEFAULT_MAX_FAILOVERS})")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(run=cmd_mount)


def build_parser(*, serving: bool = True) -> argparse.ArgumentParser:
    """Every command's parser; without the commands that serve a mount (and the FUSE
    side they import) unless `serving`."""
    examples = "\n\n".join(image_type.USAGE_EXAMPLES for image_type in IMAGE_TYPES)
    parser = OneLineParser(prog="fusesnap", description=HELP_TOP,
                           epilog=f"examples:\n{examples}\n\n{HELP_EXIT}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=VersionAction)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands.required = True

    if serving:
        add_mount_command(commands)
    p = add_command(commands, "umount", "flush, unmount and stop the server",
                    "Flush the images, unmount MOUNTPOINT and wait for its server to exit. "
                    "Refuses, naming them, while loop devices or processes use the mount.")
    p.set_defaults(run=cmd_umount)

    p = add_command(commands, "status", "print MOUNTPOINT/.status (or .status.json)")
    p.add_argument("--json", action="store_true", help="print .status.json instead")
    p.set_defaults(run=cmd_status)

    for image_type in IMAGE_TYPES:
        image_type.add_commands(commands)
    if serving:
        from . import upgrade

        upgrade.add_commands(commands)

    p = add_command(commands, "diff", "make an update diff from OLD to NEW",
                    "Make an update diff (dm-update format) that turns OLD into NEW.",
                    mountpoint=False)
    diffing.add_diff_arguments(p)
    p.set_defaults(run=diffing.run_diff)

    p = add_command(commands, "diff-info", "describe and check an update diff", mountpoint=False)
    diffing.add_diff_info_arguments(p)
    p.set_defaults(run=diffing.run_diff_info)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(action for action in parser._actions
                  if isinstance(action, argparse._SubParsersAction))
    return action.choices


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    # A command that does not serve a mount is parsed without those that do (see the
    # module docstring); --help, --version, the mount(8) helper form and a mistyped
    # command get every one.
    parser = build_parser(serving=False)
    if not argv or argv[0] not in subcommands(parser):
        parser = build_parser()
    try:
        commands = subcommands(parser)
        if len(argv) >= 2 and not argv[0].startswith("-") and argv[0] not in commands:
            argv = from_mount_helper(argv, set(commands["mount"]._option_string_actions))
        args = parser.parse_args(argv)
        args.argv = argv
        if args.command not in ROOTLESS_COMMANDS and os.geteuid() != 0:
            raise UserError(f"fusesnap {args.command} must be run as root")
        return args.run(args)
    except UserError as exc:
        print(f"fusesnap: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("fusesnap: interrupted", file=sys.stderr)
        return 130
