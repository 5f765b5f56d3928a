"""Where training metrics go besides ``metrics.jsonl``: JSON lines, TensorBoard, W&B (offline), MLflow (local).

``--log`` names the sinks (:data:`SINKS`).  Each sink is a :class:`Writer` of ``{tag: value}``
scalars at an optimizer step; :class:`SinkLog`, a :class:`mupt.train.Hook`, computes the scalars
of a run and hands them to every writer of rank 0:

- ``train/loss`` (nats/token), ``train/grad_norm`` (L2, before clipping), ``train/tokens_per_s``
  (since the previous logged step), ``lr/base`` and ``lr/<group>`` (each optimizer group's LR =
  base x lr_mult, after warmup/schedule) every ``log_every`` steps, at the last step and at a
  divergence; ``val/loss`` at evaluations; ``health/...`` from :class:`mupt.health.HealthProbe`.

Backends, all local, none needs a server or the network:

- ``jsonl``: one JSON object per line (``step`` + the scalars); ``mupt scale`` always writes its own
  ``metrics.jsonl`` (:class:`mupt.launch.MetricsLog`), ``mupt tune --log jsonl`` one file per trial;
- ``tensorboard``: event files through ``torch.utils.tensorboard`` (``pip install "mupt[tensorboard]"``);
- ``wandb``: Weights & Biases in offline mode (``mode="offline"``: nothing is uploaded; ``wandb sync
  DIR`` uploads later), ``pip install "mupt[wandb]"``;
- ``mlflow``: MLflow's file store at a ``file://`` URI (``pip install "mupt[mlflow]"``; MLflow >= 3
  keeps that backend in maintenance mode and asks for ``MLFLOW_ALLOW_FILE_STORE=true``, which
  :class:`MlflowWriter` sets for its own process).

A missing package raises :class:`ConfigError` naming the pip command when the sink is asked for,
before anything trains.  Nothing here prints.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mupt.config import json_text
from mupt.errors import ConfigError
from mupt.train import Hook, StepInfo, Trainer

#: Sinks ``--log`` accepts.
SINKS = ("jsonl", "tensorboard", "wandb", "mlflow")
#: The pip package each optional sink needs (import name, extra).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def parse_sinks(text: str, always: tuple[str, ...] = ("jsonl",)) -> tuple[str, ...]:
    """``"jsonl,tensorboard"`` -> ``("jsonl", "tensorboard")``, ``always`` first; "" or "none" -> ``always``.

    Raises :class:`ConfigError` naming an unknown sink.
    """
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip() and s.strip() != "none"))
    bad = [s for s in names if s not in SINKS]
    if bad or (not names and text.strip() not in ("", "none")):
        raise ConfigError(f"--log {text!r}: choose from {','.join(SINKS)}, e.g. --log jsonl,tensorboard")
    return tuple(dict.fromkeys((*always, *names)))


def check_installed(sinks: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` (one line, the pip command) when a sink's package is not installed."""
    import importlib.util

    for sink in sinks:
        if sink in PACKAGES:
            module, extra = PACKAGES[sink]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f'--log {sink} needs the {module} package: pip install "mupt[{extra}]"')


def group_label(i: int, group: dict[str, Any]) -> str:
    """Tag suffix of optimizer group ``i``: its index and LR multiplier."""
    return f"group{i}_x{float(group['lr_mult']):g}"


class Writer:
    """One backend: scalars at a step.  Subclasses open their files in ``__init__``."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release the backend (idempotent)."""


