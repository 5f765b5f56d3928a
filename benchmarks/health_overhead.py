"""What the live µP health probe costs a training run: one probe vs one optimizer step, same run.

For each width, the default proxy (``mupt.config``: 2 layers, d_state 16, batch 8 x seq 64, AdamW)
is built at that d_model; we time the median over ``--repeats`` of one optimizer step
(``Trainer.train_step``) and of one health probe (``mupt.check.coord.probe`` on the fixed
4 x 64-token batch plus ``probe_quantities`` against the init probe: what
``mupt.health.HealthProbe`` does every ``--health-every`` steps).  The result is the ratio
probe / step, and the overhead at ``--health-every`` N: ratio / N.  Ratios measured in one run
on one machine; absolute times on a shared machine are noise.

    python benchmarks/health_overhead.py            # widths 256,512,1024; 5 repeats
    python benchmarks/health_overhead.py --quick    # width 128, 2 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mupt.check.coord import probe, probe_quantities
from mupt.config import RunConfig, atomic_write_text, with_overrides
from mupt.health import PROBE_BATCH, PROBE_SEQ_LEN, probe_batch
from mupt.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def measure(width: int, repeats: int) -> dict[str, Any]:
    cfg = with_overrides(RunConfig(), {"model.d_model": width, "train.steps": 10_000})
    trainer = Trainer(cfg)
    batch = probe_batch(trainer, PROBE_BATCH, min(cfg.train.seq_len, PROBE_SEQ_LEN))
    before = probe(trainer, batch)
    trainer.train_step()  # warm-up
    steps, probes = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer.train_step()
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        probe_quantities(before, probe(trainer, batch), cfg.model.n_layers)
        probes.append(time.perf_counter() - t0)
    step, one = statistics.median(steps), statistics.median(probes)
    return {"d_model": width, "step_s": step, "probe_s": one, "probe_over_step": one / step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="256,512,1024")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "health_overhead.json"))
    args = ap.parse_args()
    widths = [128] if args.quick else [int(w) for w in args.widths.split(",")]
    repeats = 2 if args.quick else args.repeats
    torch.manual_seed(0)
    rows = [measure(w, repeats) for w in widths]
    print(f"{'d_model':>8} {'step s':>9} {'probe s':>9} {'probe/step':>11} {'every 10':>9} {'every 100':>10}")
    for r in rows:
        ratio = r["probe_over_step"]
        print(
            f"{r['d_model']:>8} {r['step_s']:>9.4f} {r['probe_s']:>9.4f} {ratio:>11.3f} {ratio / 10:>9.2%} "
            f"{ratio / 100:>10.3%}"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {
        "benchmark": "health_overhead",
        "threads": torch.get_num_threads(),
        "load_average_1min": load,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "repeats": repeats,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
