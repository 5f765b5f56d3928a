"""Mamba-2, N_x fixed: do a layer's input updates line up with the row space of its (init) B/C rows?

Context: docs/width_rules.md, section 9g, item 4.  W_B and W_C map the d_model-wide (normed) block input u to a
FIXED ngroups*N_x outputs.  If the input's change Δu after a few Adam steps were a random direction, the init
rows would see |W Δu|^2 = |W|_F^2 |Δu|^2 / d_model.  The amplification

    A = |W0 Δu| / (|W0|_F |Δu| / sqrt(d_model))      (summed over the probe batch's tokens)

is 1 for a random direction (and W0's rows as drawn) and grows when Δu leans into W0's row space; for a fixed
number of rows its ceiling grows like sqrt(d_model / rows).  The script trains the coordinate check's model
(Adam, lr 1e-2, 4 steps, the rules as implemented) and prints A after every step, per layer, for the B, C rows
and, as controls, the x and z rows (hidden matrices whose d_inner rows span the whole input space), with the
slope of log2 A (mean over seeds) against log2 d_model; and the RMS of Δu itself (``du_rms``), and how alike
the tokens have become: the mean over token pairs s <= t of cos(u_t, u_s) (``cos_uu``), cos(B_t, B_s)
(``cos_BB``) and cos(C_t, B_s) (``cos_CB``, the direction of the SSD's score C_t·B_s), also at init (``@init``).

    python docs/experiments/mamba2_input_alignment.py --widths 64,128,256,512,1024 --seeds 4 --d-states 64,16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import mupt.model as model_mod
from mupt.check.coord import CoordSettings, log2_slope
from mupt.config import Arch
from mupt.data import load_data
from mupt.model import Mamba2Mixer
from mupt.train import Trainer

BLOCKS = ("B", "C", "x", "z")


def mamba2_mixers(trainer: Trainer) -> list[Mamba2Mixer]:
    """The model's Mamba-2 mixers, one per layer."""
    out = []
    for layer in trainer.model.backbone.layers:
        assert isinstance(layer.mixer, Mamba2Mixer)
        out.append(layer.mixer)
    return out


def block_inputs(trainer: Trainer, batch: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, ...]]]:
    """Every layer's mixer input (the normed residual stream, (batch, length, d_model)) on ``batch``, eval mode,
    and its SSD's B and C after conv1d + SiLU (and C's multiplier), each (batch, length, ngroups, N_x)."""
    seen: list[torch.Tensor] = []
    ssd: list[tuple[torch.Tensor, ...]] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().double().clone()))
        for m in mamba2_mixers(trainer)
    ]
    scan = model_mod.ssd_scan

    def spy(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *args: Any,
            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        ssd.append((B.detach().double().clone(), C.detach().double().clone()))
        return scan(x, dt, A, B, C, *args, **kwargs)

    model_mod.ssd_scan = spy  # type: ignore[assignment]
    try:
        trainer.model.eval()
        with torch.no_grad():
            trainer.model(batch)
    finally:
        model_mod.ssd_scan = scan  # type: ignore[assignment]
        for h in hooks:
            h.remove()
    return seen, ssd


def mean_pair_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch and over token pairs s <= t of cos(a_t, b_s); a, b (batch, length, dim)."""
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    cos = a @ b.transpose(1, 2)  # (batch, t, s)
    mask = torch.ones(cos.shape[1:], dtype=torch.bool).tril()
    return float(cos[:, mask].mean())


def amplification(settings: CoordSettings, width: int, seed: int, data: Any) -> list[dict[str, float]]:
    """A per (layer, rows) after each of ``settings.steps`` Adam steps: element k holds step k + 1."""
    trainer = Trainer(settings.run_config(width, seed), data=data)
    probe_x, _ = data.val_batches(1, settings.batch_size, settings.seq_len)[0]
    mixers = mamba2_mixers(trainer)
    w0 = [{k: getattr(m.in_proj, f"weight_{k}").detach().double().clone() for k in BLOCKS} for m in mixers]
    u0, ssd0 = block_inputs(trainer, probe_x)
    at_init = {}
    for i, (a, (B, C)) in enumerate(zip(u0, ssd0, strict=True)):
        at_init[f"{i}.cos_uu@init"] = mean_pair_cos(a, a)
        at_init[f"{i}.cos_BB@init"] = mean_pair_cos(B.flatten(2), B.flatten(2))
        at_init[f"{i}.cos_CB@init"] = mean_pair_cos(C.flatten(2), B.flatten(2))
    out = []
    for _ in range(settings.steps):
        trainer.train_step()
        u, ssd = block_inputs(trainer, probe_x)
        step: dict[str, float] = {}
        for i, (ws, a, b) in enumerate(zip(w0, u0, u, strict=True)):
            du = (b - a).reshape(-1, width)
            step[f"{i}.du_rms"] = float(du.pow(2).mean().sqrt())
            step[f"{i}.cos_uu"] = mean_pair_cos(b, b)
            B, C = (t.flatten(2) for t in ssd[i])
            step[f"{i}.cos_BB"] = mean_pair_cos(B, B)
            step[f"{i}.cos_CB"] = mean_pair_cos(C, B)
            for k, w in ws.items():
                random = w.pow(2).sum() * du.pow(2).sum() / width
                step[f"{i}.{k}"] = float(((du @ w.T).pow(2).sum() / random).sqrt())
        out.append({**step, **at_init})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="64,128,256,512,1024")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--d-states", default="64,16")
    p.add_argument("--out", default="runs/mamba2_input_alignment.json")
    args = p.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    result: dict[str, Any] = {"widths": widths, "seeds": args.seeds, "amplification": {}}
    t0 = time.perf_counter()
    for n in (int(s) for s in args.d_states.split(",")):
        settings = CoordSettings(arch=Arch.MAMBA2, headdim=32, base_d_state=n, widths=widths, seeds=args.seeds,
                                 backend="torch", base_width=64)  # fmt: skip
        data = load_data(settings.data_config())
        per: dict[str, list[list[list[float]]]] = {}  # key -> step -> width -> seed
        for w in widths:
            runs = [amplification(settings, w, s, data) for s in range(args.seeds)]
            for k in runs[0][0]:
                steps = per.setdefault(k, [[] for _ in range(settings.steps)])
                for j in range(settings.steps):
                    steps[j].append([r[j][k] for r in runs])
            print(f"N_x {n} d_model {w}: {time.perf_counter() - t0:.0f} s", flush=True)
        result["amplification"][str(n)] = per
        print(f"N_x {n}: A after step 4 (mean over seeds) per width {widths}; slope of log2 A after steps 1..4")
        for k, steps in per.items():
            last = [statistics.mean(v) for v in steps[-1]]
            slopes = [log2_slope(widths, [statistics.mean(v) for v in s]) for s in steps]
            print(f"  {k}: " + " ".join(f"{a:.3g}" for a in last) + "; " + " ".join(f"{s:+.2f}" for s in slopes))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
