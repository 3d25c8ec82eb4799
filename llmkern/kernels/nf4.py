"""Triton pieces of the 4-bit NF4 base weight (QLoRA): the tile load the LoRA GEMM dequantizes in its
main loop, a standalone dequantization kernel, and the operand object the LoRA launchers take.

Layout (bitsandbytes', see llmkern/reference/nf4.py): element f of the row-major [N, K] weight has its
4-bit code in byte f // 2 (high nibble for even f) and its scale in absmax[f // QBLOCK]; its value is
levels[code] · absmax. The GEMM's main loop (llmkern/kernels/lora.py `_base_nf4`) reads a tile of W, or of
Wᵀ for the backward's dx = dy W, as whole bytes of stored rows (`nf4_levels`: both elements of a byte from
one table gather) and scales it per quantization block (`block_scales`, `scale_blocks`); that needs rows made
of whole blocks (in_features a multiple of the blocksize), which `gemm_weight` checks.

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
from llmkern.kernels._common import cdiv, on_device

NF4_FUSED_MAX_M = 256


@triton.jit
def nf4_levels(WQ, PAIRS, byte_idx, mask):
    """Unscaled fp32 levels of the two elements of each byte at `byte_idx` ([R, C] int64; 0 where not
    `mask`), as [R, 2C] in storage order (element 2b, then 2b+1). One gather from the 256-entry PAIRS
    table gives both levels of a byte."""
    byte = tl.load(WQ + byte_idx, mask=mask, other=0).to(tl.int32)
    bits = tl.load(PAIRS + byte)
    first = (bits & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    second = ((bits >> 32) & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    pair = tl.join(first, second)  # [R, C, 2]
    return tl.reshape(pair, [pair.shape[0], 2 * pair.shape[1]])


@triton.jit
def block_scales(ABSMAX, STATE2, idx, mask, NESTED: tl.constexpr):
    """fp32 absmax of the quantization blocks at `idx`: stored, or (NESTED, double quantization) decoded
    from its uint8 code: STATE2[code] · STATE2[257 + idx // 256] + STATE2[256] (code map, offset and one
    scale per 256 blocks in one fp32 tensor)."""
    if NESTED:  # (one return: Triton types every return of a function alike)
        code = tl.load(ABSMAX + idx, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(STATE2 + 257 + idx // 256, mask=mask, other=0.0)
        scale = tl.load(STATE2 + code) * scale2 + tl.load(STATE2 + 256)
    else:
        scale = tl.load(ABSMAX + idx, mask=mask, other=0.0)
    return scale


@triton.jit
def scale_blocks(vals, scale, NB: tl.constexpr):
    """vals [R, C] times scale [R, NB]: column block j (C // NB columns) takes scale[:, j]."""
    v = tl.reshape(vals, [vals.shape[0], NB, vals.shape[1] // NB]) * scale[:, :, None]
    return tl.reshape(v, [vals.shape[0], vals.shape[1]])


@triton.jit
def _dequant_kernel(WQ, ABSMAX, PAIRS, STATE2, OUT, numel, QBLOCK: tl.constexpr, BLOCK: tl.constexpr,
                    NESTED: tl.constexpr):
    """OUT[f] = levels[code f] · absmax[f // QBLOCK] for the 2·BLOCK elements of BLOCK consecutive bytes
    (any shape: the blocks of the flat layout; each byte's two elements share a block, QBLOCK is even)."""
    byte_idx = (tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = 2 * byte_idx < numel
    scale = block_scales(ABSMAX, STATE2, byte_idx // (QBLOCK // 2), mask, NESTED)
    w = scale_blocks(nf4_levels(WQ, PAIRS, byte_idx, mask), scale, BLOCK)
    flat = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(OUT + flat, tl.reshape(w, [2 * BLOCK]).to(OUT.dtype.element_ty), mask=flat < numel)


class NF4Operand:
    """What the LoRA launchers take in place of a dense W [N, K]: the packed codes, the fp32 absmax, the
    pair table (llmkern.reference.nf4.level_pairs) and the stored [N, K] shape; `t()` gives the backward's Wᵀ (same storage)."""

    def __init__(self, packed, absmax, pairs, shape, blocksize, transposed=False, state2=None):
        self.packed, self.absmax, self.pairs, self.state2 = packed, absmax, pairs, state2
        self.stored_shape = (int(shape[0]), int(shape[1]))
        self.blocksize = int(blocksize)
        self.transposed = transposed
        N, K = self.stored_shape
        self.shape = (K, N) if transposed else (N, K)

    def t(self):
        return NF4Operand(self.packed, self.absmax, self.pairs, self.stored_shape, self.blocksize,
                          not self.transposed, self.state2)


def dequantize(op, dtype, wrap=None):
    """The dense [N, K] weight (of W; Wᵀ operands come back as the transposed view) in `dtype`."""
    numel = op.stored_shape[0] * op.stored_shape[1]
    out = torch.empty(op.stored_shape, device=op.packed.device, dtype=dtype)
    block = 1024  # bytes per program
    kern = _dequant_kernel if wrap is None else wrap(_dequant_kernel)
    nested = op.state2 is not None
    with on_device(op.packed):
        kern[(cdiv(numel, 2 * block),)](op.packed, op.absmax, op.pairs, op.state2 if nested else op.absmax, out,
                                        numel, QBLOCK=op.blocksize, BLOCK=block, NESTED=nested)
    return out.t() if op.transposed else out


def fused_max_m():
    """Row count up to which the GEMM dequantizes W in its main loop (LLMKERN_NF4_FUSED_MAX_M; default
    NF4_FUSED_MAX_M); above it W is dequantized into a temporary first."""
    return env_count("LLMKERN_NF4_FUSED_MAX_M", NF4_FUSED_MAX_M)


def gemm_weight(W, M, dtype, wrap=None):
    """W as the GEMM of M rows should read it: a dense tensor as it is; an NF4Operand as it is for
    M <= fused_max_m() (dequantized in the GEMM's main loop), else dequantized into a temporary. The main
    loop needs rows made of whole quantization blocks (in_features a multiple of the blocksize, as in
    every LLM layer); other shapes always take the temporary."""
    if not isinstance(W, NF4Operand) or (M <= fused_max_m() and W.stored_shape[1] % W.blocksize == 0):
        return W
    return dequantize(W, dtype, wrap)
