"""Mamba-2's SSD scans: the chunked torch SSD against the sequential reference (values and every gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mupt.errors import ScanError
from mupt.scan import ssd_scan
from mupt.scan.ssd_reference import ssd_reference
from mupt.scan.ssd_torch import ssd_chunked

NAMES = ("x", "dt", "A", "B", "C")


def make_inputs(
    batch: int = 2,
    length: int = 37,
    nheads: int = 4,
    headdim: int = 3,
    ngroups: int = 2,
    d_state: int = 5,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Mamba-2-like inputs in float64: dt = softplus(..) around 0.05..1, A in [-8, -0.5]."""
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": g, "dtype": torch.float64}
    return {
        "x": torch.randn(batch, length, nheads, headdim, **kw),
        "dt": F.softplus(torch.randn(batch, length, nheads, **kw) - 1.0),
        "A": -(0.5 + 7.5 * torch.rand(nheads, **kw)),
        "B": torch.randn(batch, length, ngroups, d_state, **kw),
        "C": torch.randn(batch, length, ngroups, d_state, **kw),
    }


def _grads(fn, inputs: dict[str, Tensor], gy: Tensor, gh: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:  # type: ignore[no-untyped-def]
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, h = fn(**leaves)
    ((y.double() * gy).sum() + (h.double() * gh).sum()).backward()
    return y.detach(), h.detach(), {k: v.grad for k, v in leaves.items()}  # type: ignore[misc]


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize(("length", "chunk"), [(37, 8), (5, 16), (64, 16), (1, 4)])
def test_chunked_matches_reference_values_and_all_gradients(ngroups: int, length: int, chunk: int) -> None:
    inputs = make_inputs(length=length, ngroups=ngroups, seed=length + ngroups)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(2, length, 4, 3, generator=g, dtype=torch.float64)
    gh = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    y_ref, h_ref, g_ref = _grads(ssd_reference, inputs, gy, gh)
    y, h, grads = _grads(lambda **kw: ssd_chunked(**kw, chunk_size=chunk), inputs, gy, gh)
    # both compute in fp32 internally: compare at fp32 accuracy relative to each tensor's scale
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    torch.testing.assert_close(h.double(), h_ref.double(), rtol=1e-5, atol=1e-5 * h_ref.abs().max().item())
    for name in NAMES:
        ref = g_ref[name]
        assert grads[name] is not None and torch.isfinite(grads[name]).all(), name
        atol = 1e-5 * max(1.0, ref.abs().max().item())  # A's gradient is exactly 0 at length 1
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=atol, msg=name)


def test_reference_is_the_recurrence_written_out() -> None:
    """Independent check of the oracle: two steps by hand, one head, one group."""
    x = torch.tensor([[[[1.0, 2.0]]], [[[3.0, -1.0]]]]).view(1, 2, 1, 2)
    dt = torch.tensor([[[0.5], [0.25]]])
    A = torch.tensor([-2.0])
    B = torch.tensor([[[[1.0, 0.0, 2.0]]], [[[0.5, 1.0, -1.0]]]]).view(1, 2, 1, 3)
    C = torch.tensor([[[[0.0, 1.0, 1.0]]], [[[2.0, 1.0, 0.0]]]]).view(1, 2, 1, 3)
    h1 = 0.5 * torch.outer(x[0, 0, 0], B[0, 0, 0])
    h2 = torch.exp(torch.tensor(-0.5)) * h1 + 0.25 * torch.outer(x[0, 1, 0], B[0, 1, 0])
    y, h = ssd_reference(x, dt, A, B, C)
    torch.testing.assert_close(y[0, 0, 0], h1 @ C[0, 0, 0])
    torch.testing.assert_close(y[0, 1, 0], h2 @ C[0, 1, 0])
    torch.testing.assert_close(h[0, 0], h2)


def test_chunk_size_does_not_change_the_result_and_initial_state_is_carried() -> None:
    inputs = {k: v.float() for k, v in make_inputs(length=50, ngroups=1).items()}
    y16, h16 = ssd_chunked(**inputs, chunk_size=16)
    y7, h7 = ssd_chunked(**inputs, chunk_size=7)
    torch.testing.assert_close(y16, y7, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h16, h7, rtol=1e-4, atol=1e-5)
    # splitting the sequence in two and carrying the state gives the same outputs
    first = {k: (v[:, :20] if v.dim() > 1 else v) for k, v in inputs.items()}
    rest = {k: (v[:, 20:] if v.dim() > 1 else v) for k, v in inputs.items()}
    ya, ha = ssd_chunked(**first, chunk_size=16)
    yb, hb = ssd_chunked(**rest, chunk_size=16, initial_state=ha)
    torch.testing.assert_close(torch.cat([ya, yb], dim=1), y16, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hb, h16, rtol=1e-4, atol=1e-5)


def test_ssd_scan_dispatch_and_shape_errors() -> None:
    inputs = {k: v.float() for k, v in make_inputs(length=9).items()}
    y_ref, _ = ssd_scan(**inputs, backend="reference")
    y, _ = ssd_scan(**inputs, chunk_size=4, backend="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ScanError, match="dt must be"):
        ssd_scan(inputs["x"], inputs["dt"][:, :3], inputs["A"], inputs["B"], inputs["C"])
    with pytest.raises(ScanError, match="divisible by ngroups"):
        bad = torch.randn(2, 9, 3, 5)
        ssd_scan(inputs["x"], inputs["dt"], inputs["A"], bad, bad)
    with pytest.raises(ScanError, match="unknown scan backend"):
        ssd_scan(**inputs, backend="cuda-magic")
