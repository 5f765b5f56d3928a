"""``mupt prepare``: text sources -> a tokenized, memory-mappable dataset directory.

Sources are ``.txt`` files (one document each), directories (searched recursively for the
supported kinds, sorted; other files there are skipped and returned in ``PrepareResult.skipped``),
``.jsonl`` / ``.jsonl.gz`` (one document per line, in ``text_field``),
``.parquet`` (one document per row of column ``text_field``; needs the ``parquet`` extra,
pyarrow), and ``builtin`` (the builtin corpus, one document per pydoc topic).

Output (read by :mod:`mupt.data.dataset`):

* ``train-00000.bin``, ``val-00000.bin``, ...: flat little-endian token shards (uint16 when the
  vocabulary fits, else uint32), each document followed by the tokenizer's EOS id.  A shard holds
  the documents of about ``shard_bytes`` of text, in source order;
* ``tokenizer.json``: the tokenizer (copied or trained), whose sha256 is the dataset's tokenizer
  identity;
* ``meta.json`` (written last): format version, tokenizer, vocab size, dtype, per split the
  token / document / UTF-8 byte counts and the shards, the sources with size and sha256, and the
  options that determine the bytes.

Validation split: whole documents.  With ``val_fraction`` f, document i (counting over all
non-``--val`` sources) goes to validation when floor((i+1) f) > floor(i f): evenly spread,
exactly floor(n f) of n documents.  Sources given with ``val_sources`` are validation only.

Resumable: shards are written atomically (temp file, fsync, rename) and named by their position
in the deterministic document stream, so a rerun after a crash (even kill -9) re-reads the
sources, skips the shards that exist and writes a byte-identical dataset.  A ``.prepare.json``
plan (sources with sha256, tokenizer, options) guards against resuming with other inputs.
"""

from __future__ import annotations

import concurrent.futures as cf
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mupt.config import atomic_write_text
from mupt.data.dataset import FORMAT, FORMAT_VERSION, META, TOKENIZER_FILE, read_meta, token_dtype
from mupt.data.tokenizer import BYTES, Tok, load_tokenizer, train_bpe, trained_from_json
from mupt.errors import DataError, MuptError

PLAN = ".prepare.json"
KINDS = (".jsonl.gz", ".jsonl", ".parquet", ".txt")
SPLITS = ("train", "val")
ProgressCallback = Callable[[str, int, int], None]  # (phase, source bytes done, source bytes total)


@dataclass(frozen=True)
class PrepareSettings:
    """Everything that determines a prepared dataset (``workers`` only changes the speed)."""

    sources: list[str]
    out: Path
    tokenizer: str = BYTES  # "bytes" | PATH (tokenizer.json or a directory holding one)
    train_vocab: int | None = None  # train a byte-level BPE of this many ids instead
    eos: str | None = None
    text_field: str = "text"
    val_fraction: float = 0.05
    val_sources: list[str] = field(default_factory=list)
    workers: int = 1
    shard_bytes: int = 64 * 2**20


@dataclass
class PrepareResult:
    """What :func:`prepare` did: the dataset's meta, the time it took (s), shards written / reused (a resume),
    and the files it found in directory sources but did not read (``skipped``: not one of :data:`KINDS`)."""

    meta: dict[str, Any]
    out: Path
    seconds: float
    shards_written: int
    shards_reused: int
    already_done: bool = False
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # builtin | txt | jsonl | jsonl.gz | parquet
    split: str  # auto | val
    size: int
    sha256: str

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "split": self.split, "bytes": self.size, "sha256": self.sha256}


