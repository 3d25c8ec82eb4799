"""Triton kernels for fused attention (FlashAttention-2 style) and their launchers.

No registration and no autograd here (llmkern/ops/attention.py does that). Launchers take
tensors in the layout the op uses and return new tensors; every input is made contiguous in its
last dimension first (a gradient from `.sum().backward()` arrives as a stride-0 expanded tensor).

Layouts (one kernel serves both, the batch/token/head strides say which):
- dense:  q [B, H, Tq, D], k [B, Hk, Tk, D], v [B, Hk, Tk, Dv], lse [B, H, Tq] (float32, natural log);
- varlen: q [total_q, H, D], k [total_k, Hk, D], v [total_k, Hk, Dv] with int32 cu_seqlens, lse [H, total_q].
The value head dim Dv may differ from D (DeepSeek MLA's prefill: D = 192, Dv = 128): HEAD_DIM/BLOCK_D
size q, k, dq, dk; HEAD_DIM_V/BLOCK_DV size v, o, do, the output and dV accumulators and delta. With
Dv == D the two are the same constexprs and the kernels compile as before.

Semantics: bottom-right causal alignment (query i sees keys j <= i + Tk - Tq), window
(left, right) relative to that diagonal, tanh softcap on the scaled scores, optional key padding
mask (dense only), GQA by head index (never materialising repeated K/V). Rows that see no key
produce zeros and LSE = -inf. Optional attention sinks (gpt-oss): a per-query-head logit that joins
every row's softmax denominator and adds no value; the forward starts each row's online softmax
from it (max = sink, sum = 1), so the saved LSE is that of the whole denominator and the backward
kernels, recomputing P = exp(s - LSE), need no change (dsinks: sink_grad, from LSE and delta).
Optional ALiBi (FlashAttention-2's semantics): -slope * |i + Tk - Tq - j| added to the scores after
softcap, before the masks, slopes [H] or [B, H]; each program loads its head's slope once and adds the
bias per tile in log2 units (HAS_ALIBI: the kernels without it compile as before). The slopes get no
gradient; the backward adds the same bias when it recomputes P.

Kernels:
- `_attn_fwd`: one program per (query block, batch*head); online softmax in float32 (exp2);
  the key range is split into masked edge blocks and unmasked interior blocks, and blocks that
  no query of the program can see are skipped.
- `_attn_bwd_preprocess`: delta = rowsum(dO * O) - dLSE.
- `_attn_bwd_dkdv`: one program per (key block, batch*kv-head); loops over the query heads of
  its GQA group and over query blocks, recomputing P from the saved LSE. It owns its dK/dV rows.
- `_attn_bwd_dq`: one program per (query block, batch*head); owns its dQ rows.
  No atomics anywhere: the backward is bitwise deterministic run to run.
"""
import functools
import math
import os

import torch
import triton
import triton.language as tl

