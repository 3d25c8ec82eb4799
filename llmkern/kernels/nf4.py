"""Triton pieces of the 4-bit NF4 base weight (QLoRA): the tile load the LoRA GEMM dequantizes in its
main loop, a standalone dequantization kernel, and the operand object the LoRA launchers take.

Layout (bitsandbytes', see llmkern/reference/nf4.py): element f of the row-major [N, K] weight has its
4-bit code in byte f // 2 (high nibble for even f) and its scale in absmax[f // QBLOCK]; its value is
levels[code] · absmax. A tile of W (or of Wᵀ, the backward's dx = dy W) is addressed through the flat
index f = n·swn + k·swk with (swn, swk) = (K, 1) for W and (1, K) for Wᵀ, so one load serves both.

Two ways to use it in a GEMM with M rows of x (see `gemm_weight`):
- fused: the GEMM loads packed bytes and dequantizes each W tile in registers right before tl.dot. W is
  read at 0.5 byte per element (a quarter of bf16's traffic) but each tile is dequantized once per
  BLOCK_M rows of x: best for few rows (decoding, small batches), where W's traffic is the cost;
- dequantize first: one memory-bound pass writes W in x's dtype (0.5 B read + 2 B written per
  element), then the dense GEMM (TMA on sm_90) runs at full tensor-core speed and the temporary is
  freed: best for many rows (training), where the repeated in-loop dequantization would cost more
  than one pass. The dense W is never kept: the backward dequantizes again.
The row count between the two (NF4_FUSED_MAX_M, LLMKERN_NF4_FUSED_MAX_M) is an estimate until measured
on a GPU (benchmarks/NOTES-gpu.md).
"""
import torch
import triton
import triton.language as tl

from llmkern._backend import env_count
from llmkern.kernels._common import cdiv
from llmkern.reference.nf4 import NF4_LEVELS

NF4_FUSED_MAX_M = 256


@triton.jit
def nf4_values(WQ, ABSMAX, LEVELS, flat, mask, QBLOCK: tl.constexpr):
    """fp32 values of the elements at flat indices `flat` (any shape; int64), 0 where not `mask`."""
    byte = tl.load(WQ + (flat >> 1), mask=mask, other=0).to(tl.int32)
    code = (byte >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 0xF  # even index: high nibble
    level = tl.load(LEVELS + code, mask=mask, other=0.0)
    scale = tl.load(ABSMAX + flat // QBLOCK, mask=mask, other=0.0)
    return level * scale


@triton.jit
def _dequant_kernel(WQ, ABSMAX, LEVELS, OUT, numel, QBLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[f] = levels[code f] · absmax[f // QBLOCK] for BLOCK consecutive elements per program."""
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < numel
    w = nf4_values(WQ, ABSMAX, LEVELS, flat, mask, QBLOCK)
    tl.store(OUT + flat, w.to(OUT.dtype.element_ty), mask=mask)


_levels_cache = {}


def levels_on(device):
    """The 16 NF4 levels as an fp32 tensor on `device` (made once per device: no copy per call)."""
    key = (device.type, device.index)
    t = _levels_cache.get(key)
    if t is None:
        t = _levels_cache[key] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return t


class NF4Operand:
    """What the LoRA launchers take in place of a dense W [N, K]: the packed codes, the fp32 absmax, the
    levels table and the stored [N, K] shape; `t()` gives the backward's Wᵀ (same storage, the element
    strides swapped)."""

    def __init__(self, packed, absmax, levels, shape, blocksize, transposed=False):
        self.packed, self.absmax, self.levels = packed, absmax, levels
        self.stored_shape = (int(shape[0]), int(shape[1]))
        self.blocksize = int(blocksize)
        self.transposed = transposed
        N, K = self.stored_shape
        self.shape = (K, N) if transposed else (N, K)
        self.strides = (1, K) if transposed else (K, 1)

    def stride(self, dim):
        return self.strides[dim]

    def t(self):
        return NF4Operand(self.packed, self.absmax, self.levels, self.stored_shape, self.blocksize,
                          not self.transposed)


def dequantize(op, dtype, wrap=None):
    """The dense [N, K] weight (of W; Wᵀ operands come back as the transposed view) in `dtype`."""
    numel = op.stored_shape[0] * op.stored_shape[1]
    out = torch.empty(op.stored_shape, device=op.packed.device, dtype=dtype)
    block = 1024
    kern = _dequant_kernel if wrap is None else wrap(_dequant_kernel)
    kern[(cdiv(numel, block),)](op.packed, op.absmax, op.levels, out, numel, QBLOCK=op.blocksize, BLOCK=block)
    return out.t() if op.transposed else out


def fused_max_m():
    """Row count up to which the GEMM dequantizes W in its main loop (LLMKERN_NF4_FUSED_MAX_M; default
    NF4_FUSED_MAX_M); above it W is dequantized into a temporary first."""
    return env_count("LLMKERN_NF4_FUSED_MAX_M", NF4_FUSED_MAX_M)


def gemm_weight(W, M, dtype, wrap=None):
    """W as the GEMM of M rows should read it: a dense tensor as it is; an NF4Operand as it is for
    M <= fused_max_m() (dequantized in the GEMM's main loop), else dequantized into a temporary."""
    if not isinstance(W, NF4Operand) or M <= fused_max_m():
        return W
    return dequantize(W, dtype, wrap)
