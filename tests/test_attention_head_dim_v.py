"""A value head dim Dv different from the query/key head dim D (FlashAttention-3's hdim 192/128; DeepSeek-V2/V3
MLA's prefill and training shape: q/k 192 = 128 nope + 64 rope, v 128).

v (and v_cache) is [.., Dv], the output [.., Dv], the LSE unchanged. Checked here: the reference against SDPA
(which takes Dv != D); the Triton kernels (interpreter on CPU, float32 and one float16 case) against the float64
reference for out, LSE and dq/dk/dv with (D, Dv) in {(24, 16), (16, 40), (48, 32)} (each side a power of two or
padded to one) under causal and not, Tq != Tk, GQA, key padding, window + softcap, sinks, ALiBi and dropout;
varlen; the split-K decode (contiguous, paged, with k/v appended); the TMA kernels against the pointer ones;
batch-sliced grids; the output layout; opcheck and torch.compile; Dv == D launching the kernels exactly as
before; bad shapes; the transformers integration; and one bf16 case at DeepSeek's shape under -m gpu.
"""
import pytest
import torch
import torch.nn.functional as F

import llmkern
import llmkern.ops.attention  # noqa: F401  (registers torch.ops.llmkern.attention_*)
from llmkern.reference import attention as ref
from llmkern.testing import (assert_close, attention_grid_slices_equal, attention_tma_vs_pointer, padding_mask,
                             triton_device)

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _inputs(B, H, Hk, Tq, Tk, D, Dv, dtype=torch.float32, device=DEV, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, Tq, D), (B, Hk, Tk, D), (B, Hk, Tk, Dv))
    return tuple(torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad) for s in shapes)


def _slopes(B, H):
    g = torch.Generator().manual_seed(7)
    return (torch.rand(B, H, generator=g) * 0.5).to(DEV)


# ---- the reference -------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,Hk", [(True, 2), (False, 1)])
def test_reference_is_sdpa(causal, Hk):
    """SDPA takes Dv != D: the reference (float64) gives its output and gradients."""
    q, k, v = _inputs(2, 4, Hk, 7, 7, 24, 16, torch.float64, device="cpu")
    got = ref.attention(q, k, v, causal=causal, scale=0.3)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(4 // Hk, 1), v.repeat_interleave(4 // Hk, 1),
                                          is_causal=causal, scale=0.3)
    assert got.shape == (2, 4, 7, 16)
    torch.testing.assert_close(got, want)
    gs = torch.autograd.grad(got.square().sum(), (q, k, v))
    ws = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(gs, ws):
        torch.testing.assert_close(a, b)
    # the default CPU paths: SDPA with our masks, and the reference (with the LSE)
    torch.testing.assert_close(llmkern.attention(q, k, v, causal=causal, scale=0.3), want)
    out, lse = llmkern.attention(q, k, v, causal=causal, scale=0.3, return_lse=True)
    torch.testing.assert_close(out, want)
    assert lse.shape == (2, 4, 7)


# ---- the kernels vs the float64 reference --------------------------------------------------------

def _check(q, k, v, dtype, **kw):
    """out, LSE and dq/dk/dv (through out and LSE) vs the float64 reference (same kwargs, dropout's seed too)."""
    out, lse = llmkern.attention(q, k, v, return_lse=True, **kw)
    assert out.shape == q.shape[:3] + (v.shape[-1],) and out.dtype == q.dtype and lse.dtype == torch.float32
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    rout, rlse = ref.attention(qd, kd, vd, return_lse=True, **kw)
    assert_close(out, rout, dtype, msg="out")
    seen = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), seen)  # rows with no key: -inf in both
    assert_close(lse[seen], rlse[seen], torch.float32, atol=2e-3 if dtype == torch.float16 else 1e-4, msg="lse")
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(out.device)
    dl = torch.randn(lse.shape, generator=g).to(out.device)
    dl_d = dl.double().masked_fill(~seen, 0.0)
    grads = torch.autograd.grad((out.float() * dout).sum() + (lse.masked_fill(~seen, 0) * dl).sum(), (q, k, v))
    rgrads = torch.autograd.grad((rout * dout.double()).sum() + (rlse.masked_fill(~seen, 0) * dl_d).sum(),
                                 (qd, kd, vd))
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        s = max(1.0, b.abs().max().item())
        assert_close(a / s, b / s, dtype, msg=name)
    return out, lse


