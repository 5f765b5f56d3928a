"""mupt tune: real Optuna studies on a tiny proxy (journal files, worker processes, SIGKILL, CLI exit codes).

Width-fidelity tests use a proxy at d_model 64, whose rungs are d_model 16, 32 and 64.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import pytest
import torch
from optuna.trial import TrialState

from mupt.config import BestParams, RunConfig, load_yaml, with_overrides
from mupt.errors import ConfigError, StorageError
from mupt.transfer import lr_found_by
from mupt.tune import (
    INTERRUPTED,
    JOURNAL_LOCK_GRACE,
    Ladder,
    TuneSettings,
    clear_stale_journal_lock,
    close_interrupted,
    coarse_to_fine,
    drift_fit,
    is_complete,
    load_best,
    load_existing,
    lr_grid,
    make_objective,
    open_ladder,
    open_storage,
    plot_groups,
    prepare_study,
    proxy_config,
    recorded_fit,
    remove_lock_file,
    run_study,
    run_worker,
    rung_summaries,
    rung_width_note,
    rungs_for,
    study_lock,
    trial_rows,
    vertex_fit,
    worker_id,
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


T = TypeVar("T")


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def mupt(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mupt", *args], cwd=kw.get("cwd", ROOT), env=env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def wait_for(
    proc: subprocess.Popen[str],
    probe: Callable[[], T | None],
    timeout: float,
    interval: float = 0.2,
    transient: tuple[type[Exception], ...] = (KeyError, StorageError),
) -> T | None:
    """Poll ``probe()`` every ``interval`` s while ``proc`` runs; return its first non-None value, or None when
    the process ended or ``timeout`` s passed.  ``transient`` errors (the study not in the storage yet: the
    journal file can exist a moment before the study's first record is in it) count as "not yet"."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(interval)
        try:
            found = probe()
        except transient:
            continue
        if found is not None:
            return found
    return None


def _load(s: TuneSettings, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(s))


def mid_trial(s: TuneSettings, name: str, attr: str) -> Callable[[], tuple[int, dict[int, float]] | None]:
    """A :func:`wait_for` probe of study ``name``: (a RUNNING trial's number, {COMPLETE trial: value}) once
    it has both; a RUNNING trial counts once its user_attrs hold ``attr`` (set when its worker started it)."""
    journal = Path(s.runs_dir) / name / "journal.log"

    def probe() -> tuple[int, dict[int, float]] | None:
        if not journal.exists():  # do not create it before the tune process does
            return None
        study = _load(s, name)
        done = study.get_trials(states=(TrialState.COMPLETE,))
        running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if attr in t.user_attrs]
        return (running[0].number, {t.number: t.value for t in done}) if done and running else None

    return probe


def kill_when(proc: subprocess.Popen[str], probe: Callable[[], T | None], timeout: float, **kw: Any) -> T | None:
    """SIGKILL ``proc`` as soon as ``probe()`` (see :func:`wait_for`) finds something, and return that; the
    process is killed and reaped whatever happens (None: it ended, or the time ran out, first)."""
    try:
        return wait_for(proc, probe, timeout, **kw)
    finally:
        if proc.poll() is None:
            proc.kill()  # SIGKILL
        proc.wait()


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
    s = TuneSettings(study="tiny", trials=6, runs_dir=str(tmp_path), seed=0, fidelity="steps")
    ladder = run_study(s, cfg)
    study = ladder.study
    assert len(ladder.rungs) == 1 and ladder.rungs[0].d_model == 32  # --fidelity steps: today's single study
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(done) == 6
    # the default LR range spends most trials near plausible LRs: none diverges on this proxy (issue 14, item 12)
    assert not [t for t in done if t.user_attrs.get("status") == "diverged"]
    bp, path = write_best(ladder, cfg, s.run_dir)
    assert GOOD_LR[0] <= bp.params["lr"] <= GOOD_LR[1], bp.params
    assert bp.value <= 1.1 * GRID_BEST
    # best.yaml: the proxy config with the tuned LR applied, and the manifest transfer needs
    back = load_best(path)
    assert isinstance(back, BestParams) and back == bp
    assert back.config.train.lr == bp.params["lr"] and back.config.model.d_model == 32
    assert back.manifest is not None and back.manifest.scheme == "mup-ssm" and back.manifest.base_d_model == 32
    # reproducibility record on the study
    attrs = study.user_attrs
    assert attrs["proxy_config"]["train"]["steps"] == 30 and attrs["seed"] == 0 and attrs["data_source"] == "builtin"
    assert attrs["code_version"].startswith("mupt ")
    assert [p.name for p in write_plots(ladder, s.run_dir)] == ["history.png", "loss_vs_lr.png"]
    assert (s.run_dir / "journal.log").stat().st_size > 0
    # resuming with a different proxy is refused (results would mix)
    with pytest.raises(ConfigError, match="train.steps"):
        prepare_study(s, tiny(**{"train.steps": 40}))


def test_neighbouring_seeds_draw_unrelated_points(tmp_path: Path) -> None:
    """--seed 1's trials are not --seed 0's shifted by one (each trial reseeds the sampler from the history:
    with seed + trial number as its seed, five benchmark seeds shared most of their start-up points)."""
    cfg = tiny(**{"train.steps": 2, "train.eval_every": 1})
    lrs = []
    for seed in (0, 1):
        s = TuneSettings(study=f"s{seed}", trials=3, seed=seed, runs_dir=str(tmp_path), fidelity="steps", pruner="none")
        lrs.append([t.params["lr"] for t in run_study(s, cfg).study.trials])
    assert len(lrs[0]) == len(lrs[1]) == 3
    assert not set(lrs[0]) & set(lrs[1]), lrs


def test_divergent_lr_is_pruned_with_reason(tmp_path: Path) -> None:
    cfg = tiny(**{"train.steps": 10})
    s = TuneSettings(study="boom", trials=2, lr_range=(10.0, 100.0), runs_dir=str(tmp_path), fidelity="steps")
    ladder = run_study(s, cfg)
    trials = ladder.study.get_trials()
    assert len(trials) == 2
    for t in trials:
        assert t.state is TrialState.PRUNED
        assert t.user_attrs["status"] == "diverged" and "diverged" in t.user_attrs["reason"]
    assert all("diverged" in r["reason"] for r in trial_rows(ladder))
    # honest plots (issue 14, item 11): diverged trials are labelled as such, not drawn as losses
    groups = plot_groups(ladder)
    assert set(groups["loss_vs_lr"]) == {"diverged (no loss; drawn at the top edge)"}
    assert set(groups["history"]) == {"diverged (no loss; drawn at the top edge)"}
    with pytest.raises(StorageError, match="no completed trial"):
        write_best(ladder, cfg, s.run_dir)


def test_two_worker_processes_fill_exact_total(tmp_path: Path) -> None:
    cfg = tiny(**{"train.steps": 10, "train.eval_every": 5})
    s = TuneSettings(study="par", trials=5, workers=2, runs_dir=str(tmp_path), pruner="none", fidelity="steps")
    run_study(s, cfg)
    study = optuna.load_study(study_name="par", storage=open_storage(s))
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    numbers = [t.number for t in study.get_trials()]
    assert len(finished) == 5
    assert len(numbers) == len(set(numbers))
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert all(t.user_attrs["worker"].count(":") == 2 for t in finished)


def test_sigkill_mid_trial_then_resume(tmp_path: Path) -> None:
    args = ["tune", *TINY_FLAGS, "--steps", "60", "--trials", "4", "--pruner", "none", "--runs-dir", str(tmp_path),
            "--fidelity", "steps"]  # fmt: skip
    s = TuneSettings(study="proxy-w32", trials=4, runs_dir=str(tmp_path), fidelity="steps")
    found = kill_when(mupt(*args), mid_trial(s, "proxy-w32", "worker"), 120, transient=(KeyError,))
    assert found is not None, "the worker finished before it could be killed mid-trial"
    victim, before = found
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


# --- width as a fidelity (issue 16) --------------------------------------------------------------

W64 = {**TINY, "model.d_model": 64}
W64_FLAGS = ["--width", "64", "--layers", "1", "--seq-len", "32", "--eval-every", "10", "--backend", BACKEND]


def count_flops_per_step(cfg: RunConfig) -> float:
    """Independent reference: 6 x (every parameter but the embedding) + 27 x layers x N_u x N_x, x tokens/step."""
    from mupt.model import MambaLM

    model = MambaLM(cfg.model)
    params = sum(p.numel() for n, p in model.named_parameters() if "embedding" not in n)
    m = cfg.model
    per_token = 6 * params + 27 * m.n_layers * m.expand * m.d_model * m.d_state
    return per_token * cfg.train.batch_size * cfg.train.seq_len


