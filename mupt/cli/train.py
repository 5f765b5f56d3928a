"""``mupt train``: one training run, with a progress bar and a final table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mupt.cli import app, err, fail, out
from mupt.cli.common import (
    ArchOpt,
    BackendOpt,
    BaseOpt,
    BatchOpt,
    ConfigOpt,
    DataOpt,
    DiscOpt,
    EvalEveryOpt,
    HeaddimOpt,
    LayersOpt,
    LrOpt,
    LrScaleOpt,
    NgroupsOpt,
    OptimOpt,
    RunDirOpt,
    SchemeOpt,
    SeedOpt,
    SeqOpt,
    StateOpt,
    StepsOpt,
    ThreadsOpt,
    VocabOpt,
    WidthOpt,
    progress,
    resolve_config,
    scale_lr,
)
from mupt.config import atomic_write_text, check_lr_scale, json_text, save_yaml, with_overrides
from mupt.errors import StorageError
from mupt.export import WEIGHTS, save_weights
from mupt.paths import check_output_dir, default_run_dir
from mupt.report import key_values
from mupt.threads import resolve_threads, set_threads
from mupt.train import Trainer, TrainResult, previous_run


@app.command()
def train(
    config: ConfigOpt = None,
    arch: ArchOpt = None,
    width: WidthOpt = None,
    layers: LayersOpt = None,
    d_state: StateOpt = None,
    discretization: DiscOpt = None,
    steps: StepsOpt = None,
    lr: LrOpt = None,
    lr_scale: LrScaleOpt = None,
    batch_size: BatchOpt = None,
    seq_len: SeqOpt = None,
    eval_every: EvalEveryOpt = None,
    optimizer: OptimOpt = None,
    scheme: SchemeOpt = None,
    base_width: BaseOpt = None,
    data: DataOpt = None,
    vocab_size: VocabOpt = None,
    seed: SeedOpt = None,
    backend: BackendOpt = None,
    headdim: HeaddimOpt = None,
    ngroups: NgroupsOpt = None,
    threads: ThreadsOpt = None,
    run_dir: RunDirOpt = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Start from a transformers or mamba_ssm checkpoint directory (continued pre-training): weights "
            "as stored, per-group LRs from the width rules; the model shape must match it.",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the run already in --run-dir (finished or interrupted). Without it such a run is kept: "
            "the same config, finished, is reported as done; anything else is refused.",
        ),
    ] = False,
) -> None:
    """Train one Mamba LM on the builtin corpus (or --data) and report train/val loss.

    Writes config.yaml and metrics.json to --run-dir (default runs/train-w<d_model>-<UTC time>).
    -c takes any config mupt writes: a run's config.yaml, tune's best.yaml, a transfer recipe.

    Examples: [bold]mupt train --width 64 --steps 300 --lr 3e-3[/];
    [bold]mupt train -c recipes/mup-ssm-4096.yaml --steps 20 --lr-scale 0.5[/]
    """
    check_lr_scale(lr_scale)
    cfg = resolve_config(
        config, arch=arch, headdim=headdim, ngroups=ngroups, width=width, layers=layers, d_state=d_state,
        discretization=discretization,
        steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, optimizer=optimizer, scheme=scheme,
        base_width=base_width, data=data, vocab_size=vocab_size, seed=seed, backend=backend,
    )  # fmt: skip
    cfg = scale_lr(cfg, lr_scale)
    if init_from is not None:
        cfg = with_overrides(cfg, {"train.init_from": str(init_from)}, where="--init-from")
    if eval_every is not None:
        cfg = with_overrides(cfg, {"train.eval_every": eval_every}, where="--eval-every")
    n_threads = resolve_threads(threads)
    dest = check_output_dir(
        run_dir if run_dir is not None else default_run_dir(f"train-w{cfg.model.d_model}"), "--run-dir"
    )
    prev = None if overwrite else previous_run(dest, cfg)
    if prev is not None and prev.finished and prev.same_config:
        out.print(
            f"{dest} already holds this run, finished ({prev.status}, {prev.steps} steps): nothing to do; its "
            f"results are in {dest / 'metrics.json'} (--overwrite trains it again)",
            highlight=False,
        )
        return
    if prev is not None:
        raise StorageError(
            f"--run-dir {dest} holds {prev.describe(cfg.train.steps)}: pass another --run-dir, or --overwrite "
            "to replace it"
        )
    set_threads(n_threads)
    trainer = Trainer(cfg)  # loads the data and builds the model: bad data fails here, before any file
    save_yaml(dest / "config.yaml", cfg)
    out.print(
        f"[bold]mupt train[/] arch={cfg.model.arch.value} d_model={cfg.model.d_model} layers={cfg.model.n_layers} "
        f"d_state={cfg.model.d_state} "
        f"params={trainer.model.num_params():,} scheme={cfg.param.scheme.value} lr={cfg.train.lr:g} "
        f"steps={cfg.train.steps} batch={cfg.train.batch_size}x{cfg.train.seq_len} threads={n_threads} "
        f"data={trainer.data.name} run_dir={dest}",
        highlight=False,
    )
    losses: list[float] = []
    vals: list[tuple[int, float]] = []
    try:
        with progress(transient=True, min_interval=10.0) as bar:
            task = bar.add_task("train", total=cfg.train.steps, info="")

            def on_step(step: int, loss: float) -> None:
                losses.append(loss)
                val = f" val {vals[-1][1]:.3f}" if vals else ""
                bar.update(task, completed=step, info=f"loss {loss:.3f}{val}")

            result = trainer.run(on_step=on_step, on_eval=lambda s, v: vals.append((s, v)))
    except KeyboardInterrupt:
        partial = {"status": "interrupted", "steps": len(losses), "train_loss": losses, "val_loss": vals}
        atomic_write_text(dest / "metrics.json", json_text(partial, indent=1))
        err.print(f"interrupted after {len(losses)} steps; losses so far in {dest / 'metrics.json'}", highlight=False)
        raise typer.Exit(130) from None
    bpb = result.bits_per_byte(result.final_val_loss)
    # written before printing: a closed pipe (`| head`) loses nothing
    atomic_write_text(dest / "metrics.json", json_text(_metrics(result, bpb), indent=1))
    save_weights(dest / WEIGHTS, trainer.model)  # multipliers folded in, for mupt export
    out.print(key_values("Training summary", _summary_rows(result, bpb, dest)))
    if result.status == "diverged":
        raise fail(f"run diverged: {result.reason}; lower --lr (now {cfg.train.lr:g})")


def _summary_rows(result: TrainResult, bpb: float | None, dest: Path) -> list[tuple[str, Any]]:
    return [
        ("status", result.status),
        ("steps", result.steps),
        ("tokens", result.tokens),
        ("first train loss (nats)", result.train_loss[0] if result.train_loss else None),
        ("last train loss (nats)", result.train_loss[-1] if result.train_loss else None),
        ("final val loss (nats)", result.final_val_loss),
        ("final val bits/byte", bpb),
        ("tokens/s", result.tokens / result.seconds if result.seconds else None),
        ("wall time (s)", result.seconds),
        ("run dir", str(dest)),
    ]


def _metrics(result: TrainResult, bpb: float | None) -> dict[str, Any]:
    return {
        "status": result.status, "reason": result.reason, "steps": result.steps, "tokens": result.tokens,
        "seconds": result.seconds, "train_loss": result.train_loss, "val_loss": result.val_loss,
        "final_val_bits_per_byte": bpb,
    }  # fmt: skip