CASES = {
    # B, H, Hk, Tq, Tk, D, Dv, kwargs
    "gqa-pad-causal": (2, 4, 2, 37, 45, 24, 16, dict(causal=True, key_padding_mask="pad")),
    "window-softcap": (1, 2, 2, 33, 70, 16, 40, dict(window=(5, 3), softcap=5.0)),
    "tq>tk-sinks-mqa": (1, 4, 1, 40, 21, 48, 32, dict(causal=True, sinks="sinks")),
    "full-alibi": (2, 2, 1, 29, 50, 24, 16, dict(alibi_slopes="alibi", scale=-0.3)),
    "dropout": (1, 4, 2, 35, 35, 16, 40, dict(causal=True, dropout_p=0.25, seed=1234)),
    "alibi-softcap-sinks": (1, 4, 2, 26, 40, 48, 32, dict(alibi_slopes="alibi", softcap=3.0, sinks="sinks")),
}


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_vs_reference(triton_backend, name):
    B, H, Hk, Tq, Tk, D, Dv, kw = CASES[name]
    kw = dict(kw)
    if kw.get("key_padding_mask") == "pad":
        kw["key_padding_mask"] = padding_mask(B, Tk, DEV)
    if kw.get("alibi_slopes") == "alibi":
        kw["alibi_slopes"] = _slopes(B, H)
    if kw.get("sinks") == "sinks":
        kw["sinks"] = torch.linspace(-1.0, 2.0, H, device=DEV)
    q, k, v = _inputs(B, H, Hk, Tq, Tk, D, Dv)
    out, lse = _check(q, k, v, torch.float32, **kw)
    if "key_padding_mask" in kw:  # padding_mask hides all of row 1's keys: zeros and LSE -inf
        assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()


@needs_triton
def test_kernels_fp16_unequal_blocks(triton_backend, monkeypatch):
    monkeypatch.setenv("LLMKERN_ATTN_INTERP_BLOCK", "16,32")
    q, k, v = _inputs(1, 4, 2, 40, 48, 48, 32, torch.float16)
    _check(q, k, v, torch.float16, causal=True, window=(20, None))


@needs_triton
def test_dv_equal_d_launches_the_kernels_as_before(triton_backend, monkeypatch):
    """Dv == D: the value constexprs equal the query/key ones (one specialisation per head dim, the same
    compiled code: tests/test_attention_compile.py and the sm_90 PTX were compared before/after), the
    config bucket is D's, and the output keeps q's layout as torch.empty_like gave it."""
    from llmkern.kernels import attention as A

    launched = []
    launch = A._launch
    monkeypatch.setattr(A, "_launch", lambda name, kern, grid, args, kw: (launched.append((name, kw)),
                                                                          launch(name, kern, grid, args, kw)))
    q, k, v = _inputs(1, 2, 1, 20, 24, 24, 24)
    out = llmkern.attention(q, k, v, causal=True)
    out.sum().backward()
    assert [n for n, _ in launched] == ["fwd", "dkdv", "dq"]
    for _, kw in launched:
        assert (kw["HEAD_DIM_V"], kw["BLOCK_DV"]) == (kw["HEAD_DIM"], kw["BLOCK_D"]) == (24, 32)
    for d in (16, 64, 80, 128, 192, 256):
        assert A._d_bucket(d, d) == A._d_bucket(d)
    # same bits as the same call with a D-wide v given as a slice of a wider buffer (the kernels read strides)
    wide = torch.randn(1, 1, 24, 40, device=DEV)
    wide[..., :24] = v.detach()
    torch.testing.assert_close(llmkern.attention(q, k, wide[..., :24], causal=True), out, atol=0, rtol=0)
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, D] memory, as transformers gives
    assert llmkern.attention(qt, k, v).stride() == torch.empty_like(qt).stride()


# ---- varlen and decode ---------------------------------------------------------------------------

