"""Reference of llmkern.cross_entropy: plain PyTorch, differentiable; the test oracle and the CPU path.

    cross_entropy(logits [..., V], labels [...], ignore_index, reduction, softcap)
      = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), ignore_index=..., reduction=...)
        with z = logits.float() (float64 stays float64), soft-capped first when softcap is given:
        z = softcap * tanh(z / softcap).

Labels outside [0, V) that are not ignore_index count as ignored, as in the kernels (the public op
rejects them on CPU tensors before this runs). "none" returns the loss with the labels' leading
shape (logits.shape[:-1]), 0 at ignored positions. Not exported from llmkern.reference (the name
is this module's): use ``llmkern.reference.cross_entropy.cross_entropy``.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", softcap: Optional[float] = None) -> torch.Tensor:
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    z = z.double() if z.dtype == torch.float64 else z.float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    y = labels.reshape(-1).long()
    in_range = (y >= 0) & (y < V)
    y = torch.where(in_range | (y == ignore_index), y, torch.full_like(y, ignore_index))
    out = F.cross_entropy(z, y, ignore_index=ignore_index, reduction=reduction)
    if reduction == "none":
        return out.reshape(logits.shape[:-1])
    return out


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", softcap: Optional[float] = None) -> torch.Tensor:
    """cross_entropy(F.linear(hidden, weight, bias), labels): the oracle of the fused op (it
    materialises the logits)."""
    return cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=ignore_index,
                         reduction=reduction, softcap=softcap)


def cross_entropy_chunk(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                        softcap: Optional[float] = None, need_grad: bool = True, grad_scale=1.0):
    """(loss [N] float32, 0 at ignored rows; grad_scale * dloss/dlogits [N, V] float32, or None) of
    one chunk of rows: the CPU counterpart of the Triton kernels' forward + backward."""
    x = logits.double() if logits.dtype == torch.float64 else logits.float()
    V = x.shape[-1]
    z = softcap * torch.tanh(x / softcap) if softcap else x
    y = labels.long()
    valid = (y != ignore_index) & (y >= 0) & (y < V)
    y0 = torch.where(valid, y, torch.zeros_like(y))
    logp = torch.log_softmax(z, dim=-1)
    # (0.0, not a CPU zeros(1): torch.where refuses a 1-dim CPU tensor beside CUDA (float64) or meta logits)
    loss = torch.where(valid, -logp.gather(1, y0[:, None])[:, 0], 0.0)
    if not need_grad:
        return loss, None
    dz = logp.exp_()  # softmax, in place from here on (a chunk is large)
    dz[torch.arange(len(y0), device=dz.device), y0] -= 1.0
    dz.mul_(valid.to(dz.dtype)[:, None] * grad_scale)
    if softcap:
        dz.mul_(1.0 - (z / softcap) ** 2)
    return loss, dz
