"""The checkpoint benchmark runs at tiny size and reports sound figures (never its speed)."""

import math

from bench import checkpoint


def test_both_modes_report_finite_times_and_async_blocks_no_longer_than_it_commits(capsys):
    rows = checkpoint.main(["--size", "tiny", "--repeats", "1"])
    assert [row["async_save"] for row in rows] == [True, False]
    for row in rows:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("blocking_ms", "committed_ms"))
        assert row["blocking_ms"] <= row["committed_ms"]
    printed = capsys.readouterr().out
    assert "| True |" in printed and "| False |" in printed
    assert "blocking time, async over sync:" in printed
