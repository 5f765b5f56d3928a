from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mupt.config import DataConfig
from mupt.data import IGNORE_INDEX, RecallTask, TextCorpus, builtin_text, data_vocab, load_data
from mupt.errors import DataError


def test_builtin_corpus_is_offline_english_and_split_deterministically() -> None:
    text = builtin_text()
    assert len(text) > 400_000
    assert b"the" in text[:10_000]
    a, b = load_data(DataConfig()), load_data(DataConfig())
    assert isinstance(a, TextCorpus)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert len(a.val) == int(len(text) * 0.1)


def test_batches_are_deterministic_contiguous_and_rank_sliced() -> None:
    data = load_data(DataConfig())
    x1, y1 = data.train_batch(step=5, batch_size=8, seq_len=32, seed=3)
    x2, y2 = data.train_batch(step=5, batch_size=8, seq_len=32, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # contiguous windows shifted by one
    x3, _ = data.train_batch(step=6, batch_size=8, seq_len=32, seed=3)
    x4, _ = data.train_batch(step=5, batch_size=8, seq_len=32, seed=4)
    assert not torch.equal(x1, x3) and not torch.equal(x1, x4)
    parts = [data.train_batch(5, 8, 32, 3, rank=r, world=2)[0] for r in range(2)]
    assert torch.equal(torch.stack([parts[0], parts[1]], 1).reshape(8, 32), x1)
    v1, v2 = data.val_batches(3, 4, 16), data.val_batches(3, 4, 16)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2, strict=True))


def test_text_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world " * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file " * 100)
    (tmp_path / "skip.md").write_text("ignored")
    one = load_data(DataConfig(source=str(tmp_path / "a.txt")))
    both = load_data(DataConfig(source=str(tmp_path)))
    assert len(both.train) + len(both.val) > len(one.train) + len(one.val)  # type: ignore[attr-defined]
    x, _ = both.train_batch(0, 2, 16, 0)
    assert x.shape == (2, 16) and x.max() < 256


def test_bad_data_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_data(DataConfig(source=str(tmp_path / "missing.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        load_data(DataConfig(source=str(tmp_path / "empty")))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe not utf8")
    with pytest.raises(DataError, match="not UTF-8"):
        load_data(DataConfig(source=str(bad)))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(DataError, match="seq_len"):
        load_data(DataConfig(source=str(short))).train_batch(0, 2, 64, 0)


def test_data_errors_name_the_flag_that_gave_the_path(tmp_path: Path) -> None:
    """Every one-line error about a data path names the flag the caller passes (mupt transfer: --to-data), for
    each kind of source: missing path, empty directory, bad text, token files without a vocab, truncated,
    with ids outside the vocab, or not .npy."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe not utf8")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")  # 3 bytes: not whole uint16 tokens
    np.array([1, 2, 300], dtype=np.uint16).tofile(tmp_path / "big.bin")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    cases = [
        (DataConfig(source=str(tmp_path / "missing")), "no such file"),
        (DataConfig(source=str(tmp_path / "empty")), "no .txt files"),
        (DataConfig(source=str(tmp_path / "bad.txt")), "not UTF-8"),
        (DataConfig(source=str(tmp_path / "big.bin")), "needs --vocab-size"),
        (DataConfig(source=str(tmp_path / "odd.bin"), vocab_size=256), "not a whole number"),
        (DataConfig(source=str(tmp_path / "big.bin"), vocab_size=256), "token id 300 at position 2"),
        (DataConfig(source=str(tmp_path / "junk.npy"), vocab_size=256), "not a readable .npy"),
    ]
    for cfg, msg in cases:
        for flag in ("--data", "--to-data"):
            with pytest.raises(DataError) as info:
                load_data(cfg, flag)
            text = str(info.value)
            assert text.startswith(f"{flag} {tmp_path}") and msg in text and "\n" not in text, (flag, text)
        with pytest.raises(DataError, match="^--data "):
            load_data(cfg)  # the default flag
    with pytest.raises(DataError, match="^--to-data .*needs --vocab-size"):
        data_vocab(DataConfig(source=str(tmp_path / "big.bin")), "--to-data")


def test_recall_targets_are_the_queried_values() -> None:
    task = RecallTask(pairs=4)
    x, y = task.train_batch(0, batch_size=16, seq_len=20, seed=0)
    assert x.shape == y.shape == (16, 20)
    for b in range(16):
        table = {int(x[b, 2 * i]): int(x[b, 2 * i + 1]) for i in range(4)}
        answers = (y[b] != IGNORE_INDEX).nonzero().flatten()
        assert len(answers) > 0
        for pos in answers.tolist():
            assert int(y[b, pos]) == table[int(x[b, pos])]
    with pytest.raises(DataError, match="seq_len"):
        task.train_batch(0, 2, 6, 0)