from llmkern.kernels import _autotune as _autotune_front
from llmkern.kernels import _tma
from llmkern.kernels._common import cdiv, next_power_of_2, on_device
from llmkern.kernels._common import dropout_params as _dropout_params
from llmkern.kernels._common import fmix32 as _fmix32
from llmkern.kernels._common import seed_keys as _seed_keys
from llmkern.kernels._common import interpreting as _interpreting
from llmkern.kernels._common import tanh as _tanh

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
UNBOUNDED = 1 << 30  # a window side with no limit (sequences stay under 2**29 tokens: int32 sums)


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, Tq, Tk, IS_VARLEN: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of batch row b, packed (varlen) or padded layout."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        seqlen_k = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        seqlen_q = Tq
        k_start = 0
        seqlen_k = Tk
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _block_ranges(first, last_row, off, L, R, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks for query rows [first, last_row]: (lo, full_lo, full_hi, hi) in block units.

    [lo, full_lo) and [full_hi, hi) need the causal/window/bounds mask, [full_lo, full_hi) not."""
    lo = tl.maximum(first + off - L, 0)
    hi = tl.minimum(last_row + off + R + 1, seqlen_k)
    f_lo = tl.maximum(lo, last_row + off - L)
    f_hi = tl.minimum(seqlen_k, first + off + R + 1)
    blk_lo = lo // BLOCK_N
    blk_hi = tl.maximum(tl.cdiv(hi, BLOCK_N), blk_lo)
    fb_lo = tl.minimum(tl.maximum(tl.cdiv(f_lo, BLOCK_N), blk_lo), blk_hi)
    fb_hi = tl.maximum(tl.minimum(f_hi // BLOCK_N, blk_hi), fb_lo)
    return blk_lo, fb_lo, fb_hi, blk_hi


@triton.jit
def _drop_keys(SEED, bh):
    """Dropout keys (kh, kc) of head bh = batch * heads + query head. SEED points at the two int32
    seed words on the device (no host value: CUDA graphs and torch.compile keep working)."""
    k0, kc = _seed_keys(SEED)
    kh = _fmix32(k0 ^ _fmix32(bh.to(tl.uint32) * 0xCC9E2D51 + kc))
    return kh, kc


@triton.jit
def _drop_keep(rows, cols, kh, kc, drop_thr, TRANS: tl.constexpr):
    """keep[i, j] (keep[j, i] with TRANS) for query rows i and key columns j of one head:
    hash(kh, kc, i, j) >> 8 >= drop_thr (= round(p * 2^24)); the reference's
    attention_dropout_keep computes the same bits."""
    hr = _fmix32(rows.to(tl.uint32) ^ kh)
    hc = cols.to(tl.uint32) * 0x9E3779B1 + kc
    if TRANS:
        h = _fmix32(hc[:, None] ^ hr[None, :])
    else:
        h = _fmix32(hr[:, None] ^ hc[None, :])
    return (h >> 8).to(tl.int32) >= drop_thr


@triton.jit
def _alibi(s, slope2, rows, cols, off, TRANS: tl.constexpr):
    """s (scaled scores, log2 units) plus the ALiBi bias -slope * |i + off - j| of query rows i and key
    columns j ([j, i] with TRANS); slope2 = slope * log2(e), so the bias is in s's units (FlashAttention-2's
    semantics: after softcap, before the masks). The distance is exact in int32, converted once."""
    if TRANS:
        dist = tl.abs(cols[:, None] - rows[None, :] - off)
    else:
        dist = tl.abs(cols[None, :] - rows[:, None] - off)
    return s - slope2 * dist.to(tl.float32)


@triton.jit
def _sink_logit(SINKS, h):
    """Head h's sink logit (natural units), clamped above at 1e30: a finite sink near float32's maximum
    would overflow to inf once scaled by log2(e) (inf - inf = NaN rows), while any sink past 1e30
    already takes the whole softmax (out = 0). sink_grad clamps the same way, so LSE and dsinks agree."""
    return tl.minimum(tl.load(SINKS + h).to(tl.float32), 1e30)


@triton.jit
def _alibi_slope2(ALIBI, b, h, stride_slopes):
    """The ALiBi slope of batch row b, head h (stride_slopes = 0 for [H] slopes), times log2(e). Clamped to
    +-1e30 first: a finite slope near float32's maximum would overflow to inf and make inf * 0 = NaN on the
    diagonal, while any slope past 1e30 already gives every off-diagonal score its limit."""
    slope = tl.load(ALIBI + b.to(tl.int64) * stride_slopes + h).to(tl.float32)
    return tl.minimum(tl.maximum(slope, -1e30), 1e30) * 1.4426950408889634


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_vt,
               blk_start, blk_end, offs_m, offs_d, offs_dv, off, L, R, seqlen_k, qk_scale, sc_in, sc_out,
               desc_k, desc_v, b, hk, kh, kc, drop_thr, slope2,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
               MASKED: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               PREC: tl.constexpr, USE_TMA: tl.constexpr, DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr):
    for blk in range(blk_start, blk_end):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_dv[None, :]
        if USE_TMA:  # 4-D boxes: rows past Tk and columns past D (Dv) arrive as zeros
            kt = desc_k.load([b, hk, blk * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D).T
            v = desc_v.load([b, hk, blk * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_DV)
        elif MASKED:
            if BLOCK_D == HEAD_DIM:
                kt = tl.load(k_ptrs, mask=offs_n[None, :] < seqlen_k, other=0.0)
            else:
                kt = tl.load(k_ptrs, mask=(offs_n[None, :] < seqlen_k) & (offs_d[:, None] < HEAD_DIM),
                             other=0.0)
            if BLOCK_DV == HEAD_DIM_V:
                v = tl.load(v_ptrs, mask=offs_n[:, None] < seqlen_k, other=0.0)
            else:
                v = tl.load(v_ptrs, mask=(offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V),
                            other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                kt = tl.load(k_ptrs)
            else:
                kt = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            if BLOCK_DV == HEAD_DIM_V:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
        qk = tl.dot(q, kt, input_precision=PREC)
        # s: the scores in log2 units. Without softcap or ALiBi they stay unscaled until the exponent
        # (max(qk) * scale == max(qk * scale) for scale > 0, which attention_forward guarantees by
        # folding a sign or zero scale into q), so qk * scale - m is one FMA.
        if HAS_SOFTCAP:
            s = _tanh(qk * sc_in) * sc_out
        elif HAS_ALIBI:
            s = qk * qk_scale
        else:
            s = qk
        if HAS_ALIBI:
            s = _alibi(s, slope2, offs_m, offs_n, off, False)
        if MASKED:
            rel = offs_n[None, :] - offs_m[:, None] - off
            vis = (rel <= R) & (rel >= -L) & (offs_n[None, :] < seqlen_k)
            s = tl.where(vis, s, float("-inf"))
        if HAS_KPM:
            km = tl.load(kpm_base + offs_n, mask=offs_n < seqlen_k, other=0)
            s = tl.where(km[None, :] != 0, s, float("-inf"))
        if HAS_SOFTCAP or HAS_ALIBI:  # s already scaled
            m_new = tl.maximum(m_i, tl.max(s, 1))
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if HAS_SOFTCAP or HAS_ALIBI:
            p = tl.math.exp2(s - m_safe[:, None])
        else:
            p = tl.math.exp2(s * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normaliser counts every key, dropped or not
        acc = acc * alpha[:, None]
        if DROPOUT:  # kept weights are scaled by 1/(1-p) once, in _fwd_tile
            p = tl.where(_drop_keep(offs_m, offs_n, kh, kc, drop_thr, False), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_tile(q, k_base, v_base, kpm_base, stride_kt, stride_vt, desc_k, desc_v, b, hk,
              first, seqlen_q, seqlen_k, L, R, qk_scale, sc_in, sc_out, kh, kc, drop_thr, drop_scale, sink,
              slope2,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
              HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr,
              DROPOUT: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Output rows [first, first + BLOCK_M) of one head: (normalised acc, lse in natural log).
    Masked edge blocks, then unmasked interior blocks, then masked edge blocks (see _block_ranges).
    With HAS_SINKS, `sink` (this head's sink logit, natural units) is one more key with no value.
    With HAS_ALIBI, slope2 is this row's ALiBi slope times log2(e); the bias masks nothing, so the
    block ranges (and the skipped blocks) are those without it."""
    off = seqlen_k - seqlen_q
    last_row = tl.minimum(first + BLOCK_M, seqlen_q) - 1
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if HAS_SINKS:
        # the sink is the first "key" the online softmax sees: max = sink (log2 units, as m_i), sum
        # exp2(0) = 1, nothing added to acc. The loop rescales it with every new max, the LSE below
        # counts it, and a row that sees no key ends with out = 0 and LSE = sink (l_i = 1, not 0).
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    blk_lo, fb_lo, fb_hi, blk_hi = _block_ranges(first, last_row, off, L, R, seqlen_k, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_vt,
                               blk_lo, fb_lo, offs_m, offs_d, offs_dv, off, L, R, seqlen_k, qk_scale, sc_in, sc_out,
                               desc_k, desc_v, b, hk, kh, kc, drop_thr, slope2,
                               BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                               True, HAS_KPM, HAS_SOFTCAP, PREC, USE_TMA, DROPOUT, HAS_ALIBI)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_vt,
                               fb_lo, fb_hi, offs_m, offs_d, offs_dv, off, L, R, seqlen_k, qk_scale, sc_in, sc_out,
                               desc_k, desc_v, b, hk, kh, kc, drop_thr, slope2,
                               BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                               False, HAS_KPM, HAS_SOFTCAP, PREC, USE_TMA, DROPOUT, HAS_ALIBI)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_vt,
                               fb_hi, blk_hi, offs_m, offs_d, offs_dv, off, L, R, seqlen_k, qk_scale, sc_in, sc_out,
                               desc_k, desc_v, b, hk, kh, kc, drop_thr, slope2,
                               BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                               True, HAS_KPM, HAS_SOFTCAP, PREC, USE_TMA, DROPOUT, HAS_ALIBI)
    empty = l_i == 0.0
    if DROPOUT:
        acc = acc * (drop_scale / tl.where(empty, 1.0, l_i))[:, None]
    else:
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return acc, lse


@triton.jit(do_not_specialize=["IS_CAUSAL", "drop_thr", "drop_b0"])
def _attn_fwd(Q, K, V, O, LSE, KPM, CU_Q, CU_K, SEED, SINKS, ALIBI,
              qk_scale, sc_in, sc_out, drop_thr, drop_scale, drop_b0,
              stride_qb, stride_qh, stride_qt,
              stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt,
              stride_ob, stride_oh, stride_ot,
              stride_lb, stride_lh, stride_lt,
              stride_mb, stride_slopes,
              H, GROUP, Tq, Tk, L, R, seq_bucket,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
              IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              IS_CAUSAL, PREC: tl.constexpr, DROPOUT: tl.constexpr, HAS_SINKS: tl.constexpr,
              HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # heaviest query blocks (bottom rows, under a causal mask) first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CU_Q, CU_K, b, Tq, Tk, IS_VARLEN)
    first = pid_m * BLOCK_M
    if first >= seqlen_q:
        return
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qt
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kt
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vt
    kpm_base = KPM + b64 * stride_mb
    q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < seqlen_q, other=0.0)
    else:
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    kh, kc = 0, 0
    if DROPOUT:
        kh, kc = _drop_keys(SEED, (b + drop_b0) * H + h)
    sink = 0.0
    if HAS_SINKS:
        sink = _sink_logit(SINKS, h)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = _alibi_slope2(ALIBI, b, h, stride_slopes)
    acc, lse = _fwd_tile(q, k_base, v_base, kpm_base, stride_kt, stride_vt, K, V, b, hk,
                         first, seqlen_q, seqlen_k, L, R, qk_scale, sc_in, sc_out, kh, kc, drop_thr, drop_scale, sink,
                         slope2, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, HAS_KPM, HAS_SOFTCAP, PREC,
                         False, DROPOUT, HAS_SINKS, HAS_ALIBI)
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_ot
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_ot + offs_dv[None, :]
    if BLOCK_DV == HEAD_DIM_V:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=offs_m[:, None] < seqlen_q)
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty),
                 mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V))
    l_ptrs = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + (q_start + offs_m).to(tl.int64) * stride_lt
    tl.store(l_ptrs, lse, mask=offs_m < seqlen_q)


