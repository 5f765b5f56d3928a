"""Options shared by several commands, the config they resolve to, and progress reporting.

Defaults come from one place: :mod:`mupt.config` (the default proxy: ``PROXY_*``, ``DEFAULT_OPTIMIZER``),
:mod:`mupt.paths` (output names) and :mod:`mupt.threads` (threads and workers); the options below
show them in ``--help``.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, get_args

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mupt.config import (
    DEFAULT_OPTIMIZER,
    PROXY_BATCH_SIZE,
    PROXY_D_MODEL,
    PROXY_EVAL_EVERY,
    PROXY_SEQ_LEN,
    PROXY_STEPS,
    Arch,
    Discretization,
    OptimizerName,
    RunConfig,
    Scheme,
    check_lr_scale,
    load_run_config,
    with_overrides,
)
from mupt.errors import ConfigError
from mupt.threads import THREADS_HELP

#: Shown after a proxy default in --help: flags override --config, which overrides the default proxy.
_OR_CONFIG = ", or --config's"

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Run config YAML: a run's config.yaml, tune's best.yaml (the tuned proxy) or a transfer recipe "
        "(its target run); flags override it. Default: the built-in proxy (recipes/proxy.yaml).",
    ),
]
WidthOpt = Annotated[
    int | None,
    typer.Option(
        "--width",
        "-w",
        help="d_model of the model (N_u = expand * d_model).",
        show_default=f"{PROXY_D_MODEL}{_OR_CONFIG}",
    ),
]
LayersOpt = Annotated[
    int | None, typer.Option("--layers", help="Number of Mamba blocks.", show_default="2" + _OR_CONFIG)
]
StateOpt = Annotated[int | None, typer.Option("--d-state", help="SSM state width N_x.", show_default="16" + _OR_CONFIG)]
ArchOpt = Annotated[
    Arch | None,
    typer.Option(
        "--arch",
        help="Mixer: mamba1 (selective scan) or mamba2 (SSD, heads of --headdim channels).",
        show_default="mamba1" + _OR_CONFIG,
    ),
]
HeaddimOpt = Annotated[
    int | None,
    typer.Option(
        "--headdim", help="mamba2: channels per head (heads = expand*d_model/headdim).", show_default="64" + _OR_CONFIG
    ),
]
NgroupsOpt = Annotated[
    int | None,
    typer.Option("--ngroups", help="mamba2: B/C groups shared by the heads.", show_default="1" + _OR_CONFIG),
]
#: --help of --discretization (also check coord's own option, whose default is not --config's)
DISC_HELP = "mamba1 only: B discretization, zoh or euler (mamba_ssm; the one mupt export needs)."
DiscOpt = Annotated[
    Discretization | None,
    typer.Option(
        "--discretization",
        help=DISC_HELP,
        show_default="zoh" + _OR_CONFIG,
    ),
]
StepsOpt = Annotated[
    int | None, typer.Option("--steps", help="Optimizer steps.", show_default=f"{PROXY_STEPS}{_OR_CONFIG}")
]
LrOpt = Annotated[
    float | None,
    typer.Option("--lr", help="Global (base) learning rate; finite and > 0.", show_default="3e-3" + _OR_CONFIG),
]
LrScaleOpt = Annotated[
    float | None,
    typer.Option(
        "--lr-scale",
        help="Multiply the learning rate (from --lr, --config or the default) by this, e.g. 0.5 or 2 to try "
        "multiples of a transferred LR.",
        show_default="1",
    ),
]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size", help="Sequences per step (global batch).", show_default=f"{PROXY_BATCH_SIZE}{_OR_CONFIG}"
    ),
]
SeqOpt = Annotated[
    int | None, typer.Option("--seq-len", help="Tokens per sequence.", show_default=f"{PROXY_SEQ_LEN}{_OR_CONFIG}")
]
EvalEveryOpt = Annotated[
    int | None,
    typer.Option(
        "--eval-every", help="Steps between validation losses.", show_default=f"{PROXY_EVAL_EVERY}{_OR_CONFIG}"
    ),
]
OptimOpt = Annotated[
    OptimizerName | None,
    typer.Option("--optimizer", help="adamw, adam or sgd.", show_default=f"{DEFAULT_OPTIMIZER.value}{_OR_CONFIG}"),
]
SchemeOpt = Annotated[
    Scheme | None,
    typer.Option("--scheme", help="Width rules: sp, mup (heuristic) or mup-ssm.", show_default="mup-ssm" + _OR_CONFIG),
]
BaseOpt = Annotated[
    int | None,
    typer.Option(
        "--base-width", help="Base d_model the width rules are relative to.", show_default="the model's own d_model"
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="builtin (offline stdlib docs), recall (synthetic), a dataset dir (mupt prepare), a .bin/.npy token "
        "file (with --vocab-size), or a .txt file/dir.",
        show_default="builtin" + _OR_CONFIG,
    ),
]
VocabOpt = Annotated[
    int | None, typer.Option("--vocab-size", help="Vocabulary of a --data .bin/.npy token file (ids < it).")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for init and data order.", show_default="0")]
BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", help="Scan backend: auto, torch, reference, triton.", show_default="auto"),
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help=THREADS_HELP, show_default="$OMP_NUM_THREADS or usable cores // workers")
]
RunDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--run-dir",
        "--out",
        help="The directory this run writes (--out is the same flag). See README, 'Where results go'.",
    ),
]


def without_config(opt: Any) -> Any:
    """The typer option of the shared option type ``opt`` (e.g. :data:`ArchOpt`) for a command that has no
    ``--config``: the same flag and help, its default shown without "or --config's".

    Use as ``Annotated[Arch | None, without_config(ArchOpt)]`` (mypy needs the type spelled out)."""
    info = copy.copy(get_args(opt)[1])
    info.show_default = str(info.show_default).replace(_OR_CONFIG, "")
    return info


def check_backend(backend: str | None) -> str:
    """``--backend`` validated up front (before any directory or work); None -> ``auto``."""
    from mupt.scan import Backend

    value = backend or "auto"
    if value not in {b.value for b in Backend}:
        choices = ", ".join(b.value for b in Backend)
        raise ConfigError(f"--backend {value}: unknown scan backend; choose one of: {choices}")
    return value


def check_finite(value: float, flag: str, positive: bool = False) -> float:
    """Refuse NaN/inf (and, with ``positive``, values <= 0) for a float flag: one line, exit 2."""
    if not math.isfinite(value) or (positive and value <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise ConfigError(f"{flag} {value:g}: must be {need}")
    return value


def resolve_config(config: Path | None, **flags: Any) -> RunConfig:
    """Load ``config`` (any file :func:`mupt.config.load_run_config` reads; default: the built-in proxy)
    and apply the flags that were given.

    Raises ConfigError naming the flag (not the dotted key) for a bad value.
    """
    from mupt.data import fit_vocab

    cfg = load_run_config(config) if config is not None else RunConfig()
    explicit_vocab = config is not None and "vocab_size" in cfg.model.model_fields_set
    mapping = {
        "arch": "model.arch",
        "headdim": "model.headdim",
        "ngroups": "model.ngroups",
        "width": "model.d_model",
        "layers": "model.n_layers",
        "d_state": "model.d_state",
        "discretization": "model.discretization",
        "backend": "model.scan_backend",
        "steps": "train.steps",
        "lr": "train.lr",
        "batch_size": "train.batch_size",
        "seq_len": "train.seq_len",
        "optimizer": "train.optimizer",
        "seed": "train.seed",
        "scheme": "param.scheme",
        "base_width": "param.base_d_model",
        "data": "data.source",
        "vocab_size": "data.vocab_size",
    }
    overrides = {mapping[k]: v for k, v in flags.items() if k in mapping}
    unknown = set(flags) - set(mapping)
    if unknown:
        raise KeyError(f"resolve_config: unknown flags {sorted(unknown)}")
    flag_names = {v: "--" + k.replace("_", "-") for k, v in mapping.items()}
    try:
        cfg = with_overrides(cfg, overrides, where="flags")
    except Exception as e:  # re-raise naming the flag rather than the dotted key
        msg = str(e)
        for dotted, flag in flag_names.items():
            msg = msg.replace(dotted, flag)
        raise type(e)(msg) from None
    return fit_vocab(cfg, explicit_vocab, where=str(config))


def scale_lr(cfg: RunConfig, lr_scale: float | None) -> RunConfig:
    """``cfg`` with its global LR multiplied by ``--lr-scale`` (None: unchanged); refuses a bad factor."""
    check_lr_scale(lr_scale)
    if lr_scale is None:
        return cfg
    return with_overrides(cfg, {"train.lr": cfg.train.lr * lr_scale}, where="--lr-scale")


class LineProgress:
    """The subset of :class:`rich.progress.Progress` the commands use, printing plain lines.

    Used when stderr is not a terminal (nohup, CI logs, ``2> file``), where a live bar prints nothing
    until the end: one line per unit of work that finishes, at most one per ``min_interval`` seconds
    for fine-grained tasks (training steps), and always the last one. While a unit of work runs longer
    than ``heartbeat`` seconds (a tune trial, a coordinate-check run at a wide width), a background
    thread repeats the last line marked "(still working)" every ``heartbeat`` seconds, so a log is never
    silent for longer than that (0: no heartbeat).
    """

    def __init__(self, console: Console, min_interval: float, heartbeat: float = 30.0) -> None:
        self.console = console
        self.min_interval = min_interval
        self.heartbeat = heartbeat
        self.tasks: dict[TaskID, dict[str, Any]] = {}
        self.start = time.monotonic()
        self.last_print = self.start
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LineProgress:
        if self.heartbeat > 0:
            self._thread = threading.Thread(target=self._beat, name="mupt-progress-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> TaskID:
        with self._lock:
            task_id = TaskID(len(self.tasks))
            self.tasks[task_id] = {
                "description": description, "total": total, "completed": completed, "fields": dict(fields),
                "last_line": float("-inf"), "last_done": completed,
            }  # fmt: skip
        return task_id

    def update(
        self,
        task_id: TaskID,
        *,
        completed: float | None = None,
        advance: float | None = None,
        total: float | None = None,
        **fields: Any,
    ) -> None:
        with self._lock:
            t = self.tasks[task_id]
            if total is not None:
                t["total"] = total
            if completed is not None:
                t["completed"] = completed
            if advance is not None:
                t["completed"] += advance
            t["fields"].update(fields)
            now = time.monotonic()
            moved = t["completed"] != t["last_done"]
            if moved and (self._finished(t) or now - t["last_line"] >= self.min_interval):
                t["last_line"], t["last_done"] = now, t["completed"]
                self._print(t, now, "")

    @staticmethod
    def _finished(t: dict[str, Any]) -> bool:
        return t["total"] is not None and t["completed"] >= t["total"]

    def _print(self, t: dict[str, Any], now: float, suffix: str) -> None:
        total = "?" if t["total"] is None else f"{t['total']:g}"
        parts = [f"{t['description']} {t['completed']:g}/{total}", str(t["fields"].get("info", "")).strip()]
        parts.append(f"[{now - self.start:.0f}s]{suffix}")
        self.console.print(" ".join(p for p in parts if p), highlight=False, markup=False, soft_wrap=True)
        self.last_print = now

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.heartbeat / 4)):
            with self._lock:
                now = time.monotonic()
                if now - self.last_print < self.heartbeat:
                    continue
                for t in self.tasks.values():
                    if not self._finished(t):
                        self._print(t, now, " (still working)")


def progress(transient: bool = False, min_interval: float = 0.0, heartbeat: float = 30.0) -> Progress | LineProgress:
    """A live Rich bar on a terminal; plain progress lines (see :class:`LineProgress`) otherwise.

    ``min_interval``: seconds between lines when not on a terminal (0: a line per update; use ~10 for
    per-step updates so a log gets a line at least that often while work progresses). ``heartbeat``:
    when not on a terminal, the longest silence in seconds while a unit of work runs.
    """
    from mupt.cli import err

    if not err.is_terminal:
        return LineProgress(err, min_interval, heartbeat)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
    )


@contextmanager
def point_progress(
    name: str, total: int, describe: Callable[[dict[str, Any]], str], digits: int = 4
) -> Iterator[Callable[[dict[str, Any], bool], None]]:
    """A progress bar over a sweep's runs (check transfer, check target); yields the ``on_point(record,
    cached)`` callback the sweep calls after each run.  ``describe(record)`` names the run (scheme, width,
    LR...); its final validation loss (nats/token, ``digits`` decimals) or "diverged" follows, and
    " (cached)" when it came from the cache."""
    with progress() as bar:
        task = bar.add_task(name, total=total, info="")

        def on_point(rec: dict[str, Any], cached: bool) -> None:
            loss = rec["final_val_loss"]
            info = f"{describe(rec)} " + ("diverged" if loss is None else f"{loss:.{digits}f}")
            bar.update(task, advance=1, info=info + (" (cached)" if cached else ""))

        yield on_point
