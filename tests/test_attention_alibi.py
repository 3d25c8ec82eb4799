"""ALiBi (`alibi_slopes=`) in the three attention functions, with FlashAttention-2's semantics.

The score of query i and key j gets -slope * |i + Tk - Tq - j| (bottom-right aligned; per sequence for
varlen; Tk = the row's cache length for the KV cache), added after scale and softcap and before the masks;
slopes float32 [heads] or [batch, heads], not differentiated. Checked here: the reference against an
independent formula (the bias built entry by entry, torch.softmax in float64); the Triton kernels
(interpreter on CPU, float32 and one float16 case) against the float64 reference for out, LSE and
dq/dk/dv, with causal and not, Tq != Tk, GQA, both slope shapes, softcap, windows, key padding, varlen and
the split-K decode (dense and paged); the TMA kernels against the pointer ones; the batch-sliced launch;
alibi_slopes=None is the call without it, zero slopes are no ALiBi; opcheck and torch.compile; bad
arguments; and one bf16 case at a realistic size under -m gpu.
"""
import math

import pytest
import torch

import llmkern
import llmkern.ops.attention  # noqa: F401  (registers torch.ops.llmkern.attention_*)
from llmkern.reference import attention as ref
from llmkern.testing import (assert_close, attention_grid_slices_equal, attention_tma_vs_pointer, padding_mask,
                             select_backend, triton_device)

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def alibi_slopes(H):
    """The ALiBi paper's geometric slopes 2^(-8 (h + 1) / H) (H a power of two)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])


def _slopes(B, H, shape, device=DEV, big=False):
    """[H] or [B, H] float32 slopes: the paper's, or (big) a wider random spread up to 2 (a key 20
    positions away then weighs e^-40: the bias dominates the scores), plus one zero slope."""
    g = torch.Generator().manual_seed(11)
    jitter = 1 + torch.rand(B, H, generator=g)  # (rows of [B, H] differ)
    base = torch.rand(B, H, generator=g) * 2.0 if big else alibi_slopes(H).repeat(B, 1) * jitter
    base[0, -1] = 0.0
    return (base[0] if shape == "h" else base).to(device=device, dtype=torch.float32)


def _inputs(B, H, Hk, Tq, Tk, D, dtype=torch.float32, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, Tq, D), (B, Hk, Tk, D), (B, Hk, Tk, D))
    return tuple(torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes)


def _pad(B, Tk, device=DEV):
    return padding_mask(B, Tk, device)


# ---- the reference against an explicit formula ---------------------------------------------------

def _explicit(q, k, v, slopes, *, scale, causal=False, softcap=None, kpm=None, q_pos=None):
    """Attention with the ALiBi bias built entry by entry: bias[b, h, i, j] = -slope * |pos_i - j| with
    pos_i = i + Tk - Tq (or q_pos[b][i]), after softcap, then the masks, then torch.softmax. float64."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    kk, vv = (t.repeat_interleave(H // k.shape[1], dim=1) for t in (k, v))
    s = q @ kk.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    bias = torch.zeros(B, H, Tq, Tk, dtype=torch.float64)
    allowed = torch.ones(B, H, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            slope = float(slopes[h] if slopes.dim() == 1 else slopes[b, h])
            for i in range(Tq):
                pos = i + Tk - Tq if q_pos is None else int(q_pos[b][i])
                for j in range(Tk):
                    bias[b, h, i, j] = -slope * abs(pos - j)
                    allowed[b, h, i, j] = (not causal or j <= pos) and (kpm is None or bool(kpm[b, j]))
    s = (s + bias).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no key: zeros, as the op gives
    return p @ vv


@pytest.mark.parametrize("Tq,Tk,causal,softcap,shape,Hk", [(6, 9, True, None, "h", 2), (9, 5, False, 2.0, "bh", 1),
                                                            (7, 7, True, 3.0, "bh", 4)])
def test_reference_is_the_explicit_formula(Tq, Tk, causal, softcap, shape, Hk):
    B, H, D = 2, 4, 8
    q, k, v = _inputs(B, H, Hk, Tq, Tk, D, torch.float64, device="cpu")
    slopes = _slopes(B, H, shape, device="cpu", big=True)
    kpm = torch.ones(B, Tk, dtype=torch.bool)
    kpm[0, :2] = False
    want = _explicit(q, k, v, slopes, scale=0.4, causal=causal, softcap=softcap, kpm=kpm)
    got = ref.attention(q, k, v, causal=causal, scale=0.4, softcap=softcap, key_padding_mask=kpm, alibi_slopes=slopes)
    torch.testing.assert_close(got, want)
    gs = torch.autograd.grad(got.square().sum(), (q, k, v))
    ws = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(gs, ws):
        torch.testing.assert_close(a, b)
    # the default CPU path (SDPA cannot take the bias: the reference) and its [Tq, Tk] alignment
    torch.testing.assert_close(llmkern.attention(q, k, v, causal=causal, scale=0.4, softcap=softcap,
                                                 key_padding_mask=kpm, alibi_slopes=slopes), want)


def test_reference_varlen_and_decode_are_the_explicit_formula():
    H, Hk, D = 2, 1, 8
    lq, lk = [3, 5], [6, 4]
    g = torch.Generator().manual_seed(2)
    q = torch.randn(sum(lq), H, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(sum(lk), Hk, D, generator=g, dtype=torch.float64) for _ in range(2))
    cq, ck = (torch.tensor([0, n[0], n[0] + n[1]], dtype=torch.int32) for n in (lq, lk))
    slopes = _slopes(2, H, "bh", device="cpu", big=True)
    got = ref.attention_varlen(q, k, v, cq, ck, causal=True, scale=0.5, alibi_slopes=slopes)
    for b in range(2):  # each sequence aligned on its own lengths, with its own row of slopes
        qb, kb, vb = (t[c[b]:c[b + 1]].transpose(0, 1)[None] for t, c in ((q, cq), (k, ck), (v, ck)))
        want = _explicit(qb, kb, vb, slopes[b], scale=0.5, causal=True)[0].transpose(0, 1)
        torch.testing.assert_close(got[cq[b]:cq[b + 1]], want)
    # decode: query t of row b sits at cache position len_b - Tq + t; keys past len_b are not there
    B, Tq, Tmax = 2, 2, 8
    q, kc, vc = _inputs(B, H, Hk, Tq, Tmax, D, torch.float64, device="cpu")
    lens = torch.tensor([8, 5], dtype=torch.int32)
    got = ref.attention_with_kvcache(q, kc, vc, lens, scale=0.5, alibi_slopes=slopes)
    for b, n in enumerate(lens.tolist()):
        want = _explicit(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], slopes[b], scale=0.5, causal=True)
        torch.testing.assert_close(got[b:b + 1], want)