@triton.jit(do_not_specialize=["IS_CAUSAL", "drop_thr", "drop_b0"])
def _attn_fwd_tma(desc_q, desc_k, desc_v, desc_o, LSE, KPM, SEED, SINKS, ALIBI,
                  qk_scale, sc_in, sc_out, drop_thr, drop_scale, drop_b0,
                  stride_lb, stride_lh, stride_lt,
                  stride_mb, stride_slopes,
                  H, GROUP, Tq, Tk, L, R, seq_bucket,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                  HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  IS_CAUSAL, PREC: tl.constexpr, DROPOUT: tl.constexpr, HAS_SINKS: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """_attn_fwd for dense 16-bit inputs on sm_90+: Q, K, V and O move through tensor
    descriptors (4-D [B, heads, T, D]) instead of per-thread pointers, which frees the registers
    the address arithmetic held (so 128x128 tiles fit) and lets the copy engine fill shared
    memory asynchronously. Same math and masking as _attn_fwd."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    first = pid_m * BLOCK_M
    q = desc_q.load([b, h, first, 0]).reshape(BLOCK_M, BLOCK_D)
    kpm_base = KPM + b.to(tl.int64) * stride_mb
    kh, kc = 0, 0
    if DROPOUT:
        kh, kc = _drop_keys(SEED, (b + drop_b0) * H + h)
    sink = 0.0
    if HAS_SINKS:
        sink = _sink_logit(SINKS, h)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = _alibi_slope2(ALIBI, b, h, stride_slopes)
    acc, lse = _fwd_tile(q, KPM, KPM, kpm_base, 0, 0, desc_k, desc_v, b, hk,
                         first, Tq, Tk, L, R, qk_scale, sc_in, sc_out, kh, kc, drop_thr, drop_scale, sink,
                         slope2, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, HAS_KPM, HAS_SOFTCAP, PREC,
                         True, DROPOUT, HAS_SINKS, HAS_ALIBI)
    desc_o.store([b, h, first, 0], acc.to(desc_o.dtype).reshape(1, 1, BLOCK_M, BLOCK_DV))
    offs_m = first + tl.arange(0, BLOCK_M)
    l_ptrs = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m.to(tl.int64) * stride_lt
    tl.store(l_ptrs, lse, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_preprocess(O, DO, DLSE, DELTA, CU_Q,
                         stride_ob, stride_oh, stride_ot,
                         stride_db, stride_dh, stride_dt,
                         stride_lb, stride_lh, stride_lt,
                         H, Tq,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
                         HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
    else:
        q_start = 0
        seqlen_q = Tq
    first = pid_m * BLOCK_M
    if first >= seqlen_q:
        return
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    rows = (q_start + offs_m).to(tl.int64)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b64 * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_db + h.to(tl.int64) * stride_dh + rows[:, None] * stride_dt + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    l_off = b64 * stride_lb + h.to(tl.int64) * stride_lh + rows * stride_lt
    if HAS_DLSE:
        delta -= tl.load(DLSE + l_off, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + l_off, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, kpm, q_base, do_base, lse_base, delta_base,
                    stride_qt, stride_dt, stride_lt, blk_start, blk_end, offs_n, offs_d, offs_dv,
                    off, L, R, seqlen_q, seqlen_k, qk_scale, sc_in, sc_out, desc_q, desc_do, b, h,
                    kh, kc, drop_thr, drop_scale, slope2,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    PREC: tl.constexpr, USE_TMA: tl.constexpr, DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr):
    for blk in range(blk_start, blk_end):
        offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[None, :].to(tl.int64) * stride_qt + offs_d[:, None]    # [D, M]
        do_ptrs = do_base + offs_m[:, None].to(tl.int64) * stride_dt + offs_dv[None, :]  # [M, Dv]
        if USE_TMA:  # rows past Tq and columns past D (Dv) arrive as zeros
            qT = desc_q.load([b, h, blk * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D).T
            do = desc_do.load([b, h, blk * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_DV)
        elif MASKED:
            qT = tl.load(q_ptrs, mask=(offs_m[None, :] < seqlen_q) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            do = tl.load(do_ptrs, mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                qT = tl.load(q_ptrs)
            else:
                qT = tl.load(q_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            if BLOCK_DV == HEAD_DIM_V:
                do = tl.load(do_ptrs)
            else:
                do = tl.load(do_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
        if MASKED:
            lse = tl.load(lse_base + offs_m * stride_lt, mask=offs_m < seqlen_q, other=float("inf"))
            Di = tl.load(delta_base + offs_m * stride_lt, mask=offs_m < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m * stride_lt)
            Di = tl.load(delta_base + offs_m * stride_lt)
        # rows that saw no key have LSE -inf: make their P zero
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        qkT = tl.dot(k, qT, input_precision=PREC)  # [N, M]
        if HAS_SOFTCAP:
            t = _tanh(qkT * sc_in)
            sT = t * sc_out
        else:
            sT = qkT * qk_scale
        if HAS_ALIBI:  # an additive constant: dS (and the softcap chain below) is unchanged
            sT = _alibi(sT, slope2, offs_m, offs_n, off, True)
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASKED:
            rel = offs_n[:, None] - offs_m[None, :] - off
            vis = (rel <= R) & (rel >= -L) & (offs_m[None, :] < seqlen_q) & (offs_n[:, None] < seqlen_k)
            pT = tl.where(vis, pT, 0.0)
        if HAS_KPM:
            pT = tl.where(kpm[:, None], pT, 0.0)
        if DROPOUT:  # dV takes the kept weights (scaled by 1/(1-p) once, at the end); dP the kept entries
            keepT = _drop_keep(offs_m, offs_n, kh, kc, drop_thr, True)
            dv = tl.dot(tl.where(keepT, pT, 0.0).to(do.dtype), do, dv, input_precision=PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
            dpT = tl.where(keepT, dpT * drop_scale, 0.0)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - Di[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - t * t)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PREC)
    return dk, dv


@triton.jit(do_not_specialize=["IS_CAUSAL", "drop_thr", "drop_b0"])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, CU_Q, CU_K, SEED, ALIBI, desc_q, desc_do,
                   scale, qk_scale, sc_in, sc_out, drop_thr, drop_scale, drop_b0,
                   stride_qb, stride_qh, stride_qt,
                   stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt,
                   stride_db, stride_dh, stride_dt,
                   stride_lb, stride_lh, stride_lt,
                   stride_dkb, stride_dkh, stride_dkt,
                   stride_dvb, stride_dvh, stride_dvt,
                   stride_mb, stride_slopes,
                   HK, GROUP, Tq, Tk, L, R, seq_bucket,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                   IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   IS_CAUSAL, PREC: tl.constexpr, USE_TMA: tl.constexpr, DROPOUT: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HK
    hk = pid_bh % HK
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CU_Q, CU_K, b, Tq, Tk, IS_VARLEN)
    first_n = pid_n * BLOCK_N
    if first_n >= seqlen_k:
        return
    off = seqlen_k - seqlen_q
    last_n = tl.minimum(first_n + BLOCK_N, seqlen_k) - 1
    offs_n = first_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    k_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    v_mask = (offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V)
    k = tl.load(K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
                + (k_start + offs_n[:, None]).to(tl.int64) * stride_kt + offs_d[None, :], mask=k_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
                + (k_start + offs_n[:, None]).to(tl.int64) * stride_vt + offs_dv[None, :], mask=v_mask, other=0.0)
    if HAS_KPM:
        kpm = tl.load(KPM + b64 * stride_mb + offs_n, mask=offs_n < seqlen_k, other=0) != 0
    else:
        kpm = offs_n < seqlen_k
    # query rows that can see some key of this block: i in [j - off - R, j - off + L]
    lo = tl.maximum(first_n - off - R, 0)
    hi = tl.minimum(last_n - off + L + 1, seqlen_q)
    blk_lo = lo // BLOCK_M
    blk_hi = tl.maximum(tl.cdiv(hi, BLOCK_M), blk_lo)
    # rows that see every key of this block (only when the block is whole)
    f_lo = tl.maximum(lo, first_n + BLOCK_N - 1 - off - R)
    f_hi = tl.minimum(seqlen_q, first_n - off + L + 1)
    if first_n + BLOCK_N > seqlen_k:
        f_hi = f_lo
    fb_lo = tl.minimum(tl.maximum(tl.cdiv(f_lo, BLOCK_M), blk_lo), blk_hi)
    fb_hi = tl.maximum(tl.minimum(f_hi // BLOCK_M, blk_hi), fb_lo)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, GROUP):
        hq = hk * GROUP + g
        h = hq.to(tl.int64)
        q_base = Q + b64 * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qt
        do_base = DO + b64 * stride_db + h * stride_dh + q_start.to(tl.int64) * stride_dt
        l_off = b64 * stride_lb + h * stride_lh + q_start.to(tl.int64) * stride_lt
        kh, kc = 0, 0
        if DROPOUT:
            kh, kc = _drop_keys(SEED, (b + drop_b0) * (HK * GROUP) + hq)
        slope2 = 0.0
        if HAS_ALIBI:  # each query head of the group has its own slope
            slope2 = _alibi_slope2(ALIBI, b, hq, stride_slopes)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kpm, q_base, do_base, LSE + l_off, DELTA + l_off,
                                 stride_qt, stride_dt, stride_lt, blk_lo, fb_lo, offs_n, offs_d, offs_dv,
                                 off, L, R, seqlen_q, seqlen_k, qk_scale, sc_in, sc_out, desc_q, desc_do, b, hq,
                                 kh, kc, drop_thr, drop_scale, slope2,
                                 BLOCK_M, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                 True, HAS_KPM, HAS_SOFTCAP, PREC, USE_TMA, DROPOUT, HAS_ALIBI)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kpm, q_base, do_base, LSE + l_off, DELTA + l_off,
                                 stride_qt, stride_dt, stride_lt, fb_lo, fb_hi, offs_n, offs_d, offs_dv,
                                 off, L, R, seqlen_q, seqlen_k, qk_scale, sc_in, sc_out, desc_q, desc_do, b, hq,
                                 kh, kc, drop_thr, drop_scale, slope2,
                                 BLOCK_M, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                 False, HAS_KPM, HAS_SOFTCAP, PREC, USE_TMA, DROPOUT, HAS_ALIBI)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kpm, q_base, do_base, LSE + l_off, DELTA + l_off,
                                 stride_qt, stride_dt, stride_lt, fb_hi, blk_hi, offs_n, offs_d, offs_dv,
                                 off, L, R, seqlen_q, seqlen_k, qk_scale, sc_in, sc_out, desc_q, desc_do, b, hq,
                                 kh, kc, drop_thr, drop_scale, slope2,
                                 BLOCK_M, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                 True, HAS_KPM, HAS_SOFTCAP, PREC, USE_TMA, DROPOUT, HAS_ALIBI)
    dk = dk * scale
    if DROPOUT:
        dv = dv * drop_scale
    dk_ptrs = (DK + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh
               + (k_start + offs_n[:, None]).to(tl.int64) * stride_dkt + offs_d[None, :])
    dv_ptrs = (DV + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh
               + (k_start + offs_n[:, None]).to(tl.int64) * stride_dvt + offs_dv[None, :])
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=k_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=v_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, Di, k_base, v_base, kpm_base, stride_kt, stride_vt,
                  blk_start, blk_end, offs_m, offs_d, offs_dv, off, L, R, seqlen_k, qk_scale, sc_in, sc_out,
                  desc_k, desc_v, b, hk, kh, kc, drop_thr, drop_scale, slope2,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                  MASKED: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  PREC: tl.constexpr, USE_TMA: tl.constexpr, DROPOUT: tl.constexpr, HAS_ALIBI: tl.constexpr):
    for blk in range(blk_start, blk_end):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
        v_ptrs = v_base + offs_n[None, :].to(tl.int64) * stride_vt + offs_dv[:, None]
        if USE_TMA:
            k = desc_k.load([b, hk, blk * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D)
            vT = desc_v.load([b, hk, blk * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_DV).T
        elif MASKED:
            k = tl.load(k_ptrs, mask=(offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM), other=0.0)
            vT = tl.load(v_ptrs, mask=(offs_n[None, :] < seqlen_k) & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            if BLOCK_DV == HEAD_DIM_V:
                vT = tl.load(v_ptrs)
            else:
                vT = tl.load(v_ptrs, mask=offs_dv[:, None] < HEAD_DIM_V, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if HAS_SOFTCAP:
            t = _tanh(qk * sc_in)
            s = t * sc_out
        else:
            s = qk * qk_scale
        if HAS_ALIBI:
            s = _alibi(s, slope2, offs_m, offs_n, off, False)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            rel = offs_n[None, :] - offs_m[:, None] - off
            vis = (rel <= R) & (rel >= -L) & (offs_n[None, :] < seqlen_k)
            p = tl.where(vis, p, 0.0)
        if HAS_KPM:
            km = tl.load(kpm_base + offs_n, mask=offs_n < seqlen_k, other=0)
            p = tl.where(km[None, :] != 0, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)
        if DROPOUT:
            dp = tl.where(_drop_keep(offs_m, offs_n, kh, kc, drop_thr, False), dp * drop_scale, 0.0)
        ds = p * (dp - Di[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit(do_not_specialize=["IS_CAUSAL", "drop_thr", "drop_b0"])
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KPM, CU_Q, CU_K, SEED, ALIBI, desc_k, desc_v,
                 scale, qk_scale, sc_in, sc_out, drop_thr, drop_scale, drop_b0,
                 stride_qb, stride_qh, stride_qt,
                 stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt,
                 stride_db, stride_dh, stride_dt,
                 stride_lb, stride_lh, stride_lt,
                 stride_dqb, stride_dqh, stride_dqt,
                 stride_mb, stride_slopes,
                 H, GROUP, Tq, Tk, L, R, seq_bucket,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                 IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 IS_CAUSAL, PREC: tl.constexpr, USE_TMA: tl.constexpr, DROPOUT: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CU_Q, CU_K, b, Tq, Tk, IS_VARLEN)
    first = pid_m * BLOCK_M
    if first >= seqlen_q:
        return
    off = seqlen_k - seqlen_q
    last_row = tl.minimum(first + BLOCK_M, seqlen_q) - 1
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = (q_start + offs_m[:, None]).to(tl.int64)
    row_mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows * stride_qt + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b64 * stride_db + h64 * stride_dh + rows * stride_dt + offs_dv[None, :],
                 mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    l_off = b64 * stride_lb + h64 * stride_lh + (q_start + offs_m).to(tl.int64) * stride_lt
    lse = tl.load(LSE + l_off, mask=offs_m < seqlen_q, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    Di = tl.load(DELTA + l_off, mask=offs_m < seqlen_q, other=0.0)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kt
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vt
    kpm_base = KPM + b64 * stride_mb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kh, kc = 0, 0
    if DROPOUT:
        kh, kc = _drop_keys(SEED, (b + drop_b0) * H + h)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = _alibi_slope2(ALIBI, b, h, stride_slopes)
    blk_lo, fb_lo, fb_hi, blk_hi = _block_ranges(first, last_row, off, L, R, seqlen_k, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, Di, k_base, v_base, kpm_base, stride_kt, stride_vt,
                       blk_lo, fb_lo, offs_m, offs_d, offs_dv, off, L, R, seqlen_k, qk_scale, sc_in, sc_out,
                       desc_k, desc_v, b, hk, kh, kc, drop_thr, drop_scale, slope2,
                       BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, True, HAS_KPM, HAS_SOFTCAP, PREC, USE_TMA,
                       DROPOUT, HAS_ALIBI)
    dq = _bwd_dq_inner(dq, q, do, lse2, Di, k_base, v_base, kpm_base, stride_kt, stride_vt,
                       fb_lo, fb_hi, offs_m, offs_d, offs_dv, off, L, R, seqlen_k, qk_scale, sc_in, sc_out,
                       desc_k, desc_v, b, hk, kh, kc, drop_thr, drop_scale, slope2,
                       BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, False, HAS_KPM, HAS_SOFTCAP, PREC, USE_TMA,
                       DROPOUT, HAS_ALIBI)
    dq = _bwd_dq_inner(dq, q, do, lse2, Di, k_base, v_base, kpm_base, stride_kt, stride_vt,
                       fb_hi, blk_hi, offs_m, offs_d, offs_dv, off, L, R, seqlen_k, qk_scale, sc_in, sc_out,
                       desc_k, desc_v, b, hk, kh, kc, drop_thr, drop_scale, slope2,
                       BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, True, HAS_KPM, HAS_SOFTCAP, PREC, USE_TMA,
                       DROPOUT, HAS_ALIBI)
    dq = dq * scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + rows * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_mask)


# ---------------------------------------------------------------------------------------------
# Autotuning: configs per head dim and architecture; under the interpreter one small fixed config.

def _cfg(bm, bn, w, s, pre_hook=None):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=pre_hook)


_TMA_ROWS = {"desc_q": "BLOCK_M", "desc_o": "BLOCK_M", "desc_do": "BLOCK_M", "desc_k": "BLOCK_N", "desc_v": "BLOCK_N"}
# q and k are D wide; v, o and do are Dv wide (the value head dim, which may differ)
_TMA_COLS = {"desc_q": "BLOCK_D", "desc_k": "BLOCK_D", "desc_o": "BLOCK_DV", "desc_do": "BLOCK_DV",
             "desc_v": "BLOCK_DV"}


def _set_tma_blocks(nargs):
    """Config pre-hook of the TMA variants: each descriptor's box is one tile of the config."""
    for name, rows in _TMA_ROWS.items():
        if name in nargs:
            nargs[name].block_shape = [1, 1, nargs[rows], nargs[_TMA_COLS[name]]]


def _capability():
    # (the current device's: the launchers enter their tensors' device first, see on_device. The candidate lists
    # are built on first use, so a process driving GPUs of two architectures tunes over the first one's list.)
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()
    return (0, 0)


# Candidate configs (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, head-dim bucket and
# architecture. The sm_90 lists keep configs that compile without register spills (or with the
# fewest) and fit the shared memory a block may use (sm_90: 227 KB, sm_80: 163 KB), as reported by
# `python tests/test_attention_compile.py CC DTYPE HEAD_DIM all` (Triton's ptxas, no GPU needed);
# their speed is for the autotuner to measure on the card. The D=128 sm_90 lists are ordered by
# the times the H100 measured for each candidate (benchmarks/gpu_diag.py, results in
# benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-26-diag.log), so a bounded search
# (LLMKERN_ATTN_TUNE_TOP=2) still tries the winners.
_CONFIGS = {
    # kernel: {arch: {head-dim bucket: [(BM, BN, warps, stages), ...]}}
    "fwd": {
        90: {64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 64, 8, 2)],
             128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
             256: [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2)]},
        80: {64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
             128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
             256: [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)]},
    },
    # the TMA forward (sm_90+, dense fp16/bf16): no address registers, so larger tiles fit
    "fwd_tma": {
        90: {64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
             128: [(128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
             256: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)]},
    },
    # TMA backward: fewer address registers, so the same tiles spill less (compile test, sm_90,
    # with Triton 3.6 and 3.8)
    "dkdv_tma": {
        90: {64: [(32, 128, 8, 2), (64, 128, 8, 1), (32, 64, 4, 2)],
             128: [(64, 128, 8, 1), (32, 128, 8, 1), (32, 64, 8, 2)],
             256: [(16, 64, 8, 2), (32, 32, 8, 1), (32, 32, 8, 2), (16, 32, 8, 2)]},
    },
    "dq_tma": {
        90: {64: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)],
             128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 8, 3)],
             256: [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)]},
    },
    "dkdv": {
        90: {64: [(32, 128, 8, 2), (32, 128, 8, 1), (32, 64, 8, 2), (32, 64, 4, 2), (16, 64, 4, 2)],
             128: [(32, 128, 8, 1), (32, 128, 8, 2), (64, 64, 8, 1), (32, 64, 8, 2)],
             256: [(32, 32, 8, 1), (16, 32, 8, 2)]},
        80: {64: [(32, 128, 8, 2), (32, 64, 8, 2), (16, 128, 8, 2), (32, 64, 4, 2)],
             128: [(32, 64, 8, 2), (16, 64, 8, 2), (16, 128, 8, 2)],
             256: [(32, 32, 8, 1), (16, 32, 8, 2)]},
    },
    "dq": {
        90: {64: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 3), (64, 32, 4, 2)],
             128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2)],
             256: [(128, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)]},
        80: {64: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
             128: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
             256: [(64, 32, 8, 2), (32, 32, 4, 2)]},
    },
}


