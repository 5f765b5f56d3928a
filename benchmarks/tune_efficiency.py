"""How much compute does TPE + pruning need to find a good LR, compared with a dense log2 grid?

Baseline (measured in the same run): every power of two in [1e-5, 1] trained to the end on the
tiny proxy; its best final validation loss is L*.  Each searcher (TPE + ASHA, TPE + median,
TPE without pruning) runs a real Optuna study (journal storage, as ``mupt tune`` does) with
several sampler seeds; we count the trial-steps it spends until its first completed trial with
final loss <= (1 + tol) * L*, and report that as a fraction of the grid's trial-steps.

    python benchmarks/tune_efficiency.py            # ~3-5 minutes on 2 CPU cores
    python benchmarks/tune_efficiency.py --seeds 5 --max-trials 30
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from optuna.trial import TrialState

from mupt.config import with_overrides
from mupt.train import train
from mupt.tune import TuneSettings, lr_grid, proxy_config, run_study

BACKEND = "auto" if importlib.util.find_spec("mupt.scan.torch_scan") else "reference"


def tiny_proxy(steps: int, eval_every: int):
    return with_overrides(
        proxy_config(),
        {
            "model.d_model": 32, "model.n_layers": 1, "model.scan_backend": BACKEND,
            "train.steps": steps, "train.seq_len": 32, "train.eval_every": eval_every,
        },
    )  # fmt: skip


def dense_grid(cfg, low: float, high: float) -> tuple[list[dict], int]:
    rows, compute = [], 0
    for lr in lr_grid(low, high):
        r = train(with_overrides(cfg, {"train.lr": lr}))
        compute += r.steps
        rows.append({"lr": lr, "status": r.status, "loss": r.final_val_loss, "steps": r.steps})
    return rows, compute


def search_cost(cfg, pruner: str, seed: int, max_trials: int, target: float, workdir: Path) -> dict:
    s = TuneSettings(study=f"{pruner}-s{seed}", trials=max_trials, pruner=pruner, seed=seed, runs_dir=str(workdir))
    study = run_study(s, cfg)
    spent, reached_at, best = 0, None, None
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        spent += int(t.user_attrs.get("steps", 0))
        if t.state is TrialState.COMPLETE and (best is None or t.value < best[1]):
            best = (t.params["lr"], t.value)
        if reached_at is None and t.state is TrialState.COMPLETE and t.value <= target:
            reached_at = {"trial": t.number, "steps": spent, "lr": t.params["lr"], "loss": t.value}
    return {"pruner": pruner, "seed": seed, "total_steps": spent, "reached": reached_at, "best": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-trials", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--tol", type=float, default=0.01, help="within this fraction of the grid's best loss")
    ap.add_argument("--pruners", default="asha,median,none")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tune_efficiency.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = tiny_proxy(args.steps, args.eval_every)

    t0 = time.perf_counter()
    grid, grid_compute = dense_grid(cfg, 1e-5, 1.0)
    ok = [g for g in grid if g["loss"] is not None]
    best = min(ok, key=lambda g: g["loss"])
    target = best["loss"] * (1 + args.tol)
    grid_seconds = time.perf_counter() - t0

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for pruner in args.pruners.split(","):
            for seed in range(args.seeds):
                runs.append(search_cost(cfg, pruner, seed, args.max_trials, target, Path(tmp)))
    summary = {}
    print(f"dense log2 grid: {len(grid)} LRs x {args.steps} steps = {grid_compute} trial-steps ({grid_seconds:.0f}s); "
          f"best lr {best['lr']:.3g} loss {best['loss']:.4f}; target <= {target:.4f} (+{args.tol:.0%})")  # fmt: skip
    print(f"{'searcher':<14} {'seed':>4} {'steps to target':>16} {'fraction of grid':>17} {'lr found':>9} {'loss':>7}")
    for r in runs:
        hit = r["reached"]
        frac = hit["steps"] / grid_compute if hit else None
        r["fraction_of_grid"] = frac
        name = f"tpe+{r['pruner']}" if r["pruner"] != "none" else "tpe (no prune)"
        print(
            f"{name:<14} {r['seed']:>4} {hit['steps'] if hit else 'not reached':>16} "
            f"{f'{frac:.3f}' if frac is not None else '-':>17} {hit['lr'] if hit else float('nan'):>9.3g} "
            f"{hit['loss'] if hit else float('nan'):>7.4f}"
        )
    for pruner in args.pruners.split(","):
        fr = [r["fraction_of_grid"] for r in runs if r["pruner"] == pruner]
        hits = [f for f in fr if f is not None]
        summary[pruner] = {
            "reached": f"{len(hits)}/{len(fr)}",
            "median_fraction": statistics.median(hits) if hits else None,
            "mean_fraction": statistics.fmean(hits) if hits else None,
            "max_fraction": max(hits) if hits else None,
        }
        m = summary[pruner]
        print(
            f"  {pruner:<8} reached {m['reached']}; fraction of grid compute: median "
            f"{m['median_fraction'] if m['median_fraction'] is None else round(m['median_fraction'], 3)}, "
            f"max {m['max_fraction'] if m['max_fraction'] is None else round(m['max_fraction'], 3)}"
        )
    result = {
        "config": {"proxy": cfg.model_dump(mode="json"), **vars(args), "out": str(args.out), "backend": BACKEND},
        "grid": grid, "grid_compute": grid_compute, "grid_best": best, "target": target,
        "runs": runs, "summary": summary, "python": sys.version.split()[0], "torch": torch.__version__,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
