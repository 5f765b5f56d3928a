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

Forward multipliers (µP) are plain Python floats on the modules, set by
:mod:`mupt.parametrization`; nothing is attached to tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mupt.config import ModelConfig
from mupt.errors import CheckpointError
from mupt.scan import selective_scan


class Role(StrEnum):
    """What a parameter is, for the width rules. Every parameter has exactly one."""

    EMBEDDING = "embedding"
    NORM = "norm"
    IN_PROJ = "in_proj"
    CONV_WEIGHT = "conv1d_weight"
    CONV_BIAS = "conv1d_bias"
    X_PROJ_DT = "x_proj_dt"
    X_PROJ_B = "x_proj_B"
    X_PROJ_C = "x_proj_C"
    DT_PROJ = "dt_proj"
    DT_BIAS = "dt_bias"
    A_LOG = "A_log"
    D = "D"
    OUT_PROJ = "out_proj"
    LM_HEAD = "lm_head"


_SUFFIX_ROLES: tuple[tuple[str, Role], ...] = (
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


def role_of(name: str) -> Role:
    """The role of a parameter by its (mupt) name; KeyError for an unknown name."""
    for suffix, role in _SUFFIX_ROLES:
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


class Block(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = MambaMixer(cfg, layer_idx)

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
        """mamba_ssm's default init (uses the global torch RNG; seed before calling)."""
        cfg = self.cfg
        self.init_stds.clear()
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        if not cfg.tie_embeddings:
            _linear_default(self.lm_head.weight)
        for norm in self._norms():
            nn.init.ones_(norm.weight)
        for layer in self.backbone.layers:
            m: MambaMixer = layer.mixer  # type: ignore[assignment]
            _linear_default(m.in_proj.weight)
            m.conv1d.reset_parameters()
            for w in (m.x_proj.weight_dt, m.x_proj.weight_B, m.x_proj.weight_C):
                _linear_default(w)
            nn.init.uniform_(m.dt_proj.weight, -(cfg.dt_rank_value**-0.5), cfg.dt_rank_value**-0.5)
            m.dt_proj.bias.copy_(init_dt_bias(cfg, m.dt_proj.bias.shape[0]))
            m.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand_as(m.A_log))
            nn.init.ones_(m.D)
            _linear_default(m.out_proj.weight)
            m.out_proj.weight.div_(math.sqrt(cfg.n_layers))  # mamba_ssm's prenorm-residual rescale

    def _norms(self) -> list[nn.RMSNorm]:
        return [layer.norm for layer in self.backbone.layers] + [self.backbone.norm_f]  # type: ignore[misc]

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


def _linear_default(w: Tensor) -> None:
    """nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))


def _split_sizes(cfg: ModelConfig) -> list[int]:
    return [cfg.dt_rank_value, cfg.d_state, cfg.d_state]


def to_mamba_ssm_state_dict(model: MambaLM) -> dict[str, Tensor]:
    """mupt state dict -> mamba_ssm names (fuses the x_proj row blocks)."""
    return to_mamba_ssm_names(model.state_dict())


def to_mamba_ssm_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A mupt-named state dict -> mamba_ssm names: ``x_proj.weight = cat([weight_dt, weight_B, weight_C])``."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("x_proj.weight_dt"):
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
        if key.endswith("x_proj.weight"):
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
