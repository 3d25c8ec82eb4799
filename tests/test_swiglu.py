"""llmkern.swiglu / llmkern.geglu: the Triton kernels (the interpreter on CPU, small shapes,
float32/float16, 32-wide column blocks so that rows run several blocks and a partial last one) against
float64 F.silu(g) * u and F.gelu(g) * u, forward and backward; layouts (the two halves of a fused
[..., 2F] projection read in place, leading dims that do not collapse, a transposed last dim,
stride-0 upstream gradients); registration (opcheck, torch.compile); validation; the CPU default
(reference) path. GPU case (bf16, against eager F.silu(g) * u) under -m gpu."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.ops import swiglu as ops
from llmkern.testing import assert_close, interpreter_dtypes, triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
# the interpreter's numpy exp warns where a saturated tanh / sigmoid overflows to inf (as on a GPU, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

ACTS = {
    "silu": (llmkern.swiglu, lambda g, u: F.silu(g) * u),
    "gelu_tanh": (lambda g, u: llmkern.geglu(g, u), lambda g, u: F.gelu(g, approximate="tanh") * u),
    "gelu": (lambda g, u: llmkern.geglu(g, u, approximate="none"), lambda g, u: F.gelu(g) * u),
}


@pytest.fixture
def triton_backend(monkeypatch):
    """Route CPU tensors through the Triton kernels (under the interpreter); CUDA uses them anyway."""
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")


def _check(act, gate, up, dout=None):
    """Output, dgate and dup of the fused op vs the torch formula in float64."""
    ours, torch_fn = ACTS[act]
    dtype = gate.dtype
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    out = ours(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape and out.is_contiguous()
    gd, ud = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    want = torch_fn(gd, ud)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    assert_close(out, want, dtype, msg="out", **tol)
    dout = torch.randn_like(out) if dout is None else dout
    dg, du = torch.autograd.grad(out, (gate, up), dout)
    rdg, rdu = torch.autograd.grad(want, (gd, ud), dout.double())
    assert dg.dtype == du.dtype == dtype and dg.shape == gate.shape
    assert_close(dg, rdg, dtype, msg="dgate", **tol)
    assert_close(du, rdu, dtype, msg="dup", **tol)
    return out


# ---- the Triton kernels vs float64 torch -----------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [(37,), (3, 5, 70)], ids=["1d-odd", "3d"])
def test_kernel_vs_torch(triton_backend, act, dtype, shape):
    gate = (torch.randn(shape, device=DEV) * 4).to(dtype)
    up = torch.randn(shape, device=DEV).to(dtype)
    _check(act, gate, up)


@needs_triton
@pytest.mark.parametrize("act", list(ACTS))
def test_large_and_tiny_gate_values(triton_backend, act):
    """Saturated activations (|g| up to 80: exp overflows inside sigmoid) stay finite and exact."""
    gate = torch.tensor([-80.0, -30.0, -8.0, -1e-4, 0.0, 1e-4, 8.0, 30.0, 80.0], device=DEV)
    _check(act, gate, torch.randn(9, device=DEV))


@needs_triton
@pytest.mark.parametrize("layout", ["fused-halves", "non-collapsing", "transposed", "expanded-up"])
def test_layouts(triton_backend, layout):
    from llmkern.kernels import swiglu as kern

    F_ = 45
    if layout == "fused-halves":  # a [..., 2F] gate-up projection: both halves read in place
        x = torch.randn(2, 3, 2 * F_, device=DEV) * 3
        gate, up = x[..., :F_], x[..., F_:]
        assert kern.as_rows(gate).data_ptr() == gate.data_ptr()
        assert kern.as_rows(up).data_ptr() == up.data_ptr()
    elif layout == "non-collapsing":  # leading dims with no single row stride: copied
        gate = torch.randn(2, 4, 3, F_, device=DEV)[:, :, :2]
        up = torch.randn(2, 4, 2, F_, device=DEV)
    elif layout == "transposed":  # columns with stride > 1
        gate = torch.randn(F_, 6, device=DEV).t()
        up = torch.randn(6, F_, device=DEV)
    else:  # a broadcast up (row stride 0)
        gate = torch.randn(5, F_, device=DEV)
        up = torch.randn(1, F_, device=DEV).expand(5, F_)
    _check("silu", gate, up)


@needs_triton
def test_stride0_upstream_gradient(triton_backend):
    gate = torch.randn(4, 33, device=DEV, requires_grad=True)
    up = torch.randn(4, 33, device=DEV, requires_grad=True)
    llmkern.swiglu(gate, up).sum().backward()  # an expanded, stride-0 gradient
    gd, ud = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    (F.silu(gd) * ud).sum().backward()
    assert_close(gate.grad, gd.grad, torch.float32, atol=1e-6)
    assert_close(up.grad, ud.grad, torch.float32, atol=1e-6)
    _check("gelu_tanh", gate, up, dout=torch.ones(1, 1, device=DEV).expand(4, 33))


@needs_triton
def test_matches_eager_float32(triton_backend):
    """In float32 the fused op equals eager F.silu(g) * u to rounding."""
    g, u = torch.randn(4, 64, device=DEV) * 3, torch.randn(4, 64, device=DEV)
    torch.testing.assert_close(llmkern.swiglu(g, u), F.silu(g) * u, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(llmkern.geglu(g, u), F.gelu(g, approximate="tanh") * u, atol=1e-6, rtol=1e-6)


@needs_triton
def test_empty(triton_backend):
    g = torch.randn(0, 8, device=DEV, requires_grad=True)
    out = llmkern.swiglu(g, torch.randn(0, 8, device=DEV))
    assert out.shape == (0, 8)


# ---- the CPU default path (reference) ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_default_dispatch_is_reference(monkeypatch, dtype):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    from llmkern import _backend

    assert _backend.OP_DISPATCH["swiglu"](torch.device("cpu"), dtype) == "reference"
    g = torch.randn(3, 40, dtype=dtype, requires_grad=True)
    u = torch.randn(3, 40, dtype=dtype, requires_grad=True)
    out = llmkern.swiglu(g, u)
    out.sum().backward()
    assert out.dtype == dtype
    exact = F.silu(g.detach().double()) * u.detach().double()
    assert_close(out, exact, dtype, atol=1e-6 if dtype != torch.bfloat16 else 1e-2)
    assert g.grad.dtype == dtype and u.grad.shape == u.shape


def test_bf16_rounds_once():
    """bfloat16: one rounding of the float32 result (eager rounds silu(g) first): within 1 ulp of
    eager, and at least as close to the exact value."""
    g, u = (torch.randn(4096) * 3).bfloat16(), torch.randn(4096).bfloat16()
    ours = llmkern.swiglu(g, u)
    exact = F.silu(g.double()) * u.double()
    assert ((ours.double() - exact).abs() <= 2.0 ** -8 * exact.abs() * 1.001 + 1e-30).all()  # half an ulp
    eager = F.silu(g) * u
    assert ((ours.double() - eager.double()).abs() <= 2.0 ** -7 * exact.abs() + 1e-30).all()
    assert (ours.double() - exact).abs().mean() <= (eager.double() - exact).abs().mean()


# ---- validation ------------------------------------------------------------------------------------

def test_bad_inputs():
    g = torch.randn(3, 8)
    with pytest.raises(ValueError, match="gate and up must have the same shape"):
        llmkern.swiglu(g, torch.randn(3, 9))
    with pytest.raises(ValueError, match="up must have gate's dtype"):
        llmkern.swiglu(g, g.half())
    with pytest.raises(ValueError, match="gate must be float32"):
        llmkern.swiglu(g.int(), g.int())
    with pytest.raises(ValueError, match="at least one dimension"):
        llmkern.swiglu(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(TypeError, match="up must be a torch.Tensor"):
        llmkern.swiglu(g, 2.0)
    with pytest.raises(ValueError, match="approximate must be 'tanh' or 'none'"):
        llmkern.geglu(g, g, approximate="erf")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="up is on cpu"):
            llmkern.swiglu(g.cuda(), g)


# ---- registration ------------------------------------------------------------------------------------

@needs_triton
def test_opcheck(triton_backend):
    x = torch.randn(2, 3, 40, device=DEV)
    gate, up = x[..., :20].requires_grad_(), x[..., 20:].requires_grad_()
    for act in ("silu", "gelu"):
        torch.library.opcheck(torch.ops.llmkern.swiglu_fwd.default, (gate, up, act))
    dout = torch.randn(2, 3, 20, device=DEV)
    torch.library.opcheck(torch.ops.llmkern.swiglu_bwd.default, (dout, gate.detach(), up.detach(), "gelu_tanh"))


@needs_triton
def test_torch_compile_fullgraph(triton_backend):
    torch._dynamo.reset()
    x = torch.randn(2, 5, 48, device=DEV, requires_grad=True)

    def f(x):
        return (llmkern.swiglu(x[..., :24], x[..., 24:]) ** 2).sum() + llmkern.geglu(x[..., 24:], x[..., :24]).sum()

    got = torch.compile(f, fullgraph=True)(x)
    got.backward()
    g = x.grad.clone()
    x.grad = None
    want = f(x)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, x.grad)


@needs_triton
def test_eager_fast_path_matches_the_custom_op(triton_backend, monkeypatch):
    gate = torch.randn(3, 40, device=DEV, requires_grad=True)
    up = torch.randn(3, 40, device=DEV, requires_grad=True)
    fast = []
    real = ops._GatedFunction.apply
    monkeypatch.setattr(ops._GatedFunction, "apply", lambda *a: (fast.append(1), real(*a))[1])
    eager = llmkern.swiglu(gate, up)
    eager_grads = torch.autograd.grad(eager.sum(), (gate, up))
    assert fast
    monkeypatch.setattr(ops._checks, "eager_fast_path", lambda *t: False)
    n = len(fast)
    op = llmkern.swiglu(gate, up)
    op_grads = torch.autograd.grad(op.sum(), (gate, up))
    assert len(fast) == n
    for a, b in zip((eager,) + eager_grads, (op,) + op_grads):
        assert torch.equal(a, b)


@needs_triton
def test_float64_uses_reference_under_triton_backend(triton_backend):
    g, u = torch.randn(3, 8, dtype=torch.float64, device=DEV), torch.randn(3, 8, dtype=torch.float64, device=DEV)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = llmkern.swiglu(g, u)
    torch.testing.assert_close(out, F.silu(g) * u)


# ---- GPU: Llama 3 8B's MLP width, bf16 -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("act", list(ACTS))
def test_gpu_bf16_vs_eager(act):
    ours, torch_fn = ACTS[act]
    x = (torch.randn(2048, 2 * 14336, device="cuda") * 2).bfloat16()
    gate, up = x[:, :14336].requires_grad_(), x[:, 14336:].requires_grad_()
    out = ours(gate, up)
    exact = torch_fn(gate.detach().double(), up.detach().double())
    assert ((out.double() - exact).abs() <= 2.0 ** -8 * exact.abs() * 1.001 + 1e-30).all()  # half an ulp
    dout = torch.randn_like(out)
    dg, du = torch.autograd.grad(out, (gate, up), dout)
    gd, ud = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    rdg, rdu = torch.autograd.grad(torch_fn(gd, ud), (gd, ud), dout.float())
    torch.testing.assert_close(dg.float(), rdg, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(du.float(), rdu, atol=2e-2, rtol=2e-2)
