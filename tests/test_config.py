from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mupt.config import BestParams, Recipe, RunConfig, load_recipe, load_yaml, save_yaml, with_overrides
from mupt.errors import ConfigError


def test_run_config_round_trips(tmp_path: Path) -> None:
    cfg = with_overrides(
        RunConfig(), {"model.d_model": 96, "train.lr": 1e-3, "param.scheme": "sp", "data.source": "recall"}
    )
    save_yaml(tmp_path / "c.yaml", cfg, header="made by a test")
    back = load_yaml(tmp_path / "c.yaml")
    assert back == cfg
    assert (tmp_path / "c.yaml").read_text().startswith("# made by a test")
    assert not list(tmp_path.glob(".c.yaml.*"))  # no temp file left behind


def test_recipe_and_best_round_trip(tmp_path: Path) -> None:
    best = BestParams(study="s", trial=3, value=2.5, params={"lr": 0.01}, config=RunConfig())
    save_yaml(tmp_path / "best.yaml", best)
    assert load_yaml(tmp_path / "best.yaml", BestParams) == best
    row = {"lr": 0.1, "init_std": None, "fwd_mult": 1.0, "weight_decay": 0.0}
    recipe = Recipe(run=RunConfig(), per_role={"in_proj": row})
    save_yaml(tmp_path / "r.yaml", recipe)
    assert load_yaml(tmp_path / "r.yaml", Recipe) == recipe


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda d: d["per_role"]["in_proj"].pop("fwd_mult"), r"per_role\.in_proj\.fwd_mult: Field required"),
        (lambda d: d["per_role"]["in_proj"].update(lr="fast"), r"per_role\.in_proj\.lr: .*valid number.*'fast'"),
        (lambda d: d["per_role"]["in_proj"].update(lr_mult=2.0), r"per_role\.in_proj\.lr_mult: Extra inputs"),
        (lambda d: d["source"]["ratio"].update(width="x8"), r"source\.ratio\.width: .*'x8'"),
        (lambda d: d["source"].update(proxy_config={"model": {"d_model": -1}}), r"proxy_config\.model\.d_model"),
        (lambda d: d["manifest"].update(scheme="mu-p"), r"manifest\.scheme: .*'mu-p'"),
        (lambda d: d["manifest"]["params"]["w"].update(role="head"), r"manifest\.params\.w\.role: .*'head'"),
        (lambda d: d.update(launch={"precision": "fp16"}), r"launch\.precision: .*'fp16'"),
    ],
)
def test_every_recipe_section_is_validated_when_loaded(tmp_path: Path, edit, pattern: str) -> None:
    """A hand-edited recipe is refused at load, naming the field, in every section (never used half-checked)."""
    row = {"lr": 0.1, "init_std": 0.02, "fwd_mult": 1.0, "weight_decay": 0.0}
    entry = {"role": "in_proj", "shape": [4, 2], "fan_in": 2, "fan_out": 4, "init_std": 0.02, "lr_mult": 1.0,
             "fwd_mult": 1.0, "weight_decay": 0.0}  # fmt: skip
    manifest = {"scheme": "mup-ssm", "optimizer": "adamw", "discretization": "zoh", "base_d_model": 64,
                "base_d_state": 16, "d_model": 128, "d_state": 16, "params": {"w": entry}}  # fmt: skip
    good = {
        "source": {"ratio": {"width": 2.0, "state": 1.0}, "proxy_config": {}, "base_per_role": {"in_proj": row}},
        "run": {},
        "per_role": {"in_proj": dict(row)},
        "manifest": manifest,
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(good))
    assert load_recipe(path).manifest.params["w"].role == "in_proj"  # the unedited recipe loads
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=pattern) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("model: {d_model: -3}", r"model.d_model: .*greater than 0.*-3"),
        ("model: {d_modle: 64}", r"model.d_modle: Extra inputs"),
        ("train: {optimizer: lion}", r"train.optimizer: .*'lion'"),
        ("model: [1, 2", r"not valid YAML"),
        ("- a list", r"expected a mapping"),
        ("model: {dt_min: 0.5, dt_max: 0.1}", r"dt_min"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_yaml(path)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("train: {lr: .inf}", r"train.lr: Input should be a finite number"),
        ("train: {lr: .nan}", r"train.lr: Input should be a finite number"),
        ("train: {lr: -0.1}", r"train.lr: Input should be greater than 0"),
        ("param: {output_mult: .inf}", r"param.output_mult: Input should be a finite number"),
        ("model: {scan_backend: cuda-fast}", r"model.scan_backend: unknown scan backend; choose one of: auto"),
    ],
)
def test_non_finite_numbers_and_unknown_backends_are_refused_on_load(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_yaml(path)


def test_every_config_error_is_shown_one_line_each(tmp_path: Path) -> None:
    """A typo must not hide behind another field's error ("and 1 more")."""
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: -1, lerning_rate: 0.1}\nmodel: {d_model: 0}\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: 3 errors"
    assert sorted(line.strip().split(":")[0] for line in lines[1:]) == [
        "model.d_model", "train.lerning_rate", "train.steps",
    ]  # fmt: skip
    assert any("train.lerning_rate: Extra inputs are not permitted (got 0.1)" in line for line in lines)


