"""To and from the checkpoints other libraries load: transformers' ``MambaForCausalLM`` and mamba_ssm's
``MambaLMHeadModel`` directories, with every forward multiplier folded into the weights.

Export (:func:`export_run`): a mupt run (``mupt train`` run directory, ``mupt scale`` run directory,
or one DCP checkpoint of it, sharded by any number of processes) -> a directory that the other library
loads with no mupt code:

* ``hf``: ``config.json`` (transformers' ``MambaConfig``) + ``model.safetensors``, split into
  ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above ``max_shard_size``
  (written by ``huggingface_hub.save_torch_state_dict``, the function transformers' own
  ``save_pretrained`` uses);
* ``mamba_ssm``: its ``config.json`` (``MambaConfig`` dataclass fields, ``pad_vocab_size_multiple`` 1 so
  the vocab is not padded) + ``pytorch_model.bin`` (``torch.save`` of the state dict, what
  ``MambaLMHeadModel.save_pretrained`` writes).

Folding (:func:`fold_factors`, docs/width_rules.md "Export"): mupt keeps µP's forward multipliers as
plain floats on the modules; the other libraries have none.  A weight ``W`` used as ``c * (W x)`` is
written as ``c * W``.  Two cases need care: ``dt_proj``'s multiplier scales ``W x`` before the bias is
added (the scan adds ``dt_bias``), so only the weight is scaled; and a tied LM head shares the
embedding's tensor, so the embedding gets ``embedding_mult`` and the readout's multiplier divided by it
goes into ``norm_f``'s weight (RMSNorm's gain multiplies after normalising, so ``lm_head(c * norm_f(h))
== lm_head(norm_f'(h))`` with ``g' = c g``, exactly).

Both libraries compute B by Euler (``Δ B``).  A ZOH-B model (``(exp(ΔA)-1)/A B``) has no exact
conversion: the ratio between the two, ``(exp(Δ A) - 1) / (Δ A)``, depends on the input through Δ, so
no weight change reproduces it; such models are refused.

Import (:func:`read_pretrained`, :func:`init_from`): either directory format -> mupt's model config and
state dict; ``init_from`` loads one into a :class:`~mupt.train.Trainer` for continued pre-training.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mupt.config import Arch, Discretization, ModelConfig, OptimizerName, RunConfig, load_recipe, load_yaml
from mupt.errors import CheckpointError, ConfigError
from mupt.model import (
    Mamba2Mixer,
    MambaLM,
    MambaMixer,
    from_mamba_ssm_state_dict,
    to_mamba_ssm_names,
    to_mamba_ssm_state_dict,
)
from mupt.parametrization import Parametrized, Role, set_forward_multipliers

#: Weights written by ``mupt train`` (mupt names, forward multipliers folded in).
WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
MAMBA_SSM_WEIGHTS = "pytorch_model.bin"
#: Files of a prepared dataset's tokenizer that an export copies next to the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ExportFormat(StrEnum):
    """Directory layouts :func:`export_run` writes and :func:`read_pretrained` reads."""

    HF = "hf"  # transformers MambaForCausalLM: config.json + model.safetensors (sharded when large)
    MAMBA_SSM = "mamba_ssm"  # mamba_ssm MambaLMHeadModel: config.json + pytorch_model.bin


# --- folding ------------------------------------------------------------------------------------


def fold_factors(model: MambaLM) -> dict[str, float]:
    """Per parameter (mupt name): the factor that folds the model's forward multipliers into it.

    ``state[name] * factor`` run with every multiplier set to 1 computes the same logits as ``model``.
    Parameters without a multiplier get 1.0.  Tied embeddings: the embedding gets ``mult_embedding``,
    ``backbone.norm_f.weight`` gets ``mult_output / mult_embedding`` (see the module docstring).  Mamba-2's
    C multiplier (µP-SSM's 1/r_x, applied after conv1d and SiLU) has no weight to go into; it stays on the
    model (:func:`unfolded_c`).
    """
    factors = {name: 1.0 for name, _ in model.named_parameters(remove_duplicate=False)}
    emb, out = float(model.backbone.mult_embedding), float(model.mult_output)
    factors["backbone.embedding.weight"] = emb
    if model.cfg.tie_embeddings:
        factors["backbone.norm_f.weight"] = out / emb
        factors.pop("lm_head.weight", None)
    else:
        factors["lm_head.weight"] = out
    for i, layer in enumerate(model.backbone.layers):
        stem = f"backbone.layers.{i}.mixer."
        mixer = layer.mixer
        assert isinstance(mixer, (MambaMixer, Mamba2Mixer))
        factors[stem + "out_proj.weight"] = float(mixer.mult_out)
        if isinstance(mixer, Mamba2Mixer):  # in_proj row blocks z, x, B, dt (dt_bias is added after)
            for block, mult in mixer.in_proj.mult.items():
                if block != "C":  # C's multiplier acts after conv1d + SiLU: no weight carries it (unfolded_c)
                    factors[stem + "in_proj.weight_" + block] = float(mult)
            continue
        factors[stem + "in_proj.weight"] = float(mixer.mult_in)
        factors[stem + "dt_proj.weight"] = float(mixer.mult_dt_proj)  # not the bias: the scan adds it after
        factors[stem + "x_proj.weight_dt"] = float(mixer.x_proj.mult_dt)
        factors[stem + "x_proj.weight_B"] = float(mixer.x_proj.mult_B)
        factors[stem + "x_proj.weight_C"] = float(mixer.x_proj.mult_C)
    return factors


def folded_native(model: MambaLM) -> dict[str, Tensor]:
    """mupt-named fp32 CPU copies of the weights with the forward multipliers folded in (model untouched).

    Tied models: ``lm_head.weight`` is the same tensor object as ``backbone.embedding.weight``.
    """
    factors = fold_factors(model)
    native: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        native[name] = (p.detach().to("cpu", torch.float32) * factors[name]).contiguous()
    if model.cfg.tie_embeddings:
        native["lm_head.weight"] = native["backbone.embedding.weight"]
    return native


def folded_state_dict(model: MambaLM) -> dict[str, Tensor]:
    """:func:`folded_native` in mamba_ssm names (x_proj row blocks fused)."""
    out = to_mamba_ssm_names(folded_native(model))
    if model.cfg.tie_embeddings:
        out["lm_head.weight"] = out["backbone.embedding.weight"]
    return out


# --- configs of the other libraries -------------------------------------------------------------


def check_exportable(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` for a model config this module cannot write exactly (Mamba-1 with ZOH B)."""
    if cfg.arch is Arch.MAMBA1 and cfg.discretization.value != "euler":
        raise ConfigError(
            "this model discretizes B by ZOH, but transformers and mamba_ssm compute Euler B (Δ·B) and no weight "
            "change converts one into the other; tune, transfer and train with --discretization euler to export "
            "(the tuned LR belongs to the discretization)"
        )


def unfolded_c(model: MambaLM) -> float:
    """Mamba-2: the forward multiplier on C (after conv1d and SiLU; µP-SSM's 1/r_x when d_state is scaled from
    the base, docs/width_rules.md correction 4), 1.0 when there is none or for Mamba-1.

    Neither transformers' Mamba2 nor mamba_ssm's has a place for it (it is not linear in W_C), so
    :func:`write_pretrained` refuses a model where it is not 1.
    """
    mults = {
        float(layer.mixer.in_proj.mult["C"]) for layer in model.backbone.layers if isinstance(layer.mixer, Mamba2Mixer)
    }
    return next(iter(mults - {1.0}), 1.0)


def check_model_exportable(model: MambaLM) -> None:
    """:func:`check_exportable` plus what only the built model knows: Mamba-2's C multiplier must be 1."""
    check_exportable(model.cfg)
    c = unfolded_c(model)
    if c != 1.0:
        raise ConfigError(
            f"this Mamba-2 model multiplies C by {c:.4g} after its conv1d and SiLU (µP-SSM's 1/N_x for a d_state "
            "scaled from the base), which transformers' and mamba_ssm's Mamba2 cannot express; export a run whose "
            "d_state is the proxy's (mupt transfer without --to-state)"
        )


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """transformers ``MambaConfig`` (Mamba-1: Euler B, RMSNorm, no in/out bias) or ``Mamba2Config`` (Mamba-2:
    heads, groups, chunk size; the gated RMSNorm after the gate, as mupt's) keyword arguments for ``cfg``."""
    shared = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "state_size": cfg.d_state,
        "num_hidden_layers": cfg.n_layers,
        "expand": cfg.expand,
        "conv_kernel": cfg.d_conv,
        "time_step_min": cfg.dt_min,
        "time_step_max": cfg.dt_max,
        "time_step_floor": cfg.dt_init_floor,
        "use_bias": False,
        "use_conv_bias": True,
        "hidden_act": "silu",
        "layer_norm_epsilon": cfg.norm_eps,
        "residual_in_fp32": True,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.arch is Arch.MAMBA2:
        return {
            **shared,
            "num_heads": cfg.nheads,
            "head_dim": cfg.headdim,
            "n_groups": cfg.ngroups,
            "chunk_size": cfg.chunk_size,
            "rms_norm": True,
            "architectures": ["Mamba2ForCausalLM"],
        }
    return {**shared, "time_step_rank": cfg.dt_rank_value, "architectures": ["MambaForCausalLM"]}


def mamba_ssm_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """mamba_ssm's ``config.json`` (fields of its ``MambaConfig`` dataclass) for ``cfg``.

    ``pad_vocab_size_multiple`` is 1 so the embedding keeps ``vocab_size`` rows; mamba_ssm's
    RMSNorm epsilon is fixed at 1e-5 (its config has no field for it), so other values are refused.
    """
    if not math.isclose(cfg.norm_eps, 1e-5, rel_tol=1e-9):
        raise ConfigError(
            f"norm_eps={cfg.norm_eps:g} but mamba_ssm's MambaLMHeadModel always uses 1e-5; export --format hf instead"
        )
    if cfg.arch is Arch.MAMBA2:  # mamba_ssm's Mamba2 keyword arguments (mamba_ssm/modules/mamba2.py)
        ssm: dict[str, Any] = {
            "layer": "Mamba2", "d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand,
            "headdim": cfg.headdim, "ngroups": cfg.ngroups, "chunk_size": cfg.chunk_size, "dt_min": cfg.dt_min,
            "dt_max": cfg.dt_max, "dt_init_floor": cfg.dt_init_floor, "rmsnorm": True, "norm_before_gate": False,
            "conv_bias": True, "bias": False,
        }  # fmt: skip
    else:
        ssm = {
            "d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand, "dt_rank": cfg.dt_rank_value,
            "dt_min": cfg.dt_min, "dt_max": cfg.dt_max, "dt_init_floor": cfg.dt_init_floor, "conv_bias": True,
            "bias": False,
        }  # fmt: skip
    return {
        "d_model": cfg.d_model,
        "n_layer": cfg.n_layers,
        "vocab_size": cfg.vocab_size,
        "ssm_cfg": ssm,
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 1,
        "tie_embeddings": cfg.tie_embeddings,
    }


def _dt_rank(d_model: int, rank: Any) -> int | str:
    if rank in (None, "auto"):
        return "auto"
    value = int(rank)
    return "auto" if value == math.ceil(d_model / 16) else value


def model_config_from(config: dict[str, Any], where: str) -> tuple[ModelConfig, ExportFormat]:
    """mupt's ModelConfig (Euler B) from a transformers or mamba_ssm ``config.json`` dict."""
    try:
        if config.get("model_type") == "mamba2" or "Mamba2" in str(config.get("architectures", "")):
            d = int(config["hidden_size"])
            cfg = ModelConfig.model_validate(dict(
                arch=Arch.MAMBA2, d_model=d, n_layers=int(config["num_hidden_layers"]),
                d_state=int(config.get("state_size", 128)), d_conv=int(config.get("conv_kernel", 4)),
                expand=int(config.get("expand", 2)), headdim=int(config.get("head_dim", 64)),
                ngroups=int(config.get("n_groups", 1)), chunk_size=int(config.get("chunk_size", 256)),
                vocab_size=int(config["vocab_size"]), tie_embeddings=bool(config.get("tie_word_embeddings", True)),
                dt_min=float(config.get("time_step_min", 1e-3)), dt_max=float(config.get("time_step_max", 0.1)),
                dt_init_floor=float(config.get("time_step_floor", 1e-4)),
                norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
            ))  # fmt: skip
            if int(config.get("num_heads", cfg.nheads)) != cfg.nheads or config.get("use_bias", False):
                raise ConfigError(
                    f"{where}: num_heads != expand*hidden_size/head_dim or use_bias=true; not mupt's Mamba2"
                )
            return cfg, ExportFormat.HF
        if config.get("model_type") == "mamba" or "hidden_size" in config:
            if config.get("use_bias", False) or not config.get("use_conv_bias", True):
                raise ConfigError(f"{where}: use_bias=true or use_conv_bias=false has no counterpart in mupt's Mamba")
            if config.get("hidden_act", "silu") != "silu":
                raise ConfigError(f"{where}: hidden_act={config['hidden_act']!r}; mupt's Mamba uses silu")
            d = int(config["hidden_size"])
            cfg = ModelConfig.model_validate(dict(
                d_model=d, n_layers=int(config["num_hidden_layers"]), d_state=int(config.get("state_size", 16)),
                d_conv=int(config.get("conv_kernel", 4)), expand=int(config.get("expand", 2)),
                dt_rank=_dt_rank(d, config.get("time_step_rank")), vocab_size=int(config["vocab_size"]),
                discretization=Discretization.EULER, tie_embeddings=bool(config.get("tie_word_embeddings", True)),
                dt_min=float(config.get("time_step_min", 1e-3)), dt_max=float(config.get("time_step_max", 0.1)),
                dt_init_floor=float(config.get("time_step_floor", 1e-4)),
                norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
            ))  # fmt: skip
            return cfg, ExportFormat.HF
        if "d_model" in config and "n_layer" in config:
            ssm = dict(config.get("ssm_cfg") or {})
            if ssm.get("layer") == "Mamba2" and not (config.get("attn_layer_idx") or config.get("d_intermediate")):
                vocab, pad = int(config["vocab_size"]), int(config.get("pad_vocab_size_multiple", 1))
                cfg = ModelConfig.model_validate(dict(
                    arch=Arch.MAMBA2, d_model=int(config["d_model"]), n_layers=int(config["n_layer"]),
                    d_state=int(ssm.get("d_state", 128)), d_conv=int(ssm.get("d_conv", 4)),
                    expand=int(ssm.get("expand", 2)), headdim=int(ssm.get("headdim", 64)),
                    ngroups=int(ssm.get("ngroups", 1)), chunk_size=int(ssm.get("chunk_size", 256)),
                    vocab_size=vocab + (-vocab) % pad, tie_embeddings=bool(config.get("tie_embeddings", True)),
                    dt_min=float(ssm.get("dt_min", 1e-3)), dt_max=float(ssm.get("dt_max", 0.1)),
                    dt_init_floor=float(ssm.get("dt_init_floor", 1e-4)),
                ))  # fmt: skip
                return cfg, ExportFormat.MAMBA_SSM
            if ssm.get("layer", "Mamba1") != "Mamba1" or config.get("attn_layer_idx") or config.get("d_intermediate"):
                raise ConfigError(
                    f"{where}: only pure Mamba-1 and Mamba-2 models (no attention, no MLP) load into mupt"
                )
            if ssm.get("bias", False) or not ssm.get("conv_bias", True):
                raise ConfigError(f"{where}: bias=true or conv_bias=false has no counterpart in mupt's Mamba")
            d = int(config["d_model"])
            vocab = int(config["vocab_size"])
            pad = int(config.get("pad_vocab_size_multiple", 1))
            if vocab % pad:
                vocab += pad - vocab % pad
            cfg = ModelConfig.model_validate(dict(
                d_model=d, n_layers=int(config["n_layer"]), d_state=int(ssm.get("d_state", 16)),
                d_conv=int(ssm.get("d_conv", 4)), expand=int(ssm.get("expand", 2)),
                dt_rank=_dt_rank(d, ssm.get("dt_rank")), vocab_size=vocab, discretization=Discretization.EULER,
                tie_embeddings=bool(config.get("tie_embeddings", True)), dt_min=float(ssm.get("dt_min", 1e-3)),
                dt_max=float(ssm.get("dt_max", 0.1)), dt_init_floor=float(ssm.get("dt_init_floor", 1e-4)),
            ))  # fmt: skip
            return cfg, ExportFormat.MAMBA_SSM
    except (KeyError, TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        raise CheckpointError(f"{where}: not a usable Mamba config ({type(err).__name__}: {err})") from None
    raise CheckpointError(f"{where}: neither a transformers Mamba config nor a mamba_ssm one; pass a Mamba checkpoint")


# --- reading mupt runs ----------------------------------------------------------------------------


@dataclass
class LoadedRun:
    """A trained mupt model with its run config; ``model`` carries the run's forward multipliers."""

    cfg: RunConfig
    model: MambaLM
    source: Path
    step: int | None = None
    kind: str = ""  # "train" | "dcp"


def _build(cfg: RunConfig) -> MambaLM:
    from mupt.train import build_model

    model, _ = build_model(cfg, reinit=False)  # the multipliers come from the width rules + config
    return model.eval()


def load_run(path: str | Path) -> LoadedRun:
    """Load a ``mupt train`` run directory, a ``mupt scale`` run directory (its latest checkpoint) or one
    DCP checkpoint directory (``<run>/checkpoints/step_NNNNNN``, written by any number of processes).

    DCP checkpoints are read without a process group (``torch.distributed.checkpoint.load`` with
    ``no_dist``, only the model's entries), so a checkpoint sharded by N ranks loads in one process.
    Raises :class:`CheckpointError` for a missing, incomplete or corrupt checkpoint.
    """
    from mupt import launch

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run or checkpoint directory; pass a mupt train or scale run dir")
    if (path / launch.META).is_file():
        return _load_dcp(path, path.parent.parent / "recipe.yaml")
    if (path / "recipe.yaml").is_file():
        latest = launch.find_latest(path)
        if latest is None:
            raise CheckpointError(f"{path}: the scale run has no checkpoint yet; run mupt scale until it writes one")
        return _load_dcp(latest, path / "recipe.yaml")
    if (path / "config.yaml").is_file():
        weights = path / WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{path}: no {WEIGHTS}; it is written by mupt train at the end of the run")
        cfg = load_yaml(path / "config.yaml", RunConfig)
        model = _build(cfg)  # the rules' multipliers; the saved weights carry all but Mamba-2's C multiplier
        set_forward_multipliers(model, {Role.IN_PROJ_C: unfolded_c(model)})
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights))
            if cfg.model.tie_embeddings:
                state["lm_head.weight"] = state["backbone.embedding.weight"]
            model.load_state_dict(state, strict=True)
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as err:
            first = (str(err).strip().splitlines() or [""])[0][:160]
            raise CheckpointError(
                f"{weights} is corrupt or for another model ({first}); retrain or restore it"
            ) from None
        return LoadedRun(cfg, model, path, None, "train")
    raise CheckpointError(
        f"{path}: not a mupt run (no config.yaml, recipe.yaml or checkpoint meta.json); pass a run or checkpoint dir"
    )


