"""mupt export / --init-from against the real transformers classes, real DCP checkpoints of real gloo processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mupt import launch
from mupt.config import (
    ModelConfig,
    ParamConfig,
    Recipe,
    RunConfig,
    TrainConfig,
    load_recipe,
    load_yaml,
    save_yaml,
    to_dict,
)
from mupt.errors import CheckpointError, ConfigError
from mupt.export import export_run, load_pretrained, read_pretrained, save_weights
from mupt.model import MambaLM
from mupt.parametrization import apply, set_forward_multipliers
from mupt.train import Trainer, lm_loss

sys.path.insert(0, str(Path(__file__).parent))
from test_launch import TINY, run_scale  # noqa: E402

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()  # keep stderr to mupt's own lines

IDS = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(7))


def run_config(tie: bool, scheme: str = "mup-ssm", **param: float | int) -> RunConfig:
    return RunConfig(
        model=ModelConfig(d_model=32, n_layers=2, d_state=8, discretization="euler", tie_embeddings=tie),
        train=TrainConfig(steps=4, batch_size=4, seq_len=32, lr=3e-3, eval_every=4, eval_batches=1),
        param=ParamConfig(scheme=scheme, base_d_model=16, **param),
    )


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


def train_dir(tmp_path: Path, cli, cfg: RunConfig, name: str = "run") -> Path:
    """``mupt train --config`` for a few steps; returns its --out directory."""
    save_yaml(tmp_path / f"{name}.yaml", cfg)
    out = tmp_path / name
    code, _, err = cli("train", "--config", str(tmp_path / f"{name}.yaml"), "--run-dir", str(out))
    assert code == 0, err
    return out


def trained_model(run: Path, cfg: RunConfig) -> MambaLM:
    """The run's model rebuilt independently: same seed + the same steps through the Trainer."""
    t = Trainer(cfg)
    t.run()
    return t.model


# tied: the readout shares the embedding and carries the shared-readout multiplier 1/r_u (folded into norm_f)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_hf_from_pretrained_gives_the_same_logits(tmp_path: Path, cli, tie: bool) -> None:
    cfg = run_config(tie, "mup-ssm", output_mult=3.0, embedding_mult=1.7)
    run = train_dir(tmp_path, cli, cfg)
    ref = logits(trained_model(run, cfg))
    assert ref.abs().max() > 1.0  # trained, non-trivial logits
    code, _, err = cli("export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--max-shard-size", "40KB")
    assert code == 0, err
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.tie_word_embeddings is tie
    assert (hf.lm_head.weight.data_ptr() == hf.backbone.embeddings.weight.data_ptr()) is tie
    got = logits(hf)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the multipliers matter: the same weights without them give other logits
    unfolded = trained_model(run, cfg)
    set_forward_multipliers(unfolded, {})
    assert (logits(unfolded) - ref).abs().max() > 1e-2


def test_mamba_ssm_layout_round_trips_through_mupts_loader(tmp_path: Path, cli) -> None:
    cfg = run_config(False, output_mult=2.5, embedding_mult=0.6)
    run = train_dir(tmp_path, cli, cfg)
    ref = logits(trained_model(run, cfg))
    code, _, err = cli("export", str(run), "--format", "mamba_ssm", "--out", str(tmp_path / "ms"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "ms").iterdir()) == ["config.json", "pytorch_model.bin"]
    conf = json.loads((tmp_path / "ms" / "config.json").read_text())
    # the fields of mamba_ssm's MambaConfig dataclass (mamba_ssm/models/config_mamba.py)
    assert {"d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
            "pad_vocab_size_multiple", "tie_embeddings"} == set(conf)  # fmt: skip
    assert conf["d_model"] == 32 and conf["n_layer"] == 2 and conf["tie_embeddings"] is False
    assert conf["ssm_cfg"]["d_state"] == 8 and conf["ssm_cfg"]["dt_rank"] == 2
    sd = torch.load(tmp_path / "ms" / "pytorch_model.bin", weights_only=True)
    assert sd["backbone.layers.0.mixer.x_proj.weight"].shape == (2 + 16, 64)
    assert "backbone.embedding.weight" in sd and not any("weight_B" in k for k in sd)
    torch.testing.assert_close(logits(load_pretrained(tmp_path / "ms")), ref, rtol=1e-5, atol=1e-5)


def test_zoh_model_is_refused_in_one_line(tmp_path: Path, cli) -> None:
    cfg = run_config(False)
    cfg.model.discretization = "zoh"  # type: ignore[assignment]
    run = train_dir(tmp_path, cli, cfg)
    for fmt in ("hf", "mamba_ssm"):
        code, _, err = cli("export", str(run), "--format", fmt, "--out", str(tmp_path / fmt))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "ZOH" in err and "euler" in err
        assert not (tmp_path / fmt).exists()