def _kind(path: Path) -> str | None:
    for k in KINDS:
        if path.name.endswith(k):
            return k[1:]
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def expand_sources(specs: list[str], split: str, text_field: str) -> tuple[list[Source], list[str]]:
    """Resolve files, directories and ``builtin`` into sources (size, sha256); raises DataError.

    Returns ``(sources, skipped)``: ``skipped`` are the files found inside a directory source without one of
    the kinds read (:data:`KINDS`), sorted; hidden ones (a path part under the directory starts with ``.``,
    e.g. ``.git/``) are not listed.  A directory with no readable file at all raises DataError.
    """
    from mupt.data import builtin_text

    flag = "--val" if split == "val" else "SOURCES"
    out: list[Source] = []
    skipped: list[str] = []
    for spec in specs:
        if spec == "builtin":
            text = builtin_text()
            out.append(Source("builtin", "builtin", split, len(text), hashlib.sha256(text).hexdigest()))
            continue
        path = Path(spec)
        if not path.exists():
            raise DataError(f"{flag} {spec}: no such file or directory")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            files = [p for p in found if _kind(p) is not None]
            skipped += [
                str(p) for p in found
                if _kind(p) is None and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]  # fmt: skip
            if not files:
                raise DataError(f"{flag} {spec}: the directory holds no .txt, .jsonl, .jsonl.gz or .parquet files")
        else:
            if _kind(path) is None:
                raise DataError(f"{flag} {spec}: unsupported file type; pass .txt, .jsonl, .jsonl.gz or .parquet")
            files = [path]
        for f in files:
            size = f.stat().st_size
            if size == 0:
                raise DataError(f"{f}: empty file; remove it from the sources")
            kind = _kind(f)
            assert kind is not None
            if kind == "parquet":
                _parquet_column_check(f, text_field)
            out.append(Source(str(f), kind, split, size, _sha256(f)))
    return out, skipped


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install 'mupt[parquet]'") from None
    return pq


def _parquet_column_check(path: Path, text_field: str) -> None:
    pq = _pyarrow()
    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises ArrowInvalid (an Exception) for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); pass --text-field NAME")


def _document_text(value: Any, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not text; pass --text-field NAME")
    return value


def documents(src: Source, text_field: str) -> Iterator[tuple[str, int]]:
    """``(text, source bytes consumed)`` for each document of ``src``, in file order; raises DataError."""
    if src.kind == "builtin":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key], len(topics[key].encode("utf-8"))
        return
    path = Path(src.path)
    if src.kind == "txt":
        try:
            yield path.read_bytes().decode("utf-8"), src.size
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
        return
    if src.kind == "parquet":
        pq = _pyarrow()
        pf = pq.ParquetFile(path)
        groups = max(1, pf.num_row_groups)
        for g in range(pf.num_row_groups):
            col = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
            per = src.size // groups // max(1, len(col))
            for r, value in enumerate(col):
                yield _document_text(value, f"{path} row-group {g} row {r}", text_field), per
        return
    with path.open("rb") as raw:
        stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw) if src.kind == "jsonl.gz" else raw  # type: ignore[assignment]
        last = 0
        try:
            for n, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(f"{path} line {n}: invalid JSON ({e}); fix or drop the line") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    raise DataError(f"{path} line {n}: no field {text_field!r}; pass --text-field NAME")
                pos = raw.tell()
                yield _document_text(obj[text_field], f"{path} line {n}", text_field), pos - last
                last = pos
        except (gzip.BadGzipFile, EOFError, OSError) as e:
            raise DataError(f"{path}: corrupt gzip stream ({e}); recompress the file") from None


def split_documents(sources: list[Source], text_field: str, val_fraction: float) -> Iterator[tuple[str, str, int]]:
    """``(split, text, source bytes)`` over every source; the val_fraction rule of the module docstring."""
    i = 0
    for src in sources:
        for text, advance in documents(src, text_field):
            if src.split == "val":
                split = "val"
            else:
                split = "val" if math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction) else "train"
                i += 1
            yield split, text, advance


