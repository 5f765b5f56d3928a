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

import datetime as _dt
import math
import multiprocessing as mp
import os
import socket
import subprocess
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mupt import __version__
from mupt.config import BestParams, OptimizerName, RunConfig, first_difference, load_best, save_yaml, to_dict
from mupt.errors import ConfigError, MuptError, StorageError

optuna.logging.set_verbosity(optuna.logging.WARNING)


class SamplerName(StrEnum):
    TPE = "tpe"
    GP = "gp"
    GRID = "grid"


class PrunerName(StrEnum):
    ASHA = "asha"
    MEDIAN = "median"
    NONE = "none"


#: Parameters that can be searched and the config field each one sets.
SEARCHABLE: dict[str, str] = {
    "lr": "train.lr",
    "output_mult": "param.output_mult",
    "embedding_mult": "param.embedding_mult",
    "init_scale": "param.init_scale",
}
#: Default log-uniform ranges.  The LR range depends on the optimizer family.
LR_RANGE: dict[str, tuple[float, float]] = {"adam": (1e-5, 1.0), "sgd": (1e-4, 1e1)}
MULT_RANGE: dict[str, tuple[float, float]] = {
    "output_mult": (1 / 16, 16.0),
    "embedding_mult": (1 / 16, 16.0),
    "init_scale": (0.25, 4.0),
}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def proxy_config() -> RunConfig:
    """The built-in proxy (``recipes/proxy.yaml`` is this config written out).

    Sized so that ``mupt tune --width 256`` with the default trial budget finishes on two CPU
    cores in minutes: 2 layers, d_state 16, 64 steps of 8 x 64 tokens, eval every 16 steps.
    """
    return RunConfig.model_validate(
        {
            "model": {"d_model": 256, "n_layers": 2, "d_state": 16},
            "data": {"source": "builtin"},
            "train": {
                "steps": 64, "batch_size": 8, "seq_len": 64, "lr": 3e-3, "optimizer": "adamw",
                "eval_every": 16, "eval_batches": 2, "seed": 0,
            },
            "param": {"scheme": "mup-ssm"},
        }
    )  # fmt: skip


@dataclass
class TuneSettings:
    """How to search (everything about the proxy run itself lives in the RunConfig)."""

    study: str
    trials: int = 16
    workers: int = 1
    sampler: SamplerName = SamplerName.TPE
    pruner: PrunerName = PrunerName.ASHA
    search: tuple[str, ...] = ("lr",)
    lr_range: tuple[float, float] | None = None
    seed: int = 0
    storage: str | None = None  # None: journal under runs_dir/study; "dialect://...": RDB; else a journal file path
    runs_dir: str = "runs"
    heartbeat_interval: int = 30  # RDB only
    threads: int = 1  # torch intra-op threads per worker; small proxies are fastest single-threaded

    def __post_init__(self) -> None:
        self.sampler = _enum(SamplerName, self.sampler, "--sampler")
        self.pruner = _enum(PrunerName, self.pruner, "--pruner")
        self.search = tuple(s.strip() for s in self.search if s.strip())
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
                raise ConfigError(f"--lr-range {lo:g},{hi:g}: need 0 < LOW < HIGH, e.g. 1e-5,1")
        if self.threads <= 0:
            raise ConfigError(f"--threads {self.threads}: must be at least 1")
        if self.heartbeat_interval <= 0:
            raise ConfigError(f"--heartbeat {self.heartbeat_interval}: must be a positive number of seconds")

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
        d = asdict(self)
        d["sampler"], d["pruner"], d["search"] = self.sampler.value, self.pruner.value, list(self.search)
        d["lr_range"] = list(self.lr_range) if self.lr_range else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneSettings:
        d = dict(d)
        d["search"] = tuple(d["search"])
        d["lr_range"] = tuple(d["lr_range"]) if d.get("lr_range") else None
        return cls(**d)


