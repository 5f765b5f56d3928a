"""Which role's LR is off: one role group's LR scaled by 2^k at two widths, the factor study of docs/transfer.md.

For every role group g and every k in ``--ks``, this trains ``--scheme`` at the global LR 2^``--log2-lr`` (the
base width's optimum: the transferred setting) with ``param.role_lr`` = {every role of g: 2^k} at every width of
``--widths``, for every seed (same seeds and data order as the regret sweep; k = 0 is the transferred point
itself); a group named output_mult, embedding_mult or init_scale scales that µP multiplier (ParamConfig)
instead.  The width rules say each role's best multiplier is the same at every width; a group whose best k moves
between the widths is one whose rule costs loss at the wider one.

Per (group, width) it reports the seed-mean loss at each k, the paired change against k = 0 (same seed: the
common noise cancels) ± its seed standard error, and the best k (the vertex of the parabola through the three
seed means when k = -1, 0, +1 are measured, clipped to the measured range).  Points are cached like the regret
sweep's (``--cache``; ``--reuse`` takes its JSON for the k = 0 points) and the JSON is written after every
(group, width), so nothing finished is lost.

    OMP_NUM_THREADS=1 nice -n 10 python docs/experiments/regret_roles.py --reuse docs/experiments/regret-builtin.json \
        --out docs/experiments/regret-roles-builtin.json
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
from mupt.config import Scheme, atomic_write_text, to_dict, with_overrides

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from regret_sweep import reusable, sweep_base  # noqa: E402

GROUPS: dict[str, list[str]] = {
    "vector-like": ["norm", "conv1d_weight", "conv1d_bias", "dt_bias", "A_log", "D"],
    "embedding": ["embedding"],
    "readout": ["lm_head"],
    "hidden": ["in_proj", "out_proj"],
    "dt path": ["x_proj_dt", "dt_proj"],
    "B/C rows": ["x_proj_B", "x_proj_C"],
}
#: the µP multipliers (ParamConfig), the same at every width: a "group" of these scales one of them by 2^k
MULTIPLIERS = ("output_mult", "embedding_mult", "init_scale")


def best_k(ks: list[float], losses: list[float]) -> float:
    """Vertex of the parabola through (k, loss) for k = -1, 0, 1 (clipped to [-1, 1]); else the argmin."""
    if ks == [-1.0, 0.0, 1.0]:
        lm, l0, lp = losses
        curv = lm - 2 * l0 + lp
        if curv > 0:
            return max(-1.0, min(1.0, 0.5 * (lm - lp) / curv))
    return ks[min(range(len(ks)), key=lambda i: losses[i])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--scheme", default="mup-ssm")
    ap.add_argument("--widths", default="64,128")
    ap.add_argument("--log2-lr", type=float, default=-7.5, help="global LR: the base width's optimum")
    ap.add_argument("--ks", default="-1,1", help="log2 of the role-group LR factor (0 is always included)")
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-batches", type=int, default=64)
    ap.add_argument("--cache", default="runs/regret-cache")
    ap.add_argument("--reuse", nargs="*", default=[], help="regret sweep JSONs: their k = 0 points count as done")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    widths = sorted(int(w) for w in args.widths.split(","))
    ks = sorted({0.0, *(float(k) for k in args.ks.split(","))})
    groups = [g.strip() for g in args.groups.split(",")]
    seeds = list(range(args.seeds))
    base = sweep_base(args.data, args.steps, args.eval_batches)
    cache = PointCache(args.cache)
    reuse: dict[tuple[str, int, float, int], dict[str, Any]] = {}
    for path in args.reuse:
        reuse.update(reusable(path, to_dict(base)))
    points: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    start = time.time()

    def point(group: str, k: float, width: int, seed: int) -> dict[str, Any]:
        if k == 0:
            cfg = base
        elif group in MULTIPLIERS:
            cfg = with_overrides(base, {f"param.{group}": 2.0**k})
        else:
            cfg = with_overrides(base, {"param.role_lr": {r: 2.0**k for r in GROUPS[group]}})
        cfg = point_config(cfg, Scheme(args.scheme), width, 2.0**args.log2_lr, seed, widths[0])
        key = point_key(cfg)
        rec = cache.get(key)
        old = reuse.get((args.scheme, width, round(args.log2_lr, 6), seed)) if k == 0 else None
        if rec is None and old is not None:
            rec = {**old, "key": key, "config": to_dict(cfg)}
            cache.put(rec)
        if rec is None:
            rec = run_point(to_dict(cfg), 1)
            cache.put(rec)
            loss = rec["final_val_loss"]
            print(f"[{time.time() - start:6.0f}s] {group:11s} k={k:+.1f} w={width:4d} seed={seed} "
                  f"{'diverged' if loss is None else f'{loss:.4f}'} ({rec['seconds']:.0f}s)", flush=True)  # fmt: skip
        return {k2: v for k2, v in rec.items() if k2 != "config"} | {"group": group, "k": k}

    def write() -> None:
        doc = {
            "data": args.data, "scheme": args.scheme, "log2_lr": args.log2_lr, "widths": widths, "ks": ks,
            "groups": {g: GROUPS.get(g, [f"param.{g}"]) for g in groups}, "seeds": seeds, "steps": args.steps,
            "eval_tokens": args.eval_batches * base.train.batch_size * base.train.seq_len,
            "base_config": to_dict(base), "elapsed_s": round(time.time() - start, 1), "rows": rows, "points": points,
        }  # fmt: skip
        atomic_write_text(args.out, json.dumps(doc, indent=1))

    for group in groups:
        for width in widths:
            by_k = {k: [point(group, k, width, s) for s in seeds] for k in ks}
            points.extend(p for k in ks for p in by_k[k] if k != 0 or group == groups[0])
            loss = {k: [p["final_val_loss"] for p in by_k[k]] for k in ks}
            ok = {k: v for k, v in loss.items() if all(x is not None for x in v)}
            means = {k: statistics.mean(v) for k, v in ok.items()}
            delta = {}
            for k, v in ok.items():
                if k == 0:
                    continue
                d = [a - b for a, b in zip(v, ok[0], strict=True)]
                delta[k] = {"mean": statistics.mean(d), "se": statistics.stdev(d) / math.sqrt(len(d))}
            rows.append({
                "group": group, "width": width, "mean": {str(k): m for k, m in means.items()},
                "delta_vs_k0": {str(k): v for k, v in delta.items()},
                "diverged_k": [k for k in ks if k not in ok],
                "best_k": best_k(sorted(means), [means[k] for k in sorted(means)]) if 0 in means else None,
            })  # fmt: skip
            write()
    for g in groups:
        bk = {r["width"]: r["best_k"] for r in rows if r["group"] == g}
        cells = ", ".join(f"{w}: {'-' if v is None else f'{v:+.2f}'}" for w, v in bk.items())
        print(f"{g:11s} best k by width: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
