"""Reference of llmkern.cross_entropy: plain PyTorch, differentiable; the test oracle and the CPU path.

    cross_entropy(logits [..., V], labels [...], ignore_index, reduction, softcap, label_smoothing, z_loss)
      = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), ignore_index=..., reduction=...,
                        label_smoothing=...)
        + z_loss * logsumexp(z)^2 over the rows not ignored, reduced the same way (the z-loss of
        PaLM / Liger-Kernel), with z = logits.float() (float64 stays float64), soft-capped first when
        softcap is given: z = softcap * tanh(z / softcap).

Labels outside [0, V) that are not ignore_index count as ignored, as in the kernels (the public op
rejects them on CPU tensors before this runs). "none" returns the loss with the labels' leading
shape (logits.shape[:-1]), 0 at ignored positions. Not exported from llmkern.reference (the name
is this module's): use ``llmkern.reference.cross_entropy.cross_entropy``.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", softcap: Optional[float] = None, label_smoothing: float = 0.0,
                  z_loss: float = 0.0, return_z_loss: bool = False):
    """The loss; with return_z_loss, (loss, its z-loss term with the same reduction, detached)."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    z = z.double() if z.dtype == torch.float64 else z.float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    y = labels.reshape(-1).long()
    in_range = (y >= 0) & (y < V)
    y = torch.where(in_range | (y == ignore_index), y, torch.full_like(y, ignore_index))
    out = F.cross_entropy(z, y, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    z_term = None
    if z_loss or return_z_loss:
        valid = y != ignore_index
        rows = torch.where(valid, z_loss * torch.logsumexp(z, dim=-1) ** 2, 0.0) if z_loss else \
            torch.zeros(y.shape, device=z.device, dtype=z.dtype)
        z_term = _reduce(rows, valid, reduction)
        out = out + z_term if z_loss else out
    if reduction == "none":
        out = out.reshape(logits.shape[:-1])
        z_term = None if z_term is None else z_term.reshape(logits.shape[:-1])
    return (out, z_term.detach()) if return_z_loss else out


def _reduce(rows, valid, reduction):
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":  # (over the rows not ignored: NaN when there is none, as F.cross_entropy's)
        return rows.sum() / valid.sum()
    return rows


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", softcap: Optional[float] = None, label_smoothing: float = 0.0,
                         z_loss: float = 0.0, return_z_loss: bool = False):
    """cross_entropy(F.linear(hidden, weight, bias), labels): the oracle of the fused op (it
    materialises the logits)."""
    return cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=ignore_index,
                         reduction=reduction, softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss,
                         return_z_loss=return_z_loss)


def cross_entropy_chunk(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                        softcap: Optional[float] = None, need_grad: bool = True, grad_scale=1.0,
                        label_smoothing: float = 0.0, z_loss: float = 0.0, return_lse: bool = False):
    """(loss [N] float32, 0 at ignored rows, the z-loss included; grad_scale * dloss/dlogits [N, V] float32, or
    None) of one chunk of rows: the CPU counterpart of the Triton kernels' forward + backward. return_lse: a third
    output, the logsumexp [N] (0 at ignored rows, as the kernels keep it), from which the z-loss is read."""
    x = logits.double() if logits.dtype == torch.float64 else logits.float()
    V = x.shape[-1]
    z = softcap * torch.tanh(x / softcap) if softcap else x
    y = labels.long()
    valid = (y != ignore_index) & (y >= 0) & (y < V)
    y0 = torch.where(valid, y, torch.zeros_like(y))
    logp = torch.log_softmax(z, dim=-1)
    row = -logp.gather(1, y0[:, None])[:, 0]
    if label_smoothing:  # torch's: (1 - eps) nll + eps mean_j(-logp_j)
        row = (1.0 - label_smoothing) * row - label_smoothing * logp.mean(dim=-1)
    lse = torch.where(valid, torch.logsumexp(z, dim=-1), 0.0) if z_loss or return_lse else None
    if z_loss:
        row = row + z_loss * lse * lse
    # (0.0, not a CPU zeros(1): torch.where refuses a 1-dim CPU tensor beside CUDA (float64) or meta logits)
    loss = torch.where(valid, row, 0.0)
    dz = None
    if need_grad:
        dz = logp.exp_()  # softmax, in place from here on (a chunk is large)
        if z_loss:
            dz.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
        dz[torch.arange(len(y0), device=dz.device), y0] -= 1.0 - label_smoothing
        if label_smoothing:
            dz.sub_(label_smoothing / V)
        dz.mul_(valid.to(dz.dtype)[:, None] * grad_scale)
        if softcap:
            dz.mul_(1.0 - (z / softcap) ** 2)
    return (loss, dz, lse) if return_lse else (loss, dz)
