"""Progress on a terminal (tqdm), nothing otherwise: `fusesnap diff` and `fusesnap
update wait`."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import fusesnap, fusesnap_mount, on_a_terminal, random_update_pair

pytestmark = pytest.mark.mount


def test_diff_draws_a_progress_bar_and_a_summary_on_a_terminal(tmp_path):
    random_update_pair(tmp_path)
    status, drawn = on_a_terminal("diff", "old.img", "new.img", "-o", "u.diff", cwd=tmp_path)
    assert status == 0
    assert "100%|" in drawn and "8.00M/8.00M" in drawn and "256 changed blocks" in drawn
    assert "u.diff: 256 of 2048 blocks changed" in drawn.strip().splitlines()[-1]
    status, drawn = on_a_terminal("diff", "old.img", "new.img", "-o", "u.diff", "--quiet",
                                  cwd=tmp_path)
    assert (status, drawn) == (0, "")


def test_update_wait_draws_blocks_merged_rate_and_time_left_on_a_terminal(tmp_path):
    random_update_pair(tmp_path)
    fusesnap("diff", "old.img", "new.img", "-o", "u.diff", cwd=tmp_path)
    (tmp_path / "dev.img").write_bytes((tmp_path / "old.img").read_bytes())
    # A merge of about 5 s: on a loaded machine `update wait` takes seconds to start.
    with fusesnap_mount(Path("mnt"), "--system", "dev.img", "--diff", "u.diff",
                        "--merge-rate", "0.2", cwd=tmp_path):
        status, drawn = on_a_terminal("update", "wait", "mnt", cwd=tmp_path)
    assert status == 0
    assert "256/256 [" in drawn and "blocks/s, done]" in drawn
    assert any(" blocks/s, merging]" in line and "<" in line for line in drawn.splitlines())
