"""``mupt train``: one training run, with a progress bar and a final table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mupt.cli import app, fail, out
from mupt.cli.common import (
    BackendOpt,
    BaseOpt,
    BatchOpt,
    ConfigOpt,
    DataOpt,
    DiscOpt,
    LayersOpt,
    LrOpt,
    OptimOpt,
    SchemeOpt,
    SeedOpt,
    SeqOpt,
    StateOpt,
    StepsOpt,
    VocabOpt,
    WidthOpt,
    progress,
    resolve_config,
)
from mupt.config import atomic_write_text, json_text, save_yaml, with_overrides
from mupt.export import WEIGHTS, save_weights
from mupt.report import key_values
from mupt.train import Trainer


@app.command()
def train(
    config: ConfigOpt = None,
    width: WidthOpt = None,
    layers: LayersOpt = None,
    d_state: StateOpt = None,
    discretization: DiscOpt = None,
    steps: StepsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    seq_len: SeqOpt = None,
    optimizer: OptimOpt = None,
    scheme: SchemeOpt = None,
    base_width: BaseOpt = None,
    data: DataOpt = None,
    vocab_size: VocabOpt = None,
    seed: SeedOpt = None,
    backend: BackendOpt = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Run directory: writes config.yaml, metrics.json and model.safetensors there."),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Start from a transformers or mamba_ssm checkpoint directory (continued pre-training): weights "
            "as stored, per-group LRs from the width rules; the model shape must match it.",
        ),
    ] = None,
) -> None:
    """Train one Mamba LM on the builtin corpus (or --data) and report train/val loss.

    Example: [bold]mupt train --width 64 --steps 300 --lr 3e-3[/]
    """
    cfg = resolve_config(
        config, width=width, layers=layers, d_state=d_state, discretization=discretization, steps=steps, lr=lr,
        batch_size=batch_size, seq_len=seq_len, optimizer=optimizer, scheme=scheme, base_width=base_width,
        data=data, vocab_size=vocab_size, seed=seed, backend=backend,
    )  # fmt: skip
    if init_from is not None:
        cfg = with_overrides(cfg, {"train.init_from": str(init_from)}, where="--init-from")
    trainer = Trainer(cfg)
    if out_dir is not None:
        save_yaml(out_dir / "config.yaml", cfg)
    out.print(
        f"[bold]mupt train[/] d_model={cfg.model.d_model} layers={cfg.model.n_layers} d_state={cfg.model.d_state} "
        f"params={trainer.model.num_params():,} scheme={cfg.param.scheme.value} lr={cfg.train.lr:g} "
        f"data={trainer.data.name}" + (f" init-from={cfg.train.init_from}" if cfg.train.init_from else ""),
        highlight=False,
    )
    with progress(transient=True) as bar:
        task = bar.add_task("train", total=cfg.train.steps, info="")
        last_val: list[float] = []

        def on_step(step: int, loss: float) -> None:
            val = f" val {last_val[-1]:.3f}" if last_val else ""
            bar.update(task, completed=step, info=f"loss {loss:.3f}{val}")

        result = trainer.run(on_step=on_step, on_eval=lambda s, v: last_val.append(v))
    bpb = result.bits_per_byte(result.final_val_loss)
    rows = [
        ("status", result.status),
        ("steps", result.steps),
        ("tokens", result.tokens),
        ("first train loss (nats)", result.train_loss[0] if result.train_loss else None),
        ("last train loss (nats)", result.train_loss[-1] if result.train_loss else None),
        ("final val loss (nats)", result.final_val_loss),
        ("final val bits/byte", bpb),
        ("tokens/s", result.tokens / result.seconds if result.seconds else None),
        ("wall time (s)", result.seconds),
    ]
    out.print(key_values("Training summary", rows))
    if out_dir is not None:
        metrics = {
            "status": result.status, "reason": result.reason, "steps": result.steps, "tokens": result.tokens,
            "seconds": result.seconds, "train_loss": result.train_loss, "val_loss": result.val_loss,
            "final_val_bits_per_byte": bpb,
        }  # fmt: skip
        atomic_write_text(out_dir / "metrics.json", json_text(metrics, indent=1))
        save_weights(out_dir / WEIGHTS, trainer.model)
    if result.status == "diverged":
        raise fail(f"run diverged: {result.reason}; lower --lr (now {cfg.train.lr:g})")
