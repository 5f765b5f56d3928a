"""Tokenizers for ``mupt prepare``: a Hugging Face ``tokenizers`` file, a trained byte-level BPE, or bytes.

* ``bytes``: id = UTF-8 byte (vocab 256), EOS = 0 (the NUL byte, which text does not contain);
* a ``tokenizer.json`` (or a directory holding one, e.g. a copy of a model repository), read with
  ``tokenizers.Tokenizer.from_file``; EOS is ``--eos`` or the first of :data:`EOS_CANDIDATES` in
  its vocabulary;
* :func:`train_bpe`: a byte-level BPE trained with ``tokenizers``' ``BpeTrainer`` (the GPT-2
  recipe: ByteLevel pre-tokenizer and decoder, the 256 byte symbols as the initial alphabet),
  with ``<|endoftext|>`` as id 0.  Decoding its ids gives back the exact text.

Documents are encoded without special tokens; the caller appends EOS after each document.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mupt.data.dataset import TOKENIZER_FILE, token_dtype
from mupt.errors import DataError

BYTES = "bytes"
TRAINED_EOS = "<|endoftext|>"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "<|im_end|>", "[SEP]")


@dataclass
class Tok:
    """A loaded tokenizer: its identity, EOS id and an encoder producing flat token arrays."""

    kind: str  # "bytes" | "file" | "trained-bpe"
    name: str
    vocab_size: int
    eos_id: int
    eos_token: str
    json_text: str | None  # the tokenizer.json (None for bytes)
    sha256: str
    _hf: Any = None

    @property
    def hf(self) -> Any:
        """The ``tokenizers.Tokenizer`` (built lazily from ``json_text``, e.g. in a worker process)."""
        if self._hf is None and self.json_text is not None:
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_str(self.json_text)
        return self._hf

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """Every text's ids followed by EOS, concatenated: 1-D uint16/uint32 (see :func:`token_dtype`)."""
        dtype = token_dtype(self.vocab_size)
        if self.kind == BYTES:
            raw = b"\x00".join(t.encode("utf-8") for t in texts) + b"\x00"
            return np.frombuffer(raw, dtype=np.uint8).astype(dtype)
        hf = self.hf
        encode = getattr(hf, "encode_batch_fast", hf.encode_batch)  # _fast skips offsets (tokenizers >= 0.20)
        pieces: list[np.ndarray] = []
        eos = np.array([self.eos_id], dtype=dtype)
        for enc in encode(texts, add_special_tokens=False):
            pieces.append(np.asarray(enc.ids, dtype=dtype))
            pieces.append(eos)
        return np.concatenate(pieces) if pieces else np.empty(0, dtype)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (no EOS among them)."""
        ids = list(ids)
        if self.kind == BYTES:
            return bytes(ids).decode("utf-8")
        return str(self.hf.decode(ids, skip_special_tokens=False))

    def meta(self) -> dict[str, Any]:
        """The ``tokenizer`` section of meta.json."""
        return {
            "kind": self.kind,
            "name": self.name,
            "file": None if self.json_text is None else TOKENIZER_FILE,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
        }


def bytes_tokenizer() -> Tok:
    from mupt.data.dataset import BYTES_TOKENIZER_SHA256

    return Tok(BYTES, BYTES, 256, 0, "\\x00", None, BYTES_TOKENIZER_SHA256)


def _from_json(text: str, kind: str, name: str, eos: str | None, where: str) -> Tok:
    from tokenizers import Tokenizer

    try:
        hf = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{where}: not a valid tokenizers tokenizer.json ({first}); pass a valid file") from None
    vocab = hf.get_vocab(with_added_tokens=True)
    if eos is not None:
        if eos not in vocab:
            raise DataError(f"--eos {eos!r}: not in the vocabulary of {where}; pass one of its special tokens")
        eos_token = eos
    else:
        found = [c for c in EOS_CANDIDATES if c in vocab]
        if not found:
            raise DataError(
                f"{where}: none of {', '.join(EOS_CANDIDATES)} is in its vocabulary; name its end-of-document "
                "token with --eos TOKEN"
            )
        eos_token = found[0]
    size = max(hf.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    return Tok(kind, name, size, int(vocab[eos_token]), eos_token, text, hashlib.sha256(text.encode()).hexdigest(), hf)


def load_tokenizer(spec: str, eos: str | None = None) -> Tok:
    """``bytes``, a tokenizer.json, or a directory holding one; raises DataError."""
    if spec == BYTES:
        return bytes_tokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"--tokenizer {spec}: no such file (and no {TOKENIZER_FILE} in it); pass a tokenizer.json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--tokenizer {path}: cannot read it ({e}); pass a tokenizer.json") from None
    return _from_json(text, "file", str(spec), eos, f"--tokenizer {path}")


def trained_from_json(text: str, vocab: int) -> Tok:
    """A tokenizer that :func:`train_bpe` saved earlier (an interrupted prepare's tokenizer.json)."""
    return _from_json(text, "trained-bpe", f"byte-level BPE {vocab}", TRAINED_EOS, TOKENIZER_FILE)


def train_bpe(texts: Iterator[str], vocab: int) -> Tok:
    """Train a byte-level BPE of ``vocab`` ids (incl. ``<|endoftext|>`` = 0) on ``texts``.

    Raises DataError when ``vocab`` < 257 (256 byte symbols + EOS).  The result may hold fewer
    ids when the text has fewer distinct merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab < 257:
        raise DataError(f"--train-tokenizer {vocab}: needs at least 257 ids (256 byte symbols + EOS)")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[TRAINED_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return trained_from_json(hf.to_str(), vocab)
