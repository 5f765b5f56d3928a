"""CPU threads: one default for every command that trains, chosen so it cannot oversubscribe.

Torch's intra-op pool defaults to every core of the machine in every process; with several worker
processes (``tune --workers``, ``check transfer --workers``) or a machine shared with other jobs,
that oversubscribes the cores and small models run several times slower (issue 14 measured 12.4 s
vs 2.56 s for eight steps at d_model 256 on a loaded 2-core machine).  The default here gives each
of ``workers`` processes ``cores // workers`` threads (at least 1), so workers x threads <= cores;
``$OMP_NUM_THREADS``, when set, is taken as the user's explicit per-process choice.
``benchmarks/threads.py`` measures the effect.
"""

from __future__ import annotations

import os

import torch

from mupt.errors import ConfigError

#: How the default is shown in ``--help``.
THREADS_HELP = (
    "Torch threads per worker process; the default ($OMP_NUM_THREADS when set, else usable cores // workers) "
    "never oversubscribes (workers x threads <= cores)."
)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def default_workers(limit: int = 8) -> int:
    """Worker processes when none are asked for: one per usable core, at most ``limit``."""
    return max(1, min(limit, usable_cores()))


def env_threads() -> int | None:
    """``$OMP_NUM_THREADS`` when it is set to a positive integer (the user's explicit per-process choice)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def default_threads(workers: int = 1) -> int:
    """Threads per worker process: ``$OMP_NUM_THREADS`` when set, else ``usable_cores() // workers``
    (at least 1), so that ``workers * threads <= usable_cores()``."""
    return env_threads() or max(1, usable_cores() // max(1, workers))


def resolve_threads(threads: int | None, workers: int = 1, flag: str = "--threads") -> int:
    """``threads`` validated (``None``: :func:`default_threads`).  Raises ConfigError when < 1."""
    if threads is None:
        return default_threads(workers)
    if threads < 1:
        raise ConfigError(f"{flag} {threads}: must be at least 1 (or leave it out for cores // workers)")
    return threads


def oversubscribed(threads: int, workers: int = 1) -> bool:
    """True when ``workers * threads`` exceeds the usable cores (worth a warning, not an error)."""
    return workers * threads > usable_cores()


def set_threads(threads: int) -> None:
    """Set torch's intra-op threads for this process."""
    torch.set_num_threads(threads)
