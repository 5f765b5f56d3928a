"""GPU benchmark of the Triton selective scan against the torch backend and the copy bandwidth.

For every (dim, length, dtype) it measures, with CUDA events and the median of several repeats:

* Triton forward time (a training forward: inputs need grad, so it writes the backward's checkpoints),
  forward+backward time, and (JSON only) the inference forward under ``no_grad`` (no checkpoints),
* the torch backend (``backend="torch"``) forward+backward (and forward) on the same GPU, for the ratio,
* the device's copy bandwidth: a 1 GiB ``clone`` counted as bytes read + bytes written over time,
* the forward's achieved bandwidth under the bytes-moved model below, as a fraction of it.

Bytes-moved model of the forward (``s`` = bytes per input element: 4 fp32, 2 bf16)::

    read   u, delta, z          3 * B * D * L * s
    read   B, C                 2 * B * N * L * s      (once per batch row; channel blocks share them via L2)
    write  out                  B * D * L * s
    write  checkpoints          B * ceil(L / CK) * D * N * 4   (fp32 state every CK steps, for the backward)
    (A, D, delta_bias and the (B, D, N) last state are negligible and not counted)

Inputs are Mamba-like: softplus(delta + delta_bias), gate z, skip D, Euler discretization;
activations (u, delta, z, B, C) in the benchmarked dtype, parameters (A, D, delta_bias) fp32.
Targets reported against: forward >= 50% of copy bandwidth; forward+backward >= 10x faster than
the torch backend.

    python benchmarks/scan_gpu.py                       # B=8, D in {1536, 4096}, N=16, L in {512, 2048, 8192}
    python benchmarks/scan_gpu.py --dims 1536 --lengths 2048 --dtypes bf16 --out /tmp/scan.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from gpu_timing import DTYPES, copy_bandwidth, cuda_time_ms

FWD_FRACTION_TARGET = 0.5
SPEEDUP_TARGET = 10.0


def make_inputs(batch: int, dim: int, n: int, length: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dt)

    u, z = r(batch, dim, length), r(batch, dim, length)
    delta = (r(batch, dim, length, dt=torch.float32) * 0.5 - 2.0).to(dtype)
    A = -torch.exp(r(dim, n, dt=torch.float32) * 0.5)
    B, C = r(batch, n, length), r(batch, n, length)
    D = r(dim, dt=torch.float32)
    bias = 0.1 * r(dim, dt=torch.float32)
    return [u, delta, A, B, C, D, z, bias]


def forward_bytes(batch: int, dim: int, n: int, length: int, elem: int, ck: int) -> int:
    acts = 4 * batch * dim * length * elem  # u, delta, z read; out written
    bc = 2 * batch * n * length * elem
    ckpt = batch * math.ceil(length / ck) * dim * n * 4
    return acts + bc + ckpt


def bench_backend(backend: str, inputs: list[torch.Tensor], repeats: int, warmup: int) -> dict[str, float]:
    """Times (ms) of mupt.scan.selective_scan with this backend: training forward (inputs need grad,
    so the triton forward writes its checkpoints), forward+backward, and inference forward (no grad)."""
    from mupt.scan import selective_scan

    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]

    def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return selective_scan(*xs, delta_softplus=True, discretization="euler", backend=backend)

    out, last = run(leaves)
    go, gl = torch.randn_like(out), torch.randn_like(last)
    del out, last

    def fwd_bwd() -> None:
        o, s = run(leaves)
        torch.autograd.backward((o, s), (go, gl))
        for t in leaves:
            t.grad = None

    def infer() -> None:
        with torch.no_grad():
            run(inputs)

    return {
        "fwd": cuda_time_ms(lambda: run(leaves), repeats, warmup),
        "fwd_bwd": cuda_time_ms(fwd_bwd, repeats, warmup),
        "infer": cuda_time_ms(infer, repeats, warmup),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dims", type=int, nargs="+", default=[1536, 4096])
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=20, help="timed repeats of the triton calls (median)")
    p.add_argument("--torch-repeats", type=int, default=3, help="timed repeats of the (slow) torch backend")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (the first ones autotune)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch backend (no speed-up ratio)")
    p.add_argument("--out", default="benchmarks/results/scan_gpu.json")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("scan_gpu: CUDA is needed to benchmark the Triton scan; no GPU found, nothing measured.")
        return 0

    from mupt.scan import triton_scan

    torch.backends.cuda.matmul.allow_tf32 = False
    device_name = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth(max(args.repeats, 10))
    print(f"device: {device_name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (1 GiB clone, read + write)")

    rows = []
    header = (
        f"{'dim':>5} {'L':>5} {'dtype':>5} | {'fwd ms':>8} {'GB/s':>6} {'%copy':>6} | {'fwd+bwd ms':>10} | "
        f"{'torch fwd':>9} {'torch f+b':>9} {'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    for dim in args.dims:
        for length in args.lengths:
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                inputs = make_inputs(args.batch, dim, args.state, length, dtype)
                tri = bench_backend("triton", inputs, args.repeats, args.warmup)
                fwd_ms, fb_ms = tri["fwd"], tri["fwd_bwd"]
                ck = triton_scan._ckpt_len(max(triton_scan.triton.next_power_of_2(args.state), 2))
                nbytes = forward_bytes(args.batch, dim, args.state, length, inputs[0].element_size(), ck)
                gbps = nbytes / (fwd_ms * 1e-3)
                row = {
                    "batch": args.batch,
                    "dim": dim,
                    "state": args.state,
                    "length": length,
                    "dtype": dname,
                    "triton_fwd_ms": fwd_ms,
                    "triton_fwd_bwd_ms": fb_ms,
                    "triton_inference_fwd_ms": tri["infer"],
                    "fwd_bytes": nbytes,
                    "fwd_bytes_per_s": gbps,
                    "fwd_fraction_of_copy": gbps / copy_bw,
                    "checkpoint_every": ck,
                    "fwd_config": str(getattr(triton_scan._fwd_kernel, "best_config", None)),
                    "bwd_config": str(getattr(triton_scan._bwd_kernel, "best_config", None)),
                    "torch_fwd_ms": None,
                    "torch_fwd_bwd_ms": None,
                    "speedup_fwd_bwd": None,
                }
                if not args.no_torch:
                    try:
                        ref = bench_backend("torch", inputs, args.torch_repeats, 1)
                    except ImportError as e:  # the torch backend may not be there yet
                        row["torch_error"] = repr(e)
                    else:
                        row.update(
                            torch_fwd_ms=ref["fwd"],
                            torch_fwd_bwd_ms=ref["fwd_bwd"],
                            speedup_fwd_bwd=ref["fwd_bwd"] / fb_ms,
                        )
                rows.append(row)
                del inputs
                torch.cuda.empty_cache()

                def fmt(v: float | None, spec: str) -> str:
                    return "-" if v is None else format(v, spec)

                print(
                    f"{dim:>5} {length:>5} {dname:>5} | {fwd_ms:8.3f} {gbps / 1e9:6.0f} "
                    f"{100 * gbps / copy_bw:5.1f}% | {fb_ms:10.3f} | {fmt(row['torch_fwd_ms'], '9.2f')} "
                    f"{fmt(row['torch_fwd_bwd_ms'], '9.2f')} {fmt(row['speedup_fwd_bwd'], '6.1f')}x",
                    flush=True,
                )

    worst_fraction = min(r["fwd_fraction_of_copy"] for r in rows)
    speedups = [r["speedup_fwd_bwd"] for r in rows if r["speedup_fwd_bwd"] is not None]
    worst_speedup = min(speedups) if speedups else None
    targets = {
        "fwd_fraction_of_copy_target": FWD_FRACTION_TARGET,
        "fwd_fraction_of_copy_worst": worst_fraction,
        "fwd_fraction_met": worst_fraction >= FWD_FRACTION_TARGET,
        "speedup_fwd_bwd_target": SPEEDUP_TARGET,
        "speedup_fwd_bwd_worst": worst_speedup,
        "speedup_met": None if worst_speedup is None else worst_speedup >= SPEEDUP_TARGET,
    }
    print(
        f"forward >= {FWD_FRACTION_TARGET:.0%} of copy bandwidth: worst {worst_fraction:.1%} "
        f"({'met' if targets['fwd_fraction_met'] else 'NOT met'}); fwd+bwd >= {SPEEDUP_TARGET:.0f}x torch: "
        + (
            "not measured"
            if worst_speedup is None
            else f"worst {worst_speedup:.1f}x ({'met' if targets['speedup_met'] else 'NOT met'})"
        )
    )
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "bytes_model": __doc__.split("Bytes-moved model")[1].split("Inputs are")[0].strip(),
        "targets": targets,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
