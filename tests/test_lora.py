"""llmkern.lora_linear / lora_linear_multi: Triton kernels vs the float64 reference.

On a CPU machine the kernels run under TRITON_INTERPRET=1 (conftest) on small odd shapes in
float32/float16; bf16 and the large shapes are @pytest.mark.gpu.
"""
import pytest
import torch

import llmkern
from llmkern import reference as ref
from llmkern.kernels import lora as K
from llmkern.testing import assert_close, interpreter_dtypes, triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="no CUDA and no TRITON_INTERPRET")
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=3e-2, rtol=3e-2),
       torch.bfloat16: dict(atol=8e-2, rtol=8e-2)}


def _inputs(M, K_, N, r, dtype, n=None, bias=True, device=DEV):
    g = lambda *s, sc=1.0: (torch.randn(*s, device=device) * sc).to(dtype)  # noqa: E731
    lead = () if n is None else (n,)
    x = g(M, K_)
    W = g(N, K_, sc=K_ ** -0.5)
    b = g(N) if bias else None
    A = g(*lead, r, K_, sc=K_ ** -0.5)
    B = g(*lead, N, r, sc=r ** -0.5)
    return x, W, b, A, B


def _leaf(t, grad=True):
    return None if t is None else t.detach().clone().requires_grad_(grad)


def _d(t, grad=True):
    return None if t is None else t.detach().double().requires_grad_(grad)


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("M,K_,N,r,p", [(37, 45, 50, 5, 0.0), (19, 64, 33, 16, 0.25), (50, 30, 70, 1, 0.5)])
def test_lora_linear_matches_reference(triton_backend, dtype, M, K_, N, r, p):
    x, W, b, A, B = _inputs(M, K_, N, r, dtype)
    s = 1.7
    xs, Ws, bs, As, Bs = _leaf(x), _leaf(W), _leaf(b), _leaf(A), _leaf(B)
    y = llmkern.lora_linear(xs, Ws, bs, As, Bs, s, p, seed=1234)
    dy = torch.randn_like(y)
    y.backward(dy)
    xd, Wd, bd, Ad, Bd = _d(x), _d(W), _d(b), _d(A), _d(B)
    yr = ref.lora_linear(xd, Wd, bd, Ad, Bd, s, p, seed=1234)
    yr.backward(dy.double())
    tol = TOL[dtype]
    assert y.dtype == dtype
    assert_close(y, yr, msg="y", **tol)
    for name, got, want in (("dx", xs.grad, xd.grad), ("dW", Ws.grad, Wd.grad), ("db", bs.grad, bd.grad),
                            ("dA", As.grad, Ad.grad), ("dB", Bs.grad, Bd.grad)):
        assert_close(got, want, msg=name, **tol)


@needs_triton
def test_dropout_mask_matches_reference_and_regenerates(triton_backend):
    """The kernel's mask is the reference's mask: with B = I-like and W = 0, y is dropout(x) A^T."""
    M, K_, r, p = 24, 40, 16, 0.4
    x = torch.randn(M, K_, device=DEV)
    A = torch.eye(r, K_, device=DEV)
    B = torch.eye(r, r, device=DEV)
    W = torch.zeros(r, K_, device=DEV)
    for seed in (2**63 + 2**40 + 5, 0xFFFFFFFF):  # words >= 2^31 (negative int32) and the top bits
        keep = ref.dropout_keep_mask(M, K_, p, seed, device=DEV)
        want = torch.where(keep, x / (1 - p), torch.zeros_like(x))[:, :r]
        torch.testing.assert_close(llmkern.lora_linear(x, W, None, A, B, 1.0, p, seed=seed), want)
    y = llmkern.lora_linear(x, W, None, A, B, 1.0, p, seed=7)
    keep = ref.dropout_keep_mask(M, K_, p, 7, device=DEV)
    want = torch.where(keep, x / (1 - p), torch.zeros_like(x))[:, :r]
    torch.testing.assert_close(y, want)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.08
    y2 = llmkern.lora_linear(x, W, None, A, B, 1.0, p, seed=8)
    assert not torch.equal(y, y2)
    y5 = llmkern.lora_linear(x, W, None, A, B, 1.0, p, seed=K.seed_tensor(7, DEV))
    torch.testing.assert_close(y5, y, rtol=0, atol=0)
    # the same seed drawn from torch's generator after manual_seed gives the same output
    torch.manual_seed(3)
    y3 = llmkern.lora_linear(x, W, None, A, B, 1.0, p)
    torch.manual_seed(3)
    y4 = llmkern.lora_linear(x, W, None, A, B, 1.0, p)
    torch.testing.assert_close(y3, y4, rtol=0, atol=0)


@needs_triton
def test_backward_with_expanded_grad_and_3d_input(triton_backend):
    """.sum().backward() feeds a stride-0 gradient; x has leading batch dims."""
    x, W, b, A, B = _inputs(2 * 9, 24, 20, 4, torch.float32)
    x = x.view(2, 9, 24)
    xs, As, Bs = _leaf(x), _leaf(A), _leaf(B)
    Wf = W.clone()  # frozen base: no dW
    y = llmkern.lora_linear(xs, Wf, b, As, Bs, 0.5, 0.2, seed=11)
    assert y.shape == (2, 9, 20)
    y.sum().backward()
    xd, Ad, Bd = _d(x), _d(A), _d(B)
    ref.lora_linear(xd, W.double(), b.double(), Ad, Bd, 0.5, 0.2, seed=11).sum().backward()
    for got, want in ((xs.grad, xd.grad), (As.grad, Ad.grad), (Bs.grad, Bd.grad)):
        assert_close(got, want, **TOL[torch.float32])
    assert Wf.grad is None


