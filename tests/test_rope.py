"""llmkern.rope: the Triton kernel (the interpreter on CPU, small shapes, float32/float16, 2 heads per
program so GQA runs several head blocks and partial ones) against the float64 reference, forward and
backward; GQA, odd T, D in {8, 64, 80, 128}, partial rotary, cos / sin layouts, interleaved, strided q/k,
stride-0 gradients, cos / sin gradients, double backward; the reference against transformers'
apply_rotary_pos_emb (Llama, GPT-NeoX partial rotary, GPT-J interleaved) and the model zoo's
apply_rope; registration (opcheck, torch.compile); validation; the CPU default (reference) path.
GPU case (bf16, against transformers' bf16 arithmetic) under -m gpu."""
import warnings

import pytest
import torch

import llmkern
from llmkern.ops import rope as ops
from llmkern.reference import rope as ref
from llmkern.testing import assert_close, interpreter_dtypes, triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def triton_backend(monkeypatch):
    """Route CPU tensors through the Triton kernel (under the interpreter); CUDA uses it anyway."""
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")


def _cos_sin(T, R, batch=None, interleaved=False, device=DEV, dtype=torch.float32, base=10000.0):
    """Real RoPE angles: cos / sin [T, R], or [batch, T, R] at random positions per sequence."""
    inv_freq = 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    pos = torch.arange(T) if batch is None else torch.randint(0, 4 * T, (batch, T))
    freqs = pos.float()[..., None] * inv_freq
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def _qk(B, Hq, Hk, T, D, dtype=torch.float32, layout="contiguous"):
    if layout == "transposed":  # the attention layout as a view of a [B, T, H, D] projection
        q = torch.randn(B, T, Hq, D, device=DEV).to(dtype).transpose(1, 2)
        k = torch.randn(B, T, Hk, D, device=DEV).to(dtype).transpose(1, 2)
    elif layout == "fused-qkv":  # q and k as slices of one [B, T, Hq + 2 Hk, D] projection
        qkv = torch.randn(B, T, Hq + 2 * Hk, D, device=DEV).to(dtype)
        q, k = qkv[:, :, :Hq].transpose(1, 2), qkv[:, :, Hq:Hq + Hk].transpose(1, 2)
    else:
        q = torch.randn(B, Hq, T, D, device=DEV).to(dtype)
        k = torch.randn(B, Hk, T, D, device=DEV).to(dtype)
    return q.requires_grad_(), k.requires_grad_()


def _check(q, k, cos, sin, interleaved=False, grads=None):
    """Outputs and dq, dk of llmkern.rope vs the float64 reference, with random upstream gradients."""
    dtype = q.dtype
    qo, ko = llmkern.rope(q, k, cos, sin, interleaved=interleaved)
    assert qo.dtype == ko.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    qd, kd = (t.detach().double().requires_grad_() for t in (q, k))
    rq, rk = ref.rope(qd, kd, cos.double(), sin.double(), interleaved=interleaved)
    assert_close(qo, rq, dtype, msg="q_out", atol=1e-6 if dtype == torch.float32 else 2e-3)
    assert_close(ko, rk, dtype, msg="k_out", atol=1e-6 if dtype == torch.float32 else 2e-3)
    gq, gk = grads or (torch.randn_like(qo), torch.randn_like(ko))
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    rdq, rdk = torch.autograd.grad((rq, rk), (qd, kd), (gq.double(), gk.double()))
    assert dq.dtype == dtype and dq.shape == q.shape and dk.shape == k.shape
    assert_close(dq, rdq, dtype, msg="dq", atol=1e-6 if dtype == torch.float32 else 2e-3)
    assert_close(dk, rdk, dtype, msg="dk", atol=1e-6 if dtype == torch.float32 else 2e-3)
    return qo, ko


# ---- the Triton kernel vs the float64 reference ------------------------------------------------------

