"""Markdown tables of a regret sweep (docs/experiments/regret_sweep.py's JSON): losses and the regret rows.

    python docs/experiments/regret_report.py docs/experiments/regret-builtin.json
    python docs/experiments/regret_report.py docs/experiments/regret-builtin-480.json \
        docs/experiments/regret-builtin-480-mup.json

Several sweep JSONs of the same corpus, length and seeds (e.g. a scheme added later with ``--reuse``) are merged
point by point: (scheme, width, log2 LR, seed) once, the first file's header.

Prints, per width, the seed-mean final validation loss (nats/token) of every scheme at every LR measured
(± seed std, best per width in bold), then the regret of the transferred setting (mupt.check.regret).
Partial sweeps are fine: a width whose transferred point is not finished shows as not measured.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from typing import Any

from mupt.check.regret import regret_by_width


def known(v: list[float | None]) -> list[float]:
    """The finite losses of a point's seeds (a diverged seed is None)."""
    return [x for x in v if x is not None]


def loss_table(acc: dict[tuple[int, str, float], list[float | None]], seeds: int, scheme: str, base: int) -> str:
    """Markdown: one row per (width, LR), one column per scheme, seed mean ± std; the best at each width in bold."""
    schemes = sorted({k[1] for k in acc}, key=lambda s: (s != scheme, s))
    bl = {k[2]: statistics.mean(known(v)) for k, v in acc.items() if k[0] == base and k[1] == scheme and None not in v}
    x_t = min(bl, key=lambda x: (bl[x], x)) if bl else None
    lines = ["| d_model | LR | " + " | ".join(schemes) + " |", "|---:|---:|" + "---:|" * len(schemes)]
    for w in sorted({k[0] for k in acc}):
        full = {k: v for k, v in acc.items() if k[0] == w and len(v) == seeds and None not in v}
        best = min(full, key=lambda k: statistics.mean(known(full[k]))) if full else None
        for x in sorted({k[2] for k in full}):
            cells = []
            for s in schemes:
                v = full.get((w, s, x))
                if v is None:
                    cells.append("same model" if w == base and s != scheme else "")
                    continue
                txt = f"{statistics.mean(known(v)):.4f} ± {statistics.stdev(known(v)):.3f}"
                cells.append(f"**{txt}**" if (w, s, x) == best else txt)
            mark = " (transferred)" if x == x_t and w != base else ""
            lines.append(f"| {w}{' (base)' if w == base else ''} | 2^{x:g}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def factor_table(doc: dict[str, Any]) -> str:
    """Markdown of a regret_roles.py JSON: per (group, width) the seed-mean loss at each k, the paired change
    against k = 0 ± seed s.e. (nats/token) and the best k (parabola vertex, clipped to the measured k)."""
    ks = [k for k in doc["ks"] if k != 0]
    head = "| group | d_model | loss at k = 0 | " + " | ".join(f"change at k = {k:+g}" for k in ks) + " | best k |"
    lines = [head, "|:---|---:|---:|" + "---:|" * len(ks) + "---:|"]
    for r in doc["rows"]:
        d = r["delta_vs_k0"]
        cells = [f"{d[str(k)]['mean']:+.4f} ± {d[str(k)]['se']:.4f}" if str(k) in d else "diverged" for k in ks]
        bk = "-" if r["best_k"] is None else f"{r['best_k']:+.2f}"
        lines.append(f"| {r['group']} | {r['width']} | {r['mean']['0.0']:.4f} | " + " | ".join(cells) + f" | {bk} |")
    return "\n".join(lines)


def variant_table(doc: dict[str, Any]) -> str:
    """Markdown of a regret_readout_init.py JSON: per width the variant's loss, its paired change against the rule's
    transferred setting (nats/token ± seed s.e.) and its regret against best(w) (%, ± seed s.e.)."""
    lines = [
        "| d_model | lm_head init x c | embedding LR x | loss | change vs the rule | best (w) | regret % | ± s.e. |",
        "|---:|---:|---:|---:|---:|:---|---:|---:|",
    ]
    e = doc.get("embedding_lr_exponent", 0.0)
    base = doc["widths"][0]
    for r in doc["rows"]:
        emb = f"{(r['width'] / base) ** e:.3f}" if e else "1"
        change = f"{r['change_vs_rule']:+.4f} ± {r['change_se']:.4f}" if "change_vs_rule" in r else "rule not swept"
        lines.append(
            f"| {r['width']} | {r['c']:.3f} | {emb} | {r['loss']:.4f} | {change} "
            f"| {r['best_scheme']} at 2^{r['best_log2_lr']:g}: {r['best_loss']:.4f} | **{r['regret_pct']:.2f}** "
            f"| {r['se_pct']:.2f} |"
        )
    return "\n".join(lines)


def merged(paths: list[str]) -> dict[str, Any]:
    """The first sweep JSON with the points of all of them, each (scheme, width, log2 LR, seed) once.

    Raises SystemExit when the files differ in steps, seeds or validation tokens (not the same measurement)."""
    docs = [json.loads(open(p, encoding="utf-8").read()) for p in paths]
    doc = docs[0]
    same = ("steps", "seeds", "eval_tokens")
    for p, d in zip(paths[1:], docs[1:], strict=True):
        if "points" not in d or any(d[k] != doc[k] for k in same):
            raise SystemExit(f"{p}: not the same measurement as {paths[0]} ({', '.join(same)} differ)")
    points: dict[tuple[str, int, float, int], dict[str, Any]] = {}
    for d in docs:
        for pt in d["points"]:
            points.setdefault((pt["scheme"], pt["width"], round(pt["log2_lr"], 6), pt["seed"]), pt)
    return {**doc, "points": list(points.values())}


def main(paths: list[str]) -> None:
    doc = merged(paths)
    if "exponent" in doc:  # a regret_readout_init.py variant
        print(variant_table(doc))
        return
    if "rows" in doc:  # a regret_roles.py factor study
        print(factor_table(doc))
        return
    points = doc["points"]
    scheme = doc.get("transfer_from", "mup-ssm")
    seeds = len(doc["seeds"])
    acc: dict[tuple[int, str, float], list[float | None]] = defaultdict(list)
    for p in points:
        acc[(p["width"], p["scheme"], p["log2_lr"])].append(p["final_val_loss"])
    print(f"{doc['tag']}: {doc['steps']} steps, {seeds} seeds, {doc['eval_tokens']} validation tokens, "
          f"{len(points)} runs, overrides {doc['overrides'] or 'none'}\n")  # fmt: skip
    for w in sorted({k[0] for k in acc}):
        full = {k: v for k, v in acc.items() if k[0] == w and len(v) == seeds}
        if not full:
            continue
        ok = {k: v for k, v in full.items() if all(x is not None for x in v)}
        best = min(ok, key=lambda k: statistics.mean(known(ok[k]))) if ok else None
        cells = []
        for k in sorted(full, key=lambda k: (k[1], k[2])):
            v = full[k]
            if k not in ok:
                cells.append(f"{k[1]} 2^{k[2]:g}: diverged")
                continue
            m, sd = statistics.mean(known(v)), statistics.stdev(known(v)) if len(v) > 1 else 0.0
            txt = f"{k[1]} 2^{k[2]:g}: {m:.4f} ± {sd:.4f}"
            cells.append(f"**{txt}**" if k == best else txt)
        print(f"- d_model {w}: " + "; ".join(cells))
    print("\n" + loss_table(acc, seeds, scheme, min(p["width"] for p in points)))
    print("\n| width | ratio | transferred LR | loss | best scheme | best LR | best loss | regret % | ± seed s.e. |")
    print("|---:|---:|---:|---:|:---|---:|---:|---:|---:|")
    base = min(p["width"] for p in points)
    for r in regret_by_width(points, scheme, base):
        reg = "diverged" if r.diverged else "not measured" if r.regret_pct is None else f"**{r.regret_pct:.2f}**"
        print(f"| {r.width} | {r.width // base}x | 2^{r.transferred_log2_lr:g} | "
              f"{'-' if r.loss is None else f'{r.loss:.4f}'} | {r.best_scheme or '-'} | "
              f"{'-' if r.best_log2_lr is None else f'2^{r.best_log2_lr:g}'} | "
              f"{'-' if r.best_loss is None else f'{r.best_loss:.4f}'} | {reg} | "
              f"{'-' if r.se_pct is None else f'{r.se_pct:.2f}'} |")  # fmt: skip
        for note in r.notes:
            print(f"|  | | {note} | | | | | | |")


if __name__ == "__main__":
    main(sys.argv[1:])
