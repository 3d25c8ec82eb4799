"""Randomised shapes and layouts: the Triton kernels (the interpreter on CPU) against float64 formulas
written here, independently of llmkern.reference.

The other test files pick their shapes by hand; this one draws them (fixed seeds, so a failure
reproduces): odd sizes around the kernels' tile edges, ranks and expert counts of 1, leading dims,
non-contiguous inputs (transposed and sliced views), ignored labels, dropped expert slots, a value head
dim of its own in attention. Each case
checks the output and every input gradient. float32 only (the interpreter's exact dtype), small sizes.
LLMKERN_FUZZ_SCALE=k runs k times as many cases.
"""
import os
import random

import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.testing import triton_device

DEV = triton_device()
pytestmark = [pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("triton_backend")]
ODD = (1, 2, 7, 15, 16, 17, 31, 33, 48, 65)


def _cases(n):
    """n seeds per test; LLMKERN_FUZZ_SCALE=k draws k times as many (a longer hunt: scale 5 ran 280 cases
    in 70 s here)."""
    return range(n * int(os.environ.get("LLMKERN_FUZZ_SCALE", "1")))


def _leaf(t, rng, layout=True):
    """t as a requires-grad leaf, sometimes a non-contiguous view of a larger tensor with t's values."""
    t = t.to(DEV)
    if layout and t.dim() >= 2 and rng.random() < 0.5:
        if rng.random() < 0.5:  # a transposed copy, transposed back: same values, swapped strides
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        else:  # a slice of a wider tensor: row stride larger than the row
            wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, device=DEV, dtype=t.dtype)
            wide[..., :t.shape[-1]] = t
            t = wide[..., :t.shape[-1]]
        return t.detach().requires_grad_()
    return t.detach().clone().requires_grad_()


def _check(ours, want, leaves, exact, tol=2e-4):
    """ours/want outputs; then the gradients of the same random upstream gradient."""
    assert ours.shape == want.shape, (ours.shape, want.shape)
    torch.testing.assert_close(ours.double(), want, atol=tol, rtol=tol)
    dy = torch.randn(ours.shape, dtype=torch.float64)
    ours.backward(dy.to(ours.dtype).to(ours.device))
    want.backward(dy)
    for i, (a, b) in enumerate(zip(leaves, exact)):
        if b.grad is None:
            continue
        assert a.grad is not None, f"no gradient for input {i}"
        torch.testing.assert_close(a.grad.double().cpu(), b.grad, atol=tol * 5, rtol=tol * 5,
                                   msg=lambda m, i=i: f"gradient of input {i}: {m}")


def _exact(*ts):
    return [t.detach().double().cpu().requires_grad_() for t in ts]


@pytest.mark.parametrize("case", _cases(8))
def test_lora_linear(case):
    rng = random.Random(100 + case)
    M, K, N = rng.choice(ODD), rng.choice(ODD), rng.choice(ODD)
    r = rng.choice((1, 2, 4, 8, 16))
    lead = (M,) if rng.random() < 0.5 else (1, M)
    x, W = torch.randn(*lead, K), torch.randn(N, K) / K ** 0.5
    A, B = torch.randn(r, K) / K ** 0.5, torch.randn(N, r)
    bias = torch.randn(N) if rng.random() < 0.5 else None
    s = rng.choice((0.5, 2.0))
    train_w = rng.random() < 0.3
    leaves = [_leaf(t, rng) for t in (x, W, A, B)] + ([_leaf(bias, rng)] if bias is not None else [])
    if not train_w:
        leaves[1].requires_grad_(False)
    y = llmkern.lora_linear(leaves[0], leaves[1], leaves[4] if bias is not None else None, leaves[2],
                            leaves[3], s)
    ex = _exact(*leaves)
    want = ex[0] @ ex[1].T + s * (ex[0] @ ex[2].T) @ ex[3].T + (ex[4] if bias is not None else 0)
    if not train_w:
        ex[1].grad = None
        ex[1].requires_grad_(False)
    _check(y, want, leaves, ex)


