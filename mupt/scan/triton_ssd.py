"""Triton SSD (Mamba-2's scan): forward and backward kernels behind one ``autograd.Function``.

Semantics are exactly those of :func:`mupt.scan.ssd_reference.ssd_reference` (plus an optional
fused ``D`` skip, ``y += D_h x``), computed in the chunked form of Dao & Gu, "Transformers are
SSMs" (ICML 2024), section 6.  With ``a`` the cumulative sum of ``dt * A`` inside a chunk of
``Q`` steps (computed by torch on the host, so its gradient flows to ``dt`` and ``A`` through
torch's ``cumsum``), the forward is three kernels:

1. **chunk state** (one program per (chunk, batch x head)):
   ``S_c = sum_s exp(a_last - a_s) dt_s x_s B_s^T``, a (headdim x Q) @ (Q x d_state) ``tl.dot``;
2. **state passing** (one program per (block of headdim*d_state, batch x head), a loop over
   chunks): ``H_0 = initial_state``, ``H_{c+1} = exp(a_last_c) H_c + S_c``, fp32; stores every
   chunk's start state ``H_c`` and the final state;
3. **chunk scan** (one program per (chunk, batch x head)): the intra-chunk quadratic form
   ``y_l = sum_{s<=l} exp(a_l - a_s) (C_l . B_s) dt_s x_s`` as ``((C B^T) * decay * dt) @ x``,
   plus the carried-in state ``exp(a_l) C_l . H_c`` and ``D x_l``.

Decays are ``exp`` of non-positive arguments only (``dt >= 0``, ``A < 0``; the causal mask is
applied before the ``exp``).  The backward recomputes ``S`` and ``H`` (nothing but the inputs is
saved), then:

4. **output-state gradient** (kernel 1 again, with ``dy``, ``C`` and weights ``exp(a_l)``):
   ``G_c = sum_l exp(a_l) dy_l C_l^T``, the gradient that chunk ``c``'s outputs send to ``H_c``;
5. **reverse state passing**: ``dH_{n} = d(final state)``, ``dS_c = dH_{c+1}``,
   ``dH_c = G_c + exp(a_last_c) dH_{c+1}``, and ``d a_last_c = exp(a_last_c) sum(dH_{c+1} * H_c)``;
   ``dH_0`` is the initial state's gradient;
6. **chunk-scan backward** (one program per (chunk, batch x head)): with ``M = (C B^T) * decay``
   and ``dyx = dy x^T`` (both Q x Q): ``R = M^T dy + exp(a_last - a) (B dS^T)``,
   ``dx = dt R + D dy``, ``ddt = sum_p x R``, ``dB = dt ((M/CB * dyx)^T C) + exp(a_last - a) dt (x dS)``,
   ``dC = ((decay * dyx * dt) B) + exp(a) (dy H)``, and ``da`` = row sums minus column sums of
   ``M * dyx * dt`` plus the state terms.

**Determinism.**  No atomics: ``dB``/``dC`` are written per head (fp32, ``(batch, L, nheads, N)``)
and summed over the heads of a group by torch; ``dD`` and ``d a_last`` are per-program partials
summed by torch.  Two backward runs give bitwise-equal gradients.

**Precision.**  All arithmetic is fp32 (``tl.dot`` with ``input_precision="ieee"``), whatever the
input dtype; states are fp32.  The kernels use a chunk of ``Q`` = the next power of two of
``chunk_size`` within [16, 64] (``tl.dot`` needs >= 16; larger tiles would not fit in registers):
the chunk size changes speed, never the result.  Not measured on a GPU yet (none was lent when
these kernels were written); ``benchmarks/ssd_gpu.py`` measures them when one is.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from mupt.errors import ScanError

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off")
_MIN_BLOCK = 16  # tl.dot's smallest tile side
_MAX_CHUNK = 64
_PASS_BLOCK = 256 if not _INTERPRET else 64  # headdim*d_state elements per state-passing program


def kernel_chunk(chunk_size: int) -> int:
    """The chunk length the kernels use for ``chunk_size``: its next power of two within [16, 64]."""
    return min(_MAX_CHUNK, max(_MIN_BLOCK, triton.next_power_of_2(max(1, int(chunk_size)))))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _chunk_state_kernel(
    x_ptr, v_ptr, dt_ptr, acum_ptr, out_ptr,
    seqlen, padlen, nheads, headdim, ngroups, dstate, nchunks,
    GRAD: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out[b, c, h] = sum_s w_s x_s v_s^T over chunk c, (headdim, d_state) fp32.

    GRAD=False: x, v = x, B and w_s = exp(a_last - a_s) dt_s (the chunk's own end state);
    GRAD=True:  x, v = dy, C and w_l = exp(a_l) (the gradient chunk c's outputs send to its start state).
    """
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    g = h // (nheads // ngroups)
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t = pid_c * Q + offs_q
    mask_t = t < seqlen
    a_base = acum_ptr + b * padlen * nheads + h
    a = tl.load(a_base + t * nheads)
    if GRAD:
        w = tl.exp(a)
    else:
        a_last = tl.load(a_base + (pid_c * Q + Q - 1) * nheads)
        dt = tl.load(dt_ptr + b * seqlen * nheads + t * nheads + h, mask=mask_t, other=0.0).to(tl.float32)
        w = tl.exp(a_last - a) * dt
    x_rows = x_ptr + ((b * seqlen + t[:, None]) * nheads + h) * headdim
    xt = tl.load(x_rows + offs_p[None, :], mask=mask_t[:, None] & (offs_p[None, :] < headdim), other=0.0)
    v_rows = v_ptr + ((b * seqlen + t[:, None]) * ngroups + g) * dstate
    vt = tl.load(v_rows + offs_n[None, :], mask=mask_t[:, None] & (offs_n[None, :] < dstate), other=0.0)
    xw = xt.to(tl.float32) * w[:, None]
    s = tl.dot(tl.trans(xw), vt.to(tl.float32), input_precision="ieee")  # (P, N)
    o_base = out_ptr + ((b * nchunks + pid_c) * nheads + h) * headdim * dstate
    mask_pn = (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)
    tl.store(o_base + offs_p[:, None] * dstate + offs_n[None, :], s, mask=mask_pn)


