"""Triton kernels and launchers for the fused LoRA linear (single and multi-adapter).

Math (PEFT shapes: W [N, K], A [n, R, K], B [n, N, R], x [M, K]):
    y  = x Wᵀ + b + s_a · (drop(x) A_aᵀ) B_aᵀ          a = adapter of the row (-1: base only)

Kernels (each one launch; the multi-adapter case is the same kernels with per-row adapter ids):
  _shrink_kernel   xs[M, R] = s_a · drop(X) A_aᵀ            (skinny GEMM, fp32 out, dropout fused)
  _gemm_kernel     out[M, N] = X Wᵀ + bias + mask ⊙ (xs LB_aᵀ)  (base GEMM, low-rank update in the
                   epilogue: one pass over x and W, the [M, R] intermediate stays small, y is
                   written once; the backward dx = dy W + mask ⊙ (dxs A) is the same kernel)
  _reduce_kernel   out[a, P, R] = Σ_{rows of a} drop(Y)ᵀ Z   (dB = dyᵀ xs, dA = dxsᵀ drop(x)),
                   split over rows for parallelism with a deterministic partial sum

Multi-adapter batches: the caller passes `perm` (sorted position -> original row), `sorted_ids`
and the segment starts. The shrink and the reductions walk the rows in adapter-sorted order through
`perm` (a tile then meets one or two adapters); the GEMM keeps the rows in place (the per-row ids
come from scattering sorted_ids back), so its main loop is the single-adapter one, TMA included, and
only its epilogue loops over the adapters present in a tile. xs / dxs are stored in the original
row order. One launch per stage handles any mix of adapters (and -1 rows) without host sync.

Passes over memory: forward = shrink (reads x) + GEMM (reads x, W; writes y); backward = shrink
of dy by Bᵀ, the dx GEMM (reads dy, W), and two row reductions (dy for dB, x for dA). dW, when
the weight trains, is one cuBLAS GEMM in the op layer. BA is never formed.

Dropout: keep(row, col) = hash(seed, row, col) >= p, a murmur3-finaliser hash on uint32 that the
reference (llmkern/reference/lora.py, `dropout_keep_mask`) reproduces bit for bit; the seed is an
int32 [2] device tensor (no host value: CUDA graphs and torch.compile keep working) and the
backward regenerates the mask from it instead of storing the mask.

Launchers take any strides but make inputs contiguous first (gradients from `.sum()` arrive as
stride-0 expanded tensors). Under TRITON_INTERPRET=1 they use one small fixed configuration;
on GPU the kernels are autotuned (LLMKERN_LORA_AUTOTUNE=0: one fixed configuration).

TMA (sm_90+, fp16/bf16, 16-byte aligned rows): the GEMM reads x and W through host
tensor descriptors instead of per-thread pointers (its own autotune candidates, "gemm_tma"), which
frees the address registers and lets the copy engine fill shared memory asynchronously; the
backward's Wᵀ is read as the row-major tensor under the view. LLMKERN_LORA_TMA=0 turns it off,
=force runs it under the interpreter too; a failure warns once and falls back to the pointer kernel.
"""
import os

import triton
import triton.language as tl
import torch

from llmkern._backend import triton_interpreting
from llmkern.kernels import _autotune as _autotune_front
from llmkern.kernels import _tma
from llmkern.kernels import nf4 as _nf4
from llmkern.kernels.nf4 import block_scales as _block_scales, nf4_levels as _nf4_levels, scale_blocks as _scale_blocks
from llmkern.kernels._common import cdiv, mma_precision, next_power_of_2, on_device, sm_count
from llmkern.kernels._common import dropout_params  # (the launchers below; tests read it here)
from llmkern.kernels._common import fmix32 as _fmix32
from llmkern.kernels._common import seed_keys as _seed_keys
from llmkern.kernels._common import split_rows as _split_rows
from llmkern.reference.lora import seed_words, seed_words_tensor  # the int seed -> int32 words (re-exported)

_HASH_COL = 0x9E3779B1


# ----------------------------------------------------------------------------- dropout hash

@triton.jit
def _keep_mask(rows, cols, SEED, threshold):
    """[len(rows), len(cols)] bool: hash(seed, row, col) >> 8 >= threshold (= round(p * 2^24)).

    SEED points at two int32 words (seed0, seed1) on the device: no host value, so dropout works
    under CUDA graphs and torch.compile with a seed drawn by torch.randint on the device."""
    k0, k1 = _seed_keys(SEED)
    hr = _fmix32(rows.to(tl.uint32) ^ k0)
    hc = cols.to(tl.uint32) * 0x9E3779B1 + k1
    h = _fmix32(hr[:, None] ^ hc[None, :])
    return (h >> 8).to(tl.int32) >= threshold


# ----------------------------------------------------------------------------- kernels

