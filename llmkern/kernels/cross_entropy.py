"""Triton kernels for fused cross-entropy over logits, and their launchers.

No registration and no autograd here (llmkern/ops/cross_entropy.py does that). Launchers take
logits whose last dimension is contiguous, as [N, V] (any row stride) or [B, T, V] (any batch and
token strides: e.g. the shifted slice logits[:, :-1] of a [B, T, V] tensor, never copied), and
labels flattened to [N] (int64 or int32). Row r of the flattened view is (b, t) = divmod(r, T).

Semantics (those of ``F.cross_entropy(logits.float(), labels, ignore_index=...)``):
- optional Gemma-style soft-capping first: z = softcap * tanh(x / softcap), else z = x;
- per-row loss = logsumexp(z) - z[label], 0 for ignored rows; with label smoothing eps (torch's):
  (1 - eps) (logsumexp(z) - z[label]) + eps (logsumexp(z) - mean(z)), gradient
  softmax - (1 - eps) onehot - eps / V; the z-loss's gradient, 2 z_loss lse softmax, is added by the
  backward (its forward term, z_loss lse^2, by the caller from the saved logsumexp);
- a row is ignored when label == ignore_index, and also when the label lies outside [0, V): the
  kernels never read out of bounds and never sync the host to check: the forward counts such rows
  (label neither in [0, V) nor ignore_index) into a one-element int32 output, and the public ops reject
  them: by reading the labels on CPU tensors in eager mode, elsewhere with an assert_async on that count.

Kernels:
- `_ce_fwd`: one program per row; loops over V in BLOCK_V chunks with an online max / sum-exp in
  float32 (exp2 on log2e-scaled values; one exponential per logit), reads the label's logit with
  one scalar load, writes the row's loss, (max - z[label]) + log(sum), and its logsumexp as two float32
  numbers, m + log(sum) and that sum's rounding error (TwoSum): with large logits one float32 would lose
  log(sum) and the backward's probabilities would not sum to 1. One read of the logits; ignored rows
  read nothing.
  With label smoothing (SMOOTH) the same pass also sums z - z[label] (one more running sum).
  A row whose label is out of range adds 1 to BAD (an atomic only such rows issue: none normally).
- `_ce_bwd`: one program per (row, chunk of BLOCK_V columns): recomputes softmax from the saved
  logsumexp pair, exp((z - lse) - lse_lo), and writes dlogits = (softmax - onehot(label)) * g_row [* (1 - tanh^2) with softcap]
  in the logits' dtype. g_row = dout[row * stride_dout] (stride 0: one scalar for mean/sum),
  divided by n_valid (read from device memory) for "mean", 0 for ignored rows (selected, not
  multiplied, so an all-ignored batch whose mean gradient is inf/nan still gets zeros). One read
  and one write of [N, V]; ignored rows only write zeros.

Alignment: with an odd V (50257) rows start at arbitrary 2-byte offsets, and a `cols < V` mask
with an odd V has no constancy, so Triton would emit 2-byte loads and stores. Chunks are therefore
laid out from the 16-byte-aligned element at or below each row's start (ALIGNED: the pointers are
16-byte aligned, and in the backward the gradient's rows sit at the same offset modulo 16 bytes as
the logits' rows): only the first and the last chunk of a row are masked, the whole chunks
between are read (and written) unmasked in 16-byte vectors (LDG.E.128 / STG.E.128 in the sm_80 /
sm_90 SASS). Otherwise the same code runs with shift 0 and no alignment claim.
Row offsets are int64 throughout (N * V exceeds 2^31 at real sizes).
"""
import os

import torch
import triton
import triton.language as tl

from llmkern.kernels._common import cdiv, launches_on_device, next_power_of_2
from llmkern.kernels._common import interpreting as _interpreting
from llmkern.kernels._common import tanh as _tanh

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_BLOCK_V = 4096
_LOG2E = tl.constexpr(LOG2E)  # (kernels may read module globals only as constexpr)
_LN2 = tl.constexpr(LN2)


