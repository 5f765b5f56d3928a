"""Live µP health check: is the wide run still behaving like the proxy it was transferred from?

Two halves, both built on the coordinate check's probe (:func:`mupt.check.coord.probe` and
:func:`mupt.check.coord.probe_quantities`: per layer the RMS of the SSM state ``x``, the SSM output
``y``, the block output ``out``, their changes since init ``dx``, ``dy``, ``dout``, plus
``head.logits`` and ``head.dlogits``):

* :func:`measure_reference` (``mupt transfer``) trains the PROXY (its config from the recipe's
  ``source.proxy_config``: tuned values, proxy shape and scheme) with the TARGET's batch,
  sequence length, LR schedule and data for ``steps`` optimizer steps, once per seed, and probes
  one fixed batch (the first validation batch, :data:`PROBE_BATCH` x up to :data:`PROBE_SEQ_LEN`
  tokens) at init and after every step.  The recipe stores the mean RMS over seeds and the
  seed-to-seed standard deviation of log2 RMS per (quantity, step) as
  :class:`~mupt.config.HealthReference`.  Why a probe run and not the tuning trials: the trials
  ran at the proxy's own batch and schedule and kept no activations; a short rerun is cheap
  (proxy width), deterministic by seed, and matches the target's steps one for one.
* :class:`HealthProbe` (``mupt scale``), a :class:`mupt.train.Hook`, probes the same batch every
  ``every`` steps of the wide run and compares each quantity with the proxy at the same step as
  a ratio (the widths differ).  Band (docs/health.md): the width rules say every quantity is
  flat in width, i.e. its coordinate-check slope is within ``tolerance`` (0.25), so over a width
  ratio m the log2 ratio may move by ``tolerance x |log2 m|``; a single wide run is one seed, so
  the band is widened by ``noise_z`` (3) standard deviations of the proxy's seed spread:

      |log2(rms_target(t) / rms_proxy(t))| <= tolerance * |log2 m| + noise_z * sd_proxy(t)

  The head's quantities are checked one-sided (only growth): µP's readout starts near zero
  (init std ∝ 1/fan_in), so at early steps the wide model's logits are below the proxy's by
  design, about m^-1/2 (docs/width_rules.md, readout rule).

Nothing here prints; warnings reach the CLI through callbacks.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mupt.check.coord import HEAD, probe, probe_quantities, quantity_label
from mupt.config import HealthReference, Recipe, RunConfig, Scheme, from_dict, json_text, to_dict
from mupt.errors import ConfigError
from mupt.train import Hook, StepInfo, Trainer

#: Sequences in the fixed probe batch (the coordinate check uses 4).
PROBE_BATCH = 4
#: Longest probe sequence: the run's seq_len, capped so the stored init logits stay small.
PROBE_SEQ_LEN = 64
#: Proxy steps the reference covers by default (``mupt transfer --health-steps``): the coordinate check
#: probes the first 4 updates; a wrong width rule shows from the first steps on (docs/width_rules.md).
DEFAULT_STEPS = 8
#: Proxy seeds of the reference (``mupt transfer --health-seeds``): the spread sets the noise allowance.
DEFAULT_SEEDS = 4
#: Coordinate-check tolerance on |slope| (the default of ``mupt check coord --tolerance``).
TOLERANCE = 0.25
#: Noise allowance in standard deviations of the proxy's seed-to-seed log2 RMS.
NOISE_Z = 3.0
#: Quantities only checked for growth (see the module docstring).
ONE_SIDED = ("logits", "dlogits")
#: Written by :class:`HealthProbe` in the run directory.
HEALTH_JSONL = "health.jsonl"
HEALTH_INIT = "health_init.pt"

RunCallback = Callable[[int, float], None]  # (seed, seconds of that proxy run)


def probe_batch(trainer: Trainer, batch: int, seq_len: int) -> torch.Tensor:
    """The fixed probe input: the first validation batch, (batch, seq_len) token ids."""
    return trainer.data.val_batches(1, batch, seq_len)[0][0]


def reference_config(recipe: Recipe) -> RunConfig:
    """The proxy of ``recipe`` (``source.proxy_config``) with the target's batch, length, schedule and data.

    Raises :class:`ConfigError` when the recipe does not record its proxy (written by an old mupt).
    """
    proxy = recipe.source.get("proxy_config")
    if not isinstance(proxy, dict):
        raise ConfigError("recipe has no source.proxy_config; regenerate it with mupt transfer")
    data = to_dict(from_dict(RunConfig, proxy, where="recipe source.proxy_config"))
    t = recipe.run.train
    data["train"].update(
        steps=t.steps, batch_size=t.batch_size, seq_len=t.seq_len, schedule=t.schedule.value,
        warmup_steps=t.warmup_steps, decay_fraction=t.decay_fraction, grad_accum=1, seed=t.seed, init_from=None,
    )  # fmt: skip
    data["data"] = to_dict(recipe.run.data)
    return from_dict(RunConfig, data, where="health reference config")


def _log2(v: float) -> float | None:
    return math.log2(v) if v > 0 and math.isfinite(v) else None


def measure_reference(
    recipe: Recipe, steps: int = DEFAULT_STEPS, seeds: int = DEFAULT_SEEDS, on_run: RunCallback | None = None
) -> HealthReference:
    """Probe the recipe's proxy for :class:`HealthProbe` (see the module docstring).

    Cost: ``seeds x min(steps, target steps)`` proxy optimizer steps at the target's global batch
    (plus one small probe forward per step).  Seeds are ``train.seed, train.seed + 1, ...``.
    Raises :class:`ConfigError` for ``steps < 1`` or ``seeds < 2`` (the spread needs two).
    """
    if steps < 1:
        raise ConfigError(f"--health-steps {steps}: give >= 1 (or 0 to record no health reference)")
    if seeds < 2:
        raise ConfigError(f"--health-seeds {seeds}: give >= 2; the seed spread sets the band's noise allowance")
    import time

    from mupt.check.coord import flush_denormals
    from mupt.data import load_data

    cfg = reference_config(recipe)
    k = min(steps, cfg.train.steps)
    length = min(cfg.train.seq_len, PROBE_SEQ_LEN)
    data = load_data(cfg.data)
    seed_list = [cfg.train.seed + i for i in range(seeds)]
    runs: list[list[dict[str, float]]] = []  # per seed, per step 0..k
    with flush_denormals():
        for seed in seed_list:
            t0 = time.perf_counter()
            run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
            trainer = Trainer(run_cfg, data=data)
            batch = probe_batch(trainer, PROBE_BATCH, length)
            before = probe(trainer, batch)
            values = [levels(probe_quantities(before, before, cfg.model.n_layers))]
            for _ in range(k):
                trainer.train_step()
                values.append(probe_quantities(before, probe(trainer, batch), cfg.model.n_layers))
            runs.append(values)
            if on_run is not None:
                on_run(seed, time.perf_counter() - t0)
    keys = list(runs[0][-1])
    rms: dict[str, list[float | None]] = {}
    sd: dict[str, list[float | None]] = {}
    for key in keys:
        rms[key], sd[key] = [], []
        for step in range(k + 1):
            vals = [r[step][key] for r in runs if key in r[step]]
            logs = [_log2(v) for v in vals]
            ok = [x for x in logs if x is not None]
            if not vals or len(ok) < len(vals):  # undefined (a change at init) or a diverged seed
                rms[key].append(None)
                sd[key].append(None)
                continue
            rms[key].append(sum(vals) / len(vals))
            mean = sum(ok) / len(ok)
            sd[key].append(math.sqrt(sum((x - mean) ** 2 for x in ok) / (len(ok) - 1)))
    m = cfg.model
    scheme = Scheme(cfg.param.scheme).value
    return HealthReference(
        proxy={"d_model": m.d_model, "d_state": m.d_state, "n_layers": m.n_layers, "scheme": scheme},
        seeds=seed_list, steps=k, probe_batch=PROBE_BATCH, probe_seq_len=length, tolerance=TOLERANCE,
        noise_z=NOISE_Z, rms=rms, log2_sd=sd,
    )  # fmt: skip


def levels(values: dict[str, float]) -> dict[str, float]:
    """Only the levels (x, y, out, logits) of a probe: at init the changes are zero by definition."""
    return {k: v for k, v in values.items() if not k.rsplit(".", 1)[1].startswith("d")}


def width_log2(recipe: Recipe, ref: HealthReference) -> float:
    """|log2| of the larger of the d_model and d_state ratios between the recipe's model and the proxy."""
    m = recipe.run.model
    return max(abs(math.log2(m.d_model / ref.proxy["d_model"])), abs(math.log2(m.d_state / ref.proxy["d_state"])))


