"""Triton kernels for RMSNorm and LayerNorm (with the fused residual add), and their launchers.

No registration and no autograd here (llmkern/ops/norm.py does that). Launchers take [M, N]
tensors whose last dimension is contiguous (any row stride, 0 included: an expanded upstream
gradient is read in place); they copy a non-contiguous last dimension first. One kernel serves
both norms (IS_RMS), so RMSNorm is LayerNorm without the mean:

    s    = x + residual        (float32 add, rounded to x's dtype and stored: the next residual)
    xhat = (s - mean) * rstd,  rstd = 1 / sqrt(mean((s - mean)^2) + eps)   (mean = 0 for RMSNorm)
    y    = xhat * (offset + w) + b

Every row is whole in registers (BLOCK_N = next power of two >= N, masked; N <= MAX_N), so the
statistics are exact two-pass ones over the registers, and a program holds BLOCK_M rows at once
(BLOCK_M > 1 only for small N, where a single row would leave most lanes idle).

Rounding: y is rounded to x's dtype once, except in the Llama order (CAST_XN: RMSNorm with a weight
and offset 0): xhat is rounded to x's dtype first and the product with the weight is rounded again,
as transformers' LlamaRMSNorm does (`weight * hidden.to(input_dtype)`). In float32 both are one
rounding.

Kernels:
- `_norm_fwd`: reads x (+ residual) and the weight (+ bias), writes y (+ s) and float32 rstd
  (+ mean) per row. Nothing else is saved for the backward.
- `_norm_bwd`: one program per block of consecutive rows (rows_per_prog of them, a multiple of
  BLOCK_M); recomputes xhat from the saved input and statistics, writes
      dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) [+ ds],  g = dy * (offset + w)
  (no mean(g) term for RMSNorm; ds: the gradient of the returned residual, added because s fed both
  the norm and the next block), and sums dy * xhat (and dy) over its rows in float32 registers into
  its own row of a [num_programs, N] partial buffer. The launcher sums those rows with torch.sum:
  dweight / dbias are deterministic (no atomics; the program count depends on the device only).
"""
import os

import torch
import triton
import triton.language as tl

from llmkern.kernels._common import cdiv, launches_on_device, next_power_of_2, sm_count
from llmkern.kernels._common import interpreting as _interpreting

MAX_N = 65536  # the largest hidden size a row of registers holds


