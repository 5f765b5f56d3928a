"""``mupt export``: a trained run or checkpoint -> a transformers or mamba_ssm directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mupt.cli import app, out
from mupt.export import ExportFormat, export_run
from mupt.report import key_values


@app.command()
def export(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="RUN_DIR_OR_CHECKPOINT",
            help="A mupt train run directory, a mupt scale run directory (its latest checkpoint) or one "
            "checkpoint directory (runs/x/checkpoints/step_000100), from any number of processes.",
        ),
    ],
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="hf: transformers MambaForCausalLM or Mamba2ForCausalLM (config.json + model.safetensors); "
            "mamba_ssm: MambaLMHeadModel (config.json + pytorch_model.bin).",
        ),
    ] = ExportFormat.HF,
    out_dir: Annotated[Path, typer.Option("--out", help="New or empty directory to write.")] = Path("export"),
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="hf: split the safetensors into shards above this size.")
    ] = "5GB",
) -> None:
    """Write a model that transformers or mamba_ssm loads with no mupt code, forward multipliers folded in.

    The logits equal mupt's (fp32, within 1e-5).  µP's forward multipliers (output_mult, embedding_mult,
    the width rules' multipliers) are folded into the weights; the dataset's tokenizer.json is copied
    when the run trained on a prepared dataset.  Mamba-2 runs (--arch mamba2) become Mamba2ForCausalLM /
    mamba_ssm's Mamba2, except when d_state was scaled from the proxy's (C's 1/N_x multiplier acts after
    a SiLU and cannot be folded).  Mamba-1 runs: Euler-B only (both libraries compute Δ·B): ZOH runs,
    mupt's default, are refused, and the tuned LR belongs to the discretization, so tune and transfer
    with --discretization euler from the start for a run you mean to export.

    Example: [bold]mupt export runs/scale --format hf --out hf-model[/], then
    MambaForCausalLM.from_pretrained("hf-model").
    """
    res = export_run(source, out_dir, fmt, max_shard_size)
    folded = ", ".join(f"{k}×{v:.4g}" for k, v in sorted(res.folded.items())) or "none (all multipliers are 1)"
    rows = [
        ("source", str(res.source) + (f" (step {res.step})" if res.step is not None else "")),
        ("format", res.format.value),
        ("parameters", f"{res.params:,}"),
        ("multipliers folded", folded if len(folded) < 200 else f"{len(res.folded)} parameters"),
        ("tokenizer", res.tokenizer or "none (the dataset has no tokenizer.json)"),
        ("files", ", ".join(res.files)),
        ("written to", str(res.out)),
    ]
    out.print(key_values("mupt export", rows))
