"""Where the SSM output's change comes from: the B-C coupling behind finding 1 of docs/width_rules.md.

For each width and seed this trains the default coordinate-check model (`mupt check coord`'s
settings) and, per layer, splits the change of the last position's SSM output
y = sum_n C_n x_n into C0.dx (first order in B), dC.x0 (first order in C) and dC.dx (the B-C
coupling, second order), and measures

* cos2(dB, dC): squared cosine over the N_x state coordinates between the changes of B and C at
  the same token (1/N_x for unrelated vectors),
* coherence(dB): |token-mean of dB|^2 / mean |dB|^2, how much the B update is one vector shared by
  all tokens.

Prints a Markdown table of means over seeds and writes JSON.  Usage (repository root, ~20 s on 2
cores for the defaults)::

    python docs/experiments/bc_coupling.py --seeds 4 --out runs/bc_coupling.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mupt.check.coord import CoordSettings, log2_slope, probe, rms
from mupt.data import load_data
from mupt.train import Trainer

KEYS = ("dy_last", "C0.dx", "dC.x0", "dC.dx", "cos2(dB,dC)", "coherence(dB)")


def _capture(trainer: Trainer, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[int, tuple]]:
    """The coordinate-check probe plus each layer's B and C (batch, length, N_x)."""
    cap: dict[int, tuple] = {}
    hooks = [
        layer.mixer.x_proj.register_forward_hook(lambda m, a, o, i=i: cap.__setitem__(i, (o[1], o[2])))
        for i, layer in enumerate(trainer.model.backbone.layers)
    ]
    try:
        captured = probe(trainer, batch)
    finally:
        for h in hooks:
            h.remove()
    return captured, cap


def _cos2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine over the last axis."""
    return float(((a * b).sum(-1) ** 2 / (a.pow(2).sum(-1) * b.pow(2).sum(-1) + 1e-30)).mean())


def measure(settings: CoordSettings, width: int, seed: int, data) -> dict[str, float]:
    trainer = Trainer(settings.run_config(width, seed), data=data)
    batch, _ = data.val_batches(1, settings.batch_size, settings.seq_len)[0]
    p0, c0 = _capture(trainer, batch)
    for _ in range(settings.steps):
        trainer.train_step()
    p1, c1 = _capture(trainer, batch)
    out = {}
    for i in range(settings.n_layers):
        x0, x1 = p0[f"layers.{i}.x"], p1[f"layers.{i}.x"]  # last state (batch, N_u, N_x)
        (b0, cc0), (b1, cc1) = c0[i], c1[i]
        last0, last1 = cc0[:, -1], cc1[:, -1]

        def dot(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bdn,bn->bd", x, c)

        dx, dc, db = x1 - x0, last1 - last0, b1 - b0
        out |= {
            f"{i}.dy_last": rms(dot(x1, last1) - dot(x0, last0)),
            f"{i}.C0.dx": rms(dot(dx, last0)),
            f"{i}.dC.x0": rms(dot(x0, dc)),
            f"{i}.dC.dx": rms(dot(dx, dc)),
            f"{i}.cos2(dB,dC)": _cos2(db, cc1 - cc0),
            f"{i}.coherence(dB)": float(db.mean(1).pow(2).sum(-1).mean() / db.pow(2).sum(-1).mean()),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="64,128,256,512,1024")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out", type=Path, default=Path("runs/bc_coupling.json"))
    args = ap.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    settings = CoordSettings(widths=widths, seeds=args.seeds, steps=args.steps, lr=args.lr)
    data = load_data(settings.run_config(widths[0], 0).data)
    per: dict[str, list[list[float]]] = {}
    for wi, width in enumerate(widths):
        for seed in range(args.seeds):
            for key, value in measure(settings, width, seed, data).items():
                per.setdefault(key, [[] for _ in widths])[wi].append(value)
    means = {key: [sum(v) / len(v) for v in vals] for key, vals in per.items()}
    print("| layer.quantity | " + " | ".join(map(str, widths)) + " | slope |")
    print("|---|" + "---:|" * (len(widths) + 1))
    for key, m in means.items():
        print(f"| {key} | " + " | ".join(f"{v:.3g}" for v in m) + f" | {log2_slope(widths, m):+.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"widths": widths, "seeds": args.seeds, "per_seed": per, "mean": means}, indent=1))


if __name__ == "__main__":
    main()
