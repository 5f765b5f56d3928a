"""Post-hoc check of docs/tuning.md: would a proxy-width finalist at the LR extrapolated from ALL of rung 0's
COMPLETE trials (plus rung 1's two) land within 1% of the grid's best more often than the 16, 2, 1 ladder's
promoted finalist?  Per rung below the proxy, loss = c_r + e_r x + b x^2 (x = log2 LR, one curvature b), the
rung's optimum -e_r / 2b, a straight line through the optima against log2 d_model read at the proxy width
(clamped to one octave beyond the LRs measured); that LR is trained at the proxy width and compared with the
grid target stored in benchmarks/results/tune_efficiency.json.  Builtin corpus, seeds 0-4.

    python docs/experiments/tune_rung0_extrapolation.py     # ~4 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import tune_efficiency as te  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from mupt.config import with_overrides  # noqa: E402
from mupt.data import load_data  # noqa: E402
from mupt.train import Trainer  # noqa: E402
from mupt.tune import TuneSettings, run_study  # noqa: E402

args = argparse.Namespace(width=256, layers=2, steps=64, seq_len=64, eval_every=16)
res = json.loads((ROOT / "benchmarks/results/tune_efficiency.json").read_text())
tmp = tempfile.mkdtemp()
out = []
for corpus, data in (("builtin", "builtin"),):
    cfg = te.bench_proxy(args, data)
    target = res["corpora"][corpus]["target"]
    tokens = load_data(cfg.data)
    for seed in range(5):
        s = TuneSettings(
            study=f"s{seed}",
            trials=16,
            seed=seed,
            runs_dir=f"{tmp}/{corpus}",
            lr_range=(1e-5, 1.0),
            fidelity="width",
            pruner="asha",
            reduction=8,
        )
        lad = run_study(s, cfg)
        pts = []  # (rung, x, loss)
        widths = {}
        for rung, t in lad.trials():
            widths[rung.index] = rung.d_model
            if t.state is TrialState.COMPLETE:
                pts.append((rung.index, math.log2(t.params["lr"]), t.value))
        below = [r for r in sorted(widths) if r < max(widths)]
        # loss = c_r + e_r x + b x^2, shared b
        cols = 2 * len(below) + 1
        A, y = [], []
        for r, x, l in pts:
            if r not in below:
                continue
            row = [0.0] * cols
            k = below.index(r)
            row[2 * k], row[2 * k + 1], row[-1] = 1.0, x, x * x
            A.append(row)
            y.append(l)
        sol, *_ = np.linalg.lstsq(np.array(A), np.array(y), rcond=None)
        b = sol[-1]
        opt = {widths[r]: -sol[2 * below.index(r) + 1] / (2 * b) for r in below}
        ws = np.log2(list(opt))
        xs = np.array(list(opt.values()))
        slope, icpt = np.polyfit(ws, xs, 1)
        xp = icpt + slope * math.log2(256)
        measured = [x for _, x, _ in pts]
        xp_c = min(max(xp, min(measured) - 1), max(measured) + 1)
        top = [(x, l) for r, x, l in pts if r == max(widths)]
        r = Trainer(with_overrides(cfg, {"train.lr": 2**xp_c}), data=tokens).run()
        row = {
            "seed": seed,
            "b": b,
            "optima": opt,
            "slope": slope,
            "extrap": xp,
            "clamped": xp_c,
            "extrap_loss": r.final_val_loss,
            "promoted": top,
            "target": target,
            "extrap_ok": r.final_val_loss <= target,
            "promoted_ok": min(l for _, l in top) <= target,
        }
        print(json.dumps(row, default=float), flush=True)
        out.append(row)
(Path(__file__).parent / "tune_rung0_extrapolation.json").write_text(json.dumps(out, default=float, indent=1))
