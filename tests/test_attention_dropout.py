"""Attention dropout (llmkern.attention / attention_varlen, dropout_p and seed).

The mask is a hash of (seed, batch row, query head, query, key): the reference
(llmkern.reference.attention.attention_dropout_keep) and the Triton kernels compute the same bits,
so every path gives the same result for a given seed and the backward regenerates the mask.
Checked here: the mask's statistics, the reference against softmax weights dropped by hand, the
kernels (interpreter on CPU) against the float64 reference for outputs, LSE and gradients, varlen
against the padded batch, grid slicing, reproducibility, opcheck, torch.compile and bad arguments.
"""
import math

import pytest
import torch

import llmkern
from llmkern.reference import attention as R
from llmkern.testing import triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _qkv(B, H, Hk, Tq, Tk, D, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(B * 1000 + H * 100 + Tq + Tk + D)
    shapes = ((B, H, Tq, D), (B, Hk, Tk, D), (B, Hk, Tk, D))
    return [torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def _by_hand(q, k, v, p, seed, causal, scale):
    """(softmax weights * keep / (1 - p)) @ v in float64, with the mask from the reference."""
    B, H, Tq, _ = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    kk, vv = (t.double().repeat_interleave(H // Hk, dim=1) for t in (k, v))
    s = q.double() @ kk.transpose(-1, -2) * scale
    if causal:
        i = torch.arange(Tq)[:, None] + (Tk - Tq)
        s = s.masked_fill(torch.arange(Tk)[None, :] > i, float("-inf"))
    w = torch.softmax(s, dim=-1)
    keep = R.attention_dropout_keep(B, H, Tq, Tk, p, seed)
    return (w * keep / (1 - p)) @ vv


# ---- the mask ------------------------------------------------------------------------------------

def test_mask_statistics():
    p = 0.3
    keep = R.attention_dropout_keep(4, 8, 64, 96, p, seed=123)
    assert keep.shape == (4, 8, 64, 96)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    # heads, batch rows and query rows get unrelated masks: agreement near p^2 + (1-p)^2
    agree = p * p + (1 - p) ** 2
    for a, b in ((keep[0, 0], keep[0, 1]), (keep[0, 0], keep[1, 0]), (keep[0, 0, :-1], keep[0, 0, 1:]),
                 (keep[0, 0, :, :-1], keep[0, 0, :, 1:])):
        assert abs((a == b).float().mean().item() - agree) < 0.03
    # both seed words matter, and batch_base selects the rows of a larger batch
    for other in (124, 123 + (1 << 32)):
        assert (R.attention_dropout_keep(4, 8, 64, 96, p, seed=other) != keep).float().mean() > 0.3
    assert torch.equal(R.attention_dropout_keep(2, 8, 64, 96, p, seed=123, batch_base=2), keep[2:])
    words = torch.tensor(llmkern.reference.lora.seed_words(123), dtype=torch.int32)
    assert torch.equal(R.attention_dropout_keep(4, 8, 64, 96, p, seed=words), keep)


@pytest.mark.parametrize("causal,Hk,Tq,Tk", [(False, 2, 9, 9), (True, 1, 5, 12), (True, 2, 12, 12)])
def test_reference_equals_weights_dropped_by_hand(causal, Hk, Tq, Tk):
    q, k, v = _qkv(2, 4, Hk, Tq, Tk, 8, torch.float64)
    got = R.attention(q, k, v, causal=causal, scale=0.4, dropout_p=0.25, seed=99)
    torch.testing.assert_close(got, _by_hand(q, k, v, 0.25, 99, causal, 0.4))
    # and the public op's default CPU path is that reference
    out = llmkern.attention(q, k, v, causal=causal, scale=0.4, dropout_p=0.25, seed=99)
    torch.testing.assert_close(out, got)


# ---- the kernels (interpreter on CPU) ---------------------------------------------------------------

CASES = [
    dict(B=2, H=4, Hk=2, Tq=37, Tk=45, D=24, kw=dict(causal=True)),
    dict(B=1, H=2, Hk=2, Tq=33, Tk=33, D=16, kw=dict(window=(5, 3), softcap=5.0)),
    dict(B=2, H=2, Hk=1, Tq=20, Tk=29, D=16, kw=dict(causal=True), kpm=True),
]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=["causal-gqa", "window-softcap", "padding"])
def test_kernels_equal_the_reference(triton_backend, case):
    c = case
    q, k, v = _qkv(c["B"], c["H"], c["Hk"], c["Tq"], c["Tk"], c["D"], device=DEV)
    kw = dict(c["kw"], dropout_p=0.3, seed=2024)
    if c.get("kpm"):
        kpm = torch.rand(c["B"], c["Tk"], generator=torch.Generator().manual_seed(5)) > 0.3
        kpm[:, -1] = True
        kw["key_padding_mask"] = kpm.to(DEV)
    out, lse = llmkern.attention(q, k, v, return_lse=True, **kw)
    ro, rl = R.attention_float64(q, k, v, return_lse=True, **kw)
    torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), rl, atol=2e-5, rtol=1e-4)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    want = torch.autograd.grad((ro * dout.double()).sum() + (rl * dlse.double()).sum(), (q, k, v))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w.double(), atol=5e-5, rtol=1e-4)
    # the mask really acts: without dropout the output differs
    assert (llmkern.attention(q, k, v, **c["kw"], key_padding_mask=kw.get("key_padding_mask")) - out).abs().max() > 0.1


