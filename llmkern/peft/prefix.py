"""Prefix-tuning (Li & Liang, 2021): learned per-layer key/value prefixes.

    head = Attn(X W_Q, [P_K; X W_K], [P_V; X W_V])

The prefix keys are always visible: with bottom-right causal alignment (llmkern.attention, and
``prefix_attention`` below), concatenating P_K/P_V in front of K/V gives query i the prefix plus
keys 0..i. Under a sliding window (Mistral, Gemma 2...) the zoo counts the prefix keys as the first key
positions, as transformers with PEFT's prefix tuning does: queries more than the window past them no longer
see them, and a left-padded row's pads sit between the prefix and its tokens (its prefix leaves the window
sooner than the same prompt's alone). Optionally the prefix is reparameterised for stability, [P_K, P_V] = MLP_θ(P^E), with
P^E [|P|, d] and an MLP d -> H -> 2·L·d without biases, which is exactly the deck's count
|P|·d + d·H + H·d·2·L; the vanilla prefix has |P|·d·2·L parameters. ``to_vanilla()`` folds the
MLP away for inference.
"""
import math
import numbers
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llmkern.peft import counts


class PrefixTuning(nn.Module):
    """Per-layer prefix keys and values.

    Args:
        n_layers: L. n_prefix: |P|. d: width of K and V (n_kv_heads · head_dim; the model width
            for multi-head attention). n_heads: how many K/V heads ``d`` splits into.
        reparam: use the MLP reparameterisation with hidden size ``hidden`` (H).
        d_embed: width of the prefix embedding P^E (default d, as in the deck's formula).
        init: optional initial values — [L, 2, |P|, d] for the vanilla prefix, or [|P|, d_embed]
            for P^E (e.g. activations of real / task-relevant words, as the paper recommends).
    """

    def __init__(self, n_layers: int, n_prefix: int, d: int, n_heads: int, reparam: bool = False,
                 hidden: Optional[int] = None, d_embed: Optional[int] = None,
                 init: Optional[torch.Tensor] = None, device=None, dtype=None):
        super().__init__()
        n_layers, n_prefix, d, n_heads = (_positive_int(name, v) for name, v in (
            ("n_layers", n_layers), ("n_prefix", n_prefix), ("d", d), ("n_heads", n_heads)))
        if d % n_heads:
            raise ValueError(f"d ({d}) must be divisible by n_heads ({n_heads})")
        if init is not None and not isinstance(init, torch.Tensor):
            raise TypeError(f"init must be a torch.Tensor or None, got {type(init).__name__}")
        self.n_layers, self.n_prefix, self.d, self.n_heads = n_layers, n_prefix, d, n_heads
        self.head_dim = d // n_heads
        self.reparam = bool(reparam)
        kw = dict(device=device, dtype=dtype)
        if self.reparam:
            self.hidden = _positive_int("hidden", hidden, " when reparam=True")
            self.d_embed = d if d_embed is None else _positive_int("d_embed", d_embed)
            self.embedding = nn.Parameter(torch.randn(n_prefix, self.d_embed, **kw) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(self.d_embed, self.hidden, bias=False, **kw), nn.Tanh(),
                                     nn.Linear(self.hidden, 2 * n_layers * d, bias=False, **kw))
            if init is not None:
                if tuple(init.shape) != (n_prefix, self.d_embed):
                    raise ValueError(f"init must have shape [{n_prefix}, {self.d_embed}], got {tuple(init.shape)}")
                with torch.no_grad():
                    self.embedding.copy_(init)
        else:
            self.hidden = None
            self.d_embed = None
            self.prefix = nn.Parameter(torch.randn(n_layers, 2, n_prefix, d, **kw) * 0.02)
            if init is not None:
                if tuple(init.shape) != (n_layers, 2, n_prefix, d):
                    raise ValueError(f"init must have shape [{n_layers}, 2, {n_prefix}, {d}], "
                                     f"got {tuple(init.shape)}")
                with torch.no_grad():
                    self.prefix.copy_(init)

    def kv(self) -> torch.Tensor:
        """All prefixes as one tensor [L, 2, |P|, d] (index 0: keys, 1: values)."""
        if self.reparam:
            out = self.mlp(self.embedding)                      # [|P|, 2·L·d]
            return out.view(self.n_prefix, self.n_layers, 2, self.d).permute(1, 2, 0, 3)
        return self.prefix

    def forward(self, batch_size: int = 1) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (P_K, P_V), each [batch, n_heads, |P|, head_dim] (an expanded view)."""
        # (expand(-1, ...) keeps the size: batch_size=-1 silently gave a batch of 1. A SymInt, the batch of a model
        # compiled with dynamic shapes, is taken as it is: 0 (an empty batch) is fine)
        if not isinstance(batch_size, torch.SymInt):
            if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 0:
                raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
        kv = self.kv().view(self.n_layers, 2, self.n_prefix, self.n_heads, self.head_dim).transpose(2, 3)
        return [(kv[i, 0].unsqueeze(0).expand(batch_size, -1, -1, -1),
                 kv[i, 1].unsqueeze(0).expand(batch_size, -1, -1, -1)) for i in range(self.n_layers)]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def formula_parameters(self) -> int:
        """The seed deck's count for this configuration (equal to num_trainable_parameters when
        d_embed == d)."""
        if self.reparam:
            return (self.n_prefix * self.d_embed + self.d_embed * self.hidden
                    + self.hidden * self.d * 2 * self.n_layers)
        return counts.prefix_params(self.n_layers, self.d, self.n_prefix)

    @torch.no_grad()
    def to_vanilla(self) -> "PrefixTuning":
        """A vanilla PrefixTuning holding this one's current prefixes (drops the MLP)."""
        kv = self.kv().detach()
        return PrefixTuning(self.n_layers, self.n_prefix, self.d, self.n_heads, init=kv.clone(),
                            device=kv.device, dtype=kv.dtype)


