"""GPU benchmark of the Triton SSD (Mamba-2's scan) against the chunked torch SSD and the copy bandwidth.

For every (nheads, length, d_state, dtype) it measures, with CUDA events and the median of several
repeats, ``mupt.scan.ssd_scan`` with ``backend="triton"`` and ``backend="torch"`` on the same GPU:

* the forward (inputs need grad) and forward+backward times, and their ratio torch / triton,
* the device's copy bandwidth: a 1 GiB ``clone`` counted as bytes read + bytes written over time,
* the Triton forward's achieved bandwidth under the bytes-moved model below, as a fraction of it.

Bytes-moved model of the Triton forward (``s`` = bytes per activation element: 4 fp32, 2 bf16;
``c`` = number of chunks = ceil(L / Q), Q = the kernels' chunk)::

    read   x twice (chunk state, chunk scan)          2 * B * L * H * P * s
    read   B twice, C once (per group)                3 * B * L * G * N * s
    read   dt twice, cumulative dt*A twice            4 * B * L * H * 4
    write  y                                          B * L * H * P * s
    write + read chunk states, write + read states    4 * B * c * H * P * N * 4
    (A, D and the final state are negligible and not counted; the host's cumsum of dt*A is timed, not counted)

Inputs are Mamba-2-like: dt = softplus(.) in fp32 (as the model passes it), A in [-16, -1], a D skip,
ngroups 1; x, B, C in the benchmarked dtype.  No target is asserted: the first GPU session that
runs this records the numbers (none were measured when the kernels were written: no GPU was lent).

    python benchmarks/ssd_gpu.py          # B=8, headdim 64, H in {24, 64}, N=128, L in {512, 2048, 8192}
    python benchmarks/ssd_gpu.py --heads 24 --lengths 2048 --dtypes bf16 --out /tmp/ssd.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_timing import DTYPES, copy_bandwidth, cuda_time_ms


def make_inputs(
    batch: int, length: int, nheads: int, headdim: int, d_state: int, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32)

    return {
        "x": r(batch, length, nheads, headdim).to(dtype),
        "dt": F.softplus(r(batch, length, nheads) - 2.0),
        "A": -torch.empty(nheads, device="cuda").uniform_(1.0, 16.0, generator=g),
        "B": r(batch, length, 1, d_state).to(dtype),
        "C": r(batch, length, 1, d_state).to(dtype),
        "D": r(nheads),
    }


def forward_bytes(batch: int, length: int, nheads: int, headdim: int, d_state: int, elem: int, q: int) -> int:
    chunks = math.ceil(length / q)
    acts = 3 * batch * length * nheads * headdim * elem + 3 * batch * length * d_state * elem
    vecs = 4 * batch * length * nheads * 4
    states = 4 * batch * chunks * nheads * headdim * d_state * 4
    return acts + vecs + states


def bench_backend(
    backend: str, inputs: dict[str, torch.Tensor], chunk: int, repeats: int, warmup: int
) -> dict[str, float]:
    """Times (ms) of mupt.scan.ssd_scan with this backend: forward (inputs need grad) and forward+backward."""
    from mupt.scan import ssd_scan

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return ssd_scan(**leaves, chunk_size=chunk, backend=backend)

    y, last = run()
    gy, gl = torch.randn_like(y), torch.randn_like(last)
    del y, last

    def fwd_bwd() -> None:
        y, s = run()
        torch.autograd.backward((y, s), (gy, gl))
        for t in leaves.values():
            t.grad = None

    return {"fwd": cuda_time_ms(run, repeats, warmup), "fwd_bwd": cuda_time_ms(fwd_bwd, repeats, warmup)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, nargs="+", default=[24, 64], help="nheads (d_inner = heads * headdim)")
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--state", type=int, default=128)
    p.add_argument("--chunk", type=int, default=64, help="chunk_size passed to both backends")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=20, help="timed repeats (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (the first ones compile)")
    p.add_argument("--out", default="benchmarks/results/ssd_gpu.json")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("ssd_gpu: CUDA is needed to benchmark the Triton SSD; no GPU found, nothing measured.")
        return 0

    from mupt.scan.triton_ssd import kernel_chunk

    torch.backends.cuda.matmul.allow_tf32 = False
    device_name = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth(max(args.repeats, 10))
    print(f"device: {device_name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (1 GiB clone, read + write)")
    q = kernel_chunk(args.chunk)
    header = (
        f"{'heads':>5} {'L':>5} {'dtype':>5} | {'fwd ms':>8} {'GB/s':>6} {'%copy':>6} | {'fwd+bwd ms':>10} | "
        f"{'torch fwd':>9} {'torch f+b':>9} {'f+b ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for heads in args.heads:
        for length in args.lengths:
            for dname in args.dtypes:
                inputs = make_inputs(args.batch, length, heads, args.headdim, args.state, DTYPES[dname])
                tri = bench_backend("triton", inputs, args.chunk, args.repeats, args.warmup)
                ref = bench_backend("torch", inputs, args.chunk, max(3, args.repeats // 4), 1)
                elem = inputs["x"].element_size()
                nbytes = forward_bytes(args.batch, length, heads, args.headdim, args.state, elem, q)
                gbps = nbytes / (tri["fwd"] * 1e-3)
                row = {
                    "batch": args.batch,
                    "nheads": heads,
                    "headdim": args.headdim,
                    "d_state": args.state,
                    "length": length,
                    "dtype": dname,
                    "kernel_chunk": q,
                    "triton_fwd_ms": tri["fwd"],
                    "triton_fwd_bwd_ms": tri["fwd_bwd"],
                    "torch_fwd_ms": ref["fwd"],
                    "torch_fwd_bwd_ms": ref["fwd_bwd"],
                    "ratio_fwd_bwd": ref["fwd_bwd"] / tri["fwd_bwd"],
                    "fwd_bytes": nbytes,
                    "fwd_bytes_per_s": gbps,
                    "fwd_fraction_of_copy": gbps / copy_bw,
                }
                rows.append(row)
                del inputs
                torch.cuda.empty_cache()
                print(
                    f"{heads:>5} {length:>5} {dname:>5} | {tri['fwd']:8.3f} {gbps / 1e9:6.0f} "
                    f"{100 * gbps / copy_bw:5.1f}% | {tri['fwd_bwd']:10.3f} | {ref['fwd']:9.2f} "
                    f"{ref['fwd_bwd']:9.2f} {row['ratio_fwd_bwd']:8.1f}x",
                    flush=True,
                )
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "copy_bandwidth_bytes_per_s": copy_bw,
        "bytes_model": __doc__.split("Bytes-moved model")[1].split("Inputs are")[0].strip(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
