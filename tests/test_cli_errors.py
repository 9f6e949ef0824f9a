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
