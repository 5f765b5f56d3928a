"""Mamba-2, N_x fixed: which parameter role's updates make the SSD output y grow with width?

Context: docs/width_rules.md, sections 9e and 9f.  With d_state fixed at 64 (headdim 32), µP-SSM's
Mamba-2 rules leave layer-1 y rising like width^0.3..0.4 after 4 Adam steps.  This script reruns the
real coordinate check (:func:`mupt.check.coord.coord_check`, the machinery of `mupt check coord --arch
mamba2 --headdim 32 --d-state 64 --fixed-state`) once per *variant*, each changing one thing, and
prints the slopes of the y rows (and every quantity's max) side by side.  Every variant uses the
same seeds, so differences between columns are paired.

A variant is ``base`` (the rules as implemented) or modifications joined by ``+``:

* ``freeze:ROLE``: that role's LR factor is 0 at every width (``param.role_lr``), so it keeps its init;
* ``lrmul:ROLE:F``: that role's LR times F at every width (``param.role_lr``);
* ``plr:NAME:F``: the LR of every parameter whose name contains NAME (e.g. ``layers.0.mixer.in_proj.weight_C``)
  times F (0 freezes it): a per-layer ablation, done by splitting the optimizer groups the rules built;
* ``lr:ROLE:A[:X]``, ``init:ROLE:A[:X]``, ``fwd:ROLE:A[:X]``: the role's Adam-LR / init-std / forward-multiplier
  exponent of r_u set to A (and of r_x to X; kept when not given): a width-dependent change, a candidate rule;
* ``hpg:K``: K heads per B/C group at every width (ngroups = nheads / K grows with width, and with it the gated
  norm's groups), instead of a fixed ngroups (section 9g's test of the shared-gradient mechanism);
* ``strat``: every layer's per-head dt_bias and A_log drawn on an even quantile grid of mamba_ssm's distributions
  (dt log-uniform in [dt_min, dt_max], A uniform in [1, 16]; A's grid in a seeded random order) instead of at
  random: the same distributions, without the head-sampling noise of a few heads (section 9g).

ROLE is a :class:`mupt.config.Role` value (in_proj_z, in_proj_x, in_proj_B, in_proj_C, in_proj_dt,
conv1d_weight, conv1d_bias, A_log_head, D, dt_bias, gated_norm, norm, out_proj, embedding, lm_head).

    python docs/experiments/mamba2_role_ablation.py --seeds 8 --variants base,freeze:in_proj_C,lr:in_proj_C:-1.5

``--seed-stats coord.json ...`` instead prints, for files that `mupt check coord` wrote, the y and x rows' slopes
of the mean over seeds (the gate's statistic), of the median and of the geometric mean, and the largest seed's
RMS over the median seed's per width (docs/width_rules.md, section 9f, finding 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mupt import parametrization, train
from mupt.check.coord import CoordSettings, coord_check, log2_slope
from mupt.config import Arch, Discretization, OptimizerName, RunConfig, Scheme
from mupt.model import Role

KEYS = ("0.y", "1.y", "2.y", "0.x", "1.x", "2.x", "0.dy", "1.dy", "2.dy")


class AblationSettings(CoordSettings):
    """The coordinate check's settings plus per-role LR factors at every width (``param.role_lr``)."""

    role_lr: dict[str, float] = {}
    heads_per_group: int | None = None

    def run_config(self, width: int, seed: int) -> RunConfig:
        cfg = super().run_config(width, seed)
        if self.heads_per_group:
            ngroups = cfg.model.nheads // self.heads_per_group
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"ngroups": ngroups})})
        if not self.role_lr:
            return cfg
        if "role_lr" not in type(cfg.param).model_fields:
            raise SystemExit("freeze/lrmul need param.role_lr (merge main)")
        param = cfg.param.model_copy(update={"role_lr": {Role(k): v for k, v in self.role_lr.items()}})
        return cfg.model_copy(update={"param": param})


def split_groups(apply: Any, by_name: dict[str, float]) -> Any:
    """Wrap :func:`mupt.parametrization.apply`: parameters whose names contain a key of ``by_name`` move to a
    group of their own with the LR times that factor (the rules' ``lr_mult`` is kept for display)."""

    def wrapped(*args: Any, **kwargs: Any) -> parametrization.Parametrized:
        par = apply(*args, **kwargs)
        groups = []
        for g in par.param_groups:
            rest = {**g, "params": [], "names": []}
            for p, n in zip(g["params"], g["names"], strict=True):
                hit = [f for k, f in by_name.items() if k in n]
                if hit:
                    groups.append({**g, "params": [p], "names": [n], "lr": g["lr"] * hit[0]})
                else:
                    rest["params"].append(p)
                    rest["names"].append(n)
            if rest["params"]:
                groups.insert(0, rest)
        return parametrization.Parametrized(groups, par.manifest)

    return wrapped