@pytest.mark.parametrize("shape", ["h", "bh"])
def test_reference_bias_is_the_explicit_formula_also_with_no_query(shape):
    """alibi_bias entry by entry in float64, for [Tq] and [B, Tq] positions, also Tq = 0 (reshape(-1, ...)
    of an empty tensor raised)."""
    B, H, tk = 2, 4, 5
    slopes = _slopes(B, H, shape, device="cpu")
    for tq in (3, 0):
        for pos in (torch.arange(tq) + tk - tq, torch.stack([torch.arange(tq) + 2, torch.arange(tq) + tk - tq])):
            got = ref.alibi_bias(slopes, pos, tk, torch.float64)
            sl = slopes.double().reshape(-1, H)
            pb = pos if pos.dim() == 2 else pos[None]
            want = torch.tensor([[[[-sl[b % sl.shape[0], h].item() * abs(pb[b % pb.shape[0], i].item() - j)
                                    for j in range(tk)] for i in range(tq)] for h in range(H)]
                                 for b in range(max(sl.shape[0], pb.shape[0]))], dtype=torch.float64)
            assert got.shape == (max(sl.shape[0], pb.shape[0]), H, tq, tk)
            torch.testing.assert_close(got, want.reshape(got.shape))


@pytest.mark.parametrize("backend", ["default", "reference", "triton"])
@pytest.mark.parametrize("shape", ["h", "bh"])
def test_decode_with_no_query_and_alibi(monkeypatch, backend, shape):
    """attention_with_kvcache with Tq = 0 (no token this step) and alibi_slopes: empty out and LSE on every
    backend (the CPU paths crashed in alibi_bias), as without ALiBi."""
    device = select_backend(monkeypatch, backend)
    B, H, Hk, Tmax, D = 2, 4, 2, 8, 8
    q, kc, vc = (t.detach() for t in _inputs(B, H, Hk, 0, Tmax, D, device=device))
    lens = torch.tensor([3, 5], dtype=torch.int32, device=device)
    out, lse = llmkern.attention_with_kvcache(q, kc, vc, lens, alibi_slopes=_slopes(B, H, shape, device=device),
                                              return_lse=True)
    assert out.shape == (B, H, 0, D) and lse.shape == (B, H, 0)
    # and one query token still matches the float64 formula (the bias of position len_b - 1)
    q1 = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(4)).to(device)
    slopes = _slopes(B, H, shape, device=device)
    got = llmkern.attention_with_kvcache(q1, kc, vc, lens, alibi_slopes=slopes)
    sl = slopes.reshape(-1, H).cpu()
    for b, n in enumerate(lens.tolist()):
        want = _explicit(q1[b:b + 1].double().cpu(), kc[b:b + 1, :, :n].double().cpu(),
                         vc[b:b + 1, :, :n].double().cpu(), sl[b % sl.shape[0]], scale=D ** -0.5, causal=True)
        assert_close(got[b:b + 1].cpu(), want, torch.float32)


