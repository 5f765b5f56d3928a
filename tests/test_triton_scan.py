"""Triton selective scan vs the sequential reference.

On CPU the kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` is set here, before
``mupt.scan.triton_scan`` is imported (``@triton.jit`` reads it when it decorates; nothing else in
the package imports that module on CPU).  Tiny shapes keep it fast; the GPU-only tests at the
bottom cover long sequences in fp32 and bf16.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed; the triton scan backend cannot run")

import numpy as np  # noqa: E402

from mupt.errors import ScanError  # noqa: E402
from mupt.scan import selective_scan  # noqa: E402
from mupt.scan import triton_scan as ts  # noqa: E402
from mupt.scan.reference import selective_scan_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# --- faster, equivalent interpreter scans and reductions ----------------------------------------
# Triton's interpreter evaluates tl.associative_scan / tl.reduce with a custom combine (our scans,
# and the xor reductions inside tl.flip) one element at a time in Python (~0.3 ms per element).
# These replacements fold the same combine over whole slices along the axis: the same sequence of
# fp32 operations per element, so bitwise-equal results (test_fast_interpreter_ops_are_bitwise_equal
# checks that against the stock versions).


def _fold(self, inputs, axis: int) -> tuple[list[np.ndarray], list]:
    """Sequential fold of combine_fn along `axis`; returns (inclusive results per step, final acc)."""
    datas = [np.moveaxis(arg.handle.data, axis, 0) for arg in inputs]
    steps: list[np.ndarray] = [np.empty_like(d) for d in datas]
    acc = None
    for i in range(datas[0].shape[0]):
        cur = tuple(self.to_tensor(np.ascontiguousarray(d[i]), arg.dtype) for d, arg in zip(datas, inputs, strict=True))
        if acc is None:
            acc = cur
        else:
            ret = self.combine_fn.fn(*acc, *cur)
            acc = ret if isinstance(ret, tuple) else (ret,)
        for o, a in zip(steps, acc, strict=True):
            o[i] = np.asarray(a.handle.data).reshape(o[i].shape)
    return steps, list(acc)


def _fast_generic_scan(self, inputs):
    steps, _ = _fold(self, inputs, self.axis)
    return [
        self.to_tensor(np.ascontiguousarray(np.moveaxis(o, 0, self.axis)), a.dtype)
        for o, a in zip(steps, inputs, strict=True)
    ]


def _fast_generic_reduce(self, inputs):
    original_axis = self.axis
    inputs, axis = self.unravel(inputs, self.axis)
    steps, _ = _fold(self, inputs, axis)
    ret = []
    for o, arg in zip(steps, inputs, strict=True):
        data = np.ascontiguousarray(o[-1])
        if self.keep_dims:
            data = (
                np.expand_dims(data, axis) if original_axis is not None else data.reshape((1,) * arg.handle.data.ndim)
            )
        elif original_axis is None:
            data = data.item()
        ret.append(self.to_tensor(data, arg.dtype))
    return ret


def _interp_ops() -> tuple[type, type] | None:
    try:
        from triton.runtime.interpreter import ReduceOps, ScanOps
    except ImportError:
        return None
    ok = hasattr(ScanOps, "generic_scan") and hasattr(ReduceOps, "generic_reduce")
    return (ScanOps, ReduceOps) if ok else None


_STOCK = _interp_ops()
_STOCK_SCAN = _STOCK[0].generic_scan if _STOCK else None
_STOCK_REDUCE = _STOCK[1].generic_reduce if _STOCK else None


@pytest.fixture(autouse=True, scope="module")
def _test_environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        # On a GPU, correctness tests use each kernel's preferred config rather than autotuning every
        # tiny shape (read per new shape; the long-sequence tests turn autotuning back on).
        if "MUPT_TRITON_AUTOTUNE" not in os.environ:
            mp.setenv("MUPT_TRITON_AUTOTUNE", "0")
        ops = _interp_ops() if ts._INTERPRET else None
        if ops is not None:
            mp.setattr(ops[0], "generic_scan", _fast_generic_scan)
            mp.setattr(ops[1], "generic_reduce", _fast_generic_reduce)
        yield


@pytest.fixture(autouse=True)
def _usable() -> None:
    assert CUDA or ts._INTERPRET, (
        "mupt.scan.triton_scan was imported before TRITON_INTERPRET=1 was set; on CPU it must be imported "
        "after this test module sets it"
    )


# --- helpers -----------------------------------------------------------------------------------


def make_inputs(
    batch: int,
    dim: int,
    n: int,
    length: int,
    *,
    z: bool = True,
    D: bool = True,
    bias: bool = True,
    softplus: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device = DEVICE,
    seed: int = 0,
) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    u = r(batch, dim, length)
    if softplus:  # pre-activations of both signs
        delta = r(batch, dim, length) - 1.0
    else:  # already a positive step size
        delta = torch.rand(batch, dim, length, generator=g) * 0.5 + 0.02
    A = -torch.exp(0.5 * r(dim, n))
    Bm, Cm = r(batch, n, length), r(batch, n, length)
    Dv = r(dim) if D else None
    zt = r(batch, dim, length) if z else None
    bv = 0.2 * torch.rand(dim, generator=g) if bias else None
    act = [u, delta, A, Bm, Cm, Dv, zt, bv]
    low = {0, 1, 3, 4, 6}  # activations in the low-precision dtype, parameters stay fp32
    return [
        None if t is None else t.to(device=device, dtype=dtype if i in low else torch.float32)
        for i, t in enumerate(act)
    ]


def run_scan(fn, inputs, softplus: bool, disc: str, seed: int = 1, **kw):
    """Forward + one backward of out·go + last_state·gl; returns (out, last_state, grads)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    out, last = fn(*leaves, delta_softplus=softplus, discretization=disc, **kw)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    gl = torch.randn(last.shape, generator=g).to(last.device, last.dtype)
    loss = (out.float() * go.float()).sum() + (last * gl).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    it = iter(grads)
    return out.detach(), last.detach(), [None if t is None else next(it) for t in leaves]


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    scale = max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}"
    )


