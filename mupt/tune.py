"""Optuna study on the proxy: search space, storage, sampler, pruner, workers, resume, results.

The objective of a trial is the final validation loss (nats/token) of one proxy training run
(:class:`mupt.train.Trainer`) with the sampled learning rate (and optionally the µP multipliers
that transfer).  Intermediate validation losses are reported every ``train.eval_every`` steps so
the pruner can stop bad trials early; a diverged run (NaN/inf or loss above the bound) ends as
PRUNED with its reason in the trial's ``user_attrs`` and never stops the study.

Storage: by default an Optuna ``JournalStorage`` on ``runs/<study>/journal.log`` (file lock that
is safe for several local processes, no server); ``storage="sqlite:///x.db"`` or
``"postgresql://..."`` uses an RDB with heartbeats and a retry of stale trials, for workers on
many machines.  The trial budget is the TOTAL number of finished (COMPLETE or PRUNED) trials over
all workers: a worker checks it before asking and again inside the trial (a trial that loses the
race is closed as FAIL with reason "over budget"), so the study never overshoots.

Resume: the same study name continues the study.  Each trial records its owner (host, pid,
process start time); trials left RUNNING by a dead local process are marked FAIL on the next
start (journal storage).  On an RDB storage every running trial beats every ``heartbeat_interval``
seconds; a trial silent for twice that (its worker was killed, its machine lost) is marked FAIL by
the next worker to look and queued again with the same parameters (at most twice), and the other
workers wait for it rather than stopping short of the budget.  Nothing here prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import math
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from mupt import __version__
from mupt.config import (
    Arch,
    BestParams,
    OptimizerName,
    RunConfig,
    first_difference,
    load_best,
    mamba2_width_unit,
    save_yaml,
    to_dict,
    with_overrides,
)
from mupt.errors import ConfigError, MuptError, StorageError

# Optuna logs a traceback for every failed trial (Ctrl-C, a lost budget race); mupt reports trials itself.
optuna.logging.set_verbosity(optuna.logging.ERROR)


class SamplerName(StrEnum):
    TPE = "tpe"
    GP = "gp"
    GRID = "grid"


class Fidelity(StrEnum):
    """What a cheap trial saves on: ``width`` (rungs at narrower d_model, then steps) or ``steps`` only."""

    WIDTH = "width"
    STEPS = "steps"


class Finalist(StrEnum):
    """How the proxy-width rung is filled under width fidelity (docs/tuning.md, "The schedule").

    ``fit``: rung 0 only, then one proxy-width trial at the LR where a parabola fitted to rung 0's
    losses has its minimum, moved by the expected drift of the optimum with width (:func:`vertex_fit`).
    ``rank``: successive halving by rank through the rungs proxy/8, /4, /2 (:func:`rungs_for`).
    """

    FIT = "fit"
    RANK = "rank"


class PrunerName(StrEnum):
    ASHA = "asha"
    MEDIAN = "median"
    NONE = "none"


#: Octaves of LR the optimum moves per doubling of d_model between the narrowest rung and the proxy,
#: for ``--finalist fit``: the mean of the default proxy's measured drift from d_model 32 to 256 on
#: two corpora (dense log2 grids at every width: -0.19 and -0.11; docs/tuning.md, "Efficiency").
#: µP keeps the optimum fixed only in the wide limit; at these widths it moves down.
DEFAULT_LR_DRIFT = -0.15

#: Octaves around rung 0's best trial whose losses enter :func:`vertex_fit`'s parabola (a local model of
#: loss against log2 LR: it does not hold far from the optimum, where divergence makes the curve skewed).
FIT_WINDOW = 2.0

#: Proxy-width trials ``--finalist fit`` runs after the trial at its fitted LR diverged at the proxy width, each
#: one octave below the LR that diverged before it (never below the search range): the fit comes from
#: narrower widths, and a proxy that diverges at the fitted LR would otherwise end the study without an answer.
#: One octave because the loss is flat below the optimum and steep above it (docs/tuning.md: at the default
#: proxy one octave below the optimum costs 0-0.2%, one above 2.2-2.5%); two retries, because an LR still
#: unstable two octaves below the fit means the proxy, not the fit, needs looking at.
FIT_RETRIES = 2

#: Parameters that can be searched and the config field each one sets.
SEARCHABLE: dict[str, str] = {
    "lr": "train.lr",
    "output_mult": "param.output_mult",
    "embedding_mult": "param.embedding_mult",
    "init_scale": "param.init_scale",
}
#: Default log-uniform ranges.  The LR range depends on the optimizer family.
LR_RANGE: dict[str, tuple[float, float]] = {"adam": (1e-4, 1e-1), "sgd": (1e-4, 1e1)}
MULT_RANGE: dict[str, tuple[float, float]] = {
    "output_mult": (1 / 16, 16.0),
    "embedding_mult": (1 / 16, 16.0),
    "init_scale": (0.25, 4.0),
}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def proxy_config() -> RunConfig:
    """The built-in proxy: :class:`~mupt.config.RunConfig`'s defaults, defined once in :mod:`mupt.config`
    (``PROXY_*``; ``recipes/proxy.yaml`` is this config written out).

    Sized so that ``mupt tune`` (d_model 256) with the default trial budget finishes on two CPU
    cores in minutes: 2 layers, d_state 16, 64 steps of 8 x 64 tokens, eval every 16 steps.
    """
    return RunConfig()


class TuneSettings(BaseModel):
    """How to search (everything about the proxy run itself lives in the RunConfig).

    Raises :class:`~mupt.errors.ConfigError` (one line naming the flag) for a bad value.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    study: str
    trials: int = Field(default=16, description="configurations sampled (rung 0), over all workers")
    workers: int = 1
    sampler: SamplerName = SamplerName.TPE
    pruner: PrunerName | None = Field(
        default=None,
        description="step pruner inside rung 0; None: none under --finalist fit (its parabola wants trials on both "
        "sides of the optimum, and halving on early losses keeps the high LRs), asha otherwise",
    )
    search: tuple[str, ...] = ("lr",)
    lr_range: tuple[float, float] | None = None
    seed: int = 0
    storage: str | None = Field(
        default=None, description="None: journal under runs_dir/study; 'dialect://...': RDB; else a journal path"
    )
    runs_dir: str = "runs"
    heartbeat_interval: int = Field(default=30, description="RDB only: seconds between heartbeats")
    threads: int = Field(default=1, description="torch threads per worker; small proxies are fastest on one")
    fidelity: Fidelity = Field(default=Fidelity.WIDTH, description="width: rungs at proxy/8../proxy; steps: one rung")
    reduction: int = Field(
        default=3, description="rung i holds round(trials / reduction**i) of rung i-1's best (16 trials: 16, 5, 2, 1)"
    )
    finalist: Finalist | None = Field(
        default=None,
        description="width: fit (one proxy-width trial at rung 0's fitted optimum) or rank (promotion by rank "
        "through the rungs); None: fit when only the LR is searched, else rank",
    )
    lr_drift: float | None = Field(
        default=None,
        description="--finalist fit: octaves of LR the optimum moves per doubling of d_model (docs/tuning.md); "
        "None: DEFAULT_LR_DRIFT",
    )
    extrapolate: bool = Field(
        default=False,
        description="width: the proxy rung also runs the LR extrapolated from the optimum's drift over the rungs",
    )
    log: str = Field(
        default="", description="per-trial curves: comma-separated mupt.sinks names (jsonl, tensorboard, wandb, mlflow)"
    )

    @field_validator("sampler", "pruner", "fidelity", "finalist", mode="before")
    @classmethod
    def _choice(cls, v: Any, info: ValidationInfo) -> Any:
        """One line naming the flag and its choices, instead of pydantic's enum error."""
        enum = {"sampler": SamplerName, "pruner": PrunerName, "fidelity": Fidelity, "finalist": Finalist}[
            str(info.field_name)
        ]
        if v is None and info.field_name in ("finalist", "pruner"):
            return None
        return _enum(enum, v, f"--{info.field_name}")

    @field_validator("log")
    @classmethod
    def _log(cls, v: str) -> str:
        from mupt.sinks import check_installed, parse_sinks

        sinks = parse_sinks(v, always=())
        check_installed(sinks)
        return ",".join(sinks)

    @field_validator("search", mode="before")
    @classmethod
    def _search(cls, v: Any) -> Any:
        items = v.split(",") if isinstance(v, str) else v
        return tuple(str(x).strip() for x in items if str(x).strip())

    @model_validator(mode="after")
    def _check(self) -> TuneSettings:
        if not self.study or any(c in self.study for c in "/\\") or self.study.startswith("."):
            raise ConfigError(f"--study {self.study!r}: use a plain name without slashes, e.g. proxy-w256")
        if self.trials <= 0:
            raise ConfigError(f"--trials {self.trials}: must be a positive number of trials")
        if self.workers <= 0:
            raise ConfigError(f"--workers {self.workers}: must be at least 1")
        unknown = [s for s in self.search if s not in SEARCHABLE]
        if unknown or not self.search:
            raise ConfigError(f"--search {','.join(self.search)!r}: choose from {','.join(SEARCHABLE)}")
        if "lr" not in self.search:
            raise ConfigError(f"--search {','.join(self.search)}: the learning rate must be searched; add lr")
        if len(set(self.search)) != len(self.search):
            raise ConfigError(f"--search {','.join(self.search)}: a parameter is listed twice")
        if self.sampler is SamplerName.GRID and self.search != ("lr",):
            raise ConfigError("--sampler grid searches only the learning rate; use --search lr or --sampler tpe")
        if self.lr_range is not None:
            lo, hi = self.lr_range
            if not (0 < lo < hi) or not math.isfinite(hi):
                raise ConfigError(f"--lr-range {lo:g},{hi:g}: need 0 < LOW < HIGH, e.g. 1e-4,0.1")
        if self.threads <= 0:
            raise ConfigError(f"--threads {self.threads}: must be at least 1")
        if self.heartbeat_interval <= 0:
            raise ConfigError(f"--heartbeat {self.heartbeat_interval}: must be a positive number of seconds")
        if self.reduction < 2:
            raise ConfigError(f"--reduction {self.reduction}: must be at least 2 (each rung keeps 1/reduction)")
        if self.finalist is Finalist.FIT and self.search != ("lr",):
            raise ConfigError(
                f"--finalist fit with --search {','.join(self.search)}: the fit is over the LR alone; "
                "use --finalist rank, or --search lr"
            )
        if self.finalist is Finalist.FIT and self.extrapolate:
            raise ConfigError("--extrapolate adds a finalist to the rank ladder; use it with --finalist rank")
        if self.lr_drift is not None and not (math.isfinite(self.lr_drift) and abs(self.lr_drift) <= 1):
            raise ConfigError(
                f"--lr-drift {self.lr_drift:g}: must be within -1..1 octave per doubling of d_model "
                f"(default {DEFAULT_LR_DRIFT:g}; 0 trusts µP's fixed optimum)"
            )
        if self.finalist is not None and self.fidelity is not Fidelity.WIDTH:
            raise ConfigError(
                f"--finalist {self.finalist.value} applies to --fidelity width only (every trial runs at the proxy "
                "width under --fidelity steps); drop it, or use --fidelity width"
            )
        if self.lr_drift is not None and self.finalist_mode is not Finalist.FIT:
            mode = "--fidelity steps" if self.finalist_mode is None else f"--finalist {self.finalist_mode.value}"
            raise ConfigError(
                f"--lr-drift applies to --finalist fit only, and this study runs {mode}; drop --lr-drift"
                + ("" if self.finalist_mode is None or self.search != ("lr",) else ", or use --finalist fit")
            )
        return self

    @property
    def drift(self) -> float:
        """Octaves of LR per doubling of d_model that ``--finalist fit`` moves rung 0's optimum by."""
        return DEFAULT_LR_DRIFT if self.lr_drift is None else self.lr_drift

    @property
    def pruner_mode(self) -> PrunerName:
        """The step pruner inside rung 0: the flag, or by default ``none`` under ``--finalist fit`` (every
        rung-0 trial trains to the end, so the parabola sees both sides of the optimum: successive halving
        on early losses keeps the high LRs, which learn fastest at first) and ``asha`` otherwise."""
        if self.pruner is not None:
            return self.pruner
        return PrunerName.NONE if self.finalist_mode is Finalist.FIT else PrunerName.ASHA

    @property
    def finalist_mode(self) -> Finalist | None:
        """The proxy rung's finalist under width fidelity (None under ``--fidelity steps``): the flag, or
        by default ``fit`` when the LR is searched alone (the fit is one-dimensional) and ``rank`` otherwise."""
        if self.fidelity is not Fidelity.WIDTH:
            return None
        if self.finalist is not None:
            return self.finalist
        return Finalist.FIT if self.search == ("lr",) and not self.extrapolate else Finalist.RANK

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.study

    @property
    def is_rdb(self) -> bool:
        return self.storage is not None and "://" in self.storage

    @property
    def journal_path(self) -> Path:
        if self.storage is None:
            return self.run_dir / "journal.log"
        return Path(self.storage)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (enums as their values); :meth:`from_dict` reads it back."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneSettings:
        return cls.model_validate(d)


