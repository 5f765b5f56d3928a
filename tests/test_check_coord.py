"""Coordinate check: slope fitting, a real small run whose verdict is asserted, and the CLI gate."""

from __future__ import annotations

import json
import math

import pytest

from mupt.check.coord import CoordSettings, coord_check, log2_slope, plot, plot_steps, slope_stderr
from mupt.errors import ConfigError

# The reference scan (the oracle) keeps these numbers independent of the fast backends.
# Small but real: 4 widths spanning 8x, 2 layers, 2 seeds, 3 Adam steps at lr 1e-2.  Measured
# on 2 CPU cores (reference scan): mup-ssm max |slope| ~0.2 on the stable quantities below;
# sp: Δout of layer 0 grows with slope ~+1.0 (see docs/width_rules.md).
SMALL = dict(widths=(32, 64, 128, 256), n_layers=2, seeds=2, steps=3, seq_len=16, batch_size=4, backend="reference")


def test_log2_slope_recovers_powers() -> None:
    ws = [64, 128, 256, 512]
    assert log2_slope(ws, [3.0 * w**0.5 for w in ws]) == pytest.approx(0.5)
    assert log2_slope(ws, [7.0] * 4) == pytest.approx(0.0, abs=1e-12)
    assert log2_slope(ws, [1 / w for w in ws]) == pytest.approx(-1.0)
    assert math.isnan(log2_slope(ws, [1.0, 0.0, 1.0, 1.0]))


def test_slope_stderr_measures_seed_spread() -> None:
    ws = [64, 128, 256, 512]
    # identical seeds: the slope cannot move under resampling
    assert slope_stderr(ws, [[w**0.5] * 3 for w in ws]) == pytest.approx(0.0, abs=1e-12)
    # seeds spread 2x at every width: the error is a sizeable fraction of an exponent, and wider spread gives more
    narrow = slope_stderr(ws, [[1.0, 1.2, 1.4] for _ in ws])
    wide = slope_stderr(ws, [[1.0, 2.0, 4.0] for _ in ws])
    assert 0.01 < narrow < wide < 1.0
    assert math.isnan(slope_stderr(ws, [[1.0] for _ in ws]))


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="8x"):
        coord_check(widths=(64, 128, 256))
    with pytest.raises(ConfigError, match="increasing"):
        coord_check(widths=(256, 64, 512))
    with pytest.raises(ConfigError, match="--seeds"):
        coord_check(widths=(32, 256), seeds=0)
    assert CoordSettings(widths=(64, 512), scale_state=True, base_d_state=8).d_state(512) == 64
    assert CoordSettings(widths=(64, 512), base_d_state=8).d_state(512) == 8
    with pytest.raises(ConfigError, match="--base-width 128"):
        coord_check(widths=(64, 512), base_width=128)


def test_base_width_sets_the_base_shape_of_every_run() -> None:
    """--base-width 64 --widths 256..2048 checks the widths a 64-wide proxy transfers to."""
    s = CoordSettings(widths=(256, 2048), base_width=64, scale_state=True, base_d_state=8)
    s.validate()
    cfg = s.run_config(256, seed=1)
    assert (cfg.param.base_d_model, cfg.param.base_d_state, cfg.model.d_state) == (64, 8, 32)
    assert s.d_state(2048) == 256
    assert CoordSettings(widths=(64, 512)).run_config(512, 0).param.base_d_model == 64


@pytest.fixture(scope="module")
def sp_and_mup_ssm() -> tuple:
    return coord_check(scheme="sp", **SMALL), coord_check(scheme="mup-ssm", **SMALL)


def test_sp_fails_with_growing_block_updates(sp_and_mup_ssm) -> None:
    sp, _ = sp_and_mup_ssm
    assert not sp.passed
    dout = sp.row(0, "dout")
    assert not dout.flat and dout.slope >= 0.6, dout.slope  # Adam with one global LR: Δ(Wx) ~ fan_in
    assert sp.row(1, "dout").slope >= 0.6
    assert dout.rms[-1] > 3 * dout.rms[0]


def test_mup_ssm_block_outputs_and_logits_stay_flat(sp_and_mup_ssm) -> None:
    sp, mup_ssm = sp_and_mup_ssm
    for layer, q in [(0, "out"), (0, "dout"), (1, "out"), (1, "dout"), ("head", "logits"), ("head", "dlogits")]:
        row = mup_ssm.row(layer, q)
        assert abs(row.slope) <= 0.3, (layer, q, row.slope)
        assert row.slope < sp.row(layer, q).slope - 0.4, (layer, q)
    data = json.loads(mup_ssm.to_json())
    assert data["widths"] == [32, 64, 128, 256] and len(data["rows"]) == 2 * 6 + 2
    assert data["rows"][0]["key"] == "0.x" and len(data["rows"][0]["rms_seeds"][0]) == 2
    assert all(math.isfinite(r["slope_se"]) and r["slope_se"] >= 0 for r in data["rows"])


