"""Output paths: every command refuses an unusable --run-dir/--runs-dir/--out before any work (issue 14, item 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mupt.config import save_yaml
from mupt.errors import StorageError
from mupt.paths import check_output_dir, check_output_file, default_run_dir
from mupt.transfer import transfer
from mupt.tune import proxy_config

TINY = ["--width", "32", "--layers", "1", "--d-state", "8", "--batch-size", "2", "--seq-len", "16", "--steps", "2"]


@pytest.fixture
def regular_file(tmp_path: Path) -> Path:
    f = tmp_path / "afile"
    f.write_text("not a directory\n")
    return f


def unwritable_dir() -> Path:
    """A real directory nothing can be created in, even as root: /proc (procfs)."""
    p = Path("/proc")
    if not p.is_dir() or os.access(p / "self", os.F_OK) is False:
        pytest.skip("no /proc on this system")
    return p / "mupt-out"


def test_check_output_dir_real_filesystem(tmp_path: Path, regular_file: Path) -> None:
    assert check_output_dir(tmp_path / "a" / "b", "--run-dir") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # validation creates nothing
    with pytest.raises(StorageError, match="is an existing file"):
        check_output_dir(regular_file, "--run-dir")
    with pytest.raises(StorageError, match=r"afile is a regular file, not a directory"):
        check_output_dir(regular_file / "sub" / "deeper", "--run-dir")
    with pytest.raises(StorageError, match="cannot write in /proc"):
        check_output_dir(unwritable_dir(), "--run-dir")
    assert not list(tmp_path.glob(".mupt-write-probe-*"))  # the probe is removed


def test_check_output_file_real_filesystem(tmp_path: Path, regular_file: Path) -> None:
    assert check_output_file(regular_file, "--out") == regular_file  # replaced atomically later
    with pytest.raises(StorageError, match=f"directory {tmp_path / 'new'} does not exist; create it"):
        check_output_file(tmp_path / "new" / "r.yaml", "--out")  # a typo in the directory: refused
    assert check_output_file(tmp_path / "new" / "r.yaml", "--out", create_parent=True) == tmp_path / "new" / "r.yaml"
    assert not (tmp_path / "new").exists()  # validation creates nothing
    with pytest.raises(StorageError, match="is a directory"):
        check_output_file(tmp_path, "--out")
    with pytest.raises(StorageError, match="is a regular file"):
        check_output_file(regular_file / "r.yaml", "--out")
    with pytest.raises(StorageError, match="cannot write in /proc"):
        check_output_file(unwritable_dir() / "r.yaml", "--out")


def test_default_run_dir_is_fresh_per_run() -> None:
    import datetime as dt

    t = dt.datetime(2026, 11, 30, 5, 36, 7, tzinfo=dt.timezone.utc)
    assert default_run_dir("train-w256", t) == Path("runs/train-w256-20261130-053607")


def assert_refused(result: tuple[int, str, str], *needles: str) -> None:
    code, out, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err and out == "", out  # nothing printed before the refusal
    for n in needles:
        assert n in err, err


def test_every_command_refuses_bad_output_paths_before_work(cli, tmp_path: Path, regular_file: Path) -> None:
    bad_dirs = {
        "under a file": (regular_file / "run", "is a regular file"),
        "at a file": (regular_file, "is an existing file"),
        "unwritable": (unwritable_dir(), "cannot write in /proc"),
    }
    recipe = tmp_path / "recipe.yaml"
    from mupt.transfer import save_recipe

    save_recipe(recipe, transfer(proxy_config(), 512))
    save_yaml(tmp_path / "proxy.yaml", proxy_config())
    for what, (path, msg) in bad_dirs.items():
        # train: --run-dir and its alias --out
        assert_refused(cli("train", *TINY, "--run-dir", str(path)), "--run-dir", str(path), msg)
        assert_refused(cli("train", *TINY, "--out", str(path)), "--run-dir", msg)
        assert_refused(cli("check", "coord", "--widths", "16,128", "--seeds", "1", "--run-dir", str(path)), msg)
        assert_refused(cli("check", "transfer", "--widths", "16,32", "--run-dir", str(path)), msg)
        assert_refused(cli("check", "all", "--run-dir", str(path)), msg)
        assert_refused(cli("scale", str(recipe), "--steps", "1", "--run-dir", str(path)), "--run-dir", msg)
        assert_refused(cli("prepare", "builtin", "--out", str(path)), "--out", msg)
        # tune writes <runs-dir>/<study>/, transfer a file: both are inside the path given
        nested = "is a regular file" if what == "at a file" else msg
        assert_refused(cli("tune", *TINY, "--runs-dir", str(path)), "--runs-dir", nested)
        target = path / "r.yaml"
        assert_refused(cli("transfer", "--lr", "3e-3", "--to-width", "512", "--out", str(target)), nested)
    # transfer --out at a directory
    assert_refused(cli("transfer", "--lr", "3e-3", "--to-width", "512", "--out", str(tmp_path)), "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "proxy.yaml", "recipe.yaml"]


def test_transfer_out_in_a_missing_directory_is_refused_but_the_default_place_is_made(cli, tmp_path: Path) -> None:
    """A file output's directory must exist (as for cp, or tune --table-out): a typo in it is one line, exit 2, and
    nothing is created; the default place (here under a new --runs-dir) is mupt's own and is made."""
    typo = tmp_path / "reciepes" / "r.yaml"
    args = ("transfer", "--lr", "3e-3", "--width", "32", "--to-width", "64", "--health-steps", "0")
    assert_refused(cli(*args, "--out", str(typo)), f"--out {typo}: directory {typo.parent} does not exist",
                   f"mkdir -p {typo.parent}")  # fmt: skip
    assert_refused(cli(*args, "--table-out", str(typo.with_suffix(".csv"))), "--table-out", "does not exist")
    assert not typo.parent.exists()
    code, stdout, stderr = cli(*args, "--runs-dir", str(tmp_path / "new-runs"))
    assert code == 0, stderr
    written = sorted((tmp_path / "new-runs").glob("*.yaml"))
    assert len(written) == 1 and f"recipe written: {written[0]}" in " ".join(stdout.split())
    (tmp_path / "reciepes").mkdir()  # the fix the line names
    code, stdout, stderr = cli(*args, "--out", str(typo))
    assert code == 0 and typo.is_file(), stderr
