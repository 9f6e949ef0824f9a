"""Bad input: a one-line error on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import pytest

from harness import fusesnap

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


def test_diff_info_of_a_corrupt_diff_exits_1(images, tmp_path):
    old, new = images
    diff = tmp_path / "d.diff"
    fusesnap("diff", old, new, "-o", diff, "--quiet")
    diff.write_bytes(b"garbage!" + diff.read_bytes()[8:])
    assert_one_line_error(fusesnap("diff-info", diff, check=False), status=1, mentions="magic")


@pytest.mark.parametrize("option", [["--merge-rate", "nan"], ["--merge-rate", "-1"],
                                    ["--cache-mib", "0"]])
def test_bad_mount_option_values(images, tmp_path, option):
    old, _ = images
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", "--system", old, "--diff", old, *option,
                      check=False)
    assert_one_line_error(result)


def test_unwritable_log_file(images, tmp_path):
    old, _ = images
    (tmp_path / "mnt").mkdir()
    result = fusesnap("mount", tmp_path / "mnt", "--linear", old, "--log", "/proc/nope/x.log",
                      check=False)
    assert_one_line_error(result, mentions="log file")
