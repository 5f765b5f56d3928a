"""Chunked PyTorch SSD for CPU (and a GPU fallback): Mamba-2's scan in its block form.

Same semantics as :func:`mupt.scan.ssd_reference.ssd_reference`.  The length is cut into chunks
of ``chunk_size`` steps (the last one padded with ``dt = 0``, which neither decays nor feeds the
state); then, as in Dao & Gu, "Transformers are SSMs" (ICML 2024), section 6 (the SSD algorithm):

1. inside each chunk, the quadratic (attention-like) form
   ``y_l += sum_{s<=l} exp(a_l - a_s) (C_l . B_s) dt_s x_s`` with ``a`` the cumulative sum of
   ``dt * A`` in the chunk: one (chunk x chunk) score matrix per group, one decay mask per head;
2. each chunk's own end state ``sum_s exp(a_end - a_s) dt_s x_s B_s^T``;
3. state passing: a loop over chunks, ``S_{c+1} = exp(a_end_c) S_c + state_c``, in fp32;
4. the carried-in state's contribution ``y_l += exp(a_l) C_l . S_c``.

Everything runs in fp32 and under autograd (every op is a differentiable torch op, so all
gradients are exact).  Memory is linear in length: the score and decay tensors are
(batch, nheads, length, chunk_size) and the chunk-start states (batch, nchunks, nheads, headdim,
d_state).  B and C stay per group (never repeated per head): the scores are formed per group and
broadcast over the ``nheads / ngroups`` heads that share it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD; shapes as :func:`mupt.scan.ssd_reference.ssd_reference`.

    x (batch, length, nheads, headdim); dt (batch, length, nheads) > 0; A (nheads,) < 0;
    B, C (batch, length, ngroups, d_state); initial_state (batch, nheads, headdim, d_state) or None.
    Returns y (batch, length, nheads, headdim) in x's dtype and the fp32 last state
    (batch, nheads, headdim, d_state).  ``chunk_size`` changes speed, not the result.
    """
    batch, length, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    rep = nheads // ngroups
    q = chunk_size
    pad = (-length) % q
    nchunks = (length + pad) // q
    xf, dtf, Bf, Cf = x.float(), dt.float(), B.float(), C.float()
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    # layouts: c chunk, l/s position in chunk, g group, e head within group, p headdim, n state
    xdt = (xf * dtf[..., None]).view(batch, nchunks, q, ngroups, rep, headdim)
    Bc = Bf.view(batch, nchunks, q, ngroups, d_state)
    Cc = Cf.view(batch, nchunks, q, ngroups, d_state)
    a = (dtf * A.float()).view(batch, nchunks, q, ngroups, rep).permute(0, 1, 3, 4, 2)  # (b, c, g, e, l)
    acum = torch.cumsum(a, dim=-1)

    # 1. intra-chunk quadratic form
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    seg = (acum[..., :, None] - acum[..., None, :]).masked_fill(~causal, float("-inf"))
    decay = torch.exp(seg)  # (b, c, g, e, l, s)
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    y = torch.einsum("bcgels,bcgls,bcsgep->bclgep", decay, scores, xdt)

    # 2. each chunk's own end state
    to_end = torch.exp(acum[..., -1:] - acum)  # (b, c, g, e, l)
    chunk_states = torch.einsum("bclgn,bcgel,bclgep->bcgepn", Bc, to_end, xdt)

    # 3. state passing between chunks
    chunk_decay = torch.exp(acum[..., -1])  # (b, c, g, e)
    state = (
        initial_state.float().reshape(batch, ngroups, rep, headdim, d_state)
        if initial_state is not None
        else xf.new_zeros(batch, ngroups, rep, headdim, d_state)
    )
    starts = []
    for c in range(nchunks):
        starts.append(state)
        state = chunk_decay[:, c, ..., None, None] * state + chunk_states[:, c]
    start = torch.stack(starts, dim=1)  # (b, c, g, e, p, n)

    # 4. contribution of the carried-in state
    y = y + torch.einsum("bclgn,bcgepn,bcgel->bclgep", Cc, start, torch.exp(acum))
    y = y.reshape(batch, nchunks * q, nheads, headdim)[:, :length]
    return y.to(x.dtype), state.reshape(batch, nheads, headdim, d_state)