class JsonlWriter(Writer):
    """Appends ``{"step": step, **values}`` per call (strict JSON: non-finite numbers as null)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json_text({"step": step, **values}) + "\n")


class TensorBoardWriter(Writer):
    """Event files in ``log_dir``; ``resume_step`` > 0 purges events past it (one curve after a crash),
    0 starts the directory afresh.  ``text`` (optional) is written once as the ``lr_groups`` text."""

    def __init__(self, log_dir: Path, resume_step: int = 0, text: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if resume_step == 0:
            shutil.rmtree(log_dir, ignore_errors=True)
        self.writer: Any = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step else None)
        if text:
            self.writer.add_text("lr_groups", text, resume_step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbWriter(Writer):
    """A Weights & Biases run in offline mode under ``directory/wandb/`` (never uploads).

    ``run_id`` is stable for one run directory or trial, so a resumed run keeps its id; ``group``
    gathers a study's trials; ``config`` is stored as the run's config.
    """

    def __init__(self, directory: Path, name: str, group: str, config: Mapping[str, Any], run_id: str) -> None:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_meta=True)
        self.run: Any = wandb.init(
            mode="offline", dir=str(directory), project="mupt", group=group, name=name, id=run_id,
            config=dict(config), settings=settings, reinit="create_new",
        )  # fmt: skip

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowWriter(Writer):
    """An MLflow run in the file store ``directory`` (``file://`` URI, no server), experiment ``experiment``.

    A run is found again by its ``mupt.run`` tag (``key``), so a resumed run appends to the same
    MLflow run; ``params`` are logged once when the run is created.
    """

    def __init__(self, directory: Path, experiment: str, name: str, key: str, params: Mapping[str, Any]) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3: the file store is opt-in
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        directory.mkdir(parents=True, exist_ok=True)
        self.client: Any = MlflowClient(tracking_uri=directory.resolve().as_uri())
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                exp_id = self.client.create_experiment(experiment)
            except MlflowException:  # another worker created it meanwhile
                again = self.client.get_experiment_by_name(experiment)
                if again is None:
                    raise
                exp_id = again.experiment_id
        else:
            exp_id = exp.experiment_id
        found = self.client.search_runs([exp_id], f"tags.`mupt.run` = '{key}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(exp_id, run_name=name, tags={"mupt.run": key}).info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.open = True

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        if self.open:
            self.client.set_terminated(self.run_id)
            self.open = False


def run_key(*parts: str) -> str:
    """A stable short id for a run directory or trial (W&B run id, MLflow tag)."""
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:12]


def open_writers(
    sinks: tuple[str, ...],
    directory: Path,
    name: str,
    group: str,
    params: Mapping[str, Any],
    resume_step: int = 0,
    jsonl: Path | None = None,
    tensorboard: Path | None = None,
    text: str | None = None,
) -> list[Writer]:
    """The writers of ``sinks`` for one run named ``name``: JSON lines at ``jsonl`` (skipped when None:
    ``mupt scale`` keeps its own metrics.jsonl), TensorBoard in ``tensorboard`` (default
    ``directory/tensorboard``), W&B offline in ``directory/wandb`` (group ``group``), MLflow in the file
    store ``directory/mlruns`` (experiment ``group``).  ``params`` go to W&B's config / MLflow's params."""
    key = run_key(str(directory.resolve()), name)
    out: list[Writer] = []
    for sink in sinks:
        if sink == "jsonl" and jsonl is not None:
            out.append(JsonlWriter(jsonl))
        elif sink == "tensorboard":
            out.append(TensorBoardWriter(tensorboard or directory / "tensorboard", resume_step, text))
        elif sink == "wandb":
            out.append(WandbWriter(directory, name, group, params, key))
        elif sink == "mlflow":
            out.append(MlflowWriter(directory / "mlruns", group, name, key, params))
    return out


class SinkLog(Hook):
    """Rank 0 sends a run's scalars (module docstring) to writers made by ``factory(trainer, resume_step)``.

    The writers are opened in :meth:`on_start` (after any resume) and closed in :meth:`on_end` or
    :meth:`close` (call it in a ``finally`` when a hook may raise, e.g. a pruned trial).
    """

    def __init__(self, factory: Callable[[Trainer, int], list[Writer]], log_every: int) -> None:
        self.factory, self.log_every = factory, log_every
        self.writers: list[Writer] = []
        self._window = (0.0, 0)

    def on_start(self, trainer: Trainer) -> None:
        self._window = (0.0, trainer.step)
        if trainer.rank == 0:
            self.writers = self.factory(trainer, trainer.step)

    def emit(self, values: Mapping[str, float], step: int) -> None:
        for w in self.writers:
            w.scalars(values, step)

    def on_step(self, trainer: Trainer, info: StepInfo) -> None:
        if not self.writers:
            return
        step = info.step
        values: dict[str, float] = {}
        if step % self.log_every == 0 or step == trainer.cfg.train.steps or info.diverged is not None:
            t, s = self._window
            self._window = (info.seconds, step)
            values = {
                "train/loss": info.loss,
                "train/grad_norm": info.grad_norm,
                "train/tokens_per_s": (step - s) * trainer.tokens_per_step / max(info.seconds - t, 1e-9),
                "lr/base": info.lr,
            }
            for i, g in enumerate(trainer.optimizer.param_groups):
                values[f"lr/{group_label(i, g)}"] = info.lr * float(g["lr_mult"])
        if info.val_loss is not None:
            values["val/loss"] = info.val_loss
        if values:
            self.emit(values, step)

    def add_health(self, record: dict[str, Any]) -> None:
        """A µP health probe (:class:`mupt.health.HealthProbe` record): ``health/rms/<key>`` and
        ``health/log2_ratio/<key>`` (vs the proxy at the same step) at the record's step."""
        values = {
            f"health/{kind}/{key}": value
            for kind in ("rms", "log2_ratio")
            for key, value in record[kind].items()
            if value is not None
        }
        if values:
            self.emit(values, record["step"])

    def on_end(self, trainer: Trainer, result: Any) -> None:
        self.close()

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []


def group_text(trainer: Trainer) -> str:
    """One line per optimizer group: its tag label and the roles it holds (TensorBoard's ``lr_groups``)."""
    manifest = trainer.par.manifest.params
    return "  \n".join(
        f"{group_label(i, g)}: " + ", ".join(sorted({manifest[n].role for n in g["names"]}))
        for i, g in enumerate(trainer.optimizer.param_groups)
    )
