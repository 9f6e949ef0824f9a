"""fusesnap as the system meets it: `mount -t fuse.fusesnap` and /etc/fstab lines (run
by mount.fuse3 as `fusesnap SOURCE MOUNTPOINT -o OPTIONS`), a plain `umount` ending
the server, and the README's flows run exactly as written.

mount.fuse3 finds `fusesnap` on a fixed PATH (/usr/local/bin among others). So that
these tests use this checkout whatever /usr/local/bin/fusesnap points at, they run in
a private mount namespace with a directory holding this checkout's `fusesnap` bound
over /usr/local/bin.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fusesnap.cli import (build_parser, default_log_path, from_mount_helper, subcommands,
                          wait_for_exit)
from fusesnap.devices import loop_devices_backed_under
from fusesnap.errors import UserError
from harness import detach_loop, fusesnap, is_mounted, run, sparse_file, random_update_pair

README = Path(__file__).resolve().parent.parent / "README.md"


def mount_options() -> set[str]:
    return set(subcommands(build_parser())["mount"]._option_string_actions)


def test_mount_options_become_the_options_of_fusesnap_mount():
    argv = ["none", "/mnt/v", "-o", "rw,system=/dev/sda1,diff=/var/lib/fusesnap/u.diff,"
            "merge_rate=4,no-bg-update,dev,suid"]
    assert from_mount_helper(argv, mount_options()) == [
        "mount", "/mnt/v", "--system", "/dev/sda1", "--diff", "/var/lib/fusesnap/u.diff",
        "--merge-rate", "4", "--no-bg-update"]


@pytest.mark.parametrize("argv, mentions", [
    (["none", "/mnt/v", "-o", "frob=1"], "unknown mount option 'frob'"),
    (["none", "/mnt/v", "-o", "foreground"], "unknown mount option 'foreground'"),
    (["/dev/sda1", "/mnt/v", "-o", "diff=x"], "a mount source must be 'none'"),
    (["none", "/mnt/v", "linear=x"], "takes SOURCE MOUNTPOINT -o OPTIONS"),
])
def test_bad_mount_helper_command_lines_are_refused(argv, mentions):
    with pytest.raises(UserError, match=re.escape(mentions)):
        from_mount_helper(argv, mount_options())


def this_checkouts_fusesnap(tmp_path: Path) -> Path:
    """A directory holding a `fusesnap` that runs this checkout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "fusesnap").write_text(f'#!/bin/sh\nexec {sys.executable} -m fusesnap "$@"\n')
    (bin_dir / "fusesnap").chmod(0o755)
    return bin_dir


