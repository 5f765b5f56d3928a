"""Token datasets on disk, read through numpy memory maps.

Two layouts are read:

* a **prepared dataset** directory written by ``mupt prepare`` (:mod:`mupt.data.prepare`):
  ``meta.json`` plus flat little-endian token shards ``train-00000.bin``, ``val-00000.bin``, ...
  (``uint16`` when the vocabulary fits in 65536 ids, else ``uint32``), and the tokenizer's
  ``tokenizer.json``;
* a **plain token file** (nanoGPT style): a ``.bin`` of ``uint16`` ids (``uint32`` when
  ``--vocab-size`` exceeds 65536) or a 1-D integer ``.npy``, with the vocabulary given by
  ``--vocab-size``.  ``train.bin`` next to a ``val.bin`` uses that file as the validation split;
  otherwise the tail ``val_fraction`` of the tokens is.

Memory does not depend on corpus size: the shards are memory-mapped and a batch touches only its
own windows.  Window starts are drawn exactly as for the in-memory corpora
(:func:`mupt.data.train_starts`, :func:`mupt.data.val_starts`), so batches are a pure function of
(seed, step, rank) and a resumed run sees the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mupt.errors import DataError

FORMAT = "mupt-dataset"
FORMAT_VERSION = 1
META = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
PAD_VOCAB_MULTIPLE = 8  # mamba_ssm's MambaConfig.pad_vocab_size_multiple
BYTES_TOKENIZER_SHA256 = hashlib.sha256(b"mupt bytes tokenizer: id = UTF-8 byte, EOS = 0").hexdigest()


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """``uint16`` when every id < ``vocab_size`` fits (vocab <= 65536), else ``uint32``."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def padded_vocab(vocab_size: int, multiple: int = PAD_VOCAB_MULTIPLE) -> int:
    """The model's vocab_size for a tokenizer of ``vocab_size`` ids: rounded up to a multiple of 8.

    Same rule as mamba_ssm's ``pad_vocab_size_multiple`` (mamba_ssm/models/mixer_seq_simple.py).
    """
    return math.ceil(vocab_size / multiple) * multiple


