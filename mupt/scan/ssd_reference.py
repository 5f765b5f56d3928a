"""Sequential reference SSD (Mamba-2's state space dual), the oracle for the fast SSD scans.

One time step at a time under autograd, in fp32, exactly the recurrence of Dao & Gu, "Transformers
are SSMs" (ICML 2024), section 3 / eq. (1) with a scalar A per head::

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t B_t^T        h_t: (headdim, d_state) per head
    y_t = h_t C_t                                             y_t: (headdim,)

Heads share B and C within their group: head ``h`` reads group ``h // (nheads // ngroups)``
(mamba_ssm's and transformers' ``repeat_interleave`` layout).  Slow (a Python loop over
length); only for tests and as the speed baseline in benchmarks/ssd_cpu.py.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ssd_reference(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sequential SSD.

    Shapes: x (batch, length, nheads, headdim); dt (batch, length, nheads), already positive
    (softplus and dt_bias applied by the caller); A (nheads,), negative; B and C
    (batch, length, ngroups, d_state); initial_state (batch, nheads, headdim, d_state) or None.
    Returns ``(y, last_state)``: y (batch, length, nheads, headdim) in x's dtype, last_state
    (batch, nheads, headdim, d_state) in fp32.
    """
    batch, length, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    rep = nheads // ngroups
    xf, dtf, Af = x.float(), dt.float(), A.float()
    Bh = B.float().repeat_interleave(rep, dim=2)  # (b, l, h, n)
    Ch = C.float().repeat_interleave(rep, dim=2)
    h = (
        initial_state.float()
        if initial_state is not None
        else x.new_zeros(batch, nheads, headdim, d_state, dtype=torch.float32)
    )
    ys = []
    for t in range(length):
        decay = torch.exp(dtf[:, t] * Af)  # (b, h)
        inp = (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        h = decay[..., None, None] * h + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(batch, 0, nheads, headdim)
    return y.to(x.dtype), h
