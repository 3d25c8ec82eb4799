"""llmkern.attention for a few queries per row and no gradient (a decode step of a model whose KV cache is a plain
tensor, e.g. transformers' DynamicCache) runs the split-K decode kernel: the same outputs and LSE as the reference
for every feature the call takes (causal bottom-right, windows, padding masks, softcap, sinks, ALiBi, GQA, a value
head dim of its own, queries that see no key), under the Triton interpreter on CPU."""
import pytest
import torch

import llmkern
from llmkern.kernels import attention as KA, attention_decode as KD
from llmkern.testing import triton_device

DEV = triton_device()
pytestmark = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")

# (Tq, Tk, H, Hk, D, Dv, options)
CASES = [
    (1, 37, 4, 2, 16, 16, dict(causal=True)),
    (1, 70, 4, 1, 16, 8, dict(causal=True, return_lse=True)),
    (3, 37, 4, 2, 16, 16, dict(causal=True, window=(5, 0))),
    (2, 37, 2, 2, 16, 16, dict(causal=False, window=(3, 2), return_lse=True)),
    (1, 37, 4, 2, 16, 16, dict(causal=True, key_padding_mask="left")),
    (4, 33, 4, 2, 16, 16, dict(causal=True, softcap=5.0, return_lse=True)),
    (1, 37, 4, 2, 16, 16, dict(causal=True, sinks=True, return_lse=True)),
    (2, 37, 4, 2, 16, 16, dict(causal=True, alibi=True)),
    (5, 3, 4, 2, 16, 16, dict(causal=True, return_lse=True)),      # queries 0, 1 see no key: zeros, LSE -inf
    (1, 1, 4, 4, 16, 16, dict(causal=False)),
    (16, 40, 2, 1, 32, 32, dict(causal=True, key_padding_mask="left", window=(7, 0))),
]


def _inputs(Tq, Tk, H, Hk, D, Dv, opts, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hk, Tk, D, generator=g)
    v = torch.randn(B, Hk, Tk, Dv, generator=g)
    kw = {n: opts[n] for n in ("causal", "window", "softcap", "return_lse") if n in opts}
    if opts.get("key_padding_mask") == "left":
        kpm = torch.ones(B, Tk, dtype=torch.bool)
        kpm[0, :4] = False
        kpm[2, :Tk // 2] = False
        kw["key_padding_mask"] = kpm
    if opts.get("sinks"):
        kw["sinks"] = torch.randn(H, generator=g)
    if opts.get("alibi"):
        kw["alibi_slopes"] = torch.rand(B, H, generator=g)
    return (q, k, v), kw


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case", CASES, ids=[f"Tq{c[0]}-Tk{c[1]}-H{c[2]}/{c[3]}-" + "-".join(c[6]) for c in CASES])
def test_inference_calls_with_few_queries_run_the_decode_kernel(monkeypatch, case):
    *shape, opts = case
    (q, k, v), kw = _inputs(*shape, opts)
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    want = llmkern.attention(q, k, v, **kw)
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    decode, fwd = _spy(monkeypatch, KD, "attention_decode"), _spy(monkeypatch, KA, "attention_forward")
    kw_dev = {n: t.to(DEV) if torch.is_tensor(t) else t for n, t in kw.items()}
    with torch.no_grad():
        got = llmkern.attention(q.to(DEV), k.to(DEV), v.to(DEV), **kw_dev)
    assert decode == [1] and fwd == []
    for a, b in zip(got if kw.get("return_lse") else [got], want if kw.get("return_lse") else [want]):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-4, atol=2e-4)


def test_calls_that_need_gradients_or_many_queries_keep_the_forward_kernel(monkeypatch):
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    (q, k, v), kw = _inputs(1, 37, 4, 2, 16, 16, dict(causal=True))
    q, k, v = (t.to(DEV) for t in (q, k, v))
    decode, fwd = _spy(monkeypatch, KD, "attention_decode"), _spy(monkeypatch, KA, "attention_forward")
    qg = q.clone().requires_grad_()
    llmkern.attention(qg, k, v, **kw).sum().backward()       # a gradient wanted: the forward kernel
    assert qg.grad is not None and decode == [] and fwd == [1]
    (q17, _, _), _ = _inputs(17, 37, 4, 2, 16, 16, {})
    with torch.no_grad():
        llmkern.attention(q17.to(DEV), k, v, causal=True)    # 17 queries: past LLMKERN_ATTN_DECODE_MAX_TQ
        llmkern.attention(q, k, v, causal=True, dropout_p=0.1)  # dropout: the forward kernel's mask
        monkeypatch.setenv("LLMKERN_ATTN_DECODE_MAX_TQ", "0")
        llmkern.attention(q, k, v, causal=True)
    assert decode == [] and fwd == [1, 1, 1, 1]