def _arch(kernel="fwd"):
    return 90 if _capability() >= (9, 0) or kernel.endswith("_tma") else 80


def _d_bucket(d, dv=None):
    """The config bucket of head dims d (q/k) and dv (v, default d): by the wider one, since the
    K and V tiles, the output accumulator and the dK/dV accumulators each grow with their own width."""
    d = d if dv is None else max(d, dv)
    return 64 if d <= 64 else (128 if d <= 128 else 256)


def _all_configs(kernel):
    """Every candidate of `kernel` on this architecture (the prune picks the head-dim bucket)."""
    seen, out = set(), []
    hook = _set_tma_blocks if kernel.endswith("_tma") else None
    for lst in _CONFIGS[kernel][_arch(kernel)].values():
        for c in lst:
            if c not in seen:
                seen.add(c)
                out.append(_cfg(*c, pre_hook=hook))
    return out


def _autotuning():
    """LLMKERN_ATTN_AUTOTUNE=0: the first candidate of each head-dim bucket, no search (a
    correctness run on a fresh GPU would otherwise spend minutes compiling every candidate)."""
    return os.environ.get("LLMKERN_ATTN_AUTOTUNE", "1") != "0"


def _tune_top():
    """How many candidates (in list order) the autotuner tries: all, LLMKERN_ATTN_TUNE_TOP=N of
    them (compile time on a fresh machine), or one with LLMKERN_ATTN_AUTOTUNE=0."""
    if not _autotuning():
        return 1
    return max(1, int(os.environ.get("LLMKERN_ATTN_TUNE_TOP", "1000")))