def _load_dcp(ckpt: Path, recipe_path: Path) -> LoadedRun:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from mupt import launch

    if not recipe_path.is_file():
        raise CheckpointError(f"{ckpt}: no {recipe_path} next to it; export needs the run's recipe.yaml")
    recipe = load_recipe(recipe_path)
    meta = launch.read_meta(ckpt, recipe.run)  # complete files, same model as the recipe
    model = _build(recipe.run)
    state = {"model": get_model_state_dict(model)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
        set_model_state_dict(model, state["model"])
    except (Exception, CheckpointException) as err:  # DCP's is a BaseException with a multi-line message
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"checkpoint {ckpt} is corrupt or unreadable ({type(err).__name__}: {first}); use an older checkpoint"
        ) from None
    return LoadedRun(recipe.run, model, ckpt, int(meta["step"]), "dcp")


def save_weights(path: str | Path, model: MambaLM) -> None:
    """Write ``model``'s weights (mupt names, forward multipliers folded in, fp32) as safetensors, atomically.

    A tied LM head is not stored (safetensors refuses shared tensors); :func:`load_run` re-ties it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    state = folded_native(model)
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "mupt": "forward multipliers folded"})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- writing ------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What :func:`export_run` wrote."""

    out: Path
    format: ExportFormat
    files: list[str]
    params: int
    step: int | None
    source: Path
    folded: dict[str, float] = field(default_factory=dict)  # parameter -> factor, only those != 1
    tokenizer: str | None = None


