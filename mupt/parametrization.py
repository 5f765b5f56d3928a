"""The width rules as DATA, and ``apply()`` that turns them into an initialised model,
optimizer parameter groups and a manifest.

A rule gives, per parameter role, three exponent pairs ``(a_u, a_x)``: the quantity scales as
``r_u**a_u * r_x**a_x`` with ``r_u = N_u / N_u_base`` (N_u = d_inner) and
``r_x = N_x / N_x_base`` (N_x = d_state), relative to its value at the base shape:

* ``init``: the init std.  At the base shape every role keeps the model's default (mamba_ssm)
  init (:func:`mupt.model.default_init_std`), so the rules at base width reproduce the unscaled
  model bit for bit.  ``None`` marks a structured init (A_log, dt_bias, D, norms) that is never
  rescaled.
* ``lr``: the learning-rate multiplier on the global LR.
* ``fwd``: a forward multiplier on the role's output.

Each rule also carries ``why`` (one sentence) and ``ref`` (an anchor of docs/width_rules.md where
it is derived).  :data:`RULE_TABLE` is the one home of every rule: ``rules_for``, ``apply``,
``mupt transfer --explain`` and the generated table in docs/width_rules.md all read it (a test
fails when the docs and the data disagree; regenerate with
``python -m mupt.parametrization docs/width_rules.md``).

Adding a role (e.g. a new block's parameter): add it to :class:`mupt.model.Role` and
``mupt.model.default_init_std``, then add :class:`RuleRow` entries to :data:`RULE_TABLE` so that
every (scheme, optimizer family, discretization) has exactly one rule for it (checked when this
module is imported), write its derivation under an ``<a id="rule-...">`` anchor in
docs/width_rules.md and regenerate the docs table.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mupt.config import (
    Arch,
    Discretization,
    Entry,
    Manifest,
    ModelConfig,
    OptimizerName,
    ParamConfig,
    Scheme,
    atomic_write_text,
    from_dict,
)
from mupt.errors import ConfigError
from mupt.model import ARCH_ROLES, Mamba2Mixer, MambaLM, MambaMixer, Role, default_init_std, role_of

Exp = tuple[float, float]  # exponents of (r_u, r_x)
ZERO: Exp = (0.0, 0.0)

#: Where every ``Rule.ref`` anchor lives (relative to the repository root).
DOCS = "docs/width_rules.md"


@dataclass(frozen=True)
class Rule:
    """One role's width rule: exponents of (r_u, r_x) for init std, LR multiplier and forward multiplier.

    ``init`` None means a structured init that is never rescaled.  ``why`` says in one sentence why
    the exponents are what they are; ``ref`` is the anchor (``<a id=...>``) in docs/width_rules.md
    where the rule is derived.
    """

    init: Exp | None
    lr: Exp
    fwd: Exp = ZERO
    why: str = ""
    ref: str = ""

    @property
    def doc_link(self) -> str:
        """``docs/width_rules.md#<ref>``: where the rule is derived."""
        return f"{DOCS}#{self.ref}"


ALL_FAMILIES: tuple[str, ...] = ("adam", "sgd")
ALL_DISCS: tuple[Discretization, ...] = tuple(Discretization)


@dataclass(frozen=True)
class RuleRow:
    """One row of :data:`RULE_TABLE`: ``rule`` holds for ``roles`` under every listed scheme,
    optimizer family ('adam' covers Adam and AdamW, 'sgd') and B discretization."""

    schemes: tuple[Scheme, ...]
    roles: tuple[Role, ...]
    rule: Rule
    families: tuple[str, ...] = ALL_FAMILIES
    discs: tuple[Discretization, ...] = ALL_DISCS


# --- the table --------------------------------------------------------------------------
_FANIN: Exp = (-0.5, 0.0)  # std ~ 1/sqrt(fan_in) with fan_in ~ N_u
_INV_U: Exp = (-1.0, 0.0)
#: mamba2 B/C rows: std sqrt(fan_out)/fan_in with fan_out = ngroups*N_x (docs/width_rules.md, correction 5)
_BC_SPECTRAL: Exp = (-1.0, 0.5)
_U: Exp = (1.0, 0.0)
_SP, _MUP, _SSM = (Scheme.SP,), (Scheme.MUP,), (Scheme.MUP_SSM,)
_BOTH_MUP = (Scheme.MUP, Scheme.MUP_SSM)
_ADAM, _SGD = ("adam",), ("sgd",)
_SGD_VEC = "; SGD: vector-like LR ∝ N_u (its gradient shrinks as 1/N_u)"

