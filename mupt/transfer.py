"""Proxy hyperparameters -> target width: the wide model's recipe, and the width rules explained.

:func:`transfer` takes the best proxy result (a :class:`~mupt.config.BestParams` from ``mupt tune``
or a proxy :class:`~mupt.config.RunConfig` with the tuned values set) and returns a
:class:`~mupt.config.Recipe` for the target shape.  The target run keeps the proxy's tuned global
LR and multipliers and sets ``param.base_d_model/base_d_state`` to the proxy's base shape, so
:func:`mupt.parametrization.apply` at the target width yields the per-role LRs, init stds and
forward multipliers.  The per-role numbers written into the recipe come from running that very
``apply`` on a model built on the ``meta`` device (no memory, no init cost, any width), so the
recipe and the model that ``mupt scale`` builds cannot disagree.

Nothing here prints; :mod:`mupt.cli.transfer` renders the tables.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mupt import parametrization
from mupt.config import (
    Arch,
    BestParams,
    DataConfig,
    LaunchConfig,
    ModelConfig,
    OptimizerName,
    Recipe,
    RunConfig,
    Scheme,
    from_dict,
    load_best,
    load_recipe,
    save_yaml,
    to_dict,
)
from mupt.data import compare_identity
from mupt.errors import ConfigError, DataError, MuptError, StorageError
from mupt.memory import memory_estimate, meta_model
from mupt.model import ARCH_ROLES, Role
from mupt.parametrization import (
    DOCS,
    BaseShape,
    Exp,
    Manifest,
    apply,
    format_exp,
    rules_for,
    weight_decay_exp,
)

if TYPE_CHECKING:
    import pandas as pd

#: Width (or state) ratios up to this were verified by the coordinate / LR-transfer checks; beyond it we warn.
VERIFIED_RATIO = 64.0
#: Recommended minimum proxy training length: Chinchilla's compute-optimal 20 tokens per parameter.
TOKENS_PER_PARAM = 20.0
#: "Far fewer": warn when the proxy saw less than this fraction of the recommended minimum.
FAR_FEWER = 0.1
#: Selective-scan FLOPs per (channel, state) per token in the forward pass: discretize exp(dt*A) (2),
#: dt*B*u (2), state update a*x + b (2), y = C x (2), plus the D skip / gate amortised (~1).
SCAN_FWD_FLOPS = 9.0
#: Training = forward + backward (about twice the forward): 3x the forward FLOPs.
TRAIN_FLOP_FACTOR = 3.0


# --- per-role values ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoleValues:
    """What ``apply`` gives one role at one shape (identical for every parameter of the role)."""

    role: str
    init_std: float | None  # None: structured init, never rescaled
    lr: float  # effective LR = global LR * lr_mult (before the schedule)
    lr_mult: float
    fwd_mult: float
    weight_decay: float  # the optimizer group's weight decay (decoupled: wd / lr_mult)
    numel: int  # parameters of this role in the whole model

    def recipe_row(self) -> dict[str, float | None]:
        return {"init_std": self.init_std, "lr": self.lr, "fwd_mult": self.fwd_mult, "weight_decay": self.weight_decay}


@dataclass
class ShapeInfo:
    roles: dict[str, RoleValues]
    manifest: Manifest
    num_params: int
    embedding_params: int


def shape_info(cfg: RunConfig) -> ShapeInfo:
    """Per-role init std / LR / multiplier / weight decay at ``cfg``'s shape, by running ``apply``."""
    model = meta_model(cfg.model)
    par = apply(model, cfg.param, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay, reinit=True)
    roles: dict[str, RoleValues] = {}
    numel = {name: p.numel() for name, p in model.named_parameters()}
    for name, e in par.manifest.params.items():
        rv = RoleValues(e.role, e.init_std, cfg.train.lr * e.lr_mult, e.lr_mult, e.fwd_mult, e.weight_decay, 0)
        prev = roles.get(e.role)
        if prev is not None and (prev.init_std, prev.lr_mult, prev.fwd_mult, prev.weight_decay) != (
            rv.init_std, rv.lr_mult, rv.fwd_mult, rv.weight_decay,
        ):  # fmt: skip
            raise ConfigError(f"parameters of role {e.role} got different values ({name}); this is a mupt bug")
        # a tied readout's row has no tensor of its own: its parameters are counted once, as the embedding
        roles[e.role] = RoleValues(**{**rv.__dict__, "numel": (prev.numel if prev else 0) + numel.get(name, 0)})
    order = [r.value for r in Role if r.value in roles]
    emb = roles.get(Role.EMBEDDING.value)
    return ShapeInfo(
        {r: roles[r] for r in order}, par.manifest, sum(numel.values()), emb.numel if emb is not None else 0
    )


