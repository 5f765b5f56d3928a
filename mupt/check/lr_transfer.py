"""LR-transfer check: loss vs log2(LR) at several widths, the optimum's drift, and a verdict.

This reproduces the paper's Figure 3 on the user's model and data.  Every (scheme, width, LR,
seed) point is one independent training run of ``train.steps`` steps with the same data order
and seed across widths; the base shape of the width rules is the smallest width.  Points run
in parallel worker processes (spawn) and each finished point is cached on disk as one small
JSON file under ``<out>/points/<key>.json``, keyed by a hash of its full run config, so an
interrupted sweep resumes and reuses what it finished.

Definitions (also in docs/ci.md):

* loss(w, lr): final validation loss (nats/token) at step K, the mean over seeds; a point
  counts as diverged (missing) when any of its seeds diverged.
* lr*(w): grid argmin of loss(w, .) in log2(LR), refined by the vertex of the parabola
  through the argmin and its two grid neighbours (when both exist and did not diverge),
  clamped to the interval between those neighbours.  An argmin at the edge of the grid is
  not refined and is flagged ``at_edge`` (the true optimum may lie outside the grid).
* drift: max over widths of |log2 lr*(w) - log2 lr*(base)|, base = the smallest width.
* monotone at the base optimum (the gate): at the base width's grid-argmin LR, the loss of
  every width is <= the loss of the next narrower width + ``monotone_tol`` (a diverged point
  counts as worse than anything).
* monotone at each optimum (reported, not gated): the same test on each width's best grid loss.
* regret(w) (mupt.check.regret): loss at width w of the gated scheme at the base width's grid-argmin LR
  (multipliers unchanged) / the best seed-mean loss at w over every scheme swept - 1, in %, with a
  seed standard error (per-seed ratios); reported for every width above the base.
* passed: no width's optimum at the grid's edge (its drift would be unknown), drift <= ``max_drift``,
  monotone at the base optimum, and regret <= ``max_regret`` % at every width (a diverged transferred
  setting fails).

Nothing here prints; the CLI renders tables and progress.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass

from mupt.check.regret import RegretRow, per_seed, regret_by_width, worst_regret
from mupt.config import RunConfig, Scheme, atomic_write_text, from_dict, to_dict, with_overrides
from mupt.errors import ConfigError, StorageError
from mupt.tables import write_beside
from mupt.threads import default_threads

if TYPE_CHECKING:
    import pandas as pd

CACHE_VERSION = 1

# --- parsing user input -------------------------------------------------------------------

_POW = r"\s*2\s*\^\s*(-?\d+(?:\.\d+)?)\s*"
_RANGE = re.compile(rf"^{_POW}\.\.{_POW}(?::\s*(\d+(?:\.\d+)?)\s*)?$")


def _one_lr(token: str, text: str) -> float:
    tok = token.strip()
    m = re.fullmatch(_POW, tok)
    try:
        value = 2.0 ** float(m.group(1)) if m else float(tok)
    except ValueError:
        raise ConfigError(
            f"--lrs {text!r}: {tok!r} is not a learning rate; use numbers (1e-3,3e-3), powers (2^-10,2^-8) "
            "or a range 2^-14..2^-4[:0.5]"
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--lrs {text!r}: {tok!r} must be a positive finite learning rate")
    return value


def parse_lr_grid(text: str) -> list[float]:
    """``2^-14..2^-4`` (step 1 in log2), ``2^-14..2^-4:0.5`` or a comma list -> sorted LRs."""
    m = _RANGE.match(text)
    if m:
        lo, hi = float(m.group(1)), float(m.group(2))
        step = float(m.group(3)) if m.group(3) else 1.0
        if step <= 0 or hi <= lo:
            raise ConfigError(
                f"--lrs {text!r}: need low < high and a positive step, e.g. 2^-14..2^-4 or 2^-14..2^-4:0.5"
            )
        n = int(math.floor((hi - lo) / step + 1e-9)) + 1
        exps = [lo + i * step for i in range(n)]
    elif ".." in text:
        raise ConfigError(f"--lrs {text!r}: a range must look like 2^-14..2^-4 or 2^-14..2^-4:0.5")
    else:
        exps = [math.log2(_one_lr(t, text)) for t in text.split(",")]
    exps = sorted({round(e, 9) for e in exps})
    if len(exps) < 3:
        raise ConfigError(f"--lrs {text!r}: give at least 3 learning rates so the optimum can be located")
    return [2.0**e for e in exps]


# --- points and the cache -----------------------------------------------------------------


def point_key(cfg: RunConfig) -> str:
    """Hash of the full run config (plus the cache version): same config -> same point."""
    blob = json.dumps({"v": CACHE_VERSION, "cfg": to_dict(cfg)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def point_config(base: RunConfig, scheme: Scheme, width: int, lr: float, seed: int, base_width: int) -> RunConfig:
    return with_overrides(
        base,
        {
            "param.scheme": scheme,
            "model.d_model": width,
            "param.base_d_model": base_width,
            "train.lr": lr,
            "train.seed": seed,
            "train.eval_every": base.train.steps,  # evaluate once, at step K
        },
    )


def run_point(cfg_dict: dict[str, Any], threads: int) -> dict[str, Any]:
    """Train one point (runs in a worker process); returns its JSON record."""
    import torch

    from mupt.train import Trainer

    torch.set_num_threads(max(1, threads))
    cfg = from_dict(RunConfig, cfg_dict)
    res = Trainer(cfg).run()
    loss = res.final_val_loss if res.status == "ok" else None
    return {
        "key": point_key(cfg),
        "scheme": cfg.param.scheme.value,
        "width": cfg.model.d_model,
        "lr": cfg.train.lr,
        "log2_lr": math.log2(cfg.train.lr),
        "seed": cfg.train.seed,
        "status": res.status,
        "reason": res.reason,
        "final_val_loss": loss if loss is None or math.isfinite(loss) else None,
        "val_se": res.final_val_se if loss is not None else None,  # batch standard error, nats/token
        "val_tokens": res.final_val_tokens,
        "steps": res.steps,
        "seconds": res.seconds,
        "config": to_dict(cfg),
    }


class PointCache:
    """One JSON file per finished point under ``<out>/points/``, written atomically."""

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir) / "points"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                f"--out {out_dir}: cannot create {self.dir} ({e.strerror}); pick a writable directory"
            ) from None

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # unreadable: retrain it (atomic writes make this unlikely)
        return rec if isinstance(rec, dict) and rec.get("key") == key else None

    def put(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.path(record["key"]), json.dumps(record, indent=1))


@pydantic_dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class SweepSpec:
    """What an LR-transfer check sweeps (typed, validated when built: one-line ConfigError).

    ``base`` is the run every point starts from; ``widths`` are d_model values (the smallest is the base
    shape, >= 2 distinct); ``lrs`` the base-LR grid (>= 3 positive, finite values, so that a parabola can
    locate the optimum, docs/ci.md); ``schemes`` the first of which is gated; ``seeds`` per point.
    """

    base: RunConfig
    widths: list[int]
    lrs: list[float]
    schemes: list[Scheme]
    seeds: list[int]

    def __post_init__(self) -> None:
        if len(set(self.widths)) < 2 or min(self.widths) <= 0:
            raise ConfigError(f"widths {self.widths}: give at least two distinct positive d_model widths")
        if len(set(self.lrs)) < 3 or not all(math.isfinite(x) and x > 0 for x in self.lrs):
            raise ConfigError(f"lrs {self.lrs}: give at least 3 distinct positive, finite learning rates")
        if not self.schemes or len(set(self.schemes)) != len(self.schemes):
            raise ConfigError(f"schemes {[s.value for s in self.schemes]}: give one or more distinct schemes")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds {self.seeds}: give one or more distinct seeds")

    def configs(self) -> list[RunConfig]:
        bw = min(self.widths)
        # widest first so the slowest runs start early and the pool drains evenly
        return [
            point_config(self.base, s, w, lr, seed, bw)
            for w in sorted(self.widths, reverse=True)
            for s in self.schemes
            for lr in self.lrs
            for seed in self.seeds
        ]


def validate_spec(spec: SweepSpec) -> None:
    """Build each (scheme, width) model once so bad shapes fail here, in one line, not in a worker."""
    from mupt.train import build_model

    bw = min(spec.widths)
    for scheme in spec.schemes:
        for w in spec.widths:
            build_model(point_config(spec.base, scheme, w, spec.lrs[0], spec.seeds[0], bw))


@dataclass
class SweepRun:
    points: list[dict[str, Any]]
    cache_hits: int
    trained: int


PointCallback = Callable[[dict[str, Any], bool], None]  # (record, from_cache)


def run_sweep(
    spec: SweepSpec,
    out_dir: str | Path,
    workers: int = 1,
    threads: int | None = None,
    on_point: PointCallback | None = None,
) -> SweepRun:
    """Train every missing point of ``spec`` (cached ones are reused) and return all records (see
    :func:`run_configs`)."""
    return run_configs(spec.configs(), out_dir, workers, threads, on_point)


def run_configs(
    configs: Sequence[RunConfig],
    out_dir: str | Path,
    workers: int = 1,
    threads: int | None = None,
    on_point: PointCallback | None = None,
) -> SweepRun:
    """Train every config whose point is not cached under ``out_dir/points/``; all records, in order.

    ``workers == 1`` trains in this process; more use a spawn ProcessPoolExecutor.  Every point
    is cached as soon as it finishes, so an interruption (Ctrl-C, a crash, a killed CI job)
    loses at most the points in flight.  Raises ConfigError for ``workers < 1``, StorageError
    for an unwritable ``out_dir``.
    """
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    threads = threads or default_threads(workers)
    cache = PointCache(out_dir)
    records: dict[str, dict[str, Any]] = {}
    todo: list[RunConfig] = []
    hits = 0
    for cfg in configs:
        key = point_key(cfg)
        rec = cache.get(key)
        if rec is not None:
            records[key] = rec
            hits += 1
            if on_point is not None:
                on_point(rec, True)
        elif key not in records:
            todo.append(cfg)

    def finish(rec: dict[str, Any]) -> None:
        cache.put(rec)
        records[rec["key"]] = rec
        if on_point is not None:
            on_point(rec, False)

    if workers == 1 or len(todo) <= 1:
        for cfg in todo:
            finish(run_point(to_dict(cfg), threads))
    elif todo:
        ctx = mp.get_context("spawn")
        pool = cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx)
        try:
            futures = [pool.submit(run_point, to_dict(cfg), threads) for cfg in todo]
            for fut in cf.as_completed(futures):
                finish(fut.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    ordered = [records[point_key(cfg)] for cfg in configs]
    return SweepRun(points=ordered, cache_hits=hits, trained=len(todo))


# --- analysis -----------------------------------------------------------------------------

LossTable = dict[int, dict[float, float | None]]  # width -> {log2 lr: mean loss or None (diverged)}


def loss_table(points: Sequence[dict[str, Any]], scheme: str) -> LossTable:
    """Mean final val loss over seeds per (width, log2 LR); None when any seed diverged."""
    acc: dict[int, dict[float, list[float | None]]] = {}
    for p in points:
        if p["scheme"] != scheme:
            continue
        acc.setdefault(int(p["width"]), {}).setdefault(round(float(p["log2_lr"]), 9), []).append(
            p["final_val_loss"] if p["status"] == "ok" else None
        )
    table: LossTable = {}
    for w, row in sorted(acc.items()):
        table[w] = {}
        for x, vals in sorted(row.items()):
            ok = [v for v in vals if v is not None and math.isfinite(v)]
            table[w][x] = sum(ok) / len(ok) if ok and len(ok) == len(vals) else None
    return table


def refine_optimum(xs: Sequence[float], ys: Sequence[float | None]) -> tuple[float | None, int | None, bool]:
    """(refined log2 lr*, grid argmin index, at_edge) for one width's curve."""
    finite = [(i, y) for i, y in enumerate(ys) if y is not None and math.isfinite(y)]
    if not finite:
        return None, None, False
    i, y1 = min(finite, key=lambda t: (t[1], t[0]))
    if i == 0 or i == len(xs) - 1:
        return xs[i], i, True
    y0, y2 = ys[i - 1], ys[i + 1]
    if y0 is None or y2 is None or not (math.isfinite(y0) and math.isfinite(y2)):
        return xs[i], i, False
    x0, x1, x2 = xs[i - 1], xs[i], xs[i + 1]
    # vertex of the parabola through the three points (general spacing)
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    if a <= 0:  # flat (ties): keep the grid point
        return x1, i, False
    return min(max(-b / (2 * a), x0), x2), i, False


