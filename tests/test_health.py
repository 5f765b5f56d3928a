"""The live µP health check: mupt transfer records the proxy's probes, mupt scale compares against them.

Acceptance (issue 15): a deliberately wrong recipe (sp rules with the recipe's µP LR, 8x the proxy's
width) warns within its first probes; the correct recipe does not warn over the same steps;
--health-strict exits 1 and leaves a checkpoint that loads.  Proxy d_model 64 -> 512, 8 steps, CPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_sinks import scalars

from mupt import launch
from mupt.config import load_recipe
from mupt.errors import ConfigError
from mupt.health import HEALTH_INIT, HEALTH_JSONL, Reading, reference_config, resolve_every
from mupt.train import Trainer

PROXY, TARGET, STEPS, EVERY = 64, 512, 8, 2


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The correct recipe (mup-ssm) and the wrong one (sp rules, same proxy LR), both from the real CLI."""
    from mupt.cli import main

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("health")
    paths = {}
    for name, extra in (("ok", []), ("sp", ["--scheme", "sp"])):
        paths[name] = tmp / f"{name}.yaml"
        argv = ["transfer", "--lr", "1e-2", "--width", str(PROXY), "--to-width", str(TARGET), "--steps", str(STEPS),
                "--health-steps", str(STEPS), "--health-seeds", "4", "--out", str(paths[name]), *extra]  # fmt: skip
        try:
            main(argv)
        except SystemExit as e:
            assert not e.code, f"mupt transfer {argv} exited {e.code}"
    return paths


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / HEALTH_JSONL).read_text().splitlines()]


def test_transfer_records_the_proxys_probes(recipes: dict[str, Path]) -> None:
    ok, sp = load_recipe(recipes["ok"]), load_recipe(recipes["sp"])
    assert ok.health is not None and sp.health is not None
    assert ok.health.proxy == {"d_model": PROXY, "d_state": 16, "n_layers": 2, "scheme": "mup-ssm"}
    # the reference is the tuned proxy whatever rules the target uses: same config, same probe values
    assert reference_config(ok) == reference_config(sp)
    assert ok.health.rms == sp.health.rms and ok.health.seeds == [0, 1, 2, 3] and ok.health.steps == STEPS
    quantities = {k.rsplit(".", 1)[1] for k in ok.health.rms}
    assert quantities == {"x", "y", "out", "dx", "dy", "dout", "logits", "dlogits"}
    assert ok.health.rms["1.dy"][0] is None  # no change at init
    assert all(v is not None and v > 0 for v in ok.health.rms["1.dy"][1:])
    assert all(s is not None and s > 0 for s in ok.health.log2_sd["0.y"][1:])  # 4 seeds spread


