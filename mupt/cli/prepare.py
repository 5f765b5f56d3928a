"""``mupt prepare``: tokenize text sources into a memory-mapped dataset that every command trains on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

from mupt.cli import app, err, out
from mupt.data.prepare import PrepareSettings, prepare
from mupt.errors import DataError
from mupt.paths import check_output_dir
from mupt.report import table


@app.command(name="prepare")
def prepare_cmd(
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SOURCES...",
            help="Text: .txt files (one document each), directories (their .txt/.jsonl/.jsonl.gz/.parquet files; "
            "others are skipped with a warning), .jsonl/.jsonl.gz (one per line), .parquet (one per row; needs "
            "pyarrow), or builtin.",
            show_default=False,
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Dataset directory to write (new, empty, or an interrupted prepare)."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="bytes (vocab 256; the default), or a tokenizers tokenizer.json / a directory holding one.",
        ),
    ] = None,
    train_tokenizer: Annotated[
        int | None,
        typer.Option("--train-tokenizer", help="Train a byte-level BPE with this many ids on the training documents."),
    ] = None,
    eos: Annotated[
        str | None, typer.Option("--eos", help="End-of-document token of --tokenizer (default: found by name).")
    ] = None,
    text_field: Annotated[
        str, typer.Option("--text-field", help="The JSON field / parquet column holding the text.")
    ] = "text",
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of documents (whole ones) held out for validation.")
    ] = 0.05,
    val: Annotated[
        list[str] | None, typer.Option("--val", help="Validation sources (repeatable); replaces --val-fraction.")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="Tokenizer processes (1: one process, all threads).")] = 1,
    shard_mb: Annotated[float, typer.Option("--shard-mb", help="Text per shard in MiB (the unit of resume).")] = 64.0,
) -> None:
    """Tokenize text into DATASET_DIR: token shards (uint16/uint32), tokenizer.json and meta.json.

    Documents end with the tokenizer's EOS.  Resumable: rerun the same command after an
    interruption and it reuses the finished shards (the result is byte-identical).
    Then train on it with --data DATASET_DIR in every command.

    Example: [bold]mupt prepare corpus/ --train-tokenizer 8192 --out data/corpus[/]
    """
    if not sources:
        raise DataError("no sources: pass .txt/.jsonl/.jsonl.gz/.parquet files, directories, or builtin")
    if out_dir is None:
        raise DataError("--out is required: the dataset directory to write, e.g. --out data/mycorpus")
    settings = PrepareSettings(
        sources=list(sources), out=out_dir, tokenizer=tokenizer or "bytes", train_vocab=train_tokenizer, eos=eos,
        text_field=text_field, val_fraction=val_fraction, val_sources=list(val or []), workers=workers,
        shard_bytes=max(1, int(shard_mb * 2**20)),
    )  # fmt: skip
    if tokenizer is not None and train_tokenizer is not None:
        raise DataError(f"--tokenizer {tokenizer} and --train-tokenizer both given; pass one of them")
    check_output_dir(out_dir, "--out")  # before any reading or tokenizing
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        result = prepare(settings, on_progress)
    meta = result.meta
    tok = meta["tokenizer"]
    if result.skipped:
        n = len(result.skipped)
        shown = ", ".join(result.skipped[:3]) + (f" and {n - 3} more" if n > 3 else "")
        err.print(
            f"[bold yellow]warning:[/] skipped {n} file{'s' if n > 1 else ''} in the source directories, not a kind "
            f"prepare reads ({shown}); only .txt, .jsonl, .jsonl.gz and .parquet are read: rename plain text to "
            ".txt (one document each) to include it",
            highlight=False,
            soft_wrap=True,
        )
    if result.already_done:
        err.print(f"{out_dir}: already prepared from these inputs; nothing to do", highlight=False)
    rows = []
    for split in ("train", "val"):
        s = meta["splits"][split]
        bpt = s["bytes"] / s["tokens"] if s["tokens"] else None
        rows.append([split, s["documents"], s["tokens"], s["bytes"], bpt, len(s["shards"])])
    out.print(
        table(
            f"Dataset {out_dir}: tokenizer {tok['name']} (sha256 {tok['sha256'][:12]}), vocab {meta['vocab_size']}, "
            f"EOS {meta['eos_id']}, {meta['dtype']}",
            ["split", "documents", "tokens", "UTF-8 bytes", "bytes/token", "shards"],
            rows,
        )
    )
    mb = sum(s["bytes"] for s in meta["sources"]) / 2**20
    if not result.already_done:
        out.print(
            f"{len(meta['sources'])} sources{f' ({len(result.skipped)} files skipped)' if result.skipped else ''}, "
            f"{mb:.1f} MiB in {result.seconds:.1f} s "
            f"({mb / max(result.seconds, 1e-9):.2f} MiB/s); shards written {result.shards_written}, "
            f"reused {result.shards_reused}",
            highlight=False,
        )
    out.print(f"[bold green]dataset ready:[/] train with --data {out_dir}", highlight=False)
