"""Triton decode attention over a multi-head latent (MLA) KV cache, split along the keys, and its launcher.

DeepSeek-V2/V3 decoding with kv_b_proj absorbed (llmkern/models/deepseek.py; FlashMLA's layout) is an MQA
whose one key "head" per token is the cached latent [c | k_pe] (D = R + Dr channels, 512 + 64 for DeepSeek-V3)
and whose value is the same row's first Dv = R channels. So

    q [B, H, Tq, D]  x  kv_cache [B, Hk, Tmax, D]  ->  out [B, H, Tq, Dv] = softmax(q kv^T * scale) kv[..., :Dv]

(Hk = 1 for DeepSeek; any Hk dividing H works). Paged caches (block_table) are page pools
[num_pages, Hk, page_size, D] as for attention_with_kvcache. The rotary part may also live in a tensor of its
own (kpe_cache, FlashInfer's separate ckv / kpe pools): the kernel reads it through its own strides.

Why not attention_decode with v_cache = kv_cache[..., :Dv]: its tiles are one power of two wide (576 -> 1024
channels) and it loads the K tile and the V tile separately, i.e. the latent twice. Here each key tile is
loaded once as two pieces, the latent [BLOCK_N, Dv] and the rotary part [Dr, BLOCK_N]; the scores are
q_lat . latent + q_rope . rope, and the same latent tile is the value operand of P V. The query rows of a
program are the group's heads times the Tq new tokens (packed, as in attention_decode), so every key tile is
read once per program for all of them (with more than 64 rows, the row blocks of a key range are adjacent in
the grid, so their reads of the same tiles meet in L2). Each split writes a normalised partial and its LSE;
attention_decode's combine kernel merges them.

A row whose length lies outside 0..capacity, or whose block table names a page outside the pool, reads
nothing out of bounds and gets NaN outputs and LSE (the host cannot check without a sync).
"""
import os

import torch
import triton
import triton.language as tl

from llmkern.kernels._common import cdiv, launches_on_device, next_power_of_2
from llmkern.kernels.attention import (LOG2E, UNBOUNDED, _batch_slices, _block_d, _interpreting, _last_contig,
                                       _prec, empty_out)
from llmkern.kernels.attention_decode import (_decode_combine, _key_rows, _packed_rows, _softmax_step, _store_partial,
                                              cache_pages, choose_num_splits, fp8_in_registers)
from llmkern.reference.attention import dequantize_kv