def test_export_with_a_dynamic_length_keeps_every_length(monkeypatch):
    """torch.export of a zoo forward with a dynamic sequence length: the decode route's comparison of the query
    count with LLMKERN_ATTN_DECODE_MAX_TQ specialised the graph to 2..16 tokens (a constraint violation); a symbolic
    count now takes the forward kernel, so one program serves every length up to block_size, as eager's logits."""
    from llmkern.models import build

    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    torch.manual_seed(0)
    m = build("gpt-tiny", backend="llmkern", vocab_size=128, n_layer=1).eval()
    T = torch.export.Dim("T", max=64)
    prog = torch.export.export(m, (torch.randint(0, 128, (2, 12)),), dynamic_shapes={"input_ids": {1: T}})
    for n in (3, 20):
        ids = torch.randint(0, 128, (2, n))
        with torch.no_grad():
            torch.testing.assert_close(prog.module()(ids), m(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("Tq", [1, 4])
def test_gpu_decode_route_matches_the_forward_kernel(monkeypatch, Tq):
    """bf16, GQA 32/8, 4k keys with left padding: the decode route against the forward kernel."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 32, Tq, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    kpm = torch.ones(2, 4096, dtype=torch.bool, device="cuda")
    kpm[1, :1000] = False
    with torch.no_grad():
        got, lse = llmkern.attention(q, k, v, causal=True, key_padding_mask=kpm, return_lse=True)
        monkeypatch.setenv("LLMKERN_ATTN_DECODE_MAX_TQ", "0")
        want, want_lse = llmkern.attention(q, k, v, causal=True, key_padding_mask=kpm, return_lse=True)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, want_lse, rtol=1e-3, atol=1e-3)


def test_eager_decode_calls_skip_the_custom_op_dispatch(monkeypatch):
    """attention_with_kvcache and the decode route run the decode implementation directly in eager mode (the
    custom op's dispatch: 16 -> 8 µs of host time per call on the 2-core CPU, per layer and decode step); a call whose
    inputs require grad, and traced calls, keep the op."""
    import llmkern.ops.attention as ops_attention

    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    (q, k, v), _ = _inputs(1, 37, 4, 2, 16, 16, {})
    q, k, v = (t.to(DEV) for t in (q, k, v))
    lens = torch.full((3,), 37, dtype=torch.int32, device=DEV)
    op_calls = _spy(monkeypatch, ops_attention, "_attention_decode_op")
    with torch.no_grad():
        a = llmkern.attention(q, k, v, causal=True)
        b = llmkern.attention_with_kvcache(q, k, v, lens)
    assert op_calls == []
    torch.testing.assert_close(a, b)
    compiled = torch.compile(lambda q, k, v: llmkern.attention(q, k, v, causal=True), backend="eager",
                             fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), a)
    assert op_calls  # traced: the custom op


def test_eager_mla_decode_and_merge_skip_the_custom_op_dispatch(monkeypatch):
    import llmkern.ops.merge_attention_states as ops_merge
    import llmkern.ops.mla_decode as ops_mla

    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(2, 4, 1, 40, generator=g).to(DEV), torch.randn(2, 1, 30, 40, generator=g).to(DEV)
    lens = torch.tensor([30, 7], dtype=torch.int32, device=DEV)
    mla_calls, merge_calls = _spy(monkeypatch, ops_mla, "_mla_decode_op"), _spy(monkeypatch, ops_merge, "_merge_op")
    with torch.no_grad():
        out, lse = llmkern.mla_decode(q, kv, lens, head_dim_v=32, return_lse=True)
        merged, _ = llmkern.merge_attention_states(out, lse, out, lse)
    assert mla_calls == [] and merge_calls == []
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    torch.testing.assert_close(merged.cpu(), llmkern.mla_decode(q.cpu(), kv.cpu(), lens.cpu(), head_dim_v=32),
                               rtol=2e-4, atol=2e-4)
