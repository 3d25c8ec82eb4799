"""Regressions found reviewing the KV-cache decode side (attention_with_kvcache, mla_decode, merge_attention_states):
each case failed before its fix."""
import pytest
import torch

import llmkern
import llmkern.ops.attention  # noqa: F401  (registers llmkern::attention_decode)
import llmkern.ops.mla_decode  # noqa: F401  (registers llmkern::mla_decode)
from llmkern.testing import triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("op", ["attention_decode", "mla_decode"])
def test_grid_slices_keep_the_fakes_output_layout(monkeypatch, op):
    """Batches past the grid limit run in slices. The sliced launcher used to torch.cat the slices' outputs: a
    contiguous tensor, where the fake (and an unsliced launch) gives q's memory order (a [B, T, H, D] q seen as
    [B, H, T, D]) or a Dv-wide output in that order, so torch.compile saw strides the op did not return
    (opcheck: 'Stride mismatch')."""
    from llmkern.kernels import attention as A

    monkeypatch.setattr(A, "MAX_GRID_YZ", 2)  # Hk = 2: one batch row per launch
    B, H, Hk, Tq, D, T = 3, 4, 2, 2, 8, 12
    q = torch.randn(B, Tq, H, D, device=DEV).transpose(1, 2)  # transformers' layout
    lens = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEV)
    if op == "attention_decode":
        kc, vc = torch.randn(B, Hk, T, D, device=DEV), torch.randn(B, Hk, T, 4, device=DEV)
        args = (q, kc, vc, lens, None, 0.3, True, -1, -1, 0.0, 2)
    else:
        args = (q, torch.randn(B, Hk, T, D, device=DEV), lens, None, None, 4, 0.3, True, 2)
    torch.library.opcheck(getattr(torch.ops.llmkern, op).default, args)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_sinks_raise_a_value_error(dtype):
    """A float8 sinks tensor used to fail inside the value check with NotImplementedError ('isposinf_cpu' not
    implemented for 'Float8_e4m3fn'), not a ValueError naming the argument."""
    q, kc, vc = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="sinks must be a floating-point"):
        llmkern.attention_with_kvcache(q, kc, vc, 3, sinks=torch.zeros(2).to(dtype))


def test_bool_kv_scale_message_names_what_is_expected():
    """k_scale=True used to raise 'k_scale must be a torch.Tensor', though a float is what it usually is."""
    q = torch.randn(1, 2, 1, 8)
    kc, vc = llmkern.quantize_kv(torch.randn(1, 2, 4, 8)), llmkern.quantize_kv(torch.randn(1, 2, 4, 8))
    with pytest.raises(TypeError, match="k_scale must be a positive float or a float tensor"):
        llmkern.attention_with_kvcache(q, kc, vc, 3, k_scale=True)


def test_writable_cache_check_skips_the_overlap_test_for_contiguous_caches(monkeypatch):
    """attention_with_kvcache checks per call that the caches can be written in place (the decoding hot path: per step
    per layer). The overlap test (torch._debug_has_internal_overlap) ran for both caches on every call; a contiguous
    cache cannot overlap, so it now runs for strided caches only. A cache that became unwritable in place since a
    previous call (requires_grad_(), as_strided_(), `.data =` an expanded tensor: the same object) is still refused,
    with the same messages."""
    calls = []
    real = torch._debug_has_internal_overlap

    def counting(t):
        calls.append(tuple(t.stride()))
        return real(t)

    monkeypatch.setattr(torch, "_debug_has_internal_overlap", counting)
    AK = llmkern.attention_with_kvcache
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    kc, vc = torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8)
    for step in range(2):  # two decoding steps on the same contiguous caches
        AK(q, kc, vc, step, k=k, v=v)
    assert calls == []
    # a token-major cache (a valid strided layout) is still tested and accepted; an expand()ed one still refused
    AK(q, torch.zeros(1, 6, 2, 8).transpose(1, 2), vc, 2, k=k, v=v)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="k_cache is written in place.*must not share memory"):
        AK(q, torch.zeros(1, 1, 6, 8).expand(1, 2, 6, 8), vc, 2, k=k, v=v)
    # the same once-accepted objects, made unwritable in place, are refused on the next call
    kc.as_strided_((1, 2, 6, 8), (0, 0, 8, 1))
    with pytest.raises(ValueError, match="k_cache is written in place.*must not share memory"):
        AK(q, kc, vc, 2, k=k, v=v)
    kc2 = torch.zeros(1, 2, 6, 8)
    AK(q, kc2, vc, 3, k=k, v=v)
    kc2.data = torch.zeros(1, 1, 6, 8).expand(1, 2, 6, 8)  # (does not bump kc2._version)
    with pytest.raises(ValueError, match="k_cache is written in place.*must not share memory"):
        AK(q, kc2, vc, 3, k=k, v=v)
    vc.requires_grad_()
    with pytest.raises(ValueError, match="v_cache is written in place.*leaf tensor that requires grad"):
        AK(q, torch.zeros(1, 2, 6, 8), vc, 4, k=k, v=v)
