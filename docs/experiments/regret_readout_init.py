"""The readout-init factor of docs/transfer.md: µP-SSM with lm_head init std ∝ fan_in^-1/2 (as SP) instead of 1/fan_in.

At every width w of ``--widths`` (above the base) this trains ``--scheme`` at the transferred LR 2^``--log2-lr``
with lm_head's init multiplied by c = (w / base)^(1/2) and lm_head's Adam updates unchanged, for every seed, and
reports the regret against best(w) of an earlier regret sweep (``--sweep``, regret_sweep.py's JSON).

How, without a per-role init knob: ``param.output_mult`` = c multiplies the logits, so the model computes with the
effective readout c·W (init c times larger); ``param.role_lr`` = {lm_head: 1/c} makes W's Adam step 1/c, so the
effective readout's step is the rule's.  Adam is invariant to the gradient's scale (weight decay 0, eps 1e-8
negligible), so this is exactly the model whose lm_head init rule is r_u^-1/2 with the same LR rule.  At the base
width c = 1: the base model, hence the transferred LR, is unchanged.  ``--embedding-lr-exponent e`` also scales the
embedding's Adam LR by (w / base)^e (a candidate embedding rule r_u^e).

    OMP_NUM_THREADS=1 nice -n 10 python docs/experiments/regret_readout_init.py --data runs/data-licenses \
        --sweep docs/experiments/regret-licenses.json --out docs/experiments/regret-readout-init-licenses.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any

from mupt.check.lr_transfer import PointCache, point_config, point_key, run_point
from mupt.check.regret import regret_at
from mupt.config import Scheme, atomic_write_text, to_dict, with_overrides

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from regret_sweep import sweep_base  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--sweep", required=True, help="regret_sweep.py JSON of the same corpus: best(w) comes from it")
    ap.add_argument("--scheme", default="mup-ssm")
    ap.add_argument("--widths", default="64,256,512", help="the first is the base")
    ap.add_argument("--log2-lr", type=float, default=-7.5, help="the transferred LR (the base optimum)")
    ap.add_argument("--exponent", type=float, default=0.5, help="c = (w / base)^exponent")
    ap.add_argument("--embedding-lr-exponent", type=float, default=0.0, help="also embedding LR x (w / base)^this")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-batches", type=int, default=64)
    ap.add_argument("--cache", default="runs/regret-cache")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    widths = [int(w) for w in args.widths.split(",")]
    base_w = widths[0]
    base = sweep_base(args.data, args.steps, args.eval_batches)
    sweep = json.loads(open(args.sweep, encoding="utf-8").read())
    label = f"{args.scheme}+readout-init"
    cache = PointCache(args.cache)
    points: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    start = time.time()
    for w in widths[1:]:
        c = (w / base_w) ** args.exponent
        role_lr = {"lm_head": 1.0 / c}
        if args.embedding_lr_exponent:
            role_lr["embedding"] = (w / base_w) ** args.embedding_lr_exponent
        cfg0 = with_overrides(base, {"param.output_mult": c, "param.role_lr": role_lr})
        for seed in range(args.seeds):
            cfg = point_config(cfg0, Scheme(args.scheme), w, 2.0**args.log2_lr, seed, base_w)
            rec = cache.get(point_key(cfg))
            if rec is None:
                rec = run_point(to_dict(cfg), 1)
                cache.put(rec)
                print(f"[{time.time() - start:6.0f}s] w={w} c={c:.3f} seed={seed} {rec['final_val_loss']}", flush=True)
            points.append({k: v for k, v in rec.items() if k != "config"} | {"scheme": label, "c": c})
        mine = [p for p in points if p["width"] == w]
        # regret against the sweep's points at w plus this variant (it may be the new best)
        row = regret_at([*sweep["points"], *mine], w, label, args.log2_lr).to_dict()
        losses = [p["final_val_loss"] for p in mine]
        plain = [
            p["final_val_loss"]
            for p in sweep["points"]
            if p["scheme"] == args.scheme and p["width"] == w and math.isclose(p["log2_lr"], args.log2_lr)
        ]
        row |= {"c": c, "loss_std": statistics.stdev(losses) if len(losses) > 1 else None}
        if len(plain) == len(losses):
            d = [a - b for a, b in zip(losses, plain, strict=True)]
            row |= {"change_vs_rule": statistics.mean(d), "change_se": statistics.stdev(d) / math.sqrt(len(d))}
        rows.append(row)
        atomic_write_text(
            args.out,
            json.dumps(
                {"data": args.data, "sweep": args.sweep, "scheme": args.scheme, "log2_lr": args.log2_lr,
                 "exponent": args.exponent, "embedding_lr_exponent": args.embedding_lr_exponent, "widths": widths,
                 "rows": rows, "points": points,
                 "base_config": to_dict(base), "elapsed_s": round(time.time() - start, 1)},
                indent=1,
            ),
        )  # fmt: skip
        rule_txt = f"{statistics.mean(plain):.4f}" if plain else "not in the sweep"
        print(
            f"w={w}: loss {row['loss']:.4f} (rule: {rule_txt}), best {row['best_scheme']} "
            f"{row['best_loss']:.4f}, regret {row['regret_pct']:.2f}% ± {row['se_pct']:.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