def test_width_ladder_rungs_widths_flops_and_best_at_proxy_width(tmp_path: Path) -> None:
    from mupt.train import train

    torch.set_num_threads(1)
    cfg = with_overrides(proxy_config(), W64)
    s = TuneSettings(study="ladder", trials=6, finalist="rank", reduction=3, runs_dir=str(tmp_path), pruner="none")
    ladder = run_study(s, cfg)
    assert [(r.d_model, r.size) for r in ladder.rungs] == [(16, 6), (32, 2), (64, 1)]
    for rung, study in zip(ladder.rungs, ladder.studies, strict=True):
        done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
        assert len(done) == rung.size
        ref = count_flops_per_step(with_overrides(cfg, {"model.d_model": rung.d_model}))
        for t in done:
            assert t.user_attrs["d_model"] == rung.d_model and t.user_attrs["rung"] == rung.index
            assert t.user_attrs["flops"] == pytest.approx(t.user_attrs["steps"] * ref, rel=1e-9)
    # promotion by rank: rung i ran exactly the best rung-(i-1) configurations, with their params
    for i in (1, 2):
        below = sorted(ladder.studies[i - 1].get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
        took = ladder.studies[i].get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
        assert sorted(t.user_attrs["promoted_from"] for t in took) == sorted(t.number for t in below[: len(took)])
        for t in took:
            assert t.params == ladder.studies[i - 1].trials[t.user_attrs["promoted_from"]].params
    # the answer is measured at the proxy width: retrain it independently and get the same loss
    bp, path = write_best(ladder, cfg, s.run_dir)
    assert bp.config.model.d_model == 64 and bp.fidelity == "width"
    assert train(bp.config).final_val_loss == pytest.approx(bp.value, rel=1e-6)
    back = load_best(path)
    assert [f["d_model"] for f in back.finalists[0]["fidelities"]] == [16, 32, 64]
    assert back.finalists[0]["fidelities"][-1]["trial"] == bp.trial
    # every rung is trained under the proxy's base shape (same width rules at every width)
    narrow = ladder.studies[0].trials[0]
    assert narrow.user_attrs["d_model"] == 16
    names = [p.name for p in write_plots(ladder, s.run_dir)]
    assert names == ["history.png", "loss_vs_lr.png", "rungs.png", "compute.png"]


def _schedule(cfg: RunConfig, **kw: object) -> list[tuple[int, int, int, str]]:
    return [(r.d_model, r.size, r.extrapolated, r.study_name) for r in rungs_for(TuneSettings(study="s", **kw), cfg)]


def test_rung_schedule_leaves_out_a_rung_that_selects_nothing() -> None:
    """--finalist rank: rung sizes round(trials / reduction^i); a rung below the proxy that would pass every
    trial it holds on to the next rung (16 at reduction 4: 16, 4, 1, 1) is left out; --extrapolate adds one
    proxy-width trial when two rungs lie below the proxy and the LR is searched alone."""
    cfg = proxy_config()  # d_model 256: rungs at 32, 64, 128, 256
    assert _schedule(cfg, trials=16, reduction=3, finalist="rank") == [
        (32, 16, 0, "s"), (64, 5, 0, "s.rung1"), (128, 2, 0, "s.rung2"), (256, 1, 0, "s.rung3")]  # fmt: skip
    assert _schedule(cfg, trials=16, reduction=4, finalist="rank") == [
        (32, 16, 0, "s"), (64, 4, 0, "s.rung1"), (256, 1, 0, "s.rung2")]  # fmt: skip
    assert [r[:2] for r in _schedule(cfg, trials=32, reduction=4, finalist="rank")] == [
        (32, 32), (64, 8), (128, 2), (256, 1)]  # fmt: skip
    assert [r[:3] for r in _schedule(cfg, trials=16, reduction=4, extrapolate=True)] == [
        (32, 16, 0), (64, 4, 0), (256, 2, 1)]  # fmt: skip
    assert [r[:3] for r in _schedule(cfg, trials=4, reduction=4, extrapolate=True)] == [(32, 4, 0), (256, 1, 0)]
    assert [r[:3] for r in _schedule(cfg, trials=16, reduction=4, extrapolate=True, search="lr,output_mult")] == [
        (32, 16, 0), (64, 4, 0), (256, 1, 0)]  # fmt: skip
    assert _schedule(cfg, trials=16, fidelity="steps", extrapolate=True) == [(256, 16, 0, "s")]


def test_fit_finalist_schedule_is_the_default_for_the_lr_alone() -> None:
    """The default (--finalist fit when only the LR is searched): rung 0 at proxy/8, then one proxy-width
    trial in the extrapolated slot; with multipliers searched the default is the rank ladder, and asking for
    the fit with them, or with --extrapolate, is refused in one line."""
    cfg = proxy_config()
    assert _schedule(cfg, trials=16) == [(32, 16, 0, "s"), (256, 1, 1, "s.rung1")]
    assert _schedule(cfg, trials=16, reduction=8) == [(32, 16, 0, "s"), (256, 1, 1, "s.rung1")]  # no effect
    assert _schedule(cfg, trials=16, search="lr,output_mult") == [
        (32, 16, 0, "s"), (64, 5, 0, "s.rung1"), (128, 2, 0, "s.rung2"), (256, 1, 0, "s.rung3")]  # fmt: skip
    assert _schedule(with_overrides(cfg, {"model.d_model": 32}), trials=4) == [(16, 4, 0, "s"), (32, 1, 1, "s.rung1")]
    assert _schedule(with_overrides(cfg, {"model.d_model": 16}), trials=4) == [(16, 4, 0, "s")]
    # rung 0 trains every trial to the end under the fit (both sides of the optimum), halves under rank
    assert [TuneSettings(study="s", **kw).pruner_mode.value for kw in (  # type: ignore[arg-type]
        {}, {"finalist": "rank"}, {"search": "lr,output_mult"}, {"fidelity": "steps"}, {"pruner": "median"})] == [
        "none", "asha", "asha", "asha", "median"]  # fmt: skip
    for bad, match in (({"search": "lr,output_mult"}, "--finalist rank, or --search lr"),
                       ({"extrapolate": True}, "use it with --finalist rank"),
                       ({"lr_drift": 3.0}, "--lr-drift 3: must be within -1..1")):  # fmt: skip
        with pytest.raises(ConfigError, match=match) as e:
            TuneSettings(study="s", finalist="fit", **bad)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
    # flags that would be ignored are refused (fresh-user walkthrough 3, finding 3)
    for kw, match in (
        (
            {"finalist": "rank", "lr_drift": -0.3},
            "--lr-drift applies to --finalist fit only, and this "
            "study runs --finalist rank; drop --lr-drift, or use --finalist fit",
        ),
        ({"search": "lr,output_mult", "lr_drift": 0.0}, "runs --finalist rank; drop --lr-drift$"),
        ({"fidelity": "steps", "lr_drift": 0.0}, "runs --fidelity steps; drop --lr-drift$"),
        ({"fidelity": "steps", "finalist": "fit"}, "--finalist fit applies to --fidelity width only"),
    ):
        with pytest.raises(ConfigError, match=match):
            TuneSettings(study="s", **kw)  # type: ignore[arg-type]


def test_a_study_made_under_another_rung_schedule_is_refused_not_misread(tmp_path: Path) -> None:
    """A study created with --reduction 8 (rungs 32, 64, 256) opened with --finalist rank's default (rungs 32,
    64, 128, 256) or with the default fit (32, 256): resuming and --report both refuse in one line naming the
    flags, instead of reading the proxy rung's trials (d_model 256) as d_model 128's.  A study whose rungs
    look alike (32x16, 256x1) but whose proxy trial was promoted by rank, or fitted under another drift, is
    refused on the finalist."""
    cfg = with_overrides(proxy_config(), {"model.scan_backend": BACKEND})
    prepare_study(TuneSettings(study="r8", reduction=8, finalist="rank", runs_dir=str(tmp_path)), cfg)
    for now, words in (
        (TuneSettings(study="r8", finalist="rank", runs_dir=str(tmp_path)), "rungs 32x16, 64x5, 128x2, 256x1 now"),
        (TuneSettings(study="r8", runs_dir=str(tmp_path)), "rungs 32x16, 256x1 now"),
    ):
        for call in (prepare_study, load_existing):
            with pytest.raises(ConfigError, match=r"rung schedule \(--trials, --finalist, --reduction") as e:
                call(now, cfg)
            assert "\n" not in str(e.value)
            assert f"rungs 32x16, 64x2, 256x1 then, {words}" in str(e.value)  # in words
    assert len(load_existing(TuneSettings(study="r8", reduction=8, finalist="rank", runs_dir=str(tmp_path)),
                             cfg).rungs) == 3  # fmt: skip
    prepare_study(TuneSettings(study="r16", reduction=16, finalist="rank", runs_dir=str(tmp_path)), cfg)  # 32x16, 256x1
    with pytest.raises(ConfigError, match=r"different finalist \(--finalist, --lr-drift\) \(finalist: 'rank' then"):
        prepare_study(TuneSettings(study="r16", runs_dir=str(tmp_path)), cfg)
    prepare_study(TuneSettings(study="fit", runs_dir=str(tmp_path)), cfg)
    with pytest.raises(ConfigError, match=r"LR drift -0.15 octave per doubling\)' then, .*LR drift 0 octave"):
        load_existing(TuneSettings(study="fit", lr_drift=0.0, runs_dir=str(tmp_path)), cfg)


def _add(study: optuna.Study, log2_lr: float, loss: float, **attrs: object) -> int:
    dist = {"lr": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)}
    trial = optuna.trial.create_trial(params={"lr": 2.0**log2_lr}, distributions=dist, value=loss, user_attrs=attrs)
    study.add_trial(trial)
    return study.trials[-1].number


