"""mupt transfer: proxy HPs -> target recipe (exact at base width, rule powers at 4x/16x, real models, CLI)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from expected_rules import expected

from mupt.config import (
    Arch,
    BestParams,
    Discretization,
    OptimizerName,
    Recipe,
    RunConfig,
    Scheme,
    load_yaml,
    save_yaml,
    with_overrides,
)
from mupt.errors import ConfigError
from mupt.memory import memory_estimate
from mupt.model import ARCH_ROLES, Role, role_of
from mupt.train import Trainer, build_model
from mupt.transfer import (
    check_ratios,
    check_transfer_command,
    explain,
    load_best,
    load_recipe,
    save_recipe,
    shape_info,
    summarize,
    transfer,
)

ROOT = Path(__file__).resolve().parent.parent
LR = 0.004


def proxy(**extra: object) -> RunConfig:
    base = {
        "model.d_model": 64, "model.n_layers": 2, "model.d_state": 16,
        "train.lr": LR, "train.weight_decay": 0.1, "train.steps": 40, "train.batch_size": 8, "train.seq_len": 64,
        "param.output_mult": 2.0,
    }  # fmt: skip
    return with_overrides(RunConfig(), {**base, **extra})


def best(cfg: RunConfig | None = None) -> BestParams:
    cfg = cfg or proxy()
    _, par = build_model(cfg)
    return BestParams(
        study="unit", trial=7, value=1.96, params={"lr": cfg.train.lr, "output_mult": cfg.param.output_mult},
        config=cfg, manifest=par.manifest.to_dict(), code_version="test", created="now",
    )  # fmt: skip


def real_per_role(cfg: RunConfig) -> dict[str, dict[str, float | None]]:
    """Per-role values from apply() on a real (CPU) model, read off the manifest."""
    _, par = build_model(cfg)
    out: dict[str, dict[str, float | None]] = {}
    for e in par.manifest.params.values():
        row = {
            "init_std": e.init_std,
            "lr": cfg.train.lr * e.lr_mult,
            "fwd_mult": e.fwd_mult,
            "weight_decay": e.weight_decay,
        }
        assert out.setdefault(e.role, row) == row
    return out


def test_base_width_reproduces_proxy_exactly() -> None:
    bp = best()
    r = transfer(bp, 64)
    p = bp.config
    assert r.run.model == p.model and r.run.train == p.train and r.run.data == p.data
    assert r.run.param.model_dump(exclude={"base_d_model", "base_d_state"}) == p.param.model_dump(
        exclude={"base_d_model", "base_d_state"}
    )
    assert (r.run.param.base_d_model, r.run.param.base_d_state) == (64, 16)
    assert r.per_role == real_per_role(p)  # the numbers the proxy trained with, bit for bit
    assert all(v["lr"] == LR for k, v in r.per_role.items())  # identity rules at the base shape
    assert r.per_role["lm_head"]["fwd_mult"] == 2.0  # the tuned output multiplier carries over
    assert r.manifest == bp.manifest
    assert r.source["study"] == "unit" and r.source["trial"] == 7 and r.source["ratio"] == {"width": 1.0, "state": 1.0}


def test_proxy_with_its_own_base_keeps_it() -> None:
    p = proxy(**{"model.d_model": 128, "param.base_d_model": 64})  # tuned at 128 with rules relative to 64
    assert transfer(best(p), 128).per_role == real_per_role(p)  # same shape: exactly what the proxy trained with
    r = transfer(best(p), 512)
    assert r.run.param.base_d_model == 64 and r.source["ratio"]["width"] == 4.0
    assert r.per_role == real_per_role(r.run) and check_ratios(r) == []
    assert r.per_role["in_proj"]["lr"] == LR / 8 and r.source["base_per_role"]["in_proj"]["lr"] == LR / 2


@pytest.mark.parametrize("scheme", list(Scheme))
@pytest.mark.parametrize("factor", [4, 16])
def test_ratios_are_the_rule_powers(scheme: Scheme, factor: int) -> None:
    bp = best(proxy(**{"param.scheme": scheme.value}))
    to_state = 16 * factor if scheme is Scheme.MUP_SSM else None
    r = transfer(bp, 64 * factor, to_state=to_state)
    r_x = factor if to_state else 1
    assert r.source["ratio"] == {"width": factor, "state": r_x}
    table = expected(scheme, "adam", Discretization.ZOH)  # written from the derivation, not from mupt's table
    base = r.source["base_per_role"]
    assert set(r.per_role) == {role.value for role in ARCH_ROLES[Arch.MAMBA1]}
    for name, tgt in r.per_role.items():
        init, lr = table[Role(name)]
        want_lr = factor ** lr[0] * r_x ** lr[1]
        assert base[name]["lr"] == LR and math.isclose(tgt["lr"] / LR, want_lr, rel_tol=1e-12), name
        if init is None:
            assert tgt["init_std"] is None and base[name]["init_std"] is None
        else:
            want = factor ** init[0] * r_x ** init[1]
            assert math.isclose(tgt["init_std"] / base[name]["init_std"], want, rel_tol=1e-12), name
        assert tgt["fwd_mult"] == base[name]["fwd_mult"]  # no forward-multiplier rule scales with width here
    assert check_ratios(r) == []
    if scheme is Scheme.SP:
        assert {v["lr"] for v in r.per_role.values()} == {LR}
    if scheme is Scheme.MUP_SSM:  # B and C see N_x too: the heuristic µP would not
        assert math.isclose(r.per_role["x_proj_B"]["lr"], LR * factor**-1 * factor**0.5)
        assert math.isclose(r.per_role["x_proj_C"]["lr"], LR / factor**2)


def test_meta_values_equal_real_apply_and_model_carries_recipe_lrs() -> None:
    r = transfer(best(), 256, to_state=32)
    assert r.per_role == real_per_role(r.run)  # meta-device numbers == a real 256-wide model's
    model, par = build_model(r.run)
    assert model.num_params() == shape_info(r.run).num_params == summarize(r).params
    assert model.cfg.d_model == 256 and model.cfg.d_state == 32
    seen = set()
    for g in par.param_groups:
        for name in g["names"]:
            want = r.per_role[role_of(name).value]
            assert math.isclose(g["lr"], want["lr"], rel_tol=1e-12) and g["weight_decay"] == want["weight_decay"]
            seen.add(role_of(name).value)
    assert seen == set(r.per_role)
    # the initialised weights have the recipe's init std (large matrices: within sampling error)
    w = model.backbone.layers[0].mixer.in_proj.weight
    assert math.isclose(float(w.detach().std()), r.per_role["in_proj"]["init_std"], rel_tol=0.05)  # type: ignore[arg-type]
    assert model.mult_output == r.per_role["lm_head"]["fwd_mult"] == 2.0
    # the Trainer's optimizer (what mupt train / scale step with) carries the same LRs, per parameter
    tr = Trainer(r.run)
    names = {id(p): n for n, p in tr.model.named_parameters()}
    for g in tr.optimizer.param_groups:
        for p in g["params"]:
            assert math.isclose(g["lr"], r.per_role[role_of(names[id(p)]).value]["lr"], rel_tol=1e-12)  # type: ignore[arg-type]


def test_recipe_round_trips_with_header(tmp_path: Path) -> None:
    r = transfer(best(), 1024, steps=500, batch_size=32)
    path = save_recipe(tmp_path / "r.yaml", r)
    text = path.read_text()
    assert text.startswith("# mupt transfer: recipe for arch=mamba1 d_model=1024") and "study unit trial 7" in text
    back = load_recipe(path)
    assert back == r and isinstance(back, Recipe) and load_yaml(path, Recipe) == r
    save_yaml(tmp_path / "again.yaml", back)
    assert load_recipe(tmp_path / "again.yaml") == r
    assert back.run.train.steps == 500 and back.run.train.batch_size == 32 and back.run.train.lr == LR
    assert any("horizon" in w for w in back.source["warnings"])  # steps/batch changed: µP does not cover that


def test_scheme_comparison_from_one_proxy() -> None:
    bp = best()  # tuned under mup-ssm
    by = {s: transfer(bp, 1024, scheme=s) for s in Scheme}
    assert {v["lr"] for v in by[Scheme.SP].per_role.values()} == {LR}
    assert by[Scheme.MUP].per_role["A_log"]["lr"] == LR / 16  # heuristic µP: A_log as a hidden matrix
    assert by[Scheme.MUP_SSM].per_role["A_log"]["lr"] == LR
    assert by[Scheme.SP].per_role["lm_head"]["init_std"] == 4 * by[Scheme.MUP].per_role["lm_head"]["init_std"]
    assert any("tuned under mup-ssm" in w for w in by[Scheme.SP].source["warnings"])
    # every scheme is the identity at the proxy shape, so the tuned LR is exact there
    for s in Scheme:
        assert transfer(bp, 64, scheme=s).per_role == by[Scheme.MUP_SSM].source["base_per_role"]


def test_refusals_are_one_line() -> None:
    bp = best()
    cases = [
        (dict(to_width=256, to_layers=4), "--to-layers 4: mupt has no depth-transfer rules"),
        (dict(to_width=256, to_state=64, scheme="mup"), "--to-state 64: scheme mup has no state-width"),
        (dict(to_width=250), "--to-width 250: not a multiple of 16"),
        (dict(to_width=0), "--to-width 0: must be a positive"),
        (dict(to_width=256, scheme="muP"), "--scheme 'muP'"),
    ]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(")) as info:
            transfer(bp, **kw)  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
    assert transfer(bp, 256, to_layers=2).run.model.n_layers == 2  # the proxy's depth is fine


def test_summary_memory_flops_and_warnings() -> None:
    r = transfer(best(proxy(**{"train.steps": 400})), 8192)  # 128x the proxy width: beyond the verified 64x
    s = summarize(r)
    m = r.run.model
    emb = m.vocab_size * m.d_model
    assert s.weight_bytes == 4 * s.params and s.optimizer_bytes == 8 * s.params and s.state_bytes == 16 * s.params
    assert s.flops_per_token == 6 * (s.params - emb) + 27 * m.n_layers * m.d_inner * m.d_state
    assert s.activation_bytes_per_token == memory_estimate(r.run).activation_bytes_per_token  # the one model
    assert any("128x is outside" in w for w in s.warnings)
    # 400 x 8 x 64 = 204,800 proxy tokens >= 10% of 20 tokens x 98,240 proxy params; 40 steps are not
    assert s.proxy_params == 98_240 and not any("tokens/parameter" in w for w in s.warnings)
    # a short proxy (40 steps) only warns when the target trains longer than it did: its optimum is extrapolated
    assert transfer(best(), 256).source["warnings"] == []  # the default: the proxy's own length, nothing to say
    longer = transfer(best(), 256, steps=400).source["warnings"]
    assert len(longer) == 1 and "(400 steps x 8 x 64) differ from the proxy's (40 x 8 x 64)" in longer[0]
    assert "0.208 tokens/parameter" in longer[0] and "Chinchilla: 1,964,800 tokens" in longer[0]
    shorter = transfer(best(), 256, steps=20).source["warnings"]  # shorter: the horizon warning, no extrapolation
    assert len(shorter) == 1 and "tokens/parameter" not in shorter[0]


def test_explain_is_the_rule_data_with_reasons_and_derivations() -> None:
    docs = (ROOT / "docs" / "width_rules.md").read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', docs))
    text = {(-0.5, 0.0): "N_u^-1/2", (-1.0, 0.0): "N_u^-1", (0.0, 0.0): "1", (1.0, 0.0): "N_u", None: "structured",
            (-0.5, 0.5): "N_u^-1/2 N_x^1/2", (-0.5, -0.5): "N_u^-1/2 N_x^-1/2", (-1.0, 0.5): "N_u^-1 N_x^1/2",
            (-1.0, 1.0): "N_u^-1 N_x", (-1.0, -1.0): "N_u^-1 N_x^-1"}  # fmt: skip
    for scheme in Scheme:
        for opt, disc in (("adamw", "zoh"), ("adamw", "euler"), ("sgd", "zoh")):
            rows = explain(scheme, opt, disc)
            assert [e.role for e in rows] == [r.value for r in Role if r in ARCH_ROLES[Arch.MAMBA1]]
            table = expected(scheme, OptimizerName(opt).family, Discretization(disc))
            for e in rows:
                init, lr = table[Role(e.role)]
                assert (e.init, e.lr, e.fwd) == (text[init], text[lr], "1"), (scheme, opt, e)
                assert e.why and e.ref in anchors, (scheme, e)
            rows2 = explain(scheme, opt, disc, "mamba2")
            assert [e.role for e in rows2] == [r.value for r in Role if r in ARCH_ROLES[Arch.MAMBA2]]
            assert all(e.why and e.ref in anchors for e in rows2), scheme
    b = {e.role: e for e in explain("mup-ssm", "adam", "zoh")}
    assert b["A_log"].ref == "rule-vector-like" and b["x_proj_B"].ref == "rule-b-rows"
    assert (b["in_proj"].weight_decay, b["lm_head"].weight_decay, b["D"].weight_decay) == ("N_u^-1/2", "N_u", "none")
    assert b["in_proj"].weight_decay != {e.role: e for e in explain("mup-ssm", "adamw", "zoh")}["in_proj"].weight_decay
    src = (ROOT / "mupt" / "transfer.py").read_text()
    assert "settrace" not in src and "getsource" not in src  # no source inspection


# --- CLI ------------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "mupt", "transfer", *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=120
    )


def test_cli_writes_recipe_from_newest_best_and_explains(tmp_path: Path) -> None:
    bp = best()
    save_yaml(tmp_path / "runs" / "old" / "best.yaml", bp.model_copy(update={"study": "old"}))
    os.utime(tmp_path / "runs" / "old" / "best.yaml", (1, 1))
    save_yaml(tmp_path / "runs" / "new" / "best.yaml", bp.model_copy(update={"study": "new"}))
    res = run_cli("--to-width", "1024", "--explain", "--compare", "--table-out", "roles.csv", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert not list((tmp_path / "runs").glob("*/*-1024.yaml")), "--explain/--compare must write nothing"
    assert "no recipe written" in res.stderr
    for text in ("rule-b-rows", "x_proj_B", "N_u^-1 N_x^1/2", "Summary", "sp LR"):
        assert text in res.stdout, text
    res = run_cli("--to-width", "1024", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    recipe = load_recipe(tmp_path / "runs" / "new" / "mup-ssm-1024.yaml")  # next to the best.yaml it came from
    roles = pd.read_csv(tmp_path / "roles.csv").set_index("role")  # the per-role table as data
    assert list(roles.index) == list(recipe.per_role)
    assert roles.loc["in_proj", "lr"] == pytest.approx(LR / 16) and roles.loc["in_proj", "base_lr"] == LR
    assert roles.loc["in_proj", "lr_ratio"] == pytest.approx(1 / 16) and math.isnan(roles.loc["A_log", "init_std"])
    assert recipe.source["study"] == "new" and recipe.source["path"] == str(Path("runs/new/best.yaml"))
    assert recipe.run.model.d_model == 1024 and recipe.per_role["in_proj"]["lr"] == LR / 16
    assert "recipe written" in res.stdout


def test_cli_never_replaces_another_recipe_without_overwrite(cli, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The default recipe lands next to its study, not over the examples in recipes/; an existing file at --out
    is replaced only when it holds the same recipe, or with --overwrite (as `mupt train --run-dir`)."""
    monkeypatch.chdir(tmp_path)
    save_yaml(tmp_path / "runs" / "s" / "best.yaml", best())
    example = tmp_path / "recipes" / "mup-ssm-256.yaml"  # the checkout's tracked example
    save_recipe(example, transfer(best(proxy(**{"model.d_model": 32})), 256))
    before = example.read_bytes()
    args = ("transfer", "--to-width", "256", "--health-steps", "0")
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    dest = tmp_path / "runs" / "s" / "mup-ssm-256.yaml"
    assert load_recipe(dest).source["study"] == "unit" and example.read_bytes() == before
    assert f"recipe written: {Path('runs/s/mup-ssm-256.yaml')}" in stdout
    code, stdout, stderr = cli(*args)  # the same recipe again: replaced, and said so
    assert code == 0 and "it held this same recipe" in " ".join(stdout.split()), stderr
    first = dest.read_bytes()
    for extra, held in (
        (["--steps", "80"], "another recipe (from study unit trial 7, d_model 256, 40 steps, created "),
        (["--out", str(example)], "another recipe (from study unit trial 7, d_model 256, 40 steps, created "),
        (["--out", "notes.txt"], "a file that is not a mupt recipe"),
    ):
        (tmp_path / "notes.txt").write_text("mine\n")
        code, _, stderr = cli(*args, *extra)
        assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
        out = extra[1] if extra[0] == "--out" else str(Path("runs/s/mup-ssm-256.yaml"))
        assert f"error: --out {out} holds {held}" in stderr and "or --overwrite to replace it" in stderr, stderr
        assert dest.read_bytes() == first and example.read_bytes() == before  # nothing touched
        assert (tmp_path / "notes.txt").read_text() == "mine\n"
    code, _, stderr = cli(*args, "--steps", "80", "--overwrite")
    assert code == 0, stderr
    assert load_recipe(dest).run.train.steps == 80
    # --lr has no study: the recipe goes under --runs-dir
    code, _, stderr = cli("transfer", "--lr", "3e-3", "--width", "64", "--to-width", "128", "--health-steps", "0")
    assert code == 0, stderr
    made = load_recipe(tmp_path / "runs" / "mup-ssm-128.yaml")
    assert made.source["kind"] == "lr" and made.launch.run_dir == "runs/scale-mup-ssm-w128"  # no study to name


