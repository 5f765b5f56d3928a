"""``mupt check transfer`` (LR-transfer sweep as a CI gate) and ``mupt check all`` (coord + transfer)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mupt.check.coord import DEFAULT_BASE_WIDTH, DEFAULT_WIDTHS, CoordSettings, coord_check
from mupt.check.lr_transfer import (
    LossTable,
    SchemeResult,
    SweepSpec,
    TransferReport,
    check_transfer,
    parse_lr_grid,
    validate_spec,
)
from mupt.cli import check_app, err, out
from mupt.cli.common import (
    ArchOpt,
    BackendOpt,
    ConfigOpt,
    DataOpt,
    DiscOpt,
    HeaddimOpt,
    LayersOpt,
    NgroupsOpt,
    StateOpt,
    ThreadsOpt,
    VocabOpt,
    check_backend,
    check_finite,
    point_progress,
    progress,
    resolve_config,
    without_config,
)
from mupt.config import (
    DEFAULT_OPTIMIZER,
    PROXY_BATCH_SIZE,
    PROXY_SEQ_LEN,
    Arch,
    ModelConfig,
    OptimizerName,
    RunConfig,
    Scheme,
    check_mamba2_widths,
    load_run_config,
    parse_widths,
    with_overrides,
)
from mupt.errors import ConfigError
from mupt.paths import check_output_dir
from mupt.threads import default_workers, resolve_threads, set_threads

#: Optimizer steps per point of `mupt check transfer` (longer than the proxy's 64: the LR optimum of a
#: very short run sits at the edge of stability and drifts more between widths).
SWEEP_STEPS = 120
# Each point is evaluated once, at its last step, on train.final_eval_tokens (32K) validation tokens (the
# sweeps in docs/ci.md and docs/width_rules.md before 2026-11-30 read 4 batches, 2K tokens).

WidthsOpt = Annotated[str, typer.Option("--widths", help="Comma list of d_model widths; the smallest is the base.")]
LrsOpt = Annotated[
    str, typer.Option("--lrs", help="LR grid: 2^-14..2^-4 (step 1 in log2), 2^-14..2^-4:0.5, or a comma list.")
]
VsOpt = Annotated[
    str | None,
    typer.Option(
        "--vs",
        help="Contrast scheme(s), comma list (sp, mup, or sp,mup): swept and plotted, not gated; the regret of "
        "--scheme is measured against the best of every scheme swept.",
    ),
]
SeedsOpt = Annotated[
    int, typer.Option("--seeds", help="Seeds per point (losses are averaged; regret gets a seed standard error).")
]
MaxRegretOpt = Annotated[
    float,
    typer.Option(
        "--max-regret",
        help="Largest allowed regret (%) of the transferred setting at any width: its loss / the best loss there "
        "over every scheme swept - 1.",
    ),
]
#: Default seeds per point of `mupt check transfer` (regret needs a seed standard error; `check all` uses 1).
SWEEP_SEEDS = 3
#: Default --max-regret of `mupt check transfer` and `mupt check target`, in percent.
MAX_REGRET = 1.0
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", help="Parallel worker processes.", show_default="auto: usable cores, at most 8"),
]
MaxDriftOpt = Annotated[float, typer.Option("--max-drift", help="Largest allowed optimum drift, in log2 units.")]
TolOpt = Annotated[float, typer.Option("--monotone-tol", help="Allowed loss increase (nats) width to width.")]


RunDirOpt = Annotated[
    Path,
    typer.Option(
        "--run-dir",
        "--out",
        help="Output dir: points/ cache, transfer.json, points.csv (+ .parquet with pyarrow), PNG, summary.md "
        "(--out is the same flag).",
    ),
]


def workers_threads(workers: int | None, threads: int | None) -> tuple[int, int]:
    """(workers, threads per worker) with the defaults of :mod:`mupt.threads`: workers x threads <= cores."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1 (or leave it out for auto)")
    n = workers if workers is not None else default_workers()
    return n, resolve_threads(threads, n)


