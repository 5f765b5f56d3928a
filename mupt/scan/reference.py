"""The test oracle: a plain sequential selective scan, written to be obviously correct.

Shapes follow mamba_ssm's ``selective_scan_fn``:
u, delta, z: (batch, dim, length); A: (dim, state); B, C: (batch, state, length);
D, delta_bias: (dim,).  Returns ``(out, last_state)`` with last_state (batch, dim, state).

Everything is computed in fp32.  Autograd flows through the loop, so this is slow and its
backward is quadratic-ish in memory; it exists only to check the fast backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    discretization: str = "euler",
) -> tuple[Tensor, Tensor]:
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    state = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]  # (b, d, 1)
        dA = torch.exp(dt * A)  # (b, d, n)
        if discretization == "zoh":
            # (exp(dt*A) - 1) / A * B ; A < 0 so the ratio is finite
            dB = (dA - 1.0) / A * B[:, None, :, t]
        else:  # euler, what mamba_ssm computes
            dB = dt * B[:, None, :, t]
        state = dA * state + dB * u[:, :, t, None]
        ys.append((state * C[:, None, :, t]).sum(-1))
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + u * D.float()[None, :, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype_in), state
