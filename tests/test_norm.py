"""llmkern.rms_norm / llmkern.layer_norm: Triton kernels (the interpreter on CPU, small shapes,
float32/float16) against the float64 reference, forward and backward, with and without weight, bias,
residual and the returned residual; layouts and expanded gradients; dweight determinism; the
reference against transformers' LlamaRMSNorm / GemmaRMSNorm / Gemma3RMSNorm and nn.LayerNorm;
validation; registration (opcheck, torch.compile). GPU case (bf16) under -m gpu."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.ops import norm as ops
from llmkern.reference import norm as ref
from llmkern.testing import assert_close, interpreter_dtypes, triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def triton_backend(monkeypatch):
    """Route CPU tensors through the Triton kernels (under the interpreter); CUDA uses them anyway."""
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")


def _inputs(lead, N, dtype, weight=True, bias=False, residual=False, device=DEV, wdtype=None):
    x = (torch.randn(*lead, N, device=device) * 2 + 0.5).to(dtype)
    w = (torch.randn(N, device=device) * 0.5 + 1).to(wdtype or dtype) if weight else None
    b = (torch.randn(N, device=device) * 0.5).to(wdtype or dtype) if bias else None
    r = torch.randn(*lead, N, device=device).to(dtype) if residual else None
    return x, w, b, r


def _run(fn, rms, x, w, b, r, offset, return_residual):
    if rms:
        return fn(x, w, 1e-6, residual=r, offset=offset, return_residual=return_residual)
    return fn(x, w, b, 1e-5, residual=r, return_residual=return_residual)


def _grads(fn, rms, leaves, offset, return_residual, ups, cast):
    """(outputs, gradients of the non-None leaves) of fn on copies of leaves cast by `cast`."""
    copies = [cast(t).detach().requires_grad_() if t is not None else None for t in leaves]
    out = _run(fn, rms, *copies, offset, return_residual)
    out = out if return_residual else (out,)
    wrt = [t for t in copies if t is not None]
    return out, torch.autograd.grad(out, wrt, [u.to(out[0].dtype) for u in ups])


def _check(rms, x, w, b=None, r=None, offset=0.0, return_residual=False):
    """Output(s) and the gradients of every input (random upstream gradients for y and s) of the op
    vs the reference in float64 on the same (rounded) values. A gradient may be off by a few times
    the reference's own error in x's dtype (at N = 1, dx = rstd * g * (1 - xhat^2) cancels)."""
    dtype = x.dtype
    leaves = (x, w, b, r)
    ups = [torch.randn(x.shape, device=x.device).to(dtype) for _ in range(2 if return_residual else 1)]
    op, refn = (llmkern.rms_norm, ref.rms_norm) if rms else (llmkern.layer_norm, ref.layer_norm)
    out, got = _grads(op, rms, leaves, offset, return_residual, ups, lambda t: t.clone())
    want, exp = _grads(refn, rms, leaves, offset, return_residual, ups, lambda t: t.double())
    _, low = _grads(refn, rms, leaves, offset, return_residual, ups, lambda t: t.clone())
    for o, e, name in zip(out, want, ("y", "s")):
        assert o.dtype == dtype and o.shape == x.shape, name
        assert_close(o, e, dtype, msg=name, **({} if dtype != torch.float32 else dict(atol=2e-6, rtol=2e-6)))
    names = [n for n, t in zip("dx dw db dresidual".split(), leaves) if t is not None]
    for name, leaf, g, e, lo in zip(names, [t for t in leaves if t is not None], got, exp, low):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        scale = max(e.abs().max().item(), 1e-30)
        atol = 4e-6 if dtype == torch.float32 else 2e-3
        atol = max(atol, 4 * (lo.double() - e).abs().max().item() / scale)
        assert_close(g / scale, e / scale, dtype, msg=name, atol=atol, rtol=1e-5 if dtype == torch.float32 else 1e-2)
    return out, got


# ---- the Triton kernels vs the float64 reference ----------------------------------------------------

RMS_CASES = [
    # leading shape, N, weight, residual, return_residual, offset
    ((5,), 1, True, False, False, 0.0),
    ((33,), 7, True, True, True, 0.0),         # 8 rows per program: a partial last block
    ((5,), 64, False, False, False, 0.0),      # no affine
    ((2, 3), 96, True, True, False, 1.0),      # Gemma's (1 + w); residual fused, s not returned
    ((1,), 1000, True, True, True, 1.0),
    ((33,), 1000, True, False, False, 0.0),    # several row blocks per backward program
    ((3, 11), 64, False, True, True, 0.0),
]


@needs_triton
@pytest.mark.parametrize("case", RMS_CASES, ids=[f"{c[0]}-N{c[1]}-w{c[2]:d}-r{c[3]:d}{c[4]:d}-o{c[5]}"
                                                 for c in RMS_CASES])
def test_rms_norm_kernel_vs_reference_fp32(triton_backend, case):
    lead, N, weight, residual, ret, offset = case
    x, w, _, r = _inputs(lead, N, torch.float32, weight=weight, residual=residual)
    _check(True, x, w, r=r, offset=offset, return_residual=ret)


LN_CASES = [
    # leading shape, N, weight, bias, residual, return_residual
    ((5,), 1, True, True, False, False),
    ((33,), 7, True, True, True, True),
    ((5,), 64, False, False, False, False),
    ((2, 3), 96, True, False, True, False),    # bias=False
    ((1,), 1000, False, True, True, True),     # bias without weight
    ((33,), 1000, True, True, False, False),
]


@needs_triton
@pytest.mark.parametrize("case", LN_CASES, ids=[f"{c[0]}-N{c[1]}-w{c[2]:d}b{c[3]:d}-r{c[4]:d}{c[5]:d}"
                                                for c in LN_CASES])
def test_layer_norm_kernel_vs_reference_fp32(triton_backend, case):
    lead, N, weight, bias, residual, ret = case
    x, w, b, r = _inputs(lead, N, torch.float32, weight=weight, bias=bias, residual=residual)
    _check(False, x, w, b, r, return_residual=ret)


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("rms,offset", [(True, 0.0), (True, 1.0), (False, 0.0)], ids=["llama", "gemma", "ln"])
def test_kernel_dtypes(triton_backend, dtype, rms, offset):
    x, w, b, r = _inputs((9,), 200, dtype, bias=not rms, residual=True)
    _check(rms, x, w, b, r, offset=offset, return_residual=True)


@needs_triton
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "ln"])
def test_float32_weight_with_float16_input(triton_backend, rms):
    """Norm weights kept in float32 next to half activations: y in x's dtype, gradients in each
    input's own dtype."""
    x, w, b, r = _inputs((6,), 48, torch.float16, bias=not rms, residual=True, wdtype=torch.float32)
    _check(rms, x, w, b, r, return_residual=True)


