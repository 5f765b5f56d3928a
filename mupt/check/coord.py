"""Coordinate check: do activations and their updates stay Θ(1) as the model gets wider?

For each width (d_model; N_u = expand * d_model scales with it, and N_x = d_state too with
``scale_state``) and each seed, a model is built under the chosen width rules (base shape =
``base_width``, by default d_model 64), probed on one fixed validation batch, trained
``steps`` optimizer steps on the builtin corpus, and probed again on the same batch after every
step.  Per layer we record the RMS
(root mean square per coordinate) of

* ``x``: the SSM's last state (batch, N_u, N_x), ``y``: the pure SSM output ``C x``,
* ``out``: the block (mixer) output added to the residual stream,
* ``dx``, ``dy``, ``dout``: their changes since init on the same input,

plus ``logits`` and ``dlogits`` of the LM head.  Per quantity the least-squares slope of
log2(mean-over-seeds RMS) vs log2(width) is fitted; a quantity is *flat* iff
``|slope| <= tolerance``.  The check passes iff every quantity is flat after the last step;
the slopes after the earlier steps are kept too (``slopes_by_step``), because they tell a wrong
width rule (a slope that is there from the first steps on and keeps its sign) from a transient
that only some widths go through within the window (docs/width_rules.md, finding 1).

Nothing here prints; the CLI renders the table, progress and exit code.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from mupt.config import (
    DEFAULT_OPTIMIZER,
    Arch,
    DataConfig,
    Discretization,
    ModelConfig,
    OptimizerName,
    ParamConfig,
    RunConfig,
    Scheme,
    TrainConfig,
    atomic_write_text,
    check_mamba2_widths,
    from_dict,
)
from mupt.data import TokenSource, data_vocab, load_data
from mupt.data.dataset import padded_vocab
from mupt.errors import ConfigError
from mupt.tables import write_beside
from mupt.train import Trainer

if TYPE_CHECKING:
    import pandas as pd

LAYER_QUANTITIES = ("x", "y", "out", "dx", "dy", "dout")
HEAD_QUANTITIES = ("logits", "dlogits")
QUANTITIES = LAYER_QUANTITIES + HEAD_QUANTITIES
HEAD = "head"  # the "layer" label of the logits rows

#: The default check is a gate: the widths a 64-wide proxy transfers to.  Measured (docs/width_rules.md,
#: section 4c, 24 seeds): µP-SSM passes (max |slope| 0.18), SP and the heuristic with N_x scaled fail.
#: Below d_model 256 layer-1 y still rises with width under Adam (finding 1), so 64..1024 would fail
#: the correct rules by 0.01-0.02.
DEFAULT_WIDTHS = (256, 512, 1024, 2048)
#: Base shape's d_model when --base-width is not given (or the smallest width, if that is narrower).
DEFAULT_BASE_WIDTH = 64


class CoordSettings(BaseModel):
    """What one coordinate check measures (typed, validated when built: one-line ConfigError).

    Widths are d_model values (increasing, spanning >= 8x); N_u = expand * d_model.  ``base_width``
    is the base shape's d_model (the proxy the rules scale from); None = :data:`DEFAULT_BASE_WIDTH`,
    or the smallest width when that is narrower.  ``tolerance`` is on |log2-log2 slope|.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Scheme = Scheme.MUP_SSM
    optimizer: OptimizerName = DEFAULT_OPTIMIZER  # adam == adamw here (weight decay 0)
    discretization: Discretization = Discretization.ZOH
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    n_layers: int = 3
    seeds: int = 24  # y is bimodal per seed (docs/width_rules.md, finding 1)
    steps: int = 4
    lr: float = 1e-2
    scale_state: bool = False
    base_d_state: int = 16
    tolerance: float = 0.25
    batch_size: int = 4
    seq_len: int = 32
    backend: str = "auto"
    #: d_model of the base shape (the proxy the LR was tuned at); None = 64, or the smallest width if narrower.
    base_width: int | None = None
    arch: Arch = Arch.MAMBA1
    headdim: int = 64  # mamba2 only
    ngroups: int = 1  # mamba2 only
    #: LM head tied to the embedding (a shared readout, docs/width_rules.md)
    tie_embeddings: bool = False
    #: token source (``DataConfig.source``: builtin, a prepared dataset, a .bin/.npy with ``vocab_size``)
    data: str = "builtin"
    vocab_size: int | None = None

    @model_validator(mode="after")
    def _validated(self) -> CoordSettings:
        self.check_shape()
        return self

    @classmethod
    def of(cls, data: dict[str, Any]) -> CoordSettings:
        """Build from a mapping (e.g. keyword overrides); type errors become one-line ConfigErrors."""
        return from_dict(cls, data, where="coord settings")

    def data_config(self) -> DataConfig:
        return DataConfig(source=self.data, vocab_size=self.vocab_size)

    @property
    def base(self) -> int:
        if self.base_width is not None:
            return self.base_width
        return min(DEFAULT_BASE_WIDTH, self.widths[0]) if self.widths else DEFAULT_BASE_WIDTH

    def check_shape(self) -> None:
        """Raise a one-line ConfigError for widths, base, seeds, steps, LR or tolerance a check cannot use.

        Runs when the settings are built; widths need >= 8x span (docs/width_rules.md, section 4).
        """
        ws = list(self.widths)
        if len(ws) < 2 or len(set(ws)) != len(ws) or ws != sorted(ws):
            shown = ",".join(map(str, ws))
            raise ConfigError(f"--widths {shown}: give at least two distinct widths in increasing order")
        if ws[-1] < 8 * ws[0]:
            raise ConfigError(
                f"--widths {','.join(map(str, ws))} span {ws[-1] / ws[0]:g}x; a coordinate check needs >= 8x "
                f"(e.g. {ws[0]},{2 * ws[0]},{4 * ws[0]},{8 * ws[0]})"
            )
        if self.base_width is not None and not 0 < self.base_width <= ws[0]:
            raise ConfigError(
                f"--base-width {self.base_width}: give a positive width no larger than the smallest of --widths "
                f"({ws[0]}); the base is the proxy the rules scale up from"
            )
        if self.scale_state and any((w * self.base_d_state) % self.base for w in ws):
            raise ConfigError(
                f"--scale-state needs every width to be a multiple of the base {self.base} so that d_state scales "
                f"by the same ratio; got {','.join(map(str, ws))}"
            )
        if self.arch is Arch.MAMBA2:
            check_mamba2_widths(sorted({self.base, *ws}), self.headdim, self.ngroups)
        for name, value in (("--seeds", self.seeds), ("--steps", self.steps), ("--layers", self.n_layers)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.tolerance <= 0:
            raise ConfigError(f"--tolerance must be positive, got {self.tolerance}")

    def d_state(self, width: int) -> int:
        return self.base_d_state * width // self.base if self.scale_state else self.base_d_state

    def run_config(self, width: int, seed: int) -> RunConfig:
        return RunConfig(
            model=ModelConfig(
                d_model=width,
                n_layers=self.n_layers,
                d_state=self.d_state(width),
                discretization=self.discretization,
                arch=self.arch,
                headdim=self.headdim,
                ngroups=self.ngroups,
                tie_embeddings=self.tie_embeddings,
                scan_backend=resolve_scan_backend(self.backend),
                vocab_size=padded_vocab(data_vocab(self.data_config())),
            ),
            data=self.data_config(),
            train=TrainConfig(
                steps=self.steps,
                batch_size=self.batch_size,
                seq_len=self.seq_len,
                lr=self.lr,
                optimizer=self.optimizer,
                seed=seed,
                eval_batches=1,
            ),
            param=ParamConfig(scheme=self.scheme, base_d_model=self.base, base_d_state=self.base_d_state),
        )


def resolve_scan_backend(backend: str) -> str:
    """``auto`` -> the fast torch scan when it is installed, else the reference scan (CPU)."""
    if backend != "auto":
        return backend
    try:
        import mupt.scan.torch_scan  # noqa: F401
    except ImportError:
        return "reference"
    return "auto"


@dataclass
class Row:
    """One (layer, quantity): mean-over-seeds RMS per width, its log2-log2 slope and verdict."""

    layer: str
    quantity: str
    rms: list[float]  # per width, mean over seeds
    rms_seeds: list[list[float]]  # per width, per seed
    slope: float
    flat: bool
    slope_se: float = math.nan  # bootstrap over seeds; NaN with one seed
    rms_by_step: list[list[float]] = field(default_factory=list)  # [step][width], mean over seeds
    slopes_by_step: list[float] = field(default_factory=list)  # slope after step 1..steps; last == slope

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.quantity}"


