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
    assert recipe.manifest is not None
    mults = sorted({e.lr_mult for e in recipe.manifest.params.values()})
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
    assert parse_sinks("", always=()) == () and parse_sinks("mlflow,wandb", always=()) == ("mlflow", "wandb")
    with pytest.raises(ConfigError, match="--log 'jsonl,neptune'"):
        parse_sinks("jsonl,neptune")


def wandb_history(directory: Path) -> dict[str, list[dict[str, float]]]:
    """History rows of every offline W&B run under ``directory`` by run name, read from the run's
    ``.wandb`` transaction log (LevelDB log framing: 7-byte file header, 32 KiB blocks, 7-byte record
    headers) and parsed with wandb's own protobuf ``Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, list[dict[str, float]]] = {}
    for path in sorted(directory.glob("wandb/offline-run-*/run-*.wandb")):
        raw = path.read_bytes()
        assert raw[:4] == b":W&B"
        pos, block, pending, records = 7, 32768, b"", []
        while pos + 7 <= len(raw):
            left = block - pos % block
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
            if kind == 0:
                pos += left
                continue
            data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
            pending = data if kind in (1, 2) else pending + data
            if kind in (1, 4):
                records.append(pending)
        name, rows = None, []
        for data in records:
            rec = pb.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                name = rec.run.display_name
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        assert name is not None
        out.setdefault(name, []).extend(rows)
    return out


def mlflow_runs(store: Path, experiment: str) -> dict[str, tuple[str, dict[str, str]]]:
    """MLflow runs of ``experiment`` in the file store: run name -> (run id, params), via MlflowClient."""
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    return {r.info.run_name: (r.info.run_id, r.data.params) for r in client.search_runs([exp.experiment_id])}


def mlflow_metric(store: Path, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_scale_wandb_offline_and_mlflow_file_store_hold_the_metrics(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    torch.set_num_threads(1)
    recipe_path, run_dir = make_recipe(tmp_path, "wm", steps=4, ckpt_every=4, log="jsonl,wandb,mlflow")
    launch.run(load_recipe(recipe_path))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(train) == [1, 2, 3, 4]

    history = wandb_history(run_dir)
    assert list(history) == [run_dir.name]
    by_step: dict[int, dict[str, float]] = {}
    for row in history[run_dir.name]:
        by_step.setdefault(int(row["_step"]), {}).update(row)
    for step, r in train.items():
        assert by_step[step]["train/loss"] == pytest.approx(r["loss"], rel=1e-12)
        assert by_step[step]["lr/base"] == pytest.approx(r["lr"], rel=1e-12)
    assert by_step[4]["val/loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-12)

    runs = mlflow_runs(run_dir / "mlruns", "mupt-scale")
    assert list(runs) == [run_dir.name]
    run_id, params = runs[run_dir.name]
    assert float(params["lr"]) == load_recipe(recipe_path).run.train.lr
    loss = mlflow_metric(run_dir / "mlruns", run_id, "train/loss")
    assert loss == pytest.approx({s: r["loss"] for s, r in train.items()}, rel=1e-12)


def test_tune_log_writes_one_curve_per_trial_in_every_sink(tmp_path: Path, cli) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    import optuna
    from optuna.trial import TrialState

    from mupt.tune import TuneSettings, open_storage

    args = ["tune", "--width", "32", "--layers", "1", "--seq-len", "32", "--steps", "6", "--eval-every", "3",
            "--trials", "2", "--fidelity", "steps", "--pruner", "none", "--workers", "1", "--threads", "1",
            "--runs-dir", str(tmp_path), "--study", "logs", "--log", "jsonl,tensorboard,wandb,mlflow"]  # fmt: skip
    code, _, err = cli(*args)
    assert code == 0, err
    storage = open_storage(TuneSettings(study="logs", runs_dir=str(tmp_path)))
    study = optuna.load_study(study_name="logs", storage=storage)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2
    root = tmp_path / "logs"
    history = wandb_history(root)
    runs = mlflow_runs(root / "mlruns", "logs")
    for t in trials:
        name = f"logs-t{t.number:04d}"
        rows = [json.loads(x) for x in (root / "curves" / f"{name}.jsonl").read_text().splitlines()]
        curve = {r["step"]: r for r in rows}
        assert sorted(s for s, r in curve.items() if "train/loss" in r) == list(range(1, 7))
        # the validation losses Optuna stored for the pruner are the curve's
        val = {s: r["val/loss"] for s, r in curve.items() if "val/loss" in r}
        assert val == pytest.approx(t.intermediate_values, rel=1e-12) and sorted(val) == [3, 6]
        assert curve[6]["val/loss"] == pytest.approx(t.value, rel=1e-12)
        tb = scalars(root / "tensorboard" / name)
        assert tb["val/loss"] == pytest.approx(val, rel=1e-6)
        wb = {int(r["_step"]): r for r in history[name] if "train/loss" in r}
        assert {s: r["train/loss"] for s, r in wb.items()} == pytest.approx(
            {s: r["train/loss"] for s, r in curve.items() if "train/loss" in r}, rel=1e-12
        )
        run_id, params = runs[name]
        assert float(params["lr"]) == pytest.approx(t.params["lr"], rel=1e-12)
        assert mlflow_metric(root / "mlruns", run_id, "val/loss") == pytest.approx(val, rel=1e-12)