@pytest.mark.parametrize("case", _cases(6))
def test_lora_linear_multi(case):
    rng = random.Random(200 + case)
    M, K, N = rng.choice(ODD), rng.choice(ODD), rng.choice(ODD)
    n, r = rng.choice((1, 2, 3)), rng.choice((1, 4, 8))
    x, W = torch.randn(M, K), torch.randn(N, K) / K ** 0.5
    A, B = torch.randn(n, r, K) / K ** 0.5, torch.randn(n, N, r)
    scal = torch.rand(n) + 0.5
    ids = torch.randint(-1, n, (M,), generator=torch.Generator().manual_seed(case))
    leaves = [_leaf(x, rng), _leaf(W, rng).requires_grad_(False), _leaf(A, rng, False), _leaf(B, rng, False)]
    y = llmkern.lora_linear_multi(leaves[0], leaves[1], None, leaves[2], leaves[3], scal.to(DEV), ids.to(DEV))
    ex = _exact(*leaves)
    ex[1].requires_grad_(False)
    safe = ids.clamp_min(0)
    on = (ids >= 0).double()[:, None]
    low = torch.einsum("mk,mrk->mr", ex[0], ex[2][safe])
    want = ex[0] @ ex[1].T + on * scal.double()[safe][:, None] * torch.einsum("mr,mnr->mn", low, ex[3][safe])
    _check(y, want, leaves, ex)


@pytest.mark.parametrize("case", _cases(6))
def test_moe_mlp(case):
    rng = random.Random(300 + case)
    T, d, Fw = rng.choice(ODD), rng.choice((8, 16, 17, 32)), rng.choice((8, 15, 16, 33))
    E = rng.choice((1, 2, 3, 5))
    k = rng.randint(1, E)
    act = rng.choice(("swiglu", "geglu"))
    x = torch.randn(T, d)
    wgu, wd = torch.randn(E, 2 * Fw, d) / d ** 0.5, torch.randn(E, d, Fw) / Fw ** 0.5
    tw, ids = llmkern.moe_route(torch.randn(T, E), k)
    if rng.random() < 0.5 and T > 1:  # drop a few slots (capacity-limited routers mark them -1)
        ids = ids.clone()
        ids[0, 0] = -1
    leaves = [_leaf(x, rng), _leaf(wgu, rng, False), _leaf(wd, rng, False), _leaf(tw, rng, False)]
    y = llmkern.moe_mlp(leaves[0], leaves[1], leaves[2], ids.to(DEV), leaves[3], act)
    ex = _exact(*leaves)
    out = torch.zeros(T, d, dtype=torch.float64)
    g = {"swiglu": F.silu, "geglu": lambda z: F.gelu(z, approximate="tanh")}[act]
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = ex[1][e] @ ex[0][t]
            out = out.index_add(0, torch.tensor([t]), (ex[3][t, j] * (ex[2][e] @ (g(h[:Fw]) * h[Fw:])))[None])
    _check(y, out, leaves, ex)


@pytest.mark.parametrize("case", _cases(6))
def test_linear_cross_entropy(case):
    rng = random.Random(400 + case)
    Nt, d, V = rng.choice(ODD), rng.choice((8, 16, 33)), rng.choice((2, 17, 64, 100))
    softcap = rng.choice((None, 3.0))
    reduction = rng.choice(("mean", "sum"))
    h, W = torch.randn(Nt, d), torch.randn(V, d) / d ** 0.5
    labels = torch.randint(0, V, (Nt,))
    labels[torch.rand(Nt) < 0.3] = -100
    leaves = [_leaf(h, rng), _leaf(W, rng)]
    loss = llmkern.linear_cross_entropy(leaves[0], leaves[1], labels.to(DEV), softcap=softcap,
                                        reduction=reduction, chunk_size=rng.choice((None, 5)))
    ex = _exact(*leaves)
    z = ex[0] @ ex[1].T
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    want = F.cross_entropy(z, labels, ignore_index=-100, reduction=reduction)
    if reduction == "mean" and not bool((labels != -100).any()):
        # every label ignored: the mean is NaN, as F.cross_entropy's (0 / 0), and the gradients are zeros
        assert torch.isnan(loss)
        loss.backward()
        assert all(bool((t.grad == 0).all()) for t in leaves)
        return
    _check(loss.reshape(()), want.reshape(()), leaves, ex)


