"""How much compute does each searcher need to find a good LR, compared with a dense log2 grid? (FLOPs)

Baseline (measured in the same run): every power of two in the default LR range trained to the
end at the proxy width; its best final validation loss is L*.  Each searcher runs a real Optuna
study (journal storage, as ``mupt tune`` does) with several sampler seeds:

    grid       the dense log2 grid itself (fraction 1.0 by definition, listed for its wall time)
    tpe        TPE, every trial at the proxy width to the end      (--fidelity steps --pruner none)
    tpe+asha   TPE with successive-halving pruning on steps         (--fidelity steps --pruner asha)
    width      the default: rungs at d_model = proxy/8, /4, /2, proxy (--fidelity width)

We count the training FLOPs (trial-steps x FLOPs/token(width) x tokens/step, as recorded by the
study per trial, in the order trials finished) spent until the first trial AT THE PROXY WIDTH
that completes with final loss <= (1 + tol) * L*, and report it as a fraction of the grid's FLOPs.
Everything is repeated on a second corpus (a local text directory written from CPython's licence
file and the docstrings of its standard-library modules, not the builtin pydoc topics).

    python benchmarks/tune_efficiency.py                 # 5 seeds, 2 corpora: ~10-20 minutes on 2 CPU cores
    python benchmarks/tune_efficiency.py --seeds 8 --corpora builtin
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

import torch
from optuna.trial import TrialState

from mupt.config import RunConfig, with_overrides
from mupt.data import load_data
from mupt.train import Trainer
from mupt.tune import (
    LR_RANGE,
    TuneSettings,
    flops_per_trial_step,
    lr_grid,
    proxy_config,
    run_study,
)

BACKEND = "auto" if importlib.util.find_spec("mupt.scan.torch_scan") else "reference"

METHODS = {
    "tpe": {"fidelity": "steps", "pruner": "none"},
    "tpe+asha": {"fidelity": "steps", "pruner": "asha"},
    "width": {"fidelity": "width", "pruner": "asha"},  # the default of mupt tune: rungs of 16, 5, 2, 1 trials
    "width-r4": {"fidelity": "width", "pruner": "asha", "reduction": 4},  # rungs of 16, 4, 1, 1 trials
    "width-noprune": {"fidelity": "width", "pruner": "none"},
}


def bench_proxy(width: int, layers: int, steps: int, eval_every: int, data: str) -> RunConfig:
    return with_overrides(
        proxy_config(),
        {
            "model.d_model": width, "model.n_layers": layers, "model.scan_backend": BACKEND,
            "train.steps": steps, "train.seq_len": 32, "train.eval_every": eval_every, "data.source": data,
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
    cfg: RunConfig, method: str, seed: int, trials: int, target: float, workdir: Path, lr_range: tuple[float, float]
) -> dict:
    s = TuneSettings(
        study=f"{method}-s{seed}", trials=trials, seed=seed, runs_dir=str(workdir), lr_range=lr_range, **METHODS[method]
    )
    t0 = time.perf_counter()
    ladder = run_study(s, cfg)
    seconds = time.perf_counter() - t0
    done = [
        (t.datetime_complete, rung.index, t)
        for rung, t in ladder.trials()
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    done.sort(key=lambda x: (x[0], x[1], x[2].number))
    top = len(ladder.rungs) - 1
    spent, reached, best = 0.0, None, None
    for _, rung, t in done:
        spent += float(t.user_attrs.get("flops", 0.0))
        if rung != top or t.state is not TrialState.COMPLETE:
            continue
        if best is None or t.value < best[1]:
            best = (t.params["lr"], t.value)
        if reached is None and t.value <= target:
            reached = {"rung_trial": t.number, "flops": spent, "lr": t.params["lr"], "loss": t.value}
    return {
        "method": method, "seed": seed, "total_flops": spent, "reached": reached, "best": best, "seconds": seconds,
        "trials": len(done), "rungs": [[r.d_model, r.size] for r in ladder.rungs],
    }  # fmt: skip


def run_corpus(args: argparse.Namespace, corpus: str, data: str, workdir: Path) -> dict:
    cfg = bench_proxy(args.width, args.layers, args.steps, args.eval_every, data)
    lo, hi = (float(x) for x in args.lr_range.split(","))
    grid, gflops, gsec = dense_grid(cfg, lo, hi)
    ok = [g for g in grid if g["loss"] is not None]
    best = min(ok, key=lambda g: g["loss"])
    target = best["loss"] * (1 + args.tol)
    print(
        f"\n[{corpus}] dense log2 grid: {len(grid)} LRs x {args.steps} steps at d_model={args.width} = {gflops:.3g} "
        f"FLOPs ({gsec:.0f}s); best lr {best['lr']:.3g} loss {best['loss']:.4f}; target <= {target:.4f} "
        f"(+{args.tol:.0%})",
        flush=True,
    )
    print(f"{'method':<14} {'seed':>4} {'FLOPs to target':>16} {'of grid':>8} {'lr found':>9} {'loss':>7} {'s':>5}")
    runs = []
    for method in args.methods.split(","):
        trials = args.width_trials if METHODS[method]["fidelity"] == "width" else args.max_trials
        for seed in range(args.seeds):
            r = search_cost(cfg, method, seed, trials, target, workdir / corpus, (lo, hi))
            hit = r["reached"]
            r["fraction_of_grid"] = hit["flops"] / gflops if hit else None
            r["total_fraction"] = r["total_flops"] / gflops
            runs.append(r)
            frac = f"{r['fraction_of_grid']:.3f}" if hit else "-"
            spent = f"{hit['flops']:.3g}" if hit else "not reached"
            print(
                f"{method:<14} {seed:>4} {spent:>16} {frac:>8} "
                f"{hit['lr'] if hit else float('nan'):>9.3g} {hit['loss'] if hit else float('nan'):>7.4f} "
                f"{r['seconds']:>5.0f}",
                flush=True,
            )
    summary = {}
    for method in args.methods.split(","):
        fr = [r["fraction_of_grid"] for r in runs if r["method"] == method]
        hits = [f for f in fr if f is not None]
        # a seed that never reached the target counts as its whole spend (at least the grid) for the max
        worst = [f if f is not None else max(1.0, r["total_fraction"]) for f, r in
                 zip(fr, [r for r in runs if r["method"] == method], strict=True)]  # fmt: skip
        summary[method] = {
            "reached": f"{len(hits)}/{len(fr)}",
            "median_fraction": statistics.median(worst) if worst else None,
            "max_fraction": max(worst) if worst else None,
            "mean_total_fraction": statistics.fmean(r["total_fraction"] for r in runs if r["method"] == method),
            "mean_seconds": statistics.fmean(r["seconds"] for r in runs if r["method"] == method),
        }
    print(f"\n[{corpus}] {'method':<14} {'reached':>8} {'median':>7} {'max':>6} {'total spend':>12} {'s/seed':>7}")
    for method, m in summary.items():
        print(
            f"[{corpus}] {method:<14} {m['reached']:>8} {m['median_fraction']:>7.3f} {m['max_fraction']:>6.3f} "
            f"{m['mean_total_fraction']:>12.3f} {m['mean_seconds']:>7.1f}"
        )
    return {
        "data": data, "grid": grid, "grid_flops": gflops, "grid_seconds": gsec, "grid_best": best, "target": target,
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
                best = min((t for t in done if t.state is TrialState.COMPLETE), key=lambda t: t.value)
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--width", type=int, default=128, help="proxy d_model (rungs at /8, /4, /2)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--max-trials", type=int, default=20, help="trials of the proxy-width searchers")
    ap.add_argument("--width-trials", type=int, default=16, help="rung-0 trials of the width ladder")
    ap.add_argument(
        "--lr-range", default="1e-5,1", help="search range of every method and the grid (1e-5,1: the issue's grid)"
    )
    ap.add_argument("--tol", type=float, default=0.01, help="within this fraction of the grid's best loss")
    ap.add_argument("--methods", default="tpe,tpe+asha,width")
    ap.add_argument("--corpora", default="builtin,stdlib-docstrings")
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
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for corpus in args.corpora.split(","):
            data = "builtin" if corpus == "builtin" else str(second_corpus(Path(tmp)))
            results[corpus] = run_corpus(args, corpus, data, Path(tmp))
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.0f}s; load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    out = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "backend": BACKEND},
        "corpora": results, "wall_seconds": wall, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "python": sys.version.split()[0], "torch": torch.__version__,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
