from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mupt.config import RunConfig, load_yaml

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--width", "32", "--layers", "1", "--d-state", "8", "--batch-size", "4", "--seq-len", "32"]


def test_train_writes_config_and_metrics(cli, tmp_path: Path) -> None:
    code, out, err = cli("train", *TINY, "--steps", "6", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "Training summary" in out and "final val loss" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["steps"] == 6 and len(metrics["train_loss"]) == 6
    cfg = load_yaml(tmp_path / "run" / "config.yaml", RunConfig)
    assert cfg.model.d_model == 32 and cfg.train.steps == 6


def test_config_file_with_flag_override(cli, tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "model: {d_model: 32, n_layers: 1, d_state: 8}\ntrain: {steps: 3, batch_size: 2, seq_len: 16}\n"
    )
    code, _, err = cli("train", "--config", str(tmp_path / "c.yaml"), "--steps", "2", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["steps"] == 2


def one_line_exit_2(result: tuple[int, str, str], *needles: str) -> None:
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()  # progress lines (stderr is not a terminal here) may precede the error
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_bad_inputs_exit_2_with_one_line(cli, tmp_path: Path) -> None:
    one_line_exit_2(cli("train", "--width", "-3"), "--width", "-3")
    one_line_exit_2(cli("train", "--optimizer", "lion"), "lion")
    one_line_exit_2(cli("train", "--config", str(tmp_path / "missing.yaml")), "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [1, 2")
    one_line_exit_2(cli("train", "--config", str(tmp_path / "bad.yaml")), "not valid YAML")
    one_line_exit_2(cli("train", "--data", str(tmp_path / "nope.txt")), "nope.txt")
    one_line_exit_2(cli("train", "--width", "40"), "multiple of 16")


def test_diverging_run_exits_2_and_keeps_metrics(cli, tmp_path: Path) -> None:
    res = cli("train", *TINY, "--steps", "30", "--lr", "50", "--out", str(tmp_path / "r"))
    one_line_exit_2(res, "diverged", "--lr")
    text = (tmp_path / "r" / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.json: not strict JSON"))
    assert metrics["status"] == "diverged" and None in metrics["train_loss"]  # the NaN/inf loss, written as null


def test_existing_run_dir_is_never_overwritten_without_flag(cli, tmp_path: Path) -> None:
    run = tmp_path / "t1"
    code, _, err = cli("train", *TINY, "--steps", "3", "--run-dir", str(run))
    assert code == 0, err
    finished = (run / "metrics.json").read_text()
    # another config into a finished run's dir: refused in one line, nothing written
    one_line_exit_2(cli("train", *TINY, "--steps", "2", "--run-dir", str(run)), "finished run", "--overwrite")
    assert (run / "metrics.json").read_text() == finished
    assert load_yaml(run / "config.yaml", RunConfig).train.steps == 3
    # the same config again: reported as done, exit 0, the files untouched
    code, out, err = cli("train", *TINY, "--steps", "3", "--run-dir", str(run))
    assert code == 0 and "already holds this run" in " ".join(out.split()), (out, err)
    assert (run / "metrics.json").read_text() == finished
    # --overwrite replaces it
    code, _, err = cli("train", *TINY, "--steps", "2", "--run-dir", str(run), "--overwrite")
    assert code == 0, err
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2


def test_interrupted_run_dir_is_kept(tmp_path: Path) -> None:
    """Ctrl-C (a real SIGINT) writes the partial metrics; a rerun into that dir is refused, not overwritten."""
    run = tmp_path / "t1"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "mupt", "train", *TINY, "--steps", "100000", "--run-dir", str(run)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    header = proc.stdout.readline()  # printed once the data and model are built, before the first step
    assert header.startswith("mupt train"), header
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    partial = (run / "metrics.json").read_text()
    assert json.loads(partial)["status"] == "interrupted"
    res = subprocess.run([*args[:-4], "--steps", "2", "--run-dir", str(run)], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "interrupted run" in res.stderr and "--overwrite" in res.stderr, res.stderr
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)  # same config: no resume either
    assert res.returncode == 2 and "interrupted run" in res.stderr, res.stderr
    assert (run / "metrics.json").read_text() == partial
