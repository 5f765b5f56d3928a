"""Typed configs (model, data, train, parametrization) with YAML load/save and validation.

Every knob is a field of a pydantic model with ``extra="forbid"``, so a typo in a YAML file
or a wrong value is rejected with a message naming the field; :func:`load_yaml` turns
pydantic's errors into one-line :class:`~mupt.errors.ConfigError` messages for the CLI.
Configs round-trip: ``load_yaml(save_yaml(cfg))`` equals ``cfg``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator, with_config
from typing_extensions import TypedDict

from mupt.errors import ConfigError, StorageError


class Discretization(StrEnum):
    """How B is discretized. A is always ZOH (exp(dt*A))."""

    ZOH = "zoh"  # (exp(dt*A) - 1) / A * B
    EULER = "euler"  # dt * B, what mamba_ssm computes


class OptimizerName(StrEnum):
    ADAMW = "adamw"
    ADAM = "adam"
    SGD = "sgd"

    @property
    def family(self) -> str:
        """The width-rule family: 'adam' covers Adam and AdamW."""
        return "sgd" if self is OptimizerName.SGD else "adam"


class Schedule(StrEnum):
    """LR multiplier after warmup (see :func:`mupt.train.lr_factor` and docs/schedules.md)."""

    CONSTANT = "constant"
    COSINE = "cosine"  # half cosine from 1 to 0 over the steps after warmup
    LINEAR = "linear"  # straight line from 1 to 0 over the steps after warmup
    WSD = "wsd"  # warmup-stable-decay: 1 until the last decay_fraction of the steps, then linear to 0


class Arch(StrEnum):
    """Mixer architecture of every block."""

    MAMBA1 = "mamba1"  # selective scan, A per (channel, state), x_proj + dt_proj
    MAMBA2 = "mamba2"  # SSD: scalar A per head, B/C per group from in_proj, gated RMSNorm


class Scheme(StrEnum):
    """Width parametrizations: standard, heuristic µP (every Linear as hidden), µP-SSM."""

    SP = "sp"
    MUP = "mup"
    MUP_SSM = "mup-ssm"


class _Strict(BaseModel):
    # allow_inf_nan=False: `--lr inf` / `lr: .nan` are refused where they are read, not after a diverged run
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False, allow_inf_nan=False)


# --- the default proxy: ONE definition ------------------------------------------------------------
# `mupt train`, `mupt tune`, `mupt transfer --lr` and `mupt check transfer --config` all start from
# RunConfig(), whose defaults are these; recipes/proxy.yaml is RunConfig() written out.  Sized so that
# `mupt tune` (16 trials at d_model 256) finishes on two CPU cores in minutes.

#: d_model of the default proxy.
PROXY_D_MODEL = 256
#: Optimizer steps of a proxy run.
PROXY_STEPS = 64
#: Sequences per optimizer step (the global batch).
PROXY_BATCH_SIZE = 8
#: Tokens per sequence.
PROXY_SEQ_LEN = 64
#: Steps between validation losses (also tune's pruning points).
PROXY_EVAL_EVERY = 16
#: Validation batches per intermediate evaluation (cheap: tune's pruning points).
PROXY_EVAL_BATCHES = 2
#: Validation tokens of the last evaluation, the one every result is read from (32 K: its noise is
#: measured in docs/transfer.md, section "Measurement noise").
FINAL_EVAL_TOKENS = 32768
#: The optimizer every command defaults to (tune, train, transfer --lr and the checks).
DEFAULT_OPTIMIZER = OptimizerName.ADAMW


class ModelConfig(_Strict):
    """Mamba LM shape. Widths: N_u = d_inner = expand * d_model; N_x = d_state.

    ``arch`` picks the mixer: mamba1 (selective scan) or mamba2 (SSD, mamba_ssm's Mamba2 layout:
    ``nheads = d_inner / headdim`` heads, ``ngroups`` B/C groups shared by ``nheads / ngroups``
    heads, ``chunk_size`` steps per SSD chunk).  ``headdim``, ``ngroups`` and ``chunk_size`` only
    apply to mamba2; ``dt_rank`` and ``discretization`` only to mamba1 (mamba2 with a discretization
    other than the default zoh is refused: it would be recorded but ignored).
    """

    arch: Arch = Arch.MAMBA1
    d_model: int = Field(PROXY_D_MODEL, gt=0, description="residual width")
    n_layers: int = Field(2, gt=0)
    d_state: int = Field(16, gt=0, description="SSM state width N_x")
    d_conv: int = Field(4, gt=0)
    expand: int = Field(2, gt=0)
    dt_rank: int | str = Field("auto", description="'auto' = ceil(d_model / 16)")
    vocab_size: int = Field(256, gt=1)
    discretization: Discretization = Discretization.ZOH
    tie_embeddings: bool = False
    dt_min: float = Field(1e-3, gt=0)
    dt_max: float = Field(1e-1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    scan_backend: str = Field("auto", description="auto | torch | reference | triton")
    headdim: int = Field(64, gt=0, description="mamba2: channels per head; heads = d_inner / headdim")
    ngroups: int = Field(1, gt=0, description="mamba2: B/C groups, each shared by nheads / ngroups heads")
    chunk_size: int = Field(64, gt=0, description="mamba2: time steps per SSD chunk (a speed knob, not the math)")

    @field_validator("scan_backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from mupt.scan import Backend  # lazy: mupt.scan imports this module

        if value not in {b.value for b in Backend}:
            raise ValueError(f"unknown scan backend; choose one of: {', '.join(b.value for b in Backend)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if isinstance(self.dt_rank, str) and self.dt_rank != "auto":
            raise ValueError(f"dt_rank must be a positive integer or 'auto', got {self.dt_rank!r}")
        if isinstance(self.dt_rank, int) and self.dt_rank <= 0:
            raise ValueError(f"dt_rank must be positive, got {self.dt_rank}")
        if self.dt_min >= self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) must be below dt_max ({self.dt_max})")
        if self.arch is Arch.MAMBA2:
            if self.discretization is not Discretization.ZOH:
                raise ValueError(
                    f"discretization {self.discretization.value} applies to mamba1 only (Mamba-2's SSD has its own "
                    "discretization); drop --discretization (model.discretization) or use --arch mamba1"
                )
            if self.d_inner % self.headdim:
                raise ValueError(
                    f"mamba2 needs d_inner = expand*d_model = {self.d_inner} divisible by headdim={self.headdim}; "
                    "change d_model or headdim"
                )
            if self.nheads % self.ngroups:
                raise ValueError(
                    f"mamba2 needs nheads = {self.nheads} divisible by ngroups={self.ngroups}; change ngroups"
                )
        return self

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        """mamba2: number of SSD heads, d_inner / headdim (grows with width at fixed headdim)."""
        return self.d_inner // self.headdim

    @property
    def arch_label(self) -> str:
        """The mixer for a header or plan line: ``arch=mamba1``, or for mamba2 ``arch=mamba2 heads=8x64 ngroups=1``
        (nheads x headdim channels, B/C groups)."""
        if self.arch is not Arch.MAMBA2:
            return f"arch={self.arch.value}"
        return f"arch={self.arch.value} heads={self.nheads}x{self.headdim} ngroups={self.ngroups}"

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)


def mamba2_width_unit(headdim: int, ngroups: int, expand: int = 2) -> int:
    """The smallest d_model step that gives mamba2 whole heads in whole groups: expand*d_model must be
    divisible by headdim*ngroups (heads = d_inner / headdim, ngroups must divide heads; mamba_ssm's Mamba2
    layout, :class:`ModelConfig`), so d_model must be a multiple of headdim*ngroups / gcd(expand, headdim*ngroups)."""
    need = headdim * ngroups
    return need // math.gcd(expand, need)


def check_mamba2_widths(
    widths: list[int] | tuple[int, ...], headdim: int, ngroups: int, expand: int = 2, flag: str = "--widths"
) -> None:
    """Refuse, in one line naming every bad width and the least valid multiple, d_model widths that give
    mamba2 a fractional head count or heads not divisible by ``ngroups`` (see :func:`mamba2_width_unit`).

    Raises :class:`ConfigError`.
    """
    unit = mamba2_width_unit(headdim, ngroups, expand)
    bad = [w for w in widths if w % unit]
    if bad:
        shown = ",".join(map(str, bad))
        raise ConfigError(
            f"{flag}: mamba2 needs {expand}*d_model divisible by --headdim {headdim} and the head count by "
            f"--ngroups {ngroups}; {shown} {'is' if len(bad) == 1 else 'are'} not (use multiples of {unit})"
        )


class DataConfig(_Strict):
    """Where tokens come from: the builtin corpus, a prepared dataset, a token file, text, or a synthetic task."""

    source: str = Field(
        "builtin",
        description="builtin | recall | DATASET_DIR (mupt prepare) | tokens.bin/.npy | a .txt file or dir",
    )
    vocab_size: int | None = Field(default=None, gt=1, description="vocabulary of a plain .bin/.npy token file")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    recall_pairs: int = Field(8, gt=0, description="associative recall: key/value pairs per sequence")

    @field_validator("source")
    @classmethod
    def _absolute(cls, v: str) -> str:
        """A relative path that exists from the current directory becomes absolute, so best.yaml, recipes
        and run configs written from it work from any directory (a batch job rarely starts where
        ``mupt prepare`` ran).  Names (builtin, recall) and paths that do not exist here stay as given, so
        an error names what was typed."""
        if v in ("builtin", "recall") or os.path.isabs(v) or not os.path.exists(v):
            return v
        return os.path.abspath(v)


class TrainConfig(_Strict):
    steps: int = Field(PROXY_STEPS, gt=0)
    batch_size: int = Field(PROXY_BATCH_SIZE, gt=0)
    seq_len: int = Field(PROXY_SEQ_LEN, gt=1)
    lr: float = Field(3e-3, gt=0, description="global (base) learning rate; per-group LRs are multiples of it")
    optimizer: OptimizerName = DEFAULT_OPTIMIZER
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    schedule: Schedule = Schedule.CONSTANT
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd schedule: fraction of all steps spent in the final linear decay"
    )
    grad_accum: int = Field(
        1, ge=1, description="micro-batches per optimizer step; batch_size stays the global batch (same losses)"
    )
    grad_clip: float = Field(0.0, ge=0, description="max grad norm; 0 disables")
    eval_every: int = Field(PROXY_EVAL_EVERY, gt=0)
    eval_batches: int = Field(PROXY_EVAL_BATCHES, gt=0, description="validation batches per intermediate evaluation")
    final_eval_tokens: int = Field(
        FINAL_EVAL_TOKENS,
        ge=0,
        description="validation tokens of the last evaluation, at most the tokens trained on and at least "
        "eval_batches batches (0: eval_batches batches)",
    )
    seed: int = 0
    diverge_loss: float | None = Field(
        None,
        gt=0,
        description="absolute divergence bound (nats/token), default 2*ln(vocab): a finite loss diverges when above "
        "both it and 2x the run's lowest training loss so far (so a high starting loss is not a divergence); "
        "NaN/inf always diverges (mupt.train.Trainer.divergence)",
    )
    init_from: str | None = Field(
        None,
        description="transformers or mamba_ssm checkpoint directory to start from (continued pre-training; "
        "mupt.export.init_from)",
    )


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
    # mamba2 only
    IN_PROJ_Z = "in_proj_z"
    IN_PROJ_X = "in_proj_x"
    IN_PROJ_B = "in_proj_B"
    IN_PROJ_C = "in_proj_C"
    IN_PROJ_DT = "in_proj_dt"
    A_LOG_HEAD = "A_log_head"
    GATED_NORM = "gated_norm"


class ParamConfig(_Strict):
    """Which width rules to apply, relative to which base shape, plus tunable µP multipliers."""

    scheme: Scheme = Scheme.MUP_SSM
    base_d_model: int | None = Field(None, gt=0, description="base width; default: the model's own d_model")
    base_d_state: int | None = Field(None, gt=0, description="base state width; default: the model's own d_state")
    output_mult: float = Field(1.0, gt=0, description="tunable multiplier on the logits")
    embedding_mult: float = Field(1.0, gt=0, description="tunable multiplier on the embedding output")
    init_scale: float = Field(1.0, gt=0, description="tunable global factor on every init std")
    role_lr: dict[Role, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        default_factory=dict,
        description="extra LR factor per role at every width, on top of the width rule (0 freezes the role), "
        "e.g. {embedding: 2.0}: for per-role LR studies and corrections (docs/transfer.md)",
    )


class RunConfig(_Strict):
    """Everything one training run needs."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    param: ParamConfig = Field(default_factory=ParamConfig)


