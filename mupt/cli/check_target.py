"""``mupt check target RECIPE``: a few short runs at the target width that confirm (or refute) a transfer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mupt.check.target import TargetReport, check_target, spec_from_recipe
from mupt.cli import check_app, err, out
from mupt.cli.check_transfer import MAX_REGRET, WorkersOpt, workers_threads
from mupt.cli.common import ThreadsOpt, check_finite, point_progress
from mupt.config import load_recipe
from mupt.errors import ConfigError
from mupt.paths import check_output_dir


def parse_factors(text: str) -> list[float]:
    """``0.5,1,2`` -> [0.5, 1.0, 2.0]; raises ConfigError naming the bad item."""
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--factors {text!r}: give comma-separated LR multiples, e.g. 0.5,1,2") from None


def render(report: TargetReport) -> None:
    row = report.row
    t = Table(title=f"check target: d_model {row.width}, final val loss (nats/token)", title_justify="left",
              header_style="bold")  # fmt: skip
    for name in ("scheme", "LR x", "LR", "loss", "seed std", "regret vs best"):
        t.add_column(name, justify="left" if name == "scheme" else "right")
    for r in report.table:
        loss = "[red]diverged[/]" if r["diverged"] else "-" if r["loss"] is None else f"{r['loss']:.4f}"
        reg = "-" if r["regret_pct"] is None else f"{r['regret_pct']:+.2f}%"
        name = r["scheme"] + (" (transferred)" if r["transferred"] else "")
        std = "-" if r["seed_std"] is None else f"{r['seed_std']:.4f}"
        t.add_row(name, f"{r['factor']:g}", f"{r['lr']:.3g}", loss, std, reg)
    out.print(t)
    regret = "n/a" if row.regret_pct is None else f"{row.regret_pct:.2f}%"
    se = "" if row.se_pct is None else f" ± {row.se_pct:.2f} (seed s.e., {row.seeds} seeds)"
    colour = "green" if report.passed else "red"
    out.print(
        f"regret of the transferred setting: [bold]{regret}[/]{se} (max {report.max_regret:g}%) -> "
        f"[bold {colour}]{'PASS' if report.passed else 'FAIL'}[/]",
        highlight=False,
    )
    for why in report.reasons:
        out.print(f"  - {why}", highlight=False)
    out.print(
        f"runs: {len(report.sweep.points)} ({report.sweep.cache_hits} cached, {report.sweep.trained} trained); "
        + "; ".join(f"{k}: {v}" for k, v in report.files.items()),
        highlight=False,
        soft_wrap=True,
    )


@check_app.command("target")
def target(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML written by `mupt transfer`.")],
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="Optimizer steps per run (the budget).", show_default="the recipe's steps"),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per run (regret gets a seed s.e. from 2).")] = 1,
    factors: Annotated[
        str, typer.Option("--factors", help="LR multiples of the transferred LR to train (must include 1).")
    ] = "0.5,1,2",
    vs_sp: Annotated[
        bool,
        typer.Option("--vs-sp", help="Also train standard parametrization at its own rule (the proxy's global LR)."),
    ] = False,
    max_regret: Annotated[
        float, typer.Option("--max-regret", help="Largest allowed regret of the transferred setting, in %.")
    ] = MAX_REGRET,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    out_dir: Annotated[
        Path, typer.Option("--run-dir", "--out", help="Output dir: points/ cache and target.json.")
    ] = Path("runs/check-target"),
) -> None:
    """Train the recipe's setting and its LR x 1/2 and x 2 at the target width; gate on its regret.

    Regret = loss of the transferred setting / best loss of these runs - 1 (in %). Exit 0 when it is at
    most --max-regret, 1 when above (or the transferred setting diverged), 2 on bad input. Runs are
    cached under --run-dir/points/, so re-running resumes. A shorter --steps than the recipe's is a
    cheaper but weaker check (the best LR can move with the horizon, docs/schedules.md).

    Example: [bold]mupt check target recipes/mup-ssm-1024.yaml --steps 200 --seeds 2 --vs-sp[/]
    """
    recipe = load_recipe(recipe_path)
    if not (check_finite(max_regret, "--max-regret") >= 0):
        raise ConfigError(f"--max-regret {max_regret:g}: give a percentage >= 0, e.g. 1")
    spec = spec_from_recipe(recipe, steps, seeds, parse_factors(factors), vs_sp)
    n_workers, n_threads = workers_threads(workers, threads)
    check_output_dir(out_dir, "--run-dir")
    total = len(spec.configs())
    err.print(
        f"[bold]mupt check target[/] {recipe_path}: d_model={spec.run.model.d_model} "
        f"schemes={','.join(s.value for s in spec.schemes)} factors={','.join(f'{f:g}' for f in spec.factors)} "
        f"seeds={len(spec.seeds)} steps={spec.steps} runs={total} workers={n_workers} threads={n_threads}",
        highlight=False,
    )
    with point_progress("target", total, lambda r: f"{r['scheme']} lr={r['lr']:.3g} seed {r['seed']}") as on_point:
        report = check_target(spec, out_dir, max_regret, n_workers, n_threads, on_point)
    render(report)
    if not report.passed:
        raise typer.Exit(1)
