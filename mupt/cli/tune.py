"""``mupt tune``: Optuna LR search on the proxy, with progress, a table of top trials and best.yaml."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mupt.cli import app, err, out
from mupt.cli.common import (
    BackendOpt,
    BaseOpt,
    BatchOpt,
    ConfigOpt,
    DataOpt,
    DiscOpt,
    LayersOpt,
    OptimOpt,
    SchemeOpt,
    SeedOpt,
    SeqOpt,
    StateOpt,
    StepsOpt,
    VocabOpt,
    WidthOpt,
    progress,
)
from mupt.config import RunConfig, with_overrides
from mupt.data import bits_per_byte, bytes_per_token
from mupt.errors import ConfigError
from mupt.report import fmt, key_values, table
from mupt.tune import (
    SEARCHABLE,
    Progress,
    TuneSettings,
    count_states,
    default_study_name,
    load_best,
    load_existing,
    open_storage,
    proxy_config,
    run_study,
    trial_rows,
    trial_steps,
    validate_proxy,
    write_best,
    write_plots,
)


def _proxy(config: Path | None, **flags: object) -> RunConfig:
    """The proxy config: --config (or the built-in proxy) with the shared flags applied."""
    from mupt.cli.common import resolve_config
    from mupt.data import fit_vocab

    if config is None:
        # resolve_config starts from RunConfig(): let it validate the flags (errors name the flag),
        # then put the given values on the built-in proxy
        mapped = resolve_config(None, **flags)
        overrides = {}
        for k, v in flags.items():
            if v is not None:
                section, key = _FLAG_FIELDS[k].split(".")
                overrides[_FLAG_FIELDS[k]] = getattr(getattr(mapped, section), key)
        return fit_vocab(with_overrides(proxy_config(), overrides, where="flags"))
    return resolve_config(config, **flags)


_FLAG_FIELDS = {
    "width": "model.d_model", "layers": "model.n_layers", "d_state": "model.d_state",
    "discretization": "model.discretization", "backend": "model.scan_backend", "steps": "train.steps",
    "batch_size": "train.batch_size", "seq_len": "train.seq_len", "optimizer": "train.optimizer",
    "seed": "train.seed", "scheme": "param.scheme", "base_width": "param.base_d_model", "data": "data.source",
    "vocab_size": "data.vocab_size",
}  # fmt: skip


def _lr_range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--lr-range {text!r}: expected LOW,HIGH such as 1e-5,1") from None
    return lo, hi


@app.command()
def tune(
    config: ConfigOpt = None,
    width: WidthOpt = None,
    layers: LayersOpt = None,
    d_state: StateOpt = None,
    discretization: DiscOpt = None,
    steps: StepsOpt = None,
    batch_size: BatchOpt = None,
    seq_len: SeqOpt = None,
    optimizer: OptimOpt = None,
    scheme: SchemeOpt = None,
    base_width: BaseOpt = None,
    data: DataOpt = None,
    vocab_size: VocabOpt = None,
    seed: SeedOpt = None,
    backend: BackendOpt = None,
    eval_every: Annotated[
        int | None, typer.Option("--eval-every", help="Steps between validation losses (pruning points).")
    ] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Study name; default proxy-w<width>. Same name = resume.")
    ] = None,
    trials: Annotated[int, typer.Option("--trials", "-n", help="TOTAL finished trials over all workers.")] = 16,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Local worker processes on the same study.")] = 1,
    threads: Annotated[
        int, typer.Option("--threads", help="Torch threads per worker (1 is fastest for small proxies; add --workers).")
    ] = 1,
    sampler: Annotated[str, typer.Option("--sampler", help="tpe (seeded), gp, or grid (log2 LR grid).")] = "tpe",
    pruner: Annotated[str, typer.Option("--pruner", help="asha (successive halving), median or none.")] = "asha",
    search: Annotated[str, typer.Option("--search", help=f"Comma list to tune, from: {','.join(SEARCHABLE)}.")] = "lr",
    lr_range: Annotated[str | None, typer.Option("--lr-range", help="LOW,HIGH of the log-uniform LR range.")] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="RDB URL (sqlite:///x.db, postgresql://...) or a journal file; default runs/<study>/journal.log.",
        ),
    ] = None,
    heartbeat: Annotated[
        int,
        typer.Option(
            "--heartbeat",
            help="RDB storages: seconds between a running trial's heartbeats; a trial silent for twice this "
            "(its worker died) is failed and retried with the same parameters.",
        ),
    ] = 30,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where runs/<study>/ goes.")] = Path("runs"),
    report: Annotated[
        bool, typer.Option("--report", help="Run no trials: show the study's table, write its plots, print best.yaml.")
    ] = False,
    top: Annotated[int, typer.Option("--top", help="Rows in the final table.")] = 10,
) -> None:
    """Tune the proxy's learning rate (and optionally µP multipliers) with Optuna; writes runs/<study>/best.yaml.

    Example: [bold]mupt tune --width 256[/]   (rerun the same command to resume the study)
    """
    cfg = _proxy(
        config, width=width, layers=layers, d_state=d_state, discretization=discretization, steps=steps,
        batch_size=batch_size, seq_len=seq_len, optimizer=optimizer, scheme=scheme, base_width=base_width,
        data=data, vocab_size=vocab_size, seed=seed, backend=backend,
    )  # fmt: skip
    if eval_every is not None:
        cfg = with_overrides(cfg, {"train.eval_every": eval_every}, where="--eval-every")
    settings = TuneSettings(
        study=study or default_study_name(cfg), trials=trials, workers=workers, sampler=sampler, pruner=pruner,
        search=tuple(search.split(",")), lr_range=_lr_range(lr_range), seed=cfg.train.seed, storage=storage,
        runs_dir=str(runs_dir), threads=threads, heartbeat_interval=heartbeat,
    )  # fmt: skip
    if report:
        _report(settings, cfg, top)
        return
    validate_proxy(cfg)  # a width the rules cannot take, or an unusable storage, fails here before any output
    open_storage(settings)
    m = cfg.model
    where = settings.storage if settings.is_rdb else str(settings.journal_path)
    err.print(
        f"[bold]mupt tune[/] study={settings.study} d_model={m.d_model} layers={m.n_layers} d_state={m.d_state} "
        f"scheme={cfg.param.scheme.value} optimizer={cfg.train.optimizer.value} steps={cfg.train.steps} "
        f"data={cfg.data.source} search={','.join(settings.search)} sampler={settings.sampler.value} "
        f"pruner={settings.pruner.value} trials={settings.trials} workers={settings.workers} "
        f"threads={settings.threads} storage={where}",
        highlight=False,
    )
    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("trials", total=settings.trials, info="")

        def on_progress(p: Progress) -> None:
            best = f"best {p.best_value:.4f} @ lr {p.best_params.get('lr', 0):.3g}" if p.best_value is not None else ""
            bar.update(task, completed=min(p.done, p.total), info=best)

        st = run_study(settings, cfg, on_progress)
    seconds = time.perf_counter() - start
    _table(st, top)
    plots = write_plots(st, settings.run_dir)
    counts = count_states(st)
    bp, path = write_best(st, cfg, settings.run_dir)
    extra = ", ".join(f"{k} {fmt(v)}" for k, v in bp.params.items() if k != "lr")
    out.print(
        key_values(
            "Study summary",
            [
                ("study", settings.study),
                (
                    "finished trials",
                    f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed",
                ),
                ("best trial", bp.trial),
                ("best val loss (nats)", bp.value),
                ("best val bits/byte", bits_per_byte(bp.value, bytes_per_token(cfg.data))),
                ("best lr", bp.params["lr"]),
                *([("best multipliers", extra)] if extra else []),
                ("compute (trial-steps)", trial_steps(st)),
                ("wall time (s)", seconds),
                ("best params", str(path)),
                ("plots", ", ".join(str(p) for p in plots)),
            ],
        )
    )


def _table(st: object, top: int) -> None:
    rows = trial_rows(st, top)  # type: ignore[arg-type]
    if not rows:
        return
    names = [n for n in SEARCHABLE if n in rows[0]]
    columns = ["trial", "state", *names, "val loss", "steps", "note"]
    body = [
        [r["number"], r["state"].lower(), *(r[n] for n in names), r["value"], r["steps"], r["reason"] or ""]
        for r in rows
    ]
    out.print(table(f"Top {len(rows)} trials (val loss: final for complete, last reported for pruned)", columns, body))


def _report(settings: TuneSettings, cfg: RunConfig, top: int) -> None:
    best_path = settings.run_dir / "best.yaml"
    bp = load_best(best_path)
    st = load_existing(settings, cfg)
    _table(st, top)
    plots = write_plots(st, settings.run_dir)
    out.print(
        key_values(
            f"Study {settings.study}",
            [
                ("best trial", bp.trial),
                ("best val loss (nats)", bp.value),
                *((k, v) for k, v in bp.params.items()),
                ("code version", bp.code_version),
                ("best params", str(best_path)),
                ("plots", ", ".join(str(p) for p in plots)),
            ],
        )
    )
