"""Decode attention over a multi-head latent (MLA) KV cache: public API, validation, registration, dispatch.

    mla_decode(q, kv_cache, cache_seqlens, *, head_dim_v, causal, scale, block_table, key_padding_mask,
               num_splits, return_lse, kpe_cache)

DeepSeek-V2/V3 serving with kv_b_proj absorbed (FlashMLA's and FlashInfer's MLA decode): the cache holds one
row [c | k_pe] per token (D = kv_lora_rank + rope channels), the keys are those rows and the values their
first head_dim_v channels. Kernel: llmkern/kernels/mla_decode.py (each latent tile read once for the scores
and for P V, head dims past the dense kernels' 256); reference: llmkern/reference/attention.py's
attention_with_kvcache with v the cache's first head_dim_v channels (grouped heads: no repeat of the cache
per query head). Off the kernel (CPU tensors, float64) it runs the reference's semantics as one product per
batch row and kv head, the query heads folded into query rows (LLMKERN_BACKEND=reference forces the reference).
The Triton path runs inside the custom op `llmkern::mla_decode` (torch.compile, opcheck).
Inference only (no autograd), as attention_with_kvcache.
"""
import numbers
from typing import Optional, Tuple

import torch

from llmkern import _backend
from llmkern.ops import _checks
from llmkern.ops.attention import (_KERNEL_DTYPES, _DTYPES, FP8_DTYPES, _check_block_table, _check_causal,
                                   _check_heads, _gather_pages, _int_lengths, _kernel_layout, _kv_scale, _scale,
                                   _splits, _tensor)
from llmkern.reference import attention as ref

MAX_HEAD_DIM_V = 512   # the latent (DeepSeek: kv_lora_rank 512)
MAX_ROPE_DIM = 256     # the channels after it (DeepSeek: 64)

_backend.register_op("mla_decode", lambda device, dtype: _backend.choose_triton("mla_decode", device, dtype,
                                                                                _KERNEL_DTYPES))


def _mla_impl(q, kv_cache, cache_seqlens, block_table, key_padding_mask, head_dim_v, scale, causal, num_splits,
              kpe_cache=None, kv_scale=None):
    """llmkern::mla_decode's implementation: (out, lse) from the split-K kernel."""
    from llmkern.kernels.attention import empty_out

    if q.numel() == 0:  # (the kernel's output layout: q's when its last dim is contiguous, as the fake's)
        return empty_out(_kernel_layout(q), head_dim_v).zero_(), torch.full(q.shape[:3], float("-inf"),
                                                                            device=q.device, dtype=torch.float32)
    from llmkern.kernels.mla_decode import mla_decode as kernel

    return kernel(q, kv_cache, cache_seqlens, head_dim_v=head_dim_v, scale=scale, causal=causal,
                  num_splits=num_splits, block_table=block_table, key_padding_mask=key_padding_mask,
                  kpe_cache=kpe_cache, kv_scale=kv_scale)