def mamba2_config(scale_state: bool = False) -> RunConfig:
    """µP-SSM Mamba-2, d_model 64 against a 32-wide base (heads 8 at headdim 16, 2 B/C groups); d_state 8, or
    16 against a base of 8 (C then carries µP-SSM's 1/r_x multiplier)."""
    return RunConfig(
        model=ModelConfig(arch="mamba2", d_model=64, n_layers=2, d_state=16 if scale_state else 8, headdim=16,
                          ngroups=2, chunk_size=16, tie_embeddings=False),
        train=TrainConfig(steps=4, batch_size=4, seq_len=32, lr=3e-3, eval_every=4, eval_batches=1),
        param=ParamConfig(scheme="mup-ssm", base_d_model=32, base_d_state=8, output_mult=2.0),
    )  # fmt: skip


def test_mamba2_export_loads_in_transformers_with_the_same_logits(tmp_path: Path, cli) -> None:
    """A trained µP-SSM Mamba-2 run (width rules with non-1 multipliers folded) -> hf -> transformers'
    Mamba2ForCausalLM gives the logits of the same run rebuilt independently; -> mamba_ssm layout (its
    MambaConfig fields, ssm_cfg for mamba_ssm's Mamba2) -> mupt's loader gives them too."""
    cfg = mamba2_config()
    run = train_dir(tmp_path, cli, cfg)
    ref = logits(trained_model(run, cfg))
    assert ref.abs().max() > 1.0
    code, _, err = cli("export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == 0, err
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "hf")
    assert (hf.config.num_heads, hf.config.head_dim, hf.config.n_groups) == (8, 16, 2)
    torch.testing.assert_close(logits(hf), ref, rtol=1e-5, atol=1e-5)
    code, _, err = cli("export", str(run), "--format", "mamba_ssm", "--out", str(tmp_path / "ms"))
    assert code == 0, err
    conf = json.loads((tmp_path / "ms" / "config.json").read_text())
    assert conf["ssm_cfg"]["layer"] == "Mamba2" and conf["ssm_cfg"]["headdim"] == 16 and conf["ssm_cfg"]["ngroups"] == 2
    sd = torch.load(tmp_path / "ms" / "pytorch_model.bin", weights_only=True)
    assert sd["backbone.layers.0.mixer.in_proj.weight"].shape == (2 * 128 + 2 * 2 * 8 + 8, 64)
    torch.testing.assert_close(logits(load_pretrained(tmp_path / "ms")), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(load_pretrained(tmp_path / "hf")), ref, rtol=1e-5, atol=1e-5)


def test_mamba2_with_a_scaled_d_state_is_refused_in_one_line(tmp_path: Path, cli) -> None:
    """d_state 16 against a base of 8: C carries 1/r_x = 0.5 after its SiLU, which no weight can carry."""
    run = train_dir(tmp_path, cli, mamba2_config(scale_state=True))
    for fmt in ("hf", "mamba_ssm"):
        code, _, err = cli("export", str(run), "--format", fmt, "--out", str(tmp_path / fmt))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "0.5" in err and "--to-state" in err, err
        assert not (tmp_path / fmt).exists()