@triton.jit(do_not_specialize=["threshold"])
def _shrink_kernel(X, A, OUT, ROWS, IDS, SCALES, scale,
                   M, K, R, n_adapters, SEED, threshold, inv_keep,
                   sxm, sxk, sa_a, sa_r, sa_k, som, sor,
                   HAS_IDS: tl.constexpr, DROPOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   PRECISION: tl.constexpr):
    """OUT[rows[m], r] = s_a · Σ_k drop(X[rows[m], k]) A[a_m, r, k]: tiles walk the rows in sorted
    order (few adapters per tile), results land in the original row order."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    if HAS_IDS:
        rows = tl.load(ROWS + offs_m, mask=mask_m, other=0).to(tl.int64)
        ids = tl.load(IDS + offs_m, mask=mask_m, other=-1).to(tl.int32)
        lo = tl.min(tl.where(ids >= 0, ids, n_adapters), axis=0)
        hi = tl.minimum(tl.max(ids, axis=0), n_adapters - 1)
    else:
        rows = offs_m.to(tl.int64)
        ids = tl.zeros([BLOCK_M], dtype=tl.int32)
        lo = 0
        hi = 0
    total = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for a in range(lo, hi + 1):
        sel = mask_m & (ids == a)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mk = kk < K
            x = tl.load(X + rows[:, None] * sxm + kk[None, :] * sxk,
                        mask=sel[:, None] & mk[None, :], other=0.0)
            if DROPOUT:
                keep = _keep_mask(rows, kk, SEED, threshold)
                x = tl.where(keep, x * inv_keep, 0.0).to(X.dtype.element_ty)
            w = tl.load(A + a * sa_a + offs_r[None, :] * sa_r + kk[:, None] * sa_k,
                        mask=mk[:, None] & mask_r[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if HAS_IDS:
            s = tl.load(SCALES + a).to(tl.float32)
        else:
            s = scale
        # torch.compile passes Python floats as fp64 scalars: keep the loop-carried sum fp32.
        total += tl.where(sel[:, None], acc * s, 0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * som + offs_r[None, :] * sor, total,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _base_ptr(X, W, rows, offs_n, mask_m, mask_n, K, sxm, sxk, swn, swk, acc,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += X[rows] Wᵀ of one tile through per-thread pointers (any strides)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * sxm + offs_k[None, :] * sxk
    w_ptrs = W + offs_n[None, :].to(tl.int64) * swn + offs_k[:, None] * swk
    for k0 in range(0, K, BLOCK_K):
        mk = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mk[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    return acc


@triton.jit
def _base_nf4(X, WQ, ABSMAX, PAIRS, STATE2, rows, n0, mask_m, K, N, sxm, sxk, row_bytes, acc,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, QBLOCK: tl.constexpr,
              W_T: tl.constexpr, NESTED: tl.constexpr):
    """acc += X[rows] Wᵀ of one tile with W in 4-bit NF4 (QLoRA): each W tile is read as packed bytes
    (a quarter of bf16's traffic) and dequantized in registers right before the dot. The stored weight
    is [out, in] with `row_bytes` bytes per row, in whole quantization blocks of QBLOCK elements, so a
    tile row needs one absmax per block it spans (NB = its width / QBLOCK, at least 1), not one per element.
    Forward (not W_T): the reduction runs along a stored row; the tile is loaded [BLOCK_N, BLOCK_K] and
    transposed. Backward dx = dy W (W_T): the reduction index is the stored row, the output columns run
    along it. NESTED: the absmax is double-quantized (kernels/nf4.py block_scales)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * sxm + offs_k[None, :] * sxk
    blocks_per_row = row_bytes // (QBLOCK // 2)
    if W_T:  # tile [BLOCK_K stored rows, BLOCK_N columns of them]
        pairs = n0 // 2 + tl.arange(0, BLOCK_N // 2)
        cols_b = n0 // QBLOCK + tl.arange(0, (BLOCK_N + QBLOCK - 1) // QBLOCK)
        w_bytes = offs_k[:, None].to(tl.int64) * row_bytes + pairs[None, :]
        w_scale = offs_k[:, None].to(tl.int64) * blocks_per_row + cols_b[None, :]
        mask_c = (2 * pairs < N)[None, :]
        mask_cb = (cols_b * QBLOCK < N)[None, :]
        step_bytes = BLOCK_K * row_bytes
        step_scale = BLOCK_K * blocks_per_row
    else:  # tile [BLOCK_N stored rows, BLOCK_K columns of them], transposed for the dot
        offs_n = n0 + tl.arange(0, BLOCK_N)
        pairs = tl.arange(0, BLOCK_K // 2)
        cols_b = tl.arange(0, (BLOCK_K + QBLOCK - 1) // QBLOCK)
        w_bytes = offs_n[:, None].to(tl.int64) * row_bytes + pairs[None, :]
        w_scale = offs_n[:, None].to(tl.int64) * blocks_per_row + cols_b[None, :]
        mask_r = (offs_n < N)[:, None]
        step_bytes = BLOCK_K // 2
        step_scale = 0  # advanced per iteration below (BLOCK_K may be less than one block)
    for k0 in range(0, K, BLOCK_K):
        mk = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mk[None, :], other=0.0)
        if W_T:
            lv = _nf4_levels(WQ, PAIRS, w_bytes, mk[:, None] & mask_c)
            sc = _block_scales(ABSMAX, STATE2, w_scale, mk[:, None] & mask_cb, NESTED)
            w = _scale_blocks(lv, sc, (BLOCK_N + QBLOCK - 1) // QBLOCK)
        else:
            lv = _nf4_levels(WQ, PAIRS, w_bytes, mask_r & (k0 + 2 * pairs < K)[None, :])
            sc = _block_scales(ABSMAX, STATE2, w_scale + k0 // QBLOCK, mask_r & (k0 + cols_b * QBLOCK < K)[None, :],
                               NESTED)
            w = tl.trans(_scale_blocks(lv, sc, (BLOCK_K + QBLOCK - 1) // QBLOCK))
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * sxk
        w_bytes += step_bytes
        w_scale += step_scale
    return acc


@triton.jit
def _base_tma(desc_x, desc_w, m0, n0, K, acc,
              BLOCK_K: tl.constexpr, W_T: tl.constexpr, PRECISION: tl.constexpr):
    """acc += X Wᵀ of one tile through the tensor-memory accelerator (sm_90+): 2-D boxes of X [M, K]
    and of W [N, K] (W_T: of the row-major [K, N] tensor under the backward's Wᵀ view). Boxes past
    the tensor's edge arrive zero-filled, exactly what the masked pointer loads read, and the
    pipeliner turns the loads into asynchronous bulk copies with no address registers."""
    for k0 in range(0, K, BLOCK_K):
        x = desc_x.load([m0, k0])
        if W_T:
            w = desc_w.load([k0, n0])
        else:
            w = desc_w.load([n0, k0]).T
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["threshold"])
def _gemm_kernel(X, W, WQ_ABSMAX, WQ_PAIRS, WQ_STATE2, BIAS, XS, LB, OUT, IDS, desc_x, desc_w,
                 M, N, K, R, n_adapters, SEED, threshold, inv_keep,
                 sxm, sxk, swn, swk, sxs_m, sxs_r, slb_a, slb_n, slb_r, som, son,
                 HAS_BIAS: tl.constexpr, HAS_IDS: tl.constexpr, EPI_DROPOUT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
                 USE_TMA: tl.constexpr, W_T: tl.constexpr, W_NF4: tl.constexpr, QBLOCK: tl.constexpr,
                 NESTED: tl.constexpr):
    """OUT[m, n] = Σ_k X[m, k] W[n, k] + bias[n] + mask ⊙ Σ_r XS[m, r] LB[a_m, n, r].

    Rows in their original order, multi-adapter batches too (IDS: the adapter of each row), so the
    main loop is the single-adapter one (TMA included) and only the epilogue loops over the
    adapters present in the tile. USE_TMA: X and W come through the descriptors desc_x / desc_w;
    otherwise those arguments are the raw tensors and unused. W_NF4: W holds 4-bit NF4 codes (QLoRA),
    scaled per QBLOCK elements by WQ_ABSMAX, with the level-pair table WQ_PAIRS (otherwise both are
    unused); W_T then tells the backward's Wᵀ, NESTED a double-quantized absmax decoded with WQ_STATE2
    (see _base_nf4)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if USE_TMA:
        acc = _base_tma(desc_x, desc_w, pid_m * BLOCK_M, pid_n * BLOCK_N, K, acc, BLOCK_K, W_T, PRECISION)
    elif W_NF4:  # swn: bytes per stored row
        acc = _base_nf4(X, W, WQ_ABSMAX, WQ_PAIRS, WQ_STATE2, rows, pid_n * BLOCK_N, mask_m, K, N, sxm, sxk, swn,
                        acc, BLOCK_N, BLOCK_K, PRECISION, QBLOCK, W_T, NESTED)
    else:
        acc = _base_ptr(X, W, rows, offs_n, mask_m, mask_n, K, sxm, sxk, swn, swk, acc, BLOCK_K, PRECISION)

    # epilogue: the low-rank update, one small dot per adapter present in the tile
    if HAS_IDS:
        ids = tl.load(IDS + offs_m, mask=mask_m, other=-1).to(tl.int32)
        lo = tl.min(tl.where(ids >= 0, ids, n_adapters), axis=0)
        hi = tl.minimum(tl.max(ids, axis=0), n_adapters - 1)
    else:
        ids = tl.zeros([BLOCK_M], dtype=tl.int32)
        lo = 0
        hi = 0
    offs_r = tl.arange(0, BLOCK_R)
    # without an epilogue mask the update accumulates straight into acc (one [BM, BN] fp32 tile
    # live, no extra registers); with the dropout mask it needs its own accumulator
    if EPI_DROPOUT:
        lora = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        lora = acc
    for a in range(lo, hi + 1):
        sel = mask_m & (ids == a)
        if HAS_IDS:
            broken = tl.zeros([BLOCK_N], dtype=tl.int32)  # columns where adapter a's factor is not finite
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            mr = rr < R
            xs = tl.load(XS + offs_m[:, None] * sxs_m + rr[None, :] * sxs_r,
                         mask=sel[:, None] & mr[None, :], other=0.0)
            lb = tl.load(LB + a * slb_a + offs_n[None, :] * slb_n + rr[:, None] * slb_r,
                         mask=mr[:, None] & mask_n[None, :], other=0.0)
            if HAS_IDS:
                # The other adapters' rows enter this dot as zeros, and 0 * inf is NaN: a non-finite
                # entry is zeroed here, and only adapter a's own rows are made NaN below.
                finite = tl.abs(lb.to(tl.float32)) <= 3.4028234663852886e38
                broken = tl.maximum(broken, tl.max(tl.where(finite, 0, 1), axis=0))
                lb = tl.where(finite, lb, 0.0).to(lb.dtype)
            lora = tl.dot(xs.to(lb.dtype), lb, lora, input_precision=PRECISION)
        if HAS_IDS:
            lora = tl.where(sel[:, None] & (broken[None, :] > 0), float("nan"), lora)
    if EPI_DROPOUT:
        keep = _keep_mask(rows, offs_n, SEED, threshold)
        acc += tl.where(keep, lora * inv_keep, 0.0).to(tl.float32)  # inv_keep may be fp64
    else:
        acc = lora
    if HAS_BIAS:
        b = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += b[None, :]
    tl.store(OUT + rows[:, None] * som + offs_n[None, :] * son, acc.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["threshold"])
def _reduce_kernel(Y, Z, OUT, ROWS, SEG, M, P, R, split,
                   SEED, threshold, inv_keep,
                   sym, syp, szm, szr, so_s, so_a, so_p, so_r,
                   HAS_IDS: tl.constexpr, DROPOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                   PRECISION: tl.constexpr):
    """OUT[s, a, p, r] = Σ_{m in chunk s of segment a} drop(Y[rows[m], p]) Z[rows[m], r]."""
    pid_p = tl.program_id(0)
    a = tl.program_id(1)
    s = tl.program_id(2)
    num_r = tl.cdiv(R, BLOCK_R)
    pid_r = pid_p % num_r
    pid_p = pid_p // num_r
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_p = offs_p < P
    mask_r = offs_r < R
    if HAS_IDS:
        start = tl.load(SEG + a).to(tl.int32)
        end = tl.load(SEG + a + 1).to(tl.int32)
    else:
        start = 0
        end = M
    m_lo, m_hi = _split_rows(start, end, split, s, BLOCK_M)
    acc = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mm = offs_m < m_hi
        if HAS_IDS:
            rows = tl.load(ROWS + offs_m, mask=mm, other=0).to(tl.int64)
        else:
            rows = offs_m.to(tl.int64)
        y = tl.load(Y + rows[:, None] * sym + offs_p[None, :] * syp,
                    mask=mm[:, None] & mask_p[None, :], other=0.0)
        if DROPOUT:
            keep = _keep_mask(rows, offs_p, SEED, threshold)
            y = tl.where(keep, y * inv_keep, 0.0).to(Y.dtype.element_ty)
        z = tl.load(Z + rows[:, None] * szm + offs_r[None, :] * szr,
                    mask=mm[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(tl.trans(y), z.to(y.dtype), acc, input_precision=PRECISION)
    tl.store(OUT + s * so_s + a * so_a + offs_p[:, None] * so_p + offs_r[None, :] * so_r, acc,
             mask=mask_p[:, None] & mask_r[None, :])


# ----------------------------------------------------------------------------- autotuning

def _gemm_cfg(bm, bn, bk, w, s, pre_hook=None):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s,
                         pre_hook=pre_hook)


def _gemm_configs():
    return [_gemm_cfg(*c) for c in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4),
                                    (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                                    (64, 64, 64, 4, 3), (256, 128, 64, 8, 3)]]


# The TMA GEMM's candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) on sm_90: each compiles with no
# register spill and fits the 227 KB of shared memory a block may use, under Triton 3.6 and 3.8, in
# the forward (W) and the backward (Wᵀ, with the dropout epilogue where _prune_tma keeps it), as
# `python tests/test_lora_compile.py` reports. Their speed is for the autotuner to measure on the card.
_GEMM_TMA_TILES = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 8, 3),
                   (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]


# The NF4 GEMM (QLoRA) runs only for M <= LLMKERN_NF4_FUSED_MAX_M rows (kernels/nf4.py), where W's
# traffic is the cost: small row tiles give more column tiles to fill the SMs (at M = 1 and N = 4096,
# 32-column tiles make 128 programs for the 132 SMs of an H100). Each compiles for sm_90 with
# no spill (`python tests/test_lora_compile.py`); which wins is for the autotuner on the card.
_GEMM_NF4_TILES = [(16, 32, 128, 2, 4), (16, 64, 64, 4, 4), (16, 64, 128, 4, 3), (16, 128, 64, 4, 3),
                   (32, 128, 64, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3)]


def _nf4_tuner(M):
    """The NF4 GEMM's autotuner for M rows: decoding (M <= 16) and small batches tune apart, so that the
    tile chosen at one does not serve the other (M is not in the key: a tuning per batch size costs more)."""
    return "gemm_nf4_decode" if M <= 16 else "gemm_nf4"


def _gemm_nf4_configs():
    return [_gemm_cfg(*c) for c in _GEMM_NF4_TILES]


def _gemm_tma_configs():
    return [_gemm_cfg(*c, pre_hook=_set_tma_blocks) for c in _GEMM_TMA_TILES]


def _fits_dropout_epilogue(bm, bn, warps):
    """The dropout epilogue keeps a second [BM, BN] fp32 accumulator: both fit in registers at up to
    64 elements per thread each (128 per thread, say 128x256 on 8 warps, spills 0.5-1 KB)."""
    return bm * bn <= 64 * 32 * warps


def _prune_tma(configs, named_args, **kwargs):
    if not kwargs.get("EPI_DROPOUT"):
        return configs
    return [c for c in configs if _fits_dropout_epilogue(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)]


def _set_tma_blocks(nargs):
    """Config pre-hook of the TMA GEMM: each descriptor's box is the tile the config loads."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["desc_x"].block_shape = [bm, bk]
    nargs["desc_w"].block_shape = [bk, bn] if nargs["W_T"] else [bn, bk]


def _shrink_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in [(16, 256, 4, 3), (32, 128, 4, 4), (64, 128, 4, 4),
                                 (64, 64, 4, 4), (128, 64, 8, 3), (32, 256, 4, 3)]]


def _reduce_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_P": bp}, num_warps=w, num_stages=s)
            for bm, bp, w, s in [(64, 128, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4),
                                 (128, 64, 4, 3), (32, 128, 4, 4)]]


_tuned = {}

_GEMM_KEY = ["N", "K", "R", "swk", "HAS_IDS", "EPI_DROPOUT", "W_NF4", "W_T", "NESTED"]
# name: (raw kernel, autotune candidates, autotune key, early prune). The keys include the strides
# that tell the forward GEMM (W, K-contiguous) from the backward one (Wᵀ) and A from the Bᵀ view, so
# each gets its own configuration.
_KERNELS = {"gemm": (_gemm_kernel, _gemm_configs, _GEMM_KEY, None),
            "gemm_tma": (_gemm_kernel, _gemm_tma_configs, _GEMM_KEY, _prune_tma),
            "gemm_nf4": (_gemm_kernel, _gemm_nf4_configs, _GEMM_KEY, None),
            "gemm_nf4_decode": (_gemm_kernel, _gemm_nf4_configs, _GEMM_KEY, None),
            "shrink": (_shrink_kernel, _shrink_configs, ["K", "R", "sa_k", "HAS_IDS", "DROPOUT"], None),
            "reduce": (_reduce_kernel, _reduce_configs, ["P", "R", "HAS_IDS", "DROPOUT"], None)}

# Under the interpreter: one small fixed configuration per kernel.
_INTERP = {"gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
           "shrink": dict(BLOCK_M=16, BLOCK_K=32),
           "reduce": dict(BLOCK_M=16, BLOCK_P=32)}
_INTERP["gemm_tma"] = _INTERP["gemm_nf4"] = _INTERP["gemm_nf4_decode"] = _INTERP["gemm"]

_FIXED_GPU_TMA_TILE = (128, 256, 64, 8, 3)  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages

# One sensible GPU configuration per kernel, used when LLMKERN_LORA_AUTOTUNE=0 (fast test runs).
_FIXED_GPU = {"gemm": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
              # the H100's fastest TMA candidate at 8192x4096x4096 bf16 (0.393 ms vs 0.478 for 128x128)
              "gemm_tma": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
              "gemm_nf4": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
              "gemm_nf4_decode": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3),
              "shrink": dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
              "reduce": dict(BLOCK_M=64, BLOCK_P=128, num_warps=4, num_stages=3)}


def _kernel(name):
    """The raw kernel under the interpreter (fixed small blocks), an autotuned one on GPU."""
    raw, configs, key, prune = _KERNELS[name]
    if triton_interpreting():
        return raw, _INTERP[name]
    hook = _set_tma_blocks if name.endswith("_tma") else None
    if os.environ.get("LLMKERN_LORA_AUTOTUNE", "1") == "0":
        fixed = name + ":fixed"
        if fixed not in _tuned:  # a one-config autotuner: no benchmarking, same launch path
            meta = dict(_FIXED_GPU[name])
            w, st = meta.pop("num_warps"), meta.pop("num_stages")
            _tuned[fixed] = triton.autotune([triton.Config(meta, num_warps=w, num_stages=st, pre_hook=hook)],
                                            key=[])(raw)
        return _tuned[fixed], {}
    if name not in _tuned:
        prune = {"early_config_prune": prune} if prune else None
        _tuned[name] = triton.autotune(configs(), key=key, prune_configs_by=prune)(raw)
    return _tuned[name], {}


def _launch(name, wrap, grid, *args, **kwargs):
    kern, fixed = _kernel(name)
    if fixed and name.endswith("_tma"):  # the interpreter runs no config pre-hook: size the boxes here
        _set_tma_blocks(dict(zip(kern.arg_names, args), **kwargs, **fixed))
    if wrap is not None and _wrappable(kern):
        kern = wrap(kern)
    elif not fixed:  # an autotuner (GPU): launch through the low-overhead front
        front = getattr(kern, "_llmkern_front", None)
        if front is None:
            front = kern._llmkern_front = _autotune_front.Tuned(kern)
        kern = front
    with on_device(*args):
        kern[grid](*args, **kwargs, **fixed)


def _wrappable(kern):
    """torch.library.wrap_triton takes JIT functions and autotuners only; under some Triton versions'
    interpreter (3.6) a kernel is an InterpretedFunction, which runs fine unwrapped (eager)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    return isinstance(kern, (JITFunction, Autotuner))


def _block_r(R, cap=64):
    """Rank chunk: a power of two in [16, cap]; larger ranks loop over chunks. The GEMM epilogue
    uses cap 32 (sm_90 compile check: r = 64 at 128x256 tiles needs 254 registers with 64-wide
    chunks, 227 with 32)."""
    return min(cap, max(16, next_power_of_2(R)))


def seed_tensor(seed, device):
    """The kernels' seed argument: an int32 [2] tensor on `device` (from an int or a tensor)."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 2:
            raise ValueError(f"seed tensor must hold 2 int32 words, got shape {tuple(seed.shape)}")
        return seed.reshape(2).to(device=device, dtype=torch.int32)
    return seed_words_tensor(seed, device)


# ----------------------------------------------------------------------------- launchers

def _seed_arg(seed, p, like):
    if p <= 0:
        return like  # not read
    if not isinstance(seed, torch.Tensor):
        raise TypeError("the launchers take the dropout seed as an int32 [2] tensor (see seed_tensor)")
    return seed


def shrink(x, A, scale, scales=None, perm=None, sorted_ids=None, dropout_p=0.0, seed=None, wrap=None):
    """xs[M, R] fp32 = s_a · drop(x) A_aᵀ, in x's row order (with `perm`, the tiles walk the rows in
    adapter-sorted order, so each tile loops over few adapters).

    x [M, K]; A [n, R, K] (any strides: pass a transposed view to shrink by Bᵀ)."""
    x = x.contiguous()
    M, K = x.shape
    n, R, _ = A.shape
    out = torch.empty((M, R), device=x.device, dtype=torch.float32)
    has_ids = sorted_ids is not None
    thr, inv = dropout_params(dropout_p)
    sd = _seed_arg(seed, dropout_p, x)
    BR = _block_r(R)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(R, BR))  # noqa: E731
    _launch("shrink", wrap, grid,
            x, A, out, perm if has_ids else x, sorted_ids if has_ids else x,
            scales if has_ids else x, float(scale),
            M, K, R, n, sd, thr, inv,
            x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), out.stride(0), out.stride(1),
            HAS_IDS=has_ids, DROPOUT=dropout_p > 0, BLOCK_R=BR, PRECISION=mma_precision(x.dtype))
    return out


