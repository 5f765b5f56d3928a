"""Mamba-1 language model in PyTorch, with mamba_ssm parameter names and shapes.

Layout (mamba_ssm names)::

    backbone.embedding.weight                       (vocab, d_model)
    backbone.layers.{i}.norm.weight                 (d_model,)            RMSNorm before the mixer
    backbone.layers.{i}.mixer.in_proj.weight        (2*d_inner, d_model)  rows: x then gate z
    backbone.layers.{i}.mixer.conv1d.weight/.bias   (d_inner, 1, d_conv) / (d_inner,)
    backbone.layers.{i}.mixer.x_proj.weight         (dt_rank + 2*d_state, d_inner)  rows: dt, B, C
    backbone.layers.{i}.mixer.dt_proj.weight/.bias  (d_inner, dt_rank) / (d_inner,)  bias = dt_bias
    backbone.layers.{i}.mixer.A_log                 (d_inner, d_state)
    backbone.layers.{i}.mixer.D                     (d_inner,)
    backbone.layers.{i}.mixer.out_proj.weight       (d_model, d_inner)
    backbone.norm_f.weight                          (d_model,)
    lm_head.weight                                  (vocab, d_model)   (tied to the embedding if asked)

The one documented difference: ``x_proj`` keeps its three row blocks as three parameters,
``x_proj.weight_dt``, ``x_proj.weight_B`` and ``x_proj.weight_C``, because µP-SSM gives them
different init scales and learning rates and an optimizer needs separate tensors for
separate LRs.  ``x_proj.weight`` (mamba_ssm) == cat([weight_dt, weight_B, weight_C], dim=0).
:func:`to_mamba_ssm_state_dict` and :meth:`MambaLM.load_mamba_ssm_state_dict` apply that
mapping (and accept the transformers spelling ``backbone.embeddings``).

With ``arch: mamba2`` each mixer is mamba_ssm's ``Mamba2`` (SSD; Dao & Gu 2024), same names::

    backbone.layers.{i}.mixer.in_proj.weight        (2*d_inner + 2*ngroups*d_state + nheads, d_model)
                                                    rows: z, x, B, C, dt
    backbone.layers.{i}.mixer.conv1d.weight/.bias   (conv_dim, 1, d_conv) / (conv_dim,)
                                                    conv_dim = d_inner + 2*ngroups*d_state: x, B, C
    backbone.layers.{i}.mixer.dt_bias               (nheads,)
    backbone.layers.{i}.mixer.A_log                 (nheads,)     A_h = -exp(A_log_h), one per head
    backbone.layers.{i}.mixer.D                     (nheads,)
    backbone.layers.{i}.mixer.norm.weight           (d_inner,)    gated RMSNorm, ngroups norm groups
    backbone.layers.{i}.mixer.out_proj.weight       (d_model, d_inner)

where nheads = d_inner / headdim.  Here ``in_proj`` keeps its five row blocks as five parameters
(``in_proj.weight_z``, ``weight_x``, ``weight_B``, ``weight_C``, ``weight_dt``) for the same
reason as ``x_proj``; ``in_proj.weight`` (mamba_ssm) == their concatenation in that order.

Forward multipliers (µP) are plain Python floats on the modules, set by
:mod:`mupt.parametrization`; nothing is attached to tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mupt.config import Arch, ModelConfig, Role
from mupt.errors import CheckpointError
from mupt.scan import selective_scan, ssd_scan

SUFFIX_ROLES: tuple[tuple[str, Role], ...] = (
    ("backbone.embedding.weight", Role.EMBEDDING),
    ("lm_head.weight", Role.LM_HEAD),
    ("norm.weight", Role.NORM),
    ("norm_f.weight", Role.NORM),
    ("mixer.in_proj.weight", Role.IN_PROJ),
    ("mixer.conv1d.weight", Role.CONV_WEIGHT),
    ("mixer.conv1d.bias", Role.CONV_BIAS),
    ("mixer.x_proj.weight_dt", Role.X_PROJ_DT),
    ("mixer.x_proj.weight_B", Role.X_PROJ_B),
    ("mixer.x_proj.weight_C", Role.X_PROJ_C),
    ("mixer.dt_proj.weight", Role.DT_PROJ),
    ("mixer.dt_proj.bias", Role.DT_BIAS),
    ("mixer.A_log", Role.A_LOG),
    ("mixer.D", Role.D),
    ("mixer.out_proj.weight", Role.OUT_PROJ),
)


SUFFIX_ROLES_MAMBA2: tuple[tuple[str, Role], ...] = (
    ("backbone.embedding.weight", Role.EMBEDDING),
    ("lm_head.weight", Role.LM_HEAD),
    ("mixer.norm.weight", Role.GATED_NORM),
    ("norm.weight", Role.NORM),
    ("norm_f.weight", Role.NORM),
    ("mixer.in_proj.weight_z", Role.IN_PROJ_Z),
    ("mixer.in_proj.weight_x", Role.IN_PROJ_X),
    ("mixer.in_proj.weight_B", Role.IN_PROJ_B),
    ("mixer.in_proj.weight_C", Role.IN_PROJ_C),
    ("mixer.in_proj.weight_dt", Role.IN_PROJ_DT),
    ("mixer.conv1d.weight", Role.CONV_WEIGHT),
    ("mixer.conv1d.bias", Role.CONV_BIAS),
    ("mixer.dt_bias", Role.DT_BIAS),
    ("mixer.A_log", Role.A_LOG_HEAD),
    ("mixer.D", Role.D),
    ("mixer.out_proj.weight", Role.OUT_PROJ),
)


#: The roles each architecture's parameters have (every Role belongs to at least one).
ARCH_ROLES: dict[Arch, frozenset[Role]] = {
    Arch.MAMBA1: frozenset(r for _, r in SUFFIX_ROLES),
    Arch.MAMBA2: frozenset(r for _, r in SUFFIX_ROLES_MAMBA2),
}


def role_of(name: str, arch: Arch | str = Arch.MAMBA1) -> Role:
    """The role of a parameter by its (mupt) name in an ``arch`` model; KeyError for an unknown name.

    The first matching suffix wins (mamba2's ``mixer.norm.weight``, the gated norm, precedes the
    block's pre-norm ``norm.weight``).
    """
    table = SUFFIX_ROLES_MAMBA2 if Arch(arch) is Arch.MAMBA2 else SUFFIX_ROLES
    for suffix, role in table:
        if name == suffix or name.endswith("." + suffix):
            return role
    raise KeyError(f"parameter {name!r} has no width-rule role")


class XProj(nn.Module):
    """mamba_ssm's fused ``x_proj`` as three row blocks (dt, B, C), each its own parameter."""

    def __init__(self, d_inner: int, dt_rank: int, d_state: int) -> None:
        super().__init__()
        self.weight_dt = nn.Parameter(torch.empty(dt_rank, d_inner))
        self.weight_B = nn.Parameter(torch.empty(d_state, d_inner))
        self.weight_C = nn.Parameter(torch.empty(d_state, d_inner))
        self.mult_dt = 1.0
        self.mult_B = 1.0
        self.mult_C = 1.0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (
            F.linear(x, self.weight_dt) * self.mult_dt,
            F.linear(x, self.weight_B) * self.mult_B,
            F.linear(x, self.weight_C) * self.mult_C,
        )


class MambaMixer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        d_inner, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank_value
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, padding=cfg.d_conv - 1, bias=True)
        self.x_proj = XProj(d_inner, r, n)
        self.dt_proj = nn.Linear(r, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, n))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)
        self.mult_in = 1.0
        self.mult_dt_proj = 1.0
        self.mult_out = 1.0

    def forward(self, hidden: Tensor, probe: dict[str, Tensor] | None = None) -> Tensor:
        """hidden: (batch, length, d_model) -> (batch, length, d_model).

        With ``probe`` (a dict), records the SSM's last state ``x`` and pure SSM output
        ``y = C x`` (before the D skip and the gate) under ``layers.{i}.x`` / ``.y``.
        """
        length = hidden.shape[1]
        xz = self.in_proj(hidden) * self.mult_in
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, l) each
        x = F.silu(self.conv1d(x)[..., :length])
        dt_in, B, C = self.x_proj(x.transpose(1, 2))
        delta = (dt_in @ self.dt_proj.weight.t()).transpose(1, 2) * self.mult_dt_proj
        A = -torch.exp(self.A_log.float())
        kwargs = dict(
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            discretization=self.cfg.discretization,
            backend=self.cfg.scan_backend,
        )
        Bt, Ct = B.transpose(1, 2), C.transpose(1, 2)
        if probe is None:
            y, _ = selective_scan(x, delta, A, Bt, Ct, self.D.float(), z, **kwargs)  # type: ignore[arg-type]
        else:
            y_ssm, state = selective_scan(x, delta, A, Bt, Ct, None, None, **kwargs)  # type: ignore[arg-type]
            probe[f"layers.{self.layer_idx}.x"] = state.detach()
            probe[f"layers.{self.layer_idx}.y"] = y_ssm.detach()
            y = (y_ssm + x * self.D.float()[None, :, None]) * F.silu(z)
        return self.out_proj(y.transpose(1, 2)) * self.mult_out