def compare(inputs, softplus: bool, disc: str, rtol: float = 1e-4, atol: float = 1e-5, **kw) -> None:
    out, last, grads = run_scan(ts.selective_scan_triton, inputs, softplus, disc, **kw)
    r_out, r_last, r_grads = run_scan(selective_scan_reference, inputs, softplus, disc)
    assert_close("out", out, r_out, rtol, atol)
    assert last.dtype == torch.float32
    assert_close("last_state", last, r_last, rtol, atol)
    for name, g, rg in zip(NAMES, grads, r_grads, strict=True):
        assert (g is None) == (rg is None), name
        if g is not None:
            assert_close(f"d{name}", g, rg, rtol, atol)


# --- CPU (interpreter) and GPU: tiny shapes vs the reference -------------------------------------

# (discretization, dim, N, L, z, D, delta_bias, softplus); dim 6 = two channel blocks (one partial)
CASES = [
    ("euler", 6, 4, 40, True, True, True, True),
    ("zoh", 6, 4, 40, True, True, True, True),
    ("euler", 6, 4, 40, False, False, False, False),
    ("zoh", 6, 4, 40, False, False, False, False),
    ("euler", 6, 16, 64, True, False, True, False),
    ("zoh", 6, 16, 64, False, True, False, True),
    ("euler", 12, 4, 7, False, True, True, True),
    ("zoh", 6, 16, 33, True, True, False, False),
]


@pytest.mark.parametrize(("disc", "dim", "n", "length", "z", "D", "bias", "softplus"), CASES)
def test_matches_reference(
    disc: str, dim: int, n: int, length: int, z: bool, D: bool, bias: bool, softplus: bool
) -> None:
    inputs = make_inputs(2, dim, n, length, z=z, D=D, bias=bias, softplus=softplus)
    compare(inputs, softplus, disc)


