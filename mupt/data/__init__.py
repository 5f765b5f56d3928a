"""Corpora and batching: the builtin offline corpus, local text, tokenized datasets, a synthetic task.

* ``builtin``: byte-level (vocab 256) English text from CPython's own ``pydoc_data.topics``
  (the standard library's documentation topics, ~465K characters); no download.
* a directory holding ``meta.json``: a tokenized dataset written by ``mupt prepare``
  (:mod:`mupt.data.prepare`), memory-mapped (:mod:`mupt.data.dataset`).
* a ``.bin`` / ``.npy`` token file (nanoGPT style) with ``vocab_size`` given.
* a path: a UTF-8 ``.txt`` file, or a directory searched recursively for ``*.txt``.
* ``recall``: associative recall (key/value pairs, then queries; loss only on the answers).

Batches are contiguous windows whose start offsets depend only on (seed, step, rank), so the
same seed gives the same data order, a resumed run sees exactly the batches it would have
seen, and every width in a sweep trains on the same tokens.  Validation windows are fixed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from mupt.config import DataConfig, RunConfig
from mupt.errors import ConfigError, DataError

IGNORE_INDEX = -100
VAL_SEED = 0x5EED


class TokenSource(Protocol):
    vocab_size: int
    name: str
    bytes_per_token: float | None  # for bits-per-byte; None when tokens are not bytes

    def train_batch(
        self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1
    ) -> tuple[Tensor, Tensor]: ...

    @property
    def val_tokens(self) -> int | None:
        """Tokens in the validation split; None when validation windows are drawn fresh (a synthetic task)."""
        ...

    def val_batches(
        self, n: int, batch_size: int, seq_len: int, tiled: bool = False
    ) -> list[tuple[Tensor, Tensor]]: ...


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """The generator that draws the windows of ``step``: a pure function of (seed, step, salt)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))
    return g


