"""Attention sinks (gpt-oss): `sinks=[heads]` logits in every row's softmax denominator, no value.

p_j = exp(s_j) / (sum_k exp(s_k) + exp(sink_h)); the LSE is the log of that whole denominator. Checked
here: the reference against gpt-oss's eager formula (logits concatenated with the sink, softmax, sink
column dropped); the Triton kernels (interpreter on CPU, float32/float16) against the float64
reference for out, LSE, dq/dk/dv and dsinks, with GQA, windows, softcap, padding (fully masked rows),
Tq != Tk, dropout, varlen and the split-K decode (dense and paged); the TMA forward against the
pointer one; opcheck and torch.compile; bad arguments; and a tiny random GptOssForCausalLM with
attn_implementation="llmkern" against "eager" (logits, gradients including the sinks', generation).
"""
import pytest
import torch

import llmkern
import llmkern.ops.attention  # noqa: F401  (registers torch.ops.llmkern.attention_*)
from llmkern.reference import attention as ref
from llmkern.testing import assert_close, padding_mask, select_backend, triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _inputs(B, H, Hk, Tq, Tk, D, dtype=torch.float32, device=DEV, sink_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, Tq, D), (B, Hk, Tk, D), (B, Hk, Tk, D))
    q, k, v = (torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes)
    # sinks around the scores' scale, so that they matter (and one large, one very negative)
    sinks = torch.randn(H, generator=g) * 1.5
    sinks[0] = 4.0
    sinks[-1] = -30.0
    return q, k, v, sinks.to(device=device, dtype=sink_dtype).requires_grad_()


def _pad(B, Tk, device=DEV):
    return padding_mask(B, Tk, device)


def _eager_gpt_oss(q, k, v, sinks, scale, mask=None):
    """transformers' gpt-oss eager_attention_forward: softmax over [scores, sink], sink column dropped."""
    G = q.shape[1] // k.shape[1]
    kk, vv = (t.repeat_interleave(G, dim=1) for t in (k, v))
    s = q @ kk.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    sk = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1).to(s.dtype)
    logits = torch.cat([s, sk], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    return torch.softmax(logits, dim=-1)[..., :-1] @ vv


def _check(q, k, v, sinks, dtype, *, dlse=True, **kw):
    """out, LSE and the gradients of q, k, v and sinks (through out and LSE) vs the float64 reference."""
    out, lse = llmkern.attention(q, k, v, sinks=sinks, return_lse=True, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and torch.isfinite(out).all()
    qd, kd, vd, sd = (t.detach().double().requires_grad_() for t in (q, k, v, sinks))
    rout, rlse = ref.attention(qd, kd, vd, sinks=sd, return_lse=True, **kw)
    assert_close(out, rout, dtype, msg="out")
    assert torch.isfinite(lse).all() and torch.isfinite(rlse).all()
    assert_close(lse, rlse, torch.float32, atol=2e-3 if dtype == torch.float16 else 1e-4, msg="lse")
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(out.device)
    dl = torch.randn(lse.shape, generator=g).to(out.device) if dlse else torch.zeros(lse.shape, device=out.device)
    grads = torch.autograd.grad((out.float() * dout).sum() + (lse * dl).sum(), (q, k, v, sinks))
    rgrads = torch.autograd.grad((rout * dout.double()).sum() + (rlse * dl.double()).sum(), (qd, kd, vd, sd))
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), grads, rgrads):
        assert torch.isfinite(a).all(), name
        scale = max(1.0, b.abs().max().item())
        assert_close(a / scale, b / scale, dtype, msg=name)
    assert grads[3].dtype == sinks.dtype
    return out, lse


# ---- the reference ------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,Hk", [(False, 2), (True, 1)])
def test_reference_is_gpt_oss_eager_attention(causal, Hk):
    q, k, v, sinks = _inputs(2, 4, Hk, 7, 9, 8, torch.float64, device="cpu")
    mask = torch.ones(7, 9, dtype=torch.bool)
    if causal:
        mask = ref.visibility_mask(7, 9, causal=True)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[0, :3] = False
    full = mask[None, None] & kpm[:, None, None, :]
    want = _eager_gpt_oss(q, k, v, sinks, 0.3, full)
    got = ref.attention(q, k, v, causal=causal, scale=0.3, key_padding_mask=kpm, sinks=sinks)
    torch.testing.assert_close(got, want)
    gs = torch.autograd.grad(got.square().sum(), (q, k, v, sinks))
    ws = torch.autograd.grad(want.square().sum(), (q, k, v, sinks))
    for a, b in zip(gs, ws):
        torch.testing.assert_close(a, b)
    # the default CPU path (no SDPA with sinks) is that reference too
    torch.testing.assert_close(llmkern.attention(q, k, v, causal=causal, scale=0.3, key_padding_mask=kpm,
                                                 sinks=sinks), got)


