"""Torch threads per process: the default mupt picks (idle cores // workers) vs torch's own default.

Three measurements, each a ratio against the mupt default measured in the same run (parts 1 and 2:
the default on an idle machine, usable cores // workers; part 3: at the load it creates):

1. one process (``mupt train``/``scale``): training-step throughput at each thread count from 1 to the
   usable cores, per width;
2. ``W`` worker processes at once (``tune --workers W``, ``check transfer --workers W``), each training
   the same proxy: aggregate throughput with threads = cores // W (mupt's default: never
   oversubscribed) vs threads = cores (torch's default in every process: W x cores threads);
3. a machine shared with other jobs: ``C`` busy competitor processes (C = 0, 1, ..., cores; ``--competitor
   torch``: small matmuls on torch's default threads, like another training job; ``spin``: a pure-Python
   loop) run while one process times its steps at each thread count; the row mupt's default would take at
   load C (``default_threads(1, load=C)``: the idle cores) is the baseline.

The model is the default proxy (``mupt.config``: d_model 256, 2 layers, d_state 16, batch 8 x seq 64)
at the widths given; every measurement is the median over repeats of the time of ``--steps`` steps
after one warm-up step.  On a machine shared with other jobs the absolute numbers are noise; the
ratios in one run are the result.

Run it with ``OMP_NUM_THREADS`` unset (mupt's default honours it as the user's explicit choice).

    python benchmarks/threads.py                 # widths 64,256; 8 steps; 3 repeats
    python benchmarks/threads.py --quick         # width 64, 3 steps, 1 repeat (seconds)
    python benchmarks/threads.py --loaded-only --widths 32,256   # part 3 alone
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mupt.config import RunConfig, with_overrides
from mupt.threads import default_threads, usable_cores
from mupt.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def config(width: int) -> RunConfig:
    return with_overrides(RunConfig(), {"model.d_model": width})


def time_steps(width: int, threads: int, steps: int) -> float:
    """Seconds for ``steps`` training steps after one warm-up step, with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    trainer = Trainer(config(width))
    trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return time.perf_counter() - t0


def _worker(width: int, threads: int, steps: int, start: Any, out: Any) -> None:
    torch.set_num_threads(threads)
    trainer = Trainer(config(width))
    trainer.train_step()
    start.wait()  # all workers time the same window
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    out.put(time.perf_counter() - t0)


def time_workers(width: int, workers: int, threads: int, steps: int) -> float:
    """Wall seconds until ``workers`` processes have each done ``steps`` steps (started together)."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(width, threads, steps, start, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    start.wait()
    times = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    return max(times)


def _compete(stop: Any, kind: str) -> None:
    """A competitor: ``spin`` is a pure-Python loop; ``torch`` small matmuls on torch's own default threads
    (every core), as another training job started with torch's defaults would run."""
    if kind == "spin":
        while not stop.is_set():
            pass
        return
    a = torch.randn(128, 128)
    while not stop.is_set():
        a = torch.tanh(a @ a)


