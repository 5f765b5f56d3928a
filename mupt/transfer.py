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
import inspect
import math
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from mupt import parametrization
from mupt.config import (
    BestParams,
    DataConfig,
    LaunchConfig,
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
from mupt.errors import ConfigError, DataError, StorageError
from mupt.memory import memory_estimate, meta_model
from mupt.model import Role
from mupt.parametrization import BaseShape, Exp, Manifest, Rule, apply, rules_for

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
        roles[e.role] = RoleValues(**{**rv.__dict__, "numel": (prev.numel if prev else 0) + numel[name]})
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


# --- the transfer -------------------------------------------------------------------------------


def _check_width(flag: str, width: int, scheme: Scheme, dt_rank: int | str) -> None:
    if width <= 0:
        raise ConfigError(f"{flag} {width}: must be a positive d_model, e.g. 4096")
    parametrization.check_dt_rank_width(f"{flag} {width}:", width, scheme, dt_rank)


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
    _check_width("--to-width", to_width, target_scheme, pm.dt_rank)
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
        data_cfg = proxy.data.model_copy(update={"source": to_data})
        if data_cfg.vocab_size is None and proxy_data.get("tokenizer") is None:
            data_cfg = data_cfg.model_copy(update={"vocab_size": proxy_data.get("vocab_size")})
        target_data = data_identity(data_cfg, strict=True)
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
        launch=LaunchConfig(run_dir=f"runs/scale-{Scheme(target.param.scheme).value}-w{to_width}"),
        manifest=info.manifest.to_dict(),
        dataset=target_data,
    )
    recipe.source["warnings"] = warnings(recipe, proxy, info, proxy_info) + data_warnings
    return recipe


def data_identity(data: DataConfig, strict: bool = False) -> dict[str, Any]:
    """Identity of ``data`` (:func:`mupt.data.identity_of`); ``{}`` when it cannot be opened, unless ``strict``."""
    from mupt.data import identity_of, load_data

    try:
        return identity_of(load_data(data))
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


def summarize(recipe: Recipe) -> Summary:
    cfg = recipe.run
    info = shape_info(cfg)
    proxy = from_dict(RunConfig, recipe.source.get("proxy_config"), where="recipe source.proxy_config")
    proxy_info = shape_info(proxy)
    m = cfg.model
    mem = memory_estimate(cfg)
    scan = TRAIN_FLOP_FACTOR * SCAN_FWD_FLOPS * m.n_layers * m.d_inner * m.d_state
    flops = 6.0 * (info.num_params - info.embedding_params) + scan
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


def warnings(recipe: Recipe, proxy: RunConfig, info: ShapeInfo, proxy_info: ShapeInfo) -> list[str]:
    """Notes for a person about to launch: ratios beyond what was verified, an under-trained proxy, ..."""
    out: list[str] = []
    cfg = recipe.run
    ratio = recipe.source["ratio"]
    for what, r in (("width (N_u)", ratio["width"]), ("state (N_x)", ratio["state"])):
        if r > VERIFIED_RATIO or r < 1 / VERIFIED_RATIO:
            out.append(
                f"{what} transfer ratio {r:g}x is outside what the coordinate/LR-transfer checks verified "
                f"(<= {VERIFIED_RATIO:g}x); verify with `mupt check transfer` at intermediate widths"
            )
    tokens = recipe.source["proxy"]["tokens"]
    need = TOKENS_PER_PARAM * proxy_info.num_params
    if tokens < FAR_FEWER * need:
        out.append(
            f"proxy trained on {tokens:,} tokens = {tokens / proxy_info.num_params:.3g} tokens/parameter; the "
            f"recommended minimum is {TOKENS_PER_PARAM:g} tokens/parameter (Chinchilla) = {need:,.0f}; an optimum "
            "from a short proxy run tends to overestimate the LR of a long run"
        )
    if (cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len) != (
        proxy.train.steps, proxy.train.batch_size, proxy.train.seq_len,
    ):  # fmt: skip
        out.append(
            "the target's training length/batch differ from the proxy's; µP transfers the LR across width, "
            "not across horizon or batch size, so re-tune the proxy at the target's steps and batch if you can"
        )
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
    return (
        f"mupt transfer: recipe for d_model={m.d_model} d_state={m.d_state} n_layers={m.n_layers} "
        f"under {Scheme(recipe.run.param.scheme).value}\n"
        f"from {origin}\n"
        f"proxy d_model={p.get('d_model')} d_state={p.get('d_state')} ({p.get('scheme')}); tuned {tuned}\n"
        f"created {s.get('created')}; launch with: mupt scale <this file>"
    )


