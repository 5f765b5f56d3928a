"""A new user's first hour (issue 14): bad inputs are one line before any work, files load back as -c,
defaults are shown in --help, redirected output gets progress lines, a closed pipe loses nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import interrupt_while_torch_loads

from mupt.config import BestParams, RunConfig, load_yaml, save_yaml, with_overrides
from mupt.transfer import load_recipe, save_recipe, transfer

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"model.d_model": 32, "model.n_layers": 1, "model.d_state": 8, "train.batch_size": 2, "train.seq_len": 16}
TINY = ["--width", "32", "--layers", "1", "--d-state", "8", "--batch-size", "2", "--seq-len", "16"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def one_error_line(result: tuple[int, str, str], *needles: str) -> None:
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for n in needles:
        assert n in errors[0], err


# --- item 2: one line, exit 2, before any work ------------------------------------------------------


def test_bad_numbers_and_data_are_refused_up_front(cli, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n")
    run = tmp_path / "run"
    for value in ("inf", "nan", "-1", "0"):
        one_error_line(cli("train", *TINY, "--lr", value, "--run-dir", str(run)), "--lr")
        one_error_line(cli("transfer", "--lr", value, "--to-width", "512", "--out", str(tmp_path / "r.yaml")), "--lr")
        one_error_line(cli("train", *TINY, "--lr-scale", value, "--run-dir", str(run)), "--lr-scale")
    one_error_line(cli("train", *TINY, "--data", str(tmp_path / "empty.txt"), "--run-dir", str(run)), "is empty")
    one_error_line(cli("train", *TINY, "--data", str(tmp_path / "blank"), "--run-dir", str(run)), "only empty")
    one_error_line(cli("train", *TINY, "--threads", "0", "--run-dir", str(run)), "--threads 0")
    one_error_line(cli("check", "transfer", "--workers", "0", "--run-dir", str(run)), "--workers 0")
    coord = ["check", "coord", "--widths", "16,128", "--run-dir", str(run)]
    one_error_line(cli(*coord, "--batch-size", "0"), "--batch-size", "(got 0)")
    one_error_line(cli(*coord, "--d-state", "0"), "--d-state", "(got 0)")
    one_error_line(cli(*coord, "--tolerance", "nan"), "--tolerance nan")
    one_error_line(cli(*coord, "--lr", "inf"), "--lr")
    one_error_line(cli("check", "transfer", "--max-drift", "nan", "--run-dir", str(run)), "--max-drift nan")
    one_error_line(cli("check", "transfer", "--monotone-tol", "inf", "--run-dir", str(run)), "--monotone-tol inf")
    assert not run.exists() and not (tmp_path / "r.yaml").exists()


def test_unknown_backend_is_caught_before_any_directory(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for args in (
        ["train", *TINY],
        ["tune", *TINY],
        ["check", "coord", "--widths", "16,128"],
        ["check", "transfer", "--widths", "16,32"],
        ["transfer", "--lr", "1e-3", "--to-width", "512"],
    ):
        one_error_line(cli(*args, "--backend", "cuda-fast"), "--backend", "unknown scan backend", "cuda-fast")
    assert list(tmp_path.iterdir()) == []


def test_config_errors_list_every_field_and_directories_are_named(cli, tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("train: {steps: 0, lerning_rate: 0.1}\n")
    code, _, err = cli("train", "-c", str(tmp_path / "c.yaml"))
    assert code == 2 and "Traceback" not in err
    assert "2 errors" in err and "train.lerning_rate: Extra inputs are not permitted" in err and "train.steps" in err
    save_yaml(tmp_path / "config.yaml", RunConfig())
    one_error_line(cli("train", "-c", str(tmp_path)), "is a directory", str(tmp_path / "config.yaml"))


# --- item 3: every file mupt writes is a -c, with --lr-scale ------------------------------------------


def test_train_takes_config_best_and_recipe_files_with_lr_scale(cli, tmp_path: Path) -> None:
    proxy = with_overrides(RunConfig(), {**SMALL, "train.lr": 0.004, "train.steps": 2})
    save_yaml(tmp_path / "best.yaml", BestParams(study="s", trial=0, value=3.0, params={"lr": 0.004}, config=proxy))
    save_recipe(tmp_path / "recipe.yaml", transfer(proxy, 64))
    for name, d_model in (("best.yaml", 32), ("recipe.yaml", 64)):
        run = tmp_path / f"run-{name}"
        code, out, err = cli("train", "-c", str(tmp_path / name), "--lr-scale", "0.5", "--run-dir", str(run))
        assert code == 0, err
        cfg = load_yaml(run / "config.yaml")
        assert cfg.model.d_model == d_model and cfg.train.lr == pytest.approx(0.002)
        assert json.loads((run / "metrics.json").read_text())["steps"] == 2
        # the run's own config.yaml loads back too
        code, _, err = cli("train", "-c", str(run / "config.yaml"), "--steps", "1", "--run-dir", str(run / "again"))
        assert code == 0, err


def test_train_without_run_dir_writes_a_fresh_directory(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("train", *TINY, "--steps", "1")
    assert code == 0, err
    (run,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"train-w32-\d{8}-\d{6}", run.name)
    assert {p.name for p in run.iterdir()} == {"config.yaml", "metrics.json", "model.safetensors"}
    assert str(Path("runs") / run.name) in out


# --- item 5: defaults shown in --help, one naming scheme -----------------------------------------------


def test_help_shows_the_shared_defaults(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    for command in (["train"], ["tune"]):
        code, out, _ = cli(*command, "--help")
        assert code == 0
        for default in ("64, or --config's", "8, or --config's", "16, or --config's", "256, or --config's",
                        "adamw, or --config's", "usable cores // workers"):  # fmt: skip
            assert default in out, (command, default)
    code, out, _ = cli("check", "transfer", "--help")
    assert "auto: usable cores, at most 8" in out and "[default: 0]" not in out
    assert "--run-dir" in out and "[default: adamw]" in out
    code, out, _ = cli("check", "coord", "--help")
    assert "--run-dir" in out and "[default: adamw]" in out and "--threads" in out
    assert "--config" not in out and "[default: (builtin)]" in out  # no --config: its --data default is mupt's own
    code, out, _ = cli("check", "all", "--help")
    assert "--coord-widths" in out and "LR-transfer part" in out
    assert "--config" not in out and "(16)" in out  # check all has no --config: its defaults are mupt's own
    code, out, _ = cli("scale", "--help")
    assert "--threads" in out and "--run-dir" in out


def test_check_coord_help_says_why_its_layers_default_differs(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """check coord defaults to 3 blocks where every other command has 2: deliberate (its measurements and verdicts
    use 3), and --help says so; the default is the measurement settings' own."""
    from mupt.check.coord import CoordSettings

    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = cli("check", "coord", "--help")
    row = " ".join(next(x for x in out.splitlines() if "--layers" in x).replace("│", " ").split())
    assert code == 0 and "not the other commands' 2" in row and "docs/width_rules.md" in row, row
    assert row.endswith("[default: 3]") and CoordSettings().n_layers == 3, row
    code, out, _ = cli("train", "--help")
    row = " ".join(next(x for x in out.splitlines() if "--layers" in x).replace("│", " ").split())
    assert "[default: (2, or --config's)]" in row, row


