"""Triton KV-cache decode attention with split-K (flash-decoding), and its launcher.

q [B, H, Tq, D] (Tq = 1..a few new tokens) against k_cache [B, Hk, Tmax, D] and v_cache [B, Hk, Tmax, Dv]
(Dv, the value head dim, may differ from D: the output and the split partials are Dv wide) holding
cache_seqlens[b] valid keys per row (the new tokens included, at the end). Query t of row b sits
at position cache_seqlens[b] - Tq + t (bottom-right alignment).
Paged caches (block_table given): k_cache/v_cache are page pools [num_pages, Hk, page_size, D] (any
strides, so a token-major [num_pages, page_size, Hk, D] pool passed as .transpose(1, 2) works) and
key j of row b sits in page block_table[b, j // page_size], slot j % page_size.

- `_decode_split`: one program per (key split, block of packed query rows, batch*kv-head). The
  rows of a program are the GQA group's query heads times the Tq new tokens ("packed GQA"), so
  each K/V tile is read once for the whole group. Each split writes its partial output
  (normalised) and LSE in float32.
- `_decode_combine`: one program per (batch, head, token) merges the splits by their LSE. An
  attention sink (gpt-oss: a per-query-head logit in the softmax denominator, no value) joins here
  as one more partial, with LSE = sink and a zero output.
ALiBi (alibi_slopes [H] or [B, H]): the split kernel adds -slope * |pos - j| to the scores of each
packed row (its own query head's slope, loaded once per program), pos being the query's cache position.
The number of splits is chosen so that B * Hk * splits fills the GPU even for a small batch;
it depends only on static shapes (no host sync on cache_seqlens). A row whose length lies outside
0..capacity, or whose block table names a page outside the pool, reads nothing out of bounds and gets
NaN outputs and LSE (the host cannot check the values without a sync).
A float8 cache (float8_e4m3fn / float8_e5m2, vLLM's and FlashInfer's fp8 KV cache): the tiles are read as
stored (half the bytes of a 16-bit cache; decode is bound by them) and widened to q's dtype in registers; the
per-kv-head scales multiply the scores (K's) and the split's partial output (V's), never the tiles.
"""
import os

import torch
import triton
import triton.language as tl

from llmkern.kernels._common import cdiv, launches_on_device, next_power_of_2, sm_count
from llmkern.reference.attention import dequantize_kv
from llmkern.kernels.attention import (LOG2E, _alibi_args, _batch_slices, _block_d, _interpreting, _last_contig,
                                       _prec, _softcap_args, _tanh, _window_args, alibi_rows, empty_out)


@triton.jit
def _softmax_step(s, m_i, l_i):
    """One key tile of the online softmax (scores s in log2 units, -inf where hidden): (p, alpha, m_new, l_new),
    acc to be scaled by alpha and to gain p V. A row that has seen no key yet keeps m = -inf, l = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _store_partial(OP, LP, acc, m_i, l_i, row_bad, b64, h, t, split, row_ok, offs_v,
                   stride_opb, stride_oph, stride_opt, stride_ops, stride_lpb, stride_lph, stride_lpt,
                   DV: tl.constexpr):
    """A split's normalised partial output [rows, DV] and its LSE (log2 units), float32; NaN for bad rows."""
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    acc = tl.where(row_bad, float("nan"), acc)  # (the combine turns any NaN partial into a NaN row)
    lse2 = tl.where(row_bad, float("nan"), lse2)
    op = (OP + b64 * stride_opb + h[:, None].to(tl.int64) * stride_oph + t[:, None].to(tl.int64) * stride_opt
          + split * stride_ops + offs_v[None, :])
    tl.store(op, acc, mask=row_ok[:, None] & (offs_v[None, :] < DV))
    lp = LP + b64 * stride_lpb + h.to(tl.int64) * stride_lph + t.to(tl.int64) * stride_lpt + split
    tl.store(lp, lse2, mask=row_ok)