@needs_triton
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_transposed_weight_is_read_in_place(triton_backend, monkeypatch, p):
    """A GPT-2 Conv1D stores its weight [in, out]; lora_linear(x, w.t(), ...) reads that view through its strides
    (no copy of the weight per call: the GEMM and the backward's Wᵀ read both layouts) and its gradient reaches
    the [in, out] tensor."""
    x, W, b, A, B = _inputs(37, 48, 40, 8, torch.float32)
    w_io = _leaf(W.t().contiguous())  # the Conv1D parameter, [in, out]
    seen = []
    forward = K.lora_forward
    monkeypatch.setattr(K, "lora_forward", lambda x_, W_, *a, **k: (seen.append(W_), forward(x_, W_, *a, **k))[1])
    xs, As, Bs = _leaf(x), _leaf(A), _leaf(B)
    y = llmkern.lora_linear(xs, w_io.t(), b, As, Bs, 1.3, p, seed=7)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert len(seen) == 1 and seen[0].data_ptr() == w_io.data_ptr() and seen[0].stride() == (1, 40)
    xd, Wd, Ad, Bd = _d(x), _d(W), _d(A), _d(B)
    yr = ref.lora_linear(xd, Wd, b.double(), Ad, Bd, 1.3, p, seed=7)
    yr.backward(dy.double())
    assert_close(y, yr, **TOL[torch.float32])
    for name, got, want in (("dx", xs.grad, xd.grad), ("dW", w_io.grad, Wd.grad.t()), ("dA", As.grad, Ad.grad),
                            ("dB", Bs.grad, Bd.grad)):
        assert_close(got, want, msg=name, **TOL[torch.float32])


@needs_triton
def test_rank_above_block_chunk(triton_backend):
    """Ranks beyond one epilogue chunk (64) loop over rank chunks."""
    x, W, b, A, B = _inputs(17, 33, 21, 80, torch.float32)
    xs, As, Bs = _leaf(x), _leaf(A), _leaf(B)
    y = llmkern.lora_linear(xs, W, b, As, Bs, 0.3)
    y.backward(torch.ones_like(y))
    xd, Ad, Bd = _d(x), _d(A), _d(B)
    yr = ref.lora_linear(xd, W.double(), b.double(), Ad, Bd, 0.3)
    yr.backward(torch.ones_like(yr))
    assert_close(y, yr, **TOL[torch.float32])
    for got, want in ((xs.grad, xd.grad), (As.grad, Ad.grad), (Bs.grad, Bd.grad)):
        assert_close(got, want, **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
def test_multi_adapter_matches_reference(triton_backend, dtype):
    M, K_, N, r, n = 45, 36, 28, 8, 3
    x, W, b, A, B = _inputs(M, K_, N, r, dtype, n=n)
    ids = torch.randint(-1, n, (M,), device=DEV)
    ids[:5] = -1
    scal = torch.tensor([0.5, 2.0, 1.0])
    xs, Ws, bs, As, Bs = _leaf(x), _leaf(W), _leaf(b), _leaf(A), _leaf(B)
    y = llmkern.lora_linear_multi(xs, Ws, bs, As, Bs, scal, ids)
    dy = torch.randn_like(y)
    y.backward(dy)
    xd, Wd, bd, Ad, Bd = _d(x), _d(W), _d(b), _d(A), _d(B)
    yr = ref.lora_linear_multi(xd, Wd, bd, Ad, Bd, scal.double(), ids)
    yr.backward(dy.double())
    tol = TOL[dtype]
    assert_close(y, yr, msg="y", **tol)
    for name, got, want in (("dx", xs.grad, xd.grad), ("dW", Ws.grad, Wd.grad), ("db", bs.grad, bd.grad),
                            ("dA", As.grad, Ad.grad), ("dB", Bs.grad, Bd.grad)):
        assert_close(got, want, msg=name, **tol)


@needs_triton
def test_multi_adapter_edge_mixes(triton_backend):
    """All rows base-only; one adapter unused; ids per token with batch dims; -1 rows are the base."""
    x, W, b, A, B = _inputs(2 * 11, 20, 24, 4, torch.float32, n=4)
    x3 = x.view(2, 11, 20)
    base = torch.nn.functional.linear(x3, W, b)
    y = llmkern.lora_linear_multi(x3, W, b, A, B, [1.0] * 4, torch.full((2, 11), -1, device=DEV))
    assert_close(y, base.double(), **TOL[torch.float32])
    ids = torch.tensor([[0] * 11, [3] * 6 + [-1] * 5], device=DEV)
    y = llmkern.lora_linear_multi(x3, W, b, A, B, [1.0, 1.0, 1.0, 0.5], ids)
    yr = ref.lora_linear_multi(x3.double(), W.double(), b.double(), A.double(), B.double(),
                               torch.tensor([1.0, 1.0, 1.0, 0.5], dtype=torch.float64), ids)
    assert_close(y, yr, **TOL[torch.float32])
    assert_close(y[1, 6:], base[1, 6:].double(), **TOL[torch.float32])
    # backward with the stride-0 gradient of .sum()
    x3g, Ag, Bg = _leaf(x3), _leaf(A), _leaf(B)
    llmkern.lora_linear_multi(x3g, W, b, Ag, Bg, [1.0, 1.0, 1.0, 0.5], ids).sum().backward()
    x3d, Ad, Bd = _d(x3), _d(A), _d(B)
    ref.lora_linear_multi(x3d, W.double(), b.double(), Ad, Bd, torch.tensor([1.0, 1.0, 1.0, 0.5]).double(),
                          ids).sum().backward()
    for got, want in ((x3g.grad, x3d.grad), (Ag.grad, Ad.grad), (Bg.grad, Bd.grad)):
        assert_close(got, want, **TOL[torch.float32])
    assert Ag.grad[1:3].abs().max() == 0  # unused adapters get zero gradients
    # a single adapter with every token on it equals lora_linear
    y1 = llmkern.lora_linear_multi(x, W, b, A[:1], B[:1], [0.7], torch.zeros(22, dtype=torch.int64, device=DEV))
    y2 = llmkern.lora_linear(x, W, b, A[0], B[0], 0.7)
    assert_close(y1, y2.double(), **TOL[torch.float32])


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_multi_adapter_broken_factor_stays_in_its_rows(triton_backend, bad):
    """One adapter's non-finite lora_B (forward) or lora_A (dx) reaches only its own rows: the other
    adapters' and the base-only rows of the same tile stay what the reference gives (the epilogue's dot
    once multiplied their zeroed inputs by the inf / NaN: 0 * inf = NaN across the whole tile)."""
    M, K_, N, r, n = 24, 20, 16, 4, 3
    x, W, b, A, B = _inputs(M, K_, N, r, torch.float32, n=n)
    B[1, 3, 2] = bad
    A[2, 1, 5] = bad
    ids = torch.tensor([0, 1, -1, 2] * 6, device=DEV)
    scal = torch.tensor([0.5, 2.0, 1.0])
    xs = _leaf(x)
    y = llmkern.lora_linear_multi(xs, W, b, A, B, scal, ids)
    dy = torch.randn_like(y)
    y.backward(dy)
    xd = _d(x)
    yr = ref.lora_linear_multi(xd, W.double(), b.double(), A.double(), B.double(), scal.double(), ids)
    yr.backward(dy.double())
    for got, want in ((y, yr), (xs.grad, xd.grad)):
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))  # NaN where the reference has ±inf
        fin = torch.isfinite(want)
        assert_close(got[fin], want[fin], **TOL[torch.float32])
    healthy = ids <= 0  # adapter 0 and the base-only rows
    for got in (y, xs.grad):
        assert torch.isfinite(got[healthy]).all() and not torch.isfinite(got[ids == 1]).all()


