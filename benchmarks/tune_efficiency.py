"""How much compute does each searcher need to find a good LR, compared with a dense log2 grid? (FLOPs)

Baseline (measured in the same run): every power of two in the default LR range trained to the
end at the proxy width; its best final validation loss is L*.  Each searcher runs a real Optuna
study (journal storage, as ``mupt tune`` does) with several sampler seeds:

    grid       the dense log2 grid itself (fraction 1.0 by definition, listed for its wall time)
    tpe        TPE, every trial at the proxy width to the end      (--fidelity steps --pruner none)
    tpe+asha   TPE with successive-halving pruning on steps         (--fidelity steps --pruner asha)
    width-fit  the default (--fidelity width, --finalist fit): 16 trials at d_model proxy/8 trained to the
               end, then one at the proxy width at the LR of rung 0's fitted parabola's vertex, moved by
               --lr-drift (width-fit-asha: the same with successive halving in rung 0)
    width      --finalist rank, reduction 3: 16, 5, 2, 1 trials at d_model proxy/8, /4, /2, proxy
    width-r8   reduction 8: 16 trials at proxy/8, the best 2 at proxy/4, the best 1 at the proxy (a proxy/2
               rung would take its only trial on: left out)
    width-r5x  reduction 5 (16, 3, 1) plus the drift-extrapolated finalist at the proxy width, run first
               (--extrapolate); the summary also gives it without either finalist

We count the training FLOPs (trial-steps x FLOPs/token(width) x tokens/step, as recorded by the
study per trial, in the order trials finished) spent until the first trial AT THE PROXY WIDTH
that completes with final loss <= (1 + tol) * L*, and report it as a fraction of the grid's FLOPs.
Everything is repeated on a second corpus (a local text directory written from CPython's licence
file and the docstrings of its standard-library modules, not the builtin pydoc topics).

The proxy is mupt tune's own (mupt.tune.proxy_config: d_model 256, 2 layers, 64 steps of 8 x 64
tokens) unless flags say otherwise.  The proxy-width searchers (tpe, tpe+asha) stop once they
reach the target (their "to target" is unchanged; pass --full-spend to run them to their budget);
the width ladders always run to the end.  Trials are deterministic (fixed seed, one thread), so
for a ladder with an extrapolated finalist the summary also gives the exact figures without it
("rank only") and without the rank finalist ("extrapolated only").  ``--drift`` also trains the
grid at every narrower rung width and reports where each width's optimum sits.

    python benchmarks/tune_efficiency.py --drift                 # everything: ~1.2 CPU-hours
    python benchmarks/tune_efficiency.py --grid-from benchmarks/results/tune_efficiency.json \
        --methods width --merge                                  # one method again, reusing the grids
    python benchmarks/tune_efficiency.py --grid-from benchmarks/results/tune_efficiency.json \
        --methods width,width-r8 --seed-list 5-9 --merge         # more seeds; the stored seeds 0-4 are kept
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from optuna.trial import TrialState

from mupt.config import RunConfig, to_dict, with_overrides
from mupt.data import load_data
from mupt.train import Trainer
from mupt.tune import (
    LR_RANGE,
    Progress,
    TuneSettings,
    flops_per_trial_step,
    lr_grid,
    obtained,
    open_ladder,
    proxy_config,
    run_study,
    rung_widths,
)

BACKEND = "auto" if importlib.util.find_spec("mupt.scan.torch_scan") else "reference"

METHODS: dict[str, dict[str, Any]] = {
    "tpe": {"fidelity": "steps", "pruner": "none"},
    "tpe+asha": {"fidelity": "steps", "pruner": "asha"},
    # the default: 16 trials at proxy/8 (no pruning), then 1 at the proxy at rung 0's fitted optimum moved by the drift
    "width-fit": {"fidelity": "width", "finalist": "fit"},
    # the same with successive halving in rung 0 (the first version of --finalist fit; not kept)
    "width-fit-asha": {"fidelity": "width", "pruner": "asha", "finalist": "fit"},
    # 16, 5, 2, 1 trials by rank
    "width": {"fidelity": "width", "pruner": "asha", "finalist": "rank", "reduction": 3},
    # 16, 2, 1 (no proxy/2 rung of one trial)
    "width-r8": {"fidelity": "width", "pruner": "asha", "finalist": "rank", "reduction": 8},
    # 16, 3, 1 + 1 drift-extrapolated
    "width-r5x": {"fidelity": "width", "pruner": "asha", "finalist": "rank", "reduction": 5, "extrapolate": True},
    "width-noprune": {"fidelity": "width", "pruner": "none", "finalist": "rank", "reduction": 3},
}


class Reached(Exception):
    """Raised from the progress callback to stop a proxy-width searcher once it reached the target."""


def bench_proxy(args: argparse.Namespace, data: str) -> RunConfig:
    return with_overrides(
        proxy_config(),
        {
            "model.d_model": args.width, "model.n_layers": args.layers, "model.scan_backend": BACKEND,
            "train.steps": args.steps, "train.seq_len": args.seq_len, "train.eval_every": args.eval_every,
            "data.source": data,
        },
    )  # fmt: skip


def second_corpus(root: Path) -> Path:
    """Text files from CPython's LICENSE and its stdlib modules' docstrings (not the pydoc topics)."""
    out = root / "stdlib-docstrings"
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lic = stdlib / "LICENSE.txt"
    if lic.is_file():
        (out / "LICENSE.txt").write_text(lic.read_text(encoding="utf-8", errors="replace"), encoding="utf-8")
    chunks = []
    for f in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    chunks.append(doc)
    (out / "docstrings.txt").write_text("\n\n".join(chunks), encoding="utf-8")
    return out


def dense_grid(cfg: RunConfig, low: float, high: float) -> tuple[list[dict], float, float]:
    tokens = load_data(cfg.data)
    per_step = flops_per_trial_step(cfg)
    rows, flops, t0 = [], 0.0, time.perf_counter()
    for lr in lr_grid(low, high):
        r = Trainer(with_overrides(cfg, {"train.lr": lr}), data=tokens).run()
        flops += r.steps * per_step
        rows.append({"lr": lr, "status": r.status, "loss": r.final_val_loss, "steps": r.steps})
    return rows, flops, time.perf_counter() - t0


def search_cost(
    cfg: RunConfig,
    method: str,
    seed: int,
    trials: int,
    target: float,
    workdir: Path,
    lr_range: tuple[float, float],
    stop: bool,
) -> dict:
    """Run one study; its finished trials in the order they finished (rung, state, FLOPs, loss, LR, origin)."""
    s = TuneSettings(
        study=f"{method}-s{seed}", trials=trials, seed=seed, runs_dir=str(workdir), lr_range=lr_range, **METHODS[method]
    )

    def check(p: Progress) -> None:
        if stop and p.best_value is not None and p.best_value <= target:
            raise Reached

    t0, load = time.perf_counter(), os.getloadavg()[0]
    try:
        run_study(s, cfg, on_progress=check)
        stopped = False
    except Reached:
        stopped = True
    seconds = time.perf_counter() - t0
    ladder = open_ladder(s, cfg)
    done = [
        (t.datetime_complete, rung.index, t)
        for rung, t in ladder.trials()
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    done.sort(key=lambda x: (x[0], x[1], x[2].number))
    seq = [
        {"rung": r, "d_model": ladder.rungs[r].d_model, "state": t.state.name, "flops": float(t.user_attrs["flops"]),
         "loss": t.value, "lr": t.params["lr"], "obtained": obtained(t, r)["obtained"]}
        for _, r, t in done
    ]  # fmt: skip
    fit = next((t.user_attrs["extrapolated"] for _, t in ladder.trials() if "extrapolated" in t.user_attrs), None)
    return {
        "method": method, "seed": seed, "seconds": seconds, "stopped_at_target": stopped, "loadavg": load,
        "rungs": [[r.d_model, r.size] for r in ladder.rungs], "top": len(ladder.rungs) - 1, "trials": seq,
        "drift_fit": fit,
    }  # fmt: skip


def to_target(run: dict, target: float, grid_flops: float, skip: str | None = None) -> dict:
    """FLOPs until the first proxy-width trial with loss <= target, as a fraction of the grid's; None if never.

    ``skip``: leave out the proxy-width trials obtained that way ("extrapolated" or "promoted"; or
    "promoted-if-extrapolated": the promoted ones only when an extrapolated one ran), which gives
    the same study without that finalist (trials are deterministic, so the others are unchanged).
    """
    spent, reached, best = 0.0, None, None
    if skip == "promoted-if-extrapolated":
        skip = "promoted" if any(t["obtained"] == "extrapolated" for t in run["trials"]) else None
    for t in run["trials"]:
        if t["rung"] == run["top"] and t["obtained"] == skip:
            continue
        spent += t["flops"]
        if t["rung"] != run["top"] or t["state"] != "COMPLETE":
            continue
        if best is None or t["loss"] < best[1]:
            best = (t["lr"], t["loss"])
        if reached is None and t["loss"] <= target:
            reached = {"flops": spent, "lr": t["lr"], "loss": t["loss"], "obtained": t["obtained"]}
    return {
        "reached": reached, "fraction_of_grid": reached["flops"] / grid_flops if reached else None,
        "total_fraction": spent / grid_flops, "best": best,
    }  # fmt: skip


def variants(method: str) -> list[tuple[str, str | None]]:
    """(row name, skip) of a method's summary rows: an extrapolating ladder also gives its rank-only and
    extrapolated-only figures.  A method stored in --grid-from's file but no longer defined here (width-r8-tie:
    docs/tuning.md) is summarized as it stands."""
    if METHODS.get(method, {}).get("extrapolate"):
        return [
            (method, None), (f"{method}:rank-only", "extrapolated"), (f"{method}:extrap-only", "promoted"),
            (f"{method}:extrap-else-rank", "promoted-if-extrapolated"),
        ]  # fmt: skip
    return [(method, None)]


def summarize(runs: list[dict], target: float, grid_flops: float) -> dict:
    summary = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        for name, skip in variants(method):
            mine = [r for r in runs if r["method"] == method]
            res = [to_target(r, target, grid_flops, skip) for r in mine]
            # a seed that never reached the target counts as its whole spend, at least the grid
            worst = [x["fraction_of_grid"] if x["reached"] else max(1.0, x["total_fraction"]) for x in res]
            summary[name] = {
                "reached": f"{sum(x['reached'] is not None for x in res)}/{len(res)}",
                "fractions": [x["fraction_of_grid"] for x in res],
                "median_fraction": statistics.median(worst), "max_fraction": max(worst),
                "mean_total_fraction": None if any(r["stopped_at_target"] for r in mine)
                else statistics.fmean(x["total_fraction"] for x in res),
                "mean_seconds": statistics.fmean(r["seconds"] for r in mine),
            }  # fmt: skip
    return summary


def drift(cfg: RunConfig, low: float, high: float) -> dict:
    """The dense grid at every rung width below the proxy (under the proxy's base shape) and each width's optimum:
    log2 LR at the vertex of the parabola through the best grid point and its two neighbours."""
    out = {}
    base = cfg.param.base_d_model or cfg.model.d_model
    for w in rung_widths(cfg.model.d_model)[:-1]:
        rows, flops, sec = dense_grid(with_overrides(cfg, {"model.d_model": w, "param.base_d_model": base}), low, high)
        out[str(w)] = {"grid": rows, "grid_flops": flops, "grid_seconds": sec}
        print(f"  drift grid d_model={w}: {sec:.0f}s, log2 LR optimum {vertex(rows):+.2f}", flush=True)
    return out


def vertex(rows: list[dict]) -> float:
    """log2 LR of the parabola's vertex through the best grid point and its neighbours (log2 grid)."""
    import math

    ok = [r for r in rows if r["loss"] is not None]
    i = min(range(len(ok)), key=lambda k: ok[k]["loss"])
    x = math.log2(ok[i]["lr"])
    if i == 0 or i == len(ok) - 1:
        return x
    lo, mid, hi = ok[i - 1]["loss"], ok[i]["loss"], ok[i + 1]["loss"]
    return x + 0.5 * (lo - hi) / (lo - 2 * mid + hi)


def same_setup(a: dict, b: dict) -> bool:
    keys = ("width", "layers", "steps", "seq_len", "eval_every", "lr_range")
    return all(a.get(k) == b.get(k) for k in keys)


def seed_list(args: argparse.Namespace) -> list[int]:
    """``--seed-list`` ("5-9", "0,3,7") or else ``range(--seeds)``."""
    if not args.seed_list:
        return list(range(args.seeds))
    out: list[int] = []
    for part in args.seed_list.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def run_corpus(args: argparse.Namespace, corpus: str, data: str, workdir: Path, old: dict | None) -> dict:
    """The grid (or the one in ``old``), then every method and seed; with --merge, ``old`` runs of the
    (method, seed)s not run now are kept."""
    cfg = bench_proxy(args, data)
    lo, hi = (float(x) for x in args.lr_range.split(","))
    if old is not None and "grid" in old:
        grid, gflops, gsec = old["grid"], old["grid_flops"], old["grid_seconds"]
        print(f"\n[{corpus}] grid reused from {args.grid_from}", flush=True)
    else:
        grid, gflops, gsec = dense_grid(cfg, lo, hi)
    ok = [g for g in grid if g["loss"] is not None]
    best = min(ok, key=lambda g: g["loss"])
    target = best["loss"] * (1 + args.tol)
    proxy_trial = args.steps * flops_per_trial_step(cfg)
    print(
        f"[{corpus}] dense log2 grid: {len(grid)} LRs x {args.steps} steps at d_model={args.width} = {gflops:.3g} "
        f"FLOPs = {gflops / proxy_trial:.2f} proxy trials ({gsec:.0f}s); best lr {best['lr']:.3g} loss "
        f"{best['loss']:.4f}, log2 LR optimum {vertex(grid):+.2f}; target <= {target:.4f} (+{args.tol:.0%})",
        flush=True,
    )
    widths = old.get("drift") if old is not None else None
    if args.drift and not widths:
        widths = drift(cfg, lo, hi)
    print(f"{'method':<14} {'seed':>4} {'to target':>10} {'lr found':>9} {'loss':>7} {'spend':>6} {'s':>5}")
    methods = args.methods.split(",")
    seeds = seed_list(args)
    now = {(m, s) for m in methods for s in seeds}
    runs = [r for r in (old or {}).get("runs", []) if (r["method"], r["seed"]) not in now and args.merge]
    for method in methods:
        trials = args.width_trials if METHODS[method]["fidelity"] == "width" else args.max_trials
        stop = METHODS[method]["fidelity"] != "width" and not args.full_spend
        for seed in seeds:
            r = search_cost(cfg, method, seed, trials, target, workdir / corpus, (lo, hi), stop)
            runs.append(r)
            x = to_target(r, target, gflops)
            hit = x["reached"]
            print(
                f"{method:<14} {seed:>4} {x['fraction_of_grid'] if hit else float('nan'):>10.3f} "
                f"{hit['lr'] if hit else float('nan'):>9.3g} {hit['loss'] if hit else float('nan'):>7.4f} "
                f"{x['total_fraction']:>6.3f} {r['seconds']:>5.0f}"
                + (f"  fit {r['drift_fit']}" if r["drift_fit"] else ""),
                flush=True,
            )
    summary = summarize(runs, target, gflops)
    print(f"\n[{corpus}] {'method':<24} {'reached':>8} {'median':>7} {'max':>6} {'spend':>6} {'s/seed':>7}")
    for name, m in summary.items():
        spend = f"{m['mean_total_fraction']:.3f}" if m["mean_total_fraction"] is not None else "(stop)"
        print(
            f"[{corpus}] {name:<24} {m['reached']:>8} {m['median_fraction']:>7.3f} {m['max_fraction']:>6.3f} "
            f"{spend:>6} {m['mean_seconds']:>7.1f}"
        )
    return {
        "data": data, "grid": grid, "grid_flops": gflops, "grid_seconds": gsec, "grid_best": best, "target": target,
        "grid_optimum_log2_lr": vertex(grid), "proxy_trial_flops": proxy_trial, "drift": widths,
        "runs": runs, "summary": summary, "lr_range": [lo, hi], "default_lr_range": LR_RANGE["adam"],
    }  # fmt: skip


def range_usage(args: argparse.Namespace) -> dict:
    """Issue 14 item 12: how many of a default study's trials land near plausible LRs, per LR range.

    The README proxy at d_model 64 (2 layers, 64 steps of 8 x 64 bytes), ``--fidelity steps`` with
    TPE + ASHA and 16 trials (the setting of the original report), several seeds per range.
    "Near" = within one octave of the best LR the study found.
    """
    import math

    cfg = with_overrides(proxy_config(), {"model.d_model": 64, "model.scan_backend": BACKEND})
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.usage_ranges.split(":"):
            lo, hi = (float(x) for x in text.split(","))
            rows = []
            for seed in range(args.usage_seeds):
                s = TuneSettings(study=f"u{seed}", trials=16, seed=seed, runs_dir=f"{tmp}/{text}", lr_range=(lo, hi),
                                 fidelity="steps", pruner="asha")  # fmt: skip
                trials = run_study(s, cfg).study.get_trials(deepcopy=False)
                done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
                ok = [t for t in done if t.state is TrialState.COMPLETE and t.value is not None]
                best = min(ok, key=lambda t: float(t.value or 0.0))
                rows.append({
                    "seed": seed, "complete": sum(t.state is TrialState.COMPLETE for t in done),
                    "diverged": sum(t.user_attrs.get("status") == "diverged" for t in done),
                    "pruned": sum(t.user_attrs.get("status") == "pruned" for t in done),
                    "near_best": sum(abs(math.log2(t.params["lr"] / best.params["lr"])) <= 1 for t in done),
                    "best_lr": best.params["lr"], "best_loss": best.value,
                })  # fmt: skip
            out[text] = rows
            mean = {k: statistics.fmean(r[k] for r in rows) for k in ("complete", "diverged", "pruned", "near_best")}
            print(
                f"LR range {text:>12}: of 16 trials, mean complete {mean['complete']:.1f}, diverged "
                f"{mean['diverged']:.1f}, pruned {mean['pruned']:.1f}, within an octave of the best "
                f"{mean['near_best']:.1f}; best losses {[round(r['best_loss'], 3) for r in rows]}",
                flush=True,
            )
    return out


def main() -> None:
    proxy = proxy_config()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed-list", default="", help="seeds to run instead of 0..SEEDS-1, e.g. 5-9 or 0,3")
    ap.add_argument("--width", type=int, default=proxy.model.d_model, help="proxy d_model (rungs at /8, /4, /2)")
    ap.add_argument("--layers", type=int, default=proxy.model.n_layers)
    ap.add_argument("--steps", type=int, default=proxy.train.steps)
    ap.add_argument("--seq-len", type=int, default=proxy.train.seq_len)
    ap.add_argument("--eval-every", type=int, default=proxy.train.eval_every)
    ap.add_argument("--max-trials", type=int, default=20, help="trials of the proxy-width searchers")
    ap.add_argument("--width-trials", type=int, default=16, help="rung-0 trials of the width ladder")
    ap.add_argument(
        "--lr-range", default="1e-5,1", help="search range of every method and the grid (1e-5,1: the issue's grid)"
    )
    ap.add_argument("--tol", type=float, default=0.01, help="within this fraction of the grid's best loss")
    ap.add_argument("--methods", default="tpe,tpe+asha,width-fit,width,width-r8,width-r5x")
    ap.add_argument("--corpora", default="builtin,stdlib-docstrings")
    ap.add_argument("--full-spend", action="store_true", help="run tpe and tpe+asha to their budget (no stop)")
    ap.add_argument("--drift", action="store_true", help="also the grid at each narrower rung width")
    ap.add_argument("--grid-from", type=Path, help="reuse the grids of this earlier result file (same setup)")
    ap.add_argument("--merge", action="store_true", help="keep --grid-from's runs of the (method, seed)s not run now")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tune_efficiency.json")
    ap.add_argument("--usage-ranges", default="", help="e.g. 1e-5,1:1e-4,0.1 -> only the LR-range usage measurement")
    ap.add_argument("--usage-seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.usage_ranges:
        t0, load0 = time.perf_counter(), os.getloadavg()
        usage = range_usage(args)
        wall = time.perf_counter() - t0
        print(f"wall time {wall:.0f}s; load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
        path = args.out.with_name("tune_lr_range.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"ranges": usage, "wall_seconds": wall, "loadavg_start": load0}, indent=1))
        print(f"wrote {path}")
        return
    previous: dict = {}
    if args.grid_from is not None:
        prev = json.loads(args.grid_from.read_text())
        if not same_setup(prev["config"], vars(args)):
            raise SystemExit(f"--grid-from {args.grid_from}: measured with another proxy or LR range")
        previous = prev["corpora"]
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for corpus in args.corpora.split(","):
            data = "builtin" if corpus == "builtin" else str(second_corpus(Path(tmp)))
            results[corpus] = run_corpus(args, corpus, data, Path(tmp), previous.get(corpus))
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.0f}s; load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    out = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "backend": BACKEND},
        "proxy": to_dict(bench_proxy(args, "builtin")),
        "corpora": results, "wall_seconds": wall, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "python": sys.version.split()[0], "torch": torch.__version__,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
