"""Training throughput: tokens/s of a full training step (forward, backward, AdamW) per scan backend.

The model is the proxy config (``recipes/proxy.yaml``: d_model 256, 2 layers, d_state 16, batch 8,
seq 64 unless overridden), built through :class:`mupt.train.Trainer` exactly as ``mupt scale``
builds it, once per scan backend from the same seed (so the weights are identical).

* CPU: ``torch`` (the fast pure-PyTorch scan) vs ``reference`` (the sequential oracle);
* CUDA (when present): additionally ``triton`` vs ``torch``, under bf16 autocast as ``mupt scale``
  runs on GPU.

Each repeat times one step of every backend in turn, so machine load hits them alike; the table
shows the median step time, tokens/s, and the ratio against the baseline measured in the same run
(``reference`` on CPU, ``torch`` on CUDA).  The first-step losses of the backends are compared as a
sanity check (same weights, same batch -> same loss up to float error).

    python benchmarks/train_throughput.py            # proxy config, 7 repeats
    python benchmarks/train_throughput.py --quick    # smaller model, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mupt.config import RunConfig, load_yaml, with_overrides
from mupt.launch import Autocast
from mupt.scan import triton_available
from mupt.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def make_trainer(cfg: RunConfig, backend: str, device: torch.device, bf16: bool) -> Trainer:
    trainer = Trainer(with_overrides(cfg, {"model.scan_backend": backend}), device=device)
    if bf16:
        trainer.module = Autocast(trainer.model, device.type)
    return trainer


def timed_step(trainer: Trainer) -> tuple[float, float]:
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    t0 = time.perf_counter()
    loss = trainer.train_step()  # float(loss) syncs the device
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return time.perf_counter() - t0, loss


def bench(
    cfg: RunConfig, backends: list[str], baseline: str, device: torch.device, bf16: bool, warmup: int, repeats: int
) -> dict[str, object]:
    trainers = {b: make_trainer(cfg, b, device, bf16) for b in backends}
    first_loss = {b: timed_step(t)[1] for b, t in trainers.items()}  # same weights, same batch
    for _ in range(max(0, warmup - 1)):
        for t in trainers.values():
            timed_step(t)
    times: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(repeats):
        for b, t in trainers.items():
            times[b].append(timed_step(t)[0])
    tokens = cfg.train.batch_size * cfg.train.seq_len
    rows = {}
    base_median = statistics.median(times[baseline])
    for b in backends:
        med = statistics.median(times[b])
        rows[b] = {
            "median_step_s": med,
            "tokens_per_s": tokens / med,
            "speedup_vs_" + baseline: base_median / med,
            "first_step_loss": first_loss[b],
            "step_times_s": times[b],
        }
    spread = max(first_loss.values()) - min(first_loss.values())
    return {
        "device": str(device),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "baseline": baseline,
        "tokens_per_step": tokens,
        "first_step_loss_spread": spread,
        "backends": rows,
    }


def print_table(title: str, res: dict[str, object]) -> None:
    base = res["baseline"]
    print(f"\n{title}  ({res['device']}, {res['precision']}, {res['tokens_per_step']} tokens/step)")
    print(f"{'backend':<10} {'step (ms)':>10} {'tokens/s':>12} {'x ' + str(base):>14} {'1st loss':>10}")
    for b, r in res["backends"].items():  # type: ignore[union-attr]
        print(
            f"{b:<10} {r['median_step_s'] * 1e3:>10.1f} {r['tokens_per_s']:>12,.0f} "
            f"{r['speedup_vs_' + base]:>14.2f} {r['first_step_loss']:>10.4f}"
        )
    print(f"first-step loss spread across backends: {res['first_step_loss_spread']:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "recipes" / "proxy.yaml", help="run config YAML")
    ap.add_argument("--quick", action="store_true", help="d_model 64, seq 32, 3 repeats")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per backend (default 7, --quick 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--cpu-only", action="store_true", help="skip the CUDA comparison even when a GPU is present")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/train_throughput.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_yaml(args.config, RunConfig)
    width = args.width or (64 if args.quick else None)
    seq = args.seq_len or (32 if args.quick else None)
    cfg = with_overrides(cfg, {"model.d_model": width, "train.batch_size": args.batch, "train.seq_len": seq})
    repeats = args.repeats or (3 if args.quick else 7)

    m, tc = cfg.model, cfg.train
    print(
        f"proxy: d_model={m.d_model} layers={m.n_layers} d_state={m.d_state} batch={tc.batch_size} "
        f"seq={tc.seq_len} optimizer={tc.optimizer.value}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results: dict[str, object] = {
        "config": {"d_model": m.d_model, "n_layers": m.n_layers, "d_state": m.d_state, "batch": tc.batch_size,
                   "seq_len": tc.seq_len, "optimizer": tc.optimizer.value},
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0)
                    if torch.cuda.is_available() else None},
        "repeats": repeats,
    }  # fmt: skip
    cpu = bench(cfg, ["torch", "reference"], "reference", torch.device("cpu"), False, args.warmup, repeats)
    print_table("CPU: torch scan vs reference scan", cpu)
    results["cpu"] = cpu
    if torch.cuda.is_available() and not args.cpu_only:
        backends = ["triton", "torch"] if triton_available() else ["torch"]
        gpu = bench(cfg, backends, "torch", torch.device("cuda"), True, max(args.warmup, 3), repeats)
        print_table("CUDA: triton scan vs torch scan", gpu)
        if not triton_available():
            print("triton is not importable: CUDA row shows the torch scan only")
        results["cuda"] = gpu
    out = args.out or ROOT / "benchmarks" / "results" / ("train_throughput_quick.json" if args.quick else
                                                         "train_throughput.json")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: {b: round(r["tokens_per_s"], 1) for b, r in v["backends"].items()}  # type: ignore[union-attr]
                      for k, v in results.items() if k in ("cpu", "cuda")}))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