# ---- the TMA (tensor-descriptor) GEMM of sm_90+ -------------------------------------------------

def _record_launches(monkeypatch):
    """The kernel names the launchers run, in order (the list fills as they launch)."""
    launched = []
    launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda name, *a, **kw: (launched.append(name), launch(name, *a, **kw))[1])
    return launched


def _run_lora(x, W, b, A, B, dy, p):
    leaves = [_leaf(t) for t in (x, W, b, A, B)]
    y = llmkern.lora_linear(*leaves, 1.7, p, seed=5)
    y.backward(dy)
    return [y] + [t.grad for t in leaves]


TMA_CASES = [
    # M, K, N, r, dropout p, the forward and backward (dx) GEMMs that run with LLMKERN_LORA_TMA=force
    (37, 72, 40, 8, 0.0, ["gemm_tma", "gemm_tma"]),
    (37, 72, 40, 8, 0.3, ["gemm_tma", "gemm_tma"]),   # dropout epilogue in the dx GEMM
    (21, 64, 33, 16, 0.2, ["gemm_tma", "gemm"]),      # dy rows (33 halves) are not 16-byte aligned
    (37, 45, 40, 8, 0.0, ["gemm", "gemm"]),           # nor are x and W rows (45 halves)
]


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only (the GPU test compares within tolerance)")
@pytest.mark.parametrize("case", TMA_CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}-r{c[3]}-p{c[4]}" for c in TMA_CASES])
def test_tma_gemm_equals_pointer_gemm(triton_backend, monkeypatch, case):
    """The descriptor loads read exactly what the masked pointer loads read (zeros past M, N and K),
    so under the interpreter both paths give bitwise identical outputs and gradients; tensors whose
    rows are not 16-byte aligned silently take the pointer path."""
    M, K_, N, r, p, want = case
    monkeypatch.setattr(K._TMA, "failed", [])
    x, W, b, A, B = _inputs(M, K_, N, r, torch.float16)
    dy = torch.randn(M, N, dtype=torch.float16)
    launched = _record_launches(monkeypatch)
    results = {}
    for mode in ("0", "force"):
        monkeypatch.setenv("LLMKERN_LORA_TMA", mode)
        results[mode] = _run_lora(x, W, b, A, B, dy, p)
    assert [n for n in launched if n.startswith("gemm")] == ["gemm", "gemm"] + want
    for name, a, b_ in zip(["y", "dx", "dW", "db", "dA", "dB"], results["0"], results["force"]):
        assert torch.equal(a, b_), name
    assert not K._TMA.failed


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only")
def test_multi_adapter_gemm_keeps_rows_in_place(triton_backend, monkeypatch):
    """Multi-adapter batches run the same GEMM as one adapter (rows in place, TMA included); only the
    epilogue loops over the adapters of a tile. Interleaved ids put several adapters (and -1 rows)
    in every tile; TMA and pointer GEMMs agree bit for bit, and both match the reference."""
    monkeypatch.setattr(K._TMA, "failed", [])
    x, W, b, A, B = _inputs(40, 32, 48, 4, torch.float16, n=3)
    ids = torch.tensor([0, 2, -1, 1, 2] * 8)
    dy = torch.randn(40, 48, dtype=torch.float16)
    launched = _record_launches(monkeypatch)
    results = {}
    for mode in ("0", "force"):
        monkeypatch.setenv("LLMKERN_LORA_TMA", mode)
        leaves = [_leaf(t) for t in (x, W, b, A, B)]
        y = llmkern.lora_linear_multi(*leaves, [1.0, 0.5, 2.0], ids)
        y.backward(dy)
        results[mode] = [y] + [t.grad for t in leaves]
    assert [n for n in launched if n.startswith("gemm")] == ["gemm", "gemm", "gemm_tma", "gemm_tma"]
    for name, a, b_ in zip(["y", "dx", "dW", "db", "dA", "dB"], results["0"], results["force"]):
        assert torch.equal(a, b_), name
    leaves = [_d(t) for t in (x, W, b, A, B)]
    yr = ref.lora_linear_multi(*leaves, torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64), ids)
    yr.backward(dy.double())
    for name, got, want in zip(["y", "dx", "dW", "db", "dA", "dB"], results["force"], [yr] + [t.grad for t in leaves]):
        assert_close(got, want, msg=name, **TOL[torch.float16])
    assert not K._TMA.failed


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only")
def test_tma_failure_falls_back_to_pointer_gemm(triton_backend, monkeypatch):
    monkeypatch.setenv("LLMKERN_LORA_TMA", "force")
    monkeypatch.setattr(K._TMA, "failed", [])
    launch = K._launch

    def broken(name, *a, **kw):
        if name.endswith("_tma"):
            raise RuntimeError("simulated descriptor failure")
        return launch(name, *a, **kw)
    monkeypatch.setattr(K, "_launch", broken)
    x, W, b, A, B = _inputs(37, 72, 40, 8, torch.float16)
    dy = torch.randn(37, 40, dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="TMA kernels failed") as rec:
        got = _run_lora(x, W, b, A, B, dy, 0.3)
    assert len([w for w in rec if "TMA kernels failed" in str(w.message)]) == 1  # once, then off
    assert K._TMA.failed and not K.use_tma(x, W)
    monkeypatch.setenv("LLMKERN_LORA_TMA", "0")
    for a, b_ in zip(got, _run_lora(x, W, b, A, B, dy, 0.3)):
        assert torch.equal(a, b_)