class InProj2(nn.Module):
    """mamba_ssm Mamba2's fused ``in_proj`` as five row blocks (z, x, B, C, dt), each its own parameter.

    u (batch, length, d_model) -> (batch, length, 2*d_inner + 2*ngroups*d_state + nheads), the rows
    z, x, B, C, dt in mamba_ssm's order, as one matrix product over the concatenated blocks.
    ``mult[block]`` is the block's forward multiplier, folded into its rows here for every block but
    C: C's is applied by :class:`Mamba2Mixer` after conv1d and SiLU, where it scales the SSD's
    readout (docs/width_rules.md, section 9).
    """

    BLOCKS = ("z", "x", "B", "C", "dt")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        gn = cfg.ngroups * cfg.d_state
        rows = {"z": cfg.d_inner, "x": cfg.d_inner, "B": gn, "C": gn, "dt": cfg.nheads}
        for block, n in rows.items():
            self.register_parameter("weight_" + block, nn.Parameter(torch.empty(n, cfg.d_model)))
        self.mult = dict.fromkeys(self.BLOCKS, 1.0)

    def weights(self) -> list[Tensor]:
        return [getattr(self, "weight_" + b) for b in self.BLOCKS]

    def forward(self, u: Tensor) -> Tensor:
        ws = [
            w if self.mult[b] == 1.0 or b == "C" else w * self.mult[b]
            for b, w in zip(self.BLOCKS, self.weights(), strict=True)
        ]
        return F.linear(u, torch.cat(ws, dim=0))