@dataclass
class WidthResult:
    width: int
    opt_log2_lr: float | None
    grid_best_log2_lr: float | None
    best_loss: float | None
    at_edge: bool
    loss_at_base_opt: float | None
    shift: float | None  # opt_log2_lr - base opt


@dataclass
class SchemeResult:
    scheme: str
    widths: list[WidthResult]
    drift: float | None
    monotone_at_base_opt: bool
    monotone_at_each_opt: bool
    base_opt_log2_lr: float | None
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def verdicts(self, max_drift: float) -> dict[str, str]:
        """The gate's parts, each "PASS", "FAIL" or "unknown": drift (<= ``max_drift`` log2), monotonicity
        (loss at the base optimum improves with width) and whether every optimum lies inside the LR grid
        (an argmin at an edge is a bound, so the drift is then unknown)."""
        edge = any(w.at_edge for w in self.widths)
        drift = "unknown" if self.drift is None or edge else "PASS" if self.drift <= max_drift else "FAIL"
        mono = "unknown" if self.base_opt_log2_lr is None else "PASS" if self.monotone_at_base_opt else "FAIL"
        return {"drift": drift, "monotonicity": mono, "optimum inside the grid": "FAIL" if edge else "PASS"}


def _monotone(values: Sequence[float | None], tol: float) -> bool:
    for narrow, wide in zip(values, values[1:], strict=False):
        if wide is None:
            return False
        if narrow is not None and wide > narrow + tol:
            return False
    return True


