"""One training run with given hyperparameters: model + width rules + optimizer + loop.

:class:`Trainer` is reused by ``train``, ``tune``, ``check`` and ``scale``: it builds the
model deterministically from the seed, applies the parametrization, and exposes
``train_step``/``evaluate`` so callers can add pruning, probes or checkpoints.  It never
prints; progress goes to an optional callback.  Divergence (NaN/inf, or a loss above both the bound
and twice the run's lowest loss so far: :meth:`Trainer.divergence`) ends the run with
``status="diverged"`` and a reason instead of an exception.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mupt.config import OptimizerName, RunConfig, Schedule, TrainConfig, load_yaml, to_dict
from mupt.data import IGNORE_INDEX, TokenSource, load_data, val_windows, vocab_mismatch
from mupt.data.dataset import padded_vocab
from mupt.errors import ConfigError, MuptError
from mupt.model import MambaLM
from mupt.parametrization import Parametrized, apply


@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.run`: losses in nats/token, ``steps`` the step counter at the end."""

    status: str  # "ok" | "diverged" | "stopped" (a hook asked)
    reason: str | None
    steps: int
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, nats per token)
    tokens: int = 0
    seconds: float = 0.0
    bytes_per_token: float | None = None
    #: Standard error (nats/token) of the last evaluation: std of its per-window mean losses / sqrt(windows),
    #: how much another draw of as many validation windows would move the final validation loss.
    final_val_se: float | None = None
    #: Validation tokens of the last evaluation (``final_eval_tokens`` rounded up to whole batches, at most the
    #: validation split's size: each token counted once).
    final_val_tokens: int = 0

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


#: Statuses of a ``mupt train`` metrics.json whose run ended by itself (not interrupted).
FINISHED = ("ok", "diverged", "stopped")


@dataclass
class PreviousRun:
    """What a ``mupt train`` run directory already holds (its ``config.yaml`` and ``metrics.json``).

    ``status``: metrics.json's status (``ok``, ``diverged``, ``stopped``, ``interrupted``), None when the
    directory has a config.yaml but no metrics (killed hard, or still running); ``steps``: steps recorded
    there; ``same_config``: config.yaml equals the config about to run.
    """

    status: str | None
    steps: int | None
    same_config: bool

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def describe(self, planned_steps: int) -> str:
        """E.g. "a finished run (ok, 300 steps) of another config", "an interrupted run (12 of 300 steps)"."""
        other = "" if self.same_config else " of another config"
        if self.status is None:
            return f"a run without metrics.json (killed, or still running){other}"
        if self.finished:
            return f"a finished run ({self.status}, {self.steps} steps){other}"
        of = f" of {planned_steps}" if self.same_config else ""
        return f"an {self.status} run ({self.steps}{of} steps){other}"


def previous_run(run_dir: str | Path, cfg: RunConfig) -> PreviousRun | None:
    """The run that ``mupt train`` left in ``run_dir`` (None when it holds neither config.yaml nor metrics.json).

    Never raises for unreadable files: an unreadable config.yaml counts as another config, an unreadable
    metrics.json as a run without metrics.  The caller decides (``mupt train`` never overwrites finished
    work without ``--overwrite``; README, "Where results go").
    """
    run_dir = Path(run_dir)
    config_file, metrics_file = run_dir / "config.yaml", run_dir / "metrics.json"
    if not config_file.exists() and not metrics_file.exists():
        return None
    try:
        same = to_dict(load_yaml(config_file, RunConfig)) == to_dict(cfg)
    except (MuptError, OSError):
        same = False
    status: str | None = None
    steps: int | None = None
    try:
        metrics = json.loads(metrics_file.read_text())
        status, steps = str(metrics.get("status")), int(metrics.get("steps") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return PreviousRun(status, steps, same)


@contextlib.contextmanager
def fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    """FSDP2's counterpart of DDP's ``no_sync``: no reduce-scatter of gradients inside the block.

    ``model`` is the root module passed to ``fully_shard``; ``set_requires_gradient_sync(False)``
    (recursing into every sharded block) makes its backward accumulate unsharded local gradients,
    and the first backward after the block reduce-scatters their sum (torch.distributed.fsdp docs,
    "FSDPModule.set_requires_gradient_sync").  Costs the memory of unsharded gradients between micro-steps.
    """
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


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
    """The optimizer over ``groups`` (each with its own lr, weight_decay, eps), copied: torch writes
    into the group dicts it is given, and the width rules' groups stay the reference for audits."""
    groups = [dict(g) for g in groups]
    if tc.optimizer is OptimizerName.SGD:
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum)
    cls = torch.optim.AdamW if tc.optimizer is OptimizerName.ADAMW else torch.optim.Adam
    return cls(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))