def _write_atomic(path: Path, tokens: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_WORKER_TOK: Tok | None = None


def _init_worker(tok: Tok) -> None:
    global _WORKER_TOK
    os.environ["RAYON_NUM_THREADS"] = "1"  # one process per core; the tokenizer's own thread pool stays at 1
    _WORKER_TOK = tok


def _encode_to(texts: list[str], dest: str) -> int:
    assert _WORKER_TOK is not None
    tokens = _WORKER_TOK.encode_documents(texts)
    _write_atomic(Path(dest), tokens)
    return len(tokens)


def _plan(settings: PrepareSettings, sources: list[Source], tok: Tok | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sources": [s.record() for s in sources],
        "tokenizer": {"spec": settings.tokenizer, "sha256": tok.sha256 if tok else None, "eos": settings.eos}
        if settings.train_vocab is None
        else {"train_vocab": settings.train_vocab},
        "text_field": settings.text_field,
        "val_fraction": None if settings.val_sources else settings.val_fraction,
        "shard_bytes": settings.shard_bytes,
    }


def _out_state(out: Path, plan: dict[str, Any]) -> str:
    """'new' | 'empty' | 'resume' | 'done'; raises DataError for a directory that is something else."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory; pass a new directory")
    if (out / META).exists():
        meta = read_meta(out)
        if meta.get("build") == plan:
            return "done"
        raise DataError(f"--out {out}: already holds a dataset prepared from other inputs; pass a new --out")
    if (out / PLAN).exists():
        try:
            old = json.loads((out / PLAN).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if old == plan:
            return "resume"
        raise DataError(
            f"--out {out}: holds an unfinished prepare of other inputs or options; rerun that command or delete it"
        )
    if any(out.iterdir()):
        raise DataError(f"--out {out}: not empty and not a mupt dataset; pass an empty or new directory")
    return "empty"


def _check_settings(s: PrepareSettings) -> None:
    if not s.sources:
        raise DataError("no sources: pass .txt/.jsonl/.jsonl.gz/.parquet files, directories, or builtin")
    if not 0 < s.val_fraction < 0.5:
        raise DataError(f"--val-fraction {s.val_fraction}: must be in (0, 0.5)")
    if s.workers < 1:
        raise DataError(f"--workers {s.workers}: must be >= 1")
    if s.shard_bytes < 1:
        raise DataError(f"--shard-mb: must be positive, got {s.shard_bytes} bytes")
    if s.train_vocab is not None and s.tokenizer != BYTES:
        raise DataError(f"--tokenizer {s.tokenizer} and --train-tokenizer both given; pass one of them")


def prepare(settings: PrepareSettings, on_progress: ProgressCallback | None = None) -> PrepareResult:
    """Tokenize ``settings.sources`` into ``settings.out`` (see the module docstring).

    Raises DataError for bad inputs; then nothing this call wrote is left behind (an interrupted
    run's shards, which a rerun resumes from, are kept).  Rerunning a finished prepare with the
    same inputs returns its meta without work.
    """
    start = time.perf_counter()
    _check_settings(settings)
    sources, skipped = expand_sources(settings.sources, "auto", settings.text_field)
    val_sources, val_skipped = expand_sources(settings.val_sources, "val", settings.text_field)
    sources += val_sources
    skipped += val_skipped
    tok = load_tokenizer(settings.tokenizer, settings.eos) if settings.train_vocab is None else None
    plan = _plan(settings, sources, tok)
    out = settings.out
    state = _out_state(out, plan)
    if state == "done":
        return PrepareResult(read_meta(out), out, time.perf_counter() - start, 0, 0, True, skipped)
    out.mkdir(parents=True, exist_ok=True)
    for stray in out.glob(".*.tmp-*"):  # temp files of a killed run: never renamed, never read
        stray.unlink()
    if state != "resume":
        atomic_write_text(out / PLAN, json.dumps(plan, indent=1))
    try:
        return replace(_run(settings, sources, tok, plan, on_progress, start), skipped=skipped)
    except MuptError:
        if state == "new":
            shutil.rmtree(out, ignore_errors=True)
        elif state == "empty":
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def _run(
    settings: PrepareSettings,
    sources: list[Source],
    tok: Tok | None,
    plan: dict[str, Any],
    on_progress: ProgressCallback | None,
    start: float,
) -> PrepareResult:
    out = settings.out
    total = sum(s.size for s in sources)
    val_fraction = settings.val_fraction
    if tok is None:  # train a byte-level BPE on the training documents (reused when a killed run saved it)
        assert settings.train_vocab is not None
        saved = out / TOKENIZER_FILE
        if saved.exists():
            tok = trained_from_json(saved.read_text(encoding="utf-8"), settings.train_vocab)
        else:
            done = [0]

            def train_texts() -> Iterator[str]:
                for split, text, advance in split_documents(sources, settings.text_field, val_fraction):
                    done[0] += advance
                    if on_progress is not None:
                        on_progress("train tokenizer", done[0], total)
                    if split == "train":
                        yield text

            tok = train_bpe(train_texts(), settings.train_vocab)
            assert tok.json_text is not None
            atomic_write_text(saved, tok.json_text)
    elif tok.json_text is not None:
        atomic_write_text(out / TOKENIZER_FILE, tok.json_text)

    counts = {s: {"tokens": 0, "documents": 0, "bytes": 0} for s in SPLITS}
    shards: dict[str, list[str]] = {s: [] for s in SPLITS}
    written = reused = 0
    done_bytes = 0
    pool = None
    if settings.workers > 1:
        ctx = multiprocessing.get_context("spawn")  # the parent's tokenizers thread pool must not be forked
        pool = cf.ProcessPoolExecutor(
            settings.workers, mp_context=ctx, initializer=_init_worker, initargs=(replace(tok, _hf=None),)
        )
    pending: list[tuple[cf.Future[int], int]] = []

    def finished(advance: int) -> None:
        nonlocal done_bytes
        done_bytes += advance
        if on_progress is not None:
            on_progress("tokenize", done_bytes, total)

    def emit(split: str, texts: list[str], advance: int) -> None:
        nonlocal written, reused
        name = f"{split}-{len(shards[split]):05d}.bin"
        shards[split].append(name)
        dest = out / name
        if dest.exists():
            reused += 1
            finished(advance)
            return
        written += 1
        if pool is None:
            _write_atomic(dest, tok.encode_documents(texts))
            finished(advance)
            return
        pending.append((pool.submit(_encode_to, texts, str(dest)), advance))
        while len(pending) > 2 * settings.workers:
            fut, adv = pending.pop(0)
            fut.result()
            finished(adv)

    buf: dict[str, list[str]] = {s: [] for s in SPLITS}
    size = {s: 0 for s in SPLITS}
    adv = {s: 0 for s in SPLITS}
    try:
        for split, text, advance in split_documents(sources, settings.text_field, val_fraction):
            adv[split] += advance
            if not text:
                continue
            n = len(text.encode("utf-8"))
            counts[split]["documents"] += 1
            counts[split]["bytes"] += n
            buf[split].append(text)
            size[split] += n
            if size[split] >= settings.shard_bytes:
                emit(split, buf[split], adv[split])
                buf[split], size[split], adv[split] = [], 0, 0
        for split in SPLITS:
            if buf[split]:
                emit(split, buf[split], adv[split])
        for fut, a in pending:
            fut.result()
            finished(a)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    for split in SPLITS:
        if counts[split]["documents"] == 0:
            n_docs = counts["train"]["documents"] + counts["val"]["documents"]
            fix = (
                "pass --val SOURCES or more documents, or raise --val-fraction"
                if split == "val"
                else "pass more documents or lower --val-fraction"
            )
            raise DataError(f"the {split} split got no documents ({n_docs} in all); {fix}")
    dtype = token_dtype(tok.vocab_size)
    meta_splits: dict[str, Any] = {}
    for split in SPLITS:
        sizes = [(out / f).stat().st_size // dtype.itemsize for f in shards[split]]
        files = [{"file": f, "tokens": n} for f, n in zip(shards[split], sizes, strict=True)]
        counts[split]["tokens"] = sum(sizes)
        meta_splits[split] = {**counts[split], "shards": files}
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer": tok.meta(),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "splits": meta_splits,
        "sources": [s.record() for s in sources],
        "build": plan,
    }
    atomic_write_text(out / META, json.dumps(meta, indent=1))
    (out / PLAN).unlink(missing_ok=True)
    return PrepareResult(meta, out, time.perf_counter() - start, written, reused)
