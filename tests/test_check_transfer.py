"""LR-transfer check: verdict logic on synthetic tables, real tiny sweeps through the CLI, resume, divergence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from mupt.check.lr_transfer import (
    SweepSpec,
    analyze,
    check_transfer,
    parse_lr_grid,
    refine_optimum,
)
from mupt.cli.check_transfer import build_spec
from mupt.config import Arch, OptimizerName, RunConfig, Scheme, parse_widths, with_overrides
from mupt.errors import ConfigError

TINY = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--layers", "1", "--backend", "reference",
        "--seeds", "1"]  # fmt: skip


def tiny_base() -> RunConfig:
    return with_overrides(
        RunConfig(),
        {
            "model.n_layers": 1,
            "model.scan_backend": "reference",
            "train.steps": 4,
            "train.batch_size": 2,
            "train.seq_len": 16,
            "train.optimizer": OptimizerName.ADAM,
        },
    )


# --- parsing --------------------------------------------------------------------------------


def test_parse_lr_grid_forms() -> None:
    grid = parse_lr_grid("2^-14..2^-4")
    assert [math.log2(x) for x in grid] == pytest.approx(list(range(-14, -3)))
    half = parse_lr_grid("2^-10..2^-8:0.5")
    assert [math.log2(x) for x in half] == pytest.approx([-10, -9.5, -9, -8.5, -8])
    assert parse_lr_grid("3e-3, 1e-3,2^-6") == pytest.approx([1e-3, 3e-3, 2**-6])


@pytest.mark.parametrize("bad", ["2^-4..2^-14", "abc", "1e-3,2e-3", "2^-10..2^-5:0", "1e-3,-1,2e-3", "2^-x..2^-3"])
def test_parse_lr_grid_rejects(bad: str) -> None:
    with pytest.raises(ConfigError, match="--lrs"):
        parse_lr_grid(bad)


def test_parse_widths() -> None:
    assert parse_widths("256,64,128", at_least=2) == [64, 128, 256]
    for bad in ("64", "64,64", "a,b", "0,64"):
        with pytest.raises(ConfigError, match="--widths"):
            parse_widths(bad, at_least=2)


# --- verdict logic on synthetic tables -------------------------------------------------------

XS = [-10.0, -9.0, -8.0, -7.0, -6.0]


def table_of(rows: dict[int, list[float | None]]) -> dict[int, dict[float, float | None]]:
    return {w: dict(zip(XS, ys, strict=True)) for w, ys in rows.items()}


def test_parabola_refinement_exact() -> None:
    # vertex of the parabola through (-9, 2.5), (-8, 2.2), (-7, 2.4): -8 + 0.1
    opt, idx, edge = refine_optimum(XS, [3.0, 2.5, 2.2, 2.4, 2.9])
    assert (idx, edge) == (2, False) and opt == pytest.approx(-7.9)
    # unequal spacing: y = (x + 7.5)^2 sampled at -9, -8, -6 -> exact vertex -7.5
    opt, _, _ = refine_optimum([-9.0, -8.0, -6.0], [2.25, 0.25, 2.25])
    assert opt == pytest.approx(-7.5)
    # argmin at the edge: not refined, flagged
    assert refine_optimum(XS, [2.0, 2.5, 2.6, 2.7, 2.8]) == (-10.0, 0, True)
    # a diverged neighbour: keep the grid point
    assert refine_optimum(XS, [3.0, None, 2.2, 2.4, None]) == (-8.0, 2, False)
    assert refine_optimum(XS, [None] * 5) == (None, None, False)


def test_analyze_drift_and_monotone_pass() -> None:
    t = table_of({64: [3.0, 2.5, 2.2, 2.4, 2.9], 128: [2.9, 2.4, 2.1, 2.0, 2.6]})
    r = analyze(t, "mup-ssm", max_drift=1.0)
    # width 128: argmin -7, parabola through (-8, 2.1), (-7, 2.0), (-6, 2.6) -> -7 - 5/14
    assert r.widths[1].opt_log2_lr == pytest.approx(-7 - 5 / 14)
    assert r.drift == pytest.approx(0.9 - 5 / 14)
    assert r.base_opt_log2_lr == pytest.approx(-7.9)
    assert [w.loss_at_base_opt for w in r.widths] == [2.2, 2.1]
    assert r.monotone_at_base_opt and r.monotone_at_each_opt and r.passed
    assert analyze(t, "mup-ssm", max_drift=0.5).passed is False  # 0.543 > 0.5


def test_analyze_optimum_at_the_grid_edge_is_not_a_pass() -> None:
    """Loss still falling at the grid's last LR at every width: drift 0 between two bounds, not a measurement."""
    r = analyze(table_of({64: [3.0, 2.8, 2.6, 2.4, 2.2], 128: [2.9, 2.7, 2.5, 2.3, 2.1]}), "mup-ssm")
    assert r.drift == 0.0 and r.monotone_at_base_opt and all(w.at_edge for w in r.widths)
    assert not r.passed
    assert any("grid edge for width(s) [64, 128]" in why and "widen --lrs" in why for why in r.reasons)
    # one width at the edge is enough: its optimum (and so the drift) is unknown
    r1 = analyze(table_of({64: [3.0, 2.5, 2.2, 2.4, 2.9], 128: [2.9, 2.7, 2.5, 2.3, 2.1]}), "mup-ssm", max_drift=9)
    assert not r1.passed and [w.width for w in r1.widths if w.at_edge] == [128]
    # the verdict names the part that failed: not drift or monotonicity, the grid
    assert r.verdicts(1.0) == {"drift": "unknown", "monotonicity": "PASS", "optimum inside the grid": "FAIL"}