def train_starts(n_tokens: int, seq_len: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Start offsets ``(batch_size,)`` of the global batch of ``step`` in a split of ``n_tokens``.

    Each window holds ``seq_len + 1`` tokens (inputs and shifted targets); rank r of w takes
    ``starts[r::w]``.  One definition for every windowed source, so the data order is the same
    function of (seed, step, rank) for bytes in memory and memory-mapped token shards.
    """
    return torch.randint(0, n_tokens - seq_len - 1, (batch_size,), generator=step_generator(seed, step))


def val_starts(n_tokens: int, seq_len: int, n: int, batch_size: int, tiled: bool = False) -> list[Tensor]:
    """Start offsets of the fixed validation batches (the same in every run), one ``(rows,)`` tensor per batch.

    Default: ``n`` batches of ``batch_size`` windows at random offsets (drawn with replacement; for splits
    much longer than ``n * batch_size * seq_len``).  ``tiled``: non-overlapping windows from the split's
    start, ``k * seq_len`` for k < min(n * batch_size, :func:`val_windows`), in batches of ``batch_size``
    (the last may be smaller): no token is read twice, so a split smaller than the request is read once,
    whole, and the count of tokens evaluated is the count of distinct tokens.
    """
    if not tiled:
        return list(torch.randint(0, n_tokens - seq_len - 1, (n, batch_size), generator=step_generator(VAL_SEED, 0)))
    windows = min(n * batch_size, val_windows(n_tokens, seq_len))
    return list((torch.arange(windows) * seq_len).split(batch_size))


def val_windows(n_tokens: int, seq_len: int) -> int:
    """Non-overlapping windows of ``seq_len`` targets a split of ``n_tokens`` holds: ``(n_tokens - 1) // seq_len``
    (window k reads tokens ``[k * seq_len, (k + 1) * seq_len]``: inputs and their shifted targets)."""
    return max(0, (n_tokens - 1) // seq_len)


class TextCorpus:
    """Byte tokens with a deterministic train/validation split (the tail is validation)."""

    vocab_size = 256
    bytes_per_token: float | None = 1.0

    def __init__(self, data: bytes, name: str, val_fraction: float = 0.1) -> None:
        self.name = name
        self.sha256 = hashlib.sha256(data).hexdigest()
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        n_val = int(len(tokens) * val_fraction)
        self.train = tokens[: len(tokens) - n_val]
        self.val = tokens[len(tokens) - n_val :]

    def identity(self) -> dict[str, Any]:
        """Bytes tokenizer, vocab 256, train token count, sha256 of the text (see :func:`identity_of`)."""
        from mupt.data.dataset import BYTES_TOKENIZER_SHA256

        return {
            "name": Path(self.name).name,
            "tokenizer": "bytes",
            "tokenizer_sha256": BYTES_TOKENIZER_SHA256,
            "vocab_size": 256,
            "tokens": len(self.train),
            "corpus_sha256": self.sha256,
        }

    def _check(self, split: Tensor, seq_len: int, which: str) -> None:
        if len(split) < seq_len + 2:
            raise DataError(
                f"{self.name}: the {which} split has {len(split)} bytes, fewer than seq_len+2={seq_len + 2}; "
                "use more text or a shorter --seq-len"
            )

    @staticmethod
    def _windows(split: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        chunk = split[idx].long()
        return chunk[:, :-1], chunk[:, 1:]

    def train_batch(
        self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1
    ) -> tuple[Tensor, Tensor]:
        """The rank's slice of the global batch for ``step`` (global batch = batch_size)."""
        self._check(self.train, seq_len, "train")
        starts = train_starts(len(self.train), seq_len, batch_size, seed, step)
        return self._windows(self.train, starts[rank::world], seq_len)

    @property
    def val_tokens(self) -> int:
        """Bytes (= tokens) in the validation split."""
        return len(self.val)

    def val_batches(self, n: int, batch_size: int, seq_len: int, tiled: bool = False) -> list[tuple[Tensor, Tensor]]:
        """The fixed validation batches, int64 ``(rows, seq_len)`` x and y (:func:`val_starts`)."""
        self._check(self.val, seq_len, "validation")
        starts = val_starts(len(self.val), seq_len, n, batch_size, tiled)
        return [self._windows(self.val, s, seq_len) for s in starts]


class RecallTask:
    """Associative recall: ``k1 v1 ... kP vP`` then ``q v`` pairs; loss on the answers only.

    Keys come from tokens [0, 128), values from [128, 256); keys are distinct per sequence.
    """

    vocab_size = 256
    bytes_per_token: float | None = None
    name = "recall"

    def __init__(self, pairs: int = 8) -> None:
        if pairs > 128:
            raise DataError(f"recall_pairs={pairs} exceeds the 128 distinct keys; use at most 128")
        self.pairs = pairs

    def identity(self) -> dict[str, Any]:
        """A synthetic task: no tokenizer file, no corpus hash."""
        return {"name": f"recall-{self.pairs}", "tokenizer": "recall", "tokenizer_sha256": None,
                "vocab_size": 256, "tokens": None, "corpus_sha256": None}  # fmt: skip

    def _make(self, g: torch.Generator, batch_size: int, seq_len: int) -> tuple[Tensor, Tensor]:
        p = self.pairs
        if seq_len < 2 * p + 2:
            raise DataError(f"recall with {p} pairs needs seq_len >= {2 * p + 2}; got {seq_len}")
        keys = torch.argsort(torch.rand(batch_size, 128, generator=g), dim=1)[:, :p]
        vals = torch.randint(128, 256, (batch_size, p), generator=g)
        n_q = math.ceil((seq_len + 1 - 2 * p) / 2)
        q_idx = torch.randint(0, p, (batch_size, n_q), generator=g)
        ctx = torch.stack([keys, vals], dim=2).reshape(batch_size, 2 * p)
        qs = torch.stack([keys.gather(1, q_idx), vals.gather(1, q_idx)], dim=2).reshape(batch_size, 2 * n_q)
        seq = torch.cat([ctx, qs], dim=1)[:, : seq_len + 1]
        x, y = seq[:, :-1], seq[:, 1:].clone()
        pos = torch.arange(seq_len)
        is_answer = (pos >= 2 * p) & ((pos - 2 * p) % 2 == 0)  # x[pos] is a query key, y[pos] its value
        y[:, ~is_answer] = IGNORE_INDEX
        return x, y

    def train_batch(
        self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1
    ) -> tuple[Tensor, Tensor]:
        x, y = self._make(step_generator(seed, step, salt=1), batch_size, seq_len)
        return x[rank::world], y[rank::world]

    #: Every validation sequence is drawn fresh from the task: no finite split.
    val_tokens: int | None = None

    def val_batches(self, n: int, batch_size: int, seq_len: int, tiled: bool = False) -> list[tuple[Tensor, Tensor]]:
        """``n`` fixed batches of fresh sequences (``tiled`` changes nothing: no sequence is read twice anyway)."""
        g = step_generator(VAL_SEED, 0, salt=1)
        return [self._make(g, batch_size, seq_len) for _ in range(n)]


def builtin_text() -> bytes:
    """CPython's pydoc topics, joined in key order: deterministic on a given Python version."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def _read_text_path(path: Path, flag: str = "--data") -> bytes:
    if not path.exists():
        raise DataError(
            f"{flag} {path}: no such file or directory; pass a dataset directory written by `mupt prepare`, "
            "a .bin/.npy token file, a .txt file or a directory of .txt files (or builtin)"
        )
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{flag} {path}: the directory holds no .txt files; add some or pass a file")
    parts = []
    for f in files:
        try:
            parts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{flag} {f}: not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
        except OSError as err:
            raise DataError(f"{flag} {f}: cannot read ({err.strerror}); check permissions") from None
    if not any(p.strip() for p in parts):
        what = "is empty" if path.is_file() else "holds only empty .txt files"
        raise DataError(f"{flag} {path}: {what}; pass a text file with at least a few KB of text")
    return "\n\n".join(parts).encode("utf-8")


def load_data(cfg: DataConfig, flag: str = "--data") -> TokenSource:
    """The token source ``cfg.source`` names (see the module docstring); raises DataError.

    ``flag`` is the command-line flag that gave ``cfg.source`` (``--data``, or ``mupt transfer --to-data``): the
    one-line errors about the path name it, so the user is told which flag to fix.
    """
    if cfg.source == "builtin":
        return TextCorpus(builtin_text(), "builtin", cfg.val_fraction)
    if cfg.source == "recall":
        return RecallTask(cfg.recall_pairs)
    from mupt.data import dataset

    path = Path(cfg.source)
    if path.suffix in (".bin", ".npy"):
        return dataset.open_token_file(path, cfg.vocab_size, cfg.val_fraction, flag)
    if path.is_dir() and ((path / dataset.META).exists() or _looks_like_dataset(path)):
        return dataset.open_dataset(path)
    return TextCorpus(_read_text_path(path, flag), str(path), cfg.val_fraction)


def _looks_like_dataset(path: Path) -> bool:
    """A directory of shards or an unfinished prepare (so a missing meta.json is an error, not 'no .txt')."""
    from mupt.data.prepare import PLAN

    return (path / PLAN).exists() or any(path.glob("*.bin"))


def data_vocab(cfg: DataConfig, flag: str = "--data") -> int:
    """The vocabulary size of ``cfg``'s tokens without reading them (meta.json or ``vocab_size``); errors name
    ``flag`` (see :func:`load_data`)."""
    from mupt.data import dataset

    if cfg.source in ("builtin", "recall"):
        return 256
    path = Path(cfg.source)
    if path.suffix in (".bin", ".npy"):
        if cfg.vocab_size is None:
            raise DataError(f"{flag} {path}: a plain token file needs --vocab-size (the tokenizer's number of ids)")
        return cfg.vocab_size
    if path.is_dir() and ((path / dataset.META).exists() or _looks_like_dataset(path)):
        return int(dataset.read_meta(path)["vocab_size"])
    return 256


def bytes_per_token(cfg: DataConfig) -> float | None:
    """UTF-8 bytes per token of ``cfg``'s validation split without reading tokens; None when unknown.

    Bits per byte = (nats/token) / ln 2 / bytes_per_token.
    """
    from mupt.data import dataset

    if cfg.source == "recall":
        return None
    path = Path(cfg.source)
    if cfg.source == "builtin" or (path.suffix not in (".bin", ".npy") and not (path / dataset.META).exists()):
        return 1.0  # bytes as tokens
    if path.suffix in (".bin", ".npy"):
        return None
    val = dataset.read_meta(path)["splits"]["val"]
    return val["bytes"] / val["tokens"] if val.get("tokens") and val.get("bytes") else None


def bits_per_byte(nats: float | None, bytes_per_token: float | None) -> float | None:
    """(nats/token) -> bits/byte; None when either is unknown."""
    if nats is None or bytes_per_token is None:
        return None
    return nats / math.log(2) / bytes_per_token


def fit_vocab(cfg: RunConfig, explicit: bool = False, where: str = "config") -> RunConfig:
    """``cfg`` with model.vocab_size set from its data: the data's vocab rounded up to a multiple of 8.

    When ``explicit`` (the config file or recipe states model.vocab_size) a different value is a
    ConfigError naming both numbers.  Rule: mamba_ssm's pad_vocab_size_multiple = 8.
    """
    from mupt.data.dataset import padded_vocab

    vocab = data_vocab(cfg.data)
    want = padded_vocab(vocab)
    if cfg.model.vocab_size == want:
        return cfg
    if explicit:
        raise ConfigError(vocab_mismatch(cfg.model.vocab_size, vocab, where))
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": want})})


def vocab_mismatch(model_vocab: int, data_vocab: int, where: str) -> str:
    """The one-line message for a model vocab that disagrees with the data's."""
    from mupt.data.dataset import padded_vocab

    return (
        f"{where}: model.vocab_size {model_vocab} disagrees with the data's vocabulary {data_vocab} "
        f"(padded to a multiple of 8: {padded_vocab(data_vocab)}); remove model.vocab_size or set it to "
        f"{padded_vocab(data_vocab)}"
    )


def identity_of(source: TokenSource) -> dict[str, Any]:
    """What best.yaml and recipes record about a token source.

    Keys: ``name``, ``tokenizer`` (name), ``tokenizer_sha256``, ``vocab_size``, ``tokens`` (train
    split), ``corpus_sha256`` (None where unknown).
    """
    ident = getattr(source, "identity", None)
    if callable(ident):
        return dict(ident())
    return {"name": source.name, "tokenizer": None, "tokenizer_sha256": None, "vocab_size": source.vocab_size,
            "tokens": None, "corpus_sha256": None}  # fmt: skip


def compare_identity(proxy: Mapping[str, Any], target: Mapping[str, Any]) -> list[str]:
    """Refuse a target whose tokenizer differs from the proxy's; warn when the corpus differs.

    Returns the warnings (one line each); raises DataError naming both tokenizers.  Empty
    identities (records written before datasets existed) compare as unknown: no error.
    """
    if not proxy or not target:
        return []

    def tok(d: Mapping[str, Any]) -> str:
        sha = d.get("tokenizer_sha256")
        return f"{d.get('tokenizer')} (sha256 {sha[:12] if sha else '?'}, vocab {d.get('vocab_size')})"

    same_sha = proxy.get("tokenizer_sha256") == target.get("tokenizer_sha256")
    known = proxy.get("tokenizer_sha256") is not None and target.get("tokenizer_sha256") is not None
    if (known and not same_sha) or proxy.get("vocab_size") != target.get("vocab_size"):
        raise DataError(
            f"target data {target.get('name')} uses tokenizer {tok(target)} but the proxy trained with "
            f"{tok(proxy)}; prepare the target with the proxy's tokenizer (mupt prepare --tokenizer PATH)"
        )
    if proxy.get("corpus_sha256") != target.get("corpus_sha256"):
        return [
            f"the proxy trained on {proxy.get('name')} but the target trains on {target.get('name')} "
            "(a different corpus): the transferred optimum assumes similar data"
        ]
    return []
