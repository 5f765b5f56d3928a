"""Target check: confirm a transfer at full width with a few short runs before the long one.

``mupt check target RECIPE`` trains the recipe's own setting (its transferred LR and multipliers) and
the same with the LR x 1/2 and x 2 (by default; ``factors``), optionally standard parametrization at
its own rule (one global LR, the proxy's, x the same factors: SP has no width scaling), for
``steps`` optimizer steps each, at the recipe's width, shape and data, for every seed.  The regret of
the recipe's setting (:mod:`mupt.check.regret`) is measured against the best of those runs; the
check passes when it is at most ``max_regret`` percent.

A regret of 0 only says that no run in the neighbourhood beat the transferred setting: with factors
1/2 and 2 it bounds how far off the transferred LR can be (within a factor of 2 of the best of three),
not how far it is from the true optimum.  Each run is cached (one JSON file per run, keyed by its full
config) under ``<out>/points/``, so an interrupted check resumes.

Nothing here prints; the CLI renders the table and sets the exit code.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mupt.check.lr_transfer import PointCallback, SweepRun, run_configs
from mupt.check.regret import RegretRow, per_seed, regret_at, seed_means
from mupt.config import Recipe, RunConfig, Scheme, atomic_write_text, to_dict, with_overrides
from mupt.errors import ConfigError

#: LR multiples of the transferred LR trained by default: the setting itself and one octave either side.
DEFAULT_FACTORS = (0.5, 1.0, 2.0)
#: Largest regret (percent) that passes by default.
DEFAULT_MAX_REGRET = 1.0


@dataclass
class TargetSpec:
    """What ``mupt check target`` trains: ``run`` is the recipe's run config (the transferred setting)."""

    run: RunConfig
    steps: int
    seeds: list[int]
    factors: tuple[float, ...] = DEFAULT_FACTORS
    vs_sp: bool = False

    def validate(self) -> None:
        """Raises ConfigError (one line) for a bad budget, seed count or factor list."""
        if self.steps < 1:
            raise ConfigError(f"--steps {self.steps}: the budget must be at least 1 optimizer step")
        if not self.seeds:
            raise ConfigError("--seeds 0: give at least 1 seed")
        if 1.0 not in self.factors or len(set(self.factors)) < 2 or any(not (f > 0) for f in self.factors):
            raise ConfigError(
                f"--factors {','.join(f'{f:g}' for f in self.factors)}: give positive LR multiples that include 1 "
                "(the transferred LR) and at least one other, e.g. 0.5,1,2"
            )
        if self.vs_sp and self.run.param.scheme is Scheme.SP:
            raise ConfigError("--vs-sp: the recipe is already standard parametrization; leave --vs-sp out")
        if self.run.train.warmup_steps >= self.steps:
            raise ConfigError(
                f"--steps {self.steps}: the recipe warms up for {self.run.train.warmup_steps} steps; "
                "give a budget longer than the warmup"
            )

    @property
    def schemes(self) -> list[Scheme]:
        return [self.run.param.scheme] + ([Scheme.SP] if self.vs_sp else [])

    def configs(self) -> list[RunConfig]:
        """One config per (scheme, LR factor, seed); the recipe's own setting first."""
        base = with_overrides(self.run, {"train.steps": self.steps, "train.eval_every": self.steps})
        order = sorted(self.factors, key=lambda f: (f != 1.0, f))
        return [
            with_overrides(base, {"param.scheme": s, "train.lr": self.run.train.lr * f, "train.seed": seed})
            for s in self.schemes
            for f in order
            for seed in self.seeds
        ]


