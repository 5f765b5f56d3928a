"""Selective scan on CPU: forward + backward wall time of the torch backend vs the reference.

Three implementations, each called with the full Mamba argument set (D, z, delta_bias, softplus):

* ``reference``: ``mupt.scan`` backend "reference", the sequential oracle under autograd;
* ``torch``: ``mupt.scan`` backend "torch" (custom autograd.Function, chunked recompute);
* ``naive``: written here, the slow path most Mamba code falls back to (mamba_ssm's
  ``selective_scan_ref``): materialise ``exp(dt*A)`` and ``Bbar*u`` for the whole sequence
  (batch, dim, length, state), then loop ``x = dA[:, :, t] * x + dBu[:, :, t]`` under autograd.

Each repeat times every implementation in turn (so machine load hits them alike); the table shows
medians and ratios to the reference measured in the same run.  An implementation whose runs at
one length pass ``--budget`` seconds gets fewer repeats (at least one).  "saved MB" is what autograd keeps
for backward (distinct storages), measured in a separate forward.

    python benchmarks/scan_cpu.py            # B=8, D=256, N=16, L in {256, 1024}; a few minutes on 2 cores
    python benchmarks/scan_cpu.py --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mupt.scan import selective_scan

IMPLS = ("reference", "torch", "naive")


def naive_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    discretization: str = "euler",
) -> tuple[Tensor, Tensor]:
    """mamba_ssm's ``selective_scan_ref`` pattern: whole-sequence (b, d, L, n) tensors, per-step indexing."""
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if discretization == "zoh":
        deltaB_u = (deltaA - 1.0) / A[None, :, None, :] * torch.einsum("bnl,bdl->bdln", B, u)
    else:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        x = deltaA[:, :, t] * x + deltaB_u[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, t]))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.float()[None, :, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype_in), x


def impl_fn(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    if name == "naive":
        return naive_scan

    def fn(*args: Tensor, **kw: object) -> tuple[Tensor, Tensor]:
        return selective_scan(*args, backend=name, **kw)  # type: ignore[arg-type, misc]

    return fn


def make_inputs(batch: int, dim: int, state: int, length: int, seed: int = 0) -> list[Tensor]:
    """Mamba-like: A_n = -(n+1), dt = softplus(delta + bias) in about [1e-3, 1e-1]."""
    g = torch.Generator().manual_seed(seed)
    A = -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1)
    dt0 = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    delta_bias = dt0 + torch.log(-torch.expm1(-dt0))
    return [
        torch.randn(batch, dim, length, generator=g),  # u
        0.5 * torch.randn(batch, dim, length, generator=g),  # delta
        A,
        torch.randn(batch, state, length, generator=g),  # B
        torch.randn(batch, state, length, generator=g),  # C
        torch.randn(dim, generator=g),  # D
        torch.randn(batch, dim, length, generator=g),  # z
        delta_bias,
    ]


def fwd_bwd(fn: Callable[..., tuple[Tensor, Tensor]], inputs: list[Tensor], disc: str) -> tuple[float, list[Tensor]]:
    leaves = [t.clone().requires_grad_() for t in inputs]
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    out, last = fn(*leaves, delta_softplus=True, discretization=disc)
    loss = (out * torch.randn(out.shape, generator=gen)).sum() + last.sum()
    loss.backward()
    elapsed = time.perf_counter() - t0
    return elapsed, [out.detach(), last.detach()] + [t.grad for t in leaves]  # type: ignore[misc]


def saved_mb(fn: Callable[..., tuple[Tensor, Tensor]], inputs: list[Tensor], disc: str) -> float:
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    leaves = [t.clone().requires_grad_() for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves, delta_softplus=True, discretization=disc)
    return sum(storages.values()) / 2**20


def max_rel_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item() for x, y in zip(a, b, strict=True))


def machine_info() -> dict[str, object]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per implementation (default 5, --quick 2)")
    ap.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="stop repeating an implementation once its runs at one length took this many seconds (min 1 run)",
    )
    ap.add_argument("--discretization", default="zoh", choices=["zoh", "euler"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/scan_cpu.json, --quick: _quick)")
    args = ap.parse_args()
    if args.out is None:
        args.out = Path(__file__).parent / "results" / ("scan_cpu_quick.json" if args.quick else "scan_cpu.json")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch = args.batch or (2 if args.quick else 8)
    dim = args.dim or (32 if args.quick else 256)
    lengths = [int(x) for x in (args.lengths or ("64,128" if args.quick else "256,1024")).split(",")]
    repeats = args.repeats or (2 if args.quick else 5)

    info = machine_info()
    print(
        f"selective scan fwd+bwd, CPU: {info['cpu']} ({info['cpu_count']} cores, torch {info['torch']}, "
        f"{info['torch_threads']} threads, load {info['loadavg_start']}); B={batch} D={dim} N={args.state}, "
        f"{args.discretization}, D/z/delta_bias/softplus on"
    )
    cases = []
    for length in lengths:
        inputs = make_inputs(batch, dim, args.state, length)
        times: dict[str, list[float]] = {name: [] for name in IMPLS}
        results: dict[str, list[Tensor]] = {}
        fwd_bwd(impl_fn("torch"), make_inputs(batch, dim, args.state, 8), args.discretization)  # warm-up
        for r in range(repeats):  # round-robin, so load changes hit every implementation alike
            for name in IMPLS:
                if r > 0 and sum(times[name]) > args.budget:
                    continue  # slow one: fewer repeats rather than none
                elapsed, res = fwd_bwd(impl_fn(name), inputs, args.discretization)
                times[name].append(elapsed)
                if r == 0:
                    results[name] = res
                del res
        case = {
            "batch": batch, "dim": dim, "state": args.state, "length": length,
            "discretization": args.discretization,
            "max_rel_diff_vs_reference": {n: max_rel_diff(results[n], results["reference"]) for n in IMPLS[1:]},
            "impls": {},
        }  # fmt: skip
        results.clear()
        ref_median = statistics.median(times["reference"])
        for name in IMPLS:
            med = statistics.median(times[name])
            case["impls"][name] = {
                "median_s": med,
                "min_s": min(times[name]),
                "times_s": times[name],
                "repeats": len(times[name]),
                "speedup_vs_reference": ref_median / med,
                "saved_mb": saved_mb(impl_fn(name), inputs, args.discretization),
            }
        cases.append(case)
        runs = ", ".join(f"{n} {statistics.median(times[n]):.3f}s x{len(times[n])}" for n in IMPLS)
        print(f"L={length}: {runs}", flush=True)

    print()
    print(
        f"| {'L':>5} | {'impl':<9} | {'median s':>9} | {'min s':>8} | {'vs reference':>12} | {'saved MB':>8} | reps |"
    )
    print(f"|{'-' * 7}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 14}|{'-' * 10}|------|")
    for case in cases:
        for name in IMPLS:
            m = case["impls"][name]
            print(
                f"| {case['length']:>5} | {name:<9} | {m['median_s']:>9.3f} | {m['min_s']:>8.3f} | "
                f"{m['speedup_vs_reference']:>11.1f}x | {m['saved_mb']:>8.1f} | {m['repeats']:>4} |"
            )
    for case in cases:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in case["max_rel_diff_vs_reference"].items())
        print(f"L={case['length']}: max relative difference to the reference over out, last_state, grads: {diffs}")
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {"machine": info, "args": {**vars(args), "out": str(args.out)}, "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