def build_spec(
    config: Path | None,
    widths: str,
    lrs: str,
    scheme: Scheme,
    vs: str | Scheme | None,
    seeds: int,
    **flags: Any,
) -> SweepSpec:
    ws = parse_widths(widths, at_least=2)
    grid = parse_lr_grid(lrs)
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be at least 1")
    contrasts = parse_schemes(vs, scheme)
    # mamba2: every width must hold whole heads in whole groups; name all the bad ones before any model is built
    model = load_run_config(config).model if config is not None else ModelConfig()
    if (flags.get("arch") or model.arch) is Arch.MAMBA2:
        headdim, ngroups = flags.get("headdim") or model.headdim, flags.get("ngroups") or model.ngroups
        check_mamba2_widths(ws, headdim, ngroups, model.expand)
        flags = {**flags, "width": ws[0]}  # the base run at a width that holds the heads (each point sets its own)
    base: RunConfig = resolve_config(config, **flags)
    if base.model.scan_backend == "auto":  # the fast CPU scan may not be installed yet
        from mupt.check.coord import resolve_scan_backend

        base = with_overrides(base, {"model.scan_backend": resolve_scan_backend("auto")})
    schemes = [scheme, *contrasts]
    spec = SweepSpec(base, ws, grid, schemes, [base.train.seed + i for i in range(seeds)])
    validate_spec(spec)  # bad shapes fail here, before any output
    return spec


def parse_schemes(vs: str | Scheme | None, scheme: Scheme) -> list[Scheme]:
    """``--vs sp,mup`` -> [Scheme.SP, Scheme.MUP]; raises ConfigError for an unknown, repeated or gated scheme."""
    if vs is None:
        return []
    names = [vs.value] if isinstance(vs, Scheme) else [t.strip() for t in vs.split(",") if t.strip()]
    out: list[Scheme] = []
    for name in names:
        try:
            s = Scheme(name)
        except ValueError:
            choices = ", ".join(x.value for x in Scheme)
            raise ConfigError(f"--vs {vs}: {name!r} is not a scheme; choose from {choices}") from None
        if s == scheme:
            raise ConfigError(f"--vs {name}: the contrast must differ from --scheme {scheme.value}")
        if s in out:
            raise ConfigError(f"--vs {vs}: {name} is given twice")
        out.append(s)
    return out


def regret_table(report: TransferReport) -> Table:
    """Rich table of the regret rows: transferred LR and loss, the best scheme/LR/loss, regret ± seed s.e."""
    gate = "" if report.max_regret is None else f" (max {report.max_regret:g}%)"
    t = Table(title=f"{report.gate}: regret of the transferred setting vs the best of every scheme swept{gate}",
              title_justify="left", header_style="bold")  # fmt: skip
    for name in ("width", "transferred LR", "loss", "best", "best LR", "best loss", "regret %", "± s.e."):
        t.add_column(name, justify="left" if name == "best" else "right")
    for r in report.regret:
        over = report.max_regret is not None and r.regret_pct is not None and r.regret_pct > report.max_regret
        reg = ("[red]diverged[/]" if r.diverged else "-" if r.regret_pct is None
               else f"[{'red' if over else 'green'}]{r.regret_pct:.2f}[/]")  # fmt: skip
        t.add_row(
            str(r.width), f"2^{r.transferred_log2_lr:g}", "-" if r.loss is None else f"{r.loss:.4f}",
            r.best_scheme or "-", "-" if r.best_log2_lr is None else f"2^{r.best_log2_lr:g}",
            "-" if r.best_loss is None else f"{r.best_loss:.4f}", reg, "-" if r.se_pct is None else f"{r.se_pct:.2f}",
        )  # fmt: skip
    return t


def loss_grid(title: str, table: LossTable, res: SchemeResult) -> Table:
    xs = sorted({x for row in table.values() for x in row})
    t = Table(title=title, title_justify="left", header_style="bold")
    t.add_column("width", justify="right")
    for x in xs:
        t.add_column(f"2^{x:g}", justify="right")
    t.add_column("log2 lr*", justify="right")
    t.add_column("shift", justify="right")
    for wr in res.widths:
        cells = []
        for x in xs:
            v = table[wr.width].get(x)
            if v is None:
                cells.append("[red]div[/]")
            elif x == wr.grid_best_log2_lr:
                cells.append(f"[bold green]*{v:.3f}[/]")
            else:
                cells.append(f"{v:.3f}")
        opt = "-" if wr.opt_log2_lr is None else f"{wr.opt_log2_lr:.2f}" + (" edge" if wr.at_edge else "")
        shift = "-" if wr.shift is None else f"{wr.shift:+.2f}"
        t.add_row(str(wr.width), *cells, opt, shift)
    return t