CASES = [
    # B, Hq, Hk, T, D, R, cos layout, interleaved, q/k layout
    (2, 4, 2, 7, 64, 64, "T", False, "transposed"),      # GQA, odd T, the [B, T, H, D] view
    (1, 3, 3, 5, 8, 8, "BT", True, "contiguous"),        # tiny head_dim, interleaved
    (2, 3, 1, 3, 80, 80, "B1T", False, "contiguous"),    # D = 80: half rows of 40 in 64-wide blocks; MQA
    (1, 2, 1, 9, 128, 128, "1T", True, "fused-qkv"),     # slices of one projection
    (2, 3, 1, 5, 80, 20, "T", False, "transposed"),      # partial rotary (GPT-NeoX rotary_pct = 0.25)
    (1, 2, 2, 3, 64, 16, "BT", True, "contiguous"),      # partial rotary, interleaved (GPT-J)
    (1, 1, 2, 4, 10, 6, "T", False, "contiguous"),       # Hk > Hq, pass-through of 4 channels
]


def _case_cos_sin(B, T, R, layout, interleaved, dtype=torch.float32):
    cos, sin = _cos_sin(T, R, None if layout == "T" else (1 if layout == "1T" else B), interleaved, dtype=dtype)
    if layout == "B1T":
        cos, sin = cos[:, None], sin[:, None]
    return cos, sin


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("case", CASES, ids=[f"{c[:6]}-{c[6]}-{'inter' if c[7] else 'half'}-{c[8]}" for c in CASES])
def test_kernel_vs_reference(triton_backend, dtype, case):
    B, Hq, Hk, T, D, R, cs_layout, interleaved, layout = case
    q, k = _qk(B, Hq, Hk, T, D, dtype, layout)
    cos, sin = _case_cos_sin(B, T, R, cs_layout, interleaved, dtype)
    qo, _ = _check(q, k, cos, sin, interleaved)
    if layout == "transposed":  # the output keeps the projection's [B, T, H, D] memory order
        assert qo.stride() == q.stride()
    if R < D:
        assert torch.equal(qo[..., R:], q[..., R:])


@needs_triton
@pytest.mark.parametrize("interleaved", [False, True])
def test_arbitrary_cos_sin_exact_map_and_transpose(triton_backend, interleaved):
    """cos / sin without the duplicated structure, in float16 with float32 q: the kernel applies
    x * cos + rot(x) * sin channel by channel and its exact transpose."""
    q, k = _qk(2, 3, 2, 5, 12)
    cos, sin = (torch.randn(2, 5, 12, device=DEV).half() for _ in range(2))
    _check(q, k, cos, sin, interleaved)


@needs_triton
def test_stride0_upstream_gradients(triton_backend):
    """(q_out.sum() + k_out.sum()).backward(): expanded, stride-0 gradients read in place."""
    q, k = _qk(2, 4, 2, 5, 16, layout="transposed")
    cos, sin = _cos_sin(5, 16)
    qo, ko = llmkern.rope(q, k, cos, sin)
    (qo.sum() + 2 * ko.sum()).backward()
    qd, kd = (t.detach().double().requires_grad_() for t in (q, k))
    rq, rk = ref.rope(qd, kd, cos.double(), sin.double())
    (rq.sum() + 2 * rk.sum()).backward()
    assert_close(q.grad, qd.grad, torch.float32, atol=1e-6)
    assert_close(k.grad, kd.grad, torch.float32, atol=1e-6)
    gq = torch.ones(1, 1, 1, 16, device=DEV).expand(qo.shape)   # stride 0 everywhere, direct
    gk = torch.ones(1, 1, 1, 16, device=DEV).expand(ko.shape)
    _check(q, k, cos, sin, grads=(gq, gk))


@needs_triton
@pytest.mark.parametrize("path", ["eager", "custom-op"])
@pytest.mark.parametrize("cs_layout", ["T", "BT"])
def test_cos_sin_gradients(triton_backend, monkeypatch, cs_layout, path):
    """cos / sin that require grad get their gradient (reduced over heads, and batch for [T, R])."""
    if path == "custom-op":
        monkeypatch.setattr(ops._checks, "eager_fast_path", lambda *t: False)
    q, k = _qk(2, 3, 1, 4, 16)
    cos, sin = _cos_sin(4, 8, None if cs_layout == "T" else 2)
    cos, sin = cos.requires_grad_(), sin.requires_grad_()
    qo, ko = llmkern.rope(q, k, cos, sin)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    got = torch.autograd.grad((qo, ko), (q, k, cos, sin), (gq, gk))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, cos, sin)]
    rq, rk = ref.rope(*leaves)
    want = torch.autograd.grad((rq, rk), leaves, (gq.double(), gk.double()))
    for name, g, w in zip(("dq", "dk", "dcos", "dsin"), got, want):
        assert g.shape == w.shape
        assert_close(g, w, torch.float32, msg=name, atol=1e-5)