@torch.library.custom_op("llmkern::mla_decode", mutates_args=())
def _mla_decode_op(q: torch.Tensor, kv_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                   block_table: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                   head_dim_v: int, scale: float, causal: bool, num_splits: int,
                   kpe_cache: Optional[torch.Tensor] = None,
                   kv_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    return _mla_impl(q, kv_cache, cache_seqlens, block_table, key_padding_mask, head_dim_v, scale, causal, num_splits,
                     kpe_cache, kv_scale)


@_mla_decode_op.register_fake
def _(q, kv_cache, cache_seqlens, block_table, key_padding_mask, head_dim_v, scale, causal, num_splits,
      kpe_cache=None, kv_scale=None):
    from llmkern.kernels.attention import empty_out

    return empty_out(_kernel_layout(q), head_dim_v), q.new_empty(q.shape[:3], dtype=torch.float32)


def _check_inputs(q, kv_cache, head_dim_v, block_table, kpe_cache=None):
    """Shapes, dtypes and devices of q and the cache(s); returns (B, H, Tq, D, Tmax)."""
    _tensor("q", q)
    _tensor("kv_cache", kv_cache)
    if q.dim() != 4 or kv_cache.dim() != 4:
        raise ValueError(f"q and kv_cache must be 4-D ([batch, heads, Tq, D] and [batch, kv_heads, Tmax, D], or a "
                         f"page pool [num_pages, kv_heads, page_size, D]), got {q.dim()}-D and {kv_cache.dim()}-D")
    if q.dtype not in _DTYPES or (kv_cache.dtype != q.dtype and kv_cache.dtype not in FP8_DTYPES):
        raise ValueError(f"q and kv_cache must share a floating dtype in {[str(d) for d in _DTYPES]} (kv_cache may "
                         f"also be float8_e4m3fn / float8_e5m2), got {q.dtype} and {kv_cache.dtype}")
    if kv_cache.device != q.device:
        raise ValueError(f"kv_cache is on {kv_cache.device} but q is on {q.device}")
    B, H, Tq, D = q.shape
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, numbers.Integral):
        raise TypeError(f"head_dim_v must be an int, got {type(head_dim_v).__name__}")
    if kpe_cache is not None:
        _check_kpe(kpe_cache, kv_cache, head_dim_v, D)
    elif kv_cache.shape[3] != D:
        raise ValueError(f"kv_cache's last dimension must be q's head dim {D}, got {kv_cache.shape[3]}")
    if not 1 <= head_dim_v <= min(D, MAX_HEAD_DIM_V) or D - head_dim_v > MAX_ROPE_DIM:
        raise ValueError(f"head_dim_v (the value channels, kv_cache's first ones) must be in "
                         f"1..{min(D, MAX_HEAD_DIM_V)} with at most {MAX_ROPE_DIM} channels after it (q's head dim is "
                         f"{D}), got {head_dim_v}")
    _check_heads(H, kv_cache.shape[1])
    if block_table is not None:
        return B, H, Tq, D, _check_block_table(block_table, B, kv_cache, q.device, "kv_cache")
    if kv_cache.shape[0] != B:
        raise ValueError(f"kv_cache must have q's batch size {B}, got {kv_cache.shape[0]}")
    return B, H, Tq, D, kv_cache.shape[2]


def _check_kpe(kpe_cache, kv_cache, head_dim_v, D):
    """kpe_cache: the rotary channels of the keys in their own tensor, kv_cache then holding the latent only."""
    _tensor("kpe_cache", kpe_cache)
    if kpe_cache.dim() != 4 or tuple(kpe_cache.shape[:3]) != tuple(kv_cache.shape[:3]):
        raise ValueError(f"kpe_cache must be 4-D with kv_cache's leading shape {tuple(kv_cache.shape[:3])}, got "
                         f"{tuple(kpe_cache.shape)}")
    if kpe_cache.dtype != kv_cache.dtype or kpe_cache.device != kv_cache.device:
        raise ValueError(f"kpe_cache must be {kv_cache.dtype} on {kv_cache.device} (as kv_cache), got "
                         f"{kpe_cache.dtype} on {kpe_cache.device}")
    if kv_cache.shape[3] != head_dim_v or head_dim_v + kpe_cache.shape[3] != D:
        raise ValueError(f"with kpe_cache, kv_cache's last dimension must be head_dim_v={head_dim_v} and "
                         f"head_dim_v + kpe_cache's last dimension q's head dim {D}; got kv_cache "
                         f"{tuple(kv_cache.shape)}, kpe_cache {tuple(kpe_cache.shape)}")


def _check_lengths(cache_seqlens, B, Tmax, device):
    cache_seqlens = _int_lengths(cache_seqlens, B, Tmax, device)
    _tensor("cache_seqlens", cache_seqlens)
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens must be an int32/int64 tensor of shape [{B}], "
                         f"got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {device}")
    if device.type == "cpu" and _checks.checking_values() and B > 0:
        if bool((cache_seqlens < 0).any()) or int(cache_seqlens.max()) > Tmax:
            raise ValueError(f"cache_seqlens must lie in 0..{Tmax} (the cache length), got {cache_seqlens.tolist()}")
    return cache_seqlens


