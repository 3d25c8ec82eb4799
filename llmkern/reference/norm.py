"""Reference of llmkern.rms_norm and llmkern.layer_norm: plain PyTorch, differentiable; the test
oracle and the CPU path.

    s = x + residual                         (when a residual is given; x's dtype, like `h = h + r`)
    rms_norm:   y = s / sqrt(mean(s^2, -1) + eps) * (offset + weight)
    layer_norm: y = F.layer_norm(s, [N], weight, bias, eps)

Statistics in float32 (float64 for float64 inputs); y in x's dtype. The rounding order of rms_norm
is transformers': with a weight and offset == 0, LlamaRMSNorm's (the normalised value is rounded to
x's dtype, then multiplied by the weight: `weight * hidden.to(input_dtype)`), otherwise
GemmaRMSNorm's (`(hidden * (1 + weight.float())).type_as(x)`: one rounding at the end). Both
agree in float32. Returns y, or (y, s) with return_residual.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6, *,
             residual: Optional[torch.Tensor] = None, offset: float = 0.0, return_residual: bool = False):
    s = x if residual is None else x + residual
    h = s.to(_acc(s))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        y = h.to(s.dtype)
    elif offset == 0.0:  # LlamaRMSNorm
        y = (weight * h.to(s.dtype)).to(s.dtype)
    else:                # GemmaRMSNorm / Gemma3RMSNorm with offset = 1
        y = (h * (offset + weight.to(h.dtype))).to(s.dtype)
    return (y, s) if return_residual else y


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5, *, residual: Optional[torch.Tensor] = None, return_residual: bool = False):
    s = x if residual is None else x + residual
    acc = _acc(s)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    y = F.layer_norm(s.to(acc), (s.shape[-1],), w, b, eps).to(s.dtype)
    return (y, s) if return_residual else y