Patches = list[tuple[str, Role, float, float | None]]


def stratified_heads(apply: Any) -> Any:
    """Wrap :func:`mupt.parametrization.apply`: before the rules run, set every Mamba-2 layer's dt_bias and A_log
    to an even quantile grid of their default distributions (A's grid permuted with the torch RNG, so dt and A are
    not paired in order); structured roles are never rescaled, so the rules leave them as set."""

    def wrapped(model: Any, *args: Any, **kwargs: Any) -> parametrization.Parametrized:
        cfg = model.cfg
        h = cfg.nheads
        q = (torch.arange(h, dtype=torch.float64) + 0.5) / h
        dt = torch.exp(math.log(cfg.dt_min) + q * (math.log(cfg.dt_max) - math.log(cfg.dt_min))).clamp(
            min=cfg.dt_init_floor
        )
        with torch.no_grad():
            for layer in model.backbone.layers:
                m = layer.mixer
                m.dt_bias.copy_((dt + torch.log(-torch.expm1(-dt))).to(m.dt_bias.dtype))
                m.A_log.copy_(torch.log(1.0 + 15.0 * q[torch.randperm(h)]).to(m.A_log.dtype))
        return apply(model, *args, **kwargs)

    return wrapped


def parse(variant: str) -> tuple[dict[str, float], Patches, dict[str, float], int | None, bool]:
    """``variant`` -> (role_lr factors, [(field, role, r_u exponent, r_x exponent or None)], {name part: LR factor},
    heads per group or None, stratified per-head init)."""
    role_lr: dict[str, float] = {}
    patches: Patches = []
    by_name: dict[str, float] = {}
    hpg: int | None = None
    strat = False
    if variant == "base":
        return role_lr, patches, by_name, hpg, strat
    for part in variant.split("+"):
        if part == "strat":
            strat = True
            continue
        kind, role, *rest = part.split(":")
        if kind == "hpg":
            hpg = int(role)
            continue
        if kind == "plr":
            by_name[role] = float(rest[0])
            continue
        r = Role(role)
        if kind == "freeze":
            role_lr[r.value] = 0.0
        elif kind == "lrmul":
            role_lr[r.value] = float(rest[0])
        elif kind in ("lr", "init", "fwd"):
            patches.append((kind, r, float(rest[0]), float(rest[1]) if len(rest) > 1 else None))
        else:
            raise SystemExit(f"unknown modification {part!r}: use freeze, lrmul, plr, lr, init, fwd, hpg or strat")
    return role_lr, patches, by_name, hpg, strat


def base_shape_one_group(from_dict: Any) -> Any:
    """Wrap ``from_dict`` so that the base shape ``apply`` builds keeps 1 group: with ``hpg`` the wide model's
    ngroups need not divide the base's head count, and the base shape only sets fan-ins, which ngroups leaves
    alone."""

    def wrapped(cls: Any, data: dict[str, Any], where: str = "") -> Any:
        if where == "base shape":
            data = {**data, "ngroups": 1}
        return from_dict(cls, data, where=where)

    return wrapped


