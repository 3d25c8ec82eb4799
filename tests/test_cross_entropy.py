"""llmkern.cross_entropy: Triton kernels (the interpreter on CPU, small shapes, float32/float16,
64-wide vocabulary chunks so odd V runs many chunks and a partial last one) against
F.cross_entropy in float64; ignored rows; reductions; softcap; layouts; validation; registration
(opcheck, torch.compile); the CPU default (reference) path. GPU case (bf16, GPT-2 vocab) under -m gpu."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.ops import cross_entropy as ops
from llmkern.reference import cross_entropy as ref
from llmkern.testing import assert_close, interpreter_dtypes, triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
IGNORE = -100


def _labels(lead, V, n_ignored=0, ignore_index=IGNORE, device=DEV, dtype=torch.int64):
    y = torch.randint(0, V, lead, device=device)
    if n_ignored:
        flat = y.view(-1)
        flat[torch.randperm(flat.numel(), device=device)[:n_ignored]] = ignore_index
    return y.to(dtype)


def _torch_loss(x, y, ignore_index=IGNORE, reduction="mean", softcap=None):
    """The oracle: F.cross_entropy on float64 copies (soft-capped first), loss reshaped like ours."""
    V = x.shape[-1]
    z = x.reshape(-1, V)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    out = F.cross_entropy(z, y.reshape(-1).long(), ignore_index=ignore_index, reduction=reduction)
    return out.reshape(x.shape[:-1]) if reduction == "none" else out


def _check(x, y, **kw):
    """Loss and dlogits (with a non-unit upstream gradient) of llmkern.cross_entropy vs float64 torch."""
    dtype = x.dtype
    x = x.detach().requires_grad_()
    out = llmkern.cross_entropy(x, y, **kw)
    xd = x.detach().double().requires_grad_()
    rout = _torch_loss(xd, y, **kw)
    assert out.dtype == torch.float32 and out.shape == rout.shape
    assert_close(out, rout, torch.float32, msg="loss", equal_nan=True)
    up = torch.randn(out.shape, device=x.device) if out.dim() else torch.tensor(1.7, device=x.device)
    (g,) = torch.autograd.grad(out, x, up)
    (rg,) = torch.autograd.grad(rout, xd, up.double())
    assert g.dtype == dtype and g.shape == x.shape and torch.isfinite(g).all()
    scale = max(rg.abs().max().item(), 1e-30)
    tol = dict(atol=2e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-2)
    assert_close(g / scale, rg / scale, dtype, msg="dlogits", **tol)
    return out, g


# ---- the Triton kernels vs float64 torch ----------------------------------------------------------

CASES = [
    # leading shape, V, n ignored rows, kwargs
    ((8,), 1, 0, dict()),                                       # one class: loss 0, gradient 0
    ((9,), 7, 2, dict(reduction="sum")),                        # one partial chunk
    ((6,), 1000, 0, dict()),                                    # 16 chunks, partial last one
    ((7,), 1001, 3, dict(reduction="none")),
    ((5,), 1001, 1, dict(softcap=4.0)),
    ((6,), 130, 2, dict(softcap=2.0, reduction="none")),
    ((2, 3), 77, 2, dict(ignore_index=5)),                      # ignore_index inside [0, V)
]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-V{c[1]}-ign{c[2]}-{sorted(c[3].items())}" for c in CASES])
def test_kernel_vs_torch_fp32(triton_backend, case):
    lead, V, n_ign, kw = case
    x = torch.randn(*lead, V, device=DEV) * 3
    y = _labels(lead, V, n_ign, kw.get("ignore_index", IGNORE))
    _check(x, y, **kw)


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("kw", [dict(), dict(reduction="none", softcap=5.0)], ids=["mean", "none-softcap"])
def test_kernel_dtypes(triton_backend, dtype, kw):
    x = (torch.randn(6, 333, device=DEV) * 4).to(dtype)
    _check(x, _labels((6,), 333, 2), **kw)


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(triton_backend, reduction):
    x = torch.randn(4, 100, device=DEV, requires_grad=True)
    y = torch.full((4,), IGNORE, device=DEV)
    out = llmkern.cross_entropy(x, y, reduction=reduction)
    if reduction == "mean":
        assert out.isnan()                                      # 0 / 0, like torch
    else:
        assert (out == 0).all()
    out.sum().backward()
    assert (x.grad == 0).all()                                  # zeros, not NaN


@needs_triton
def test_minus_inf_logits_and_large_values(triton_backend):
    """A chunk of -inf logits (masked vocabulary) before the finite ones, and large logits."""
    x = torch.randn(4, 200, device=DEV) * 100
    x[:, :70] = float("-inf")
    x[1, 150:] = float("-inf")
    y = torch.tensor([80, 120, 199, 70], device=DEV)
    _check(x, y, reduction="none")


@needs_triton
@pytest.mark.parametrize("softcap", [1e4, 1e6])
def test_large_softcap_keeps_the_logits(triton_backend, softcap):
    """softcap * tanh(x / softcap) ~ x for a large softcap: the kernels' tanh must keep its relative
    accuracy near 0 (2 * sigmoid(2x) - 1 lost 3e-4 of the loss at 1e4 and 4e-2 at 1e6)."""
    torch.manual_seed(0)
    x = torch.randn(8, 50, device=DEV) * 3
    _check(x, _labels((8,), 50), softcap=softcap)


@needs_triton
def test_logits_near_float32_max(triton_backend):
    """|x| > FLT_MAX / log2(e) (about 2.36e38) used to overflow to inf - inf (NaN loss): the kernels
    scale by log2(e) only after subtracting the row maximum."""
    x = torch.zeros(3, 10, device=DEV)
    x[0, 2] = 3e38
    x[1, 2] = 3e38
    x[1, 5] = -3e38
    x[2, 7] = -3.3e38
    y = torch.tensor([2, 1, 7], device=DEV)
    x.requires_grad_()
    loss = llmkern.cross_entropy(x, y, reduction="none")
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), y, reduction="none"))
    loss.sum().backward()
    xd = x.detach().clone().requires_grad_()
    F.cross_entropy(xd, y, reduction="sum").backward()
    torch.testing.assert_close(x.grad, xd.grad)


@needs_triton
@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("V", [63, 64, 77])
def test_chunk_edges(triton_backend, monkeypatch, block, V):
    """Rows start at every offset modulo 16 bytes: the masked first chunk, whole chunks, the masked
    tail, a row that spans one more chunk than V needs (V = 64 shifted); fp16 (8 per 16 bytes)."""
    monkeypatch.setenv("LLMKERN_CE_INTERP_BLOCK", str(block))
    x = (torch.randn(9, V, device=DEV) * 3).to(torch.float16)
    _check(x, _labels((9,), V, 2), reduction="none", softcap=7.0 if V == 77 else None)


def test_alignment_decisions():
    from llmkern.kernels import cross_entropy as K

    x = torch.randn(6, 50)
    assert K._aligned(x) and K._rows_congruent(x, 4)
    assert not K._aligned(torch.randn(6, 60)[:, 1:51])                # data 4 bytes past 16-byte alignment
    assert not K._rows_congruent(torch.randn(6, 52)[:, :50], 4)       # row stride 52 vs gradient's 50
    assert K._rows_congruent(torch.randn(6, 54)[:, :50], 4)           # 54 = 50 (mod 4)
    base = torch.randn(3, 6, 90)
    assert K._rows_congruent(base, 4) and not K._rows_congruent(base[:, :-1], 4)


# ---- layouts -----------------------------------------------------------------------------------------

@needs_triton
def test_leading_dims_and_flat_labels(triton_backend):
    x = torch.randn(2, 5, 150, device=DEV)
    y = _labels((2, 5), 150, 3)
    out, _ = _check(x, y, reduction="none")
    assert out.shape == (2, 5)
    a = llmkern.cross_entropy(x, y.reshape(-1))                 # flat labels, same loss
    torch.testing.assert_close(a, llmkern.cross_entropy(x, y))


@needs_triton
def test_shifted_slice_is_read_in_place(triton_backend):
    """logits[:, :-1] of [B, T, V]: two row strides, read by the kernel without a copy."""
    base = torch.randn(3, 6, 90, device=DEV, requires_grad=True)
    x = base[:, :-1]
    flat = ops._flat_logits(x)
    assert flat.dim() == 3 and flat.data_ptr() == x.data_ptr()
    y = _labels((3, 5), 90, 2)
    out = llmkern.cross_entropy(x, y)
    out.backward()
    bd = base.detach().double().requires_grad_()
    rout = _torch_loss(bd[:, :-1], y)
    rout.backward()
    assert_close(out, rout, torch.float32)
    assert_close(base.grad, bd.grad, torch.float32, atol=1e-6)
    assert (base.grad[:, -1] == 0).all()


@needs_triton
@pytest.mark.parametrize("layout", ["transposed", "column-slice", "4d-strided", "expanded-rows"])
def test_non_contiguous_logits(triton_backend, layout):
    V = 70
    if layout == "transposed":                                  # last dim not contiguous: copied
        x = torch.randn(V, 6, device=DEV).t()
    elif layout == "column-slice":                              # row stride > V, offset start: in place
        x = torch.randn(6, V + 25, device=DEV)[:, 10:10 + V]
        assert ops._flat_logits(x).data_ptr() == x.data_ptr()
    elif layout == "4d-strided":                                # leading dims that do not collapse
        x = torch.randn(2, 2, 4, V, device=DEV)[:, :, :3]
    else:                                                       # row stride 0
        x = torch.randn(1, V, device=DEV).expand(5, V)
    _check(x, _labels(x.shape[:-1], V, 1), reduction="none")


@needs_triton
def test_int32_labels_and_expanded_upstream_gradient(triton_backend):
    x = torch.randn(7, 101, device=DEV, requires_grad=True)
    y = _labels((7,), 101, 2, dtype=torch.int32)
    out = llmkern.cross_entropy(x, y, reduction="none")
    out.sum().backward()                                        # a stride-0 [N] gradient
    xd = x.detach().double().requires_grad_()
    _torch_loss(xd, y, reduction="none").sum().backward()
    assert_close(x.grad, xd.grad, torch.float32, atol=1e-6)
    assert_close(out, _torch_loss(x.detach().double(), y, reduction="none"), torch.float32)


@pytest.mark.parametrize("backend", ["default", "triton"])
def test_int32_labels_with_an_ignore_index_beyond_int32(monkeypatch, backend):
    """torch compares int32 labels with an int by casting the int to int32: ignore_index 2**40 wrapped to 0
    and the row count of the mean left out label-0 rows the kernels (comparing in int64) kept (loss x 4/3),
    in linear_cross_entropy on every backend; 2**32 - 100 let label -100 pass the label check."""
    if backend == "triton":
        if DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    dev = DEV if backend == "triton" else "cpu"
    torch.manual_seed(0)
    y = torch.tensor([1, 2, 3, 0], dtype=torch.int32, device=dev)
    x = torch.randn(4, 5, device=dev, requires_grad=True)
    out = llmkern.cross_entropy(x, y, ignore_index=2**40)
    out.backward()
    xd = x.detach().double().requires_grad_()
    want = F.cross_entropy(xd, y.long(), ignore_index=2**40)
    want.backward()
    assert_close(out, want, torch.float32)
    assert_close(x.grad, xd.grad, torch.float32, atol=1e-6)
    h, w = torch.randn(4, 3, device=dev), torch.randn(5, 3, device=dev)
    assert_close(llmkern.linear_cross_entropy(h, w, y, ignore_index=2**40),
                 F.cross_entropy(F.linear(h.double(), w.double()), y.long()), torch.float32)
    with pytest.raises(ValueError, match="labels must be in"):
        llmkern.cross_entropy(x.detach(), torch.tensor([1, -100, 3, 0], dtype=torch.int32, device=dev),
                              ignore_index=2**32 - 100)


@needs_triton
def test_out_of_range_labels_are_ignored_by_the_kernels(triton_backend):
    """CUDA semantics (no host check): the op itself counts such rows as ignored."""
    x = torch.randn(6, 50, device=DEV, requires_grad=True)
    y = torch.tensor([3, 50, -1, 7, 1000, IGNORE], device=DEV)
    out, lse, n_valid, bad = torch.ops.llmkern.cross_entropy_fwd(x, y, IGNORE, 0.0, "mean")
    assert int(n_valid) == 2 and int(bad) == 3  # (the kernel counts the out-of-range labels 50, -1, 1000)
    out.backward()
    keep = torch.tensor([3, IGNORE, IGNORE, 7, IGNORE, IGNORE], device=DEV)
    xd = x.detach().double().requires_grad_()
    rout = _torch_loss(xd, keep)
    rout.backward()
    assert_close(out, rout, torch.float32)
    assert_close(x.grad, xd.grad, torch.float32, atol=1e-6)
    assert (x.grad[[1, 2, 4, 5]] == 0).all()
    assert_close(ref.cross_entropy(x.detach().double(), y), rout.detach(), torch.float64)


@needs_triton
def test_float64_uses_reference_under_triton_backend(triton_backend):
    x = torch.randn(4, 33, dtype=torch.float64, device=DEV)
    y = _labels((4,), 33)
    with warnings.catch_warnings():  # the one-time "LLMKERN_BACKEND=triton is not available" notice
        warnings.simplefilter("ignore", RuntimeWarning)
        out = llmkern.cross_entropy(x, y)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.cross_entropy(x, y))


# ---- the CPU default path (reference) ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_default_dispatch_is_reference_and_matches_torch(monkeypatch, dtype):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    from llmkern import _backend

    assert _backend.OP_DISPATCH["cross_entropy"](torch.device("cpu"), dtype) == "reference"
    x = torch.randn(2, 6, 40, dtype=dtype, requires_grad=True)
    y = _labels((2, 6), 40, 3, device="cpu")
    out = llmkern.cross_entropy(x, y)
    out.backward()
    xr = x.detach().clone().requires_grad_()
    want = F.cross_entropy(xr.reshape(-1, 40).float() if dtype != torch.float64 else xr.reshape(-1, 40),
                           y.reshape(-1))
    want.backward()
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(x.grad, xr.grad)


def test_reference_softcap_and_none_shape():
    x = torch.randn(3, 4, 20, dtype=torch.float64)
    y = _labels((3, 4), 20, 2, device="cpu")
    got = ref.cross_entropy(x, y, reduction="none", softcap=3.0)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, _torch_loss(x, y, reduction="none", softcap=3.0))
    torch.testing.assert_close(llmkern.cross_entropy(x, y, softcap=3.0), _torch_loss(x, y, softcap=3.0))


# ---- validation -------------------------------------------------------------------------------------

def _bad_cases():
    return [
        (dict(labels=torch.zeros(5, dtype=torch.long)), "labels must have shape"),
        (dict(labels=torch.zeros(2, 2, dtype=torch.long)), "labels must have shape"),
        (dict(labels=torch.zeros(4)), "labels must be an int64"),
        (dict(labels=torch.zeros(4, dtype=torch.int16)), "labels must be an int64"),
        (dict(labels=torch.tensor([0, 1, 10, 2])), r"labels must be in \[0, 10\)"),
        (dict(labels=torch.tensor([0, -1, 2, 3])), r"labels must be in \[0, 10\)"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(logits=torch.randn(4, 0)), "logits must have shape"),
        (dict(logits=torch.zeros(4, 10, dtype=torch.int32)), "logits must be float32"),
        (dict(softcap=-1.0), "softcap must be"),
        (dict(softcap=float("inf")), "softcap must be"),
        (dict(softcap=1e-39), "softcap must be 0"),  # (1 / softcap is inf in float32: NaN in the kernels)
    ]


@pytest.mark.parametrize("bad,match", _bad_cases(), ids=[f"{i}-{m}" for i, (_, m) in enumerate(_bad_cases())])
def test_bad_inputs_raise_value_error(bad, match):
    args = dict(logits=torch.randn(4, 10), labels=torch.tensor([0, 1, 2, IGNORE]))
    args.update({n: bad.pop(n) for n in list(bad) if n in args})
    with pytest.raises(ValueError, match=match):
        llmkern.cross_entropy(args["logits"], args["labels"], **bad)


def test_bad_input_types():
    x, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match="ignore_index"):
        llmkern.cross_entropy(x, y, ignore_index=1.5)
    with pytest.raises(TypeError, match="labels"):
        llmkern.cross_entropy(x, [0, 1, 2, 3])
    with pytest.raises(TypeError, match="softcap"):
        llmkern.cross_entropy(x, y, softcap="3")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="labels is on"):
            llmkern.cross_entropy(x.cuda(), y)


# ---- registration ------------------------------------------------------------------------------------

@needs_triton
def test_opcheck(triton_backend):
    x = torch.randn(5, 70, device=DEV, requires_grad=True)
    y = _labels((5,), 70, 1)
    torch.library.opcheck(torch.ops.llmkern.cross_entropy_fwd.default, (x, y, IGNORE, 0.0, "mean"))
    base = torch.randn(2, 4, 70, device=DEV)
    xs = base[:, 1:].requires_grad_()   # a [B, T, V] slice: the two-stride path
    torch.library.opcheck(torch.ops.llmkern.cross_entropy_fwd.default,
                          (xs, _labels((6,), 70, 2, dtype=torch.int32), IGNORE, 3.0, "none"))
    _, lse, n, _ = torch.ops.llmkern.cross_entropy_fwd(x.detach(), y, IGNORE, 0.0, "sum")
    torch.library.opcheck(torch.ops.llmkern.cross_entropy_bwd.default,
                          (torch.tensor(0.5, device=DEV), x.detach(), y, lse, n, IGNORE, 0.0, "sum"))


@needs_triton
def test_torch_compile_fullgraph(triton_backend):
    torch._dynamo.reset()
    x = torch.randn(2, 5, 80, device=DEV, requires_grad=True)
    y = _labels((2, 5), 80, 2)

    def f(a, b):
        return llmkern.cross_entropy(a, b, softcap=6.0) + 0.5 * llmkern.cross_entropy(a, b, reduction="none").sum()

    got = torch.compile(f, fullgraph=True)(x, y)
    got.backward()
    g = x.grad.clone()
    x.grad = None
    want = f(x, y)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, x.grad)


# ---- GPU: GPT-2's vocabulary, bf16 -------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_bf16_gpt2_vocab_vs_torch():
    N, V = 4096, 50257
    x = (torch.randn(N, V, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    y = _labels((N,), V, 300, device="cuda")
    out = llmkern.cross_entropy(x, y)
    out.backward()
    xt = x.detach().clone().requires_grad_()
    want = F.cross_entropy(xt.float(), y)                    # what the model zoo computes today
    want.backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    xd = x.detach().double().requires_grad_()
    F.cross_entropy(xd, y).backward()
    scale = xd.grad.abs().max().item()
    err = (x.grad.double() - xd.grad).abs().max().item() / scale
    err_torch = (xt.grad.double() - xd.grad).abs().max().item() / scale
    assert err <= max(2 * err_torch, 1e-2), (err, err_torch)
    none = llmkern.cross_entropy(x.detach(), y, reduction="none", softcap=30.0)
    torch.testing.assert_close(none, _torch_loss(x.detach().float(), y, reduction="none", softcap=30.0),
                               atol=1e-3, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_eager_calls_skip_the_custom_op_with_the_same_results(triton_backend, monkeypatch, reduction):
    """Eager calls run _CrossEntropyFunction (no torch.library dispatch); the custom op, which
    torch.compile traces, gives the same loss and gradient bit for bit."""
    logits = torch.randn(2, 9, 40, device=DEV, requires_grad=True)
    labels = _labels((2, 9), 40, n_ignored=3)
    fast = []
    real_fn = ops._CrossEntropyFunction.apply
    monkeypatch.setattr(ops._CrossEntropyFunction, "apply", lambda *a: (fast.append(1), real_fn(*a))[1])
    eager = llmkern.cross_entropy(logits, labels, reduction=reduction)
    (eager_grad,) = torch.autograd.grad(eager.sum(), (logits,))
    assert fast
    monkeypatch.setattr(ops._checks, "eager_fast_path", lambda *t: False)
    called = []
    real = ops._ce_fwd_op
    monkeypatch.setattr(ops, "_ce_fwd_op", lambda *a: (called.append(1), real(*a))[1])
    op = llmkern.cross_entropy(logits, labels, reduction=reduction)
    (op_grad,) = torch.autograd.grad(op.sum(), (logits,))
    assert called and len(fast) == 1
    assert torch.equal(eager, op) and torch.equal(eager_grad, op_grad)


def test_double_backward_raises_on_the_kernel_path(triton_backend):
    """A double backward through the kernels raises (as through the custom op) instead of returning a first
    gradient detached from the graph (a gradient penalty would silently count as zero)."""
    logits = torch.randn(6, 40, requires_grad=True)
    labels = torch.randint(0, 40, (6,))
    (g,) = torch.autograd.grad(llmkern.cross_entropy(logits, labels), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.pow(2).sum().backward()


@pytest.mark.parametrize("offset", [1e4, 1e6, 1e7])
def test_loss_is_shift_invariant_with_large_logits(triton_backend, offset):
    """The kernel's loss is (max - z_label) + log(sum), and the backward reads the log-sum-exp with its rounding
    error (TwoSum): one float32 LSE lost the log-sum once the logits were large (loss 0.49 off at 1e7, gradient
    rows summing to 0.6 instead of 0; F.cross_entropy stays at 1e-6). Ties at float32's largest value too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1000, generator=g) * 3 + offset
    y = torch.randint(0, 1000, (4,), generator=g)
    xd = x.double().requires_grad_()
    want = F.cross_entropy(xd, y, reduction="none")
    want.sum().backward()
    xt = x.to(DEV).requires_grad_()
    got = llmkern.cross_entropy(xt, y.to(DEV), reduction="none")
    got.sum().backward()
    assert (got.double().cpu() - want.detach()).abs().max() < 1e-5
    assert (xt.grad.double().cpu() - xd.grad).abs().max() < 1e-5
    big = torch.full((1, 20), float("-inf"))
    big[0, :14] = 3.4e38
    xt = big.to(DEV).requires_grad_()
    llmkern.cross_entropy(xt, torch.tensor([0], device=DEV)).backward()
    torch.testing.assert_close(xt.grad[0, 1:14].cpu(), torch.full((13,), 1 / 14))


def test_a_softcap_past_float32_is_refused():
    """A softcap above float32's largest number is inf in the kernels: tanh(s / inf) * inf = NaN, silently."""
    x, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="softcap must be at most"):
        llmkern.cross_entropy(x, y, softcap=1e39)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="softcap must be at most"):
        llmkern.attention(q, q, q, softcap=1e39)
    torch.testing.assert_close(llmkern.cross_entropy(x, y, softcap=1e30), F.cross_entropy(x, y))
