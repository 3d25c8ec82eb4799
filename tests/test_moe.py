"""llmkern.moe_mlp / llmkern.moe_route: the Triton kernels (the interpreter on CPU: tiny shapes, float32 /
float16, 16x32 tiles so that experts span several row tiles and partial ones) against the float64
reference (transformers' loop over experts), forward and the gradients of x, w_gate_up, w_down and
topk_weights; empty experts, k = 1 and k > 1, odd sizes, leading dims, stride-0 upstream gradients,
the split weight-gradient reduction, partial gradient sets, determinism, dropped slots (id -1) on every
path, ids outside [0, E) on the kernels' own (CUDA) path, the exact erf GeGLU; registration (opcheck,
torch.compile on the reference and on the custom op), the eager twin; validation; the router;
transformers' MixtralExperts. GPU case (bf16, realistic sizes) under -m gpu."""
import pytest
import torch

import llmkern
from llmkern.ops import moe as ops
from llmkern.reference import moe as ref
from llmkern.testing import assert_close, interpreter_dtypes, triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@pytest.fixture
def triton_backend(monkeypatch):
    """Route CPU tensors through the Triton kernels (under the interpreter); CUDA uses them anyway."""
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")


def _problem(T, d, F, E, k, dtype=torch.float32, empty=(), lead=None, device=DEV):
    """(x, w_gate_up, w_down, topk_ids, topk_weights) with distinct top-k ids per token; the experts in
    `empty` get no token (their logits pushed down)."""
    x = torch.randn(T, d, device=device)
    wgu = torch.randn(E, 2 * F, d, device=device) / d ** 0.5
    wd = torch.randn(E, d, F, device=device) / F ** 0.5
    logits = torch.randn(T, E, device=device)
    for e in empty:
        logits[:, e] -= 1e4
    tw, ids = llmkern.moe_route(logits, k)
    if lead is not None:
        x, ids, tw = x.reshape(*lead, d), ids.reshape(*lead, k), tw.reshape(*lead, k)
    return x.to(dtype), wgu.to(dtype), wd.to(dtype), ids, tw


def _tol(dtype):
    return {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}.get(
        dtype, dict(atol=3e-2, rtol=3e-2))