class GatedRMSNorm(nn.Module):
    """mamba_ssm's ``RMSNormGated`` with ``norm_before_gate=False``: RMSNorm(y * silu(z)) * weight,
    normalised separately over each of ``ngroups`` contiguous channel groups of d_inner / ngroups."""

    def __init__(self, d_inner: int, ngroups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_inner))
        self.group_size = d_inner // ngroups
        self.eps = eps

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        """y, z (batch, length, d_inner) -> (batch, length, d_inner)."""
        h = y.float() * F.silu(z.float())
        g = h.view(*h.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view_as(h).to(y.dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer (mamba_ssm's ``Mamba2`` layout, SSD scan; Dao & Gu 2024, section 7).

    u -> in_proj -> [z, x, B, C, dt]; depthwise causal conv1d + SiLU over the x, B, C channels;
    dt = softplus(dt + dt_bias) per head; y = SSD(x, dt, A = -exp(A_log), B, C) + D * x;
    out_proj(GatedRMSNorm(y, z)).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        h, gn = cfg.nheads, cfg.ngroups * cfg.d_state
        self.conv_dim = cfg.d_inner + 2 * gn
        self.in_proj = InProj2(cfg)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, padding=cfg.d_conv - 1, bias=True
        )
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(h))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.ngroups, cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=False)
        self.mult_out = 1.0

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm Mamba2's init: Linear/Conv1d defaults, A ~ U[1, 16], log-uniform dt, D = 1,
        out_proj / sqrt(n_layers) (prenorm-residual rescale)."""
        cfg = self.cfg
        for block, w in zip(self.in_proj.BLOCKS, self.in_proj.weights(), strict=True):
            init_default(w, _IN_PROJ2_ROLES[block], cfg)
        init_default(self.conv1d.weight, Role.CONV_WEIGHT, cfg)
        assert self.conv1d.bias is not None
        init_default(self.conv1d.bias, Role.CONV_BIAS, cfg)
        self.dt_bias.copy_(init_dt_bias(cfg, cfg.nheads))
        self.A_log.copy_(torch.log(torch.empty(cfg.nheads).uniform_(1.0, 16.0)))
        nn.init.ones_(self.D)
        nn.init.ones_(self.norm.weight)
        init_default(self.out_proj.weight, Role.OUT_PROJ, cfg)  # includes the / sqrt(n_layers) rescale

    def forward(self, hidden: Tensor, probe: dict[str, Tensor] | None = None) -> Tensor:
        """hidden: (batch, length, d_model) -> (batch, length, d_model).

        With ``probe``, records the SSD's last state ``x`` as (batch, d_inner, d_state) and its pure
        output ``y`` (before the D skip and the gated norm) as (batch, d_inner, length).
        """
        cfg = self.cfg
        b, length, _ = hidden.shape
        gn = cfg.ngroups * cfg.d_state
        z, xBC, dt = torch.split(self.in_proj(hidden), [cfg.d_inner, self.conv_dim, cfg.nheads], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :length]).transpose(1, 2)
        x, B, C = torch.split(xBC, [cfg.d_inner, gn, gn], dim=-1)
        if self.in_proj.mult["C"] != 1.0:  # the readout multiplier acts on the SSD's C input
            C = C * self.in_proj.mult["C"]
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        xh = x.reshape(b, length, cfg.nheads, cfg.headdim)
        y, state = ssd_scan(
            xh,
            dt,
            A,
            B.reshape(b, length, cfg.ngroups, cfg.d_state),
            C.reshape(b, length, cfg.ngroups, cfg.d_state),
            chunk_size=cfg.chunk_size,
            backend=cfg.scan_backend,
            D=self.D if probe is None else None,  # fused into the scan unless the probe needs y without it
        )
        if probe is not None:
            probe[f"layers.{self.layer_idx}.x"] = state.detach().reshape(b, cfg.d_inner, cfg.d_state)
            probe[f"layers.{self.layer_idx}.y"] = y.detach().reshape(b, length, cfg.d_inner).transpose(1, 2)
            y = y + xh * self.D.to(y.dtype)[:, None]
        y = self.norm(y.reshape(b, length, cfg.d_inner), z)
        return self.out_proj(y) * self.mult_out


class Block(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer: MambaMixer | Mamba2Mixer = (
            Mamba2Mixer(cfg, layer_idx) if cfg.arch is Arch.MAMBA2 else MambaMixer(cfg, layer_idx)
        )

    def forward(self, hidden: Tensor, probe: dict[str, Tensor] | None = None) -> Tensor:
        out = self.mixer(self.norm(hidden), probe)
        if probe is not None:
            probe[f"layers.{self.mixer.layer_idx}.out"] = out.detach()
        return hidden + out


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mult_embedding = 1.0

    def forward(self, input_ids: Tensor, probe: dict[str, Tensor] | None = None) -> Tensor:
        h = self.embedding(input_ids) * self.mult_embedding
        for layer in self.layers:
            h = layer(h, probe)
        return self.norm_f(h)


class MambaLM(nn.Module):
    """Embedding, N blocks of RMSNorm + Mamba mixer with residual, final norm, LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.mult_output = 1.0
        #: init std each parameter was last rescaled to by :func:`mupt.parametrization.apply` (empty: the
        #: default init below), so a second ``apply`` rescales from there instead of compounding.
        self.init_stds: dict[str, float] = {}
        self.reset_parameters()

    def forward(self, input_ids: Tensor, probe: dict[str, Tensor] | None = None) -> Tensor:
        """input_ids (batch, length) -> logits (batch, length, vocab)."""
        logits = self.lm_head(self.backbone(input_ids, probe)) * self.mult_output
        if probe is not None:
            probe["logits"] = logits.detach()
        return logits

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's default init (uses the global torch RNG; seed before calling).

        Every rescalable role is drawn with the std :func:`default_init_std` gives (uniform, as
        nn.Linear / nn.Conv1d, or normal for the embedding); structured roles as mamba_ssm.
        """
        cfg = self.cfg
        self.init_stds.clear()
        init_default(self.backbone.embedding.weight, Role.EMBEDDING, cfg)
        if not cfg.tie_embeddings:
            init_default(self.lm_head.weight, Role.LM_HEAD, cfg)
        for norm in self._norms():
            nn.init.ones_(norm.weight)
        for layer in self.backbone.layers:
            if isinstance(layer.mixer, Mamba2Mixer):
                layer.mixer.reset_parameters()
                continue
            m: MambaMixer = layer.mixer  # type: ignore[assignment]
            init_default(m.in_proj.weight, Role.IN_PROJ, cfg)
            init_default(m.conv1d.weight, Role.CONV_WEIGHT, cfg)
            assert m.conv1d.bias is not None
            init_default(m.conv1d.bias, Role.CONV_BIAS, cfg)
            for w, role in ((m.x_proj.weight_dt, Role.X_PROJ_DT), (m.x_proj.weight_B, Role.X_PROJ_B),
                            (m.x_proj.weight_C, Role.X_PROJ_C)):  # fmt: skip
                init_default(w, role, cfg)
            init_default(m.dt_proj.weight, Role.DT_PROJ, cfg)
            m.dt_proj.bias.copy_(init_dt_bias(cfg, m.dt_proj.bias.shape[0]))
            m.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand_as(m.A_log))
            nn.init.ones_(m.D)
            init_default(m.out_proj.weight, Role.OUT_PROJ, cfg)

    def _norms(self) -> list[nn.RMSNorm]:
        return [layer.norm for layer in self.backbone.layers] + [self.backbone.norm_f]  # type: ignore[misc,return-value]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def load_mamba_ssm_state_dict(self, state: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load a mamba_ssm or transformers ``MambaForCausalLM`` state dict."""
        try:
            self.load_state_dict(from_mamba_ssm_state_dict(state, self.cfg), strict=strict)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[-1].strip()
            raise CheckpointError(f"state dict does not match this model config: {first}") from None