def test_analyze_drift_and_non_monotone_fail() -> None:
    t = table_of(
        {
            64: [3.0, 2.5, 2.2, 2.4, 2.9],
            128: [2.1, 2.0, 2.15, 2.4, 2.9],  # optimum moves left: parabola (-10,2.1),(-9,2.0),(-8,2.15)
            256: [2.0, 2.1, 2.3, 2.6, None],  # argmin at the edge; worse than 128 at base optimum (-8)
        }
    )
    r = analyze(t, "sp", max_drift=1.0)
    v128 = -9 - (2.15 - 2.1) / (2 * (2.1 - 4.0 + 2.15))  # = -9.1
    assert r.widths[1].opt_log2_lr == pytest.approx(v128)
    assert r.widths[2].opt_log2_lr == -10.0 and r.widths[2].at_edge
    assert r.drift == pytest.approx(2.1)  # |-10 - (-7.9)|
    assert not r.monotone_at_base_opt  # 2.2 -> 2.15 -> 2.3
    assert r.monotone_at_each_opt  # best losses 2.2 -> 2.0 -> 2.0: equal is "not worse"
    assert not r.passed
    assert any("drifts" in why for why in r.reasons) and any("edge" in why for why in r.reasons)
    assert r.verdicts(1.0) == {"drift": "unknown", "monotonicity": "FAIL", "optimum inside the grid": "FAIL"}
    interior = analyze(table_of({64: [3.0, 2.5, 2.2, 2.4, 2.9], 128: [2.1, 2.0, 2.15, 2.4, 2.9]}), "sp", max_drift=0.5)
    assert interior.verdicts(0.5) == {"drift": "FAIL", "monotonicity": "PASS", "optimum inside the grid": "PASS"}


def test_analyze_diverged_wider_point_is_worse() -> None:
    t = table_of({64: [3.0, 2.5, 2.2, 2.4, 2.9], 128: [2.9, 2.4, None, 2.0, 2.6]})
    r = analyze(t, "sp")
    assert r.widths[1].loss_at_base_opt is None
    assert not r.monotone_at_base_opt and not r.passed
    # a whole width diverged: no drift, fail with a reason
    r2 = analyze(table_of({64: [3.0, 2.5, 2.2, 2.4, 2.9], 128: [None] * 5}), "sp")
    assert r2.drift is None and not r2.passed and any("diverged" in why for why in r2.reasons)


# --- real sweeps ------------------------------------------------------------------------------