def _enum(cls: type[StrEnum], value: Any, flag: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: choose one of {', '.join(x.value for x in cls)}") from None


def default_study_name(cfg: RunConfig) -> str:
    return f"proxy-w{cfg.model.d_model}"


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
    """Fail fast (ConfigError) on a proxy the width rules cannot take, before any trial runs."""
    from mupt.train import build_model

    build_model(cfg)


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


def sqlalchemy_url(url: str) -> str:
    """``url`` with a PostgreSQL driver SQLAlchemy can import: a bare ``postgresql://`` means psycopg 3 to
    SQLAlchemy >= 2.1; when only psycopg2 (``pip install psycopg2-binary``) is installed, name it."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def open_storage(settings: TuneSettings) -> optuna.storages.BaseStorage:
    """Journal file storage (default) or an RDB URL; one-line StorageError when unusable."""
    if settings.is_rdb:
        url = settings.storage or ""
        if url.startswith("sqlite:///"):
            parent = Path(url[len("sqlite:///") :]).expanduser().parent
            if not parent.is_dir():
                raise StorageError(f"--storage {url}: directory {parent} does not exist; create it or fix the path")
        import inspect
        import warnings

        # Optuna >= 4.9 renamed the retry callback and its argument (the old names warn)
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
            raise StorageError(f"--storage {url}: database driver missing ({e}); install it (e.g. psycopg2)") from None
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

    try:
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        return optuna.storages.JournalStorage(backend)
    except Exception as e:  # a corrupt journal fails on replay
        raise StorageError(f"--storage {path}: not an Optuna journal ({type(e).__name__}); move it away") from None


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
    import warnings

    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before)


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


def make_pruner(settings: TuneSettings, cfg: RunConfig) -> optuna.pruners.BasePruner:
    every = cfg.train.eval_every
    if settings.pruner is PrunerName.ASHA:
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=every, reduction_factor=3)
    if settings.pruner is PrunerName.MEDIAN:
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=every)
    return optuna.pruners.NopPruner()


def _load(settings: TuneSettings, cfg: RunConfig, seed: int, storage: Any = None) -> optuna.Study:
    return optuna.load_study(
        study_name=settings.study,
        storage=storage or open_storage(settings),
        sampler=make_sampler(settings, seed),
        pruner=make_pruner(settings, cfg),
    )


def study_attrs(settings: TuneSettings, cfg: RunConfig) -> dict[str, Any]:
    """What makes the study reproducible; stored as study user_attrs."""
    return {
        "proxy_config": to_dict(cfg),
        "search_space": {k: list(v) for k, v in search_space(settings, cfg).items()},
        "seed": settings.seed,
        "data_source": cfg.data.source,
        "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def prepare_study(settings: TuneSettings, cfg: RunConfig) -> tuple[optuna.Study, list[int]]:
    """Create or resume the study, record/check its attrs, fail dead workers' trials, enqueue the grid.

    Returns the study and the numbers of stale trials it marked FAIL.
    """
    validate_proxy(cfg)
    storage = open_storage(settings)
    try:
        study = optuna.create_study(
            study_name=settings.study,
            storage=storage,
            sampler=make_sampler(settings, settings.seed),
            pruner=make_pruner(settings, cfg),
            direction="minimize",
            load_if_exists=True,
        )
    except MuptError:
        raise
    except Exception as e:
        raise StorageError(f"storage for study {settings.study!r}: {type(e).__name__}: {e}".splitlines()[0]) from None
    attrs = study_attrs(settings, cfg)
    old = study.user_attrs
    if "proxy_config" in old:
        for key in ("proxy_config", "search_space"):
            if old[key] != attrs[key]:
                d = first_difference(old[key], attrs[key])
                what = f"{d[0]}: {d[1]!r} then, {d[2]!r} now" if d else key
                raise ConfigError(
                    f"study {settings.study!r} was created with a different {key.replace('_', ' ')} ({what}); "
                    f"rerun with the same flags, or pass --study NEW_NAME"
                )
    else:
        for k, v in attrs.items():
            study.set_user_attr(k, v)
    stale = [] if settings.is_rdb else fail_dead_trials(study)
    if settings.sampler is SamplerName.GRID and not study.get_trials(deepcopy=False):
        lo, hi = search_space(settings, cfg)["lr"]
        grid = lr_grid(lo, hi)
        for i in coarse_to_fine(len(grid))[: settings.trials]:
            study.enqueue_trial({"lr": grid[i]}, user_attrs={"grid_index": i})
    return study, stale


def count_states(study: optuna.Study) -> dict[str, int]:
    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    return counts


def n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class _OverBudget(Exception):
    """Raised inside a trial that lost the race for the last slot of the budget."""


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


def make_objective(settings: TuneSettings, cfg: RunConfig, data: Any = None) -> Callable[[optuna.Trial], float]:
    """The trial function: train the proxy with the sampled values, report val losses, prune."""
    from mupt.data import load_data
    from mupt.train import Trainer

    space = search_space(settings, cfg)
    tokens = data if data is not None else load_data(cfg.data)
    final_step = cfg.train.steps

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_id())
        if _over_budget(trial.study, trial.number, settings.trials):
            trial.set_user_attr("reason", "over budget: other workers already filled the trial budget")
            raise _OverBudget
        twin = _earlier_twin(trial.study, trial.number)
        if twin is not None:
            trial.set_user_attr("reason", f"duplicate retry: trial {twin} already retries the same failed trial")
            raise _DuplicateRetry
        params = _suggest(trial, space)
        trainer = Trainer(apply_params(cfg, params), data=tokens)

        def on_eval(step: int, val: float) -> None:
            trial.report(val, step)
            if step < final_step and trial.should_prune():
                trial.set_user_attr("steps", step)
                trial.set_user_attr("status", "pruned")
                trial.set_user_attr("reason", f"pruned by {settings.pruner.value} at step {step} (val {val:.4f})")
                raise optuna.TrialPruned(f"pruned at step {step}")

        result = trainer.run(on_eval=on_eval)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("seconds", round(result.seconds, 3))
        if result.status == "diverged" or result.final_val_loss is None:
            trial.set_user_attr("status", "diverged")
            trial.set_user_attr("reason", f"diverged: {result.reason}")
            raise optuna.TrialPruned(f"diverged: {result.reason}")
        trial.set_user_attr("status", "ok")
        return float(result.final_val_loss)

    return objective


TrialCallback = Callable[[optuna.Study, FrozenTrial], None]


def run_worker(settings: TuneSettings, cfg: RunConfig, index: int = 0, on_trial: TrialCallback | None = None) -> int:
    """Run trials against the shared study until the TOTAL budget is reached; returns how many ran."""
    storage = open_storage(settings)
    seed_base = settings.seed + 7919 * index
    if settings.workers > 1 or settings.is_rdb:
        # other invocations (other machines) run workers with the same index and flags: without a per-process
        # salt two of them that see the same trial count would draw the same point.  One local worker stays
        # reproducible by --seed.
        seed_base += zlib.crc32(worker_id().encode()) % 1_000_003
    study = _load(settings, cfg, seed_base, storage)
    objective = make_objective(settings, cfg)
    ran = 0
    while True:
        if settings.is_rdb:
            fail_stale_rdb_trials(study)
        else:
            fail_dead_trials(study)
        states = count_states(study)
        finished = states["COMPLETE"] + states["PRUNED"]
        if finished + states["RUNNING"] >= settings.trials:
            if settings.is_rdb and finished < settings.trials:
                # a running trial may belong to a dead worker: its heartbeat stops, the next check fails
                # it and queues a retry that this worker then runs, so the budget is still met
                time.sleep(min(1.0, settings.heartbeat_interval / 2))
                continue
            break
        if settings.sampler is SamplerName.GRID and states["WAITING"] == 0:
            break  # grid exhausted
        # reseed from the history so a resumed study does not replay the same random start-up points
        study.sampler = make_sampler(settings, seed_base + sum(states.values()))
        over = False

        def note(s: optuna.Study, t: FrozenTrial) -> None:
            nonlocal over
            over = over or t.state is TrialState.FAIL and str(t.user_attrs.get("reason", "")).startswith("over budget")
            if on_trial is not None and not over:
                on_trial(s, t)

        study.optimize(objective, n_trials=1, catch=(_OverBudget, _DuplicateRetry), callbacks=[note])
        if over:
            break
        ran += 1
    return ran


def _worker_entry(settings_d: dict[str, Any], cfg_d: dict[str, Any], index: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    run_worker(TuneSettings.from_dict(settings_d), RunConfig.model_validate(cfg_d), index)


@dataclass
class Progress:
    done: int
    total: int
    best_value: float | None
    best_params: dict[str, float] = field(default_factory=dict)
    last: FrozenTrial | None = None


def progress_of(study: optuna.Study, total: int, last: FrozenTrial | None = None) -> Progress:
    best = best_trial(study)
    return Progress(n_finished(study), total, best.value if best else None, dict(best.params) if best else {}, last)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: t.value) if complete else None  # type: ignore[arg-type,return-value]


def run_study(
    settings: TuneSettings, cfg: RunConfig, on_progress: Callable[[Progress], None] | None = None, poll: float = 0.5
) -> optuna.Study:
    """Prepare the study and run ``settings.workers`` workers (in this process when 1, else spawned processes).

    Each worker uses ``settings.threads`` torch threads (set globally in this process when workers == 1).
    """
    import torch

    study, _ = prepare_study(settings, cfg)
    if settings.workers == 1:
        torch.set_num_threads(settings.threads)
        cb = None if on_progress is None else (lambda s, t: on_progress(progress_of(s, settings.trials, t)))
        if on_progress is not None:
            on_progress(progress_of(study, settings.trials))
        run_worker(settings, cfg, 0, cb)
        return study
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
                on_progress(progress_of(study, settings.trials))
            time.sleep(poll)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    if on_progress is not None:
        on_progress(progress_of(study, settings.trials))
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise StorageError(f"{len(bad)} of {len(procs)} worker processes failed (exit codes {bad}); rerun to resume")
    return study


def load_existing(settings: TuneSettings, cfg: RunConfig) -> optuna.Study:
    """Load a study that must already exist (for reports)."""
    storage = open_storage(settings)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if settings.study not in names:
        have = ", ".join(names) or "none"
        raise StorageError(f"no study named {settings.study!r} in the storage (studies: {have}); run mupt tune first")
    return _load(settings, cfg, settings.seed, storage)


# --- results ------------------------------------------------------------------------------------


def trial_rows(study: optuna.Study, k: int | None = None) -> list[dict[str, Any]]:
    """Finished trials, best first (COMPLETE by value, then PRUNED by last reported value, then FAIL)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state is TrialState.WAITING or t.state is TrialState.RUNNING:
            continue
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                **{name: t.params.get(name) for name in SEARCHABLE if name in t.params or name == "lr"},
                "value": t.value if t.state is TrialState.COMPLETE else last,
                "steps": t.user_attrs.get("steps"),
                "reason": t.user_attrs.get("reason"),
            }
        )
    rank = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2}
    rows.sort(key=lambda r: (rank.get(r["state"], 3), r["value"] if r["value"] is not None else math.inf))
    return rows[:k] if k else rows