@dataclass
class TargetReport:
    """Outcome of :func:`check_target`: the regret row of the transferred setting, the verdict, every run."""

    passed: bool
    max_regret: float  # percent
    row: RegretRow
    table: list[dict[str, Any]]  # one row per (scheme, factor): lr, seed-mean loss, seed std, regret vs best
    sweep: SweepRun
    files: dict[str, str] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def _table(points: Sequence[dict[str, Any]], spec: TargetSpec, best: float | None) -> list[dict[str, Any]]:
    means = seed_means(points)
    seeds = per_seed(points)
    width = spec.run.model.d_model
    rows = []
    for s in spec.schemes:
        for f in sorted(spec.factors):
            x = round(math.log2(spec.run.train.lr * f), 6)
            key = (s.value, width, x)
            loss = means.get(key)
            vals = [v for v in seeds.get(key, {}).values() if v is not None]
            std = statistics.stdev(vals) if len(vals) > 1 else None
            rows.append({
                "scheme": s.value, "factor": f, "lr": spec.run.train.lr * f, "log2_lr": x, "loss": loss,
                "seed_std": std, "diverged": key in means and loss is None,
                "regret_pct": None if loss is None or best is None else 100.0 * (loss / best - 1.0),
                "transferred": s is spec.run.param.scheme and f == 1.0,
            })  # fmt: skip
    return rows


def check_target(
    spec: TargetSpec,
    out_dir: str | Path,
    max_regret: float = DEFAULT_MAX_REGRET,
    workers: int = 1,
    threads: int | None = None,
    on_point: PointCallback | None = None,
) -> TargetReport:
    """Train (or reuse) every run of ``spec``, measure the transferred setting's regret, write target.json.

    Regret in percent of the best seed-mean final validation loss (nats/token) over the runs; the
    check passes iff the transferred setting did not diverge and its regret <= ``max_regret``.
    Raises ConfigError for a bad spec, StorageError for an unwritable ``out_dir``.
    """
    spec.validate()
    if not (math.isfinite(max_regret) and max_regret >= 0):
        raise ConfigError(f"--max-regret {max_regret}: give a percentage >= 0, e.g. 1")
    out = Path(out_dir)
    sweep = run_configs(spec.configs(), out, workers, threads, on_point)
    width = spec.run.model.d_model
    row = regret_at(sweep.points, width, spec.run.param.scheme.value, math.log2(spec.run.train.lr))
    reasons = list(row.notes)
    if row.regret_pct is not None and row.regret_pct > max_regret:
        reasons.append(
            f"regret {row.regret_pct:.2f}% > max {max_regret:g}%: {row.best_scheme} at LR "
            f"{2.0 ** (row.best_log2_lr or 0.0):.3g} is better; re-tune the proxy or use that LR"
        )
    passed = row.regret_pct is not None and row.regret_pct <= max_regret
    table = _table(sweep.points, spec, row.best_loss)
    files = {"json": str(out / "target.json")}
    doc = {
        "passed": passed,
        "max_regret_pct": max_regret,
        "regret": row.to_dict(),
        "table": table,
        "reasons": reasons,
        "width": width,
        "steps": spec.steps,
        "seeds": spec.seeds,
        "factors": list(spec.factors),
        "schemes": [s.value for s in spec.schemes],
        "run": to_dict(spec.run),
        "points": [{k: v for k, v in p.items() if k != "config"} for p in sweep.points],
        "cache_hits": sweep.cache_hits,
        "trained": sweep.trained,
    }
    atomic_write_text(files["json"], json.dumps(doc, indent=1))
    return TargetReport(passed, max_regret, row, table, sweep, files, reasons)


def spec_from_recipe(
    recipe: Recipe, steps: int | None, seeds: int, factors: Sequence[float] = DEFAULT_FACTORS, vs_sp: bool = False
) -> TargetSpec:
    """The check of ``recipe``: its run for ``steps`` (default: the recipe's own) x ``factors`` x ``seeds``
    seeds (the recipe's seed and the next ones).  Raises ConfigError for a bad value (see
    :meth:`TargetSpec.validate`)."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be at least 1")
    run = recipe.run
    spec = TargetSpec(run, steps if steps is not None else run.train.steps,
                      [run.train.seed + i for i in range(seeds)], tuple(factors), vs_sp)  # fmt: skip
    spec.validate()
    return spec


__all__ = ["DEFAULT_FACTORS", "DEFAULT_MAX_REGRET", "TargetReport", "TargetSpec", "check_target", "spec_from_recipe"]