@needs_triton
def test_varlen_vs_reference_and_padded_batch(triton_backend):
    lq, lk = [5, 0, 19, 12], [9, 3, 19, 7]  # Tq != Tk per sequence (and Tq > Tk: rows with no key)
    cq, ck = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32, device=DEV) for n in (lq, lk))
    H, Hk, D, Dv = 4, 2, 24, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lq), H, D, generator=g).to(DEV).requires_grad_()
    k = torch.randn(sum(lk), Hk, D, generator=g).to(DEV).requires_grad_()
    v = torch.randn(sum(lk), Hk, Dv, generator=g).to(DEV).requires_grad_()
    kw = dict(causal=True, window=(6, None), sinks=torch.tensor([0.5, -1.0, 0.0, 2.0], device=DEV))
    out, lse = llmkern.attention_varlen(q, k, v, cq, ck, return_lse=True, **kw)
    assert out.shape == (sum(lq), H, Dv)
    dd = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rout, rlse = ref.attention_varlen(*dd, cq, ck, return_lse=True, **kw)
    assert_close(out, rout, torch.float32)
    assert_close(lse, rlse, torch.float32)
    dout = torch.randn_like(out)
    got = torch.autograd.grad((out * dout).sum(), (q, k, v))
    want = torch.autograd.grad((rout * dout.double()).sum(), dd)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, b, torch.float32, msg=name)
    # packed sequences of equal lengths are the padded batch
    B, T = 3, 11
    qb, kb, vb = _inputs(B, H, Hk, T, T, 16, 40, grad=False)
    pack = lambda t: t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[3])  # noqa: E731
    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=DEV)
    dense = llmkern.attention(qb, kb, vb, causal=True)
    packed = llmkern.attention_varlen(pack(qb), pack(kb), pack(vb), cu, cu, causal=True)
    torch.testing.assert_close(packed, pack(dense), atol=1e-5, rtol=1e-5)


def _decode_case(B=3, H=4, Hk=2, Tmax=64, D=16, Dv=40, Tq=1):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, Tq, D, generator=g)
    kc = torch.randn(B, Hk, Tmax, D, generator=g)
    vc = torch.randn(B, Hk, Tmax, Dv, generator=g)
    lens = torch.tensor([Tmax, 1, 37][:B], dtype=torch.int32)
    return q.to(DEV), kc.to(DEV), vc.to(DEV), lens.to(DEV)


def _paged(cache, table, page):
    """A dense cache [B, Hk, Tmax, d] as a page pool (two spare random pages) under `table`."""
    B, Hk, Tmax, d = cache.shape
    pool = torch.randn(table.numel() + 2, Hk, page, d, device=DEV)
    pool[table.reshape(-1).long()] = cache.reshape(B, Hk, Tmax // page, page, d).permute(0, 2, 1, 3, 4).reshape(
        -1, Hk, page, d)
    return pool


@needs_triton
@pytest.mark.parametrize("D,Dv,Tq,kw", [(16, 40, 1, dict(num_splits=3)),
                                        (48, 32, 3, dict(window=(9, None), softcap=5.0, sinks="sinks")),
                                        (24, 16, 2, dict(alibi_slopes="alibi"))])
def test_decode_vs_reference_dense_and_paged(triton_backend, D, Dv, Tq, kw):
    q, kc, vc, lens = _decode_case(D=D, Dv=Dv, Tq=Tq)
    kw = dict(kw)
    if kw.get("sinks") == "sinks":
        kw["sinks"] = torch.tensor([0.5, -1.0, 0.0, 2.0], device=DEV)
    if kw.get("alibi_slopes") == "alibi":
        kw["alibi_slopes"] = _slopes(3, 4)
    out, lse = llmkern.attention_with_kvcache(q, kc, vc, lens, return_lse=True, **kw)
    assert out.shape == (3, 4, Tq, Dv)
    rkw = {n: t for n, t in kw.items() if n != "num_splits"}
    rout, rlse = ref.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens, return_lse=True, **rkw)
    assert_close(out, rout, torch.float32)
    assert_close(lse, rlse, torch.float32)
    page = 16
    table = torch.randperm(3 * 64 // page + 2, generator=torch.Generator().manual_seed(1))[:3 * 64 // page]
    table = table.reshape(3, -1).to(torch.int32).to(DEV)
    paged = llmkern.attention_with_kvcache(q, _paged(kc, table, page), _paged(vc, table, page), lens,
                                           block_table=table, **kw)
    torch.testing.assert_close(paged, out, atol=1e-5, rtol=1e-5)


@needs_triton
def test_decode_appends_k_and_v_dense_and_paged(triton_backend):
    """New tokens k [.., D] and v [.., Dv] are written into their caches, then attended to."""
    q, kc, vc, lens = _decode_case(D=48, Dv=32, Tq=2)
    lens = torch.tensor([20, 0, 37], dtype=torch.int32, device=DEV)
    g = torch.Generator().manual_seed(9)
    k_new = torch.randn(3, 2, 2, 48, generator=g).to(DEV)
    v_new = torch.randn(3, 2, 2, 32, generator=g).to(DEV)
    page = 16
    table = torch.arange(12, dtype=torch.int32, device=DEV).flip(0).reshape(3, 4)
    pk, pv = _paged(kc, table, page), _paged(vc, table, page)
    out = llmkern.attention_with_kvcache(q, kc, vc, lens, k=k_new, v=v_new)
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(kc[b, :, n:n + 2], k_new[b]) and torch.equal(vc[b, :, n:n + 2], v_new[b])
    want = ref.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens + 2)
    assert_close(out, want, torch.float32)
    paged = llmkern.attention_with_kvcache(q, pk, pv, lens, k=k_new, v=v_new, block_table=table)
    torch.testing.assert_close(paged, out, atol=1e-5, rtol=1e-5)