@pytest.mark.parametrize("drift", [-0.25, -2.0])
def test_drift_fit_recovers_a_known_drift(tmp_path: Path, drift: float) -> None:
    """Losses from parabolas in log2 LR (one curvature, as the fit assumes) whose minimum moves by ``drift``
    octaves per doubling of d_model (at 32: -9): the fit finds both rungs' minima and the line through them,
    put at the proxy's d_model 256 and kept within one octave of the LRs measured. Rung 0's trials that
    rung 1 did not take are not used."""
    cfg = proxy_config()
    s = TuneSettings(study="fit", trials=16, reduction=4, extrapolate=True, runs_dir=str(tmp_path))
    ladder = open_ladder(s, cfg)
    assert [r.d_model for r in ladder.rungs] == [32, 64, 256]

    def opt(width: int) -> float:
        return -9.0 + drift * math.log2(width / 32)

    promoted = [-10.5, -9.5, -8.5, -7.5]
    sources = [_add(ladder.studies[0], x, 2.0 + 0.05 * (x - opt(32)) ** 2) for x in promoted]
    _add(ladder.studies[0], -14.0, 2.05)  # not promoted: a fit that used it would be off
    for x, src in zip(promoted, sources, strict=True):
        _add(ladder.studies[1], x, 1.9 + 0.05 * (x - opt(64)) ** 2, promoted_from=src)
    fit = drift_fit(ladder)
    assert fit is not None and fit.points == 8
    assert fit.optima[32] == pytest.approx(opt(32), abs=1e-6) and fit.optima[64] == pytest.approx(opt(64), abs=1e-6)
    assert fit.slope == pytest.approx(drift, abs=1e-6)
    if drift == -0.25:
        assert not fit.clipped and fit.log2_lr == pytest.approx(opt(256), abs=1e-6)
    else:  # -2 octaves per doubling would put it at -15: one octave below the lowest LR measured is the limit
        assert fit.clipped and fit.log2_lr == pytest.approx(min(promoted) - 1.0)
    assert fit.lr == pytest.approx(2.0**fit.log2_lr)


def test_vertex_fit_finds_rung0_minimum_and_moves_it_by_the_drift(tmp_path: Path) -> None:
    """--finalist fit: the vertex of a parabola through rung 0's losses within two octaves of its best trial
    (farther trials, where loss against log2 LR is skewed, left out), moved by --lr-drift per doubling from
    d_model 32 to 256 (3 doublings); the best trial stands in when no parabola opening upwards fits; the LR
    stays inside the search range; no COMPLETE rung-0 trial, no finalist."""
    cfg = proxy_config()

    def ladder_with(name: str, points: list[tuple[float, float]], **kw: object) -> Ladder:
        ladder = open_ladder(TuneSettings(study=name, runs_dir=str(tmp_path), **kw), cfg)  # type: ignore[arg-type]
        assert [(r.d_model, r.size, r.extrapolated) for r in ladder.rungs] == [(32, 16, 0), (256, 1, 1)]
        for x, y in points:
            _add(ladder.studies[0], x, y)
        return ladder

    near = [(x, 2.0 + 0.05 * (x + 8.8) ** 2) for x in (-10.5, -9.5, -9.0, -8.5, -7.5)]  # minimum at -8.8
    far = [(-14.0, 2.3), (-5.0, 2.9)]  # off the parabola: a fit that used them would move the vertex
    fit = vertex_fit(ladder_with("v", near + far))
    assert fit is not None and fit.method == "vertex" and fit.points == 5 and not fit.clipped
    assert fit.optima == {32: pytest.approx(-8.8, abs=1e-9)}
    # the parabola rungs.png draws: 2 + 0.05 (x + 8.8)^2 = 5.872 + 0.88 x + 0.05 x^2, over the trials fitted
    assert fit.parabola == pytest.approx((0.05, 0.88, 5.872, -10.5, -7.5), abs=1e-9)
    assert fit.log2_lr == pytest.approx(-8.8 - 0.15 * 3, abs=1e-9) and fit.lr == pytest.approx(2.0 ** (-9.25))
    assert vertex_fit(ladder_with("v0", near, lr_drift=0.0)).log2_lr == pytest.approx(-8.8, abs=1e-9)  # type: ignore[union-attr]
    two = vertex_fit(ladder_with("two", [(-9.0, 2.01), (-8.0, 2.0)]))
    assert two is not None and two.method == "best" and two.log2_lr == pytest.approx(-8.45)
    said = lr_found_by({"obtained": "extrapolated", "drift_fit": two.to_attrs()})  # the summary's words
    assert said.startswith("the best of rung 0's losses: 2^-8.00 at d_model 32") and "2 trials within two" in said
    concave = vertex_fit(ladder_with("cc", [(-10.0, 2.0), (-9.0, 2.05), (-8.0, 2.06), (-5.0, 2.01)]))
    assert concave is not None and concave.method == "best" and concave.optima == {32: -10.0}
    # the vertex lies below the LRs fitted: kept at the lowest; minus 0.45 octave leaves the range 1e-4..1e-1
    edge = vertex_fit(ladder_with("edge", [(-13.2, 2.0), (-12.8, 2.05), (-12.4, 2.15)]))
    assert edge is not None and edge.optima == {32: pytest.approx(-13.2)} and edge.clipped
    assert edge.lr == pytest.approx(1e-4) and edge.log2_lr == pytest.approx(math.log2(1e-4))
    assert vertex_fit(ladder_with("none", [])) is None