def test_reference_gives_the_slopes_no_gradient():
    q, k, v = _inputs(1, 2, 2, 5, 5, 8, torch.float64, device="cpu")
    slopes = _slopes(1, 2, "h", device="cpu").requires_grad_()
    ref.attention(q, k, v, alibi_slopes=slopes).sum().backward()
    assert slopes.grad is None and q.grad is not None


# ---- the kernels vs the float64 reference --------------------------------------------------------

def _check(q, k, v, slopes, dtype, **kw):
    """out, LSE and dq/dk/dv (through out and LSE) vs the float64 reference."""
    out, lse = llmkern.attention(q, k, v, alibi_slopes=slopes, return_lse=True, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and torch.isfinite(out).all()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    rout, rlse = ref.attention(qd, kd, vd, alibi_slopes=slopes, return_lse=True, **kw)
    assert_close(out, rout, dtype, msg="out")
    seen = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), seen)  # rows with no key: -inf in both
    assert_close(lse[seen], rlse[seen], torch.float32, atol=2e-3 if dtype == torch.float16 else 1e-4, msg="lse")
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(out.device)
    dl = torch.randn(lse.shape, generator=g).to(out.device)
    dl_d = dl.double().masked_fill(~seen, 0.0)  # (the reference's -inf LSE rows: no gradient to compare)
    grads = torch.autograd.grad((out.float() * dout).sum() + (lse.masked_fill(~seen, 0) * dl).sum(), (q, k, v))
    rgrads = torch.autograd.grad((rout * dout.double()).sum() + (rlse.masked_fill(~seen, 0) * dl_d).sum(),
                                 (qd, kd, vd))
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        assert torch.isfinite(a).all(), name
        s = max(1.0, b.abs().max().item())
        assert_close(a / s, b / s, dtype, msg=name)
    return out, lse


CASES = [
    # B, H, Hk, Tq, Tk, D, slope shape, big slopes, kwargs
    (2, 4, 2, 37, 45, 24, "bh", False, dict(causal=True, key_padding_mask="pad")),  # GQA, padding, a row with no key
    (1, 2, 2, 33, 70, 16, "h", True, dict(window=(5, 3), softcap=5.0)),          # interior blocks skipped
    (1, 4, 1, 40, 21, 24, "h", False, dict(causal=True, scale=-0.4)),  # Tq > Tk: rows with no key; -q folded
    (2, 4, 2, 29, 50, 16, "bh", True, dict()),                                    # not causal: both sides biased
    (1, 2, 1, 20, 52, 16, "h", False, dict(causal=True, softcap=3.0, scale=-0.3)),  # negative scale folded into q
]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=["gqa-pad-bh", "window-softcap", "tq>tk", "full-bh", "softcap-negscale"])
def test_kernels_vs_reference(triton_backend, case):
    B, H, Hk, Tq, Tk, D, shape, big, kw = case
    kw = dict(kw)
    if kw.get("key_padding_mask") == "pad":
        kw["key_padding_mask"] = _pad(B, Tk)
    q, k, v = _inputs(B, H, Hk, Tq, Tk, D)
    out, lse = _check(q, k, v, _slopes(B, H, shape, big=big), torch.float32, **kw)
    if "key_padding_mask" in kw:  # a row that sees no key: zeros and LSE -inf
        assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()


@needs_triton
def test_kernels_unequal_blocks_fp16(triton_backend, monkeypatch):
    monkeypatch.setenv("LLMKERN_ATTN_INTERP_BLOCK", "16,32")
    q, k, v = _inputs(1, 4, 2, 40, 48, 32, torch.float16)
    _check(q, k, v, _slopes(1, 4, "h"), torch.float16, causal=True, window=(20, None))