def map_tokens(path: Path, dtype: np.dtype[Any], offset: int = 0) -> tuple[np.ndarray, mmap.mmap | None]:
    """A read-only memory map of ``path`` viewed as ``dtype`` (from byte ``offset``), and the map itself."""
    if path.stat().st_size <= offset:
        return np.empty(0, dtype), None
    with path.open("rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)  # windows are random: no read-ahead of pages nobody asked for
    count = (len(mm) - offset) // dtype.itemsize
    return np.frombuffer(mm, dtype=dtype, count=count, offset=offset), mm


def first_outside(ids: np.ndarray, vocab_size: int) -> tuple[int, int] | None:
    """``(id, flat index)`` of the first occurrence of the out-of-range id found in ``ids`` (any shape): the
    largest id when it is ``>= vocab_size``, else the smallest when it is negative; None when every id is in
    ``[0, vocab_size)``.  One max and one min over ``ids``; the index search runs only on failure."""
    top, low = int(ids.max()), int(ids.min())
    if top < vocab_size and low >= 0:
        return None
    bad = top if top >= vocab_size else low
    return bad, int(np.argmax(ids.reshape(-1) == bad))


class TokenArray:
    """A read-only concatenation of 1-D token arrays (memory maps), addressed by global offset.

    ``maps`` (one per part, or None) are the memory maps behind the parts, used by
    :meth:`prefetch` to ask the kernel for pages ahead of use (``madvise(MADV_WILLNEED)``).
    """

    def __init__(self, parts: list[np.ndarray], maps: list[tuple[mmap.mmap, int] | None] | None = None) -> None:
        keep = [i for i, p in enumerate(parts) if len(p)]
        self.parts = [parts[i] for i in keep]
        self.maps = [maps[i] for i in keep] if maps is not None else [None] * len(self.parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def prefetch(self, start: int, n: int) -> None:
        """Start reading the pages of tokens ``[start, start + n)`` in the background (no effect on values)."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        end = start + n
        while i < len(self.parts) and int(self.starts[i]) < end:
            entry = self.maps[i]
            if entry is not None:
                mm, offset = entry
                item = self.parts[i].itemsize
                lo = offset + max(0, start - int(self.starts[i])) * item
                hi = offset + min(len(self.parts[i]), end - int(self.starts[i])) * item
                page = lo - lo % mmap.PAGESIZE
                mm.madvise(mmap.MADV_WILLNEED, page, hi - page)
            i += 1

    def window(self, start: int, n: int) -> np.ndarray:
        """Tokens ``[start, start + n)`` as int64 (a copy), possibly spanning several parts."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            part = self.parts[i]
            lo = start + filled - int(self.starts[i])
            take = min(n - filled, len(part) - lo)
            out[filled : filled + take] = part[lo : lo + take]
            filled += take
            i += 1
        return out


class MemmapTokens:
    """A :class:`~mupt.data.TokenSource` over memory-mapped train/validation token arrays."""

    def __init__(
        self,
        train: TokenArray,
        val: TokenArray,
        vocab_size: int,
        name: str,
        bytes_per_token: float | None,
        identity: dict[str, Any],
    ) -> None:
        self.train, self.val = train, val
        self.vocab_size = vocab_size
        self.name = name
        self.bytes_per_token = bytes_per_token
        self._identity = identity

    def identity(self) -> dict[str, Any]:
        """Tokenizer name and sha256, vocab, train token count and corpus sha256 (see :func:`identity_of`)."""
        return dict(self._identity)

    def _check(self, split: TokenArray, seq_len: int, which: str) -> None:
        if len(split) < seq_len + 2:
            raise DataError(
                f"{self.name}: the {which} split has {len(split)} tokens, fewer than seq_len+2={seq_len + 2}; "
                "use more data or a shorter --seq-len"
            )

    def _windows(self, split: TokenArray, starts: Tensor, seq_len: int, which: str) -> tuple[Tensor, Tensor]:
        """int64 ``(len(starts), seq_len)`` inputs and targets read at ``starts``.

        Raises DataError when a window holds an id outside the vocabulary (a shard damaged after prepare):
        the embedding would fail with an IndexError deep in the model.  Only the windows read are checked,
        at the cost of one max/min per batch; opening a dataset does not scan it."""
        windows = np.stack([split.window(int(s), seq_len + 1) for s in starts.tolist()])
        found = first_outside(windows, self.vocab_size)
        if found is not None:
            bad, at = found
            row, col = divmod(at, seq_len + 1)
            raise DataError(
                f"{self.name}: token id {bad} at {which} token {int(starts[row]) + col} is outside the vocabulary "
                f"({self.vocab_size}); the dataset is damaged: prepare it again (mupt prepare)"
            )
        chunk = torch.from_numpy(windows)
        return chunk[:, :-1], chunk[:, 1:]

    def train_batch(
        self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world: int = 1
    ) -> tuple[Tensor, Tensor]:
        """The rank's slice of the global batch for ``step``: int64 ``(batch_size // world, seq_len)`` x and y."""
        from mupt.data import train_starts

        self._check(self.train, seq_len, "train")
        starts = train_starts(len(self.train), seq_len, batch_size, seed, step)
        batch = self._windows(self.train, starts[rank::world], seq_len, "train")
        upcoming = train_starts(len(self.train), seq_len, batch_size, seed, step + 1)
        for s in upcoming[rank::world].tolist():  # the kernel reads the next step's pages while this one trains
            self.train.prefetch(int(s), seq_len + 1)
        return batch

    @property
    def val_tokens(self) -> int:
        """Tokens in the validation split."""
        return len(self.val)

    def val_batches(self, n: int, batch_size: int, seq_len: int, tiled: bool = False) -> list[tuple[Tensor, Tensor]]:
        """The fixed validation batches (same windows in every run; :func:`mupt.data.val_starts`)."""
        from mupt.data import val_starts

        self._check(self.val, seq_len, "validation")
        starts = val_starts(len(self.val), seq_len, n, batch_size, tiled)
        return [self._windows(self.val, s, seq_len, "validation") for s in starts]


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a prepared dataset; DataError when missing, corrupt or of another format."""
    meta_path = path / META
    if not meta_path.is_file():
        raise DataError(
            f"{path}: no {META}, so not a finished mupt dataset; create it with `mupt prepare SOURCES --out {path}` "
            "(rerun the same command to finish an interrupted one)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{meta_path}: not valid JSON; rerun mupt prepare into a new directory") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: not a {FORMAT} meta.json; rerun mupt prepare into a new directory")
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{meta_path}: dataset format version {meta.get('version')}, this mupt reads {FORMAT_VERSION}; "
            "re-prepare the dataset with this mupt"
        )
    return meta


def corpus_sha256(sources: list[dict[str, Any]]) -> str:
    """One hash for a corpus: sha256 of the sources' (split, sha256) pairs in order."""
    text = json.dumps([[s.get("split"), s.get("sha256")] for s in sources])
    return hashlib.sha256(text.encode()).hexdigest()


def meta_identity(meta: dict[str, Any], name: str) -> dict[str, Any]:
    """Dataset identity recorded in best.yaml and recipes (see :func:`identity_of`)."""
    tok = meta["tokenizer"]
    return {
        "name": name,
        "tokenizer": tok["name"],
        "tokenizer_sha256": tok["sha256"],
        "vocab_size": int(meta["vocab_size"]),
        "tokens": int(meta["splits"]["train"]["tokens"]),
        "corpus_sha256": corpus_sha256(meta["sources"]),
    }


def open_dataset(path: str | Path) -> MemmapTokens:
    """Open a prepared dataset directory; checks every shard's size against meta.json.

    Raises DataError for a missing/corrupt meta.json and for a missing or truncated shard.
    """
    path = Path(path)
    meta = read_meta(path)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    splits: dict[str, TokenArray] = {}
    for split in ("train", "val"):
        parts: list[np.ndarray] = []
        maps: list[tuple[mmap.mmap, int] | None] = []
        for shard in meta["splits"][split]["shards"]:
            f = path / shard["file"]
            want = int(shard["tokens"]) * dtype.itemsize
            size = f.stat().st_size if f.is_file() else None
            if size != want:
                got = "missing" if size is None else f"{size} bytes"
                raise DataError(
                    f"{f}: shard is {got}, meta.json says {want} bytes (truncated or replaced); "
                    f"rerun mupt prepare into a new directory"
                )
            arr, mm = map_tokens(f, dtype)
            parts.append(arr)
            maps.append((mm, 0) if mm is not None else None)
        splits[split] = TokenArray(parts, maps)
    val = meta["splits"]["val"]
    bpt = val["bytes"] / val["tokens"] if val.get("tokens") and val.get("bytes") else None
    return MemmapTokens(
        splits["train"], splits["val"], int(meta["vocab_size"]), str(path), bpt, meta_identity(meta, path.name)
    )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _map_token_file(path: Path, vocab_size: int, flag: str = "--data") -> tuple[np.ndarray, mmap.mmap | None]:
    if not path.is_file():
        raise DataError(f"{flag} {path}: no such file; pass a .bin or .npy token file")
    mm = None
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{flag} {path}: not a readable .npy file ({e}); save it with numpy.save") from None
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(f"{flag} {path}: expected a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
    else:
        dtype = token_dtype(vocab_size)
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise DataError(
                f"{flag} {path}: {size} bytes is not a whole number of {dtype.name} tokens; the file is truncated"
            )
        arr, mm = map_tokens(path, dtype)
    for lo in range(0, len(arr), 1 << 24):  # bounded memory: 16M tokens at a time
        found = first_outside(arr[lo : lo + (1 << 24)], vocab_size)
        if found is not None:
            bad, at = found
            raise DataError(
                f"{flag} {path}: token id {bad} at position {lo + at} is outside --vocab-size {vocab_size}; "
                "pass the tokenizer's vocabulary size"
            )
    return arr, mm


def open_token_file(
    path: str | Path, vocab_size: int | None, val_fraction: float, flag: str = "--data"
) -> MemmapTokens:
    """Open a nanoGPT-style ``.bin`` (uint16, or uint32 above 65536 ids) or ``.npy`` token file.

    ``train.bin`` with a sibling ``val.bin`` uses it for validation; otherwise the last
    ``val_fraction`` of the tokens is the validation split.  Every id is checked against
    ``vocab_size`` (a streaming pass in 16M-token blocks).  Raises DataError naming ``flag``, the flag that
    gave the path (:func:`mupt.data.load_data`).
    """
    path = Path(path)
    if vocab_size is None:
        raise DataError(f"{flag} {path}: a plain token file needs --vocab-size (the tokenizer's number of ids)")
    arr, mm = _map_token_file(path, vocab_size, flag)
    sibling = path.with_name("val" + path.suffix)
    train_map = (mm, 0) if mm is not None else None
    if path.stem == "train" and sibling.is_file():
        train = arr
        val, val_mm = _map_token_file(sibling, vocab_size, flag)
        val_map = (val_mm, 0) if val_mm is not None else None
        digest = _file_sha256(path) + _file_sha256(sibling)
    else:
        n_val = int(len(arr) * val_fraction)
        train, val = arr[: len(arr) - n_val], arr[len(arr) - n_val :]
        val_map = (mm, (len(arr) - n_val) * arr.itemsize) if mm is not None else None
        digest = _file_sha256(path)
    identity = {
        "name": path.name,
        "tokenizer": None,
        "tokenizer_sha256": None,
        "vocab_size": vocab_size,
        "tokens": len(train),
        "corpus_sha256": hashlib.sha256(digest.encode()).hexdigest(),
    }
    return MemmapTokens(
        TokenArray([train], [train_map]), TokenArray([val], [val_map]), vocab_size, str(path), None, identity
    )
