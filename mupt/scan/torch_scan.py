"""Fast pure-PyTorch selective scan for CPU (and a GPU fallback).

The core recurrence runs inside a custom ``autograd.Function`` under ``no_grad``: the forward
walks time in chunks of ``CHUNK`` steps, building each chunk's decays ``exp(dt*A)`` and inputs
``Bbar*u`` with one batched op and then looping only a fused multiply-add over time.  It saves
the inputs (O(batch*dim*length)) plus one fp32 state per chunk boundary; the backward recomputes
a chunk's states from its checkpoint, runs the reverse recurrence for the state gradient, and
forms every parameter gradient with batched ops.  Softplus, the D skip and the gate are plain
differentiable ops around it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 64


def _chunk_terms(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, zoh: bool) -> tuple[Tensor, Tensor, Tensor]:
    """For a chunk: decay dA=(b,d,t,n), input term dBu=(b,d,t,n) and Bbar factor g=(b,d,t,n)."""
    dA = torch.exp(dt.unsqueeze(-1) * A[:, None, :])  # (b, d, t, n)
    Bt = B.transpose(1, 2).unsqueeze(1)  # (b, 1, t, n)
    g = (dA - 1.0) / A[:, None, :] if zoh else dt.unsqueeze(-1).expand_as(dA)
    return dA, g * Bt * u.unsqueeze(-1), g


def _run_chunk(x: Tensor, dA: Tensor, dBu: Tensor) -> Tensor:
    """States after each step of the chunk, (b, d, t, n); x is the state before the chunk."""
    states = torch.empty_like(dA)
    for t in range(dA.shape[2]):
        x = torch.addcmul(dBu[:, :, t], dA[:, :, t], x)
        states[:, :, t] = x
    return states


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, zoh: bool) -> tuple[Tensor, Tensor]:
        batch, dim, length = u.shape
        x = u.new_zeros(batch, dim, A.shape[1])
        y = torch.empty_like(u)
        checkpoints = []
        for s in range(0, length, CHUNK):
            e = min(s + CHUNK, length)
            checkpoints.append(x)
            dA, dBu, _ = _chunk_terms(u[:, :, s:e], dt[:, :, s:e], A, B[:, :, s:e], zoh)
            states = _run_chunk(x, dA, dBu)
            y[:, :, s:e] = torch.einsum("bdtn,bnt->bdt", states, C[:, :, s:e])
            x = states[:, :, -1]
        ctx.save_for_backward(u, dt, A, B, C, torch.stack(checkpoints))
        ctx.zoh = zoh
        return y, x.clone()

    @staticmethod
    def backward(ctx: Any, gy: Tensor, gstate: Tensor) -> tuple[Tensor | None, ...]:
        u, dt, A, B, C, checkpoints = ctx.saved_tensors
        zoh = ctx.zoh
        length = u.shape[2]
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA_param = torch.zeros_like(A)
        gx = gstate.clone() if gstate is not None else torch.zeros_like(checkpoints[0])
        starts = list(range(0, length, CHUNK))
        for k in reversed(range(len(starts))):
            s = starts[k]
            e = min(s + CHUNK, length)
            uc, dtc, Bc, Cc, gyc = u[:, :, s:e], dt[:, :, s:e], B[:, :, s:e], C[:, :, s:e], gy[:, :, s:e]
            dA, dBu, g = _chunk_terms(uc, dtc, A, Bc, zoh)
            states = _run_chunk(checkpoints[k], dA, dBu)
            prev = torch.cat([checkpoints[k].unsqueeze(2), states[:, :, :-1]], dim=2)
            dC[:, :, s:e] = torch.einsum("bdtn,bdt->bnt", states, gyc)
            inj = gyc.unsqueeze(-1) * Cc.transpose(1, 2).unsqueeze(1)  # dL/dx_t from y_t, (b, d, t, n)
            G = torch.empty_like(dA)  # dL/dx_t including the future
            for t in reversed(range(e - s)):
                gx = gx + inj[:, :, t]
                G[:, :, t] = gx
                gx = gx * dA[:, :, t]
            gdA = G * prev  # dL/d(dA)
            Bt = Bc.transpose(1, 2).unsqueeze(1)
            gdBu = G * uc.unsqueeze(-1)
            dB[:, :, s:e] = torch.einsum("bdtn,bdtn->bnt", gdBu, g)
            gg = gdBu * Bt  # dL/dg, (b, d, t, n)
            du[:, :, s:e] = (G * g * Bt).sum(-1)
            # dA = exp(dt*A): d/d dt = A*dA, d/dA = dt*dA
            gz = gdA * dA
            if zoh:  # g = (dA - 1)/A: d/d dt = dA ; d/dA = (dt*dA*A - (dA - 1)) / A^2
                ddt[:, :, s:e] = (gz * A[:, None, :]).sum(-1) + (gg * dA).sum(-1)
                dgdA = (dtc.unsqueeze(-1) * dA * A[:, None, :] - (dA - 1.0)) / (A[:, None, :] ** 2)
                dA_param += torch.einsum("bdtn,bdt->dn", gz, dtc) + (gg * dgdA).sum((0, 2))
            else:  # g = dt
                ddt[:, :, s:e] = (gz * A[:, None, :]).sum(-1) + gg.sum(-1)
                dA_param += torch.einsum("bdtn,bdt->dn", gz, dtc)
        return du, ddt, dA_param, dB, dC, None



def selective_scan_torch(
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
    uf, dt = u.float(), delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    y, last = _Scan.apply(uf, dt, A.float(), B.float(), C.float(), discretization == "zoh")
    if D is not None:
        y = y + uf * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in), last