def test_reference_rows_without_keys_get_zero_and_the_sink():
    q, k, v, sinks = _inputs(1, 2, 2, 3, 4, 8, torch.float64, device="cpu")
    kpm = torch.zeros(1, 4, dtype=torch.bool)
    out, lse = ref.attention(q, k, v, key_padding_mask=kpm, sinks=sinks, return_lse=True)
    assert (out == 0).all() and torch.equal(lse[0], sinks.detach()[:, None].expand(2, 3))
    out, lse = ref.attention(q, k[:, :, :0], v[:, :, :0], sinks=sinks, return_lse=True)  # Tk = 0
    assert (out == 0).all() and torch.equal(lse[0], sinks.detach()[:, None].expand(2, 3))


def _no_sink_formula(q, k, v, sinks, scale, visible, g, gl):
    """float64 out, LSE and dL/dsinks for L = sum(g * out) + sum(gl * LSE over the finite LSEs), with
    sinks[h] = -inf meaning no sink: p_j = exp(s_j - LSE), LSE = log(sum_visible exp(s_j) + exp(sink_h));
    a row whose denominator is 0 gets zeros and LSE -inf. dL/dsink_h = sum_rows p_sink (gl - <g, out>)."""
    q, k, v, sinks, g, gl = (t.detach().double() for t in (q, k, v, sinks, g, gl))
    B, H, Tq, _ = q.shape
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    logits = torch.cat([s, sinks.reshape(1, H, 1, 1).expand(B, H, Tq, 1)], dim=-1)
    mx = logits.amax(-1, keepdim=True)
    e = torch.exp(logits - mx.masked_fill(torch.isinf(mx), 0.0))
    den = e.sum(-1, keepdim=True)
    p = e / den.masked_fill(den == 0, 1.0)
    out = p[..., :-1] @ v
    lse = torch.where(den == 0, float("-inf"), mx.masked_fill(torch.isinf(mx), 0.0) + torch.log(den))[..., 0]
    dsinks = (p[..., -1] * (gl.masked_fill(torch.isinf(lse), 0.0) - (g * out).sum(-1))).sum((0, 2))
    return out, lse, dsinks


@pytest.mark.parametrize("backend", ["default", "reference", "triton"])
@pytest.mark.parametrize("Tk", [4, 0])
def test_minus_inf_sink_is_no_sink_with_finite_gradient(monkeypatch, backend, Tk):
    """sinks[h] = -inf (no sink for head h), a row that sees no key, the LSE in the loss: dsinks[h] = 0, not
    NaN (the CPU paths took log(0)'s infinite gradient times exp(-inf)'s 0), and with Tk = 0 no NaN output."""
    device = select_backend(monkeypatch, backend)
    q, k, v, _ = _inputs(1, 2, 2, 4, Tk, 8, device=device)
    sinks = torch.tensor([float("-inf"), 0.5], device=device, requires_grad=True)
    kpm = torch.tensor([[False] + [True] * (Tk - 1)], device=device) if Tk else None  # query 0 sees no key
    visible = torch.ones(4, Tk, dtype=torch.bool).tril(Tk - 4).to(device) & (True if kpm is None else kpm[0])
    gen = torch.Generator().manual_seed(3)
    g, gl = torch.randn(1, 2, 4, 8, generator=gen).to(device), torch.randn(1, 2, 4, generator=gen).to(device)
    out, lse = llmkern.attention(q, k, v, causal=True, scale=0.5, key_padding_mask=kpm, sinks=sinks,
                                 return_lse=True)
    ((g * out).sum() + (gl * lse.masked_fill(torch.isinf(lse), 0.0)).sum()).backward()
    rout, rlse, rds = _no_sink_formula(q, k, v, sinks, 0.5, visible, g, gl)
    assert torch.isneginf(lse[0, 0, 0]) and torch.isfinite(lse[0, 1]).all()
    assert_close(out, rout, torch.float32, msg="out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    assert_close(lse.masked_fill(torch.isinf(lse), 0.0), rlse.masked_fill(torch.isinf(rlse), 0.0), torch.float32,
                 msg="lse")
    assert torch.isfinite(sinks.grad).all() and sinks.grad[0] == 0
    assert_close(sinks.grad, rds, torch.float32, msg="dsinks")
    if Tk:
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---- the kernels vs the float64 reference -------------------------------------------------------