def test_tma_gemm_not_traced():
    """torch.compile traces the op with wrap_triton on; Inductor rejects config pre-hooks, so the
    traced graph keeps the pointer GEMM (eager calls run with wrapping off: TMA)."""
    lib = pytest.importorskip("torch._library.triton")
    assert not K._traced(None)
    assert K._traced(lib.wrap_triton)
    with lib.set_wrap_triton_enabled(False):
        assert not K._traced(lib.wrap_triton)


def test_reference_backend_on_cpu_matches_formula():
    """The default CPU path (reference) in float64 against the explicit formula."""
    x, W, b, A, B = _inputs(6, 10, 12, 3, torch.float64, device="cpu")
    y = llmkern.lora_linear(x, W, b, A, B, 2.0)
    torch.testing.assert_close(y, x @ W.T + b + 2.0 * (x @ A.T) @ B.T)


def test_dropout_masks_of_different_seeds_are_unrelated():
    """Small int seeds (seed=step in a training loop) used to give row permutations of one mask
    (rows hashed as row ^ seed), and seeds differing only in bits 62-63 the same mask."""
    masks = {s: ref.dropout_keep_mask(64, 32, 0.5, s) for s in (0, 1, 5, 37, 2**62, 2**63)}
    base_rows = {tuple(r.tolist()) for r in masks[0]}
    for s, m in masks.items():
        if s:
            assert not torch.equal(m, masks[0]), s
            assert sum(tuple(r.tolist()) in base_rows for r in m) <= 2, s  # no shared rows (chance: ~0)
    assert not torch.equal(masks[2**62], masks[2**63])


def test_kernel_dropout_params_agree_with_reference():
    for p, seed in ((0.1, 0), (0.5, 2**40 + 17), (0.9, 123456789)):
        s0, s1, thr = ref.lora.dropout_params(p, seed)
        assert tuple(w & 0xFFFFFFFF for w in K.seed_words(seed)) + (K.dropout_params(p)[0],) == (s0, s1, thr)
        # an int seed and the int32 [2] tensor of its words give the same mask
        words = torch.tensor(K.seed_words(seed), dtype=torch.int32)
        assert torch.equal(ref.dropout_keep_mask(7, 9, p, seed), ref.dropout_keep_mask(7, 9, p, words))


