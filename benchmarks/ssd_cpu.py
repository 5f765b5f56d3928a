"""Mamba-2's SSD on CPU: the chunked torch SSD vs the sequential reference, and a full training step vs
transformers' Mamba2ForCausalLM.

Part 1, the scan alone (forward + backward of y and the last state, every input requiring grad):

* ``reference``: :func:`mupt.scan.ssd_reference.ssd_reference`, the sequential oracle under autograd;
* ``chunked``: :func:`mupt.scan.ssd_torch.ssd_chunked` (quadratic form inside chunks, state passing).

Part 2, one full training step (forward, cross-entropy, backward, AdamW step) of the same-shape
language model: mupt's ``MambaLM`` with ``arch: mamba2`` vs ``transformers.Mamba2ForCausalLM`` on its
CPU path (torch fallbacks of mamba_ssm's kernels), with identical weights and the same chunk size.

Each repeat times every implementation in turn (machine load hits them alike); the tables show
medians and ratios measured in the same run.  Targets (issue 17): chunked >= 5x the reference at
B=8, 8 heads, headdim 64, N=64, L=1024 on 2 cores.

    python benchmarks/ssd_cpu.py             # the issue's shape; a few minutes on 2 cores
    python benchmarks/ssd_cpu.py --quick     # small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mupt.config import ModelConfig
from mupt.model import MambaLM, to_mamba_ssm_state_dict
from mupt.scan.ssd_reference import ssd_reference
from mupt.scan.ssd_torch import ssd_chunked

try:  # the machine description helper of the Mamba-1 scan benchmark
    from scan_cpu import machine_info  # type: ignore[import-not-found]
except ImportError:  # run from another directory
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from scan_cpu import machine_info  # type: ignore[import-not-found]


def make_inputs(batch: int, length: int, nheads: int, headdim: int, ngroups: int, d_state: int) -> list[Tensor]:
    """Mamba-2-like: dt = softplus(.) log-uniform-ish in [1e-3, 1e-1], A ~ -U[1, 16] (mamba_ssm's init)."""
    g = torch.Generator().manual_seed(0)
    dt = F.softplus(torch.randn(batch, length, nheads, generator=g) - 4.0)
    return [
        torch.randn(batch, length, nheads, headdim, generator=g),
        dt,
        -(1.0 + 15.0 * torch.rand(nheads, generator=g)),
        torch.randn(batch, length, ngroups, d_state, generator=g),
        torch.randn(batch, length, ngroups, d_state, generator=g),
    ]


def scan_fwd_bwd(fn: Callable[..., tuple[Tensor, Tensor]], inputs: list[Tensor]) -> tuple[float, list[Tensor]]:
    leaves = [t.clone().requires_grad_() for t in inputs]
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    y, last = fn(*leaves)
    ((y * torch.randn(y.shape, generator=gen)).sum() + last.sum()).backward()
    elapsed = time.perf_counter() - t0
    return elapsed, [y.detach(), last.detach()] + [t.grad for t in leaves]  # type: ignore[misc]


def saved_mb(fn: Callable[..., tuple[Tensor, Tensor]], inputs: list[Tensor]) -> float:
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    leaves = [t.clone().requires_grad_() for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves)
    return sum(storages.values()) / 2**20


def max_rel_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item() for x, y in zip(a, b, strict=True))


