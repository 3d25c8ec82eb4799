"""llmkern.merge_attention_states: the attention state over two disjoint key sets from each set's (out, lse).

Checked on the default path (the differentiable reference) and on the Triton kernel (interpreter on CPU):
- against a float64 formula written here, for random states, sides with LSE -inf (one or both: zeros, -inf),
  large LSE gaps, leading shapes of any rank, odd and power-of-two head dims, float16 / float32;
- cascade decoding: attention over [prefix | suffix] keys equals the merge of attention over the shared prefix
  (one cache row for the whole batch) and over each row's suffix (attention_with_kvcache / attention with
  return_lse), and a split of mla_decode's keys merges back to one call;
- gradients of all four inputs (reference path) against torch.autograd on the float64 formula;
- strided inputs, errors naming the argument, opcheck, torch.compile(fullgraph=True).
"""
import pytest
import torch

import llmkern
from llmkern.ops.merge_attention_states import merge_attention_states
from llmkern.testing import triton_device

DEV = triton_device()
BACKENDS = ["default", "triton"]


@pytest.fixture
def backend(request, monkeypatch):
    if request.param == "triton":
        if DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    return request.param


def _formula(oa, la, ob, lb):
    """float64: softmax weights of the two sides from their LSEs; both -inf -> zeros and -inf."""
    oa, la, ob, lb = (t.double() for t in (oa, la, ob, lb))
    lse = torch.logaddexp(la, lb)
    empty = torch.isneginf(lse)
    safe = torch.where(empty, torch.zeros_like(lse), lse)
    wa, wb = torch.exp(la - safe), torch.exp(lb - safe)
    out = oa * wa[..., None] + ob * wb[..., None]
    return torch.where(empty[..., None], torch.zeros_like(out), out), lse


