"""mupt tune: real Optuna studies on a tiny proxy (journal files, worker processes, SIGKILL, CLI exit codes)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from mupt.config import BestParams, RunConfig, load_yaml, with_overrides
from mupt.errors import ConfigError, StorageError
from mupt.tune import (
    TuneSettings,
    coarse_to_fine,
    load_best,
    lr_grid,
    open_storage,
    prepare_study,
    proxy_config,
    run_study,
    trial_rows,
    write_best,
    write_plots,
)

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "auto" if importlib.util.find_spec("mupt.scan.torch_scan") else "reference"

# Tiny proxy: 1 layer, d_model 32, 30 steps of 8 x 32 bytes, validation every 10 steps.
TINY = {
    "model.d_model": 32, "model.n_layers": 1, "model.scan_backend": BACKEND,
    "train.steps": 30, "train.seq_len": 32, "train.eval_every": 10,
}  # fmt: skip
TINY_FLAGS = ["--width", "32", "--layers", "1", "--seq-len", "32", "--eval-every", "10", "--backend", BACKEND]

# Dense log2 grid on TINY (AdamW, mup-ssm, builtin corpus, seed 0), final val loss in nats:
#   2^-9 3.40 | 2^-8 2.82 | 2^-7 2.65 | 2^-6 2.57 (best) | 2^-5 2.62 | 2^-4 2.81 | 2^-3 3.53 | 2^-2 2.96 | 2^0 diverged
# "Good" = within 10% of the grid's best (<= 2.82): 2^-8 .. 2^-4, widened by half an octave each side.
GOOD_LR = (2**-8.5, 2**-3.5)
GRID_BEST = 2.565


def tiny(**extra: object) -> RunConfig:
    return with_overrides(proxy_config(), {**TINY, **extra})


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def mupt(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mupt", *args], cwd=kw.get("cwd", ROOT), env=env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_proxy_recipe_is_the_builtin_default() -> None:
    assert load_yaml(ROOT / "recipes" / "proxy.yaml", RunConfig) == proxy_config()
    assert proxy_config().param.base_d_model is None  # base width = the proxy's own width


def test_log2_grid_and_coarse_to_fine_order() -> None:
    grid = lr_grid(1e-5, 1.0)
    assert grid[0] == 2.0**-16 and grid[-1] == 1.0 and len(grid) == 17
    order = coarse_to_fine(17)
    assert order[:3] == [0, 16, 8] and sorted(order) == list(range(17))


def test_tiny_study_finds_lr_in_good_range(tmp_path: Path) -> None:
    torch.set_num_threads(1)  # tiny model: one thread is fastest on a shared 2-core machine
    cfg = tiny()
    s = TuneSettings(study="tiny", trials=6, runs_dir=str(tmp_path), seed=0)
    study = run_study(s, cfg)
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(done) == 6
    bp, path = write_best(study, cfg, s.run_dir)
    assert GOOD_LR[0] <= bp.params["lr"] <= GOOD_LR[1], bp.params
    assert bp.value <= 1.1 * GRID_BEST
    # best.yaml: the proxy config with the tuned LR applied, and the manifest transfer needs
    back = load_best(path)
    assert isinstance(back, BestParams) and back == bp
    assert back.config.train.lr == bp.params["lr"] and back.config.model.d_model == 32
    assert back.manifest["scheme"] == "mup-ssm" and back.manifest["base_d_model"] == 32
    # reproducibility record on the study
    attrs = study.user_attrs
    assert attrs["proxy_config"]["train"]["steps"] == 30 and attrs["seed"] == 0 and attrs["data_source"] == "builtin"
    assert attrs["code_version"].startswith("mupt ")
    assert [p.name for p in write_plots(study, s.run_dir)] == ["history.png", "loss_vs_lr.png"]
    assert (s.run_dir / "journal.log").stat().st_size > 0
    # resuming with a different proxy is refused (results would mix)
    with pytest.raises(ConfigError, match="train.steps"):
        prepare_study(s, tiny(**{"train.steps": 40}))


def test_divergent_lr_is_pruned_with_reason(tmp_path: Path) -> None:
    cfg = tiny(**{"train.steps": 10})
    s = TuneSettings(study="boom", trials=2, lr_range=(10.0, 100.0), runs_dir=str(tmp_path))
    study = run_study(s, cfg)
    trials = study.get_trials()
    assert len(trials) == 2
    for t in trials:
        assert t.state is TrialState.PRUNED
        assert t.user_attrs["status"] == "diverged" and "diverged" in t.user_attrs["reason"]
    assert all("diverged" in r["reason"] for r in trial_rows(study))
    with pytest.raises(StorageError, match="no completed trial"):
        write_best(study, cfg, s.run_dir)


def test_two_worker_processes_fill_exact_total(tmp_path: Path) -> None:
    cfg = tiny(**{"train.steps": 10, "train.eval_every": 5})
    s = TuneSettings(study="par", trials=5, workers=2, runs_dir=str(tmp_path), pruner="none")
    run_study(s, cfg)
    study = optuna.load_study(study_name="par", storage=open_storage(s))
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    numbers = [t.number for t in study.get_trials()]
    assert len(finished) == 5
    assert len(numbers) == len(set(numbers))
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert all(t.user_attrs["worker"].count(":") == 2 for t in finished)


def test_sigkill_mid_trial_then_resume(tmp_path: Path) -> None:
    args = ["tune", *TINY_FLAGS, "--steps", "60", "--trials", "4", "--pruner", "none", "--runs-dir", str(tmp_path)]
    s = TuneSettings(study="proxy-w32", trials=4, runs_dir=str(tmp_path))
    proc = mupt(*args)
    victim = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if not (tmp_path / "proxy-w32" / "journal.log").exists():
                continue
            study = optuna.load_study(study_name="proxy-w32", storage=open_storage(s))
            done = study.get_trials(states=(TrialState.COMPLETE,))
            running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "worker" in t.user_attrs]
            if done and running:
                victim = running[0].number
                before = {t.number: t.value for t in done}
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None and victim is None:
            proc.kill()
        proc.wait()
    assert victim is not None, "the worker finished before it could be killed mid-trial"
    study = optuna.load_study(study_name="proxy-w32", storage=open_storage(s))
    assert study.trials[victim].state is TrialState.RUNNING  # left behind by the dead process

    proc = mupt(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    study = optuna.load_study(study_name="proxy-w32", storage=open_storage(s))
    after = {t.number: t for t in study.trials}
    assert all(after[n].state is TrialState.COMPLETE and after[n].value == v for n, v in before.items())
    assert after[victim].state is TrialState.FAIL and "died" in after[victim].user_attrs["reason"]
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 4
    assert load_best(tmp_path / "proxy-w32" / "best.yaml").study == "proxy-w32"


def test_bad_inputs_give_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "runs" / "proxy-w32").mkdir(parents=True)
    (tmp_path / "runs" / "proxy-w32" / "best.yaml").write_text("study: [unclosed\n")
    cases = {
        "negative width": (["tune", "--width", "-64"], "--width"),
        "width not multiple of 16": (["tune", "--width", "40"], "multiple of 16"),
        "unknown sampler": (["tune", "--sampler", "cmaes"], "cmaes"),
        "unreadable storage": (["tune", *TINY_FLAGS, "--storage", str(tmp_path / "nope" / "j.log")], "nope"),
        "bad storage url": (["tune", *TINY_FLAGS, "--storage", f"sqlite:///{tmp_path}/nope/x.db"], "nope"),
        "corrupt best.yaml": (["tune", *TINY_FLAGS, "--report", "--runs-dir", str(tmp_path / "runs")], "best.yaml"),
        "bad search": (["tune", *TINY_FLAGS, "--search", "lr,momentum"], "momentum"),
    }
    procs = {name: mupt(*args) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        assert cases[name][1] in err, (name, err)
    with pytest.raises(StorageError, match="no such best-params file"):
        load_best(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_best(tmp_path / "runs" / "proxy-w32" / "best.yaml")