def test_cli_tiny_sweep_end_to_end(cli, tmp_path: Path) -> None:
    out = tmp_path / "tr"
    # 4 steps cannot resolve 1% of loss: this test is about the drift gate (regret: tests/test_regret.py).
    # At 4 steps the optimum is large: mup-ssm's lies at 2^-4 at both widths, inside this grid
    args = ["check", "transfer", "--widths", "16,32", "--lrs", "2^-6..2^-3", "--vs", "sp", "--workers", "2",
            "--max-regret", "100"]  # fmt: skip
    code, stdout, stderr = cli(*args, *TINY, "--out", str(out))
    assert code == 0, stderr
    doc = json.loads((out / "transfer.json").read_text())
    assert doc["gate"] == "mup-ssm" and doc["passed"] is True
    assert len(doc["points"]) == 2 * 2 * 4 and doc["trained"] == 16
    assert set(doc["results"]) == {"mup-ssm", "sp"}
    assert all(p["status"] == "ok" and p["final_val_loss"] > 0 for p in doc["points"])
    # same data and seed: at the base width both schemes are the same model -> identical losses
    base = {(p["scheme"], p["log2_lr"]): p["final_val_loss"] for p in doc["points"] if p["width"] == 16}
    assert base[("mup-ssm", -4.0)] == pytest.approx(base[("sp", -4.0)], abs=1e-6)
    assert (out / "transfer.png").stat().st_size > 1000
    assert "## mupt check transfer: PASS" in (out / "summary.md").read_text()
    assert len(list((out / "points").glob("*.json"))) == 16
    assert "log2 lr*" in stdout
    # a gate that cannot pass (wider must be 10 nats better) exits 1, reusing every cached point
    code, stdout, _ = cli(*args, *TINY, "--out", str(out), "--monotone-tol", "-10")
    assert code == 1
    assert "16 cached, 0 trained" in stdout
    # a grid that stops below the optimum (2^-6..2^-4: the argmin is 2^-4, its edge, at every width) cannot
    # measure the drift: not a PASS (it read "drift 0.00 -> PASS" before), exit 1 with the reason and the fix
    edge_args = [a if a != "2^-6..2^-3" else "2^-6..2^-4" for a in args]
    code, stdout, _ = cli(*edge_args, *TINY, "--out", str(out))
    flat = " ".join(stdout.split())
    assert code == 1, stdout
    assert "12 cached, 0 trained" in flat and "grid edge for width(s) [16, 32]" in flat and "widen --lrs" in flat
    assert "mup-ssm: drift unknown, monotonicity PASS, optimum inside the grid FAIL, regret" in flat  # not "drift
    # and monotonicity FAIL" (the walkthrough's complaint: both had printed True above it)
    assert json.loads((out / "transfer.json").read_text())["results"]["mup-ssm"]["drift"] == 0.0


def test_resume_after_interruption_reuses_points(tmp_path: Path) -> None:
    spec = SweepSpec(tiny_base(), [16, 32], [2**-9, 2**-8, 2**-7], [Scheme.MUP_SSM], [0])
    seen: list[bool] = []

    def interrupt_after_two(rec: dict, cached: bool) -> None:
        seen.append(cached)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        check_transfer(spec, tmp_path, workers=1, threads=1, on_point=interrupt_after_two)
    assert len(list((tmp_path / "points").glob("*.json"))) == 2
    assert not (tmp_path / "transfer.json").exists()
    rep = check_transfer(spec, tmp_path, workers=2, threads=1)
    assert (rep.sweep.cache_hits, rep.sweep.trained) == (2, 4)
    again = check_transfer(spec, tmp_path, workers=2, threads=1)
    assert (again.sweep.cache_hits, again.sweep.trained) == (6, 0)
    assert again.tables == rep.tables
    # a different config (more steps) is a different point: nothing reused
    longer = SweepSpec(with_overrides(tiny_base(), {"train.steps": 5}), [16, 32], spec.lrs, spec.schemes, [0])
    assert check_transfer(longer, tmp_path / "b", workers=1, threads=1, plot=False).sweep.cache_hits == 0


