"""Transfer regret: its arithmetic on hand-made sweeps with known losses; `mupt check target`'s gate on real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mupt.check.regret import base_optimum, regret_at, regret_by_width, seed_means, worst_regret
from mupt.config import load_recipe, save_yaml, with_overrides


def pt(scheme: str, width: int, x: float, seed: int, loss: float | None) -> dict:
    return {"scheme": scheme, "width": width, "log2_lr": x, "lr": 2.0**x, "seed": seed,
            "status": "ok" if loss is not None else "diverged", "final_val_loss": loss}  # fmt: skip


# A sweep with known losses (nats): base width 64 and width 128, two schemes, two seeds.
SWEEP = [
    # base width: mup-ssm's grid argmin of the seed mean is 2^-9 (means 2.10, 1.90, 2.00)
    pt("mup-ssm", 64, -10, 0, 2.0), pt("mup-ssm", 64, -10, 1, 2.2),
    pt("mup-ssm", 64, -9, 0, 1.9), pt("mup-ssm", 64, -9, 1, 1.9),
    pt("mup-ssm", 64, -8, 0, 2.0), pt("mup-ssm", 64, -8, 1, 2.0),
    # width 128: the transferred setting (mup-ssm, 2^-9) has mean 1.85; sp at 2^-10 is the best (mean 1.80)
    pt("mup-ssm", 128, -10, 0, 1.95), pt("mup-ssm", 128, -10, 1, 1.95),
    pt("mup-ssm", 128, -9, 0, 1.8), pt("mup-ssm", 128, -9, 1, 1.9),
    pt("mup-ssm", 128, -8, 0, 1.9), pt("mup-ssm", 128, -8, 1, 1.9),
    pt("sp", 128, -11, 0, 1.9), pt("sp", 128, -11, 1, 1.9),
    pt("sp", 128, -10, 0, 1.75), pt("sp", 128, -10, 1, 1.85),
    pt("sp", 128, -9, 0, 1.85), pt("sp", 128, -9, 1, 2.05),
]  # fmt: skip


def test_regret_arithmetic_on_known_losses() -> None:
    assert base_optimum(SWEEP, "mup-ssm", 64) == -9
    (row,) = regret_by_width(SWEEP, "mup-ssm")
    assert (row.width, row.transferred_log2_lr) == (128, -9)
    assert row.loss == pytest.approx(1.85)
    assert (row.best_scheme, row.best_log2_lr, row.best_loss) == ("sp", -10, pytest.approx(1.80))
    # 1.85 / 1.80 - 1 = 2.7778 %
    assert row.regret_pct == pytest.approx(2.777778, abs=1e-5)
    # per seed: 1.8/1.75 - 1 = 2.857143 %, 1.9/1.85 - 1 = 2.702703 %; s.e. = |difference| / 2 for two seeds
    assert row.seeds == 2
    assert row.se_pct == pytest.approx((2.857143 - 2.702703) / 2, abs=1e-5)
    assert not row.diverged and not row.best_at_edge and row.notes == []
    assert worst_regret([row]) == pytest.approx(2.777778, abs=1e-5)


def test_regret_zero_when_transferred_is_best_and_edge_flagged() -> None:
    # without sp, mup-ssm's own best at 128 is the transferred 2^-9: regret 0
    only = [p for p in SWEEP if p["scheme"] == "mup-ssm"]
    (row,) = regret_by_width(only, "mup-ssm")
    assert row.regret_pct == 0.0 and row.se_pct == 0.0 and row.best_scheme == "mup-ssm"
    # sp's best at its lowest measured LR is flagged: the true best may be beyond the grid
    edge = regret_at([*only, pt("sp", 128, -12, 0, 1.7), pt("sp", 128, -12, 1, 1.7),
                      pt("sp", 128, -11, 0, 1.8), pt("sp", 128, -11, 1, 1.8)], 128, "mup-ssm", -9)  # fmt: skip
    assert edge.best_at_edge and edge.best_log2_lr == -12 and "edge" in edge.notes[0]
    assert edge.regret_pct == pytest.approx(100 * (1.85 / 1.7 - 1))


def test_regret_diverged_or_missing_transferred_setting() -> None:
    # one seed of the transferred setting diverged: the mean is missing, the row says so, the gate fails
    div = [p if (p["width"], p["scheme"], p["log2_lr"], p["seed"]) != (128, "mup-ssm", -9, 1)
           else pt("mup-ssm", 128, -9, 1, None) for p in SWEEP]  # fmt: skip
    assert seed_means(div)[("mup-ssm", 128, -9.0)] is None
    (row,) = regret_by_width(div, "mup-ssm")
    assert row.diverged and row.regret_pct is None and row.best_scheme == "sp"
    assert worst_regret([row]) == math.inf
    missing = regret_at(SWEEP, 128, "mup-ssm", -7)
    assert missing.regret_pct is None and not missing.diverged and "not measured" in missing.notes[0]
    assert regret_by_width([pt("mup-ssm", 64, -9, 0, None)], "mup-ssm") == []


# --- mupt check transfer: regret in the table, JSON, summary, and its gate on real runs ------------------


def test_check_transfer_regret_and_gate_exit_codes(cli, tmp_path: Path) -> None:
    out = tmp_path / "tr"
    args = ["check", "transfer", "--widths", "16,32", "--lrs", "2^-6..2^-3", "--vs", "sp,mup", "--seeds", "2",
            "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--layers", "1", "--backend", "reference",
            "--workers", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    code, stdout, stderr = cli(*args, "--max-regret", "1000")
    assert code == 0, stderr
    doc = json.loads((out / "transfer.json").read_text())
    assert len(doc["points"]) == 3 * 2 * 4 * 2
    # the regret at width 32, recomputed here from the raw points
    mean: dict[tuple[str, int, float], list[float]] = {}
    for p in doc["points"]:
        mean.setdefault((p["scheme"], p["width"], p["log2_lr"]), []).append(p["final_val_loss"])
    m = {k: sum(v) / len(v) for k, v in mean.items()}
    x_base = min((k for k in m if k[:2] == ("mup-ssm", 16)), key=lambda k: m[k])[2]
    best = min(v for k, v in m.items() if k[1] == 32)
    expected = 100 * (m[("mup-ssm", 32, x_base)] / best - 1)
    (row,) = doc["regret"]
    assert row["width"] == 32 and row["transferred_log2_lr"] == x_base and row["seeds"] == 2
    assert row["regret_pct"] == pytest.approx(expected, abs=1e-9) and row["se_pct"] is not None
    assert doc["passed"] is True and doc["regret_passed"] is True
    assert doc["noise"]["val_tokens"] > 0 and doc["noise"]["seed_std_median"] > 0
    assert "regret of the transferred setting" in stdout and "measurement noise" in stdout
    assert "regret of mup-ssm's transferred setting" in (out / "summary.md").read_text()
    # the gate: a max just below the measured regret fails (exit 1), just above passes; every point cached
    assert expected > 1  # 6 steps: another scheme/LR beats the transferred mup-ssm LR clearly at width 32
    code, stdout, _ = cli(*args, "--max-regret", f"{expected * 0.99:.6f}")
    assert code == 1 and "48 cached, 0 trained" in stdout
    assert json.loads((out / "transfer.json").read_text())["regret_passed"] is False
    code, stdout, _ = cli(*args, "--max-regret", f"{expected * 1.01 + 1e-6:.6f}")
    assert code == 0 and "48 cached, 0 trained" in stdout
    # mupt transfer from this proxy (d_model 16, 1 layer) finds the result under --runs-dir and prints the regret
    proxy = ["transfer", "--lr", "0.004", "--width", "16", "--layers", "1", "--backend", "reference",
             "--health-steps", "0", "--runs-dir", str(tmp_path)]  # fmt: skip
    code, stdout, stderr = cli(*proxy, "--to-width", "32", "--out", str(tmp_path / "r32.yaml"))
    assert code == 0, stderr
    flat = " ".join(stdout.split())
    assert f"expected regret of this recipe: d_model 32: {row['regret_pct']:.2f}% ± {row['se_pct']:.2f}" in flat
    recipe = load_recipe(tmp_path / "r32.yaml")
    assert recipe.source["expected_regret"]["at_target"]["regret_pct"] == pytest.approx(row["regret_pct"])
    # the check ran 6 steps per point, the proxy trains longer: said, and no "FAILED" for a passing check
    steps = recipe.source["expected_regret"]["caveats"]
    assert steps == [f"it trained 6 steps per point, the proxy {recipe.source['proxy_config']['train']['steps']}"]
    assert f"caveat: {steps[0]}" in flat and "FAILED" not in flat
    # a failed check's regret is still shown, marked as such
    code, _, _ = cli(*args, "--max-regret", f"{expected * 0.99:.6f}")
    assert code == 1
    code, stdout, _ = cli(*proxy, "--to-width", "32", "--out", str(tmp_path / "r32f.yaml"))
    assert code == 0 and "caveat: the check FAILED" in " ".join(stdout.split())
    code, stdout, _ = cli(*proxy, "--to-width", "128", "--out", str(tmp_path / "r128.yaml"))
    flat = " ".join(stdout.split())
    assert code == 0 and "d_model 128 is wider than any width checked (max 32)" in flat
    assert "mupt check target" in flat
    # a result for another proxy (2 layers) is refused when named, ignored when searched
    deeper = [("2" if a == "1" and proxy[i - 1] == "--layers" else a) for i, a in enumerate(proxy)]
    code, _, stderr = cli(*deeper, "--to-width", "32", "--check", str(out), "--out", str(tmp_path / "x.yaml"))
    assert code == 2 and "model.n_layers is 1 there, 2 in the proxy" in stderr
    code, stdout, _ = cli(*deeper, "--to-width", "32", "--out", str(tmp_path / "y.yaml"))
    assert code == 0 and "expected regret: unknown" in " ".join(stdout.split())


# --- mupt check target on real runs ------------------------------------------------------------


def tiny_recipe(tmp_path: Path, lr: float) -> Path:
    """recipes/tiny.yaml (d_model 32 from base 16) with a given LR and a constant schedule, 1 layer."""
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
    run = with_overrides(recipe.run, {"train.lr": lr, "train.schedule": "constant", "train.warmup_steps": 0,
                                      "train.batch_size": 4, "model.scan_backend": "reference"})  # fmt: skip
    path = tmp_path / f"tiny-{lr:g}.yaml"
    save_yaml(path, recipe.model_copy(update={"run": run}))
    return path


def test_check_target_gate_exit_codes(cli, tmp_path: Path) -> None:
    # LR 2e-4 is far too small for 12 steps: doubling it must lower the loss -> regret > 0.5% -> exit 1
    small = tiny_recipe(tmp_path, 2e-4)
    code, stdout, stderr = cli("check", "target", str(small), "--steps", "12", "--workers", "1", "--threads", "1",
                               "--max-regret", "0.5", "--run-dir", str(tmp_path / "small"))  # fmt: skip
    assert code == 1, stderr
    doc = json.loads((tmp_path / "small" / "target.json").read_text())
    assert doc["passed"] is False and doc["regret"]["regret_pct"] > 0.5
    assert doc["regret"]["best_log2_lr"] == pytest.approx(math.log2(4e-4))
    losses = {r["factor"]: r["loss"] for r in doc["table"]}
    assert losses[2.0] < losses[1.0] < losses[0.5]  # more LR, more progress, at this tiny LR
    assert doc["regret"]["regret_pct"] == pytest.approx(100 * (losses[1.0] / losses[2.0] - 1))
    assert "FAIL" in stdout and "regret of the transferred setting" in stdout
    # the transferred LR against one 1000x smaller: the transferred setting is the best -> regret 0 -> exit 0
    good = tiny_recipe(tmp_path, 4e-3)
    code, stdout, stderr = cli("check", "target", str(good), "--steps", "12", "--factors", "0.001,1", "--seeds", "2",
                               "--workers", "1", "--threads", "1", "--run-dir", str(tmp_path / "good"))  # fmt: skip
    assert code == 0, stderr
    doc = json.loads((tmp_path / "good" / "target.json").read_text())
    assert doc["passed"] is True and doc["regret"]["regret_pct"] == 0.0 and doc["regret"]["seeds"] == 2
    assert len(doc["points"]) == 4 and all(p["val_tokens"] > 0 and p["val_se"] > 0 for p in doc["points"])
    # a rerun reuses every cached run
    code, stdout, _ = cli("check", "target", str(good), "--steps", "12", "--factors", "0.001,1", "--seeds", "2",
                          "--workers", "1", "--threads", "1", "--run-dir", str(tmp_path / "good"))  # fmt: skip
    assert code == 0 and "4 cached, 0 trained" in stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--factors", "0.5,2"], "--factors"), (["--seeds", "0"], "--seeds"), (["--steps", "0"], "--steps"),
     (["--max-regret", "-1"], "--max-regret"), (["--max-regret", "nan"], "--max-regret")],
)  # fmt: skip
def test_check_target_bad_inputs_exit_2(cli, tmp_path: Path, args: list[str], needle: str) -> None:
    recipe = tiny_recipe(tmp_path, 4e-3)
    code, _, stderr = cli("check", "target", str(recipe), *args, "--run-dir", str(tmp_path / "x"))
    assert code == 2 and needle in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
