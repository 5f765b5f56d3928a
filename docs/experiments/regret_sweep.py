"""Transfer-regret sweep with an adaptive LR search per (scheme, width): the measurements of docs/transfer.md.

For one corpus and one set of overrides (a "factor"), this trains

1. the base width (d_model 64; sp, mup and mup-ssm are the same model there) on a half-octave LR grid,
2. at every wider width and every scheme, 3 LRs on the same half-octave lattice around a guess (the scheme's
   best at the previous width for mup and mup-ssm, that minus log2(width/previous width) for sp), extended by
   half an octave while the seed-mean argmin sits at an edge,

with every point run for every seed (same seeds, same data order across widths and schemes).  Points are
cached (mupt.check.lr_transfer.PointCache) under ``--cache``, so a rerun resumes; the raw points and the
regret table (mupt.check.lr_transfer.regret_table when available) are written to ``--out`` (JSON) after
every round, so nothing finished is lost.

Run from the repository root, one thread per worker, niced (the machine is shared):

    OMP_NUM_THREADS=1 nice -n 10 python docs/experiments/regret_sweep.py --data builtin --tag builtin \
        --out docs/experiments/regret-builtin.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import sys
import time
from typing import Any

from mupt.check.lr_transfer import PointCache, point_config, point_key, run_point
from mupt.config import RunConfig, Scheme, atomic_write_text, to_dict, with_overrides
from mupt.data import fit_vocab

HALF = 0.5


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "role_lr":
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def reusable(path: str, base_cfg: dict[str, Any]) -> dict[tuple[str, int, float, int], dict[str, Any]]:
    """Points of an earlier sweep JSON that this sweep would train identically, by (scheme, width, log2 LR, seed).

    The cache keys hash the whole config, so they change whenever a config field is added.  A file counts when
    its base config equals this sweep's on every field it has; the fields it lacks were added later with a
    default that reproduces the old behaviour (checked by rerunning a point: same loss to 4 decimals).
    """
    doc = json.loads(open(path, encoding="utf-8").read())
    old, new = flat(doc["base_config"]), flat(base_cfg)
    differ = sorted(k for k, v in old.items() if new.get(k, object()) != v)
    if differ:
        print(f"--reuse {path}: not reused, its config differs in {', '.join(differ)}", flush=True)
        return {}
    return {(p["scheme"], p["width"], round(p["log2_lr"], 6), p["seed"]): p for p in doc["points"]}


def sweep_base(data: str, steps: int, eval_batches: int, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The run config every regret experiment starts from (the default proxy on ``data``, torch scan)."""
    cfg = with_overrides(
        RunConfig(),
        {"data.source": data, "train.steps": steps, "train.eval_batches": eval_batches,
         "model.scan_backend": "torch", **(overrides or {})},
    )  # fmt: skip
    return fit_vocab(cfg)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