def _check_kpm(key_padding_mask, B, Tmax, device):
    if key_padding_mask is None:
        return
    _tensor("key_padding_mask", key_padding_mask)
    if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, Tmax):
        raise ValueError(f"key_padding_mask must be a bool tensor [batch={B}, Tmax={Tmax}] (True = attend), got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {device}")


def _folded(q, kv_cache, lens, Dv, causal, scale, key_padding_mask):
    """The reference's semantics with each kv head's query heads folded into query rows: one [G * Tq, D] x
    [D, Tmax] product per (batch row, kv head) against the cache as it is (no copy per query head, as the
    kernel), in float32 (float64 for float64). SDPA's CPU kernel was 10-30x slower here: the values are a
    strided view of the keys. Returns (out [B, H, Tq, Dv] in q's dtype, lse [B, H, Tq])."""
    B, H, Tq, D = q.shape
    Hk, Tmax = kv_cache.shape[1], kv_cache.shape[2]
    G = H // Hk
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    if Tmax == 0:  # no key anywhere
        return q.new_zeros(B, H, Tq, Dv), torch.full((B, H, Tq), float("-inf"), dtype=cd, device=q.device)
    j = torch.arange(Tmax, device=q.device)
    lens = lens.to(torch.long)
    vis = (j[None, None, :] < lens[:, None, None]).expand(B, Tq, Tmax)  # [B, Tq, Tmax]
    if causal:
        pos = lens[:, None] - Tq + torch.arange(Tq, device=q.device)[None, :]  # [B, Tq]
        vis = vis & (j[None, None, :] <= pos[:, :, None])
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, :]
    vis = vis[:, None, None].expand(B, 1, G, Tq, Tmax).reshape(B, 1, G * Tq, Tmax)
    kv = kv_cache.to(cd)
    rows = q.reshape(B, Hk, G * Tq, D).to(cd)  # row g * Tq + t: query head hk * G + g, new token t
    s = torch.matmul(rows, kv.transpose(-1, -2)).mul_(scale).masked_fill_(~vis, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill(torch.isneginf(m), 0.0)  # a query that sees no key: p all zeros, a zero output, LSE -inf
    p = torch.exp(s.sub_(m))
    denom = p.sum(dim=-1, keepdim=True)
    vals = kv[..., :Dv]
    unseen = ~vis.any(dim=2)  # [B, 1, Tmax]: slots past the length or padded may hold anything (0 * NaN = NaN)
    if torch.compiler.is_compiling() or bool(unseen.any()):  # (traced: no data-dependent branch)
        vals = vals.masked_fill(unseen[..., None], 0.0)
    out = torch.matmul(p, vals).div_(denom.clamp_min(torch.finfo(cd).tiny))
    return out.reshape(B, H, Tq, Dv).to(q.dtype), (m + denom.log()).reshape(B, H, Tq)


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, cache_seqlens, *, head_dim_v: int, causal: bool = True,
               scale: Optional[float] = None, block_table: Optional[torch.Tensor] = None,
               key_padding_mask: Optional[torch.Tensor] = None, num_splits: int = 0, return_lse: bool = False,
               kpe_cache: Optional[torch.Tensor] = None, kv_scale=None):
    """Decode attention whose values are the first head_dim_v channels of the keys (MLA's latent cache).

    q [batch, heads, Tq, D] (Tq = 1..a few new tokens; DeepSeek: the absorbed query q_nope W_uk of
    kv_lora_rank channels, then the rotated q_pe); kv_cache [batch, kv_heads, Tmax, D] (DeepSeek: one
    kv head, each token's normalised latent c_kv then its rotated k_pe); cache_seqlens int [batch] (or an
    int): valid keys per row, the new tokens included (write them into the cache first).
        out = softmax(q kv^T * scale) kv[..., :head_dim_v]
    head_dim_v in 1..512, D - head_dim_v (the rotary channels) in 0..256. scale: None = 1/sqrt(D); DeepSeek
    passes the per-head scores' own scale (of nope + rope channels), which the absorbed scores keep.
    causal: query t of row b sits at position len_b - Tq + t and sees keys up to it (bottom-right).
    block_table: a paged cache, int32 [batch, pages_per_row]; kv_cache is then a page pool
        [num_pages, kv_heads, page_size, D] (any strides) and key j of row b lives in page
        block_table[b, j // page_size] at slot j % page_size.
    key_padding_mask: bool [batch, Tmax], True = attend (a left-padded prompt's pads: False). A query that
        sees no key returns zeros (LSE -inf).
    num_splits: key splits (0 = chosen from the GPU size).
    kpe_cache: the rotary channels in a tensor of their own (FlashInfer's separate ckv / kpe pools): kv_cache
        is then [.., head_dim_v] (the latent, also the values) and kpe_cache [.., D - head_dim_v] with the same
        leading shape (and page pool, under block_table); the keys are their concatenation. The kernel reads
        both in place (the CPU path concatenates them).
    kv_scale: a float8 latent cache (vLLM's fp8 KV cache for MLA): kv_cache (and kpe_cache) may be
        float8_e4m3fn / float8_e5m2 with q 16-bit (or float32); stored x stands for x * kv_scale, one scale for
        the latent and the rotary part (a positive float, or a float tensor [] or [kv_heads]; default 1.0);
        write such a cache with ``llmkern.quantize_kv``. The kernel reads the 1-byte tiles and widens them in
        registers. A scale with a cache in q's dtype raises ValueError.
    Returns out [batch, heads, Tq, head_dim_v] (, lse [batch, heads, Tq]: the natural log of the softmax
    denominator, as FlashMLA's and llmkern.attention's, not FlashInfer's base 2; float32, float64 for float64
    inputs).
    Inference only.
    """
    B, H, Tq, D, Tmax = _check_inputs(q, kv_cache, head_dim_v, block_table, kpe_cache)
    cache_seqlens = _check_lengths(cache_seqlens, B, Tmax, q.device)
    _check_kpm(key_padding_mask, B, Tmax, q.device)
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    _check_causal(causal, return_lse)
    scale = _scale(scale, D)
    kv_scale = _kv_scale("kv_scale", kv_scale, kv_cache, kv_cache.shape[1], q.device)
    if _backend.choose_triton("mla_decode", q.device, q.dtype, _KERNEL_DTYPES) == "triton":
        extra = {} if kpe_cache is None else {"kpe_cache": kpe_cache}
        if kv_scale is not None:
            extra["kv_scale"] = kv_scale
        out, lse = _checks.op_or_impl(_mla_decode_op, _mla_impl, q, kv_cache, cache_seqlens.to(torch.int32),
                                      block_table, key_padding_mask, int(head_dim_v), scale, causal,
                                      _splits(num_splits), **extra)
        return (out, lse) if return_lse else out
    if kpe_cache is not None:  # the CPU paths read the keys whole
        kv_cache = torch.cat([kv_cache, kpe_cache], dim=-1)
    if block_table is not None:  # the CPU paths read a dense copy of each row's pages
        kv_cache = _gather_pages(kv_cache, block_table)
    if kv_cache.dtype in FP8_DTYPES:  # (and a dequantized copy of a float8 cache)
        kv_cache = ref.dequantize_kv(kv_cache, kv_scale, q.dtype)
    if _backend.forced() != "reference":
        out, lse = _folded(q, kv_cache, cache_seqlens, head_dim_v, causal, scale, key_padding_mask)
        return (out, lse) if return_lse else out
    return ref.attention_with_kvcache(q, kv_cache, kv_cache[..., :head_dim_v], cache_seqlens, causal=causal,
                                      scale=scale, key_padding_mask=key_padding_mask, return_lse=return_lse)


__all__ = ["mla_decode", "MAX_HEAD_DIM_V", "MAX_ROPE_DIM"]