@triton.jit
def _key_rows(n0, end, b64, KPM, stride_kpmb, BT, stride_btb, NUM_PAGES, page_bad,
              stride_kb, stride_kt, stride_vb, stride_vt,
              HAS_KPM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tile n0..n0+BLOCK_N of batch row b: (offs_n, kmask, row offsets of K, of V, page_bad). kmask drops
    keys past `end`, those the padding mask hides (one byte per key) and, paged (PAGE > 0: the first strides are
    the page pool's, each key's page from the block table), those whose page lies outside the pool: page_bad
    records them (a bad block-table entry gives NaN, not a wild read)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kmask = offs_n < end
    if HAS_KPM:
        kmask = kmask & (tl.load(KPM + b64 * stride_kpmb + offs_n, mask=kmask, other=0) != 0)
    if PAGE > 0:
        page = tl.load(BT + b64 * stride_btb + offs_n // PAGE, mask=kmask, other=0).to(tl.int64)
        page_ok = (page >= 0) & (page < NUM_PAGES)
        page_bad = page_bad | (kmask & ~page_ok).to(tl.int32)
        kmask = kmask & page_ok
        slot = (offs_n % PAGE).to(tl.int64)
        k_rows = page * stride_kb + slot * stride_kt
        v_rows = page * stride_vb + slot * stride_vt
    else:
        k_rows = offs_n.to(tl.int64) * stride_kt
        v_rows = offs_n.to(tl.int64) * stride_vt
    return offs_n, kmask, k_rows, v_rows, page_bad


@triton.jit
def _packed_rows(SEQLENS, pid_m, pid_bh, HK, GROUP, Tq, T_CAP, BLOCK_M: tl.constexpr):
    """A split program's batch row and query rows: the GQA group's heads times the Tq new tokens, packed
    (row r = head g of the group, token t). Returns (b64, hk, seqlen, row_bad, row_ok, t, h, pos): row_bad when
    the row's length lies outside 0..T_CAP (a caller's bug the host cannot see without a sync: the kernel reads
    nothing past the row and returns NaN for it), pos the query positions (bottom-right aligned)."""
    b = pid_bh // HK
    hk = pid_bh % HK
    seqlen = tl.load(SEQLENS + b).to(tl.int32)
    row_bad = (seqlen < 0) | (seqlen > T_CAP)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * Tq
    t = r % Tq
    h = hk * GROUP + r // Tq
    return b.to(tl.int64), hk, seqlen, row_bad, row_ok, t, h, seqlen - Tq + t


@triton.jit
def _decode_split(Q, K, V, SEQLENS, BT, KPM, ALIBI, KS, VS, OP, LP,
                  qk_scale, sc_in, sc_out,
                  stride_qb, stride_qh, stride_qt,
                  stride_kb, stride_kh, stride_kt,
                  stride_vb, stride_vh, stride_vt,
                  stride_opb, stride_oph, stride_opt, stride_ops,
                  stride_lpb, stride_lph, stride_lpt, stride_btb, stride_kpmb, stride_slopes,
                  HK, GROUP, Tq, L, R, chunk, T_CAP, NUM_PAGES,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
                  PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KV_SCALE: tl.constexpr):
    split = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b64, hk, seqlen, row_bad, row_ok, t, h, pos = _packed_rows(SEQLENS, pid_m, pid_bh, HK, GROUP, Tq, T_CAP, BLOCK_M)
    if HAS_KV_SCALE:  # a float8 cache: K's scale joins the score scale (one multiply per score, as before)
        k_scale = tl.load(KS + hk)
        qk_scale = qk_scale * k_scale
        sc_in = sc_in * k_scale
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)  # v, the partial outputs: the value head dim
    q_ptrs = (Q + b64 * stride_qb + h[:, None].to(tl.int64) * stride_qh + t[:, None].to(tl.int64) * stride_qt
              + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if HAS_ALIBI:  # the packed rows span the group's query heads: one slope per row, times log2(e)
        slope = tl.load(ALIBI + b64 * stride_slopes + h, mask=row_ok, other=0.0).to(tl.float32)
        slope2 = tl.minimum(tl.maximum(slope, -1e30), 1e30) * 1.4426950408889634  # (as _alibi_slope2: no inf)
    # keys of this split that any row of the program can see
    start = split * chunk
    end = tl.minimum(tl.minimum(start + chunk, seqlen), T_CAP)
    pos_min = seqlen - Tq
    pos_max = seqlen - 1
    start = tl.maximum(start, pos_min - L)
    end = tl.minimum(end, pos_max + R + 1)
    # paged (PAGE > 0): the first stride is the page pool's, each key's page comes from the block table
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    if PAGE == 0:
        k_base += b64 * stride_kb
        v_base += b64 * stride_vb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    page_bad = tl.zeros([BLOCK_N], dtype=tl.int32)  # (reduced once after the loop: fewer registers)
    for n0 in range(start, end, BLOCK_N):
        offs_n, kmask, k_rows, v_rows, page_bad = _key_rows(
            n0, end, b64, KPM, stride_kpmb, BT, stride_btb, NUM_PAGES, page_bad,
            stride_kb, stride_kt, stride_vb, stride_vt, HAS_KPM, PAGE, BLOCK_N)
        # (a float8 cache's tiles widen to q's dtype in registers: the bytes read are halved, the MMAs unchanged)
        kt = tl.load(k_base + k_rows[None, :] + offs_d[:, None],
                     mask=kmask[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0).to(q.dtype)
        v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :],
                    mask=kmask[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0).to(q.dtype)
        qk = tl.dot(q, kt, input_precision=PREC)
        if HAS_SOFTCAP:
            s = _tanh(qk * sc_in) * sc_out
        else:
            s = qk * qk_scale
        rel = offs_n[None, :] - pos[:, None]
        if HAS_ALIBI:  # -slope * |pos - j| (log2 units, as s), after softcap and before the masks
            s = s - slope2[:, None] * tl.abs(rel).to(tl.float32)
        vis = (rel <= R) & (rel >= -L) & kmask[None, :]
        p, alpha, m_i, l_i = _softmax_step(tl.where(vis, s, float("-inf")), m_i, l_i)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    row_bad = row_bad | (tl.max(page_bad, 0) > 0)
    if HAS_KV_SCALE:  # V's scale: once on the partial output, not per value
        acc = acc * tl.load(VS + hk)
    _store_partial(OP, LP, acc, m_i, l_i, row_bad, b64, h, t, split, row_ok, offs_dv,
                   stride_opb, stride_oph, stride_opt, stride_ops, stride_lpb, stride_lph, stride_lpt, HEAD_DIM_V)


@triton.jit
def _decode_combine(OP, LP, O, LSE, SINKS, S,
                    stride_opb, stride_oph, stride_opt, stride_ops,
                    stride_lpb, stride_lph, stride_lpt,
                    stride_ob, stride_oh, stride_ot,
                    H, Tq,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                    HAS_SINKS: tl.constexpr):
    pid = tl.program_id(0)
    t = pid % Tq
    h = (pid // Tq) % H
    b = (pid // Tq) // H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lp = tl.load(LP + b.to(tl.int64) * stride_lpb + h * stride_lph + t * stride_lpt + offs_s,
                 mask=offs_s < S, other=float("-inf"))
    m = tl.max(lp, 0)
    if HAS_SINKS:  # the sink: one more partial with LSE sink (log2 units, as lp) and a zero output
        sink2 = tl.minimum(tl.load(SINKS + h).to(tl.float32), 1e30) * 1.4426950408889634  # (see _sink_logit)
        m = tl.maximum(m, sink2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lp - m_safe)
    denom = tl.sum(w, 0)
    if HAS_SINKS:
        denom += tl.math.exp2(sink2 - m_safe)
    op = tl.load(OP + b.to(tl.int64) * stride_opb + h * stride_oph + t * stride_opt
                 + offs_s[:, None] * stride_ops + offs_d[None, :],
                 mask=(offs_s[:, None] < S) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(op * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + t * stride_ot + offs_d,
             out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    lse = tl.where(denom == 0.0, float("-inf"), (m_safe + tl.math.log2(tl.where(denom == 0.0, 1.0, denom)))
                   * 0.6931471805599453)
    tl.store(LSE + pid, lse)


def _decode_config(D, rows):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the split kernel: memory-bound, so wide key
    tiles and a few pipeline stages; the packed rows (GQA group x new tokens) set BLOCK_M.
    LLMKERN_DECODE_CONFIG="BLOCK_N,warps,stages" overrides the rest (benchmarks/gpu_diag.py's decode
    section sweeps it)."""
    bm = min(max(16, next_power_of_2(rows)), 64)
    override = os.environ.get("LLMKERN_DECODE_CONFIG")
    if override:
        try:
            bn, warps, stages = (int(v) for v in override.split(","))
        except ValueError:
            raise ValueError(f"LLMKERN_DECODE_CONFIG must be 'BLOCK_N,num_warps,num_stages', got {override!r}") from None
        if bn < 16 or bn & (bn - 1) or warps not in (1, 2, 4, 8, 16) or stages < 1:
            raise ValueError(f"LLMKERN_DECODE_CONFIG: BLOCK_N a power of two >= 16, warps in 1..16 (powers of "
                             f"two), stages >= 1; got {override!r}")
        return bm, bn, warps, stages
    if D <= 64:
        return bm, 128, 4, 3
    if D <= 128:
        return bm, 64, 4, 3
    return bm, 32, 4, 2


def choose_num_splits(B, Hk, m_blocks, Tmax, block_n, device):
    if device.type != "cuda":
        return max(1, min(4, cdiv(Tmax, 4 * block_n)))
    programs = B * Hk * m_blocks
    target = 2 * sm_count(device)
    splits = cdiv(target, programs)
    # each split gets at least 4 key tiles
    return int(max(1, min(splits, cdiv(Tmax, 4 * block_n), 128)))


def fp8_in_registers(dtype, device):
    """Whether the decode kernel reads a cache of `dtype` (float8) itself: Triton converts float8_e4m3fn on
    sm_89+ only (Ada, Hopper); float8_e5m2 everywhere."""
    if dtype != torch.float8_e4m3fn or device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def cache_pages(cache, block_table, device):
    """(page size, each row's capacity Tmax, the block table as int32 on `device`) of a KV cache: a dense cache
    [B, Hk, Tmax, D] has page size 0 (no block table); a page pool [num_pages, Hk, page_size, D] holds
    pages_per_row * page_size keys per row."""
    if block_table is None:
        return 0, cache.shape[2], None
    page = cache.shape[2]
    return page, block_table.shape[1] * page, block_table.to(device=device, dtype=torch.int32).contiguous()


@launches_on_device
def attention_decode(q, k_cache, v_cache, cache_seqlens, *, scale, causal=True, window_left=-1,
                     window_right=-1, softcap=0.0, num_splits=0, block_table=None, sinks=None,
                     key_padding_mask=None, alibi_slopes=None, k_scale=None, v_scale=None):
    """Returns (out [B, H, Tq, Dv] like q, lse [B, H, Tq] float32), Dv = v_cache's last dim (may differ
    from q/k_cache's D). block_table (int32 [B, pages per row]): k_cache/v_cache are page pools
    [num_pages, Hk, page_size, D or Dv]. sinks: [H] per-query-head
    sink logits (read as float32), counted in the softmax denominator and in the LSE.
    key_padding_mask: [B, Tmax] bool, False = a cache slot no query sees (indexed by the key's logical
    position, paged caches too). alibi_slopes: float32 [H] or [B, H]: ALiBi, -slope * |pos - j| with pos
    the query's position (Tk = the row's cache length). k_cache / v_cache may be float8 (one dtype), read as
    x * k_scale / x * v_scale (float32 [Hk], or None: 1), widened to q's dtype in registers."""
    if (k_scale is None) != (v_scale is None):  # (the kernel takes both or neither: a missing one is 1)
        ones = torch.ones(k_cache.shape[1], dtype=torch.float32, device=q.device)
        k_scale, v_scale = (ones if k_scale is None else k_scale), (ones if v_scale is None else v_scale)
    if k_cache.dtype != q.dtype and not fp8_in_registers(k_cache.dtype, q.device):
        # (Triton converts float8_e4m3fn only on sm_89+: older GPUs read a dequantized copy)
        k_cache, v_cache = dequantize_kv(k_cache, k_scale, q.dtype), dequantize_kv(v_cache, v_scale, q.dtype)
        k_scale = v_scale = None
    slices = _batch_slices(q.shape[0], k_cache.shape[1])  # the split grid's z is B * Hk (<= 65535)
    if len(slices) > 1:
        def rows(t, b0, b1):  # a page pool is shared by every row
            return t if block_table is not None else t[b0:b1]
        # the slices write into one output in the layout of an unsliced call (the fake's: torch.cat would give a
        # contiguous one, whatever q's layout)
        q = _last_contig(q)
        out = empty_out(q, v_cache.shape[-1])
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        for b0, b1 in slices:
            out[b0:b1], lse[b0:b1] = attention_decode(
                q[b0:b1], rows(k_cache, b0, b1), rows(v_cache, b0, b1), cache_seqlens[b0:b1], scale=scale,
                causal=causal, window_left=window_left, window_right=window_right, softcap=softcap,
                num_splits=num_splits, block_table=None if block_table is None else block_table[b0:b1], sinks=sinks,
                key_padding_mask=None if key_padding_mask is None else key_padding_mask[b0:b1],
                alibi_slopes=None if alibi_slopes is None else alibi_rows(alibi_slopes, b0, b1),
                k_scale=k_scale, v_scale=v_scale)
        return out, lse
    q, k_cache, v_cache = _last_contig(q), _last_contig(k_cache), _last_contig(v_cache)
    B, H, Tq, D = q.shape
    Hk = k_cache.shape[1]
    page, Tmax, block_table = cache_pages(k_cache, block_table, q.device)
    group = H // Hk
    if causal:
        window_right = 0 if window_right is None or window_right < 0 else min(window_right, 0)
    L, R = _window_args(window_left, window_right)
    qk_scale, sc_in, sc_out = _softcap_args(scale, softcap)
    rows = group * Tq
    Dv = v_cache.shape[-1]
    bm, bn, warps, stages = _decode_config(max(D, Dv), rows)  # K and V tiles: by the wider head dim
    if _interpreting():
        bn = 32
    m_blocks = cdiv(rows, bm)
    S = num_splits if num_splits and num_splits > 0 else choose_num_splits(B, Hk, m_blocks, Tmax, bn, q.device)
    chunk = cdiv(cdiv(Tmax, S), bn) * bn
    S = cdiv(Tmax, chunk) if Tmax > 0 else 1
    BD, BDV = _block_d(D), _block_d(Dv)
    seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    op = torch.empty(B, H, Tq, S, Dv, device=q.device, dtype=torch.float32)
    lp = torch.empty(B, H, Tq, S, device=q.device, dtype=torch.float32)
    extra = {} if _interpreting() else dict(num_warps=warps, num_stages=stages)
    # (a bool mask's own bytes, as the dense kernels read it: a view, no copy per decoded token)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous().view(torch.uint8)
    alibi, s_alibi = _alibi_args(alibi_slopes, seqlens)
    _decode_split[(S, m_blocks, B * Hk)](
        q, k_cache, v_cache, seqlens, seqlens if block_table is None else block_table,
        seqlens if kpm is None else kpm, alibi, seqlens if k_scale is None else k_scale,
        seqlens if v_scale is None else v_scale, op, lp,
        qk_scale, sc_in, sc_out,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        op.stride(0), op.stride(1), op.stride(2), op.stride(3),
        lp.stride(0), lp.stride(1), lp.stride(2), 0 if block_table is None else block_table.stride(0),
        0 if kpm is None else kpm.stride(0), s_alibi,
        Hk, group, Tq, L, R, chunk, Tmax, k_cache.shape[0] if block_table is not None else 0,
        HEAD_DIM=D, BLOCK_D=BD, HEAD_DIM_V=Dv, BLOCK_DV=BDV, HAS_SOFTCAP=bool(softcap), PREC=_prec(q.dtype), PAGE=page,
        BLOCK_M=bm, BLOCK_N=bn, HAS_KPM=kpm is not None, HAS_ALIBI=alibi_slopes is not None,
        HAS_KV_SCALE=k_scale is not None, **extra)
    out = empty_out(q, Dv)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    sink_arg = lse if sinks is None else sinks.contiguous()  # (any float dtype: read as float32 in the kernel)
    _decode_combine[(B * H * Tq,)](
        op, lp, out, lse, sink_arg, S,
        op.stride(0), op.stride(1), op.stride(2), op.stride(3),
        lp.stride(0), lp.stride(1), lp.stride(2),
        out.stride(0), out.stride(1), out.stride(2), H, Tq,
        HEAD_DIM=Dv, BLOCK_D=BDV, BLOCK_S=max(2, next_power_of_2(S)), HAS_SINKS=sinks is not None)  # outputs: Dv
    return out, lse


__all__ = ["attention_decode", "cache_pages", "choose_num_splits", "fp8_in_registers", "LOG2E"]


# ----------------------------------------------------------------------------- appending new k / v

@triton.jit
def _kv_append(K, V, KC, VC, SEQLENS, BT, T_NEW, D_K, D_V, PAGE, N_PAGES, CAP,
               s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
               s_kcp, s_kch, s_kct, s_kcd, s_vcp, s_vch, s_vct, s_vcd, s_btb, s_btp,
               PAGED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program per (batch row b, new token i) and kv head: copies k[b, h, i] and v[b, h, i] (as raw bits)
    into slot pos % PAGE of page BT[b, pos // PAGE], pos = SEQLENS[b] + i (a dense cache is one page per row). A
    position past the row's capacity or a page outside the pool writes nothing: the decode kernel then reads the
    row's bad position or page as NaN outputs, never another sequence's page (TRITON_DEBUG=1: a device assert)."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = (pid // T_NEW).to(tl.int64)
    i = (pid % T_NEW).to(tl.int64)
    pos = tl.load(SEQLENS + b).to(tl.int64) + i
    ok = (pos >= 0) & (pos < CAP)
    if PAGED:
        page = tl.load(BT + b * s_btb + (pos // PAGE) * s_btp, mask=ok, other=-1).to(tl.int64)
        ok = ok & (page >= 0) & (page < N_PAGES)
    else:
        page = b
    tl.device_assert(ok, "attention_with_kvcache: a new token's cache position or page is out of range")
    slot = pos % PAGE
    offs = tl.arange(0, BLOCK_D)
    mask = (offs < D_K) & ok
    k = tl.load(K + b * s_kb + h * s_kh + i * s_kt + offs * s_kd, mask=mask)
    tl.store(KC + page * s_kcp + h * s_kch + slot * s_kct + offs * s_kcd, k, mask=mask)
    offs_v = tl.arange(0, BLOCK_DV)
    mask_v = (offs_v < D_V) & ok
    v = tl.load(V + b * s_vb + h * s_vh + i * s_vt + offs_v * s_vd, mask=mask_v)
    tl.store(VC + page * s_vcp + h * s_vch + slot * s_vct + offs_v * s_vcd, v, mask=mask_v)


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@launches_on_device
def append_kv(k_cache, v_cache, cache_seqlens, k, v, block_table=None):
    """Write k [B, Hk, t, D] / v [B, Hk, t, Dv] into the caches at positions cache_seqlens[b] + i, in one launch
    (the indexing ops it replaces were 5 launches for a dense cache, 10-12 for a paged one, per layer and decode step).
    k_cache / v_cache: dense [B, Hk, Tmax, D] or, with block_table (int32 [B, pages per row]), page pools
    [num_pages, Hk, page_size, D]; any strides; k / v already in the caches' dtype (copied as raw bits, so float8
    and bfloat16 copy under the interpreter too)."""
    B, Hk, t = k.shape[:3]
    if B == 0 or t == 0 or Hk == 0:
        return
    paged = block_table is not None
    page = k_cache.shape[2]  # (a dense cache: one page of Tmax slots per row, page b)
    cap = block_table.shape[1] * page if paged else page
    bits = _BITS[k_cache.element_size()]
    kc, vc, kb, vb = (x.view(bits) for x in (k_cache, v_cache, k, v))
    bt = block_table if paged else cache_seqlens  # (unread when dense)
    D, Dv = k.shape[3], v.shape[3]
    _kv_append[(B * t, Hk)](
        kb, vb, kc, vc, cache_seqlens, bt, t, D, Dv, page, k_cache.shape[0], cap,
        *kb.stride(), *vb.stride(), *kc.stride(), *vc.stride(), *(bt.stride() if paged else (0, 0)),
        PAGED=paged, BLOCK_D=next_power_of_2(D), BLOCK_DV=next_power_of_2(Dv), num_warps=1)
