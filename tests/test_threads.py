"""Threads: the default never oversubscribes the cores, and an explicit $OMP_NUM_THREADS wins (issue 14, item 7)."""

from __future__ import annotations

import os

import pytest

from mupt.errors import ConfigError
from mupt.threads import default_threads, default_workers, idle_cores, oversubscribed, resolve_threads, usable_cores


def test_default_threads_never_oversubscribe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert usable_cores() == cores
    for load in (None, 0.0, cores / 2, 4.0 * cores):
        for workers in range(1, 2 * cores + 2):
            t = default_threads(workers, load=load)
            assert t >= 1 and (workers * t <= cores or t == 1), (workers, t, load)
            assert not oversubscribed(t, workers) or workers > cores
    assert default_threads(1, load=0.0) == cores  # an idle machine: every usable core
    assert 1 <= default_workers() <= min(8, cores)


def test_omp_num_threads_is_the_users_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(1) == 3 and default_threads(8) == 3 and resolve_threads(None, 4) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")  # ignored, as torch ignores it
    assert resolve_threads(None, 1) == idle_cores()


def test_bad_thread_counts_are_one_line_errors() -> None:
    assert resolve_threads(5, 1) == 5  # explicit: taken as given (oversubscribed() lets the caller warn)
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=f"--threads {bad}: must be at least 1"):
            resolve_threads(bad)


def test_cores_other_jobs_keep_busy_are_left_to_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch thread descheduled by another job stalls the intra-op pool (87x slower steps measured,
    mupt/threads.py), so the default counts the load average's busy cores as taken."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert [idle_cores(load) for load in (0.0, 0.4, 0.6, 1.0, 2.2, 3.0, 3.6, 9.0)] == [4, 4, 3, 3, 2, 1, 1, 1]
    assert default_threads(1, load=2.0) == 2 and default_threads(2, load=2.0) == 1 and default_threads(3, load=0) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0.0, 0.0))  # the default reads the 1-minute load
    assert default_threads(1) == 1 and resolve_threads(None) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's explicit choice still wins on a busy machine
    assert default_threads(1) == 4
    # a process confined to 2 of a 16-core host's cores counts its share of the host's load
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert [idle_cores(load) for load in (0.0, 4.0, 8.0, 12.0, 16.0)] == [2, 2, 1, 1, 1]