def analyze(table: LossTable, scheme: str, max_drift: float = 1.0, monotone_tol: float = 0.0) -> SchemeResult:
    """Per-width optimum, drift and monotonicity for one scheme's loss table (see module doc)."""
    widths = sorted(table)
    xs = sorted({x for row in table.values() for x in row})
    base = widths[0]
    per: list[WidthResult] = []
    for w in widths:
        ys = [table[w].get(x) for x in xs]
        opt, idx, edge = refine_optimum(xs, ys)
        per.append(WidthResult(w, opt, xs[idx] if idx is not None else None, ys[idx] if idx is not None else None,
                               edge, None, None))  # fmt: skip
    base_res = per[0]
    reasons: list[str] = []
    if base_res.opt_log2_lr is None:
        drift = None
        reasons.append(f"every point of the base width {base} diverged")
    else:
        for r in per:
            r.loss_at_base_opt = table[r.width].get(base_res.grid_best_log2_lr)  # type: ignore[arg-type]
            r.shift = None if r.opt_log2_lr is None else r.opt_log2_lr - base_res.opt_log2_lr
        missing = [r.width for r in per if r.opt_log2_lr is None]
        if missing:
            drift = None
            reasons.append(f"every point diverged at width(s) {missing}")
        else:
            drift = max(abs(r.shift) for r in per)  # type: ignore[arg-type]
            if drift > max_drift:
                reasons.append(f"optimum drifts {drift:.2f} log2 units > max {max_drift:g}")
    mono_base = base_res.opt_log2_lr is not None and _monotone([r.loss_at_base_opt for r in per], monotone_tol)
    mono_each = _monotone([r.best_loss for r in per], monotone_tol)
    if base_res.opt_log2_lr is not None and not mono_base:
        reasons.append("loss does not improve monotonically with width at the base optimum")
    # an argmin at the grid's edge is a bound, not an optimum: the drift is unknown, so the gate cannot pass
    edges = [r.width for r in per if r.at_edge]
    passed = drift is not None and drift <= max_drift and mono_base and not edges
    if edges:
        reasons.append(
            f"optimum at the grid edge for width(s) {edges}: the drift is unknown (the optimum may lie outside "
            "the grid); widen --lrs"
        )
    return SchemeResult(scheme, per, drift, mono_base, mono_each, base_res.opt_log2_lr, passed, reasons)