@needs_triton
def test_none_is_the_call_without_alibi_and_zero_slopes_are_no_alibi(triton_backend):
    q, k, v = _inputs(2, 4, 2, 21, 30, 16)
    kw = dict(causal=True, softcap=4.0, return_lse=True)
    runs = {}
    for name, extra in (("plain", {}), ("none", dict(alibi_slopes=None)),
                        ("zero", dict(alibi_slopes=torch.zeros(2, 4, device=DEV)))):
        out, lse = llmkern.attention(q, k, v, **kw, **extra)
        runs[name] = (out, lse) + torch.autograd.grad(out.square().sum() + lse.sum(), (q, k, v))
    for a, b in zip(runs["plain"], runs["none"]):
        assert torch.equal(a, b)  # None takes the kernels without the bias (HAS_ALIBI=False)
    for a, b in zip(runs["plain"], runs["zero"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # without softcap the no-ALiBi kernels keep the scores unscaled; a zero slope takes the scaled path
    out = llmkern.attention(q, k, v, causal=True)
    torch.testing.assert_close(llmkern.attention(q, k, v, causal=True, alibi_slopes=torch.zeros(4, device=DEV)), out,
                               atol=1e-6, rtol=1e-6)


@needs_triton
def test_huge_slopes_give_the_limit_not_nan(triton_backend):
    """A finite slope near float32's maximum (times log2(e) it would overflow; inf * 0 on the diagonal would
    be NaN): the kernels give the reference's limit, each query attending to its diagonal key alone."""
    q, k, v = _inputs(1, 2, 1, 5, 7, 16)
    slopes = torch.tensor([3e38, 0.5], device=DEV)
    out = llmkern.attention(q, k, v, causal=True, alibi_slopes=slopes)
    want = ref.attention(*(t.double() for t in (q, k, v)), causal=True, alibi_slopes=slopes)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 0], v[0, 0, 2:], atol=1e-6, rtol=0)  # query i sees key i + 2 only
    lens = torch.tensor([7], dtype=torch.int32, device=DEV)
    dec = llmkern.attention_with_kvcache(q[:, :, -1:].detach(), k.detach(), v.detach(), lens, alibi_slopes=slopes)
    torch.testing.assert_close(dec[0, 0, 0], v[0, 0, 6], atol=1e-6, rtol=0)


@needs_triton
def test_slopes_get_no_gradient(triton_backend):
    q, k, v = _inputs(1, 2, 2, 12, 12, 16)
    slopes = _slopes(1, 2, "h").requires_grad_()
    llmkern.attention(q, k, v, causal=True, alibi_slopes=slopes).sum().backward()
    assert slopes.grad is None and q.grad is not None


@needs_triton
def test_tma_kernels_equal_pointer_kernels(monkeypatch):
    """The descriptor kernels (sm_90+) share the inner loops: with ALiBi they give the pointer kernels' bits."""
    if torch.cuda.is_available():
        pytest.skip("interpreter only (bitwise equality)")
    q, k, v = (t.detach() for t in _inputs(2, 4, 2, 33, 40, 32, torch.float16, device="cpu"))
    dout = torch.randn_like(q)
    kw = dict(scale=0.2, causal=True, softcap=6.0, alibi_slopes=_slopes(2, 4, "bh", device="cpu"))
    attention_tma_vs_pointer(monkeypatch, q, k, v, dout, **kw)


@needs_triton
def test_grid_slices_take_their_rows_of_slopes(monkeypatch):
    """Batches past the grid limit run in slices: a [B, H] slope tensor is sliced with them (decode too)."""
    q, k, v = (t.detach() for t in _inputs(3, 2, 1, 13, 17, 16))
    dout = torch.randn_like(q)
    kw = dict(scale=0.25, causal=True, alibi_slopes=_slopes(3, 2, "bh", big=True))
    lens = torch.tensor([17, 4, 9], dtype=torch.int32, device=DEV)
    attention_grid_slices_equal(monkeypatch, q, k, v, dout, lens, **kw)


# ---- varlen and decode ---------------------------------------------------------------------------