def best_params(study: optuna.Study, cfg: RunConfig) -> BestParams:
    """The best COMPLETE trial as a :class:`BestParams` (with its data's identity); raises when no trial completed."""
    from mupt.data import identity_of, load_data
    from mupt.train import build_model

    best = best_trial(study)
    if best is None:
        counts = count_states(study)
        reasons = [str(t.user_attrs["reason"]) for t in study.get_trials(deepcopy=False) if "reason" in t.user_attrs]
        why = f"; e.g. {reasons[0]}" if reasons else ""
        raise StorageError(
            f"study {study.study_name!r} has no completed trial ({counts['PRUNED']} pruned, {counts['FAIL']} failed"
            f"{why}); lower --lr-range or run more --trials"
        )
    tuned = apply_params(cfg, dict(best.params))
    _, par = build_model(tuned)
    return BestParams(
        study=study.study_name,
        trial=best.number,
        value=float(best.value),  # type: ignore[arg-type]
        params={k: float(v) for k, v in best.params.items()},
        config=tuned,
        manifest=par.manifest.to_dict(),
        dataset=identity_of(load_data(cfg.data)),
        code_version=str(study.user_attrs.get("code_version", code_version())),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def write_best(study: optuna.Study, cfg: RunConfig, run_dir: Path) -> tuple[BestParams, Path]:
    bp = best_params(study, cfg)
    path = run_dir / "best.yaml"
    save_yaml(path, bp, header=f"mupt tune: best of study {study.study_name} (trial {bp.trial}); read by mupt transfer")
    return bp, path


def write_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optimization history and loss vs LR as PNGs; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in trial_rows(study) if r["value"] is not None or r["state"] == "PRUNED"]
    rows.sort(key=lambda r: r["number"])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    colors = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red"}

    fig, ax = plt.subplots(figsize=(6, 4))
    best, xs, ys = math.inf, [], []
    for r in rows:
        if r["value"] is not None:
            ax.scatter(r["number"], r["value"], c=colors.get(r["state"], "gray"), s=18)
        if r["state"] == "COMPLETE" and r["value"] is not None:
            best = min(best, r["value"])
        if math.isfinite(best):
            xs.append(r["number"])
            ys.append(best)
    ax.step(xs, ys, where="post", color="black", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("val loss (nats/token; pruned: last reported)")
    ax.set_title(f"{study.study_name}: optimization history")
    ax.legend()
    fig.tight_layout()
    paths.append(_savefig(fig, out_dir / "history.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for state, color in colors.items():
        pts = [(r["lr"], r["value"]) for r in rows if r["state"] == state and r["value"] is not None and r.get("lr")]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, s=18, label=state.lower())
    diverged = [r["lr"] for r in rows if r["value"] is None and r.get("lr")]
    if diverged:
        top = max((r["value"] for r in rows if r["value"] is not None), default=1.0)
        ax.scatter(diverged, [top] * len(diverged), c="tab:red", marker="x", s=30, label="diverged")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"{study.study_name}: loss vs LR")
    ax.legend()
    fig.tight_layout()
    paths.append(_savefig(fig, out_dir / "loss_vs_lr.png"))
    plt.close(fig)
    return paths


def _savefig(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def trial_steps(study: optuna.Study) -> int:
    """Total optimizer steps spent by all finished trials (the study's compute in trial-steps)."""
    return sum(int(t.user_attrs.get("steps", 0)) for t in study.get_trials(deepcopy=False, states=FINISHED))


__all__ = [
    "LR_RANGE",
    "MULT_RANGE",
    "SEARCHABLE",
    "Progress",
    "PrunerName",
    "SamplerName",
    "TuneSettings",
    "apply_params",
    "best_params",
    "best_trial",
    "coarse_to_fine",
    "code_version",
    "default_study_name",
    "fail_dead_trials",
    "fail_stale_rdb_trials",
    "load_best",
    "load_existing",
    "lr_grid",
    "open_storage",
    "prepare_study",
    "proxy_config",
    "run_study",
    "run_worker",
    "search_space",
    "sqlalchemy_url",
    "trial_rows",
    "trial_steps",
    "write_best",
    "write_plots",
]
