from __future__ import annotations

from pathlib import Path

import pytest

from mupt.config import BestParams, Recipe, RunConfig, load_yaml, save_yaml, with_overrides
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
    recipe = Recipe(run=RunConfig(), per_role={"in_proj": {"lr": 0.1, "init_std": None}})
    save_yaml(tmp_path / "r.yaml", recipe)
    assert load_yaml(tmp_path / "r.yaml", Recipe) == recipe


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