def tokenizer_dir(cfg: RunConfig) -> Path | None:
    """The prepared dataset directory holding a ``tokenizer.json``, if the run's data has one."""
    src = Path(cfg.data.source)
    return src if src.is_dir() and (src / "tokenizer.json").is_file() else None


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; pass a new or empty directory")


def write_pretrained(
    model: MambaLM, out: str | Path, fmt: ExportFormat | str, max_shard_size: int | str = "5GB"
) -> list[str]:
    """Write ``model`` (multipliers folded) as ``fmt`` into the empty or new directory ``out``.

    Files are written into a temporary sibling directory that is renamed to ``out`` at the end, so an
    interrupted export leaves nothing half-written.  Returns the file names.
    Raises :class:`ConfigError` for a ZOH-B model, a non-empty ``out`` or a norm_eps mamba_ssm cannot take.
    """
    fmt = ExportFormat(fmt)
    out = Path(out)
    check_out_dir(out)
    check_model_exportable(model)
    state = folded_state_dict(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt is ExportFormat.HF:
            from huggingface_hub import save_torch_state_dict

            hf_state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state.items()}
            if model.cfg.tie_embeddings:
                hf_state.pop("lm_head.weight")  # transformers re-ties it from the config
            (tmp / HF_CONFIG).write_text(json.dumps(_hf_config_json(model.cfg), indent=2) + "\n")
            save_torch_state_dict(hf_state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        else:
            (tmp / HF_CONFIG).write_text(json.dumps(mamba_ssm_config_dict(model.cfg), indent=2) + "\n")
            torch.save(state, tmp / MAMBA_SSM_WEIGHTS)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p.name for p in out.iterdir())