def test_cli_bad_inputs_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "corrupt.yaml").write_text("study: [unclosed\n")
    save_yaml(tmp_path / "wrong.yaml", proxy())  # valid YAML, but a RunConfig, not a best.yaml
    save_yaml(tmp_path / "runs" / "s" / "best.yaml", best())
    cases = [
        (["--to-width", "256"], "no runs/*/best.yaml found"),  # cwd without runs/
        (["--to-width", "256", "--from", "missing.yaml"], "missing.yaml: no such best-params file"),
        (["--to-width", "256", "--from", "corrupt.yaml"], "corrupt.yaml: not valid YAML"),
        (["--to-width", "256", "--from", "wrong.yaml"], "wrong.yaml: a run config is not a best.yaml"),
        (["--to-width", "256", "--from", "runs/s/best.yaml", "--to-layers", "3"], "no depth-transfer rules"),
        (["--to-width", "256", "--from", "runs/s/best.yaml", "--width", "128"], "--width describes the proxy"),
        (["--from", "runs/s/best.yaml"], "--to-width is required"),
        (["--to-width", "256", "--from", "runs/s/best.yaml", "--table-out", "t.xlsx"], "--table-out t.xlsx"),
        # the target's data: named by its own flag, and the fix names every kind of data (a prepared dataset first)
        (["--to-width", "256", "--from", "runs/s/best.yaml", "--to-data", "nope"], "--to-data nope: no such file"),
    ]
    for args, msg in cases:
        cwd = tmp_path / "empty" if args == ["--to-width", "256"] else tmp_path
        cwd.mkdir(exist_ok=True)
        res = run_cli(*args, cwd=cwd)
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        # one error; a file with several bad fields lists each on its own line below it
        assert lines[0].startswith("error:") and msg in res.stderr, (args, res.stderr)
        assert len(lines) == 1 or "errors" in lines[0], (args, res.stderr)
        assert "Traceback" not in res.stderr
        if "--to-data" in args:
            assert "mupt prepare" in res.stderr and "--data nope" not in res.stderr, res.stderr