# --- sources ------------------------------------------------------------------------------------


def latest_best(runs_dir: str | Path = "runs") -> Path:
    """The most recently written ``runs/*/best.yaml``."""
    found = sorted(Path(runs_dir).glob("*/best.yaml"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise StorageError(
            f"no {Path(runs_dir) / '*' / 'best.yaml'} found; run `mupt tune` first, or pass --from PATH or --lr X"
        )
    return found[-1]


#: The keys of a best.yaml finalist that say how its LR was found, copied into the recipe's ``source.finalist``.
FINALIST_ORIGIN_KEYS = ("obtained", "drift_fit", "fidelities")


def chosen_finalist(best: BestParams) -> dict[str, Any] | None:
    """How the proxy trial that ``best`` holds was obtained, from best.yaml's ``finalists`` (written by
    ``mupt tune``: :func:`mupt.tune.best_params`): the :data:`FINALIST_ORIGIN_KEYS` of the finalist whose
    trial is ``best.trial`` -- ``obtained`` (``sampled``, ``promoted`` or ``extrapolated``), ``drift_fit``
    (extrapolated only: ``method`` vertex/best/drift, ``optima_log2_lr``, ``slope_octaves_per_doubling``,
    ``log2_lr``, ``clipped``, ``points``) and ``fidelities`` (the rungs it passed through, lowest first).
    ``None`` for a best.yaml written before tune recorded its finalists."""
    for f in best.finalists:
        if f.get("trial") == best.trial:
            kept = {k: f[k] for k in FINALIST_ORIGIN_KEYS if k in f}
            return kept or None
    return None


def lr_found_by(finalist: Mapping[str, Any]) -> str:
    """How a proxy-width finalist's LR was obtained, in words; ``""`` for a trial the sampler proposed at the
    proxy width (nothing to explain) or a record without ``obtained``.

    ``finalist``: a best.yaml finalist or :func:`chosen_finalist`'s dict.  ``promoted``: ranked up through the
    narrower rungs (their d_model listed); ``extrapolated`` with a ``drift_fit`` of method ``vertex`` (the
    parabola through rung 0's losses) or ``best`` (rung 0's best trial), moved by the expected drift
    (``--lr-drift``), or ``drift`` (the optimum's drift fitted over the rungs), and the stand-in one octave
    lower when that LR diverged at the proxy width (``retry``): docs/tuning.md, "The schedule".  Shared by
    ``mupt tune``'s and ``mupt transfer``'s summaries.
    """
    fit = finalist.get("drift_fit") or {}
    widths = [f["d_model"] for f in finalist.get("fidelities", [])[:-1]]
    if finalist.get("obtained") == "promoted":
        return f"promotion by rank from d_model {', '.join(map(str, widths))}"
    if finalist.get("obtained") != "extrapolated" or not fit:
        return ""
    optima = fit["optima_log2_lr"]
    slope, x = fit["slope_octaves_per_doubling"], fit["log2_lr"]
    clipped = " (clipped to the search range)" if fit.get("clipped") else ""
    if fit.get("method") in ("vertex", "best"):
        ((w, x0),) = optima.items()
        what = "the vertex of the parabola through" if fit["method"] == "vertex" else "the best of"
        why = ""
        if fit["method"] == "best":  # the fallback: say why, since it is the noisier estimate
            why = (
                f" (no parabola: {fit.get('points', 0)} trials within two octaves of it, 3 needed, or they did not "
                "curve upwards; more --trials help)"
            )
        return (
            f"{what} rung 0's losses: 2^{x0:.2f} at d_model {w}, moved {slope:+g} octave per doubling "
            f"-> 2^{x:.2f}{clipped}{why}{_stand_in(fit)}"
        )
    at = ", ".join(f"2^{v:.2f} at {k}" for k, v in optima.items())
    return f"the optimum's drift fitted over the rungs ({at}; {slope:+.2f} per doubling) -> 2^{x:.2f}{clipped}"


def _stand_in(fit: Mapping[str, Any]) -> str:
    """``--finalist fit``'s stand-in after its fitted LR diverged at the proxy width, in words ("" for none)."""
    if not fit.get("retry"):
        return ""
    diverged, stand = list(fit.get("diverged_log2_lr", [])), float(fit["stand_in_log2_lr"])
    also = f", as did {', '.join(f'2^{v:.2f}' for v in diverged[1:])}" if len(diverged) > 1 else ""
    step = "one octave below" if abs(diverged[-1] - 1 - stand) < 1e-3 else "the search range's low end, below"
    return f"; it diverged at the proxy width{also}, and 2^{stand:.2f}, {step} the last LR that diverged, stood in"


# --- the transfer -------------------------------------------------------------------------------


def _check_width(flag: str, width: int, scheme: Scheme, model: ModelConfig) -> None:
    if width <= 0:
        raise ConfigError(f"{flag} {width}: must be a positive d_model, e.g. 4096")
    if model.arch is Arch.MAMBA2:
        if (model.expand * width) % model.headdim:
            step = model.headdim // math.gcd(model.headdim, model.expand)
            raise ConfigError(
                f"{flag} {width}: mamba2 needs expand*d_model divisible by headdim={model.headdim} "
                f"(heads grow at fixed headdim); use a multiple of {step}"
            )
        return
    parametrization.check_dt_rank_width(f"{flag} {width}:", width, scheme, model.dt_rank)


def target_config(
    proxy: RunConfig,
    to_width: int,
    to_state: int | None = None,
    to_layers: int | None = None,
    scheme: Scheme | str | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    schedule: dict[str, Any] | None = None,
) -> RunConfig:
    """The target run: the proxy config at the target shape, with the proxy's base shape and tuned values.

    ``schedule`` sets the target's ``train`` fields ``schedule`` (constant, cosine, linear, wsd),
    ``warmup_steps``, ``decay_fraction`` and ``grad_accum`` (``None`` values keep the proxy's);
    see docs/schedules.md for what µP assumes when the horizon changes.
    """
    pm = proxy.model
    proxy_scheme = Scheme(proxy.param.scheme)
    try:
        target_scheme = Scheme(scheme) if scheme is not None else proxy_scheme
    except ValueError:
        raise ConfigError(f"--scheme {scheme!r}: choose sp, mup or mup-ssm") from None
    _check_width("--to-width", to_width, target_scheme, pm)
    if to_layers is not None and to_layers != pm.n_layers:
        raise ConfigError(
            f"--to-layers {to_layers}: mupt has no depth-transfer rules, so the proxy optimum (n_layers={pm.n_layers}) "
            f"does not carry over; tune a proxy with --layers {to_layers}, or drop --to-layers"
        )
    if to_state is not None and to_state <= 0:
        raise ConfigError(f"--to-state {to_state}: must be a positive d_state, e.g. 64")
    if to_state is not None and to_state != pm.d_state and target_scheme is not Scheme.MUP_SSM:
        raise ConfigError(
            f"--to-state {to_state}: scheme {target_scheme.value} has no state-width (N_x) rules, so d_state must stay "
            f"{pm.d_state}; use --scheme mup-ssm or drop --to-state"
        )
    base = BaseShape.of(pm, proxy.param)
    if target_scheme is not proxy_scheme:
        # a different scheme's rules are only the identity at the proxy's own shape
        base = BaseShape(pm.d_model, pm.d_state)
    data = to_dict(proxy)
    data["model"].update(d_model=to_width, d_state=to_state or pm.d_state)
    data["param"].update(scheme=target_scheme.value, base_d_model=base.d_model, base_d_state=base.d_state)
    for key, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len), *(schedule or {}).items()):
        if value is not None:
            data["train"][key] = value
    out = from_dict(RunConfig, data, where="target config")
    if out.train.warmup_steps >= out.train.steps:
        raise ConfigError(
            f"--warmup {out.train.warmup_steps}: must be fewer than the target's {out.train.steps} steps, "
            f"e.g. --warmup {max(1, out.train.steps // 100)}"
        )
    return out