def resolve_every(recipe: Recipe) -> int:
    """Probe interval of ``mupt scale`` (0 = off): ``launch.health_every``, default a quarter of the reference.

    Off by default for a run started ``--init-from`` a checkpoint (its changes since init are not the
    proxy's).  Raises :class:`ConfigError` when a probe or ``--health-strict`` is asked of a recipe
    without a reference or of an ``--init-from`` run, or the interval exceeds the reference's steps
    (only the init would be compared).
    """
    ref, lc = recipe.health, recipe.launch
    asked = bool(lc.health_every or lc.health_strict)
    flag = "--health-strict" if lc.health_strict else f"--health-every {lc.health_every}"
    if ref is None:
        if asked:
            raise ConfigError(
                f"{flag}: the recipe has no health reference; regenerate it with mupt transfer "
                f"(--health-steps {DEFAULT_STEPS}), or drop {flag}"
            )
        return 0
    if recipe.run.train.init_from is not None:  # not from init: the proxy's changes since init say nothing
        if asked:
            raise ConfigError(
                f"{flag}: the run starts from {recipe.run.train.init_from} (--init-from), not from the width "
                f"rules' init that the proxy reference was measured from; drop {flag}"
            )
        return 0
    every = max(1, ref.steps // 4) if lc.health_every is None else lc.health_every
    if every == 0 and lc.health_strict:
        raise ConfigError("--health-strict with --health-every 0: the check is off; give --health-every N >= 1")
    if every > ref.steps:
        raise ConfigError(
            f"--health-every {every}: the recipe's health reference covers {ref.steps} steps, so only the init would "
            f"be compared; use --health-every <= {ref.steps}, or rerun mupt transfer with --health-steps {every}"
        )
    return every


def describe(recipe: Recipe) -> str:
    """One line for ``mupt scale --dry-run``: what the health check will compare, or why it is off."""
    every, ref = resolve_every(recipe), recipe.health
    if ref is None:
        return "off (the recipe has no health reference: mupt transfer --health-steps K records one)"
    if every == 0:
        if recipe.run.train.init_from is not None:
            return "off (the run starts from a checkpoint, --init-from)"
        return "off (--health-every 0)"
    width = width_log2(recipe, ref)
    strict = "; --health-strict: stop at the first" if recipe.launch.health_strict else ""
    return (
        f"every {every} steps vs the proxy (d_model {ref.proxy['d_model']}, {len(ref.seeds)} seeds) up to step "
        f"{ref.steps}; band {ref.tolerance:g} x {width:.2f} + {ref.noise_z:g} seed sd{strict}"
    )


@dataclass(frozen=True)
class Reading:
    """One quantity at one probe: the wide run's RMS against the proxy's at the same step."""

    key: str  # "1.dy", "head.logits"
    rms: float
    proxy_rms: float | None
    log2_ratio: float | None  # log2(rms / proxy_rms); None past the reference or where it is undefined
    band: float | None  # allowed |log2_ratio| (one-sided for the head)

    @property
    def outside(self) -> bool:
        if self.log2_ratio is None or self.band is None:
            return False
        if math.isnan(self.log2_ratio):
            return True
        quantity = self.key.rsplit(".", 1)[1]
        return self.log2_ratio > self.band if quantity in ONE_SIDED else abs(self.log2_ratio) > self.band

    def label(self) -> str:
        """``layer 1 Δy`` / ``lm head logits``."""
        layer, quantity = self.key.rsplit(".", 1)
        where = "lm head" if layer == HEAD else f"layer {layer}"
        return f"{where} {quantity_label(quantity)}"


def compare(ref: HealthReference, values: dict[str, float], step: int, width: float) -> list[Reading]:
    """Readings of one probe at ``step`` (``width`` = :func:`width_log2`); no ratio past ``ref.steps``."""
    out = []
    for key, v in values.items():
        proxy = ref.rms.get(key, [])
        sd = ref.log2_sd.get(key, [])
        p = proxy[step] if step < len(proxy) else None
        s = sd[step] if step < len(sd) else None
        if p is None or s is None or p <= 0:
            out.append(Reading(key, v, p, None, None))
            continue
        ratio = math.log2(v / p) if v > 0 and math.isfinite(v) else (-math.inf if v == 0 else math.nan)
        out.append(Reading(key, v, p, ratio, ref.tolerance * width + ref.noise_z * s))
    return out


def warning_text(r: Reading, step: int, width: float) -> str:
    """One line naming the layer and quantity, the ratio, the band and what to do."""
    assert r.log2_ratio is not None and r.band is not None
    factor = 2.0**r.log2_ratio if math.isfinite(r.log2_ratio) else r.log2_ratio
    side = f"<= +{r.band:.2f}" if r.key.rsplit(".", 1)[1] in ONE_SIDED else f"±{r.band:.2f}"
    return (
        f"µP health: {r.label()} at step {step} is {factor:.3g}x the proxy's (log2 ratio {r.log2_ratio:+.2f}, band "
        f"{side} for a {2.0**width:g}x width ratio); the width rules are not holding here: check the recipe's "
        "scheme and per-role LRs (mupt transfer --explain), see docs/health.md"
    )


class HealthProbe(Hook):
    """Probes the fixed batch at init and every ``every`` steps; rank 0 logs, compares and warns.

    Every rank runs the probe forward (under FSDP2 it all-gathers parameters); rank 0 appends one
    strict-JSON record per probe to ``<run_dir>/health.jsonl`` (``step``, ``rms``, ``log2_ratio``,
    ``band`` per key, ``outside``: keys out of band), hands it to ``on_record`` (TensorBoard), and
    calls ``on_warning`` once per (layer, quantity) that leaves its band, also across resumes
    (restored from health.jsonl).  With ``strict``, the first such reading makes
    :meth:`should_stop` ask for a stop: the run checkpoints and ends (``stop_reason`` says why).
    The init probe (inputs and activations) is kept in ``<run_dir>/health_init.pt`` so that a
    resumed run still measures changes since init.  Raises :class:`ConfigError` when a resumed
    run has no init probe (it was started without the check).
    """

    def __init__(
        self,
        recipe: Recipe,
        every: int,
        run_dir: Path,
        strict: bool = False,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        assert recipe.health is not None
        self.ref, self.every, self.strict = recipe.health, every, strict
        self.width = width_log2(recipe, self.ref)
        self.path, self.init_path = run_dir / HEALTH_JSONL, run_dir / HEALTH_INIT
        self.on_record, self.on_warning = on_record, on_warning
        self.warned: set[str] = set()
        self.stop_reason: str | None = None
        self.n_layers = recipe.run.model.n_layers
        self.batch: torch.Tensor | None = None
        self.before: dict[str, torch.Tensor] = {}

    def on_start(self, trainer: Trainer) -> None:
        self.batch = probe_batch(trainer, self.ref.probe_batch, self.ref.probe_seq_len)  # same on every rank
        if trainer.step == 0:
            before = probe(trainer, self.batch)
            if trainer.rank == 0:
                self.before = before
                tmp = self.init_path.with_name(self.init_path.name + ".tmp")
                torch.save({"batch": self.batch, "probe": {k: v.cpu() for k, v in before.items()}}, tmp)
                os.replace(tmp, self.init_path)
                self.path.unlink(missing_ok=True)
                self._record(0, levels(probe_quantities(before, before, self.n_layers)))
            return
        if trainer.any_rank(trainer.rank == 0 and not self.init_path.is_file()):
            raise ConfigError(
                f"{self.init_path} is missing: this run was started without the µP health check, so changes since "
                "init cannot be measured; resume with --health-every 0, or use a new --run-dir"
            )
        if trainer.rank == 0:
            saved = torch.load(self.init_path, weights_only=True)
            self.before = {k: v.to(trainer.device) for k, v in saved["probe"].items()}
            self._restore(trainer.step)

    def _restore(self, step: int) -> None:
        """Keep records up to the resumed step; what they flagged is not warned about again."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                if int(rec["step"]) <= step:
                    keep.append(line)
                    self.warned.update(rec.get("outside", []))
            except (ValueError, KeyError, TypeError):
                continue  # a half-written last line from a killed run
        from mupt.config import atomic_write_text

        atomic_write_text(self.path, "".join(s + "\n" for s in keep))

    def on_step(self, trainer: Trainer, info: StepInfo) -> None:
        if info.diverged is not None or self.every <= 0 or info.step % self.every or self.batch is None:
            return
        after = probe(trainer, self.batch)
        if trainer.rank == 0:
            self._record(info.step, probe_quantities(self.before, after, self.n_layers))

    def _record(self, step: int, values: dict[str, float]) -> None:
        readings = compare(self.ref, values, step, self.width)
        outside = [r for r in readings if r.outside]
        record = {
            "step": step,
            "rms": {r.key: r.rms for r in readings},
            "log2_ratio": {r.key: r.log2_ratio for r in readings if r.log2_ratio is not None},
            "band": {r.key: r.band for r in readings if r.band is not None},
            "outside": [r.key for r in outside],
        }
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json_text(record) + "\n")
        if self.on_record is not None:
            self.on_record(record)
        for r in outside:
            if r.key in self.warned:
                continue
            self.warned.add(r.key)
            text = warning_text(r, step, self.width)
            if self.on_warning is not None:
                self.on_warning(text)
            if self.strict and self.stop_reason is None:
                self.stop_reason = text

    def should_stop(self, trainer: Trainer) -> str | None:
        return self.stop_reason
