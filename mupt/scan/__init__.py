"""Selective scan backends behind one function.

``selective_scan`` is the only entry point the model uses.  Backends:

* ``reference``: sequential loop under autograd, the test oracle (slow).
* ``torch``: fast pure-PyTorch CPU/GPU path (custom autograd.Function, recompute in backward).
* ``triton``: Triton kernels for CUDA (also runs under ``TRITON_INTERPRET=1`` for tests).
* ``auto``: triton on CUDA tensors when Triton is importable, else torch.

``ssd_scan`` is Mamba-2's entry point (the SSD, scalar A per head).  Backends: ``reference``
(:mod:`mupt.scan.ssd_reference`, sequential, the oracle), ``torch`` (:mod:`mupt.scan.ssd_torch`,
chunked) and ``triton`` (:mod:`mupt.scan.triton_ssd`, chunked Triton kernels for CUDA); ``auto``
picks triton on CUDA tensors when Triton is importable, else torch (as for ``selective_scan``).
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


def _check_ssd_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if x.dim() != 4:
        raise ScanError(f"x must be (batch, length, nheads, headdim); got {tuple(x.shape)}")
    batch, length, nheads, _ = x.shape
    if tuple(dt.shape) != (batch, length, nheads):
        raise ScanError(f"dt must be (batch, length, nheads)=({batch}, {length}, {nheads}); got {tuple(dt.shape)}")
    if tuple(A.shape) != (nheads,):
        raise ScanError(f"A must be (nheads={nheads},); got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, length) or B.shape != C.shape or nheads % B.shape[2]:
        raise ScanError(
            f"B and C must be (batch, length, ngroups, d_state) with nheads={nheads} divisible by ngroups; "
            f"got {tuple(B.shape)}, {tuple(C.shape)}"
        )


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    backend: str | Backend = Backend.AUTO,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mamba-2's SSD; returns ``(y, last_state)``.

    x (batch, length, nheads, headdim), dt (batch, length, nheads) > 0 (softplus applied),
    A (nheads,) < 0, B and C (batch, length, ngroups, d_state), D (nheads,) or None,
    initial_state (batch, nheads, headdim, d_state) or None -> y (batch, length, nheads, headdim),
    last_state (batch, nheads, headdim, d_state) fp32, with
    ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D x_t`` (Dao & Gu 2024, section 3).
    The triton backend fuses the ``D`` skip into its output kernel; the others add it after the scan.
    Raises :class:`ScanError` on bad shapes or an unknown backend.
    """
    _check_ssd_shapes(x, dt, A, B, C)
    batch, _, nheads, headdim = x.shape
    if D is not None and tuple(D.shape) != (nheads,):
        raise ScanError(f"D must be (nheads={nheads},); got {tuple(D.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, nheads, headdim, B.shape[3]):
        raise ScanError(
            f"initial_state must be (batch, nheads, headdim, d_state)=({batch}, {nheads}, {headdim}, {B.shape[3]}); "
            f"got {tuple(initial_state.shape)}"
        )
    b = resolve_backend(backend, x.device)
    if b is Backend.TRITON:
        from mupt.scan.triton_ssd import ssd_triton

        return ssd_triton(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)
    if b is Backend.REFERENCE:
        from mupt.scan.ssd_reference import ssd_reference

        y, state = ssd_reference(x, dt, A, B, C, initial_state)
    else:
        from mupt.scan.ssd_torch import ssd_chunked

        y, state = ssd_chunked(x, dt, A, B, C, chunk_size, initial_state)
    if D is not None:
        y = y + x * D.to(y.dtype)[:, None]
    return y, state


__all__ = ["Backend", "Discretization", "resolve_backend", "selective_scan", "ssd_scan", "triton_available"]
