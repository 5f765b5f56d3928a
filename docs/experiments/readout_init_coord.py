"""Coordinate check of the readout-init variants of docs/transfer.md (µP-SSM, Mamba-1, Adam family).

Variants (the rule table is patched in this process only; mupt/parametrization.py is not changed):

* ``rule``: the shipped rules (lm_head init std r_u^-1, Adam LR r_u^-1; embedding Θ(1) init and Adam LR);
* ``readout-init``: lm_head init std r_u^-1/2 (SP's fan_in^-1/2), its LR rule unchanged;
* ``readout-init-emb``: that and the embedding's Adam LR r_u^-1/2.

At the base width (d_model 64) all three are the same model.  Each runs ``mupt check coord``'s default gate
(d_model 256, 512, 1024, 2048 against base 64, 3 layers, 24 seeds, 4 AdamW steps, LR 1e-2, tolerance 0.25 on
every log2-log2 slope) and writes its ``coord.json`` (mupt.check.coord.CoordResult) to ``--out``;
``--report`` prints the slope table of several such files (Markdown).

    OMP_NUM_THREADS=1 nice -n 10 python docs/experiments/readout_init_coord.py --variant readout-init \\
        --out docs/experiments/readout_init_coord/readout_init.json
    python docs/experiments/readout_init_coord.py --report docs/experiments/readout_init_coord/*.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from mupt.check.coord import CoordSettings, coord_check
from mupt.config import Discretization, Scheme, atomic_write_text
from mupt.model import Role
from mupt.parametrization import RULES

VARIANTS: dict[str, dict[Role, dict[str, tuple[float, float]]]] = {
    "rule": {},
    "readout-init": {Role.LM_HEAD: {"init": (-0.5, 0.0)}},
    "readout-init-emb": {Role.LM_HEAD: {"init": (-0.5, 0.0)}, Role.EMBEDDING: {"lr": (-0.5, 0.0)}},
}


#: Rows whose slope is also reported after every step (the logits' update, and the last layer's block output).
STEP_KEYS = ("head.dlogits", "2.dout")


def patch(variant: str) -> None:
    """Replace the µP-SSM Adam-family rules of the variant's roles in :data:`mupt.parametrization.RULES`."""
    for disc in Discretization:
        rules = RULES[(Scheme.MUP_SSM, "adam", disc)]
        for role, fields in VARIANTS[variant].items():
            rule = rules[role]
            rules[role] = dataclasses.replace(rule, init=fields.get("init", rule.init), lr=fields.get("lr", rule.lr))


def report(paths: list[str]) -> str:
    """Markdown: one row per quantity, one column per file: slope ± bootstrap s.e. (failing ones in bold); then
    the slope of :data:`STEP_KEYS` after each step."""
    docs = [json.loads(open(p, encoding="utf-8").read()) for p in paths]
    keys = [r["key"] for r in docs[0]["rows"]]
    head = "| quantity | " + " | ".join(d.get("variant", Path(p).stem) for d, p in zip(docs, paths, strict=True)) + " |"
    lines = [head, "|:---|" + "---:|" * len(docs)]
    for k in keys:
        cells = []
        for d in docs:
            r = next(r for r in d["rows"] if r["key"] == k)
            txt = f"{r['slope']:+.2f} ± {r['slope_se']:.2f}"
            cells.append(txt if r["flat"] else f"**{txt}**")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    verdict = ["PASS" if d["passed"] else f"FAIL ({sum(not r['flat'] for r in d['rows'])})" for d in docs]
    lines.append("| verdict | " + " | ".join(verdict) + " |")
    steps = len(docs[0]["rows"][0]["slopes_by_step"])
    lines += ["", "| quantity | variant | " + " | ".join(f"slope after step {i}" for i in range(1, steps + 1)) + " |",
              "|:---|:---|" + "---:|" * steps]  # fmt: skip
    for k in STEP_KEYS:
        for d, p in zip(docs, paths, strict=True):
            r = next(r for r in d["rows"] if r["key"] == k)
            name = d.get("variant", Path(p).stem)
            lines.append(f"| {k} | {name} | " + " | ".join(f"{s:+.2f}" for s in r["slopes_by_step"]) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="readout-init")
    ap.add_argument("--seeds", type=int, default=24)
    ap.add_argument("--widths", default="256,512,1024,2048")
    ap.add_argument("--out", help="coord.json of the run")
    ap.add_argument("--report", nargs="*", help="print the slope table of these coord JSONs and exit")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return 0
    if not args.out:
        ap.error("--out is required unless --report")
    patch(args.variant)
    settings = CoordSettings.of({"widths": tuple(int(w) for w in args.widths.split(",")), "seeds": args.seeds})
    res = coord_check(settings, on_run=lambda w, s, sec: print(f"w={w} seed={s} {sec:.1f}s", flush=True))
    doc: dict[str, Any] = {"variant": args.variant, **res.to_dict()}
    atomic_write_text(args.out, json.dumps(doc, indent=1, allow_nan=True))
    print(report([args.out]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