def test_diverged_points_recorded_and_plotted_as_missing(cli, tmp_path: Path) -> None:
    out = tmp_path / "div"
    # a passing sweep (mup-ssm's optimum 2^-4 inside) plus one LR at which every width diverges
    code, stdout, stderr = cli(
        "check", "transfer", "--widths", "16,32", "--lrs", "2^-5,2^-4,2^-3,2^6", "--workers", "1", *TINY,
        "--max-regret", "100", "--out", str(out),
    )  # fmt: skip
    doc = json.loads((out / "transfer.json").read_text())
    huge = [p for p in doc["points"] if p["log2_lr"] == 6.0]
    assert len(huge) == 2 and all(p["status"] == "diverged" and p["final_val_loss"] is None for p in huge)
    assert all(p["reason"] for p in huge)
    assert doc["tables"]["mup-ssm"]["16"]["6"] is None
    assert code == 0, stdout  # diverged points are missing values, not a failed gate
    assert doc["passed"] is True and "div" in stdout
    assert (out / "transfer.png").is_file() and "diverged" in (out / "summary.md").read_text()
    points = pd.read_csv(out / "points.csv")  # the sweep points as a table, beside the JSON
    assert len(points) == 8 and set(points["status"]) == {"ok", "diverged"}
    assert points.loc[points["log2_lr"] == 6.0, "final_val_loss"].isna().all()
    ok = points[points["status"] == "ok"].set_index(["width", "log2_lr"])["final_val_loss"]
    for p in doc["points"]:
        if p["status"] == "ok":
            assert ok[(p["width"], p["log2_lr"])] == pytest.approx(p["final_val_loss"], rel=1e-12)
    # every point diverged: no optimum at any width, so the gate cannot pass
    code, stdout, _ = cli(
        "check", "transfer", "--widths", "16,32", "--lrs", "2^4,2^5,2^6", "--workers", "1", *TINY,
        "--out", str(out / "all"),
    )  # fmt: skip
    assert code == 1, stdout
    assert json.loads((out / "all" / "transfer.json").read_text())["passed"] is False


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lrs", "2^-4..2^-14"),
        ("--lrs", "fast"),
        ("--widths", "64"),
        ("--widths", "64,x"),
        ("--widths", "16,40"),
        ("--vs", "mup-ssm"),
    ],
)
def test_bad_inputs_exit_2_one_line(cli, tmp_path: Path, flag: str, value: str) -> None:
    code, _, stderr = cli("check", "transfer", flag, value, *TINY, "--out", str(tmp_path / "x"))
    assert code == 2
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert flag in stderr or value.split(",")[-1] in stderr
    assert not (tmp_path / "x" / "points").exists()


def test_sweep_spec_is_validated_when_built() -> None:
    """The transfer-check settings refuse what the sweep cannot use, in one line, before any training."""
    good = SweepSpec(tiny_base(), [16, 32], [2**-9, 2**-8, 2**-7], ["mup-ssm"], [0])
    assert good.schemes == [Scheme.MUP_SSM]  # a StrEnum after validation
    for widths, lrs, schemes, seeds, pattern in [
        ([16], [2**-9, 2**-8, 2**-7], [Scheme.MUP_SSM], [0], "widths"),
        ([16, 32], [2**-9, 2**-8], [Scheme.MUP_SSM], [0], "at least 3"),
        ([16, 32], [2**-9, 2**-8, float("nan")], [Scheme.MUP_SSM], [0], "finite"),
        ([16, 32], [2**-9, 2**-8, 2**-7], [], [0], "schemes"),
        ([16, 32], [2**-9, 2**-8, 2**-7], [Scheme.MUP_SSM], [], "seeds"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            SweepSpec(tiny_base(), widths, lrs, schemes, seeds)


def test_mamba2_bad_widths_are_named_with_the_least_valid_multiple(cli, tmp_path: Path) -> None:
    """Each width must hold whole heads (2*d_model / headdim) in whole groups: every bad width is named, with the
    least d_model step (headdim 64, ngroups 2: 2 heads of 64 = 2*d_model 128 -> multiples of 64), before any run;
    a config file's head shape counts too, and widths that fit pass validation even when the default d_model would
    not (headdim 48: 256 is not a multiple of 24)."""
    out = tmp_path / "x"
    code, _, stderr = cli("check", "transfer", "--arch", "mamba2", "--widths", "32,64,96,128", "--headdim", "64",
                          "--ngroups", "2", *TINY, "--out", str(out))  # fmt: skip
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "32,96 are not (use multiples of 64)" in stderr and "--headdim 64" in stderr and not out.exists()
    cfg = tmp_path / "m2.yaml"
    cfg.write_text("model:\n  arch: mamba2\n  d_model: 96\n  headdim: 48\n  ngroups: 2\n")
    code, _, stderr = cli("check", "transfer", "--config", str(cfg), "--widths", "24,96", *TINY, "--out", str(out))
    assert code == 2 and "24 is not (use multiples of 48)" in stderr, stderr
    spec = build_spec(None, "24,48", "2^-9..2^-7", Scheme.MUP_SSM, None, 1, arch=Arch.MAMBA2, headdim=48, steps=1)
    assert spec.base.model.d_model == 24 and spec.base.model.nheads == 1