@triton.jit
def _norm_fwd(X, R, W, B, Y, S, MEAN, RSTD, M, N, sx, sr, sy, ss, eps, offset,
              IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
              CAST_XN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]  # (M * N may exceed 2^31)
    x = tl.load(X + r64 * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s = (x + tl.load(R + r64 * sr + cols[None, :], mask=mask, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + r64 * ss + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)  # normalise the stored sum, as `h = h + r; norm(h)` does
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, 1) / N
        tl.store(MEAN + rows, mean, mask=rmask)
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, 1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=rmask)
    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        if CAST_XN:
            y = y.to(Y.dtype.element_ty).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r64 * sy + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(DY, DS, X, W, MEAN, RSTD, DX, DWP, DBP, M, N, sdy, sds, sx, sdx, rows_per_prog, offset,
              IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DS: tl.constexpr, NEED_DW: tl.constexpr,
              NEED_DB: tl.constexpr, CAST_XN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    first = pid * rows_per_prog
    last = tl.minimum(first + rows_per_prog, M)
    for r0 in range(first, last, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < last
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        dx = g - xhat * (tl.sum(g * xhat, 1) / N)[:, None]
        if not IS_RMS:
            dx = dx - (tl.sum(g, 1) / N)[:, None]
        dx = dx * rstd[:, None]
        if HAS_DS:
            dx = dx + tl.load(DS + r64 * sds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * sdx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            if CAST_XN:  # the forward multiplied the weight by xhat rounded to x's dtype
                xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
            dw += dy * xhat
        if NEED_DB:
            db += dy
    out = pid.to(tl.int64) * N + cols
    if NEED_DW:
        tl.store(DWP + out, tl.sum(dw, 0), mask=cmask)
    if NEED_DB:
        tl.store(DBP + out, tl.sum(db, 0), mask=cmask)


# ---------------------------------------------------------------------------------------------
# Launchers

def interpreter_programs():
    """Backward programs under TRITON_INTERPRET=1: LLMKERN_NORM_INTERP_PROGRAMS (default 3), few, so
    that the tests run several row blocks per program and a short last program."""
    return int(os.environ.get("LLMKERN_NORM_INTERP_PROGRAMS", "3"))


def config(N):
    """(BLOCK_M, BLOCK_N, num_warps) for hidden size N: the whole row in one block; several rows per
    program below 2048 columns on a GPU (tiles of about 2048 elements), and about 16 elements per
    thread and tensor (num_warps = elements / 512, 4 to 32). Compiled for sm_80 / sm_90
    (tests/test_norm_compile.py), nothing spills up to N = 8192; from N = 16384 the backward (x, dy,
    ds, the weight and the dweight sums: five rows of registers) spills to local memory, correct but
    slower. Under the interpreter the tiles are small (256 elements) so that the tests mask rows as
    well as columns."""
    bn = next_power_of_2(N)
    if _interpreting():
        return max(1, min(8, 256 // bn)), bn, 1
    bm = max(1, min(64, 2048 // bn))
    return bm, bn, max(4, min(32, bm * bn // 512))


def _bwd_programs(M, bm, device):
    """(programs, rows per program) of the backward: about two programs per SM (each a row block
    of the dweight partial sums; more programs mean a larger partial buffer to reduce)."""
    if _interpreting() or device.type != "cuda":
        target = interpreter_programs()
    else:
        target = 2 * sm_count(device)
    per = cdiv(cdiv(M, target), bm) * bm
    return cdiv(M, per), per


def rows2d(t, N):
    """t as [M, N] with a contiguous last dimension (any row stride): a view where one exists."""
    if t.stride(-1) != 1 and N != 1:
        t = t.contiguous()
    return t.reshape(-1, N)


def _empty(t):
    return t.new_empty(0, dtype=torch.float32)


def _dense(t):
    """A [N] weight / bias as the kernels read it (W + cols: unit stride). A strided view (a slice of a
    stacked parameter, w[::2]) would otherwise be read as the wrong elements, silently."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@launches_on_device
def norm_forward(x, weight, bias, residual, eps, *, rms, offset=0.0):
    """(y, s, mean, rstd): y in x's shape and dtype (contiguous); s = x + residual likewise (empty
    without a residual); mean (empty for RMSNorm) and rstd float32 [M] (M = rows of x).

    x, residual: [..., N], any strides (read in place when the last dim is contiguous and the rows
    are one strided dimension, else copied); weight, bias: [N] or None."""
    shape = x.shape
    x = rows2d(x, shape[-1])
    weight, bias = _dense(weight), _dense(bias)
    M, N = x.shape
    y = x.new_empty(shape)
    s = x.new_empty(shape) if residual is not None else x.new_empty(0)
    mean = _empty(x) if rms else x.new_empty(M, dtype=torch.float32)
    rstd = x.new_empty(M, dtype=torch.float32)
    if M == 0:
        return y, s, mean, rstd
    r = rows2d(residual, N) if residual is not None else x
    bm, bn, nw = config(N)
    _norm_fwd[(cdiv(M, bm),)](
        x, r, weight if weight is not None else x, bias if bias is not None else x, y, s if residual is not None else y,
        mean if not rms else rstd, rstd, M, N, x.stride(0), r.stride(0), N, N, float(eps), float(offset),
        IS_RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
        CAST_XN=cast_xn(rms, weight, offset), BLOCK_M=bm, BLOCK_N=bn, num_warps=nw)
    return y, s, mean, rstd


def cast_xn(rms, weight, offset):
    """Whether the Llama rounding order applies: RMSNorm with a weight and no offset."""
    return bool(rms and weight is not None and offset == 0.0)


@launches_on_device
def norm_backward(dy, ds, x, weight, mean, rstd, *, rms, offset=0.0, need_dw=True, need_db=False):
    """(dx in x's shape and dtype, dweight float32 [N] or empty, dbias float32 [N] or empty).

    x: the normalised input (s when the forward had a residual), [..., N]; dy: x's shape, any strides
    (an expanded gradient is read in place where its last dim is contiguous); ds: the gradient of the
    returned residual s, x's shape, or None."""
    shape, N = x.shape, x.shape[-1]
    x, dy = rows2d(x, N), rows2d(dy, N)
    weight = _dense(weight)
    M = x.shape[0]
    dx = x.new_empty(shape)
    need_dw = bool(need_dw and weight is not None)
    if M == 0:
        zeros = x.new_zeros(N, dtype=torch.float32)
        return dx, zeros if need_dw else _empty(x), zeros.clone() if need_db else _empty(x)
    if ds is not None:
        ds = rows2d(ds, N)
    bm, bn, nw = config(N)
    progs, per = _bwd_programs(M, bm, x.device)
    dwp = x.new_empty((progs, N), dtype=torch.float32) if need_dw else _empty(x)
    dbp = x.new_empty((progs, N), dtype=torch.float32) if need_db else _empty(x)
    _norm_bwd[(progs,)](
        dy, ds if ds is not None else dy, x, weight if weight is not None else x, mean if not rms else rstd, rstd,
        dx, dwp if need_dw else rstd, dbp if need_db else rstd, M, N, dy.stride(0),
        ds.stride(0) if ds is not None else 0, x.stride(0), N, per, float(offset),
        IS_RMS=rms, HAS_W=weight is not None, HAS_DS=ds is not None, NEED_DW=need_dw, NEED_DB=bool(need_db),
        CAST_XN=cast_xn(rms, weight, offset), BLOCK_M=bm, BLOCK_N=bn, num_warps=nw)
    return dx, dwp.sum(0) if need_dw else dwp, dbp.sum(0) if need_db else dbp
