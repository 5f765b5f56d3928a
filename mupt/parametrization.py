"""The width rules as DATA, and ``apply()`` that turns them into an initialised model,
optimizer parameter groups and a manifest.

A rule gives, per parameter role, three exponent pairs ``(a_u, a_x)``: the quantity scales as
``r_u**a_u * r_x**a_x`` with ``r_u = N_u / N_u_base`` (N_u = d_inner) and
``r_x = N_x / N_x_base`` (N_x = d_state), relative to its value at the base shape:

* ``init``: the init std.  At the base shape every role keeps the model's default (mamba_ssm)
  init, so the rules at base width reproduce the unscaled model bit for bit.  ``None`` marks a
  structured init (A_log, dt_bias, D, norms) that is never rescaled.
* ``lr``: the learning-rate multiplier on the global LR.
* ``fwd``: a forward multiplier on the role's output.

Tables exist for every scheme (sp, mup, mup-ssm) x optimizer family (adam, sgd) x
B-discretization (zoh, euler).  See docs/width_rules.md for the derivation and the measured
coordinate-check slopes that back them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mupt.config import (
    Arch,
    Discretization,
    ModelConfig,
    OptimizerName,
    ParamConfig,
    Scheme,
    atomic_write_text,
    read_yaml,
    write_yaml,
)
from mupt.errors import ConfigError
from mupt.model import MambaLM, MambaMixer, Role, role_of

Exp = tuple[float, float]  # exponents of (r_u, r_x)
ZERO: Exp = (0.0, 0.0)


@dataclass(frozen=True)
class Rule:
    init: Exp | None  # None: structured init, never rescaled
    lr: Exp
    fwd: Exp = ZERO


# --- the tables -------------------------------------------------------------------------
# Shorthand for the exponent pairs used below.
_FANIN: Exp = (-0.5, 0.0)  # std ~ 1/sqrt(fan_in) with fan_in ~ N_u
_INV_U: Exp = (-1.0, 0.0)
_U: Exp = (1.0, 0.0)

_VECTOR_LIKE = (Role.NORM, Role.CONV_WEIGHT, Role.CONV_BIAS, Role.DT_BIAS, Role.D)
_STRUCTURED = (Role.NORM, Role.DT_BIAS, Role.D, Role.A_LOG)
_MATRICES = (Role.IN_PROJ, Role.X_PROJ_DT, Role.X_PROJ_B, Role.X_PROJ_C, Role.DT_PROJ, Role.OUT_PROJ, Role.LM_HEAD)


def _sp() -> dict[Role, Rule]:
    """Standard parametrization: fan-in init everywhere, one global LR."""
    rules = {r: Rule(init=_FANIN, lr=ZERO) for r in _MATRICES}
    rules[Role.EMBEDDING] = Rule(init=ZERO, lr=ZERO)
    for r in (Role.CONV_WEIGHT, Role.CONV_BIAS):
        rules[r] = Rule(init=ZERO, lr=ZERO)
    for r in _STRUCTURED:
        rules[r] = Rule(init=None, lr=ZERO)
    return rules


def _mup(family: str) -> dict[Role, Rule]:
    """Heuristic µP as generic libraries apply it: every 2-D weight inside the network is a
    hidden matrix (A_log included), the embedding is the input layer, lm_head the readout."""
    hidden_lr = _INV_U if family == "adam" else ZERO
    vec_lr = ZERO if family == "adam" else _U
    rules = {r: Rule(init=_FANIN, lr=hidden_lr) for r in _MATRICES}
    rules[Role.A_LOG] = Rule(init=None, lr=hidden_lr)  # the pitfall: A_log treated as hidden
    rules[Role.LM_HEAD] = Rule(init=_INV_U, lr=_INV_U)
    rules[Role.EMBEDDING] = Rule(init=ZERO, lr=vec_lr)
    for r in _VECTOR_LIKE:
        rules[r] = Rule(init=None if r in _STRUCTURED else ZERO, lr=vec_lr)
    return rules


def _mup_ssm(family: str) -> dict[Role, Rule]:
    """µP-SSM (DESIGN.md section 4): B and C rows get their own N_u/N_x rules, A_log and the
    vector-like SSM parameters are not hidden matrices."""
    adam = family == "adam"
    rules = _mup(family)
    rules[Role.A_LOG] = Rule(init=None, lr=ZERO if adam else _U)
    # dt rows and dt_proj keep _mup's hidden-matrix rules.
    # B and C rows, the same for ZOH and Euler B (docs/width_rules.md): var(W_B) ~ N_x/N_u,
    # var(W_C) ~ 1/(N_x N_u).
    # * C's Adam LR CORRECTED from 1/(N_u sqrt N_x) to 1/(N_u N_x) ("Correction 2"): y sums N_x coherent
    #   updates C_n x_n, so C is a readout over the state; measured layer-0 y slope +0.28 -> +0.03 (N_x scaled).
    # * Euler B rows CORRECTED to the ZOH rows ("Correction 1" for Adam, "Correction 3" for SGD).  DESIGN.md's
    #   var(W_B) ~ 1/N_u made x and Δx shrink under N_x scaling (Adam -0.66..-0.79; SGD -0.18..-0.39): the
    #   state's steady-state gain is 1/|A_n| = 1/(n+1) for Euler too (dt*B summed over ~1/(dt|A_n|) steps),
    #   so B needs the same sqrt(N_x) boost.
    rules[Role.X_PROJ_B] = Rule(init=(-0.5, 0.5), lr=(-1.0, 0.5) if adam else (-1.0, 1.0))
    rules[Role.X_PROJ_C] = Rule(init=(-0.5, -0.5), lr=(-1.0, -1.0))
    return rules


RULES: dict[tuple[Scheme, str, Discretization], dict[Role, Rule]] = {}
for _family in ("adam", "sgd"):
    for _disc in Discretization:
        RULES[(Scheme.SP, _family, _disc)] = _sp()
        RULES[(Scheme.MUP, _family, _disc)] = _mup(_family)
        RULES[(Scheme.MUP_SSM, _family, _disc)] = _mup_ssm(_family)

#: Tied embeddings: the LM head reads out through the embedding's tensor (a shared readout).  The shared
#: tensor keeps the EMBEDDING role's init and LR (Θ(1) entries; Adam LR 1, SGD LR r_u); the readout gets the
#: forward multiplier below, 1/r_u under µP, as microsoft/mup's MuSharedReadout divides its input by the
#: width multiplier (docs/width_rules.md, "Tied embeddings: a shared readout").  ``init`` and ``lr`` are
#: unused (the tensor follows the embedding's rule).
TIED_READOUT: dict[Scheme, Rule] = {
    Scheme.SP: Rule(init=None, lr=ZERO, fwd=ZERO),
    Scheme.MUP: Rule(init=None, lr=ZERO, fwd=_INV_U),
    Scheme.MUP_SSM: Rule(init=None, lr=ZERO, fwd=_INV_U),
}

NO_WEIGHT_DECAY = frozenset({Role.NORM, Role.CONV_BIAS, Role.DT_BIAS, Role.A_LOG, Role.D, Role.EMBEDDING})

#: Adam's epsilon at the base width (PyTorch's default).  Under µP every gradient except the readout's
#: shrinks like 1/N_u, so a fixed epsilon damps the smallest ones at large width (measured at d_model
#: 4096: first-step |g|/(|g|+1e-8) is 0.34 for A_log and 0.30 for dt_proj, vs ~1 at d_model 64).  The
#: µP schemes scale it with the gradients, eps = ADAM_EPS / r_u (docs/width_rules.md, "Adam epsilon").
ADAM_EPS = 1e-8


def rules_for(scheme: Scheme | str, optimizer: OptimizerName | str, disc: Discretization | str) -> dict[Role, Rule]:
    try:
        key = (Scheme(scheme), OptimizerName(optimizer).family, Discretization(disc))
    except ValueError as err:
        raise ConfigError(f"{err}; schemes: sp, mup, mup-ssm; optimizers: adamw, adam, sgd") from None
    return RULES[key]


# --- shapes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseShape:
    d_model: int
    d_state: int

    @classmethod
    def of(cls, model_cfg: ModelConfig, param: ParamConfig) -> BaseShape:
        return cls(param.base_d_model or model_cfg.d_model, param.base_d_state or model_cfg.d_state)


def _default_std(role: Role, cfg: ModelConfig) -> float:
    """Std of the model's default init for a role at shape ``cfg`` (see MambaLM.reset_parameters)."""
    fan_in = {
        Role.IN_PROJ: cfg.d_model,
        Role.LM_HEAD: cfg.d_model,
        Role.X_PROJ_DT: cfg.d_inner,
        Role.X_PROJ_B: cfg.d_inner,
        Role.X_PROJ_C: cfg.d_inner,
        Role.OUT_PROJ: cfg.d_inner,
        Role.DT_PROJ: cfg.dt_rank_value,
        Role.CONV_WEIGHT: cfg.d_conv,
        Role.CONV_BIAS: cfg.d_conv,
    }
    if role is Role.EMBEDDING:
        return 0.02
    std = 1.0 / math.sqrt(3.0 * fan_in[role])
    return std / math.sqrt(cfg.n_layers) if role is Role.OUT_PROJ else std