@needs_triton
def test_varlen_vs_reference_and_padded_batch(triton_backend):
    lq, lk = [5, 0, 19, 12], [9, 3, 19, 7]  # Tq != Tk per sequence (and Tq > Tk: rows with no key)
    cq, ck = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32, device=DEV) for n in (lq, lk))
    H, Hk, D = 4, 2, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lq), H, D, generator=g).to(DEV).requires_grad_()
    k, v = (torch.randn(sum(lk), Hk, D, generator=g).to(DEV).requires_grad_() for _ in range(2))
    slopes = _slopes(4, H, "bh", big=True)
    kw = dict(causal=True, window=(6, None), alibi_slopes=slopes)
    out, lse = llmkern.attention_varlen(q, k, v, cq, ck, return_lse=True, **kw)
    dd = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rout, rlse = ref.attention_varlen(*dd, cq, ck, return_lse=True, **kw)
    assert_close(out, rout, torch.float32)
    seen = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert_close(lse[seen], rlse[seen], torch.float32)
    dout = torch.randn_like(out)
    got = torch.autograd.grad((out * dout).sum(), (q, k, v))
    want = torch.autograd.grad((rout * dout.double()).sum(), dd)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, b, torch.float32, msg=name)
    # packed sequences of equal lengths are the padded batch, [H] slopes included
    B, T = 3, 11
    qb, kb, vb = (t.detach() for t in _inputs(B, H, Hk, T, T, D))
    pack = lambda t: t.transpose(1, 2).reshape(B * T, t.shape[1], D)  # noqa: E731
    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=DEV)
    s = _slopes(B, H, "h")
    dense = llmkern.attention(qb, kb, vb, alibi_slopes=s)
    packed = llmkern.attention_varlen(pack(qb), pack(kb), pack(vb), cu, cu, alibi_slopes=s)
    torch.testing.assert_close(packed, pack(dense), atol=1e-5, rtol=1e-5)


def _decode_case(B=3, H=4, Hk=2, Tmax=64, D=16, Tq=1):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, Tq, D, generator=g)
    kc = torch.randn(B, Hk, Tmax, D, generator=g)
    vc = torch.randn(B, Hk, Tmax, D, generator=g)
    lens = torch.tensor([Tmax, 1, 37][:B], dtype=torch.int32)
    return q.to(DEV), kc.to(DEV), vc.to(DEV), lens.to(DEV)


def _paged(kc, vc, page=16):
    """The caches as shuffled page pools (two spare pages) and their block table."""
    B, Hk, Tmax, D = kc.shape
    n = Tmax // page
    perm = torch.randperm(B * n + 2, generator=torch.Generator().manual_seed(1))
    table = perm[:B * n].reshape(B, n).to(torch.int32).to(DEV)
    pools = []
    for c in (kc, vc):
        pool = torch.randn(B * n + 2, Hk, page, D, device=DEV)
        pool[table.reshape(-1).long()] = c.reshape(B, Hk, n, page, D).permute(0, 2, 1, 3, 4).reshape(-1, Hk, page, D)
        pools.append(pool)
    return pools[0], pools[1], table


@needs_triton
@pytest.mark.parametrize("Tq,shape,kw", [(1, "bh", dict(num_splits=3)), (3, "h", dict(window=(9, None), softcap=5.0)),
                                         (2, "bh", dict(key_padding_mask="left-pad"))])
def test_decode_vs_reference_dense_and_paged(triton_backend, Tq, shape, kw):
    q, kc, vc, lens = _decode_case(Tq=Tq)
    slopes = _slopes(3, 4, shape, big=True)
    kw = dict(kw)
    if kw.get("key_padding_mask") == "left-pad":
        kpm = torch.ones(3, 64, dtype=torch.bool, device=DEV)
        kpm[0, :10] = False
        kpm[2, :5] = False
        kw["key_padding_mask"] = kpm
    out, lse = llmkern.attention_with_kvcache(q, kc, vc, lens, alibi_slopes=slopes, return_lse=True, **kw)
    rkw = {n: t for n, t in kw.items() if n != "num_splits"}
    rout, rlse = ref.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens, alibi_slopes=slopes,
                                            return_lse=True, **rkw)
    assert_close(out, rout, torch.float32)
    seen = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert_close(lse[seen], rlse[seen], torch.float32)
    # the attention it stands for: each row's valid keys, bottom-right causal (Tk = the row's length)
    if "key_padding_mask" not in kw:
        for b, n in enumerate(lens.tolist()):
            s = slopes[b:b + 1] if slopes.dim() == 2 else slopes
            want = llmkern.attention(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], causal=True,
                                     alibi_slopes=s, **rkw)
            torch.testing.assert_close(out[b:b + 1], want, atol=1e-5, rtol=1e-5)
    pk, pv, table = _paged(kc, vc)
    paged = llmkern.attention_with_kvcache(q, pk, pv, lens, block_table=table, alibi_slopes=slopes, **kw)
    torch.testing.assert_close(paged, out, atol=1e-5, rtol=1e-5)


