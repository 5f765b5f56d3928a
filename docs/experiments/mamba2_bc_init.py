"""Mamba-2, N_x fixed: does a readout-style init of the B and C rows of in_proj flatten the SSD output y?

Context: docs/width_rules.md, section 9e.  With d_state fixed, the B and C rows of Mamba-2's in_proj
map the width-d_model residual stream to a fixed number of outputs (ngroups * N_x), shared by every
head: a matrix with growing fan-in and fixed fan-out, which µP treats as a readout (init std
∝ 1/fan_in, not 1/sqrt(fan_in)).  mupt's µP-SSM gives them the hidden rule (std ∝ 1/sqrt(fan_in),
Adam LR ∝ 1/fan_in).  This script runs the same coordinate check as `mupt check coord --arch mamba2
--headdim 32 --d-state 64 --fixed-state` twice, with the rule as implemented and with the B and C
rows' init exponent changed to -1 (std ∝ r_u^-1; the LR and, for C, the forward multiplier are
kept), and prints the slopes of every quantity side by side.  At the base width both models are
identical, so any difference comes from the wider models.

    python docs/experiments/mamba2_bc_init.py --widths 64,128,256,512 --seeds 24 --out runs/bc_init.json
    python docs/experiments/mamba2_bc_init.py --base-width 64 --widths 256,512,1024,2048 --seeds 8 \
        --variants readout_init --out runs/bc_init_256.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from mupt import parametrization
from mupt.check.coord import CoordSettings, coord_check
from mupt.config import Arch, Discretization, Scheme
from mupt.model import Role


def run(widths: tuple[int, ...], seeds: int, base_width: int | None, readout_init: bool) -> dict:
    key = (Scheme.MUP_SSM, "adam", Discretization.ZOH)
    saved = parametrization.RULES[key]
    if readout_init:
        rules = dict(saved)
        for role in (Role.IN_PROJ_B, Role.IN_PROJ_C):
            rules[role] = dataclasses.replace(rules[role], init=(-1.0, 0.0))
        parametrization.RULES[key] = rules
    try:
        settings = CoordSettings(
            arch=Arch.MAMBA2, headdim=32, base_d_state=64, widths=widths, seeds=seeds, base_width=base_width,
            backend="torch",
        )  # fmt: skip
        res = coord_check(settings)
    finally:
        parametrization.RULES[key] = saved
    return {
        "passed": res.passed,
        "seconds": res.seconds,
        "slopes": {r.key: r.slope for r in res.rows},
        "slopes_by_step": {r.key: r.slopes_by_step for r in res.rows},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="64,128,256,512")
    p.add_argument("--seeds", type=int, default=24)
    p.add_argument("--base-width", type=int, default=None)
    p.add_argument("--variants", default="hidden_init,readout_init", help="which of the two to run")
    p.add_argument("--out", default="runs/mamba2_bc_init.json")
    args = p.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    names = [v for v in ("hidden_init", "readout_init") if v in args.variants.split(",")]
    out: dict = {"widths": widths, "seeds": args.seeds, "base_width": args.base_width}
    for name in names:
        out[name] = run(widths, args.seeds, args.base_width, readout_init=name == "readout_init")
    print("| quantity | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for k in out[names[0]]["slopes"]:
        print(f"| {k} | " + " | ".join(f"{out[n]['slopes'][k]:+.2f}" for n in names) + " |")
    for name in names:
        r = out[name]
        print(f"{name}: max |slope| {max(abs(v) for v in r['slopes'].values()):.2f}, passed {r['passed']}, "
              f"{r['seconds']:.0f} s")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