def render(report: TransferReport, max_drift: float) -> None:
    """Loss grids per scheme, drift verdicts, the regret table, measurement noise and the overall verdict."""
    for scheme, table in report.tables.items():
        res = report.results[scheme]
        role = "gate" if scheme == report.gate else "contrast"
        grid = loss_grid(f"{scheme} ({role}): final val loss (nats/token), * = best per width", table, res)
        if not out.is_terminal:  # logs/CI: do not squeeze the columns to 80
            out.width = max(out.width, 160)
        out.print(grid)
        drift = "n/a" if res.drift is None else f"{res.drift:.2f}"
        colour = "green" if res.passed else "red"
        out.print(
            f"{scheme}: drift [bold]{drift}[/] log2 (max {max_drift:g}), monotone at base optimum "
            f"[bold]{res.monotone_at_base_opt}[/], at each optimum {res.monotone_at_each_opt} -> "
            f"[bold {colour}]{'PASS' if res.passed else 'FAIL'}[/]",
            highlight=False,
        )
        for why in res.reasons:
            out.print(f"  - {why}", highlight=False)
    if report.regret:
        out.print(regret_table(report))
        for r in report.regret:
            for note in r.notes:
                out.print(f"  - width {r.width}: {note}", highlight=False)
    noise = report.noise
    if noise.get("val_tokens"):
        parts = [f"validation {noise['val_tokens']:,} tokens per point"]
        if noise.get("batch_se_median") is not None:
            parts.append(f"batch s.e. ±{noise['batch_se_median']:.4f}")
        if noise.get("seed_std_median") is not None:
            parts.append(f"seed std ±{noise['seed_std_median']:.4f}")
        out.print("measurement noise (nats, median over points): " + ", ".join(parts), highlight=False)
    colour = "green" if report.passed else "red"
    verdict = report.results[report.gate].verdicts(max_drift)
    verdict["regret"] = "not gated" if report.max_regret is None else "PASS" if report.regret_passed else "FAIL"
    out.print(
        f"{report.gate}: " + ", ".join(f"{k} {v}" for k, v in verdict.items()) + " -> "
        f"[bold {colour}]{'PASS' if report.passed else 'FAIL'}[/]",
        highlight=False,
    )
    out.print(
        f"points: {len(report.sweep.points)} ({report.sweep.cache_hits} cached, {report.sweep.trained} trained); "
        + "; ".join(f"{k}: {v}" for k, v in report.files.items()),
        highlight=False,
        soft_wrap=True,
    )


def run_transfer(
    spec: SweepSpec,
    out_dir: Path,
    workers: int,
    threads: int,
    max_drift: float,
    tol: float,
    max_regret: float | None = MAX_REGRET,
) -> bool:
    total = len(spec.configs())
    err.print(
        f"[bold]mupt check transfer[/] schemes={','.join(s.value for s in spec.schemes)} widths={spec.widths} "
        f"lrs={len(spec.lrs)} seeds={len(spec.seeds)} steps={spec.base.train.steps} points={total} workers={workers} "
        f"threads={threads}",
        highlight=False,
    )
    with point_progress(
        "transfer", total, lambda r: f"{r['scheme']} w={r['width']} lr=2^{r['log2_lr']:.3g}", digits=3
    ) as on_point:
        report = check_transfer(spec, out_dir, workers, threads, max_drift, tol, on_point, max_regret=max_regret)
    render(report, max_drift)
    return report.passed