def base_config(target: RunConfig, proxy: RunConfig) -> RunConfig:
    """The target run's rules evaluated at the proxy's shape (what the ratios are relative to)."""
    return target.model_copy(
        update={
            "model": target.model.model_copy(update={"d_model": proxy.model.d_model, "d_state": proxy.model.d_state})
        }
    )


def default_scale_dir(scheme: Scheme, to_width: int, study: str | None = None) -> str:
    """The recipe's ``launch.run_dir``: ``runs/scale-<scheme>-w<width>``, and ``-<study>`` after it for a
    recipe made from a tuned study, so that two studies' recipes of one scheme and width do not share
    (and refuse) each other's checkpoints."""
    return f"runs/scale-{scheme.value}-w{to_width}" + (f"-{study}" if study else "")


def transfer(
    best: BestParams | RunConfig,
    to_width: int,
    to_state: int | None = None,
    to_layers: int | None = None,
    scheme: Scheme | str | None = None,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    source_path: str | Path | None = None,
    to_data: str | None = None,
    schedule: dict[str, Any] | None = None,
) -> Recipe:
    """The recipe for the target shape from a proxy result (``BestParams``) or a proxy config with the tuned LR.

    ``steps``/``batch_size``/``seq_len`` set the target's training length (default: the proxy's).
    ``to_data`` trains the target on other data (default: the proxy's); a tokenizer other than the
    proxy's raises DataError, another corpus adds a warning.  The recipe records the identity of
    its data (tokenizer, tokenizer_sha256, vocab, tokens) in ``recipe.dataset``.
    """
    if isinstance(best, BestParams):
        proxy = best.config
        origin: dict[str, Any] = {
            "kind": "study", "study": best.study, "trial": best.trial, "value": best.value,
            "params": dict(best.params), "code_version": best.code_version, "tuned": best.created,
        }  # fmt: skip
        if (finalist := chosen_finalist(best)) is not None:
            origin["finalist"] = finalist
    else:
        proxy = best
        origin = {"kind": "lr", "params": {"lr": proxy.train.lr}}
    if source_path is not None:
        origin["path"] = str(source_path)
    target = target_config(proxy, to_width, to_state, to_layers, scheme, steps, batch_size, seq_len, schedule)
    proxy_data = best.dataset if isinstance(best, BestParams) and best.dataset else data_identity(proxy.data)
    data_warnings: list[str] = []
    target_data = proxy_data
    if to_data is not None:
        data_cfg = DataConfig.model_validate({**proxy.data.model_dump(), "source": to_data})  # validated: made absolute
        if data_cfg.vocab_size is None and proxy_data.get("tokenizer") is None:
            data_cfg = data_cfg.model_copy(update={"vocab_size": proxy_data.get("vocab_size")})
        target_data = data_identity(data_cfg, strict=True, flag="--to-data")
        data_warnings = compare_identity(proxy_data, target_data)
        target = target.model_copy(update={"data": data_cfg})
    info = shape_info(target)
    base_info = shape_info(base_config(target, proxy))
    proxy_info = shape_info(proxy)
    # the transfer ratio is relative to the proxy's shape (the proxy's own base, when it has one, stays the base)
    r_u = target.model.d_inner / proxy.model.d_inner
    r_x = target.model.d_state / proxy.model.d_state
    source = {
        **origin,
        "proxy": {
            "d_model": proxy.model.d_model, "d_state": proxy.model.d_state, "n_layers": proxy.model.n_layers,
            "scheme": Scheme(proxy.param.scheme).value, "params": proxy_info.num_params,
            "tokens": proxy.train.steps * proxy.train.batch_size * proxy.train.seq_len,
        },
        "base": {"d_model": target.param.base_d_model, "d_state": target.param.base_d_state},
        "ratio": {"width": r_u, "state": r_x},
        "base_per_role": {k: v.recipe_row() for k, v in base_info.roles.items()},
        "proxy_config": to_dict(proxy),
        "proxy_dataset": proxy_data,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    recipe = Recipe(
        source=source,
        run=target,
        per_role={k: v.recipe_row() for k, v in info.roles.items()},
        launch=LaunchConfig(run_dir=default_scale_dir(Scheme(target.param.scheme), to_width, origin.get("study"))),
        manifest=info.manifest.to_dict(),
        dataset=target_data,
    )
    recipe.source["warnings"] = warnings(recipe, proxy, info, proxy_info) + data_warnings
    return recipe


def check_transfer_command(
    proxy: RunConfig, to_width: int, source: Path | None = None, runs_dir: str | Path = "runs"
) -> str:
    """A ``mupt check transfer`` command whose transfer.json :func:`mupt.check.regret.find_expected_regret`
    finds for ``proxy`` (its rule: base width = the proxy's d_model, gated scheme = its scheme, same model
    shape but width, data and optimizer; docs/transfer.md).

    Widths: the proxy's d_model, then doublings up to ``to_width`` (at most 4x, so the sweep stays a CPU job),
    plus ``to_width`` itself when it lies inside that span.  ``source`` (the best.yaml the proxy came from) is
    passed as ``-c`` so every model and data field matches; without it the flags that differ from mupt's
    defaults are spelled out.  ``--out`` lands under ``runs_dir``, where ``mupt transfer`` looks.
    """
    w = proxy.model.d_model
    widths = [w]
    while widths[-1] * 2 <= min(4 * w, max(to_width, 2 * w)):
        widths.append(widths[-1] * 2)
    if w < to_width <= 4 * w and to_width not in widths:
        widths = sorted([*widths, to_width])
    parts = ["mupt check transfer"]
    defaults = RunConfig()
    if source is not None:
        parts.append(f"-c {source}")
    else:
        m, d = proxy.model, defaults.model
        for flag, value, default in (
            ("--arch", m.arch.value, d.arch.value), ("--layers", m.n_layers, d.n_layers),
            ("--d-state", m.d_state, d.d_state), ("--discretization", m.discretization.value, d.discretization.value),
            ("--headdim", m.headdim, d.headdim), ("--ngroups", m.ngroups, d.ngroups),
            ("--data", proxy.data.source, defaults.data.source),
            ("--vocab-size", proxy.data.vocab_size, defaults.data.vocab_size),
        ):  # fmt: skip
            if value != default:
                parts.append(f"{flag} {value}")
    parts.append("--widths " + ",".join(map(str, widths)))
    scheme = Scheme(proxy.param.scheme)
    if scheme is not Scheme.MUP_SSM:
        parts.append(f"--scheme {scheme.value}")
    if proxy.train.optimizer != defaults.train.optimizer:  # check transfer passes its own default otherwise
        parts.append(f"--optimizer {proxy.train.optimizer.value}")
    parts.append("--vs " + ",".join(s.value for s in (Scheme.SP, Scheme.MUP) if s is not scheme))
    if Path(runs_dir) != Path("runs"):
        parts.append(f"--out {Path(runs_dir) / 'check-transfer'}")
    return " ".join(parts)


def data_identity(data: DataConfig, strict: bool = False, flag: str = "--data") -> dict[str, Any]:
    """Identity of ``data`` (:func:`mupt.data.identity_of`); ``{}`` when it cannot be opened, unless ``strict``
    (then the DataError, naming ``flag``: the flag that gave ``data.source``)."""
    from mupt.data import identity_of, load_data

    try:
        return identity_of(load_data(data, flag))
    except DataError:
        if strict:
            raise
        return {}


# --- summary: size, memory, FLOPs, warnings ---------------------------------------------------


@dataclass
class Summary:
    params: int
    proxy_params: int
    width_ratio: float
    state_ratio: float
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes_per_token: float  # saved for backward, fp32 (mupt.memory)
    flops_per_token: float
    scan_flops_per_token: float
    train_tokens: int
    proxy_tokens: int
    recommended_proxy_tokens: float
    warnings: list[str] = field(default_factory=list)

    @property
    def state_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def train_flops(self) -> float:
        return self.flops_per_token * self.train_tokens


def train_flops_per_token(cfg: RunConfig, info: ShapeInfo | None = None) -> tuple[float, float]:
    """Training FLOPs per token of ``cfg``'s model, and the selective scan's part of it.

    ``6 x non-embedding parameters`` (each weight: one multiply-add forward, two backward; the
    LM head counts, the embedding lookup does not) ``+ TRAIN_FLOP_FACTOR x SCAN_FWD_FLOPS x
    n_layers x N_u x N_x`` (the scan, which has no parameters of that size).  Norms, the conv's
    gating and the softmax are left out.  Used by the transfer summary and by ``mupt tune``'s
    compute accounting (docs/tuning.md, "Compute, in FLOPs").
    """
    info = info if info is not None else shape_info(cfg)
    m = cfg.model
    scan = TRAIN_FLOP_FACTOR * SCAN_FWD_FLOPS * m.n_layers * m.d_inner * m.d_state
    return 6.0 * (info.num_params - info.embedding_params) + scan, scan


def summarize(recipe: Recipe) -> Summary:
    cfg = recipe.run
    info = shape_info(cfg)
    proxy = from_dict(RunConfig, recipe.source.get("proxy_config"), where="recipe source.proxy_config")
    proxy_info = shape_info(proxy)
    m = cfg.model
    mem = memory_estimate(cfg)
    flops, scan = train_flops_per_token(cfg, info)
    ratio = recipe.source.get("ratio", {})
    proxy_tokens = proxy.train.steps * proxy.train.batch_size * proxy.train.seq_len
    return Summary(
        params=info.num_params,
        proxy_params=proxy_info.num_params,
        width_ratio=float(ratio.get("width", m.d_model / (cfg.param.base_d_model or m.d_model))),
        state_ratio=float(ratio.get("state", m.d_state / (cfg.param.base_d_state or m.d_state))),
        weight_bytes=mem.weights,
        grad_bytes=mem.grads,
        optimizer_bytes=mem.optimizer,
        activation_bytes_per_token=mem.activation_bytes_per_token,
        flops_per_token=flops,
        scan_flops_per_token=scan,
        train_tokens=cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len,
        proxy_tokens=proxy_tokens,
        recommended_proxy_tokens=TOKENS_PER_PARAM * proxy_info.num_params,
        warnings=list(recipe.source.get("warnings", [])),
    )


#: A Mamba-2 proxy with fewer heads than this draws too few per-head dt and A values for its activations to be
#: typical: at d_model 64, headdim 64 (2 heads) the seed-to-seed spread of log2 RMS of layer 1's state change after
#: 8 steps is 0.87 over 24 seeds, and 4 seeds estimate it as 0.12 (docs/health.md, "Mamba-2 proxies").
MIN_PROXY_HEADS = 8


def warnings(recipe: Recipe, proxy: RunConfig, info: ShapeInfo, proxy_info: ShapeInfo) -> list[str]:
    """Notes for a person about to launch: ratios beyond what was verified, an under-trained proxy, ..."""
    out: list[str] = []
    cfg = recipe.run
    ratio = recipe.source["ratio"]
    for what, r in (("width (N_u)", ratio["width"]), ("state (N_x)", ratio["state"])):
        if r < 1:
            out.append(
                f"the target's {what} is SMALLER than the proxy's ({r:g}x): µP transfers a small proxy's optimum "
                "up in width; going down extrapolates the rules where nothing was verified; tune at the target "
                "width directly, or transfer from a narrower proxy"
            )
        if r > VERIFIED_RATIO or r < 1 / VERIFIED_RATIO:
            out.append(
                f"{what} transfer ratio {r:g}x is outside what the coordinate/LR-transfer checks verified "
                f"(<= {VERIFIED_RATIO:g}x); verify with `mupt check transfer` at intermediate widths"
            )
    tokens = recipe.source["proxy"]["tokens"]
    need = TOKENS_PER_PARAM * proxy_info.num_params
    shape = (cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len)
    proxy_shape = (proxy.train.steps, proxy.train.batch_size, proxy.train.seq_len)
    if shape != proxy_shape:
        text = (
            "the target's training length/batch ({} steps x {} x {}) differ from the proxy's ({} x {} x {}); "
            "µP transfers the LR across width, not across horizon or batch size, so re-tune the proxy at the "
            "target's steps and batch if you can"
        ).format(*shape, *proxy_shape)
        # a short proxy only misleads when the target trains longer than it: then its optimum is an extrapolation
        if tokens < FAR_FEWER * need and math.prod(shape) > tokens:
            text += (
                f"; the proxy saw only {tokens / proxy_info.num_params:.3g} tokens/parameter (recommended minimum "
                f"{TOKENS_PER_PARAM:g}, Chinchilla: {need:,.0f} tokens), and an optimum from a short proxy run "
                "tends to overestimate the LR of a longer run"
            )
        out.append(text)
    if Scheme(cfg.param.scheme) is not Scheme(proxy.param.scheme):
        out.append(
            f"the proxy was tuned under {Scheme(proxy.param.scheme).value}, this recipe uses "
            f"{Scheme(cfg.param.scheme).value}: the tuned LR is exact at the proxy shape only"
        )
        pbase = BaseShape.of(proxy.model, proxy.param)
        if (pbase.d_model, pbase.d_state) != (proxy.model.d_model, proxy.model.d_state):
            out.append(
                f"the proxy's own base shape ({pbase.d_model}, {pbase.d_state}) differs from its shape; under the new "
                "scheme its per-role LRs at the proxy width differ from the tuned ones"
            )
    if Scheme(cfg.param.scheme) is not Scheme.SP and not isinstance(cfg.model.dt_rank, str):
        out.append(
            f"dt_rank is fixed at {cfg.model.dt_rank}; the dt_proj rule assumes dt_rank grows with d_model ('auto')"
        )
    if proxy.model.arch is Arch.MAMBA2 and proxy.model.nheads < MIN_PROXY_HEADS:
        out.append(
            f"the proxy has {proxy.model.nheads} Mamba-2 heads (d_inner {proxy.model.d_inner} / headdim "
            f"{proxy.model.headdim}): with so few, its per-head dt and A draws make its activations seed-dependent, "
            "so its optimum is noisier and the health check's band (from --health-seeds proxy runs) too narrow; "
            f"tune a proxy with at least {MIN_PROXY_HEADS} heads (a smaller --headdim or a wider --width)"
        )
    return out


# --- files ----------------------------------------------------------------------------------------


def recipe_header(recipe: Recipe) -> str:
    s = recipe.source
    m = recipe.run.model
    p = s.get("proxy", {})
    if s.get("kind") == "study":
        where = f" ({s['path']})" if s.get("path") else ""
        origin = f"study {s.get('study')} trial {s.get('trial')}{where}, proxy val loss {s.get('value'):.4g} nats/token"
    else:
        origin = "an LR given directly (--lr)"
    tuned = ", ".join(f"{k}={v:.4g}" for k, v in s.get("params", {}).items())
    t = recipe.run.train
    length = f"train: {t.steps} steps x {t.batch_size} x {t.seq_len} tokens"
    if target_length_is_the_proxys(recipe):
        length += ", the proxy's length (mupt transfer --steps N sets the target's; mupt scale --steps overrides it)"
    return (
        f"mupt transfer: recipe for {m.arch_label} d_model={m.d_model} d_state={m.d_state} n_layers={m.n_layers} "
        f"under {Scheme(recipe.run.param.scheme).value}\n"
        f"from {origin}\n"
        f"proxy d_model={p.get('d_model')} d_state={p.get('d_state')} ({p.get('scheme')}); tuned {tuned}\n"
        f"{length}\n"
        f"created {s.get('created')}; launch with: mupt scale <this file>"
    )


def target_length_is_the_proxys(recipe: Recipe) -> bool:
    """True when the target run trains exactly as many steps as the proxy did (``--steps`` not given, or
    given equal): a proxy's length (e.g. 64 steps) is rarely what a wide run should train."""
    proxy_train = (recipe.source.get("proxy_config") or {}).get("train") or {}
    return proxy_train.get("steps") == recipe.run.train.steps


def per_role_frame(recipe: Recipe) -> pd.DataFrame:
    """The recipe's per-role table, one row per role: base-shape and target init std, LR (global LR x
    multiplier, before the schedule), forward multiplier and weight decay, and the target/base ratios."""
    import pandas as pd

    base = recipe.source.get("base_per_role", {})
    records = []
    for role, tgt in recipe.per_role.items():
        b: Mapping[str, Any] = base.get(role) or {}
        row: dict[str, Any] = {"role": role}
        for key in ("init_std", "lr", "fwd_mult", "weight_decay"):
            row[f"base_{key}"], row[key] = b.get(key), tgt.get(key)
            ok = b.get(key) not in (None, 0) and tgt.get(key) is not None
            row[f"{key}_ratio"] = tgt[key] / b[key] if ok else None  # type: ignore[operator]
        records.append(row)
    return pd.DataFrame.from_records(records)


def save_recipe(path: str | Path, recipe: Recipe) -> Path:
    path = Path(path)
    save_yaml(path, recipe, header=recipe_header(recipe))
    return path


def default_recipe_path(recipe: Recipe | RunConfig, directory: str | Path) -> Path:
    """``<directory>/<scheme>-<d_model>.yaml`` for a recipe (or its target run config).

    ``mupt transfer`` passes the directory of the best.yaml it read (``runs/<study>/``), or ``--runs-dir``
    with ``--lr``: a recipe lands next to the study it came from, never over the examples in ``recipes/``.
    """
    run = recipe.run if isinstance(recipe, Recipe) else recipe
    return Path(directory) / f"{Scheme(run.param.scheme).value}-{run.model.d_model}.yaml"


#: Recipe fields that do not make it another recipe: when it was written, the measured expected regret and
#: the warnings (annotations that a later ``mupt check transfer`` or release may change), and the health
#: reference (re-measured from the same proxy and settings).
_VOLATILE_SOURCE = ("created", "expected_regret", "warnings")


def _identity(recipe: Recipe) -> dict[str, Any]:
    data = to_dict(recipe)
    data.pop("health", None)
    for key in _VOLATILE_SOURCE:
        data["source"].pop(key, None)
    return data


@dataclass(frozen=True)
class ExistingRecipe:
    """What an output path already holds before ``mupt transfer`` writes its recipe there.

    ``same``: it is this very recipe (same source, target run, per-role values, manifest, launch and data;
    only its creation time, expected regret, warnings or health reference may differ), so replacing it
    loses nothing.  ``what`` describes it for a one-line refusal.
    """

    same: bool
    what: str


def existing_recipe(path: str | Path, recipe: Recipe) -> ExistingRecipe | None:
    """What ``path`` holds compared with ``recipe`` (None when there is no file).  Never raises for an
    unreadable file: it counts as a file that is not a recipe.  The caller decides (``mupt transfer``
    replaces anything but the same recipe only with ``--overwrite``; README, "Where results go")."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        old = load_recipe(path)
    except (MuptError, OSError):
        return ExistingRecipe(False, "a file that is not a mupt recipe")
    if _identity(old) == _identity(recipe):
        return ExistingRecipe(True, "this recipe")
    s, m = old.source, old.run.model
    origin = f"study {s.get('study')} trial {s.get('trial')}" if s.get("kind") == "study" else "an --lr transfer"
    return ExistingRecipe(
        False,
        f"another recipe (from {origin}, d_model {m.d_model}, {old.run.train.steps} steps, created "
        f"{s.get('created', '?')})",
    )


# --- explain --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleExplanation:
    """One role's rule as text: exponents of N_u, N_x for init std, LR, forward multiplier and weight
    decay (relative to the given value; "none" when the role gets none), the reason, and ``ref``, the
    anchor of docs/width_rules.md where it is derived (``docs/width_rules.md#<ref>``)."""

    role: str
    init: str
    lr: str
    fwd: str
    weight_decay: str
    why: str
    ref: str


def explain(
    scheme: Scheme | str, optimizer: OptimizerName | str, disc: str, arch: Arch | str = Arch.MAMBA1
) -> list[RuleExplanation]:
    """Per role of an ``arch`` model, from the rule data (:data:`mupt.parametrization.RULE_TABLE`):
    exponents, why, and derivation."""
    rules = rules_for(scheme, optimizer, disc)
    out = []
    for role in Role:
        if role not in rules or role not in ARCH_ROLES[Arch(arch)]:
            continue
        r = rules[role]
        wd = weight_decay_exp(r, role, scheme, optimizer, disc)
        out.append(
            RuleExplanation(role.value, format_exp(r.init), format_exp(r.lr), format_exp(r.fwd),
                            "none" if wd is None else format_exp(wd), r.why, r.ref)
        )  # fmt: skip
    return out


def explain_notes(scheme: Scheme | str, optimizer: OptimizerName | str) -> list[str]:
    """The rules ``apply`` adds on top of the per-role table (weight decay, Adam epsilon, multipliers)."""
    scheme, opt = Scheme(scheme), OptimizerName(optimizer)
    if scheme is Scheme.SP:
        wd = "the given weight decay in every decayed group"
    elif opt is OptimizerName.ADAM:
        wd = "plain Adam adds L2 to the gradient: wd x r^(lr_adam - lr_sgd - init) keeps wd·|p|/|g| width-independent"
    else:
        wd = f"{opt.value} decays by lr_group x wd_group per step: wd / lr_mult"
    notes = [f"weight decay: {wd} ({DOCS}#rule-weight-decay)"]
    if opt.family == "adam":
        eps = "1e-8 at every width" if scheme is Scheme.SP else "1e-8 / r_u (follows the gradients)"
        notes.append(f"Adam epsilon: {eps} ({DOCS}#rule-adam-eps)")
    notes.append(
        f"tunable output_mult / embedding_mult scale the lm_head / embedding outputs ({DOCS}#rule-multipliers)"
    )
    return notes


def expected_ratio(exp: Exp | None, r_u: float, r_x: float) -> float | None:
    return None if exp is None else r_u ** exp[0] * r_x ** exp[1]


def check_ratios(recipe: Recipe) -> list[str]:
    """Roles whose target/base init or LR ratio differs from the rule's powers (empty when all agree)."""
    cfg = recipe.run
    rules = rules_for(cfg.param.scheme, cfg.train.optimizer, cfg.model.discretization)
    r_u, r_x = recipe.source["ratio"]["width"], recipe.source["ratio"]["state"]
    bad = []
    for name, tgt in recipe.per_role.items():
        base = recipe.source["base_per_role"][name]
        rule = rules[Role(name)]
        for key, exp in (("lr", rule.lr), ("init_std", rule.init)):
            want = expected_ratio(exp, r_u, r_x)
            b, t = base.get(key), tgt.get(key)
            if want is None or not isinstance(b, (int, float)) or not isinstance(t, (int, float)):
                continue
            got = t / b
            if not math.isclose(got, want, rel_tol=1e-9):
                bad.append(f"{name}.{key}: ratio {got:.6g}, rule says {want:.6g}")
    return bad


__all__ = [
    "FINALIST_ORIGIN_KEYS",
    "ExistingRecipe",
    "RoleValues",
    "RuleExplanation",
    "Summary",
    "check_ratios",
    "chosen_finalist",
    "default_recipe_path",
    "default_scale_dir",
    "existing_recipe",
    "explain",
    "explain_notes",
    "format_exp",
    "latest_best",
    "load_best",
    "load_recipe",
    "lr_found_by",
    "per_role_frame",
    "recipe_header",
    "save_recipe",
    "shape_info",
    "summarize",
    "target_config",
    "target_length_is_the_proxys",
    "train_flops_per_token",
    "transfer",
    "warnings",
]