def lr_factor(tc: TrainConfig) -> Callable[[int], float]:
    """Multiplier on every group's LR at a step (0-based): linear warmup, then the schedule.

    Warmup: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps.  After it,
    ``cosine`` and ``linear`` fall from 1 to 0 over the remaining steps; ``wsd`` (warmup-stable-
    decay, Hu et al. 2024 "MiniCPM") stays at 1 and falls linearly to 0 over the last
    ``decay_fraction`` of all steps.  Every group gets the same factor, so the per-group ratios
    the width rules set are kept at every step (docs/schedules.md).
    """

    def factor(step: int) -> float:
        if tc.warmup_steps and step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        if tc.schedule is Schedule.CONSTANT:
            return 1.0
        if tc.schedule is Schedule.WSD:
            decay = max(1, round(tc.decay_fraction * tc.steps))
            start = max(tc.warmup_steps, tc.steps - decay)
            return 1.0 if step < start else max(0.0, 1.0 - (step - start) / max(1, tc.steps - start))
        span = max(1, tc.steps - tc.warmup_steps)
        frac = min(1.0, (step - tc.warmup_steps) / span)
        if tc.schedule is Schedule.COSINE:
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0 - frac

    return factor


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


#: Headroom of the divergence rule: a finite loss diverges only above this many times the lowest training
#: loss of the run so far (and above :func:`diverge_bound`); see :meth:`Trainer.divergence`.
DIVERGE_FACTOR = 2.0


def diverge_bound(cfg: RunConfig) -> float:
    """The absolute divergence bound in nats/token: ``train.diverge_loss``, default ``2 ln(vocab_size)``
    (twice the loss of a uniform prediction).  A run is held to it once its loss has come down below
    half of it; :meth:`Trainer.divergence` has the whole rule."""
    return cfg.train.diverge_loss or 2.0 * math.log(cfg.model.vocab_size)


def divergence_limit(bound: float, lowest: float) -> float:
    """The loss (nats/token) above which a finite loss counts as diverged: ``max(bound, DIVERGE_FACTOR *
    lowest)``, ``lowest`` the lowest training loss of the run so far (``inf`` before the first step: no
    finite limit yet).  The relative term keeps a run that merely STARTS high (a large readout
    multiplier ``param.output_mult`` scales the first logits: output_mult 4.36 starts a byte model at 19
    nats, above 2 ln 256 = 11.1) from being called diverged on its starting loss, while a loss that blows
    up to twice where the run started, or back above the bound after it had come down, still ends it."""
    return max(bound, DIVERGE_FACTOR * lowest)


#: Tokens per forward pass of the last evaluation (at least the training batch): big batches, few calls.
FINAL_EVAL_BATCH_TOKENS = 4096


