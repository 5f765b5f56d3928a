"""``mupt transfer``: best proxy HPs -> per-role LR/init/multipliers at the target width -> recipe YAML."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer
from rich.measure import Measurement

from mupt.check.regret import ExpectedRegret, expected_regret, find_expected_regret
from mupt.cli import app, err, out
from mupt.cli.common import (
    ArchOpt,
    BackendOpt,
    BaseOpt,
    ConfigOpt,
    DataOpt,
    DiscOpt,
    HeaddimOpt,
    LayersOpt,
    LrOpt,
    NgroupsOpt,
    OptimOpt,
    SchemeOpt,
    SeedOpt,
    StateOpt,
    ThreadsOpt,
    VocabOpt,
    WidthOpt,
    progress,
    resolve_config,
)
from mupt.config import Arch, BestParams, HealthReference, Recipe, RecipeSource, RunConfig, Schedule, Scheme
from mupt.errors import ConfigError, StorageError
from mupt.health import DEFAULT_SEEDS, DEFAULT_STEPS, measure_reference
from mupt.paths import check_output_file
from mupt.report import format_bytes, key_values, table
from mupt.tables import SUFFIXES, parquet_available, write_table
from mupt.threads import resolve_threads, set_threads
from mupt.transfer import (
    FAR_FEWER,
    SCAN_FWD_FLOPS,
    TOKENS_PER_PARAM,
    TRAIN_FLOP_FACTOR,
    VERIFIED_RATIO,
    Summary,
    check_transfer_command,
    default_recipe_path,
    existing_recipe,
    explain,
    explain_notes,
    latest_best,
    load_best,
    lr_found_by,
    per_role_frame,
    save_recipe,
    summarize,
    target_config,
    target_length_is_the_proxys,
)
from mupt.transfer import transfer as do_transfer
from mupt.tune import trial_label


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _source(
    from_: Path | None, lr: float | None, runs_dir: Path, config: Path | None, proxy_flags: Mapping[str, object]
) -> tuple[BestParams | RunConfig, Path | None]:
    given = [("--" + k.replace("_", "-")) for k, v in proxy_flags.items() if v is not None]
    if config is not None:
        given.insert(0, "--config")
    if from_ is not None and lr is not None:
        raise ConfigError("--from and --lr both given: use --from runs/<study>/best.yaml OR --lr X with --config")
    if lr is None and given:
        raise ConfigError(
            f"{given[0]} describes the proxy and only applies with --lr; best.yaml records the proxy "
            "(use --to-width/--to-state for the target)"
        )
    if lr is not None:
        return resolve_config(config, lr=lr, **proxy_flags), None  # type: ignore[arg-type]
    path = from_ if from_ is not None else latest_best(runs_dir)
    return load_best(path), path


@app.command()
def transfer(
    to_width: Annotated[
        int | None, typer.Option("--to-width", help="Target d_model (N_u = expand * d_model follows).")
    ] = None,
    to_state: Annotated[
        int | None, typer.Option("--to-state", help="Target d_state N_x (mup-ssm only; default: the proxy's).")
    ] = None,
    to_layers: Annotated[
        int | None, typer.Option("--to-layers", help="Target depth; refused unless equal to the proxy's.")
    ] = None,
    to_data: Annotated[
        str | None,
        typer.Option(
            "--to-data",
            help="Data of the target run (default: the proxy's); must use the proxy's tokenizer (a dataset dir, "
            ".bin/.npy, builtin).",
        ),
    ] = None,
    scheme: SchemeOpt = None,
    from_: Annotated[
        Path | None,
        typer.Option("--from", help="best.yaml written by mupt tune; default: the newest runs/*/best.yaml."),
    ] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where to look for runs/*/best.yaml.")] = Path("runs"),
    lr: LrOpt = None,
    config: ConfigOpt = None,
    width: WidthOpt = None,
    arch: ArchOpt = None,
    headdim: HeaddimOpt = None,
    ngroups: NgroupsOpt = None,
    layers: LayersOpt = None,
    d_state: StateOpt = None,
    discretization: DiscOpt = None,
    optimizer: OptimOpt = None,
    base_width: BaseOpt = None,
    data: DataOpt = None,
    vocab_size: VocabOpt = None,
    seed: SeedOpt = None,
    backend: BackendOpt = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            help="Optimizer steps of the TARGET run. The proxy's by default, which is rarely what a wide run should "
            "train (the summary shows its tokens per parameter); mupt scale --steps can still override it.",
            show_default="the proxy's",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", help="Sequences per step of the TARGET run (global batch).", show_default="the proxy's"
        ),
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option("--seq-len", help="Tokens per sequence of the TARGET run.", show_default="the proxy's"),
    ] = None,
    schedule: Annotated[
        Schedule | None,
        typer.Option(
            "--schedule",
            help="Target LR schedule after warmup: constant, cosine, linear or wsd (warmup-stable-decay); "
            "default: the proxy's. See docs/schedules.md.",
        ),
    ] = None,
    warmup: Annotated[
        int | None, typer.Option("--warmup", help="Target warmup steps (linear from 0); default: the proxy's.")
    ] = None,
    decay_fraction: Annotated[
        float | None,
        typer.Option("--decay-fraction", help="wsd: fraction of the target's steps in the final linear decay [0.2]."),
    ] = None,
    grad_accum: Annotated[
        int | None,
        typer.Option("--grad-accum", help="Micro-batches per optimizer step in the target run (same global batch)."),
    ] = None,
    health_steps: Annotated[
        int,
        typer.Option(
            "--health-steps",
            min=0,
            help="Record the proxy's µP health reference for mupt scale: probe RMS of x, y, block output, logits and "
            "their changes after each of the first K steps of the proxy trained at the target's batch and schedule "
            "(0 = none). See docs/health.md.",
        ),
    ] = DEFAULT_STEPS,
    health_seeds: Annotated[
        int,
        typer.Option("--health-seeds", min=2, help="Proxy seeds of the health reference (their spread sets the band)."),
    ] = DEFAULT_SEEDS,
    threads: ThreadsOpt = None,
    out_path: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Recipe file to write, in an existing directory; checked before any work. An existing file is "
            "replaced only when it holds this same recipe, or with --overwrite. With --explain/--compare nothing is "
            "written unless --out is given.",
            show_default="<scheme>-<to-width>.yaml next to the best.yaml read (runs/<study>/), or in --runs-dir "
            "with --lr",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace what --out already holds (another recipe, or any file). Without it such a file is kept "
            "and the command refused; the same recipe re-derived is replaced.",
        ),
    ] = False,
    table_out: Annotated[
        Path | None,
        typer.Option(
            "--table-out",
            help="Also write the per-role table (base and target init std, LR, fwd mult, weight decay) as CSV "
            "(.csv) or Parquet (.parquet, needs pyarrow), in an existing directory.",
        ),
    ] = None,
    explain_rules: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="Print each role's rule (exponents of N_u, N_x), why, and its derivation in docs/width_rules.md; "
            "writes nothing.",
        ),
    ] = False,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare", help="Also show what sp, mup and mup-ssm would launch from the same proxy; writes nothing."
        ),
    ] = False,
    check_result: Annotated[
        Path | None,
        typer.Option(
            "--check",
            help="transfer.json of a `mupt check transfer` whose base is this proxy (or its directory): prints "
            "the regret it measured, the expected regret of the recipe.",
            show_default="the newest matching runs/*/transfer.json under --runs-dir",
        ),
    ] = None,
) -> None:
    """Map the best proxy hyperparameters to the target width and write a launchable recipe.

    The source is --from runs/<study>/best.yaml, the newest runs/*/best.yaml, or --lr X (the proxy
    then comes from --config and --width/--layers/--d-state/...).  --steps/--batch-size/--seq-len
    set the TARGET run's length (default: the proxy's).  The recipe goes next to the best.yaml
    (runs/<study>/<scheme>-<to-width>.yaml) unless --out says where.

    Example: [bold]mupt transfer --to-width 4096[/]   [bold]mupt transfer --explain[/]
    """
    proxy_flags = dict(
        width=width, arch=arch, headdim=headdim, ngroups=ngroups, layers=layers, d_state=d_state,
        discretization=discretization, optimizer=optimizer,
        base_width=base_width, data=data, vocab_size=vocab_size, seed=seed, backend=backend,
    )  # fmt: skip
    if table_out is not None and table_out.suffix not in SUFFIXES:
        raise ConfigError(f"--table-out {table_out}: give a path ending in .csv or .parquet")
    if table_out is not None and table_out.suffix == ".parquet" and not parquet_available():
        raise ConfigError(f"--table-out {table_out}: Parquet needs pyarrow; pip install 'mupt[parquet]' or use .csv")
    if to_width is None and not explain_rules:
        raise ConfigError("--to-width is required: the target d_model, e.g. --to-width 4096 (or use --explain)")
    n_threads = resolve_threads(threads)
    try:
        best, path = _source(from_, lr, runs_dir, config, proxy_flags)
    except StorageError:
        if to_width is not None:
            raise
        best, path = RunConfig(), None  # --explain alone without any study: explain the default config's rules
    proxy = best.config if isinstance(best, BestParams) else best
    # --explain and --compare only print; a recipe is written without them, or when --out asks for it
    write = out_path is not None or not (explain_rules or compare)
    dest: Path | None = None
    if to_width is not None and write:
        if out_path is not None:
            dest = out_path
        else:  # next to its study, never over the examples in recipes/ (README, "Where results go")
            dest = default_recipe_path(
                target_config(proxy, to_width, scheme=scheme), path.parent if path is not None else runs_dir
            )
        check_output_file(dest, "--out", create_parent=out_path is None)  # before any table is printed
    if table_out is not None:
        check_output_file(table_out, "--table-out")
    if to_width is None:
        _explain(proxy, Scheme(scheme) if scheme else Scheme(proxy.param.scheme))
        return
    sched = {"schedule": schedule, "warmup_steps": warmup, "decay_fraction": decay_fraction, "grad_accum": grad_accum}
    recipe = do_transfer(
        best, to_width, to_state, to_layers, scheme, steps=steps, batch_size=batch_size, seq_len=seq_len,
        source_path=path, to_data=to_data, schedule=sched,
    )  # fmt: skip
    prev = None if dest is None or overwrite else existing_recipe(dest, recipe)
    if prev is not None and not prev.same:  # like `mupt train --run-dir`: finished work is never replaced silently
        raise StorageError(f"--out {dest} holds {prev.what}: pass another --out PATH, or --overwrite to replace it")
    if explain_rules:
        _explain(proxy, Scheme(scheme) if scheme else Scheme(proxy.param.scheme))
    expected = _expected(check_result, runs_dir, proxy, to_width)
    if expected is not None:
        recipe.source["expected_regret"] = expected.to_dict()
    _header(recipe, path)  # before the health reference: the user sees what its progress bar is for
    if dest is not None and health_steps > 0:
        set_threads(n_threads)
        recipe.health = _health_reference(recipe, health_steps, health_seeds)
    if dest is not None:
        save_recipe(dest, recipe)  # first: a closed pipe (`| head`) or a narrow terminal cannot lose it
    if table_out is not None:
        write_table(per_role_frame(recipe), table_out)
    _show(recipe)
    _summary(recipe)
    if compare:
        _compare(best, to_width, to_state, to_layers, steps, batch_size, seq_len)
    _print_expected(expected, dest, check_transfer_command(proxy, to_width, path, runs_dir))
    if dest is not None:
        again = " (it held this same recipe)" if prev is not None else ""
        out.print(f"[bold green]recipe written:[/] {dest}{again}   launch with: mupt scale {dest}", highlight=False)
    else:
        flags = " and ".join(f for f, on in (("--explain", explain_rules), ("--compare", compare)) if on)
        verb = "print" if explain_rules and compare else "prints"
        err.print(f"no recipe written ({flags} only {verb}); drop {flags} or pass --out PATH to write one")
    if table_out is not None:
        out.print(f"per-role table written: {table_out}", highlight=False)


def _expected(check: Path | None, runs_dir: Path, proxy: RunConfig, to_width: int) -> ExpectedRegret | None:
    """The regret a check-transfer result measured for this proxy: --check (its transfer.json or directory;
    a mismatch is an error) or the newest matching one under --runs-dir (None if there is none)."""
    if check is None:
        return find_expected_regret(runs_dir, proxy, to_width)
    return expected_regret(check / "transfer.json" if check.is_dir() else check, proxy, to_width)


def _print_expected(expected: ExpectedRegret | None, dest: Path | None, measure: str) -> None:
    if expected is None:
        out.print(
            "expected regret: unknown (no `mupt check transfer` result with this proxy as its base under --runs-dir; "
            f"measure it with `{measure}`, or pass --check)",
            highlight=False,
        )
        return

    def cell(r: dict[str, object]) -> str:
        reg, se = r.get("regret_pct"), r.get("se_pct")
        if reg is None:
            return f"d_model {r['width']}: " + ("diverged" if r.get("diverged") else "n/a")
        return f"d_model {r['width']}: {reg:.2f}%" + ("" if se is None else f" ± {se:.2f}")

    out.print(
        f"regret measured by {expected.path} (base {expected.base_width}, {expected.seeds} seeds, {expected.steps} "
        "steps): " + ", ".join(cell(r) for r in expected.rows),
        highlight=False,
    )
    for why in expected.caveats:
        out.print(f"  [yellow]caveat:[/] {why}", highlight=False)
    confirm = f"mupt check target {dest if dest is not None else 'RECIPE'}"
    if expected.at_target is not None:
        out.print(f"expected regret of this recipe: [bold]{cell(expected.at_target)}[/]", highlight=False)
    elif expected.wider_than_checked:
        out.print(
            f"[yellow]the target d_model {expected.target_width} is wider than any width checked (max "
            f"{expected.max_checked}): its regret is not measured[/]; confirm it with `{confirm}`",
            highlight=False,
        )
    else:
        out.print(
            f"the target d_model {expected.target_width} was not checked itself; confirm it with `{confirm}`",
            highlight=False,
        )


def _health_reference(recipe: Recipe, steps: int, seeds: int) -> HealthReference:
    with progress() as bar:
        task = bar.add_task("health reference", total=seeds, info="")

        def on_run(seed: int, seconds: float) -> None:
            bar.update(task, advance=1, info=f"proxy seed {seed} ({seconds:.1f}s)")

        return measure_reference(recipe, steps, seeds, on_run)


def _header(recipe: Recipe, path: Path | None) -> None:
    s = recipe.source
    run = recipe.run
    origin = f"{path} (study {s.get('study')}, trial {_trial(s)})" if path else f"--lr {s['params']['lr']:g}"
    err.print(
        f"[bold]mupt transfer[/] from {origin}: d_model {s['proxy']['d_model']} -> {run.model.d_model}, "
        f"d_state {s['proxy']['d_state']} -> {run.model.d_state}, scheme {Scheme(run.param.scheme).value}, "
        f"optimizer {run.train.optimizer.value}, B {run.model.discretization.value}",
        highlight=False,
    )


def _show(recipe: Recipe) -> None:
    s = recipe.source
    run = recipe.run
    base = s["base_per_role"]
    rows = []
    for role, tgt in recipe.per_role.items():
        b = base[role]
        rows.append(
            [
                role,
                b["init_std"], tgt["init_std"], _ratio(tgt["init_std"], b["init_std"]),
                b["lr"], tgt["lr"], _ratio(tgt["lr"], b["lr"]),
                b["fwd_mult"], tgt["fwd_mult"], _ratio(tgt["fwd_mult"], b["fwd_mult"]),
                tgt["weight_decay"],
            ]
        )  # fmt: skip
    r_u, r_x = s["ratio"]["width"], s["ratio"]["state"]
    title = (
        f"Per role: base (d_model {s['base']['d_model']}, d_state {s['base']['d_state']}) vs target "
        f"(d_model {run.model.d_model}, d_state {run.model.d_state}); N_u ratio {r_u:g}, N_x ratio {r_x:g}"
    )
    wide = table(
        title,
        ["role", "init std base", "target", "ratio", "LR base", "target", "ratio", "fwd base", "target", "ratio",
         "wd (group)"],
        rows,
    )  # fmt: skip
    if Measurement.get(out, out.options.update(max_width=10_000), wide).maximum <= out.width:
        out.print(wide)
        return
    # narrow terminal (or a log at 80 columns): the same numbers as two tables that fit
    out.print(
        table(
            title + ": init std and forward multiplier",
            ["role", "init std base", "target", "ratio", "fwd base", "target", "ratio"],
            [[r[0], *r[1:4], *r[7:10]] for r in rows],
        )
    )
    out.print(table("Per role: learning rate and weight decay", ["role", "LR base", "target", "ratio", "wd (group)"],
                    [[r[0], *r[4:7], r[10]] for r in rows]))  # fmt: skip


def _summary(recipe: Recipe) -> None:
    sm = summarize(recipe)
    items: list[tuple[str, object]] = [
        ("parameters (target / proxy)", f"{sm.params:,} / {sm.proxy_params:,}"),
        ("transfer ratio (N_u, N_x)", f"{sm.width_ratio:g}x, {sm.state_ratio:g}x (verified up to {VERIFIED_RATIO:g}x)"),
        ("weights (fp32)", format_bytes(sm.weight_bytes)),
        ("weights + grads + optimizer states (fp32)", format_bytes(sm.state_bytes)),
        ("activations per token (fp32, saved for backward)", format_bytes(sm.activation_bytes_per_token)),
        ("training FLOPs per token (6·non-embedding params + scan)", f"{sm.flops_per_token:.4g}"),
        (
            "  of which the scan",
            f"{sm.scan_flops_per_token:.4g} ({TRAIN_FLOP_FACTOR:g} x {SCAN_FWD_FLOPS:g} · layers · N_u · N_x)",
        ),
        ("target tokens (steps x batch x seq)", _target_tokens(recipe, sm)),
        ("target training FLOPs", f"{sm.train_flops:.4g}"),
        (
            "proxy tokens / recommended minimum",
            f"{sm.proxy_tokens:,} / {sm.recommended_proxy_tokens:,.0f} ({TOKENS_PER_PARAM:g} tokens per proxy "
            f"parameter; a warning when below {FAR_FEWER:.0%} and the target trains longer)",
        ),
    ]
    if (found := _found_by(recipe)) is not None:
        items.insert(0, ("proxy LR found by", found))
    d = recipe.dataset
    if d:
        sha = d.get("tokenizer_sha256")
        items.append(
            (
                "data (tokenizer, vocab, train tokens)",
                f"{recipe.run.data.source}: {d.get('tokenizer')} ({sha[:12] if sha else 'no hash'}), "
                f"vocab {d.get('vocab_size')}, {d.get('tokens') if d.get('tokens') is not None else '-'} tokens",
            )
        )
    out.print(key_values("Summary", items))
    for w in sm.warnings:
        err.print(f"[bold yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


def _found_by(recipe: Recipe) -> str | None:
    """How the proxy's LR was found, from ``source.finalist`` (None: a best.yaml from before tune recorded it,
    or ``--lr``).  No drift term is applied here: the µP rules map the proxy's LR to the target width."""
    f = recipe.source.get("finalist")
    if not f:
        return None
    s = recipe.source
    words = lr_found_by(f) or (f"sampled at the proxy width (d_model {s['proxy']['d_model']})"
                               if f.get("obtained") == "sampled" else "")  # fmt: skip
    return f"{words} (study {s.get('study')}, trial {_trial(s)})" if words else None


def _trial(source: RecipeSource) -> str:
    """The proxy's trial as ``mupt tune`` names it, ``r<rung>/t<number>`` (trial numbers restart in every rung),
    the rung read from the finalist's last fidelity; the bare number when the best.yaml does not record it."""
    fidelities = (source.get("finalist") or {}).get("fidelities") or []
    rung = fidelities[-1].get("rung") if fidelities else None
    return str(source.get("trial")) if rung is None else trial_label(int(rung), int(source["trial"]))


def _target_tokens(recipe: Recipe, sm: Summary) -> str:
    t = recipe.run.train
    per_param = sm.train_tokens / sm.params
    text = f"{t.steps:,} x {t.batch_size} x {t.seq_len} = {sm.train_tokens:,} ({per_param:.3g} per parameter)"
    if target_length_is_the_proxys(recipe):
        text += f"; {t.steps:,} steps is the proxy's length: set the target's with --steps"
    return text


def _compare(
    best: BestParams | RunConfig, to_width: int, to_state: int | None, to_layers: int | None,
    steps: int | None, batch_size: int | None, seq_len: int | None,
) -> None:  # fmt: skip
    recipes: dict[str, Recipe] = {}
    for sch in Scheme:
        try:
            recipes[sch.value] = do_transfer(
                best, to_width, to_state if sch is Scheme.MUP_SSM else None, to_layers, sch,
                steps=steps, batch_size=batch_size, seq_len=seq_len,
            )  # fmt: skip
        except ConfigError as e:
            err.print(f"[yellow]{sch.value}: {e}[/]", highlight=False)
    if not recipes:
        return
    roles = list(next(iter(recipes.values())).per_role)
    cols = ["role"] + [f"{k} LR" for k in recipes] + [f"{k} init std" for k in recipes]
    rows = [
        [
            role,
            *(r.per_role[role]["lr"] for r in recipes.values()),
            *(r.per_role[role]["init_std"] for r in recipes.values()),
        ]
        for role in roles
    ]
    out.print(table(f"What each scheme would launch at d_model {to_width} (same proxy result)", cols, rows))


def _explain(proxy: RunConfig, scheme: Scheme) -> None:
    opt, disc = proxy.train.optimizer, proxy.model.discretization
    arch = proxy.model.arch
    rows = [[e.role, e.init, e.lr, e.fwd, e.weight_decay, e.why, e.ref] for e in explain(scheme, opt, disc.value, arch)]
    out.print(
        table(
            f"Width rules: {scheme.value}, {opt.family} family ({opt.value}), "
            + (f"B discretization {disc.value}; " if arch is Arch.MAMBA1 else "arch mamba2 (SSD); ")
            + "value = base value x (N_u/N_u,base)^a (N_x/N_x,base)^b",
            ["role", "init std", "LR", "fwd mult", "weight decay", "why", "docs/width_rules.md#"],
            rows,
            justify_numbers=False,
        )
    )
    out.print(
        "Applied by mupt.parametrization.apply; " + "; ".join(explain_notes(scheme, opt)) + ".",
        highlight=False,
        soft_wrap=True,
    )