@pytest.mark.parametrize(("disc", "n"), [("euler", 4), ("zoh", 16)])
def test_sequence_split_matches_reference(disc: str, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # checkpoints every 16 steps so that L=48 splits into three chunks
    monkeypatch.setattr(ts, "_ckpt_len", lambda block_n: 16)
    inputs = make_inputs(2, 6, n, 48, seed=3)
    s = ts._Setup(inputs[0], inputs[2], inputs[5], inputs[6], inputs[7], True, disc == "zoh", 3)
    assert s.n_chunks == 3 and s.chunk_len == 16
    compare(inputs, True, disc, seq_chunks=3)


def test_sequence_split_uneven_tail() -> None:
    # two chunks of unequal length (CPU: 32 + 20 steps; GPU: 48 + 36)
    inputs = make_inputs(1, 6, 4, 84 if CUDA else 52, z=False, seed=5)
    compare(inputs, True, "euler", seq_chunks=2)


def test_backward_is_deterministic() -> None:
    inputs = make_inputs(2, 6, 16, 40, seed=7)
    first = run_scan(ts.selective_scan_triton, inputs, True, "zoh")
    second = run_scan(ts.selective_scan_triton, inputs, True, "zoh")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name, a, b in zip(NAMES, first[2], second[2], strict=True):
        assert torch.equal(a, b), f"d{name} differs between two identical backward runs"


def test_bf16_inputs() -> None:
    inputs = make_inputs(2, 6, 4, 40, dtype=torch.bfloat16, seed=11)
    out, last, grads = run_scan(ts.selective_scan_triton, inputs, True, "euler")
    r_out, r_last, r_grads = run_scan(selective_scan_reference, inputs, True, "euler")
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert_close("out", out, r_out, 2e-2, 1e-2)
    assert_close("last_state", last, r_last, 1e-4, 1e-5)
    for name, g, rg in zip(NAMES, grads, r_grads, strict=True):
        assert g.dtype == rg.dtype, name
        assert_close(f"d{name}", g, rg, 2e-2, 1e-2)


def test_only_one_output_used() -> None:
    inputs = make_inputs(2, 6, 4, 20, seed=13)
    for pick in (0, 1):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        ref_leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        ts.selective_scan_triton(*leaves, delta_softplus=True)[pick].sum().backward()
        selective_scan_reference(*ref_leaves, delta_softplus=True)[pick].sum().backward()
        for name, a, b in zip(NAMES, leaves, ref_leaves, strict=True):
            # the reference leaves .grad None where the used output does not depend on a leaf
            expected = b.grad if b.grad is not None else torch.zeros_like(b)
            assert_close(f"d{name} (output {pick})", a.grad, expected, 1e-4, 1e-5)


def test_dispatcher_uses_triton_and_no_grad_path_matches() -> None:
    inputs = make_inputs(1, 4, 4, 16, seed=17)
    with torch.no_grad():  # no checkpoints are written on this path
        direct = ts.selective_scan_triton(*inputs, True, "zoh")
        via = selective_scan(*inputs, delta_softplus=True, discretization="zoh", backend="triton")
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    training = ts.selective_scan_triton(*leaves, True, "zoh")
    for a, b, c in zip(direct, via, training, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c.detach())


def test_rejects_bad_arguments() -> None:
    inputs = make_inputs(1, 4, 4, 8, seed=19)
    with pytest.raises(ScanError, match="discretization"):
        ts.selective_scan_triton(*inputs, discretization="bilinear")
    with pytest.raises(ScanError, match="seq_chunks"):
        ts.selective_scan_triton(*inputs, seq_chunks=0)


@pytest.mark.skipif(not ts._INTERPRET or _STOCK is None, reason="only meaningful under the interpreter")
def test_fast_interpreter_ops_are_bitwise_equal(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_inputs(1, 4, 4, 20, seed=23)
    fast = run_scan(ts.selective_scan_triton, inputs, True, "zoh")
    assert _STOCK is not None
    monkeypatch.setattr(_STOCK[0], "generic_scan", _STOCK_SCAN)
    monkeypatch.setattr(_STOCK[1], "generic_reduce", _STOCK_REDUCE)
    stock = run_scan(ts.selective_scan_triton, inputs, True, "zoh")
    assert torch.equal(fast[0], stock[0]) and torch.equal(fast[1], stock[1])
    for name, a, b in zip(NAMES, fast[2], stock[2], strict=True):
        assert torch.equal(a, b), name


# --- GPU only: long sequences -----------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("length", [1000, 4096])
@pytest.mark.parametrize("disc", ["euler", "zoh"])
def test_long_sequence_fp32(length: int, disc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUPT_TRITON_AUTOTUNE", "1")
    inputs = make_inputs(2, 64, 16, length, seed=29)
    compare(inputs, True, disc, rtol=1e-3, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("length", [1000, 4096])
def test_long_sequence_bf16(length: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUPT_TRITON_AUTOTUNE", "1")
    inputs = make_inputs(2, 64, 16, length, dtype=torch.bfloat16, seed=31)
    out, last, grads = run_scan(ts.selective_scan_triton, inputs, True, "euler")
    r_out, r_last, r_grads = run_scan(selective_scan_reference, inputs, True, "euler")
    assert out.dtype == torch.bfloat16
    assert_close("out", out, r_out, 3e-2, 2e-2)
    assert_close("last_state", last, r_last, 1e-3, 1e-4)
    for name, g, rg in zip(NAMES, grads, r_grads, strict=True):
        assert_close(f"d{name}", g, rg, 3e-2, 2e-2)


@needs_cuda
@pytest.mark.parametrize("seq_chunks", [None, 4])  # None: the automatic split (batch 1 is too small)
def test_long_sequence_split_and_determinism(seq_chunks: int | None) -> None:
    inputs = make_inputs(1, 32, 16, 4096, seed=37)
    compare(inputs, True, "zoh", rtol=1e-3, atol=1e-4, seq_chunks=seq_chunks)
    first = run_scan(ts.selective_scan_triton, inputs, True, "zoh", seq_chunks=seq_chunks)
    second = run_scan(ts.selective_scan_triton, inputs, True, "zoh", seq_chunks=seq_chunks)
    for name, a, b in zip(NAMES, first[2], second[2], strict=True):
        assert torch.equal(a, b), f"d{name} is not bitwise reproducible"


@needs_cuda
def test_automatic_split_for_small_batch() -> None:
    # batch 1 x one 32-channel block cannot fill a GPU: the automatic plan must split the sequence
    inputs = make_inputs(1, 32, 16, 4096, seed=41)
    s = ts._Setup(inputs[0], inputs[2], inputs[5], inputs[6], inputs[7], True, False, None)
    assert s.n_chunks > 1
    compare(inputs, True, "euler", rtol=1e-3, atol=1e-4)
