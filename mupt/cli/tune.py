"""``mupt tune``: Optuna LR search on the proxy, with progress, a table of top trials and best.yaml."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from mupt.cli import app, err, mute_ctrl_c, out
from mupt.cli.common import (
    ArchOpt,
    BackendOpt,
    BaseOpt,
    BatchOpt,
    ConfigOpt,
    DataOpt,
    DiscOpt,
    HeaddimOpt,
    LayersOpt,
    LineProgress,
    NgroupsOpt,
    OptimOpt,
    SchemeOpt,
    SeedOpt,
    SeqOpt,
    StateOpt,
    StepsOpt,
    ThreadsOpt,
    VocabOpt,
    WidthOpt,
    progress,
)
from mupt.config import BestParams, RunConfig, with_overrides
from mupt.data import bits_per_byte, bytes_per_token
from mupt.errors import ConfigError, StorageError
from mupt.paths import check_output_dir, check_output_file
from mupt.report import fmt, key_values, table
from mupt.threads import resolve_threads
from mupt.transfer import lr_found_by
from mupt.tune import (
    DEFAULT_LR_DRIFT,
    FINISHED,
    SEARCHABLE,
    Fidelity,
    Finalist,
    Ladder,
    Progress,
    PrunerName,
    SamplerName,
    TuneSettings,
    best_trial,
    check_table_out,
    clear_stale_journal_lock,
    count_states,
    default_study_name,
    eval_noise,
    grid_flops,
    is_complete,
    load_best,
    load_existing,
    n_finished,
    prepare_study,
    proxy_config,
    remove_lock_file,
    repair_journal,
    run_study,
    rung_summaries,
    rung_width_note,
    study_flops,
    trial_rows,
    trial_steps,
    validate_proxy,
    write_best,
    write_plots,
    write_table,
)


def _noise_row(ladder: Ladder) -> list[tuple[str, str]]:
    """The 'val loss noise' summary row: the median batch standard error of the proxy-width values."""
    noise = eval_noise(ladder)
    if noise is None:
        return []
    se, tokens = noise
    return [("val loss noise (nats)", f"±{se:.4f} (batch s.e., {tokens:,} validation tokens)")]


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
    "width": "model.d_model", "layers": "model.n_layers", "d_state": "model.d_state", "arch": "model.arch",
    "headdim": "model.headdim", "ngroups": "model.ngroups",
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
    arch: ArchOpt = None,
    headdim: HeaddimOpt = None,
    ngroups: NgroupsOpt = None,
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
        str | None,
        typer.Option(
            "--study",
            help="Study name; default proxy-w<width> on the builtin corpus, proxy-w<width>-<name of --data> on "
            "other data. Same name = resume.",
        ),
    ] = None,
    trials: Annotated[
        int,
        typer.Option(
            "--trials",
            "-n",
            help="Configurations sampled at rung 0 (width fidelity: d_model = proxy/8, rounded down to a multiple "
            "of 16, at least 16); then one proxy-width trial (--finalist fit: 17 trials in all), or rung i keeps "
            "round(trials/reduction^i) (--finalist rank: 16, 5, 2, 1 = 24).",
        ),
    ] = 16,
    fidelity: Annotated[
        Fidelity,
        typer.Option(
            "--fidelity",
            help="width: most trials at d_model = proxy/8 (rounded down to a multiple of 16, at least 16: --width 64 "
            "gives rungs 16 and 64 under --finalist fit; mamba2 rungs also need whole heads in whole groups, "
            "a note says when that moves rung 0), the answer measured at the proxy width (see --finalist); "
            "steps: every trial at the proxy width, pruned on steps.",
        ),
    ] = Fidelity.WIDTH,
    finalist: Annotated[
        Finalist | None,
        typer.Option(
            "--finalist",
            help="Width fidelity: fit = one proxy-width trial at the LR where a parabola through rung 0's losses "
            "has its minimum, moved by --lr-drift; rank = the best by rank move up through rungs proxy/8, /4, /2, "
            "each rounded down to a multiple of 16 (at least 16; --width 64: 16, 32, 64) (benchmark: 0.12-0.14 "
            "against 0.19-0.23 of a dense 17-point log2 grid's FLOPs; docs/tuning.md). "
            "Default: fit when only the LR is searched, else rank.",
            show_default=False,
        ),
    ] = None,
    lr_drift: Annotated[
        float | None,
        typer.Option(
            "--lr-drift",
            help=f"--finalist fit only: octaves of LR the optimum moves per doubling of d_model from proxy/8 to the "
            f"proxy; default {DEFAULT_LR_DRIFT:g} (measured -0.11 and -0.19 at the default proxy on two corpora; 0 "
            "trusts µP's fixed optimum).",
            show_default=False,
        ),
    ] = None,
    reduction: Annotated[
        int,
        typer.Option(
            "--reduction",
            help="--finalist rank: rung i keeps 1/reduction of rung i-1's trials; a rung that would keep them all "
            "is left out (8: 16,2,1).",
        ),
    ] = 3,
    extrapolate: Annotated[
        bool,
        typer.Option(
            "--extrapolate/--no-extrapolate",
            help="--finalist rank, LR searched alone: the proxy rung also runs the LR extrapolated from the "
            "optimum's drift fitted across the narrower rungs (docs/tuning.md).",
        ),
    ] = False,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Local worker processes on the same study.")] = 1,
    threads: ThreadsOpt = None,
    log: Annotated[
        str,
        typer.Option(
            "--log",
            help="Per-trial curves (loss, per-group LR, grad norm, tokens/s, val loss at every step): jsonl "
            "(RUNS_DIR/STUDY/curves/), tensorboard (.../tensorboard/, a run per trial), wandb (offline, .../wandb/), "
            "mlflow (file store .../mlruns); comma-separated, e.g. jsonl,tensorboard. Default: none.",
        ),
    ] = "",
    sampler: Annotated[
        SamplerName, typer.Option("--sampler", help="tpe (seeded), gp, or grid (log2 LR grid).")
    ] = SamplerName.TPE,
    pruner: Annotated[
        PrunerName | None,
        typer.Option(
            "--pruner",
            help="Step pruner (rung 0): asha (successive halving), median or none. Default: none under --finalist "
            "fit (its parabola needs trials on both sides of the optimum), else asha.",
            show_default=False,
        ),
    ] = None,
    search: Annotated[str, typer.Option("--search", help=f"Comma list to tune, from: {','.join(SEARCHABLE)}.")] = "lr",
    lr_range: Annotated[
        str | None, typer.Option("--lr-range", help="LOW,HIGH of the log-uniform LR range; default 1e-4,0.1 (Adam).")
    ] = None,
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
        bool,
        typer.Option(
            "--report",
            help="Run no trials: print the study's tables and summary, write its plots (and best.yaml when missing).",
        ),
    ] = False,
    table_out: Annotated[
        Path | None,
        typer.Option(
            "--table-out",
            help="Also write every trial (Optuna's trials_dataframe) as CSV, or .parquet. A file there is replaced "
            "only when it is this study's trials table, or with --overwrite.",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an existing --table-out file (the study itself is never overwritten)."
        ),
    ] = False,
    top: Annotated[int, typer.Option("--top", help="Rows in the final table.")] = 10,
) -> None:
    """Tune the proxy's learning rate (and optionally µP multipliers) with Optuna; writes runs/<study>/best.yaml.

    By default most trials run at a narrower width (µP keeps the optimum nearly in place): 16
    configurations at d_model = proxy/8 (rounded down to a multiple of 16, at least 16), then one
    trial at the proxy width, at the LR where a
    parabola through the narrow losses has its minimum, moved by the optimum's expected drift
    (--lr-drift); the answer is measured at the proxy width.  --finalist rank moves the best by rank
    up through rungs at proxy/8, /4, /2 instead.  Compute is counted in FLOPs.

    Example: [bold]mupt tune --width 256[/]   (rerun the same command to resume the study)
    """
    cfg = _proxy(
        config, arch=arch, headdim=headdim, ngroups=ngroups, width=width, layers=layers, d_state=d_state,
        discretization=discretization, steps=steps,
        batch_size=batch_size, seq_len=seq_len, optimizer=optimizer, scheme=scheme, base_width=base_width,
        data=data, vocab_size=vocab_size, seed=seed, backend=backend,
    )  # fmt: skip
    if eval_every is not None:
        cfg = with_overrides(cfg, {"train.eval_every": eval_every}, where="--eval-every")
    settings = TuneSettings(
        study=study or default_study_name(cfg), trials=trials, workers=workers, sampler=sampler, pruner=pruner,
        search=tuple(search.split(",")), lr_range=_lr_range(lr_range), seed=cfg.train.seed, storage=storage,
        runs_dir=str(runs_dir), threads=resolve_threads(threads, workers), fidelity=fidelity, reduction=reduction,
        extrapolate=extrapolate, heartbeat_interval=heartbeat, log=log, finalist=finalist, lr_drift=lr_drift,
    )  # fmt: skip
    if table_out is not None:  # refused before any trial runs
        check_output_file(table_out, "--table-out")  # as transfer's --table-out: a file in an existing directory
        check_table_out(table_out, settings.study, overwrite)
    if report:
        _report(settings, cfg, top, table_out)
        return
    validate_proxy(cfg)  # a width the rules cannot take, or an unusable storage, fails here before any output
    check_output_dir(settings.run_dir, "--runs-dir")
    _tidy_journal(settings)
    ladder = prepare_study(settings, cfg).ladder  # another proxy config or rung schedule is refused here
    m = cfg.model
    where = settings.storage if settings.is_rdb else str(settings.journal_path)
    rungs = " ".join(f"{r.d_model}x{r.size}" for r in ladder.rungs)
    err.print(
        f"[bold]mupt tune[/] study={settings.study} {m.arch_label} d_model={m.d_model} layers={m.n_layers} "
        f"d_state={m.d_state} "
        f"scheme={cfg.param.scheme.value} optimizer={cfg.train.optimizer.value} steps={cfg.train.steps} "
        f"data={cfg.data.source} search={','.join(settings.search)} fidelity={settings.fidelity.value} "
        f"rungs(d_model x trials)={rungs} finalist={settings.finalist_mode or '-'}"
        f"{f' lr_drift={settings.drift:g}' if settings.finalist_mode is Finalist.FIT else ''} "
        f"sampler={settings.sampler.value} pruner={settings.pruner_mode.value} "
        f"workers={settings.workers} threads={settings.threads} storage={where}",
        highlight=False,
        soft_wrap=True,  # one line in logs (grep), however long
    )
    note = rung_width_note(settings, cfg)
    if note is not None:
        err.print(f"[bold yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    if is_complete(ladder):
        err.print(
            f"study {settings.study} is already complete ({n_finished(ladder)} finished trials): nothing to run, "
            "its results follow; pass --study NEW_NAME for a new study",
            highlight=False,
            soft_wrap=True,
        )
        remove_lock_file(settings)  # prepare_study took the study's lock: no lock file left beside the journal
        _finish(settings, cfg, top, table_out, None, False)
        return
    start = time.perf_counter()
    interrupted = False
    try:
        with progress() as bar:
            task = bar.add_task("tune", total=sum(r.size for r in ladder.rungs), info="")
            lines = isinstance(bar, LineProgress)  # a log: say more per line than a live bar has room for

            def on_progress(p: Progress) -> None:
                info = _log_text(p, settings.workers) if lines else _best_text(p)
                bar.update(task, completed=min(p.done, p.total), total=p.total, info=info)

            run_study(settings, cfg, on_progress)
    except KeyboardInterrupt:
        interrupted = True
    seconds = time.perf_counter() - start
    _finish(settings, cfg, top, table_out, seconds, interrupted)


def _tidy_journal(settings: TuneSettings) -> None:
    """Before a run or a report opens a journal file: remove a lock file left by a killed process (else Optuna
    waits 30 s for it, silently) and repair a last record cut by a crash, each said in one line.

    Every path goes through here first (a run with any --workers, an already complete study, --report), so the
    repair is said once: the storage's own repair (``open_storage``, in ``prepare_study`` and each worker) then
    finds the journal intact.
    """
    if settings.is_rdb:
        return
    stale = clear_stale_journal_lock(settings.journal_path)
    if stale is not None:
        err.print(
            f"[yellow]removed[/] {stale[0]}: a journal lock left {stale[1]:.0f} s ago by a process killed while "
            "writing a record (no live worker holds a lock that long)",
            highlight=False,
            soft_wrap=True,
        )
    fixed = repair_journal(settings.journal_path)
    if fixed is not None:
        err.print(
            f"[yellow]repaired[/] {fixed.path}: dropped a partial last record ({fixed.dropped_bytes} bytes, "
            f"kept in {fixed.saved_to.name}) left by a crash; every complete trial is kept",
            highlight=False,
            soft_wrap=True,
        )


def _nats(value: float | None) -> str:
    """A loss in nats/token as tune prints it everywhere: 4 decimals ("-" for none)."""
    return "-" if value is None else f"{value:.4f}"


def _best_text(p: Progress) -> str:
    if p.best_value is None:
        return ""
    return f"best {_nats(p.best_value)} @ lr {p.best_params.get('lr', 0):.3g} ({p.best_trial})"


def _log_text(p: Progress, workers: int) -> str:
    """One log line's worth: trials running (several workers), best so far at the proxy width, the last finished
    trial.  One worker runs one trial at a time and reports between trials: no running count."""
    running = f"{p.running} running, " if workers > 1 else ""
    text = f"trials finished, {running}{_best_text(p) or 'no trial at the proxy width yet'}"
    t = p.last
    if t is not None:
        value = _nats(t.value) if t.value is not None else t.user_attrs.get("reason", t.state.name.lower())
        text += f"; last: {p.last_trial} (d_model {t.user_attrs.get('d_model', '-')}): {value}"
    return text


def _trial_counts(ladder: Ladder) -> str:
    """'C complete, P pruned, F failed' over every rung, as in the rungs table (trials closed without training
    are not counted), with how many of the failed ones Ctrl-C stopped."""
    sums = rung_summaries(ladder)
    failed, stopped = sum(s.failed for s in sums), sum(s.interrupted for s in sums)
    text = f"{sum(s.complete for s in sums)} complete, {sum(s.pruned for s in sums)} pruned, {failed} failed"
    if stopped:
        text += (
            f" ({'all' if stopped == failed else stopped} interrupted by Ctrl-C; a rerun runs their places again: "
            "new samples in rung 0, the same configurations above it)"
        )
    return text


def _finish(
    settings: TuneSettings, cfg: RunConfig, top: int, table_out: Path | None, seconds: float | None, interrupted: bool
) -> None:
    """Table, plots, best.yaml and summary for the finished trials; on Ctrl-C also the resume line and exit 130.

    A Ctrl-C while they are written (pressed again after the first) ends the command with one line and exit
    130: every file is written atomically (best.yaml whole or not at all) and ``--report`` writes them later.
    """
    try:
        _results(settings, cfg, top, table_out, seconds, interrupted)
    except KeyboardInterrupt:
        mute_ctrl_c()
        err.print(
            "interrupted while writing the results: the finished trials are kept in the study; rerun the same "
            "command to resume, or add --report to write best.yaml and the plots",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None


def _results(
    settings: TuneSettings, cfg: RunConfig, top: int, table_out: Path | None, seconds: float | None, interrupted: bool
) -> None:
    ladder = load_existing(settings, cfg)
    _table(ladder, top)
    if len(ladder.rungs) > 1:
        _rung_table(ladder)
    plots = write_plots(ladder, settings.run_dir)
    table_path = write_table(ladder, table_out) if table_out is not None else None
    counts = count_states(ladder)
    try:
        bp, path = write_best(ladder, cfg, settings.run_dir)
    except StorageError as e:
        if not interrupted:
            raise
        bp, path = None, None
        note = str(e)
        if best_trial(ladder) is None and not any(t.state in FINISHED for t in ladder.top.get_trials(deepcopy=False)):
            note = f"interrupted before a trial finished at the proxy width (d_model {cfg.model.d_model})"
    else:
        note = ""
    spent, grid = study_flops(ladder), grid_flops(settings, cfg)
    rows: list[tuple[str, Any]] = [
        ("study", settings.study),
        ("trials", _trial_counts(ladder)),
    ]
    if bp is not None:
        extra = ", ".join(f"{k} {fmt(v)}" for k, v in bp.params.items() if k != "lr")
        rows += [
            ("best trial (proxy width)", ladder.label(bp.trial)),
            ("best val loss (nats)", _nats(bp.value)),
            ("best val bits/byte", bits_per_byte(bp.value, bytes_per_token(cfg.data))),
            *_noise_row(ladder),
            ("best lr", bp.params["lr"]),
            *([("best multipliers", extra)] if extra else []),
            *([("best lr found by", how)] if (how := lr_found_by(bp.finalists[0] if bp.finalists else {})) else []),
        ]
    rows += [
        ("compute (trial-steps)", trial_steps(ladder)),
        ("compute (FLOPs)", f"{spent:.3g}"),
        ("dense log2 LR grid at the proxy width (FLOPs)", f"{grid:.3g}"),
        ("compute saved vs the grid", f"{1 - spent / grid:.1%}" if grid else "-"),
        ("wall time (s)", "- (already complete: nothing ran now)" if seconds is None else seconds),
        ("best params", str(path) if path else f"not written: {note}"),
        ("plots", ", ".join(str(p) for p in plots)),
        *([("trials table", str(table_path))] if table_path else []),
    ]
    out.print(key_values("Study summary", rows))
    if interrupted:
        err.print(
            f"interrupted: {counts['COMPLETE'] + counts['PRUNED']} finished trials are kept in the study; "
            "rerun the same command to resume",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130)


def _table(ladder: Ladder, top: int) -> None:
    rows = trial_rows(ladder, top)
    if not rows:
        return
    names = [n for n in SEARCHABLE if n in rows[0]]
    columns = ["trial", "d_model", "state", *names, "val loss", "steps", "note"]
    body = [
        [r["trial"], r["d_model"], (r["status"] or r["state"]).lower(), *(r[n] for n in names),
         _nats(r["value"]), r["steps"], r["reason"] or ""]
        for r in rows
    ]  # fmt: skip
    out.print(
        table(
            f"Top {len(rows)} trials, proxy width first (trial rR/tN: trial N of rung R; val loss in nats: final "
            "for complete, last reported for pruned)",
            columns,
            body,
            right=("val loss",),
        )
    )


def _rung_table(ladder: Ladder) -> None:
    grid = grid_flops(ladder.settings, ladder.cfg)
    body = [
        [s.rung, s.d_model, s.size, s.complete, s.pruned, s.failed, s.flops, s.flops / grid if grid else None,
         _nats(s.best_value), s.best_lr]
        for s in rung_summaries(ladder)
    ]  # fmt: skip
    out.print(
        table(
            "Rungs (compute = trial-steps x FLOPs/token(width) x tokens/step; best loss in nats)",
            ["rung", "d_model", "planned", "complete", "pruned", "failed", "FLOPs", "of grid", "best loss", "best lr"],
            body,
            right=("best loss",),
        )
    )


def _best_params_cell(path: Path | None, no_answer: bool) -> str:
    """The report's 'best params' cell: best.yaml, or why there is none."""
    if path is not None:
        return str(path)
    return "none: no proxy-width trial completed" if no_answer else "none yet: no trial has finished at the proxy width"