def test_slopes_after_every_step(sp_and_mup_ssm) -> None:
    """Per-step slopes: the last is the verdict's slope, probing between steps does not change
    training (a 1-step run reproduces step 1 exactly), and a wrong rule shows from step 1 on."""
    sp, _ = sp_and_mup_ssm
    for r in sp.rows:
        assert len(r.slopes_by_step) == len(r.rms_by_step) == SMALL["steps"]
        assert r.slopes_by_step[-1] == r.slope and r.rms_by_step[-1] == r.rms
    one = coord_check(scheme="sp", **{**SMALL, "steps": 1})
    assert [r.rms for r in one.rows] == [r.rms_by_step[0] for r in sp.rows]
    # sp: one global Adam LR makes Δ(W u) grow with fan_in from the very first (sign-like) step on,
    # and the slope keeps rising (measured 0.59, 0.78, 1.03): a wrong rule drifts, it is no bump
    slopes = sp.row(0, "dout").slopes_by_step
    assert slopes[0] >= 0.4 and slopes == sorted(slopes), slopes


def test_plots_write_png(tmp_path, sp_and_mup_ssm) -> None:
    plot(sp_and_mup_ssm[0], tmp_path / "f" / "coord.png")
    plot_steps(sp_and_mup_ssm[0], tmp_path / "f" / "coord_steps.png")
    for name in ("coord.png", "coord_steps.png"):
        assert (tmp_path / "f" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli_args(tmp_path, scheme: str, tol: str) -> list[str]:
    return [
        "check", "coord", "--scheme", scheme, "--widths", "32,64,128,256", "--layers", "1", "--seeds", "2",
        "--steps", "3", "--seq-len", "16", "--tolerance", tol, "--backend", "reference",
        "--out", str(tmp_path / scheme),
    ]  # fmt: skip


def test_cli_exit_codes_and_files(cli, tmp_path) -> None:
    code, out, _ = cli(*_cli_args(tmp_path, "sp", "0.25"))
    assert code == 1, out
    assert "FAIL" in out and "Δout" in out
    data = json.loads((tmp_path / "sp" / "coord.json").read_text())
    assert data["passed"] is False and data["settings"]["scheme"] == "sp"
    assert (tmp_path / "sp" / "coord.png").stat().st_size > 1000
    assert (tmp_path / "sp" / "coord_steps.png").stat().st_size > 1000
    assert "Slope after each optimizer step" in out and "step 3" in out  # the failing rows, per step
    assert len(data["rows"][0]["slopes_by_step"]) == 3
    # a generous tolerance turns the same measurement into a pass: the gate follows the slopes
    code, out, _ = cli(*_cli_args(tmp_path, "mup-ssm", "5"))
    assert code == 0, out
    assert "PASS" in out and (tmp_path / "mup-ssm" / "coord.json").is_file()
    code, _, err = cli("check", "coord", "--widths", "64,128")
    assert code == 2 and "8x" in err
    code, _, err = cli("check", "coord", "--widths", "64,512", "--base-width", "128")
    assert code == 2 and "--base-width 128" in err and len(err.strip().splitlines()) == 1


def test_sgd_euler_state_scaling_keeps_x_flat_where_heuristic_mup_vanishes() -> None:
    """SGD, Euler-B, N_x scaled with width: the µP-SSM B rows (sqrt(N_x) boost) keep the state flat,
    the heuristic (B as a plain hidden matrix) lets it vanish (docs/width_rules.md, section 4b)."""
    settings = dict(SMALL, optimizer="sgd", lr=0.1, discretization="euler", scale_state=True)
    mup, mup_ssm = coord_check(scheme="mup", **settings), coord_check(scheme="mup-ssm", **settings)
    assert mup_ssm.d_states == [16, 32, 64, 128]
    for q in ("x", "dx"):
        assert abs(mup_ssm.row(0, q).slope) <= 0.2, (q, mup_ssm.row(0, q).slope)
        assert mup.row(0, q).slope <= -0.3, (q, mup.row(0, q).slope)


def test_tied_mup_ssm_shared_readout_passes_and_without_its_multiplier_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tied embeddings under µP-SSM (the shared readout with forward multiplier 1/r_u): a real verdict.

    Contrast: the same tied model with the readout multiplier left at 1 (the rule's data changed to
    exponent 0) lets the logits grow with width, so the check can fail and the rule is what passes it.
    """
    from mupt import parametrization
    from mupt.config import Scheme

    settings = dict(SMALL, discretization="euler", tie_embeddings=True)
    tied = coord_check(scheme="mup-ssm", **settings)
    assert tied.passed, [(r.key, round(r.slope, 2)) for r in tied.failing]
    for q in ("logits", "dlogits"):
        assert abs(tied.row("head", q).slope) <= 0.25
    no_mult = dict(parametrization.TIED_READOUT)
    no_mult[Scheme.MUP_SSM] = parametrization.Rule(init=None, lr=(0.0, 0.0), fwd=(0.0, 0.0))
    monkeypatch.setattr(parametrization, "TIED_READOUT", no_mult)
    unscaled = coord_check(scheme="mup-ssm", **settings)
    assert not unscaled.passed and unscaled.row("head", "logits").slope > 0.25