@needs_triton
def test_kernels_fp16(triton_backend):
    q, k, v = _qkv(1, 2, 1, 40, 40, 32, torch.float16, device=DEV)
    out = llmkern.attention(q, k, v, causal=True, dropout_p=0.2, seed=7)
    ro = R.attention_float64(q, k, v, causal=True, dropout_p=0.2, seed=7)
    torch.testing.assert_close(out.double(), ro, atol=2e-3, rtol=2e-3)
    dq, dk, dv = torch.autograd.grad(out.float().sum(), (q, k, v))
    wq, wk, wv = torch.autograd.grad(ro.sum(), (q, k, v))
    for g, w in ((dq, wq), (dk, wk), (dv, wv)):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-2, rtol=1e-2)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_varlen_equals_the_padded_batch(monkeypatch, backend):
    """Sequence b of a packed batch takes batch row b's mask: equal lengths give the dense result."""
    monkeypatch.setenv("LLMKERN_BACKEND", backend)
    B, H, T, D = 3, 2, 13, 16
    q, k, v = _qkv(B, H, H, T, T, D, device=DEV)
    dense = llmkern.attention(q, k, v, causal=True, dropout_p=0.4, seed=11)
    pack = lambda t: t.transpose(1, 2).reshape(B * T, H, D)  # noqa: E731
    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=DEV)
    packed = llmkern.attention_varlen(pack(q), pack(k), pack(v), cu, cu, causal=True, dropout_p=0.4, seed=11)
    torch.testing.assert_close(packed, pack(dense), atol=1e-5, rtol=1e-5)


@needs_triton
def test_grid_slices_keep_each_rows_mask(monkeypatch):
    """Batches beyond the grid limit run in slices: each slice must still use its global batch rows."""
    from llmkern.kernels import attention as A

    B, H, T, D = 4, 2, 11, 16
    q, k, v = (t.detach() for t in _qkv(B, H, H, T, T, D))
    dout = torch.randn(B, H, T, D)
    seed = torch.tensor([3, 4], dtype=torch.int32)
    kw = dict(scale=0.25, causal=True, dropout_p=0.5, seed=seed)

    def run():
        o, lse = A.attention_forward(q, k, v, **kw)
        return (o, lse) + A.attention_backward(dout, q, k, v, o, lse, **kw)

    whole = run()
    monkeypatch.setattr(A, "MAX_GRID_YZ", 3)  # one batch row per launch
    sliced = run()
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "default"])
def test_default_seed_is_reproducible_and_fresh(monkeypatch, backend):
    if backend == "triton":
        if DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    q, k, v = _qkv(1, 2, 2, 16, 16, 16, device=DEV or "cpu")
    torch.manual_seed(0)
    a = llmkern.attention(q, k, v, dropout_p=0.5)
    b = llmkern.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    c = llmkern.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert torch.equal(llmkern.attention(q, k, v, dropout_p=0.0), llmkern.attention(q, k, v))


def test_dropout_scales_kept_weights_so_the_mean_is_unbiased():
    """Averaged over many seeds the dropped output approaches the undropped one."""
    q, k, v = (t.detach() for t in _qkv(1, 1, 1, 4, 6, 8, torch.float64))
    want = llmkern.attention(q, k, v)
    n = 2000
    keeps = R.attention_dropout_keep(n, 1, 4, 6, 0.5, seed=77)  # n batch rows = n independent masks
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    mean = ((w * keeps / 0.5) @ v).mean(0, keepdim=True)
    assert (mean - want).abs().max() < 0.1 < (((w * keeps[:1] / 0.5) @ v) - want).abs().max()


# ---- registration, compile, errors -------------------------------------------------------------------

@needs_triton
def test_opcheck_with_dropout(triton_backend):
    q, k, v = _qkv(1, 2, 1, 20, 24, 16, device=DEV)
    seed = torch.tensor([5, 6], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default,
                          (q, k, v, None, None, None, seed, -1, -1, 0.25, True, -1, -1, 0.0, 0.3))