@pytest.mark.parametrize("bad,match", [
    (dict(weight=torch.randn(12, 11)), "weight must have shape"),
    (dict(lora_A=torch.randn(3, 11)), "lora_A must have shape"),
    (dict(lora_B=torch.randn(12, 4)), "lora_B must have shape"),
    (dict(lora_A=torch.randn(300, 10), lora_B=torch.randn(12, 300)), "rank r must be in"),
    (dict(bias=torch.randn(5)), "bias must have shape"),
    (dict(weight=torch.randn(12, 10, dtype=torch.float64)), "weight must have the dtype"),
    (dict(dropout_p=1.0), "dropout_p must be in"),
    (dict(x=torch.randint(0, 3, (4, 10))), "x must be float"),
])
def test_lora_linear_validation(bad, match):
    args = dict(x=torch.randn(4, 10), weight=torch.randn(12, 10), bias=torch.randn(12),
                lora_A=torch.randn(3, 10), lora_B=torch.randn(12, 3), scaling=1.0, dropout_p=0.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        llmkern.lora_linear(**args)


@pytest.mark.parametrize("bad,match", [
    (dict(adapter_ids=torch.tensor([0, 1, 2, 0])), "adapter_ids must be in"),
    (dict(adapter_ids=torch.tensor([0, 1, -2, 0])), "adapter_ids must be in"),
    (dict(adapter_ids=torch.tensor([0, 1, 0])), "adapter_ids must hold one id per token"),
    (dict(adapter_ids=torch.tensor([0.0, 1, 0, 0])), "adapter_ids must be an integer"),
    (dict(scalings=[1.0]), "scalings must have shape"),
    (dict(lora_B=torch.randn(2, 12, 4)), "lora_B must have shape"),
    (dict(lora_A=torch.randn(3, 10)), "lora_A must have shape"),
    # the right number of ids in the wrong shape ([T, B] for x [B, T, in]) mapped ids to wrong tokens
    (dict(adapter_ids=torch.tensor([[0, 1], [-1, 0]])), "adapter_ids must hold one id per token"),
    # non-finite scalings went through (NaN rows) while lora_linear refuses a NaN scaling
    (dict(scalings=[1.0, float("nan")]), "scalings must be finite"),
    (dict(scalings=torch.tensor([float("inf"), 1.0])), "scalings must be finite"),
    (dict(adapter_ids=torch.tensor([0, 1, -1, 0], device="meta")), "adapter_ids is on meta but x is on cpu$"),
    # a scalings tensor on another device raised torch's "Cannot copy out of meta tensor"
    (dict(scalings=torch.ones(2, device="meta")), "scalings is on meta but x is on cpu"),
    # past float32's range the kernels' scale is inf: inf / NaN outputs, silently
    (dict(scalings=[1.0, 1e39]), "scalings must be within float32's range"),
    (dict(scalings=torch.tensor([1.0, 1e39], dtype=torch.float64)), "scalings must be within float32's range"),
    (dict(scalings=torch.tensor([1.0, float("nan")])), "scalings must be finite"),
])
def test_lora_linear_multi_validation(bad, match):
    args = dict(x=torch.randn(4, 10), weight=torch.randn(12, 10), bias=None,
                lora_A=torch.randn(2, 3, 10), lora_B=torch.randn(2, 12, 3), scalings=[1.0, 2.0],
                adapter_ids=torch.tensor([0, 1, -1, 0]))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        llmkern.lora_linear_multi(**args)


def test_lora_scaling_must_fit_float32_unless_float64():
    """scaling = 1e39 is inf in the kernels' float32: the output was inf / NaN with no error. float64 inputs run the
    reference in float64, where it is a number."""
    x, W, A, B = torch.randn(3, 10), torch.randn(12, 10), torch.randn(2, 10), torch.randn(12, 2)
    with pytest.raises(ValueError, match="scaling must be within float32's range"):
        llmkern.lora_linear(x, W, None, A, B, 1e39)
    y = llmkern.lora_linear(x.double(), W.double(), None, A.double(), B.double() * 1e-30, 1e39)
    assert torch.isfinite(y).all()
    y = llmkern.lora_linear_multi(x.double(), W.double(), None, A[None].double(), B[None].double() * 1e-30, [1e39],
                                  torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("bad,match", [
    (dict(scalings=[True, 1.0]), "scalings must hold real numbers"),       # was 1.0
    (dict(scalings=torch.tensor([1 + 1j, 1.0])), "scalings must be a real"),  # imaginary part dropped
    (dict(scalings="ab"), "scalings must be a tensor or a sequence"),
])
def test_lora_linear_multi_scalings_type(bad, match):
    args = dict(x=torch.randn(4, 10), weight=torch.randn(12, 10), bias=None,
                lora_A=torch.randn(2, 3, 10), lora_B=torch.randn(2, 12, 3), scalings=[1.0, 2.0],
                adapter_ids=torch.tensor([0, 1, -1, 0]))
    args.update(bad)
    with pytest.raises(TypeError, match=match):
        llmkern.lora_linear_multi(**args)


@pytest.mark.parametrize("backend", ["default", "reference", "triton"])
def test_scaling_requiring_grad_is_refused(monkeypatch, backend):
    """A tensor scaling that requires grad silently got no gradient (.item()); a scalings tensor got
    one on the reference backend and None on the Triton one. Both are refused on every backend;
    detached tensors and floats still work."""
    if backend == "triton":
        if DEV is None:
            pytest.skip("no CUDA and no TRITON_INTERPRET")
        monkeypatch.setenv("LLMKERN_BACKEND", backend)
    elif backend == "reference":
        monkeypatch.setenv("LLMKERN_BACKEND", backend)
    dev = DEV or "cpu"
    x, W, b, A, B = _inputs(5, 12, 10, 3, torch.float32, device=dev)
    s = torch.tensor(0.7, device=dev, requires_grad=True)
    with pytest.raises(ValueError, match="scaling must not require grad"):
        llmkern.lora_linear(x, W, b, A, B, s)
    ids = torch.tensor([0, 1, -1, 0, 1], device=dev)
    A2, B2 = torch.stack([A, -A]), torch.stack([B, B])
    s2 = torch.tensor([0.7, 1.2], device=dev, requires_grad=True)
    with pytest.raises(ValueError, match="scalings must not require grad"):
        llmkern.lora_linear_multi(x, W, b, A2, B2, s2, ids)
    want = ref.lora_linear(x, W, b, A, B, 0.7)
    assert_close(llmkern.lora_linear(x, W, b, A, B, s.detach()), want.double(), **TOL[torch.float32])
    with torch.no_grad():
        assert_close(llmkern.lora_linear(x, W, b, A, B, s), want.double(), **TOL[torch.float32])
        llmkern.lora_linear_multi(x, W, b, A2, B2, s2, ids)


@needs_triton
def test_double_backward_raises_instead_of_dropping_terms(triton_backend):
    """The kernels' gradients are not differentiable: under create_graph=True the eager path
    returned them without a graph, so a gradient penalty added to the loss silently contributed
    nothing (dx off by 100%); it raises now, as the custom op does."""
    x, W, b, A, B = _inputs(5, 12, 10, 3, torch.float32)
    for multi in (False, True):
        xs = _leaf(x)
        if multi:
            y = llmkern.lora_linear_multi(xs, W, b, A[None], B[None], [0.7], torch.zeros(5, dtype=torch.int64))
        else:
            y = llmkern.lora_linear(xs, W, b, A, B, 0.7)
        gx, = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            (y.sum() + gx.square().sum()).backward()


def test_info_registration():
    from llmkern import _backend
    import llmkern.ops.lora  # noqa: F401

    assert _backend.OP_DISPATCH["lora_linear"](torch.device("cpu"), torch.float32) in ("reference", "triton")
    assert "lora_linear_multi" in _backend.OP_DISPATCH


# ---- GPU ------------------------------------------------------------------------------------------

@pytest.fixture
def fixed_config(monkeypatch):
    """One kernel configuration instead of autotuning: keeps `pytest -m gpu` short."""
    monkeypatch.setenv("LLMKERN_LORA_AUTOTUNE", "0")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,M,K_,N,r", [(torch.bfloat16, 1000, 1024, 768, 16),
                                            (torch.bfloat16, 4096, 4096, 4096, 64),
                                            (torch.float16, 333, 515, 1030, 256),
                                            (torch.float32, 257, 384, 200, 8)])
def test_gpu_lora_linear_large(fixed_config, dtype, M, K_, N, r):
    x, W, b, A, B = _inputs(M, K_, N, r, dtype, device="cuda")
    xs, As, Bs, Ws = _leaf(x), _leaf(A), _leaf(B), _leaf(W)
    y = llmkern.lora_linear(xs, Ws, b, As, Bs, 2.0, 0.1, seed=3)
    y.sum().backward()
    xd, Ad, Bd, Wd = _d(x), _d(A), _d(B), _d(W)
    yr = ref.lora_linear(xd, Wd, b.double(), Ad, Bd, 2.0, 0.1, seed=3)
    yr.sum().backward()
    rel = lambda a, e: ((a.double() - e).norm() / e.norm()).item()  # noqa: E731
    lim = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for got, want in ((y, yr), (xs.grad, xd.grad), (As.grad, Ad.grad), (Bs.grad, Bd.grad), (Ws.grad, Wd.grad)):
        assert rel(got, want) < lim


