"""Mamba-2, N_x fixed: how much of the shared B/C rows' first gradient is signal, and how that grows with width.

Context: docs/width_rules.md, section 9g.  B and C of a group are shared by every head of the group, so the
gradient of W_B and W_C (rows of in_proj) is a sum over the group's N_u/ngroups channels (heads x headdim).
Adam's first step is sign(gradient): its SIZE does not depend on how many channels add up, but its DIRECTION
does: the part the channels share (the signal, adding like N_u) against the part each channel adds at random
(adding like sqrt(N_u)).  This script measures that split at the real init on the coordinate check's first
training batch: for each layer l it backpropagates the loss twice, once through the even heads' SSD outputs
of layer l and once through the odd heads' (``y = m*y + (1-m)*y.detach()``, the other layers untouched), so
the two gradients of layer l's W_B (and W_C) add up to the true one.  With a shared (coherent) part s and
independent per-channel noise, cos(G_even, G_odd) = |s/2|^2 / (|s/2|^2 + |noise of half|^2), which tends to +1
as the channels per group grow (rho^2 = cos / (1 - cos) ∝ channels); the gated RMSNorm's cancellation derived in
9g instead makes the halves anti-correlated (cos < 0) at every width.  ``--after K`` measures the gradient of
step K + 1 instead of the first.  It also prints (and stores) the RMS of every layer's SSD inputs and output at
init at the narrowest and the widest width (why y starts near 0).

    python docs/experiments/mamba2_bc_snr.py --widths 64,128,256,512,1024,2048 --seeds 4 --d-states 16,64

Writes JSON (``--out``): per (d_state, layer, matrix, width) the cosine per seed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import mupt.model as model_mod
from mupt.check.coord import CoordSettings, log2_slope
from mupt.config import Arch
from mupt.data import load_data
from mupt.train import Trainer, lm_loss

#: which heads of which layer pass the gradient: (layer index, head mask) or None (all, as in training)
MASK: dict[str, Any] = {"layer": None, "mask": None}
_scan = model_mod.ssd_scan


def masked_scan(x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_scan`` whose output passes gradient only through the heads of ``MASK`` (forward unchanged)."""
    y, state = _scan(x, *args, **kwargs)
    if MASK["mask"] is not None and MASK["layer"] == masked_scan.layer:  # type: ignore[attr-defined]
        m = MASK["mask"].to(y.dtype)[None, None, :, None]
        y = m * y + (1 - m) * y.detach()
    masked_scan.layer += 1  # type: ignore[attr-defined]
    return y, state


def half_cosines(settings: CoordSettings, width: int, seed: int, data: Any, after: int = 0) -> dict[str, float]:
    """cos(gradient through the even heads, gradient through the odd heads) of every layer's W_B and W_C, on the
    batch of step ``after + 1`` after ``after`` training steps (0: at init, the gradient of Adam's first step)."""
    cfg = settings.run_config(width, seed)
    trainer = Trainer(cfg, data=data)
    for _ in range(after):
        masked_scan.layer = 0  # type: ignore[attr-defined]
        trainer.train_step()
    xb, yb = trainer.batch(after)
    model = trainer.model
    out: dict[str, float] = {}
    nheads = cfg.model.nheads
    even = torch.arange(nheads) % 2 == 0
    for layer in range(settings.n_layers):
        mixer = model.backbone.layers[layer].mixer
        assert isinstance(mixer, model_mod.Mamba2Mixer)
        grads: dict[str, list[torch.Tensor]] = {"B": [], "C": []}
        for mask in (even, ~even):
            MASK.update(layer=layer, mask=mask)
            model.zero_grad(set_to_none=True)
            masked_scan.layer = 0  # type: ignore[attr-defined]
            lm_loss(model(xb), yb).backward()
            for k in grads:
                grads[k].append(getattr(mixer.in_proj, f"weight_{k}").grad.detach().double().flatten().clone())
        for k, (g1, g2) in grads.items():
            out[f"{layer}.{k}"] = float(torch.nn.functional.cosine_similarity(g1, g2, dim=0))
    MASK.update(layer=None, mask=None)
    return out


def init_components(settings: CoordSettings, width: int, seed: int, data: Any) -> dict[str, float]:
    """RMS at init, on the probe batch, of each layer's SSD inputs (x, B, C after conv1d + SiLU; dt after the
    softplus), its output y (before the D skip) and D x: why y starts near 0 (section 9g)."""
    cfg = settings.run_config(width, seed)
    trainer = Trainer(cfg, data=data)
    xb, _ = data.val_batches(1, settings.batch_size, settings.seq_len)[0]
    seen: list[dict[str, float]] = []

    def spy(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *args: Any,
            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        y, state = _scan(x, dt, A, B, C, *args, **kwargs)
        seen.append({k: float(v.double().pow(2).mean().sqrt()) for k, v in
                     (("x", x), ("B", B), ("C", C), ("dt", dt), ("y", y))})  # fmt: skip
        return y, state

    model_mod.ssd_scan = spy  # type: ignore[assignment]
    try:
        with torch.no_grad():
            trainer.model.eval()
            trainer.model(xb, {})  # the probe path: y without the D skip (D = 1 at init, so RMS(D x) = RMS(x))
    finally:
        model_mod.ssd_scan = masked_scan  # type: ignore[assignment]
    return {f"{i}.{k}": v for i, layer in enumerate(seen) for k, v in layer.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="64,128,256,512,1024,2048")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--d-states", default="16,64")
    p.add_argument("--after", type=int, default=0, help="Adam steps before measuring (0: the first step's gradient)")
    p.add_argument("--out", default="runs/mamba2_bc_snr.json")
    args = p.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    model_mod.ssd_scan = masked_scan  # type: ignore[assignment]
    result: dict[str, Any] = {"widths": widths, "seeds": args.seeds, "after": args.after, "cos": {}}
    t0 = time.perf_counter()
    for n in (int(s) for s in args.d_states.split(",")):
        settings = CoordSettings(arch=Arch.MAMBA2, headdim=32, base_d_state=n, widths=widths, seeds=args.seeds,
                                 backend="torch", base_width=64)  # fmt: skip
        data = load_data(settings.data_config())
        comps = {w: init_components(settings, w, 0, data) for w in (widths[0], widths[-1])}
        result.setdefault("init_components", {})[str(n)] = comps
        print(
            f"N_x {n}: RMS at init (seed 0), d_model {widths[0]} / {widths[-1]}: "
            + ", ".join(f"{k} {v:.3g}/{comps[widths[-1]][k]:.3g}" for k, v in comps[widths[0]].items())
        )
        per: dict[str, list[list[float]]] = {}
        for w in widths:
            runs = [half_cosines(settings, w, s, data, args.after) for s in range(args.seeds)]
            for key in runs[0]:
                per.setdefault(key, []).append([r[key] for r in runs])
            print(f"N_x {n} d_model {w}: {time.perf_counter() - t0:.0f} s", flush=True)
        result["cos"][str(n)] = per
        print(f"N_x {n}, after {args.after} steps: cos(even heads, odd heads), mean over seeds per width {widths}")
        for key, vals in per.items():
            means = [statistics.mean(v) for v in vals]
            rho2 = [c / (1 - c) if 0 < c < 1 else math.nan for c in means]
            slope = log2_slope(widths, rho2)
            tail = f"; slope of rho^2 = cos/(1-cos): {slope:+.2f}" if math.isfinite(slope) else ""
            print(f"  {key}: " + " ".join(f"{c:+.3f}" for c in means) + tail)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