# ---- TMA, grid slices, registration --------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("D,Dv", [(48, 32), (16, 40)])
def test_tma_kernels_equal_pointer_kernels(monkeypatch, D, Dv):
    """The descriptor kernels (sm_90+) take v, o and do in Dv-wide boxes: the pointer kernels' bits."""
    if torch.cuda.is_available():
        pytest.skip("interpreter only (bitwise equality)")
    q, k, v = _inputs(1, 4, 2, 33, 40, D, Dv, torch.float16, device="cpu", grad=False)
    dout = torch.randn(1, 4, 33, Dv).half()
    kw = dict(scale=0.2, causal=True, softcap=6.0)
    attention_tma_vs_pointer(monkeypatch, q, k, v, dout, **kw)


@needs_triton
def test_grid_slices(monkeypatch):
    """Batches past the grid limit run in slices: their Dv-wide outputs concatenate to the whole (decode too)."""
    q, k, v = _inputs(3, 2, 1, 13, 17, 24, 16, grad=False)
    dout = torch.randn(3, 2, 13, 16, device=DEV)
    kw = dict(scale=0.25, causal=True)
    lens = torch.tensor([17, 4, 9], dtype=torch.int32, device=DEV)
    attention_grid_slices_equal(monkeypatch, q, k, v, dout, lens, **kw)


@needs_triton
def test_opcheck(triton_backend):
    """The fakes give the Dv output in the kernels' layout: q as transformers passes it ([B, T, H, D] memory)."""
    q, k, v = _inputs(1, 2, 1, 12, 16, 24, 16)
    q = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    args = (q, k, v, None, None, None, None, -1, -1, 0.25, True, -1, -1, 0.0, 0.0)
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default, args)
    out, lse = torch.ops.llmkern.attention_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    assert out.shape == (1, 2, 12, 16) and out.transpose(1, 2).is_contiguous()
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, torch.randn_like(lse)) + args[3:]
    torch.library.opcheck(torch.ops.llmkern.attention_bwd.default, bwd)
    q, kc, vc, lens = _decode_case(D=24, Dv=16)
    torch.library.opcheck(torch.ops.llmkern.attention_decode.default,
                          (q, kc, vc, lens, None, 0.25, True, -1, -1, 0.0, 2))
    # no query: a [.., Dv] output of zeros
    empty, lse0 = torch.ops.llmkern.attention_fwd(q[:, :, :0], kc, vc, *args[3:])
    assert empty.shape == (3, 4, 0, 16) and lse0.shape == (3, 4, 0)