@needs_triton
def test_kernel_matches_the_reference_path_in_float16(triton_backend, monkeypatch):
    """The kernels follow the reference's rounding order (Llama's: xhat rounded, then times w; Gemma's:
    one rounding): at most one float16 ulp apart (rsqrt and summation order differ)."""
    x, w, _, _ = _inputs((16,), 256, torch.float16)
    for offset in (0.0, 1.0):
        got = llmkern.rms_norm(x, w, offset=offset)
        want = ref.rms_norm(x, w, offset=offset)
        ulp = torch.finfo(torch.float16).eps * want.float().abs().clamp_min(2.0 ** -14)
        assert ((got.float() - want.float()).abs() <= ulp).all()
        assert (got == want).float().mean() > 0.95


# ---- gradients: expanded, only one output used, aliasing ------------------------------------------

@needs_triton
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "ln"])
def test_expanded_upstream_gradient(triton_backend, rms):
    """.sum().backward() hands the op a stride-0 gradient (every stride 0)."""
    x, w, b, r = _inputs((2, 5), 70, torch.float32, bias=not rms, residual=True)
    leaves = [t.requires_grad_() for t in (x, w, r) + ((b,) if b is not None else ())]
    y, s = _run(llmkern.rms_norm if rms else llmkern.layer_norm, rms, x, w, b, r, 0.0, True)
    (y.sum() + 2 * s.sum()).backward()
    refs = [t.detach().double().requires_grad_() for t in leaves]
    rx, rw, rr = refs[:3]
    rb = refs[3] if len(refs) > 3 else None
    yd, sd = _run(ref.rms_norm if rms else ref.layer_norm, rms, rx, rw, rb, rr, 0.0, True)
    (yd.sum() + 2 * sd.sum()).backward()
    for a, e in zip(leaves, refs):
        assert_close(a.grad, e.grad, torch.float32, atol=2e-5)


