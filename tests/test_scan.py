"""The torch selective-scan backend against the reference oracle: values, every gradient, memory."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from mupt.config import ModelConfig
from mupt.errors import ScanError
from mupt.model import MambaLM
from mupt.scan import Backend, resolve_backend, selective_scan
from mupt.scan.reference import selective_scan_reference
from mupt.scan.torch_scan import CHUNK, selective_scan_torch

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(
    batch: int = 2,
    dim: int = 6,
    state: int = 5,
    length: int = 16,
    *,
    a_init: str = "random",
    softplus: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Realistic Mamba-like inputs: A < 0, dt in the softplus regime (about 1e-3 .. 1e-1)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    if a_init == "mamba":  # S4D-real init: A_n = -(n + 1)
        A = -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1)
    else:
        A = -torch.exp(randn(dim, state))
    dt0 = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    if softplus:  # delta is a pre-activation, delta_bias = softplus^-1(dt0) as in Mamba's dt_proj init
        delta = 0.5 * randn(batch, dim, length)
        delta_bias = dt0 + torch.log(-torch.expm1(-dt0))
    else:  # delta is dt itself: keep it positive
        delta = dt0[None, :, None] * torch.exp(0.3 * randn(batch, dim, length))
        delta_bias = 0.01 * torch.rand(dim, generator=g)
    t = {
        "u": randn(batch, dim, length),
        "delta": delta,
        "A": A,
        "B": randn(batch, state, length),
        "C": randn(batch, state, length),
        "D": randn(dim),
        "z": randn(batch, dim, length),
        "delta_bias": delta_bias,
    }
    return {k: v.to(dtype) for k, v in t.items()}


def run(
    fn: Callable[..., tuple[Tensor, Tensor]],
    inputs: dict[str, Tensor],
    use: tuple[str, ...],
    *,
    softplus: bool,
    disc: str,
    loss: str = "both",
    seed: int = 1,
) -> dict[str, Tensor]:
    """Forward + backward with random upstream gradients; returns out, last_state and each grad."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if k in ("u", "delta", "A", "B", "C") + use}
    args = [leaves.get(k) for k in NAMES]
    out, last = fn(*args, delta_softplus=softplus, discretization=disc)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, generator=g).to(out.dtype)
    glast = torch.randn(last.shape, generator=g)
    objective = {
        "both": (out * gout).sum() + (last * glast).sum(),
        "out": (out * gout).sum(),
        "last": (last * glast).sum(),
    }
    objective[loss].backward()
    res = {"out": out.detach(), "last_state": last.detach()}
    for k, v in leaves.items():
        # with loss="last", inputs that only reach `out` (C, D, z) get no gradient from the oracle
        assert v.grad is not None or loss == "last", f"no gradient for {k}"
        res[f"grad_{k}"] = v.grad if v.grad is not None else torch.zeros_like(v)
    return res


def backend_fn(backend: str) -> Callable[..., tuple[Tensor, Tensor]]:
    def fn(*args: Tensor | None, **kw: object) -> tuple[Tensor, Tensor]:
        return selective_scan(*args, backend=backend, **kw)  # type: ignore[arg-type]

    return fn


def assert_matches(actual: dict[str, Tensor], expected: dict[str, Tensor], rtol: float = 1e-4, atol: float = 1e-5):
    assert actual.keys() == expected.keys()
    for k, e in expected.items():
        a = actual[k]
        assert a.dtype == e.dtype and a.shape == e.shape, k
        assert torch.isfinite(a).all(), k
        # absolute tolerance relative to the tensor's scale (sums over many fp32 terms)
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale, msg=lambda m, k=k: f"{k}: {m}")


OPTIONS = {
    "bare": ((), False),
    "full": (("D", "z", "delta_bias"), True),
    "D-softplus": (("D",), True),
    "z-bias": (("z", "delta_bias"), False),
}