C = TypeVar("C", bound=BaseModel)


def format_validation_error(err: ValidationError, where: str) -> str:
    """Every bad field, one line each: ``where: loc: message (got value)``.

    A single error is one line; several are a count line followed by one line per error, so a typo
    (``train.lerning_rate``) is never hidden behind another field's error.
    """
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = "" if isinstance(value, dict) or e["type"] == "missing" else f" (got {value!r})"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}{shown}")
    if len(lines) == 1:
        return f"{where}: {lines[0]}"
    return f"{where}: {len(lines)} errors\n" + "\n".join(f"  {line}" for line in lines)


def from_dict(cls: type[C], data: Any, where: str = "config") -> C:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where)) from None


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file, fsync and rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN/inf float (also inside dicts, lists and tuples) replaced by ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (RFC 8259) for the files mupt writes: non-finite numbers become ``null``.

    Python's default writes bare ``NaN``/``Infinity``, which strict readers (``jq``, browsers,
    most non-Python parsers) reject; a diverged run has such numbers.  ``allow_nan=False`` makes
    any that slipped through an error instead of an unreadable file.
    """
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))
        hint = f"a YAML file in it: {', '.join(str(path / n) for n in found)}" if found else "a YAML file"
        raise ConfigError(f"{path}: is a directory; pass {hint}")
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; pass the path of an existing YAML file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        at = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}; fix or regenerate the file") from None


def write_yaml(path: str | Path, data: Any, header: str | None = None) -> None:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    atomic_write_text(path, text)


def load_yaml(path: str | Path, cls: type[C] = RunConfig) -> C:  # type: ignore[assignment]
    return from_dict(cls, read_yaml(path), where=str(path))


def save_yaml(path: str | Path, cfg: BaseModel, header: str | None = None) -> None:
    write_yaml(path, to_dict(cfg), header=header)


def with_overrides(cfg: C, overrides: dict[str, Any], where: str = "flags") -> C:
    """Return a copy of ``cfg`` with dotted-key overrides (``{"model.d_model": 128}``), validated.

    ``None`` values are skipped, so CLI options that were not given leave the config alone.
    """
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value.value if isinstance(value, StrEnum) else value
    return from_dict(type(cfg), data, where=where)


class BestParams(_Strict):
    """``runs/<study>/best.yaml``: what ``mupt tune`` found and ``mupt transfer`` reads."""

    study: str
    trial: int
    value: float = Field(description="objective of the best trial: final validation loss (nats/token)")
    params: dict[str, float] = Field(description="tuned values, e.g. {'lr': 3e-3, 'output_mult': 2.0}")
    config: RunConfig = Field(description="the proxy run config with the tuned values applied")
    manifest: Manifest | None = Field(None, description="parametrization manifest of the proxy")
    dataset: DatasetIdentity = Field(
        default_factory=lambda: DatasetIdentity(),
        description="identity of the proxy's data: tokenizer, tokenizer_sha256, vocab, tokens",
    )
    code_version: str = ""
    created: str = ""
    fidelity: str = Field("steps", description="the study's fidelity schedule: width (rungs over d_model) or steps")
    finalists: list[dict[str, Any]] = Field(
        default_factory=list,
        description="trials measured at the proxy width, best first, each with the fidelities it passed through",
    )


class Entry(BaseModel):
    """Manifest row for one parameter: its role, shape (torch order), fan-in/fan-out, and what the width
    rules gave it at this width: init std (None: structured init, e.g. A_log), LR multiplier (x the base
    LR), forward multiplier and weight decay (docs/width_rules.md, section 1)."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    shape: list[int]
    fan_in: int = Field(gt=0)
    fan_out: int = Field(gt=0)
    init_std: float | None = Field(ge=0)
    lr_mult: float = Field(ge=0)
    fwd_mult: float
    weight_decay: float = Field(ge=0)


