"""The width rules' expected exponents, written out from docs/width_rules.md section 2 (the
derivation) independently of mupt.parametrization's RULE_TABLE, for the tests that check it."""

from __future__ import annotations

from mupt.config import Arch, Discretization, Scheme
from mupt.model import ARCH_ROLES, Role

# Expected exponents (a_u, a_x) of the width ratios, written out from DESIGN.md section 4 /
# docs/width_rules.md independently of mupt.parametrization's tables.  init: std ratio (None =
# structured init, untouched); lr: LR multiplier.
FANIN, INV, ONE, U = (-0.5, 0.0), (-1.0, 0.0), (0.0, 0.0), (1.0, 0.0)
HIDDEN = (Role.IN_PROJ, Role.X_PROJ_DT, Role.DT_PROJ, Role.OUT_PROJ)
STRUCTURED = (Role.NORM, Role.DT_BIAS, Role.D, Role.A_LOG)


def expected(scheme: Scheme, family: str, disc: Discretization) -> dict[Role, tuple[tuple[float, float] | None, tuple]]:
    adam = family == "adam"
    if scheme is Scheme.SP:
        table = {r: (FANIN, ONE) for r in (*HIDDEN, Role.X_PROJ_B, Role.X_PROJ_C, Role.LM_HEAD)}
        table.update({r: (ONE, ONE) for r in (Role.EMBEDDING, Role.CONV_WEIGHT, Role.CONV_BIAS)})
        table.update({r: (None, ONE) for r in STRUCTURED})
        return table
    hidden_lr, vec_lr = (INV, ONE) if adam else (ONE, U)
    table = {r: (FANIN, hidden_lr) for r in (*HIDDEN, Role.X_PROJ_B, Role.X_PROJ_C)}
    table[Role.LM_HEAD] = (INV, INV)
    table[Role.EMBEDDING] = (ONE, vec_lr)
    table.update({r: (ONE, vec_lr) for r in (Role.CONV_WEIGHT, Role.CONV_BIAS)})
    table.update({r: (None, vec_lr) for r in (Role.NORM, Role.DT_BIAS, Role.D)})
    table[Role.A_LOG] = (None, hidden_lr)
    if scheme is Scheme.MUP_SSM:
        table[Role.A_LOG] = (None, ONE if adam else U)
        # var W_B ~ N_x/N_u, var W_C ~ 1/(N_x N_u), for ZOH and Euler (Euler B rows corrected from DESIGN.md)
        table[Role.X_PROJ_B] = ((-0.5, 0.5), (-1.0, 0.5) if adam else (-1.0, 1.0))
        table[Role.X_PROJ_C] = ((-0.5, -0.5), (-1.0, -1.0))  # Adam LR corrected from (-1, -0.5)
    return table


def expected_adam_l2_wd(scheme: Scheme) -> dict[Role, tuple[float, float] | None]:
    """Plain Adam's (L2) weight-decay exponents per decayed role (docs/width_rules.md#rule-weight-decay:
    lr_Adam - lr_SGD - init), worked out by hand; None = no weight decay."""
    none = {r: None for r in (Role.NORM, Role.CONV_BIAS, Role.DT_BIAS, Role.A_LOG, Role.D, Role.EMBEDDING)}
    if scheme is Scheme.SP:
        return {**{r: ONE for r in ARCH_ROLES[Arch.MAMBA1]}, **none}
    table = {r: (-0.5, 0.0) for r in (*HIDDEN, Role.X_PROJ_B, Role.X_PROJ_C)}
    table[Role.LM_HEAD] = U  # -1 - (-1) - (-1)
    table[Role.CONV_WEIGHT] = INV  # 0 - 1 - 0
    if scheme is Scheme.MUP_SSM:
        table[Role.X_PROJ_B] = (0.5, -1.0)  # (-1, 1/2) - (-1, 1) - (-1/2, 1/2)
        table[Role.X_PROJ_C] = (0.5, 0.5)  # (-1, -1) - (-1, -1) - (-1/2, -1/2)
    return {**table, **none}
