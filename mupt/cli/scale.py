"""``mupt scale``: train a recipe for real, on one process or many (torchrun), resumable."""

from __future__ import annotations

import os
import shlex
import signal
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer

from mupt import launch
from mupt.cli import app, err, fail, mute_ctrl_c, out
from mupt.cli.common import ThreadsOpt, progress
from mupt.config import Precision, load_recipe
from mupt.data import bits_per_byte, bytes_per_token, compare_identity
from mupt.errors import DivergenceError, MuptError
from mupt.health import resolve_every
from mupt.paths import check_output_dir
from mupt.report import key_values
from mupt.threads import resolve_threads, set_threads
from mupt.transfer import data_identity


@app.command()
def scale(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML written by mupt transfer.")],
    run_dir: Annotated[
        Path | None,
        typer.Option("--run-dir", help="Checkpoints, metrics.jsonl, summary.json (recipe: launch.run_dir)."),
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Override run.train.steps.")] = None,
    grad_accum: Annotated[
        int | None,
        typer.Option(
            "--grad-accum",
            help="Micro-batches per optimizer step (run.train.grad_accum): the global batch stays the recipe's, "
            "each rank holds 1/N of its slice at a time; losses equal the unaccumulated run's.",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", help="Override run.data.source (a dataset dir, .bin/.npy, ...): same tokenizer as the recipe's."
        ),
    ] = None,
    ckpt_every: Annotated[int | None, typer.Option("--ckpt-every", help="Checkpoint every N steps.")] = None,
    log_every: Annotated[int | None, typer.Option("--log-every", help="Log metrics every N steps.")] = None,
    log: Annotated[
        str | None,
        typer.Option(
            "--log",
            "--log-sinks",  # the spelling workers get: torchrun's parser reads a bare --log as its --log-dir
            help="Metrics sinks: jsonl (metrics.jsonl, always), tensorboard (RUN_DIR/tensorboard), wandb (offline "
            "run in RUN_DIR/wandb), mlflow (file store RUN_DIR/mlruns): loss, per-group LR, grad norm, tokens/s, val "
            "loss, health probes. Recipe: launch.log [jsonl].",
        ),
    ] = None,
    precision: Annotated[
        Precision | None,
        typer.Option("--precision", help="auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16 [recipe: auto]."),
    ] = None,
    compile_: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model (GPU runs).")
    ] = None,
    fsdp: Annotated[
        bool | None, typer.Option("--fsdp/--no-fsdp", help="FSDP2 (fully_shard per block) not DDP.")
    ] = None,
    lr_scale: Annotated[
        float | None,
        typer.Option(
            "--lr-scale",
            help="Multiply the transferred LR (run.train.lr and every per_role lr) by this, e.g. 0.5 or 2.",
        ),
    ] = None,
    health_every: Annotated[
        int | None,
        typer.Option(
            "--health-every",
            min=0,
            help="µP health check: probe RMS of x, y, block output, logits and their changes on a fixed batch every N "
            "steps and compare with the proxy at the same step (recipe's health reference; 0 = off). Warns once per "
            "layer and quantity out of band. Default: a quarter of the reference's steps. See docs/health.md.",
        ),
    ] = None,
    health_strict: Annotated[
        bool | None,
        typer.Option(
            "--health-strict/--no-health-strict",
            help="Stop with exit code 1, after writing a checkpoint, when a health probe leaves its band.",
        ),
    ] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes per node (torch.distributed.run).")] = 1,
    nnodes: Annotated[int, typer.Option("--nnodes", min=1, help="Nodes (needs --rdzv-endpoint).")] = 1,
    rdzv_endpoint: Annotated[
        str | None, typer.Option("--rdzv-endpoint", help="HOST:PORT of the rendezvous for multi-node runs.")
    ] = None,
    resume: Annotated[
        bool | None,
        typer.Option("--resume/--no-resume", help="Continue from the latest checkpoint (default when one exists)."),
    ] = None,
    reschedule: Annotated[
        bool,
        typer.Option(
            "--reschedule",
            help="Resume with a different LR schedule than the checkpoint's (--steps, schedule, warmup): the LR "
            "at the resumed step changes. Without it such a resume is refused.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate the recipe completely, print the resolved plan and exit.")
    ] = False,
    threads: ThreadsOpt = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Start from a transformers or mamba_ssm checkpoint directory (continued pre-training; the "
            "recipe's model must have its shapes). Ignored when resuming from this run's own checkpoint.",
        ),
    ] = None,
) -> None:
    """Launch the large run from a recipe: DDP or FSDP2, bf16 on GPU, DCP checkpoints, exact resume.

    Example: [bold]mupt scale recipes/tiny.yaml --nproc 2[/]
    """
    # "dir": the run dir once known; "ended": set once training has returned; "ppid": a worker's launcher
    run: dict[str, Any] = {"ppid": os.getppid()}
    try:
        recipe = launch.apply_overrides(
            load_recipe(recipe_path), run_dir=run_dir, steps=steps, grad_accum=grad_accum, data=data,
            ckpt_every=ckpt_every, log_every=log_every, log=log, precision=precision, compile=compile_, fsdp=fsdp,
            lr_scale=lr_scale, init_from=init_from, health_every=health_every, health_strict=health_strict,
        )  # fmt: skip
        run["dir"] = Path(recipe.launch.run_dir)
        _launch(recipe, recipe_path, run, resume, reschedule, lr_scale, data, threads, nproc, nnodes, rdzv_endpoint,
                dry_run)  # fmt: skip
    except MuptError as e:
        if not launch.is_worker():
            raise  # one line, exit 2 (mupt.cli.main)
        launch.record_failure(e)  # every rank may raise it: the launcher prints each distinct error once
        raise typer.Exit(2) from None
    except KeyboardInterrupt:  # Ctrl-C before training's own handler is installed (or after it is removed)
        mute_ctrl_c()
        if launch.is_worker():  # the launcher says it once for every rank
            raise typer.Exit(130) from None
        if run.get("ended"):
            err.print("[bold red]interrupted[/] (Ctrl-C) after the run ended; its results are written", highlight=False)
        else:
            err.print(before_training_line(signal.SIGINT, run.get("dir")), highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def before_training_line(signum: int, run_dir: Path | None) -> str:
    """One line for a run stopped before its first step: nothing was trained or lost; how to start or resume."""
    what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by signal {signum}"
    latest = launch.find_latest(run_dir) if run_dir is not None else None
    if latest is None:
        return f"{what} before training started: nothing was trained or lost; rerun the same command to start"
    step = launch.checkpoint_step(latest)
    return (
        f"{what} before training started: nothing was lost (checkpoints up to step {step} are kept in "
        f"{latest.parent}); rerun the same command to resume"
    )


def _launch(
    recipe: launch.Recipe,
    recipe_path: Path,
    run: dict[str, Any],
    resume: bool | None,
    reschedule: bool,
    lr_scale: float | None,
    data: str | None,
    threads: int | None,
    nproc: int,
    nnodes: int,
    rdzv_endpoint: str | None,
    dry_run: bool,
) -> None:
    """The body of ``mupt scale`` once the recipe is loaded: checks, then this process, its workers or a plan."""
    resolve_every(recipe)  # a health flag the recipe cannot serve is refused before anything starts
    n_threads = resolve_threads(threads, nproc)  # per process; nproc processes share this node's cores
    check_output_dir(Path(recipe.launch.run_dir), "--run-dir")
    if data is not None and recipe.dataset and not launch.is_worker():  # another tokenizer: refused; corpus: warned
        for w in compare_identity(recipe.dataset, data_identity(recipe.run.data, strict=True)):
            err.print(f"[bold yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    flags = [*launch.worker_flags(recipe, resume, lr_scale, reschedule), "--threads", str(n_threads)]
    if launch.is_worker():
        set_threads(n_threads)
        _run_worker(recipe, resume, reschedule, run)
        return
    distributed = nproc > 1 or nnodes > 1 or recipe.launch.fsdp
    if distributed:
        argv = launch.torchrun_args(recipe_path, flags, nproc, nnodes, rdzv_endpoint)
        command = "torchrun " + shlex.join(argv)
    else:
        command = shlex.join(["mupt", "scale", str(recipe_path), *flags])
    if dry_run:
        launch.validate_recipe(recipe)  # what the real launch would refuse, refused here too
        data_identity(recipe.run.data, strict=True)  # and data it could not open (a path from another directory)
        plan = launch.make_plan(recipe, nproc * nnodes, command)
        out.print(key_values("mupt scale plan (dry run)", plan.rows()))
        return
    if not distributed:
        set_threads(n_threads)
        _run_here(recipe, resume, reschedule, run)
        return
    err.print(f"[bold]mupt scale[/] launching {nproc * nnodes} processes: {command}", highlight=False)
    before = launch.find_latest(Path(recipe.launch.run_dir))
    result = launch.launch_distributed(argv)
    run["ended"] = True
    code = result.code
    if code > 128:
        latest = launch.find_latest(Path(recipe.launch.run_dir))
        if latest == before:  # a stop during training always writes a checkpoint first: none came, none trained
            err.print(before_training_line(code - 128, run["dir"]), highlight=False, soft_wrap=True)
        else:
            what = "interrupted (Ctrl-C)" if code - 128 == signal.SIGINT else f"terminated by signal {code - 128}"
            step = launch.checkpoint_step(latest) if latest is not None else "?"
            err.print(
                f"{what} at step {step}; the workers wrote checkpoint {latest}; rerun to resume",
                highlight=False,
                soft_wrap=True,
            )
        if code - 128 == signal.SIGINT:
            raise typer.Exit(130)
        return
    if code == 2 and result.user_errors():  # each distinct user error the ranks recorded, once
        errors = result.user_errors()
        for ranks, text in errors:
            where = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: " if len(errors) > 1 else ""
            err.print(f"[bold red]error:[/] {where}{text}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    cause = result.cause
    if code == 1 and recipe.launch.health_strict and cause is not None and cause.exitcode == 1 and not cause.message:
        raise fail("stopped by --health-strict (the warning is above); the workers wrote a checkpoint", code=1)
    if code:
        raise fail(_failure_line(result, Path(recipe.launch.run_dir)), code=code)


def _failure_line(result: launch.LaunchResult, run_dir: Path) -> str:
    """One line: which rank failed first and how, what is kept, what to do."""
    latest = launch.find_latest(run_dir)
    kept = (
        f"checkpoints up to step {int(latest.name.split('_')[-1])} are kept in {latest.parent}"
        if latest is not None
        else "no checkpoint had been written yet"
    )
    cause = result.cause
    if cause is None:  # torchrun failed without a worker record (e.g. the rendezvous)
        return f"the launcher failed with exit code {result.code} (its error is above); {kept}; fix it and rerun"
    if cause.signal is not None:
        why = ", e.g. out of memory or kill -9" if cause.signal == signal.SIGKILL else ""
        what = f"was killed by signal {cause.signal} ({cause.signal_name()}{why})"
        return f"rank {cause.rank} {what}; the other ranks stopped with it; {kept}; rerun the same command to resume"
    if cause.peer_lost:  # every failed rank here lost a peer: the one that died is elsewhere (another node)
        return (
            f"rank {cause.rank} lost contact with another rank ({cause.message or 'a collective failed'}; traceback "
            f"in {cause.error_file or 'its log'}); see the log of the node whose rank died first; {kept}; rerun the "
            "same command to resume"
        )
    what = f"failed with {cause.message} (traceback above)" if cause.message else f"exited with code {cause.exitcode}"
    return f"rank {cause.rank} {what}; {kept}; fix it and rerun the same command to resume"


def _run_worker(recipe: launch.Recipe, resume: bool | None, reschedule: bool, run: dict[str, Any]) -> None:
    """One torchrun rank: train; an error goes into torchrun's error file for the launcher's report.

    A rank that stopped because another died exits with :data:`launch.EXIT_PEER_LOST` and prints nothing
    (its traceback, a collective cut short, is only in the error file): the launcher names the rank that died.
    A user error (:class:`MuptError`) is recorded and printed by the launcher too (:func:`scale`), once.
    """
    try:
        _run_here(recipe, resume, reschedule, run)
    except launch.PeerLostError as e:
        launch.record_failure(e)
        raise typer.Exit(launch.EXIT_PEER_LOST) from None
    except (MuptError, typer.Exit):
        raise  # a user error (recorded by scale()) or an exit code chosen here
    except Exception as e:
        launch.record_failure(e)
        raise


def _print_summary(s: dict[str, Any], bpt: float | None, already_finished: bool = False) -> None:
    """The summary table; for a rerun of a finished run (nothing trained) no wall time or throughput."""
    rows: list[tuple[str, Any]] = [
        ("status", s["status"] + (f" ({s['reason']})" if s.get("reason") else "")),
        ("processes", s["world"]),
        ("steps (resumed from)", f"{s['steps']} ({s['start_step']})"),
        ("tokens seen", s["tokens_seen"]),
        ("wall time (s)", s["seconds"]),
        ("throughput (tokens/s)", s["tokens_per_s"]),
        ("last train loss (nats)", s["last_loss"]),
        ("best val loss (nats)", s["best_val_loss"]),
        ("best val bits/byte", bits_per_byte(s["best_val_loss"], bpt)),
        ("checkpoint", s["checkpoint"]),
        ("run dir", s["run_dir"]),
    ]
    if already_finished:
        rows[0] = ("status", f"already finished at step {s['steps']}: nothing trained")
        rows = [r for r in rows if r[0] not in ("steps (resumed from)", "wall time (s)", "throughput (tokens/s)")]
    out.print(key_values("Scale summary", rows))


def _run_here(recipe: launch.Recipe, resume: bool | None, reschedule: bool, run: dict[str, Any]) -> None:
    """Train in this process (alone, or one rank of a torchrun job); rank 0 shows progress and the summary."""
    rank = launch.dist_env()[0]
    cfg = recipe.run

    def on_health(text: str) -> None:
        err.print(f"[bold yellow]warning:[/] {text}", highlight=False, soft_wrap=True)

    if rank != 0:
        result = launch.run(recipe, resume, reschedule=reschedule)
        run["ended"] = True
    else:
        with ExitStack() as stack:
            state: dict[str, Any] = {}
            last_val: list[float] = []

            def on_start(info: dict[str, Any]) -> None:  # after set-up: errors before it stay one line
                for why in info["skipped"]:
                    err.print(
                        f"[bold yellow]warning:[/] {why}; resuming from {info['resumed_from']}",
                        highlight=False,
                        soft_wrap=True,
                    )
                resumed = f" resumed from {info['resumed_from']}" if info["resumed_from"] else ""
                out.print(
                    f"[bold]mupt scale[/] {cfg.model.arch_label} d_model={cfg.model.d_model} "
                    f"layers={cfg.model.n_layers} "
                    f"params={info['params']:,} {info['mode']} x{info['world']} {info['device']} {info['precision']} "
                    f"scan={info['scan_backend']} lr={cfg.train.lr:g} run_dir={recipe.launch.run_dir}{resumed}",
                    highlight=False,
                    soft_wrap=True,  # one line in logs (grep), however long
                )
                bar = progress(transient=True)  # the summary table replaces it
                stack.enter_context(bar)
                state["bar"] = bar
                state["task"] = bar.add_task("scale", total=cfg.train.steps, completed=info["start_step"], info="")

            def on_log(rec: dict[str, Any]) -> None:
                if "val_loss" in rec:
                    last_val.append(rec["val_loss"])
                if "loss" not in rec or "bar" not in state:
                    return
                val = f" val {last_val[-1]:.3f}" if last_val else ""
                info = f"loss {rec['loss']:.3f}{val} lr {rec['lr']:.3g} {rec['tokens_per_s']:,.0f} tok/s"
                state["bar"].update(state["task"], completed=rec["step"], info=info)

            result = launch.run(
                recipe, resume, on_log=on_log, on_start=on_start, reschedule=reschedule, on_health=on_health
            )
        run["ended"] = True
    if result.before_training:  # a signal during set-up: not one step trained, nothing written
        if rank == 0 and not launch.is_worker():  # under torchrun the launcher says it
            err.print(before_training_line(result.signal or signal.SIGTERM, run.get("dir")), highlight=False,
                      soft_wrap=True)  # fmt: skip
        if result.signal == signal.SIGINT:
            raise typer.Exit(130)
        return
    if rank == 0:
        _print_summary(result.summary(), bytes_per_token(cfg.data), result.already_finished)
        if result.already_finished:
            out.print(
                f"{recipe.launch.run_dir} already finished at step {result.steps} (checkpoint {result.checkpoint}): "
                f"nothing to train; summary.json keeps its results (train further: --steps N --reschedule)",
                highlight=False,
            )
    if result.status == "diverged":  # every rank sees it (the loss is averaged): a user error, said once
        kept = f"; last good checkpoint {result.checkpoint}" if result.checkpoint else ""
        raise DivergenceError(
            f"run diverged: {result.reason}{kept}; lower the recipe's lr (now {cfg.train.lr:g}) and rerun"
        )
    if result.status == "unhealthy":
        if rank == 0:
            err.print(
                f"stopped by --health-strict at step {result.steps}; checkpoint {result.checkpoint} written "
                "(resume with --no-health-strict to train on, or fix the recipe)",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(1)
    if result.status == "terminated" and rank == 0 and not (launch.is_worker() and os.getppid() == run.get("ppid")):
        # (a worker whose launcher is alive leaves the line to it: once, not once per process)
        interrupted = result.signal == signal.SIGINT
        what = "interrupted (Ctrl-C)" if interrupted else "terminated by"
        err.print(
            f"{what} {result.reason}; checkpoint {result.checkpoint} written; rerun to resume",
            highlight=False,
            soft_wrap=True,
        )
        if interrupted:
            raise typer.Exit(130)
