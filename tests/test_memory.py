"""mupt.memory: the one memory model, checked against a real forward pass and a hand count."""

from __future__ import annotations

import pytest
import torch

from mupt.config import RunConfig, with_overrides
from mupt.memory import activation_bytes_per_token, memory_estimate
from mupt.model import MambaLM
from mupt.train import build_model, build_optimizer, lm_loss


def cfg(**overrides: object) -> RunConfig:
    base = {"model.d_model": 64, "model.d_state": 16, "model.n_layers": 2, "model.scan_backend": "torch",
            "train.seq_len": 128, "train.batch_size": 2}  # fmt: skip
    return with_overrides(RunConfig(), {**base, **overrides})


def measured_bytes_per_token(c: RunConfig) -> float:
    """Real CPU forward + loss: bytes of every distinct non-parameter storage autograd saves."""
    torch.manual_seed(0)
    model = MambaLM(c.model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # keeps every saved storage alive, so no address is reused mid-forward

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
            alive.append(t)
        return t

    b, n = c.train.batch_size, c.train.seq_len
    ids = torch.randint(0, c.model.vocab_size, (b, n))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(model(ids), ids)
    return sum(seen.values()) / (b * n)


def hand_count_floats_per_token(c: RunConfig) -> float:
    """The Mamba-1 / torch-scan count derived in mupt/memory.py's docstring, written out independently."""
    m, n = c.model, c.train.seq_len
    d, di, ds, r = m.d_model, m.d_inner, m.d_state, m.dt_rank_value
    per_layer = 3 * d + 1 + 12 * di + di * (m.d_conv - 1) / n + r + 2 * ds + di * ds / 32
    per_layer += 2 * di * ds / (c.train.batch_size * n)  # exp(A_log) and -exp(...): per layer, not per token
    return m.n_layers * per_layer + 2 + 3 * d + 1 + m.vocab_size


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"model.d_model": 128},
        {"model.d_state": 32, "model.n_layers": 3},
        {"model.arch": "mamba2", "model.headdim": 16},
        {"train.seq_len": 96},
    ],
    ids=["base", "wider", "state-deeper", "mamba2", "seq96"],
)
def test_activation_model_matches_a_real_forward_pass(overrides: dict[str, object]) -> None:
    c = cfg(**overrides)
    traced = activation_bytes_per_token(c.model, c.train.seq_len, c.train.batch_size)
    assert traced == pytest.approx(measured_bytes_per_token(c), rel=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"model.d_model": 128}, {"model.d_state": 32, "model.n_layers": 3}])
def test_mamba1_measurement_equals_the_hand_count(overrides: dict[str, object]) -> None:
    c = cfg(**overrides)
    assert measured_bytes_per_token(c) == pytest.approx(4 * hand_count_floats_per_token(c), rel=1e-6)


@pytest.mark.parametrize(
    ("optimizer", "momentum", "values"), [("adamw", 0.9, 2), ("adam", 0.9, 2), ("sgd", 0.9, 1), ("sgd", 0.0, 0)]
)
def test_optimizer_state_matches_what_torch_allocates(optimizer: str, momentum: float, values: int) -> None:
    c = cfg(**{"train.optimizer": optimizer, "train.momentum": momentum, "model.d_model": 32})
    model, par = build_model(c)
    opt = build_optimizer(par.param_groups, c.train)
    x = torch.randint(0, 256, (2, 16))
    lm_loss(model(x), x).backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)  # fmt: skip
    mem = memory_estimate(c)
    params = sum(p.numel() for p in model.parameters())
    assert (mem.params, mem.weights, mem.grads) == (params, 4 * params, 4 * params)
    assert mem.optimizer == state == 4 * values * params
