"""Threads: the default never oversubscribes the cores, and an explicit $OMP_NUM_THREADS wins (issue 14, item 7)."""

from __future__ import annotations

import os

import pytest

from mupt.errors import ConfigError
from mupt.threads import default_threads, default_workers, oversubscribed, resolve_threads, usable_cores


def test_default_threads_never_oversubscribe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert usable_cores() == cores
    for workers in range(1, 2 * cores + 2):
        t = default_threads(workers)
        assert t >= 1 and (workers * t <= cores or t == 1), (workers, t)
        assert not oversubscribed(t, workers) or workers > cores
    assert default_threads(1) == cores
    assert 1 <= default_workers() <= min(8, cores)


def test_omp_num_threads_is_the_users_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(1) == 3 and default_threads(8) == 3 and resolve_threads(None, 4) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")  # ignored, as torch ignores it
    assert resolve_threads(None, 1) == usable_cores()


def test_bad_thread_counts_are_one_line_errors() -> None:
    assert resolve_threads(5, 1) == 5  # explicit: taken as given (oversubscribed() lets the caller warn)
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=f"--threads {bad}: must be at least 1"):
            resolve_threads(bad)
