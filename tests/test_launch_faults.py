"""mupt scale under faults, as a black box: 2 gloo ranks (DDP and FSDP2) killed and resumed.

One run of 60 steps is interrupted three times and rerun after each:

1. ``kill -9`` of rank 1 (the launcher names it in one line, exit 1; rank 0 stops without a traceback);
2. ``kill -9`` of the launcher (torchrun's agent): its workers must not train on as orphans;
3. SIGTERM to the launcher (the workers checkpoint and stop, exit 0).

After every interruption the latest checkpoint must be complete (``meta.json`` names every file
with its size) and nothing half-written may be pointed to; each rerun must resume from it; the
final metrics must equal, bit for bit, those of an uninterrupted 2-rank run of the same recipe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from test_launch import ROOT, make_recipe, run_scale, scale_cmd, subprocess_env, wait_for_step

from mupt import launch
from mupt.config import Recipe, load_yaml

STEPS = 60
GAP = 12  # steps each interrupted segment trains before the fault


def records(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> {loss, val_loss, lr, tokens} from metrics.jsonl (wall-clock fields dropped)."""
    out: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = {k: r[k] for k in ("loss", "val_loss", "lr", "tokens") if k in r}
    return out


def workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the processes the launcher (torchrun's agent) started."""
    pids: set[int] = set()
    for task in Path(f"/proc/{launcher}/task").iterdir():
        try:
            pids |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            continue
    ranks = {}
    for pid in pids:
        try:
            env = dict(
                kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv
            )  # fmt: skip
        except OSError:
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie waiting for a reaper has stopped


def wait_gone(pids: Iterable[int], timeout: float = 60) -> None:
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return
        time.sleep(0.05)
    for p in pids:  # do not leave them behind, then fail
        if alive(p):
            os.kill(p, signal.SIGKILL)
    raise AssertionError(f"workers {pids} still running {timeout}s after their launcher stopped")


def start(recipe: Path, flags: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        scale_cmd(recipe, *flags), cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def intact_latest(run_dir: Path, cfg: Recipe) -> int:
    """Step of the latest checkpoint, after checking that every kept checkpoint is complete."""
    latest = launch.find_latest(run_dir)
    assert latest is not None, "no checkpoint survived"
    root = run_dir / launch.CKPT_DIR
    for ckpt in root.glob("step_*"):
        if ckpt.name.endswith(".tmp"):
            assert ckpt != latest  # a write cut short stays under .tmp, never pointed to
            continue
        meta = launch.read_meta(ckpt, cfg.run)  # every file present with its recorded size, right model
        assert {f"rank_{r}.pt" for r in range(2)} <= set(meta["files"]), meta["files"]
    return int(latest.name.split("_")[1])


def stop_all(proc: subprocess.Popen[str], pids: Iterable[int]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for p in pids:
        if alive(p):
            os.kill(p, signal.SIGKILL)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_kill9_rank_kill9_launcher_sigterm_resume_bit_identical(tmp_path: Path, mode: str) -> None:
    if mode == "fsdp" and not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")
    if not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    flags = ["--nproc", "2"] + (["--fsdp"] if mode == "fsdp" else [])
    ref_recipe, ref_dir = make_recipe(tmp_path, "ref", steps=STEPS, ckpt_every=5)
    ref = run_scale(ref_recipe, *flags, timeout=180)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = records(ref_dir)
    assert sorted(s for s in reference if "loss" in reference[s]) == list(range(1, STEPS + 1))

    recipe, run_dir = make_recipe(tmp_path, "faults", steps=STEPS, ckpt_every=5)
    cfg = load_yaml(recipe, Recipe)
    metrics = run_dir / "metrics.jsonl"
    resumed_from = [0]

    # 1. kill -9 one rank: the launcher reports the failed worker and exits non-zero; rank 0 stops too
    proc = start(recipe, flags)
    ranks: dict[int, int] = {}
    try:
        wait_for_step(proc, metrics, GAP, timeout=120)
        ranks = workers(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        wait_gone(ranks.values())
    finally:
        stop_all(proc, ranks.values())
    assert proc.returncode == 1, err[-2000:]  # a failed run: 1, as any worker failure (2 stays for user errors)
    assert not (run_dir / "summary.json").exists()
    resumed_from.append(intact_latest(run_dir, cfg))
    # one line names the rank that died and how, what is kept, what to do; rank 0's collective error, cut short
    # by the dead peer, is not presented (no traceback, no "fix it")
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 was killed by signal 9 (SIGKILL"), err[-2000:]
    assert f"checkpoints up to step {resumed_from[-1]} are kept" in last, last
    assert last.endswith("rerun the same command to resume"), last
    assert "Traceback" not in err and "fix it" not in err, err[-3000:]

    # 2. kill -9 the launcher: its workers get SIGTERM from the kernel, checkpoint and stop (no orphans)
    proc = start(recipe, flags)
    try:
        wait_for_step(proc, metrics, resumed_from[-1] + GAP, timeout=120)
        ranks = workers(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_gone(ranks.values())
    finally:
        stop_all(proc, ranks.values())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "terminated" and summary["start_step"] == resumed_from[-1], summary
    assert summary["steps"] < STEPS, "the orphaned workers trained on to the end"
    resumed_from.append(intact_latest(run_dir, cfg))
    assert resumed_from[-1] == summary["steps"]

    # 3. SIGTERM to the launcher: forwarded to the workers, which checkpoint; exit 0
    proc = start(recipe, flags)
    try:
        wait_for_step(proc, metrics, resumed_from[-1] + GAP, timeout=120)
        ranks = workers(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        wait_gone(ranks.values())
    finally:
        stop_all(proc, ranks.values())
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "terminated" and summary["start_step"] == resumed_from[-1], summary
    resumed_from.append(intact_latest(run_dir, cfg))
    assert resumed_from[-1] == summary["steps"] < STEPS

    # 4. rerun to the end: every logged number equals the uninterrupted run's, bit for bit
    done = run_scale(recipe, *flags, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["start_step"] == resumed_from[-1] and summary["steps"] == STEPS
    assert 0 < resumed_from[1] < resumed_from[2] < resumed_from[3] < STEPS, resumed_from
    assert records(run_dir) == reference
    assert not list((run_dir / launch.CKPT_DIR).glob("*.tmp")), "a half-written checkpoint was left behind"
    assert intact_latest(run_dir, cfg) == STEPS
