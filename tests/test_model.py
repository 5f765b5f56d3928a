from __future__ import annotations

import pytest
import torch

from mupt.config import Arch, ModelConfig
from mupt.errors import CheckpointError
from mupt.model import MambaLM, from_mamba_ssm_state_dict, to_mamba_ssm_state_dict

CONFIGS = [
    ModelConfig(d_model=32, n_layers=2, d_state=8, discretization="zoh"),
    ModelConfig(d_model=32, n_layers=1, d_state=4, discretization="euler", tie_embeddings=True),
    ModelConfig(d_model=48, n_layers=3, d_state=16, dt_rank=5, expand=3, d_conv=3),
    ModelConfig(arch="mamba2", d_model=32, n_layers=2, d_state=8, headdim=16, ngroups=2, chunk_size=8),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["zoh", "euler-tied", "odd-shape", "mamba2"])
def test_forward_backward_all_params_get_finite_grads(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = MambaLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    logits = model(ids)
    assert logits.shape == (2, 19, cfg.vocab_size)
    logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_causal_prefix_does_not_see_future() -> None:
    torch.manual_seed(0)
    model = MambaLM(ModelConfig(d_model=32, n_layers=2, d_state=8)).eval()
    ids = torch.randint(0, 256, (1, 24))
    other = ids.clone()
    other[0, 12:] = (other[0, 12:] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(other)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_parameter_names_follow_mamba_ssm_layout() -> None:
    cfg = ModelConfig(d_model=32, n_layers=2, d_state=8)
    sd = to_mamba_ssm_state_dict(MambaLM(cfg))
    r, n, di = cfg.dt_rank_value, cfg.d_state, cfg.d_inner
    expected = {
        "backbone.embedding.weight": (256, 32),
        "backbone.layers.1.norm.weight": (32,),
        "backbone.layers.1.mixer.in_proj.weight": (2 * di, 32),
        "backbone.layers.1.mixer.conv1d.weight": (di, 1, 4),
        "backbone.layers.1.mixer.conv1d.bias": (di,),
        "backbone.layers.1.mixer.x_proj.weight": (r + 2 * n, di),
        "backbone.layers.1.mixer.dt_proj.weight": (di, r),
        "backbone.layers.1.mixer.dt_proj.bias": (di,),
        "backbone.layers.1.mixer.A_log": (di, n),
        "backbone.layers.1.mixer.D": (di,),
        "backbone.layers.1.mixer.out_proj.weight": (32, di),
        "backbone.norm_f.weight": (32,),
        "lm_head.weight": (256, 32),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("weight_B" in k for k in sd)


def test_state_dict_round_trips_native_and_mamba_ssm() -> None:
    cfg = ModelConfig(d_model=32, n_layers=2, d_state=8)
    torch.manual_seed(0)
    a = MambaLM(cfg).eval()
    torch.manual_seed(1)
    b = MambaLM(cfg).eval()
    c = MambaLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 10))
    b.load_state_dict(a.state_dict())
    c.load_mamba_ssm_state_dict(to_mamba_ssm_state_dict(a))
    with torch.no_grad():
        torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=0)
        torch.testing.assert_close(c(ids), a(ids), rtol=0, atol=0)
    back = from_mamba_ssm_state_dict(to_mamba_ssm_state_dict(a), cfg)
    assert back.keys() == a.state_dict().keys()


def test_mismatched_checkpoint_is_a_clear_error() -> None:
    small = to_mamba_ssm_state_dict(MambaLM(ModelConfig(d_model=32, d_state=8)))
    with pytest.raises(CheckpointError, match="x_proj.weight"):
        MambaLM(ModelConfig(d_model=32, d_state=16)).load_mamba_ssm_state_dict(small)
    with pytest.raises(CheckpointError, match="does not match"):
        MambaLM(ModelConfig(d_model=64, d_state=8, dt_rank=2)).load_mamba_ssm_state_dict(small)


def test_init_follows_mamba() -> None:
    cfg = ModelConfig(d_model=64, n_layers=1, d_state=16)
    torch.manual_seed(0)
    m = MambaLM(cfg).backbone.layers[0].mixer
    A = -torch.exp(m.A_log)
    torch.testing.assert_close(A[0], -torch.arange(1, 17, dtype=torch.float32))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert torch.equal(m.D, torch.ones_like(m.D))


def test_logits_match_transformers_mamba() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(d_model=32, n_layers=2, d_state=8, discretization="euler")
    torch.manual_seed(0)
    ours = MambaLM(cfg).eval()
    hf_cfg = transformers.MambaConfig(
        vocab_size=256, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        time_step_rank=cfg.dt_rank_value, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
    )  # fmt: skip
    hf = transformers.MambaForCausalLM(hf_cfg).eval()
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in to_mamba_ssm_state_dict(ours).items()}
    hf.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 256, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    # and the transformers spelling loads back through the documented mapping
    again = MambaLM(cfg).eval()
    again.load_mamba_ssm_state_dict(hf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)