def test_cli_lr_directly(tmp_path: Path) -> None:
    res = run_cli("--lr", "0.01", "--width", "128", "--to-width", "512", "--out", "r.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    r = load_recipe(tmp_path / "r.yaml")
    assert r.source["kind"] == "lr" and r.run.param.base_d_model == 128 and r.run.train.lr == 0.01
    assert r.per_role["out_proj"]["lr"] == 0.01 / 4


def test_cli_default_transfer_is_quiet_and_says_where_the_target_steps_came_from(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The default transfer (the proxy's own length) prints no warning, but the summary and the recipe's header
    say its steps are the proxy's and how to set them; --steps longer than a short proxy warns once."""
    args = ("transfer", "--lr", "3e-3", "--width", "64", "--to-width", "128", "--health-steps", "0")
    code, stdout, stderr = cli(*args, "--out", str(tmp_path / "a.yaml"))
    assert code == 0 and "warning" not in stderr, stderr
    flat = " ".join(stdout.replace("│", " ").split())  # the summary's cells wrap inside the table
    assert "64 x 8 x 64 = 32,768" in flat and "64 steps is the proxy's length: set the target's with --steps" in flat
    header = (tmp_path / "a.yaml").read_text().split("\nsource:")[0]
    assert "# train: 64 steps x 8 x 64 tokens, the proxy's length (mupt transfer --steps N sets" in header
    code, stdout, stderr = cli(*args, "--steps", "400", "--out", str(tmp_path / "b.yaml"))
    assert code == 0 and load_recipe(tmp_path / "b.yaml").run.train.steps == 400, stderr
    flat_err = " ".join(stderr.split())
    assert flat_err.count("warning:") == 1 and "tokens/parameter" in flat_err and "overestimate the LR" in flat_err
    assert "proxy's length" not in " ".join(stdout.replace("│", " ").split())
    assert "proxy's length" not in (tmp_path / "b.yaml").read_text().split("\nsource:")[0]


def test_cli_records_and_says_how_the_proxy_lr_was_found(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A real (tiny) tune under the default --finalist fit: rung 0 at d_model 16, one proxy trial at 64 at the
    LR extrapolated from rung 0.  The recipe's source carries that finalist's origin and fit, the summary
    says it in one line; the recipe's LR is the fitted one (2^log2_lr).  A best.yaml without finalists (as
    older tunes wrote) transfers as before, without the line."""
    runs = tmp_path / "runs"
    code, _, stderr = cli(
        "tune", "--width", "64", "--layers", "1", "--seq-len", "32", "--steps", "10", "--eval-every", "10",
        "--trials", "8", "--sampler", "grid", "--pruner", "none", "--study", "fit", "--runs-dir", str(runs),
    )  # fmt: skip
    assert code == 0, stderr
    tuned = load_best(runs / "fit" / "best.yaml")
    top = tuned.finalists[0]
    assert top["trial"] == tuned.trial and top["obtained"] == "extrapolated", top
    code, stdout, stderr = cli("transfer", "--runs-dir", str(runs), "--to-width", "256", "--health-steps", "0")
    assert code == 0, stderr
    recipe = load_recipe(runs / "fit" / "mup-ssm-256.yaml")
    # the large run's default directory carries the study: another study's recipe of the same scheme and
    # width does not meet (and refuse) this one's checkpoints (walkthrough 3)
    assert recipe.launch.run_dir == "runs/scale-mup-ssm-w256-fit"
    found = recipe.source["finalist"]
    assert found == {"obtained": "extrapolated", "drift_fit": top["drift_fit"], "fidelities": top["fidelities"]}
    fit = found["drift_fit"]  # the proxy trial was placed, not promoted: rung 0 is in the fit, not in its fidelities
    assert [f["d_model"] for f in found["fidelities"]] == [64] and fit["method"] in ("vertex", "best")
    assert list(fit["optima_log2_lr"]) == ["16"]
    assert math.log2(recipe.run.train.lr) == pytest.approx(fit["log2_lr"], abs=1e-3)  # no drift added by transfer
    flat = " ".join(stdout.replace("│", " ").split())  # the summary's cells wrap inside the table
    (x0,) = fit["optima_log2_lr"].values()
    assert (
        f"proxy LR found by {'the vertex of the parabola through' if fit['method'] == 'vertex' else 'the best of'} "
        f"rung 0's losses: 2^{x0:.2f} at d_model 16, moved -0.15 octave per doubling -> 2^{fit['log2_lr']:.2f}"
    ) in flat, flat
    assert f"(study fit, trial r1/t{tuned.trial})" in flat  # the label tune prints: trial numbers restart per rung
    assert f"(study fit, trial r1/t{tuned.trial})" in " ".join(stderr.split())  # and the header line

    # without finalists (older best.yaml), or with finalists that predate `obtained`: no line, same transfer
    before_obtained = {k: v for k, v in top.items() if k not in ("obtained", "drift_fit")}
    for name, finalists in (("old", []), ("older", [before_obtained])):
        save_yaml(runs / name / "best.yaml", tuned.model_copy(update={"study": name, "finalists": finalists}))
        out = tmp_path / f"{name}.yaml"
        code, stdout, stderr = cli("transfer", "--from", str(runs / name / "best.yaml"), "--to-width", "256",
                                   "--health-steps", "0", "--out", str(out))  # fmt: skip
        assert code == 0, stderr
        assert "found by" not in stdout and load_recipe(out).run.train.lr == recipe.run.train.lr
        assert load_recipe(out).source.get("finalist") == ({"fidelities": top["fidelities"]} if finalists else None)


def test_cli_threads_flag_and_header_before_health_reference(tmp_path: Path) -> None:
    """--threads exists (like every command that trains) and the header line precedes the health reference's
    progress lines, so the user knows what the bar is for."""
    save_yaml(tmp_path / "runs" / "s" / "best.yaml", best(proxy(**{"train.steps": 4})))
    args = ("--to-width", "128", "--health-steps", "1", "--health-seeds", "2", "--out", "r.yaml")
    res = run_cli(*args, "--threads", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert load_recipe(tmp_path / "r.yaml").health is not None
    lines = res.stderr.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("mupt transfer from"))
    health = next(i for i, line in enumerate(lines) if "health reference" in line)
    assert header < health, res.stderr
    bad = run_cli(*args, "--threads", "0", cwd=tmp_path)
    assert bad.returncode == 2 and "--threads 0" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_check_transfer_command_spells_out_what_differs_from_the_defaults() -> None:
    cfg = proxy(**{"model.n_layers": 1, "model.d_state": 8, "param.scheme": "sp", "train.optimizer": "adam"})
    assert check_transfer_command(cfg, 4096, None, "elsewhere") == (
        "mupt check transfer --layers 1 --d-state 8 --widths 64,128,256 --scheme sp --optimizer adam --vs mup "
        "--out elsewhere/check-transfer"
    )
    # a target inside the 4x span is swept itself; a best.yaml source is passed whole
    assert check_transfer_command(proxy(), 192, Path("runs/s/best.yaml")) == (
        "mupt check transfer -c runs/s/best.yaml --widths 64,128,192 --vs sp,mup"
    )


def test_cli_regret_hint_is_a_check_command_that_matches(tmp_path: Path) -> None:
    """The "expected regret: unknown" hint names a `mupt check transfer` whose result this transfer then finds
    (base width = the proxy's, not check transfer's default 64)."""
    save_yaml(tmp_path / "runs" / "p" / "best.yaml", best(proxy(**{"model.d_model": 32, "model.n_layers": 1})))
    args = ("--to-width", "256", "--health-steps", "0", "--out", "r.yaml")
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    flat = " ".join(res.stdout.split())
    hint = re.search(r"expected regret: unknown .*measure it with `(mupt check transfer [^`]*)`", flat)
    assert hint is not None, flat
    command = hint.group(1).split()
    assert command[command.index("--widths") + 1] == "32,64,128"  # the proxy's width is the base
    # the suggested sweep, made tiny (later flags win), then the same transfer finds and prints its regret
    tiny = ["--lrs", "2^-5..2^-3", "--seeds", "1", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
            "--vs", "sp", "--workers", "1", "--threads", "1", "--backend", "reference"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    sweep = subprocess.run([sys.executable, "-m", "mupt", *command[1:], *tiny], cwd=tmp_path, env=env, text=True,
                           capture_output=True, timeout=300)  # fmt: skip
    assert sweep.returncode in (0, 1), sweep.stderr  # a verdict either way; the regret rows are written
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    flat = " ".join(res.stdout.split())
    assert "regret measured by runs/check-transfer/transfer.json (base 32" in flat, flat
    assert "wider than any width checked (max 128)" in flat, flat


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_tune_transfer_train_beats_8x_lrs(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """Tune at width 64 (log2 grid 2^-9..2^-5), transfer to 256, train: the transferred LR beats 8x up and 8x down.

    Dense grid on this setup (2 layers, d_state 16, 40 steps of 8 x 64 bytes, AdamW, mup-ssm, base 64), val loss:
      width  64: 2^-10 2.54 | 2^-9 2.18 | 2^-8 2.06 | 2^-7 1.96 | 2^-6 2.08 | 2^-5 2.15 | 2^-4 2.51
      width 256: 2^-10 2.41 | 2^-9 2.08 | 2^-8 1.90 | 2^-7 1.84 | 2^-6 2.01 | 2^-5 2.11 | 2^-4 2.39
    """
    runs = tmp_path / "runs"
    code, _, stderr = cli(
        "tune", "--width", "64", "--steps", "40", "--batch-size", "8", "--seq-len", "64", "--eval-every", "40",
        "--sampler", "grid", "--lr-range", f"{2**-9},{2**-5}", "--pruner", "none", "--trials", "5",
        "--study", "e2e", "--runs-dir", str(runs),
    )  # fmt: skip
    assert code == 0, stderr
    recipe_path = tmp_path / "r.yaml"
    code, _, stderr = cli("transfer", "--runs-dir", str(runs), "--to-width", "256", "--out", str(recipe_path))
    assert code == 0, stderr
    recipe = load_recipe(recipe_path)
    lr = recipe.run.train.lr
    assert recipe.source["study"] == "e2e" and recipe.run.param.base_d_model == 64
    torch.set_num_threads(1)  # small models on a shared 2-core machine: one thread is fastest
    losses = {}
    for name, factor in (("transferred", 1.0), ("8x larger", 8.0), ("8x smaller", 1 / 8)):
        res = Trainer(with_overrides(recipe.run, {"train.lr": lr * factor})).run()
        losses[name] = res.final_val_loss if res.status == "ok" else math.inf
    print(f"\ntuned lr at width 64: {lr:g}; val loss at width 256: {losses}")
    assert losses["transferred"] < losses["8x larger"] and losses["transferred"] < losses["8x smaller"], losses


def test_a_mamba2_proxy_with_few_heads_is_warned_about() -> None:
    """d_model 64 at headdim 64 is 2 heads (mupt's default headdim on a 64-wide proxy): the recipe warns and
    names the fix; at headdim 16 (8 heads) it does not (docs/health.md, "Mamba-2 proxies")."""
    few = transfer(best(proxy(**{"model.arch": "mamba2", "model.headdim": 64})), 256)
    text = [w for w in few.source["warnings"] if "Mamba-2 heads" in w]
    assert len(text) == 1 and "has 2 Mamba-2 heads" in text[0] and "a smaller --headdim" in text[0], text
    enough = transfer(best(proxy(**{"model.arch": "mamba2", "model.headdim": 16})), 256)
    assert not [w for w in enough.source["warnings"] if "Mamba-2 heads" in w]


@pytest.mark.parametrize("scheme", list(Scheme))
def test_mamba2_recipe_has_every_mamba2_role_at_the_rule_powers(scheme: Scheme) -> None:
    """arch mamba2: d_model 64 -> 512 (heads 4 -> 32 at headdim 32), N_x 16 -> 128 under mup-ssm."""
    cfg = proxy(**{"model.arch": "mamba2", "model.headdim": 32, "model.ngroups": 2, "param.scheme": scheme.value})
    r = transfer(best(cfg), 512, to_state=128 if scheme is Scheme.MUP_SSM else None)
    assert set(r.per_role) == {role.value for role in ARCH_ROLES[Arch.MAMBA2]}
    assert r.run.model.arch is Arch.MAMBA2 and r.run.model.nheads == 32
    assert check_ratios(r) == []
    base = r.source["base_per_role"]
    lr = {name: row["lr"] / base[name]["lr"] for name, row in r.per_role.items()}
    if scheme is Scheme.SP:
        assert set(lr.values()) == {1.0}
    else:  # hidden rows 1/N_u; A_log per head, dt_bias, D, gated norm vector-like (Adam LR Θ(1))
        for name in ("in_proj_z", "in_proj_x", "in_proj_B", "in_proj_C", "in_proj_dt", "out_proj"):
            assert math.isclose(lr[name], 1 / 8), name
        for name in ("A_log_head", "dt_bias", "D", "gated_norm", "conv1d_weight"):
            assert lr[name] == 1.0, name
    fwd_c = r.per_role["in_proj_C"]["fwd_mult"] / base["in_proj_C"]["fwd_mult"]
    # C reads out the N_x-dim state: a 1/N_x multiplier on C (after conv1d and SiLU) under mup-ssm only
    assert fwd_c == (1 / 8 if scheme is Scheme.MUP_SSM else 1.0)
    with pytest.raises(ConfigError, match="divisible by headdim=32"):
        transfer(best(cfg), 520)


def test_mamba2_recipe_header_names_the_arch_and_heads(tmp_path: Path) -> None:
    """The recipe's comment header names the mixer: mamba2 d_model 64 -> 256 at headdim 32, 2 groups = 16 heads."""
    cfg = proxy(**{"model.arch": "mamba2", "model.headdim": 32, "model.ngroups": 2})
    path = save_recipe(tmp_path / "m2.yaml", transfer(best(cfg), 256))
    first = path.read_text().splitlines()[0]
    assert first.startswith("# mupt transfer: recipe for arch=mamba2 heads=16x32 ngroups=2 d_model=256 "), first