@triton.jit
def _state_pass_fwd_kernel(
    s_ptr, acum_ptr, h0_ptr, states_ptr, final_ptr,
    padlen, nheads, pn, nchunks,
    HAS_H0: tl.constexpr, Q: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """states[b, c, h] = H_c (chunk c's start state), final[b, h] = H_nchunks; fp32, flattened (headdim*d_state)."""
    pid_e = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // nheads
    h = pid_bh % nheads
    offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    mask = offs < pn
    if HAS_H0:
        state = tl.load(h0_ptr + pid_bh * pn + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK], dtype=tl.float32)
    a_base = acum_ptr + b * padlen * nheads + h
    for c in range(0, nchunks):
        base = ((b * nchunks + c) * nheads + h) * pn
        tl.store(states_ptr + base + offs, state, mask=mask)
        decay = tl.exp(tl.load(a_base + (c * Q + Q - 1) * nheads))
        state = decay * state + tl.load(s_ptr + base + offs, mask=mask, other=0.0)
    tl.store(final_ptr + pid_bh * pn + offs, state, mask=mask)


@triton.jit
def _state_pass_bwd_kernel(
    g_ptr, states_ptr, acum_ptr, dfinal_ptr, ds_ptr, dalast_ptr, dh0_ptr,
    padlen, nheads, pn, nchunks, nblocks,
    Q: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Reverse state passing: ds[b, c, h] = dH_{c+1}, dh0 = dH_0, dalast partials (b, c, h, block)."""
    pid_e = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // nheads
    h = pid_bh % nheads
    offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    mask = offs < pn
    dstate = tl.load(dfinal_ptr + pid_bh * pn + offs, mask=mask, other=0.0).to(tl.float32)
    a_base = acum_ptr + b * padlen * nheads + h
    for i in range(0, nchunks):
        c = nchunks - 1 - i
        base = ((b * nchunks + c) * nheads + h) * pn
        tl.store(ds_ptr + base + offs, dstate, mask=mask)
        decay = tl.exp(tl.load(a_base + (c * Q + Q - 1) * nheads))
        hc = tl.load(states_ptr + base + offs, mask=mask, other=0.0)
        tl.store(dalast_ptr + ((b * nchunks + c) * nheads + h) * nblocks + pid_e, decay * tl.sum(dstate * hc, axis=0))
        dstate = tl.load(g_ptr + base + offs, mask=mask, other=0.0) + decay * dstate
    tl.store(dh0_ptr + pid_bh * pn + offs, dstate, mask=mask)


@triton.jit
def _load_chunk(
    x_ptr, dt_ptr, acum_ptr, B_ptr, C_ptr, b, h, g, pid_c,
    seqlen, padlen, nheads, headdim, ngroups, dstate,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One chunk's fp32 tiles: x (Q, P), dt, a (Q,), a_last, B, C (Q, N), and the masks."""
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t = pid_c * Q + offs_q
    mask_t = t < seqlen
    m_qp = mask_t[:, None] & (offs_p[None, :] < headdim)
    m_qn = mask_t[:, None] & (offs_n[None, :] < dstate)
    a_base = acum_ptr + b * padlen * nheads + h
    a = tl.load(a_base + t * nheads)
    a_last = tl.load(a_base + (pid_c * Q + Q - 1) * nheads)
    dt = tl.load(dt_ptr + b * seqlen * nheads + t * nheads + h, mask=mask_t, other=0.0).to(tl.float32)
    x_off = ((b * seqlen + t[:, None]) * nheads + h) * headdim + offs_p[None, :]
    x = tl.load(x_ptr + x_off, mask=m_qp, other=0.0).to(tl.float32)
    v_off = ((b * seqlen + t[:, None]) * ngroups + g) * dstate + offs_n[None, :]
    Bt = tl.load(B_ptr + v_off, mask=m_qn, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + v_off, mask=m_qn, other=0.0).to(tl.float32)
    return x, dt, a, a_last, Bt, Ct, x_off, m_qp


@triton.jit
def _causal_decay(a, Q: tl.constexpr):
    """(Q, Q) exp(a_l - a_s) for s <= l, else 0 (the exponent is masked first: never positive)."""
    offs_q = tl.arange(0, Q)
    causal = offs_q[:, None] >= offs_q[None, :]
    seg = tl.where(causal, a[:, None] - a[None, :], 0.0)
    return tl.where(causal, tl.exp(tl.minimum(seg, 0.0)), 0.0)


@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, dt_ptr, acum_ptr, B_ptr, C_ptr, D_ptr, states_ptr, y_ptr,
    seqlen, padlen, nheads, headdim, ngroups, dstate, nchunks,
    HAS_D: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    g = h // (nheads // ngroups)
    x, dt, a, a_last, Bt, Ct, x_off, m_qp = _load_chunk(
        x_ptr, dt_ptr, acum_ptr, B_ptr, C_ptr, b, h, g, pid_c,
        seqlen, padlen, nheads, headdim, ngroups, dstate, Q, BLOCK_P, BLOCK_N,
    )  # fmt: skip
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    m_pn = (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)
    st_off = ((b * nchunks + pid_c) * nheads + h) * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :]
    H = tl.load(states_ptr + st_off, mask=m_pn, other=0.0)  # (P, N) start state
    cb = tl.dot(Ct, tl.trans(Bt), input_precision="ieee")  # (Q, Q): C_l . B_s
    m = cb * _causal_decay(a, Q) * dt[None, :]
    y = tl.dot(m, x, input_precision="ieee")
    y += tl.exp(a)[:, None] * tl.dot(Ct, tl.trans(H), input_precision="ieee")
    if HAS_D:
        y += tl.load(D_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + x_off, y.to(y_ptr.dtype.element_ty), mask=m_qp)