@needs_triton
def test_double_backward(triton_backend):
    """The backward is the transposed rotation through the same op, itself differentiable."""
    q, k = _qk(1, 2, 1, 3, 8)
    cos, sin = _cos_sin(3, 8)
    gq = torch.randn(1, 2, 3, 8, device=DEV, requires_grad=True)
    gk = torch.randn(1, 1, 3, 8, device=DEV, requires_grad=True)
    qo, ko = llmkern.rope(q, k, cos, sin)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk), create_graph=True)
    wq, wk = torch.randn_like(dq), torch.randn_like(dk)
    (dq * wq).sum().add((dk * wk).sum()).backward()
    rq, rk = ref.rope(wq.double(), wk.double(), cos.double(), sin.double())  # d/dg <J^T g, w> = J w
    assert_close(gq.grad, rq, torch.float32, atol=1e-6)
    assert_close(gk.grad, rk, torch.float32, atol=1e-6)


@needs_triton
def test_empty_sequence(triton_backend):
    q, k = _qk(2, 2, 1, 0, 8)
    cos, sin = _cos_sin(0, 8)
    qo, ko = llmkern.rope(q, k, cos, sin)
    assert qo.shape == q.shape and ko.shape == k.shape


@pytest.mark.parametrize("Hq, Hk, D, R", [(32, 8, 128, 128), (32, 32, 128, 32), (32, 2, 128, 64), (32, 32, 80, 32),
                                         (16, 16, 256, 256), (128, 1, 64, 64)])
