"""One training run with given hyperparameters: model + width rules + optimizer + loop.

:class:`Trainer` is reused by ``train``, ``tune``, ``check`` and ``scale``: it builds the
model deterministically from the seed, applies the parametrization, and exposes
``train_step``/``evaluate`` so callers can add pruning, probes or checkpoints.  It never
prints; progress goes to an optional callback.  Divergence (NaN/inf or loss above the bound)
ends the run with ``status="diverged"`` and a reason instead of an exception.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mupt.config import OptimizerName, RunConfig, Schedule, TrainConfig
from mupt.data import IGNORE_INDEX, TokenSource, load_data
from mupt.model import MambaLM
from mupt.parametrization import Parametrized, apply


@dataclass
class TrainResult:
    status: str  # "ok" | "diverged"
    reason: str | None
    steps: int
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, nats per token)
    tokens: int = 0
    seconds: float = 0.0
    bytes_per_token: float | None = None

    @property
    def final_val_loss(self) -> float | None:
        return self.val_loss[-1][1] if self.val_loss else None

    @property
    def best_val_loss(self) -> float | None:
        return min(v for _, v in self.val_loss) if self.val_loss else None

    def bits_per_byte(self, nats: float | None) -> float | None:
        if nats is None or self.bytes_per_token is None:
            return None
        return nats / math.log(2) / self.bytes_per_token


def build_model(
    cfg: RunConfig, device: str | torch.device = "cpu", reinit: bool = True
) -> tuple[MambaLM, Parametrized]:
    """Model at the config's width, initialised under its scheme; same seed -> same weights.

    With ``cfg.train.init_from`` the weights come from that checkpoint instead (``reinit=False``: only
    its forward-multiplier folding, for loading a mupt checkpoint of such a run).
    """
    torch.manual_seed(cfg.train.seed)
    model = MambaLM(cfg.model)
    par = apply(model, cfg.param, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay, reinit=reinit)
    if cfg.train.init_from is not None:  # weights from a transformers/mamba_ssm checkpoint, multipliers folded
        from mupt.export import init_from

        par = init_from(model, par, cfg, load=reinit)
    return model.to(device), par


def build_optimizer(groups: list[dict[str, Any]], tc: TrainConfig) -> torch.optim.Optimizer:
    if tc.optimizer is OptimizerName.SGD:
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum)
    cls = torch.optim.AdamW if tc.optimizer is OptimizerName.ADAMW else torch.optim.Adam
    return cls(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))


def lr_factor(tc: TrainConfig) -> Callable[[int], float]:
    """Multiplier on every group's LR at a step (warmup, then the schedule)."""

    def factor(step: int) -> float:
        if tc.warmup_steps and step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        if tc.schedule is Schedule.CONSTANT:
            return 1.0
        span = max(1, tc.steps - tc.warmup_steps)
        frac = min(1.0, (step - tc.warmup_steps) / span)
        if tc.schedule is Schedule.COSINE:
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0 - frac

    return factor


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def diverge_bound(cfg: RunConfig) -> float:
    return cfg.train.diverge_loss or 2.0 * math.log(cfg.model.vocab_size)


StepCallback = Callable[[int, float], None]
EvalCallback = Callable[[int, float], None]


class Trainer:
    """Owns model, optimizer, scheduler, data and the step counter of one run."""

    def __init__(
        self,
        cfg: RunConfig,
        device: str | torch.device = "cpu",
        data: TokenSource | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.rank, self.world = rank, world
        self.data = data if data is not None else load_data(cfg.data)
        self.model, self.par = build_model(cfg, self.device)
        self.module: nn.Module = self.model  # callers may wrap (DDP/FSDP) and assign here
        self.optimizer = build_optimizer(self.par.param_groups, cfg.train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg.train))
        tc = cfg.train
        self.val_set = self.data.val_batches(tc.eval_batches, tc.batch_size, tc.seq_len)
        self.step = 0
        self.bound = diverge_bound(cfg)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        tc = self.cfg.train
        x, y = self.data.train_batch(step, tc.batch_size, tc.seq_len, tc.seed, self.rank, self.world)
        return x.to(self.device), y.to(self.device)

    def train_step(self) -> float:
        """One optimizer step on the batch for ``self.step``; returns the loss (nats)."""
        self.module.train()
        x, y = self.batch(self.step)
        loss = lm_loss(self.module(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> float:
        self.module.eval()
        losses = [float(lm_loss(self.module(x.to(self.device)), y.to(self.device))) for x, y in self.val_set]
        return sum(losses) / len(losses)

    def current_lr(self) -> float:
        """The global (base) LR now: group LR divided by its multiplier."""
        g = self.optimizer.param_groups[0]
        return float(g["lr"]) / float(g["lr_mult"])

    def divergence(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss is {loss} at step {self.step}"
        if loss > self.bound:
            return f"loss {loss:.3g} exceeds the divergence bound {self.bound:.3g} at step {self.step}"
        return None

    def run(self, on_step: StepCallback | None = None, on_eval: EvalCallback | None = None) -> TrainResult:
        """Train to ``train.steps``, evaluating every ``eval_every`` steps and at the end.

        ``on_eval`` may raise (e.g. ``optuna.TrialPruned``) to stop early; the exception
        propagates to the caller.
        """
        tc = self.cfg.train
        res = TrainResult("ok", None, self.step, bytes_per_token=self.data.bytes_per_token)
        start = time.perf_counter()
        while self.step < tc.steps:
            loss = self.train_step()
            res.train_loss.append(loss)
            res.tokens += tc.batch_size * tc.seq_len
            reason = self.divergence(loss)
            if on_step is not None:
                on_step(self.step, loss)
            if reason is not None:
                res.status, res.reason = "diverged", reason
                break
            if self.step % tc.eval_every == 0 or self.step == tc.steps:
                val = self.evaluate()
                res.val_loss.append((self.step, val))
                reason = self.divergence(val)
                if reason is not None:
                    res.status, res.reason = "diverged", "validation " + reason
                    break
                if on_eval is not None:
                    on_eval(self.step, val)
        res.steps = self.step
        res.seconds = time.perf_counter() - start
        return res


def train(cfg: RunConfig, on_step: StepCallback | None = None, on_eval: EvalCallback | None = None) -> TrainResult:
    """Build and run one training job on CPU (or the default device) from a config."""
    return Trainer(cfg).run(on_step, on_eval)