def test_fit_finalist_two_workers_one_proxy_trial_at_the_fitted_lr(tmp_path: Path) -> None:
    """The default schedule run by two worker processes: rung 0 holds exactly --trials, the proxy rung exactly
    one trial, at the LR of the parabola through rung 0's losses (recomputed here with numpy) moved by
    -0.15 x 2 octaves (d_model 16 -> 64); best.yaml is that trial, and retraining its config gives its loss."""
    import numpy as np

    from mupt.train import train

    torch.set_num_threads(1)
    cfg = with_overrides(proxy_config(), {**W64, "train.steps": 10, "train.eval_every": 5})
    s = TuneSettings(study="fit2", trials=8, workers=2, runs_dir=str(tmp_path), pruner="none", sampler="grid")
    run_study(s, cfg)
    assert not (tmp_path / "fit2" / "journal.log.mupt-lock").exists()  # removed once both workers finished
    ladder = open_ladder(s, cfg)
    assert [(r.d_model, r.size) for r in ladder.rungs] == [(16, 8), (64, 1)]
    done0 = ladder.studies[0].get_trials(states=(TrialState.COMPLETE,))
    assert len(ladder.studies[0].get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 8
    assert len({t.user_attrs["worker"] for t in done0}) == 2  # both processes ran trials
    top = [t for t in ladder.studies[1].get_trials() if t.state is not TrialState.FAIL]
    assert len(top) == 1 and top[0].state is TrialState.COMPLETE and "extrapolated" in top[0].user_attrs
    pts = sorted((math.log2(t.params["lr"]), float(t.value or 0.0)) for t in done0)
    best_x = min(pts, key=lambda p: p[1])[0]
    xs, ys = zip(*[(x, y) for x, y in pts if abs(x - best_x) <= 2.0], strict=True)
    assert len(xs) >= 3  # the grid's 8 points of 1e-4..1e-1 put three within two octaves of any best
    c2, c1, _ = np.polyfit(np.array(xs) - best_x, ys, 2)
    x0 = min(max(best_x - c1 / (2 * c2), min(xs)), max(xs)) if c2 > 0 else best_x
    assert math.log2(top[0].params["lr"]) == pytest.approx(x0 - 0.15 * 2, abs=1e-6)
    bp, path = write_best(ladder, cfg, s.run_dir)
    assert bp.trial == top[0].number and bp.config.model.d_model == 64
    assert [(f["obtained"], f["drift_fit"]["method"]) for f in load_best(path).finalists] == [
        ("extrapolated", "vertex" if c2 > 0 else "best")]  # fmt: skip
    assert train(bp.config).final_val_loss == pytest.approx(bp.value, rel=1e-6)


def test_rungs_png_draws_only_the_fit_the_study_recorded(tmp_path: Path) -> None:
    """rungs.png draws --finalist fit's parabola only once the study has recorded it on its proxy-width trial.
    After Ctrl-C inside rung 0 (4 of 6 trials finished) a parabola through the trials so far is a fit the study
    never used (before: drawn); once rung 0 is full and the proxy-width trial ran, the fit drawn is the one
    that trial recorded, the vertex of all six losses."""
    torch.set_num_threads(1)
    cfg = with_overrides(proxy_config(), {**W64, "train.steps": 10, "train.eval_every": 5})
    s = TuneSettings(study="rf", trials=6, runs_dir=str(tmp_path), pruner="none")
    ladder = open_ladder(s, cfg)
    for x in (-10.0, -9.0, -8.0, -7.0):  # losses on a parabola in log2 LR with its minimum at -8.5
        _add(ladder.studies[0], x, 3.0 + 0.05 * (x + 8.5) ** 2)
    assert vertex_fit(ladder) is not None and recorded_fit(ladder) is None
    assert [p.name for p in write_plots(ladder, s.run_dir)][2] == "rungs.png"  # drawn without a fit
    for x in (-11.0, -6.0):
        _add(ladder.studies[0], x, 3.0 + 0.05 * (x + 8.5) ** 2)
    assert recorded_fit(ladder) is None  # rung 0 is full, but no proxy-width trial has recorded a fit yet
    assert run_worker(s, cfg) == 1  # the proxy-width trial, at the fitted LR, trained at d_model 64
    (top,) = ladder.top.get_trials()
    fit = recorded_fit(ladder)
    assert fit is not None and fit.to_attrs() == top.user_attrs["extrapolated"] and fit.method == "vertex"
    assert fit.optima == {16: pytest.approx(-8.5, abs=1e-6)} and fit.points == 5  # -11 is beyond two octaves
    assert math.log2(top.params["lr"]) == pytest.approx(-8.5 - 0.15 * 2, abs=1e-6)


def test_a_fit_that_diverges_at_the_proxy_width_gets_a_stand_in_and_a_resume_reaches_it(tmp_path: Path) -> None:
    """--finalist fit whose proxy-width trial diverges: a second proxy-width trial one octave lower stands in,
    recorded in best.yaml and said in the summary, instead of a study without an answer.  Here rung 0 (d_model
    16; the grid 2^-3, 2^-2, 2^-1) is best at 2^-3, and --lr-drift 1 over two doublings puts the fit at 2^-1,
    which diverges at d_model 64 (2^-2 does not).  A study stopped (Ctrl-C) right after that divergence
    and rerun places the same stand-in and reaches the same answer."""
    torch.set_num_threads(1)
    flags = [*W64_FLAGS, "--steps", "10", "--eval-every", "5", "--trials", "3", "--sampler", "grid", "--pruner",
             "none", "--lr-range", "0.125,0.7", "--lr-drift", "1", "--runs-dir", str(tmp_path)]  # fmt: skip
    proc = mupt("tune", *flags, "--study", "dv")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err
    cfg = with_overrides(proxy_config(), {**W64, "train.steps": 10, "train.eval_every": 5})
    s = TuneSettings(study="dv", trials=3, sampler="grid", pruner="none", lr_range=(0.125, 0.7), lr_drift=1.0,
                     runs_dir=str(tmp_path))  # fmt: skip
    ladder = load_existing(s, cfg)
    rung0 = ladder.studies[0].get_trials(states=(TrialState.COMPLETE,))
    best0 = min(rung0, key=lambda t: float(t.value or 0.0))
    fitted = best0.params["lr"] * 2.0 ** (1.0 * 2)  # 2 trials within two octaves: the best trial stands for the vertex
    assert fitted == pytest.approx(0.5)
    first, stand_in = ladder.top.get_trials()
    assert first.params["lr"] == pytest.approx(fitted) and first.user_attrs["status"] == "diverged"
    assert stand_in.state is TrialState.COMPLETE and stand_in.params["lr"] == pytest.approx(fitted / 2)
    bp = load_best(tmp_path / "dv" / "best.yaml")
    assert bp.trial == stand_in.number and bp.params["lr"] == pytest.approx(0.25) and bp.config.model.d_model == 64
    (finalist,) = bp.finalists
    fit = finalist["drift_fit"]
    assert (fit["method"], fit["log2_lr"], fit["retry"], fit["diverged_log2_lr"], fit["stand_in_log2_lr"]) == (
        "best", -1.0, 1, [-1.0], -2.0)  # fmt: skip
    flat = " ".join(out.replace("│", " ").split())
    assert "rung 0's losses: 2^-3.00 at d_model 16, moved +1 octave per doubling -> 2^-1.00" in flat, out
    assert "; it diverged at the proxy width, and 2^-2.00, one octave below the last LR that diverged, stood in" in flat
    assert "best trial (proxy width) r1/t1" in flat, out

    # the same study stopped right after the divergence, then rerun: the same stand-in, the same answer
    s2 = s.model_copy(update={"study": "dv2"})

    def stop_after_divergence(p: Any) -> None:
        if p.last is not None and p.last.user_attrs.get("rung") == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(s2, cfg, stop_after_divergence)
    ladder2 = load_existing(s2, cfg)
    (diverged,) = ladder2.top.get_trials()
    assert diverged.user_attrs["status"] == "diverged" and not is_complete(ladder2)
    run_study(s2, cfg)
    assert [t.state for t in ladder2.top.get_trials()] == [TrialState.PRUNED, TrialState.COMPLETE]
    bp2, _ = write_best(ladder2, cfg, s2.run_dir)
    assert (bp2.trial, bp2.params, bp2.finalists[0]["drift_fit"]) == (bp.trial, bp.params, fit)
    assert bp2.value == pytest.approx(bp.value, rel=1e-6)


def test_a_fit_study_without_an_answer_says_why_in_one_line(tmp_path: Path) -> None:
    """A --finalist fit study that ends without an answer exits 2 with one line naming the LRs and the fix, and
    keeps its trials: the fitted LR and its stand-in diverged at the proxy width (rung 0's losses put the fit at
    2^-0.7 and --lr-range's LOW, 2^-0.75, leaves no room for a second stand-in), or no rung-0 trial completed.
    --report says the same; before, the first ended with "rerun the same command to resume" (nothing to run)
    and the second with "no finished trial at the proxy width yet"."""
    lo = 2.0**-0.75
    cfg = with_overrides(proxy_config(), {**W64, "train.steps": 10, "train.eval_every": 5})
    flags = [*W64_FLAGS, "--steps", "10", "--eval-every", "5", "--trials", "3", "--lr-range", f"{lo!r},1",
             "--runs-dir", str(tmp_path)]  # fmt: skip
    for name in ("dv", "none"):
        s = TuneSettings(study=name, trials=3, lr_range=(lo, 1.0), runs_dir=str(tmp_path))
        ladder = prepare_study(s, cfg).ladder
        for x in (-0.7, -0.4, -0.1):  # rung 0 (fixtures): a parabola in log2 LR with its minimum at -0.4
            if name == "dv":
                _add(ladder.studies[0], x, 3.0 + 0.1 * (x + 0.4) ** 2)
            else:
                dist: dict[str, optuna.distributions.BaseDistribution] = {
                    "lr": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)
                }
                ladder.studies[0].add_trial(optuna.trial.create_trial(
                    params={"lr": 2.0**x}, distributions=dist, state=TrialState.PRUNED,
                    user_attrs={"status": "diverged", "reason": "diverged: loss nan"}))  # fmt: skip
    proc = mupt("tune", *flags, "--study", "dv")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err, err
    line = " ".join(err.strip().splitlines()[-1].split())
    s = TuneSettings(study="dv", trials=3, lr_range=(lo, 1.0), runs_dir=str(tmp_path))
    ladder = load_existing(s, cfg)
    lrs = [t.params["lr"] for t in ladder.top.get_trials()]
    assert lrs == [pytest.approx(2.0 ** (-0.4 - 0.15 * 2)), pytest.approx(lo)]  # the fit, then LOW: no room below
    assert all(t.user_attrs["status"] == "diverged" for t in ladder.top.get_trials()) and is_complete(ladder)
    assert line.startswith(
        "error: study 'dv' has no answer: the fitted LR and 1 lower stand-in (no lower LR in "
        f"--lr-range) diverged at the proxy width d_model 64 (LR {lrs[0]:.3g}, {lo:.3g})"
    ), line
    assert f"--lr-range LOW,HIGH with HIGH at most {lo / 2:.3g}" in line and "--study NEW_NAME" in line, line
    assert len(ladder.studies[0].get_trials()) == 3  # kept
    for extra in ([], ["--report"]):  # nothing left to run; the report says the same
        proc = mupt("tune", *flags, "--study", "dv", *extra)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == (0 if extra else 2) and "Traceback" not in err, err
        assert "has no answer: the fitted LR and 1 lower stand-in" in " ".join(err.split()), err
    proc = mupt("tune", *flags, "--study", "none")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert " ".join(err.strip().splitlines()[-1].split()).startswith(
        "error: study 'none' has no answer: none of rung 0's 3 trials (d_model "
        "16) completed (diverged or pruned), so there is no LR to fit"
    ), err


def test_drift_fit_declines_a_rung_whose_lrs_span_less_than_an_octave(tmp_path: Path) -> None:
    cfg = proxy_config()
    s = TuneSettings(study="fit", trials=16, reduction=4, extrapolate=True, runs_dir=str(tmp_path))
    ladder = open_ladder(s, cfg)
    close = [-9.3, -9.1, -8.9, -8.7]  # TPE often clusters like this: 0.6 octave says little about the minimum
    sources = [_add(ladder.studies[0], x, 2.0 + 0.05 * (x + 9) ** 2) for x in close]
    for x, src in zip(close, sources, strict=True):
        _add(ladder.studies[1], x, 1.9 + 0.05 * (x + 9.2) ** 2, promoted_from=src)
    assert drift_fit(ladder) is None