_HIDDEN_WHY: dict[Role, str] = {
    Role.IN_PROJ: "hidden matrix: fan-in init keeps W·u Θ(1); Adam moves all fan-in entries coherently: LR ∝ 1/fan_in",
    Role.X_PROJ_DT: "dt rows read all N_u channels into dt_rank ∝ d_model outputs: a hidden matrix",
    Role.DT_PROJ: "hidden matrix with fan-in dt_rank ∝ d_model",
    Role.OUT_PROJ: "hidden matrix (fan-in N_u), init also / sqrt(n_layers) for the pre-norm residual",
}
_VECTOR_WHY: dict[Role, str] = {
    Role.NORM: "per-coordinate gain (vector-like): no sum over width, Θ(1)",
    Role.CONV_WEIGHT: "depthwise per-channel filter: fan-in is d_conv, fixed with width (vector-like)",
    Role.CONV_BIAS: "per-channel bias (vector-like): Θ(1)",
    Role.DT_BIAS: "structured init (softplus^-1 of a log-uniform dt); per-channel vector, Θ(1) LR",
    Role.D: "per-channel skip (vector-like): Θ(1)",
}
_EMBEDDING_WHY = "input layer: a lookup whose rows are Θ(1) at any width, so no init or Adam-LR scaling"
_A_LOG_SSM_WHY = (
    "structured init A_n = -(n+1); each entry drives only its own x_n, so it is vector-like, "
    "not a hidden matrix (a 1/N_u LR would freeze it at width)"
)
_A_LOG_MUP_WHY = (
    "heuristic µP treats this 2-D tensor as a hidden matrix: LR ∝ 1/N_u (Adam), so its updates vanish "
    "with width (the pitfall µP-SSM fixes)"
)
_B_WHY = (
    "each B_n feeds only its own state x_n (gain 1/(n+1)), so |B| must grow like sqrt(N_x) to keep RMS(x) Θ(1): "
    "var ∝ N_x/N_u; no sum over n, so Adam LR ∝ sqrt(N_x)/N_u (SGD N_x/N_u); Euler-B as ZOH (corrections 1, 3)"
)
_C_WHY = (
    "readout over the state: y = Σ_n C_n x_n sums N_x coherent terms, so var ∝ 1/(N_x N_u) and "
    "LR ∝ 1/(N_u N_x) (correction 2)"
)

_MAMBA2_HIDDEN_WHY: dict[Role, str] = {
    Role.IN_PROJ_Z: "mamba2 gate rows: hidden matrix (fan-in d_model, fan-out d_inner)",
    Role.IN_PROJ_X: "mamba2 x rows: hidden matrix (fan-in d_model, fan-out d_inner)",
    Role.IN_PROJ_DT: "mamba2 dt rows: fan-in d_model, one output per head (heads ∝ d_model): a hidden matrix",
}
_MAMBA2_VECTOR_WHY: dict[Role, str] = {
    Role.A_LOG_HEAD: "mamba2: one A per head, a vector over heads (structured init A ~ U[1, 16]): vector-like",
    Role.GATED_NORM: "mamba2 gated RMSNorm gain: per-coordinate (vector-like), Θ(1)",
}
_MAMBA2_MUP_BC_WHY = "heuristic µP: part of the fused in_proj, a plain hidden matrix (no N_x dependence)"
_MAMBA2_B_WHY = (
    "mamba2 B rows: A is one scalar per head, so every state coordinate has gain Θ(1) and B needs no sqrt(N_x) "
    "boost; fan-out ngroups*N_x against fan-in d_model: init std sqrt(fan_out)/fan_in (spectral condition), "
    "so r_u^-1 with N_x fixed (a readout: its backward into the residual stream stays µP-sized) and "
    "the hidden r_u^-1/2 when N_x scales with width (correction 5); Adam LR 1/fan_in"
)
_MAMBA2_C_WHY = (
    "mamba2 C rows: readout over the N_x-dim state (y = Σ_n C_n h_n, like q·k in attention), so C_n ∝ 1/N_x; "
    "the conv1d bias sets C's scale, so the 1/N_x is a forward multiplier on C after conv1d and SiLU (correction 4); "
    "W_C's init and LR as the B rows' (correction 5)"
)
_MAMBA2_SGD_BC = (
    "; SGD (derived, not measured): shared by ∝ N_u heads, so the gradient sums N_u coherent terms, and it carries "
    "C's 1/N_x: LR ∝ N_x/N_u"
)