@triton.jit
def _chunk_scan_bwd_kernel(
    x_ptr, dt_ptr, acum_ptr, B_ptr, C_ptr, D_ptr, states_ptr, ds_ptr, dy_ptr,
    dx_ptr, ddt_ptr, da_ptr, dB_ptr, dC_ptr, dD_ptr,
    seqlen, padlen, nheads, headdim, ngroups, dstate, nchunks,
    HAS_D: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Every per-position gradient of one (chunk, batch, head); dB/dC per head, dD and da partial."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    g = h // (nheads // ngroups)
    x, dt, a, a_last, Bt, Ct, x_off, m_qp = _load_chunk(
        x_ptr, dt_ptr, acum_ptr, B_ptr, C_ptr, b, h, g, pid_c,
        seqlen, padlen, nheads, headdim, ngroups, dstate, Q, BLOCK_P, BLOCK_N,
    )  # fmt: skip
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t = pid_c * Q + offs_q
    mask_t = t < seqlen
    m_pn = (offs_p[:, None] < headdim) & (offs_n[None, :] < dstate)
    st_off = ((b * nchunks + pid_c) * nheads + h) * headdim * dstate + offs_p[:, None] * dstate + offs_n[None, :]
    H = tl.load(states_ptr + st_off, mask=m_pn, other=0.0)  # (P, N) start state H_c
    dS = tl.load(ds_ptr + st_off, mask=m_pn, other=0.0)  # (P, N) gradient of the chunk's own end state
    dy = tl.load(dy_ptr + x_off, mask=m_qp, other=0.0).to(tl.float32)

    decay = _causal_decay(a, Q)  # (l, s)
    cb = tl.dot(Ct, tl.trans(Bt), input_precision="ieee")
    m = cb * decay
    dyx = tl.dot(dy, tl.trans(x), input_precision="ieee")  # (l, s): dy_l . x_s
    w_end = tl.exp(a_last - a)  # (Q,) decay from step s to the chunk's end
    w_in = tl.exp(a)  # (Q,) decay from the chunk's start to step l

    # x and dt
    r = tl.dot(tl.trans(m), dy, input_precision="ieee")
    r += w_end[:, None] * tl.dot(Bt, tl.trans(dS), input_precision="ieee")
    dx = dt[:, None] * r
    if HAS_D:
        dx += tl.load(D_ptr + h).to(tl.float32) * dy
        tl.store(dD_ptr + (b * nchunks + pid_c) * nheads + h, tl.sum(tl.sum(dy * x, axis=1), axis=0))
    tl.store(dx_ptr + x_off, dx.to(dx_ptr.dtype.element_ty), mask=m_qp)
    vec_off = (b * seqlen + t) * nheads + h
    tl.store(ddt_ptr + vec_off, tl.sum(x * r, axis=1), mask=mask_t)

    # B and C (per head; the host sums the heads of a group)
    ld = decay * dyx
    xds = tl.dot(x, dS, input_precision="ieee")  # (Q, N)
    dB = dt[:, None] * (tl.dot(tl.trans(ld), Ct, input_precision="ieee") + w_end[:, None] * xds)
    dyh = tl.dot(dy, H, input_precision="ieee")  # (Q, N)
    dC = tl.dot(ld * dt[None, :], Bt, input_precision="ieee") + w_in[:, None] * dyh
    n_off = ((b * seqlen + t[:, None]) * nheads + h) * dstate + offs_n[None, :]
    m_qn = mask_t[:, None] & (offs_n[None, :] < dstate)
    tl.store(dB_ptr + n_off, dB, mask=m_qn)
    tl.store(dC_ptr + n_off, dC, mask=m_qn)

    # the cumulative decay a (its gradient reaches dt and A through torch's cumsum)
    tt = m * dyx * dt[None, :]
    da = tl.sum(tt, axis=1) - tl.sum(tt, axis=0)
    da += w_in * tl.sum(Ct * dyh, axis=1)
    u = w_end * dt * tl.sum(Bt * xds, axis=1)
    da -= u
    da += tl.where(offs_q == Q - 1, tl.sum(u, axis=0), 0.0)
    tl.store(da_ptr + (b * padlen + t) * nheads + h, da)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


class _Shape:
    """Sizes and launch parameters shared by the forward and the backward."""

    def __init__(self, x: Tensor, B: Tensor, q: int) -> None:
        self.batch, self.seqlen, self.nheads, self.headdim = x.shape
        self.ngroups, self.dstate = B.shape[2], B.shape[3]
        self.q = q
        self.nchunks = -(-self.seqlen // q)
        self.padlen = self.nchunks * q
        self.pn = self.headdim * self.dstate
        self.nblocks = triton.cdiv(self.pn, _PASS_BLOCK)
        self.block_p = max(_MIN_BLOCK, triton.next_power_of_2(self.headdim))
        self.block_n = max(_MIN_BLOCK, triton.next_power_of_2(self.dstate))

    def dims(self) -> dict[str, int]:
        return {
            "seqlen": self.seqlen,
            "padlen": self.padlen,
            "nheads": self.nheads,
            "headdim": self.headdim,
            "ngroups": self.ngroups,
            "dstate": self.dstate,
            "nchunks": self.nchunks,
        }

    def blocks(self) -> dict[str, int]:
        return {"Q": self.q, "BLOCK_P": self.block_p, "BLOCK_N": self.block_n}

    def chunk_grid(self) -> tuple[int, int]:
        return (self.nchunks, self.batch * self.nheads)

    def pass_grid(self) -> tuple[int, int]:
        return (self.nblocks, self.batch * self.nheads)

    def state_buffer(self, device: torch.device) -> Tensor:
        return torch.empty(self.batch, self.nchunks, self.nheads, self.headdim, self.dstate, device=device)


def _chunk_states(s: _Shape, x: Tensor, v: Tensor, dt: Tensor, acum: Tensor, grad: bool) -> Tensor:
    out = s.state_buffer(x.device)
    d = s.dims()
    _chunk_state_kernel[s.chunk_grid()](
        x, v, dt, acum, out, d["seqlen"], d["padlen"], d["nheads"], d["headdim"], d["ngroups"], d["dstate"],
        d["nchunks"], GRAD=grad, **s.blocks(),
    )  # fmt: skip
    return out


def _pass_states(s: _Shape, chunk_states: Tensor, acum: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    states = s.state_buffer(acum.device)
    final = torch.empty(s.batch, s.nheads, s.headdim, s.dstate, device=acum.device)
    _state_pass_fwd_kernel[s.pass_grid()](
        chunk_states, acum, h0 if h0 is not None else final, states, final, s.padlen, s.nheads, s.pn, s.nchunks,
        HAS_H0=h0 is not None, Q=s.q, BLOCK=_PASS_BLOCK,
    )  # fmt: skip
    return states, final


def _forward(
    s: _Shape, x: Tensor, dt: Tensor, acum: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h0: Tensor | None
) -> tuple[Tensor, Tensor]:
    states, final = _pass_states(s, _chunk_states(s, x, B, dt, acum, grad=False), acum, h0)
    y = torch.empty_like(x)
    d = s.dims()
    _chunk_scan_fwd_kernel[s.chunk_grid()](
        x, dt, acum, B, C, D if D is not None else final, states, y,
        d["seqlen"], d["padlen"], d["nheads"], d["headdim"], d["ngroups"], d["dstate"], d["nchunks"],
        HAS_D=D is not None, **s.blocks(),
    )  # fmt: skip
    return y, final


def _backward(
    s: _Shape,
    x: Tensor,
    dt: Tensor,
    acum: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    h0: Tensor | None,
    dy: Tensor,
    dfinal: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """(dx, ddt, dacum, dB, dC, dD, dh0); dt's gradient here is the direct one (not through acum)."""
    dev = x.device
    states, _ = _pass_states(s, _chunk_states(s, x, B, dt, acum, grad=False), acum, h0)
    g = _chunk_states(s, dy, C, dt, acum, grad=True)
    ds = s.state_buffer(dev)
    dalast = torch.empty(s.batch, s.nchunks, s.nheads, s.nblocks, device=dev)
    dh0 = torch.empty(s.batch, s.nheads, s.headdim, s.dstate, device=dev)
    _state_pass_bwd_kernel[s.pass_grid()](
        g, states, acum, dfinal, ds, dalast, dh0, s.padlen, s.nheads, s.pn, s.nchunks, s.nblocks,
        Q=s.q, BLOCK=_PASS_BLOCK,
    )  # fmt: skip
    dx = torch.empty_like(x)
    ddt = torch.empty(s.batch, s.seqlen, s.nheads, device=dev)
    dacum = torch.empty(s.batch, s.padlen, s.nheads, device=dev)
    dB_heads = torch.empty(s.batch, s.seqlen, s.nheads, s.dstate, device=dev)
    dC_heads = torch.empty_like(dB_heads)
    dD_part = torch.empty(s.batch, s.nchunks, s.nheads, device=dev)
    d = s.dims()
    _chunk_scan_bwd_kernel[s.chunk_grid()](
        x, dt, acum, B, C, D if D is not None else dD_part, states, ds, dy,
        dx, ddt, dacum, dB_heads, dC_heads, dD_part,
        d["seqlen"], d["padlen"], d["nheads"], d["headdim"], d["ngroups"], d["dstate"], d["nchunks"],
        HAS_D=D is not None, **s.blocks(),
    )  # fmt: skip
    # the state passing's share of d a_last (fixed-order sums: deterministic)
    dacum.view(s.batch, s.nchunks, s.q, s.nheads)[:, :, -1] += dalast.sum(dim=-1)
    rep = s.nheads // s.ngroups
    dB = dB_heads.view(s.batch, s.seqlen, s.ngroups, rep, s.dstate).sum(dim=3)
    dC = dC_heads.view(s.batch, s.seqlen, s.ngroups, rep, s.dstate).sum(dim=3)
    dD = dD_part.sum(dim=(0, 1)) if D is not None else None
    return dx, ddt, dacum, dB, dC, dD, dh0


def _on_device(t: Tensor) -> Any:
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class _SSDTriton(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        dt: Tensor,
        acum: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        h0: Tensor | None,
        q: int,
    ) -> tuple[Tensor, Tensor]:
        s = _Shape(x, B, q)
        with _on_device(x):
            y, final = _forward(s, x, dt, acum, B, C, D, h0)
        ctx.shape = s
        ctx.save_for_backward(x, dt, acum, B, C, D, h0)
        return y, final

    @staticmethod
    def backward(ctx: Any, dy: Tensor, dfinal: Tensor) -> tuple[Tensor | None, ...]:
        x, dt, acum, B, C, D, h0 = ctx.saved_tensors
        with _on_device(x):
            dx, ddt, dacum, dB, dC, dD, dh0 = _backward(
                ctx.shape, x, dt, acum, B, C, D, h0, dy.contiguous(), dfinal.float().contiguous()
            )

        def cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
            return None if grad is None or like is None else grad.to(like.dtype)

        return dx, cast(ddt, dt), dacum, cast(dB, B), cast(dC, C), cast(dD, D), cast(dh0, h0), None


def ssd_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """SSD on Triton kernels; returns ``(y, last_state)`` like :func:`mupt.scan.ssd_reference.ssd_reference`.

    x (batch, length, nheads, headdim); dt (batch, length, nheads) > 0 (softplus applied); A (nheads,) < 0;
    B, C (batch, length, ngroups, d_state); D (nheads,) or None: adds ``D_h x`` to y; initial_state
    (batch, nheads, headdim, d_state) or None.  y has x's dtype, last_state is fp32; every input
    (including ``initial_state``) gets its gradient.  ``chunk_size`` changes speed, not the result
    (see :func:`kernel_chunk`).  Needs CUDA tensors, or ``TRITON_INTERPRET=1`` set before this module
    is imported; raises :class:`ScanError` otherwise.
    """
    if x.device.type != "cuda" and not _INTERPRET:
        raise ScanError(
            "the triton SSD backend needs CUDA tensors (or TRITON_INTERPRET=1 set before import); "
            "use backend='torch' on CPU"
        )
    q = kernel_chunk(chunk_size)
    batch, length, nheads, _ = x.shape
    pad = (-length) % q
    # cumulative dt*A per chunk, by torch (its backward carries d acum to dt and A); padded steps add 0
    a = F.pad(dt.float() * A.float(), (0, 0, 0, pad))
    acum = a.view(batch, -1, q, nheads).cumsum(dim=2).view(batch, length + pad, nheads)
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    D = None if D is None else D.contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    return _SSDTriton.apply(x, dt, acum.contiguous(), B, C, D, h0, q)


__all__ = ["kernel_chunk", "ssd_triton"]
