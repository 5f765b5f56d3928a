"""Plain Adam's L2 weight decay across width: is wd_group * RMS(p) / RMS(g) width-independent?

docs/width_rules.md#rule-weight-decay derives the plain-Adam (L2) weight-decay rule
wd_group = wd * r^(lr_Adam - lr_SGD - init).  This trains µP-SSM models (ZOH, Adam, base 64,
N_x = 16, 2 layers) without weight decay and, after the listed steps, prints per role (layer 0
and lm_head) the mean over seeds of wd_group * RMS(p) / RMS(g), with wd_group as
:func:`mupt.parametrization.apply` gives it for ``--optimizer adam --weight-decay 0.1``, and its
log2-slope vs d_model.  Usage (repository root; ~4 min on a loaded 2-core machine)::

    python docs/experiments/adam_l2_weight_decay.py --widths 64,256,1024 --seeds 2 --steps 0,10,30
"""

from __future__ import annotations

import argparse
import math

import torch

from mupt.config import RunConfig, with_overrides
from mupt.train import Trainer, build_model

ROLES = ("in_proj", "out_proj", "x_proj_dt", "dt_proj", "x_proj_B", "x_proj_C", "conv1d_weight", "lm_head")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,256,1024")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", default="0,10,30", help="report after these steps (0 = the first gradient)")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    report = [int(s) for s in args.steps.split(",")]
    torch.set_num_threads(1)
    res: dict[tuple[int, int, str], list[float]] = {}
    for w in widths:
        for seed in range(args.seeds):
            cfg = with_overrides(RunConfig(), {
                "model.d_model": w, "model.n_layers": 2, "model.d_state": 16, "param.base_d_model": 64,
                "param.scheme": "mup-ssm", "train.optimizer": "adam", "train.seed": seed, "train.lr": 3e-3,
                "train.batch_size": 8, "train.seq_len": 64, "train.steps": max(report) + 1,
            })  # fmt: skip
            trainer = Trainer(cfg)
            _, par = build_model(with_overrides(cfg, {"train.weight_decay": 0.1}))
            wd = {n: g["weight_decay"] for g in par.param_groups for n in g["names"]}
            for step in range(max(report) + 1):
                trainer.train_step()  # leaves this step's gradients in .grad
                if step not in report:
                    continue
                for name, p in trainer.model.named_parameters():
                    role = par.manifest.params[name].role
                    if role in ROLES and ("layers.0." in name or role == "lm_head") and p.grad is not None:
                        ratio = wd[name] * float(p.detach().pow(2).mean().sqrt()) / float(p.grad.pow(2).mean().sqrt())
                        res.setdefault((w, step, role), []).append(ratio)
    for step in report:
        print(f"\nafter step {step}\n\n| role | " + " | ".join(str(w) for w in widths) + " | slope |")
        print("|---|" + "---:|" * (len(widths) + 1))
        for role in ROLES:
            vals = [sum(res[(w, step, role)]) / len(res[(w, step, role)]) for w in widths]
            slope = math.log2(vals[-1] / vals[0]) / math.log2(widths[-1] / widths[0])
            print(f"| {role} | " + " | ".join(f"{v:.3g}" for v in vals) + f" | {slope:+.2f} |")


if __name__ == "__main__":
    main()