CASES = [
    # B, H, Hk, Tq, Tk, D, kwargs
    (2, 4, 2, 37, 45, 24, dict(causal=True, key_padding_mask="pad")),   # GQA, padding, a row with no key
    (1, 2, 2, 33, 33, 16, dict(window=(5, 3), softcap=5.0)),
    (1, 4, 1, 40, 21, 24, dict(causal=True, scale=0.4)),                # Tq > Tk: first rows see no key
    (2, 2, 1, 29, 50, 16, dict(causal=True, window=(9, None))),         # chunked-prefill alignment
]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=["gqa-pad", "window-softcap", "tq>tk", "window-left"])
def test_kernels_vs_reference(triton_backend, case):
    B, H, Hk, Tq, Tk, D, kw = case
    kw = dict(kw)
    if kw.get("key_padding_mask") == "pad":
        kw["key_padding_mask"] = _pad(B, Tk)
    q, k, v, sinks = _inputs(B, H, Hk, Tq, Tk, D)
    out, lse = _check(q, k, v, sinks, torch.float32, **kw)
    if "key_padding_mask" in kw:  # a row that sees no key: zeros and LSE = its head's sink
        assert (out[1] == 0).all()
        torch.testing.assert_close(lse[1], sinks.detach()[:, None].expand(H, Tq))  # (via log2 units)


@needs_triton
def test_kernels_fp16_and_bf16_sinks(triton_backend):
    q, k, v, sinks = _inputs(1, 2, 1, 40, 40, 24, torch.float16, sink_dtype=torch.bfloat16)
    _check(q, k, v, sinks, torch.float16, causal=True)


@needs_triton
def test_kernels_with_dropout(triton_backend):
    """Dropout drops only the keys' weights; the sink's gradient -sum p_sink * delta holds with it too."""
    q, k, v, sinks = _inputs(2, 4, 2, 21, 30, 16)
    kw = dict(causal=True, dropout_p=0.3, seed=2024)
    _check(q, k, v, sinks, torch.float32, **kw)
    # the mask really acts
    plain = llmkern.attention(q, k, v, causal=True, sinks=sinks)
    assert (llmkern.attention(q, k, v, sinks=sinks, **kw) - plain).abs().max() > 0.1


@needs_triton
def test_tma_forward_equals_pointer_forward(monkeypatch):
    """The descriptor forward (sm_90+) shares _fwd_tile: with sinks it gives the pointer kernel's bits."""
    from llmkern.kernels import attention as A

    if torch.cuda.is_available():
        pytest.skip("interpreter only (bitwise equality)")
    q, k, v, sinks = (t.detach() for t in _inputs(2, 4, 2, 33, 40, 32, torch.float16, device="cpu"))
    launched = []
    launch = A._launch
    monkeypatch.setattr(A, "_launch", lambda name, *a: (launched.append(name), launch(name, *a)))
    res = {}
    for mode in ("0", "force"):
        monkeypatch.setenv("LLMKERN_ATTN_TMA", mode)
        res[mode] = A.attention_forward(q, k, v, scale=0.2, causal=True, sinks=sinks)
    assert launched == ["fwd", "fwd_tma"]
    for a, b in zip(res["0"], res["force"]):
        assert torch.equal(a, b)


