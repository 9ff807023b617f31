"""edmlab.console.progress: what sampling, FID features, image checks and likelihoods show while they run."""

from __future__ import annotations

import logging

import pytest

from edmlab import console


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(console.time, "perf_counter", clock)
    monkeypatch.setattr(console.sys.stderr, "isatty", lambda: False, raising=False)
    return clock


def test_log_file_gets_a_line_every_30_seconds_and_one_at_the_end(clock, caplog):
    caplog.set_level(logging.INFO, logger="edmlab.console")
    with console.progress("sampling", 100) as advance:
        for seconds, n in [(10, 10), (29, 10), (31, 20), (50, 20), (62, 30), (65, 10)]:
            clock.now = 100 + seconds
            advance(n)
    assert [r.getMessage() for r in caplog.records] == [
        "sampling: 40/100 images, 1.3 img/s, ETA 46 s",      # 31 s: 40 images, 60 left at 40/31 img/s
        "sampling: 90/100 images, 1.5 img/s, ETA 7 s",       # 62 s: 30 s after the last line
        "sampling: 100/100 images, 1.5 img/s, ETA 0 s",      # the end
    ]


def test_disabled_or_empty_progress_says_nothing(clock, caplog):
    caplog.set_level(logging.INFO, logger="edmlab.console")
    with console.progress("log-likelihood", 5, enabled=False) as advance:
        clock.now += 60
        advance(5)
    with console.progress("checking 0 images", 0) as advance:
        pass
    assert caplog.records == []


def test_terminal_gets_a_bar_instead_of_log_lines(clock, caplog, monkeypatch):
    monkeypatch.setattr(console.sys.stderr, "isatty", lambda: True, raising=False)
    caplog.set_level(logging.INFO, logger="edmlab.console")
    with console.progress("Inception features of x", 3, transient=True) as advance:
        clock.now += 60
        advance(3)
    assert caplog.records == []