def test_ctrl_c_in_a_command_that_does_not_handle_it_is_one_line(tmp_path: Path) -> None:
    """check coord has no Ctrl-C handling of its own: a real SIGINT mid-run ends it with one line and exit 130 (typer
    >= 0.26 turned the KeyboardInterrupt into a silent exit 130 before mupt's own handler saw it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mupt", "check", "coord", "--widths", "16,128", "--seeds", "2", "--steps", "500",
         "--layers", "1", "--batch-size", "2", "--seq-len", "16", "--run-dir", str(tmp_path / "c")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = [proc.stderr.readline() for _ in range(2)]  # the header, then the first measurement's progress line
        assert seen[1].startswith("coord 1/"), seen
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[-1] == "interrupted (Ctrl-C)" and "Traceback" not in stderr, stderr
    assert not (tmp_path / "c" / "coord.json").exists()  # stopped mid-run, not at its end


def test_the_console_script_survives_ctrl_c_while_it_loads(tmp_path: Path) -> None:
    """The `mupt` script pip writes from pyproject's [project.scripts] (`from MODULE import FUNC; sys.exit(FUNC())`),
    interrupted while torch loads: one line and exit 130, not the traceback of an import."""
    tomllib = pytest.importorskip("tomllib")
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["mupt"]
    module, func = entry.split(":")
    script = tmp_path / "mupt"
    script.write_text(f"import sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    rc, stderr = interrupt_while_torch_loads([sys.executable, str(script), "check", "coord"], env=env(), cwd=tmp_path)
    assert rc == 130 and "Traceback" not in stderr, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.strip() and not x.startswith(("mupt check coord", "coord "))]
    assert len(lines) == 1 and lines[0].startswith("interrupted (Ctrl-C)"), stderr  # while loading, or just after


# --- item 6: progress lines when stderr is not a terminal -----------------------------------------------


def test_redirected_output_gets_a_progress_line_per_unit(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    with log.open("w") as fh:
        res = subprocess.run(
            [sys.executable, "-m", "mupt", "check", "coord", "--widths", "16,128", "--seeds", "2", "--steps", "1",
             "--layers", "1", "--batch-size", "2", "--seq-len", "16", "--tolerance", "100", "--run-dir",
             str(tmp_path / "c")],
            stdout=fh, stderr=subprocess.STDOUT, env=env(), cwd=tmp_path, timeout=600,
        )  # fmt: skip
    text = log.read_text()
    assert res.returncode == 0, text
    lines = [line for line in text.splitlines() if re.match(r"coord \d/4 width \d+ seed \d", line)]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"], text
    assert "Traceback" not in text and "PASS" in text


def test_log_heartbeat_while_one_unit_of_work_runs_long() -> None:
    """Item 6: while one unit (a tune trial, a wide coord run) runs longer than the heartbeat, a log still
    gets a line every heartbeat seconds, marked as such; none after the work is done or the block exits."""
    import io

    from rich.console import Console

    from mupt.cli.common import LineProgress

    buf = io.StringIO()
    with LineProgress(Console(file=buf, width=200), min_interval=0, heartbeat=0.4) as bar:
        task = bar.add_task("tune", total=3, info="")
        bar.update(task, advance=1, info="best 2.5")
        time.sleep(1.5)  # one long trial: about 3 heartbeats
        bar.update(task, advance=2, info="best 2.4")  # finished: no heartbeat after this
        time.sleep(1.0)
    lines = buf.getvalue().splitlines()
    beats = [line for line in lines if line.endswith("(still working)")]
    assert 2 <= len(beats) <= 4, lines
    assert all(line.startswith("tune 1/3 best 2.5") for line in beats), lines
    assert lines[0].startswith("tune 1/3 best 2.5") and lines[-1].startswith("tune 3/3 best 2.4"), lines
    assert not lines[-1].endswith("(still working)")


# --- item 2 (pipe) and item 8 (narrow terminal) and item 13 (smaller width) -------------------------------


def test_transfer_into_a_closed_pipe_still_writes_the_recipe(tmp_path: Path) -> None:
    """`mupt transfer ... | head -1`: the recipe is written first; a closed stdout ends with 141, no traceback."""
    cmd = [sys.executable, "-m", "mupt", "transfer", "--lr", "3e-3", "--to-width", "1024", "--out", "r.yaml"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "standard output was closed" in err
    assert load_recipe(tmp_path / "r.yaml").run.model.d_model == 1024


def test_per_role_table_is_readable_at_80_columns(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "mupt", "transfer", "--lr", "3e-3", "--to-width", "4096", "--out", "r.yaml"],
        capture_output=True, text=True, env=env(COLUMNS="80"), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert max(len(line) for line in res.stdout.splitlines()) <= 80
    table = res.stdout[res.stdout.index("Per role") : res.stdout.index("Summary")]
    assert "…" not in table  # no number or role name cut short
    for text in ("x_proj_B", "lm_head", "0.0625", "1.875e-04", "0.002255"):
        assert text in table, text


def test_transfer_to_a_smaller_width_warns(cli, tmp_path: Path) -> None:
    code, _, err = cli("transfer", "--lr", "3e-3", "--width", "64", "--to-width", "32", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert "SMALLER than the proxy's (0.5x)" in " ".join(err.split())


def test_piped_output_is_not_cut_to_80_columns(tmp_path: Path) -> None:
    """Rich cuts tables to 80 columns when stdout is a pipe ("0.00…" for a best LR); piped output gets
    mupt.cli.PIPE_WIDTH columns unless $COLUMNS says otherwise (the fresh-user walkthrough found `mupt tune
    ... | tee log` unreadable)."""
    code = (
        "from rich.table import Table; from mupt.cli import out\n"
        "t = Table(*[f'column number {i}' for i in range(8)])\n"
        "t.add_row(*[f'{1e-3 * (i + 1):.6e}' for i in range(8)])\n"
        "out.print(t)"
    )
    bare = {k: v for k, v in env().items() if k != "COLUMNS"}
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=bare, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "…" not in piped.stdout and "8.000000e-03" in piped.stdout
    assert 80 < max(len(line) for line in piped.stdout.splitlines()) <= 160
    narrow = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**bare, "COLUMNS": "80"}, timeout=120
    )
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80 and "…" in narrow.stdout


@pytest.mark.parametrize("args", [("tune", "--finalist", "nonsense"), ("train", "--optimizer", "nonsense")])
def test_a_bad_choice_is_one_line_naming_the_choices(cli, args: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    """Fresh-user walkthrough 3 (#11): a value outside an option's choices is one line naming them, exit 2,
    without the "Value error," that pydantic adds through typer's enum conversion."""
    code, _, err = cli(*args)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1, err
    assert f"Invalid value for '{args[1]}': 'nonsense' is not one of" in lines[0] and "Value error" not in err, err