@needs_triton
def test_row_expanded_gradient_is_read_in_place(triton_backend):
    """A gradient whose rows share memory (row stride 0) goes to the kernel without a copy."""
    x, w, _, _ = _inputs((6,), 40, torch.float32)
    g = torch.randn(1, 40).expand(6, 40)
    xd = x.double().requires_grad_()
    x.requires_grad_()
    got = torch.autograd.grad(llmkern.rms_norm(x, w), x, g)[0]
    want = torch.autograd.grad(ref.rms_norm(xd, w.double()), xd, g.double())[0]
    assert_close(got, want, torch.float32, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("use", ["y", "s"])
def test_only_one_output_used(triton_backend, use):
    """Only y used: no gradient arrives for s (nothing extra is read); only s used: the norm's
    backward is skipped, x and residual get ds."""
    x, w, _, r = _inputs((4,), 30, torch.float32, residual=True)
    for t in (x, w, r):
        t.requires_grad_()
    y, s = llmkern.rms_norm(x, w, residual=r, return_residual=True)
    up = torch.randn(4, 30)
    (y if use == "y" else s).backward(up)
    if use == "s":
        assert torch.equal(x.grad, up) and torch.equal(r.grad, up) and w.grad is None
    else:
        xd, wd, rd = (t.detach().double().requires_grad_() for t in (x, w, r))
        ref.rms_norm(xd, wd, residual=rd).backward(up.double())
        assert_close(x.grad, xd.grad, torch.float32, atol=1e-5)
        assert_close(w.grad, wd.grad, torch.float32, atol=1e-5)
        assert torch.equal(x.grad, r.grad)
    assert x.grad.data_ptr() != r.grad.data_ptr()  # dx = dresidual, but two tensors


@needs_triton
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "ln"])
def test_dweight_is_deterministic(triton_backend, rms):
    """dweight / dbias: per-program partial sums reduced by torch.sum (no atomics), bit for bit."""
    x, w, b, r = _inputs((37,), 100, torch.float32, bias=not rms, residual=True)
    dy = torch.randn(37, 100)
    grads = []
    for _ in range(2):
        params = [t.detach().clone().requires_grad_() for t in (w, b) if t is not None]
        out = llmkern.rms_norm(x, params[0], residual=r) if rms else llmkern.layer_norm(x, *params, residual=r)
        grads.append(torch.autograd.grad(out, params, dy))
    for a, c in zip(*grads):
        assert torch.equal(a, c)


# ---- layouts -------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("layout", ["transposed", "column-slice", "4d-strided", "expanded-rows"])
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "ln"])
def test_non_contiguous_inputs(triton_backend, layout, rms):
    N = 50
    if layout == "transposed":                  # last dim not contiguous: copied
        x = torch.randn(N, 6).t()
    elif layout == "column-slice":              # row stride > N: read in place
        x = torch.randn(6, N + 14)[:, 7:7 + N]
        from llmkern.kernels.norm import rows2d

        assert rows2d(x, N).data_ptr() == x.data_ptr()
    elif layout == "4d-strided":                # leading dims that do not collapse: copied
        x = torch.randn(2, 2, 4, N)[:, :, :3]
    else:                                       # row stride 0
        x = torch.randn(1, N).expand(5, N)
    r = torch.randn(N, x.shape[0]).t() if layout == "transposed" else torch.randn(x.shape)
    w = torch.randn(N)
    b = None if rms else torch.randn(N)
    _check(rms, x, w, b, r, return_residual=True)


@needs_triton
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "ln"])
def test_strided_weight_and_bias(triton_backend, rms):
    """A weight / bias that is a strided view (w[::2], a column of a stacked parameter): the kernels
    index them with unit stride, so the launchers must make them dense (they read the wrong elements,
    silently, before)."""
    N = 24
    x, r, dy = torch.randn(3, 5, N).unbind(0)
    w_big, b_big = torch.randn(2 * N, requires_grad=True), torch.randn(N, 3, requires_grad=True)
    w, b = w_big[::2], None if rms else b_big[:, 1]  # (_check's clones would make them dense)
    op, refn = (llmkern.rms_norm, ref.rms_norm) if rms else (llmkern.layer_norm, ref.layer_norm)
    y = _run(op, rms, x, w, b, r, 0.0, False)
    want = _run(refn, rms, x.double(), w.double(), None if rms else b.double(), r.double(), 0.0, False)
    assert_close(y, want, torch.float32)
    params = (w_big,) if rms else (w_big, b_big)
    got = torch.autograd.grad(y, params, dy)
    exp = torch.autograd.grad(_run(refn, rms, x, w, b, r, 0.0, False), params, dy)
    for a, c in zip(got, exp):
        assert_close(a, c, torch.float32)


