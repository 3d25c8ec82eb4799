"""Triton kernel for rotary position embeddings (RoPE) on q and k together, and its launcher.

No registration and no autograd here (llmkern/ops/rope.py does that). Semantics: those of
llmkern/reference/rope.py, i.e. per head of q [B, Hq, T, D] and k [B, Hk, T, D]

    y[..., :R] = x[..., :R] * cos + rot(x[..., :R]) * sin,   y[..., R:] = x[..., R:]

with cos / sin [B or 1, T, R] (R <= D, even) and rot = rotate_half (channel pairs (j, j + R/2)) or,
interleaved, rotate_every_two (pairs (2j, 2j + 1)). Per pair (a, b) of channels that is the 2x2 map

    y_a = x_a * cos_a - x_b * sin_a,   y_b = x_b * cos_b + x_a * sin_b

and its transpose (the backward: dx from dy, TRANSPOSE=True) is the same map with
(sin_a, sin_b) -> (-sin_b, -sin_a): one kernel does both, and reading cos / sin at both channels of
a pair keeps it exact even for cos / sin without the usual duplicated halves.

`_rope`: one program per (token (b, t), block of heads); the head blocks of q come first, then those
of k, so one launch rotates both. A program reads the token's cos / sin row once (float32) and
rotates BLOCK_H heads: the two channels of every pair as two [BLOCK_H, R/2] tiles, the 2x2 map in
float32, stores in the output dtype, plus a copy of the pass-through channels [R, D) when R < D.
Non-interleaved, the tiles are the two half rows; interleaved, the whole [BLOCK_H, R] rows are
loaded and split into even and odd channels (tl.reshape + tl.split, tl.join on the way out): with a
channel stride of 1 both move in 16-byte vectors (LDG.E.128 / STG.E.128 in the sm_80 / sm_90 SASS).
Every tensor is addressed through its own four strides (any layout, read in place: the
[B, H, T, D] transpose of a [B, T, H, D] projection, a stride-0 upstream gradient); token and head
offsets are int64.
"""
import os

import torch
import triton
import triton.language as tl

from llmkern.kernels._common import cdiv, launches_on_device, next_power_of_2
from llmkern.kernels._common import interpreting as _interpreting

MAX_TILE = 2048   # elements per half-tile (BLOCK_H * BLOCK_HALF) at long sequences
MIN_TOKENS_FOR_WIDE = 4096  # fewer tokens (decoding): narrower head blocks, more programs