def gemm(x, W, bias, xs, LB, ids=None, dropout_p=0.0, seed=None, wrap=None):
    """out[M, N] = x Wᵀ + bias + mask ⊙ (xs LB_aᵀ).

    x [M, K]; W [N, K] (any strides), or an NF4Operand whose in_features are whole quantization blocks
    (4-bit, dequantized in the main loop; no TMA; other shapes go through nf4.gemm_weight's temporary);
    xs [M, R] fp32; LB [n, N, R] (any strides); ids: int32 [M],
    the adapter of each row (None: adapter 0 everywhere). The dropout mask (when dropout_p > 0)
    applies to the low-rank term at (row, n)."""
    x = x.contiguous()
    xs = xs.contiguous()
    M, K = x.shape
    N = W.shape[0]
    n, _, R = LB.shape
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    has_ids = ids is not None
    thr, inv = dropout_params(dropout_p)
    sd = _seed_arg(seed, dropout_p, x)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731

    nf4 = isinstance(W, _nf4.NF4Operand)
    if nf4 and W.stored_shape[1] % W.blocksize:
        raise ValueError(f"the NF4 GEMM needs in_features ({W.stored_shape[1]}) to be a multiple of the blocksize "
                         f"({W.blocksize}); dequantize W first (kernels.nf4.gemm_weight does)")
    w_arg, absmax, pairs = (W.packed, W.absmax, W.pairs) if nf4 else (W, x, x)
    state2 = W.state2 if nf4 and W.state2 is not None else x
    # the NF4 main loop's strides: bytes per stored row (the layout is fixed)
    sw = (W.stored_shape[1] // 2, 0) if nf4 else (W.stride(0), W.stride(1))

    def launch(w_tma):
        if w_tma is None:  # the pointer kernel: the descriptor arguments are unused
            desc_x, desc_w, w_t = x, w_arg, nf4 and W.transposed
        else:  # boxes are set per config by _set_tma_blocks
            desc_x, desc_w, w_t = _tma.descriptor(x), _tma.descriptor(w_tma[0]), w_tma[1]
        name = "gemm_tma" if w_tma is not None else (_nf4_tuner(M) if nf4 else "gemm")
        _launch(name, wrap, grid,
                x, w_arg, absmax, pairs, state2, bias if bias is not None else x, xs, LB, out, ids if has_ids else x,
                desc_x, desc_w,
                M, N, K, R, n, sd, thr, inv,
                x.stride(0), x.stride(1), *sw, xs.stride(0), xs.stride(1),
                LB.stride(0), LB.stride(1), LB.stride(2), out.stride(0), out.stride(1),
                HAS_BIAS=bias is not None, HAS_IDS=has_ids, EPI_DROPOUT=dropout_p > 0,
                BLOCK_R=_block_r(R, 32), PRECISION=mma_precision(x.dtype), USE_TMA=w_tma is not None, W_T=w_t,
                W_NF4=nf4, QBLOCK=W.blocksize if nf4 else 1, NESTED=nf4 and W.state2 is not None)

    # a traced op (torch.compile) cannot run config pre-hooks
    tma_ok = not (nf4 or _traced(wrap)) and _TMA.allowed(x) and _tma_compatible(x)
    w_tma = _tma_weight(W) if tma_ok else None
    if not (w_tma is not None and _TMA.run(lambda: launch(w_tma))):
        launch(None)  # rewrites every element of out
    return out


# ----------------------------------------------------------------------------- TMA (sm_90+)

_TMA = _tma.Switch("LLMKERN_LORA_TMA", "llmkern.lora")


def _tma_compatible(t):
    return t.dim() == 2 and _tma.addressable(t)


def _tma_weight(W):
    """(tensor, W_T): the row-major tensor the TMA GEMM reads W [N, K] from, W itself or, for a
    transposed view (the backward's Wᵀ), the [K, N] tensor under it; None when neither is addressable."""
    if _tma_compatible(W):
        return W, False
    if _tma_compatible(W.t()):
        return W.t(), True
    return None


def use_tma(x, W):
    """Whether the GEMM x Wᵀ can run the tensor-descriptor variant: sm_90+ (Hopper's copy engine),
    fp16/bf16, aligned x and W (see llmkern/kernels/_tma.py for LLMKERN_LORA_TMA)."""
    return _TMA.allowed(x) and _tma_compatible(x) and _tma_weight(W) is not None


def _traced(wrap):
    """True while torch.compile traces the op (wrap_triton then records the launch instead of
    running it): Inductor rejects the TMA configs' pre-hooks, so the traced graph keeps the pointer
    kernels. Eager calls of the op run with wrapping off and take the TMA path."""
    if wrap is None:
        return False
    try:
        from torch._library.triton import is_wrap_triton_enabled
    except ImportError:  # pragma: no cover
        return True
    return is_wrap_triton_enabled()


def _split_for(num_tiles, n, M, device):
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    want = max(1, (2 * sms) // max(1, num_tiles * n))
    return int(min(want, 32, max(1, M // 256)))


def reduce_rows(y, z, n, perm=None, seg=None, dropout_p=0.0, seed=None, wrap=None):
    """out[a, P, R] fp32 = Σ_{rows m of adapter a} drop(y[perm[m]])ᵀ z[m].

    y [M, P], z [M, R] fp32 (both in the original row order); perm: sorted position -> row;
    seg [n + 1]: where each adapter's rows start in the sorted order."""
    y = y.contiguous()
    z = z.contiguous()
    M, P = y.shape
    R = z.shape[1]
    has_ids = seg is not None
    BR = _block_r(R)
    split = _split_for(cdiv(P, 128) * cdiv(R, BR), n, M, y.device)
    part = torch.empty((split, n, P, R), device=y.device, dtype=torch.float32)
    thr, inv = dropout_params(dropout_p)
    sd = _seed_arg(seed, dropout_p, y)
    grid = lambda meta: (cdiv(P, meta["BLOCK_P"]) * cdiv(R, BR), n, split)  # noqa: E731
    _launch("reduce", wrap, grid,
            y, z, part, perm if has_ids else y, seg if has_ids else y, M, P, R, split,
            sd, thr, inv,
            y.stride(0), y.stride(1), z.stride(0), z.stride(1),
            part.stride(0), part.stride(1), part.stride(2), part.stride(3),
            HAS_IDS=has_ids, DROPOUT=dropout_p > 0, BLOCK_R=BR, PRECISION=mma_precision(y.dtype))
    return part.sum(0)  # a fresh tensor (deterministic order), also when split == 1


def base_matmul(x, W, bias=None, wrap=None):
    """x Wᵀ + bias [M, N] alone (no low-rank term): the 4-bit base layers of a QLoRA model that carry no
    adapter. W: an NF4Operand (its .t() for the backward's dx = dy W). Few rows run the GEMM kernel with an
    empty rank (its main loop dequantizes W); many rows dequantize W into a temporary for cuBLAS."""
    x = x.contiguous()
    W = _nf4.gemm_weight(W, x.shape[0], x.dtype, wrap)
    if isinstance(W, torch.Tensor):
        return torch.nn.functional.linear(x, W, bias)
    xs = x.new_empty((x.shape[0], 0), dtype=torch.float32)
    return gemm(x, W, bias, xs, x.new_empty((1, W.shape[0], 0)), wrap=wrap)


def lora_forward(x, W, bias, A, B, scaling, scalings=None, perm=None, sorted_ids=None,
                 dropout_p=0.0, seed=None, wrap=None):
    """(y [M, N], xs [M, R] fp32). x [M, K]; W [N, K] or an NF4Operand; A [n, R, K]; B [n, N, R]."""
    W = _nf4.gemm_weight(W, x.shape[0], x.dtype, wrap)
    xs = shrink(x, A, scaling, scalings, perm, sorted_ids, dropout_p, seed, wrap)
    y = gemm(x, W, bias, xs, B, _row_ids(perm, sorted_ids), 0.0, seed, wrap)
    return y, xs


def lora_backward(dy, x, W, A, B, xs, scaling, scalings=None, perm=None, sorted_ids=None, seg=None,
                  dropout_p=0.0, seed=None, wrap=None):
    """(dx [M, K], dA [n, R, K], dB [n, N, R]); never forms B A. An NF4 W is dequantized again (in the
    dx GEMM's main loop or into a temporary, as in the forward), never kept between the passes."""
    dy = dy.contiguous()
    W = _nf4.gemm_weight(W, dy.shape[0], dy.dtype, wrap)
    n = A.shape[0]
    # dxs[m] = s_a · dy[m] B_a   (shrink by Bᵀ: a [n, R, N] view of B)
    dxs = shrink(dy, B.transpose(1, 2), scaling, scalings, perm, sorted_ids, 0.0, seed, wrap)
    # dx = dy W + mask ⊙ (dxs A_a) / (1 - p)   (W as [K, N] view, A as [n, K, R] view)
    dx = gemm(dy, W.t(), None, dxs, A.transpose(1, 2), _row_ids(perm, sorted_ids), dropout_p, seed, wrap)
    # dB_a = dyᵀ xs_a (xs already carries s_a);  dA_a = dxs_aᵀ drop(x)
    dB = reduce_rows(dy, xs, n, perm, _seg(seg, sorted_ids), 0.0, seed, wrap)
    dA = reduce_rows(x, dxs, n, perm, _seg(seg, sorted_ids), dropout_p, seed, wrap)
    return dx, dA.transpose(1, 2).to(A.dtype).contiguous(), dB.to(B.dtype)


def _seg(seg, sorted_ids):
    return seg if sorted_ids is not None else None


def _row_ids(perm, sorted_ids):
    """The adapter of each row in the original order (ids[perm[i]] = sorted_ids[i]), for the GEMM,
    which keeps the rows in place; None for a single adapter."""
    if sorted_ids is None:
        return None
    return torch.empty_like(sorted_ids).scatter_(0, perm.long(), sorted_ids)