@check_app.command("transfer")
def transfer(
    widths: WidthsOpt = "64,128,256,512",
    lrs: LrsOpt = "2^-12..2^-5",
    scheme: Annotated[Scheme, typer.Option("--scheme", help="Scheme under test (gated).")] = Scheme.MUP_SSM,
    vs: VsOpt = None,
    seeds: SeedsOpt = SWEEP_SEEDS,
    config: ConfigOpt = None,
    arch: ArchOpt = None,
    headdim: HeaddimOpt = None,
    ngroups: NgroupsOpt = None,
    layers: LayersOpt = None,
    d_state: StateOpt = None,
    discretization: DiscOpt = None,
    steps: Annotated[
        int,
        typer.Option(
            "--steps",
            help="Optimizer steps per point. 120 measures the drift; regret needs a longer run (480: at 120 steps "
            "SP's short-horizon lead inflates it, docs/transfer.md).",
        ),
    ] = SWEEP_STEPS,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step.")] = PROXY_BATCH_SIZE,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = PROXY_SEQ_LEN,
    optimizer: Annotated[OptimizerName, typer.Option("--optimizer", help="adamw, adam or sgd.")] = DEFAULT_OPTIMIZER,
    data: DataOpt = None,
    vocab_size: VocabOpt = None,
    backend: BackendOpt = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    max_drift: MaxDriftOpt = 1.0,
    monotone_tol: TolOpt = 0.0,
    max_regret: MaxRegretOpt = MAX_REGRET,
    out_dir: RunDirOpt = Path("runs/check-transfer"),
) -> None:
    """Sweep LR x width, locate the optimum per width; gate on its drift, on wider-is-not-worse and on regret.

    Regret at each width above the base: the loss of --scheme at the base width's best LR / the best loss at
    that width over every scheme swept (--scheme and --vs, each at its own best LR there) - 1, in %, with a
    seed standard error. Without --vs it is measured against --scheme's own best only.

    Exit 0 when the --scheme passes, 1 when it fails, 2 on bad input. Finished points are cached
    under --out/points/, so re-running resumes an interrupted sweep.

    Example: [bold]mupt check transfer --widths 64,128,256,512 --lrs 2^-12..2^-5 --vs sp,mup[/]
    """
    spec = build_spec(
        config, widths, lrs, scheme, vs, seeds, arch=arch, headdim=headdim, ngroups=ngroups, layers=layers,
        d_state=d_state, discretization=discretization, steps=steps, batch_size=batch_size, seq_len=seq_len,
        optimizer=optimizer, data=data, vocab_size=vocab_size, backend=backend,
    )  # fmt: skip
    check_finite(max_drift, "--max-drift", positive=True)
    check_finite(monotone_tol, "--monotone-tol")
    if not (check_finite(max_regret, "--max-regret") >= 0):
        raise ConfigError(f"--max-regret {max_regret:g}: give a percentage >= 0, e.g. 1")
    n_workers, n_threads = workers_threads(workers, threads)
    check_output_dir(out_dir, "--run-dir")
    passed = run_transfer(spec, out_dir, n_workers, n_threads, max_drift, monotone_tol, max_regret)
    if not passed:
        raise typer.Exit(1)


# --- mupt check all -------------------------------------------------------------------------


CI_WIDTHS = "32,64,128,256"
CI_LRS = "2^-12..2^-5"
CI_STEPS = 60
# The coordinate part is `mupt check coord` with its defaults: the widths a 64-wide proxy transfers
# to, 3 layers, 24 seeds (below d_model 256 layer-1 y is still rising with width under Adam,
# docs/width_rules.md, finding 1).
CI_COORD_BASE = DEFAULT_BASE_WIDTH
CI_COORD_WIDTHS = DEFAULT_WIDTHS


def coord_settings(widths: str, backend: str | None, **model: Any) -> CoordSettings:
    """CI-sized coordinate-check settings (validated): ``widths`` against a 64-wide base.

    ``model``: the model flags that ``mupt check all`` shares with its transfer part (``arch``,
    ``headdim``, ``ngroups``, ``base_d_state``); None keeps :class:`CoordSettings`' default.
    Raises :class:`ConfigError` on widths or head shapes the check cannot run.
    """
    given = {k: v for k, v in model.items() if v is not None}
    settings = CoordSettings(
        widths=tuple(parse_widths(widths, flag="--coord-widths")),
        base_width=CI_COORD_BASE,
        backend=check_backend(backend),
        **given,
    )  # validated when built (one-line ConfigError)
    return settings


