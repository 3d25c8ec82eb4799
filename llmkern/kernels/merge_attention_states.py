"""Triton kernel merging two attention states (out, LSE) of the same queries over disjoint key sets, and its
launcher: one program per block of rows, one read of each input row, one write of the merged row.

    m = max(lse_a, lse_b);  w_a = exp(lse_a - m),  w_b = exp(lse_b - m)
    out = (w_a out_a + w_b out_b) / (w_a + w_b),  lse = m + log(w_a + w_b)

A side with LSE -inf (no key) weighs 0; both -inf gives zeros and -inf, as the attention ops give for a query
that sees no key. Computed in float32 (exp2 / log2), written in out_a's dtype.
"""
import torch
import triton
import triton.language as tl

from llmkern.kernels._common import cdiv, launches_on_device, next_power_of_2

LOG2E = 1.4426950408889634


@triton.jit
def _merge(OA, LA, OB, LB, O, L, N, D,
           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ok = rows < N
    la = tl.load(LA + rows, mask=ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634  # log2 units
    lb = tl.load(LB + rows, mask=ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634
    m = tl.maximum(la, lb)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.math.exp2(la - m_safe)
    wb = tl.math.exp2(lb - m_safe)
    s = wa + wb
    inv = 1.0 / tl.where(s == 0.0, 1.0, s)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    mask = ok[:, None] & (cols[None, :] < D)
    oa = tl.load(OA + offs, mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(OB + offs, mask=mask, other=0.0).to(tl.float32)
    out = (oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None])
    tl.store(O + offs, out.to(O.dtype.element_ty), mask=mask)
    lse = tl.where(s == 0.0, float("-inf"), (m_safe + tl.math.log2(tl.where(s == 0.0, 1.0, s))) * 0.6931471805599453)
    tl.store(L + rows, lse, mask=ok)


@launches_on_device
def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """out_* [N, D] (contiguous, one dtype), lse_* [N] (contiguous, any float dtype) -> (out [N, D] in out_a's
    dtype, lse [N] float32)."""
    N, D = out_a.shape
    out = torch.empty_like(out_a)
    lse = torch.empty(N, device=out_a.device, dtype=torch.float32)
    if N == 0:
        return out, lse
    block_d = max(16, next_power_of_2(D))
    block_r = max(1, min(64, 2048 // block_d))  # rows per program: about 2048 elements (16 per thread at 4 warps)
    _merge[(cdiv(N, block_r),)](out_a, lse_a, out_b, lse_b, out, lse, N, D, BLOCK_R=block_r, BLOCK_D=block_d)
    return out, lse


__all__ = ["merge_attention_states", "LOG2E"]
