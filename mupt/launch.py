"""The large run: one recipe, one process or many (torchrun), DDP or FSDP2, resumable DCP checkpoints.

:func:`run` is what every rank executes.  It builds the model and optimizer through
:class:`mupt.train.Trainer` (so per-group LRs come from the width rules), wraps the model (DDP,
or FSDP2 ``fully_shard`` per block then root), rebuilds the optimizer over the wrapped
parameters, and checks that every group's LR still equals ``base lr * lr_mult`` from the
manifest and the recipe's ``per_role`` table.  It then trains with :meth:`Trainer.run`, the
one training loop of mupt, through hooks defined here: :class:`GroupAudit`,
:class:`MetricsLog`, :class:`SignalStop` and :class:`Checkpointing`; this module has no loop of
its own.  Each rank trains on its slice of the global batch; the data order is a pure function
of (seed, step), so the data position is the step.

Checkpoints (``<run_dir>/checkpoints/step_NNNNNN``) are written with
``torch.distributed.checkpoint`` (model + optimizer via ``get_state_dict``/``set_state_dict``,
which handles DDP and FSDP2 alike) plus per-rank RNG/scheduler state and a ``meta.json``
(step, fingerprint of the model/param config, file sizes).  They are written to ``.tmp`` and
renamed, then ``latest`` is rewritten atomically.  SIGTERM or SIGINT sets a flag; the loop
checkpoints and returns (a signal during set-up stops the run before its first step, writing nothing).
A corrupt checkpoint or one for another model raises :class:`CheckpointError`.

:func:`launch_distributed` hands N processes to PyTorch's elastic launcher
(``torch.distributed.run``), exactly as ``torchrun`` would, and returns torchrun's per-rank failure
records with the cause first: a rank that died (a signal) or raised on its own comes before the
ranks that stopped because it died (:class:`PeerLostError`, exit code :data:`EXIT_PEER_LOST`, their
tracebacks only in torchrun's error files).  Nothing here prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mupt.config import (
    Precision,
    Recipe,
    RunConfig,
    Schedule,
    TrainConfig,
    atomic_write_text,
    check_lr_scale,
    first_difference,
    json_text,
    save_yaml,
    to_dict,
)
from mupt.errors import CheckpointError, ConfigError, CorruptCheckpointError, MuptError
from mupt.health import HealthProbe, describe, resolve_every
from mupt.memory import MemoryEstimate, memory_estimate
from mupt.report import format_bytes
from mupt.sinks import SinkLog, Writer, check_installed, group_text, open_writers, parse_sinks
from mupt.train import Hook, StepInfo, Trainer, build_optimizer, fsdp_no_sync, lr_factor

CKPT_DIR = "checkpoints"
LATEST = "latest"
META = "meta.json"
KEEP_CHECKPOINTS = 2

LogCallback = Callable[[dict[str, Any]], None]


# --- recipe + plan ---------------------------------------------------------------------------


def apply_overrides(recipe: Recipe, **flags: Any) -> Recipe:
    """Flags (``steps``, ``grad_accum``, ``data``, ``init_from``, ``run_dir``, ``ckpt_every``, ``log_every``, ``log``,
    ``precision``, ``compile``, ``fsdp``, ``health_every``, ``health_strict``, ``lr_scale``) override the recipe;
    ``None`` leaves a field alone.

    ``lr_scale`` multiplies the transferred global LR and every ``per_role`` LR (to try multiples
    of the transferred LR; the LR multipliers stay the rules'); it must be finite and positive,
    else :class:`ConfigError`.  A run dir resumed with another scale is refused (the LR is part
    of the checkpoint's fingerprint).  An unknown ``log`` sink raises :class:`ConfigError`.
    """
    data = to_dict(recipe)
    for key, value in flags.items():
        if value is None:
            continue
        if key == "lr_scale":
            check_lr_scale(value)
            data["run"]["train"]["lr"] *= value
            for row in data["per_role"].values():
                if row.get("lr") is not None:
                    row["lr"] *= value
        elif key in ("steps", "grad_accum"):
            data["run"]["train"][key] = value
        elif key == "data":
            data["run"]["data"]["source"] = str(value)
        elif key == "init_from":
            data["run"]["train"]["init_from"] = str(value)
        elif key in LAUNCH_FLAGS:
            data["launch"][key] = str(value) if key == "run_dir" else value
        else:
            raise KeyError(f"apply_overrides: unknown flag {key!r}")
    from mupt.config import from_dict

    out = from_dict(Recipe, data, where="flags")
    check_installed(parse_sinks(out.launch.log))
    return out


LAUNCH_FLAGS = ("run_dir", "ckpt_every", "log_every", "precision", "compile", "fsdp", "log",
                "health_every", "health_strict")  # fmt: skip


def worker_flags(
    recipe: Recipe, resume: bool | None, lr_scale: float | None = None, reschedule: bool = False
) -> list[str]:
    """CLI flags that make a worker see exactly the resolved recipe (after overrides)."""
    lc = recipe.launch
    flags = [
        "--run-dir", lc.run_dir, "--steps", str(recipe.run.train.steps), "--data", recipe.run.data.source,
        "--ckpt-every", str(lc.ckpt_every), "--grad-accum", str(recipe.run.train.grad_accum),
        "--log-every", str(lc.log_every), "--log-sinks", lc.log, "--precision", lc.precision.value,
        "--compile" if lc.compile else "--no-compile", "--fsdp" if lc.fsdp else "--no-fsdp",
    ]  # fmt: skip
    if recipe.run.train.init_from is not None:
        flags += ["--init-from", recipe.run.train.init_from]
    if lc.health_every is not None:
        flags += ["--health-every", str(lc.health_every)]
    flags.append("--health-strict" if lc.health_strict else "--no-health-strict")
    if resume is not None:
        flags.append("--resume" if resume else "--no-resume")
    if lr_scale is not None:
        flags += ["--lr-scale", repr(lr_scale)]
    if reschedule:
        flags.append("--reschedule")
    return flags


def torchrun_args(
    recipe_path: str | Path, flags: list[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None
) -> list[str]:
    """The argv ``torchrun`` would get to run ``mupt scale`` on N processes per node."""
    if nproc < 1 or nnodes < 1:
        raise ConfigError(f"--nproc ({nproc}) and --nnodes ({nnodes}) must be >= 1")
    if nnodes > 1 and not rdzv_endpoint:
        raise ConfigError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node)")
    if rdzv_endpoint:
        rdzv_id = hashlib.sha1(str(recipe_path).encode()).hexdigest()[:8]
        head = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
        head += ["--rdzv-id", f"mupt-{rdzv_id}"]
    else:
        head = ["--standalone", "--nnodes", "1"]
    tail = ["-m", "mupt", "scale", str(recipe_path), *flags]
    return [*head, "--nproc-per-node", str(nproc), "--max-restarts", "0", *tail]


def is_worker() -> bool:
    """True inside a process started by torchrun / torch.distributed.run."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def stop_with_launcher(sig: int = signal.SIGTERM) -> bool:
    """Linux: have the kernel send ``sig`` to this worker when its parent (the torchrun agent) dies.

    torchrun starts each worker in a session of its own, so a launcher killed with SIGKILL (OOM killer,
    ``kill -9``, a lost job step) would leave the workers training on, orphaned, still writing
    checkpoints into the run directory that the rerun resumes from.  With SIGTERM they checkpoint at
    the next step boundary and stop, as after a forwarded SIGTERM.  Returns whether it was set
    (``prctl(PR_SET_PDEATHSIG)``, see prctl(2)); elsewhere it does nothing.
    """
    import sys

    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(1, int(sig), 0, 0, 0)) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


#: Exit code of a worker whose failure was caused by another rank: a collective failed after the launcher
#: (torchrun's agent) had started stopping the group because some rank had died.  75 is sysexits.h's
#: EX_TEMPFAIL: nothing is wrong in this rank; rerunning the command resumes from the last checkpoint.
EXIT_PEER_LOST = 75

#: Seconds a failed worker of a multi-rank run waits for the agent's SIGTERM before it calls its own error the
#: cause.  torchrun's agent polls its workers every 0.1 s (``--monitor-interval``) and sends SIGTERM to the
#: survivors as soon as one has died, so a rank whose collective failed because a peer died gets it well
#: within this; a rank with an error of its own gets none (its peers are alive, waiting in a collective).
PEER_GRACE_S = 5.0


@contextmanager
def signals_end_process() -> Iterator[None]:
    """SIGINT and SIGTERM end this process at once (the system's default action) inside the block; main thread only.

    For the rendezvous of the ranks (``init_process_group``): its wait for the other ranks is C++, which a Python
    handler (KeyboardInterrupt, or :class:`SignalStop`'s flag) only reaches after it returns, so a rank whose peer
    was stopped by the same Ctrl-C waited there until torchrun's agent killed it, 30 s later.  Nothing has been
    trained or written yet; the launcher reports the stop.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class PeerLostError(RuntimeError):
    """A rank stopped because another rank died: its collective failed after the launcher began stopping the
    group (it got SIGTERM).  The original error is the ``__cause__``; :attr:`rank` is this rank."""

    def __init__(self, rank: int, signum: int) -> None:
        super().__init__(f"rank {rank} stopped: another rank died (the launcher sent signal {signum})")
        self.rank, self.signum = rank, signum


def record_failure(exc: BaseException) -> None:
    """Write ``exc`` (with the traceback being handled) to this worker's torchrun error file.

    torchrun gives each worker a ``TORCHELASTIC_ERROR_FILE``; the agent reads it back into the
    :class:`~torch.distributed.elastic.multiprocessing.errors.ProcessFailure` of that rank (message,
    traceback, timestamp), which :func:`launch_distributed` reports.  Outside torchrun it does nothing.
    Call it inside the ``except`` block (it records ``traceback.format_exc()``).
    """
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(exc)


@dataclass(frozen=True)
class WorkerFailure:
    """One failed rank of a torchrun job, from torchrun's own record of it (``ProcessFailure``).

    ``exitcode`` is negative for a rank killed by a signal (``-9``: SIGKILL, e.g. the out-of-memory killer
    or ``kill -9``); :data:`EXIT_PEER_LOST` for a rank that stopped because another died.  ``message`` is the
    recorded exception (``"Type: text"``, first line) and ``error_file`` holds its traceback; both empty
    when the rank recorded none (a signal, or an error mupt already printed as one line).  ``timestamp``:
    seconds since the epoch, when the error was recorded or, without a record, when the agent noticed.
    """

    rank: int
    exitcode: int
    timestamp: int
    message: str = ""
    error_file: str = ""

    @property
    def signal(self) -> int | None:
        return -self.exitcode if self.exitcode < 0 else None

    @property
    def peer_lost(self) -> bool:
        return self.exitcode == EXIT_PEER_LOST

    @property
    def user_error(self) -> str | None:
        """The one-line user error (a :class:`MuptError`, exit code 2) this rank recorded, without its type name."""
        if self.exitcode != 2 or not self.message:
            return None
        return self.message.partition(": ")[2] or self.message  # ErrorHandler writes "Type: text"

    def signal_name(self) -> str:
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return "unknown signal"


def worker_failures(failures: dict[int, Any]) -> list[WorkerFailure]:
    """torchrun's ``ChildFailedError.failures`` (global rank -> ``ProcessFailure``) as :class:`WorkerFailure`
    rows, the cause first: ranks that failed on their own before those that stopped because a peer died
    (:data:`EXIT_PEER_LOST`) or were killed by SIGTERM (the agent stopping the survivors of a failure: a rank
    that is training handles SIGTERM itself, checkpoints and exits 0), then by timestamp (torchrun's "first
    observed failure", whole seconds), then by rank."""
    rows = []
    for rank, f in failures.items():
        data = f.message if isinstance(f.message, dict) else {}
        recorded = bool(data) and f.error_file not in ("", "<N/A>", os.devnull)
        message = str(data.get("message", "")).strip().splitlines() if recorded else []
        rows.append(WorkerFailure(int(rank), int(f.exitcode), int(f.timestamp), message[0] if message else "",
                                  f.error_file if recorded else ""))  # fmt: skip
    return sorted(rows, key=lambda w: (w.peer_lost or w.signal == signal.SIGTERM, w.timestamp, w.rank))


@dataclass(frozen=True)
class LaunchResult:
    """What :func:`launch_distributed` returns: the exit code for the user and the failed ranks, cause first.

    ``code``: 0 when every rank finished; ``128 + signal`` when the launcher itself got SIGTERM/SIGINT (the
    workers checkpointed and stopped); else the cause's own positive exit code (2: a user error it
    printed), or 1 (a rank killed by a signal, a rank that raised, or only ranks that lost a peer).
    """

    code: int
    failures: list[WorkerFailure] = field(default_factory=list)

    @property
    def cause(self) -> WorkerFailure | None:
        return self.failures[0] if self.failures else None

    def user_errors(self) -> list[tuple[list[int], str]]:
        """Each distinct user error the ranks recorded (:attr:`WorkerFailure.user_error`), cause first, with the ranks
        that recorded it: a bad dataset or checkpoint makes every rank raise the same one."""
        found: dict[str, list[int]] = {}
        for w in self.failures:
            if w.user_error is not None:
                found.setdefault(w.user_error, []).append(w.rank)
        return [(sorted(ranks), text) for text, ranks in found.items()]


def launch_distributed(argv: list[str]) -> LaunchResult:
    """Run ``torch.distributed.run`` with ``argv`` (as torchrun would); returns the outcome.

    A SIGTERM/SIGINT to this process is forwarded to the workers by the elastic agent (they
    checkpoint and stop); it comes back here as ``128 + signal``.  When workers fail, torchrun's
    per-rank records (exit code or signal, error file) are returned, the cause first
    (:func:`worker_failures`).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as elastic_run

    try:
        elastic_run(parse_args(argv))
    except ChildFailedError as e:
        failures = worker_failures(e.failures)
        own = failures[0].exitcode
        return LaunchResult(own if 0 < own != EXIT_PEER_LOST else 1, failures)
    except SignalException as e:
        return LaunchResult(128 + int(e.sigval))
    return LaunchResult(0)


@dataclass
class Plan:
    """What ``mupt scale --dry-run`` prints: the resolved run, its launch command and memory per rank."""

    d_model: int
    n_layers: int
    d_state: int
    world: int
    fsdp: bool
    device: str
    precision: Precision  # resolved: fp32 or bf16
    global_batch: int
    seq_len: int
    steps: int
    tokens: int
    memory: MemoryEstimate  # bytes per rank (mupt.memory)
    command: str
    scan_backend: str
    health: str = "off"  # the live µP health check, in words (mupt.health.describe)
    arch: str = "arch=mamba1"  # the mixer, ModelConfig.arch_label (mamba2: heads and groups too)

    @property
    def params(self) -> int:
        return self.memory.params

    def rows(self) -> list[tuple[str, Any]]:
        m = self.memory
        act = "fp32" if self.precision is Precision.FP32 else "fp32 count, an upper bound under bf16"
        return [
            ("model", f"{self.arch} d_model={self.d_model} layers={self.n_layers} d_state={self.d_state}"),
            ("parameters", f"{self.params:,}"),
            ("processes", f"{self.world} ({'FSDP2' if self.fsdp else 'DDP' if self.world > 1 else 'single'})"),
            ("device / precision", f"{self.device} / {self.precision.value}"),
            ("scan backend", self.scan_backend),
            ("global batch x seq", f"{self.global_batch} x {self.seq_len}"),
            ("steps / tokens", f"{self.steps:,} / {self.tokens:,}"),
            ("weights fp32 (per rank)", format_bytes(m.weights)),
            ("grads fp32 (per rank)", format_bytes(m.grads)),
            ("optimizer states (per rank)", format_bytes(m.optimizer)),
            (f"activations (per rank, {act})", format_bytes(m.activations)),
            ("total (per rank)", format_bytes(m.total)),
            ("µP health check", self.health),
            ("launch command", self.command),
        ]


def make_plan(recipe: Recipe, world: int, command: str) -> Plan:
    """The dry-run plan for ``recipe`` on ``world`` ranks (the recipe is assumed validated)."""
    cfg = recipe.run
    cuda = torch.cuda.is_available()
    precision = recipe.launch.precision.resolve(cuda)
    from mupt.scan import resolve_backend

    backend = resolve_backend(cfg.model.scan_backend, torch.device("cuda" if cuda else "cpu")).value
    tc = cfg.train
    return Plan(
        cfg.model.d_model, cfg.model.n_layers, cfg.model.d_state, world, recipe.launch.fsdp,
        "cuda" if cuda else "cpu", precision, tc.batch_size, tc.seq_len, tc.steps,
        tc.steps * tc.batch_size * tc.seq_len, memory_estimate(cfg, world, recipe.launch.fsdp), command, backend,
        describe(recipe), cfg.model.arch_label,
    )  # fmt: skip


# --- fingerprint -------------------------------------------------------------------------------


def fingerprint_fields(cfg: RunConfig) -> dict[str, Any]:
    """What must match for a checkpoint to be loadable into this run (the scan backend need not)."""
    model = to_dict(cfg.model)
    model.pop("scan_backend", None)
    fields = {
        "model": model,
        "param": to_dict(cfg.param),
        "optimizer": cfg.train.optimizer.value,
        "lr": cfg.train.lr,
    }
    if cfg.train.init_from is not None:  # folded multipliers: another parametrization of the same weights
        fields["init_from"] = cfg.train.init_from
    return fields


#: The model fields a checkpoint mismatch names first: the mixer, then the shape (a different LR usually follows
#: from a different model, so naming the LR first hides the real cause).
MODEL_FIELDS_FIRST = ("arch", "d_model", "n_layers", "d_state", "expand", "headdim", "ngroups", "d_conv", "vocab_size")


def recipe_difference(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first field where two :func:`fingerprint_fields` differ, as (dotted key, old, new): the model's arch,
    then its shape (:data:`MODEL_FIELDS_FIRST`), then the rest of the model, the parametrization, the optimizer,
    the LR and anything else; ``None`` when they match."""
    old_model, new_model = old.get("model") or {}, new.get("model") or {}
    for key in MODEL_FIELDS_FIRST:
        d = first_difference(old_model.get(key), new_model.get(key), f"model.{key}.")
        if d is not None:
            return d
    for top in ("model", "param", "optimizer", "lr"):
        d = first_difference(old.get(top), new.get(top), f"{top}.")
        if d is not None:
            return d
    return first_difference(old, new)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def fingerprint(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(fingerprint_fields(cfg), sort_keys=True).encode()).hexdigest()[:16]


# --- per-group learning rates --------------------------------------------------------------------


def regroup(trainer: Trainer, module: nn.Module) -> list[dict[str, Any]]:
    """Trainer's groups rebuilt over ``module``'s (possibly sharded) parameters, matched by name."""
    by_name = dict(module.named_parameters())
    base = trainer.cfg.train.lr
    groups = []
    for g in trainer.par.param_groups:
        missing = [n for n in g["names"] if n not in by_name]
        if missing:
            raise ConfigError(f"after wrapping, parameter {missing[0]!r} is gone; cannot keep its LR group")
        groups.append(
            {
                "params": [by_name[n] for n in g["names"]],
                "names": list(g["names"]),
                "lr": base * g["lr_mult"],
                "lr_mult": g["lr_mult"],
                "weight_decay": g["weight_decay"],
                "eps": g["eps"],
            }
        )
    return groups


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return _close(float(a), float(b))


def validate_recipe(recipe: Recipe) -> None:
    """Everything ``mupt scale`` would refuse in a recipe, checked on a meta-device model (no weights).

    The width rules are run at the recipe's shape (:func:`mupt.transfer.shape_info`, which raises
    for a d_model / base shape the rules cannot use); then every number the recipe states must be
    what they give: ``per_role`` (init_std, lr = base lr x lr_mult, fwd_mult, weight_decay), the
    ``manifest`` header (scheme, optimizer, shapes) and each manifest entry.  ``mupt scale``
    builds its model from ``run`` and the rules, so a hand-edited number would be silently
    ignored; it is refused instead.  Raises :class:`ConfigError` (one line, naming the field, both
    values and the fix).
    """
    from mupt.transfer import shape_info

    cfg = recipe.run
    base = cfg.train.lr
    if not math.isfinite(base):
        raise ConfigError(f"recipe run.train.lr={base}: must be a finite positive number; fix the recipe")
    info = shape_info(cfg)
    fix = "regenerate the recipe with mupt transfer (to change a role, change run.param instead)"
    for role, row in recipe.per_role.items():
        fresh = info.roles.get(role)
        if fresh is None:
            raise ConfigError(
                f"recipe per_role.{role}: this model has no such role (it has {', '.join(info.roles)}); {fix}"
            )
        want = fresh.recipe_row()
        for key, value in row.items():
            if key not in want:
                raise ConfigError(f"recipe per_role.{role}.{key}: unknown field (known: {', '.join(want)}); {fix}")
            if _same(value, want[key]):
                continue
            if key == "lr":
                raise ConfigError(
                    f"recipe per_role.{role}.lr={value:g} but base lr {base:g} x lr_mult {fresh.lr_mult:g} = "
                    f"{want[key]:g}; {fix}"
                )
            raise ConfigError(
                f"recipe per_role.{role}.{key}={value} but the width rules give {want[key]} at d_model "
                f"{cfg.model.d_model} (base {info.manifest.base_d_model}); {fix}"
            )
    man = recipe.manifest
    if man is None:
        return
    for key in ("scheme", "optimizer", "discretization", "base_d_model", "base_d_state", "d_model", "d_state"):
        given, fresh = getattr(man, key), getattr(info.manifest, key)
        if str(given) != str(fresh):
            raise ConfigError(f"recipe manifest.{key}={given} but run gives {fresh}; {fix}")
    fresh_params = info.manifest.params
    for name, entry in man.params.items():
        ref = fresh_params.get(name)
        if ref is None:
            raise ConfigError(f"recipe manifest.params has {name!r}, which this model does not have; {fix}")
        for key in ("lr_mult", "init_std", "fwd_mult", "weight_decay"):
            if not _same(getattr(entry, key), getattr(ref, key)):
                raise ConfigError(
                    f"recipe manifest gives {name} {key}={getattr(entry, key)} but the width rules give "
                    f"{getattr(ref, key)}; {fix}"
                )


def check_group_lrs(trainer: Trainer, module: nn.Module) -> None:
    """Audit the optimizer against the width rules: every group's lr == base lr x lr_mult x schedule,
    ``initial_lr`` == base lr x lr_mult, weight_decay and eps as :func:`mupt.parametrization.apply`
    gave them, and every parameter of ``module`` in exactly the groups it was given.

    Run after wrapping and again after a resume (a checkpoint's param groups replace the
    optimizer's).  Raises :class:`CheckpointError` naming the parameter, the value and the
    expectation; :class:`ConfigError` when wrapping lost parameters.
    """
    cfg = trainer.cfg
    base = cfg.train.lr
    ref_groups = {name: g for g in trainer.par.param_groups for name in g["names"]}
    factor = lr_factor(cfg.train)(trainer.step)
    seen: set[int] = set()
    advice = "the checkpoint or wrapper changed it; resume with the recipe it was made with, or a new --run-dir"
    for g in trainer.optimizer.param_groups:
        if len(g["params"]) != len(g["names"]):
            raise ConfigError("optimizer group lost parameters after wrapping; cannot verify per-group LRs")
        for p, name in zip(g["params"], g["names"], strict=True):
            seen.add(id(p))
            ref = ref_groups[name]
            mult = float(ref["lr_mult"])
            want = base * mult
            if not _close(float(g.get("initial_lr", g["lr"])), want) or not _close(float(g["lr"]), want * factor):
                raise CheckpointError(
                    f"optimizer group of {name} has lr {g['lr']:g}, expected {want * factor:g} "
                    f"(base {base:g} x lr_mult {mult:g} x schedule {factor:g}); {advice}"
                )
            for key in ("weight_decay", "eps"):
                if key in ref and key in g and not _close(float(g[key]), float(ref[key])):
                    raise CheckpointError(
                        f"optimizer group of {name} has {key} {g[key]:g}, expected {ref[key]:g} (width rules); {advice}"
                    )
    ours = {id(p) for p in module.parameters()}
    if ours != seen:
        raise ConfigError(
            f"optimizer covers {len(seen)} tensors but the wrapped model has {len(ours)}; per-group LRs would be lost"
        )


# --- checkpoints ---------------------------------------------------------------------------------


def _step_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint directory (``step_NNNNNN``, as :func:`checkpoints` lists them) was written at."""
    return int(path.name.removeprefix("step_"))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoints(run_dir: Path) -> list[Path]:
    """The renamed (complete when written) ``step_NNNNNN`` directories, newest first.

    A directory is renamed from ``.tmp`` only after every file and ``meta.json`` are written, so
    the newest one is the latest checkpoint even when a crash left the ``latest`` pointer behind;
    the pointer is for people and tools, resuming does not need it.
    """
    root = run_dir / CKPT_DIR
    done = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted(done, key=lambda p: p.name, reverse=True)


def find_latest(run_dir: Path) -> Path | None:
    """The newest checkpoint directory, or None (see :func:`checkpoints`)."""
    found = checkpoints(run_dir)
    return found[0] if found else None


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(trainer: Trainer, run_dir: Path, extra: dict[str, Any], rank: int) -> Path:
    """Write ``step_NNNNNN`` via ``.tmp`` + rename and repoint ``latest``; every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = run_dir / CKPT_DIR
    final = root / _step_name(trainer.step)
    tmp = root / (final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    msd, osd = get_state_dict(trainer.model, trainer.optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save(
        {"rng": _rng_state(trainer.device), "scheduler": trainer.scheduler.state_dict()}, tmp / f"rank_{rank}.pt"
    )
    _barrier()
    if rank == 0:
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {
            "step": trainer.step,
            "fingerprint": fingerprint(trainer.cfg),
            "fingerprint_fields": fingerprint_fields(trainer.cfg),
            "world": trainer.world,
            "files": sizes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        atomic_write_text(tmp / META, json_text(meta, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / LATEST, final.name + "\n")
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def read_meta(path: Path, cfg: RunConfig) -> dict[str, Any]:
    """Parse and validate ``meta.json``: complete files, matching fingerprint."""
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        step = int(meta["step"])
        files: dict[str, int] = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt (meta.json unreadable: {type(e).__name__})"
        ) from None
    for name, size in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            got = f.stat().st_size if f.is_file() else "missing"
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt ({name}: {got} bytes, expected {size})")
    if meta.get("fingerprint") != fingerprint(cfg):
        d = recipe_difference(meta.get("fingerprint_fields", {}), fingerprint_fields(cfg))
        diff = f"{d[0]} {_shown(d[1])} in the checkpoint vs {_shown(d[2])} in the recipe" if d else "fingerprint"
        raise CheckpointError(
            f"checkpoint {path} was written for another recipe ({diff}); use the recipe it was made with, or "
            f"--run-dir NEW_DIR for this one (a run dir holds one run: {path.parent.parent} is in use)"
        )
    meta["step"] = step
    return meta


class _DropDcpLogs(logging.Filter):
    """Drops records logged by ``torch.distributed.checkpoint`` modules (they log to the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "distributed/checkpoint" not in record.pathname.replace("\\", "/")


def load_checkpoint(trainer: Trainer, path: Path, rank: int) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, RNG and step from ``path``; returns its meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = read_meta(path, trainer.cfg)
    msd, osd = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": msd, "optim": osd}
    quiet = _DropDcpLogs()  # DCP logs a garbage .metadata with a traceback on the ROOT logger; we raise one line
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(trainer.model, trainer.optimizer, model_state_dict=msd, optim_state_dict=osd)
        own = path / f"rank_{rank}.pt"
        extra = torch.load(own if own.is_file() else path / "rank_0.pt", weights_only=False)
        trainer.scheduler.load_state_dict(extra["scheduler"])
        if own.is_file():
            _set_rng_state(extra["rng"], trainer.device)
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException with a multi-line message
        first = " ".join((str(e).strip().splitlines() or [""])[0].split())[:160]
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {first})"
        ) from None
    trainer.step = int(meta["step"])
    return meta


def resume_from(trainer: Trainer, found: list[Path]) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """Load the newest checkpoint of ``found`` that is intact; returns (path, meta, reasons skipped).

    A corrupt checkpoint (:class:`CorruptCheckpointError` on any rank) is skipped for the one
    before it; every rank takes the same decision.  Raises :class:`CheckpointError` when a
    checkpoint belongs to another model, or when every checkpoint is corrupt (the run dir is left
    as it is, for inspection).
    """
    skipped: list[str] = []
    for path in found:
        try:
            meta: dict[str, Any] | None = load_checkpoint(trainer, path, trainer.rank)
            error = None
        except CorruptCheckpointError as e:
            meta, error = None, str(e)
        if not trainer.any_rank(meta is None):
            return path, meta, skipped
        skipped.append(error or f"checkpoint {path} is corrupt on another rank")
    if skipped:
        more = f" (and {len(skipped) - 1} older ones)" if len(skipped) > 1 else ""
        raise CheckpointError(
            f"{skipped[0]}{more}, and no intact checkpoint is left; pass a new --run-dir to start over"
        )
    return None, None, skipped


def schedule_fields(tc: TrainConfig) -> dict[str, Any]:
    """What the LR multiplier at a step depends on (:func:`mupt.train.lr_factor`)."""
    return {"steps": tc.steps, "schedule": tc.schedule.value, "warmup_steps": tc.warmup_steps}


def check_schedule(meta: dict[str, Any], path: Path, tc: TrainConfig, reschedule: bool) -> None:
    """Refuse to resume with another LR schedule than the checkpoint's unless ``reschedule``.

    Changing ``--steps`` rescales a cosine or linear decay: the LR would jump at the resumed step.
    A constant schedule (same warmup) does not depend on the length, so it may be extended.
    Raises :class:`ConfigError` naming both LRs and the two ways out.
    """
    old = meta.get("lr_schedule")
    new = schedule_fields(tc)
    if reschedule or not isinstance(old, dict) or old == new:
        return
    same_shape = old.get("schedule") == new["schedule"] and old.get("warmup_steps") == new["warmup_steps"]
    if same_shape and new["schedule"] == "constant":
        return
    try:
        then = tc.model_copy(update={"steps": int(old["steps"]), "schedule": Schedule(old["schedule"]),
                                     "warmup_steps": int(old["warmup_steps"])})  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return  # an older meta.json without a readable schedule: nothing to compare against
    step = int(meta["step"])
    a, b = tc.lr * lr_factor(then)(step), tc.lr * lr_factor(tc)(step)
    raise ConfigError(
        f"checkpoint {path.name} was written for a {old['steps']}-step {old['schedule']} schedule (warmup "
        f"{old['warmup_steps']}); resuming with {new['steps']} steps, {new['schedule']}, warmup {new['warmup_steps']} "
        f"would move the LR at step {step} from {a:.3g} to {b:.3g}; pass --steps {old['steps']}, or --reschedule "
        "to accept the new schedule"
    )


# --- the run -------------------------------------------------------------------------------------


@dataclass
class ScaleResult:
    status: str  # "ok" | "terminated" | "diverged"
    reason: str | None
    start_step: int
    steps: int
    tokens_seen: int
    tokens_this_run: int
    seconds: float
    tokens_per_s: float
    best_val_loss: float | None
    final_val_loss: float | None
    last_loss: float | None
    world: int
    run_dir: str
    checkpoint: str | None = None
    signal: int | None = None  # the signal that stopped the run (status "terminated")
    health_stop: str | None = None  # the µP health reading that stopped the run (status "unhealthy")
    losses: list[tuple[int, float]] = field(default_factory=list)
    #: The run dir's checkpoint had already reached ``steps``: nothing was trained (no throughput to report;
    #: summary.json keeps the results of the run that trained).
    already_finished: bool = False

    @property
    def before_training(self) -> bool:
        """Stopped by a signal during set-up: not one step trained, nothing written (see :func:`run`)."""
        return self.status == "terminated" and self.steps == self.start_step

    def summary(self) -> dict[str, Any]:
        """summary.json's fields: everything but the per-step losses and ``already_finished``."""
        d = asdict(self)
        d.pop("losses")
        d.pop("already_finished")
        return d


def _already_finished(run_dir: Path, step: int, tokens_per_step: int, best_val: float | None, world: int,
                      checkpoint: Path) -> ScaleResult:  # fmt: skip
    """The result of a rerun whose checkpoint is at the last step: the losses from the summary.json of the run
    that finished (when it is readable and of that step), no time or throughput of its own."""
    last = final = None
    try:
        prev = json.loads((run_dir / "summary.json").read_text())
        if prev.get("steps") == step:
            last, final = prev.get("last_loss"), prev.get("final_val_loss")
    except (OSError, ValueError, AttributeError):
        pass
    return ScaleResult(
        "ok", None, step, step, step * tokens_per_step, 0, 0.0, 0.0, best_val, final, last, world, str(run_dir),
        str(checkpoint), already_finished=True,
    )  # fmt: skip


def _before_training(trainer: Trainer, run_dir: Path, best_val: float | None, world: int, latest: Path | None,
                     signum: int | None) -> ScaleResult:  # fmt: skip
    """The result of a run stopped by a signal during set-up, before its first step: nothing trained, no checkpoint
    or summary.json written (the run dir's checkpoints, if any, are as they were).  ``signum`` is None on a rank
    that got none itself (another rank did)."""
    why = f"signal {signum}" if signum is not None else "stop requested on another rank"
    step = trainer.step
    return ScaleResult(
        "terminated", f"{why} before the first step", step, step, step * trainer.tokens_per_step, 0, 0.0, 0.0, best_val,
        None, None, world, str(run_dir), str(latest) if latest is not None else None, signum,
    )  # fmt: skip


class Autocast(nn.Module):
    """Runs the wrapped module under bf16 autocast; parameters stay fp32 (master weights).

    ``launch.precision: bf16`` (:class:`mupt.config.Precision`) wraps the model in it; public so that
    benchmarks measure the same wrapping as ``mupt scale``.
    """

    def __init__(self, inner: nn.Module, device_type: str) -> None:
        super().__init__()
        self.inner = inner
        self.device_type = device_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.inner(*args, **kwargs)


class SignalStop(Hook):
    """SIGTERM and SIGINT (Ctrl-C) set a flag; the run checkpoints at the next step boundary and stops.

    A context manager: the handlers are installed on entry (main thread only) and the previous
    ones restored on exit.  :attr:`signal` holds the number of the first signal received.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalStop:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def should_stop(self, trainer: Trainer) -> str | None:
        return None if self.signal is None else f"signal {self.signal}"

    def wait(self, seconds: float) -> int | None:
        """Wait up to ``seconds`` for a signal (returns at once if one came already); its number, or None."""
        deadline = time.monotonic() + seconds
        while self.signal is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the handler runs between sleeps
        return self.signal


class MetricsLog(Hook):
    """Rank 0 appends one strict-JSON line per logged step to ``metrics.jsonl`` and calls ``on_log``.

    A record has ``step``, ``loss`` (nats/token), ``lr`` (base), ``grad_norm``, ``tokens``
    (seen since step 0), ``tokens_per_s`` (throughput since the previous record) and ``time``
    (seconds since this process started training); ``val_loss`` is added at evaluations.  Records
    are written every ``log_every`` steps, at the last step, at every evaluation and at a
    divergence; non-finite numbers are written as ``null``.
    """

    def __init__(self, path: Path, log_every: int, on_log: LogCallback | None = None) -> None:
        self.path, self.log_every, self.on_log = path, log_every, on_log
        self._window = (0.0, 0)

    def on_start(self, trainer: Trainer) -> None:
        self._window = (0.0, trainer.step)

    def on_step(self, trainer: Trainer, info: StepInfo) -> None:
        if trainer.rank != 0:
            return
        total = trainer.cfg.train.steps
        record: dict[str, Any] | None = None
        if info.step % self.log_every == 0 or info.step == total or info.diverged is not None:
            t, s = self._window
            tps = (info.step - s) * trainer.tokens_per_step / max(info.seconds - t, 1e-9)
            self._window = (info.seconds, info.step)
            record = {"step": info.step, "loss": info.loss, "lr": info.lr, "grad_norm": info.grad_norm,
                      "tokens": info.tokens, "tokens_per_s": tps, "time": info.seconds}  # fmt: skip
        if info.val_loss is not None:
            record = record or {"step": info.step}
            record["val_loss"] = info.val_loss
        if record is None:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json_text(record) + "\n")
        if self.on_log is not None:
            self.on_log({**record, "total_steps": total})


class Checkpointing(Hook):
    """Saves a DCP checkpoint every ``every`` steps, at the last step and when the run stops.

    Every rank must run it (saving is collective).  It keeps the best validation loss so far
    (also across resumes, through ``meta.json``) and the path of the last checkpoint written.
    """

    def __init__(self, run_dir: Path, every: int, best_val: float | None, last: Path | None) -> None:
        self.run_dir, self.every = run_dir, every
        self.best_val, self.last = best_val, last

    def on_eval(self, trainer: Trainer, step: int, val_loss: float) -> None:
        if math.isfinite(val_loss) and (self.best_val is None or val_loss < self.best_val):
            self.best_val = val_loss

    def at_boundary(self, trainer: Trainer, stopping: bool) -> None:
        step = trainer.step
        if step % self.every == 0 or step == trainer.cfg.train.steps or stopping:
            extra = {"best_val_loss": self.best_val, "lr_schedule": schedule_fields(trainer.cfg.train)}
            self.last = save_checkpoint(trainer, self.run_dir, extra, trainer.rank)


class GroupAudit(Hook):
    """Before the first step: every optimizer group's LR, weight decay and eps as the width rules say."""

    def on_start(self, trainer: Trainer) -> None:
        check_group_lrs(trainer, trainer.model)


def dist_env() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from the environment torchrun sets; (0, 1, 0) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step (written after the checkpoint, before a crash)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a half-written last line from a killed run
    atomic_write_text(path, "".join(s + "\n" for s in keep))


def run(
    recipe: Recipe,
    resume: bool | None = None,
    on_log: LogCallback | None = None,
    on_start: LogCallback | None = None,
    reschedule: bool = False,
    on_health: Callable[[str], None] | None = None,
) -> ScaleResult:
    """Train ``recipe`` in this process (one rank of a torchrun job, or alone); every rank calls it.

    Resumes from the newest checkpoint in the run dir that loads (a corrupt one is skipped and
    named in ``on_start``'s ``skipped``); a different LR schedule than the checkpoint's
    (``--steps``, schedule, warmup) raises :class:`ConfigError` unless ``reschedule``.  The
    recipe is checked with :func:`validate_recipe` first.  Raises :class:`ConfigError` or
    :class:`CheckpointError` (one line) for a bad recipe, a checkpoint of another model, or a run
    dir whose checkpoints are all corrupt.  In a torchrun job of several ranks, an error that follows the
    agent's SIGTERM (sent, or arriving within :data:`PEER_GRACE_S`) is raised as :class:`PeerLostError`
    (another rank died; this one's collective was cut short), anything else as it came.

    ``on_start`` (rank 0) gets the set-up once the model is wrapped and any checkpoint loaded;
    ``on_log`` (rank 0) gets every metrics record; ``on_health`` (rank 0) each µP health warning
    (:class:`mupt.health.HealthProbe`: once per layer and quantity that leaves its band).  With
    ``launch.health_strict`` such a reading stops the run after a checkpoint: status ``"unhealthy"``.

    SIGTERM or SIGINT stops the run at the next step boundary, after a checkpoint (status ``"terminated"``).
    One that arrives during set-up (model, data, checkpoint load) stops every rank before the first step:
    nothing is trained or written, on_start is not called, and the result's :attr:`ScaleResult.before_training`
    is true.  Before the handlers are installed (recipe checks) a SIGINT is a KeyboardInterrupt; while the ranks of a
    torchrun job connect, SIGINT and SIGTERM end the process at once (:func:`signals_end_process`).
    """
    rank, world, local_rank = dist_env()
    validate_recipe(recipe)
    resolve_every(recipe)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        stop_with_launcher()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    cfg = recipe.run
    parts = world * cfg.train.grad_accum
    if cfg.train.batch_size % parts:
        raise ConfigError(
            f"global batch_size {cfg.train.batch_size} is not divisible by {world} processes x grad_accum "
            f"{cfg.train.grad_accum}; use a batch size that is a multiple of {parts}"
        )
    started_pg = False
    if (world > 1 or recipe.launch.fsdp) and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "MASTER_ADDR" in os.environ:
            with signals_end_process():  # waiting for the other ranks (C++) cannot be interrupted from Python
                dist.init_process_group(backend, device_id=device if cuda else None)
        else:  # FSDP2 in one plain process: a one-rank group needs no rendezvous
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        started_pg = True
    try:
        with SignalStop() as stop:  # installed before set-up: a signal then stops before the first step
            try:
                return _run(recipe, resume, on_log, on_start, rank, world, device, stop, reschedule, on_health)
            except MuptError:
                raise
            except Exception as e:
                # A peer died: torchrun's agent SIGTERMs the survivors at once, so a SIGTERM by now (or within
                # the grace) means this error (a collective cut short) is the consequence, not the cause.
                signum = stop.wait(PEER_GRACE_S) if world > 1 and "TORCHELASTIC_RUN_ID" in os.environ else None
                if signum is not None:
                    raise PeerLostError(rank, signum) from e
                raise
    finally:
        if started_pg:
            dist.destroy_process_group()


def _writers(recipe: Recipe, sinks: tuple[str, ...]) -> Callable[[Trainer, int], list[Writer]]:
    """Rank 0's sink writers for ``mupt scale`` (run name = the run dir's name, group ``mupt-scale``)."""
    run_dir = Path(recipe.launch.run_dir)
    cfg = recipe.run
    params = {
        "lr": cfg.train.lr, "d_model": cfg.model.d_model, "d_state": cfg.model.d_state, "n_layers": cfg.model.n_layers,
        "scheme": cfg.param.scheme.value, "optimizer": cfg.train.optimizer.value, "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len, "steps": cfg.train.steps,
    }  # fmt: skip

    def factory(trainer: Trainer, step: int) -> list[Writer]:
        return open_writers(sinks, run_dir, run_dir.name, "mupt-scale", params, step, text=group_text(trainer))

    return factory


def _wrap(trainer: Trainer, recipe: Recipe, world: int, device: torch.device) -> nn.Module:
    model = trainer.model
    if recipe.launch.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            raise ConfigError("--fsdp needs torch.distributed; launch with --nproc N (N >= 1) through torchrun")
        mesh = init_device_mesh(device.type, (world,))
        for layer in model.backbone.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _run(
    recipe: Recipe,
    resume: bool | None,
    on_log: LogCallback | None,
    on_start: LogCallback | None,
    rank: int,
    world: int,
    device: torch.device,
    stop: SignalStop,
    reschedule: bool,
    on_health: Callable[[str], None] | None = None,
) -> ScaleResult:
    """Set up one rank (wrap, regroup, resume) and train it with :meth:`Trainer.run` and the scale hooks."""
    cfg, lc, tc = recipe.run, recipe.launch, recipe.run.train
    run_dir = Path(lc.run_dir)
    trainer = Trainer(cfg, device=device, rank=rank, world=world)
    wrapped = _wrap(trainer, recipe, world, device)
    if lc.fsdp:  # gradient accumulation: sync on the last micro-batch only, whatever wraps the module later
        model = trainer.model
        trainer.no_sync = lambda: fsdp_no_sync(model)
    elif world > 1:
        trainer.no_sync = wrapped.no_sync  # type: ignore[assignment]
    # DDP shares the model's parameters; fully_shard swaps them for DTensors in place: either way
    # the optimizer must hold the model's parameters as they are now, grouped as the width rules say.
    trainer.optimizer = build_optimizer(regroup(trainer, trainer.model), tc)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lr_factor(tc))
    check_group_lrs(trainer, trainer.model)
    module: nn.Module = wrapped
    precision = lc.precision.resolve(device.type == "cuda")
    if precision is Precision.BF16:
        module = Autocast(module, device.type)
    if lc.compile:
        module = torch.compile(module)  # type: ignore[assignment]
    trainer.module = module

    found = checkpoints(run_dir)
    if found and resume is False:
        raise ConfigError(
            f"{run_dir} already holds checkpoints (latest {found[0].name}); drop --no-resume to continue, or pass "
            "a new --run-dir"
        )
    best_val: float | None = None
    metrics = run_dir / "metrics.jsonl"
    latest, meta, skipped = resume_from(trainer, found)
    if latest is not None and meta is not None:
        check_schedule(meta, latest, tc, reschedule)
        best_val = meta.get("best_val_loss")
    if trainer.any_rank(stop.signal is not None):  # a signal during set-up: stop before the first step, write nothing
        return _before_training(trainer, run_dir, best_val, world, latest, stop.signal)
    if latest is not None and meta is not None:
        factor = lr_factor(tc)(trainer.step)  # what LambdaLR computes; differs only with --reschedule
        for g in trainer.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        if rank == 0:
            truncate_metrics(metrics, trainer.step)
    elif rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics.unlink(missing_ok=True)
        (run_dir / "summary.json").unlink(missing_ok=True)
    if rank == 0:
        save_yaml(run_dir / "recipe.yaml", recipe, header="resolved recipe of this run (mupt scale)")
        shutil.rmtree(run_dir / CKPT_DIR / (_step_name(trainer.step) + ".tmp"), ignore_errors=True)
    _barrier()
    if rank == 0 and on_start is not None:
        from mupt.scan import resolve_backend

        on_start({
            "params": trainer.model.num_params(), "world": world, "device": str(device), "precision": precision.value,
            "scan_backend": resolve_backend(cfg.model.scan_backend, device).value, "start_step": trainer.step,
            "resumed_from": str(latest) if latest is not None else None, "skipped": skipped,
            "mode": "fsdp2" if lc.fsdp else "ddp" if world > 1 else "single",
        })  # fmt: skip

    if latest is not None and trainer.step >= tc.steps:  # nothing to train: keep the finished run's summary.json
        return _already_finished(run_dir, trainer.step, trainer.tokens_per_step, best_val, world, latest)
    start_step = trainer.step
    ckpt = Checkpointing(run_dir, lc.ckpt_every, best_val, latest)
    hooks: list[Hook] = [GroupAudit(), MetricsLog(metrics, lc.log_every, on_log), stop]
    sinks = tuple(s for s in parse_sinks(lc.log) if s != "jsonl")  # metrics.jsonl is MetricsLog's
    log = SinkLog(_writers(recipe, sinks), lc.log_every) if sinks else None
    if log is not None:
        hooks.insert(2, log)
    every = resolve_every(recipe)
    health = None
    if every:
        on_record = log.add_health if log is not None else None
        health = HealthProbe(recipe, every, run_dir, lc.health_strict, on_record, on_health)
        hooks.append(health)
    hooks.append(ckpt)  # last: a stop asked by any hook above is checkpointed at the same boundary
    out = trainer.run(hooks=hooks)
    status = {"stopped": "terminated"}.get(out.status, out.status)
    health_stop = health.stop_reason if health is not None and out.status == "stopped" else None
    if out.status == "stopped" and trainer.any_rank(health_stop is not None):
        status = "unhealthy"
    res = ScaleResult(
        status, out.reason, start_step, out.steps, out.steps * trainer.tokens_per_step, out.tokens, out.seconds,
        out.tokens / out.seconds if out.seconds > 0 else 0.0, ckpt.best_val, out.final_val_loss,
        out.train_loss[-1] if out.train_loss else None, world, str(run_dir),
        str(ckpt.last) if ckpt.last is not None else None,
        stop.signal if out.status == "stopped" else None, health_stop,
        [(start_step + i + 1, loss) for i, loss in enumerate(out.train_loss)],
    )  # fmt: skip
    if rank == 0:
        atomic_write_text(run_dir / "summary.json", json_text(res.summary(), indent=1))
    return res
