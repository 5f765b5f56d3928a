"""Triton selective scan: forward and backward kernels behind one ``autograd.Function``.

Semantics are exactly those of :func:`mupt.scan.reference.selective_scan_reference`.

Design
------
* **Grid.**  One program per ``(block of BLOCK_D channels, batch row, sequence chunk)``.  Channel
  blocks vary fastest, so the programs that share a batch row (and its ``B``/``C``) run side by side
  and hit L2.  The fp32 state of a program's channels stays in registers.
* **Tiles.**  A program walks its chunk in tiles of ``BLOCK_L`` steps.  Register tiles are indexed
  ``[time, state, channel]`` with channels fastest, so Triton's default layout puts lanes and warps
  on channels (and on states where ``BLOCK_D < 32``) and keeps time inside each thread: the scan
  along time needs no shuffles.  Per tile the forward builds the fp32 decays ``a = exp(dt*A)``
  (as ``exp2`` with ``A*log2(e)`` precomputed) and inputs ``b = Bbar*u``, folds the carried state
  into the first step (``b_0 += a_0 * h``) and runs ``tl.associative_scan`` with
  ``(a1, b1), (a2, b2) -> (a1*a2, a2*b1 + b2)``, whose second output is then the state itself.
  ``B``/``C`` are ``(BLOCK_L, N)`` tiles loaded once per block of channels.  Softplus (fp32), the
  ``D`` skip and the ``silu(z)`` gate are fused.  Steps past the end are masked to ``a = 1, b = 0``.
  The next tile's loads are issued before the current tile is computed (register prefetch).
* **Checkpoints.**  The forward stores the fp32 state at the start of every ``CK`` steps,
  ``(batch, cdiv(L, CK), dim, N)``; ``CK`` is the backward tile (16 on GPU for ``N <= 16``, 32 under
  the interpreter) and the forward tile divides it.
* **Backward.**  Walks the ``CK``-step tiles in reverse.  Per tile it recomputes the states from
  the checkpoint with the same scan, and runs one reverse scan for ``q_t = a_t * g_t`` where
  ``g_t = dL/dh_t = w_t + q_{t+1}``, ``w_t = C_t * dy_t``: elements ``(a_t, a_t*w_t)`` plus an
  *exclusive* pair ``(1, 0)`` combined as ``(a1*a2, a2*b1 + b2, a1*c2, c2*b1 + d2)``, which yields
  ``q_{t+1}`` next to ``q_t`` without shifting anything (no second ``exp`` of a shifted ``delta``).
  The reverse scan runs as a forward scan over the ``tl.flip``-ed tile (free for an in-thread axis;
  ``reverse=True`` costs lane shuffles).  The carry between tiles is ``q`` at the tile's first step.
  Every gradient is a local product: ``dL/da_t * a_t = g_t * (h_t - b_t)``, so there is no
  division by a decay and no ``exp`` of a positive argument (decays are ``exp(dt*A) <= 1`` for
  ``dt >= 0, A < 0``; chunk decays are ``exp(A * sum dt)``).  Backward register tiles are
  ``[time, N/N2, channel, N2]`` (``N2 = min(N, 8)`` lanes on states, the other lanes and the warps
  on channels), which balances the shuffles of the reductions over states (``dt``, ``u``, ``z``
  gradients) and over channels (``dB``, ``dC``).
* **Determinism.**  No atomics.  ``dA``, ``dD`` and ``d(delta_bias)`` are stored as per
  ``(batch, chunk)`` fp32 partials and ``dB``/``dC`` as per channel block fp32 partials
  ``(n_blocks, batch, N, L)``; fixed-order ``torch.sum`` reduces them, so two backward runs give
  bitwise-equal gradients.
* **Sequence split.**  When ``batch x channel blocks`` cannot fill the GPU, the sequence is cut into
  chunks (multiples of ``CK``) that also span the grid.  Forward: pass 1 runs every chunk from a
  zero state and stores its end state and ``sum dt``; pass 2 (torch, a short loop over chunks)
  propagates ``h_in[c+1] = exp(A * sum_dt[c]) * h_in[c] + h_end[c]``; pass 3 reruns every chunk from
  its true initial state, writing outputs and checkpoints.  The backward mirrors it for the state
  gradient: pass 1 gives each chunk's ``q`` at its first step from a zero carry, pass 2 propagates
  ``q_in[c] = q_loc[c+1] + exp(A * sum_dt[c+1]) * q_in[c+1]`` from the end, pass 3 is the full
  backward.
* **Tuning.**  ``triton.autotune`` chooses ``BLOCK_D``, ``BLOCK_L`` and ``num_warps`` (forward) and
  ``BLOCK_D`` and ``num_warps`` (backward, whose tile is ``CK``) among configs aimed at H100-class
  GPUs, pruned to those whose layout keeps time in-thread and whose tiles fit the registers
  (``MUPT_TRITON_AUTOTUNE=0``: no benchmarking, the preferred config of each kernel).  Under
  ``TRITON_INTERPRET=1`` one small fixed config keeps CPU tests fast.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from mupt.errors import ScanError

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off")

# ---------------------------------------------------------------------------------------------
# Tile sizes and autotune configs
# ---------------------------------------------------------------------------------------------

_REG_TILE = 64  # fp32 elements per thread of one forward register tile (a few are live at once)
_REG_TILE_BWD = 32  # the backward keeps about twice as many tiles alive
_BWD_BLOCK_D_MIN = 4 if _INTERPRET else 16  # dB/dC partials are allocated for the smallest block


def _bwd_lanes_n(block_n: int) -> int:
    """Lanes on states in the backward tile (the rest of the warp is on channels)."""
    return min(block_n, 8)


def _ckpt_len(block_n: int) -> int:
    """Checkpoint spacing = backward time tile (every forward tile divides it)."""
    if _INTERPRET:
        return 32
    per_thread_states = block_n // _bwd_lanes_n(block_n)
    # the backward's (time, channel) tiles are replicated over the state lanes: keep them <= 16 per thread
    return max(8, min(16, _REG_TILE_BWD // per_thread_states))


def _fwd_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_D": 4, "BLOCK_L": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_D": bd, "BLOCK_L": bl}, num_warps=w)
        for bd in (8, 16, 32, 64)
        for bl in (4, 8, 16)
        for w in (1, 2)
    ]


def _bwd_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_D": _BWD_BLOCK_D_MIN}, num_warps=1)]
    # up to 8 warps: more would cap the registers per thread below what the backward tile needs
    return [triton.Config({"BLOCK_D": bd}, num_warps=w) for bd in (16, 32, 64) for w in (2, 4, 8)]


def _fwd_ok(c: triton.Config, bn: int, ck: int) -> bool:
    bd, bl, w = c.kwargs["BLOCK_D"], c.kwargs["BLOCK_L"], c.num_warps
    lanes_d = min(bd, 32)
    layout_ok = bd == lanes_d * w and bd * bn >= 32 * w  # warps only on channels, no lanes on time
    per_thread = bl * bn * bd // (32 * w)
    return ck % bl == 0 and layout_ok and _REG_TILE // 4 <= per_thread <= _REG_TILE


def _bwd_ok(c: triton.Config, bn: int, ck: int) -> bool:
    bd, w = c.kwargs["BLOCK_D"], c.num_warps
    lanes_n = _bwd_lanes_n(bn)
    lanes_d = 32 // lanes_n
    # one channel per thread (lanes and warps on channels): several would double the replicated (time,
    # channel) tiles and spill
    return bd == lanes_d * w and ck * (bn // lanes_n) <= _REG_TILE_BWD


def _autotune_enabled() -> bool:
    """``MUPT_TRITON_AUTOTUNE=0`` skips benchmarking configs and uses the preferred one (read per new shape)."""
    return os.environ.get("MUPT_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def _fwd_preference(c: triton.Config, bn: int) -> tuple[int, int, int]:
    # biggest register tile (within budget) first, then fewer warps, then 16 channels
    per_thread = c.kwargs["BLOCK_L"] * bn * c.kwargs["BLOCK_D"] // (32 * c.num_warps)
    return (-per_thread, c.num_warps, abs(c.kwargs["BLOCK_D"] - 16))


def _prune_fwd(configs: list[triton.Config], nargs: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    args = {**nargs, **kwargs}
    bn, ck = int(args["BLOCK_N"]), int(args["CK"])
    ok = sorted((c for c in configs if _fwd_ok(c, bn, ck)), key=lambda c: _fwd_preference(c, bn))
    if not ok:
        fits = [c for c in configs if ck % c.kwargs["BLOCK_L"] == 0]
        ok = [min(fits, key=lambda c: (c.kwargs["BLOCK_L"] * c.kwargs["BLOCK_D"] / c.num_warps, c.num_warps))]
    return ok if _autotune_enabled() else ok[:1]


def _prune_bwd(configs: list[triton.Config], nargs: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    args = {**nargs, **kwargs}
    bn, ck = int(args["BLOCK_N1"]) * int(args["BLOCK_N2"]), int(args["CK"])
    ok = sorted((c for c in configs if _bwd_ok(c, bn, ck)), key=lambda c: c.kwargs["BLOCK_D"])
    if not ok:
        lanes_d = 32 // _bwd_lanes_n(bn)
        one_channel = [c for c in configs if c.kwargs["BLOCK_D"] == lanes_d * c.num_warps]
        ok = [min(one_channel or configs, key=lambda c: (c.kwargs["BLOCK_D"], c.num_warps))]
    return ok if _autotune_enabled() else ok[:1]


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2):  h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _combine_excl(a1, b1, c1, d1, a2, b2, c2, d2):
    # (a, b): the composed step as in _combine; (c, d): the composition without the segment's own
    # last-applied element.  Element t starts as (a_t, b_t, 1, 0), so (c, d) ends up as the
    # exclusive scan: d_t is the inclusive b of the element before t in scan order.
    return a1 * a2, a2 * b1 + b2, a1 * c2, c2 * b1 + d2


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus (threshold 20) with an accurate log1p(exp(x)).
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _step_size(dl, bias, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """fp32 dt from a raw delta tile; exactly 0 where masked (so the decay is 1)."""
    dt = dl.to(tl.float32)
    if HAS_BIAS:
        dt = dt + bias[None, :]
    if SOFTPLUS:
        dt = _softplus(dt)
    return tl.where(mask, dt, 0.0)


# ---------------------------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_loads(
    u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, col_d, col_n, offs_t, t_end, mask_d, mask_n,
    HAS_Z: tl.constexpr, STATS_ONLY: tl.constexpr,
):  # fmt: skip
    """One tile's inputs in their storage dtypes: u, delta, z (L, D) and B, C (L, N)."""
    mask_t = offs_t < t_end
    m_td = mask_t[:, None] & mask_d[None, :]
    m_tn = mask_t[:, None] & mask_n[None, :]
    u = tl.load(u_ptr + col_d + offs_t[:, None], mask=m_td, other=0.0)
    dl = tl.load(delta_ptr + col_d + offs_t[:, None], mask=m_td, other=0.0)
    Bt = tl.load(B_ptr + col_n + offs_t[:, None], mask=m_tn, other=0.0)
    if STATS_ONLY:
        Ct = Bt
    else:
        Ct = tl.load(C_ptr + col_n + offs_t[:, None], mask=m_tn, other=0.0)
    if HAS_Z and not STATS_ONLY:
        zt = tl.load(z_ptr + col_d + offs_t[:, None], mask=m_td, other=0.0)
    else:
        zt = u
    return u, dl, Bt, Ct, zt


