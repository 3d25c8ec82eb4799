"""DoRA (weight-decomposed LoRA, Liu et al. 2024) on the fused LoRA op, as PEFT computes it for a Linear.

    W' = W + s · B A                          W [out, in], A [r, in], B [out, r], scaling s
    n  = ‖W'_i‖₂ per output row i             [out], detached (no gradient flows through it: DoRA §4.3)
    y  = (m / n) ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ) + b  magnitude m [out]

With dropout on the LoRA branch (training), PEFT computes the DoRA part on the dropped input x̃:
``y = x Wᵀ + b + (m/n - 1) ⊙ (x̃ Wᵀ) + (m/n) ⊙ s (x̃ Aᵀ) Bᵀ``; dora_linear computes exactly that.

PEFT forms W' explicitly (an [out, in] tensor and an out·in·r GEMM every forward). Here the row norms
come from the expansion

    ‖W_i + s B_i A‖² = ‖W_i‖² + 2s · B_i · (A W_iᵀ) + s² · B_i (A Aᵀ) B_iᵀ

(one [out, r] GEMM W Aᵀ, the [r, r] Gram A Aᵀ and row sums, in float32), and the output from
``llmkern.lora_linear``: ``y = lora_linear(x, W, None, A, B, s) · (m / n) + b``, one expression autograd
differentiates (m, A, B, x and b through the fused op and the product; the norm is a constant). The norm
computation allocates nothing [out, in]-sized (B A and W + s B A are never formed).
"""
from typing import Optional, Union

import torch
import torch.nn.functional as F

from llmkern import reference as ref
from llmkern.ops import _checks
from llmkern.ops.lora import _as_scalar, _autocast_args, _check_common, lora_linear
from llmkern.ops.nf4 import NF4Weight, nf4_linear

