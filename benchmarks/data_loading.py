"""Data loading from prepared datasets: memory independent of corpus size, loader time per training step.

Writes two synthetic prepared datasets (the ``mupt prepare`` format: uint16 shards + meta.json,
random ids of a 4096-id vocabulary: a small head keeps the step short, which makes the loader's
share of it larger, the harder case) into a temporary directory: a small one (1M tokens) and a
large one (500M tokens, 1 GB of shards).  Each is then trained in a fresh child process for the
same steps of the proxy model (d_model 256, ``recipes/proxy.yaml``), and the child reports

* its peak RSS (``VmHWM``): the large run must stay within 50 MB of the small one;
* the data-loader time per step (``TokenSource.train_batch`` for that step, timed on its own) as a
  fraction of the full training step (forward, backward, AdamW, which loads the batch again):
  target < 2%.

Both children run in the same invocation, so machine load hits them alike.

    python benchmarks/data_loading.py                  # 500M vs 1M tokens, 10 steps
    python benchmarks/data_loading.py --quick          # 50M vs 1M tokens, 5 steps
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096
BLOCK = 1 << 24  # tokens generated per write


def write_dataset(out: Path, train_tokens: int, val_tokens: int = 200_000, shard_tokens: int = 100_000_000) -> None:
    """A prepared dataset of uniform random ids (format of mupt.data.dataset), written block by block."""
    from mupt.data.dataset import FORMAT, FORMAT_VERSION, META

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, total in (("train", train_tokens), ("val", val_tokens)):
        shards, left, k = [], total, 0
        while left:
            n = min(left, shard_tokens)
            name = f"{split}-{k:05d}.bin"
            with (out / name).open("wb") as fh:
                for lo in range(0, n, BLOCK):
                    fh.write(rng.integers(0, VOCAB, min(BLOCK, n - lo), dtype=np.uint16).astype("<u2").tobytes())
            shards.append({"file": name, "tokens": n})
            left, k = left - n, k + 1
        splits[split] = {"tokens": total, "documents": 1, "bytes": 4 * total, "shards": shards}
    sha = hashlib.sha256(b"synthetic uniform ids").hexdigest()
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "vocab_size": VOCAB, "eos_id": 0, "dtype": "uint16",
        "tokenizer": {"kind": "synthetic", "name": "uniform", "file": None, "sha256": sha, "vocab_size": VOCAB,
                      "eos_id": 0, "eos_token": ""},
        "splits": splits, "sources": [], "build": {},
    }  # fmt: skip
    (out / META).write_text(json.dumps(meta, indent=1))


def proc_status(key: str) -> float:
    """A ``/proc/self/status`` memory field in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(data_dir: str, steps: int, threads: int) -> None:
    """Train ``steps`` steps on ``data_dir``; print one JSON line (RSS, loader and step seconds)."""
    import torch

    from mupt.config import RunConfig, load_yaml, with_overrides
    from mupt.data import fit_vocab
    from mupt.train import Trainer

    torch.set_num_threads(threads)
    cfg = load_yaml(ROOT / "recipes" / "proxy.yaml", RunConfig)
    cfg = fit_vocab(with_overrides(cfg, {"data.source": data_dir, "train.steps": steps + 2, "model.d_model": 256}))
    trainer = Trainer(cfg)
    tc = cfg.train
    rss_start = proc_status("VmRSS")
    for _ in range(2):  # warm-up
        trainer.train_step()
    loader, step = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.data.train_batch(trainer.step, tc.batch_size, tc.seq_len, tc.seed)
        t1 = time.perf_counter()
        trainer.train_step()
        t2 = time.perf_counter()
        loader.append(t1 - t0)
        step.append(t2 - t1)
    out = {
        "tokens": len(trainer.data.train),  # type: ignore[attr-defined]
        "rss_after_setup_mib": rss_start,
        "rss_end_mib": proc_status("VmRSS"),
        "peak_rss_mib": proc_status("VmHWM"),
        "loader_ms": statistics.median(loader) * 1e3,
        "step_ms": statistics.median(step) * 1e3,
        "batch": [tc.batch_size, tc.seq_len],
        "vocab_size": cfg.model.vocab_size,
    }
    print(json.dumps(out))


def run_child(data_dir: Path, steps: int, threads: int) -> dict[str, float]:
    # one malloc arena: glibc's per-thread arenas make peak RSS vary by ~100 MB from run to run
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MALLOC_ARENA_MAX="1")
    cmd = [sys.executable, __file__, "--child", str(data_dir), "--steps", str(steps), "--threads", str(threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="50M-token large dataset, 5 steps")
    ap.add_argument("--large", type=int, default=None, help="tokens of the large dataset (default 500M)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_loading.json")
    args = ap.parse_args()
    steps = args.steps or (5 if args.quick else 10)
    if args.child:
        child(args.child, steps, args.threads)
        return
    large = args.large or (50_000_000 if args.quick else 500_000_000)
    with tempfile.TemporaryDirectory(prefix="mupt-bench-data-") as tmp:
        t0 = time.perf_counter()
        write_dataset(Path(tmp) / "small", 1_000_000)
        write_dataset(Path(tmp) / "large", large)
        gen_s = time.perf_counter() - t0
        rows = {"1M": run_child(Path(tmp) / "small", steps, args.threads)}
        rows[f"{large / 1e6:g}M"] = run_child(Path(tmp) / "large", steps, args.threads)
    small, big = rows["1M"], rows[f"{large / 1e6:g}M"]
    rss_diff = big["peak_rss_mib"] - small["peak_rss_mib"]
    frac = max(r["loader_ms"] / r["step_ms"] for r in rows.values())
    print(f"data loading: proxy model (d_model 256, vocab {small['vocab_size']}), batch x seq {small['batch']}, "
          f"{steps} steps, {args.threads} threads; datasets generated in {gen_s:.0f} s")  # fmt: skip
    print(f"{'dataset':>10} {'tokens':>12} {'peak RSS MiB':>13} {'end RSS MiB':>12} {'loader ms':>10} "
          f"{'step ms':>9} {'loader/step':>12}")  # fmt: skip
    for name, r in rows.items():
        print(f"{name:>10} {r['tokens']:>12,} {r['peak_rss_mib']:>13.1f} {r['rss_end_mib']:>12.1f} "
              f"{r['loader_ms']:>10.3f} {r['step_ms']:>9.1f} {r['loader_ms'] / r['step_ms']:>12.3%}")  # fmt: skip
    print(f"peak RSS difference (large - small): {rss_diff:+.1f} MiB (target within 50 MB): "
          f"{'PASS' if abs(rss_diff) * 1.048576 <= 50 else 'FAIL'}")  # fmt: skip
    print(f"loader time / step time (worst): {frac:.3%} (target < 2%): {'PASS' if frac < 0.02 else 'FAIL'}")
    result = {
        "benchmark": "data_loading", "steps": steps, "threads": args.threads, "rows": rows,
        "peak_rss_diff_mib": rss_diff, "loader_fraction": frac, "load_avg": os.getloadavg(),
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
