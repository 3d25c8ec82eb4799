"""Triton kernels and launchers for the fused Mixture-of-Experts MLP (grouped GEMMs over experts).

No registration and no autograd here (llmkern/ops/moe.py does that). Semantics: those of
llmkern/reference/moe.py, for x [T, d], w_gate_up [E, 2F, d], w_down [E, d, F] and the routing
topk_ids / topk_weights [T, k]; a "pair" p = t·k + j is one (token, slot):

    h[p] = x[t] · w_gate_up[e]ᵀ = (g | u) [2F],  a[p] = act(g) · u [F],  o[p] = a[p] · w_down[e]ᵀ [d]
    y[t] = Σ_j topk_weights[t, j] · o[t·k + j]                                     (e = topk_ids[t, j])

Routing (`sort_pairs`, plain torch on the device, no host sync): a stable sort of the T·k expert ids
gives `order` (sorted position -> pair) and searchsorted gives `seg` [E + 1] (expert e owns the
sorted positions [seg[e], seg[e+1])). Nothing is padded or copied: the kernels walk the sorted
positions and gather rows through `order`.

Grid of the grouped GEMMs: (row tiles, column tiles). The row-tile count is a static upper bound,
cdiv(T·k, BLOCK_M) + min(E, T·k) (each expert's segment wastes at most one partial tile), so no
count leaves the GPU. Each program finds its expert itself (`_expert_tile`: a cumulative sum of
cdiv(count_e, BLOCK_M) over the E experts, one vector of at most 1024 lanes read from L2), which
keeps BLOCK_M an autotuning choice; programs past the last tile exit at once, experts with no
rows get no tile.

Kernels:
  _gate_up_kernel      forward GEMM 1: g and u tiles of the same rows and columns in one program (two
                       accumulators over one read of the gathered x tile), a = act(g)·u in the
                       epilogue; writes a [T·k, F] in sorted order, and h = (g | u) [T·k, 2F] when the
                       backward needs it.
  _sorted_gemm_kernel  OUT[order[r]] = IN[r] · B_eᵀ, rows in sorted order, results scattered to pair
                       order: forward GEMM 2 (o = a · w_downᵀ) and the backward's dx parts
                       (dh · w_gate_up, B the [d, 2F] view).
  _gate_up_bwd_kernel  the backward's first GEMM, ga = dy[t] · w_down[e] [F], with the activation's
                       backward in the epilogue: dh = w·ga·(u·act'(g) | act(g)) in sorted order, and
                       d topk_weights[p] = <dy[t], o[p]> = <ga, a> (a recomputed from h), written
                       as one partial per SLOT_N columns (summed in torch: deterministic).
  _wgrad_kernel        per-expert weight gradients, dW_e = Σ_{rows of e} Yᵀ Z: dw_down = (w·dy)ᵀ a
                       (a recomputed from h), dw_gate_up = dhᵀ x; split over rows for parallelism
                       with a deterministic partial sum (as llmkern/kernels/lora.py's _reduce_kernel).
  _combine_kernel      y[t] = Σ_j w[t, j] · o[t·k + j] (and dx[t] = Σ_j dxp[t·k + j]) in float32, a
                       fixed order over j: no atomics anywhere, so results are bitwise reproducible.

Memory kept for the backward: h = (g | u) [T·k, 2F] in the input dtype, order [T·k] and seg [E + 1]
(int32). a is not kept: the backward recomputes it elementwise from h where it needs it (the
dw_down reduction and the d topk_weights dot), so the saved activations are 2F per pair instead of
3F; o is not kept either (d topk_weights = <ga, a> needs no o). Forward temporaries: a [T·k, F],
o [T·k, d]. transformers' loop over experts keeps x rows, g|u, act(g), a, o and o·w per expert.

Pairs whose id is -1 (a dropped slot: llmkern.moe_mlp's "no expert", on every device; the op maps any
other id outside [0, E), which only CUDA leaves unchecked, to -1 as well) are never visited: they sort
before seg[0], the combine skips them and their d topk_weights is 0.

act: the constexpr ACT of llmkern/kernels/swiglu.py's _act (silu, tanh gelu, exact erf gelu), in the
gate-up epilogue (act(g)) and the backward's (act'(g)); tl.math.erf lowers to libdevice's erff on GPU.

Accumulation in float32; outputs in the input dtype. Launchers make their activations contiguous
(a gradient from `.sum()` arrives as a stride-0 expanded tensor); weights are read through their
strides. Under TRITON_INTERPRET=1 one small fixed configuration per kernel; on GPU the kernels are
autotuned (LLMKERN_MOE_AUTOTUNE=0: one fixed configuration each), float32 without TF32 (FMA dots, no
tensor cores) over its own smaller tiles (configs_for).
"""
import os

