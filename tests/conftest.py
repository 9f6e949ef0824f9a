"""Fixtures: real fusesnap mounts, loop devices and ext4, always cleaned up.

Tests that mount need root and /dev/fuse (as in CI). At the end of the session a
check fails the run if anything was left behind: a fusesnap mount, a loop device on
a test file, or a server process.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from harness import fusesnap_mount, leftovers, loop_device

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="needs root and /dev/fuse for real FUSE mounts and loop devices")


def pytest_collection_modifyitems(items):
    for item in items:
        if "mount" in item.keywords:
            item.add_marker(needs_root)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(tmp_path_factory):
    """The whole run must leave no mount, loop device or server process behind."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    left = leftovers(base)
    assert not left, f"the test run left behind: {left}"


@pytest.fixture
def stack():
    """An ExitStack closed at the end of the test (LIFO: loop devices before mounts)."""
    with contextlib.ExitStack() as exit_stack:
        yield exit_stack


@pytest.fixture
def mount(tmp_path, stack):
    """mount(*image_args) -> Mount, torn down at the end of the test."""
    counter = iter(range(100))

    def _mount(*image_args):
        return stack.enter_context(fusesnap_mount(tmp_path / f"mnt{next(counter)}", *image_args))

    return _mount


@pytest.fixture
def loop(stack):
    """loop(path, **options) -> '/dev/loopN', detached at the end of the test."""

    def _loop(path: Path, **options):
        return stack.enter_context(loop_device(path, **options))

    return _loop