def _pruner(kernel):
    def prune(configs, named_args, **kwargs):
        d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 64))
        dv = named_args.get("BLOCK_DV", kwargs.get("BLOCK_DV", d))
        cands = _CONFIGS[kernel][_arch(kernel)][_d_bucket(d, dv)]
        want = set(cands[:_tune_top()])
        kept = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in want]
        return kept or configs[:1]
    return prune


# IS_CAUSAL is a plain, unspecialised int: causal and not tune apart but share compiled kernels
# (the masks come from the window bounds L, R, so the kernels never read it)
_TUNE_KEY = ["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_KPM", "HAS_SOFTCAP", "IS_VARLEN", "DROPOUT", "HAS_ALIBI",
             "seq_bucket"]


def _autotune(fn, configs, prune):
    kw = dict(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune})
    import inspect

    if "cache_results" in inspect.signature(triton.autotune).parameters:
        # persist the choice in Triton's cache dir across processes (Triton skips this for config
        # lists with pre-hooks: the TMA variants are re-tuned in each process)
        kw["cache_results"] = True
    return triton.autotune(**kw)(fn)


@functools.lru_cache(maxsize=None)
def _tuned(name):
    fn = {"fwd": _attn_fwd, "fwd_tma": _attn_fwd_tma, "dkdv": _attn_bwd_dkdv, "dkdv_tma": _attn_bwd_dkdv,
          "dq": _attn_bwd_dq, "dq_tma": _attn_bwd_dq}[name]
    return _autotune(fn, _all_configs(name), _pruner(name))


