from __future__ import annotations

import math
from typing import Any

import pytest

from mupt.config import RunConfig, with_overrides
from mupt.train import Hook, StepInfo, Trainer, TrainResult, lm_loss, lr_factor, train


def tiny(**overrides: object) -> RunConfig:
    base = {
        "model.d_model": 32, "model.n_layers": 2, "model.d_state": 8, "train.batch_size": 8,
        "train.seq_len": 64, "train.steps": 20, "train.eval_every": 10, "train.lr": 3e-3,
    }  # fmt: skip
    return with_overrides(RunConfig(), {**base, **overrides})


def test_training_lowers_validation_loss_clearly() -> None:
    cfg = tiny(**{"train.steps": 200, "train.eval_every": 200, "train.lr": 1e-2, "train.batch_size": 16})
    trainer = Trainer(cfg)
    initial = trainer.evaluate()
    assert abs(initial - math.log(256)) < 0.6  # an untrained byte model is near uniform
    result = trainer.run()
    assert result.status == "ok"
    final = result.final_val_loss
    assert final is not None
    # measured ~2.4 nats (~3.5 bits/byte); uniform is 5.55 nats: demand a wide margin
    assert final < initial - 2.3, (initial, final)
    assert result.bits_per_byte(final) == pytest.approx(final / math.log(2))


def test_same_seed_same_losses_different_seed_different() -> None:
    a, b, c = train(tiny()), train(tiny()), train(tiny(**{"train.seed": 1}))
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    assert a.train_loss != c.train_loss


def test_divergence_is_a_status_not_a_crash() -> None:
    res = train(tiny(**{"train.lr": 30.0, "train.steps": 40}))
    assert res.status == "diverged"
    assert res.reason is not None and ("nan" in res.reason or "bound" in res.reason)
    assert res.steps < 40


def high_start(**overrides: object) -> RunConfig:
    """Width 32 under base 256 with output_mult 4.36: the readout multiplier puts the first loss near 19 nats."""
    base = {"model.d_state": 16, "param.base_d_model": 256, "param.output_mult": 4.36, "train.steps": 30,
            "train.eval_every": 30, "train.lr": 1.7e-3, "train.final_eval_tokens": 0}  # fmt: skip
    return tiny(**{**base, **overrides})


def test_a_high_starting_loss_is_not_a_divergence() -> None:
    # a fresh user's `tune --search lr,output_mult` recorded such runs as "diverged at step 1" at every LR
    res = train(high_start())
    assert res.train_loss[0] > 2 * math.log(256) + 3, res.train_loss[0]  # far above the absolute bound 11.1
    assert res.status == "ok" and res.steps == 30, res.reason
    assert res.final_val_loss is not None and res.final_val_loss < 3.5  # it trains: from ~19 to ~2.5 nats


def test_real_divergences_still_end_the_run() -> None:
    # NaN at an absurd LR, whatever the start
    nan = train(high_start(**{"train.lr": 30.0}))
    assert nan.status == "diverged" and nan.reason is not None and "nan" in nan.reason and nan.steps < 5
    # a finite blow-up from a high start: loss goes 19 -> hundreds, more than twice where it started
    up = train(high_start(**{"train.lr": 1.0, "train.steps": 10}))
    assert up.status == "diverged" and up.steps < 10, up.reason
    assert up.reason is not None and "exceeds the divergence bound" in up.reason
    assert up.train_loss[-1] > 2 * min(up.train_loss[:-1])
    # a normal start (about ln 256): the absolute bound 2 ln 256 still applies, as before
    normal = train(high_start(**{"param.output_mult": 1.0, "train.lr": 1.0, "train.steps": 10}))
    assert normal.status == "diverged" and normal.train_loss[-1] > 2 * math.log(256), normal.train_loss


def test_divergence_rule() -> None:
    t = Trainer(tiny(**{"train.steps": 1}))
    assert t.bound == pytest.approx(2 * math.log(256))
    assert t.divergence(1e6) is None  # before any step there is no finite limit: a starting loss never diverges
    assert t.divergence(math.nan) is not None and t.divergence(math.inf) is not None
    t.lowest_loss = 19.0  # a run that started at 19 nats and has not come down
    assert t.divergence(37.9) is None and t.divergence(38.1) is not None
    t.lowest_loss = 3.0  # a run that came down: the absolute bound 11.09 is back
    assert t.divergence(11.0) is None and "divergence bound 11.1 at" in str(t.divergence(11.2))