@pytest.mark.gpu
def test_gpu_transposed_weight(fixed_config):
    """A Conv1D-layout weight (the [out, in] view of an [in, out] tensor) on the GPU GEMMs: the forward reads it
    as the backward reads Wᵀ (TMA's W_T on sm_90)."""
    x, W, b, A, B = _inputs(1000, 1024, 768, 16, torch.bfloat16, device="cuda")
    w_io = _leaf(W.t().contiguous())
    xs, As, Bs = _leaf(x), _leaf(A), _leaf(B)
    y = llmkern.lora_linear(xs, w_io.t(), b, As, Bs, 2.0, 0.1, seed=3)
    y.sum().backward()
    xd, Ad, Bd, Wd = _d(x), _d(A), _d(B), _d(W)
    yr = ref.lora_linear(xd, Wd, b.double(), Ad, Bd, 2.0, 0.1, seed=3)
    yr.sum().backward()
    rel = lambda a, e: ((a.double() - e).norm() / e.norm()).item()  # noqa: E731
    for got, want in ((y, yr), (xs.grad, xd.grad), (As.grad, Ad.grad), (Bs.grad, Bd.grad), (w_io.grad.t(), Wd.grad)):
        assert rel(got, want) < 2e-2


@pytest.mark.gpu
def test_gpu_tma_and_pointer_gemm_agree(fixed_config, monkeypatch):
    """On sm_90+ the single-adapter GEMMs (forward, and dx with the dropout epilogue) run the TMA
    variant; both paths stay within bf16 error of the float64 reference."""
    M, K_, N, r, p = 4096, 4096, 4096, 16, 0.1
    x, W, b, A, B = _inputs(M, K_, N, r, torch.bfloat16, device="cuda")
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    xd, Ad, Bd = _d(x), _d(A), _d(B)
    yr = ref.lora_linear(xd, W.double(), b.double(), Ad, Bd, 2.0, p, seed=3)
    yr.backward(dy.double())
    rel = lambda a, e: ((a.double() - e).norm() / e.norm()).item()  # noqa: E731
    monkeypatch.setattr(K._TMA, "failed", [])
    launched = _record_launches(monkeypatch)
    errs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("LLMKERN_LORA_TMA", mode)
        xs, As, Bs = _leaf(x), _leaf(A), _leaf(B)
        y = llmkern.lora_linear(xs, W, b, As, Bs, 2.0, p, seed=3)
        y.backward(dy)
        errs[mode] = [rel(y, yr), rel(xs.grad, xd.grad), rel(As.grad, Ad.grad), rel(Bs.grad, Bd.grad)]
    assert not K._TMA.failed, K._TMA.failed
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert launched.count("gemm_tma") == (2 if hopper else 0), launched
    for e_tma, e_ptr in zip(errs["1"], errs["0"]):
        assert e_tma <= 1.5 * e_ptr + 1e-4, (errs["1"], errs["0"])


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 4, 16])
def test_gpu_multi_adapter_and_cuda_graph(fixed_config, n):
    M, K_, N, r = 2048, 1024, 1024, 16
    x, W, b, A, B = _inputs(M, K_, N, r, torch.bfloat16, n=n, device="cuda")
    ids = torch.randint(-1, n, (M,), device="cuda")
    scal = torch.rand(n, device="cuda") + 0.5
    y = llmkern.lora_linear_multi(x, W, b, A, B, scal, ids)
    yr = ref.lora_linear_multi(x.double(), W.double(), b.double(), A.double(), B.double(), scal.double(), ids)
    assert ((y.double() - yr).norm() / yr.norm()).item() < 2e-2
    # capture in a CUDA graph (no host sync inside), replay with new ids
    static_ids = ids.clone()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        llmkern.lora_linear_multi(x, W, b, A, B, scal, static_ids)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = llmkern.lora_linear_multi(x, W, b, A, B, scal, static_ids)
    static_ids.copy_(torch.randint(-1, n, (M,), device="cuda"))
    g.replay()
    yr = ref.lora_linear_multi(x.double(), W.double(), b.double(), A.double(), B.double(), scal.double(), static_ids)
    assert ((out.double() - yr).norm() / yr.norm()).item() < 2e-2


@pytest.mark.gpu
def test_gpu_out_of_range_adapter_ids_raise():
    """On CUDA the ids' range is read after the kernels are queued; a bad id still raises."""
    x, W, b, A, B = _inputs(64, 32, 48, 4, torch.float16, n=2, device="cuda")
    for bad in (2, -2):
        ids = torch.zeros(64, dtype=torch.int64, device="cuda")
        ids[17] = bad
        with pytest.raises(ValueError, match="adapter_ids must be in"):
            llmkern.lora_linear_multi(x, W, b, A, B, [1.0, 0.5], ids)
    ids = torch.randint(-1, 2, (64,), device="cuda")
    y = llmkern.lora_linear_multi(x, W, b, A, B, [1.0, 0.5], ids)
    yr = ref.lora_linear_multi(x.double(), W.double(), b.double(), A.double(), B.double(),
                               torch.tensor([1.0, 0.5], dtype=torch.float64), ids)
    assert_close(y, yr, **TOL[torch.float16])


