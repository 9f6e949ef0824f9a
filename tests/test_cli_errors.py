"""Bad input: a one-line error on stderr that says what is wrong and what was expected,
with exit status 2 (1 for an operation that failed), never a traceback."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time

import pytest

import fusesnap as fusesnap_package
from fusesnap.cli import build_parser, subcommands
from fusesnap.images import IMAGE_TYPES
from harness import FUSESNAP, fusesnap, fusesnap_mount, run, sparse_file

pytestmark = pytest.mark.mount


def assert_one_line_error(result, *, status=2, mentions=""):
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fusesnap: ")
    assert mentions in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_device(tmp_path):
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", "--linear", tmp_path / "nope.raw", check=False)
    assert_one_line_error(result, mentions="no such device")


def test_bare_device_name_means_dev(tmp_path):
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", "--linear", "no-such-disk9", check=False)
    assert_one_line_error(result, mentions="/dev/no-such-disk9")


def test_mountpoint_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "dev.raw").write_bytes(bytes(1 << 20))
    result = fusesnap("mount", tmp_path / "file", "--linear", tmp_path / "dev.raw", check=False)
    assert_one_line_error(result, mentions="not a directory")


def test_mountpoint_already_mounted(mount, tmp_path):
    (tmp_path / "dev.raw").write_bytes(bytes(1 << 20))
    m = mount("--linear", tmp_path / "dev.raw")
    result = fusesnap("mount", m.mountpoint, "--linear", tmp_path / "dev.raw", check=False)
    assert_one_line_error(result, mentions="already mounted")


def test_no_image_options(tmp_path):
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", check=False)
    assert_one_line_error(result, mentions="no images")


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["mount"], ["status"]])
def test_bad_command_lines(argv):
    assert_one_line_error(fusesnap(*argv, check=False))


def test_status_of_something_not_mounted(tmp_path):
    assert_one_line_error(fusesnap("status", tmp_path, check=False), mentions="not a fusesnap mount")


@pytest.fixture
def images(tmp_path):
    old, new = tmp_path / "old.raw", tmp_path / "new.raw"
    old.write_bytes(bytes(1 << 20))
    new.write_bytes(b"\1" * (1 << 20))
    return old, new


@pytest.mark.parametrize("case, mentions", [
    ("old-is-a-directory", "neither a regular file"),
    ("new-missing", "cannot open NEW"),
    ("output-dir-missing", "is not a directory"),
    ("output-is-a-directory", "it is a directory"),
    ("new-larger", "larger than OLD"),
])
def test_diff_bad_input(images, tmp_path, case, mentions):
    old, new = images
    out = tmp_path / "out.diff"
    if case == "old-is-a-directory":
        old = tmp_path
    elif case == "new-missing":
        new = tmp_path / "missing.raw"
    elif case == "output-dir-missing":
        out = tmp_path / "nowhere" / "out.diff"
    elif case == "output-is-a-directory":
        out = tmp_path
    elif case == "new-larger":
        new.write_bytes(bytes(2 << 20))
    assert_one_line_error(fusesnap("diff", old, new, "-o", out, check=False), mentions=mentions)
    assert not out.is_file()


def test_diff_info_of_a_file_that_is_not_a_diff_says_so(images, tmp_path):
    old, new = images
    diff = tmp_path / "d.diff"
    fusesnap("diff", old, new, "-o", diff, "--quiet")
    diff.write_bytes(b"garbage!" + diff.read_bytes()[8:])
    assert_one_line_error(fusesnap("diff-info", diff, check=False), status=1,
                          mentions=f"{diff} is not an update diff")
    assert_one_line_error(fusesnap("diff-info", old, check=False), status=1,
                          mentions=f"{old} is not an update diff")


def test_diff_info_of_a_truncated_diff_says_how_much_is_there(images, tmp_path):
    old, new = images
    diff = tmp_path / "d.diff"
    fusesnap("diff", old, new, "-o", diff, "--quiet")
    whole = diff.read_bytes()
    cut = len(whole) - 100
    diff.write_bytes(whole[:cut])
    assert_one_line_error(fusesnap("diff-info", diff, check=False), status=1,
                          mentions=f"{diff} is truncated ({cut} of {len(whole)} bytes)")
    diff.write_bytes(whole[:40])
    assert_one_line_error(fusesnap("diff-info", diff, check=False), status=1,
                          mentions=f"{diff} is truncated (40 bytes")


@pytest.mark.parametrize("option, expected", [
    (["--merge-rate", "nan"], "argument --merge-rate: expected a number > 0, got 'nan'"),
    (["--merge-rate", "-1"], "argument --merge-rate: expected a number > 0, got '-1'"),
    (["--merge-rate", "abc"], "argument --merge-rate: expected a number > 0, got 'abc'"),
    (["--merge-rate", "0"], "argument --merge-rate: expected a number > 0, got '0'"),
    (["--cache-mib", "0"], "argument --cache-mib: expected a whole number >= 1, got 0"),
    (["--cache-mib", "x"], "argument --cache-mib: expected a whole number >= 1, got 'x'"),
    (["--workers", "0"], "argument --workers: expected a whole number >= 1, got 0"),
    (["--workers", "-1"], "argument --workers: expected a whole number >= 1, got -1"),
])
def test_bad_mount_option_values_say_what_was_expected(images, tmp_path, option, expected):
    old, _ = images
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", "--system", old, "--diff", old, *option,
                      check=False)
    assert_one_line_error(result, mentions=expected)


def test_a_repeated_image_option_is_refused(images, tmp_path):
    old, new = images
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", "--linear", old, "--linear", new, check=False)
    assert_one_line_error(result, mentions="argument --linear: given more than once")


def test_an_empty_device_is_refused(tmp_path):
    (tmp_path / "mnt").mkdir()
    (tmp_path / "empty.img").write_bytes(b"")
    result = fusesnap("mount", tmp_path / "mnt", "--linear", tmp_path / "empty.img", check=False)
    assert_one_line_error(result, mentions=f"{tmp_path / 'empty.img'} is empty")


def test_a_device_of_a_size_not_a_multiple_of_512_mounts_with_a_warning(tmp_path):
    (tmp_path / "odd.img").write_bytes(bytes((1 << 20) + 100))
    mount_args = ("--linear", tmp_path / "odd.img")
    with fusesnap_mount(tmp_path / "mnt", *mount_args) as m:
        assert (m / "linear.img").stat().st_size == (1 << 20) + 100
        assert "not a multiple of 512" in m.log.read_text()
    result = fusesnap("mount", tmp_path / "mnt", *mount_args, "--log", tmp_path / "mnt.log")
    try:
        assert result.stderr.startswith("fusesnap: warning: ")
        assert "not a multiple of 512: a loop device on its image ignores the last 100 bytes" \
            in result.stderr
    finally:
        fusesnap("umount", tmp_path / "mnt")


def test_commands_that_need_root_say_so(images, tmp_path):
    old, _ = images
    (tmp_path / "mnt").mkdir()
    tmp_path.chmod(0o755)
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    for argv in (["mount", tmp_path / "mnt", "--linear", old], ["umount", tmp_path / "mnt"],
                 ["update", "pause", tmp_path / "mnt"]):
        result = run([*as_nobody, *FUSESNAP, *map(str, argv)], check=False)
        assert_one_line_error(result, mentions=f"fusesnap {argv[0]} must be run as root")
    result = run([*as_nobody, *FUSESNAP, "diff-info", "--help"], check=False)
    assert result.returncode == 0


def test_help_teaches_the_workflow_and_every_command_has_a_summary():
    top = fusesnap("--help").stdout
    for image_type in IMAGE_TYPES:
        assert image_type.USAGE_EXAMPLES in top
    assert "need root" in top and "exit status" in top and "fuse.fusesnap" in top
    commands = subcommands(build_parser())
    for name, parser in commands.items():
        summary = re.search(rf"^    {name}\s+(\S.*)$", top, re.MULTILINE)
        assert summary, f"{name} has no one-line summary in --help"
        assert parser.description


def test_version_says_whether_discards_work():
    lines = fusesnap("--version").stdout.splitlines()
    assert lines[0] == f"fusesnap {fusesnap_package.__version__}"
    assert lines[1].startswith("discards: supported (pyfuse3 ")


def test_sigterm_during_diff_leaves_no_temp_file(tmp_path):
    old, new = tmp_path / "old.img", tmp_path / "new.img"
    sparse_file(old, 256 << 20)
    with open(new, "wb") as f:
        for _ in range(64):
            f.write(random.randbytes(4 << 20))
    diff = subprocess.Popen([*FUSESNAP, "diff", old, new, "-o", tmp_path / "d.diff",
                             "--level", "19", "-j", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(".d.diff.*.tmp")):
        assert time.monotonic() < deadline and diff.poll() is None, "no temp file appeared"
        time.sleep(0.01)
    diff.send_signal(signal.SIGTERM)
    assert diff.wait(30) == 128 + signal.SIGTERM
    assert diff.stderr.read() == "fusesnap: terminated\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.img", "old.img"]


def test_unwritable_log_file(images, tmp_path):
    old, _ = images
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", "--linear", old, "--log", "/proc/nope/x.log",
                      check=False)
    assert_one_line_error(result, mentions="log file")
