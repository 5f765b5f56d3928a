"""Width rules: role coverage, manifest round-trip, base-width identity, the table's powers at width."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from expected_rules import expected, expected_adam_l2_wd

from mupt.config import Arch, Discretization, ModelConfig, OptimizerName, ParamConfig, Scheme
from mupt.errors import ConfigError
from mupt.model import ARCH_ROLES, SUFFIX_ROLES, MambaLM, Role, role_of
from mupt.parametrization import (
    NO_WEIGHT_DECAY,
    RULE_TABLE,
    TIED_HEAD,
    Manifest,
    apply,
    named_roles,
    rules_for,
    sync_rules_docs,
)

BASE_D, BASE_N = 64, 16


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
    m = model(**kw)
    roles = named_roles(m)
    assert set(roles) == {n for n, _ in m.named_parameters()}
    for name in roles:  # exactly one suffix rule matches (no shadowing, no default)
        hits = [r for s, r in SUFFIX_ROLES if name == s or name.endswith("." + s)]
        assert len(hits) == 1, (name, hits)
    assert set(roles.values()) >= ARCH_ROLES[Arch.MAMBA1] - ({Role.LM_HEAD} if kw.get("tie_embeddings") else set())
    schemes = list(Scheme)  # tied embeddings too: a shared readout under the µP schemes
    for scheme in schemes:
        par = apply(m, ParamConfig(scheme=scheme), "adamw", 1e-3, reinit=False)
        ids = [id(p) for g in par.param_groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in m.parameters())  # each exactly once
        # a tied readout has a manifest row of its own (its multiplier) but no tensor of its own
        tied = {TIED_HEAD: Role.LM_HEAD} if kw.get("tie_embeddings") else {}
        assert set(par.manifest.params) == set(roles) | set(tied)
        for name, entry in par.manifest.params.items():
            assert entry.role == {**roles, **tied}[name]


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


def test_mamba2_apply_covers_every_parameter_and_puts_the_C_multiplier_after_the_silu() -> None:
    """arch mamba2, d_model 64 -> 128 and N_x 16 -> 32 (base -> model): every parameter gets exactly one
    group and the mamba2 role set; C's 1/N_x multiplier sits on the mixer; init stds follow the manifest."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="mamba2", d_model=128, d_state=32, headdim=32, ngroups=2, n_layers=2)
    for scheme, want_c in ((Scheme.MUP_SSM, 0.5), (Scheme.MUP, 1.0), (Scheme.SP, 1.0)):
        m = MambaLM(cfg)
        par = apply(m, ParamConfig(scheme=scheme, base_d_model=64, base_d_state=16), "adamw", 1e-3)
        ids = [id(p) for g in par.param_groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in m.parameters())
        assert {e.role for e in par.manifest.params.values()} == {r.value for r in ARCH_ROLES[Arch.MAMBA2]}
        mixer = m.backbone.layers[1].mixer
        assert mixer.in_proj.mult == {"z": 1.0, "x": 1.0, "B": 1.0, "C": want_c, "dt": 1.0}
        entry = par.manifest.params["backbone.layers.1.mixer.in_proj.weight_C"]
        assert entry.fwd_mult == want_c and entry.shape == [2 * 32, 128]
        w = dict(m.named_parameters())["backbone.layers.1.mixer.in_proj.weight_x"]
        std = par.manifest.params["backbone.layers.1.mixer.in_proj.weight_x"].init_std
        assert std is not None and abs(w.std().item() / std - 1) < 0.05
    # Adam: with N_x fixed the heuristic and µP-SSM tables agree on every mamba2 role
    ssm, mup = rules_for("mup-ssm", "adamw", "zoh"), rules_for("mup", "adamw", "zoh")
    differ = {
        r
        for r in ARCH_ROLES[Arch.MAMBA2]
        if (ssm[r].init, ssm[r].lr, ssm[r].fwd) != (mup[r].init, mup[r].lr, mup[r].fwd)
    }
    # they differ in C's 1/N_x multiplier and in the B/C rows' init (a readout's 1/fan_in with N_x fixed)
    assert differ == {Role.IN_PROJ_B, Role.IN_PROJ_C} and ssm[Role.IN_PROJ_C].fwd == (0.0, -1.0)
    assert ssm[Role.IN_PROJ_C].lr == mup[Role.IN_PROJ_C].lr and ssm[Role.IN_PROJ_B].lr == mup[Role.IN_PROJ_B].lr


