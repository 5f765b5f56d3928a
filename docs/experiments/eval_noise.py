"""Noise of one validation loss: over seeds, over evaluation batches, and of the difference two LRs make.

At `mupt check transfer`'s base (d_model 64, 120 steps; the default proxy's d_model 256 was left out: the
shared 2-core machine was too loaded), train 5 seeds at LR x and x/2 (x = 2^-9, near both optima on the
builtin corpus), then evaluate every run on
the same 128 fixed validation batches of 8 x 64 tokens (65,536 tokens) and report, for the first n batches:

* seed std: std over seeds of the n-batch mean (what a rerun with another seed moves);
* batch s.e.: std over batches / sqrt(n) within one run (what another draw of n validation batches moves);
* LR gap: mean over seeds of loss(x/2) - loss(x), with its seed std and its paired batch s.e.

Writes docs/experiments/eval_noise.json.  Run niced with OMP_NUM_THREADS=1 (a shared machine).
"""

from __future__ import annotations

import json
import statistics as st
import time
from typing import Any

import torch

from mupt.config import RunConfig, atomic_write_text, with_overrides
from mupt.train import Trainer, lm_loss

SEEDS = range(5)
NS = (2, 4, 8, 16, 32, 64, 128)
CASES = {"base-64-120steps": (64, 120)}


def per_batch(cfg: RunConfig) -> list[float]:
    t = Trainer(cfg)
    res = t.run()
    assert res.status == "ok", res.reason
    t.module.eval()
    with torch.no_grad():
        return [float(lm_loss(t.module(x), y)) for x, y in t.data.val_batches(max(NS), 8, 64)]


def main() -> None:
    torch.set_num_threads(1)
    out: dict[str, Any] = {"seeds": list(SEEDS), "batch_tokens": 8 * 64, "cases": {}}
    start = time.time()
    for name, (width, steps) in CASES.items():
        runs: dict[float, list[list[float]]] = {}
        for x in (-9.0, -10.0):
            runs[x] = []
            for seed in SEEDS:
                cfg = with_overrides(RunConfig(), {"model.d_model": width, "train.steps": steps, "train.lr": 2.0**x,
                                                   "train.seed": seed, "train.eval_every": steps,
                                                   "model.scan_backend": "torch"})  # fmt: skip
                runs[x].append(per_batch(cfg))
                print(f"[{time.time() - start:5.0f}s] {name} lr=2^{x:g} seed {seed} done", flush=True)
        rows = []
        for n in NS:
            means = {x: [st.mean(r[:n]) for r in rs] for x, rs in runs.items()}
            diffs = [[b - a for a, b in zip(r1[:n], r2[:n], strict=True)] for r1, r2 in zip(runs[-9.0], runs[-10.0],
                                                                                             strict=True)]
            rows.append({
                "batches": n,
                "tokens": n * 512,
                "mean_loss": st.mean(means[-9.0]),
                "seed_std": st.stdev(means[-9.0]),
                "batch_se": st.mean(st.stdev(r[:n]) / n**0.5 for r in runs[-9.0]),
                "lr_gap": st.mean(st.mean(d) for d in diffs),
                "lr_gap_seed_std": st.stdev(st.mean(d) for d in diffs),
                "lr_gap_batch_se": st.mean(st.stdev(d) / n**0.5 for d in diffs),
            })  # fmt: skip
        out["cases"][name] = {"width": width, "steps": steps, "rows": rows, "per_batch": {str(k): v for k, v in
                                                                                           runs.items()}}
        atomic_write_text("docs/experiments/eval_noise.json", json.dumps(out, indent=1))
    for name, case in out["cases"].items():
        print(name)
        print(" batches tokens  mean    seed_std batch_se  gap(x/2-x) gap_seed_std gap_batch_se")
        for r in case["rows"]:
            print(f" {r['batches']:7d} {r['tokens']:6d} {r['mean_loss']:.4f} {r['seed_std']:.4f}   {r['batch_se']:.4f}"
                  f"    {r['lr_gap']:+.4f}     {r['lr_gap_seed_std']:.4f}       {r['lr_gap_batch_se']:.4f}")


if __name__ == "__main__":
    main()