def interpreter_blocks():
    """Block sizes used under TRITON_INTERPRET=1: LLMKERN_ATTN_INTERP_BLOCK="BM" or "BM,BN"
    (each >= 16, powers of two; default 32). The GPU configs are asymmetric, so the tests run
    unequal blocks too."""
    spec = os.environ.get("LLMKERN_ATTN_INTERP_BLOCK", "32").split(",")
    bm = int(spec[0])
    bn = int(spec[1]) if len(spec) > 1 else bm
    return {"BLOCK_M": bm, "BLOCK_N": bn}


@functools.lru_cache(maxsize=None)
def _front(name):
    """The autotuned kernel behind a low-overhead launch front (see llmkern/kernels/_autotune.py)."""
    return _autotune_front.Tuned(_tuned(name))


def _launch(name, kernel, grid, args, kwargs):
    with on_device(*args):
        if _interpreting():
            blocks = interpreter_blocks()
            if name.endswith("_tma"):
                _set_tma_blocks(dict(zip(kernel.arg_names, args), **kwargs, **blocks))
            kernel[grid](*args, **kwargs, **blocks)
        else:
            _front(name)[grid](*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Launchers

def _last_contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def empty_out(q, dv):
    """The output of attention on q with value head dim dv: torch.empty_like(q) when dv is q's head
    dim; else the same memory order of q's dimensions (a [B, T, H, D] buffer seen as [B, H, T, D]
    gives a [B, T, H, Dv] one: transformers' transpose back is then free), dense. The fakes call it
    too, so torch.compile sees the strides the kernels produce."""
    if q.shape[-1] == dv:
        return torch.empty_like(q)
    lead = sorted(range(q.dim() - 1), key=lambda i: -q.stride(i))  # outermost first (a stable sort: ties in order)
    buf = q.new_empty([q.shape[i] for i in lead] + [dv])
    inv = [0] * (q.dim() - 1)
    for pos, i in enumerate(lead):
        inv[i] = pos
    return buf.permute(*inv, q.dim() - 1)


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(d):
    return max(16, next_power_of_2(d))


def _seq_bucket(n):
    return min(max(next_power_of_2(max(int(n), 1)), 64), 1 << 16)


def _window_args(window_left, window_right):
    """Window sides as kernel ints. Sides past UNBOUNDED are clamped to it: they see the same keys
    (sequences are far shorter), and the kernels' index sums (row + offset + side + 1) must stay
    inside int32, which a side such as 2**31 - 1 would overflow."""
    L = UNBOUNDED if window_left is None or window_left < 0 else min(int(window_left), UNBOUNDED)
    R = UNBOUNDED if window_right is None or window_right < 0 else min(int(window_right), UNBOUNDED)
    return L, R


def _softcap_args(scale, softcap):
    if softcap:
        return scale * LOG2E, scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0, 0.0


def _dropout_args(dropout_p, seed, batch_base, placeholder):
    """(SEED, drop_thr, drop_scale, drop_b0) kernel arguments: keep when hash >> 8 >= drop_thr,
    kept weights scaled by drop_scale = 1/(1-p). Without dropout the pointer is a placeholder."""
    if not dropout_p > 0:
        return placeholder, 0, 1.0, 0
    return (seed, *_dropout_params(dropout_p), int(batch_base))


def _dense_strides(t):
    """(batch, head, token) strides of [B, H, T, D] or varlen [T, H, D] (batch stride 0)."""
    s = t.stride()
    if len(s) == 4:
        return s[0], s[1], s[2]
    return 0, s[1], s[0]


_TMA = _tma.Switch("LLMKERN_ATTN_TMA", "llmkern.attention")


def use_tma(q, k, v, out):
    """Whether a dense call runs the tensor-descriptor kernels: sm_90+ (Hopper's copy engine),
    fp16/bf16, 4-D tensors with 16-byte aligned strides (see llmkern/kernels/_tma.py for
    LLMKERN_ATTN_TMA)."""
    return _TMA.allowed(q) and all(t.dim() == 4 and _tma.addressable(t) for t in (q, k, v, out))


def backward_tma_kernels():
    """Which backward kernels take the TMA variant (when use_tma allows it): LLMKERN_ATTN_TMA_BWD
    = "dq" (default), "all" / "1", or "0". On an H100 (bf16, D=128, fully autotuned) the TMA dq
    kernel ran 10-13% faster than the pointer one, the TMA dK/dV kernel 2-5% slower
    (benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-26-diag.log)."""
    mode = os.environ.get("LLMKERN_ATTN_TMA_BWD", "dq").strip().lower()
    if mode not in _BWD_TMA_MODES:
        raise ValueError(f"LLMKERN_ATTN_TMA_BWD must be one of {sorted(_BWD_TMA_MODES)}, got {mode!r}")
    return _BWD_TMA_MODES[mode]


_BWD_TMA_MODES = {"0": frozenset(), "dq": frozenset(("dq",)), "1": frozenset(("dkdv", "dq")),
                  "all": frozenset(("dkdv", "dq"))}


# CUDA caps a grid's y and z dimensions at 65535; the kernels put batch x heads there. Larger
# batches run as several launches over batch slices (a rare path: the results are concatenated).
MAX_GRID_YZ = 65535


def _batch_slices(B, per_batch):
    step = max(1, MAX_GRID_YZ // max(1, per_batch))
    return [(b0, min(B, b0 + step)) for b0 in range(0, B, step)]


# Where each argument's batch lives in the varlen layout: q tokens or k tokens, on dim 0 or 1.
_VARLEN_ROLES = {"attention_forward": ("q0", "k0", "k0"),                              # q, k, v
                 "attention_backward": ("q0", "q0", "k0", "k0", "q0", "q1")}          # dout, q, k, v, out, lse


def _split_batch(fn, B, per_batch, args, kw):
    """fn over batch slices when B * per_batch programs exceed the grid limit (None when one launch
    fits). Dense: every tensor's dim 0 is the batch. Varlen: the tokens of each slice's sequences,
    which costs one host sync of the cumulative lengths (only on this path)."""
    if B * per_batch <= MAX_GRID_YZ:  # the common case: one launch
        return None
    slices = _batch_slices(B, per_batch)
    if len(slices) <= 1:
        return None
    cu_q, cu_k = kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k")
    cq = cu_q.tolist() if cu_q is not None else None
    ck = cu_k.tolist() if cu_k is not None else None

    def cut(t, role, b0, b1):
        if t is None or cq is None:
            return None if t is None else t[b0:b1]
        lo, hi = (cq[b0], cq[b1]) if role[0] == "q" else (ck[b0], ck[b1])
        return t[lo:hi] if role[1] == "0" else t[:, lo:hi]

    roles = _VARLEN_ROLES[fn.__name__]
    outs = []
    for b0, b1 in slices:
        part = [cut(t, r, b0, b1) for t, r in zip(args, roles)]
        sub = dict(kw, key_padding_mask=cut(kw.get("key_padding_mask"), "q0", b0, b1),
                   batch_base=kw.get("batch_base", 0) + b0)  # dropout masks by global batch index
        if kw.get("alibi_slopes") is not None:  # [B, H] slopes by batch row (sequence), [H] as they are
            sub["alibi_slopes"] = alibi_rows(kw["alibi_slopes"], b0, b1)
        if "dlse" in kw:
            sub["dlse"] = cut(kw["dlse"], "q1", b0, b1)
        if cq is not None:
            sub["cu_seqlens_q"] = cu_q[b0:b1 + 1] - cq[b0]
            sub["cu_seqlens_k"] = cu_k[b0:b1 + 1] - ck[b0]
        outs.append(fn(*part, **sub))
    return outs


def alibi_rows(alibi_slopes, b0, b1):
    """The ALiBi slopes of batch rows b0..b1-1: a [B, H] tensor's rows, a [H] tensor itself."""
    return alibi_slopes[b0:b1] if alibi_slopes.dim() == 2 else alibi_slopes


def _alibi_args(alibi_slopes, placeholder):
    """(ALIBI pointer, stride_slopes) kernel arguments: float32 slopes [H] (stride 0: every batch row)
    or [B, H]; without ALiBi the pointer is a placeholder."""
    if alibi_slopes is None:
        return placeholder, 0
    a = alibi_slopes.to(torch.float32).contiguous()
    return a, (a.stride(0) if a.dim() == 2 else 0)


def attention_forward(q, k, v, *, scale, causal=False, window_left=-1, window_right=-1, softcap=0.0,
                      key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
                      max_seqlen_q=-1, max_seqlen_k=-1, dropout_p=0.0, seed=None, batch_base=0, sinks=None,
                      alibi_slopes=None):
    """Run the forward kernel. Returns (out like q with v's last dim Dv, lse float32).

    Dense: q [B, H, Tq, D], k [B, Hk, Tk, D], v [B, Hk, Tk, Dv], lse [B, H, Tq].
    Varlen (cu_seqlens given): q [total_q, H, D], k [total_k, Hk, D], v [total_k, Hk, Dv], lse [H, total_q].
    Window sides < 0 are unbounded; causal sets the right side to min(right, 0).
    dropout_p > 0: attention dropout with the mask of seed (int32 [2] on q's device) for batch rows
    batch_base.. (see llmkern/reference/attention.py, attention_dropout_keep); the LSE is the undropped one.
    sinks: [H] per-query-head sink logits (any float dtype; read as float32): they join each row's
    softmax denominator, and the returned LSE is the log of that whole denominator.
    alibi_slopes: float32 [H] or [B, H] (B = sequences for varlen): ALiBi, -slope * |i + Tk - Tq - j|
    added to the (softcapped) scores before the masks, Tq/Tk each sequence's lengths.
    """
    kw = dict(scale=scale, causal=causal, window_left=window_left, window_right=window_right, softcap=softcap,
              key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
              max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p, seed=seed,
              batch_base=batch_base, sinks=sinks, alibi_slopes=alibi_slopes)
    n_batch = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    parts = _split_batch(attention_forward, n_batch, q.shape[1], (q, k, v), kw)
    if parts is not None:  # (out in the one launch's layout, which the fake promises: cat gives a contiguous one)
        out = empty_out(_last_contig(q), v.shape[-1]).copy_(torch.cat([o for o, _ in parts], 0))
        return out, torch.cat([lse for _, lse in parts], 0 if cu_seqlens_q is None else 1)
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    out = empty_out(q, v.shape[-1])  # (q's layout, before the sign fold below replaces q by a dense tensor)
    if not softcap and scale <= 0:
        # _fwd_inner keeps the scores unscaled until the exponent (max(qk) * scale, masks as -inf
        # before the scale), which needs scale > 0: q.k * scale == (-q).k * |scale|, and scale 0
        # is attention with all scores 0. Same out and LSE; the backward takes the original q.
        q, scale = (torch.neg(q), -scale) if scale < 0 else (torch.zeros_like(q), 1.0)
    varlen = cu_seqlens_q is not None
    if varlen:
        total_q, H, D = q.shape
        Hk = k.shape[1]
        B = cu_seqlens_q.numel() - 1
        Tq = max_seqlen_q if max_seqlen_q and max_seqlen_q > 0 else total_q
        Tk = max_seqlen_k if max_seqlen_k and max_seqlen_k > 0 else k.shape[0]
        lse = torch.empty(H, total_q, device=q.device, dtype=torch.float32)
        s_lse = (0, lse.stride(0), lse.stride(1))
        cu_q, cu_k = (c.to(torch.int32).contiguous() for c in (cu_seqlens_q, cu_seqlens_k))  # read as [b], [b + 1]
    else:
        B, H, Tq, D = q.shape
        Hk, Tk = k.shape[1], k.shape[2]
        lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
        s_lse = lse.stride()
        cu_q = cu_k = lse  # unused
    Dv = v.shape[-1]
    if causal:
        window_right = 0 if window_right is None or window_right < 0 else min(window_right, 0)
    L, R = _window_args(window_left, window_right)
    kpm = key_padding_mask
    if kpm is not None:
        kpm = kpm.to(torch.bool).contiguous().view(torch.uint8)
    qk_scale, sc_in, sc_out = _softcap_args(scale, softcap)
    drop = _dropout_args(dropout_p, seed, batch_base, lse)
    sink_arg = lse if sinks is None else sinks.contiguous()  # (any float dtype: read as float32 in the kernels)
    alibi, s_alibi = _alibi_args(alibi_slopes, lse)
    BD, BDV = _block_d(D), _block_d(Dv)
    grid = lambda META: (cdiv(Tq, META["BLOCK_M"]), B * H)  # noqa: E731
    args = (q, k, v, out, lse, kpm if kpm is not None else lse, cu_q, cu_k, drop[0], sink_arg, alibi,
            qk_scale, sc_in, sc_out, *drop[1:],
            *_dense_strides(q), *_dense_strides(k), *_dense_strides(v), *_dense_strides(out),
            *s_lse, kpm.stride(0) if kpm is not None else 0, s_alibi,
            H, H // Hk, Tq, Tk, L, R, _seq_bucket(max(Tq, Tk)))
    kwargs = dict(HEAD_DIM=D, BLOCK_D=BD, HEAD_DIM_V=Dv, BLOCK_DV=BDV, IS_VARLEN=varlen, HAS_KPM=kpm is not None,
                  HAS_SOFTCAP=bool(softcap), IS_CAUSAL=int(bool(causal)), PREC=_prec(q.dtype),
                  DROPOUT=dropout_p > 0, HAS_SINKS=sinks is not None, HAS_ALIBI=alibi_slopes is not None)
    if not varlen and use_tma(q, k, v, out):
        descs = [_tma.descriptor(t) for t in (q, k, v, out)]
        tma_args = (*descs, lse, kpm if kpm is not None else lse, drop[0], sink_arg, alibi, qk_scale, sc_in, sc_out,
                    *drop[1:], *s_lse, kpm.stride(0) if kpm is not None else 0, s_alibi,
                    H, H // Hk, Tq, Tk, L, R, _seq_bucket(max(Tq, Tk)))
        tma_kwargs = {k_: v_ for k_, v_ in kwargs.items() if k_ != "IS_VARLEN"}
        if _TMA.run(lambda: _launch("fwd_tma", _attn_fwd_tma, grid, tma_args, tma_kwargs)):
            return out, lse
    _launch("fwd", _attn_fwd, grid, args, kwargs)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, *, scale, causal=False, window_left=-1, window_right=-1,
                       softcap=0.0, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
                       max_seqlen_q=-1, max_seqlen_k=-1, dlse=None, dropout_p=0.0, seed=None, batch_base=0,
                       sinks=None, alibi_slopes=None):
    """Gradients (dq, dk, dv) of the forward above; `dlse` is the gradient of the returned LSE.
    v, out and dout are Dv wide, q and k D wide (the forward's shapes).
    The dropout mask is regenerated from the seed, not stored.
    With sinks ([H], the forward's): `lse` is the sink-aware LSE the forward returned, which is all
    the kernels need; the result is (dq, dk, dv, dsinks) with dsinks = sink_grad(...) in sinks' dtype.
    alibi_slopes: the forward's; the kernels add the same bias when they recompute P (no slope gradient)."""
    kw = dict(scale=scale, causal=causal, window_left=window_left, window_right=window_right, softcap=softcap,
              key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
              max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dlse=dlse, dropout_p=dropout_p, seed=seed,
              batch_base=batch_base, sinks=None if sinks is None else sinks.float(), alibi_slopes=alibi_slopes)
    n_batch = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    parts = _split_batch(attention_backward, n_batch, q.shape[1], (dout, q, k, v, out, lse), kw)
    if parts is not None:  # (each gradient in its one-launch layout, as the fake promises)
        grads = tuple(torch.empty_like(_last_contig(t)).copy_(torch.cat([p[i] for p in parts], 0))
                      for i, t in enumerate((q, k, v)))
        if sinks is None:
            return grads
        # each slice's dsinks sums its rows in float32 (float32 sinks in kw): add them, cast once
        return grads + (torch.stack([p[3] for p in parts]).sum(0).to(sinks.dtype),)
    q, k, v, out, dout = (_last_contig(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    varlen = cu_seqlens_q is not None
    if varlen:
        total_q, H, D = q.shape
        Hk = k.shape[1]
        B = cu_seqlens_q.numel() - 1
        Tq = max_seqlen_q if max_seqlen_q and max_seqlen_q > 0 else total_q
        Tk = max_seqlen_k if max_seqlen_k and max_seqlen_k > 0 else k.shape[0]
        s_lse = (0, lse.stride(0), lse.stride(1))
        cu_q, cu_k = (c.to(torch.int32).contiguous() for c in (cu_seqlens_q, cu_seqlens_k))  # read as [b], [b + 1]
    else:
        B, H, Tq, D = q.shape
        Hk, Tk = k.shape[1], k.shape[2]
        s_lse = lse.stride()
        cu_q = cu_k = lse
    if causal:
        window_right = 0 if window_right is None or window_right < 0 else min(window_right, 0)
    L, R = _window_args(window_left, window_right)
    kpm = key_padding_mask
    if kpm is not None:
        kpm = kpm.to(torch.bool).contiguous().view(torch.uint8)
    qk_scale, sc_in, sc_out = _softcap_args(scale, softcap)
    Dv = v.shape[-1]
    BD, BDV = _block_d(D), _block_d(Dv)
    delta = torch.empty_like(lse)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    pre_bm = 64
    with on_device(out):
        _attn_bwd_preprocess[(cdiv(Tq, pre_bm), B * H)](  # rowsum(dO * O): both are Dv wide
            out, dout, dlse if dlse is not None else lse, delta, cu_q,
            *_dense_strides(out), *_dense_strides(dout), *s_lse, H, Tq,
            HEAD_DIM=Dv, BLOCK_D=BDV, IS_VARLEN=varlen, HAS_DLSE=dlse is not None, BLOCK_M=pre_bm)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    common = dict(HEAD_DIM=D, BLOCK_D=BD, HEAD_DIM_V=Dv, BLOCK_DV=BDV, IS_VARLEN=varlen, HAS_KPM=kpm is not None,
                  HAS_SOFTCAP=bool(softcap), IS_CAUSAL=int(bool(causal)), PREC=_prec(q.dtype),
                  DROPOUT=dropout_p > 0, HAS_ALIBI=alibi_slopes is not None)
    drop = _dropout_args(dropout_p, seed, batch_base, lse)
    alibi, s_alibi = _alibi_args(alibi_slopes, lse)
    kpm_arg = kpm if kpm is not None else lse
    s_m = kpm.stride(0) if kpm is not None else 0
    bucket = _seq_bucket(max(Tq, Tk))
    grid_kv = lambda META: (cdiv(Tk, META["BLOCK_N"]), B * Hk)  # noqa: E731
    grid_q = lambda META: (cdiv(Tq, META["BLOCK_M"]), B * H)  # noqa: E731

    def run(tma):  # tma: the kernels that take their TMA variant
        # boxes are set per config by _set_tma_blocks; the pointer kernels read the tensors directly
        desc_q, desc_do = (_tma.descriptor(t) for t in (q, dout)) if "dkdv" in tma else (q, dout)
        desc_k, desc_v = (_tma.descriptor(t) for t in (k, v)) if "dq" in tma else (k, v)
        _launch("dkdv_tma" if "dkdv" in tma else "dkdv", _attn_bwd_dkdv, grid_kv,
                (q, k, v, dout, lse, delta, dk, dv, kpm_arg, cu_q, cu_k, drop[0], alibi, desc_q, desc_do, scale,
                 qk_scale, sc_in, sc_out, *drop[1:], *_dense_strides(q), *_dense_strides(k), *_dense_strides(v),
                 *_dense_strides(dout), *s_lse, *_dense_strides(dk), *_dense_strides(dv), s_m, s_alibi,
                 Hk, H // Hk, Tq, Tk, L, R, bucket),
                dict(common, USE_TMA="dkdv" in tma))
        _launch("dq_tma" if "dq" in tma else "dq", _attn_bwd_dq, grid_q,
                (q, k, v, dout, lse, delta, dq, kpm_arg, cu_q, cu_k, drop[0], alibi, desc_k, desc_v, scale, qk_scale,
                 sc_in, sc_out, *drop[1:], *_dense_strides(q), *_dense_strides(k), *_dense_strides(v),
                 *_dense_strides(dout), *s_lse, *_dense_strides(dq), s_m, s_alibi, H, H // Hk, Tq, Tk, L, R, bucket),
                dict(common, USE_TMA="dq" in tma))

    tma = backward_tma_kernels() if not varlen and use_tma(q, k, v, dout) else frozenset()
    if not (tma and _TMA.run(lambda: run(tma))):
        run(frozenset())
    if sinks is None:
        return dq, dk, dv
    return dq, dk, dv, sink_grad(sinks, lse, delta, varlen)


def sink_grad(sinks, lse, delta, varlen=False):
    """d loss / d sinks [H] from the sink-aware LSE and delta = rowsum(dO * O) - dLSE (dense
    [B, H, Tq], varlen [H, total_q]).

    A sink's probability in row i is p_i = exp(sink - LSE_i); O_i = (sum_j e^s_j [keep_j] v_j) / Z_i
    depends on the sink only through Z_i, so dO_i/dsink = -p_i O_i, and dLSE_i/dsink = p_i: hence
    dsink = -sum_i p_i (dO_i . O_i - dLSE_i) = -sum_i p_i delta_i over the rows of the head. Dropout
    masks only the numerator, so this holds with dropout too. A plain torch sum: deterministic."""
    s = sinks.to(device=lse.device, dtype=torch.float32).clamp(max=1e30)  # as the kernels' _sink_logit
    s = s[:, None] if varlen else s[None, :, None]
    p = torch.where(lse == float("-inf"), 0.0, torch.exp(s - lse))  # (LSE = -inf only with sink -inf)
    g = -(p * delta.float())
    g = g.sum(1) if varlen else g.sum((0, 2))
    return g.to(sinks.dtype)


def default_scale(head_dim):
    return 1.0 / math.sqrt(head_dim)
