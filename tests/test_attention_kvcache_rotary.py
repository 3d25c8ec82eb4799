"""attention_with_kvcache(rotary_cos=, rotary_sin=): FlashAttention's flash_attn_with_kvcache rotary. The new keys
are rotated at cache_seqlens[b] + i before they are written, q at its own positions (causal / windowed) or at
cache_seqlens[b] (otherwise); the oracle rotates by hand (float64 cos / sin, rotate-half or interleaved pairs,
partial rotary) and calls the op without rotary."""
import pytest
import torch

import llmkern
from llmkern.testing import triton_device

DEV = triton_device()


def _rotate(x, cos, sin, pos, interleaved):
    """x [B, H, T, D] rotated at positions pos [B, T] by the [S, R/2] tables, float64, channels >= R kept."""
    R = 2 * cos.shape[1]
    c, s = cos.double()[pos][:, None], sin.double()[pos][:, None]  # [B, 1, T, R/2]
    x = x.double()
    r = x[..., :R]
    if interleaved:
        a, b = r[..., 0::2], r[..., 1::2]
        out = torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)
    else:
        a, b = r[..., :R // 2], r[..., R // 2:]
        out = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    return torch.cat([out, x[..., R:]], dim=-1)


@pytest.mark.parametrize("backend", ["default", "triton"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("R,causal,Tq", [(16, True, 3), (10, True, 1), (16, False, 2)])
def test_rotary_equals_rotating_by_hand(monkeypatch, backend, interleaved, R, causal, Tq):
    if backend == "triton":
        if DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    g = torch.Generator().manual_seed(0)
    B, H, Hk, D, Tmax = 2, 4, 2, 16, 32
    q = torch.randn(B, H, Tq, D, generator=g)
    k, v = torch.randn(B, Hk, Tq, D, generator=g), torch.randn(B, Hk, Tq, D, generator=g)
    kc0, vc0 = torch.randn(B, Hk, Tmax, D, generator=g), torch.randn(B, Hk, Tmax, D, generator=g)
    lens = torch.tensor([5, 20], dtype=torch.int32)
    freqs = torch.outer(torch.arange(40.0), 1.0 / 10000 ** (torch.arange(0, R, 2) / R))
    cos, sin = freqs.cos(), freqs.sin()
    kc, vc = kc0.clone(), vc0.clone()
    got = llmkern.attention_with_kvcache(q, kc, vc, lens, k=k, v=v, causal=causal, rotary_cos=cos, rotary_sin=sin,
                                         rotary_interleaved=interleaved)
    pos_k = lens.long()[:, None] + torch.arange(Tq)[None, :]
    pos_q = pos_k if causal else lens.long()[:, None].expand(B, Tq)
    kr = _rotate(k, cos, sin, pos_k, interleaved).float()
    qr = _rotate(q, cos, sin, pos_q, interleaved).float()
    kc_w, vc_w = kc0.clone(), vc0.clone()
    want = llmkern.attention_with_kvcache(qr, kc_w, vc_w, lens, k=kr, v=v, causal=causal)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc, kc_w, atol=1e-5, rtol=1e-5)  # the cache holds the rotated keys
    assert torch.equal(vc, vc_w)


def test_rotary_with_no_new_token_is_a_no_op():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 0, 8)
    kc = torch.randn(1, 2, 8, 8)
    cos = torch.ones(8, 4)
    torch.testing.assert_close(llmkern.attention_with_kvcache(q, kc, kc.clone(), 3, k=k, v=k, rotary_cos=cos,
                                                              rotary_sin=cos * 0),
                               llmkern.attention_with_kvcache(q, kc, kc.clone(), 3, k=k, v=k))


def test_rotary_errors():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    kc = torch.zeros(1, 2, 8, 8)
    cos = torch.ones(8, 4)
    with pytest.raises(ValueError, match="pass k and v"):
        llmkern.attention_with_kvcache(q, kc, kc.clone(), 3, rotary_cos=cos, rotary_sin=cos)
    with pytest.raises(ValueError, match="rotary_sin must be a float tensor"):
        llmkern.attention_with_kvcache(q, kc, kc.clone(), 3, k=k, v=k, rotary_cos=cos, rotary_sin=cos[:, :2])
    with pytest.raises(ValueError, match="rotary_dim / 2 = 5"):
        llmkern.attention_with_kvcache(q, kc, kc.clone(), 3, k=k, v=k, rotary_cos=torch.ones(8, 5),
                                       rotary_sin=torch.ones(8, 5))
    with pytest.raises(ValueError, match="the new keys reach 7"):
        llmkern.attention_with_kvcache(q, kc, kc.clone(), 7, k=k, v=k, rotary_cos=cos[:7], rotary_sin=cos[:7])


@pytest.mark.parametrize("backend", ["default", "triton"])
def test_cache_batch_idx_reads_and_appends_the_named_rows(monkeypatch, backend):
    """cache_batch_idx (FlashAttention's): batch row b uses row idx[b] of a larger dense cache, new tokens
    appended there; equal to the call on the gathered rows, the other rows untouched."""
    if backend == "triton":
        if DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    g = torch.Generator().manual_seed(1)
    N, B, H, Hk, D, Tmax, Tq = 5, 2, 4, 2, 16, 24, 2
    kc, vc = torch.randn(N, Hk, Tmax, D, generator=g), torch.randn(N, Hk, Tmax, D, generator=g)
    q, k, v = torch.randn(B, H, Tq, D, generator=g), torch.randn(B, Hk, Tq, D, generator=g), torch.randn(B, Hk, Tq, D,
                                                                                                         generator=g)
    idx, lens = torch.tensor([3, 1]), torch.tensor([7, 15], dtype=torch.int32)
    kpm = torch.ones(B, Tmax, dtype=torch.bool)
    kpm[1, :2] = False
    pool_k, pool_v = kc.clone(), vc.clone()
    got = llmkern.attention_with_kvcache(q, pool_k, pool_v, lens, k=k, v=v, cache_batch_idx=idx,
                                         key_padding_mask=kpm, softcap=5.0)
    rows_k, rows_v = kc[idx].clone(), vc[idx].clone()
    want = llmkern.attention_with_kvcache(q, rows_k, rows_v, lens, k=k, v=v, key_padding_mask=kpm, softcap=5.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(pool_k[idx], rows_k) and torch.equal(pool_v[idx], rows_v)
    others = torch.tensor([0, 2, 4])
    assert torch.equal(pool_k[others], kc[others]) and torch.equal(pool_v[others], vc[others])
    with pytest.raises(ValueError, match="cache_batch_idx must be an int32/int64 tensor"):
        llmkern.attention_with_kvcache(q, pool_k, pool_v, lens, cache_batch_idx=idx.float())
    for bad in (torch.tensor([5, 0]), torch.tensor([2**32 + 1, 0])):  # (the second wrapped to row 1 in int32)
        with pytest.raises(ValueError, match="cache_batch_idx entries must be rows of k_cache in 0..4"):
            llmkern.attention_with_kvcache(q, pool_k, pool_v, lens, cache_batch_idx=bad)
