"""Width rules: role coverage, manifest round-trip, base-width identity, the table's powers at width."""

from __future__ import annotations

import math

import pytest
import torch

from mupt.config import Arch, Discretization, ModelConfig, OptimizerName, ParamConfig, Scheme
from mupt.errors import ConfigError
from mupt.model import ARCH_ROLES, MambaLM, Role, role_of
from mupt.parametrization import NO_WEIGHT_DECAY, Manifest, apply, named_roles, rules_for

BASE_D, BASE_N = 64, 16

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


def model(seed: int = 0, **kw: object) -> MambaLM:
    cfg = ModelConfig(**{"d_model": BASE_D, "d_state": BASE_N, "n_layers": 2, **kw})
    torch.manual_seed(seed)
    return MambaLM(cfg)


def power(exp: tuple[float, float], r_u: float, r_x: float) -> float:
    return r_u ** exp[0] * r_x ** exp[1]


CONFIGS = [
    dict(),
    dict(tie_embeddings=True),
    dict(discretization=Discretization.EULER, dt_rank=3),
    dict(d_model=32, d_state=4, dt_rank=7, n_layers=3),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_every_parameter_gets_exactly_one_role_and_one_group(kw: dict) -> None:
    from mupt import model as model_mod

    m = model(**kw)
    roles = named_roles(m)
    assert set(roles) == {n for n, _ in m.named_parameters()}
    for name in roles:  # exactly one suffix rule matches (no shadowing, no default)
        hits = [r for s, r in model_mod._SUFFIX_ROLES if name == s or name.endswith("." + s)]
        assert len(hits) == 1, (name, hits)
    assert set(roles.values()) >= ARCH_ROLES[Arch.MAMBA1] - ({Role.LM_HEAD} if kw.get("tie_embeddings") else set())
    schemes = list(Scheme)  # tied embeddings too: a shared readout under the µP schemes
    for scheme in schemes:
        par = apply(m, ParamConfig(scheme=scheme), "adamw", 1e-3, reinit=False)
        ids = [id(p) for g in par.param_groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in m.parameters())  # each exactly once
        assert set(par.manifest.params) == set(roles)
        for name, entry in par.manifest.params.items():
            assert entry.role == roles[name].value


def test_unknown_parameter_has_no_role() -> None:
    with pytest.raises(KeyError):
        role_of("backbone.layers.0.mixer.extra.weight")
    m = model()
    m.register_parameter("stray", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ConfigError, match="stray"):
        named_roles(m)


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_manifest_round_trips(tmp_path, suffix: str) -> None:
    m = model(d_model=128, d_state=32)
    par = apply(m, ParamConfig(scheme=Scheme.MUP_SSM, base_d_model=BASE_D, base_d_state=BASE_N), "adamw", 1e-3, 0.1)
    path = tmp_path / f"manifest.{suffix}"
    par.manifest.save(path)
    loaded = Manifest.load(path)
    assert loaded == par.manifest
    assert loaded.params["backbone.layers.1.mixer.x_proj.weight_B"].lr_mult == pytest.approx(2**-1 * 2**0.5)


def test_malformed_manifest_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "m.json"
    path.write_text('{"scheme": "sp"}')
    with pytest.raises(ConfigError, match="malformed"):
        Manifest.load(path)


@pytest.mark.parametrize("scheme", list(Scheme))
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("disc", list(Discretization))
def test_rules_at_base_width_are_the_unscaled_model(scheme: Scheme, optimizer: str, disc: Discretization) -> None:
    default = model(seed=3, discretization=disc)
    m = model(seed=3, discretization=disc)
    par = apply(m, ParamConfig(scheme=scheme), optimizer, 1e-3)
    for (name, a), (_, b) in zip(default.state_dict().items(), m.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # bitwise
    assert all(g["lr_mult"] == 1.0 and g["lr"] == 1e-3 for g in par.param_groups)
    assert all(e.lr_mult == 1.0 and e.fwd_mult == 1.0 for e in par.manifest.params.values())
    mixer = m.backbone.layers[0].mixer
    assert (m.mult_output, mixer.mult_in, mixer.mult_out, mixer.x_proj.mult_B, mixer.x_proj.mult_C) == (1.0,) * 5


@pytest.mark.parametrize("scheme", list(Scheme))
@pytest.mark.parametrize("optimizer", [OptimizerName.ADAMW, OptimizerName.SGD])
@pytest.mark.parametrize("disc", list(Discretization))
def test_lr_and_init_at_width_ratio_4_follow_the_table(scheme: Scheme, optimizer: OptimizerName, disc) -> None:
    r_u, r_x = 4.0, 2.0
    param = ParamConfig(scheme=scheme, base_d_model=BASE_D, base_d_state=BASE_N)
    base = apply(model(discretization=disc), param, optimizer, 1e-2).manifest
    m = model(d_model=BASE_D * 4, d_state=BASE_N * 2, discretization=disc)
    default = model(d_model=BASE_D * 4, d_state=BASE_N * 2, discretization=disc)
    par = apply(m, param, optimizer, 1e-2)
    table = expected(scheme, optimizer.family, disc)
    groups = {id(p): g for g in par.param_groups for p in g["params"]}
    params = dict(m.named_parameters())
    # Adam's epsilon follows the gradients (∝ 1/N_u) under µP; SP keeps PyTorch's default
    assert {g["eps"] for g in par.param_groups} == {1e-8 if scheme is Scheme.SP else 1e-8 / r_u}
    assert all(g["eps"] == 1e-8 for g in apply(model(discretization=disc), param, optimizer, 1e-2).param_groups)
    for name, entry in par.manifest.params.items():
        role = Role(entry.role)
        init, lr = table[role]
        assert entry.lr_mult == pytest.approx(power(lr, r_u, r_x), rel=1e-12), name
        assert groups[id(params[name])]["lr"] == pytest.approx(1e-2 * power(lr, r_u, r_x), rel=1e-12), name
        if init is None:
            assert entry.init_std is None
            assert torch.equal(params[name], default.state_dict()[name]), name  # structured: untouched
            continue
        assert entry.init_std / base.params[name].init_std == pytest.approx(power(init, r_u, r_x), rel=1e-9), name
        if params[name].numel() >= 2000:  # the tensor really has that std (uniform init)
            assert float(params[name].detach().std()) == pytest.approx(entry.init_std, rel=0.1), name


def test_decoupled_weight_decay_groups() -> None:
    m = model(d_model=256, d_state=16)
    lr, wd = 1e-2, 0.1
    par = apply(m, ParamConfig(scheme=Scheme.MUP_SSM, base_d_model=BASE_D), "adamw", lr, weight_decay=wd)
    roles = named_roles(m)
    seen = set()
    for g in par.param_groups:
        group_roles = {roles[n] for n in g["names"]}
        if group_roles & NO_WEIGHT_DECAY:
            assert group_roles <= NO_WEIGHT_DECAY and g["weight_decay"] == 0.0
        else:
            # PyTorch AdamW decays by lr_group * wd_group per step: width-independent
            assert g["lr"] * g["weight_decay"] == pytest.approx(lr * wd)
            seen.add(g["lr_mult"])
    assert len(seen) >= 2  # hidden (1/4) and others differ, so groups are really split
    opt = torch.optim.AdamW(par.param_groups, lr=lr)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


def test_forward_multipliers_include_tunable_output_and_embedding_mults() -> None:
    m = model(d_model=128)
    param = ParamConfig(scheme=Scheme.MUP_SSM, base_d_model=BASE_D, output_mult=2.0, embedding_mult=3.0)
    par = apply(m, param, "adamw", 1e-3)
    assert m.mult_output == 2.0 and m.backbone.mult_embedding == 3.0
    assert par.manifest.params["lm_head.weight"].fwd_mult == 2.0


def test_bad_inputs_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="d_model=72 is not a multiple of 16"):
        apply(model(d_model=72), ParamConfig(scheme=Scheme.MUP_SSM, base_d_model=BASE_D), "adamw", 1e-3)
    with pytest.raises(ConfigError, match="base d_model=40"):
        apply(model(), ParamConfig(scheme=Scheme.MUP_SSM, base_d_model=40), "adamw", 1e-3)
    with pytest.raises(ConfigError, match="lion"):
        rules_for("mup-ssm", "lion", "zoh")
    # an explicit dt_rank lifts the multiple-of-16 requirement
    apply(model(d_model=72, dt_rank=4), ParamConfig(scheme=Scheme.MUP_SSM, base_d_model=BASE_D), "adamw", 1e-3)


def test_reinit_false_keeps_trained_weights() -> None:
    m = model(d_model=256)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    apply(m, ParamConfig(scheme=Scheme.MUP_SSM, base_d_model=BASE_D), "adamw", 1e-3, reinit=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert math.isclose(m.mult_output, 1.0)


@pytest.mark.parametrize("scheme", [Scheme.MUP, Scheme.MUP_SSM, Scheme.SP])
def test_apply_twice_keeps_the_stds_and_the_manifest(scheme: Scheme) -> None:
    """A second apply() on the same model must not compound the init rescaling (it used to halve lm_head)."""
    m = model(d_model=256)
    param = ParamConfig(scheme=scheme, base_d_model=BASE_D)
    first = apply(m, param, "adamw", 1e-3)
    weights = {n: p.detach().clone() for n, p in m.named_parameters()}
    second = apply(m, param, "adamw", 1e-3)
    for name, p in m.named_parameters():
        assert torch.equal(p, weights[name]), name
    assert second.manifest.to_dict() == first.manifest.to_dict()
    head = m.lm_head.weight
    assert float(head.std()) == pytest.approx(first.manifest.params["lm_head.weight"].init_std, rel=0.05)


def test_apply_with_another_scheme_starts_from_the_default_init() -> None:
    """apply(mup) then apply(sp) gives the sp stds, as apply(sp) on a fresh model does."""
    a, b = model(seed=3, d_model=256), model(seed=3, d_model=256)
    apply(a, ParamConfig(scheme=Scheme.MUP, base_d_model=BASE_D), "adamw", 1e-3)
    apply(a, ParamConfig(scheme=Scheme.SP, base_d_model=BASE_D), "adamw", 1e-3)
    apply(b, ParamConfig(scheme=Scheme.SP, base_d_model=BASE_D), "adamw", 1e-3)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("scheme", [Scheme.MUP, Scheme.MUP_SSM])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_tied_embeddings_are_a_shared_readout(scheme: Scheme, optimizer: str) -> None:
    """Tied under µP: the shared tensor keeps the embedding's init and LR; the readout multiplier is
    output_mult / r_u (docs/width_rules.md, microsoft/mup's MuSharedReadout)."""
    m = model(d_model=256, tie_embeddings=True)
    par = apply(m, ParamConfig(scheme=scheme, base_d_model=BASE_D, output_mult=3.0), optimizer, 1e-3)
    r_u = 256 / BASE_D
    entry = par.manifest.params["backbone.embedding.weight"]
    assert "lm_head.weight" not in par.manifest.params and m.lm_head.weight is m.backbone.embedding.weight
    assert entry.init_std == pytest.approx(0.02)  # Θ(1): the embedding's rule, not the readout's 1/N_u
    assert entry.lr_mult == pytest.approx(1.0 if optimizer == "adamw" else r_u)
    assert float(m.backbone.embedding.weight.std()) == pytest.approx(0.02, rel=0.05)
    assert m.mult_output == pytest.approx(3.0 / r_u)
    untied = model(d_model=256)
    apply(untied, ParamConfig(scheme=scheme, base_d_model=BASE_D, output_mult=3.0), optimizer, 1e-3)
    assert untied.mult_output == pytest.approx(3.0)  # untied readouts scale their init and LR instead
    sp = model(d_model=256, tie_embeddings=True)
    apply(sp, ParamConfig(scheme=Scheme.SP, base_d_model=BASE_D, output_mult=3.0), optimizer, 1e-3)
    assert sp.mult_output == pytest.approx(3.0)
