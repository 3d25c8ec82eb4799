"""Triton kernels for gated activations (SwiGLU, GeGLU), forward and backward, and their launchers.

No registration and no autograd here (llmkern/ops/swiglu.py does that). Semantics: those of
llmkern/reference/swiglu.py:

    out = act(gate) * up,   dgate = dout * up * act'(gate),   dup = dout * act(gate)

act (the constexpr ACT): 0 silu, 1 gelu with the tanh approximation, 2 exact (erf) gelu. All math in
float32, the results in the inputs' dtype. The backward recomputes act(gate) from gate: the forward
saves nothing but its inputs.

Layout: each tensor is viewed as [M, F] rows with a row stride and a column stride (a [..., 2F]
tensor's halves x[..., :F] and x[..., F:] are read in place; a stride-0 upstream gradient too).
Inputs that are contiguous are viewed as one row [1, M * F] (no row tail per F). One program per
(row, BLOCK columns), on a flat 1-D grid (no 65535 limit); offsets int64. The outputs are
contiguous. Column stride 1 is specialised by Triton, so those loads and stores are 16-byte vectors.
"""
import os

import torch
import triton
import triton.language as tl

from llmkern.kernels._common import cdiv, launches_on_device, next_power_of_2
from llmkern.kernels._common import interpreting as _interpreting
from llmkern.kernels._common import tanh as _tanh

ACTS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
MAX_BLOCK = 2048
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_C = tl.constexpr(0.044715)
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _act(g, ACT: tl.constexpr, GRAD: tl.constexpr):
    """(act(g), act'(g)); act'(g) is 0 unless GRAD."""
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s)) if GRAD else 0.0
    elif ACT == 1:  # (tensor operands first: constexpr * tensor misbehaves under the interpreter)
        g2 = g * g
        th = _tanh(g * (1.0 + g2 * _GELU_C) * _SQRT_2_OVER_PI)
        a = 0.5 * g * (1.0 + th)
        da = (0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * (1.0 + g2 * _GELU_C * 3.0) * _SQRT_2_OVER_PI
              if GRAD else 0.0)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(g * _INV_SQRT2))
        a = g * cdf
        da = cdf + g * _INV_SQRT_2PI * tl.exp(-0.5 * g * g) if GRAD else 0.0
    return a, da


@triton.jit
def _cols(pid, n_cb, BLOCK: tl.constexpr):
    """(row, columns) of program pid on the flat grid of rows x n_cb column blocks, int64."""
    pid = pid.to(tl.int64)
    row = pid // n_cb
    return row, (pid - row * n_cb) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _glu_fwd(G, U, O, F, n_cb, sg_m, sg_f, su_m, su_f, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row, cols = _cols(tl.program_id(0), n_cb, BLOCK)
    mask = cols < F
    g = tl.load(G + row * sg_m + cols * sg_f, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * su_m + cols * su_f, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act(g, ACT, False)
    tl.store(O + row * F + cols, (a * u).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd(DO, G, U, DG, DU, F, n_cb, sd_m, sd_f, sg_m, sg_f, su_m, su_f,
             ACT: tl.constexpr, BLOCK: tl.constexpr):
    row, cols = _cols(tl.program_id(0), n_cb, BLOCK)
    mask = cols < F
    do = tl.load(DO + row * sd_m + cols * sd_f, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * sg_m + cols * sg_f, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * su_m + cols * su_f, mask=mask, other=0.0).to(tl.float32)
    a, da = _act(g, ACT, True)
    out = row * F + cols
    tl.store(DG + out, (do * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + out, (do * a).to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers

def interpreter_block():
    """BLOCK under TRITON_INTERPRET=1: LLMKERN_GLU_INTERP_BLOCK (a power of two, default 32), small so
    that the tests run several column blocks and partial last ones."""
    return int(os.environ.get("LLMKERN_GLU_INTERP_BLOCK", "32"))


def config(F):
    """(BLOCK, num_warps): up to 2048 columns per program, 8 warps (8 elements, 16 bytes of bf16 per
    thread and tensor)."""
    if _interpreting():
        return min(next_power_of_2(F), interpreter_block()), 1
    block = min(next_power_of_2(F), MAX_BLOCK)
    return block, max(1, min(8, block // 256))


def _rows_collapse(shape, stride):
    """Whether leading dims with these sizes/strides flatten into one strided row dimension."""
    dims = [(n, s) for n, s in zip(shape, stride) if n != 1]
    return all(s0 == s1 * n1 for (_, s0), (n1, s1) in zip(dims, dims[1:]))


def as_rows(t):
    """t [..., F] as an [M, F] view with one row stride (copied when the leading dims do not collapse)."""
    if not _rows_collapse(t.shape[:-1], t.stride()[:-1]):
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _views(*ts):
    """[M, F] views of same-shaped tensors; [1, M * F] when every one is contiguous."""
    if all(t.is_contiguous() for t in ts):
        return [t.reshape(1, -1) for t in ts]
    return [as_rows(t) for t in ts]


def _grid(M, F):
    block, warps = config(F)
    n_cb = cdiv(F, block)
    return (M * n_cb,), n_cb, block, warps


@launches_on_device
def glu_forward(gate, up, act="silu"):
    """act(gate) * up, contiguous, with gate's shape and dtype (gate and up: same shape and dtype,
    any strides)."""
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    if out.numel() == 0:
        return out
    g, u = _views(gate, up)
    M, F = g.shape
    grid, n_cb, block, warps = _grid(M, F)
    _glu_fwd[grid](g, u, out, F, n_cb, *g.stride(), *u.stride(), ACT=ACTS[act], BLOCK=block, num_warps=warps)
    return out


@launches_on_device
def glu_backward(dout, gate, up, act="silu"):
    """(dgate, dup), contiguous, with gate's shape and dtype; dout any strides (stride 0 included)."""
    dg = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    du = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    if dg.numel() == 0:
        return dg, du
    d, g, u = _views(dout, gate, up)
    M, F = g.shape
    grid, n_cb, block, warps = _grid(M, F)
    _glu_bwd[grid](d, g, u, dg, du, F, n_cb, *d.stride(), *g.stride(), *u.stride(), ACT=ACTS[act], BLOCK=block,
                   num_warps=warps)
    return dg, du