# --- outputs ------------------------------------------------------------------------------


def plot_transfer(
    tables: dict[str, LossTable],
    results: dict[str, SchemeResult],
    path: str | Path,
    regret: Sequence[RegretRow] = (),
    max_regret: float | None = None,
) -> None:
    """Figure-3-style PNG: val loss vs log2 LR, one curve per width, one panel per scheme; with ``regret``
    a last panel of the gated scheme's regret (%) vs width, seed standard errors as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tables)
    panels = n + (1 if regret else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    for ax in axes[0][1:n]:
        ax.sharey(axes[0][0])
    for ax, (scheme, table) in zip(axes[0][:n], tables.items(), strict=True):
        widths = sorted(table)
        cmap = plt.get_cmap("viridis")
        res = results[scheme]
        for k, w in enumerate(widths):
            color = cmap(k / max(1, len(widths) - 1) * 0.9)
            xs = sorted(table[w])
            ys = [table[w][x] if table[w][x] is not None else float("nan") for x in xs]
            ax.plot(xs, ys, "o-", color=color, label=f"d_model={w}", ms=4)
            wr = next(r for r in res.widths if r.width == w)
            if wr.opt_log2_lr is not None and wr.best_loss is not None:
                ax.axvline(wr.opt_log2_lr, color=color, ls=":", lw=1)
        drift = "n/a" if res.drift is None else f"{res.drift:.2f}"
        role = "gate" if scheme == next(iter(tables)) else "contrast"
        ax.set_title(f"{scheme} ({role}): drift {drift} log2, {'PASS' if res.passed else 'FAIL'}")
        ax.set_xlabel("log2 learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final validation loss (nats/token)")
    axes[0][n - 1].legend(fontsize=8)
    if regret:
        ax = axes[0][n]
        rows = [r for r in regret if r.regret_pct is not None]
        ax.errorbar([r.width for r in rows], [r.regret_pct for r in rows], yerr=[r.se_pct or 0.0 for r in rows],
                    fmt="o-", capsize=3, color="tab:red", label="regret (± seed s.e.)")  # fmt: skip
        for r in regret:
            if r.regret_pct is None:
                ax.annotate("diverged" if r.diverged else "n/a", (r.width, 0), color="tab:red", ha="center")
        if max_regret is not None and math.isfinite(max_regret):
            ax.axhline(max_regret, color="gray", ls="--", lw=1, label=f"max {max_regret:g}%")
        ax.set_xscale("log", base=2)
        ax.set_xticks([r.width for r in regret], [str(r.width) for r in regret])
        ax.set_xlabel("d_model")
        ax.set_ylabel("regret of the transferred setting (%)")
        ax.set_title(f"{regret[0].scheme}: regret vs the best of every scheme swept")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _fmt(v: float | None, d: int = 3) -> str:
    return "diverged" if v is None else f"{v:.{d}f}"


def regret_markdown(regret: Sequence[RegretRow], max_regret: float | None) -> list[str]:
    """The regret table as Markdown lines (width, transferred LR and loss, best scheme/LR/loss, regret)."""
    if not regret:
        return []
    gate = "" if max_regret is None or not math.isfinite(max_regret) else f" (max {max_regret:g}%)"
    lines = [
        f"### regret of {regret[0].scheme}'s transferred setting{gate}",
        "",
        "| width | transferred LR | loss | best | best LR | best loss | regret % | ± seed s.e. |",
        "|---:|---:|---:|:---|---:|---:|---:|---:|",
    ]
    for r in regret:
        reg = "diverged" if r.diverged else "-" if r.regret_pct is None else f"**{r.regret_pct:.2f}**"
        lines.append(
            f"| {r.width} | 2^{r.transferred_log2_lr:g} | {_fmt(r.loss, 4)} | {r.best_scheme or '-'} | "
            + ("-" if r.best_log2_lr is None else f"2^{r.best_log2_lr:g}")
            + f" | {_fmt(r.best_loss, 4)} | {reg} | {'-' if r.se_pct is None else f'{r.se_pct:.2f}'} |"
        )
    lines.append("")
    lines += [f"- width {r.width}: {note}" for r in regret for note in r.notes]
    return [*lines, ""]


def markdown_summary(
    tables: dict[str, LossTable],
    results: dict[str, SchemeResult],
    gate: str,
    max_drift: float,
    meta: dict[str, Any],
    regret: Sequence[RegretRow] = (),
    max_regret: float | None = None,
    passed: bool | None = None,
) -> str:
    """GitHub-flavoured Markdown for $GITHUB_STEP_SUMMARY (``passed``: the overall verdict, default the
    gated scheme's drift verdict)."""
    g = results[gate]
    ok = g.passed if passed is None else passed
    regret_gate = "" if max_regret is None or not math.isfinite(max_regret) else f", regret <= {max_regret:g}%"
    lines = [
        f"## mupt check transfer: {'PASS' if ok else 'FAIL'} ({gate})",
        "",
        f"Gate: drift <= {max_drift:g} log2, loss non-increasing with width at the base optimum{regret_gate}. "
        + ", ".join(f"{k}={v}" for k, v in meta.items()),
        "",
        *regret_markdown(regret, max_regret),
    ]
    for scheme, table in tables.items():
        r = results[scheme]
        xs = sorted({x for row in table.values() for x in row})
        lines += [f"### {scheme}" + (" (gate)" if scheme == gate else " (contrast)"), ""]
        lines.append("| width | " + " | ".join(f"2^{x:g}" for x in xs) + " | log2 lr* | shift |")
        lines.append("|---:|" + "---:|" * len(xs) + "---:|---:|")
        for wr in r.widths:
            cells = []
            for x in xs:
                v = table[wr.width].get(x)
                c = _fmt(v)
                cells.append(f"**{c}**" if x == wr.grid_best_log2_lr else c)
            opt = "-" if wr.opt_log2_lr is None else f"{wr.opt_log2_lr:.2f}" + (" (edge)" if wr.at_edge else "")
            shift = "-" if wr.shift is None else f"{wr.shift:+.2f}"
            lines.append(f"| {wr.width} | " + " | ".join(cells) + f" | {opt} | {shift} |")
        drift = "n/a" if r.drift is None else f"{r.drift:.2f}"
        lines += [
            "",
            f"drift **{drift}** log2; monotone at base optimum: **{r.monotone_at_base_opt}**; "
            f"monotone at each optimum: {r.monotone_at_each_opt}; verdict **{'PASS' if r.passed else 'FAIL'}**",
            "",
        ]
        lines += [f"- {why}" for why in r.reasons]
        lines.append("")
    return "\n".join(lines)


@dataclass
class TransferReport:
    """Outcome of :func:`check_transfer`: ``passed`` is the gated scheme's drift verdict and the regret gate."""

    gate: str
    passed: bool
    tables: dict[str, LossTable]
    results: dict[str, SchemeResult]
    sweep: SweepRun
    files: dict[str, str]
    regret: list[RegretRow] = field(default_factory=list)
    regret_passed: bool = True
    max_regret: float | None = None
    noise: dict[str, Any] = field(default_factory=dict)


def measurement_noise(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How noisy one point's loss is (nats/token): the median over points of the last evaluation's standard
    error over validation windows (``val_se``), the median over (scheme, width, LR) of the seed std, and
    the validation tokens per point."""
    ses = sorted(float(p["val_se"]) for p in points if p.get("val_se") is not None)
    stds = sorted(
        statistics.stdev(v for v in seeds.values() if v is not None)
        for seeds in per_seed(points).values()
        if sum(v is not None for v in seeds.values()) >= 2
    )
    tokens = [int(p["val_tokens"]) for p in points if p.get("val_tokens")]
    return {
        "val_tokens": max(tokens) if tokens else None,
        "batch_se_median": ses[len(ses) // 2] if ses else None,
        "seed_std_median": stds[len(stds) // 2] if stds else None,
    }


def check_transfer(
    spec: SweepSpec,
    out_dir: str | Path,
    workers: int = 1,
    threads: int | None = None,
    max_drift: float = 1.0,
    monotone_tol: float = 0.0,
    on_point: PointCallback | None = None,
    plot: bool = True,
    max_regret: float | None = 1.0,
) -> TransferReport:
    """Run (or resume) the sweep, analyse every scheme, write transfer.json, summary.md, PNG.

    The gate is the first scheme of ``spec.schemes``; the others are contrasts, and part of the best
    that the regret of the gated scheme is measured against (mupt.check.regret).  ``max_regret``: the
    largest regret (percent) that passes; None reports regret without gating on it.
    """
    if len(spec.widths) < 2:
        raise ConfigError(f"--widths {spec.widths}: give at least 2 distinct widths to measure transfer")
    validate_spec(spec)
    out = Path(out_dir)
    sweep = run_sweep(spec, out, workers, threads, on_point)
    tables = {s.value: loss_table(sweep.points, s.value) for s in spec.schemes}
    results = {s: analyze(t, s, max_drift, monotone_tol) for s, t in tables.items()}
    gate = spec.schemes[0].value
    regret = regret_by_width(sweep.points, gate, min(spec.widths))
    worst = worst_regret(regret)
    regret_ok = max_regret is None or (worst is not None and worst <= max_regret)
    if not regret_ok and worst is not None:
        what = "diverged or was not measured" if math.isinf(worst) else f"{worst:.2f}% > max {max_regret:g}%"
        results[gate].reasons.append(f"regret of the transferred setting {what}")
    passed = results[gate].passed and regret_ok
    noise = measurement_noise(sweep.points)
    meta = {
        "widths": ",".join(map(str, spec.widths)),
        "steps": spec.base.train.steps,
        "batch": spec.base.train.batch_size,
        "seq": spec.base.train.seq_len,
        "optimizer": spec.base.train.optimizer.value,
        "seeds": len(spec.seeds),
        "data": spec.base.data.source,
    }
    files = {"json": str(out / "transfer.json"), "summary": str(out / "summary.md")}
    if plot:
        files["png"] = str(out / "transfer.png")
        plot_transfer(tables, results, files["png"], regret, max_regret)
    doc = {
        "gate": gate,
        "passed": passed,
        "drift_passed": results[gate].passed,
        "regret_passed": regret_ok,
        "max_drift": max_drift,
        "max_regret_pct": max_regret,
        "regret": [r.to_dict() for r in regret],
        "noise": noise,
        "monotone_tol": monotone_tol,
        "definitions": (__doc__ or "").split("Definitions (also in docs/ci.md):")[-1].split("Nothing here")[0].strip(),
        "meta": meta,
        "base_config": to_dict(spec.base),
        "lrs": spec.lrs,
        "results": {s: r.to_dict() for s, r in results.items()},
        "tables": {
            s: {str(w): {f"{x:g}": v for x, v in row.items()} for w, row in t.items()} for s, t in tables.items()
        },
        "points": [{k: v for k, v in p.items() if k != "config"} for p in sweep.points],
        "cache_hits": sweep.cache_hits,
        "trained": sweep.trained,
    }
    atomic_write_text(files["json"], json.dumps(doc, indent=1))
    atomic_write_text(
        files["summary"], markdown_summary(tables, results, gate, max_drift, meta, regret, max_regret, passed)
    )
    for path in write_beside(points_frame(sweep.points), out / "points.json"):
        files[path.suffix.lstrip(".")] = str(path)
    return TransferReport(gate, passed, tables, results, sweep, files, regret, regret_ok, max_regret, noise)


POINT_COLUMNS = ("scheme", "width", "lr", "log2_lr", "seed", "status", "reason", "final_val_loss", "val_se",
                 "val_tokens", "steps", "seconds")  # fmt: skip


def points_frame(points: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The sweep points as a tidy table, one row per (scheme, width, LR, seed): ``final_val_loss`` in
    nats/token (empty for diverged points), its standard error over validation windows ``val_se`` and
    ``val_tokens``, ``seconds`` of training; sorted by scheme, width, LR, seed."""
    import pandas as pd

    df = pd.DataFrame.from_records([{c: p.get(c) for c in POINT_COLUMNS} for p in points], columns=list(POINT_COLUMNS))
    return df.sort_values(["scheme", "width", "lr", "seed"], ignore_index=True)