def test_schedule_scales_group_lrs_and_keeps_their_ratios() -> None:
    cfg = tiny(**{"train.schedule": "cosine", "train.warmup_steps": 2, "train.steps": 10, "model.d_model": 64,
                  "param.base_d_model": 32})  # fmt: skip
    t = Trainer(cfg)
    mults = [g["lr_mult"] for g in t.optimizer.param_groups]
    assert len(set(mults)) > 1  # µP-SSM at 2x width: several LR multipliers
    f = lr_factor(cfg.train)
    for step in range(6):
        t.train_step()
        for g in t.optimizer.param_groups:
            assert g["lr"] == pytest.approx(cfg.train.lr * g["lr_mult"] * f(step + 1))
    assert t.current_lr() == pytest.approx(cfg.train.lr * f(6))


def test_recall_task_is_learned_beyond_what_ignores_the_context() -> None:
    """Loss is on the answers only, whose values are uniform over 128 tokens: a model that does not read
    the context can reach ln 128 = 4.85 nats at best; recalling the queried key's value reaches 0.
    Measured (AdamW 1e-2, 250 steps, 2 pairs): 2.26 nats (seeds 1-3: 3.29, 2.40, 2.34)."""
    recall = {"data.source": "recall", "data.recall_pairs": 2, "train.seq_len": 16, "train.batch_size": 16}
    cfg = tiny(**recall, **{"train.optimizer": "adamw", "train.lr": 1e-2, "train.steps": 250, "train.eval_every": 250})
    trainer = Trainer(cfg)
    initial = trainer.evaluate()
    assert abs(initial - math.log(256)) < 0.6  # untrained: near uniform over the vocabulary
    res = trainer.run()
    assert res.status == "ok" and res.final_val_loss is not None
    assert res.final_val_loss < math.log(128) - 1.0, res.final_val_loss  # it reads the context: recall
    assert res.bytes_per_token is None and res.bits_per_byte(res.final_val_loss) is None
    # SGD trains on it too (its vector-like roles get the N_u LR rule): the loss falls from near-uniform
    sgd = train(
        tiny(**recall, **{"train.optimizer": "sgd", "train.lr": 0.3, "train.steps": 20, "train.eval_every": 20})
    )
    assert sgd.status == "ok" and sgd.final_val_loss is not None
    assert sgd.final_val_loss < initial - 0.2, (initial, sgd.final_val_loss)  # measured 5.70 -> 5.39