RULE_TABLE: tuple[RuleRow, ...] = (
    # --- SP: PyTorch/mamba_ssm defaults at every width, one global LR
    RuleRow(_SP, (Role.IN_PROJ, Role.X_PROJ_DT, Role.X_PROJ_B, Role.X_PROJ_C, Role.DT_PROJ, Role.OUT_PROJ,
                  Role.LM_HEAD),
            Rule(_FANIN, ZERO, why="SP: fan-in init (std 1/sqrt(fan_in)) as PyTorch/mamba_ssm, one global LR",
                 ref="rule-sp")),
    RuleRow(_SP, (Role.EMBEDDING,), Rule(ZERO, ZERO, why="SP: Θ(1) init, the global LR", ref="rule-sp")),
    RuleRow(_SP, (Role.CONV_WEIGHT, Role.CONV_BIAS),
            Rule(ZERO, ZERO, why="SP: PyTorch default init (fan-in d_conv, fixed with width), the global LR",
                 ref="rule-sp")),
    RuleRow(_SP, (Role.NORM, Role.DT_BIAS, Role.D, Role.A_LOG),
            Rule(None, ZERO, why="SP: structured (mamba_ssm) init, the global LR", ref="rule-sp")),
    # --- µP (heuristic) and µP-SSM: hidden matrices, readout, input and vector-like roles
    *(RuleRow(_BOTH_MUP, (role,), Rule(_FANIN, _INV_U, why=why, ref="rule-hidden"), families=_ADAM)
      for role, why in _HIDDEN_WHY.items()),
    *(RuleRow(_BOTH_MUP, (role,), Rule(_FANIN, ZERO, why=why + "; SGD: LR Θ(1)", ref="rule-hidden"), families=_SGD)
      for role, why in _HIDDEN_WHY.items()),
    RuleRow(_BOTH_MUP, (Role.LM_HEAD,),
            Rule(_INV_U, _INV_U, why="readout: logits sum d_model coherent features, so init std ∝ 1/fan_in and "
                 "LR ∝ 1/fan_in keep logits and their updates Θ(1)", ref="rule-readout")),
    RuleRow(_BOTH_MUP, (Role.EMBEDDING,), Rule(ZERO, ZERO, why=_EMBEDDING_WHY, ref="rule-embedding"),
            families=_ADAM),
    RuleRow(_BOTH_MUP, (Role.EMBEDDING,), Rule(ZERO, _U, why=_EMBEDDING_WHY + _SGD_VEC, ref="rule-embedding"),
            families=_SGD),
    *(RuleRow(_BOTH_MUP, (role,), Rule(None if role in (Role.NORM, Role.DT_BIAS, Role.D) else ZERO, lr, why=why,
                                        ref="rule-vector-like"), families=fam)
      for role, why0 in _VECTOR_WHY.items()
      for fam, lr, why in ((_ADAM, ZERO, why0), (_SGD, _U, why0 + _SGD_VEC))),
    # --- µP (heuristic): every 2-D weight is a hidden matrix, A_log and the B/C rows included
    RuleRow(_MUP, (Role.X_PROJ_B, Role.X_PROJ_C),
            Rule(_FANIN, _INV_U, why="heuristic µP: a plain hidden matrix (no N_x dependence; the state gain and "
                 "the sum over the state are ignored)", ref="rule-heuristic"), families=_ADAM),
    RuleRow(_MUP, (Role.X_PROJ_B, Role.X_PROJ_C),
            Rule(_FANIN, ZERO, why="heuristic µP: a plain hidden matrix (no N_x dependence; the state gain and "
                 "the sum over the state are ignored)", ref="rule-heuristic"), families=_SGD),
    RuleRow(_MUP, (Role.A_LOG,), Rule(None, _INV_U, why=_A_LOG_MUP_WHY, ref="rule-heuristic"), families=_ADAM),
    RuleRow(_MUP, (Role.A_LOG,), Rule(None, ZERO, why="heuristic µP treats this 2-D tensor as a hidden matrix: "
                                      "SGD LR Θ(1) where a vector-like role needs N_u", ref="rule-heuristic"),
            families=_SGD),
    # --- µP-SSM: A_log vector-like; B and C rows with their own N_u/N_x rules (ZOH and Euler alike)
    RuleRow(_SSM, (Role.A_LOG,), Rule(None, ZERO, why=_A_LOG_SSM_WHY, ref="rule-vector-like"), families=_ADAM),
    RuleRow(_SSM, (Role.A_LOG,), Rule(None, _U, why=_A_LOG_SSM_WHY + _SGD_VEC, ref="rule-vector-like"),
            families=_SGD),
    RuleRow(_SSM, (Role.X_PROJ_B,), Rule((-0.5, 0.5), (-1.0, 0.5), why=_B_WHY, ref="rule-b-rows"), families=_ADAM),
    RuleRow(_SSM, (Role.X_PROJ_B,), Rule((-0.5, 0.5), (-1.0, 1.0), why=_B_WHY, ref="rule-b-rows"), families=_SGD),
    RuleRow(_SSM, (Role.X_PROJ_C,), Rule((-0.5, -0.5), (-1.0, -1.0), why=_C_WHY, ref="rule-c-rows")),
    # --- Mamba-2 (arch mamba2; docs/width_rules.md section 9): in_proj rows, per-head vectors, gated norm
    RuleRow(_SP, (Role.IN_PROJ_Z, Role.IN_PROJ_X, Role.IN_PROJ_B, Role.IN_PROJ_C, Role.IN_PROJ_DT),
            Rule(_FANIN, ZERO, why="SP: fan-in init (std 1/sqrt(fan_in)) as PyTorch/mamba_ssm, one global LR",
                 ref="rule-sp")),
    RuleRow(_SP, (Role.A_LOG_HEAD, Role.GATED_NORM),
            Rule(None, ZERO, why="SP: structured (mamba_ssm) init, the global LR", ref="rule-sp")),
    *(RuleRow(_BOTH_MUP, (role,), Rule(_FANIN, _INV_U, why=why, ref="rule-mamba2"), families=_ADAM)
      for role, why in _MAMBA2_HIDDEN_WHY.items()),
    *(RuleRow(_BOTH_MUP, (role,), Rule(_FANIN, ZERO, why=why + "; SGD: LR Θ(1)", ref="rule-mamba2"), families=_SGD)
      for role, why in _MAMBA2_HIDDEN_WHY.items()),
    *(RuleRow(_BOTH_MUP, (role,), Rule(None, lr, why=why, ref="rule-mamba2"), families=fam)
      for role, why0 in _MAMBA2_VECTOR_WHY.items()
      for fam, lr, why in ((_ADAM, ZERO, why0), (_SGD, _U, why0 + _SGD_VEC))),
    RuleRow(_MUP, (Role.IN_PROJ_B, Role.IN_PROJ_C), Rule(_FANIN, _INV_U, why=_MAMBA2_MUP_BC_WHY, ref="rule-mamba2"),
            families=_ADAM),
    RuleRow(_MUP, (Role.IN_PROJ_B, Role.IN_PROJ_C), Rule(_FANIN, ZERO, why=_MAMBA2_MUP_BC_WHY, ref="rule-mamba2"),
            families=_SGD),
    RuleRow(_SSM, (Role.IN_PROJ_B,), Rule(_BC_SPECTRAL, _INV_U, why=_MAMBA2_B_WHY, ref="rule-mamba2"), families=_ADAM),
    RuleRow(_SSM, (Role.IN_PROJ_B,),
            Rule(_BC_SPECTRAL, (-1.0, 1.0), why=_MAMBA2_B_WHY + _MAMBA2_SGD_BC, ref="rule-mamba2"), families=_SGD),
    RuleRow(_SSM, (Role.IN_PROJ_C,), Rule(_BC_SPECTRAL, _INV_U, (0.0, -1.0), why=_MAMBA2_C_WHY, ref="rule-mamba2"),
            families=_ADAM),
    RuleRow(_SSM, (Role.IN_PROJ_C,), Rule(_BC_SPECTRAL, (-1.0, 1.0), (0.0, -1.0), why=_MAMBA2_C_WHY + _MAMBA2_SGD_BC,
                                          ref="rule-mamba2"), families=_SGD),
)  # fmt: skip


