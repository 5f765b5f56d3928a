"""The large run's basics: gradient accumulation (same losses) and warmup + decay schedules in recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_launch import losses, make_recipe, run_scale

from mupt import launch
from mupt.config import Recipe, RunConfig, Schedule, TrainConfig, load_recipe, load_yaml
from mupt.errors import ConfigError
from mupt.train import Trainer, lm_loss, lr_factor

TINY = {
    "model": {"d_model": 32, "n_layers": 1, "d_state": 8, "scan_backend": "torch"},
    "train": {"steps": 8, "batch_size": 8, "seq_len": 32, "lr": 4e-3, "eval_every": 4, "eval_batches": 1},
}


def tiny(**train: object) -> RunConfig:
    return RunConfig.model_validate({**TINY, "train": {**TINY["train"], **train}})


@pytest.mark.parametrize("accum", [2, 4, 8])
def test_grad_accum_gives_the_unaccumulated_losses(accum: int) -> None:
    torch.set_num_threads(1)
    ref = Trainer(tiny()).run()
    acc = Trainer(tiny(grad_accum=accum)).run()
    assert acc.status == ref.status == "ok" and len(acc.train_loss) == 8
    # same global batch, same gradient: equal up to float summation order (not bitwise)
    assert acc.train_loss == pytest.approx(ref.train_loss, rel=2e-5, abs=0)
    assert [v for _, v in acc.val_loss] == pytest.approx([v for _, v in ref.val_loss], rel=2e-5, abs=0)
    assert acc.train_loss[-1] < acc.train_loss[0] - 0.3  # it trains


def test_grad_accum_must_divide_the_batch() -> None:
    with pytest.raises(ConfigError, match="grad_accum 3"):
        Trainer(tiny(grad_accum=3))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_scale_with_grad_accum_matches_one_process(tmp_path: Path, mode: str) -> None:
    """2 gloo ranks x 2 micro-batches (DDP's no_sync / FSDP2's set_requires_gradient_sync(False) on the
    first, gradients synced on the last) == 1 process, 1 batch."""
    if not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    torch.set_num_threads(1)
    ref_recipe, ref_dir = make_recipe(tmp_path, "one", steps=12)
    launch.run(load_recipe(ref_recipe))
    recipe, run_dir = make_recipe(tmp_path, "accum", steps=12)
    fsdp = ["--fsdp"] if mode == "fsdp" else []
    proc = run_scale(recipe, "--nproc", "2", "--grad-accum", "2", *fsdp, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_yaml(run_dir / "recipe.yaml", Recipe).run.train.grad_accum == 2
    one, two = losses(ref_dir), losses(run_dir)
    assert sorted(two) == sorted(one) == list(range(1, 13))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-5, abs=0), step


def test_schedules_against_their_formulas() -> None:
    def f(schedule: str, **kw: object) -> list[float]:
        tc = TrainConfig.model_validate({"steps": 100, "warmup_steps": 10, "schedule": schedule, **kw})
        return [lr_factor(tc)(s) for s in range(100)]

    wsd = f("wsd", decay_fraction=0.2)
    assert wsd[0] == pytest.approx(0.1) and wsd[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert wsd[10:81] == [1.0] * 71  # stable until the last 20% ...
    assert wsd[90] == pytest.approx(0.5) and wsd[99] == pytest.approx(0.05)  # ... then linear to 0
    cos = f("cosine")
    assert cos[10] == pytest.approx(1.0) and cos[55] == pytest.approx(0.5)
    assert cos[32] == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))
    assert f("constant")[10:] == [1.0] * 90


def test_transfer_carries_the_schedule_into_the_recipe_and_scale_follows_it(tmp_path: Path, cli) -> None:
    out = tmp_path / "r.yaml"
    code, _, err = cli(
        "transfer", "--lr", "0.004", "--width", "32", "--layers", "1", "--d-state", "8", "--to-width", "64",
        "--steps", "20", "--batch-size", "4", "--seq-len", "32", "--schedule", "wsd", "--warmup", "4",
        "--decay-fraction", "0.25", "--grad-accum", "2", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    recipe = load_yaml(out, Recipe)
    tc = recipe.run.train
    assert (tc.schedule, tc.warmup_steps, tc.decay_fraction, tc.grad_accum) == (Schedule.WSD, 4, 0.25, 2)
    assert tc.lr == 0.004  # the schedule multiplies the transferred LR; it does not replace it
    # the large run uses exactly this schedule: the logged LR of step s is lr * factor(s - 1)
    rec_path = tmp_path / "run.yaml"
    data = recipe.model_dump(mode="json")
    data["run"]["model"]["scan_backend"] = "torch"
    data["launch"].update(run_dir=str(tmp_path / "run"), log_every=1, ckpt_every=100)
    rec_path.write_text(json.dumps(data))
    launch.run(load_recipe(rec_path))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    # warmup 4 steps, stable, then the last 25% (5 steps) linearly down
    want = [0.004 * w for w in [1 / 4, 2 / 4, 3 / 4] + [1.0] * 13 + [0.8, 0.6, 0.4, 0.2]]
    assert sorted(lrs) == list(range(1, 21))
    assert [lrs[s] for s in range(1, 21)] == pytest.approx(want, rel=1e-9)


def test_transfer_refuses_a_warmup_longer_than_the_run(cli) -> None:
    code, _, err = cli("transfer", "--lr", "0.004", "--width", "32", "--to-width", "64", "--steps", "10",
                       "--warmup", "10", "--out", "/dev/null")  # fmt: skip
    assert code == 2 and "--warmup 10" in err and "10 steps" in err, err


def test_fsdp_no_sync_defers_the_gradient_reduction_to_the_last_micro_batch() -> None:
    """Inside fsdp_no_sync a backward leaves the sharded parameters without .grad (no reduce-scatter ran);
    the next backward outside it reduces the sum of both micro-batches (== the unsharded model's gradient)."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard") or not torch.distributed.is_gloo_available():
        pytest.skip("needs FSDP2 (torch.distributed.fsdp.fully_shard) and gloo")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mupt.train import build_model, fsdp_no_sync

    torch.set_num_threads(1)
    cfg = tiny()
    ref, _ = build_model(cfg)
    model, _ = build_model(cfg)
    data = Trainer(cfg).data
    x, y = data.train_batch(0, 8, 32, 0, 0, 1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.backbone.layers:
            fsdp.fully_shard(layer, mesh=mesh)
        fsdp.fully_shard(model, mesh=mesh)
        halves = list(zip(x.chunk(2), y.chunk(2), strict=True))
        with fsdp_no_sync(model):
            lm_loss(model(halves[0][0]), halves[0][1]).backward()
        assert all(p.grad is None for p in model.parameters())  # accumulated unsharded, not reduced
        lm_loss(model(halves[1][0]), halves[1][1]).backward()
        for xm, ym in halves:
            lm_loss(ref(xm), ym).backward()
        want = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            got = p.grad.full_tensor()  # type: ignore[union-attr]
            torch.testing.assert_close(got, want[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    finally:
        dist.destroy_process_group()