@pytest.mark.parametrize("scale_state", [False, True])
def test_mamba2_bc_rows_init_follows_the_spectral_condition(scale_state: bool) -> None:
    """µP-SSM, mamba2: W_B and W_C (fan-out ngroups*N_x, fan-in d_model) are drawn with std sqrt(fan_out)/fan_in
    relative to the base (Yang, Simon & Bernstein 2023, "A Spectral Condition for Feature Learning"; correction 5
    of docs/width_rules.md): d_model 64 -> 512 is 1/8 of the base std with N_x fixed (a readout), and the hidden
    1/sqrt(8) when N_x scales 16 -> 128 too; the x rows (fan-out d_inner) keep 1/sqrt(8) either way.  The stds are
    measured on the drawn weights, and the base's on a base-shaped model drawn by mamba_ssm's default init."""
    torch.manual_seed(0)
    n_x = 128 if scale_state else 16
    wide = MambaLM(ModelConfig(arch="mamba2", d_model=512, d_state=n_x, headdim=32, n_layers=1))
    apply(wide, ParamConfig(scheme=Scheme.MUP_SSM, base_d_model=64, base_d_state=16), "adamw", 1e-3)
    base = MambaLM(ModelConfig(arch="mamba2", d_model=64, d_state=16, headdim=32, n_layers=1))
    apply(base, ParamConfig(scheme=Scheme.MUP_SSM, base_d_model=64, base_d_state=16), "adamw", 1e-3)
    ratio = {}
    for rows in ("B", "C", "x"):
        w, b = (getattr(m.backbone.layers[0].mixer.in_proj, f"weight_{rows}") for m in (wide, base))
        ratio[rows] = float(w.detach().std() / b.detach().std())
    want_bc = 8**-0.5 if scale_state else 1 / 8
    assert ratio["B"] == pytest.approx(want_bc, rel=0.1) and ratio["C"] == pytest.approx(want_bc, rel=0.1), ratio
    assert ratio["x"] == pytest.approx(8**-0.5, rel=0.05), ratio


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
    assert float(head.detach().std()) == pytest.approx(first.manifest.params["lm_head.weight"].init_std, rel=0.05)


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
    assert m.lm_head.weight is m.backbone.embedding.weight
    head = par.manifest.params["lm_head.weight"]  # the readout's row: the embedding's LR, its own multiplier
    assert (head.role, head.init_std, head.fwd_mult) == ("lm_head", None, pytest.approx(3.0 / r_u))
    assert head.lr_mult == entry.lr_mult and head.shape == entry.shape
    assert entry.init_std == pytest.approx(0.02)  # Θ(1): the embedding's rule, not the readout's 1/N_u
    assert entry.lr_mult == pytest.approx(1.0 if optimizer == "adamw" else r_u)
    assert float(m.backbone.embedding.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert m.mult_output == pytest.approx(3.0 / r_u)
    untied = model(d_model=256)
    apply(untied, ParamConfig(scheme=scheme, base_d_model=BASE_D, output_mult=3.0), optimizer, 1e-3)
    assert untied.mult_output == pytest.approx(3.0)  # untied readouts scale their init and LR instead
    sp = model(d_model=256, tie_embeddings=True)
    apply(sp, ParamConfig(scheme=Scheme.SP, base_d_model=BASE_D, output_mult=3.0), optimizer, 1e-3)
    assert sp.mult_output == pytest.approx(3.0)


# --- the rules as data: docs generated from them, weight decay per optimizer --------------------------

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "width_rules.md"


def test_docs_table_is_the_rule_data() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert not sync_rules_docs(DOCS, write=False), (
        "docs/width_rules.md's rules tables differ from RULE_TABLE; run `python -m mupt.parametrization "
        "docs/width_rules.md`"
    )
    # every row of the generated table is in the docs, and carries the exponents the derivation gives
    assert "| `x_proj_B` | r_u^-1/2 r_x^1/2 | r_u^-1 r_x^1/2 | r_u^-1 r_x | 1 | r_u r_x^-1/2 | r_u^1/2 r_x^-1 |" in text
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', text))
    refs = {row.rule.ref for row in RULE_TABLE}
    assert refs <= anchors, refs - anchors  # every rule links to a derivation that exists
    assert {"rule-weight-decay", "rule-adam-eps", "rule-multipliers"} <= anchors


def test_a_docs_table_that_disagrees_is_caught(tmp_path: Path) -> None:
    edited = DOCS.read_text(encoding="utf-8").replace(
        "| `lm_head` | r_u^-1 | r_u^-1 |", "| `lm_head` | r_u^-1/2 | r_u^-1 |", 1
    )
    path = tmp_path / "width_rules.md"
    path.write_text(edited, encoding="utf-8")
    assert sync_rules_docs(path, write=False)
    assert sync_rules_docs(path) and not sync_rules_docs(path, write=False)  # regenerated
    assert path.read_text(encoding="utf-8") == DOCS.read_text(encoding="utf-8")
    path.write_text("# no markers\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="markers"):
        sync_rules_docs(path, write=False)


@pytest.mark.parametrize("scheme", list(Scheme))
def test_plain_adam_and_adamw_get_their_own_weight_decay(scheme: Scheme) -> None:
    r_u, r_x, wd = 4.0, 2.0, 0.1
    param = ParamConfig(scheme=scheme, base_d_model=BASE_D, base_d_state=BASE_N)
    l2 = expected_adam_l2_wd(scheme)
    lr_exps = expected(scheme, "adam", Discretization.ZOH)
    for opt in ("adam", "adamw"):
        m = model(d_model=BASE_D * 4, d_state=BASE_N * 2)
        par = apply(m, param, opt, 1e-2, weight_decay=wd)
        for g in par.param_groups:
            for name in g["names"]:
                role = role_of(name)
                if l2[role] is None:
                    assert g["weight_decay"] == 0.0, name
                elif opt == "adam":  # L2: keeps wd·|p|/|g| width-independent
                    assert g["weight_decay"] == pytest.approx(wd * power(l2[role], r_u, r_x), rel=1e-12), name
                else:  # decoupled: lr_group * wd_group per step is width-independent
                    assert g["weight_decay"] == pytest.approx(wd / power(lr_exps[role][1], r_u, r_x), rel=1e-12), name
    # at the base shape both are the given weight decay
    base = apply(model(), param, "adam", 1e-2, weight_decay=wd).param_groups
    assert {g["weight_decay"] for g in base} <= {0.0, wd}


def _l2_to_gradient_ratio(d_model: int, optimizer: str) -> dict[str, float]:
    """wd_group * RMS(p) / RMS(g) at init, per role of layer 0 and lm_head, mean over 2 seeds."""
    out: dict[str, list[float]] = {}
    for seed in (0, 1):
        m = model(seed=seed, d_model=d_model)
        par = apply(m, ParamConfig(scheme=Scheme.MUP_SSM, base_d_model=BASE_D), optimizer, 1e-2, weight_decay=0.1)
        x = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(seed))
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
        loss.backward()
        for g in par.param_groups:
            for name, p in zip(g["names"], g["params"], strict=True):
                role = role_of(name).value
                if role in ("in_proj", "out_proj", "conv1d_weight", "lm_head") and (
                    "layers.0." in name or role == "lm_head"
                ):
                    rms_p, rms_g = p.detach().pow(2).mean().sqrt(), p.grad.pow(2).mean().sqrt()
                    out.setdefault(role, []).append(g["weight_decay"] * float(rms_p / rms_g))
    return {k: sum(v) / len(v) for k, v in out.items()}


def test_adam_l2_rule_keeps_the_decay_to_gradient_ratio_flat_where_adamw_rule_does_not() -> None:
    """Measured, not computed from the table: the L2 term's size against the real gradient, 64 -> 512."""
    torch.set_num_threads(1)
    slope = {}
    for opt in ("adam", "adamw"):
        narrow, wide = _l2_to_gradient_ratio(64, opt), _l2_to_gradient_ratio(512, opt)
        slope[opt] = {k: math.log2(wide[k] / narrow[k]) / 3 for k in narrow}
    assert all(abs(s) < 0.25 for s in slope["adam"].values()), slope  # flat under plain Adam's rule
    # AdamW's rule (wd / lr_mult) used for L2 would tilt it: +1.5 (hidden), +1 (conv)
    assert slope["adamw"]["in_proj"] > 1.2 and slope["adamw"]["out_proj"] > 1.2, slope
    assert slope["adamw"]["conv1d_weight"] > 0.75, slope


def test_role_lr_scales_exactly_that_roles_lr_at_every_width() -> None:
    """param.role_lr multiplies one role's LR by a constant on top of the width rule (the per-role LR study).

    Expected values come from the independent table (expected_rules) times the factor, at r_u = 4."""
    r_u, r_x = 4.0, 1.0
    factors = {Role.EMBEDDING: 2.0, Role.X_PROJ_B: 0.5, Role.A_LOG: 0.0}
    plain = ParamConfig(scheme=Scheme.MUP_SSM, base_d_model=BASE_D)
    scaled = ParamConfig(scheme=Scheme.MUP_SSM, base_d_model=BASE_D, role_lr=factors)
    table = expected(Scheme.MUP_SSM, "adam", Discretization.ZOH)
    m = model(d_model=BASE_D * 4)
    par = apply(m, scaled, "adamw", 1e-2)
    groups = {id(p): g for g in par.param_groups for p in g["params"]}
    params = dict(m.named_parameters())
    for name, entry in par.manifest.params.items():
        role = Role(entry.role)
        want = power(table[role][1], r_u, r_x) * factors.get(role, 1.0)
        assert entry.lr_mult == pytest.approx(want, rel=1e-12), name
        assert groups[id(params[name])]["lr"] == pytest.approx(1e-2 * want, rel=1e-12), name
    # the inits do not change: only LRs do
    ref = apply(model(d_model=BASE_D * 4), plain, "adamw", 1e-2).manifest
    assert {n: e.init_std for n, e in par.manifest.params.items()} == {n: e.init_std for n, e in ref.params.items()}
    # a factor of 0 freezes the role in real training; the others move
    opt = torch.optim.AdamW(par.param_groups)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for _ in range(2):
        x = torch.randint(0, 256, (2, 16))
        loss = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in m.named_parameters():
        frozen = named_roles(m)[name] is Role.A_LOG
        assert torch.equal(p, before[name]) == frozen, name


def test_role_lr_refuses_roles_the_model_lacks() -> None:
    with pytest.raises(ConfigError, match=r"param.role_lr.in_proj_B: no mamba1 parameter .* use one of .*x_proj_B"):
        apply(model(), ParamConfig(role_lr={Role.IN_PROJ_B: 2.0}), "adamw", 1e-3)
    with pytest.raises(ConfigError, match=r"role_lr.lm_head: the readout is tied .* param.role_lr.embedding"):
        apply(model(tie_embeddings=True), ParamConfig(role_lr={Role.LM_HEAD: 2.0}), "adamw", 1e-3)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        ParamConfig(role_lr={"embedding": -1.0})
    with pytest.raises(ValueError, match="role_lr"):
        ParamConfig(role_lr={"embeddings": 1.0})