@triton.jit
def _mla_split(Q, KV, KPE, SEQLENS, BT, KPM, KS, OP, LP, qk_scale,
               stride_qb, stride_qh, stride_qt,
               stride_kb, stride_kh, stride_kt,
               stride_pb, stride_ph, stride_pt,
               stride_opb, stride_oph, stride_opt, stride_ops,
               stride_lpb, stride_lph, stride_lpt, stride_btb, stride_kpmb,
               HK, GROUP, Tq, R, chunk, T_CAP, NUM_PAGES,
               DV: tl.constexpr, BLOCK_DV: tl.constexpr, DR: tl.constexpr, BLOCK_DR: tl.constexpr,
               PREC: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_KPM: tl.constexpr, HAS_KV_SCALE: tl.constexpr):
    pid_m = tl.program_id(0)  # (fastest: the row blocks of one key range run together and share its tiles in L2)
    split = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b64, hk, seqlen, row_bad, row_ok, t, h, pos = _packed_rows(SEQLENS, pid_m, pid_bh, HK, GROUP, Tq, T_CAP, BLOCK_M)
    if HAS_KV_SCALE:  # a float8 cache: its one scale joins the score scale here and the output after the loop
        kv_scale = tl.load(KS + hk)
        qk_scale = qk_scale * kv_scale
    offs_v = tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, BLOCK_DR)
    q_rows = Q + b64 * stride_qb + h[:, None].to(tl.int64) * stride_qh + t[:, None].to(tl.int64) * stride_qt
    q_lat = tl.load(q_rows + offs_v[None, :], mask=row_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
    if DR > 0:
        q_rope = tl.load(q_rows + DV + offs_r[None, :], mask=row_ok[:, None] & (offs_r[None, :] < DR), other=0.0)
    start = split * chunk
    end = tl.minimum(tl.minimum(start + chunk, seqlen), T_CAP)
    end = tl.minimum(end, seqlen - 1 + R + 1)  # causal (R = 0): no key past the last query
    kv_base = KV + hk.to(tl.int64) * stride_kh
    kpe_base = KPE + hk.to(tl.int64) * stride_ph  # (the rotary part: the same rows' last channels, or a pool of its own)
    if PAGE == 0:
        kv_base += b64 * stride_kb
        kpe_base += b64 * stride_pb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    page_bad = tl.zeros([BLOCK_N], dtype=tl.int32)
    for n0 in range(start, end, BLOCK_N):
        offs_n, kmask, rows, rows_pe, page_bad = _key_rows(  # (the rotary part: rows of its own strides)
            n0, end, b64, KPM, stride_kpmb, BT, stride_btb, NUM_PAGES, page_bad,
            stride_kb, stride_kt, stride_pb, stride_pt, HAS_KPM, PAGE, BLOCK_N)
        # the latent tile, loaded once: the keys' first DV channels and the values
        # (a float8 cache's tiles widen to q's dtype in registers)
        lat = tl.load(kv_base + rows[:, None] + offs_v[None, :],
                      mask=kmask[:, None] & (offs_v[None, :] < DV), other=0.0).to(q_lat.dtype)
        qk = tl.dot(q_lat, tl.trans(lat), input_precision=PREC)
        if DR > 0:  # the rotary channels, loaded key-major for the dot
            kr = tl.load(kpe_base + rows_pe[None, :] + offs_r[:, None],
                         mask=kmask[None, :] & (offs_r[:, None] < DR), other=0.0).to(q_lat.dtype)
            qk = tl.dot(q_rope, kr, qk, input_precision=PREC)
        s = qk * qk_scale
        vis = ((offs_n[None, :] - pos[:, None]) <= R) & kmask[None, :]
        p, alpha, m_i, l_i = _softmax_step(tl.where(vis, s, float("-inf")), m_i, l_i)
        acc = tl.dot(p.to(lat.dtype), lat, acc * alpha[:, None], input_precision=PREC)  # (the latent: the values)
    row_bad = row_bad | (tl.max(page_bad, 0) > 0)
    if HAS_KV_SCALE:
        acc = acc * kv_scale
    _store_partial(OP, LP, acc, m_i, l_i, row_bad, b64, h, t, split, row_ok, offs_v,
                   stride_opb, stride_oph, stride_opt, stride_ops, stride_lpb, stride_lph, stride_lpt, DV)


def mla_config(dv, rows, fp8=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the split kernel. The float32 accumulator is
    BLOCK_M x Dv (64 x 512 for DeepSeek-V3: 128 registers a thread at 8 warps), so wide latents take
    8 warps and short key tiles (each tile is BLOCK_N x Dv 16-bit numbers in shared memory per stage);
    BLOCK_M is the packed rows (heads x new tokens) rounded up to a power of two in 16..64.
    LLMKERN_MLA_CONFIG="BLOCK_M,BLOCK_N,warps,stages" overrides it (benchmarks/gpu_diag.py mla sweeps it)."""
    override = os.environ.get("LLMKERN_MLA_CONFIG")
    if override:
        try:
            bm, bn, warps, stages = (int(v) for v in override.split(","))
        except ValueError:
            raise ValueError(f"LLMKERN_MLA_CONFIG must be 'BLOCK_M,BLOCK_N,num_warps,num_stages', "
                             f"got {override!r}") from None
        if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1) or warps not in (1, 2, 4, 8, 16) or stages < 1:
            raise ValueError(f"LLMKERN_MLA_CONFIG: BLOCK_M and BLOCK_N powers of two >= 16, warps in 1..16 "
                             f"(powers of two), stages >= 1; got {override!r}")
        return bm, bn, warps, stages
    bm = min(max(16, next_power_of_2(rows)), 64)
    # compiled for sm_90 bf16 with ptxas (contiguous, paged, padded), Triton 3.8: none of these spills; Dv 512
    # at 64 rows is wgmma at 255 registers and 128 KB of shared memory (64 x 16 keys: 64 x 32 spilled 16-264
    # bytes, under Triton 3.6 too, where 64 x 16 spills 104-192 bytes and 32 x 64 none)
    if dv <= 128:
        return bm, 64, 4, 3
    if dv <= 256:
        return (64, 64, 8, 2) if bm == 64 else (bm, 32, 4, 2)
    if fp8:  # (widening a float8 tile takes registers: 64 x 16 spilled 288-512 bytes, 32 x 64 up to 32; 32 x 32 none)
        return (16, 64, 8, 2) if bm == 16 else (32, 32, 8, 2)
    return (bm, 16, 8, 2) if bm == 64 else (bm, 64, 8, 2)


@launches_on_device
def mla_decode(q, kv_cache, cache_seqlens, *, head_dim_v, scale, causal=True, num_splits=0, block_table=None,
               key_padding_mask=None, kpe_cache=None, kv_scale=None):
    """Returns (out [B, H, Tq, head_dim_v] like q, lse [B, H, Tq] float32). q [B, H, Tq, D]; kv_cache
    [B, Hk, Tmax, D] (or a page pool [num_pages, Hk, page_size, D] with block_table int32 [B, pages per row]);
    the values are kv_cache[..., :head_dim_v]. kpe_cache: the rotary channels in a tensor of their own
    (FlashInfer's ckv / kpe pools): kv_cache is then [.., head_dim_v] and kpe_cache [.., D - head_dim_v], with
    the same leading shape. key_padding_mask: bool [B, Tmax], False = a slot no query sees. A float8 cache (and
    kpe_cache): stored x stands for x * kv_scale (float32 [Hk], or None: 1)."""
    if kv_cache.dtype != q.dtype and not fp8_in_registers(kv_cache.dtype, q.device):  # (sm_80: e4m3 dequantized)
        kv_cache = dequantize_kv(kv_cache, kv_scale, q.dtype)
        kpe_cache = None if kpe_cache is None else dequantize_kv(kpe_cache, kv_scale, q.dtype)
        kv_scale = None
    slices = _batch_slices(q.shape[0], kv_cache.shape[1])  # the split grid's z is B * Hk (<= 65535)
    if len(slices) > 1:
        def rows(t, b0, b1):  # a page pool is shared by every row
            return t if block_table is not None or t is None else t[b0:b1]
        q = _last_contig(q)  # (one output in an unsliced call's layout, the fake's: torch.cat's is contiguous)
        out = empty_out(q, head_dim_v)
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        for b0, b1 in slices:
            out[b0:b1], lse[b0:b1] = mla_decode(
                q[b0:b1], rows(kv_cache, b0, b1), cache_seqlens[b0:b1], head_dim_v=head_dim_v, scale=scale,
                causal=causal, num_splits=num_splits, block_table=None if block_table is None else block_table[b0:b1],
                key_padding_mask=None if key_padding_mask is None else key_padding_mask[b0:b1],
                kpe_cache=rows(kpe_cache, b0, b1), kv_scale=kv_scale)
        return out, lse
    q, kv_cache = _last_contig(q), _last_contig(kv_cache)
    kpe = kv_cache[..., head_dim_v:] if kpe_cache is None else _last_contig(kpe_cache)
    B, H, Tq, D = q.shape
    Hk = kv_cache.shape[1]
    page, Tmax, block_table = cache_pages(kv_cache, block_table, q.device)
    Dv, Dr = head_dim_v, D - head_dim_v
    rows = (H // Hk) * Tq
    bm, bn, warps, stages = mla_config(Dv, rows, fp8=kv_cache.dtype != q.dtype)
    if _interpreting():
        bn = 32
    m_blocks = cdiv(rows, bm)
    S = num_splits if num_splits and num_splits > 0 else choose_num_splits(B, Hk, m_blocks, Tmax, bn, q.device)
    chunk = cdiv(cdiv(Tmax, S), bn) * bn
    S = cdiv(Tmax, chunk) if Tmax > 0 else 1
    seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    op = torch.empty(B, H, Tq, S, Dv, device=q.device, dtype=torch.float32)
    lp = torch.empty(B, H, Tq, S, device=q.device, dtype=torch.float32)
    extra = {} if _interpreting() else dict(num_warps=warps, num_stages=stages)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous().view(torch.uint8)
    _mla_split[(m_blocks, S, B * Hk)](
        q, kv_cache, kpe, seqlens, seqlens if block_table is None else block_table, seqlens if kpm is None else kpm,
        seqlens if kv_scale is None else kv_scale, op, lp, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kpe.stride(0), kpe.stride(1), kpe.stride(2),
        op.stride(0), op.stride(1), op.stride(2), op.stride(3),
        lp.stride(0), lp.stride(1), lp.stride(2), 0 if block_table is None else block_table.stride(0),
        0 if kpm is None else kpm.stride(0),
        Hk, H // Hk, Tq, 0 if causal else UNBOUNDED, chunk, Tmax, kv_cache.shape[0] if block_table is not None else 0,
        DV=Dv, BLOCK_DV=_block_d(Dv), DR=Dr, BLOCK_DR=_block_d(max(Dr, 1)), PREC=_prec(q.dtype), PAGE=page,
        BLOCK_M=bm, BLOCK_N=bn, HAS_KPM=kpm is not None, HAS_KV_SCALE=kv_scale is not None, **extra)
    out = empty_out(q, Dv)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    _decode_combine[(B * H * Tq,)](
        op, lp, out, lse, lse, S,
        op.stride(0), op.stride(1), op.stride(2), op.stride(3),
        lp.stride(0), lp.stride(1), lp.stride(2),
        out.stride(0), out.stride(1), out.stride(2), H, Tq,
        HEAD_DIM=Dv, BLOCK_D=_block_d(Dv), BLOCK_S=max(2, next_power_of_2(S)), HAS_SINKS=False)
    return out, lse


__all__ = ["mla_decode", "mla_config"]
