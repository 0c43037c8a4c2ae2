"""Logs that scale: a million bad items do not write a million lines."""

from __future__ import annotations

import logging

from batch_classify.output.progress import ErrorLog


def test_the_first_errors_of_each_kind_are_named_then_counted(caplog):
    errors = ErrorLog(interval_s=3600)
    with caplog.at_level(logging.WARNING):
        for i in range(10_000):
            kind = ("OSError", "CorruptExif", "TruncatedShard")[i % 3]
            errors.add(f"img{i}", f"{kind}: broken number {i}")
        errors.flush()
    named = [m for m in caplog.messages if m.startswith("item img")]
    assert len(named) == 3 * ErrorLog.FIRST
    assert {m.split(": ")[1] for m in named} == {"OSError", "CorruptExif", "TruncatedShard"}
    summary = caplog.messages[-1]
    left = 10_000 - 3 * ErrorLog.FIRST
    assert summary.startswith(f"{left} more item error(s)")
    assert "CorruptExif 3330" in summary and "OSError 3331" in summary and "TruncatedShard 3330" in summary
    assert len(caplog.messages) < 20


def test_counts_come_once_per_interval(caplog, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("batch_classify.output.progress.time.monotonic", lambda: clock[0])
    errors = ErrorLog(interval_s=10)
    with caplog.at_level(logging.WARNING):
        for second in range(100):
            clock[0] = 1000.0 + second
            for i in range(50):
                errors.add(f"x{second}-{i}", "OSError: gone")
        errors.flush()
    summaries = [m for m in caplog.messages if "more item error(s)" in m]
    assert 9 <= len(summaries) <= 11
    assert sum(int(m.split()[0]) for m in summaries) == 100 * 50 - ErrorLog.FIRST