# rows of a 16-bit weight converted at a time where torch has no float32-accumulating path that reads
# it directly (CPU reductions and GEMMs cast their input first)
_CHUNK_ELEMS = 1 << 20
# torch.mm(a, b, out_dtype=torch.float32) for 16-bit CUDA tensors (torch >= 2.8): fp32 output, no copies
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm_parts(W, A, acc):
    """(‖W_i‖² [out], W Aᵀ [out, r]) in `acc`, without an [out, in] temporary. A is in W's dtype."""
    if W.dtype == acc:
        return torch.linalg.vector_norm(W, dim=1).square(), F.linear(W, A)
    if W.device.type == "cuda":  # 16-bit: the reduction reads W as is and accumulates in float32
        w2 = torch.linalg.vector_norm(W, dim=1, dtype=acc).square()
        if _MM_OUT_DTYPE:
            return w2, torch.mm(W, A.t(), out_dtype=acc)
        return w2, F.linear(W, A).to(acc)  # (cuBLAS accumulates in float32; the [out, r] result is rounded)
    rows = max(1, _CHUNK_ELEMS // max(1, W.shape[1]))
    A = A.to(acc)
    w2, wa = [], []
    for i in range(0, W.shape[0], rows):
        chunk = W[i:i + rows].to(acc)
        w2.append(torch.linalg.vector_norm(chunk, dim=1).square())
        wa.append(F.linear(chunk, A))
    return torch.cat(w2), torch.cat(wa)


def _check_weight_lora(weight, lora_A, lora_B):
    _checks.tensor_arg("weight", weight)
    _checks.tensor_arg("lora_A", lora_A)
    _checks.tensor_arg("lora_B", lora_B)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point [out_features, in_features] tensor, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    if lora_A.dim() != 2 or lora_A.shape[1] != K or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A must have shape [r, {K}] with r >= 1, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.shape != (N, r):
        raise ValueError(f"lora_B must have shape [{N}, {r}], got {tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """Row norms ``‖W + scaling · B A‖₂`` ``[out]`` without forming ``B A``: float32 (float64 for a
    float64 weight), detached.

    Computed as ``‖W_i‖² + 2s · B_i · (A W_iᵀ) + s² · B_i (A Aᵀ) B_iᵀ`` (an [out, r] GEMM, an [r, r] Gram
    and row sums; tiny negative round-off is clamped to 0 before the square root). A and B are first
    rounded to the weight's dtype, as ``lora_linear`` rounds them to the input's: the norm is that of
    the update the op applies. ``‖W_i‖²`` is recomputed on every call rather than cached: a cache keyed
    on the weight's version counter misses writes through ``weight.data`` (PEFT's own merge does
    ``weight.data += ...``), a stale norm would silently give wrong outputs, and the reduction is one
    bandwidth-bound read of W, the same order as the W Aᵀ GEMM that must read it anyway (A changes every
    step). Precision: the expansion loses relative accuracy only when ``W_i + s B_i A`` nearly cancels
    ``W_i`` (about ``eps · ‖W_i‖² / ‖W_i + s B_i A‖²``, eps of float32).
    """
    _check_weight_lora(weight, lora_A, lora_B)
    return _dora_weight_norm(weight, lora_A, lora_B, _as_scalar("scaling", scaling))


def _dora_weight_norm(weight, lora_A, lora_B, s):
    """dora_weight_norm without its argument checks (the ops call it on inputs they checked)."""
    acc = _acc_dtype(weight.dtype)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        W = weight.detach()
        A = lora_A.detach().to(W.dtype)
        B = lora_B.detach().to(W.dtype).to(acc)
        w2, WA = _norm_parts(W, A, acc)              # ‖W_i‖² [out], W Aᵀ [out, r]
        A = A.to(acc)
        gram = A @ A.t()                             # A Aᵀ              [r, r]
        cross = (B * WA).sum(1)                      # B_i · (A W_iᵀ)    [out]
        quad = ((B @ gram) * B).sum(1)               # B_i (A Aᵀ) B_iᵀ   [out]
        n2 = w2 + (2.0 * s) * cross + (s * s) * quad
        return n2.clamp_min_(0).sqrt_()


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, *, seed: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
    """DoRA linear layer on the fused LoRA op, PEFT's semantics, without forming ``B A``.

    ``y = (m / n) ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ) + b`` with ``n = ‖W + s B A‖₂`` per output row (detached,
    see ``dora_weight_norm``). With ``dropout_p > 0`` the DoRA part runs on the dropped input x̃, as in
    PEFT: ``y = x Wᵀ + b + (m/n - 1) ⊙ (x̃ Wᵀ) + (m/n) ⊙ s (x̃ Aᵀ) Bᵀ`` (computed as
    ``(m/n) ⊙ lora_linear(x, ..., dropout_p) + (m/n - 1) ⊙ ((x̃ - x) Wᵀ) + b``: one extra [M, out] GEMM
    while dropout is on, the mask is ``llmkern.reference.lora_dropout(x, dropout_p, seed)``, the fused
    op's).

    Args:
        x: ``[..., in]`` float32 / float16 / bfloat16 (float64: the reference path).
        weight: ``[out, in]``, dtype of x. Gets a gradient when ``weight.requires_grad`` (through the
            two linear terms only: the norm is detached, as in PEFT). Or a frozen 4-bit ``NF4Weight``
            (QDoRA): the products read it in 4 bits (``lora_linear``, ``nf4_linear``); the row norms
            dequantize it into a temporary per call, nothing dense is kept for the backward.
        bias: ``[out]`` or None.
        lora_A: ``[r, in]``, lora_B: ``[out, r]``, 1 <= r <= 256; cast to x's dtype when they differ.
        magnitude: ``[out]`` (PEFT's ``lora_magnitude_vector``), floating point; cast to x's dtype.
        scaling: the LoRA scale (``alpha / r``, or ``alpha / sqrt(r)``): a float or a one-element tensor
            that does not require grad.
        dropout_p: dropout on the LoRA/DoRA branch input, in [0, 1).
        seed: the dropout seed, as for ``llmkern.lora_linear``.

    Differentiable in x, weight, bias, lora_A, lora_B and magnitude. Returns ``[..., out]`` in x's
    dtype. Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as ``F.linear``
    would be.
    """
    x, weight, bias = _autocast_args(x, weight, bias)
    _check_common(x, weight, bias, lora_A, lora_B, multi=False)
    _checks.tensor_arg("magnitude", magnitude)
    N = weight.shape[0]
    if magnitude.shape != (N,):
        raise ValueError(f"magnitude must have shape [{N}] (one per output feature), got {tuple(magnitude.shape)}")
    if not magnitude.is_floating_point():
        raise ValueError(f"magnitude must be a floating-point tensor, got {magnitude.dtype}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude is on {magnitude.device} but x is on {x.device}")
    s = _as_scalar("scaling", scaling)
    p = _checks.dropout_p_arg(dropout_p)
    seed_t = _checks.dropout_seed(seed, p, x.device)
    lora_A = lora_A.to(x.dtype)
    lora_B = lora_B.to(x.dtype)
    acc = _acc_dtype(x.dtype)
    quantized = isinstance(weight, NF4Weight)
    norm = _dora_weight_norm(weight.dequantize(x.dtype) if quantized else weight, lora_A, lora_B, s)
    scale = (magnitude.to(acc) / norm).to(x.dtype)                       # m / n, [out]
    out = lora_linear(x, weight, None, lora_A, lora_B, s, p, seed=seed_t)
    y = out * scale if bias is None else torch.addcmul(bias, out, scale)
    if p > 0:
        # PEFT's base term on the dropped input: (m/n - 1) ⊙ x̃ Wᵀ, on top of x Wᵀ scaled above
        base = nf4_linear if quantized else F.linear
        y = y + base(ref.lora_dropout(x, p, seed_t) - x, weight) * (scale - 1)
    return y