def final_eval_shape(tc: TrainConfig) -> tuple[int, int]:
    """(batches, rows per batch) of a run's last evaluation, in windows of ``seq_len`` tokens.

    Tokens: ``final_eval_tokens``, but no more than the run trains on (steps x batch_size x seq_len: the
    evaluation, a forward pass, then costs at most about a third of the training) and no fewer than an
    intermediate evaluation (``eval_batches`` x ``batch_size`` windows, also when ``final_eval_tokens`` is
    0).  Batches of at least ``batch_size`` rows and about FINAL_EVAL_BATCH_TOKENS tokens (few calls).

    The intermediate evaluations (tune's pruning points, progress) stay cheap; the last one, which every
    result (tune's objective, the checks' losses, a run's summary) is read from, is measured on enough
    tokens that its noise is well below the differences those decisions rest on (docs/transfer.md,
    "Measurement noise").
    """
    least = tc.eval_batches * tc.batch_size
    windows = max(least, math.ceil(min(tc.final_eval_tokens, tc.steps * tc.batch_size * tc.seq_len) / tc.seq_len))
    if windows == least:
        return tc.eval_batches, tc.batch_size
    rows = min(windows, max(tc.batch_size, math.ceil(FINAL_EVAL_BATCH_TOKENS / tc.seq_len)))
    return math.ceil(windows / rows), rows