def run(variant: str, widths: tuple[int, ...], seeds: int, base_width: int | None, d_state: int,
        scale_state: bool, steps: int = 4, optimizer: str = "adamw", lr: float = 0.01) -> dict[str, Any]:  # fmt: skip
    role_lr, patches, by_name, hpg, strat = parse(variant)
    apply, from_dict = train.apply, parametrization.from_dict
    if by_name:
        train.apply = split_groups(train.apply, by_name)  # type: ignore[assignment]
    if strat:
        train.apply = stratified_heads(train.apply)  # type: ignore[assignment]
    if hpg:
        parametrization.from_dict = base_shape_one_group(from_dict)  # type: ignore[assignment]
    family = "sgd" if optimizer == "sgd" else "adam"  # the rule table the patches change
    saved = {k: v for k, v in parametrization.RULES.items() if k[0] is Scheme.MUP_SSM and k[1] == family}
    for key, rules in saved.items():
        new = dict(rules)
        for kind, role, a, ax in patches:
            old = new[role]
            if kind == "init" and old.init is None:
                raise SystemExit(f"{role.value} has a structured init; it cannot be rescaled")
            exp: tuple[float, float] = getattr(old, kind)
            changed: dict[str, Any] = {kind: (a, exp[1] if ax is None else ax)}
            new[role] = dataclasses.replace(old, **changed)
        parametrization.RULES[key] = new
    try:
        settings = AblationSettings(
            arch=Arch.MAMBA2, headdim=32, base_d_state=d_state, scale_state=scale_state, widths=widths, seeds=seeds,
            base_width=base_width, backend="torch", discretization=Discretization.ZOH, role_lr=role_lr, steps=steps,
            heads_per_group=hpg, optimizer=OptimizerName(optimizer), lr=lr,
        )  # fmt: skip
        res = coord_check(settings)
    finally:
        parametrization.RULES.update(saved)
        train.apply = apply  # type: ignore[assignment]
        parametrization.from_dict = from_dict  # type: ignore[assignment]
    return {
        "variant": variant,
        "passed": res.passed,
        "seconds": res.seconds,
        "max_abs_slope": max(abs(r.slope) for r in res.rows),
        "slopes": {r.key: r.slope for r in res.rows},
        "slope_se": {r.key: r.slope_se for r in res.rows},
        "slopes_by_step": {r.key: r.slopes_by_step for r in res.rows},
        "rms": {r.key: r.rms for r in res.rows},
    }


def seed_stats(path: str) -> None:
    """Print the y and x rows' slopes of the mean, median and geometric mean over seeds of a coord.json."""
    d = json.loads(Path(path).read_text())
    widths = d["widths"]
    print(f"{path} (widths {widths}): slope of mean / median / geometric mean; largest/median seed per width")
    for r in d["rows"]:
        if r["quantity"] not in ("x", "y"):
            continue
        per = r["rms_seeds"]
        stats = [
            [sum(s) / len(s) for s in per],
            [statistics.median(s) for s in per],
            [math.exp(sum(math.log(v) for v in s) / len(s)) for s in per],
        ]
        slopes = " / ".join(f"{log2_slope(widths, m):+.2f}" for m in stats)
        spread = " ".join(f"{max(s) / statistics.median(s):.1f}" for s in per)
        print(f"  {r['layer']}.{r['quantity']}: {slopes}; {spread}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="64,128,256,512")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--base-width", type=int, default=None)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--scale-state", action="store_true")
    p.add_argument("--steps", type=int, default=4, help="Adam steps (the coordinate check's default: 4)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"], help="the check's optimizer")
    p.add_argument("--lr", type=float, default=0.01, help="the check's global (base-width) LR (SGD: 0.1 in 4b)")
    p.add_argument("--variants", default="base", help="comma-separated variants (see the module docstring)")
    p.add_argument("--out", default="runs/mamba2_role_ablation.json", help="JSON, extended run by run")
    p.add_argument("--seed-stats", nargs="+", metavar="COORD_JSON", help="only print seed statistics of these files")
    args = p.parse_args()
    if args.seed_stats:
        for path in args.seed_stats:
            seed_stats(path)
        return
    widths = tuple(int(w) for w in args.widths.split(","))
    out_path = Path(args.out)
    out: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    out.setdefault("settings", {"widths": widths, "seeds": args.seeds, "base_width": args.base_width,
                                "d_state": args.d_state, "scale_state": args.scale_state,
                                "steps": args.steps, "optimizer": args.optimizer, "lr": args.lr})  # fmt: skip
    results = out.setdefault("variants", {})
    for v in args.variants.split(","):
        if v in results:
            continue
        t0 = time.perf_counter()
        results[v] = run(v, widths, args.seeds, args.base_width, args.d_state, args.scale_state, args.steps,
                         args.optimizer, args.lr)  # fmt: skip
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1) + "\n")
        r = results[v]
        print(f"{v}: max |slope| {r['max_abs_slope']:.2f} ({max(r['slopes'], key=lambda k: abs(r['slopes'][k]))}),"
              f" y {r['slopes']['0.y']:+.2f} {r['slopes']['1.y']:+.2f} {r['slopes']['2.y']:+.2f},"
              f" {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    names = list(results)
    print("| variant | " + " | ".join(KEYS) + " | max abs | verdict |")
    print("|---|" + "---:|" * (len(KEYS) + 2))
    for n in names:
        r = results[n]
        cells = " | ".join(f"{r['slopes'][k]:+.2f}" for k in KEYS)
        print(f"| {n} | {cells} | {r['max_abs_slope']:.2f} | {'PASS' if r['passed'] else 'FAIL'} |")


if __name__ == "__main__":
    main()