class Recorder(Hook):
    """Logs every hook call; asks to stop after ``stop_at`` steps when given."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.infos: list[StepInfo] = []
        self.stop_at = stop_at

    def on_start(self, trainer: Trainer) -> None:
        self.calls.append(("start", trainer.step))

    def on_eval(self, trainer: Trainer, step: int, val_loss: float) -> None:
        self.calls.append(("eval", step))

    def on_step(self, trainer: Trainer, info: StepInfo) -> None:
        self.calls.append(("step", info.step, info.val_loss is not None))
        self.infos.append(info)

    def should_stop(self, trainer: Trainer) -> str | None:
        return "budget" if self.stop_at is not None and trainer.step >= self.stop_at else None

    def at_boundary(self, trainer: Trainer, stopping: bool) -> None:
        self.calls.append(("boundary", trainer.step, stopping))

    def on_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.calls.append(("end", result.status, result.steps))


def test_hooks_see_each_step_in_the_documented_order() -> None:
    cfg = tiny(**{"train.steps": 4, "train.eval_every": 2})
    rec = Recorder()
    res = Trainer(cfg).run(hooks=[rec])
    assert rec.calls == [
        ("start", 0),
        ("step", 1, False), ("boundary", 1, False),
        ("eval", 2), ("step", 2, True), ("boundary", 2, False),
        ("step", 3, False), ("boundary", 3, False),
        ("eval", 4), ("step", 4, True), ("boundary", 4, False),
        ("end", "ok", 4),
    ]  # fmt: skip
    assert [i.loss for i in rec.infos] == res.train_loss
    assert [(i.step, i.val_loss) for i in rec.infos if i.val_loss is not None] == res.val_loss
    assert [i.tokens for i in rec.infos] == [s * 8 * 64 for s in range(1, 5)]
    assert all(i.lr == cfg.train.lr and i.diverged is None for i in rec.infos)


def test_step_info_grad_norm_matches_a_hand_computed_norm() -> None:
    cfg = tiny(**{"train.steps": 1})
    rec = Recorder()
    Trainer(cfg).run(hooks=[rec])
    ref = Trainer(cfg)  # same seed: same weights and batch; the norm by hand, before the optimizer step
    x, y = ref.batch(0)
    lm_loss(ref.model(x), y).backward()
    by_hand = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in ref.model.parameters()))
    assert rec.infos[0].grad_norm == pytest.approx(by_hand, rel=1e-5)


def test_should_stop_ends_the_run_after_a_checkpoint_point() -> None:
    rec = Recorder(stop_at=3)
    res = Trainer(tiny(**{"train.steps": 10})).run(hooks=[rec])
    assert (res.status, res.steps, res.reason) == ("stopped", 3, "budget at step 3")
    assert rec.calls[-2:] == [("boundary", 3, True), ("end", "stopped", 3)]


def test_divergence_reaches_on_step_and_skips_the_boundary() -> None:
    rec = Recorder()
    res = Trainer(tiny(**{"train.lr": 30.0, "train.steps": 40})).run(hooks=[rec])
    assert res.status == "diverged"
    assert rec.infos[-1].diverged == res.reason and rec.infos[-1].step == res.steps
    assert ("boundary", res.steps, False) not in rec.calls and rec.calls[-1] == ("end", "diverged", res.steps)


def test_final_evaluation_on_32k_tokens_with_its_standard_error() -> None:
    """The last evaluation reads 32,768 validation tokens by default (64-token windows: 8 forward passes of
    64 rows), the intermediate ones eval_batches x batch_size windows; the standard error is the std of the
    per-window mean losses / sqrt(windows), recomputed here with torch's cross entropy on the same windows."""
    import torch
    import torch.nn.functional as F

    from mupt.train import final_eval_shape

    assert final_eval_shape(tiny(**{"train.steps": 64}).train) == (8, 64)  # 32768 / 64 = 512 windows, 8 x 64
    assert final_eval_shape(tiny(**{"train.steps": 4}).train) == (1, 32)  # no more tokens than trained: 4x8x64
    assert final_eval_shape(tiny(**{"train.final_eval_tokens": 0}).train) == (2, 8)  # the intermediate size
    cfg = tiny(**{"train.steps": 16, "train.eval_every": 8, "train.final_eval_tokens": 8192, "model.n_layers": 1})
    assert final_eval_shape(cfg.train) == (2, 64)
    trainer = Trainer(cfg)
    res = trainer.run()
    assert res.final_val_tokens == 8192 and len(res.val_loss) == 2
    per_window = []
    with torch.no_grad():
        for x, y in trainer.final_val_set:
            logits = trainer.model(x).float()
            for i in range(x.shape[0]):
                per_window.append(float(F.cross_entropy(logits[i], y[i])))
    assert len(per_window) == 128
    mean = sum(per_window) / 128
    std = math.sqrt(sum((v - mean) ** 2 for v in per_window) / 127)
    assert res.final_val_loss == pytest.approx(mean, rel=1e-5)
    assert res.final_val_se == pytest.approx(std / math.sqrt(128), rel=1e-4)
    # the final windows continue the intermediate evaluation's fixed draw: its windows come first
    first = torch.cat([x for x, _ in trainer.val_set])
    assert torch.equal(trainer.final_val_set[0][0][: first.shape[0]], first)


def test_a_small_validation_split_is_read_once_not_resampled(tmp_path: Any) -> None:
    """A validation split smaller than the last evaluation's request (here 32,768 tokens asked, 1,000 held) is
    read once, whole, in non-overlapping windows, and the tokens counted are the split's, not the request."""
    import torch

    text = bytes(range(32, 127)) * 105  # 9,975 bytes of text; val_fraction 0.1 -> the last 997 bytes
    (tmp_path / "small.txt").write_bytes(text)
    cfg = tiny(**{"data.source": str(tmp_path / "small.txt"), "train.steps": 300, "model.n_layers": 1})
    trainer = Trainer(cfg)
    val = text[len(text) - int(len(text) * 0.1) :]
    assert len(val) == 997 and trainer.data.val_tokens == 997
    windows = (997 - 1) // 64  # 15 windows of 64 targets: tokens [64k, 64k + 64]
    xs = torch.cat([x for x, _ in trainer.final_val_set])
    ys = torch.cat([y for _, y in trainer.final_val_set])
    assert xs.shape == (windows, 64)
    for k in range(windows):
        assert bytes(xs[k].tolist()) == val[64 * k : 64 * k + 64]
        assert bytes(ys[k].tolist()) == val[64 * k + 1 : 64 * k + 65]
    loss, se, tokens = trainer.evaluate_final()
    assert tokens == windows * 64 <= len(val) and se is not None and math.isfinite(loss)
    # a split larger than the request keeps its fixed random draw (the windows every earlier result read)
    big = Trainer(tiny(**{"train.steps": 4, "model.n_layers": 1}))
    assert big.data.val_tokens is not None and big.data.val_tokens > 4 * 8 * 64 * 4
    assert big.evaluate_final()[2] == 4 * 8 * 64