@needs_triton
def test_zero_rows_and_hidden_size_limit(triton_backend):
    x = torch.randn(0, 3, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y = llmkern.rms_norm(x, w)
    assert y.shape == (0, 3, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape and (w.grad == 0).all()
    with pytest.raises(ValueError, match="last dim must be <= 65536"):
        llmkern.layer_norm(torch.randn(1, 65537), None, None)


@needs_triton
def test_float64_uses_reference_under_triton_backend(triton_backend):
    x = torch.randn(4, 33, dtype=torch.float64)
    w = torch.randn(33, dtype=torch.float64)
    with warnings.catch_warnings():  # the one-time "LLMKERN_BACKEND=triton is not available" notice
        warnings.simplefilter("ignore", RuntimeWarning)
        out = llmkern.layer_norm(x, w, None)
    torch.testing.assert_close(out, F.layer_norm(x, (33,), w))


# ---- the reference and the CPU default path vs transformers / PyTorch --------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_is_llama_and_gemma_rms_norm_bitwise(monkeypatch, dtype):
    """The CPU path (reference) equals transformers' modules bit for bit, forward and backward,
    and the zoo's RMSNorm forward."""
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from llmkern.models.llama import RMSNorm as ZooRMSNorm

    x = (torch.randn(3, 7, 64) * 3).to(dtype)
    for cls, offset in ((LlamaRMSNorm, 0.0), (GemmaRMSNorm, 1.0), (Gemma3RMSNorm, 1.0)):
        mod = cls(64, eps=1e-6).to(dtype)
        with torch.no_grad():
            mod.weight.normal_(0.3, 0.5)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        want = mod(xa)
        got = llmkern.rms_norm(xb, mod.weight, 1e-6, offset=offset)
        assert got.dtype == want.dtype and torch.equal(got, want), cls.__name__
        up = torch.randn_like(want)
        ga = torch.autograd.grad(want, (xa, mod.weight), up)
        gb = torch.autograd.grad(got, (xb, mod.weight), up)
        assert all(torch.equal(a, b) for a, b in zip(ga, gb)), cls.__name__
    zoo = ZooRMSNorm(64, 1e-5).to(dtype)
    assert torch.equal(llmkern.rms_norm(x, zoo.weight, 1e-5), zoo(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_layer_norm(monkeypatch, dtype):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    mod = torch.nn.LayerNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        mod.weight.normal_(1, 0.5)
        mod.bias.normal_(0, 0.5)
    x = (torch.randn(5, 48) * 2).to(dtype).requires_grad_()
    got = llmkern.layer_norm(x, mod.weight, mod.bias, 1e-5)
    want = mod(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=0 if dtype == torch.float32 else 1e-2, rtol=1e-6)
    nb = torch.nn.LayerNorm(48, elementwise_affine=False)
    torch.testing.assert_close(llmkern.layer_norm(x.float(), None, None), nb(x.float()))


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
def test_kernel_vs_transformers_llama_and_gemma(triton_backend, dtype):
    """The kernels against the transformers modules: close in float32 (summation order and rsqrt
    differ), within one ulp in float16."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = (torch.randn(2, 5, 96, device=DEV) * 3).to(dtype)
    for cls, offset in ((LlamaRMSNorm, 0.0), (Gemma3RMSNorm, 1.0)):
        mod = cls(96, eps=1e-6).to(device=DEV, dtype=dtype)
        with torch.no_grad():
            mod.weight.normal_(0.3, 0.5)
        got, want = llmkern.rms_norm(x, mod.weight, 1e-6, offset=offset), mod(x)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        else:
            ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(2.0 ** -14)
            assert ((got.float() - want.float()).abs() <= ulp).all(), cls.__name__


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_cpu_default_dispatch_is_reference(monkeypatch, op):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    from llmkern import _backend

    assert _backend.OP_DISPATCH[op](torch.device("cpu"), torch.bfloat16) == "reference"
    x, w, b, r = _inputs((2, 3), 32, torch.bfloat16, bias=op == "layer_norm", residual=True, device="cpu")
    s = x + r
    y, s2 = _run(getattr(llmkern, op), op == "rms_norm", x, w, b, r, 0.0, True)
    assert torch.equal(s2, s)
    want = F.layer_norm(s.float(), (32,), w.float(), b.float()) if b is not None else \
        s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y, (want.to(s.dtype) * w if b is None else want.to(s.dtype)), atol=0, rtol=0)


# ---- validation ---------------------------------------------------------------------------------

def _bad_cases():
    return [
        (dict(weight=torch.randn(9)), ValueError, r"weight must have shape \[10\]"),
        (dict(weight=torch.randn(10, 1)), ValueError, r"weight must have shape \[10\]"),
        (dict(bias=torch.randn(3)), ValueError, r"bias must have shape \[10\]"),
        (dict(weight=torch.randn(10, dtype=torch.float64)), ValueError, "weight must be torch.float32"),
        (dict(x=torch.randn(4, 10).half(), weight=torch.randn(10).bfloat16()), ValueError, "weight must be"),
        (dict(x=torch.zeros(4, 10, dtype=torch.int32)), ValueError, "x must be float32"),
        (dict(x=torch.randn(4, 0)), ValueError, "x must have shape"),
        (dict(x=torch.tensor(1.0)), ValueError, "x must have shape"),
        (dict(residual=torch.randn(4, 9)), ValueError, "residual must have x's shape"),
        (dict(residual=torch.randn(4, 10).half()), ValueError, "residual must have x's shape"),
        (dict(eps=0.0), ValueError, "eps must be a finite float > 0"),
        (dict(eps=-1e-5), ValueError, "eps must be"),
        (dict(eps=float("nan")), ValueError, "eps must be"),
        (dict(eps="1e-5"), TypeError, "eps must be a float"),
        (dict(return_residual=True), ValueError, "return_residual=True needs a residual"),
        (dict(return_residual=1), TypeError, "return_residual must be a bool"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (dict(weight=[1.0] * 10), TypeError, "weight must be a torch.Tensor"),
        (dict(residual=1.0), TypeError, "residual must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("bad,exc,match", _bad_cases(),
                         ids=[f"{i}-{m[:24]}" for i, (_, _, m) in enumerate(_bad_cases())])
def test_bad_inputs(op, bad, exc, match):
    args = dict(x=torch.randn(4, 10), weight=torch.randn(10), bias=torch.randn(10), eps=1e-5, residual=None,
                return_residual=False)
    args.update(bad)
    kw = dict(residual=args["residual"], return_residual=args["return_residual"])
    if op == "rms_norm" and "bias" in bad:
        pytest.skip("rms_norm has no bias")
    with pytest.raises(exc, match=match):
        if op == "rms_norm":
            llmkern.rms_norm(args["x"], args["weight"], args["eps"], **kw)
        else:
            llmkern.layer_norm(args["x"], args["weight"], args["bias"], args["eps"], **kw)


def test_bad_rms_offset():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="offset must be 0 without a weight"):
        llmkern.rms_norm(x, None, offset=1.0)
    with pytest.raises(TypeError, match="offset must be a float"):
        llmkern.rms_norm(x, torch.ones(8), offset=None)
    with pytest.raises(ValueError, match="offset must be a finite"):
        llmkern.rms_norm(x, torch.ones(8), offset=float("inf"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight is on"):
            llmkern.rms_norm(x.cuda(), torch.ones(8))


# ---- registration ------------------------------------------------------------------------------

@needs_triton
def test_opcheck(triton_backend):
    x = torch.randn(5, 40, device=DEV, requires_grad=True)
    w = torch.randn(40, device=DEV, requires_grad=True)
    b = torch.randn(40, device=DEV, requires_grad=True)
    r = torch.randn(5, 40, device=DEV, requires_grad=True)
    xs = torch.randn(5, 56, device=DEV)[:, 8:48].requires_grad_()  # row stride 56
    x3 = torch.randn(2, 3, 40, device=DEV).transpose(0, 1).requires_grad_()  # [3, 2, 40], rows not one stride
    torch.library.opcheck(torch.ops.llmkern.rms_norm_fwd.default, (x, w, r, 1e-6, 1.0))
    torch.library.opcheck(torch.ops.llmkern.rms_norm_fwd.default, (xs, None, None, 1e-6, 0.0))
    torch.library.opcheck(torch.ops.llmkern.layer_norm_fwd.default, (x, w, b, r, 1e-5))
    torch.library.opcheck(torch.ops.llmkern.layer_norm_fwd.default, (xs, None, b, None, 1e-5))
    torch.library.opcheck(torch.ops.llmkern.layer_norm_fwd.default, (x3, w, None, torch.randn(3, 2, 40), 1e-5))
    y, s, rstd = torch.ops.llmkern.rms_norm_fwd(x.detach(), w.detach(), r.detach(), 1e-6, 0.0)
    dy = torch.randn(5, 40, device=DEV)
    torch.library.opcheck(torch.ops.llmkern.rms_norm_bwd.default, (dy, dy * 2, s, w.detach(), rstd, 0.0, True))
    torch.library.opcheck(torch.ops.llmkern.rms_norm_bwd.default, (dy, None, s, None, rstd, 0.0, False))
    _, _, mean, rstd = torch.ops.llmkern.layer_norm_fwd(x.detach(), w.detach(), b.detach(), None, 1e-5)
    torch.library.opcheck(torch.ops.llmkern.layer_norm_bwd.default,
                          (dy, None, x.detach(), w.detach(), mean, rstd, True, True))


def _compile_case(x, w, b, r):
    def f(x, w, b, r):
        y, s = llmkern.rms_norm(x, w, residual=r, return_residual=True)
        z = llmkern.layer_norm(y * 2, w, b, residual=s)
        return z.square().sum() + s.sum() + llmkern.rms_norm(z, w, offset=1.0).sum()

    torch._dynamo.reset()
    leaves = [t.requires_grad_() for t in (x, w, b, r)]
    got = torch.compile(f, fullgraph=True)(*leaves)
    g = torch.autograd.grad(got, leaves)
    want = f(*leaves)
    gw = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want)
    for a, e in zip(g, gw):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_cpu_reference(monkeypatch):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    _compile_case(*_inputs((2, 4), 24, torch.float32, bias=True, residual=True, device="cpu"))


@needs_triton
def test_torch_compile_fullgraph_triton(triton_backend):
    _compile_case(*_inputs((2, 4), 24, torch.float32, bias=True, residual=True))


@needs_triton
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "ln"])
def test_eager_calls_skip_the_custom_op_with_the_same_results(triton_backend, monkeypatch, rms):
    """Eager calls run the autograd.Function twin; the custom op (what torch.compile traces) gives
    the same outputs and gradients bit for bit."""
    x, w, b, r = _inputs((3, 5), 40, torch.float32, bias=not rms, residual=True)
    leaves = [t.requires_grad_() for t in (x, w, b, r) if t is not None]
    fn = llmkern.rms_norm if rms else llmkern.layer_norm
    fast = []
    cls = ops._RMSNormFunction if rms else ops._LayerNormFunction
    real_apply = cls.apply
    monkeypatch.setattr(cls, "apply", lambda *a: (fast.append(1), real_apply(*a))[1])

    def run():
        y, s = _run(fn, rms, x, w, b, r, 0.0, True)
        return (y, s), torch.autograd.grad((y * y).sum() + s.sum(), leaves)

    eager = run()
    assert fast
    monkeypatch.setattr(ops._checks, "eager_fast_path", lambda *t: False)
    op = run()
    assert len(fast) == 1
    for a, e in zip(eager[0] + eager[1], op[0] + op[1]):
        assert torch.equal(a, e)


# ---- GPU: bf16 at a real hidden size --------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_bf16_vs_transformers_and_torch():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = (torch.randn(4096, 4096, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    r = torch.randn(4096, 4096, device="cuda").to(torch.bfloat16).requires_grad_()
    mod = LlamaRMSNorm(4096).to("cuda", torch.bfloat16)
    with torch.no_grad():
        mod.weight.normal_(1, 0.3)
    y, s = llmkern.rms_norm(x, mod.weight, residual=r, return_residual=True)
    xa, ra = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    sa = xa + ra
    want = mod(sa)
    assert torch.equal(s, sa)
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-30)
    assert ((y.float() - want.float()).abs() <= ulp + 1e-30).float().mean() == 1.0
    up = torch.randn_like(y)
    g = torch.autograd.grad(y, (x, r, mod.weight), up)
    ga = torch.autograd.grad(want, (xa, ra, mod.weight), up)
    for a, e in zip(g, ga):
        torch.testing.assert_close(a.float(), e.float(), atol=5e-2, rtol=5e-2)
    b = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(llmkern.layer_norm(x, mod.weight, b), F.layer_norm(x, (4096,), mod.weight, b),
                               atol=2e-2, rtol=2e-2)


def test_double_backward_raises_on_the_kernel_path(triton_backend):
    """The kernels' gradients are not differentiable: a double backward raises (as through the custom op),
    instead of a first gradient detached from the graph that silently drops a gradient-penalty term."""
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    for y in (llmkern.rms_norm(x, w, 1e-6), llmkern.layer_norm(x, w, torch.zeros(32), 1e-5)):
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            gx.pow(2).sum().backward()