def save_recipe(path: str | Path, recipe: Recipe) -> Path:
    path = Path(path)
    save_yaml(path, recipe, header=recipe_header(recipe))
    return path


def default_recipe_path(recipe: Recipe, directory: str | Path = "recipes") -> Path:
    return Path(directory) / f"{Scheme(recipe.run.param.scheme).value}-{recipe.run.model.d_model}.yaml"


# --- explain --------------------------------------------------------------------------------------


def format_exp(exp: Exp | None) -> str:
    """``(-0.5, 0.5)`` -> ``N_u^-1/2 N_x^1/2``; ``(0, 0)`` -> ``1``; ``None`` -> ``structured``."""
    if exp is None:
        return "structured"
    parts = []
    for name, a in (("N_u", exp[0]), ("N_x", exp[1])):
        if a == 0:
            continue
        f = Fraction(a).limit_denominator(8)
        parts.append(name if f == 1 else f"{name}^{f}")
    return " ".join(parts) or "1"


_WHY_MUP_SSM: dict[Role, str] = {
    Role.EMBEDDING: "input layer: a lookup whose rows are Θ(1) at any width, so no init or Adam-LR scaling",
    Role.NORM: "per-coordinate gain (vector-like): no sum over width, Θ(1)",
    Role.IN_PROJ: "hidden matrix: fan-in init keeps W·u Θ(1); Adam moves all fan-in entries coherently: LR ∝ 1/fan_in",
    Role.CONV_WEIGHT: "depthwise per-channel filter: fan-in is d_conv, fixed with width (vector-like)",
    Role.CONV_BIAS: "per-channel bias (vector-like): Θ(1)",
    Role.X_PROJ_DT: "dt rows read all N_u channels into dt_rank ∝ d_model outputs: a hidden matrix",
    Role.X_PROJ_B: "each B_n feeds only its own state x_n (gain 1/(n+1)), so |B| must grow like sqrt(N_x) "
    "to keep RMS(x) Θ(1): var ∝ N_x/N_u, Adam LR ∝ sqrt(N_x)/N_u",
    Role.X_PROJ_C: "readout over the state: y = Σ_n C_n x_n sums N_x coherent terms, so var ∝ 1/(N_x N_u) and "
    "Adam LR ∝ 1/(N_u N_x) (docs/width_rules.md, Correction 2)",
    Role.DT_PROJ: "hidden matrix with fan-in dt_rank ∝ d_model",
    Role.DT_BIAS: "structured init (softplus^-1 of a log-uniform dt); per-channel vector, Θ(1) LR",
    Role.A_LOG: "structured init A_n = -(n+1); each entry drives only its own x_n, so it is vector-like, "
    "not a hidden matrix (a 1/N_u LR would freeze it at width)",
    Role.D: "per-channel skip (vector-like): Θ(1)",
    Role.OUT_PROJ: "hidden matrix (fan-in N_u), init also / sqrt(n_layers) for the pre-norm residual",
    Role.LM_HEAD: "readout: logits sum d_model coherent features, so init std ∝ 1/fan_in and LR ∝ 1/fan_in "
    "keep logits and their updates Θ(1)",
}
_WHY_MUP: dict[Role, str] = {
    Role.X_PROJ_B: "heuristic µP: a plain hidden matrix (no N_x dependence; the state gain is ignored)",
    Role.X_PROJ_C: "heuristic µP: a plain hidden matrix (no N_x dependence; the sum over the state is ignored)",
    Role.A_LOG: "heuristic µP treats this 2-D tensor as a hidden matrix: LR ∝ 1/N_u, so its updates vanish "
    "with width (the pitfall µP-SSM fixes)",
}
_WHY_SP: dict[Role, str] = {
    Role.EMBEDDING: "SP: Θ(1) init, the global LR",
    Role.CONV_WEIGHT: "SP: PyTorch default init (fan-in d_conv), the global LR",
    Role.CONV_BIAS: "SP: PyTorch default init, the global LR",
}


def why(role: Role, scheme: Scheme, optimizer: OptimizerName | str) -> str:
    scheme = Scheme(scheme)
    sgd = OptimizerName(optimizer).family == "sgd"
    if scheme is Scheme.SP:
        if role in _WHY_SP:
            return _WHY_SP[role]
        if role in (Role.NORM, Role.DT_BIAS, Role.D, Role.A_LOG):
            return "SP: structured (mamba_ssm) init, the global LR"
        return "SP: fan-in init (std 1/sqrt(fan_in)) as PyTorch/mamba_ssm, one global LR for everything"
    text = (_WHY_MUP if scheme is Scheme.MUP and role in _WHY_MUP else _WHY_MUP_SSM)[role]
    if sgd and role in (Role.EMBEDDING, Role.NORM, Role.CONV_WEIGHT, Role.CONV_BIAS, Role.DT_BIAS, Role.D, Role.A_LOG):
        text += "; SGD: vector-like LR ∝ N_u (gradients shrink as 1/N_u)"
    return text