@dataclass
class CoordResult:
    settings: dict[str, Any]
    widths: list[int]
    d_states: list[int]
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.flat for r in self.rows)

    @property
    def failing(self) -> list[Row]:
        return [r for r in self.rows if not r.flat]

    def row(self, layer: int | str, quantity: str) -> Row:
        for r in self.rows:
            if r.layer == str(layer) and r.quantity == quantity:
                return r
        raise KeyError(f"no row for layer {layer!r}, quantity {quantity!r}")

    def slopes(self) -> dict[str, float]:
        return {r.key: r.slope for r in self.rows}

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "widths": self.widths,
            "d_states": self.d_states,
            "passed": self.passed,
            "seconds": self.seconds,
            "rows": [{**asdict(r), "key": r.key} for r in self.rows],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)

    def save_json(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    def to_frame(self) -> pd.DataFrame:
        """Tidy table, one row per (layer, quantity, step, width): columns layer, quantity, key, step,
        d_model, d_state, rms (mean over seeds), slope (after that step), final_slope, slope_se, flat."""
        import pandas as pd

        records = []
        for r in self.rows:
            for step, (means, slope) in enumerate(zip(r.rms_by_step, r.slopes_by_step, strict=True), start=1):
                for w, n, v in zip(self.widths, self.d_states, means, strict=True):
                    records.append({
                        "layer": r.layer, "quantity": r.quantity, "key": r.key, "step": step, "d_model": w,
                        "d_state": n, "rms": v, "slope": slope, "final_slope": r.slope, "slope_se": r.slope_se,
                        "flat": r.flat,
                    })  # fmt: skip
        return pd.DataFrame.from_records(records)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Writes coord.json, coord.png, coord_steps.png and the rows as coord.csv (and coord.parquet when
        pyarrow is installed) into ``out_dir``; returns their paths by file name."""
        out_dir = Path(out_dir)
        paths = {name: out_dir / name for name in ("coord.json", "coord.png", "coord_steps.png")}
        self.save_json(paths["coord.json"])
        plot(self, paths["coord.png"])
        plot_steps(self, paths["coord_steps.png"])
        for table in write_beside(self.to_frame(), paths["coord.json"]):
            paths[table.name] = table
        return paths


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def log2_slope(widths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log2(values) vs log2(widths); NaN when a value is not positive/finite."""
    if any(not (v > 0 and math.isfinite(v)) for v in values):
        return math.nan
    xs = [math.log2(w) for w in widths]
    ys = [math.log2(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def slope_stderr(widths: Sequence[float], per_seed: Sequence[Sequence[float]], n_boot: int = 500) -> float:
    """Standard error of :func:`log2_slope` of the seed means, by resampling each width's seeds.

    Says how much of a slope is seed noise: a quantity whose seeds spread 10x at one width has a
    slope that moves by tenths between seed sets.  NaN when no width has two seeds.
    """
    if all(len(s) < 2 for s in per_seed):
        return math.nan
    rng = random.Random(0)
    slopes = []
    for _ in range(n_boot):
        means = [sum(rng.choices(s, k=len(s))) / len(s) for s in per_seed]
        slope = log2_slope(widths, means)
        if math.isfinite(slope):
            slopes.append(slope)
    if len(slopes) < 2:
        return math.nan
    mean = sum(slopes) / len(slopes)
    return math.sqrt(sum((x - mean) ** 2 for x in slopes) / (len(slopes) - 1))


def probe(trainer: Trainer, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's probe on ``batch`` (batch, length) token ids: per layer ``layers.{i}.x`` (last state,
    (batch, N_u, N_x)), ``layers.{i}.y`` (SSM output), ``layers.{i}.out`` (block output), and ``logits``;
    an eval-mode forward without gradients, so probing does not change training."""
    trainer.model.eval()
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        trainer.model(batch.to(trainer.device), out)
    return out


def measure_steps(
    settings: CoordSettings, width: int, seed: int, data: TokenSource | None = None
) -> list[dict[str, float]]:
    """RMS of every tracked quantity after each optimizer step of one (width, seed) run.

    Element ``k`` holds the values after step ``k + 1``; keys are ``{layer}.{quantity}``.  Probing
    is a forward pass in eval mode without gradients, so it does not change the training run.
    """
    cfg = settings.run_config(width, seed)
    data = data if data is not None else load_data(cfg.data)
    trainer = Trainer(cfg, data=data)
    probe_x, _ = data.val_batches(1, settings.batch_size, settings.seq_len)[0]
    before = probe(trainer, probe_x)
    snapshots = []
    for _ in range(settings.steps):
        trainer.train_step()
        snapshots.append(probe_quantities(before, probe(trainer, probe_x), settings.n_layers))
    return snapshots


def probe_quantities(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], n_layers: int
) -> dict[str, float]:
    """RMS of every tracked quantity from two :func:`probe` results on the same batch (init and now).

    Keys are ``{layer}.{quantity}``: per layer ``i`` ``x``, ``y``, ``out`` (RMS of ``after``) and
    ``dx``, ``dy``, ``dout`` (RMS of ``after - before``, the change since init), plus
    ``head.logits`` and ``head.dlogits``.  The one definition used by the coordinate check and
    by the live health check of ``mupt scale`` (:mod:`mupt.health`).
    """
    out: dict[str, float] = {}
    for i in range(n_layers):
        for q in ("x", "y", "out"):
            key = f"layers.{i}.{q}"
            out[f"{i}.{q}"] = rms(after[key])
            out[f"{i}.d{q}"] = rms(after[key] - before[key])
    out[f"{HEAD}.logits"] = rms(after["logits"])
    out[f"{HEAD}.dlogits"] = rms(after["logits"] - before["logits"])
    return out


ProgressCallback = Callable[[int, int, float], None]  # (width, seed, seconds of that run)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero while the check runs, and restore the previous mode after.

    Diverging schemes (sp at large width) drive exp(dt*A) into denormals, which slow CPU math by
    orders of magnitude; flushing them changes no RMS at the precision reported.  :func:`coord_check`
    uses it, so the CLI, ``mupt check all`` and the Python API all run under the same numerics.
    """
    probe_value = torch.tensor([1e-40], dtype=torch.float32)  # a float32 denormal: 0 while flushing
    was_on = bool(probe_value.mul(1.0).item() == 0.0)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def coord_check(
    settings: CoordSettings | None = None, on_run: ProgressCallback | None = None, **kwargs: Any
) -> CoordResult:
    """Run the coordinate check; ``kwargs`` override fields of the default :class:`CoordSettings`."""
    import time

    if settings is None:
        settings = CoordSettings.of(kwargs)
    elif kwargs:
        settings = CoordSettings.of({**settings.model_dump(), **kwargs})
    start = time.perf_counter()
    data = load_data(settings.data_config())
    per: dict[str, list[list[list[float]]]] = {}  # key -> per step -> per width -> per seed
    with flush_denormals():
        for wi, width in enumerate(settings.widths):
            for seed in range(settings.seeds):
                t0 = time.perf_counter()
                for step, values in enumerate(measure_steps(settings, width, seed, data)):
                    for key, v in values.items():
                        by_step = per.setdefault(key, [[[] for _ in settings.widths] for _ in range(settings.steps)])
                        by_step[step][wi].append(v)
                if on_run is not None:
                    on_run(width, seed, time.perf_counter() - t0)
    result = CoordResult(
        settings={
            **settings.model_dump(mode="json"),
            "backend": resolve_scan_backend(settings.backend),  # what actually ran
            "base_width": settings.base,
        },
        widths=list(settings.widths),
        d_states=[settings.d_state(w) for w in settings.widths],
    )
    layers = [str(i) for i in range(settings.n_layers)]
    for layer, quantities in [(la, LAYER_QUANTITIES) for la in layers] + [(HEAD, HEAD_QUANTITIES)]:
        for q in quantities:
            means_by_step = [[sum(s) / len(s) for s in widths] for widths in per[f"{layer}.{q}"]]
            slopes = [log2_slope(settings.widths, means) for means in means_by_step]
            seeds, slope = per[f"{layer}.{q}"][-1], slopes[-1]
            flat = math.isfinite(slope) and abs(slope) <= settings.tolerance
            se = slope_stderr(settings.widths, seeds)
            result.rows.append(Row(layer, q, means_by_step[-1], seeds, slope, flat, se, means_by_step, slopes))
    result.seconds = time.perf_counter() - start
    return result


def quantity_label(quantity: str) -> str:
    """Display name of a quantity key: ``dy`` -> ``Δy``, ``logits`` stays."""
    return "Δ" + quantity[1:] if quantity.startswith("d") else quantity


def layer_label(row: Row) -> str:
    return f"layer {row.layer}" if row.layer != HEAD else "lm head"


def _panels(result: CoordResult, panel_height: float) -> tuple[Any, list[tuple[Any, str, list[Row]]]]:
    """A figure with one panel per quantity: (figure, [(axes, quantity, that quantity's rows)])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = (len(QUANTITIES) + 3) // 4
    fig, axes = plt.subplots(n_rows, 4, figsize=(16, panel_height * n_rows))
    panels = []
    for ax, q in zip(axes.flat, QUANTITIES, strict=False):
        ax.set_title(quantity_label(q))
        ax.grid(alpha=0.3)
        panels.append((ax, q, [r for r in result.rows if r.quantity == q]))
    return fig, panels


def plot(result: CoordResult, path: str | Path) -> None:
    """Figure-1-style PNG: one panel per quantity, one line per layer, log2 RMS vs log2 width."""
    fig, panels = _panels(result, 3.3)
    xs = [math.log2(w) for w in result.widths]
    for ax, _, rows in panels:
        for r in rows:
            ys = [math.log2(v) if v > 0 and math.isfinite(v) else math.nan for v in r.rms]
            ax.plot(xs, ys, marker="o", label=f"{layer_label(r)} (slope {r.slope:+.2f})")
        ax.set_xlabel("width d_model (log2 axis)")
        ax.set_ylabel("log2 RMS")
        ax.set_xticks(xs, [str(w) for w in result.widths])
        lo, hi = ax.get_ylim()
        if hi - lo < 4:  # a common minimum span, so that a flat line looks flat (log2 units)
            mid = (lo + hi) / 2
            ax.set_ylim(mid - 2, mid + 2)
        ax.legend(fontsize=7)
    verdict = "PASS" if result.passed else "FAIL"
    fig.suptitle(f"coordinate check: {describe_result(result)}: {verdict}")
    _save(fig, path)


def plot_steps(result: CoordResult, path: str | Path) -> None:
    """PNG of each slope after every step: one panel per quantity, one line per layer, ±tolerance band.

    A wrong width rule shows as a slope that leaves the band early and keeps drifting; a transient
    that narrow and wide models pass through at different times shows as a bump.
    """
    fig, panels = _panels(result, 3.0)
    tol = result.settings["tolerance"]
    steps = list(range(1, result.settings["steps"] + 1))
    for ax, _, rows in panels:
        for r in rows:
            ax.plot(steps, r.slopes_by_step, marker="o", label=layer_label(r))
        ax.axhspan(-tol, tol, color="green", alpha=0.08)
        ax.axhline(0, color="gray", lw=0.6)
        ax.set_xticks(steps)
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, -1.2 * tol), max(hi, 1.2 * tol))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("log2-log2 slope vs width")
        ax.legend(fontsize=7)
    fig.suptitle(f"slope after each step: {describe_result(result)} (band: ±{tol:g})")
    _save(fig, path)


def describe_arch(arch: Arch | str, headdim: int, ngroups: int, widths: list[int] | tuple[int, ...]) -> str:
    """The mixer of a coordinate check in one token group: ``arch=mamba1``, or for mamba2 the head count over the
    widths (base included) x headdim and the B/C groups, e.g. ``arch=mamba2 heads=4..32x32 ngroups=2``
    (heads = expand*d_model/headdim at the check's expand 2, ModelConfig's default)."""
    arch = Arch(arch)
    if arch is not Arch.MAMBA2:
        return f"arch={arch.value}"
    lo, hi = (2 * min(widths) // headdim, 2 * max(widths) // headdim)
    return f"arch={arch.value} heads={lo}..{hi}x{headdim} ngroups={ngroups}"


def describe_result(result: CoordResult) -> str:
    """The plot titles' description of a check: mixer (:func:`describe_arch`), scheme, optimizer, the mamba1
    discretization (none for mamba2), N_x, base width, steps, LR, seeds, tolerance."""
    s = result.settings
    state = "N_x scaled" if s["scale_state"] else f"N_x={s['base_d_state']}"
    base = s.get("base_width") or s["widths"][0]  # results written before base_width existed
    arch = Arch(s.get("arch", Arch.MAMBA1))  # results written before arch existed: mamba1
    mixer = describe_arch(arch, s.get("headdim", 64), s.get("ngroups", 1), [base, *s["widths"]])
    disc = f"{s['discretization']}, " if arch is Arch.MAMBA1 else ""  # Mamba-2's SSD has no discretization choice
    return (
        f"{mixer}, {s['scheme']}, {s['optimizer']}, {disc}{state}, base {base}, "
        f"{s['steps']} steps, lr {s['lr']:g}, {s['seeds']} seeds, tol {s['tolerance']:g}"
        + (", tied embeddings" if s.get("tie_embeddings") else "")
    )


def _save(fig: Any, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