@pytest.mark.parametrize("case", _cases(6))
def test_rms_norm_with_residual(case):
    rng = random.Random(500 + case)
    lead, N = (rng.choice(ODD), rng.choice((1, 3))), rng.choice((8, 17, 64, 100))
    offset = rng.choice((0.0, 1.0))
    x, res, w = torch.randn(*lead, N), torch.randn(*lead, N), torch.randn(N) * 0.5
    leaves = [_leaf(x, rng), _leaf(res, rng), _leaf(w, rng)]
    y, s = llmkern.rms_norm(leaves[0], leaves[2], 1e-6, residual=leaves[1], offset=offset, return_residual=True)
    ex = _exact(*leaves)
    s64 = ex[0] + ex[1]
    want = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + ex[2])
    # one output that depends on both: y and s weighted, so both gradients are checked
    _check(y + 0.5 * s, want + 0.5 * s64, leaves, ex)


@pytest.mark.parametrize("case", _cases(4))
def test_rope(case):
    rng = random.Random(600 + case)
    B, T, H, Hk = rng.choice((1, 2)), rng.choice(ODD), rng.choice((2, 4)), rng.choice((1, 2))
    D = rng.choice((8, 16, 32))
    q, k = torch.randn(B, H, T, D), torch.randn(B, Hk, T, D)
    ang = torch.arange(T)[:, None] * (10000 ** (-torch.arange(0, D, 2) / D))[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    leaves = [_leaf(q, rng), _leaf(k, rng)]
    qo, ko = llmkern.rope(leaves[0], leaves[1], cos.to(DEV), sin.to(DEV))
    ex = _exact(*leaves)

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return x * cos.double() + torch.cat([-x2, x1], -1) * sin.double()

    _check(torch.cat([qo.flatten(), ko.flatten()]), torch.cat([rot(ex[0]).flatten(), rot(ex[1]).flatten()]),
           leaves, ex)


@pytest.mark.parametrize("case", _cases(4))
def test_gated_activations(case):
    rng = random.Random(700 + case)
    shape = (rng.choice(ODD), rng.choice(ODD))
    gate, up = torch.randn(*shape) * 3, torch.randn(*shape)
    leaves = [_leaf(gate, rng), _leaf(up, rng)]
    ex = _exact(*leaves)
    if case % 2:
        y, want = llmkern.geglu(*leaves), F.gelu(ex[0], approximate="tanh") * ex[1]
    else:
        y, want = llmkern.swiglu(*leaves), F.silu(ex[0]) * ex[1]
    _check(y, want, leaves, ex)


@pytest.mark.parametrize("case", _cases(6))
def test_qlora_linear(case):
    """lora_linear over a 4-bit NF4 base: the kernels' in-loop dequantization (M <= 256 rows, in_features a
    multiple of the block) or the dequantize-first path, against the dense float64 product of the
    dequantized weight."""
    rng = random.Random(800 + case)
    blocksize = rng.choice((64, 128))
    M, K, N = rng.choice(ODD), rng.choice((64, 128, 192, 100)), rng.choice(ODD)
    r = rng.choice((1, 4, 8))
    qw = llmkern.nf4_quantize((torch.randn(N, K) / K ** 0.5).to(DEV), blocksize,
                              double_quant=rng.random() < 0.5)
    W = llmkern.nf4_dequantize(qw).double().cpu()
    x, A, B = torch.randn(M, K), torch.randn(r, K) / K ** 0.5, torch.randn(N, r)
    leaves = [_leaf(x, rng), _leaf(A, rng), _leaf(B, rng)]
    y = llmkern.lora_linear(leaves[0], qw, None, leaves[1], leaves[2], 2.0)
    ex = _exact(*leaves)
    _check(y, ex[0] @ W.T + 2.0 * (ex[0] @ ex[1].T) @ ex[2].T, leaves, ex)


# ---- attention ----------------------------------------------------------------------------------------

def _attention_exact(q, k, v, causal, window, softcap, kpm, sinks, alibi, scale):
    """float64 attention by the definition: q [B, H, Tq, D], k/v [B, Hk, Tk, D]; masks bottom-right
    aligned; a row with no visible key gives zeros and LSE -inf (or the sink's logit)."""
    B, H, Tq, _ = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    s = scale * q @ k.transpose(-1, -2)                           # [B, H, Tq, Tk]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    diag = torch.arange(Tq)[:, None] + Tk - Tq                   # the key on query i's diagonal
    j = torch.arange(Tk)[None]
    if alibi is not None:
        slopes = alibi.double().reshape(-1, H)[:, :, None, None]  # [1 or B, H, 1, 1]
        s = s - slopes * (diag - j).abs()
    ok = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        ok &= j <= diag
    if window is not None:
        ok &= (j >= diag - window[0]) & (j <= diag + window[1])
    ok = ok[None, None].expand(B, H, Tq, Tk)
    if kpm is not None:
        ok = ok & kpm[:, None, None, :]
    s = s.masked_fill(~ok, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[None, :, None, None].expand(B, H, Tq, 1)], -1)
    # rows with no finite score: zeros and LSE -inf, kept out of the autograd graph (no NaN gradients)
    seen = torch.isfinite(s).any(-1, keepdim=True)
    s = torch.where(seen, s, torch.zeros_like(s))
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.where(seen, torch.exp(s - lse), torch.zeros_like(s))
    return p[..., :Tk] @ v, torch.where(seen, lse, float("-inf")).squeeze(-1)