def test_probe_records_every_layer() -> None:
    cfg = ModelConfig(d_model=32, n_layers=3, d_state=8)
    model = MambaLM(cfg)
    ids = torch.randint(0, 256, (2, 10))
    probe: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        logits = model(ids, probe)
        plain = model(ids)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    for i in range(3):
        assert probe[f"layers.{i}.x"].shape == (2, cfg.d_inner, 8)
        assert probe[f"layers.{i}.y"].shape == (2, cfg.d_inner, 10)
        assert probe[f"layers.{i}.out"].shape == (2, 10, 32)
    assert "logits" in probe


MAMBA2 = ModelConfig(arch="mamba2", d_model=32, n_layers=2, d_state=8, headdim=8, ngroups=2, chunk_size=16)


def test_mamba2_logits_match_transformers_mamba2() -> None:
    """ngroups=2 (each B/C group shared by 4 heads), length 37 not a multiple of chunk_size 16."""
    transformers = pytest.importorskip("transformers")
    cfg = MAMBA2
    torch.manual_seed(0)
    ours = MambaLM(cfg).eval()
    hf_cfg = transformers.Mamba2Config(
        vocab_size=256, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        num_heads=cfg.nheads, head_dim=8, n_groups=2, chunk_size=16, use_bias=False, use_conv_bias=True,
        layer_norm_epsilon=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    hf = transformers.Mamba2ForCausalLM(hf_cfg).eval()
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in to_mamba_ssm_state_dict(ours).items()}
    assert sd["backbone.layers.0.mixer.in_proj.weight"].shape == (2 * 64 + 2 * 2 * 8 + 8, 32)
    assert sd["backbone.layers.0.mixer.conv1d.weight"].shape == (64 + 2 * 2 * 8, 1, 4)
    hf.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 256, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    again = MambaLM(cfg).eval()
    again.load_mamba_ssm_state_dict(hf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)
    # the reference SSD backend gives the same logits
    ref = MambaLM(cfg.model_copy(update={"scan_backend": "reference"})).eval()
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ref(ids), ours(ids), rtol=1e-5, atol=1e-5)


def test_mamba2_init_follows_mamba_ssm() -> None:
    torch.manual_seed(0)
    m = MambaLM(ModelConfig(arch="mamba2", d_model=256, n_layers=1, headdim=16)).backbone.layers[0].mixer
    A = -torch.exp(m.A_log)
    assert A.shape == (32,) and A.min() >= -16 and A.max() <= -1
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert torch.equal(m.D, torch.ones(32)) and torch.equal(m.norm.weight, torch.ones(512))


def test_mamba2_shape_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="divisible by headdim=48"):
        ModelConfig(arch="mamba2", d_model=64, headdim=48)
    with pytest.raises(ValueError, match="divisible by ngroups=3"):
        ModelConfig(arch="mamba2", d_model=64, headdim=32, ngroups=3)
    small = to_mamba_ssm_state_dict(MambaLM(MAMBA2))
    with pytest.raises(CheckpointError, match="in_proj.weight"):
        MambaLM(MAMBA2.model_copy(update={"d_state": 16})).load_mamba_ssm_state_dict(small)


def test_mamba2_probe_records_state_and_ssd_output() -> None:
    model = MambaLM(MAMBA2)
    ids = torch.randint(0, 256, (2, 10))
    probe: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        torch.testing.assert_close(model(ids, probe), model(ids), rtol=1e-5, atol=1e-5)
    for i in range(2):
        assert probe[f"layers.{i}.x"].shape == (2, 64, 8)
        assert probe[f"layers.{i}.y"].shape == (2, 64, 10)


def test_mamba2_every_parameter_has_its_own_role() -> None:
    from mupt.model import ARCH_ROLES, Role, role_of

    assert ARCH_ROLES[Arch.MAMBA1] | ARCH_ROLES[Arch.MAMBA2] == set(Role)
    model = MambaLM(MAMBA2)
    roles = {name: role_of(name, "mamba2") for name, _ in model.named_parameters()}
    assert roles["backbone.layers.1.mixer.in_proj.weight_B"] is Role.IN_PROJ_B
    assert roles["backbone.layers.1.mixer.A_log"] is Role.A_LOG_HEAD
    assert roles["backbone.layers.1.mixer.norm.weight"] is Role.GATED_NORM
    assert roles["backbone.layers.1.norm.weight"] is Role.NORM
    assert set(roles.values()) == {
        Role.EMBEDDING, Role.LM_HEAD, Role.NORM, Role.GATED_NORM, Role.IN_PROJ_Z, Role.IN_PROJ_X, Role.IN_PROJ_B,
        Role.IN_PROJ_C, Role.IN_PROJ_DT, Role.CONV_WEIGHT, Role.CONV_BIAS, Role.DT_BIAS, Role.A_LOG_HEAD, Role.D,
        Role.OUT_PROJ,
    }  # fmt: skip
    with pytest.raises(KeyError, match="x_proj"):
        role_of("backbone.layers.0.mixer.x_proj.weight_B", "mamba2")
