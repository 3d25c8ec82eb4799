"""LoRA on embedding layers: LoRAEmbedding, compatible with Hugging Face PEFT's LoRA ``Embedding`` layer.

    E = E0 + scaling · (B A)ᵀ,   A = lora_embedding_A [r, num_embeddings] zeros,
                                 B = lora_embedding_B [embedding_dim, r] standard normal (PEFT's init),
    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.

    y = base_layer(ids) + scaling · embedding(ids, Aᵀ) Bᵀ      (the lookup with the base's padding_idx, ...)

Plain PyTorch ops: the update is a gather of r columns of A per token and a small [*, r] x [r, d] GEMM, far
cheaper than the model's first projection; no Triton kernel is involved.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from llmkern.peft.lora import _MERGED_KEY, _MERGED_NORM_KEY, _save_merged_state, lora_scaling


class LoRAEmbedding(nn.Module):
    """An ``nn.Embedding`` (kept frozen as ``base_layer``, PEFT's name) plus a low-rank update of its table,
    computed the way PEFT's ``lora.Embedding`` computes it, with PEFT's parameter names and shapes
    (``lora_embedding_A`` ``[r, num_embeddings]``, ``lora_embedding_B`` ``[embedding_dim, r]``) so that
    adapters move between the two unchanged.

    Forward: ``base_layer(x) + scaling · F.embedding(x, Aᵀ, <the base's padding_idx, max_norm, norm_type,
    scale_grad_by_freq>) @ Bᵀ``, cast to the base output's dtype; a base layer with an ``embed_scale``
    attribute (transformers' scaled word embeddings, e.g. Gemma 3's) multiplies the update by it too,
    as PEFT does. Consequences of taking the same lookup as PEFT:

    * ``padding_idx``: column padding_idx of A gets no gradient (its update stays what A holds there: zero
      from the default init).
    * ``max_norm``: the lookup renormalises the looked-up columns of A in place (PEFT does the same). A
      merged table would then be renormalised as a whole instead, which is a different output, so
      ``merge()`` refuses a base with ``max_norm`` (ValueError naming it).
    * ``sparse=True``: the base lookup keeps its sparse gradient; the LoRA lookup is dense (a sparse
      gradient of the transposed view Aᵀ cannot flow back into A: PEFT's backward raises there). The
      outputs equal PEFT's.
    * ``dropout``: PEFT builds a dropout module for embedding LoRA but never applies it in the forward;
      this layer records the value (it is written to adapter_config.json) and, like PEFT, does not apply it.

    DoRA on embeddings (PEFT's ``use_dora=True`` on an Embedding) is not supported: ``use_dora=True`` raises
    ValueError. ``merge()`` folds ``scaling · (B A)ᵀ`` into the table (refusing non-finite results with
    ``safe_merge``), ``unmerge()`` takes it out. ``disabled = True`` runs the base layer alone (a merged
    layer is unmerged by its next forward, as PEFT does). A merged layer's state_dict says so
    (``lora_merged``), as LoRALinear's does.
    """

    def __init__(self, base_layer: nn.Embedding, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_rslora: bool = False, freeze_base: bool = True, use_dora: bool = False):
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"base_layer must be an nn.Embedding, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not -math.inf < alpha < math.inf:
            raise ValueError(f"alpha must be a finite float, got {alpha!r}")
        if use_dora:
            raise ValueError("use_dora=True is not supported on embedding layers by llmkern.peft (LoRAEmbedding is "
                             "plain LoRA); leave the embedding out of a DoRA adapter's target_modules")
        self.base_layer = base_layer
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), bool(use_rslora)
        self.use_dora = False
        w = base_layer.weight
        self.lora_embedding_A = nn.Parameter(torch.empty(r, self.num_embeddings, device=w.device, dtype=w.dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, device=w.device, dtype=w.dtype))
        self.merged = False
        self.disabled = False
        self._register_state_dict_hook(_save_merged_state)
        if freeze_base:
            for p in base_layer.parameters():
                p.requires_grad_(False)
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    @property
    def weight(self):
        return self.base_layer.weight

    quantized = False  # (LoRALinear's flag for a 4-bit base; an embedding table is never one)

    def reset_lora_parameters(self):
        """PEFT's default init for embeddings: A zeros, B standard normal (so the update starts at 0)."""
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def num_trainable_parameters(self) -> int:
        return self.lora_embedding_A.numel() + self.lora_embedding_B.numel()

    def _acc_dtype(self):
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def _delta(self):
        dt = self._acc_dtype()
        return self.scaling * (self.lora_embedding_B.to(dt) @ self.lora_embedding_A.to(dt)).T

    def delta_weight(self) -> torch.Tensor:
        """scaling · (B A)ᵀ, [num_embeddings, embedding_dim] (PEFT's get_delta_weight), computed in float32
        (float64 for float64 tables) and returned in the table's dtype."""
        return self._delta().to(self.weight.dtype)

    def _merged_weight(self, safe_merge, what="merge"):
        if self.base_layer.max_norm is not None:
            raise ValueError(f"{what}: the base embedding has max_norm={self.base_layer.max_norm}: its lookup "
                             f"renormalises rows, so a merged table (renormalised as a whole) would not give the "
                             f"unmerged output; keep the adapter unmerged")
        new = self.weight.to(self._acc_dtype()) + self._delta()
        if safe_merge and not torch.isfinite(new.to(self.weight.dtype)).all():
            raise ValueError(f"{what}: the merged weight has non-finite values (NaN/inf) in {self.weight.dtype}; "
                             "the adapter is broken (or the sum overflows the dtype), weight left unchanged")
        return new

    @torch.no_grad()
    def merge(self, safe_merge: bool = True):
        """Fold the update into the base table: after this, forward is a plain lookup. With ``safe_merge`` a
        non-finite result raises and leaves the table unchanged; a base with ``max_norm`` raises."""
        if self.merged:
            return
        self.weight.copy_(self._merged_weight(safe_merge).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        self.weight.copy_((self.weight.to(self._acc_dtype()) - self._delta()).to(self.weight.dtype))
        self.merged = False

    # the merged layer's state-dict entries as attributes (see LoRALinear; _save_merged_state reads them)
    @property
    def lora_merged(self):
        return torch.tensor(self.merged, device=self.lora_embedding_A.device) if self.merged else None

    @property
    def lora_dora_merged_norm(self):
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """As LoRALinear's: a checkpoint with the base weight brings its merged state along; LoRA weights alone
        into a layer whose merged state differs are refused (the update would count twice, or not at all)."""
        merged = state_dict.pop(prefix + _MERGED_KEY, None) is not None
        state_dict.pop(prefix + _MERGED_NORM_KEY, None)
        name = prefix[:-1] or "the root module"
        if prefix + "base_layer.weight" in state_dict:
            self.merged = merged
        elif merged != self.merged:
            error_msgs.append(f"LoRA layer {name} is {'' if self.merged else 'not '}merged but the checkpoint "
                              f"was saved {'' if merged else 'un'}merged and has no base weight for it: "
                              f"{'unmerge' if self.merged else 'merge'}() the layer first")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _embed_scale(self, like):
        """The base layer's embed_scale (PEFT's _get_embed_scale: a scalar or a one-element tensor), or None."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return None
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=like.device, dtype=like.dtype)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale.to(like.dtype)
        raise ValueError(f"LoRAEmbedding: the base layer's embed_scale must be a scalar, got "
                         f"{type(scale).__name__} of shape {tuple(getattr(scale, 'shape', ()))}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.merged:  # the merged table holds the update: take it out first, as PEFT does
            self.unmerge()
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        base = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=False)
        update = (after_a @ self.lora_embedding_B.T) * self.scaling
        scale = self._embed_scale(update)
        if scale is not None:
            update = update * scale
        return (result + update).to(result.dtype)

    def extra_repr(self):
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, rslora={self.use_rslora}, merged={self.merged}")