@pytest.mark.parametrize("case", _cases(12))
def test_attention(case):
    rng = random.Random(900 + case)
    B, Hk = rng.choice((1, 2)), rng.choice((1, 2))
    H = Hk * rng.choice((1, 2, 3))
    Tq, Tk = rng.choice(ODD), rng.choice(ODD)
    D = rng.choice((8, 16, 24, 40, 64))
    causal = rng.random() < 0.5
    window = (rng.randint(0, 8), rng.randint(0, 8)) if rng.random() < 0.3 else None
    softcap = rng.choice((None, None, 2.0))
    kpm = torch.rand(B, Tk) < 0.8 if rng.random() < 0.3 else None
    sinks = torch.randn(H) if rng.random() < 0.25 else None
    alibi = torch.rand(*((B, H) if rng.random() < 0.5 else (H,))) if rng.random() < 0.25 else None
    scale = rng.choice((None, 0.3))
    hf_layout = rng.random() < 0.5  # q/k/v as transformers hands them: [B, T, H, D] transposed
    Dv = D if rng.random() < 0.6 else rng.choice((8, 24, 40))  # v's own head dim (DeepSeek's MLA: Dv != D)
    qkv = [torch.randn(B, h, T, d) for h, T, d in ((H, Tq, D), (Hk, Tk, D), (Hk, Tk, Dv))]
    if hf_layout:
        leaves = [t.transpose(1, 2).contiguous().transpose(1, 2).to(DEV).requires_grad_() for t in qkv]
    else:
        leaves = [_leaf(t, rng) for t in qkv]
    out, lse = llmkern.attention(*leaves, causal=causal, window=window, softcap=softcap, scale=scale,
                                 key_padding_mask=None if kpm is None else kpm.to(DEV), return_lse=True,
                                 sinks=None if sinks is None else sinks.to(DEV),
                                 alibi_slopes=None if alibi is None else alibi.to(DEV))
    ex = _exact(*leaves)
    want, want_lse = _attention_exact(*ex, causal, window, softcap, kpm, sinks, alibi, scale or D ** -0.5)
    torch.testing.assert_close(lse.double().cpu(), want_lse, atol=2e-4, rtol=2e-4)
    _check(out, want, leaves, ex)