# ---- registration, compile, errors ---------------------------------------------------------------

@needs_triton
def test_opcheck_with_alibi(triton_backend):
    q, k, v = _inputs(1, 2, 1, 20, 24, 16)
    slopes = _slopes(1, 2, "bh")
    args = (q, k, v, None, None, None, None, -1, -1, 0.25, True, -1, -1, 0.0, 0.0, None, slopes)
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default, args)
    out, lse = torch.ops.llmkern.attention_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, torch.randn_like(lse)) + args[3:]
    torch.library.opcheck(torch.ops.llmkern.attention_bwd.default, bwd)
    q, kc, vc, lens = _decode_case()
    torch.library.opcheck(torch.ops.llmkern.attention_decode.default,
                          (q, kc, vc, lens, None, 0.25, True, -1, -1, 0.0, 2),
                          kwargs=dict(alibi_slopes=_slopes(3, 4, "h")))


@needs_triton
def test_torch_compile_fullgraph_with_alibi(triton_backend):
    torch._dynamo.reset()
    q, k, v = _inputs(1, 2, 1, 24, 24, 16)
    slopes = _slopes(1, 2, "h")

    def f(a, b, c, s):
        out, lse = llmkern.attention(a, b, c, causal=True, window=(8, None), alibi_slopes=s, return_lse=True)
        return out.square().sum() + lse.sum()

    got = torch.compile(f, fullgraph=True)(q, k, v, slopes)
    g = torch.autograd.grad(got, (q, k, v))
    want = f(q, k, v, slopes)
    w = torch.autograd.grad(want, (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b)


_BAD = [
    (lambda B, H: [0.5] * H, TypeError, "alibi_slopes must be a torch.Tensor"),
    (lambda B, H: torch.ones(H, dtype=torch.float64), ValueError, "alibi_slopes must be float32"),
    (lambda B, H: torch.ones(H, dtype=torch.float16), ValueError, "alibi_slopes must be float32"),
    (lambda B, H: torch.ones(H + 1), ValueError, r"alibi_slopes must have shape \[heads\]"),
    (lambda B, H: torch.ones(B + 1, H), ValueError, r"alibi_slopes must have shape \[heads\]"),
    (lambda B, H: torch.ones(B, H, 1), ValueError, r"alibi_slopes must have shape \[heads\]"),
    (lambda B, H: torch.ones(H, device="meta"), ValueError, "alibi_slopes is on meta"),
    (lambda B, H: torch.tensor([0.5, math.nan, 0.1, 0.2]), ValueError, "alibi_slopes must be finite"),
    (lambda B, H: torch.full((B, H), math.inf), ValueError, "alibi_slopes must be finite"),
]


@pytest.mark.parametrize("make,exc,match", _BAD,
                         ids=["list", "float64", "float16", "shape", "batch", "3d", "device", "nan", "inf"])
def test_bad_alibi_slopes(make, exc, match):
    B, H = 2, 4
    q, k, v = torch.randn(B, H, 5, 8), torch.randn(B, 2, 5, 8), torch.randn(B, 2, 5, 8)
    with pytest.raises(exc, match=match):
        llmkern.attention(q, k, v, alibi_slopes=make(B, H))
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    pack = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], 8)  # noqa: E731
    with pytest.raises(exc, match=match):
        llmkern.attention_varlen(pack(q), pack(k), pack(v), cu, cu, alibi_slopes=make(B, H))
    with pytest.raises(exc, match=match):
        llmkern.attention_with_kvcache(q[:, :, :1], k, v, 3, alibi_slopes=make(B, H))


# ---- GPU -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_bf16_vs_reference(causal):
    """A realistic shape in bf16 (the TMA kernels on sm_90+), the paper's slopes: out, LSE and dq/dk/dv
    against the float64 reference."""
    B, H, Hk, T, D = 2, 16, 4, 1024, 128
    q, k, v = _inputs(B, H, Hk, T, T, D, torch.bfloat16, device="cuda")
    _check(q, k, v, alibi_slopes(H).cuda(), torch.bfloat16, causal=causal)
