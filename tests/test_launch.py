"""mupt scale / mupt.launch: real torchrun gloo processes, real DCP checkpoints, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from procs import interrupt_while_torch_loads

from mupt import launch
from mupt.config import Recipe, load_recipe, load_yaml, save_yaml, to_dict
from mupt.errors import CheckpointError
from mupt.memory import count_params, memory_estimate
from mupt.model import MambaLM

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def make_recipe(tmp: Path, name: str = "r", width: int | None = None, keep_tables: bool = True, **launch_kw: Any):
    """tiny.yaml with its run dir under ``tmp``; launch/train fields overridden by keyword."""
    data = to_dict(load_yaml(TINY, Recipe))
    steps = launch_kw.pop("steps", None)
    if steps is not None:
        data["run"]["train"]["steps"] = steps
    if width is not None:
        data["run"]["model"]["d_model"] = width
    if not keep_tables:
        data["per_role"], data["manifest"] = {}, {}
    data["launch"].update({"run_dir": str(tmp / f"{name}-run"), "log_every": 1, **launch_kw})
    path = tmp / f"{name}.yaml"
    save_yaml(path, Recipe.model_validate(data))
    return path, Path(data["launch"]["run_dir"])


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), COLUMNS="200")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def scale_cmd(recipe: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "mupt", "scale", str(recipe), *flags]


def run_scale(recipe: Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        scale_cmd(recipe, *flags), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def wait_for_step(proc: subprocess.Popen[str], metrics: Path, step: int, timeout: float = 60) -> int:
    """Poll metrics.jsonl until a train step >= ``step`` is logged; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (rc {proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        if metrics.is_file():
            seen = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.endswith("}")]
            if seen and max(seen) >= step:
                return max(seen)
        time.sleep(0.005)
    raise AssertionError(f"no step >= {step} logged within {timeout}s")


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The 1-process reference curve (40 steps, global batch 8)."""
    tmp = tmp_path_factory.mktemp("single")
    recipe, run_dir = make_recipe(tmp, "single")
    torch.set_num_threads(1)
    launch.run(load_recipe(recipe))
    curve = losses(run_dir)
    assert len(curve) == 40 and curve[40] < curve[1] - 1.0  # it trains
    return curve


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tmp_path: Path, single: dict[int, float], mode: str) -> None:
    if mode == "fsdp":
        fsdp = pytest.importorskip("torch.distributed.fsdp")
        if not hasattr(fsdp, "fully_shard"):
            pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")
    if not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    recipe, run_dir = make_recipe(tmp_path, mode)
    flags = ["--nproc", "2"] + (["--fsdp"] if mode == "fsdp" else [])
    proc = run_scale(recipe, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(run_dir)
    assert sorted(curve) == sorted(single)
    for step, loss in single.items():
        assert curve[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world"] == 2 and summary["status"] == "ok" and summary["tokens_seen"] == 40 * 8 * 32
    ckpt = run_dir / "checkpoints" / "step_000040"
    assert (ckpt / ".metadata").is_file() and (ckpt / "rank_1.pt").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000040"


def test_sigkill_then_rerun_resumes_exactly(tmp_path: Path) -> None:
    torch.set_num_threads(1)  # the subprocesses run with OMP_NUM_THREADS=1 too
    ref_recipe, ref_dir = make_recipe(tmp_path, "ref", steps=120, ckpt_every=10)
    launch.run(load_recipe(ref_recipe))
    reference = losses(ref_dir)

    recipe, run_dir = make_recipe(tmp_path, "killed", steps=120, ckpt_every=10)
    proc = subprocess.Popen(scale_cmd(recipe), cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(proc, run_dir / "metrics.jsonl", 23)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill; the test proved nothing"
    killed_at = launch.find_latest(run_dir)
    assert killed_at is not None
    resumed_from = int(killed_at.name.split("_")[1])
    assert 20 <= resumed_from < 120

    rerun = run_scale(recipe)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["start_step"] == resumed_from and summary["steps"] == 120
    after = losses(run_dir)
    assert sorted(after) == list(range(1, 121))  # lines written after the checkpoint were dropped, then redone
    assert [after[s] for s in range(resumed_from + 1, 121)] == [reference[s] for s in range(resumed_from + 1, 121)]
    assert after == reference


def test_sigterm_writes_final_checkpoint(tmp_path: Path) -> None:
    recipe, run_dir = make_recipe(tmp_path, "term", steps=2000, ckpt_every=1000)
    proc = subprocess.Popen(scale_cmd(recipe), cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(proc, run_dir / "metrics.jsonl", 5)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "terminated" and 5 <= summary["steps"] < 1000
    latest = launch.find_latest(run_dir)
    assert latest is not None and latest.name == f"step_{summary['steps']:06d}"
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["step"] == summary["steps"]
    assert "rerun to resume" in stderr


@pytest.fixture
def trained(tmp_path: Path, cli) -> tuple[Path, Path]:
    recipe, run_dir = make_recipe(tmp_path, "base", steps=6, ckpt_every=3)
    code, _, stderr = cli("scale", str(recipe))
    assert code == 0, stderr
    return recipe, run_dir


def message_lines(stderr: str) -> list[str]:
    """stderr without the progress lines (stderr is not a terminal here, so progress is plain lines)."""
    return [x for x in stderr.splitlines() if x.strip() and not re.match(r"scale \d+/\d+ ", x)]


def one_line_error(cli, *args: str) -> str:
    code, _, stderr = cli(*args)
    assert code == 2, stderr
    lines = message_lines(stderr)
    assert len(lines) == 1, stderr
    return " ".join(lines[0].split())


def test_mismatched_checkpoint_is_refused(tmp_path: Path, trained: tuple[Path, Path], cli) -> None:
    _, run_dir = trained
    wider, _ = make_recipe(tmp_path, "wider", width=48, keep_tables=False, steps=12)
    msg = one_line_error(cli, "scale", str(wider), "--run-dir", str(run_dir))
    assert "another recipe" in msg and "d_model 32" in msg and "48" in msg and "--run-dir NEW_DIR" in msg
    assert launch.find_latest(run_dir).name == "step_000006"  # nothing overwritten


def damage_checkpoint(ckpt: Path, damage: str) -> None:
    shard = ckpt / "__0_0.distcp"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "garble":
        shard.write_bytes(bytes(255 - b for b in shard.read_bytes()))
    elif damage == "meta":
        (ckpt / "meta.json").write_text("{not json")
    elif damage == "dcp-metadata":  # garbage of the recorded size: only reading it can tell
        meta = ckpt / ".metadata"
        meta.write_bytes(bytes(range(256)) * (meta.stat().st_size // 256) + b"x" * (meta.stat().st_size % 256))


@pytest.mark.parametrize("damage", ["truncate", "garble", "meta", "dcp-metadata"])
def test_corrupt_checkpoint_falls_back_to_the_previous_one(trained: tuple[Path, Path], cli, damage: str) -> None:
    recipe, run_dir = trained  # checkpoints at steps 3 and 6
    damage_checkpoint(run_dir / "checkpoints" / "step_000006", damage)
    code, _, stderr = cli("scale", str(recipe))
    assert code == 0, stderr
    lines = [" ".join(x.split()) for x in message_lines(stderr)]
    assert len(lines) == 1 and "step_000006 is corrupt" in lines[0] and "resuming from" in lines[0], stderr
    assert "step_000003" in lines[0] and "delete" not in lines[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["start_step"], summary["steps"], summary["status"]) == (3, 6, "ok")
    assert sorted(losses(run_dir)) == list(range(1, 7))


def test_a_dangling_latest_pointer_is_not_needed(trained: tuple[Path, Path], cli) -> None:
    recipe, run_dir = trained
    (run_dir / "checkpoints" / "latest").write_text("step_000099\n")
    code, stdout, stderr = cli("scale", str(recipe))
    assert code == 0, stderr
    assert "resumed from" in stdout and "step_000006" in stdout and "already finished at step 6" in stdout


def test_rerun_of_a_finished_run_trains_nothing_and_reports_no_throughput(trained: tuple[Path, Path], cli) -> None:
    """Rerunning a finished run says so, shows no wall time or throughput (nothing was trained), and leaves the
    summary.json of the run that trained as it was."""
    recipe, run_dir = trained
    before = (run_dir / "summary.json").read_bytes()
    last_loss = json.loads(before)["last_loss"]
    code, stdout, stderr = cli("scale", str(recipe))
    assert code == 0, stderr
    flat = " ".join(stdout.replace("│", " ").split())
    assert "already finished at step 6: nothing trained" in flat and "nothing to train" in flat, flat
    assert "throughput" not in flat and "tokens/s" not in flat and "wall time" not in flat, flat
    assert f"last train loss (nats) {last_loss:.4g}" in flat, flat  # the finished run's, not "-"
    assert (run_dir / "summary.json").read_bytes() == before
    assert sorted(losses(run_dir)) == list(range(1, 7))  # metrics.jsonl untouched too


@pytest.mark.parametrize("damage", ["garble", "dcp-metadata"])
def test_no_intact_checkpoint_left_is_one_line(tmp_path: Path, cli, damage: str) -> None:
    recipe, run_dir = make_recipe(tmp_path, "one", steps=3, ckpt_every=3)
    assert cli("scale", str(recipe))[0] == 0
    damage_checkpoint(run_dir / "checkpoints" / "step_000003", damage)
    msg = one_line_error(cli, "scale", str(recipe), "--steps", "6", "--reschedule")
    assert "step_000003 is corrupt" in msg and "no intact checkpoint" in msg and "new --run-dir" in msg
    assert "delete" not in msg and not (run_dir / "checkpoints" / "step_000006").exists()  # never a silent restart


def test_resume_with_other_steps_is_refused_unless_rescheduled(trained: tuple[Path, Path], cli) -> None:
    recipe, run_dir = trained  # tiny.yaml: cosine over 6 steps, warmup 4
    msg = one_line_error(cli, "scale", str(recipe), "--steps", "8")
    assert "6-step cosine schedule" in msg and "--steps 6" in msg and "--reschedule" in msg
    assert launch.find_latest(run_dir).name == "step_000006"  # nothing trained
    code, _, stderr = cli("scale", str(recipe), "--steps", "8", "--reschedule")
    assert code == 0, stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["start_step"], summary["steps"], summary["tokens_seen"]) == (6, 8, 8 * 8 * 32)
    assert sorted(losses(run_dir)) == list(range(1, 9))


def test_no_resume_refuses_to_overwrite(trained: tuple[Path, Path], cli) -> None:
    recipe, _ = trained
    msg = one_line_error(cli, "scale", str(recipe), "--no-resume")
    assert "already holds checkpoints" in msg


def test_per_role_lr_mismatch_fails(tmp_path: Path, cli) -> None:
    recipe, _ = make_recipe(tmp_path, "bad")
    data = load_yaml(recipe, Recipe)
    per_role = {k: dict(v) for k, v in data.per_role.items()}
    per_role["in_proj"]["lr"] = 0.004  # width rules say 0.004 * (16/32) = 0.002
    save_yaml(recipe, data.model_copy(update={"per_role": per_role}))
    msg = one_line_error(cli, "scale", str(recipe))
    assert "per_role.in_proj.lr=0.004" in msg and "0.002" in msg


def test_group_lr_check_catches_a_changed_optimizer(tmp_path: Path) -> None:
    from mupt.train import Trainer

    recipe = load_yaml(TINY, Recipe)
    trainer = Trainer(recipe.run)
    launch.check_group_lrs(trainer, trainer.model)  # as built: fine
    regrouped = launch.regroup(trainer, trainer.model)  # what scale builds after wrapping: same groups and eps
    built = [(g["lr_mult"], g["eps"], g["names"]) for g in trainer.par.param_groups]
    assert [(g["lr_mult"], g["eps"], g["names"]) for g in regrouped] == built
    assert {g["eps"] for g in regrouped} == {1e-8 / 2}  # tiny.yaml: mup-ssm, d_model 32 over base 16
    for key in ("lr", "weight_decay", "eps"):  # what a checkpoint's param groups could bring back changed
        fresh = Trainer(recipe.run)
        fresh.optimizer.param_groups[1][key] = fresh.optimizer.param_groups[1][key] * 3 + 1e-3
        with pytest.raises(CheckpointError, match=f"has {key} " if key != "lr" else "has lr "):
            launch.check_group_lrs(fresh, fresh.model)


def test_dry_run_prints_plan_and_starts_nothing(tmp_path: Path, cli) -> None:
    recipe, run_dir = make_recipe(tmp_path, "dry")
    code, out, stderr = cli("scale", str(recipe), "--dry-run", "--nproc", "2", "--fsdp")
    assert code == 0, stderr
    text = " ".join(out.split())
    params = count_params(load_yaml(recipe, Recipe).run.model)
    assert f"{params:,}" in text and "torchrun --standalone" in text and "--nproc-per-node 2" in text
    assert "FSDP2" in text and "optimizer states" in text
    assert not run_dir.exists()


def test_memory_estimate_shards_under_fsdp() -> None:
    cfg = load_yaml(TINY, Recipe).run
    p = sum(t.numel() for t in MambaLM(cfg.model).parameters())
    ddp = memory_estimate(cfg, 4, fsdp=False)
    fsdp = memory_estimate(cfg, 4, fsdp=True)
    assert ddp.weights == 4 * p and ddp.optimizer == 2 * ddp.weights  # AdamW: exp_avg + exp_avg_sq
    assert fsdp.weights == 4 * -(-p // 4) and fsdp.activations == ddp.activations
    assert ddp.tokens_per_rank == 8 // 4 * 32


def test_torchrun_argv_and_multinode_needs_endpoint() -> None:
    argv = launch.torchrun_args("r.yaml", ["--fsdp"], 4, 2, "node0:29500")
    assert argv[:2] == ["--nnodes", "2"] and "--rdzv-endpoint" in argv and argv[-3:] == ["scale", "r.yaml", "--fsdp"]
    from torch.distributed.run import parse_args

    args = parse_args(argv)
    assert args.nproc_per_node == "4" and args.module and args.training_script == "mupt"
    with pytest.raises(Exception, match="rdzv-endpoint"):
        launch.torchrun_args("r.yaml", [], 4, 2, None)


def test_sigterm_to_torchrun_parent_checkpoints_all_ranks(tmp_path: Path) -> None:
    recipe, run_dir = make_recipe(tmp_path, "term2", steps=5000, ckpt_every=4000)
    proc = subprocess.Popen(
        scale_cmd(recipe, "--nproc", "2"), cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, so a failed test can stop the workers too
    )  # fmt: skip
    try:
        wait_for_step(proc, run_dir / "metrics.jsonl", 3, timeout=90)
        proc.send_signal(signal.SIGTERM)  # only the launcher: the elastic agent forwards it to the workers
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    latest = launch.find_latest(run_dir)
    assert summary["status"] == "terminated" and latest is not None
    assert latest.name == f"step_{summary['steps']:06d}"
    assert (latest / "rank_0.pt").is_file() and (latest / "rank_1.pt").is_file()
    said = [x for x in stderr.splitlines() if "rerun to resume" in x]  # once: the launcher's, not also rank 0's
    assert said == [f"terminated by signal 15 at step {summary['steps']}; the workers wrote checkpoint {latest}; "
                    "rerun to resume"], stderr[-2000:]  # fmt: skip
    assert "Traceback" not in stderr


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    recipe, run_dir = make_recipe(tmp_path, "bf16", steps=3, ckpt_every=3, precision="bf16")
    res = launch.run(load_recipe(recipe))
    assert res.status == "ok" and all(torch.isfinite(torch.tensor(loss)) for _, loss in res.losses)
    meta = FileSystemReader(str(run_dir / "checkpoints" / "step_000003")).read_metadata().state_dict_metadata
    model_keys = [k for k in meta if k.startswith("model.")]
    assert model_keys and all(meta[k].properties.dtype == torch.float32 for k in model_keys)
    assert meta["model.backbone.layers.0.mixer.A_log"].properties.dtype == torch.float32


def test_diverging_run_exits_2_with_one_line_and_keeps_checkpoints(tmp_path: Path, cli) -> None:
    # LR 3 on tiny.yaml: the loss passes the divergence bound after a few steps (step 3 on CPU fp32)
    recipe, run_dir = make_recipe(tmp_path, "hot", keep_tables=False, steps=20, ckpt_every=2)
    data = to_dict(load_yaml(recipe, Recipe))
    data["run"]["train"]["lr"] = 3.0
    save_yaml(recipe, Recipe.model_validate(data))
    msg = one_line_error(cli, "scale", str(recipe))
    summary = strict_json((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and 2 < summary["steps"] < 20, summary
    rows = [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == summary["steps"] and (rows[-1]["loss"] is None or rows[-1]["loss"] > 5.5)
    assert "diverged" in msg and "lower the recipe's lr (now 3)" in msg
    latest = launch.find_latest(run_dir)  # the last good checkpoint is kept; none of the diverged state
    assert latest is not None and int(latest.name.split("_")[1]) < summary["steps"]
    assert f"last good checkpoint {latest}" in msg


def test_scale_and_train_give_identical_losses(tmp_path: Path, cli) -> None:
    """One training loop: `mupt scale RECIPE` and `mupt train -c <the recipe's run>` agree bit for bit."""
    torch.set_num_threads(1)
    recipe, run_dir = make_recipe(tmp_path, "same", steps=12, ckpt_every=6)
    code, _, stderr = cli("scale", str(recipe))
    assert code == 0, stderr
    run_yaml = tmp_path / "run.yaml"
    save_yaml(run_yaml, load_yaml(recipe, Recipe).run)
    code, _, stderr = cli("train", "-c", str(run_yaml), "--out", str(tmp_path / "train"))
    assert code == 0, stderr
    trained = json.loads((tmp_path / "train" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == trained["train_loss"]
    assert [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r] == trained["val_loss"]
    assert len(trained["train_loss"]) == 12 and trained["train_loss"][-1] < trained["train_loss"][0] - 0.5


def test_ctrl_c_checkpoints_prints_one_line_and_exits_130(tmp_path: Path) -> None:
    recipe, run_dir = make_recipe(tmp_path, "intr", steps=2000, ckpt_every=1000)
    proc = subprocess.Popen(scale_cmd(recipe), cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(proc, run_dir / "metrics.jsonl", 5)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "terminated" and summary["signal"] == signal.SIGINT
    latest = launch.find_latest(run_dir)
    assert latest is not None and latest.name == f"step_{summary['steps']:06d}"
    lines = message_lines(stderr)
    assert len(lines) == 1 and "interrupted" in lines[0] and "rerun to resume" in lines[0], stderr


def ctrl_c_after(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Deliver a real SIGINT (what Ctrl-C sends) to this process as soon as ``launch.<name>`` has returned."""
    real = getattr(launch, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(launch, name, wrapped)


def files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_ctrl_c_during_start_up_is_one_line_trains_and_writes_nothing(tmp_path: Path, cli, monkeypatch) -> None:
    """Ctrl-C before the first step, in both windows of the start-up: while the recipe is checked (Python's own
    KeyboardInterrupt, which typer turned into a silent exit 130) and while the model is built and the checkpoint
    loaded (training's signal handler, which used to train one step and checkpoint it): one line, exit 130."""
    recipe, run_dir = make_recipe(tmp_path, "early", steps=6, ckpt_every=3)
    ctrl_c_after(monkeypatch, "validate_recipe")
    code, stdout, stderr = cli("scale", str(recipe))
    assert code == 130 and stdout == "", stderr
    lines = message_lines(stderr)
    assert len(lines) == 1 and "interrupted (Ctrl-C) before training started" in lines[0], stderr
    assert "nothing was trained or lost" in lines[0] and lines[0].endswith("rerun the same command to start")
    assert not run_dir.exists()
    monkeypatch.undo()

    assert cli("scale", str(recipe))[0] == 0  # 6 steps, checkpoints at 3 and 6
    before = files(run_dir)
    ctrl_c_after(monkeypatch, "Trainer")  # the model and data are built; the checkpoint is loaded next
    code, stdout, stderr = cli("scale", str(recipe), "--steps", "8", "--reschedule")
    assert code == 130 and stdout == "", stderr  # no banner, no summary table: nothing ran
    lines = message_lines(stderr)
    assert len(lines) == 1 and "interrupted (Ctrl-C) before training started: nothing was lost" in lines[0], stderr
    assert f"checkpoints up to step 6 are kept in {run_dir / 'checkpoints'}" in lines[0], stderr
    assert lines[0].endswith("rerun the same command to resume"), stderr
    assert files(run_dir) == before  # no checkpoint, metrics line, summary.json or recipe.yaml written


def test_ctrl_c_while_the_modules_load_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C while `mupt scale` is still importing torch: one line and exit 130, no traceback of the import."""
    recipe, run_dir = make_recipe(tmp_path, "load", steps=2000)
    rc, stderr = interrupt_while_torch_loads(scale_cmd(recipe), cwd=ROOT, env=subprocess_env())
    assert rc == 130 and "Traceback" not in stderr, stderr[-3000:]
    lines = message_lines(stderr)  # while loading, or (a fast machine) just after, in the recipe checks
    assert len(lines) == 1 and lines[0].startswith("interrupted (Ctrl-C)"), stderr
    assert "nothing was done" in lines[0] or "nothing was trained or lost" in lines[0], stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_ctrl_c_while_the_workers_start_is_one_line_from_the_launcher(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while torchrun's workers import their modules:
    the launcher says it once; no worker prints a traceback or a line of its own."""
    recipe, run_dir = make_recipe(tmp_path, "early2", steps=2000)
    proc = subprocess.Popen(
        scale_cmd(recipe, "--nproc", "2"), cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: the test's terminal-like Ctrl-C goes to it alone
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(started_workers(proc.pid)) < 2:  # both workers are loading torch: their imports take seconds
            assert time.monotonic() < deadline and proc.poll() is None, "the workers never started"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (run_dir / "metrics.jsonl").exists(), "training had started: the test proved nothing"
    assert proc.returncode == 130, stderr[-3000:]
    lines = [x for x in message_lines(stderr) if not re.match(r"[WIE]\d{4} ", x) and "launching 2 processes" not in x]
    lines = [x for x in lines if not x.startswith("--")]  # the launch command's wrapped tail
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("interrupted (Ctrl-C) before training started: nothing was trained or lost"), stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert launch.find_latest(run_dir) is None


def test_a_user_error_in_every_rank_is_printed_once(tmp_path: Path) -> None:
    """A bad --data file makes every rank raise the same DataError: the launcher prints it once, exit 2, the very
    line one process prints; no rank prints it itself, none is blamed for being stopped."""
    recipe, run_dir = make_recipe(tmp_path, "baddata")
    bad = tmp_path / "tokens.bin"
    bad.write_bytes(bytes(range(256)) * 20)  # a plain .bin: the recipe gives no vocab size for it
    single = run_scale(recipe, "--data", str(bad))
    assert single.returncode == 2 and single.stderr.startswith("error: --data "), single.stderr
    two = run_scale(recipe, "--data", str(bad), "--nproc", "2", timeout=180)
    assert two.returncode == 2, two.stderr[-3000:]
    errors = [x for x in two.stderr.splitlines() if x.startswith("error")]
    assert errors == [single.stderr.strip()], two.stderr[-3000:]
    assert "Traceback" not in two.stderr and not run_dir.exists()


def test_a_signal_while_the_ranks_connect_ends_the_rank_at_once(tmp_path: Path) -> None:
    """A torchrun rank waiting in the rendezvous for a peer that a Ctrl-C already stopped: the wait is C++, which
    Python's handlers only reach when it returns, so the rank sat there until torchrun's agent killed it 30 s later.
    Here rank 0 of 2 is started alone (the environment torchrun gives it), so its wait never ends by itself."""
    import socket

    recipe, run_dir = make_recipe(tmp_path, "lone")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(subprocess_env(), RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="lone")  # fmt: skip
    proc = subprocess.Popen(scale_cmd(recipe, "--threads", "1"), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not listening(port):  # rank 0 hosts the rendezvous store: it is up, rank 0 waits for rank 1
            assert time.monotonic() < deadline and proc.poll() is None, "rank 0 never reached the rendezvous"
            time.sleep(0.01)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGINT, stderr[-2000:]  # ended by the signal itself: nothing had started
    assert not run_dir.exists()


def listening(port: int) -> bool:
    """A TCP socket of this machine listens on ``port`` (/proc/net/tcp and tcp6: state 0A)."""
    rows = [x.split() for name in ("tcp", "tcp6") for x in Path(f"/proc/net/{name}").read_text().splitlines()[1:]]
    return any(int(r[1].rsplit(":", 1)[1], 16) == port and r[3] == "0A" for r in rows)


def started_workers(launcher: int) -> list[int]:
    """Pids of the processes torchrun's agent (``launcher``) started (a RANK in their environment) that are loading
    torch (its library is mapped): past the interpreter's own start-up, where a SIGINT is fatal to any program."""
    pids = []
    for task in Path(f"/proc/{launcher}/task").glob("*"):
        try:
            children = [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
        for pid in children:
            try:
                env = b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
                if b"\0RANK=" in env and "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                    pids.append(pid)
            except OSError:
                continue
    return pids


def strict_json(text: str) -> Any:
    """json.loads as a strict (RFC 8259) reader: bare NaN/Infinity are an error."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}: not strict JSON"))


def edited_recipe(tmp_path: Path, edit: Any) -> Path:
    recipe, _ = make_recipe(tmp_path, "edited")
    data = to_dict(load_yaml(recipe, Recipe))
    edit(data)
    recipe.write_text(yaml.safe_dump(data))  # as a hand edit would: not validated on the way out
    return recipe


@pytest.mark.parametrize(
    ("what", "edit", "expect"),
    [
        (
            "lm_head init_std",
            lambda d: d["per_role"]["lm_head"].update(init_std=0.05),
            "per_role.lm_head.init_std=0.05",
        ),
        ("per-role lr", lambda d: d["per_role"]["in_proj"].update(lr=0.004), "per_role.in_proj.lr=0.004"),
        ("lr", lambda d: d["run"]["train"].update(lr=float("inf")), "run.train.lr: Input should be a finite number"),
        ("d_model", lambda d: d["run"]["model"].update(d_model=48), "d_model"),
        ("base width", lambda d: d["run"]["param"].update(base_d_model=8), "base"),
        ("manifest", lambda d: d["manifest"]["params"]["lm_head.weight"].update(lr_mult=1.0), "lm_head.weight lr_mult"),
        ("data", lambda d: d["run"]["data"].update(source="no/such/corpus"), "no/such/corpus"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_dry_run_refuses_what_the_launch_refuses(tmp_path: Path, cli, what: str, edit: Any, expect: str) -> None:
    recipe = edited_recipe(tmp_path, edit)
    dry = one_line_error(cli, "scale", str(recipe), "--dry-run")
    assert expect in dry, dry
    assert one_line_error(cli, "scale", str(recipe)) == dry  # the real launch: the same line, nothing trained
    assert not (tmp_path / "edited-run").exists()


def test_scale_bad_inputs_are_one_line(tmp_path: Path, cli) -> None:
    recipe, run_dir = make_recipe(tmp_path, "bad")
    assert "--nproc" in one_line_error(cli, "scale", str(recipe), "--nproc", "0")
    assert "--nproc" in one_line_error(cli, "scale", str(recipe), "--nproc", "0", "--dry-run")
    assert "--lr-scale" in one_line_error(cli, "scale", str(recipe), "--lr-scale", "0")
    assert "--lr-scale" in one_line_error(cli, "scale", str(recipe), "--lr-scale", "nan")
    data = to_dict(load_yaml(recipe, Recipe))
    data["launch"]["precision"] = "fp16"
    fp16 = tmp_path / "fp16.yaml"
    fp16.write_text(yaml.safe_dump(data))
    msg = one_line_error(cli, "scale", str(fp16), "--dry-run")
    assert "launch.precision" in msg and "fp16" in msg  # refused at load, never a silent fp32 run
    assert "--precision" in one_line_error(cli, "scale", str(recipe), "--precision", "fp16")
    best = tmp_path / "best.yaml"
    best.write_text("study: s\ntrial: 3\nvalue: 2.5\nparams: {lr: 0.001}\nconfig: {}\n")
    msg = one_line_error(cli, "scale", str(best))
    assert "best.yaml from mupt tune" in msg and "mupt transfer" in msg
    assert not run_dir.exists()


def test_lr_scale_multiplies_every_group_lr(tmp_path: Path, cli) -> None:
    recipe, run_dir = make_recipe(tmp_path, "x2", steps=2, ckpt_every=2)
    code, _, stderr = cli("scale", str(recipe), "--lr-scale", "2")
    assert code == 0, stderr
    base = load_yaml(recipe, Recipe)
    resolved = load_yaml(run_dir / "recipe.yaml", Recipe)
    assert resolved.run.train.lr == 2 * base.run.train.lr
    assert {k: v["lr"] for k, v in resolved.per_role.items()} == {k: 2 * v["lr"] for k, v in base.per_role.items()}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == pytest.approx(2 * base.run.train.lr / 4)  # warmup step 1 of 4
    msg = one_line_error(cli, "scale", str(recipe), "--steps", "2")  # the same run dir at the unscaled LR
    assert "another recipe" in msg and "lr" in msg


def test_worker_failures_put_the_rank_that_died_before_the_ranks_it_took_down(tmp_path: Path, monkeypatch) -> None:
    """torchrun's own per-rank records (real ``ProcessFailure`` reading real error files written by torch's
    ``ErrorHandler``): a rank killed by a signal or failing on its own is the cause; a rank that stopped
    because a peer died (:data:`launch.EXIT_PEER_LOST`) comes last even when its record is older."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank: int, exitcode: int, error: BaseException | None, stamp: int) -> ProcessFailure:
        path = tmp_path / f"{rank}.json"
        if error is not None:
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
            try:
                raise error
            except type(error) as e:
                launch.record_failure(e)
            data = json.loads(path.read_text())
            data["message"]["extraInfo"]["timestamp"] = str(stamp)
            path.write_text(json.dumps(data))
        return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))

    peer = failure(0, launch.EXIT_PEER_LOST, launch.PeerLostError(0, signal.SIGTERM), stamp=1)  # older record
    killed = failure(1, -signal.SIGKILL, None, stamp=0)  # no error file: stamped when the agent noticed (now)
    rows = launch.worker_failures({0: peer, 1: killed})
    assert [(w.rank, w.signal, w.peer_lost) for w in rows] == [(1, 9, False), (0, None, True)]
    assert rows[0].signal_name() == "SIGKILL" and rows[0].message == "" and rows[0].error_file == ""
    assert rows[1].message.startswith("PeerLostError: rank 0 stopped")
    assert rows[1].error_file == str(tmp_path / "0.json")

    # a rank that raised on its own: the cause, with its exception as one line; first by time among causes
    own = failure(2, 1, ValueError("bad batch\nsecond line"), stamp=5)
    later = failure(3, 1, KeyError("x"), stamp=7)
    rows = launch.worker_failures({3: later, 0: peer, 2: own})
    assert [w.rank for w in rows] == [2, 3, 0] and rows[0].message == "ValueError: bad batch"

    # a user error (exit 2) recorded by two ranks, a third stopped by the agent's SIGTERM before it said anything
    # (stamped when the agent noticed, so no later than the others): the user error is the cause, said once
    from mupt.errors import ConfigError, DataError

    text = "checkpoint step_000006 was written for a 6-step schedule; pass --steps 6"
    same = [failure(r, 2, ConfigError(text), stamp=9) for r in (4, 5)]
    stopped = failure(6, -signal.SIGTERM, None, stamp=0)
    result = launch.LaunchResult(2, launch.worker_failures({6: stopped, 5: same[1], 4: same[0]}))
    assert [w.rank for w in result.failures] == [4, 5, 6] and result.cause.user_error == text
    assert result.user_errors() == [([4, 5], text)]
    other = failure(7, 2, DataError("tokens.bin: token id 300 is outside the vocabulary"), stamp=10)
    result = launch.LaunchResult(2, launch.worker_failures({4: same[0], 7: other, 5: same[1]}))
    assert result.user_errors() == [([4, 5], text), ([7], "tokens.bin: token id 300 is outside the vocabulary")]
    assert launch.LaunchResult(1, rows).user_errors() == []  # a ValueError is no user error


def mamba2_recipe(tmp: Path) -> tuple[Path, Path]:
    """tiny.yaml as mamba2 (d_model 32 at headdim 16: 4 heads), 2 steps at 1.5x its LR, checkpoint at step 2."""
    data = to_dict(load_yaml(TINY, Recipe))
    data["run"]["model"].update(arch="mamba2", headdim=16)
    data["run"]["train"].update(steps=2, lr=1.5 * data["run"]["train"]["lr"])
    data["per_role"], data["manifest"] = {}, {}
    run_dir = tmp / "m2-run"
    data["launch"].update(run_dir=str(run_dir), ckpt_every=2)
    path = tmp / "m2.yaml"
    save_yaml(path, Recipe.model_validate(data))
    return path, run_dir


def test_mamba2_plan_and_start_line_name_the_arch_and_heads(tmp_path: Path, cli) -> None:
    """--dry-run's model row and the start line name the mixer with its heads (nheads x headdim, groups), and the
    start line stays one line however long."""
    m2, run_dir = mamba2_recipe(tmp_path)
    code, out, stderr = cli("scale", str(m2), "--dry-run")
    assert code == 0, stderr
    assert re.search(r"model\s*│\s*arch=mamba2 heads=4x16 ngroups=1 d_model=32 layers=\d+ d_state=\d+", out), out
    code, out, stderr = cli("scale", str(m2), "--run-dir", str(run_dir))
    assert code == 0, stderr
    start = [line for line in out.splitlines() if line.startswith("mupt scale ")]
    assert len(start) == 1 and start[0].startswith("mupt scale arch=mamba2 heads=4x16 ngroups=1 d_model=32 layers=")
    assert start[0].rstrip().endswith(f"run_dir={run_dir}"), out
    code, out, stderr = cli("scale", str(make_recipe(tmp_path, "m1")[0]), "--dry-run")
    assert code == 0 and re.search(r"model\s*│\s*arch=mamba1 d_model=32 ", out), out


def test_checkpoint_of_another_arch_names_the_arch_not_the_lr(tmp_path: Path, cli) -> None:
    """A mamba1 recipe pointed at a mamba2 run's dir (whose LR also differs): the refusal names the arch, the
    real difference, rather than the LR that alphabetical order would put first."""
    m2, run_dir = mamba2_recipe(tmp_path)
    code, _, stderr = cli("scale", str(m2))
    assert code == 0, stderr
    mamba1, _ = make_recipe(tmp_path, "m1")
    msg = one_line_error(cli, "scale", str(mamba1), "--run-dir", str(run_dir))
    assert "another recipe (model.arch mamba2 in the checkpoint vs mamba1 in the recipe)" in msg, msg
    assert launch.find_latest(run_dir).name == "step_000002"  # nothing overwritten
