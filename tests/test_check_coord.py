"""Coordinate check: slope fitting, a real small run whose verdict is asserted, and the CLI gate."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from mupt.check.coord import (
    CoordSettings,
    coord_check,
    describe_result,
    log2_slope,
    plot,
    plot_steps,
    slope_stderr,
)
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
    with pytest.raises(ConfigError, match="seeds"):
        CoordSettings.of({"seeds": "many"})  # typed: a one-line error, not a traceback
    with pytest.raises(ConfigError, match="scheme"):
        CoordSettings.of({"scheme": "mu-p"})
    # the defaults: the widths a 64-wide proxy transfers to; a narrower smallest width is its own base
    assert (CoordSettings().widths, CoordSettings().base) == ((256, 512, 1024, 2048), 64)
    assert CoordSettings(widths=(32, 256)).base == 32 and CoordSettings(widths=(128, 1024)).base == 64


def test_base_width_sets_the_base_shape_of_every_run() -> None:
    """--base-width 64 --widths 256..2048 checks the widths a 64-wide proxy transfers to."""
    s = CoordSettings(widths=(256, 2048), base_width=64, scale_state=True, base_d_state=8)
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


# The default gate (d_model 256..2048 against base 64) at CI size: 1 layer, 3 Adam steps, 16-token
# sequences.  Measured (loaded 2-core machine): mup-ssm PASS, max |slope| 0.11 (3 seeds, 76 s);
# sp FAIL, Δout +6.0; mup with N_x scaled FAIL, x -0.6 (x and Δx vanish).
GATE = ["--layers", "1", "--steps", "3", "--seq-len", "16"]


def test_default_gate_passes_mup_ssm_and_fails_sp(cli, tmp_path) -> None:
    """No --widths, --base-width or --tolerance: the defaults decide, with the real tolerance 0.25."""
    code, out, _ = cli("check", "coord", *GATE, "--seeds", "3", "--out", str(tmp_path / "mup-ssm"))
    assert code == 0, out
    data = json.loads((tmp_path / "mup-ssm" / "coord.json").read_text())
    assert data["passed"] is True and data["settings"]["tolerance"] == 0.25
    assert data["widths"] == [256, 512, 1024, 2048] and data["settings"]["base_width"] == 64
    assert max(abs(r["slope"]) for r in data["rows"]) <= 0.25 and "PASS" in out
    # the rows as a table beside the JSON: one row per (layer, quantity, step, width)
    table = pd.read_csv(tmp_path / "mup-ssm" / "coord.csv")
    assert len(table) == len(data["rows"]) * 3 * 4
    last = table[table["step"] == 3].set_index(["key", "d_model"])["rms"]
    for row in data["rows"]:
        for w, v in zip(data["widths"], row["rms"], strict=True):
            assert last[(row["key"], w)] == pytest.approx(v, rel=1e-12)
    code, out, _ = cli("check", "coord", *GATE, "--seeds", "2", "--scheme", "sp", "--out", str(tmp_path / "sp"))
    assert code == 1, out
    sp = json.loads((tmp_path / "sp" / "coord.json").read_text())
    assert sp["passed"] is False and "FAIL" in out and "Slope after each optimizer step" in out
    assert {r["key"] for r in sp["rows"] if r["slope"] > 1.0} >= {"0.out", "0.dout"}  # SP blows up (+4..+7)
    assert (tmp_path / "sp" / "coord.png").stat().st_size > 1000
    assert (tmp_path / "sp" / "coord_steps.png").stat().st_size > 1000


def test_default_gate_with_scaled_state_fails_heuristic_mup(cli, tmp_path) -> None:
    args = ["check", "coord", *GATE, "--seeds", "2", "--scheme", "mup", "--scale-state", "--d-state", "4"]
    code, out, _ = cli(*args, "--out", str(tmp_path / "mup"))
    assert code == 1, out
    data = json.loads((tmp_path / "mup" / "coord.json").read_text())
    assert data["d_states"] == [16, 32, 64, 128]
    slopes = {r["key"]: r["slope"] for r in data["rows"]}
    assert slopes["0.x"] < -0.25 and slopes["0.dx"] < -0.25, slopes  # the state vanishes with width


def test_cli_bad_widths_exit_2(cli) -> None:
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


def test_mamba2_verdict_at_the_default_tolerance() -> None:
    """arch mamba2, N_x scaled with width (16 -> 128), heads 4 -> 32 at headdim 16, 4 seeds, 5 Adam steps:
    µP-SSM passes at the default ±0.25 (measured max |slope| 0.20); the heuristic µP, which lacks C's
    1/N_x readout multiplier, lets the SSD output y grow with the state width (measured +1.04;
    docs/width_rules.md, section 9).  The chunked SSD (tested against the reference in test_ssd.py)
    keeps this affordable; 5 steps because Δlogits is still settling after 3 (-0.27)."""
    settings = dict(SMALL, arch="mamba2", headdim=16, n_layers=1, scale_state=True, base_d_state=16)
    settings.update(seeds=4, steps=5, backend="torch")
    mup_ssm, mup = coord_check(scheme="mup-ssm", **settings), coord_check(scheme="mup", **settings)
    assert mup_ssm.d_states == [16, 32, 64, 128] and mup_ssm.settings["arch"] == "mamba2"
    assert mup_ssm.settings["tolerance"] == 0.25
    assert mup_ssm.passed, [(r.key, round(r.slope, 2)) for r in mup_ssm.failing]
    assert not mup.passed and mup.row(0, "y").slope >= 0.5, mup.row(0, "y").slope


def test_mamba2_fixed_state_verdict_at_the_default_tolerance() -> None:
    """arch mamba2 with N_x = d_state fixed at 64 (headdim 32, d_model 64..512 = 4..32 heads, 3 layers, 24 seeds,
    4 Adam steps: the gate's settings at narrower widths).  µP-SSM draws the B and C rows of in_proj with a
    readout's init std ∝ 1/d_model when N_x is fixed (correction 5) and passes at the default ±0.25 (measured
    max |slope| 0.21); the heuristic µP, which keeps their hidden init 1/sqrt(d_model), lets layer 1's SSD output
    y grow with width (measured +0.28; docs/width_rules.md, section 9h).  About 20 s per scheme on 2 cores."""
    settings = dict(arch="mamba2", headdim=32, base_d_state=64, scale_state=False, widths=(64, 128, 256, 512),
                    backend="torch")  # fmt: skip
    mup_ssm, mup = coord_check(scheme="mup-ssm", **settings), coord_check(scheme="mup", **settings)
    assert mup_ssm.d_states == [64] * 4 and (mup_ssm.settings["seeds"], mup_ssm.settings["tolerance"]) == (24, 0.25)
    assert mup_ssm.passed, [(r.key, round(r.slope, 2)) for r in mup_ssm.failing]
    assert not mup.passed and mup.row(1, "y").slope > 0.25, mup.row(1, "y").slope


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


def test_api_and_cli_run_under_the_same_numerics(cli, tmp_path) -> None:
    """`mupt check coord`, `check all`'s coordinate part and the Python API all call coord_check, which
    flushes denormals while it measures and restores the caller's mode after: identical RMS, bit for bit."""
    import torch

    def denormals_kept() -> bool:
        return torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() != 0.0

    torch.set_flush_denormal(False)
    assert denormals_kept()
    flushed: list[bool] = []
    api = coord_check(
        scheme="sp", widths=(16, 128), seeds=1, steps=1, n_layers=1, seq_len=16, backend="reference",
        on_run=lambda *_: flushed.append(not denormals_kept()),
    )  # fmt: skip
    assert flushed == [True, True]  # while measuring (the API too, not only the CLI)
    assert denormals_kept()  # the caller's mode is back
    args = ["--scheme", "sp", "--widths", "16,128", "--seeds", "1", "--steps", "1", "--layers", "1", "--seq-len", "16"]
    code, out, _ = cli("check", "coord", *args, "--backend", "reference", "--out", str(tmp_path / "c"))
    assert code == 1, out
    assert "note: 1 seed(s) per width" in out and "rerun with --seeds 24" in out  # one seed: no s.e., no verdict
    rows = json.loads((tmp_path / "c" / "coord.json").read_text())["rows"]
    assert [r["rms_seeds"] for r in rows] == [r.rms_seeds for r in api.rows]