import torch
import triton
import triton.language as tl

from llmkern._backend import triton_interpreting
from llmkern.kernels import _autotune as _autotune_front
from llmkern.kernels._common import cdiv, launches_on_device, mma_precision, next_power_of_2, on_device, sm_count
from llmkern.kernels._common import sort_segments
from llmkern.kernels._common import split_rows as _split_rows
from llmkern.kernels.swiglu import ACTS
from llmkern.kernels.swiglu import _act

MAX_EXPERTS = 1024  # _expert_tile scans all experts in one vector of next_power_of_2(E) lanes


# ----------------------------------------------------------------------------- routing

def sort_pairs(topk_ids, n_experts):
    """(order int32 [T·k]: sorted position -> pair, seg int32 [E + 1]: expert e's sorted positions
    [seg[e], seg[e+1])). Stable: an expert's pairs stay in token order (deterministic sums, and
    neighbouring rows of a tile are neighbouring tokens). Ids outside [0, E) sort before seg[0] or
    after seg[E]."""
    _, order, seg = sort_segments(topk_ids, n_experts)
    return order, seg


# ----------------------------------------------------------------------------- shared pieces

@triton.jit
def _expert_tile(pid_m, SEG, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(e, rows, mask): the expert of row tile pid_m and its sorted positions (int64 [BLOCK_M]);
    e >= E for programs past the last tile. Tiles are numbered expert by expert, cdiv(count_e,
    BLOCK_M) each, so an expert with no rows owns no tile."""
    offs_e = tl.arange(0, BLOCK_E)
    me = offs_e < E
    lo = tl.load(SEG + offs_e, mask=me, other=0)
    hi = tl.load(SEG + offs_e + 1, mask=me, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M  # 0 on the masked lanes
    incl = tl.cumsum(tiles, 0)
    e = tl.sum((incl <= pid_m).to(tl.int32), 0)  # experts whose tiles all come before pid_m
    sel = offs_e == e
    first = tl.sum(tl.where(sel, incl - tiles, 0), 0)
    start = tl.sum(tl.where(sel, lo, 0), 0) + (pid_m - first) * BLOCK_M
    end = tl.sum(tl.where(sel, hi, 0), 0)
    rows = start + tl.arange(0, BLOCK_M)
    return e, rows.to(tl.int64), rows < end


@triton.jit
def _gathered_dot(A, rows_a, mask_m, sa_m, B, offs_n, mask_n, K, sb_n, sb_k, acc,
                  BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += A[rows_a, :K] · B[offs_n, :K]ᵀ (A's columns contiguous; B through its strides)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows_a[:, None] * sa_m + offs_k[None, :]
    b_ptrs = B + offs_n[None, :].to(tl.int64) * sb_n + offs_k[:, None] * sb_k
    for k0 in range(0, K, BLOCK_K):
        mk = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mk[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mk[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * sb_k
    return acc


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _gate_up_kernel(X, W, ORDER, SEG, A, H, E, F, K, k_top, rows_hint,
                    sxm, sw_e, sw_n, sw_k,
                    ACT: tl.constexpr, SAVE_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
    """A[r, n] = act(g) · u with g = X[tok(r)] · W_e[n]ᵀ, u = X[tok(r)] · W_e[F + n]ᵀ; H[r] = (g | u)."""
    e, rows, mask_m = _expert_tile(tl.program_id(0), SEG, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    tok = (tl.load(ORDER + rows, mask=mask_m, other=0) // k_top).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < F
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + tok[:, None] * sxm + offs_k[None, :]
    wg_ptrs = W + e.to(tl.int64) * sw_e + offs_n[None, :].to(tl.int64) * sw_n + offs_k[:, None] * sw_k
    wu_ptrs = wg_ptrs + F * sw_n
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # one x tile feeds both halves
        mk = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mk[None, :], other=0.0)
        wmask = mk[:, None] & mask_n[None, :]
        acc_g = tl.dot(x, tl.load(wg_ptrs, mask=wmask, other=0.0), acc_g, input_precision=PRECISION)
        acc_u = tl.dot(x, tl.load(wu_ptrs, mask=wmask, other=0.0), acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K * sw_k
        wu_ptrs += BLOCK_K * sw_k
    act, _ = _act(acc_g, ACT, False)
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(A + rows[:, None] * F + offs_n[None, :], (act * acc_u).to(A.dtype.element_ty), mask=mask)
    if SAVE_H:
        h_ptrs = H + rows[:, None] * (2 * F) + offs_n[None, :]
        tl.store(h_ptrs, acc_g.to(H.dtype.element_ty), mask=mask)
        tl.store(h_ptrs + F, acc_u.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _sorted_gemm_kernel(IN, B, ORDER, SEG, OUT, E, N, K, rows_hint,
                        sin_m, sb_e, sb_n, sb_k,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
    """OUT[order[r], n] = Σ_k IN[r, k] · B_e[n, k]: IN in sorted order, OUT [T·k, N] in pair order."""
    e, rows, mask_m = _expert_tile(tl.program_id(0), SEG, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _gathered_dot(IN, rows, mask_m, sin_m, B + e.to(tl.int64) * sb_e, offs_n, mask_n, K, sb_n, sb_k, acc,
                        BLOCK_K, PRECISION)
    pair = tl.load(ORDER + rows, mask=mask_m, other=0).to(tl.int64)
    tl.store(OUT + pair[:, None] * N + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gate_up_bwd_kernel(DY, WD, TW, ORDER, SEG, H, DH, DWP, E, F, K, k_top, n_pairs, n_slots, rows_hint,
                        sdy_m, sw_e, sw_n, sw_k,
                        ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_E: tl.constexpr, SLOT_N: tl.constexpr, PRECISION: tl.constexpr):
    """ga = DY[tok(r)] · WD_e (the [F, d] view: sw_n, sw_k its strides), then with (g, u) = H[r]:
    DH[r] = w·ga·(u·act'(g) | act(g)), DWP[slot, order[r]] = Σ_{n in slot} ga·act(g)·u."""
    pid_n = tl.program_id(1)
    e, rows, mask_m = _expert_tile(tl.program_id(0), SEG, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    pair = tl.load(ORDER + rows, mask=mask_m, other=0)
    tok = (pair // k_top).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < F
    ga = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ga = _gathered_dot(DY, tok, mask_m, sdy_m, WD + e.to(tl.int64) * sw_e, offs_n, mask_n, K, sw_n, sw_k, ga,
                       BLOCK_K, PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    h_ptrs = H + rows[:, None] * (2 * F) + offs_n[None, :]
    g = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act(g, ACT, True)
    # d topk_weights: <dy, o> = <ga, a>; one partial per SLOT_N columns, whatever BLOCK_N the autotuner
    # picked (this program's first slot gets the sum, the others 0), so every slot is written
    part = tl.sum(ga * act * u, 1)
    sub = tl.arange(0, BLOCK_N // SLOT_N)
    slots = pid_n * (BLOCK_N // SLOT_N) + sub
    vals = tl.where(sub[None, :] == 0, part[:, None], 0.0)
    tl.store(DWP + slots[None, :].to(tl.int64) * n_pairs + pair[:, None], vals,
             mask=mask_m[:, None] & (slots < n_slots)[None, :])
    w = tl.load(TW + pair, mask=mask_m, other=0.0).to(tl.float32)
    gw = ga * w[:, None]
    dh_ptrs = DH + rows[:, None] * (2 * F) + offs_n[None, :]
    tl.store(dh_ptrs, (gw * u * dact).to(DH.dtype.element_ty), mask=mask)
    tl.store(dh_ptrs + F, (gw * act).to(DH.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad_kernel(Y, Z, TW, ORDER, SEG, OUT, P, R, k_top, split,
                  sy_m, sz_m, so_s, so_e, so_p,
                  Y_TOKEN: tl.constexpr, Z_TOKEN: tl.constexpr, ACT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """OUT[s, e, p, r] = Σ_{sorted rows m in chunk s of expert e} Y'[m, p] · Z'[m, r], where
    Y' = TW[pair] · Y[tok] (Y_TOKEN, dy) or Y[m] (dh), and Z' = Z[tok] (Z_TOKEN, x) or act(g)·u with
    (g | u) = Z[m] (h, Z [T·k, 2R])."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    s = tl.program_id(2)
    num_r = tl.cdiv(R, BLOCK_R)
    offs_p = (pid // num_r) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = (pid % num_r) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_p = offs_p < P
    mask_r = offs_r < R
    start = tl.load(SEG + e)
    end = tl.load(SEG + e + 1)
    m_lo, m_hi = _split_rows(start, end, split, s, BLOCK_M)
    acc = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mm = rows < m_hi
        pair = tl.load(ORDER + rows, mask=mm, other=0)
        tok = (pair // k_top).to(tl.int64)
        rows = rows.to(tl.int64)
        ymask = mm[:, None] & mask_p[None, :]
        zmask = mm[:, None] & mask_r[None, :]
        if Y_TOKEN:
            w = tl.load(TW + pair, mask=mm, other=0.0).to(tl.float32)
            y = tl.load(Y + tok[:, None] * sy_m + offs_p[None, :], mask=ymask, other=0.0)
            y = (y.to(tl.float32) * w[:, None]).to(Y.dtype.element_ty)
        else:
            y = tl.load(Y + rows[:, None] * sy_m + offs_p[None, :], mask=ymask, other=0.0)
        if Z_TOKEN:
            z = tl.load(Z + tok[:, None] * sz_m + offs_r[None, :], mask=zmask, other=0.0)
        else:
            z_ptrs = Z + rows[:, None] * sz_m + offs_r[None, :]
            g = tl.load(z_ptrs, mask=zmask, other=0.0).to(tl.float32)
            u = tl.load(z_ptrs + R, mask=zmask, other=0.0).to(tl.float32)
            act, _ = _act(g, ACT, False)
            z = (act * u).to(Z.dtype.element_ty)  # the a the forward's second GEMM read
        acc = tl.dot(tl.trans(y), z, acc, input_precision=PRECISION)
    # (int64 before the products: (E-1)·P·R passes 2^31 for DeepSeek-V2/V3-size experts)
    tl.store(OUT + s.to(tl.int64) * so_s + e.to(tl.int64) * so_e + offs_p[:, None].to(tl.int64) * so_p
             + offs_r[None, :],
             acc.to(OUT.dtype.element_ty), mask=mask_p[:, None] & mask_r[None, :])


@triton.jit
def _combine_kernel(O, TW, IDS, OUT, E, N, k_top, n_cb, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[t, n] = Σ_j TW[t, j] · O[t·k + j, n] over the slots whose id is in [0, E), j in order."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid // n_cb
    cols = (pid - t * n_cb) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, k_top):
        p = t * k_top + j
        e = tl.load(IDS + p)
        valid = (e >= 0) & (e < E)
        # a dropped slot's row of O was never written (not read), and its weight may be anything (not used)
        o = tl.load(O + p * N + cols, mask=mask & valid, other=0.0).to(tl.float32)
        if HAS_W:
            o = o * tl.load(TW + p).to(tl.float32)
        acc += tl.where(valid, o, 0.0)
    tl.store(OUT + t * N + cols, acc.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- autotuning

def _cfg(names, values, warps, stages):
    return triton.Config(dict(zip(names, values)), num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Every candidate compiles for sm_90 with no spill and fits
# shared memory (`python tests/test_moe_compile.py`); the small-BLOCK_M ones serve decoding, where
# an expert sees a handful of rows. LLMKERN_MOE_AUTOTUNE=0 runs the first that fits (see _kernel).
# The gate-up kernels hold two [BM, BN] fp32 tiles through their epilogue (g and u; ga, g, u and the
# activation's derivative in the backward): at most 32 elements of each per thread, or they spill
# (128x128 on 8 warps: 16 bytes forward, 104 backward; the forward fits on 16 warps).
GATE_UP_TILES = [(64, 128, 64, 8, 3), (128, 128, 64, 16, 3), (128, 64, 64, 8, 3), (128, 64, 64, 8, 4),
                 (64, 64, 64, 4, 4), (64, 64, 128, 4, 3), (32, 64, 128, 4, 3), (16, 64, 128, 4, 4)]
GEMM_TILES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
              (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (16, 128, 128, 4, 4)]
GATE_UP_BWD_TILES = [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 64, 64, 8, 4), (64, 64, 64, 4, 4),
                     (64, 64, 128, 4, 3), (32, 64, 128, 4, 3), (16, 64, 128, 4, 4)]
# (BLOCK_P, BLOCK_R, BLOCK_M, warps, stages)
WGRAD_TILES = [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
               (64, 64, 64, 4, 4)]
# float32 with input_precision "ieee" (mma_precision's default for float32: torch's allow_tf32 off) has no
# tensor-core MMA: tl.dot becomes FMAs over per-thread slices of the operand tiles, which a BLOCK_K of 64 or
# 128 (or BLOCK_M 64 in wgrad's reduction) overflows: at sm_80 the 16-bit lists above spill kilobytes of stack
# (gate-up 128x64x64: 6208 bytes; 16x64x128 also needs 221184 bytes of shared memory, over the A100's 166912).
# A BLOCK_K of 16 (32 rows per step in wgrad) keeps every one of these within 255 registers at sm_80 and sm_90,
# with no spill (8 bytes of stack for the 64x64 gate-up with the erf gelu at sm_90) and at most 82 KB of shared
# memory (`python tests/test_moe_compile.py fp32`): large tiles for prefill, 64x64 for mid-size experts, 16 rows
# for decoding. The first is LLMKERN_MOE_AUTOTUNE=0's choice. 16-bit inputs and float32 as TF32 use the lists above.
GATE_UP_IEEE_TILES = [(128, 64, 16, 8, 3), (64, 64, 16, 4, 3), (16, 64, 16, 4, 3)]
GEMM_IEEE_TILES = [(128, 128, 16, 8, 3), (64, 64, 16, 4, 3), (16, 128, 16, 4, 3)]
GATE_UP_BWD_IEEE_TILES = [(128, 64, 16, 8, 3), (64, 64, 16, 4, 3), (16, 64, 16, 4, 3)]
WGRAD_IEEE_TILES = [(128, 128, 32, 8, 3), (64, 64, 32, 4, 3)]
_MNK = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_PRM = ("BLOCK_P", "BLOCK_R", "BLOCK_M")

GPU_SLOT_N = 64  # d topk_weights partials per 64 columns of F: every GATE_UP_BWD(_IEEE)_TILES BLOCK_N is a multiple
INTERP_SLOT_N = 16

_KERNELS = {  # name: (kernel, candidates, autotune key)
    "gate_up": (_gate_up_kernel, [_cfg(_MNK, t[:3], *t[3:]) for t in GATE_UP_TILES],
                ["F", "K", "rows_hint", "SAVE_H", "ACT"]),
    "gemm": (_sorted_gemm_kernel, [_cfg(_MNK, t[:3], *t[3:]) for t in GEMM_TILES], ["N", "K", "rows_hint", "sb_k"]),
    "gate_up_bwd": (_gate_up_bwd_kernel, [_cfg(_MNK, t[:3], *t[3:]) for t in GATE_UP_BWD_TILES],
                    ["F", "K", "rows_hint", "ACT"]),
    "wgrad": (_wgrad_kernel, [_cfg(_PRM, t[:3], *t[3:]) for t in WGRAD_TILES], ["P", "R", "Y_TOKEN", "split"]),
}
_IEEE = {  # name: the float32 "ieee" candidates (FMA dots)
    "gate_up": [_cfg(_MNK, t[:3], *t[3:]) for t in GATE_UP_IEEE_TILES],
    "gemm": [_cfg(_MNK, t[:3], *t[3:]) for t in GEMM_IEEE_TILES],
    "gate_up_bwd": [_cfg(_MNK, t[:3], *t[3:]) for t in GATE_UP_BWD_IEEE_TILES],
    "wgrad": [_cfg(_PRM, t[:3], *t[3:]) for t in WGRAD_IEEE_TILES],
}
_INTERP = {"gate_up": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32), "gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
           "gate_up_bwd": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
           "wgrad": dict(BLOCK_P=32, BLOCK_R=32, BLOCK_M=16)}
_tuned = {}


def _smem(name, config, esize):
    """Shared memory a config's pipelined operand tiles need (bytes, estimated)."""
    m = config.kwargs
    if name == "wgrad":
        tiles = m["BLOCK_M"] * (m["BLOCK_P"] + m["BLOCK_R"])
    else:  # the gate-up kernel streams two weight tiles per step
        tiles = m["BLOCK_K"] * (m["BLOCK_M"] + (2 if name == "gate_up" else 1) * m["BLOCK_N"])
    return config.num_stages * tiles * esize


def configs_for(name, precision):
    """The autotuning candidates of kernel `name` for tl.dot's input precision: the float32 "ieee" list (FMA
    dots) or the tensor-core one (16-bit inputs, and float32 as TF32)."""
    return _IEEE[name] if precision == "ieee" else _KERNELS[name][1]


def fixed_config(name, esize, precision):
    """LLMKERN_MOE_AUTOTUNE=0's configuration: the first candidate whose tiles fit shared memory in this
    element size (float32 doubles them)."""
    configs = configs_for(name, precision)
    return next((c for c in configs if _smem(name, c, esize) <= 200 << 10), configs[-1])


def _kernel(name, esize, precision):
    """(kernel, fixed meta-parameters): the raw kernel with small blocks under the interpreter, an
    autotuner (behind the low-overhead launch front) on GPU over configs_for(name, precision), or over
    fixed_config's one under LLMKERN_MOE_AUTOTUNE=0."""
    raw, _, key = _KERNELS[name]
    if triton_interpreting():
        return raw, _INTERP[name]
    fixed = os.environ.get("LLMKERN_MOE_AUTOTUNE", "1") == "0"
    ieee = precision == "ieee"
    tag = (name, ieee, esize) if fixed else (name, ieee)
    if tag not in _tuned:
        configs = [fixed_config(name, esize, precision)] if fixed else configs_for(name, precision)
        tuner = triton.autotune(configs, key=[] if fixed else key)(raw)
        _tuned[tag] = _autotune_front.Tuned(tuner)
    return _tuned[tag], {}


def _launch(name, grid, *args, **kwargs):
    kern, fixed = _kernel(name, args[0].element_size(), kwargs["PRECISION"])
    with on_device(*args):
        kern[grid](*args, **kwargs, **fixed)


def _rows_hint(n_pairs, n_experts):
    """Autotune key: rows per expert on average, as a power of two (decoding and prefill differ)."""
    return min(4096, next_power_of_2(cdiv(n_pairs, n_experts)))


def _block_e(n_experts):
    return max(2, next_power_of_2(n_experts))


def _tile_grid(n_pairs, n_experts, N):
    """(row tiles, column tiles): a static bound on the tiles of all experts' segments."""
    return lambda meta: (cdiv(n_pairs, meta["BLOCK_M"]) + min(n_experts, n_pairs), cdiv(N, meta["BLOCK_N"]))


def _split_for(n_pairs, n_experts, P, R, device):
    """Row chunks of the weight-gradient reduction: enough programs for two waves of the SMs, at least
    ~512 rows per chunk, and partial buffers under 256 MiB; 1 (no buffer) on CPU."""
    if device.type != "cuda":
        return 1
    tiles = cdiv(P, 128) * cdiv(R, 128) * n_experts
    want = cdiv(2 * sm_count(device), tiles)
    by_rows = max(1, n_pairs // (512 * n_experts))
    by_mem = max(1, (256 << 20) // (4 * n_experts * P * R))
    return int(min(want, by_rows, by_mem, 32))


# ----------------------------------------------------------------------------- launchers

@launches_on_device
def _combine(o, tw, ids, n_experts, dtype):
    """[T, N] = Σ_j tw[t, j] · o[t·k + j] (tw None: plain sum) over the slots with a valid id."""
    T, k = ids.shape
    N = o.shape[1]
    out = torch.empty((T, N), device=o.device, dtype=dtype)
    if T == 0:
        return out
    block = min(next_power_of_2(N), 32 if triton_interpreting() else 1024)
    n_cb = cdiv(N, block)
    _combine_kernel[(T * n_cb,)](o, tw if tw is not None else o, ids, out, n_experts, N, k, n_cb,
                                 HAS_W=tw is not None, BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return out


def _sorted_gemm(inp, B, order, seg, n_pairs, N, sb_n, sb_k):
    """[T·k, N] in pair order = inp (sorted rows [T·k, K]) · B_eᵀ, B_e[n, k] at B[e] + n·sb_n + k·sb_k."""
    E = seg.shape[0] - 1
    out = torch.empty((n_pairs, N), device=inp.device, dtype=inp.dtype)
    _launch("gemm", _tile_grid(n_pairs, E, N), inp, B, order, seg, out, E, N, inp.shape[1],
            _rows_hint(n_pairs, E), inp.stride(0), B.stride(0), sb_n, sb_k,
            BLOCK_E=_block_e(E), PRECISION=mma_precision(inp.dtype))
    return out


def moe_forward(x, w_gate_up, w_down, topk_ids, topk_weights, order, seg, act="silu", save_h=True):
    """(y [T, d], h [T·k, 2F] (g | u) in sorted order, or [0, 2F] when not save_h).

    x [T, d]; w_gate_up [E, 2F, d], w_down [E, d, F] (any strides); topk_ids int32 [T, k],
    topk_weights [T, k] (any float dtype); order, seg from sort_pairs."""
    x = x.contiguous()
    T, d = x.shape
    E, F2, _ = w_gate_up.shape
    F = F2 // 2
    n_pairs = topk_ids.numel()
    a = torch.empty((n_pairs, F), device=x.device, dtype=x.dtype)
    h = torch.empty((n_pairs if save_h else 0, F2), device=x.device, dtype=x.dtype)
    if n_pairs == 0:
        return torch.zeros((T, d), device=x.device, dtype=x.dtype), h
    _launch("gate_up", _tile_grid(n_pairs, E, F), x, w_gate_up, order, seg, a, h if save_h else a,
            E, F, d, topk_ids.shape[1], _rows_hint(n_pairs, E), x.stride(0), *w_gate_up.stride(),
            ACT=ACTS[act], SAVE_H=save_h, BLOCK_E=_block_e(E), PRECISION=mma_precision(x.dtype))
    o = _sorted_gemm(a, w_down, order, seg, n_pairs, d, w_down.stride(1), w_down.stride(2))
    del a
    return _combine(o, topk_weights.contiguous(), topk_ids.contiguous(), E, x.dtype), h


def _wgrad(y, z, tw, order, seg, k, P, R, y_token, act, dtype, split=None):
    """[E, P, R] in dtype: Σ over each expert's rows of y'ᵀ z' (see _wgrad_kernel)."""
    E = seg.shape[0] - 1
    n_pairs = order.shape[0]
    split = split or _split_for(n_pairs, E, P, R, y.device)
    out = torch.empty((split, E, P, R), device=y.device, dtype=dtype if split == 1 else torch.float32)
    grid = lambda meta: (cdiv(P, meta["BLOCK_P"]) * cdiv(R, meta["BLOCK_R"]), E, split)  # noqa: E731
    _launch("wgrad", grid, y, z, tw, order, seg, out, P, R, k, split,
            y.stride(0), z.stride(0), out.stride(0), out.stride(1), out.stride(2),
            Y_TOKEN=y_token, Z_TOKEN=not y_token, ACT=ACTS[act], PRECISION=mma_precision(dtype))
    return out[0] if split == 1 else out.sum(0).to(dtype)  # a fixed summation order: deterministic


def moe_backward(dy, x, w_gate_up, w_down, topk_ids, topk_weights, order, seg, h, act="silu",
                 need_x=True, need_w_gate_up=True, need_w_down=True):
    """(dx [T, d] or None, dw_gate_up [E, 2F, d] or None, dw_down [E, d, F] or None,
    dtopk_weights [T, k] in topk_weights' dtype). h: moe_forward's saved (g | u)."""
    dy = dy.contiguous()  # (a stride-0 gradient from .sum())
    x = x.contiguous()
    T, d = x.shape
    E, F2, _ = w_gate_up.shape
    F = F2 // 2
    k = topk_ids.shape[1]
    n_pairs = topk_ids.numel()
    tw = topk_weights.contiguous()
    if n_pairs == 0:  # an empty batch: zero gradients, no launch
        z = torch.zeros_like
        return (z(x) if need_x else None, z(w_gate_up) if need_w_gate_up else None,
                z(w_down) if need_w_down else None, z(topk_weights))
    slot_n = INTERP_SLOT_N if triton_interpreting() else GPU_SLOT_N
    n_slots = cdiv(F, slot_n)
    dh = torch.empty((n_pairs, F2), device=x.device, dtype=x.dtype)
    dwp = torch.empty((n_slots, n_pairs), device=x.device, dtype=torch.float32)
    _launch("gate_up_bwd", _tile_grid(n_pairs, E, F), dy, w_down, tw, order, seg, h, dh, dwp,
            E, F, d, k, n_pairs, n_slots, _rows_hint(n_pairs, E),
            dy.stride(0), w_down.stride(0), w_down.stride(2), w_down.stride(1),
            ACT=ACTS[act], BLOCK_E=_block_e(E), SLOT_N=slot_n, PRECISION=mma_precision(x.dtype))
    valid = (topk_ids >= 0) & (topk_ids < E)
    dtw = torch.where(valid, dwp.sum(0).view(T, k), 0.0).to(topk_weights.dtype)
    dx = dw_gate_up = dw_down = None
    if need_x:  # dx[t] = Σ_j dh[(t, j)] · w_gate_up[e]  (B_e = the [d, 2F] view)
        dxp = _sorted_gemm(dh, w_gate_up, order, seg, n_pairs, d, w_gate_up.stride(2), w_gate_up.stride(1))
        dx = _combine(dxp, None, topk_ids.contiguous(), E, x.dtype)
    if need_w_down:  # Σ (w·dy)ᵀ a
        dw_down = _wgrad(dy, h, tw, order, seg, k, d, F, True, act, w_down.dtype)
    if need_w_gate_up:  # Σ dhᵀ x
        dw_gate_up = _wgrad(dh, x, tw, order, seg, k, F2, d, False, act, w_gate_up.dtype)
    return dx, dw_gate_up, dw_down, dtw