def _build(table: tuple[RuleRow, ...]) -> dict[tuple[Scheme, str, Discretization], dict[Role, Rule]]:
    """Index the table: every (scheme, family, disc) must give exactly one rule to every Mamba-1 role and
    to every role that has a rule anywhere (an architecture's roles are added all at once)."""
    out: dict[tuple[Scheme, str, Discretization], dict[Role, Rule]] = {
        (s, f, d): {} for s in Scheme for f in ALL_FAMILIES for d in ALL_DISCS
    }
    for row in table:
        for key in ((s, f, d) for s in row.schemes for f in row.families for d in row.discs):
            for role in row.roles:
                if role in out[key]:
                    raise AssertionError(f"RULE_TABLE gives {role.value} two rules under {key}")
                out[key][role] = row.rule
    covered = {role for rules in out.values() for role in rules}
    for key, rules in out.items():
        missing = [r.value for r in Role if r in covered | ARCH_ROLES[Arch.MAMBA1] and r not in rules]
        if missing:
            raise AssertionError(f"RULE_TABLE has no rule for {missing} under {key}")
        if any(not r.why or not r.ref for r in rules.values()):
            raise AssertionError(f"RULE_TABLE: every rule needs a why and a ref ({key})")
    return out


#: (scheme, optimizer family, discretization) -> role -> rule, indexed from :data:`RULE_TABLE`.
RULES: dict[tuple[Scheme, str, Discretization], dict[Role, Rule]] = _build(RULE_TABLE)