@pytest.mark.gpu
def test_gpu_host_adapter_ids_need_no_sync():
    """Ids built on the host (a CPU tensor) and float scalings are checked on the host, before any launch,
    and copied without a wait: no synchronizing CUDA call (set_sync_debug_mode raises on one), same output
    as device ids; a bad host id raises before anything is queued."""
    x, W, b, A, B = _inputs(64, 32, 48, 4, torch.float16, n=2, device="cuda")
    host_ids = torch.randint(-1, 2, (64,))
    want = llmkern.lora_linear_multi(x, W, b, A, B, [1.0, 0.5], host_ids.cuda())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = llmkern.lora_linear_multi(x, W, b, A, B, [1.0, 0.5], host_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)
    host_ids[5] = 2
    with pytest.raises(ValueError, match="adapter_ids must be in"):
        llmkern.lora_linear_multi(x, W, b, A, B, [1.0, 0.5], host_ids)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    x, W, b, A, B = _inputs(256, 512, 384, 8, torch.bfloat16, device="cuda")
    As, Bs = _leaf(A), _leaf(B)
    f = torch.compile(lambda x, A, B: llmkern.lora_linear(x, W, b, A, B, 0.5), fullgraph=True)
    y = f(x, As, Bs)
    y.float().sum().backward()
    yr = ref.lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 0.5)
    assert ((y.double() - yr).norm() / yr.norm()).item() < 2e-2
    assert As.grad is not None and Bs.grad is not None
    # dropout inside the compiled graph: the seed is drawn on the device, no graph break
    g = torch.compile(lambda x, A, B: llmkern.lora_linear(x, W, b, A, B, 0.5, 0.1), fullgraph=True)
    torch.manual_seed(1)
    y1 = g(x, As, Bs)
    torch.manual_seed(1)
    y2 = g(x, As, Bs)
    assert torch.equal(y1, y2) and torch.isfinite(y1.float()).all()
    y1.float().sum().backward()
    # mixed adapters: the sort, the scatter of the ids back to row order and the three stages trace
    xm, Wm, bm, Am, Bm = _inputs(256, 512, 384, 8, torch.bfloat16, n=3, device="cuda")
    ids = torch.randint(-1, 3, (256,), device="cuda")
    scal = torch.tensor([0.5, 1.0, 2.0], device="cuda")
    Ams, Bms = _leaf(Am), _leaf(Bm)
    h = torch.compile(lambda x, A, B: llmkern.lora_linear_multi(x, Wm, bm, A, B, scal, ids), fullgraph=True)
    ym = h(xm, Ams, Bms)
    ym.float().sum().backward()
    yr = ref.lora_linear_multi(xm.double(), Wm.double(), bm.double(), Am.double(), Bm.double(), scal.double(), ids)
    assert ((ym.double() - yr).norm() / yr.norm()).item() < 2e-2
    assert Ams.grad is not None and Bms.grad is not None


@pytest.mark.gpu
def test_gpu_opcheck(fixed_config):
    from llmkern.ops import lora as L

    x, W, b, A, B = _inputs(64, 96, 80, 8, torch.float16, device="cuda")
    torch.library.opcheck(torch.ops.llmkern.lora_fwd.default,
                          (x, W, b, A[None], B[None], None, 0.5, None, None, None, 0.0, None),
                          test_utils=("test_schema", "test_faketensor"))
    assert L._HAVE_OPS


def test_autocast_casts_like_linear():
    x, W, b, A, B = _inputs(8, 16, 12, 4, torch.float32, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = llmkern.lora_linear(x, W, b, A, B, 1.0)
        ym = llmkern.lora_linear_multi(x, W, b, A[None], B[None], [1.0], torch.zeros(8, dtype=torch.int64))
    assert y.dtype == torch.bfloat16 and ym.dtype == torch.bfloat16
    want = ref.lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 1.0)
    assert_close(y, want, dtype=torch.bfloat16)
    assert_close(ym, want, dtype=torch.bfloat16)


def test_suite_runs_on_cpu():
    from llmkern.bench.registry import Context
    from llmkern.bench.suites.lora import run

    rows = list(run(Context(device=torch.device("cpu"), quick=True)))
    assert {r.op.split(" (")[0] for r in rows} >= {"lora_linear fwd", "lora_linear fwd+bwd", "lora_linear_multi fwd"}
    assert all(r.ours_ms > 0 and r.baseline_ms > 0 for r in rows)


@needs_triton
def test_library_op_and_registered_autograd():
    """torch.ops.llmkern.lora_fwd (the op the CUDA path and torch.compile use) and its
    register_autograd backward, run eagerly (under the interpreter on CPU)."""
    from llmkern.ops import lora as L

    if not L._HAVE_OPS:
        pytest.skip("torch.library.triton_op unavailable")
    x, W, b, A, B = _inputs(13, 24, 20, 4, torch.float32)
    xs, Ws, bs, As, Bs = _leaf(x), _leaf(W), _leaf(b), _leaf(A[None]), _leaf(B[None])
    seed = K.seed_tensor(9, x.device)
    y, _ = torch.ops.llmkern.lora_fwd(xs, Ws, bs, As, Bs, None, 0.5, None, None, None, 0.2, seed)
    y.sum().backward()
    xd, Wd, bd, Ad, Bd = _d(x), _d(W), _d(b), _d(A), _d(B)
    ref.lora_linear(xd, Wd, bd, Ad, Bd, 0.5, 0.2, 9).sum().backward()
    assert_close(y, ref.lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 0.5, 0.2, 9),
                 **TOL[torch.float32])
    for got, want in ((xs.grad, xd.grad), (Ws.grad, Wd.grad), (bs.grad, bd.grad), (As.grad[0], Ad.grad),
                      (Bs.grad[0], Bd.grad)):
        assert_close(got, want, **TOL[torch.float32])


# ---- small layers: the cuBLAS composition ---------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.25])
def test_cublas_composition_matches_reference(p):
    """lora_linear_cublas (what small eager CUDA layers run) is the reference's math, dropout mask
    included, with gradients for x, W, b, A and B."""
    from llmkern.ops.lora import lora_linear_cublas

    x, W, b, A, B = _inputs(2 * 9, 24, 20, 4, torch.float64, device="cpu")
    x3 = x.view(2, 9, 24)
    seed = K.seed_tensor(5, "cpu")
    leaves = [_leaf(t) for t in (x3, W, b, A, B)]
    y = lora_linear_cublas(*leaves, 0.7, p, seed)
    y.square().sum().backward()
    rleaves = [_leaf(t) for t in (x3, W, b, A, B)]
    yr = ref.lora_linear(*rleaves, 0.7, p, seed)
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr)
    for a, b_ in zip(leaves, rleaves):
        torch.testing.assert_close(a.grad, b_.grad)


