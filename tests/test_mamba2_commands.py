"""arch mamba2 through every command: tune -> transfer (recipe) -> scale (FSDP2, 2 gloo processes, DCP resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mupt.config import Arch, Recipe, load_yaml
from mupt.model import ARCH_ROLES

ROOT = Path(__file__).resolve().parent.parent


def mupt(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run(
        [sys.executable, "-m", "mupt", *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout
    )


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_tune_transfer_scale_fsdp_resume(tmp_path: Path) -> None:
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard") or not torch.distributed.is_gloo_available():
        pytest.skip("needs FSDP2 (fully_shard) and gloo")
    tune = mupt(
        "tune", "--arch", "mamba2", "--headdim", "16", "--width", "32", "--layers", "1", "--d-state", "8",
        "--steps", "12", "--seq-len", "32", "--eval-every", "6", "--trials", "2", "--study", "m2",
        "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path,
    )  # fmt: skip
    assert tune.returncode == 0, tune.stderr[-2000:]
    best = tmp_path / "runs" / "m2" / "best.yaml"
    recipe_path = tmp_path / "m2-64.yaml"
    tr = mupt("transfer", "--from", str(best), "--to-width", "64", "--to-state", "16", "--steps", "4",
              "--out", str(recipe_path), cwd=tmp_path)  # fmt: skip
    assert tr.returncode == 0, tr.stderr[-2000:]
    recipe = load_yaml(recipe_path, Recipe)
    assert recipe.run.model.arch is Arch.MAMBA2 and recipe.run.model.nheads == 8
    assert set(recipe.per_role) == {r.value for r in ARCH_ROLES[Arch.MAMBA2]}
    assert recipe.per_role["in_proj_C"]["fwd_mult"] == 0.5  # N_x 8 -> 16 under mup-ssm

    single = tmp_path / "single"
    run = mupt(
        "scale", str(recipe_path), "--run-dir", str(single), "--log-every", "1", "--ckpt-every", "2", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    # two processes, FSDP2: stop at step 2, then resume from its DCP checkpoint to step 4
    sharded = tmp_path / "fsdp"
    flags = ["--run-dir", str(sharded), "--log-every", "1", "--ckpt-every", "2", "--nproc", "2", "--fsdp"]
    first = mupt("scale", str(recipe_path), *flags, "--steps", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    rest = mupt("scale", str(recipe_path), *flags, cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr[-2000:]
    summary = json.loads((sharded / "summary.json").read_text())
    assert (summary["start_step"], summary["steps"], summary["world"]) == (2, 4, 2)
    want, got = losses(single), losses(sharded)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-5), step


def test_check_all_builds_mamba2_in_both_parts(cli, tmp_path: Path) -> None:
    """`mupt check all --arch mamba2`: the coordinate part and the LR-transfer part both run the Mamba-2 model
    with the given head shape and state width (the smallest CI shapes: coord 64 vs 512, transfer 32 and 64)."""
    out = tmp_path / "ca"
    code, stdout, stderr = cli(
        "check", "all", "--arch", "mamba2", "--headdim", "32", "--ngroups", "2", "--d-state", "8",
        "--widths", "32,64", "--lrs", "2^-5..2^-3", "--steps", "2", "--coord-widths", "64,512",
        "--workers", "1", "--threads", "1", "--run-dir", str(out),
    )  # fmt: skip
    assert code == 0, stdout + stderr
    assert "coord PASS" in stdout and "arch=mamba2" in stderr
    coord = json.loads((out / "coord" / "coord.json").read_text())
    assert {k: coord["settings"][k] for k in ("arch", "headdim", "ngroups", "base_d_state", "base_width")} == {
        "arch": "mamba2", "headdim": 32, "ngroups": 2, "base_d_state": 8, "base_width": 64,
    }  # fmt: skip
    assert coord["passed"] and {r["layer"] for r in coord["rows"]} == {"0", "1", "2", "head"}
    points = [json.loads(p.read_text()) for p in (out / "transfer" / "points").glob("*.json")]
    assert len(points) == 6
    for p in points:
        m = p["config"]["model"]
        assert (m["arch"], m["headdim"], m["ngroups"], m["d_state"]) == ("mamba2", 32, 2, 8), m
    # a head shape the transfer widths cannot hold is refused before any run, in one line
    bad = tmp_path / "bad"
    code, stdout, stderr = cli("check", "all", "--arch", "mamba2", "--headdim", "48", "--run-dir", str(bad))
    assert code == 2 and "--headdim 48" in stderr and "(use multiples of 24)" in stderr and not bad.exists()