#: Tied embeddings: the LM head reads out through the embedding's tensor (a shared readout).  The shared
#: tensor keeps the EMBEDDING role's init and LR (Θ(1) entries; Adam LR 1, SGD LR r_u); the readout gets the
#: forward multiplier below, 1/r_u under µP, as microsoft/mup's MuSharedReadout divides its input by the
#: width multiplier (docs/width_rules.md, "Tied embeddings: a shared readout").  ``init`` and ``lr`` are
#: unused (the tensor follows the embedding's rule).
TIED_READOUT: dict[Scheme, Rule] = {
    Scheme.SP: Rule(None, ZERO, ZERO, why="SP: a plain tied head, one global LR", ref="rule-tied-readout"),
    **{
        s: Rule(
            None,
            ZERO,
            _INV_U,
            ref="rule-tied-readout",
            why="shared readout: E keeps the embedding's Θ(1) init and LR; logits sum d_model coherent "
            "terms, so the readout multiplier is 1/r_u (microsoft/mup's MuSharedReadout)",
        )
        for s in (Scheme.MUP, Scheme.MUP_SSM)
    },
}

#: Manifest name of a tied model's readout: a row without a tensor of its own (the embedding's is shared);
#: it records the readout's forward multiplier (``init_std`` None, LR and weight decay the embedding's).
TIED_HEAD = "lm_head.weight"

#: Roles that get no weight decay (vector-like and structured roles, and the input embedding).
NO_WEIGHT_DECAY = frozenset(
    {Role.NORM, Role.CONV_BIAS, Role.DT_BIAS, Role.A_LOG, Role.D, Role.EMBEDDING, Role.GATED_NORM, Role.A_LOG_HEAD}
)

#: Adam's epsilon at the base width (PyTorch's default).  Under µP every gradient except the readout's
#: shrinks like 1/N_u, so a fixed epsilon damps the smallest ones at large width (measured at d_model
#: 4096: first-step |g|/(|g|+1e-8) is 0.34 for A_log and 0.30 for dt_proj, vs ~1 at d_model 64).  The
#: µP schemes scale it with the gradients, eps = ADAM_EPS / r_u (docs/width_rules.md#rule-adam-eps).
ADAM_EPS = 1e-8


def rules_for(scheme: Scheme | str, optimizer: OptimizerName | str, disc: Discretization | str) -> dict[Role, Rule]:
    """Role -> rule for a scheme, optimizer and B discretization (raises ConfigError on unknown names)."""
    try:
        key = (Scheme(scheme), OptimizerName(optimizer).family, Discretization(disc))
    except ValueError as err:
        raise ConfigError(f"{err}; schemes: sp, mup, mup-ssm; optimizers: adamw, adam, sgd") from None
    return RULES[key]