def test_config_path_that_is_a_directory_names_its_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory; pass a YAML file$"):
        load_yaml(tmp_path)
    save_yaml(tmp_path / "best.yaml", RunConfig())
    with pytest.raises(ConfigError, match=rf"is a directory; pass a YAML file in it: {tmp_path / 'best.yaml'}"):
        load_yaml(tmp_path)


def test_every_file_mupt_writes_loads_as_a_run_config(tmp_path: Path) -> None:
    from mupt.config import load_run_config
    from mupt.transfer import save_recipe, transfer

    proxy = with_overrides(RunConfig(), {"model.d_model": 64, "train.lr": 0.02})
    save_yaml(tmp_path / "config.yaml", proxy)
    assert load_run_config(tmp_path / "config.yaml") == proxy
    save_yaml(tmp_path / "best.yaml", BestParams(study="s", trial=1, value=2.0, params={"lr": 0.02}, config=proxy))
    assert load_run_config(tmp_path / "best.yaml") == proxy
    recipe = transfer(proxy, 512)
    save_recipe(tmp_path / "recipe.yaml", recipe)
    assert load_run_config(tmp_path / "recipe.yaml") == recipe.run
    assert load_run_config(tmp_path / "recipe.yaml").model.d_model == 512
    (tmp_path / "broken-recipe.yaml").write_text("run: {model: {d_model: 0}}\nper_role: {}\n")
    with pytest.raises(ConfigError, match=r"broken-recipe.yaml \(recipe\): run.model.d_model"):
        load_run_config(tmp_path / "broken-recipe.yaml")


def test_the_default_proxy_is_defined_once() -> None:
    """train, tune and transfer --lr all start from RunConfig(), whose defaults are the PROXY_* constants."""
    from mupt import config as c
    from mupt.tune import proxy_config

    cfg = RunConfig()
    assert proxy_config() == cfg
    assert (cfg.model.d_model, cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_every) == (
        c.PROXY_D_MODEL, c.PROXY_STEPS, c.PROXY_BATCH_SIZE, c.PROXY_SEQ_LEN, c.PROXY_EVAL_EVERY,
    )  # fmt: skip
    assert cfg.train.optimizer is c.DEFAULT_OPTIMIZER
    assert load_yaml(Path(__file__).resolve().parent.parent / "recipes" / "proxy.yaml") == cfg


def test_mamba2_refuses_a_discretization_it_would_ignore(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """Mamba-2's SSD ignores --discretization: a non-default one is a one-line error (exit 2), from a flag and from
    a config file, before anything is written; the default (zoh, what every saved mamba2 config carries) loads;
    --help says mamba1 only."""
    out = tmp_path / "run"
    flags = ["--arch", "mamba2", "--width", "64", "--headdim", "32", "--layers", "1", "--steps", "1"]
    code, _, err = cli("train", *flags, "--discretization", "euler", "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "discretization euler applies to mamba1 only" in err and "--arch mamba1" in err, err
    assert not out.exists()
    path = tmp_path / "m2.yaml"
    path.write_text("model: {arch: mamba2, d_model: 64, headdim: 32, discretization: euler}")
    with pytest.raises(ConfigError, match="model: .*mamba1 only") as info:
        load_yaml(path)
    assert "\n" not in str(info.value)
    path.write_text("model: {arch: mamba2, d_model: 64, headdim: 32, discretization: zoh}")
    assert load_yaml(path).model.discretization.value == "zoh"
    code, text, _ = cli("train", "--help")
    assert code == 0 and "mamba1 only" in " ".join(text.split())


def test_a_best_yaml_cut_short_is_refused_not_read_with_defaults(tmp_path: Path) -> None:
    """A best.yaml cut inside its config (a full disk, an interrupted copy) is still valid YAML, and every
    field has a default: it loaded silently with the scheme, the multipliers and the manifest at their
    defaults.  Now one line names what is missing and how to write it again."""
    from mupt.config import load_best, load_run_config

    proxy = with_overrides(RunConfig(), {"model.d_model": 64, "train.lr": 0.02, "param.scheme": "sp"})
    whole = tmp_path / "best.yaml"
    save_yaml(whole, BestParams(study="s", trial=1, value=2.0, params={"lr": 0.02}, config=proxy))
    assert load_best(whole).config.param.scheme.value == "sp"
    text = whole.read_text()
    cut = tmp_path / "cut.yaml"
    cut.write_text(text[: text.index("\n  param:")])  # ends inside config.train
    for load in (load_best, load_run_config):
        with pytest.raises(ConfigError, match=r"incomplete best.yaml \(no manifest, .*config.param\)") as e:
            load(cut)
        assert "mupt tune --study NAME --report" in str(e.value) and "\n" not in str(e.value)


def test_a_relative_data_path_is_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """best.yaml, recipes and run configs written from `--data data/corpus` must work from any directory
    (the walkthrough's batch job, started elsewhere, failed on the relative path)."""
    corpus = tmp_path / "work" / "data" / "corpus"
    corpus.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    cfg = with_overrides(RunConfig(), {"data.source": "data/corpus"})
    assert cfg.data.source == str(corpus)
    save_yaml(tmp_path / "config.yaml", cfg)
    monkeypatch.chdir(tmp_path)
    assert load_yaml(tmp_path / "config.yaml").data.source == str(corpus)
    # names and paths that do not exist here stay as typed (an error then names what the user wrote)
    for kept in ("builtin", "recall", "data/corpus"):
        assert with_overrides(RunConfig(), {"data.source": kept}).data.source == kept
