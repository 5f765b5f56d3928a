"""mupt prepare and prepared datasets: real files (txt, jsonl, jsonl.gz, parquet), a BPE trained by tokenizers."""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer

from mupt.config import DataConfig, RunConfig, load_recipe
from mupt.data import bytes_per_token, fit_vocab, load_data
from mupt.data.dataset import open_dataset
from mupt.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def topics() -> list[str]:
    from pydoc_data.topics import topics as t

    return [t[k] for k in sorted(t)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Builtin topics spread over .txt files, a .jsonl, a .jsonl.gz and a .parquet; their texts in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("src")
    docs = topics()
    txt, jl, jgz, pqt = docs[:6], docs[6:40], docs[40:60], docs[60:]
    (root / "txt").mkdir()
    for i, d in enumerate(txt):  # sorted by name = this order
        (root / "txt" / f"doc{i}.txt").write_text(d, encoding="utf-8")
    (root / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(jl)))
    with gzip.open(root / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": d}) + "\n" for d in jgz)
    pq.write_table(pa.table({"text": pqt, "n": list(range(len(pqt)))}), root / "c.parquet", row_group_size=7)
    return root, txt + jl + jgz + pqt


def cli_prepare(cli, *args: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    return cli("prepare", *args)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def bpe_dataset(sources: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mupt.data.prepare import PrepareSettings, prepare

    root, _ = sources
    out = tmp_path_factory.mktemp("ds") / "bpe"
    srcs = [str(root / "txt"), str(root / "a.jsonl"), str(root / "b.jsonl.gz"), str(root / "c.parquet")]
    prepare(PrepareSettings(sources=srcs, out=out, train_vocab=2048, val_fraction=0.1))
    return out


def split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(tokens == eos)
    assert len(ends) and ends[-1] == len(tokens) - 1, "every document ends with EOS"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e].tolist() for s, e in zip(starts, ends, strict=True)]


def test_text_jsonl_parquet_with_trained_bpe_round_trip(bpe_dataset: Path, sources: tuple[Path, list[str]]) -> None:
    _, docs = sources
    meta = json.loads((bpe_dataset / "meta.json").read_text())
    assert meta["vocab_size"] == 2048 and meta["dtype"] == "uint16"
    tok = Tokenizer.from_file(str(bpe_dataset / "tokenizer.json"))  # the tokenizers library reads it back
    assert tok.get_vocab_size() == 2048 and tok.token_to_id("<|endoftext|>") == meta["eos_id"]
    # independent split reference: every 10th document (i = 9, 19, ...) is validation
    want = {
        "train": [d for i, d in enumerate(docs) if i % 10 != 9],
        "val": [d for i, d in enumerate(docs) if i % 10 == 9],
    }
    for split in ("train", "val"):
        s = meta["splits"][split]
        shards = [bpe_dataset / sh["file"] for sh in s["shards"]]
        tokens = np.concatenate([np.fromfile(f, dtype="<u2") for f in shards])
        assert all(f.stat().st_size % 2 == 0 for f in shards)
        got = [tok.decode(ids, skip_special_tokens=False) for ids in split_docs(tokens, meta["eos_id"])]
        assert got == want[split]  # exact text back, in source order
        assert s["documents"] == len(want[split]) and s["tokens"] == len(tokens)
        assert s["bytes"] == sum(len(d.encode("utf-8")) for d in want[split])
        assert int(tokens.max()) < 2048
    assert [Path(x["path"]).suffix for x in meta["sources"]][-3:] == [".jsonl", ".gz", ".parquet"]
    for x in meta["sources"]:
        assert x["bytes"] == Path(x["path"]).stat().st_size and len(x["sha256"]) == 64


def test_dataset_batches_are_memmapped_deterministic_and_rank_sliced(bpe_dataset: Path) -> None:
    data = load_data(DataConfig(source=str(bpe_dataset)))
    assert data.vocab_size == 2048 and data.bytes_per_token is not None and 2 < data.bytes_per_token < 6
    x1, y1 = data.train_batch(step=5, batch_size=8, seq_len=32, seed=3)
    x2, _ = data.train_batch(step=5, batch_size=8, seq_len=32, seed=3)
    assert x1.dtype == torch.int64 and torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(x1, data.train_batch(step=6, batch_size=8, seq_len=32, seed=3)[0])
    parts = [data.train_batch(5, 8, 32, 3, rank=r, world=2)[0] for r in range(2)]
    assert torch.equal(torch.stack(parts, 1).reshape(8, 32), x1)
    # a window equals the raw shard bytes at its start (independent read with np.fromfile)
    flat = np.fromfile(bpe_dataset / "train-00000.bin", dtype="<u2")
    row = x1[0].numpy()
    hits = [i for i in np.flatnonzero(flat == row[0]) if np.array_equal(flat[i : i + 32], row)]
    assert hits
    cfg = fit_vocab(RunConfig(data=DataConfig(source=str(bpe_dataset))))
    assert cfg.model.vocab_size == 2048
    val = json.loads((bpe_dataset / "meta.json").read_text())["splits"]["val"]
    assert bytes_per_token(cfg.data) == data.bytes_per_token == val["bytes"] / val["tokens"]


def test_windows_span_shards(sources: tuple[Path, list[str]], tmp_path: Path) -> None:
    from mupt.data.prepare import PrepareSettings, prepare

    root, _ = sources
    res = prepare(PrepareSettings(sources=[str(root / "a.jsonl")], out=tmp_path / "d", shard_bytes=20_000))
    shards = res.meta["splits"]["train"]["shards"]
    assert len(shards) > 3 and res.meta["vocab_size"] == 256
    flat = np.concatenate([np.fromfile(tmp_path / "d" / s["file"], dtype="<u2") for s in shards])
    data = open_dataset(tmp_path / "d")
    first = int(shards[0]["tokens"])
    assert np.array_equal(data.train.window(first - 5, 10), flat[first - 5 : first + 5])


def test_trained_vocab_pads_to_multiple_of_8_and_config_mismatch_is_an_error(
    sources: tuple[Path, list[str]], tmp_path: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    root, _ = sources
    code, out, err = cli("prepare", str(root / "a.jsonl"), "--train-tokenizer", "300", "--out", str(tmp_path / "d"))
    assert code == 0, err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and "dataset ready" in out
    cfg = fit_vocab(RunConfig(data=DataConfig(source=str(tmp_path / "d"))))
    assert cfg.model.vocab_size == 304 == math.ceil(300 / 8) * 8
    (tmp_path / "c.yaml").write_text("model: {vocab_size: 256}\n")
    code, _, err = cli("train", "--config", str(tmp_path / "c.yaml"), "--data", str(tmp_path / "d"), "--steps", "1")
    assert code == 2 and "256" in err and "304" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="256.*300"):
        from mupt.train import Trainer

        Trainer(RunConfig(data=DataConfig(source=str(tmp_path / "d"))))


def test_kill_9_then_rerun_is_byte_identical(
    sources: tuple[Path, list[str]], bpe_dataset: Path, tmp_path: Path
) -> None:
    root, docs = sources
    big = tmp_path / "big.jsonl"
    with big.open("w") as fh:
        for rep in range(4):
            fh.writelines(json.dumps({"text": f"{rep} {d}"}) + "\n" for d in docs)
    args = [str(big), "--tokenizer", str(bpe_dataset / "tokenizer.json"), "--shard-mb", "0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mupt", "prepare"]
    ref = subprocess.run([*cmd, *args, "--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, *args, "--workers", "2", "--out", str(killed)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("train-*.bin"))) < 3 and proc.poll() is None:
        time.sleep(0.005)
    for pid in [proc.pid, *descendants(proc.pid)]:  # the prepare and its tokenizer worker processes
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "meta.json").exists(), "the prepare finished before the kill; the test proved nothing"
    done = len(list(killed.glob("train-*.bin")))
    rerun = subprocess.run([*cmd, *args, "--out", str(killed)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"reused {done}" in rerun.stdout.replace("\n", " ")
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == sorted(p.name for p in killed.iterdir())  # no temp or plan file left behind
    for n in names:
        assert (tmp_path / "ref" / n).read_bytes() == (killed / n).read_bytes(), n


def test_token_files_bin_and_npy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, 5000).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    ids[:800].tofile(tmp_path / "val.bin")
    data = load_data(DataConfig(source=str(tmp_path / "train.bin"), vocab_size=1000))
    assert len(data.train) == 5000 and len(data.val) == 800  # type: ignore[attr-defined]
    assert (
        fit_vocab(RunConfig(data=DataConfig(source=str(tmp_path / "train.bin"), vocab_size=1000))).model.vocab_size
        == 1000
    )
    np.save(tmp_path / "t.npy", ids.astype(np.int32))
    npy = load_data(DataConfig(source=str(tmp_path / "t.npy"), vocab_size=1000, val_fraction=0.2))
    assert len(npy.val) == 1000  # type: ignore[attr-defined]
    x, _ = npy.train_batch(0, 2, 16, 0)
    assert x.max() < 1000
    with pytest.raises(DataError, match="needs --vocab-size"):
        load_data(DataConfig(source=str(tmp_path / "train.bin")))
    bad = ids.copy()
    bad[1234] = 1000
    bad.tofile(tmp_path / "bad.bin")
    with pytest.raises(DataError, match="token id 1000 at position 1234"):
        load_data(DataConfig(source=str(tmp_path / "bad.bin"), vocab_size=1000))


def one_line(result: tuple[int, str, str], *needles: str) -> None:
    code, _, err = result
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_inputs_one_line_exit_2_nothing_left(
    sources: tuple[Path, list[str]], bpe_dataset: Path, tmp_path: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    root, _ = sources
    out = tmp_path / "out"
    one_line(cli("prepare", "--out", str(out)), "no sources")
    (tmp_path / "empty.txt").write_text("")
    one_line(cli("prepare", str(tmp_path / "empty.txt"), "--out", str(out)), "empty file")
    lines = tmp_path / "l.jsonl"
    lines.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    one_line(cli("prepare", str(lines), "--out", str(out)), "l.jsonl line 2", "text")
    lines.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": broken\n')
    one_line(cli("prepare", str(lines), "--out", str(out)), "l.jsonl line 3", "invalid JSON")
    one_line(cli("prepare", str(root / "c.parquet"), "--text-field", "body", "--out", str(out)), "no column 'body'")
    (tmp_path / "tok.json").write_text('{"model": {"type": "BPE", "vocab": ')
    one_line(cli("prepare", str(lines), "--tokenizer", str(tmp_path / "tok.json"), "--out", str(out)), "tokenizer.json")
    assert not out.exists()  # no half-written output after any of them
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.md").write_text("mine")
    one_line(cli("prepare", str(root / "a.jsonl"), "--out", str(tmp_path / "stuff")), "not empty")
    assert [p.name for p in (tmp_path / "stuff").iterdir()] == ["notes.md"]
    # datasets that cannot be read
    ds = tmp_path / "ds"
    assert cli("prepare", str(root / "a.jsonl"), "--out", str(ds))[0] == 0
    train = ds / "train-00000.bin"
    raw = train.read_bytes()
    train.write_bytes(raw[:-2])
    one_line(cli("train", "--data", str(ds), "--steps", "1"), "train-00000.bin", "truncated")
    # same size, but every 100th id outside the vocabulary (damaged after prepare): one line, not the embedding's
    # IndexError traceback
    meta = json.loads((ds / "meta.json").read_text())
    ids = np.frombuffer(raw, dtype=np.dtype(meta["dtype"]).newbyteorder("<")).copy()
    ids[::100] = np.iinfo(ids.dtype).max
    assert ids.max() >= meta["vocab_size"]
    train.write_bytes(ids.tobytes())
    one_line(
        cli("train", "--data", str(ds), "--steps", "1", "--run-dir", str(tmp_path / "oov")),
        f"token id {np.iinfo(ids.dtype).max} at train token", "outside the vocabulary", "mupt prepare",
    )  # fmt: skip
    train.write_bytes(raw)
    (ds / "meta.json").unlink()
    one_line(cli("train", "--data", str(ds), "--steps", "1"), "no meta.json")


def test_files_of_unread_kinds_in_a_directory_are_counted_and_named(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """Extensionless texts in a source directory are not read: the CLI warns with their number, names and the fix;
    hidden files (.git/) are not listed; the data module returns the list, the summary line counts them."""
    from mupt.data.prepare import PrepareSettings, prepare

    corpus = tmp_path / "corpus"
    (corpus / "licenses").mkdir(parents=True)
    (corpus / ".git").mkdir()
    (corpus / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    docs = topics()[:8]
    for i, d in enumerate(docs):
        (corpus / f"doc{i}.txt").write_text(d, encoding="utf-8")
    for i in range(5):
        (corpus / "licenses" / f"LICENSE-{i}").write_text(f"license {i}: permission is hereby granted")
    code, out, err = cli("prepare", str(corpus), "--val-fraction", "0.2", "--out", str(tmp_path / "ds"))
    assert code == 0, err
    warning = " ".join(err.split())
    assert "warning: skipped 5 files" in warning and "only .txt, .jsonl, .jsonl.gz and .parquet are read" in warning
    assert str(corpus / "licenses" / "LICENSE-0") in warning and "and 2 more" in warning and ".git" not in warning
    assert "8 sources (5 files skipped)" in " ".join(out.split())
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert len(meta["sources"]) == 8 and meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 8
    # the data module returns the list (a rerun: already prepared, still the same list), and prints nothing
    again = prepare(PrepareSettings(sources=[str(corpus)], out=tmp_path / "ds", val_fraction=0.2))
    assert again.already_done and again.skipped == [str(corpus / "licenses" / f"LICENSE-{i}") for i in range(5)]
    # alone, such a directory is an error (one line, exit 2), as before
    one_line(cli("prepare", str(corpus / "licenses"), "--out", str(tmp_path / "ds2")), "holds no .txt")


def scale_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), COLUMNS="200")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc's parent ids)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def logged_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_check_coord_on_a_dataset(bpe_dataset: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """SP on the prepared dataset: one global Adam LR makes the block update grow with fan-in from the first
    step (about +0.6 in log2-log2 at 16..128, section 4 of docs/width_rules.md), so the gate must fail."""
    code, out, err = cli(
        "check", "coord", "--data", str(bpe_dataset), "--widths", "16,128", "--seeds", "1", "--steps", "1",
        "--layers", "1", "--scheme", "sp", "--out", str(tmp_path / "c"),
    )  # fmt: skip
    assert code == 1, out + err  # the FAIL verdict, not a usage error
    report = json.loads((tmp_path / "c" / "coord.json").read_text())
    assert str(bpe_dataset) in json.dumps(report) and report["passed"] is False
    rows = {r["key"]: r for r in report["rows"]}
    rms = rows["0.dout"]["rms"]  # independent of the fitted slope: the raw RMS grew by > 2^1.2 over 8x width
    assert math.log2(rms[1] / rms[0]) / 3 > 0.4 and not rows["0.dout"]["flat"], rms


def test_check_transfer_on_a_dataset(bpe_dataset: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """Every point trains on the prepared dataset; at LRs 2^8..2^10 every width diverges (read from the raw
    points, independent of the gate), so no width has an optimum and the verdict must be FAIL (exit 1)."""
    code, out, err = cli(
        "check", "transfer", "--data", str(bpe_dataset), "--widths", "16,32,128", "--lrs", "2^8,2^9,2^10",
        "--seeds", "1", "--steps", "2", "--layers", "1", "--batch-size", "2", "--seq-len", "16", "--workers", "1",
        "--out", str(tmp_path / "t"),
    )  # fmt: skip
    points = pd.read_csv(tmp_path / "t" / "points.csv")
    assert len(points) == 9 and set(points["status"]) == {"diverged"}, points
    assert code == 1, out + err  # the FAIL verdict, not a usage error (2)
    report = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert str(bpe_dataset) in json.dumps(report) and report["passed"] is False


def test_rank_slices_are_disjoint_and_cover_the_global_batch(bpe_dataset: Path) -> None:
    data = open_dataset(bpe_dataset)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        whole = data.train_batch(step, 8, 16, seed=1)[0]
        parts = [data.train_batch(step, 8, 16, seed=1, rank=r, world=2)[0] for r in range(2)]
        assert torch.equal(torch.cat(parts), torch.cat([whole[0::2], whole[1::2]]))
        assert not torch.equal(parts[0], parts[1])
    del g


def test_tune_transfer_scale_on_a_dataset(
    bpe_dataset: Path, sources: tuple[Path, list[str]], tmp_path: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    """tune (2 trials) -> transfer -> scale on 2 gloo processes, kill -9, rerun: exact resume, all on a BPE dataset."""
    import hashlib

    from mupt import launch
    from mupt.config import BestParams, Recipe, load_yaml, save_yaml, to_dict

    ds = str(bpe_dataset)
    runs = tmp_path / "runs"
    code, out, err = cli(
        "tune", "--data", ds, "--width", "16", "--layers", "1", "--d-state", "4", "--steps", "4", "--batch-size", "4",
        "--seq-len", "32", "--eval-every", "4", "--sampler", "grid", "--lr-range", "0.001,0.004", "--pruner", "none",
        "--trials", "2", "--study", "ds", "--runs-dir", str(runs),
    )  # fmt: skip
    assert code == 0, err
    assert "best val bits/byte" in out
    best = load_yaml(runs / "ds" / "best.yaml", BestParams)
    meta = json.loads((bpe_dataset / "meta.json").read_text())
    tok_sha = hashlib.sha256((bpe_dataset / "tokenizer.json").read_bytes()).hexdigest()
    assert best.dataset["tokenizer_sha256"] == tok_sha and best.dataset["vocab_size"] == 2048
    assert best.dataset["tokens"] == meta["splits"]["train"]["tokens"] and best.config.model.vocab_size == 2048

    recipe_path = tmp_path / "r.yaml"
    code, _, err = cli(
        "transfer", "--from", str(runs / "ds" / "best.yaml"), "--to-width", "32", "--out", str(recipe_path)
    )
    assert code == 0, err
    recipe = load_yaml(recipe_path, Recipe)
    assert recipe.dataset == best.dataset and recipe.run.data.source == ds and recipe.run.model.vocab_size == 2048

    # another tokenizer is refused (one line naming both); another corpus with the same tokenizer is a warning
    root, _ = sources
    code, _, err = cli("prepare", str(root / "a.jsonl"), "--out", str(tmp_path / "bytes"))
    assert code == 0, err
    code, _, err = cli("transfer", "--from", str(runs / "ds" / "best.yaml"), "--to-width", "32", "--to-data",
                       str(tmp_path / "bytes"), "--out", str(tmp_path / "no.yaml"))  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and tok_sha[:12] in err and "bytes" in err, err
    assert not (tmp_path / "no.yaml").exists()
    code, _, err = cli("prepare", str(root / "b.jsonl.gz"), "--tokenizer", str(bpe_dataset), "--out",
                       str(tmp_path / "other"))  # fmt: skip
    assert code == 0, err
    code, _, err = cli("transfer", "--from", str(runs / "ds" / "best.yaml"), "--to-width", "32", "--to-data",
                       str(tmp_path / "other"), "--out", str(tmp_path / "other.yaml"))  # fmt: skip
    assert code == 0 and "different corpus" in err, err
    code, _, err = cli("scale", str(recipe_path), "--data", str(tmp_path / "bytes"), "--steps", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and tok_sha[:12] in err, err
    unrecorded = to_dict(recipe)
    unrecorded["dataset"] = {}  # a recipe without a dataset record: the model's vocab still has to match
    unrecorded["launch"]["run_dir"] = str(tmp_path / "never")
    save_yaml(tmp_path / "unrecorded.yaml", Recipe.model_validate(unrecorded))
    code, _, err = cli("scale", str(tmp_path / "unrecorded.yaml"), "--data", str(tmp_path / "bytes"), "--steps", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "2048" in err and "256" in err, err

    # scale: a 1-process reference, then 2 gloo processes killed with SIGKILL and rerun
    data = to_dict(recipe)
    data["run"]["train"].update(steps=60, eval_every=1000)
    data["launch"].update(run_dir=str(tmp_path / "ref-run"), log_every=1, ckpt_every=5)
    save_yaml(tmp_path / "ref.yaml", Recipe.model_validate(data))
    torch.set_num_threads(1)
    launch.run(load_recipe(tmp_path / "ref.yaml"))
    reference = logged_losses(tmp_path / "ref-run")
    data["launch"]["run_dir"] = str(tmp_path / "two-run")
    save_yaml(tmp_path / "two.yaml", Recipe.model_validate(data))
    run_dir = tmp_path / "two-run"
    cmd = [sys.executable, "-m", "mupt", "scale", str(tmp_path / "two.yaml"), "--nproc", "2"]
    proc = subprocess.Popen(cmd, env=scale_env(), stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            latest = launch.find_latest(run_dir) if run_dir.exists() else None
            if latest is not None:
                break
            time.sleep(0.01)
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and both workers (they have their own groups)
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill; the test proved nothing"
    killed_at = launch.find_latest(run_dir)
    assert killed_at is not None
    rerun = subprocess.run(cmd, env=scale_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world"] == 2 and summary["start_step"] == int(killed_at.name.split("_")[1]) >= 5
    after = logged_losses(run_dir)
    assert sorted(after) == list(range(1, 61))
    for step, loss in reference.items():  # 2 ranks x half batch == the 1-process global batch, step for step
        assert after[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step


def test_small_validation_split_of_a_dataset_is_read_once(bpe_dataset: Path) -> None:
    """The last evaluation on a prepared dataset whose validation split is smaller than the request reads
    each of its tokens once (non-overlapping windows from its start, compared with the val shards' tokens)."""
    from mupt.config import with_overrides
    from mupt.train import Trainer

    meta = json.loads((bpe_dataset / "meta.json").read_text())
    val = np.concatenate([np.fromfile(p, dtype=meta["dtype"]) for p in sorted(bpe_dataset.glob("val-*.bin"))])
    seq = 16
    cfg = with_overrides(RunConfig(), {
        "data.source": str(bpe_dataset), "model.vocab_size": 2048, "model.d_model": 32, "model.n_layers": 1,
        "model.d_state": 8,
        "train.batch_size": 4, "train.seq_len": seq, "train.steps": 1000, "train.final_eval_tokens": 100 * len(val),
    })  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.data.val_tokens == len(val) and 4 * seq * 1000 > len(val)  # the request exceeds the split
    xs = torch.cat([x for x, _ in trainer.final_val_set]).numpy()
    windows = (len(val) - 1) // seq
    assert xs.shape == (windows, seq)
    assert np.array_equal(xs.reshape(-1), val[: windows * seq])
    assert trainer.evaluate_final()[2] == windows * seq <= len(val)