class Manifest(BaseModel):
    """What :func:`apply` did to every parameter, with the base and actual shape (typed, validated when
    built or loaded; a malformed one is a one-line ConfigError)."""

    model_config = ConfigDict(extra="forbid")

    scheme: Scheme
    optimizer: OptimizerName
    discretization: Discretization
    base_d_model: int = Field(gt=0)
    base_d_state: int = Field(gt=0)
    d_model: int = Field(gt=0)
    d_state: int = Field(gt=0)
    params: dict[str, Entry] = Field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (enums as their values)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Validate a manifest mapping; raises ConfigError naming the bad field."""
        try:
            return from_dict(cls, data, where="manifest")
        except ConfigError as err:
            raise ConfigError(f"{err}; the manifest is malformed: regenerate it with mupt") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix == ".json":
            atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        else:
            write_yaml(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.suffix == ".json":
            try:
                return cls.from_dict(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"{path}: cannot read manifest ({err}); regenerate it") from None
        return cls.from_dict(read_yaml(path))


class Precision(StrEnum):
    """Numerics of ``mupt scale``: parameters, gradients and optimizer state are always fp32.

    ``bf16`` runs the forward (and so the backward) under ``torch.autocast`` in bfloat16; fp16 is
    not offered (it needs loss scaling, which mupt does not implement).  ``auto`` is bf16 on CUDA
    and fp32 elsewhere.
    """

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"

    def resolve(self, cuda: bool) -> Precision:
        """``auto`` -> bf16 on CUDA, fp32 elsewhere; the others as they are."""
        if self is Precision.AUTO:
            return Precision.BF16 if cuda else Precision.FP32
        return self


class LaunchConfig(_Strict):
    """How ``mupt scale`` runs a recipe (independent of the width rules)."""

    run_dir: str = Field("runs/scale", description="checkpoints, metrics.jsonl and summary go here")
    ckpt_every: int = Field(100, gt=0)
    log_every: int = Field(10, gt=0)
    precision: Precision = Field(Precision.AUTO, description="auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16")
    compile: bool = False
    fsdp: bool = False
    log: str = Field("jsonl", description="metrics sinks: jsonl (always), tensorboard, wandb, mlflow; comma-separated")
    health_every: int | None = Field(
        None, ge=0, description="µP health probe every N steps (0: off; default: a quarter of the reference's steps)"
    )
    health_strict: bool = Field(
        False, description="stop the run (exit 1, after a checkpoint) when a health probe leaves its band"
    )


class HealthReference(_Strict):
    """The proxy's probe values that ``mupt scale`` compares the wide run against (``mupt.health``).

    Written by ``mupt transfer``: the proxy config (tuned values, proxy shape) trained with the
    target's batch, sequence length, schedule and data for ``steps`` optimizer steps, once per
    seed in ``seeds``, probed on one fixed batch (the first validation batch, ``probe_batch`` x
    ``probe_seq_len`` tokens) at init and after every step.  Keys are
    :func:`mupt.check.coord.probe_quantities`' (``0.x``, ``1.dy``, ``head.logits``...); list
    index = step.  ``rms``: mean over seeds of the RMS; ``log2_sd``: standard deviation over seeds
    of log2 RMS (None where undefined, e.g. a change at step 0).
    """

    proxy: dict[str, Any] = Field(description="d_model, d_state, n_layers, scheme of the probed proxy")
    seeds: list[int]
    steps: int = Field(gt=0)
    probe_batch: int = Field(gt=0)
    probe_seq_len: int = Field(gt=1)
    tolerance: float = Field(gt=0, description="coordinate-check tolerance on |log2-log2 slope|")
    noise_z: float = Field(ge=0, description="seed-noise allowance, in standard deviations of the proxy's log2 RMS")
    rms: dict[str, list[float | None]]
    log2_sd: dict[str, list[float | None]]


@with_config(ConfigDict(extra="forbid"))
class RoleRow(TypedDict):
    """One role's values at one width (a row of ``mupt transfer``'s per-role table): init std (None for a
    structured init such as A_log), LR (base LR x the rule's multiplier), forward multiplier, weight decay."""

    init_std: float | None
    lr: float
    fwd_mult: float
    weight_decay: float


@with_config(ConfigDict(extra="allow"))
class DatasetIdentity(TypedDict, total=False):
    """What best.yaml and recipes record about a token source (:func:`mupt.data.identity_of`)."""

    name: str
    tokenizer: str | None
    tokenizer_sha256: str | None
    vocab_size: int | None
    tokens: int | None
    corpus_sha256: str | None


@with_config(ConfigDict(extra="forbid"))
class ProxyShape(TypedDict, total=False):
    """The proxy a recipe was transferred from: its shape, scheme, parameter count and tokens trained."""

    d_model: int
    d_state: int
    n_layers: int
    scheme: Scheme
    params: int
    tokens: int


@with_config(ConfigDict(extra="forbid"))
class WidthRatio(TypedDict):
    """The transfer ratio: target over proxy d_inner (``width``) and d_state (``state``)."""

    width: float
    state: float


@with_config(ConfigDict(extra="forbid"))
class BaseShapeRecord(TypedDict):
    d_model: int
    d_state: int


@with_config(ConfigDict(extra="allow"))
class RecipeSource(TypedDict, total=False):
    """Where a recipe came from (written by ``mupt transfer``); known keys are typed, others are kept."""

    kind: str  # "study" (from best.yaml) or "lr" (--lr)
    study: str
    trial: int
    value: float
    params: dict[str, float]
    code_version: str
    tuned: str
    finalist: dict[str, Any]  # how the proxy's LR was found (mupt.transfer.chosen_finalist), when best.yaml says
    path: str
    proxy: ProxyShape
    base: BaseShapeRecord
    ratio: WidthRatio
    base_per_role: dict[str, RoleRow]
    proxy_config: dict[str, Any]  # a RunConfig's fields (checked by Recipe: a RunConfig must load from it)
    proxy_dataset: DatasetIdentity
    created: str
    warnings: list[str]
    expected_regret: dict[str, Any]  # mupt.check.regret.ExpectedRegret.to_dict(), when a check result exists


class Recipe(_Strict):
    """A launchable recipe for the wide model, written by ``mupt transfer``.

    ``run`` is complete: ``mupt scale`` rebuilds the model and its optimizer groups from it via
    :func:`mupt.parametrization.apply`, and checks them against ``per_role``.
    """

    source: RecipeSource = Field(
        default_factory=lambda: RecipeSource(), description="study, trial, proxy shape, transfer ratio"
    )
    run: RunConfig
    per_role: dict[str, RoleRow] = Field(
        default_factory=dict, description="role -> {init_std, lr, fwd_mult, weight_decay} at the target width"
    )
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    manifest: Manifest | None = Field(None, description="what the width rules gave every parameter of the target")
    dataset: DatasetIdentity = Field(
        default_factory=lambda: DatasetIdentity(),
        description="identity of the run's data: tokenizer, tokenizer_sha256, vocab, tokens",
    )
    health: HealthReference | None = Field(
        None, description="the proxy's probe values for mupt scale's live µP health check (mupt transfer)"
    )

    @field_validator("manifest", mode="before")
    @classmethod
    def _no_manifest(cls, v: Any) -> Any:
        return None if v == {} else v  # recipes written before the manifest was typed may hold {}

    @field_validator("source")
    @classmethod
    def _proxy_config(cls, v: RecipeSource) -> RecipeSource:
        """source.proxy_config must be a loadable RunConfig (mupt.health and --explain rebuild the proxy)."""
        if "proxy_config" in v:
            try:
                RunConfig.model_validate(v["proxy_config"])
            except ValidationError as err:
                first = err.errors()[0]
                loc = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"proxy_config.{loc}: {first['msg']}") from None
        return v


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe YAML (written by ``mupt transfer``), validated completely.

    Raises :class:`ConfigError` (one line) when the file is missing, not YAML, invalid, or is a
    ``best.yaml`` from ``mupt tune`` (which needs ``mupt transfer`` first).
    """
    data = read_yaml(path)
    if isinstance(data, dict) and "run" not in data and {"study", "params", "config"} <= set(data):
        raise ConfigError(
            f"{path} is a best.yaml from mupt tune, not a recipe; run `mupt transfer --from {path} --to-width N` "
            "first and pass the recipe it writes"
        )
    return from_dict(Recipe, data, where=str(path))


def load_best(path: str | Path) -> BestParams:
    """Read a ``best.yaml`` written by ``mupt tune``.

    Raises :class:`~mupt.errors.StorageError` when the file is missing and :class:`ConfigError`
    when it is corrupt or invalid (one line each).
    """
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"{path}: no such best-params file; run `mupt tune` first or pass the right path")
    return best_from_dict(read_yaml(path), str(path))


def best_from_dict(data: Any, where: str) -> BestParams:
    """A :class:`BestParams` from a best.yaml's mapping, which must hold every field ``mupt tune`` writes.

    Every field of the file has a default, so a file cut short (a full disk, a copy interrupted) would
    otherwise load with the missing sections at their defaults, e.g. another scheme, and transfer wrong.

    Raises ConfigError (one line) naming the missing fields and how to write the file again.
    """
    if isinstance(data, dict):
        raw = data.get("config")
        config: dict[str, Any] = raw if isinstance(raw, dict) else {}
        missing = [k for k in BestParams.model_fields if k not in data]
        missing += [f"config.{k}" for k in RunConfig.model_fields if "config" in data and k not in config]
        if not {"study", "params", "config"} & set(data):
            what = "a recipe" if "run" in data else "a run config" if "model" in data or "train" in data else "it"
            raise ConfigError(
                f"{where}: {what} is not a best.yaml (no study, params or config); pass the runs/<study>/best.yaml "
                "that mupt tune wrote"
            )
        if missing:
            raise ConfigError(
                f"{where}: incomplete best.yaml (no {', '.join(missing)}): cut short or edited; write it again "
                "with `mupt tune --study NAME --report` (same --runs-dir)"
            )
    return from_dict(BestParams, data, where=where)


def first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key (sorted order) where two nested dicts differ, with both values; ``None`` if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else (prefix.rstrip(".") or "<root>", a, b)


def check_lr_scale(lr_scale: float | None) -> None:
    """Refuse a ``--lr-scale`` that is not a finite number > 0 (None: not given).

    Raises:
        ConfigError: one line naming the value, for ``mupt train`` and ``mupt scale`` alike.
    """
    if lr_scale is not None and not (math.isfinite(lr_scale) and lr_scale > 0):
        raise ConfigError(f"--lr-scale {lr_scale:g}: must be a finite number > 0, e.g. 0.5 or 2")


def parse_widths(text: str, at_least: int = 1, flag: str = "--widths") -> list[int]:
    """``"256,64,128"`` -> ``[64, 128, 256]`` (sorted, distinct, positive).

    Raises :class:`ConfigError` naming ``flag`` when an item is not an integer, not positive, or
    fewer than ``at_least`` distinct widths are given.
    """
    try:
        widths = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give comma-separated integers, e.g. 64,128,256,512") from None
    if any(w <= 0 for w in widths):
        raise ConfigError(f"{flag} {text!r}: widths must be positive")
    if len(widths) < at_least:
        raise ConfigError(f"{flag} {text!r}: give at least {at_least} distinct widths (e.g. 64,128,256,512)")
    return widths


def load_run_config(path: str | Path) -> RunConfig:
    """The run config in any YAML file mupt writes: a run's ``config.yaml``, tune's ``best.yaml``
    (its ``config``: the proxy with the tuned values) or transfer's recipe (its ``run``: the target).

    Raises ConfigError (one line per bad field) when the file is none of these or invalid.
    """
    data = read_yaml(path)
    if isinstance(data, dict) and "run" in data and "model" not in data:
        return from_dict(Recipe, data, where=f"{path} (recipe)").run
    if isinstance(data, dict) and "config" in data and "model" not in data:
        return best_from_dict(data, f"{path} (best.yaml)").config
    return from_dict(RunConfig, data, where=str(path))
