"""CPU threads: one default for every command that trains, chosen so it cannot oversubscribe.

Torch's intra-op pool defaults to every core of the machine in every process; with several worker
processes (``tune --workers``, ``check transfer --workers``) or a machine shared with other jobs,
that oversubscribes the cores and small models run several times slower (issue 14 measured 12.4 s
vs 2.56 s for eight steps at d_model 256 on a loaded 2-core machine).  The default here gives each
of ``workers`` processes ``idle cores // workers`` threads (at least 1), so workers x threads <= cores;
``$OMP_NUM_THREADS``, when set, is taken as the user's explicit per-process choice.

Cores that other jobs keep busy count as taken: a torch thread that the scheduler takes off its core
stalls the whole intra-op pool at the next barrier, so on 2 cores beside two other training jobs a
step at d_model 32 took 2.44 s with 2 threads and 0.028 s with 1 (87x, measured 2026-11-30; with
synthetic competitors, ``benchmarks/threads.py`` part 3, 2 threads beside one busy core ran 0.44-0.54x
as fast as 1).  The default therefore uses the idle cores, read once from the 1-minute load average
when the command starts (:func:`idle_cores`).
"""

from __future__ import annotations

import math
import os

import torch

from mupt.errors import ConfigError

#: How the default is shown in ``--help``.
THREADS_HELP = (
    "Torch threads per worker process; the default ($OMP_NUM_THREADS when set, else the idle cores // workers: "
    "usable cores minus the load average of other jobs) never oversubscribes (workers x threads <= cores)."
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


def idle_cores(load: float | None = None) -> int:
    """Usable cores that other jobs are not keeping busy (at least 1).

    ``load``: runnable processes on the whole machine, by default the 1-minute load average
    (``os.getloadavg()``, read at the call; where it is unavailable every usable core counts as idle).
    The machine's load is shared out over its ``os.cpu_count()`` cores, so a process confined to some
    of them (affinity, a container's cpuset) counts its share: idle = usable - load x usable / cpu_count,
    rounded to the nearest core, within [1, usable].
    """
    cores = usable_cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover - no load average on this platform
            return cores
    busy = max(0.0, load) * cores / max(cores, os.cpu_count() or cores)
    return max(1, min(cores, math.floor(cores - busy + 0.5)))


def default_threads(workers: int = 1, load: float | None = None) -> int:
    """Threads per worker process: ``$OMP_NUM_THREADS`` when set, else ``idle_cores(load) // workers``
    (at least 1), so that ``workers * threads`` fits in the cores other jobs leave idle (and never
    exceeds ``usable_cores()``).  ``load`` as :func:`idle_cores` (default: the 1-minute load average)."""
    return env_threads() or max(1, idle_cores(load) // max(1, workers))


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
