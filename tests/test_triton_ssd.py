"""Triton SSD (Mamba-2) vs the sequential reference SSD: outputs and every gradient.

On CPU the kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` is set here, before
``mupt.scan.triton_ssd`` is imported (``@triton.jit`` reads it when it decorates; nothing else in
the package imports that module on CPU).  Tiny shapes keep it fast; the GPU-only tests at the
bottom cover long sequences and bf16.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed; the triton SSD backend cannot run")

from mupt.errors import ScanError  # noqa: E402
from mupt.scan import ssd_scan  # noqa: E402
from mupt.scan import triton_ssd as tssd  # noqa: E402
from mupt.scan.ssd_reference import ssd_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _usable() -> None:
    assert CUDA or tssd._INTERPRET, (
        "mupt.scan.triton_ssd was imported before TRITON_INTERPRET=1 was set; on CPU it must be imported "
        "after this test module sets it"
    )


def make_inputs(
    batch: int = 2,
    length: int = 37,
    nheads: int = 4,
    headdim: int = 3,
    ngroups: int = 2,
    d_state: int = 5,
    *,
    D: bool = True,
    h0: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Tensor | None]:
    """Mamba-2-like inputs: dt = softplus(.) around 0.05..1, A in [-8, -0.5]; activations in ``dtype``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    act = {
        "x": r(batch, length, nheads, headdim),
        "dt": F.softplus(r(batch, length, nheads) - 1.0),
        "B": r(batch, length, ngroups, d_state),
        "C": r(batch, length, ngroups, d_state),
    }
    out: dict[str, Tensor | None] = {k: v.to(DEVICE, dtype) for k, v in act.items()}
    out["dt"] = act["dt"].to(DEVICE)  # the model passes dt in fp32
    out["A"] = (-(0.5 + 7.5 * torch.rand(nheads, generator=g))).to(DEVICE)
    out["D"] = r(nheads).to(DEVICE) if D else None
    out["initial_state"] = r(batch, nheads, headdim, d_state).to(DEVICE) if h0 else None
    return out


def reference(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The sequential oracle on CPU (it computes in fp32) in float64 tensors, with the D skip added by hand."""
    y, h = ssd_reference(
        x.double().cpu(), dt.double().cpu(), A.double().cpu(), B.double().cpu(), C.double().cpu(),
        None if initial_state is None else initial_state.double().cpu(),
    )  # fmt: skip
    if D is not None:
        y = y + x.double().cpu() * D.double().cpu()[:, None]
    return y.double(), h.double()


def run(fn, inputs: dict[str, Tensor | None], seed: int = 1) -> tuple[Tensor, Tensor, dict[str, Tensor | None]]:  # type: ignore[no-untyped-def]
    """Forward + one backward of y·gy + last_state·gh; returns (y, last_state, grads) on CPU in float64."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y, h = fn(**leaves)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64)
    loss = (y.double().cpu() * gy).sum() + (h.double().cpu() * gh).sum()
    present = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in present])  # type: ignore[misc, arg-type]
    by_name: dict[str, Tensor | None] = {k: None for k in leaves}
    by_name.update({k: gr.double().cpu() for k, gr in zip(present, grads, strict=True)})
    return y.detach().double().cpu(), h.detach().double().cpu(), by_name


def assert_close(name: str, actual: Tensor, expected: Tensor, rtol: float, atol: float) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