@triton.jit
def _row_setup(LABELS, row, T, stride_b, stride_t, V, ignore_index, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """Flattened row `row` (int64): (label as int64, valid, base, shift, end).

    The row's logits start at element offset off = b * stride_b + t * stride_t. Chunks are laid
    out from base = off - shift, the VEC-aligned (16-byte) element at or below the row start, so
    the row occupies [shift, shift + V) relative to base: every chunk but the first and the last
    is whole and in bounds, loaded without a mask, in 16-byte vectors (ALIGNED: the pointer is
    16-byte aligned; else shift = 0 and no alignment is claimed). end = 0 for an ignored row."""
    b = row // T
    t = row - b * T
    off = b * stride_b + t * stride_t
    label = tl.load(LABELS + row).to(tl.int64)
    valid = (label != ignore_index) & (label >= 0) & (label < V)
    if ALIGNED:
        shift = (off % VEC).to(tl.int32)
        base = tl.multiple_of(off - shift, VEC)
    else:
        shift = (off * 0).to(tl.int32)
        base = off
    end = tl.where(valid, shift + V, 0)
    return label, valid, base, shift, end


@triton.jit
def _fwd_chunk(x_row, rel, shift, end, m, s, t, z0, sc_in, sc_out, MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               SMOOTH: tl.constexpr):
    """Fold the logits at relative offsets `rel` into the running (max, sum of exp(y - max)). Both in
    natural units: scaling by log2(e) comes after the subtraction, so that logits near float32's
    largest value (|x| > FLT_MAX / log2(e)) do not overflow to inf - inf. SMOOTH: also the running
    sum t of y - z0 (z0 the label's logit where finite): label smoothing's mean logit, taken relative
    to z0 so that large logits do not cancel it away (the loss needs m - mean(y), not mean(y))."""
    if MASKED:
        cmask = (rel >= shift) & (rel < end)
        x = tl.load(x_row + rel, mask=cmask, other=float("-inf")).to(tl.float32)
    else:
        x = tl.load(x_row + rel).to(tl.float32)
    if HAS_SOFTCAP:
        y = _tanh(x * sc_in) * sc_out
        if MASKED:
            y = tl.where(cmask, y, float("-inf"))
    else:
        y = x
    if SMOOTH:
        if MASKED:
            t = t + tl.sum(tl.where(cmask, y - z0, 0.0), 0)
        else:
            t = t + tl.sum(y - z0, 0)
    m_new = tl.maximum(m, tl.max(y, 0))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a chunk of -inf logits: no NaN
    s = s * tl.exp2((m - m_use) * _LOG2E) + tl.sum(tl.exp2((y - m_use) * _LOG2E), 0)
    return m_new, s, t


@triton.jit
def _ce_fwd(X, LABELS, LOSS, LSE, BAD, T, stride_b, stride_t, V, ignore_index, sc_in, sc_out, eps,
            HAS_SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
            ALIGNED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label, valid, base, shift, end = _row_setup(LABELS, row, T, stride_b, stride_t, V, ignore_index,
                                                VEC, ALIGNED)
    # out of range and not ignore_index: counted for the op's assert (int64 compare, as _row_setup's)
    tl.atomic_add(BAD, 1, mask=(~valid) & (label != ignore_index), sem="relaxed")
    x_row = X + base
    # the label's logit first (one scalar load): label smoothing sums the logits relative to it
    xl = tl.load(x_row + shift + tl.where(valid, label, 0), mask=valid, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        zl = _tanh(xl * sc_in) * sc_out
    else:
        zl = xl
    z0 = tl.where(tl.abs(zl) < float("inf"), zl, 0.0)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)  # running max
    s = tl.full((), 0.0, tl.float32)            # running sum of exp(y - m)
    t = tl.full((), 0.0, tl.float32)            # running sum of y - z0 (SMOOTH)
    # first chunk (holds [0, shift)), whole chunks, then the partial last one; an ignored row
    # (end = 0) reads nothing
    m, s, t = _fwd_chunk(x_row, cols, shift, end, m, s, t, z0, sc_in, sc_out, True, HAS_SOFTCAP, SMOOTH)
    n_whole = end // BLOCK_V
    for c in range(1, n_whole):
        m, s, t = _fwd_chunk(x_row, c * BLOCK_V + cols, shift, end, m, s, t, z0, sc_in, sc_out, False,
                             HAS_SOFTCAP, SMOOTH)
    for c in range(tl.maximum(n_whole, 1), tl.cdiv(end, BLOCK_V)):
        m, s, t = _fwd_chunk(x_row, c * BLOCK_V + cols, shift, end, m, s, t, z0, sc_in, sc_out, True,
                             HAS_SOFTCAP, SMOOTH)
    log_s = tl.log2(tl.where(valid, s, 1.0)) * _LN2  # (an ignored row has s = 0)
    lse = m + log_s
    # the rounding of m + log s (TwoSum): with large logits lse alone loses log s, and the backward's
    # exp(y - lse) would be off by that (the probabilities of a row no longer summing to 1)
    bb = lse - m
    lo = (m - (lse - bb)) + (log_s - bb)
    lo = tl.where((lse == lse) & (tl.abs(lse) < float("inf")), lo, 0.0)
    # (m - zl) + log s, not lse - zl: with large logits lse rounds log s away and the difference cancels
    loss = (m - zl) + log_s
    if SMOOTH:
        # torch's (1 - eps) (lse - zl) + eps (lse - mean y), with lse - mean y = (m - z0) - mean(y - z0) + log s
        loss = (1.0 - eps) * loss + eps * (((m - z0) - t / V) + log_s)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + 2 * row, tl.where(valid, lse, 0.0))
    tl.store(LSE + 2 * row + 1, tl.where(valid, lo, 0.0))


@triton.jit
def _bwd_chunk(x_row, dx_row, rel, shift, row_end, label, valid, lse, lse_lo, g, sc_in, sc_out, p_scale,
               target, uniform, MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """dlogits at relative offsets `rel`; an ignored row (g = 0) reads nothing and writes zeros.
    d = p * p_scale - target * onehot - uniform: p_scale 1 + 2 z_loss lse (the z-loss), target
    1 - eps and uniform eps / V (label smoothing); 1, 1 and 0 without them (exact: the same bits)."""
    if MASKED:
        cmask = (rel >= shift) & (rel < row_end)
        x = tl.load(x_row + rel, mask=cmask & valid, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_row + rel, mask=valid, other=0.0).to(tl.float32)  # a uniform mask: still vectors
    if HAS_SOFTCAP:
        th = _tanh(x * sc_in)
        y = th * sc_out
    else:
        y = x
    p = tl.exp2(((y - lse) - lse_lo) * _LOG2E)
    d = ((p * p_scale - tl.where(rel == label + shift, target, 0.0)) - uniform) * g
    if HAS_SOFTCAP:
        d = d * (1.0 - th * th)
    d = d.to(dx_row.dtype.element_ty)
    if MASKED:
        tl.store(dx_row + rel, d, mask=cmask)
    else:
        tl.store(dx_row + rel, d)


@triton.jit
def _ce_bwd(X, LABELS, LSE, DOUT, NVALID, DX, T, stride_b, stride_t, stride_dout, V, ignore_index,
            sc_in, sc_out, target, uniform, z2, HAS_SOFTCAP: tl.constexpr, MEAN: tl.constexpr,
            BLOCK_V: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    label, valid, base, shift, _ = _row_setup(LABELS, row, T, stride_b, stride_t, V, ignore_index,
                                              VEC, ALIGNED)
    row_end = shift + V
    g = tl.load(DOUT + row * stride_dout).to(tl.float32)
    if MEAN:
        g = g / tl.maximum(tl.load(NVALID).to(tl.float32), 1.0)  # n_valid = 0: every row ignored, g unused
    g = tl.where(valid, g, 0.0)
    lse = tl.load(LSE + 2 * row)
    lse_lo = tl.load(LSE + 2 * row + 1)
    # d(z_loss lse^2)/dz = 2 z_loss lse p; (selected: z2 = 0 keeps 1 even where lse is infinite)
    p_scale = tl.where(z2 != 0.0, 1.0 + z2 * lse, 1.0)
    if ALIGNED:  # the launcher checked that gradient rows sit at the logits rows' shift
        dbase = tl.multiple_of(row * V - shift, VEC)
    else:
        dbase = row * V
    x_row = X + base
    dx_row = DX + dbase
    rel = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    if (blk == 0) | ((blk + 1) * BLOCK_V > row_end):
        _bwd_chunk(x_row, dx_row, rel, shift, row_end, label, valid, lse, lse_lo, g, sc_in, sc_out, p_scale,
                   target, uniform, True, HAS_SOFTCAP)
    else:
        _bwd_chunk(x_row, dx_row, rel, shift, row_end, label, valid, lse, lse_lo, g, sc_in, sc_out, p_scale,
                   target, uniform, False, HAS_SOFTCAP)


# ---------------------------------------------------------------------------------------------
# Launchers

def interpreter_block():
    """BLOCK_V under TRITON_INTERPRET=1: LLMKERN_CE_INTERP_BLOCK (a power of two, default 64), small so
    that the tests run many chunks and partial last chunks."""
    return int(os.environ.get("LLMKERN_CE_INTERP_BLOCK", "64"))


def config(V, vec=8):
    """(BLOCK_V, num_warps) for a vocabulary of V: 4096-wide chunks with 8 warps (16 elements per
    thread) at LLM vocabularies, the next power of two with fewer warps below. BLOCK_V >= vec (a
    row's shift, < vec, must lie inside its first chunk)."""
    if _interpreting():
        return max(interpreter_block(), vec), 1
    bv = min(MAX_BLOCK_V, max(next_power_of_2(int(V)), 128))
    return bv, max(1, min(8, bv // 512))


def _rows(logits):
    """(B, T, stride_b, stride_t) of [N, V] or [B, T, V] logits."""
    if logits.dim() == 2:
        return 1, logits.shape[0], 0, logits.stride(0)
    return logits.shape[0], logits.shape[1], logits.stride(0), logits.stride(1)


def _last_contig(t):
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _softcap_args(softcap):
    if softcap:
        return 1.0 / softcap, softcap
    return 0.0, 0.0


def _vec(t):
    """Elements per 16 bytes."""
    return max(1, 16 // t.element_size())


def _aligned(*ts):
    return all(t.data_ptr() % 16 == 0 for t in ts)


def _rows_congruent(logits, vec):
    """Whether every row of `logits` starts at the same offset modulo `vec` as the same row of a
    contiguous [N, V] tensor (the gradient), so one shift serves the loads and the stores."""
    B, T, sb, st = _rows(logits)
    V = logits.shape[-1]
    return st % vec == V % vec and (B == 1 or sb % vec == (T * V) % vec)


@launches_on_device
def cross_entropy_forward(logits, labels, *, ignore_index=-100, softcap=0.0, label_smoothing=0.0, bad_count=None):
    """Per-row loss float32 [N], logsumexp float32 [N, 2] (0 for ignored rows) and the number of rows whose
    label lies outside [0, V) without being ignore_index, an int32 0-dim tensor (such rows are ignored).

    logits: [N, V] or [B, T, V] (last dim contiguous, else copied), float32/float16/bfloat16;
    labels: [N] int64 or int32 (N = B * T). label_smoothing eps: the loss is
    (1 - eps) (lse - z[label]) + eps (lse - mean(z)), one more running sum in the same pass.
    (The z-loss, z_loss * lse^2, is added by the caller from the logsumexp.)
    bad_count: an int32 0-dim tensor the count is added to (linear_cross_entropy's chunks share one, one
    assert per call), returned; None: a new one, zeroed here."""
    logits = _last_contig(logits)
    labels = labels.reshape(-1).contiguous()
    V = logits.shape[-1]
    N = labels.numel()
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N, 2, device=logits.device, dtype=torch.float32)  # (log-sum-exp and its rounding)
    if bad_count is None:
        bad_count = torch.zeros((), device=logits.device, dtype=torch.int32)
    if N == 0:
        return loss, lse, bad_count
    B, T, sb, st = _rows(logits)
    sc_in, sc_out = _softcap_args(softcap)
    bv, nw = config(V, _vec(logits))
    _ce_fwd[(N,)](logits, labels, loss, lse, bad_count, T, sb, st, V, int(ignore_index), sc_in, sc_out,
                  float(label_smoothing), HAS_SOFTCAP=bool(softcap), SMOOTH=bool(label_smoothing), BLOCK_V=bv,
                  VEC=_vec(logits), ALIGNED=_aligned(logits), num_warps=nw)
    return loss, lse, bad_count


@launches_on_device
def cross_entropy_backward(dout, logits, labels, lse, n_valid, *, ignore_index=-100, softcap=0.0,
                           mean=False, label_smoothing=0.0, z_loss=0.0):
    """dlogits, contiguous, with the logits' shape and dtype: (softmax (1 + 2 z_loss lse) - (1 - eps) onehot
    - eps / V) * g, eps the label smoothing.

    dout: the upstream gradient: a 0-dim tensor (reductions "mean" / "sum") or [N] (any stride,
    "none"); n_valid: 0-dim integer device tensor, read by the kernel when `mean` (no host sync)."""
    logits = _last_contig(logits)
    labels = labels.reshape(-1).contiguous()
    V = logits.shape[-1]
    N = labels.numel()
    dx = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    if N == 0:
        return dx
    B, T, sb, st = _rows(logits)
    sc_in, sc_out = _softcap_args(softcap)
    vec = _vec(logits)
    bv, nw = config(V, vec)
    aligned = _aligned(logits, dx) and _rows_congruent(logits, vec)
    n_blk = cdiv(V + (vec - 1 if aligned else 0), bv)
    stride_dout = dout.stride(0) if dout.dim() else 0
    eps = float(label_smoothing)
    _ce_bwd[(N, n_blk)](logits, labels, lse, dout, n_valid, dx, T, sb, st, stride_dout, V,
                        int(ignore_index), sc_in, sc_out, 1.0 - eps, eps / V, 2.0 * float(z_loss),
                        HAS_SOFTCAP=bool(softcap), MEAN=bool(mean),
                        BLOCK_V=bv, VEC=vec, ALIGNED=aligned, num_warps=nw)
    return dx
