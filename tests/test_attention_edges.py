"""Edges of attention_segments (transformers' packed rows): bad arguments raise errors that name them, an empty
batch returns an empty output, the compiled path reads the runs' bounds from the device once per training step, and
torch.autocast gives the traced path the eager path's dtypes.
"""
import functools

import pytest
import torch

import llmkern.ops.attention as A
from llmkern.testing import triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _qkv(B=2, H=4, Hk=2, T=5, D=8, Dv=8):
    return torch.randn(B, H, T, D), torch.randn(B, Hk, T, D), torch.randn(B, Hk, T, Dv)


_IDS = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])


@pytest.mark.parametrize("case,match", [
    ("q 3-d", "q must have shape"),
    ("k batch", "k must have q's batch size"),
    ("k length", "as many keys"),
    ("v length", "v must have the shape of k"),
    ("heads", "must divide the number of q heads"),
    ("seq_ids shape", "seq_ids must be"),
    ("seq_ids list", "seq_ids"),
    ("causal int", "causal must be a bool"),
    ("sinks shape", "sinks must have shape"),
])
def test_attention_segments_bad_arguments_name_them(case, match):
    """attention_segments validated nothing but seq_ids' shape: a k of another batch size or a v of another length
    failed inside a reshape ("shape '[10, 2, 8]' is invalid for input of size 80"), a 3-d q with "not enough values
    to unpack"."""
    q, k, v = _qkv()
    ids, kw = _IDS, {}
    if case == "q 3-d":
        q = q[0]
    elif case == "k batch":
        k, v = k[:1], v[:1]
    elif case == "k length":
        k, v = k[:, :, :3], v[:, :, :3]
    elif case == "v length":
        v = v[:, :, :3]
    elif case == "heads":
        q = torch.randn(2, 3, 5, 8)
    elif case == "seq_ids shape":
        ids = ids[:, :4]
    elif case == "seq_ids list":
        ids = ids.tolist()
    elif case == "causal int":
        kw["causal"] = 1
    elif case == "sinks shape":
        kw["sinks"] = torch.zeros(2)
    with pytest.raises((ValueError, TypeError), match=match):
        A.attention_segments(q, k, v, ids, **kw)


@pytest.mark.parametrize("B,T", [(0, 5), (2, 0)])
def test_attention_segments_empty_batch(B, T):
    """No token at all: an empty output (it raised about cu_seqlens_q, an argument the caller never passed)."""
    q, k, v = _qkv(B=B, T=T, Dv=6)
    out = A.attention_segments(q, k, v, torch.zeros(B, T, dtype=torch.long), causal=True)
    assert out.shape == (B, T, 4, 6)


@needs_triton
def test_attention_segments_reads_the_bounds_once_per_step(monkeypatch, triton_backend):
    """The custom ops behind a compiled attention_segments read the runs' bounds on the host (a device sync on
    CUDA): the forward did, and the backward read them again. The forward now hands them to the backward.
    Gradients as attention_varlen's over the same runs."""
    reads = []
    real = A._segment_starts
    monkeypatch.setattr(A, "_segment_starts", lambda ids: reads.append(1) or real(ids))
    torch.manual_seed(0)
    q, k, v = (t.to(DEV).requires_grad_() for t in _qkv())
    sinks = torch.randn(4, device=DEV, requires_grad=True)
    flat = [t.transpose(1, 2).reshape(10, t.shape[1], t.shape[3]) for t in (q, k, v)]
    out = A._segments_fwd_op(*flat, _IDS.to(DEV), None, 0.3, True, -1, -1, 0.0, 0.0, sinks)[0]
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, sinks), dout)
    assert len(reads) == 1
    cu = torch.tensor([0, 2, 5, 6, 8, 10], dtype=torch.int32, device=DEV)
    want_out = A.attention_varlen(*flat, cu, cu, causal=True, scale=0.3, sinks=sinks)
    want = torch.autograd.grad(want_out, (q, k, v, sinks), dout)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_attention_segments_under_autocast(monkeypatch):
    """Under torch.autocast attention_segments runs as the other attention functions do (q, k, v in the autocast
    dtype, so mixed input dtypes are fine): the eager path did (through attention_varlen), the traced one did not
    (float32 inputs gave a float32 output there, a bfloat16 one in eager mode)."""
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    q, k, v = _qkv()
    fn = functools.partial(A.attention_segments, causal=True)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = fn(q, k.bfloat16(), v, _IDS)
        traced = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, _IDS)
    torch._dynamo.reset()
    assert eager.dtype == traced.dtype == torch.bfloat16
    torch.testing.assert_close(traced, eager)


def test_decode_route_counts_trainable_sinks(triton_backend):
    """llmkern.attention took the backward-less decode kernel for a few queries whenever q, k and v needed no
    gradient, trainable sinks (gpt-oss's) left out: their backward then failed ("no autograd formula"). Sinks that
    require grad now send the call to the forward kernel, whose backward gives them their gradient."""
    from llmkern.reference import attention as ref

    torch.manual_seed(0)
    q, k, v = (t.to(DEV) for t in _qkv(B=1, T=6))
    q = q[:, :, -1:]  # one query: the decode route's shape
    sinks = torch.randn(4, device=DEV, requires_grad=True)
    A.attention(q, k, v, causal=True, sinks=sinks).square().sum().backward()
    s2 = sinks.detach().clone().requires_grad_()
    ref.attention(q, k, v, causal=True, sinks=s2).square().sum().backward()
    torch.testing.assert_close(sinks.grad, s2.grad, atol=1e-5, rtol=1e-4)