def test_mamba2_widths_name_each_bad_one_and_the_least_multiple(cli) -> None:
    """headdim 48 at expand 2 needs d_model in steps of 24 (2*24/48 = 1 head), not 48; ngroups 2 doubles it."""
    assert CoordSettings(arch="mamba2", headdim=48, widths=(24, 192)).base == 24
    code, _, err = cli("check", "coord", "--arch", "mamba2", "--headdim", "48", "--widths", "36,60,288")
    assert code == 2 and "36,60 are not (use multiples of 24)" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match=r"--ngroups 2; 24 is not \(use multiples of 48\)"):
        CoordSettings(arch="mamba2", headdim=48, ngroups=2, widths=(24, 192))


def test_mamba2_header_and_titles_name_the_heads_not_a_discretization(cli, tmp_path) -> None:
    """check coord's start line and plot titles name the mixer (mamba2: heads at the base..widest width x headdim,
    groups) and drop the discretization, which only applies to mamba1."""
    args = ["--arch", "mamba2", "--headdim", "32", "--ngroups", "2", "--widths", "32,256", "--seeds", "1",
            "--steps", "1", "--layers", "1", "--seq-len", "16", "--backend", "reference"]  # fmt: skip
    code, out, err = cli("check", "coord", *args, "--out", str(tmp_path / "c"))
    assert code in (0, 1), out + err
    start = next(line for line in err.splitlines() if line.startswith("mupt check coord "))
    assert start.startswith("mupt check coord arch=mamba2 heads=2..16x32 ngroups=2 scheme=mup-ssm optimizer=adamw ")
    assert "disc=" not in start and (tmp_path / "c" / "coord.png").is_file()
    small = dict(widths=(32, 256), seeds=1, steps=1, n_layers=1, seq_len=16, backend="reference")
    m2 = describe_result(coord_check(arch="mamba2", headdim=32, ngroups=2, **small))  # type: ignore[arg-type]
    assert m2.startswith("arch=mamba2 heads=2..16x32 ngroups=2, mup-ssm, adamw, N_x=16, base 32,") and "zoh" not in m2
    m1 = describe_result(coord_check(**small))  # type: ignore[arg-type]
    assert m1.startswith("arch=mamba1, mup-ssm, adamw, zoh, N_x=16, base 32,"), m1
    code, _, err = cli("check", "coord", "--widths", "32,256", "--seeds", "1", "--steps", "1", "--layers", "1",
                       "--seq-len", "16", "--backend", "reference", "--out", str(tmp_path / "m1"))  # fmt: skip
    assert "mupt check coord arch=mamba1 scheme=mup-ssm optimizer=adamw disc=zoh widths=[32, 256]" in err, err