def weight_decay_exp(
    rule: Rule, role: Role, scheme: Scheme | str, optimizer: OptimizerName | str, disc: Discretization | str
) -> Exp | None:
    """Exponents of (r_u, r_x) of the optimizer group's weight decay for a role (None: no weight decay).

    docs/width_rules.md#rule-weight-decay.  SP keeps the given value.  AdamW (decoupled) and SGD decay
    by ``lr_group * wd_group`` per step, so ``wd / lr_mult`` (exponent ``-lr``) keeps the per-step decay
    width-independent.  Plain Adam adds ``wd_group * p`` to the gradient before Adam's normalisation, so
    it must keep ``wd_group * |p| / |g|`` width-independent: the parameter's scale is its init std and
    its gradient's scale is the ratio of its Adam and SGD LR rules (both give Θ(1) updates), so the
    exponent is ``lr_adam - lr_sgd - init``.
    """
    if role in NO_WEIGHT_DECAY:
        return None
    scheme, opt = Scheme(scheme), OptimizerName(optimizer)
    if scheme is Scheme.SP:
        return ZERO
    if opt is not OptimizerName.ADAM:
        return (-rule.lr[0], -rule.lr[1])
    adam, sgd = rules_for(scheme, "adam", disc)[role], rules_for(scheme, "sgd", disc)[role]
    if adam.init is None:
        raise AssertionError(f"role {role.value} has a structured init but weight decay; add it to NO_WEIGHT_DECAY")
    return (adam.lr[0] - sgd.lr[0] - adam.init[0], adam.lr[1] - sgd.lr[1] - adam.init[1])


def format_exp(exp: Exp | None, u: str = "N_u", x: str = "N_x") -> str:
    """``(-0.5, 0.5)`` -> ``N_u^-1/2 N_x^1/2``; ``(0, 0)`` -> ``1``; ``None`` -> ``structured``."""
    if exp is None:
        return "structured"
    parts = []
    for name, a in ((u, exp[0]), (x, exp[1])):
        if a == 0:
            continue
        f = Fraction(a).limit_denominator(8)
        parts.append(name if f == 1 else f"{name}^{f}")
    return " ".join(parts) or "1"


# --- the docs table, generated from the data ---------------------------------------------

_BEGIN = "<!-- BEGIN GENERATED width-rules table: python -m mupt.parametrization docs/width_rules.md -->"
_END = "<!-- END GENERATED width-rules table -->"
_SCHEME_TITLE = {
    Scheme.MUP_SSM: "µP-SSM (`mup-ssm`)",
    Scheme.MUP: "µP-heuristic (`mup`): every 2-D weight is a µP hidden matrix",
    Scheme.SP: "Standard (`sp`)",
}