def window_losses(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-window summed loss (nats) and counted tokens, each ``(batch,)``: logits ``(batch, seq, vocab)``,
    targets ``(batch, seq)`` (IGNORE_INDEX positions not counted)."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return nll.sum(1), (targets != IGNORE_INDEX).sum(1)


def window_se(sums: Tensor, counts: Tensor) -> float | None:
    """Standard error (nats/token) of the token-weighted mean loss, from per-window sums and token counts:
    the sample std of the per-window mean losses / sqrt(windows) (None for fewer than 2 windows)."""
    keep = counts > 0
    per = sums[keep].double() / counts[keep].double()
    if per.numel() < 2:
        return None
    return float(per.std() / math.sqrt(per.numel()))


StepCallback = Callable[[int, float], None]
EvalCallback = Callable[[int, float], None]


@dataclass
class StepInfo:
    """What one optimizer step produced, handed to :meth:`Hook.on_step`.

    ``loss`` is the training loss of the step's batch in nats/token (the mean over ranks in a
    distributed run); ``lr`` the global (base) LR the step used (each group's LR is ``lr *
    lr_mult``); ``grad_norm`` the L2 norm of all gradients before clipping (over the whole
    model, also under DDP/FSDP); ``tokens`` the tokens seen since step 0 (global batch x
    seq_len x steps); ``val_loss`` the validation loss (nats/token) when this step evaluated,
    else ``None``; ``diverged`` the reason when the step diverged (the run ends after the hooks
    saw it), else ``None``; ``seconds`` the wall time since :meth:`Trainer.run` started.
    """

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float
    val_loss: float | None = None
    diverged: str | None = None


class Hook:
    """Extension point of :meth:`Trainer.run`; subclass and override what you need.

    Call order per step (every rank calls every hook; rank-0-only work checks ``trainer.rank``):

    1. the optimizer step;
    2. if an evaluation is due (``eval_every``, the last step) and the step did not diverge:
       :meth:`on_eval` with the validation loss (may raise, e.g. ``optuna.TrialPruned``; the
       exception leaves :meth:`Trainer.run`);
    3. :meth:`on_step` with a :class:`StepInfo` (``val_loss`` set when step 2 ran);
    4. if the step or its evaluation diverged, the run ends here (status ``"diverged"``);
    5. :meth:`should_stop` on every hook; the answers are OR-ed over hooks and ranks, so every
       rank takes the same branch;
    6. :meth:`at_boundary` with ``stopping``: the point to checkpoint (every rank, same step);
    7. if stopping, the run ends (status ``"stopped"``, the reason from step 5).

    :meth:`on_start` runs once before the first step (after any resume set ``trainer.step``),
    :meth:`on_end` once with the :class:`TrainResult`, also after a divergence or a stop (not
    when a hook raised).
    """

    def on_start(self, trainer: Trainer) -> None:
        """Before the first step of this run (``trainer.step`` may be > 0 after a resume)."""

    def on_eval(self, trainer: Trainer, step: int, val_loss: float) -> None:
        """After an evaluation at ``step`` (val loss in nats/token, mean over ranks)."""

    def on_step(self, trainer: Trainer, info: StepInfo) -> None:
        """After every optimizer step (and its evaluation, when one was due)."""

    def should_stop(self, trainer: Trainer) -> str | None:
        """A reason to stop after this step (e.g. a signal), or ``None`` to go on."""
        return None

    def at_boundary(self, trainer: Trainer, stopping: bool) -> None:
        """After every completed step that did not diverge: checkpoint here (all ranks call it)."""

    def on_end(self, trainer: Trainer, result: TrainResult) -> None:
        """Once, after the loop ended normally, by divergence or by a stop."""


class _Callbacks(Hook):
    """The plain ``on_step(step, loss)`` / ``on_eval(step, val)`` callbacks as a hook."""

    def __init__(self, on_step: StepCallback | None, on_eval: EvalCallback | None) -> None:
        self.step_cb, self.eval_cb = on_step, on_eval

    def on_eval(self, trainer: Trainer, step: int, val_loss: float) -> None:
        if self.eval_cb is not None and trainer.divergence(val_loss) is None:
            self.eval_cb(step, val_loss)

    def on_step(self, trainer: Trainer, info: StepInfo) -> None:
        if self.step_cb is not None:
            self.step_cb(info.step, info.loss)


class Trainer:
    """Owns model, optimizer, scheduler, data and the step counter of one run: THE training loop.

    ``train``, ``tune``, ``check`` and ``scale`` all train through :meth:`run`; what differs
    between them (checkpoints, metrics files, signals, pruning, progress bars) lives in
    :class:`Hook` objects.  ``scale`` may replace :attr:`module` (DDP/FSDP2/autocast wrapper),
    :attr:`optimizer` and :attr:`scheduler` before calling :meth:`run`.  In a distributed run
    (``world > 1`` with ``torch.distributed`` initialised) each rank trains on its slice of the
    global batch, and losses, validation losses and stop requests are reduced over ranks.
    """

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
        if cfg.model.vocab_size != padded_vocab(self.data.vocab_size):
            raise ConfigError(vocab_mismatch(cfg.model.vocab_size, self.data.vocab_size, f"data {self.data.name}"))
        tc = cfg.train
        if tc.batch_size % (world * tc.grad_accum):
            raise ConfigError(
                f"batch_size {tc.batch_size} is not divisible by {world} processes x grad_accum {tc.grad_accum}; "
                f"use a batch size that is a multiple of {world * tc.grad_accum}"
            )
        self.model, self.par = build_model(cfg, self.device)
        self.module: nn.Module = self.model  # callers may wrap (DDP/FSDP) and assign here
        #: skips gradient sync inside its block (DDP's ``no_sync``, :func:`fsdp_no_sync`); set by whoever wraps
        self.no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
        self.optimizer = build_optimizer(self.par.param_groups, cfg.train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg.train))
        self.val_set = self.data.val_batches(tc.eval_batches, tc.batch_size, tc.seq_len)
        #: The last evaluation's windows (:func:`final_eval_shape`): the same fixed draw as :attr:`val_set`,
        #: continued, in bigger batches; the same in every run of this data and seq_len.
        #: A validation split smaller than that is read once, whole, in non-overlapping windows: drawing more
        #: windows would re-read the same tokens and understate the noise (README, "Your own data").
        n, rows = final_eval_shape(tc)
        split = self.data.val_tokens
        tiled = split is not None and n * rows >= val_windows(split, tc.seq_len)
        self.final_val_set = self.data.val_batches(n, rows, tc.seq_len, tiled=tiled)
        self.step = 0
        self.bound = diverge_bound(cfg)
        #: The lowest training loss (nats/token, mean over ranks) this Trainer has seen; ``inf`` before its
        #: first step.  After a resume it counts from the resumed step.  See :meth:`divergence`.
        self.lowest_loss = math.inf
        self.last_grad_norm = math.nan

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all ranks: global batch x seq_len."""
        return self.cfg.train.batch_size * self.cfg.train.seq_len

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        tc = self.cfg.train
        x, y = self.data.train_batch(step, tc.batch_size, tc.seq_len, tc.seed, self.rank, self.world)
        return x.to(self.device), y.to(self.device)

    def train_step(self) -> float:
        """One optimizer step on the batch for ``self.step``; returns this rank's loss (nats/token).

        With ``grad_accum`` k > 1 this rank's batch (global batch / world rows) is split into k
        micro-batches of equal rows; each backward adds its summed token losses divided by the
        batch's token count, so the gradient and the returned loss are those of the whole batch
        (up to float summation order).  Gradients are synced on the last micro-batch only: inside
        :attr:`no_sync` (DDP's ``no_sync``, FSDP2's :func:`fsdp_no_sync`) before it, or the wrapped
        module's own ``no_sync`` when :attr:`no_sync` is not set.
        Sets :attr:`last_grad_norm` (L2 norm of all gradients before clipping).
        """
        self.module.train()
        x, y = self.batch(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        k = self.cfg.train.grad_accum
        if k == 1:
            loss = lm_loss(self.module(x), y)
            loss.backward()
        else:
            count = (y != IGNORE_INDEX).sum().clamp(min=1)
            total = torch.zeros((), device=self.device)
            no_sync = self.no_sync or getattr(self.module, "no_sync", None)
            for i, (xm, ym) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
                sync = i == k - 1 or no_sync is None
                with contextlib.nullcontext() if sync else no_sync():  # type: ignore[misc]
                    logits = self.module(xm)
                    part = (
                        F.cross_entropy(
                            logits.float().flatten(0, 1), ym.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                        )
                        / count
                    )
                    part.backward()
                total += part.detach()
            loss = total
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.cfg.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        full = getattr(norm, "full_tensor", None)  # FSDP2: a DTensor holding the global norm
        self.last_grad_norm = float(full() if full is not None else norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss (nats/token) over the fixed validation batches on this rank."""
        self.module.eval()
        losses = [float(lm_loss(self.module(x.to(self.device)), y.to(self.device))) for x, y in self.val_set]
        return sum(losses) / len(losses)

    @torch.no_grad()
    def evaluate_final(self) -> tuple[float, float | None, int]:
        """The last evaluation on this rank: (mean loss in nats/token over :attr:`final_val_set`, its
        standard error over windows (:func:`window_se`), validation tokens counted)."""
        self.module.eval()
        sums, counts = [], []
        for x, y in self.final_val_set:
            s, c = window_losses(self.module(x.to(self.device)), y.to(self.device))
            sums.append(s.cpu())
            counts.append(c.cpu())
        total, n = torch.cat(sums), torch.cat(counts)
        tokens = int(n.sum())
        return float(total.sum().double() / max(1, tokens)), window_se(total, n), tokens

    def current_lr(self) -> float:
        """The global (base) LR now: group LR divided by its multiplier."""
        g = self.optimizer.param_groups[0]
        return float(g["lr"]) / float(g["lr_mult"])

    def divergence(self, loss: float) -> str | None:
        """Why ``loss`` (nats/token, a training or validation loss at :attr:`step`) means the run diverged,
        or ``None``.

        The rule: a NaN/inf loss diverges at once; a finite loss diverges when it is above
        :func:`divergence_limit` = ``max(bound, 2 x lowest)``, ``bound`` = :func:`diverge_bound`
        (``train.diverge_loss``, default 2 ln(vocab)) and ``lowest`` = :attr:`lowest_loss` (the run's
        lowest training loss so far, this step's included, which :meth:`run` records before asking).  So
        the starting loss is never a divergence, however high a readout multiplier puts it; a loss
        that doubles from where the run started or from its best, or climbs back above the bound after
        the run came below half of it, is.  README, "Training hooks", and ``diverge_loss``'s description
        say the same.
        """
        if not math.isfinite(loss):
            return f"loss is {loss} at step {self.step}"
        limit = divergence_limit(self.bound, self.lowest_loss)
        if loss > limit:
            why = "" if limit == self.bound else f" ({DIVERGE_FACTOR:g} x the run's lowest loss {self.lowest_loss:.3g})"
            return f"loss {loss:.3g} exceeds the divergence bound {limit:.3g}{why} at step {self.step}"
        return None

    def _distributed(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def reduce_mean(self, x: float) -> float:
        """Mean of ``x`` over ranks (``x`` itself in a one-process run)."""
        if not self._distributed():
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self._distributed():
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def run(
        self,
        on_step: StepCallback | None = None,
        on_eval: EvalCallback | None = None,
        hooks: Sequence[Hook] = (),
    ) -> TrainResult:
        """Train from ``self.step`` to ``train.steps``, evaluating every ``eval_every`` steps and at the end.

        ``on_step(step, loss)`` and ``on_eval(step, val_loss)`` are shorthands for a
        :class:`Hook` (``on_eval`` is not called for a diverged evaluation); ``hooks`` run in
        order, after them.  A hook's exception (e.g. ``optuna.TrialPruned`` from ``on_eval``)
        propagates to the caller.  Divergence is not an exception: the result has
        ``status="diverged"`` and the reason; a hook's stop request gives ``status="stopped"``.
        """
        tc = self.cfg.train
        all_hooks: list[Hook] = [_Callbacks(on_step, on_eval), *hooks]
        res = TrainResult("ok", None, self.step, bytes_per_token=self.data.bytes_per_token)
        start = time.perf_counter()
        for h in all_hooks:
            h.on_start(self)
        while self.step < tc.steps:
            lr = self.current_lr()
            loss = self.reduce_mean(self.train_step())
            step = self.step
            res.train_loss.append(loss)
            res.tokens += self.tokens_per_step
            if math.isfinite(loss):
                self.lowest_loss = min(self.lowest_loss, loss)
            reason = self.divergence(loss)
            val: float | None = None
            if reason is None and (step % tc.eval_every == 0 or step == tc.steps):
                if step == tc.steps:  # the last evaluation, the one results are read from: more tokens
                    val, se, res.final_val_tokens = self.evaluate_final()
                    val = self.reduce_mean(val)  # the same windows on every rank: se is None on all or none
                    res.final_val_se = None if se is None else self.reduce_mean(se)
                else:
                    val = self.reduce_mean(self.evaluate())
                res.val_loss.append((step, val))
                bad = self.divergence(val)
                reason = None if bad is None else "validation " + bad
                for h in all_hooks:
                    h.on_eval(self, step, val)
            info = StepInfo(step, loss, lr, self.last_grad_norm, step * self.tokens_per_step,
                            time.perf_counter() - start, val, reason)  # fmt: skip
            for h in all_hooks:
                h.on_step(self, info)
            if reason is not None:
                res.status, res.reason = "diverged", reason
                break
            asked = [r for h in all_hooks if (r := h.should_stop(self)) is not None]
            stopping = self.any_rank(bool(asked))
            for h in all_hooks:
                h.at_boundary(self, stopping)
            if stopping:
                res.status = "stopped"
                res.reason = f"{asked[0] if asked else 'stop requested on another rank'} at step {step}"
                break
        res.steps = self.step
        res.seconds = time.perf_counter() - start
        for h in all_hooks:
            h.on_end(self, res)
        return res


def train(cfg: RunConfig, on_step: StepCallback | None = None, on_eval: EvalCallback | None = None) -> TrainResult:
    """Build and run one training job on CPU (or the default device) from a config."""
    return Trainer(cfg).run(on_step, on_eval)