def _grads_vs_reference(x, wgu, wd, ids, tw, activation="swiglu", dy=None, tol=None):
    """moe_mlp's output and its four gradients against the float64 reference. The oracle never sees an
    id -1 (a dropped slot): it runs such a slot on expert 0 with weight 0, so that its output and weight
    gradient are 0 by the chain rule rather than by the skipping under test."""
    dtype = x.dtype
    leaves = [t.detach().requires_grad_() for t in (x, wgu, wd, tw)]
    y = llmkern.moe_mlp(leaves[0], leaves[1], leaves[2], ids, leaves[3], activation)
    assert y.shape == x.shape and y.dtype == dtype
    exact = [t.detach().double().requires_grad_() for t in (x, wgu, wd, tw)]
    keep = (ids >= 0).double()
    want = ref.moe_mlp(exact[0], exact[1], exact[2], ids.clamp_min(0), exact[3] * keep, activation)
    tol = tol or _tol(dtype)
    assert_close(y, want, dtype, msg="y", **tol)
    dy = torch.randn_like(y) if dy is None else dy
    got = torch.autograd.grad(y, leaves, dy)
    wants = torch.autograd.grad(want, exact, dy.double())
    for name, g, w, leaf in zip(("dx", "dw_gate_up", "dw_down", "dtopk_weights"), got, wants, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        scale = max(1.0, w.abs().max().item())  # weight gradients sum over many rows
        assert_close(g, w, dtype, msg=name, atol=tol["atol"] * scale, rtol=tol["rtol"])
    return y, got


# ---- the Triton kernels vs the float64 reference ----------------------------------------------------

CASES = {  # T, d, F, E, k, experts with no token
    "k2-empty-expert": (13, 40, 36, 5, 2, (3,)),
    "k1": (9, 24, 20, 4, 1, ()),
    "k3-odd": (24, 48, 45, 5, 3, (0,)),
    "one-token-k4": (1, 17, 33, 5, 4, ()),
}


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_vs_reference(triton_backend, case, dtype):
    T, d, F, E, k, empty = CASES[case]
    _grads_vs_reference(*_problem(T, d, F, E, k, dtype, empty))


@needs_triton
def test_256_experts_k8(triton_backend):
    """DeepSeek-V3's 256 experts with k = 8 on a few tokens: most experts empty, the tile scan over 256
    lanes (float32 only: each of the weight-gradient reduction's 256 x tiles programs costs ms here)."""
    _grads_vs_reference(*_problem(6, 16, 16, 256, 8))


@needs_triton
def test_geglu_and_leading_dims(triton_backend):
    x, wgu, wd, ids, tw = _problem(12, 32, 24, 4, 2, lead=(3, 4))
    assert x.shape == (3, 4, 32) and ids.shape == (3, 4, 2)
    _grads_vs_reference(x, wgu, wd, ids, tw, activation="geglu")
    # ids / weights may also come flat [T, k] for x [..., d]
    _grads_vs_reference(x, wgu, wd, ids.reshape(12, 2), tw.reshape(12, 2))


@needs_triton
def test_every_token_on_one_expert_and_duplicate_ids(triton_backend):
    """All rows on one expert (its segment spans several tiles, the others are empty), and a token whose
    two slots name the same expert (summed like two experts)."""
    x, wgu, wd, _, _ = _problem(40, 24, 20, 4, 2)
    ids = torch.full((40, 2), 2, device=DEV)
    ids[:, 1] = 1
    ids[5, :] = 3  # a duplicate
    tw = torch.rand(40, 2, device=DEV)
    _grads_vs_reference(x, wgu, wd, ids, tw)


@needs_triton
def test_stride0_upstream_gradient(triton_backend):
    x, wgu, wd, ids, tw = _problem(10, 24, 20, 4, 2)
    _grads_vs_reference(x, wgu, wd, ids, tw, dy=torch.ones(1, 1, device=DEV).expand(10, 24))
    x.requires_grad_()
    llmkern.moe_mlp(x, wgu, wd, ids, tw).sum().backward()  # an expanded, stride-0 gradient
    xd = x.detach().double().requires_grad_()
    ref.moe_mlp(xd, wgu.double(), wd.double(), ids, tw.double()).sum().backward()
    assert_close(x.grad, xd.grad, torch.float32)


@needs_triton
def test_split_weight_gradient_reduction(triton_backend, monkeypatch):
    """The per-expert weight gradients split over row chunks (as on a GPU with few experts and many rows)
    equal the unsplit ones: partial sums over chunks, summed in a fixed order."""
    from llmkern.kernels import moe as kern

    x, wgu, wd, ids, tw = _problem(24, 24, 20, 3, 2)
    _, unsplit = _grads_vs_reference(x, wgu, wd, ids, tw, dy=torch.randn(24, 24, device=DEV))
    monkeypatch.setattr(kern, "_split_for", lambda *a: 3)
    torch.manual_seed(0)
    dy = torch.randn(24, 24, device=DEV)
    _grads_vs_reference(x, wgu, wd, ids, tw, dy=dy)


@needs_triton
@pytest.mark.parametrize("need", ["x", "weights", "topk_weights", "w_down"])
def test_partial_gradients(triton_backend, need):
    """Only the asked-for gradients (frozen experts as under LoRA, a frozen router, ...), each right."""
    which = {"x": (0,), "weights": (1, 2), "topk_weights": (3,), "w_down": (2,)}[need]
    tensors = _problem(10, 24, 20, 4, 2)
    ids = tensors[3]
    ours = [t.detach().requires_grad_(i in which) for i, t in enumerate(tensors[:3] + tensors[4:])]
    exact = [t.detach().double().requires_grad_(i in which) for i, t in enumerate(tensors[:3] + tensors[4:])]
    dy = torch.randn(10, 24, device=DEV)
    llmkern.moe_mlp(ours[0], ours[1], ours[2], ids, ours[3]).backward(dy)
    ref.moe_mlp(exact[0], exact[1], exact[2], ids, exact[3]).backward(dy.double())
    for i, (t, e) in enumerate(zip(ours, exact)):
        if i in which:
            assert_close(t.grad, e.grad, torch.float32, atol=1e-4 * max(1.0, e.grad.abs().max().item()))
        else:
            assert t.grad is None


@needs_triton
def test_no_grad_keeps_nothing_and_is_deterministic(triton_backend, monkeypatch):
    from llmkern.kernels import moe as kern

    x, wgu, wd, ids, tw = _problem(16, 24, 20, 4, 2)
    saved = []
    real = kern.moe_forward
    monkeypatch.setattr(kern, "moe_forward", lambda *a: saved.append(a[-1]) or real(*a))
    with torch.no_grad():
        y0 = llmkern.moe_mlp(x, wgu, wd, ids, tw)
    y1 = llmkern.moe_mlp(x, wgu, wd, ids, tw)
    assert saved == [False, False]  # nothing requires grad: h is not written
    assert torch.equal(y0, y1)
    wgu.requires_grad_()
    g = [torch.autograd.grad(llmkern.moe_mlp(x, wgu, wd, ids, tw).sum(), wgu)[0] for _ in range(2)]
    assert saved[-1] is True and torch.equal(g[0], g[1])  # bitwise: no atomics


@needs_triton
def test_ids_outside_range_contribute_nothing():
    """On CUDA the op does not read the ids on the host; the kernels skip a slot whose id is outside
    [0, E) (its weight gets gradient 0). Called at the launcher level here (CPU ids are validated)."""
    from llmkern.kernels import moe as kern

    x, wgu, wd, ids, tw = _problem(8, 24, 20, 4, 2)
    bad = ids.clone().to(torch.int32)
    bad[1, 0], bad[5, 1] = -1, 4
    order, seg = kern.sort_pairs(bad, 4)
    y, h = kern.moe_forward(x, wgu, wd, bad, tw, order, seg, "silu", True)
    keep = torch.ones_like(tw)
    keep[1, 0] = keep[5, 1] = 0
    want = ref.moe_mlp(x.double(), wgu.double(), wd.double(), ids.clamp(0, 3), (tw * keep).double())
    assert_close(y, want, torch.float32)
    dy = torch.randn_like(y)
    _, _, _, dtw = kern.moe_backward(dy, x, wgu, wd, bad, tw, order, seg, h, "silu", False, False, False)
    assert dtw[1, 0] == 0 and dtw[5, 1] == 0 and dtw[0].abs().min() > 0


@needs_triton
def test_empty_batch(triton_backend):
    """No token: zeros, and zero gradients (an empty micro-batch still backpropagates)."""
    x, wgu, wd, ids, tw = _problem(0, 16, 16, 3, 2)
    leaves = [t.requires_grad_() for t in (x, wgu, wd, tw)]
    y = llmkern.moe_mlp(x, wgu, wd, ids, tw)
    assert y.shape == (0, 16)
    y.sum().backward()
    for t in leaves:
        assert t.grad.shape == t.shape and not t.grad.any()


# ---- dropped slots (id -1) and the exact (erf) GeGLU -------------------------------------------------

def _with_dropped_slots(x, wgu, wd, ids, tw):
    """The problem with three slots dropped (-1): one of token 0, one of token 2 and the whole last token."""
    ids = ids.clone()
    ids[0, 0] = ids[2, 1] = -1
    ids[-1, :] = -1
    return x, wgu, wd, ids, tw


@pytest.mark.parametrize("path, dtype", [("reference", torch.float32), ("triton", torch.float32),
                                         ("triton", torch.float16)])
def test_dropped_slots_add_nothing(monkeypatch, path, dtype):
    """-1 is "no expert" on every path: the CPU reference and the Triton kernels (the interpreter here)
    give the reference with those slots' weights zeroed, all four gradients included, and a dropped
    slot's topk_weight gradient is exactly 0."""
    from llmkern import _backend

    if path == "triton" and DEV is None:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    if path == "triton":
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    else:
        monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    device = DEV if path == "triton" else "cpu"
    assert _backend.OP_DISPATCH["moe_mlp"](torch.device(device), dtype) == path
    x, wgu, wd, ids, tw = _with_dropped_slots(*_problem(11, 24, 20, 4, 2, dtype, device=device))
    y, (dx, _, _, dtw) = _grads_vs_reference(x, wgu, wd, ids, tw)
    dropped = ids < 0
    assert (dtw[dropped] == 0).all() and (dtw[~dropped] != 0).all()
    assert not y[-1].any() and not dx[-1].any()  # the token with no expert: nothing in, nothing out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [0, 4])
def test_reference_with_no_routed_slot_has_zero_gradients(monkeypatch, dtype, T):
    """Every slot dropped (or no token): the reference path's output still depends on the inputs, so backward
    gives zero gradients, as the kernels do (it raised "element 0 of tensors does not require grad")."""
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 16, generator=g, dtype=dtype, requires_grad=True)
    wgu = torch.randn(4, 24, 16, generator=g, dtype=dtype, requires_grad=True)
    wd = torch.randn(4, 16, 12, generator=g, dtype=dtype, requires_grad=True)
    ids = torch.full((T, 2), -1)
    tw = torch.rand(T, 2, generator=g, dtype=dtype, requires_grad=True)
    y = llmkern.moe_mlp(x, wgu, wd, ids, tw)
    assert y.shape == x.shape and not y.any()
    y.sum().backward()
    for t in (x, wgu, wd, tw):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_geglu_exact_reference_is_erf_gelu():
    """The reference's "geglu_exact" (llmkern.moe_mlp's CPU path) is 0.5·g·(1 + erf(g/√2))·u, written out
    here for k = 1, and differs from the tanh "geglu" by far more than the kernel tests' float32 tolerance."""
    x, wgu, wd, ids, tw = _problem(9, 16, 12, 3, 1, torch.float64, device="cpu")
    x = 3 * x  # gates of a few units, where the two gelus differ most
    e = ids[:, 0]
    h = torch.einsum("td,tfd->tf", x, wgu[e])
    g, u = h.chunk(2, -1)
    a = 0.5 * g * (1 + torch.erf(g / 2 ** 0.5)) * u
    want = tw[:, :1] * torch.einsum("tf,tdf->td", a, wd[e])
    got = llmkern.moe_mlp(x, wgu, wd, ids, tw, activation="geglu_exact")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    tanh = llmkern.moe_mlp(x, wgu, wd, ids, tw, activation="geglu")
    assert (tanh - want).abs().max() > 1e-4


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
def test_geglu_exact_kernels(triton_backend, dtype):
    """The exact erf GeGLU in the kernels' epilogues (act forward, act' in the backward's dh, act again in
    the dw_down recompute) against the float64 reference: the output and all four gradients."""
    x, wgu, wd, ids, tw = _problem(13, 40, 36, 5, 2, dtype, empty=(3,))
    _grads_vs_reference((3 * x.float()).to(dtype), wgu, wd, ids, tw, activation="geglu_exact")