@pytest.mark.parametrize("tokens", [8, 8192], ids=["decode", "prefill"])
def test_gpu_config_warps_cover_the_whole_row_tile(monkeypatch, Hq, Hk, D, R, tokens):
    """The GPU launch's warps count everything a program holds, the pass-through block of partial rotary too:
    at most 32 elements per thread (up to 8 warps). R = 32 of D = 128 (GPT-NeoX) at 32 heads moves 160 channels
    per head, where counting the rotary half alone gave 1 warp (160 elements, 134 registers per thread at sm_90);
    full rotary keeps its choice (4 warps for 32 heads of 128 at prefill, 1 for decoding's 4-head blocks)."""
    pytest.importorskip("triton")
    from llmkern.kernels import rope as kern
    from llmkern.kernels._common import next_power_of_2

    monkeypatch.setattr(kern, "_interpreting", lambda: False)
    block_pass = next_power_of_2(D - R) if R < D else 0  # rope_apply's BLOCK_PASS
    bq, bk, bh, warps = kern.config(Hq, Hk, R // 2, tokens, block_pass)
    per_thread = max(bq, bk) * (2 * bh + block_pass) / (32 * warps)
    assert per_thread <= 32 or warps == 8, (bq, bk, bh, warps)
    assert warps == 1 or per_thread > 8, (bq, bk, bh, warps)  # and no more warps than that needs
    want = {(32, 8, 128, 128, 8): (4, 4, 64, 1), (32, 8, 128, 128, 8192): (32, 8, 64, 4),  # as before
            (32, 32, 128, 32, 8): (16, 16, 16, 4), (32, 32, 128, 32, 8192): (32, 32, 16, 8)}  # were 1 warp
    assert want.get((Hq, Hk, D, R, tokens), (bq, bk, bh, warps)) == (bq, bk, bh, warps)


# ---- against transformers and the model zoo ----------------------------------------------------------

def _llama_cos_sin(B, T, D, dtype=torch.float32):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4 * D, num_attention_heads=4, num_key_value_heads=2, head_dim=D,
                      max_position_embeddings=256)
    emb = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(T)[None].expand(B, T) + torch.arange(B)[:, None] * 3  # per-sequence offsets
    return emb(torch.zeros(1, dtype=dtype), pos)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_matches_transformers_llama_float32(monkeypatch, path):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    if path == "triton":
        if DEV is None:
            pytest.skip("needs the Triton interpreter or CUDA")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    else:
        monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    dev = DEV or "cpu"
    cos, sin = (t.to(dev) for t in _llama_cos_sin(2, 7, 32))
    assert cos.shape == (2, 7, 32)
    q, k = (torch.randn(2, h, 7, 32, device=dev) for h in (4, 2))
    got = llmkern.rope(q, k, cos, sin)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_reference_matches_transformers_gpt_neox_partial_rotary():
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    cos, sin = _cos_sin(6, 16, 2, device="cpu")
    q, k = torch.randn(2, 4, 6, 64), torch.randn(2, 4, 6, 64)
    for g, w in zip(ref.rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_reference_matches_transformers_gptj_interleaved():
    """GPT-J: [B, T, H, D] tensors, sin / cos of the R/2 angles repeated twice in a row inside its
    apply_rotary_pos_emb: our interleaved layout is cos.repeat_interleave(2, -1); partial rotary too."""
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

    T, R, D = 6, 16, 24
    cos, sin = _cos_sin(T, R, 2, interleaved=True, device="cpu")
    x = torch.randn(2, T, 3, D)
    want_rot = apply_rotary_pos_emb(x[..., :R], sin[..., 0::2], cos[..., 0::2])
    want = torch.cat((want_rot, x[..., R:]), -1)
    got, _ = ref.rope(x.transpose(1, 2), x.transpose(1, 2), cos, sin, interleaved=True)
    torch.testing.assert_close(got.transpose(1, 2), want, atol=1e-6, rtol=1e-6)


def test_reference_matches_model_zoo_apply_rope():
    from llmkern.models.llama import Llama, apply_rope
    from llmkern.models.configs import get_config

    model = Llama(get_config("llama-tiny"))
    D = model.config.head_dim
    pos = torch.arange(5)
    cos, sin = model.rope(pos, torch.float32)                     # [T, D]
    cos_b, sin_b = model.rope(torch.stack((pos, pos + 2)), torch.float32)  # [B, 1, T, D]
    q = torch.randn(2, 3, 5, D)
    torch.testing.assert_close(llmkern.rope(q, q, cos, sin)[0], apply_rope(q, cos, sin), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(llmkern.rope(q, q, cos_b, sin_b)[0], apply_rope(q, cos_b, sin_b),
                               atol=1e-6, rtol=1e-6)


# ---- the CPU default path (reference) ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_default_dispatch_is_reference(monkeypatch, dtype):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    from llmkern import _backend

    assert _backend.OP_DISPATCH["rope"](torch.device("cpu"), dtype) == "reference"
    q = torch.randn(2, 4, 5, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 5, 16, dtype=dtype, requires_grad=True)
    cos, sin = _cos_sin(5, 16, device="cpu", dtype=dtype)
    qo, ko = llmkern.rope(q, k, cos, sin)
    assert qo.dtype == dtype
    (qo.sum() + ko.sum()).backward()
    exact = ref.rope(q.detach().double(), k.detach().double(), cos.double(), sin.double())
    assert_close(qo, exact[0], dtype, atol=1e-6 if dtype != torch.bfloat16 else 1e-2)
    assert q.grad.shape == q.shape and k.grad.dtype == dtype


def _term_scale(x, cos, sin):
    """|x * cos| + |rot(x) * sin| (float64): the size of the terms the rounding errors scale with."""
    x, c, s = x.double(), ref.cos_sin_4d(cos).double(), ref.cos_sin_4d(sin).double()
    return (x * c).abs() + (ref.rotate_half(x) * s).abs()


def test_bf16_rounding_vs_transformers():
    """In bfloat16 this op rounds once, transformers three times (both terms, then the sum): they
    differ by at most a few bf16 ulps of the terms, and ours is the closer to the exact value."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = (t.bfloat16() for t in _llama_cos_sin(1, 64, 64))
    q = torch.randn(1, 4, 64, 64).bfloat16()
    ours, _ = llmkern.rope(q, q, cos, sin)
    hf, _ = apply_rotary_pos_emb(q, q, cos, sin)
    exact, _ = ref.rope(q.double(), q.double(), cos.double(), sin.double())
    assert ((ours.double() - hf.double()).abs() <= 2.0 ** -6 * _term_scale(q, cos, sin)).all()
    assert (ours.double() - exact).abs().mean() < (hf.double() - exact).abs().mean()


# ---- validation ---------------------------------------------------------------------------------------

def _bad_cases():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = _cos_sin(5, 8, device="cpu")
    return [
        (dict(q=q[0]), ValueError, r"q must have shape \[B, Hq, T, D\]"),
        (dict(k=torch.randn(2, 2, 6, 8)), ValueError, "k must have shape"),
        (dict(k=torch.randn(3, 2, 5, 8)), ValueError, "k must have shape"),
        (dict(k=k.half()), ValueError, "k must have q's dtype"),
        (dict(q=q.int(), k=k.int()), ValueError, "q must be float32"),
        (dict(cos=cos[:4], sin=sin[:4]), ValueError, "T=5"),
        (dict(cos=cos[None].expand(3, 5, 8), sin=sin[None].expand(3, 5, 8)), ValueError, "B=2 or 1"),
        (dict(cos=cos[:, :6]), ValueError, "cos and sin must have the same shape"),
        (dict(cos=torch.randn(5, 10), sin=torch.randn(5, 10)), ValueError, "rotary dim R"),
        (dict(cos=torch.randn(5, 6)[:, :5], sin=torch.randn(5, 5)), ValueError, r"rotary dim R \(5\) must be even"),
        (dict(q=torch.randn(2, 4, 5, 7), k=torch.randn(2, 2, 5, 7), cos=torch.randn(5, 7), sin=torch.randn(5, 7)),
         ValueError, r"head_dim \(7\) must be even"),
        (dict(cos=cos.long(), sin=sin.long()), ValueError, "cos must be a floating-point"),
        (dict(cos=cos[None, None].expand(2, 3, 5, 8), sin=sin[None, None].expand(2, 3, 5, 8)), ValueError,
         r"\[B, 1, T, R\]"),
        (dict(k=k.tolist()), TypeError, "k must be a torch.Tensor"),
        (dict(interleaved=1), TypeError, "interleaved must be a bool"),
    ]


@pytest.mark.parametrize("bad,exc,match", _bad_cases(), ids=[f"{i}-{c[2][:20]}" for i, c in enumerate(_bad_cases())])
def test_bad_inputs(bad, exc, match):
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = _cos_sin(5, 8, device="cpu")
    args = dict(q=q, k=k, cos=cos, sin=sin, interleaved=False)
    args.update(bad)
    with pytest.raises(exc, match=match):
        llmkern.rope(args["q"], args["k"], args["cos"], args["sin"], interleaved=args["interleaved"])


def test_bad_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    cos, sin = _cos_sin(5, 8, device="cpu")
    with pytest.raises(ValueError, match="cos is on cpu"):
        llmkern.rope(torch.randn(1, 2, 5, 8, device="cuda"), torch.randn(1, 2, 5, 8, device="cuda"), cos, sin)


# ---- registration ----------------------------------------------------------------------------------------

@needs_triton
def test_opcheck(triton_backend):
    q, k = _qk(2, 3, 1, 5, 16, layout="transposed")
    cos, sin = _cos_sin(5, 16)
    torch.library.opcheck(torch.ops.llmkern.rope.default, (q, k, cos, sin, False, False))
    cos2, sin2 = _cos_sin(5, 8, 2, interleaved=True)
    torch.library.opcheck(torch.ops.llmkern.rope.default,
                          (q, k, cos2.requires_grad_(), sin2.requires_grad_(), True, True))


@needs_triton
def test_torch_compile_fullgraph(triton_backend):
    torch._dynamo.reset()
    q, k = _qk(2, 4, 2, 5, 16, layout="transposed")
    cos, sin = _cos_sin(5, 16, 2)

    def f(q, k, cos, sin):
        qo, ko = llmkern.rope(q, k, cos, sin)
        return (qo * qo).sum() + ko.sum()

    got = torch.compile(f, fullgraph=True)(q, k, cos, sin)
    got.backward()
    gq, gk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    want = f(q, k, cos, sin)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gq, q.grad)
    torch.testing.assert_close(gk, k.grad)


@needs_triton
def test_eager_fast_path_matches_the_custom_op(triton_backend, monkeypatch):
    """Eager calls run _RopeFunction (no torch.library dispatch); the custom op gives the same bits."""
    q, k = _qk(1, 2, 1, 3, 8)
    cos, sin = _cos_sin(3, 8)
    fast = []
    real = ops._RopeFunction.apply
    monkeypatch.setattr(ops._RopeFunction, "apply", lambda *a: (fast.append(1), real(*a))[1])
    eager = llmkern.rope(q, k, cos, sin)
    eager_grads = torch.autograd.grad(eager[0].sum() + eager[1].sum(), (q, k))
    assert fast
    monkeypatch.setattr(ops._checks, "eager_fast_path", lambda *t: False)
    n = len(fast)
    op = llmkern.rope(q, k, cos, sin)
    op_grads = torch.autograd.grad(op[0].sum() + op[1].sum(), (q, k))
    assert len(fast) == n
    for a, b in zip(eager + eager_grads, op + op_grads):
        assert torch.equal(a, b)


@needs_triton
def test_float64_uses_reference_under_triton_backend(triton_backend):
    q, k = _qk(1, 2, 1, 3, 8, dtype=torch.float64)
    cos, sin = _cos_sin(3, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        qo, _ = llmkern.rope(q, k, cos, sin)
    assert qo.dtype == torch.float64
    torch.testing.assert_close(qo, ref.rope(q, k, cos, sin)[0])


# ---- GPU: Llama 3 8B head layout, bf16 ----------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_bf16_vs_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, T, D = 2, 1024, 128
    cos, sin = (t.cuda() for t in _llama_cos_sin(B, T, D, torch.bfloat16))
    q = torch.randn(B, T, 32, D, device="cuda").bfloat16().transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, 8, D, device="cuda").bfloat16().transpose(1, 2).requires_grad_()
    qo, ko = llmkern.rope(q, k, cos, sin)
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    exact = ref.rope(q.detach().double(), k.detach().double(), cos.double(), sin.double())
    for x, ours, hf, ex in zip((q, k), (qo, ko), (hq, hk), exact):
        assert ((ours.double() - hf.double()).abs() <= 2.0 ** -6 * _term_scale(x.detach(), cos, sin)).all()
        assert (ours.double() - ex).abs().mean() < (hf.double() - ex).abs().mean()
    g = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), g)
    rdq, rdk = torch.autograd.grad(ref.rope(q.float(), k.float(), cos.float(), sin.float()), (q, k),
                                   tuple(t.float() for t in g))
    torch.testing.assert_close(dq, rdq, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dk, rdk, atol=2e-2, rtol=2e-2)


def test_partial_rotary_output_keeps_the_input_layout(monkeypatch):
    """The outputs keep q's / k's layout (README): the [B, H, T, D] view of a [B, T, H, D] projection comes back
    in that layout, so .transpose(1, 2).view(B, T, H * D) needs no copy. With rotary_dim < head_dim the CPU path
    returned a contiguous tensor (a cat)."""
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    B, T, H, D, R = 2, 5, 4, 16, 8
    q = torch.randn(B, T, H, D).transpose(1, 2)
    k = torch.randn(B, T, H, D).transpose(1, 2)
    cos, sin = torch.randn(T, R), torch.randn(T, R)  # (HF's layout: rotary_dim R < D)
    qo, ko = llmkern.rope(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()
    qo.transpose(1, 2).view(B, T, H * D)  # (no copy needed)
    torch.testing.assert_close(qo[..., R:], q[..., R:])