@needs_triton
def test_grid_slices_sum_dsinks(monkeypatch):
    """Batches past the grid limit run in slices: each slice's dsinks is summed."""
    from llmkern.kernels import attention as A

    q, k, v, sinks = (t.detach() for t in _inputs(3, 2, 1, 13, 13, 16))
    dout = torch.randn_like(q)
    kw = dict(scale=0.25, causal=True, sinks=sinks)

    def run():
        o, lse = A.attention_forward(q, k, v, **kw)
        return (o, lse) + A.attention_backward(dout, q, k, v, o, lse, **kw)

    whole = run()
    monkeypatch.setattr(A, "MAX_GRID_YZ", 2)  # one batch row per launch
    sliced = run()
    for a, b in zip(whole[:5], sliced[:5]):
        assert torch.equal(a, b)
    torch.testing.assert_close(whole[5], sliced[5])


@needs_triton
def test_huge_finite_sinks_do_not_overflow(triton_backend):
    """A finite sink near float32's maximum overflowed to inf once scaled by log2(e) in the kernels (NaN
    rows, in the forward, the decode combine and dsinks); the kernels clamp it at 1e30, where it already
    takes the whole softmax: out = 0 for that head, a -3e38 sink is no sink, everything finite."""
    q, k, v, _ = _inputs(1, 3, 3, 6, 6, 8)
    sinks = torch.tensor([3e38, -3e38, 0.5], device=DEV, requires_grad=True)
    out, lse = llmkern.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    rout, rlse = ref.attention(*(t.detach().double() for t in (q, k, v)), causal=True,
                               sinks=sinks.detach().double(), return_lse=True)
    assert torch.isfinite(out).all() and (out[:, 0] == 0).all() and (lse[:, 0] >= 1e30).all()
    assert_close(out, rout, torch.float32, msg="out")
    assert_close(lse[:, 1:], rlse[:, 1:], torch.float32, msg="lse")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    ((out * g).sum() + lse[:, 1:].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, sinks))
    assert sinks.grad[0] == 0 and sinks.grad[1] == 0
    kc, vc = k.detach(), v.detach()
    lens = torch.tensor([6], dtype=torch.int32, device=DEV)
    dec = llmkern.attention_with_kvcache(q.detach()[:, :, -1:], kc, vc, lens, sinks=sinks.detach(), num_splits=2)
    assert torch.isfinite(dec).all() and (dec[:, 0] == 0).all()
    assert_close(dec, rout[:, :, -1:], torch.float32, msg="decode")


# ---- varlen and decode --------------------------------------------------------------------------

@needs_triton
def test_varlen_vs_reference_and_padded_batch(triton_backend):
    lens = [5, 0, 19, 12]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    H, Hk, D = 4, 2, 24
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(sum(lens), h, D, generator=g).to(DEV).requires_grad_() for h in (H, Hk, Hk))
    sinks = torch.randn(H, generator=g).to(DEV).requires_grad_()
    kw = dict(causal=True, window=(6, None))
    out, lse = llmkern.attention_varlen(q, k, v, cu, cu, sinks=sinks, return_lse=True, **kw)
    dd = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    rout, rlse = ref.attention_varlen(*dd[:3], cu, cu, sinks=dd[3], return_lse=True, **kw)
    assert_close(out, rout, torch.float32)
    assert_close(lse, rlse, torch.float32)
    dout, dl = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * dout).sum() + (lse * dl).sum(), (q, k, v, sinks))
    want = torch.autograd.grad((rout * dout.double()).sum() + (rlse * dl.double()).sum(), dd)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, want):
        assert_close(a, b, torch.float32, msg=name)
    # packed sequences of equal lengths are the padded batch
    B, T = 3, 11
    qb, kb, vb, sb = (t.detach() for t in _inputs(B, H, Hk, T, T, D))
    pack = lambda t: t.transpose(1, 2).reshape(B * T, t.shape[1], D)  # noqa: E731
    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=DEV)
    dense = llmkern.attention(qb, kb, vb, causal=True, sinks=sb)
    packed = llmkern.attention_varlen(pack(qb), pack(kb), pack(vb), cu, cu, causal=True, sinks=sb)
    torch.testing.assert_close(packed, pack(dense), atol=1e-5, rtol=1e-5)


def _decode_case(B=3, H=4, Hk=2, Tmax=64, D=24, Tq=1):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, Tq, D, generator=g)
    kc = torch.randn(B, Hk, Tmax, D, generator=g)
    vc = torch.randn(B, Hk, Tmax, D, generator=g)
    lens = torch.tensor([Tmax, 1, 37][:B], dtype=torch.int32)
    sinks = torch.randn(H, generator=g) * 2
    return q, kc, vc, lens, sinks