def test_width_ladder_two_workers_no_duplicate_promotions(tmp_path: Path) -> None:
    """Two worker processes: every rung holds exactly its size, no configuration is promoted twice, and the
    drift-extrapolated finalist runs once, at the LR the fit of the finished narrow rungs gives; best.yaml
    says how each finalist was obtained."""
    cfg = with_overrides(proxy_config(), {**W64, "train.steps": 10, "train.eval_every": 5})
    s = TuneSettings(study="par2", trials=8, reduction=3, workers=2, runs_dir=str(tmp_path), pruner="none",
                     sampler="grid", extrapolate=True)  # fmt: skip
    run_study(s, cfg)
    ladder = open_ladder(s, cfg)
    assert [(r.d_model, r.size) for r in ladder.rungs] == [(16, 8), (32, 3), (64, 2)]
    for rung, study in zip(ladder.rungs, ladder.studies, strict=True):
        finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
        assert len(finished) == rung.size, rung
        assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
        if rung.index:
            sources = [t.user_attrs.get("promoted_from", "extrapolated") for t in study.get_trials()
                       if t.state is not TrialState.FAIL]  # fmt: skip
            assert len(sources) == len(set(sources)) == rung.size
    workers = {t.user_attrs["worker"] for t in ladder.studies[0].get_trials(states=(TrialState.COMPLETE,))}
    assert len(workers) == 2  # both processes ran trials
    fit = drift_fit(ladder)
    extrapolated = [t for t in ladder.studies[-1].get_trials() if "extrapolated" in t.user_attrs]
    assert fit is not None and len(extrapolated) == 1
    assert extrapolated[0].params["lr"] == pytest.approx(fit.lr, rel=1e-12)
    assert extrapolated[0].user_attrs["extrapolated"]["log2_lr"] == pytest.approx(fit.log2_lr, abs=1e-3)
    bp, _ = write_best(ladder, cfg, s.run_dir)
    how = {f["obtained"]: f for f in bp.finalists}
    assert set(how) == {"extrapolated", "promoted"}
    assert [f["d_model"] for f in how["extrapolated"]["fidelities"]] == [64] and "drift_fit" in how["extrapolated"]
    assert [f["d_model"] for f in how["promoted"]["fidelities"]] == [16, 32, 64]


def test_duplicate_retry_in_the_first_rung_does_not_stop_the_worker(tmp_path: Path) -> None:
    """Two retries of one failed trial queued in rung 0 (what two SQLite workers can do when both fail the
    same stale trial): the worker runs one, skips its twin, and goes on to fill every rung's budget."""
    cfg = with_overrides(proxy_config(), {**W64, "train.steps": 10, "train.eval_every": 5})
    s = TuneSettings(study="twins", trials=6, runs_dir=str(tmp_path), pruner="none")
    ladder = open_ladder(s, cfg)
    st0 = ladder.studies[0]
    failed = st0.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    st0.tell(failed, state=TrialState.FAIL)
    for _ in range(2):  # the twin retries, as Optuna's RetryFailedTrialCallback enqueues them
        st0.enqueue_trial(dict(st0.trials[failed.number].params))
    for t in st0.get_trials(states=(TrialState.WAITING,)):
        ladder.storage.set_trial_system_attr(t._trial_id, "retry_history", [failed.number])
        ladder.storage.set_trial_system_attr(t._trial_id, "failed_trial", failed.number)
    run_worker(s, cfg)
    after = open_ladder(s, cfg)
    reasons = [t.user_attrs.get("reason", "") for t in after.studies[0].get_trials(states=(TrialState.FAIL,))]
    assert sum(r.startswith("duplicate retry") for r in reasons) == 1, reasons
    for rung, study in zip(after.rungs, after.studies, strict=True):
        assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == rung.size, rung