@triton.jit
def _rotate_heads(x_tok, y_tok, hb, H, sx_h, sx_d, sy_h, sy_d, ca, cb, sa, sb, HALF, R, D,
                  INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  HAS_PASS: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """Rotate heads [hb * BLOCK_H, ...) of one token (x_tok / y_tok point at its head 0) with the
    per-pair cos / sin (ca, cb, sa, sb) [BLOCK_HALF], float32."""
    heads = (hb * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)  # (H * head stride can pass 2^31)
    hmask = heads < H
    xh = x_tok + heads[:, None] * sx_h
    yh = y_tok + heads[:, None] * sy_h
    out_ty = y_tok.dtype.element_ty
    if INTERLEAVED:  # whole [BLOCK_H, R] rows (contiguous: vector loads), viewed as pairs and split
        r = tl.arange(0, 2 * BLOCK_HALF)
        rmask = hmask[:, None] & (r < 2 * HALF)[None, :]
        x = tl.load(xh + r[None, :] * sx_d, mask=rmask, other=0.0).to(tl.float32)
        xa, xb = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
    else:  # two half rows
        i = tl.arange(0, BLOCK_HALF)
        mask = hmask[:, None] & (i < HALF)[None, :]
        xa = tl.load(xh + i[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(xh + (i + HALF)[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    ya = xa * ca[None, :] - xb * sa[None, :]
    yb = xb * cb[None, :] + xa * sb[None, :]
    if INTERLEAVED:
        y = tl.reshape(tl.join(ya, yb), (BLOCK_H, 2 * BLOCK_HALF))
        tl.store(yh + r[None, :] * sy_d, y.to(out_ty), mask=rmask)
    else:
        tl.store(yh + i[None, :] * sy_d, ya.to(out_ty), mask=mask)
        tl.store(yh + (i + HALF)[None, :] * sy_d, yb.to(out_ty), mask=mask)
    if HAS_PASS:  # partial rotary: channels [R, D) pass through unchanged (also in the transpose)
        p = R + tl.arange(0, BLOCK_PASS)
        pmask = hmask[:, None] & (p < D)[None, :]
        xp = tl.load(xh + p[None, :] * sx_d, mask=pmask, other=0.0)
        tl.store(yh + p[None, :] * sy_d, xp.to(out_ty), mask=pmask)


@triton.jit
def _cos_sin(ROW, HALF, sc_d, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token's cos (or sin) row as the pairs' (a, b) channels, float32 [BLOCK_HALF] each."""
    if INTERLEAVED:  # channels (2i, 2i + 1): the whole row, viewed as pairs and split
        r = tl.arange(0, 2 * BLOCK_HALF)
        c = tl.load(ROW + r * sc_d, mask=r < 2 * HALF, other=0.0).to(tl.float32)
        a, b = tl.split(tl.reshape(c, (BLOCK_HALF, 2)))
    else:  # channels (i, i + R/2)
        i = tl.arange(0, BLOCK_HALF)
        a = tl.load(ROW + i * sc_d, mask=i < HALF, other=0.0).to(tl.float32)
        b = tl.load(ROW + (i + HALF) * sc_d, mask=i < HALF, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _rope(Q, K, QO, KO, COS, SIN, T, HQ, HK, HALF, R, D, n_qblk,
          sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
          sqo_b, sqo_h, sqo_t, sqo_d, sko_b, sko_h, sko_t, sko_d,
          sc_b, sc_t, sc_d,
          INTERLEAVED: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_HQ: tl.constexpr,
          BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_PASS: tl.constexpr,
          BLOCK_PASS: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    b = tok // T
    t = tok - b * T
    ca, cb = _cos_sin(COS + b * sc_b + t * sc_t, HALF, sc_d, INTERLEAVED, BLOCK_HALF)
    sa, sb = _cos_sin(SIN + b * sc_b + t * sc_t, HALF, sc_d, INTERLEAVED, BLOCK_HALF)
    if TRANSPOSE:  # [[ca, -sa], [sb, cb]]^T = [[ca, sb], [-sa, cb]]
        sa, sb = -sb, -sa
    if hb < n_qblk:
        _rotate_heads(Q + b * sq_b + t * sq_t, QO + b * sqo_b + t * sqo_t, hb, HQ, sq_h, sq_d, sqo_h, sqo_d,
                      ca, cb, sa, sb, HALF, R, D, INTERLEAVED, BLOCK_HQ, BLOCK_HALF, HAS_PASS, BLOCK_PASS)
    else:
        _rotate_heads(K + b * sk_b + t * sk_t, KO + b * sko_b + t * sko_t, hb - n_qblk, HK, sk_h, sk_d,
                      sko_h, sko_d, ca, cb, sa, sb, HALF, R, D, INTERLEAVED, BLOCK_HK, BLOCK_HALF, HAS_PASS,
                      BLOCK_PASS)


# ---------------------------------------------------------------------------------------------
# Launcher

def interpreter_heads():
    """Heads per program under TRITON_INTERPRET=1: LLMKERN_ROPE_INTERP_HEADS (a power of two, default
    2), small so that the tests run several head blocks and partial last ones."""
    return int(os.environ.get("LLMKERN_ROPE_INTERP_HEADS", "2"))


def config(Hq, Hk, half, n_tokens, block_pass=0):
    """(BLOCK_HQ, BLOCK_HK, BLOCK_HALF, num_warps): head blocks of up to MAX_TILE elements per half
    (all 32 heads of a head_dim-128 q in one program: 16 KB of bf16 moved per program), narrower
    when there are few tokens (decoding), so that the grid still fills the GPU. Warps for the whole
    row tile a program holds: both halves plus, with partial rotary, the pass-through block of
    block_pass channels (BLOCK_PASS; 0 without one), 1024 elements per warp (32 per thread), at most 8:
    R = 32 of 128 channels moves 160 per head, not 32 (1 warp there held 160 elements per thread)."""
    bh = next_power_of_2(half)
    if _interpreting():
        cap = interpreter_heads()
    else:
        tile = MAX_TILE if n_tokens >= MIN_TOKENS_FOR_WIDE else MAX_TILE // 8
        cap = max(1, tile // bh)
    bq = min(next_power_of_2(max(Hq, 1)), cap)
    bk = min(next_power_of_2(max(Hk, 1)), cap)
    row = 2 * bh + block_pass
    warps = 1 if _interpreting() else min(8, next_power_of_2(cdiv(max(bq, bk) * row, 1024)))
    return bq, bk, bh, warps


def _cos_sin_rows(cos, sin):
    """cos / sin as [B or 1, T, R] with one set of strides (b, t, d); b stride 0 when shared."""
    if cos.dim() == 4:
        cos, sin = cos[:, 0], sin[:, 0]
    elif cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    sb, st, sd = cos.stride()
    return cos, sin, (0 if cos.shape[0] == 1 else sb, st, sd)


@launches_on_device
def rope_apply(q, k, cos, sin, *, interleaved=False, transpose=False):
    """(q_out, k_out), each allocated like its input (torch.empty_like: a dense layout is kept).

    q [B, Hq, T, D], k [B, Hk, T, D], any strides, float32/float16/bfloat16; cos / sin [T, R],
    [B or 1, T, R] or [B or 1, 1, T, R], any float dtype. transpose=True applies the transposed
    map (the backward: pass the output gradients, get the input gradients)."""
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    R = cos.shape[-1]
    half = R // 2
    if B * T == 0 or Hq + Hk == 0:
        return qo, ko
    cos, sin, cstr = _cos_sin_rows(cos, sin)
    block_pass = next_power_of_2(D - R) if R < D else 0
    bq, bk, bh, warps = config(Hq, Hk, half, B * T, block_pass)
    n_qblk, n_kblk = cdiv(Hq, bq), cdiv(Hk, bk)
    _rope[(B * T, n_qblk + n_kblk)](
        q, k, qo, ko, cos, sin, T, Hq, Hk, half, R, D, n_qblk,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(), *cstr,
        INTERLEAVED=bool(interleaved), TRANSPOSE=bool(transpose), BLOCK_HQ=bq, BLOCK_HK=bk,
        BLOCK_HALF=bh, HAS_PASS=R < D, BLOCK_PASS=max(block_pass, 1), num_warps=warps)
    return qo, ko