@needs_triton
def test_torch_compile_fullgraph(triton_backend):
    torch._dynamo.reset()
    q, k, v = _inputs(1, 2, 1, 20, 20, 16, 40)

    def f(a, b, c):
        out, lse = llmkern.attention(a, b, c, causal=True, return_lse=True)
        return out.square().sum() + lse.sum()

    got = torch.compile(f, fullgraph=True)(q, k, v)
    g = torch.autograd.grad(got, (q, k, v))
    want = f(q, k, v)
    w = torch.autograd.grad(want, (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b)


# ---- errors --------------------------------------------------------------------------------------

def test_bad_shapes_name_the_argument():
    q, k = torch.randn(2, 4, 5, 24), torch.randn(2, 2, 5, 24)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        llmkern.attention(q, k, torch.randn(2, 2, 6, 16))
    with pytest.raises(ValueError, match="v's head_dim"):
        llmkern.attention(q, k, torch.randn(2, 2, 5, 300))
    with pytest.raises(ValueError, match="v's head_dim"):
        llmkern.attention(q, k, torch.randn(2, 2, 5, 0))
    with pytest.raises(ValueError, match="k must have q's head_dim"):
        llmkern.attention(q, torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16))
    pack = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])  # noqa: E731
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="v's head_dim"):
        llmkern.attention_varlen(pack(q), pack(k), torch.randn(10, 2, 257), cu, cu)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        llmkern.attention_varlen(pack(q), pack(k), torch.randn(10, 1, 16), cu, cu)
    # the KV cache: v_cache against k_cache, the new v against v_cache
    qd, kc, vc = q[:, :, :1], torch.randn(2, 2, 10, 24), torch.randn(2, 2, 10, 16)
    with pytest.raises(ValueError, match="v_cache must have the shape of k_cache"):
        llmkern.attention_with_kvcache(qd, kc, torch.randn(2, 2, 9, 16), 3)
    with pytest.raises(ValueError, match="v_cache's head_dim"):
        llmkern.attention_with_kvcache(qd, kc, torch.randn(2, 2, 10, 300), 3)
    with pytest.raises(ValueError, match="k_cache must have q's head_dim"):
        llmkern.attention_with_kvcache(qd, vc, vc, 3)
    with pytest.raises(ValueError, match=r"v must have shape \[2, 2, Tq_new, 16\]"):
        llmkern.attention_with_kvcache(qd, kc, vc, 3, k=torch.randn(2, 2, 1, 24), v=torch.randn(2, 2, 1, 24))
    with pytest.raises(ValueError, match=r"k must have shape \[2, 2, Tq_new, 24\]"):
        llmkern.attention_with_kvcache(qd, kc, vc, 3, k=torch.randn(2, 2, 1, 16), v=torch.randn(2, 2, 1, 16))


# ---- transformers --------------------------------------------------------------------------------

def test_transformers_attention_function_takes_unpadded_v(monkeypatch):
    """DeepSeek-V3's attention hands the interface v with its own head dim (128 for q/k's 192): our function
    returns [B, T, H, Dv], for padded batches and packed sequences alike (the kernels on the packed path)."""
    pytest.importorskip("transformers")
    from llmkern.integrations.transformers.attention import llmkern_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    B, H, T, D, Dv = 2, 4, 9, 24, 16
    q, k, v = _inputs(B, H, 2, T, T, D, Dv, device="cpu", grad=False)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True,
                                          scale=0.3)
    out, _ = llmkern_attention_forward(module, q, k, v, None, scaling=0.3)
    assert out.shape == (B, T, H, Dv)
    torch.testing.assert_close(out, want.transpose(1, 2))
    # packed sequences (the mask function's int64 sequence indices): two documents per row
    ids = torch.tensor([[0] * 4 + [1] * 5, [0] * 7 + [1] * 2])
    if DEV == "cpu":
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    packed, _ = llmkern_attention_forward(module, q, k, v, ids, scaling=0.3)
    assert packed.shape == (B, T, H, Dv)
    for b in range(B):
        for s in (ids[b] == 0, ids[b] == 1):
            part = ref.attention(q[b:b + 1, :, s], k[b:b + 1, :, s], v[b:b + 1, :, s],
                                 causal=True, scale=0.3)
            torch.testing.assert_close(packed[b, s], part[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


# ---- GPU -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_bf16_deepseek_shape(causal):
    """DeepSeek MLA's prefill shape in bf16 (the TMA kernels on sm_90+): out, LSE and dq/dk/dv against the
    reference in float32."""
    B, H, T, D, Dv = 2, 16, 1024, 192, 128
    q, k, v = _inputs(B, H, H, T, T, D, Dv, torch.bfloat16, device="cuda")
    out, lse = llmkern.attention(q, k, v, causal=causal, return_lse=True)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    rout, rlse = ref.attention(qf, kf, vf, causal=causal, return_lse=True)
    assert out.shape == (B, H, T, Dv)
    assert_close(out, rout, torch.bfloat16, msg="out")
    assert_close(lse, rlse, torch.float32, atol=2e-2, rtol=1e-3, msg="lse")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    rgrads = torch.autograd.grad(rout, (qf, kf, vf), dout.float())
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        s = max(1.0, b.abs().max().item())
        assert_close(a.float() / s, b / s, torch.bfloat16, msg=name)