def _ratio(exp: Exp, r_u: float, r_x: float) -> float:
    return r_u ** exp[0] * r_x ** exp[1]


# --- apply ------------------------------------------------------------------------------


@dataclass
class Entry:
    """Manifest row for one parameter."""

    role: str
    shape: list[int]
    fan_in: int
    fan_out: int
    init_std: float | None
    lr_mult: float
    fwd_mult: float
    weight_decay: float


@dataclass
class Manifest:
    scheme: str
    optimizer: str
    discretization: str
    base_d_model: int
    base_d_state: int
    d_model: int
    d_state: int
    params: dict[str, Entry] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            params = {k: Entry(**v) for k, v in data["params"].items()}
            return cls(**{**data, "params": params})
        except (KeyError, TypeError) as err:
            raise ConfigError(f"manifest is malformed ({err}); regenerate it with mupt") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix == ".json":
            atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        else:
            write_yaml(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.suffix == ".json":
            try:
                return cls.from_dict(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"{path}: cannot read manifest ({err}); regenerate it") from None
        return cls.from_dict(read_yaml(path))


@dataclass
class Parametrized:
    param_groups: list[dict[str, Any]]
    manifest: Manifest


def _fan(p: torch.Tensor) -> tuple[int, int]:
    if p.dim() == 1:
        return 1, p.shape[0]
    if p.dim() == 3:  # depthwise conv (d_inner, 1, d_conv)
        return p.shape[1] * p.shape[2], p.shape[0]
    return p.shape[1], p.shape[0]


def named_roles(model: nn.Module) -> dict[str, Role]:
    """Every parameter's role; raises if any parameter has none (nothing silently defaults)."""
    out: dict[str, Role] = {}
    arch = model.cfg.arch if isinstance(model, MambaLM) else Arch.MAMBA1
    for name, _ in model.named_parameters():
        try:
            out[name] = role_of(name, arch)
        except KeyError as err:
            raise ConfigError(str(err)) from None
    return out


def check_dt_rank_width(lead: str, width: int, scheme: Scheme, dt_rank: int | str, hint: str = "") -> None:
    """Refuse a d_model whose auto dt_rank = ceil(d_model/16) would not scale with width (non-sp schemes).

    ``lead`` starts the one-line message (e.g. ``"d_model=72 is"``); ``hint`` ends it.
    """
    if scheme is Scheme.SP or dt_rank != "auto" or width % 16 == 0:
        return
    lo, hi = width // 16 * 16, (width // 16 + 1) * 16
    raise ConfigError(
        f"{lead} not a multiple of 16, so dt_rank=ceil(d_model/16) does not scale with width and the "
        f"{scheme.value} rules cannot hold; use {lo or hi} or {hi}{hint}"
    )


def apply(
    model: MambaLM,
    param: ParamConfig,
    optimizer: OptimizerName | str,
    lr: float,
    weight_decay: float = 0.0,
    reinit: bool = True,
) -> Parametrized:
    """Initialise ``model`` under ``param.scheme`` and return its optimizer groups + manifest.

    ``reinit`` rescales the model's current init (the default one, or the std a previous ``apply`` gave
    it, kept in ``model.init_stds``) to the rule's std, so calling ``apply`` again is idempotent and a
    second scheme starts from the right scale; pass False when loading trained weights.  Groups carry
    ``lr = lr * lr_mult``, ``lr_mult`` and Adam's ``eps`` (:data:`ADAM_EPS`, divided by r_u under the µP
    schemes; SGD ignores it); schedules must multiply group LRs (LambdaLR does), never set them absolutely.
    Decoupled weight decay: PyTorch's AdamW decays by ``lr_group * wd_group`` per step, so ``wd_group = wd / lr_mult``
    keeps the per-step decay width-independent; roles in NO_WEIGHT_DECAY get none.
    """
    cfg = model.cfg
    scheme = Scheme(param.scheme)
    rules = rules_for(scheme, optimizer, model.cfg.discretization)  # validates the names first
    opt = OptimizerName(optimizer)
    base = BaseShape.of(cfg, param)
    for what, width in (("d_model", cfg.d_model), ("base d_model", base.d_model)):
        check_dt_rank_width(f"{what}={width} is", width, scheme, cfg.dt_rank, hint=", or set dt_rank")
    base_cfg = cfg.model_copy(update={"d_model": base.d_model, "d_state": base.d_state})
    r_u, r_x = cfg.d_inner / base_cfg.d_inner, cfg.d_state / base.d_state
    roles = named_roles(model)
    manifest = Manifest(
        scheme.value, opt.value, cfg.discretization.value, base.d_model, base.d_state, cfg.d_model, cfg.d_state
    )
    eps = ADAM_EPS if scheme is Scheme.SP else ADAM_EPS / r_u
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    fwd: dict[Role, float] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            role = roles[name]
            rule = rules[role]
            std: float | None = None
            if rule.init is not None:
                std = _default_std(role, base_cfg) * _ratio(rule.init, r_u, r_x) * param.init_scale
                if reinit:  # from the std the weights have now: a second apply() does not compound
                    p.mul_(std / model.init_stds.get(name, _default_std(role, cfg)))
                    model.init_stds[name] = std
            lr_mult = _ratio(rule.lr, r_u, r_x)
            fwd[role] = _ratio(rule.fwd, r_u, r_x)
            wd = 0.0 if role in NO_WEIGHT_DECAY else weight_decay / lr_mult
            fan_in, fan_out = _fan(p)
            manifest.params[name] = Entry(role.value, list(p.shape), fan_in, fan_out, std, lr_mult, 0.0, wd)
            g = groups.setdefault(
                (lr_mult, wd),
                {"params": [], "names": [], "lr": lr * lr_mult, "lr_mult": lr_mult, "weight_decay": wd, "eps": eps},
            )
            g["params"].append(p)
            g["names"].append(name)
    if cfg.tie_embeddings:  # lm_head is the embedding's tensor: a shared readout with its own multiplier
        fwd[Role.LM_HEAD] = _ratio(TIED_READOUT[scheme].fwd, r_u, r_x)
    fwd[Role.LM_HEAD] *= param.output_mult
    fwd[Role.EMBEDDING] *= param.embedding_mult
    set_forward_multipliers(model, fwd)
    for entry in manifest.params.values():
        entry.fwd_mult = fwd[Role(entry.role)]
    return Parametrized(list(groups.values()), manifest)


def set_forward_multipliers(model: MambaLM, fwd: dict[Role, float]) -> None:
    """Put the per-role forward multipliers on the modules (plain floats, no tensor attributes)."""
    model.mult_output = fwd.get(Role.LM_HEAD, 1.0)
    model.backbone.mult_embedding = fwd.get(Role.EMBEDDING, 1.0)
    for layer in model.backbone.layers:
        m: MambaMixer = layer.mixer  # type: ignore[assignment]
        m.mult_in = fwd.get(Role.IN_PROJ, 1.0)
        m.mult_dt_proj = fwd.get(Role.DT_PROJ, 1.0)
        m.mult_out = fwd.get(Role.OUT_PROJ, 1.0)
        m.x_proj.mult_dt = fwd.get(Role.X_PROJ_DT, 1.0)
        m.x_proj.mult_B = fwd.get(Role.X_PROJ_B, 1.0)
        m.x_proj.mult_C = fwd.get(Role.X_PROJ_C, 1.0)