def build_models(cfg: ModelConfig) -> dict[str, torch.nn.Module]:
    import transformers

    torch.manual_seed(0)
    ours = MambaLM(cfg)
    hf_cfg = transformers.Mamba2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, state_size=cfg.d_state, num_hidden_layers=cfg.n_layers,
        expand=cfg.expand, conv_kernel=cfg.d_conv, num_heads=cfg.nheads, head_dim=cfg.headdim, n_groups=cfg.ngroups,
        chunk_size=cfg.chunk_size, use_bias=False, use_conv_bias=True, layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=False,
    )  # fmt: skip
    hf = transformers.Mamba2ForCausalLM(hf_cfg)
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in to_mamba_ssm_state_dict(ours).items()}
    hf.load_state_dict(sd, strict=True)
    return {"mupt": ours.train(), "transformers": hf.train()}


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: Tensor) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = model(ids[:, :-1])
    logits = out if isinstance(out, Tensor) else out.logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke run)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--nheads", type=int, default=None)
    ap.add_argument("--headdim", type=int, default=None)
    ap.add_argument("--state", type=int, default=None)
    ap.add_argument("--ngroups", type=int, default=1)
    ap.add_argument("--length", type=int, default=None)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2, help="blocks of the training-step models")
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (--quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/ssd_cpu.json)")
    args = ap.parse_args()
    if args.out is None:
        args.out = Path(__file__).parent / "results" / ("ssd_cpu_quick.json" if args.quick else "ssd_cpu.json")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    q = args.quick
    batch, nheads = args.batch or (2 if q else 8), args.nheads or (4 if q else 8)
    headdim, state = args.headdim or (16 if q else 64), args.state or (16 if q else 64)
    length, repeats = args.length or (128 if q else 1024), args.repeats or (2 if q else 5)
    info = machine_info()
    print(
        f"SSD fwd+bwd, CPU: {info['cpu']} ({info['cpu_count']} cores, torch {info['torch']}, "
        f"{info['torch_threads']} threads, load {info['loadavg_start']}); B={batch} heads={nheads} "
        f"headdim={headdim} N={state} ngroups={args.ngroups} L={length} chunk={args.chunk_size}",
        flush=True,
    )

    # --- part 1: the scan
    inputs = make_inputs(batch, length, nheads, headdim, args.ngroups, state)
    impls: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
        "reference": ssd_reference,
        "chunked": lambda *t: ssd_chunked(*t, chunk_size=args.chunk_size),
    }
    scan_fwd_bwd(impls["chunked"], make_inputs(batch, 8, nheads, headdim, args.ngroups, state))  # warm-up
    times: dict[str, list[float]] = {n: [] for n in impls}
    results: dict[str, list[Tensor]] = {}
    for r in range(repeats):
        for name, fn in impls.items():
            elapsed, res = scan_fwd_bwd(fn, inputs)
            times[name].append(elapsed)
            if r == 0:
                results[name] = res
    scan = {
        name: {"median_s": statistics.median(t), "times_s": t, "saved_mb": saved_mb(impls[name], inputs)}
        for name, t in times.items()
    }
    scan_speedup = scan["reference"]["median_s"] / scan["chunked"]["median_s"]
    scan_diff = max_rel_diff(results["chunked"], results["reference"])
    results.clear()

    # --- part 2: a full training step
    cfg = ModelConfig(
        arch="mamba2", d_model=nheads * headdim // 2, n_layers=args.layers, d_state=state, headdim=headdim,
        ngroups=args.ngroups, chunk_size=args.chunk_size, scan_backend="torch",
    )  # fmt: skip
    models = build_models(cfg)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-3) for n, m in models.items()}
    ids = torch.randint(0, cfg.vocab_size, (batch, length + 1), generator=torch.Generator().manual_seed(2))
    step_times: dict[str, list[float]] = {n: [] for n in models}
    first_loss: dict[str, float] = {}
    for n in models:  # warm-up step (also checks the two start from the same loss)
        first_loss[n] = train_step(models[n], opts[n], ids[:, :65])[1]
    for _ in range(repeats):
        for n in models:
            step_times[n].append(train_step(models[n], opts[n], ids)[0])
    step = {n: {"median_s": statistics.median(t), "times_s": t} for n, t in step_times.items()}
    step_speedup = step["transformers"]["median_s"] / step["mupt"]["median_s"]
    tokens = batch * length

    print()
    print(f"| {'SSD fwd+bwd':<14} | {'median s':>9} | {'vs reference':>12} | {'saved MB':>8} |")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 14}|{'-' * 10}|")
    for name, m in scan.items():
        ratio = scan["reference"]["median_s"] / m["median_s"]
        print(f"| {name:<14} | {m['median_s']:>9.3f} | {ratio:>11.1f}x | {m['saved_mb']:>8.1f} |")
    print(f"max relative difference chunked vs reference (y, last state, 5 grads): {scan_diff:.1e}")
    print()
    print(f"| {'train step':<14} | {'median s':>9} | {'tokens/s':>9} | {'vs transformers':>15} |")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 11}|{'-' * 17}|")
    for name, m in step.items():
        ratio = step["transformers"]["median_s"] / m["median_s"]
        print(f"| {name:<14} | {m['median_s']:>9.3f} | {tokens / m['median_s']:>9.0f} | {ratio:>14.2f}x |")
    print(
        f"first-step loss (same weights): mupt {first_loss['mupt']:.5f}, transformers {first_loss['transformers']:.5f}"
    )
    info["loadavg_end"] = list(os.getloadavg())
    result = {
        "machine": info,
        "args": {**vars(args), "out": str(args.out)},
        "shape": {"batch": batch, "nheads": nheads, "headdim": headdim, "d_state": state, "length": length},
        "scan": scan, "scan_speedup_vs_reference": scan_speedup, "scan_max_rel_diff": scan_diff,
        "train_step": step, "train_step_speedup_vs_transformers": step_speedup, "model": cfg.model_dump(mode="json"),
        "first_loss": first_loss,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