class Search:
    """Half-octave LR search for one (scheme, width): seed-mean argmin must be interior."""

    def __init__(self, scheme: str, width: int, start: list[float], max_points: int) -> None:
        self.scheme, self.width = scheme, width
        self.xs = sorted(set(start))
        self.max_points = max_points
        self.done = False

    def needed(self, losses: dict[float, float | None]) -> list[float]:
        missing = [x for x in self.xs if x not in losses]
        if missing:
            return missing
        finite = {x: v for x, v in losses.items() if x in self.xs and v is not None}
        if not finite:  # everything diverged: go lower
            nxt = min(self.xs) - HALF
        else:
            best = min(finite, key=lambda x: finite[x])
            if best == min(self.xs):
                nxt = best - HALF
            elif best == max(self.xs):
                nxt = best + HALF
            else:
                self.done = True
                return []
        if len(self.xs) >= self.max_points:
            self.done = True
            return []
        self.xs = sorted({*self.xs, nxt})
        return [nxt]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--schemes", default="mup-ssm,sp,mup")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-batches", type=int, default=64)
    ap.add_argument("--base-grid", default="-11,-6.5", help="log2 LR range of the base width, half-octave steps")
    ap.add_argument("--max-points", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (a factor)")
    ap.add_argument("--transfer-from", default="mup-ssm", help="scheme whose base optimum is transferred")
    ap.add_argument("--extra", default="", help="extra points after the base, WIDTH:SCHEME:LOG2LR,... (every seed)")
    ap.add_argument("--cache", default="runs/regret-cache")
    ap.add_argument("--reuse", nargs="*", default=[], help="earlier sweep JSONs: their points count as done")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    widths = sorted(int(w) for w in args.widths.split(","))
    base_w = widths[0]
    schemes = [s.strip() for s in args.schemes.split(",")]
    seeds = list(range(args.seeds))
    overrides = parse_overrides(args.set)
    base = sweep_base(args.data, args.steps, args.eval_batches, overrides)
    cache = PointCache(args.cache)
    reuse: dict[tuple[str, int, float, int], dict[str, Any]] = {}
    for path in args.reuse:
        reuse.update(reusable(path, to_dict(base)))
    points: dict[str, dict[str, Any]] = {}
    start = time.time()

    def cfg_for(scheme: str, width: int, x: float, seed: int) -> RunConfig:
        return point_config(base, Scheme(scheme), width, 2.0**x, seed, base_w)

    def losses_of(scheme: str, width: int) -> dict[float, float | None]:
        acc: dict[float, list[float | None]] = {}
        for p in points.values():
            if p["scheme"] == scheme and p["width"] == width:
                acc.setdefault(round(p["log2_lr"], 6), []).append(p["final_val_loss"])
        return {
            x: (mean([v for v in vs if v is not None]) if all(v is not None for v in vs) else None)
            for x, vs in acc.items()
            if len(vs) == len(seeds)
        }

    def write() -> None:
        doc: dict[str, Any] = {
            "tag": args.tag,
            "data": args.data,
            "overrides": overrides,
            "widths": widths,
            "schemes": schemes,
            "seeds": seeds,
            "steps": args.steps,
            "eval_tokens": args.eval_batches * base.train.batch_size * base.train.seq_len,
            "base_config": to_dict(base),
            "elapsed_s": round(time.time() - start, 1),
            "points": sorted(
                ({k: v for k, v in p.items() if k != "config"} for p in points.values()),
                key=lambda p: (p["scheme"], p["width"], p["log2_lr"], p["seed"]),
            ),
        }
        try:
            from mupt.check.regret import regret_table

            doc["regret"] = regret_table(doc["points"], args.transfer_from, base_w)
        except ImportError:
            pass
        atomic_write_text(args.out, json.dumps(doc, indent=1))

    ctx = mp.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx)

    def run_round(xs_by_search: list[tuple[str, int, list[float]]]) -> None:
        todo = []
        for scheme, width, xs in xs_by_search:
            for x in xs:
                for seed in seeds:
                    cfg = cfg_for(scheme, width, x, seed)
                    key = point_key(cfg)
                    rec = cache.get(key)
                    old = reuse.get((scheme, width, round(x, 6), seed))
                    if rec is None and old is not None:
                        rec = {**old, "key": key, "config": to_dict(cfg)}
                        cache.put(rec)
                    if rec is not None:
                        points[key] = rec
                    elif key not in points:
                        todo.append(cfg)
        todo.sort(key=lambda c: -c.model.d_model)  # widest first
        futs = [pool.submit(run_point, to_dict(c), 1) for c in todo]
        for fut in cf.as_completed(futs):
            rec = fut.result()
            cache.put(rec)
            points[rec["key"]] = rec
            loss = rec["final_val_loss"]
            print(f"[{time.time() - start:7.0f}s] {rec['scheme']:7s} w={rec['width']:4d} lr=2^{rec['log2_lr']:+.1f} "
                  f"seed={rec['seed']} {'diverged' if loss is None else f'{loss:.4f}'} ({rec['seconds']:.0f}s)",
                  flush=True)  # fmt: skip
        write()

    # 1. base width: a half-octave grid, extended while the optimum is at its edge (one scheme: they coincide
    #    at the base shape)
    lo, hi = (float(v) for v in args.base_grid.split(","))
    base_xs = [lo + HALF * i for i in range(int(round((hi - lo) / HALF)) + 1)]
    base_search = Search(args.transfer_from, base_w, base_xs, max_points=len(base_xs) + 4)
    need = base_search.xs
    while need:
        run_round([(args.transfer_from, base_w, need)])
        need = base_search.needed(losses_of(args.transfer_from, base_w))
    base_l = {x: v for x, v in losses_of(args.transfer_from, base_w).items() if v is not None}
    x_t = min(base_l, key=lambda x: base_l[x])
    print(f"base optimum 2^{x_t:+.1f} loss {base_l[x_t]:.4f}", flush=True)

    # 2. every wider width (narrowest first, so each width's regret is complete before the next starts)
    #    and every scheme there, in rounds
    #    The first guess of a scheme at width w follows its best at the previous width (the base optimum at the
    #    first wider width): unchanged for the µP schemes, minus log2 of the width ratio for sp (its Adam LR
    #    optimum falls like 1/width), so the search rarely has to extend.
    prev_w, prev_best = base_w, {s: x_t for s in schemes}
    for w in widths[1:]:
        searches = []
        for s in schemes:
            shift = HALF * round(math.log2(w / prev_w) / HALF) if s == "sp" else 0.0
            c = prev_best[s] - shift
            searches.append(Search(s, w, [c - HALF, c, c + HALF], args.max_points))
        pending = [(s.scheme, s.width, list(s.xs)) for s in searches]
        while pending:
            run_round(pending)
            pending = []
            for s in searches:
                if not s.done:
                    more = s.needed(losses_of(s.scheme, s.width))
                    if more:
                        pending.append((s.scheme, s.width, more))
        for s in searches:
            got = {x: v for x, v in losses_of(s.scheme, w).items() if v is not None}
            if got:
                prev_best[s.scheme] = min(got, key=lambda x: got[x])
        prev_w = w
    # 3. extra single points (e.g. the transferred setting and SP's expected best at a wider width)
    if args.extra:
        extra = [item.split(":") for item in args.extra.split(",")]
        run_round([(scheme, int(w_s), [float(x_s)]) for w_s, scheme, x_s in extra])
    pool.shutdown()
    write()
    print(f"done in {time.time() - start:.0f}s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