@triton.autotune(
    configs=_fwd_configs(),
    key=["batch", "dim", "seqlen", "dstate", "chunk_len", "HAS_Z", "ZOH", "STATS_ONLY", "WRITE_CKPT"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)
@triton.jit
def _fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    ckpt_ptr,
    hinit_ptr,
    hend_ptr,
    dtsum_ptr,
    batch,
    dim,
    seqlen,
    dstate,
    chunk_len,
    n_ck,
    n_chunks,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    ZOH: tl.constexpr,
    STATS_ONLY: tl.constexpr,
    WRITE_CKPT: tl.constexpr,
    HAS_HINIT: tl.constexpr,
    CK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_nd = mask_n[:, None] & mask_d[None, :]
    t_idx = tl.arange(0, BLOCK_L)
    first = t_idx[:, None, None] == 0
    last = t_idx[:, None, None] == BLOCK_L - 1

    # (N, D) tiles: A (pre-scaled for exp2), the state
    nd_off = offs_d[None, :] * dstate + offs_n[:, None]
    A = tl.load(A_ptr + nd_off, mask=mask_nd, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
    A_inv = 1.0 / tl.where(mask_nd, A, 1.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        Dv = tl.zeros([BLOCK_D], dtype=tl.float32)

    st_base = (pid_b * n_chunks + pid_c) * dim * dstate  # (batch, n_chunks, dim, dstate) buffers
    if HAS_HINIT:
        h = tl.load(hinit_ptr + st_base + nd_off, mask=mask_nd, other=0.0)
    else:
        h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dtsum = tl.zeros([BLOCK_D], dtype=tl.float32)

    col_d = pid_b * dim * seqlen + offs_d[None, :].to(tl.int64) * seqlen  # (1, D) rows of u-like tensors
    col_n = pid_b * dstate * seqlen + offs_n[None, :] * seqlen  # (1, N) rows of B/C
    t_start = pid_c * chunk_len
    t_end = tl.minimum(t_start + chunk_len, seqlen)

    nxt = _fwd_loads(
        u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, col_d, col_n, t_start + t_idx, t_end, mask_d, mask_n, HAS_Z, STATS_ONLY
    )
    for t0 in range(t_start, t_end, BLOCK_L):
        u_raw, dl_raw, B_raw, C_raw, z_raw = nxt
        offs_t = t0 + t_idx
        m_td = (offs_t < t_end)[:, None] & mask_d[None, :]
        # prefetch the next tile (fully masked after the last one)
        nxt = _fwd_loads(
            u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, col_d, col_n, offs_t + BLOCK_L, t_end, mask_d, mask_n,
            HAS_Z, STATS_ONLY,
        )  # fmt: skip
        if WRITE_CKPT:
            if t0 % CK == 0:
                ck_off = (pid_b * n_ck + t0 // CK) * dim * dstate + nd_off
                tl.store(ckpt_ptr + ck_off, h, mask=mask_nd)

        dt = _step_size(dl_raw, bias, m_td, HAS_BIAS, SOFTPLUS)  # (L, D)
        u = u_raw.to(tl.float32)
        Bt = B_raw.to(tl.float32)  # (L, N)
        # (L, N, D) decays and inputs
        a = tl.exp2(dt[:, None, :] * A2[None, :, :])
        if ZOH:
            b = (a - 1.0) * A_inv[None, :, :] * (Bt[:, :, None] * u[:, None, :])
        else:
            b = Bt[:, :, None] * (dt * u)[:, None, :]
        b = tl.where(first, a * h[None, :, :] + b, b)  # carry the state in through the first step
        _, hs = tl.associative_scan((a, b), axis=0, combine_fn=_combine)
        if STATS_ONLY:
            dtsum += tl.sum(dt, axis=0)
        else:
            Ct = C_raw.to(tl.float32)
            y = tl.sum(hs * Ct[:, :, None], axis=1)  # (L, D)
            if HAS_D:
                y += u * Dv[None, :]
            if HAS_Z:
                zt = z_raw.to(tl.float32)
                y = y * (zt * tl.sigmoid(zt))
            tl.store(out_ptr + col_d + offs_t[:, None], y.to(out_ptr.dtype.element_ty), mask=m_td)
        # masked steps are identities, so the last row is the state after the last valid step
        h = tl.sum(tl.where(last, hs, 0.0), axis=0)

    tl.store(hend_ptr + st_base + nd_off, h, mask=mask_nd)
    if STATS_ONLY:
        tl.store(dtsum_ptr + (pid_b * n_chunks + pid_c) * dim + offs_d, dtsum, mask=mask_d)


# ---------------------------------------------------------------------------------------------
# Backward kernel
# ---------------------------------------------------------------------------------------------
# Tiles are [time, N1, channel, N2] with state n = n1 * N2 + n2.  Helpers reduce over states
# (axes 1 and 3) or channels (axis 2).


@triton.jit
def _sum_n(x):
    return tl.sum(tl.sum(x, axis=1), axis=2)


@triton.jit
def _bwd_loads(
    u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, ckpt_ptr, col_d, col_n, ck_nd, ck_stride, mask_nd,
    t0, t_start, t_end, t_idx, mask_d, mask_n,
    HAS_Z: tl.constexpr, STATS_ONLY: tl.constexpr, CK: tl.constexpr,
):  # fmt: skip
    """One backward tile's inputs in storage dtypes: delta, dout, z, u (L, D); C, B (L, N1, N2); h0."""
    offs_t = t0 + t_idx
    mask_t = (offs_t >= t_start) & (offs_t < t_end)
    m_td = mask_t[:, None] & mask_d[None, :]
    m_tn = mask_t[:, None, None] & mask_n[None, :, :]
    dl = tl.load(delta_ptr + col_d + offs_t[:, None], mask=m_td, other=0.0)
    dout = tl.load(dout_ptr + col_d + offs_t[:, None], mask=m_td, other=0.0)
    Ct = tl.load(C_ptr + col_n + offs_t[:, None, None], mask=m_tn, other=0.0)
    if HAS_Z:
        zt = tl.load(z_ptr + col_d + offs_t[:, None], mask=m_td, other=0.0)
    else:
        zt = dout
    if STATS_ONLY:
        u = dout
        Bt = Ct
        h0 = tl.zeros(mask_nd.shape, dtype=tl.float32)
    else:
        u = tl.load(u_ptr + col_d + offs_t[:, None], mask=m_td, other=0.0)
        Bt = tl.load(B_ptr + col_n + offs_t[:, None, None], mask=m_tn, other=0.0)
        h_ok = mask_nd & ((ck_nd * 0 + t0) >= t_start)  # no tile before the chunk start
        h0 = tl.load(ckpt_ptr + (t0 // CK) * ck_stride + ck_nd, mask=h_ok, other=0.0)
    return dl, dout, zt, u, Ct, Bt, h0


@triton.autotune(
    configs=_bwd_configs(),
    key=["batch", "dim", "seqlen", "dstate", "chunk_len", "HAS_Z", "ZOH", "STATS_ONLY"],
    prune_configs_by={"early_config_prune": _prune_bwd},
)
@triton.jit
def _bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    dout_ptr,
    ckpt_ptr,
    q_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dA_ptr,
    dD_ptr,
    dbias_ptr,
    dB_ptr,
    dC_ptr,
    qloc_ptr,
    dtsum_ptr,
    batch,
    dim,
    seqlen,
    dstate,
    chunk_len,
    n_ck,
    n_chunks,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    ZOH: tl.constexpr,
    STATS_ONLY: tl.constexpr,
    CK: tl.constexpr,
    BLOCK_N1: tl.constexpr,
    BLOCK_N2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    BLOCK_L: tl.constexpr = CK
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    n2 = tl.arange(0, BLOCK_N1)[:, None] * BLOCK_N2 + tl.arange(0, BLOCK_N2)[None, :]  # (N1, N2) state ids
    mask_n = n2 < dstate
    mask_nd = mask_n[:, None, :] & mask_d[None, :, None]  # (N1, D, N2)
    nd_off = offs_d[None, :, None] * dstate + n2[:, None, :]
    t_idx = tl.arange(0, BLOCK_L)
    first = t_idx[:, None, None, None] == 0
    last = t_idx[:, None, None, None] == BLOCK_L - 1

    A = tl.load(A_ptr + nd_off, mask=mask_nd, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    A_inv = 1.0 / tl.where(mask_nd, A, 1.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        Dv = tl.zeros([BLOCK_D], dtype=tl.float32)

    st_base = (pid_b * n_chunks + pid_c) * dim * dstate
    vec_off = (pid_b * n_chunks + pid_c) * dim + offs_d
    # q = a_t * dL/dh_t at the first step after the tile (for the chunk's last tile: from after the chunk)
    if STATS_ONLY:
        q_carry = tl.zeros([BLOCK_N1, BLOCK_D, BLOCK_N2], dtype=tl.float32)
    else:
        q_carry = tl.load(q_ptr + st_base + nd_off, mask=mask_nd, other=0.0)
    dA_acc = tl.zeros([BLOCK_N1, BLOCK_D, BLOCK_N2], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dtsum = tl.zeros([BLOCK_D], dtype=tl.float32)
    ones = tl.full([BLOCK_L, BLOCK_N1, BLOCK_D, BLOCK_N2], 1.0, dtype=tl.float32)

    col_d = pid_b * dim * seqlen + offs_d[None, :].to(tl.int64) * seqlen  # (1, D)
    col_n = pid_b * dstate * seqlen + n2[None, :, :] * seqlen  # (1, N1, N2)
    col_part = ((pid_d * batch + pid_b) * dstate + n2[None, :, :]) * seqlen  # dB/dC partial rows
    ck_nd = pid_b * n_ck * dim * dstate + nd_off
    t_start = pid_c * chunk_len
    t_end = tl.minimum(t_start + chunk_len, seqlen)
    n_tiles = tl.cdiv(t_end - t_start, BLOCK_L)
    t_last = t_start + (n_tiles - 1) * BLOCK_L

    nxt = _bwd_loads(
        u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, ckpt_ptr, col_d, col_n, ck_nd, dim * dstate, mask_nd,
        t_last, t_start, t_end, t_idx, mask_d, mask_n, HAS_Z, STATS_ONLY, CK,
    )  # fmt: skip
    for i in range(0, n_tiles):
        dl_raw, dout_raw, z_raw, u_raw, C_raw, B_raw, h0 = nxt
        t0 = t_last - i * BLOCK_L
        offs_t = t0 + t_idx
        m_td = (offs_t < t_end)[:, None] & mask_d[None, :]
        m_tn = (offs_t < t_end)[:, None, None] & mask_n[None, :, :]
        nxt = _bwd_loads(
            u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, ckpt_ptr, col_d, col_n, ck_nd, dim * dstate, mask_nd,
            t0 - BLOCK_L, t_start, t_end, t_idx, mask_d, mask_n, HAS_Z, STATS_ONLY, CK,
        )  # fmt: skip

        dt = _step_size(dl_raw, bias, m_td, HAS_BIAS, SOFTPLUS)  # (L, D)
        dt4 = dt[:, None, :, None]
        a = tl.exp2(dt4 * A2[None, :, :, :])  # (L, N1, D, N2)
        Ct = C_raw.to(tl.float32)[:, :, None, :]
        dout = dout_raw.to(tl.float32)
        if HAS_Z:
            zt = z_raw.to(tl.float32)
            sz = tl.sigmoid(zt)
            dy = dout * (zt * sz)
        else:
            dy = dout
        dy4 = dy[:, None, :, None]
        w = Ct * dy4
        # reverse scan of q_t = a_t * (w_t + q_{t+1}) seeded with the carry at the tile's last step, run
        # as a forward scan over the time-flipped tile (tl.flip of an in-thread axis is free, unlike
        # reverse=True, which Triton lowers with lane shuffles); the exclusive part gives q_{t+1}
        a_f = tl.flip(a, 0)
        aw_f = tl.flip(a * w, 0)
        aw_f = tl.where(first, aw_f + a_f * q_carry[None, :, :, :], aw_f)
        if STATS_ONLY:
            _, q_f = tl.associative_scan((a_f, aw_f), axis=0, combine_fn=_combine)
            dtsum += tl.sum(dt, axis=0)
        else:
            d0 = tl.where(first, q_carry[None, :, :, :], 0.0)
            _, q_f, _, qn_f = tl.associative_scan((a_f, aw_f, ones, d0), axis=0, combine_fn=_combine_excl)
            g = w + tl.flip(qn_f, 0)  # g_t = dL/dh_t = w_t + q_{t+1}

            # recompute the forward states of this tile from its checkpoint
            u = u_raw.to(tl.float32)
            u4 = u[:, None, :, None]
            Bt = B_raw.to(tl.float32)[:, :, None, :]
            if ZOH:
                coef = (a - 1.0) * A_inv[None, :, :, :]
                b = coef * (Bt * u4)
            else:
                b = Bt * (dt * u)[:, None, :, None]
            bs = tl.where(first, a * h0[None, :, :, :] + b, b)
            _, hs = tl.associative_scan((a, bs), axis=0, combine_fn=_combine)

            ga = g * (hs - b)  # = g_t * a_t * h_{t-1} = a_t * dL/da_t
            gB = g * Bt
            if ZOH:
                rho = gB * u4
                ddt = _sum_n(ga * A[None, :, :, :] + rho * a)
                du = _sum_n(gB * coef) + dy * Dv[None, :]
                dA_acc += tl.sum(ga * dt4 + rho * (dt4 * a - coef) * A_inv[None, :, :, :], axis=0)
                dBt = tl.sum(g * coef * u4, axis=2)
            else:
                gBs = _sum_n(gB)
                ddt = _sum_n(ga * A[None, :, :, :]) + u * gBs
                du = dt * gBs + dy * Dv[None, :]
                dA_acc += tl.sum(ga * dt4, axis=0)
                dBt = tl.sum(g * (dt * u)[:, None, :, None], axis=2)
            dCt = tl.sum(hs * dy4, axis=2)  # (L, N1, N2)
            dD_acc += tl.sum(dy * u, axis=0)
            if SOFTPLUS:
                pre = dl_raw.to(tl.float32)
                if HAS_BIAS:
                    pre = pre + bias[None, :]
                ddt = ddt * tl.sigmoid(pre)
            ddt = tl.where(m_td, ddt, 0.0)
            dbias_acc += tl.sum(ddt, axis=0)
            if HAS_Z:
                yfull = _sum_n(hs * Ct) + u * Dv[None, :]
                dz = dout * yfull * sz * (1.0 + zt * (1.0 - sz))
                tl.store(dz_ptr + col_d + offs_t[:, None], dz.to(dz_ptr.dtype.element_ty), mask=m_td)
            tl.store(du_ptr + col_d + offs_t[:, None], du.to(du_ptr.dtype.element_ty), mask=m_td)
            tl.store(ddelta_ptr + col_d + offs_t[:, None], ddt.to(ddelta_ptr.dtype.element_ty), mask=m_td)
            tl.store(dB_ptr + col_part + offs_t[:, None, None], dBt, mask=m_tn)
            tl.store(dC_ptr + col_part + offs_t[:, None, None], dCt, mask=m_tn)
        q_carry = tl.sum(tl.where(last, q_f, 0.0), axis=0)  # q at the tile's first step

    if STATS_ONLY:
        tl.store(qloc_ptr + st_base + nd_off, q_carry, mask=mask_nd)
        tl.store(dtsum_ptr + vec_off, dtsum, mask=mask_d)
    else:
        tl.store(dA_ptr + st_base + nd_off, dA_acc, mask=mask_nd)
        tl.store(dD_ptr + vec_off, dD_acc, mask=mask_d)
        tl.store(dbias_ptr + vec_off, dbias_acc, mask=mask_d)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _plan_chunks(batch: int, dim: int, seqlen: int, ck: int, seq_chunks: int | None, device: torch.device) -> int:
    """Sequence chunk length (a multiple of ``ck``); ``>= seqlen`` means no split."""
    n_ck = _cdiv(seqlen, ck)
    if seq_chunks is not None:
        want = max(1, int(seq_chunks))
    elif _INTERPRET or device.type != "cuda":
        want = 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = batch * _cdiv(dim, 32)  # nominal channel block
        target = 2 * sms
        # keep chunks at least 4 backward tiles long
        want = 1 if programs >= target else max(1, min(_cdiv(target, programs), n_ck // 4))
    return _cdiv(n_ck, want) * ck


class _Setup:
    """Shapes, flags and launch arguments shared by the forward and backward launches."""

    def __init__(
        self,
        u: Tensor,
        A: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        delta_softplus: bool,
        zoh: bool,
        seq_chunks: int | None,
    ) -> None:
        self.batch, self.dim, self.seqlen = u.shape
        self.dstate = A.shape[1]
        self.block_n = max(triton.next_power_of_2(self.dstate), 2)
        self.ck = _ckpt_len(self.block_n)
        self.chunk_len = _plan_chunks(self.batch, self.dim, self.seqlen, self.ck, seq_chunks, u.device)
        self.n_chunks = _cdiv(self.seqlen, self.chunk_len)
        self.n_ck = _cdiv(self.seqlen, self.ck)
        self.flags = {
            "HAS_D": D is not None,
            "HAS_Z": z is not None,
            "HAS_BIAS": delta_bias is not None,
            "SOFTPLUS": bool(delta_softplus),
            "ZOH": zoh,
        }

    def sizes(self) -> dict[str, int]:
        return {
            "batch": self.batch,
            "dim": self.dim,
            "seqlen": self.seqlen,
            "dstate": self.dstate,
            "chunk_len": self.chunk_len,
            "n_ck": self.n_ck,
            "n_chunks": self.n_chunks,
        }

    def grid(self, n_chunks: int) -> Any:
        batch, dim = self.batch, self.dim
        return lambda meta: (triton.cdiv(dim, meta["BLOCK_D"]), batch, n_chunks)


def _forward(
    s: _Setup,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    need_ckpt: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Returns (out, last_state, checkpoints); no checkpoints when no backward can follow."""
    f32: dict[str, Any] = dict(device=u.device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    out = torch.empty_like(u)
    ckpt = torch.empty(s.batch, s.n_ck, s.dim, s.dstate, **f32) if need_ckpt else dummy
    hend = torch.empty(s.batch, s.n_chunks, s.dim, s.dstate, **f32)
    common = dict(
        u_ptr=u,
        delta_ptr=delta,
        A_ptr=A,
        B_ptr=B,
        C_ptr=C,
        D_ptr=D if D is not None else dummy,
        z_ptr=z if z is not None else dummy,
        bias_ptr=delta_bias if delta_bias is not None else dummy,
        **s.sizes(),
        **s.flags,
        CK=s.ck,
        BLOCK_N=s.block_n,
    )
    hinit = dummy
    if s.n_chunks > 1:
        # pass 1: each chunk from a zero state -> local end state and sum of dt
        hloc = torch.empty(s.batch, s.n_chunks, s.dim, s.dstate, **f32)
        dtsum = torch.empty(s.batch, s.n_chunks, s.dim, **f32)
        _fwd_kernel[s.grid(s.n_chunks)](
            out_ptr=out, ckpt_ptr=ckpt, hinit_ptr=dummy, hend_ptr=hloc, dtsum_ptr=dtsum,
            STATS_ONLY=True, WRITE_CKPT=False, HAS_HINIT=False, **common,
        )  # fmt: skip
        # pass 2: carry the states across chunks (short, sequential, deterministic)
        decay = torch.exp(A.float()[None, None] * dtsum[..., None])  # (batch, n_chunks, dim, N)
        hinit = torch.zeros_like(hloc)
        for c in range(1, s.n_chunks):
            hinit[:, c] = decay[:, c - 1] * hinit[:, c - 1] + hloc[:, c - 1]
    # pass 3 (the only pass without a split): outputs, checkpoints, end states
    _fwd_kernel[s.grid(s.n_chunks)](
        out_ptr=out, ckpt_ptr=ckpt, hinit_ptr=hinit, hend_ptr=hend, dtsum_ptr=dummy,
        STATS_ONLY=False, WRITE_CKPT=need_ckpt, HAS_HINIT=s.n_chunks > 1, **common,
    )  # fmt: skip
    return out, hend[:, -1].contiguous(), ckpt if need_ckpt else None


def _backward(
    s: _Setup,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    ckpt: Tensor,
    dout: Tensor,
    dlast: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), all reduced, in fp32 or the input dtypes."""
    f32: dict[str, Any] = dict(device=u.device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else dummy
    part_state = torch.empty(s.batch, s.n_chunks, s.dim, s.dstate, **f32)
    part_vec = (torch.empty(s.batch, s.n_chunks, s.dim, **f32), torch.empty(s.batch, s.n_chunks, s.dim, **f32))
    rows_max = _cdiv(s.dim, _BWD_BLOCK_D_MIN)
    dB_part = torch.empty(rows_max, s.batch, s.dstate, s.seqlen, **f32)
    dC_part = torch.empty(rows_max, s.batch, s.dstate, s.seqlen, **f32)
    common = dict(
        u_ptr=u,
        delta_ptr=delta,
        A_ptr=A,
        B_ptr=B,
        C_ptr=C,
        D_ptr=D if D is not None else dummy,
        z_ptr=z if z is not None else dummy,
        bias_ptr=delta_bias if delta_bias is not None else dummy,
        dout_ptr=dout,
        ckpt_ptr=ckpt,
        du_ptr=du,
        ddelta_ptr=ddelta,
        dz_ptr=dz,
        dA_ptr=part_state,
        dD_ptr=part_vec[0],
        dbias_ptr=part_vec[1],
        dB_ptr=dB_part,
        dC_ptr=dC_part,
        **s.sizes(),
        **s.flags,
        CK=s.ck,
        BLOCK_N1=s.block_n // _bwd_lanes_n(s.block_n),
        BLOCK_N2=_bwd_lanes_n(s.block_n),
    )
    dlast = dlast.float().contiguous()
    if s.n_chunks > 1:
        # pass 1: per chunk, q = a_s * dL/dh_s at its first step s from a zero carry, and sum of dt
        qloc = torch.empty(s.batch, s.n_chunks, s.dim, s.dstate, **f32)
        dtsum = torch.empty(s.batch, s.n_chunks, s.dim, **f32)
        _bwd_kernel[s.grid(s.n_chunks)](q_ptr=dummy, qloc_ptr=qloc, dtsum_ptr=dtsum, STATS_ONLY=True, **common)
        # pass 2: q[c] = what flows into chunk c's last step from after it (a_e * dL/dh_e, e = next start)
        decay = torch.exp(A.float()[None, None] * dtsum[..., None])
        q = torch.empty_like(qloc)
        q[:, -1] = dlast
        for c in range(s.n_chunks - 2, -1, -1):
            q[:, c] = qloc[:, c + 1] + decay[:, c + 1] * q[:, c + 1]
    else:
        q = dlast[:, None]
    # pass 3: every gradient
    _bwd_kernel[s.grid(s.n_chunks)](q_ptr=q, qloc_ptr=dummy, dtsum_ptr=dummy, STATS_ONLY=False, **common)
    rows = _cdiv(s.dim, _bwd_kernel.best_config.kwargs["BLOCK_D"])
    dA = part_state.sum(dim=(0, 1))
    dB = dB_part[:rows].sum(dim=0)
    dC = dC_part[:rows].sum(dim=0)
    dD = part_vec[0].sum(dim=(0, 1)) if D is not None else None
    dbias = part_vec[1].sum(dim=(0, 1)) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz if z is not None else None, dbias


def _on_device(t: Tensor) -> Any:
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        delta_softplus: bool,
        zoh: bool,
        seq_chunks: int | None,
        need_ckpt: bool,
    ) -> tuple[Tensor, Tensor]:
        s = _Setup(u, A, D, z, delta_bias, delta_softplus, zoh, seq_chunks)
        with _on_device(u):
            out, last_state, ckpt = _forward(s, u, delta, A, B, C, D, z, delta_bias, need_ckpt)
        ctx.setup = s
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        return out, last_state

    @staticmethod
    def backward(ctx: Any, dout: Tensor, dlast: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        if ckpt is None:
            raise ScanError("triton scan: backward through a forward that ran without grad enabled")
        with _on_device(u):
            du, ddelta, dA, dB, dC, dD, dz, dbias = _backward(
                ctx.setup, u, delta, A, B, C, D, z, delta_bias, ckpt, dout.contiguous(), dlast
            )

        def cast(g: Tensor | None, like: Tensor | None) -> Tensor | None:
            return None if g is None or like is None else g.to(like.dtype)

        return (
            du,
            ddelta,
            cast(dA, A),
            cast(dB, B),
            cast(dC, C),
            cast(dD, D),
            dz,
            cast(dbias, delta_bias),
            None,
            None,
            None,
            None,
        )


def selective_scan_triton(
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
    *,
    seq_chunks: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Selective scan on Triton kernels; returns ``(out, last_state)`` like the reference.

    ``out`` has ``u``'s dtype, ``last_state`` is fp32 ``(batch, dim, N)``.  Inputs may be fp32 or
    bf16/fp16; all arithmetic is fp32.  ``seq_chunks`` forces the sequence split into about that
    many chunks (``None``: automatic, only when ``batch * channel blocks`` is too small for the GPU).
    Needs CUDA tensors, or ``TRITON_INTERPRET=1`` set before this module is imported.
    """
    disc = str(discretization)
    if disc not in ("euler", "zoh"):
        raise ScanError(f"unknown discretization {discretization!r}; choose 'euler' or 'zoh'")
    if u.device.type != "cuda" and not _INTERPRET:
        raise ScanError(
            "the triton scan backend needs CUDA tensors (or TRITON_INTERPRET=1 set before import); "
            "use backend='torch' on CPU"
        )
    if seq_chunks is not None and seq_chunks < 1:
        raise ScanError(f"seq_chunks must be a positive integer; got {seq_chunks}")
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    D, z, delta_bias = (None if t is None else t.contiguous() for t in (D, z, delta_bias))
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    need_ckpt = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _SelectiveScanTriton.apply(*tensors, delta_softplus, disc == "zoh", seq_chunks, need_ckpt)


__all__ = ["selective_scan_triton"]
