"""mupt scale --log jsonl,tensorboard: event files read back with the tensorboard package itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_launch import make_recipe

from mupt import launch
from mupt.config import load_recipe
from mupt.errors import ConfigError
from mupt.sinks import parse_sinks


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_match_metrics_jsonl_and_survive_a_resume(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")  # a dev dependency; the sink itself raises a one-line error without it
    torch.set_num_threads(1)
    recipe_path, run_dir = make_recipe(tmp_path, "tb", steps=6, ckpt_every=3, log="jsonl,tensorboard")
    recipe = load_recipe(recipe_path)
    launch.run(recipe)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tb = scalars(run_dir / "tensorboard")
    train = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(tb["train/loss"]) == sorted(train) == list(range(1, 7))
    for step, r in train.items():  # event files hold float32
        assert tb["train/loss"][step] == pytest.approx(r["loss"], rel=1e-6)
        assert tb["train/grad_norm"][step] == pytest.approx(r["grad_norm"], rel=1e-6)
        assert tb["lr/base"][step] == pytest.approx(r["lr"], rel=1e-6)
        assert tb["train/tokens_per_s"][step] > 0
    # one LR curve per optimizer group, each = base LR x the group's width-rule multiplier
    mults = sorted({float(v["lr_mult"]) for v in recipe.manifest["params"].values()})
    groups = sorted(t for t in tb if t.startswith("lr/group"))
    assert sorted(float(t.rsplit("_x", 1)[1]) for t in groups) == mults == [0.5, 1.0]
    for tag in groups:
        mult = float(tag.rsplit("_x", 1)[1])
        assert all(tb[tag][s] == pytest.approx(train[s]["lr"] * mult, rel=1e-6) for s in train)
    assert sorted(tb["val/loss"]) == [r["step"] for r in rows if "val_loss" in r]

    # a longer rerun resumes from step 6: the curve continues, nothing duplicated
    launch.run(launch.apply_overrides(recipe, steps=9), reschedule=True)
    tb = scalars(run_dir / "tensorboard")
    assert sorted(tb["train/loss"]) == list(range(1, 10))


def test_unknown_sink_is_one_line_error() -> None:
    assert parse_sinks("tensorboard") == ("jsonl", "tensorboard")
    with pytest.raises(ConfigError, match="--log 'jsonl,wandb'"):
        parse_sinks("jsonl,wandb")