def run_coord(settings: CoordSettings, out_dir: Path) -> bool:
    """The coordinate check (mupt.check.coord) with ``settings``; writes coord.json + PNG, a line per run."""
    err.print(
        f"[bold]mupt check all[/]: coordinate check arch={settings.arch.value} widths={list(settings.widths)} "
        f"base={settings.base} N_x={settings.base_d_state} seeds={settings.seeds}",
        highlight=False,
    )
    with progress() as bar:
        task = bar.add_task("coord", total=len(settings.widths) * settings.seeds, info="")

        def on_run(width: int, seed: int, seconds: float) -> None:
            bar.update(task, advance=1, info=f"width {width} seed {seed} ({seconds:.1f}s)")

        res = coord_check(settings, on_run=on_run)
    res.save(out_dir)
    bad = ", ".join(f"{r.key} slope {r.slope:+.2f}" for r in res.failing)
    verdict = "[bold green]PASS[/]" if res.passed else f"[bold red]FAIL[/] (not flat: {bad})"
    out.print(
        f"coord: {len(res.rows)} quantities, max |slope| {max(abs(r.slope) for r in res.rows):.2f} "
        f"(tolerance {settings.tolerance:g}) -> {verdict}; {out_dir / 'coord.json'}",
        highlight=False,
        soft_wrap=True,
    )
    return res.passed


@check_app.command("all")
def check_all(
    widths: Annotated[
        str, typer.Option("--widths", help="d_model widths of the LR-transfer part; the smallest is its base.")
    ] = CI_WIDTHS,
    coord_widths: Annotated[
        str,
        typer.Option(
            "--coord-widths",
            help=f"d_model widths of the coordinate part, checked against a {CI_COORD_BASE}-wide base (>= 8x span).",
        ),
    ] = ",".join(map(str, CI_COORD_WIDTHS)),
    lrs: LrsOpt = CI_LRS,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps per LR-transfer point.")] = CI_STEPS,
    arch: Annotated[Arch | None, without_config(ArchOpt)] = None,
    headdim: Annotated[int | None, without_config(HeaddimOpt)] = None,
    ngroups: Annotated[int | None, without_config(NgroupsOpt)] = None,
    d_state: Annotated[int | None, without_config(StateOpt)] = None,
    backend: BackendOpt = None,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    max_drift: MaxDriftOpt = 1.0,
    out_dir: Annotated[
        Path,
        typer.Option("--run-dir", "--out", help="Output dir (coord/ and transfer/ inside; --out is the same flag)."),
    ] = Path("runs/check-all"),
) -> None:
    """Coordinate check + LR-transfer check of mup-ssm, with defaults sized for a 2-core CI job.

    The coordinate part checks --coord-widths (d_model 256..2048) against a 64-wide base (3 layers,
    24 seeds); the transfer part sweeps --widths x --lrs. See docs/ci.md for timings and what each
    part proves.

    Both parts build the same model: --arch, --headdim, --ngroups and --d-state apply to each (Mamba-2:
    [bold]mupt check all --arch mamba2 --headdim 32[/]; its measured tables are in docs/width_rules.md,
    section 9).

    Exit 0 only if both pass. Example CI step: [bold]mupt check all --run-dir runs/ci-check[/]
    """
    start = time.perf_counter()
    spec = build_spec(
        None, widths, lrs, Scheme.MUP_SSM, None, 1, steps=steps, batch_size=PROXY_BATCH_SIZE,
        seq_len=PROXY_SEQ_LEN, optimizer=DEFAULT_OPTIMIZER, backend=backend, arch=arch, headdim=headdim,
        ngroups=ngroups, d_state=d_state,
    )  # fmt: skip
    settings = coord_settings(coord_widths, backend, arch=arch, headdim=headdim, ngroups=ngroups, base_d_state=d_state)
    check_finite(max_drift, "--max-drift", positive=True)
    n_workers, n_threads = workers_threads(workers, threads)
    check_output_dir(out_dir, "--run-dir")
    set_threads(resolve_threads(threads))  # the coordinate part runs in this process
    coord = run_coord(settings, out_dir / "coord")
    t_coord = time.perf_counter() - start
    # one seed at CI size cannot resolve 1% of loss: regret is reported, not gated (docs/transfer.md)
    transfer_ok = run_transfer(spec, out_dir / "transfer", n_workers, n_threads, max_drift, 0.0, max_regret=None)
    total = time.perf_counter() - start
    ok = coord and transfer_ok
    out.print(
        f"check all: coord {'PASS' if coord else 'FAIL'} ({t_coord:.0f}s), "
        f"transfer {'PASS' if transfer_ok else 'FAIL'} ({total - t_coord:.0f}s) -> "
        f"[bold {'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] in {total:.0f}s",
        highlight=False,
    )
    if not ok:
        raise typer.Exit(1)