@needs_triton
def test_torch_compile_fullgraph_with_dropout(triton_backend):
    torch._dynamo.reset()
    q, k, v = _qkv(1, 2, 1, 24, 24, 16, device=DEV)

    def f(a, b, c):
        return llmkern.attention(a, b, c, causal=True, dropout_p=0.3, seed=1234)

    got = torch.compile(f, fullgraph=True)(q, k, v)
    g = torch.autograd.grad(got.sum(), (q, k, v))
    want = f(q, k, v)
    w = torch.autograd.grad(want.sum(), (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b)


def test_compiled_reference_path_keeps_the_dropout_mask_opaque(monkeypatch):
    """Regression: on the reference path (CPU default, float64) the dropout mask's hash was traced inline,
    and Inductor's lowering of it from the seed tensor ran for minutes (torch.compile of
    llmkern.attention(..., dropout_p=0.1) on CPU never finished in practice). The mask is one custom op
    in the graph now; the compiled call equals eager, sinks included."""
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    q, k, v = _qkv(1, 2, 1, 12, 12, 16, device="cpu")
    sinks = torch.randn(2)

    def f(a, b, c):
        return llmkern.attention(a, b, c, causal=True, dropout_p=0.3, seed=1234, sinks=sinks)

    torch.testing.assert_close(torch.compile(f, backend=record, fullgraph=True)(q, k, v), f(q, k, v),
                               rtol=0, atol=0)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.llmkern.attention_dropout_keep.default in targets, targets
    assert len(targets) < 100, len(targets)
    seed = torch.tensor([5, 6], dtype=torch.int32)
    torch.library.opcheck(torch.ops.llmkern.attention_dropout_keep.default, (seed, 2, 3, 4, 5, 0.3, 1))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
    (dict(dropout_p=float("nan")), ValueError, "dropout_p must be in"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    (dict(dropout_p=True), TypeError, "dropout_p must be a float"),
    (dict(dropout_p=0.1, seed=1.5), TypeError, "seed must be an int"),
    (dict(dropout_p=0.1, seed=torch.tensor([1.0, 2.0])), ValueError, "seed must be an int"),
    (dict(dropout_p=0.1, seed=torch.tensor([1, 2, 3])), ValueError, "seed must be an int"),
])
def test_bad_dropout_arguments(kw, exc, match):
    q, k, v = _qkv(1, 1, 1, 4, 4, 8)
    with pytest.raises(exc, match=match):
        llmkern.attention(q, k, v, **kw)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(exc, match=match):
        llmkern.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, **kw)


@pytest.mark.gpu
def test_gpu_dropout_vs_reference():
    q, k, v = _qkv(2, 8, 2, 300, 333, 128, torch.bfloat16, device="cuda")
    out = llmkern.attention(q, k, v, causal=True, dropout_p=0.1, seed=42)
    ro = R.attention_float64(q, k, v, causal=True, dropout_p=0.1, seed=42)
    assert ((out.double() - ro).norm() / ro.norm()).item() < 1e-2
    g = torch.autograd.grad(out.float().sum(), (q, k, v))
    w = torch.autograd.grad(ro.sum(), (q, k, v))
    for a, b in zip(g, w):
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-2


def test_zoo_model_trains_with_llmkern_attention_dropout(monkeypatch):
    """A zoo model with dropout > 0 runs attention dropout in llmkern.attention in train() (no fallback
    to SDPA) and none in eval(), where it equals the torch backend."""
    from llmkern.models import GPT, get_config
    from llmkern.ops import attention as ops_attention

    cfg = get_config("gpt-tiny").replace(dropout=0.3)
    torch.manual_seed(0)
    model = GPT(cfg, backend="llmkern")
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    seen, real = [], ops_attention.attention
    monkeypatch.setattr(ops_attention, "attention", lambda *a, **kw: seen.append(kw.get("dropout_p", 0.0)) or real(*a, **kw))
    model.eval()
    want = GPT(cfg, backend="torch").eval()
    want.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids), want(ids), atol=1e-5, rtol=1e-5)
    assert seen and set(seen) == {0.0}
    model.train()
    seen.clear()
    torch.manual_seed(1)
    a = model(ids)
    torch.manual_seed(1)
    b = model(ids)
    assert set(seen) == {0.3} and torch.equal(a, b)


def test_flags_and_seed_are_checked_without_dropout_too():
    """A truthy non-bool return_lse / num_splits, or a malformed seed with dropout_p=0, is a caller bug:
    each raises instead of being read loosely."""
    q, k, v = _qkv(1, 1, 1, 4, 4, 8)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        llmkern.attention(q, k, v, return_lse=1)
    with pytest.raises(TypeError, match="seed must be an int"):
        llmkern.attention(q, k, v, seed="1")
    with pytest.raises(ValueError, match="seed must be an int"):
        llmkern.attention(q, k, v, seed=torch.tensor([1.0, 2.0]))
    kc = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="num_splits"):
        llmkern.attention_with_kvcache(q[:, :, :1].detach(), kc, kc.clone(), 4, num_splits=True)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        llmkern.attention_with_kvcache(q[:, :, :1].detach(), kc, kc.clone(), 4, return_lse=None)