@pytest.mark.parametrize("disc", ["euler", "zoh"])
@pytest.mark.parametrize("length", [1, 7, 64, 100])
@pytest.mark.parametrize("opts", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("a_init", ["random", "mamba"])
def test_torch_matches_reference(disc: str, length: int, opts: str, a_init: str) -> None:
    use, softplus = OPTIONS[opts]
    inputs = make_inputs(length=length, a_init=a_init, softplus=softplus, seed=length)
    ref = run(backend_fn("reference"), inputs, use, softplus=softplus, disc=disc)
    got = run(backend_fn("torch"), inputs, use, softplus=softplus, disc=disc)
    assert_matches(got, ref)


@pytest.mark.parametrize("disc", ["euler", "zoh"])
@pytest.mark.parametrize(("length", "chunk"), [(23, 4), (24, 4), (5, 1), (9, 64)])
def test_many_chunks_and_remainders(disc: str, length: int, chunk: int) -> None:
    """Small chunks: many checkpoints, a partial last chunk, chunk of one step, chunk longer than L."""
    use, softplus = OPTIONS["full"]
    inputs = make_inputs(batch=3, dim=4, state=3, length=length, seed=7)
    ref = run(selective_scan_reference, inputs, use, softplus=softplus, disc=disc)

    def fn(*args: Tensor | None, **kw: object) -> tuple[Tensor, Tensor]:
        return selective_scan_torch(*args, chunk=chunk, **kw)  # type: ignore[arg-type]

    assert_matches(run(fn, inputs, use, softplus=softplus, disc=disc), ref)


@pytest.mark.parametrize("disc", ["euler", "zoh"])
def test_reduction_path_used_off_cpu(disc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off CPU the thin contractions are sums, not (b)mm (TF32); exercise that path here."""
    import mupt.scan.torch_scan as torch_scan

    monkeypatch.setattr(torch_scan, "_use_blas", lambda device: False)
    use, softplus = OPTIONS["full"]
    inputs = make_inputs(length=50, seed=8)
    ref = run(backend_fn("reference"), inputs, use, softplus=softplus, disc=disc)
    assert_matches(run(backend_fn("torch"), inputs, use, softplus=softplus, disc=disc), ref)


@pytest.mark.parametrize("loss", ["out", "last"])
@pytest.mark.parametrize("disc", ["euler", "zoh"])
def test_gradient_of_only_one_output(loss: str, disc: str) -> None:
    """last_state alone is differentiable (its gradient seeds the reverse recurrence), and out alone."""
    use, softplus = OPTIONS["full"]
    inputs = make_inputs(batch=1, length=70, seed=3)
    ref = run(backend_fn("reference"), inputs, use, softplus=softplus, disc=disc, loss=loss)
    got = run(backend_fn("torch"), inputs, use, softplus=softplus, disc=disc, loss=loss)
    if loss == "last":  # C, D and z do not reach last_state
        for k in ("grad_C", "grad_z", "grad_D"):
            assert ref[k].abs().max() == 0
    assert_matches(got, ref)


@pytest.mark.parametrize("disc", ["euler", "zoh"])
def test_float64_inputs(disc: str) -> None:
    """float64 in: out float64 (computed in fp32), last_state fp32, float64 grads; same as the oracle."""
    use, softplus = OPTIONS["full"]
    inputs = make_inputs(length=40, dtype=torch.float64, seed=5)
    ref = run(backend_fn("reference"), inputs, use, softplus=softplus, disc=disc)
    got = run(backend_fn("torch"), inputs, use, softplus=softplus, disc=disc)
    assert got["out"].dtype == torch.float64 and got["last_state"].dtype == torch.float32
    assert got["grad_u"].dtype == torch.float64 and got["grad_A"].dtype == torch.float64
    assert_matches(got, ref)


def test_bf16_input_gives_bf16_output_close_to_fp32() -> None:
    inputs = make_inputs(batch=2, dim=8, state=4, length=50, seed=11)
    bf = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    out_bf, last_bf = selective_scan(**bf, delta_softplus=True, discretization="zoh", backend="torch")
    # the fp32 run on the same (bf16-rounded) values
    out32, last32 = selective_scan(
        **{k: v.float() for k, v in bf.items()}, delta_softplus=True, discretization="zoh", backend="torch"
    )
    assert out_bf.dtype == torch.bfloat16 and last_bf.dtype == torch.float32
    torch.testing.assert_close(out_bf.float(), out32, rtol=1e-2, atol=1e-2 * out32.abs().max().item())
    torch.testing.assert_close(last_bf, last32)
    ref_bf, _ = selective_scan(**bf, delta_softplus=True, discretization="zoh", backend="reference")
    torch.testing.assert_close(out_bf, ref_bf, rtol=1e-2, atol=1e-2)


def test_no_grad_and_inference_mode() -> None:
    inputs = make_inputs(length=33, seed=2)
    ref = selective_scan(**inputs, delta_softplus=True, backend="reference")
    with torch.no_grad():
        a = selective_scan(**inputs, delta_softplus=True, backend="torch")
    with torch.inference_mode():
        b = selective_scan(**inputs, delta_softplus=True, backend="torch")
    for got in (a, b):
        for x, y in zip(got, ref, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_non_contiguous_inputs_as_the_model_passes_them() -> None:
    """delta, z, B, C arrive as transposes of (batch, length, c) activations."""
    inputs = make_inputs(batch=2, dim=6, state=5, length=45, seed=4)
    for k in ("delta", "z", "B", "C"):
        inputs[k] = inputs[k].transpose(1, 2).contiguous().transpose(1, 2)
    use, softplus = OPTIONS["full"]
    ref = run(backend_fn("reference"), inputs, use, softplus=softplus, disc="zoh")
    got = run(backend_fn("torch"), inputs, use, softplus=softplus, disc="zoh")
    assert_matches(got, ref)


def test_model_gradients_match_reference_backend() -> None:
    grads = {}
    for backend in ("reference", "torch"):
        torch.manual_seed(0)
        model = MambaLM(ModelConfig(d_model=16, n_layers=2, d_state=8, scan_backend=backend))
        ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))
        model(ids).logsumexp(-1).mean().backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["torch"].keys() == grads["reference"].keys()
    for n, g in grads["reference"].items():
        torch.testing.assert_close(grads["torch"][n], g, rtol=1e-4, atol=1e-5 * max(1.0, g.abs().max().item()))


# ---------------------------------------------------------------- dispatch and errors


def test_auto_resolves_to_torch_on_cpu() -> None:
    assert resolve_backend("auto", torch.device("cpu")) is Backend.TORCH
    inputs = make_inputs(length=9)
    a = selective_scan(**inputs, backend="auto")
    b = selective_scan_torch(**inputs)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_unknown_backend_raises_scan_error() -> None:
    with pytest.raises(ScanError, match="unknown scan backend 'cuda-magic'"):
        selective_scan(**make_inputs(length=4), backend="cuda-magic")


@pytest.mark.parametrize(
    "bad",
    [
        {"u": torch.randn(2, 6)},  # not 3-d
        {"delta": torch.randn(2, 6, 5)},  # delta shape != u shape
        {"A": torch.randn(7, 5)},  # wrong dim
        {"A": torch.randn(6)},  # not 2-d
        {"B": torch.randn(2, 4, 4)},  # wrong state
        {"C": torch.randn(1, 5, 4)},  # wrong batch
    ],
    ids=["u-2d", "delta", "A-dim", "A-1d", "B-state", "C-batch"],
)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_bad_shapes_raise_scan_error(bad: dict[str, Tensor], backend: str) -> None:
    inputs = make_inputs(length=4)
    inputs.update(bad)
    with pytest.raises(ScanError):
        selective_scan(**inputs, backend=backend)


def test_bad_chunk_raises_scan_error() -> None:
    with pytest.raises(ScanError, match="chunk"):
        selective_scan_torch(**make_inputs(length=4), chunk=0)


# ---------------------------------------------------------------- memory


def saved_bytes(backend: str, inputs: dict[str, Tensor], use: tuple[str, ...], softplus: bool, backward: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if k in ("u", "delta", "A", "B", "C") + use}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, last = selective_scan(
            *[leaves.get(k) for k in NAMES], delta_softplus=softplus, discretization="zoh", backend=backend
        )
    if backward:  # the graph is usable
        (out.sum() + last.sum()).backward()
    return sum(storages.values())


@pytest.mark.parametrize("opts", ["bare", "full"])
def test_saved_memory_does_not_scale_with_state_times_length(opts: str) -> None:
    batch, dim, state, length = 1, 64, 16, 512
    per_step_states = batch * dim * length * state * 4  # one fp32 state per step: what a naive scan keeps
    use, softplus = OPTIONS[opts]
    inputs = make_inputs(batch=batch, dim=dim, state=state, length=length, seed=9)
    torch_bytes = saved_bytes("torch", inputs, use, softplus, backward=True)
    if opts == "bare":  # the oracle keeps several (batch, dim, state) tensors per step: the bounds catch that
        assert saved_bytes("reference", inputs, use, softplus, backward=False) > per_step_states
    # inputs (O(b*d*L)) + one state every CHUNK steps; D / z / softplus add a few (b, d, L) tensors
    assert CHUNK >= 16
    limit = per_step_states // 4 if opts == "bare" else per_step_states // 2
    assert torch_bytes < limit, (torch_bytes, per_step_states)