def _states(shape, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    oa, ob = (torch.randn(*shape, D, generator=g).to(dtype) for _ in range(2))
    la, lb = (torch.randn(*shape, generator=g) * 4 for _ in range(2))
    return oa, la, ob, lb


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,D", [((2, 3, 5), 64), ((7,), 80), ((2, 4, 1), 512), ((3, 2), 1)])
def test_vs_float64_formula(backend, dtype, tol, shape, D):
    oa, la, ob, lb = _states(shape, D, dtype)
    flat_a, flat_b = la.view(-1), lb.view(-1)
    flat_a[0], flat_b[-1] = float("-inf"), float("-inf")  # one side empty
    if flat_a.numel() > 2:
        flat_a[1] = flat_b[1] = float("-inf")  # both empty
        flat_a[2], flat_b[2] = 80.0, -80.0    # a gap exp() of which underflows in float32
    out, lse = merge_attention_states(oa, la, ob, lb)
    want, want_lse = _formula(oa, la, ob, lb)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == oa.shape and lse.shape == la.shape
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.double()[fin], want_lse[fin], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_cascade_decoding_equals_attention_over_all_keys(backend):
    """Four rows share a 40-token prompt and each has its own 0..9-token suffix: attending to the prompt once
    for the whole batch (one K/V row; the rows' queries as its query positions, non-causal: FlashInfer's cascade)
    and to each row's suffix, then merging, equals attention over each row's concatenated keys."""
    g = torch.Generator().manual_seed(3)
    B, H, Hk, P, D = 4, 4, 2, 40, 32
    suffix = torch.tensor([0, 3, 9, 5], dtype=torch.int32)
    q = torch.randn(B, H, 1, D, generator=g)
    pk, pv = torch.randn(1, Hk, P, D, generator=g), torch.randn(1, Hk, P, D, generator=g)
    sk, sv = torch.randn(B, Hk, 12, D, generator=g), torch.randn(B, Hk, 12, D, generator=g)
    o_p, l_p = llmkern.attention(q.transpose(0, 2), pk, pv, return_lse=True)  # [1, H, B, D]: one prefix read
    o_p, l_p = o_p.transpose(0, 2), l_p.transpose(0, 2)  # [B, H, 1, D], [B, H, 1]
    o_s, l_s = llmkern.attention_with_kvcache(q, sk, sv, suffix, causal=False, return_lse=True)
    out, lse = merge_attention_states(o_p, l_p, o_s, l_s)
    for b in range(B):
        n = int(suffix[b])
        k = torch.cat([pk[0], sk[b, :, :n]], dim=1)[None]
        v = torch.cat([pv[0], sv[b, :, :n]], dim=1)[None]
        want, want_lse = llmkern.attention(q[b:b + 1], k, v, return_lse=True)
        torch.testing.assert_close(out[b:b + 1], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[b:b + 1], want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_split_mla_decode_merges_back(backend):
    """A latent cache split into two key ranges (as two machines or two pools would hold it): mla_decode over
    each half (non-causal, each row's own length), merged, equals one call over the whole cache."""
    g = torch.Generator().manual_seed(5)
    q, kv = torch.randn(2, 4, 1, 48, generator=g), torch.randn(2, 1, 64, 48, generator=g)
    lens = torch.tensor([64, 41], dtype=torch.int32)
    want, want_lse = llmkern.mla_decode(q, kv, lens, head_dim_v=32, causal=False, return_lse=True)
    cut = 30
    a = llmkern.mla_decode(q, kv[:, :, :cut], torch.clamp(lens, max=cut), head_dim_v=32, causal=False,
                           return_lse=True)
    b = llmkern.mla_decode(q, kv[:, :, cut:].contiguous(), lens - cut, head_dim_v=32, causal=False, return_lse=True)
    out, lse = merge_attention_states(*a, *b)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_gradients_of_all_four_inputs():
    oa, la, ob, lb = (t.double().requires_grad_() for t in _states((3, 5), 16, seed=2))
    with torch.no_grad():
        la[0] = float("-inf")  # an empty side: no gradient through its weight, finite everywhere
    out, lse = merge_attention_states(oa, la, ob, lb)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (oa, la, ob, lb))
    leaves = [t.detach().clone().requires_grad_() for t in (oa, la, ob, lb)]
    w_out, w_lse = _formula(*leaves)
    want = torch.autograd.grad((w_out * g_out).sum() + (w_lse * g_lse).sum(), leaves)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    torch.autograd.gradcheck(lambda *t: merge_attention_states(*t), tuple(x.detach()[1:].requires_grad_()
                                                                            for x in (oa, la, ob, lb)))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_strided_inputs(backend):
    """out in [B, T, H, D] memory seen as [B, H, T, D] (the attention ops' outputs with Dv != D are so), lse a
    transposed view."""
    oa, la, ob, lb = _states((2, 5, 3), 24)
    out, lse = merge_attention_states(oa.transpose(1, 2), la.transpose(1, 2), ob.transpose(1, 2), lb.transpose(1, 2))
    want, want_lse = _formula(oa, la, ob, lb)
    torch.testing.assert_close(out.double(), want.transpose(1, 2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), want_lse.transpose(1, 2), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty(backend):
    oa, la, ob, lb = _states((0, 4), 8)
    out, lse = merge_attention_states(oa, la, ob, lb)
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)


def test_errors_name_the_argument():
    oa, la, ob, lb = _states((2, 3), 8)
    cases = [((oa, la, ob.half(), lb), "out_b"), ((oa, la, ob[:1], lb), "out_b"), ((oa, la[:1], ob, lb), "lse_a"),
             ((oa, la, ob, lb.unsqueeze(-1)), "lse_b"), ((oa.long(), la, ob.long(), lb), "out_a"),
             ((oa, la.long(), ob, lb), "lse_a"), ((oa, la, ob, [0.0]), "lse_b")]
    for args, name in cases:
        with pytest.raises((ValueError, TypeError), match=name):
            merge_attention_states(*args)


def test_opcheck_and_compile(monkeypatch):
    if DEV is None:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    oa, la, ob, lb = _states((2, 3), 40)
    torch.library.opcheck(torch.ops.llmkern.merge_attention_states.default, (oa, la, ob, lb))
    torch._dynamo.reset()
    got = torch.compile(lambda *t: merge_attention_states(*t), fullgraph=True)(oa, la, ob, lb)
    want = _formula(oa, la, ob, lb)
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_zero_head_dim(backend):
    oa, la, ob, lb = _states((3,), 0)
    out, lse = merge_attention_states(oa, la, ob, lb)
    assert out.shape == (3, 0)
    torch.testing.assert_close(lse.double(), _formula(oa, la, ob, lb)[1])