def compare(inputs: dict[str, Tensor | None], chunk_size: int, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    y, h, grads = run(lambda **kw: tssd.ssd_triton(**kw, chunk_size=chunk_size), inputs)
    r_y, r_h, r_grads = run(reference, inputs)
    assert_close("y", y, r_y, rtol, atol)
    assert_close("last_state", h, r_h, rtol, atol)
    for name in NAMES:
        assert (grads[name] is None) == (r_grads[name] is None), name
        if grads[name] is not None:
            assert torch.isfinite(grads[name]).all(), name  # type: ignore[arg-type]
            assert_close(f"d{name}", grads[name], r_grads[name], rtol, atol)  # type: ignore[arg-type]


# --- CPU (interpreter) and GPU: tiny shapes vs the reference -------------------------------------

# (length, chunk_size, ngroups, D, initial_state): odd lengths, not multiples of the 16-step chunk
CASES = [
    (37, 16, 1, True, True),  # three chunks, the last one padded
    (37, 16, 2, True, False),
    (5, 16, 2, False, True),  # a single partial chunk
    (16, 16, 1, False, False),  # exactly one chunk
    (33, 8, 2, True, True),  # chunk_size 8 runs as the kernels' 16 (speed knob, not the math)
]


@pytest.mark.parametrize(("length", "chunk", "ngroups", "D", "h0"), CASES)
def test_matches_reference_values_and_all_gradients(length: int, chunk: int, ngroups: int, D: bool, h0: bool) -> None:
    inputs = make_inputs(length=length, ngroups=ngroups, D=D, h0=h0, seed=length + ngroups)
    compare(inputs, chunk)


def test_headdim_and_state_wider_than_one_tile_side() -> None:
    # headdim 20 and d_state 17 pad to 32-wide tiles; 4 heads share one group
    inputs = make_inputs(batch=1, length=21, nheads=4, headdim=20, ngroups=1, d_state=17, seed=3)
    compare(inputs, 16)


def test_backward_is_deterministic() -> None:
    inputs = make_inputs(length=40, seed=7)
    first = run(lambda **kw: tssd.ssd_triton(**kw, chunk_size=16), inputs)
    second = run(lambda **kw: tssd.ssd_triton(**kw, chunk_size=16), inputs)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in NAMES:
        assert torch.equal(first[2][name], second[2][name]), f"d{name} differs between two identical runs"  # type: ignore[arg-type]


def test_only_the_output_used_and_no_grad_forward() -> None:
    inputs = make_inputs(length=19, D=True, h0=False, seed=11)
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    ref_leaves = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    tssd.ssd_triton(**leaves, chunk_size=16)[0].sum().backward()  # type: ignore[arg-type]
    y_ref, _ = ssd_reference(*(ref_leaves[k] for k in ("x", "dt", "A", "B", "C")))  # type: ignore[misc, arg-type]
    (y_ref + ref_leaves["x"] * ref_leaves["D"][:, None]).sum().backward()  # type: ignore[index, operator]
    for name in ("x", "dt", "A", "B", "C", "D"):
        assert_close(f"d{name}", leaves[name].grad.double(), ref_leaves[name].grad.double(), 1e-4, 1e-5)  # type: ignore[union-attr]
    with torch.no_grad():
        y, h = tssd.ssd_triton(**inputs, chunk_size=16)  # type: ignore[arg-type]
    r_y, r_h = reference(**inputs)  # type: ignore[arg-type]
    assert_close("y (no grad)", y.double().cpu(), r_y, 1e-4, 1e-5)
    assert_close("last_state (no grad)", h.double().cpu(), r_h, 1e-4, 1e-5)


def test_bf16_activations() -> None:
    inputs = make_inputs(length=29, dtype=torch.bfloat16, seed=13)
    y, h = tssd.ssd_triton(**inputs, chunk_size=16)  # type: ignore[arg-type]
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y64, h64, grads = run(lambda **kw: tssd.ssd_triton(**kw, chunk_size=16), inputs)
    r_y, r_h, r_grads = run(reference, inputs)
    # the kernels compute in fp32 from the bf16 inputs: only the rounding of y, dx, dB, dC to bf16 differs
    assert_close("y", y64, r_y, 1e-2, 1e-2)
    assert_close("last_state", h64, r_h, 1e-4, 1e-5)
    for name in NAMES:
        assert_close(f"d{name}", grads[name], r_grads[name], 2e-2, 1e-2)  # type: ignore[arg-type]


def test_dispatcher_routes_to_triton_and_checks_shapes() -> None:
    inputs = make_inputs(length=9, seed=17)
    via = ssd_scan(**inputs, chunk_size=16, backend="triton")  # type: ignore[arg-type]
    direct = tssd.ssd_triton(**inputs, chunk_size=16)  # type: ignore[arg-type]
    assert torch.equal(via[0], direct[0]) and torch.equal(via[1], direct[1])
    torch_path = ssd_scan(**inputs, chunk_size=4, backend="torch")  # type: ignore[arg-type]
    torch.testing.assert_close(via[0], torch_path[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ScanError, match="D must be"):
        ssd_scan(**{**inputs, "D": torch.ones(3, device=DEVICE)}, backend="triton")  # type: ignore[arg-type]
    with pytest.raises(ScanError, match="initial_state must be"):
        ssd_scan(**{**inputs, "initial_state": torch.zeros(2, 4, 3, 4, device=DEVICE)}, backend="triton")  # type: ignore[arg-type]


def test_kernel_chunk_is_a_power_of_two_between_16_and_64() -> None:
    assert [tssd.kernel_chunk(c) for c in (1, 8, 16, 17, 64, 256)] == [16, 16, 16, 32, 64, 64]


# --- GPU only: long sequences, model-sized heads ------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("length", [1000, 4096])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_long_sequence_fp32(length: int, ngroups: int) -> None:
    inputs = make_inputs(batch=2, length=length, nheads=8, headdim=64, ngroups=ngroups, d_state=64, seed=29)
    compare(inputs, 64, rtol=1e-3, atol=1e-4)


def test_mamba2_model_on_the_triton_ssd_matches_the_torch_ssd() -> None:
    """The whole Mamba-2 LM (D fused into the kernel) against the chunked torch SSD: logits and a gradient;
    on CUDA through ``auto`` (the backend a GPU run picks), on CPU through ``triton`` under the interpreter."""
    from mupt.config import ModelConfig
    from mupt.model import MambaLM

    backend = "auto" if CUDA else "triton"
    cfg = ModelConfig(
        arch="mamba2", d_model=32, n_layers=2, d_state=8, headdim=16, ngroups=2, vocab_size=64, chunk_size=16,
        scan_backend=backend,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MambaLM(cfg).to(DEVICE)
    model_ref = MambaLM(cfg.model_copy(update={"scan_backend": "torch"})).to(DEVICE)
    model_ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 21), device=DEVICE)
    logits, logits_ref = model(ids), model_ref(ids)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    logits.logsumexp(-1).mean().backward()
    logits_ref.logsumexp(-1).mean().backward()
    for (name, p), p_ref in zip(model.named_parameters(), model_ref.parameters(), strict=True):
        assert p.grad is not None and p_ref.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=f"gradient of {name}")