def _hf_config_json(cfg: ModelConfig) -> dict[str, Any]:
    """``config.json`` as transformers writes it (``MambaConfig`` / ``Mamba2Config(...).to_dict()`` of this
    transformers)."""
    from transformers import Mamba2Config, MambaConfig

    return (Mamba2Config if cfg.arch is Arch.MAMBA2 else MambaConfig)(**hf_config_dict(cfg)).to_dict()


def export_run(
    source: str | Path, out: str | Path, fmt: ExportFormat | str, max_shard_size: int | str = "5GB"
) -> ExportResult:
    """Export a mupt run or checkpoint (see :func:`load_run`) to ``out`` in format ``fmt``.

    Copies the dataset's tokenizer files when the run's data source is a prepared dataset directory
    with a ``tokenizer.json``.  Raises :class:`CheckpointError` (missing/corrupt source) or
    :class:`ConfigError` (ZOH-B model, non-empty ``out``).
    """
    fmt = ExportFormat(fmt)
    out = Path(out)
    check_out_dir(out)
    run = load_run(source)
    check_model_exportable(run.model)
    files = write_pretrained(run.model, out, fmt, max_shard_size)
    tok = tokenizer_dir(run.cfg)
    if tok is not None:
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copyfile(tok / name, out / name)
        files = sorted(p.name for p in out.iterdir())
    folded = {k: v for k, v in fold_factors(run.model).items() if v != 1.0}
    return ExportResult(out, fmt, files, run.model.num_params(), run.step, run.source, folded,
                        str(tok) if tok else None)  # fmt: skip