def rules_markdown() -> str:
    """The rules tables of docs/width_rules.md, generated from :data:`RULE_TABLE` (one table per scheme)."""
    lines: list[str] = [
        "Exponents of r_u = N_u/N_u,base and r_x = N_x/N_x,base; 'structured' = structured init, never rescaled.",
        "Weight decay is the optimizer group's value relative to the given one (—: none).",
        "",
    ]
    for scheme in (Scheme.MUP_SSM, Scheme.MUP, Scheme.SP):
        by_disc = any(
            len({(RULES[(scheme, "adam", d)][role], RULES[(scheme, "sgd", d)][role]) for d in ALL_DISCS}) > 1
            for role in RULES[(scheme, "adam", ALL_DISCS[0])]
        )
        head = ["role", *(["B"] if by_disc else []), "init std", "Adam LR", "SGD LR", "fwd",
                "wd AdamW", "wd Adam (L2)", "wd SGD", "why", "derivation"]  # fmt: skip
        lines += [f"#### {_SCHEME_TITLE[scheme]}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for role in Role:
            if role not in RULES[(scheme, "adam", ALL_DISCS[0])]:
                continue
            per_disc = {d: (RULES[(scheme, "adam", d)][role], RULES[(scheme, "sgd", d)][role]) for d in ALL_DISCS}
            for disc, (adam, sgd) in per_disc.items():
                if not by_disc and disc is not ALL_DISCS[0]:
                    continue
                wd = [weight_decay_exp(rule, role, scheme, opt, disc)
                      for rule, opt in ((adam, "adamw"), (adam, "adam"), (sgd, "sgd"))]  # fmt: skip
                if sgd.why.startswith(adam.why):
                    why = sgd.why
                else:
                    why = f"Adam: {adam.why}; SGD: {sgd.why}"
                cells = [
                    f"`{role.value}`",
                    *([disc.value] if by_disc else []),
                    *(format_exp(e, "r_u", "r_x") for e in (adam.init, adam.lr, sgd.lr, adam.fwd)),
                    *("—" if e is None else format_exp(e, "r_u", "r_x") for e in wd),
                    why.replace("|", "\\|"),
                    ", ".join(f"[{r}](#{r})" for r in sorted({adam.ref, sgd.ref})),
                ]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def sync_rules_docs(path: str | Path = DOCS, write: bool = True) -> bool:
    """Put :func:`rules_markdown` between the generated-table markers of ``path``; True when it changed.

    Raises ConfigError when the markers are missing.  ``write=False`` only reports whether it would change.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(_BEGIN) + r"\n.*?" + re.escape(_END), re.DOTALL)
    if not pattern.search(text):
        raise ConfigError(f"{path}: no generated width-rules table markers; add {_BEGIN} ... {_END}")
    new = pattern.sub(lambda _: f"{_BEGIN}\n{rules_markdown()}{_END}", text)
    if new != text and write:
        atomic_write_text(path, new)
    return new != text


# --- shapes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseShape:
    d_model: int
    d_state: int

    @classmethod
    def of(cls, model_cfg: ModelConfig, param: ParamConfig) -> BaseShape:
        return cls(param.base_d_model or model_cfg.d_model, param.base_d_state or model_cfg.d_state)


def _ratio(exp: Exp, r_u: float, r_x: float) -> float:
    return r_u ** exp[0] * r_x ** exp[1]


# --- apply ------------------------------------------------------------------------------


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
    schemes; SGD ignores it); schedules must multiply group LRs (LambdaLR does), never set them
    absolutely.  Weight decay per group follows :func:`weight_decay_exp`: ``wd / lr_mult`` for AdamW
    (decoupled) and SGD, a different power for plain Adam (L2 added to the gradient); roles in
    NO_WEIGHT_DECAY get none.  Init stds are the base shape's default
    (:func:`mupt.model.default_init_std`) times the rule's ratio times ``param.init_scale``.  Tied
    embeddings are a shared readout (:data:`TIED_READOUT`).  ``param.role_lr`` multiplies a role's
    ``lr_mult`` by a constant at every width (a per-role LR study or correction; docs/transfer.md).
    Raises ConfigError for unknown names, a ``role_lr`` role this model lacks, or a d_model whose auto
    dt_rank would not scale.
    """
    cfg = model.cfg
    scheme = Scheme(param.scheme)
    rules = rules_for(scheme, optimizer, model.cfg.discretization)  # validates the names first
    opt = OptimizerName(optimizer)
    base = BaseShape.of(cfg, param)
    if cfg.arch is Arch.MAMBA1:
        for what, width in (("d_model", cfg.d_model), ("base d_model", base.d_model)):
            check_dt_rank_width(f"{what}={width} is", width, scheme, cfg.dt_rank, hint=", or set dt_rank")
    base_cfg = from_dict(
        ModelConfig, {**cfg.model_dump(), "d_model": base.d_model, "d_state": base.d_state}, where="base shape"
    )
    r_u, r_x = cfg.d_inner / base_cfg.d_inner, cfg.d_state / base.d_state
    roles = named_roles(model)
    unruled = sorted({r.value for r in roles.values() if r not in rules})
    check_role_lr(param.role_lr, set(roles.values()), cfg)
    if unruled:
        raise ConfigError(
            f"arch {cfg.arch.value}: no width rules yet for roles {', '.join(unruled)}; use arch mamba1 "
            f"(see {DOCS}, section 6, for adding rules)"
        )
    manifest = Manifest(
        scheme=scheme, optimizer=opt, discretization=cfg.discretization, base_d_model=base.d_model,
        base_d_state=base.d_state, d_model=cfg.d_model, d_state=cfg.d_state,
    )  # fmt: skip
    eps = ADAM_EPS if scheme is Scheme.SP else ADAM_EPS / r_u
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    fwd: dict[Role, float] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            role = roles[name]
            rule = rules[role]
            std: float | None = None
            if rule.init is not None:
                base_std, own_std = default_init_std(role, base_cfg), default_init_std(role, cfg)
                if base_std is None or own_std is None:
                    raise AssertionError(f"role {role.value} has a structured default init but an init rule")
                std = base_std * _ratio(rule.init, r_u, r_x) * param.init_scale
                if reinit:  # from the std the weights have now: a second apply() does not compound
                    p.mul_(std / model.init_stds.get(name, own_std))
                    model.init_stds[name] = std
            lr_mult = _ratio(rule.lr, r_u, r_x) * param.role_lr.get(role, 1.0)
            fwd[role] = _ratio(rule.fwd, r_u, r_x)
            wd_exp = weight_decay_exp(rule, role, scheme, opt, cfg.discretization)
            wd = 0.0 if wd_exp is None else weight_decay * _ratio(wd_exp, r_u, r_x)
            fan_in, fan_out = _fan(p)
            manifest.params[name] = Entry(
                role=role, shape=list(p.shape), fan_in=fan_in, fan_out=fan_out, init_std=std, lr_mult=lr_mult,
                fwd_mult=0.0, weight_decay=wd,
            )  # fmt: skip
            g = groups.setdefault(
                (lr_mult, wd),
                {"params": [], "names": [], "lr": lr * lr_mult, "lr_mult": lr_mult, "weight_decay": wd, "eps": eps},
            )
            g["params"].append(p)
            g["names"].append(name)
    if cfg.tie_embeddings:  # lm_head is the embedding's tensor: a shared readout with its own multiplier
        fwd[Role.LM_HEAD] = _ratio(TIED_READOUT[scheme].fwd, r_u, r_x)
        # its manifest row: no tensor of its own (init and LR are the embedding's), but its own multiplier
        emb = next(e for e in manifest.params.values() if e.role == Role.EMBEDDING.value)
        vocab, width = emb.shape
        manifest.params[TIED_HEAD] = Entry(
            role=Role.LM_HEAD, shape=list(emb.shape), fan_in=width, fan_out=vocab, init_std=None,
            lr_mult=emb.lr_mult, fwd_mult=0.0, weight_decay=emb.weight_decay,
        )  # fmt: skip
    fwd[Role.LM_HEAD] *= param.output_mult
    fwd[Role.EMBEDDING] *= param.embedding_mult
    set_forward_multipliers(model, fwd)
    for entry in manifest.params.values():
        entry.fwd_mult = fwd[Role(entry.role)]
    return Parametrized(list(groups.values()), manifest)


def check_role_lr(role_lr: Mapping[Role, float], present: set[Role], cfg: ModelConfig) -> None:
    """Refuse ``param.role_lr`` keys that name no parameter of this model (a typo would silently change
    nothing): a role of the other arch, or ``lm_head`` when the readout is tied to the embedding (it has
    no tensor of its own; set ``embedding``).  Raises ConfigError naming the role and the valid ones.
    """
    for role in role_lr:
        if role is Role.LM_HEAD and cfg.tie_embeddings:
            raise ConfigError(
                "param.role_lr.lm_head: the readout is tied to the embedding (tie_embeddings) and has no LR of "
                "its own; set param.role_lr.embedding instead"
            )
        if role not in present:
            valid = ", ".join(sorted(r.value for r in present))
            raise ConfigError(
                f"param.role_lr.{role.value}: no {cfg.arch.value} parameter has that role; use one of {valid}"
            )


def set_forward_multipliers(model: MambaLM, fwd: dict[Role, float]) -> None:
    """Put the per-role forward multipliers on the modules (plain floats, no tensor attributes)."""
    model.mult_output = fwd.get(Role.LM_HEAD, 1.0)
    model.backbone.mult_embedding = fwd.get(Role.EMBEDDING, 1.0)
    for layer in model.backbone.layers:
        if isinstance(layer.mixer, Mamba2Mixer):
            for block in layer.mixer.in_proj.BLOCKS:
                layer.mixer.in_proj.mult[block] = fwd.get(Role("in_proj_" + block), 1.0)
            layer.mixer.mult_out = fwd.get(Role.OUT_PROJ, 1.0)
            continue
        m: MambaMixer = layer.mixer  # type: ignore[assignment]
        m.mult_in = fwd.get(Role.IN_PROJ, 1.0)
        m.mult_dt_proj = fwd.get(Role.DT_PROJ, 1.0)
        m.mult_out = fwd.get(Role.OUT_PROJ, 1.0)
        m.x_proj.mult_dt = fwd.get(Role.X_PROJ_DT, 1.0)
        m.x_proj.mult_B = fwd.get(Role.X_PROJ_B, 1.0)
        m.x_proj.mult_C = fwd.get(Role.X_PROJ_C, 1.0)


if __name__ == "__main__":  # regenerate the docs table: python -m mupt.parametrization docs/width_rules.md
    sync_rules_docs(sys.argv[1] if len(sys.argv) > 1 else DOCS)