def _positive_int(name, v, when=""):
    """v as an int >= 1 (NumPy ints taken), or ValueError naming it (a bool was taken as 1, d_embed went unchecked
    into the parameter shapes)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive int{when}, got {v!r}")
    return int(v)


def _check_kv(k, v, prefix_k, prefix_v):
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    B, H, T, _ = k.shape
    if v.shape[:3] != (B, H, T):
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)} in batch, heads and length")
    for name, p, full in (("prefix_k", prefix_k, k), ("prefix_v", prefix_v, v)):
        if p.shape[0] not in (1, B) or p.shape[1] != H or p.shape[3] != full.shape[3]:
            raise ValueError(f"{name} {tuple(p.shape)} must be [1 or {B}, {H}, P, {full.shape[3]}] for "
                             f"{'k' if full is k else 'v'} {tuple(full.shape)}")
    if prefix_k.shape[2] != prefix_v.shape[2]:
        raise ValueError(f"prefix_k and prefix_v must hold as many positions, got {prefix_k.shape[2]} and "
                         f"{prefix_v.shape[2]}")


def extend_kv(k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor):
    """[P_K; K], [P_V; V] along the sequence axis (-2). Prefix heads broadcast over the batch."""
    _check_kv(k, v, prefix_k, prefix_v)
    B = k.shape[0]
    return (torch.cat([prefix_k.expand(B, -1, -1, -1).to(k.dtype), k], dim=-2),
            torch.cat([prefix_v.expand(B, -1, -1, -1).to(v.dtype), v], dim=-2))


def prefix_attention(q, k, v, prefix_k, prefix_v, causal: bool = True, scale: Optional[float] = None):
    """softmax(q [P_K; K]ᵀ · scale + mask) [P_V; V] with the prefix always visible (plain PyTorch).

    q [B, H, Tq, D]; k, v [B, Hkv, Tk, D] (H a multiple of Hkv: grouped-query attention); prefix_k/v
    [B or 1, Hkv, P, D] (v's head_dim may differ). Causal masking is aligned bottom-right, so query i (of the
    last Tq positions) sees the prefix and keys up to its own.
    """
    if not torch.is_tensor(q) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [batch, heads, seq, head_dim], got "
                         f"{tuple(q.shape) if torch.is_tensor(q) else type(q).__name__}")
    k2, v2 = extend_kv(k, v, prefix_k, prefix_v)
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} must match k {tuple(k.shape)} in batch and head_dim, with heads a "
                         "multiple of k's (grouped-query attention)")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal prefix attention needs q no longer than k (the queries are the last positions), "
                         f"got {q.shape[2]} queries and {k.shape[2]} keys")
    Tq, Tk = q.shape[-2], k2.shape[-2]
    mask = None
    if causal:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1],
                                          scale=scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