# ---- the reference and the CPU default path -------------------------------------------------------

def test_reference_loop_equals_dense_form():
    x, wgu, wd, ids, tw = _with_dropped_slots(*_problem(11, 16, 12, 5, 2, torch.float64, empty=(2,), device="cpu"))
    torch.testing.assert_close(ref.moe_mlp(x, wgu, wd, ids, tw), ref.moe_mlp_dense(x, wgu, wd, ids, tw))


def test_reference_matches_transformers_mixtral_experts():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral import modeling_mixtral as mm

    if not hasattr(mm, "MixtralExperts"):
        pytest.skip("this transformers has no MixtralExperts (gate_up_proj [E, 2F, d])")
    cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=12, num_local_experts=4,
                                     num_experts_per_tok=2)
    experts = mm.MixtralExperts(cfg).double()
    x, wgu, wd, ids, tw = _problem(9, 16, 12, 4, 2, torch.float64, device="cpu")
    with torch.no_grad():
        experts.gate_up_proj.copy_(wgu)
        experts.down_proj.copy_(wd)
        torch.testing.assert_close(llmkern.moe_mlp(x, wgu, wd, ids, tw), experts(x, ids, tw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_default_dispatch_is_reference(monkeypatch, dtype):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    from llmkern import _backend

    assert _backend.OP_DISPATCH["moe_mlp"](torch.device("cpu"), dtype) == "reference"
    x, wgu, wd, ids, tw = _problem(6, 16, 12, 4, 2, dtype, device="cpu")
    x.requires_grad_()
    y = llmkern.moe_mlp(x, wgu, wd, ids, tw)
    y.sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    want = ref.moe_mlp(x.detach().double(), wgu.double(), wd.double(), ids, tw.double())
    assert_close(y, want, dtype)


def test_torch_compile_fullgraph_reference_path(monkeypatch):
    """CPU tensors run the reference; under torch.compile its static-shape (dense) form traces whole."""
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    torch._dynamo.reset()
    _compiled_equals_eager(*_with_dropped_slots(*_problem(7, 16, 12, 4, 2, device="cpu")))


def _compiled_equals_eager(x, wgu, wd, ids, tw):
    """torch.compile(fullgraph=True) of a loss through moe_mlp: the eager value and gradients (and a -1
    slot's weight gradient, 0, when ids has one)."""
    leaves = [t.requires_grad_() for t in (x, wgu, wd, tw)]

    def f(x, wgu, wd, ids, tw):
        return (llmkern.moe_mlp(x, wgu, wd, ids, tw) ** 2).sum()

    got = torch.compile(f, fullgraph=True)(x, wgu, wd, ids, tw)
    g_got = torch.autograd.grad(got, leaves)
    want = f(x, wgu, wd, ids, tw)
    g_want = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    assert not g_got[3][ids < 0].any()


def test_float32_ieee_configs(monkeypatch):
    """float32 without TF32 (tl.dot's "ieee": FMA dots, no tensor cores) autotunes over its own small-BLOCK_K
    tiles, and LLMKERN_MOE_AUTOTUNE=0 takes the first of them: the 16-bit lists' BLOCK_K 64 / 128 spill kilobytes
    of stack there at sm_80 (tests/test_moe_compile.py compiles them). 16-bit inputs (and float32 as TF32) keep
    the tensor-core lists. The launcher's choice, on the GPU path (not the interpreter's fixed blocks)."""
    pytest.importorskip("triton")
    from llmkern.kernels import moe as kern

    ieee = {"gate_up": kern.GATE_UP_IEEE_TILES, "gemm": kern.GEMM_IEEE_TILES,
            "gate_up_bwd": kern.GATE_UP_BWD_IEEE_TILES, "wgrad": kern.WGRAD_IEEE_TILES}
    mma = {"gate_up": kern.GATE_UP_TILES, "gemm": kern.GEMM_TILES, "gate_up_bwd": kern.GATE_UP_BWD_TILES,
           "wgrad": kern.WGRAD_TILES}

    def tiles(configs):
        wgrad = "BLOCK_P" in configs[0].kwargs
        dims = ("BLOCK_P", "BLOCK_R", "BLOCK_M") if wgrad else ("BLOCK_M", "BLOCK_N", "BLOCK_K")
        return [tuple(c.kwargs[d] for d in dims) + (c.num_warps, c.num_stages) for c in configs]

    monkeypatch.setattr(kern, "triton_interpreting", lambda: False)
    for autotune in ("1", "0"):
        monkeypatch.setenv("LLMKERN_MOE_AUTOTUNE", autotune)
        monkeypatch.setattr(kern, "_tuned", {})
        for name in ieee:
            got = {(prec, esize): tiles(kern._kernel(name, esize, prec)[0].autotuner.configs)
                   for prec, esize in (("ieee", 4), ("tf32", 4), ("tf32", 2))}
            if autotune == "1":
                assert got["ieee", 4] == ieee[name], name
                assert got["tf32", 4] == got["tf32", 2] == mma[name], name
            else:  # the first candidate that fits shared memory (float32 as TF32: in its doubled tiles)
                assert got["ieee", 4] == ieee[name][:1], name
                assert got["tf32", 4] == tiles([kern.fixed_config(name, 4, "tf32")]), name
                assert got["tf32", 2] == mma[name][:1], name  # 16-bit inputs: as before
            # the BLOCK_K (wgrad: BLOCK_M) that keeps the FMA dots' operand slices in registers
            assert all(t[2] <= 32 for t in got["ieee", 4]), (name, got["ieee", 4])


# ---- registration ------------------------------------------------------------------------------------

def _op_args(T=8, d=24, F=20, E=4, k=2, save_h=True):
    from llmkern.kernels import moe as kern

    x, wgu, wd, ids, tw = _problem(T, d, F, E, k, empty=(1,))
    ids = ids.to(torch.int32)
    order, seg = kern.sort_pairs(ids, E)
    return (x.requires_grad_(), wgu.requires_grad_(), wd.requires_grad_(), ids, tw.requires_grad_(), order, seg,
            "silu", save_h)


@needs_triton
def test_opcheck(triton_backend):
    args = _op_args()
    torch.library.opcheck(torch.ops.llmkern.moe_mlp_fwd.default, args)
    x, wgu, wd, ids, tw, order, seg, act, _ = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    _, h = torch.ops.llmkern.moe_mlp_fwd(x, wgu, wd, ids, tw, order, seg, act, True)
    dy = torch.randn_like(x)
    for needs in ((True, True, True), (False, True, False)):
        torch.library.opcheck(torch.ops.llmkern.moe_mlp_bwd.default,
                              (dy, x, wgu, wd, ids, tw, order, seg, h, act, *needs))


@needs_triton
def test_torch_compile_fullgraph_custom_op(triton_backend):
    torch._dynamo.reset()
    _compiled_equals_eager(*_with_dropped_slots(*_problem(9, 24, 20, 4, 2)))


@needs_triton
def test_eager_fast_path_matches_the_custom_op(triton_backend, monkeypatch):
    x, wgu, wd, ids, tw = _problem(9, 24, 20, 4, 2)
    leaves = [t.requires_grad_() for t in (x, wgu, wd, tw)]
    fast = []
    real = ops._MoEFunction.apply
    monkeypatch.setattr(ops._MoEFunction, "apply", lambda *a: (fast.append(1), real(*a))[1])
    eager = llmkern.moe_mlp(x, wgu, wd, ids, tw)
    eager_grads = torch.autograd.grad(eager.sum(), leaves)
    assert fast
    monkeypatch.setattr(ops._checks, "eager_fast_path", lambda *t: False)
    n = len(fast)
    op = llmkern.moe_mlp(x, wgu, wd, ids, tw)
    op_grads = torch.autograd.grad(op.sum(), leaves)
    assert len(fast) == n
    for a, b in zip((eager,) + eager_grads, (op,) + op_grads):
        assert torch.equal(a, b)


# ---- validation --------------------------------------------------------------------------------------

def test_bad_inputs():
    x, wgu, wd, ids, tw = _problem(4, 16, 12, 4, 2, device="cpu")
    f = llmkern.moe_mlp
    with pytest.raises(TypeError, match="w_down must be a torch.Tensor"):
        f(x, wgu, None, ids, tw)
    with pytest.raises(ValueError, match="w_gate_up must have shape"):
        f(x, wgu[:, :, :8], wd, ids, tw)
    with pytest.raises(ValueError, match="w_gate_up must have shape"):
        f(x, wgu[:, :23], wd, ids, tw)
    with pytest.raises(ValueError, match=r"w_down must have shape \[4, 16, 12\]"):
        f(x, wgu, wd.transpose(1, 2), ids, tw)
    with pytest.raises(ValueError, match="w_gate_up must have the dtype of x"):
        f(x, wgu.half(), wd, ids, tw)
    with pytest.raises(ValueError, match="x must be float32"):
        f(x.int(), wgu, wd, ids, tw)
    with pytest.raises(ValueError, match="topk_ids must be an integer tensor"):
        f(x, wgu, wd, ids.float(), tw)
    with pytest.raises(ValueError, match="topk_ids must hold k ids per token"):
        f(x, wgu, wd, ids[:3], tw[:3])
    with pytest.raises(ValueError, match="topk_weights must have topk_ids' shape"):
        f(x, wgu, wd, ids, tw[:, :1])
    with pytest.raises(ValueError, match="topk_weights must be a floating-point"):
        f(x, wgu, wd, ids, ids)
    for bad in (-2, 4, 9):  # -1 is a dropped slot; anything else outside [0, E) is an error on CPU
        ids_bad = ids.clone()
        ids_bad[2, 1] = bad
        with pytest.raises(ValueError, match=r"topk_ids must be in \[0, 4\) \(n_experts\) or -1 \(a dropped slot"):
            f(x, wgu, wd, ids_bad, tw)
    with pytest.raises(ValueError, match="activation must be one of"):
        f(x, wgu, wd, ids, tw, activation="relu")
    with pytest.raises(ValueError, match="experts"):
        f(x, wgu[:0], wd[:0], ids, tw)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="w_down is on cpu"):
            f(x.cuda(), wgu.cuda(), wd, ids.cuda(), tw.cuda())


# ---- the router ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_route(renormalize):
    logits = torch.randn(2, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    tw, ids = llmkern.moe_route(logits, 3, renormalize=renormalize)
    assert tw.shape == ids.shape == (2, 5, 3) and tw.dtype == torch.float32 and ids.dtype == torch.int64
    probs = torch.softmax(logits.float(), -1)
    want, want_ids = probs.topk(3, -1)
    if renormalize:
        want = want / want.sum(-1, keepdim=True)
        torch.testing.assert_close(tw.sum(-1), torch.ones(2, 5))
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(tw, want)
    tw.sum().backward() if not renormalize else (tw * torch.arange(3.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0  # the router's gradient
    with pytest.raises(ValueError, match="k must be an int in 1..8"):
        llmkern.moe_route(logits, 9)
    with pytest.raises(ValueError, match="router_logits must be a floating-point"):
        llmkern.moe_route(torch.ones(3, 4, dtype=torch.long), 1)


# ---- GPU: realistic sizes, bf16 -------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("T, d, F, E, k", [(4096, 2048, 1408, 64, 6), (4096, 2048, 4096, 8, 2), (3, 2048, 1408, 64, 6)],
                         ids=["qwen-moe-64x6", "mixtral-like-8x2", "decode"])
def test_gpu_bf16_vs_reference(T, d, F, E, k, monkeypatch):
    monkeypatch.setenv("LLMKERN_MOE_AUTOTUNE", "0")  # one config per kernel: seconds of compiles, not minutes
    x, wgu, wd, ids, tw = _problem(T, d, F, E, k, torch.bfloat16, device="cuda")
    leaves = [t.requires_grad_() for t in (x, wgu, wd, tw)]
    y = llmkern.moe_mlp(x, wgu, wd, ids, tw)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    exact = [t.detach().float().requires_grad_() for t in (x, wgu, wd, tw)]
    want = ref.moe_mlp(exact[0], exact[1], exact[2], ids, exact[3])  # float32 math
    wants = torch.autograd.grad(want, exact, dy.float())
    for name, a, b in zip(("y", "dx", "dw_gate_up", "dw_down", "dtopk_weights"), (y,) + got, (want,) + wants):
        err = (a.float() - b).norm() / b.norm().clamp_min(1e-30)
        assert err < 1e-2, f"{name}: relative error {err:.3g}"


@needs_triton
def test_unchecked_out_of_range_ids_are_skipped(triton_backend, monkeypatch):
    """Where ids are not read on the host (CUDA, compile), a slot whose id lies outside [0, E) adds nothing,
    even an int64 id that a narrowing cast would wrap onto a real expert (2^32 + 1 -> 1)."""
    from llmkern.ops import _checks

    monkeypatch.setattr(_checks, "checking_values", lambda: False)
    x, wgu, wd, ids, tw = _problem(6, 16, 12, 4, 2)
    bad = ids.clone().to(torch.int64)
    bad[0, 1], bad[3, 0], bad[4, 1] = 2 ** 32 + 1, -3, 4
    keep = torch.ones_like(tw)
    keep[0, 1] = keep[3, 0] = keep[4, 1] = 0
    got = llmkern.moe_mlp(x, wgu, wd, bad, tw)
    want = ref.moe_mlp(x.double(), wgu.double(), wd.double(), ids, tw.double() * keep)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