# --- reading other libraries' checkpoints ------------------------------------------------------


@dataclass
class Pretrained:
    """A transformers or mamba_ssm checkpoint read into mupt's terms."""

    model_cfg: ModelConfig  # Euler B; shapes of the checkpoint
    state: dict[str, Tensor]  # mamba_ssm names (transformers' ``backbone.embeddings`` renamed)
    format: ExportFormat
    path: Path


def read_pretrained(path: str | Path) -> Pretrained:
    """Read a transformers (``config.json`` + ``model.safetensors`` or sharded safetensors with an index)
    or mamba_ssm (``config.json`` + ``pytorch_model.bin``) directory.

    Raises :class:`CheckpointError` for a missing directory, config or weights file, or unreadable weights.
    """
    path = Path(path)
    conf = path / HF_CONFIG
    if not path.is_dir() or not conf.is_file():
        raise CheckpointError(f"{path}: no {HF_CONFIG}; pass a transformers or mamba_ssm checkpoint directory")
    try:
        config = json.loads(conf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{conf}: not readable JSON ({err}); restore the checkpoint's config.json") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{conf}: expected a JSON object; restore the checkpoint's config.json")
    cfg, fmt = model_config_from(config, str(conf))
    state = _read_weights(path)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in state.items()}
    if "backbone.embedding.weight" not in state:
        raise CheckpointError(f"{path}: the weights have no backbone.embedding(s).weight; not a Mamba LM checkpoint")
    rows = state["backbone.embedding.weight"].shape[0]
    if rows != cfg.vocab_size:  # e.g. an older config without the padded size
        cfg = cfg.model_copy(update={"vocab_size": rows})
    return Pretrained(cfg, state, fmt, path)


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index, pt = path / "model.safetensors", path / "model.safetensors.index.json", path / MAMBA_SSM_WEIGHTS
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            state: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(load_file(str(path / shard)))
            missing = set(weight_map) - set(state)
            if missing:
                raise CheckpointError(f"{index}: {sorted(missing)[0]} is in the index but in no shard; re-export")
            return state
        if pt.is_file():
            loaded = torch.load(pt, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise CheckpointError(f"{pt}: not a state dict; re-export the checkpoint")
            return loaded
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, EOFError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: weights are corrupt or unreadable ({type(err).__name__}: {first})") from None
    raise CheckpointError(
        f"{path}: no model.safetensors, model.safetensors.index.json or {MAMBA_SSM_WEIGHTS}; pass a checkpoint dir"
    )


def load_pretrained(path: str | Path) -> MambaLM:
    """A mupt model (forward multipliers 1) computing exactly what the checkpoint at ``path`` computes."""
    ckpt = read_pretrained(path)
    torch.manual_seed(0)
    model = MambaLM(ckpt.model_cfg)
    check_shapes(ckpt, model)
    model.load_mamba_ssm_state_dict(ckpt.state)
    return model.eval()


def check_shapes(ckpt: Pretrained, model: MambaLM) -> None:
    """Raise :class:`CheckpointError` naming the first parameter whose shape differs (both shapes)."""
    want = {k: tuple(v.shape) for k, v in to_mamba_ssm_state_dict(model).items()}
    got = {k: tuple(v.shape) for k, v in ckpt.state.items()}
    if model.cfg.tie_embeddings:
        got.setdefault("lm_head.weight", got.get("backbone.embedding.weight", ()))
    for name, shape in want.items():
        if name not in got:
            raise CheckpointError(f"{ckpt.path}: {name} is missing from the checkpoint; it is not this model's")
        if got[name] != shape:
            raise CheckpointError(
                f"{ckpt.path}: {name} has shape {list(got[name])} in the checkpoint but {list(shape)} in this model; "
                "set the run's width/d_state/layers to the checkpoint's"
            )
    extra = sorted(set(got) - set(want))
    if extra:
        raise CheckpointError(f"{ckpt.path}: {extra[0]} has no place in this model; it is not a mupt-compatible Mamba")


# --- continued pre-training ---------------------------------------------------------------------


def init_from(model: MambaLM, par: Parametrized, cfg: RunConfig, load: bool = True) -> Parametrized:
    """Start ``model`` (just built and parametrized by :func:`mupt.parametrization.apply`) from the
    transformers / mamba_ssm checkpoint ``cfg.train.init_from``, for continued pre-training.

    The weights are loaded exactly as stored (never rescaled) and the forward multipliers of the run's
    config are taken as already folded into them (what :func:`export_run` writes), so the model computes
    the checkpoint's logits: every multiplier is set to 1.  The width rules still give the per-group
    optimizer settings; a parameter that carries a folded multiplier c (:func:`fold_factors`) trains with
    LR ``lr * lr_mult * c**k``, weight decay ``wd / c**k`` (k = 1 for Adam/AdamW, 2 for SGD) and Adam
    epsilon ``eps / c``, which is exactly the update of the unfolded parametrization (docs/width_rules.md,
    "Export and --init-from").  With c = 1 (untied embeddings, output_mult = embedding_mult = 1) every LR
    is exactly ``lr * lr_mult``.  ``load=False`` only folds (the weights come from a mupt checkpoint of
    such a run).  Returns the new groups and manifest (``lr_mult``/``weight_decay`` adjusted, ``fwd_mult``
    1); the input ``par`` is not modified.

    Raises :class:`ConfigError` for an architecture the run's config does not match (B discretization,
    tied embeddings, norm epsilon) or a vocabulary different from the run's (the dataset's), and
    :class:`CheckpointError` for a missing/corrupt checkpoint or a shape mismatch (names the parameter and
    both shapes).
    """
    from mupt.parametrization import set_forward_multipliers

    assert cfg.train.init_from is not None
    if (c := unfolded_c(model)) != 1.0:
        raise ConfigError(
            f"--init-from: this Mamba-2 run multiplies C by {c:.4g} after its SiLU (a d_state scaled "
            "from the base), which a transformers/mamba_ssm checkpoint does not carry; keep d_state at the base's"
        )
    factors = fold_factors(model)
    if load:
        ckpt = read_pretrained(cfg.train.init_from)
        check_compatible(ckpt, model.cfg)
        native = from_mamba_ssm_state_dict(ckpt.state, model.cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(native[name].to(p.dtype))
        model.init_stds.clear()
    set_forward_multipliers(model, {})  # all 1: the loaded weights carry them

    k = 2 if OptimizerName(cfg.train.optimizer).family == "sgd" else 1
    manifest = copy.deepcopy(par.manifest)
    groups: dict[tuple[float, float, float], dict[str, Any]] = {}
    for g in par.param_groups:
        for p, name in zip(g["params"], g["names"], strict=True):
            c = factors.get(name, 1.0)
            lr_mult, wd, eps = g["lr_mult"] * c**k, g["weight_decay"] / c**k, g["eps"] / c
            entry = manifest.params[name]
            entry.lr_mult, entry.weight_decay, entry.fwd_mult = lr_mult, wd, 1.0
            new = groups.setdefault(
                (lr_mult, wd, eps),
                {"params": [], "names": [], "lr": cfg.train.lr * lr_mult, "lr_mult": lr_mult, "weight_decay": wd,
                 "eps": eps},
            )  # fmt: skip
            new["params"].append(p)
            new["names"].append(name)
    return Parametrized(list(groups.values()), manifest)


def check_compatible(ckpt: Pretrained, cfg: ModelConfig) -> None:
    """Refuse a checkpoint whose vocab, architecture or shapes differ from the run's model ``cfg``."""
    where = f"--init-from {ckpt.path}"
    if ckpt.model_cfg.arch is not cfg.arch:
        raise ConfigError(
            f"{where}: a {ckpt.model_cfg.arch.value} checkpoint but the run is {cfg.arch.value}; set --arch "
            f"{ckpt.model_cfg.arch.value}"
        )
    if ckpt.model_cfg.vocab_size != cfg.vocab_size:
        raise ConfigError(
            f"{where}: vocab {ckpt.model_cfg.vocab_size} but the run's vocab (the dataset's, padded to x8) "
            f"is {cfg.vocab_size}; train on a dataset prepared with the checkpoint's tokenizer"
        )
    if cfg.arch is Arch.MAMBA1 and cfg.discretization.value != "euler":
        raise ConfigError(
            f"{where}: the checkpoint computes B by Euler but the run uses ZOH; set --discretization euler"
        )
    if ckpt.model_cfg.tie_embeddings != cfg.tie_embeddings:
        want = str(ckpt.model_cfg.tie_embeddings).lower()
        raise ConfigError(
            f"{where}: tie_embeddings is {want} in the checkpoint but not in the run; set model.tie_embeddings: {want}"
        )
    if not math.isclose(ckpt.model_cfg.norm_eps, cfg.norm_eps, rel_tol=1e-6):
        raise ConfigError(
            f"{where}: norm_eps {ckpt.model_cfg.norm_eps:g} in the checkpoint but {cfg.norm_eps:g} in the run; "
            f"set model.norm_eps: {ckpt.model_cfg.norm_eps:g}"
        )
    with torch.device("meta"):
        shaped = MambaLM(cfg)
    check_shapes(ckpt, shaped)