@pytest.mark.parametrize("case", _cases(6))
def test_attention_varlen(case):
    rng = random.Random(1000 + case)
    n, Hk = rng.choice((1, 2, 3)), rng.choice((1, 2))
    H, D = Hk * rng.choice((1, 2)), rng.choice((16, 24, 32))
    lq = [rng.choice((0,) + ODD[:6]) for _ in range(n)]
    lk = [q_len + rng.choice((0, 0, 3)) for q_len in lq]  # Tk >= Tq: prefix keys, or the same length
    causal, softcap = rng.random() < 0.5, rng.choice((None, 2.0))
    alibi = torch.rand(n, H) if rng.random() < 0.3 else None
    cu = [torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32) for lens in (lq, lk)]
    leaves = [torch.randn(sum(L), h, D, device=DEV).requires_grad_() for L, h in ((lq, H), (lk, Hk), (lk, Hk))]
    out = llmkern.attention_varlen(*leaves, cu[0].to(DEV), cu[1].to(DEV), causal=causal, softcap=softcap,
                                   alibi_slopes=None if alibi is None else alibi.to(DEV))
    ex = _exact(*leaves)
    parts = []
    for b in range(n):
        qs, ks = slice(int(cu[0][b]), int(cu[0][b + 1])), slice(int(cu[1][b]), int(cu[1][b + 1]))
        seq = [t[sl].transpose(0, 1)[None] for t, sl in ((ex[0], qs), (ex[1], ks), (ex[2], ks))]
        o, _ = _attention_exact(*seq, causal, None, softcap, None, None,
                                None if alibi is None else alibi[b], D ** -0.5)
        parts.append(o[0].transpose(0, 1))
    _check(out, torch.cat(parts), leaves, ex)


@pytest.mark.parametrize("case", _cases(6))
def test_attention_with_kvcache(case):
    """Decode against a cache with per-row lengths, contiguous or paged (pages in a shuffled pool)."""
    rng = random.Random(1100 + case)
    B, Hk = rng.choice((1, 2, 3)), rng.choice((1, 2))
    H, D, Tq = Hk * rng.choice((1, 4)), rng.choice((16, 32, 40)), rng.choice((1, 1, 2, 4))
    Dv = D if rng.random() < 0.6 else rng.choice((8, 24))
    page = rng.choice((None, 4, 16))
    Tmax = 48
    lens = torch.tensor([rng.randint(Tq, Tmax) for _ in range(B)], dtype=torch.int32)
    softcap = rng.choice((None, 2.0))
    window = (rng.randint(0, 10), 0) if rng.random() < 0.3 else None
    q, kc, vc = torch.randn(B, H, Tq, D), torch.randn(B, Hk, Tmax, D), torch.randn(B, Hk, Tmax, Dv)
    kw = dict(causal=True, softcap=softcap, window=window)
    if rng.random() < 0.4:  # a float8 cache with per-kv-head scales: the oracle reads it dequantized
        fp8 = rng.choice((torch.float8_e4m3fn, torch.float8_e5m2))
        ks, vs = torch.rand(Hk) + 0.25, torch.rand(Hk) + 0.25
        kc, vc = llmkern.quantize_kv(kc, fp8, ks), llmkern.quantize_kv(vc, fp8, vs)
        kw.update(k_scale=ks.to(DEV), v_scale=vs.to(DEV))
        deq = (kc.float() * ks[:, None, None], vc.float() * vs[:, None, None])
    if page is None:
        out = llmkern.attention_with_kvcache(q.to(DEV), kc.to(DEV), vc.to(DEV), lens.to(DEV), **kw)
    else:  # row b's page i at a shuffled pool index
        per_row = Tmax // page
        perm = torch.randperm(B * per_row, generator=torch.Generator().manual_seed(case))
        table = perm.view(B, per_row).to(torch.int32)
        pool = [torch.empty(B * per_row, Hk, page, d, dtype=kc.dtype) for d in (D, Dv)]
        for cache, p in zip((kc, vc), pool):
            d = cache.shape[-1]
            p[table.flatten().long()] = cache.view(B, Hk, per_row, page, d).transpose(1, 2).reshape(-1, Hk, page, d)
        out = llmkern.attention_with_kvcache(q.to(DEV), pool[0].to(DEV), pool[1].to(DEV), lens.to(DEV),
                                             block_table=table.to(DEV), **kw)
    if "k_scale" in kw:
        kc, vc = deq
    for b in range(B):
        L = int(lens[b])
        want, _ = _attention_exact(q[b:b + 1].double(), kc[b:b + 1, :, :L].double(), vc[b:b + 1, :, :L].double(),
                                   True, window, softcap, None, None, None, D ** -0.5)
        torch.testing.assert_close(out[b:b + 1].double().cpu(), want, atol=2e-4, rtol=2e-4)