def time_loaded(width: int, threads: int, steps: int, competitors: int, kind: str = "torch") -> float:
    """Seconds for ``steps`` steps with ``threads`` torch threads while ``competitors`` processes of ``kind`` run."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_compete, args=(stop, kind), daemon=True) for _ in range(competitors)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.5 if competitors else 0.0)  # let them get going
        return time_steps(width, threads, steps)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,256")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="worker processes for part 2 (default: usable cores)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--loaded-steps", type=int, default=3, help="steps per measurement of part 3 (one repeat)")
    ap.add_argument("--loaded-only", action="store_true", help="run part 3 only")
    ap.add_argument("--competitor", choices=("torch", "spin"), default="torch", help="part 3's busy processes")
    ap.add_argument("--out", help="default: benchmarks/results/threads.json (threads_loaded.json with --loaded-only)")
    args = ap.parse_args()
    results = ROOT / "benchmarks" / "results"
    args.out = args.out or str(results / ("threads_loaded.json" if args.loaded_only else "threads.json"))
    if args.quick:
        args.widths, args.steps, args.repeats = "64", 3, 1
    widths = [int(w) for w in args.widths.split(",")]
    cores = usable_cores()
    workers = args.workers or cores
    tokens = RunConfig().train.batch_size * RunConfig().train.seq_len
    counts = sorted({1, *(2**k for k in range(1, 8) if 2**k < cores), cores})
    load = os.getloadavg()[0]
    print(f"usable cores {cores}, load average {load:.2f}, torch {torch.__version__}, {platform.processor()}")

    single: list[dict[str, Any]] = []
    for w in [] if args.loaded_only else widths:
        med = {t: statistics.median(time_steps(w, t, args.steps) for _ in range(args.repeats)) for t in counts}
        base = med[default_threads(1, load=0.0)]
        for t in counts:
            single.append({
                "width": w, "threads": t, "default": t == default_threads(1, load=0.0), "seconds": med[t],
                "tokens_per_s": args.steps * tokens / med[t], "speed_vs_default": base / med[t],
            })  # fmt: skip
    if single:
        print(f"\n1. one process, {args.steps} steps of {tokens} tokens (median of {args.repeats})")
        print(f"{'width':>6} {'threads':>8} {'tokens/s':>10} {'vs default':>11}")
        for r in single:
            mark = " (default)" if r["default"] else ""
            print(f"{r['width']:>6} {r['threads']:>8} {r['tokens_per_s']:>10.0f} {r['speed_vs_default']:>10.2f}x{mark}")

    multi: list[dict[str, Any]] = []
    if workers > 1 and not args.loaded_only:
        for w in widths:
            choices = {"mupt default": default_threads(workers, load=0.0), "torch default (all cores)": cores}
            med = {
                name: statistics.median(time_workers(w, workers, t, args.steps) for _ in range(args.repeats))
                for name, t in choices.items()
            }
            for name, t in choices.items():
                multi.append({
                    "width": w, "workers": workers, "threads": t, "choice": name, "seconds": med[name],
                    "tokens_per_s": workers * args.steps * tokens / med[name],
                    "speed_vs_default": med["mupt default"] / med[name],
                })  # fmt: skip
        print(f"\n2. {workers} worker processes at once, {args.steps} steps each (median of {args.repeats})")
        print(f"{'width':>6} {'threads/worker':>15} {'choice':>27} {'tokens/s':>10} {'vs default':>11}")
        for r in multi:
            print(
                f"{r['width']:>6} {r['threads']:>15} {r['choice']:>27} {r['tokens_per_s']:>10.0f} "
                f"{r['speed_vs_default']:>10.2f}x"
            )
    loaded: list[dict[str, Any]] = []
    for w in widths:
        for c in range(cores + 1):
            secs = {t: time_loaded(w, t, args.loaded_steps, c, args.competitor) for t in counts}
            pick = default_threads(1, load=float(c))
            for t in counts:
                loaded.append({
                    "width": w, "competitors": c, "threads": t, "default": t == pick,
                    "seconds_per_step": secs[t] / args.loaded_steps, "speed_vs_default": secs[pick] / secs[t],
                })  # fmt: skip
    print(f"\n3. one process beside C busy {args.competitor} processes, {args.loaded_steps} steps (one repeat)")
    print(f"{'width':>6} {'C':>3} {'threads':>8} {'s/step':>9} {'vs default':>11}")
    for r in loaded:
        mark = " (default at load C)" if r["default"] else ""
        print(
            f"{r['width']:>6} {r['competitors']:>3} {r['threads']:>8} {r['seconds_per_step']:>9.4f} "
            f"{r['speed_vs_default']:>10.2f}x{mark}"
        )
    result = {
        "benchmark": "threads", "cores": cores, "load_average_1min": load, "steps": args.steps,
        "repeats": args.repeats, "tokens_per_step": tokens, "torch": torch.__version__,
        "single_process": single, "workers": multi, "loaded": loaded, "competitor": args.competitor,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