def _relpath(file: str) -> str:
    root = Path(parametrization.__file__).resolve().parent.parent
    try:
        return str(Path(file).resolve().relative_to(root))
    except ValueError:
        return file


def rule_locations(scheme: Scheme | str, optimizer: OptimizerName | str, disc: str) -> dict[Role, str]:
    """``role -> "mupt/parametrization.py:LINE"``: the line that set the role's rule in the scheme's table.

    Found by introspection: the table builder is re-run under a line tracer that watches its
    ``rules`` dict and attributes each new ``Rule`` object to the line that put it there (nested
    builders, e.g. ``_mup_ssm`` calling ``_mup``, keep the innermost line).  Falls back to the
    line of ``rules_for`` if the builders change shape.
    """
    scheme = Scheme(scheme)
    family = OptimizerName(optimizer).family
    builders = {
        Scheme.SP: lambda: parametrization._sp(),
        Scheme.MUP: lambda: parametrization._mup(family),
        Scheme.MUP_SSM: lambda: parametrization._mup_ssm(family),
    }
    fallback_line = inspect.getsourcelines(parametrization.rules_for)[1]
    fallback = f"{_relpath(parametrization.__file__)}:{fallback_line}"
    file = parametrization._sp.__code__.co_filename
    seen: dict[int, int] = {}
    alive: list[Rule] = []
    frames: dict[Any, tuple[int | None, dict[Role, Rule]]] = {}

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event in ("line", "return"):
            prev, snap = frames.get(frame, (None, {}))
            rules = frame.f_locals.get("rules")
            if isinstance(rules, dict):
                for role, rule in rules.items():
                    if snap.get(role) is not rule and id(rule) not in seen and prev is not None:
                        seen[id(rule)] = prev
                        alive.append(rule)
                snap = dict(rules)
            frames[frame] = (frame.f_lineno, snap)
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == file else None

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        built = builders[scheme]()
    finally:
        sys.settrace(old)
    expected = rules_for(scheme, optimizer, disc)
    where = _relpath(file)
    out: dict[Role, str] = {}
    for role, rule in expected.items():
        got = built.get(role)
        line = seen.get(id(got)) if got == rule else None
        out[role] = f"{where}:{line}" if line else fallback
    return out


def apply_locations() -> dict[str, str]:
    """Where ``apply`` turns a rule into numbers: init std, LR multiplier, forward multiplier, weight decay."""
    lines, start = inspect.getsourcelines(parametrization.apply)
    where = _relpath(inspect.getsourcefile(parametrization.apply) or parametrization.__file__)
    marks = {
        "init": "std = _default_std",
        "lr": "lr_mult = _ratio",
        "fwd": "fwd[role] = _ratio",
        "weight_decay": "wd = ",
    }
    out = {}
    for key, needle in marks.items():
        idx = next((i for i, text in enumerate(lines) if needle in text), 0)
        out[key] = f"{where}:{start + idx}"
    return out


@dataclass(frozen=True)
class RuleExplanation:
    role: str
    init: str
    lr: str
    fwd: str
    why: str
    where: str


def explain(scheme: Scheme | str, optimizer: OptimizerName | str, disc: str) -> list[RuleExplanation]:
    """Per role: the exponents of N_u and N_x for init std, LR and forward multiplier, why, and where."""
    rules = rules_for(scheme, optimizer, disc)
    where = rule_locations(scheme, optimizer, disc)
    return [
        RuleExplanation(r.value, format_exp(rules[r].init), format_exp(rules[r].lr), format_exp(rules[r].fwd),
                        why(r, Scheme(scheme), optimizer), where[r])
        for r in Role if r in rules
    ]  # fmt: skip


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
            if want is None or base[key] is None:
                continue
            got = tgt[key] / base[key]  # type: ignore[operator]
            if not math.isclose(got, want, rel_tol=1e-9):
                bad.append(f"{name}.{key}: ratio {got:.6g}, rule says {want:.6g}")
    return bad


__all__ = [
    "RoleValues",
    "RuleExplanation",
    "Summary",
    "apply_locations",
    "check_ratios",
    "default_recipe_path",
    "explain",
    "format_exp",
    "latest_best",
    "load_best",
    "load_recipe",
    "recipe_header",
    "rule_locations",
    "save_recipe",
    "shape_info",
    "summarize",
    "target_config",
    "transfer",
    "warnings",
]
