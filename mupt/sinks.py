"""Where ``mupt scale`` sends its metrics besides ``metrics.jsonl``: TensorBoard event files.

``metrics.jsonl`` is always written (a resume truncates and continues it); ``--log
jsonl,tensorboard`` adds :class:`TensorBoardLog`, a :class:`mupt.train.Hook` that writes event
files under ``<run_dir>/tensorboard/`` with ``torch.utils.tensorboard`` (no server needed; read
them with ``tensorboard --logdir RUN_DIR/tensorboard``).  Nothing here prints.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mupt.errors import ConfigError
from mupt.train import Hook, StepInfo, Trainer

#: Sinks ``--log`` accepts.  ``jsonl`` (metrics.jsonl) is always on.
SINKS = ("jsonl", "tensorboard")


def parse_sinks(text: str) -> tuple[str, ...]:
    """``"jsonl,tensorboard"`` -> ``("jsonl", "tensorboard")``; ConfigError names an unknown sink."""
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [s for s in names if s not in SINKS]
    if bad or not names:
        raise ConfigError(f"--log {text!r}: choose from {','.join(SINKS)}, e.g. --log jsonl,tensorboard")
    return names if "jsonl" in names else ("jsonl", *names)


def group_label(i: int, group: dict[str, Any]) -> str:
    """TensorBoard tag suffix of optimizer group ``i``: its index and LR multiplier."""
    return f"group{i}_x{float(group['lr_mult']):g}"


class TensorBoardLog(Hook):
    """Rank 0 writes scalars to ``<run_dir>/tensorboard`` every ``log_every`` steps and at evaluations.

    Tags: ``train/loss`` (nats/token), ``train/grad_norm`` (L2, before clipping),
    ``train/tokens_per_s`` (since the previous logged step), ``lr/base`` and ``lr/<group>``
    (each optimizer group's LR = base x lr_mult, after warmup/schedule), ``val/loss``.  The x-axis
    is the optimizer step.  On a resume the writer purges events past the resumed step, so a
    rerun after a crash shows one curve.  Raises ConfigError when the ``tensorboard`` package is
    missing.
    """

    def __init__(self, run_dir: Path, log_every: int) -> None:
        self.dir, self.log_every = run_dir / "tensorboard", log_every
        self.writer: Any = None
        self._window = (0.0, 0)
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            raise ConfigError("--log tensorboard needs the tensorboard package: pip install tensorboard") from None

    def on_start(self, trainer: Trainer) -> None:
        self._window = (0.0, trainer.step)
        if trainer.rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        if trainer.step == 0:  # a fresh run: no events of an earlier run in this directory
            shutil.rmtree(self.dir, ignore_errors=True)
        self.writer = SummaryWriter(str(self.dir), purge_step=trainer.step + 1 if trainer.step else None)
        manifest = trainer.par.manifest.params
        rows = [
            f"{group_label(i, g)}: " + ", ".join(sorted({manifest[n].role for n in g["names"]}))
            for i, g in enumerate(trainer.optimizer.param_groups)
        ]
        self.writer.add_text("lr_groups", "  \n".join(rows), trainer.step)

    def on_step(self, trainer: Trainer, info: StepInfo) -> None:
        w = self.writer
        if w is None:
            return
        step = info.step
        if step % self.log_every == 0 or step == trainer.cfg.train.steps or info.diverged is not None:
            t, s = self._window
            self._window = (info.seconds, step)
            w.add_scalar("train/loss", info.loss, step)
            w.add_scalar("train/grad_norm", info.grad_norm, step)
            w.add_scalar("train/tokens_per_s", (step - s) * trainer.tokens_per_step / max(info.seconds - t, 1e-9), step)
            w.add_scalar("lr/base", info.lr, step)
            for i, g in enumerate(trainer.optimizer.param_groups):
                w.add_scalar(f"lr/{group_label(i, g)}", info.lr * float(g["lr_mult"]), step)
        if info.val_loss is not None:
            w.add_scalar("val/loss", info.val_loss, step)

    def add_health(self, record: dict[str, Any]) -> None:
        """A µP health probe (:class:`mupt.health.HealthProbe` record): ``health/rms/<key>`` and
        ``health/log2_ratio/<key>`` (vs the proxy at the same step) at the record's step."""
        w = self.writer
        if w is None:
            return
        for kind in ("rms", "log2_ratio"):
            for key, value in record[kind].items():
                if value is not None:
                    w.add_scalar(f"health/{kind}/{key}", value, record["step"])

    def on_end(self, trainer: Trainer, result: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