def init_dt_bias(cfg: ModelConfig, d_inner: int) -> Tensor:
    """softplus(dt_bias) log-uniform in [dt_min, dt_max] (floored), as in Mamba."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
    dt = dt.clamp(min=cfg.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus


_IN_PROJ2_ROLES = {"z": Role.IN_PROJ_Z, "x": Role.IN_PROJ_X, "B": Role.IN_PROJ_B, "C": Role.IN_PROJ_C,
                   "dt": Role.IN_PROJ_DT}  # fmt: skip


def init_default(w: Tensor, role: Role, cfg: ModelConfig) -> None:
    """Draw ``w`` in place from the role's default init: N(0, std^2) for the embedding, otherwise
    U(-b, b) with b = sqrt(3) std (nn.Linear / nn.Conv1d's distribution), std from :func:`default_init_std`.

    Raises ValueError for a structured role (it has its own init)."""
    std = default_init_std(role, cfg)
    if std is None:
        raise ValueError(f"role {role.value} has a structured init, not a default std")
    if role is Role.EMBEDDING:
        nn.init.normal_(w, std=std)
    else:
        bound = math.sqrt(3.0) * std  # U(-b, b) has std b/sqrt(3)
        nn.init.uniform_(w, -bound, bound)


def default_init_std(role: Role, cfg: ModelConfig) -> float | None:
    """Std of the default (mamba_ssm) init of a role's entries at shape ``cfg``; None for structured inits.

    The one home of the default init: :meth:`MambaLM.reset_parameters` draws with it and
    :func:`mupt.parametrization.apply` rescales relative to it.  Matrices and the depthwise conv use
    nn.Linear / nn.Conv1d's U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in); out_proj is
    further divided by sqrt(n_layers) (mamba_ssm's pre-norm residual rescale); the embedding is
    N(0, 0.02^2).  Norm weights (ones), dt_bias, A_log and D (and Mamba-2's gated norm and per-head
    A_log) are structured: None.
    """
    fan_in = {
        Role.IN_PROJ: cfg.d_model,
        Role.LM_HEAD: cfg.d_model,
        Role.X_PROJ_DT: cfg.d_inner,
        Role.X_PROJ_B: cfg.d_inner,
        Role.X_PROJ_C: cfg.d_inner,
        Role.OUT_PROJ: cfg.d_inner,
        Role.DT_PROJ: cfg.dt_rank_value,
        Role.CONV_WEIGHT: cfg.d_conv,
        Role.CONV_BIAS: cfg.d_conv,
        **{r: cfg.d_model for r in _IN_PROJ2_ROLES.values()},  # mamba2's in_proj row blocks
    }
    if role is Role.EMBEDDING:
        return 0.02
    if role not in fan_in:
        return None
    std = 1.0 / math.sqrt(3.0 * fan_in[role])
    return std / math.sqrt(cfg.n_layers) if role is Role.OUT_PROJ else std


def _split_sizes(cfg: ModelConfig) -> list[int]:
    return [cfg.dt_rank_value, cfg.d_state, cfg.d_state]


def _in_proj2_sizes(cfg: ModelConfig) -> list[int]:
    gn = cfg.ngroups * cfg.d_state
    return [cfg.d_inner, cfg.d_inner, gn, gn, cfg.nheads]


def to_mamba_ssm_state_dict(model: MambaLM) -> dict[str, Tensor]:
    """mupt state dict -> mamba_ssm names (fuses the x_proj, or mamba2's in_proj, row blocks)."""
    return to_mamba_ssm_names(model.state_dict())


def to_mamba_ssm_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A mupt-named state dict -> mamba_ssm names: ``x_proj.weight = cat([weight_dt, weight_B, weight_C])``
    (mamba2: ``in_proj.weight = cat`` of its row blocks)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("in_proj.weight_z"):
            stem = key[: -len("weight_z")]
            out[stem + "weight"] = torch.cat([state[stem + "weight_" + b] for b in InProj2.BLOCKS], dim=0)
        elif ".in_proj.weight_" in key:
            continue
        elif key.endswith("x_proj.weight_dt"):
            stem = key[: -len("weight_dt")]
            out[stem + "weight"] = torch.cat([value, state[stem + "weight_B"], state[stem + "weight_C"]], dim=0)
        elif key.endswith(("x_proj.weight_B", "x_proj.weight_C")):
            continue
        else:
            out[key] = value
    return out


def from_mamba_ssm_state_dict(state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """mamba_ssm / transformers names -> mupt names (splits x_proj.weight into dt, B, C rows)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.replace("backbone.embeddings.", "backbone.embedding.")
        if cfg.arch is Arch.MAMBA2 and key.endswith("mixer.in_proj.weight"):
            stem = key[: -len("weight")]
            sizes = _in_proj2_sizes(cfg)
            if value.shape[0] != sum(sizes):
                raise CheckpointError(
                    f"{key} has {value.shape[0]} rows but 2*d_inner + 2*ngroups*d_state + nheads = {sum(sizes)}; "
                    "use the checkpoint's own model config"
                )
            for block, part in zip(InProj2.BLOCKS, torch.split(value, sizes, dim=0), strict=True):
                out[stem + "weight_" + block] = part
        elif key.endswith("x_proj.weight"):
            stem = key[: -len("weight")]
            if value.shape[0] != sum(_split_sizes(cfg)):
                raise CheckpointError(
                    f"{key} has {value.shape[0]} rows but dt_rank + 2*d_state = {sum(_split_sizes(cfg))}; "
                    "use the checkpoint's own model config"
                )
            dt, B, C = torch.split(value, _split_sizes(cfg), dim=0)
            out[stem + "weight_dt"], out[stem + "weight_B"], out[stem + "weight_C"] = dt, B, C
        else:
            out[key] = value
    if cfg.tie_embeddings:
        out.setdefault("lm_head.weight", out["backbone.embedding.weight"])
    return out