def test_init_from_refuses_another_arch_and_an_unfoldable_c_in_one_line(tmp_path: Path, cli) -> None:
    """--init-from a Mamba-2 export into a Mamba-1 run names both archs; into a Mamba-2 run whose d_state is scaled
    from the base (C carries 1/r_x after its SiLU, which the checkpoint cannot) names the multiplier; nothing is
    trained."""
    run = train_dir(tmp_path, cli, mamba2_config())
    code, _, err = cli("export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == 0, err
    base = ["train", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--width", "64",
            "--init-from", str(tmp_path / "hf")]  # fmt: skip
    code, _, err = cli(*base, "--d-state", "8", "--discretization", "euler", "--run-dir", str(tmp_path / "m1"))
    msg = one_line(err)
    assert code == 2 and "a mamba2 checkpoint but the run is mamba1" in msg and "--arch mamba2" in msg, msg
    scaled = mamba2_config(scale_state=True)
    scaled.train.init_from = str(tmp_path / "hf")
    save_yaml(tmp_path / "scaled.yaml", scaled)
    code, _, err = cli("train", "--config", str(tmp_path / "scaled.yaml"), "--run-dir", str(tmp_path / "m2"))
    msg = one_line(err)
    assert code == 2 and "multiplies C by 0.5" in msg and "keep d_state at the base's" in msg, msg
    assert not (tmp_path / "m1" / "model.safetensors").exists() and not (tmp_path / "m2" / "model.safetensors").exists()


def test_help_and_readme_say_mamba1_and_euler_from_the_start(cli) -> None:  # type: ignore[no-untyped-def]
    """A user who wants an exportable large run learns before tuning that a Mamba-1 export takes Euler-B runs
    only and that the discretization must be chosen at tuning time (the LR belongs to it), and which Mamba-2
    runs export."""
    code, text, _ = cli("export", "--help")
    assert code == 0
    text = " ".join(text.replace("│", " ").split())
    assert "Mamba-2 runs (--arch mamba2) become Mamba2ForCausalLM" in text, text
    assert "ZOH runs, mupt's default, are refused" in text and "tune and transfer with --discretization euler" in text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = " ".join(readme.split("### `mupt export`", 1)[1].split("\n### ", 1)[0].split())
    assert "tested against transformers' `Mamba2ForCausalLM`" in section
    assert "a ZOH run (mupt's default `--discretization zoh`) is refused" in section
    assert "`mupt tune --discretization euler`" in section and "The tuned LR belongs to the discretization" in section


@pytest.fixture(scope="module")
def euler_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("recipe")
    data = to_dict(load_yaml(TINY, Recipe))
    data["run"]["model"]["discretization"] = "euler"
    data["per_role"], data["manifest"] = {}, {}  # tiny.yaml's tables are for its ZOH model
    data["run"]["train"]["steps"] = 6
    data["launch"].update({"ckpt_every": 3, "log_every": 1})
    path = tmp / "euler.yaml"
    save_yaml(path, Recipe.model_validate(data))
    return path


def test_two_rank_fsdp2_checkpoint_exports_the_one_process_model(tmp_path: Path, euler_recipe: Path, cli) -> None:
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard") or not torch.distributed.is_gloo_available():
        pytest.skip("needs FSDP2 and gloo")
    proc = run_scale(euler_recipe, "--nproc", "2", "--fsdp", "--run-dir", str(tmp_path / "fsdp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step_000006"
    assert (ckpt / "__1_0.distcp").is_file()  # written by two ranks
    recipe = launch.apply_overrides(load_recipe(euler_recipe), run_dir=tmp_path / "single")
    torch.set_num_threads(1)
    single = launch.run(recipe)
    assert single.steps == 6
    one = Trainer(recipe.run)  # the 1-process model at step 6, rebuilt from its own checkpoint
    launch.load_checkpoint(one, tmp_path / "single" / "checkpoints" / "step_000006", 0)
    ref = logits(one.model)
    code, _, err = cli("export", str(tmp_path / "fsdp"), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == 0, err
    got = logits(transformers.MambaForCausalLM.from_pretrained(tmp_path / "hf"))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    # and the checkpoint directory itself (step 3) is accepted too
    res = export_run(tmp_path / "fsdp" / "checkpoints" / "step_000003", tmp_path / "hf3", "mamba_ssm")
    assert res.step == 3


def hf_model(vocab: int = 256, d: int = 32, tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    conf = transformers.MambaConfig(
        vocab_size=vocab, hidden_size=d, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        time_step_rank="auto", tie_word_embeddings=tie,
    )  # fmt: skip
    return transformers.MambaForCausalLM(conf)


def hf_names(name: str) -> str:
    return name.replace("backbone.embedding.", "backbone.embeddings.")


def hf_step_loss(hf, groups: list[dict], cfg: RunConfig, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """One AdamW step on the transformers model with mupt's per-parameter LRs, then the loss on the next batch.

    transformers fuses x_proj's dt, B and C rows in one tensor; their per-row LRs are applied by taking the
    step with lr 1 on it and scaling each row block's update by its LR (exact on a first AdamW step without
    weight decay: the update is linear in the LR).
    """
    params = dict(hf.named_parameters())
    lr_of = {hf_names(n): g["lr"] for g in groups for n in g["names"]}
    eps = {g["eps"] for g in groups}
    assert len(eps) == 1 and all(g["weight_decay"] == 0 for g in groups)
    opt_groups, rows = [], {}
    for name, p in params.items():
        if name.endswith("x_proj.weight"):
            stem = name[: -len("weight")]
            rows[name] = [lr_of[stem + s] for s in ("weight_dt", "weight_B", "weight_C")]
            opt_groups.append({"params": [p], "lr": 1.0})
        else:
            opt_groups.append({"params": [p], "lr": lr_of[name]})
    opt = torch.optim.AdamW(opt_groups, betas=(cfg.train.beta1, cfg.train.beta2), eps=eps.pop(), weight_decay=0.0)
    before = {n: params[n].detach().clone() for n in rows}
    hf.train()
    x, y = batches[0]
    lm_loss(hf(x).logits, y).backward()
    opt.step()
    r, n = cfg.model.dt_rank_value, cfg.model.d_state
    with torch.no_grad():
        for name, (lr_dt, lr_b, lr_c) in rows.items():
            scale = torch.tensor([lr_dt] * r + [lr_b] * n + [lr_c] * n)[:, None]
            params[name].copy_(before[name] + (params[name] - before[name]) * scale)
        return float(lm_loss(hf(batches[1][0]).logits, batches[1][1]))


def test_init_from_transformers_equal_logits_then_equal_step(tmp_path: Path) -> None:
    hf = hf_model(d=32)
    hf.save_pretrained(tmp_path / "hf")
    cfg = run_config(False, base_d_state=4)  # mup-ssm, base (16, 4) -> (32, 8): per-group LRs differ
    cfg.train.init_from = str(tmp_path / "hf")
    t = Trainer(cfg)
    torch.testing.assert_close(logits(t.model), logits(hf), rtol=1e-5, atol=1e-5)
    # the width rules' groups, from a fresh apply on an independent model of the same config
    fresh = apply(MambaLM(cfg.model), cfg.param, cfg.train.optimizer, cfg.train.lr)
    lrs = {n: g["lr"] for g in fresh.param_groups for n in g["names"]}
    assert {n: g["lr"] for g in t.optimizer.param_groups for n in g["names"]} == lrs
    assert len(set(lrs.values())) >= 3
    batches = [t.batch(0), t.batch(1)]
    t.train_step()
    with torch.no_grad():
        ours = float(lm_loss(t.model(batches[1][0]), batches[1][1]))
    theirs = hf_step_loss(hf, fresh.param_groups, cfg, batches)
    assert ours == pytest.approx(theirs, rel=1e-5)
    with torch.no_grad():
        untrained = float(lm_loss(hf_model(d=32)(batches[1][0]).logits, batches[1][1]))
    assert abs(ours - untrained) > 1e-3  # the step changed the loss


def test_init_from_folds_multipliers_into_lrs_exactly(tmp_path: Path) -> None:
    """export then --init-from continues the unfolded parametrization's update: same loss after one step."""
    cfg = run_config(False, output_mult=2.0, embedding_mult=4.0)
    native = Trainer(cfg)
    export_run_dir = tmp_path / "native"
    save_yaml(export_run_dir / "config.yaml", cfg)
    save_weights(export_run_dir / "model.safetensors", native.model)
    export_run(export_run_dir, tmp_path / "hf", "hf")
    folded_cfg = cfg.model_copy(deep=True)
    folded_cfg.train.init_from = str(tmp_path / "hf")
    folded = Trainer(folded_cfg)
    torch.testing.assert_close(logits(folded.model), logits(native.model), rtol=1e-5, atol=1e-5)
    lr_native = {n: g["lr"] for g in native.optimizer.param_groups for n in g["names"]}
    lr_folded = {n: g["lr"] for g in folded.optimizer.param_groups for n in g["names"]}
    assert lr_folded["lm_head.weight"] == pytest.approx(2.0 * lr_native["lm_head.weight"])
    assert lr_folded["backbone.embedding.weight"] == pytest.approx(4.0 * lr_native["backbone.embedding.weight"])
    for _ in range(2):
        a, b = native.train_step(), folded.train_step()
        assert a == pytest.approx(b, rel=1e-5)
    assert native.evaluate() == pytest.approx(folded.evaluate(), rel=1e-5)


def test_init_from_cli_train_and_scale(tmp_path: Path, cli, euler_recipe: Path) -> None:
    hf = hf_model(d=32)
    hf.save_pretrained(tmp_path / "hf")
    code, text, err = cli("train", "--width", "32", "--d-state", "8", "--discretization", "euler", "--steps", "2",
                          "--batch-size", "2", "--seq-len", "16", "--init-from", str(tmp_path / "hf"),
                          "--run-dir", str(tmp_path / "t"))  # fmt: skip
    assert code == 0, err
    assert load_yaml(tmp_path / "t" / "config.yaml", RunConfig).train.init_from == str(tmp_path / "hf")
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    with torch.no_grad():
        cfg = load_yaml(tmp_path / "t" / "config.yaml", RunConfig)
        x, y = Trainer(cfg).batch(0)
        assert metrics["train_loss"][0] == pytest.approx(float(lm_loss(hf(x).logits, y)), rel=1e-5)
    code, _, err = cli("scale", str(euler_recipe), "--init-from", str(tmp_path / "hf"), "--steps", "1",
                       "--run-dir", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, err
    first = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[0])
    rec = load_recipe(euler_recipe)
    t = Trainer(rec.run)
    x, y = t.batch(0)
    with torch.no_grad():
        assert first["loss"] == pytest.approx(float(lm_loss(hf(x).logits, y)), rel=1e-5)


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_inputs_are_one_line_exit_2(tmp_path: Path, cli) -> None:
    cfg = run_config(False)
    run = train_dir(tmp_path, cli, cfg)
    # missing source
    code, _, err = cli("export", str(tmp_path / "nope"), "--out", str(tmp_path / "o1"))
    assert code == 2 and "no such run" in one_line(err)
    # non-empty --out
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    code, _, err = cli("export", str(run), "--out", str(tmp_path / "full"))
    assert code == 2 and "not empty" in one_line(err) and (tmp_path / "full" / "x").read_text() == "keep me"
    # corrupt weights
    w = run / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    code, _, err = cli("export", str(run), "--out", str(tmp_path / "o2"))
    assert code == 2 and "corrupt" in one_line(err)
    # --init-from: missing, shapes, vocab
    base = ["train", "--d-state", "8", "--discretization", "euler", "--steps", "1", "--batch-size", "2",
            "--seq-len", "16", "--run-dir", str(tmp_path / "bad")]  # fmt: skip
    code, _, err = cli(*base, "--width", "32", "--init-from", str(tmp_path / "nope"))
    assert code == 2 and "config.json" in one_line(err)
    hf_model(d=32).save_pretrained(tmp_path / "hf32")
    code, _, err = cli(*base, "--width", "48", "--init-from", str(tmp_path / "hf32"))
    msg = one_line(err)
    assert code == 2 and "backbone.embedding.weight" in msg and "[256, 32]" in msg and "[256, 48]" in msg
    hf_model(vocab=300, d=32).save_pretrained(tmp_path / "hf300")
    code, _, err = cli(*base, "--width", "32", "--init-from", str(tmp_path / "hf300"))
    assert code == 2 and "vocab 300" in one_line(err) and "256" in err
    code, _, err = cli(*base[:3], "--steps", "1", "--width", "32", "--init-from", str(tmp_path / "hf32"),
                       "--run-dir", str(tmp_path / "bad2"))  # fmt: skip
    assert code == 2 and "ZOH" in one_line(err)
    # a corrupt transformers checkpoint
    st = tmp_path / "hf32" / "model.safetensors"
    st.write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        read_pretrained(tmp_path / "hf32")


def test_corrupt_dcp_checkpoint_is_refused(tmp_path: Path, euler_recipe: Path, cli) -> None:
    recipe = launch.apply_overrides(load_recipe(euler_recipe), run_dir=tmp_path / "r", steps=3)
    torch.set_num_threads(1)
    launch.run(recipe)
    shard = tmp_path / "r" / "checkpoints" / "step_000003" / "__0_0.distcp"
    shard.write_bytes(bytes(255 - b for b in shard.read_bytes()))
    code, _, err = cli("export", str(tmp_path / "r"), "--out", str(tmp_path / "o"))
    assert code == 2 and "corrupt" in one_line(err)
    with pytest.raises(ConfigError):
        export_run(tmp_path / "r", tmp_path / "r", "hf")  # non-empty out before anything is read


def test_export_copies_the_datasets_tokenizer(tmp_path: Path, cli) -> None:
    from pydoc_data.topics import topics

    from mupt.data.prepare import PrepareSettings, prepare

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:60]))
    prepare(PrepareSettings(sources=[str(src)], out=tmp_path / "ds", train_vocab=300, val_fraction=0.1))
    code, _, err = cli("train", "--data", str(tmp_path / "ds"), "--width", "32", "--d-state", "8",
                       "--discretization", "euler", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                       "--run-dir", str(tmp_path / "run"))  # fmt: skip
    assert code == 0, err
    code, _, err = cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"))
    assert code == 0, err
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tmp_path / "ds" / "tokenizer.json").read_bytes()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    ids = tok("def f(x): return x")["input_ids"]
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.vocab_size == 304  # 300 ids padded to a multiple of 8
    assert max(ids) < 300 and hf(torch.tensor([ids])).logits.shape == (1, len(ids), 304)
