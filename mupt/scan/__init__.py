"""Selective scan backends behind one function.

``selective_scan`` is the only entry point the model uses.  Backends:

* ``reference``: sequential loop under autograd, the test oracle (slow).
* ``torch``: fast pure-PyTorch CPU/GPU path (custom autograd.Function, recompute in backward).
* ``triton``: Triton kernels for CUDA (also runs under ``TRITON_INTERPRET=1`` for tests).
* ``auto``: triton on CUDA tensors when Triton is importable, else torch.
"""

from __future__ import annotations

from enum import StrEnum

import torch
from torch import Tensor

from mupt.config import Discretization
from mupt.errors import ScanError


class Backend(StrEnum):
    AUTO = "auto"
    REFERENCE = "reference"
    TORCH = "torch"
    TRITON = "triton"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str | Backend, device: torch.device) -> Backend:
    try:
        b = Backend(backend)
    except ValueError:
        choices = ", ".join(x.value for x in Backend)
        raise ScanError(f"unknown scan backend {backend!r}; choose one of: {choices}") from None
    if b is Backend.AUTO:
        return Backend.TRITON if device.type == "cuda" and triton_available() else Backend.TORCH
    return b


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ScanError(
            f"u and delta must be (batch, dim, length) and equal; got {tuple(u.shape)}, {tuple(delta.shape)}"
        )
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ScanError(f"A must be (dim={dim}, state); got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, n, length):
            raise ScanError(f"{name} must be (batch, state, length)=({batch}, {n}, {length}); got {tuple(t.shape)}")


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    discretization: str | Discretization = Discretization.EULER,
    backend: str | Backend = Backend.AUTO,
) -> tuple[Tensor, Tensor]:
    """Run the selective scan; returns ``(out, last_state)``.

    out = (sum_n x_t[n] * C_t[n] + D * u_t) * silu(z_t), with
    x_t = exp(dt_t * A) * x_{t-1} + Bbar_t * u_t, dt = softplus(delta + delta_bias) if asked,
    Bbar = dt * B (euler, as mamba_ssm) or (exp(dt*A) - 1) / A * B (zoh).
    """
    _check_shapes(u, delta, A, B, C)
    disc = Discretization(discretization)
    b = resolve_backend(backend, u.device)
    if b is Backend.REFERENCE:
        from mupt.scan.reference import selective_scan_reference as fn
    elif b is Backend.TORCH:
        from mupt.scan.torch_scan import selective_scan_torch as fn
    else:
        from mupt.scan.triton_scan import selective_scan_triton as fn
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, disc.value)


__all__ = ["Backend", "Discretization", "resolve_backend", "selective_scan", "triton_available"]