def test_sigkill_in_low_rung_then_rerun_keeps_trials_and_budget(tmp_path: Path) -> None:
    args = ["tune", *W64_FLAGS, "--steps", "40", "--trials", "4", "--pruner", "none", "--runs-dir", str(tmp_path)]
    s = TuneSettings(study="proxy-w64", trials=4, runs_dir=str(tmp_path))
    found = kill_when(mupt(*args), mid_trial(s, "proxy-w64", "d_model"), 180, transient=(KeyError,))
    assert found is not None, "the worker finished rung 0 before it could be killed there"
    victim, before = found

    proc = mupt(*args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = " ".join(out.replace("│", " ").split())  # Rich's table borders out
    assert "best lr found by" in summary and "rung 0's losses" in summary, out
    assert "at d_model 16, moved -0.15 octave per doubling" in summary, out
    rung0 = _load(s, "proxy-w64")
    after = {t.number: t for t in rung0.trials}
    assert all(after[n].state is TrialState.COMPLETE and after[n].value == v for n, v in before.items())
    assert after[victim].state is TrialState.FAIL and "died" in after[victim].user_attrs["reason"]
    finished = rung0.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 4  # the budget: exactly --trials finished at rung 0, the killed one not counted
    # 4 trials: rungs of 4 at d_model 16 and 1 at 64 (the default --finalist fit)
    top = _load(s, "proxy-w64.rung1").get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(top) == 1 and top[0].user_attrs["d_model"] == 64
    bp = load_best(tmp_path / "proxy-w64" / "best.yaml")
    assert bp.config.model.d_model == 64


def test_sigkill_during_the_extrapolated_finalist_then_rerun(tmp_path: Path) -> None:
    """SIGKILL while the drift-extrapolated finalist trains: the rerun marks it failed, runs it again (same
    LR: the fit of the unchanged narrow rungs), keeps every narrow trial, and the proxy rung holds exactly 2."""
    args = ["tune", *W64_FLAGS, "--steps", "20", "--trials", "8", "--reduction", "3", "--sampler", "grid",
            "--pruner", "none", "--extrapolate", "--runs-dir", str(tmp_path)]  # fmt: skip
    s = TuneSettings(study="proxy-w64", trials=8, reduction=3, runs_dir=str(tmp_path), sampler="grid", extrapolate=True)

    def extrapolated_running() -> tuple[int, float] | None:
        running = _load(s, "proxy-w64.rung2").get_trials(states=(TrialState.RUNNING,))
        if running and "extrapolated" in running[0].user_attrs and "d_model" in running[0].user_attrs:
            return running[0].number, running[0].params["lr"]
        return None

    found = kill_when(mupt(*args), extrapolated_running, 180, interval=0.1)
    assert found is not None, "the extrapolated finalist finished before it could be killed"
    victim, lr = found
    narrow = [(t.number, t.value) for t in _load(s, "proxy-w64").get_trials(states=(TrialState.COMPLETE,))]
    proc = mupt(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert [(t.number, t.value) for t in _load(s, "proxy-w64").get_trials(states=(TrialState.COMPLETE,))] == narrow
    top = _load(s, "proxy-w64.rung2").trials
    assert top[victim].state is TrialState.FAIL and "died" in top[victim].user_attrs["reason"]
    again = [t for t in top if "extrapolated" in t.user_attrs and t.state is TrialState.COMPLETE]
    assert len(again) == 1 and again[0].params["lr"] == lr
    assert len([t for t in top if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 2


def test_grid_enqueue_once_with_synchronized_starts(tmp_path: Path) -> None:
    """Issue 14 (14e): two processes preparing a new grid study at the same instant enqueue the grid once."""
    code = (
        "import sys, time; from mupt.config import with_overrides; "
        "from mupt.tune import TuneSettings, prepare_study, proxy_config; "
        f"cfg = with_overrides(proxy_config(), {TINY!r}); "
        f"s = TuneSettings(study='g', trials=5, sampler='grid', runs_dir={str(tmp_path)!r}, fidelity='steps'); "
        "t = float(sys.argv[1]); time.sleep(max(0.0, t - time.time())); prepare_study(s, cfg)"
    )
    start = str(time.time() + 8)  # both import first, then start together
    procs = [subprocess.Popen([sys.executable, "-c", code, start], env=env(), cwd=ROOT) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    s = TuneSettings(study="g", trials=5, sampler="grid", runs_dir=str(tmp_path), fidelity="steps")
    waiting = _load(s, "g").get_trials(states=(TrialState.WAITING,))
    assert sorted(t.user_attrs["grid_index"] for t in waiting) == sorted(coarse_to_fine(len(lr_grid(1e-4, 0.1)))[:5])


def test_truncated_journal_is_repaired_and_resumed(tmp_path: Path) -> None:
    """Issue 14 (1a): a journal cut mid-record is repaired; every complete trial is kept; no advice to delete."""
    args = [
        "tune",
        *TINY_FLAGS,
        "--steps",
        "10",
        "--pruner",
        "none",
        "--fidelity",
        "steps",
        "--runs-dir",
        str(tmp_path),
    ]
    proc = mupt(*args, "--trials", "2")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    journal = tmp_path / "proxy-w32" / "journal.log"
    s = TuneSettings(study="proxy-w32", trials=3, runs_dir=str(tmp_path), fidelity="steps")
    before = {t.number: t.value for t in _load(s, "proxy-w32").get_trials(states=(TrialState.COMPLETE,))}
    assert len(before) == 2
    data = journal.read_bytes()
    cut = data.rstrip(b"\n").rfind(b"\n") + 1 + 17  # a crash 17 bytes into writing the last record
    journal.write_bytes(data[:cut])
    # --report repairs it too, and says so (it used to repair silently, in open_storage)
    proc = mupt(*args, "--trials", "2", "--report")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err.count("repaired") == 1 and "Traceback" not in err, err
    assert [p.read_bytes() for p in journal.parent.glob("journal.log.partial-*")] == [
        data[data.rfind(b"\n", 0, len(data) - 1) + 1 : cut]
    ]
    # cut again; resumed by two worker processes (each opens the storage, which would repair): said once
    journal.write_bytes(data[:cut])
    proc = mupt(*args, "--trials", "3", "--workers", "2")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert err.count("repaired") == 1 and "Traceback" not in err, err
    after = _load(s, "proxy-w32")
    kept = {t.number: t.value for t in after.get_trials(states=(TrialState.COMPLETE,))}
    assert all(kept[n] == v for n, v in before.items()) and len(kept) == 3
    assert len(list(journal.parent.glob("journal.log.partial-*"))) == 2
    # a record in the middle that is not JSON: refuse, keep the file, and never advise deleting it
    lines = journal.read_bytes().split(b"\n")
    lines[1] = b"{not json"
    journal.write_bytes(b"\n".join(lines))
    proc = mupt(*args, "--trials", "4")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "left as it is" in err and "delete" not in err and "move it away" not in err


def test_ctrl_c_writes_results_and_says_how_to_resume(tmp_path: Path) -> None:
    """Issue 14 (1b, 6): SIGINT -> best.yaml + plots for the finished trials, one resume line, exit 130;
    with output redirected, one progress line per finished trial."""
    args = ["tune", *TINY_FLAGS, "--steps", "60", "--trials", "20", "--pruner", "none", "--fidelity", "steps",
            "--runs-dir", str(tmp_path)]  # fmt: skip
    s = TuneSettings(study="proxy-w32", trials=20, runs_dir=str(tmp_path), fidelity="steps")
    proc = mupt(*args)
    wait_for(proc, lambda: len(_load(s, "proxy-w32").get_trials(states=(TrialState.COMPLETE,))) >= 2 or None, 180, 0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    assert "rerun the same command to resume" in err
    assert len(re.findall(r"^tune \d+/20 trials finished", err, flags=re.M)) >= 2  # progress lines in logs
    assert not re.findall(r"^tune \d+/20 trials finished, \d+ running", err, flags=re.M)  # one worker: no count
    bp = load_best(tmp_path / "proxy-w32" / "best.yaml")
    done = _load(s, "proxy-w32").get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert bp.trial in {t.number for t in done} and 2 <= len(done) < 20
    assert (tmp_path / "proxy-w32" / "history.png").is_file()
    failed = _load(s, "proxy-w32").get_trials(states=(TrialState.FAIL,))
    assert all("interrupted" in t.user_attrs.get("reason", "") for t in failed)
    proc = mupt(*args, "--report")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def test_ctrl_c_again_while_the_results_are_written_exits_130_in_one_line(tmp_path: Path) -> None:
    """Ctrl-C, then Ctrl-C pressed again and again once the results are being written (the trials table is out,
    plots and best.yaml follow): exit 130 with one line, no traceback, no temp file left, best.yaml whole or
    absent; --report then writes them."""
    args = ["tune", *TINY_FLAGS, "--steps", "20", "--trials", "20", "--pruner", "none", "--fidelity", "steps",
            "--runs-dir", str(tmp_path)]  # fmt: skip
    s = TuneSettings(study="proxy-w32", trials=20, runs_dir=str(tmp_path), fidelity="steps")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mupt", *args], cwd=ROOT, env={**env(), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    wait_for(proc, lambda: _load(s, "proxy-w32").get_trials(states=(TrialState.COMPLETE,)) or None, 180, 0.3)
    proc.send_signal(signal.SIGINT)
    head = []
    for line in proc.stdout:  # the results start with the trials table on stdout
        head.append(line)
        if line.startswith("Top "):
            break
    assert head and head[-1].startswith("Top "), "".join(head)
    while proc.poll() is None:  # pressed again, and again, while the plots and best.yaml are written
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    out, err = proc.communicate(timeout=60)
    # 130; or, when a press lands in the interpreter's last moments (Python restores the default handler as it
    # exits), the signal itself ends it, which a shell reports as 130 as well
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err + out, err
    messages = [x for x in err.splitlines() if x.strip() and not x.startswith("tune ")]  # no progress lines
    assert messages[-1].startswith("interrupted while writing the results") and "--report" in messages[-1], err
    run_dir = tmp_path / "proxy-w32"
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp file left behind
    if (run_dir / "best.yaml").exists():
        load_best(run_dir / "best.yaml")  # whole, never half-written
    report = mupt(*args, "--report")
    _, err = report.communicate(timeout=120)
    assert report.returncode == 0, err
    assert load_best(run_dir / "best.yaml").study == "proxy-w32" and (run_dir / "history.png").is_file()


def test_a_journal_lock_left_by_a_killed_process_is_removed_with_one_line(tmp_path: Path) -> None:
    """A process killed while appending a journal record leaves Optuna's <journal>.lock (an empty file made with
    O_EXCL): the next run removes it at once with one line instead of waiting Optuna's grace period out in
    silence; a lock younger than the grace period (a live worker's) is left alone."""
    args = ["tune", *TINY_FLAGS, "--steps", "10", "--trials", "1", "--pruner", "none", "--fidelity", "steps",
            "--runs-dir", str(tmp_path)]  # fmt: skip
    proc = mupt(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    journal = tmp_path / "proxy-w32" / "journal.log"
    lock = journal.with_name("journal.log.lock")
    lock.touch()
    assert clear_stale_journal_lock(journal) is None and lock.exists()  # fresh: maybe a live worker's
    old = time.time() - JOURNAL_LOCK_GRACE - 60
    os.utime(lock, (old, old))  # what a kill -9 inside the write leaves, a minute later
    for extra in ([], ["--report"]):
        proc = mupt(*args, *extra)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "Traceback" not in err, err
        assert f"removed {lock}: a journal lock left" in " ".join(err.split()), err
        assert not lock.exists()
        lock.touch()
        os.utime(lock, (old, old))


def test_the_study_lock_file_is_removed_safely_while_other_workers_lock(tmp_path: Path) -> None:
    """The study's 0-byte ``<journal>.mupt-lock`` is removed when a run finishes; removing it while other
    workers wait for it must not let two of them hold the lock at once (one locking the removed file, one the
    file made anew): threads (each lock call its own open file, as separate processes) take the study lock in
    a loop while two others remove the file.  A lock that ignores the removal lets two in (seen 4 times in 5
    on this test's loop); the lock file is gone at the end."""
    import threading

    s = TuneSettings(study="lk", runs_dir=str(tmp_path), fidelity="steps")
    storage = open_storage(s)
    inside = most = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, most
        for _ in range(40):
            with study_lock(s, storage):
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.0005)
                with guard:
                    inside -= 1

    def remover() -> None:
        for _ in range(100):
            remove_lock_file(s)

    threads = [threading.Thread(target=worker) for _ in range(4)] + [threading.Thread(target=remover) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1
    remove_lock_file(s)
    assert sorted(p.name for p in s.run_dir.iterdir()) == ["journal.log"]


class _CtrlCInSetUp:
    """Real builtin tokens whose validation read raises KeyboardInterrupt: Ctrl-C landing while a trial's
    Trainer is being built, before its first step (the window the CI flake of the test above hit)."""

    def __init__(self, tokens: Any) -> None:
        self.tokens = tokens

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokens, name)

    def val_batches(self, *args: Any, **kw: Any) -> Any:
        raise KeyboardInterrupt


def test_ctrl_c_before_training_still_records_the_trial_as_interrupted(tmp_path: Path) -> None:
    """Ctrl-C anywhere in a trial (here: the Trainer's set-up) closes it FAIL with the interrupted reason;
    before, only Ctrl-C inside the training loop did, and the trial failed without a reason."""
    from mupt.data import load_data

    cfg = tiny()
    s = TuneSettings(study="cc", trials=2, runs_dir=str(tmp_path), fidelity="steps", pruner="none")
    study = optuna.create_study(study_name="cc", storage=open_storage(s))
    objective = make_objective(s, cfg, data=_CtrlCInSetUp(load_data(cfg.data)))
    with pytest.raises(KeyboardInterrupt):
        study.optimize(objective, n_trials=1)
    (t,) = study.get_trials()
    assert t.state is TrialState.FAIL
    assert t.user_attrs["reason"] == f"{INTERRUPTED} at step 0"


def test_close_interrupted_fails_only_this_workers_running_trials(tmp_path: Path) -> None:
    """Ctrl-C inside Optuna's own code (``study.ask`` before the objective, or the tell after it) leaves the
    trial RUNNING; the worker closes its own such trials (and ones no worker has claimed yet), not another
    live worker's, nor any from before it started."""
    s = TuneSettings(study="ci", trials=4, runs_dir=str(tmp_path), fidelity="steps")
    study = optuna.create_study(study_name="ci", storage=open_storage(s))
    old = study.ask()  # RUNNING before this worker's attempt began: not its business
    since = len(study.get_trials())
    unclaimed, mine, other = study.ask(), study.ask(), study.ask()
    mine.set_user_attr("worker", worker_id())
    other.set_user_attr("worker", "elsewhere:1:1")
    assert sorted(close_interrupted(study, since)) == [unclaimed.number, mine.number]
    states = {t.number: (t.state, t.user_attrs.get("reason", "")) for t in study.get_trials()}
    assert states[old.number][0] is TrialState.RUNNING and states[other.number][0] is TrialState.RUNNING
    for n in (unclaimed.number, mine.number):
        assert states[n][0] is TrialState.FAIL and states[n][1].startswith(INTERRUPTED)


def test_ctrl_c_before_the_proxy_width_then_report_and_resume(tmp_path: Path) -> None:
    """Issue 14 (1b): Ctrl-C while only the narrowest rung has finished trials: exit 130 and no best.yaml;
    `--report` still shows the finished trials and plots, says no trial reached the proxy width, exits 0;
    the rerun resumes, keeps every finished trial and writes best.yaml at the proxy width."""
    args = ["tune", *W64_FLAGS, "--steps", "40", "--trials", "4", "--pruner", "none", "--runs-dir", str(tmp_path)]
    s = TuneSettings(study="proxy-w64", trials=4, runs_dir=str(tmp_path))
    proc = mupt(*args)
    # mid-trial: a signal between two trials (the sampler, the lock) would stop no trial
    assert wait_for(proc, mid_trial(s, "proxy-w64", "d_model"), 180) is not None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    run_dir = tmp_path / "proxy-w64"
    assert not (run_dir / "best.yaml").exists()
    # the interrupted case says so plainly: no pruning reasons or --lr-range advice, the same failed count as
    # the rungs table, and the trial stopped mid-run counted as interrupted (fresh-user walkthrough, 4)
    summary = " ".join(out.split())
    assert "interrupted before a trial finished at the proxy width" in summary, out
    assert "--lr-range" not in summary and "pruned by" not in summary, out
    ladder = load_existing(s, with_overrides(proxy_config(), {**W64, "train.steps": 40}))
    stopped = [t for _, t in ladder.trials() if t.state is TrialState.FAIL]
    assert stopped and all("interrupted" in t.user_attrs["reason"] for t in stopped)
    sums = rung_summaries(ladder)
    assert sum(x.failed for x in sums) == sum(x.interrupted for x in sums) == len(stopped)
    assert f"{len(stopped)} failed (all interrupted by Ctrl-C" in summary, out
    finished = {t.number for t in _load(s, "proxy-w64").get_trials(states=(TrialState.COMPLETE,))}
    assert finished
    proc = mupt(*args, "--report")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "no trial has finished at the proxy width" in " ".join(err.split())
    assert (run_dir / "history.png").is_file() and not (run_dir / "best.yaml").exists()
    proc = mupt(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    kept = {t.number for t in _load(s, "proxy-w64").get_trials(states=(TrialState.COMPLETE,))}
    assert finished <= kept
    assert load_best(run_dir / "best.yaml").config.model.d_model == 64


def _cells(out: str, first: str) -> list[list[str]]:
    """The cells of the Rich table rows of ``out`` whose first cell matches the regex ``first``."""
    rows = [[c.strip() for c in line.strip().strip("│").split("│")] for line in out.splitlines() if "│" in line]
    return [r for r in rows if re.fullmatch(first, r[0])]


def test_table_out_in_a_missing_directory_or_a_directory_is_refused(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """--table-out is a file in an existing directory, checked before any trial runs (as transfer's)."""
    for bad, says in ((tmp_path / "nope" / "t.csv", "does not exist"), (tmp_path, "is a directory")):
        code, _, err = cli("tune", *TINY_FLAGS, "--runs-dir", str(tmp_path / "runs"), "--table-out", str(bad))
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "nope").exists()  # nothing created, nothing run


def test_table_out_is_optunas_trials_dataframe(tmp_path: Path) -> None:
    """Issue 18 (6): --table-out writes every trial of every rung as CSV via trials_dataframe().  Trial numbers
    restart in every rung (one Optuna study each), so every line names a trial by rung and number (r1/t0), and
    losses are printed with 4 decimals everywhere.  An existing --table-out file is replaced only when it is
    the same study's table (a rerun), another file is refused in one line (exit 2, left as it is) unless
    --overwrite."""
    import csv

    table_out = tmp_path / "trials.csv"
    args = ["tune", *W64_FLAGS, "--steps", "10", "--trials", "3", "--runs-dir", str(tmp_path),
            "--table-out", str(table_out)]  # fmt: skip
    proc = mupt(*args)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    # a clean finish leaves no lock file beside the journal (Optuna's journal.log.lock nor the study's mupt-lock)
    assert not [p.name for p in (tmp_path / "proxy-w64").iterdir() if "lock" in p.name]
    rows = list(csv.DictReader(table_out.open()))
    s = TuneSettings(study="proxy-w64", trials=3, runs_dir=str(tmp_path))
    ladder = open_ladder(s, with_overrides(proxy_config(), {**W64, "train.steps": 10}))
    expected = [(r.index, t.number, t.state.name) for r, t in ladder.trials()]
    assert [(int(r["rung"]), int(r["number"]), r["state"]) for r in rows] == expected
    assert {"d_model", "params_lr", "user_attrs_flops", "value"} <= set(rows[0])
    assert {r["study"] for r in rows} == {"proxy-w64"}

    # trial references: r<rung>/t<number> in the table, the summary and the progress lines
    values = {f"r{r.index}/t{t.number}": t.value for r, t in ladder.trials() if t.state is TrialState.COMPLETE}
    assert sorted(values) == ["r0/t0", "r0/t1", "r0/t2", "r1/t0"]  # trial 0 twice: only the rung tells them apart
    table = {r[0]: r for r in _cells(out, r"r\d+/t\d+")}
    assert sorted(table) == sorted(values), out
    for label, value in values.items():
        assert table[label][4] == f"{value:.4f}", table[label]  # trial, d_model, state, lr, val loss
    summary = {r[0]: r[1] for r in _cells(out, r"best .*")}
    assert summary["best trial (proxy width)"] == "r1/t0", out
    assert summary["best val loss (nats)"] == f"{values['r1/t0']:.4f}", out
    rung_rows = _cells(out, r"[01]")  # the rungs table: ..., best loss, best lr
    rung0 = min(v for k, v in values.items() if k.startswith("r0/"))
    assert [r[8] for r in rung_rows] == [f"{rung0:.4f}", summary["best val loss (nats)"]], out
    lines = [line for line in err.splitlines() if line.startswith("tune ")]
    assert any(f"; last: r0/t0 (d_model 16): {values['r0/t0']:.4f} " in line for line in lines), err
    assert lines[-1].split("; last: ")[1].startswith(f"r1/t0 (d_model 64): {values['r1/t0']:.4f}"), err
    assert f"best {values['r1/t0']:.4f} @ lr " in lines[-1] and "(r1/t0); last" in lines[-1], err

    # the same study's table is replaced by a rerun; another file is refused, and kept
    before = table_out.stat().st_mtime_ns
    again = mupt(*args, "--report")
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0 and table_out.stat().st_mtime_ns > before, err
    other = tmp_path / "notes.csv"
    other.write_text("a,b\n1,2\n")
    refused = mupt(*args[:-1], str(other), "--trials", "4")  # one more trial to run: refused before it runs
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--table-out {other} exists" in err and "--overwrite" in err and "Traceback" not in err, err
    assert other.read_text() == "a,b\n1,2\n"
    assert len(ladder.study.get_trials()) == 3
    forced = mupt(*args[:-1], str(other), "--report", "--overwrite")
    _, err = forced.communicate(timeout=120)
    assert forced.returncode == 0, err
    assert [r["number"] for r in csv.DictReader(other.open())] == [r["number"] for r in rows]


def test_storage_messages_and_no_deprecated_callback(tmp_path: Path) -> None:
    """Issue 14 (13a, 14b): mysql:// names a MySQL driver; opening an RDB raises no Optuna FutureWarning."""
    import warnings

    proc = mupt("tune", *TINY_FLAGS, "--storage", "mysql://u:p@localhost/db")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "pymysql" in err and "psycopg" not in err
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        open_storage(TuneSettings(study="x", storage=f"sqlite:///{tmp_path}/x.db"))


def test_a_refused_data_path_creates_nothing_and_is_named_on_an_existing_study(tmp_path: Path) -> None:
    """Fresh-user walkthrough (1, 2): a missing --data is refused before any storage is created, so the name
    stays free; on an existing study the same flag gets the missing-path error, not "different proxy config"."""
    missing = str(tmp_path / "nonexistent" / "dir")
    runs = tmp_path / "runs"
    prepare_study(TuneSettings(study="old", trials=2, runs_dir=str(runs)), tiny())  # an existing study, no trials
    fresh = mupt("tune", *TINY_FLAGS, "--data", missing, "--study", "s2", "--runs-dir", str(runs))
    existing = mupt("tune", *TINY_FLAGS, "--data", missing, "--study", "old", "--runs-dir", str(runs))
    for proc in (fresh, existing):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert "no such file or directory" in err and "different proxy config" not in err, err
    assert not (runs / "s2").exists()


def test_default_study_name_keeps_own_data_apart_and_help_counts_every_trial(tmp_path: Path) -> None:
    """Fresh-user walkthrough (6, 7): the README's "Your own data" step after its Quickstart gets its own study
    (the builtin one keeps proxy-w<width>, so it resumes); --help's trial total is the schedule's."""
    from mupt.tune import default_study_name

    corpus = tmp_path / "data" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "a.txt").write_text("some text of the user's own " * 400)
    builtin = tiny()
    own = with_overrides(builtin, {"data.source": str(corpus) + "/"})
    assert default_study_name(builtin) == "proxy-w32"
    assert default_study_name(own) == "proxy-w32-corpus"
    runs = tmp_path / "runs"
    prepare_study(TuneSettings(study=default_study_name(builtin), trials=2, runs_dir=str(runs)), builtin)
    prepare_study(TuneSettings(study=default_study_name(own), trials=2, runs_dir=str(runs)), own)  # no refusal
    assert sorted(p.name for p in runs.iterdir()) == ["proxy-w32", "proxy-w32-corpus"]
    proc = mupt("tune", "--help")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    total = sum(r.size for r in rungs_for(TuneSettings(study="x"), with_overrides(proxy_config(), {})))
    text = " ".join(out.replace("│", " ").split())  # Rich's table borders out
    assert f"{total} trials in all" in text, out
    # where --help names the rung widths, it says how they are rounded (--width 64: 16 and 64 under fit)
    w64 = TuneSettings(study="x")
    assert [r.d_model for r in rungs_for(w64, with_overrides(proxy_config(), {"model.d_model": 64}))] == [16, 64]
    assert "d_model = proxy/8, rounded down to a multiple of 16, at least 16" in text, out  # --trials
    assert "(rounded down to a multiple of 16, at least 16: --width 64 gives rungs 16 and 64" in text, out
    assert "proxy/8, /4, /2, each rounded down to a multiple of 16 (at least 16; --width 64: 16, 32, 64)" in text


def test_report_of_a_missing_study_lists_the_study_dirs_and_a_finished_study_says_so(tmp_path: Path) -> None:
    """Fresh-user walkthrough (8): --report of a study that is not there names the studies under --runs-dir
    (each has its own journal) and creates nothing; rerunning a finished study says it is already complete."""
    runs = tmp_path / "runs"
    args = ["tune", *TINY_FLAGS, "--steps", "10", "--trials", "2", "--fidelity", "steps", "--pruner", "none",
            "--runs-dir", str(runs)]  # fmt: skip
    first = mupt(*args)
    _, err = first.communicate(timeout=180)
    assert first.returncode == 0 and "already complete" not in err, err
    again = mupt(*args)
    missing = mupt("tune", "--width", "512", "--report", "--runs-dir", str(runs))
    out, err = again.communicate(timeout=180)
    assert again.returncode == 0, err
    assert "study proxy-w32 is already complete (2 finished trials)" in " ".join(err.split()), err
    assert "best val loss" in out  # its results are still shown
    assert "already complete: nothing ran now" in " ".join(out.replace("│", " ").split()), out  # not "0 s"
    assert len(_load(TuneSettings(study="proxy-w32", runs_dir=str(runs)), "proxy-w32").trials) == 2  # none added
    _, err = missing.communicate(timeout=120)
    assert missing.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "studies there: proxy-w32" in err, err
    assert not (runs / "proxy-w512").exists()


def test_asha_leaves_failed_trials_out_of_the_competition(tmp_path: Path) -> None:
    """Fresh-user walkthrough (3): a trial stopped by Ctrl-C after rung 0's halving step is FAIL (not PRUNED) and
    its value there no longer raises the bar for the trials sampled in its place (Optuna's ASHA counts every
    state); among finished trials the decisions are Optuna's own."""
    from mupt.tune import make_pruner

    settings = TuneSettings(study="asha", pruner="asha", runs_dir=str(tmp_path))
    cfg = tiny(**{"train.steps": 64, "train.eval_every": 16})  # the halving step is 32
    pruner = make_pruner(settings, cfg)
    study = optuna.create_study(storage=open_storage(settings), study_name="asha", pruner=pruner)
    stopped = study.ask()
    stopped.report(1.0, 32)
    assert not stopped.should_prune()  # the first to arrive is kept
    study.tell(stopped, state=TrialState.FAIL)  # then Ctrl-C (what Optuna records for a KeyboardInterrupt)
    later = study.ask()
    later.report(2.0, 32)
    assert not later.should_prune()  # alone among unfailed trials: kept (Optuna's own ASHA prunes it: 2.0 > 1.0)
    study.tell(later, 2.0)
    third = study.ask()
    third.report(3.0, 32)
    assert third.should_prune()  # behind the COMPLETE one: pruned, as by Optuna's ASHA
    study.tell(third, state=TrialState.PRUNED)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED]


def test_ctrl_c_to_the_process_group_with_two_workers_records_every_trial_as_interrupted(tmp_path: Path) -> None:
    """Fresh-user walkthrough (3, 4): Ctrl-C in a terminal signals the whole process group and the parent
    forwards it to its workers: each running trial ends FAIL with its "interrupted" reason (never PRUNED,
    never a reason-less failure from a second KeyboardInterrupt in the first one's cleanup)."""
    args = ["tune", *W64_FLAGS, "--steps", "200", "--trials", "4", "--workers", "2", "--threads", "1",
            "--runs-dir", str(tmp_path)]  # fmt: skip
    s = TuneSettings(study="proxy-w64", trials=4, runs_dir=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mupt", *args], cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip

    def both_training() -> bool | None:
        running = _load(s, "proxy-w64").get_trials(states=(TrialState.RUNNING,))
        return True if len([t for t in running if t.intermediate_values]) == 2 else None

    assert wait_for(proc, both_training, 180, 0.2), "the two workers did not both reach a validation"
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does; the parent forwards one more
    for _ in range(40):  # more SIGINTs while the workers close their trials (Ctrl-C pressed again, the forward)
        time.sleep(0.002)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    trials = _load(s, "proxy-w64").trials
    assert len(trials) == 2 and all(t.state is TrialState.FAIL for t in trials)
    assert all(t.user_attrs.get("reason", "").startswith("interrupted") for t in trials), [t.user_attrs for t in trials]


def test_mamba2_rung_width_off_proxy_over_8_is_noted(cli, tmp_path: Path) -> None:
    """mamba2 at headdim 64: --width 64 cannot have a 16-wide rung (2*16/64 is not a whole head), so rung 0 runs at
    32; tune says so in one note line under its start line, with the reason and the headdim that restores 16."""
    code, _, err = cli(
        "tune", "--arch", "mamba2", "--width", "64", "--layers", "1", "--d-state", "8", "--seq-len", "16",
        "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--trials", "2", "--backend", BACKEND,
        "--runs-dir", str(tmp_path), "--study", "m2",
    )  # fmt: skip
    assert code == 0, err
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("mupt tune "))
    assert "rungs(d_model x trials)=32x2 64x1" in lines[start]
    assert lines[start].startswith("mupt tune study=m2 arch=mamba2 heads=2x64 ngroups=1 d_model=64 layers=1 ")
    assert lines[start + 1] == (
        "note: rung 0 runs at d_model 32, not proxy/8 = 16: mamba2 needs heads = expand*d_model/headdim = "
        "2*d_model/64 a whole number divisible by --ngroups 1, so rung widths are multiples of 32; --headdim 32 puts "
        "rung 0 at 16"
    )
    assert sum("note:" in line for line in lines) == 1

    def note(**model: Any) -> str | None:
        cfg = with_overrides(RunConfig(), {f"model.{k}": v for k, v in model.items()})
        return rung_width_note(TuneSettings(study="s"), cfg)

    collapsed = note(arch="mamba2", d_model=64, headdim=128)  # 2*d_model/128: only the proxy holds a whole head
    assert collapsed is not None and collapsed.startswith("every trial runs at the proxy width 64 (no narrower rung")
    grouped = note(arch="mamba2", d_model=256, ngroups=4)  # 8 heads in 4 groups: rungs 128, 256
    assert grouped is not None and "rung 0 runs at d_model 128, not proxy/8 = 32" in grouped
    assert "--headdim 16 (or a smaller --ngroups) puts rung 0 at 32" in grouped
    assert note(arch="mamba2", d_model=64, headdim=32) is None and note(d_model=256) is None
    m2 = with_overrides(RunConfig(), {"model.arch": "mamba2", "model.d_model": 64})
    assert rung_width_note(TuneSettings(study="s", fidelity="steps"), m2) is None  # no width rungs to move