def _enum(cls: type[StrEnum], value: Any, flag: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: choose one of {', '.join(x.value for x in cls)}") from None


def default_study_name(cfg: RunConfig) -> str:
    """``proxy-w<d_model>`` on the built-in corpus, ``proxy-w<d_model>-<data name>`` on other data.

    The data's last path component (``data/corpus`` -> ``proxy-w256-corpus``, ``recall`` ->
    ``proxy-w256-recall``) keeps a study on your own data from colliding with the README's
    Quickstart study on the built-in corpus (a study refuses another proxy config); the built-in
    corpus keeps the plain name so that existing default studies resume.
    """
    import re

    base = f"proxy-w{cfg.model.d_model}"
    if cfg.data.source == "builtin":
        return base
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(cfg.data.source).name).strip("-.")
    return f"{base}-{slug or 'data'}"


def search_space(settings: TuneSettings, cfg: RunConfig) -> dict[str, tuple[float, float]]:
    """Parameter -> (low, high), all log-uniform."""
    family = OptimizerName(cfg.train.optimizer).family
    space: dict[str, tuple[float, float]] = {}
    for name in settings.search:
        if name == "lr":
            space[name] = tuple(settings.lr_range) if settings.lr_range else LR_RANGE[family]  # type: ignore[assignment]
        else:
            space[name] = MULT_RANGE[name]
    return space


def lr_grid(low: float, high: float) -> list[float]:
    """Powers of two inside [low, high] (at least the two endpoints when none fall inside)."""
    ks = range(math.ceil(math.log2(low) - 1e-9), math.floor(math.log2(high) + 1e-9) + 1)
    grid = [2.0**k for k in ks]
    return grid if len(grid) >= 2 else [low, high]


def coarse_to_fine(n: int) -> list[int]:
    """Indices 0..n-1 ordered endpoints first, then bisection midpoints level by level, so that
    a grid cut short by the trial budget still spans the whole range."""
    if n <= 2:
        return list(range(n))
    order, queue = [0, n - 1], [(0, n - 1)]
    while queue:
        lo, hi = queue.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        order.append(mid)
        queue += [(lo, mid), (mid, hi)]
    return order


def apply_params(cfg: RunConfig, params: dict[str, float]) -> RunConfig:
    """The proxy config with tuned values set (``lr`` -> train.lr, multipliers -> param.*)."""
    data = to_dict(cfg)
    for name, value in params.items():
        section, key = SEARCHABLE[name].split(".")
        data[section][key] = float(value)
    return RunConfig.model_validate(data)


def validate_proxy(cfg: RunConfig) -> None:
    """Fail fast, before any storage or study is created: ConfigError on a proxy the width rules cannot
    take, DataError on data that cannot be read (a missing ``--data`` path, no .txt files, a bad dataset).

    A refused command leaves nothing behind (README, "mupt tune"), and a bad ``--data`` on an existing
    study is reported as such rather than as a different proxy config.
    """
    from mupt.data import load_data
    from mupt.train import build_model

    build_model(cfg)
    load_data(cfg.data)


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"mupt {__version__}" + (f" (git {commit})" if commit else "")


# --- storage ----------------------------------------------------------------------------------


#: The driver each SQLAlchemy dialect needs when its default one is missing.
DB_DRIVERS = {
    "postgresql": "pip install psycopg2-binary",
    "mysql": "pip install pymysql and write the URL as mysql+pymysql://...",
    "sqlite": "sqlite3 ships with Python; reinstall Python with sqlite support",
}


def sqlalchemy_url(url: str) -> str:
    """``url`` with a PostgreSQL driver SQLAlchemy can import: a bare ``postgresql://`` means psycopg 3 to
    SQLAlchemy >= 2.1; when only psycopg2 (``pip install psycopg2-binary``) is installed, name it."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def open_storage(settings: TuneSettings) -> optuna.storages.BaseStorage:
    """Journal file storage (default) or an RDB URL; one-line StorageError when unusable.

    A journal whose last record was cut mid-line by a crash is repaired first (see
    :func:`repair_journal`); every complete trial is kept.
    """
    if settings.is_rdb:
        url = settings.storage or ""
        dialect = url.split("://", 1)[0].split("+", 1)[0]
        if url.startswith("sqlite:///"):
            parent = Path(url[len("sqlite:///") :]).expanduser().parent
            if not parent.is_dir():
                raise StorageError(f"--storage {url}: directory {parent} does not exist; create it or fix the path")
        import inspect

        # Optuna >= 4.9 renamed the retry callback and its argument (the old names warn, and go in Optuna 6)
        new_name = "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
        retry_cls = getattr(
            optuna.storages, "RetryHeartbeatStaleTrialCallback", optuna.storages.RetryFailedTrialCallback
        )
        callback = "heartbeat_stale_trial_callback" if new_name else "failed_trial_callback"
        try:
            with warnings.catch_warnings():  # heartbeats and retries are "experimental" in every Optuna so far
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    sqlalchemy_url(url),
                    heartbeat_interval=settings.heartbeat_interval,
                    grace_period=2 * settings.heartbeat_interval,
                    **{callback: retry_cls(max_retry=2)},  # type: ignore[arg-type]
                )
        except ImportError as e:
            fix = DB_DRIVERS.get(dialect, f"install the SQLAlchemy driver for {dialect}")
            raise StorageError(f"--storage {url}: database driver missing ({e}); {fix}") from None
        except Exception as e:  # sqlalchemy errors: bad URL, unreachable server, unwritable file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StorageError(f"--storage {url}: cannot open the database ({first}); check the URL") from None
    path = settings.journal_path
    if settings.storage is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create run directory {path.parent} ({e.strerror}); pass --runs-dir") from None
    if path.is_dir():
        raise StorageError(f"--storage {path}: is a directory; pass a journal file path such as {path}/journal.log")
    if not path.parent.is_dir():
        raise StorageError(f"--storage {path}: directory {path.parent} does not exist; create it or fix the path")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.R_OK | os.W_OK)):
        raise StorageError(f"--storage {path}: not readable/writable; check permissions or choose another path")
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    repair_journal(path)
    try:
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        return optuna.storages.JournalStorage(backend)
    except Exception as e:  # a record in the middle does not parse: not ours to cut
        raise StorageError(
            f"--storage {path}: a record before the last one is not Optuna journal JSON ({type(e).__name__}); "
            "the file is left as it is: pass --storage NEW_FILE or --runs-dir NEW_DIR to start elsewhere"
        ) from None


#: Optuna's ``JournalFileOpenLock`` keeps ``<journal>.lock`` only while it appends a record (milliseconds), and
#: force-releases one that has not changed for its grace period (30 s by default) -- counted from when the
#: waiting process first saw it, so a lock left by a process killed mid-write stalls every start for 30 s,
#: silently (mupt logs Optuna at ERROR).  Lock files older than this are removed up front instead.
JOURNAL_LOCK_GRACE = 30.0


def clear_stale_journal_lock(journal: Path, grace: float = JOURNAL_LOCK_GRACE) -> tuple[Path, float] | None:
    """Remove Optuna's lock file of ``journal`` when it is older than ``grace`` seconds (left by a process
    killed while appending a record, e.g. ``kill -9``); returns (lock file, its age in s) or None.

    Checked and removed under the study's ``fcntl`` lock (:func:`study_lock`'s file), so two mupt processes
    starting together cannot remove a lock that the first one has just taken.  A younger lock file is left
    to Optuna's own grace period (a live worker may hold it).
    """
    lock = journal.with_name(journal.name + ".lock")  # optuna.storages.journal: <file> + ".lock"
    if not lock.exists():
        return None
    with file_lock(lock_file(journal)):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None
        if age < grace:
            return None
        lock.unlink(missing_ok=True)
        return lock, age


@dataclass
class JournalRepair:
    """What :func:`repair_journal` cut: bytes of the partial last record and where they were saved."""

    path: Path
    dropped_bytes: int
    saved_to: Path


def repair_journal(path: Path) -> JournalRepair | None:
    """Drop a partial last record of an Optuna journal file (a crash mid-write); None when intact.

    Optuna appends one JSON record per line under its lock and fsyncs; a process killed inside
    that write can leave the last line without its newline (or not valid JSON), and the next
    append would glue a new record onto it.  Under the same lock we cut the file back to the end
    of its last complete record; the cut bytes are kept in ``<journal>.partial-<UTC time>``.  Records before
    the last one are never touched.  Safe while other workers append (they hold the same lock).
    """
    import json

    from optuna.storages.journal import JournalFileOpenLock

    if not path.is_file() or path.stat().st_size == 0:
        return None
    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        end = len(data)
        if data.endswith(b"\n"):
            start = data.rfind(b"\n", 0, end - 1) + 1
            try:
                json.loads(data[start:end])
                return None
            except ValueError:
                keep = start
        else:
            keep = data.rfind(b"\n") + 1
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        saved = path.with_name(f"{path.name}.partial-{stamp}")
        atomic_write_bytes(saved, data[keep:])
        with open(path, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
        return JournalRepair(path, end - keep, saved)
    finally:
        lock.release()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``data`` to ``path`` via temp file + fsync + rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def lock_file(storage_file: Path) -> Path:
    """``<file>.mupt-lock``: the file :func:`study_lock` locks for a journal file or an SQLite database."""
    return storage_file.with_name(storage_file.name + ".mupt-lock")


def study_lock_file(settings: TuneSettings) -> Path | None:
    """The study's :func:`lock_file` (journal files and SQLite); None for server databases (their lock is held
    in the server)."""
    if not settings.is_rdb:
        return lock_file(settings.journal_path)
    url = settings.storage or ""
    return lock_file(Path(url[len("sqlite:///") :])) if url.startswith("sqlite:///") else None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``path`` (created when missing), held for the ``with`` block.

    The file may be removed while others wait for it (:func:`remove_lock_file`, when a run ends): a process
    that then takes the lock on the removed file would not exclude one that created the file anew, so after
    taking the lock the path must still name the file locked, else the lock is taken again on the file there
    now (the usual protocol for removable lock files).
    """
    import fcntl

    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            held = os.fstat(fh.fileno())
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            fh.close()
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        fh.close()  # removed while we waited: closing releases the lock on the old file
    try:
        yield
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def remove_lock_file(settings: TuneSettings) -> bool:
    """Remove the study's :func:`lock_file` when a run has finished (a 0-byte file otherwise left beside the
    journal); returns whether one was removed.

    Safe while other workers use the study: the file is removed while this process holds its lock, and
    :func:`file_lock` makes a process that was waiting on the removed file lock the file there now (a worker
    that needs the lock later creates it again, and removes it when it finishes).
    """
    path = study_lock_file(settings)
    if path is None or not path.exists():
        return False
    with file_lock(path):
        path.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def study_lock(settings: TuneSettings, storage: optuna.storages.BaseStorage) -> Iterator[None]:
    """One lock over the study's storage for read-decide-write steps (grid enqueue, promotions).

    Journal files and SQLite: an exclusive :func:`file_lock` on ``<file>.mupt-lock`` (local
    processes); PostgreSQL: a session advisory lock; MySQL: ``GET_LOCK``.  Other RDBs get no
    lock (the rung quotas and duplicate checks in the trials still hold, at the cost of a
    wasted enqueue).
    """
    path = study_lock_file(settings)
    if path is not None:
        with file_lock(path):
            yield
        return
    engine = getattr(storage, "engine", None)
    dialect = engine.dialect.name if engine is not None else ""
    if dialect not in ("postgresql", "mysql"):
        yield
        return
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha1(f"mupt:{settings.study}".encode()).digest()[:7], "big")
    with engine.connect() as conn:  # type: ignore[union-attr]
        if dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        else:
            conn.execute(text("SELECT GET_LOCK(:k, -1)"), {"k": f"mupt-{key}"})
            try:
                yield
            finally:
                conn.execute(text("SELECT RELEASE_LOCK(:k)"), {"k": f"mupt-{key}"})


# --- worker identity, stale trials -------------------------------------------------------------