# ---- inference attention on the split-K decode kernel --------------------------------------------------

def _spy(monkeypatch, module, name):
    """Count the calls of module.name (still running it)."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _fuzz_layout(x, how, gen):
    """A [B, H, T, d] tensor with x's values: contiguous; transformers' layout (a [B, T, H, d] tensor transposed);
    a slice of a wider tensor; or with a strided last dimension (the launchers copy it)."""
    if how == "hf":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "slice":
        wide = torch.randn(*x.shape[:-1], x.shape[-1] + 3, generator=gen)
        return wide[..., :x.shape[-1]].copy_(x)
    if how == "strided":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.contiguous()


def _padding_mask(B, Tk, how, gen):
    """bool [B, Tk] (True = attend): left or right padding of random lengths, or random holes; how[1]: a
    non-contiguous slice of a wider mask (as transformers' cache-offset masks); how[2]: the last row fully masked."""
    m = torch.ones(B, Tk + 2, dtype=torch.bool)[:, 1:Tk + 1] if how[1] else torch.ones(B, Tk, dtype=torch.bool)
    for b in range(B):
        n = int(torch.randint(0, Tk + 1, (1,), generator=gen))
        if how[0] == "left":
            m[b, :n] = False
        elif how[0] == "right":
            m[b, Tk - n:] = False
        else:
            m[b] = torch.rand(Tk, generator=gen) < 0.7
    if B > 1 and how[2]:
        m[-1] = False
    return m


@pytest.mark.parametrize("case", _cases(32))
def test_attention_decode_route(monkeypatch, case):
    """llmkern.attention with 1..16 queries per row and no gradient runs the split-K decode kernel (not the forward
    kernel): its outputs and LSE against the reference backend in float64 and against the float64 formula above,
    over keys 0..80 (fewer than the queries, none), GQA, D != Dv (not powers of two), causal or not, windows (a side
    None, 0, or both 0), softcap, padding masks (rows fully masked), sinks, ALiBi [H] / [B, H], a scale, transposed
    and sliced views; 1..4 key splits (forced: the interpreter's 32-key tiles would give one for these lengths), so
    the split combine (and the sink in it) runs."""
    from llmkern.kernels import attention as KA, attention_decode as KD

    rng = random.Random(1200 + case)
    gen = torch.Generator().manual_seed(1200 + case)
    B, Hk = rng.randint(1, 3), rng.choice((1, 2, 3))
    H, Tq = Hk * rng.choice((1, 2, 3, 5)), rng.choice((1, rng.randint(1, 16), rng.randint(1, 16)))
    Tk = rng.choice((0, rng.randint(1, Tq), rng.randint(1, 80), rng.randint(1, 80), rng.randint(1, 80)))
    D = rng.choice((8, 12, 20, 24, 33, 40))
    Dv = D if rng.random() < 0.5 else rng.choice((8, 12, 20, 33, 40))
    causal = rng.random() < 0.6
    sides = (rng.choice((None, 0, 1, 3, 7, 20)), rng.choice((None, 0, 1, 3, 7)))
    window = rng.choice((None, None, None, (0, 0), sides))
    softcap, scale = rng.choice((None, None, 1.5, 5.0)), rng.choice((None, None, 0.3))
    layout = rng.choice(("contig", "hf", "hf", "slice", "strided"))
    q, k, v = (_fuzz_layout(torch.randn(B, h, T, d, generator=gen), layout, gen)
               for h, T, d in ((H, Tq, D), (Hk, Tk, D), (Hk, Tk, Dv)))
    kw = dict(causal=causal, window=window, softcap=softcap, scale=scale, return_lse=rng.random() < 0.5)
    if rng.random() < 0.4:
        kw["key_padding_mask"] = _padding_mask(B, Tk, (rng.choice(("left", "right", "holes")), rng.random() < 0.3,
                                                      rng.random() < 0.5), gen)
    if rng.random() < 0.3:
        kw["sinks"] = torch.randn(H, generator=gen)
    if rng.random() < 0.4:
        kw["alibi_slopes"] = torch.rand(*((H,) if rng.random() < 0.5 else (B, H)), generator=gen)
    splits = rng.randint(1, 4)

    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    want = llmkern.attention(q.double(), k.double(), v.double(), **kw)
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    decode, forward = _spy(monkeypatch, KD, "attention_decode"), _spy(monkeypatch, KA, "attention_forward")
    chosen = []
    monkeypatch.setattr(KD, "choose_num_splits", lambda *a: chosen.append(1) or splits)
    dev = {n: t.to(DEV) if torch.is_tensor(t) else t for n, t in kw.items()}
    with torch.no_grad():
        got = llmkern.attention(q.to(DEV), k.to(DEV), v.to(DEV), **dev)
    assert decode == [1] and forward == [] and chosen == [1]
    if kw["return_lse"]:
        assert got[0].dtype == q.dtype and got[1].dtype == torch.float32
    else:
        assert got.dtype == q.dtype
    got, want = (got, want) if kw["return_lse"] else ((got,), (want,))
    for a, b, name in zip(got, want, ("out", "lse")):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        torch.testing.assert_close(a.double().cpu(), b, atol=2e-4, rtol=2e-4, msg=lambda m, n=name: f"{n}: {m}")
    exact = _attention_exact(q.double(), k.double(), v.double(), causal,
                             None if window is None else tuple(10 ** 6 if w is None else w for w in window),
                             softcap, kw.get("key_padding_mask"), kw.get("sinks"), kw.get("alibi_slopes"),
                             scale or D ** -0.5)
    for a, b in zip(got, exact):
        torch.testing.assert_close(a.double().cpu(), b, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("case", _cases(32))
def test_attention_with_kvcache_appends(monkeypatch, case):
    """attention_with_kvcache with new k / v: the Triton append kernel then the decode kernel, against the reference
    backend's indexing ops and attention on copies of the same caches: the caches bit for bit (every slot: the
    appended ones at cache_seqlens[b] + i, the others untouched) and the outputs / LSE. Dense caches, page pools
    (shuffled pages, spare pages, token-major pools passed transposed) and cache_batch_idx rows of a larger pool;
    float8 caches (the new tokens quantized by the scales); GQA, D != Dv, transposed new k / v, Tq != Tq_new,
    no new token, lengths as int32 / int64 / one int, num_splits, and the features of the decode kernel."""
    from llmkern.kernels import attention_decode as KD

    rng = random.Random(1300 + case)
    gen = torch.Generator().manual_seed(1300 + case)
    B, Hk = rng.randint(1, 3), rng.choice((1, 2, 3))
    H = Hk * rng.choice((1, 2, 4))
    D = rng.choice((8, 12, 20, 33, 40))
    Dv = D if rng.random() < 0.5 else rng.choice((8, 12, 24))
    t_new = rng.choice((0, 1, 1, 2, 3, 5))
    Tq = rng.choice((max(t_new, 1), max(t_new, 1), rng.randint(1, 6)))
    mode = rng.choice(("dense", "paged", "batch_idx"))
    page, per_row = rng.choice((4, 8, 16)), rng.randint(2, 5)
    Tmax = page * per_row if mode == "paged" else rng.randint(max(t_new, 1), 60)
    fp8 = rng.choice((None, None, torch.float8_e4m3fn, torch.float8_e5m2))
    token_major = rng.random() < 0.5
    q = _fuzz_layout(torch.randn(B, H, Tq, D, generator=gen), rng.choice(("contig", "hf")), gen)
    kv_layout = rng.choice(("contig", "hf", "slice"))
    k, v = (_fuzz_layout(torch.randn(B, Hk, t_new, d, generator=gen), kv_layout, gen) for d in (D, Dv))

    def cache(rows, T, d):  # [rows, Hk, T, d], or a token-major [rows, T, Hk, d] seen as that
        x = torch.randn(rows, T, Hk, d, generator=gen).transpose(1, 2) if token_major else \
            torch.randn(rows, Hk, T, d, generator=gen)
        return x.to(fp8) if fp8 else x

    kw = dict(causal=rng.random() < 0.7, softcap=rng.choice((None, 2.0)), return_lse=rng.random() < 0.5,
              num_splits=rng.choice((0, 1, 2, 3)),
              window=rng.choice((None, None, (rng.choice((None, 0, 2, 5)), rng.choice((None, 0, 3))))))
    if mode == "dense":
        rows = B
    elif mode == "paged":
        rows = B * per_row + rng.randint(0, 3)
        kw["block_table"] = torch.randperm(rows, generator=gen)[:B * per_row].view(B, per_row).to(torch.int32)
    else:
        rows = B + rng.randint(0, 3)
        kw["cache_batch_idx"] = torch.randperm(rows, generator=gen)[:B].to(rng.choice((torch.int32, torch.int64)))
    kc, vc = cache(rows, page if mode == "paged" else Tmax, D), cache(rows, page if mode == "paged" else Tmax, Dv)
    lens = [rng.randint(0, Tmax - t_new) for _ in range(B)]
    lens = rng.choice((torch.tensor(lens, dtype=torch.int32), torch.tensor(lens), lens[0]))  # (an int: every row's)
    if fp8:
        kw.update(k_scale=torch.rand(Hk, generator=gen) + 0.5, v_scale=rng.choice((0.7, None)))
    if rng.random() < 0.3:
        kw["sinks"] = torch.randn(H, generator=gen)
    if rng.random() < 0.3:
        kw["alibi_slopes"] = torch.rand(*((H,) if rng.random() < 0.5 else (B, H)), generator=gen)
    if rng.random() < 0.3:
        kw["key_padding_mask"] = torch.rand(B, Tmax, generator=gen) < 0.8

    def run(backend):
        monkeypatch.setenv("LLMKERN_BACKEND", backend)
        dev = DEV if backend == "triton" else "cpu"
        on = {n: t.to(dev) if torch.is_tensor(t) else t for n, t in kw.items()}
        kc_, vc_ = kc.clone().to(dev), vc.clone().to(dev)  # (clone keeps a token-major pool's strides)
        with torch.no_grad():
            out = llmkern.attention_with_kvcache(q.to(dev), kc_, vc_, lens.to(dev) if torch.is_tensor(lens) else lens,
                                                 k=k.to(dev), v=v.to(dev), **on)
        return (out if kw["return_lse"] else (out,)), kc_, vc_

    want, kc_want, vc_want = run("reference")
    append, decode = _spy(monkeypatch, KD, "append_kv"), _spy(monkeypatch, KD, "attention_decode")
    got, kc_got, vc_got = run("triton")
    assert append == [1] and decode == [1]

    def bits(t):
        return t.cpu().view(torch.uint8) if t.element_size() == 1 else t.cpu()

    assert torch.equal(bits(kc_got), bits(kc_want)) and torch.equal(bits(vc_got), bits(vc_want))
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a.cpu(), b, atol=2e-4, rtol=2e-4)