@needs_triton
@pytest.mark.parametrize("Tq,kw", [(1, dict(num_splits=3)), (3, dict(window=(9, None), softcap=5.0))])
def test_decode_vs_reference(triton_backend, Tq, kw):
    q, kc, vc, lens, sinks = (t.to(DEV) for t in _decode_case(Tq=Tq))
    out, lse = llmkern.attention_with_kvcache(q, kc, vc, lens, sinks=sinks, return_lse=True, **kw)
    kw.pop("num_splits", None)
    rout, rlse = ref.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens, sinks=sinks,
                                            return_lse=True, **kw)
    assert_close(out, rout, torch.float32)
    assert_close(lse, rlse, torch.float32)
    # and the attention it stands for: each row's valid keys, bottom-right causal, with the sinks
    for b, n in enumerate(lens.tolist()):
        want = llmkern.attention(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], causal=True, sinks=sinks, **kw)
        torch.testing.assert_close(out[b:b + 1], want, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("backend", ["default", "triton"])
def test_decode_paged_equals_dense(monkeypatch, backend):
    if backend == "triton":
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    q, kc, vc, lens, sinks = (t.to(DEV) for t in _decode_case(Tq=2))
    want = llmkern.attention_with_kvcache(q, kc, vc, lens, sinks=sinks)
    page = 16
    B, Hk, Tmax, D = kc.shape
    n = Tmax // page
    perm = torch.randperm(B * n + 2, generator=torch.Generator().manual_seed(1))
    table = perm[:B * n].reshape(B, n).to(torch.int32).to(DEV)
    pools = []
    for c in (kc, vc):
        pool = torch.randn(B * n + 2, Hk, page, D, device=DEV)
        pool[table.reshape(-1).long()] = c.reshape(B, Hk, n, page, D).permute(0, 2, 1, 3, 4).reshape(-1, Hk, page, D)
        pools.append(pool)
    got = llmkern.attention_with_kvcache(q, pools[0], pools[1], lens, block_table=table, sinks=sinks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    rout = ref.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens, sinks=sinks)
    assert_close(got, rout, torch.float32)


# ---- registration, compile, errors --------------------------------------------------------------

@needs_triton
def test_opcheck_with_sinks(triton_backend):
    q, k, v, sinks = _inputs(1, 2, 1, 20, 24, 16)
    args = (q, k, v, None, None, None, None, -1, -1, 0.25, True, -1, -1, 0.0, 0.0, sinks)
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default, args)
    out, lse = torch.ops.llmkern.attention_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    dq = torch.randn_like(out)
    bwd = (dq, q.detach(), k.detach(), v.detach(), out, lse, torch.randn_like(lse)) + args[3:15] + (sinks.detach(),)
    torch.library.opcheck(torch.ops.llmkern.attention_bwd.default, bwd)
    q, kc, vc, lens, s = (t.to(DEV) for t in _decode_case())
    torch.library.opcheck(torch.ops.llmkern.attention_decode.default,
                          (q, kc, vc, lens, None, 0.25, True, -1, -1, 0.0, 2, s))


@needs_triton
def test_torch_compile_fullgraph_with_sinks(triton_backend):
    torch._dynamo.reset()
    q, k, v, sinks = _inputs(1, 2, 1, 24, 24, 16)

    def f(a, b, c, s):
        out, lse = llmkern.attention(a, b, c, causal=True, window=(8, None), sinks=s, return_lse=True)
        return out.square().sum() + lse.sum()

    got = torch.compile(f, fullgraph=True)(q, k, v, sinks)
    g = torch.autograd.grad(got, (q, k, v, sinks))
    want = f(q, k, v, sinks)
    w = torch.autograd.grad(want, (q, k, v, sinks))
    torch.testing.assert_close(got, want)
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b)


