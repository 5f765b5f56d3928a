"""The held-out corpus of docs/transfer.md: license and copyright texts of a Debian system, one .txt per document.

    python docs/experiments/regret_licenses_corpus.py runs/licenses
    mupt prepare runs/licenses --tokenizer bytes --out runs/data-licenses

Reads ``/usr/share/common-licenses/*`` then ``/usr/share/doc/*/copyright`` (each list sorted), drops exact
duplicates (by sha256 of the bytes, the first file kept) and writes each remaining file as
``OUT/<name>.txt``: the license's file name for common-licenses (they are capitalised, so they sort first),
the package name for a copyright file.  ``mupt prepare`` reads the directory sorted and sends every 20th
document (its default ``--val-fraction`` 0.05) to validation.  On the 2026-11-30 machine: 727 files, 391
documents, 5,527,373 bytes; 372 train documents (5.42 M tokens), 19 validation documents (105 K tokens).
"""

from __future__ import annotations

import glob
import hashlib
import sys
from pathlib import Path


def main(out: str) -> int:
    files = sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(glob.glob("/usr/share/doc/*/copyright"))
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    total = 0
    for f in files:
        path = Path(f)
        if not path.is_file():
            continue
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen or not data:
            continue
        seen.add(digest)
        name = path.name if path.parent.name == "common-licenses" else path.parent.name
        (dest / f"{name}.txt").write_bytes(data)
        total += len(data)
    print(f"{len(files)} files, {len(seen)} documents, {total} bytes -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