def in_private_mount_namespace(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a shell script where /usr/local/bin holds only this checkout's fusesnap;
    whatever it mounted is lazily unmounted when it ends, so its server exits."""
    bin_dir = this_checkouts_fusesnap(tmp_path)
    prologue = (f"set -eu\ncd {tmp_path}\nmount --bind {bin_dir} /usr/local/bin\n"
                "trap 'mountpoint -q mnt && umount -l mnt || true' EXIT\n")
    return run(["unshare", "--mount", "--propagation", "private", "sh", "-c", prologue + script],
               check=False)


@pytest.mark.mount
def test_mount_t_fuse_fusesnap_then_a_plain_umount_ends_the_server(tmp_path):
    device = sparse_file(tmp_path / "dev.img", 16 << 20)
    (tmp_path / "mnt").mkdir()
    result = in_private_mount_namespace(f"""
        mount -t fuse.fusesnap none {tmp_path}/mnt -o linear={device},log={tmp_path}/mnt.log
        printf 'written through linear.img' | dd of=mnt/linear.img conv=notrunc status=none
        {sys.executable} -c 'import os; print(int(os.getxattr("mnt", "user.fusesnap.pid")))'
        umount mnt
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    server = int(result.stdout.split()[-1])
    assert wait_for_exit(server, 30), "a plain umount ends the server"
    assert device.read_bytes()[:26] == b"written through linear.img"
    log = (tmp_path / "mnt.log").read_text()
    assert f"serving linear.img: linear {16 << 20} {device}" in log
    assert "FUSE session ended" in log


@pytest.mark.mount
def test_an_fstab_line_with_the_update_overlay(tmp_path):
    random_update_pair(tmp_path)
    fusesnap("diff", "old.img", "new.img", "-o", "u.diff", cwd=tmp_path)
    (tmp_path / "dev.img").write_bytes((tmp_path / "old.img").read_bytes())
    (tmp_path / "mnt").mkdir()
    (tmp_path / "fstab").write_text(
        f"none {tmp_path}/mnt fuse.fusesnap system={tmp_path}/dev.img,diff={tmp_path}/u.diff,"
        f"log={tmp_path}/mnt.log,nofail,x-systemd.requires={tmp_path}/dev.img 0 0\n")
    result = in_private_mount_namespace(f"""
        mount --fstab fstab {tmp_path}/mnt
        fusesnap update wait mnt
        cmp mnt/system.img new.img
        {sys.executable} -c 'import os; print(int(os.getxattr("mnt", "user.fusesnap.pid")))'
        umount mnt
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert wait_for_exit(int(result.stdout.split()[-1]), 30)
    assert (tmp_path / "dev.img").read_bytes() == (tmp_path / "new.img").read_bytes()
    assert not is_mounted(tmp_path / "mnt")


@pytest.mark.mount
def test_a_bad_mount_option_fails_the_mount_with_one_line(tmp_path):
    (tmp_path / "mnt").mkdir()
    result = in_private_mount_namespace(
        f"mount -t fuse.fusesnap none {tmp_path}/mnt -o linear=/nonexistent,frob=1", tmp_path)
    assert result.returncode != 0
    assert "fusesnap: unknown mount option 'frob'" in result.stderr


def readme_block(name: str) -> str:
    """The ```sh block of the README marked `<!-- tested: NAME ... -->`."""
    blocks = dict(re.findall(r"<!-- tested: (.+?) \(.*?-->\n```sh\n(.*?)```", README.read_text(),
                             re.DOTALL))
    return blocks[name]


def run_flow(name: str, directory: Path) -> subprocess.CompletedProcess:
    """Run a README block with bash -e in `directory`; whatever it leaves mounted or
    attached when it fails is cleaned up (filesystem, loop devices, mount), and so is
    the server's log in /var/log/fusesnap."""
    env = {**os.environ, "PATH": f"{this_checkouts_fusesnap(directory)}:{os.environ['PATH']}"}
    try:
        return run(["bash", "-euo", "pipefail", "-c", readme_block(name)], cwd=directory, env=env)
    finally:
        if is_mounted(directory / "fs"):
            run(["umount", "-l", str(directory / "fs")], check=False)
        for loop, backing in loop_devices_backed_under(directory / "mnt"):
            detach_loop(loop, backing)
        if is_mounted(directory / "mnt"):
            if fusesnap("umount", directory / "mnt", check=False).returncode:
                run(["umount", "-l", str(directory / "mnt")], check=False)
        Path(default_log_path(directory / "mnt")).unlink(missing_ok=True)


@pytest.mark.mount
def test_the_readme_update_flow_runs_as_written(tmp_path):
    random_update_pair(tmp_path)
    result = run_flow("update flow", tmp_path)
    assert "system.img: update " in result.stdout
    assert (tmp_path / "dev.img").read_bytes() == (tmp_path / "new.img").read_bytes()
    assert not is_mounted(tmp_path / "mnt")


@pytest.mark.mount
def test_the_readme_linear_flow_runs_as_written(tmp_path):
    run_flow("linear flow", tmp_path)
    assert not is_mounted(tmp_path / "mnt")
    run(["e2fsck", "-fn", str(tmp_path / "disk.img")])
    # fstrim punched the free space out of disk.img: it takes far less than 64 MiB
    assert os.stat(tmp_path / "disk.img").st_blocks * 512 < 32 << 20