@needs_triton
def test_sinks_without_grad_and_eager_twin(triton_backend, monkeypatch):
    """Sinks that need no gradient get none (the backward skips it); the custom op path gives the eager
    twin's numbers."""
    from llmkern.ops import attention as ops

    q, k, v, sinks = _inputs(1, 2, 2, 20, 20, 16)
    s0 = sinks.detach()
    out = llmkern.attention(q, k, v, causal=True, sinks=s0)
    gq = torch.autograd.grad(out.sum(), q)[0]
    out2 = llmkern.attention(q, k, v, causal=True, sinks=sinks)
    g2 = torch.autograd.grad(out2.sum(), (q, sinks))
    monkeypatch.setattr(ops._checks, "eager_fast_path", lambda *t: False)
    out3 = llmkern.attention(q, k, v, causal=True, sinks=sinks)
    g3 = torch.autograd.grad(out3.sum(), (q, sinks))
    assert torch.equal(out, out2) and torch.equal(out, out3) and torch.equal(gq, g2[0])
    for a, b in zip(g2, g3):
        assert torch.equal(a, b)


_BAD = [
    (lambda H: [0.0] * H, TypeError, "sinks must be a torch.Tensor"),
    (lambda H: torch.zeros(H + 1), ValueError, r"sinks must have shape \[heads\]"),
    (lambda H: torch.zeros(1, H), ValueError, r"sinks must have shape \[heads\]"),
    (lambda H: torch.zeros(H, dtype=torch.int64), ValueError, "sinks must be a floating-point"),
    (lambda H: torch.zeros(H, device="meta"), ValueError, "sinks is on meta"),
    # NaN / +inf sinks gave NaN on the kernels and zeros with LSE +inf on CPU (-inf is allowed: no sink)
    (lambda H: torch.tensor([0.0, float("nan")] + [0.0] * (H - 2)), ValueError, "sinks must be finite or -inf"),
    (lambda H: torch.tensor([float("-inf"), float("inf")] + [0.0] * (H - 2), requires_grad=True), ValueError,
     "sinks must be finite or -inf"),
]


@pytest.mark.parametrize("make,exc,match", _BAD, ids=["list", "shape", "2d", "int", "device", "nan", "+inf"])
def test_bad_sinks(make, exc, match):
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(exc, match=match):
        llmkern.attention(q, k, v, sinks=make(4))
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(exc, match=match):
        llmkern.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                 sinks=make(4))
    with pytest.raises(exc, match=match):
        llmkern.attention_with_kvcache(q[:, :, :1], k, v, 3, sinks=make(4))


# ---- gpt-oss drop-in ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt_oss():
    """A tiny random GptOssForCausalLM: 2 layers (sliding + full attention), GQA, 4 experts, float32,
    sinks drawn large enough to matter."""
    transformers = pytest.importorskip("transformers")
    import llmkern.integrations.transformers as lt

    lt.register()
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=96, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_dropout=0.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.GptOssForCausalLM(cfg).float()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "sinks"):
                m.sinks.normal_(0.0, 1.5)
    return model.to(DEV or "cpu")


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
def test_gpt_oss_same_logits_and_grads_as_eager(monkeypatch, gpt_oss, padded):
    if DEV is not None:
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    model = gpt_oss.train()
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 96, (2, 12), generator=g).to(dev)
    am = torch.ones(2, 12, dtype=torch.long, device=dev)
    if padded:
        am[0, :3] = 0
    res = {}
    for impl in ("eager", "llmkern"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=am).logits
        (logits * am[..., None]).square().mean().backward()
        res[impl] = logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    real = am.bool()
    torch.testing.assert_close(res["llmkern"][0][real], res["eager"][0][real], atol=1e-5, rtol=1e-5)
    ge, gk = res["eager"][1], res["llmkern"][1]
    assert set(gk) == set(ge) and sum("sinks" in n for n in ge) == 2
    for n in ge:
        scale = max(ge[n].abs().max().item(), 1e-6)
        torch.testing.assert_close(gk[n] / scale, ge[n] / scale, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("backend,new", [("default", 8), ("triton", 3)])
def test_gpt_oss_greedy_generate_equals_eager(monkeypatch, gpt_oss, backend, new):
    if backend == "triton":
        if DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    model = gpt_oss.eval()
    dev = next(model.parameters()).device
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(4)).to(dev)
    am = torch.ones(2, 10, dtype=torch.long, device=dev)
    am[0, :4] = 0
    out = {}
    for impl in ("eager", "llmkern"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["eager"], out["llmkern"])