def _proc_start(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks
    except (OSError, IndexError):
        return "?"


def worker_id() -> str:
    """``host:pid:start`` of this process (start time guards against pid reuse)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_proc_start(os.getpid())}"


def _alive(worker: str) -> bool | None:
    """True/False for a process on this host; None when it lives elsewhere (unknown)."""
    try:
        host, pid_s, start = worker.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start == "?" or _proc_start(pid) in (start, "?")


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials whose owning local process is gone; returns their numbers."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker")
        if not owner or _alive(owner) is not False:
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "reason", f"worker {owner} died while running it")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            failed.append(t.number)
        except Exception:  # another worker closed it first
            continue
    return failed


def fail_stale_rdb_trials(study: optuna.Study) -> list[int]:
    """RDB storage: fail the RUNNING trials whose heartbeat is older than the grace period and queue
    their retries (Optuna's ``fail_stale_trials`` + ``RetryFailedTrialCallback``); returns their numbers."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before)


# --- rungs: the fidelity schedule -------------------------------------------------------------


@dataclass(frozen=True)
class Rung:
    """One fidelity level: every trial in it trains the proxy at ``d_model`` for the proxy's steps.

    ``size`` is the number of trials the rung holds: rung 0 samples ``--trials`` configurations,
    rung r takes the best ``round(trials / reduction**r)`` (at least 1) of the rung below by rank
    (the default reduction 3: 16 trials give rungs of 16, 5, 2 and 1; reduction 8 gives 16, 2 and 1:
    a rung that would take as many as the rung above it selects nothing and is left out, see
    :func:`rungs_for`).  ``extrapolated`` of them (the proxy-width rung only, 0 or 1) run at the LR
    extrapolated from the optimum's drift across the narrower rungs (:func:`drift_fit`) instead of
    a promoted configuration.
    Each rung is its own Optuna study in the one storage (rung 0 keeps the study's name), so the
    sampler only ever compares results at one fidelity.
    """

    index: int
    d_model: int
    size: int
    study_name: str
    extrapolated: int = 0

    @property
    def promoted(self) -> int:
        """How many of the rung's trials are promotions by rank (rung 0: sampled, not promoted)."""
        return self.size - self.extrapolated


def rung_widths(proxy_width: int, multiple: int = 16) -> list[int]:
    """d_model of the rungs: proxy/8, /4, /2 and the proxy, rounded down to multiples of ``multiple``
    (16, so that dt_rank = d_model/16 scales; mamba2 also needs whole heads), deduplicated."""
    widths = {max(multiple, (proxy_width // k) // multiple * multiple) for k in (8, 4, 2)} | {proxy_width}
    return sorted(w for w in widths if w <= proxy_width)


def width_multiple(cfg: RunConfig) -> int:
    """The d_model step every rung keeps: 16, and for mamba2 whole heads in whole groups
    (expand*d_model divisible by headdim*ngroups)."""
    m = cfg.model
    if m.arch is not Arch.MAMBA2:
        return 16
    return math.lcm(16, mamba2_width_unit(m.headdim, m.ngroups, m.expand))


def rung_width_note(settings: TuneSettings, cfg: RunConfig) -> str | None:
    """Why rung 0 is not at the documented proxy/8 (rounded down to a multiple of 16, at least 16;
    docs/tuning.md, "The schedule"), in one sentence with the fix, or ``None`` when it is (or ``--fidelity
    steps``, which has no width rungs).  Only mamba2 moves it: a rung needs heads = expand*d_model/headdim a
    whole number divisible by ngroups (:func:`width_multiple`), which can push rung 0 to a wider width or leave
    the proxy as the only rung (no width fidelity)."""
    if settings.fidelity is not Fidelity.WIDTH:
        return None
    m, proxy = cfg.model, cfg.model.d_model
    documented, actual = rung_widths(proxy)[0], rung_widths(proxy, width_multiple(cfg))[0]
    if actual == documented:
        return None
    what = (
        f"every trial runs at the proxy width {proxy} (no narrower rung: no width fidelity), not rung 0 at "
        f"proxy/8 = {documented}"
        if actual == proxy
        else f"rung 0 runs at d_model {actual}, not proxy/8 = {documented}"
    )
    fix = "a smaller --headdim or --ngroups"
    h = m.headdim // 2
    while h >= 1:
        trial = with_overrides(cfg, {"model.headdim": h}, where="--headdim")
        if m.headdim % h == 0 and rung_widths(proxy, width_multiple(trial))[0] == documented:
            fix = f"--headdim {h}{' (or a smaller --ngroups)' if m.ngroups > 1 else ''} puts rung 0 at {documented}"
            break
        h //= 2
    return (
        f"{what}: mamba2 needs heads = expand*d_model/headdim = {m.expand}*d_model/{m.headdim} a whole number "
        f"divisible by --ngroups {m.ngroups}, so rung widths are multiples of {width_multiple(cfg)}; {fix}"
    )


def rungs_for(settings: TuneSettings, cfg: RunConfig) -> list[Rung]:
    """The study's rungs: one at the proxy width for ``--fidelity steps``; widths x steps otherwise.

    Width fidelity, ``--finalist fit`` (the default when the LR is searched alone): rung 0 at the
    narrowest width (proxy/8) holds ``trials`` sampled configurations, and the proxy-width rung one
    trial, at the LR :func:`vertex_fit` gives.  ``--finalist rank``:
    rung i at the i-th of :func:`rung_widths` takes ``round(trials / reduction**i)``
    (at least 1) by rank.  A rung below the proxy that would take no more trials than the next
    rung takes is left out: the next rung would take every one of its trials whatever their
    losses, so it would cost compute and decide nothing (16 trials at reduction 8: 16, 2, 1, 1 ->
    rungs of 16 at proxy/8 and 2 at proxy/4, then 1 at the proxy).  With
    ``settings.extrapolate`` (LR searched alone, at least two rungs below the proxy) the
    proxy-width rung holds one more trial, at the LR extrapolated by :func:`drift_fit`.
    """
    if settings.fidelity is Fidelity.STEPS:
        return [Rung(0, cfg.model.d_model, settings.trials, settings.study)]
    widths = rung_widths(cfg.model.d_model, width_multiple(cfg))
    if settings.finalist_mode is Finalist.FIT:
        if len(widths) == 1:  # the proxy is the narrowest rung: nothing to fit across widths
            return [Rung(0, widths[0], settings.trials, settings.study)]
        return [
            Rung(0, widths[0], settings.trials, settings.study),
            Rung(1, widths[-1], 1, f"{settings.study}.rung1", extrapolated=1),
        ]
    eta = settings.reduction
    sizes = [settings.trials if i == 0 else max(1, round(settings.trials / eta**i)) for i in range(len(widths))]
    keep = [i for i in range(len(widths)) if i == 0 or i == len(widths) - 1 or sizes[i] > sizes[i + 1]]
    rungs = [
        Rung(j, widths[i], sizes[i], settings.study if j == 0 else f"{settings.study}.rung{j}")
        for j, i in enumerate(keep)
    ]
    if extrapolates(settings) and len(rungs) >= 3:
        top = rungs[-1]
        rungs[-1] = Rung(top.index, top.d_model, top.size + 1, top.study_name, extrapolated=1)
    return rungs


def extrapolates(settings: TuneSettings) -> bool:
    """Whether the study runs an extrapolated finalist (width fidelity, ``--extrapolate``, LR searched alone)."""
    return settings.fidelity is Fidelity.WIDTH and settings.extrapolate and settings.search == ("lr",)


def rung_config(cfg: RunConfig, rung: Rung) -> RunConfig:
    """The proxy at the rung's width, under the proxy's base shape (same width rules at every rung)."""
    if rung.d_model == cfg.model.d_model:
        return cfg
    base = cfg.param.base_d_model or cfg.model.d_model
    return with_overrides(cfg, {"model.d_model": rung.d_model, "param.base_d_model": base}, where="rung")


def flops_per_trial_step(cfg: RunConfig) -> float:
    """Training FLOPs of one optimizer step: FLOPs/token(width) x tokens/step (batch_size x seq_len).

    FLOPs/token is :func:`mupt.transfer.train_flops_per_token` (6 x non-embedding parameters +
    the scan); a trial's compute is its trial-steps times this.  Validation passes are not counted.
    """
    from mupt.transfer import train_flops_per_token

    return train_flops_per_token(cfg)[0] * cfg.train.batch_size * cfg.train.seq_len


def grid_flops(settings: TuneSettings, cfg: RunConfig) -> float:
    """FLOPs of the dense log2 LR grid over the search range, every point trained to the end at the proxy width."""
    lo, hi = search_space(settings, cfg)["lr"]
    return len(lr_grid(lo, hi)) * cfg.train.steps * flops_per_trial_step(cfg)


#: Octaves of LR a rung's losses must span to enter :func:`drift_fit`.
MIN_FIT_SPAN = 1.0


def _span(xs: list[float]) -> float:
    return max(xs) - min(xs) if xs else 0.0


@dataclass(frozen=True)
class DriftFit:
    """Where the LR optimum sits at each rung below the proxy, and where that puts it at the proxy width.

    ``optima``: d_model -> log2 of the LR at the fitted minimum of that rung's losses; ``slope``:
    octaves of LR per doubling of d_model (least squares over the rungs); ``log2_lr`` / ``lr``: the
    line's value at the proxy's d_model, kept within one octave of the LRs measured and inside the
    search range (``clipped`` says it was moved); ``points``: losses used; ``method``: ``drift``
    (:func:`drift_fit`: the slope fitted over several rungs), ``vertex`` (:func:`vertex_fit`: rung 0's
    parabola, the slope the expected drift ``--lr-drift``) or ``best`` (:func:`vertex_fit`'s fallback:
    rung 0's best trial instead of a vertex).

    ``retry`` > 0 (``--finalist fit`` only, at most :data:`FIT_RETRIES`): the proxy-width trial at the fitted
    LR diverged, and ``lr`` is the stand-in, one octave below the LR that diverged last (``diverged``: log2 of
    the LRs that diverged, in order); ``log2_lr`` stays the fit's.
    """

    optima: dict[int, float]
    slope: float
    log2_lr: float
    lr: float
    clipped: bool
    points: int
    method: str = "drift"
    #: ``vertex`` only: (b, e, c, x_low, x_high), the fitted loss = c + e x + b x^2 over x = log2 LR in
    #: [x_low, x_high] (the trials fitted); drawn in rungs.png, not stored
    parabola: tuple[float, float, float, float, float] | None = None
    retry: int = 0
    diverged: tuple[float, ...] = ()

    def to_attrs(self) -> dict[str, Any]:
        """JSON-safe form, stored on the extrapolated trial (``user_attrs["extrapolated"]``); a retry adds
        ``retry``, ``diverged_log2_lr`` and ``stand_in_log2_lr`` (log2 of the LR it runs at)."""
        attrs = {
            "method": self.method, "optima_log2_lr": {str(k): round(v, 4) for k, v in self.optima.items()},
            "slope_octaves_per_doubling": round(self.slope, 4), "log2_lr": round(self.log2_lr, 4),
            "clipped": self.clipped, "points": self.points,
        }  # fmt: skip
        if self.retry:
            attrs |= {"retry": self.retry, "diverged_log2_lr": [round(x, 4) for x in self.diverged],
                      "stand_in_log2_lr": round(math.log2(self.lr), 4)}  # fmt: skip
        return attrs


def drift_fit(ladder: Ladder) -> DriftFit | None:
    """Extrapolate the LR optimum from the rungs below the proxy to the proxy width (issue 16).

    µP keeps the optimum LR fixed only as width grows large; between d_model 32 and 256 it drifts
    (measured in docs/tuning.md, "Efficiency": down 0.07-0.21 octave per doubling), so the best
    configuration at a narrow rung sits slightly above the proxy's optimum.  The fit uses the configurations that
    were promoted into rung 1, measured at every rung below the proxy (rung 0: their rung-0
    losses; rung r >= 1: its COMPLETE trials), so the narrow rungs are compared on the same LRs.
    Per rung, loss = c_r + e_r x + b x^2 with x = log2 LR and one curvature b shared by the
    rungs (linear least squares); the rung's optimum is x*_r = -e_r / 2b.  A straight line
    x*_r = a + s log2(d_model_r) (least squares) gives the proxy's optimum; it is kept within one
    octave of the LRs measured (a trust region) and inside the search range.

    Returns None (no extrapolated trial) when fewer than two rungs below the proxy have losses
    spanning at least ``MIN_FIT_SPAN`` (one) octave of LR, there are fewer losses than unknowns, or
    the fitted curvature is not positive.
    """
    import numpy as np

    if len(ladder.rungs) < 3:
        return None
    lo, hi = search_space(ladder.settings, ladder.cfg)["lr"]
    below = ladder.rungs[:-1]
    rung1 = ladder.studies[1].get_trials(deepcopy=False)
    sources = {_slot(t.user_attrs) for t in rung1 if t.state is not TrialState.FAIL}
    points: list[tuple[int, float, float]] = []  # (rung, log2 lr, loss)
    for rung, st in zip(below, ladder.studies, strict=False):
        for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if rung.index == 0 and t.number not in sources:
                continue
            if t.value is not None and math.isfinite(t.value) and "lr" in t.params:
                points.append((rung.index, math.log2(float(t.params["lr"])), float(t.value)))
    # a rung whose LRs span less than an octave says little about where its optimum is (TPE often clusters)
    used = sorted({r for r, _, _ in points if _span([x for q, x, _ in points if q == r]) >= MIN_FIT_SPAN})
    points = [p for p in points if p[0] in used]
    if len(used) < 2 or len(points) < 1 + 2 * len(used):
        return None
    xs = np.array([x for _, x, _ in points])
    center = float(xs.mean())
    a = np.zeros((len(points), 1 + 2 * len(used)))
    for row, (r, x, _) in enumerate(points):
        k = used.index(r)
        a[row, 0] = (x - center) ** 2
        a[row, 1 + 2 * k] = 1.0
        a[row, 2 + 2 * k] = x - center
    coef = np.linalg.lstsq(a, np.array([y for _, _, y in points]), rcond=None)[0]
    b = float(coef[0])
    if not b > 0:
        return None
    optima = {below[r].d_model: center - float(coef[2 + 2 * k]) / (2 * b) for k, r in enumerate(used)}
    lw = np.array([math.log2(w) for w in optima])
    slope, intercept = np.polyfit(lw, np.array(list(optima.values())), 1)
    raw = float(intercept + slope * math.log2(ladder.rungs[-1].d_model))
    low = max(math.log2(lo), float(xs.min()) - 1.0)
    high = min(math.log2(hi), float(xs.max()) + 1.0)
    x = min(max(raw, low), high)
    return DriftFit(optima, float(slope), x, min(max(2.0**x, lo), hi), x != raw, len(points))


def vertex_fit(ladder: Ladder) -> DriftFit | None:
    """The LR of ``--finalist fit``'s proxy-width trial: rung 0's fitted optimum, moved by the expected drift.

    Rung 0's COMPLETE trials within ``FIT_WINDOW`` (two) octaves of LR of its best trial are fitted
    by least squares with loss = c + e x + b x^2, x = log2 LR (the parabola is a local model of the
    loss around the optimum); its vertex -e / 2b, kept within the LRs fitted, is rung 0's optimum.
    With fewer than three such trials or a curvature that is not positive, the best trial's LR
    stands in (``method="best"``).  The optimum at the proxy's d_model is that plus
    ``settings.drift`` x log2(proxy d_model / rung-0 d_model) octaves (-0.15 per doubling by
    default, the drift measured on dense grids in docs/tuning.md, "Efficiency"), kept inside the
    search range.

    Why a fit and not the rung's best trial: at proxy/8 the final losses of neighbouring LRs scatter
    by 0.02-0.03 nats (one seed, one data order), about what 0.7 octave off the optimum costs there,
    so the best single trial is a noisy estimate of the optimum and promotions by rank carry that
    noise up the ladder; the vertex pools every trial near the optimum.

    Returns None (no finalist) when rung 0 has no COMPLETE trial with a finite loss.
    """
    import numpy as np

    lo, hi = search_space(ladder.settings, ladder.cfg)["lr"]
    points = [
        (math.log2(float(t.params["lr"])), float(t.value))
        for t in ladder.studies[0].get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value) and "lr" in t.params
    ]
    if not points:
        return None
    best_x = min(points, key=lambda p: (p[1], p[0]))[0]
    near = [p for p in points if abs(p[0] - best_x) <= FIT_WINDOW]
    x0, method, parabola = best_x, "best", None
    if len(near) >= 3 and len({x for x, _ in near}) >= 3:
        xs = np.array([x for x, _ in near])
        b, e, c = (float(v) for v in np.polyfit(xs - best_x, np.array([y for _, y in near]), 2))
        if b > 0:
            x0, method = min(max(best_x - e / (2 * b), float(xs.min())), float(xs.max())), "vertex"
            # the same parabola in x instead of x - best_x
            parabola = (b, e - 2 * b * best_x, c - e * best_x + b * best_x**2, float(xs.min()), float(xs.max()))
    doublings = math.log2(ladder.rungs[-1].d_model / ladder.rungs[0].d_model)
    raw = x0 + ladder.settings.drift * doublings
    x = min(max(raw, math.log2(lo)), math.log2(hi))
    return DriftFit(
        {ladder.rungs[0].d_model: x0},
        ladder.settings.drift,
        x,
        min(max(2.0**x, lo), hi),
        x != raw,
        len(near),
        method,
        parabola,
    )


def recorded_fit(ladder: Ladder) -> DriftFit | None:
    """The fit ``--finalist fit`` placed its proxy-width trial with, as rungs.png draws it; None when the study
    has not recorded one (another finalist, rung 0 still open after Ctrl-C, no proxy-width trial yet).

    The proxy-width trial records the fit (:meth:`DriftFit.to_attrs`, ``user_attrs["extrapolated"]``) but not
    the parabola; once rung 0 is closed :func:`vertex_fit` is a pure function of its finished trials, so it is
    computed again here and returned only when it gives what the trial recorded.  A parabola through the
    trials of an unfinished rung 0 would be a fit the study never used.
    """
    if ladder.settings.finalist_mode is not Finalist.FIT or len(ladder.rungs) < 2 or not _closed(ladder, 0):
        return None
    recorded = [t.user_attrs["extrapolated"] for t in ladder.top.get_trials(deepcopy=False)
                if "extrapolated" in t.user_attrs]  # fmt: skip
    fit = vertex_fit(ladder)
    if fit is None or not recorded or {**recorded[0], **fit.to_attrs()} != recorded[0]:
        return None
    return fit


# --- study ------------------------------------------------------------------------------------


def make_sampler(settings: TuneSettings, seed: int) -> optuna.samplers.BaseSampler:
    if settings.sampler is SamplerName.TPE:
        startup = min(10, max(3, settings.trials // 3))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)
    if settings.sampler is SamplerName.GP:
        try:
            import scipy  # noqa: F401
        except ImportError:
            raise ConfigError("--sampler gp needs scipy; pip install scipy, or use --sampler tpe") from None
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid: every trial is an enqueued grid point


class _WithoutFailed:
    """A study as the step pruner sees it: every trial but the FAIL ones (read-through otherwise)."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [t for t in trials if t.state is not TrialState.FAIL]


class HalvingPruner(optuna.pruners.SuccessiveHalvingPruner):
    """Optuna's ASHA (:class:`optuna.pruners.SuccessiveHalvingPruner`) with FAIL trials left out of the competition.

    Optuna compares a trial's value at a halving step with every trial that reached that step, in any
    state; a trial stopped by Ctrl-C, or whose worker died, after the halving step then keeps raising the
    bar for the rest of the rung although it never finishes (a rerun samples a new trial in its place,
    and an RDB retry reports its own values).  Clean studies have no FAIL trials: the same decisions.
    """

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return super().prune(_WithoutFailed(study), trial)  # type: ignore[arg-type]


def make_pruner(settings: TuneSettings, cfg: RunConfig, rung: int = 0) -> optuna.pruners.BasePruner:
    """The step pruner inside rung 0; promoted rungs train every finalist to the end (no pruning)."""
    every = cfg.train.eval_every
    if rung > 0:
        return optuna.pruners.NopPruner()
    if settings.pruner_mode is PrunerName.ASHA:
        if settings.fidelity is Fidelity.WIDTH:
            # one halving on steps, at the first validation from half the run on, keeping about a third (a half at
            # --reduction 2): enough to fill rung 1.  Earlier halvings favour high LRs (they learn fastest at
            # first): at the default proxy, halving at step 16 of 64 (keeping a quarter) once kept two trials at an
            # LR 1.5 octaves above the optimum at d_model 32 and pruned the ones near it (docs/tuning.md)
            first = max(every, cfg.train.steps // 2)
            keep = min(3, settings.reduction)
            return HalvingPruner(min_resource=first, reduction_factor=keep)
        return HalvingPruner(min_resource=every, reduction_factor=3)
    if settings.pruner_mode is PrunerName.MEDIAN:
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=every)
    return optuna.pruners.NopPruner()


def _load_rung(settings: TuneSettings, cfg: RunConfig, rung: Rung, seed: int, storage: Any) -> optuna.Study:
    sampler = make_sampler(settings, seed) if rung.index == 0 else optuna.samplers.RandomSampler(seed=seed)
    return optuna.create_study(
        study_name=rung.study_name, storage=storage, sampler=sampler,
        pruner=make_pruner(settings, cfg, rung.index), direction="minimize", load_if_exists=True,
    )  # fmt: skip


def study_attrs(settings: TuneSettings, cfg: RunConfig) -> dict[str, Any]:
    """What makes the study reproducible; stored as the (rung-0) study's user_attrs."""
    rungs = rungs_for(settings, cfg)
    return {
        "proxy_config": to_dict(cfg),
        "search_space": {k: list(v) for k, v in search_space(settings, cfg).items()},
        "fidelity": settings.fidelity.value,
        "rungs": [[r.d_model, r.size] for r in rungs] if settings.fidelity is Fidelity.WIDTH else None,
        "finalist": finalist_words(settings),
        "flops_formula": "trial-steps x (6 x non-embedding params + 27 x n_layers x N_u x N_x) x batch_size x seq_len",
        "seed": settings.seed,
        "data_source": cfg.data.source,
        "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Ladder:
    """The studies of one tuning run: one Optuna study per rung, all in one storage."""

    settings: TuneSettings
    cfg: RunConfig
    rungs: list[Rung]
    studies: list[optuna.Study]
    storage: Any

    @property
    def study(self) -> optuna.Study:
        """Rung 0's study (the one named ``settings.study``; it holds the study's attrs)."""
        return self.studies[0]

    @property
    def top(self) -> optuna.Study:
        """The proxy-width rung's study: the answer comes from here."""
        return self.studies[-1]

    def trials(self) -> list[tuple[Rung, FrozenTrial]]:
        return [(r, t) for r, s in zip(self.rungs, self.studies, strict=True) for t in s.get_trials(deepcopy=False)]

    def label(self, number: int, rung: int | None = None) -> str:
        """How tune names trial ``number`` of rung ``rung`` (None: the proxy-width rung, where best.yaml's
        ``trial`` lives) in every line it prints: :func:`trial_label`, e.g. ``r1/t0``."""
        return trial_label(len(self.rungs) - 1 if rung is None else rung, number)


@dataclass
class Prepared:
    """What :func:`prepare_study` found: the ladder, stale trials it failed, a journal repair."""

    ladder: Ladder
    stale: list[int]
    repaired: JournalRepair | None

    @property
    def study(self) -> optuna.Study:
        return self.ladder.study


def open_ladder(settings: TuneSettings, cfg: RunConfig, seed: int | None = None, storage: Any = None) -> Ladder:
    """Load (creating when missing) every rung's study of the run."""
    storage = storage or open_storage(settings)
    rungs = rungs_for(settings, cfg)
    seed = settings.seed if seed is None else seed
    try:
        studies = [_load_rung(settings, cfg, r, seed + 104729 * r.index, storage) for r in rungs]
    except MuptError:
        raise
    except Exception as e:
        raise StorageError(f"storage for study {settings.study!r}: {type(e).__name__}: {e}".splitlines()[0]) from None
    return Ladder(settings, cfg, rungs, studies, storage)


def _schedule_words(rungs: Any) -> str:
    """A recorded rung schedule in words: [[32, 4], [256, 1]] -> "rungs 32x4, 256x1" (d_model x trials)."""
    if not rungs:
        return "one rung at the proxy width (--fidelity steps)"
    return "rungs " + ", ".join(f"{w}x{n}" for w, n in rungs)


def finalist_words(settings: TuneSettings) -> str | None:
    """How the proxy-width rung is filled, as recorded in the study: ``rank``, ``fit (LR drift -0.15
    octave per doubling)``, or None under ``--fidelity steps``."""
    mode = settings.finalist_mode
    if mode is Finalist.FIT:
        return f"fit (LR drift {settings.drift:g} octave per doubling)"
    return None if mode is None else mode.value


def study_dirs(runs_dir: str | Path) -> list[str]:
    """Names of the studies kept under ``runs_dir`` (each in ``<name>/journal.log``, the default storage)."""
    root = Path(runs_dir)
    return sorted(d.name for d in root.iterdir() if (d / "journal.log").is_file()) if root.is_dir() else []


def check_same_study(settings: TuneSettings, study: optuna.Study, attrs: dict[str, Any], keys: tuple[str, ...]) -> None:
    """ConfigError (one line) when the study's recorded ``keys`` differ from ``attrs`` (this run's flags).

    The rung schedule depends on ``--trials``, ``--finalist``, ``--reduction`` and ``--extrapolate``.
    """
    old = study.user_attrs
    fidelity = old.get("fidelity", Fidelity.STEPS.value)
    before = {
        **old, "fidelity": fidelity, "rungs": old.get("rungs"),
        # studies from before --finalist existed ranked their way up
        "finalist": old.get("finalist", Finalist.RANK.value if fidelity == Fidelity.WIDTH.value else None),
    }  # fmt: skip
    for key in keys:
        if before.get(key) != attrs[key]:
            d = first_difference(before.get(key), attrs[key])
            if key == "rungs":
                what = f"{_schedule_words(before.get(key))} then, {_schedule_words(attrs[key])} now"
            else:
                what = f"{key if d[0] == '<root>' else d[0]}: {d[1]!r} then, {d[2]!r} now" if d else key
            flag = {
                "fidelity": "--fidelity",
                "rungs": "rung schedule (--trials, --finalist, --reduction, --extrapolate)",
                "finalist": "finalist (--finalist, --lr-drift)",
            }.get(key, key.replace("_", " "))
            raise ConfigError(
                f"study {settings.study!r} was created with a different {flag} ({what}); "
                f"rerun with the same flags, or pass --study NEW_NAME"
            )


def prepare_study(settings: TuneSettings, cfg: RunConfig) -> Prepared:
    """Create or resume the study, record/check its attrs, fail dead workers' trials, enqueue the grid.

    The empty-study check and the grid's ``enqueue_trial`` calls run under :func:`study_lock`,
    so workers starting together enqueue the grid once.
    """
    validate_proxy(cfg)
    repaired = repair_journal(settings.journal_path) if not settings.is_rdb else None
    storage = open_storage(settings)
    with study_lock(settings, storage):
        ladder = open_ladder(settings, cfg, storage=storage)
        study = ladder.study
        attrs = study_attrs(settings, cfg)
        if "proxy_config" in study.user_attrs:
            check_same_study(settings, study, attrs, ("proxy_config", "search_space", "fidelity", "rungs", "finalist"))
        else:
            for k, v in attrs.items():
                study.set_user_attr(k, v)
        stale = [] if settings.is_rdb else [n for s in ladder.studies for n in fail_dead_trials(s)]
        if settings.sampler is SamplerName.GRID and not study.get_trials(deepcopy=False):
            lo, hi = search_space(settings, cfg)["lr"]
            grid = lr_grid(lo, hi)
            for i in coarse_to_fine(len(grid))[: settings.trials]:
                study.enqueue_trial({"lr": grid[i]}, user_attrs={"grid_index": i})
    return Prepared(ladder, stale, repaired)


def is_complete(ladder: Ladder) -> bool:
    """Every rung holds every trial it will ever hold, all finished: a rerun has nothing to run."""
    return _closed(ladder, len(ladder.rungs) - 1)


def count_states(study: optuna.Study | Ladder) -> dict[str, int]:
    """Trials per state (over every rung for a ladder)."""
    counts = {s.name: 0 for s in TrialState}
    studies = study.studies if isinstance(study, Ladder) else [study]
    for st in studies:
        for t in st.get_trials(deepcopy=False):
            counts[t.state.name] += 1
    return counts


#: Reasons of FAIL trials a worker closed without training (they cost nothing and are not shown as failed).
SKIPPED = ("over budget", "no promotion", "duplicate retry")


def was_skipped(t: FrozenTrial) -> bool:
    """A FAIL trial a worker closed without running it (over budget, promotion taken, duplicate retry)."""
    return t.state is TrialState.FAIL and str(t.user_attrs.get("reason", "")).startswith(SKIPPED)


#: Reason prefix of a trial stopped by Ctrl-C (SIGINT) while a worker held it.
INTERRUPTED = "interrupted (Ctrl-C)"


def was_interrupted(t: FrozenTrial) -> bool:
    """A FAIL trial stopped by Ctrl-C (SIGINT) mid-run; a rerun samples a new trial in its place."""
    return t.state is TrialState.FAIL and str(t.user_attrs.get("reason", "")).startswith(INTERRUPTED)


def close_interrupted(study: optuna.Study, since: int) -> list[int]:
    """After Ctrl-C: mark FAIL, with the :data:`INTERRUPTED` reason, the trials this worker left RUNNING.

    Those are the trials numbered ``since`` or later that are RUNNING and either carry this process's
    ``worker`` attribute (Ctrl-C landed in Optuna's bookkeeping after the objective returned) or none at all
    (it landed inside ``study.ask``, before the objective ran).  Without this a trial nobody owns would stay
    RUNNING and make every later worker wait for it.  Returns the trial numbers closed.
    """
    me, closed = worker_id(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number < since or t.user_attrs.get("worker", me) != me:
            continue
        with contextlib.suppress(Exception):  # closed meanwhile (by Optuna or another worker)
            study._storage.set_trial_user_attr(t._trial_id, "reason", f"{INTERRUPTED} outside training")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            closed.append(t.number)
    return closed


def n_finished(study: optuna.Study | Ladder) -> int:
    c = count_states(study)
    return c["COMPLETE"] + c["PRUNED"]


class _OverBudget(Exception):
    """Raised inside a trial that lost the race for the last slot of the budget."""


class _NoWork(Exception):
    """Raised inside a promoted-rung trial that found nothing to run (another worker took it)."""


def _over_budget(study: optuna.Study, number: int, cap: int) -> bool:
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    done = sum(t.state in FINISHED for t in trials)
    ahead = sum(t.state is TrialState.RUNNING and t.number < number for t in trials)
    return done + ahead >= cap


class _DuplicateRetry(Exception):
    """Raised inside a retry that another worker queued too (Optuna's SQLite storage can fail a stale
    trial in two workers at once, and each queues a retry); only the lowest-numbered twin runs."""


def _earlier_twin(study: optuna.Study, number: int) -> int | None:
    """The number of an earlier, not failed retry of the same failed trial as trial ``number``, if any."""
    trials = study.get_trials(deepcopy=False)
    history = trials[number].system_attrs.get("retry_history") if number < len(trials) else None
    if not history:
        return None
    for t in trials[:number]:
        if t.state is not TrialState.FAIL and t.system_attrs.get("retry_history") == history:
            return t.number
    return None


def _suggest(trial: optuna.Trial, space: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {name: trial.suggest_float(name, lo, hi, log=True) for name, (lo, hi) in space.items()}


def trial_log(settings: TuneSettings, rung: Rung, number: int, params: dict[str, float]) -> Any:
    """The per-trial curve logger of ``--log`` (a :class:`mupt.sinks.SinkLog`, every step), or None.

    Run name ``<rung study>-t<trial number>``: JSON lines in ``<study dir>/curves/<name>.jsonl``,
    TensorBoard in ``<study dir>/tensorboard/<name>/`` (one run per trial), W&B offline runs in
    ``<study dir>/wandb/`` grouped by study, MLflow runs in ``<study dir>/mlruns`` (experiment =
    study), each with the trial's parameters, rung and d_model.
    """
    if not settings.log:
        return None
    from mupt.sinks import SinkLog, Writer, open_writers

    name = f"{rung.study_name}-t{number:04d}"
    directory = settings.run_dir
    info = {**params, "rung": rung.index, "d_model": rung.d_model, "trial": number}
    sinks = tuple(settings.log.split(","))

    def factory(trainer: Any, step: int) -> list[Writer]:
        return open_writers(
            sinks, directory, name, settings.study, info, step, jsonl=directory / "curves" / f"{name}.jsonl",
            tensorboard=directory / "tensorboard" / name,
        )  # fmt: skip

    return SinkLog(factory, log_every=1)


def make_objective(
    settings: TuneSettings, cfg: RunConfig, rung: Rung | None = None, data: Any = None
) -> Callable[[optuna.Trial], float]:
    """The trial function of one rung: train the proxy at the rung's width with the trial's values.

    Reports validation losses (nats/token) for the step pruner, and records per trial: rung,
    d_model, steps, FLOPs (trial-steps x FLOPs/step, :func:`flops_per_trial_step`), the worker and
    a reason when it did not complete.
    """
    from mupt.data import load_data
    from mupt.train import Trainer

    rung = rung or Rung(0, cfg.model.d_model, settings.trials, settings.study)
    space = search_space(settings, cfg)
    rcfg = rung_config(cfg, rung)
    per_step = flops_per_trial_step(rcfg)
    tokens = data if data is not None else load_data(cfg.data)
    final_step = rcfg.train.steps

    def objective(trial: optuna.Trial) -> float:
        held: dict[str, Trainer] = {}
        try:
            return train_trial(trial, held)
        except KeyboardInterrupt:  # anywhere in the trial, set-up included: the trial is still RUNNING here
            trial.set_user_attr("reason", f"{INTERRUPTED} at step {held['trainer'].step if held else 0}")
            raise

    def train_trial(trial: optuna.Trial, held: dict[str, Trainer]) -> float:
        trial.set_user_attr("worker", worker_id())
        if rung.index == 0 and _over_budget(trial.study, trial.number, rung.size):
            trial.set_user_attr("reason", "over budget: other workers already filled the trial budget")
            raise _OverBudget
        twin = _earlier_twin(trial.study, trial.number)
        if twin is not None:
            trial.set_user_attr("reason", f"duplicate retry: trial {twin} already retries the same failed trial")
            raise _DuplicateRetry
        if rung.index > 0:
            source = _slot(trial.user_attrs)
            twins = [
                t for t in trial.study.get_trials(deepcopy=False)
                if t.number < trial.number and t.state is not TrialState.FAIL
                and source is not None and _slot(t.user_attrs) == source
            ]  # fmt: skip
            if source is None or twins:
                trial.set_user_attr("reason", "no promotion left to run (another worker took it)")
                raise _NoWork
        for k, v in (("rung", rung.index), ("d_model", rung.d_model), ("flops_per_step", per_step)):
            trial.set_user_attr(k, v)
        params = _suggest(trial, space)
        trainer = held["trainer"] = Trainer(apply_params(rcfg, params), data=tokens)
        curves = trial_log(settings, rung, trial.number, params)

        def on_eval(step: int, val: float) -> None:
            trial.report(val, step)
            if step < final_step and trial.should_prune():
                trial.set_user_attr("steps", step)
                trial.set_user_attr("flops", step * per_step)
                trial.set_user_attr("status", "pruned")
                trial.set_user_attr("reason", f"pruned by {settings.pruner_mode.value} at step {step} (val {val:.4f})")
                raise optuna.TrialPruned(f"pruned at step {step}")

        try:
            result = trainer.run(on_eval=on_eval, hooks=[curves] if curves is not None else [])
        finally:
            if curves is not None:
                curves.close()  # a pruned trial leaves run() by an exception: its curve ends there
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("flops", result.steps * per_step)
        trial.set_user_attr("seconds", round(result.seconds, 3))
        if result.status == "diverged" or result.final_val_loss is None:
            trial.set_user_attr("status", "diverged")
            trial.set_user_attr("reason", f"diverged: {result.reason}")
            raise optuna.TrialPruned(f"diverged: {result.reason}")
        trial.set_user_attr("status", "ok")
        trial.set_user_attr("val_se", result.final_val_se)  # batch standard error of the value (nats)
        trial.set_user_attr("val_tokens", result.final_val_tokens)
        return float(result.final_val_loss)

    return objective


TrialCallback = Callable[[optuna.Study, FrozenTrial], None]


def _ranked(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials of a rung, best first (ties by trial number)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: (t.value, t.number))  # type: ignore[arg-type,return-value]


def _closed(ladder: Ladder, i: int) -> bool:
    """Rung i holds every trial it will ever hold, all finished."""
    st = ladder.studies[i]
    trials = st.get_trials(deepcopy=False)
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return False
    finished = [t for t in trials if t.state in FINISHED]
    if i == 0:
        if ladder.settings.sampler is SamplerName.GRID:
            return len(finished) >= ladder.rungs[0].size or not _has_grid_left(st)
        return len(finished) >= ladder.rungs[0].size
    return _closed(ladder, i - 1) and _next_promotion(ladder, i) is None and _pending_extrapolation(ladder, i) is None


def _has_grid_left(study: optuna.Study) -> bool:
    return any(t.state is TrialState.WAITING for t in study.get_trials(deepcopy=False))


def _next_promotion(ladder: Ladder, i: int) -> FrozenTrial | None:
    """The best rung-(i-1) trial among the top ``rungs[i].promoted`` that rung i has not taken yet (rank order)."""
    chosen = _ranked(ladder.studies[i - 1])[: ladder.rungs[i].promoted]
    taken = {
        t.user_attrs.get("promoted_from")
        for t in ladder.studies[i].get_trials(deepcopy=False)
        if t.state is not TrialState.FAIL
    }
    return next((t for t in chosen if t.number not in taken), None)


def _slot(attrs: dict[str, Any]) -> int | str | None:
    """Which place of a promoted rung a trial fills: the rung-below trial it was promoted from, or
    ``"extrapolated"`` for the drift-extrapolated finalist (``"extrapolated-retry<k>"`` for its k-th stand-in
    after a divergence); None for a trial enqueued by nobody we know."""
    if "extrapolated" in attrs:
        retry = int(attrs["extrapolated"].get("retry", 0))
        return f"extrapolated-retry{retry}" if retry else "extrapolated"
    src = attrs.get("promoted_from")
    return None if src is None else int(src)


def _extrapolated(ladder: Ladder, i: int) -> list[FrozenTrial]:
    """Rung i's extrapolated finalist and its stand-ins (enqueued, running or finished; FAIL ones do not count),
    in the order they were placed."""
    trials = [t for t in ladder.studies[i].get_trials(deepcopy=False)
              if t.state is not TrialState.FAIL and "extrapolated" in t.user_attrs]  # fmt: skip
    return sorted(trials, key=lambda t: (int(t.user_attrs["extrapolated"].get("retry", 0)), t.number))


def _diverged(t: FrozenTrial) -> bool:
    return t.state is TrialState.PRUNED and t.user_attrs.get("status") == "diverged"


def _pending_extrapolation(ladder: Ladder, i: int) -> DriftFit | None:
    """The drift fit to enqueue in rung i, when rung i holds an extrapolated finalist not taken yet
    and the rungs below give a fit; None otherwise.  Call once rung i-1 is closed.

    ``--finalist fit``: when every trial placed so far diverged at the proxy width, the next is a stand-in
    one octave below the last LR that diverged (:data:`FIT_RETRIES` at most, inside the search range): a pure
    function of the finished trials, so a resumed study, or any worker, places the same one.
    """
    if not ladder.rungs[i].extrapolated:
        return None
    placed = _extrapolated(ladder, i)
    fit_mode = ladder.settings.finalist_mode is Finalist.FIT
    if not placed:
        return vertex_fit(ladder) if fit_mode else drift_fit(ladder)
    if not fit_mode or len(placed) > FIT_RETRIES or not all(_diverged(t) for t in placed):
        return None
    fit = vertex_fit(ladder)
    lo = search_space(ladder.settings, ladder.cfg)["lr"][0]
    last = float(placed[-1].params["lr"])
    if fit is None or last <= lo * (1 + 1e-9):
        return None  # no lower LR in the search range
    lr = max(last / 2, lo)
    diverged = tuple(math.log2(float(t.params["lr"])) for t in placed)
    return dataclasses.replace(fit, lr=lr, retry=len(placed), diverged=diverged)


def _pick(ladder: Ladder) -> int | None | str:
    """Under the lock: the rung to run a trial in next (a promotion is enqueued first), "wait" or None (done).

    In the proxy-width rung the extrapolated finalist (when the schedule has one) is enqueued before
    the promotions by rank.
    """
    for i in range(len(ladder.rungs) - 1, 0, -1):
        st = ladder.studies[i]
        if any(t.state is TrialState.WAITING for t in st.get_trials(deepcopy=False)):
            return i  # a promotion enqueued by a worker that died before running it
        if _closed(ladder, i - 1):
            fit = _pending_extrapolation(ladder, i)
            if fit is not None:
                st.enqueue_trial({"lr": fit.lr}, user_attrs={"extrapolated": fit.to_attrs()})
                return i
            src = _next_promotion(ladder, i)
            if src is not None:
                st.enqueue_trial(
                    dict(src.params), user_attrs={"promoted_from": src.number, "promoted_value": src.value}
                )
                return i
    st0 = ladder.studies[0]
    states = [t.state for t in st0.get_trials(deepcopy=False)]
    busy = sum(s in (*FINISHED, TrialState.RUNNING) for s in states)
    if busy < ladder.rungs[0].size and (
        ladder.settings.sampler is not SamplerName.GRID or TrialState.WAITING in states
    ):
        return 0
    running = any(t.state is TrialState.RUNNING for _, t in ladder.trials())
    return "wait" if running else None


def trial_seed(seed_base: int, n: int) -> int:
    """The sampler's seed for the study's (n+1)-th trial: a hash of (seed, n), so that studies with
    neighbouring ``--seed`` values draw unrelated points (``seed + n`` made study 1's trial k study
    0's trial k+1: five benchmark seeds shared most of their random start-up points)."""
    return zlib.crc32(f"{seed_base}:{n}".encode()) & 0x7FFFFFFF


def run_worker(
    settings: TuneSettings, cfg: RunConfig, index: int = 0, on_trial: TrialCallback | None = None, poll: float = 0.5
) -> int:
    """Run trials against the shared study until every rung is full; returns how many this worker ran.

    Each step takes the study lock, fails dead workers' trials, promotes (rung i takes the next of
    rung i-1's best once rung i-1 is closed) and picks the work; the training runs unlocked.
    """
    storage = open_storage(settings)
    seed_base = settings.seed + 7919 * index
    if settings.workers > 1 or settings.is_rdb:
        # other invocations (other machines) run workers with the same index and flags: without a per-process
        # salt two of them that see the same trial count would draw the same point.  One local worker stays
        # reproducible by --seed.
        seed_base += zlib.crc32(worker_id().encode()) % 1_000_003
    ladder = open_ladder(settings, cfg, seed_base, storage)
    from mupt.data import load_data

    tokens = load_data(cfg.data)
    objectives = [make_objective(settings, cfg, r, tokens) for r in ladder.rungs]
    ran = 0
    while True:
        with study_lock(settings, storage):
            for st in ladder.studies:
                # RDB: a stale trial is failed and retried with the same parameters (and, when promoted, the
                # same promoted_from); a RUNNING trial of a dead worker makes _pick wait for that to happen
                fail_stale_rdb_trials(st) if settings.is_rdb else fail_dead_trials(st)
            pick = _pick(ladder)
        if pick is None:
            break
        if pick == "wait":
            time.sleep(poll)
            continue
        assert isinstance(pick, int)
        study = ladder.studies[pick]
        if pick == 0:
            # reseed from the history so a resumed study does not replay the same random start-up points
            study.sampler = make_sampler(settings, trial_seed(seed_base, len(study.get_trials(deepcopy=False))))
        skipped = ""

        def note(s: optuna.Study, t: FrozenTrial) -> None:
            nonlocal skipped
            reason = str(t.user_attrs.get("reason", ""))
            skipped = next((k for k in SKIPPED if reason.startswith(k)), "") if t.state is TrialState.FAIL else ""
            if on_trial is not None and not skipped:
                on_trial(s, t)

        since, skips = len(study.get_trials(deepcopy=False)), (_OverBudget, _NoWork, _DuplicateRetry)
        try:
            study.optimize(objectives[pick], n_trials=1, catch=skips, callbacks=[note])
        except KeyboardInterrupt:
            close_interrupted(study, since)
            raise
        if skipped == "over budget":  # the first rung's budget is full: nothing left to start (a skipped
            break  # duplicate retry or a promotion another worker took leaves work to do: go on)
        ran += 0 if skipped else 1
    return ran


def _worker_entry(settings_d: dict[str, Any], cfg_d: dict[str, Any], index: int, threads: int) -> None:
    import sys

    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        run_worker(TuneSettings.from_dict(settings_d), RunConfig.model_validate(cfg_d), index)
    except KeyboardInterrupt:  # the parent saw Ctrl-C too; the trial was closed as FAIL by Optuna
        sys.exit(130)


def _interrupt_once(signum: int, frame: Any) -> None:
    """A worker's SIGINT handler: KeyboardInterrupt once, then ignore SIGINT while the trial is closed.

    Ctrl-C in a terminal (or ``timeout -s INT``) signals the whole process group and the parent forwards
    it too; a second KeyboardInterrupt inside the first one's cleanup left the trial FAIL without its
    "interrupted" reason (or cut a journal record).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def trial_label(rung: int, number: int) -> str:
    """How every user-facing line names a trial: ``r<rung>/t<number>`` (``r1/t0``: trial 0 of rung 1's study).

    Each rung is its own Optuna study, so trial numbers restart at 0 in every rung; the number alone
    (Optuna's ``FrozenTrial.number``, best.yaml's ``trial``) is ambiguous without the rung.
    """
    return f"r{rung}/t{number}"


@dataclass
class Progress:
    """Where a run stands: finished trials (all rungs) of the planned total, best so far at the proxy width
    (``best_trial``: its :func:`trial_label`), the last finished trial (``last_trial``: its label)."""

    done: int
    total: int
    best_value: float | None
    best_params: dict[str, float] = field(default_factory=dict)
    last: FrozenTrial | None = None
    running: int = 0
    best_trial: str | None = None
    #: ``last``'s :func:`trial_label`
    last_trial: str | None = None


def progress_of(ladder: Ladder, last: FrozenTrial | None = None) -> Progress:
    best = best_trial(ladder)
    c = count_states(ladder)
    total = ladder.rungs[0].size  # a rung whose lower rung is closed holds at most that rung's COMPLETE trials
    for i in range(1, len(ladder.rungs)):
        rung = ladder.rungs[i]
        if not _closed(ladder, i - 1):
            total += rung.size
            continue
        total += min(rung.promoted, len(_ranked(ladder.studies[i - 1])))
        total += len(_extrapolated(ladder, i)) + (_pending_extrapolation(ladder, i) is not None)
    return Progress(
        c["COMPLETE"] + c["PRUNED"], total, best.value if best else None, dict(best.params) if best else {}, last,
        c["RUNNING"], ladder.label(best.number) if best else None,
        ladder.label(last.number, int(last.user_attrs.get("rung", 0))) if last is not None else None,
    )  # fmt: skip


def best_trial(study: optuna.Study | Ladder) -> FrozenTrial | None:
    """The best COMPLETE trial at the proxy width (the top rung of a ladder)."""
    st = study.top if isinstance(study, Ladder) else study
    ranked = _ranked(st)
    return ranked[0] if ranked else None


def eval_noise(ladder: Ladder) -> tuple[float, int] | None:
    """(median batch standard error in nats/token, validation tokens) of the complete trials at the proxy
    width: how much the measured value of a trial moves with another draw of validation windows
    (:attr:`mupt.train.TrainResult.final_val_se`).  None when no complete trial recorded it."""
    done = [t for t in ladder.top.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("val_se") is not None]  # fmt: skip
    if not done:
        return None
    ses = sorted(float(t.user_attrs["val_se"]) for t in done)
    return ses[len(ses) // 2], int(done[0].user_attrs.get("val_tokens", 0))


def run_study(
    settings: TuneSettings, cfg: RunConfig, on_progress: Callable[[Progress], None] | None = None, poll: float = 0.5
) -> Ladder:
    """Prepare the study and run ``settings.workers`` workers (in this process when 1, else spawned processes).

    Each worker uses ``settings.threads`` torch threads (set globally in this process when workers == 1).
    KeyboardInterrupt (Ctrl-C) propagates after the running trials are closed as FAIL; every finished
    trial stays in the storage and a rerun resumes.  When the workers have finished, the study's lock file
    is removed (:func:`remove_lock_file`).
    """
    import torch

    ladder = prepare_study(settings, cfg).ladder
    if settings.workers == 1:
        torch.set_num_threads(settings.threads)
        cb = None if on_progress is None else (lambda s, t: on_progress(progress_of(ladder, t)))
        if on_progress is not None:
            on_progress(progress_of(ladder))
        run_worker(settings, cfg, 0, cb, poll)
        remove_lock_file(settings)
        return ladder
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_entry, args=(settings.to_dict(), to_dict(cfg), i, settings.threads), daemon=False)
        for i in range(settings.workers)
    ]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            if on_progress is not None:
                on_progress(progress_of(ladder))
            time.sleep(poll)
    except KeyboardInterrupt:
        for p in procs:  # let each worker close its running trial, then stop it
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join(timeout=30)
        raise
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    if on_progress is not None:
        on_progress(progress_of(ladder))
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise StorageError(f"{len(bad)} of {len(procs)} worker processes failed (exit codes {bad}); rerun to resume")
    remove_lock_file(settings)
    return ladder


def load_existing(settings: TuneSettings, cfg: RunConfig) -> Ladder:
    """Load a study that must already exist (for reports); creates nothing.

    Raises StorageError naming the studies there are: with the default storage (one journal per study,
    ``runs_dir/<study>/journal.log``) the study directories under ``runs_dir``, else the storage's studies.
    """
    if settings.storage is None and not settings.journal_path.is_file():
        have = ", ".join(study_dirs(settings.runs_dir)) or "none"
        raise StorageError(
            f"no study {settings.study!r} in {settings.runs_dir} (studies there: {have}); run mupt tune first, "
            "or pass --study NAME / --runs-dir DIR"
        )
    if not settings.is_rdb and not settings.journal_path.is_file():
        raise StorageError(f"--storage {settings.journal_path}: no such journal file; run mupt tune first")
    storage = open_storage(settings)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if settings.study not in names:
        have = ", ".join(n for n in names if ".rung" not in n) or "none"
        raise StorageError(f"no study named {settings.study!r} in the storage (studies: {have}); run mupt tune first")
    ladder = open_ladder(settings, cfg, storage=storage)
    if "proxy_config" in ladder.study.user_attrs:  # the rung studies must be read at the widths they ran at
        check_same_study(settings, ladder.study, study_attrs(settings, cfg), ("fidelity", "rungs", "finalist"))
    return ladder


# --- results ------------------------------------------------------------------------------------


def trial_rows(ladder: Ladder, k: int | None = None) -> list[dict[str, Any]]:
    """Finished trials, best first: the top rung's, then lower rungs' (COMPLETE by value, PRUNED, FAIL).

    Each row: ``rung``, ``d_model``, ``number`` (within its rung), ``trial`` (:func:`trial_label`), ``state``,
    the parameters, ``value`` (nats/token), ``steps``, ``flops``, ``reason``.

    Trials a worker closed without running (over budget, promotion taken) are left out.
    """
    rows = []
    for rung, t in ladder.trials():
        if t.state in (TrialState.WAITING, TrialState.RUNNING):
            continue
        reason = t.user_attrs.get("reason")
        if was_skipped(t):
            continue
        last_step = max(t.intermediate_values) if t.intermediate_values else None
        rows.append(
            {
                "rung": rung.index,
                "d_model": rung.d_model,
                "number": t.number,
                "trial": ladder.label(t.number, rung.index),
                "state": t.state.name,
                "status": t.user_attrs.get("status", "failed" if t.state is TrialState.FAIL else None),
                **{name: t.params.get(name) for name in SEARCHABLE if name in t.params or name == "lr"},
                "value": t.value if t.state is TrialState.COMPLETE else (
                    t.intermediate_values[last_step] if last_step is not None else None),
                "steps": t.user_attrs.get("steps", last_step),
                "flops": t.user_attrs.get("flops"),
                "reason": reason,
            }
        )  # fmt: skip
    rank = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2}

    def order(r: dict[str, Any]) -> tuple[int, int, float]:
        return (-int(r["rung"]), rank.get(str(r["state"]), 3), r["value"] if r["value"] is not None else math.inf)

    rows.sort(key=order)
    return rows[:k] if k else rows


def trials_dataframe(ladder: Ladder) -> Any:
    """Optuna's ``Study.trials_dataframe()`` of every rung, one table, with ``study``, ``rung`` and ``d_model``
    columns first (``number`` is the trial's number within its rung; ``study`` lets :func:`check_table_out`
    recognise a table of the same study)."""
    import pandas as pd

    frames = []
    for rung, st in zip(ladder.rungs, ladder.studies, strict=True):
        df = st.trials_dataframe()
        if df.empty:
            continue
        df.insert(0, "d_model", rung.d_model)
        df.insert(0, "rung", rung.index)
        df.insert(0, "study", ladder.settings.study)
        frames.append(df)
    empty = pd.DataFrame(columns=["study", "rung", "d_model", "number"])
    return pd.concat(frames, ignore_index=True) if frames else empty


def _table_study(path: Path) -> set[str] | None:
    """The ``study`` values of a trials table written by :func:`write_table`; None when ``path`` is not one."""
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path, columns=["study"])
        else:
            df = pd.read_csv(path, usecols=["study"], dtype=str, keep_default_na=False)
    except Exception:  # not a table, no study column, no Parquet engine: not ours
        return None
    return set(df["study"])


def check_table_out(path: Path, study: str, overwrite: bool = False) -> None:
    """Refuse to replace a ``--table-out`` file that is not this study's trials table, unless ``overwrite``.

    A file already there is replaced when it is a trials table of the same study (a rerun or a resume
    rewrites it with the trials since), as ``transfer --out`` replaces the same recipe and ``train --run-dir``
    refuses another run's directory.  Raises StorageError (one line: the file and the fix) otherwise.
    """
    if overwrite or not path.exists():
        return
    if path.is_file() and _table_study(path) == {study}:
        return
    raise StorageError(
        f"--table-out {path} exists and is not a trials table of study {study!r}: pass another --table-out FILE, "
        "or --overwrite to replace it"
    )


def write_table(ladder: Ladder, path: Path) -> Path:
    """The trials table (:func:`trials_dataframe`) as CSV, or Parquet when ``path`` ends in .parquet; atomic."""
    from mupt.config import atomic_write_text

    df = trials_dataframe(ladder)
    if path.suffix == ".parquet":
        tmp = path.with_name(f".{path.name}.tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    else:
        atomic_write_text(path, df.to_csv(index=False))
    return path


def lineage(ladder: Ladder, trial: FrozenTrial, rung_index: int) -> list[dict[str, Any]]:
    """The fidelities a trial passed through: one entry per rung, lowest first (d_model, steps, trial, loss)."""
    chain = []
    i, t = rung_index, trial
    while True:
        chain.append(
            {"rung": i, "d_model": ladder.rungs[i].d_model, "steps": t.user_attrs.get("steps"), "trial": t.number,
             "value": t.value, "flops": t.user_attrs.get("flops")}
        )  # fmt: skip
        src = t.user_attrs.get("promoted_from")
        if i == 0 or src is None:
            break
        i -= 1
        t = ladder.studies[i].trials[int(src)]
    return chain[::-1]


def obtained(trial: FrozenTrial, rung_index: int) -> dict[str, Any]:
    """How a trial's configuration was obtained: ``{"obtained": "sampled" | "promoted" | "extrapolated"}``,
    with the :class:`DriftFit` (as stored) for an extrapolated one."""
    attrs = trial.user_attrs
    if "extrapolated" in attrs:
        return {"obtained": "extrapolated", "drift_fit": attrs["extrapolated"]}
    return {"obtained": "promoted" if rung_index > 0 and "promoted_from" in attrs else "sampled"}


def best_params(ladder: Ladder, cfg: RunConfig) -> BestParams:
    """The best COMPLETE trial at the proxy width as a :class:`BestParams` (with its data's identity).

    Raises StorageError when no trial completed at the proxy width.
    """
    from mupt.data import identity_of, load_data
    from mupt.train import build_model

    best = best_trial(ladder)
    if best is None and ladder.settings.finalist_mode is Finalist.FIT and len(ladder.rungs) > 1 and is_complete(ladder):
        raise StorageError(_no_answer(ladder, _extrapolated(ladder, len(ladder.rungs) - 1)))
    if best is None:
        ran = [t for t in ladder.top.get_trials(deepcopy=False) if t.state in FINISHED or _failed(t)]
        where = f" at the proxy width d_model={ladder.rungs[-1].d_model}" if len(ladder.rungs) > 1 else ""
        if not ran or all(was_interrupted(t) for t in ran):
            stopped = " (interrupted)" if ran else ""
            raise StorageError(
                f"study {ladder.settings.study!r} has no finished trial{where} yet{stopped}; "
                "rerun the same command to resume"
            )
        pruned = sum(t.state is TrialState.PRUNED for t in ran)
        reasons = [str(t.user_attrs["reason"]) for t in ran if "reason" in t.user_attrs]
        why = f"; e.g. {reasons[0]}" if reasons else ""
        raise StorageError(
            f"study {ladder.settings.study!r} has no completed trial{where} ({pruned} pruned, "
            f"{len(ran) - pruned} failed{why}); rerun the same command to resume, or narrow --lr-range"
        )
    tuned = apply_params(cfg, dict(best.params))
    _, par = build_model(tuned)
    top = len(ladder.rungs) - 1
    return BestParams(
        study=ladder.settings.study,
        trial=best.number,
        value=float(best.value),  # type: ignore[arg-type]
        params={k: float(v) for k, v in best.params.items()},
        config=tuned,
        manifest=par.manifest.to_dict(),
        dataset=identity_of(load_data(cfg.data)),
        code_version=str(ladder.study.user_attrs.get("code_version", code_version())),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        fidelity=ladder.settings.fidelity.value,
        finalists=[
            {
                "trial": t.number,
                "value": t.value,
                "params": dict(t.params),
                **obtained(t, top),
                "fidelities": lineage(ladder, t, top),
            }
            for t in _ranked(ladder.top)
        ],
    )


def _no_answer(ladder: Ladder, placed: list[FrozenTrial]) -> str:
    """The one-line error of a complete ``--finalist fit`` study without an answer: rung 0 completed no trial
    (nothing to fit), or the fitted LR and every stand-in diverged at the proxy width
    (:func:`_pending_extrapolation`); which LRs, and the fix."""
    name, (w0, w) = ladder.settings.study, (ladder.rungs[0].d_model, ladder.rungs[-1].d_model)
    if not placed:
        n = sum(t.state in FINISHED for t in ladder.studies[0].get_trials(deepcopy=False))
        return (
            f"study {name!r} has no answer: none of rung 0's {n} trials (d_model {w0}) completed (diverged or "
            "pruned), so there is no LR to fit; search lower LRs (--lr-range LOW,HIGH) under --study NEW_NAME, or "
            "check the proxy config; the finished trials are kept"
        )
    lrs = [float(t.params["lr"]) for t in placed]
    lo = search_space(ladder.settings, ladder.cfg)["lr"][0]
    tried = ", ".join(f"{x:.3g}" for x in lrs)
    why = f"the fitted LR and {len(lrs) - 1} lower stand-in{'s' * (len(lrs) > 2)}" if len(lrs) > 1 else "the fitted LR"
    if len(lrs) <= FIT_RETRIES and min(lrs) <= lo * (1 + 1e-9):
        why += " (no lower LR in --lr-range)"
    return (
        f"study {name!r} has no answer: {why} diverged at the proxy width d_model {w} (LR {tried}), though rung 0 "
        f"completed trials at d_model {w0}; "
        f"search lower LRs (--lr-range LOW,HIGH with HIGH at most {min(lrs) / 2:.3g}) under --study NEW_NAME, or "
        "check the proxy config (multipliers, --lr-drift); the finished trials are kept"
    )


def write_best(ladder: Ladder, cfg: RunConfig, run_dir: Path) -> tuple[BestParams, Path]:
    """``run_dir/best.yaml`` from :func:`best_params`; its ``trial`` is the number within the top rung."""
    bp = best_params(ladder, cfg)
    path = run_dir / "best.yaml"
    header = f"mupt tune: best of study {bp.study} (trial {ladder.label(bp.trial)}); read by mupt transfer"
    save_yaml(path, bp, header=header)
    return bp, path


@dataclass
class RungSummary:
    """One rung's trials and compute (FLOPs)."""

    rung: int
    d_model: int
    size: int
    complete: int
    pruned: int
    failed: int
    flops: float
    best_value: float | None
    best_lr: float | None
    interrupted: int = 0


def _failed(t: FrozenTrial) -> bool:
    """A trial that started training and failed (Ctrl-C, its worker died, an error), not a skipped one."""
    return t.state is TrialState.FAIL and not was_skipped(t)


def rung_summaries(ladder: Ladder) -> list[RungSummary]:
    """Per rung: trials planned, complete, pruned, failed (started training and failed: ``interrupted`` of
    them by Ctrl-C; trials closed without training are not counted), FLOPs spent, best loss and LR."""
    out = []
    for rung, st in zip(ladder.rungs, ladder.studies, strict=True):
        ts = [t for t in st.get_trials(deepcopy=False) if t.state in FINISHED or _failed(t)]
        ranked = _ranked(st)
        out.append(
            RungSummary(
                rung.index, rung.d_model, rung.size,
                sum(t.state is TrialState.COMPLETE for t in ts), sum(t.state is TrialState.PRUNED for t in ts),
                sum(t.state is TrialState.FAIL for t in ts), sum(float(t.user_attrs.get("flops", 0.0)) for t in ts),
                ranked[0].value if ranked else None, ranked[0].params.get("lr") if ranked else None,
                sum(was_interrupted(t) for t in ts),
            )
        )  # fmt: skip
    return out


def study_flops(ladder: Ladder) -> float:
    """FLOPs spent by the finished trials of every rung (what the budget counts)."""
    return sum(float(t.user_attrs.get("flops", 0.0)) for _, t in ladder.trials() if t.state in FINISHED)


def trial_steps(ladder: Ladder) -> int:
    """Total optimizer steps spent by all finished trials (trial-steps, every rung)."""
    return sum(int(t.user_attrs.get("steps", 0)) for _, t in ladder.trials() if t.state in FINISHED)


STATE_STYLE: dict[str, tuple[str, str]] = {
    "complete": ("tab:blue", "o"),
    "pruned": ("tab:orange", "o"),
    "diverged": ("tab:red", "x"),
    "failed": ("gray", "s"),
}


def _kind(r: dict[str, Any]) -> str:
    if r["state"] == "COMPLETE":
        return "complete"
    if r["status"] == "diverged":
        return "diverged"
    return "pruned" if r["state"] == "PRUNED" else "failed"


def _edge(rows: list[dict[str, Any]]) -> float:
    finite = [r["value"] for r in rows if r["value"] is not None and math.isfinite(r["value"])]
    return max(finite) * 1.05 if finite else 1.0


def _label(r: dict[str, Any]) -> str:
    kind = _kind(r)
    if kind == "complete":
        return f"complete (final loss, step {r['steps']})"
    if kind == "pruned":
        return f"pruned (loss at step {r['steps']})"
    return f"{kind} (no loss; drawn at the top edge)"


def plot_groups(ladder: Ladder) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """The points of history.png and loss_vs_lr.png, grouped by legend label (state and step).

    ``{"history": {label: [(x, loss)]}, "loss_vs_lr": {label: [(lr, loss)]}}``; history's x is
    the trial's position (rung by rung), loss_vs_lr holds the proxy-width trials.  Diverged and
    failed trials have no loss: they sit at the top edge (5% above the largest loss) under a
    label that says so.
    """
    rows = sorted(trial_rows(ladder), key=lambda r: (r["rung"], r["number"]))
    edge = _edge(rows)
    top = len(ladder.rungs) - 1
    history: dict[str, list[tuple[float, float]]] = {}
    by_lr: dict[str, list[tuple[float, float]]] = {}
    for x, r in enumerate(rows):
        y = r["value"] if _kind(r) in ("complete", "pruned") and r["value"] is not None else edge
        history.setdefault(_label(r), []).append((float(x), y))
        if r["rung"] == top and r.get("lr"):
            by_lr.setdefault(_label(r), []).append((float(r["lr"]), y))
    return {"history": history, "loss_vs_lr": by_lr}


def write_plots(ladder: Ladder, out_dir: Path) -> list[Path]:
    """history.png, loss_vs_lr.png, and for a width ladder rungs.png and compute.png; returns the paths.

    Every trial is drawn (see :func:`plot_groups`): complete (final loss), pruned (last reported
    loss, its step in the legend), diverged and failed (no loss: markers on the top edge, labelled so).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    name = ladder.settings.study
    groups = plot_groups(ladder)
    rows = sorted(trial_rows(ladder), key=lambda r: (r["rung"], r["number"]))

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in sorted(groups["history"].items()):
        color, marker = STATE_STYLE[label.split(" ")[0]]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, marker=marker, s=20, label=label)
    best, xs, ys = math.inf, [], []
    for x, r in enumerate(rows):
        if r["state"] == "COMPLETE" and r["rung"] == len(ladder.rungs) - 1:
            best = min(best, r["value"])
        if math.isfinite(best):
            xs.append(x)
            ys.append(best)
    if xs:  # one proxy-width trial (--finalist fit, at the end) makes a one-point step: mark it
        ax.step(xs, ys, where="post", color="black", marker="*" if len(xs) == 1 else None, markersize=10,
                label=f"best so far at d_model={ladder.rungs[-1].d_model}")  # fmt: skip
    for i in range(1, len(ladder.rungs)):
        start = next((x for x, r in enumerate(rows) if r["rung"] == i), None)
        if start is not None:
            ax.axvline(start - 0.5, color="lightgray", lw=1)
    ax.set_xlabel("trial (rungs left to right, narrowest first)" if len(ladder.rungs) > 1 else "trial")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"{name}: optimization history")
    if groups["history"]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_savefig(fig, out_dir / "history.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in sorted(groups["loss_vs_lr"].items()):
        kind = label.split(" ")[0]
        color, marker = STATE_STYLE[kind]
        alpha = 0.5 if kind == "pruned" else 1.0
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, marker=marker, s=22, alpha=alpha, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"{name}: loss vs LR at d_model={ladder.rungs[-1].d_model}")
    if groups["loss_vs_lr"]:
        ax.legend(fontsize=7)
    n_top = sum(len(v) for v in groups["loss_vs_lr"].values())
    if len(ladder.rungs) > 1 and n_top < 3:  # --finalist fit: the LR search happened at rung 0
        ax.text(0.5, 0.06, f"{n_top} trial{'s' * (n_top != 1)} at the proxy width: the LR search is in rungs.png",
                transform=ax.transAxes, ha="center", va="bottom", fontsize=9, color="gray")  # fmt: skip
    fig.tight_layout()
    paths.append(_savefig(fig, out_dir / "loss_vs_lr.png"))
    plt.close(fig)

    if len(ladder.rungs) > 1:
        paths += _rung_plots(ladder, rows, out_dir, _edge(rows))
    return paths


def _draw_fit(ax: Any, fit: DriftFit, ladder: Ladder, narrow: Any, proxy: Any) -> None:
    """``--finalist fit`` in rungs.png: rung 0's parabola over the trials fitted, its vertex, the LR the
    proxy-width trial runs at (the vertex moved by the drift), and any stand-in after it diverged there."""
    import numpy as np

    (x0,) = fit.optima.values()
    if fit.parabola is not None:
        b, e, c, lo, hi = fit.parabola
        xs = np.linspace(lo, hi, 60)
        ax.plot(2.0**xs, c + e * xs + b * xs**2, color=narrow, lw=1, ls="--",
                label=f"rung 0's parabola ({fit.points} trials within {FIT_WINDOW:g} octaves of its best)")  # fmt: skip
    what = "vertex" if fit.method == "vertex" else "best trial"
    ax.axvline(2.0**x0, color=narrow, lw=0.8, ls=":", label=f"rung 0's {what}: 2^{x0:.2f}")
    doublings = math.log2(ladder.rungs[-1].d_model / ladder.rungs[0].d_model)
    ax.axvline(fit.lr, color=proxy, lw=1.2, ls="-.",
               label=f"proxy-width LR: {fit.slope:+g} x {doublings:g} doublings -> 2^{fit.log2_lr:.2f}")  # fmt: skip
    for t in _extrapolated(ladder, len(ladder.rungs) - 1)[1:]:  # stand-ins after a divergence at the proxy width
        lr = float(t.params["lr"])
        ax.axvline(lr, color=proxy, lw=1.0, ls=":", label=f"stand-in after a divergence: 2^{math.log2(lr):.2f}")


def _rung_plots(ladder: Ladder, rows: list[dict[str, Any]], out_dir: Path, top_edge: float) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    n = len(ladder.rungs)
    for rung in ladder.rungs:
        color = cmap(rung.index / max(1, n - 1))
        ok = [(r["lr"], r["value"]) for r in rows if r["rung"] == rung.index and r["state"] == "COMPLETE"]
        bad = [r["lr"] for r in rows if r["rung"] == rung.index and r["state"] == "PRUNED" and r.get("lr")]
        failed = [r for r in rows if r["rung"] == rung.index and r["state"] == "FAIL" and r.get("lr")]
        if ok:
            ax.scatter([p[0] for p in ok], [p[1] for p in ok], color=color, s=22,
                       label=f"rung {rung.index}: d_model={rung.d_model} (complete)")  # fmt: skip
        if bad:
            ax.scatter(bad, [top_edge] * len(bad), color=color, marker="x", s=22,
                       label=f"rung {rung.index}: pruned/diverged (top edge)")  # fmt: skip
        if failed:
            what = "interrupted" if all(str(r["reason"]).startswith(INTERRUPTED) for r in failed) else "failed"
            ax.scatter([r["lr"] for r in failed], [top_edge] * len(failed), edgecolors=[color], marker="s", s=22,
                       facecolors="none", label=f"rung {rung.index}: {what} (top edge)")  # fmt: skip
    fit = recorded_fit(ladder)
    if fit is not None:
        _draw_fit(ax, fit, ladder, cmap(0.0), cmap(1.0))
    elif ladder.settings.finalist_mode is Finalist.FIT and n > 1 and not _closed(ladder, 0):
        done = sum(t.state in FINISHED for t in ladder.studies[0].get_trials(deepcopy=False))
        ax.text(0.5, 0.06, f"rung 0 unfinished ({done} of {ladder.rungs[0].size} trials): no fit yet, it is made "
                "when the rung is full", transform=ax.transAxes, ha="center", va="bottom", fontsize=8,
                color="gray")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"final val loss (nats/token, step {ladder.cfg.train.steps})")
    ax.set_title(f"{ladder.settings.study}: trials per rung")
    if ax.get_legend_handles_labels()[0]:  # a study interrupted before any trial finished has none
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [_savefig(fig, out_dir / "rungs.png")]
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    sums = rung_summaries(ladder)
    grid = grid_flops(ladder.settings, ladder.cfg)
    labels = [f"rung {s.rung}\nd_model={s.d_model}" for s in sums] + ["total"]
    values = [s.flops for s in sums] + [sum(s.flops for s in sums)]
    ax.bar(labels, values, color=[cmap(s.rung / max(1, n - 1)) for s in sums] + ["black"])
    ax.axhline(grid, color="tab:red", ls="--", label=f"dense log2 LR grid at d_model={ladder.rungs[-1].d_model}")
    ax.set_ylabel("training FLOPs")
    ax.set_title(f"{ladder.settings.study}: compute per rung vs the grid's")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_savefig(fig, out_dir / "compute.png"))
    plt.close(fig)
    return paths


def _savefig(fig: Any, path: Path) -> Path:
    """Save ``fig`` as ``path`` via a temp file and rename: never half-written, no temp file left on Ctrl-C."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


__all__ = [
    "check_table_out",
    "LR_RANGE",
    "MULT_RANGE",
    "SEARCHABLE",
    "DEFAULT_LR_DRIFT",
    "DriftFit",
    "FIT_WINDOW",
    "Fidelity",
    "Finalist",
    "HalvingPruner",
    "JOURNAL_LOCK_GRACE",
    "JournalRepair",
    "Ladder",
    "Prepared",
    "Progress",
    "PrunerName",
    "Rung",
    "RungSummary",
    "SKIPPED",
    "SamplerName",
    "TuneSettings",
    "apply_params",
    "best_params",
    "best_trial",
    "clear_stale_journal_lock",
    "coarse_to_fine",
    "code_version",
    "count_states",
    "default_study_name",
    "drift_fit",
    "extrapolates",
    "fail_dead_trials",
    "fail_stale_rdb_trials",
    "file_lock",
    "finalist_words",
    "flops_per_trial_step",
    "grid_flops",
    "is_complete",
    "lineage",
    "load_best",
    "load_existing",
    "lock_file",
    "lr_grid",
    "n_finished",
    "open_ladder",
    "obtained",
    "open_storage",
    "plot_groups",
    "prepare_study",
    "proxy_config",
    "recorded_fit",
    "remove_lock_file",
    "repair_journal",
    "rung_config",
    "rung_summaries",
    "rung_widths",
    "rungs_for",
    "run_study",
    "run_worker",
    "search_space",
    "sqlalchemy_url",
    "study_flops",
    "study_dirs",
    "study_lock",
    "study_lock_file",
    "trial_label",
    "trial_rows",
    "trial_seed",
    "trial_steps",
    "trials_dataframe",
    "vertex_fit",
    "was_interrupted",
    "close_interrupted",
    "INTERRUPTED",
    "was_skipped",
    "write_best",
    "write_plots",
    "write_table",
]
