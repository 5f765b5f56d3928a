"""Options shared by several commands, and the config they resolve to."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mupt.config import Discretization, OptimizerName, RunConfig, Scheme, load_yaml, with_overrides

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Run config YAML (model/data/train/param sections); flags override it."),
]
WidthOpt = Annotated[int | None, typer.Option("--width", "-w", help="d_model of the model (N_u = expand * d_model).")]
LayersOpt = Annotated[int | None, typer.Option("--layers", help="Number of Mamba blocks.")]
StateOpt = Annotated[int | None, typer.Option("--d-state", help="SSM state width N_x.")]
DiscOpt = Annotated[
    Discretization | None, typer.Option("--discretization", help="B discretization: zoh or euler (mamba_ssm).")
]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Optimizer steps.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Global (base) learning rate.")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Sequences per step (global batch).")]
SeqOpt = Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence.")]
OptimOpt = Annotated[OptimizerName | None, typer.Option("--optimizer", help="adamw, adam or sgd.")]
SchemeOpt = Annotated[Scheme | None, typer.Option("--scheme", help="Width rules: sp, mup (heuristic) or mup-ssm.")]
BaseOpt = Annotated[int | None, typer.Option("--base-width", help="Base d_model the width rules are relative to.")]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="builtin (offline stdlib docs), recall (synthetic), a dataset dir (mupt prepare), a .bin/.npy token "
        "file (with --vocab-size), or a .txt file/dir.",
    ),
]
VocabOpt = Annotated[
    int | None, typer.Option("--vocab-size", help="Vocabulary of a --data .bin/.npy token file (ids < it).")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for init and data order.")]
BackendOpt = Annotated[str | None, typer.Option("--backend", help="Scan backend: auto, torch, reference, triton.")]


def resolve_config(config: Path | None, **flags: Any) -> RunConfig:
    """Load ``config`` (or the defaults) and apply the flags that were given."""
    from mupt.data import fit_vocab

    cfg = load_yaml(config) if config is not None else RunConfig()
    explicit_vocab = config is not None and "vocab_size" in cfg.model.model_fields_set
    mapping = {
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


def progress(transient: bool = False) -> Progress:
    from mupt.cli import err

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
