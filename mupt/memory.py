"""One memory model of a training run: parameters, gradients, optimizer state and activations, in bytes.

Used by ``mupt transfer`` (the recipe's summary) and ``mupt scale --dry-run`` (the per-rank plan),
so both print the same numbers for the same recipe.

* Parameters: counted on a model built on the ``meta`` device (shapes only, no memory).
* Weights and gradients: fp32 (4 bytes each per parameter); under bf16 autocast the master
  weights and the gradients stay fp32 (``mupt scale`` never casts parameters).
* Optimizer state per parameter (PyTorch's optimizers): Adam and AdamW keep ``exp_avg`` and
  ``exp_avg_sq`` (2 fp32 values); SGD keeps a ``momentum_buffer`` (1 fp32 value) when
  ``momentum > 0`` and nothing otherwise.
* Under FSDP2 weights, gradients and optimizer state are sharded over the ranks (divided by the
  world size); under DDP every rank holds all of them.
* Activations: the tensors autograd saves for the backward pass, per token.  They are counted by
  tracing one forward pass of the real model (and the loss) on the ``meta`` device with
  ``torch.autograd.graph.saved_tensors_hooks``: every saved tensor that is not a parameter,
  counted once per storage.  So the count follows the model code as it is (Mamba-1 or Mamba-2,
  scan backend, chunking), and a test checks it against a real CPU forward pass and against the
  hand count below.

Hand count for Mamba-1 with the ``torch`` scan, fp32, floats per token (``mupt/model.py``):

* each RMSNorm (one per layer and the final one): its input, ``rsqrt`` (1), input x rsqrt, and
  the normalised output read by the next Linear: ``3 d_model + 1``;
* ``in_proj`` output ``xz``, kept whole because ``conv1d`` saves its ``x`` half and the gate's
  SiLU its ``z`` half (views of one storage): ``2 d_inner``;
* the conv output before SiLU (saved by SiLU; with the causal padding ``d_conv - 1`` extra time
  steps per sequence): ``d_inner (1 + (d_conv - 1) / seq_len)``; the SiLU output ``u``: ``d_inner``;
* ``x_proj``'s three row blocks each read a contiguous copy of ``u`` transposed: ``3 d_inner``;
  their outputs: ``dt_rank`` (read by ``dt_proj``) and B, C saved by the scan: ``2 d_state``;
* the scan: ``dt`` before softplus and after (``2 d_inner``), one fp32 state per chunk of
  ``CHUNK = 32`` steps (``d_inner d_state / 32``), its output before the D skip is added
  (``d_inner``), ``silu(z)`` (``d_inner``), and ``out_proj``'s contiguous copy of the gated
  output (``d_inner``);

so per layer ``3 d_model + 1 + 12 d_inner + d_inner (d_conv - 1) / seq_len + dt_rank + 2 d_state
+ d_inner d_state / 32``; plus the token ids (int64, 2 floats), the final norm (``3 d_model + 1``)
and the log-softmax output (``vocab``).  The older estimates (6 and 7 x d_inner) missed the
copies, the softplus input and the scan checkpoints.  The Triton scan fuses softplus, the D skip
and the gate, so on GPU the count is lower; the meta trace always runs the ``torch`` path and is
therefore an upper bound there.  Under bf16 autocast the trace still counts 4 bytes per value:
an upper bound (matmul outputs would be 2 bytes; the scan keeps fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from mupt.config import ModelConfig, OptimizerName, RunConfig, TrainConfig, to_dict
from mupt.model import MambaLM

GIB = 1024**3


def meta_model(model_cfg: ModelConfig) -> MambaLM:
    """The model at ``model_cfg``'s shape on the meta device: shapes only, no memory, no init cost."""
    with torch.device("meta"):
        return MambaLM(model_cfg)


def count_params(model_cfg: ModelConfig) -> int:
    """Number of parameters (elements) of the model at this shape."""
    return sum(p.numel() for p in meta_model(model_cfg).parameters())


def optimizer_values_per_param(tc: TrainConfig) -> int:
    """fp32 state values the optimizer keeps per parameter: Adam/AdamW 2, SGD 1 with momentum, else 0."""
    if tc.optimizer is OptimizerName.SGD:
        return 1 if tc.momentum > 0 else 0
    return 2


def _traced_bytes(model_cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Bytes autograd saves for ``batch`` sequences of ``seq_len`` tokens, traced on meta."""
    from mupt.train import lm_loss

    model = meta_model(model_cfg)
    params = {id(p) for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            kept[id(base)] = base  # kept alive so ids stay unique
        return t

    ids = torch.zeros((batch, seq_len), dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(model(ids), ids)
    return float(sum(t.untyped_storage().nbytes() for t in kept.values()))


@lru_cache(maxsize=64)
def _per_token(model_json: str, batch: int, seq_len: int) -> float:
    cfg = ModelConfig.model_validate_json(model_json)
    one = cfg.model_copy(update={"n_layers": 1, "scan_backend": "torch"})
    two = cfg.model_copy(update={"n_layers": 2, "scan_backend": "torch"})
    b1, b2 = _traced_bytes(one, batch, seq_len), _traced_bytes(two, batch, seq_len)
    return (b1 + (cfg.n_layers - 1) * (b2 - b1)) / (batch * seq_len)  # identical layers: linear in depth


def activation_bytes_per_token(model_cfg: ModelConfig, seq_len: int, batch: int = 2) -> float:
    """Bytes of saved activations per token (fp32, ``torch`` scan), for a batch of sequences of ``seq_len``.

    Traced on one and two layers (every layer saves the same), extrapolated to ``n_layers``;
    cached per shape.  ``batch`` matters only between 1 and 2: with one sequence the transposed
    inputs of ``x_proj``/``out_proj`` are views, with more they are copies; so traces use
    ``min(batch, 2)``.  See the module docstring for the hand count this reproduces.
    """
    import json

    return _per_token(json.dumps(to_dict(model_cfg), sort_keys=True), min(max(batch, 1), 2), seq_len)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank of one training step; ``activations`` for ``tokens_per_rank`` tokens."""

    params: int
    weights: int
    grads: int
    optimizer: int
    activation_bytes_per_token: float
    tokens_per_rank: int

    @property
    def activations(self) -> float:
        return self.activation_bytes_per_token * self.tokens_per_rank

    @property
    def states(self) -> int:
        """Weights + gradients + optimizer state."""
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.states + self.activations


def memory_estimate(cfg: RunConfig, world: int = 1, fsdp: bool = False) -> MemoryEstimate:
    """Memory per rank for ``cfg`` on ``world`` ranks (global batch split over the ranks, then into
    ``train.grad_accum`` micro-batches: activations are those of one micro-batch).

    Raises nothing; ``world`` below 1 is treated as 1 (the CLI refuses it earlier).
    """
    world = max(1, world)
    params = count_params(cfg.model)
    shard = world if fsdp else 1
    per = -(-params // shard)  # ceil: FSDP2 pads the last shard
    tc = cfg.train
    local_batch = max(1, tc.batch_size // world // tc.grad_accum)  # one micro-batch
    return MemoryEstimate(
        params=params,
        weights=4 * per,
        grads=4 * per,
        optimizer=4 * optimizer_values_per_param(tc) * per,
        activation_bytes_per_token=activation_bytes_per_token(cfg.model, tc.seq_len, local_batch),
        tokens_per_rank=local_batch * tc.seq_len,
    )