def _report(settings: TuneSettings, cfg: RunConfig, top: int, table_out: Path | None) -> None:
    """Tables, plots and best.yaml of an existing study, without running trials.

    best.yaml is rewritten from the study when it is missing (a run killed before it finished); a study
    interrupted before any trial finished at the proxy width gets its tables and plots and a line saying so.
    """
    best_path = settings.run_dir / "best.yaml"
    bp: BestParams | None = load_best(best_path) if best_path.is_file() else None  # a corrupt one: one line, first
    _tidy_journal(settings)
    ladder = load_existing(settings, cfg)
    _table(ladder, top)
    if len(ladder.rungs) > 1:
        _rung_table(ladder)
    plots = write_plots(ladder, settings.run_dir)
    table_path = write_table(ladder, table_out) if table_out is not None else None
    spent, grid = study_flops(ladder), grid_flops(settings, cfg)
    no_answer = ""  # a complete study without a best trial: every proxy-width trial diverged
    if bp is None:
        try:
            bp, best_path = write_best(ladder, cfg, settings.run_dir)
        except StorageError as e:
            bp, no_answer = None, str(e) if is_complete(ladder) else ""
    rows: list[tuple[str, Any]] = [("trials", _trial_counts(ladder))]
    if bp is not None:
        rows += [
            ("best trial", ladder.label(bp.trial)),
            ("best val loss (nats)", _nats(bp.value)),
            *_noise_row(ladder),
            *((k, v) for k, v in bp.params.items()),
            *([("lr found by", how)] if (how := lr_found_by(bp.finalists[0] if bp.finalists else {})) else []),
            ("fidelity", bp.fidelity),
        ]
    rows += [
        ("compute (FLOPs)", f"{spent:.3g}"),
        ("compute saved vs the dense log2 LR grid", f"{1 - spent / grid:.1%}" if grid else "-"),
        *([("code version", bp.code_version)] if bp is not None else []),
        ("best params", _best_params_cell(best_path if bp is not None else None, bool(no_answer))),
        ("plots", ", ".join(str(p) for p in plots)),
        *([("trials table", str(table_path))] if table_path else []),
    ]
    out.print(key_values(f"Study {settings.study}", rows))
    remove_lock_file(settings)  # _tidy_journal may have taken the study's lock
    if no_answer:
        err.print(no_answer, highlight=False, soft_wrap=True)
    elif bp is None:
        err.print(
            f"study {settings.study}: no trial has finished at the proxy width (d_model {cfg.model.d_model}) yet; "
            "rerun the same command without --report to resume it",
            highlight=False,
            soft_wrap=True,
        )
