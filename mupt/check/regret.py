"""Transfer regret: the loss a transferred setting gives up against the best found by tuning at the target.

Definitions (docs/transfer.md; used by ``mupt check transfer`` and ``mupt check target``):

* A *point* is one training run: (scheme, width, log2 LR, seed) and its final validation loss in
  nats/token (``None`` when the run diverged), as :func:`mupt.check.lr_transfer.run_point` records it.
* loss(scheme, width, x): the mean over seeds of the final validation loss at LR 2^x; ``None`` (diverged)
  when any seed diverged.
* The *transferred setting* at width w: the scheme under test at the LR (and multipliers) taken from the
  base width unchanged (µP's claim: the base optimum is the optimum at every width).  In a sweep, its
  LR is the base width's grid argmin of the seed-mean loss.
* best(w): the smallest seed-mean loss at width w over every scheme and LR measured there (each scheme
  tuned directly at w).
* regret(w) = loss(transferred, w) / best(w) - 1, in percent (0 when the transferred setting is the best).
* Its seed standard error: the same ratio per seed (both points trained with that seed, the same data
  order), r_s = loss_s(transferred) / loss_s(best point) - 1; s.e. = std over seeds / sqrt(seeds).
  Pairing by seed cancels the noise the two runs share; with one seed there is no s.e. (``None``).
* A transferred setting that diverged has no finite regret: ``regret_pct`` is ``None`` and ``diverged``
  is true; a gate counts it as a failure.

Nothing here prints or trains.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mupt.config import RunConfig, from_dict
from mupt.errors import ConfigError

#: LRs are compared on their log2, rounded so that 2^-9.5 from a grid and from a float match.
_DIGITS = 6

PointKey = tuple[str, int, float]  # (scheme, width, log2 lr)


def _x(log2_lr: float) -> float:
    return round(float(log2_lr), _DIGITS)


def per_seed(points: Iterable[dict[str, Any]]) -> dict[PointKey, dict[int, float | None]]:
    """(scheme, width, log2 LR) -> {seed: final val loss in nats/token, or None when that seed diverged}."""
    out: dict[PointKey, dict[int, float | None]] = {}
    for p in points:
        loss = p.get("final_val_loss")
        value = float(loss) if loss is not None and p.get("status", "ok") == "ok" else math.nan
        key = (str(p["scheme"]), int(p["width"]), _x(p["log2_lr"]))
        out.setdefault(key, {})[int(p["seed"])] = value if math.isfinite(value) else None
    return out


def seed_means(points: Iterable[dict[str, Any]]) -> dict[PointKey, float | None]:
    """(scheme, width, log2 LR) -> mean final val loss over seeds (nats/token); None when any seed diverged."""
    means: dict[PointKey, float | None] = {}
    for key, seeds in per_seed(points).items():
        vals = [v for v in seeds.values() if v is not None]
        means[key] = sum(vals) / len(vals) if vals and len(vals) == len(seeds) else None
    return means


@dataclass
class RegretRow:
    """Regret of the transferred setting at one width (losses in nats/token, regret in percent)."""

    width: int
    scheme: str  # the scheme under test (its transferred setting)
    transferred_log2_lr: float
    loss: float | None  # seed-mean loss of the transferred setting; None: diverged or not measured
    best_loss: float | None
    best_scheme: str | None
    best_log2_lr: float | None
    regret_pct: float | None
    se_pct: float | None  # seed standard error of regret_pct; None with fewer than 2 paired seeds
    seeds: int  # seeds paired between the transferred and the best point
    diverged: bool = False
    best_at_edge: bool = False  # the best point is at the edge of its scheme's LRs at this width
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def regret_at(points: Sequence[dict[str, Any]], width: int, scheme: str, log2_lr: float) -> RegretRow:
    """Regret of (``scheme``, LR 2^``log2_lr``) at ``width`` against every point measured at ``width``.

    ``points``: run records (scheme, width, log2_lr, seed, status, final_val_loss); those at other
    widths are ignored.  See the module docstring for the definitions.  Never raises for missing or
    diverged points: the row says so (``loss``/``regret_pct`` None, ``diverged``, ``notes``).
    """
    seeds = per_seed(p for p in points if int(p["width"]) == width)
    means = seed_means(p for p in points if int(p["width"]) == width)
    xt = _x(log2_lr)
    key = (scheme, width, xt)
    row = RegretRow(width, scheme, xt, None, None, None, None, None, None, 0)
    finite = {k: v for k, v in means.items() if v is not None}
    if finite:
        bk = min(finite, key=lambda k: (finite[k], k))
        row.best_loss, row.best_scheme, row.best_log2_lr = finite[bk], bk[0], bk[2]
        xs = sorted(k[2] for k in means if k[0] == bk[0])
        row.best_at_edge = len(xs) > 1 and bk[2] in (xs[0], xs[-1])
        if row.best_at_edge:
            row.notes.append(
                f"the best {bk[0]} LR ({2.0 ** bk[2]:.3g}) is at the edge of those measured: a better one may be beyond"
            )
    if key not in means:
        row.notes.append(f"the transferred setting ({scheme}, LR {2.0**xt:.3g}) was not measured at width {width}")
        return row
    if means[key] is None:
        row.diverged = True
        row.notes.append(f"the transferred setting ({scheme}, LR {2.0**xt:.3g}) diverged at width {width}")
        return row
    row.loss = means[key]
    assert row.best_loss is not None and row.best_scheme is not None and row.best_log2_lr is not None
    row.regret_pct = 100.0 * (row.loss / row.best_loss - 1.0)  # type: ignore[operator]
    best = seeds[(row.best_scheme, width, row.best_log2_lr)]
    mine = seeds[key]
    paired = sorted(s for s in mine if s in best and mine[s] is not None and best[s] is not None)
    row.seeds = len(paired)
    if len(paired) >= 2:
        per = [100.0 * (mine[s] / best[s] - 1.0) for s in paired]  # type: ignore[operator]
        row.se_pct = statistics.stdev(per) / math.sqrt(len(per))
    return row


def base_optimum(points: Sequence[dict[str, Any]], scheme: str, base_width: int) -> float | None:
    """Grid argmin of the seed-mean loss of ``scheme`` at ``base_width`` (log2 LR), or None if all diverged.

    Ties go to the smaller LR (the safer side)."""
    means = {k: v for k, v in seed_means(points).items() if k[0] == scheme and k[1] == base_width and v is not None}
    if not means:
        return None
    return min(means, key=lambda k: (means[k], k[2]))[2]


def regret_by_width(points: Sequence[dict[str, Any]], scheme: str, base_width: int | None = None) -> list[RegretRow]:
    """Regret of ``scheme``'s base-width optimum LR at every width above the base (narrowest first).

    ``base_width`` defaults to the smallest width in ``points``.  An empty list when the base width has
    no finite point of ``scheme`` (nothing can be transferred).
    """
    widths = sorted({int(p["width"]) for p in points})
    if not widths:
        return []
    bw = widths[0] if base_width is None else base_width
    xt = base_optimum(points, scheme, bw)
    if xt is None:
        return []
    return [regret_at(points, w, scheme, xt) for w in widths if w > bw]


def worst_regret(rows: Sequence[RegretRow]) -> float | None:
    """The largest regret over ``rows`` (percent); ``inf`` when any transferred setting diverged or was not
    measured, ``None`` for no rows."""
    if not rows:
        return None
    if any(r.regret_pct is None for r in rows):
        return math.inf
    return max(r.regret_pct for r in rows if r.regret_pct is not None)


def regret_table(points: Sequence[dict[str, Any]], scheme: str, base_width: int | None = None) -> list[dict[str, Any]]:
    """:func:`regret_by_width` as plain dicts (for JSON)."""
    return [r.to_dict() for r in regret_by_width(points, scheme, base_width)]


# --- the regret a recipe can expect: a `mupt check transfer` result for the same proxy ---------------------

#: Model fields that must agree between a check-transfer sweep and a proxy for its regret to apply
#: (d_model is the width being transferred; scan_backend does not change the math).
_SAME_MODEL = ("arch", "n_layers", "d_state", "d_conv", "expand", "vocab_size", "discretization", "tie_embeddings",
               "headdim", "ngroups")  # fmt: skip


@dataclass
class ExpectedRegret:
    """The regret measured by a check-transfer sweep whose base is the proxy (rows as in transfer.json)."""

    path: str
    base_width: int
    rows: list[dict[str, Any]]  # one per checked width above the base (RegretRow.to_dict())
    target_width: int
    seeds: int
    steps: int
    at_target: dict[str, Any] | None  # the row at the target width, when it was checked
    wider_than_checked: bool
    #: why the numbers may not hold for this recipe, one phrase each: the check failed (its reasons), it ran
    #: one seed, or another training length than the proxy's
    caveats: list[str] = field(default_factory=list)

    @property
    def max_checked(self) -> int:
        return max([self.base_width, *(int(r["width"]) for r in self.rows)])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def proxy_mismatch(result: dict[str, Any], proxy: RunConfig) -> str | None:
    """Why a transfer.json does not describe ``proxy``'s transfer (one phrase), or None when it does: the
    base width is the proxy's d_model, the gated scheme its scheme, and the model shape (but width), data
    and optimizer agree."""
    try:
        base = from_dict(RunConfig, result["base_config"])
        widths = sorted({int(p["width"]) for p in result["points"]})
    except (KeyError, TypeError, ValueError, ConfigError):
        return "not a transfer.json written by mupt check transfer"
    if "regret" not in result:
        return "written before mupt measured regret; rerun mupt check transfer"
    if widths[0] != proxy.model.d_model:
        return f"its base width is {widths[0]}, the proxy's d_model {proxy.model.d_model}"
    if result.get("gate") != proxy.param.scheme.value:
        return f"it gates scheme {result.get('gate')}, the proxy uses {proxy.param.scheme.value}"
    for name in _SAME_MODEL:
        a, b = getattr(base.model, name), getattr(proxy.model, name)
        if a != b:
            return f"model.{name} is {a} there, {b} in the proxy"
    if base.data.source != proxy.data.source:
        return f"it trained on {base.data.source}, the proxy on {proxy.data.source}"
    if base.train.optimizer != proxy.train.optimizer:
        return f"it used {base.train.optimizer.value}, the proxy {proxy.train.optimizer.value}"
    return None


def expected_regret(path: str | Path, proxy: RunConfig, target_width: int) -> ExpectedRegret:
    """The regret that ``path`` (a check-transfer transfer.json) measured for ``proxy``'s transfer.

    Raises ConfigError (one line naming the file and the difference) when it is unreadable or measured
    another proxy (:func:`proxy_mismatch`).
    """
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--check {path}: cannot read it as a transfer.json ({e}); pass mupt check transfer's "
                          "transfer.json") from None  # fmt: skip
    why = proxy_mismatch(result, proxy) if isinstance(result, dict) else "not a JSON object"
    if why is not None:
        raise ConfigError(f"--check {path}: not this proxy's transfer ({why}); pass a matching check result")
    rows = list(result["regret"])
    at = next((r for r in rows if int(r["width"]) == target_width), None)
    base_width = min(int(p["width"]) for p in result["points"])
    checked = max([base_width, *(int(r["width"]) for r in rows)])
    seeds = len({int(p["seed"]) for p in result["points"]})
    steps = int(result.get("meta", {}).get("steps", 0))
    caveats = []
    if result.get("passed") is False:
        reasons = result.get("results", {}).get(result.get("gate"), {}).get("reasons") or []
        caveats.append("the check FAILED" + (f" ({'; '.join(reasons)})" if reasons else ""))
    if seeds == 1:
        caveats.append("1 seed: no standard error")
    if steps and steps != proxy.train.steps:
        caveats.append(f"it trained {steps} steps per point, the proxy {proxy.train.steps}")
    return ExpectedRegret(str(path), base_width, rows, target_width, seeds, steps, at, target_width > checked, caveats)


def find_expected_regret(runs_dir: str | Path, proxy: RunConfig, target_width: int) -> ExpectedRegret | None:
    """The newest ``runs_dir/*/transfer.json`` (or ``*/transfer/transfer.json``, `check all`'s layout) that
    measured ``proxy``'s transfer, as :func:`expected_regret`; None when there is none."""
    root = Path(runs_dir)
    candidates = [*root.glob("*/transfer.json"), *root.glob("*/transfer/transfer.json")]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return expected_regret(path, proxy, target_width)
        except ConfigError:
            continue
    return None


__all__ = [
    "ExpectedRegret",
    "RegretRow",
    "base_optimum",
    "expected_regret",
    "find_expected_regret",
    "per_seed",
    "proxy_mismatch",
    "regret_at",
    "regret_by_width",
    "regret_table",
    "seed_means",
    "worst_regret",
]
