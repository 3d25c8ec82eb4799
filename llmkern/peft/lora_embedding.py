"""LoRA on embedding layers: LoRAEmbedding, compatible with Hugging Face PEFT's LoRA ``Embedding`` layer.

    E = E0 + scaling · (B A)ᵀ,   A = lora_embedding_A [r, num_embeddings] zeros,
                                 B = lora_embedding_B [embedding_dim, r] standard normal (PEFT's init),
    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.

    y = base_layer(ids) + scaling · embedding(ids, Aᵀ) Bᵀ      (the lookup with the base's padding_idx, ...)

Plain PyTorch ops: the update is a gather of r columns of A per token and a small [*, r] x [r, d] GEMM, far
cheaper than the model's first projection; no Triton kernel is involved.
"""

import torch
from torch import nn
from torch.nn import functional as F

from llmkern.peft._plain_lora import PlainLoRA


class LoRAEmbedding(PlainLoRA):
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

    ``adapter_dtype``: as LoRALinear's (default float32 over a float16 / bfloat16 table, PEFT's
    ``autocast_adapter_dtype=True``; ``"base"`` keeps the table's dtype). The update is computed in the factors'
    dtype and the sum rounded to the table's, as PEFT does.

    DoRA on embeddings (PEFT's ``use_dora=True`` on an Embedding) is not supported: ``use_dora=True`` raises
    ValueError. ``merge()`` folds ``scaling · (B A)ᵀ`` into the table (refusing non-finite results with
    ``safe_merge``), ``unmerge()`` takes it out. ``disabled = True`` runs the base layer alone (a merged
    layer is unmerged by its next forward, as PEFT does). A merged layer's state_dict says so
    (``lora_merged``), as LoRALinear's does.
    """

    def __init__(self, base_layer: nn.Embedding, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_rslora: bool = False, freeze_base: bool = True, use_dora: bool = False,
                 adapter_dtype=None):
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"base_layer must be an nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer, r, alpha, dropout, use_rslora, use_dora, "embedding", adapter_dtype=adapter_dtype)
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim
        dev, dt = base_layer.weight.device, self._factor_dtype
        self.lora_embedding_A = nn.Parameter(torch.empty(self.r, self.num_embeddings, device=dev, dtype=dt))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, self.r, device=dev, dtype=dt))
        self._finish_init(freeze_base)

    def _lora_factors(self):
        return self.lora_embedding_A, self.lora_embedding_B

    def reset_lora_parameters(self):
        """PEFT's default init for embeddings: A zeros, B standard normal (so the update starts at 0)."""
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def _delta(self):
        dt = self._acc_dtype()
        return self.scaling * (self.lora_embedding_B.to(dt) @ self.lora_embedding_A.to(dt)).T

    def delta_weight(self) -> torch.Tensor:
        """scaling · (B A)ᵀ, [num_embeddings, embedding_dim] (PEFT's get_delta_weight), computed in float32
        (float64 for float64 tables) and returned in the table's dtype."""
        return self._delta().to(self.weight.dtype)

    def _check_mergeable(self, what):
        if self.base_layer.max_norm is not None:
            raise ValueError(f"{what}: the base embedding has max_norm={self.base_layer.max_norm}: its lookup "
                             f"renormalises rows, so a merged table (renormalised as a whole) would not give the "
                             f"unmerged output; keep the adapter unmerged")

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
        base_only = self._base_only()  # (merged or disabled; a disabled merged layer is unmerged first)
        result = self.base_layer(x)
        if base_only:
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
