"""``mupt prepare`` throughput (MB/s of text) against the ``tokenizers`` library's own batch encode.

Text: the builtin corpus's documents, each repeated with a distinct prefix, written as ``.jsonl``
files into a temporary directory (about 11 MB by default).  Tokenizer: a byte-level BPE of 8192 ids
trained on the builtin corpus (what ``mupt prepare --train-tokenizer`` builds), saved as a
tokenizer.json and passed with ``--tokenizer``.

Per repeat, in turn (so machine load hits them alike):

* ``tokenizers batch encode`` (the baseline): the same documents, already in memory as a list of
  str, encoded by one ``encode_batch_fast`` call (``encode_batch`` on tokenizers < 0.20) -- no file
  reading, JSON parsing, id conversion or writing;
* ``mupt prepare`` with ``--workers 1`` and ``--workers 2``: everything, from the .jsonl files to
  a finished dataset directory (sha256 of the sources, JSON parsing, encoding, EOS, shards,
  meta.json).

The table shows the median MB/s (text UTF-8 bytes / wall seconds) and the ratio against the
baseline; target: ``mupt prepare`` >= 0.8 of the baseline.

    python benchmarks/prepare.py              # ~11 MB, 3 repeats
    python benchmarks/prepare.py --quick      # ~4 MB, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(root: Path, copies: int, files: int = 4) -> list[str]:
    """``copies`` variants of every builtin document, spread over ``files`` .jsonl files; the texts."""
    from pydoc_data.topics import topics

    docs = [f"[{c}] {topics[k]}" for c in range(copies) for k in sorted(topics)]
    per = -(-len(docs) // files)
    for i in range(files):
        with (root / f"part{i}.jsonl").open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": d}) + "\n" for d in docs[i * per : (i + 1) * per])
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~4 MB of text, 1 repeat")
    ap.add_argument("--copies", type=int, default=None, help="variants of each builtin document (default 24)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prepare.json")
    args = ap.parse_args()
    copies = args.copies or (8 if args.quick else 24)
    repeats = args.repeats or (1 if args.quick else 3)

    import tokenizers

    from mupt.data.prepare import PrepareSettings, prepare
    from mupt.data.tokenizer import train_bpe

    with tempfile.TemporaryDirectory(prefix="mupt-bench-prepare-") as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        docs = make_corpus(root / "src", copies)
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        t0 = time.perf_counter()
        from pydoc_data.topics import topics

        tok = train_bpe(iter([topics[k] for k in sorted(topics)]), args.vocab)
        train_s = time.perf_counter() - t0
        assert tok.json_text is not None
        (root / "tokenizer.json").write_text(tok.json_text, encoding="utf-8")
        hf = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
        fast = hasattr(hf, "encode_batch_fast")
        encode = hf.encode_batch_fast if fast else hf.encode_batch
        srcs = [str(p) for p in sorted((root / "src").glob("*.jsonl"))]
        times: dict[str, list[float]] = {"tokenizers batch encode": [], "mupt prepare --workers 1": [],
                                         "mupt prepare --workers 2": []}  # fmt: skip
        tokens = 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            enc = encode(docs, add_special_tokens=False)
            times["tokenizers batch encode"].append(time.perf_counter() - t0)
            tokens = sum(len(e.ids) for e in enc)
            del enc
            for workers in (1, 2):
                out = root / f"ds{workers}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                res = prepare(PrepareSettings(sources=srcs, out=out, tokenizer=str(root / "tokenizer.json"),
                                              workers=workers, shard_bytes=8 * 2**20))  # fmt: skip
                times[f"mupt prepare --workers {workers}"].append(time.perf_counter() - t0)
                got = res.meta["splits"]["train"]["tokens"] + res.meta["splits"]["val"]["tokens"]
                assert got == tokens + len(docs), (got, tokens)  # every id, plus one EOS per document
    base = statistics.median(times["tokenizers batch encode"])
    rows = {k: {"median_s": statistics.median(v), "mb_per_s": mb / statistics.median(v),
                "ratio": base / statistics.median(v), "runs_s": v} for k, v in times.items()}  # fmt: skip
    print(
        f"prepare: {mb:.1f} MB of text ({len(docs):,} documents, {tokens:,} tokens), byte-level BPE {args.vocab} "
        f"(trained in {train_s:.1f} s), tokenizers {tokenizers.__version__} "
        f"({'encode_batch_fast' if fast else 'encode_batch'}), {repeats} repeats, {os.cpu_count()} CPUs"
    )
    print(f"{'':>26} {'median s':>9} {'MB/s':>7} {'vs batch encode':>16}")
    for name, r in rows.items():
        print(f"{name:>26} {r['median_s']:>9.2f} {r['mb_per_s']:>7.2f} {r['ratio']:>16.2f}")
    best = max(rows[k]["ratio"] for k in rows if k.startswith("mupt"))
    print(
        f"best mupt prepare / tokenizers batch encode: {best:.2f} (target >= 0.8): {'PASS' if best >= 0.8 else 'FAIL'}"
    )
    result = {"benchmark": "prepare", "mb": mb, "documents": len(docs), "tokens": tokens, "vocab": args.vocab,
              "tokenizers": tokenizers.__version__, "fast_api": fast, "rows": rows, "best_ratio": best,
              "load_avg": os.getloadavg(), "python": platform.python_version(), "cpus": os.cpu_count()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