def test_wrong_recipe_warns_at_its_first_probe_and_the_correct_one_does_not(
    recipes: dict[str, Path], tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    warned: dict[str, list[str]] = {}
    for name in ("ok", "sp"):
        recipe = launch.apply_overrides(
            load_recipe(recipes[name]), run_dir=tmp_path / name, health_every=EVERY, log="jsonl,tensorboard"
        )
        warned[name] = []
        res = launch.run(recipe, on_health=warned[name].append)
        assert res.status == "ok" and res.steps == STEPS
    assert warned["ok"] == []
    ok = records(tmp_path / "ok")
    assert [r["step"] for r in ok] == [0, 2, 4, 6, 8] and all(r["outside"] == [] for r in ok)

    sp = records(tmp_path / "sp")
    first = sp[1]  # the first probe after a step (step 2): sp's hidden updates are 8x too large
    assert first["step"] == EVERY
    assert {"0.dx", "0.dy", "1.dy", "0.dout", "head.dlogits"} <= set(first["outside"])
    for key in first["outside"]:
        assert abs(first["log2_ratio"][key]) > first["band"][key]
    # once per (layer, quantity): one warning per key ever out of band, each naming layer and quantity
    keys = [k for r in sp for k in r["outside"]]
    assert len(warned["sp"]) == len(set(keys))
    assert any(re.match(r"µP health: layer 0 Δy at step 2 is [\d.]+x the proxy's", w) for w in warned["sp"])
    assert any(w.startswith("µP health: lm head Δlogits at step 2") for w in warned["sp"])

    # TensorBoard gets the same ratios (event files read back with tensorboard's own reader)
    tb = scalars(tmp_path / "sp" / "tensorboard")
    assert sorted(tb["health/log2_ratio/1.dy"]) == [2, 4, 6, 8]
    for r in sp[1:]:
        assert tb["health/log2_ratio/1.dy"][r["step"]] == pytest.approx(r["log2_ratio"]["1.dy"], rel=1e-5)
        assert tb["health/rms/0.out"][r["step"]] == pytest.approx(r["rms"]["0.out"], rel=1e-5)


def test_health_strict_exits_1_after_a_loadable_checkpoint(recipes: dict[str, Path], tmp_path: Path, cli) -> None:
    torch.set_num_threads(1)
    run_dir = tmp_path / "strict"
    code, _, err = cli("scale", str(recipes["sp"]), "--run-dir", str(run_dir), "--health-every", "2", "--health-strict")
    assert code == 1, err
    assert "warning: µP health: layer 0" in err and "stopped by --health-strict at step 2" in err
    assert "Traceback" not in err
    assert [p.name for p in launch.checkpoints(run_dir)] == ["step_000002"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "unhealthy"
    # the checkpoint loads into a fresh trainer of the same recipe
    recipe = load_recipe(run_dir / "recipe.yaml")
    trainer = Trainer(recipe.run)
    path, meta, skipped = launch.resume_from(trainer, launch.checkpoints(run_dir))
    assert path is not None and meta is not None and meta["step"] == 2 and trainer.step == 2 and skipped == []

    # resuming without --health-strict trains on; what was already warned about is not warned again
    assert (run_dir / HEALTH_INIT).is_file()
    code, _, err = cli("scale", str(recipes["sp"]), "--run-dir", str(run_dir), "--health-every", "2")
    assert code == 0, err
    rows = records(run_dir)
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8] and rows[1]["outside"]
    again = re.findall(r"µP health: (.+?) at step (\d+)", err)
    before = {Reading(k, 1.0, None, None, None).label() for k in rows[1]["outside"]}
    assert all(int(step) > 2 and label not in before for label, step in again)


def test_health_flags_a_recipe_cannot_serve_are_one_line(recipes: dict[str, Path], tmp_path: Path, cli) -> None:
    ok = load_recipe(recipes["ok"])
    assert resolve_every(ok) == STEPS // 4  # default: a quarter of the reference
    with pytest.raises(ConfigError, match=r"--health-every 16: the recipe's health reference covers 8 steps"):
        resolve_every(launch.apply_overrides(ok, health_every=16))
    bare = ok.model_copy(update={"health": None})
    assert resolve_every(bare) == 0  # no reference, no flag: off
    with pytest.raises(ConfigError, match="--health-strict: the recipe has no health reference"):
        resolve_every(launch.apply_overrides(bare, health_strict=True))
    warm = launch.apply_overrides(ok, init_from=tmp_path / "hf")  # continued pre-training: not from init
    assert resolve_every(warm) == 0
    with pytest.raises(ConfigError, match="--health-every 2: the run starts from .*hf \\(--init-from\\)"):
        resolve_every(launch.apply_overrides(warm, health_every=2))
    code, out, _ = cli("scale", str(recipes["ok"]), "--run-dir", str(tmp_path / "x"), "--dry-run", "--health-strict")
    plain = " ".join(re.sub("[│┃]", " ", out).split())  # the table's cell text, however the terminal wraps it
    assert code == 0 and "every 2 steps vs the proxy (d_model 64, 4 seeds) up to step 8" in plain
    code, _, err = cli("scale", str(recipes["ok"]), "--run-dir", str(tmp_path / "x"), "--health-every", "9")
    assert code == 2 and err.count("\n") == 1 and "covers 8 steps" in err
    assert not (tmp_path / "x").exists()


def test_fsdp_two_ranks_probe_what_one_process_probes(recipes: dict[str, Path], tmp_path: Path) -> None:
    """Under FSDP2 every rank runs the probe's forward (it gathers the sharded parameters); rank 0's
    records equal a one-process run's."""
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard") or not torch.distributed.is_gloo_available():
        pytest.skip("needs FSDP2 (torch.distributed.fsdp.fully_shard) and gloo")
    from test_launch import run_scale

    torch.set_num_threads(1)
    one = launch.apply_overrides(load_recipe(recipes["ok"]), run_dir=tmp_path / "one", steps=4, health_every=2)
    launch.run(one)
    proc = run_scale(recipes["ok"], "--nproc", "2", "--fsdp", "--steps", "4", "--health-every", "2",
                     "--run-dir", str(tmp_path / "two"), timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 2, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["rms"] == pytest.approx(ra["rms"], rel=1e-4)
        assert rb["outside"] == ra["outside"] == []