def test_fused_pays_bound(monkeypatch):
    from llmkern.ops.lora import FUSED_MIN_MNK, fused_pays

    cuda = torch.device("cuda")
    assert fused_pays(1, 1, 1, torch.device("cpu"))  # CPU: the kernels (interpreter) or the reference
    monkeypatch.delenv("LLMKERN_LORA_FUSED_MIN_MNK", raising=False)
    assert not fused_pays(8192, 768, 768, cuda)      # GPT-2 124M projections: cuBLAS
    assert fused_pays(8192, 4096, 4096, cuda)        # Llama-7B at 8k tokens: fused
    assert FUSED_MIN_MNK == 2 ** 35
    monkeypatch.setenv("LLMKERN_LORA_FUSED_MIN_MNK", "0")
    assert fused_pays(1, 1, 1, cuda)
    for bad in ("-1", "2**35", "big"):
        monkeypatch.setenv("LLMKERN_LORA_FUSED_MIN_MNK", bad)
        with pytest.raises(ValueError, match="LLMKERN_LORA_FUSED_MIN_MNK"):
            fused_pays(1, 1, 1, cuda)


@pytest.mark.gpu
def test_gpu_small_layers_take_cublas(monkeypatch):
    from llmkern.ops import lora as L

    monkeypatch.delenv("LLMKERN_LORA_FUSED_MIN_MNK", raising=False)
    fused = []
    run = L._run_triton
    monkeypatch.setattr(L, "_run_triton", lambda *a: (fused.append(1), run(*a))[1])
    x, W, b, A, B = _inputs(128, 256, 192, 8, torch.bfloat16, device="cuda")
    leaves = [_leaf(t) for t in (x, A, B)]
    y = llmkern.lora_linear(leaves[0], W, b, leaves[1], leaves[2], 0.5, 0.1, seed=3)
    y.float().square().sum().backward()
    assert not fused
    yr = ref.lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 0.5, 0.1, 3)
    assert ((y.double() - yr).norm() / yr.norm()).item() < 2e-2
    monkeypatch.setenv("LLMKERN_LORA_FUSED_MIN_MNK", "0")
    y2 = llmkern.lora_linear(x, W, b, A, B, 0.5, 0.1, seed=3)
    assert fused and ((y2.double() - yr).norm() / yr.norm()).item() < 2e-2


def test_multi_adapter_reference_compiles_fullgraph(monkeypatch):
    """The CPU path (the reference) under torch.compile(fullgraph=True): no data-dependent
    shapes (its eager loop selects each adapter's rows with nonzero())."""
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    torch._dynamo.reset()
    x, W, b = torch.randn(6, 16), torch.randn(12, 16), torch.randn(12)
    A, B = torch.randn(3, 4, 16), torch.randn(3, 12, 4)
    ids = torch.tensor([0, -1, 2, 1, 1, -1])
    f = torch.compile(lambda x: llmkern.lora_linear_multi(x, W, b, A, B, [0.5, 1.0, 2.0], ids), fullgraph=True,
                      backend="eager")
    torch.testing.assert_close(f(x), llmkern.lora_linear_multi(x, W, b, A, B, [0.5, 1.0, 2.0], ids))
    torch._dynamo.reset()


def test_multi_adapter_float64_and_unused_adapters_on_the_reference():
    """float64 inputs got their scales rounded to float32 (1e-8 relative off float64 math); a batch of base-only
    tokens (every id -1) left lora_A / lora_B out of the graph on the reference (gradient None: autograd.grad
    raised "not used in the graph"; the kernels give zeros)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64, generator=g)
    w = torch.randn(6, 8, dtype=torch.float64, generator=g)
    A = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(2, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    scalings = [1 / 3, 0.7]
    ids = torch.tensor([0, 1, -1, 1, 0])
    y = llmkern.lora_linear_multi(x, w, None, A, B, scalings, ids)
    expect = x @ w.T
    for t, a in enumerate(ids.tolist()):
        if a >= 0:
            expect[t] += scalings[a] * (B[a] @ (A[a] @ x[t]))
    torch.testing.assert_close(y, expect, rtol=1e-14, atol=1e-14)
    y = llmkern.lora_linear_multi(x, w, None, A, B, scalings, torch.full((5,), -1))
    gA, gB = torch.autograd.grad(y.sum(), (A, B))
    assert torch.equal(gA, torch.zeros_like(A)) and torch.equal(gB, torch.zeros_like(B))


def test_lora_traces_on_cpu_under_the_interpreter(triton_backend):
    """With LLMKERN_BACKEND=triton on CPU, a traced call (torch.compile, export) ran the Triton launcher on fake
    tensors (data_ptr of a FakeTensor): traced CPU calls take the reference, eager ones the kernels."""
    device = triton_device()
    torch.manual_seed(0)
    x = torch.randn(5, 16, device=device, requires_grad=True)
    w, A, B = torch.randn(12, 16, device=device), torch.randn(4, 16, device=device), torch.randn(12, 4, device=device)
    ids = torch.tensor([0, 1, -1, 1, 0], device=device)
    A2, B2 = torch.randn(2, 4, 16, device=device), torch.randn(2, 12, 4, device=device)
    for fn in (lambda x: llmkern.lora_linear(x, w, None, A, B, 0.5),
               lambda x: llmkern.lora_linear_multi(x, w, None, A2, B2, [0.5, 2.0], ids)):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        got, want = compiled(x), fn(x)
        assert_close(got, want, atol=1e-5, rtol=1e-5)
        (gx,) = torch.autograd.grad(got.sum(), x)
        (wx,) = torch.autograd.grad(want.sum(), x)
        assert_close(gx, wx, atol=1e-5, rtol=1e-5)
